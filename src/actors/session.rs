//! One client connection.
//!
//! The session owns its socket. A [`Reader`] stream (added with `ctx.add_stream`) yields
//! checked requests; the session executes each one at once, without waiting for the
//! previous ones, and hands the reply to its writer task. Cached reads are answered inline
//! (`preadv2(RWF_NOWAIT)`), everything that may block (uncached reads, writes, flushes)
//! runs on the blocking pool, so the mailbox and the reader stay live.
//!
//! Memory is bounded per connection by two semaphores: `max_in_flight` slots (one per
//! request from header to reply) and a payload budget in bytes (a WRITE part from its first
//! byte until it is in the file, a READ buffer from before the file is read until the
//! reply is on the socket). See `docs/architecture.md`.
//!
//! # Handshakes
//! - [`Close`] (listener → session): stop reading requests, answer those in flight (up to
//!   the grace period), then close the socket and stop. Answered at once; the listener
//!   learns the end through [`SessionEnded`].
//! - [`SessionEnded`] (session → listener): sent from `stopped()`, whatever the reason.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use crate::protocol::handoff::{encode_answer, encode_identity, HandoffReply, HandoffRequest};
use crate::protocol::newstyle::NegotiationConfig;
use crate::protocol::reply::simple_reply;
use crate::protocol::request::{ExportRules, Verdict};
use crate::protocol::structured::{Extent as StatusExtent, ReplyStyle, ReplyTo};
use crate::protocol::Errno;
use crate::storage::allocation::BLOCK;
use crate::storage::{Backing, NowaitRead, ZeroError};
use crate::tls::Stream;

/// `base:allocation` status bits.
const STATE_HOLE: u64 = 1;
const STATE_ZERO: u64 = 2;
/// Extents in one block status reply (the protocol allows 2^20; clients handle a short
/// answer by asking again from where it ended).
const MAX_EXTENTS: usize = 64 * 1024;
/// Largest piece of a WRITE's payload written at once (at most the part size): a 1 MiB
/// write goes into the file in four pieces, the first ones while the rest is arriving.
const WRITE_PART: usize = 256 << 10;
/// Reads at least this long whose bytes are all in the page cache are sent without the
/// copy into a buffer: alone in flight on plain TCP with `sendfile` ([`Body::Cached`]),
/// otherwise written from the export's mapping (`Backing::cached_bytes`). Below it, the
/// copy costs less than the page-cache check (a system call) and, for `sendfile`, the
/// header sent on its own and the lost batching of small replies into one vectored write.
const ZERO_COPY_MIN: u64 = 64 << 10;
/// Largest WRITE done on the session's own thread (see `Session::write`).
const INLINE_WRITE_MAX: usize = 128 << 10;
/// An inline write slower than this sends the session's writes to the blocking pool...
const INLINE_WRITE_SLOW: Duration = Duration::from_millis(2);
/// ...for this long.
const INLINE_WRITE_BACKOFF: Duration = Duration::from_secs(1);

use super::inbound::{HandoffMessage, WriteGate, WriteRight};
pub use super::negotiate::SessionTls;
use super::negotiate::{negotiate, Negotiation};
use super::poll::host_has_spare_cpu;
use super::reader::{Incoming, Reader, ReaderConfig, ReaderSignals, ReaderStop, WriteCompletion};
use super::write_queue::{WriteJob, WriteQueue};
use super::writer::{self, Body, Header, Outgoing, Permits};
use super::ClientId;

/// What every session of a server shares: the export and the limits.
#[derive(Debug)]
pub struct SessionConfig {
    pub backing: Arc<Backing>,
    pub rules: ExportRules,
    /// The bytes sent before the first request: the old-style hello, or the new-style
    /// greeting when `newstyle` is set.
    pub hello: Bytes,
    /// Fixed new-style negotiation (`--newstyle`); `None` for old-style.
    pub newstyle: Option<NegotiationConfig>,
    /// TLS offered in new-style negotiation (`--tls on|require`); `None`: STARTTLS is
    /// refused. Unused without `newstyle` (old-style cannot negotiate).
    pub tls: Option<SessionTls>,
    /// Every WRITE durable before its reply (`--sync-writes`, what C flexnbd always does).
    pub sync_writes: bool,
    /// Requests in flight per connection (64 by default).
    pub max_in_flight: usize,
    /// Payload bytes buffered per connection; at least `part_size`.
    pub payload_budget: usize,
    /// Largest piece of a payload handled as one unit.
    pub part_size: usize,
    /// `-k`: close a client whose request makes no progress for this long.
    pub killswitch: Option<Duration>,
    /// How long a closing session waits for its requests in flight.
    pub grace: Duration,
    /// The longest a session polls its socket for the next request before sleeping
    /// (`--busy-poll`; zero: never). See `actors::poll`.
    pub busy_poll: Duration,
    /// The thread that does long buffered writes into the export (`None`: the blocking
    /// pool does them). See `actors::write_queue`.
    pub write_queue: Option<WriteQueue>,
    /// `listen` before control: who may write (see `actors::inbound`). Every mutation of
    /// the file (WRITE, TRIM, WRITE_ZEROES) enters it; a refused one fails with EPERM and
    /// is not applied. `None`: every session may write.
    pub gate: Option<Arc<WriteGate>>,
}

impl SessionConfig {
    pub const DEFAULT_IN_FLIGHT: usize = 64;
    pub const DEFAULT_PART: usize = 8 << 20;
    pub const DEFAULT_BUDGET: usize = 32 << 20;
    /// `--busy-poll`'s default.
    pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);
}

/// Why a session is asked to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Shutdown,
    AclChanged,
    Migration,
    /// A migration target closes a connection that no longer carries the migration.
    Fenced,
}

/// Listener → session: finish what is in flight and close. See the module docs.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Close(pub CloseReason);

/// Session → listener: the session has stopped and its socket is closed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SessionEnded {
    pub id: ClientId,
    /// The client sent NBD_CMD_DISC (a listener treats this as migration complete).
    pub disconnect_seen: bool,
}

/// One WRITE (or part of one) to apply.
struct Write {
    offset: u64,
    data: Bytes,
    durable: bool,
}

/// How one request is answered: the connection's reply encoding, the request it answers
/// and the permits it holds until the reply is written. Each method consumes it and builds
/// the reply; whoever holds it sends that reply: the session inline, or the job that took it
/// (blocking pool, write thread) through its own sender.
struct Responder {
    style: ReplyStyle,
    to: ReplyTo,
    permits: Permits,
}

impl Responder {
    /// A reply without data: success or an error, in the connection's encoding.
    fn done(self, error: Option<Errno>) -> Outgoing {
        let Responder { style, to, permits } = self;
        let header = match (style, error) {
            (ReplyStyle::Simple, _) => Header::new(&simple_reply(to.cookie, error)),
            (_, None) => Header::encode(|out| style.ok(to, out)),
            (_, Some(errno)) => Header::encode(|out| style.error(to, errno, "", out)),
        };
        Outgoing {
            header,
            body: Body::None,
            permits,
        }
    }

    /// A successful READ's reply: the header (a simple reply, or an OFFSET_DATA chunk with
    /// its offset) and the data.
    fn data(self, length: u64, body: Body) -> Outgoing {
        let Responder { style, to, permits } = self;
        let header = match style {
            ReplyStyle::Simple => Header::new(&simple_reply(to.cookie, None)),
            _ => Header::encode(|out| {
                // A compact chunk's length field holds any READ a compact header can ask for.
                let _ = style.read_data_header(to, length, out);
            }),
        };
        Outgoing {
            header,
            body,
            permits,
        }
    }

    /// A READ of a hole, in structured replies: a hole chunk instead of the zeros.
    fn hole(self, offset: u64, length: u32) -> Outgoing {
        let Responder { style, to, permits } = self;
        let header = Header::encode(|out| {
            let _ = style.hole_chunk(to, offset, length, true, out);
        });
        Outgoing {
            header,
            body: Body::None,
            permits,
        }
    }

    /// A simple success reply followed by `body`, whatever the connection's encoding (the
    /// hand-off messages of a migration).
    fn simple_data(self, body: Bytes) -> Outgoing {
        Outgoing {
            header: Header::new(&simple_reply(self.to.cookie, None)),
            body: Body::Data(body),
            permits: self.permits,
        }
    }

    /// A reply encoded whole by the caller.
    fn encoded(self, reply: Bytes) -> Outgoing {
        Outgoing {
            header: Header::new(&[]),
            body: Body::Data(reply),
            permits: self.permits,
        }
    }

    /// A failed read of `length` bytes: logged, and answered with its error.
    fn read_failed(self, length: u64, e: std::io::Error) -> Outgoing {
        crate::throttled!(
            error,
            "Reading {length} bytes at {} failed: {e}",
            self.to.offset
        );
        self.done(Some(Errno::from_os_error(e.raw_os_error())))
    }
}

/// Where the reply to a change of the file goes once it may be sent: at once, or — while a
/// migration is active and the range has been copied — once the destination holds the
/// range too (see `storage::dirty`). A forwarded write keeps its in-flight slot until
/// then, so a session whose writes wait for the destination stops reading new requests
/// at its in-flight limit: the backpressure reaches the client.
#[derive(Clone)]
struct ReplyPath {
    replies: Option<mpsc::Sender<Outgoing>>,
    runtime: Option<tokio::runtime::Handle>,
    backing: Arc<Backing>,
}

impl ReplyPath {
    /// `[offset, offset + len)` changed in the file (`failed`: it did not, and the reply
    /// goes at once); `reply` builds the answer (`None` while other parts of a long write
    /// are outstanding).
    fn after_change<F>(&self, offset: u64, len: u64, failed: bool, reply: F)
    where
        F: FnOnce() -> Option<Outgoing> + Send + 'static,
    {
        let forwarded = !failed && self.backing.dirty().forwarding(offset, len);
        let runtime = match (&self.runtime, forwarded) {
            (Some(runtime), true) => runtime,
            _ => {
                if let Some(reply) = reply() {
                    Session::send_to(&self.replies, reply);
                }
                return;
            }
        };
        let path = self.clone();
        runtime.spawn(async move {
            if let Some(forward) = path.backing.dirty().forward(offset, len) {
                forward.await;
            }
            if let Some(reply) = reply() {
                Session::send_to(&path.replies, reply);
            }
        });
    }
}

pub struct Session {
    id: ClientId,
    peer: std::net::SocketAddr,
    config: Arc<SessionConfig>,
    listener: Recipient<SessionEnded>,
    /// The accepted socket until `started` splits it.
    socket: Option<std::net::TcpStream>,
    /// A duplicate of the socket, to shut it down when a client must be cut off.
    killer: Option<OwnedFd>,
    replies: Option<mpsc::Sender<Outgoing>>,
    reader: Option<SpawnHandle>,
    /// Tells the reader to stop at the next request boundary.
    reader_stop: Arc<ReaderStop>,
    /// Signalled (with a stored permit) once the reader stream has ended.
    reader_done: Arc<Notify>,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    disconnect: Arc<AtomicBool>,
    /// The reader holds a slot for a request that has not started (see `Reader`).
    spare_slot: Arc<AtomicBool>,
    closing: bool,
    writer_done: bool,
    /// When the last reply left (for the killswitch).
    last_progress: Instant,
    /// How replies are encoded; changes once, when new-style negotiation ends.
    style: ReplyStyle,
    /// The id the client gave `base:allocation`, once negotiated.
    base_allocation: Option<u32>,
    /// Where hand-off messages go (the inbound-migration actor of a `listen` server).
    handoff_target: Option<Recipient<HandoffMessage>>,
    /// While set and in the future, small writes go to the blocking pool: an inline write
    /// was slow (see `Session::write`).
    inline_writes_from: Option<Instant>,
    /// The runtime of this session's thread, where a forwarded write waits for the
    /// destination (see [`ReplyPath`]).
    runtime: Option<tokio::runtime::Handle>,
    /// The connection is TLS (once negotiated): reads are never sent with `sendfile`.
    tls: bool,
}

impl Session {
    pub fn new(
        id: ClientId,
        peer: std::net::SocketAddr,
        socket: std::net::TcpStream,
        config: Arc<SessionConfig>,
        listener: Recipient<SessionEnded>,
    ) -> Session {
        let slots = Arc::new(Semaphore::new(config.max_in_flight));
        let budget = Arc::new(Semaphore::new(config.payload_budget.max(config.part_size)));
        Session {
            id,
            peer,
            config,
            listener,
            socket: Some(socket),
            killer: None,
            replies: None,
            reader: None,
            reader_stop: Arc::default(),
            reader_done: Arc::default(),
            slots,
            budget,
            disconnect: Default::default(),
            spare_slot: Default::default(),
            closing: false,
            writer_done: false,
            last_progress: Instant::now(),
            style: ReplyStyle::Simple,
            base_allocation: None,
            handoff_target: None,
            inline_writes_from: None,
            runtime: None,
            tls: false,
        }
    }

    /// Lets this session pass hand-off messages to `target` (a `listen` server's inbound
    /// actor).
    pub fn with_handoff_target(mut self, target: Recipient<HandoffMessage>) -> Session {
        self.handoff_target = Some(target);
        self
    }

    /// Starts the writer task and the reader stream. An old-style connection is split at
    /// once (the writer sends the hello). A new-style one is negotiated first, on the whole
    /// connection (`actors::negotiate`: STARTTLS replaces the socket with a TLS session),
    /// as the first step of the reader stream; then the stream it ended on is split, the
    /// write half goes to the writer task, which waits for it, and the reader starts on the
    /// read half. Either way the halves are the socket's own on plain TCP.
    fn start_io(&mut self, ctx: &mut Context<Self>) -> std::io::Result<()> {
        let socket = self.socket.take().ok_or(std::io::ErrorKind::NotConnected)?;
        let stream = tokio::net::TcpStream::from_std(socket)?;
        self.killer = stream.as_fd().try_clone_to_owned().ok();
        let stream = Stream::Plain(stream);

        let (tx, rx) = mpsc::channel(self.config.max_in_flight + 1);
        self.replies = Some(tx);
        self.runtime = Some(tokio::runtime::Handle::current());
        let signals = ReaderSignals::default();
        self.disconnect = signals.disconnect.clone();
        self.spare_slot = signals.spare_slot.clone();
        self.reader_stop = signals.stop.clone();
        let reader_config = ReaderConfig {
            rules: self.config.rules,
            part_size: self.config.part_size,
            write_part: self.config.part_size.min(WRITE_PART),
            sync_writes: self.config.sync_writes,
            killswitch: self.config.killswitch,
            peer: self.peer,
            busy_poll: self.config.busy_poll,
        };
        let (slots, budget) = (self.slots.clone(), self.budget.clone());

        let (writer, reader) = match self.config.newstyle.clone() {
            None => {
                let (read_half, write_half) = stream.into_split();
                let writer = writer::run(write_half, self.config.hello.clone(), rx);
                let reader = Reader::new(
                    read_half,
                    BytesMut::new(),
                    reader_config,
                    slots,
                    budget,
                    signals,
                );
                (Either::Left(writer), Either::Left(reader.into_stream()))
            }
            Some(negotiation) => {
                let (half_tx, half_rx) = tokio::sync::oneshot::channel();
                let writer = async move {
                    match half_rx.await {
                        Ok(write_half) => writer::run(write_half, Bytes::new(), rx).await,
                        // Negotiation failed: nothing to write.
                        Err(_) => Ok(()),
                    }
                };
                let (tls, peer) = (self.config.tls.clone(), self.peer);
                let start = async move {
                    let Negotiation {
                        stream,
                        buffered,
                        negotiated,
                    } = negotiate(stream, negotiation, tls, peer).await?;
                    let tls = stream.is_tls();
                    let (read_half, write_half) = stream.into_split();
                    half_tx.send(write_half).ok()?;
                    let mut reader =
                        Reader::new(read_half, buffered, reader_config, slots, budget, signals);
                    let first = reader.start_transmission(&negotiated, tls);
                    Some(
                        futures_util::stream::once(std::future::ready(first))
                            .chain(reader.into_stream()),
                    )
                };
                let reader = futures_util::stream::once(start)
                    .filter_map(std::future::ready)
                    .flatten();
                (Either::Right(writer), Either::Right(reader))
            }
        };

        let writer = actix_rt::spawn(writer);
        ctx.spawn(writer.into_actor(self).map(|result, act, ctx| {
            act.writer_done = true;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("Sending to client {} failed: {e}", act.peer),
                Err(e) => tracing::error!("The writer of client {} failed: {e}", act.peer),
            }
            if act.closing && act.replies.is_none() {
                ctx.stop();
            } else {
                act.begin_close("its connection failed", ctx);
            }
        }));
        self.reader = Some(ctx.add_stream(reader));
        if let Some(limit) = self.config.killswitch {
            ctx.run_interval(Duration::from_secs(1), move |act, _| {
                act.check_killswitch(limit)
            });
        }
        Ok(())
    }

    /// Sends a reply. Every reply holds an in-flight slot and the channel has room for
    /// all slots, so this never waits; if the writer is gone the reply is dropped (and
    /// its permits released).
    fn send_to(replies: &Option<mpsc::Sender<Outgoing>>, reply: Outgoing) {
        if let Some(tx) = replies {
            let _ = tx.try_send(reply);
        }
    }

    /// Sends a reply built on the session's thread (see [`Session::send_to`]).
    fn send(&self, reply: Outgoing) {
        Self::send_to(&self.replies, reply);
    }

    fn execute(&mut self, item: Incoming, ctx: &mut Context<Self>) {
        let (verdict, responder, payload) = match item {
            Incoming::Request {
                verdict,
                to,
                permits,
                payload,
            } => {
                let responder = Responder {
                    style: self.style,
                    to,
                    permits,
                };
                (verdict, responder, payload)
            }
            Incoming::Write {
                offset,
                data,
                durable,
                completion,
                budget,
            } => return self.write(offset, data, durable, completion, budget),
            Incoming::Negotiated {
                style,
                base_allocation,
                tls,
            } => {
                self.style = style;
                self.base_allocation = base_allocation;
                self.tls = tls;
                return;
            }
        };
        match verdict {
            Verdict::Read { offset, length, df } => self.read(offset, length, df, responder),
            // Only a zero-length WRITE comes as a request (answered at once): the payload
            // parts of the others come as `Incoming::Write`.
            Verdict::Write { .. } => self.send(responder.done(None)),
            Verdict::Flush => self.on_blocking_pool(move |backing| {
                let error = backing.sync_data().err().map(|e| {
                    tracing::error!("Flushing the export failed: {e}");
                    Errno::EIO
                });
                responder.done(error)
            }),
            Verdict::Trim {
                offset,
                length,
                fua,
            } => {
                let right = self.write_right();
                let path = self.reply_path();
                self.on_blocking_pool(move |backing| {
                    let Some(ticket) = right.enter() else {
                        return Some(responder.done(Some(Self::refused_write())));
                    };
                    let result = match backing.punch_hole(offset, length) {
                        // TRIM is a hint: a filesystem that cannot punch simply keeps the data.
                        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                        other => other,
                    };
                    let error = Self::finish(&backing, result, fua, "Trimming", offset, length);
                    drop(ticket);
                    path.after_change(offset, length, error.is_some(), move || {
                        Some(responder.done(error))
                    });
                    None
                })
            }
            Verdict::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => {
                let right = self.write_right();
                let path = self.reply_path();
                self.on_blocking_pool(move |backing| {
                    let Some(ticket) = right.enter() else {
                        return Some(responder.done(Some(Self::refused_write())));
                    };
                    let error = match backing.write_zeroes(offset, length, no_hole, fast) {
                        Err(ZeroError::NotFast) => Some(Errno::ENOTSUP),
                        Err(ZeroError::Io(e)) => {
                            Self::finish(&backing, Err(e), fua, "Zeroing", offset, length)
                        }
                        Ok(()) => Self::finish(&backing, Ok(()), fua, "Zeroing", offset, length),
                    };
                    drop(ticket);
                    path.after_change(offset, length, error.is_some(), move || {
                        Some(responder.done(error))
                    });
                    None
                })
            }
            Verdict::Cache { offset, length } => self.on_blocking_pool(move |backing| {
                // A prefetch hint that fails changes nothing for the client.
                if let Err(e) = backing.prefetch(offset, length) {
                    tracing::debug!("Prefetching {length} bytes at {offset} failed: {e}");
                }
                responder.done(None)
            }),
            Verdict::BlockStatus {
                offset,
                length,
                req_one,
            } => self.block_status(offset, length, req_one, responder),
            Verdict::Probe => {
                tracing::info!("Client {} probed for the acknowledged hand-off", self.peer);
                self.send(responder.done(None))
            }
            Verdict::Handoff { .. } => self.handoff(payload, responder, ctx),
            Verdict::Identify => self.identify(responder),
            Verdict::Reject(errno) => self.send(responder.done(Some(errno))),
            // The reader ends the stream instead: there is nothing to answer.
            Verdict::Disconnect => {}
        }
    }

    /// Passes a hand-off message to the listener, which owns the migration target's state,
    /// and answers with its reply: a simple reply, then the encoded answer behind a 32-bit
    /// length. A session without a hand-off peer (not a `listen` server) answers EINVAL.
    fn handoff(&mut self, message: Bytes, responder: Responder, ctx: &mut Context<Self>) {
        let request = match HandoffRequest::decode(&message) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!("Client {} sent a bad hand-off message: {e}", self.peer);
                self.send(responder.done(Some(Errno::EINVAL)));
                return;
            }
        };
        let Some(target) = self.handoff_target.clone() else {
            self.send(responder.done(Some(Errno::EINVAL)));
            return;
        };
        let replies = self.replies.clone();
        let conn = self.id;
        ctx.spawn(
            async move {
                let answer = match target.send(HandoffMessage { conn, request }).await {
                    Ok(answer) => answer,
                    Err(_) => HandoffReply::Refused {
                        reason: "the server is shutting down".into(),
                    },
                };
                let reply = responder.simple_data(Bytes::from(encode_answer(&answer)));
                Self::send_to(&replies, reply);
            }
            .into_actor(self),
        );
    }

    /// Tells a migration source who we are (see `protocol::handoff::IDENTIFY`).
    fn identify(&mut self, responder: Responder) {
        let reply = match crate::identity::of(&self.config.backing) {
            Ok(identity) => responder.simple_data(Bytes::from(encode_identity(&identity))),
            Err(e) => {
                tracing::error!("Couldn't identify the export: {e}");
                responder.done(Some(Errno::EIO))
            }
        };
        self.send(reply);
    }

    /// Turns the result of a file operation into the reply's error, syncing first for FUA.
    fn finish(
        backing: &Backing,
        result: std::io::Result<()>,
        fua: bool,
        what: &str,
        offset: u64,
        length: u64,
    ) -> Option<Errno> {
        let result = result.and_then(|()| if fua { backing.sync_data() } else { Ok(()) });
        result.err().map(|e| {
            crate::throttled!(error, "{what} {length} bytes at {offset} failed: {e}");
            Errno::from_os_error(e.raw_os_error())
        })
    }

    fn read(&mut self, offset: u64, length: u64, df: bool, responder: Responder) {
        let backing = &self.config.backing;
        if responder.style != ReplyStyle::Simple && !df && Self::is_hole(backing, offset, length) {
            // Structured replies can say "zeros here" instead of sending them.
            self.send(responder.hole(offset, length as u32));
            return;
        }
        if length >= ZERO_COPY_MIN {
            // Never over TLS: every byte must be encrypted, `sendfile` would send it in
            // clear. Nor on a crowded host (more runnable threads than CPUs): the client
            // then runs on our CPU, `sendfile` pushes 64 KiB at a time and the woken client
            // preempts us after each; one vectored write from the mapping hands over the
            // whole reply at once. Beside two CPU-bound loops, 1 MiB reads one at a time
            // went from 800-950 MiB/s with `sendfile` to 1140-2020 from the mapping (7
            // interleaved rounds).
            if !self.tls && self.alone_in_flight() && host_has_spare_cpu() {
                if backing.is_cached(offset, length) {
                    let body = Body::Cached {
                        backing: backing.clone(),
                        offset,
                        length,
                    };
                    self.send(responder.data(length, body));
                    return;
                }
            } else if let Some(bytes) = backing.cached_bytes(offset, length as usize) {
                // Several in flight (where `sendfile` sends part by part and wakes the
                // client for each), TLS (where every byte is copied into a record anyway)
                // or a crowded host: the reply is written from the cached pages themselves,
                // with one copy fewer.
                self.send(responder.data(length, Body::Data(bytes)));
                return;
            }
        }
        if length > self.config.part_size as u64 {
            let body = Body::File {
                backing: backing.clone(),
                offset,
                length,
                part: self.config.part_size,
            };
            self.send(responder.data(length, body));
            return;
        }
        let len = length as usize;
        let mut buf = BytesMut::with_capacity(len);
        let reply = match backing.read_nowait(&mut buf, offset, len) {
            Ok(NowaitRead::Done) => responder.data(length, Body::Data(buf.freeze())),
            Ok(NowaitRead::Partial(n)) => {
                self.on_blocking_pool(move |backing| {
                    match backing.read_into(&mut buf, offset + n as u64, len - n) {
                        Ok(()) => responder.data(length, Body::Data(buf.freeze())),
                        Err(e) => responder.read_failed(length, e),
                    }
                });
                return;
            }
            Err(e) => responder.read_failed(length, e),
        };
        self.send(reply);
    }

    /// The request being executed is this client's only one in flight (the reader may
    /// hold one more slot, for a header it waits for). `sendfile` pays only then: with
    /// several large reads queued, the socket fills, each call sends a part, and the
    /// client is woken once per part; measured with qemu-img bench (1 MiB, 8 in flight),
    /// replies sent with it took 1.7-2.5 s where copied ones took 1.15-1.3 s.
    fn alone_in_flight(&self) -> bool {
        self.slots.available_permits() + 2 >= self.config.max_in_flight
    }

    /// True when the allocation map (once built) says the whole range is unallocated. A
    /// hole chunk's size is 32 bits, so longer reads are always sent as data.
    fn is_hole(backing: &Backing, offset: u64, length: u64) -> bool {
        let map = backing.allocation();
        if length == 0 || length > u64::from(u32::MAX) || !map.is_built() {
            return false;
        }
        let mut block = offset - offset % BLOCK;
        while block < offset + length {
            if map.is_allocated(block) {
                return false;
            }
            block += BLOCK;
        }
        true
    }

    fn block_status(&mut self, offset: u64, length: u64, req_one: bool, responder: Responder) {
        let Some(context) = self.base_allocation else {
            self.send(responder.done(Some(Errno::EINVAL)));
            return;
        };
        self.on_blocking_pool(move |backing| {
            let max = if req_one { 1 } else { MAX_EXTENTS };
            let extents = match backing.extents(offset, length, max) {
                Ok(extents) => extents,
                Err(e) => return responder.read_failed(length, e),
            };
            let descriptors: Vec<StatusExtent> = extents
                .iter()
                .map(|e| StatusExtent {
                    length: e.length,
                    flags: if e.hole { STATE_HOLE | STATE_ZERO } else { 0 },
                })
                .collect();
            let mut out = Vec::with_capacity(64 + 16 * descriptors.len());
            let (style, to) = (responder.style, responder.to);
            match style.block_status(to, context, &descriptors, req_one, true, &mut out) {
                Ok(_) => responder.encoded(Bytes::from(out)),
                Err(e) => {
                    tracing::error!("Encoding a block status reply failed: {e}");
                    responder.done(Some(Errno::EIO))
                }
            }
        });
    }

    /// Executes a WRITE (or one part of a long one), in one of three places:
    ///
    /// - inline, for small writes that need no sync: they only copy into the page cache,
    ///   and a hand-off to the blocking pool (a futex wake there, another to come back)
    ///   costs more than the copy itself;
    /// - on the export's write queue, for longer writes that need no sync (one thread, as
    ///   the inode lock serialises buffered writes to one file anyway), which also starts
    ///   their writeback once they are answered;
    /// - on the blocking pool, for writes with FUA or `--sync-writes`, where several
    ///   `RWF_DSYNC` writes can wait for the disk together.
    ///
    /// A buffered write can still block (dirty-page throttling, reading in a partial page),
    /// and there is no `RWF_NOWAIT` for buffered writes; so an inline write that took longer
    /// than [`INLINE_WRITE_SLOW`] sends this session's writes elsewhere for
    /// [`INLINE_WRITE_BACKOFF`], bounding how long a slow filesystem can hold up the other
    /// sessions of this thread.
    fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        durable: bool,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    ) {
        let style = self.style;
        let inline = !durable
            && data.len() <= INLINE_WRITE_MAX
            && self.inline_writes_from.is_none_or(|t| Instant::now() >= t);
        if inline {
            self.write_inline(offset, data, completion, budget);
        } else if let (false, Some(queue)) = (durable, &self.config.write_queue) {
            let job = self.queued_write(offset, data, completion, budget);
            if let Err(job) = queue.submit(job) {
                tokio::task::spawn_blocking(job);
            }
        } else {
            let right = self.write_right();
            let path = self.reply_path();
            self.on_blocking_pool(move |backing| {
                let write = Write {
                    offset,
                    data,
                    durable,
                };
                Self::write_now(&backing, &right, &path, style, write, completion, budget);
                None
            });
        }
    }

    /// A small write on the session's thread; see [`Session::write`].
    fn write_inline(
        &mut self,
        offset: u64,
        data: Bytes,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    ) {
        let started = Instant::now();
        let write = Write {
            offset,
            data,
            durable: false,
        };
        Self::write_now(
            &self.config.backing,
            &self.write_right(),
            &self.reply_path(),
            self.style,
            write,
            completion,
            budget,
        );
        let took = started.elapsed();
        if took > INLINE_WRITE_SLOW {
            tracing::debug!(
                "An inline write of client {} took {took:?}; using the blocking pool for a while",
                self.peer
            );
            self.inline_writes_from = Some(Instant::now() + INLINE_WRITE_BACKOFF);
        }
    }

    /// The job that does a longer, non-durable write on the export's write queue.
    fn queued_write(
        &self,
        offset: u64,
        data: Bytes,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    ) -> WriteJob {
        let backing = self.config.backing.clone();
        let style = self.style;
        let right = self.write_right();
        let path = self.reply_path();
        Box::new(move || {
            let len = data.len() as u64;
            let write = Write {
                offset,
                data,
                durable: false,
            };
            Self::write_now(&backing, &right, &path, style, write, completion, budget);
            // Write-behind: a long write is usually part of a stream (a copy, a migration)
            // that ends with a FLUSH; writing it back now, while the rest arrives, leaves
            // that FLUSH little to do. Once per range and flush: a range rewritten before
            // the flush is not sent again.
            if let Err(e) = backing.write_behind(offset, len) {
                tracing::debug!("Starting writeback of {len} bytes at {offset}: {e}");
            }
        })
    }

    /// Writes one payload (part) into the file and, once the whole request is done (and
    /// forwarded, in active mode), sends the reply along `path`.
    fn write_now(
        backing: &Backing,
        right: &WriteRight,
        path: &ReplyPath,
        style: ReplyStyle,
        write: Write,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    ) {
        let Write {
            offset,
            data,
            durable,
        } = write;
        let len = data.len() as u64;
        let error = match right.enter() {
            None => Some(Self::refused_write()),
            Some(_ticket) => backing.write_at(&data, offset, durable).err().map(|e| {
                crate::throttled!(error, "Writing {len} bytes at {offset} failed: {e}");
                Errno::from_os_error(e.raw_os_error())
            }),
        };
        // The payload is in the file (or failed): its budget is free again.
        drop(data);
        drop(budget);
        path.after_change(offset, len, error.is_some(), move || {
            let (to, error, slot) = match completion {
                WriteCompletion::Whole { to, slot } => (to, error, slot),
                WriteCompletion::Part(group) => group.part_done(len, error)?,
            };
            let permits = Permits { slot, bytes: None };
            Some(Responder { style, to, permits }.done(error))
        });
    }

    /// Where replies to changes of the file go (see [`ReplyPath`]).
    fn reply_path(&self) -> ReplyPath {
        ReplyPath {
            replies: self.replies.clone(),
            runtime: self.runtime.clone(),
            backing: self.config.backing.clone(),
        }
    }

    /// This session's right to mutate the file (see [`SessionConfig::gate`]).
    fn write_right(&self) -> WriteRight {
        WriteRight::new(self.config.gate.clone(), self.id)
    }

    /// The error of a mutation the gate refused: this connection may not write into a
    /// migration target (it is not the migration's current attempt, or the data is being
    /// handed off).
    fn refused_write() -> Errno {
        tracing::debug!("Refused a write: this connection may not write here");
        Errno::EPERM
    }

    /// Runs `job` on the blocking pool; the reply it returns (if any) goes straight to the
    /// writer, without waking this actor's thread.
    ///
    /// If the job panicked its permits would be released without a reply; jobs are plain
    /// file calls that report failures as values, so that does not happen in practice.
    fn on_blocking_pool<F, R>(&self, job: F)
    where
        F: FnOnce(Arc<Backing>) -> R + Send + 'static,
        R: Into<Option<Outgoing>>,
    {
        let replies = self.replies.clone();
        let backing = self.config.backing.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(reply) = job(backing).into() {
                Self::send_to(&replies, reply);
            }
        });
    }

    /// Stops reading at the next request boundary, waits (up to the grace period) until
    /// every request in flight has been answered — a WRITE whose header has arrived is read
    /// to its end and answered — then lets the writer finish and stops.
    fn begin_close(&mut self, why: &str, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.closing = true;
        tracing::info!("Closing client {}: {why}", self.peer);
        self.reader_stop.request();
        let reader_done = self.reader_done.clone();
        let slots = self.slots.clone();
        let all = self.config.max_in_flight as u32;
        let grace = self.config.grace;
        let drained = async move {
            let in_flight_answered = async {
                reader_done.notified().await;
                slots.acquire_many_owned(all).await
            };
            tokio::time::timeout(grace, in_flight_answered)
                .await
                .is_ok()
        };
        ctx.spawn(drained.into_actor(self).map(|drained, act, ctx| {
            if !drained {
                tracing::warn!(
                    "Client {} still had requests in flight after {:?}; cutting it off",
                    act.peer,
                    act.config.grace
                );
                if let Some(reader) = act.reader.take() {
                    ctx.cancel_future(reader);
                }
                act.shut_socket();
            }
            // Every reply is on the socket (or abandoned): the writer ends once the last
            // sender is gone.
            act.replies = None;
            if act.writer_done || !drained {
                ctx.stop();
            }
        }));
    }

    fn shut_socket(&self) {
        if let Some(fd) = &self.killer {
            // SAFETY: `fd` is an open descriptor we own (a dup of the socket); shutdown has no
            // memory-safety preconditions and only affects the connection.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    /// flexnbd §11: a request that makes no progress for `limit` cuts the client off; an
    /// idle connection (no request started, only the reader's slot for the next one) is
    /// never timed out.
    fn check_killswitch(&mut self, limit: Duration) {
        let in_use = self.config.max_in_flight - self.slots.available_permits();
        let spare = usize::from(self.spare_slot.load(Ordering::Relaxed));
        let busy = in_use > spare;
        if busy && self.last_progress.elapsed() > limit {
            tracing::warn!(
                "Killswitch: a request of client {} made no progress for {} s; closing it",
                self.peer,
                limit.as_secs()
            );
            self.shut_socket();
        } else if !busy {
            self.last_progress = Instant::now();
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Err(e) = self.start_io(ctx) {
            tracing::error!(
                "Couldn't set up the connection of client {}: {e}",
                self.peer
            );
            ctx.stop();
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.shut_socket();
        self.listener.do_send(SessionEnded {
            id: self.id,
            disconnect_seen: self.disconnect.load(Ordering::Relaxed),
        });
    }
}

impl StreamHandler<Incoming> for Session {
    fn handle(&mut self, item: Incoming, ctx: &mut Self::Context) {
        self.last_progress = Instant::now();
        self.execute(item, ctx);
    }

    /// The client disconnected, sent DISC, sent garbage, or its socket failed. The default
    /// would stop the actor at once; we first answer what is in flight.
    fn finished(&mut self, ctx: &mut Self::Context) {
        self.reader = None;
        self.reader_done.notify_one();
        self.begin_close("its request stream ended", ctx);
    }
}

impl Handler<Close> for Session {
    type Result = ();

    fn handle(&mut self, msg: Close, ctx: &mut Self::Context) {
        let why = match msg.0 {
            CloseReason::Shutdown => "the server is shutting down",
            CloseReason::AclChanged => "the access control list no longer admits it",
            CloseReason::Migration => "the migration is entering its final pass",
            CloseReason::Fenced => "it no longer carries the migration",
        };
        self.begin_close(why, ctx);
    }
}
