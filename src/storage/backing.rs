use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::allocation::{AllocationMap, DataExtents, WalkError, BLOCK};
use super::dirty::DirtyMap;
use super::mapping::Mapping;
use super::write_behind::WriteBehind;

/// `cachestat`'s system call number: 451 on every architecture (calls added since Linux 5.1
/// share one number everywhere); the libc crate does not name it on every target.
const SYS_CACHESTAT: libc::c_long = 451;

/// The page size `cachestat` counts in.
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    })
}

/// Errors of the storage layer. The OS error is part of the message (and deliberately not
/// a `source`), so that a one-line report names it exactly once.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("Couldn't open {path}: {reason}")]
    Open { path: PathBuf, reason: io::Error },
    #[error("Couldn't determine the size of {path}: {reason}")]
    Size { path: PathBuf, reason: io::Error },
    #[error("{path} is smaller than 512 bytes: a zero-size export cannot be served")]
    Empty { path: PathBuf },
    #[error("{path} is already served: {reason}. Two servers on one file are two writers that know nothing of each other; stop the other one, or pass --no-lock if the file is meant to be shared")]
    Locked {
        path: PathBuf,
        reason: super::lock::LockError,
    },
}

/// Why zeroing a range failed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// FAST_ZERO was asked for and the filesystem can only write zeros.
    #[error("zeroing would not be faster than writing zeros")]
    NotFast,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One run of the export as the filesystem reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Unallocated (reads as zeros).
    pub hole: bool,
}

/// Outcome of a read that must not block.
#[derive(Debug, PartialEq, Eq)]
pub enum NowaitRead {
    /// All requested bytes were read from the page cache.
    Done,
    /// Only this many bytes could be read without waiting for the disk; the rest must be
    /// read on a thread that may block.
    Partial(usize),
}

/// The file or block device a server exports.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    /// Export size: the file's size rounded down to a multiple of 512 (flexnbd §4.1).
    size: u64,
    /// Cleared the first time the kernel says `RWF_NOWAIT` is unsupported for this file
    /// (tmpfs on older kernels); reads then go straight to plain `pread`.
    nowait_reads: AtomicBool,
    /// Cleared the first time the kernel says it has no `cachestat` (before Linux 6.5):
    /// [`Backing::is_cached`] then answers false, and reads take the copying path.
    cachestat: AtomicBool,
    /// Which blocks hold data. Every write sets its blocks before it touches the file; once
    /// the background walk has built the map, all-zero blocks written into holes are skipped.
    allocation: Arc<AllocationMap>,
    /// Blocks changed since a migration sent them; recorded after each completed change.
    dirty: DirtyMap,
    /// Where writeback was started early since the last flush.
    write_behind: WriteBehind,
    /// The whole export mapped read-only, made the first time [`Backing::cached_bytes`]
    /// is asked; `None` inside if mapping failed, which is logged once
    /// and leaves those reads on the copying path.
    mapping: std::sync::OnceLock<Option<Arc<Mapping>>>,
}

impl Backing {
    /// Opens `path` for reading and writing and determines the export size.
    ///
    /// Refuses a file smaller than 512 bytes: C flexnbd crashed on such exports, and there
    /// is nothing a client could do with one.
    pub fn open(path: &Path) -> Result<Backing, StorageError> {
        Backing::open_with(path, false)
    }

    /// Opens `path`, for reading only if `read_only` (the server then refuses every write,
    /// and a file the server may not write can still be served).
    pub fn open_with(path: &Path, read_only: bool) -> Result<Backing, StorageError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|reason| StorageError::Open {
                path: path.to_owned(),
                reason,
            })?;
        let raw_size = file
            .seek(SeekFrom::End(0))
            .map_err(|reason| StorageError::Size {
                path: path.to_owned(),
                reason,
            })?;
        let size = raw_size & !511;
        if size == 0 {
            return Err(StorageError::Empty {
                path: path.to_owned(),
            });
        }
        if size != raw_size {
            tracing::warn!(
                "{} is {raw_size} bytes, not a multiple of 512: serving the first {size}",
                path.display()
            );
        }
        Ok(Backing {
            file,
            path: path.to_owned(),
            size,
            nowait_reads: AtomicBool::new(true),
            cachestat: AtomicBool::new(true),
            allocation: Arc::new(AllocationMap::new(size)),
            dirty: DirtyMap::new(size),
            write_behind: WriteBehind::new(size),
            mapping: std::sync::OnceLock::new(),
        })
    }

    /// The export size in bytes (a positive multiple of 512).
    /// Takes the file's advisory lock (see `storage::lock`): shared for a read-only server,
    /// exclusive otherwise. Held until the file is closed.
    pub fn lock(&self, read_only: bool) -> Result<(), StorageError> {
        super::lock::lock(&self.file, read_only).map_err(|reason| StorageError::Locked {
            path: self.path.clone(),
            reason,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the open file (not of whatever the path names now).
    pub fn file_id(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }

    /// The allocation map, shared with its builder (and later the mirror).
    pub fn allocation(&self) -> &Arc<AllocationMap> {
        &self.allocation
    }

    /// The blocks changed since a migration sent them.
    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }

    /// A second descriptor for the file, for the allocation walk (its `lseek`s move a file
    /// offset that none of our positional I/O uses).
    pub fn file_for_walk(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Reads `len` bytes at `offset` into `buf`'s spare capacity without waiting for the
    /// disk, so that a cached read can be answered on the session's own thread.
    ///
    /// Whatever was read is appended to `buf`. The caller reads the remainder with
    /// [`Backing::read_into`] on a thread that may block.
    pub fn read_nowait(
        &self,
        buf: &mut BytesMut,
        offset: u64,
        len: usize,
    ) -> io::Result<NowaitRead> {
        buf.reserve(len);
        let start = buf.len();
        if !self.nowait_reads.load(Ordering::Relaxed) {
            self.read_into(buf, offset, len)?;
            return Ok(NowaitRead::Done);
        }
        let mut done = 0usize;
        while done < len {
            let spare = &mut buf.spare_capacity_mut()[..len - done];
            let iov = libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            };
            // SAFETY: `iov` points into `buf`'s spare capacity, which is valid for writes of
            // `len - done` bytes (reserved above) and outlives the call. The kernel writes at
            // most that many bytes, and we only extend `buf`'s length by the count it reports.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(NowaitRead::Partial(done)),
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                        self.nowait_reads.store(false, Ordering::Relaxed);
                        self.read_into(buf, offset + done as u64, len - done)?;
                        return Ok(NowaitRead::Done);
                    }
                    _ => return Err(err),
                }
            }
            if n == 0 {
                return Err(short_read(offset + done as u64));
            }
            // SAFETY: the kernel initialised `n` more bytes of the spare capacity.
            unsafe { buf.set_len(start + done + n as usize) };
            done += n as usize;
        }
        Ok(NowaitRead::Done)
    }

    /// True when every page of `offset..offset + len` is in the page cache, so that
    /// [`Backing::send_to`] on that range copies no byte from the disk and does not block.
    /// False when some page is not, or the kernel cannot say (`cachestat` is Linux 6.5+).
    ///
    /// A page may still be evicted between this answer and the send; the send then waits
    /// for the disk on the caller's thread, which is rare enough not to matter.
    pub fn is_cached(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !self.cachestat.load(Ordering::Relaxed) {
            return false;
        }
        let page = page_size();
        let first = offset / page;
        let last = (offset + len - 1) / page;
        // The kernel's `struct cachestat_range` and `struct cachestat` (uapi/linux/mman.h).
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        let range = Range {
            off: first * page,
            len: (last - first + 1) * page,
        };
        let mut stat = Stat::default();
        // SAFETY: both pointers refer to live, properly laid out structs of the kernel's
        // ABI; the kernel reads `range` and writes only `stat`, and keeps neither.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        if r != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                self.cachestat.store(false, Ordering::Relaxed);
            }
            return false;
        }
        stat.nr_cache == last - first + 1
    }

    /// `offset..offset + len` as `Bytes` over the page cache's own pages (see
    /// `storage::mapping`), when every page of the range is cached; `None` otherwise, and
    /// the caller reads the range into a buffer. For replies that are copied anyway (into
    /// the socket, or into TLS records): the copy into a buffer is saved, and touching the
    /// pages does not wait for the disk.
    pub fn cached_bytes(&self, offset: u64, len: usize) -> Option<Bytes> {
        if !self.is_cached(offset, len as u64) {
            return None;
        }
        let mapping = self.mapping.get_or_init(|| {
            Mapping::new(&self.file, self.size)
                .map(Arc::new)
                .map_err(|e| {
                    tracing::warn!(
                        "could not map {} ({e}): cached reads are copied through a buffer",
                        self.path.display()
                    )
                })
                .ok()
        });
        mapping.as_ref()?.bytes(offset, len)
    }

    /// Sends up to `len` bytes of the file at `offset` to `socket` with `sendfile`: the
    /// socket takes the page-cache pages themselves, so no byte is copied in user space.
    /// Returns how many bytes were sent (`WouldBlock` when a non-blocking socket is full; 0
    /// at the end of the file). May wait for the disk unless [`Backing::is_cached`] said
    /// otherwise.
    pub fn send_to(&self, socket: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let mut at = offset as libc::off_t;
        loop {
            // SAFETY: both descriptors are open for the duration of the call (borrowed),
            // and `at` is a live off_t the kernel updates.
            let n =
                unsafe { libc::sendfile(socket.as_raw_fd(), self.file.as_raw_fd(), &mut at, len) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Reads exactly `len` bytes at `offset`, appending them to `buf`. May block.
    pub fn read_into(&self, buf: &mut BytesMut, offset: u64, len: usize) -> io::Result<()> {
        buf.reserve(len);
        let start = buf.len();
        let mut done = 0usize;
        while done < len {
            let spare = &mut buf.spare_capacity_mut()[..len - done];
            // SAFETY: as in `read_nowait`: the pointer and length describe reserved, writable
            // spare capacity, and the length is extended only by what the kernel reports.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(short_read(offset + done as u64));
            }
            // SAFETY: the kernel initialised `n` more bytes of the spare capacity.
            unsafe { buf.set_len(start + done + n as usize) };
            done += n as usize;
        }
        Ok(())
    }

    /// Writes all of `data` at `offset` and keeps the allocation map true. With `durable`,
    /// the data (and the metadata needed to read it back) is on stable storage when this
    /// returns (`RWF_DSYNC`).
    ///
    /// Once the map is built, pieces that fall into unallocated blocks and are all zeros are
    /// not written (flexnbd §9.3): they read as zeros already, and writing them would fill
    /// the holes of a sparse image (a migration sends the holes of its source as zeros).
    pub fn write_at(&self, data: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.write_sparse(data, offset, durable)?;
        self.dirty.record(offset, data.len() as u64);
        Ok(())
    }

    fn write_sparse(&self, data: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let map = &self.allocation;
        if !map.is_built() {
            map.set_range(offset, data.len() as u64);
            return self.write_raw(data, offset, durable);
        }
        let mut kept_from: Option<usize> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let end = data.len().min(pos + (BLOCK - at % BLOCK) as usize);
            let piece = &data[pos..end];
            let allocated = map.is_allocated(at);
            if allocated || !is_zero(piece) {
                if !allocated {
                    map.set_range(at, piece.len() as u64);
                }
                kept_from.get_or_insert(pos);
            } else if let Some(from) = kept_from.take() {
                self.write_raw(&data[from..pos], offset + from as u64, durable)?;
            }
            pos = end;
        }
        if let Some(from) = kept_from {
            self.write_raw(&data[from..], offset + from as u64, durable)?;
        }
        Ok(())
    }

    /// Writes all of `data` at `offset`, nothing more.
    fn write_raw(&self, data: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        if !durable {
            return self.file.write_all_at(data, offset);
        }
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes `rest`, a live slice the kernel only reads from.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    (offset + done as u64) as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file accepted no bytes",
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Deallocates `[offset, offset + len)` (TRIM); the range reads as zeros afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )?;
        self.allocation.clear_range(offset, len);
        self.dirty.record(offset, len);
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros (WRITE_ZEROES).
    ///
    /// Without `no_hole` the range is punched (fast, and it keeps the image sparse); with
    /// it, or where punching is unsupported, `FALLOC_FL_ZERO_RANGE` zeroes it in place;
    /// where that is unsupported too (tmpfs), zeros are written — unless `fast_only`, which
    /// then fails at once with [`ZeroError::NotFast`].
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
    ) -> Result<(), ZeroError> {
        if len == 0 {
            return Ok(());
        }
        if !no_hole {
            match self.punch_hole(offset, len) {
                Err(e) if unsupported(&e) => {}
                other => return Ok(other?),
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {
                self.allocation.set_range(offset, len);
                self.dirty.record(offset, len);
                return Ok(());
            }
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e.into()),
        }
        if fast_only {
            return Err(ZeroError::NotFast);
        }
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            if no_hole {
                self.allocation.set_range(offset + done, n as u64);
                self.write_raw(&ZEROS[..n], offset + done, false)?;
                self.dirty.record(offset + done, n as u64);
            } else {
                self.write_at(&ZEROS[..n], offset + done, false)?;
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Asks the kernel to read `[offset, offset + len)` ahead (CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// The allocation of `[offset, offset + len)` as the filesystem reports it right now
    /// (SEEK_DATA/SEEK_HOLE), at most `max` extents; the last one may be cut short, and
    /// together they may cover less than `len`, never more. Where the filesystem cannot
    /// tell, the whole range is reported as data (always a safe answer).
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut walk = DataExtents::new(&self.file, offset, end);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let (data, hole) = match walk.next_extent() {
                Ok(Some(extent)) => extent,
                Ok(None) => (end, end),
                Err(WalkError::SeekData(e)) if unsupported(&e) => {
                    return Ok(vec![Extent {
                        length: end - offset,
                        hole: false,
                    }])
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                out.push(Extent {
                    length: data - pos,
                    hole: true,
                });
                pos = data;
                if pos >= end || out.len() >= max {
                    break;
                }
            }
            let next = hole.max(pos + 1);
            out.push(Extent {
                length: next - pos,
                hole: false,
            });
            pos = next;
        }
        Ok(out)
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: fallocate only reads its integer arguments; the descriptor is open.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// Write-behind for a range just written: starts writing it back to the disk without
    /// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), unless that was already done for
    /// it since the last flush (see `storage::write_behind`). Durability still comes only
    /// from [`Backing::sync_data`]; this makes that later sync shorter. Returns whether
    /// writeback was started.
    pub fn write_behind(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.write_behind.claim(offset, len) {
            return Ok(false);
        }
        self.start_writeback(offset, len)?;
        Ok(true)
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: sync_file_range takes plain integers and only schedules I/O on our fd.
        let r = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync_data(&self) -> io::Result<()> {
        // Writes from now on may need an early writeback again.
        self.write_behind.new_epoch();
        self.file.sync_data()
    }
}

/// The filesystem does not implement the operation.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// True if every byte is zero (compared a word at a time).
fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only reinterprets the
        // correctly aligned middle part of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

fn short_read(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the file ended at byte {at}, inside the export"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn backing_with(bytes: &[u8]) -> (tempfile::NamedTempFile, Backing) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        let backing = Backing::open(tmp.path()).unwrap();
        (tmp, backing)
    }

    #[test]
    fn size_is_rounded_down_to_512() {
        let (_tmp, backing) = backing_with(&vec![1u8; 1024 + 511]);
        assert_eq!(backing.size(), 1024);
    }

    #[test]
    fn tiny_and_missing_files_are_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Backing::open(tmp.path()),
            Err(StorageError::Empty { .. })
        ));
        let missing = tmp.path().with_extension("missing");
        let err = Backing::open(&missing).unwrap_err();
        assert!(err.to_string().starts_with("Couldn't open "), "{err}");
    }

    #[test]
    fn the_page_cache_check_sees_written_and_dropped_pages() {
        let pattern: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (tmp, backing) = backing_with(&pattern);
        let cached = backing.is_cached(4096, 512 << 10);
        if !backing.cachestat.load(Ordering::Relaxed) {
            return; // A kernel before 6.5: no answer, and none expected.
        }
        assert!(cached, "pages just written are in the page cache");
        assert!(!backing.is_cached(0, 0));
        // Clean pages can be dropped (except on tmpfs, where the cache is the storage);
        // then the check must say so.
        // SAFETY: statfs is plain integers, for which all zeros is a valid value.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `fs` is a live struct the kernel fills.
        let r = unsafe { libc::fstatfs(tmp.as_file().as_raw_fd(), &mut fs) };
        assert_eq!(r, 0);
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        if fs.f_type as i64 == TMPFS_MAGIC {
            return;
        }
        tmp.as_file().sync_all().unwrap();
        // SAFETY: a valid descriptor; the call only advises the kernel.
        let r = unsafe {
            libc::posix_fadvise(tmp.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
        };
        assert_eq!(r, 0);
        assert!(!backing.is_cached(4096, 512 << 10));
    }

    #[test]
    fn cached_bytes_are_the_file_and_follow_writes() {
        let pattern: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 249) as u8).collect();
        let (_tmp, backing) = backing_with(&pattern);
        if !backing.cachestat.load(Ordering::Relaxed) || !backing.is_cached(0, 4096) {
            return; // No cachestat: never mapped, and reads take the copying path.
        }
        let bytes = backing.cached_bytes(5000, 70_000).expect("cached range");
        assert_eq!(&bytes[..], &pattern[5000..75_000]);
        backing.write_at(b"new bytes", 5000, false).unwrap();
        let again = backing.cached_bytes(5000, 9).expect("cached range");
        assert_eq!(&again[..], b"new bytes");
        // Past the export: no bytes, whatever the cache holds.
        assert!(backing.cached_bytes(backing.size() - 10, 11).is_none());
    }

    #[test]
    fn send_to_hands_the_range_to_a_socket() {
        use std::io::Read;
        let pattern: Vec<u8> = (0..(64u32 << 10)).map(|i| (i % 253) as u8).collect();
        let (_tmp, backing) = backing_with(&pattern);
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut sent = 0;
        while sent < 8192 {
            sent += backing
                .send_to(ours.as_fd(), 4096 + sent as u64, 8192 - sent)
                .unwrap();
        }
        let mut got = vec![0u8; 8192];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(got, pattern[4096..4096 + 8192]);
        // At the end of the file there is nothing left to send.
        assert_eq!(backing.send_to(ours.as_fd(), 64 << 10, 512).unwrap(), 0);
    }

    #[test]
    fn reads_and_writes_round_trip() {
        let (_tmp, backing) = backing_with(&[0u8; 8192]);
        backing.write_at(b"hello", 4000, false).unwrap();
        backing.write_at(b"world", 5000, true).unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(
            backing.read_nowait(&mut buf, 4000, 5).unwrap(),
            NowaitRead::Done
        );
        backing.read_into(&mut buf, 5000, 5).unwrap();
        assert_eq!(&buf[..], b"helloworld");
        backing.sync_data().unwrap();
    }

    #[test]
    fn writeback_can_be_started_on_ext4_and_tmpfs() {
        for dir in [std::env::temp_dir(), "/dev/shm".into()] {
            if !dir.is_dir() {
                continue;
            }
            let tmp = tempfile::NamedTempFile::new_in(&dir).unwrap();
            tmp.as_file().set_len(1 << 20).unwrap();
            let backing = Backing::open(tmp.path()).unwrap();
            backing.write_at(&[7u8; 65536], 4096, false).unwrap();
            assert!(backing.write_behind(4096, 65536).unwrap());
            assert!(!backing.write_behind(0, 65536).unwrap(), "once per flush");
            backing.sync_data().unwrap();
            assert!(
                backing.write_behind(0, 65536).unwrap(),
                "again after a flush"
            );
            let mut buf = BytesMut::new();
            backing.read_into(&mut buf, 4096, 65536).unwrap();
            assert!(buf.iter().all(|&b| b == 7), "in {}", dir.display());
        }
    }

    #[test]
    fn zero_blocks_into_holes_are_skipped_once_the_map_is_built() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let backing = Backing::open(tmp.path()).unwrap();
        let map = backing.allocation().clone();
        map.build_from(&backing.file_for_walk().unwrap(), &AtomicBool::new(false))
            .unwrap();
        // Zeros into holes: nothing written, nothing allocated.
        backing.write_at(&vec![0u8; 256 << 10], 0, false).unwrap();
        assert_eq!(map.allocated_bytes(), 0);
        // Data in the middle of zeros: only its block is written.
        let mut mixed = vec![0u8; 3 * 4096];
        mixed[4096 + 7] = 9;
        backing.write_at(&mixed, 64 << 10, false).unwrap();
        assert_eq!(map.allocated_bytes(), 4096);
        assert!(map.is_allocated((64 << 10) + 4096));
        // Zeros over allocated data are written.
        backing
            .write_at(&[0u8; 4096], (64 << 10) + 4096, false)
            .unwrap();
        let mut buf = BytesMut::new();
        backing.read_into(&mut buf, 64 << 10, 3 * 4096).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        backing.sync_data().unwrap();
        let blocks = std::os::unix::fs::MetadataExt::blocks(&tmp.as_file().metadata().unwrap());
        assert!(
            blocks * 512 <= 8192,
            "the file stayed sparse: {} bytes allocated",
            blocks * 512
        );
    }

    #[test]
    fn writes_before_the_map_is_built_are_recorded() {
        let (_tmp, backing) = backing_with(&[0u8; 65536]);
        backing.write_at(&[0u8; 10], 20000, false).unwrap();
        assert!(backing.allocation().is_allocated(20000));
        assert!(!backing.allocation().is_built());
    }

    fn allocated(tmp: &tempfile::NamedTempFile) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&tmp.as_file().metadata().unwrap()) * 512
    }

    fn trim_zero_and_extents_on(dir: &Path) {
        let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
        tmp.as_file().set_len(8 << 20).unwrap();
        let backing = Backing::open(tmp.path()).unwrap();
        backing
            .write_at(&vec![7u8; 4 << 20], 1 << 20, false)
            .unwrap();
        let ext = backing.extents(0, 8 << 20, 100).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 1 << 20,
                    hole: true
                },
                Extent {
                    length: 4 << 20,
                    hole: false
                },
                Extent {
                    length: 3 << 20,
                    hole: true
                },
            ]
        );
        assert_eq!(backing.extents(0, 8 << 20, 1).unwrap().len(), 1);
        // TRIM deallocates and reads as zeros.
        backing.punch_hole(1 << 20, 1 << 20).unwrap();
        let mut buf = BytesMut::new();
        backing.read_into(&mut buf, 1 << 20, 1 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        assert!(!backing.allocation().is_allocated(1 << 20));
        // WRITE_ZEROES without NO_HOLE punches; with NO_HOLE the range stays allocated.
        let before = allocated(&tmp);
        backing
            .write_zeroes(2 << 20, 1 << 20, false, false)
            .unwrap();
        assert!(allocated(&tmp) <= before - (1 << 20) + 4096);
        backing.write_zeroes(3 << 20, 1 << 20, true, false).unwrap();
        let mut buf = BytesMut::new();
        backing.read_into(&mut buf, 2 << 20, 2 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        assert!(backing.allocation().is_allocated(3 << 20));
        backing.prefetch(0, 8 << 20).unwrap();
    }

    #[test]
    fn trim_zero_and_extents_on_ext4() {
        trim_zero_and_extents_on(&std::env::temp_dir());
    }

    #[test]
    fn trim_zero_and_extents_on_tmpfs() {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            trim_zero_and_extents_on(shm);
            // tmpfs cannot zero a range in place: FAST_ZERO with NO_HOLE fails at once.
            let tmp = tempfile::NamedTempFile::new_in(shm).unwrap();
            tmp.as_file().set_len(1 << 20).unwrap();
            let backing = Backing::open(tmp.path()).unwrap();
            assert!(matches!(
                backing.write_zeroes(0, 4096, true, true),
                Err(ZeroError::NotFast)
            ));
        }
    }

    #[test]
    fn reading_past_the_end_of_the_file_is_an_error() {
        let (_tmp, backing) = backing_with(&[0u8; 512]);
        let mut buf = BytesMut::new();
        assert!(backing.read_into(&mut buf, 256, 512).is_err());
    }
}
