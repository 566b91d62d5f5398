//! The mirror actor against scripted fake destinations.
//!
//! The source is real: a temporary file, a serve-mode [`Listener`] on a loopback socket
//! (so the final pass really closes the doors on real sessions) and a fake owner that
//! records [`MirrorEnded`]. The destination is a small old-style server written here, one
//! [`Script`] per connection, that keeps the received image in memory and reports every
//! request it sees, in order, as [`Seen`] events.
//!
//! `FLEXNBD_MS_REQUEST_LIMIT_SECS` is set to [`LIMIT_SECS`] for the whole test process (the
//! mirror is its only reader) so that a stalled destination is detected quickly; the
//! well-behaved fakes answer at once, far within it.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

use actix::prelude::*;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{sleep, timeout, Instant};

use crate::actors::listener::Listener;
use crate::actors::mirror::{
    Abandon, AbandonAnswer, FirstFailure, Mirror, MirrorConfig, MirrorEnded, MirrorStats, Outcome,
    Phase,
};
use crate::actors::ServerEvent;
use crate::protocol::control::{CopyMode, MirrorAction, MirrorRequest};
use crate::protocol::handoff::{
    encode_answer, HandoffReply, HandoffRequest, JoinPurpose, MigrationId, HANDOFF, IDENTIFY, PROBE,
};
use crate::protocol::reply::simple_reply;
use crate::protocol::request::{decode_header, Header};
use crate::protocol::{Errno, COMPACT_REQUEST_LEN};

use super::*;

const MIB: u64 = 1 << 20;
const ID: MigrationId = MigrationId([0x5a; 16]);
/// The inactivity limit of every mirror in this process.
const LIMIT_SECS: &str = "2";
/// What the fake destination's image holds before anything is written.
const FILL: u8 = 0xa5;

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("FLEXNBD_MS_REQUEST_LIMIT_SECS", LIMIT_SECS));
}

// ---------------------------------------------------------------------------------------
// The source side.

/// Stands in for control: forwards every [`MirrorEnded`] to the test.
struct FakeOwner(UnboundedSender<Outcome>);

impl Actor for FakeOwner {
    type Context = Context<Self>;
}

impl Handler<MirrorEnded> for FakeOwner {
    type Result = ();

    fn handle(&mut self, msg: MirrorEnded, _ctx: &mut Self::Context) {
        let _ = self.0.send(msg.outcome);
    }
}

/// A source server: the export, its listener, the main task's event channel and the owner.
struct Source {
    export: Export,
    listener: Addr<Listener>,
    addr: SocketAddr,
    events_tx: crate::actors::Events,
    events: UnboundedReceiver<ServerEvent>,
    owner: Addr<FakeOwner>,
    ended: UnboundedReceiver<Outcome>,
}

impl Source {
    /// A file of `size` bytes of [`pattern`] with `holes` punched (where the filesystem
    /// can; the expected image is read back from the file either way).
    fn new(size: u64, holes: &[(u64, u64)]) -> Source {
        init();
        let export = Export::new(size, Limits::default());
        for &(offset, len) in holes {
            let _ = export.config.backing.punch_hole(offset, len);
        }
        let (listener, addr) = spawn_listener(export.config.clone(), None);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (ended_tx, ended) = mpsc::unbounded_channel();
        Source {
            export,
            listener,
            addr,
            events_tx,
            events,
            owner: FakeOwner(ended_tx).start(),
            ended,
        }
    }

    fn size(&self) -> u64 {
        self.export.size()
    }

    fn contents(&self) -> Vec<u8> {
        self.export.contents(0, self.size() as usize)
    }

    fn path(&self) -> PathBuf {
        self.export.file.path().to_owned()
    }

    fn start(&self, port: u16, action: MirrorAction) -> Running {
        self.start_with(port, action, CopyMode::Background, u64::MAX)
    }

    fn start_with(&self, port: u16, action: MirrorAction, mode: CopyMode, max_bps: u64) -> Running {
        let (first_tx, first_rx) = oneshot::channel();
        let mirror = Mirror::new(
            MirrorConfig {
                request: MirrorRequest {
                    addr: "127.0.0.1".parse().expect("address"),
                    port,
                    action,
                    bind: None,
                    max_bps,
                    mode,
                    tls: None,
                },
                id: ID,
                backing: self.export.config.backing.clone(),
                listener: self.listener.clone(),
                events: Some(self.events_tx.clone()),
                owner: self.owner.clone().recipient(),
                tls: None,
            },
            first_tx,
        );
        let stats = mirror.stats();
        Running {
            mirror: mirror.start(),
            stats,
            first: Some(first_rx),
        }
    }

    /// How the migration ended, as the owner learnt it.
    async fn outcome(&mut self, within: Duration) -> Outcome {
        timeout(within, self.ended.recv())
            .await
            .expect("the migration did not end within the wait")
            .expect("the owner's channel closed")
    }

    async fn expect_event(&mut self, expected: ServerEvent) {
        let got = timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {expected:?} within the wait"))
            .expect("the event channel closed");
        assert_eq!(got, expected);
    }

    async fn expect_no_event(&mut self) {
        if let Ok(event) = timeout(QUIET, self.events.recv()).await {
            panic!("unexpected event: {event:?}");
        }
    }

    async fn doors_open(&self) -> bool {
        listener_status(&self.listener).await.clients_allowed
    }
}

/// A started mirror.
struct Running {
    mirror: Addr<Mirror>,
    stats: Arc<MirrorStats>,
    first: Option<oneshot::Receiver<Result<(), FirstFailure>>>,
}

impl Running {
    /// The result of the first connection attempt (the `mirror` command's answer).
    async fn first(&mut self) -> Result<(), FirstFailure> {
        let rx = self.first.take().expect("the first result is read once");
        timeout(WAIT, rx)
            .await
            .expect("no first result within the wait")
            .expect("the first result was dropped unanswered")
    }

    async fn send(&self, msg: Abandon) -> AbandonAnswer {
        timeout(WAIT, self.mirror.send(msg))
            .await
            .expect("Abandon not answered within the wait")
            .expect("the mirror's mailbox is closed")
    }

    /// `break`.
    async fn abandon(&self) -> AbandonAnswer {
        self.send(Abandon::Break {
            force_source: false,
        })
        .await
    }

    /// `break --force-source`.
    async fn force(&self) -> AbandonAnswer {
        self.send(Abandon::Break { force_source: true }).await
    }

    /// One of the mirror's own status keys.
    fn stat(&self, key: &str) -> String {
        self.stats
            .extra()
            .into_iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no status key {key}"))
            .1
    }
}

// ---------------------------------------------------------------------------------------
// The fake destination.

/// What a fake destination saw on one connection, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Connected,
    Probe,
    Write {
        offset: u64,
        len: u64,
        error: u32,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Handoff {
        request: HandoffRequest,
        source_exists: bool,
    },
    Disc {
        source_exists: bool,
    },
    /// The script closed the connection.
    Dropped,
    /// The mirror closed the connection.
    Eof,
    Unexpected(String),
}

/// How a fake destination behaves on one connection.
#[derive(Clone)]
enum Script {
    /// Closes at once, before the hello.
    Close,
    /// Sends nothing; holds the connection until the mirror closes it.
    Silent,
    /// Sends a hello announcing `size`, then holds the connection.
    Hello {
        size: u64,
    },
    /// Sends a whole hello (152 bytes, at once) whose first magic is wrong, then waits for
    /// the mirror to close: cleanly ([`Seen::Eof`]) if it read the hello whole, with a
    /// reset (reported as [`Seen::Unexpected`]) if it left bytes unread.
    BadMagic {
        size: u64,
    },
    /// Sends the first `bytes` bytes of a good hello, then holds the connection.
    PartialHello {
        size: u64,
        bytes: usize,
    },
    Serve(Serving),
}

/// How a fake destination of ours treats a Commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnCommit {
    /// Answers Committed.
    Commit,
    /// Closes the connection without answering.
    Drop,
    /// Never answers; holds the connection until the mirror closes it.
    Stall,
    /// Answers NotPrepared (a restarted destination, or one that lost the Prepare).
    NotPrepared,
    /// Sends the reply header (error 0) but never the answer behind it.
    HeaderOnly,
}

/// An old-style server with scripted faults.
#[derive(Clone)]
struct Serving {
    size: u64,
    /// Answers the probe with 0 and takes hand-off messages (one of our `listen` servers);
    /// otherwise EINVAL, as C flexnbd.
    ours: bool,
    /// Every WRITE is answered with this error (0: success).
    write_error: u32,
    /// Reads WRITEs but never answers them.
    stall_writes: bool,
    /// Never answers the probe (and reads on).
    stall_probe: bool,
    /// Closes the connection after reading this (1-based) WRITE, without answering it.
    drop_at_write: Option<usize>,
    drop_at_probe: bool,
    /// Answers the probe with this error (neither 0 nor EINVAL: a destination that fails).
    probe_error: Option<u32>,
    drop_at_prepare: bool,
    /// Reads Prepare and never answers it; holds the connection until the mirror closes it.
    stall_prepare: bool,
    on_commit: OnCommit,
    /// After the first WRITE, waits for a permit before answering it (and before reading
    /// anything else).
    gate: Option<Arc<Semaphore>>,
    /// The source file, to record whether it still exists at each hand-off step.
    source: Option<PathBuf>,
    /// What happens to a WRITE at exactly this offset (a client's forwarded write, whose
    /// offset the copy's own writes never have).
    at_offset: Option<(u64, AtOffset)>,
}

/// See [`Serving::at_offset`].
#[derive(Clone)]
enum AtOffset {
    /// The reply waits for a permit (and nothing else is read meanwhile).
    Hold(Arc<Semaphore>),
    /// Answered with this error.
    Fail(u32),
    /// The connection is closed without an answer.
    Drop,
}

impl Serving {
    fn new(size: u64, ours: bool) -> Serving {
        Serving {
            size,
            ours,
            write_error: 0,
            stall_writes: false,
            stall_probe: false,
            drop_at_write: None,
            drop_at_probe: false,
            probe_error: None,
            drop_at_prepare: false,
            stall_prepare: false,
            on_commit: OnCommit::Commit,
            gate: None,
            source: None,
            at_offset: None,
        }
    }

    fn source_exists(&self) -> bool {
        self.source.as_ref().is_none_or(|p| p.exists())
    }
}

struct Log {
    conn: usize,
    tx: UnboundedSender<(usize, Seen)>,
}

impl Log {
    fn note(&self, seen: Seen) {
        let _ = self.tx.send((self.conn, seen));
    }
}

struct Dest {
    addr: SocketAddr,
    image: Arc<Mutex<Vec<u8>>>,
    rx: UnboundedReceiver<(usize, Seen)>,
    seen: Vec<(usize, Seen)>,
}

impl Dest {
    /// Listens on a fresh loopback port; connection `i` follows `scripts[i]` (the last
    /// script for every later one).
    async fn start(image_size: u64, scripts: Vec<Script>) -> Dest {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = server.local_addr().expect("local addr");
        let image = Arc::new(Mutex::new(vec![FILL; image_size as usize]));
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = image.clone();
        tokio::spawn(async move {
            for conn in 0.. {
                let Ok((sock, _)) = server.accept().await else {
                    return;
                };
                let script = scripts[conn.min(scripts.len() - 1)].clone();
                let log = Log {
                    conn,
                    tx: tx.clone(),
                };
                tokio::spawn(run_script(sock, script, shared.clone(), log));
            }
        });
        Dest {
            addr,
            image,
            rx,
            seen: Vec::new(),
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn image(&self) -> Vec<u8> {
        self.image.lock().expect("image lock").clone()
    }

    /// Takes what has been reported so far, without waiting.
    fn poll(&mut self) {
        while let Ok(item) = self.rx.try_recv() {
            self.seen.push(item);
        }
    }

    fn saw(&mut self, conn: usize, what: &Seen) -> bool {
        self.poll();
        self.seen.iter().any(|(c, s)| *c == conn && s == what)
    }

    /// Waits (at most `within`) until connection `conn` reports something matching.
    async fn wait_for(&mut self, conn: usize, within: Duration, what: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.poll();
            if self.seen.iter().any(|(c, s)| *c == conn && what(s)) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.rx.recv()).await {
                Ok(Some(item)) => self.seen.push(item),
                Ok(None) => panic!("the fake destination stopped"),
                Err(_) => panic!(
                    "connection {conn} did not report what the test waits for within {within:?}; seen: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Everything connection `conn` reported so far, in order.
    fn conn(&mut self, conn: usize) -> Vec<Seen> {
        self.poll();
        self.seen
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn connections(&mut self) -> usize {
        self.poll();
        self.seen
            .iter()
            .filter(|(_, s)| *s == Seen::Connected)
            .count()
    }
}

async fn run_script(mut sock: TcpStream, script: Script, image: Arc<Mutex<Vec<u8>>>, log: Log) {
    log.note(Seen::Connected);
    let end = match script {
        Script::Close => Seen::Dropped,
        Script::Silent => wait_for_close(&mut sock).await,
        Script::Hello { size } => {
            let hello = OldstyleHello {
                size,
                flags: tflags::FLEXNBD_COMPAT,
            };
            match sock.write_all(&hello.encode()).await {
                Ok(()) => wait_for_close(&mut sock).await,
                Err(_) => Seen::Eof,
            }
        }
        Script::BadMagic { size } => bad_magic_hello(&mut sock, size).await,
        Script::PartialHello { size, bytes } => {
            let hello = OldstyleHello {
                size,
                flags: tflags::FLEXNBD_COMPAT,
            };
            match sock.write_all(&hello.encode()[..bytes]).await {
                Ok(()) => wait_for_close(&mut sock).await,
                Err(_) => Seen::Eof,
            }
        }
        Script::Serve(serving) => serve(&mut sock, &serving, &image, &log).await,
    };
    log.note(end);
}

/// See [`Script::BadMagic`]. A socket closed with unread bytes in its receive queue sends
/// a reset instead of a FIN, so the peer's read fails instead of returning 0.
async fn bad_magic_hello(sock: &mut TcpStream, size: u64) -> Seen {
    let mut hello = OldstyleHello {
        size,
        flags: tflags::FLEXNBD_COMPAT,
    }
    .encode();
    assert_eq!(hello.len(), OLDSTYLE_HELLO_LEN);
    hello[..8].copy_from_slice(b"NOTNBD!!");
    if let Err(e) = sock.write_all(&hello).await {
        return Seen::Unexpected(format!("writing the hello failed: {e}"));
    }
    let mut buf = [0u8; 64];
    let end = match timeout(WAIT, sock.read(&mut buf)).await {
        Err(_) => return Seen::Unexpected("the mirror never closed the connection".into()),
        Ok(Ok(0)) => Seen::Eof,
        Ok(Ok(n)) => return Seen::Unexpected(format!("the mirror sent {n} bytes")),
        Ok(Err(e)) => return Seen::Unexpected(format!("the connection was reset: {e}")),
    };
    match socket2::SockRef::from(&*sock).take_error() {
        Ok(None) => end,
        Ok(Some(e)) | Err(e) => Seen::Unexpected(format!("the socket has an error: {e}")),
    }
}

/// Holds the connection, reading nothing meaningful, until the peer closes it.
async fn wait_for_close(sock: &mut TcpStream) -> Seen {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, sock.read(&mut buf)).await {
            Err(_) => return Seen::Unexpected("the mirror never closed the connection".into()),
            Ok(Ok(0)) | Ok(Err(_)) => return Seen::Eof,
            Ok(Ok(_)) => {}
        }
    }
}

async fn read_bytes(sock: &mut TcpStream, len: usize) -> Result<Vec<u8>, Seen> {
    let mut buf = vec![0u8; len];
    match timeout(WAIT, sock.read_exact(&mut buf)).await {
        Err(_) => Err(Seen::Unexpected(format!(
            "{len} bytes did not arrive within the wait"
        ))),
        Ok(Err(_)) => Err(Seen::Eof),
        Ok(Ok(_)) => Ok(buf),
    }
}

/// Serves one connection; returns how it ended.
async fn serve(sock: &mut TcpStream, s: &Serving, image: &Mutex<Vec<u8>>, log: &Log) -> Seen {
    let hello = OldstyleHello {
        size: s.size,
        flags: tflags::FLEXNBD_COMPAT,
    };
    if sock.write_all(&hello.encode()).await.is_err() {
        return Seen::Eof;
    }
    let mut writes = 0;
    loop {
        let head = match read_bytes(sock, COMPACT_REQUEST_LEN).await {
            Ok(head) => head,
            Err(Seen::Unexpected(_)) => {
                return Seen::Unexpected("no request and no close within the wait".into())
            }
            Err(end) => return end,
        };
        let Header::Request(req) = decode_header(&head, HeaderStyle::Compact) else {
            return Seen::Unexpected(format!("a request with a bad magic: {head:02x?}"));
        };
        let in_range = req
            .offset
            .checked_add(req.length)
            .is_some_and(|end| end <= s.size);
        let error = match req.command {
            Command::Write => {
                let data = match read_bytes(sock, req.length as usize).await {
                    Ok(data) => data,
                    Err(end) => return end,
                };
                writes += 1;
                if s.drop_at_write == Some(writes) {
                    return Seen::Dropped;
                }
                if !in_range {
                    return Seen::Unexpected(format!("{req:?} is out of range"));
                }
                let special = match &s.at_offset {
                    Some((at, what)) if *at == req.offset => Some(what.clone()),
                    _ => None,
                };
                match special {
                    Some(AtOffset::Drop) => {
                        log.note(Seen::Write {
                            offset: req.offset,
                            len: req.length,
                            error: u32::MAX,
                        });
                        return Seen::Dropped;
                    }
                    Some(AtOffset::Fail(error)) => {
                        log.note(Seen::Write {
                            offset: req.offset,
                            len: req.length,
                            error,
                        });
                        let reply = simple_reply(req.cookie, Some(Errno(error)));
                        if sock.write_all(&reply).await.is_err() {
                            return Seen::Eof;
                        }
                        continue;
                    }
                    Some(AtOffset::Hold(gate)) => {
                        let at = req.offset as usize;
                        image.lock().expect("image lock")[at..at + data.len()]
                            .copy_from_slice(&data);
                        log.note(Seen::Write {
                            offset: req.offset,
                            len: req.length,
                            error: 0,
                        });
                        if let Ok(Ok(permit)) = timeout(WAIT, gate.acquire()).await {
                            permit.forget();
                        }
                        let reply = simple_reply(req.cookie, None);
                        if sock.write_all(&reply).await.is_err() {
                            return Seen::Eof;
                        }
                        continue;
                    }
                    None => {}
                }
                if s.write_error == 0 {
                    let at = req.offset as usize;
                    image.lock().expect("image lock")[at..at + data.len()].copy_from_slice(&data);
                }
                log.note(Seen::Write {
                    offset: req.offset,
                    len: req.length,
                    error: s.write_error,
                });
                if writes == 1 {
                    if let Some(gate) = &s.gate {
                        if let Ok(Ok(permit)) = timeout(WAIT, gate.acquire()).await {
                            permit.forget();
                        }
                    }
                }
                if s.stall_writes {
                    continue;
                }
                s.write_error
            }
            Command::WriteZeroes => {
                if !in_range {
                    return Seen::Unexpected(format!("{req:?} is out of range"));
                }
                let at = req.offset as usize;
                image.lock().expect("image lock")[at..at + req.length as usize].fill(0);
                log.note(Seen::Zeroes {
                    offset: req.offset,
                    len: req.length,
                });
                0
            }
            Command::Unknown(PROBE) => {
                log.note(Seen::Probe);
                if s.drop_at_probe {
                    return Seen::Dropped;
                }
                if s.stall_probe {
                    continue;
                }
                if let Some(error) = s.probe_error {
                    error
                } else if s.ours {
                    0
                } else {
                    Errno::EINVAL.0
                }
            }
            Command::Unknown(HANDOFF) if s.ours => {
                let body = match read_bytes(sock, req.length as usize).await {
                    Ok(body) => body,
                    Err(end) => return end,
                };
                let request = match HandoffRequest::decode(&body) {
                    Ok(request) => request,
                    Err(e) => return Seen::Unexpected(format!("a bad hand-off message: {e}")),
                };
                log.note(Seen::Handoff {
                    request,
                    source_exists: s.source_exists(),
                });
                let answer = match request {
                    HandoffRequest::Prepare { .. } if s.drop_at_prepare => return Seen::Dropped,
                    HandoffRequest::Prepare { .. } if s.stall_prepare => {
                        return wait_for_close(sock).await
                    }
                    HandoffRequest::Prepare { id, size } if size == s.size => {
                        HandoffReply::Prepared { id }
                    }
                    HandoffRequest::Prepare { .. } => HandoffReply::Refused {
                        reason: "size".into(),
                    },
                    // A destination of ours echoes the id and attempt it was given.
                    HandoffRequest::Join { id, attempt, .. } => {
                        HandoffReply::Joined { id, attempt }
                    }
                    HandoffRequest::Commit { id } => match s.on_commit {
                        OnCommit::Commit => HandoffReply::Committed { id },
                        OnCommit::NotPrepared => HandoffReply::NotPrepared { id },
                        OnCommit::Drop => return Seen::Dropped,
                        OnCommit::Stall => return wait_for_close(sock).await,
                        OnCommit::HeaderOnly => {
                            let header = simple_reply(req.cookie, None);
                            if sock.write_all(&header).await.is_err() {
                                return Seen::Eof;
                            }
                            return wait_for_close(sock).await;
                        }
                    },
                };
                let mut out = simple_reply(req.cookie, None).to_vec();
                out.extend_from_slice(&encode_answer(&answer));
                if sock.write_all(&out).await.is_err() {
                    return Seen::Eof;
                }
                continue;
            }
            // The mirror flushes before its final pass, as any server would answer it.
            Command::Flush => 0,
            // Who we are: these fakes answer as a server that is not ours would (C flexnbd
            // answers EINVAL); the identity check has tests of its own.
            Command::Unknown(IDENTIFY) => Errno::EINVAL.0,
            Command::Disconnect => {
                log.note(Seen::Disc {
                    source_exists: s.source_exists(),
                });
                return match read_bytes(sock, 1).await {
                    Err(end) => end,
                    Ok(_) => Seen::Unexpected("bytes after the DISC".into()),
                };
            }
            other => return Seen::Unexpected(format!("an unexpected request {other:?}")),
        };
        let reply = simple_reply(req.cookie, (error != 0).then_some(Errno(error)));
        if sock.write_all(&reply).await.is_err() {
            return Seen::Eof;
        }
    }
}

/// The ranges written (as data or zero ranges) on one connection.
fn transfers(seen: &[Seen]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = seen
        .iter()
        .filter_map(|s| match *s {
            Seen::Write {
                offset,
                len,
                error: 0,
            } => Some((offset, len)),
            Seen::Zeroes { offset, len } => Some((offset, len)),
            _ => None,
        })
        .collect();
    ranges.sort_unstable();
    ranges
}

/// Fails unless the transfers tile `[0, size)` exactly once.
fn assert_tiles(seen: &[Seen], size: u64) {
    let mut at = 0;
    for (offset, len) in transfers(seen) {
        assert_eq!(offset, at, "a gap or an overlap at {at}: {seen:?}");
        at += len;
    }
    assert_eq!(at, size, "the transfers do not cover the export: {seen:?}");
}

fn assert_same_image(got: &[u8], expected: &[u8]) {
    assert_eq!(got.len(), expected.len());
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "the destination's image differs from the source from byte {at} (got {:#04x}, expected {:#04x})",
            got[at], expected[at]
        );
    }
}

/// The hand-off messages one connection carried, in order.
fn handoffs(seen: &[Seen]) -> Vec<HandoffRequest> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Handoff { request, .. } => Some(*request),
            _ => None,
        })
        .collect()
}

/// The first message on every connection of ours: connection number `attempt`.
fn join(attempt: u64, purpose: JoinPurpose) -> HandoffRequest {
    HandoffRequest::Join {
        id: ID,
        attempt,
        purpose,
    }
}

/// A 4 MiB export with data, a 1 MiB hole, data.
fn small_source() -> Source {
    Source::new(4 * MIB, &[(MIB, MIB)])
}

// ---------------------------------------------------------------------------------------
// Completed migrations.

#[actix::test]
async fn a_legacy_destination_gets_the_whole_image_then_a_disc() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    // A client of the source: closed at the final pass.
    let mut client = expect_admitted(src.addr, &src.export).await;
    let mut dest = Dest::start(size, vec![Script::Serve(Serving::new(size, false))]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);

    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    dest.wait_for(0, WAIT, |s| *s == Seen::Eof).await;
    client.expect_eof().await;

    let seen = dest.conn(0);
    assert_eq!(seen[..2], [Seen::Connected, Seen::Probe], "{seen:?}");
    assert_eq!(
        seen[seen.len() - 2..],
        [
            Seen::Disc {
                source_exists: true
            },
            Seen::Eof
        ],
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| matches!(s, Seen::Zeroes { .. } | Seen::Handoff { .. })),
        "a legacy destination that does not advertise WRITE_ZEROES got {seen:?}"
    );
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(dest.connections(), 1);
    assert_eq!(run.stats.phase(), Phase::Completed);
    assert_eq!(run.stat("migration_bytes_sent"), size.to_string());
    assert_eq!(run.stat("migration_attempt"), "1");
}

/// Between two of our servers: Prepare, then (with `unlink`) the source file is removed,
/// then Commit; the same id throughout, no DISC.
#[actix::test]
async fn our_destination_gets_prepare_then_commit_and_the_file_goes_in_between() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let serving = Serving {
        source: Some(src.path()),
        ..Serving::new(size, true)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(serving)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Unlink);

    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Unlink)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    dest.wait_for(0, WAIT, |s| *s == Seen::Eof).await;

    let seen = dest.conn(0);
    assert_eq!(
        seen[..3],
        [
            Seen::Connected,
            Seen::Probe,
            Seen::Handoff {
                request: join(1, JoinPurpose::Copy),
                source_exists: true,
            }
        ],
        "{seen:?}"
    );
    let n = seen.len();
    assert_eq!(
        seen[n - 3..],
        [
            Seen::Handoff {
                request: HandoffRequest::Prepare { id: ID, size },
                source_exists: true,
            },
            Seen::Handoff {
                request: HandoffRequest::Commit { id: ID },
                source_exists: false,
            },
            Seen::Eof,
        ],
        "{seen:?}"
    );
    assert_tiles(&seen[..n - 3], size);
    assert_same_image(&dest.image(), &expected);
    assert!(!src.path().exists(), "the source file was not removed");
    let sent: u64 = run.stat("migration_bytes_sent").parse().expect("number");
    let zeroed: u64 = run.stat("migration_bytes_zeroed").parse().expect("number");
    assert_eq!(sent + zeroed, size);
    assert_eq!(run.stats.phase(), Phase::Completed);
}

/// Action `nothing`: the copy completes, no hand-off, the source keeps serving.
#[actix::test]
async fn action_nothing_copies_without_a_hand_off_and_reopens_the_doors() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let mut dest = Dest::start(size, vec![Script::Serve(Serving::new(size, true))]).await;
    let mut run = src.start(dest.port(), MirrorAction::Nothing);

    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Nothing)
    );
    dest.wait_for(0, WAIT, |s| *s == Seen::Eof).await;
    let seen = dest.conn(0);
    assert!(
        !seen.iter().any(|s| matches!(s, Seen::Disc { .. })),
        "action nothing handed over: {seen:?}"
    );
    assert_eq!(
        handoffs(&seen),
        [join(1, JoinPurpose::Copy)],
        "action nothing handed over: {seen:?}"
    );
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    src.expect_no_event().await;
    assert!(src.doors_open().await, "the doors stayed closed");
    expect_admitted(src.addr, &src.export).await;
    // Abandon after completion: answered "completed" (the actor may already be gone).
    let abandon = Abandon::Break {
        force_source: false,
    };
    if let Ok(Ok(answer)) = timeout(WAIT, run.mirror.send(abandon)).await {
        assert_eq!(answer, AbandonAnswer::Completed);
    }
}

/// flexnbd §13.2 and docs/migration.md: "The source never serves writes after Prepared: its
/// doors stay closed." After a completed `exit`/`unlink` hand-off the destination has
/// control, so the source must not admit a client (which could write to a copy that is no
/// longer authoritative) while main shuts it down. (`Run::run` creates an `OpenDoors`
/// request after every attempt; it is only not delivered because actix drops a message
/// whose response future was dropped before the listener handled it.)
#[actix::test]
async fn the_doors_stay_closed_after_a_completed_hand_off() {
    let mut src = small_source();
    let size = src.size();
    let dest = Dest::start(size, vec![Script::Serve(Serving::new(size, true))]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    sleep(QUIET).await;
    assert!(
        !src.doors_open().await,
        "the source admits clients again after handing over"
    );
    expect_no_hello(src.addr).await;
}

/// Writes made by a client while the sweep is under way reach the destination: the
/// destination holds its first reply until the client has written over data the sweep has
/// already sent.
#[actix::test]
async fn writes_during_the_copy_reach_the_destination() {
    // 36 MiB, mostly a hole: more requests than the mirror keeps in flight (1 MiB
    // zero-filled writes, or 4 MiB writes if the filesystem has no holes), so the sweep
    // cannot finish while the first reply is held.
    let size = 36 * MIB;
    let mut src = Source::new(size, &[(MIB, 34 * MIB)]);
    let mut client = expect_admitted(src.addr, &src.export).await;
    let gate = Arc::new(Semaphore::new(0));
    let serving = Serving {
        gate: Some(gate.clone()),
        ..Serving::new(size, false)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(serving)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| matches!(s, Seen::Write { offset: 0, .. }))
        .await;

    // The block at 0 has been read and sent; now the client changes it, and a block in
    // the hole.
    let early = marker(0x11, 8192);
    let late = marker(0x22, 4096);
    let mut batch = write_req(0x31, 4096, &early);
    batch.extend(write_req(0x32, 20 * MIB, &late));
    client.send(&batch).await;
    let answers = client.answers(&[(0x31, 0), (0x32, 0)]).await;
    assert_eq!((answers[&0x31].error, answers[&0x32].error), (0, 0));
    assert!(
        src.doors_open().await,
        "the doors closed before the sweep ended"
    );
    gate.add_permits(1);

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    client.expect_eof().await;
    // The block at 4096 went out again, after the first write that covered it.
    let resent = dest
        .conn(0)
        .iter()
        .filter(|s| matches!(s, Seen::Write { offset, len, error: 0 } if *offset <= 4096 && 4096 < offset + len))
        .count();
    assert!(
        resent >= 2,
        "the dirty block was sent only {resent} time(s)"
    );
    let image = dest.image();
    assert_eq!(image[4096..4096 + early.len()], early[..]);
    let at = 20 * MIB as usize;
    assert_eq!(image[at..at + late.len()], late[..]);
    assert_same_image(&image, &src.contents());
}

// ---------------------------------------------------------------------------------------
// Failures after the first connection: retried.

#[actix::test]
async fn a_connection_dropped_mid_copy_is_retried_from_scratch() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let dropping = Serving {
        drop_at_write: Some(1),
        ..Serving::new(size, false)
    };
    let scripts = vec![
        Script::Serve(dropping),
        Script::Serve(Serving::new(size, false)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);

    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    assert_eq!(
        dest.conn(0),
        [Seen::Connected, Seen::Probe, Seen::Dropped],
        "the first connection"
    );
    let seen = dest.conn(1);
    assert_eq!(seen[..2], [Seen::Connected, Seen::Probe], "{seen:?}");
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(run.stat("migration_attempt"), "2");
}

#[actix::test]
async fn a_refused_write_fails_the_attempt_and_it_is_retried() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let failing = Serving {
        write_error: Errno::EIO.0,
        ..Serving::new(size, false)
    };
    let scripts = vec![
        Script::Serve(failing),
        Script::Serve(Serving::new(size, false)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);

    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    let first = dest.conn(0);
    assert!(
        first.iter().any(|s| matches!(
            s,
            Seen::Write { error, .. } if *error == Errno::EIO.0
        )),
        "{first:?}"
    );
    assert!(
        !first.iter().any(|s| matches!(s, Seen::Disc { .. })),
        "handed over after a refused write: {first:?}"
    );
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    assert_tiles(&dest.conn(1), size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(run.stat("migration_attempt"), "2");
}

/// A failure in the final pass (the link breaks at Prepare) reopens the doors before the
/// retry, and the retry completes.
#[actix::test]
async fn a_failed_final_pass_reopens_the_doors_before_retrying() {
    let mut src = small_source();
    let size = src.size();
    let failing = Serving {
        drop_at_prepare: true,
        ..Serving::new(size, true)
    };
    let scripts = vec![
        Script::Serve(failing),
        Script::Serve(Serving::new(size, true)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    dest.wait_for(0, WAIT, |s| *s == Seen::Dropped).await;
    // The doors were closed for the final pass; they must reopen before the next
    // connection (the retry waits a second).
    let deadline = Instant::now() + WAIT;
    while !src.doors_open().await {
        assert!(
            dest.connections() < 2,
            "the retry started while the doors were still closed"
        );
        assert!(Instant::now() < deadline, "the doors never reopened");
        sleep(Duration::from_millis(10)).await;
    }
    expect_admitted(src.addr, &src.export).await;

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    let seen = dest.conn(1);
    assert_eq!(
        handoffs(&seen),
        [
            join(2, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size },
            HandoffRequest::Commit { id: ID }
        ]
    );
    assert_eq!(run.stat("migration_attempt"), "2");
}

/// The link breaks after Prepared, before Committed: in doubt. The source keeps its doors
/// closed, reconnects and resends only the Commit, with the same id.
#[actix::test]
async fn a_commit_lost_in_doubt_is_resent_on_a_new_connection() {
    let mut src = small_source();
    let size = src.size();
    let failing = Serving {
        on_commit: OnCommit::Drop,
        ..Serving::new(size, true)
    };
    let scripts = vec![
        Script::Serve(failing),
        Script::Serve(Serving::new(size, true)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    dest.wait_for(0, WAIT, |s| *s == Seen::Dropped).await;
    assert_eq!(run.stats.phase(), Phase::InDoubt);
    assert!(!src.doors_open().await, "the doors reopened while in doubt");
    expect_no_hello(src.addr).await;

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    assert_eq!(
        dest.conn(1),
        [
            Seen::Connected,
            Seen::Probe,
            Seen::Handoff {
                request: join(2, JoinPurpose::Commit),
                source_exists: true,
            },
            Seen::Handoff {
                request: HandoffRequest::Commit { id: ID },
                source_exists: true,
            },
            Seen::Eof
        ]
    );
}

/// A destination that sends its hello and then never answers (not even the probe): the
/// inactivity limit fails the attempt and it is retried; `break` then abandons, and the
/// doors are open.
#[actix::test]
async fn a_silent_destination_is_retried_until_abandoned() {
    let stalling = Serving {
        stall_probe: true,
        ..Serving::new(4 * MIB, false)
    };
    stalled_then_abandoned(stalling).await;
}

/// The same after the destination has answered the probe: it reads the WRITEs but answers
/// none. The reader applies the inactivity limit only if a request was pending when it
/// started waiting for the next reply; after the probe's answer nothing is, so the stall
/// is never detected and the attempt waits forever in the final pass (doors closed).
#[actix::test]
async fn a_destination_that_stops_answering_writes_is_retried_until_abandoned() {
    let stalling = Serving {
        stall_writes: true,
        ..Serving::new(4 * MIB, false)
    };
    stalled_then_abandoned(stalling).await;
}

async fn stalled_then_abandoned(stalling: Serving) {
    let mut src = small_source();
    let mut dest = Dest::start(src.size(), vec![Script::Serve(stalling)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    // Limit (2 s) + retry delay (1 s).
    dest.wait_for(1, WAIT, |s| *s == Seen::Connected).await;
    assert!(
        dest.conn(0).contains(&Seen::Eof),
        "the stalled connection was not closed: {:?}",
        dest.conn(0)
    );
    assert_eq!(run.stat("migration_attempt"), "2");

    assert_eq!(
        run.abandon().await,
        AbandonAnswer::Stopped,
        "an abandoned migration is not completed"
    );
    assert_eq!(src.outcome(WAIT).await, Outcome::Abandoned);
    assert_eq!(run.stats.phase(), Phase::Abandoned);
    assert!(
        src.doors_open().await,
        "the doors stayed closed after break"
    );
    expect_admitted(src.addr, &src.export).await;
    src.expect_no_event().await;
    assert!(!dest.saw(
        0,
        &Seen::Disc {
            source_exists: true
        }
    ));
}

/// After a first good connection, a destination that sends no hello fails the attempt
/// within the hello timeout (5 s), and it is retried.
#[actix::test]
async fn a_destination_that_sends_no_hello_after_a_restart_is_retried() {
    let mut src = small_source();
    let size = src.size();
    let dropping = Serving {
        drop_at_probe: true,
        ..Serving::new(size, false)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(dropping), Script::Silent]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    // Retry delay + hello timeout + retry delay.
    dest.wait_for(2, 2 * WAIT, |s| *s == Seen::Connected).await;
    assert_eq!(dest.conn(1), [Seen::Connected, Seen::Eof]);
    assert_eq!(run.stat("migration_attempt"), "3");

    assert_eq!(run.abandon().await, AbandonAnswer::Stopped);
    assert_eq!(src.outcome(WAIT).await, Outcome::Abandoned);
    assert!(src.doors_open().await);
    src.expect_no_event().await;
}

// ---------------------------------------------------------------------------------------
// First-attempt failures: reported to the `mirror` command, not retried.

/// Returns the fake destination (if any) and how long the first result took.
async fn first_attempt_fails(
    script: Option<Script>,
    expected: FirstFailure,
) -> (Option<Dest>, Duration) {
    let mut src = small_source();
    let (port, dest) = match script {
        Some(script) => {
            let dest = Dest::start(src.size(), vec![script]).await;
            (dest.port(), Some(dest))
        }
        None => {
            // A port nobody listens on.
            let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = socket.local_addr().expect("local addr").port();
            drop(socket);
            (port, None)
        }
    };
    let started = Instant::now();
    let mut run = src.start(port, MirrorAction::Exit);
    assert_eq!(run.first().await, Err(expected));
    let took = started.elapsed();
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::FirstAttemptFailed(expected)
    );
    src.expect_no_event().await;
    assert!(src.doors_open().await);
    expect_admitted(src.addr, &src.export).await;
    let dest = dest.map(|mut dest| {
        assert_eq!(dest.connections(), 1, "a failed first attempt was retried");
        dest
    });
    (dest, took)
}

#[actix::test]
async fn nothing_listening_is_a_connect_failure() {
    first_attempt_fails(None, FirstFailure::Connect).await;
}

#[actix::test]
async fn a_size_mismatch_is_reported() {
    first_attempt_fails(
        Some(Script::Hello {
            size: 4 * MIB + 512,
        }),
        FirstFailure::SizeMismatch,
    )
    .await;
}

#[actix::test]
async fn an_immediate_close_is_a_rejection() {
    first_attempt_fails(Some(Script::Close), FirstFailure::Rejected).await;
}

#[actix::test]
async fn no_hello_within_five_seconds_is_reported() {
    let (_, took) = first_attempt_fails(Some(Script::Silent), FirstFailure::NoHello).await;
    assert!(
        (Duration::from_millis(4500)..Duration::from_secs(7)).contains(&took),
        "answered after {took:?}"
    );
    assert_eq!(
        FirstFailure::NoHello.text(),
        "Remote server failed to respond"
    );
}

/// flexnbd §10.2: a hello with a wrong magic is read whole before it is rejected, so the
/// destination does not see its hello cut off (a reset, had bytes been left unread).
#[actix::test]
async fn a_hello_with_a_wrong_magic_is_read_whole_then_rejected() {
    let script = Script::BadMagic { size: 4 * MIB };
    let (dest, took) = first_attempt_fails(Some(script), FirstFailure::Rejected).await;
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert_eq!(FirstFailure::Rejected.text(), "Mirror was rejected");
    let mut dest = dest.expect("a destination");
    dest.wait_for(0, WAIT, |s| matches!(s, Seen::Eof | Seen::Unexpected(_)))
        .await;
    assert_eq!(dest.conn(0), [Seen::Connected, Seen::Eof]);
}

/// A hello cut short that then stalls is a bad hello, not a silent destination: rejected
/// at the hello deadline.
#[actix::test]
async fn a_hello_cut_short_is_rejected_at_the_deadline() {
    let script = Script::PartialHello {
        size: 4 * MIB,
        bytes: 100,
    };
    let (dest, took) = first_attempt_fails(Some(script), FirstFailure::Rejected).await;
    assert!(
        (Duration::from_millis(4500)..Duration::from_secs(7)).contains(&took),
        "answered after {took:?}"
    );
    let mut dest = dest.expect("a destination");
    dest.wait_for(0, WAIT, |s| *s == Seen::Eof).await;
    assert_eq!(dest.conn(0), [Seen::Connected, Seen::Eof]);
}

// ---------------------------------------------------------------------------------------
// The hand-off with one of ours: `break`, proof of no control, in doubt.

/// Waits until the doors are open again, checking on the way that no further connection
/// was made while they were closed (`connections` so far) and that this side has control
/// once they are open.
async fn expect_doors_reopened_before_retry(
    src: &Source,
    dest: &mut Dest,
    run: &Running,
    connections: usize,
) {
    let deadline = Instant::now() + WAIT;
    while !src.doors_open().await {
        assert_eq!(
            dest.connections(),
            connections,
            "the retry started while the doors were still closed"
        );
        assert!(Instant::now() < deadline, "the doors never reopened");
        sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(dest.connections(), connections, "the doors reopened late");
    assert!(run.stats.has_control(), "serving again without control");
    assert_eq!(run.stat("handoff_phase"), "serving");
}

/// `break` before the Commit is written (the destination holds the Prepare): the
/// migration stops, the doors reopen, this side has control and no Commit is ever sent.
#[actix::test]
async fn break_before_the_commit_stops_and_reopens_the_doors() {
    let mut src = small_source();
    let size = src.size();
    let stalling = Serving {
        stall_prepare: true,
        ..Serving::new(size, true)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(stalling)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| {
        matches!(
            s,
            Seen::Handoff {
                request: HandoffRequest::Prepare { .. },
                ..
            }
        )
    })
    .await;
    assert!(!src.doors_open().await, "the final pass closes the doors");
    assert!(run.stats.has_control(), "Prepare moves no authority");

    assert_eq!(run.abandon().await, AbandonAnswer::Stopped);
    assert_eq!(src.outcome(WAIT).await, Outcome::Abandoned);
    assert!(
        src.doors_open().await,
        "the doors stayed closed after break"
    );
    expect_admitted(src.addr, &src.export).await;
    assert!(run.stats.has_control());
    assert_eq!(run.stat("handoff_phase"), "stopped");
    src.expect_no_event().await;
    dest.wait_for(0, WAIT, |s| *s == Seen::Eof).await;
    let seen = dest.conn(0);
    assert_eq!(
        handoffs(&seen),
        [
            join(1, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size }
        ],
        "{seen:?}"
    );
    assert_eq!(dest.connections(), 1);
}

/// Once the Commit is written, `break` is refused with a reason and the mirror goes on
/// (in doubt: doors closed, no control, reconnecting with a higher attempt to resend the
/// Commit); `break --force-source` then stops it and reopens the doors.
#[actix::test]
async fn break_while_the_commit_is_outstanding_is_refused_until_forced() {
    let mut src = small_source();
    let size = src.size();
    let stalling = Serving {
        on_commit: OnCommit::Stall,
        ..Serving::new(size, true)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(stalling)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    let commit = Seen::Handoff {
        request: HandoffRequest::Commit { id: ID },
        source_exists: true,
    };
    dest.wait_for(0, WAIT, |s| *s == commit).await;
    assert!(!run.stats.has_control(), "the Commit may have landed");
    assert_eq!(run.stat("handoff_phase"), "in_doubt");

    match run.abandon().await {
        AbandonAnswer::Refused(why) => assert!(why.contains("in doubt"), "{why}"),
        other => panic!("break while in doubt: {other:?}"),
    }
    // Nothing changed: the doors stay closed, the migration goes on.
    assert!(!run.stats.has_control());
    assert!(!src.doors_open().await);
    expect_no_hello(src.addr).await;
    if let Ok(outcome) = timeout(QUIET, src.ended.recv()).await {
        panic!("the migration ended after a refused break: {outcome:?}");
    }
    // The hand-off limit (5 s) fails the connection; the mirror reconnects, as attempt 2,
    // only to resend the Commit.
    dest.wait_for(1, 2 * WAIT, |s| *s == commit).await;
    assert!(dest.conn(0).contains(&Seen::Eof), "{:?}", dest.conn(0));
    assert_eq!(
        handoffs(&dest.conn(1)),
        [
            join(2, JoinPurpose::Commit),
            HandoffRequest::Commit { id: ID }
        ]
    );
    assert_eq!(run.stats.phase(), Phase::InDoubt);
    assert!(matches!(run.abandon().await, AbandonAnswer::Refused(_)));
    assert!(!src.doors_open().await);

    assert_eq!(run.force().await, AbandonAnswer::Stopped);
    assert_eq!(src.outcome(WAIT).await, Outcome::Abandoned);
    assert!(
        src.doors_open().await,
        "the doors stayed closed after a forced break"
    );
    expect_admitted(src.addr, &src.export).await;
    assert!(run.stats.has_control());
    src.expect_no_event().await;
}

/// A destination that answers the Commit with NotPrepared proves that it did not take
/// control: the source serves again (doors open, control) and retries from scratch.
#[actix::test]
async fn not_prepared_makes_the_source_serve_again_and_retry() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let refusing = Serving {
        on_commit: OnCommit::NotPrepared,
        ..Serving::new(size, true)
    };
    let scripts = vec![
        Script::Serve(refusing),
        Script::Serve(Serving::new(size, true)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    dest.wait_for(0, WAIT, |s| {
        *s == Seen::Handoff {
            request: HandoffRequest::Commit { id: ID },
            source_exists: true,
        }
    })
    .await;
    expect_doors_reopened_before_retry(&src, &mut dest, &run, 1).await;
    let mut client = expect_admitted(src.addr, &src.export).await;

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    client.expect_eof().await;
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    let first = dest.conn(0);
    assert_eq!(
        handoffs(&first),
        [
            join(1, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size },
            HandoffRequest::Commit { id: ID }
        ],
        "{first:?}"
    );
    let seen = dest.conn(1);
    assert_eq!(
        handoffs(&seen),
        [
            join(2, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size },
            HandoffRequest::Commit { id: ID }
        ],
        "{seen:?}"
    );
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(run.stat("migration_attempt"), "2");
    assert!(!run.stats.has_control());
}

/// The destination restarts while the Commit is outstanding (the connection ends): the
/// source is in doubt; on its next connection the restarted destination joins it and
/// answers the resent Commit with NotPrepared, so the source serves again and retries.
#[actix::test]
async fn a_restarted_destination_proves_no_control_and_the_source_retries() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let dropping = Serving {
        on_commit: OnCommit::Drop,
        ..Serving::new(size, true)
    };
    let restarted = Serving {
        on_commit: OnCommit::NotPrepared,
        ..Serving::new(size, true)
    };
    let scripts = vec![
        Script::Serve(dropping),
        Script::Serve(restarted),
        Script::Serve(Serving::new(size, true)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));

    dest.wait_for(0, WAIT, |s| *s == Seen::Dropped).await;
    assert!(!run.stats.has_control(), "in doubt");
    assert!(!src.doors_open().await, "the doors reopened while in doubt");
    dest.wait_for(1, WAIT, |s| *s == Seen::Eof).await;
    assert_eq!(
        dest.conn(1),
        [
            Seen::Connected,
            Seen::Probe,
            Seen::Handoff {
                request: join(2, JoinPurpose::Commit),
                source_exists: true,
            },
            Seen::Handoff {
                request: HandoffRequest::Commit { id: ID },
                source_exists: true,
            },
            Seen::Eof
        ]
    );
    expect_doors_reopened_before_retry(&src, &mut dest, &run, 2).await;

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    dest.wait_for(2, WAIT, |s| *s == Seen::Eof).await;
    let seen = dest.conn(2);
    assert_eq!(
        handoffs(&seen),
        [
            join(3, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size },
            HandoffRequest::Commit { id: ID }
        ],
        "{seen:?}"
    );
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(run.stat("migration_attempt"), "3");
}

/// A probe answered with an error other than 0 (ours) or EINVAL (C flexnbd) is a
/// destination that fails: the attempt is retried; the destination is not taken for a
/// legacy one (no data, no DISC on that connection).
#[actix::test]
async fn a_probe_answered_with_an_error_is_retried_not_taken_for_legacy() {
    let mut src = small_source();
    let expected = src.contents();
    let size = src.size();
    let failing = |error: Errno| Serving {
        probe_error: Some(error.0),
        ..Serving::new(size, true)
    };
    let scripts = vec![
        Script::Serve(failing(Errno::ENOSPC)),
        Script::Serve(failing(Errno::EIO)),
        Script::Serve(Serving::new(size, true)),
    ];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    src.expect_event(ServerEvent::MigrationSent).await;
    for conn in [0, 1] {
        dest.wait_for(conn, WAIT, |s| *s == Seen::Eof).await;
        assert_eq!(
            dest.conn(conn),
            [Seen::Connected, Seen::Probe, Seen::Eof],
            "connection {conn}"
        );
    }
    dest.wait_for(2, WAIT, |s| *s == Seen::Eof).await;
    let seen = dest.conn(2);
    assert_eq!(
        handoffs(&seen),
        [
            join(3, JoinPurpose::Copy),
            HandoffRequest::Prepare { id: ID, size },
            HandoffRequest::Commit { id: ID }
        ],
        "{seen:?}"
    );
    assert_tiles(&seen, size);
    assert_same_image(&dest.image(), &expected);
    assert_eq!(run.stat("migration_attempt"), "3");
    let why = run.stat("migration_last_failure");
    assert!(why.contains("probe"), "{why}");
}

/// The inactivity limit covers the whole answer to a hand-off message: a destination that
/// sends the reply header of the Commit and then nothing more fails the connection like
/// one that answers nothing, and the source (in doubt) reconnects to resend the Commit.
#[actix::test]
async fn a_hand_off_answer_cut_short_fails_the_connection() {
    let mut src = small_source();
    let size = src.size();
    let cut = Serving {
        on_commit: OnCommit::HeaderOnly,
        ..Serving::new(size, true)
    };
    let scripts = vec![Script::Serve(cut), Script::Serve(Serving::new(size, true))];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    // The hand-off limit (5 s), the retry delay (1 s).
    dest.wait_for(1, 2 * WAIT, |s| *s == Seen::Connected).await;
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    assert_eq!(
        handoffs(&dest.conn(1)),
        [
            join(2, JoinPurpose::Commit),
            HandoffRequest::Commit { id: ID }
        ]
    );
}

/// The value of `key` in a status line.
fn status_value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .1
}

/// Through the control actor: while the Commit is outstanding `status` says this side has
/// no control and `break` answers `1: break refused: <why>` and keeps the registration;
/// `break force-source` stops the migration, and this side has control again.
#[actix::test]
async fn control_refuses_break_while_in_doubt_and_reports_no_control() {
    use crate::actors::control::{Control, ControlConfig, Execute};
    use crate::protocol::control::ControlRequest;

    let src = small_source();
    let size = src.size();
    let stalling = Serving {
        on_commit: OnCommit::Stall,
        ..Serving::new(size, true)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(stalling)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket =
        std::os::unix::net::UnixListener::bind(dir.path().join("ctl")).expect("bind control");
    let backing = src.export.config.backing.clone();
    let control = Control::new(
        socket,
        ControlConfig {
            pid: 1,
            size,
            default_deny: false,
            listener: src.listener.clone(),
            allocation: backing.allocation().clone(),
            inbound: None,
        },
    )
    .with_migration(backing, Some(src.events_tx.clone()))
    .start();
    let exec = |request: ControlRequest| {
        let control = control.clone();
        async move {
            timeout(WAIT, control.send(Execute(request)))
                .await
                .expect("Execute not answered within the wait")
                .expect("the control actor's mailbox is closed")
        }
    };

    let status = exec(ControlRequest::Status).await;
    assert_eq!(status_value(&status, "has_control"), "true", "{status}");
    let mirror = MirrorRequest {
        addr: "127.0.0.1".parse().expect("address"),
        port: dest.port(),
        action: MirrorAction::Exit,
        bind: None,
        max_bps: u64::MAX,
        mode: crate::protocol::control::CopyMode::Background,
        tls: None,
    };
    assert_eq!(
        exec(ControlRequest::Mirror(mirror)).await,
        "0: Mirror started\n"
    );
    dest.wait_for(0, WAIT, |s| {
        matches!(
            s,
            Seen::Handoff {
                request: HandoffRequest::Commit { .. },
                ..
            }
        )
    })
    .await;

    let status = exec(ControlRequest::Status).await;
    assert_eq!(status_value(&status, "is_mirroring"), "true", "{status}");
    assert_eq!(status_value(&status, "has_control"), "false", "{status}");
    assert_eq!(
        status_value(&status, "handoff_phase"),
        "in_doubt",
        "{status}"
    );
    let refused = exec(ControlRequest::Break {
        force_source: false,
    })
    .await;
    assert!(
        refused.starts_with("1: break refused: the hand-off is in doubt")
            && refused.ends_with('\n')
            && refused.lines().count() == 1,
        "{refused:?}"
    );
    let status = exec(ControlRequest::Status).await;
    assert_eq!(status_value(&status, "is_mirroring"), "true", "{status}");
    assert_eq!(status_value(&status, "has_control"), "false", "{status}");
    assert_eq!(
        status_value(&status, "clients_allowed"),
        "false",
        "{status}"
    );

    assert_eq!(
        exec(ControlRequest::Break { force_source: true }).await,
        "0: mirror stopped\n"
    );
    let status = exec(ControlRequest::Status).await;
    assert_eq!(status_value(&status, "is_mirroring"), "false", "{status}");
    assert_eq!(status_value(&status, "has_control"), "true", "{status}");
    assert_eq!(status_value(&status, "clients_allowed"), "true", "{status}");
    expect_admitted(src.addr, &src.export).await;
}

/// A signal while the Commit is outstanding stops the migration (the process exits), but
/// the doors stay closed and it is fatal: this side may no longer have control.
#[actix::test]
async fn a_signal_while_in_doubt_is_fatal_and_keeps_the_doors_closed() {
    let mut src = small_source();
    let size = src.size();
    let stalling = Serving {
        on_commit: OnCommit::Stall,
        ..Serving::new(size, true)
    };
    let mut dest = Dest::start(size, vec![Script::Serve(stalling)]).await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| {
        matches!(
            s,
            Seen::Handoff {
                request: HandoffRequest::Commit { .. },
                ..
            }
        )
    })
    .await;
    assert_eq!(run.send(Abandon::Signal).await, AbandonAnswer::Stopped);
    assert!(
        matches!(src.outcome(WAIT).await, Outcome::Fatal(_)),
        "a migration stopped in doubt must not end as merely abandoned"
    );
    assert!(matches!(
        timeout(WAIT, src.events.recv()).await,
        Ok(Some(ServerEvent::MigrationFatal(_)))
    ));
    assert!(!run.stats.has_control());
    assert!(
        !src.doors_open().await,
        "the doors reopened after a signal in doubt"
    );
    expect_no_hello(src.addr).await;
}

/// With `unlink` the source file is gone once the Commit may be on its way: even
/// `break --force-source` is refused, and a destination that proves it did not take
/// control leaves nobody serving: fatal, doors closed (the destination's file holds every
/// acknowledged write).
#[actix::test]
async fn after_unlink_nothing_reopens_the_doors() {
    let mut src = small_source();
    let size = src.size();
    let dropping = Serving {
        on_commit: OnCommit::Drop,
        ..Serving::new(size, true)
    };
    let restarted = Serving {
        on_commit: OnCommit::NotPrepared,
        ..Serving::new(size, true)
    };
    let scripts = vec![Script::Serve(dropping), Script::Serve(restarted)];
    let mut dest = Dest::start(size, scripts).await;
    let mut run = src.start(dest.port(), MirrorAction::Unlink);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| *s == Seen::Dropped).await;
    assert!(!src.path().exists(), "the source file was not removed");
    // The next connection comes a second later; meanwhile the source is in doubt.
    match run.force().await {
        AbandonAnswer::Refused(why) => assert!(why.contains("removed"), "{why}"),
        other => panic!("break --force-source after unlink: {other:?}"),
    }

    match src.outcome(WAIT).await {
        Outcome::Fatal(why) => assert!(why.contains("did not take control"), "{why}"),
        other => panic!("orphaned migration ended as {other:?}"),
    }
    assert!(matches!(
        timeout(WAIT, src.events.recv()).await,
        Ok(Some(ServerEvent::MigrationFatal(_)))
    ));
    assert_eq!(
        handoffs(&dest.conn(1)),
        [
            join(2, JoinPurpose::Commit),
            HandoffRequest::Commit { id: ID }
        ]
    );
    assert!(!run.stats.has_control());
    assert!(!src.doors_open().await);
    expect_no_hello(src.addr).await;
}

// ---------------------------------------------------------------------------------------
// Active mirroring: a client's write to a copied range reaches the destination before
// the client is answered.

/// The offset of the client's write in these tests: inside the first MiB (copied first)
/// and never the offset of one of the copy's own writes (they start at MiB boundaries).
const FORWARDED_AT: u64 = 8192;

/// An active migration whose sweep is held at its first write (the destination answers it
/// only once `sweep_gate` has a permit): by then the first MiB has been copied, and a
/// client write there is forwarded. Returns the source, the destination, the mirror and a
/// client.
async fn active_with_held_sweep(
    scripts: impl FnOnce(u64, Arc<Semaphore>) -> Vec<Script>,
) -> (Source, Dest, Running, Client, Arc<Semaphore>) {
    let src = Source::new(8 * MIB, &[]);
    let client = expect_admitted(src.addr, &src.export).await;
    let sweep_gate = Arc::new(Semaphore::new(0));
    let mut dest = Dest::start(src.size(), scripts(src.size(), sweep_gate.clone())).await;
    let mut run = src.start_with(dest.port(), MirrorAction::Exit, CopyMode::Active, u64::MAX);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| matches!(s, Seen::Write { offset: 0, .. }))
        .await;
    // The sweep queues its next steps while the first write is held; wait until the
    // first MiB counts as copied.
    let backing = src.export.config.backing.clone();
    let deadline = Instant::now() + WAIT;
    while !backing.dirty().forwarding(FORWARDED_AT, 4096) {
        assert!(
            Instant::now() < deadline,
            "the first MiB never counted as copied"
        );
        sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(run.stat("migration_mode"), "active");
    (src, dest, run, client, sweep_gate)
}

fn held_sweep(size: u64, gate: Arc<Semaphore>) -> Serving {
    Serving {
        gate: Some(gate),
        ..Serving::new(size, false)
    }
}

#[actix::test]
async fn a_forwarded_write_is_answered_once_the_destination_acknowledged_it() {
    let forward_gate = Arc::new(Semaphore::new(0));
    let held = forward_gate.clone();
    let (mut src, mut dest, run, mut client, sweep_gate) =
        active_with_held_sweep(move |size, gate| {
            vec![Script::Serve(Serving {
                at_offset: Some((FORWARDED_AT, AtOffset::Hold(held))),
                ..held_sweep(size, gate)
            })]
        })
        .await;
    let data = marker(0x44, 4096);
    client.send(&write_req(0x51, FORWARDED_AT, &data)).await;
    // The source has the write, but its client waits for the destination.
    client.expect_quiet().await;
    sweep_gate.add_permits(1);
    dest.wait_for(0, WAIT, |s| {
        matches!(
            s,
            Seen::Write {
                offset: FORWARDED_AT,
                ..
            }
        )
    })
    .await;
    client.expect_quiet().await;
    forward_gate.add_permits(1);
    let answers = client.answers(&[(0x51, 0)]).await;
    assert_eq!(answers[&0x51].error, 0);
    assert_eq!(run.stat("migration_forwarded_writes"), "1");

    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    let image = dest.image();
    let at = FORWARDED_AT as usize;
    assert_eq!(image[at..at + data.len()], data[..]);
    assert_same_image(&image, &src.contents());
}

/// The destination refuses the forwarded write: the client is answered all the same (its
/// write is in the source file), the attempt fails and the next one carries the write.
#[actix::test]
async fn a_forwarded_write_the_destination_refuses_still_succeeds_for_the_client() {
    forwarded_write_fails(AtOffset::Fail(Errno::ENOSPC.0)).await;
}

/// The destination goes away while the forwarded write is unanswered: the same.
#[actix::test]
async fn a_destination_gone_while_a_write_is_forwarded_fails_nothing_for_the_client() {
    forwarded_write_fails(AtOffset::Drop).await;
}

async fn forwarded_write_fails(failure: AtOffset) {
    let (mut src, mut dest, run, mut client, sweep_gate) =
        active_with_held_sweep(move |size, gate| {
            vec![
                Script::Serve(Serving {
                    at_offset: Some((FORWARDED_AT, failure)),
                    ..held_sweep(size, gate)
                }),
                Script::Serve(Serving::new(size, false)),
            ]
        })
        .await;
    let data = marker(0x45, 4096);
    client.send(&write_req(0x52, FORWARDED_AT, &data)).await;
    sweep_gate.add_permits(1);
    let answers = client.answers(&[(0x52, 0)]).await;
    assert_eq!(answers[&0x52].error, 0, "the client's write failed");
    assert!(
        dest.saw(
            0,
            &Seen::Write {
                offset: FORWARDED_AT,
                len: 4096,
                error: Errno::ENOSPC.0
            }
        ) || dest.conn(0).contains(&Seen::Dropped),
        "the forward never reached the destination: {:?}",
        dest.conn(0)
    );
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    assert_eq!(run.stat("migration_attempt"), "2");
    let image = dest.image();
    let at = FORWARDED_AT as usize;
    assert_eq!(image[at..at + data.len()], data[..]);
    assert_same_image(&image, &src.contents());
}

/// In background mode the same write is answered at once and reaches the destination in
/// a later pass.
#[actix::test]
async fn in_background_mode_a_write_is_answered_at_once() {
    let src = Source::new(8 * MIB, &[]);
    let mut src = src;
    let mut client = expect_admitted(src.addr, &src.export).await;
    let gate = Arc::new(Semaphore::new(0));
    let mut dest = Dest::start(
        src.size(),
        vec![Script::Serve(held_sweep(src.size(), gate.clone()))],
    )
    .await;
    let mut run = src.start(dest.port(), MirrorAction::Exit);
    assert_eq!(run.first().await, Ok(()));
    dest.wait_for(0, WAIT, |s| matches!(s, Seen::Write { offset: 0, .. }))
        .await;
    let data = marker(0x46, 4096);
    client.send(&write_req(0x53, FORWARDED_AT, &data)).await;
    let answers = client.answers(&[(0x53, 0)]).await;
    assert_eq!(answers[&0x53].error, 0);
    gate.add_permits(1);
    assert_eq!(
        src.outcome(WAIT).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    assert_eq!(run.stat("migration_mode"), "background");
    assert_eq!(run.stat("migration_forwarded_writes"), "0");
    assert_same_image(&dest.image(), &src.contents());
}

/// `auto` mode under a client that dirties the export faster than the (limited) link
/// copies it: the mirror turns active in the middle of the copy, the passes carry on, the
/// migration completes and the destination holds every write.
#[actix::test]
async fn auto_mode_turns_active_mid_copy_and_converges() {
    let mut src = Source::new(4 * MIB, &[]);
    let mut client = expect_admitted(src.addr, &src.export).await;
    let dest = Dest::start(
        src.size(),
        vec![Script::Serve(Serving::new(src.size(), false))],
    )
    .await;
    // 1 MB/s: the sweep alone takes 4 s, and the client dirties blocks far faster.
    let mut run = src.start_with(dest.port(), MirrorAction::Exit, CopyMode::Auto, 1_000_000);
    assert_eq!(run.first().await, Ok(()));
    let writer = async {
        let blocks = src.size() / 4096;
        let mut cookie = 0x1000u64;
        let deadline = Instant::now() + Duration::from_secs(40);
        // Writes one block after another, spread over the export, until the doors close.
        while Instant::now() < deadline {
            cookie += 1;
            let block = (cookie * 7919) % blocks;
            let data = marker(cookie as u8, 4096);
            if timeout(
                WAIT,
                client
                    .sock
                    .write_all(&write_req(cookie, block * 4096, &data)),
            )
            .await
            .map_or(true, |r| r.is_err())
            {
                return cookie;
            }
            let mut reply = [0u8; SIMPLE_REPLY_LEN];
            match timeout(WAIT, client.sock.read_exact(&mut reply)).await {
                Ok(Ok(_)) => {
                    let reply = decode_simple_reply(&reply).expect("reply magic");
                    assert_eq!(reply.error, 0, "a client write failed");
                }
                _ => return cookie,
            }
        }
        panic!("the doors never closed on the writer");
    };
    let writes = writer.await;
    assert!(
        writes > 0x1000 + 100,
        "the writer hardly wrote: {writes:#x}"
    );
    assert_eq!(
        src.outcome(Duration::from_secs(60)).await,
        Outcome::Completed(MirrorAction::Exit)
    );
    assert_eq!(run.stat("migration_mode"), "active");
    assert!(
        run.stat("migration_forwarded_writes")
            .parse::<u64>()
            .expect("number")
            > 0
    );
    assert_same_image(&dest.image(), &src.contents());
}
