//! Pacing a migration's data to a bandwidth limit (flexnbd §10.9, made strict).
//!
//! flexnbd compares the attempt's average speed with the limit after each acknowledged
//! transfer, so with 4 MiB writes and several in flight the first seconds went out at full
//! speed, and a limit below a few MiB/s was never held. Here every data byte is paced
//! *before* it is handed to the socket, by a token bucket: tokens accrue at the limit, up
//! to a quarter of a second's worth, and a piece is sent once the bucket holds it. Pieces
//! are at most an eighth of a second's worth, so however many writes are in flight the
//! bytes sent in any window of `w` seconds are at most `limit × (w + 0.25 s)` — within 5 %
//! of the limit over 5 s. A limit changed while running applies from the next piece.
//!
//! Pure: time is passed in.

use std::time::{Duration, Instant};

/// "No limit" (flexnbd's default), and 0, which `mirror_max_bps` parses from garbage and
/// which we treat as no limit too.
pub fn is_unlimited(limit: u64) -> bool {
    limit == 0 || limit == u64::MAX
}

/// The smallest piece worth sending on its own.
const MIN_PIECE: u64 = 4096;
/// Burst the bucket holds: this fraction of a second's worth of bytes.
const BURST_PER_SEC: f64 = 0.25;
/// Largest piece: this fraction of a second's worth of bytes.
const PIECE_PER_SEC: u64 = 8;

/// The largest piece of data to send at once under `limit` (`max` when unlimited).
pub fn piece_size(limit: u64, max: u64) -> u64 {
    if is_unlimited(limit) {
        return max;
    }
    (limit / PIECE_PER_SEC).clamp(MIN_PIECE, max.max(MIN_PIECE))
}

/// A token bucket in bytes.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts empty at `now` (a new attempt gets no burst beyond what accrues).
    pub fn new(now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: 0.0,
            last: now,
        }
    }

    /// Asks to send `len` bytes at `now` under `limit` bytes per second. Returns how long
    /// to wait before sending them (zero: now); the bytes are accounted for either way, so
    /// the caller sends after waiting without asking again.
    pub fn take(&mut self, now: Instant, len: u64, limit: u64) -> Duration {
        if is_unlimited(limit) {
            self.tokens = 0.0;
            self.last = now;
            return Duration::ZERO;
        }
        let rate = limit as f64;
        let burst = (rate * BURST_PER_SEC).max(len as f64);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.tokens -= len as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_never_waits_and_pieces_stay_whole() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(now);
        assert_eq!(bucket.take(now, 1 << 30, u64::MAX), Duration::ZERO);
        assert_eq!(bucket.take(now, 1 << 30, 0), Duration::ZERO);
        assert_eq!(piece_size(u64::MAX, 4 << 20), 4 << 20);
        assert_eq!(piece_size(0, 4 << 20), 4 << 20);
        assert_eq!(piece_size(100_000, 4 << 20), 12_500);
        assert_eq!(piece_size(1_000, 4 << 20), MIN_PIECE);
    }

    #[test]
    fn a_fresh_bucket_makes_the_first_piece_wait() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(now);
        let wait = bucket.take(now, 100_000, 1_000_000);
        assert_eq!(wait, Duration::from_millis(100));
    }

    proptest! {
        /// Simulated sender: pieces of the allowed size sent back to back, each after its
        /// wait. Over every window of 5 s, no more than limit × 5.25 s went out.
        #[test]
        fn every_window_holds_the_limit(limit in 4_096u64..50_000_000, seconds in 6u64..20) {
            let start = Instant::now();
            let mut bucket = TokenBucket::new(start);
            let piece = piece_size(limit, 4 << 20);
            let mut now = start;
            let mut sends: Vec<(Duration, u64)> = Vec::new();
            while now.duration_since(start) < Duration::from_secs(seconds) {
                now += bucket.take(now, piece, limit);
                sends.push((now.duration_since(start), piece));
            }
            let window = Duration::from_secs(5);
            for (i, &(t0, _)) in sends.iter().enumerate() {
                let sent: u64 = sends[i..]
                    .iter()
                    .take_while(|(t, _)| *t < t0 + window)
                    .map(|(_, n)| n)
                    .sum();
                let allowed = limit as f64 * 5.25 + piece as f64;
                prop_assert!((sent as f64) <= allowed, "{sent} bytes in 5 s at {limit} B/s");
            }
            // And it is not needlessly slow: at least 90 % of the limit overall.
            let total: u64 = sends.iter().map(|(_, n)| n).sum();
            let elapsed = now.duration_since(start).as_secs_f64();
            prop_assert!(total as f64 >= 0.9 * limit as f64 * elapsed);
        }
    }
}
