mod support;

// Operator actions, killed and restarted processes, and stray clients during a migration,
// in every phase of it, against the real binary: the promise is that after any one of
// them at most one of source and destination accepts writes, that one holds every write
// ever acknowledged, and `status` on each side says so (docs/migration.md).
//
// How a phase is held: the migration goes through a fault-injecting relay
// (tests/support/relay.rs) that blackholes one message at its first byte, so the source
// (or the destination) waits for it and the operator action lands in a known phase:
//
// | phase | held | source | destination |
// |---|---|---|---|
// | copy | nothing: a sparse image copied at 512 KiB/s (about 1 s per data extent) | `sweep`, `serving` | `receiving` |
// | final pass | the FLUSH before it, then the final pass's first WRITE | `final_pass`, `doors_closed` | `receiving` |
// | Prepare outstanding | Prepare (to the destination) | `handing_off`, `doors_closed` | `receiving` |
// | prepared | the Prepared answer (the way back, blackholed once Prepare is delivered) | `handing_off`, `doors_closed` | `prepared` |
// | Commit outstanding | Commit (to the destination); new connections refused | `in_doubt` | `prepared` |
// | Committed held | the Committed answer (likewise after Commit); new connections refused | `in_doubt` | `committed` (rebinds) |
//
// A [`SeqWriter`] writes to the source throughout; every test ends with
// [`Rig::assert_promise`]: a write probe on both sides (at most one accepts, and it is the
// one `status` calls `has_control=true`), the acknowledged writes in the authoritative
// side's file, and `has_control` on each live side. Times from a fault to its effect are
// printed as `FAULT-TIMING <test>: <what> <ms> ms` lines.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::cluster::*;
use support::promise::*;
use support::relay::{Dir, Fault, Msg, Relay};
use support::*;

const SIZE: u64 = 16 * MIB as u64;
/// The writer stays below `SIZE - SPARE`; probes and stray clients write above.
const SPARE: u64 = MIB as u64;
/// The copy phase's bandwidth limit: the sparse image has 16 data extents of 512 KiB, and
/// the throttle makes each wait about a second.
const COPY_BPS: u64 = 512 * KIB as u64;
const UNLIMITED: u64 = 1 << 40;
const EPERM: u32 = 1;
/// How long "nothing happens" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// Deadline for the source to serve again once the destination died before any Commit:
/// the longest application limit (10 s, for the Prepare answer), the retry delay, margin.
const SERVE_AGAIN: Duration = Duration::from_secs(16);
const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------
// Phases, sides, signals

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Copy,
    FinalPass,
    PrepareOutstanding,
    Prepared,
    CommitOutstanding,
    CommittedHeld,
}

impl Phase {
    fn in_doubt(self) -> bool {
        matches!(self, Phase::CommitOutstanding | Phase::CommittedHeld)
    }

    /// What `status` on the source says while the phase is held: migration phases,
    /// handoff_phase, has_control, clients_allowed.
    fn source_status(self) -> (&'static [&'static str], &'static str, bool, bool) {
        match self {
            Phase::Copy => (&["sweep", "copying"], "serving", true, true),
            Phase::FinalPass => (&["final_pass"], "doors_closed", true, false),
            Phase::PrepareOutstanding | Phase::Prepared => {
                (&["handing_off"], "doors_closed", true, false)
            }
            Phase::CommitOutstanding | Phase::CommittedHeld => {
                (&["in_doubt"], "in_doubt", false, false)
            }
        }
    }

    /// What `status` on the destination says while the phase is held: handoff_phase,
    /// has_control.
    fn destination_status(self) -> (&'static str, bool) {
        match self {
            Phase::Copy | Phase::FinalPass | Phase::PrepareOutstanding => ("receiving", false),
            Phase::Prepared | Phase::CommitOutstanding => ("prepared", false),
            Phase::CommittedHeld => ("committed", true),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Who must be authoritative at the end of a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Authority {
    /// The source serves (or would once its doors reopen) and holds everything.
    Source,
    /// The destination took control (serving at its rebind address, or exited 0) and
    /// holds everything.
    Destination,
    /// Nobody serves; these files hold every acknowledged write.
    Nobody(&'static [Side]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sig {
    Kill,
    Term,
}

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Sig::Kill => "KILL",
            Sig::Term => "TERM",
        }
    }
}

/// Asserts how a signalled process ended: SIGKILL kills it; after SIGTERM it exits with
/// `term_code`.
fn assert_signalled(status: ExitStatus, sig: Sig, term_code: i32, what: &str, log: &str) {
    match sig {
        Sig::Kill => assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{what} after SIGKILL: {status}; its log:\n{log}"
        ),
        Sig::Term => assert_eq!(
            status.code(),
            Some(term_code),
            "{what} after SIGTERM: {status}; its log:\n{log}"
        ),
    }
}

fn timing(test: &str, what: &str, d: Duration) {
    eprintln!("FAULT-TIMING {test}: {what} {} ms", d.as_millis());
}

fn field<'a>(s: &'a Status, key: &str) -> &'a str {
    get(s, key).unwrap_or_else(|| panic!("no {key} in {s:?}"))
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// `flexnbd break --sock SOCK [--force-source]`: (exit code, stdout, stderr).
fn break_cli(sock: &Path, force: bool) -> (Option<i32>, String, String) {
    let mut args = vec!["break", "--sock", sock.to_str().unwrap()];
    if force {
        args.push("--force-source");
    }
    let out = flexnbd(&args, None);
    (out.code(), out.stdout_str(), out.stderr.clone())
}

fn set_speed(sock: &Path, bps: u64) {
    assert_eq!(
        control(sock, "mirror_max_bps", &[&bps.to_string()]),
        "0: updated\n"
    );
}

fn block_at(path: &Path, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn remove_stale_socket(sock: &Path) {
    if sock.exists() {
        fs::remove_file(sock).expect("removing a killed server's control socket");
    }
}

// ---------------------------------------------------------------------------------------
// The rig: a source, a destination, a relay between them, a writer on the source

struct Rig {
    test: &'static str,
    src: Image,
    dst: Image,
    src_sock: PathBuf,
    dst_sock: PathBuf,
    source: Server,
    target: Server,
    listen_port: u16,
    rebind_port: Option<u16>,
    relay: Relay,
    writer: Option<SeqWriter>,
    log: Option<WriterLog>,
    /// Acknowledged writes besides the writer's (probes that were accepted).
    acked: Vec<(u64, Vec<u8>)>,
    /// Next spare block (index above `SIZE - SPARE`).
    spare: u64,
}

impl Rig {
    /// A sparse source (16 data extents of 512 KiB) serving with a writer on it, an empty
    /// `listen` destination (rebinding to a free port with `rebind`), a relay to it.
    fn new(test: &'static str, rebind: bool) -> Rig {
        let mut h = DefaultHasher::new();
        test.hash(&mut h);
        let seed = h.finish() & 0xffff;
        let regions: Vec<(u64, usize)> = (0..16)
            .map(|i| (i * MIB as u64 + 64 * KIB as u64, 512 * KIB))
            .collect();
        let src = sparse_image(SIZE, &regions, seed);
        let dst = destination(SIZE);
        let (src_sock, dst_sock) = (src.sibling("src.sock"), dst.sibling("dst.sock"));
        let source = start_source(&src.path, &src_sock);
        let rebind_port = rebind.then(free_port);
        let target = start_listen_on(&dst.path, &dst_sock, 0, rebind_port);
        let listen_port = target.port;
        let relay = Relay::start(target.sockaddr());
        let mut opts = WriterOptions::new(&[source.sockaddr()], SIZE - SPARE);
        opts.pause = Duration::from_millis(5);
        opts.run_for = Duration::from_secs(100);
        let writer = SeqWriter::start_with(opts);
        assert!(
            writer.wait_acked(20, None, Duration::from_secs(10)),
            "the writer does not get going"
        );
        Rig {
            test,
            src,
            dst,
            src_sock,
            dst_sock,
            source,
            target,
            listen_port,
            rebind_port,
            relay,
            writer: Some(writer),
            log: None,
            acked: Vec::new(),
            spare: 0,
        }
    }

    fn timing(&self, what: &str, d: Duration) {
        timing(self.test, what, d);
    }

    fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(HERE, self.listen_port)
    }

    fn src_status(&self) -> Status {
        status(&self.src_sock)
    }

    fn dst_status(&self) -> Status {
        status(&self.dst_sock)
    }

    fn writer(&self) -> &SeqWriter {
        self.writer.as_ref().expect("the writer runs")
    }

    fn stop_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            self.log = Some(w.stop());
        }
    }

    /// Every acknowledged write so far: the writer's and the accepted probes'.
    fn expected(&self) -> Vec<(u64, Vec<u8>)> {
        let log = match (&self.log, &self.writer) {
            (Some(log), _) => log.clone(),
            (None, Some(w)) => w.snapshot(),
            (None, None) => WriterLog::default(),
        };
        let mut all = log.expected();
        all.extend(self.acked.iter().cloned());
        all
    }

    fn spare_offset(&self) -> u64 {
        let at = SIZE - SPARE + self.spare * BLOCK as u64;
        assert!(at < SIZE, "out of spare blocks");
        at
    }

    /// A fresh spare offset for a stray client's write.
    fn take_spare(&mut self) -> u64 {
        let at = self.spare_offset();
        self.spare += 1;
        at
    }

    /// One write probe at a spare offset. The offset is used up when the write was
    /// acknowledged (it joins the expected set) or may have happened.
    fn probe(&mut self, addr: SocketAddr) -> Probe {
        let p = accepts_write(addr, self.spare_offset());
        match &p {
            Probe::Accepted { offset, data } => {
                self.acked.push((*offset, data.clone()));
                self.spare += 1;
            }
            Probe::Refused(
                Refusal::ConnectionRefused | Refusal::ClosedWithoutHello | Refusal::Errno(_),
            ) => {}
            Probe::Refused(_) => self.spare += 1,
        }
        p
    }

    /// Probes `addr` until it accepts a write; returns how long that took.
    fn wait_accepts(&mut self, addr: SocketAddr, timeout: Duration, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            let p = self.probe(addr);
            if p.is_accepted() {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: {addr} still refuses writes after {timeout:?}: {p:?}\nsource log:\n{}",
                self.source.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the migration through the relay and returns once `phase` is held, with
    /// both sides' status checked.
    fn hold(&mut self, phase: Phase) {
        let r = &self.relay;
        match phase {
            Phase::Copy => {}
            Phase::FinalPass => r.arm(Msg::Flush, false, Fault::Blackhole(Dir::ToDestination)),
            Phase::PrepareOutstanding => {
                r.arm(Msg::Prepare, false, Fault::Blackhole(Dir::ToDestination))
            }
            // Answers are held by blackholing the way back once their request has been
            // delivered (the relay need not recognise the answer itself).
            Phase::Prepared => r.arm(Msg::Prepare, true, Fault::Blackhole(Dir::ToSource)),
            Phase::CommitOutstanding => {
                r.arm(Msg::Commit, false, Fault::Blackhole(Dir::ToDestination))
            }
            Phase::CommittedHeld => r.arm(Msg::Commit, true, Fault::Blackhole(Dir::ToSource)),
        }
        if phase == Phase::Copy {
            start_limited_mirror(&self.src_sock, r.port(), COPY_BPS);
        } else {
            start_mirror(&self.src_sock, r.port(), &[]);
        }
        let seen = |m: Msg| {
            assert!(
                r.wait_for(m, STATE_TIMEOUT),
                "the relay never saw {m:?}: {:?}",
                r.messages()
            )
        };
        match phase {
            Phase::Copy => {
                wait_status(&self.src_sock, "the copy", STATE_TIMEOUT, |s| {
                    get(s, "migration_phase") == Some("sweep") && num(s, "migration_bytes_sent") > 0
                });
            }
            Phase::FinalPass => {
                // The FLUSH before the final pass is held while the writer dirties blocks
                // (acknowledged after the last catch-up pass took the dirty bits); then the
                // final pass's first WRITE is held.
                seen(Msg::Flush);
                let n = self.writer().acked();
                assert!(
                    self.writer()
                        .wait_acked(n + 10, None, Duration::from_secs(10)),
                    "the writer stalled while the FLUSH was held"
                );
                r.arm(Msg::Write, false, Fault::Blackhole(Dir::ToDestination));
                r.heal();
                wait_status(&self.src_sock, "the final pass", STATE_TIMEOUT, |s| {
                    get(s, "migration_phase") == Some("final_pass")
                });
                wait_until("the final pass's WRITEs are held", STATE_TIMEOUT, || {
                    r.held(Dir::ToDestination) > 0
                });
            }
            Phase::PrepareOutstanding => {
                seen(Msg::Prepare);
                wait_status(&self.src_sock, "Prepare sent", STATE_TIMEOUT, |s| {
                    get(s, "migration_phase") == Some("handing_off")
                });
            }
            Phase::Prepared => {
                seen(Msg::Prepare);
                wait_status(
                    &self.dst_sock,
                    "the destination prepared",
                    STATE_TIMEOUT,
                    |s| get(s, "handoff_phase") == Some("prepared"),
                );
            }
            Phase::CommitOutstanding => {
                seen(Msg::Commit);
                // Resends (after 5 s) are reset until the test says otherwise.
                r.refuse_new();
                wait_status(&self.src_sock, "in doubt", STATE_TIMEOUT, |s| {
                    get(s, "migration_phase") == Some("in_doubt")
                });
            }
            Phase::CommittedHeld => {
                seen(Msg::Commit);
                r.refuse_new();
                wait_status(&self.src_sock, "in doubt", STATE_TIMEOUT, |s| {
                    get(s, "migration_phase") == Some("in_doubt")
                });
                if self.rebind_port.is_some() {
                    wait_status(
                        &self.dst_sock,
                        "the destination rebinds",
                        STATE_TIMEOUT,
                        |s| get(s, "rebind") == Some("serving"),
                    );
                }
            }
        }
        self.check_held(phase);
    }

    /// Both sides' status while `phase` is held.
    fn check_held(&self, phase: Phase) {
        let (phases, handoff, control, open) = phase.source_status();
        let s = self.src_status();
        assert!(
            phases.contains(&field(&s, "migration_phase")),
            "{phase:?}: source {s:?}"
        );
        assert_eq!(
            field(&s, "handoff_phase"),
            handoff,
            "{phase:?}: source {s:?}"
        );
        assert_eq!(
            field(&s, "has_control"),
            bool_str(control),
            "{phase:?}: source {s:?}"
        );
        assert_eq!(
            field(&s, "clients_allowed"),
            bool_str(open),
            "{phase:?}: source {s:?}"
        );
        assert_eq!(field(&s, "is_mirroring"), "true", "{phase:?}: source {s:?}");
        let (handoff, control) = phase.destination_status();
        let d = self.dst_status();
        assert_eq!(
            field(&d, "handoff_phase"),
            handoff,
            "{phase:?}: destination {d:?}"
        );
        assert_eq!(
            field(&d, "has_control"),
            bool_str(control),
            "{phase:?}: destination {d:?}"
        );
    }

    /// Ends every hold: what the relay held is delivered, new connections pass, the copy
    /// is no longer limited.
    fn release(&self, phase: Phase) {
        self.relay.restore();
        self.relay.accept_again();
        if phase == Phase::Copy {
            set_speed(&self.src_sock, UNLIMITED);
        }
    }

    /// The migration completes: the source exits 0, the destination exits 0 (or, with a
    /// rebind address, serves there with control), and its file is the source's.
    fn expect_completion(&mut self, since: Instant) {
        assert_exit(&mut self.source, 0, "the source");
        self.timing(
            "until the source exited 0 (hand-off completed)",
            since.elapsed(),
        );
        if self.rebind_port.is_some() {
            let d = wait_status(
                &self.dst_sock,
                "the destination serves",
                STATE_TIMEOUT,
                |s| get(s, "rebind") == Some("serving"),
            );
            assert_eq!(field(&d, "has_control"), "true", "{d:?}");
        } else {
            assert_exit(&mut self.target, 0, "the destination");
        }
        // Every acknowledged write first (the clearer message), then every byte.
        if let Err(e) = check_holds_all(&self.dst.path, &self.expected()) {
            panic!(
                "{}: after the hand-off: {e}\nsource log:\n{}\ndestination log:\n{}",
                self.test,
                self.source.stderr(),
                self.target.stderr()
            );
        }
        assert_same_files(&self.dst.path, &self.src.path, "destination after hand-off");
    }

    /// The promise, at the end of a test: write probes on both sides, the authoritative
    /// side's file, `has_control` on each live side. Stops the writer.
    fn assert_promise(&mut self, auth: Authority) {
        self.stop_writer();
        let log = self.log.clone().unwrap_or_default();
        let src_live = self.source.is_running();
        let dst_live = self.target.is_running();
        let src_probe = self.probe(self.source.sockaddr());
        let listen_probe = self.probe(self.listen_addr());
        let rebind_probe = self
            .rebind_port
            .map(|p| self.probe(SocketAddr::new(HERE, p)));
        let src_accepts = src_probe.is_accepted();
        let dst_accepts =
            listen_probe.is_accepted() || rebind_probe.as_ref().is_some_and(Probe::is_accepted);
        let what = format!(
            "{}: source probe {src_probe:?}, listen probe {listen_probe:?}, rebind probe \
             {rebind_probe:?}; expected authority {auth:?}",
            self.test
        );
        assert!(!(src_accepts && dst_accepts), "BOTH accept writes: {what}");
        assert!(
            !listen_probe.is_accepted(),
            "the listen port accepted a stray write: {what}"
        );
        match auth {
            Authority::Source => assert!(src_accepts, "the source does not serve: {what}"),
            Authority::Destination => {
                assert!(!src_accepts, "{what}");
                if dst_live && self.rebind_port.is_some() {
                    assert!(dst_accepts, "the destination does not serve: {what}");
                }
            }
            Authority::Nobody(_) => assert!(!src_accepts && !dst_accepts, "{what}"),
        }
        if src_live {
            let s = self.src_status();
            assert_eq!(
                field(&s, "has_control"),
                bool_str(auth == Authority::Source),
                "source status: {s:?}; {what}"
            );
        }
        if dst_live {
            let d = self.dst_status();
            assert_eq!(
                field(&d, "has_control"),
                bool_str(auth == Authority::Destination),
                "destination status: {d:?}; {what}"
            );
        }
        let holders: &[Side] = match auth {
            Authority::Source => &[Side::Source],
            Authority::Destination => &[Side::Destination],
            Authority::Nobody(sides) => sides,
        };
        let expected = self.expected();
        for side in holders {
            let path = match side {
                Side::Source => &self.src.path,
                Side::Destination => &self.dst.path,
            };
            if let Err(e) = check_holds_all(path, &expected) {
                panic!(
                    "{}: the {side:?} file lacks acknowledged writes: {e}\nwriter: {} acked, {} \
                     errors, {} unsure\nsource log:\n{}\ndestination log:\n{}",
                    self.test,
                    log.acked.len(),
                    log.errors.len(),
                    log.unsure.len(),
                    self.source.stderr(),
                    self.target.stderr()
                );
            }
        }
        eprintln!(
            "{}: promise kept ({auth:?}); {} writes acknowledged ({} by the source), {} probes \
             acknowledged",
            self.test,
            log.acked.len(),
            log.acked_by(self.source.sockaddr()),
            self.acked.len()
        );
    }
}

fn rebind_args(port: Option<u16>) -> Vec<String> {
    match port {
        Some(p) => vec![
            "--rebind-addr".into(),
            LOCALHOST.into(),
            "--rebind-port".into(),
            p.to_string(),
        ],
        None => Vec::new(),
    }
}

fn start_listen_on(file: &Path, sock: &Path, port: u16, rebind: Option<u16>) -> Server {
    let extra = rebind_args(rebind);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    start_listen(file, Some(sock), port, &extra)
}

// ---------------------------------------------------------------------------------------
// Stray clients

/// A stray client writes one block at `offset` of the destination: it must be refused
/// (EPERM, or no hello at all), and the block must not be in the file. Returns how long
/// the refusal took.
fn stray_write(addr: SocketAddr, file: &Path, offset: u64, seq: u64, admitted: bool) -> Duration {
    let data = seq_block(seq);
    let start = Instant::now();
    match RawClient::greet(addr) {
        Greeting::Hello(mut c) => {
            c.send_write(0x57, offset, &data);
            let reply = c.read_reply();
            assert_eq!(
                reply,
                Reply {
                    error: EPERM,
                    handle: 0x57
                },
                "a stray WRITE to the destination"
            );
            c.close();
        }
        other => assert!(
            !admitted,
            "a stray client was not admitted by the destination: {other:?}"
        ),
    }
    let took = start.elapsed();
    assert_ne!(
        block_at(file, offset),
        data,
        "a stray client's write reached the destination's file"
    );
    took
}

/// A stray client connects and ends its connection with NBD_CMD_DISC, as libnbd and qemu
/// do; the server closes it. Returns false if it was not admitted.
fn stray_disc(addr: SocketAddr) -> bool {
    match RawClient::greet(addr) {
        Greeting::Hello(mut c) => {
            c.request(0, CMD_DISC, 0xd15c, 0, 0);
            c.expect_eof();
            true
        }
        _ => false,
    }
}

/// nbdinfo (libnbd) against `addr`: it reads the hello, asks a few things and closes with
/// NBD_CMD_DISC. Its exit status does not matter here, only what it leaves behind.
fn nbdinfo_disc(addr: SocketAddr) {
    let out = run_tool(
        tool("nbdinfo").arg(format!("nbd://{addr}")),
        None,
        TOOL_TIMEOUT,
    );
    eprintln!(
        "nbdinfo against {addr}: {} ({})",
        out.status,
        out.stderr.lines().next().unwrap_or("")
    );
}

/// The destination, after a stray DISC, is still running without control.
fn assert_still_listening(target: &mut Server, sock: &Path, phase_name: &str, what: &str) {
    thread::sleep(QUIET);
    assert!(
        target.is_running(),
        "{what}: the destination exited; its log:\n{}",
        target.stderr()
    );
    let d = status(sock);
    assert_eq!(field(&d, "has_control"), "false", "{what}: {d:?}");
    assert_eq!(field(&d, "handoff_phase"), phase_name, "{what}: {d:?}");
}

// ---------------------------------------------------------------------------------------
// 1. break

/// `break` before a Commit may be on the wire: `0: mirror stopped`, the source serves at
/// once, the destination never gets control (SIGTERM: exit 1).
fn break_before_commit(test: &'static str, phase: Phase) {
    let mut rig = Rig::new(test, false);
    rig.hold(phase);
    let t = Instant::now();
    let (code, out, err) = break_cli(&rig.src_sock, false);
    rig.timing("break answered", t.elapsed());
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "mirror stopped\n"),
        "break: {err}"
    );
    // The doors are open when break has answered.
    let s = rig.src_status();
    assert_eq!(field(&s, "is_mirroring"), "false", "{s:?}");
    assert_eq!(field(&s, "clients_allowed"), "true", "{s:?}");
    assert_eq!(field(&s, "has_control"), "true", "{s:?}");
    assert_eq!(get(&s, "migration_phase"), None, "{s:?}");
    let p = rig.probe(rig.source.sockaddr());
    assert!(
        p.is_accepted(),
        "the source refuses a write after break: {p:?}"
    );
    rig.timing("break until the source accepted a write", t.elapsed());
    // The writer is served again.
    let n = rig.writer().acked();
    assert!(
        rig.writer()
            .wait_acked(n + 10, None, Duration::from_secs(5)),
        "the writer is not served after break"
    );
    let d = rig.dst_status();
    assert_eq!(field(&d, "has_control"), "false", "{d:?}");
    assert_eq!(
        field(&d, "handoff_phase"),
        phase.destination_status().0,
        "{d:?}"
    );
    // A second break has nothing to stop.
    let (code, _, err) = break_cli(&rig.src_sock, false);
    assert_eq!((code, err.as_str()), (Some(1), "not mirroring\n"));
    rig.assert_promise(Authority::Source);
    rig.target.signal("TERM");
    assert_exit(&mut rig.target, 1, "the destination after break");
}

#[test]
fn break_mid_copy_stops_and_the_source_serves() {
    break_before_commit("break_mid_copy_stops_and_the_source_serves", Phase::Copy);
}

#[test]
fn break_in_the_final_pass_stops_and_the_source_serves() {
    break_before_commit(
        "break_in_the_final_pass_stops_and_the_source_serves",
        Phase::FinalPass,
    );
}

#[test]
fn break_with_prepare_outstanding_stops_and_the_source_serves() {
    break_before_commit(
        "break_with_prepare_outstanding_stops_and_the_source_serves",
        Phase::PrepareOutstanding,
    );
}

#[test]
fn break_with_the_destination_prepared_stops_and_the_source_serves() {
    break_before_commit(
        "break_with_the_destination_prepared_stops_and_the_source_serves",
        Phase::Prepared,
    );
}

#[test]
fn break_with_a_commit_outstanding_is_refused_until_forced_after_the_destination_stopped() {
    let test =
        "break_with_a_commit_outstanding_is_refused_until_forced_after_the_destination_stopped";
    let mut rig = Rig::new(test, false);
    rig.hold(Phase::CommitOutstanding);
    let (code, out, err) = break_cli(&rig.src_sock, false);
    assert_eq!(code, Some(1), "break in doubt: {out} {err}");
    assert!(
        err.starts_with("break refused: the hand-off is in doubt"),
        "{err:?}"
    );
    // Nothing changed: still in doubt, doors closed, the destination still prepared.
    rig.check_held(Phase::CommitOutstanding);
    let p = rig.probe(rig.source.sockaddr());
    assert_eq!(
        p,
        Probe::Refused(Refusal::ClosedWithoutHello),
        "source in doubt"
    );
    let p = rig.probe(rig.listen_addr());
    assert_eq!(
        p,
        Probe::Refused(Refusal::Errno(EPERM)),
        "prepared destination"
    );

    // The documented order: stop the destination first. It never got the Commit: exit 1.
    let t = Instant::now();
    rig.target.signal("TERM");
    assert_exit(
        &mut rig.target,
        1,
        "the destination that never got the Commit",
    );
    rig.timing("SIGTERM until the destination exited 1", t.elapsed());
    let s = rig.src_status();
    assert_eq!(field(&s, "handoff_phase"), "in_doubt", "{s:?}");
    assert_eq!(field(&s, "has_control"), "false", "{s:?}");

    let t = Instant::now();
    let (code, out, err) = break_cli(&rig.src_sock, true);
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "mirror stopped\n"),
        "break --force-source: {err}"
    );
    let s = rig.src_status();
    assert_eq!(field(&s, "has_control"), "true", "{s:?}");
    assert_eq!(field(&s, "clients_allowed"), "true", "{s:?}");
    assert_eq!(field(&s, "is_mirroring"), "false", "{s:?}");
    let took = rig.wait_accepts(rig.source.sockaddr(), Duration::from_secs(5), "forced");
    rig.timing(
        "break --force-source until the source accepted a write",
        t.elapsed().max(took),
    );
    rig.assert_promise(Authority::Source);
}

#[test]
fn break_while_the_committed_answer_is_held_is_refused_and_the_hand_off_completes() {
    let test = "break_while_the_committed_answer_is_held_is_refused_and_the_hand_off_completes";
    let mut rig = Rig::new(test, true);
    rig.hold(Phase::CommittedHeld);
    let (code, _, err) = break_cli(&rig.src_sock, false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("break refused: the hand-off is in doubt"),
        "{err:?}"
    );
    rig.check_held(Phase::CommittedHeld);
    // Exactly one side accepts writes: the destination, at its rebind address.
    let src = rig.probe(rig.source.sockaddr());
    assert_eq!(src, Probe::Refused(Refusal::ClosedWithoutHello));
    let rebind = SocketAddr::new(HERE, rig.rebind_port.unwrap());
    assert!(rig.probe(rebind).is_accepted(), "the destination serves");

    let t = Instant::now();
    rig.relay.restore();
    assert_exit(&mut rig.source, 0, "the source once Committed arrives");
    rig.timing("Committed released until the source exited 0", t.elapsed());
    rig.assert_promise(Authority::Destination);
    rig.target.signal("TERM");
    assert_exit(&mut rig.target, 0, "the destination that took control");
}

#[test]
fn break_after_the_hand_off_completed_never_stops_anything() {
    let test = "break_after_the_hand_off_completed_never_stops_anything";
    let mut rig = Rig::new(test, true);
    rig.hold(Phase::CommittedHeld);
    // An operator hammering `break` while the hand-off completes: refused while in doubt,
    // `1: mirror completed` once handed off, then no control socket at all.
    let answers = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (answers, stop, sock) = (answers.clone(), stop.clone(), rig.src_sock.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match control_raw(&sock, b"break\n\n", false) {
                    Ok(a) => answers
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&a).into_owned()),
                    Err(_) => break,
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    rig.relay.restore();
    assert_exit(&mut rig.source, 0, "the source");
    rig.timing("Committed released until the source exited 0", t.elapsed());
    stop.store(true, Ordering::Relaxed);
    hammer.join().unwrap();
    let answers = answers.lock().unwrap().clone();
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("1: break refused: the hand-off is in doubt"))
        .count();
    // Once handed off: `1: mirror completed`, or, for a request that reached the control
    // socket as the process was exiting, `1: shutting down`. Never `0: mirror stopped`.
    let completed = answers
        .iter()
        .filter(|a| a.as_str() == "1: mirror completed\n" || a.as_str() == "1: shutting down\n")
        .count();
    eprintln!(
        "{test}: {} break answers while the hand-off completed: {refused} refused (in doubt), \
         {completed} 'mirror completed'",
        answers.len()
    );
    assert!(refused > 0, "no break was answered while in doubt");
    assert_eq!(
        refused + completed,
        answers.len(),
        "unexpected break answers: {answers:?}"
    );
    // Once it exited: no socket, nothing to stop.
    let (code, _, err) = break_cli(&rig.src_sock, false);
    assert_ne!(code, Some(0), "break after the source exited: {err}");
    assert_same_files(&rig.dst.path, &rig.src.path, "destination after hand-off");
    rig.assert_promise(Authority::Destination);
    rig.target.signal("TERM");
    assert_exit(&mut rig.target, 0, "the destination that took control");
}

/// The combination of issue: the answer to the first Commit is lost (the Commit never
/// arrives, the source is in doubt and resends); the link heals, a resent Commit reaches
/// the destination, which takes control, but its Committed answer is delayed; the
/// operator's break arrives meanwhile. It must be refused, and the source never reopens.
#[test]
fn break_while_a_resent_commit_takes_control_is_refused() {
    let test = "break_while_a_resent_commit_takes_control_is_refused";
    let mut rig = Rig::new(test, true);
    let watch = StatusWatch::start(&rig.src_sock);
    rig.hold(Phase::CommitOutstanding);
    let doubt = Instant::now();
    // The first Commit's connection times out (5 s) and the resends are reset.
    wait_status(
        &rig.src_sock,
        "Commit resent",
        Duration::from_secs(15),
        |s| num(s, "migration_attempt") >= 2,
    );
    rig.timing(
        "in doubt until the first Commit resend (answer limit)",
        doubt.elapsed(),
    );
    rig.check_held(Phase::CommitOutstanding);

    // The link heals; the next resent Commit lands, its answer is held.
    rig.relay
        .arm(Msg::Commit, true, Fault::Blackhole(Dir::ToSource));
    let commits = rig.relay.count(Msg::Commit);
    let healed = Instant::now();
    rig.relay.accept_again();
    assert!(
        rig.relay
            .wait_count(Msg::Commit, commits + 1, Duration::from_secs(10)),
        "no Commit was resent: {:?}",
        rig.relay.messages()
    );
    let d = wait_status(
        &rig.dst_sock,
        "the destination took control",
        STATE_TIMEOUT,
        |s| get(s, "rebind") == Some("serving"),
    );
    rig.timing(
        "link healed until the destination took control (resent Commit)",
        healed.elapsed(),
    );
    assert_eq!(field(&d, "has_control"), "true", "{d:?}");
    assert_eq!(field(&d, "handoff_phase"), "committed", "{d:?}");

    // The operator's break: refused, nothing changes.
    let (code, _, err) = break_cli(&rig.src_sock, false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.starts_with("break refused: the hand-off is in doubt"),
        "{err:?}"
    );
    let s = rig.src_status();
    assert_eq!(field(&s, "handoff_phase"), "in_doubt", "{s:?}");
    assert_eq!(field(&s, "has_control"), "false", "{s:?}");
    assert_eq!(field(&s, "clients_allowed"), "false", "{s:?}");
    let p = rig.probe(rig.source.sockaddr());
    assert_eq!(p, Probe::Refused(Refusal::ClosedWithoutHello));

    let t = Instant::now();
    rig.relay.restore();
    assert_exit(&mut rig.source, 0, "the source once Committed arrives");
    rig.timing("Committed released until the source exited 0", t.elapsed());
    let seen = watch.finish();
    let first_doubt = seen
        .iter()
        .position(|s| get(s, "handoff_phase") == Some("in_doubt"))
        .expect("in_doubt was seen");
    for s in &seen[first_doubt..] {
        assert_eq!(get(s, "has_control"), Some("false"), "reopened: {s:?}");
        assert_eq!(get(s, "clients_allowed"), Some("false"), "reopened: {s:?}");
    }
    rig.assert_promise(Authority::Destination);
    rig.target.signal("TERM");
    assert_exit(&mut rig.target, 0, "the destination that took control");
}

// ---------------------------------------------------------------------------------------
// 2. The source killed or stopped

fn source_signalled(test: &'static str, phase: Phase, sig: Sig) {
    let committed = phase == Phase::CommittedHeld;
    let mut rig = Rig::new(test, committed);
    rig.hold(phase);
    let t = Instant::now();
    rig.source.signal(sig.name());
    let st = rig.source.wait_exit(Duration::from_secs(10));
    rig.timing(
        &format!("SIG{} until the source exited", sig.name()),
        t.elapsed(),
    );
    // Status 1: abandoned while it still held everything; 3: it had let go (in doubt), and
    // nothing may restart it on its own.
    let code = if phase.in_doubt() { 3 } else { 1 };
    assert_signalled(st, sig, code, "the source", &rig.source.stderr());
    if sig == Sig::Kill {
        remove_stale_socket(&rig.src_sock);
    } else {
        assert!(!rig.src_sock.exists(), "SIGTERM leaves the control socket");
    }

    // What the dead source had sent still arrives (a network delivers what is in flight),
    // except a held Prepare or Commit, which the relay drops with the link: whether a
    // Prepare arrives before the reset would make the destination's phase a race, and a
    // Commit's arrival may rightly give the destination control, which is not what this
    // test is about.
    if matches!(phase, Phase::PrepareOutstanding | Phase::CommitOutstanding) {
        rig.relay.fault_now(Fault::CutRst);
    } else {
        rig.relay.restore();
    }
    let (phase_name, control) = phase.destination_status();
    if !committed {
        let d = wait_status(
            &rig.dst_sock,
            "the destination drops the dead source",
            STATE_TIMEOUT,
            |s| get(s, "num_clients") == Some("0"),
        );
        rig.timing(
            "signal until the destination dropped the source",
            t.elapsed(),
        );
        assert_eq!(field(&d, "has_control"), "false", "{d:?}");
        assert_eq!(field(&d, "handoff_phase"), phase_name, "{d:?}");
        // A stray client's DISC completes nothing.
        assert!(stray_disc(rig.listen_addr()), "a stray was not admitted");
        assert_still_listening(
            &mut rig.target,
            &rig.dst_sock,
            phase_name,
            "after a stray DISC",
        );
    } else {
        let d = rig.dst_status();
        assert_eq!(field(&d, "has_control"), bool_str(control), "{d:?}");
        assert_eq!(field(&d, "handoff_phase"), phase_name, "{d:?}");
    }

    let auth = match phase {
        // Killed before in doubt: the source's file is intact.
        _ if !phase.in_doubt() => Authority::Nobody(&[Side::Source]),
        // In doubt, the Commit never arrived: the prepared destination and the source's
        // file both hold everything; nobody serves until the operator decides.
        Phase::CommitOutstanding => Authority::Nobody(&[Side::Source, Side::Destination]),
        _ => Authority::Destination,
    };
    rig.assert_promise(auth);
    rig.target.signal("TERM");
    assert_exit(
        &mut rig.target,
        if committed { 0 } else { 1 },
        "the destination",
    );
}

macro_rules! source_signal_tests {
    ($($name:ident: $phase:expr, $sig:expr;)*) => {$(
        #[test]
        fn $name() {
            source_signalled(stringify!($name), $phase, $sig);
        }
    )*};
}

source_signal_tests! {
    source_sigkill_mid_copy: Phase::Copy, Sig::Kill;
    source_sigterm_mid_copy: Phase::Copy, Sig::Term;
    source_sigkill_in_the_final_pass: Phase::FinalPass, Sig::Kill;
    source_sigterm_in_the_final_pass: Phase::FinalPass, Sig::Term;
    source_sigkill_with_prepare_outstanding: Phase::PrepareOutstanding, Sig::Kill;
    source_sigterm_with_prepare_outstanding: Phase::PrepareOutstanding, Sig::Term;
    source_sigkill_with_the_destination_prepared: Phase::Prepared, Sig::Kill;
    source_sigterm_with_the_destination_prepared: Phase::Prepared, Sig::Term;
    source_sigkill_with_a_commit_outstanding: Phase::CommitOutstanding, Sig::Kill;
    source_sigterm_with_a_commit_outstanding: Phase::CommitOutstanding, Sig::Term;
    source_sigkill_with_the_committed_answer_held: Phase::CommittedHeld, Sig::Kill;
    source_sigterm_with_the_committed_answer_held: Phase::CommittedHeld, Sig::Term;
}

// ---------------------------------------------------------------------------------------
// 3. The destination killed or stopped

/// Before in doubt: the source keeps or gets back its doors, retries, and completes into
/// the restarted destination. With the Committed answer held: the destination had control
/// (SIGTERM: exit 0), the source stays in doubt.
fn destination_signalled(test: &'static str, phase: Phase, sig: Sig) {
    assert!(phase != Phase::CommitOutstanding, "see the in-doubt tests");
    let committed = phase == Phase::CommittedHeld;
    let mut rig = Rig::new(test, committed);
    rig.hold(phase);
    let t = Instant::now();
    rig.target.signal(sig.name());
    let st = rig.target.wait_exit(Duration::from_secs(10));
    rig.timing(
        &format!("SIG{} until the destination exited", sig.name()),
        t.elapsed(),
    );
    assert_signalled(
        st,
        sig,
        if committed { 0 } else { 1 },
        "the destination",
        &rig.target.stderr(),
    );
    if sig == Sig::Kill {
        remove_stale_socket(&rig.dst_sock);
    }

    if committed {
        // The source never learns the answer: it stays in doubt through its own timeout
        // and its resends, doors closed.
        let attempt = num(&rig.src_status(), "migration_attempt");
        wait_status(
            &rig.src_sock,
            "the source resends Commit",
            Duration::from_secs(15),
            |s| num(s, "migration_attempt") > attempt,
        );
        rig.timing("signal until the source resent Commit", t.elapsed());
        let s = rig.src_status();
        assert_eq!(field(&s, "migration_phase"), "in_doubt", "{s:?}");
        assert_eq!(field(&s, "has_control"), "false", "{s:?}");
        assert_eq!(field(&s, "clients_allowed"), "false", "{s:?}");
        // The destination took control before it stopped: its file is authoritative.
        rig.assert_promise(Authority::Nobody(&[Side::Destination]));
        // The operator's resolution: the destination had control, so stop the source.
        rig.source.signal("TERM");
        assert_exit(
            &mut rig.source,
            3,
            "the in-doubt source stopped by SIGTERM (it let go: status 3)",
        );
        return;
    }

    // The source serves (again) within the liveness limits, and keeps retrying.
    let took = rig.wait_accepts(rig.source.sockaddr(), SERVE_AGAIN, "after the kill");
    rig.timing(
        "signal until the source accepted a write",
        t.elapsed().max(took),
    );
    // (Mid-copy the doors never closed; the source notices the loss at its next request
    // or answer.)
    wait_status(
        &rig.src_sock,
        "the source notices the loss",
        SERVE_AGAIN,
        |s| get(s, "migration_last_failure").is_some(),
    );
    rig.timing("signal until the source recorded the failure", t.elapsed());
    let s = rig.src_status();
    assert_eq!(field(&s, "has_control"), "true", "{s:?}");
    assert_eq!(field(&s, "handoff_phase"), "serving", "{s:?}");
    assert_eq!(field(&s, "clients_allowed"), "true", "{s:?}");
    assert!(
        get(&s, "migration_last_failure").is_some(),
        "no failure recorded: {s:?}"
    );
    let attempt = num(&s, "migration_attempt");
    wait_status(
        &rig.src_sock,
        "the source keeps retrying",
        Duration::from_secs(10),
        |s| num(s, "migration_attempt") >= attempt + 2,
    );
    let s = rig.src_status();
    assert_eq!(field(&s, "has_control"), "true", "{s:?}");
    assert_eq!(field(&s, "is_mirroring"), "true", "{s:?}");
    let n = rig.writer().acked();
    assert!(
        rig.writer()
            .wait_acked(n + 10, None, Duration::from_secs(5)),
        "the writer is not served while the source retries"
    );

    // The destination comes back (same port, same file): the migration completes.
    let restarted = Instant::now();
    rig.relay.restore();
    rig.target = start_listen_on(&rig.dst.path, &rig.dst_sock, rig.listen_port, None);
    if phase == Phase::Copy {
        set_speed(&rig.src_sock, UNLIMITED);
    }
    rig.expect_completion(restarted);
    rig.assert_promise(Authority::Destination);
}

macro_rules! destination_signal_tests {
    ($($name:ident: $phase:expr, $sig:expr;)*) => {$(
        #[test]
        fn $name() {
            destination_signalled(stringify!($name), $phase, $sig);
        }
    )*};
}

destination_signal_tests! {
    destination_sigkill_mid_copy: Phase::Copy, Sig::Kill;
    destination_sigterm_mid_copy: Phase::Copy, Sig::Term;
    destination_sigkill_in_the_final_pass: Phase::FinalPass, Sig::Kill;
    destination_sigterm_in_the_final_pass: Phase::FinalPass, Sig::Term;
    destination_sigkill_with_prepare_outstanding: Phase::PrepareOutstanding, Sig::Kill;
    destination_sigterm_with_prepare_outstanding: Phase::PrepareOutstanding, Sig::Term;
    destination_sigkill_when_prepared: Phase::Prepared, Sig::Kill;
    destination_sigterm_when_prepared: Phase::Prepared, Sig::Term;
    destination_sigkill_after_it_took_control: Phase::CommittedHeld, Sig::Kill;
    destination_sigterm_after_it_took_control: Phase::CommittedHeld, Sig::Term;
}

/// In doubt (Commit outstanding), the destination dies and comes back empty-handed on the
/// same port and file: the source's resent Commit gets NotPrepared, the source serves
/// again, and its retried migration completes into the restarted destination.
fn destination_signalled_in_doubt(test: &'static str, sig: Sig) {
    let mut rig = Rig::new(test, false);
    rig.hold(Phase::CommitOutstanding);
    let t = Instant::now();
    rig.target.signal(sig.name());
    let st = rig.target.wait_exit(Duration::from_secs(10));
    rig.timing(
        &format!("SIG{} until the destination exited", sig.name()),
        t.elapsed(),
    );
    assert_signalled(st, sig, 1, "the destination", &rig.target.stderr());
    if sig == Sig::Kill {
        remove_stale_socket(&rig.dst_sock);
    }
    // Nobody serves meanwhile.
    thread::sleep(QUIET);
    let s = rig.src_status();
    assert_eq!(field(&s, "migration_phase"), "in_doubt", "{s:?}");
    assert_eq!(field(&s, "has_control"), "false", "{s:?}");
    let p = rig.probe(rig.source.sockaddr());
    assert_eq!(p, Probe::Refused(Refusal::ClosedWithoutHello));

    // The retried copy's first WRITE will be held, so the source is seen serving again.
    let writes = rig.relay.count(Msg::Write);
    rig.relay
        .arm(Msg::Write, false, Fault::Blackhole(Dir::ToDestination));
    let restarted = Instant::now();
    rig.target = start_listen_on(&rig.dst.path, &rig.dst_sock, rig.listen_port, None);
    rig.relay.accept_again();
    wait_status(
        &rig.src_sock,
        "the source has control again",
        Duration::from_secs(10),
        |s| get(s, "has_control") == Some("true"),
    );
    rig.timing(
        "restart until the source had control again (NotPrepared)",
        restarted.elapsed(),
    );
    rig.source
        .expect_log("The destination proved it did not take control");
    let took = rig.wait_accepts(rig.source.sockaddr(), Duration::from_secs(5), "NotPrepared");
    rig.timing(
        "restart until the source accepted a write again",
        restarted.elapsed().max(took),
    );
    let s = rig.src_status();
    assert_eq!(field(&s, "has_control"), "true", "{s:?}");
    assert_eq!(field(&s, "clients_allowed"), "true", "{s:?}");
    assert_eq!(field(&s, "handoff_phase"), "serving", "{s:?}");
    // The retried attempt has joined the restarted destination (so it is no longer a
    // legacy target a probe could complete): it refuses strays.
    assert!(
        rig.relay
            .wait_count(Msg::Write, writes + 1, Duration::from_secs(10)),
        "the source did not retry"
    );
    let d = rig.dst_status();
    assert_eq!(field(&d, "has_control"), "false", "{d:?}");
    assert_eq!(field(&d, "handoff_phase"), "receiving", "{d:?}");
    let p = rig.probe(rig.listen_addr());
    assert_eq!(
        p,
        Probe::Refused(Refusal::Errno(EPERM)),
        "restarted destination"
    );

    rig.relay.restore();
    rig.expect_completion(restarted);
    rig.assert_promise(Authority::Destination);
}

#[test]
fn destination_sigkill_in_doubt_then_restarted_empty_handed() {
    destination_signalled_in_doubt(
        "destination_sigkill_in_doubt_then_restarted_empty_handed",
        Sig::Kill,
    );
}

#[test]
fn destination_sigterm_in_doubt_then_restarted_empty_handed() {
    destination_signalled_in_doubt(
        "destination_sigterm_in_doubt_then_restarted_empty_handed",
        Sig::Term,
    );
}

// ---------------------------------------------------------------------------------------
// 4. Stray clients on the destination

/// In every phase, a stray client's WRITE is refused and not applied, its DISC (raw, and
/// libnbd's) completes nothing, and the migration then completes.
fn stray_clients(test: &'static str, phase: Phase) {
    let committed = phase == Phase::CommittedHeld;
    let mut rig = Rig::new(test, committed);
    rig.hold(phase);
    let addr = rig.listen_addr();
    let offset = rig.take_spare();
    let took = stray_write(addr, &rig.dst.path, offset, 1 << 50, !committed);
    rig.timing("stray WRITE refused in", took);
    if committed {
        // The listen socket is closed once control is taken.
        assert!(!stray_disc(addr), "the listen port admitted a stray");
    } else {
        let t = Instant::now();
        assert!(stray_disc(addr), "a stray was not admitted");
        rig.timing("stray DISC closed in", t.elapsed());
        nbdinfo_disc(addr);
        let phase_name = phase.destination_status().0;
        assert_still_listening(&mut rig.target, &rig.dst_sock, phase_name, "stray DISC");
    }
    // Nothing changed on either side.
    rig.check_held(phase);

    let released = Instant::now();
    rig.release(phase);
    rig.expect_completion(released);
    assert_ne!(
        block_at(&rig.dst.path, offset),
        seq_block(1 << 50),
        "the stray's write is in the destination's file"
    );
    rig.assert_promise(Authority::Destination);
    if committed {
        rig.target.signal("TERM");
        assert_exit(&mut rig.target, 0, "the destination that took control");
    }
}

#[test]
fn stray_client_mid_copy_writes_nothing_and_completes_nothing() {
    stray_clients(
        "stray_client_mid_copy_writes_nothing_and_completes_nothing",
        Phase::Copy,
    );
}

#[test]
fn stray_client_in_the_final_pass_writes_nothing_and_completes_nothing() {
    stray_clients(
        "stray_client_in_the_final_pass_writes_nothing_and_completes_nothing",
        Phase::FinalPass,
    );
}

#[test]
fn stray_client_with_prepare_outstanding_writes_nothing_and_completes_nothing() {
    stray_clients(
        "stray_client_with_prepare_outstanding_writes_nothing_and_completes_nothing",
        Phase::PrepareOutstanding,
    );
}

#[test]
fn stray_client_on_a_prepared_destination_writes_nothing_and_completes_nothing() {
    stray_clients(
        "stray_client_on_a_prepared_destination_writes_nothing_and_completes_nothing",
        Phase::Prepared,
    );
}

#[test]
fn stray_client_with_a_commit_outstanding_writes_nothing_and_completes_nothing() {
    stray_clients(
        "stray_client_with_a_commit_outstanding_writes_nothing_and_completes_nothing",
        Phase::CommitOutstanding,
    );
}

#[test]
fn stray_client_after_the_destination_took_control_is_not_admitted() {
    stray_clients(
        "stray_client_after_the_destination_took_control_is_not_admitted",
        Phase::CommittedHeld,
    );
}

/// flexnbd's contract, before any source of ours joined: one client, which may write, and
/// whose DISC completes the migration.
#[test]
fn a_client_of_a_fresh_listen_writes_and_its_disc_completes_it() {
    let test = "a_client_of_a_fresh_listen_writes_and_its_disc_completes_it";
    let dst = destination(SIZE);
    let sock = dst.sibling("dst.sock");
    let mut target = start_listen_on(&dst.path, &sock, 0, None);
    let d = status(&sock);
    assert_eq!(field(&d, "handoff_phase"), "receiving", "{d:?}");
    assert_eq!(field(&d, "handoff_attempt"), "0", "{d:?}");
    assert_eq!(field(&d, "has_control"), "false", "{d:?}");
    let mut c = target.connect();
    let block = seq_block(77);
    c.write_at(SIZE - SPARE, &block);
    // A second client is not admitted while the first is connected.
    match RawClient::greet(target.sockaddr()) {
        Greeting::Eof => {}
        other => panic!("a second client was admitted: {other:?}"),
    }
    let t = Instant::now();
    c.request(0, CMD_DISC, 0xd15c, 0, 0);
    assert_exit(&mut target, 0, "listen after its client's DISC");
    timing(test, "DISC until listen exited 0", t.elapsed());
    check_holds_all(&dst.path, &[(SIZE - SPARE, block)]).unwrap();
}

#[test]
fn stray_disc_after_the_source_was_killed_mid_copy_completes_nothing() {
    let test = "stray_disc_after_the_source_was_killed_mid_copy_completes_nothing";
    let mut rig = Rig::new(test, false);
    rig.hold(Phase::Copy);
    let t = Instant::now();
    rig.source.signal("KILL");
    rig.source.wait_exit(Duration::from_secs(10));
    remove_stale_socket(&rig.src_sock);
    wait_status(
        &rig.dst_sock,
        "the destination drops the dead source",
        STATE_TIMEOUT,
        |s| get(s, "num_clients") == Some("0"),
    );
    rig.timing(
        "SIGKILL until the destination dropped the source",
        t.elapsed(),
    );
    // The stray behaves like a C flexnbd source: it writes, then DISC.
    let addr = rig.listen_addr();
    let offset = rig.take_spare();
    stray_write(addr, &rig.dst.path, offset, 1 << 51, true);
    assert!(stray_disc(addr), "a stray was not admitted");
    assert_still_listening(&mut rig.target, &rig.dst_sock, "receiving", "stray DISC");
    nbdinfo_disc(addr);
    assert_still_listening(&mut rig.target, &rig.dst_sock, "receiving", "nbdinfo");
    rig.assert_promise(Authority::Nobody(&[Side::Source]));
    rig.target.signal("TERM");
    assert_exit(
        &mut rig.target,
        1,
        "the destination that never took control",
    );
}

// ---------------------------------------------------------------------------------------
// 5. Legacy sources

/// A C flexnbd source never speaks our protocol: it writes the whole image and sends DISC,
/// which completes a `listen` as it always did.
#[test]
fn a_legacy_source_completes_a_fresh_listen() {
    let test = "a_legacy_source_completes_a_fresh_listen";
    let data = pattern(5, SIZE as usize);
    let src = Image::with_data(&data);
    let dst = destination(SIZE);
    let sock = dst.sibling("dst.sock");
    let mut target = start_listen_on(&dst.path, &sock, 0, None);
    let mut c = target.connect();
    let start = Instant::now();
    for (i, chunk) in data.chunks(MIB).enumerate() {
        c.write_at((i * MIB) as u64, chunk);
    }
    let d = status(&sock);
    assert_eq!(field(&d, "has_control"), "false", "{d:?}");
    assert_eq!(field(&d, "handoff_phase"), "receiving", "{d:?}");
    let t = Instant::now();
    c.request(0, CMD_DISC, 0xd15c, 0, 0);
    assert_exit(&mut target, 0, "listen after the legacy source's DISC");
    timing(test, "legacy copy", t.duration_since(start));
    timing(test, "DISC until listen exited 0", t.elapsed());
    assert_same_files(&dst.path, &src.path, "the legacy migration");
}

/// Once a source of ours has joined, a client that behaves like a C flexnbd source (writes
/// everything, then DISC) writes nothing and completes nothing: while ours is connected,
/// and after it went away. Our source then migrates again and completes.
#[test]
fn a_legacy_lookalike_after_our_source_joined_completes_nothing() {
    let test = "a_legacy_lookalike_after_our_source_joined_completes_nothing";
    let mut rig = Rig::new(test, false);
    rig.hold(Phase::Copy);
    let addr = rig.listen_addr();
    let legacy = pattern(9, SIZE as usize);
    let lookalike = |what: &str| {
        let mut c = RawClient::connect(addr);
        let mut refused = 0;
        for (i, chunk) in legacy.chunks(4 * MIB).enumerate() {
            let handle = 0x1e6a_0000 + i as u64;
            c.send_write(handle, (i * 4 * MIB) as u64, chunk);
            let reply = c.read_reply();
            assert_eq!(reply.handle, handle, "{what}");
            if reply.error == EPERM {
                refused += 1;
            }
        }
        assert_eq!(
            refused,
            SIZE as usize / (4 * MIB),
            "{what}: every WRITE refused"
        );
        c.request(0, CMD_DISC, 0xd15c, 0, 0);
        c.expect_eof();
    };
    lookalike("while our source copies");
    assert_still_listening(&mut rig.target, &rig.dst_sock, "receiving", "lookalike");
    rig.check_held(Phase::Copy);

    let (code, out, _) = break_cli(&rig.src_sock, false);
    assert_eq!((code, out.as_str()), (Some(0), "mirror stopped\n"));
    wait_status(
        &rig.dst_sock,
        "the destination drops our source",
        STATE_TIMEOUT,
        |s| get(s, "num_clients") == Some("0"),
    );
    lookalike("after our source went away");
    assert_still_listening(&mut rig.target, &rig.dst_sock, "receiving", "lookalike");
    let file = fs::read(&rig.dst.path).unwrap();
    assert!(
        file.chunks(BLOCK)
            .zip(legacy.chunks(BLOCK))
            .all(|(a, b)| a != b || a.iter().all(|&x| x == 0)),
        "a block of the lookalike's image is in the destination's file"
    );

    let t = Instant::now();
    start_mirror(&rig.src_sock, rig.relay.port(), &[]);
    rig.expect_completion(t);
    rig.assert_promise(Authority::Destination);
}
