//! What a guest's answer turns into, checked before the host allocates for
//! it: record counts within `component.max_records_per_call`, an event's
//! record bytes within `component.max_event_output_bytes`, a bulk answer's
//! spans inside the payload and apart from each other (so its records
//! together are never larger than the payload). An answer over its budget
//! is the guest's fault and costs its message: one dead letter, with the
//! reason. The guest's own text is cut to a few KiB
//! ([`crate::bindings::bounded`]).

use bytes::Bytes;

use crate::bindings::describe;
use crate::bindings::types::{BulkOutput, KinesisRecord, Span};
use crate::config::ComponentConfig;
use crate::runtime::{Answer, CallResult};
use crate::store::dead_letter::DeadLetter;

/// What one guest call may return.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most records, and apart from them most refused records, per call.
    pub max_records: usize,
    /// Most record bytes one event call may return.
    pub max_event_output_bytes: usize,
}

impl Budget {
    /// The budget the component settings give.
    pub fn from_config(config: &ComponentConfig) -> Self {
        Self {
            max_records: config.max_records_per_call as usize,
            max_event_output_bytes: config.max_event_output_bytes as usize,
        }
    }
}

/// What one module made of one message.
#[derive(Debug)]
pub enum Outcome {
    /// Records to put, with refused records to keep.
    Records(Vec<Produced>, Vec<DeadLetter>),
    /// The whole message is refused, for this reason.
    Refused(String),
}

/// A record the guest produced, before the Kinesis checks.
#[derive(Debug)]
pub struct Produced {
    /// Its data: the guest's bytes, or a view of the payload.
    pub data: Bytes,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key.
    pub explicit_hash_key: Option<String>,
}

/// A failed call: the message is refused with what the runtime says.
fn failed(error: &crate::runtime::RuntimeError, payload_len: usize) -> Outcome {
    Outcome::Refused(format!(
        "the module's component failed on this {payload_len}-byte message: {error}"
    ))
}

/// What a guest's answer to one message turns into.
pub fn outcome(
    result: CallResult<Answer>,
    payload: &Bytes,
    topic: &str,
    budget: Budget,
) -> Outcome {
    match result {
        Ok(Ok(Answer::Records(records))) => events(records, budget),
        Ok(Ok(Answer::Bulk(output))) => bulk(output, payload, topic, budget),
        Ok(Err(error)) => Outcome::Refused(describe(&error)),
        Err(error) => failed(&error, payload.len()),
    }
}

/// The answer to a device or home event.
fn events(records: Vec<KinesisRecord>, budget: Budget) -> Outcome {
    if records.len() > budget.max_records {
        return Outcome::Refused(format!(
            "the module's component returned {} records for one event, over \
             component.max_records_per_call ({})",
            records.len(),
            budget.max_records
        ));
    }
    let bytes: usize = records.iter().map(|r| r.data.len()).sum();
    if bytes > budget.max_event_output_bytes {
        return Outcome::Refused(format!(
            "the module's component returned {bytes} bytes of records for one event, over \
             component.max_event_output_bytes ({})",
            budget.max_event_output_bytes
        ));
    }
    let produced = records
        .into_iter()
        .map(|r| Produced {
            data: Bytes::from(r.data),
            partition_key: r.partition_key,
            explicit_hash_key: r.explicit_hash_key,
        })
        .collect();
    Outcome::Records(produced, Vec::new())
}

/// The answer to a bulk data payload: records as views of `payload`.
fn bulk(output: BulkOutput, payload: &Bytes, topic: &str, budget: Budget) -> Outcome {
    if let Err(reason) = check_spans(&output, payload.len(), budget) {
        return Outcome::Refused(format!("the module's component {reason}"));
    }
    let slice = |span: &Span| {
        let start = span.offset as usize;
        payload.slice(start..start + span.len as usize)
    };
    let kept: usize = output.records.iter().map(|r| r.data.len as usize).sum();
    // Records that keep only a small part of the payload are copied, so the
    // payload is not held in memory for their sake while they wait.
    let copy = kept.saturating_mul(2) < payload.len();
    let records = output
        .records
        .into_iter()
        .map(|record| {
            let data = slice(&record.data);
            Produced {
                data: if copy {
                    Bytes::copy_from_slice(&data)
                } else {
                    data
                },
                partition_key: record.partition_key,
                explicit_hash_key: record.explicit_hash_key,
            }
        })
        .collect();
    let letters = output
        .rejected
        .iter()
        .map(|rejected| {
            DeadLetter::new(
                describe(&rejected.reason),
                topic,
                Some(rejected.index),
                slice(&rejected.data),
            )
        })
        .collect();
    Outcome::Records(records, letters)
}

/// Checks a bulk answer's shape: how many records, and that every span
/// (records and refused records alike) lies inside the payload, apart from
/// the others.
fn check_spans(output: &BulkOutput, payload_len: usize, budget: Budget) -> Result<(), String> {
    for (count, what) in [
        (output.records.len(), "records"),
        (output.rejected.len(), "refused records"),
    ] {
        if count > budget.max_records {
            return Err(format!(
                "returned {count} {what} for one payload, over component.max_records_per_call ({})",
                budget.max_records
            ));
        }
    }
    let mut spans: Vec<(usize, usize)> =
        Vec::with_capacity(output.records.len() + output.rejected.len());
    let all = output
        .records
        .iter()
        .map(|r| r.data)
        .chain(output.rejected.iter().map(|r| r.data));
    for span in all {
        let start = span.offset as usize;
        let end = start + span.len as usize;
        if end > payload_len {
            return Err(format!(
                "returned a span {}+{} outside the {payload_len}-byte payload",
                span.offset, span.len
            ));
        }
        if start < end {
            spans.push((start, end));
        }
    }
    spans.sort_unstable();
    if let Some(pair) = spans.windows(2).find(|pair| pair[1].0 < pair[0].1) {
        return Err(format!(
            "returned spans that overlap (bytes {}..{} and {}..{}): a record's span must lie \
             apart from the others inside the payload",
            pair[0].0, pair[0].1, pair[1].0, pair[1].1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::GuestError;
    use crate::bindings::types::{BulkRecord, RejectedRecord, TooLarge};

    const BUDGET: Budget = Budget {
        max_records: 100,
        max_event_output_bytes: 1000,
    };

    fn span(offset: u32, len: u32) -> Span {
        Span { offset, len }
    }

    fn records(spans: &[Span]) -> BulkOutput {
        BulkOutput {
            records: spans
                .iter()
                .map(|&data| BulkRecord {
                    data,
                    partition_key: "1".into(),
                    explicit_hash_key: None,
                })
                .collect(),
            rejected: Vec::new(),
        }
    }

    fn refused_reason(outcome: Outcome) -> String {
        match outcome {
            Outcome::Refused(reason) => reason,
            Outcome::Records(..) => panic!("expected the message to be refused"),
        }
    }

    #[test]
    fn spans_apart_inside_the_payload_become_views_of_it() {
        let payload = Bytes::from_static(b"..abc..defg");
        let outcome = bulk(
            records(&[span(2, 3), span(7, 4), span(11, 0)]),
            &payload,
            "/t",
            BUDGET,
        );
        let Outcome::Records(records, letters) = outcome else {
            panic!("expected records");
        };
        let data: Vec<&[u8]> = records.iter().map(|r| &r.data[..]).collect();
        assert_eq!(data, [&b"abc"[..], b"defg", b""]);
        assert!(letters.is_empty());
    }

    #[test]
    fn overlapping_outside_or_too_many_spans_refuse_the_message() {
        let payload = Bytes::from(vec![0u8; 1000]);
        let whole = span(0, 1000);
        let overlap = refused_reason(bulk(records(&[whole; 3]), &payload, "/t", BUDGET));
        assert!(overlap.contains("overlap"), "{overlap}");
        let partly = refused_reason(bulk(
            records(&[span(0, 10), span(9, 10)]),
            &payload,
            "/t",
            BUDGET,
        ));
        assert!(partly.contains("bytes 0..10 and 9..19"), "{partly}");
        let outside = refused_reason(bulk(records(&[span(995, 10)]), &payload, "/t", BUDGET));
        assert!(
            outside.contains("outside the 1000-byte payload"),
            "{outside}"
        );
        let far = refused_reason(bulk(
            records(&[span(u32::MAX, u32::MAX)]),
            &payload,
            "/t",
            BUDGET,
        ));
        assert!(far.contains("outside"), "{far}");
        let many = refused_reason(bulk(records(&[span(0, 0); 101]), &payload, "/t", BUDGET));
        assert!(
            many.contains("101 records") && many.contains("max_records_per_call (100)"),
            "{many}"
        );
    }

    #[test]
    fn refused_records_share_the_span_rules() {
        let payload = Bytes::from(vec![0u8; 100]);
        let rejected = |data| RejectedRecord {
            index: 0,
            data,
            reason: GuestError::RecordTooLarge(TooLarge {
                index: 0,
                size: 100,
                limit: 1,
            }),
        };
        let mut output = records(&[span(0, 50)]);
        output.rejected = vec![rejected(span(40, 20))];
        let reason = refused_reason(bulk(output, &payload, "/t", BUDGET));
        assert!(reason.contains("overlap"), "{reason}");
        let mut output = records(&[]);
        output.rejected = vec![rejected(span(100, 10))];
        let reason = refused_reason(bulk(output, &payload, "/t", BUDGET));
        assert!(reason.contains("outside"), "{reason}");
    }

    #[test]
    fn a_small_part_of_a_big_payload_is_copied_out_of_it() {
        let payload = Bytes::from(vec![7u8; 1000]);
        let Outcome::Records(records, _) = bulk(records(&[span(0, 10)]), &payload, "/t", BUDGET)
        else {
            panic!("expected records");
        };
        assert_eq!(&records[0].data[..], &[7u8; 10]);
        assert_ne!(
            records[0].data.as_ptr(),
            payload.as_ptr(),
            "copied, so the payload can be freed"
        );
    }

    #[test]
    fn events_over_their_budget_refuse_the_message() {
        let record = |len: usize| KinesisRecord {
            data: vec![1; len],
            partition_key: "1".into(),
            explicit_hash_key: None,
        };
        let many = refused_reason(events((0..101).map(|_| record(1)).collect(), BUDGET));
        assert!(many.contains("101 records"), "{many}");
        let big = refused_reason(events(vec![record(600), record(600)], BUDGET));
        assert!(big.contains("1200 bytes"), "{big}");
        assert!(matches!(
            events(vec![record(1000)], BUDGET),
            Outcome::Records(records, _) if records.len() == 1
        ));
    }
}
