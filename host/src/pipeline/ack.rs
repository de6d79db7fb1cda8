//! Late acknowledgement: an MQTT message is acknowledged only when every part
//! of what it produced is safe (accepted by Kinesis or kept as a dead letter).
//!
//! A [`Settlement`] is one outstanding part. Cloning it with [`Settlement::part`]
//! adds a part; [`Settlement::settle`] marks one done. When the last part is
//! settled the message's acknowledgement is released. A part that is dropped
//! without being settled (shutdown, a failure) holds the acknowledgement back
//! for ever, so the broker redelivers the message: nothing is lost by accident.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What to do once a message is fully settled (send its PUBACK).
pub type OnSettled = Box<dyn FnOnce() + Send>;

struct Pending {
    remaining: AtomicUsize,
    withheld: AtomicBool,
    on_settled: Mutex<Option<OnSettled>>,
}

/// One outstanding part of a message's work.
#[must_use = "a settlement that is dropped unsettled keeps its message unacknowledged"]
pub struct Settlement {
    pending: Arc<Pending>,
}

impl Settlement {
    /// The first part of a message; `on_settled` runs when all parts are settled.
    pub fn new(on_settled: Option<OnSettled>) -> Self {
        Self {
            pending: Arc::new(Pending {
                remaining: AtomicUsize::new(1),
                withheld: AtomicBool::new(false),
                on_settled: Mutex::new(on_settled),
            }),
        }
    }

    /// Another outstanding part of the same message.
    pub fn part(&self) -> Settlement {
        self.pending.remaining.fetch_add(1, Ordering::AcqRel);
        Settlement {
            pending: self.pending.clone(),
        }
    }

    /// Never acknowledges the message: something it produced could not be
    /// made safe, so the broker must deliver it again.
    pub fn withhold(&self) {
        self.pending.withheld.store(true, Ordering::Release);
    }

    /// Marks this part done.
    pub fn settle(self) {
        if self.pending.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && !self.pending.withheld.load(Ordering::Acquire)
        {
            let on_settled = self
                .pending
                .on_settled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(on_settled) = on_settled {
                on_settled();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag() -> (Arc<AtomicBool>, Option<OnSettled>) {
        let done = Arc::new(AtomicBool::new(false));
        let set = done.clone();
        (
            done,
            Some(Box::new(move || set.store(true, Ordering::SeqCst))),
        )
    }

    #[test]
    fn settles_after_the_last_part() {
        let (done, on_settled) = flag();
        let first = Settlement::new(on_settled);
        let a = first.part();
        let b = first.part();
        first.settle();
        a.settle();
        assert!(!done.load(Ordering::SeqCst));
        b.settle();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn a_withheld_message_is_never_acknowledged() {
        let (done, on_settled) = flag();
        let first = Settlement::new(on_settled);
        first.withhold();
        first.settle();
        assert!(!done.load(Ordering::SeqCst));
    }

    #[test]
    fn a_dropped_part_holds_the_ack_back() {
        let (done, on_settled) = flag();
        let first = Settlement::new(on_settled);
        let lost = first.part();
        drop(lost);
        first.settle();
        assert!(!done.load(Ordering::SeqCst));
    }
}
