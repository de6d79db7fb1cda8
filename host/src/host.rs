//! A running ksm host: wires the MQTT source, the router with its guests, the
//! Kinesis sinks and the admin API together, and stops them in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::activity::Level;
use crate::bindings::types::ModuleSettings;
use crate::config::Config;
use crate::module::Module;
use crate::router::{Route, Router};
use crate::runtime::{GuestLimits, Runtime, RuntimeError};
use crate::sink::kinesis::{self, KinesisSink};
use crate::source::SourceStatus;
use crate::source::mqtt::MqttSource;

/// How long shutdown waits for records in flight to reach Kinesis before it
/// leaves them to the broker's redelivery.
const FLUSH_GRACE: Duration = Duration::from_secs(10);

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The component could not be loaded, or refused a module's settings.
    #[error("module `{module}`: {source}")]
    Guest {
        /// Module ID.
        module: String,
        /// What the runtime said.
        source: RuntimeError,
    },
    /// The component could not be loaded.
    #[error(transparent)]
    Component(RuntimeError),
    /// A module's dead-letter store could not be opened.
    #[error(transparent)]
    Storage(#[from] crate::dead_letter::DeadLetterError),
    /// The admin API could not listen.
    #[error("admin API cannot listen on {addr}: {source}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The MQTT settings are unusable.
    #[error("mqtt: {0}")]
    Mqtt(String),
}

/// A started host; stop it with [`Host::stop`].
pub struct Host {
    modules: Arc<[Arc<Module>]>,
    admin_addr: SocketAddr,
    intake: watch::Sender<bool>,
    disconnect: watch::Sender<bool>,
    sink_stop: watch::Sender<bool>,
    source: JoinHandle<()>,
    router: std::thread::JoinHandle<()>,
    sinks: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
}

impl Host {
    /// Loads the component, configures a guest per module, builds the
    /// Kinesis clients, binds the admin API and connects to the broker.
    pub async fn start(config: Config) -> Result<Host, StartError> {
        let limits = GuestLimits {
            call_timeout: Duration::from_millis(config.component.call_timeout_ms),
            max_memory_bytes: config.component.max_memory_mib as usize * 1024 * 1024,
        };
        let path = config.component.path.clone();
        let runtime = tokio::task::spawn_blocking(move || Runtime::load_with(&path, limits))
            .await
            .expect("component loading does not panic")
            .map_err(StartError::Component)?;

        let (sink_stop, sink_stop_rx) = watch::channel(false);
        let mut modules = Vec::new();
        let mut routes = Vec::new();
        let mut sinks = Vec::new();
        for module_config in &config.modules {
            let module = Arc::new(Module::open(module_config.clone(), &config.storage.dir)?);
            let settings = ModuleSettings {
                subscribe_events: module_config.subscribe_events.clone(),
                bulk_data_label: module_config.bulk_data_label.clone(),
                use_uuid: module_config.use_uuid,
                max_record_size: module_config.max_record_size,
            };
            let guest = runtime
                .instantiate(&settings)
                .map_err(|source| StartError::Guest {
                    module: module_config.id.clone(),
                    source,
                })?;
            let client = kinesis::client(module_config, &config.kinesis).await;
            let (sink_tx, sink_rx) = mpsc::channel(config.kinesis.queue_capacity);
            let sink = KinesisSink::new(client, module.clone(), config.kinesis.clone(), sink_rx);
            sinks.push(tokio::spawn(sink.run(sink_stop_rx.clone())));
            routes.push(Route {
                module: module.clone(),
                guest,
                sink: sink_tx,
            });
            module.log.write(
                Level::Info,
                format!(
                    "started: forwarding to stream `{}` in {}",
                    module_config.stream_name, module_config.region
                ),
            );
            modules.push(module);
        }
        let modules: Arc<[Arc<Module>]> = modules.into();

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
        let app = crate::admin::router(modules.clone(), status.clone());
        let admin = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!("admin API stopped: {error}");
            }
        });

        let inbox_capacity = usize::from(config.mqtt.receive_maximum) * 2;
        let (inbox_tx, inbox_rx) = mpsc::channel(inbox_capacity);
        let router = Router::new(routes, &config.devices);
        let router = std::thread::Builder::new()
            .name("ksm-router".into())
            .spawn(move || router.run(inbox_rx))
            .expect("the OS can start the router thread");

        let source =
            MqttSource::new(&config.mqtt, modules.clone(), status).map_err(StartError::Mqtt)?;
        let (intake, intake_rx) = watch::channel(false);
        let (disconnect, disconnect_rx) = watch::channel(false);
        let source = tokio::spawn(source.run(inbox_tx, intake_rx, disconnect_rx));

        Ok(Host {
            modules,
            admin_addr,
            intake,
            disconnect,
            sink_stop,
            source,
            router,
            sinks,
            admin,
        })
    }

    /// The address the admin API listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The running modules.
    pub fn modules(&self) -> &[Arc<Module>] {
        &self.modules
    }

    /// Stops taking messages, lets records in flight reach Kinesis (for a
    /// bounded time), sends the acknowledgements they released, disconnects.
    /// Whatever is not yet safe stays unacknowledged and is delivered again
    /// by the broker after a restart.
    pub async fn stop(self) {
        let _ = self.intake.send(true);
        let router = self.router;
        let mut router = Some(tokio::task::spawn_blocking(move || router.join()));
        let mut sinks = self.sinks;
        // The router finishes once the inbox is drained; the sinks once the
        // router has closed their inputs and their queues are empty.
        let drain = async {
            if let Some(handle) = router.as_mut() {
                let _ = handle.await;
                router = None;
            }
            while let Some(sink) = sinks.last_mut() {
                let _ = sink.await;
                sinks.pop();
            }
        };
        if tokio::time::timeout(FLUSH_GRACE, drain).await.is_err() {
            // Give up on what is still queued: it stays unacknowledged.
            let _ = self.sink_stop.send(true);
            if let Some(handle) = router {
                let _ = handle.await;
            }
            for sink in sinks {
                let _ = sink.await;
            }
        }
        let mut source = self.source;
        if tokio::time::timeout(FLUSH_GRACE, &mut source)
            .await
            .is_err()
        {
            let _ = self.disconnect.send(true);
            let _ = source.await;
        }
        self.admin.abort();
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
