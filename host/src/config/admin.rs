//! The `[admin]` section: where the admin API listens, its token and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problem;

/// The environment variable that gives the admin token when
/// `admin.token_file` is not set.
pub const TOKEN_ENV: &str = "KSM_ADMIN_TOKEN";

/// Fewest characters of an admin token.
const MIN_TOKEN_CHARS: usize = 16;

/// Admin HTTP API settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AdminConfig {
    /// Address the admin API listens on. Without a token, only a loopback
    /// address is allowed.
    pub listen: SocketAddr,
    /// File holding the bearer token (its first line) that every endpoint
    /// but `/api/health` requires; else `KSM_ADMIN_TOKEN`; else none.
    pub token_file: Option<PathBuf>,
    /// Serve the API over HTTPS.
    pub tls: Option<AdminTlsConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8686)),
            token_file: None,
            tls: None,
        }
    }
}

/// The admin API's certificate, for HTTPS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct AdminTlsConfig {
    /// PEM file of the server certificate (and its chain).
    pub cert_file: PathBuf,
    /// PEM file of its private key.
    pub key_file: PathBuf,
}

impl AdminConfig {
    /// The bearer token: the first line of `token_file`, else
    /// `KSM_ADMIN_TOKEN`, else none (the API then only listens on loopback).
    pub fn resolve_token(&self) -> Result<Option<String>, String> {
        let token = match &self.token_file {
            Some(path) => Some(super::read_secret_file(path)?),
            None => std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
        };
        if let Some(token) = &token
            && token.chars().count() < MIN_TOKEN_CHARS
        {
            return Err(format!(
                "the admin token must be at least {MIN_TOKEN_CHARS} characters (it has {})",
                token.chars().count()
            ));
        }
        Ok(token)
    }

    /// Whether a token is configured (`token_file`, or `KSM_ADMIN_TOKEN`);
    /// whether it can be read is [`AdminConfig::resolve_token`]'s to say.
    pub fn has_token(&self) -> bool {
        self.token_file.is_some() || std::env::var(TOKEN_ENV).is_ok_and(|t| !t.is_empty())
    }

    /// Reports every problem of the section (files are read at start and
    /// by `ksm validate`, not here).
    pub(super) fn validate(&self, problems: &mut Vec<Problem>) {
        let mut report = |field: &str, message: String| {
            problems.push(Problem {
                field: format!("admin.{field}"),
                message,
            })
        };
        if !self.has_token() && !self.listen.ip().is_loopback() {
            report(
                "listen",
                format!(
                    "{} is not a loopback address, and the API has no token: anyone who \
                     can reach it could purge and replay dead letters; set admin.token_file \
                     (or {TOKEN_ENV}), or listen on 127.0.0.1",
                    self.listen
                ),
            );
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.as_os_str().is_empty() {
                report(
                    "tls.cert_file",
                    "required: PEM file of the certificate".into(),
                );
            }
            if tls.key_file.as_os_str().is_empty() {
                report(
                    "tls.key_file",
                    "required: PEM file of its private key".into(),
                );
            }
        }
    }
}
