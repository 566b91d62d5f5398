//! Actor tests in isolation: each actor against fake peers.
//!
//! The peers are as thin as possible so that a failure points at the actor under test:
//! - the client is a plain loopback TCP socket driven byte by byte by the test, encoding
//!   requests with `crate::protocol` (tested on its own) and checking every reply;
//! - a session's listener is [`FakeListener`], an actor that only forwards the
//!   [`SessionEnded`] messages it receives to the test;
//! - the export is a temporary file filled with a known [`pattern`], read back with plain
//!   `pread` to check what the session wrote.
//!
//! Every socket read and every wait is bounded by [`WAIT`], so a hung actor fails the test
//! instead of hanging it; "nothing happens" is checked by watching for [`QUIET`].

mod control;
mod doors;
mod inbound;
mod listener;
mod mirror;
mod session;

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytes::Bytes;
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::protocol::handoff::{
    HandoffReply, HandoffRequest, JoinPurpose, MigrationId, HANDOFF, PROBE,
};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::reply::{decode_simple_reply, SimpleReply};
use crate::protocol::request::{Command, Dialect, ExportRules, HeaderStyle, Request};
use crate::protocol::{tflags, OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};
use crate::storage::Backing;

use super::inbound::{AttachListener, GetTargetStatus, Inbound, TargetStatus, WriteGate};
use super::listener::Listener;
use super::session::{SessionConfig, SessionEnded};
use super::write_queue::WriteQueue;
use super::ServerEvent;

/// Upper bound of every wait that is expected to succeed.
const WAIT: Duration = Duration::from_secs(10);
/// How long we watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);
/// A client receive buffer small enough that a large reply cannot hide in socket buffers.
const SMALL_RCVBUF: u32 = 16 * 1024;

/// The byte at offset `i` of a fresh export: not periodic at 512 or 4096, so a misplaced
/// block shows.
fn pattern(at: u64, len: usize) -> Vec<u8> {
    (at..at + len as u64)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

/// Data a test writes, different from [`pattern`] everywhere.
fn marker(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| !((i % 251) as u8 ^ (i >> 12) as u8) ^ seed)
        .collect()
}

/// Session limits a test can change; the rest of the config is fixed.
#[derive(Clone, Copy)]
struct Limits {
    max_in_flight: usize,
    part_size: usize,
    payload_budget: usize,
    grace: Duration,
    /// `-k`: cut off a client whose request makes no progress for this long.
    killswitch: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_in_flight: SessionConfig::DEFAULT_IN_FLIGHT,
            part_size: 1 << 20,
            payload_budget: 4 << 20,
            grace: WAIT,
            killswitch: None,
        }
    }
}

/// A temporary backing file and the session config that serves it, built as
/// `server` builds the real one (old-style hello, old-style rules).
struct Export {
    file: NamedTempFile,
    config: Arc<SessionConfig>,
}

impl Export {
    fn new(size: u64, limits: Limits) -> Export {
        Export::build(size, limits, |_| None)
    }

    /// As [`Export::new`]; `gate` is given the backing and may return the write gate of a
    /// `listen` server, whose sessions then follow the migration target's rules (the
    /// hand-off PROBE and HANDOFF, zero ranges) and check the gate before every mutation.
    fn build(
        size: u64,
        limits: Limits,
        gate: impl FnOnce(&Arc<Backing>) -> Option<Arc<WriteGate>>,
    ) -> Export {
        let mut file = NamedTempFile::new().expect("temp file");
        file.write_all(&pattern(0, size as usize))
            .expect("fill temp file");
        file.flush().expect("flush temp file");
        let backing = Arc::new(Backing::open(file.path()).expect("open backing"));
        assert_eq!(backing.size(), size);
        let hello = OldstyleHello {
            size,
            flags: tflags::FLEXNBD_COMPAT,
        };
        let gate = gate(&backing);
        let config = Arc::new(SessionConfig {
            backing,
            rules: ExportRules {
                size,
                dialect: Dialect::Oldstyle,
                read_only: false,
                migration_target: gate.is_some(),
            },
            hello: Bytes::copy_from_slice(&hello.encode()),
            newstyle: None,
            tls: None,
            sync_writes: false,
            max_in_flight: limits.max_in_flight,
            payload_budget: limits.payload_budget,
            part_size: limits.part_size,
            killswitch: limits.killswitch,
            grace: limits.grace,
            busy_poll: SessionConfig::DEFAULT_BUSY_POLL,
            write_queue: Some(WriteQueue::start().expect("start the write queue")),
            gate,
        });
        Export { file, config }
    }

    fn size(&self) -> u64 {
        self.config.rules.size
    }

    /// What the file holds now, read through a descriptor of its own.
    fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let file = std::fs::File::open(self.file.path()).expect("reopen temp file");
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset)
            .expect("read temp file");
        buf
    }

    fn file_len(&self) -> u64 {
        std::fs::metadata(self.file.path())
            .expect("stat temp file")
            .len()
    }
}

/// Stands in for the listener: forwards every [`SessionEnded`] to the test.
struct FakeListener(mpsc::UnboundedSender<SessionEnded>);

impl Actor for FakeListener {
    type Context = Context<Self>;
}

impl Handler<SessionEnded> for FakeListener {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Self::Context) {
        let _ = self.0.send(msg);
    }
}

/// The ends a [`FakeListener`] saw. Holds the actor's address so that it outlives the
/// session.
struct Ends {
    rx: mpsc::UnboundedReceiver<SessionEnded>,
    addr: Addr<FakeListener>,
}

impl Ends {
    fn start() -> Ends {
        let (tx, rx) = mpsc::unbounded_channel();
        Ends {
            rx,
            addr: FakeListener(tx).start(),
        }
    }

    fn recipient(&self) -> Recipient<SessionEnded> {
        self.addr.clone().recipient()
    }

    async fn next(&mut self) -> SessionEnded {
        timeout(WAIT, self.rx.recv())
            .await
            .expect("no SessionEnded within the wait")
            .expect("the fake listener's channel closed")
    }

    async fn none_yet(&mut self) {
        if let Ok(end) = timeout(QUIET, self.rx.recv()).await {
            panic!("unexpected SessionEnded: {end:?}");
        }
    }
}

/// Encodes one compact request header.
fn header(command: Command, flags: u16, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    Request {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode(HeaderStyle::Compact, &mut out)
    .expect("compact length");
    out
}

fn read_req(cookie: u64, offset: u64, length: u64) -> Vec<u8> {
    header(Command::Read, 0, cookie, offset, length)
}

/// A WRITE header followed by its payload.
fn write_req(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut out = header(Command::Write, 0, cookie, offset, data.len() as u64);
    out.extend_from_slice(data);
    out
}

/// A reply as the client received it, with the data of a successful READ.
#[derive(Debug)]
struct Answer {
    error: u32,
    data: Vec<u8>,
}

/// The test's side of an NBD connection. Every operation is bounded by [`WAIT`].
struct Client {
    sock: TcpStream,
}

impl Client {
    /// Connects; with `rcvbuf`, the receive buffer is set before connecting so that the
    /// window stays small.
    async fn connect(addr: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<Client> {
        let socket = TcpSocket::new_v4()?;
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size)?;
        }
        let sock = timeout(WAIT, socket.connect(addr))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        sock.set_nodelay(true)?;
        Ok(Client { sock })
    }

    async fn send(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.sock.write_all(bytes))
            .await
            .expect("sending timed out")
            .expect("sending failed");
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        match timeout(WAIT, self.sock.read_exact(&mut buf)).await {
            Err(_) => panic!("no {n} bytes within the wait"),
            Ok(Err(e)) => panic!("reading {n} bytes failed: {e}"),
            Ok(Ok(_)) => buf,
        }
    }

    /// Reads the hello and checks it is exactly the configured one.
    async fn hello(&mut self, export: &Export) {
        let hello = self.read_exact(OLDSTYLE_HELLO_LEN).await;
        assert_eq!(hello, export.config.hello, "the hello differs");
    }

    async fn reply(&mut self) -> SimpleReply {
        let bytes: [u8; SIMPLE_REPLY_LEN] = self
            .read_exact(SIMPLE_REPLY_LEN)
            .await
            .try_into()
            .expect("16 bytes");
        decode_simple_reply(&bytes).unwrap_or_else(|| panic!("bad reply magic: {bytes:02x?}"))
    }

    /// Reads `expected.len()` replies in any order; `expected` maps each cookie to the
    /// data length a successful reply carries (a READ's length, 0 otherwise). Fails on
    /// an unknown or repeated cookie.
    async fn answers(&mut self, expected: &[(u64, usize)]) -> HashMap<u64, Answer> {
        let lengths: HashMap<u64, usize> = expected.iter().copied().collect();
        let mut out = HashMap::new();
        for _ in 0..expected.len() {
            let reply = self.reply().await;
            let Some(&len) = lengths.get(&reply.cookie) else {
                panic!("reply with an unknown cookie {:#x}", reply.cookie);
            };
            let data = if reply.error == 0 {
                self.read_exact(len).await
            } else {
                Vec::new()
            };
            let answer = Answer {
                error: reply.error,
                data,
            };
            if let Some(first) = out.insert(reply.cookie, answer) {
                panic!(
                    "cookie {:#x} answered twice (first {first:?})",
                    reply.cookie
                );
            }
        }
        out
    }

    /// Fails unless the peer closes the connection with nothing more to say.
    async fn expect_eof(&mut self) {
        let mut buf = [0u8; 64];
        match timeout(WAIT, self.sock.read(&mut buf)).await {
            Err(_) => panic!("the connection was not closed within the wait"),
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => panic!("expected EOF, got {n} bytes: {:02x?}", &buf[..n]),
            Ok(Err(e)) => panic!("expected a clean EOF, got {e}"),
        }
    }

    /// Fails if any byte arrives (or the connection ends) within [`QUIET`].
    async fn expect_quiet(&mut self) {
        let mut buf = [0u8; 64];
        match timeout(QUIET, self.sock.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("expected silence, the connection was closed"),
            Ok(Ok(n)) => panic!("expected silence, got {n} bytes: {:02x?}", &buf[..n]),
            Ok(Err(e)) => panic!("expected silence, got {e}"),
        }
    }

    /// Reads until the connection ends or [`WAIT`] passes; returns how many bytes came
    /// before the end (`None` if it did not end). A reset counts as an end.
    async fn bytes_before_close(&mut self) -> Option<usize> {
        let mut total = 0;
        let mut buf = [0u8; 4096];
        let read_all = async {
            loop {
                match self.sock.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        };
        timeout(WAIT, read_all).await.ok()
    }
}

/// A listener on a fresh loopback port serving `config` (sessions on the current arbiter);
/// with `inbound`, a `listen` server's listener, which that actor admits clients for.
fn spawn_listener(
    config: Arc<SessionConfig>,
    inbound: Option<Addr<Inbound>>,
) -> (Addr<Listener>, SocketAddr) {
    use super::listener::ListenerConfig;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let addr = socket.local_addr().expect("local addr");
    let listener = Listener::new(
        socket,
        ListenerConfig {
            acl: crate::acl::Acl::default(),
            max_clients: 16,
            session: config,
            arbiters: vec![],
        },
    );
    let listener = match inbound {
        Some(inbound) => listener.migration_target(inbound),
        None => listener,
    };
    (listener.start(), addr)
}

/// The listener's status, within the wait.
async fn listener_status(listener: &Addr<Listener>) -> super::listener::ListenerStatus {
    timeout(WAIT, listener.send(super::listener::GetStatus))
        .await
        .expect("GetStatus not answered within the wait")
        .expect("the listener's mailbox is closed")
}

/// Fails unless a new connection to `addr` is closed before any byte (a connect refused
/// by the kernel counts too).
async fn expect_no_hello(addr: SocketAddr) {
    let Ok(mut client) = Client::connect(addr, None).await else {
        return;
    };
    assert_eq!(
        client.bytes_before_close().await,
        Some(0),
        "a turned-away client must be closed with no hello"
    );
}

/// Connects, checks the hello and a FLUSH round trip: the listener admits clients.
async fn expect_admitted(addr: SocketAddr, export: &Export) -> Client {
    let mut client = Client::connect(addr, None).await.expect("connect");
    client.hello(export).await;
    client.send(&header(Command::Flush, 0, 0xf1, 0, 0)).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (0xf1, 0), "FLUSH not served");
    client
}

/// A HANDOFF request over the wire: header and encoded message.
fn handoff_req(cookie: u64, request: &HandoffRequest) -> Vec<u8> {
    let body = request.encode();
    let mut out = header(Command::Unknown(HANDOFF), 0, cookie, 0, body.len() as u64);
    out.extend_from_slice(&body);
    out
}

impl Client {
    /// Reads the answer to a HANDOFF request: simple reply (error 0), 32-bit length,
    /// message.
    async fn handoff_answer(&mut self, cookie: u64) -> HandoffReply {
        let reply = self.reply().await;
        assert_eq!((reply.cookie, reply.error), (cookie, 0));
        let len: [u8; 4] = self.read_exact(4).await.try_into().expect("4 bytes");
        let body = self.read_exact(u32::from_be_bytes(len) as usize).await;
        HandoffReply::decode(&body).expect("a well-formed hand-off answer")
    }

    /// Sends a HANDOFF request and reads its answer.
    async fn handoff(&mut self, cookie: u64, request: &HandoffRequest) -> HandoffReply {
        self.send(&handoff_req(cookie, request)).await;
        self.handoff_answer(cookie).await
    }

    /// Sends the PROBE and checks that it is answered 0 (a server of ours).
    async fn probe(&mut self, cookie: u64) {
        self.send(&header(Command::Unknown(PROBE), 0, cookie, 0, 0))
            .await;
        let reply = self.reply().await;
        assert_eq!(
            (reply.cookie, reply.error),
            (cookie, 0),
            "the probe must get 0"
        );
    }
}

/// A `listen` server wired as `server` wires one: an [`Inbound`] actor that owns the
/// hand-off and publishes its write gate, sessions that follow the migration target's
/// rules and check that gate, a listener that asks the inbound actor to admit each
/// connection (and is attached to it, to close fenced sessions), and the main task's
/// event channel.
struct Target {
    export: Export,
    inbound: Addr<Inbound>,
    listener: Addr<Listener>,
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<ServerEvent>,
}

impl Target {
    fn start(size: u64) -> Target {
        let (tx, events) = mpsc::unbounded_channel();
        let mut inbound = None;
        let export = Export::build(size, Limits::default(), |backing| {
            let actor = Inbound::new(backing.clone(), tx);
            let gate = actor.gate();
            inbound = Some(actor.start());
            Some(gate)
        });
        let inbound = inbound.expect("the inbound actor was started");
        let (listener, addr) = spawn_listener(export.config.clone(), Some(inbound.clone()));
        inbound.do_send(AttachListener(listener.clone()));
        Target {
            export,
            inbound,
            listener,
            addr,
            events,
        }
    }

    /// The inbound actor's part of the status, within the wait.
    async fn status(&self) -> TargetStatus {
        timeout(WAIT, self.inbound.send(GetTargetStatus))
            .await
            .expect("GetTargetStatus not answered within the wait")
            .expect("the inbound actor's mailbox is closed")
    }

    /// Waits until everything the listener and the inbound actor were sent before now has
    /// been handled (a session's end reaches the inbound actor through the listener).
    async fn settle(&self) {
        listener_status(&self.listener).await;
        self.status().await;
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

    /// Polls the status until `has_control` is set (taking control after a legacy DISC is
    /// asynchronous: the file is synced first).
    async fn expect_control_taken(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.status().await.has_control {
            assert!(
                tokio::time::Instant::now() < deadline,
                "has_control not set within the wait"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A connection that got its hello (it was admitted).
    async fn connect(&self) -> Client {
        let mut client = Client::connect(self.addr, None).await.expect("connect");
        client.hello(&self.export).await;
        client
    }

    /// A source of ours: connects, probes and joins `id` as `attempt` (to copy).
    async fn join(&self, id: MigrationId, attempt: u64) -> Client {
        let mut client = self.connect().await;
        client.probe(0x9000 + attempt).await;
        let join = HandoffRequest::Join {
            id,
            attempt,
            purpose: JoinPurpose::Copy,
        };
        assert_eq!(
            client.handoff(0x9100 + attempt, &join).await,
            HandoffReply::Joined { id, attempt },
            "attempt {attempt} was not joined"
        );
        client
    }
}
