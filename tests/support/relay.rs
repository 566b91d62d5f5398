//! A fault-injecting TCP relay for migration tests: it sits between a migration source
//! (`flexnbd serve` running `mirror`) and its destination (`flexnbd listen`), or between any
//! old-style NBD client and server, forwards the bytes both ways, recognises the protocol's
//! messages as they pass, and breaks the connection at chosen points.
//!
//! How it works:
//! - One thread accepts on `127.0.0.1:0`; each accepted connection gets its own upstream
//!   connection and one thread that moves the bytes of both directions with non-blocking
//!   sockets and `poll(2)` (at most 10 ms per wait, so it notices commands and the stop flag
//!   quickly). Every thread ends when the [`Relay`] is dropped, and after [`MAX_LIFETIME`] in
//!   any case.
//! - Each direction is parsed as it is read (old-style NBD: the 152-byte hello, 28-byte
//!   requests with WRITE and HANDOFF payloads, 16-byte replies with READ data and HANDOFF
//!   answers). A message is only forwarded once its kind is known, so a fault armed "before"
//!   a message stops the stream exactly at its first byte, and one armed "after" it exactly
//!   at its last byte. A stream that does not parse is logged in [`Relay::notes`] and passed
//!   through unparsed from there on.
//! - Faults act on stream positions: bytes before the position are delivered, the fault
//!   applies, then what follows is subject to it.
//!
//! Blackholed bytes are read and held (so the sending kernel sees them acknowledged, as it
//! would with a packet-dropping network until its own timers fire; only the application's
//! timeouts can notice), up to 64 MiB per direction, after which the relay stops reading
//! (TCP back-pressure then holds the rest). An end of stream or a reset from a peer is held
//! behind the bytes before it, like a packet: a source that gives up during a partition
//! still has its queued WRITEs delivered when the partition heals, then its close.

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, HELLO_LEN, INIT_MAGIC,
    INIT_PASSWD, REPLY_LEN, REPLY_MAGIC, REQUEST_MAGIC,
};

/// Request type of the hand-off probe (src/protocol/handoff).
pub const CMD_PROBE: u16 = 0x4650;
/// Request type of a hand-off message (payload: a bincode-encoded request).
pub const CMD_HANDOFF: u16 = 0x4648;
/// A source asks a destination of ours who it is; a successful reply carries a 32-bit
/// length and the encoded identity, as a hand-off answer does.
pub const CMD_IDENTIFY: u16 = 0x4649;

/// Every relay thread ends after this long, whatever happens (a test never lasts this long).
pub const MAX_LIFETIME: Duration = Duration::from_secs(600);
/// Longest wait of a relay thread between two looks at its commands and the stop flag.
const TICK: Duration = Duration::from_millis(10);
/// Bytes read and not yet delivered, per direction, beyond which the relay stops reading.
const QUEUE_CAP: usize = 4 << 20;
/// The same while the direction is blackholed.
const HELD_CAP: usize = 64 << 20;
/// Deadline for the upstream connection of an accepted one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Relay::fault_now`] and friends wait for every connection to apply them.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// After `CutFin`, how long the relay keeps reading (and discarding) for the peers' FINs
/// before it closes its sockets anyway.
const FIN_DRAIN: Duration = Duration::from_secs(5);
/// A reset from one peer waits at most this long (while not blackholed) for the bytes
/// before it to be delivered to the other peer, then is passed on regardless.
const RESET_GRACE: Duration = Duration::from_secs(1);
/// A HANDOFF answer longer than this is taken for garbage (the real limit is 4 KiB).
const MAX_HANDOFF_BODY: u32 = 1 << 20;

/// A direction of the stream, named after the migration's roles: the relay's clients are
/// sources, its upstream is the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Client → upstream: requests and their payloads.
    ToDestination,
    /// Upstream → client: the hello, replies, READ data, HANDOFF answers.
    ToSource,
}

impl Dir {
    fn idx(self) -> usize {
        match self {
            Dir::ToDestination => 0,
            Dir::ToSource => 1,
        }
    }

    fn from_idx(i: usize) -> Dir {
        if i == 0 {
            Dir::ToDestination
        } else {
            Dir::ToSource
        }
    }

    pub fn reverse(self) -> Dir {
        Dir::from_idx(1 - self.idx())
    }
}

/// A recognised message. A reply is named after its request where that tells something
/// (HANDOFF answers); all other replies, READ data included, are `OtherReply`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Msg {
    // Source → destination.
    Probe,
    /// IDENTIFY (the source asks who the destination is; sent before the probe).
    Identify,
    Join,
    Prepare,
    Commit,
    Write,
    WriteZeroes,
    Flush,
    Trim,
    Read,
    Disc,
    /// Any other request type (a HANDOFF with an unknown or no message included).
    OtherRequest(u16),
    // Destination → source.
    Hello,
    Prepared,
    Committed,
    Refused,
    Joined,
    NotPrepared,
    /// Any other reply: WRITE, FLUSH, PROBE..., errors, READ with its data.
    OtherReply,
}

impl Msg {
    /// The direction this message travels in.
    pub fn dir(self) -> Dir {
        match self {
            Msg::Hello
            | Msg::Prepared
            | Msg::Committed
            | Msg::Refused
            | Msg::Joined
            | Msg::NotPrepared
            | Msg::OtherReply => Dir::ToSource,
            _ => Dir::ToDestination,
        }
    }
}

/// What happens to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Both peers get a FIN (end of stream) at once; what either sends afterwards is
    /// discarded, and bytes not yet delivered are lost.
    CutFin,
    /// Both peers get a RST (SO_LINGER 0, close); bytes not yet delivered are lost.
    CutRst,
    /// Stop delivering that direction, holding what arrives, until healed/restored.
    Blackhole(Dir),
    /// Deliver every chunk read from now on in that direction this much later.
    Delay(Dir, Duration),
}

/// One recognised message: (connection index, direction, message, when it was read).
pub type Event = (usize, Dir, Msg, Instant);

// ---------------------------------------------------------------------------------------
// State shared by the relay's handle and its threads

enum Trigger {
    Msg {
        msg: Msg,
        after: bool,
        fault: Fault,
    },
    Bytes {
        dir: Dir,
        n: u64,
        fault: Fault,
        /// Connections that had already carried more than `n` bytes when it was armed.
        ineligible: Vec<usize>,
    },
}

#[derive(Clone, Copy, Debug)]
enum Command {
    Fault(Fault),
    Partition,
    Heal,
    Restore,
}

#[derive(Default)]
struct ConnInfo {
    open: bool,
    /// Bytes read from the sending peer, per direction.
    read: [u64; 2],
    /// Bytes handed to the receiving peer's socket, per direction.
    delivered: [u64; 2],
    /// Commands applied (a prefix of `State::commands`).
    applied: usize,
}

#[derive(Default)]
struct State {
    events: Vec<Event>,
    armed: Vec<Trigger>,
    partitioned: bool,
    refusing: bool,
    conns: Vec<ConnInfo>,
    commands: Vec<Command>,
    notes: Vec<String>,
}

struct Shared {
    stop: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    born: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.born.elapsed() >= MAX_LIFETIME
    }

    fn note(&self, text: String) {
        self.lock().notes.push(text);
    }
}

// ---------------------------------------------------------------------------------------
// The handle

/// A running relay; dropping it stops its threads and closes every socket.
pub struct Relay {
    shared: Arc<Shared>,
    addr: SocketAddr,
    upstream: SocketAddr,
    listener: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `127.0.0.1:0` and relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Relay {
        assert!(
            upstream.ip().is_loopback(),
            "the relay only talks to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the relay");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the relay's address");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            born: Instant::now(),
        });
        let sh = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || accept_loop(listener, upstream, sh))
            .expect("spawning the relay's thread");
        Relay {
            shared,
            addr,
            upstream,
            listener: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Arms a one-shot fault: the next time `msg` is seen (in its own direction, on any
    /// connection), `fault` applies to that connection just before the message's first
    /// byte is delivered (so a cut or blackhole means it never arrives), or, with `after`,
    /// just after its last byte is (it arrives, what follows does not). Armed faults fire in
    /// the order they were armed.
    pub fn arm(&self, msg: Msg, after: bool, fault: Fault) {
        self.shared
            .lock()
            .armed
            .push(Trigger::Msg { msg, after, fault });
    }

    /// Arms a one-shot fault at byte `n` of direction `dir` (counted from the start of the
    /// connection): it fires on the first connection, open now or accepted later, whose
    /// stream in `dir` reaches `n` bytes; bytes `0..n` are delivered, what follows is subject
    /// to the fault. Connections that already carried more than `n` bytes are not eligible.
    pub fn arm_after_bytes(&self, dir: Dir, n: u64, fault: Fault) {
        let mut st = self.shared.lock();
        let ineligible = st
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.read[dir.idx()] > n)
            .map(|(i, _)| i)
            .collect();
        st.armed.push(Trigger::Bytes {
            dir,
            n,
            fault,
            ineligible,
        });
    }

    /// Forgets every armed fault that has not fired yet.
    pub fn disarm(&self) {
        self.shared.lock().armed.clear();
    }

    /// Number of armed faults that have not fired yet.
    pub fn armed(&self) -> usize {
        self.shared.lock().armed.len()
    }

    /// Applies `fault` to every open connection now; returns once they all have (or after
    /// 2 s).
    pub fn fault_now(&self, fault: Fault) {
        self.command(Command::Fault(fault));
    }

    /// A network partition: every open connection, and every one accepted until
    /// [`heal`](Self::heal), is blackholed both ways (new connections are accepted and
    /// connected upstream, but not a byte is delivered, not even the hello).
    pub fn partition(&self) {
        self.shared.lock().partitioned = true;
        self.command(Command::Partition);
    }

    /// Ends the partition and every blackhole: what was held is delivered, in order
    /// (including ends of stream and resets that came meanwhile), and forwarding resumes.
    /// Delays stay.
    pub fn heal(&self) {
        self.shared.lock().partitioned = false;
        self.command(Command::Heal);
    }

    /// Like [`heal`](Self::heal), and also ends every delay (delayed bytes go at once).
    pub fn restore(&self) {
        self.shared.lock().partitioned = false;
        self.command(Command::Restore);
    }

    /// New connections are accepted and reset at once (SO_LINGER 0), until
    /// [`accept_again`](Self::accept_again). Open connections are not touched.
    pub fn refuse_new(&self) {
        self.shared.lock().refusing = true;
    }

    pub fn accept_again(&self) {
        self.shared.lock().refusing = false;
    }

    /// Every message recognised so far, in the order the relay read them (per connection
    /// and direction; across them, in the order of their reading).
    pub fn events(&self) -> Vec<Event> {
        self.shared.lock().events.clone()
    }

    /// The messages recognised so far, without the rest.
    pub fn messages(&self) -> Vec<Msg> {
        self.shared.lock().events.iter().map(|e| e.2).collect()
    }

    /// Waits until `msg` has been seen (since the start) at least once.
    pub fn wait_for(&self, msg: Msg, timeout: Duration) -> bool {
        self.wait_count(msg, 1, timeout)
    }

    /// Waits until `msg` has been seen at least `n` times since the start.
    pub fn wait_count(&self, msg: Msg, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |st| {
            st.events.iter().filter(|e| e.2 == msg).count() >= n
        })
    }

    /// How many times `msg` has been seen since the start.
    pub fn count(&self, msg: Msg) -> usize {
        self.shared
            .lock()
            .events
            .iter()
            .filter(|e| e.2 == msg)
            .count()
    }

    /// Connections accepted (and relayed) so far; refused ones are not counted.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Connections still open.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().conns.iter().filter(|c| c.open).count()
    }

    /// Waits until `n` connections have been accepted.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |st| st.conns.len() >= n)
    }

    /// Bytes delivered in `dir`, over all connections.
    pub fn delivered(&self, dir: Dir) -> u64 {
        self.shared
            .lock()
            .conns
            .iter()
            .map(|c| c.delivered[dir.idx()])
            .sum()
    }

    /// Bytes read in `dir` and not (yet) delivered, over the open connections: held by a
    /// blackhole or a delay, or waiting for a slow reader.
    pub fn held(&self, dir: Dir) -> u64 {
        self.shared
            .lock()
            .conns
            .iter()
            .filter(|c| c.open)
            .map(|c| c.read[dir.idx()] - c.delivered[dir.idx()])
            .sum()
    }

    /// What the relay found odd: streams that did not parse, failed upstream connections.
    pub fn notes(&self) -> Vec<String> {
        self.shared.lock().notes.clone()
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if done(&st) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            // Bounded slices, in case a notification is missed.
            let slice = (deadline - now).min(Duration::from_millis(50));
            st = self
                .shared
                .changed
                .wait_timeout(st, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Queues `cmd` for every open connection and waits until each has applied it (or has
    /// closed).
    fn command(&self, cmd: Command) {
        let seq = {
            let mut st = self.shared.lock();
            st.commands.push(cmd);
            st.commands.len()
        };
        self.shared.changed.notify_all();
        let all = self.wait_until(ACK_TIMEOUT, |st| {
            st.conns.iter().all(|c| !c.open || c.applied >= seq)
        });
        if !all {
            self.shared.note(format!(
                "{cmd:?} was not applied by every connection within {ACK_TIMEOUT:?}"
            ));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        if let Some(t) = self.listener.take() {
            join_within(t, Duration::from_secs(5));
        }
    }
}

/// Joins `t` if it finishes within `timeout` (it always should: every relay thread looks
/// at the stop flag every 10 ms); otherwise leaves it detached rather than hang a test.
fn join_within(t: JoinHandle<()>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !t.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    if t.is_finished() {
        let _ = t.join();
    }
}

// ---------------------------------------------------------------------------------------
// Accepting

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping() {
        match listener.accept() {
            Ok((client, _)) => {
                if let Some(t) = admit(client, upstream, &shared) {
                    threads.push(t);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                poll_fds(&mut [pollfd(listener.as_raw_fd(), libc::POLLIN)], TICK);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                shared.note(format!("accept failed: {e}"));
                thread::sleep(TICK);
            }
        }
        threads.retain(|t| !t.is_finished());
    }
    drop(listener);
    for t in threads {
        join_within(t, Duration::from_secs(5));
    }
}

/// Connects an accepted client upstream and starts its thread, or resets it.
fn admit(client: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) -> Option<JoinHandle<()>> {
    if shared.lock().refusing {
        reset(client);
        return None;
    }
    let server = match TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            shared.note(format!("connecting upstream to {upstream} failed: {e}"));
            reset(client);
            return None;
        }
    };
    let configured = [&client, &server]
        .iter()
        .all(|s| s.set_nonblocking(true).is_ok() && s.set_nodelay(true).is_ok());
    if !configured {
        shared.note("cannot configure a relayed socket".into());
        reset(client);
        return None;
    }
    let (index, applied, partitioned) = {
        let mut st = shared.lock();
        let applied = st.commands.len();
        st.conns.push(ConnInfo {
            open: true,
            applied,
            ..ConnInfo::default()
        });
        (st.conns.len() - 1, applied, st.partitioned)
    };
    shared.changed.notify_all();
    let mut conn = Conn::new(index, client, server, shared.clone(), applied);
    if partitioned {
        conn.halves[0].blackholed = true;
        conn.halves[1].blackholed = true;
    }
    let spawned = thread::Builder::new()
        .name(format!("relay-conn-{index}"))
        .spawn(move || conn.run());
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            let mut st = shared.lock();
            st.notes.push(format!("cannot spawn a relay thread: {e}"));
            st.conns[index].open = false;
            None
        }
    }
}

/// Closes `s` with a RST.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// poll(2) on `fds` for at most `timeout` (an fd of -1 is ignored).
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = timeout.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: `fds` is a live, exclusively borrowed slice of pollfd for the whole call and
    // its length is passed along with it.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}

// ---------------------------------------------------------------------------------------
// The parser

/// Replies that carry more than their 16-byte header, by cookie.
#[derive(Default)]
struct Cookies {
    pending: HashMap<u64, VecDeque<Pending>>,
}

#[derive(Clone, Copy, Debug)]
enum Pending {
    /// A READ of this many bytes: a successful reply carries them.
    Read(u32),
    /// A HANDOFF: a successful reply carries a 32-bit length and an answer.
    Handoff,
    /// An IDENTIFY: a successful reply carries a 32-bit length and the identity.
    Identify,
}

impl Cookies {
    fn peek(&self, cookie: u64) -> Option<Pending> {
        self.pending.get(&cookie).and_then(|q| q.front().copied())
    }

    fn expect(&mut self, cookie: u64, p: Pending) {
        self.pending.entry(cookie).or_default().push_back(p);
    }

    fn consume(&mut self, cookie: u64) {
        if let Some(q) = self.pending.get_mut(&cookie) {
            q.pop_front();
            if q.is_empty() {
                self.pending.remove(&cookie);
            }
        }
    }
}

enum Effect {
    None,
    Expect(u64, Pending),
    Consume(u64),
    HelloDone,
}

enum Parse {
    /// The unit is recognised once this many bytes of it are known.
    Need(usize),
    /// A whole unit of `len` bytes (header included).
    Unit {
        msg: Msg,
        len: u64,
        effect: Effect,
    },
    Bad(String),
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Splits one direction's bytes into messages.
struct Parser {
    dir: Dir,
    hello_done: bool,
    /// Stream offset of the next byte fed.
    fed: u64,
    /// The beginning of the unit being recognised.
    hdr: Vec<u8>,
    /// Bytes of a recognised unit still to come (payloads).
    skip: u64,
    passthrough: bool,
}

impl Parser {
    fn new(dir: Dir) -> Parser {
        Parser {
            dir,
            hello_done: false,
            fed: 0,
            hdr: Vec::with_capacity(HELLO_LEN),
            skip: 0,
            passthrough: false,
        }
    }

    /// Bytes up to this offset may be delivered: everything but the start of a unit whose
    /// kind is not known yet.
    fn safe(&self) -> u64 {
        self.fed - self.hdr.len() as u64
    }

    /// The stream ended: whatever was held is released.
    fn finish(&mut self, notes: &mut Vec<String>) {
        if !self.hdr.is_empty() {
            notes.push(format!(
                "{:?}: the stream ended inside a message ({} bytes of it)",
                self.dir,
                self.hdr.len()
            ));
            self.hdr.clear();
        }
    }

    /// Parses `data`; returns the messages recognised as (message, start, end) offsets.
    fn feed(
        &mut self,
        data: &[u8],
        cookies: &mut Cookies,
        notes: &mut Vec<String>,
    ) -> Vec<(Msg, u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        // Every turn consumes bytes or recognises a unit (which empties `hdr`, so the next
        // turn needs bytes): at most 2 * len + 2 turns.
        for _ in 0..2 * data.len() + 2 {
            if self.passthrough {
                self.fed += (data.len() - i) as u64;
                return out;
            }
            if self.skip > 0 {
                let n = self.skip.min((data.len() - i) as u64);
                self.skip -= n;
                self.fed += n;
                i += n as usize;
                if self.skip > 0 {
                    return out;
                }
            }
            match self.examine(cookies) {
                Parse::Need(n) if n > self.hdr.len() => {
                    if i == data.len() {
                        return out;
                    }
                    let take = (n - self.hdr.len()).min(data.len() - i);
                    self.hdr.extend_from_slice(&data[i..i + take]);
                    self.fed += take as u64;
                    i += take;
                }
                Parse::Need(n) => {
                    self.give_up(format!("parser asked for {n} bytes, has them"), notes);
                }
                Parse::Unit { msg, len, effect } => {
                    let start = self.safe();
                    out.push((msg, start, start + len));
                    match effect {
                        Effect::None => {}
                        Effect::Expect(c, p) => cookies.expect(c, p),
                        Effect::Consume(c) => cookies.consume(c),
                        Effect::HelloDone => self.hello_done = true,
                    }
                    self.skip = len - self.hdr.len() as u64;
                    self.hdr.clear();
                }
                Parse::Bad(why) => self.give_up(why, notes),
            }
        }
        self.give_up("parser loop bound reached".into(), notes);
        self.fed += (data.len() - i) as u64;
        out
    }

    fn give_up(&mut self, why: String, notes: &mut Vec<String>) {
        notes.push(format!(
            "{:?}: {why} at offset {}; passing the rest through unparsed",
            self.dir,
            self.safe()
        ));
        self.passthrough = true;
        self.hdr.clear();
    }

    fn examine(&self, cookies: &Cookies) -> Parse {
        match self.dir {
            Dir::ToDestination => self.examine_request(),
            Dir::ToSource => self.examine_reply(cookies),
        }
    }

    fn examine_request(&self) -> Parse {
        let h = &self.hdr;
        if h.len() < 28 {
            return Parse::Need(28);
        }
        let magic = be32(&h[0..4]);
        if magic != REQUEST_MAGIC {
            return Parse::Bad(format!("request magic {magic:#010x}"));
        }
        let kind = be16(&h[6..8]);
        let cookie = be64(&h[8..16]);
        let len = be32(&h[24..28]);
        let (msg, payload, effect) = match kind {
            CMD_WRITE => (Msg::Write, len, Effect::None),
            CMD_HANDOFF if len == 0 => (
                Msg::OtherRequest(CMD_HANDOFF),
                0,
                Effect::Expect(cookie, Pending::Handoff),
            ),
            CMD_HANDOFF => {
                if h.len() < 29 {
                    return Parse::Need(29);
                }
                let msg = match h[28] {
                    0 => Msg::Prepare,
                    1 => Msg::Commit,
                    2 => Msg::Join,
                    _ => Msg::OtherRequest(CMD_HANDOFF),
                };
                (msg, len, Effect::Expect(cookie, Pending::Handoff))
            }
            CMD_READ => (Msg::Read, 0, Effect::Expect(cookie, Pending::Read(len))),
            CMD_DISC => (Msg::Disc, 0, Effect::None),
            CMD_FLUSH => (Msg::Flush, 0, Effect::None),
            CMD_TRIM => (Msg::Trim, 0, Effect::None),
            CMD_WRITE_ZEROES => (Msg::WriteZeroes, 0, Effect::None),
            CMD_PROBE => (Msg::Probe, 0, Effect::None),
            CMD_IDENTIFY => (Msg::Identify, 0, Effect::Expect(cookie, Pending::Identify)),
            other => (Msg::OtherRequest(other), 0, Effect::None),
        };
        Parse::Unit {
            msg,
            len: 28 + payload as u64,
            effect,
        }
    }

    fn examine_reply(&self, cookies: &Cookies) -> Parse {
        let h = &self.hdr;
        if !self.hello_done {
            if h.len() < HELLO_LEN {
                return Parse::Need(HELLO_LEN);
            }
            if &h[0..8] != INIT_PASSWD || be64(&h[8..16]) != INIT_MAGIC {
                return Parse::Bad("not an old-style hello".into());
            }
            return Parse::Unit {
                msg: Msg::Hello,
                len: HELLO_LEN as u64,
                effect: Effect::HelloDone,
            };
        }
        if h.len() < REPLY_LEN {
            return Parse::Need(REPLY_LEN);
        }
        let magic = be32(&h[0..4]);
        if magic != REPLY_MAGIC {
            return Parse::Bad(format!("reply magic {magic:#010x}"));
        }
        let error = be32(&h[4..8]);
        let cookie = be64(&h[8..16]);
        let effect = Effect::Consume(cookie);
        match cookies.peek(cookie) {
            Some(Pending::Read(n)) if error == 0 => Parse::Unit {
                msg: Msg::OtherReply,
                len: REPLY_LEN as u64 + n as u64,
                effect,
            },
            Some(Pending::Identify) if error == 0 => {
                if h.len() < REPLY_LEN + 4 {
                    return Parse::Need(REPLY_LEN + 4);
                }
                let body = be32(&h[16..20]);
                if body > MAX_HANDOFF_BODY {
                    return Parse::Bad(format!("identity of {body} bytes"));
                }
                Parse::Unit {
                    msg: Msg::OtherReply,
                    len: (REPLY_LEN + 4) as u64 + body as u64,
                    effect,
                }
            }
            Some(Pending::Handoff) if error == 0 => {
                if h.len() < REPLY_LEN + 4 {
                    return Parse::Need(REPLY_LEN + 4);
                }
                let body = be32(&h[16..20]);
                if body > MAX_HANDOFF_BODY {
                    return Parse::Bad(format!("hand-off answer of {body} bytes"));
                }
                let len = (REPLY_LEN + 4) as u64 + body as u64;
                if body == 0 {
                    return Parse::Unit {
                        msg: Msg::OtherReply,
                        len,
                        effect,
                    };
                }
                if h.len() < REPLY_LEN + 5 {
                    return Parse::Need(REPLY_LEN + 5);
                }
                let msg = match h[20] {
                    0 => Msg::Prepared,
                    1 => Msg::Committed,
                    2 => Msg::Refused,
                    3 => Msg::Joined,
                    4 => Msg::NotPrepared,
                    _ => Msg::OtherReply,
                };
                Parse::Unit { msg, len, effect }
            }
            _ => Parse::Unit {
                msg: Msg::OtherReply,
                len: REPLY_LEN as u64,
                effect,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// A relayed connection

/// Why a direction's input ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
}

struct Chunk {
    release: Instant,
    data: Vec<u8>,
    /// Bytes of `data` already delivered.
    done: usize,
}

/// One direction: reads socket `i`, writes socket `1 - i` (0 = client, 1 = upstream).
struct Half {
    dir: Dir,
    read: u64,
    delivered: u64,
    /// The bytes `delivered..read`.
    queue: VecDeque<Chunk>,
    /// Faults at stream offsets, in order.
    points: Vec<(u64, Fault)>,
    blackholed: bool,
    delay: Option<Duration>,
    parser: Parser,
    /// The sending peer finished (what was read before still goes).
    input_end: Option<End>,
    /// When a reset was read while not blackholed (for [`RESET_GRACE`]).
    reset_since: Option<Instant>,
    /// The receiving peer is gone: nothing more can be delivered.
    out_dead: bool,
    /// The end of stream was passed on (shutdown(Write) on the receiving socket).
    out_shut: bool,
    /// The last write would have blocked.
    write_blocked: bool,
}

impl Half {
    fn new(dir: Dir) -> Half {
        Half {
            dir,
            read: 0,
            delivered: 0,
            queue: VecDeque::new(),
            points: Vec::new(),
            blackholed: false,
            delay: None,
            parser: Parser::new(dir),
            input_end: None,
            reset_since: None,
            out_dead: false,
            out_shut: false,
            write_blocked: false,
        }
    }

    fn queued(&self) -> u64 {
        self.read - self.delivered
    }

    fn may_read(&self) -> bool {
        let cap = if self.blackholed { HELD_CAP } else { QUEUE_CAP };
        self.input_end.is_none() && (self.queued() as usize) < cap
    }

    fn add_point(&mut self, at: u64, fault: Fault) {
        let pos = self.points.partition_point(|p| p.0 <= at);
        self.points.insert(pos, (at, fault));
    }

    /// Drops what could not be delivered.
    fn discard(&mut self) {
        self.queue.clear();
        self.delivered = self.read;
    }
}

#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

struct Conn {
    index: usize,
    /// 0 = the client (source side), 1 = upstream (destination side); `None` once closed.
    socks: [Option<TcpStream>; 2],
    halves: [Half; 2],
    cookies: Cookies,
    shared: Arc<Shared>,
    applied: usize,
    buf: Vec<u8>,
    /// Counters last published to the shared state.
    published: ([u64; 2], [u64; 2]),
}

impl Conn {
    fn new(
        index: usize,
        client: TcpStream,
        server: TcpStream,
        shared: Arc<Shared>,
        applied: usize,
    ) -> Conn {
        Conn {
            index,
            socks: [Some(client), Some(server)],
            halves: [Half::new(Dir::ToDestination), Half::new(Dir::ToSource)],
            cookies: Cookies::default(),
            shared,
            applied,
            buf: vec![0u8; 64 * 1024],
            published: ([0; 2], [0; 2]),
        }
    }

    fn run(mut self) {
        while !self.shared.stopping() {
            if self.step() == Flow::Stop {
                break;
            }
        }
        // Plain close of whatever is left (on stop: FIN, or RST if unread data remains).
        self.socks = [None, None];
        self.publish(true);
    }

    fn step(&mut self) -> Flow {
        if self.take_commands() == Flow::Stop {
            return Flow::Stop;
        }
        for h in 0..2 {
            if self.deliver(h) == Flow::Stop {
                return Flow::Stop;
            }
            if self.pass_end(h) == Flow::Stop {
                return Flow::Stop;
            }
        }
        let finished =
            |x: &Half| x.input_end.is_some() && x.queued() == 0 && (x.out_shut || x.out_dead);
        if finished(&self.halves[0]) && finished(&self.halves[1]) {
            return Flow::Stop;
        }
        self.publish(false);
        self.wait_and_read();
        Flow::Go
    }

    /// Applies the commands queued since the last look, then acknowledges them.
    fn take_commands(&mut self) -> Flow {
        let cmds: Vec<Command> = {
            let st = self.shared.lock();
            st.commands[self.applied..].to_vec()
        };
        if cmds.is_empty() {
            return Flow::Go;
        }
        self.applied += cmds.len();
        let mut flow = Flow::Go;
        for cmd in cmds {
            match cmd {
                Command::Fault(f) => {
                    if self.apply(f) == Flow::Stop {
                        flow = Flow::Stop;
                        break;
                    }
                }
                Command::Partition => {
                    self.halves[0].blackholed = true;
                    self.halves[1].blackholed = true;
                }
                Command::Heal => {
                    for h in &mut self.halves {
                        h.blackholed = false;
                    }
                }
                Command::Restore => {
                    let now = Instant::now();
                    for h in &mut self.halves {
                        h.blackholed = false;
                        h.delay = None;
                        for c in &mut h.queue {
                            c.release = c.release.min(now);
                        }
                    }
                }
            }
        }
        {
            let mut st = self.shared.lock();
            st.conns[self.index].applied = self.applied;
        }
        self.shared.changed.notify_all();
        flow
    }

    fn apply(&mut self, fault: Fault) -> Flow {
        match fault {
            Fault::CutRst => {
                self.reset_all();
                Flow::Stop
            }
            Fault::CutFin => {
                self.fin_and_drain();
                Flow::Stop
            }
            Fault::Blackhole(d) => {
                self.halves[d.idx()].blackholed = true;
                Flow::Go
            }
            Fault::Delay(d, by) => {
                self.halves[d.idx()].delay = Some(by);
                Flow::Go
            }
        }
    }

    fn reset_all(&mut self) {
        for s in self.socks.iter_mut() {
            if let Some(s) = s.take() {
                reset(s);
            }
        }
        self.publish(true);
    }

    /// Sends a FIN both ways, then reads and discards until both peers have closed too (at
    /// most [`FIN_DRAIN`]), so that the close is a clean FIN rather than a RST for unread
    /// data.
    fn fin_and_drain(&mut self) {
        // The connection counts as closed from now on (commands need not wait for it).
        self.publish(true);
        for s in self.socks.iter().flatten() {
            let _ = s.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + FIN_DRAIN;
        let mut open = [self.socks[0].is_some(), self.socks[1].is_some()];
        while (open[0] || open[1]) && Instant::now() < deadline && !self.shared.stopping() {
            let mut fds = [0, 1].map(|i| match (&self.socks[i], open[i]) {
                (Some(s), true) => pollfd(s.as_raw_fd(), libc::POLLIN),
                _ => pollfd(-1, 0),
            });
            poll_fds(&mut fds, TICK);
            for (sock, still) in self.socks.iter_mut().zip(open.iter_mut()) {
                let Some(s) = sock.as_mut().filter(|_| *still) else {
                    continue;
                };
                match s.read(&mut self.buf) {
                    Ok(0) => *still = false,
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => *still = false,
                }
            }
        }
        self.socks = [None, None];
    }

    /// Delivers what half `h` may deliver now, applying the faults it reaches.
    fn deliver(&mut self, h: usize) -> Flow {
        let now = Instant::now();
        self.halves[h].write_blocked = false;
        // Each turn delivers bytes, applies a fault or stops.
        for _ in 0..256 {
            let half = &mut self.halves[h];
            if let Some(&(at, fault)) = half.points.first() {
                if at <= half.delivered {
                    half.points.remove(0);
                    if self.apply(fault) == Flow::Stop {
                        return Flow::Stop;
                    }
                    continue;
                }
            }
            let half = &mut self.halves[h];
            if half.blackholed || half.out_dead {
                break;
            }
            let mut limit = half.parser.safe().min(half.read);
            if let Some(&(at, _)) = half.points.first() {
                limit = limit.min(at);
            }
            if half.delivered >= limit {
                break;
            }
            let Some(chunk) = half.queue.front_mut() else {
                break;
            };
            if chunk.release > now {
                break;
            }
            let n = (chunk.data.len() - chunk.done).min((limit - half.delivered) as usize);
            let Some(out) = &mut self.socks[1 - h] else {
                break;
            };
            match out.write(&chunk.data[chunk.done..chunk.done + n]) {
                Ok(0) => {
                    self.peer_gone(1 - h);
                    break;
                }
                Ok(k) => {
                    chunk.done += k;
                    half.delivered += k as u64;
                    if chunk.done == chunk.data.len() {
                        half.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    half.write_blocked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_gone(1 - h);
                    break;
                }
            }
        }
        Flow::Go
    }

    /// The peer on socket `s` is gone (reset, or a write to it failed): its input ends with
    /// a reset, and what was to be delivered to it is lost.
    fn peer_gone(&mut self, s: usize) {
        let now = Instant::now();
        let reader = &mut self.halves[s];
        if reader.input_end.is_none() {
            reader.input_end = Some(End::Reset);
            reader.reset_since = Some(now);
            let mut st = self.shared.lock();
            reader.parser.finish(&mut st.notes);
        }
        let writer = &mut self.halves[1 - s];
        writer.out_dead = true;
        writer.discard();
    }

    /// Passes the end of half `h`'s input on once everything before it is delivered.
    fn pass_end(&mut self, h: usize) -> Flow {
        let half = &mut self.halves[h];
        let Some(end) = half.input_end else {
            return Flow::Go;
        };
        if half.blackholed {
            half.reset_since = None;
            return Flow::Go;
        }
        match end {
            End::Eof => {
                if half.queued() == 0 && !half.out_shut {
                    half.out_shut = true;
                    if let Some(s) = &self.socks[1 - h] {
                        let _ = s.shutdown(Shutdown::Write);
                    }
                }
                Flow::Go
            }
            End::Reset => {
                let since = *half.reset_since.get_or_insert_with(Instant::now);
                if half.queued() == 0 || half.out_dead || since.elapsed() >= RESET_GRACE {
                    self.reset_all();
                    Flow::Stop
                } else {
                    Flow::Go
                }
            }
        }
    }

    /// Waits (at most a tick, less if a delayed chunk is due sooner) for something to do,
    /// then reads what arrived.
    fn wait_and_read(&mut self) {
        let now = Instant::now();
        let mut wait = TICK;
        for half in &self.halves {
            if half.blackholed || half.out_dead {
                continue;
            }
            if let Some(c) = half.queue.front() {
                if c.release > now && half.delivered < half.parser.safe() {
                    wait = wait.min(c.release - now);
                }
            }
        }
        let mut fds = [0usize, 1].map(|s| {
            let Some(sock) = &self.socks[s] else {
                return pollfd(-1, 0);
            };
            let mut ev = 0;
            if self.halves[s].may_read() {
                ev |= libc::POLLIN;
            }
            if self.halves[1 - s].write_blocked {
                ev |= libc::POLLOUT;
            }
            if ev == 0 {
                pollfd(-1, 0)
            } else {
                pollfd(sock.as_raw_fd(), ev)
            }
        });
        poll_fds(&mut fds, wait);
        for (s, fd) in fds.iter().enumerate() {
            if fd.fd >= 0
                && fd.events & libc::POLLIN != 0
                && fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            {
                self.read_from(s);
            }
        }
    }

    fn read_from(&mut self, s: usize) {
        let Some(sock) = &mut self.socks[s] else {
            return;
        };
        match sock.read(&mut self.buf) {
            Ok(0) => {
                let half = &mut self.halves[s];
                half.input_end = Some(End::Eof);
                let mut st = self.shared.lock();
                half.parser.finish(&mut st.notes);
            }
            Ok(n) => self.ingest(s, n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.peer_gone(s),
        }
    }

    /// Parses `self.buf[..n]`, just read by half `h`, logs its messages, places the faults
    /// they trigger, and queues the bytes.
    fn ingest(&mut self, h: usize, n: usize) {
        let now = Instant::now();
        let half = &mut self.halves[h];
        let dir = half.dir;
        half.read += n as u64;
        let mut st = self.shared.lock();
        let units = half
            .parser
            .feed(&self.buf[..n], &mut self.cookies, &mut st.notes);
        for (msg, start, end) in units {
            st.events.push((self.index, dir, msg, now));
            let hit = st.armed.iter().position(
                |t| matches!(t, Trigger::Msg { msg: m, .. } if *m == msg && msg.dir() == dir),
            );
            if let Some(i) = hit {
                if let Trigger::Msg { after, fault, .. } = st.armed.remove(i) {
                    half.add_point(if after { end } else { start }, fault);
                }
            }
        }
        let index = self.index;
        let read = half.read;
        let hit = st.armed.iter().position(|t| {
            matches!(t, Trigger::Bytes { dir: d, n, ineligible, .. }
                if *d == dir && read >= *n && !ineligible.contains(&index))
        });
        if let Some(i) = hit {
            if let Trigger::Bytes { n, fault, .. } = st.armed.remove(i) {
                half.add_point(n, fault);
            }
        }
        st.conns[index].read[h] = read;
        drop(st);
        self.shared.changed.notify_all();
        half.queue.push_back(Chunk {
            release: now + half.delay.unwrap_or(Duration::ZERO),
            data: self.buf[..n].to_vec(),
            done: 0,
        });
    }

    /// Publishes the byte counters (and, with `closed`, the end of the connection).
    fn publish(&mut self, closed: bool) {
        let read = [self.halves[0].read, self.halves[1].read];
        let delivered = [self.halves[0].delivered, self.halves[1].delivered];
        if !closed && (read, delivered) == self.published {
            return;
        }
        self.published = (read, delivered);
        {
            let mut st = self.shared.lock();
            let c = &mut st.conns[self.index];
            c.read = read;
            c.delivered = delivered;
            if closed {
                c.open = false;
            }
        }
        self.shared.changed.notify_all();
    }
}
