//! TLS with rustls on the aws-lc-rs provider: certificates and keys read
//! from PEM files, the client configuration for the broker
//! ([`client`]) and what a failed handshake means, in words a user can act
//! on, and the admin API's server configuration ([`server`]). Nothing here knows the MQTT client, so it survives a change of it.

pub mod client;
pub mod server;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

/// Why a TLS configuration could not be built from its files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which setting's file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file held no PEM item of the kind expected, or a broken one.
    #[error("{what} {} holds no {expected}{}", path.display(), detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Pem {
        /// Which setting's file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
        /// The parser's words, if it failed.
        detail: Option<String>,
    },
    /// The private key is not the key of the certificate.
    #[error(
        "the private key in {} does not belong to the certificate in {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// No root certificate to verify the peer with.
    #[error("{0}")]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsError {
    /// The error rustls gave for a certificate chain and key: a key that is
    /// not the certificate's is named by both files.
    fn of_key_pair(error: rustls::Error, cert: &Path, key: &Path) -> TlsError {
        match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                }
            }
            other => TlsError::Rustls(other),
        }
    }
}

/// The crypto provider every TLS configuration of ksm uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file, in order (a certificate, then its chain).
pub fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let pem = |detail: Option<String>| TlsError::Pem {
        what,
        path: path.to_owned(),
        expected: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        detail,
    };
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem(Some(error.to_string())))?;
    if certificates.is_empty() {
        return Err(pem(None));
    }
    Ok(certificates)
}

/// The private key in a PEM file: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn read_private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| TlsError::Pem {
        what,
        path: path.to_owned(),
        expected: "PEM private key (PKCS#8, RSA or EC)",
        detail: match error {
            rustls::pki_types::pem::Error::NoItemsFound => None,
            other => Some(other.to_string()),
        },
    })
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// What a certificate says of itself, for logs and `ksm validate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Its subject, e.g. `CN=ksm`.
    pub subject: String,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Valid from.
    pub not_before: OffsetDateTime,
    /// Valid until.
    pub not_after: OffsetDateTime,
}

impl CertificateSummary {
    /// Reads a DER certificate; `None` if it does not parse as X.509.
    pub fn of(certificate: &CertificateDer<'_>) -> Option<CertificateSummary> {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
        let validity = parsed.validity();
        Some(CertificateSummary {
            subject: parsed.subject().to_string(),
            serial: parsed
                .raw_serial()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect(),
            not_before: OffsetDateTime::from_unix_timestamp(validity.not_before.timestamp())
                .ok()?,
            not_after: OffsetDateTime::from_unix_timestamp(validity.not_after.timestamp()).ok()?,
        })
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = time::format_description::well_known::Rfc3339;
        write!(
            f,
            "subject {}, serial {}, valid from {} until {}",
            self.subject,
            self.serial,
            self.not_before.format(&format).map_err(|_| fmt::Error)?,
            self.not_after.format(&format).map_err(|_| fmt::Error)?
        )
    }
}
