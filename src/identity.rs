//! Who this server is, for the IDENTIFY request (see `protocol::handoff::IDENTIFY`): a
//! random id per process, the host's boot id, and the exported file's device and inode.

use std::sync::OnceLock;

use crate::protocol::handoff::Identity;
use crate::storage::Backing;

/// 16 random bytes from the kernel, mixed with the time (ids of one process stay distinct
/// even if the kernel gave fewer bytes).
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: `id` is a valid, writable 16-byte buffer; getrandom writes at most that many
    // bytes. A short or failed read leaves part of the buffer unchanged, which only makes
    // the id less random, never unsound.
    unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_le_bytes();
    for (b, t) in id.iter_mut().zip(now) {
        *b ^= t;
    }
    id
}

/// This process's server id.
pub fn server_id() -> [u8; 16] {
    static ID: OnceLock<[u8; 16]> = OnceLock::new();
    *ID.get_or_init(random_id)
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`, a UUID), or zeros when it
/// cannot be read.
pub fn boot_id() -> [u8; 16] {
    static BOOT: OnceLock<[u8; 16]> = OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|text| parse_uuid(text.trim()))
            .unwrap_or_else(|| {
                tracing::warn!("Couldn't read the boot id; same-file detection is weaker");
                [0; 16]
            })
    })
}

fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// This server's identity for `backing`.
pub fn of(backing: &Backing) -> std::io::Result<Identity> {
    let (dev, ino) = backing.file_id()?;
    Ok(Identity {
        server: server_id(),
        boot: boot_id(),
        dev,
        ino,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_parse() {
        let id = parse_uuid("0123abcd-4567-89ef-0123-456789abcdef").unwrap();
        assert_eq!(id[0], 0x01);
        assert_eq!(id[15], 0xef);
        assert_eq!(parse_uuid("nope"), None);
        assert_eq!(server_id(), server_id());
    }
}
