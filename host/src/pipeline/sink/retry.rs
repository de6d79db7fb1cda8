//! When to stop retrying a record that Kinesis keeps failing.
//!
//! Most failures say nothing about the record: throttling (the stream lacks
//! capacity), an unreachable endpoint (no answer at all) and stream-level
//! errors (a missing stream, denied access: the user must fix them) are
//! retried for as long as the spool holds the record. A server error
//! (`InternalFailure`, `ServiceUnavailable`, any 5xx, or such a code on one
//! entry of a 200 answer) may be the record's fault, but only counts against
//! it when it can be pinned on it, that is when the stream was mostly
//! healthy meanwhile (more requests answered with records accepted than
//! without, see [`Health`]), so that neither an outage nor a brown-out (most
//! requests failing) ever counts against anything:
//!
//! - an error code on the record's entry of a 200 answer counts when that
//!   answer accepted more records than it failed, or the stream was mostly
//!   healthy since the record's previous failure;
//! - a server error on an aggregate's entry never counts while the
//!   aggregate held several records: the backlog halves its records'
//!   aggregates until each travels alone, as for a request;
//! - a request-level server error counts only against a record that
//!   travelled alone, and only when the stream was mostly healthy since its
//!   previous failure. A multi-record request that fails so is narrowed down
//!   by the backlog instead (see [`super::backlog`]), halving the requests
//!   its keys may travel in until the culprit goes alone.
//!
//! [`Track`] follows one record's failures; once the counted ones reach
//! [`RetryLimits::max_attempts`], or span [`RetryLimits::max_failing`] with
//! at least two of them, the record is given up as a dead letter so that the
//! records after it can go. Failures that do not count neither add to the
//! row nor break it.

use std::time::{Duration, Instant};

use crate::config::KinesisConfig;

/// What kind of failure Kinesis reported, for a request or one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The stream lacks capacity (`ProvisionedThroughputExceededException`,
    /// `KMSThrottlingException`, `LimitExceededException`,
    /// `ThrottlingException`); never counts against a record.
    Throttled,
    /// No answer, or none that can be read: connection errors, timeouts,
    /// dispatch failures; never counts against a record.
    Unreachable,
    /// The stream or its permissions need fixing (`ResourceNotFoundException`,
    /// access denied, KMS): the data waits; never counts against a record.
    Stream,
    /// Kinesis refused the request's content (`InvalidArgumentException`):
    /// a record alone is a dead letter at once, several are sent one by one.
    Refused,
    /// A server error (`InternalFailure`, `ServiceUnavailable`, any 5xx, or
    /// an entry's error code other than throttling and KMS): counts against
    /// the record when it can be pinned on it.
    Server,
}

/// Why Kinesis failed a request or one of its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure it is.
    pub kind: FailureKind,
    /// What Kinesis said, e.g. `InternalFailure: We encountered an internal error`.
    pub detail: String,
}

impl Failure {
    /// A failure of `kind` with `detail`.
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// How long a record Kinesis keeps failing is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryLimits {
    /// Counted failures in a row after which the record is given up.
    pub max_attempts: u32,
    /// How long the counted failures may go on (at least two of them)
    /// before the record is given up.
    pub max_failing: Duration,
}

impl RetryLimits {
    /// The limits of `kinesis.record_max_attempts` and
    /// `kinesis.record_max_failing_secs`.
    pub fn from_config(config: &KinesisConfig) -> Self {
        Self {
            max_attempts: config.record_max_attempts,
            max_failing: Duration::from_secs(config.record_max_failing_secs),
        }
    }
}

/// How the stream's requests have gone so far: those answered with at
/// least one record accepted, and the others (failed whole, or with every
/// record failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    /// Requests that put at least one record.
    pub ok: u64,
    /// Requests that put none.
    pub failed: u64,
}

impl Health {
    /// Notes one answered request.
    pub fn note(&mut self, put_some: bool) {
        if put_some {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
    }

    /// True if, since `then`, more requests put records than did not.
    pub fn mostly_healthy_since(self, then: Health) -> bool {
        self.ok.saturating_sub(then.ok) > self.failed.saturating_sub(then.failed)
    }
}

/// Where a failure was reported, for [`counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The request as a whole failed; it carried `records` records.
    Request {
        /// How many records the request carried.
        records: usize,
    },
    /// The record's own entry of a 200 answer carried an error code.
    Entry {
        /// Whether that answer accepted more records than it failed.
        others_accepted: bool,
    },
    /// The entry of an aggregate that held other records too carried an
    /// error code: as for a request of several records, the backlog
    /// narrows it down instead.
    Aggregate,
}

/// Whether a failure counts against the record: only a server error that
/// can be pinned on it (see the module documentation). `healthy` says
/// whether the stream was mostly healthy since the record's previous
/// failure (false if it had none).
pub fn counts(kind: FailureKind, place: Place, healthy: bool) -> bool {
    kind == FailureKind::Server
        && match place {
            Place::Request { records } => records == 1 && healthy,
            Place::Entry { others_accepted } => others_accepted || healthy,
            Place::Aggregate => false,
        }
}

/// The failures of one record still waiting to be accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Track {
    /// How the stream's requests had gone just after this record's previous
    /// failure; `None` before its first.
    health_then: Option<Health>,
    /// Counted failures in a row.
    strikes: u32,
    /// When the first counted failure of the row was.
    first_strike: Option<Instant>,
    /// What Kinesis said the last counted time.
    last: String,
}

impl Track {
    /// Whether the stream was mostly healthy since this record's previous
    /// failure, `health` being how its requests have gone so far.
    pub fn healthy_since_previous_failure(&self, health: Health) -> bool {
        self.health_then
            .is_some_and(|then| health.mostly_healthy_since(then))
    }

    /// Notes a failure at `now`, `health` being how the stream's requests
    /// have gone so far, this one included. `counted` is Kinesis' words when
    /// the failure counts against the record, `None` when it does not.
    /// Returns the reason to give the record up as a dead letter, once the
    /// limits are reached.
    pub fn fail(
        &mut self,
        counted: Option<&str>,
        health: Health,
        now: Instant,
        limits: &RetryLimits,
    ) -> Option<String> {
        self.health_then = Some(health);
        let detail = counted?;
        self.strikes = self.strikes.saturating_add(1);
        let first = *self.first_strike.get_or_insert(now);
        detail.clone_into(&mut self.last);
        let failing = now.saturating_duration_since(first);
        if self.strikes >= limits.max_attempts {
            Some(format!(
                "Kinesis failed this record {} times in a row ({}) while other records went \
                 through; kept as a dead letter so the records after it can go",
                self.strikes, self.last
            ))
        } else if self.strikes >= 2 && failing >= limits.max_failing {
            Some(format!(
                "Kinesis kept failing this record for {} s, {} times in a row ({}), while other \
                 records went through; kept as a dead letter so the records after it can go",
                failing.as_secs(),
                self.strikes,
                self.last
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RetryLimits = RetryLimits {
        max_attempts: 5,
        max_failing: Duration::from_secs(300),
    };

    #[test]
    fn only_server_errors_pinned_on_the_record_count() {
        let alone = Place::Request { records: 1 };
        let crowd = Place::Request { records: 2 };
        let entry = |others_accepted| Place::Entry { others_accepted };
        for kind in [
            FailureKind::Throttled,
            FailureKind::Unreachable,
            FailureKind::Stream,
            FailureKind::Refused,
        ] {
            for place in [alone, crowd, entry(true), entry(false), Place::Aggregate] {
                assert!(!counts(kind, place, true), "{kind:?} at {place:?}");
            }
        }
        let server = FailureKind::Server;
        assert!(
            !counts(server, Place::Aggregate, true),
            "shared with others"
        );
        assert!(counts(server, alone, true));
        assert!(!counts(server, alone, false), "nothing else went through");
        assert!(!counts(server, crowd, true), "not pinned on one record");
        assert!(counts(server, entry(true), false));
        assert!(counts(server, entry(false), true));
        assert!(!counts(server, entry(false), false));
    }

    #[test]
    fn a_record_is_given_up_after_max_attempts_counted_failures() {
        let now = Instant::now();
        let mut track = Track::default();
        assert!(
            !track.healthy_since_previous_failure(Health::default()),
            "no failure yet"
        );
        for n in 1..LIMITS.max_attempts {
            let at = now + Duration::from_secs(u64::from(n));
            assert_eq!(
                track.fail(Some("InternalFailure: x"), Health::default(), at, &LIMITS),
                None
            );
            // Failures that do not count neither add up nor break the row.
            assert_eq!(track.fail(None, Health::default(), at, &LIMITS), None);
        }
        assert_eq!(track.strikes, LIMITS.max_attempts - 1);
        let reason = track
            .fail(
                Some("InternalFailure: boom"),
                Health::default(),
                now + Duration::from_secs(9),
                &LIMITS,
            )
            .expect("given up");
        assert_eq!(
            reason,
            "Kinesis failed this record 5 times in a row (InternalFailure: boom) while other \
             records went through; kept as a dead letter so the records after it can go"
        );
    }

    #[test]
    fn a_record_is_given_up_after_failing_for_max_failing_with_two_failures() {
        let now = Instant::now();
        let mut track = Track::default();
        let late = now + Duration::from_secs(3600);
        assert_eq!(track.fail(None, Health::default(), now, &LIMITS), None);
        assert_eq!(
            track.fail(None, Health::default(), late, &LIMITS),
            None,
            "never counted"
        );
        assert_eq!(
            track.fail(Some("InternalFailure: x"), Health::default(), late, &LIMITS),
            None
        );
        let almost = late + LIMITS.max_failing - Duration::from_secs(1);
        assert_eq!(
            track.fail(
                Some("InternalFailure: x"),
                Health::default(),
                almost,
                &LIMITS
            ),
            None
        );
        let reason = track
            .fail(
                Some("ServiceUnavailable: y"),
                Health::default(),
                late + LIMITS.max_failing,
                &LIMITS,
            )
            .expect("given up");
        assert!(
            reason.starts_with(
                "Kinesis kept failing this record for 300 s, 3 times in a row (ServiceUnavailable: y)"
            ),
            "{reason}"
        );
    }

    #[test]
    fn a_single_counted_failure_is_never_enough() {
        let now = Instant::now();
        let mut track = Track::default();
        let limits = RetryLimits {
            max_attempts: 2,
            max_failing: Duration::from_secs(1),
        };
        assert_eq!(track.fail(None, Health::default(), now, &limits), None);
        let much_later = now + Duration::from_secs(86_400);
        let then = Health { ok: 3, failed: 5 };
        assert_eq!(
            track.fail(Some("InternalFailure: x"), then, much_later, &limits),
            None
        );
        assert!(track.healthy_since_previous_failure(Health { ok: 5, failed: 6 }));
        assert!(
            !track.healthy_since_previous_failure(Health { ok: 5, failed: 7 }),
            "a brown-out: as many requests failed as went through"
        );
    }

    #[test]
    fn health_counts_requests_that_put_records_against_those_that_did_not() {
        let mut health = Health::default();
        let start = health;
        for n in 0..100 {
            health.note(n % 20 == 0);
        }
        assert!(!health.mostly_healthy_since(start), "95 % failing");
        let middle = health;
        for n in 0..10 {
            health.note(n != 0);
        }
        assert!(health.mostly_healthy_since(middle));
    }
}
