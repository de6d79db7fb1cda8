//! Starting, changing and removing modules, at start and while ksm runs.
//!
//! A change through the admin API is checked as `ksm validate` checks the
//! file (the whole configuration with the change made), its guest is
//! prepared and its Kinesis client built, and it is written back to the
//! configuration file ([`crate::config::file`]) before it is applied; so a
//! change the API accepts is running and kept, and one it refuses changes
//! nothing. Changes are applied one at a time:
//!
//! - **Added**: the module's sink starts, then the router and the committer
//!   take it between two messages; the next message goes to it too.
//! - **Changed**: its new guest is switched in between two messages (as a
//!   component swap is). If its destination changed (stream, region, role,
//!   external ID, aggregation, record size), its sink is stopped and a new
//!   one started over the same spool: what waits there goes to the new
//!   destination, as it would after a restart (records in flight at the
//!   switch may land in both).
//! - **Deleted**: it takes no more messages; its sink sends what is in its
//!   spool, and then it goes, from the running set and from the file. Until
//!   then it is listed as draining and stays in the file, so a restart
//!   meanwhile brings it back rather than stranding its spool.
//!
//! Each change is written to the module's activity log, with who made it.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{self, UnboundedReceiver, WeakSender};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::activity::{Counters, Level};
use crate::components::Components;
use crate::config::file::{self, Edit};
use crate::config::{Config, KinesisConfig, ModuleConfig, Problem};
use crate::kinesis::StreamLimits;
use crate::module::{Module, ModuleSet};
use crate::pipeline::commit::CommitTarget;
use crate::pipeline::route::{Change, Inbound, Route};
use crate::pipeline::sink::kinesis::{self, KinesisSink};
use crate::pipeline::sink::stream::module_stream_limits;
use crate::store::spool::{SpoolReader, SpoolRecord, move_to_dead_letters};
use crate::store::{Store, StoreError};

/// Most memory one module's sink holds records in; the rest of its
/// backlog waits on disk and is read back, in order, as room frees.
const SINK_WINDOW_BYTES: usize = 8 * 1024 * 1024;

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No module has this ID.
    #[error("no module `{0}`")]
    NotFound(String),
    /// The change cannot be made now (the ID is taken, the module is
    /// being deleted, it is the last module).
    #[error("{0}")]
    Conflict(String),
    /// The settings have problems, each with its field.
    #[error("{} problem(s) in the module's settings", .0.len())]
    Invalid(Vec<Problem>),
    /// The store or the configuration file failed.
    #[error("{0}")]
    Failed(String),
    /// ksm is stopping.
    #[error("ksm is stopping")]
    Stopping,
}

impl From<StoreError> for ChangeError {
    fn from(error: StoreError) -> Self {
        ChangeError::Failed(error.to_string())
    }
}

/// What `DELETE /api/modules/{id}` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deletion {
    /// The module.
    pub id: String,
    /// `deleted` (gone) or `draining` (its spool is still being sent).
    pub state: String,
    /// Records in its spool when it was deleted.
    pub spool_records: u64,
    /// Of those, how many were kept as its dead letters (`?spool=dead-letters`).
    #[serde(default)]
    pub kept_as_dead_letters: u64,
}

/// What a deletion does with the records left in the module's spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpoolOnDelete {
    /// Sends them, then the module goes.
    #[default]
    Send,
    /// Keeps them as the module's dead letters, and the module goes now.
    DeadLetters,
}

/// A module's running sink.
struct SinkHandle {
    module: Arc<Module>,
    stop: watch::Sender<bool>,
    ended: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

/// A sink that has been handed over for shutdown.
pub struct StoppingSink {
    /// Stops it, leaving what it has not sent in the spool.
    pub stop: watch::Sender<bool>,
    /// Ends when it has stopped.
    pub task: JoinHandle<()>,
}

/// Starts, changes and removes modules.
pub struct ModuleManager {
    modules: Arc<ModuleSet>,
    store: Store,
    spool_max_bytes: u64,
    kinesis: KinesisConfig,
    components: Arc<Components>,
    inbox: WeakSender<Inbound>,
    /// The running configuration; held through each change, so that
    /// changes happen one at a time.
    config: tokio::sync::Mutex<Config>,
    sinks: Mutex<Vec<SinkHandle>>,
}

impl ModuleManager {
    /// A manager of `modules` (already open), running `config`, whose
    /// changes go to the router through `inbox`.
    pub fn new(
        config: Config,
        modules: Arc<ModuleSet>,
        store: Store,
        components: Arc<Components>,
        inbox: WeakSender<Inbound>,
    ) -> Self {
        Self {
            modules,
            store,
            spool_max_bytes: config.storage.spool_max_mib * 1024 * 1024,
            kinesis: config.kinesis.clone(),
            components,
            inbox,
            config: tokio::sync::Mutex::new(config),
            sinks: Mutex::new(Vec::new()),
        }
    }

    /// The modules running now.
    pub fn modules(&self) -> &Arc<ModuleSet> {
        &self.modules
    }

    /// The running configuration.
    pub async fn config(&self) -> Config {
        self.config.lock().await.clone()
    }

    /// Builds a module's Kinesis client, checks its stream takes its
    /// records and starts its sink; the target is where the committer
    /// puts its records. `Err` says why the module cannot start.
    pub async fn launch(&self, module: &Arc<Module>) -> Result<CommitTarget, String> {
        let (client, stream) = self.destination(&module.config()).await?;
        let next_seq = module.spool.next_seq().map_err(|e| e.to_string())?;
        let (sink, input) = mpsc::unbounded_channel();
        self.spawn_sink(module, client, stream, input)
            .map_err(|e| e.to_string())?;
        Ok(CommitTarget::new(module.clone(), sink, next_seq))
    }

    /// Adds a module; `unknown` are the problems of keys its settings
    /// came with that no module has.
    pub async fn create(
        &self,
        settings: ModuleConfig,
        unknown: Vec<Problem>,
        who: &str,
    ) -> Result<Arc<Module>, ChangeError> {
        let mut running = self.config.lock().await;
        if let Some(module) = self.modules.get(&settings.id) {
            return Err(ChangeError::Conflict(if module.is_draining() {
                format!(
                    "module `{}` is being deleted and still sends its spool; add it again once it is gone",
                    settings.id
                )
            } else {
                format!(
                    "a module `{}` exists; change it with PUT /api/modules/{}",
                    settings.id, settings.id
                )
            }));
        }
        let mut candidate = running.clone();
        candidate.modules.push(settings.clone());
        check(&candidate, candidate.modules.len() - 1, unknown)?;
        let store = self.store.clone();
        let (opening, max_bytes) = (settings.clone(), self.spool_max_bytes);
        let module =
            blocking(move || Module::open(opening, &store, max_bytes).map(Arc::new)).await??;
        let path = candidate.component_of(&settings);
        let (guest, info) = {
            let (components, module, path, settings) = (
                self.components.clone(),
                module.clone(),
                path.clone(),
                settings.clone(),
            );
            blocking(move || components.prepare(&path, &module, &settings))
                .await?
                .map_err(|error| invalid("component", error.to_string()))?
        };
        let (client, stream) = self
            .destination(&settings)
            .await
            .map_err(|message| invalid("stream_name", message))?;
        persist(&running, Edit::Put(&settings)).await?;
        let next_seq = module.spool.next_seq()?;
        let (sink, input) = mpsc::unbounded_channel();
        self.spawn_sink(&module, client, stream, input)?;
        let (done, applied) = oneshot::channel();
        let change = Change::Add {
            route: Box::new(Route {
                module: module.clone(),
                guest,
            }),
            target: CommitTarget::new(module.clone(), sink, next_seq),
            done,
        };
        self.send(change, applied).await?;
        self.components.attach(&module, &path, info);
        self.modules.push(module.clone());
        module.log.write(
            Level::Info,
            format!(
                "created by {who}: forwarding to stream `{}` in {}",
                settings.stream_name, settings.region
            ),
        );
        *running = candidate;
        Ok(module)
    }

    /// Changes a module's settings (its ID stays); `unknown` as for
    /// [`ModuleManager::create`].
    pub async fn update(
        &self,
        id: &str,
        settings: ModuleConfig,
        unknown: Vec<Problem>,
        who: &str,
    ) -> Result<Arc<Module>, ChangeError> {
        let mut running = self.config.lock().await;
        let module = self.running(id)?;
        if settings.id != id {
            return Err(invalid(
                "id",
                format!(
                    "a module's ID cannot change (`{id}` to `{}`): add a new module instead",
                    settings.id
                ),
            ));
        }
        let index = running
            .modules
            .iter()
            .position(|m| m.id == id)
            .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
        let mut candidate = running.clone();
        candidate.modules[index] = settings.clone();
        check(&candidate, index, unknown)?;
        let old = module.config();
        let path = candidate.component_of(&settings);
        let new_guest =
            path != running.component_of(&old) || guest_settings_differ(&old, &settings);
        let guest = if new_guest {
            let (components, module, path, settings) = (
                self.components.clone(),
                module.clone(),
                path.clone(),
                settings.clone(),
            );
            Some(
                blocking(move || components.prepare(&path, &module, &settings))
                    .await?
                    .map_err(|error| invalid("component", error.to_string()))?,
            )
        } else {
            None
        };
        let destination = if destination_differs(&old, &settings) {
            Some(
                self.destination(&settings)
                    .await
                    .map_err(|message| invalid("stream_name", message))?,
            )
        } else {
            None
        };
        persist(&running, Edit::Put(&settings)).await?;
        if let Some((guest, info)) = guest {
            let (components, switching, applying) =
                (self.components.clone(), module.clone(), module.clone());
            let settings = settings.clone();
            let switched = blocking(move || {
                components.put_in_service(&switching, &path, guest, info, || {
                    applying.set_config(settings)
                })
            })
            .await?;
            if !switched {
                return Err(ChangeError::Stopping);
            }
        } else {
            module.set_config(settings.clone());
        }
        if let Some((client, stream)) = destination {
            self.resink(&module, client, stream).await?;
        }
        module.log.write(
            Level::Info,
            format!("changed by {who}: {}", differences(&old, &settings)),
        );
        *running = candidate;
        Ok(module)
    }

    /// Deletes a module: it takes no more messages at once, and goes once
    /// its spool is sent; or, with [`SpoolOnDelete::DeadLetters`] (also for
    /// a module already draining), at once, what is left in its spool kept
    /// as its dead letters.
    pub async fn delete(
        self: &Arc<Self>,
        id: &str,
        spool: SpoolOnDelete,
        who: &str,
    ) -> Result<Deletion, ChangeError> {
        let running = self.config.lock().await;
        let module = self
            .modules
            .get(id)
            .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
        let spool_records = if module.is_draining() {
            if spool == SpoolOnDelete::Send {
                return Err(ChangeError::Conflict(format!(
                    "module `{id}` is being deleted and still sends its spool; to stop waiting, \
                     delete it with ?spool=dead-letters"
                )));
            }
            module.spool.len().0
        } else {
            self.stop_routing(&module, &running).await?;
            let (records, bytes) = module.spool.len();
            module.log.write(
                Level::Info,
                format!(
                    "deleted by {who}: takes no more messages; it goes once the {records} records \
                     ({bytes} bytes) in its spool are sent"
                ),
            );
            records
        };
        let mut kept_as_dead_letters = 0;
        if spool == SpoolOnDelete::DeadLetters {
            kept_as_dead_letters = self.spool_to_dead_letters(&module, who).await?;
        }
        drop(running);
        let ended = self.ended(&module);
        let finishing = self.clone();
        let finished = tokio::spawn(async move { finishing.finish_deletion(module, ended).await });
        // A module with nothing left to send goes at once.
        let gone = tokio::time::timeout(std::time::Duration::from_secs(1), finished)
            .await
            .is_ok_and(|finished| finished.unwrap_or(false));
        Ok(Deletion {
            id: id.to_owned(),
            state: if gone { "deleted" } else { "draining" }.to_owned(),
            spool_records,
            kept_as_dead_letters,
        })
    }

    /// Takes a module out of the router and the committer, unless it is
    /// the last one.
    async fn stop_routing(
        &self,
        module: &Arc<Module>,
        running: &Config,
    ) -> Result<(), ChangeError> {
        let mut candidate = running.clone();
        candidate.modules.retain(|m| m.id != module.id);
        if let Some(problem) = candidate
            .validate()
            .into_iter()
            .find(|p| p.field == "modules")
        {
            return Err(ChangeError::Conflict(format!(
                "module `{}` is the only one: {}; add another module first, or stop ksm",
                module.id, problem.message
            )));
        }
        module.start_draining();
        let (done, applied) = oneshot::channel();
        self.send(
            Change::Remove {
                module: module.clone(),
                done,
            },
            applied,
        )
        .await?;
        self.components.detach(module);
        Ok(())
    }

    /// Stops a deleted module's sink and moves what is left in its spool
    /// to its dead letters; how many moved.
    async fn spool_to_dead_letters(
        &self,
        module: &Arc<Module>,
        who: &str,
    ) -> Result<u64, ChangeError> {
        self.stop_sink(module).await;
        let moving = module.clone();
        let reason = format!(
            "the module was deleted by {who} before Kinesis took this record; it is kept here: \
             add a module `{}` again (to a stream that takes it) and replay it",
            module.id
        );
        let moved = blocking(move || {
            move_to_dead_letters(
                &moving.spool,
                &moving.dead_letters,
                &reason,
                SINK_WINDOW_BYTES,
            )
        })
        .await??;
        Counters::add(&module.counters.dead_lettered, moved);
        module.log.write(
            Level::Warn,
            format!(
                "deleted by {who} without waiting for its spool: its {moved} records are kept as \
                 dead letters of `{}` (add the module again to replay them)",
                module.id
            ),
        );
        Ok(moved)
    }

    /// Waits until a deleted module's sink ends, then takes the module out
    /// of the running set and the file if its spool is empty (a sink
    /// stopped by shutdown leaves it for the next run). True once gone.
    async fn finish_deletion(
        &self,
        module: Arc<Module>,
        ended: Option<watch::Receiver<bool>>,
    ) -> bool {
        if let Some(mut ended) = ended {
            let _ = ended.wait_for(|ended| *ended).await;
        }
        let (records, _) = module.spool.len();
        if records > 0 {
            return false;
        }
        let mut running = self.config.lock().await;
        if !self
            .modules
            .get(&module.id)
            .is_some_and(|m| Arc::ptr_eq(&m, &module))
        {
            // Finished already (a deletion that kept its spool as dead letters).
            return true;
        }
        if let Err(error) = persist(&running, Edit::Remove(&module.id)).await {
            module.log.write(
                Level::Error,
                format!("its spool is sent, but it stays in the configuration file: {error}"),
            );
        }
        running.modules.retain(|m| m.id != module.id);
        self.modules.remove(&module);
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|sink| !Arc::ptr_eq(&sink.module, &module));
        module
            .log
            .write(Level::Info, "its spool is sent: the module is gone");
        true
    }

    /// The sinks, handed over for shutdown.
    pub fn take_sinks(&self) -> Vec<StoppingSink> {
        std::mem::take(&mut *self.sinks.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|sink| StoppingSink {
                stop: sink.stop,
                task: sink.task,
            })
            .collect()
    }

    /// A running module, not being deleted.
    fn running(&self, id: &str) -> Result<Arc<Module>, ChangeError> {
        let module = self
            .modules
            .get(id)
            .ok_or_else(|| ChangeError::NotFound(id.to_owned()))?;
        if module.is_draining() {
            return Err(ChangeError::Conflict(format!(
                "module `{id}` is being deleted and still sends its spool"
            )));
        }
        Ok(module)
    }

    /// A module's Kinesis client, and what its stream takes.
    async fn destination(
        &self,
        settings: &ModuleConfig,
    ) -> Result<(aws_sdk_kinesis::Client, StreamLimits), String> {
        let client = kinesis::client(settings, &self.kinesis).await;
        let stream = module_stream_limits(&client, settings).await?;
        Ok((client, stream))
    }

    fn spawn_sink(
        &self,
        module: &Arc<Module>,
        client: aws_sdk_kinesis::Client,
        stream: StreamLimits,
        input: UnboundedReceiver<Vec<SpoolRecord>>,
    ) -> Result<(), StoreError> {
        let reader = SpoolReader::new(&module.spool, SINK_WINDOW_BYTES)?;
        let sink = KinesisSink::new(
            Arc::new(client),
            module.clone(),
            self.kinesis.clone(),
            stream,
            reader,
            input,
        );
        let (stop, stop_rx) = watch::channel(false);
        let (ended_tx, ended) = watch::channel(false);
        let task = tokio::spawn(async move {
            sink.run(stop_rx).await;
            let _ = ended_tx.send(true);
        });
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(SinkHandle {
                module: module.clone(),
                stop,
                ended,
                task,
            });
        Ok(())
    }

    /// Stops a module's sink (what it has not sent stays in the spool) and
    /// waits until it has stopped.
    async fn stop_sink(&self, module: &Arc<Module>) {
        let sink = {
            let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
            let position = sinks
                .iter()
                .position(|sink| Arc::ptr_eq(&sink.module, module));
            position.map(|position| sinks.remove(position))
        };
        if let Some(sink) = sink {
            let _ = sink.stop.send(true);
            let _ = sink.task.await;
        }
    }

    /// Tells when a module's sink ends.
    fn ended(&self, module: &Arc<Module>) -> Option<watch::Receiver<bool>> {
        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        sinks
            .iter()
            .find(|sink| Arc::ptr_eq(&sink.module, module))
            .map(|sink| sink.ended.clone())
    }

    /// Replaces a module's sink: the old one stops (what it has not sent
    /// stays in the spool), the committer sends to the new one from the
    /// next message on, and the new one starts with what is in the spool.
    async fn resink(
        &self,
        module: &Arc<Module>,
        client: aws_sdk_kinesis::Client,
        stream: StreamLimits,
    ) -> Result<(), ChangeError> {
        self.stop_sink(module).await;
        let (sink, input) = mpsc::unbounded_channel();
        let (done, applied) = oneshot::channel();
        self.send(
            Change::Sink {
                module: module.clone(),
                sink,
                done,
            },
            applied,
        )
        .await?;
        self.spawn_sink(module, client, stream, input)?;
        Ok(())
    }

    /// Sends a change to the router and waits until the committer has it.
    async fn send(
        &self,
        change: Change,
        applied: oneshot::Receiver<()>,
    ) -> Result<(), ChangeError> {
        let inbox = self.inbox.upgrade().ok_or(ChangeError::Stopping)?;
        inbox
            .send(Inbound::Change(Box::new(change)))
            .await
            .map_err(|_| ChangeError::Stopping)?;
        applied.await.map_err(|_| ChangeError::Stopping)
    }
}

/// The problems of the module at `index` of `candidate`, as `ksm validate`
/// reports them for that configuration, after `problems` (unknown keys).
fn check(candidate: &Config, index: usize, mut problems: Vec<Problem>) -> Result<(), ChangeError> {
    problems.extend(candidate.module_problems(index));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ChangeError::Invalid(problems))
    }
}

fn invalid(field: &str, message: String) -> ChangeError {
    ChangeError::Invalid(vec![Problem {
        field: field.to_owned(),
        message,
    }])
}

/// Writes a change to the running configuration's file, if it has one.
async fn persist(running: &Config, edit: Edit<'_>) -> Result<(), ChangeError> {
    let Some(path) = running.source.clone() else {
        return Ok(());
    };
    let owned = match edit {
        Edit::Put(module) => Ok(module.clone()),
        Edit::Remove(id) => Err(id.to_owned()),
    };
    blocking(move || {
        let edit = match &owned {
            Ok(module) => Edit::Put(module),
            Err(id) => Edit::Remove(id),
        };
        file::apply(&path, edit)
    })
    .await?
    .map_err(|error| ChangeError::Failed(error.to_string()))
}

/// Whether the guest must be configured again.
fn guest_settings_differ(old: &ModuleConfig, new: &ModuleConfig) -> bool {
    old.subscribe_events != new.subscribe_events
        || old.bulk_data_label != new.bulk_data_label
        || old.use_uuid != new.use_uuid
        || old.max_record_size != new.max_record_size
}

/// Whether the module needs another sink.
fn destination_differs(old: &ModuleConfig, new: &ModuleConfig) -> bool {
    old.stream_name != new.stream_name
        || old.region != new.region
        || old.role_arn != new.role_arn
        || old.external_id != new.external_id
        || old.aggregation != new.aggregation
        || old.aggregation_max_bytes != new.aggregation_max_bytes
        || old.aggregation_max_records != new.aggregation_max_records
        || old.largest_kinesis_record() != new.largest_kinesis_record()
}

/// What changed, for the activity log: `field: old → new`, each, by field
/// name; the external ID's values are not shown.
fn differences(old: &ModuleConfig, new: &ModuleConfig) -> String {
    let as_map = |module: &ModuleConfig| match serde_json::to_value(module) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    let (old, new) = (as_map(old), as_map(new));
    // By name: the map's own order depends on serde_json's features.
    let mut fields: Vec<(&String, &serde_json::Value)> = new.iter().collect();
    fields.sort_by_key(|(key, _)| *key);
    let changes: Vec<String> = fields
        .into_iter()
        .filter(|(key, value)| old.get(*key) != Some(*value))
        .map(|(key, value)| {
            let before = old.get(key).cloned().unwrap_or(serde_json::Value::Null);
            if key == "external_id" {
                format!("{key} changed")
            } else {
                format!("{key}: {before} → {value}")
            }
        })
        .collect();
    if changes.is_empty() {
        "nothing changed".to_owned()
    } else {
        changes.join(", ")
    }
}

/// Runs blocking work (the store, the file, the guest) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ChangeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ChangeError::Failed(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> ModuleConfig {
        ModuleConfig {
            id: "lake".into(),
            subscribe_events: vec!["*".into()],
            region: "us-east-1".into(),
            stream_name: "lake".into(),
            ..ModuleConfig::default()
        }
    }

    #[test]
    fn the_log_says_what_changed_but_not_the_external_id() {
        let old = module();
        let mut new = module();
        new.subscribe_events = vec!["alert".into()];
        new.external_id = Some("s3cret-ext".into());
        let said = differences(&old, &new);
        assert_eq!(
            said,
            r#"external_id changed, subscribe_events: ["*"] → ["alert"]"#
        );
        assert!(!said.contains("s3cret"));
        assert_eq!(differences(&old, &old), "nothing changed");
    }

    #[test]
    fn only_what_a_change_touches_is_restarted() {
        let old = module();
        let mut described = module();
        described.description = "new words".into();
        assert!(!guest_settings_differ(&old, &described));
        assert!(!destination_differs(&old, &described));
        let mut subscribed = module();
        subscribed.subscribe_events = vec!["alert".into()];
        assert!(guest_settings_differ(&old, &subscribed));
        assert!(!destination_differs(&old, &subscribed));
        let mut moved = module();
        moved.stream_name = "other".into();
        assert!(!guest_settings_differ(&old, &moved));
        assert!(destination_differs(&old, &moved));
    }
}
