//! The stream of requests a session reads from its socket.
//!
//! The reader turns socket bytes into [`Incoming`] items for the session actor. Before it
//! reads the bytes of a header it holds an in-flight slot, and before it reads a payload
//! part it holds that part's share of the byte budget: when a client pipelines faster than
//! we answer (or stops reading replies), the reader simply stops reading the socket, and
//! TCP pushes back. The requests it yields have already been checked against the export's
//! rules, so the session only executes.
//!
//! A new-style connection is negotiated before the reader exists (`actors::negotiate`, on
//! the whole connection, because STARTTLS replaces the socket with a TLS session); the
//! reader starts on its half of whatever the negotiation ended on, with the header style
//! and rules negotiated, and first tells the session (so that replies use the negotiated
//! encoding from then on).
//!
//! The socket is a [`ReadHalf`]: plain TCP (the socket's own half, as fast as before) or
//! TLS. Only a plain socket is busy-polled: `try_read` exists only for it, and over TLS
//! the decryption, not the wake-up, is what a request costs.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::protocol::newstyle::Negotiated;
use crate::protocol::request::{
    Dialect, ExportRules, Frame, HeaderStyle, Modern, RequestFramer, Verdict,
};
use crate::protocol::structured::{ReplyStyle, ReplyTo};
use crate::protocol::{Command, Errno};
use crate::tls::ReadHalf;

use super::poll::{host_has_spare_cpu, PollWindow};
use super::writer::Permits;

/// Bytes read ahead of what the framer needs, so that pipelined small requests arrive in
/// few system calls.
const READ_AHEAD: usize = 64 * 1024;
/// Payload parts at least this long are read into a buffer of their own size.
const EXACT_READ_MIN: usize = 64 * 1024;

/// What the reader yields to the session.
pub(crate) enum Incoming {
    /// A checked request, ready for the session to execute: the rules' verdict, whom to
    /// answer and the permits held until the reply is written. Every verdict comes this
    /// way except DISC (the stream ends instead); a WRITE only when it is zero-length (its
    /// payload parts come as [`Incoming::Write`]). `Reject` also carries the reader's own
    /// refusals: EBADMSG for a header with the wrong magic (the stream then ends) and
    /// ESHUTDOWN for requests buffered while closing.
    Request {
        verdict: Verdict,
        to: ReplyTo,
        permits: Permits,
        /// A hand-off message's encoded bytes; empty for every other verdict.
        payload: Bytes,
    },
    /// One part of a WRITE's payload (the whole payload unless it is larger than a part).
    Write {
        offset: u64,
        data: Bytes,
        durable: bool,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    },
    /// New-style negotiation ended: every later reply uses `style`.
    Negotiated {
        style: ReplyStyle,
        /// The id of `base:allocation`, for block status replies.
        base_allocation: Option<u32>,
        /// The connection is TLS: every byte must be encrypted, so no reply may be sent
        /// with `sendfile`.
        tls: bool,
    },
}

/// Who answers a WRITE once its data is in the file.
pub(crate) enum WriteCompletion {
    /// The write came in one part: answer when it is written.
    Whole {
        to: ReplyTo,
        slot: Option<OwnedSemaphorePermit>,
    },
    /// The write came in several parts: the last part to finish answers.
    Part(Arc<WriteGroup>),
}

/// Shared by the parts of one large WRITE. Not a lock on the I/O path: each part does its
/// own I/O and only counts down here.
pub(crate) struct WriteGroup {
    to: ReplyTo,
    remaining: AtomicU64,
    error: AtomicU32,
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

impl WriteGroup {
    /// Records that `len` bytes are done (or failed). Returns the reply to send when this
    /// was the last outstanding byte.
    pub fn part_done(
        &self,
        len: u64,
        error: Option<Errno>,
    ) -> Option<(ReplyTo, Option<Errno>, Option<OwnedSemaphorePermit>)> {
        if let Some(e) = error {
            let _ = self
                .error
                .compare_exchange(0, e.0, Ordering::Relaxed, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(len, Ordering::AcqRel) != len {
            return None;
        }
        let error = match self.error.load(Ordering::Relaxed) {
            0 => None,
            e => Some(Errno(e)),
        };
        let slot = self.slot.lock().ok().and_then(|mut s| s.take());
        Some((self.to, error, slot))
    }
}

/// The WRITE whose payload is arriving.
struct PendingWrite {
    offset: u64,
    durable: bool,
    /// `Some` until the single part of a one-part write takes it.
    whole: Option<WriteCompletion>,
    group: Option<Arc<WriteGroup>>,
}

/// Asks a reader to stop at the next request boundary: a request whose header has arrived
/// is in flight and is read to its end (its payload included) before the reader stops.
#[derive(Debug, Default)]
pub(crate) struct ReaderStop {
    requested: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl ReaderStop {
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
        // A stored permit wakes the reader even if it is not waiting yet.
        self.wake.notify_one();
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// What a reader shares with its session, made by the session before the reader exists
/// (a new-style reader starts only after negotiation).
#[derive(Clone, Default)]
pub(crate) struct ReaderSignals {
    /// Set when the client sent NBD_CMD_DISC.
    pub disconnect: Arc<std::sync::atomic::AtomicBool>,
    /// Set while the reader holds the slot of a request whose header has not started to
    /// arrive: an idle connection holds it, and the killswitch must not count it as a
    /// request in flight (flexnbd §11: idle connections are never timed out).
    pub spare_slot: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the session when it closes.
    pub stop: Arc<ReaderStop>,
}

/// Limits and settings of a reader.
pub(crate) struct ReaderConfig {
    pub rules: ExportRules,
    /// Largest piece of a READ's budget taken at once (the session's part size).
    pub part_size: usize,
    /// Largest piece of a WRITE's payload handed to the session at once. Smaller than
    /// `part_size` so that a long write's first parts go into the file while the next
    /// ones are still arriving.
    pub write_part: usize,
    pub sync_writes: bool,
    pub killswitch: Option<Duration>,
    pub peer: SocketAddr,
    /// The longest the reader polls the socket before sleeping (zero: never).
    pub busy_poll: Duration,
}

pub(crate) struct Reader {
    sock: ReadHalf,
    buf: BytesMut,
    framer: RequestFramer,
    config: ReaderConfig,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    /// The slot for the next header, acquired before its bytes are read.
    slot: Option<OwnedSemaphorePermit>,
    /// The budget for the next payload part, acquired before its bytes are read.
    part_budget: Option<OwnedSemaphorePermit>,
    write: Option<PendingWrite>,
    /// A hand-off message whose payload is arriving.
    handoff: Option<(Verdict, ReplyTo, Permits)>,
    stopped: bool,
    disconnect: Arc<std::sync::atomic::AtomicBool>,
    spare_slot: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<ReaderStop>,
    /// How long to poll for the next request before sleeping.
    poll: PollWindow,
    /// The connection's in-flight slots, all of them.
    slot_count: usize,
}

impl Reader {
    /// A reader of `sock`, which starts with the bytes of `buffered` (read past the end of
    /// negotiation: the first requests).
    pub fn new(
        sock: ReadHalf,
        mut buffered: BytesMut,
        config: ReaderConfig,
        slots: Arc<Semaphore>,
        budget: Arc<Semaphore>,
        signals: ReaderSignals,
    ) -> Reader {
        buffered.reserve(READ_AHEAD);
        let framer = RequestFramer::new(HeaderStyle::Compact, config.write_part);
        let framer = if config.rules.migration_target {
            framer.with_handoff()
        } else {
            framer
        };
        let poll = PollWindow::new(config.busy_poll);
        let slot_count = slots.available_permits();
        Reader {
            sock,
            buf: buffered,
            framer,
            config,
            slots,
            slot_count,
            budget,
            slot: None,
            part_budget: None,
            write: None,
            handoff: None,
            stopped: false,
            disconnect: signals.disconnect,
            spare_slot: signals.spare_slot,
            stop: signals.stop,
            poll,
        }
    }

    /// The reader as a stream for `ctx.add_stream`.
    pub fn into_stream(self) -> impl Stream<Item = Incoming> {
        futures_util::stream::unfold(self, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        })
    }

    async fn next(&mut self) -> Option<Incoming> {
        loop {
            if self.stopped {
                return None;
            }
            if self.framer.at_request_boundary() {
                if self.stop.is_requested() {
                    if let Some(refused) = self.refuse_buffered() {
                        return Some(refused);
                    }
                    self.stopped = true;
                    return None;
                }
                if self.slot.is_none() {
                    let acquire = self.slots.clone().acquire_owned();
                    tokio::select! {
                        permit = acquire => {
                            self.slot = Some(permit.ok()?);
                            self.spare_slot.store(self.buf.is_empty(), Ordering::Relaxed);
                        }
                        () = self.stop.wake.notified() => continue,
                    }
                }
            } else if self.write.is_some() && self.part_budget.is_none() {
                let need = self.framer.next_need()? as u32;
                self.part_budget = Some(self.budget.clone().acquire_many_owned(need).await.ok()?);
            }
            if let Some(frame) = self.framer.next_frame(&mut self.buf) {
                if let Some(item) = self.on_frame(frame).await {
                    return Some(item);
                }
                continue;
            }
            if !self.fill().await {
                self.stopped = true;
                return None;
            }
        }
    }

    /// Switches to what new-style negotiation agreed on (over TLS if `tls`); the item
    /// returned tells the session.
    pub fn start_transmission(&mut self, negotiated: &Negotiated, tls: bool) -> Incoming {
        tracing::info!(
            "Client {} negotiated: structured replies {}, extended headers {}, block status {}{}",
            self.config.peer,
            negotiated.structured_replies,
            negotiated.extended_headers,
            negotiated.base_allocation.is_some(),
            if tls { ", over TLS" } else { "" }
        );
        self.framer.set_style(negotiated.header_style());
        self.config.rules.dialect = Dialect::Modern(Modern {
            structured: negotiated.structured_replies,
            extended: negotiated.extended_headers,
            block_status: negotiated.base_allocation.is_some(),
        });
        Incoming::Negotiated {
            style: negotiated.reply_style(),
            base_allocation: negotiated.base_allocation,
            tls,
        }
    }

    /// While closing, a new-style client's requests that are already buffered are answered
    /// ESHUTDOWN (so it knows to disconnect) instead of being dropped silently.
    fn refuse_buffered(&mut self) -> Option<Incoming> {
        if self.config.rules.dialect == Dialect::Oldstyle {
            return None;
        }
        let Some(Frame::Request(req)) = self.framer.next_frame(&mut self.buf) else {
            return None;
        };
        self.framer.discard_payload();
        if req.command == Command::Disconnect {
            return None;
        }
        let slot = self
            .slot
            .take()
            .or_else(|| self.slots.clone().try_acquire_owned().ok())?;
        Some(Incoming::Request {
            verdict: Verdict::Reject(Errno::ESHUTDOWN),
            to: ReplyTo::from(&req),
            permits: Permits {
                slot: Some(slot),
                bytes: None,
            },
            payload: Bytes::new(),
        })
    }

    fn permits(&mut self) -> Permits {
        Permits {
            slot: self.slot.take(),
            bytes: None,
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Option<Incoming> {
        if !matches!(frame, Frame::Payload(_)) {
            self.spare_slot.store(false, Ordering::Relaxed);
        }
        let (verdict, to) = match frame {
            Frame::Payload(part) => return self.on_payload(part),
            Frame::BadMagic { magic, cookie } => {
                tracing::warn!(
                    "Client {} sent a request with bad magic {magic:#010x}: answering EBADMSG and closing",
                    self.config.peer
                );
                self.stopped = true;
                let to = ReplyTo { cookie, offset: 0 };
                (Verdict::Reject(Errno::EBADMSG), to)
            }
            Frame::Request(req) => (self.config.rules.check(&req), ReplyTo::from(&req)),
        };
        match verdict {
            Verdict::Disconnect => {
                tracing::info!("Client {} sent a disconnect request", self.config.peer);
                self.disconnect.store(true, Ordering::Relaxed);
                self.stopped = true;
                return None;
            }
            Verdict::Write {
                offset,
                length,
                fua,
            } if length > 0 => {
                self.start_write(to, offset, length, fua);
                return None;
            }
            _ => {}
        }
        let mut permits = self.permits();
        match verdict {
            Verdict::Read { length, .. } => {
                let share = length.min(self.config.part_size as u64) as u32;
                if share > 0 {
                    permits.bytes = Some(self.budget.clone().acquire_many_owned(share).await.ok()?);
                }
            }
            Verdict::Handoff { length } if length > 0 => {
                self.handoff = Some((verdict, to, permits));
                return None;
            }
            // The payload of a rejected WRITE is read and thrown away, so the connection
            // stays usable (flexnbd §4.4).
            Verdict::Reject(_) => self.framer.discard_payload(),
            _ => {}
        }
        Some(Incoming::Request {
            verdict,
            to,
            permits,
            payload: Bytes::new(),
        })
    }

    /// A WRITE's header arrived, with a payload: its parts follow. (A zero-length write is
    /// answered at once, like any other request.)
    fn start_write(&mut self, to: ReplyTo, offset: u64, length: u64, fua: bool) {
        let durable = fua || self.config.sync_writes;
        let slot = self.slot.take();
        let (whole, group) = if length <= self.config.write_part as u64 {
            (Some(WriteCompletion::Whole { to, slot }), None)
        } else {
            let group = WriteGroup {
                to,
                remaining: AtomicU64::new(length),
                error: AtomicU32::new(0),
                slot: Mutex::new(slot),
            };
            (None, Some(Arc::new(group)))
        };
        self.write = Some(PendingWrite {
            offset,
            durable,
            whole,
            group,
        });
    }

    fn on_payload(&mut self, part: crate::protocol::request::PayloadPart) -> Option<Incoming> {
        if let Some((verdict, to, permits)) = self.handoff.take() {
            // Hand-off messages are bounded far below a part: they arrive in one piece.
            return Some(Incoming::Request {
                verdict,
                to,
                permits,
                payload: part.data,
            });
        }
        let pending = self.write.as_mut()?;
        let completion = match pending.whole.take() {
            Some(whole) => whole,
            None => WriteCompletion::Part(pending.group.clone()?),
        };
        let item = Incoming::Write {
            offset: pending.offset + part.at,
            data: part.data,
            durable: pending.durable,
            completion,
            budget: self.part_budget.take(),
        };
        if part.last {
            self.write = None;
        }
        Some(item)
    }

    /// Polls the socket for up to `window` before the reader goes to sleep (see
    /// [`PollWindow`]). True when bytes arrived; false when the window closed, the session
    /// asked the reader to stop, or the socket reported its end or an error (the blocking
    /// read that follows sees it again and reports it). A TLS connection is never polled
    /// (false at once): its bytes must go through the TLS session.
    async fn poll_briefly(&mut self, window: Duration) -> bool {
        let Some(sock) = self.sock.as_plain_mut() else {
            return false;
        };
        let deadline = Instant::now() + window;
        loop {
            match sock.try_read_buf(&mut self.buf) {
                Ok(n) => return n > 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            if Instant::now() >= deadline || self.stop.is_requested() {
                return false;
            }
            // Lets the writer send the reply the client is waiting for, and everything
            // else on this thread run, between two tries.
            tokio::task::yield_now().await;
        }
    }

    /// Makes `buf` able to hold a payload part of `part` bytes (of which it holds the
    /// first ones) without growing: a buffer that cannot is replaced by one of exactly that
    /// size, so the bytes already read are copied once, and only those.
    fn make_room_for_part(&mut self, part: usize) {
        if self.buf.capacity() < part {
            let mut fresh = BytesMut::with_capacity(part);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        }
    }

    /// At most one of this client's requests is in flight (the one just read, still being
    /// answered), besides the slot the reader holds for the next header: the client waits
    /// for us, as a queue-depth-1 client does, and its next request follows our reply.
    fn at_most_one_in_flight(&self) -> bool {
        let held = usize::from(self.slot.is_some());
        self.slots.available_permits() + held + 1 >= self.slot_count
    }

    /// Reads more bytes. Returns false at end of stream or on an error.
    async fn fill(&mut self) -> bool {
        let need = self.framer.next_need().unwrap_or(1);
        // A long payload part is read into a buffer of its own size, and no further: with
        // read-ahead, the bytes of the next request that came with it would have to be
        // copied into a new buffer once the part is handed out.
        let exact = self
            .framer
            .kept_part_need()
            .filter(|&part| part >= EXACT_READ_MIN && part > self.buf.len());
        match exact {
            Some(part) => self.make_room_for_part(part),
            None => {
                let missing = need.saturating_sub(self.buf.len());
                self.buf.reserve(missing.max(READ_AHEAD));
            }
        }
        let mid_request = !self.buf.is_empty() || !self.framer.at_request_boundary();
        if self.framer.at_request_boundary() && self.stop.is_requested() {
            return false;
        }
        // Waiting for the next request with nothing buffered and at most the request just
        // read still in flight: the time until it comes adapts the polling window. With
        // more in flight (queue depth 16) the next request comes when the client has taken
        // some replies, and polling for it only took the CPU the client needs.
        let idle_since = (!mid_request && self.at_most_one_in_flight()).then(Instant::now);
        let window = self.poll.window();
        if idle_since.is_some()
            && !window.is_zero()
            && !self.sock.is_tls()
            && host_has_spare_cpu()
            && self.poll_briefly(window).await
        {
            if let Some(since) = idle_since {
                self.poll.record(since.elapsed());
            }
            return true;
        }
        let read = async {
            if self.framer.at_request_boundary() {
                // Between requests a close must not wait for the client to send more.
                tokio::select! {
                    read = self.sock.read_buf(&mut self.buf) => read,
                    () = self.stop.wake.notified() => Err(io::ErrorKind::Interrupted.into()),
                }
            } else if let Some(part) = exact {
                let limit = (part - self.buf.len()) as u64;
                (&mut self.sock).take(limit).read_buf(&mut self.buf).await
            } else {
                self.sock.read_buf(&mut self.buf).await
            }
        };
        let result = match self.config.killswitch {
            Some(limit) if mid_request => match tokio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "Killswitch: client {} stalled for {} s in the middle of a request; closing it",
                        self.config.peer,
                        limit.as_secs()
                    );
                    return false;
                }
            },
            _ => read.await,
        };
        match result {
            Ok(0) => {
                if mid_request {
                    tracing::warn!(
                        "Client {} closed the connection in the middle of a request",
                        self.config.peer
                    );
                } else {
                    tracing::info!("Client {} closed the connection", self.config.peer);
                }
                false
            }
            Ok(_) => {
                if let Some(since) = idle_since {
                    self.poll.record(since.elapsed());
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted && self.stop.is_requested() => false,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::TimedOut => {
                        tracing::warn!("Client {}: {e}", self.config.peer)
                    }
                    _ => tracing::error!("Reading from client {} failed: {e}", self.config.peer),
                }
                false
            }
        }
    }
}
