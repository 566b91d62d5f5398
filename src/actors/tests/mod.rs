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

use crate::protocol::handshake::OldstyleHello;
use crate::protocol::reply::{decode_simple_reply, SimpleReply};
use crate::protocol::request::{Command, Dialect, ExportRules, HeaderStyle, Request};
use crate::protocol::{tflags, OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};
use crate::storage::Backing;

use super::session::{SessionConfig, SessionEnded};
use super::write_queue::WriteQueue;

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
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_in_flight: SessionConfig::DEFAULT_IN_FLIGHT,
            part_size: 1 << 20,
            payload_budget: 4 << 20,
            grace: WAIT,
        }
    }
}

/// A temporary backing file and the session config that serves it, built as
/// `cli::serve` builds the real one (old-style hello, old-style rules).
struct Export {
    file: NamedTempFile,
    config: Arc<SessionConfig>,
}

impl Export {
    fn new(size: u64, limits: Limits) -> Export {
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
        let config = Arc::new(SessionConfig {
            backing,
            rules: ExportRules {
                size,
                dialect: Dialect::Oldstyle,
                read_only: false,
                migration_target: false,
            },
            hello: Bytes::copy_from_slice(&hello.encode()),
            newstyle: None,
            sync_writes: false,
            max_in_flight: limits.max_in_flight,
            payload_budget: limits.payload_budget,
            part_size: limits.part_size,
            killswitch: None,
            grace: limits.grace,
            busy_poll: SessionConfig::DEFAULT_BUSY_POLL,
            write_queue: Some(WriteQueue::start().expect("start the write queue")),
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
/// with `target`, a `listen` server's listener reporting to that channel.
fn spawn_listener(
    config: Arc<SessionConfig>,
    target: Option<super::Events>,
) -> (Addr<super::listener::Listener>, SocketAddr) {
    use super::listener::{Listener, ListenerConfig};
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
    let listener = match target {
        Some(events) => listener.migration_target(events),
        None => listener,
    };
    (listener.start(), addr)
}

/// The listener's status, within the wait.
async fn listener_status(
    listener: &Addr<super::listener::Listener>,
) -> super::listener::ListenerStatus {
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
