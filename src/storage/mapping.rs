//! A read-only shared mapping of the whole export, for replies that must be copied anyway.
//!
//! A READ over TLS cannot use `sendfile`: every byte goes through `SSL_write`, which copies
//! the plaintext into its record buffer before encrypting it in place. Reading the range
//! with `pread` first copies it once more (page cache into a buffer of ours), and that copy
//! was a third of a TLS session's CPU (perf, 1 GiB read with nbdcopy). Handing `SSL_write`
//! the mapped page-cache pages instead makes its own copy the only one.
//!
//! The same holds for large plain READs with others in flight, where `sendfile` is slow
//! (it sends part by part and wakes the client for each): writing them from the mapping
//! makes the socket's copy the only one.
//!
//! The mapping is only read where [`super::Backing::is_cached`] has just said every page is
//! in the page cache, so touching it does not wait for the disk on a session's thread.
//!
//! What a mapping costs, and why it is acceptable here:
//! - a page touched through it counts in the process's RSS (`RssFile`: page-cache pages,
//!   shared with the cache, not memory of ours), and the kernel reclaims mapped pages
//!   later than unmapped ones. So the mapping is emptied (`MADV_DONTNEED`: page-table
//!   entries dropped, the page cache untouched) each time [`RELEASE_EVERY`] bytes have been
//!   handed out: RSS stays bounded, and the pages age as any page cache does;
//! - if the file were truncated below the export size while served, touching the missing
//!   pages would raise SIGBUS. Truncation drops the pages past the new end from the page
//!   cache, so the `cachestat` check in front of every use sends those reads down the
//!   copying path (an error reply, the server lives on: `tests/errors_and_acl.rs`); only a
//!   truncation racing a read between the check and the copy could reach one. Shrinking
//!   an image under a running server already loses the guest's data, and C flexnbd maps
//!   its files without any such check.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// After this many bytes handed out, the mapping's page-table entries are dropped, which
/// bounds the pages it holds mapped (RSS) to about this much plus the replies being sent.
/// Refaulting a cached page afterwards maps 16 at a time (the kernel's fault-around), far
/// cheaper than the copy the mapping saves.
pub const RELEASE_EVERY: u64 = 64 << 20;

/// `len` bytes of a file, mapped `PROT_READ`, `MAP_SHARED`.
#[derive(Debug)]
pub struct Mapping {
    base: *mut libc::c_void,
    len: usize,
    /// Bytes handed out since the mapping was last emptied (see [`RELEASE_EVERY`]).
    handed_out: AtomicU64,
}

// SAFETY: the mapping is read-only and never moved or resized; reading it from several
// threads at once is reading shared memory, and unmapping happens only in `drop`, when no
// reference to it is left.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only gives out shared, read-only slices.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must be at least that long).
    pub fn new(file: &File, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad mapping length"))?;
        // SAFETY: a fresh mapping at an address of the kernel's choosing: it aliases no
        // memory of ours. The descriptor is open for the duration of the call, and the
        // mapping outlives it safely (the kernel holds its own reference to the file).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base,
            len,
            handed_out: AtomicU64::new(0),
        })
    }

    /// The mapped bytes.
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `base` is a live mapping of `len` readable bytes until `drop`, and `&self`
        // keeps it alive. Writes to the file show through (the page cache is shared): the
        // slice's contents may change under a reader, as a READ racing a WRITE may see
        // either, which NBD allows; no Rust reference to these bytes is ever mutable.
        unsafe { std::slice::from_raw_parts(self.base.cast::<u8>(), self.len) }
    }

    /// `offset..offset + len` of the mapping as `Bytes` that keep the mapping alive, or
    /// `None` if the range does not lie inside it.
    pub fn bytes(self: &Arc<Self>, offset: u64, len: usize) -> Option<Bytes> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        let before = self.handed_out.fetch_add(len as u64, Ordering::Relaxed);
        if before + len as u64 >= RELEASE_EVERY {
            self.handed_out.store(0, Ordering::Relaxed);
            self.release();
        }
        Some(Bytes::from_owner(MappedRange {
            mapping: self.clone(),
            start,
            end,
        }))
    }
}

impl Mapping {
    /// Drops every page-table entry of the mapping. The page cache keeps the pages; the
    /// next touch maps them again, with the file's current contents. Slices being read at
    /// that moment (replies being written) simply fault their pages back in.
    fn release(&self) {
        // SAFETY: `base`/`len` are the live mapping; MADV_DONTNEED on a shared file mapping
        // changes no byte anyone reads (later reads see the file, as before), it only
        // makes the next access fault.
        let r = unsafe { libc::madvise(self.base, self.len, libc::MADV_DONTNEED) };
        if r != 0 {
            tracing::debug!(
                "madvise(DONTNEED) on the export mapping: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned, unmapped once; no slice of
        // it outlives `self` (every `Bytes` over it holds an `Arc<Mapping>`).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The owner behind a `Bytes` of mapped pages: keeps the mapping alive while the reply
/// that carries them is being written.
struct MappedRange {
    mapping: Arc<Mapping>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MappedRange {
    fn as_ref(&self) -> &[u8] {
        &self.mapping.as_slice()[self.start..self.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn file_with(data: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn ranges_read_the_file_and_outlive_nothing() {
        let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let map = Arc::new(Mapping::new(f.as_file(), data.len() as u64).unwrap());
        let b = map.bytes(4000, 200).unwrap();
        assert_eq!(&b[..], &data[4000..4200]);
        assert_eq!(&map.bytes(0, data.len()).unwrap()[..], &data[..]);
        // The Bytes keeps the mapping alive after the last other reference is gone.
        drop(map);
        assert_eq!(&b[..], &data[4000..4200]);
    }

    #[test]
    fn ranges_outside_are_refused() {
        let f = file_with(&[7u8; 8192]);
        let map = Arc::new(Mapping::new(f.as_file(), 8192).unwrap());
        assert!(map.bytes(8192, 1).is_none());
        assert!(map.bytes(8000, 193).is_none());
        assert!(map.bytes(u64::MAX, 1).is_none());
        assert_eq!(map.bytes(8191, 1).unwrap()[..], [7u8]);
        assert!(Mapping::new(f.as_file(), 0).is_err());
    }

    /// The mapping's resident size in KiB, from `/proc/self/smaps` (what RSS counts).
    fn resident_kib(map: &Mapping) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{:x}-", map.base as usize);
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("the mapping is listed in smaps")
    }

    #[test]
    fn releasing_empties_the_mapping_and_keeps_every_byte() {
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
        let f = file_with(&data);
        let map = Arc::new(Mapping::new(f.as_file(), data.len() as u64).unwrap());
        let held = map.bytes(1000, 300_000).unwrap();
        let whole = map.bytes(0, data.len()).unwrap();
        assert_eq!(&whole[..], &data[..]);
        assert!(resident_kib(&map) >= 1024, "every page was touched");
        map.release();
        assert_eq!(resident_kib(&map), 0, "released: no page mapped");
        // Slices taken before the release still read the file.
        assert_eq!(&held[..], &data[1000..301_000]);
        assert_eq!(&whole[..], &data[..]);
        // Handing out more than the bound releases on its own.
        let rounds = (RELEASE_EVERY >> 20) as usize + 1;
        for _ in 0..rounds {
            let b = map.bytes(0, data.len()).unwrap();
            assert_eq!(b[b.len() - 1], data[data.len() - 1]);
        }
        assert!(map.handed_out.load(Ordering::Relaxed) < RELEASE_EVERY);
    }

    #[test]
    fn writes_to_the_file_show_through() {
        let f = file_with(&[0u8; 4096]);
        let map = Arc::new(Mapping::new(f.as_file(), 4096).unwrap());
        f.as_file().write_all_at(b"fresh", 100).unwrap();
        assert_eq!(&map.bytes(100, 5).unwrap()[..], b"fresh");
    }
}
