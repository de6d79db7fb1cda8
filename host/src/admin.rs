//! The admin HTTP API: modules with their counters, activity logs and dead
//! letters, as JSON.
//!
//! - `GET /api/health`: 200 when connected to the broker and subscribed
//!   (ready to receive), 503 otherwise.
//! - `GET /api/modules`: every module, its stream and counters.
//! - `GET /api/modules/{id}/logs?level=error`: entries at or above a level
//!   (default `info`), oldest first.
//! - `GET /api/modules/{id}/dead-letters`: refused input with its reasons.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::activity::{CounterSnapshot, Level, LogEntry};
use crate::dead_letter::DeadLetter;
use crate::module::Module;
use crate::source::SourceStatus;

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
}

/// The admin API's routes over the running modules.
pub fn router(modules: Modules, source: Arc<SourceStatus>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/modules", get(list_modules))
        .route("/api/modules/{id}/logs", get(module_logs))
        .route("/api/modules/{id}/dead-letters", get(dead_letters))
        .with_state(AppState { modules, source })
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
                counters: m.counters.snapshot(),
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
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let module = find(&modules, &id)?;
    module
        .dead_letters
        .list()
        .map(Json)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn find<'a>(modules: &'a Modules, id: &str) -> Result<&'a Arc<Module>, ApiError> {
    modules
        .iter()
        .find(|m| m.config.id == id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no module `{id}`")))
}
