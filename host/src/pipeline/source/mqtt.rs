//! The MQTT source: a persistent MQTT 5 session with manual acknowledgements.
//!
//! ksm connects with a fixed client ID, `clean start` off and a session
//! expiry, so the broker keeps its subscriptions and queues messages while
//! ksm is away. Messages are acknowledged only when their records are safe
//! (see [`crate::pipeline::ack`]); MQTT 5's Receive Maximum lets many messages be in
//! flight at once despite the late acknowledgements.
//!
//! With `mqtts://`, the connection is TLS (see [`crate::tls::client`]); the
//! certificate, key and password files are read again before every
//! reconnection, so a rotated certificate is used without a restart.
//!
//! With `mqtt.shared_group` set, ksm subscribes through shared subscriptions
//! (`$share/{group}/{filter}`), so the broker hands each message to one of
//! the hosts in the group.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::activity::Level;
use crate::config::{Broker, MqttConfig};
use crate::module::ModuleSet;
use crate::pipeline::ack::Settlement;
use crate::pipeline::inflight::{Charge, InFlight};
use crate::pipeline::route::Inbound;
use crate::pipeline::source::{Message, Properties, SUBSCRIPTIONS, SourceStatus, Topic};
use crate::tls::CertificateSummary;
use crate::tls::client::{broker_config, explain};

/// Pause before reconnecting after the connection failed.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// How long the last acknowledgements may take to leave at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_secs(3);

/// The MQTT side of a running host.
pub struct MqttSource {
    client: AsyncClient,
    eventloop: EventLoop,
    modules: Arc<ModuleSet>,
    status: Arc<SourceStatus>,
    filters: Vec<String>,
    inflight: Arc<InFlight>,
    config: MqttConfig,
    broker: Broker,
    /// ksm's client certificate in the TLS configuration in use.
    client_certificate: Option<CertificateSummary>,
}

impl MqttSource {
    /// Prepares the connection (it is made when [`MqttSource::run`] starts).
    pub fn new(
        config: &MqttConfig,
        modules: Arc<ModuleSet>,
        status: Arc<SourceStatus>,
        inflight: Arc<InFlight>,
    ) -> Result<Self, String> {
        let broker = Broker::parse(&config.url)?;
        let mut options =
            MqttOptions::new(config.client_id.clone(), broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(config.session_expiry_secs))
            .set_receive_maximum(Some(config.receive_maximum))
            .set_max_packet_size(Some(config.max_packet_bytes))
            .set_manual_acks(true);
        let client_certificate = connection_settings(config, &broker, &mut options)?;
        if let Some(certificate) = &client_certificate {
            tracing::info!("TLS client certificate for the MQTT broker: {certificate}");
        }
        // Room for one acknowledgement per message in flight, plus subscriptions.
        let requests = usize::from(config.receive_maximum) + 64;
        let (client, eventloop) = AsyncClient::new(options, requests);
        let filters = SUBSCRIPTIONS
            .iter()
            .map(|topic| match &config.shared_group {
                Some(group) => format!("$share/{group}/{topic}"),
                None => (*topic).to_owned(),
            })
            .collect();
        Ok(Self {
            client,
            eventloop,
            modules,
            status,
            filters,
            inflight,
            config: config.clone(),
            broker,
            client_certificate,
        })
    }

    /// Reads the password, certificate and key files again for the next
    /// connection; logs (and keeps the settings before) if they are unusable.
    fn reread_settings(&mut self) {
        match connection_settings(&self.config, &self.broker, &mut self.eventloop.options) {
            Ok(certificate) => {
                if certificate != self.client_certificate
                    && let Some(certificate) = &certificate
                {
                    let message = format!(
                        "TLS client certificate for the MQTT broker changed: now {certificate}"
                    );
                    tracing::info!("{message}");
                    self.log_all(Level::Info, &message);
                }
                self.client_certificate = certificate;
            }
            Err(error) => self.log_everywhere(
                "mqtt-settings",
                Level::Error,
                &format!(
                    "cannot use the MQTT connection settings ({error}); trying the files again at \
                     the next reconnection"
                ),
            ),
        }
    }

    /// Logs a failed or lost connection, in the host log and every module's,
    /// with what it means when that is known; before the source is marked
    /// disconnected, so that it tells a lost connection from a failed one.
    fn report_connection_error(&self, error: &ConnectionError) {
        let while_connecting = !self.status.is_connected();
        let cause: &(dyn std::error::Error + 'static) = match io_error(error) {
            Some(io) => io,
            None => error,
        };
        let meaning = explain(cause, self.client_certificate.as_ref())
            .or_else(|| while_connecting.then(|| self.hint_before_connack(error))?);
        let (level, message) = match (&meaning, while_connecting) {
            (Some(meaning), _) => (
                Level::Error,
                format!(
                    "cannot connect to the MQTT broker at {}: {meaning} ({error}); retrying",
                    self.config.url
                ),
            ),
            (None, true) => (
                Level::Warn,
                format!(
                    "cannot connect to the MQTT broker at {} ({error}); retrying",
                    self.config.url
                ),
            ),
            (None, false) => (
                Level::Warn,
                format!("lost the connection to the MQTT broker ({error}); reconnecting"),
            ),
        };
        self.log_everywhere("mqtt-connection", level, &message);
    }

    /// Writes `message` to the host log and, limited by `key`, to every
    /// module's log.
    fn log_everywhere(&self, key: &'static str, level: Level, message: &str) {
        match level {
            Level::Error => tracing::error!("{message}"),
            Level::Warn => tracing::warn!("{message}"),
            Level::Info => tracing::info!("{message}"),
        }
        for module in self.modules.all().iter() {
            module.log.write_limited(key, level, message);
        }
    }

    /// What a connection closed before the broker's CONNACK may mean: a
    /// plain client at a TLS port, or TLS at a plain port.
    fn hint_before_connack(&self, error: &ConnectionError) -> Option<String> {
        let closed = match io_error(error) {
            Some(error) => closed_early(error),
            None => matches!(
                error,
                ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_)
            ),
        };
        closed.then(|| {
            if self.broker.tls {
                "the broker closed the connection during the TLS handshake: if its port is a \
                 plain MQTT port, use mqtt:// (or the broker's TLS port, usually 8883)"
                    .to_owned()
            } else {
                "the broker closed the connection before answering: if its port is a TLS port \
                 (usually 8883), use mqtts://"
                    .to_owned()
            }
        })
    }

    /// Receives messages into `inbox` until `intake` turns true; then keeps
    /// the connection up until every acknowledgement released by settled
    /// messages has been sent (or `disconnect` turns true), and disconnects.
    pub async fn run(
        mut self,
        inbox: mpsc::Sender<Inbound>,
        mut intake: watch::Receiver<bool>,
        mut disconnect: watch::Receiver<bool>,
    ) {
        let (fallback, mut ack_rx) = mpsc::unbounded_channel::<Publish>();
        let ack_tx = Arc::new(Acknowledger {
            client: self.client.clone(),
            fallback,
            status: self.status.clone(),
        });
        let acker_client = self.client.clone();
        let mut acker = tokio::spawn(async move {
            while let Some(publish) = ack_rx.recv().await {
                if acker_client.ack(&publish).await.is_err() {
                    break;
                }
            }
        });
        let mut inbox = Some(inbox);
        let mut ack_tx = Some(ack_tx);
        loop {
            tokio::select! {
                event = self.eventloop.poll() => match event {
                    Ok(event) => {
                        if let (Some(inbox), Some(ack_tx)) = (&inbox, &ack_tx) {
                            self.handle(event, inbox, ack_tx).await;
                        }
                    }
                    Err(error) => {
                        self.report_connection_error(&error);
                        self.status.disconnected();
                        tokio::time::sleep(RECONNECT_DELAY).await;
                        self.reread_settings();
                    }
                },
                _ = intake.changed(), if inbox.is_some() => {
                    // Stop taking messages; new ones stay unacknowledged at the broker.
                    inbox = None;
                    ack_tx = None;
                }
                _ = &mut acker, if inbox.is_none() => break,
                _ = disconnect.changed() => break,
            }
        }
        drop(ack_tx);
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            while let Ok(event) = self.eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }

    async fn handle(
        &mut self,
        event: Event,
        inbox: &mpsc::Sender<Inbound>,
        ack_tx: &Arc<Acknowledger>,
    ) {
        match event {
            Event::Incoming(Packet::ConnAck(connack)) => {
                self.status.connected(connack.session_present);
                self.log_all(
                    Level::Info,
                    &format!(
                        "connected to the MQTT broker (session {})",
                        if connack.session_present {
                            "resumed"
                        } else {
                            "new"
                        }
                    ),
                );
                if !connack.session_present {
                    let filters: Vec<Filter> = self
                        .filters
                        .iter()
                        .map(|filter| Filter::new(filter, QoS::AtLeastOnce))
                        .collect();
                    let client = self.client.clone();
                    tokio::spawn(async move { client.subscribe_many(filters).await });
                }
            }
            Event::Incoming(Packet::SubAck(suback)) => {
                let refused: Vec<String> = suback
                    .return_codes
                    .iter()
                    .zip(&self.filters)
                    .filter(|(code, _)| !matches!(code, SubscribeReasonCode::Success(_)))
                    .map(|(code, topic)| format!("{topic} ({code:?})"))
                    .collect();
                if refused.is_empty() {
                    self.status.subscribed();
                } else {
                    self.log_all(
                        Level::Error,
                        &format!(
                            "the MQTT broker refused subscriptions: {}; check the broker's ACLs",
                            refused.join(", ")
                        ),
                    );
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                let bytes = publish.payload.len();
                let charge = match self.inflight.try_charge(bytes) {
                    Some(charge) => charge,
                    None => {
                        let message = format!(
                            "messages not yet committed hold {} of the {} bytes of \
                             mqtt.inflight_max_mib: ksm stops reading from the MQTT broker until \
                             they are committed (devices' messages wait at the broker)",
                            self.inflight.used(),
                            self.inflight.max()
                        );
                        for module in self.modules.all().iter() {
                            module
                                .log
                                .write_limited("inflight-full", Level::Warn, &message);
                        }
                        // Not reading from the socket meanwhile: TCP holds the broker back.
                        self.inflight.charge(bytes).await
                    }
                };
                let message = message(publish, ack_tx, charge);
                if inbox.send(Inbound::Message(message)).await.is_err() {
                    tracing::warn!("router stopped; message left unacknowledged");
                }
            }
            Event::Incoming(Packet::Disconnect(disconnect)) => self.log_all(
                Level::Warn,
                &format!(
                    "the MQTT broker closed the session: {:?}",
                    disconnect.reason_code
                ),
            ),
            _ => {}
        }
    }

    fn log_all(&self, level: Level, message: &str) {
        for module in self.modules.all().iter() {
            module.log.write(level, message);
        }
    }
}

/// Sets what may change between connections on `options`: the credentials
/// (the password file is read again) and, for `mqtts://`, the TLS
/// configuration from its files. Returns ksm's client certificate.
fn connection_settings(
    config: &MqttConfig,
    broker: &Broker,
    options: &mut MqttOptions,
) -> Result<Option<CertificateSummary>, String> {
    let password = match &config.username {
        Some(_) => config.resolve_password()?,
        None => None,
    };
    let tls = match broker.tls {
        true => Some(broker_config(&config.tls).map_err(|error| error.to_string())?),
        false => None,
    };
    if let Some(username) = &config.username {
        options.set_credentials(username.clone(), password.unwrap_or_default());
    }
    Ok(tls.and_then(|tls| {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.config,
        )));
        tls.client_certificate
    }))
}

/// The I/O error behind a connection error, wherever rumqttc put it (TLS
/// alerts after the handshake come as errors reading the CONNACK).
fn io_error(error: &ConnectionError) -> Option<&std::io::Error> {
    use rumqttc::v5::StateError;
    use rumqttc::v5::mqttbytes::Error as PacketError;
    match error {
        ConnectionError::Io(error)
        | ConnectionError::Tls(rumqttc::TlsError::Io(error))
        | ConnectionError::MqttState(StateError::Io(error))
        | ConnectionError::MqttState(StateError::Deserialization(PacketError::Io(error))) => {
            Some(error)
        }
        _ => None,
    }
}

/// An I/O error that means the peer closed the connection.
fn closed_early(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        error.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// A payload at least this large gets an allocation of its own.
const OWN_ALLOCATION_BYTES: usize = 64 * 1024;

/// The payload, in an allocation of its own when it is large: the MQTT
/// client's read buffer it is a view of can be twice its size, and would
/// be held as long as the payload is (the in-flight budget counts payloads).
fn own_allocation(payload: bytes::Bytes) -> bytes::Bytes {
    if payload.len() >= OWN_ALLOCATION_BYTES {
        bytes::Bytes::copy_from_slice(&payload)
    } else {
        payload
    }
}

/// Sends PUBACKs from whichever thread settles a message: straight into the
/// MQTT client's request queue, or, when that is full, through the
/// acknowledging task, which waits for room. Order between the two does not
/// matter: each PUBACK names its packet.
struct Acknowledger {
    client: AsyncClient,
    fallback: mpsc::UnboundedSender<Publish>,
    status: Arc<SourceStatus>,
}

impl Acknowledger {
    fn ack(&self, publish: Publish) {
        self.status.acknowledged();
        if self.client.try_ack(&publish).is_err() {
            let _ = self.fallback.send(publish);
        }
    }
}

/// Turns a received publish into a message whose settlement sends its PUBACK.
fn message(publish: Publish, ack_tx: &Arc<Acknowledger>, charge: Charge) -> Message {
    let topic: Arc<str> = String::from_utf8_lossy(&publish.topic).into();
    let properties = publish
        .properties
        .as_ref()
        .map(|p| Properties {
            content_type: p.content_type.clone(),
            user_properties: p.user_properties.clone(),
        })
        .unwrap_or_default();
    let on_settled: Option<crate::pipeline::ack::OnSettled> = (publish.qos != QoS::AtMostOnce)
        .then(|| {
            let ack = Publish {
                payload: bytes::Bytes::new(),
                ..publish.clone()
            };
            let ack_tx = ack_tx.clone();
            ack_tx.status.to_acknowledge();
            Box::new(move || ack_tx.ack(ack)) as crate::pipeline::ack::OnSettled
        });
    Message {
        kind: Topic::parse(&topic),
        topic,
        payload: own_allocation(publish.payload),
        received_at: OffsetDateTime::now_utc(),
        settlement: Settlement::new(on_settled),
        replay: None,
        charge,
        properties,
    }
}
