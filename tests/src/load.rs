//! [`LoadPublisher`]: a stream of numbered QoS 1 messages for fault tests, published from a
//! background task that rides out broker restarts and lost connections, and that knows exactly
//! which messages the broker acknowledged.
//!
//! Message `n` (0-based) goes to device `1 + n % devices` on `/devices/{device}/event` with the
//! payload `{"eventType":"load","eventData":{"id":n,"device":device},"homeId":1}`, so whatever reads the
//! messages downstream can tell which arrived, and how often.
//!
//! Each connection is a clean MQTT 5 session. The publisher learns the packet id rumqttc gives
//! each publish from the `Outgoing::Publish` events (they come in the order of the publish
//! calls), and counts a message as acknowledged only when the `PUBACK` for that packet id comes
//! back with `Success` or `NoMatchingSubscribers`. When a connection is lost, every message
//! sent on it and not yet acknowledged is published again on the next one: the broker may then
//! see a message twice (a test counts duplicates downstream), but none is lost.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event, EventLoop};

/// How long the publisher waits after a connection error before it reconnects.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// The longest the publisher sleeps while waiting for the next message to be due, so that
/// [`LoadPublisher::stop`] is noticed quickly.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// How long the publisher waits for its `DISCONNECT` to go out once everything is acked.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a [`LoadPublisher`] publishes, and how fast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// The number of devices: the device ids are `1..=devices`.
    pub devices: u64,
    /// The total number of messages, with ids `0..messages`.
    pub messages: u64,
    /// Open-loop pacing: message `n` is due `n / rate_per_sec` seconds after the start; 0
    /// publishes as fast as acknowledgements allow.
    pub rate_per_sec: u64,
    /// The most messages published and not yet acknowledged at any time (at least 1).
    pub max_in_flight: usize,
    /// The prefix of the MQTT client id (a unique suffix is added).
    pub client_id_prefix: String,
}

impl Default for LoadPlan {
    /// 100 messages over 10 devices, as fast as possible, 20 in flight.
    fn default() -> LoadPlan {
        LoadPlan {
            devices: 10,
            messages: 100,
            rate_per_sec: 0,
            max_in_flight: 20,
            client_id_prefix: "ksm-tests-load".to_owned(),
        }
    }
}

impl LoadPlan {
    /// The device message `n` belongs to: `1 + n % devices`.
    pub fn device(&self, n: u64) -> u64 {
        1 + n % self.devices.max(1)
    }

    /// The topic of message `n`: `/devices/{device}/event`.
    pub fn topic(&self, n: u64) -> String {
        format!("/devices/{}/event", self.device(n))
    }

    /// The payload of message `n`:
    /// `{"eventType":"load","eventData":{"id":n,"device":device},"homeId":1}` (the home ID
    /// lets hosts without a device registry accept it).
    pub fn payload(&self, n: u64) -> String {
        format!(
            r#"{{"eventType":"load","eventData":{{"id":{n},"device":{}}},"homeId":1}}"#,
            self.device(n)
        )
    }

    /// The message id in a payload made by [`LoadPlan::payload`] (or in a record the host
    /// made of one, if it kept `eventData.id`).
    pub fn id_of(payload: &serde_json::Value) -> Option<u64> {
        payload
            .pointer("/eventData/id")
            .and_then(serde_json::Value::as_u64)
    }

    /// When message `n` is due, counted from the start.
    fn due(&self, n: u64) -> Duration {
        if self.rate_per_sec == 0 {
            return Duration::ZERO;
        }
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.rate_per_sec);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Counters of a running [`LoadPublisher`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Publishes handed to the client, first attempts and re-publications alike.
    pub published_attempts: u64,
    /// Distinct messages the broker acknowledged.
    pub acked: u64,
    /// Connections made after the first one.
    pub reconnects: u64,
}

/// The outcome of [`LoadPublisher::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The ids of the messages the broker acknowledged.
    pub acked: BTreeSet<u64>,
    /// Publishes handed to the client, first attempts and re-publications alike.
    pub attempts: u64,
    /// Connections made after the first one.
    pub reconnects: u64,
    /// The time from [`LoadPublisher::start`] to the end of `finish`.
    pub elapsed: Duration,
}

impl LoadReport {
    /// The ids in `0..messages` that were not acknowledged.
    pub fn missing(&self, messages: u64) -> Vec<u64> {
        (0..messages).filter(|n| !self.acked.contains(n)).collect()
    }
}

/// What the background task shares with the handle.
#[derive(Debug, Default)]
struct Progress {
    acked: BTreeSet<u64>,
    attempts: u64,
    reconnects: u64,
    /// Messages published at least once: the ids `0..started`.
    started: u64,
    /// The task has ended (all acknowledged, or it gave up).
    finished: bool,
}

/// Publishes a [`LoadPlan`] from a Tokio task (spawned on the current runtime) and records
/// which messages the broker acknowledged. The task is aborted when the publisher is dropped.
#[derive(Debug)]
pub struct LoadPublisher {
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    messages: u64,
    started_at: Instant,
}

impl LoadPublisher {
    /// Starts publishing `plan` to the broker at `url` (`mqtt://host:port`). Must be called
    /// within a Tokio runtime; returns at once (the connection is made by the task, which
    /// keeps retrying while the broker is unreachable).
    pub fn start(url: &str, plan: LoadPlan) -> LoadPublisher {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let messages = plan.messages;
        let options = crate::mqtt::options(url, &plan.client_id_prefix);
        let capacity = plan.max_in_flight.max(1) + 1;
        let (client, eventloop) = AsyncClient::new(options, capacity);
        let task = tokio::spawn(run(
            client,
            eventloop,
            plan,
            Arc::clone(&progress),
            Arc::clone(&stop),
        ));
        LoadPublisher {
            progress,
            stop,
            task,
            messages,
            started_at: Instant::now(),
        }
    }

    /// The ids of the messages acknowledged so far.
    pub fn acked(&self) -> BTreeSet<u64> {
        lock(&self.progress).acked.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> LoadStats {
        let progress = lock(&self.progress);
        LoadStats {
            published_attempts: progress.attempts,
            acked: u64::try_from(progress.acked.len()).unwrap_or(u64::MAX),
            reconnects: progress.reconnects,
        }
    }

    /// Stops publishing new messages; those already published are still re-published until
    /// acknowledged, and [`LoadPublisher::finish`] then waits for them only.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits until the broker acknowledged every message of the plan (after
    /// [`LoadPublisher::stop`]: every message published so far), or `timeout` passed, then
    /// stops the task and reports what was acknowledged.
    pub async fn finish(mut self, timeout: Duration) -> LoadReport {
        let deadline = Instant::now() + timeout;
        loop {
            let (done, finished) = {
                let progress = lock(&self.progress);
                let target = if self.stop.load(Ordering::SeqCst) {
                    progress.started
                } else {
                    self.messages
                };
                (acked_all(&progress.acked, target), progress.finished)
            };
            if done || finished || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop();
        // Once everything is acked, the task disconnects cleanly and ends by itself.
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        let progress = lock(&self.progress);
        LoadReport {
            acked: progress.acked.clone(),
            attempts: progress.attempts,
            reconnects: progress.reconnects,
            elapsed: self.started_at.elapsed(),
        }
    }
}

impl Drop for LoadPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Locks the progress, ignoring poisoning.
fn lock(progress: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// True if `acked` holds every id in `0..target` (it never holds others).
fn acked_all(acked: &BTreeSet<u64>, target: u64) -> bool {
    u64::try_from(acked.len()).unwrap_or(u64::MAX) >= target
}

/// Which message each publish of the current connection carries.
#[derive(Debug, Default)]
struct Tracker {
    /// Handed to the client, packet id not yet known (in publish order).
    queued: VecDeque<u64>,
    /// Written to the broker, waiting for the `PUBACK` of the packet id.
    in_flight: HashMap<u16, u64>,
    /// Held back by rumqttc because its packet id was still in use (sent after that `PUBACK`).
    collided: Option<(u16, u64)>,
}

impl Tracker {
    /// The messages published and not acknowledged.
    fn outstanding(&self) -> usize {
        self.queued.len() + self.in_flight.len() + usize::from(self.collided.is_some())
    }

    /// Forgets every message and returns them, to be published again.
    fn drain(&mut self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.queued.drain(..).collect();
        ids.extend(self.in_flight.drain().map(|(_, id)| id));
        ids.extend(self.collided.take().map(|(_, id)| id));
        ids
    }

    /// A publish went out with `pkid`: the collided one if it waited for that id, else the
    /// oldest queued.
    fn sent(&mut self, pkid: u16) {
        let id = match self.collided {
            Some((waiting, id)) if waiting == pkid => {
                self.collided = None;
                Some(id)
            }
            _ => self.queued.pop_front(),
        };
        if let Some(id) = id {
            self.in_flight.insert(pkid, id);
        }
    }

    /// rumqttc held the oldest queued publish back until `pkid` is acknowledged.
    fn await_ack(&mut self, pkid: u16) {
        if let Some(id) = self.queued.pop_front() {
            self.collided = Some((pkid, id));
        }
    }
}

/// The background task: publishes, tracks acknowledgements, reconnects, re-publishes.
async fn run(
    client: AsyncClient,
    mut eventloop: EventLoop,
    plan: LoadPlan,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
) {
    let start = Instant::now();
    let max_in_flight = plan.max_in_flight.max(1);
    let mut connected = false;
    let mut ever_connected = false;
    let mut tracker = Tracker::default();
    // Published before and not acknowledged: to be published again, lowest id first.
    let mut retry: BTreeSet<u64> = BTreeSet::new();
    let mut next_new: u64 = 0;
    loop {
        let stopped = stop.load(Ordering::SeqCst);
        let no_more_new = stopped || next_new >= plan.messages;
        if no_more_new && retry.is_empty() && tracker.outstanding() == 0 {
            break;
        }
        if connected {
            while tracker.outstanding() < max_in_flight {
                let id = match retry.pop_first() {
                    Some(id) => id,
                    None if !stopped
                        && next_new < plan.messages
                        && start.elapsed() >= plan.due(next_new) =>
                    {
                        next_new += 1;
                        lock(&progress).started = next_new;
                        next_new - 1
                    }
                    None => break,
                };
                match client.try_publish(plan.topic(id), QoS::AtLeastOnce, false, plan.payload(id))
                {
                    Ok(()) => {
                        tracker.queued.push_back(id);
                        lock(&progress).attempts += 1;
                    }
                    Err(_) => {
                        retry.insert(id);
                        break;
                    }
                }
            }
            if tracker.outstanding() == 0 {
                // Nothing to wait for: sleep until the next message is due (or a stop).
                let wait = plan.due(next_new).saturating_sub(start.elapsed());
                tokio::time::sleep(wait.clamp(Duration::from_millis(1), IDLE_TICK)).await;
                continue;
            }
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Whatever was sent on the previous connection and not acknowledged (the
                // events before this CONNACK were that connection's last ones) goes again.
                retry.extend(tracker.drain());
                connected = true;
                if ever_connected {
                    lock(&progress).reconnects += 1;
                }
                ever_connected = true;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => tracker.sent(pkid),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => tracker.await_ack(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(id) = tracker.in_flight.remove(&ack.pkid) {
                    match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            lock(&progress).acked.insert(id);
                        }
                        _ => {
                            retry.insert(id);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                connected = false;
                // The publisher re-publishes by itself: drop what rumqttc kept for the next
                // session (a clean session would drop it anyway) and any held-back publish.
                eventloop.pending.clear();
                eventloop.state.collision = None;
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
    disconnect(&client, &mut eventloop).await;
    lock(&progress).finished = true;
}

/// Sends DISCONNECT and drives the event loop until the connection closes (bounded).
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_topics_payloads_and_pacing() {
        let plan = LoadPlan {
            devices: 3,
            messages: 10,
            rate_per_sec: 4,
            ..LoadPlan::default()
        };
        assert_eq!(plan.device(0), 1);
        assert_eq!(plan.device(5), 3);
        assert_eq!(plan.topic(4), "/devices/2/event");
        let payload: serde_json::Value =
            serde_json::from_str(&plan.payload(7)).expect("JSON payload");
        assert_eq!(
            payload,
            serde_json::json!({"eventType": "load", "eventData": {"id": 7, "device": 2}, "homeId": 1})
        );
        assert_eq!(LoadPlan::id_of(&payload), Some(7));
        assert_eq!(plan.due(0), Duration::ZERO);
        assert_eq!(plan.due(6), Duration::from_millis(1500));
        let fast = LoadPlan::default();
        assert_eq!(fast.due(1_000_000), Duration::ZERO);
    }

    #[test]
    fn tracks_packet_ids_through_collisions_and_loss() {
        let mut tracker = Tracker::default();
        tracker.queued.extend([10, 11, 12]);
        tracker.sent(1);
        tracker.await_ack(1);
        assert_eq!(tracker.collided, Some((1, 11)));
        assert_eq!(tracker.outstanding(), 3);
        // The PUBACK for 1 frees the id; the held-back publish goes out with it.
        assert_eq!(tracker.in_flight.remove(&1), Some(10));
        tracker.sent(1);
        tracker.sent(2);
        assert_eq!(tracker.in_flight.get(&1), Some(&11));
        assert_eq!(tracker.in_flight.get(&2), Some(&12));
        tracker.queued.push_back(13);
        let mut lost = tracker.drain();
        lost.sort_unstable();
        assert_eq!(lost, [11, 12, 13]);
        assert_eq!(tracker.outstanding(), 0);
    }
}
