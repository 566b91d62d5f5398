//! Fuzz harnesses: one function per decoder that reads bytes from a peer.
//!
//! Each `pub fn <target>(data: &[u8])` feeds `data` to a decoder (or drives a state machine
//! with events derived from it) and asserts the decoder's invariants: any panic is a
//! finding. The libFuzzer wrappers in `fuzz/fuzz_targets/` call these functions, and
//! `tests/fuzz_smoke.rs` runs them on fixed and pseudo-random inputs in every test run.
//! Only the crate's public API is used.
//!
//! | target | decoder | whose bytes |
//! |---|---|---|
//! | [`request_framer`] | `protocol::request::RequestFramer`, `ExportRules::check` | a client's requests |
//! | [`newstyle_server`] | `protocol::newstyle::ServerNegotiation` | a new-style client's options |
//! | [`client_handshake`] | `protocol::client`, `OldstyleHello::decode` | a server's greeting (mirror) |
//! | [`structured_replies`] | `protocol::structured`, `protocol::reply` | a server's replies |
//! | [`control_request`] | `protocol::control`, `acl`, `addr` | a control socket client |
//! | [`handoff_messages`] | `protocol::handoff` messages and state machines | the other server |
//!
//! The first bytes of an input usually choose a setup (configuration, split points, a
//! structured "grammar" mode that builds well-formed messages so that the fuzzer reaches
//! deep states quickly); each function documents its layout. Every harness is
//! deterministic: a crash reproduces from its input alone.

use std::ops::Range;

/// A cursor that derives values from fuzz input; reads past the end give zeros.
#[derive(Clone)]
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    fn byte(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.bytes(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    /// A value that is small, close to the 32-bit or 64-bit limit, or anything.
    fn interesting_u64(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => u64::from(self.byte()),
            1 => u64::from(u32::MAX) + 8 - u64::from(self.byte() % 16),
            2 => u64::MAX - u64::from(self.byte()),
            3 => u64::from(self.u16()),
            _ => self.u64(),
        }
    }
}

/// xorshift64: cheap and deterministic.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Cuts `len` bytes into pieces of 1..=`max_chunk` pseudo-random lengths, as socket reads
/// would; `max_chunk` grows with long streams so that there are about 256 pieces at most.
/// Always at least one piece (an empty one for an empty stream).
fn cuts(len: usize, seed: u64, max_chunk: usize) -> Vec<Range<usize>> {
    let max_chunk = max_chunk.max(len / 128);
    let mut state = seed | 1 << 40;
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let n = 1 + (next_random(&mut state) % max_chunk.max(1) as u64) as usize;
        let end = len.min(pos + n);
        out.push(pos..end);
        pos = end;
        if pos >= len {
            return out;
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `RequestFramer`, the decoder that cuts a session's socket bytes into request headers
/// and payload parts, together with `ExportRules::check` (old-style rules).
///
/// Layout: the first 16 bytes choose the setup (header style, part size, which requests
/// get their payload discarded, how the stream is split, the export size); the rest is the
/// byte stream a client would send. Inputs shorter than 16 bytes are ignored.
///
/// The stream is fed twice: in chunks of pseudo-random length (as socket reads would cut
/// it) and all at once. Invariants:
/// - nothing panics;
/// - a payload part is never empty and never larger than the part size;
/// - a kept payload comes as contiguous parts from offset 0, `last` exactly on the final
///   one, and its parts add up to the request's payload length before the next header is
///   decoded (that is, whenever all its bytes are present);
/// - a discarded payload, or a request without payload, yields no part;
/// - nothing is decoded after a bad magic;
/// - the framer never sits on enough bytes for its next frame (`next_need`);
/// - a READ or WRITE accepted by the rules lies inside the export;
/// - the frames are identical however the stream was split.
pub fn request_framer(data: &[u8]) {
    framer::run(data);
}

/// `ServerNegotiation`, the server side of fixed new-style negotiation, fed a client's
/// bytes.
///
/// Layout: byte 0 chooses the configuration (bit 0 read-only, bit 1 multi-conn, bit 2
/// shutting down, bits 3-4 the description, bits 5-6 the export name) and, with bit 7, the
/// grammar mode; byte 1 the block size constraints (bits 0-1) and the largest read
/// (bits 2-7); bytes 2-3 the split seed. The rest is the client's byte stream, or in
/// grammar mode a program that builds one (well-formed options, garbage, oversized
/// options, truncations, byte flips).
///
/// Invariants: nothing panics; the outcome (replies, result, bytes left for transmission)
/// does not depend on how the stream was split; each `feed` writes a bounded amount per
/// option consumed; while waiting, less than one option (header plus bounded payload) is
/// buffered and feeding nothing new changes nothing; after `Done`, `Aborted` or an error,
/// `feed` fails with `Finished` and touches nothing; every reply decodes with our own
/// client's decoders; `Done` is consistent with the replies (transmission flags and size
/// of the last INFO or of the EXPORT_NAME reply, the padding, the selected meta context)
/// and with the configuration (read-only, multi-conn, DF iff structured, extended implies
/// structured, never while shutting down); `Aborted` follows an ACK of ABORT.
pub fn newstyle_server(data: &[u8]) {
    negotiation::run(data);
}

/// The client side of the handshakes, as the mirror's outbound connection uses it on a
/// server's bytes: `classify`, `OldstyleHello::decode`, `go_request`,
/// `decode_option_reply`, `parse_info_export`.
///
/// Layout: byte 0 bits 0-1 put a valid greeting in front (1 old-style, 2 new-style), bit 2
/// inserts the option reply magic in front of every reply header, bits 3-4 choose the
/// export name of the round trip with our server, bit 6 makes that server read-only; the
/// rest is the server's byte stream.
///
/// Invariants: every decoder agrees with the wire layout (magics, fields, the length bound
/// `MAX_OPTION_REPLY` enforced before the mirror allocates a payload); a decoded hello
/// re-encodes to the same bytes (high flag bits and padding aside); our `go_request`
/// against our `ServerNegotiation` gives `Done` with the export's size and flags exactly
/// for the names our export answers to, ERR_UNKNOWN or ERR_TOO_BIG otherwise.
pub fn client_handshake(data: &[u8]) {
    handshake::run(data);
}

/// Reply decoders (`decode_reply_header`, `decode_chunk_payload`, `decode_simple_reply`)
/// on arbitrary bytes in all three reply styles, and encode→decode round trips of every
/// reply encoder with arbitrary field values.
///
/// Layout: all of `data` is read as a stream of replies in each style; independently,
/// values for the encoders are derived from it.
///
/// Invariants: a header is decoded only when its magic fits the style, takes exactly its
/// length, and every shorter prefix is "need more"; the payload length from the wire is
/// bounded by the bytes at hand before it is used; a decoded payload obeys the protocol's
/// rules and re-encodes to the same bytes; every encoder writes nothing when it fails and
/// otherwise produces exactly what the decoders give back (cookie, offset, DONE, errno 0
/// sent as EIO, messages clipped at a character boundary, block status descriptors
/// filtered, limited and clipped as documented).
pub fn structured_replies(data: &[u8]) {
    replies::run(data);
}

/// The control socket: `RequestReader` fed a client's bytes in arbitrary splits, then
/// `ControlRequest::parse`, and the argument parsers of `mirror`, `acl` and
/// `mirror_max_bps`.
///
/// Layout: byte 0 bits 0-2 put a command line in front (1 `mirror`, 2 `acl`,
/// 3 `mirror_max_bps`, 4 `break`, 5 `status`); byte 1 chooses the split; the rest is the
/// client's bytes. Inputs past `MAX_REQUEST` (1 MiB) check the size limit: the smoke test
/// feeds a few (each costs milliseconds, too slow for the fuzzer's corpus).
///
/// Invariants: the lines do not depend on the split and bytes after the end of the request
/// are ignored; completion is monotonic and guaranteed once `MAX_REQUEST` bytes arrived;
/// no line is empty, contains a newline or holds more than `MAX_LINE` input bytes; the
/// parsed request matches its command line and its arguments (mirror's checks in
/// flexnbd's order, ACL entries parsed one by one, bandwidth limits with `strtoull`
/// overflow rules).
pub fn control_request(data: &[u8]) {
    control::run(data);
}

/// The acknowledged hand-off: `HandoffRequest`/`HandoffReply` decoding, `answer_length`,
/// encode round trips, and the pure state machines `TargetHandoff` and `SourceHandoff`,
/// alone and together over a lossy, reordering network.
///
/// Layout: all of `data` is decoded as a message and as a framed answer; independently it
/// is read as field values for the encoders, as a sequence of target events, as a
/// sequence of source events and as a network schedule.
///
/// Invariants: decoding (also of `Identity`, the answer to IDENTIFY) refuses messages
/// over `MAX_MESSAGE` and re-encodes what it accepts to an equivalent message; every
/// message round-trips, framed as an answer too, and keeps its variant number;
/// `Identity::conflicts_with` is symmetric and matches its definition; the target takes control at most once, only by the current connection's Commit
/// of a prepared migration that no NotPrepared answer was given for since, never lets a
/// fenced or ended connection write, and nobody writes once it stops; the source regains
/// authority only by proof (NotPrepared), a forced break or a failed unlink, never once a
/// Commit may be on the wire or its file is gone; source and target never both hold
/// control.
pub fn handoff_messages(data: &[u8]) {
    handoff::run(data);
}

mod framer {
    //! The `request_framer` target (the logic of the original libFuzzer target).

    use bytes::BytesMut;

    use super::next_random;
    use crate::protocol::handoff::IDENTIFY;
    use crate::protocol::request::{
        Command, Dialect, ExportRules, Frame, HeaderStyle, PayloadPart, Request, RequestFramer,
        Verdict,
    };
    use crate::protocol::Errno;

    const CONTROL: usize = 16;

    struct Setup {
        style: HeaderStyle,
        part_size: usize,
        /// Bit `i % 8` set: discard the payload of the `i`-th request (rejected requests are
        /// always discarded, as the session's reader does).
        discard_mask: u8,
        /// Largest chunk of the split feed.
        max_chunk: usize,
        seed: u64,
        rules: ExportRules,
    }

    impl Setup {
        fn new(c: &[u8; CONTROL]) -> Setup {
            let style = if c[0] & 1 == 0 {
                HeaderStyle::Compact
            } else {
                HeaderStyle::Extended
            };
            let part_size = if c[0] & 2 != 0 {
                // Parts larger than any input, up to the largest the API allows.
                usize::MAX >> (c[1] % 64)
            } else {
                1 + usize::from(u16::from_le_bytes([c[1], c[2]])) % 8192
            };
            let max_chunk = if c[0] & 4 != 0 {
                1 + usize::from(c[3]) * 64
            } else {
                1 + usize::from(c[3] % 32)
            };
            let seed = u64::from_le_bytes([c[4], c[5], c[6], c[7], 0, 0, 0, 0]) | 1 << 40;
            let size = u64::from_le_bytes(c[8..16].try_into().expect("8 bytes")) >> (c[0] >> 3);
            Setup {
                style,
                part_size,
                discard_mask: c[2].rotate_left(3) ^ c[3],
                max_chunk,
                seed,
                rules: ExportRules {
                    size,
                    dialect: Dialect::Oldstyle,
                    read_only: false,
                    migration_target: false,
                },
            }
        }
    }

    /// The payload of the request decoded last.
    struct Pending {
        len: u64,
        got: u64,
        kept: bool,
    }

    /// Checks the frames as they come out of one feed.
    struct Checker<'a> {
        setup: &'a Setup,
        pending: Option<Pending>,
        stopped: bool,
        requests: usize,
    }

    impl Checker<'_> {
        /// Returns whether the request's payload is to be discarded.
        fn request(&mut self, req: &Request) -> bool {
            assert!(!self.stopped, "a request decoded after a bad magic");
            if let Some(p) = &self.pending {
                assert!(
                    !p.kept,
                    "a header decoded before the previous payload was complete ({} of {} bytes)",
                    p.got, p.len
                );
            }
            let verdict = self.setup.rules.check(req);
            check_verdict(&self.setup.rules, req, verdict);
            let discard = matches!(verdict, Verdict::Reject(_))
                || (self.setup.discard_mask >> (self.requests % 8)) & 1 == 1;
            self.requests += 1;
            let len = req.payload_len(self.setup.style);
            self.pending = (len > 0).then_some(Pending {
                len,
                got: 0,
                kept: !discard,
            });
            discard
        }

        fn payload(&mut self, part: &PayloadPart) {
            assert!(!self.stopped, "a payload part decoded after a bad magic");
            let p = self
                .pending
                .as_mut()
                .expect("a payload part with no payload pending");
            assert!(p.kept, "a part of a discarded payload");
            let n = part.data.len() as u64;
            assert!(n > 0, "an empty payload part");
            assert!(
                n <= self.setup.part_size as u64,
                "a part of {n} bytes with part size {}",
                self.setup.part_size
            );
            assert_eq!(part.at, p.got, "payload parts are not contiguous");
            p.got += n;
            assert!(p.got <= p.len, "payload parts exceed the payload length");
            assert_eq!(part.last, p.got == p.len, "`last` is wrong");
            if part.last {
                self.pending = None;
            }
        }

        fn bad_magic(&mut self) {
            assert!(!self.stopped, "a second bad magic");
            if let Some(p) = &self.pending {
                assert!(!p.kept, "a header decoded inside a kept payload");
            }
            self.stopped = true;
        }
    }

    fn check_verdict(rules: &ExportRules, req: &Request, verdict: Verdict) {
        let in_range = req.end().is_some_and(|end| end <= rules.size);
        let identify = req.command == Command::Unknown(IDENTIFY);
        match verdict {
            // Every server of ours answers IDENTIFY, exactly as a source sends it; any
            // other IDENTIFY is an unknown type like any other (range first, then EINVAL).
            Verdict::Identify => assert!(identify && req.offset == 0 && req.length == 0),
            Verdict::Read { offset, length, .. } => {
                assert!(in_range && req.command == Command::Read);
                assert_eq!((offset, length), (req.offset, req.length));
            }
            Verdict::Write { offset, length, .. } => {
                assert!(in_range && req.command == Command::Write);
                assert_eq!((offset, length), (req.offset, req.length));
            }
            Verdict::Flush => assert!(in_range && req.command == Command::Flush),
            Verdict::Disconnect => assert!(in_range && req.command == Command::Disconnect),
            Verdict::Reject(errno) if !in_range => assert_eq!(errno, Errno::ENOSPC),
            Verdict::Reject(errno) => {
                assert_eq!(errno, Errno::EINVAL);
                assert!(!identify || req.offset != 0 || req.length != 0);
                assert!(!matches!(
                    req.command,
                    Command::Read | Command::Write | Command::Flush | Command::Disconnect
                ));
            }
            // The old-style rules this target runs (not a migration target) never produce
            // new-style or hand-off verdicts (Trim, WriteZeroes, Cache, BlockStatus, Probe,
            // Handoff, ...).
            other => panic!("old-style rules produced {other:?}"),
        }
    }

    /// Feeds `stream` in chunks (or whole when `split` is false) and returns the frames.
    fn feed(setup: &Setup, stream: &[u8], split: bool) -> Vec<Frame> {
        let mut framer = RequestFramer::new(setup.style, setup.part_size);
        let mut checker = Checker {
            setup,
            pending: None,
            stopped: false,
            requests: 0,
        };
        let mut rng = setup.seed;
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < stream.len() {
            let n = if split {
                1 + (next_random(&mut rng) % setup.max_chunk as u64) as usize
            } else {
                stream.len()
            };
            let end = stream.len().min(pos + n);
            buf.extend_from_slice(&stream[pos..end]);
            pos = end;
            while let Some(frame) = framer.next_frame(&mut buf) {
                match &frame {
                    Frame::Request(req) => {
                        if checker.request(req) {
                            framer.discard_payload();
                        }
                    }
                    Frame::Payload(part) => checker.payload(part),
                    Frame::BadMagic { .. } => checker.bad_magic(),
                }
                frames.push(frame);
            }
            match framer.next_need() {
                Some(need) => {
                    assert!(!checker.stopped, "next_need is Some after a bad magic");
                    assert!(
                        buf.len() < need,
                        "the framer stalled with {} bytes buffered, needing {need}",
                        buf.len()
                    );
                }
                None => assert!(checker.stopped, "next_need is None but no bad magic came"),
            }
            // Where a discarded payload ends is not visible in the frames: no expectation
            // then.
            let boundary = match &checker.pending {
                _ if checker.stopped => Some(false),
                None => Some(true),
                Some(p) if p.kept => Some(false),
                Some(_) => None,
            };
            if let Some(boundary) = boundary {
                assert_eq!(
                    framer.at_request_boundary(),
                    boundary,
                    "at_request_boundary disagrees with the frames"
                );
            }
        }
        frames
    }

    pub(super) fn run(data: &[u8]) {
        if data.len() < CONTROL {
            return;
        }
        let (control, stream) = data.split_at(CONTROL);
        let setup = Setup::new(control.try_into().expect("CONTROL bytes"));
        let whole = feed(&setup, stream, false);
        let split = feed(&setup, stream, true);
        assert_eq!(whole, split, "frames depend on how the stream was split");
    }
}

mod negotiation {
    //! The `newstyle_server` target.

    use std::ops::Range;

    use bytes::BytesMut;

    use super::{be32, be64, cuts, Input};
    use crate::protocol::client::{self, Greeting};
    use crate::protocol::consts::{tflags, IHAVEOPT, NBD_MAGIC};
    use crate::protocol::newstyle::{
        hflags, info, opt, rep, BlockSize, NegotiationConfig, NegotiationError, Progress,
        ServerNegotiation, BASE_ALLOCATION, BASE_ALLOCATION_ID, EXPORT_NAME_PADDING,
        MAX_OPTION_LEN, MAX_STRING_LEN, OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN,
        OPTION_REPLY_MAGIC,
    };
    use crate::protocol::request::HeaderStyle;
    use crate::protocol::structured::ReplyStyle;

    const SIZE: u64 = 0x0123_4567_89ab_cdef;
    /// Grammar scripts stop growing past this size.
    const MAX_SCRIPT: usize = 1 << 18;

    fn config(c: u8, b: u8) -> NegotiationConfig {
        let description = match (c >> 3) & 3 {
            0 => None,
            1 => Some("test disk".to_owned()),
            // Longer than the string limit: cut at a character boundary.
            2 => Some("ü".repeat(3000)),
            _ => Some(String::new()),
        };
        let export_name = match (c >> 5) & 3 {
            0 => "disk".to_owned(),
            1 => String::new(),
            2 => "dísk-ü".to_owned(),
            _ => "n".repeat(MAX_STRING_LEN + 1),
        };
        let block_size = match b & 3 {
            0 => BlockSize::DEFAULT,
            1 => BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20,
            },
            2 => BlockSize {
                min: 4096,
                preferred: 4096,
                max: u32::MAX,
            },
            // Invalid: the server sends what it is given.
            _ => BlockSize {
                min: 3,
                preferred: 100,
                max: 7,
            },
        };
        NegotiationConfig {
            export_name,
            description,
            size: SIZE,
            read_only: c & 1 != 0,
            block_size,
            can_multi_conn: c & 2 != 0,
            shutting_down: c & 4 != 0,
        }
    }

    /// Most bytes one option may make the server write (LIST, or INFO with every request,
    /// are the largest: both carry the name and the description).
    fn per_option_bound(config: &NegotiationConfig) -> usize {
        let description = config
            .description
            .as_ref()
            .map_or(0, |d| d.len().min(MAX_STRING_LEN));
        512 + 2 * (config.export_name.len() + description)
    }

    fn name(b: u8, ours: &str, inp: &mut Input<'_>) -> Vec<u8> {
        match b % 7 {
            0 => Vec::new(),
            1 => ours.as_bytes().to_vec(),
            2 => b"disk".to_vec(),
            3 => b"other".to_vec(),
            4 => vec![b'n'; MAX_STRING_LEN + 1],
            5 => {
                let n = usize::from(inp.byte() % 16);
                inp.bytes(n).to_vec()
            }
            _ => vec![b'n'; MAX_STRING_LEN],
        }
    }

    fn query(b: u8) -> Vec<u8> {
        match b % 7 {
            0 => BASE_ALLOCATION.as_bytes().to_vec(),
            1 => b"base:".to_vec(),
            2 => Vec::new(),
            3 => b"qemu:dirty-bitmap:x".to_vec(),
            4 => vec![b'q'; MAX_STRING_LEN + 1],
            5 => b"base:allocation\0".to_vec(),
            _ => vec![b'q'; MAX_STRING_LEN],
        }
    }

    fn header(out: &mut Vec<u8>, option: u32, len: u32) {
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }

    fn push_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        header(out, option, data.len() as u32);
        out.extend_from_slice(data);
    }

    /// Builds a client's byte stream from a small program: mostly well-formed options,
    /// some malformed ones, garbage and corruption.
    fn script(inp: &mut Input<'_>, ours: &str) -> Vec<u8> {
        let mut s = Vec::new();
        let f = inp.byte();
        let flags = match f >> 6 {
            0 | 1 => 3,
            2 => u32::from(f & 3),
            _ => inp.u32(),
        };
        s.extend_from_slice(&flags.to_be_bytes());
        while !inp.is_empty() && s.len() < MAX_SCRIPT {
            let op = inp.byte();
            match op % 16 {
                0 => push_option(&mut s, opt::LIST, &[]),
                1 => push_option(&mut s, opt::STRUCTURED_REPLY, &[]),
                2 => push_option(&mut s, opt::EXTENDED_HEADERS, &[]),
                3 | 4 => {
                    let option = if op % 16 == 3 { opt::INFO } else { opt::GO };
                    let b = inp.byte();
                    let n = name(b, ours, inp);
                    let count = inp.byte() % 6;
                    let mut p = (n.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(&n);
                    p.extend_from_slice(&u16::from(count).to_be_bytes());
                    for _ in 0..count {
                        p.extend_from_slice(&u16::from(inp.byte() % 5).to_be_bytes());
                    }
                    push_option(&mut s, option, &p);
                }
                5 | 6 => {
                    let option = if op % 16 == 5 {
                        opt::LIST_META_CONTEXT
                    } else {
                        opt::SET_META_CONTEXT
                    };
                    let b = inp.byte();
                    let n = name(b, ours, inp);
                    let count = inp.byte() % 5;
                    let mut p = (n.len() as u32).to_be_bytes().to_vec();
                    p.extend_from_slice(&n);
                    p.extend_from_slice(&u32::from(count).to_be_bytes());
                    for _ in 0..count {
                        let q = query(inp.byte());
                        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
                        p.extend_from_slice(&q);
                    }
                    push_option(&mut s, option, &p);
                }
                7 => {
                    let b = inp.byte();
                    let n = name(b, ours, inp);
                    push_option(&mut s, opt::EXPORT_NAME, &n);
                }
                8 => {
                    let n = usize::from(inp.byte() % 3);
                    push_option(&mut s, opt::ABORT, &vec![0; n]);
                }
                9 => {
                    let option = if op & 0x10 != 0 {
                        inp.u32()
                    } else {
                        u32::from(inp.byte() % 16)
                    };
                    let n = usize::from(inp.byte());
                    let d = inp.bytes(n).to_vec();
                    push_option(&mut s, option, &d);
                }
                10 => {
                    // Oversized: skipped as it arrives, then refused (or ABORT acked).
                    let option = u32::from(inp.byte() % 12);
                    let len = MAX_OPTION_LEN as usize + 1 + usize::from(inp.byte());
                    header(&mut s, option, len as u32);
                    s.resize(s.len() + len, 7);
                }
                11 => {
                    let n = usize::from(inp.byte());
                    s.extend_from_slice(inp.bytes(n));
                }
                12 => {
                    // A header whose payload may be cut short.
                    let option = u32::from(inp.byte() % 12);
                    let len = inp.u16();
                    header(&mut s, option, u32::from(len));
                    s.extend_from_slice(inp.bytes(usize::from(len)));
                }
                13 => {
                    if !s.is_empty() {
                        let at = usize::from(inp.u16()) % s.len();
                        s[at] = inp.byte();
                    }
                }
                14 => {
                    // INFO or GO with an arbitrary name length.
                    let option = if op & 0x10 != 0 { opt::GO } else { opt::INFO };
                    let mut p = inp.u32().to_be_bytes().to_vec();
                    let n = usize::from(inp.byte());
                    p.extend_from_slice(inp.bytes(n));
                    push_option(&mut s, option, &p);
                }
                _ => {
                    // A meta context request with arbitrary lengths and counts.
                    let option = if op & 0x10 != 0 {
                        opt::SET_META_CONTEXT
                    } else {
                        opt::LIST_META_CONTEXT
                    };
                    let name_len = inp.byte() % 8;
                    let mut p = u32::from(name_len).to_be_bytes().to_vec();
                    p.extend_from_slice(inp.bytes(usize::from(name_len)));
                    p.extend_from_slice(&inp.u32().to_be_bytes());
                    let n = usize::from(inp.byte());
                    p.extend_from_slice(inp.bytes(n));
                    push_option(&mut s, option, &p);
                }
            }
        }
        s
    }

    struct Run {
        out: Vec<u8>,
        result: Option<Result<Progress, NegotiationError>>,
        rest: Vec<u8>,
    }

    fn check_greeting(g: &[u8]) {
        assert_eq!(be64(g, 0), NBD_MAGIC);
        assert_eq!(be64(g, 8), IHAVEOPT);
        let first: [u8; 16] = g[..16].try_into().expect("16 bytes");
        assert_eq!(client::classify(&first), Ok(Greeting::Newstyle));
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            hflags::FIXED_NEWSTYLE | hflags::NO_ZEROES
        );
    }

    /// Feeds `stream` cut into `pieces`, one `feed` per piece until negotiation ends; the
    /// pieces after the end stay in the input, as a session leaves them for transmission.
    fn drive(config: &NegotiationConfig, stream: &[u8], pieces: &[Range<usize>]) -> Run {
        let per_option = per_option_bound(config);
        let mut neg = ServerNegotiation::new(config.clone());
        check_greeting(&neg.greeting());
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut result = None;
        let mut appended = 0;
        for piece in pieces {
            input.extend_from_slice(&stream[piece.clone()]);
            appended += piece.len();
            if result.is_some() {
                continue;
            }
            let progress = neg.feed(&mut input, &mut out);
            let consumed = appended - input.len();
            assert!(
                out.len() <= consumed / OPTION_HEADER_LEN * per_option,
                "{} reply bytes for {consumed} input bytes",
                out.len()
            );
            // `feed` only ever consumes from the front: the length tells.
            let (kept, written) = (input.len(), out.len());
            let again = neg.feed(&mut input, &mut out);
            assert_eq!(input.len(), kept, "a feed with nothing new consumed bytes");
            assert_eq!(out.len(), written, "a feed with nothing new wrote replies");
            match progress {
                Ok(Progress::NeedMore) => {
                    assert_eq!(again, Ok(Progress::NeedMore));
                    assert!(
                        input.len() < OPTION_HEADER_LEN + MAX_OPTION_LEN as usize,
                        "{} bytes buffered while waiting",
                        input.len()
                    );
                }
                end => {
                    assert_eq!(again, Err(NegotiationError::Finished));
                    assert_ne!(end, Err(NegotiationError::Finished), "finished too early");
                    result = Some(end);
                }
            }
        }
        Run {
            out,
            result,
            rest: input.to_vec(),
        }
    }

    /// Option replies as our client decodes them: (option, type, payload); then the bytes
    /// that are no option reply (an EXPORT_NAME reply).
    type Replies<'a> = (Vec<(u32, u32, &'a [u8])>, &'a [u8]);

    fn parse_replies(out: &[u8]) -> Replies<'_> {
        let mut replies = Vec::new();
        let mut pos = 0;
        while out.len() - pos >= OPTION_REPLY_HEADER_LEN && be64(out, pos) == OPTION_REPLY_MAGIC {
            let header: [u8; OPTION_REPLY_HEADER_LEN] = out[pos..pos + OPTION_REPLY_HEADER_LEN]
                .try_into()
                .expect("20 bytes");
            let (option, kind, len) =
                client::decode_option_reply(&header).expect("our replies decode");
            let start = pos + OPTION_REPLY_HEADER_LEN;
            let end = start + len as usize;
            assert!(end <= out.len(), "a reply overruns the output");
            let payload = &out[start..end];
            if kind == rep::INFO {
                client::parse_info_export(payload).expect("our INFO replies parse");
            }
            replies.push((option, kind, payload));
            pos = end;
        }
        (replies, &out[pos..])
    }

    fn check_negotiated(config: &NegotiationConfig, n: &crate::protocol::newstyle::Negotiated) {
        let f = n.transmission_flags;
        assert_ne!(f & tflags::HAS_FLAGS, 0);
        assert_eq!(f & tflags::READ_ONLY != 0, config.read_only);
        assert_eq!(f & tflags::SEND_TRIM != 0, !config.read_only);
        assert_eq!(f & tflags::SEND_WRITE_ZEROES != 0, !config.read_only);
        assert_eq!(f & tflags::CAN_MULTI_CONN != 0, config.can_multi_conn);
        assert_eq!(f & tflags::SEND_DF != 0, n.structured_replies);
        assert!(!n.extended_headers || n.structured_replies);
        assert!(n.base_allocation.is_none() || n.structured_replies);
        assert!(n.base_allocation.is_none() || n.base_allocation == Some(BASE_ALLOCATION_ID));
        assert!(n.block_size.is_none() || n.block_size == Some(config.block_size));
        assert_eq!(n.export_name, config.export_name);
        let expected_style = match (n.extended_headers, n.structured_replies) {
            (true, _) => ReplyStyle::Extended,
            (false, true) => ReplyStyle::Structured,
            (false, false) => ReplyStyle::Simple,
        };
        assert_eq!(n.reply_style(), expected_style);
        let header = if n.extended_headers {
            HeaderStyle::Extended
        } else {
            HeaderStyle::Compact
        };
        assert_eq!(n.header_style(), header);
    }

    fn check_end(config: &NegotiationConfig, run: &Run) {
        let (replies, tail) = parse_replies(&run.out);
        match &run.result {
            Some(Ok(Progress::Done(n))) => {
                assert!(!config.shutting_down, "negotiated while shutting down");
                check_negotiated(config, n);
                if tail.is_empty() {
                    // Ended by GO: its ACK comes last, after the export's INFO.
                    let last = replies.last().expect("GO was answered");
                    assert_eq!((last.0, last.1, last.2.len()), (opt::GO, rep::ACK, 0));
                    let export = replies
                        .iter()
                        .rev()
                        .filter(|r| r.1 == rep::INFO)
                        .find_map(|r| {
                            client::parse_info_export(r.2)
                                .expect("our INFO replies parse")
                                .map(|e| (r.0, e))
                        });
                    assert_eq!(export, Some((opt::GO, (config.size, n.transmission_flags))));
                } else {
                    // Ended by EXPORT_NAME: size, flags and (unless NO_ZEROES) padding.
                    let padding = if n.no_zeroes { 0 } else { EXPORT_NAME_PADDING };
                    assert_eq!(tail.len(), 10 + padding);
                    assert_eq!(be64(tail, 0), config.size);
                    assert_eq!(u16::from_be_bytes([tail[8], tail[9]]), n.transmission_flags);
                    assert!(tail[10..].iter().all(|b| *b == 0));
                    assert_eq!(n.block_size, None);
                }
                if n.base_allocation.is_some() {
                    assert!(
                        replies.iter().any(|r| r.0 == opt::SET_META_CONTEXT
                            && r.1 == rep::META_CONTEXT
                            && r.2.len() >= 4
                            && be32(r.2, 0) == BASE_ALLOCATION_ID),
                        "base:allocation selected without a reply that says so"
                    );
                }
            }
            Some(Ok(Progress::Aborted)) => {
                assert!(tail.is_empty());
                let last = replies.last().expect("ABORT was answered");
                assert_eq!((last.0, last.1, last.2.len()), (opt::ABORT, rep::ACK, 0));
            }
            Some(Ok(Progress::NeedMore)) => panic!("NeedMore is not an end"),
            Some(Err(e)) => {
                assert!(tail.is_empty(), "{e}: bytes that are no option reply");
                assert_ne!(*e, NegotiationError::Finished);
            }
            None => assert!(tail.is_empty(), "bytes that are no option reply"),
        }
        // Every INFO reply carries a known information type.
        for r in &replies {
            if r.1 == rep::INFO {
                let kind = u16::from_be_bytes([r.2[0], r.2[1]]);
                assert!([
                    info::EXPORT,
                    info::NAME,
                    info::DESCRIPTION,
                    info::BLOCK_SIZE
                ]
                .contains(&kind));
            }
        }
    }

    pub(super) fn run(data: &[u8]) {
        let mut inp = Input::new(data);
        let c = inp.byte();
        let b = inp.byte();
        let seed = u64::from(inp.u16());
        let config = config(c, b);
        let stream = if c & 0x80 != 0 {
            script(&mut inp, &config.export_name)
        } else {
            inp.rest().to_vec()
        };
        let m = usize::from(b >> 2);
        let max_chunk = if m >= 48 { 1 + (m - 47) * 4096 } else { 1 + m };
        let all = 0..stream.len();
        let whole = drive(&config, &stream, std::slice::from_ref(&all));
        let split = drive(&config, &stream, &cuts(stream.len(), seed, max_chunk));
        assert_eq!(whole.out, split.out, "replies depend on the split");
        assert_eq!(
            whole.result, split.result,
            "the outcome depends on the split"
        );
        assert_eq!(whole.rest, split.rest, "the bytes left depend on the split");
        check_end(&config, &whole);
    }
}

mod handshake {
    //! The `client_handshake` target.

    use bytes::BytesMut;

    use super::{be16, be32, be64, Input};
    use crate::protocol::client::{self, ClientError, Greeting, MAX_OPTION_REPLY};
    use crate::protocol::consts::{IHAVEOPT, NBD_MAGIC, OLDSTYLE_HELLO_LEN, OLDSTYLE_MAGIC};
    use crate::protocol::handshake::{HelloError, OldstyleHello};
    use crate::protocol::newstyle::{
        client_flags, hflags, info, opt, rep, BlockSize, NegotiationConfig, Progress,
        ServerNegotiation, MAX_STRING_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC,
    };

    const SIZE: u64 = 0x0000_0100_0000_0200;

    fn classify(first: &[u8; 16]) -> Result<Greeting, ClientError> {
        let r = client::classify(first);
        let (passwd, magic) = (be64(first, 0), be64(first, 8));
        match &r {
            Ok(Greeting::Oldstyle) => assert!(passwd == NBD_MAGIC && magic == OLDSTYLE_MAGIC),
            Ok(Greeting::Newstyle) => assert!(passwd == NBD_MAGIC && magic == IHAVEOPT),
            Err(ClientError::NotNbd) => assert_ne!(passwd, NBD_MAGIC),
            Err(ClientError::UnknownHandshake(m)) => {
                assert_eq!(passwd, NBD_MAGIC);
                assert_eq!(*m, magic);
                assert!(magic != OLDSTYLE_MAGIC && magic != IHAVEOPT);
            }
            Err(other) => panic!("classify gave {other:?}"),
        }
        r
    }

    fn hello(bytes: &[u8; OLDSTYLE_HELLO_LEN]) -> Option<OldstyleHello> {
        let r = OldstyleHello::decode(bytes);
        let (passwd, magic) = (be64(bytes, 0), be64(bytes, 8));
        match r {
            Ok(h) => {
                assert!(passwd == NBD_MAGIC && magic == OLDSTYLE_MAGIC);
                assert_eq!(h.size, be64(bytes, 16));
                assert_eq!(h.flags, be32(bytes, 24) as u16);
                let enc = h.encode();
                assert_eq!(enc[..24], bytes[..24]);
                assert_eq!(enc[24..26], [0, 0], "high flag bits are sent as zero");
                assert_eq!(enc[26..28], bytes[26..28]);
                assert!(enc[28..].iter().all(|b| *b == 0), "padding is zero");
                assert_eq!(OldstyleHello::decode(&enc), Ok(h));
                Some(h)
            }
            Err(HelloError::BadPasswd) => {
                assert_ne!(passwd, NBD_MAGIC);
                None
            }
            Err(HelloError::BadMagic(m)) => {
                assert_eq!(passwd, NBD_MAGIC);
                assert_eq!(m, magic);
                assert_ne!(magic, OLDSTYLE_MAGIC);
                None
            }
        }
    }

    fn option_reply(h: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<(u32, u32, u32)> {
        let r = client::decode_option_reply(h);
        let (magic, len) = (be64(h, 0), be32(h, 16));
        match r {
            Ok((option, kind, l)) => {
                assert_eq!(magic, OPTION_REPLY_MAGIC);
                assert_eq!((option, kind, l), (be32(h, 8), be32(h, 12), len));
                assert!(l <= MAX_OPTION_REPLY);
                Some((option, kind, l))
            }
            Err(ClientError::BadReplyMagic(m)) => {
                assert_eq!(m, magic);
                assert_ne!(magic, OPTION_REPLY_MAGIC);
                None
            }
            Err(ClientError::ReplyTooLong(l)) => {
                assert_eq!(magic, OPTION_REPLY_MAGIC);
                assert_eq!(l, len);
                assert!(l > MAX_OPTION_REPLY);
                None
            }
            Err(other) => panic!("decode_option_reply gave {other:?}"),
        }
    }

    fn info_export(p: &[u8]) -> Result<Option<(u64, u16)>, ClientError> {
        let r = client::parse_info_export(p);
        let expected = if p.len() < 2 {
            Err(ClientError::BadInfo)
        } else if be16(p, 0) != info::EXPORT {
            Ok(None)
        } else if p.len() != 12 {
            Err(ClientError::BadInfo)
        } else {
            Ok(Some((be64(p, 2), be16(p, 10))))
        };
        assert_eq!(r, expected);
        r
    }

    /// Each decoder straight on the bytes.
    fn direct(bytes: &[u8]) {
        if let Some(first) = bytes.get(..16) {
            classify(first.try_into().expect("16 bytes")).ok();
        }
        if let Some(h) = bytes.get(..OPTION_REPLY_HEADER_LEN) {
            option_reply(h.try_into().expect("20 bytes"));
        }
        info_export(bytes).ok();
        info_export(&bytes[..bytes.len().min(12)]).ok();
        let mut full = [0u8; OLDSTYLE_HELLO_LEN];
        let n = bytes.len().min(OLDSTYLE_HELLO_LEN);
        full[..n].copy_from_slice(&bytes[..n]);
        hello(&full);
    }

    /// The mirror's handshake (`actors::mirror`) over a server's stream.
    fn mirror(inp: &mut Input<'_>, greeting: u8, auto_magic: bool) {
        let mut first = [0u8; 16];
        match greeting {
            1 | 2 => {
                first[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
                let magic = if greeting == 1 {
                    OLDSTYLE_MAGIC
                } else {
                    IHAVEOPT
                };
                first[8..].copy_from_slice(&magic.to_be_bytes());
            }
            _ => {
                let got = inp.bytes(16);
                if got.len() < 16 {
                    return;
                }
                first.copy_from_slice(got);
            }
        }
        match classify(&first) {
            Err(_) => {
                let mut full = [0u8; OLDSTYLE_HELLO_LEN];
                full[..16].copy_from_slice(&first);
                assert!(
                    hello(&full).is_none(),
                    "a refused greeting decoded as a hello"
                );
            }
            Ok(Greeting::Oldstyle) => {
                let rest = inp.bytes(OLDSTYLE_HELLO_LEN - 16);
                if rest.len() < OLDSTYLE_HELLO_LEN - 16 {
                    return;
                }
                let mut full = [0u8; OLDSTYLE_HELLO_LEN];
                full[..16].copy_from_slice(&first);
                full[16..].copy_from_slice(rest);
                assert!(hello(&full).is_some(), "a classified hello was refused");
            }
            Ok(Greeting::Newstyle) => {
                let f = inp.bytes(2);
                if f.len() < 2 {
                    return;
                }
                let flags = be16(f, 0);
                let go = client::go_request(flags, "");
                let Ok(go) = go else {
                    assert_eq!(go, Err(ClientError::NotFixedNewstyle));
                    assert_eq!(flags & hflags::FIXED_NEWSTYLE, 0);
                    return;
                };
                check_go(&go, flags, "");
                loop {
                    let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
                    if auto_magic {
                        let got = inp.bytes(OPTION_REPLY_HEADER_LEN - 8);
                        if got.len() < OPTION_REPLY_HEADER_LEN - 8 {
                            return;
                        }
                        header[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
                        header[8..].copy_from_slice(got);
                    } else {
                        let got = inp.bytes(OPTION_REPLY_HEADER_LEN);
                        if got.len() < OPTION_REPLY_HEADER_LEN {
                            return;
                        }
                        header.copy_from_slice(got);
                    }
                    let Some((_, kind, len)) = option_reply(&header) else {
                        return;
                    };
                    // The mirror allocates `len` bytes: the decoder bounded it.
                    assert!(len <= MAX_OPTION_REPLY);
                    let payload = inp.bytes(len as usize);
                    if payload.len() < len as usize {
                        return;
                    }
                    match kind {
                        rep::INFO => {
                            if info_export(payload).is_err() {
                                return;
                            }
                        }
                        rep::ACK => break,
                        _ => return,
                    }
                }
            }
        }
    }

    fn check_go(go: &[u8], server_flags: u16, name: &str) {
        let mut flags = client_flags::FIXED_NEWSTYLE;
        if server_flags & hflags::NO_ZEROES != 0 {
            flags |= client_flags::NO_ZEROES;
        }
        assert_eq!(go.len(), 26 + name.len());
        assert_eq!(be32(go, 0), flags);
        assert_eq!(be64(go, 4), IHAVEOPT);
        assert_eq!(be32(go, 12), opt::GO);
        assert_eq!(be32(go, 16) as usize, 6 + name.len());
        assert_eq!(be32(go, 20) as usize, name.len());
        assert_eq!(&go[24..24 + name.len()], name.as_bytes());
        assert_eq!(be16(go, 24 + name.len()), 0);
    }

    /// Our client's GO against our server, its replies read with our client's decoders.
    fn round_trip(c: u8, body: &[u8]) {
        let name = match (c >> 3) & 3 {
            0 => String::new(),
            1 => "disk".to_owned(),
            2 => String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned(),
            _ => "n".repeat(MAX_STRING_LEN - 2 + usize::from(c >> 5) % 5),
        };
        assert_eq!(
            client::go_request(0, &name),
            Err(ClientError::NotFixedNewstyle)
        );
        let only_fixed =
            client::go_request(hflags::FIXED_NEWSTYLE, &name).expect("fixed new-style");
        check_go(&only_fixed, hflags::FIXED_NEWSTYLE, &name);
        let config = NegotiationConfig {
            export_name: "disk".into(),
            description: None,
            size: SIZE,
            read_only: c & 0x40 != 0,
            block_size: BlockSize::DEFAULT,
            can_multi_conn: false,
            shutting_down: false,
        };
        let mut server = ServerNegotiation::new(config);
        let greeting = server.greeting();
        let first: [u8; 16] = greeting[..16].try_into().expect("16 bytes");
        assert_eq!(classify(&first), Ok(Greeting::Newstyle));
        let server_flags = be16(&greeting, 16);
        let go = client::go_request(server_flags, &name).expect("our server is fixed new-style");
        check_go(&go, server_flags, &name);
        let mut input = BytesMut::from(&go[..]);
        let mut out = Vec::new();
        let progress = server.feed(&mut input, &mut out);
        assert!(input.is_empty(), "the server left part of GO");
        let mut kinds = Vec::new();
        let mut export = None;
        let mut pos = 0;
        while pos < out.len() {
            let header: [u8; OPTION_REPLY_HEADER_LEN] = out[pos..pos + OPTION_REPLY_HEADER_LEN]
                .try_into()
                .expect("a whole reply header");
            let (option, kind, len) = option_reply(&header).expect("our replies decode");
            assert_eq!(option, opt::GO);
            let start = pos + OPTION_REPLY_HEADER_LEN;
            let payload = &out[start..start + len as usize];
            if kind == rep::INFO {
                if let Some(e) = info_export(payload).expect("our INFO replies parse") {
                    export = Some(e);
                }
            }
            kinds.push(kind);
            pos = start + len as usize;
        }
        if name.len() > MAX_STRING_LEN {
            assert_eq!(kinds, vec![rep::ERR_TOO_BIG]);
            assert_eq!(progress, Ok(Progress::NeedMore));
        } else if name.is_empty() || name == "disk" {
            let Ok(Progress::Done(n)) = progress else {
                panic!("GO for {name:?} gave {progress:?}")
            };
            assert_eq!(kinds, vec![rep::INFO, rep::ACK]);
            assert_eq!(export, Some((SIZE, n.transmission_flags)));
            assert!(n.no_zeroes);
        } else {
            assert_eq!(kinds, vec![rep::ERR_UNKNOWN]);
            assert_eq!(progress, Ok(Progress::NeedMore));
        }
    }

    pub(super) fn run(data: &[u8]) {
        let mut inp = Input::new(data);
        let c = inp.byte();
        let body = inp.rest();
        direct(body);
        mirror(&mut Input::new(body), c & 3, c & 4 != 0);
        round_trip(c, body);
    }
}

mod replies {
    //! The `structured_replies` target.

    use std::borrow::Cow;

    use super::{be32, be64, Input};
    use crate::protocol::consts::{
        EXTENDED_REPLY_MAGIC, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
    };
    use crate::protocol::reply::{decode_simple_reply, simple_reply, SimpleReply};
    use crate::protocol::structured::{
        chunk, decode_chunk_payload, decode_reply_header, error_payload, extended_chunk_header,
        offset_data_prefix, offset_hole_payload, structured_chunk_header, ChunkError, ChunkHeader,
        ChunkPayload, Coverage, Extent, ReplyHeader, ReplyStyle, ReplyTo, COMPACT_EXTENT_CLIP,
        EXTENDED_HEADER_LEN, FLAG_DONE, MAX_ERROR_MESSAGE, MAX_EXTENTS_PER_CHUNK,
        STRUCTURED_HEADER_LEN,
    };
    use crate::protocol::Errno;

    const STYLES: [ReplyStyle; 3] = [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ];

    const KNOWN: [u16; 7] = [
        chunk::NONE,
        chunk::OFFSET_DATA,
        chunk::OFFSET_HOLE,
        chunk::BLOCK_STATUS,
        chunk::BLOCK_STATUS_EXT,
        chunk::ERROR,
        chunk::ERROR_OFFSET,
    ];

    /// Decodes `buf` as a stream of replies, as a client reading them would.
    fn decode_stream(style: ReplyStyle, buf: &[u8]) {
        let mut pos = 0;
        while pos < buf.len() {
            match decode_one(style, &buf[pos..]) {
                Some(used) => pos += used,
                None => return,
            }
        }
    }

    /// Decodes the reply at the start of `buf`; returns how many bytes it took, or `None`
    /// when the stream cannot go on.
    fn decode_one(style: ReplyStyle, buf: &[u8]) -> Option<usize> {
        let r = decode_reply_header(style, buf);
        if buf.len() < 4 {
            assert_eq!(r, Ok(None));
            return None;
        }
        let magic = be32(buf, 0);
        let need = match magic {
            SIMPLE_REPLY_MAGIC if style != ReplyStyle::Extended => SIMPLE_REPLY_LEN,
            STRUCTURED_REPLY_MAGIC if style == ReplyStyle::Structured => STRUCTURED_HEADER_LEN,
            EXTENDED_REPLY_MAGIC if style == ReplyStyle::Extended => EXTENDED_HEADER_LEN,
            _ => {
                assert_eq!(r, Err(ChunkError::BadMagic(magic)));
                return None;
            }
        };
        if buf.len() < need {
            assert_eq!(r, Ok(None));
            return None;
        }
        let (header, used) = r
            .expect("a valid magic")
            .expect("a complete header decodes");
        assert_eq!(used, need);
        for k in 4..need {
            assert_eq!(
                decode_reply_header(style, &buf[..k]),
                Ok(None),
                "a {k}-byte prefix"
            );
        }
        match header {
            ReplyHeader::Simple(s) => {
                assert_eq!(magic, SIMPLE_REPLY_MAGIC);
                let fixed: &[u8; SIMPLE_REPLY_LEN] = buf[..16].try_into().expect("16 bytes");
                assert_eq!(decode_simple_reply(fixed), Some(s));
                assert_eq!(s.error, be32(buf, 4));
                assert_eq!(s.cookie, be64(buf, 8));
                let error = (s.error != 0).then_some(Errno(s.error));
                assert_eq!(simple_reply(s.cookie, error), *fixed);
                Some(used)
            }
            ReplyHeader::Chunk(h) => {
                let mut again = Vec::new();
                assert_eq!(style.chunk_header(&h, &mut again), Ok(()));
                assert_eq!(again, buf[..used], "a chunk header re-encodes differently");
                if style == ReplyStyle::Structured {
                    assert_eq!(h.offset, 0);
                    assert!(h.length <= u64::from(u32::MAX));
                }
                let avail = &buf[used..];
                // The length is untrusted: bound it by what is at hand before using it.
                let Some(n) = usize::try_from(h.length).ok().filter(|n| *n <= avail.len()) else {
                    assert!(
                        decode_chunk_payload(style, &h, avail).is_err(),
                        "a payload shorter than its header says was accepted"
                    );
                    return None;
                };
                payload(style, &h, &avail[..n]);
                Some(used + n)
            }
        }
    }

    /// Decodes a chunk payload and checks what comes out against the bytes.
    fn payload(style: ReplyStyle, h: &ChunkHeader, bytes: &[u8]) {
        let t = h.chunk_type;
        match decode_chunk_payload(style, h, bytes) {
            Ok(ChunkPayload::None) => {
                assert_eq!(t, chunk::NONE);
                assert!(bytes.is_empty() && h.is_done());
            }
            Ok(ChunkPayload::OffsetData { offset, data }) => {
                assert_eq!(t, chunk::OFFSET_DATA);
                assert!(!data.is_empty());
                let mut again = offset_data_prefix(offset).to_vec();
                again.extend_from_slice(data);
                assert_eq!(again, bytes);
            }
            Ok(ChunkPayload::OffsetHole { offset, length }) => {
                assert_eq!(t, chunk::OFFSET_HOLE);
                assert_ne!(length, 0);
                assert_eq!(offset_hole_payload(offset, length), bytes);
            }
            Ok(ChunkPayload::BlockStatus {
                context_id,
                extents,
            }) => {
                let ext = style == ReplyStyle::Extended;
                assert_eq!(
                    t,
                    if ext {
                        chunk::BLOCK_STATUS_EXT
                    } else {
                        chunk::BLOCK_STATUS
                    }
                );
                assert!(!extents.is_empty() && extents.len() <= MAX_EXTENTS_PER_CHUNK);
                assert!(extents.iter().all(|e| e.length > 0));
                let to = ReplyTo {
                    cookie: h.cookie,
                    offset: h.offset,
                };
                let mut again = Vec::new();
                let cov = style
                    .block_status(to, context_id, &extents, false, h.is_done(), &mut again)
                    .expect("decoded extents re-encode");
                assert_eq!(cov.descriptors, extents.len());
                let hl = style.header_len();
                assert_eq!(again[hl..], *bytes, "block status re-encodes differently");
            }
            Ok(ChunkPayload::Error {
                errno,
                message,
                offset,
            }) => {
                assert!(h.is_error());
                assert_ne!(errno, 0);
                assert_eq!(offset.is_some(), t == chunk::ERROR_OFFSET);
                assert!(message.chars().count() <= usize::from(u16::MAX));
                let ours = t == chunk::ERROR || t == chunk::ERROR_OFFSET;
                if ours && matches!(message, Cow::Borrowed(_)) && message.len() <= MAX_ERROR_MESSAGE
                {
                    let mut again = Vec::new();
                    error_payload(Errno(errno), &message, offset, &mut again);
                    assert_eq!(again, bytes, "an error payload re-encodes differently");
                }
            }
            Ok(ChunkPayload::Unknown { chunk_type }) => {
                assert_eq!(chunk_type, t);
                assert!(!h.is_error() && !KNOWN.contains(&t));
            }
            Err(ChunkError::Malformed { chunk_type, .. }) => assert_eq!(chunk_type, t),
            Err(other) => panic!("decode_chunk_payload gave {other}"),
        }
    }

    /// Decodes one whole reply that an encoder wrote.
    fn decode_whole(
        style: ReplyStyle,
        out: &[u8],
    ) -> (ReplyHeader, Option<Result<ChunkPayload<'_>, ChunkError>>) {
        let (header, used) = decode_reply_header(style, out)
            .expect("our replies decode")
            .expect("our replies are whole");
        match header {
            ReplyHeader::Simple(_) => {
                assert_eq!(used, out.len());
                (header, None)
            }
            ReplyHeader::Chunk(h) => {
                assert_eq!(h.length, (out.len() - used) as u64);
                (header, Some(decode_chunk_payload(style, &h, &out[used..])))
            }
        }
    }

    fn chunk_of(header: ReplyHeader) -> ChunkHeader {
        match header {
            ReplyHeader::Chunk(h) => h,
            ReplyHeader::Simple(s) => panic!("a simple reply {s:?} where a chunk was due"),
        }
    }

    fn message(inp: &mut Input<'_>) -> String {
        match inp.byte() % 4 {
            0 => String::new(),
            1 => {
                let n = usize::from(inp.byte());
                String::from_utf8_lossy(inp.bytes(n)).into_owned()
            }
            // Around the clip limit, with 2- and 3-byte characters.
            2 => "é".repeat(2046 + usize::from(inp.byte() % 4)),
            _ => "€".repeat(1364 + usize::from(inp.byte() % 4)),
        }
    }

    fn check_clipped(sent: &str, got: &str) {
        assert!(sent.starts_with(got), "the message is not a prefix");
        if sent.len() <= MAX_ERROR_MESSAGE {
            assert_eq!(got, sent);
        } else {
            assert!(got.len() <= MAX_ERROR_MESSAGE && got.len() > MAX_ERROR_MESSAGE - 4);
        }
    }

    /// The block status descriptors the documentation promises for `extents`.
    fn expected_descriptors(extents: &[Extent], compact: bool, req_one: bool) -> Vec<Extent> {
        let limit = if req_one { 1 } else { MAX_EXTENTS_PER_CHUNK };
        let mut out = Vec::new();
        for e in extents.iter().filter(|e| e.length > 0).take(limit) {
            if compact && e.length > u64::from(u32::MAX) {
                out.push(Extent {
                    length: u64::from(COMPACT_EXTENT_CLIP),
                    flags: e.flags,
                });
                break;
            }
            out.push(*e);
        }
        out
    }

    fn encode_round_trips(inp: &mut Input<'_>) {
        let style = STYLES[usize::from(inp.byte() % 3)];
        let simple = style == ReplyStyle::Simple;
        let to = ReplyTo {
            cookie: inp.u64(),
            offset: inp.interesting_u64(),
        };
        let echoed = if style == ReplyStyle::Extended {
            to.offset
        } else {
            0
        };
        let errno = Errno(match inp.byte() % 3 {
            0 => 0,
            1 => inp.u32(),
            _ => u32::from(inp.byte()),
        });
        let sent_errno = if errno.0 == 0 { 5 } else { errno.0 };
        let text = message(inp);
        let done = inp.bool();

        // A reply without data.
        let mut out = Vec::new();
        style.ok(to, &mut out);
        match decode_whole(style, &out) {
            (ReplyHeader::Simple(s), None) => {
                assert!(simple);
                assert_eq!(
                    s,
                    SimpleReply {
                        error: 0,
                        cookie: to.cookie
                    }
                );
            }
            (ReplyHeader::Chunk(h), Some(p)) => {
                assert!(!simple && h.is_done() && h.cookie == to.cookie && h.offset == echoed);
                assert_eq!(p, Ok(ChunkPayload::None));
            }
            other => panic!("ok() gave {other:?}"),
        }

        // A final error.
        let mut out = Vec::new();
        style.error(to, errno, &text, &mut out);
        match decode_whole(style, &out) {
            (ReplyHeader::Simple(s), None) => {
                assert!(simple);
                assert_eq!(
                    s,
                    SimpleReply {
                        error: sent_errno,
                        cookie: to.cookie
                    }
                );
            }
            (
                ReplyHeader::Chunk(h),
                Some(Ok(ChunkPayload::Error {
                    errno,
                    message,
                    offset: None,
                })),
            ) => {
                assert!(!simple && h.is_done() && h.chunk_type == chunk::ERROR);
                assert_eq!((h.cookie, h.offset, errno), (to.cookie, echoed, sent_errno));
                check_clipped(&text, &message);
            }
            other => panic!("error() gave {other:?}"),
        }

        // An error at an offset.
        let error_offset = inp.interesting_u64();
        let mut out = Vec::new();
        let r = style.error_at(to, errno, &text, error_offset, done, &mut out);
        if simple {
            assert_eq!(r, Err(ChunkError::NotStructured));
            assert!(out.is_empty());
        } else {
            assert_eq!(r, Ok(()));
            match decode_whole(style, &out) {
                (
                    ReplyHeader::Chunk(h),
                    Some(Ok(ChunkPayload::Error {
                        errno,
                        message,
                        offset,
                    })),
                ) => {
                    assert_eq!(h.chunk_type, chunk::ERROR_OFFSET);
                    assert_eq!(h.is_done(), done);
                    assert_eq!((errno, offset), (sent_errno, Some(error_offset)));
                    check_clipped(&text, &message);
                }
                other => panic!("error_at() gave {other:?}"),
            }
        }

        // The header of a READ's data, whole or in pieces.
        let len = inp.interesting_u64();
        let data_offset = inp.interesting_u64();
        for whole in [true, false] {
            let mut out = Vec::new();
            let (at, is_done, r) = if whole {
                (to.offset, true, style.read_data_header(to, len, &mut out))
            } else {
                let r = style.data_chunk_header(to, data_offset, len, done, &mut out);
                (data_offset, done, r)
            };
            if simple {
                assert_eq!(r, Ok(()));
                assert_eq!(out, simple_reply(to.cookie, None));
                continue;
            }
            if whole && len == 0 {
                assert_eq!(r, Ok(()));
                let (header, p) = decode_whole(style, &out);
                assert!(chunk_of(header).is_done());
                assert_eq!(p, Some(Ok(ChunkPayload::None)));
                continue;
            }
            let fits = len
                .checked_add(8)
                .is_some_and(|l| style == ReplyStyle::Extended || l <= u64::from(u32::MAX));
            if !fits {
                assert!(matches!(r, Err(ChunkError::TooLong(_))), "{r:?}");
                assert!(out.is_empty(), "a failed encoder wrote bytes");
                continue;
            }
            assert_eq!(r, Ok(()));
            let hl = style.header_len();
            assert_eq!(out.len(), hl + 8);
            let (header, used) = decode_reply_header(style, &out)
                .expect("our header decodes")
                .expect("whole");
            let h = chunk_of(header);
            assert_eq!(used, hl);
            assert_eq!(
                (h.chunk_type, h.is_done(), h.cookie, h.offset, h.length),
                (chunk::OFFSET_DATA, is_done, to.cookie, echoed, len + 8)
            );
            assert_eq!(be64(&out, hl), at);
            // A zero-length piece has no valid encoding: its callers never ask for one.
            if len > 0 && len <= 4096 {
                let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
                out.extend_from_slice(&data);
                assert_eq!(
                    decode_chunk_payload(style, &h, &out[hl..]),
                    Ok(ChunkPayload::OffsetData {
                        offset: at,
                        data: &data
                    })
                );
            }
        }

        // A hole.
        let hole_offset = inp.interesting_u64();
        let size = inp.u32();
        let mut out = Vec::new();
        let r = style.hole_chunk(to, hole_offset, size, done, &mut out);
        if simple {
            assert_eq!(r, Err(ChunkError::NotStructured));
            assert!(out.is_empty());
        } else {
            assert_eq!(r, Ok(()));
            let (header, p) = decode_whole(style, &out);
            let h = chunk_of(header);
            assert_eq!((h.chunk_type, h.is_done()), (chunk::OFFSET_HOLE, done));
            if size == 0 {
                assert!(matches!(p, Some(Err(ChunkError::Malformed { .. }))));
            } else {
                assert_eq!(
                    p,
                    Some(Ok(ChunkPayload::OffsetHole {
                        offset: hole_offset,
                        length: size
                    }))
                );
            }
        }

        // Block status.
        let context_id = inp.u32();
        let req_one = inp.bool();
        let n = inp.byte() % 24;
        let extents: Vec<Extent> = (0..n)
            .map(|_| {
                let b = inp.byte();
                let length = match b % 5 {
                    0 => 0,
                    1 => 1 + u64::from(inp.u16() % 4096),
                    2 => u64::from(u32::MAX) + 4 - u64::from(inp.byte() % 8),
                    3 => inp.u64(),
                    _ => u64::from(inp.u16()),
                };
                let flags = match (b >> 3) % 3 {
                    0 => u64::from(inp.byte() % 4),
                    1 => u64::from(inp.u32()),
                    _ => inp.u64(),
                };
                Extent { length, flags }
            })
            .collect();
        let compact = style == ReplyStyle::Structured;
        let expected = expected_descriptors(&extents, compact, req_one);
        let mut out = Vec::new();
        let r = style.block_status(to, context_id, &extents, req_one, done, &mut out);
        let too_wide = expected
            .iter()
            .find(|e| compact && e.flags > u64::from(u32::MAX));
        if simple {
            assert_eq!(r, Err(ChunkError::NotStructured));
            assert!(out.is_empty());
        } else if expected.is_empty() {
            assert_eq!(r, Err(ChunkError::NoExtents));
            assert!(out.is_empty());
        } else if let Some(e) = too_wide {
            assert_eq!(r, Err(ChunkError::FlagsTooWide(e.flags)));
            assert!(out.is_empty());
        } else {
            let length = expected
                .iter()
                .fold(0u64, |sum, e| sum.saturating_add(e.length));
            assert_eq!(
                r,
                Ok(Coverage {
                    descriptors: expected.len(),
                    length
                })
            );
            let (header, p) = decode_whole(style, &out);
            let h = chunk_of(header);
            assert_eq!((h.is_done(), h.cookie, h.offset), (done, to.cookie, echoed));
            assert_eq!(
                p,
                Some(Ok(ChunkPayload::BlockStatus {
                    context_id,
                    extents: expected
                }))
            );
        }

        // Any chunk header.
        let h = ChunkHeader {
            flags: inp.u16(),
            chunk_type: inp.u16(),
            cookie: to.cookie,
            offset: to.offset,
            length: inp.interesting_u64(),
        };
        let mut out = Vec::new();
        let r = style.chunk_header(&h, &mut out);
        if simple {
            assert_eq!(r, Err(ChunkError::NotStructured));
            assert!(out.is_empty());
        } else if compact && h.length > u64::from(u32::MAX) {
            assert_eq!(r, Err(ChunkError::TooLong(h.length)));
            assert!(out.is_empty());
        } else {
            assert_eq!(r, Ok(()));
            let direct = if compact {
                structured_chunk_header(h.flags, h.chunk_type, h.cookie, h.length as u32).to_vec()
            } else {
                extended_chunk_header(h.flags, h.chunk_type, h.cookie, h.offset, h.length).to_vec()
            };
            assert_eq!(out, direct);
            let expected = ChunkHeader {
                offset: echoed,
                ..h
            };
            assert_eq!(
                decode_reply_header(style, &out),
                Ok(Some((ReplyHeader::Chunk(expected), out.len())))
            );
            assert_eq!(expected.is_done(), h.flags & FLAG_DONE != 0);
        }

        // A simple reply.
        let error = (inp.byte() % 2 == 1).then_some(errno);
        let bytes = simple_reply(to.cookie, error);
        assert_eq!(
            decode_simple_reply(&bytes),
            Some(SimpleReply {
                error: error.map_or(0, |e| e.0),
                cookie: to.cookie
            })
        );
    }

    pub(super) fn run(data: &[u8]) {
        for style in STYLES {
            decode_stream(style, data);
        }
        encode_round_trips(&mut Input::new(data));
    }
}

mod control {
    //! The `control_request` target.

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{cuts, Input};
    use crate::acl::{Acl, AclEntry, BadAclEntry};
    use crate::addr::{atoi, parse_ip};
    use crate::protocol::control::{
        parse_max_bps, parse_mirror_max_bps, ControlRequest, CopyMode, MirrorAction, RequestReader,
        FORCE_SOURCE, MAX_LINE, MAX_REQUEST,
    };

    /// Feeds `stream` in `pieces` (all of them, even after completion) and returns whether
    /// the request completed and its lines.
    fn read(stream: &[u8], pieces: &[std::ops::Range<usize>]) -> (bool, Vec<String>) {
        let mut reader = RequestReader::default();
        let mut complete = false;
        for piece in pieces {
            let now = reader.feed(&stream[piece.clone()]);
            assert!(!complete || now, "a complete request became incomplete");
            complete = now;
        }
        (complete, reader.into_lines())
    }

    fn check_lines(stream: &[u8], lines: &[String]) {
        let mut chars = 0;
        for line in lines {
            assert!(!line.is_empty(), "an empty line");
            assert!(!line.contains('\n'), "a line with a newline");
            let n = line.chars().count();
            assert!(n <= MAX_LINE, "a line of {n} characters");
            chars += n;
        }
        // Each character comes from at least one input byte, and no more than MAX_REQUEST
        // bytes are read.
        assert!(chars <= stream.len().min(MAX_REQUEST));
    }

    /// `strtoull` in base 10 over the same leading-space rule, as a reference.
    fn reference_max_bps(text: &str) -> Result<u64, &'static str> {
        let t = text.trim_start();
        let (negative, digits) = match t.as_bytes().first() {
            Some(b'-') => (true, &t[1..]),
            Some(b'+') => (false, &t[1..]),
            _ => (false, t),
        };
        let mut value: u128 = 0;
        for b in digits.bytes().take_while(u8::is_ascii_digit) {
            value = value * 10 + u128::from(b - b'0');
            if value > u128::from(u64::MAX) {
                return Err("max_bps out of range");
            }
        }
        let value = value as u64;
        Ok(if negative {
            value.wrapping_neg()
        } else {
            value
        })
    }

    fn check_max_bps(text: &str) -> Result<u64, &'static str> {
        let r = parse_max_bps(text);
        assert_eq!(r, reference_max_bps(text), "{text:?}");
        r
    }

    /// flexnbd's order of `mirror`'s checks, as a reference.
    fn reference_mirror(args: &[String]) -> Result<(), &'static str> {
        if args.len() < 2 {
            return Err("mirror takes at least two parameters");
        }
        parse_ip(&args[0]).ok_or("bad IP address")?;
        if !(0..=65535).contains(&atoi(&args[1])) {
            return Err("bad IP port number");
        }
        if !matches!(
            args.get(2).map(String::as_str),
            None | Some("exit" | "unlink" | "nothing")
        ) {
            return Err("action must be 'exit' or 'nothing'");
        }
        if let Some(bind) = args.get(3) {
            parse_ip(bind).ok_or("bad bind address")?;
        }
        if let Some(limit) = args.get(4) {
            check_max_bps(limit)?;
        }
        // Ours: the copy mode.
        if let Some(mode) = args.get(5) {
            CopyMode::parse(mode).ok_or("mode must be 'background', 'active' or 'auto'")?;
        }
        if args.len() > 6 {
            return Err("unrecognised parameters to mirror");
        }
        Ok(())
    }

    fn check_mirror(args: &[String], request: &ControlRequest) {
        match (request, reference_mirror(args)) {
            (ControlRequest::Mirror(m), Ok(())) => {
                assert_eq!(Some(m.addr), parse_ip(&args[0]));
                assert_eq!(i64::from(m.port), atoi(&args[1]));
                let action = match args.get(2).map(String::as_str) {
                    None | Some("exit") => MirrorAction::Exit,
                    Some("unlink") => MirrorAction::Unlink,
                    _ => MirrorAction::Nothing,
                };
                assert_eq!(m.action, action);
                // An unspecified bind address means no bind (ours).
                let bind = args
                    .get(3)
                    .and_then(|b| parse_ip(b))
                    .filter(|ip| !ip.is_unspecified());
                assert_eq!(m.bind, bind);
                let limit = args.get(4).map_or(Ok(u64::MAX), |l| parse_max_bps(l));
                assert_eq!(Ok(m.max_bps), limit);
                let mode = args
                    .get(5)
                    .map_or(Some(CopyMode::Auto), |t| CopyMode::parse(t));
                assert_eq!(Some(m.mode), mode);
            }
            (ControlRequest::MirrorRefused(text), Err(expected)) => assert_eq!(*text, expected),
            (got, expected) => panic!("mirror {args:?} gave {got:?}, expected {expected:?}"),
        }
    }

    fn check_acl(args: &[String]) {
        let peers = [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        ];
        let singles: Vec<Result<AclEntry, BadAclEntry>> =
            args.iter().map(|a| AclEntry::parse(a)).collect();
        for (arg, single) in args.iter().zip(&singles) {
            match single {
                Ok(e) => {
                    let max = if e.addr.is_ipv4() { 32 } else { 128 };
                    assert!((1..=max).contains(&e.bits), "{arg:?} gave {} bits", e.bits);
                    assert!(e.matches(&e.addr), "{arg:?} does not match its own address");
                    for peer in &peers {
                        let _ = e.matches(peer);
                    }
                }
                Err(BadAclEntry(text)) => assert_eq!(text, arg),
            }
        }
        for default_deny in [false, true] {
            match Acl::parse(args, default_deny) {
                Ok(acl) => {
                    let entries: Vec<AclEntry> = singles
                        .iter()
                        .map(|s| *s.as_ref().expect("parsed"))
                        .collect();
                    assert_eq!(acl.entries(), &entries[..]);
                    assert_eq!(acl.default_deny(), default_deny);
                    if entries.is_empty() {
                        assert!(peers.iter().all(|p| acl.allows(p) != default_deny));
                    }
                    for e in &entries {
                        assert!(acl.allows(&e.addr));
                    }
                    for peer in &peers {
                        let allowed = (entries.is_empty() && !default_deny)
                            || entries.iter().any(|e| e.matches(peer));
                        assert_eq!(acl.allows(peer), allowed);
                    }
                }
                Err(BadAclEntry(text)) => {
                    let first = singles
                        .iter()
                        .find_map(|s| s.as_ref().err().map(|e| e.0.clone()));
                    assert_eq!(Some(text), first, "not the first bad entry");
                }
            }
        }
    }

    fn check_parse(lines: &[String]) {
        let request = ControlRequest::parse(lines);
        let Some((command, args)) = lines.split_first() else {
            assert_eq!(request, ControlRequest::Missing);
            return;
        };
        match command.as_str() {
            "acl" => {
                assert_eq!(request, ControlRequest::Acl(args.to_vec()));
                check_acl(args);
            }
            "status" => assert_eq!(request, ControlRequest::Status),
            "break" => assert_eq!(
                request,
                ControlRequest::Break {
                    force_source: args.first().is_some_and(|a| a == FORCE_SOURCE)
                }
            ),
            "mirror" => check_mirror(args, &request),
            "mirror_max_bps" => {
                assert_eq!(request, ControlRequest::MirrorMaxBps(args.to_vec()));
                let expected = match args {
                    [one] => check_max_bps(one),
                    _ => Err("Bad format"),
                };
                assert_eq!(parse_mirror_max_bps(args), expected);
            }
            _ => assert_eq!(request, ControlRequest::Unknown),
        }
    }

    pub(super) fn run(data: &[u8]) {
        let mut inp = Input::new(data);
        let c = inp.byte();
        let s = inp.byte();
        let body = inp.rest();
        let mut stream: Vec<u8> = match c & 7 {
            1 => b"mirror\n".to_vec(),
            2 => b"acl\n".to_vec(),
            3 => b"mirror_max_bps\n".to_vec(),
            4 => b"break\n".to_vec(),
            5 => b"status\n".to_vec(),
            _ => Vec::new(),
        };
        stream.extend_from_slice(body);
        let max_chunk = if s & 0x80 != 0 {
            1 + usize::from(s & 0x7f) * 512
        } else {
            1 + usize::from(s % 16)
        };
        let all = 0..stream.len();
        let (whole_done, whole) = read(&stream, std::slice::from_ref(&all));
        let (split_done, split) = read(&stream, &cuts(stream.len(), u64::from(s), max_chunk));
        assert_eq!(whole_done, split_done, "completion depends on the split");
        assert_eq!(whole, split, "the lines depend on the split");
        if stream.len() >= MAX_REQUEST {
            assert!(
                whole_done,
                "{} bytes did not complete the request",
                stream.len()
            );
        }
        check_lines(&stream, &whole);
        check_parse(&whole);

        // The argument parsers straight on the body's lines.
        let args: Vec<String> = body
            .split(|b| *b == b'\n' || *b == 0)
            .take(8)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut mirror = vec!["mirror".to_owned()];
        mirror.extend_from_slice(&args);
        check_parse(&mirror);
        check_acl(&args);
        let mut max_bps = vec!["mirror_max_bps".to_owned()];
        max_bps.extend(args.first().cloned());
        check_parse(&max_bps);
        let _ = check_max_bps(&String::from_utf8_lossy(body));
    }
}

mod handoff {
    //! The `handoff_messages` target.

    use std::collections::{BTreeSet, HashMap};

    use super::{be32, Input};
    use crate::protocol::handoff::source::{BreakDecision, Next, SourceHandoff, SourcePhase};
    use crate::protocol::handoff::target::{
        Admission, ConnId, TargetEffect, TargetHandoff, TargetPhase, Writer, MAX_CANDIDATES,
    };
    use crate::protocol::handoff::{
        answer_length, encode_answer, encode_identity, HandoffError, HandoffReply, HandoffRequest,
        Identity, JoinPurpose, MigrationId, SameAs, MAX_MESSAGE,
    };

    const IDS: [MigrationId; 3] = [
        MigrationId([1; 16]),
        MigrationId([2; 16]),
        MigrationId([0xff; 16]),
    ];
    const SIZE: u64 = 1 << 20;

    fn request_variant(r: &HandoffRequest) -> u8 {
        match r {
            HandoffRequest::Prepare { .. } => 0,
            HandoffRequest::Commit { .. } => 1,
            HandoffRequest::Join { .. } => 2,
        }
    }

    fn reply_variant(r: &HandoffReply) -> u8 {
        match r {
            HandoffReply::Prepared { .. } => 0,
            HandoffReply::Committed { .. } => 1,
            HandoffReply::Refused { .. } => 2,
            HandoffReply::Joined { .. } => 3,
            HandoffReply::NotPrepared { .. } => 4,
        }
    }

    /// Decodes `bytes` as every message type.
    fn decode(bytes: &[u8]) {
        let request = HandoffRequest::decode(bytes);
        let reply = HandoffReply::decode(bytes);
        let identity = Identity::decode(bytes);
        if bytes.len() > MAX_MESSAGE {
            assert_eq!(request, Err(HandoffError::TooLong(bytes.len())));
            assert_eq!(reply, Err(HandoffError::TooLong(bytes.len())));
            assert_eq!(identity, Err(HandoffError::TooLong(bytes.len())));
            return;
        }
        if let Ok(i) = identity {
            let again = i.encode();
            assert!(again.len() <= bytes.len(), "re-encoding grew the identity");
            assert_eq!(Identity::decode(&again), Ok(i));
        }
        if let Ok(r) = request {
            let again = r.encode();
            assert!(again.len() <= bytes.len(), "re-encoding grew the message");
            assert_eq!(again[0], request_variant(&r));
            assert_eq!(HandoffRequest::decode(&again), Ok(r));
        }
        if let Ok(r) = reply {
            let again = r.encode();
            assert!(again.len() <= bytes.len(), "re-encoding grew the message");
            assert_eq!(again[0], reply_variant(&r));
            assert_eq!(HandoffReply::decode(&again), Ok(r));
        }
    }

    /// The answer behind a HANDOFF reply, read as the mirror reads it.
    fn framed(bytes: &[u8]) {
        let Some(prefix) = bytes.get(..4) else {
            return;
        };
        let announced = be32(prefix, 0);
        match answer_length(prefix.try_into().expect("4 bytes")) {
            Ok(n) => {
                assert_eq!(n as u64, u64::from(announced));
                assert!(n <= MAX_MESSAGE);
                if let Some(body) = bytes.get(4..4 + n) {
                    decode(body);
                }
            }
            Err(e) => {
                assert!(announced as usize > MAX_MESSAGE);
                assert_eq!(e, HandoffError::TooLong(announced as usize));
            }
        }
    }

    fn check_identity(a: &Identity, b: &Identity) {
        let expected = if a.server == b.server {
            Some(SameAs::ThisServer)
        } else if (a.boot, a.dev, a.ino) == (b.boot, b.dev, b.ino) {
            Some(SameAs::ThisFile)
        } else {
            None
        };
        assert_eq!(a.conflicts_with(b), expected);
        assert_eq!(
            b.conflicts_with(a),
            expected,
            "conflicts_with is not symmetric"
        );
        assert_eq!(a.conflicts_with(a), Some(SameAs::ThisServer));
        let e = a.encode();
        assert!(e.len() <= MAX_MESSAGE);
        assert_eq!(Identity::decode(&e), Ok(*a));
        assert!(Identity::decode(&e[..e.len() - 1]).is_err());
        let framed = encode_identity(a);
        let n = answer_length(framed[..4].try_into().expect("4 bytes")).expect("bounded");
        assert_eq!(n, framed.len() - 4);
        assert_eq!(Identity::decode(&framed[4..]), Ok(*a));
    }

    fn identities(inp: &mut Input<'_>) {
        let a = Identity {
            server: inp.array(),
            boot: inp.array(),
            dev: inp.interesting_u64(),
            ino: inp.interesting_u64(),
        };
        // Another server: the same or another of each field, as the input says.
        let same = inp.byte();
        let b = Identity {
            server: if same & 1 != 0 { a.server } else { inp.array() },
            boot: if same & 2 != 0 { a.boot } else { inp.array() },
            dev: if same & 4 != 0 {
                a.dev
            } else {
                inp.interesting_u64()
            },
            ino: if same & 8 != 0 {
                a.ino
            } else {
                inp.interesting_u64()
            },
        };
        check_identity(&a, &b);
    }

    fn round_trips(inp: &mut Input<'_>) {
        let id = MigrationId(inp.array());
        let purpose = if inp.bool() {
            JoinPurpose::Copy
        } else {
            JoinPurpose::Commit
        };
        let requests = [
            HandoffRequest::Prepare {
                id,
                size: inp.interesting_u64(),
            },
            HandoffRequest::Commit { id },
            HandoffRequest::Join {
                id,
                attempt: inp.interesting_u64(),
                purpose,
            },
        ];
        for r in requests {
            let e = r.encode();
            assert!(e.len() <= MAX_MESSAGE);
            assert_eq!(e[0], request_variant(&r));
            assert_eq!(HandoffRequest::decode(&e), Ok(r));
            // A request is never mistaken for a longer one, nor decoded from a prefix.
            assert!(HandoffRequest::decode(&e[..e.len() - 1]).is_err());
        }
        // Reasons are short texts of ours; a few hundred bytes cover them.
        let n = usize::from(inp.byte()) * 2;
        let reason = String::from_utf8_lossy(inp.bytes(n)).into_owned();
        let replies = [
            HandoffReply::Prepared { id },
            HandoffReply::Committed { id },
            HandoffReply::Refused { reason },
            HandoffReply::Joined {
                id,
                attempt: inp.interesting_u64(),
            },
            HandoffReply::NotPrepared { id },
        ];
        for r in replies {
            let e = r.encode();
            assert!(e.len() <= MAX_MESSAGE);
            assert_eq!(e[0], reply_variant(&r));
            assert_eq!(HandoffReply::decode(&e), Ok(r.clone()));
            let answer = encode_answer(&r);
            let n = answer_length(answer[..4].try_into().expect("4 bytes")).expect("bounded");
            assert_eq!(n, answer.len() - 4);
            assert_eq!(HandoffReply::decode(&answer[4..]), Ok(r));
        }
    }

    /// `TargetHandoff` driven by arbitrary events.
    fn target(inp: &mut Input<'_>) {
        let mut t = TargetHandoff::new(SIZE);
        let mut next_conn: ConnId = 1;
        let mut taken = 0;
        let mut stopped = false;
        let mut fenced = BTreeSet::new();
        let mut ended = BTreeSet::new();
        // Per migration: a NotPrepared answer was given and no Prepared since.
        let mut not_prepared: HashMap<MigrationId, bool> = HashMap::new();
        // The connection that was answered Joined last, for which migration.
        let mut last_joined: Option<(ConnId, MigrationId)> = None;
        while !inp.is_empty() {
            let op = inp.byte();
            // Any connection so far, or 0, which was never admitted.
            let conn = ConnId::from(inp.byte()) % next_conn;
            let had_control = t.has_control();
            match op % 8 {
                // Enough connections for every rule; a bound keeps each run fast.
                0 if next_conn > 64 => {}
                0 => {
                    let c = next_conn;
                    next_conn += 1;
                    let phase = t.phase();
                    match t.admit(c) {
                        Admission::Admit => {
                            assert!(!stopped && !had_control && !t.is_committing());
                            if phase != TargetPhase::Legacy {
                                assert!(t.is_candidate(c));
                            }
                        }
                        Admission::Refuse(_) => {
                            assert!(!t.is_candidate(c));
                            // Closed at once: it never sends anything.
                            ended.insert(c);
                        }
                    }
                }
                1 => {
                    let disconnect = op & 0x80 != 0;
                    let phase = t.phase();
                    if t.on_session_ended(conn, disconnect) {
                        assert!(disconnect && !stopped && phase == TargetPhase::Legacy);
                        assert!(t.is_committing());
                    }
                    ended.insert(conn);
                    assert!(!t.is_candidate(conn));
                }
                // A closed connection sends nothing more.
                2..=4 if ended.contains(&conn) => {}
                2..=4 => {
                    let id = IDS[usize::from(inp.byte() % 3)];
                    let request = match op % 8 {
                        2 => HandoffRequest::Join {
                            id,
                            attempt: u64::from(inp.byte() % 8),
                            purpose: if op & 0x80 != 0 {
                                JoinPurpose::Copy
                            } else {
                                JoinPurpose::Commit
                            },
                        },
                        3 => HandoffRequest::Prepare {
                            id,
                            size: if op & 0x80 != 0 { SIZE } else { SIZE + 1 },
                        },
                        _ => HandoffRequest::Commit { id },
                    };
                    let before = t.phase();
                    let (reply, effect) = t.on_request(conn, &request);
                    if stopped {
                        assert!(matches!(reply, HandoffReply::Refused { .. }));
                    }
                    match (&reply, effect) {
                        (HandoffReply::Committed { id: got }, TargetEffect::TakeControl) => {
                            taken += 1;
                            assert!(!stopped);
                            assert_eq!(*got, id);
                            assert_eq!(before, TargetPhase::Prepared(id));
                            assert_eq!(last_joined.map(|j| j.0), Some(conn));
                            assert!(!ended.contains(&conn) && !fenced.contains(&conn));
                            assert_ne!(
                                not_prepared.get(&id),
                                Some(&true),
                                "control taken for a migration answered NotPrepared"
                            );
                        }
                        (_, TargetEffect::TakeControl) => panic!("control taken with {reply:?}"),
                        (HandoffReply::Committed { id: got }, TargetEffect::None) => {
                            assert_eq!(*got, id);
                            assert_eq!(before, TargetPhase::Committed(Some(id)));
                        }
                        (HandoffReply::Prepared { id: got }, TargetEffect::SyncFirst) => {
                            assert_eq!(*got, id);
                            assert_eq!(t.phase(), TargetPhase::Prepared(id));
                            not_prepared.insert(id, false);
                        }
                        (_, TargetEffect::SyncFirst) | (HandoffReply::Prepared { .. }, _) => {
                            panic!("{reply:?} with {effect:?}")
                        }
                        (HandoffReply::NotPrepared { id: got }, TargetEffect::None) => {
                            assert_eq!(*got, id);
                            assert!(!t.has_control());
                            not_prepared.insert(id, true);
                        }
                        (HandoffReply::Joined { id: got, attempt }, effect) => {
                            let HandoffRequest::Join { attempt: asked, .. } = request else {
                                panic!("Joined answers {request:?}")
                            };
                            assert_eq!((*got, *attempt), (id, asked));
                            if let TargetEffect::Close(old) = effect {
                                assert_ne!(old, conn);
                                fenced.insert(old);
                            }
                            fenced.remove(&conn);
                            last_joined = Some((conn, id));
                        }
                        (HandoffReply::Refused { .. }, TargetEffect::Close(c)) => {
                            assert_eq!(c, conn, "a refusal closes the asking connection");
                            fenced.insert(c);
                        }
                        (HandoffReply::Refused { .. }, TargetEffect::None) => {}
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                5 => t.sync_failed(),
                6 => {
                    stopped = true;
                    assert_eq!(t.stop(), t.has_control());
                }
                _ => {
                    let committing = t.is_committing();
                    let ok = op & 0x80 != 0;
                    t.legacy_synced(ok);
                    assert!(!t.is_committing());
                    if committing && ok {
                        taken += 1;
                        assert_eq!(t.phase(), TargetPhase::Committed(None));
                    }
                }
            }
            // Control is taken at most once, by the paths counted above, and kept.
            assert!(taken <= 1, "control taken twice");
            assert_eq!(t.has_control(), taken == 1);
            assert!(!had_control || t.has_control(), "control was lost");
            assert_eq!(
                t.has_control(),
                matches!(t.phase(), TargetPhase::Committed(_))
            );
            match t.writer() {
                Writer::Everyone => assert!(t.has_control() && !stopped),
                Writer::Nobody => {
                    assert!(!t.has_control() || stopped || t.is_committing());
                }
                Writer::Only(c) => {
                    assert!(!t.has_control() && !stopped && !t.is_committing());
                    assert!(!fenced.contains(&c), "a fenced connection may write");
                    assert!(!ended.contains(&c), "an ended connection may write");
                    match t.phase() {
                        TargetPhase::Receiving(id) => assert_eq!(last_joined, Some((c, id))),
                        TargetPhase::Legacy => {}
                        phase => panic!("connection {c} may write in {phase:?}"),
                    }
                }
            }
            let candidates = (0..=next_conn).filter(|c| t.is_candidate(*c)).count();
            assert!(candidates <= MAX_CANDIDATES);
        }
    }

    /// `SourceHandoff` driven by arbitrary events.
    fn source(inp: &mut Input<'_>) {
        let mut s = SourceHandoff::new();
        // A Commit may be on the wire and no proof or forced break came since.
        let mut in_doubt = false;
        // The file is gone, or the migration is over: never authoritative again.
        let mut never_again = false;
        while !inp.is_empty() {
            let op = inp.byte();
            let before = s.phase();
            let had = s.has_control();
            let force = op & 0x80 != 0;
            let next = match op % 11 {
                0 => Some(s.close_doors()),
                1 => Some(s.prepared()),
                2 => Some(s.unlinking()),
                3 => {
                    s.unlink_failed();
                    None
                }
                4 => {
                    let next = s.commit_starting();
                    if next == Next::Proceed {
                        assert!(!s.has_control());
                        assert!(matches!(s.phase(), SourcePhase::InDoubt { .. }));
                        in_doubt = true;
                    }
                    Some(next)
                }
                5 => Some(s.committed()),
                6 => {
                    let next = s.not_prepared();
                    if next == Next::Retry && before == (SourcePhase::InDoubt { unlinked: false }) {
                        in_doubt = false;
                    }
                    Some(next)
                }
                7 => Some(s.failed()),
                8 => Some(s.finished_without_handoff()),
                9 => {
                    match s.on_break(force) {
                        BreakDecision::Stop { reopen } => {
                            assert_eq!(reopen, s.has_control());
                            if reopen && !had {
                                assert!(force, "only a forced break reopens");
                                in_doubt = false;
                            }
                        }
                        BreakDecision::Refuse(_) | BreakDecision::AlreadyHandedOff => {
                            assert_eq!(s.phase(), before, "a refused break changed the phase");
                        }
                    }
                    None
                }
                _ => Some(s.on_signal()),
            };
            match next {
                Some(Next::Stop { reopen }) => assert_eq!(reopen, s.has_control()),
                Some(Next::Retry) => assert!(s.has_control(), "retry with closed authority"),
                Some(Next::ResendCommit) => assert!(!s.has_control()),
                Some(Next::HandedOff) => assert_eq!(s.phase(), SourcePhase::HandedOff),
                Some(Next::Orphaned) => assert_eq!(s.phase(), SourcePhase::Orphaned),
                Some(Next::Proceed) | None => {}
            }
            if !had && s.has_control() {
                let proof = op % 11 == 6 && before == SourcePhase::InDoubt { unlinked: false };
                let forced =
                    op % 11 == 9 && force && before == SourcePhase::InDoubt { unlinked: false };
                let unlink_failed = op % 11 == 3 && before == SourcePhase::Unlinked;
                assert!(
                    proof || forced || unlink_failed,
                    "{before:?} regained authority with event {}",
                    op % 11
                );
            }
            if before == SourcePhase::HandedOff {
                assert_eq!(s.phase(), SourcePhase::HandedOff, "left HandedOff");
            }
            if matches!(
                s.phase(),
                SourcePhase::HandedOff
                    | SourcePhase::Orphaned
                    | SourcePhase::InDoubt { unlinked: true }
            ) {
                never_again = true;
            }
            if never_again || in_doubt {
                assert!(!s.has_control(), "authoritative again in {:?}", s.phase());
            }
        }
    }

    fn world(inp: &mut Input<'_>) {
        let setup = inp.byte();
        let unlink_failures = inp.byte();
        let mut steps = Vec::new();
        while !inp.is_empty() {
            steps.push((inp.byte(), inp.byte()));
        }
        crate::protocol::handoff::model::check_schedule(setup & 1 != 0, unlink_failures, &steps);
    }

    pub(super) fn run(data: &[u8]) {
        decode(data);
        framed(data);
        round_trips(&mut Input::new(data));
        identities(&mut Input::new(data));
        target(&mut Input::new(data));
        source(&mut Input::new(data));
        world(&mut Input::new(data));
    }
}
