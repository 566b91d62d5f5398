mod support;

// Link faults, stale attempts and a full destination during a migration, end to end: a
// `flexnbd serve` source mirrors through a fault-injecting relay (tests/support/relay.rs)
// to a `flexnbd listen` destination (or a fake C flexnbd), while a writer
// (tests/support/promise.rs) keeps writing to the source. Every test ends by checking the
// promise: at most one side accepts writes, it is the side whose `status` says
// `has_control=true`, and the side holding the data has every acknowledged write.
//
// Each test prints what it measured as `FAULT-TIMING <test>: <what> <ms> ms`.

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::cluster::*;
use support::promise::{
    accepts_write, check_holds_all, Probe, Refusal, SeqWriter, WriterLog, WriterOptions, BLOCK,
};
use support::relay::{Dir, Fault, Msg, Relay};
use support::*;

/// Every export here.
const SIZE: u64 = 32 * MIB as u64;
/// The writer writes below this. It stays in the first two of the sweep's eight 4 MiB
/// WRITEs, which the destination has long applied when the passes rewrite the blocks the
/// writer dirtied: rewriting a block while the sweep WRITE that covers it is still being
/// applied loses it (see `overlapping_writes_of_a_migration_are_applied_in_order`, a
/// product bug), and these tests are about link faults.
const WRITER_SPAN: u64 = 8 * MIB as u64;
/// Pause between two writes of the writer: its 2048 offsets last about 20 s.
const WRITER_PAUSE: Duration = Duration::from_millis(8);
/// The probes of [`Probes`] go to the last MiB.
const PROBE_BASE: u64 = SIZE - MIB as u64;
/// The source's bulk-copy inactivity limit (`FLEXNBD_MS_REQUEST_LIMIT_SECS`), set only
/// where a test waits for it: elsewhere a slow moment of a loaded machine must not fail
/// an attempt the test did not break.
const LIMIT_ENV: &[(&str, &str)] = &[("FLEXNBD_MS_REQUEST_LIMIT_SECS", "3")];
const NO_ENV: &[(&str, &str)] = &[];
/// A point of the migration stream (source → destination) in the middle of the sweep: the
/// payload of its second 4 MiB WRITE (before the first come only short requests:
/// IDENTIFY, PROBE, Join).
const MID_COPY: u64 = 6 * MIB as u64 + 12_345;
/// Deadline for a step that should happen within seconds.
const SOON: Duration = Duration::from_secs(5);
/// Deadline for a step that waits for a liveness limit (at most 10 s) and a retry.
const LONG: Duration = Duration::from_secs(30);
/// EPERM, the answer to a write from a connection that may not write into a destination.
const EPERM: u32 = 1;

/// The exit status of `server` if it exits within `timeout`.
fn exit_within(server: &mut Server, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = server.try_status() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn timing(test: &str, what: &str, d: Duration) {
    eprintln!("FAULT-TIMING {test}: {what} {} ms", d.as_millis());
}

// ---------------------------------------------------------------------------------------
// Probes and the promise

/// [`accepts_write`] probes at distinct offsets from [`PROBE_BASE`], keeping every
/// acknowledged one.
#[derive(Default)]
struct Probes {
    next: u64,
    acked: Vec<(u64, Vec<u8>)>,
}

impl Probes {
    fn probe(&mut self, addr: SocketAddr) -> Probe {
        let offset = PROBE_BASE + self.next * BLOCK as u64;
        self.next += 1;
        assert!(offset < SIZE, "out of probe offsets");
        let probe = accepts_write(addr, offset);
        if let Some(block) = probe.acked() {
            self.acked.push(block);
        }
        probe
    }

    /// Probes `addr` and asserts it refuses the write.
    fn refused(&mut self, addr: SocketAddr, what: &str) -> Refusal {
        match self.probe(addr) {
            Probe::Refused(why) => why,
            Probe::Accepted { offset, .. } => {
                panic!("{what}: {addr} accepted a write at {offset}")
            }
        }
    }
}

fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Accepted { offset, .. } => format!("accepted at {offset}"),
        Probe::Refused(why) => format!("refused: {why:?}"),
    }
}

/// One side of a migration, for the final check: where it serves NBD, and its control
/// socket if it is still running.
struct Side<'a> {
    name: &'a str,
    addr: SocketAddr,
    sock: Option<&'a Path>,
}

/// The promise at the end of a test: (1) probe every side: at most one accepts, and only a
/// side whose status says `has_control=true`; at most one live side says so; (2) `holder`
/// has every acknowledged write (the writer's, the probes', and `extra`).
fn check_promise(
    test: &str,
    probes: &mut Probes,
    sides: &[Side],
    holder: &Path,
    others: &[&Path],
    log: &WriterLog,
    extra: &[(u64, Vec<u8>)],
) {
    let mut accepted = Vec::new();
    let mut in_control = Vec::new();
    for side in sides {
        let probe = probes.probe(side.addr);
        eprintln!("{test}: probe of the {}: {}", side.name, describe(&probe));
        let has_control = side.sock.map(|sock| {
            let s = status(sock);
            get(&s, "has_control") == Some("true")
        });
        if has_control == Some(true) {
            in_control.push(side.name);
        }
        if probe.is_accepted() {
            accepted.push(side.name);
            assert_eq!(
                has_control,
                Some(true),
                "{test}: the {} accepted a write but its status does not say has_control=true",
                side.name
            );
        }
    }
    assert!(
        accepted.len() <= 1,
        "{test}: two sides accept writes: {accepted:?}"
    );
    assert!(
        in_control.len() <= 1,
        "{test}: two sides say has_control=true: {in_control:?}"
    );
    let mut expected = log.expected();
    expected.extend(probes.acked.iter().cloned());
    expected.extend(extra.iter().cloned());
    if let Err(e) = check_holds_all(holder, &expected) {
        explain_missing(test, holder, others, log, &expected);
        panic!("{test}: {e}");
    }
    eprintln!(
        "{test}: {} holds all {} acknowledged blocks ({} by the writer)",
        holder.display(),
        expected.len(),
        log.acked.len()
    );
}

/// What a 4 KiB block is: a writer's or probe's block (by sequence number), zeros, or
/// other bytes.
fn what_block(block: &[u8]) -> String {
    if let Some(seq) = support::promise::block_seq(block) {
        format!("seq {seq}")
    } else if block.iter().all(|&b| b == 0) {
        "zeros".into()
    } else {
        format!("other bytes {:02x?}", &block[..16])
    }
}

/// After a failed check: for every expected block `holder` lacks, who acknowledged it and
/// when, and what is there instead (and in the other files next to it).
fn explain_missing(
    test: &str,
    holder: &Path,
    others: &[&Path],
    log: &WriterLog,
    expected: &[(u64, Vec<u8>)],
) {
    let file = fs::File::open(holder).unwrap();
    let t0 = log.acked.first().map(|a| a.at);
    for (offset, data) in expected {
        let mut got = vec![0u8; data.len()];
        let _ = file.read_exact_at(&mut got, *offset);
        if &got == data {
            continue;
        }
        let ack = log.acked.iter().find(|a| a.offset == *offset);
        let when = match (ack, t0) {
            (Some(a), Some(t0)) => format!(
                "acked seq {} by {} at +{} ms",
                a.seq,
                a.addr,
                (a.at - t0).as_millis()
            ),
            _ => "a probe or an extra block".into(),
        };
        let last = log.acked.last().map(|a| a.seq).unwrap_or(0);
        let around: Vec<String> = log
            .acked
            .iter()
            .filter(|a| ack.is_some_and(|b| a.seq + 3 >= b.seq && a.seq <= b.seq + 3))
            .map(|a| format!("seq {} by {}", a.seq, a.addr))
            .collect();
        eprintln!(
            "{test}: MISSING at {offset}: {when}; {} has {} (last seq acked {last}); around it: {around:?}",
            holder.display(),
            what_block(&got)
        );
        let errors: Vec<String> = log
            .errors
            .iter()
            .chain(log.unsure.iter())
            .map(|f| format!("seq {} at {} by {}: {:?}", f.seq, f.offset, f.addr, f.why))
            .collect();
        eprintln!("{test}: the writer's failed writes: {errors:?}");
        for other in others {
            if let Ok(f) = fs::File::open(other) {
                let mut b = vec![0u8; data.len()];
                let _ = f.read_exact_at(&mut b, *offset);
                eprintln!("{test}: {} has {} there", other.display(), what_block(&b));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The writer

fn start_writer(addrs: &[SocketAddr], span: u64, pause: Duration) -> SeqWriter {
    let mut opts = WriterOptions::new(addrs, span);
    opts.pause = pause;
    opts.run_for = Duration::from_secs(120);
    let writer = SeqWriter::start_with(opts);
    assert!(
        writer.wait_acked(20, None, SOON),
        "the writer did not get going: {:?}",
        writer.snapshot().attempts
    );
    writer
}

/// Acknowledgements the writer got in `(from, to)`.
fn acks_between(log: &WriterLog, from: Instant, to: Instant) -> usize {
    log.acked
        .iter()
        .filter(|a| a.at > from && a.at < to)
        .count()
}

/// Waits for the writer's first acknowledgement after `t` (by any server); its time.
fn first_ack_after(writer: &SeqWriter, t: Instant, timeout: Duration, what: &str) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(a) = writer.snapshot().acked.iter().find(|a| a.at > t) {
            return a.at;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the writer got no acknowledgement within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// The relay's record

/// When the relay read the `nth` (from 0) `msg`.
fn seen_at(relay: &Relay, msg: Msg, nth: usize) -> Instant {
    relay
        .events()
        .iter()
        .filter(|e| e.2 == msg)
        .nth(nth)
        .map(|e| e.3)
        .unwrap_or_else(|| {
            panic!(
                "the relay did not see {msg:?} #{nth}: {:?}",
                relay.messages()
            )
        })
}

/// When the relay read the first `msg` after the first `mark`.
fn first_after(relay: &Relay, mark: Msg, msg: Msg) -> Instant {
    let events = relay.events();
    let at = events
        .iter()
        .position(|e| e.2 == mark)
        .unwrap_or_else(|| panic!("no {mark:?}: {:?}", relay.messages()));
    events[at..]
        .iter()
        .find(|e| e.2 == msg)
        .map(|e| e.3)
        .unwrap_or_else(|| panic!("no {msg:?} after {mark:?}: {:?}", relay.messages()))
}

/// The relay's record, as `connection:message` runs (`0:Writex4 0:OtherReplyx4 ...`).
fn trace(relay: &Relay) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut last = String::new();
    let mut n = 0;
    for e in relay.events() {
        let k = format!("{}:{:?}", e.0, e.2);
        if k == last {
            n += 1;
        } else {
            if n > 0 {
                out.push(format!("{last}x{n}"));
            }
            last = k;
            n = 1;
        }
    }
    out.push(format!("{last}x{n}"));
    out.join(" ")
}

/// The relay connections that carried `msg`, in order.
fn connections_of(relay: &Relay, msg: Msg) -> Vec<usize> {
    relay
        .events()
        .iter()
        .filter(|e| e.2 == msg)
        .map(|e| e.0)
        .collect()
}

/// Waits until every armed fault has fired; returns (about) when.
fn wait_fired(relay: &Relay, what: &str) -> Instant {
    let deadline = Instant::now() + LONG;
    while relay.armed() > 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: the armed fault never fired; the relay saw {:?}",
            relay.messages()
        );
        thread::sleep(Duration::from_millis(2));
    }
    Instant::now()
}

/// Waits until the relay holds more than `before` bytes in `dir` (a blackhole armed on a
/// message has taken effect: healing before that would leave it in place for good).
fn wait_held(relay: &Relay, dir: Dir, before: u64, what: &str) {
    let deadline = Instant::now() + LONG;
    while relay.held(dir) <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: the relay holds nothing in {dir:?}: {}",
            trace(relay)
        );
        thread::sleep(Duration::from_millis(2));
    }
}

fn wait_count(relay: &Relay, msg: Msg, n: usize, timeout: Duration, what: &str) {
    assert!(
        relay.wait_count(msg, n, timeout),
        "{what}: the relay did not see {msg:?} {n} times within {timeout:?}: {:?}",
        relay.messages()
    );
}

// ---------------------------------------------------------------------------------------
// A source, a relay and a destination

/// A dense source image of [`SIZE`] bytes on tmpfs.
fn source_image(seed: u64) -> Image {
    Image::with_data_in(shm_dir(), &pattern(seed, SIZE as usize))
}

/// An empty (sparse) destination image of [`SIZE`] bytes on tmpfs.
fn empty_image() -> Image {
    Image::zeroed_in(shm_dir(), SIZE as usize)
}

struct Pair {
    test: &'static str,
    relay: Relay,
    source: Server,
    target: Server,
    src_sock: PathBuf,
    dst_sock: PathBuf,
    src: Image,
    dst: Image,
    probes: Probes,
    /// A tmpfs the destination file lives on (unmounted after everything else is gone).
    mount: Option<TmpfsMount>,
}

impl Pair {
    /// A dense source of [`SIZE`] bytes (pattern `seed`) with `env`, an empty destination
    /// `listen LISTEN_EXTRA...`, and the relay in front of it; both files on tmpfs.
    fn start(test: &'static str, seed: u64, listen_extra: &[&str], env: &[(&str, &str)]) -> Pair {
        Pair::with(
            test,
            source_image(seed),
            empty_image(),
            env,
            |file, sock| start_listen(file, Some(sock), 0, listen_extra),
        )
    }

    fn with(
        test: &'static str,
        src: Image,
        dst: Image,
        env: &[(&str, &str)],
        listen: impl FnOnce(&Path, &Path) -> Server,
    ) -> Pair {
        let src_sock = src.sibling("src.sock");
        let dst_sock = dst.sibling("dst.sock");
        let source = start_source_with_env(&src.path, &src_sock, env);
        let target = listen(&dst.path, &dst_sock);
        let relay = Relay::start(target.sockaddr());
        Pair {
            test,
            relay,
            source,
            target,
            src_sock,
            dst_sock,
            src,
            dst,
            probes: Probes::default(),
            mount: None,
        }
    }

    /// `flexnbd mirror` to the relay.
    fn mirror(&self) {
        start_mirror(&self.src_sock, self.relay.port(), &[]);
    }

    fn src_addr(&self) -> SocketAddr {
        self.source.sockaddr()
    }

    fn dst_addr(&self) -> SocketAddr {
        self.target.sockaddr()
    }

    fn src_status(&self) -> Status {
        status(&self.src_sock)
    }

    fn dst_status(&self) -> Status {
        status(&self.dst_sock)
    }

    /// Asserts `key=value` pairs of a status line.
    fn expect(&self, side: &str, s: &Status, pairs: &[(&str, &str)]) {
        for (key, value) in pairs {
            assert_eq!(
                get(s, key),
                Some(*value),
                "{}: {side} status {key}: {s:?}",
                self.test
            );
        }
    }

    /// Asserts that the first attempt has not failed (the test's fault is meant for it);
    /// otherwise shows why it did.
    fn still_first_attempt(&self) {
        let s = self.src_status();
        if get(&s, "migration_attempt") != Some("1") {
            let log = self.source.stderr();
            let why: Vec<&str> = log.lines().filter(|l| l.contains("failed")).collect();
            panic!(
                "{}: the first attempt failed before the test's fault: {s:?}\n{}\nrelay: {}",
                self.test,
                why.join("\n"),
                trace(&self.relay)
            );
        }
    }

    /// While the destination has not taken control: it refuses writes (EPERM: a source
    /// joined, so a new client is only a candidate) and says so.
    fn destination_waits(&mut self, phase: &str) {
        let d = self.dst_status();
        self.expect(
            "destination",
            &d,
            &[("has_control", "false"), ("handoff_phase", phase)],
        );
        let why = self.probes.refused(self.dst_addr(), "the destination");
        assert_eq!(why, Refusal::Errno(EPERM), "{}: destination", self.test);
    }

    /// Both processes exit 0 (the migration completed); returns when the source exited.
    fn completes(&mut self) -> Instant {
        assert_exit(&mut self.source, 0, "the source");
        let done = Instant::now();
        assert_exit(&mut self.target, 0, "the destination");
        done
    }

    /// After a completed migration: nobody serves any more, the destination file holds
    /// every acknowledged write and is the source's final state.
    fn check_completed(&mut self, log: &WriterLog, extra: &[(u64, Vec<u8>)]) {
        let (src, dst) = (self.src_addr(), self.dst_addr());
        check_promise(
            self.test,
            &mut self.probes,
            &[
                Side {
                    name: "source",
                    addr: src,
                    sock: None,
                },
                Side {
                    name: "destination",
                    addr: dst,
                    sock: None,
                },
            ],
            &self.dst.path,
            &[&self.src.path],
            log,
            extra,
        );
        assert_same_files(&self.dst.path, &self.src.path, "the destination");
    }
}

// ---------------------------------------------------------------------------------------
// 1. A cut or a blackhole during the bulk copy

/// The fault hits the sweep's second WRITE; the source serves on, fails the attempt
/// (at once for a cut, after the 3 s bulk limit for a blackhole), retries on a new
/// connection with a new Join, and the migration completes.
fn a_copy_fault_is_retried(test: &'static str, seed: u64, fault: Fault) {
    let blackhole = matches!(fault, Fault::Blackhole(_));
    let env = if blackhole { LIMIT_ENV } else { NO_ENV };
    let mut p = Pair::start(test, seed, &[], env);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay.arm_after_bytes(Dir::ToDestination, MID_COPY, fault);
    p.mirror();
    let fired = wait_fired(&p.relay, test);

    // The source keeps control and serves through the outage; the destination waits.
    p.still_first_attempt();
    let s = p.src_status();
    p.expect("source", &s, &[("has_control", "true")]);
    if blackhole {
        p.destination_waits("receiving");
    }

    wait_count(&p.relay, Msg::Join, 2, LONG, test);
    let retried = seen_at(&p.relay, Msg::Join, 1);
    let joins = connections_of(&p.relay, Msg::Join);
    assert_ne!(joins[0], joins[1], "{test}: the retry reused a connection");
    let acks = acks_between(&writer.snapshot(), fired, retried);
    assert!(
        acks > 0,
        "{test}: the writer got no acknowledgement between the fault and the retry"
    );
    let s = p.src_status();
    let failure = get(&s, "migration_last_failure").unwrap_or("").to_owned();
    eprintln!("{test}: migration_last_failure={failure}; {acks} writes acknowledged meanwhile");
    if blackhole {
        assert!(
            failure.contains("answered_nothing_for_3000_ms"),
            "{test}: {s:?}"
        );
        assert!(retried - fired >= Duration::from_millis(2900));
    }
    timing(test, "fault to the retry's Join", retried - fired);

    let done = p.completes();
    timing(test, "fault to completion (source exit 0)", done - fired);
    let log = writer.stop();
    p.check_completed(&log, &[]);
}

#[test]
fn a_reset_during_the_copy_is_retried_and_completes() {
    a_copy_fault_is_retried("copy_cut_rst", 11, Fault::CutRst);
}

#[test]
fn a_fin_during_the_copy_is_retried_and_completes() {
    a_copy_fault_is_retried("copy_cut_fin", 12, Fault::CutFin);
}

#[test]
fn a_blackhole_during_the_copy_is_retried_after_the_bulk_limit_and_completes() {
    a_copy_fault_is_retried("copy_blackhole", 13, Fault::Blackhole(Dir::ToDestination));
}

/// A stall shorter than any limit: the link blackholes in the middle of the sweep (its
/// fifth 4 MiB WRITE) and heals once the source has filled its window (eight requests in
/// flight: the rest of the sweep and the first pass's WRITEs of blocks written meanwhile).
/// The attempt rides it out (no retry) and everything arrives.
#[test]
fn a_short_stall_during_the_copy_is_ridden_out() {
    let test = "copy_stall_healed";
    let mut p = Pair::start(test, 14, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay.arm_after_bytes(
        Dir::ToDestination,
        16 * MIB as u64 + 1000,
        Fault::Blackhole(Dir::ToDestination),
    );
    p.mirror();
    let stalled = wait_fired(&p.relay, test);
    // Blocks the sweep has sent already: they go out again in the first pass.
    let mut client = p.source.connect();
    let mut newer = Vec::new();
    for (i, end) in [4u64, 8].iter().enumerate() {
        let offset = end * MIB as u64 - 2 * BLOCK as u64;
        let block = pattern(1400 + i as u64, BLOCK);
        client.write_at(offset, &block);
        newer.push((offset, block));
    }
    client.close();
    wait_count(&p.relay, Msg::Write, 9, LONG, test);
    p.still_first_attempt();
    let s = p.src_status();
    p.expect("source", &s, &[("has_control", "true")]);
    let healed = Instant::now();
    p.relay.heal();
    timing(test, "stall (blackholed)", healed - stalled);

    let done = p.completes();
    timing(test, "heal to completion (source exit 0)", done - healed);
    assert_eq!(
        p.relay.count(Msg::Join),
        1,
        "{test}: the stall failed the attempt"
    );
    let log = writer.stop();
    p.check_completed(&log, &newer);
}

/// A client that writes the last 256 KiB of each 4 MiB of the export, one 4 KiB
/// block after another, as fast as it is answered, until its connection ends; returns
/// the latest acknowledged content of each block.
fn hammer_tails(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<Vec<(u64, Vec<u8>)>> {
    thread::spawn(move || {
        let mut acked = std::collections::BTreeMap::new();
        let Greeting::Hello(mut client) = RawClient::greet(addr) else {
            return Vec::new();
        };
        let regions = SIZE / (4 * MIB as u64);
        let mut n = 0u64;
        let deadline = Instant::now() + LONG;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let region = n % regions;
            let k = (n / regions) % 64;
            let offset = (region + 1) * 4 * MIB as u64 - 256 * KIB as u64 + k * BLOCK as u64;
            let block = pattern(0x7a11_0000 + n, BLOCK);
            client.send_write(n, offset, &block);
            let mut reply = [0u8; REPLY_LEN];
            if client.stream.read_exact(&mut reply).is_err() {
                break;
            }
            if reply[4..8] == [0, 0, 0, 0] {
                acked.insert(offset, block);
            }
            n += 1;
        }
        acked.into_iter().collect()
    })
}

/// NBD gives requests in flight no order, and `listen` applies a small WRITE at once on the
/// session's thread but queues a long one (over 128 KiB) for its write thread: a block a
/// client rewrote, sent again by a pass while the sweep's WRITE covering it was still
/// unanswered, could land first and be overwritten by the older data — an acknowledged
/// write lost with no fault at all (8 failures in 8 runs before the fix). The mirror now
/// never sends a write overlapping one that is unanswered.
#[test]
fn overlapping_writes_of_a_migration_are_applied_in_order() {
    let test = "overlapping_writes";
    for round in 0..10u64 {
        let src = source_image(900 + round);
        let dst = empty_image();
        let sock = src.sibling("src.sock");
        let mut source = start_source(&src.path, &sock);
        let mut target = start_listen(&dst.path, None, 0, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = hammer_tails(source.sockaddr(), stop.clone());
        thread::sleep(Duration::from_millis(30));
        start_mirror(&sock, target.port, &[]);
        assert_exit(&mut source, 0, "the source");
        assert_exit(&mut target, 0, "the destination");
        stop.store(true, Ordering::Relaxed);
        let acked = hammer.join().expect("the writer panicked");
        let original = pattern(900 + round, SIZE as usize);
        let file = fs::File::open(&dst.path).unwrap();
        for (offset, block) in &acked {
            let mut got = vec![0u8; BLOCK];
            file.read_exact_at(&mut got, *offset).unwrap();
            if &got != block {
                let at = *offset as usize;
                let what = if got[..] == original[at..at + BLOCK] {
                    "the sweep's copy of the original data"
                } else {
                    "an older write"
                };
                panic!(
                    "{test}: round {round}: the acknowledged write at {offset} is missing from \
                     the destination, which has {what} there ({} writes acknowledged)",
                    acked.len()
                );
            }
        }
        assert_same_files(&dst.path, &src.path, "the destination");
        eprintln!("{test}: round {round}: ok");
    }
}

// ---------------------------------------------------------------------------------------
// 2. A cut or a blackhole during the final pass (doors closed)

/// The fault hits the first WRITE of the final pass. To arm it in time, the reply to the
/// FLUSH that precedes the final pass is held until the fault is armed, and a block is
/// written meanwhile (the doors are still open), so the final pass has a WRITE.
fn a_final_pass_fault_reopens_the_doors(test: &'static str, seed: u64, fault: Fault, after: bool) {
    let mut p = Pair::start(test, seed, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Flush, true, Fault::Blackhole(Dir::ToSource));
    p.mirror();
    wait_count(&p.relay, Msg::Flush, 1, LONG, test);
    p.still_first_attempt();
    let src = p.src_addr();
    assert!(
        p.probes.probe(src).is_accepted(),
        "{test}: the source refused a write before the final pass"
    );
    p.relay.arm(Msg::Write, after, fault);
    wait_held(&p.relay, Dir::ToSource, 0, test);
    p.relay.heal();
    wait_fired(&p.relay, test);
    let fired = first_after(&p.relay, Msg::Flush, Msg::Write);

    let blackhole = matches!(fault, Fault::Blackhole(_));
    if blackhole {
        // The doors stay closed while the source waits for the destination (5 s): nobody
        // takes writes, the source still has control.
        let s = p.src_status();
        p.expect(
            "source",
            &s,
            &[
                ("has_control", "true"),
                ("migration_phase", "final_pass"),
                ("handoff_phase", "doors_closed"),
            ],
        );
        let why = p.probes.refused(src, "the source in the final pass");
        assert_eq!(why, Refusal::ClosedWithoutHello, "{test}");
        p.destination_waits("receiving");
    }

    let reopened = first_ack_after(&writer, fired, LONG, test);
    timing(
        test,
        "fault to doors reopened (the writer's first acknowledgement)",
        reopened - fired,
    );
    let limit = if blackhole { 9_000 } else { 3_000 };
    assert!(
        reopened - fired < Duration::from_millis(limit),
        "{test}: the doors reopened {:?} after the fault",
        reopened - fired
    );
    if blackhole {
        assert!(reopened - fired >= Duration::from_millis(4_500), "{test}");
    }
    let s = p.src_status();
    p.expect("source", &s, &[("has_control", "true")]);
    eprintln!(
        "{test}: migration_last_failure={}",
        get(&s, "migration_last_failure").unwrap_or("")
    );

    wait_count(&p.relay, Msg::Join, 2, LONG, test);
    timing(
        test,
        "fault to the retry's Join",
        seen_at(&p.relay, Msg::Join, 1) - fired,
    );
    let done = p.completes();
    timing(test, "fault to completion (source exit 0)", done - fired);
    let log = writer.stop();
    p.check_completed(&log, &[]);
}

#[test]
fn a_reset_in_the_final_pass_reopens_the_doors_and_the_retry_completes() {
    a_final_pass_fault_reopens_the_doors("final_pass_cut_rst", 21, Fault::CutRst, false);
}

#[test]
fn a_fin_after_a_final_pass_write_reopens_the_doors_and_the_retry_completes() {
    a_final_pass_fault_reopens_the_doors("final_pass_cut_fin", 22, Fault::CutFin, true);
}

#[test]
fn a_blackhole_in_the_final_pass_reopens_the_doors_after_5_s_and_the_retry_completes() {
    a_final_pass_fault_reopens_the_doors(
        "final_pass_blackhole",
        23,
        Fault::Blackhole(Dir::ToDestination),
        false,
    );
}

// ---------------------------------------------------------------------------------------
// 3. Prepare lost, Prepared lost

/// While the source waits for Prepared: it still has control but its doors are closed,
/// and the destination refuses writes.
fn nobody_writes_while_preparing(p: &mut Pair, dst_phase: &str) {
    let s = p.src_status();
    p.expect(
        "source",
        &s,
        &[
            ("has_control", "true"),
            ("migration_phase", "handing_off"),
            ("handoff_phase", "doors_closed"),
        ],
    );
    let src = p.src_addr();
    let why = p.probes.refused(src, "the source waiting for Prepared");
    assert_eq!(why, Refusal::ClosedWithoutHello, "{}", p.test);
    p.destination_waits(dst_phase);
}

/// The source reopens about 10 s (the Prepare limit) after `fired`, with control.
fn reopens_after_the_prepare_limit(p: &Pair, writer: &SeqWriter, fired: Instant) {
    let reopened = first_ack_after(writer, fired, LONG, p.test);
    timing(
        p.test,
        "fault to doors reopened (the writer's first acknowledgement)",
        reopened - fired,
    );
    let waited = reopened - fired;
    assert!(
        waited >= Duration::from_millis(9_500) && waited < Duration::from_secs(14),
        "{}: the doors reopened {waited:?} after the fault",
        p.test
    );
    let s = p.src_status();
    p.expect("source", &s, &[("has_control", "true")]);
    eprintln!(
        "{}: migration_last_failure={}",
        p.test,
        get(&s, "migration_last_failure").unwrap_or("")
    );
}

#[test]
fn a_lost_prepare_reopens_the_source_after_the_limit_and_the_retry_completes() {
    let test = "prepare_lost";
    let mut p = Pair::start(test, 31, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Prepare, false, Fault::Blackhole(Dir::ToDestination));
    p.mirror();
    wait_count(&p.relay, Msg::Prepare, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Prepare, 0);
    // The Prepare never arrived: the destination is still receiving.
    nobody_writes_while_preparing(&mut p, "receiving");
    let d = p.dst_status();
    p.expect("destination", &d, &[("handoff_attempt", "1")]);

    reopens_after_the_prepare_limit(&p, &writer, fired);
    wait_count(&p.relay, Msg::Join, 2, LONG, test);
    timing(
        test,
        "fault to the retry's Join",
        seen_at(&p.relay, Msg::Join, 1) - fired,
    );
    let done = p.completes();
    timing(test, "fault to completion (source exit 0)", done - fired);
    assert_eq!(p.relay.count(Msg::Prepared), 1, "{test}: one Prepared");
    let log = writer.stop();
    p.check_completed(&log, &[]);
}

#[test]
fn a_lost_prepared_reopens_the_source_and_the_retry_takes_the_destination_back() {
    let test = "prepared_lost";
    let mut p = Pair::start(test, 32, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Prepared, false, Fault::Blackhole(Dir::ToSource));
    p.mirror();
    wait_count(&p.relay, Msg::Prepared, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Prepared, 0);
    // The destination is prepared (nobody writes there); the source never learnt it.
    nobody_writes_while_preparing(&mut p, "prepared");

    // Hold the retry in its copy (the reply to its FLUSH) to look at the destination.
    // (The first connection holds the Prepared answer.)
    let held = p.relay.held(Dir::ToSource);
    p.relay
        .arm(Msg::Flush, true, Fault::Blackhole(Dir::ToSource));
    reopens_after_the_prepare_limit(&p, &writer, fired);
    wait_count(&p.relay, Msg::Flush, 2, LONG, test);
    wait_held(&p.relay, Dir::ToSource, held, test);
    // The retry's Join{Copy} took the destination back to receiving, for attempt 2.
    let d = p.dst_status();
    p.expect(
        "destination",
        &d,
        &[
            ("has_control", "false"),
            ("handoff_phase", "receiving"),
            ("handoff_attempt", "2"),
        ],
    );
    let s = p.src_status();
    p.expect(
        "source",
        &s,
        &[("has_control", "true"), ("migration_attempt", "2")],
    );
    p.relay.heal();

    let done = p.completes();
    timing(test, "fault to completion (source exit 0)", done - fired);
    assert_eq!(p.relay.count(Msg::Prepared), 2, "{test}: two Prepared");
    let log = writer.stop();
    p.check_completed(&log, &[]);
}

// ---------------------------------------------------------------------------------------
// 4. Commit lost before it reaches the destination

#[test]
fn a_lost_commit_leaves_the_source_in_doubt_until_a_resend_completes() {
    let test = "commit_lost";
    let mut p = Pair::start(test, 41, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Commit, false, Fault::Blackhole(Dir::ToDestination));
    p.mirror();
    wait_count(&p.relay, Msg::Commit, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Commit, 0);
    // The resends must fail too until the test lets them through.
    p.relay.refuse_new();

    // In doubt at once: no control, doors closed; the destination is prepared.
    let s = wait_status(&p.src_sock, "the source in doubt", SOON, |s| {
        get(s, "migration_phase") == Some("in_doubt")
    });
    p.expect(
        "source",
        &s,
        &[("has_control", "false"), ("handoff_phase", "in_doubt")],
    );
    let src = p.src_addr();
    let why = p.probes.refused(src, "the source in doubt");
    assert_eq!(why, Refusal::ClosedWithoutHello, "{test}");
    p.destination_waits("prepared");
    let answer = control(&p.src_sock, "break", &[]);
    assert!(
        answer.starts_with("1: break refused"),
        "{test}: break in doubt answered {answer:?}"
    );
    p.expect(
        "source",
        &p.src_status(),
        &[("migration_phase", "in_doubt"), ("has_control", "false")],
    );

    // It keeps resending (through the refusing relay), for as long as it takes.
    let s = wait_status(&p.src_sock, "two resends", LONG, |s| {
        num(s, "migration_attempt") >= 3
    });
    timing(test, "Commit to the second resend", fired.elapsed());
    p.expect(
        "source",
        &s,
        &[("migration_phase", "in_doubt"), ("has_control", "false")],
    );
    eprintln!(
        "{test}: migration_last_failure={}",
        get(&s, "migration_last_failure").unwrap_or("")
    );
    p.refused_by_both_while_in_doubt();

    let healed = Instant::now();
    p.relay.accept_again();
    let done = p.completes();
    timing(
        test,
        "relay healed to completion (source exit 0)",
        done - healed,
    );
    timing(test, "Commit to completion", done - fired);
    assert!(p.relay.count(Msg::Commit) >= 2, "{test}: no resent Commit");
    p.target.expect_log("purpose: Commit");
    let log = writer.stop();
    assert_eq!(
        acks_between(&log, fired, Instant::now()),
        0,
        "{test}: the writer was acknowledged after the Commit"
    );
    p.check_completed(&log, &[]);
}

impl Pair {
    fn refused_by_both_while_in_doubt(&mut self) {
        let src = self.src_addr();
        let why = self.probes.refused(src, "the source in doubt");
        assert_eq!(why, Refusal::ClosedWithoutHello, "{}", self.test);
        self.destination_waits("prepared");
    }
}

// ---------------------------------------------------------------------------------------
// 5. Committed lost: the destination took control, the source cannot know

/// Waits until the in-doubt source has given up on its first connection and resent
/// Commit at least once, lets the resends through the relay, and checks that they cannot
/// get an answer (the destination no longer listens there): the source stays in doubt,
/// refusing writes, until SIGTERM (exit 1).
fn the_source_stays_in_doubt_until_stopped(p: &mut Pair, fired: Instant) {
    let test = p.test;
    let s = wait_status(&p.src_sock, "a resend", LONG, |s| {
        num(s, "migration_attempt") >= 2
    });
    timing(test, "Committed lost to the first resend", fired.elapsed());
    p.relay.restore();
    let attempt = num(&s, "migration_attempt");
    let s = wait_status(&p.src_sock, "two more resends", LONG, |s| {
        num(s, "migration_attempt") >= attempt + 2
    });
    p.expect(
        "source",
        &s,
        &[
            ("migration_phase", "in_doubt"),
            ("handoff_phase", "in_doubt"),
            ("has_control", "false"),
        ],
    );
    eprintln!(
        "{test}: still in doubt at attempt {}; migration_last_failure={}",
        num(&s, "migration_attempt"),
        get(&s, "migration_last_failure").unwrap_or("")
    );
    let src = p.src_addr();
    let why = p.probes.refused(src, "the source in doubt");
    assert_eq!(why, Refusal::ClosedWithoutHello, "{test}");
    let answer = control(&p.src_sock, "break", &[]);
    assert!(
        answer.starts_with("1: break refused"),
        "{test}: break in doubt answered {answer:?}"
    );
    p.source.signal("TERM");
    assert_exit(
        &mut p.source,
        3,
        "the in-doubt source stopped by SIGTERM (it let go: status 3)",
    );
}

fn source_in_doubt(p: &Pair) {
    let s = wait_status(&p.src_sock, "the source in doubt", SOON, |s| {
        get(s, "migration_phase") == Some("in_doubt")
    });
    p.expect(
        "source",
        &s,
        &[("has_control", "false"), ("handoff_phase", "in_doubt")],
    );
}

#[test]
fn a_lost_committed_leaves_the_source_in_doubt_while_the_rebound_destination_serves() {
    let test = "committed_lost_rebind";
    let rebind_port = free_port();
    let port = rebind_port.to_string();
    let mut p = Pair::start(
        test,
        51,
        &["--rebind-addr", LOCALHOST, "--rebind-port", &port],
        NO_ENV,
    );
    let rebound = SocketAddr::new(LOOPBACK, rebind_port);
    let writer = start_writer(&[p.src_addr(), rebound], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Committed, false, Fault::Blackhole(Dir::ToSource));
    p.mirror();
    wait_count(&p.relay, Msg::Committed, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Committed, 0);

    // The destination took control and serves on its rebind address.
    let d = wait_status(&p.dst_sock, "the destination rebinds", SOON, |s| {
        get(s, "rebind") == Some("serving")
    });
    timing(test, "Committed to rebind=serving", fired.elapsed());
    p.expect(
        "destination",
        &d,
        &[("has_control", "true"), ("handoff_phase", "committed")],
    );
    assert!(
        p.probes.probe(rebound).is_accepted(),
        "{test}: the rebound destination refused a write"
    );
    assert!(
        writer.wait_acked(20, Some(rebound), SOON),
        "{test}: the writer did not move to the destination"
    );
    timing(
        test,
        "Committed to the writer's first acknowledgement by the destination",
        first_ack_after(&writer, fired, SOON, test) - fired,
    );
    // The source is in doubt: no control, no writes, no break.
    source_in_doubt(&p);
    let src = p.src_addr();
    let why = p.probes.refused(src, "the source in doubt");
    assert_eq!(why, Refusal::ClosedWithoutHello, "{test}");
    assert_refused(
        p.target.port,
        "the destination's listen port after the hand-off",
    );

    the_source_stays_in_doubt_until_stopped(&mut p, fired);

    // Only the destination serves, and it has everything.
    let log = writer.stop();
    let runs = log.address_runs();
    eprintln!("{test}: the writer's runs: {runs:?}");
    assert!(
        runs.iter()
            .skip_while(|r| r.0 == src)
            .all(|r| r.0 == rebound),
        "{test}: the writer went back to the source: {runs:?}"
    );
    let dst_sock = p.dst_sock.clone();
    check_promise(
        test,
        &mut p.probes,
        &[
            Side {
                name: "source",
                addr: src,
                sock: None,
            },
            Side {
                name: "destination",
                addr: rebound,
                sock: Some(&dst_sock),
            },
        ],
        &p.dst.path,
        &[&p.src.path],
        &log,
        &[],
    );
    p.target.signal("TERM");
    assert_exit(&mut p.target, 0, "the destination that took control");
}

#[test]
fn a_lost_committed_leaves_the_source_in_doubt_after_the_destination_exited() {
    let test = "committed_lost_exit";
    let mut p = Pair::start(test, 52, &[], NO_ENV);
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Committed, false, Fault::Blackhole(Dir::ToSource));
    p.mirror();
    wait_count(&p.relay, Msg::Committed, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Committed, 0);
    assert_exit(&mut p.target, 0, "the destination that took control");
    timing(test, "Committed to the destination's exit", fired.elapsed());
    source_in_doubt(&p);
    the_source_stays_in_doubt_until_stopped(&mut p, fired);

    let log = writer.stop();
    assert_eq!(
        acks_between(&log, fired, Instant::now()),
        0,
        "{test}: the writer was acknowledged after the hand-off"
    );
    // Nobody serves; the destination's file holds everything (an operator serves it).
    p.check_completed(&log, &[]);
}

/// A partition from the Commit on, healed: the held Commit lands late on the first
/// connection (still the prepared migration's current one), so the destination takes
/// control then. The source learns it if a resend gets through (a resent Commit is
/// answered Committed again) and exits 0; if not, it stays in doubt. Either way one side.
#[test]
fn a_partition_over_the_commit_heals_into_exactly_one_authority() {
    let test = "commit_partition_healed";
    let rebind_port = free_port();
    let port = rebind_port.to_string();
    let mut p = Pair::start(
        test,
        53,
        &["--rebind-addr", LOCALHOST, "--rebind-port", &port],
        NO_ENV,
    );
    let rebound = SocketAddr::new(LOOPBACK, rebind_port);
    let writer = start_writer(&[p.src_addr(), rebound], WRITER_SPAN, WRITER_PAUSE);
    p.relay
        .arm(Msg::Commit, false, Fault::Blackhole(Dir::ToDestination));
    p.mirror();
    wait_count(&p.relay, Msg::Commit, 1, LONG, test);
    let fired = seen_at(&p.relay, Msg::Commit, 0);
    p.relay.partition();
    source_in_doubt(&p);
    wait_status(&p.src_sock, "two resends", LONG, |s| {
        num(s, "migration_attempt") >= 3
    });
    let d = p.dst_status();
    p.expect(
        "destination",
        &d,
        &[("has_control", "false"), ("handoff_phase", "prepared")],
    );
    p.refused_by_both_while_in_doubt();

    let healed = Instant::now();
    p.relay.heal();
    let d = wait_status(&p.dst_sock, "the destination takes control", SOON, |s| {
        get(s, "rebind") == Some("serving")
    });
    timing(test, "heal to rebind=serving", healed.elapsed());
    p.expect(
        "destination",
        &d,
        &[("has_control", "true"), ("handoff_phase", "committed")],
    );
    let src = p.src_addr();
    match exit_within(&mut p.source, Duration::from_secs(8)) {
        Some(status) => {
            assert_eq!(
                status.code(),
                Some(0),
                "{test}: source log:\n{}",
                p.source.stderr()
            );
            timing(test, "heal to the source's exit 0", healed.elapsed());
            eprintln!("{test}: a resend learnt the hand-off (Committed again)");
        }
        None => {
            eprintln!("{test}: no resend got an answer; the source stays in doubt");
            source_in_doubt(&p);
            let why = p.probes.refused(src, "the source in doubt");
            assert_eq!(why, Refusal::ClosedWithoutHello, "{test}");
            p.source.signal("TERM");
            assert_exit(
                &mut p.source,
                3,
                "the in-doubt source stopped by SIGTERM (it let go: status 3)",
            );
        }
    }
    timing(test, "Commit to the end of the source", fired.elapsed());
    for line in p.target.stderr().lines() {
        if line.contains("Hand-off from session") || line.contains("Migration received") {
            eprintln!("{test}: destination: {line}");
        }
    }
    assert!(writer.wait_acked(20, Some(rebound), SOON), "{test}");
    let log = writer.stop();
    let runs = log.address_runs();
    eprintln!("{test}: the writer's runs: {runs:?}");
    assert!(
        runs.iter()
            .skip_while(|r| r.0 == src)
            .all(|r| r.0 == rebound),
        "{test}: the writer went back to the source: {runs:?}"
    );
    let dst_sock = p.dst_sock.clone();
    check_promise(
        test,
        &mut p.probes,
        &[
            Side {
                name: "source",
                addr: src,
                sock: None,
            },
            Side {
                name: "destination",
                addr: rebound,
                sock: Some(&dst_sock),
            },
        ],
        &p.dst.path,
        &[&p.src.path],
        &log,
        &[],
    );
    p.target.signal("TERM");
    assert_exit(&mut p.target, 0, "the destination that took control");
}

// ---------------------------------------------------------------------------------------
// 6. A stale attempt's WRITEs arriving late

#[test]
fn stale_writes_of_a_fenced_attempt_arriving_late_are_refused() {
    let test = "stale_attempt";
    let mut p = Pair::start(test, 61, &[], LIMIT_ENV);
    // The writer stays below 4 MiB; [4 MiB, 12 MiB) gets newer data between the attempts.
    let span = 4 * MIB as u64;
    let newer_at = span;
    let writer = start_writer(&[p.src_addr()], span, WRITER_PAUSE);
    // Attempt 1 is held in the middle of the sweep's WRITE of [4 MiB, 8 MiB); its source
    // gives up after the 3 s limit, with more WRITEs queued behind it.
    p.relay.arm_after_bytes(
        Dir::ToDestination,
        MID_COPY,
        Fault::Blackhole(Dir::ToDestination),
    );
    p.mirror();
    let fired = wait_fired(&p.relay, test);

    // Newer data where attempt 1's held WRITEs carry the old.
    let newer = pattern(6100, 8 * MIB);
    let mut client = p.source.connect();
    for (i, chunk) in newer.chunks(MIB).enumerate() {
        client.write_at(newer_at + (i * MIB) as u64, chunk);
    }
    client.close();
    let scribbled: Vec<(u64, Vec<u8>)> = newer
        .chunks(BLOCK)
        .enumerate()
        .map(|(i, b)| (newer_at + (i * BLOCK) as u64, b.to_vec()))
        .collect();

    // Attempt 2's answers are delayed by 1 s, so that it stays short of Prepare for a while
    // after its WRITEs have landed.
    p.relay.arm(
        Msg::Joined,
        true,
        Fault::Delay(Dir::ToSource, Duration::from_millis(1000)),
    );
    wait_count(&p.relay, Msg::Joined, 2, LONG, test);
    let joined = seen_at(&p.relay, Msg::Joined, 1);
    timing(test, "fault to the retry's Joined", joined - fired);
    // Joined is only sent once the old connection is fenced.
    p.target.expect_log("no longer carries the migration");
    assert!(
        !p.target.stderr().contains("Refused a write"),
        "{test}: a write was refused before the partition healed"
    );

    // Attempt 2 re-copied the range: the destination holds the newer data.
    let deadline = Instant::now() + LONG;
    let mut buf = vec![0u8; newer.len()];
    loop {
        fs::File::open(&p.dst.path)
            .unwrap()
            .read_exact_at(&mut buf, newer_at)
            .unwrap();
        if buf == newer {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: attempt 2 never re-copied"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        p.relay.count(Msg::Prepare),
        0,
        "{test}: too late, already preparing"
    );

    // Now attempt 1's old WRITEs arrive: refused, never applied. (The refusal is logged at
    // debug level, which `-v` selects in debug builds only; the files are compared at the
    // end in any case.)
    let healed = Instant::now();
    p.relay.heal();
    if cfg!(debug_assertions) {
        p.target.expect_log("Refused a write");
        timing(test, "heal to the stale write refused", healed.elapsed());
        let log_text = p.target.stderr();
        let refused = log_text.find("Refused a write").unwrap();
        if let Some(prepare) = log_text.find("Prepare {") {
            assert!(
                refused < prepare,
                "{test}: the stale write only arrived after Prepare"
            );
        }
    }
    fs::File::open(&p.dst.path)
        .unwrap()
        .read_exact_at(&mut buf, newer_at)
        .unwrap();
    assert_same_bytes(&buf, &newer, "the range after the stale WRITE arrived");

    let done = p.completes();
    timing(test, "fault to completion (source exit 0)", done - fired);
    let log = writer.stop();
    p.check_completed(&log, &scribbled);
}

// ---------------------------------------------------------------------------------------
// 7. A destination out of space

/// A tmpfs mounted on a fresh directory; unmounted (and the directory removed) on drop.
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR`, or `None` (and why) if that fails.
    fn new(size: &str) -> Result<TmpfsMount, String> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = PathBuf::from(format!(
            "/tmp/flexnbd-e2e-tmpfs-{}-{stamp}",
            std::process::id()
        ));
        fs::create_dir(&dir).map_err(|e| format!("mkdir: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"));
        match out {
            Ok(out) if out.status.success() => Ok(TmpfsMount { dir }),
            Ok(out) => {
                let _ = fs::remove_dir(&dir);
                Err(format!(
                    "mount failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Room for the destination's writes: 3 MiB of its 32 MiB.
const ROOM: u64 = 3 * MIB as u64;

/// `listen` with writes past [`ROOM`] failing: RLIMIT_FSIZE, SIGXFSZ ignored (EFBIG).
fn listen_with_file_size_limit(file: &Path, sock: &Path) -> Server {
    start_listen_with(file, Some(sock), 0, &[], |cmd| {
        // SAFETY: between fork and exec only async-signal-safe calls are made (setrlimit,
        // signal), on values owned by the closure.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: ROOM,
                    rlim_max: ROOM,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    })
}

/// Every attempt fails on the destination's write error (`errno` in the status); the
/// source keeps control and serves; `break` stops it and the source still has every write.
fn a_full_destination_is_retried_until_break(test: &'static str, tmpfs: bool) {
    let src = source_image(71);
    let (mut p, errno) = if tmpfs {
        match TmpfsMount::new(&format!("{ROOM}")) {
            Ok(mount) => {
                let dir = tempfile::Builder::new()
                    .prefix("dst-")
                    .tempdir_in(&mount.dir)
                    .expect("a directory on the tmpfs");
                let dst = Image::zeroed_in(dir, SIZE as usize);
                let mut p = Pair::with(test, src, dst, NO_ENV, |file, sock| {
                    start_listen(file, Some(sock), 0, &[])
                });
                p.mount = Some(mount);
                (p, "ENOSPC")
            }
            Err(why) => {
                eprintln!("{test}: no tmpfs ({why}); using RLIMIT_FSIZE instead");
                let p = Pair::with(
                    test,
                    src,
                    empty_image(),
                    NO_ENV,
                    listen_with_file_size_limit,
                );
                (p, "EIO")
            }
        }
    } else {
        let p = Pair::with(
            test,
            src,
            empty_image(),
            NO_ENV,
            listen_with_file_size_limit,
        );
        (p, "EIO")
    };
    let writer = start_writer(&[p.src_addr()], WRITER_SPAN, WRITER_PAUSE);
    let started = Instant::now();
    p.mirror();
    let s = wait_status(&p.src_sock, "a second attempt", LONG, |s| {
        num(s, "migration_attempt") >= 2
    });
    let first_failed = Instant::now();
    timing(test, "mirror to the first retry", first_failed - started);
    let failure = get(&s, "migration_last_failure").unwrap_or("").to_owned();
    assert!(
        failure.contains("refused_a_write") && failure.contains(errno),
        "{test}: migration_last_failure={failure} ({s:?})"
    );
    let s = wait_status(&p.src_sock, "a fourth attempt", LONG, |s| {
        num(s, "migration_attempt") >= 4
    });
    timing(
        test,
        "attempt interval (mean of two)",
        first_failed.elapsed() / 2,
    );
    p.expect("source", &s, &[("has_control", "true")]);
    let acks = acks_between(&writer.snapshot(), first_failed, Instant::now());
    assert!(acks > 0, "{test}: the writer stalled while attempts failed");
    eprintln!("{test}: migration_last_failure={failure}; {acks} writes acknowledged meanwhile");
    p.destination_waits("receiving");

    let answer = control(&p.src_sock, "break", &[]);
    assert_eq!(answer, "0: mirror stopped\n", "{test}");
    let s = p.src_status();
    p.expect(
        "source",
        &s,
        &[("has_control", "true"), ("is_mirroring", "false")],
    );
    assert_eq!(get(&s, "migration_phase"), None, "{test}: {s:?}");
    let after_break = Instant::now();
    first_ack_after(&writer, after_break, SOON, test);
    let log = writer.stop();

    let (src, dst) = (p.src_addr(), p.dst_addr());
    let (src_sock, dst_sock) = (p.src_sock.clone(), p.dst_sock.clone());
    check_promise(
        test,
        &mut p.probes,
        &[
            Side {
                name: "source",
                addr: src,
                sock: Some(&src_sock),
            },
            Side {
                name: "destination",
                addr: dst,
                sock: Some(&dst_sock),
            },
        ],
        &p.src.path,
        &[&p.dst.path],
        &log,
        &[],
    );
    assert!(
        p.probes.acked.iter().any(|b| b.0 >= PROBE_BASE),
        "{test}: the source did not accept the final probe"
    );
    let d = p.dst_status();
    p.expect(
        "destination",
        &d,
        &[("has_control", "false"), ("handoff_phase", "receiving")],
    );
    p.target.signal("TERM");
    assert_exit(&mut p.target, 1, "the destination that never took control");
}

#[test]
fn a_destination_out_of_space_fails_every_attempt_and_break_stops_it() {
    a_full_destination_is_retried_until_break("destination_enospc", true);
}

#[test]
fn a_destination_over_its_file_size_limit_fails_every_attempt_and_break_stops_it() {
    a_full_destination_is_retried_until_break("destination_efbig", false);
}

// ---------------------------------------------------------------------------------------
// Legacy: a C flexnbd-style destination (no acknowledged hand-off)

/// What the fake C flexnbd saw, over all its connections.
#[derive(Debug, Default)]
struct FakeState {
    image: Vec<u8>,
    connections: usize,
    probes: usize,
    writes: u64,
    disc: bool,
    /// How each connection ended.
    ends: Vec<String>,
}

/// A fake C flexnbd 0.5 destination (as in tests/migration.rs), serving one connection
/// at a time and keeping its image across them: hello with flags 13, WRITE and FLUSH
/// answered 0, every other type (the hand-off probe 0x4650 included) EINVAL, DISC ends
/// the connection and the fake.
struct FakeC {
    port: u16,
    state: Arc<Mutex<FakeState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeC {
    fn start(size: usize) -> FakeC {
        let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            image: vec![0xee; size],
            ..FakeState::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, flag) = (state.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        st.lock().unwrap().connections += 1;
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_millis(200)))
                            .unwrap();
                        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                        let end = serve_fake(&mut stream, &st, &flag);
                        let mut s = st.lock().unwrap();
                        s.ends.push(match &end {
                            Ok(()) => "DISC".into(),
                            Err(e) => e.to_string(),
                        });
                        if s.disc {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => {
                        st.lock().unwrap().ends.push(format!("accept: {e}"));
                        return;
                    }
                }
            }
        });
        FakeC {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(LOOPBACK, self.port)
    }

    fn disc(&self) -> bool {
        self.state.lock().unwrap().disc
    }

    /// Waits for the fake to end (after a DISC); returns what it saw.
    fn finish(mut self) -> FakeState {
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + SOON;
        while !t.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(t.is_finished(), "the fake C flexnbd did not end");
        t.join().expect("the fake C flexnbd panicked");
        std::mem::take(&mut *self.state.lock().unwrap())
    }
}

impl Drop for FakeC {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads exactly `buf.len()` bytes, tolerating the short read timeout (used to look at
/// the stop flag) between reads.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> io::Result<()> {
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < buf.len() {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return Err(io::Error::other("stopped"));
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(io::Error::other("end of stream")),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_fake(
    stream: &mut TcpStream,
    state: &Mutex<FakeState>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let size = state.lock().unwrap().image.len() as u64;
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
    let mut payload = Vec::new();
    for _ in 0..1_000_000 {
        let mut h = [0u8; 28];
        read_full(stream, &mut h, stop)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(io::Error::other(format!("bad request magic {magic:#x}")));
        }
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as u64;
        match kind {
            CMD_WRITE => {
                if offset + len > size {
                    return Err(io::Error::other(format!(
                        "WRITE {len}@{offset} past the end"
                    )));
                }
                payload.resize(len as usize, 0);
                read_full(stream, &mut payload, stop)?;
                {
                    let mut s = state.lock().unwrap();
                    s.image[offset as usize..(offset + len) as usize].copy_from_slice(&payload);
                    s.writes += 1;
                }
                reply(stream, 0, &h[8..16])?;
            }
            CMD_FLUSH => reply(stream, 0, &h[8..16])?,
            CMD_DISC => {
                state.lock().unwrap().disc = true;
                return Ok(());
            }
            other => {
                if other == 0x4650 {
                    state.lock().unwrap().probes += 1;
                }
                reply(stream, EINVAL, &h[8..16])?;
            }
        }
    }
    Err(io::Error::other("too many requests"))
}

/// The fake's image, written next to the source, for the file checks.
fn fake_image_file(src: &Image, fake: &FakeState) -> PathBuf {
    let path = src.sibling("fake-c.img");
    fs::write(&path, &fake.image).unwrap();
    path
}

#[test]
fn a_cut_during_the_copy_to_a_c_flexnbd_is_retried_and_completes() {
    let test = "legacy_copy_cut_rst";
    let src = source_image(81);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let fake = FakeC::start(SIZE as usize);
    let relay = Relay::start(fake.addr());
    let writer = start_writer(&[source.sockaddr()], WRITER_SPAN, WRITER_PAUSE);
    // The stream to a C flexnbd: a PROBE, then WRITEs.
    relay.arm_after_bytes(Dir::ToDestination, MID_COPY, Fault::CutRst);
    start_mirror(&src_sock, relay.port(), &[]);
    let fired = wait_fired(&relay, test);

    wait_count(&relay, Msg::Probe, 2, LONG, test);
    let retried = seen_at(&relay, Msg::Probe, 1);
    let probes = connections_of(&relay, Msg::Probe);
    assert_ne!(
        probes[0], probes[1],
        "{test}: the retry reused a connection"
    );
    timing(test, "fault to the retry's probe", retried - fired);
    assert!(
        acks_between(&writer.snapshot(), fired, retried) > 0,
        "{test}: the writer stalled between the fault and the retry"
    );
    assert_exit(&mut source, 0, "the source");
    let done = Instant::now();
    timing(test, "fault to completion (source exit 0)", done - fired);
    assert_eq!(relay.count(Msg::Disc), 1, "{test}: one DISC");
    let log = writer.stop();
    let seen = fake.finish();
    eprintln!(
        "{test}: the fake saw {} connections, {} probes, {} writes; ends {:?}",
        seen.connections, seen.probes, seen.writes, seen.ends
    );
    assert!(
        seen.disc && seen.connections >= 2 && seen.probes >= 2,
        "{test}: {:?}",
        seen.ends
    );

    // Nobody but the destination could serve: the source is gone.
    assert_refused(source.port, "the source after the legacy hand-off");
    let image = fake_image_file(&src, &seen);
    check_holds_all(&image, &log.expected()).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_same_files(&image, &src.path, "the fake C flexnbd's image");
}

#[test]
fn a_blackholed_disc_to_a_c_flexnbd_still_ends_the_source() {
    let test = "legacy_disc_blackhole";
    let src = source_image(82);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let fake = FakeC::start(SIZE as usize);
    let relay = Relay::start(fake.addr());
    let writer = start_writer(&[source.sockaddr()], WRITER_SPAN, WRITER_PAUSE);
    relay.arm(Msg::Disc, false, Fault::Blackhole(Dir::ToDestination));
    start_mirror(&src_sock, relay.port(), &[]);

    // The source exits 0 once it has written its DISC: a legacy hand-off has no answer.
    assert_exit(&mut source, 0, "the source");
    let exited = Instant::now();
    assert_eq!(
        relay.count(Msg::Disc),
        1,
        "{test}: the source exited 0 without writing a DISC"
    );
    let fired = seen_at(&relay, Msg::Disc, 0);
    timing(
        test,
        "DISC written to source exit",
        exited.saturating_duration_since(fired),
    );
    assert!(fired <= exited);
    assert!(!fake.disc(), "{test}: the blackholed DISC arrived");
    assert_refused(source.port, "the source after the legacy hand-off");
    let log = writer.stop();

    // When the link heals the DISC arrives and the destination completes.
    relay.restore();
    let seen = fake.finish();
    assert!(seen.disc, "{test}: {:?}", seen.ends);
    assert_eq!(seen.connections, 1, "{test}: {:?}", seen.ends);
    let image = fake_image_file(&src, &seen);
    check_holds_all(&image, &log.expected()).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_same_files(&image, &src.path, "the fake C flexnbd's image");
}
