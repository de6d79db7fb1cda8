//! A small client for the admin API of a running host, used by
//! `ksm dead-letters`. The API listens on a local address and speaks plain
//! HTTP/1.1; one request per connection is all the CLI needs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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

    /// Sends `method path` and returns the status and body, whatever the
    /// status. The body is read into one buffer (sized by the answer's
    /// `Content-Length`, of at most 128 MiB) and returned without copying.
    pub fn request(&self, method: &str, path: &str) -> Result<(u16, String), AdminClientError> {
        let addr = self.addr;
        let unreachable = |source| AdminClientError::Unreachable { addr, source };
        let garbled = AdminClientError::Garbled { addr };
        let too_large = AdminClientError::TooLarge {
            addr,
            max: MAX_BODY_BYTES,
        };
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(unreachable)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
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
