//! The stream of requests a session reads from its socket.
//!
//! The reader turns socket bytes into [`Incoming`] items for the session actor. Before it
//! reads the bytes of a header it holds an in-flight slot, and before it reads a payload
//! part it holds that part's share of the byte budget: when a client pipelines faster than
//! we answer (or stops reading replies), the reader simply stops reading the socket, and
//! TCP pushes back. The requests it yields have already been checked against the export's
//! rules, so the session only executes.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::protocol::request::{ExportRules, Frame, HeaderStyle, RequestFramer, Verdict};
use crate::protocol::Errno;

use super::writer::Permits;

/// Bytes read ahead of what the framer needs, so that pipelined small requests arrive in
/// few system calls.
const READ_AHEAD: usize = 64 * 1024;

/// A checked request, ready for the session to execute.
pub(crate) enum Incoming {
    Read {
        cookie: u64,
        offset: u64,
        length: u64,
        permits: Permits,
    },
    /// One part of a WRITE's payload (the whole payload unless it is larger than a part).
    Write {
        offset: u64,
        data: Bytes,
        durable: bool,
        completion: WriteCompletion,
        budget: Option<OwnedSemaphorePermit>,
    },
    Flush {
        cookie: u64,
        permits: Permits,
    },
    /// Answer at once: an error, or success for a zero-length write.
    Reply {
        cookie: u64,
        error: Option<Errno>,
        permits: Permits,
    },
    /// A header with the wrong magic: answer EBADMSG, then the stream ends.
    BadMagic {
        cookie: u64,
        permits: Permits,
    },
}

/// Who answers a WRITE once its data is in the file.
pub(crate) enum WriteCompletion {
    /// The write came in one part: answer when it is written.
    Whole {
        cookie: u64,
        slot: Option<OwnedSemaphorePermit>,
    },
    /// The write came in several parts: the last part to finish answers.
    Part(Arc<WriteGroup>),
}

/// Shared by the parts of one large WRITE. Not a lock on the I/O path: each part does its
/// own I/O and only counts down here.
pub(crate) struct WriteGroup {
    cookie: u64,
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
    ) -> Option<(u64, Option<Errno>, Option<OwnedSemaphorePermit>)> {
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
        Some((self.cookie, error, slot))
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

/// Limits and settings of a reader.
pub(crate) struct ReaderConfig {
    pub rules: ExportRules,
    pub part_size: usize,
    pub sync_writes: bool,
    pub killswitch: Option<Duration>,
    pub peer: SocketAddr,
}

pub(crate) struct Reader {
    sock: OwnedReadHalf,
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
    stopped: bool,
    /// Set when the client sent NBD_CMD_DISC.
    pub disconnect: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the session when it closes.
    pub stop: Arc<ReaderStop>,
}

impl Reader {
    pub fn new(
        sock: OwnedReadHalf,
        config: ReaderConfig,
        slots: Arc<Semaphore>,
        budget: Arc<Semaphore>,
    ) -> Reader {
        let framer = RequestFramer::new(HeaderStyle::Compact, config.part_size);
        Reader {
            sock,
            buf: BytesMut::with_capacity(READ_AHEAD),
            framer,
            config,
            slots,
            budget,
            slot: None,
            part_budget: None,
            write: None,
            stopped: false,
            disconnect: Default::default(),
            stop: Default::default(),
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
                    self.stopped = true;
                    return None;
                }
                if self.slot.is_none() {
                    let acquire = self.slots.clone().acquire_owned();
                    tokio::select! {
                        permit = acquire => self.slot = Some(permit.ok()?),
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

    fn permits(&mut self) -> Permits {
        Permits {
            slot: self.slot.take(),
            bytes: None,
        }
    }

    async fn on_frame(&mut self, frame: Frame) -> Option<Incoming> {
        match frame {
            Frame::BadMagic { magic, cookie } => {
                tracing::warn!(
                    "Client {} sent a request with bad magic {magic:#010x}: answering EBADMSG and closing",
                    self.config.peer
                );
                self.stopped = true;
                Some(Incoming::BadMagic {
                    cookie,
                    permits: self.permits(),
                })
            }
            Frame::Request(req) => match self.config.rules.check(&req) {
                Verdict::Read { offset, length, .. } => {
                    let mut permits = self.permits();
                    let share = length.min(self.config.part_size as u64) as u32;
                    if share > 0 {
                        permits.bytes =
                            Some(self.budget.clone().acquire_many_owned(share).await.ok()?);
                    }
                    Some(Incoming::Read {
                        cookie: req.cookie,
                        offset,
                        length,
                        permits,
                    })
                }
                Verdict::Write {
                    offset,
                    length,
                    fua,
                } => {
                    let durable = fua || self.config.sync_writes;
                    if length == 0 {
                        return Some(Incoming::Reply {
                            cookie: req.cookie,
                            error: None,
                            permits: self.permits(),
                        });
                    }
                    let slot = self.slot.take();
                    let (whole, group) = if length <= self.config.part_size as u64 {
                        (
                            Some(WriteCompletion::Whole {
                                cookie: req.cookie,
                                slot,
                            }),
                            None,
                        )
                    } else {
                        let group = WriteGroup {
                            cookie: req.cookie,
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
                    None
                }
                Verdict::Flush => Some(Incoming::Flush {
                    cookie: req.cookie,
                    permits: self.permits(),
                }),
                Verdict::Disconnect => {
                    tracing::info!("Client {} sent a disconnect request", self.config.peer);
                    self.disconnect.store(true, Ordering::Relaxed);
                    self.stopped = true;
                    None
                }
                // Commands of the new-style dialect: not reachable with old-style rules,
                // executed once sessions speak new-style.
                Verdict::Trim { .. }
                | Verdict::WriteZeroes { .. }
                | Verdict::Cache { .. }
                | Verdict::BlockStatus { .. } => Some(Incoming::Reply {
                    cookie: req.cookie,
                    error: Some(Errno::EINVAL),
                    permits: self.permits(),
                }),
                Verdict::Reject(errno) => {
                    // The payload of a rejected WRITE is read and thrown away, so the
                    // connection stays usable (flexnbd §4.4).
                    self.framer.discard_payload();
                    Some(Incoming::Reply {
                        cookie: req.cookie,
                        error: Some(errno),
                        permits: self.permits(),
                    })
                }
            },
            Frame::Payload(part) => {
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
        }
    }

    /// Reads more bytes. Returns false at end of stream or on an error.
    async fn fill(&mut self) -> bool {
        let need = self.framer.next_need().unwrap_or(1);
        let missing = need.saturating_sub(self.buf.len());
        self.buf.reserve(missing.max(READ_AHEAD));
        let mid_request = !self.buf.is_empty() || !self.framer.at_request_boundary();
        if self.framer.at_request_boundary() && self.stop.is_requested() {
            return false;
        }
        let read = async {
            if self.framer.at_request_boundary() {
                // Between requests a close must not wait for the client to send more.
                tokio::select! {
                    read = self.sock.read_buf(&mut self.buf) => read,
                    () = self.stop.wake.notified() => Err(io::ErrorKind::Interrupted.into()),
                }
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
            Ok(_) => true,
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
