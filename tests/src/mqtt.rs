//! MQTT 5 clients for tests (rumqttc), over TCP or TLS ([`ClientTls`]): publish and wait for
//! every acknowledgement, publish one message and see what the broker answers (also over MQTT
//! 3.1.1), subscribe and receive.
//!
//! Each helper comes in three forms: for a `mqtt://` URL (`publish_all`), for a `mqtts://` URL
//! with a [`ClientTls`] (`publish_all_tls`), and for any [`MqttOptions`] (`publish_all_with`,
//! e.g. with a username and password).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::Error as MqttBytesError;
use rumqttc::v5::mqttbytes::QoS;
pub use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use rumqttc::{TlsConfiguration, Transport};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::tls::CertFiles;

/// The largest packet the test clients send or accept (the broker's default is unlimited).
const MAX_PACKET_SIZE: u32 = 256 * 1024 * 1024;

/// How long [`publish_all`] may take per message, on top of a fixed allowance.
const PER_MESSAGE_TIMEOUT: Duration = Duration::from_millis(100);

/// The fixed allowance for connecting and publishing.
const BASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Splits `mqtt://host:port` (or `tcp://`, `mqtts://`, `ssl://`, or a bare `host:port`) into
/// host and port; without a port, 1883 (8883 for `mqtts://` and `ssl://`).
pub fn parse_url(url: &str) -> (String, u16) {
    let (rest, default_port) = if let Some(rest) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (rest, 8883)
    } else {
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        (rest, 1883)
    };
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    match rest.rsplit_once(':') {
        Some((host, port)) => (
            host.to_owned(),
            port.parse()
                .unwrap_or_else(|e| panic!("bad port in MQTT url {url:?}: {e}")),
        ),
        None => (rest.to_owned(), default_port),
    }
}

/// TLS for a test client: the CA certificates it trusts for the broker's certificate (checked
/// against the URL's host, an IP address or a DNS name) and, optionally, the certificate it
/// presents. TLS 1.2 and 1.3 on rustls with aws-lc-rs, as ksm has.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM file of the CA certificates the client trusts.
    pub ca_file: PathBuf,
    /// The certificate and key the client presents, if any.
    pub identity: Option<CertFiles>,
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_file`; presents no certificate.
    pub fn new(ca_file: &Path) -> ClientTls {
        ClientTls {
            ca_file: ca_file.to_owned(),
            identity: None,
        }
    }

    /// The same, presenting `identity`'s certificate and key.
    pub fn identity(mut self, identity: &CertFiles) -> ClientTls {
        self.identity = Some(identity.clone());
        self
    }

    /// The rustls client configuration. Panics if a file cannot be read or parsed, or the key
    /// does not match the certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&self.ca_file) {
            roots
                .add(cert)
                .unwrap_or_else(|e| panic!("CA certificate in {}: {e}", self.ca_file.display()));
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("TLS protocol versions: {e}"))
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(identity) => {
                let key = PrivateKeyDer::from_pem_file(&identity.key)
                    .unwrap_or_else(|e| panic!("read key {}: {e}", identity.key.display()));
                builder
                    .with_client_auth_cert(read_certs(&identity.cert), key)
                    .unwrap_or_else(|e| {
                        panic!(
                            "client certificate {} with key {}: {e}",
                            identity.cert.display(),
                            identity.key.display()
                        )
                    })
            }
        };
        Arc::new(config)
    }
}

/// Every certificate in the PEM file at `path` (at least one).
fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect())
        .unwrap_or_else(|e| panic!("read certificates from {}: {e}", path.display()));
    assert!(!certs.is_empty(), "no certificate in {}", path.display());
    certs
}

/// Options for a test client with a unique id, clean start, and large packets allowed.
pub fn options(url: &str, client_id_prefix: &str) -> MqttOptions {
    let (host, port) = parse_url(url);
    let mut options = MqttOptions::new(crate::unique_name(client_id_prefix), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(MAX_PACKET_SIZE));
    options
}

/// Like [`options`] for a `mqtts://` URL, connecting with `tls`.
pub fn tls_options(url: &str, client_id_prefix: &str, tls: &ClientTls) -> MqttOptions {
    let mut options = options(url, client_id_prefix);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls.client_config(),
    )));
    options
}

/// `host:port` of the broker `options` connect to, for messages.
fn broker(options: &MqttOptions) -> String {
    let (host, port) = options.broker_address();
    format!("{host}:{port}")
}

/// Publishes every `(topic, payload)` with QoS 1 over one MQTT 5 connection and returns once
/// the broker has acknowledged all of them (`PUBACK` success or "no matching subscribers").
///
/// Panics if the broker cannot be reached, rejects a message, or does not acknowledge all
/// within 30 s plus 100 ms per message.
pub async fn publish_all<T, P>(url: &str, messages: &[(T, P)])
where
    T: AsRef<str>,
    P: AsRef<[u8]>,
{
    publish_all_with(options(url, "ksm-tests-pub"), messages).await;
}

/// Like [`publish_all`] over TLS, to a `mqtts://` URL.
pub async fn publish_all_tls<T, P>(url: &str, tls: &ClientTls, messages: &[(T, P)])
where
    T: AsRef<str>,
    P: AsRef<[u8]>,
{
    publish_all_with(tls_options(url, "ksm-tests-pub", tls), messages).await;
}

/// Like [`publish_all`], connecting with `options`.
pub async fn publish_all_with<T, P>(options: MqttOptions, messages: &[(T, P)])
where
    T: AsRef<str>,
    P: AsRef<[u8]>,
{
    let url = broker(&options);
    let owned: Vec<(String, Vec<u8>)> = messages
        .iter()
        .map(|(t, p)| (t.as_ref().to_owned(), p.as_ref().to_vec()))
        .collect();
    let expected = owned.len();
    if expected == 0 {
        return;
    }
    let timeout = BASE_TIMEOUT + PER_MESSAGE_TIMEOUT * u32::try_from(expected).unwrap_or(u32::MAX);
    let (client, mut eventloop) = AsyncClient::new(options, 64);

    let publish = async {
        for (topic, payload) in owned {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
                .unwrap_or_else(|e| panic!("queue MQTT publish to {topic}: {e}"));
        }
    };
    let acks = async {
        let mut acked = 0;
        while acked < expected {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => acked += 1,
                    other => panic!("broker {url} rejected publish {}: {other:?}", ack.pkid),
                },
                Ok(_) => {}
                Err(e) => panic!("MQTT connection to {url} failed after {acked} PUBACKs: {e}"),
            }
        }
    };
    let both = async { tokio::join!(publish, acks) };
    if tokio::time::timeout(timeout, both).await.is_err() {
        panic!("broker {url} did not acknowledge {expected} publishes within {timeout:?}");
    }
    disconnect(&client, &mut eventloop).await;
}

/// What came of one QoS 1 publish ([`publish_one`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishAnswer {
    /// The broker answered with a PUBACK of this reason: success (or "no matching
    /// subscribers"), or why it refused the message.
    PubAck(PubAckReason),
    /// The packet, `size` bytes, is over the Maximum Packet Size `max` the broker announced in
    /// its CONNACK, so the client refused to send it (MQTT 5 forbids it): the publish fails at
    /// the publisher.
    OverBrokerMaximum {
        /// The PUBLISH packet's size, bytes.
        size: u32,
        /// The broker's Maximum Packet Size, bytes.
        max: u32,
    },
    /// The broker sent DISCONNECT with this reason instead of a PUBACK.
    Disconnected(DisconnectReasonCode),
    /// The connection ended without a PUBACK or DISCONNECT: the client's error.
    ConnectionLost(String),
    /// The broker refused the connection in its CONNACK, with this reason.
    ConnectRefused(ConnectReturnCode),
    /// The connection failed before any CONNACK (nothing listening, or the TLS handshake
    /// failed: either side refused the other's certificate): the client's error.
    NotConnected(String),
}

/// The size of a QoS 1 PUBLISH packet without properties: fixed header (type byte and the
/// remaining length's 1 to 4 bytes), topic (with its 2-byte length), packet ID, the properties'
/// 1-byte length (0), payload.
pub fn qos1_publish_packet_size(topic: &str, payload_len: usize) -> usize {
    let remaining = 2 + topic.len() + 2 + 1 + payload_len;
    let length_bytes = match remaining {
        0..128 => 1,
        128..16_384 => 2,
        16_384..2_097_152 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

/// Publishes one message with QoS 1 over a fresh MQTT 5 connection and returns what came of
/// it, refusals of the connection or the message included, instead of panicking.
///
/// Panics only if the broker gives no answer within 30 s.
pub async fn publish_one(url: &str, topic: &str, payload: Vec<u8>) -> PublishAnswer {
    publish_one_with(options(url, "ksm-tests-pub-one"), topic, payload).await
}

/// Like [`publish_one`] over TLS, to a `mqtts://` URL: whether the broker took the
/// connection (and `tls`'s client certificate), and then the message (e.g. under its ACL).
pub async fn publish_one_tls(
    url: &str,
    tls: &ClientTls,
    topic: &str,
    payload: Vec<u8>,
) -> PublishAnswer {
    publish_one_with(tls_options(url, "ksm-tests-pub-one", tls), topic, payload).await
}

/// Like [`publish_one`], with MQTT 5 publish properties (content type, user properties).
pub async fn publish_one_with_properties(
    url: &str,
    topic: &str,
    payload: Vec<u8>,
    properties: PublishProperties,
) -> PublishAnswer {
    publish_one_as(
        options(url, "ksm-tests-pub-props"),
        topic,
        payload,
        Some(properties),
    )
    .await
}

/// Like [`publish_one`], connecting with `options`.
pub async fn publish_one_with(
    options: MqttOptions,
    topic: &str,
    payload: Vec<u8>,
) -> PublishAnswer {
    publish_one_as(options, topic, payload, None).await
}

async fn publish_one_as(
    options: MqttOptions,
    topic: &str,
    payload: Vec<u8>,
    properties: Option<PublishProperties>,
) -> PublishAnswer {
    let url = broker(&options);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let queued = match properties {
        Some(properties) => {
            client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
                .await
        }
        None => {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
        }
    };
    queued.unwrap_or_else(|e| panic!("queue MQTT publish to {topic}: {e}"));
    let answer = async {
        let mut connected = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    return PublishAnswer::PubAck(ack.reason);
                }
                Ok(_) => {}
                Err(ConnectionError::MqttState(
                    StateError::OutgoingPacketTooLarge { pkt_size, max }
                    | StateError::Deserialization(MqttBytesError::OutgoingPacketTooLarge {
                        pkt_size,
                        max,
                    }),
                )) => {
                    return PublishAnswer::OverBrokerMaximum {
                        size: pkt_size,
                        max,
                    };
                }
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    ..
                })) => return PublishAnswer::Disconnected(reason_code),
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return PublishAnswer::ConnectRefused(code);
                }
                Err(e) if connected => return PublishAnswer::ConnectionLost(e.to_string()),
                Err(e) => return PublishAnswer::NotConnected(e.to_string()),
            }
        }
    };
    let answer = tokio::time::timeout(BASE_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} to a publish within {BASE_TIMEOUT:?}"));
    if matches!(answer, PublishAnswer::PubAck(_)) {
        disconnect(&client, &mut eventloop).await;
    }
    answer
}

/// Publishes one message with QoS 1 over a fresh MQTT 3.1.1 connection, where the broker
/// announces no packet limit and the client checks none: `Ok` once the broker acknowledged it,
/// `Err` with the client's error if the connection ended first (MQTT 3.1.1 has no way to refuse
/// a publish but to close the connection).
///
/// Panics only if the broker cannot be reached, or gives no answer within 30 s.
pub async fn publish_one_mqtt311(url: &str, topic: &str, payload: Vec<u8>) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = parse_url(url);
    let mut options = MqttOptions::new(crate::unique_name("ksm-tests-pub-311"), host, port);
    let max = usize::try_from(MAX_PACKET_SIZE).unwrap_or(usize::MAX);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(max, max);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap_or_else(|e| panic!("queue MQTT publish to {topic}: {e}"));
    let answer = async {
        let mut connected = false;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) if connected => return Err(e.to_string()),
                Err(e) => panic!("cannot connect to the MQTT broker at {url}: {e}"),
            }
        }
    };
    // The client and its event loop are dropped on return, which closes the connection.
    tokio::time::timeout(BASE_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} to a publish within {BASE_TIMEOUT:?}"))
}

/// Sends DISCONNECT and drives the event loop until the connection closes (at most 2 s).
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.disconnect().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// A message received by a [`Subscriber`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The topic it was published to.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// An MQTT 5 client subscribed to one topic filter with QoS 1; its event loop runs in a Tokio
/// task until the subscriber is dropped.
#[derive(Debug)]
pub struct Subscriber {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<ReceivedMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to `url`, subscribes to `filter` and returns once the broker sent `SUBACK`.
    ///
    /// Panics if the connection fails or the broker refuses the subscription.
    pub async fn subscribe(url: &str, filter: &str) -> Subscriber {
        Subscriber::subscribe_with(options(url, "ksm-tests-sub"), filter).await
    }

    /// Like [`Subscriber::subscribe`] over TLS, to a `mqtts://` URL.
    pub async fn subscribe_tls(url: &str, tls: &ClientTls, filter: &str) -> Subscriber {
        Subscriber::subscribe_with(tls_options(url, "ksm-tests-sub", tls), filter).await
    }

    /// Like [`Subscriber::subscribe`], connecting with `options`.
    pub async fn subscribe_with(options: MqttOptions, filter: &str) -> Subscriber {
        let url = broker(&options);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap_or_else(|e| panic!("queue MQTT subscribe to {filter}: {e}"));
        let wait_suback = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(ack))) => return ack,
                    Ok(_) => {}
                    Err(e) => panic!("MQTT connection to {url} failed while subscribing: {e}"),
                }
            }
        };
        let ack = tokio::time::timeout(BASE_TIMEOUT, wait_suback)
            .await
            .unwrap_or_else(|_| {
                panic!("no SUBACK from {url} for {filter} within {BASE_TIMEOUT:?}")
            });
        assert!(
            ack.return_codes.iter().all(|c| matches!(
                c,
                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
            )),
            "broker {url} refused subscription to {filter}: {:?}",
            ack.return_codes
        );
        let (tx, messages) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let message = ReceivedMessage {
                            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                            payload: publish.payload.to_vec(),
                        };
                        if tx.send(message).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Subscriber {
            client,
            messages,
            task,
        }
    }

    /// The next message, or `None` if none arrives within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<ReceivedMessage> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()
            .flatten()
    }

    /// Collects messages until `n` arrived or `timeout` passed; returns what arrived.
    pub async fn recv_n(&mut self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(message) => out.push(message),
                None => break,
            }
        }
        out
    }

    /// The underlying client, e.g. to publish from the same connection.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:18830"),
            ("127.0.0.1".into(), 18830)
        );
        assert_eq!(parse_url("tcp://localhost:1"), ("localhost".into(), 1));
        assert_eq!(parse_url("mqtt://broker"), ("broker".into(), 1883));
        assert_eq!(parse_url("127.0.0.1:9/x"), ("127.0.0.1".into(), 9));
        assert_eq!(
            parse_url("mqtts://localhost:8884"),
            ("localhost".into(), 8884)
        );
        assert_eq!(parse_url("ssl://broker"), ("broker".into(), 8883));
    }
}
