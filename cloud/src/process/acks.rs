//! Which outputs Kafka has acknowledged.
//!
//! Every output to processed-data partition `q` takes the next sequence number of `q`
//! ([`AckTracker::reserve`]) and carries it as its delivery opaque. The delivery callback marks
//! it acknowledged; the tracker keeps, per partition, the length of the acknowledged prefix
//! (reports normally arrive in order; out-of-order ones wait in a small set). A checkpoint
//! taken when `q` had reserved `n` numbers is safe once the prefix of `q` reaches `n`: every
//! output sent before the snapshot is in Kafka.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::client::ClientContext;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Lane {
    /// Numbers handed out.
    reserved: u64,
    /// Every number below this is acknowledged.
    prefix: u64,
    /// Acknowledged numbers above the prefix.
    ahead: BTreeSet<u64>,
}

/// Acknowledgement bookkeeping shared by the stage and the producer's callback thread.
#[derive(Debug, Default)]
pub struct AckTracker {
    lanes: Mutex<HashMap<i32, Lane>>,
    changed: Notify,
    failure: Mutex<Option<String>>,
}

impl AckTracker {
    /// Takes the next sequence number of partition `q`.
    pub fn reserve(&self, q: i32) -> u64 {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        let lane = lanes.entry(q).or_default();
        lane.reserved += 1;
        lane.reserved - 1
    }

    /// How many numbers partition `q` has handed out.
    pub fn reserved(&self, q: i32) -> u64 {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner).get(&q).map_or(0, |l| l.reserved)
    }

    /// Marks `seq` of partition `q` acknowledged.
    pub fn ack(&self, q: i32, seq: u64) {
        {
            let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let lane = lanes.entry(q).or_default();
            if seq == lane.prefix {
                lane.prefix += 1;
                while lane.ahead.remove(&lane.prefix) {
                    lane.prefix += 1;
                }
            } else if seq > lane.prefix {
                lane.ahead.insert(seq);
            }
        }
        self.changed.notify_waiters();
    }

    /// Records a delivery that failed for good; the stage stops at its next step.
    pub fn fail(&self, error: String) {
        tracing::error!(%error, "an output was refused by Kafka; stopping before committing past it");
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(error);
        self.changed.notify_waiters();
    }

    /// The first fatal delivery error, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn satisfied(&self, needs: &[(i32, u64)]) -> bool {
        let lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        needs.iter().all(|(q, n)| *n == 0 || lanes.get(q).is_some_and(|l| l.prefix >= *n))
    }

    /// Waits until, for every `(q, n)`, the first `n` outputs to `q` are acknowledged.
    pub async fn wait_for(&self, needs: &[(i32, u64)]) -> Result<(), String> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(error) = self.failure() {
                return Err(error);
            }
            if self.satisfied(needs) {
                return Ok(());
            }
            notified.await;
        }
    }
}

/// The output producer's context: delivery reports feed the tracker.
#[derive(Debug)]
pub struct OutputContext {
    acks: Arc<AckTracker>,
}

impl OutputContext {
    pub fn new(acks: Arc<AckTracker>) -> Self {
        Self { acks }
    }
}

impl ClientContext for OutputContext {}

impl ProducerContext for OutputContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        match result {
            Ok(message) => self.acks.ack(message.partition(), seq as u64),
            Err((error, message)) => {
                self.acks.fail(format!("delivery to partition {} failed: {error}", message.partition()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_acknowledged_prefix() {
        let t = Arc::new(AckTracker::default());
        for _ in 0..3 {
            t.reserve(1);
        }
        t.reserve(0);
        assert_eq!(t.reserved(1), 3);
        let needs = [(1, 3), (0, 1)];
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_for(&needs).await })
        };
        t.ack(1, 2);
        t.ack(1, 0);
        t.ack(0, 0);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "seq 1 of partition 1 is still missing");
        t.ack(1, 1);
        assert_eq!(waiter.await.expect("joins"), Ok(()));
        assert!(t.wait_for(&[(5, 0)]).await.is_ok(), "nothing needed from an unused partition");
    }

    #[tokio::test]
    async fn a_failure_wakes_waiters_with_the_error() {
        let t = Arc::new(AckTracker::default());
        t.reserve(0);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_for(&[(0, 1)]).await })
        };
        tokio::task::yield_now().await;
        t.fail("message too large".into());
        assert_eq!(waiter.await.expect("joins"), Err("message too large".into()));
    }
}
