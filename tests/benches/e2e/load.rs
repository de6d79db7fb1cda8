//! The load: QoS 1 publishers on their own threads (open loop at a set rate, or closed loop
//! bounded by what has been delivered end to end), and the broker-only baseline subscriber.
//!
//! Every record carries its publish time (see `ksm_tests::blackhole::sent_at`), so the
//! endpoint can tell publish-to-`PutRecords` latency.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ksm_tests::blackhole::{BULK_MARK, now_ns};

use crate::wire::{self, Incoming, PacketReader};

/// Messages one publisher connection may have unacknowledged by the broker.
const MAX_IN_FLIGHT: u64 = 1000;
/// Messages published and not yet taken by the consumer (ksm or the baseline subscriber)
/// that a closed loop allows. The broker queues these for the consumer, and Mosquitto 2.0.11
/// was seen dropping beyond about a thousand for a connected client whatever
/// `max_queued_messages` says, which the runs would report as lost records.
const MAX_QUEUED_AT_BROKER: u64 = 800;
/// Bytes a publisher gathers before it writes them to the socket.
const WRITE_CHUNK: usize = 64 * 1024;
/// Records per bulk message, per big bulk message, and bytes per bulk record.
pub const BULK_RECORDS: usize = 100;
const BIG_BULK_RECORDS: usize = 1000;
const BULK_RECORD_BYTES: usize = 200;
/// Filler that brings an event's MODE Event JSON to about 200 bytes.
const EVENT_PAD: &str = "ksm-bench-ksm-bench-ksm-bench-ksm";
/// The bulk data label the bench module forwards.
pub const BULK_LABEL: &str = "bench";
/// The event type the bench module subscribes to.
pub const EVENT_TYPE: &str = "bench";

/// What each message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A device event that becomes one record of about 200 bytes.
    Events,
    /// A bulk data payload of 100 records of 200 bytes.
    Bulk,
    /// A bulk data payload of 1000 records of 200 bytes (fills a spool with few messages).
    BigBulk,
}

impl Shape {
    /// Records one message turns into.
    pub fn records_per_message(self) -> u64 {
        match self {
            Shape::Events => 1,
            Shape::Bulk => BULK_RECORDS as u64,
            Shape::BigBulk => BIG_BULK_RECORDS as u64,
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Events => "events",
            Shape::Bulk => "bulk 100×200 B",
            Shape::BigBulk => "bulk 1000×200 B",
        }
    }

    fn topic(self, device: u64) -> String {
        match self {
            Shape::Events => format!("/devices/{device}/event"),
            Shape::Bulk | Shape::BigBulk => format!("/devices/{device}/bulkData/{BULK_LABEL}"),
        }
    }
}

/// Builds message payloads, stamping each with its publish time.
struct Payloads {
    shape: Shape,
    bulk: Vec<u8>,
    stamps: Vec<usize>,
}

impl Payloads {
    fn new(shape: Shape) -> Self {
        let mut bulk = Vec::new();
        let mut stamps = Vec::new();
        if shape != Shape::Events {
            bulk.extend_from_slice(&[0xa3, b'1', b'.', b'0']);
            for _ in 0..shape.records_per_message() {
                bulk.extend_from_slice(&[0xc4, BULK_RECORD_BYTES as u8]);
                bulk.extend_from_slice(BULK_MARK);
                stamps.push(bulk.len());
                bulk.resize(bulk.len() + BULK_RECORD_BYTES - BULK_MARK.len(), b'.');
            }
        }
        Self {
            shape,
            bulk,
            stamps,
        }
    }

    fn build(&mut self, seq: u64) -> &[u8] {
        let now = now_ns();
        match self.shape {
            Shape::Events => {
                self.bulk.clear();
                write!(
                    self.bulk,
                    r#"{{"eventType":"{EVENT_TYPE}","eventData":{{"sentAt":{now},"seq":{seq},"pad":"{EVENT_PAD}"}},"homeId":1}}"#
                )
                .expect("writing to a Vec cannot fail");
            }
            Shape::Bulk | Shape::BigBulk => {
                for &at in &self.stamps {
                    self.bulk[at..at + 8].copy_from_slice(&now.to_le_bytes());
                }
            }
        }
        &self.bulk
    }
}

/// How far the consumer has got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Messages taken from the broker.
    pub taken: u64,
    /// Records delivered at the far end.
    pub delivered_records: u64,
}

/// How fast publishers go.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as delivery allows: at most this many records published and not yet
    /// delivered at the far end (and at most [`MAX_QUEUED_AT_BROKER`] messages not yet taken
    /// from the broker).
    Closed {
        /// The end-to-end window, in records.
        window: u64,
    },
    /// A fixed rate, whatever happens downstream (open loop).
    Open {
        /// Messages per second, all publishers together.
        per_sec: f64,
    },
}

/// What publishers and the main thread share.
struct Shared {
    /// Messages to publish in all; publishers idle once they are out, until stopped.
    limit: u64,
    published: AtomicU64,
    taken: AtomicU64,
    delivered_records: AtomicU64,
    stop: AtomicBool,
}

/// Running publishers.
pub struct Load {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Load {
    /// Starts `publishers` connections publishing `shape` messages from `devices` devices
    /// (IDs from 1) to the broker on `port`, until stopped.
    pub fn start(port: u16, shape: Shape, pace: Pace, publishers: usize, devices: u64) -> Load {
        Load::start_limited(port, shape, pace, publishers, devices, u64::MAX)
    }

    /// Like [`Load::start`], publishing `messages` messages in all.
    pub fn start_limited(
        port: u16,
        shape: Shape,
        pace: Pace,
        publishers: usize,
        devices: u64,
        messages: u64,
    ) -> Load {
        let shared = Arc::new(Shared {
            limit: messages,
            published: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            delivered_records: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let started = Instant::now();
        let threads = (0..publishers)
            .map(|index| {
                let shared = Arc::clone(&shared);
                let publisher = Publisher {
                    port,
                    shape,
                    pace,
                    index: index as u64,
                    count: publishers as u64,
                    devices,
                    started,
                };
                std::thread::Builder::new()
                    .name(format!("publisher-{index}"))
                    .spawn(move || publisher.run(&shared))
                    .expect("start a publisher thread")
            })
            .collect();
        Load { shared, threads }
    }

    /// Tells closed-loop publishers how many messages the consumer has taken from the broker
    /// and how many records it has delivered.
    pub fn set_progress(&self, progress: Progress) {
        self.shared.taken.store(progress.taken, Ordering::Relaxed);
        self.shared
            .delivered_records
            .store(progress.delivered_records, Ordering::Relaxed);
    }

    /// Stops publishing, waits for the broker to acknowledge what was sent, and returns the
    /// number of messages published.
    pub fn stop(self) -> io::Result<u64> {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| io::Error::other("a publisher panicked"))??;
        }
        Ok(self.shared.published.load(Ordering::Relaxed))
    }
}

struct Publisher {
    port: u16,
    shape: Shape,
    pace: Pace,
    index: u64,
    count: u64,
    devices: u64,
    started: Instant,
}

impl Publisher {
    fn run(self, shared: &Shared) -> io::Result<()> {
        let mut stream = wire::connect(self.port, &format!("ksm-bench-pub-{}", self.index))?;
        let acked = Arc::new(AtomicU64::new(0));
        let reader = {
            let stream = stream.try_clone()?;
            let acked = Arc::clone(&acked);
            std::thread::spawn(move || count_acks(stream, &acked))
        };
        let mut payloads = Payloads::new(self.shape);
        let per_message = self.shape.records_per_message();
        let mut out = Vec::with_capacity(2 * WRITE_CHUNK);
        let mut sent = 0u64;
        let mut packet_id = 0u16;
        while !shared.stop.load(Ordering::Relaxed) {
            let seq = self.index + sent * self.count;
            let wait = match self.pace {
                Pace::Closed { window } => {
                    let published = shared.published.load(Ordering::Relaxed);
                    let taken = shared.taken.load(Ordering::Relaxed);
                    let delivered = shared.delivered_records.load(Ordering::Relaxed);
                    let full = (published * per_message).saturating_sub(delivered) >= window
                        || published.saturating_sub(taken) >= MAX_QUEUED_AT_BROKER;
                    full.then_some(Duration::from_micros(200))
                }
                Pace::Open { per_sec } => {
                    let due = Duration::from_secs_f64(seq as f64 / per_sec);
                    due.checked_sub(self.started.elapsed())
                        .filter(|wait| !wait.is_zero())
                }
            };
            let wait = wait.or_else(|| {
                (sent - acked.load(Ordering::Relaxed) >= MAX_IN_FLIGHT)
                    .then_some(Duration::from_micros(100))
            });
            if let Some(wait) = wait {
                flush(&mut stream, &mut out)?;
                std::thread::sleep(wait.min(Duration::from_millis(1)));
                continue;
            }
            let reserved =
                shared
                    .published
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |published| {
                        (published < shared.limit).then_some(published + 1)
                    });
            if reserved.is_err() {
                // Every message is out: wait to be stopped.
                flush(&mut stream, &mut out)?;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            let topic = self.shape.topic(1 + seq % self.devices);
            wire::put_publish(&mut out, &topic, packet_id, payloads.build(seq));
            sent += 1;
            if out.len() >= WRITE_CHUNK {
                flush(&mut stream, &mut out)?;
            }
        }
        flush(&mut stream, &mut out)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::Relaxed) < sent {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the broker acknowledged {} of {sent} messages",
                    acked.load(Ordering::Relaxed)
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        stream.write_all(&[0xe0, 0])?;
        stream.shutdown(std::net::Shutdown::Both)?;
        let _ = reader.join();
        Ok(())
    }
}

fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out)?;
        out.clear();
    }
    Ok(())
}

fn count_acks(stream: TcpStream, acked: &AtomicU64) {
    let mut reader = PacketReader::new(stream);
    while let Ok(packet) = reader.next_incoming() {
        if let Incoming::PubAck = packet {
            acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The broker-only baseline: one QoS 1 subscriber that acknowledges and counts what a
/// host would get, and does nothing else with it.
pub struct BaselineSubscriber {
    records: Arc<AtomicU64>,
    socket: TcpStream,
    thread: JoinHandle<io::Result<()>>,
}

impl BaselineSubscriber {
    /// Subscribes to every device event and bulk data topic on the broker at `port`.
    pub fn start(port: u16, shape: Shape) -> io::Result<BaselineSubscriber> {
        let mut stream = wire::connect(port, "ksm-bench-baseline")?;
        wire::subscribe(&mut stream, &["/devices/+/event", "/devices/+/bulkData/+"])?;
        let socket = stream.try_clone()?;
        let records = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&records);
        let thread = std::thread::spawn(move || drain(stream, shape, &counter));
        Ok(BaselineSubscriber {
            records,
            socket,
            thread,
        })
    }

    /// Records received so far (messages × records per message).
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// How far the subscriber has got: it delivers what it takes.
    pub fn progress(&self, shape: Shape) -> Progress {
        let records = self.records();
        Progress {
            taken: records / shape.records_per_message(),
            delivered_records: records,
        }
    }

    /// Disconnects the subscriber.
    pub fn stop(self) -> io::Result<()> {
        self.socket.shutdown(std::net::Shutdown::Both)?;
        self.thread
            .join()
            .map_err(|_| io::Error::other("the baseline subscriber panicked"))?
    }
}

/// Acknowledges and counts until the socket is shut down.
fn drain(stream: TcpStream, shape: Shape, records: &AtomicU64) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = PacketReader::new(stream);
    let mut acks = Vec::new();
    loop {
        match reader.next_incoming() {
            Ok(Incoming::Publish { packet_id }) => {
                records.fetch_add(shape.records_per_message(), Ordering::Relaxed);
                if let Some(id) = packet_id {
                    wire::put_puback(&mut acks, id);
                }
            }
            Ok(_) => {}
            // Shut down by `stop`.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if !reader.has_buffered() && !acks.is_empty() {
            writer.write_all(&acks)?;
            acks.clear();
        }
    }
}
