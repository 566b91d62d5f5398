//! How long a session polls its client's socket before going to sleep.
//!
//! A session that has answered everything and waits for the next request normally sleeps
//! in `epoll_wait`, and the kernel wakes its thread when the request arrives. On a virtual
//! machine that wake-up (an inter-processor interrupt to a halted virtual CPU) costs as
//! much as serving a cached 4 KiB read: measured on our 2-vCPU test machine, a client
//! reading 4 KiB blocks one at a time got about 24k requests/s from a session that slept
//! at once and 30-34k from one that polled the socket for 30-100 µs first.
//!
//! Polling burns CPU, so the window adapts to the client, in the manner of QEMU's adaptive
//! event-loop polling: it grows (from [`PollWindow::START`], doubling) while requests keep
//! arriving a little after the window closed, stays while they arrive within it, and
//! shrinks (halving, down to nothing) when the client pauses for longer than the maximum.
//! An idle or slow client therefore costs no polling at all, and a client in a tight
//! request/reply loop costs at most the maximum per request. `--busy-poll 0` turns it off.

use std::time::Duration;

/// The polling window of one connection. Pure bookkeeping: the reader measures how long it
/// waited for each request and asks how long to poll before the next one.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PollWindow {
    current: Duration,
    max: Duration,
}

impl PollWindow {
    /// The first window after a wait that polling would have caught.
    pub const START: Duration = Duration::from_micros(4);

    /// A window that never exceeds `max` (zero: never poll). It starts closed.
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            current: Duration::ZERO,
            max,
        }
    }

    /// How long to poll before sleeping, now.
    pub fn window(&self) -> Duration {
        self.current
    }

    /// Records that the next request arrived `waited` after the reader started waiting
    /// for it, and adapts the window.
    pub fn record(&mut self, waited: Duration) {
        if self.max.is_zero() || waited <= self.current {
            // Polling off, or the window caught the request: keep it.
            return;
        }
        if waited <= self.max {
            // A wider window would have caught it.
            self.current = (self.current * 2).max(Self::START).min(self.max);
        } else {
            // The client paused: polling for it would have been wasted.
            self.current /= 2;
            if self.current < Self::START {
                self.current = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn starts_closed_and_stays_closed_when_disabled() {
        let mut w = PollWindow::new(Duration::ZERO);
        assert_eq!(w.window(), Duration::ZERO);
        for waited in [1, 10, 40, 1000] {
            w.record(us(waited));
            assert_eq!(w.window(), Duration::ZERO);
        }
    }

    #[test]
    fn grows_by_doubling_up_to_the_maximum_for_a_busy_client() {
        let mut w = PollWindow::new(us(50));
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.record(us(45));
            seen.push(w.window().as_micros());
        }
        assert_eq!(seen, [4, 8, 16, 32, 50, 50]);
    }

    #[test]
    fn a_request_caught_by_the_window_keeps_it() {
        let mut w = PollWindow::new(us(50));
        w.record(us(10));
        w.record(us(10));
        assert_eq!(w.window(), us(8));
        w.record(us(3));
        assert_eq!(w.window(), us(8));
    }

    #[test]
    fn shrinks_to_nothing_for_a_pausing_client() {
        let mut w = PollWindow::new(us(50));
        for _ in 0..5 {
            w.record(us(45));
        }
        assert_eq!(w.window(), us(50));
        let mut seen = Vec::new();
        for _ in 0..5 {
            w.record(Duration::from_millis(5));
            seen.push(w.window().as_micros());
        }
        assert_eq!(seen, [25, 12, 6, 0, 0]);
    }
}
