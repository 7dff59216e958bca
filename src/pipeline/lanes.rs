//! The hand-over between several cameras' preprocess threads and the one
//! inference thread that serves them all: one place per camera (a lane)
//! holding its next prepared frame, taken in turn.
//!
//! Why not a queue: a queue serves whoever filled it fastest, so a 30 fps
//! camera would starve a 5 fps one, and frames would wait their turn and go
//! stale. Here each camera has room for one frame (a producer waits until
//! its frame was taken, and takes the newest frame from its camera when it
//! prepares the next), and [`Lanes::take_next`] goes round the cameras from
//! the one after the last it served, so every camera with a frame ready is
//! served once per round whatever its rate, and a camera that went away
//! (an empty lane) costs the others nothing.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

pub struct Lanes<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

struct State<T> {
    items: Vec<Option<T>>,
    closed: Vec<bool>,
    /// The lane to look at first on the next take.
    next: usize,
}

impl<T> Lanes<T> {
    /// `count` lanes, all open and empty.
    pub fn new(count: usize) -> Self {
        let state = State { items: (0..count).map(|_| None).collect(), closed: vec![false; count], next: 0 };
        Self { state: Mutex::new(state), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `lane` is empty (its item was taken); false if the lane
    /// closed meanwhile.
    pub fn wait_empty(&self, lane: usize) -> bool {
        let mut state = self.lock();
        while state.items[lane].is_some() && !state.closed[lane] {
            state = self.wait(state);
        }
        !state.closed[lane]
    }

    /// Sleeps up to `duration`; true if `lane` closed meanwhile.
    pub fn wait_closed(&self, lane: usize, duration: Duration) -> bool {
        let state = self.lock();
        let (state, _) =
            self.changed.wait_timeout_while(state, duration, |s| !s.closed[lane]).unwrap_or_else(|p| p.into_inner());
        state.closed[lane]
    }

    /// Puts an item in `lane`, first waiting until the previous one was
    /// taken; false if the lane closed meanwhile.
    pub fn put_wait(&self, lane: usize, item: T) -> bool {
        let mut state = self.lock();
        while state.items[lane].is_some() && !state.closed[lane] {
            state = self.wait(state);
        }
        if state.closed[lane] {
            return false;
        }
        state.items[lane] = Some(item);
        self.changed.notify_all();
        true
    }

    /// The next item in turn and its lane; `None` once every lane is
    /// closed and empty.
    pub fn take_next(&self) -> Option<(usize, T)> {
        let mut state = self.lock();
        let count = state.items.len();
        loop {
            for step in 0..count {
                let lane = (state.next + step) % count;
                if let Some(item) = state.items[lane].take() {
                    state.next = (lane + 1) % count;
                    self.changed.notify_all();
                    return Some((lane, item));
                }
            }
            if state.closed.iter().all(|&closed| closed) {
                return None;
            }
            state = self.wait(state);
        }
    }

    /// No more items in `lane`; one not yet taken is still delivered (a
    /// finite source ended).
    pub fn close(&self, lane: usize) {
        self.lock().closed[lane] = true;
        self.changed.notify_all();
    }

    /// Every lane closed and emptied: a shutdown.
    pub fn close_all(&self) {
        let mut state = self.lock();
        state.closed.iter_mut().for_each(|closed| *closed = true);
        state.items.iter_mut().for_each(|item| *item = None);
        self.changed.notify_all();
    }
}

/// Closes a lane when its producer thread ends, also by a panic, so the
/// consumer does not wait for it forever.
pub struct CloseLaneOnDrop<T>(pub std::sync::Arc<Lanes<T>>, pub usize);

impl<T> Drop for CloseLaneOnDrop<T> {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lane_always_ready_does_not_starve_the_others() {
        let lanes = Lanes::new(3);
        for lane in 0..3 {
            lanes.put_wait(lane, lane);
        }
        let mut served = [0usize; 3];
        for _ in 0..30 {
            let (lane, _) = lanes.take_next().unwrap();
            served[lane] += 1;
            // Lane 0 (a 30 fps camera) is refilled at once, every time; the
            // others are refilled only once served. A scheduler that always
            // took the first ready lane would serve lane 0 thirty times.
            lanes.put_wait(lane, lane);
        }
        assert_eq!(served, [10, 10, 10]);
    }

    #[test]
    fn lanes_are_served_in_turn_starting_after_the_last_one_served() {
        let lanes = Lanes::new(3);
        for lane in 0..3 {
            lanes.put_wait(lane, lane * 10);
        }
        assert_eq!(lanes.take_next(), Some((0, 0)));
        lanes.put_wait(0, 1);
        // Lane 0 is ready again, but 1 and 2 were waiting first.
        assert_eq!(lanes.take_next(), Some((1, 10)));
        assert_eq!(lanes.take_next(), Some((2, 20)));
        assert_eq!(lanes.take_next(), Some((0, 1)));
    }

    #[test]
    fn one_lane_closing_leaves_the_others_served_and_all_closed_ends_the_consumer() {
        let lanes = Arc::new(Lanes::new(2));
        lanes.put_wait(0, "last of a file");
        lanes.close(0);
        assert_eq!(lanes.take_next(), Some((0, "last of a file")));
        let producer = {
            let lanes = lanes.clone();
            std::thread::spawn(move || {
                assert!(lanes.put_wait(1, "camera"));
                assert!(!lanes.put_wait(0, "after close"));
                lanes.close(1);
            })
        };
        assert_eq!(lanes.take_next(), Some((1, "camera")));
        producer.join().unwrap();
        assert_eq!(lanes.take_next(), None);
    }

    #[test]
    fn a_shutdown_wakes_a_producer_waiting_for_room() {
        let lanes = Arc::new(Lanes::new(1));
        lanes.put_wait(0, 1);
        let producer = {
            let lanes = lanes.clone();
            std::thread::spawn(move || lanes.put_wait(0, 2))
        };
        std::thread::sleep(Duration::from_millis(20));
        lanes.close_all();
        assert!(!producer.join().unwrap());
        assert_eq!(lanes.take_next(), None);
    }
}
