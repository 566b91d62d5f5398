//! Which parts of the export had their writeback started since the last flush.
//!
//! Write-behind (starting the writeback of a long write as soon as it is answered) makes
//! the FLUSH that ends a copy or a migration short. Done on every write, it also sends a
//! range to the disk each time a client rewrites it, which only costs: a client that
//! rewrites a range before flushing needs it on the disk once, at the flush. So the export
//! is cut into [`REGION`]-sized regions, each stamped with the flush epoch in which its
//! writeback was last started, and a write starts writeback only when it touches a region
//! not stamped in the current epoch. Every flush starts a new epoch.
//!
//! Stamps are one byte each (256 KiB of export per byte: 4 KiB for 1 GiB, 4 MiB for
//! 1 TiB, zeroed lazily by the kernel) and wrap around; a stale stamp that happens to
//! equal the current epoch only skips one early writeback, never a flush.

use std::sync::atomic::{AtomicU8, Ordering};

/// The export bytes one stamp covers.
pub const REGION: u64 = 256 << 10;

#[derive(Debug)]
pub struct WriteBehind {
    stamps: Box<[AtomicU8]>,
    /// The current flush epoch; never 0, the stamp of a region never started.
    epoch: AtomicU8,
}

impl WriteBehind {
    pub fn new(size: u64) -> WriteBehind {
        let regions = size.div_ceil(REGION) as usize;
        let zeroed = vec![0u8; regions].into_boxed_slice();
        // SAFETY: AtomicU8 has the same size, alignment and bit validity as u8, so a boxed
        // slice of u8 can be reinterpreted as a boxed slice of AtomicU8 of the same length;
        // ownership moves from `zeroed` into the new box.
        let stamps = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU8]) };
        WriteBehind {
            stamps,
            epoch: AtomicU8::new(1),
        }
    }

    /// Records that `[offset, offset + len)` was written; true when its writeback should
    /// be started now (it touches a region not started in this epoch).
    pub fn claim(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let first = offset / REGION;
        let last = offset.saturating_add(len - 1) / REGION;
        let mut new = false;
        for region in first..=last {
            if let Some(stamp) = self.stamps.get(region as usize) {
                new |= stamp.swap(epoch, Ordering::AcqRel) != epoch;
            }
        }
        new
    }

    /// A flush is about to start: every later write belongs to a new epoch.
    pub fn new_epoch(&self) {
        let _ = self
            .epoch
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |e| {
                Some(match e.wrapping_add(1) {
                    0 => 1,
                    next => next,
                })
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_claimed_once_per_epoch() {
        let wb = WriteBehind::new(4 * REGION);
        assert!(wb.claim(0, REGION));
        assert!(!wb.claim(0, REGION));
        assert!(!wb.claim(4096, 8192), "inside a claimed region");
        assert!(wb.claim(REGION - 1, 2), "reaches into a new region");
        assert!(!wb.claim(REGION, REGION));
        wb.new_epoch();
        assert!(wb.claim(0, 1));
        assert!(!wb.claim(0, 1));
    }

    #[test]
    fn ranges_past_the_end_and_empty_ones_claim_nothing() {
        let wb = WriteBehind::new(REGION);
        assert!(!wb.claim(0, 0));
        assert!(!wb.claim(8 * REGION, REGION));
        assert!(!wb.claim(u64::MAX - 1, 10));
    }

    #[test]
    fn the_epoch_skips_zero_when_it_wraps() {
        let wb = WriteBehind::new(REGION);
        for _ in 0..600 {
            wb.new_epoch();
            assert_ne!(wb.epoch.load(Ordering::Relaxed), 0);
        }
        // A never-started region (stamp 0) is always new.
        let fresh = WriteBehind::new(2 * REGION);
        for _ in 0..255 {
            fresh.new_epoch();
        }
        assert!(fresh.claim(REGION, 1));
    }
}
