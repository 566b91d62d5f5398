//! Live migration end to end (flexnbd §3.3, §3.7-3.9, §5.6, §6.3, §6.4, §7, §10): real
//! `flexnbd serve` sources migrating into real `flexnbd listen` destinations, into nbdkit
//! and qemu-nbd (new-style servers), and into a fake C flexnbd written here; every test
//! checks the bytes that arrived, the exit statuses and what `status` said on the way.
//!
//! How the tests are shaped:
//! - A migration of a few MiB between two local servers is over in a fraction of a second.
//!   Tests that must act *during* one (a writer, `break`, a signal, a killed destination)
//!   start it with a bandwidth limit through the raw `mirror` control command, so it lasts
//!   seconds, and act once `status` reports the phase they want, never after a fixed sleep.
//! - The destination's file is compared with the source's byte for byte; where holes must
//!   be zeroed by the migration, the destination starts with garbage in them.
//! - What the mirror sent is read from the source's log line `All data acknowledged: N
//!   bytes sent as data, M as zero ranges` (the status keys are polled too, but a fast
//!   migration can end between two polls).
//! - Every process is in a guard (killed and reaped on drop), every socket has timeouts,
//!   every wait has a deadline.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::cluster::*;
use support::*;

// ---------------------------------------------------------------------------------------
// 1. Between two of our servers

#[test]
fn a_dense_image_migrates_between_two_of_our_servers() {
    const SIZE: usize = 256 * MIB;
    let src = Image::with_data(&pattern(1, SIZE));
    let dst = destination(SIZE as u64);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, Some(&dst_sock), 0, &[]);
    let before = status(&dst_sock);
    assert_eq!(get(&before, "has_control"), Some("false"), "{before:?}");
    assert_eq!(
        get(&before, "handoff_phase"),
        Some("receiving"),
        "{before:?}"
    );

    let watch = StatusWatch::start(&src_sock);
    start_mirror(&src_sock, target.port, &[]);
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    let seen = watch.finish();

    assert_same_files(&dst.path, &src.path, "destination after migration");
    let (a_src, a_dst) = (allocated_bytes(&src.path), allocated_bytes(&dst.path));
    assert!(
        (0.95..=1.05).contains(&ratio(a_dst, a_src)),
        "destination allocates {a_dst} bytes, source {a_src}"
    );
    // The acknowledged hand-off, not flexnbd's bare DISC, ended it.
    source.expect_log("The destination has taken control");
    let (data, zeroed) = bytes_acknowledged(&source);
    assert_eq!(data, SIZE as u64, "a dense image goes as data");
    assert_eq!(zeroed, 0);
    // Whatever the watcher caught is consistent: flexnbd's keys and ours, a known phase.
    assert!(!seen.is_empty(), "no status answered during the migration");
    for phase in values_of(&seen, "migration_phase") {
        assert!(
            [
                "connecting",
                "sweep",
                "copying",
                "final_pass",
                "handing_off",
                "in_doubt",
                "completed"
            ]
            .contains(&phase.as_str()),
            "unexpected phase {phase} in {seen:?}"
        );
    }
    for s in seen
        .iter()
        .filter(|s| get(s, "is_mirroring") == Some("true"))
    {
        // No estimate until a rate is known (a number of bytes posing as seconds before).
        assert_eq!(
            get(s, "migration_seconds_left").is_some(),
            num(s, "migration_speed") > 0,
            "{s:?}"
        );
        for key in [
            "migration_speed",
            "migration_duration",
            "migration_bytes_left",
            "migration_bytes_sent",
            "migration_bytes_zeroed",
            "migration_passes",
            "migration_attempt",
        ] {
            num(s, key);
        }
        assert!(num(s, "migration_bytes_sent") <= SIZE as u64, "{s:?}");
        assert_eq!(get(s, "migration_speed_limit"), None, "no limit: {s:?}");
    }
}

#[test]
fn a_sparse_image_migrates_as_data_and_zero_ranges() {
    const SIZE: u64 = 1 << 30;
    // Ten regions of about 10 MiB, one per 100 MiB, at offsets and lengths that are not
    // multiples of 1 MiB: 10% of the export holds data.
    let regions: Vec<(u64, usize)> = (0..10u64)
        .map(|i| {
            (
                i * 100 * MIB as u64 + i * 36 * KIB as u64,
                10 * MIB + i as usize * 4 * KIB,
            )
        })
        .collect();
    let data_len: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let src = sparse_image(SIZE, &regions, 100);
    let dst = destination(SIZE);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, Some(&dst_sock), 0, &[]);

    let watch = StatusWatch::start(&src_sock);
    start_mirror(&src_sock, target.port, &[]);
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    let seen = watch.finish();

    assert_same_files(&dst.path, &src.path, "destination after migration");
    let (a_src, a_dst) = (allocated_bytes(&src.path), allocated_bytes(&dst.path));
    assert!(
        (0.95..=1.05).contains(&ratio(a_dst, a_src)),
        "destination allocates {a_dst} bytes, source {a_src}: holes must stay holes"
    );
    // Holes never cross the wire as data.
    let (data, zeroed) = bytes_acknowledged(&source);
    eprintln!(
        "sparse: {data} bytes as data, {zeroed} as zero ranges; allocated {a_src} at the source, {a_dst} at the destination"
    );
    assert!(
        data >= data_len && data as f64 <= 1.05 * a_src as f64,
        "{data} bytes sent as data for {data_len} bytes of data ({a_src} allocated)"
    );
    assert_eq!(
        data + zeroed,
        SIZE,
        "data and zero ranges cover the export once"
    );
    let most_sent = seen
        .iter()
        .filter(|s| get(s, "is_mirroring") == Some("true"))
        .map(|s| num(s, "migration_bytes_sent"))
        .max()
        .unwrap_or(0);
    assert!(
        most_sent as f64 <= 1.05 * a_src as f64,
        "status reported {most_sent} bytes sent ({a_src} allocated)"
    );
}

// ---------------------------------------------------------------------------------------
// 2. A writer during the migration

/// The 4 KiB written by the writer's request number `seq`.
fn writer_block(seq: u64) -> Vec<u8> {
    let mut block = vec![0u8; 4096];
    for (i, word) in block.chunks_mut(8).enumerate() {
        let value = (seq << 32) ^ (i as u64) ^ 0xa5a5_0000_0000_0000;
        word.copy_from_slice(&value.to_le_bytes());
    }
    block
}

struct WriterReport {
    /// (offset, seq) of every write the source acknowledged with error 0.
    acked: Vec<(u64, u64)>,
    /// How many of them were acknowledged after `mirror` had answered.
    acked_while_migrating: usize,
    /// The connection ended (the final pass closed it), rather than the writer giving up.
    closed: bool,
    /// Anything wrong: a non-zero error, a wrong handle or magic.
    problems: Vec<String>,
}

/// A raw client writing distinct 4 KiB blocks to distinct offsets (a stride through the
/// export), one request at a time, until the server closes the connection.
fn start_writer(
    addr: SocketAddr,
    size: u64,
    migrating: Arc<AtomicBool>,
) -> JoinHandle<WriterReport> {
    let mut client = RawClient::connect(addr);
    thread::spawn(move || {
        let blocks = size / 4096;
        let mut report = WriterReport {
            acked: Vec::new(),
            acked_while_migrating: 0,
            closed: false,
            problems: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        for seq in 0..blocks {
            if Instant::now() >= deadline {
                break;
            }
            // 7919 is prime, so the offsets are distinct while seq < blocks (a power of 2).
            let offset = (seq * 7919 % blocks) * 4096;
            let mut request = request_header(0, CMD_WRITE, seq, offset, 4096).to_vec();
            request.extend_from_slice(&writer_block(seq));
            let during = migrating.load(Ordering::Relaxed);
            if client.stream.write_all(&request).is_err() {
                report.closed = true;
                break;
            }
            let mut reply = [0u8; REPLY_LEN];
            match client.stream.read_exact(&mut reply) {
                Ok(()) => {}
                Err(e)
                    if e.kind() == ErrorKind::UnexpectedEof
                        || e.kind() == ErrorKind::ConnectionReset =>
                {
                    report.closed = true;
                    break;
                }
                Err(e) => {
                    report.problems.push(format!("reading reply {seq}: {e}"));
                    break;
                }
            }
            let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
            let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
            let handle = u64::from_be_bytes(reply[8..16].try_into().unwrap());
            if magic != REPLY_MAGIC || handle != seq || error != 0 {
                report.problems.push(format!(
                    "reply to write {seq}: magic {magic:#x} error {error} handle {handle}"
                ));
                break;
            }
            report.acked.push((offset, seq));
            if during {
                report.acked_while_migrating += 1;
            }
            thread::sleep(Duration::from_millis(1));
        }
        report
    })
}

#[test]
fn every_write_acknowledged_during_a_migration_reaches_the_destination() {
    const SIZE: usize = 64 * MIB;
    let src = Image::with_data(&pattern(2, SIZE));
    let dst = destination(SIZE as u64);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, Some(&dst_sock), 0, &[]);

    let migrating = Arc::new(AtomicBool::new(false));
    let writer = start_writer(source.sockaddr(), SIZE as u64, migrating.clone());
    // Some writes before the migration, then a copy limited to 8 MiB/s (several seconds)
    // while the writer goes on.
    wait_until("the writer starts", Duration::from_secs(10), || {
        num(&status(&src_sock), "num_clients") == 1
    });
    thread::sleep(Duration::from_millis(100));
    start_limited_mirror(&src_sock, target.port, 8 * MIB as u64);
    migrating.store(true, Ordering::Relaxed);
    let limited = status(&src_sock);
    assert_eq!(
        get(&limited, "migration_speed_limit"),
        Some((8 * MIB).to_string().as_str()),
        "{limited:?}"
    );
    let watch = StatusWatch::start(&src_sock);

    let report = writer.join().expect("the writer panicked");
    eprintln!(
        "writer: {} writes acknowledged, {} during the migration; closed: {}",
        report.acked.len(),
        report.acked_while_migrating,
        report.closed
    );
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    let seen = watch.finish();

    assert!(report.problems.is_empty(), "writer: {:?}", report.problems);
    assert!(
        report.closed,
        "the writer stopped before the final pass closed its connection ({} writes)",
        report.acked.len()
    );
    assert!(
        report.acked_while_migrating >= 20,
        "only {} writes overlapped the migration; phases seen: {:?}",
        report.acked_while_migrating,
        values_of(&seen, "migration_phase")
    );
    let image = fs::read(&dst.path).unwrap();
    for &(offset, seq) in &report.acked {
        let at = offset as usize;
        assert_same_bytes(
            &image[at..at + 4096],
            &writer_block(seq),
            &format!("acknowledged write {seq} at {offset} on the destination"),
        );
    }
    // And everything else is the source's final state.
    assert_same_files(&dst.path, &src.path, "destination after migration");
}

// ---------------------------------------------------------------------------------------
// 3-5. Failures, break and signals in the middle of a copy

/// A 64 MiB dense source and a fresh destination, with control sockets, migrating at
/// `max_bps`; returns once the source reports the sweep with data acknowledged.
struct Copying {
    src: Image,
    dst: Image,
    src_sock: PathBuf,
    dst_sock: PathBuf,
    source: Server,
    target: Server,
}

fn copying_at(max_bps: u64, seed: u64) -> Copying {
    const SIZE: usize = 64 * MIB;
    let src = Image::with_data(&pattern(seed, SIZE));
    let dst = destination(SIZE as u64);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let source = start_source(&src.path, &src_sock);
    let target = start_listen(&dst.path, Some(&dst_sock), 0, &[]);
    start_limited_mirror(&src_sock, target.port, max_bps);
    wait_status(
        &src_sock,
        "the sweep has data acknowledged",
        STATE_TIMEOUT,
        |s| get(s, "migration_phase") == Some("sweep") && num(s, "migration_bytes_sent") > 0,
    );
    Copying {
        src,
        dst,
        src_sock,
        dst_sock,
        source,
        target,
    }
}

#[test]
fn a_destination_killed_mid_copy_and_restarted_receives_everything() {
    let mut c = copying_at(4 * MIB as u64, 3);
    let port = c.target.port;
    let first = status(&c.src_sock);
    assert_eq!(num(&first, "migration_attempt"), 1, "{first:?}");

    // SIGKILL: no DISC, no hand-off; the source must notice and retry.
    c.target.signal("KILL");
    c.target.wait_exit(Duration::from_secs(10));
    // A killed server leaves its control socket behind; removing it is the supervisor's job.
    fs::remove_file(&c.dst_sock).expect("the killed destination's control socket");
    let retrying = wait_status(&c.src_sock, "the source retries", STATE_TIMEOUT, |s| {
        get(s, "migration_phase") == Some("retrying")
    });
    assert_eq!(get(&retrying, "is_mirroring"), Some("true"), "{retrying:?}");
    assert_eq!(
        get(&retrying, "clients_allowed"),
        Some("true"),
        "{retrying:?}"
    );

    // Back on the same port (the source keeps connecting there), then no more limit.
    let watch = StatusWatch::start(&c.src_sock);
    let mut target = start_listen(&c.dst.path, Some(&c.dst_sock), port, &[]);
    let out = flexnbd(
        &[
            "mirror-speed",
            "--sock",
            c.src_sock.to_str().unwrap(),
            "--max-speed",
            &(1u64 << 40).to_string(),
        ],
        None,
    );
    assert_eq!(out.code(), Some(0), "mirror-speed: {out:?}");
    assert_eq!(out.stdout_str(), "updated\n");
    assert_exit(&mut c.source, 0, "the source");
    assert_exit(&mut target, 0, "the restarted destination");
    let seen = watch.finish();

    let attempts: Vec<u64> = seen
        .iter()
        .filter_map(|s| get(s, "migration_attempt").and_then(|a| a.parse().ok()))
        .collect();
    assert!(
        attempts.iter().any(|&a| a >= 2),
        "migration_attempt never grew: {attempts:?}"
    );
    assert_same_files(
        &c.dst.path,
        &c.src.path,
        "destination after the retried migration",
    );
}

#[test]
fn break_mid_copy_stops_the_migration_and_the_source_serves_again() {
    let mut c = copying_at(2 * MIB as u64, 4);
    // One migration at a time: a second `mirror` is refused and the first goes on.
    let second = control(
        &c.src_sock,
        "mirror",
        &[LOCALHOST, &c.target.port.to_string()],
    );
    assert_eq!(second, "1: mirror already running\n");

    let out = flexnbd(&["break", "--sock", c.src_sock.to_str().unwrap()], None);
    assert_eq!(out.code(), Some(0), "break: {out:?}");
    assert_eq!(out.stdout_str(), "mirror stopped\n");
    let after = status(&c.src_sock);
    assert_eq!(get(&after, "is_mirroring"), Some("false"), "{after:?}");
    assert_eq!(get(&after, "clients_allowed"), Some("true"), "{after:?}");
    assert_eq!(get(&after, "migration_phase"), None, "{after:?}");

    // A new client is admitted and served; its write must follow a later migration.
    let mut client = c.source.connect();
    let written = pattern(44, 64 * KIB);
    client.write_at(8 * MIB as u64, &written);
    assert_eq!(client.read_at(8 * MIB as u64, written.len()), written);

    // The destination saw a connection close without DISC: it keeps waiting.
    assert!(c.target.is_running(), "the destination exited after break");
    let dst = wait_status(
        &c.dst_sock,
        "the destination drops the source",
        STATE_TIMEOUT,
        |s| get(s, "num_clients") == Some("0"),
    );
    assert_eq!(get(&dst, "has_control"), Some("false"), "{dst:?}");
    assert_eq!(get(&dst, "handoff_phase"), Some("receiving"), "{dst:?}");
    thread::sleep(Duration::from_millis(300));
    assert!(c.target.is_running(), "the destination exited after break");

    // A second `break` has nothing to stop; a new `mirror` runs to completion, and the
    // final pass closes the idle client.
    let again = flexnbd(&["break", "--sock", c.src_sock.to_str().unwrap()], None);
    assert_eq!(again.code(), Some(1), "{again:?}");
    assert_eq!(again.stderr, "not mirroring\n");
    start_mirror(&c.src_sock, c.target.port, &[]);
    assert_exit(&mut c.source, 0, "the source");
    assert_exit(&mut c.target, 0, "the destination");
    client.expect_eof();
    assert_same_files(
        &c.dst.path,
        &c.src.path,
        "destination after the second migration",
    );
    let image = fs::read(&c.dst.path).unwrap();
    let at = 8 * MIB;
    assert_same_bytes(
        &image[at..at + written.len()],
        &written,
        "the write made after break",
    );
}

#[test]
fn sigterm_mid_copy_abandons_the_migration_and_the_source_exits_1() {
    let mut c = copying_at(2 * MIB as u64, 5);
    c.source.signal("TERM");
    assert_exit(
        &mut c.source,
        1,
        "the source stopped by SIGTERM while migrating",
    );

    // The destination never took control and still listens.
    let dst = wait_status(
        &c.dst_sock,
        "the destination drops the source",
        STATE_TIMEOUT,
        |s| get(s, "num_clients") == Some("0"),
    );
    assert_eq!(get(&dst, "has_control"), Some("false"), "{dst:?}");
    assert_eq!(get(&dst, "handoff_phase"), Some("receiving"), "{dst:?}");
    thread::sleep(Duration::from_millis(300));
    assert!(c.target.is_running(), "the destination exited");
    let probe = connect_eventually(c.target.sockaddr(), Duration::from_secs(5));
    assert_eq!(probe.size, 64 * MIB as u64);
    probe.close();
    // A signal before completion: listen exits 1.
    c.target.signal("TERM");
    assert_exit(
        &mut c.target,
        1,
        "the destination stopped before completion",
    );
}

// ---------------------------------------------------------------------------------------
// 6. --unlink

#[test]
fn unlink_removes_the_source_file_and_the_destination_holds_the_data() {
    const SIZE: usize = 16 * MIB;
    let data = pattern(6, SIZE);
    let src = Image::with_data(&data);
    let dst = destination(SIZE as u64);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, None, 0, &[]);
    start_mirror(&src_sock, target.port, &["--unlink", "--bind", LOCALHOST]);
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    assert!(
        !src.path.exists(),
        "the source file still exists after --unlink"
    );
    assert_same_bytes(
        &fs::read(&dst.path).unwrap(),
        &data,
        "destination after --unlink",
    );
}

// ---------------------------------------------------------------------------------------
// 7. Rebinding

#[test]
fn the_destination_rebinds_onto_the_source_port_once_the_source_has_exited() {
    const SIZE: usize = 8 * MIB;
    let src = Image::with_data(&pattern(7, SIZE));
    let dst = destination(SIZE as u64);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let mut source = start_source(&src.path, &src_sock);
    let source_port = source.port.to_string();
    let mut target = start_listen(
        &dst.path,
        Some(&dst_sock),
        0,
        &["--rebind-addr", LOCALHOST, "--rebind-port", &source_port],
    );
    let listen_port = target.port;

    let watch = StatusWatch::start(&dst_sock);
    start_mirror(&src_sock, listen_port, &[]);
    assert_exit(&mut source, 0, "the source");
    let serving = wait_status(&dst_sock, "the destination rebinds", STATE_TIMEOUT, |s| {
        get(s, "rebind") == Some("serving")
    });
    let seen = watch.finish();
    eprintln!("rebind states seen: {:?}", values_of(&seen, "rebind"));
    assert_eq!(get(&serving, "has_control"), Some("true"), "{serving:?}");
    for state in values_of(&seen, "rebind") {
        assert!(
            ["binding", "serving"].contains(&state.as_str()) || state.starts_with("waiting:"),
            "unexpected rebind state {state}"
        );
    }
    assert!(target.is_running(), "a rebinding destination does not exit");
    // It serves the migrated bytes where the source was, and no longer listens where
    // the migration came in.
    let mut client = RawClient::connect(SocketAddr::new(LOOPBACK, source.port));
    assert_served_bytes(&mut client, &src.path, "the rebound destination");
    client.write_at(0, &[0x77; 4096]);
    client.close();
    assert_refused(listen_port, "the listen port after rebinding");

    // Now an ordinary server: a signal ends it with status 0.
    target.signal("TERM");
    assert_exit(&mut target, 0, "the rebound destination");
    assert_filled(
        &fs::read(&dst.path).unwrap()[..4096],
        0x77,
        "a write to the rebound server",
    );
}

#[test]
fn a_rebind_port_held_by_another_listener_is_retried_until_it_is_free() {
    const SIZE: usize = 4 * MIB;
    let src = Image::with_data(&pattern(8, SIZE));
    let dst = destination(SIZE as u64);
    let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
    let blocker = TcpListener::bind((LOCALHOST, 0)).expect("binding the blocker");
    let port = blocker.local_addr().unwrap().port();
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(
        &dst.path,
        Some(&dst_sock),
        0,
        &[
            "--rebind-addr",
            LOCALHOST,
            "--rebind-port",
            &port.to_string(),
        ],
    );
    let listen_port = target.port;
    start_mirror(&src_sock, listen_port, &[]);
    assert_exit(&mut source, 0, "the source");

    let waiting = wait_status(&dst_sock, "rebind waits for the port", STATE_TIMEOUT, |s| {
        get(s, "rebind") == Some("waiting:address_in_use")
    });
    assert_eq!(get(&waiting, "has_control"), Some("true"), "{waiting:?}");
    assert!(
        target.is_running(),
        "the destination gave up on a busy port"
    );
    assert_refused(listen_port, "the listen port while rebinding");

    let released = Instant::now();
    drop(blocker);
    wait_status(
        &dst_sock,
        "rebind after the port was released",
        Duration::from_secs(5),
        |s| get(s, "rebind") == Some("serving"),
    );
    let mut client = connect_eventually(SocketAddr::new(LOOPBACK, port), Duration::from_secs(5));
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "serving {:?} after the port was released",
        released.elapsed()
    );
    assert_served_bytes(&mut client, &src.path, "the rebound destination");
    client.close();
    target.signal("TERM");
    assert_exit(&mut target, 0, "the rebound destination");
}

// ---------------------------------------------------------------------------------------
// 8-10. listen on its own

#[test]
fn listen_admits_one_client_at_a_time() {
    let dst = destination(MIB as u64);
    let sock = dst.sibling("dst.sock");
    let mut target = start_listen(&dst.path, Some(&sock), 0, &[]);
    let first = target.connect();
    match RawClient::greet(target.sockaddr()) {
        Greeting::Eof => {}
        other => panic!("a second client must get EOF without a hello, got {other:?}"),
    }
    let s = status(&sock);
    assert_eq!(get(&s, "num_clients"), Some("1"), "{s:?}");
    assert_eq!(get(&s, "has_control"), Some("false"), "{s:?}");
    // Closing without DISC completes nothing; the slot is free again.
    first.close();
    let second = connect_eventually(target.sockaddr(), Duration::from_secs(5));
    second.close();
    thread::sleep(Duration::from_millis(200));
    assert!(target.is_running(), "listen exited without a DISC");
    assert_eq!(get(&status(&sock), "has_control"), Some("false"));
}

#[test]
fn bad_magic_to_listen_gets_ebadmsg_and_completes_nothing() {
    let dst = destination(MIB as u64);
    let sock = dst.sibling("dst.sock");
    let mut target = start_listen(&dst.path, Some(&sock), 0, &[]);
    let mut client = target.connect();
    let mut bad = request_header(0, CMD_WRITE, 0x0bad, 0, 512);
    bad[0..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    client.send(&bad);
    let reply = client.read_reply();
    assert_eq!(reply.error, EBADMSG, "{reply:?}");
    client.expect_eof();

    thread::sleep(Duration::from_millis(300));
    assert!(target.is_running(), "a bad magic ended listen");
    let s = status(&sock);
    assert_eq!(get(&s, "has_control"), Some("false"), "{s:?}");
    assert_eq!(get(&s, "handoff_phase"), Some("receiving"), "{s:?}");
    let next = connect_eventually(target.sockaddr(), Duration::from_secs(5));
    next.close();
    target.signal("TERM");
    assert_exit(&mut target, 1, "listen stopped before completion");
}

#[test]
fn a_legacy_disc_completes_a_listen() {
    let dst = destination(MIB as u64);
    let mut target = start_listen(&dst.path, None, 0, &[]);
    let mut client = target.connect();
    let data = pattern(10, 64 * KIB);
    client.write_at(128 * KIB as u64, &data);
    client.request(0, CMD_DISC, 0xd15c, 0, 0);
    assert_exit(&mut target, 0, "listen after a DISC");
    client.expect_eof();
    let image = fs::read(&dst.path).unwrap();
    assert_same_bytes(&image[128 * KIB..192 * KIB], &data, "the write before DISC");
    assert_filled(&image[..128 * KIB], 0, "untouched bytes");
}

// ---------------------------------------------------------------------------------------
// 11. New-style destinations

/// A sparse 256 MiB source, and a destination file with garbage where the source has
/// holes (so the zero ranges must really zero).
fn newstyle_pair() -> (Image, Image, Vec<(u64, usize)>) {
    const SIZE: u64 = 256 << 20;
    let regions = vec![
        (0, MIB),
        (37 * MIB as u64 + 4096, 3 * MIB),
        (128 * MIB as u64, 4 * MIB + 8192),
        (SIZE - MIB as u64, MIB),
    ];
    let src = sparse_image(SIZE, &regions, 110);
    let dst = destination(SIZE);
    scribble(
        &dst.path,
        &[
            (2 * MIB as u64, 2 * MIB),
            (100 * MIB as u64, MIB),
            (200 * MIB as u64, 8192),
        ],
    );
    (src, dst, regions)
}

/// Starts `cmd` (which must serve on `port` in the foreground) and waits until the port
/// accepts connections.
fn start_foreground(cmd: &mut Command, port: u16, what: &str) -> Option<ChildGuard> {
    let mut child = ChildGuard::new(
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
    );
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect((LOCALHOST, port)).is_ok() {
            // Still running: the port is its own, not another process's.
            thread::sleep(Duration::from_millis(50));
            return child.try_status().is_none().then_some(child);
        }
        if child.try_status().is_some() {
            // Most likely the port was taken meanwhile: the caller tries another.
            return None;
        }
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn migrate_into_newstyle(what: &str, command: impl Fn(u16, &Path) -> Command) {
    let (src, dst, regions) = newstyle_pair();
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let (mut server, port) = (0..5)
        .find_map(|_| {
            let port = free_port();
            start_foreground(&mut command(port, &dst.path), port, what).map(|c| (c, port))
        })
        .unwrap_or_else(|| panic!("{what} could not start"));

    start_mirror(&src_sock, port, &[]);
    assert_exit(&mut source, 0, "the source");
    source.expect_log("does not speak our acknowledged hand-off; holes go as zero-range requests");
    let (data, zeroed) = bytes_acknowledged(&source);
    let data_len: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let allocated = allocated_bytes(&src.path);
    assert!(
        data >= data_len && data as f64 <= 1.05 * allocated as f64,
        "{what}: {data} bytes sent as data for {data_len} bytes of data"
    );
    assert_eq!(
        data + zeroed,
        256 << 20,
        "{what}: the export is covered once"
    );

    // It does not exit on DISC: stop it (SIGTERM, then wait) so its writes are flushed.
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        server.wait_timeout(Duration::from_secs(10)).is_some(),
        "{what} did not stop on SIGTERM"
    );
    assert_same_files(&dst.path, &src.path, &format!("{what} destination"));
}

#[test]
fn a_migration_into_nbdkit() {
    migrate_into_newstyle("nbdkit", |port, file| {
        let mut cmd = tool("nbdkit");
        cmd.args(["-f", "-i", LOCALHOST, "-p", &port.to_string(), "file"])
            .arg(file);
        cmd
    });
}

#[test]
fn a_migration_into_qemu_nbd() {
    migrate_into_newstyle("qemu-nbd", |port, file| {
        let mut cmd = tool("qemu-nbd");
        cmd.args([
            "-f",
            "raw",
            "-b",
            LOCALHOST,
            "-p",
            &port.to_string(),
            "-x",
            "",
            "-t",
            "--shared=4",
        ])
        .arg(file);
        cmd
    });
}

// ---------------------------------------------------------------------------------------
// 12. The legacy hand-off to a C flexnbd

/// What the fake C flexnbd saw.
#[derive(Debug, Default)]
struct FakeReport {
    image: Vec<u8>,
    /// Request types in arrival order (WRITEs collapsed: see `writes`).
    kinds: Vec<u16>,
    writes: u64,
    write_bytes: u64,
    /// Bytes of WRITE payloads that were entirely zero.
    zero_write_bytes: u64,
    write_zeroes: u64,
    disc: bool,
    /// Bytes that arrived after the DISC.
    after_disc: usize,
    error: Option<String>,
}

/// A fake old-style flexnbd 0.5 destination (flexnbd §4): hello with flags 13, WRITE and
/// FLUSH answered 0, DISC closes, every other type (the hand-off probe 0x4650 included)
/// answered EINVAL without consuming a payload. WRITE_ZEROES is recorded: a C flexnbd
/// cannot take it.
fn start_fake_c_flexnbd(size: usize) -> (u16, JoinHandle<FakeReport>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let thread = thread::spawn(move || {
        let mut report = FakeReport {
            image: vec![0xee; size],
            ..FakeReport::default()
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => {
                    report.error = Some(format!("accept: {e}"));
                    return report;
                }
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        if let Err(e) = serve_fake(&mut stream, &mut report) {
            report.error = Some(e.to_string());
        }
        report
    });
    (port, thread)
}

fn serve_fake(stream: &mut TcpStream, report: &mut FakeReport) -> io::Result<()> {
    let size = report.image.len() as u64;
    let mut hello = [0u8; HELLO_LEN];
    hello[..8].copy_from_slice(INIT_PASSWD);
    hello[8..16].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    hello[16..24].copy_from_slice(&size.to_be_bytes());
    hello[24..28].copy_from_slice(&FLAGS.to_be_bytes());
    stream.write_all(&hello)?;
    let reply = |stream: &mut TcpStream, error: u32, handle: &[u8]| -> io::Result<()> {
        let mut r = [0u8; REPLY_LEN];
        r[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&error.to_be_bytes());
        r[8..16].copy_from_slice(handle);
        stream.write_all(&r)
    };
    for _ in 0..1_000_000 {
        let mut h = [0u8; 28];
        stream.read_exact(&mut h)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(io::Error::other(format!("bad request magic {magic:#x}")));
        }
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as u64;
        if report.kinds.last() != Some(&kind) || kind != CMD_WRITE {
            report.kinds.push(kind);
        }
        match kind {
            CMD_WRITE => {
                if offset + len > size {
                    return Err(io::Error::other(format!(
                        "WRITE {len}@{offset} past the end"
                    )));
                }
                let range = &mut report.image[offset as usize..(offset + len) as usize];
                stream.read_exact(range)?;
                report.writes += 1;
                report.write_bytes += len;
                if range.iter().all(|&b| b == 0) {
                    report.zero_write_bytes += len;
                }
                reply(stream, 0, &h[8..16])?;
            }
            CMD_FLUSH => reply(stream, 0, &h[8..16])?,
            CMD_DISC => {
                report.disc = true;
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                report.after_disc = rest.len();
                return Ok(());
            }
            other => {
                if other == CMD_WRITE_ZEROES {
                    report.write_zeroes += 1;
                }
                reply(stream, EINVAL, &h[8..16])?;
            }
        }
    }
    Err(io::Error::other("too many requests"))
}

#[test]
fn a_c_flexnbd_destination_gets_zero_filled_writes_and_a_bare_disc() {
    const SIZE: u64 = 8 << 20;
    let regions = [
        (MIB as u64, MIB),
        (5 * MIB as u64 + 4096, 300 * KIB),
        (SIZE - 4096, 4096),
    ];
    let src = sparse_image(SIZE, &regions, 120);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let (port, fake) = start_fake_c_flexnbd(SIZE as usize);

    start_mirror(&src_sock, port, &[]);
    assert_exit(&mut source, 0, "the source");
    let report = fake.join().expect("the fake destination panicked");
    assert_eq!(report.error, None, "fake destination: {:?}", report.kinds);
    assert_eq!(report.write_zeroes, 0, "WRITE_ZEROES sent to a C flexnbd");
    assert_eq!(
        report.kinds.get(..2),
        Some(&[0x4649, 0x4650][..]),
        "the source asks who the destination is, then probes, before anything else: {:?}",
        report.kinds
    );
    assert!(report.disc, "no DISC: {:?}", report.kinds);
    assert_eq!(report.kinds.last(), Some(&CMD_DISC), "{:?}", report.kinds);
    assert_eq!(report.after_disc, 0, "bytes after the DISC");
    let unknown: BTreeSet<u16> = report
        .kinds
        .iter()
        .copied()
        .filter(|k| ![CMD_WRITE, CMD_FLUSH, CMD_DISC].contains(k))
        .collect();
    assert_eq!(
        unknown,
        BTreeSet::from([0x4649, 0x4650]),
        "only the identify request and the probe are unknown to C"
    );
    // Every byte went as a WRITE, the holes as zero-filled ones (the fake image started
    // as 0xee, so equality proves the holes were written).
    let data_len: u64 = regions.iter().map(|r| r.1 as u64).sum();
    assert!(
        report.write_bytes >= SIZE,
        "{} bytes written",
        report.write_bytes
    );
    assert!(
        report.zero_write_bytes >= SIZE - data_len - 2 * MIB as u64,
        "{} bytes of zero-filled writes",
        report.zero_write_bytes
    );
    assert_same_bytes(
        &report.image,
        &fs::read(&src.path).unwrap(),
        "the fake's image",
    );
    source.expect_log("does not speak our acknowledged hand-off; holes go as zero-filled writes");
}

// ---------------------------------------------------------------------------------------
// 13. mirror's error texts

/// Accepts one connection within `timeout` (a non-blocking accept, polled).
fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return None,
        }
    }
}

/// `flexnbd mirror` to `port` fails with exactly flexnbd's `text` (stderr, exit 1), then
/// one line of ours with the cause, which contains `cause`, within `within`; afterwards
/// nothing is registered (flexnbd §6.4 corrected) and the doors are open.
fn check_mirror_failure(
    sock: &Path,
    port: u16,
    (text, cause): (&str, &str),
    within: Duration,
) -> Duration {
    let out = mirror_cli(sock, port, &[]);
    assert_eq!(out.code(), Some(1), "{text}: {out:?}");
    let rest = out
        .stderr
        .strip_prefix(&format!("{text}\n"))
        .unwrap_or_else(|| panic!("not flexnbd's text first: {out:?}"));
    assert!(
        rest.lines().count() == 1 && rest.contains(cause),
        "the cause should mention {cause:?}: {out:?}"
    );
    assert_eq!(out.stdout_str(), "");
    assert!(out.elapsed < within, "{text} took {:?}", out.elapsed);
    let s = status(sock);
    assert_eq!(
        get(&s, "is_mirroring"),
        Some("false"),
        "after {text}: {s:?}"
    );
    assert_eq!(
        get(&s, "clients_allowed"),
        Some("true"),
        "after {text}: {s:?}"
    );
    let brk = flexnbd(&["break", "--sock", sock.to_str().unwrap()], None);
    assert_eq!(brk.code(), Some(1), "{brk:?}");
    assert_eq!(brk.stderr, "not mirroring\n");
    out.elapsed
}

#[test]
fn mirror_failures_have_flexnbds_texts_and_leave_nothing_registered() {
    let src = Image::with_data(&pattern(13, MIB));
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);

    // Nothing listening.
    let closed = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    check_mirror_failure(
        &sock,
        port,
        ("Mirror failed to connect", "Connection refused"),
        Duration::from_secs(5),
    );

    // Accepts and closes at once.
    let rude = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let rude_port = rude.local_addr().unwrap().port();
    let closer = thread::spawn(move || accept_within(&rude, Duration::from_secs(20)).is_some());
    check_mirror_failure(
        &sock,
        rude_port,
        ("Mirror was rejected", "hello"),
        Duration::from_secs(5),
    );
    assert!(closer.join().unwrap(), "the mirror never connected");

    // Accepts and says nothing: flexnbd's 5 s hello time.
    let mute = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let holder = thread::spawn(move || {
        // Keep the connection open, silent, until the mirror gives up (EOF) or 15 s pass.
        let Some(mut s) = accept_within(&mute, Duration::from_secs(20)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        true
    });
    let took = check_mirror_failure(
        &sock,
        mute_port,
        ("Remote server failed to respond", "5"),
        Duration::from_secs(8),
    );
    assert!(
        took >= Duration::from_secs(4),
        "gave up after {took:?}, before the 5 s hello time"
    );
    assert!(holder.join().unwrap(), "the mirror never connected");

    // The source still serves, and a signal now is an ordinary shutdown.
    let mut client = source.connect();
    assert_eq!(client.read_at(0, 4096), pattern(13, MIB)[..4096]);
    client.close();
    source.signal("TERM");
    assert_exit(&mut source, 0, "the source after failed mirrors");
}

#[test]
fn a_destination_of_another_size_is_refused() {
    let src = Image::with_data(&pattern(14, MIB));
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);
    let other = destination(2 * MIB as u64);
    let mut wrong = start_listen(&other.path, None, 0, &[]);
    check_mirror_failure(
        &sock,
        wrong.port,
        ("Remote size does not match local size", "bytes"),
        Duration::from_secs(5),
    );
    // The destination only saw a client come and go: it keeps waiting.
    thread::sleep(Duration::from_millis(200));
    assert!(
        wrong.is_running(),
        "the destination exited after a rejected source"
    );
    // The source can still migrate elsewhere: a fresh `mirror` to the right size works.
    let right = destination(MIB as u64);
    let mut target = start_listen(&right.path, None, 0, &[]);
    start_mirror(&sock, target.port, &[]);
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination of the right size");
    assert_same_bytes(
        &fs::read(&right.path).unwrap(),
        &pattern(14, MIB),
        "the migrated image",
    );
}
