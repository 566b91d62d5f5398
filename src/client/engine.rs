//! The transmission phase of an NBD client: requests pipelined on the write half of the
//! connection, replies matched by cookie on a reader task.
//!
//! - At most [`EngineConfig::in_flight`] transfers are in flight; [`Engine::drain`] waits
//!   until all are acknowledged.
//! - NBD gives requests in flight no order, so a write or zero range is never sent while an
//!   earlier one overlapping it is unanswered ([`Engine::write`], [`Engine::zeroes`]).
//! - An inactivity limit: while requests are outstanding and no byte has moved either way
//!   for the limit (changeable with [`Engine::set_limit`]), the connection fails.
//! - Acknowledged data and zero-range bytes are counted in an [`Acknowledged`] the caller
//!   shares.
//! - Any failure (the connection, an error reply to a write, a bad reply) fails the engine:
//!   every later call returns the first failure's reason.
//! - [`Engine::forward`] carries any request as it came (the proxy): the caller's cookie,
//!   command, flags and payload, and hands the reply back (its error, and the data of a
//!   successful READ) instead of failing the engine on an error reply. Forwarded requests
//!   are not ordered against each other: the client that sent them chose their order.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::tls::{ReadHalf, Stream, WriteHalf};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::protocol::handoff::{
    answer_length, HandoffReply, HandoffRequest, Identity, HANDOFF, IDENTIFY, PROBE,
};
use crate::protocol::reply::decode_simple_reply;
use crate::protocol::request::HeaderStyle;
use crate::protocol::{Command, Errno, Request, SIMPLE_REPLY_LEN};

/// Payloads smaller than this go in the same write as their header: one segment, one
/// syscall.
const JOIN_BELOW: usize = 64 * 1024;
/// [`Engine::queue`] writes its buffer once it holds this much.
pub const QUEUE_LIMIT: usize = 256 * 1024;

/// How often the reader checks the inactivity limit while it waits.
const TICK: Duration = Duration::from_millis(250);

/// The engine's settings, fixed when it starts (but see [`Engine::set_limit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Transfers (writes, zero ranges, flushes) in flight at most.
    pub in_flight: usize,
    /// Largest zero-range request; longer ranges are split.
    pub zero_size: u64,
    /// The inactivity limit to start with.
    pub limit: Duration,
}

/// Bytes the server acknowledged, shared with whoever reports progress.
#[derive(Debug, Default)]
pub struct Acknowledged {
    data: AtomicU64,
    zeroed: AtomicU64,
}

impl Acknowledged {
    /// Data bytes acknowledged (WRITEs).
    pub fn data(&self) -> u64 {
        self.data.load(Ordering::Relaxed)
    }

    /// Zero-range bytes acknowledged (WRITE_ZEROES).
    pub fn zeroed(&self) -> u64 {
        self.zeroed.load(Ordering::Relaxed)
    }

    /// Starts counting again from 0.
    pub fn reset(&self) {
        self.data.store(0, Ordering::Relaxed);
        self.zeroed.store(0, Ordering::Relaxed);
    }

    fn add(&self, data: bool, len: u64) {
        let counter = if data { &self.data } else { &self.zeroed };
        counter.fetch_add(len, Ordering::Relaxed);
    }
}

/// A request carried as it came, for a proxy: the header (command, flags, and the caller's
/// cookie, which the server echoes) and the payload (a WRITE's data; empty otherwise).
///
/// The caller keeps a copy (`Bytes` clones are cheap) so that it can send it again,
/// byte-identical, on a new connection if this one fails before the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub request: Request,
    pub payload: Bytes,
}

/// The server's answer to a [`Forward`]: its error (0 for success), and the data of a
/// successful READ (empty for everything else, and for an error: an error reply carries no
/// data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub error: u32,
    pub data: Bytes,
}

/// Why a request failed. The texts are those of the mirror's log lines and of
/// `migration_last_failure`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The connection failed (the reply reader's reason): every later request fails too.
    #[error("{0}")]
    Failed(String),
    #[error("request too long: {0}")]
    TooLong(Errno),
    #[error("sending to the destination failed: {0}")]
    Send(#[source] io::Error),
    /// A request could not be written within the inactivity limit.
    #[error("the destination stopped reading")]
    StoppedReading,
    #[error("{0}")]
    Closed(#[from] tokio::sync::AcquireError),
    #[error("a bad identity: {0}")]
    BadIdentity(String),
    /// The probe was answered with an error other than EINVAL.
    #[error("the destination answered the probe with error {0}")]
    Probe(Errno),
    /// A hand-off message was refused or its answer does not decode.
    #[error("{0}")]
    Handoff(String),
    /// A forwarded request reused the cookie of one still in flight: its answer could not
    /// be told from the other's.
    #[error("cookie {0:#x} is already in flight on this connection")]
    CookieInUse(u64),
}

fn process_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Tells whoever asked for a range to be sent whether the destination acknowledged every
/// request that carried it (active mirroring: a client's write is answered only then).
///
/// Each request takes an [`AckToken`]; the caller [`seal`](Ack::seal)s the `Ack` once the
/// last request of the range is queued. The answer goes out when the `Ack` and every token
/// are gone: `true` only if it was sealed and every token was acknowledged. A token dropped
/// unacknowledged (an error reply, a failed connection, an engine dropped with requests in
/// flight) and an `Ack` dropped unsealed (the range was not all sent) answer `false`.
pub struct Ack(Arc<AckState>);

struct AckState {
    sealed: AtomicBool,
    failed: AtomicBool,
    done: Mutex<Option<oneshot::Sender<bool>>>,
}

impl Drop for AckState {
    fn drop(&mut self) {
        let ok = *self.sealed.get_mut() && !*self.failed.get_mut();
        if let Some(done) = self.done.get_mut().ok().and_then(Option::take) {
            let _ = done.send(ok);
        }
    }
}

impl Ack {
    /// `done` receives the answer.
    pub fn new(done: oneshot::Sender<bool>) -> Ack {
        Ack(Arc::new(AckState {
            sealed: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            done: Mutex::new(Some(done)),
        }))
    }

    /// Every request of the range has been queued.
    pub fn seal(self) {
        self.0.sealed.store(true, Ordering::SeqCst);
    }

    fn token(&self) -> AckToken {
        AckToken {
            state: self.0.clone(),
            acknowledged: false,
        }
    }
}

/// One request's share of an [`Ack`].
struct AckToken {
    state: Arc<AckState>,
    acknowledged: bool,
}

impl AckToken {
    fn acknowledged(mut self) {
        self.acknowledged = true;
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        if !self.acknowledged {
            self.state.failed.store(true, Ordering::SeqCst);
        }
    }
}

/// What a request in flight is waiting for.
enum Pending {
    /// A write or zero range: counted once acknowledged.
    Transfer {
        /// Where it writes: no other write to an overlapping range is sent until it is
        /// acknowledged.
        at: u64,
        len: u64,
        data: bool,
        _slot: OwnedSemaphorePermit,
        /// Whoever waits for this range to reach the destination.
        ack: Option<AckToken>,
    },
    Probe(oneshot::Sender<u32>),
    Handoff(oneshot::Sender<Result<HandoffReply, String>>),
    /// The answer to IDENTIFY: `None` when the destination answered an error (it is not
    /// one of ours).
    Identify(oneshot::Sender<Result<Option<Identity>, String>>),
    /// A forwarded request: `read` data bytes follow a successful reply (a READ's length).
    Forward {
        read: u64,
        answer: oneshot::Sender<Answer>,
        _slot: OwnedSemaphorePermit,
    },
}

/// A connection in its transmission phase: requests pipelined on the write half, replies
/// matched by cookie on a reader task (which ends when the engine is dropped).
pub struct Engine {
    writer: WriteHalf,
    flags: u16,
    in_flight: usize,
    zero_size: u64,
    slots: Arc<Semaphore>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    next_cookie: u64,
    /// Cancelled when the reader fails; carries the reason in `failure`.
    failed: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
    /// When bytes last moved either way (process milliseconds): the inactivity limit
    /// counts from here while requests are outstanding.
    activity: Arc<AtomicU64>,
    /// The inactivity limit in milliseconds (shorter once the doors are closed).
    limit_ms: Arc<AtomicU64>,
    /// Signalled by the reply reader after every answered request.
    completed: Arc<tokio::sync::Notify>,
    /// Requests [`Engine::queue`] buffered, not yet written.
    queued: Vec<u8>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Engine {
    /// Starts the reply reader on `stream`, a connection past its handshake whose server
    /// announced transmission `flags`. Cancelling `cancel` fails the engine; acknowledged
    /// bytes are added to `acked`.
    pub fn start(
        stream: Stream,
        flags: u16,
        acked: Arc<Acknowledged>,
        cancel: &CancellationToken,
        config: EngineConfig,
    ) -> Engine {
        let limit_ms = Arc::new(AtomicU64::new(config.limit.as_millis() as u64));
        let completed = Arc::new(tokio::sync::Notify::new());
        let (read_half, writer) = stream.into_split();
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
        let failed = cancel.child_token();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let activity = Arc::new(AtomicU64::new(process_ms()));
        let reader = tokio::spawn(read_replies(
            read_half,
            Replies {
                pending: pending.clone(),
                acked,
                failed: failed.clone(),
                failure: failure.clone(),
                activity: activity.clone(),
                limit_ms: limit_ms.clone(),
                completed: completed.clone(),
            },
        ));
        Engine {
            writer,
            flags,
            in_flight: config.in_flight,
            zero_size: config.zero_size,
            slots: Arc::new(Semaphore::new(config.in_flight)),
            pending,
            next_cookie: 1,
            failed,
            failure,
            reader,
            activity,
            limit_ms,
            completed,
            queued: Vec::new(),
        }
    }

    /// The server's transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Sets the inactivity limit from now on.
    pub fn set_limit(&self, limit: Duration) {
        self.limit_ms
            .store(limit.as_millis() as u64, Ordering::Relaxed);
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.limit_ms.load(Ordering::Relaxed))
    }

    fn failure(&self) -> EngineError {
        let why = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "the connection to the destination failed".into());
        EngineError::Failed(why)
    }

    async fn send(
        &mut self,
        command: Command,
        offset: u64,
        length: u64,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), EngineError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let request = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        self.send_request(&request, payload, pending).await
    }

    /// Registers `pending` under the request's cookie and writes the request and its
    /// payload. The inactivity limit applies to the writing: every byte that moves restarts
    /// it, so a long payload on a slow link is not cut (flexnbd §12.4).
    async fn send_request(
        &mut self,
        request: &Request,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), EngineError> {
        let mut header = Vec::with_capacity(28 + payload.len().min(JOIN_BELOW));
        request
            .encode(HeaderStyle::Compact, &mut header)
            .map_err(EngineError::TooLong)?;
        let joined = payload.len() < JOIN_BELOW;
        if joined {
            header.extend_from_slice(payload);
        }
        if let Ok(mut map) = self.pending.lock() {
            map.insert(request.cookie, pending);
        }
        self.activity.store(process_ms(), Ordering::Relaxed);
        let limit = self.limit();
        let activity = self.activity.clone();
        let writer = &mut self.writer;
        let write = async {
            write_progressing(writer, &header, limit, &activity).await?;
            if !joined {
                write_progressing(writer, payload, limit, &activity).await?;
            }
            Ok(())
        };
        tokio::select! {
            result = write => result,
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Sends `forward` as it is (its cookie, command, flags and payload) and returns where
    /// its answer will arrive. An error reply is an answer like any other; only a failed
    /// connection fails the engine, and then the receiver is dropped unanswered (see
    /// [`Engine::failed`] for why). Waits for a free slot first (backpressure).
    ///
    /// Cookies are the caller's: it must not reuse one still in flight
    /// ([`EngineError::CookieInUse`]), nor mix `forward` with the engine's own requests on
    /// one connection.
    pub async fn forward(
        &mut self,
        forward: &Forward,
    ) -> Result<oneshot::Receiver<Answer>, EngineError> {
        // Whatever was queued goes first: requests leave in the caller's order.
        self.flush_queue().await?;
        let slot = self.slot().await?;
        let (pending, rx) = self.forwarded(forward, slot)?;
        self.send_request(&forward.request, &forward.payload, pending)
            .await?;
        Ok(rx)
    }

    /// Like [`Engine::forward`], but a request with a small payload is only appended to a
    /// buffer, which [`Engine::flush_queue`] writes (or this call, once it holds
    /// [`QUEUE_LIMIT`] bytes): requests that arrive together leave in one write. The caller
    /// must call `flush_queue` before it waits for anything.
    pub async fn queue(
        &mut self,
        forward: &Forward,
    ) -> Result<oneshot::Receiver<Answer>, EngineError> {
        if forward.payload.len() >= JOIN_BELOW {
            return self.forward(forward).await;
        }
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            // No slot until an answer comes, and none comes for what is still queued.
            Err(_) => {
                self.flush_queue().await?;
                self.slot().await?
            }
        };
        if self.failed.is_cancelled() {
            return Err(self.failure());
        }
        let mut header = Vec::with_capacity(32);
        forward
            .request
            .encode(HeaderStyle::Compact, &mut header)
            .map_err(EngineError::TooLong)?;
        let (pending, rx) = self.forwarded(forward, slot)?;
        if let Ok(mut map) = self.pending.lock() {
            map.insert(forward.request.cookie, pending);
        }
        self.queued.extend_from_slice(&header);
        self.queued.extend_from_slice(&forward.payload);
        if self.queued.len() >= QUEUE_LIMIT {
            self.flush_queue().await?;
        }
        Ok(rx)
    }

    /// Writes what [`Engine::queue`] buffered.
    pub async fn flush_queue(&mut self) -> Result<(), EngineError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.queued);
        self.activity.store(process_ms(), Ordering::Relaxed);
        let limit = self.limit();
        let activity = self.activity.clone();
        let write = write_progressing(&mut self.writer, &bytes, limit, &activity);
        let result = tokio::select! {
            result = write => result,
            () = self.failed.cancelled() => Err(self.failure()),
        };
        // The allocation is kept for the next batch.
        self.queued = bytes;
        self.queued.clear();
        result
    }

    /// The entry a forwarded request waits in, and where its answer will arrive.
    fn forwarded(
        &self,
        forward: &Forward,
        slot: OwnedSemaphorePermit,
    ) -> Result<(Pending, oneshot::Receiver<Answer>), EngineError> {
        let cookie = forward.request.cookie;
        if self.pending.lock().is_ok_and(|p| p.contains_key(&cookie)) {
            return Err(EngineError::CookieInUse(cookie));
        }
        let read = match forward.request.command {
            Command::Read => forward.request.length,
            _ => 0,
        };
        let (answer, rx) = oneshot::channel();
        let pending = Pending::Forward {
            read,
            answer,
            _slot: slot,
        };
        Ok((pending, rx))
    }

    /// Waits until the engine fails, and says why. Answers already delivered stay in their
    /// receivers; every request still unanswered then was forgotten by the engine.
    pub async fn failed(&self) -> EngineError {
        self.failed.cancelled().await;
        self.failure()
    }

    /// True once the engine has failed.
    pub fn has_failed(&self) -> bool {
        self.failed.is_cancelled()
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, EngineError> {
        tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.map_err(EngineError::Closed),
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Waits until no request in flight writes to a range overlapping `[offset, offset +
    /// len)`. NBD gives no order to requests in flight: a server may apply them in any
    /// order (ours runs small writes inline and long ones on its write thread), so a block
    /// rewritten by a later pass must not be sent while the earlier write covering it is
    /// unanswered, or the older data could land last.
    async fn await_no_overlap(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let end = offset.saturating_add(len);
        loop {
            let completed = self.completed.notified();
            tokio::pin!(completed);
            completed.as_mut().enable();
            let overlaps = self.pending.lock().is_ok_and(|pending| {
                pending.values().any(|p| match p {
                    Pending::Transfer { at, len, .. } => *len > 0 && *at < end && offset < at + len,
                    _ => false,
                })
            });
            if !overlaps {
                return Ok(());
            }
            tokio::select! {
                () = completed => {}
                () = self.failed.cancelled() => return Err(self.failure()),
            }
        }
    }

    /// Sends a WRITE of `data` at `offset` once no write in flight overlaps it; returns
    /// once it is on the wire (its reply is counted in [`Acknowledged`], and answers `ack`).
    pub async fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        ack: Option<&Ack>,
    ) -> Result<(), EngineError> {
        let len = data.len() as u64;
        self.await_no_overlap(offset, len).await?;
        let slot = self.slot().await?;
        self.send(
            Command::Write,
            offset,
            len,
            &data,
            Pending::Transfer {
                at: offset,
                len,
                data: true,
                _slot: slot,
                ack: ack.map(Ack::token),
            },
        )
        .await
    }

    /// Zeroes `[offset, offset + len)` with WRITE_ZEROES requests of at most
    /// [`EngineConfig::zero_size`] (for a server that takes them: ours, or a new-style one
    /// advertising WRITE_ZEROES). Each request answers `ack`.
    pub async fn zeroes(
        &mut self,
        offset: u64,
        len: u64,
        ack: Option<&Ack>,
    ) -> Result<(), EngineError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(self.zero_size);
            self.await_no_overlap(offset + done, n).await?;
            let slot = self.slot().await?;
            self.send(
                Command::WriteZeroes,
                offset + done,
                n,
                &[],
                Pending::Transfer {
                    at: offset + done,
                    len: n,
                    data: false,
                    _slot: slot,
                    ack: ack.map(Ack::token),
                },
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Waits until every request has been acknowledged.
    pub async fn drain(&mut self) -> Result<(), EngineError> {
        let all = self.in_flight as u32;
        tokio::select! {
            biased;
            permits = self.slots.acquire_many(all) => {
                drop(permits);
                // A refused write frees its slot as the reader fails the engine: every
                // slot back does not mean every request succeeded.
                if self.failed.is_cancelled() {
                    return Err(self.failure());
                }
                Ok(())
            }
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Waits until every request is acknowledged, then asks the destination to make them
    /// durable (NBD FLUSH).
    pub async fn flush(&mut self) -> Result<(), EngineError> {
        self.drain().await?;
        let slot = self.slot().await?;
        self.send(
            Command::Flush,
            0,
            0,
            &[],
            Pending::Transfer {
                at: 0,
                len: 0,
                data: false,
                _slot: slot,
                ack: None,
            },
        )
        .await?;
        self.drain().await
    }

    /// Asks the destination who it is: `None` unless it is a server of ours.
    pub async fn identify(&mut self) -> Result<Option<Identity>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unknown(IDENTIFY), 0, 0, &[], Pending::Identify(tx))
            .await?;
        tokio::select! {
            biased;
            answer = rx => match answer {
                Ok(Ok(identity)) => Ok(identity),
                Ok(Err(why)) => Err(EngineError::BadIdentity(why)),
                Err(_) => Err(self.failure()),
            },
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Asks whether the destination is ours (it answers 0); C flexnbd, qemu-nbd and
    /// nbdkit answer EINVAL. Any other error is a destination that fails (flexnbd §10.7):
    /// the attempt is retried, it is not taken for a legacy peer.
    pub async fn probe(&mut self) -> Result<bool, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unknown(PROBE), 0, 0, &[], Pending::Probe(tx))
            .await?;
        let error = tokio::select! {
            answer = rx => answer.map_err(|_| self.failure())?,
            () = self.failed.cancelled() => return Err(self.failure()),
        };
        match Errno(error) {
            Errno(0) => Ok(true),
            Errno::EINVAL => Ok(false),
            other => Err(EngineError::Probe(other)),
        }
    }

    pub async fn handoff(&mut self, message: HandoffRequest) -> Result<HandoffReply, EngineError> {
        let encoded = message.encode();
        let (tx, rx) = oneshot::channel();
        self.send(
            Command::Unknown(HANDOFF),
            0,
            encoded.len() as u64,
            &encoded,
            Pending::Handoff(tx),
        )
        .await?;
        // Biased, as in `probe`: after Committed the destination closes the connection, and
        // that must not hide the answer that came first.
        tokio::select! {
            biased;
            answer = rx => match answer {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(why)) => Err(EngineError::Handoff(why)),
                Err(_) => Err(self.failure()),
            },
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// flexnbd's hand-off: a DISC (no reply is awaited), then the socket is closed.
    pub async fn disconnect(mut self) -> io::Result<()> {
        let request = Request {
            flags: 0,
            command: Command::Disconnect,
            cookie: u64::from_be_bytes(*b".MIRROR."),
            offset: 0,
            length: 0,
        };
        let mut header = Vec::with_capacity(28);
        let _ = request.encode(HeaderStyle::Compact, &mut header);
        self.writer.write_all(&header).await?;
        self.writer.shutdown().await
    }
}

/// Writes all of `bytes`, failing only when no byte could be written for `limit`: the
/// limit measures inactivity, not the whole transfer.
async fn write_progressing(
    writer: &mut WriteHalf,
    bytes: &[u8],
    limit: Duration,
    activity: &AtomicU64,
) -> Result<(), EngineError> {
    let mut at = 0;
    while at < bytes.len() {
        match tokio::time::timeout(limit, writer.write(&bytes[at..])).await {
            Ok(Ok(0)) => return Err(EngineError::Send(io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => {
                at += n;
                activity.store(process_ms(), Ordering::Relaxed);
            }
            Ok(Err(e)) => return Err(EngineError::Send(e)),
            Err(_) => return Err(EngineError::StoppedReading),
        }
    }
    Ok(())
}

/// What the reply reader shares with the engine.
struct Replies {
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    acked: Arc<Acknowledged>,
    failed: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
    activity: Arc<AtomicU64>,
    limit_ms: Arc<AtomicU64>,
    completed: Arc<tokio::sync::Notify>,
}

impl Replies {
    /// Fails the engine. The requests in flight are forgotten at once: their slots come
    /// back, and whoever waits for one of them (an [`Ack`], a hand-off answer) is answered
    /// now rather than when the engine is dropped.
    fn fail(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
        self.failed.cancel();
        let forgotten = self.pending.lock().map(|mut p| std::mem::take(&mut *p));
        drop(forgotten);
    }

    fn outstanding(&self) -> bool {
        self.pending.lock().map(|p| !p.is_empty()).unwrap_or(false)
    }
}

/// Reads until `buf` holds `n` bytes. Reading is cancel-safe (`read_buf` into a buffer that
/// outlives each wait), so a tick that checks the inactivity limit loses no bytes. Fails the
/// engine when requests are outstanding and no byte has moved for the limit (flexnbd
/// §10.10), whenever the request was sent relative to the start of this wait.
///
/// `mid_reply`: the bytes awaited belong to a reply already begun (a hand-off answer after
/// its header), whose request is no longer counted as outstanding: the limit applies all
/// the same.
async fn fill(
    reader: &mut ReadHalf,
    buf: &mut BytesMut,
    n: usize,
    shared: &Replies,
    mid_reply: bool,
) -> Result<(), String> {
    // Room for all that is awaited at once (a READ's data arrives without reallocations),
    // and for more: replies that arrived together are read together.
    buf.reserve(n.saturating_sub(buf.len()).max(READ_AHEAD));
    while buf.len() < n {
        tokio::select! {
            read = reader.read_buf(buf) => match read {
                Ok(0) => return Err("the connection to the destination ended".into()),
                Ok(_) => shared.activity.store(process_ms(), Ordering::Relaxed),
                Err(e) => return Err(format!("reading from the destination failed: {e}")),
            },
            () = tokio::time::sleep(TICK) => {
                let idle = process_ms().saturating_sub(shared.activity.load(Ordering::Relaxed));
                let limit = shared.limit_ms.load(Ordering::Relaxed);
                if (mid_reply || shared.outstanding()) && idle > limit {
                    return Err(format!("the destination answered nothing for {limit} ms"));
                }
            }
            () = shared.failed.cancelled() => return Err("cancelled".into()),
        }
    }
    Ok(())
}

/// The reader task: matches replies to requests; any error fails the engine. An answer is
/// always delivered before a failure that follows it is reported.
async fn read_replies(mut reader: ReadHalf, shared: Replies) {
    let mut buf = BytesMut::with_capacity(4096);
    let pool = Arc::new(Pool::default());
    loop {
        if let Err(why) = fill(&mut reader, &mut buf, SIMPLE_REPLY_LEN, &shared, false).await {
            shared.fail(why);
            return;
        }
        let header: [u8; SIMPLE_REPLY_LEN] = buf[..SIMPLE_REPLY_LEN].try_into().expect("16 bytes");
        let _ = buf.split_to(SIMPLE_REPLY_LEN);
        let Some(reply) = decode_simple_reply(&header) else {
            shared.fail("the destination sent a reply with a bad magic number".into());
            return;
        };
        let Some(entry) = shared
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&reply.cookie))
        else {
            shared.fail(format!(
                "the destination answered an unknown request {:#x}",
                reply.cookie
            ));
            return;
        };
        match entry {
            Pending::Transfer { len, data, ack, .. } => {
                if reply.error != 0 {
                    shared.fail(format!(
                        "the destination refused a write with error {}",
                        crate::protocol::Errno(reply.error)
                    ));
                    return;
                }
                shared.acked.add(data, len);
                if let Some(ack) = ack {
                    ack.acknowledged();
                }
                // It is out of `pending`: writes waiting for its range may go now.
                shared.completed.notify_waiters();
            }
            Pending::Probe(tx) => {
                let _ = tx.send(reply.error);
            }
            Pending::Forward { read, answer, .. } => {
                let data = if reply.error == 0 && read > 0 {
                    // The length was sent as a 32-bit field, so it fits in memory.
                    let n = read as usize;
                    let data = if n >= POOL_FROM {
                        read_pooled(&mut reader, &mut buf, n, &shared, &pool).await
                    } else {
                        fill(&mut reader, &mut buf, n, &shared, true)
                            .await
                            .map(|()| buf.split_to(n).freeze())
                    };
                    match data {
                        Ok(data) => data,
                        Err(why) => {
                            shared.fail(format!("reading the data of a READ reply failed: {why}"));
                            return;
                        }
                    }
                } else {
                    Bytes::new()
                };
                let _ = answer.send(Answer {
                    error: reply.error,
                    data,
                });
            }
            Pending::Handoff(tx) => {
                if reply.error != 0 {
                    let _ = tx.send(Err(format!(
                        "the destination refused the hand-off message (error {})",
                        reply.error
                    )));
                    continue;
                }
                match read_answer(&mut reader, &mut buf, &shared).await {
                    Ok(bytes) => {
                        let _ = tx.send(HandoffReply::decode(&bytes).map_err(|e| e.to_string()));
                    }
                    Err(why) => {
                        shared.fail(format!("reading the hand-off answer failed: {why}"));
                        return;
                    }
                }
            }
            Pending::Identify(tx) => {
                if reply.error != 0 {
                    let _ = tx.send(Ok(None));
                    continue;
                }
                match read_answer(&mut reader, &mut buf, &shared).await {
                    Ok(bytes) => {
                        let identity = Identity::decode(&bytes).map_err(|e| e.to_string());
                        let _ = tx.send(identity.map(Some));
                    }
                    Err(why) => {
                        shared.fail(format!("reading the identity failed: {why}"));
                        return;
                    }
                }
            }
        }
    }
}

/// The reply reader asks the socket for at least this much at a time.
const READ_AHEAD: usize = 64 * 1024;
/// READ data of at least this many bytes is read into a buffer from the reader's [`Pool`].
const POOL_FROM: usize = 64 * 1024;
/// Bytes of free buffers a [`Pool`] keeps for reuse at most.
const POOL_KEEP: usize = 16 << 20;
/// Pooled buffers are a multiple of this long.
const POOL_STEP: usize = 64 * 1024;

/// Buffers for long READ data, reused once the caller drops the data: a fresh allocation
/// per READ (and the page faults of touching it) cost more than the copy itself.
#[derive(Default)]
struct Pool {
    /// Free buffers, oldest first, each initialised over its length (a multiple of
    /// [`POOL_STEP`]).
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// A buffer of at least `n` bytes (its length), initialised.
    fn take(&self, n: usize) -> Vec<u8> {
        let size = n.div_ceil(POOL_STEP) * POOL_STEP;
        if let Ok(mut free) = self.free.lock() {
            if let Some(i) = free.iter().position(|b| b.len() == size) {
                return free.swap_remove(i);
            }
        }
        vec![0; size]
    }

    /// Keeps `buf` for reuse, dropping the oldest free buffers to stay within
    /// [`POOL_KEEP`].
    fn give(&self, buf: Vec<u8>) {
        if buf.len() > POOL_KEEP {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            let mut kept: usize = free.iter().map(Vec::len).sum();
            while kept + buf.len() > POOL_KEEP {
                kept -= free.remove(0).len();
            }
            free.push(buf);
        }
    }
}

/// The first `len` bytes of a pooled buffer, handed back to the pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// Reads `n` bytes of READ data into a pooled buffer: what `buf` already holds first, then
/// straight from the socket (no more than `n`: what follows stays for `buf`). The
/// inactivity limit applies as in [`fill`].
async fn read_pooled(
    reader: &mut ReadHalf,
    buf: &mut BytesMut,
    n: usize,
    shared: &Replies,
    pool: &Arc<Pool>,
) -> Result<Bytes, String> {
    let mut data = pool.take(n);
    let mut at = buf.len().min(n);
    data[..at].copy_from_slice(&buf[..at]);
    let _ = buf.split_to(at);
    while at < n {
        tokio::select! {
            read = reader.read(&mut data[at..n]) => match read {
                Ok(0) => return Err("the connection to the destination ended".into()),
                Ok(got) => {
                    at += got;
                    shared.activity.store(process_ms(), Ordering::Relaxed);
                }
                Err(e) => return Err(format!("reading from the destination failed: {e}")),
            },
            () = tokio::time::sleep(TICK) => {
                let idle = process_ms().saturating_sub(shared.activity.load(Ordering::Relaxed));
                let limit = shared.limit_ms.load(Ordering::Relaxed);
                if idle > limit {
                    return Err(format!("the destination answered nothing for {limit} ms"));
                }
            }
            () = shared.failed.cancelled() => return Err("cancelled".into()),
        }
    }
    Ok(Bytes::from_owner(Pooled {
        buf: data,
        len: n,
        pool: pool.clone(),
    }))
}

/// The body that follows a successful reply to IDENTIFY or HANDOFF: a bounded 32-bit
/// length, then that many bytes.
async fn read_answer(
    reader: &mut ReadHalf,
    buf: &mut BytesMut,
    shared: &Replies,
) -> Result<BytesMut, String> {
    fill(reader, buf, 4, shared, true).await?;
    let n = answer_length(buf[..4].try_into().expect("4 bytes")).map_err(|e| e.to_string())?;
    fill(reader, buf, 4 + n, shared, true).await?;
    let _ = buf.split_to(4);
    Ok(buf.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::reply::simple_reply;
    use crate::protocol::request::{decode_header, Header};
    use crate::protocol::COMPACT_REQUEST_LEN;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(5);

    /// An engine on a loopback connection, and the server's end of it.
    async fn pair(limit: Duration) -> (Engine, TcpStream, Arc<Acknowledged>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let acked = Arc::new(Acknowledged::default());
        let engine = Engine::start(
            Stream::Plain(client),
            13,
            acked.clone(),
            &CancellationToken::new(),
            EngineConfig {
                in_flight: 8,
                zero_size: 1 << 20,
                limit,
            },
        );
        (engine, server, acked)
    }

    /// The next request the server receives, with its payload for a WRITE.
    async fn request(server: &mut TcpStream) -> (Request, Vec<u8>) {
        let mut header = [0u8; COMPACT_REQUEST_LEN];
        server.read_exact(&mut header).await.unwrap();
        let Header::Request(request) = decode_header(&header, HeaderStyle::Compact) else {
            panic!("bad magic")
        };
        let mut payload = Vec::new();
        if request.command == Command::Write {
            payload.resize(request.length as usize, 0);
            server.read_exact(&mut payload).await.unwrap();
        }
        (request, payload)
    }

    async fn nothing_arrives(server: &mut TcpStream) {
        let mut byte = [0u8; 1];
        assert!(
            timeout(Duration::from_millis(200), server.read(&mut byte))
                .await
                .is_err(),
            "a request was sent"
        );
    }

    #[tokio::test]
    async fn an_overlapping_write_waits_for_the_one_in_flight() {
        let (mut engine, mut server, acked) = pair(WAIT).await;
        engine
            .write(0, Bytes::from(vec![1u8; 4096]), None)
            .await
            .unwrap();
        let (first, data) = request(&mut server).await;
        assert_eq!(
            (first.command, first.offset, data.len()),
            (Command::Write, 0, 4096)
        );

        // Overlapping the unanswered first write: not sent.
        let second = timeout(
            Duration::from_millis(300),
            engine.write(2048, Bytes::from(vec![2u8; 4096]), None),
        )
        .await;
        assert!(second.is_err(), "sent over a write in flight");
        nothing_arrives(&mut server).await;
        // A write elsewhere goes at once.
        engine
            .write(8192, Bytes::from(vec![3u8; 512]), None)
            .await
            .unwrap();
        let (third, _) = request(&mut server).await;
        assert_eq!(third.offset, 8192);

        server
            .write_all(&simple_reply(first.cookie, None))
            .await
            .unwrap();
        timeout(WAIT, engine.write(2048, Bytes::from(vec![2u8; 4096]), None))
            .await
            .unwrap()
            .unwrap();
        let (second, data) = request(&mut server).await;
        assert_eq!((second.offset, data[0]), (2048, 2));
        server
            .write_all(&simple_reply(second.cookie, None))
            .await
            .unwrap();
        server
            .write_all(&simple_reply(third.cookie, None))
            .await
            .unwrap();
        timeout(WAIT, engine.drain()).await.unwrap().unwrap();
        assert_eq!((acked.data(), acked.zeroed()), (4096 + 4096 + 512, 0));
    }

    #[tokio::test]
    async fn zero_ranges_are_split_and_counted() {
        let (mut engine, mut server, acked) = pair(WAIT).await;
        engine.zeroes(0, (5 << 20) / 2, None).await.unwrap();
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let (r, _) = request(&mut server).await;
            assert_eq!(r.command, Command::WriteZeroes);
            lengths.push((r.offset, r.length));
            server
                .write_all(&simple_reply(r.cookie, None))
                .await
                .unwrap();
        }
        assert_eq!(
            lengths,
            [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 19)]
        );
        timeout(WAIT, engine.drain()).await.unwrap().unwrap();
        assert_eq!((acked.data(), acked.zeroed()), (0, (5 << 20) / 2));
    }

    #[tokio::test]
    async fn a_refused_write_fails_the_engine() {
        let (mut engine, mut server, acked) = pair(WAIT).await;
        engine
            .write(0, Bytes::from(vec![1u8; 512]), None)
            .await
            .unwrap();
        let (r, _) = request(&mut server).await;
        server
            .write_all(&simple_reply(r.cookie, Some(Errno::ENOSPC)))
            .await
            .unwrap();
        timeout(WAIT, engine.failed.cancelled()).await.unwrap();
        // Its slot is back, but drain must not report success: a legacy hand-off would
        // remove the source file and send DISC after a refused final write.
        let error = engine.drain().await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the destination refused a write with error"),
            "{error}"
        );
        // A request that awaits an answer fails with the reason.
        let error = engine.probe().await.unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the destination refused a write with error"),
            "{error}"
        );
        assert_eq!(acked.data(), 0);
    }

    #[tokio::test]
    async fn an_ack_answers_true_only_once_sealed_and_every_request_acknowledged() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let (done, mut answer) = oneshot::channel();
        let ack = Ack::new(done);
        engine
            .write(0, Bytes::from(vec![1u8; 512]), Some(&ack))
            .await
            .unwrap();
        engine.zeroes(4096, 8192, Some(&ack)).await.unwrap();
        ack.seal();
        let (first, _) = request(&mut server).await;
        let (second, _) = request(&mut server).await;
        server
            .write_all(&simple_reply(first.cookie, None))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            answer.try_recv().is_err(),
            "answered before the second reply"
        );
        server
            .write_all(&simple_reply(second.cookie, None))
            .await
            .unwrap();
        assert_eq!(timeout(WAIT, answer).await.unwrap(), Ok(true));

        // Not sealed: the range was not all queued.
        let (done, answer) = oneshot::channel();
        let ack = Ack::new(done);
        engine
            .write(0, Bytes::from(vec![1u8; 512]), Some(&ack))
            .await
            .unwrap();
        let (r, _) = request(&mut server).await;
        server
            .write_all(&simple_reply(r.cookie, None))
            .await
            .unwrap();
        drop(ack);
        assert_eq!(timeout(WAIT, answer).await.unwrap(), Ok(false));
    }

    #[tokio::test]
    async fn an_ack_answers_false_at_once_when_the_engine_fails() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let (done, answer) = oneshot::channel();
        let ack = Ack::new(done);
        engine
            .write(0, Bytes::from(vec![1u8; 512]), Some(&ack))
            .await
            .unwrap();
        engine
            .write(8192, Bytes::from(vec![1u8; 512]), Some(&ack))
            .await
            .unwrap();
        ack.seal();
        let (r, _) = request(&mut server).await;
        server
            .write_all(&simple_reply(r.cookie, Some(Errno::EIO)))
            .await
            .unwrap();
        // The engine is still alive: the answer comes from the failure, not from a drop.
        assert_eq!(timeout(WAIT, answer).await.unwrap(), Ok(false));
        drop(engine);
    }

    #[tokio::test]
    async fn a_server_that_answers_nothing_fails_after_the_limit() {
        let (mut engine, mut server, _) = pair(Duration::from_millis(300)).await;
        engine
            .write(0, Bytes::from(vec![1u8; 512]), None)
            .await
            .unwrap();
        let _ = request(&mut server).await;
        let started = Instant::now();
        let error = timeout(WAIT, engine.drain()).await.unwrap().unwrap_err();
        assert_eq!(
            error.to_string(),
            "the destination answered nothing for 300 ms"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    fn forwarded(command: Command, flags: u16, cookie: u64, offset: u64, len: u64) -> Forward {
        let payload = match command {
            Command::Write => Bytes::from(vec![cookie as u8; len as usize]),
            _ => Bytes::new(),
        };
        Forward {
            request: Request {
                flags,
                command,
                cookie,
                offset,
                length: len,
            },
            payload,
        }
    }

    #[tokio::test]
    async fn forwarded_requests_get_their_answers_errors_included() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let write = forwarded(Command::Write, 1, 0xaa, 0, 512);
        let read = forwarded(Command::Read, 0, 0xbb, 4096, 8);
        let bad_read = forwarded(Command::Read, 0, 0xcc, 1 << 40, 8);
        let odd = forwarded(Command::Unknown(0x55), 0, 0xdd, 0, 0);
        let w = engine.forward(&write).await.unwrap();
        let r = engine.forward(&read).await.unwrap();
        let b = engine.forward(&bad_read).await.unwrap();
        let o = engine.forward(&odd).await.unwrap();
        // A cookie in flight cannot be used again.
        let again = engine.forward(&write).await.unwrap_err();
        assert!(matches!(again, EngineError::CookieInUse(0xaa)), "{again}");

        // The server sees each request as it was given, FUA and cookie included.
        let (got, payload) = request(&mut server).await;
        assert_eq!(got, write.request);
        assert_eq!(payload, write.payload.to_vec());
        for expected in [&read, &bad_read, &odd] {
            assert_eq!(request(&mut server).await.0, expected.request);
        }
        // Answers in another order; an error carries no data.
        let mut answers = Vec::new();
        answers.extend_from_slice(&simple_reply(0xdd, Some(Errno::EINVAL)));
        answers.extend_from_slice(&simple_reply(0xcc, Some(Errno::ENOSPC)));
        answers.extend_from_slice(&simple_reply(0xbb, None));
        answers.extend_from_slice(b"12345678");
        answers.extend_from_slice(&simple_reply(0xaa, None));
        server.write_all(&answers).await.unwrap();
        let answer = |error: u32, data: &[u8]| Answer {
            error,
            data: Bytes::copy_from_slice(data),
        };
        assert_eq!(timeout(WAIT, o).await.unwrap().unwrap(), answer(22, b""));
        assert_eq!(timeout(WAIT, b).await.unwrap().unwrap(), answer(28, b""));
        assert_eq!(
            timeout(WAIT, r).await.unwrap().unwrap(),
            answer(0, b"12345678")
        );
        assert_eq!(timeout(WAIT, w).await.unwrap().unwrap(), answer(0, b""));
        assert!(!engine.has_failed(), "error replies do not fail the engine");
    }

    #[tokio::test]
    async fn queued_requests_leave_together_when_flushed() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let mut answers = Vec::new();
        for cookie in 1..=3 {
            let write = forwarded(Command::Write, 0, cookie, cookie * 4096, 512);
            answers.push(engine.queue(&write).await.unwrap());
        }
        nothing_arrives(&mut server).await;
        engine.flush_queue().await.unwrap();
        for cookie in 1..=3 {
            let (got, payload) = request(&mut server).await;
            assert_eq!((got.cookie, payload), (cookie, vec![cookie as u8; 512]));
            server.write_all(&simple_reply(cookie, None)).await.unwrap();
        }
        for answer in answers {
            assert_eq!(timeout(WAIT, answer).await.unwrap().unwrap().error, 0);
        }
        // forward() sends what is queued first.
        let queued = engine
            .queue(&forwarded(Command::Flush, 0, 7, 0, 0))
            .await
            .unwrap();
        let _direct = engine
            .forward(&forwarded(Command::Flush, 0, 8, 0, 0))
            .await
            .unwrap();
        assert_eq!(request(&mut server).await.0.cookie, 7);
        assert_eq!(request(&mut server).await.0.cookie, 8);
        drop(queued);
    }

    #[tokio::test]
    async fn a_failed_connection_drops_the_unanswered_forwards() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let first = engine
            .forward(&forwarded(Command::Flush, 0, 1, 0, 0))
            .await
            .unwrap();
        let second = engine
            .forward(&forwarded(Command::Flush, 0, 2, 0, 0))
            .await
            .unwrap();
        let _ = request(&mut server).await;
        let _ = request(&mut server).await;
        server.write_all(&simple_reply(1, None)).await.unwrap();
        drop(server);
        let why = timeout(WAIT, engine.failed()).await.unwrap();
        assert_eq!(why.to_string(), "the connection to the destination ended");
        // The answer that came first is kept; the other one is gone.
        assert_eq!(first.await.unwrap().error, 0);
        assert!(second.await.is_err());
    }

    #[tokio::test]
    async fn long_read_data_comes_whole_and_its_buffers_are_reused() {
        let (mut engine, mut server, _) = pair(WAIT).await;
        let n = 3 * POOL_FROM + 5;
        for round in 0..3u8 {
            let long = forwarded(Command::Read, 0, 1, 0, n as u64);
            let short = forwarded(Command::Read, 0, 2, 0, 8);
            let l = engine.forward(&long).await.unwrap();
            let s = engine.forward(&short).await.unwrap();
            let _ = request(&mut server).await;
            let _ = request(&mut server).await;
            // The long data arrives in pieces, the next reply right behind it.
            let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ round).collect();
            let mut reply = simple_reply(1, None).to_vec();
            reply.extend_from_slice(&data[..1000]);
            server.write_all(&reply).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut rest = data[1000..].to_vec();
            rest.extend_from_slice(&simple_reply(2, None));
            rest.extend_from_slice(b"abcdefgh");
            server.write_all(&rest).await.unwrap();
            let got = timeout(WAIT, l).await.unwrap().unwrap();
            assert_eq!((got.error, got.data.len()), (0, n));
            assert!(got.data == data[..], "round {round}: the data differs");
            let got = timeout(WAIT, s).await.unwrap().unwrap();
            assert_eq!(&got.data[..], b"abcdefgh");
        }
        assert!(!engine.has_failed());
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        let pool = Pool::default();
        let buf = pool.take(POOL_FROM + 1);
        assert_eq!(buf.len(), 2 * POOL_STEP);
        pool.give(buf);
        // The same size class comes back from the pool.
        assert_eq!(pool.take(2 * POOL_STEP).len(), 2 * POOL_STEP);
        for _ in 0..(POOL_KEEP / POOL_STEP + 10) {
            pool.give(vec![0; POOL_STEP]);
        }
        let kept: usize = pool.free.lock().unwrap().iter().map(Vec::len).sum();
        assert!(kept <= POOL_KEEP, "{kept}");
        pool.give(vec![0; POOL_KEEP + 1]);
        let kept: usize = pool.free.lock().unwrap().iter().map(Vec::len).sum();
        assert!(kept <= POOL_KEEP, "{kept}");
    }

    #[tokio::test]
    async fn the_probe_tells_ours_from_others() {
        for (answer, expected) in [(None, Some(true)), (Some(Errno::EINVAL), Some(false))] {
            let (mut engine, mut server, _) = pair(WAIT).await;
            let serve = async {
                let (r, _) = request(&mut server).await;
                assert_eq!(r.command, Command::Unknown(PROBE));
                server
                    .write_all(&simple_reply(r.cookie, answer))
                    .await
                    .unwrap();
            };
            let (ours, ()) = tokio::join!(engine.probe(), serve);
            assert_eq!(ours.ok(), expected);
        }
    }
}
