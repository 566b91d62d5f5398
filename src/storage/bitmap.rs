//! One bit per 4 KiB block of the export, in atomic words.
//!
//! Shared by the allocation map (which blocks hold data) and the dirty map (which blocks a
//! migration must send again). Setting and clearing are atomic read-modify-writes on whole
//! words, never a lock, so the sessions' I/O path only ever pays an atomic OR.

use std::sync::atomic::{AtomicU64, Ordering};

/// The block size of every map (flexnbd §9.1).
pub const BLOCK: u64 = 4096;

#[derive(Debug)]
pub struct BlockBitmap {
    words: Box<[AtomicU64]>,
    size: u64,
}

impl BlockBitmap {
    /// All bits clear. The memory is zeroed lazily by the kernel, so even a 1 TiB export
    /// (32 MiB of bits) costs nothing until touched.
    pub fn new(size: u64) -> BlockBitmap {
        let blocks = size.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        let zeroed: Vec<u64> = vec![0; words];
        let boxed = zeroed.into_boxed_slice();
        // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64, so a boxed
        // slice of u64 can be reinterpreted as a boxed slice of AtomicU64 of the same length;
        // ownership moves from `boxed` into the new box.
        let words = unsafe { Box::from_raw(Box::into_raw(boxed) as *mut [AtomicU64]) };
        BlockBitmap { words, size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Sets every block that `[offset, offset + len)` touches (clipped to the export).
    pub fn set_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let first = offset / BLOCK;
        let last = (offset.saturating_add(len) - 1).min(self.size - 1) / BLOCK;
        self.update(first, last, true);
    }

    /// Clears the blocks entirely inside `[offset, offset + len)`; the last block of the
    /// export counts as entirely inside when the range reaches the export's end.
    pub fn clear_inside(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(BLOCK);
        let end = offset.saturating_add(len);
        let end_block = if end >= self.size {
            self.size.div_ceil(BLOCK)
        } else {
            end / BLOCK
        };
        if end_block > first {
            self.update(first, end_block - 1, false);
        }
    }

    fn update(&self, first: u64, last: u64, set: bool) {
        let mut block = first;
        while block <= last {
            let word = (block / 64) as usize;
            let bit = block % 64;
            let count = (64 - bit).min(last - block + 1);
            let mask = if count == 64 {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            if let Some(w) = self.words.get(word) {
                if set {
                    w.fetch_or(mask, Ordering::AcqRel);
                } else {
                    w.fetch_and(!mask, Ordering::AcqRel);
                }
            }
            block += count;
        }
    }

    /// Whether the block holding byte `offset` is set.
    pub fn is_set(&self, offset: u64) -> bool {
        let block = offset / BLOCK;
        self.words
            .get((block / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (block % 64)) != 0)
    }

    /// Number of set blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Clears the set bits and returns them as byte ranges `(offset, len)`, adjacent
    /// blocks merged, clipped to the export, at most `max_bytes` in all (at least one run
    /// when any bit is set). Each word is taken with one atomic swap, so a bit set while
    /// this runs is either in the result or still set afterwards, never lost.
    pub fn take_runs(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut total = 0u64;
        for (index, word) in self.words.iter().enumerate() {
            if total >= max_bytes {
                break;
            }
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let offset = (index as u64 * 64 + bit) * BLOCK;
                if offset >= self.size {
                    continue;
                }
                let len = BLOCK.min(self.size - offset);
                total += len;
                match runs.last_mut() {
                    Some((start, run)) if *start + *run == offset => *run += len,
                    _ => runs.push((offset, len)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_merged_clipped_and_taken_once() {
        let map = BlockBitmap::new(10 * BLOCK + 100);
        map.set_range(BLOCK, 2 * BLOCK);
        map.set_range(3 * BLOCK, 1);
        map.set_range(10 * BLOCK, 50);
        assert_eq!(map.count(), 4);
        assert_eq!(
            map.take_runs(u64::MAX),
            vec![(BLOCK, 3 * BLOCK), (10 * BLOCK, 100)]
        );
        assert_eq!(map.count(), 0);
        assert!(map.take_runs(u64::MAX).is_empty());
    }

    #[test]
    fn take_runs_stops_near_the_limit_and_keeps_the_rest() {
        let map = BlockBitmap::new(1 << 30);
        map.set_range(0, 1 << 30);
        let first = map.take_runs(1 << 20);
        let taken: u64 = first.iter().map(|r| r.1).sum();
        assert!((1 << 20..=64 * BLOCK + (1 << 20)).contains(&taken));
        assert_eq!(map.count() * BLOCK + taken, 1 << 30);
    }
}
