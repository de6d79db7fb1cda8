//! The checks `ksm validate` makes beyond the configuration's own: the
//! files it names (certificates, keys, secrets) can be read (and a token is
//! long enough), a key belongs
//! to its certificate, no certificate has expired or expires within 30
//! days, and no secret is readable by other users.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use time::{Duration, OffsetDateTime};

use crate::config::Config;
use crate::tls::{CertificateSummary, client::broker_config, read_certificates};

/// A certificate expiring sooner than this is warned about.
const EXPIRY_WARNING: Duration = Duration::days(30);

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// ksm would not work with it.
    Error,
    /// ksm works, but should not be left so.
    Warning,
}

/// One thing found about a file the configuration names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The setting, e.g. `mqtt.tls.client_cert_file`.
    pub field: String,
    /// What was found, for people.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}: {}", self.field, self.message)
    }
}

/// Checks the files `config` (read from `config_path`) names, at `now`.
pub fn check(config: &Config, config_path: &Path, now: OffsetDateTime) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut found = |severity, field: &str, message: String| {
        findings.push(Finding {
            severity,
            field: field.to_owned(),
            message,
        })
    };
    let mqtt = &config.mqtt;
    if mqtt.url.starts_with("mqtts://") {
        match broker_config(&mqtt.tls) {
            Err(error) => found(Severity::Error, "mqtt.tls", error.to_string()),
            Ok(_) => {
                let certificates = [
                    ("mqtt.tls.ca_file", &mqtt.tls.ca_file),
                    ("mqtt.tls.client_cert_file", &mqtt.tls.client_cert_file),
                ];
                for (field, path) in certificates {
                    for (severity, message) in path
                        .as_deref()
                        .map(|path| validity(field, path, now))
                        .unwrap_or_default()
                    {
                        found(severity, field, message);
                    }
                }
            }
        }
        if let Some(message) = mqtt
            .tls
            .client_key_file
            .as_deref()
            .and_then(readable_by_others)
        {
            found(Severity::Warning, "mqtt.tls.client_key_file", message);
        }
    }
    if let Some(tls) = &config.admin.tls {
        for (severity, message) in validity("admin.tls.cert_file", &tls.cert_file, now) {
            found(severity, "admin.tls.cert_file", message);
        }
        if let Some(message) = readable_by_others(&tls.key_file) {
            found(Severity::Warning, "admin.tls.key_file", message);
        }
    }
    if let Err(message) = config.admin.resolve_token() {
        let field = match config.admin.token_file {
            Some(_) => "admin.token_file",
            None => crate::config::TOKEN_ENV,
        };
        found(Severity::Error, field, message);
    }
    if let Err(message) = mqtt.resolve_password() {
        found(Severity::Error, "mqtt.password_file", message);
    }
    let secrets = [
        ("mqtt.password_file", &mqtt.password_file),
        ("admin.token_file", &config.admin.token_file),
    ];
    for (field, path) in secrets {
        if let Some(message) = path.as_deref().and_then(readable_by_others) {
            found(Severity::Warning, field, message);
        }
    }
    if mqtt.password.is_some()
        && let Some(message) = readable_by_others(config_path)
    {
        found(
            Severity::Warning,
            "mqtt.password",
            format!(
                "the password is written in the configuration, and {message}; prefer \
                 mqtt.password_file or KSM_MQTT_PASSWORD"
            ),
        );
    }
    findings
}

/// Whether the certificates in `path` are valid at `now`, and for 30 days.
fn validity(field: &'static str, path: &Path, now: OffsetDateTime) -> Vec<(Severity, String)> {
    let certificates = match read_certificates(field, path) {
        Ok(certificates) => certificates,
        Err(error) => return vec![(Severity::Error, error.to_string())],
    };
    let date = |at: OffsetDateTime| at.date().to_string();
    certificates
        .iter()
        .filter_map(CertificateSummary::of)
        .filter_map(|certificate| {
            let subject = &certificate.subject;
            if certificate.not_after <= now {
                Some((
                    Severity::Error,
                    format!("{subject} expired on {}", date(certificate.not_after)),
                ))
            } else if certificate.not_before > now {
                Some((
                    Severity::Error,
                    format!(
                        "{subject} is valid only from {}",
                        date(certificate.not_before)
                    ),
                ))
            } else if certificate.not_after - now < EXPIRY_WARNING {
                Some((
                    Severity::Warning,
                    format!(
                        "{subject} expires on {}, in {} days",
                        date(certificate.not_after),
                        (certificate.not_after - now).whole_days()
                    ),
                ))
            } else {
                None
            }
        })
        .collect()
}

/// Says so if users other than the owner and group can read `path`.
fn readable_by_others(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "{} is readable by every user of this machine (mode {:o}); chmod o-r it",
            path.display(),
            mode & 0o777
        )
    })
}
