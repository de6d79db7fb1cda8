//! The TLS server configuration of the admin API (`admin.tls`).

use std::path::Path;
use std::sync::Arc;

use rustls::{Error, InconsistentKeys, ServerConfig};

use super::{TlsError, provider, read_certificates, read_private_key};

/// Builds the admin API's configuration from its certificate (and chain)
/// and key files, checked to belong together; HTTP/1.1 only.
pub fn admin_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates("admin.tls.cert_file", cert_file)?;
    let key = read_private_key("admin.tls.key_file", key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| match error {
            Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => TlsError::KeyMismatch {
                cert: cert_file.to_owned(),
                key: key_file.to_owned(),
            },
            other => TlsError::Rustls(other),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
