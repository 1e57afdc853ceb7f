//! The hand-over from a connection's event loop to its pipeline. The event loop never waits
//! on it: the pipeline acks through that same event loop, so an event loop waiting for room
//! while the pipeline waits for its acks to go out would stop both, and the broker would drop
//! the silent connection after 1.5 keep-alives (seen under `make bench` with a bounded
//! channel). So nothing here blocks, and what it holds is bounded another way:
//! - a message that must not be lost (QoS 1) always goes in. What waits is bounded by the
//!   broker's in-flight window, since nothing is acked before the pipeline is done with it;
//! - a message that may be shed (QoS 0) goes in while fewer than `capacity` of them wait. The
//!   broker has no window for QoS 0, so past that it is refused, for the caller to drop and
//!   count.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

/// Why a message was not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `capacity` messages that may be shed wait already.
    Full,
    /// The pipeline is gone (shutting down).
    Closed,
}

/// A hand-over holding at most `capacity` messages that may be shed, and any number of the
/// others.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let (items, receiver) = mpsc::unbounded_channel();
    let shed_waiting = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            items,
            shed_waiting: shed_waiting.clone(),
            capacity,
        },
        Receiver {
            items: receiver,
            shed_waiting,
        },
    )
}

pub struct Sender<T> {
    /// Each message with whether it may be shed.
    items: mpsc::UnboundedSender<(T, bool)>,
    shed_waiting: Arc<AtomicUsize>,
    capacity: usize,
}

impl<T> Sender<T> {
    /// Hands over a message that must not be lost; only a closed pipeline refuses it.
    pub fn send(&self, item: T) -> Result<(), Refused> {
        self.items.send((item, false)).map_err(|_| Refused::Closed)
    }

    /// Hands over a message that may be shed, unless `capacity` of those wait already.
    pub fn offer(&self, item: T) -> Result<(), Refused> {
        // Only this sender adds, so the count cannot pass the capacity between the two steps.
        if self.shed_waiting.load(Ordering::Acquire) >= self.capacity {
            return Err(Refused::Full);
        }
        self.shed_waiting.fetch_add(1, Ordering::AcqRel);
        self.items.send((item, true)).map_err(|_| {
            self.shed_waiting.fetch_sub(1, Ordering::AcqRel);
            Refused::Closed
        })
    }
}

pub struct Receiver<T> {
    items: mpsc::UnboundedReceiver<(T, bool)>,
    shed_waiting: Arc<AtomicUsize>,
}

impl<T> Receiver<T> {
    /// The next message, in the order handed over; `None` once the sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let (item, may_shed) = self.items.recv().await?;
        if may_shed {
            self.shed_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_may_be_shed_is_bounded_and_the_rest_always_goes_in_order() {
        let (sender, mut receiver) = channel(2);
        assert_eq!(sender.offer(1), Ok(()));
        assert_eq!(sender.offer(2), Ok(()));
        assert_eq!(sender.offer(3), Err(Refused::Full), "the third to shed");
        // What must not be lost goes in whatever waits.
        for item in 10..1000 {
            assert_eq!(sender.send(item), Ok(()));
        }
        assert_eq!(sender.offer(4), Err(Refused::Full));

        assert_eq!(receiver.recv().await, Some(1));
        // One taken: room for one more.
        assert_eq!(sender.offer(5), Ok(()));
        assert_eq!(sender.offer(6), Err(Refused::Full));
        let mut expected = vec![2];
        expected.extend(10..1000);
        expected.push(5);
        let mut rest = Vec::new();
        for _ in 0..expected.len() {
            rest.push(receiver.recv().await.unwrap());
        }
        assert_eq!(rest, expected, "in the order handed over");
        assert_eq!(sender.offer(7), Ok(()), "all taken: room again");

        drop(receiver);
        assert_eq!(sender.send(8), Err(Refused::Closed));
        assert_eq!(sender.offer(9), Err(Refused::Closed));
    }
}
