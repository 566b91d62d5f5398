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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often the host's run queue is sampled for [`host_has_spare_cpu`].
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// True when the host had, at the last sample (at most [`SAMPLE_EVERY`] old), no more
/// runnable threads than CPUs: a CPU to spare for polling.
///
/// Polling only pays while it takes a CPU nobody else wants. On a busy host (other work
/// runnable beside us) a polling thread spends its share of the CPU on nothing, the
/// scheduler then preempts it for the other work, and the request it polled for waits a
/// whole time slice: measured beside two CPU-bound processes, polling made queue-depth-1
/// reads slower than sleeping at once. A sleeping thread instead keeps its claim, and the
/// scheduler runs it first when its request arrives.
///
/// The sample is the instantaneous count of runnable threads in `/proc/loadavg` (the
/// sampling thread included), read at most every 10 ms for the whole process. Without
/// `/proc`, the answer is always true (the `--busy-poll` window alone decides).
pub(crate) fn host_has_spare_cpu() -> bool {
    static SPARE: AtomicBool = AtomicBool::new(true);
    static SAMPLED_AT: AtomicU64 = AtomicU64::new(0);
    static SAMPLER: OnceLock<Option<(File, usize, Instant)>> = OnceLock::new();
    let Some((loadavg, cpus, epoch)) = SAMPLER.get_or_init(|| {
        let file = File::open("/proc/loadavg").ok()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some((file, cpus, Instant::now()))
    }) else {
        return true;
    };
    // Nanoseconds since `epoch`, plus one so that 0 means "never sampled".
    let now = epoch.elapsed().as_nanos() as u64 + 1;
    let last = SAMPLED_AT.load(Ordering::Relaxed);
    let stale = last == 0 || now.saturating_sub(last) >= SAMPLE_EVERY.as_nanos() as u64;
    if stale
        && SAMPLED_AT
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let mut text = [0u8; 128];
        if let Ok(n) = loadavg.read_at(&mut text, 0) {
            if let Some(runnable) = runnable_threads(&text[..n]) {
                SPARE.store(runnable <= *cpus, Ordering::Relaxed);
            }
        }
    }
    SPARE.load(Ordering::Relaxed)
}

/// The runnable-thread count of a `/proc/loadavg` line (`0.98 1.12 1.29 2/345 12345`: the
/// `2`).
fn runnable_threads(loadavg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

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

    #[test]
    fn reads_the_runnable_count_of_a_loadavg_line() {
        assert_eq!(runnable_threads(b"0.98 1.12 1.29 2/345 12345\n"), Some(2));
        assert_eq!(runnable_threads(b"0.00 0.01 0.05 17/1024 1"), Some(17));
        assert_eq!(runnable_threads(b"0.98 1.12 1.29"), None);
        assert_eq!(runnable_threads(b"a b c x/y z"), None);
        assert_eq!(runnable_threads(&[0xff, 0xfe]), None);
    }

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
