//! Structured replies and extended headers: chunk encoders for the server, chunk decoders for
//! the client.
//!
//! Three reply encodings exist once new-style negotiation is over ([`ReplyStyle`]): 16-byte
//! simple replies, 20-byte structured chunk headers (compact, 32-bit lengths) and 32-bit
//! extended chunk headers (64-bit lengths, the request's offset echoed). A session asks for
//! "an OK reply", "an error reply", "the header of a READ's data" or "a block status reply"
//! and the style picks the encoding, so the session never branches on what was negotiated.
//!
//! The decoders serve our tests and our client modes. They never trust a length field: the
//! header decoder only reports the payload length (the caller must bound it before reading
//! that many bytes), and the payload decoder checks every inner length against the payload
//! it was handed.

use std::borrow::Cow;

use super::consts::{
    EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::errno::Errno;
use super::reply::{decode_simple_reply, simple_reply, SimpleReply};
use super::request::Request;
use super::wire::Reader;

/// Length of a structured (compact) chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of an extended chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// Chunk flag: this is the last chunk of the reply.
pub const FLAG_DONE: u16 = 1 << 0;

/// Chunk types (the `type` field of a chunk header).
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Set in every error chunk type, known or not.
    pub const ERROR_BIT: u16 = 1 << 15;
}

/// Most descriptors one block status chunk may carry (the protocol's limit).
pub const MAX_EXTENTS_PER_CHUNK: usize = 1 << 20;

/// Longest error message we put in an ERROR chunk; longer messages are cut at a character
/// boundary. The protocol caps strings at 4096 bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Length a compact descriptor gets when its extent does not fit 32 bits.
///
/// It is the largest 32-bit value that is a multiple of every legal minimum block size
/// (powers of two up to 64 KiB), so a clipped extent never breaks the client's alignment.
/// The reply then covers less than was asked, which the protocol allows.
pub const COMPACT_EXTENT_CLIP: u32 = 0xffff_0000;

/// How replies are encoded on this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyStyle {
    /// 16-byte simple replies only (old-style, or new-style without structured replies).
    Simple,
    /// Structured replies with 20-byte chunk headers (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// 32-byte chunk headers with 64-bit lengths (NBD_OPT_EXTENDED_HEADERS).
    Extended,
}

impl ReplyStyle {
    /// Length of one reply header (simple) or chunk header (the other two).
    pub fn header_len(self) -> usize {
        match self {
            ReplyStyle::Simple => SIMPLE_REPLY_LEN,
            ReplyStyle::Structured => STRUCTURED_HEADER_LEN,
            ReplyStyle::Extended => EXTENDED_HEADER_LEN,
        }
    }
}

/// The request a reply answers: the cookie pairs them, the offset is echoed by extended
/// chunk headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    pub offset: u64,
}

impl From<&Request> for ReplyTo {
    fn from(req: &Request) -> ReplyTo {
        ReplyTo {
            cookie: req.cookie,
            offset: req.offset,
        }
    }
}

/// A chunk header, in either chunk style.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`FLAG_DONE`] or 0; other bits are undefined and kept as received.
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    /// The request's offset. Only extended headers carry it: compact encoders ignore it and
    /// compact decoders set it to 0.
    pub offset: u64,
    /// Payload length. A compact header carries at most `u32::MAX`. Decoded from the wire
    /// it is untrusted: bound it before reading that many bytes.
    pub length: u64,
}

impl ChunkHeader {
    pub fn is_done(&self) -> bool {
        self.flags & FLAG_DONE != 0
    }

    pub fn is_error(&self) -> bool {
        self.chunk_type & chunk::ERROR_BIT != 0
    }
}

/// One run of blocks with the same status, as a block status reply describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; zero-length extents are never put on the wire.
    pub length: u64,
    /// Status flags of the metadata context (for `base:allocation`: bit 0 hole, bit 1
    /// zero). 64 bits because extended descriptors carry 64; compact ones carry 32.
    pub flags: u64,
}

/// What a block status chunk ended up describing, after truncation and clipping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coverage {
    /// Number of descriptors written.
    pub descriptors: usize,
    /// Sum of their lengths: the reply describes `[offset, offset + length)`.
    pub length: u64,
}

/// Why a chunk could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("simple replies have no chunks")]
    NotStructured,
    #[error("a payload of {0} bytes does not fit this chunk header")]
    TooLong(u64),
    #[error("extent flags {0:#x} do not fit a compact descriptor")]
    FlagsTooWide(u64),
    #[error("a block status reply needs at least one non-empty extent")]
    NoExtents,
    #[error("reply magic {0:#010x} is not valid in this reply style")]
    BadMagic(u32),
    #[error("malformed chunk of type {chunk_type}: {reason}")]
    Malformed {
        chunk_type: u16,
        reason: &'static str,
    },
}

/// Encodes a 20-byte structured chunk header.
pub fn structured_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// Encodes a 32-byte extended chunk header.
pub fn extended_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; EXTENDED_HEADER_LEN] {
    let mut out = [0u8; EXTENDED_HEADER_LEN];
    out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..32].copy_from_slice(&length.to_be_bytes());
    out
}

/// Payload prefix of an OFFSET_DATA chunk: the offset of the data that follows.
pub fn offset_data_prefix(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// Whole payload of an OFFSET_HOLE chunk: offset and size of a run that reads as zeros.
/// The size stays 32 bits even with extended headers.
pub fn offset_hole_payload(offset: u64, size: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..8].copy_from_slice(&offset.to_be_bytes());
    out[8..12].copy_from_slice(&size.to_be_bytes());
    out
}

/// Errno 0 means success on the wire; an error reply must never carry it.
fn nonzero(errno: Errno) -> Errno {
    if errno.0 == 0 {
        Errno::EIO
    } else {
        errno
    }
}

/// Cuts `message` to at most [`MAX_ERROR_MESSAGE`] bytes without splitting a character.
fn clip_message(message: &str) -> &str {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Length of an ERROR (or, with an offset, ERROR_OFFSET) payload for `message`.
fn error_payload_len(message: &str, offset: Option<u64>) -> u64 {
    6 + clip_message(message).len() as u64 + if offset.is_some() { 8 } else { 0 }
}

/// Appends the payload of an ERROR chunk (`offset` is `None`) or an ERROR_OFFSET chunk:
/// errno, message length, message, and the offset the error applies to.
///
/// An errno of 0 is sent as EIO; the message is clipped to [`MAX_ERROR_MESSAGE`] bytes.
pub fn error_payload(errno: Errno, message: &str, offset: Option<u64>, out: &mut Vec<u8>) {
    let message = clip_message(message);
    out.extend_from_slice(&nonzero(errno).0.to_be_bytes());
    // The clip keeps the length far below u16::MAX.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    if let Some(offset) = offset {
        out.extend_from_slice(&offset.to_be_bytes());
    }
}

impl ReplyStyle {
    /// Appends a chunk header in this style. Fails for [`ReplyStyle::Simple`] and for a
    /// compact header whose length does not fit 32 bits; nothing is written then.
    pub fn chunk_header(self, header: &ChunkHeader, out: &mut Vec<u8>) -> Result<(), ChunkError> {
        match self {
            ReplyStyle::Simple => Err(ChunkError::NotStructured),
            ReplyStyle::Structured => {
                let length =
                    u32::try_from(header.length).map_err(|_| ChunkError::TooLong(header.length))?;
                out.extend_from_slice(&structured_chunk_header(
                    header.flags,
                    header.chunk_type,
                    header.cookie,
                    length,
                ));
                Ok(())
            }
            ReplyStyle::Extended => {
                out.extend_from_slice(&extended_chunk_header(
                    header.flags,
                    header.chunk_type,
                    header.cookie,
                    header.offset,
                    header.length,
                ));
                Ok(())
            }
        }
    }

    /// A header for a chunk answering `to`.
    fn header_for(to: ReplyTo, flags: u16, chunk_type: u16, length: u64) -> ChunkHeader {
        ChunkHeader {
            flags,
            chunk_type,
            cookie: to.cookie,
            offset: to.offset,
            length,
        }
    }

    /// Appends a successful reply that carries no data (WRITE, FLUSH, TRIM, ...): a simple
    /// reply, or a NONE chunk with DONE.
    pub fn ok(self, to: ReplyTo, out: &mut Vec<u8>) {
        match self {
            ReplyStyle::Simple => out.extend_from_slice(&simple_reply(to.cookie, None)),
            ReplyStyle::Structured => out.extend_from_slice(&structured_chunk_header(
                FLAG_DONE,
                chunk::NONE,
                to.cookie,
                0,
            )),
            ReplyStyle::Extended => out.extend_from_slice(&extended_chunk_header(
                FLAG_DONE,
                chunk::NONE,
                to.cookie,
                to.offset,
                0,
            )),
        }
    }

    /// Appends a final error reply: a simple reply with `errno`, or an ERROR chunk with DONE
    /// carrying `message` (simple replies have no room for it). Errno 0 is sent as EIO.
    pub fn error(self, to: ReplyTo, errno: Errno, message: &str, out: &mut Vec<u8>) {
        let errno = nonzero(errno);
        if self == ReplyStyle::Simple {
            out.extend_from_slice(&simple_reply(to.cookie, Some(errno)));
            return;
        }
        let header = Self::header_for(
            to,
            FLAG_DONE,
            chunk::ERROR,
            error_payload_len(message, None),
        );
        // An error payload is at most a few KiB: it fits every chunk header.
        if self.chunk_header(&header, out).is_ok() {
            error_payload(errno, message, None, out);
        }
    }

    /// Appends an ERROR_OFFSET chunk: the read failed at `error_offset`. Not for simple
    /// replies, which cannot say where.
    pub fn error_at(
        self,
        to: ReplyTo,
        errno: Errno,
        message: &str,
        error_offset: u64,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        let flags = if done { FLAG_DONE } else { 0 };
        let length = error_payload_len(message, Some(error_offset));
        self.chunk_header(
            &Self::header_for(to, flags, chunk::ERROR_OFFSET, length),
            out,
        )?;
        error_payload(errno, message, Some(error_offset), out);
        Ok(())
    }

    /// Appends what precedes the whole data of a successful READ of `len` bytes at
    /// `to.offset`: a simple reply, or an OFFSET_DATA chunk header with DONE plus its offset
    /// prefix. The caller sends exactly `len` data bytes right after.
    ///
    /// An OFFSET_DATA chunk must carry data, so a zero-length read in a chunk style gets a
    /// NONE chunk instead (and no data follows). Fails, writing nothing, when `len` does not
    /// fit the chunk header.
    pub fn read_data_header(
        self,
        to: ReplyTo,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        if self != ReplyStyle::Simple && len == 0 {
            self.ok(to, out);
            return Ok(());
        }
        self.data_chunk_header(to, to.offset, len, true, out)
    }

    /// Appends the header of one piece of a READ's data: `len` bytes found at `data_offset`
    /// (which lies inside the request), with or without DONE. In simple style this is the
    /// simple reply header, valid only for a read answered in one piece.
    pub fn data_chunk_header(
        self,
        to: ReplyTo,
        data_offset: u64,
        len: u64,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        if self == ReplyStyle::Simple {
            out.extend_from_slice(&simple_reply(to.cookie, None));
            return Ok(());
        }
        let length = len.checked_add(8).ok_or(ChunkError::TooLong(len))?;
        let flags = if done { FLAG_DONE } else { 0 };
        self.chunk_header(
            &Self::header_for(to, flags, chunk::OFFSET_DATA, length),
            out,
        )?;
        out.extend_from_slice(&offset_data_prefix(data_offset));
        Ok(())
    }

    /// Appends a whole OFFSET_HOLE chunk: `size` bytes at `hole_offset` read as zeros.
    pub fn hole_chunk(
        self,
        to: ReplyTo,
        hole_offset: u64,
        size: u32,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkError> {
        let flags = if done { FLAG_DONE } else { 0 };
        self.chunk_header(&Self::header_for(to, flags, chunk::OFFSET_HOLE, 12), out)?;
        out.extend_from_slice(&offset_hole_payload(hole_offset, size));
        Ok(())
    }

    /// Appends one block status chunk for `context_id` describing `extents`, which start at
    /// `to.offset` and follow each other.
    ///
    /// The protocol lets a server describe less than was asked, so the list is cut rather
    /// than refused: zero-length extents are skipped; at most [`MAX_EXTENTS_PER_CHUNK`]
    /// descriptors are sent, only one with `req_one`; in structured (compact) style an
    /// extent longer than 32 bits is clipped to [`COMPACT_EXTENT_CLIP`] and ends the list,
    /// because later descriptors would otherwise be misplaced. Structured style uses
    /// BLOCK_STATUS (5), extended style BLOCK_STATUS_EXT (6).
    ///
    /// Fails, writing nothing, in simple style, when no extent is left, or when compact
    /// flags do not fit 32 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn block_status(
        self,
        to: ReplyTo,
        context_id: u32,
        extents: &[Extent],
        req_one: bool,
        done: bool,
        out: &mut Vec<u8>,
    ) -> Result<Coverage, ChunkError> {
        let compact = match self {
            ReplyStyle::Simple => return Err(ChunkError::NotStructured),
            ReplyStyle::Structured => true,
            ReplyStyle::Extended => false,
        };
        let limit = if req_one { 1 } else { MAX_EXTENTS_PER_CHUNK };
        let mut coverage = Coverage {
            descriptors: 0,
            length: 0,
        };
        for e in descriptors(extents, compact, limit) {
            if compact && e.flags > u64::from(u32::MAX) {
                return Err(ChunkError::FlagsTooWide(e.flags));
            }
            coverage.descriptors += 1;
            coverage.length = coverage.length.saturating_add(e.length);
        }
        if coverage.descriptors == 0 {
            return Err(ChunkError::NoExtents);
        }
        let n = coverage.descriptors as u64;
        let flags = if done { FLAG_DONE } else { 0 };
        if compact {
            let header = Self::header_for(to, flags, chunk::BLOCK_STATUS, 4 + 8 * n);
            self.chunk_header(&header, out)?;
            out.reserve(4 + 8 * coverage.descriptors);
            out.extend_from_slice(&context_id.to_be_bytes());
            for e in descriptors(extents, compact, limit) {
                // Both bounded to 32 bits above.
                out.extend_from_slice(&(e.length as u32).to_be_bytes());
                out.extend_from_slice(&(e.flags as u32).to_be_bytes());
            }
        } else {
            let header = Self::header_for(to, flags, chunk::BLOCK_STATUS_EXT, 8 + 16 * n);
            self.chunk_header(&header, out)?;
            out.reserve(8 + 16 * coverage.descriptors);
            out.extend_from_slice(&context_id.to_be_bytes());
            // At most 2^20 descriptors: the count fits 32 bits.
            out.extend_from_slice(&(coverage.descriptors as u32).to_be_bytes());
            for e in descriptors(extents, compact, limit) {
                out.extend_from_slice(&e.length.to_be_bytes());
                out.extend_from_slice(&e.flags.to_be_bytes());
            }
        }
        Ok(coverage)
    }
}

/// The descriptors a block status chunk carries for `extents` (see
/// [`ReplyStyle::block_status`]); deterministic, so it can be walked twice.
fn descriptors(
    extents: &[Extent],
    compact: bool,
    limit: usize,
) -> impl Iterator<Item = Extent> + '_ {
    let mut clipped = false;
    extents
        .iter()
        .filter(|e| e.length > 0)
        .take(limit)
        .map_while(move |e| {
            if clipped {
                return None;
            }
            if compact && e.length > u64::from(u32::MAX) {
                clipped = true;
                return Some(Extent {
                    length: u64::from(COMPACT_EXTENT_CLIP),
                    flags: e.flags,
                });
            }
            Some(*e)
        })
}

/// A reply header as a client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

/// Decodes the reply header at the start of `buf`.
///
/// Returns `Ok(None)` while `buf` is too short, or the header and the number of bytes it
/// took. Simple replies are accepted in simple and structured style (a structured server may
/// still send them for commands without data), never with extended headers, where every
/// reply is a chunk.
pub fn decode_reply_header(
    style: ReplyStyle,
    buf: &[u8],
) -> Result<Option<(ReplyHeader, usize)>, ChunkError> {
    let mut r = Reader::new(buf);
    let Some(magic) = r.u32() else {
        return Ok(None);
    };
    let simple_ok = style != ReplyStyle::Extended;
    let need = match magic {
        SIMPLE_REPLY_MAGIC if simple_ok => SIMPLE_REPLY_LEN,
        STRUCTURED_REPLY_MAGIC if style == ReplyStyle::Structured => STRUCTURED_HEADER_LEN,
        EXTENDED_REPLY_MAGIC if style == ReplyStyle::Extended => EXTENDED_HEADER_LEN,
        other => return Err(ChunkError::BadMagic(other)),
    };
    let Some(bytes) = buf.get(..need) else {
        return Ok(None);
    };
    if magic == SIMPLE_REPLY_MAGIC {
        let Ok(fixed) = <&[u8; SIMPLE_REPLY_LEN]>::try_from(bytes) else {
            return Ok(None);
        };
        return Ok(decode_simple_reply(fixed).map(|s| (ReplyHeader::Simple(s), need)));
    }
    let mut r = Reader::new(&bytes[4..]);
    let (Some(flags), Some(chunk_type), Some(cookie)) = (r.u16(), r.u16(), r.u64()) else {
        return Ok(None);
    };
    let (offset, length) = if magic == EXTENDED_REPLY_MAGIC {
        match (r.u64(), r.u64()) {
            (Some(offset), Some(length)) => (offset, length),
            _ => return Ok(None),
        }
    } else {
        match r.u32() {
            Some(length) => (0, u64::from(length)),
            None => return Ok(None),
        }
    };
    Ok(Some((
        ReplyHeader::Chunk(ChunkHeader {
            flags,
            chunk_type,
            cookie,
            offset,
            length,
        }),
        need,
    )))
}

/// A chunk payload as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// NONE: the reply is complete (always with DONE).
    None,
    /// OFFSET_DATA: `data` was read at `offset`.
    OffsetData { offset: u64, data: &'a [u8] },
    /// OFFSET_HOLE: `length` bytes at `offset` read as zeros.
    OffsetHole { offset: u64, length: u32 },
    /// BLOCK_STATUS or BLOCK_STATUS_EXT, both decoded to 64-bit extents.
    BlockStatus {
        context_id: u32,
        extents: Vec<Extent>,
    },
    /// ERROR, ERROR_OFFSET (with `offset`), or an error type we do not know, read with the
    /// layout every error chunk shares (errno, message length, message).
    Error {
        errno: u32,
        message: Cow<'a, str>,
        offset: Option<u64>,
    },
    /// A non-error type we do not know; a client must treat it as a protocol error.
    Unknown { chunk_type: u16 },
}

/// Decodes the payload of the chunk `header` announced.
///
/// `payload` must be the whole payload; every inner length is checked against it, and the
/// invariants the protocol puts on servers (non-empty data and extents, non-zero errors,
/// NONE only with DONE, the descriptor type matching the header style) are enforced.
pub fn decode_chunk_payload<'a>(
    style: ReplyStyle,
    header: &ChunkHeader,
    payload: &'a [u8],
) -> Result<ChunkPayload<'a>, ChunkError> {
    let chunk_type = header.chunk_type;
    let bad = |reason: &'static str| ChunkError::Malformed { chunk_type, reason };
    if payload.len() as u64 != header.length {
        return Err(bad("payload length differs from the header"));
    }
    let mut r = Reader::new(payload);
    match chunk_type {
        chunk::NONE => {
            if !payload.is_empty() {
                return Err(bad("NONE carries a payload"));
            }
            if !header.is_done() {
                return Err(bad("NONE without DONE"));
            }
            Ok(ChunkPayload::None)
        }
        chunk::OFFSET_DATA => {
            let offset = r.u64().ok_or(bad("shorter than its offset"))?;
            let data = r.rest();
            if data.is_empty() {
                return Err(bad("no data"));
            }
            Ok(ChunkPayload::OffsetData { offset, data })
        }
        chunk::OFFSET_HOLE => {
            let (Some(offset), Some(length)) = (r.u64(), r.u32()) else {
                return Err(bad("too short"));
            };
            if !r.rest().is_empty() {
                return Err(bad("trailing bytes"));
            }
            if length == 0 {
                return Err(bad("empty hole"));
            }
            Ok(ChunkPayload::OffsetHole { offset, length })
        }
        chunk::BLOCK_STATUS | chunk::BLOCK_STATUS_EXT => {
            let ext = chunk_type == chunk::BLOCK_STATUS_EXT;
            if ext != (style == ReplyStyle::Extended) {
                return Err(bad("descriptor type does not match the header style"));
            }
            let context_id = r.u32().ok_or(bad("too short"))?;
            let descriptor_len = if ext {
                let count = r.u32().ok_or(bad("too short"))?;
                if r.remaining() as u64 != u64::from(count) * 16 {
                    return Err(bad("descriptor count differs from the payload"));
                }
                16
            } else {
                8
            };
            let n = r.remaining() / descriptor_len;
            if !r.remaining().is_multiple_of(descriptor_len) {
                return Err(bad("partial descriptor"));
            }
            if n == 0 {
                return Err(bad("no descriptor"));
            }
            if n > MAX_EXTENTS_PER_CHUNK {
                return Err(bad("more descriptors than a chunk may carry"));
            }
            // n is bounded by the payload we were handed and by the protocol limit.
            let mut extents = Vec::with_capacity(n);
            for _ in 0..n {
                let e = if ext {
                    r.u64().zip(r.u64())
                } else {
                    r.u32()
                        .zip(r.u32())
                        .map(|(l, f)| (u64::from(l), u64::from(f)))
                };
                let (length, flags) = e.ok_or(bad("too short"))?;
                if length == 0 {
                    return Err(bad("empty extent"));
                }
                extents.push(Extent { length, flags });
            }
            Ok(ChunkPayload::BlockStatus {
                context_id,
                extents,
            })
        }
        t if t & chunk::ERROR_BIT != 0 => {
            let (Some(errno), Some(len)) = (r.u32(), r.u16()) else {
                return Err(bad("too short"));
            };
            if errno == 0 {
                return Err(bad("error value 0"));
            }
            let message = r
                .take(usize::from(len))
                .ok_or(bad("message overruns the payload"))?;
            let offset = match t {
                chunk::ERROR_OFFSET => Some(r.u64().ok_or(bad("too short for its offset"))?),
                _ => None,
            };
            // Unknown error types may carry more after the message; known ones may not.
            if (t == chunk::ERROR || t == chunk::ERROR_OFFSET) && !r.rest().is_empty() {
                return Err(bad("trailing bytes"));
            }
            Ok(ChunkPayload::Error {
                errno,
                message: String::from_utf8_lossy(message),
                offset,
            })
        }
        other => Ok(ChunkPayload::Unknown { chunk_type: other }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STYLES: [ReplyStyle; 3] = [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ];
    const TO: ReplyTo = ReplyTo {
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
    };

    /// Decodes one whole reply (header and payload) from `bytes`, which must hold exactly it.
    fn decode_one(style: ReplyStyle, bytes: &[u8]) -> (ReplyHeader, Option<ChunkPayload<'_>>) {
        let (header, used) = decode_reply_header(style, bytes).unwrap().unwrap();
        match header {
            ReplyHeader::Simple(_) => {
                assert_eq!(used, bytes.len());
                (header, None)
            }
            ReplyHeader::Chunk(h) => {
                assert_eq!(used as u64 + h.length, bytes.len() as u64);
                let payload = decode_chunk_payload(style, &h, &bytes[used..]).unwrap();
                (header, Some(payload))
            }
        }
    }

    #[test]
    fn structured_header_layout() {
        let h = structured_chunk_header(FLAG_DONE, chunk::OFFSET_DATA, 0x1122, 0x0a0b_0c0d);
        assert_eq!(
            h,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0x11, 0x22, 0x0a, 0x0b, 0x0c,
                0x0d
            ]
        );
    }

    #[test]
    fn extended_header_layout() {
        let h = extended_chunk_header(0, chunk::BLOCK_STATUS_EXT, 7, 0x200, 0x1_0000_0000);
        assert_eq!(&h[0..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(&h[4..8], &[0, 0, 0, 6]);
        assert_eq!(&h[8..16], &7u64.to_be_bytes());
        assert_eq!(&h[16..24], &0x200u64.to_be_bytes());
        assert_eq!(&h[24..32], &[0, 0, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn ok_reply_in_every_style() {
        let mut out = Vec::new();
        ReplyStyle::Simple.ok(TO, &mut out);
        assert_eq!(out, simple_reply(TO.cookie, None));

        out.clear();
        ReplyStyle::Structured.ok(TO, &mut out);
        assert_eq!(
            out,
            structured_chunk_header(FLAG_DONE, chunk::NONE, TO.cookie, 0)
        );

        out.clear();
        ReplyStyle::Extended.ok(TO, &mut out);
        assert_eq!(
            out,
            extended_chunk_header(FLAG_DONE, chunk::NONE, TO.cookie, TO.offset, 0)
        );
        assert_eq!(
            decode_one(ReplyStyle::Extended, &out).1,
            Some(ChunkPayload::None)
        );
    }

    #[test]
    fn error_reply_layout() {
        let mut out = Vec::new();
        ReplyStyle::Simple.error(TO, Errno::ENOSPC, "ignored", &mut out);
        assert_eq!(out, simple_reply(TO.cookie, Some(Errno::ENOSPC)));

        out.clear();
        ReplyStyle::Structured.error(TO, Errno::EIO, "disk", &mut out);
        let mut expected = structured_chunk_header(FLAG_DONE, chunk::ERROR, TO.cookie, 10).to_vec();
        expected.extend_from_slice(&[0, 0, 0, 5, 0, 4]);
        expected.extend_from_slice(b"disk");
        assert_eq!(out, expected);

        // Errno 0 never travels in an error reply.
        out.clear();
        ReplyStyle::Extended.error(TO, Errno(0), "", &mut out);
        match decode_one(ReplyStyle::Extended, &out).1 {
            Some(ChunkPayload::Error { errno, .. }) => assert_eq!(errno, 5),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_error_messages_are_clipped_at_a_character_boundary() {
        let message = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        ReplyStyle::Structured.error(TO, Errno::EIO, &message, &mut out);
        match decode_one(ReplyStyle::Structured, &out).1 {
            Some(ChunkPayload::Error { message, .. }) => {
                assert_eq!(message.len(), 4096);
                assert!(message.chars().all(|c| c == 'é'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn read_data_header_layout() {
        let mut out = Vec::new();
        ReplyStyle::Simple
            .read_data_header(TO, 512, &mut out)
            .unwrap();
        assert_eq!(out, simple_reply(TO.cookie, None));

        out.clear();
        ReplyStyle::Structured
            .read_data_header(TO, 512, &mut out)
            .unwrap();
        let mut expected =
            structured_chunk_header(FLAG_DONE, chunk::OFFSET_DATA, TO.cookie, 520).to_vec();
        expected.extend_from_slice(&TO.offset.to_be_bytes());
        assert_eq!(out, expected);

        out.clear();
        ReplyStyle::Extended
            .read_data_header(TO, 512, &mut out)
            .unwrap();
        let mut expected =
            extended_chunk_header(FLAG_DONE, chunk::OFFSET_DATA, TO.cookie, TO.offset, 520)
                .to_vec();
        expected.extend_from_slice(&TO.offset.to_be_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn read_data_header_bounds() {
        let mut out = Vec::new();
        // 8 + len must fit the compact header.
        assert_eq!(
            ReplyStyle::Structured.read_data_header(TO, u64::from(u32::MAX) - 7, &mut out),
            Err(ChunkError::TooLong(u64::from(u32::MAX) + 1))
        );
        assert_eq!(
            ReplyStyle::Extended.read_data_header(TO, u64::MAX, &mut out),
            Err(ChunkError::TooLong(u64::MAX))
        );
        assert!(out.is_empty());
        assert!(ReplyStyle::Structured
            .read_data_header(TO, u64::from(u32::MAX) - 8, &mut out)
            .is_ok());
        // A zero-length read carries no OFFSET_DATA chunk.
        out.clear();
        ReplyStyle::Structured
            .read_data_header(TO, 0, &mut out)
            .unwrap();
        assert_eq!(
            decode_one(ReplyStyle::Structured, &out).1,
            Some(ChunkPayload::None)
        );
    }

    #[test]
    fn hole_and_error_offset_chunks() {
        let mut out = Vec::new();
        ReplyStyle::Structured
            .hole_chunk(TO, 0x1200, 0x200, false, &mut out)
            .unwrap();
        let mut expected = structured_chunk_header(0, chunk::OFFSET_HOLE, TO.cookie, 12).to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x12, 0, 0, 0, 2, 0]);
        assert_eq!(out, expected);

        out.clear();
        ReplyStyle::Extended
            .error_at(TO, Errno::EIO, "bad", 0x1400, true, &mut out)
            .unwrap();
        let (_, payload) = decode_one(ReplyStyle::Extended, &out);
        assert_eq!(
            payload,
            Some(ChunkPayload::Error {
                errno: 5,
                message: "bad".into(),
                offset: Some(0x1400)
            })
        );
        assert_eq!(
            ReplyStyle::Simple.hole_chunk(TO, 0, 1, true, &mut out),
            Err(ChunkError::NotStructured)
        );
    }

    #[test]
    fn block_status_compact_layout() {
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 0,
                flags: 1,
            },
            Extent {
                length: 8192,
                flags: 3,
            },
        ];
        let mut out = Vec::new();
        let cov = ReplyStyle::Structured
            .block_status(TO, 1, &extents, false, true, &mut out)
            .unwrap();
        assert_eq!(
            cov,
            Coverage {
                descriptors: 2,
                length: 12288
            }
        );
        let mut expected =
            structured_chunk_header(FLAG_DONE, chunk::BLOCK_STATUS, TO.cookie, 20).to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0x20, 0, 0, 0, 0, 3]);
        assert_eq!(out, expected);
    }

    #[test]
    fn block_status_extended_layout_and_req_one() {
        let extents = [
            Extent {
                length: 1 << 33,
                flags: 2,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let mut out = Vec::new();
        let cov = ReplyStyle::Extended
            .block_status(TO, 9, &extents, true, true, &mut out)
            .unwrap();
        assert_eq!(
            cov,
            Coverage {
                descriptors: 1,
                length: 1 << 33
            }
        );
        let mut expected =
            extended_chunk_header(FLAG_DONE, chunk::BLOCK_STATUS_EXT, TO.cookie, TO.offset, 24)
                .to_vec();
        expected.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 1]);
        expected.extend_from_slice(&(1u64 << 33).to_be_bytes());
        expected.extend_from_slice(&2u64.to_be_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn compact_block_status_clips_long_extents_and_stops() {
        let extents = [
            Extent {
                length: 4096,
                flags: 0,
            },
            Extent {
                length: 1 << 40,
                flags: 1,
            },
            Extent {
                length: 4096,
                flags: 0,
            },
        ];
        let mut out = Vec::new();
        let cov = ReplyStyle::Structured
            .block_status(TO, 1, &extents, false, true, &mut out)
            .unwrap();
        assert_eq!(cov.descriptors, 2);
        assert_eq!(cov.length, 4096 + u64::from(COMPACT_EXTENT_CLIP));
        match decode_one(ReplyStyle::Structured, &out).1 {
            Some(ChunkPayload::BlockStatus { extents, .. }) => assert_eq!(
                extents[1],
                Extent {
                    length: u64::from(COMPACT_EXTENT_CLIP),
                    flags: 1
                }
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn block_status_refusals_write_nothing() {
        let mut out = Vec::new();
        let one = [Extent {
            length: 1,
            flags: 0,
        }];
        assert_eq!(
            ReplyStyle::Simple.block_status(TO, 1, &one, false, true, &mut out),
            Err(ChunkError::NotStructured)
        );
        let empty = [Extent {
            length: 0,
            flags: 0,
        }];
        assert_eq!(
            ReplyStyle::Structured.block_status(TO, 1, &empty, false, true, &mut out),
            Err(ChunkError::NoExtents)
        );
        let wide = [Extent {
            length: 1,
            flags: 1 << 32,
        }];
        assert_eq!(
            ReplyStyle::Structured.block_status(TO, 1, &wide, false, true, &mut out),
            Err(ChunkError::FlagsTooWide(1 << 32))
        );
        assert!(out.is_empty());
        assert!(ReplyStyle::Extended
            .block_status(TO, 1, &wide, false, true, &mut out)
            .is_ok());
    }

    #[test]
    fn block_status_honours_the_extent_limit() {
        let extents = vec![
            Extent {
                length: 512,
                flags: 0,
            };
            MAX_EXTENTS_PER_CHUNK + 3
        ];
        for style in [ReplyStyle::Structured, ReplyStyle::Extended] {
            let mut out = Vec::new();
            let cov = style
                .block_status(TO, 1, &extents, false, true, &mut out)
                .unwrap();
            assert_eq!(cov.descriptors, MAX_EXTENTS_PER_CHUNK);
            match decode_one(style, &out).1 {
                Some(ChunkPayload::BlockStatus { extents, .. }) => {
                    assert_eq!(extents.len(), MAX_EXTENTS_PER_CHUNK)
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn header_magic_must_match_the_style() {
        let simple = simple_reply(1, None);
        let structured = structured_chunk_header(FLAG_DONE, chunk::NONE, 1, 0);
        let extended = extended_chunk_header(FLAG_DONE, chunk::NONE, 1, 0, 0);
        assert!(decode_reply_header(ReplyStyle::Structured, &simple).is_ok());
        assert_eq!(
            decode_reply_header(ReplyStyle::Extended, &simple),
            Err(ChunkError::BadMagic(SIMPLE_REPLY_MAGIC))
        );
        assert_eq!(
            decode_reply_header(ReplyStyle::Simple, &structured),
            Err(ChunkError::BadMagic(STRUCTURED_REPLY_MAGIC))
        );
        assert_eq!(
            decode_reply_header(ReplyStyle::Structured, &extended),
            Err(ChunkError::BadMagic(EXTENDED_REPLY_MAGIC))
        );
        assert_eq!(
            decode_reply_header(ReplyStyle::Extended, &extended[..31]),
            Ok(None)
        );
    }

    #[test]
    fn decoder_enforces_server_invariants() {
        let h = |chunk_type, flags, length| ChunkHeader {
            flags,
            chunk_type,
            cookie: 0,
            offset: 0,
            length,
        };
        let s = ReplyStyle::Structured;
        let malformed = |r: Result<ChunkPayload<'_>, ChunkError>| {
            matches!(r, Err(ChunkError::Malformed { .. }))
        };
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::NONE, 0, 0),
            &[]
        )));
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::OFFSET_DATA, 1, 8),
            &[0; 8]
        )));
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::OFFSET_HOLE, 1, 12),
            &[0; 12]
        )));
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::ERROR, 1, 6),
            &[0; 6]
        )));
        // Message length overruns the payload.
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::ERROR, 1, 6),
            &[0, 0, 0, 5, 0, 1]
        )));
        // BLOCK_STATUS_EXT in compact mode, and a zero-length extent.
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::BLOCK_STATUS_EXT, 1, 24),
            &[0; 24]
        )));
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::BLOCK_STATUS, 1, 12),
            &[0; 12]
        )));
        // The payload must be exactly what the header announced.
        assert!(malformed(decode_chunk_payload(
            s,
            &h(chunk::NONE, 1, 1),
            &[]
        )));
        assert_eq!(
            decode_chunk_payload(s, &h(77, 1, 3), &[1, 2, 3]),
            Ok(ChunkPayload::Unknown { chunk_type: 77 })
        );
        // Unknown error types are read with the common error layout.
        assert_eq!(
            decode_chunk_payload(s, &h(0x8010, 1, 9), &[0, 0, 0, 22, 0, 1, b'x', 9, 9]),
            Ok(ChunkPayload::Error {
                errno: 22,
                message: "x".into(),
                offset: None
            })
        );
    }

    fn arb_style() -> impl Strategy<Value = ReplyStyle> {
        prop_oneof![
            Just(ReplyStyle::Simple),
            Just(ReplyStyle::Structured),
            Just(ReplyStyle::Extended)
        ]
    }

    fn arb_extent() -> impl Strategy<Value = Extent> {
        (
            prop_oneof![0u64..5000, any::<u64>(), (1u64 << 31)..(1u64 << 34)],
            prop_oneof![0u64..4, any::<u32>().prop_map(u64::from)],
        )
            .prop_map(|(length, flags)| Extent { length, flags })
    }

    proptest! {
        #[test]
        fn block_status_round_trips(
            style in arb_style(),
            cookie in any::<u64>(),
            offset in any::<u64>(),
            context_id in any::<u32>(),
            extents in proptest::collection::vec(arb_extent(), 0..40),
            req_one in any::<bool>(),
            done in any::<bool>(),
        ) {
            let to = ReplyTo { cookie, offset };
            let mut out = Vec::new();
            let compact = style == ReplyStyle::Structured;
            let expected: Vec<Extent> = descriptors(&extents, compact, if req_one { 1 } else { usize::MAX }).collect();
            match style.block_status(to, context_id, &extents, req_one, done, &mut out) {
                Err(ChunkError::NotStructured) => prop_assert_eq!(style, ReplyStyle::Simple),
                Err(ChunkError::NoExtents) => prop_assert!(expected.is_empty()),
                Err(e) => prop_assert!(false, "unexpected {e}"),
                Ok(cov) => {
                    prop_assert_eq!(cov.descriptors, expected.len());
                    prop_assert!(!req_one || cov.descriptors == 1);
                    let (header, payload) = decode_one(style, &out);
                    let ReplyHeader::Chunk(h) = header else { panic!("simple header") };
                    prop_assert_eq!(h.cookie, cookie);
                    prop_assert_eq!(h.is_done(), done);
                    if style == ReplyStyle::Extended { prop_assert_eq!(h.offset, offset); }
                    prop_assert_eq!(payload, Some(ChunkPayload::BlockStatus { context_id, extents: expected }));
                }
            }
        }

        #[test]
        fn data_error_hole_and_none_round_trip(
            style in arb_style(),
            cookie in any::<u64>(),
            offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            errno in any::<u32>(),
            message in ".{0,40}",
            hole in any::<u32>(),
        ) {
            let to = ReplyTo { cookie, offset };

            // READ data: header + the data itself.
            let mut out = Vec::new();
            style.read_data_header(to, data.len() as u64, &mut out).unwrap();
            let header_only = out.len();
            if style == ReplyStyle::Simple || !data.is_empty() {
                out.extend_from_slice(&data);
            }
            // A simple reply is a header followed by raw data: decode only the header.
            let reply = if style == ReplyStyle::Simple { &out[..header_only] } else { &out[..] };
            let (header, payload) = decode_one(style, reply);
            match (style, header, payload) {
                (ReplyStyle::Simple, ReplyHeader::Simple(s), None) => {
                    prop_assert_eq!(s, SimpleReply { error: 0, cookie });
                    prop_assert_eq!(header_only, SIMPLE_REPLY_LEN);
                }
                (_, ReplyHeader::Chunk(h), Some(p)) => {
                    prop_assert!(h.is_done());
                    prop_assert_eq!(h.cookie, cookie);
                    if data.is_empty() {
                        prop_assert_eq!(p, ChunkPayload::None);
                    } else {
                        prop_assert_eq!(p, ChunkPayload::OffsetData { offset, data: &data[..] });
                    }
                }
                (s, h, p) => prop_assert!(false, "{s:?} gave {h:?} {p:?}"),
            }

            // Error reply.
            let mut out = Vec::new();
            style.error(to, Errno(errno), &message, &mut out);
            let sent = if errno == 0 { 5 } else { errno };
            match decode_one(style, &out) {
                (ReplyHeader::Simple(s), None) => prop_assert_eq!(s, SimpleReply { error: sent, cookie }),
                (ReplyHeader::Chunk(h), Some(p)) => {
                    prop_assert!(h.is_done() && h.is_error());
                    prop_assert_eq!(p, ChunkPayload::Error { errno: sent, message: message.as_str().into(), offset: None });
                }
                other => prop_assert!(false, "{other:?}"),
            }

            // OK reply.
            let mut out = Vec::new();
            style.ok(to, &mut out);
            match decode_one(style, &out) {
                (ReplyHeader::Simple(s), None) => prop_assert_eq!(s, SimpleReply { error: 0, cookie }),
                (ReplyHeader::Chunk(h), Some(p)) => {
                    prop_assert!(h.is_done());
                    prop_assert_eq!(p, ChunkPayload::None);
                }
                other => prop_assert!(false, "{other:?}"),
            }

            // Hole.
            let mut out = Vec::new();
            let r = style.hole_chunk(to, offset, hole, false, &mut out);
            if style == ReplyStyle::Simple {
                prop_assert_eq!(r, Err(ChunkError::NotStructured));
            } else {
                let (header, payload) = decode_one_lenient(style, &out);
                prop_assert!(matches!(header, ReplyHeader::Chunk(h) if !h.is_done()));
                if hole == 0 {
                    prop_assert!(payload.is_err());
                } else {
                    prop_assert_eq!(payload, Ok(ChunkPayload::OffsetHole { offset, length: hole }));
                }
            }
        }

        #[test]
        fn garbage_never_panics_the_decoders(
            style in arb_style(),
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            flags in any::<u16>(),
            chunk_type in prop_oneof![0u16..8, 0x8000u16..0x8004, any::<u16>()],
            magic in prop_oneof![Just(SIMPLE_REPLY_MAGIC), Just(STRUCTURED_REPLY_MAGIC), Just(EXTENDED_REPLY_MAGIC), any::<u32>()],
        ) {
            let mut framed = magic.to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            for buf in [&bytes[..], &framed[..]] {
                if let Ok(Some((_, used))) = decode_reply_header(style, buf) {
                    prop_assert!(used <= buf.len());
                }
            }
            let header = ChunkHeader { flags, chunk_type, cookie: 0, offset: 0, length: bytes.len() as u64 };
            let _ = decode_chunk_payload(style, &header, &bytes);
            // A header whose length lies about the payload is refused, not trusted.
            let lying = ChunkHeader { length: u64::MAX, ..header };
            prop_assert!(decode_chunk_payload(style, &lying, &bytes).is_err());
        }
    }

    /// Like `decode_one`, but hands back the payload decoder's verdict instead of unwrapping.
    fn decode_one_lenient(
        style: ReplyStyle,
        bytes: &[u8],
    ) -> (ReplyHeader, Result<ChunkPayload<'_>, ChunkError>) {
        let (header, used) = decode_reply_header(style, bytes).unwrap().unwrap();
        let ReplyHeader::Chunk(h) = header else {
            panic!("simple header")
        };
        (header, decode_chunk_payload(style, &h, &bytes[used..]))
    }

    #[test]
    fn every_style_has_its_header_length() {
        let lens: Vec<usize> = STYLES.iter().map(|s| s.header_len()).collect();
        assert_eq!(lens, vec![16, 20, 32]);
    }
}
