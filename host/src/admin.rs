//! The admin HTTP API: modules with their counters, activity logs and dead
//! letters, as JSON.
//!
//! - `GET /api/health`: 200 when connected to the broker and subscribed
//!   (ready to receive), 503 otherwise.
//! - `GET /api/modules`: every module, its stream and counters.
//! - `GET /api/modules/{id}/logs?level=error`: entries at or above a level
//!   (default `info`), oldest first.
//! - `GET /api/modules/{id}/dead-letters?after=ID&limit=N`: refused data
//!   with its reasons, oldest first (default: the first 1000).
//! - `GET /api/modules/{id}/dead-letters/{n}`: one dead letter.
//! - `POST /api/modules/{id}/dead-letters/replay?ids=1,2`: sends dead
//!   letters (all if `ids` is absent) through the module again; each is
//!   removed once its data is spooled again or kept as a new dead letter.
//!   Answers 202 with the number queued.
//! - `DELETE /api/modules/{id}/dead-letters?ids=1,2`: deletes dead letters
//!   (all if `ids` is absent); answers with the number deleted.
//! - `POST /api/component/reload`: loads the components whose files
//!   changed, checks them and swaps them in; answers what happened to each
//!   (200, or 422 if one failed and its modules kept the running one).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::WeakSender;

use crate::ack::Settlement;
use crate::activity::{CounterSnapshot, Level, LogEntry};
use crate::components::{ComponentInfo, Components, ReloadOutcome};
use crate::dead_letter::DeadLetter;
use crate::inflight::{Charge, InFlight};
use crate::module::Module;
use crate::source::{Message, Replay, ReplayRecord, SourceStatus, Topic};

/// Dead letters `GET .../dead-letters` answers at most per page.
const DEAD_LETTER_PAGE: usize = 1000;

/// A module as `GET /api/modules` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModuleSummary {
    /// Module ID.
    pub id: String,
    /// Description.
    pub description: String,
    /// Target stream.
    pub stream_name: String,
    /// Its region.
    pub region: String,
    /// Subscribed event types.
    pub subscribe_events: Vec<String>,
    /// Bulk data label.
    pub bulk_data_label: Option<String>,
    /// Counters since start.
    pub counters: CounterSnapshot,
    /// The component its guest runs.
    pub component: Option<ComponentInfo>,
}

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
}

/// The answer of `GET /api/health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// Connected to the MQTT broker.
    pub mqtt_connected: bool,
    /// Connected and subscribed to every MODE topic.
    pub ready: bool,
}

type Modules = Arc<[Arc<Module>]>;

#[derive(Clone)]
struct AppState {
    modules: Modules,
    source: Arc<SourceStatus>,
    inbox: WeakSender<Message>,
    components: Arc<Components>,
    inflight: Arc<InFlight>,
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
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct IdsQuery {
    ids: Option<String>,
}

impl IdsQuery {
    fn ids(&self) -> Result<Option<Vec<u64>>, ApiError> {
        let Some(text) = &self.ids else {
            return Ok(None);
        };
        text.split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| {
                part.trim().parse().map_err(|_| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("`{part}` is not a dead-letter ID"),
                    )
                })
            })
            .collect::<Result<Vec<u64>, _>>()
            .map(Some)
    }
}

/// The admin API's routes over the running modules; replays go into `inbox`
/// (held weakly, so it does not keep the router running at shutdown),
/// within the in-flight budget.
pub fn router(
    modules: Modules,
    source: Arc<SourceStatus>,
    inbox: WeakSender<Message>,
    components: Arc<Components>,
    inflight: Arc<InFlight>,
) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/modules", get(list_modules))
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
        .with_state(AppState {
            modules,
            source,
            inbox,
            components,
            inflight,
        })
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

async fn list_modules(
    State(AppState { modules, .. }): State<AppState>,
) -> Json<Vec<ModuleSummary>> {
    Json(
        modules
            .iter()
            .map(|m| ModuleSummary {
                id: m.config.id.clone(),
                description: m.config.description.clone(),
                stream_name: m.config.stream_name.clone(),
                region: m.config.region.clone(),
                subscribe_events: m.config.subscribe_events.clone(),
                bulk_data_label: m.config.bulk_data_label.clone(),
                counters: m.counters(),
                component: m
                    .component
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            })
            .collect(),
    )
}

async fn module_logs(
    State(AppState { modules, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    let module = find(&modules, &id)?;
    let level = match query.level.as_deref() {
        None => Level::Info,
        Some(text) => text
            .parse()
            .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?,
    };
    Ok(Json(module.log.entries(level)))
}

async fn dead_letters(
    State(AppState { modules, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let module = find(&modules, &id)?;
    let limit = page.limit.unwrap_or(DEAD_LETTER_PAGE);
    module
        .dead_letters
        .list(page.after.unwrap_or(0), limit)
        .map(Json)
        .map_err(internal)
}

async fn dead_letter(
    State(AppState { modules, .. }): State<AppState>,
    Path((id, n)): Path<(String, u64)>,
) -> Result<Json<DeadLetter>, ApiError> {
    let module = find(&modules, &id)?;
    match module.dead_letters.get(n).map_err(internal)? {
        Some(letter) => Ok(Json(letter)),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("module `{id}` has no dead letter {n}"),
        )),
    }
}

async fn purge_dead_letters(
    State(AppState { modules, .. }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<IdsQuery>,
) -> Result<Json<DeadLetterCount>, ApiError> {
    let module = find(&modules, &id)?;
    let ids = query.ids()?;
    let count = module
        .dead_letters
        .purge(ids.as_deref())
        .map_err(internal)?;
    module
        .log
        .write(Level::Info, format!("{count} dead letters purged"));
    Ok(Json(DeadLetterCount { count }))
}

async fn replay_dead_letters(
    State(AppState {
        modules,
        inbox,
        inflight,
        ..
    }): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<IdsQuery>,
) -> Result<(StatusCode, Json<DeadLetterCount>), ApiError> {
    let index = position(&modules, &id)?;
    let module = modules[index].clone();
    let letters = match query.ids()? {
        None => module.dead_letters.list(0, usize::MAX).map_err(internal)?,
        Some(ids) => {
            let mut letters = Vec::with_capacity(ids.len());
            for n in ids {
                match module.dead_letters.get(n).map_err(internal)? {
                    Some(letter) => letters.push(letter),
                    None => {
                        return Err(ApiError(
                            StatusCode::NOT_FOUND,
                            format!("module `{id}` has no dead letter {n}"),
                        ));
                    }
                }
            }
            letters
        }
    };
    let shutting_down = || ApiError(StatusCode::SERVICE_UNAVAILABLE, "ksm is stopping".into());
    let inbox = inbox.upgrade().ok_or_else(shutting_down)?;
    let count = letters.len();
    for letter in letters {
        let charge = inflight.charge(letter.data.len()).await;
        let message = replay_message(&module, index, letter, charge);
        inbox.send(message).await.map_err(|_| shutting_down())?;
    }
    module.log.write(
        Level::Info,
        format!("{count} dead letters queued for replay"),
    );
    Ok((StatusCode::ACCEPTED, Json(DeadLetterCount { count })))
}

/// A dead letter as a message for one module; once what it produces is
/// safe, the dead letter is deleted.
fn replay_message(
    module: &Arc<Module>,
    index: usize,
    letter: DeadLetter,
    charge: Charge,
) -> Message {
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
    let on_settled: crate::ack::OnSettled = Box::new(move || {
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
            module: index,
            record,
        }),
        charge,
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

fn find<'a>(modules: &'a Modules, id: &str) -> Result<&'a Arc<Module>, ApiError> {
    Ok(&modules[position(modules, id)?])
}

/// The index of module `id`, in configuration order.
fn position(modules: &Modules, id: &str) -> Result<usize, ApiError> {
    modules
        .iter()
        .position(|m| m.config.id == id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no module `{id}`")))
}
