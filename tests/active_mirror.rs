//! Active (write-blocking) mirroring end to end: `mirror ... MODE` with MODE background,
//! active or auto, against writers that dirty the image faster than the migration link
//! carries it.
//!
//! How the tests are shaped:
//! - The source's link is limited with the raw `mirror` control command's MAX_BPS (the
//!   CLI's `--mode` is not relied on). The limit is [`LINK_BPS`], 4 MB/s rather than the
//!   issue's 20 MB/s: the writers here are synchronous raw clients (one request at a time
//!   per connection, several connections) against the debug build of the server, and the
//!   tests of this file run concurrently. Alone on an idle 2-core machine they reach
//!   40-110 MB/s, but with the other tests and a busy machine they were seen as low as
//!   8 MB/s: 20 MB/s would not reliably be outrun, 4 MB/s is. Each test prints the rate
//!   its writers reached before the migration started and checks it is at least 1.5 times
//!   the limit.
//! - [`Flood`] is that writer: each of its lanes owns a disjoint set of 4 KiB blocks and
//!   rewrites them over and over in a scattered order, each write stamped with a unique
//!   sequence number (`promise::seq_block`), and records the last acknowledged one per
//!   block. Its checks use `promise::check_holds_all`: every acknowledged write is on the
//!   destination. The one write per lane that may be in flight when the hand-off closes the
//!   connection may or may not have happened; its block must hold either content.
//! - Every process is in a guard (killed and reaped on drop), every socket has timeouts,
//!   every wait a deadline.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::cluster::*;
use support::nbdkit::start_nbdkit;
use support::promise::{accepts_write, check_holds_all, seq_block};
use support::relay::{Fault, Relay};
use support::*;

/// The migration link's limit in the tests that need a writer to outrun it.
const LINK_BPS: u64 = 4_000_000;
/// Image size: the first sweep alone lasts SIZE / LINK_BPS, about 8 s.
const SIZE: usize = 32 * MIB;
/// Writer connections: enough to outrun [`LINK_BPS`] several times over.
const LANES: usize = 4;
/// Deadline for a migration that must converge, from the mirror command to the source's
/// exit (about 20 s are expected; the slack is for a loaded CI machine).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the background-mode test lets the migration run under the writer before it
/// checks it has not converged. The issue asks for 60 s; 20 s (two sweeps' worth of the
/// link, several passes) shows the same thing for a fraction of the CI time. Set
/// `FLEXNBD_TEST_BACKGROUND_SECS=60` for the figure.
fn background_secs() -> u64 {
    std::env::var("FLEXNBD_TEST_BACKGROUND_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

// ---------------------------------------------------------------------------------------
// The writer

/// What one lane of a [`Flood`] did.
#[derive(Default, Debug)]
struct Lane {
    /// Last acknowledged sequence number per offset.
    acked: BTreeMap<u64, u64>,
    /// The write sent without a reply when the connection ended: (offset, seq).
    unsure: Option<(u64, u64)>,
    /// Anything wrong: an error reply, a bad reply, a timeout.
    problems: Vec<String>,
    /// The server closed the connection (rather than the lane being stopped).
    closed: bool,
}

/// What a [`Flood`] did, all lanes together.
#[derive(Debug)]
struct FloodLog {
    lanes: Vec<Lane>,
    writes: u64,
}

impl FloodLog {
    /// The blocks a file must hold: the last acknowledged write of every offset, except
    /// the offsets whose last write is unsure (see [`FloodLog::unsure`]).
    fn expected(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for lane in &self.lanes {
            for (&offset, &seq) in &lane.acked {
                if lane.unsure.map(|(o, _)| o) != Some(offset) {
                    out.push((offset, seq_block(seq)));
                }
            }
        }
        out
    }

    /// Offsets whose last write got no reply: (offset, contents allowed there): that write,
    /// or what was there before it (the lane's previous acknowledged write, or the image's
    /// original contents, `original`, if the lane had not written there yet).
    fn unsure(&self, original: &[u8]) -> Vec<(u64, Vec<Vec<u8>>)> {
        self.lanes
            .iter()
            .filter_map(|lane| {
                let (offset, seq) = lane.unsure?;
                let before = match lane.acked.get(&offset) {
                    Some(&before) => seq_block(before),
                    None => {
                        let at = offset as usize;
                        original[at..at + support::promise::BLOCK].to_vec()
                    }
                };
                Some((offset, vec![seq_block(seq), before]))
            })
            .collect()
    }

    fn problems(&self) -> Vec<String> {
        self.lanes
            .iter()
            .flat_map(|l| l.problems.iter().cloned())
            .collect()
    }

    fn all_closed(&self) -> bool {
        self.lanes.iter().all(|l| l.closed)
    }

    /// Checks that `path` holds every acknowledged write (and, at the unsure offsets, one
    /// of the two candidates); `original` is the image the writers started from.
    fn check(&self, path: &Path, what: &str, original: &[u8]) {
        let expected = self.expected();
        assert!(!expected.is_empty(), "{what}: no acknowledged write");
        check_holds_all(path, &expected).unwrap_or_else(|e| panic!("{what}: {e}"));
        let file = fs::File::open(path).unwrap();
        let mut buf = vec![0u8; support::promise::BLOCK];
        for (offset, allowed) in self.unsure(original) {
            file.read_exact_at(&mut buf, offset).unwrap();
            assert!(
                allowed.contains(&buf),
                "{what}: the block at {offset}, whose last write got no reply, holds neither \
                 that write nor the one acknowledged before"
            );
        }
    }
}

/// Several raw clients, each rewriting its own blocks as fast as the server answers; see
/// the module's description. Dropping it stops it.
struct Flood {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    lanes: Vec<JoinHandle<Lane>>,
}

impl Flood {
    fn start(addr: SocketAddr, size: u64, lanes: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let handles = (0..lanes)
            .map(|k| {
                let client = RawClient::connect(addr);
                let (stop, writes) = (stop.clone(), writes.clone());
                thread::Builder::new()
                    .name(format!("flood-{k}"))
                    .spawn(move || lane_loop(client.stream, k, lanes, size, &stop, &writes))
                    .expect("spawning a writer lane")
            })
            .collect();
        Flood {
            stop,
            writes,
            lanes: handles,
        }
    }

    /// Writes acknowledged so far.
    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Acknowledged bytes per second over `span`.
    fn rate(&self, span: Duration) -> f64 {
        let before = self.writes();
        thread::sleep(span);
        (self.writes() - before) as f64 * BLOCK as f64 / span.as_secs_f64()
    }

    /// True once every lane has ended (the server closed their connections).
    fn all_ended(&self) -> bool {
        self.lanes.iter().all(|t| t.is_finished())
    }

    /// Stops the lanes (a request in flight finishes or times out first) and returns what
    /// they did.
    fn stop(mut self) -> FloodLog {
        self.stop.store(true, Ordering::Relaxed);
        let lanes = std::mem::take(&mut self.lanes)
            .into_iter()
            .map(|t| {
                // A request in flight is bounded by the socket timeouts (IO_TIMEOUT).
                let deadline = Instant::now() + 3 * IO_TIMEOUT;
                while !t.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                assert!(t.is_finished(), "a writer lane did not stop");
                t.join().expect("a writer lane panicked")
            })
            .collect();
        FloodLog {
            lanes,
            writes: self.writes(),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        // The lanes end within the socket timeouts once stopped; not waited for here.
        self.stop.store(true, Ordering::Relaxed);
    }
}

const BLOCK: usize = support::promise::BLOCK;

/// One lane: blocks `i` with `i % lanes == k`, visited in a scattered order (a prime
/// stride through them) and rewritten in the same order once all are written.
fn lane_loop(
    mut s: TcpStream,
    k: usize,
    lanes: usize,
    size: u64,
    stop: &AtomicBool,
    writes: &AtomicU64,
) -> Lane {
    const STRIDE: u64 = 7919;
    let mine = size / BLOCK as u64 / lanes as u64;
    assert!(
        !mine.is_multiple_of(STRIDE),
        "the stride must not divide {mine}"
    );
    let mut lane = Lane::default();
    // Bounded in any case: no test runs this long.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let index = (n * STRIDE % mine) * lanes as u64 + k as u64;
        let offset = index * BLOCK as u64;
        let seq = ((k as u64) << 40) | n;
        n += 1;
        let mut request = request_header(0, CMD_WRITE, seq, offset, BLOCK as u32).to_vec();
        request.extend_from_slice(&seq_block(seq));
        if let Err(e) = s.write_all(&request) {
            lane.unsure = Some((offset, seq));
            end_of_lane(&mut lane, e, "sending");
            break;
        }
        let mut reply = [0u8; REPLY_LEN];
        if let Err(e) = s.read_exact(&mut reply) {
            lane.unsure = Some((offset, seq));
            end_of_lane(&mut lane, e, "reading a reply");
            break;
        }
        let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        if magic != REPLY_MAGIC || handle != seq || error != 0 {
            lane.problems.push(format!(
                "lane {k}: reply to the write at {offset}: magic {magic:#x}, error {error}, \
                 handle {handle:#x} for {seq:#x}"
            ));
            break;
        }
        lane.acked.insert(offset, seq);
        writes.fetch_add(1, Ordering::Relaxed);
    }
    lane
}

fn end_of_lane(lane: &mut Lane, e: std::io::Error, doing: &str) {
    match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => lane.closed = true,
        _ => lane.problems.push(format!("{doing}: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// Migrations

/// `mirror 127.0.0.1 PORT exit 0.0.0.0 MAX_BPS MODE` (no bind; MAX_BPS 0 is no limit).
fn mirror_mode(sock: &Path, port: u16, max_bps: u64, mode: &str) {
    let answer = control(
        sock,
        "mirror",
        &[
            LOCALHOST,
            &port.to_string(),
            "exit",
            "0.0.0.0",
            &max_bps.to_string(),
            mode,
        ],
    );
    assert_eq!(answer, "0: Mirror started\n", "mirror ... {mode}");
}

/// A dense source with its control socket, and a fresh `listen` destination.
struct Pair {
    /// The source image is `pattern(seed, SIZE)`.
    seed: u64,
    src: Image,
    dst: Image,
    sock: std::path::PathBuf,
    source: Server,
    target: Server,
}

fn pair(seed: u64) -> Pair {
    let src = Image::with_data(&pattern(seed, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    let target = start_listen(&dst.path, None, 0, &[]);
    Pair {
        seed,
        src,
        dst,
        sock,
        source,
        target,
    }
}

/// Starts the flood on the source and checks it outruns the link.
fn outrunning_flood(p: &Pair) -> Flood {
    let flood = Flood::start(p.source.sockaddr(), SIZE as u64, LANES);
    let rate = flood.rate(Duration::from_secs(2));
    eprintln!(
        "writers: {:.1} MB/s before the migration (link limit {:.1} MB/s)",
        rate / 1e6,
        LINK_BPS as f64 / 1e6
    );
    assert!(
        rate >= 1.5 * LINK_BPS as f64,
        "the writers reach only {rate:.0} B/s: they do not outrun a {LINK_BPS} B/s link"
    );
    flood
}

/// The largest value of a numeric key among the statuses.
fn max_of(seen: &[Status], key: &str) -> u64 {
    seen.iter()
        .filter_map(|s| get(s, key).and_then(|v| v.parse().ok()))
        .max()
        .unwrap_or(0)
}

/// Waits for the source to exit 0 within [`CONVERGE_TIMEOUT`] of `started`, then for the
/// destination to exit 0; returns the migration's duration.
fn converged(p: &mut Pair, started: Instant) -> Duration {
    let left = CONVERGE_TIMEOUT.saturating_sub(started.elapsed());
    let status = p.source.wait_exit(left);
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "the source exited with {status}; its log:\n{}",
        p.source.stderr()
    );
    assert_exit(&mut p.target, 0, "the destination");
    took
}

/// Waits (bounded) until every lane has seen its connection closed by the hand-off.
fn wait_lanes_closed(flood: &Flood) {
    wait_until(
        "the hand-off closes every writer connection",
        Duration::from_secs(20),
        || flood.all_ended(),
    );
}

// ---------------------------------------------------------------------------------------
// a. auto

#[test]
fn auto_converges_under_a_writer_that_outruns_the_link() {
    let mut p = pair(71);
    let flood = outrunning_flood(&p);
    let watch = StatusWatch::start(&p.sock);
    let started = Instant::now();
    mirror_mode(&p.sock, p.target.port, LINK_BPS, "auto");
    let first = status(&p.sock);
    assert_eq!(
        get(&first, "migration_mode"),
        Some("background"),
        "{first:?}"
    );

    let took = converged(&mut p, started);
    wait_lanes_closed(&flood);
    let log = flood.stop();
    let seen = watch.finish();
    let modes = values_of(&seen, "migration_mode");
    let turned = seen
        .iter()
        .find(|s| get(s, "migration_mode") == Some("active"));
    eprintln!(
        "auto: completed in {took:.1?}; {} writes acknowledged; modes {modes:?}; phases {:?}; \
         passes {}; forwarded {} writes; active after {:?} s",
        log.writes,
        values_of(&seen, "migration_phase"),
        max_of(&seen, "migration_passes"),
        max_of(&seen, "migration_forwarded_writes"),
        turned.and_then(|s| get(s, "migration_active_since")),
    );
    assert!(
        modes.iter().any(|m| m == "active"),
        "auto never turned active: {modes:?}"
    );
    assert!(log.problems().is_empty(), "writers: {:?}", log.problems());
    assert!(
        log.all_closed(),
        "a writer lane ended other than by the hand-off"
    );
    assert_same_files(&p.dst.path, &p.src.path, "the destination after auto");
    log.check(
        &p.dst.path,
        "the destination after auto",
        &pattern(p.seed, SIZE),
    );
}

// ---------------------------------------------------------------------------------------
// b. background

#[test]
fn background_mode_keeps_copying_while_the_writer_outruns_it() {
    let mut p = pair(72);
    let flood = outrunning_flood(&p);
    let watch = StatusWatch::start(&p.sock);
    mirror_mode(&p.sock, p.target.port, LINK_BPS, "background");
    let span = Duration::from_secs(background_secs());
    thread::sleep(span);

    let s = status(&p.sock);
    assert_eq!(get(&s, "is_mirroring"), Some("true"), "{s:?}");
    assert_eq!(get(&s, "migration_phase"), Some("copying"), "{s:?}");
    assert!(num(&s, "migration_passes") > 1, "{s:?}");
    assert_eq!(get(&s, "migration_mode"), Some("background"), "{s:?}");
    assert_eq!(num(&s, "migration_forwarded_writes"), 0, "{s:?}");
    let answer = control(&p.sock, "break", &[]);
    assert_eq!(answer, "0: mirror stopped\n");
    let seen = watch.finish();
    eprintln!(
        "background: after {span:?}: passes {}, bytes left {} (at most {} seen, export \
         {SIZE}), phases {:?}; {} writes so far",
        num(&s, "migration_passes"),
        num(&s, "migration_bytes_left"),
        max_of(&seen, "migration_bytes_left"),
        values_of(&seen, "migration_phase"),
        flood.writes()
    );
    assert_eq!(
        values_of(&seen, "migration_mode"),
        ["background"],
        "the mode changed in background mode"
    );
    let after = status(&p.sock);
    assert_eq!(get(&after, "is_mirroring"), Some("false"), "{after:?}");

    // The writers go on, the source serves new clients too.
    let before = flood.writes();
    wait_until("the writers go on", Duration::from_secs(10), || {
        flood.writes() > before + 100
    });
    assert!(p.source.is_running(), "the source exited after break");
    let log = flood.stop();
    assert!(log.problems().is_empty(), "writers: {:?}", log.problems());
    assert!(
        log.lanes.iter().all(|l| !l.closed),
        "a writer connection was closed"
    );
    log.check(
        &p.src.path,
        "the source after break",
        &pattern(p.seed, SIZE),
    );
    // A new client is served too (its write lands on a block of the stopped writers).
    let probe = accepts_write(p.source.sockaddr(), 0);
    assert!(probe.is_accepted(), "{probe:?}");
    let (offset, data) = probe.acked().unwrap();
    check_holds_all(&p.src.path, &[(offset, data)]).expect("the probe's write");
    p.target.signal("TERM");
    p.target.wait_exit(Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// c. active from the start

#[test]
fn active_mode_from_the_start() {
    let mut p = pair(73);
    let flood = outrunning_flood(&p);
    let watch = StatusWatch::start(&p.sock);
    let started = Instant::now();
    mirror_mode(&p.sock, p.target.port, LINK_BPS, "active");
    let first = status(&p.sock);
    assert_eq!(get(&first, "migration_mode"), Some("active"), "{first:?}");

    let took = converged(&mut p, started);
    wait_lanes_closed(&flood);
    let log = flood.stop();
    let seen = watch.finish();
    let forwarded = max_of(&seen, "migration_forwarded_writes");
    eprintln!(
        "active: completed in {took:.1?}; {} writes acknowledged; phases {:?}; passes {}; \
         forwarded {forwarded} writes, {} bytes",
        log.writes,
        values_of(&seen, "migration_phase"),
        max_of(&seen, "migration_passes"),
        max_of(&seen, "migration_forwarded_bytes"),
    );
    assert_eq!(values_of(&seen, "migration_mode"), ["active"]);
    assert!(
        values_of(&seen, "migration_phase")
            .iter()
            .any(|p| p == "sweep"),
        "no status seen during the sweep"
    );
    assert!(forwarded > 0, "no write forwarded in active mode");
    assert!(log.problems().is_empty(), "writers: {:?}", log.problems());
    assert!(
        log.all_closed(),
        "a writer lane ended other than by the hand-off"
    );
    assert_same_files(&p.dst.path, &p.src.path, "the destination after active");
    log.check(
        &p.dst.path,
        "the destination after active",
        &pattern(p.seed, SIZE),
    );
}

// ---------------------------------------------------------------------------------------
// d. the link cut while forwarding

#[test]
fn a_destination_that_fails_forwarded_writes() {
    let mut p = pair(74);
    let relay = Relay::start(p.target.sockaddr());
    let flood = outrunning_flood(&p);
    let watch = StatusWatch::start(&p.sock);
    let started = Instant::now();
    mirror_mode(&p.sock, relay.port(), LINK_BPS, "active");
    // Cut once writes are being forwarded, in the middle of the sweep.
    let cut_at = wait_status(&p.sock, "writes forwarded", STATE_TIMEOUT, |s| {
        get(s, "migration_forwarded_writes").is_some_and(|v| v.parse::<u64>().unwrap_or(0) >= 20)
    });
    let writes_at_cut = flood.writes();
    relay.fault_now(Fault::CutRst);
    let retry = wait_status(&p.sock, "the source retries", STATE_TIMEOUT, |s| {
        num(s, "migration_attempt") >= 2 || get(s, "migration_phase") == Some("retrying")
    });
    // Writes go on being acknowledged while the link is down and afterwards.
    let before = flood.writes();
    wait_until("writes acknowledged after the cut", STATE_TIMEOUT, || {
        flood.writes() > before + 100
    });

    let took = converged(&mut p, started);
    wait_lanes_closed(&flood);
    let log = flood.stop();
    let seen = watch.finish();
    eprintln!(
        "cut: at {:?} forwarded, {writes_at_cut} writes; then {:?}; completed in {took:.1?} \
         after {} attempts; {} writes acknowledged; relay connections {}",
        get(&cut_at, "migration_forwarded_writes"),
        get(&retry, "migration_phase"),
        max_of(&seen, "migration_attempt"),
        log.writes,
        relay.connections(),
    );
    assert!(
        max_of(&seen, "migration_attempt") >= 2,
        "no second attempt after the cut"
    );
    assert!(relay.connections() >= 2, "the source never reconnected");
    assert!(log.problems().is_empty(), "writers: {:?}", log.problems());
    assert!(
        log.all_closed(),
        "a writer lane ended other than by the hand-off"
    );
    assert_same_files(&p.dst.path, &p.src.path, "the destination after the cut");
    log.check(
        &p.dst.path,
        "the destination after the cut",
        &pattern(p.seed, SIZE),
    );
}

// ---------------------------------------------------------------------------------------
// e. fio as the client

/// fio's runtime: longer than the migration can last, so the hand-off always happens while
/// fio writes; fio then fails on the closed connection, which is expected once the source
/// has exited (completed), and only then.
const FIO_RUNTIME_SECS: u64 = 100;

#[test]
fn fio_randwrite_during_an_auto_migration() {
    let mut p = pair(75);
    let out = p.src.sibling("fio.out");
    let err = p.src.sibling("fio.err");
    let mut fio = ChildGuard::new(
        tool("fio")
            .args([
                "--name=w",
                "--ioengine=nbd",
                &format!("--uri={}", p.source.uri()),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--time_based",
                &format!("--runtime={FIO_RUNTIME_SECS}"),
                "--thread",
            ])
            .current_dir(p.src.dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("starting fio"),
    );
    wait_until("fio connects", Duration::from_secs(10), || {
        num(&status(&p.sock), "num_clients") == 1
    });
    thread::sleep(Duration::from_millis(500));
    let watch = StatusWatch::start(&p.sock);
    let started = Instant::now();
    mirror_mode(&p.sock, p.target.port, LINK_BPS, "auto");
    let took = converged(&mut p, started);
    let seen = watch.finish();
    // fio notices the closed connection and ends.
    let fio_status = fio
        .wait_timeout(Duration::from_secs(30))
        .expect("fio did not end within 30 s of the hand-off");
    let text = format!(
        "{}\n{}",
        fs::read_to_string(&out).unwrap_or_default(),
        fs::read_to_string(&err).unwrap_or_default()
    );
    eprintln!(
        "fio: migration completed in {took:.1?}; modes {:?}; passes {}; forwarded {}; fio \
         exited with {fio_status}",
        values_of(&seen, "migration_mode"),
        max_of(&seen, "migration_passes"),
        max_of(&seen, "migration_forwarded_writes"),
    );
    assert!(
        took < Duration::from_secs(FIO_RUNTIME_SECS),
        "the migration outlasted fio"
    );
    assert!(
        values_of(&seen, "migration_mode")
            .iter()
            .any(|m| m == "active"),
        "auto never turned active under fio"
    );
    // fio wrote through the source: it reported I/O before the connection went away.
    assert!(text.contains("write:"), "no fio write report:\n{text}");
    assert_same_files(&p.dst.path, &p.src.path, "the destination after fio");
}

// ---------------------------------------------------------------------------------------
// f. into a server that does not speak our hand-off

/// Active mode only needs WRITE (and FLUSH) from the destination: into nbdkit, with the
/// writers outrunning the link, the migration turns nothing special, converges, and the
/// legacy hand-off (DISC) leaves nbdkit's file with every acknowledged write.
#[test]
fn active_mode_into_nbdkit() {
    let src = Image::with_data(&pattern(76, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);
    let (mut nbdkit, port) = start_nbdkit(&[], &dst.path);
    let pair_source = source.sockaddr();
    let flood = Flood::start(pair_source, SIZE as u64, LANES);
    let watch = StatusWatch::start(&sock);
    let started = Instant::now();
    mirror_mode(&sock, port, LINK_BPS, "active");
    let status = source.wait_exit(CONVERGE_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "the source exited with {status}; its log:\n{}",
        source.stderr()
    );
    source.expect_log("does not speak our acknowledged hand-off");
    let took = started.elapsed();
    wait_lanes_closed(&flood);
    let log = flood.stop();
    assert!(log.problems().is_empty(), "writers: {:?}", log.problems());
    let seen = watch.finish();
    assert!(
        max_of(&seen, "migration_forwarded_writes") > 0,
        "no write was forwarded to nbdkit"
    );
    // nbdkit does not exit on DISC: stop it so that its writes are in its file.
    let killed = Command::new("kill")
        .args(["-TERM", &nbdkit.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert!(
        nbdkit.wait_timeout(Duration::from_secs(10)).is_some(),
        "nbdkit did not stop on SIGTERM"
    );
    eprintln!(
        "active into nbdkit: completed in {took:.1?}; {} writes acknowledged",
        log.writes
    );
    assert_same_files(&dst.path, &src.path, "nbdkit's file after active");
    log.check(&dst.path, "nbdkit's file after active", &pattern(76, SIZE));
}
