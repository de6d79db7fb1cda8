//! The admin HTTP API: modules with their counters, settings, activity logs
//! and dead letters, as JSON; and the console, a web page over it.
//!
//! - `GET /`: the console ([`console`]); it asks for the token and keeps it
//!   in the browser's session.
//! - `GET /api/health`: 200 when connected to the broker and subscribed
//!   (ready to receive), 503 otherwise.
//! - `GET /api/modules`: every module: its settings, status (`running`, or
//!   `draining` once deleted), stream, counters and component.
//! - `GET /api/modules/{id}`: one module, the same way.
//! - `POST /api/modules`, `PUT /api/modules/{id}`, `DELETE
//!   /api/modules/{id}`: add, change and delete modules while ksm runs,
//!   kept in the configuration file; see [`modules`] and
//!   [`crate::manager`].
//! - `GET /api/config`: the running configuration, without secrets.
//! - `GET /api/modules/{id}/logs?level=error&limit=N`: entries at or above
//!   a level (default `info`), oldest first; with `limit`, the newest N.
//! - `GET /api/modules/{id}/dead-letters?after=ID&limit=N`: one page of
//!   refused data with its reasons, oldest first, IDs above `after`
//!   (default 0). A page holds at most `limit` letters (default 100; a
//!   larger `limit` than 1000 is clamped to 1000, not refused) and at most
//!   4 MiB of data ([`PAGE_DATA_BYTES`]), and always at least one letter.
//!   Every letter says its `data_bytes`; a letter whose data does not fit
//!   the page is listed without `data_base64`, with `data_omitted: true`,
//!   to be fetched alone. Page on with `after` = the last ID of a page,
//!   until a page is empty.
//! - `GET /api/modules/{id}/dead-letters/{n}`: one dead letter, data
//!   included, whatever its size: streamed, 48 KiB of data at a time.
//! - `POST /api/modules/{id}/dead-letters/replay?ids=1,2`: sends dead
//!   letters (all of them, as they are when it is asked, if `ids` is
//!   absent) through the module again, in the background, a few at a time,
//!   each within the in-flight budget; each is removed once its data is
//!   spooled again or kept as a new dead letter (with a new ID). Answers
//!   202 with the number it will replay, 404 if an ID is not kept, 409 while
//!   a replay of the module still runs.
//! - `DELETE /api/modules/{id}/dead-letters?ids=1,2`: deletes dead letters
//!   (all if `ids` is absent); answers with the number deleted.
//! - `GET /metrics`: every module's counters, spool, PutRecords requests,
//!   failures by error code and latencies, guest call times and traps,
//!   reloads, and the MQTT connection, in the Prometheus text format.
//! - `POST /api/component/reload`: loads the components whose files
//!   changed, checks them and swaps them in; answers what happened to each
//!   (200, or 422 if one failed and its modules kept the running one).
//!
//! With a token set (`admin.token_file` or `KSM_ADMIN_TOKEN`), every
//! endpoint but `/api/health` needs `Authorization: Bearer TOKEN`; see
//! [`auth`].
//!
//! Listing pages are built two at a time, and each holds its place until
//! its answer is sent; a shown letter is streamed. So what clients ask
//! costs the host a bounded amount of memory.

pub mod auth;
mod console;
pub mod modules;
mod serve;

pub use crate::manager::Deletion;
pub use modules::{ModuleSummary, Problems};
pub(crate) use serve::serve;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::WeakSender;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

use crate::activity::{Level, LogEntry};
use crate::components::{Components, ReloadOutcome};
use crate::manager::ModuleManager;
use crate::metrics::Metrics;
use crate::module::Module;
use crate::pipeline::ack::Settlement;
use crate::pipeline::inflight::{Charge, InFlight};
use crate::pipeline::route::Inbound;
use crate::pipeline::source::{Message, Replay, ReplayRecord, SourceStatus, Topic};
use crate::store::StoreError;
use crate::store::dead_letter::{DeadLetter, PAGE_DATA_BYTES, Pending};

/// Dead letters a listing page holds when the request gives no `limit`.
const DEFAULT_PAGE_LETTERS: u64 = 100;
/// Most dead letters a listing page holds; a larger `limit` is clamped.
const MAX_PAGE_LETTERS: u64 = 1000;
/// Listing pages built (and held until sent) at a time; a page takes up to
/// about 6 MiB.
const READS_AT_ONCE: usize = 2;
/// Most dead letters a replay reads from the store at a time.
const REPLAY_BATCH_LETTERS: usize = 64;
/// Most bytes of data a replay holds in memory beside what is in flight
/// (data kept in files is read one letter at a time, once charged).
const REPLAY_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// An error answer: a status and a plain-text reason.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    level: Option<String>,
    limit: Option<usize>,
}

/// The answer of `GET /api/health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// Connected to the MQTT broker.
    pub mqtt_connected: bool,
    /// Connected and subscribed to every MODE topic.
    pub ready: bool,
}

#[derive(Clone)]
struct AppState {
    manager: Arc<ModuleManager>,
    source: Arc<SourceStatus>,
    inbox: WeakSender<Inbound>,
    components: Arc<Components>,
    inflight: Arc<InFlight>,
    /// Permits to build (and hold until sent) a listing page.
    reads: Arc<Semaphore>,
    /// What `/metrics` shows.
    metrics: Metrics,
}

/// The answer of replay and purge calls.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterCount {
    /// How many dead letters were queued for replay, or deleted.
    pub count: usize,
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    after: Option<u64>,
    limit: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct IdsQuery {
    ids: Option<String>,
}

impl IdsQuery {
    /// The IDs, each once, in the order given; `None` for all.
    fn ids(&self) -> Result<Option<Vec<u64>>, ApiError> {
        let Some(text) = &self.ids else {
            return Ok(None);
        };
        let mut ids = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let id: u64 = part.parse().map_err(|_| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("`{part}` is not a dead-letter ID"),
                )
            })?;
            if seen.insert(id) {
                ids.push(id);
            }
        }
        Ok(Some(ids))
    }
}

/// Which dead letters a replay sends.
enum Selection {
    /// Every one kept with an ID up to this one (those that come back
    /// during the replay have higher IDs and are not sent again).
    Through(u64),
    /// These.
    Ids(Vec<u64>),
}

/// The admin API's routes over the modules `manager` runs, behind `token`;
/// replays go into `inbox` (held weakly, so it does not keep the router
/// running at shutdown), within the in-flight budget.
pub(crate) fn router(
    manager: Arc<ModuleManager>,
    source: Arc<SourceStatus>,
    inbox: WeakSender<Inbound>,
    components: Arc<Components>,
    inflight: Arc<InFlight>,
    token: auth::Token,
) -> Router {
    Router::new()
        .route("/", get(console::page))
        .route("/console.js", get(console::script))
        .route("/console.css", get(console::style))
        .route("/api/health", get(health))
        .route("/api/modules", get(modules::list).post(modules::create))
        .route(
            "/api/modules/{id}",
            get(modules::show)
                .put(modules::update)
                .delete(modules::delete),
        )
        .route("/api/config", get(modules::running_config))
        .route("/api/modules/{id}/logs", get(module_logs))
        .route(
            "/api/modules/{id}/dead-letters",
            get(dead_letters).delete(purge_dead_letters),
        )
        .route(
            "/api/modules/{id}/dead-letters/replay",
            post(replay_dead_letters),
        )
        .route("/api/modules/{id}/dead-letters/{n}", get(dead_letter))
        .route("/api/component/reload", post(reload_components))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            metrics: Metrics::new(manager.modules().clone(), source.clone()),
            manager,
            source,
            inbox,
            components,
            inflight,
            reads: Arc::new(Semaphore::new(READS_AT_ONCE)),
        })
        .layer(axum::middleware::from_fn_with_state(token, auth::guard))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let health = Health {
        mqtt_connected: state.source.is_connected(),
        ready: state.source.is_ready(),
    };
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health))
}

async fn module_logs(
    State(AppState { manager, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    let module = find(&manager, &id)?;
    let level = match query.level.as_deref() {
        None => Level::Info,
        Some(text) => text
            .parse()
            .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?,
    };
    let mut entries = module.log.entries(level);
    if let Some(limit) = query.limit {
        entries.drain(..entries.len().saturating_sub(limit));
    }
    Ok(Json(entries))
}

async fn dead_letters(
    State(AppState { manager, reads, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Response, ApiError> {
    let module = find(&manager, &id)?;
    let limit = page
        .limit
        .unwrap_or(DEFAULT_PAGE_LETTERS)
        .clamp(1, MAX_PAGE_LETTERS);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let after = page.after.unwrap_or(0);
    let permit = read_permit(&reads).await;
    let body = blocking(move || {
        let page = module.dead_letters.page(after, limit, PAGE_DATA_BYTES)?;
        Ok(serde_json::to_vec(&page).expect("dead letters serialize"))
    })
    .await?;
    Ok(json_answer(body, permit))
}

async fn dead_letter(
    State(AppState { manager, .. }): State<AppState>,
    Path((id, n)): Path<(String, u64)>,
) -> Result<Response, ApiError> {
    let module = find(&manager, &id)?;
    let Some(shown) = blocking(move || module.dead_letters.show(n)).await? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("module `{id}` has no dead letter {n}"),
        ));
    };
    // Streamed a piece at a time, each read off the async threads.
    let pieces = futures_util::stream::unfold(Some(shown), |shown| async move {
        let mut shown = shown?;
        let read = tokio::task::spawn_blocking(move || {
            let piece = shown.next_piece();
            (piece, shown)
        })
        .await;
        match read {
            Ok((Ok(Some(piece)), shown)) => Some((Ok(piece), Some(shown))),
            Ok((Ok(None), _)) => None,
            Ok((Err(error), _)) => Some((Err(std::io::Error::other(error.to_string())), None)),
            Err(error) => Some((Err(std::io::Error::other(error.to_string())), None)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(pieces),
    )
        .into_response())
}

async fn purge_dead_letters(
    State(AppState { manager, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<IdsQuery>,
) -> Result<Json<DeadLetterCount>, ApiError> {
    let module = find(&manager, &id)?;
    let ids = query.ids()?;
    let purging = module.clone();
    let count = blocking(move || purging.dead_letters.purge(ids.as_deref())).await?;
    module
        .log
        .write(Level::Info, format!("{count} dead letters purged"));
    Ok(Json(DeadLetterCount { count }))
}

async fn replay_dead_letters(
    State(AppState {
        manager,
        inbox,
        inflight,
        ..
    }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<IdsQuery>,
) -> Result<(StatusCode, Json<DeadLetterCount>), ApiError> {
    let module = find(&manager, &id)?;
    if module.is_draining() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("module `{id}` is being deleted: it takes no more messages, replays neither"),
        ));
    }
    let Ok(running) = module.replay.clone().try_lock_owned() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("a replay of module `{id}`'s dead letters is still running"),
        ));
    };
    let selection = match query.ids()? {
        None => Selection::Through(module.dead_letters.last_id()),
        Some(ids) => {
            for n in &ids {
                if !module.dead_letters.contains(*n).map_err(internal)? {
                    return Err(ApiError(
                        StatusCode::NOT_FOUND,
                        format!("module `{id}` has no dead letter {n}"),
                    ));
                }
            }
            Selection::Ids(ids)
        }
    };
    let counting = module.clone();
    let count = match &selection {
        Selection::Through(last) => {
            let last = *last;
            blocking(move || counting.dead_letters.count_through(last)).await?
        }
        Selection::Ids(ids) => ids.len(),
    };
    if inbox.upgrade().is_none() {
        return Err(stopping());
    }
    module.log.write(
        Level::Info,
        format!("{count} dead letters queued for replay"),
    );
    let job = ReplayJob {
        module,
        inbox,
        inflight,
    };
    tokio::spawn(job.run(selection, count, running));
    Ok((StatusCode::ACCEPTED, Json(DeadLetterCount { count })))
}

/// Where a replay sends its letters.
struct ReplayJob {
    module: Arc<Module>,
    inbox: WeakSender<Inbound>,
    inflight: Arc<InFlight>,
}

impl ReplayJob {
    /// Replays the selected dead letters, then logs how it ended;
    /// `_running` keeps other replays of the module out meanwhile.
    async fn run(self, selection: Selection, count: usize, _running: OwnedMutexGuard<()>) {
        let mut sent = 0;
        let result = match selection {
            Selection::Through(last) => self.replay_through(last, &mut sent).await,
            Selection::Ids(ids) => self.replay_ids(ids, &mut sent).await,
        };
        let (level, message) = match result {
            Ok(()) => (
                Level::Info,
                format!(
                    "replay done: {sent} of {count} dead letters sent through the module again"
                ),
            ),
            Err(ApiError(_, error)) => (
                Level::Error,
                format!("replay stopped after {sent} of {count} dead letters: {error}"),
            ),
        };
        self.module.log.write(level, message);
    }

    /// Every letter kept with an ID up to `last`, read a batch at a time.
    async fn replay_through(&self, last: u64, sent: &mut usize) -> Result<(), ApiError> {
        let mut after = 0;
        loop {
            let module = self.module.clone();
            let batch = blocking(move || {
                module
                    .dead_letters
                    .pending(after, last, REPLAY_BATCH_LETTERS, REPLAY_BATCH_BYTES)
            })
            .await?;
            let Some(next) = batch.last().map(Pending::id) else {
                return Ok(());
            };
            after = next;
            self.send_all(batch, sent).await?;
        }
    }

    /// The letters `ids`, one at a time (one deleted meanwhile is skipped).
    async fn replay_ids(&self, ids: Vec<u64>, sent: &mut usize) -> Result<(), ApiError> {
        for n in ids {
            let module = self.module.clone();
            let one = blocking(move || {
                module
                    .dead_letters
                    .pending(n.saturating_sub(1), n, 1, usize::MAX)
            })
            .await?;
            self.send_all(one, sent).await?;
        }
        Ok(())
    }

    /// Sends pending letters one at a time: each takes its charge of the
    /// in-flight budget before its data is read.
    async fn send_all(&self, batch: Vec<Pending>, sent: &mut usize) -> Result<(), ApiError> {
        for pending in batch {
            let bytes = usize::try_from(pending.data_bytes()).unwrap_or(usize::MAX);
            let charge = self.inflight.charge(bytes).await;
            let module = self.module.clone();
            // `None`: deleted since it was listed.
            let Some(letter) = blocking(move || module.dead_letters.load(pending)).await? else {
                continue;
            };
            let message = replay_message(&self.module, letter, charge);
            let inbox = self.inbox.upgrade().ok_or_else(stopping)?;
            inbox
                .send(Inbound::Message(message))
                .await
                .map_err(|_| stopping())?;
            *sent += 1;
        }
        Ok(())
    }
}

/// A dead letter as a message for one module; once what it produces is
/// safe, the dead letter is deleted.
fn replay_message(module: &Arc<Module>, letter: DeadLetter, charge: Charge) -> Message {
    let payload = match (&letter.partition_key, letter.record_index) {
        // One refused bulk record goes through the guest as a one-record payload.
        (None, Some(_)) => Bytes::from(crate::bulk::encode([&letter.data])),
        _ => letter.data.clone(),
    };
    let record = letter
        .partition_key
        .clone()
        .map(|partition_key| ReplayRecord {
            partition_key,
            explicit_hash_key: letter.explicit_hash_key.clone(),
        });
    let owner = module.clone();
    let id = letter.id;
    let on_settled: crate::pipeline::ack::OnSettled = Box::new(move || {
        if let Err(error) = owner.dead_letters.purge(Some(&[id])) {
            owner.log.write(
                Level::Error,
                format!("dead letter {id} was replayed but could not be deleted: {error}"),
            );
        }
    });
    Message {
        kind: Topic::parse(&letter.topic),
        topic: letter.topic.into(),
        payload,
        received_at: time::OffsetDateTime::now_utc(),
        settlement: Settlement::new(Some(on_settled)),
        replay: Some(Replay {
            module: module.clone(),
            record,
        }),
        charge,
        // Dead letters keep no MQTT properties.
        properties: Default::default(),
    }
}

async fn reload_components(
    State(AppState { components, .. }): State<AppState>,
) -> (StatusCode, Json<Vec<ReloadOutcome>>) {
    let outcomes = tokio::task::spawn_blocking(move || components.reload("admin API request"))
        .await
        .unwrap_or_default();
    let status = if outcomes.iter().any(|o| o.outcome == "failed") {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(outcomes))
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

fn stopping() -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "ksm is stopping".into())
}

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(internal)?
        .map_err(internal)
}

/// Waits for a permit to build a listing page.
async fn read_permit(reads: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    reads
        .clone()
        .acquire_owned()
        .await
        .expect("the read permits are never closed")
}

/// A JSON answer whose bytes keep `permit` until they are sent (or the
/// client is gone).
fn json_answer(body: Vec<u8>, permit: OwnedSemaphorePermit) -> Response {
    /// The body, with the permit it holds.
    struct Held {
        body: Vec<u8>,
        _permit: OwnedSemaphorePermit,
    }
    impl AsRef<[u8]> for Held {
        fn as_ref(&self) -> &[u8] {
            &self.body
        }
    }
    let body = Bytes::from_owner(Held {
        body,
        _permit: permit,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// The module `id`.
fn find(manager: &ModuleManager, id: &str) -> Result<Arc<Module>, ApiError> {
    manager
        .modules()
        .get(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no module `{id}`")))
}
