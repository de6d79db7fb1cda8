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
//!
//! # Fault modes
//!
//! Besides one-off injected errors ([`RecordingProxy::inject_error`]), the proxy can:
//!
//! - play an unreachable endpoint ([`RecordingProxy::set_down`]): every request, on a new or a
//!   kept-alive connection, is answered by closing the connection without a response;
//! - disturb `PutRecords` at random but reproducibly ([`RecordingProxy::set_faults`]): answer
//!   a whole request with a 500, fail single entries with
//!   `ProvisionedThroughputExceededException` (the emulator only sees the surviving entries,
//!   and the response is merged back into the client's order), or delay the response;
//! - poison some records ([`RecordingProxy::set_poison`]): every `PutRecords` carrying an entry
//!   whose data contain a marker is answered 500 `InternalFailure`, or just those entries fail
//!   with `ErrorCode: "InternalFailure"` while the others are forwarded, as a record Kinesis
//!   keeps failing would.
//!
//! Every `PutRecords` is counted ([`RecordingProxy::put_records_stats`]) and every entry the
//! emulator accepted is kept in order ([`RecordingProxy::accepted_records`]), so a test can
//! check that each record landed exactly once however often it was retried.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
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
use serde_json::{Map, Value};
use tokio::sync::oneshot;

/// The `X-Amz-Target` operation the fault modes apply to.
const PUT_RECORDS: &str = "PutRecords";

/// The body of an injected server error.
const INJECTED_SERVER_ERROR: &str = r#"{"__type":"InternalFailure","message":"injected"}"#;

/// The error code of an entry failed by the proxy.
const INJECTED_ERROR_CODE: &str = "ProvisionedThroughputExceededException";

/// The error message of an entry failed by the proxy.
const INJECTED_ERROR_MESSAGE: &str =
    "Rate exceeded for shard shardId-000000000000 in stream s under account 123456789012.";

/// The error code of a poisoned entry (see [`RecordingProxy::set_poison`]).
const POISON_ERROR_CODE: &str = "InternalFailure";

/// The error message of a poisoned entry.
const POISON_ERROR_MESSAGE: &str = "injected";

/// The content type of Kinesis' JSON protocol.
const AMZ_JSON: &str = "application/x-amz-json-1.1";

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

/// Random faults for `PutRecords` requests (see [`RecordingProxy::set_faults`]).
///
/// Each ratio is a probability between 0 and 1; the default injects nothing. The draws come
/// from a small PRNG seeded with `seed`, so the same requests in the same order meet the same
/// faults.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// The probability that one entry of a forwarded request fails with
    /// `ProvisionedThroughputExceededException` without reaching the emulator.
    pub fail_record_ratio: f64,
    /// The probability that a whole request is answered 500 `InternalFailure` without being
    /// forwarded.
    pub server_error_ratio: f64,
    /// The probability that the response to a forwarded request is delayed by `slow_by`.
    pub slow_ratio: f64,
    /// How long a slow response is delayed.
    pub slow_by: Duration,
    /// The PRNG seed.
    pub seed: u64,
}

/// How the proxy answers a `PutRecords` carrying poisoned entries (see
/// [`RecordingProxy::set_poison`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonAnswer {
    /// The whole request is answered 500 `{"__type":"InternalFailure","message":"injected"}`
    /// and not forwarded.
    ServerError,
    /// Only the poisoned entries fail, each with `ErrorCode: "InternalFailure"` in a 200
    /// answer; the other entries are forwarded.
    EntryError,
}

/// A poison fault: the `PutRecords` entries whose base64-decoded data contain `marker` (see
/// [`RecordingProxy::set_poison`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// The bytes that mark a poisoned entry's data (an empty marker poisons every entry).
    pub marker: Vec<u8>,
    /// How requests carrying poisoned entries are answered.
    pub answer: PoisonAnswer,
}

/// Counters of the `PutRecords` traffic through the proxy (see
/// [`RecordingProxy::put_records_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutRecordsStats {
    /// `PutRecords` requests received (not counting those refused while down).
    pub requests: u64,
    /// Entries in the bodies of those requests.
    pub records_received: u64,
    /// Entries sent on to the emulator, whether or not it accepted them.
    pub records_forwarded: u64,
    /// Entries the proxy failed itself (reported to the client as throttled).
    pub records_failed_injected: u64,
    /// Requests answered with an injected 500.
    pub server_errors_injected: u64,
    /// Responses delayed by [`Faults::slow_by`].
    pub slowed: u64,
    /// Requests (of any operation) and connections dropped without a response while down.
    pub refused_while_down: u64,
    /// Requests answered 500 because they carried a poisoned entry
    /// ([`PoisonAnswer::ServerError`]).
    pub poison_server_errors: u64,
    /// Poisoned entries failed with `InternalFailure` ([`PoisonAnswer::EntryError`]).
    pub poison_entries_failed: u64,
}

/// A `PutRecords` entry the emulator accepted (see [`RecordingProxy::accepted_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecord {
    /// The entry's partition key.
    pub partition_key: String,
    /// The entry's data, base64-decoded.
    pub data: Vec<u8>,
}

impl AcceptedRecord {
    /// The data as (lossy) UTF-8.
    pub fn data_text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// State shared between the proxy's thread and the test.
#[derive(Debug, Default)]
struct Shared {
    requests: Vec<RecordedRequest>,
    injections: VecDeque<Injection>,
    down: bool,
    faults: Faults,
    poison: Option<Poison>,
    rng: SplitMix64,
    stats: PutRecordsStats,
    accepted: Vec<AcceptedRecord>,
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

    /// Plays an unreachable endpoint while `down` is true: new connections are accepted and
    /// closed at once, and every request on a kept-alive connection is answered by closing the
    /// connection without a response, so clients see a connection error. Such requests are
    /// not recorded; [`PutRecordsStats::refused_while_down`] counts them.
    pub fn set_down(&self, down: bool) {
        lock(&self.shared).down = down;
    }

    /// True while [`RecordingProxy::set_down`] has the proxy down.
    pub fn is_down(&self) -> bool {
        lock(&self.shared).down
    }

    /// Applies `faults` to the `PutRecords` requests from now on and reseeds the PRNG with
    /// `faults.seed`; `Faults::default()` turns them off. Requests still answered by
    /// [`RecordingProxy::inject_error`] are not subject to them.
    ///
    /// For each request, in this order: with probability `server_error_ratio` it is answered
    /// 500 `{"__type":"InternalFailure","message":"injected"}` and not forwarded; otherwise
    /// each entry fails with probability `fail_record_ratio` (only the others are forwarded,
    /// and the response lists the failed ones as `ProvisionedThroughputExceededException` in
    /// their original places, with `FailedRecordCount` adjusted; if all fail, the emulator is
    /// not called); then, with probability `slow_ratio`, the response waits `slow_by`. A
    /// non-200 answer from the emulator is passed on unchanged.
    pub fn set_faults(&self, faults: Faults) {
        let mut state = lock(&self.shared);
        state.rng = SplitMix64::new(faults.seed);
        state.faults = faults;
    }

    /// Poisons the `PutRecords` entries whose base64-decoded data contain `poison.marker`, from
    /// now on; `None` cures them. A request carrying a poisoned entry is answered as
    /// `poison.answer` says: 500 `{"__type":"InternalFailure","message":"injected"}` without
    /// being forwarded, or a 200 in which just the poisoned entries carry
    /// `"ErrorCode": "InternalFailure"` (the other entries are forwarded and their results
    /// merged in). The random faults of [`RecordingProxy::set_faults`] are drawn first, as if
    /// there were no poison, and a random server error wins; an entry both throttled and
    /// poisoned is reported poisoned. Requests answered by [`RecordingProxy::inject_error`]
    /// are not subject to it.
    pub fn set_poison(&self, poison: Option<Poison>) {
        lock(&self.shared).poison = poison;
    }

    /// The `PutRecords` counters so far.
    pub fn put_records_stats(&self) -> PutRecordsStats {
        lock(&self.shared).stats
    }

    /// Every `PutRecords` entry the emulator accepted so far, in the order it accepted them
    /// (response order within a request, requests in the order their responses completed).
    pub fn accepted_records(&self) -> Vec<AcceptedRecord> {
        lock(&self.shared).accepted.clone()
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
            {
                let mut state = lock(&shared);
                if state.down {
                    state.stats.refused_while_down += 1;
                    drop(stream);
                    continue;
                }
            }
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

/// The service error that makes hyper close a connection without a response while the proxy
/// is down.
#[derive(Debug)]
struct Down;

impl fmt::Display for Down {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the proxy is down")
    }
}

impl std::error::Error for Down {}

/// Forwards one request upstream (or answers an injected error) and records it.
async fn forward(
    req: Request<Incoming>,
    upstream: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    shared: Arc<Mutex<Shared>>,
) -> Result<Response<Full<Bytes>>, Down> {
    {
        let mut state = lock(&shared);
        if state.down {
            state.stats.refused_while_down += 1;
            return Err(Down);
        }
    }
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

    let is_put_records = record.is_operation(PUT_RECORDS);
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
    if injected.is_some() && is_put_records {
        let entries = record
            .body_json()
            .as_ref()
            .and_then(put_records_entries)
            .map_or(0, |e| e.len());
        let mut state = lock(&shared);
        state.stats.requests += 1;
        state.stats.records_received += count(entries);
    }
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
        None if is_put_records => {
            put_records(&parts, &path, body, &upstream, &client, &shared).await
        }
        None => send_upstream(&parts, &path, body, &upstream, &client).await,
    };

    record.response_status = response.status().as_u16();
    record.response_body = body_bytes(response.body().clone()).await.to_vec();
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

/// A `PutRecords` request with the faults of [`RecordingProxy::set_faults`] applied; counts
/// it and records the entries the emulator accepted.
async fn put_records(
    parts: &hyper::http::request::Parts,
    path: &str,
    body: Bytes,
    upstream: &Uri,
    client: &Client<HttpConnector, Full<Bytes>>,
    shared: &Mutex<Shared>,
) -> Response<Full<Bytes>> {
    let request: Option<Value> = serde_json::from_slice(&body).ok();
    let Some(entries) = request.as_ref().and_then(put_records_entries).cloned() else {
        // Not a JSON body with `Records`: the emulator will say what is wrong with it.
        lock(shared).stats.requests += 1;
        return send_upstream(parts, path, body, upstream, client).await;
    };
    let (plan, slow_by, poison) = {
        let mut state = lock(shared);
        state.stats.requests += 1;
        state.stats.records_received += count(entries.len());
        let faults = state.faults.clone();
        (
            plan_faults(&mut state.rng, &faults, entries.len()),
            faults.slow_by,
            state.poison.clone(),
        )
    };
    if plan.server_error {
        lock(shared).stats.server_errors_injected += 1;
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            INJECTED_SERVER_ERROR.into(),
        );
    }
    let poisoned = poison
        .as_ref()
        .map_or_else(Vec::new, |p| poisoned(&entries, &p.marker));
    if !poisoned.is_empty() && poison.is_some_and(|p| p.answer == PoisonAnswer::ServerError) {
        lock(shared).stats.poison_server_errors += 1;
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            INJECTED_SERVER_ERROR.into(),
        );
    }
    let failed = entry_faults(&plan.failed, &poisoned);

    let survivors: Vec<Value> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| failed.binary_search_by_key(i, |(f, _)| *f).is_err())
        .map(|(_, entry)| entry.clone())
        .collect();
    let response = if !entries.is_empty() && survivors.is_empty() {
        let merged = merge_put_records_response(entries.len(), &failed, None);
        count_entry_faults(&mut lock(shared).stats, &failed);
        json_response(StatusCode::OK, merged.to_string())
    } else {
        let forwarded_body = if failed.is_empty() {
            body
        } else {
            let mut rewritten = request.unwrap_or_default();
            rewritten["Records"] = Value::Array(survivors.clone());
            Bytes::from(rewritten.to_string())
        };
        lock(shared).stats.records_forwarded += count(survivors.len());
        let response = send_upstream(parts, path, forwarded_body, upstream, client).await;
        accept_and_merge(response, &entries, &survivors, &failed, shared).await
    };
    if plan.slow {
        lock(shared).stats.slowed += 1;
        tokio::time::sleep(slow_by).await;
    }
    response
}

/// Records the entries the emulator accepted and, if the proxy failed some, merges them into
/// the emulator's (200) response. Any other response is returned unchanged.
async fn accept_and_merge(
    response: Response<Full<Bytes>>,
    entries: &[Value],
    survivors: &[Value],
    failed: &[(usize, EntryFault)],
    shared: &Mutex<Shared>,
) -> Response<Full<Bytes>> {
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = body_bytes(body).await;
    let Ok(upstream) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Full::new(bytes));
    };
    let results = upstream
        .get("Records")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let accepted = survivors
        .iter()
        .zip(results)
        .filter(|(_, result)| result.get("ErrorCode").is_none_or(Value::is_null))
        .map(|(entry, _)| accepted_record(entry));
    let mut state = lock(shared);
    state.accepted.extend(accepted);
    if failed.is_empty() {
        return Response::from_parts(parts, Full::new(bytes));
    }
    count_entry_faults(&mut state.stats, failed);
    drop(state);
    let merged = merge_put_records_response(entries.len(), failed, Some(&upstream));
    // The body changed: a checksum of the emulator's body would no longer match.
    parts.headers.remove("x-amz-crc32");
    Response::from_parts(parts, Full::new(Bytes::from(merged.to_string())))
}

/// The bytes of a whole body.
async fn body_bytes(body: Full<Bytes>) -> Bytes {
    body.collect()
        .await
        .map_or_else(|e: Infallible| match e {}, |collected| collected.to_bytes())
}

/// Why the proxy failed an entry itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryFault {
    /// A random fault: `ProvisionedThroughputExceededException`.
    Throttled,
    /// A poisoned entry: `InternalFailure`.
    Poison,
}

/// The indexes of the entries whose base64-decoded data contain `marker`, ascending.
fn poisoned(entries: &[Value], marker: &[u8]) -> Vec<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, entry)| contains(&accepted_record(entry).data, marker))
        .map(|(index, _)| index)
        .collect()
}

/// True if `needle` occurs in `haystack` (always for an empty needle).
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// The entries the proxy fails itself, ascending by index: the randomly throttled ones and the
/// poisoned ones (an entry that is both counts as poisoned).
fn entry_faults(throttled: &[usize], poisoned: &[usize]) -> Vec<(usize, EntryFault)> {
    let mut failed: Vec<(usize, EntryFault)> = throttled
        .iter()
        .filter(|index| poisoned.binary_search(index).is_err())
        .map(|&index| (index, EntryFault::Throttled))
        .chain(poisoned.iter().map(|&index| (index, EntryFault::Poison)))
        .collect();
    failed.sort_unstable_by_key(|(index, _)| *index);
    failed
}

/// Adds the entries the proxy failed itself to the counters.
fn count_entry_faults(stats: &mut PutRecordsStats, failed: &[(usize, EntryFault)]) {
    for (_, fault) in failed {
        match fault {
            EntryFault::Throttled => stats.records_failed_injected += 1,
            EntryFault::Poison => stats.poison_entries_failed += 1,
        }
    }
}

/// The `Records` array of a `PutRecords` request body.
fn put_records_entries(body: &Value) -> Option<&Vec<Value>> {
    body.get("Records").and_then(Value::as_array)
}

/// An accepted entry: its partition key and base64-decoded data (the raw text if it is not
/// base64).
fn accepted_record(entry: &Value) -> AcceptedRecord {
    let text = entry
        .get("Data")
        .and_then(Value::as_str)
        .unwrap_or_default();
    AcceptedRecord {
        partition_key: entry
            .get("PartitionKey")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        data: base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap_or_else(|_| text.as_bytes().to_vec()),
    }
}

/// A `usize` count as a `u64` counter increment.
fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// What the faults do to one `PutRecords` request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FaultPlan {
    /// Answer 500 without forwarding.
    server_error: bool,
    /// The indexes of the entries to fail, ascending (empty on a server error).
    failed: Vec<usize>,
    /// Delay the response.
    slow: bool,
}

/// Draws the faults for a request with `entries` entries: first the server error, then (if
/// none) one draw per entry and one for the delay.
fn plan_faults(rng: &mut SplitMix64, faults: &Faults, entries: usize) -> FaultPlan {
    if rng.chance(faults.server_error_ratio) {
        return FaultPlan {
            server_error: true,
            failed: Vec::new(),
            slow: false,
        };
    }
    let failed = (0..entries)
        .filter(|_| rng.chance(faults.fail_record_ratio))
        .collect();
    let slow = rng.chance(faults.slow_ratio);
    FaultPlan {
        server_error: false,
        failed,
        slow,
    }
}

/// The `PutRecords` response for a request of `total` entries of which the proxy failed those
/// at the (ascending) indexes of `failed`: the emulator's results for the others (`upstream`,
/// `None` if nothing was forwarded) in their original places, an injected
/// `ProvisionedThroughputExceededException` (or, for a poisoned entry, `InternalFailure`) in
/// the failed places, and `FailedRecordCount` the emulator's count plus the injected ones.
/// Other fields of `upstream` are kept. Should the emulator list fewer results than it was
/// sent entries, the missing ones count as `InternalFailure`.
fn merge_put_records_response(
    total: usize,
    failed: &[(usize, EntryFault)],
    upstream: Option<&Value>,
) -> Value {
    let mut results = upstream
        .and_then(|u| u.get("Records"))
        .and_then(Value::as_array)
        .map(|r| r.iter())
        .into_iter()
        .flatten();
    let mut merged = Vec::with_capacity(total);
    let mut failed_count = 0u64;
    for index in 0..total {
        let fault = failed
            .binary_search_by_key(&index, |(f, _)| *f)
            .ok()
            .map(|at| failed[at].1);
        let result = if let Some(fault) = fault {
            let (code, message) = match fault {
                EntryFault::Throttled => (INJECTED_ERROR_CODE, INJECTED_ERROR_MESSAGE),
                EntryFault::Poison => (POISON_ERROR_CODE, POISON_ERROR_MESSAGE),
            };
            serde_json::json!({ "ErrorCode": code, "ErrorMessage": message })
        } else {
            results.next().cloned().unwrap_or_else(|| {
                serde_json::json!({
                    "ErrorCode": "InternalFailure",
                    "ErrorMessage": "proxy: the emulator returned no result for this entry",
                })
            })
        };
        if result.get("ErrorCode").is_some_and(|c| !c.is_null()) {
            failed_count += 1;
        }
        merged.push(result);
    }
    let mut out = upstream
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(Map::new);
    out.insert("FailedRecordCount".into(), Value::from(failed_count));
    out.insert("Records".into(), Value::Array(merged));
    Value::Object(out)
}

/// A small deterministic PRNG (SplitMix64) for the fault draws.
#[derive(Debug, Clone, Default)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p` (never for `p <= 0`, always for `p >= 1`). Always draws, so
    /// the sequence does not depend on the ratios.
    fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

/// A JSON-protocol response with `body`.
fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = plain(status, body);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(AMZ_JSON),
    );
    response
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

    #[test]
    fn merges_injected_failures_into_the_original_order() {
        let upstream = serde_json::json!({
            "FailedRecordCount": 1,
            "Records": [
                {"SequenceNumber": "1", "ShardId": "shardId-000000000000"},
                {"ErrorCode": "InternalFailure", "ErrorMessage": "boom"},
                {"SequenceNumber": "3", "ShardId": "shardId-000000000001"},
            ],
            "EncryptionType": "NONE",
        });
        let failed = entry_faults(&[1, 4], &[]);
        let merged = merge_put_records_response(5, &failed, Some(&upstream));
        assert_eq!(merged["FailedRecordCount"], 3);
        assert_eq!(merged["EncryptionType"], "NONE");
        let records = merged["Records"].as_array().expect("Records");
        assert_eq!(records.len(), 5);
        assert_eq!(records[0]["SequenceNumber"], "1");
        assert_eq!(records[1]["ErrorCode"], INJECTED_ERROR_CODE);
        assert_eq!(records[1]["ErrorMessage"], INJECTED_ERROR_MESSAGE);
        assert_eq!(records[2]["ErrorCode"], "InternalFailure");
        assert_eq!(records[3]["SequenceNumber"], "3");
        assert_eq!(records[4]["ErrorCode"], INJECTED_ERROR_CODE);
    }

    #[test]
    fn synthesizes_a_response_when_every_entry_failed() {
        let merged = merge_put_records_response(2, &entry_faults(&[0, 1], &[]), None);
        assert_eq!(
            merged.to_string(),
            format!(
                r#"{{"FailedRecordCount":2,"Records":[{{"ErrorCode":"{INJECTED_ERROR_CODE}","ErrorMessage":"{INJECTED_ERROR_MESSAGE}"}},{{"ErrorCode":"{INJECTED_ERROR_CODE}","ErrorMessage":"{INJECTED_ERROR_MESSAGE}"}}]}}"#
            )
        );
        let nothing_failed = merge_put_records_response(
            1,
            &[],
            Some(
                &serde_json::json!({"FailedRecordCount": 0, "Records": [{"SequenceNumber": "9"}]}),
            ),
        );
        assert_eq!(nothing_failed["FailedRecordCount"], 0);
        assert_eq!(nothing_failed["Records"][0]["SequenceNumber"], "9");
        let short = merge_put_records_response(2, &[], Some(&serde_json::json!({"Records": []})));
        assert_eq!(short["FailedRecordCount"], 2);
    }

    #[test]
    fn poisoned_entries_are_found_by_their_decoded_data_and_reported_as_internal_failures() {
        let entry = |data: &[u8]| {
            serde_json::json!({
                "Data": base64::engine::general_purpose::STANDARD.encode(data),
                "PartitionKey": "k",
            })
        };
        let entries = [
            entry(b"fine"),
            entry(b"{\"x\":\"POISON!\"}"),
            entry(b"POISO"),
            entry(b"POISON"),
        ];
        assert_eq!(poisoned(&entries, b"POISON"), [1, 3]);
        assert_eq!(poisoned(&entries, b""), [0, 1, 2, 3]);
        assert!(poisoned(&entries, b"absent").is_empty());

        let failed = entry_faults(&[0, 1], &[1, 3]);
        assert_eq!(
            failed,
            [
                (0, EntryFault::Throttled),
                (1, EntryFault::Poison),
                (3, EntryFault::Poison)
            ]
        );
        let upstream =
            serde_json::json!({"FailedRecordCount": 0, "Records": [{"SequenceNumber": "7"}]});
        let merged = merge_put_records_response(4, &failed, Some(&upstream));
        assert_eq!(merged["FailedRecordCount"], 3);
        let records = merged["Records"].as_array().expect("Records");
        assert_eq!(records[0]["ErrorCode"], INJECTED_ERROR_CODE);
        assert_eq!(records[1]["ErrorCode"], "InternalFailure");
        assert_eq!(records[1]["ErrorMessage"], "injected");
        assert_eq!(records[2]["SequenceNumber"], "7");
        assert_eq!(records[3]["ErrorCode"], "InternalFailure");

        let mut stats = PutRecordsStats::default();
        count_entry_faults(&mut stats, &failed);
        assert_eq!(stats.records_failed_injected, 1);
        assert_eq!(stats.poison_entries_failed, 2);
    }

    #[test]
    fn fault_draws_are_deterministic() {
        let faults = Faults {
            fail_record_ratio: 0.3,
            server_error_ratio: 0.1,
            slow_ratio: 0.2,
            slow_by: Duration::from_millis(1),
            seed: 42,
        };
        let draw = |seed: u64| {
            let mut rng = SplitMix64::new(seed);
            (0..50)
                .map(|_| plan_faults(&mut rng, &faults, 20))
                .collect::<Vec<_>>()
        };
        let first = draw(42);
        assert_eq!(first, draw(42));
        assert_ne!(first, draw(43));
        assert!(first.iter().any(|p| p.server_error));
        assert!(first.iter().any(|p| p.slow));
        for plan in &first {
            assert!(plan.failed.windows(2).all(|w| w[0] < w[1]));
            assert!(plan.failed.iter().all(|&i| i < 20));
        }
        let failed: usize = first.iter().map(|p| p.failed.len()).sum();
        let drawn = 20 * first.iter().filter(|p| !p.server_error).count();
        let ratio = failed as f64 / drawn as f64;
        assert!((0.2..0.4).contains(&ratio), "failed ratio {ratio}");

        let mut rng = SplitMix64::new(7);
        let none = plan_faults(&mut rng, &Faults::default(), 100);
        assert_eq!(
            none,
            FaultPlan {
                server_error: false,
                failed: Vec::new(),
                slow: false
            }
        );
        let all = Faults {
            fail_record_ratio: 1.0,
            ..Faults::default()
        };
        assert_eq!(plan_faults(&mut rng, &all, 3).failed, [0, 1, 2]);
    }

    #[test]
    fn splitmix64_matches_the_reference() {
        // First outputs of SplitMix64 seeded with 1234567 (from the reference implementation).
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
    }
}
