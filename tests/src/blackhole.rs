//! [`BlackholeKinesis`]: a **bench-only** Kinesis endpoint that answers `PutRecords` as Kinesis
//! does and keeps nothing, so a benchmark measures ksm's own ceiling rather than an emulator's.
//!
//! It is not an emulator and no test of ksm's behaviour may use it: it checks no signature,
//! knows no stream but the one it is started with, never throttles and stores no data. What it
//! does do, it does the way Kinesis does:
//!
//! - `ListShards` lists `shards` open shards splitting the 128-bit hash key range evenly
//!   (`shardId-000000000000`, ...), so ksm's shard map and pacing work as against a real
//!   stream;
//! - `PutRecords` answers every entry with a sequence number and the shard that the entry's
//!   partition key (MD5, as Kinesis hashes it) or explicit hash key maps to;
//! - any other operation gets a 400 `UnknownOperationException`.
//!
//! It counts requests, Kinesis records, the user records they carry (a KPL aggregate is read
//! back into its records with `ksm_host::aggregate`; a plain record is one), data bytes and PUT
//! payload units (25 KB of each Kinesis record's data and key, rounded up per record, as
//! Kinesis bills them), and aggregates it could not read back (a ksm bug: a consumer could not
//! read them either). It reads a send time out of each user record that carries one (see
//! [`sent_at`]), inside aggregates too: the time from publish to `PutRecords` arriving here is
//! the latency a benchmark reports. `GET /stats` returns the counters and latency percentiles
//! as JSON; `POST /reset` zeroes them.
//!
//! [`BlackholeKinesis::with_delay`] models the round trip to a real Kinesis: every `PutRecords`
//! answer waits that long (after the request is counted) on its own task, so requests on
//! separate connections overlap, as they do against Kinesis. `ListShards`, `/stats` and
//! `/reset` answer at once.
//!
//! Run it in a process of its own ([`BlackholeKinesis::serve`]) so that its CPU time is not
//! counted as ksm's or the load generator's.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::json;

/// Marks a bulk benchmark record: the 8 bytes after it are the publish time, nanoseconds
/// since the Unix epoch, little-endian.
pub const BULK_MARK: &[u8; 8] = b"KSMBENCH";

/// Marks the publish time inside an event record's JSON: `"sentAt":<ns since the epoch>`.
pub const EVENT_MARK: &[u8] = b"\"sentAt\":";

/// A PUT payload unit, as Kinesis bills them: 25 KB of a record's data and key.
pub const PAYLOAD_UNIT_BYTES: u64 = 25 * 1024;

/// Most latency samples kept between two resets (about 40 MB).
const MAX_SAMPLES: usize = 10_000_000;

/// What the blackhole has seen since it started or was last reset.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
pub struct BlackholeStats {
    /// `PutRecords` requests answered.
    pub requests: u64,
    /// Kinesis records accepted (an aggregate is one).
    pub records: u64,
    /// The records they carried (an aggregate's records each).
    #[serde(default)]
    pub user_records: u64,
    /// Kinesis record data bytes accepted (partition keys not counted).
    pub data_bytes: u64,
    /// Bytes as Kinesis counts them against a shard's 1 MiB/s: data plus partition keys.
    #[serde(default)]
    pub kinesis_bytes: u64,
    /// PUT payload units: each Kinesis record's data and key in 25 KB units, rounded up.
    #[serde(default)]
    pub payload_units: u64,
    /// Kinesis records that start as an aggregate does but do not read back as one (each
    /// counted as one user record).
    #[serde(default)]
    pub malformed_aggregates: u64,
    /// Records that carried a send time.
    pub latency_samples: u64,
    /// Median publish-to-`PutRecords` latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// Largest latency, microseconds.
    pub max_us: u64,
}

/// What [`BlackholeStats`] is made from, latency samples included.
#[derive(Default)]
struct Counters {
    requests: u64,
    records: u64,
    user_records: u64,
    data_bytes: u64,
    kinesis_bytes: u64,
    payload_units: u64,
    malformed_aggregates: u64,
    sequence: u64,
    latencies_us: Vec<u32>,
}

impl Counters {
    /// The counters, with the latency percentiles of the samples.
    fn stats(&self) -> BlackholeStats {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let at = |q: f64| {
            let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted.get(index).copied().map_or(0, u64::from)
        };
        BlackholeStats {
            requests: self.requests,
            records: self.records,
            user_records: self.user_records,
            data_bytes: self.data_bytes,
            kinesis_bytes: self.kinesis_bytes,
            payload_units: self.payload_units,
            malformed_aggregates: self.malformed_aggregates,
            latency_samples: sorted.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: sorted.last().copied().map_or(0, u64::from),
        }
    }
}

/// The bench-only Kinesis endpoint (see the module docs).
pub struct BlackholeKinesis {
    shards: Vec<Shard>,
    counters: Mutex<Counters>,
    /// How long each `PutRecords` answer waits: the modelled round trip.
    delay: Duration,
}

struct Shard {
    id: String,
    start: u128,
    end: u128,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PutRecordsRequest {
    records: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    data: String,
    partition_key: String,
    explicit_hash_key: Option<String>,
}

impl BlackholeKinesis {
    /// An endpoint whose one stream has `shards` open shards (at least 1).
    pub fn new(shards: u32) -> BlackholeKinesis {
        let count = u128::from(shards.max(1));
        let width = u128::MAX / count;
        let shards = (0..count)
            .map(|i| Shard {
                id: format!("shardId-{i:012}"),
                start: i * width,
                end: if i + 1 == count {
                    u128::MAX
                } else {
                    (i + 1) * width - 1
                },
            })
            .collect();
        BlackholeKinesis {
            shards,
            counters: Mutex::new(Counters::default()),
            delay: Duration::ZERO,
        }
    }

    /// Answers each `PutRecords` `delay` after it arrived (none by default), without holding
    /// up other connections' requests meanwhile.
    pub fn with_delay(mut self, delay: Duration) -> BlackholeKinesis {
        self.delay = delay;
        self
    }

    /// Serves HTTP/1.1 on `listener` until the process ends, on a current-thread runtime.
    pub fn serve(self, listener: TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let blackhole = Arc::new(self);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let blackhole = Arc::clone(&blackhole);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let blackhole = Arc::clone(&blackhole);
                        async move { Ok::<_, Infallible>(blackhole.answer(request).await) }
                    });
                    let _ = http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
            return error(
                StatusCode::BAD_REQUEST,
                "SerializationException",
                "unreadable body",
            );
        };
        match (&parts.method, parts.uri.path()) {
            (&Method::GET, "/stats") => {
                let stats = self.counters().stats();
                return respond(StatusCode::OK, json!(stats).to_string());
            }
            (&Method::POST, "/reset") => {
                *self.counters() = Counters::default();
                return respond(StatusCode::OK, "{}".to_owned());
            }
            _ => {}
        }
        let operation = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .and_then(|target| target.rsplit('.').next())
            .unwrap_or_default();
        match operation {
            "PutRecords" => {
                let answer = self.put_records(&body);
                // Not even a zero sleep without a delay: the timer would add up to a millisecond.
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                answer
            }
            "ListShards" => self.list_shards(),
            other => error(
                StatusCode::BAD_REQUEST,
                "UnknownOperationException",
                &format!("the bench-only blackhole endpoint does not serve `{other}`"),
            ),
        }
    }

    fn list_shards(&self) -> Response<Full<Bytes>> {
        let shards: Vec<_> = self
            .shards
            .iter()
            .map(|shard| {
                json!({
                    "ShardId": shard.id,
                    "HashKeyRange": {
                        "StartingHashKey": shard.start.to_string(),
                        "EndingHashKey": shard.end.to_string(),
                    },
                    "SequenceNumberRange": { "StartingSequenceNumber": "1" },
                })
            })
            .collect();
        respond(StatusCode::OK, json!({ "Shards": shards }).to_string())
    }

    fn put_records(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let request: PutRecordsRequest = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "SerializationException",
                    &e.to_string(),
                );
            }
        };
        let now = now_ns();
        let mut data_bytes = 0u64;
        let mut kinesis_bytes = 0u64;
        let mut payload_units = 0u64;
        let mut user_records = 0u64;
        let mut malformed_aggregates = 0u64;
        let mut latencies = Vec::with_capacity(request.records.len());
        let mut shards = Vec::with_capacity(request.records.len());
        for entry in &request.records {
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(&entry.data) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "SerializationException",
                    "bad base64",
                );
            };
            data_bytes += data.len() as u64;
            let size = (data.len() + entry.partition_key.len()) as u64;
            kinesis_bytes += size;
            payload_units += size.div_ceil(PAYLOAD_UNIT_BYTES);
            let mut note_latency = |data: &[u8]| {
                if let Some(sent) = sent_at(data) {
                    let micros = now.saturating_sub(sent) / 1000;
                    latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
            };
            match ksm_host::aggregate::deaggregate(&data) {
                Ok(Some(records)) => {
                    user_records += records.len() as u64;
                    records.iter().for_each(|record| note_latency(&record.data));
                }
                Ok(None) => {
                    user_records += 1;
                    note_latency(&data);
                }
                Err(_) => {
                    malformed_aggregates += 1;
                    user_records += 1;
                }
            }
            shards.push(self.shard_of(entry));
        }
        let first_sequence = {
            let mut counters = self.counters();
            counters.requests += 1;
            counters.records += request.records.len() as u64;
            counters.user_records += user_records;
            counters.data_bytes += data_bytes;
            counters.kinesis_bytes += kinesis_bytes;
            counters.payload_units += payload_units;
            counters.malformed_aggregates += malformed_aggregates;
            let room = MAX_SAMPLES.saturating_sub(counters.latencies_us.len());
            latencies.truncate(room);
            counters.latencies_us.extend(latencies);
            counters.sequence += request.records.len() as u64;
            counters.sequence - request.records.len() as u64
        };
        let results: Vec<_> = shards
            .iter()
            .zip(first_sequence..)
            .map(|(shard, sequence)| {
                json!({
                    "SequenceNumber": format!("{:056}", sequence),
                    "ShardId": self.shards[*shard].id,
                })
            })
            .collect();
        respond(
            StatusCode::OK,
            json!({ "FailedRecordCount": 0, "Records": results, "EncryptionType": "NONE" })
                .to_string(),
        )
    }

    fn shard_of(&self, entry: &Entry) -> usize {
        let hash = entry
            .explicit_hash_key
            .as_deref()
            .and_then(|key| key.parse::<u128>().ok())
            .unwrap_or_else(|| {
                u128::from_be_bytes(Md5::digest(entry.partition_key.as_bytes()).into())
            });
        self.shards.partition_point(|shard| shard.start <= hash) - 1
    }
}

/// The publish time a benchmark record carries, nanoseconds since the Unix epoch: after
/// [`BULK_MARK`] at the start of a bulk record, or after [`EVENT_MARK`] in an event's JSON.
pub fn sent_at(data: &[u8]) -> Option<u64> {
    if let Some(rest) = data.strip_prefix(BULK_MARK.as_slice()) {
        let bytes: [u8; 8] = rest.get(..8)?.try_into().ok()?;
        return Some(u64::from_le_bytes(bytes));
    }
    let at = data
        .windows(EVENT_MARK.len())
        .position(|window| window == EVENT_MARK)?;
    let digits = &data[at + EVENT_MARK.len()..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Now, in nanoseconds since the Unix epoch (the clock publishers stamp records with).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn respond(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amzn-requestid", "blackhole")
        .body(Full::new(Bytes::from(body)))
        .expect("a static response is valid")
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    respond(
        status,
        json!({ "__type": kind, "message": message }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::time::Instant;

    use super::*;

    /// Sends one Kinesis request (`Connection: close`) to the blackhole on `port` and returns
    /// the whole answer.
    fn call(port: u16, operation: &str, body: &str) -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             X-Amz-Target: Kinesis_20131202.{operation}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn a_delayed_answer_holds_up_no_other_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay = Duration::from_millis(300);
        let blackhole = BlackholeKinesis::new(2).with_delay(delay);
        std::thread::spawn(move || blackhole.serve(listener));
        let started = Instant::now();
        let requests: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    call(
                        port,
                        "PutRecords",
                        r#"{"Records":[{"Data":"eA==","PartitionKey":"1"}]}"#,
                    )
                })
            })
            .collect();
        for request in requests {
            let answer = request.join().unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let elapsed = started.elapsed();
        // One after the other, the four would take 1.2 s.
        assert!(
            elapsed >= delay && elapsed < 3 * delay,
            "four requests in {elapsed:?}"
        );
        let started = Instant::now();
        assert!(call(port, "ListShards", "{}").contains("shardId-000000000001"));
        assert!(started.elapsed() < delay, "ListShards waited");
    }

    #[test]
    fn reads_send_times_from_bulk_and_event_records() {
        let mut bulk = BULK_MARK.to_vec();
        bulk.extend_from_slice(&1_234_567_u64.to_le_bytes());
        bulk.extend_from_slice(b"padding");
        assert_eq!(sent_at(&bulk), Some(1_234_567));
        let event = br#"{"eventType":"bench","eventData":{"sentAt":98765,"pad":"x"}}"#;
        assert_eq!(sent_at(event), Some(98_765));
        assert_eq!(sent_at(b"{\"eventType\":\"other\"}"), None);
        assert_eq!(sent_at(b"KSMBENCH\x01"), None);
    }

    #[test]
    fn counts_an_aggregate_once_and_each_of_its_records_with_its_send_time() {
        use ksm_host::aggregate::{Aggregate, MAGIC};

        let blackhole = BlackholeKinesis::new(1);
        let event = |sent: u64| Bytes::from(format!(r#"{{"eventData":{{"sentAt":{sent}}}}}"#));
        let mut bulk = BULK_MARK.to_vec();
        bulk.extend_from_slice(&3_000_u64.to_le_bytes());
        let inner = [event(1_000), event(2_000), Bytes::from(bulk)];
        let aggregate = Aggregate::encode(inner.iter().map(|data| ("1001", None, data)));
        let big = vec![b'x'; 30 * 1024];
        let mut malformed = MAGIC.to_vec();
        malformed.extend_from_slice(&[0; 20]);
        let encode = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
        let body = json!({ "Records": [
            { "Data": encode(&aggregate), "PartitionKey": "1001" },
            { "Data": encode(&event(4_000)), "PartitionKey": "1002" },
            { "Data": encode(&big), "PartitionKey": "1003" },
            { "Data": encode(&malformed), "PartitionKey": "1004" },
        ]});
        let answer = blackhole.put_records(body.to_string().as_bytes());
        assert_eq!(answer.status(), StatusCode::OK);
        let stats = blackhole.counters().stats();
        assert_eq!(stats.requests, 1);
        assert_eq!(stats.records, 4);
        assert_eq!(stats.user_records, 3 + 1 + 1 + 1);
        assert_eq!(stats.malformed_aggregates, 1);
        // One unit each, but two for the 30 KB record.
        assert_eq!(stats.payload_units, 5);
        let data = aggregate.len() + event(4_000).len() + big.len() + malformed.len();
        assert_eq!(stats.data_bytes, data as u64);
        assert_eq!(stats.kinesis_bytes, data as u64 + 4 * 4);
        // The aggregate's three records and the plain event carry send times.
        assert_eq!(stats.latency_samples, 4);
    }

    #[test]
    fn shards_cover_the_hash_range_and_match_kinesis_hashing() {
        let blackhole = BlackholeKinesis::new(4);
        assert_eq!(blackhole.shards[0].start, 0);
        assert_eq!(blackhole.shards[3].end, u128::MAX);
        for pair in blackhole.shards.windows(2) {
            assert_eq!(pair[0].end + 1, pair[1].start);
        }
        let entry = |key: &str, explicit: Option<&str>| Entry {
            data: String::new(),
            partition_key: key.to_owned(),
            explicit_hash_key: explicit.map(str::to_owned),
        };
        // MD5("1001") = 0xb8c37e33...: in the third quarter of the range.
        assert_eq!(blackhole.shard_of(&entry("1001", None)), 2);
        assert_eq!(blackhole.shard_of(&entry("1001", Some("0"))), 0);
        let top = u128::MAX.to_string();
        assert_eq!(blackhole.shard_of(&entry("1001", Some(&top))), 3);
    }
}
