//! The in-flight budget: the bytes of messages between the broker and the
//! store (payloads, and what the guests made of them) are counted against
//! `mqtt.inflight_max_mib`. A message takes its [`Charge`] before ksm reads
//! the next one from the broker; when the budget is spent, the source waits
//! for room, so ksm stops reading from the socket and TCP holds the broker
//! back. A charge is given back when its message is committed (or dropped),
//! which is what bounds ksm's memory whatever devices send.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A byte budget shared by everything in flight.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    used: Mutex<usize>,
    freed: Notify,
}

impl InFlight {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: Mutex::new(0),
            freed: Notify::new(),
        })
    }

    /// The budget, bytes.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        *self.lock()
    }

    /// Charges `bytes` if they fit now (anything fits an empty budget, so a
    /// message larger than the whole budget still goes, alone).
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        let mut used = self.lock();
        fits(*used, bytes, self.max).then(|| {
            *used += bytes;
            Charge {
                budget: self.clone(),
                bytes,
            }
        })
    }

    /// Charges `bytes`, waiting until they fit.
    pub async fn charge(self: &Arc<Self>, bytes: usize) -> Charge {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release in between wakes it.
            freed.as_mut().enable();
            if let Some(charge) = self.try_charge(bytes) {
                return charge;
            }
            freed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, bytes: usize) {
        let mut used = self.lock();
        *used = used.saturating_sub(bytes);
        drop(used);
        self.freed.notify_waiters();
    }
}

fn fits(used: usize, bytes: usize, max: usize) -> bool {
    used == 0 || used.saturating_add(bytes) <= max
}

/// Bytes one message holds against the budget; given back when dropped.
#[derive(Debug)]
#[must_use = "a charge is given back as soon as it is dropped"]
pub struct Charge {
    budget: Arc<InFlight>,
    bytes: usize,
}

impl Charge {
    /// Counts `bytes` more that the message now holds (what a guest made of
    /// it), without waiting: they are bounded by the guests' budgets.
    pub fn add(&mut self, bytes: usize) {
        *self.budget.lock() += bytes;
        self.bytes += bytes;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_charge_waits_for_room_and_gets_it_when_one_is_given_back() {
        let budget = InFlight::new(100);
        let first = budget.charge(60).await;
        let mut second = budget.charge(40).await;
        second.add(10);
        assert_eq!(budget.used(), 110);
        assert!(budget.try_charge(1).is_none());
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(50).await.bytes() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room yet");
        drop(first);
        assert_eq!(waiting.await.unwrap(), 50);
        drop(second);
        assert_eq!(budget.used(), 0, "every charge was given back");
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_goes_alone() {
        let budget = InFlight::new(100);
        let huge = budget.charge(1000).await;
        assert!(budget.try_charge(1).is_none());
        drop(huge);
        assert!(budget.try_charge(1000).is_some());
    }
}
