//! Which 4 KiB blocks of the export are allocated (`flexnbd-compat.md` §9).
//!
//! The map is an array of atomic words shared by the builder (the background walk) and the
//! sessions (every write sets its blocks). Setting a bit is an atomic OR, never a lock, and
//! bits are only cleared for ranges the file really no longer holds (TRIM), so readers see a
//! conservative answer at any time: a set bit means "possibly allocated", a clear bit
//! "certainly a hole" — but only once the walk has completed. Before that the map is never
//! consulted for decisions.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use super::bitmap::BlockBitmap;
pub use super::bitmap::BLOCK;

/// Where the builder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapState {
    /// The walk is running; the map must not be trusted yet.
    Building,
    /// The walk completed: a clear bit is a hole.
    Built,
    /// The walk failed (unsupported filesystem, I/O error): the server runs without it.
    Failed,
}

impl MapState {
    pub fn name(self) -> &'static str {
        match self {
            MapState::Building => "building",
            MapState::Built => "built",
            MapState::Failed => "failed",
        }
    }
}

/// One bit per block of the export.
#[derive(Debug)]
pub struct AllocationMap {
    bits: BlockBitmap,
    state: AtomicU8,
    /// Bytes of the export the walk has covered, for progress reports.
    walked: AtomicU64,
}

impl AllocationMap {
    /// An empty map (every block a hole) in state `Building`.
    pub fn new(size: u64) -> AllocationMap {
        AllocationMap {
            bits: BlockBitmap::new(size),
            state: AtomicU8::new(0),
            walked: AtomicU64::new(0),
        }
    }

    pub fn size(&self) -> u64 {
        self.bits.size()
    }

    pub fn state(&self) -> MapState {
        match self.state.load(Ordering::Acquire) {
            0 => MapState::Building,
            1 => MapState::Built,
            _ => MapState::Failed,
        }
    }

    /// True once the map may be used to skip writes.
    pub fn is_built(&self) -> bool {
        self.state() == MapState::Built
    }

    /// Records that the map cannot be built (the walk could not even start).
    pub fn mark_failed(&self) {
        self.set_state(MapState::Failed);
    }

    fn set_state(&self, state: MapState) {
        let value = match state {
            MapState::Building => 0,
            MapState::Built => 1,
            MapState::Failed => 2,
        };
        self.state.store(value, Ordering::Release);
    }

    /// Percentage of the export the walk has covered.
    pub fn progress_percent(&self) -> u64 {
        if self.state() == MapState::Built {
            return 100;
        }
        let size = self.size();
        self.walked.load(Ordering::Relaxed).min(size) * 100 / size.max(1)
    }

    /// Marks every block that `[offset, offset + len)` touches as allocated.
    pub fn set_range(&self, offset: u64, len: u64) {
        self.bits.set_range(offset, len);
    }

    /// Marks the blocks entirely inside `[offset, offset + len)` as holes (after the file's
    /// range was punched). Partly covered blocks keep their bit.
    pub fn clear_range(&self, offset: u64, len: u64) {
        self.bits.clear_inside(offset, len);
    }

    /// Whether the block holding byte `offset` is (possibly) allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.bits.is_set(offset)
    }

    /// Bytes in allocated blocks (the last block counted whole).
    pub fn allocated_bytes(&self) -> u64 {
        self.bits.count() * BLOCK
    }

    /// Fills the map from the file's extents with SEEK_DATA/SEEK_HOLE, then marks it built.
    /// Extents are rounded outward to whole blocks. Bits set meanwhile by writes stay set.
    /// On failure the map is marked failed and the error returned.
    pub fn build_from(&self, file: &File, cancel: &AtomicBool) -> io::Result<()> {
        match self.walk(file, cancel) {
            Ok(()) => {
                self.set_state(MapState::Built);
                Ok(())
            }
            Err(e) => {
                self.set_state(MapState::Failed);
                Err(e)
            }
        }
    }

    fn walk(&self, file: &File, cancel: &AtomicBool) -> io::Result<()> {
        let size = self.size();
        let mut walk = DataExtents::new(file, 0, size);
        while !walk.is_done() {
            if cancel.load(Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the walk was cancelled",
                ));
            }
            let Some((data, hole)) = walk.next_extent().map_err(io::Error::from)? else {
                break;
            };
            self.set_range(data, hole.saturating_sub(data).max(1));
            self.walked.store(hole, Ordering::Relaxed);
        }
        self.walked.store(size, Ordering::Relaxed);
        Ok(())
    }
}

/// The data extents of a file between two offsets, found with SEEK_DATA/SEEK_HOLE: the one
/// walker behind the map's build and [`super::Backing::extents`].
pub(super) struct DataExtents {
    fd: RawFd,
    pos: u64,
    end: u64,
}

/// Why [`DataExtents::next_extent`] failed.
#[derive(Debug)]
pub(super) enum WalkError {
    /// SEEK_DATA itself failed, with this error.
    SeekData(io::Error),
    /// SEEK_HOLE failed.
    SeekHole(io::Error),
}

impl From<WalkError> for io::Error {
    fn from(e: WalkError) -> io::Error {
        match e {
            WalkError::SeekData(e) | WalkError::SeekHole(e) => e,
        }
    }
}

impl DataExtents {
    /// Walks `[from, end)` of `file`, which must stay open while the walker is used.
    pub(super) fn new(file: &File, from: u64, end: u64) -> DataExtents {
        DataExtents {
            fd: file.as_raw_fd(),
            pos: from,
            end,
        }
    }

    /// True once the walk has reached `end`.
    pub(super) fn is_done(&self) -> bool {
        self.pos >= self.end
    }

    /// The next data extent as `(data, hole)`: data starts at `data` (at or after where the
    /// walk is) and the next hole at `hole`, clipped to `end`. `hole` is above `data` unless
    /// the file changed underneath; the walk then moves on by one byte. `None` when there is
    /// no data before `end`.
    pub(super) fn next_extent(&mut self) -> Result<Option<(u64, u64)>, WalkError> {
        if self.is_done() {
            return Ok(None);
        }
        let Some(data) =
            seek_from(self.fd, self.pos, libc::SEEK_DATA).map_err(WalkError::SeekData)?
        else {
            self.pos = self.end;
            return Ok(None);
        };
        if data >= self.end {
            self.pos = self.end;
            return Ok(None);
        }
        let hole = seek_from(self.fd, data, libc::SEEK_HOLE)
            .map_err(WalkError::SeekHole)?
            .unwrap_or(self.end)
            .min(self.end);
        self.pos = hole.max(data + 1);
        Ok(Some((data, hole)))
    }
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; `None` past the last data (ENXIO).
fn seek_from(fd: RawFd, from: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek only reads its integer arguments; the descriptor is open. The offset it
    // moves is used by none of our positional I/O.
    let at = unsafe { libc::lseek(fd, from as libc::off_t, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn set_and_clear_ranges() {
        let map = AllocationMap::new(1 << 20);
        map.set_range(4095, 2);
        assert!(map.is_allocated(0) && map.is_allocated(4096) && !map.is_allocated(8192));
        map.set_range(64 * 4096, 130 * 4096);
        assert!(map.is_allocated(64 * 4096) && map.is_allocated(193 * 4096));
        assert!(!map.is_allocated(194 * 4096));
        map.clear_range(100, 8192);
        assert!(map.is_allocated(0), "a partly covered block keeps its bit");
        assert!(!map.is_allocated(4096), "a fully covered block is cleared");
        map.clear_range(0, 1 << 20);
        assert_eq!(map.allocated_bytes(), 0);
        map.set_range((1 << 20) - 1, 100);
        assert_eq!(
            map.allocated_bytes(),
            4096,
            "ranges past the end are clipped"
        );
    }

    #[test]
    fn walk_finds_the_extents_of_a_sparse_file() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let file = tmp.as_file();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&[1u8; 100], 10 << 20).unwrap();
        file.write_all_at(&[1u8; 8192], 40 << 20).unwrap();
        file.sync_all().unwrap();
        let map = AllocationMap::new(64 << 20);
        assert_eq!(map.state(), MapState::Building);
        map.build_from(file, &AtomicBool::new(false)).unwrap();
        assert_eq!(map.state(), MapState::Built);
        assert!(map.is_allocated(10 << 20));
        assert!(map.is_allocated(40 << 20));
        assert!(!map.is_allocated(20 << 20));
        assert!(map.allocated_bytes() < 1 << 20, "{}", map.allocated_bytes());
        assert_eq!(map.progress_percent(), 100);
    }

    #[test]
    fn a_huge_map_is_cheap() {
        let map = AllocationMap::new(1 << 40);
        assert!(!map.is_allocated((1 << 40) - 1));
        map.set_range((1 << 40) - 4096, 4096);
        assert!(map.is_allocated((1 << 40) - 1));
    }
}
