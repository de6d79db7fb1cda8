//! A running ksm host: wires the MQTT source, the router with its guests, the
//! committer and its store, the Kinesis sinks and the admin API together, and
//! stops them in order.
//!
//! ```text
//! MQTT ─▶ source ─▶ router (guests) ─▶ committer ─▶ store ─▶ sinks ─▶ Kinesis
//!            ▲                             │ synced
//!            └──────── PUBACK ◀────────────┘
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::activity::Level;
use crate::components::{ComponentError, Components};
use crate::config::Config;
use crate::manager::ModuleManager;
use crate::module::{Module, ModuleSet};
use crate::pipeline::commit::Committer;
use crate::pipeline::crash_guard::{CrashGuard, GuardError};
use crate::pipeline::inflight::InFlight;
use crate::pipeline::route::answer::Budget;
use crate::pipeline::route::{Route, Router};
use crate::pipeline::source::SourceStatus;
use crate::pipeline::source::mqtt::MqttSource;
use crate::runtime::{GuestEngine, GuestLimits, RuntimeError};
use crate::store::{Store, StoreError};

/// How long shutdown lets the sinks send what is spooled before it leaves
/// the rest in the spool for the next run.
const FLUSH_GRACE: Duration = Duration::from_secs(5);
/// How long shutdown waits for the last acknowledgements to leave.
const ACK_GRACE: Duration = Duration::from_secs(5);

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A component could not be loaded, or refused a module's settings.
    #[error(transparent)]
    Component(#[from] ComponentError),
    /// The WebAssembly engine could not be set up.
    #[error(transparent)]
    Engine(RuntimeError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The admin API could not listen.
    #[error("admin API cannot listen on {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin API's token or certificate files are unusable.
    #[error("admin: {0}")]
    AdminSettings(String),
    /// The MQTT settings are unusable.
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// A module's stream cannot take the records the module would send.
    #[error("{0}")]
    Stream(String),
    /// The crash-loop guard's files cannot be used.
    #[error(transparent)]
    Guard(#[from] GuardError),
}

/// A started host; stop it with [`Host::stop`].
pub struct Host {
    manager: Arc<ModuleManager>,
    admin_addr: SocketAddr,
    intake: watch::Sender<bool>,
    disconnect: watch::Sender<bool>,
    stopping: Arc<AtomicBool>,
    guard: Arc<CrashGuard>,
    source: JoinHandle<()>,
    router: std::thread::JoinHandle<()>,
    committer: std::thread::JoinHandle<()>,
    reloaders: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
}

impl Host {
    /// Loads the component, configures a guest per module, builds the
    /// Kinesis clients, binds the admin API and connects to the broker.
    pub async fn start(config: Config) -> Result<Host, StartError> {
        let limits = GuestLimits {
            call_timeout: Duration::from_millis(config.component.call_timeout_ms),
            max_memory_bytes: config.component.max_memory_mib as usize * 1024 * 1024,
            recycle_above_bytes: config.component.recycle_above_bytes(),
            recycle_after_calls: config.component.recycle_after_calls,
        };
        let store = Store::open(&config.storage.dir)?;
        let spool_max_bytes = config.storage.spool_max_mib * 1024 * 1024;
        let mut modules = Vec::new();
        for module_config in &config.modules {
            modules.push(Arc::new(Module::open(
                module_config.clone(),
                &store,
                spool_max_bytes,
            )?));
        }
        let inbox_capacity = usize::from(config.mqtt.receive_maximum) * 2;
        let (inbox_tx, inbox_rx) = mpsc::channel(inbox_capacity);

        let cache = config.storage.dir.join("component-cache");
        let engine = GuestEngine::new(limits, Some(&cache)).map_err(StartError::Engine)?;
        let components = Arc::new(Components::new(engine, inbox_tx.downgrade()));
        let loading = components.clone();
        let paths: Vec<(Arc<Module>, PathBuf)> = modules
            .iter()
            .map(|module| (module.clone(), config.component_of(&module.config())))
            .collect();
        let guests = tokio::task::spawn_blocking(move || loading.load_all(&paths))
            .await
            .expect("component loading does not panic")?;

        let module_set = Arc::new(ModuleSet::new(modules.clone()));
        let manager = Arc::new(ModuleManager::new(
            config.clone(),
            module_set.clone(),
            store.clone(),
            components.clone(),
            inbox_tx.downgrade(),
        ));
        let mut routes = Vec::new();
        let mut targets = Vec::new();
        for (module, guest) in modules.iter().zip(guests) {
            let target = manager.launch(module).await.map_err(StartError::Stream)?;
            let module_config = module.config();
            let component = module
                .component()
                .map(|c| {
                    format!(
                        ", running component {} (sha256 {}, {})",
                        c.path.display(),
                        c.short_hash(),
                        c.contract
                    )
                })
                .unwrap_or_default();
            module.log.write(
                Level::Info,
                format!(
                    "started: forwarding to stream `{}` in {}{component}",
                    module_config.stream_name, module_config.region
                ),
            );
            let (records, bytes) = module.spool.len();
            if records > 0 {
                module.log.write(
                    Level::Info,
                    format!("resuming {records} records ({bytes} bytes) left in the spool"),
                );
            }
            targets.push(target);
            routes.push(Route {
                module: module.clone(),
                guest,
            });
        }

        let (job_tx, job_rx) = std::sync::mpsc::sync_channel(inbox_capacity);
        let (guard, in_flight_at_exit) = CrashGuard::open(&config.storage.dir)?;
        let guard = Arc::new(guard);
        if in_flight_at_exit > 0 {
            for module in &modules {
                module.log.write(
                    Level::Warn,
                    format!(
                        "the last run of ksm ended abnormally with {in_flight_at_exit} messages \
                         in flight; they are handled one at a time, and a message in flight at \
                         two such ends in a row is kept as a dead letter without being run"
                    ),
                );
            }
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let committer = Committer::new(store, targets, stopping.clone(), guard.clone());
        let committer = std::thread::Builder::new()
            .name("ksm-committer".into())
            .spawn(move || committer.run(job_rx))
            .expect("the OS can start the committer thread");

        let token = config
            .admin
            .resolve_token()
            .map_err(StartError::AdminSettings)?;
        let admin_tls = match &config.admin.tls {
            Some(tls) => Some(
                crate::tls::server::admin_config(&tls.cert_file, &tls.key_file)
                    .map_err(|error| StartError::AdminSettings(error.to_string()))?,
            ),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| StartError::Admin {
                addr: config.admin.listen,
                source,
            })?;
        let admin_addr = listener.local_addr().map_err(|source| StartError::Admin {
            addr: config.admin.listen,
            source,
        })?;
        let status = Arc::new(SourceStatus::default());
        let inflight = InFlight::new(
            usize::try_from(config.mqtt.inflight_max_mib * 1024 * 1024).unwrap_or(usize::MAX),
        );
        let app = crate::admin::router(
            manager.clone(),
            status.clone(),
            inbox_tx.downgrade(),
            components.clone(),
            inflight.clone(),
            crate::admin::auth::Token::new(token.as_deref()),
        );
        let admin = tokio::spawn(crate::admin::serve(listener, app, admin_tls));

        let budget = Budget::from_config(&config.component);
        let router = Router::new(
            routes,
            &config.devices,
            budget,
            guard.clone(),
            stopping.clone(),
            job_tx,
        );
        let router = std::thread::Builder::new()
            .name("ksm-router".into())
            .spawn(move || router.run(inbox_rx))
            .expect("the OS can start the router thread");

        let mut reloaders = vec![tokio::spawn(reload_on_sighup(components.clone()))];
        if config.component.watch_interval_ms > 0 {
            let interval = Duration::from_millis(config.component.watch_interval_ms);
            reloaders.push(tokio::spawn(reload_on_change(components.clone(), interval)));
        }

        let source = MqttSource::new(&config.mqtt, module_set.clone(), status, inflight)
            .map_err(StartError::Mqtt)?;
        let (intake, intake_rx) = watch::channel(false);
        let (disconnect, disconnect_rx) = watch::channel(false);
        let source = tokio::spawn(source.run(inbox_tx, intake_rx, disconnect_rx));

        Ok(Host {
            manager,
            admin_addr,
            intake,
            disconnect,
            stopping,
            guard,
            source,
            router,
            committer,
            reloaders,
            admin,
        })
    }

    /// The address the admin API listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The running modules.
    pub fn modules(&self) -> Arc<[Arc<Module>]> {
        self.manager.modules().all()
    }

    /// Stops taking messages, commits what the guests produced and sends
    /// the acknowledgements it released, gives the sinks a moment to send
    /// what is spooled, and disconnects. What is not sent stays in the spool
    /// for the next run; messages not yet committed stay unacknowledged and
    /// the broker delivers them again.
    pub async fn stop(self) {
        self.reloaders.iter().for_each(JoinHandle::abort);
        let _ = self.intake.send(true);
        // A committer waiting for room in a full spool gives up: the
        // message it holds stays unacknowledged.
        self.stopping.store(true, Ordering::Release);
        let router = self.router;
        let committer = self.committer;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = router.join();
            let _ = committer.join();
        })
        .await;
        // Nothing is between the router and the store any more.
        self.guard.stopped_cleanly();
        let mut source = self.source;
        let mut sinks = self.manager.take_sinks();
        let acks_sent = async {
            if tokio::time::timeout(ACK_GRACE, &mut source).await.is_err() {
                let _ = self.disconnect.send(true);
                let _ = (&mut source).await;
            }
        };
        let sinks_done = async {
            let drain = async {
                while let Some(sink) = sinks.last_mut() {
                    let _ = (&mut sink.task).await;
                    sinks.pop();
                }
            };
            if tokio::time::timeout(FLUSH_GRACE, drain).await.is_err() {
                for sink in &sinks {
                    let _ = sink.stop.send(true);
                }
                while let Some(sink) = sinks.last_mut() {
                    let _ = (&mut sink.task).await;
                    sinks.pop();
                }
            }
        };
        tokio::join!(acks_sent, sinks_done);
        self.admin.abort();
    }
}

/// Reloads the components on SIGHUP.
async fn reload_on_sighup(components: Arc<Components>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload components through the admin API");
            return;
        };
        while hangups.recv().await.is_some() {
            let components = components.clone();
            let _ = tokio::task::spawn_blocking(move || components.reload("SIGHUP")).await;
        }
    }
    #[cfg(not(unix))]
    let _ = components;
}

/// Reloads the components when their files change (and have settled).
async fn reload_on_change(components: Arc<Components>, interval: Duration) {
    let mut seen = std::collections::BTreeMap::new();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let watching = components.clone();
        let (changed, after) = tokio::task::spawn_blocking(move || {
            let changed = watching.changed_on_disk(&mut seen);
            (changed, seen)
        })
        .await
        .unwrap_or_default();
        seen = after;
        if changed {
            let components = components.clone();
            let _ = tokio::task::spawn_blocking(move || components.reload("file changed")).await;
        }
    }
}

/// Runs a host until `shutdown` completes, then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let host = Host::start(config).await?;
    tracing::info!(admin = %host.admin_addr(), "ksm is running");
    shutdown.await;
    tracing::info!("shutting down");
    host.stop().await;
    Ok(())
}
