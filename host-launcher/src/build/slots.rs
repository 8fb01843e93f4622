//! VM slots: at most N steps of the launchers that share one [`Slots`] run at once.
//!
//! `vouch serve --jobs N` gives its launcher N slots. Every step takes one before it prepares
//! its inputs or boots (or takes) a VM ([`super::run_step`]) and gives it back when its VM is
//! gone, so the one-step builds of the service's workers and the steps its own builder takes
//! from the Nix of every closure build (one Nix per private store: the service's and each
//! trusted client's, each of which believes it has the N slots of the machines file to itself)
//! never run more than N VMs together. A step that finds every slot busy waits (its log says
//! so once) until one is free, first come first served, or until its launcher is cancelled.
//!
//! What is not here: the queue of builds (`crate::serve::builds`), Nix's own slot counting.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::Cancel;

/// How often a waiting step looks at its cancel switch.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// N slots, shared by clones of a launcher's configuration.
#[derive(Debug)]
pub struct Slots {
    capacity: usize,
    state: Mutex<State>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    busy: usize,
    /// The steps waiting, first come first served.
    queue: VecDeque<u64>,
    next_waiter: u64,
    peak: usize,
}

/// One slot, given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
}

/// The launcher was cancelled while the step waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl Slots {
    /// `capacity` slots (at least 1).
    pub fn new(capacity: usize) -> Arc<Slots> {
        Arc::new(Slots {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            freed: Condvar::new(),
        })
    }

    /// How many there are.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots taken now.
    pub fn busy(&self) -> usize {
        self.lock().busy
    }

    /// Steps waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// The most slots ever taken at once.
    pub fn peak(&self) -> usize {
        self.lock().peak
    }

    /// Take a slot, waiting in arrival order while all are busy (`on_wait` is called once, with
    /// the capacity, if it must wait), until `cancel` is cancelled.
    pub fn acquire(
        self: &Arc<Self>,
        cancel: &Cancel,
        on_wait: impl FnOnce(usize),
    ) -> Result<Slot, Cancelled> {
        let mut s = self.lock();
        if s.queue.is_empty() && s.busy < self.capacity {
            return Ok(self.take(s));
        }
        let me = s.next_waiter;
        s.next_waiter += 1;
        s.queue.push_back(me);
        drop(s);
        on_wait(self.capacity);
        let mut s = self.lock();
        loop {
            if s.queue.front() == Some(&me) && s.busy < self.capacity {
                s.queue.pop_front();
                let slot = self.take(s);
                // The next in line may find a slot still free.
                self.freed.notify_all();
                return Ok(slot);
            }
            if cancel.is_cancelled() {
                s.queue.retain(|&w| w != me);
                drop(s);
                self.freed.notify_all();
                return Err(Cancelled);
            }
            s = self.freed.wait_timeout(s, CANCEL_POLL).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn take(self: &Arc<Self>, mut s: MutexGuard<'_, State>) -> Slot {
        s.busy += 1;
        s.peak = s.peak.max(s.busy);
        Slot { slots: Arc::clone(self) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().busy -= 1;
        self.slots.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn never_more_than_capacity_at_once_and_every_step_gets_its_turn() {
        let slots = Slots::new(2);
        let (now, max, waited) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
        let cancel = Cancel::default();
        std::thread::scope(|t| {
            for _ in 0..8 {
                t.spawn(|| {
                    let slot = slots
                        .acquire(&cancel, |cap| {
                            assert_eq!(cap, 2);
                            waited.fetch_add(1, Ordering::SeqCst);
                        })
                        .unwrap();
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(30));
                    now.fetch_sub(1, Ordering::SeqCst);
                    drop(slot);
                });
            }
        });
        assert_eq!(max.load(Ordering::SeqCst), 2, "at most 2, and 2 were used");
        assert_eq!(slots.peak(), 2);
        assert!(waited.load(Ordering::SeqCst) >= 6, "8 steps, 2 slots: at least 6 waited");
        assert_eq!((slots.busy(), slots.waiting()), (0, 0));
    }

    #[test]
    fn a_waiting_step_stops_when_its_launcher_is_cancelled_and_the_next_goes_on() {
        let slots = Slots::new(1);
        let held = slots.acquire(&Cancel::default(), |_| panic!("a free slot")).unwrap();
        let (cancel, other) = (Cancel::default(), Cancel::default());
        let t0 = Instant::now();
        std::thread::scope(|t| {
            let waiter = t.spawn(|| slots.acquire(&cancel, |_| {}).map(drop));
            let second = t.spawn(|| slots.acquire(&other, |_| {}).map(drop));
            while slots.waiting() < 2 {
                std::thread::sleep(Duration::from_millis(5));
            }
            cancel.cancel();
            assert_eq!(waiter.join().unwrap(), Err(Cancelled));
            assert!(t0.elapsed() < Duration::from_secs(2));
            assert_eq!(slots.waiting(), 1, "the cancelled step left the line");
            drop(held);
            assert_eq!(second.join().unwrap(), Ok(()), "the next in line took the freed slot");
        });
        assert_eq!((slots.busy(), slots.waiting(), slots.peak()), (0, 0, 1));
    }
}
