//! Following the consoles of running instances as they write, for `revboot logs -f` and the
//! dashboard.
//!
//! 1. [`Deployer::follow`] takes a filter (a service, optionally one revision and one
//!    client) and looks at the instances running now; a counter the deployer moves whenever
//!    an instance's console comes to exist tells it to look again, so instances booted later
//!    are followed too.
//! 2. Each instance followed gets a task of its own that sends [`FollowEvent::Started`], its
//!    kept tail, then its output as it comes ([`crate::console::Follow`]), and
//!    [`FollowEvent::Ended`] with its final state. The tasks feed one bounded channel.
//! 3. A reader that does not keep up makes its tasks wait on that channel, never the
//!    instance: the console's live channel keeps a bounded number of chunks per reader, and
//!    what a reader missed comes as [`FollowEvent::Skipped`] with the number of chunks.
//! 4. Dropping the [`ConsoleFollower`] ends its tasks; so does the end of each instance.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use revboot_store::Revision;
use tokio::sync::{mpsc, watch};

use super::Deployer;
use crate::console::{Follow, FollowStep};
use crate::summon::{InstanceKey, InstanceState};

/// Events buffered between the instances' tasks and a slow reader.
const EVENTS: usize = 64;
/// How long an instance whose output ended may take to reach its final state.
const END_WAIT: Duration = Duration::from_secs(15);

/// Which instances to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowFilter {
    /// The service.
    pub service: String,
    /// Only instances of this revision.
    pub revision: Option<Revision>,
    /// Only the instance of this client (per-client services: the one whose client network
    /// holds it).
    pub client: Option<IpAddr>,
}

impl FollowFilter {
    fn matches(&self, key: &InstanceKey) -> bool {
        key.service == self.service
            && self.revision.is_none_or(|r| r == key.revision)
            && self
                .client
                .is_none_or(|c| key.client.is_some_and(|net| net.contains(c)))
    }
}

/// What a [`ConsoleFollower`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FollowEvent {
    /// An instance is followed from now on; its kept tail comes next as output.
    Started {
        /// The instance's id ([`crate::InstanceInfo::id`]).
        id: String,
        /// Which instance.
        key: InstanceKey,
        /// Its service address (the IPv4 one when it has both).
        address: IpAddr,
        /// Bytes it wrote before the kept tail, which are gone.
        dropped: u64,
    },
    /// Output of an instance.
    Output {
        /// The instance's id.
        id: String,
        /// The bytes, as written.
        bytes: Arc<[u8]>,
    },
    /// The reader fell behind: this many chunks of the instance's output were skipped.
    Skipped {
        /// The instance's id.
        id: String,
        /// Chunks not seen.
        chunks: u64,
    },
    /// The instance's output ended.
    Ended {
        /// The instance's id.
        id: String,
        /// Its state then (final, unless it took longer than a few seconds to get there).
        state: InstanceState,
    },
}

/// The live consoles of the instances a [`FollowFilter`] names ([`Deployer::follow`]).
#[derive(Debug)]
pub struct ConsoleFollower {
    deployer: Weak<Deployer>,
    filter: FollowFilter,
    consoles: watch::Receiver<u64>,
    sender: mpsc::Sender<FollowEvent>,
    events: mpsc::Receiver<FollowEvent>,
    followed: HashSet<String>,
    looked: bool,
}

impl Deployer {
    /// Follows the consoles of the instances `filter` names, running now or started later.
    pub fn follow(&self, filter: FollowFilter) -> ConsoleFollower {
        let (sender, events) = mpsc::channel(EVENTS);
        ConsoleFollower {
            deployer: self.me.clone(),
            filter,
            consoles: self.consoles.subscribe(),
            sender,
            events,
            followed: HashSet::new(),
            looked: false,
        }
    }
}

impl ConsoleFollower {
    /// The next event; `None` once the deployer has gone.
    pub async fn next(&mut self) -> Option<FollowEvent> {
        if !self.looked {
            self.looked = true;
            self.consoles.borrow_and_update();
            self.look();
        }
        loop {
            tokio::select! {
                event = self.events.recv() => return event,
                changed = self.consoles.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.look();
                }
            }
        }
    }

    /// Starts following the instances that match and are not followed yet.
    fn look(&mut self) {
        let Some(deployer) = self.deployer.upgrade() else {
            return;
        };
        let entries = deployer.entries();
        // Forget instances that left the table: the set stays as large as the table.
        self.followed
            .retain(|id| entries.iter().any(|entry| &entry.id == id));
        for entry in entries {
            if !self.filter.matches(&entry.key)
                || self.followed.contains(&entry.id)
                || entry.state.borrow().is_final()
            {
                continue;
            }
            let Some(console) = entry.console.get() else {
                continue;
            };
            self.followed.insert(entry.id.clone());
            tokio::spawn(forward(
                (
                    entry.id.clone(),
                    entry.key.clone(),
                    entry
                        .addresses
                        .iter()
                        .next()
                        .unwrap_or(entry.addresses.primary()),
                ),
                console.follow(),
                entry.state.subscribe(),
                self.sender.clone(),
            ));
        }
    }
}

/// Sends one instance's events until its output ends or the reader goes.
async fn forward(
    (id, key, address): (String, InstanceKey, IpAddr),
    mut follow: Follow,
    mut state: watch::Receiver<InstanceState>,
    sender: mpsc::Sender<FollowEvent>,
) {
    let mut first = vec![FollowEvent::Started {
        id: id.clone(),
        key,
        address,
        dropped: follow.dropped,
    }];
    if !follow.tail.is_empty() {
        first.push(FollowEvent::Output {
            id: id.clone(),
            bytes: Arc::from(std::mem::take(&mut follow.tail)),
        });
    }
    for event in first {
        if sender.send(event).await.is_err() {
            return;
        }
    }
    loop {
        let step = tokio::select! {
            step = follow.next() => step,
            () = sender.closed() => return,
        };
        let event = match step {
            Some(FollowStep::Output(bytes)) => FollowEvent::Output {
                id: id.clone(),
                bytes,
            },
            Some(FollowStep::Skipped(chunks)) => FollowEvent::Skipped {
                id: id.clone(),
                chunks,
            },
            None => break,
        };
        if sender.send(event).await.is_err() {
            return;
        }
    }
    let ended = tokio::time::timeout(END_WAIT, state.wait_for(InstanceState::is_final))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|state| state.clone());
    let state = ended.unwrap_or_else(|| state.borrow().clone());
    let _ = sender.send(FollowEvent::Ended { id, state }).await;
}
