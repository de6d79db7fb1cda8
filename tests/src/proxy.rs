//! [`RecordingProxy`]: an HTTP/1.1 proxy in front of an emulator that records every request.
//!
//! Point an SDK client (or the host, through its endpoint environment) at
//! [`RecordingProxy::endpoint`] instead of the emulator; the proxy forwards each request
//! unchanged (the `Host` header included, so SigV4 signatures stay as signed) and keeps a copy
//! of the request and of the emulator's response. Tests then assert on what went over the wire:
//! which access key signed a `PutRecords`, whether `AssumeRole` carried the `ExternalId`.
//!
//! The proxy runs on its own thread and Tokio runtime, so it works the same from synchronous
//! tests and from any async runtime. Client connections may be kept alive; each request is
//! forwarded on a fresh upstream connection and the response body is read whole (chunked or
//! not) and returned with a `Content-Length`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

/// One request that went through the proxy, with the emulator's response.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The HTTP method, e.g. `POST`.
    pub method: String,
    /// The path and query, e.g. `/`.
    pub path: String,
    /// The request headers in the order received; names are lower-case.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Vec<u8>,
    /// The response status (502 if the emulator could not be reached; the injected status for
    /// an injected error).
    pub response_status: u16,
    /// The response body (decoded from chunked transfer if it came that way).
    pub response_body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `X-Amz-Target` header of a JSON-protocol call, e.g. `Kinesis_20131202.PutRecords`.
    pub fn target(&self) -> Option<&str> {
        self.header("x-amz-target")
    }

    /// The operation name of an AWS call: the part of `X-Amz-Target` after the dot
    /// (`PutRecords`), or else the `Action` form parameter of a query-protocol call such as
    /// STS (`AssumeRole`).
    pub fn operation(&self) -> Option<String> {
        if let Some(target) = self.target() {
            return Some(target.rsplit('.').next().unwrap_or(target).to_owned());
        }
        self.form_param("Action")
    }

    /// True if this is the AWS operation `name` (see [`RecordedRequest::operation`]).
    pub fn is_operation(&self, name: &str) -> bool {
        self.operation().as_deref() == Some(name)
    }

    /// The access key id that signed the request: the `Credential=AKID/...` part of a SigV4
    /// `Authorization` header.
    pub fn access_key_id(&self) -> Option<&str> {
        let auth = self.header("authorization")?;
        let start = auth.find("Credential=")? + "Credential=".len();
        auth[start..].split('/').next()
    }

    /// The `X-Amz-Security-Token` header (present when signed with temporary credentials).
    pub fn security_token(&self) -> Option<&str> {
        self.header("x-amz-security-token")
    }

    /// The body as (lossy) UTF-8.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn body_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The response body as (lossy) UTF-8.
    pub fn response_text(&self) -> String {
        String::from_utf8_lossy(&self.response_body).into_owned()
    }

    /// The response body parsed as JSON, if it is JSON.
    pub fn response_json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.response_body).ok()
    }

    /// A parameter of a form-encoded (`application/x-www-form-urlencoded`) body, decoded, such
    /// as STS's `Action`, `RoleArn` or `ExternalId`.
    pub fn form_param(&self, name: &str) -> Option<String> {
        let body = std::str::from_utf8(&self.body).ok()?;
        body.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
    }

    /// For an STS `AssumeRole` call: the `AccessKeyId` of the credentials in the response.
    pub fn assumed_access_key_id(&self) -> Option<String> {
        let text = self.response_text();
        let start = text.find("<AccessKeyId>")? + "<AccessKeyId>".len();
        let end = start + text[start..].find("</AccessKeyId>")?;
        Some(text[start..end].trim().to_owned())
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one hexadecimal digit.
fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// An error the proxy answers itself, without forwarding, for matching requests.
#[derive(Debug, Clone)]
struct Injection {
    operation: String,
    remaining: usize,
    status: u16,
    body: String,
}

/// State shared between the proxy's thread and the test.
#[derive(Debug, Default)]
struct Shared {
    requests: Vec<RecordedRequest>,
    injections: VecDeque<Injection>,
}

/// An HTTP/1.1 proxy on `127.0.0.1:<free port>` that forwards to an upstream emulator and
/// records every request. Stopped when dropped.
#[derive(Debug)]
pub struct RecordingProxy {
    addr: SocketAddr,
    upstream: String,
    shared: Arc<Mutex<Shared>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RecordingProxy {
    /// Starts a proxy in front of `upstream` (an `http://host:port` endpoint such as
    /// [`crate::Moto::endpoint`]). It accepts connections as soon as this returns.
    pub fn start(upstream: &str) -> RecordingProxy {
        let upstream_uri: Uri = upstream
            .parse()
            .unwrap_or_else(|e| panic!("RecordingProxy upstream {upstream:?} is not a URI: {e}"));
        assert!(
            upstream_uri.scheme_str() == Some("http") && upstream_uri.authority().is_some(),
            "RecordingProxy upstream must be http://host:port, got {upstream:?}"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy listener");
        listener
            .set_nonblocking(true)
            .expect("make proxy listener non-blocking");
        let addr = listener.local_addr().expect("proxy listener address");
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("recording-proxy-{}", addr.port()))
            .spawn(move || serve(listener, upstream_uri, thread_shared, shutdown_rx))
            .expect("spawn the proxy thread");
        RecordingProxy {
            addr,
            upstream: upstream.to_owned(),
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    /// The proxy's endpoint URL, `http://127.0.0.1:<port>`, to give to clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The upstream endpoint the proxy forwards to.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Every request recorded so far, in the order their responses completed.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared).requests.clone()
    }

    /// The recorded requests for the AWS operation `name` (`PutRecords`, `AssumeRole`, ...).
    pub fn requests_for(&self, operation: &str) -> Vec<RecordedRequest> {
        lock(&self.shared)
            .requests
            .iter()
            .filter(|r| r.is_operation(operation))
            .cloned()
            .collect()
    }

    /// Forgets the requests recorded so far.
    pub fn clear(&self) {
        lock(&self.shared).requests.clear();
    }

    /// Waits until at least `n` requests for `operation` were recorded, or `timeout` passes;
    /// returns those recorded either way, so the test's assertion shows what came.
    pub async fn wait_for_operation(
        &self,
        operation: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.requests_for(operation);
            if found.len() >= n || Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Answers the next `count` requests for `operation` itself, with `status` and `body`,
    /// instead of forwarding them (they are still recorded). Injections queue up in order.
    ///
    /// For Kinesis, a throttling error is status 400 with the body
    /// `{"__type":"ProvisionedThroughputExceededException","message":"slow down"}`.
    pub fn inject_error(&self, operation: &str, count: usize, status: u16, body: &str) {
        lock(&self.shared).injections.push_back(Injection {
            operation: operation.to_owned(),
            remaining: count,
            status,
            body: body.to_owned(),
        });
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Locks the shared state, ignoring poisoning (a panicking test must still see the log).
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The proxy thread: a current-thread runtime accepting connections until shut down.
fn serve(
    listener: std::net::TcpListener,
    upstream: Uri,
    shared: Arc<Mutex<Shared>>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the proxy's Tokio runtime");
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).expect("register the proxy listener");
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let upstream = upstream.clone();
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    forward(req, upstream.clone(), client.clone(), Arc::clone(&shared))
                });
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// Headers that belong to one connection and are not forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// Copies end-to-end headers.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !is_hop_by_hop(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Forwards one request upstream (or answers an injected error) and records it.
async fn forward(
    req: Request<Incoming>,
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    shared: Arc<Mutex<Shared>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                format!("proxy: read body: {e}"),
            ));
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let mut record = RecordedRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        response_status: 0,
        response_body: Vec::new(),
    };

    let injected = {
        let mut state = lock(&shared);
        let operation = record.operation();
        let hit = state
            .injections
            .iter_mut()
            .find(|i| i.remaining > 0 && Some(&i.operation) == operation.as_ref());
        hit.map(|i| {
            i.remaining -= 1;
            (i.status, i.body.clone())
        })
    };
    let response = match injected {
        Some((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = plain(status, body);
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-amz-json-1.1"),
            );
            response
        }
        None => send_upstream(&parts, &path, body, &upstream, &client).await,
    };

    record.response_status = response.status().as_u16();
    record.response_body = response.body().clone().collect().await.map_or_else(
        |e: Infallible| match e {},
        |collected| collected.to_bytes().to_vec(),
    );
    lock(&shared).requests.push(record);
    Ok(response)
}

/// Sends the request to the emulator and reads its whole response.
async fn send_upstream(
    parts: &hyper::http::request::Parts,
    path: &str,
    body: Bytes,
    upstream: &Uri,
    client: &Client<HttpConnector, Full<Bytes>>,
) -> Response<Full<Bytes>> {
    let authority = upstream
        .authority()
        .map(|a| a.as_str())
        .unwrap_or("127.0.0.1");
    let uri: Uri = match format!("http://{authority}{path}").parse() {
        Ok(uri) => uri,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("proxy: bad path: {e}")),
    };
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .body(Full::new(body))
        .expect("a request from valid parts");
    copy_headers(&parts.headers, request.headers_mut());
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(e) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("proxy: upstream {upstream} failed: {e:?}"),
            );
        }
    };
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return plain(
                StatusCode::BAD_GATEWAY,
                format!("proxy: reading upstream response failed: {e}"),
            );
        }
    };
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    copy_headers(&parts.headers, out.headers_mut());
    out
}

/// A response with a text body.
fn plain(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.into())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_values() {
        assert_eq!(percent_decode("ext-42"), "ext-42");
        assert_eq!(
            percent_decode("arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fr"),
            "arn:aws:iam::1:role/r"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn parses_sigv4_credential() {
        let r = RecordedRequest {
            method: "POST".into(),
            path: "/".into(),
            headers: vec![(
                "authorization".into(),
                "AWS4-HMAC-SHA256 Credential=ASIAXYZ/20250101/us-east-1/kinesis/aws4_request, \
                 SignedHeaders=host, Signature=abc"
                    .into(),
            )],
            body: b"Action=AssumeRole&ExternalId=ext-42&RoleArn=arn%3Aaws".to_vec(),
            response_status: 200,
            response_body: b"<Credentials><AccessKeyId> ASIAQ </AccessKeyId>".to_vec(),
        };
        assert_eq!(r.access_key_id(), Some("ASIAXYZ"));
        assert_eq!(r.form_param("ExternalId").as_deref(), Some("ext-42"));
        assert_eq!(r.operation().as_deref(), Some("AssumeRole"));
        assert_eq!(r.assumed_access_key_id().as_deref(), Some("ASIAQ"));
    }
}
