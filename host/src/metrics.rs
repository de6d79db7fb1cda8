//! What `GET /metrics` shows, in the Prometheus text format: each module's
//! counters, spool, PutRecords requests, failures and latencies, guest
//! calls and traps and component reloads; and the host's MQTT connection.
//!
//! The figures live where they are counted (atomics, a few small maps) and
//! are read at each scrape by one collector, so counting costs no lock on
//! the data path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::module::{Module, ModuleSet};
use crate::pipeline::source::SourceStatus;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most distinct error codes kept per module; further codes count as `other`.
const MAX_ERROR_CODES: usize = 32;

/// Bucket bounds of latencies from the broker to Kinesis, seconds.
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Bucket bounds of PutRecords round trips, seconds.
const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of guest calls, seconds.
const GUEST_BUCKETS: &[f64] = &[
    0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1,
];

/// A histogram with fixed buckets, counted with atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self.bounds.partition_point(|bound| *bound < seconds);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per bucket: the encoder makes them cumulative.
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .chain([&f64::INFINITY])
            .zip(self.counts.iter())
            .map(|(bound, count)| (*bound, count.load(Ordering::Relaxed)))
            .collect();
        let total = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, total, &buckets, None)
    }
}

/// How a guest call ended badly.
#[derive(Debug, Clone, Copy)]
pub enum TrapKind {
    /// The guest trapped by itself (panic, `unreachable`, bad access).
    Trap,
    /// It ran past its deadline (or asked to sleep past it).
    Deadline,
    /// It went over its memory or table limit.
    Memory,
}

impl TrapKind {
    const ALL: [TrapKind; 3] = [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory];

    fn label(self) -> &'static str {
        match self {
            TrapKind::Trap => "trap",
            TrapKind::Deadline => "deadline",
            TrapKind::Memory => "memory",
        }
    }
}

/// One module's figures beside its [`crate::activity::Counters`].
#[derive(Debug)]
pub struct ModuleMetrics {
    /// PutRecords requests sent.
    pub put_requests: AtomicU64,
    /// Failed requests and failed records, by error code.
    put_failures: Mutex<BTreeMap<String, u64>>,
    /// PutRecords round trips.
    pub put_duration: Histogram,
    /// From ksm receiving a message to Kinesis accepting its record.
    pub delivery: Histogram,
    /// Guest calls.
    pub guest_call: Histogram,
    /// Guest calls that ended badly, by [`TrapKind`].
    guest_traps: [AtomicU64; 3],
    /// Components swapped in.
    pub reloads: AtomicU64,
    /// Guest instances recycled (memory past the high-water mark, or
    /// enough calls served).
    pub guest_recycles: AtomicU64,
}

impl Default for ModuleMetrics {
    fn default() -> Self {
        Self {
            put_requests: AtomicU64::new(0),
            put_failures: Mutex::new(BTreeMap::new()),
            put_duration: Histogram::new(REQUEST_BUCKETS),
            delivery: Histogram::new(DELIVERY_BUCKETS),
            guest_call: Histogram::new(GUEST_BUCKETS),
            guest_traps: Default::default(),
            reloads: AtomicU64::new(0),
            guest_recycles: AtomicU64::new(0),
        }
    }
}

impl ModuleMetrics {
    /// Counts `n` failures with Kinesis error code `code` (or a word such
    /// as `unreachable` for failures without one).
    pub fn put_failed(&self, code: &str, n: u64) {
        let mut failures = self.put_failures.lock().unwrap_or_else(|e| e.into_inner());
        let code = if failures.contains_key(code) || failures.len() < MAX_ERROR_CODES {
            code
        } else {
            "other"
        };
        *failures.entry(code.to_owned()).or_default() += n;
    }

    /// Failed requests and failed records, over every error code.
    pub fn kinesis_errors(&self) -> u64 {
        let failures = self.put_failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.values().sum()
    }

    /// Counts a guest call that ended badly.
    pub fn guest_trapped(&self, kind: TrapKind) {
        self.guest_traps[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads every figure at each scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    modules: Arc<ModuleSet>,
    source: Arc<SourceStatus>,
}

impl Metrics {
    /// The metrics of the modules running at each scrape and the MQTT source.
    pub fn new(modules: Arc<ModuleSet>, source: Arc<SourceStatus>) -> Self {
        Self { modules, source }
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.clone()));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

/// Writes one family: a descriptor, then a metric per label set.
fn family<'a, I>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    metrics: I,
) -> Result<(), std::fmt::Error>
where
    I: IntoIterator<Item = (Vec<(&'static str, &'a str)>, Value<'a>)>,
{
    let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in metrics {
        let encoder = family.encode_family(&labels)?;
        match value {
            Value::Counter(n) => ConstCounter::new(n).encode(encoder)?,
            Value::Gauge(n) => {
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(encoder)?
            }
            Value::Histogram(histogram) => histogram.encode(encoder)?,
        }
    }
    Ok(())
}

/// One metric per module, labelled with its ID.
fn per_module<'a>(
    modules: &'a [Arc<Module>],
    value: &dyn Fn(usize) -> Value<'a>,
) -> Vec<(Vec<(&'static str, &'a str)>, Value<'a>)> {
    modules
        .iter()
        .enumerate()
        .map(|(i, m)| (vec![("module", m.id.as_str())], value(i)))
        .collect()
}

/// Reads one counter of a module.
type ReadCounter = fn(&crate::activity::CounterSnapshot) -> u64;
/// Picks one histogram of a module.
type ReadHistogram = fn(&Module) -> &Histogram;

/// One metric's value.
enum Value<'a> {
    Counter(u64),
    Gauge(u64),
    Histogram(&'a Histogram),
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let modules = &self.modules.all();
        let snapshots: Vec<_> = modules.iter().map(|m| m.counters()).collect();
        let counters: [(&str, &str, ReadCounter); 9] = [
            (
                "ksm_messages_received",
                "MQTT messages handed to the module.",
                |c| c.received,
            ),
            (
                "ksm_messages_filtered",
                "Messages the module is not subscribed to.",
                |c| c.filtered,
            ),
            ("ksm_records_forwarded", "Records Kinesis accepted.", |c| {
                c.forwarded
            }),
            (
                "ksm_kinesis_records_forwarded",
                "Kinesis records Kinesis accepted; an aggregate counts once.",
                |c| c.kinesis_records,
            ),
            (
                "ksm_dead_letters",
                "Messages or records kept as dead letters.",
                |c| c.dead_lettered,
            ),
            (
                "ksm_records_spooled",
                "Records written to the spool.",
                |c| c.spooled,
            ),
            (
                "ksm_records_retried",
                "Records sent again after a failure.",
                |c| c.retried,
            ),
            ("ksm_records_throttled", "Records Kinesis throttled.", |c| {
                c.throttled
            }),
            (
                "ksm_records_reordered",
                "Records that landed after a later record of their key.",
                |c| c.reordered,
            ),
        ];
        for (name, help, read) in counters {
            family(
                &mut encoder,
                name,
                help,
                None,
                MetricType::Counter,
                per_module(modules, &|i| Value::Counter(read(&snapshots[i]))),
            )?;
        }
        family(
            &mut encoder,
            "ksm_spool_records",
            "Records in the spool, waiting for Kinesis.",
            None,
            MetricType::Gauge,
            per_module(modules, &|i| Value::Gauge(snapshots[i].spool_records)),
        )?;
        family(
            &mut encoder,
            "ksm_spool",
            "Bytes in the spool (data plus partition keys).",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            per_module(modules, &|i| Value::Gauge(snapshots[i].spool_bytes)),
        )?;
        family(
            &mut encoder,
            "ksm_spool_limit",
            "Most bytes the spool holds (storage.spool_max_mib).",
            Some(&Unit::Bytes),
            MetricType::Gauge,
            per_module(modules, &|i| Value::Gauge(modules[i].spool.max_bytes())),
        )?;
        family(
            &mut encoder,
            "ksm_putrecords_requests",
            "PutRecords requests sent.",
            None,
            MetricType::Counter,
            per_module(modules, &|i| {
                Value::Counter(modules[i].metrics.put_requests.load(Ordering::Relaxed))
            }),
        )?;
        let failures: Vec<BTreeMap<String, u64>> = modules
            .iter()
            .map(|m| {
                m.metrics
                    .put_failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect();
        family(
            &mut encoder,
            "ksm_putrecords_failures",
            "Failed PutRecords requests and records, by error code.",
            None,
            MetricType::Counter,
            modules.iter().zip(&failures).flat_map(|(m, codes)| {
                codes.iter().map(|(code, n)| {
                    (
                        vec![("module", m.id.as_str()), ("code", code.as_str())],
                        Value::Counter(*n),
                    )
                })
            }),
        )?;
        let histograms: [(&str, &str, ReadHistogram); 3] = [
            ("ksm_putrecords_duration", "PutRecords round trips.", |m| {
                &m.metrics.put_duration
            }),
            (
                "ksm_delivery_latency",
                "From ksm receiving a message to Kinesis accepting its record.",
                |m| &m.metrics.delivery,
            ),
            ("ksm_guest_call_duration", "Guest calls.", |m| {
                &m.metrics.guest_call
            }),
        ];
        for (name, help, read) in histograms {
            family(
                &mut encoder,
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
                per_module(modules, &|i| Value::Histogram(read(&modules[i]))),
            )?;
        }
        family(
            &mut encoder,
            "ksm_guest_traps",
            "Guest calls that ended badly, by kind: trap, deadline, memory.",
            None,
            MetricType::Counter,
            modules.iter().flat_map(|m| {
                TrapKind::ALL.into_iter().map(|kind| {
                    (
                        vec![("module", m.id.as_str()), ("kind", kind.label())],
                        Value::Counter(
                            m.metrics.guest_traps[kind as usize].load(Ordering::Relaxed),
                        ),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "ksm_guest_recycles",
            "Guest instances replaced by fresh ones between calls: memory past the high-water \
             mark, or enough calls served.",
            None,
            MetricType::Counter,
            per_module(modules, &|i| {
                Value::Counter(modules[i].metrics.guest_recycles.load(Ordering::Relaxed))
            }),
        )?;
        family(
            &mut encoder,
            "ksm_component_reloads",
            "Components swapped in while running.",
            None,
            MetricType::Counter,
            per_module(modules, &|i| {
                Value::Counter(modules[i].metrics.reloads.load(Ordering::Relaxed))
            }),
        )?;
        let source = &self.source;
        let host = [
            (
                "ksm_mqtt_connected",
                "1 while connected to the MQTT broker.",
                MetricType::Gauge,
                Value::Gauge(u64::from(source.is_connected())),
            ),
            (
                "ksm_mqtt_connection_failures",
                "Failed or lost connections to the MQTT broker.",
                MetricType::Counter,
                Value::Counter(source.connection_failures()),
            ),
            (
                "ksm_acknowledgements_pending",
                "QoS 1 messages received and not yet acknowledged to the broker.",
                MetricType::Gauge,
                Value::Gauge(source.unacknowledged()),
            ),
        ];
        for (name, help, kind, value) in host {
            family(&mut encoder, name, help, None, kind, [(Vec::new(), value)])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_into_cumulative_buckets() {
        let histogram = Histogram::new(&[0.01, 0.1]);
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_secs(1));
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct One(Histogram);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                let metric = encoder.encode_descriptor(
                    "t",
                    "test",
                    Some(&Unit::Seconds),
                    MetricType::Histogram,
                )?;
                self.0.encode(metric)
            }
        }
        registry.register_collector(Box::new(One(histogram)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("encoded");
        for line in [
            "t_seconds_bucket{le=\"0.01\"} 1",
            "t_seconds_bucket{le=\"0.1\"} 3",
            "t_seconds_bucket{le=\"+Inf\"} 4",
            "t_seconds_count 4",
            "t_seconds_sum 1.105",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn error_codes_are_bounded() {
        let metrics = ModuleMetrics::default();
        for i in 0..40 {
            metrics.put_failed(&format!("Code{i}"), 1);
        }
        metrics.put_failed("Code0", 1);
        let failures = metrics.put_failures.lock().expect("not poisoned");
        assert_eq!(failures.len(), MAX_ERROR_CODES + 1);
        assert_eq!(failures["Code0"], 2);
        assert_eq!(failures["other"], 8);
    }
}
