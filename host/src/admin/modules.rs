//! The module endpoints: list and show modules, add, change and delete
//! them while ksm runs ([`crate::manager`] does the work), and the running
//! configuration.
//!
//! - `POST /api/modules` with a module's settings as JSON (the fields of a
//!   `[[modules]]` table; those left out take their defaults): 201 and the
//!   module; 409 if the ID is taken.
//! - `PUT /api/modules/{id}` with all its settings: 200 and the module.
//! - `DELETE /api/modules/{id}`: 200 with `state: "deleted"` once it is
//!   gone, or 202 with `state: "draining"` while its spool is still sent
//!   (it is listed meanwhile with status `draining`); 409 for the last one.
//!   With `?spool=dead-letters` (also for a module already draining, whose
//!   stream may never take its records): it goes at once, what is left in
//!   its spool kept as its dead letters (`kept_as_dead_letters`), for a
//!   module of the same ID to replay.
//! - A change with problems is refused with 422 and
//!   `{"problems": [{"field": "stream_name", "message": "..."}]}`: the
//!   problems `ksm validate` reports for the configuration with the change
//!   made, named by their field within the module, and unknown fields.
//!   Nothing is changed then.
//! - `GET /api/config`: the running configuration as JSON, the MQTT
//!   password not shown.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::serve::Peer;
use super::{ApiError, AppState, find};
use crate::activity::CounterSnapshot;
use crate::config::{ModuleConfig, Problem, field_path};
use crate::manager::{ChangeError, SpoolOnDelete};
use crate::module::{ComponentInfo, Module};

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
    /// `running`, or `draining` once deleted, until its spool is sent.
    pub status: String,
    /// Counters since start.
    pub counters: CounterSnapshot,
    /// Most bytes its spool holds.
    pub spool_max_bytes: u64,
    /// Failed PutRecords requests and records since start, every error code.
    pub kinesis_errors: u64,
    /// The component its guest runs.
    pub component: Option<ComponentInfo>,
    /// All its settings.
    pub config: ModuleConfig,
}

impl ModuleSummary {
    /// What the API shows of `module` now.
    pub(crate) fn of(module: &Module) -> Self {
        let config = module.config();
        ModuleSummary {
            id: module.id.clone(),
            description: config.description.clone(),
            stream_name: config.stream_name.clone(),
            region: config.region.clone(),
            subscribe_events: config.subscribe_events.clone(),
            bulk_data_label: config.bulk_data_label.clone(),
            status: if module.is_draining() {
                "draining"
            } else {
                "running"
            }
            .to_owned(),
            counters: module.counters(),
            spool_max_bytes: module.spool.max_bytes(),
            kinesis_errors: module.metrics.kinesis_errors(),
            component: module.component(),
            config: (*config).clone(),
        }
    }
}

/// The body of a 422 answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problems {
    /// Every problem, with its field.
    pub problems: Vec<Problem>,
}

pub(super) async fn list(State(state): State<AppState>) -> Json<Vec<ModuleSummary>> {
    let modules = state.manager.modules().all();
    Json(modules.iter().map(|m| ModuleSummary::of(m)).collect())
}

pub(super) async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModuleSummary>, ApiError> {
    let module = find(&state.manager, &id)?;
    Ok(Json(ModuleSummary::of(&module)))
}

pub(super) async fn create(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    let (settings, unknown) = match settings(&body) {
        Ok(parsed) => parsed,
        Err(refusal) => return refusal,
    };
    match state.manager.create(settings, unknown, &peer.who()).await {
        Ok(module) => (StatusCode::CREATED, Json(ModuleSummary::of(&module))).into_response(),
        Err(error) => refused(error),
    }
}

pub(super) async fn update(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (mut settings, unknown) = match settings(&body) {
        Ok(parsed) => parsed,
        Err(refusal) => return refusal,
    };
    if settings.id.is_empty() {
        settings.id = id.clone();
    }
    match state
        .manager
        .update(&id, settings, unknown, &peer.who())
        .await
    {
        Ok(module) => Json(ModuleSummary::of(&module)).into_response(),
        Err(error) => refused(error),
    }
}

/// `DELETE /api/modules/{id}?spool=send|dead-letters`.
#[derive(Debug, Deserialize)]
pub(super) struct DeleteQuery {
    spool: Option<String>,
}

pub(super) async fn delete(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    Query(query): Query<DeleteQuery>,
) -> Response {
    let spool = match query.spool.as_deref() {
        None | Some("send") => SpoolOnDelete::Send,
        Some("dead-letters") => SpoolOnDelete::DeadLetters,
        Some(other) => {
            return ApiError(
                StatusCode::BAD_REQUEST,
                format!("spool={other}: use spool=send (the default) or spool=dead-letters"),
            )
            .into_response();
        }
    };
    match state.manager.delete(&id, spool, &peer.who()).await {
        Ok(deletion) => {
            let status = if deletion.state == "deleted" {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(deletion)).into_response()
        }
        Err(error) => refused(error),
    }
}

pub(super) async fn running_config(State(state): State<AppState>) -> Json<serde_json::Value> {
    let config = state.manager.config().await;
    let mut shown = serde_json::to_value(&config).unwrap_or_default();
    if let Some(password) = shown.pointer_mut("/mqtt/password")
        && !password.is_null()
    {
        *password = serde_json::Value::String("(set, not shown)".into());
    }
    Json(shown)
}

/// A module's settings from a request body, and its unknown fields as
/// problems (reported with the others, as for the file).
#[allow(clippy::result_large_err)]
fn settings(body: &[u8]) -> Result<(ModuleConfig, Vec<Problem>), Response> {
    let mut unknown = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let settings: ModuleConfig = serde_ignored::deserialize(&mut deserializer, |path| {
        unknown.push(Problem {
            field: field_path(&path),
            message: "unknown key".to_owned(),
        })
    })
    .map_err(|error| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not a module's settings as JSON: {error}"),
        )
        .into_response()
    })?;
    Ok((settings, unknown))
}

fn refused(error: ChangeError) -> Response {
    let status = match &error {
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Conflict(_) => StatusCode::CONFLICT,
        ChangeError::Invalid(problems) => {
            let problems = Problems {
                problems: problems.clone(),
            };
            return (StatusCode::UNPROCESSABLE_ENTITY, Json(problems)).into_response();
        }
        ChangeError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        ChangeError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError(status, error.to_string()).into_response()
}
