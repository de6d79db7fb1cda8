//! What KPL aggregation costs ksm per record, beside what sending records
//! plain costs: for one aggregate's worth of records, the size tracking the
//! sink does as each record joins (`Aggregate::add` after `bytes_with`) and
//! the encoding (tables, protobuf, MD5) into one PutRecords entry, against
//! building one PutRecords entry per record, as without aggregation.
//!
//! Cases (one criterion group each, with the functions `plain` and
//! `aggregated`), 200-byte records filling a 51200-byte aggregate:
//! - `events_1000_keys`: records of 1000 devices in turn (a table of many
//!   partition keys);
//! - `bulk_one_key`: records of one device (a table of one key).
//!
//! Throughput is in records. The aggregated entry is de-aggregated once
//! before timing and must give back the records, else the bench panics.
//! What aggregation saves downstream (entries, requests, payload units,
//! shards) is the e2e bench's `aggregation` case.
//!
//! ```text
//! cargo bench -p ksm-tests --bench aggregate [-- FILTER] [criterion flags]
//! ```

use std::hint::black_box;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use ksm_host::aggregate::{Aggregate, deaggregate};

/// The KPL's default largest aggregate, as ksm's `aggregation_max_bytes`.
const MAX_BYTES: usize = 51_200;
/// Each record's data.
const RECORD_BYTES: usize = 200;

/// A record: partition key and data.
struct Record {
    key: String,
    data: Bytes,
}

/// As many records of `keys` keys in turn as fill one aggregate.
fn one_aggregate(keys: usize) -> Vec<Record> {
    let mut aggregate = Aggregate::new();
    let mut records = Vec::new();
    loop {
        let key = (1000 + records.len() % keys).to_string();
        if aggregate.bytes_with(&key, None, RECORD_BYTES) + key.len() > MAX_BYTES {
            return records;
        }
        aggregate.add(&key, None, RECORD_BYTES);
        let data = Bytes::from(vec![b'x'; RECORD_BYTES]);
        records.push(Record { key, data });
    }
}

/// One PutRecords entry per record, as without aggregation.
fn plain(records: &[Record]) -> Vec<PutRecordsRequestEntry> {
    records
        .iter()
        .map(|record| {
            PutRecordsRequestEntry::builder()
                .data(Blob::from_maybe_shared(record.data.clone()))
                .partition_key(&record.key)
                .build()
                .expect("data and key")
        })
        .collect()
}

/// The records tracked into an aggregate as the sink does, then encoded
/// into one entry.
fn aggregated(records: &[Record]) -> PutRecordsRequestEntry {
    let mut aggregate = Aggregate::new();
    for record in records {
        let size = aggregate.bytes_with(&record.key, None, record.data.len());
        assert!(size <= MAX_BYTES);
        aggregate.add(&record.key, None, record.data.len());
    }
    let data = Aggregate::encode(records.iter().map(|r| (r.key.as_str(), None, &r.data)));
    PutRecordsRequestEntry::builder()
        .data(Blob::new(data))
        .partition_key(&records[0].key)
        .explicit_hash_key("0")
        .build()
        .expect("data and key")
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    for (name, keys) in [("events_1000_keys", 1000), ("bulk_one_key", 1)] {
        let records = one_aggregate(keys);
        let entry = aggregated(&records);
        let read = deaggregate(entry.data().as_ref())
            .expect("a valid aggregate")
            .expect("an aggregate");
        assert_eq!(read.len(), records.len());
        assert!(
            read.iter()
                .zip(&records)
                .all(|(r, o)| r.data == o.data && r.partition_key == o.key)
        );
        let mut group = criterion.benchmark_group(name);
        group.throughput(Throughput::Elements(records.len() as u64));
        group.bench_function("plain", |b| {
            b.iter(|| black_box(plain(black_box(&records))))
        });
        group.bench_function("aggregated", |b| {
            b.iter(|| black_box(aggregated(black_box(&records))))
        });
        group.finish();
        println!(
            "{name}: {} records of {RECORD_BYTES} B in one aggregate of {} bytes",
            records.len(),
            entry.data().as_ref().len()
        );
    }
    criterion.final_summary();
}
