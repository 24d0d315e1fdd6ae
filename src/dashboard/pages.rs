//! The dashboard's pages: each reads through the engine (the same actions as the API), then
//! renders one template. Lists are paginated: [`HISTORY_PAGE`] deployments, [`INSTANCE_PAGE`]
//! instances per page.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::session::SignedIn;
use super::{Dashboard, figures};
use crate::action::{
    Action, ActionError, BuildView, ConsoleView, DeploymentView, DiffView, InstanceView, Reply,
    ShowView,
};
use crate::output::{bytes, duration, time};

/// Deployments per history page.
pub const HISTORY_PAGE: usize = 50;
/// Instances per page.
pub const INSTANCE_PAGE: usize = 100;
/// Console records shown on a revision's page.
const CONSOLE_RECORDS: usize = 10;

/// What every page's frame needs.
#[derive(Debug)]
pub struct PageCtx {
    pub(super) title: String,
    pub(super) signed_in: bool,
    pub(super) csrf: String,
    pub(super) note: Option<String>,
}

impl PageCtx {
    pub(super) fn new(title: impl Into<String>, reader: Option<&SignedIn>) -> PageCtx {
        PageCtx {
            title: title.into(),
            signed_in: reader.is_some(),
            csrf: reader.map(|r| r.csrf.clone()).unwrap_or_default(),
            note: None,
        }
    }
}

/// Renders a template as a page.
pub fn render<T: Template>(page: &T, status: StatusCode) -> Response {
    match page.render() {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, "dashboard page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The page failed to render",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
pub struct Login {
    pub error: Option<String>,
    pub next: String,
}

#[derive(Template)]
#[template(path = "message.html")]
struct Message<'a> {
    page: PageCtx,
    heading: &'a str,
    message: &'a str,
    back: &'a str,
}

/// An action's error as a page with its status.
pub fn failure(error: &ActionError, reader: Option<&SignedIn>, back: &str) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    failure_with(
        status,
        "That did not work",
        &error.to_string(),
        reader,
        back,
    )
}

/// A message page with a status.
pub fn failure_with(
    status: StatusCode,
    heading: &str,
    message: &str,
    reader: Option<&SignedIn>,
    back: &str,
) -> Response {
    let page = Message {
        page: PageCtx::new(heading, reader),
        heading,
        message,
        back,
    };
    render(&page, status)
}

fn short(hex: &str) -> String {
    hex.chars().take(7).collect()
}

struct ServiceRow {
    name: String,
    live: Option<String>,
    live_short: String,
    deployments: usize,
    dns_name: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview {
    page: PageCtx,
    services: Vec<ServiceRow>,
    instances: usize,
    boots: u64,
    boots_chart: String,
    boot_time_chart: String,
    dns_chart: String,
    builds_chart: String,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct OverviewQuery {
    deleted: Option<String>,
}

pub(super) async fn overview(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<OverviewQuery>,
) -> Response {
    let reader = match dashboard.reader(&headers, "/") {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let services = match dashboard.execute(Action::ListServices).await {
        Ok(Reply::Services(services)) => services,
        Ok(_) => Vec::new(),
        Err(error) => return failure(&error, reader.as_ref(), "/"),
    };
    let instances = match dashboard.execute(Action::ListInstances).await {
        Ok(Reply::Instances(instances)) => instances.len(),
        _ => 0,
    };
    let figures = match dashboard.figures.clone() {
        Some(source) => tokio::task::spawn_blocking(move || source.figures())
            .await
            .unwrap_or_default(),
        None => figures::Figures::default(),
    };
    let named = |values: &[(&'static str, u64)]| -> Vec<(String, u64)> {
        values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    };
    // Always the whole window: intervals before the daemon started count as none.
    let mut rates = vec![0; figures::SAMPLES.saturating_sub(figures.boots_per_minute.len())];
    rates.extend(&figures.boots_per_minute);
    let per_minute: Vec<(String, u64)> = rates
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ago = (rates.len() - i - 1) as u64 * figures::SAMPLE_EVERY.as_secs();
            (format!("{ago} s ago"), *v)
        })
        .collect();
    let mut page = PageCtx::new("Services", reader.as_ref());
    page.note = query.deleted.map(|service| format!("Deleted {service}."));
    let page = Overview {
        page,
        services: services
            .into_iter()
            .map(|s| ServiceRow {
                live_short: s.live.as_deref().map(short).unwrap_or_default(),
                name: s.name,
                live: s.live,
                deployments: s.deployments,
                dns_name: s.dns_name,
            })
            .collect(),
        instances,
        boots: figures.boots,
        boots_chart: figures::bars("boots per minute", &per_minute),
        boot_time_chart: figures::bars("boot time", &figures.boot_times),
        dns_chart: figures::bars("DNS answers by rcode", &named(&figures.dns)),
        builds_chart: figures::bars("builds", &named(&figures.builds)),
    };
    render(&page, StatusCode::OK)
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct PageQuery {
    page: Option<usize>,
    moved: Option<String>,
    stopped: Option<String>,
    renamed: Option<String>,
}

struct HistoryRow {
    revision: String,
    short: String,
    source: String,
    subject: String,
    status: String,
    image: String,
    time: String,
    live: bool,
}

struct BuildRow {
    id: u64,
    service: String,
    state: String,
    source_short: String,
    revision: Option<String>,
    revision_short: String,
    queued: String,
    message: Option<String>,
}

fn build_row(b: BuildView) -> BuildRow {
    BuildRow {
        id: b.id,
        source_short: short(&b.source_commit),
        revision_short: b.revision.as_deref().map(short).unwrap_or_default(),
        queued: time((b.queued_at_ms / 1000) as i64),
        service: b.service,
        state: b.state,
        revision: b.revision,
        message: b.message,
    }
}

#[derive(Template)]
#[template(path = "service.html")]
struct ServicePage {
    page: PageCtx,
    service: String,
    dns_name: String,
    live: Option<DeploymentView>,
    builds: Vec<BuildRow>,
    rows: Vec<HistoryRow>,
    can_write: bool,
    page_number: usize,
    pages: usize,
    total: usize,
}

/// Page `number` (from 1) of `items`, `size` per page: the slice, the page, the page count.
fn paginate<T>(items: Vec<T>, number: usize, size: usize) -> (Vec<T>, usize, usize) {
    let pages = items.len().div_ceil(size).max(1);
    let number = number.clamp(1, pages);
    let slice = items
        .into_iter()
        .skip((number - 1) * size)
        .take(size)
        .collect();
    (slice, number, pages)
}

pub(super) async fn service(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Query(query): Query<PageQuery>,
) -> Response {
    let here = format!("/services/{}", super::encode(&service));
    let reader = match dashboard.reader(&headers, &here) {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let history = match dashboard
        .execute(Action::History {
            service: service.clone(),
        })
        .await
    {
        Ok(Reply::History(history)) => history,
        Ok(_) => Vec::new(),
        Err(error) => return failure(&error, reader.as_ref(), "/"),
    };
    let builds = match dashboard
        .execute(Action::ListBuilds {
            service: Some(service.clone()),
        })
        .await
    {
        Ok(Reply::Builds(builds)) => builds
            .into_iter()
            .filter(|b| matches!(b.state.as_str(), "queued" | "running"))
            .map(build_row)
            .collect(),
        _ => Vec::new(),
    };
    let live = history.iter().find(|d| d.live).cloned();
    let dns_name = format!("{service}.{}", dashboard.engine.zone());
    let total = history.len();
    let (slice, page_number, pages) = paginate(history, query.page.unwrap_or(1), HISTORY_PAGE);
    let mut page = PageCtx::new(service.clone(), reader.as_ref());
    page.note = match (query.moved, query.renamed) {
        (Some(to), _) => Some(format!("Live is now {}.", short(&to))),
        (None, Some(from)) => Some(format!(
            "Renamed from {from}: its checkouts push to /git/{service}.git now."
        )),
        (None, None) => None,
    };
    let page = ServicePage {
        page,
        dns_name,
        live,
        builds,
        rows: slice
            .into_iter()
            .map(|d| HistoryRow {
                source: short(&d.source_commit),
                image: d.image_size.map(bytes).unwrap_or_else(|| "–".into()),
                time: time(d.time),
                revision: d.revision,
                short: d.short,
                subject: d.subject,
                status: d.status,
                live: d.live,
            })
            .collect(),
        can_write: reader.is_some(),
        page_number,
        pages,
        total,
        service,
    };
    render(&page, StatusCode::OK)
}

#[derive(Debug, Deserialize)]
pub(super) struct ConfirmQuery {
    to: String,
}

#[derive(Template)]
#[template(path = "confirm.html")]
struct Confirm {
    page: PageCtx,
    service: String,
    dns_name: String,
    to: DeploymentView,
    to_time: String,
    from: Option<String>,
}

pub(super) async fn confirm(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(service): Path<String>,
    Query(query): Query<ConfirmQuery>,
) -> Response {
    let here = format!("/services/{}", super::encode(&service));
    let reader = match dashboard.confirmer(&headers, &here, &here) {
        Ok(reader) => reader,
        Err(response) => return *response,
    };
    let show = match dashboard
        .execute(Action::Show {
            service: service.clone(),
            label: query.to,
        })
        .await
    {
        Ok(Reply::Show(show)) => show,
        Ok(_) => {
            return failure(
                &ActionError::Internal("No deployment".into()),
                Some(&reader),
                &here,
            );
        }
        Err(error) => return failure(&error, Some(&reader), &here),
    };
    let from = match dashboard.execute(Action::ListServices).await {
        Ok(Reply::Services(services)) => services
            .into_iter()
            .find(|s| s.name == service)
            .and_then(|s| s.live)
            .map(|l| short(&l)),
        _ => None,
    };
    let page = Confirm {
        page: PageCtx::new(
            format!("Make {} live", show.deployment.short),
            Some(&reader),
        ),
        dns_name: format!("{service}.{}", dashboard.engine.zone()),
        to_time: time(show.deployment.time),
        to: show.deployment,
        from,
        service,
    };
    render(&page, StatusCode::OK)
}

struct ConsoleRow {
    started: String,
    client: Option<String>,
    outcome: String,
    console: String,
}

#[derive(Template)]
#[template(path = "revision.html")]
struct RevisionPage {
    page: PageCtx,
    service: String,
    deployment: DeploymentView,
    image: String,
    time: String,
    names: Vec<String>,
    can_write: bool,
    instances: Vec<InstanceView>,
    port: u16,
    /// A per-client service: booting asks for the client.
    per_client: bool,
    manifest: String,
    diff: Option<DiffView>,
    diff_from: String,
    diff_image: String,
    build_log: String,
    consoles: Vec<ConsoleRow>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RevisionQuery {
    booted: Option<String>,
}

pub(super) async fn revision(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path((service, label)): Path<(String, String)>,
    Query(query): Query<RevisionQuery>,
) -> Response {
    let here = format!(
        "/services/{}/deployments/{}",
        super::encode(&service),
        super::encode(&label)
    );
    let reader = match dashboard.reader(&headers, &here) {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let back = format!("/services/{}", super::encode(&service));
    let show: Box<ShowView> = match dashboard
        .execute(Action::Show {
            service: service.clone(),
            label: label.clone(),
        })
        .await
    {
        Ok(Reply::Show(show)) => show,
        Ok(_) => {
            return failure(
                &ActionError::Internal("No deployment".into()),
                reader.as_ref(),
                &back,
            );
        }
        Err(error) => return failure(&error, reader.as_ref(), &back),
    };
    let revision = show.deployment.revision.clone();
    let previous = match dashboard
        .execute(Action::History {
            service: service.clone(),
        })
        .await
    {
        Ok(Reply::History(history)) => history
            .iter()
            .position(|d| d.revision == revision)
            .and_then(|at| history.get(at + 1))
            .map(|d| d.revision.clone()),
        _ => None,
    };
    let diff = match previous {
        Some(previous) => match dashboard
            .execute(Action::Diff {
                service: service.clone(),
                a: previous,
                b: revision.clone(),
            })
            .await
        {
            Ok(Reply::Diff(diff)) => Some(diff),
            _ => None,
        },
        None => None,
    };
    let build_log = match dashboard
        .execute(Action::BuildLog {
            service: service.clone(),
            label: Some(revision.clone()),
        })
        .await
    {
        Ok(Reply::BuildLog(log)) => log.log,
        Ok(_) => String::new(),
        Err(error) => format!("(no build log: {error})"),
    };
    let consoles = match dashboard
        .execute(Action::ConsoleLogs {
            service: service.clone(),
            label: Some(revision.clone()),
            limit: Some(CONSOLE_RECORDS),
        })
        .await
    {
        Ok(Reply::Console(records)) => records.into_iter().map(console_row).collect(),
        _ => Vec::new(),
    };
    let instances = match dashboard.execute(Action::ListInstances).await {
        Ok(Reply::Instances(instances)) => instances
            .into_iter()
            .filter(|i| i.service == service && i.revision == revision)
            .collect(),
        _ => Vec::new(),
    };
    let zone = dashboard.engine.zone().to_owned();
    let mut names = vec![show.deployment.dns_name.clone()];
    for label in &show.labels {
        let name = format!("{label}.{service}.{zone}");
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if show.deployment.live {
        names.push(format!("{service}.{zone}"));
    }
    let manifest = show.manifest.clone().unwrap_or_default();
    let (port, per_client) = manifest_run(&manifest);
    let mut page = PageCtx::new(
        format!("{service} {}", show.deployment.short),
        reader.as_ref(),
    );
    if query.booted.is_some() {
        page.note = Some("Booted: its console follows below.".to_owned());
    }
    let page = RevisionPage {
        page,
        image: show
            .deployment
            .image_size
            .map(bytes)
            .unwrap_or_else(|| "none".into()),
        time: time(show.deployment.time),
        names,
        can_write: reader.is_some(),
        instances,
        port,
        per_client,
        manifest,
        diff_from: diff.as_ref().map(|d| short(&d.a)).unwrap_or_default(),
        diff_image: diff
            .as_ref()
            .map(|d| {
                let size = |s: Option<u64>| s.map(bytes).unwrap_or_else(|| "none".into());
                let changed = if d.image_changed {
                    "changed"
                } else {
                    "unchanged"
                };
                format!(
                    "{changed}, {} → {}",
                    size(d.image_size.0),
                    size(d.image_size.1)
                )
            })
            .unwrap_or_default(),
        diff,
        build_log,
        consoles,
        deployment: show.deployment,
        service,
    };
    render(&page, StatusCode::OK)
}

/// The port a manifest's `[run]` names (8080 when it names none or cannot be read).
/// The manifest's `[run] port` (8080 when unset) and `per_client`, from one parse.
fn manifest_run(manifest: &str) -> (u16, bool) {
    let table = toml::from_str::<toml::Table>(manifest).ok();
    let run = table.as_ref().and_then(|t| t.get("run"));
    let port = run
        .and_then(|r| r.get("port")?.as_integer())
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(8080);
    let per_client = run
        .and_then(|r| r.get("per_client")?.as_bool())
        .unwrap_or(false);
    (port, per_client)
}

fn console_row(record: ConsoleView) -> ConsoleRow {
    ConsoleRow {
        started: format!(
            "{} · ran {}",
            time((record.started_at_ms / 1000) as i64),
            duration(record.lifetime_ms)
        ),
        client: record.client,
        outcome: record.outcome,
        console: record.console,
    }
}

struct InstanceRow {
    service: String,
    revision: String,
    revision_short: String,
    client: Option<String>,
    replica: u16,
    address: String,
    state: String,
    uptime: String,
    connections: u64,
}

#[derive(Template)]
#[template(path = "instances.html")]
struct InstancesPage {
    page: PageCtx,
    rows: Vec<InstanceRow>,
    can_write: bool,
    page_number: usize,
    pages: usize,
    total: usize,
}

pub(super) async fn instances(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let reader = match dashboard.reader(&headers, "/instances") {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let mut all = match dashboard.execute(Action::ListInstances).await {
        Ok(Reply::Instances(instances)) => instances,
        Ok(_) => Vec::new(),
        Err(error) => return failure(&error, reader.as_ref(), "/"),
    };
    all.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));
    let total = all.len();
    let (slice, page_number, pages) = paginate(all, query.page.unwrap_or(1), INSTANCE_PAGE);
    let mut page = PageCtx::new("Instances", reader.as_ref());
    if query.stopped.is_some() {
        page.note = Some("Stopped.".to_owned());
    }
    let page = InstancesPage {
        page,
        rows: slice
            .into_iter()
            .map(|i| InstanceRow {
                revision_short: match i.replica {
                    0 => short(&i.revision),
                    replica => format!("{} #{replica}", short(&i.revision)),
                },
                replica: i.replica,
                uptime: duration(i.uptime_ms),
                service: i.service,
                revision: i.revision,
                client: i.client,
                // Every family's address (an instance may have an IPv4 and an IPv6 one).
                address: if i.addresses.is_empty() {
                    i.address
                } else {
                    i.addresses.join(", ")
                },
                state: i.state,
                connections: i.connections,
            })
            .collect(),
        can_write: reader.is_some(),
        page_number,
        pages,
        total,
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "builds.html")]
struct BuildsPage {
    page: PageCtx,
    rows: Vec<BuildRow>,
}

pub(super) async fn builds(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let reader = match dashboard.reader(&headers, "/builds") {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let rows = match dashboard
        .execute(Action::ListBuilds { service: None })
        .await
    {
        Ok(Reply::Builds(builds)) => builds.into_iter().map(build_row).collect(),
        Ok(_) => Vec::new(),
        Err(error) => return failure(&error, reader.as_ref(), "/"),
    };
    let page = BuildsPage {
        page: PageCtx::new("Builds", reader.as_ref()),
        rows,
    };
    render(&page, StatusCode::OK)
}

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    page: PageCtx,
    id: u64,
    service: String,
    source_commit: String,
    state: String,
    revision: Option<String>,
    revision_short: String,
    live: bool,
}

pub(super) async fn build(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let reader = match dashboard.reader(&headers, &format!("/builds/{id}")) {
        Ok(reader) => reader,
        Err(redirect) => return redirect.into_response(),
    };
    let found = match dashboard
        .execute(Action::ListBuilds { service: None })
        .await
    {
        Ok(Reply::Builds(builds)) => builds.into_iter().find(|b| b.id == id),
        Ok(_) => None,
        Err(error) => return failure(&error, reader.as_ref(), "/builds"),
    };
    let Some(b) = found else {
        let error = ActionError::NotFound(format!("No build #{id} is known to this daemon"));
        return failure(&error, reader.as_ref(), "/builds");
    };
    let page = BuildPage {
        page: PageCtx::new(format!("Build #{id}"), reader.as_ref()),
        id,
        live: matches!(b.state.as_str(), "queued" | "running"),
        revision_short: b.revision.as_deref().map(short).unwrap_or_default(),
        service: b.service,
        source_commit: b.source_commit,
        state: b.state,
        revision: b.revision,
    };
    render(&page, StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_clamped_and_cover_everything() {
        let (slice, number, pages) = paginate((0..120).collect(), 3, 50);
        assert_eq!((slice.len(), number, pages), (20, 3, 3));
        let (slice, number, _) = paginate((0..120).collect(), 99, 50);
        assert_eq!((slice[0], number), (100, 3));
        let (slice, number, pages) = paginate(Vec::<u8>::new(), 0, 50);
        assert_eq!((slice.len(), number, pages), (0, 1, 1));
    }

    #[test]
    fn user_strings_are_escaped() {
        let page = failure_with(
            StatusCode::BAD_REQUEST,
            "x",
            "<script>alert(1)</script>",
            None,
            "/",
        );
        assert_eq!(page.status(), StatusCode::BAD_REQUEST);
        let html = Message {
            page: PageCtx::new("<t>", None),
            heading: "h",
            message: "<script>alert(1)</script> & \"q\"",
            back: "/",
        }
        .render()
        .expect("renders");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62; &#38; &#34;q&#34;"),
            "{html}"
        );
        assert!(!html.contains("<t>"), "{html}");
    }
}
