//! A many-to-one channel whose receiving thread parks at once when it runs
//! out of work.
//!
//! A crossbeam (or std) receiver that finds its queue empty first spins,
//! then calls `sched_yield` a few times, then parks. With cores to spare
//! that catches the next message without a wake-up; with a dozen threads on
//! two shared cores every yield is a context switch that takes a core from
//! a thread with work (the service threads yielded ~4,000–6,000 times a
//! second each in a 200k msg/s echo run). Here the receiver checks the
//! queue, says it is parking, checks again, and parks; a sender unparks it
//! only when it said so, so a busy receiver costs its senders one atomic
//! load per message.

use crossbeam_channel::{Receiver, SendError, Sender, TryRecvError};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

struct Parking {
    /// The receiver is parked or about to park: the next sender unparks it.
    parked: AtomicBool,
    /// The receiving thread (set by its first `recv`).
    thread: OnceLock<Thread>,
}

impl Parking {
    fn wake(&self) {
        // Pairs with the fence in `recv`: either the receiver sees what was
        // just sent, or this sees `parked` and unparks it.
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }
}

pub struct HandoffTx<T> {
    /// `None` only while being dropped (see `Drop`).
    tx: Option<Sender<T>>,
    parking: Arc<Parking>,
}

/// The receiving end; one thread receives (the first to call `recv`).
pub struct HandoffRx<T> {
    rx: Receiver<T>,
    parking: Arc<Parking>,
}

/// An unbounded channel to one receiving thread.
pub fn channel<T>() -> (HandoffTx<T>, HandoffRx<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let parking = Arc::new(Parking {
        parked: AtomicBool::new(false),
        thread: OnceLock::new(),
    });
    (
        HandoffTx {
            tx: Some(tx),
            parking: parking.clone(),
        },
        HandoffRx { rx, parking },
    )
}

impl<T> HandoffTx<T> {
    /// Queues `value`; fails (giving it back) only when the receiver is gone.
    pub fn send(&self, value: T) -> Result<(), SendError<T>> {
        match &self.tx {
            Some(tx) => tx.send(value)?,
            None => return Err(SendError(value)),
        }
        self.parking.wake();
        Ok(())
    }

    /// Queues `value` without waking a parked receiver: it finds the value
    /// when something else wakes it (`wake`, or a later `send`). Fails
    /// (giving it back) only when the receiver is gone.
    pub fn send_quiet(&self, value: T) -> Result<(), SendError<T>> {
        match &self.tx {
            Some(tx) => tx.send(value),
            None => Err(SendError(value)),
        }
    }

    /// Wakes the receiver if it is parked (after `send_quiet`).
    pub fn wake(&self) {
        self.parking.wake();
    }

    /// Messages queued and not yet received.
    pub fn len(&self) -> usize {
        self.tx.as_ref().map_or(0, Sender::len)
    }
}

impl<T> Clone for HandoffTx<T> {
    fn clone(&self) -> Self {
        HandoffTx {
            tx: self.tx.clone(),
            parking: self.parking.clone(),
        }
    }
}

impl<T> Drop for HandoffTx<T> {
    fn drop(&mut self) {
        // Drop the sender first, so that a receiver woken by the last one
        // finds the channel disconnected rather than parking again.
        drop(self.tx.take());
        self.parking.wake();
    }
}

impl<T> HandoffRx<T> {
    /// Test-only: as a receiver that said it parks (whether a send wakes
    /// it shows in `is_parked`).
    #[cfg(test)]
    pub(crate) fn mark_parked(&self) {
        self.parking.parked.store(true, Ordering::SeqCst);
    }

    /// Test-only: whether it still counts as parked (no wake since).
    #[cfg(test)]
    pub(crate) fn is_parked(&self) -> bool {
        self.parking.parked.load(Ordering::SeqCst)
    }

    /// The next message, parking while there is none; `None` once every
    /// sender is gone and the queue is empty.
    pub fn recv(&self) -> Option<T> {
        loop {
            match self.rx.try_recv() {
                Ok(v) => return Some(v),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            self.parking.thread.get_or_init(std::thread::current);
            self.parking.parked.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            match self.rx.try_recv() {
                Ok(v) => {
                    self.parking.parked.store(false, Ordering::Relaxed);
                    return Some(v);
                }
                Err(TryRecvError::Disconnected) => return None,
                // A sender that queues from now on sees `parked` and
                // unparks; one that already did left a token, so this
                // returns at once. Spurious returns just loop.
                Err(TryRecvError::Empty) => std::thread::park(),
            }
        }
    }

    /// No message is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_message_arrives_in_order_from_each_sender() {
        let (tx, rx) = channel::<(u32, u32)>();
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        tx.send((s, i)).expect("receiver alive");
                        if i % 1000 == 0 {
                            // Let the receiver run dry and park now and then.
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                })
            })
            .collect();
        drop(tx);
        let mut next = [0u32; 4];
        while let Some((s, i)) = rx.recv() {
            assert_eq!(i, next[s as usize], "sender {s} out of order");
            next[s as usize] += 1;
        }
        for h in senders {
            h.join().expect("sender");
        }
        assert_eq!(next, [20_000; 4]);
    }

    #[test]
    fn a_parked_receiver_wakes_when_the_last_sender_goes() {
        let (tx, rx) = channel::<u32>();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || done_tx.send(rx.recv()));
        // (Parked by now, most likely; the outcome must not depend on it.)
        std::thread::sleep(Duration::from_millis(20));
        drop(tx);
        let got = done
            .recv_timeout(Duration::from_secs(10))
            .expect("the receiver returns instead of staying parked");
        assert_eq!(got, None);
    }

    #[test]
    fn a_quiet_send_leaves_a_parked_receiver_parked_until_a_wake() {
        let (tx, rx) = channel::<u32>();
        // As a receiver that has said it parks.
        rx.parking.parked.store(true, Ordering::SeqCst);
        tx.send_quiet(1).expect("receiver alive");
        assert!(
            rx.parking.parked.load(Ordering::SeqCst),
            "a quiet send woke it"
        );
        tx.wake();
        assert!(!rx.parking.parked.load(Ordering::SeqCst), "wake did not");
        rx.parking.parked.store(true, Ordering::SeqCst);
        tx.send(2).expect("receiver alive");
        assert!(
            !rx.parking.parked.load(Ordering::SeqCst),
            "send did not wake it"
        );
    }

    #[test]
    fn quiet_sends_arrive_in_order_with_the_others_once_woken() {
        let (tx, rx) = channel::<u32>();
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(v) = rx.recv() {
                got.push(v);
            }
            got
        });
        for i in 0..10_000 {
            if i % 3 == 0 {
                tx.send(i).expect("receiver alive");
            } else {
                tx.send_quiet(i).expect("receiver alive");
            }
            if i % 1000 == 999 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        tx.wake();
        drop(tx);
        let got = receiver.join().expect("receiver");
        assert_eq!(got, (0..10_000).collect::<Vec<_>>());
    }

    #[test]
    fn sending_to_a_dropped_receiver_gives_the_message_back() {
        let (tx, rx) = channel::<u32>();
        drop(rx);
        assert_eq!(tx.send(7).map_err(|e| e.into_inner()), Err(7));
    }
}
