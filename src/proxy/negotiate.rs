//! Fixed new-style negotiation towards the proxy's clients (`--newstyle`).
//!
//! The negotiation itself is our server's ([`ServerNegotiation`]); this module only makes
//! the transmission flags it announces those of upstream. A proxy offers what upstream
//! does: announcing TRIM to a client of an upstream that refuses it would turn every trim
//! into an error. The flags travel in two places, both rewritten here before they are sent:
//! the `NBD_INFO_EXPORT` reply to INFO and GO, and the reply to EXPORT_NAME.

use crate::protocol::newstyle::{
    info, rep, BlockSize, NegotiationConfig, ServerNegotiation, OPTION_REPLY_HEADER_LEN,
    OPTION_REPLY_MAGIC,
};
use crate::protocol::tflags;

/// A negotiation for an export of upstream's `size` and `flags`.
pub fn negotiation(size: u64, flags: u16) -> ServerNegotiation {
    ServerNegotiation::new(NegotiationConfig {
        export_name: String::new(),
        description: Some("flexnbd-proxy".into()),
        size,
        read_only: flags & tflags::READ_ONLY != 0,
        block_size: BlockSize::DEFAULT,
        can_multi_conn: false,
        shutting_down: false,
    })
}

/// Rewrites the transmission flags in `out`, the bytes one call of
/// [`ServerNegotiation::feed`] produced: whole option replies, possibly followed by the
/// reply to EXPORT_NAME (size, flags, padding), which has no header.
pub fn with_upstream_flags(out: &mut [u8], flags: u16) {
    let mut at = 0;
    while at < out.len() {
        let rest = &out[at..];
        let is_reply =
            rest.len() >= OPTION_REPLY_HEADER_LEN && rest[..8] == OPTION_REPLY_MAGIC.to_be_bytes();
        if !is_reply {
            // The EXPORT_NAME reply: size (8 bytes), then the flags.
            if rest.len() >= 10 {
                out[at + 8..at + 10].copy_from_slice(&flags.to_be_bytes());
            }
            return;
        }
        let kind = u32::from_be_bytes(rest[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(rest[16..20].try_into().expect("4 bytes")) as usize;
        let payload = at + OPTION_REPLY_HEADER_LEN;
        let is_export = kind == rep::INFO
            && len >= 12
            && out.len() >= payload + 12
            && out[payload..payload + 2] == info::EXPORT.to_be_bytes();
        if is_export {
            out[payload + 10..payload + 12].copy_from_slice(&flags.to_be_bytes());
        }
        at = payload + len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::newstyle::{client_flags, opt, Progress};
    use crate::protocol::IHAVEOPT;
    use bytes::{BufMut, BytesMut};

    fn option(code: u32, data: &[u8], into: &mut BytesMut) {
        into.put_u64(IHAVEOPT);
        into.put_u32(code);
        into.put_u32(data.len() as u32);
        into.put_slice(data);
    }

    /// Every `NBD_INFO_EXPORT` in `out`: (size, flags).
    fn exports(out: &[u8]) -> Vec<(u64, u16)> {
        let mut found = Vec::new();
        let mut at = 0;
        while at + OPTION_REPLY_HEADER_LEN <= out.len() {
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().unwrap());
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().unwrap()) as usize;
            let p = &out[at + 20..at + 20 + len];
            if kind == rep::INFO && p[..2] == info::EXPORT.to_be_bytes() {
                let size = u64::from_be_bytes(p[2..10].try_into().unwrap());
                found.push((size, u16::from_be_bytes(p[10..12].try_into().unwrap())));
            }
            at += 20 + len;
        }
        found
    }

    #[test]
    fn go_announces_upstreams_flags() {
        let mut n = negotiation(1 << 20, 13);
        let mut input = BytesMut::new();
        input.put_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
        let mut go = Vec::new();
        go.extend_from_slice(&0u32.to_be_bytes()); // empty name
        go.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        option(opt::INFO, &go, &mut input);
        option(opt::GO, &go, &mut input);
        let mut out = Vec::new();
        let progress = n.feed(&mut input, &mut out).unwrap();
        assert!(matches!(progress, Progress::Done(_)));
        assert!(exports(&out).iter().all(|&(_, f)| f != 13), "ours differ");
        with_upstream_flags(&mut out, 13);
        assert_eq!(exports(&out), [(1 << 20, 13), (1 << 20, 13)]);
    }

    #[test]
    fn export_name_announces_upstreams_flags() {
        let mut n = negotiation(4096, 13);
        let mut input = BytesMut::new();
        input.put_u32(client_flags::FIXED_NEWSTYLE);
        option(opt::EXPORT_NAME, b"", &mut input);
        let mut out = Vec::new();
        let progress = n.feed(&mut input, &mut out).unwrap();
        assert!(matches!(progress, Progress::Done(_)));
        with_upstream_flags(&mut out, 13);
        assert_eq!(&out[..8], &4096u64.to_be_bytes());
        assert_eq!(&out[8..10], &13u16.to_be_bytes());
        assert_eq!(out.len(), 10 + 124);
    }
}
