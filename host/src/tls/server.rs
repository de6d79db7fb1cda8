//! The TLS server configuration of the admin API (`admin.tls`).

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

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
        .map_err(|error| TlsError::of_key_pair(error, cert_file, key_file))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
