//! A small client for the admin API of a running host, used by
//! `ksm dead-letters`. It speaks HTTP/1.1, over TLS when the API does
//! (`admin.tls`), with the admin token when one is set; one request per
//! connection is all the CLI needs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::config::AdminConfig;

/// How long the client waits to connect and for an answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of an answer's body the client reads: a shown dead letter
/// of 16 MiB is about 22 MiB of JSON, a listing page at most about 6 MiB,
/// a module's whole activity log (10,000 bounded entries) less than 100 MiB.
const MAX_BODY_BYTES: usize = 128 * 1024 * 1024;
/// Most bytes of an answer's status line and headers.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The host could not be reached.
    #[error("cannot reach the ksm admin API at {addr} (is `ksm run` running?): {source}")]
    Unreachable {
        /// The API's address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer was not HTTP.
    #[error("the admin API at {addr} answered something that is not HTTP")]
    Garbled {
        /// The API's address.
        addr: SocketAddr,
    },
    /// The answer was larger than the client reads.
    #[error("the admin API at {addr} answered more than {max} bytes")]
    TooLarge {
        /// The API's address.
        addr: SocketAddr,
        /// The most the client reads.
        max: usize,
    },
    /// The API answered with an error status.
    #[error("{status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Its text.
        body: String,
    },
}

/// The admin API of one host.
#[derive(Debug, Clone)]
pub struct AdminClient {
    addr: SocketAddr,
    token: Option<String>,
    tls: Option<Arc<ClientConfig>>,
}

/// A connection to the API, plain or TLS.
trait Connection: Read + Write {}
impl<T: Read + Write> Connection for T {}

impl AdminClient {
    /// A client for the plain-HTTP API at `addr`, without a token.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            token: None,
            tls: None,
        }
    }

    /// The client the configuration of a host calls for: its address
    /// (loopback if it listens on every address), its token and, with
    /// `admin.tls`, HTTPS trusting exactly the API's own certificate (the
    /// first in its `cert_file`, whoever signed it).
    pub fn for_config(config: &AdminConfig) -> Result<Self, String> {
        let mut addr = config.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let mut client = Self::new(addr).with_token(config.resolve_token()?);
        if let Some(tls) = &config.tls {
            client.tls = Some(
                crate::tls::client::pinned("admin.tls.cert_file", &tls.cert_file)
                    .map_err(|error| error.to_string())?,
            );
        }
        Ok(client)
    }

    /// Sends `token` as `Authorization: Bearer` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// Speaks TLS with `config`, verifying the API's certificate for the IP
    /// address it is reached at.
    pub fn with_tls(mut self, config: Arc<ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    fn connect(&self) -> Result<Box<dyn Connection>, std::io::Error> {
        let stream = TcpStream::connect_timeout(&self.addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        Ok(match &self.tls {
            None => Box::new(stream),
            Some(config) => {
                let name = ServerName::IpAddress(self.addr.ip().into());
                let connection =
                    ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
                Box::new(StreamOwned::new(connection, stream))
            }
        })
    }

    /// Sends `method path` and returns the body of a 2xx answer.
    pub fn call(&self, method: &str, path: &str) -> Result<String, AdminClientError> {
        match self.request(method, path)? {
            (status, body) if (200..300).contains(&status) => Ok(body),
            (status, body) => Err(AdminClientError::Status { status, body }),
        }
    }

    /// Sends `method path` and returns the status and body, whatever the
    /// status. The body is read into one buffer (sized by the answer's
    /// `Content-Length`, of at most 128 MiB) and returned without copying.
    pub fn request(&self, method: &str, path: &str) -> Result<(u16, String), AdminClientError> {
        self.send(method, path, None)
    }

    /// Like [`AdminClient::request`], with `json` as the request's body.
    pub fn send_json(
        &self,
        method: &str,
        path: &str,
        json: &serde_json::Value,
    ) -> Result<(u16, String), AdminClientError> {
        self.send(method, path, Some(json.to_string().as_bytes()))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
    ) -> Result<(u16, String), AdminClientError> {
        let addr = self.addr;
        let unreachable = |source| AdminClientError::Unreachable { addr, source };
        let garbled = AdminClientError::Garbled { addr };
        let too_large = AdminClientError::TooLarge {
            addr,
            max: MAX_BODY_BYTES,
        };
        let mut stream = self.connect().map_err(unreachable)?;
        let authorization = self
            .token
            .as_ref()
            .map(|token| format!("Authorization: Bearer {token}\r\n"))
            .unwrap_or_default();
        let body = json.unwrap_or_default();
        let content_type = if json.is_some() {
            "Content-Type: application/json\r\n"
        } else {
            ""
        };
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush())
        .map_err(unreachable)?;
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let before = head.len();
            (&mut reader)
                .take(MAX_HEAD_BYTES as u64)
                .read_until(b'\n', &mut head)
                .map_err(unreachable)?;
            if head.len() == before || head.len() > MAX_HEAD_BYTES {
                return Err(garbled);
            }
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(AdminClientError::Garbled { addr })?;
        let header = |name: &str| {
            head.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let length: Option<usize> = match header("content-length") {
            Some(text) => Some(
                text.parse()
                    .map_err(|_| AdminClientError::Garbled { addr })?,
            ),
            None => None,
        };
        let mut body = Vec::new();
        match length {
            Some(length) if length > MAX_BODY_BYTES => return Err(too_large),
            Some(length) => {
                body.reserve_exact(length);
                (&mut reader)
                    .take(length as u64)
                    .read_to_end(&mut body)
                    .map_err(unreachable)?;
                if body.len() != length {
                    return Err(garbled);
                }
            }
            None => {
                (&mut reader)
                    .take(MAX_BODY_BYTES as u64 + 1)
                    .read_to_end(&mut body)
                    .map_err(unreachable)?;
                if body.len() > MAX_BODY_BYTES {
                    return Err(too_large);
                }
            }
        }
        if header("transfer-encoding").is_some_and(|value| value.contains("chunked")) {
            dechunk(&mut body).ok_or(AdminClientError::Garbled { addr })?;
        }
        let body = String::from_utf8(body)
            .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned());
        Ok((status, body))
    }
}

/// Joins the chunks of a chunked body, in place.
fn dechunk(body: &mut Vec<u8>) -> Option<()> {
    let mut read = 0;
    let mut written = 0;
    loop {
        let line = body.get(read..)?;
        let line_end = read + line.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&body[read..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        read = line_end + 2;
        if size == 0 {
            body.truncate(written);
            return Some(());
        }
        let end = read.checked_add(size)?;
        if body.get(end..end.checked_add(2)?)? != b"\r\n" {
            return None;
        }
        body.copy_within(read..end, written);
        written += size;
        read = end + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined_in_place() {
        let mut body = b"3\r\nabc\r\n2;ext\r\nde\r\n0\r\n\r\n".to_vec();
        dechunk(&mut body).unwrap();
        assert_eq!(body, b"abcde");
        assert!(dechunk(&mut b"5\r\nab".to_vec()).is_none());
        assert!(dechunk(&mut b"2\r\nabc\r\n0\r\n\r\n".to_vec()).is_none());
    }
}
