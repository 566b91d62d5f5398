//! The old-style NBD protocol as the server speaks it, driven by the harness's raw socket
//! client: what no off-the-shelf tool will send (unknown types, bad magic, out-of-range
//! writes with payloads, overflowing offsets, heavy pipelining) and the exact bytes of the
//! hello and the replies (flexnbd-compat.md §4).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

const SIZE: usize = 16 * MIB;

#[test]
fn hello_announces_size_and_flags() {
    // 8 KiB + 511 bytes: the export is rounded down to a multiple of 512.
    let img = Image::with_data(&pattern(1, 8 * KIB + 511));
    let server = Server::start(&img.path, &[]);
    assert_eq!(server.size, 8192, "size in the Serving line");
    let client = server.connect();
    assert_eq!(client.size, 8192, "size in the hello");
    assert_eq!(client.flags, FLAGS, "transmission flags in the hello");
}

#[test]
fn write_read_flush_and_fua_round_trip() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let data = pattern(2, 100 * KIB);
    c.write_at(12_345, &data);
    assert_same_bytes(&c.read_at(12_345, data.len()), &data, "read back");

    // A FUA write is accepted and acknowledged like any other.
    let fua = pattern(3, 4 * KIB);
    c.send(&request_header(
        FLAG_FUA,
        CMD_WRITE,
        77,
        0,
        fua.len() as u32,
    ));
    c.send(&fua);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 77
        }
    );
    c.flush();

    let file = img.contents();
    assert_same_bytes(
        &file[12_345..12_345 + data.len()],
        &data,
        "file after WRITE",
    );
    assert_same_bytes(&file[..fua.len()], &fua, "file after FUA WRITE");
    // The last byte of the export is reachable.
    c.write_at((SIZE - 512) as u64, &[0xee; 512]);
    assert_eq!(c.read_at((SIZE - 1) as u64, 1), vec![0xee]);
}

#[test]
fn zero_length_requests_succeed() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    c.request(0, CMD_WRITE, 1, 4096, 0);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 1
        }
    );
    c.request(0, CMD_READ, 2, SIZE as u64, 0);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 2
        }
    );
    assert_eq!(c.read_at(0, 512), vec![0; 512]);
}

#[test]
fn write_larger_than_a_part_is_streamed_and_acknowledged_once() {
    // The server splits payloads above 8 MiB into parts; the client must still see exactly
    // one reply, after all of the data is in place.
    let img = Image::zeroed(64 * MIB);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let data = pattern(4, 20 * MIB + 4096);
    c.send_write(9, 3 * MIB as u64, &data);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 9
        }
    );
    // Nothing else arrives: the next reply is the one for this READ.
    let back = c.read_at(3 * MIB as u64, data.len());
    assert_same_bytes(&back, &data, "20 MiB read back");
    assert_same_bytes(
        &img.contents()[3 * MIB..3 * MIB + data.len()],
        &data,
        "file after the 20 MiB write",
    );
}

#[test]
fn unknown_types_get_einval_and_the_connection_stays() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    // 0x4648 and 0x4650 are the migration hand-off's types: on a server that is not
    // receiving a migration they are unknown types like any other (no payload consumed).
    for (i, kind) in [CMD_TRIM, 5, CMD_WRITE_ZEROES, 7, 99, 0x4648, 0x4650, 0xffff]
        .into_iter()
        .enumerate()
    {
        let handle = 0x1000 + i as u64;
        c.request(0, kind, handle, 0, 4096);
        assert_eq!(
            c.read_reply(),
            Reply {
                error: EINVAL,
                handle
            },
            "type {kind}"
        );
    }
    // Still usable, and no payload was consumed for the unknown types.
    c.write_at(0, &[0x5a; 512]);
    assert_eq!(c.read_at(0, 512), vec![0x5a; 512]);
}

#[test]
fn range_is_checked_before_the_type() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let cases: [(u16, u64, u32); 6] = [
        (CMD_READ, SIZE as u64, 1),
        (CMD_READ, (SIZE - 512) as u64, 1024),
        (CMD_FLUSH, SIZE as u64, 512),
        (CMD_TRIM, SIZE as u64, 512),
        // offset + length overflows 64 bits: must not wrap around into range.
        (CMD_READ, u64::MAX - 255, 512),
        (99, u64::MAX, u32::MAX),
    ];
    for (i, (kind, offset, len)) in cases.into_iter().enumerate() {
        let handle = 0xABC0 + i as u64;
        c.request(0, kind, handle, offset, len);
        assert_eq!(
            c.read_reply(),
            Reply {
                error: ENOSPC,
                handle
            },
            "type {kind} at {offset}+{len}"
        );
    }
    assert_eq!(c.read_at(0, 16), vec![0; 16]);
}

#[test]
fn out_of_range_write_payload_is_discarded() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    // The payload is all zeroes: if the server took it for the next request header it
    // would see a bad magic and close the connection.
    c.send_write(41, (SIZE - 512) as u64, &vec![0u8; 64 * KIB]);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: ENOSPC,
            handle: 41
        }
    );
    // An overflowing offset with a payload, too.
    c.send_write(42, u64::MAX - 1000, &vec![0u8; 4096]);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: ENOSPC,
            handle: 42
        }
    );
    // The same connection still works, and nothing was written at the end of the file.
    let data = pattern(5, 8 * KIB);
    c.write_at(1024, &data);
    assert_same_bytes(&c.read_at(1024, data.len()), &data, "after ENOSPC");
    let file = img.contents();
    assert_eq!(file.len(), SIZE, "the file must not grow");
}

#[test]
fn bad_magic_gets_ebadmsg_then_eof_while_others_keep_working() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut good = server.connect();
    let mut bad = server.connect();
    good.write_at(0, &[1; 4096]);

    let mut header = request_header(0, CMD_READ, 0xDEAD_BEEF_0000_0001, 0, 512);
    header[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bad.send(&header);
    assert_eq!(
        bad.read_reply(),
        Reply {
            error: EBADMSG,
            handle: 0xDEAD_BEEF_0000_0001
        }
    );
    bad.expect_eof();

    // The other client was not disturbed, and new clients are still served.
    assert_eq!(good.read_at(0, 4096), vec![1; 4096]);
    good.write_at(8192, &[2; 4096]);
    let mut fresh = server.connect();
    assert_eq!(fresh.read_at(8192, 4096), vec![2; 4096]);
}

#[test]
fn pipelined_requests_are_all_answered_by_handle() {
    let initial = pattern(6, SIZE);
    let img = Image::with_data(&initial);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();

    // 50 requests sent before any reply is read: READs of the initial contents in the
    // first half of the export, WRITEs of new data in the second half, a FLUSH.
    let mut expected_reads: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut writes: HashMap<u64, (usize, Vec<u8>)> = HashMap::new();
    let mut batch = Vec::new();
    for i in 0..50u64 {
        let handle = 0xF00D_0000 + i * 7;
        if i == 25 {
            batch.extend_from_slice(&request_header(0, CMD_FLUSH, handle, 0, 0));
        } else if i % 2 == 0 {
            let offset = (i as usize) * 37 * KIB + 3;
            let len = 512 + (i as usize) * 1000;
            batch.extend_from_slice(&request_header(
                0,
                CMD_READ,
                handle,
                offset as u64,
                len as u32,
            ));
            expected_reads.insert(handle, initial[offset..offset + len].to_vec());
        } else {
            let offset = SIZE / 2 + (i as usize) * 64 * KIB;
            let data = pattern(100 + i, 4 * KIB + i as usize * 100);
            batch.extend_from_slice(&request_header(
                0,
                CMD_WRITE,
                handle,
                offset as u64,
                data.len() as u32,
            ));
            batch.extend_from_slice(&data);
            writes.insert(handle, (offset, data));
        }
    }
    // Send from a thread: the server may answer before it has read everything, and a
    // client that only sends could deadlock with a server that only answers.
    let mut sender = c.stream.try_clone().unwrap();
    let send = std::thread::spawn(move || {
        use std::io::Write;
        sender.write_all(&batch)
    });

    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        let reply = c.read_reply();
        assert_eq!(reply.error, 0, "reply {reply:?}");
        assert!(
            seen.insert(reply.handle),
            "handle {:#x} answered twice",
            reply.handle
        );
        if let Some(data) = expected_reads.get(&reply.handle) {
            let got = c.read_bytes(data.len());
            assert_same_bytes(&got, data, "pipelined READ");
        } else {
            assert!(
                writes.contains_key(&reply.handle) || reply.handle == 0xF00D_0000 + 25 * 7,
                "unknown handle {:#x}",
                reply.handle
            );
        }
    }
    send.join().unwrap().expect("sending the batch");
    assert_eq!(seen.len(), 50);

    let file = img.contents();
    for (offset, data) in writes.values() {
        assert_same_bytes(
            &file[*offset..*offset + data.len()],
            data,
            "pipelined WRITE",
        );
    }
}

#[test]
fn disconnect_closes_the_connection_without_a_reply() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    c.write_at(0, &[9; 512]);
    // A WRITE right behind the DISC, in the same segment: it must not be executed.
    let mut bytes = request_header(0, CMD_DISC, 0x0D15C, 0, 0).to_vec();
    bytes.extend_from_slice(&request_header(0, CMD_WRITE, 0x0D15D, 0, 512));
    bytes.extend_from_slice(&[0xff; 512]);
    c.send(&bytes);
    c.expect_eof();
    let mut other = server.connect();
    assert_eq!(other.read_at(0, 512), vec![9; 512]);
    server.expect_log("disconnect");
}

#[test]
fn eof_in_the_middle_of_a_payload_only_ends_that_connection() {
    let img = Image::zeroed(SIZE);
    let mut server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    c.send(&request_header(0, CMD_WRITE, 1, 0, 64 * KIB as u32));
    c.send(&[0x77; 1000]);
    c.close();
    std::thread::sleep(Duration::from_millis(200));
    assert!(server.is_running(), "the server died:\n{}", server.stderr());
    let mut other = server.connect();
    other.write_at(128 * KIB as u64, &[3; 512]);
    assert_eq!(other.read_at(128 * KIB as u64, 512), vec![3; 512]);
}

#[test]
fn requests_sent_before_a_half_close_are_all_answered() {
    // A client may send its requests and shut down its sending side at once (`nc -N`
    // style); the server must answer what it received before closing.
    let initial = pattern(7, SIZE);
    let img = Image::with_data(&initial);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let mut batch = Vec::new();
    for i in 0..10u64 {
        batch.extend_from_slice(&request_header(0, CMD_READ, i, i * 8192, 4096));
    }
    let data = pattern(8, 4096);
    for i in 10..15u64 {
        batch.extend_from_slice(&request_header(0, CMD_WRITE, i, i * 8192, 4096));
        batch.extend_from_slice(&data);
    }
    c.send(&batch);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..15 {
        let reply = c.read_reply();
        assert_eq!(reply.error, 0, "{reply:?}");
        assert!(reply.handle < 15 && seen.insert(reply.handle), "{reply:?}");
        if reply.handle < 10 {
            let at = reply.handle as usize * 8192;
            assert_same_bytes(&c.read_bytes(4096), &initial[at..at + 4096], "READ");
        }
    }
    c.expect_eof();
    let file = img.contents();
    for i in 10..15 {
        assert_same_bytes(&file[i * 8192..i * 8192 + 4096], &data, "WRITE");
    }
}

#[test]
fn concurrent_clients_on_disjoint_regions() {
    const CLIENTS: usize = 6;
    const REGION: usize = 2 * MIB;
    let img = Image::zeroed(CLIENTS * REGION);
    let server = Server::start(&img.path, &[]);
    let addr = server.sockaddr();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            std::thread::spawn(move || {
                let mut c = RawClient::connect(addr);
                let base = n * REGION;
                let mut model = vec![0u8; REGION];
                for step in 0..40usize {
                    let len = 512 + (step * 7919 + n * 131) % (64 * KIB);
                    let at = (step * 104_729 + n * 4099) % (REGION - len);
                    let data = pattern((n * 1000 + step) as u64, len);
                    c.write_at((base + at) as u64, &data);
                    model[at..at + len].copy_from_slice(&data);
                    let check = (step * 15_485_863) % (REGION - 64 * KIB);
                    let got = c.read_at((base + check) as u64, 64 * KIB);
                    assert_same_bytes(&got, &model[check..check + 64 * KIB], "read back");
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let file = img.contents();
    for (n, model) in models.iter().enumerate() {
        assert_same_bytes(&file[n * REGION..(n + 1) * REGION], model, "region");
    }
}

/// One request of the model-based test.
#[derive(Clone, Debug)]
enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, seed: u64 },
    Flush,
    Other { kind: u16, offset: u64, len: u32 },
}

fn op_strategy(size: u64) -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    // Offsets reach past the end, so some requests are out of range.
    let offset = 0..size + 64 * KIB as u64;
    let len = prop_oneof![0..4096u32, 0..(128 * KIB as u32)];
    prop_oneof![
        4 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Op::Read { offset, len }),
        4 => (offset.clone(), len.clone(), any::<u64>())
            .prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        1 => Just(Op::Flush),
        1 => (4u16..64, offset, len).prop_map(|(kind, offset, len)| Op::Other { kind, offset, len }),
    ]
}

#[test]
fn random_request_sequences_match_a_model() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const EXPORT: usize = 1 << 20;
    let img = Image::with_data(&pattern(9, EXPORT));
    let server = Server::start(&img.path, &[]);
    let addr = server.sockaddr();
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    let ops = proptest::collection::vec(op_strategy(EXPORT as u64), 1..40);
    let result = runner.run(&ops, |ops| {
        let mut c = RawClient::connect(addr);
        // The model starts from whatever earlier cases left in the export.
        let mut model = c.read_at(0, EXPORT);
        for (i, op) in ops.iter().enumerate() {
            let handle = 0xC0DE_0000 + i as u64;
            let in_range = |offset: u64, len: u32| offset + u64::from(len) <= EXPORT as u64;
            match *op {
                Op::Read { offset, len } => {
                    c.request(0, CMD_READ, handle, offset, len);
                    let reply = c.read_reply();
                    prop_assert_eq!(reply.handle, handle);
                    if in_range(offset, len) {
                        prop_assert_eq!(reply.error, 0);
                        let got = c.read_bytes(len as usize);
                        let at = offset as usize;
                        prop_assert!(got == model[at..at + len as usize], "{:?}", op);
                    } else {
                        prop_assert_eq!(reply.error, ENOSPC, "{:?}", op);
                    }
                }
                Op::Write { offset, len, seed } => {
                    let data = pattern(seed, len as usize);
                    c.send_write(handle, offset, &data);
                    let reply = c.read_reply();
                    prop_assert_eq!(reply.handle, handle);
                    if in_range(offset, len) {
                        prop_assert_eq!(reply.error, 0);
                        let at = offset as usize;
                        model[at..at + data.len()].copy_from_slice(&data);
                    } else {
                        prop_assert_eq!(reply.error, ENOSPC, "{:?}", op);
                    }
                }
                Op::Flush => {
                    c.request(0, CMD_FLUSH, handle, 0, 0);
                    prop_assert_eq!(c.read_reply(), Reply { error: 0, handle });
                }
                Op::Other { kind, offset, len } => {
                    c.request(0, kind, handle, offset, len);
                    let expected = if in_range(offset, len) {
                        EINVAL
                    } else {
                        ENOSPC
                    };
                    prop_assert_eq!(
                        c.read_reply(),
                        Reply {
                            error: expected,
                            handle
                        },
                        "{:?}",
                        op
                    );
                }
            }
        }
        let file = std::fs::read(&img.path).unwrap();
        prop_assert!(file == model, "the file differs from the model");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn requests_before_a_bad_magic_are_still_answered() {
    let initial = pattern(10, SIZE);
    let img = Image::with_data(&initial);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let mut batch = Vec::new();
    batch.extend_from_slice(&request_header(0, CMD_READ, 1, 0, 4096));
    batch.extend_from_slice(&request_header(0, CMD_WRITE, 2, 8192, 4096));
    batch.extend_from_slice(&[0x33; 4096]);
    let mut bad = request_header(0, CMD_READ, 3, 0, 512);
    bad[0..4].copy_from_slice(b"JUNK");
    batch.extend_from_slice(&bad);
    // Anything after the bad request is never executed.
    batch.extend_from_slice(&request_header(0, CMD_WRITE, 4, 0, 4096));
    batch.extend_from_slice(&[0x44; 4096]);
    c.send(&batch);
    let mut errors = HashMap::new();
    for _ in 0..3 {
        let reply = c.read_reply();
        if reply.handle == 1 && reply.error == 0 {
            assert_same_bytes(&c.read_bytes(4096), &initial[..4096], "READ");
        }
        errors.insert(reply.handle, reply.error);
    }
    c.expect_eof();
    assert_eq!(errors, HashMap::from([(1, 0), (2, 0), (3, EBADMSG)]));
    let file = img.contents();
    assert_filled(&file[8192..12288], 0x33, "the WRITE before the bad magic");
    assert_same_bytes(
        &file[..4096],
        &initial[..4096],
        "nothing after the bad magic",
    );
}

#[test]
fn offsets_beyond_4_gib_work() {
    // A sparse 6 GiB export: 64-bit offsets all the way (§15.3).
    let img = Image::zeroed(6 << 30);
    let server = Server::start(&img.path, &[]);
    assert_eq!(server.size, 6 << 30);
    let mut c = server.connect();
    assert_eq!(c.size, 6 << 30);
    let across_4g = (4u64 << 30) - 1000;
    let data = pattern(11, 8 * KIB);
    c.write_at(across_4g, &data);
    let last = (6u64 << 30) - 4096;
    c.write_at(last, &data[..4096]);
    assert_same_bytes(&c.read_at(across_4g, data.len()), &data, "across 4 GiB");
    assert_same_bytes(&c.read_at(last, 4096), &data[..4096], "last block");
    c.request(0, CMD_READ, 5, 6 << 30, 1);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: ENOSPC,
            handle: 5
        }
    );

    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(&img.path).unwrap();
    let mut buf = vec![0u8; data.len()];
    file.read_exact_at(&mut buf, across_4g).unwrap();
    assert_same_bytes(&buf, &data, "file across 4 GiB");
}

#[test]
fn a_256_mib_write_is_streamed_not_buffered() {
    // No request length limit beyond the export (§4.4), and the payload must be streamed
    // to the file: the server's peak RSS stays far below the request size.
    const LEN: usize = 256 * MIB;
    let img = Image::zeroed(LEN + MIB);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let base = pattern(12, 4 * MIB);
    // Every 4 MiB chunk is stamped with its index, so a chunk stored at the wrong place
    // is caught by the spot checks.
    let chunk = |k: usize| {
        let mut c = base.clone();
        c[..8].copy_from_slice(&(k as u64 ^ 0xC4C4_0000).to_be_bytes());
        c
    };
    let chunks = LEN / base.len();
    c.send(&request_header(0, CMD_WRITE, 0x256, 512, LEN as u32));
    for k in 0..chunks {
        c.send(&chunk(k));
    }
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 0x256
        }
    );
    let hwm = server.peak_rss_kib();
    assert!(hwm < 200 * 1024, "peak RSS {hwm} KiB for a 256 MiB write");
    for k in [0, 1, chunks / 2, chunks - 1] {
        let at = 512 + (k * base.len()) as u64;
        assert_same_bytes(&c.read_at(at, base.len()), &chunk(k), "chunk read back");
    }
}
