//! A fast, deterministic run of every fuzz harness (`flexnbd::fuzzing`), in every test run.
//!
//! Each target gets hand-made edge cases (empty, all 0x00, all 0xff), valid messages built
//! with the crate's own encoders (each truncated at every length and with each byte
//! flipped), and a few thousand pseudo-random inputs spliced from random bytes, runs of
//! 0x00/0xff and pieces of the valid messages. The long, coverage-guided run is
//! `scripts/fuzz.sh` (see `fuzz/README.md`).
//!
//! With `FLEXNBD_FUZZ_SEEDS=DIR` set, each test also writes its valid messages to
//! `DIR/<target>/` as a starting corpus for that run.

use bytes::BytesMut;

use flexnbd::fuzzing;
use flexnbd::protocol::consts::{cflags, EXTENDED_REPLY_MAGIC, IHAVEOPT};
use flexnbd::protocol::handoff::{
    encode_answer, encode_identity, HandoffReply, HandoffRequest, Identity, JoinPurpose,
    MigrationId, IDENTIFY,
};
use flexnbd::protocol::handshake::OldstyleHello;
use flexnbd::protocol::newstyle::{
    opt, BlockSize, NegotiationConfig, ServerNegotiation, BASE_ALLOCATION,
};
use flexnbd::protocol::request::{Command, Dialect, ExportRules, HeaderStyle, Request, Verdict};
use flexnbd::protocol::structured::{Extent, ReplyStyle, ReplyTo};
use flexnbd::protocol::Errno;

type Harness = fn(&[u8]);

fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn edge_cases() -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    for n in [1, 2, 3, 4, 15, 16, 17, 20, 28, 32, 100, 300, 1000] {
        out.push(vec![0; n]);
        out.push(vec![0xff; n]);
    }
    out
}

/// `count` inputs spliced from random bytes, runs of 0x00/0xff and pieces of `seeds`.
fn random_inputs(seed: u64, count: usize, seeds: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut state = seed | 1;
    let mut r = move || next_random(&mut state);
    (0..count)
        .map(|_| {
            let mut input = Vec::new();
            for _ in 0..1 + r() % 6 {
                let n = (r() % 64) as usize;
                match r() % 5 {
                    0 | 1 => input.extend((0..n).map(|_| r() as u8)),
                    2 => input.resize(input.len() + n, 0),
                    3 => input.resize(input.len() + n, 0xff),
                    _ if !seeds.is_empty() => {
                        let s = &seeds[(r() % seeds.len() as u64) as usize];
                        if !s.is_empty() {
                            let start = (r() % s.len() as u64) as usize;
                            let end = start + (r() % (s.len() - start) as u64) as usize + 1;
                            input.extend_from_slice(&s[start..end]);
                        }
                    }
                    _ => {}
                }
            }
            // Most inputs start like a seed, whose first bytes choose a useful setup.
            if r() % 2 == 0 && !seeds.is_empty() {
                let s = &seeds[(r() % seeds.len() as u64) as usize];
                let keep = s.len().min(1 + (r() % 24) as usize);
                input.splice(0..0, s[..keep].iter().copied());
            }
            input
        })
        .collect()
}

/// Writes `seeds` to `$FLEXNBD_FUZZ_SEEDS/<target>/` when that is set.
fn save_seeds(target: &str, seeds: &[Vec<u8>]) {
    let Some(dir) = std::env::var_os("FLEXNBD_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("seed file");
    }
}

/// Runs `harness` on the edge cases, on every seed (whole, truncated at every length, with
/// each byte flipped) and on `random` spliced inputs.
fn smoke(target: &str, harness: Harness, seeds: &[Vec<u8>], random: usize) {
    save_seeds(target, seeds);
    for input in edge_cases() {
        harness(&input);
    }
    for seed in seeds {
        for end in 0..=seed.len() {
            harness(&seed[..end]);
        }
        if seed.len() <= 512 {
            let mut flipped = seed.clone();
            for i in 0..seed.len() {
                for mask in [0xff, 0x01] {
                    flipped[i] ^= mask;
                    harness(&flipped);
                    flipped[i] ^= mask;
                }
            }
        }
    }
    for input in random_inputs(target.len() as u64 * 0x9e37_79b9, random, seeds) {
        harness(&input);
    }
}

// ---- request_framer ----

fn framer_control(c0: u8, part: u16, chunk: u8, size: u64) -> Vec<u8> {
    let mut c = vec![c0];
    c.extend_from_slice(&part.to_le_bytes());
    c.push(chunk);
    c.extend_from_slice(&[1, 2, 3, 4]);
    c.extend_from_slice(&size.to_le_bytes());
    c
}

fn request(style: HeaderStyle, flags: u16, command: Command, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    Request {
        flags,
        command,
        cookie: 0x0102_0304_0506_0708,
        offset,
        length,
    }
    .encode(style, &mut out)
    .expect("encodable");
    out
}

fn framer_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (c0, style) in [(0, HeaderStyle::Compact), (1, HeaderStyle::Extended)] {
        let mut s = framer_control(c0, 16, 7, 1 << 20);
        s.extend(request(style, 0, Command::Write, 4096, 40));
        s.extend([0xab; 40]);
        s.extend(request(style, cflags::FUA, Command::Read, 0, 512));
        s.extend(request(style, 0, Command::Flush, 0, 0));
        // Out of range: rejected, its payload discarded.
        s.extend(request(style, 0, Command::Write, 1 << 20, 8));
        s.extend([0xcd; 8]);
        s.extend(request(style, 0, Command::Unknown(IDENTIFY), 0, 0));
        s.extend(request(
            style,
            cflags::PAYLOAD_LEN,
            Command::BlockStatus,
            0,
            4,
        ));
        s.extend([1, 2, 3, 4]);
        s.extend(request(style, 0, Command::Unknown(99), 0, 0));
        s.extend(request(style, 0, Command::Disconnect, 0, 0));
        seeds.push(s);
    }
    // Large parts, large chunks, a bad magic after a request.
    let mut s = framer_control(0b110, 0, 3, u64::MAX);
    s.extend(request(HeaderStyle::Compact, 0, Command::Write, 0, 100));
    s.extend([7; 100]);
    s.extend([0x25, 0x60, 0x95, 0x14]);
    s.extend([0; 24]);
    seeds.push(s);
    seeds
}

#[test]
fn request_framer() {
    smoke(
        "request_framer",
        fuzzing::request_framer,
        &framer_seeds(),
        3000,
    );
}

/// Regression: found by the `request_framer` target (from the seeded corpus, within two
/// minutes) when IDENTIFY was added: an out-of-range IDENTIFY got EINVAL. The old-style
/// dialect is documented (and C flexnbd behaves) as "range check first, for every type":
/// an out-of-range request of any type gets ENOSPC.
#[test]
fn identify_out_of_range_gets_enospc_first() {
    let rules = ExportRules {
        size: 0,
        dialect: Dialect::Oldstyle,
        read_only: false,
        migration_target: false,
    };
    let req = Request {
        flags: 0,
        command: Command::Unknown(IDENTIFY),
        cookie: 0,
        offset: 0,
        length: 1,
    };
    assert_eq!(rules.check(&req), Verdict::Reject(Errno::ENOSPC));
    // The same request as a minimised `request_framer` input (16 setup bytes: compact
    // headers, export size 0; then the header). Before the fix the harness panicked with
    // "assertion `left == right` failed: left: Errno(22) right: Errno(28)".
    let input = hex(concat!(
        "00000000000000000000000000000000",
        "25609513",
        "0000",
        "4649",
        "0000000000000000",
        "0000000000000000",
        "00000001"
    ));
    fuzzing::request_framer(&input);
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---- newstyle_server ----

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

fn negotiation_seeds() -> Vec<Vec<u8>> {
    let raw = |c: u8, b: u8, flags: u32, options: &[Vec<u8>], trailer: &[u8]| {
        let mut s = vec![c, b, 0x12, 0x34];
        s.extend_from_slice(&flags.to_be_bytes());
        for o in options {
            s.extend_from_slice(o);
        }
        s.extend_from_slice(trailer);
        s
    };
    vec![
        raw(
            0b0000_1000,
            0b0000_1001,
            3,
            &[
                option(opt::STRUCTURED_REPLY, &[]),
                option(
                    opt::SET_META_CONTEXT,
                    &meta_payload("disk", &[BASE_ALLOCATION]),
                ),
                option(opt::LIST, &[]),
                option(opt::INFO, &info_payload("disk", &[1, 2, 3])),
                option(opt::GO, &info_payload("", &[3])),
            ],
            b"first request",
        ),
        raw(0b0010_0001, 0x08, 0, &[option(opt::EXPORT_NAME, b"")], b"x"),
        raw(
            0b0000_0110,
            0x0c,
            1,
            &[
                option(opt::EXTENDED_HEADERS, &[]),
                option(
                    opt::LIST_META_CONTEXT,
                    &meta_payload("disk", &["base:", "qemu:x"]),
                ),
                option(opt::EXPORT_NAME, b"disk"),
            ],
            b"",
        ),
        raw(
            0b0001_0000,
            0xff,
            3,
            &[option(opt::STARTTLS, &[]), option(opt::ABORT, &[])],
            b"",
        ),
        // Grammar mode: flags, SR, SET_META, INFO, oversized, GO.
        vec![
            0x80, 0x10, 0, 7, 0x00, 1, 6, 1, 1, 0, 3, 1, 2, 1, 2, 10, 3, 9, 4, 2, 1, 3,
        ],
        // Grammar mode, read-only and shutting down, with garbage and flips.
        vec![
            0x85, 0x22, 9, 9, 0x40, 0, 11, 5, 1, 2, 3, 4, 5, 13, 0, 3, 0xaa, 7, 1, 8, 0,
        ],
    ]
}

#[test]
fn newstyle_server() {
    smoke(
        "newstyle_server",
        fuzzing::newstyle_server,
        &negotiation_seeds(),
        3000,
    );
}

// ---- client_handshake ----

fn handshake_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let hello = OldstyleHello {
        size: 1 << 30,
        flags: 13,
    }
    .encode();
    seeds.push([&[0u8][..], &hello[..]].concat());
    seeds.push([&[1u8][..], &hello[16..]].concat());

    // A new-style server's greeting and its answer to our GO.
    let mut server = ServerNegotiation::new(NegotiationConfig {
        export_name: String::new(),
        description: Some("d".into()),
        size: 1 << 20,
        read_only: false,
        block_size: BlockSize::DEFAULT,
        can_multi_conn: true,
        shutting_down: false,
    });
    let greeting = server.greeting();
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    let go = flexnbd::protocol::client::go_request(flags, "").expect("fixed new-style");
    let mut input = BytesMut::from(&go[..]);
    let mut out = Vec::new();
    server.feed(&mut input, &mut out).expect("negotiated");
    seeds.push([&[0b0000_1000u8][..], &greeting[..], &out[..]].concat());
    // The same with the greeting and the reply magics left to the harness.
    let mut auto = vec![0b0011_0110u8, greeting[16], greeting[17]];
    let mut pos = 0;
    while pos < out.len() {
        let len = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap()) as usize;
        auto.extend_from_slice(&out[pos + 8..pos + 20 + len]);
        pos += 20 + len;
    }
    seeds.push(auto);
    seeds.push(vec![0b0101_1010, 0, 1]);
    seeds
}

#[test]
fn client_handshake() {
    smoke(
        "client_handshake",
        fuzzing::client_handshake,
        &handshake_seeds(),
        3000,
    );
}

// ---- structured_replies ----

fn replies_seeds() -> Vec<Vec<u8>> {
    let to = ReplyTo {
        cookie: 0x1122_3344_5566_7788,
        offset: 4096,
    };
    let extents = [
        Extent {
            length: 4096,
            flags: 3,
        },
        Extent {
            length: 1 << 33,
            flags: 0,
        },
    ];
    let mut seeds = Vec::new();
    for style in [
        ReplyStyle::Simple,
        ReplyStyle::Structured,
        ReplyStyle::Extended,
    ] {
        let mut s = Vec::new();
        style.ok(to, &mut s);
        style.error(to, Errno::ENOSPC, "no space", &mut s);
        let _ = style.error_at(to, Errno::EIO, "bad sector", 8192, false, &mut s);
        if style != ReplyStyle::Simple {
            style.read_data_header(to, 5, &mut s).expect("small");
            s.extend_from_slice(b"hello");
        }
        let _ = style.hole_chunk(to, 0, 512, false, &mut s);
        let _ = style.block_status(to, 1, &extents, false, true, &mut s);
        seeds.push(s);
    }
    // An extended header whose length field lies.
    let mut s = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&[0, 1, 0, 1]);
    s.extend_from_slice(&[0; 16]);
    s.extend_from_slice(&u64::MAX.to_be_bytes());
    seeds.push(s);
    seeds
}

#[test]
fn structured_replies() {
    smoke(
        "structured_replies",
        fuzzing::structured_replies,
        &replies_seeds(),
        3000,
    );
}

// ---- control_request ----

fn control_seeds() -> Vec<Vec<u8>> {
    let with = |c: u8, s: u8, text: &str| {
        let mut v = vec![c, s];
        v.extend_from_slice(text.as_bytes());
        v
    };
    let mut long = "a".repeat(300);
    long.push_str("\n\n");
    vec![
        with(0, 3, "status\n\n"),
        with(0, 0x85, "mirror\n127.0.0.1\n4777\nunlink\n::1\n1000\n\n"),
        with(1, 2, "[::1]\n80\nnothing\n0\n-1\nextra\n\n"),
        with(2, 1, "10.0.0.0/8\n::1/64\n1.2.3.4/33\n\n"),
        with(3, 0, " +18446744073709551615\n\n"),
        with(3, 7, "18446744073709551616\n\n"),
        with(4, 0, "force-source\n\n"),
        with(0, 9, &long),
        with(0, 0, "acl\n\u{fffd}\u{a0}1.2.3.4\n\n"),
    ]
}

#[test]
fn control_request() {
    smoke(
        "control_request",
        fuzzing::control_request,
        &control_seeds(),
        3000,
    );
    // Past the request size limit (the harness asserts completion there): one endless
    // line, long lines of invalid UTF-8, a quarter of a million short lines, and an
    // empty line just before the limit.
    let limit = flexnbd::protocol::control::MAX_REQUEST;
    for (prefix, filler) in [
        (&[0u8, 0x90][..], &b"x"[..]),
        (&[2, 0x01], &b"\xff\xfe\x80"[..]),
        (&[0, 0x90], &b"acl\n"[..]),
        (&[5, 0x85], &b"0123456789abcde\n"[..]),
    ] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&filler.repeat(limit / filler.len() + 2));
        fuzzing::control_request(&input);
    }
    let mut input = vec![0, 0x03];
    input.extend_from_slice(&b"status\n".repeat(limit / 7 - 1));
    input.extend_from_slice(b"\n\nmore");
    fuzzing::control_request(&input);
}

// ---- handoff_messages ----

fn handoff_seeds() -> Vec<Vec<u8>> {
    let id = MigrationId([7; 16]);
    let mut seeds: Vec<Vec<u8>> = vec![
        HandoffRequest::Prepare { id, size: 1 << 20 }.encode(),
        HandoffRequest::Commit { id }.encode(),
        HandoffRequest::Join {
            id,
            attempt: u64::MAX,
            purpose: JoinPurpose::Commit,
        }
        .encode(),
        HandoffReply::Refused {
            reason: "this connection does not carry the migration's current attempt".into(),
        }
        .encode(),
        encode_answer(&HandoffReply::Joined { id, attempt: 3 }),
        encode_answer(&HandoffReply::NotPrepared { id }),
    ];
    let identity = Identity {
        server: [1; 16],
        boot: [2; 16],
        dev: 2049,
        ino: 1 << 40,
    };
    seeds.push(identity.encode());
    seeds.push(encode_identity(&identity));
    // Schedules for the state machines: the common path over and over, with and without
    // --unlink, with failing unlinks, with breaks and restarts.
    let happy: Vec<u8> = [0u8, 0].into_iter().chain([5, 0].repeat(12)).collect();
    seeds.push(happy);
    let unlink: Vec<u8> = [1u8, 0].into_iter().chain([5, 0].repeat(12)).collect();
    seeds.push(unlink);
    seeds.push(
        [1u8, 0xff]
            .into_iter()
            .chain([5, 0, 6, 0, 5, 0, 5, 0, 4, 1, 5, 0, 4, 0].repeat(3))
            .collect(),
    );
    seeds
}

#[test]
fn handoff_messages() {
    smoke(
        "handoff_messages",
        fuzzing::handoff_messages,
        &handoff_seeds(),
        3000,
    );
}
