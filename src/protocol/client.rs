//! The client side of the handshakes, for our own outbound connections (the mirror):
//! old-style (C flexnbd, ours) and fixed new-style (qemu-nbd, nbdkit, nbd-server).
//!
//! Pure helpers: the mirror reads the first 16 bytes, asks [`classify`] which handshake it
//! is, and for new-style sends [`go_request`] and decodes the option replies with
//! [`decode_option_reply`] and [`parse_info_export`].

use super::consts::{IHAVEOPT, NBD_MAGIC, OLDSTYLE_MAGIC};
use super::newstyle::{client_flags, hflags, opt, OPTION_REPLY_MAGIC};

/// What the first 16 bytes of a server's greeting say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Greeting {
    /// Old-style: 136 more bytes of hello follow.
    Oldstyle,
    /// New-style: a 16-bit handshake flags field follows.
    Newstyle,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("the server's greeting does not start with NBDMAGIC")]
    NotNbd,
    #[error("unknown handshake magic {0:#018x}")]
    UnknownHandshake(u64),
    #[error("the server does not offer fixed new-style negotiation")]
    NotFixedNewstyle,
    #[error("bad option reply magic {0:#018x}")]
    BadReplyMagic(u64),
    #[error("option reply of {0} bytes is too long")]
    ReplyTooLong(u32),
    #[error("the server refused the export (option reply {0:#x})")]
    Refused(u32),
    #[error("malformed NBD_INFO_EXPORT")]
    BadInfo,
}

/// Largest option reply payload we read.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;

pub fn classify(first16: &[u8; 16]) -> Result<Greeting, ClientError> {
    let passwd = u64::from_be_bytes(first16[0..8].try_into().expect("8 bytes"));
    if passwd != NBD_MAGIC {
        return Err(ClientError::NotNbd);
    }
    match u64::from_be_bytes(first16[8..16].try_into().expect("8 bytes")) {
        OLDSTYLE_MAGIC => Ok(Greeting::Oldstyle),
        IHAVEOPT => Ok(Greeting::Newstyle),
        other => Err(ClientError::UnknownHandshake(other)),
    }
}

/// Our answer to the server's handshake flags: the client flags (4 bytes), then NBD_OPT_GO
/// for `export` with no information requests.
pub fn go_request(server_flags: u16, export: &str) -> Result<Vec<u8>, ClientError> {
    if server_flags & hflags::FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    let mut flags = client_flags::FIXED_NEWSTYLE;
    if server_flags & hflags::NO_ZEROES != 0 {
        flags |= client_flags::NO_ZEROES;
    }
    let mut out = Vec::with_capacity(32 + export.len());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt::GO.to_be_bytes());
    out.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    Ok(out)
}

/// An option reply header: `(option, reply type, payload length)`.
pub fn decode_option_reply(header: &[u8; 20]) -> Result<(u32, u32, u32), ClientError> {
    let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(magic));
    }
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let len = be32(16);
    if len > MAX_OPTION_REPLY {
        return Err(ClientError::ReplyTooLong(len));
    }
    Ok((be32(8), be32(12), len))
}

/// The size and transmission flags of an `NBD_REP_INFO` payload, if it is `NBD_INFO_EXPORT`.
pub fn parse_info_export(payload: &[u8]) -> Result<Option<(u64, u16)>, ClientError> {
    if payload.len() < 2 {
        return Err(ClientError::BadInfo);
    }
    if u16::from_be_bytes([payload[0], payload[1]]) != super::newstyle::info::EXPORT {
        return Ok(None);
    }
    if payload.len() != 12 {
        return Err(ClientError::BadInfo);
    }
    let size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes([payload[10], payload[11]]);
    Ok(Some((size, flags)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::newstyle::{BlockSize, NegotiationConfig, Progress, ServerNegotiation};
    use bytes::BytesMut;

    #[test]
    fn our_client_negotiates_with_our_server() {
        let server_config = NegotiationConfig {
            export_name: "disk".into(),
            description: None,
            size: 1 << 20,
            read_only: false,
            block_size: BlockSize::DEFAULT,
            can_multi_conn: true,
            shutting_down: false,
        };
        let mut server = ServerNegotiation::new(server_config);
        let greeting = server.greeting();
        let first16: [u8; 16] = greeting[..16].try_into().unwrap();
        assert_eq!(classify(&first16), Ok(Greeting::Newstyle));
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        let mut input = BytesMut::from(&go_request(flags, "disk").unwrap()[..]);
        let mut out = Vec::new();
        assert!(matches!(
            server.feed(&mut input, &mut out),
            Ok(Progress::Done(_))
        ));
        // The server's replies: INFO (export) then ACK.
        let mut pos = 0;
        let mut export = None;
        loop {
            let header: [u8; 20] = out[pos..pos + 20].try_into().unwrap();
            let (option, kind, len) = decode_option_reply(&header).unwrap();
            assert_eq!(option, opt::GO);
            let payload = &out[pos + 20..pos + 20 + len as usize];
            pos += 20 + len as usize;
            match kind {
                3 => export = parse_info_export(payload).unwrap().or(export),
                1 => break,
                other => panic!("unexpected reply {other:#x}"),
            }
        }
        let (size, tflags) = export.unwrap();
        assert_eq!(size, 1 << 20);
        assert_ne!(tflags & crate::protocol::tflags::SEND_WRITE_ZEROES, 0);
    }

    #[test]
    fn refuses_what_it_cannot_speak() {
        let mut bad = [0u8; 16];
        assert_eq!(classify(&bad), Err(ClientError::NotNbd));
        bad[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        assert!(matches!(
            classify(&bad),
            Err(ClientError::UnknownHandshake(_))
        ));
        assert_eq!(go_request(0, ""), Err(ClientError::NotFixedNewstyle));
        assert_eq!(parse_info_export(&[0, 0, 1]), Err(ClientError::BadInfo));
        assert_eq!(parse_info_export(&[0, 1, 0, 0]), Ok(None));
    }
}
