//! A small client for the admin API of a running host, used by
//! `ksm dead-letters`. The API listens on a local address and speaks plain
//! HTTP/1.1; one request per connection is all the CLI needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long the client waits to connect and for an answer.
const TIMEOUT: Duration = Duration::from_secs(30);

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
#[derive(Debug, Clone, Copy)]
pub struct AdminClient {
    addr: SocketAddr,
}

impl AdminClient {
    /// A client for the API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Sends `method path` and returns the body of a 2xx answer.
    pub fn call(&self, method: &str, path: &str) -> Result<String, AdminClientError> {
        match self.request(method, path)? {
            (status, body) if (200..300).contains(&status) => Ok(body),
            (status, body) => Err(AdminClientError::Status { status, body }),
        }
    }

    /// Sends `method path` and returns the status and body, whatever the status.
    pub fn request(&self, method: &str, path: &str) -> Result<(u16, String), AdminClientError> {
        let addr = self.addr;
        let unreachable = |source| AdminClientError::Unreachable { addr, source };
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(unreachable)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .map_err(unreachable)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(unreachable)?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or(AdminClientError::Garbled { addr })?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(AdminClientError::Garbled { addr })?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body).ok_or(AdminClientError::Garbled { addr })?
        } else {
            body.to_owned()
        };
        Ok((status, body))
    }
}

/// Joins the chunks of a chunked body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("5\r\nab").is_none());
    }
}
