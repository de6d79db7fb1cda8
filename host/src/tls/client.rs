//! The TLS client configuration ksm connects to the broker with, built anew
//! from the files at each connection, and the words for a failed handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore,
    SignatureScheme,
};
use time::OffsetDateTime;

use super::{CertificateSummary, TlsError, provider, read_certificates, read_private_key};
use crate::config::MqttTlsConfig;

/// A client configuration, with what its client certificate says.
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// The rustls configuration.
    pub config: Arc<ClientConfig>,
    /// ksm's client certificate, when it has one (mutual TLS).
    pub client_certificate: Option<CertificateSummary>,
}

/// Builds the configuration from `tls`'s files: the CAs of `ca_file` (or
/// the system's roots), the client certificate and key (checked to belong
/// together), `server_name` and `alpn`. Certificate verification is always
/// on.
pub fn broker_config(tls: &MqttTlsConfig) -> Result<BrokerTls, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for certificate in read_certificates("mqtt.tls.ca_file", path)? {
                roots.add(certificate).map_err(|error| TlsError::Pem {
                    what: "mqtt.tls.ca_file",
                    path: path.clone(),
                    expected: "usable CA certificate",
                    detail: Some(error.to_string()),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(TlsError::NoRoots(
                    "no system root certificates found (install ca-certificates), and \
                     mqtt.tls.ca_file is not set"
                        .into(),
                ));
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| TlsError::NoRoots(format!("cannot verify with these roots: {error}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match &tls.server_name {
        Some(name) => Arc::new(NamedVerifier {
            inner: webpki,
            name: ServerName::try_from(name.clone()).map_err(|_| {
                TlsError::NoRoots(format!("`{name}` is not a DNS name or IP address"))
            })?,
        }),
        None => webpki,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let (mut config, client_certificate) = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certificates("mqtt.tls.client_cert_file", cert_path)?;
            let key = read_private_key("mqtt.tls.client_key_file", key_path)?;
            let summary = CertificateSummary::of(&chain[0]);
            let config = builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| TlsError::of_key_pair(error, cert_path, key_path))?;
            (config, summary)
        }
        _ => (builder.with_no_client_auth(), None),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(BrokerTls {
        config: Arc::new(config),
        client_certificate,
    })
}

/// A configuration without client certificate that trusts exactly the
/// first certificate in `path` (a server's own certificate file), whoever
/// signed it; for the admin API's client on the host's machine.
pub fn pinned(what: &'static str, path: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let certificate = read_certificates(what, path)?.swap_remove(0);
    let provider = provider();
    Ok(Arc::new(
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                certificate,
                provider,
            }))
            .with_no_client_auth(),
    ))
}

/// Accepts the one certificate it holds, and checks that the peer holds
/// its key (the handshake signature).
#[derive(Debug)]
struct PinnedVerifier {
    certificate: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::InvalidCertificate(CertificateError::UnknownIssuer))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the broker's certificate for a configured name instead of the
/// URL's host (`mqtt.tls.server_name`); everything else is webpki's.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _url_host: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a rustls error in the connection to the broker means, and what to
/// do; `None` if the chain of `error` holds no rustls error.
pub fn explain(
    error: &(dyn std::error::Error + 'static),
    client_certificate: Option<&CertificateSummary>,
) -> Option<String> {
    let mut source = Some(error);
    let tls = loop {
        let error = source?;
        if let Some(tls) = error.downcast_ref::<Error>() {
            break tls;
        }
        // An I/O error's `source()` skips the error it wraps.
        source = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    };
    let time = |at: UnixTime| {
        i64::try_from(at.as_secs())
            .ok()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "an unknown time".into())
    };
    let ours = client_certificate
        .map(|c| format!(" (ksm's certificate: {c})"))
        .unwrap_or_default();
    Some(match tls {
        Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer => "the broker's certificate is not signed by a CA \
                 ksm trusts: set mqtt.tls.ca_file to the CA that signed it"
                .to_owned(),
            CertificateError::NotValidForName => "the broker's certificate is not valid for the \
                 host ksm connects to: use a name the certificate holds in mqtt.url, or set \
                 mqtt.tls.server_name"
                .to_owned(),
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "the broker's certificate is not valid for {} (it names {}): use one of those \
                 names in mqtt.url, or set mqtt.tls.server_name",
                expected.to_str(),
                if presented.is_empty() {
                    "no host".to_owned()
                } else {
                    presented
                        .iter()
                        .map(|name| bare_name(name))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::Expired => "the broker's certificate has expired".to_owned(),
            CertificateError::ExpiredContext {
                time: now,
                not_after,
            } => format!(
                "the broker's certificate expired at {} (it is {} now)",
                time(*not_after),
                time(*now)
            ),
            CertificateError::NotValidYet => {
                "the broker's certificate is not valid yet: check this machine's clock".to_owned()
            }
            CertificateError::NotValidYetContext {
                time: now,
                not_before,
            } => format!(
                "the broker's certificate is valid only from {} (it is {} now): check the clocks",
                time(*not_before),
                time(*now)
            ),
            other => format!("the broker's certificate was refused: {other:?}"),
        },
        Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                "the broker requires a client certificate: set mqtt.tls.client_cert_file and \
                 mqtt.tls.client_key_file"
                    .to_owned()
            }
            AlertDescription::CertificateExpired => {
                format!("the broker refused ksm's client certificate: it has expired{ours}")
            }
            AlertDescription::UnknownCA => format!(
                "the broker does not trust the CA that signed ksm's client certificate{ours}"
            ),
            AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => {
                format!("the broker refused ksm's client certificate (TLS alert {alert:?}){ours}")
            }
            AlertDescription::NoApplicationProtocol => {
                "the broker speaks none of the protocols in mqtt.tls.alpn".to_owned()
            }
            other => format!("the broker ended the TLS handshake (TLS alert {other:?})"),
        },
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the broker's port does not answer in TLS: if it is a plain MQTT port, use mqtt:// \
             (or the broker's TLS port, usually 8883)"
                .to_owned()
        }
        other => format!("TLS with the broker failed: {other}"),
    })
}

/// A name as rustls presents it (`DnsName("broker")`, `IpAddress(10.0.0.1)`),
/// without the wrapping.
fn bare_name(presented: &str) -> &str {
    presented
        .split_once('(')
        .and_then(|(_, inner)| inner.strip_suffix(')'))
        .map_or(presented, |inner| inner.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_are_found_in_a_chain_and_explained() {
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let text = explain(&wrapped, None).expect("a rustls error in the chain");
        assert!(text.contains("mqtt.tls.ca_file"), "{text}");
        let plain = std::io::Error::other("refused");
        assert_eq!(explain(&plain, None), None);
        let alert = Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(
            explain(&alert, None)
                .expect("explained")
                .contains("client_cert_file")
        );
    }

    #[test]
    fn presented_names_lose_their_wrapping() {
        assert_eq!(bare_name("DnsName(\"wrong.example\")"), "wrong.example");
        assert_eq!(bare_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(bare_name("plain"), "plain");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = MqttTlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..MqttTlsConfig::default()
        };
        let error = broker_config(&tls).expect_err("no such file");
        let text = error.to_string();
        assert!(
            text.contains("mqtt.tls.ca_file") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }
}
