//! Which blocks changed since a migration last sent them.
//!
//! The mirror turns tracking on before its first sweep; from then on every completed write,
//! trim or zeroing sets its blocks, *after* the file operation and before the reply. The
//! mirror takes the set bits (one atomic swap per word) and only then reads the data, so a
//! write is either already in the file when its block is read, or sets its bit again and
//! is sent on a later pass: no update can be lost, and no session ever waits for the
//! mirror (design notes §2: no unbounded queue, no lock on the I/O path).

use std::sync::atomic::{AtomicBool, Ordering};

use super::bitmap::{BlockBitmap, BLOCK};

#[derive(Debug)]
pub struct DirtyMap {
    bits: BlockBitmap,
    tracking: AtomicBool,
}

impl DirtyMap {
    pub fn new(size: u64) -> DirtyMap {
        DirtyMap {
            bits: BlockBitmap::new(size),
            tracking: AtomicBool::new(false),
        }
    }

    /// Starts (or restarts) tracking with every block clean.
    pub fn start(&self) {
        self.bits.clear_all();
        self.tracking.store(true, Ordering::Release);
    }

    /// Stops tracking; the bits are left as they are.
    pub fn stop(&self) {
        self.tracking.store(false, Ordering::Release);
    }

    pub fn is_tracking(&self) -> bool {
        self.tracking.load(Ordering::Acquire)
    }

    /// Records a completed change of `[offset, offset + len)`.
    pub fn record(&self, offset: u64, len: u64) {
        if self.is_tracking() {
            self.bits.set_range(offset, len);
        }
    }

    /// Bytes waiting to be sent (whole blocks).
    pub fn pending_bytes(&self) -> u64 {
        self.bits.count() * BLOCK
    }

    /// Takes dirty ranges, about `max_bytes` of them; see [`BlockBitmap::take_runs`].
    pub fn take(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        self.bits.take_runs(max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_while_tracking_are_recorded() {
        let map = DirtyMap::new(1 << 20);
        map.record(0, 10);
        assert_eq!(map.pending_bytes(), 0);
        map.start();
        map.record(8192, 10);
        assert_eq!(map.pending_bytes(), BLOCK);
        assert_eq!(map.take(u64::MAX), vec![(8192, BLOCK)]);
        map.record(0, 1);
        map.start();
        assert_eq!(map.pending_bytes(), 0, "a restart begins clean");
        map.stop();
        map.record(0, 1);
        assert_eq!(map.pending_bytes(), 0);
    }
}
