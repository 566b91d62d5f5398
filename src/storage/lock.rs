//! Exclusive use of the served file: an advisory `flock` held for as long as the file is
//! open.
//!
//! Nothing in NBD stops two servers from serving one file (qemu-nbd does not stop it
//! either), and an operator with a duplicated unit then silently has two writers whose
//! caches and migrations know nothing of each other. Every `serve` and `listen` takes the
//! lock before it binds its port; a read-only server takes it shared, so read-only servers
//! can share a file but never with a writer. `flock` locks belong to the open file
//! description, so the other descriptors this process opens on the file (the allocation
//! walk, the identity check) neither take nor release it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open file description holds a conflicting lock; `holder` is its process
    /// when `/proc/locks` tells it.
    #[error("it is locked by {}", holder_text(*.holder))]
    Held { holder: Option<u32> },
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    }
}

/// Takes an exclusive (or, `shared`, a shared) `flock` on `file` without waiting.
pub fn lock(file: &File, shared: bool) -> Result<(), LockError> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    loop {
        // SAFETY: flock only reads its two integer arguments; the descriptor is open for
        // as long as `file` lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(LockError::Held {
                    holder: holder_of(file),
                })
            }
            _ => return Err(error.into()),
        }
    }
}

/// The process holding a `flock` on `file`'s inode, from `/proc/locks`.
fn holder_of(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// Parses `/proc/locks` lines such as `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`
/// (the device as hexadecimal major:minor, the inode in decimal) for a lock on `(dev, ino)`.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "N: ->"; it holds nothing.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = fields.get(4)?.parse().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_exclusive_lock_is_refused_and_names_the_holder() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let first = File::open(file.path()).unwrap();
        lock(&first, false).unwrap();
        let second = File::open(file.path()).unwrap();
        match lock(&second, false) {
            Err(LockError::Held { holder }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        assert!(matches!(lock(&second, true), Err(LockError::Held { .. })));
        drop(first);
        lock(&second, false).expect("free once the holder closed the file");
    }

    #[test]
    fn shared_locks_share_but_exclude_a_writer() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let a = File::open(file.path()).unwrap();
        let b = File::open(file.path()).unwrap();
        lock(&a, true).unwrap();
        lock(&b, true).unwrap();
        let c = File::open(file.path()).unwrap();
        assert!(matches!(lock(&c, false), Err(LockError::Held { .. })));
    }

    #[test]
    fn proc_locks_lines_are_matched_by_device_and_inode() {
        let dev = libc::makedev(8, 1);
        let locks = "1: POSIX  ADVISORY  WRITE 99 08:01:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 4321 08:01:5678 0 EOF\n";
        assert_eq!(holder_in(locks, dev, 5678), Some(1234));
        assert_eq!(holder_in(locks, dev, 77), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(locks, libc::makedev(8, 2), 5678), None);
    }
}
