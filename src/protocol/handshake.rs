//! Handshakes: what a server sends before the first request.
//!
//! Old-style is the default because C flexnbd peers speak nothing else
//! (`flexnbd-compat.md` §4.1). The hello is parsed here too, for our client modes
//! (`read`, `write`, and the mirror).

use super::consts::{NBD_MAGIC, OLDSTYLE_HELLO_LEN, OLDSTYLE_MAGIC};
use super::wire::Reader;

/// The export as an old-style hello announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OldstyleHello {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (the high 16 bits of the 32-bit field are always zero).
    pub flags: u16,
}

/// Why a received hello was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("the hello does not start with NBDMAGIC")]
    BadPasswd,
    #[error("the hello's second magic is {0:#018x}, not the old-style magic")]
    BadMagic(u64),
}

impl OldstyleHello {
    /// Encodes the 152-byte hello: NBDMAGIC, magic, size, flags, 124 zero bytes.
    pub fn encode(&self) -> [u8; OLDSTYLE_HELLO_LEN] {
        let mut out = [0u8; OLDSTYLE_HELLO_LEN];
        out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        out[16..24].copy_from_slice(&self.size.to_be_bytes());
        out[24..28].copy_from_slice(&u32::from(self.flags).to_be_bytes());
        out
    }

    /// Decodes a hello as a client must: the two magics are checked, the padding ignored.
    ///
    /// C flexnbd ignores the high 16 bits of the flags field (global flags); so do we.
    pub fn decode(bytes: &[u8; OLDSTYLE_HELLO_LEN]) -> Result<OldstyleHello, HelloError> {
        let mut r = Reader::new(bytes);
        let (Some(passwd), Some(magic), Some(size), Some(flags32)) =
            (r.u64(), r.u64(), r.u64(), r.u32())
        else {
            unreachable!("a hello holds {OLDSTYLE_HELLO_LEN} bytes");
        };
        if passwd != NBD_MAGIC {
            return Err(HelloError::BadPasswd);
        }
        if magic != OLDSTYLE_MAGIC {
            return Err(HelloError::BadMagic(magic));
        }
        Ok(OldstyleHello {
            size,
            flags: (flags32 & 0xffff) as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_layout_matches_flexnbd() {
        let hello = OldstyleHello {
            size: 1 << 20,
            flags: 13,
        };
        let bytes = hello.encode();
        assert_eq!(&bytes[0..8], b"NBDMAGIC");
        assert_eq!(&bytes[8..16], &[0, 0, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
        assert_eq!(&bytes[16..24], &[0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(&bytes[24..28], &[0, 0, 0, 13]);
        assert!(bytes[28..].iter().all(|b| *b == 0));
        assert_eq!(OldstyleHello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn hello_with_wrong_magics_is_refused() {
        let mut bytes = OldstyleHello {
            size: 512,
            flags: 13,
        }
        .encode();
        bytes[0] = b'X';
        assert_eq!(OldstyleHello::decode(&bytes), Err(HelloError::BadPasswd));
        let mut bytes = OldstyleHello {
            size: 512,
            flags: 13,
        }
        .encode();
        bytes[15] ^= 1;
        assert!(matches!(
            OldstyleHello::decode(&bytes),
            Err(HelloError::BadMagic(_))
        ));
    }
}
