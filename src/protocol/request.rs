//! Request headers, the incremental framer that cuts a byte stream into requests and
//! payload parts, and the rules a server applies to a request before touching the file.
//!
//! The framer is a pure state machine: the session's reader appends socket bytes to a
//! `BytesMut` and asks for the next [`Frame`]. The frames produced depend only on the bytes,
//! never on how they were split across reads (see the property tests below).

use bytes::{Buf, Bytes, BytesMut};

use super::consts::{
    cflags, cmd, COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
};
use super::errno::Errno;

/// Which request header the client sends: 28-byte compact (old-style and plain new-style)
/// or 32-byte extended (negotiated with NBD_OPT_EXTENDED_HEADERS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStyle {
    Compact,
    Extended,
}

impl HeaderStyle {
    /// Length of one request header in this style.
    pub fn header_len(self) -> usize {
        match self {
            HeaderStyle::Compact => COMPACT_REQUEST_LEN,
            HeaderStyle::Extended => EXTENDED_REQUEST_LEN,
        }
    }

    fn magic(self) -> u32 {
        match self {
            HeaderStyle::Compact => REQUEST_MAGIC,
            HeaderStyle::Extended => EXTENDED_REQUEST_MAGIC,
        }
    }
}

/// The `type` field of a request, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Any other value, kept so that the server can answer EINVAL.
    Unknown(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disconnect,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            cmd::BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disconnect => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::Cache => cmd::CACHE,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::BlockStatus => cmd::BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }
}

/// One request header. `length` is 64-bit so that extended headers fit; compact headers
/// carry at most `u32::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque value echoed in the reply (the "handle" of older documents).
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Encodes the header in the given style. Fails for a compact header whose length does
    /// not fit in 32 bits.
    pub fn encode(&self, style: HeaderStyle, out: &mut Vec<u8>) -> Result<(), Errno> {
        out.extend_from_slice(&style.magic().to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.command.to_wire().to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        match style {
            HeaderStyle::Compact => {
                let len = u32::try_from(self.length).map_err(|_| Errno::EOVERFLOW)?;
                out.extend_from_slice(&len.to_be_bytes());
            }
            HeaderStyle::Extended => out.extend_from_slice(&self.length.to_be_bytes()),
        }
        Ok(())
    }

    /// How many payload bytes follow this header on the wire.
    ///
    /// Only WRITE carries data in a compact header; C flexnbd consumes no payload for
    /// unknown types, and neither do we. With extended headers a request that sets
    /// PAYLOAD_LEN carries `length` bytes too (block status filters). A migration target
    /// also reads the payload of a hand-off message ([`RequestFramer::with_handoff`]).
    pub fn payload_len(&self, style: HeaderStyle) -> u64 {
        match (self.command, style) {
            (Command::Write, _) => self.length,
            (_, HeaderStyle::Extended) if self.flags & cflags::PAYLOAD_LEN != 0 => self.length,
            _ => 0,
        }
    }

    /// `offset + length`, or `None` when it overflows 64 bits.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// Result of decoding one header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    Request(Request),
    /// The magic was wrong. The cookie is taken from where it would be, so that the server
    /// can answer EBADMSG with it as flexnbd does.
    BadMagic {
        magic: u32,
        cookie: u64,
    },
}

/// Decodes one header. `bytes` must hold exactly `style.header_len()` bytes.
pub fn decode_header(bytes: &[u8], style: HeaderStyle) -> Header {
    debug_assert_eq!(bytes.len(), style.header_len());
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let be16 = |at: usize| u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
    let magic = be32(0);
    let cookie = be64(8);
    if magic != style.magic() {
        return Header::BadMagic { magic, cookie };
    }
    let length = match style {
        HeaderStyle::Compact => u64::from(be32(24)),
        HeaderStyle::Extended => be64(24),
    };
    Header::Request(Request {
        flags: be16(4),
        command: Command::from_wire(be16(6)),
        cookie,
        offset: be64(16),
        length,
    })
}

/// A piece of a request's payload, at most the framer's part size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadPart {
    /// Position of `data` within the request's payload.
    pub at: u64,
    pub data: Bytes,
    /// True for the request's final part.
    pub last: bool,
}

/// What the framer produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A request header. If it carries a payload, the payload parts follow, unless the
    /// caller calls [`RequestFramer::discard_payload`] before asking for the next frame.
    Request(Request),
    /// A header with the wrong magic. The framer stops: the connection must be closed.
    BadMagic { magic: u32, cookie: u64 },
    /// The next part of the current request's payload.
    Payload(PayloadPart),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Payload {
        at: u64,
        remaining: u64,
        keep: bool,
    },
    /// After a bad magic nothing more is decoded.
    Stopped,
}

/// Cuts a byte stream into request headers and payload parts.
///
/// Payloads are handed out in parts of at most `part_size` bytes, so a 4 GiB WRITE never
/// needs a 4 GiB buffer; each part is produced only once it is complete, so the frames are
/// the same however the input was split. A discarded payload is skipped as it arrives.
#[derive(Debug)]
pub struct RequestFramer {
    style: HeaderStyle,
    part_size: u64,
    state: State,
    /// A migration target: a HANDOFF request carries its message as payload. Anywhere
    /// else that type is unknown and consumes nothing (flexnbd §4.4), so a pipelined
    /// request behind it is never eaten as payload.
    handoff: bool,
}

impl RequestFramer {
    /// `part_size` must be at least 1.
    pub fn new(style: HeaderStyle, part_size: usize) -> RequestFramer {
        assert!(part_size > 0, "part size must be positive");
        RequestFramer {
            style,
            part_size: part_size as u64,
            state: State::Header,
            handoff: false,
        }
    }

    /// Reads the payload of HANDOFF requests (a `listen` server).
    pub fn with_handoff(mut self) -> RequestFramer {
        self.handoff = true;
        self
    }

    fn payload_of(&self, req: &Request) -> u64 {
        match req.command {
            Command::Unknown(super::handoff::HANDOFF) if self.handoff => req.length,
            _ => req.payload_len(self.style),
        }
    }

    /// Switches the header style (after negotiating extended headers).
    pub fn set_style(&mut self, style: HeaderStyle) {
        self.style = style;
    }

    /// Drops the payload of the request just returned instead of producing its parts
    /// (a WRITE that is out of range, to a read-only export, and so on).
    pub fn discard_payload(&mut self) {
        if let State::Payload { keep, .. } = &mut self.state {
            *keep = false;
        }
    }

    /// How many bytes the next frame needs in total (header or payload part), so that a
    /// reader can reserve buffer space and payload budget before reading. `None` once the
    /// framer has stopped.
    pub fn next_need(&self) -> Option<usize> {
        match self.state {
            State::Header => Some(self.style.header_len()),
            State::Payload {
                remaining,
                keep: true,
                ..
            } => Some(remaining.min(self.part_size) as usize),
            State::Payload { keep: false, .. } => Some(1),
            State::Stopped => None,
        }
    }

    /// The size of the next payload part when it is one the caller keeps (not a payload
    /// being discarded), so that a reader can read it straight into a buffer of its own.
    pub fn kept_part_need(&self) -> Option<usize> {
        match self.state {
            State::Payload {
                remaining,
                keep: true,
                ..
            } => Some(remaining.min(self.part_size) as usize),
            _ => None,
        }
    }

    /// True while the framer is between requests (no payload pending).
    pub fn at_request_boundary(&self) -> bool {
        self.state == State::Header
    }

    /// Takes the next complete frame out of `buf`, or returns `None` when more bytes are
    /// needed (or the framer has stopped).
    pub fn next_frame(&mut self, buf: &mut BytesMut) -> Option<Frame> {
        loop {
            match self.state {
                State::Stopped => return None,
                State::Header => {
                    let len = self.style.header_len();
                    if buf.len() < len {
                        return None;
                    }
                    let header = decode_header(&buf[..len], self.style);
                    buf.advance(len);
                    return Some(match header {
                        Header::BadMagic { magic, cookie } => {
                            self.state = State::Stopped;
                            Frame::BadMagic { magic, cookie }
                        }
                        Header::Request(req) => {
                            let payload = self.payload_of(&req);
                            if payload > 0 {
                                self.state = State::Payload {
                                    at: 0,
                                    remaining: payload,
                                    keep: true,
                                };
                            }
                            Frame::Request(req)
                        }
                    });
                }
                State::Payload {
                    at,
                    remaining,
                    keep: false,
                } => {
                    let take = remaining.min(buf.len() as u64);
                    if take == 0 {
                        return None;
                    }
                    buf.advance(take as usize);
                    self.state = if take == remaining {
                        State::Header
                    } else {
                        State::Payload {
                            at: at + take,
                            remaining: remaining - take,
                            keep: false,
                        }
                    };
                    // Loop: the next header may already be buffered.
                }
                State::Payload {
                    at,
                    remaining,
                    keep: true,
                } => {
                    let want = remaining.min(self.part_size);
                    if (buf.len() as u64) < want {
                        return None;
                    }
                    let data = buf.split_to(want as usize).freeze();
                    let last = want == remaining;
                    self.state = if last {
                        State::Header
                    } else {
                        State::Payload {
                            at: at + want,
                            remaining: remaining - want,
                            keep: true,
                        }
                    };
                    return Some(Frame::Payload(PayloadPart { at, data, last }));
                }
            }
        }
    }
}

/// How the server talks to this client, as far as request checking is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// flexnbd's old-style rules (`flexnbd-compat.md` §4.4): range check first for every
    /// type (ENOSPC), only READ, WRITE, DISC and FLUSH, command flags ignored.
    Oldstyle,
    /// The NBD protocol's rules for a fixed new-style client, given what was negotiated.
    Modern(Modern),
}

/// What a new-style client negotiated that changes which requests are valid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Modern {
    /// Structured replies are in force (makes DF valid).
    pub structured: bool,
    /// 32-byte headers (makes PAYLOAD_LEN meaningful on WRITE).
    pub extended: bool,
    /// `base:allocation` was selected (makes BLOCK_STATUS valid).
    pub block_status: bool,
}

/// What the server knows about the export when it checks a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportRules {
    pub size: u64,
    pub dialect: Dialect,
    /// Writes, trims and zeroes fail with EPERM (`-r`).
    pub read_only: bool,
    /// A `listen` server: answers the hand-off PROBE and HANDOFF messages of our own
    /// migration sources, and takes zero-range requests even in the old-style dialect (only
    /// our own sources send them there).
    pub migration_target: bool,
}

/// What the server must do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Read {
        offset: u64,
        length: u64,
        /// Don't fragment: the data must come as one chunk.
        df: bool,
    },
    Write {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Flush,
    /// Punch a hole (a hint: the contents are undefined afterwards until rewritten).
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
        /// The range must stay allocated (no hole may be punched).
        no_hole: bool,
        /// Fail at once with ENOTSUP unless zeroing is faster than writing zeros.
        fast: bool,
    },
    /// Prefetch a range (a hint).
    Cache {
        offset: u64,
        length: u64,
    },
    BlockStatus {
        offset: u64,
        length: u64,
        /// Answer with one extent only.
        req_one: bool,
    },
    /// Answer nothing; close once the requests in flight are answered.
    Disconnect,
    /// A migration source asks whether we speak the acknowledged hand-off: answer 0.
    Probe,
    /// A hand-off message of `length` bytes follows as payload.
    Handoff {
        length: u64,
    },
    /// A migration source asks who we are: answer with our identity.
    Identify,
    /// Answer with this error; a payload, if any, must be discarded.
    Reject(Errno),
}

impl ExportRules {
    /// Applies the request rules of the dialect.
    pub fn check(&self, req: &Request) -> Verdict {
        if req.command == Command::Unknown(super::handoff::IDENTIFY) && self.answers_identify(req) {
            return Verdict::Identify;
        }
        if self.migration_target {
            match req.command {
                Command::Unknown(super::handoff::PROBE) => return Verdict::Probe,
                Command::Unknown(super::handoff::HANDOFF) => {
                    return if req.length <= super::handoff::MAX_MESSAGE as u64 {
                        Verdict::Handoff { length: req.length }
                    } else {
                        Verdict::Reject(Errno::EINVAL)
                    };
                }
                _ => {}
            }
        }
        match self.dialect {
            Dialect::Oldstyle => self.check_oldstyle(req),
            Dialect::Modern(modern) => self.check_modern(req, modern),
        }
    }

    /// Every server of ours answers IDENTIFY (a `serve` too: mirroring into a server that
    /// exports the source's own file must be detected), with the answer framed after a
    /// simple reply: so only where replies are simple, and only as the source sends it
    /// (offset 0, length 0). Anything else of that type follows the dialect's rules like
    /// any unknown type (old-style: range first, ENOSPC; then EINVAL).
    fn answers_identify(&self, req: &Request) -> bool {
        let simple = match self.dialect {
            Dialect::Oldstyle => true,
            Dialect::Modern(modern) => !modern.structured && !modern.extended,
        };
        simple && req.offset == 0 && req.length == 0
    }

    /// flexnbd §4.4: the range check comes before the type is looked at, with checked
    /// arithmetic (an overflowing end is out of range); then unknown types get EINVAL.
    fn check_oldstyle(&self, req: &Request) -> Verdict {
        match req.end() {
            Some(end) if end <= self.size => {}
            _ => return Verdict::Reject(Errno::ENOSPC),
        }
        let fua = req.flags & cflags::FUA != 0;
        match req.command {
            Command::Read => Verdict::Read {
                offset: req.offset,
                length: req.length,
                df: false,
            },
            Command::Write if self.read_only => Verdict::Reject(Errno::EPERM),
            Command::Write => Verdict::Write {
                offset: req.offset,
                length: req.length,
                fua,
            },
            Command::Flush => Verdict::Flush,
            Command::Disconnect => Verdict::Disconnect,
            Command::WriteZeroes if self.migration_target && self.read_only => {
                Verdict::Reject(Errno::EPERM)
            }
            Command::WriteZeroes if self.migration_target => Verdict::WriteZeroes {
                offset: req.offset,
                length: req.length,
                fua,
                no_hole: req.flags & cflags::NO_HOLE != 0,
                fast: false,
            },
            _ => Verdict::Reject(Errno::EINVAL),
        }
    }

    /// The NBD protocol's rules: flags that do not apply to the command (or were not
    /// negotiated) and unknown commands are EINVAL; writes to a read-only export EPERM;
    /// past the end, writes and zeroes are ENOSPC and everything else EINVAL.
    fn check_modern(&self, req: &Request, modern: Modern) -> Verdict {
        use cflags::{DF, FAST_ZERO, FUA, NO_HOLE, PAYLOAD_LEN, REQ_ONE};
        let allowed = match req.command {
            Command::Read if modern.structured => DF,
            Command::Write if modern.extended => FUA | PAYLOAD_LEN,
            Command::Write => FUA,
            Command::Trim => FUA,
            Command::WriteZeroes => FUA | NO_HOLE | FAST_ZERO,
            Command::BlockStatus => REQ_ONE,
            Command::Disconnect => u16::MAX,
            Command::Unknown(_) => return Verdict::Reject(Errno::EINVAL),
            _ => 0,
        };
        if req.flags & !allowed != 0 {
            return Verdict::Reject(Errno::EINVAL);
        }
        if req.command == Command::BlockStatus && !modern.block_status {
            return Verdict::Reject(Errno::EINVAL);
        }
        let writes = matches!(
            req.command,
            Command::Write | Command::Trim | Command::WriteZeroes
        );
        if writes && self.read_only {
            return Verdict::Reject(Errno::EPERM);
        }
        let in_range = req.end().is_some_and(|end| end <= self.size);
        let (offset, length) = (req.offset, req.length);
        let fua = req.flags & FUA != 0;
        match req.command {
            Command::Flush => return Verdict::Flush,
            Command::Disconnect => return Verdict::Disconnect,
            Command::Write | Command::WriteZeroes if !in_range => {
                return Verdict::Reject(Errno::ENOSPC)
            }
            _ if !in_range => return Verdict::Reject(Errno::EINVAL),
            _ => {}
        }
        match req.command {
            Command::Read => Verdict::Read {
                offset,
                length,
                df: req.flags & DF != 0,
            },
            Command::Write => Verdict::Write {
                offset,
                length,
                fua,
            },
            Command::Trim => Verdict::Trim {
                offset,
                length,
                fua,
            },
            Command::WriteZeroes => Verdict::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: req.flags & NO_HOLE != 0,
                fast: req.flags & FAST_ZERO != 0,
            },
            Command::Cache => Verdict::Cache { offset, length },
            Command::BlockStatus if length == 0 => Verdict::Reject(Errno::EINVAL),
            Command::BlockStatus => Verdict::BlockStatus {
                offset,
                length,
                req_one: req.flags & REQ_ONE != 0,
            },
            _ => Verdict::Reject(Errno::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn compact(req: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        req.encode(HeaderStyle::Compact, &mut out).unwrap();
        out
    }

    fn write_req(cookie: u64, offset: u64, length: u64) -> Request {
        Request {
            flags: 0,
            command: Command::Write,
            cookie,
            offset,
            length,
        }
    }

    #[test]
    fn compact_header_layout() {
        let req = Request {
            flags: 1,
            command: Command::Write,
            cookie: 0x2e4d_4952_524f_522e,
            offset: 4096,
            length: 512,
        };
        let bytes = compact(&req);
        assert_eq!(bytes.len(), 28);
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&bytes[4..8], &[0, 1, 0, 1]);
        assert_eq!(&bytes[8..16], b".MIRROR.");
        assert_eq!(
            decode_header(&bytes, HeaderStyle::Compact),
            Header::Request(req)
        );
    }

    #[test]
    fn historic_entrust_parses_as_fua_read() {
        // The 32-bit type field 0x10000 of 2012 is flags=1, type=READ today (§4.2).
        let mut bytes = compact(&write_req(7, 0, 0));
        bytes[4..8].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        match decode_header(&bytes, HeaderStyle::Compact) {
            Header::Request(r) => {
                assert_eq!(r.command, Command::Read);
                assert_eq!(r.flags, 1);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_magic_keeps_the_cookie_and_stops_the_framer() {
        let mut bytes = compact(&write_req(0xfeed, 0, 0));
        bytes[0] = 0;
        bytes.extend_from_slice(&compact(&write_req(1, 0, 0)));
        let mut framer = RequestFramer::new(HeaderStyle::Compact, 1024);
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            framer.next_frame(&mut buf),
            Some(Frame::BadMagic {
                magic: 0x0060_9513,
                cookie: 0xfeed
            })
        );
        assert_eq!(framer.next_frame(&mut buf), None);
        assert_eq!(framer.next_need(), None);
    }

    #[test]
    fn kept_part_need_names_only_payload_parts_the_caller_keeps() {
        let mut framer = RequestFramer::new(HeaderStyle::Compact, 4);
        assert_eq!(framer.kept_part_need(), None);
        let mut buf = BytesMut::from(&compact(&write_req(1, 0, 10))[..]);
        assert!(matches!(
            framer.next_frame(&mut buf),
            Some(Frame::Request(_))
        ));
        assert_eq!(framer.kept_part_need(), Some(4));
        buf.extend_from_slice(b"01234567");
        assert!(framer.next_frame(&mut buf).is_some());
        assert!(framer.next_frame(&mut buf).is_some());
        assert_eq!(framer.kept_part_need(), Some(2));
        buf.extend_from_slice(b"89");
        assert!(framer.next_frame(&mut buf).is_some());
        assert_eq!(framer.kept_part_need(), None);

        let mut buf = BytesMut::from(&compact(&write_req(2, 0, 10))[..]);
        assert!(matches!(
            framer.next_frame(&mut buf),
            Some(Frame::Request(_))
        ));
        framer.discard_payload();
        assert_eq!(framer.kept_part_need(), None);
        assert_eq!(framer.next_need(), Some(1));
    }

    #[test]
    fn payload_is_split_into_parts() {
        let mut bytes = compact(&write_req(1, 0, 10));
        bytes.extend_from_slice(b"0123456789");
        let mut framer = RequestFramer::new(HeaderStyle::Compact, 4);
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            framer.next_frame(&mut buf),
            Some(Frame::Request(_))
        ));
        let parts: Vec<_> = std::iter::from_fn(|| framer.next_frame(&mut buf)).collect();
        assert_eq!(
            parts,
            vec![
                Frame::Payload(PayloadPart {
                    at: 0,
                    data: Bytes::from_static(b"0123"),
                    last: false
                }),
                Frame::Payload(PayloadPart {
                    at: 4,
                    data: Bytes::from_static(b"4567"),
                    last: false
                }),
                Frame::Payload(PayloadPart {
                    at: 8,
                    data: Bytes::from_static(b"89"),
                    last: true
                }),
            ]
        );
        assert!(framer.at_request_boundary());
    }

    #[test]
    fn discarded_payload_is_skipped_as_it_arrives() {
        let mut framer = RequestFramer::new(HeaderStyle::Compact, 4);
        let mut buf = BytesMut::from(&compact(&write_req(1, 0, 6))[..]);
        assert!(matches!(
            framer.next_frame(&mut buf),
            Some(Frame::Request(_))
        ));
        framer.discard_payload();
        buf.extend_from_slice(b"abc");
        assert_eq!(framer.next_frame(&mut buf), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"def");
        buf.extend_from_slice(&compact(&write_req(2, 0, 0)));
        assert_eq!(
            framer.next_frame(&mut buf),
            Some(Frame::Request(write_req(2, 0, 0)))
        );
    }

    #[test]
    fn oldstyle_rules() {
        let rules = ExportRules {
            size: 1024,
            dialect: Dialect::Oldstyle,
            read_only: false,
            migration_target: false,
        };
        let mk = |command, offset, length| Request {
            flags: 0,
            command,
            cookie: 0,
            offset,
            length,
        };
        assert_eq!(
            rules.check(&mk(Command::Read, 512, 512)),
            Verdict::Read {
                offset: 512,
                length: 512,
                df: false
            }
        );
        assert_eq!(
            rules.check(&mk(Command::Read, 513, 512)),
            Verdict::Reject(Errno::ENOSPC)
        );
        assert_eq!(
            rules.check(&mk(Command::Write, u64::MAX, 2)),
            Verdict::Reject(Errno::ENOSPC)
        );
        assert_eq!(
            rules.check(&mk(Command::Trim, 0, 512)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Unknown(99), 0, 4096)),
            Verdict::Reject(Errno::ENOSPC)
        );
        assert_eq!(
            rules.check(&mk(Command::Disconnect, 0, 0)),
            Verdict::Disconnect
        );
        assert_eq!(rules.check(&mk(Command::Flush, 0, 0)), Verdict::Flush);
        let fua = Request {
            flags: cflags::FUA,
            ..mk(Command::Write, 0, 1)
        };
        assert_eq!(
            rules.check(&fua),
            Verdict::Write {
                offset: 0,
                length: 1,
                fua: true
            }
        );
    }

    #[test]
    fn modern_rules() {
        let modern = Modern {
            structured: true,
            extended: false,
            block_status: true,
        };
        let rules = ExportRules {
            size: 1024,
            dialect: Dialect::Modern(modern),
            read_only: false,
            migration_target: false,
        };
        let mk = |command, flags, offset, length| Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        };
        use cflags::*;
        assert_eq!(
            rules.check(&mk(Command::Read, DF, 0, 512)),
            Verdict::Read {
                offset: 0,
                length: 512,
                df: true
            }
        );
        assert_eq!(
            rules.check(&mk(Command::Read, FUA, 0, 512)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Read, 0, 1000, 512)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Write, 0, 1000, 512)),
            Verdict::Reject(Errno::ENOSPC)
        );
        assert_eq!(
            rules.check(&mk(Command::WriteZeroes, 0, 1000, 512)),
            Verdict::Reject(Errno::ENOSPC)
        );
        assert_eq!(
            rules.check(&mk(Command::Trim, 0, 1000, 512)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Cache, 0, u64::MAX, 2)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Write, NO_HOLE, 0, 512)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::Unknown(42), 0, 0, 0)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(Command::BlockStatus, 0, 0, 0)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            rules.check(&mk(
                Command::WriteZeroes,
                NO_HOLE | FAST_ZERO | FUA,
                0,
                1024
            )),
            Verdict::WriteZeroes {
                offset: 0,
                length: 1024,
                fua: true,
                no_hole: true,
                fast: true
            }
        );
        assert_eq!(
            rules.check(&mk(Command::BlockStatus, REQ_ONE, 0, 1024)),
            Verdict::BlockStatus {
                offset: 0,
                length: 1024,
                req_one: true
            }
        );
        let plain = ExportRules {
            dialect: Dialect::Modern(Modern::default()),
            ..rules
        };
        assert_eq!(
            plain.check(&mk(Command::Read, DF, 0, 512)),
            Verdict::Reject(Errno::EINVAL),
            "DF needs structured replies"
        );
        assert_eq!(
            plain.check(&mk(Command::BlockStatus, 0, 0, 512)),
            Verdict::Reject(Errno::EINVAL),
            "no context selected"
        );
        let ro = ExportRules {
            read_only: true,
            ..rules
        };
        for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
            assert_eq!(
                ro.check(&mk(command, 0, 0, 512)),
                Verdict::Reject(Errno::EPERM)
            );
        }
        assert_eq!(
            ro.check(&mk(Command::Read, 0, 0, 512)),
            Verdict::Read {
                offset: 0,
                length: 512,
                df: false
            }
        );
        let old_ro = ExportRules {
            size: 1024,
            dialect: Dialect::Oldstyle,
            read_only: true,
            migration_target: false,
        };
        assert_eq!(
            old_ro.check(&mk(Command::Write, 0, 0, 512)),
            Verdict::Reject(Errno::EPERM)
        );
    }

    #[test]
    fn migration_targets_answer_the_probe_and_take_zero_ranges() {
        use super::super::handoff::{HANDOFF, MAX_MESSAGE, PROBE};
        let mk = |command, offset, length| Request {
            flags: 0,
            command,
            cookie: 0,
            offset,
            length,
        };
        let plain = ExportRules {
            size: 1 << 20,
            dialect: Dialect::Oldstyle,
            read_only: false,
            migration_target: false,
        };
        let target = ExportRules {
            migration_target: true,
            ..plain
        };
        // A server that is not a target answers like C flexnbd: EINVAL.
        assert_eq!(
            plain.check(&mk(Command::Unknown(PROBE), 0, 0)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            plain.check(&mk(Command::WriteZeroes, 0, 4096)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert_eq!(
            target.check(&mk(Command::Unknown(PROBE), 0, 0)),
            Verdict::Probe
        );
        assert_eq!(
            target.check(&mk(Command::Unknown(HANDOFF), 0, 40)),
            Verdict::Handoff { length: 40 }
        );
        assert_eq!(
            target.check(&mk(Command::Unknown(HANDOFF), 0, MAX_MESSAGE as u64 + 1)),
            Verdict::Reject(Errno::EINVAL)
        );
        assert!(matches!(
            target.check(&mk(Command::WriteZeroes, 0, 4096)),
            Verdict::WriteZeroes { .. }
        ));
        assert_eq!(
            target.check(&mk(Command::WriteZeroes, 1 << 20, 4096)),
            Verdict::Reject(Errno::ENOSPC)
        );
    }

    /// IDENTIFY is answered only as a source sends it; any other request of that type is an
    /// unknown type under the dialect's rules (old-style: range first, ENOSPC).
    #[test]
    fn identify_only_as_sent_and_otherwise_the_dialects_rules() {
        use super::super::handoff::IDENTIFY;
        let rules = ExportRules {
            size: 4096,
            dialect: Dialect::Oldstyle,
            read_only: false,
            migration_target: false,
        };
        let mk = |offset, length| Request {
            flags: 0,
            command: Command::Unknown(IDENTIFY),
            cookie: 9,
            offset,
            length,
        };
        assert_eq!(rules.check(&mk(0, 0)), Verdict::Identify);
        assert_eq!(rules.check(&mk(0, 512)), Verdict::Reject(Errno::EINVAL));
        assert_eq!(rules.check(&mk(0, 8192)), Verdict::Reject(Errno::ENOSPC));
        let structured = ExportRules {
            dialect: Dialect::Modern(Modern {
                structured: true,
                ..Modern::default()
            }),
            ..rules
        };
        assert_eq!(structured.check(&mk(0, 0)), Verdict::Reject(Errno::EINVAL));
    }

    /// A hand-off message's payload is read only by a migration target; elsewhere the type
    /// is unknown and the next request follows its header directly (flexnbd §4.4).
    #[test]
    fn only_a_migration_target_reads_a_handoff_payload() {
        use super::super::handoff::HANDOFF;
        let mut wire = Vec::new();
        let handoff = Request {
            flags: 0,
            command: Command::Unknown(HANDOFF),
            cookie: 1,
            offset: 0,
            length: 28,
        };
        handoff.encode(HeaderStyle::Compact, &mut wire).unwrap();
        let read = Request {
            command: Command::Read,
            cookie: 2,
            length: 512,
            ..handoff
        };
        read.encode(HeaderStyle::Compact, &mut wire).unwrap();
        let frames = |framer: &mut RequestFramer| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut out = Vec::new();
            while let Some(frame) = framer.next_frame(&mut buf) {
                out.push(frame);
            }
            out
        };
        let plain = frames(&mut RequestFramer::new(HeaderStyle::Compact, 4096));
        assert_eq!(plain.len(), 2, "{plain:?}");
        assert!(matches!(plain[1], Frame::Request(r) if r.cookie == 2));
        let target = frames(&mut RequestFramer::new(HeaderStyle::Compact, 4096).with_handoff());
        assert!(
            !target
                .iter()
                .any(|f| matches!(f, Frame::Request(r) if r.cookie == 2)),
            "the target takes the next 28 bytes as the message: {target:?}"
        );
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            0u16..9,
            any::<u64>(),
            any::<u64>(),
            0u64..3000,
        )
            .prop_map(|(flags, command, cookie, offset, length)| Request {
                flags: flags & !cflags::PAYLOAD_LEN,
                command: Command::from_wire(command),
                cookie,
                offset,
                length,
            })
    }

    fn frames_of(bytes: &[u8], cuts: &[usize], part: usize, discard_odd: bool) -> Vec<Frame> {
        let mut framer = RequestFramer::new(HeaderStyle::Compact, part);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut boundaries: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        boundaries.push(bytes.len());
        boundaries.sort_unstable();
        for end in boundaries {
            buf.extend_from_slice(&bytes[pos..end.max(pos)]);
            pos = end.max(pos);
            while let Some(frame) = framer.next_frame(&mut buf) {
                if let Frame::Request(r) = &frame {
                    if discard_odd && r.cookie % 2 == 1 {
                        framer.discard_payload();
                    }
                }
                out.push(frame);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn framing_is_independent_of_how_bytes_are_split(
            reqs in proptest::collection::vec(arb_request(), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
            part in 1usize..700,
            discard_odd in any::<bool>(),
        ) {
            let mut bytes = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                bytes.extend_from_slice(&compact(r));
                let n = r.payload_len(HeaderStyle::Compact) as usize;
                bytes.extend((0..n).map(|j| (i * 31 + j) as u8));
            }
            let whole = frames_of(&bytes, &[], part, discard_odd);
            let split = frames_of(&bytes, &cuts, part, discard_odd);
            prop_assert_eq!(&whole, &split);
            // Every header comes back, in order, and kept payloads are complete.
            let headers: Vec<Request> = whole.iter().filter_map(|f| match f {
                Frame::Request(r) => Some(*r), _ => None }).collect();
            prop_assert_eq!(headers, reqs.clone());
            let kept: usize = whole.iter().map(|f| match f {
                Frame::Payload(p) => p.data.len(), _ => 0 }).sum();
            let expected: u64 = reqs.iter()
                .filter(|r| !(discard_odd && r.cookie % 2 == 1))
                .map(|r| r.payload_len(HeaderStyle::Compact)).sum();
            prop_assert_eq!(kept as u64, expected);
        }

        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            part in 1usize..64,
            extended in any::<bool>(),
        ) {
            let style = if extended { HeaderStyle::Extended } else { HeaderStyle::Compact };
            let mut framer = RequestFramer::new(style, part);
            let mut buf = BytesMut::from(&bytes[..]);
            let rules = ExportRules { size: 1 << 20, dialect: Dialect::Oldstyle, read_only: false, migration_target: false };
            let mut n = 0;
            while let Some(frame) = framer.next_frame(&mut buf) {
                if let Frame::Request(r) = frame { let _ = rules.check(&r); }
                n += 1;
                prop_assert!(n <= bytes.len() + 1);
            }
        }

        #[test]
        fn range_check_never_accepts_past_the_end(
            req in arb_request(),
            size in any::<u64>(),
            modern in any::<bool>(),
            read_only in any::<bool>(),
        ) {
            let dialect = if modern {
                Dialect::Modern(Modern { structured: true, extended: false, block_status: true })
            } else {
                Dialect::Oldstyle
            };
            let rules = ExportRules { size, dialect, read_only, migration_target: false };
            let verdict = rules.check(&req);
            if read_only {
                let writes = matches!(
                    verdict,
                    Verdict::Write { .. } | Verdict::Trim { .. } | Verdict::WriteZeroes { .. }
                );
                prop_assert!(!writes);
            }
            match verdict {
                Verdict::Read { offset, length, .. }
                | Verdict::Write { offset, length, .. }
                | Verdict::Trim { offset, length, .. }
                | Verdict::WriteZeroes { offset, length, .. }
                | Verdict::Cache { offset, length }
                | Verdict::BlockStatus { offset, length, .. } => {
                    prop_assert!(offset.checked_add(length).is_some_and(|e| e <= size));
                }
                _ => {}
            }
        }
    }
}
