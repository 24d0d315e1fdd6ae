//! Live feeds: a running instance's console and a running build's log, as they are written,
//! over server-sent events (`text/event-stream`).
//!
//! 1. A feed is a stream of JSON events, one per SSE `data:` line: [`ConsoleEvent`] for the
//!    consoles of a service's instances (those running now and those that start while the
//!    feed is open), [`BuildLogEvent`] for one build. Comment lines keep the connection
//!    alive every 15 s; a client ignores them.
//! 2. Nothing a reader does slows an instance or a build down: an instance's output reaches
//!    a reader through a bounded channel, and a reader that falls behind gets a
//!    [`ConsoleEvent::Skipped`] note with the number of chunks it lost; a build log is read
//!    from an offset into the log, so a slow reader only reads later.
//! 3. At most [`MAX_FEEDS`] feeds are open at once; one more is a 503. A feed ends when its
//!    build ends, when the daemon shuts down, or when the reader goes.
//! 4. The API's feeds (`…/follow`) take the token as every API read does (or none with
//!    `[http] public_reads`); the dashboard serves the same feeds to its signed-in readers.
//!
//! Output is text: an instance's bytes are decoded as UTF-8, a character split between two
//! writes is kept until its end comes, and bytes that are not UTF-8 become U+FFFD.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::action::ActionError;
use crate::api::ApiError;

/// Feeds open at once, API and dashboard together.
pub const MAX_FEEDS: usize = 64;

/// How often an idle feed sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// An event of a console feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConsoleEvent {
    /// An instance is followed from now on; the output it kept comes next.
    Started {
        /// The instance's id, which the events of this instance carry.
        instance: String,
        /// Its revision.
        revision: String,
        /// The client of a per-client instance.
        client: Option<String>,
        /// Its service address.
        address: String,
        /// Bytes it wrote before what it kept, which are gone.
        dropped: u64,
    },
    /// Output of an instance.
    Output {
        /// The instance.
        instance: String,
        /// The text.
        text: String,
    },
    /// This reader fell behind: chunks of the instance's output it will not see.
    Skipped {
        /// The instance.
        instance: String,
        /// How many chunks.
        chunks: u64,
    },
    /// The instance's output ended.
    Ended {
        /// The instance.
        instance: String,
        /// Its state then, as `revboot ps` words it.
        state: String,
    },
}

/// An event of a build-log feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildLogEvent {
    /// More of the log.
    Output {
        /// The text.
        text: String,
    },
    /// The build ended; the log is complete.
    Ended {
        /// `succeeded`, `failed`, `interrupted` or `superseded`.
        state: String,
        /// The deployment commit recording it, if any.
        revision: Option<String>,
    },
}

/// Which consoles a feed follows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Only instances of this label's revision.
    pub label: Option<String>,
    /// Only the instance of this client.
    pub client: Option<IpAddr>,
}

/// The daemon's live feeds, as the API and the dashboard serve them.
pub trait Feeds: Send + Sync + 'static {
    /// The consoles of `service`'s instances that `query` names.
    fn console(
        &self,
        service: &str,
        query: &ConsoleQuery,
    ) -> Result<BoxStream<'static, ConsoleEvent>, ActionError>;

    /// The log of build `id`, from its start; [`ActionError::NotFound`] once it has ended
    /// (its log is then recorded in the deployment).
    fn build_log(
        &self,
        id: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, BuildLogEvent>, ActionError>>;
}

/// What feed routes share: the feeds, the bound on open feeds, the API's access rule.
#[derive(Clone)]
pub struct FeedState {
    feeds: Arc<dyn Feeds>,
    open: Arc<Semaphore>,
    token: Arc<str>,
    public_reads: bool,
}

impl std::fmt::Debug for FeedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedState")
            .field("open", &(MAX_FEEDS - self.open.available_permits()))
            .finish_non_exhaustive()
    }
}

impl FeedState {
    /// Feeds served under the API's access rule (`token`, `public_reads`).
    pub fn new(feeds: Arc<dyn Feeds>, token: &str, public_reads: bool) -> FeedState {
        FeedState {
            feeds,
            open: Arc::new(Semaphore::new(MAX_FEEDS)),
            token: Arc::from(token),
            public_reads,
        }
    }

    /// A console feed as an SSE response (the caller has checked access).
    pub fn console_response(&self, service: &str, query: &ConsoleQuery) -> Response {
        match self.open_slot() {
            Ok(permit) => match self.feeds.console(service, query) {
                Ok(events) => sse(events, permit),
                Err(error) => ApiError::from(error).into_response(),
            },
            Err(error) => error.into_response(),
        }
    }

    /// A build-log feed as an SSE response (the caller has checked access).
    pub async fn build_log_response(&self, id: u64) -> Response {
        match self.open_slot() {
            Ok(permit) => match self.feeds.build_log(id).await {
                Ok(events) => sse(events, permit),
                Err(error) => ApiError::from(error).into_response(),
            },
            Err(error) => error.into_response(),
        }
    }

    fn open_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.open.clone().try_acquire_owned().map_err(|_| {
            ApiError::from(ActionError::Unavailable(format!(
                "{MAX_FEEDS} live feeds are open already; try again later"
            )))
        })
    }
}

/// The API's feed routes, under the API's access rule.
pub fn router(state: FeedState) -> Router {
    Router::new()
        .route(
            "/api/v1/services/{service}/logs/console/follow",
            get(api_console),
        )
        .route("/api/v1/builds/{id}/log/follow", get(api_build_log))
        .with_state(state)
}

async fn api_console(
    State(state): State<FeedState>,
    headers: HeaderMap,
    Path(service): Path<String>,
    query: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = crate::api::admit(&headers, &state.token, state.public_reads, false) {
        return refused.into_response();
    }
    match query {
        Ok(Query(query)) => state.console_response(&service, &query),
        Err(rejection) => {
            ApiError::from(ActionError::Invalid(rejection.body_text())).into_response()
        }
    }
}

async fn api_build_log(
    State(state): State<FeedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(refused) = crate::api::admit(&headers, &state.token, state.public_reads, false) {
        return refused.into_response();
    }
    match id.parse::<u64>() {
        Ok(id) => state.build_log_response(id).await,
        Err(_) => ApiError::from(ActionError::Invalid(format!(
            "`{id}` is not a build number"
        )))
        .into_response(),
    }
}

/// Events as server-sent events, each one JSON `data:` line, with keep-alive comments; the
/// permit (a slot among [`MAX_FEEDS`]) is held until the stream ends or the reader goes.
fn sse<T: Serialize + Send + 'static>(
    events: BoxStream<'static, T>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let stream = events.map(move |event| {
        let _held = &permit;
        let data = serde_json::to_string(&event).expect("events are plain data");
        Ok::<Event, Infallible>(Event::default().data(data))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// Bytes to text across writes: a UTF-8 character split between two writes is held back
/// until its end comes; bytes that are not UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    held: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `bytes` after what was held back, holding back an unfinished character.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.held.extend_from_slice(bytes);
        let cut = match std::str::from_utf8(&self.held) {
            Ok(_) => self.held.len(),
            // An incomplete sequence at the very end: keep it for the next write.
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(_) => self.held.len(),
        };
        let rest = self.held.split_off(cut);
        let text = String::from_utf8_lossy(&self.held).into_owned();
        self.held = rest;
        text
    }

    /// What is held back, as text (at the end of the output).
    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.held)).into_owned()
    }
}

/// The console feed of a deployer follower: its events as [`ConsoleEvent`]s.
pub fn console_events(
    follower: revboot_deployer::ConsoleFollower,
) -> BoxStream<'static, ConsoleEvent> {
    let state = ConsoleState {
        follower,
        carries: HashMap::new(),
        pending: VecDeque::new(),
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.pending.pop_front() {
                return Some((event, state));
            }
            let event = state.follower.next().await?;
            state.turn(event);
        }
    })
    .boxed()
}

struct ConsoleState {
    follower: revboot_deployer::ConsoleFollower,
    /// One per instance followed, gone with its end.
    carries: HashMap<String, Utf8Carry>,
    pending: VecDeque<ConsoleEvent>,
}

impl ConsoleState {
    /// Queues what a deployer event says, as console events.
    fn turn(&mut self, event: revboot_deployer::FollowEvent) {
        use revboot_deployer::FollowEvent;
        match event {
            FollowEvent::Started {
                id,
                key,
                address,
                dropped,
            } => {
                self.carries.insert(id.clone(), Utf8Carry::default());
                self.pending.push_back(ConsoleEvent::Started {
                    instance: id,
                    revision: key.revision.to_hex(),
                    client: key.client.map(|c| c.to_string()),
                    address: address.to_string(),
                    dropped,
                });
            }
            FollowEvent::Output { id, bytes } => {
                let text = self.carries.entry(id.clone()).or_default().push(&bytes);
                if !text.is_empty() {
                    self.pending
                        .push_back(ConsoleEvent::Output { instance: id, text });
                }
            }
            FollowEvent::Skipped { id, chunks } => {
                self.pending.push_back(ConsoleEvent::Skipped {
                    instance: id,
                    chunks,
                });
            }
            FollowEvent::Ended { id, state } => {
                let rest = self.carries.remove(&id).map(|mut c| c.finish());
                if let Some(text) = rest.filter(|t| !t.is_empty()) {
                    self.pending.push_back(ConsoleEvent::Output {
                        instance: id.clone(),
                        text,
                    });
                }
                self.pending.push_back(ConsoleEvent::Ended {
                    instance: id,
                    state: state.to_string(),
                });
            }
            _ => {}
        }
    }
}

/// The build-log feed of a builder follower: its steps as [`BuildLogEvent`]s.
pub fn build_log_events(follow: revboot_builder::LogFollow) -> BoxStream<'static, BuildLogEvent> {
    use revboot_builder::LogStep;
    let state = (follow, Utf8Carry::default());
    futures::stream::unfold(state, |(mut follow, mut carry)| async move {
        loop {
            let event = match follow.next().await? {
                LogStep::Output(bytes) => {
                    let text = carry.push(&bytes);
                    if text.is_empty() {
                        continue;
                    }
                    BuildLogEvent::Output { text }
                }
                LogStep::Ended { state, revision } => BuildLogEvent::Ended {
                    state: serde_json::to_value(state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| format!("{state:?}").to_lowercase()),
                    revision: revision.map(|r| r.to_hex()),
                },
                _ => continue,
            };
            return Some((event, (follow, carry)));
        }
    })
    .boxed()
}

/// The daemon's feeds, over its deployer and builder; every feed ends when `closing`
/// turns true (the daemon shuts down), so that no open feed holds the HTTP server up.
#[derive(Debug)]
pub struct DaemonFeeds {
    /// The deployment repository, to resolve labels.
    pub store: revboot_store::Store,
    /// The deployer, whose consoles are followed.
    pub deployer: Arc<revboot_deployer::Deployer>,
    /// The builder, whose logs are followed.
    pub builder: revboot_builder::Builder,
    /// True once the daemon shuts down.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl DaemonFeeds {
    fn until_closing<T: Send + 'static>(
        &self,
        events: BoxStream<'static, T>,
    ) -> BoxStream<'static, T> {
        let mut closing = self.closing.clone();
        events
            .take_until(async move {
                let _ = closing.wait_for(|closing| *closing).await;
            })
            .boxed()
    }
}

impl Feeds for DaemonFeeds {
    fn console(
        &self,
        service: &str,
        query: &ConsoleQuery,
    ) -> Result<BoxStream<'static, ConsoleEvent>, ActionError> {
        let revision = match &query.label {
            Some(label) => Some(
                self.store
                    .resolve(service, Some(label))
                    .map_err(crate::engine::resolve_error)?,
            ),
            None => {
                let services = self.store.services().map_err(crate::engine::read_error)?;
                if !services.iter().any(|known| known == service) {
                    return Err(ActionError::NotFound(format!("No service `{service}`")));
                }
                None
            }
        };
        let follower = self.deployer.follow(revboot_deployer::FollowFilter {
            service: service.to_owned(),
            revision,
            client: query.client,
        });
        Ok(self.until_closing(console_events(follower)))
    }

    fn build_log(
        &self,
        id: u64,
    ) -> BoxFuture<'_, Result<BoxStream<'static, BuildLogEvent>, ActionError>> {
        Box::pin(async move {
            let follow = self.builder.follow_log(id).await.ok_or_else(|| {
                ActionError::NotFound(format!(
                    "Build #{id} is not queued or running: a finished build's log is in its deployment"
                ))
            })?;
            Ok(self.until_closing(build_log_events(follow)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_writes_comes_out_whole() {
        let mut carry = Utf8Carry::default();
        let snowman = "☃".as_bytes();
        assert_eq!(carry.push(b"a"), "a");
        assert_eq!(carry.push(&snowman[..1]), "");
        assert_eq!(carry.push(&snowman[1..]), "☃");
        assert_eq!(carry.push(b"\xffb"), "\u{fffd}b");
        assert_eq!(carry.push(&snowman[..2]), "");
        assert_eq!(carry.finish(), "\u{fffd}");
    }

    #[test]
    fn events_are_tagged_json() {
        let event = ConsoleEvent::Output {
            instance: "i1".into(),
            text: "<b>".into(),
        };
        assert_eq!(
            serde_json::to_string(&event).expect("json"),
            r#"{"kind":"output","instance":"i1","text":"<b>"}"#
        );
    }
}
