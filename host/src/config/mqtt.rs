//! The `[mqtt]` section: the broker, its URL, credentials and TLS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problem;

/// The environment variable that gives the MQTT password when the
/// configuration has neither `mqtt.password` nor `mqtt.password_file`.
pub const PASSWORD_ENV: &str = "KSM_MQTT_PASSWORD";

/// MQTT broker connection settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct MqttConfig {
    /// Broker URL, `mqtt://HOST[:PORT]` (port 1883) or `mqtts://HOST[:PORT]`
    /// (TLS, port 8883).
    pub url: String,
    /// Client ID. Fixed, so the broker keeps the session (and the messages
    /// that arrive while ksm is down) across restarts.
    pub client_id: String,
    /// User name, if the broker requires one.
    pub username: Option<String>,
    /// Password, if the broker requires one (prefer `password_file` or
    /// `KSM_MQTT_PASSWORD`).
    pub password: Option<String>,
    /// File holding the password (its first line), read at each connection.
    pub password_file: Option<PathBuf>,
    /// TLS settings for `mqtts://` brokers.
    pub tls: MqttTlsConfig,
    /// Keep-alive interval, seconds.
    pub keep_alive_secs: u64,
    /// How long the broker keeps the session while ksm is disconnected, seconds.
    pub session_expiry_secs: u32,
    /// Unacknowledged QoS 1 messages the broker may have in flight to ksm
    /// (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Largest MQTT packet accepted, bytes.
    pub max_packet_bytes: u32,
    /// Shared-subscription group: when set, ksm subscribes through
    /// `$share/{group}/...`, so several hosts in the group split the messages.
    pub shared_group: Option<String>,
    /// Most payload bytes held between the broker and the store (received,
    /// not yet committed); when full, ksm stops reading from the broker, MiB.
    pub inflight_max_mib: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            client_id: "ksm".to_owned(),
            username: None,
            password: None,
            password_file: None,
            tls: MqttTlsConfig::default(),
            keep_alive_secs: 30,
            session_expiry_secs: 7 * 24 * 3600,
            receive_maximum: 1000,
            max_packet_bytes: 16 * 1024 * 1024,
            shared_group: None,
            inflight_max_mib: 256,
        }
    }
}

/// TLS to the broker, used with `mqtts://` URLs. The broker's certificate is
/// always verified; no setting turns that off.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct MqttTlsConfig {
    /// PEM file of the CA certificates that may sign the broker's
    /// certificate; replaces the system's root certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM file of ksm's client certificate (and its chain), for mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, RSA or EC).
    pub client_key_file: Option<PathBuf>,
    /// The name the broker's certificate must be valid for, when it differs
    /// from the URL's host (e.g. a broker reached by IP address).
    pub server_name: Option<String>,
    /// ALPN protocols to offer; AWS IoT Core on port 443 needs
    /// `["x-amzn-mqtt-ca"]`.
    pub alpn: Vec<String>,
}

impl MqttTlsConfig {
    /// Whether any TLS setting is given.
    fn is_set(&self) -> bool {
        self.ca_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some()
            || self.server_name.is_some()
            || !self.alpn.is_empty()
    }
}

/// Where the broker is and whether it speaks TLS, from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

impl Broker {
    /// Parses `mqtt://HOST[:PORT]` (port 1883) or `mqtts://HOST[:PORT]` (8883).
    pub fn parse(url: &str) -> Result<Broker, String> {
        if url.is_empty() {
            return Err("required: broker URL, e.g. mqtt://127.0.0.1:1883".into());
        }
        let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (rest, true, 8883)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (rest, false, 1883)
        } else {
            return Err(format!(
                "`{url}` must start with mqtt:// or, for TLS, mqtts://"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("`{port}` is not a valid port"))?;
                (host, port)
            }
            _ => (rest, default_port),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("`{url}` has no valid host"));
        }
        Ok(Broker {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            tls,
        })
    }
}

impl MqttConfig {
    /// The password to connect with: the first line of `password_file`,
    /// else `password`, else `KSM_MQTT_PASSWORD`; read anew at each call.
    pub fn resolve_password(&self) -> Result<Option<String>, String> {
        if let Some(path) = &self.password_file {
            return super::read_secret_file(path).map(Some);
        }
        if self.password.is_some() {
            return Ok(self.password.clone());
        }
        Ok(std::env::var(PASSWORD_ENV).ok())
    }

    /// Reports every problem of the section.
    pub(super) fn validate(&self, problems: &mut Vec<Problem>) {
        let mut report = |field: &str, message: String| {
            problems.push(Problem {
                field: format!("mqtt.{field}"),
                message,
            })
        };
        let broker = Broker::parse(&self.url);
        if let Err(message) = &broker {
            report("url", message.clone());
        }
        if self.client_id.is_empty() {
            report("client_id", "must not be empty".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            report(
                "password_file",
                "give the password in one place: password_file or password, not both".into(),
            );
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            report(
                if self.password.is_some() {
                    "password"
                } else {
                    "password_file"
                },
                "needs mqtt.username".into(),
            );
        }
        if self.receive_maximum == 0 {
            report("receive_maximum", "must be at least 1".into());
        }
        if self.keep_alive_secs < 5 {
            report("keep_alive_secs", "must be at least 5".into());
        }
        if self.inflight_max_mib == 0 {
            report("inflight_max_mib", "must be at least 1".into());
        }
        if let Some(group) = &self.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            report(
                "shared_group",
                format!(
                    "`{group}` is not a share name: it must be non-empty without `/`, `+` or `#`"
                ),
            );
        }
        let tls = &self.tls;
        if matches!(broker, Ok(Broker { tls: false, .. })) && tls.is_set() {
            report(
                "tls",
                "is only used with an mqtts:// URL; change mqtt.url to mqtts://... or remove \
                 [mqtt.tls]"
                    .into(),
            );
        }
        match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(_), None) => report(
                "tls.client_key_file",
                "required with tls.client_cert_file: the client certificate's private key".into(),
            ),
            (None, Some(_)) => report(
                "tls.client_cert_file",
                "required with tls.client_key_file: the certificate of that key".into(),
            ),
            _ => {}
        }
        if let Some(name) = &tls.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            report(
                "tls.server_name",
                format!("`{name}` is not a DNS name or IP address"),
            );
        }
        if tls
            .alpn
            .iter()
            .any(|protocol| protocol.is_empty() || protocol.len() > 255)
        {
            report(
                "tls.alpn",
                "protocols must be 1 to 255 bytes, e.g. \"x-amzn-mqtt-ca\"".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_are_parsed() {
        let broker = |host: &str, port, tls| Broker {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            Broker::parse("mqtt://127.0.0.1:1884").unwrap(),
            broker("127.0.0.1", 1884, false)
        );
        assert_eq!(
            Broker::parse("mqtt://broker").unwrap(),
            broker("broker", 1883, false)
        );
        assert_eq!(
            Broker::parse("mqtts://abc-ats.iot.eu-west-1.amazonaws.com").unwrap(),
            broker("abc-ats.iot.eu-west-1.amazonaws.com", 8883, true)
        );
        assert_eq!(
            Broker::parse("mqtts://[::1]:443/").unwrap(),
            broker("::1", 443, true)
        );
        assert!(Broker::parse("mqtt://h:x").is_err());
        assert!(Broker::parse("tcp://h").is_err());
        assert!(Broker::parse("mqtts://").is_err());
    }

    fn problems(config: &MqttConfig) -> Vec<String> {
        let mut problems = Vec::new();
        config.validate(&mut problems);
        problems.into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn tls_settings_are_checked() {
        let mut config = MqttConfig {
            url: "mqtt://broker".into(),
            ..MqttConfig::default()
        };
        config.tls.client_cert_file = Some("client.pem".into());
        config.tls.server_name = Some("not a name".into());
        config.tls.alpn = vec![String::new()];
        assert_eq!(
            problems(&config),
            [
                "mqtt.tls",
                "mqtt.tls.client_key_file",
                "mqtt.tls.server_name",
                "mqtt.tls.alpn"
            ]
        );
        config.url = "mqtts://broker".into();
        config.tls.client_key_file = Some("client.key".into());
        config.tls.server_name = Some("broker.internal".into());
        config.tls.alpn = vec!["x-amzn-mqtt-ca".into()];
        assert!(problems(&config).is_empty(), "{:?}", problems(&config));
    }

    #[test]
    fn a_password_has_one_source_and_a_user() {
        let config = MqttConfig {
            url: "mqtt://broker".into(),
            password: Some("p".into()),
            password_file: Some("p.txt".into()),
            ..MqttConfig::default()
        };
        assert_eq!(problems(&config), ["mqtt.password_file", "mqtt.password"]);
    }
}
