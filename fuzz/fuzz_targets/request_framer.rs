//! Fuzzes `RequestFramer`, the decoder that cuts a session's socket bytes into request
//! headers and payload parts, together with `ExportRules::check`.
//!
//! Input layout: the first `CONTROL` bytes choose the setup (header style, part size,
//! which requests get their payload discarded, how the stream is split, the export size);
//! the rest is the byte stream a client would send.
//!
//! The stream is fed twice: in chunks of pseudo-random length (as socket reads would cut
//! it) and all at once. Invariants:
//! - nothing panics;
//! - a payload part is never empty and never larger than the part size;
//! - a kept payload comes as contiguous parts from offset 0, `last` exactly on the final
//!   one, and its parts add up to the request's payload length before the next header is
//!   decoded (that is, whenever all its bytes are present);
//! - a discarded payload, or a request without payload, yields no part;
//! - nothing is decoded after a bad magic;
//! - the framer never sits on enough bytes for its next frame (`next_need`);
//! - a READ or WRITE accepted by the rules lies inside the export;
//! - the frames are identical however the stream was split.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

use flexnbd::protocol::request::{
    Command, Dialect, ExportRules, Frame, HeaderStyle, PayloadPart, Request, RequestFramer, Verdict,
};
use flexnbd::protocol::Errno;

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

/// xorshift64: cheap and deterministic, so both feeds see the same discard decisions and
/// a crash reproduces from its input.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
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
    match verdict {
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
            assert!(!matches!(
                req.command,
                Command::Read | Command::Write | Command::Flush | Command::Disconnect
            ));
        }
        // The old-style rules this target runs never produce new-style commands.
        Verdict::Trim { .. }
        | Verdict::WriteZeroes { .. }
        | Verdict::Cache { .. }
        | Verdict::BlockStatus { .. }
        | Verdict::Probe
        | Verdict::Handoff { .. } => panic!("old-style rules produced {verdict:?}"),
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
        // Where a discarded payload ends is not visible in the frames: no expectation then.
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

fuzz_target!(|data: &[u8]| {
    if data.len() < CONTROL {
        return;
    }
    let (control, stream) = data.split_at(CONTROL);
    let setup = Setup::new(control.try_into().expect("CONTROL bytes"));
    let whole = feed(&setup, stream, false);
    let split = feed(&setup, stream, true);
    assert_eq!(whole, split, "frames depend on how the stream was split");
});
