//! The promise a migration must keep, checked from the outside: never a lost acknowledged
//! write, never two servers taking writes.
//!
//! - [`SeqWriter`] is a client that writes distinct, sequence-stamped 4 KiB blocks to
//!   distinct offsets, one request at a time, and records every acknowledgement (offset,
//!   sequence number, which server, when). When its connection ends it reconnects, trying
//!   the next address of its list, so it follows a migration from source to destination.
//! - [`accepts_write`] asks a server, once, whether it takes a write right now.
//! - [`check_holds_all`] checks that a file holds every acknowledged block.
//!
//! Every socket has timeouts and every loop a deadline: nothing here can hang a test.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{request_header, CMD_DISC, CMD_WRITE, HELLO_LEN, INIT_PASSWD, REPLY_LEN, REPLY_MAGIC};

/// Size of every block written here.
pub const BLOCK: usize = 4096;
/// Marks a block written by this module (bytes 8..16).
const STAMP: &[u8; 8] = b"SEQBLOCK";
/// The writer's offsets are `seq * STRIDE mod blocks`: distinct while `seq < blocks`, as
/// the stride is prime (and must not divide the number of blocks).
const STRIDE: u64 = 7919;
/// Sequence numbers of [`accepts_write`] probes start here, far from the writers'.
const PROBE_SEQ_BASE: u64 = 1 << 40;
static NEXT_PROBE_SEQ: AtomicU64 = AtomicU64::new(PROBE_SEQ_BASE);

/// The block written with sequence number `seq`: `seq` (little-endian), "SEQBLOCK", then
/// words derived from `seq` and their index.
pub fn seq_block(seq: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    block[0..8].copy_from_slice(&seq.to_le_bytes());
    block[8..16].copy_from_slice(STAMP);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EC0_B10C_0000_0000;
    for word in block[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    block
}

/// The sequence number of a whole, intact block written here.
pub fn block_seq(block: &[u8]) -> Option<u64> {
    if block.len() != BLOCK || &block[8..16] != STAMP {
        return None;
    }
    let seq = u64::from_le_bytes(block[0..8].try_into().unwrap());
    (seq_block(seq) == block).then_some(seq)
}

/// What a block of a file looks like, for messages.
fn describe(block: &[u8]) -> String {
    if let Some(seq) = block_seq(block) {
        format!("block of seq {seq}")
    } else if block.iter().all(|&b| b == 0) {
        "zeros".into()
    } else if block.len() < BLOCK {
        format!("only {} bytes", block.len())
    } else {
        "other bytes".into()
    }
}

/// Sleeps `d`, in slices, returning early (false) once `stop` is set.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

// ---------------------------------------------------------------------------------------
// One connection

/// Why a server did not take a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// connect(2) failed with ECONNREFUSED.
    ConnectionRefused,
    /// The connection ended (FIN or RST) before a whole hello.
    ClosedWithoutHello,
    /// Something other than a hello arrived.
    BadHello,
    /// The connection ended after the request was sent, before the reply: the write may or
    /// may not have happened.
    ClosedBeforeReply,
    /// The reply had this non-zero error.
    Errno(u32),
    /// A connect, read or write timed out (after the request was sent: the write may or
    /// may not have happened).
    Timeout,
    /// Anything else (a bad reply, another connect error).
    Other(String),
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects and reads the hello, with `timeout` on each step.
fn greet(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Refusal> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => Refusal::ConnectionRefused,
        // Accepted and reset before connect_timeout's poll returned.
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            Refusal::ClosedWithoutHello
        }
        _ if is_timeout(&e) => Refusal::Timeout,
        _ => Refusal::Other(format!("connect: {e}")),
    })?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| Refusal::Other(format!("socket options: {e}")))?;
    let mut hello = [0u8; HELLO_LEN];
    match s.read_exact(&mut hello) {
        Ok(()) if &hello[0..8] == INIT_PASSWD => Ok(s),
        Ok(()) => Err(Refusal::BadHello),
        Err(e) if is_timeout(&e) => Err(Refusal::Timeout),
        Err(_) => Err(Refusal::ClosedWithoutHello),
    }
}

/// Sends one WRITE of `block` at `offset` with `handle` and reads its reply.
fn write_once(s: &mut TcpStream, handle: u64, offset: u64, block: &[u8]) -> Result<(), Refusal> {
    let mut request = request_header(0, CMD_WRITE, handle, offset, block.len() as u32).to_vec();
    request.extend_from_slice(block);
    s.write_all(&request).map_err(|e| {
        if is_timeout(&e) {
            Refusal::Timeout
        } else {
            Refusal::ClosedBeforeReply
        }
    })?;
    let mut reply = [0u8; REPLY_LEN];
    s.read_exact(&mut reply).map_err(|e| {
        if is_timeout(&e) {
            Refusal::Timeout
        } else {
            Refusal::ClosedBeforeReply
        }
    })?;
    let magic = u32::from_be_bytes(reply[0..4].try_into().unwrap());
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    let got = u64::from_be_bytes(reply[8..16].try_into().unwrap());
    if magic != REPLY_MAGIC || got != handle {
        return Err(Refusal::Other(format!(
            "bad reply: magic {magic:#x}, handle {got:#x} for {handle:#x}"
        )));
    }
    if error != 0 {
        return Err(Refusal::Errno(error));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// accepts_write

/// The answer of [`accepts_write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// The server acknowledged the write: `data` at `offset` is now an acknowledged write.
    Accepted {
        offset: u64,
        data: Vec<u8>,
    },
    Refused(Refusal),
}

impl Probe {
    pub fn is_accepted(&self) -> bool {
        matches!(self, Probe::Accepted { .. })
    }

    /// The acknowledged block, to add to the expected set.
    pub fn acked(&self) -> Option<(u64, Vec<u8>)> {
        match self {
            Probe::Accepted { offset, data } => Some((*offset, data.clone())),
            Probe::Refused(_) => None,
        }
    }
}

/// Default deadline of every step of a probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Does the server at `addr` take a write now? Connects, reads the hello, writes one
/// stamped 4 KiB block at `offset` (unique to this probe) and reads the reply, each step
/// within [`PROBE_TIMEOUT`]; then disconnects.
pub fn accepts_write(addr: SocketAddr, offset: u64) -> Probe {
    accepts_write_within(addr, offset, PROBE_TIMEOUT)
}

pub fn accepts_write_within(addr: SocketAddr, offset: u64, timeout: Duration) -> Probe {
    let mut s = match greet(addr, timeout) {
        Ok(s) => s,
        Err(r) => return Probe::Refused(r),
    };
    let seq = NEXT_PROBE_SEQ.fetch_add(1, Ordering::Relaxed);
    let data = seq_block(seq);
    let handle = 0x5052_4f42_0000_0000 ^ seq;
    match write_once(&mut s, handle, offset, &data) {
        Ok(()) => {
            let _ = s.write_all(&request_header(0, CMD_DISC, handle + 1, 0, 0));
            Probe::Accepted { offset, data }
        }
        Err(r) => Probe::Refused(r),
    }
}

// ---------------------------------------------------------------------------------------
// SeqWriter

/// One acknowledged write.
#[derive(Clone, Debug)]
pub struct Ack {
    pub offset: u64,
    pub seq: u64,
    pub addr: SocketAddr,
    pub at: Instant,
}

/// A write that was sent but whose fate is unknown (or that failed), with the reason.
#[derive(Clone, Debug)]
pub struct Failed {
    pub offset: u64,
    pub seq: u64,
    pub addr: SocketAddr,
    pub at: Instant,
    pub why: Refusal,
}

/// One connection attempt: where, when, and whether it got a hello.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub addr: SocketAddr,
    pub at: Instant,
    pub result: Result<(), Refusal>,
}

/// Everything a [`SeqWriter`] did.
#[derive(Clone, Debug, Default)]
pub struct WriterLog {
    /// Writes acknowledged with error 0, in order.
    pub acked: Vec<Ack>,
    /// Writes answered with a non-zero error (`why` is `Errno`): they did not happen.
    pub errors: Vec<Failed>,
    /// Writes sent without a reply (closed, reset, timed out, bad reply): they may or may
    /// not have happened.
    pub unsure: Vec<Failed>,
    pub attempts: Vec<Attempt>,
    /// The writer used every offset once and stopped.
    pub exhausted: bool,
}

impl WriterLog {
    /// The blocks a file must hold: the acknowledged ones, (offset, content).
    pub fn expected(&self) -> Vec<(u64, Vec<u8>)> {
        let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
        for a in &self.acked {
            latest.insert(a.offset, a.seq);
        }
        latest
            .into_iter()
            .map(|(offset, seq)| (offset, seq_block(seq)))
            .collect()
    }

    pub fn acked_by(&self, addr: SocketAddr) -> usize {
        self.acked.iter().filter(|a| a.addr == addr).count()
    }

    /// The acknowledgements as runs of consecutive ones from the same server: with one
    /// hand-over from A to B, `[(A, n), (B, m)]`; a second writer taking over and going back
    /// shows as more runs.
    pub fn address_runs(&self) -> Vec<(SocketAddr, usize)> {
        let mut runs: Vec<(SocketAddr, usize)> = Vec::new();
        for a in &self.acked {
            match runs.last_mut() {
                Some((addr, n)) if *addr == a.addr => *n += 1,
                _ => runs.push((a.addr, 1)),
            }
        }
        runs
    }
}

/// How a [`SeqWriter`] behaves.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Servers to write to, tried in turn: the writer starts with the first and moves to
    /// the next whenever a connection fails or ends.
    pub addrs: Vec<SocketAddr>,
    /// Export size; offsets stay below it.
    pub size: u64,
    /// The writer stops after this long in any case.
    pub run_for: Duration,
    /// Deadline of a connect, the hello, a request, a reply.
    pub io_timeout: Duration,
    /// Pause between two writes.
    pub pause: Duration,
    /// Longest pause between two connection attempts (they start 10 ms apart and double).
    pub max_backoff: Duration,
    /// After this many error replies in a row, the writer moves to the next server.
    pub errors_before_switch: usize,
}

impl WriterOptions {
    pub fn new(addrs: &[SocketAddr], size: u64) -> WriterOptions {
        WriterOptions {
            addrs: addrs.to_vec(),
            size,
            run_for: Duration::from_secs(60),
            io_timeout: Duration::from_secs(2),
            pause: Duration::from_millis(1),
            max_backoff: Duration::from_millis(200),
            errors_before_switch: 3,
        }
    }
}

/// A writer thread; see the module's description. Dropping it stops it.
pub struct SeqWriter {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<WriterLog>>,
    thread: Option<JoinHandle<()>>,
}

fn locked(log: &Mutex<WriterLog>) -> MutexGuard<'_, WriterLog> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

impl SeqWriter {
    /// Starts writing to `addrs[0]` (then the others in turn) with the default options.
    pub fn start(addrs: &[SocketAddr], size: u64) -> SeqWriter {
        SeqWriter::start_with(WriterOptions::new(addrs, size))
    }

    pub fn start_with(opts: WriterOptions) -> SeqWriter {
        assert!(!opts.addrs.is_empty(), "the writer needs an address");
        let blocks = opts.size / BLOCK as u64;
        assert!(
            blocks > 0 && !blocks.is_multiple_of(STRIDE),
            "{blocks} blocks: offsets would repeat"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(WriterLog::default()));
        let (flag, sink) = (stop.clone(), log.clone());
        let thread = thread::Builder::new()
            .name("seq-writer".into())
            .spawn(move || write_loop(opts, &flag, &sink))
            .expect("spawning the writer");
        SeqWriter {
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> usize {
        locked(&self.log).acked.len()
    }

    /// A copy of the log so far.
    pub fn snapshot(&self) -> WriterLog {
        locked(&self.log).clone()
    }

    /// Waits until at least `n` writes are acknowledged (by `addr`, if given); false after
    /// `timeout` or if the writer stopped first.
    pub fn wait_acked(&self, n: usize, addr: Option<SocketAddr>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let got = {
                let log = locked(&self.log);
                match addr {
                    Some(a) => log.acked_by(a),
                    None => log.acked.len(),
                }
            };
            if got >= n {
                return true;
            }
            if Instant::now() >= deadline || self.is_finished() {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The writer ended by itself (deadline, offsets used up).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the writer (a request in flight finishes or times out first) and returns its
    /// log.
    pub fn stop(mut self) -> WriterLog {
        self.halt();
        locked(&self.log).clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A request in flight is bounded by io_timeout (at most two of them: the write
            // and the reply), a nap by 10 ms.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for SeqWriter {
    fn drop(&mut self) {
        self.halt();
    }
}

fn write_loop(opts: WriterOptions, stop: &AtomicBool, log: &Mutex<WriterLog>) {
    let blocks = opts.size / BLOCK as u64;
    let deadline = Instant::now() + opts.run_for;
    let mut at = 0usize;
    let first_backoff = opts.max_backoff.min(Duration::from_millis(10));
    let mut backoff = first_backoff;
    let mut conn: Option<TcpStream> = None;
    let mut errors_in_row = 0;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if seq >= blocks {
            locked(log).exhausted = true;
            break;
        }
        let addr = opts.addrs[at];
        let Some(stream) = conn.as_mut() else {
            let result = greet(addr, opts.io_timeout);
            locked(log).attempts.push(Attempt {
                addr,
                at: Instant::now(),
                result: result.as_ref().map(|_| ()).map_err(Refusal::clone),
            });
            match result {
                Ok(s) => {
                    conn = Some(s);
                    backoff = first_backoff;
                    errors_in_row = 0;
                }
                Err(_) => {
                    at = (at + 1) % opts.addrs.len();
                    nap(backoff, stop);
                    backoff = (backoff * 2).min(opts.max_backoff);
                }
            }
            continue;
        };
        let offset = (seq * STRIDE % blocks) * BLOCK as u64;
        let result = write_once(stream, seq, offset, &seq_block(seq));
        let now = Instant::now();
        let failed = move |why| Failed {
            offset,
            seq,
            addr,
            at: now,
            why,
        };
        seq += 1;
        match result {
            Ok(()) => {
                errors_in_row = 0;
                backoff = first_backoff;
                locked(log).acked.push(Ack {
                    offset,
                    seq: seq - 1,
                    addr,
                    at: now,
                });
            }
            Err(Refusal::Errno(e)) => {
                locked(log).errors.push(failed(Refusal::Errno(e)));
                errors_in_row += 1;
                if errors_in_row >= opts.errors_before_switch {
                    conn = None;
                    at = (at + 1) % opts.addrs.len();
                }
                nap(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
            Err(why) => {
                locked(log).unsure.push(failed(why));
                conn = None;
                at = (at + 1) % opts.addrs.len();
                nap(backoff, stop);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
        if !opts.pause.is_zero() {
            nap(opts.pause, stop);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The check

/// Checks that the file at `path` holds every acknowledged block `(offset, content)`;
/// otherwise says how many are missing and what is at the first few of their offsets.
pub fn check_holds_all(path: &Path, acked: &[(u64, Vec<u8>)]) -> Result<(), String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut missing: Vec<(u64, String)> = Vec::new();
    let mut buf = Vec::new();
    for (offset, data) in acked {
        buf.clear();
        buf.resize(data.len(), 0);
        let got = match file.read_exact_at(&mut buf, *offset) {
            Ok(()) => &buf[..],
            Err(_) => {
                // Past the end: compare what there is.
                let len = file
                    .metadata()
                    .map(|m| m.len().saturating_sub(*offset) as usize)
                    .unwrap_or(0)
                    .min(data.len());
                let _ = file.read_exact_at(&mut buf[..len], *offset);
                &buf[..len]
            }
        };
        if got != &data[..] {
            missing.push((*offset, describe(got)));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = missing
        .iter()
        .take(5)
        .map(|(o, what)| format!("{o} ({what})"))
        .collect();
    Err(format!(
        "{} of {} acknowledged blocks missing from {}; first at offsets: {}",
        missing.len(),
        acked.len(),
        path.display(),
        first.join(", ")
    ))
}
