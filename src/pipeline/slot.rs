//! The hand-over between a camera's capture and preprocess threads, which
//! holds one frame, and the stop flag the capture threads sleep on.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::source::Frame;

/// Room for one item between two pipeline threads: raw frames between
/// capture and preprocessing, prepared tensors between preprocessing and
/// inference.
pub struct Slot<T> {
    state: Mutex<SlotState<T>>,
    changed: Condvar,
}

/// The slot between the capture thread and the preprocess thread.
pub type FrameSlot = Slot<Frame>;

pub(crate) struct SlotState<T> {
    pub(crate) item: Option<T>,
    closed: bool,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self { state: Mutex::new(SlotState { item: None, closed: false }), changed: Condvar::new() }
    }
}

impl<T> Slot<T> {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, SlotState<T>> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, state: std::sync::MutexGuard<'a, SlotState<T>>) -> std::sync::MutexGuard<'a, SlotState<T>> {
        self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
    }

    /// Puts an item, replacing one not yet taken; returns true if it replaced one.
    pub fn put_latest(&self, item: T) -> bool {
        let replaced = self.lock().item.replace(item).is_some();
        self.changed.notify_all();
        replaced
    }

    /// Puts an item, first waiting until the previous one was taken; false if
    /// the slot closed meanwhile.
    pub fn put_wait(&self, item: T) -> bool {
        let mut state = self.wait_empty_locked();
        if state.closed {
            return false;
        }
        state.item = Some(item);
        self.changed.notify_all();
        true
    }

    fn wait_empty_locked(&self) -> std::sync::MutexGuard<'_, SlotState<T>> {
        let mut state = self.lock();
        while state.item.is_some() && !state.closed {
            state = self.wait(state);
        }
        state
    }

    /// The next item; `None` once the slot is closed and empty.
    pub fn take(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(item) = state.item.take() {
                self.changed.notify_all();
                return Some(item);
            }
            if state.closed {
                return None;
            }
            state = self.wait(state);
        }
    }

    /// No more items. With `discard`, an item not yet taken is dropped (a
    /// shutdown); without, it is still delivered (a finite source ended).
    pub fn close(&self, discard: bool) {
        let mut state = self.lock();
        state.closed = true;
        if discard {
            state.item = None;
        }
        self.changed.notify_all();
    }
}

/// A stop flag that sleeping threads can wait on.
#[derive(Default)]
pub(crate) struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    pub(crate) fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }
    pub(crate) fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Sleeps up to `duration`; true if stopped meanwhile.
    pub(crate) fn sleep(&self, duration: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) =
            self.changed.wait_timeout_while(guard, duration, |stopped| !*stopped).unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// A one-pixel grey frame, for the pipeline's tests.
#[cfg(test)]
pub(crate) fn test_frame(sequence: u64) -> Frame {
    Frame {
        format: crate::source::PixelFormat::Gray8,
        width: 1,
        height: 1,
        stride: 1,
        data: vec![0],
        sequence,
        captured_at: std::time::SystemTime::now(),
        origin: None,
    }
}

#[cfg(test)]
mod tests {
    use super::test_frame as frame;
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_live_slot_keeps_only_the_newest_frame_and_reports_the_drop() {
        let slot = FrameSlot::default();
        assert!(!slot.put_latest(frame(1)));
        assert!(slot.put_latest(frame(2)));
        assert_eq!(slot.take().unwrap().sequence, 2);
    }

    #[test]
    fn closing_without_discard_still_delivers_the_last_frame() {
        let slot = FrameSlot::default();
        slot.put_latest(frame(9));
        slot.close(false);
        assert_eq!(slot.take().unwrap().sequence, 9);
        assert!(slot.take().is_none());
    }

    #[test]
    fn closing_with_discard_drops_the_waiting_frame_and_wakes_a_blocked_writer() {
        let slot = Arc::new(FrameSlot::default());
        slot.put_latest(frame(1));
        let writer = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.put_wait(frame(2)))
        };
        std::thread::sleep(Duration::from_millis(50));
        slot.close(true);
        assert!(!writer.join().unwrap(), "the blocked writer learns the slot closed");
        assert!(slot.take().is_none());
    }

    #[test]
    fn a_waiting_writer_hands_over_every_frame_in_order() {
        let slot = Arc::new(FrameSlot::default());
        let writer = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    assert!(slot.put_wait(frame(i)));
                }
                slot.close(false);
            })
        };
        let received: Vec<u64> = std::iter::from_fn(|| slot.take()).map(|f| f.sequence).collect();
        writer.join().unwrap();
        assert_eq!(received, (0..50).collect::<Vec<_>>());
    }
}
