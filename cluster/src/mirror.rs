//! A prefix of etcd mirrored in memory.
//!
//! 1. Get the whole prefix (with a timeout), publish it, note etcd's revision.
//! 2. Watch the prefix from the next revision; apply each put and delete, publish.
//! 3. On any error or a cancelled watch, wait [`RETRY`] and start over at 1: a fresh get
//!    replaces the map, so nothing missed while disconnected stays stale once etcd answers.
//! 4. Stop when the stop signal turns true.
//!
//! Readers get a `watch` of an immutable map, so they never wait for etcd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{MAX_KEYS, OP_TIMEOUT};

/// The wait before a mirror starts over after an error.
pub(crate) const RETRY: Duration = Duration::from_millis(500);

/// A mirrored prefix: key (without the prefix) → value and etcd's revision of its last
/// change.
pub(crate) type Map = Arc<BTreeMap<String, (Vec<u8>, i64)>>;

/// Starts mirroring `prefix` (which ends with `/`).
pub(crate) fn spawn(
    client: Client,
    prefix: String,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<Map> {
    let (tx, rx) = watch::channel(Map::default());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = round(client.clone(), &prefix, &tx) => {}
            }
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    });
    rx
}

/// Steps 1 and 2, until an error.
async fn round(mut client: Client, prefix: &str, tx: &watch::Sender<Map>) {
    let got = tokio::time::timeout(
        OP_TIMEOUT,
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await;
    let response = match got {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            debug!(%error, prefix, "cannot read a cluster prefix");
            return;
        }
        Err(_) => {
            debug!(prefix, "reading a cluster prefix timed out");
            return;
        }
    };
    let revision = response.header().map_or(0, |h| h.revision());
    let mut map = BTreeMap::new();
    for kv in response.kvs() {
        insert(&mut map, prefix, kv.key(), kv.value(), kv.mod_revision());
    }
    tx.send_replace(Arc::new(map.clone()));
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream =
        match tokio::time::timeout(OP_TIMEOUT, client.watch(prefix, Some(options))).await {
            Ok(Ok(stream)) => stream,
            _ => return,
        };
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(error) => {
                debug!(%error, prefix, "a cluster watch ended");
                return;
            }
        };
        if message.canceled() {
            debug!(
                prefix,
                reason = message.cancel_reason(),
                "a cluster watch was cancelled"
            );
            return;
        }
        if message.events().is_empty() {
            continue;
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => insert(&mut map, prefix, kv.key(), kv.value(), kv.mod_revision()),
                EventType::Delete => {
                    if let Some(key) = strip(prefix, kv.key()) {
                        map.remove(&key);
                    }
                }
            }
        }
        tx.send_replace(Arc::new(map.clone()));
    }
}

fn strip(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix(prefix).map(str::to_owned)
}

fn insert(
    map: &mut BTreeMap<String, (Vec<u8>, i64)>,
    prefix: &str,
    key: &[u8],
    value: &[u8],
    revision: i64,
) {
    let Some(key) = strip(prefix, key) else {
        return;
    };
    if map.len() >= MAX_KEYS && !map.contains_key(&key) {
        warn!(
            prefix,
            key, "a cluster prefix holds too many keys: left out"
        );
        return;
    }
    map.insert(key, (value.to_vec(), revision));
}
