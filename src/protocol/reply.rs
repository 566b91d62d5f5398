//! Reply headers.
//!
//! Old-style and plain new-style clients get 16-byte simple replies. Structured replies and
//! extended headers add chunk encoders beside this one; the session only ever asks for
//! "the header of a successful read" or "an error reply", so it does not care which
//! encoding is in force.

use super::consts::{SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};
use super::errno::Errno;
use super::wire::Reader;

/// Encodes a simple reply: magic, error, cookie.
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.map_or(0, |e| e.0).to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A simple reply as a client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Decodes a simple reply header; `None` if the magic is wrong.
pub fn decode_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Option<SimpleReply> {
    let mut r = Reader::new(bytes);
    if r.u32()? != SIMPLE_REPLY_MAGIC {
        return None;
    }
    Some(SimpleReply {
        error: r.u32()?,
        cookie: r.u64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let bytes = simple_reply(0x0102_0304_0506_0708, Some(Errno::ENOSPC));
        assert_eq!(&bytes[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&bytes[4..8], &[0, 0, 0, 28]);
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            decode_simple_reply(&bytes),
            Some(SimpleReply {
                error: 28,
                cookie: 0x0102_0304_0506_0708
            })
        );
    }
}
