//! One client of the proxy, with its own upstream connection.
//!
//! Two tasks:
//! - the **reader** reads the client's requests (header, then payload) and hands them to the
//!   core over a bounded channel. Before it reads a payload it takes a slot (at most
//!   [`IN_FLIGHT`] requests) and the request's share of the byte budget ([`BUDGET`]); both
//!   are given back only once the reply is written, or queued in the core's reply buffer
//!   (at most [`OUT_LIMIT`] bytes, written before the core waits). A client that sends
//!   faster than upstream answers is held back by TCP: memory per session stays below
//!   [`BUDGET`] plus the read buffers and two write buffers of at most 256 KiB.
//! - the **core** forwards each request upstream through the client module's [`Engine`],
//!   relays every answer as it arrives (any order: NBD matches them by cookie), and keeps
//!   every unanswered request (header and payload, shared `Bytes`) so that after an
//!   upstream failure it can reconnect and send them all again, in the order the client
//!   sent them, byte-identical (flexnbd §12.4).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::negotiate::{negotiation, with_upstream_flags};
use super::rules::{cost, verdict, Cache, Verdict, MAX_REQUEST};
use super::upstream::{Export, Upstream, IN_FLIGHT, RETRY_PAUSE};
use crate::client::{Answer, Engine, EngineError, Forward};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::newstyle::{NegotiationError, Progress};
use crate::protocol::request::{decode_header, Header, HeaderStyle};
use crate::protocol::structured::{Extent, ReplyStyle, ReplyTo};
use crate::protocol::{cflags, Command, Errno, Request};

/// Bytes of payload and reply data one session holds at most (requests read but not yet
/// answered to the client, and prefetched halves in flight). At least [`MAX_REQUEST`], so
/// that the largest request always fits.
pub const BUDGET: u64 = 64 << 20;

/// What every session needs to know.
#[derive(Debug)]
pub struct Settings {
    pub upstream: Arc<Upstream>,
    /// Prefetch cache size (0: none).
    pub cache: usize,
    /// Fixed new-style negotiation towards the client.
    pub newstyle: bool,
    /// Cancelled at shutdown.
    pub stop: CancellationToken,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the client connection failed: {0}")]
    Downstream(#[from] io::Error),
    #[error("the client ended the connection")]
    ClientGone,
    #[error("new-style negotiation failed: {0}")]
    Negotiation(#[from] NegotiationError),
    #[error("the client aborted the negotiation")]
    Aborted,
    #[error("the client sent a {0}-byte request; the limit is {MAX_REQUEST} bytes")]
    TooLong(u64),
    #[error("the client sent a request with a bad magic number")]
    BadMagic,
    #[error("the client reused cookie {0:#x} while a request with it was unanswered")]
    CookieInUse(u64),
    #[error("the proxy is shutting down")]
    Stopped,
}

/// Runs a session with `stream`, a client just accepted, and logs how it ended.
pub async fn serve<S>(stream: S, peer: String, settings: Arc<Settings>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    tracing::info!("Client {peer} connected");
    match session(stream, &settings).await {
        Ok(()) => tracing::info!("Client {peer} disconnected"),
        Err(SessionError::ClientGone) => tracing::info!("Client {peer} went away"),
        Err(SessionError::Aborted) => tracing::info!("Client {peer} ended the negotiation"),
        Err(SessionError::Stopped) => {}
        Err(e) => tracing::warn!("Session with client {peer} ended: {e}"),
    }
}

/// The wire formats agreed with the client.
#[derive(Clone, Copy)]
struct Styles {
    header: HeaderStyle,
    reply: ReplyStyle,
    /// The id of `base:allocation` if a new-style client selected it: the proxy answers
    /// BLOCK_STATUS itself ("all data"), since an old-style upstream cannot.
    base_allocation: Option<u32>,
    /// The export size the client was given.
    size: u64,
}

async fn session<S>(stream: S, settings: &Settings) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let export = settings.upstream.export();
    let mut input = BytesMut::new();
    let styles = if settings.newstyle {
        negotiate(&mut reader, &mut writer, &mut input, export).await?
    } else {
        let hello = OldstyleHello {
            size: export.size,
            flags: export.flags,
        };
        writer.write_all(&hello.encode()).await?;
        Styles {
            header: HeaderStyle::Compact,
            reply: ReplyStyle::Simple,
            base_allocation: None,
            size: export.size,
        }
    };
    // Cancelled at shutdown, and by the reader when the client goes away: a session whose
    // client left stops retrying an upstream that is down.
    let stop = settings.stop.child_token();
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let requests = RequestReader {
        reader,
        input,
        style: styles.header,
        slots: Arc::new(Semaphore::new(IN_FLIGHT)),
        budget: Arc::new(Semaphore::new(BUDGET as usize)),
        costing: Cache::new(settings.cache, export.size),
        gone: stop.clone(),
    };
    // Reading starts at once: the client may send while upstream is being connected.
    let reading = tokio::spawn(requests.run(tx));
    let Some((connection, _)) = settings.upstream.connect_retrying(&stop).await else {
        reading.abort();
        return Err(if settings.stop.is_cancelled() {
            SessionError::Stopped
        } else {
            SessionError::ClientGone
        });
    };
    let engine = settings.upstream.engine(connection, &stop);
    let mut core = Core {
        writer,
        styles,
        upstream: settings.upstream.clone(),
        stop,
        shutdown: settings.stop.clone(),
        engine,
        table: BTreeMap::new(),
        next_seq: 0,
        answers: FuturesUnordered::new(),
        cache: Cache::new(settings.cache, export.size),
        out: Vec::with_capacity(OUT_LIMIT),
    };
    let result = core.run(rx).await;
    reading.abort();
    result
}

/// Fixed new-style negotiation; bytes the client sent after it stay in `input`.
async fn negotiate<S: AsyncRead + AsyncWrite>(
    reader: &mut ReadHalf<S>,
    writer: &mut WriteHalf<S>,
    input: &mut BytesMut,
    export: Export,
) -> Result<Styles, SessionError> {
    let mut negotiation = negotiation(export.size, export.flags);
    writer.write_all(&negotiation.greeting()).await?;
    loop {
        if reader.read_buf(input).await? == 0 {
            return Err(SessionError::ClientGone);
        }
        let mut out = Vec::new();
        let progress = negotiation.feed(input, &mut out);
        with_upstream_flags(&mut out, export.flags);
        writer.write_all(&out).await?;
        match progress? {
            Progress::NeedMore => {}
            Progress::Aborted => return Err(SessionError::Aborted),
            Progress::Done(agreed) => {
                return Ok(Styles {
                    header: agreed.header_style(),
                    reply: agreed.reply_style(),
                    base_allocation: agreed.base_allocation,
                    size: export.size,
                })
            }
        }
    }
}

/// A request read from the client, holding its share of the session's limits.
struct Received {
    request: Request,
    payload: Bytes,
    _slot: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
}

/// What the reader hands the core.
enum Incoming {
    Request(Received),
    /// DISCONNECT: answer what is in flight, then end.
    Disconnect,
    /// The session must end: the client went away, or sent what cannot be served.
    End(SessionError),
    /// A bad magic: answer EBADMSG with this cookie, then end.
    BadMagic(u64),
}

struct RequestReader<S> {
    reader: ReadHalf<S>,
    input: BytesMut,
    style: HeaderStyle,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    /// Only asked whether a READ would be prefetched, to charge it twice.
    costing: Cache,
    /// Cancelled when the client's connection ends or fails.
    gone: CancellationToken,
}

impl<S: AsyncRead> RequestReader<S> {
    async fn run(mut self, tx: mpsc::Sender<Incoming>) {
        loop {
            let next = match self.next().await {
                Ok(next) => next,
                Err(e) => {
                    self.gone.cancel();
                    match e.kind() {
                        io::ErrorKind::UnexpectedEof => Incoming::End(SessionError::ClientGone),
                        _ => Incoming::End(SessionError::Downstream(e)),
                    }
                }
            };
            let last = !matches!(next, Incoming::Request(_));
            if tx.send(next).await.is_err() || last {
                return;
            }
        }
    }

    /// Reads until `input` holds `n` bytes; EOF is `UnexpectedEof`.
    async fn fill(&mut self, n: usize) -> io::Result<()> {
        self.input
            .reserve(n.saturating_sub(self.input.len()).max(4096));
        while self.input.len() < n {
            if self.reader.read_buf(&mut self.input).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn next(&mut self) -> io::Result<Incoming> {
        let len = self.style.header_len();
        self.fill(len).await?;
        let header = self.input.split_to(len);
        let request = match decode_header(&header, self.style) {
            Header::Request(r) => r,
            Header::BadMagic { cookie, .. } => return Ok(Incoming::BadMagic(cookie)),
        };
        let payload = request.payload_len(self.style);
        match verdict(&request, payload) {
            Verdict::Disconnect => return Ok(Incoming::Disconnect),
            Verdict::TooLong => {
                return Ok(Incoming::End(SessionError::TooLong(
                    request.length.max(payload),
                )))
            }
            Verdict::Forward { .. } => {}
        }
        // Both limits are taken before the payload is read: that is the backpressure.
        let closed = |_| io::Error::other("the session is over");
        let slot = self.slots.clone().acquire_owned().await.map_err(closed)?;
        // cost() is at most MAX_REQUEST, which fits u32.
        let share = cost(&request, payload, &self.costing) as u32;
        let budget = self
            .budget
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(closed)?;
        // verdict() bounded the payload by MAX_REQUEST.
        let n = payload as usize;
        self.fill(n).await?;
        Ok(Incoming::Request(Received {
            request,
            payload: self.input.split_to(n).freeze(),
            _slot: slot,
            _budget: budget,
        }))
    }
}

/// A request sent upstream and not answered yet.
struct Entry {
    /// Exactly what was sent upstream, to send again after a reconnect.
    forward: Forward,
    /// The client's READ length when upstream was asked for twice as much (prefetch), and
    /// the cache generation then.
    prefetch: Option<(u64, u64)>,
    /// Released once the reply has been written to the client.
    _held: Received,
}

type AnswerFuture = Pin<Box<dyn Future<Output = (u64, Option<Answer>)> + Send>>;

/// What woke the core up.
enum Event {
    Answer(u64, Option<Answer>),
    UpstreamFailed(String),
    Incoming(Option<Incoming>),
    Stop,
}

struct Core<S> {
    writer: WriteHalf<S>,
    styles: Styles,
    upstream: Arc<Upstream>,
    /// The session's token: shutdown, or the client went away.
    stop: CancellationToken,
    /// The proxy's: shutdown only.
    shutdown: CancellationToken,
    engine: Engine,
    /// Unanswered requests, in the order the client sent them.
    table: BTreeMap<u64, Entry>,
    next_seq: u64,
    /// Each unanswered request's answer from the current engine; `None` when the engine
    /// failed before answering it.
    answers: FuturesUnordered<AnswerFuture>,
    cache: Cache,
    /// Replies not yet written: every reply ready at once leaves in one write.
    out: Vec<u8>,
}

/// Replies are written once this much is waiting, even if more are ready.
const OUT_LIMIT: usize = 256 * 1024;
/// READ data up to this size is copied into the reply buffer; larger data is written from
/// where it is.
const COPY_LIMIT: usize = 64 * 1024;

impl<S: AsyncRead + AsyncWrite> Core<S> {
    async fn run(&mut self, mut rx: mpsc::Receiver<Incoming>) -> Result<(), SessionError> {
        let mut closing = false;
        loop {
            if closing && self.table.is_empty() {
                self.flush_out().await?;
                self.writer.flush().await?;
                return Ok(());
            }
            // Whatever is ready now is handled first; the replies it produced are written
            // together before the core waits.
            let ready = self.next_event(&mut rx, closing).now_or_never();
            let event = match ready {
                Some(event) if self.out.len() < OUT_LIMIT => event,
                ready => {
                    self.flush().await?;
                    match ready {
                        Some(event) => event,
                        None => self.next_event(&mut rx, closing).await,
                    }
                }
            };
            match event {
                Event::Stop => return Err(self.stopped()),
                Event::Answer(seq, Some(answer)) => self.answered(seq, answer).await?,
                Event::Answer(_, None) => {
                    let why = self.engine_failure();
                    self.reconnect(why).await?;
                }
                Event::UpstreamFailed(why) => self.reconnect(why).await?,
                Event::Incoming(Some(Incoming::Request(received))) => self.submit(received).await?,
                Event::Incoming(Some(Incoming::Disconnect)) => closing = true,
                Event::Incoming(Some(Incoming::BadMagic(cookie))) => {
                    let to = ReplyTo { cookie, offset: 0 };
                    self.reply(to, Command::Flush, Errno::EBADMSG.0, Bytes::new())
                        .await?;
                    self.flush_out().await?;
                    return Err(SessionError::BadMagic);
                }
                Event::Incoming(Some(Incoming::End(why))) => return Err(why),
                Event::Incoming(None) => return Err(SessionError::ClientGone),
            }
        }
    }

    /// Waits for the next thing to do.
    async fn next_event(&mut self, rx: &mut mpsc::Receiver<Incoming>, closing: bool) -> Event {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Event::Stop,
            Some((seq, answer)) = self.answers.next(), if !self.answers.is_empty() => {
                Event::Answer(seq, answer)
            }
            why = self.engine.failed() => Event::UpstreamFailed(why.to_string()),
            incoming = rx.recv(), if !closing => Event::Incoming(incoming),
        }
    }

    /// Writes the requests queued upstream, then the replies waiting for the client.
    async fn flush(&mut self) -> Result<(), SessionError> {
        if let Err(e) = self.engine.flush_queue().await {
            self.reconnect(e.to_string()).await?;
        }
        self.flush_out().await
    }

    /// Writes the replies waiting in `out`.
    async fn flush_out(&mut self) -> Result<(), SessionError> {
        if !self.out.is_empty() {
            self.writer.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Why the session's token was cancelled.
    fn stopped(&self) -> SessionError {
        if self.shutdown.is_cancelled() {
            SessionError::Stopped
        } else {
            SessionError::ClientGone
        }
    }

    fn engine_failure(&self) -> String {
        match self.engine.failed().now_or_never() {
            Some(e) => e.to_string(),
            None => "upstream dropped a request".into(),
        }
    }

    /// A request from the client: answered from the cache, or sent upstream.
    async fn submit(&mut self, received: Received) -> Result<(), SessionError> {
        let mut request = received.request;
        let mut prefetch = None;
        if let (Command::BlockStatus, Some(id)) = (request.command, self.styles.base_allocation) {
            return self.block_status(&request, id).await;
        }
        if request.command == Command::Read {
            if let Some(data) = self.cache.lookup(request.offset, request.length) {
                let to = ReplyTo::from(&request);
                return self.reply(to, Command::Read, 0, data).await;
            }
            if self.cache.would_prefetch(request.offset, request.length) {
                prefetch = Some((request.length, self.cache.generation()));
                request.length *= 2;
            }
        } else {
            self.cache.invalidate();
        }
        let forward = Forward {
            request,
            payload: received.payload.clone(),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.table.insert(
            seq,
            Entry {
                forward,
                prefetch,
                _held: received,
            },
        );
        if let Err(why) = self.send(seq).await? {
            self.reconnect(why).await?;
        }
        Ok(())
    }

    /// Queues the request `seq` on the current engine (written by [`Core::flush`]). The
    /// outer error ends the session; the inner one is an upstream failure (reconnect).
    async fn send(&mut self, seq: u64) -> Result<Result<(), String>, SessionError> {
        let Some(entry) = self.table.get(&seq) else {
            return Ok(Ok(()));
        };
        match self.engine.queue(&entry.forward).await {
            Ok(rx) => {
                self.answers.push(answer_of(seq, rx));
                Ok(Ok(()))
            }
            Err(EngineError::CookieInUse(cookie)) => Err(SessionError::CookieInUse(cookie)),
            // A length a compact header cannot carry (an extended-header client's): the
            // client gets the error; upstream never sees the request.
            Err(EngineError::TooLong(errno)) => {
                let entry = self.table.remove(&seq).expect("looked up above");
                let request = entry.forward.request;
                let to = ReplyTo::from(&request);
                self.reply(to, request.command, errno.0, Bytes::new())
                    .await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    /// Relays upstream's answer to request `seq` (an error without data, as it came).
    async fn answered(&mut self, seq: u64, answer: Answer) -> Result<(), SessionError> {
        let Some(entry) = self.table.remove(&seq) else {
            return Ok(());
        };
        let request = entry.forward.request;
        let mut data = answer.data;
        let to = ReplyTo::from(&request);
        if let Some((len, generation)) = entry.prefetch {
            if answer.error == 0 {
                data = self.cache.fill(request.offset, len, data, generation);
            }
        }
        self.reply(to, request.command, answer.error, data).await
    }

    /// Answers BLOCK_STATUS for `base:allocation`: the whole range is data. That is always
    /// true enough (a client only loses the chance to skip holes), and upstream is not asked
    /// because an old-style server has no block status.
    async fn block_status(&mut self, request: &Request, id: u32) -> Result<(), SessionError> {
        let to = ReplyTo::from(request);
        let in_range = request
            .end()
            .is_some_and(|end| end <= self.styles.size && request.length > 0);
        let mut out = Vec::with_capacity(64);
        let extent = [Extent {
            length: request.length,
            flags: 0,
        }];
        let req_one = request.flags & cflags::REQ_ONE != 0;
        let encoded = in_range
            && self
                .styles
                .reply
                .block_status(to, id, &extent, req_one, true, &mut out)
                .is_ok();
        if !encoded {
            out.clear();
            self.styles.reply.error(to, Errno::EINVAL, "", &mut out);
        }
        self.out.extend_from_slice(&out);
        Ok(())
    }

    /// Queues one reply to the client in the agreed style (written by [`Core::flush_out`];
    /// READ data over [`COPY_LIMIT`] is written at once, after what is queued).
    async fn reply(
        &mut self,
        to: ReplyTo,
        command: Command,
        error: u32,
        data: Bytes,
    ) -> Result<(), SessionError> {
        let style = self.styles.reply;
        let with_data = error == 0 && command == Command::Read && !data.is_empty();
        if error != 0 {
            style.error(to, Errno(error), "", &mut self.out);
            return Ok(());
        }
        if !with_data {
            style.ok(to, &mut self.out);
            return Ok(());
        }
        if style
            .read_data_header(to, data.len() as u64, &mut self.out)
            .is_err()
        {
            style.error(to, Errno::EOVERFLOW, "", &mut self.out);
            return Ok(());
        }
        if data.len() <= COPY_LIMIT {
            self.out.extend_from_slice(&data);
        } else {
            self.flush_out().await?;
            self.writer.write_all(&data).await?;
        }
        Ok(())
    }

    /// Upstream failed: relays the answers that arrived before the failure, reconnects
    /// (every [`RETRY_PAUSE`] until it works) and sends every unanswered request again, in
    /// the client's order. Returns only once they are all on the new connection.
    async fn reconnect(&mut self, mut why: String) -> Result<(), SessionError> {
        let addr = self.upstream.addr;
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            self.relay_delivered().await?;
            self.flush_out().await?;
            self.cache.clear();
            tracing::warn!(
                "Upstream {addr} failed: {why}; reconnecting ({} unanswered requests to resend)",
                self.table.len()
            );
            let Some((connection, failures)) = self.upstream.connect_retrying(&self.stop).await
            else {
                return Err(self.stopped());
            };
            attempts += failures + 1;
            self.engine = self.upstream.engine(connection, &self.stop);
            match self.resend_all().await? {
                Ok(resent) => {
                    tracing::info!(
                        "Upstream {addr} is back after {:.1} s ({attempts} connection attempts); \
                         resent {resent} unanswered requests",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                Err(failure) => {
                    why = failure;
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_PAUSE) => {}
                        () = self.stop.cancelled() => return Err(self.stopped()),
                    }
                }
            }
        }
    }

    /// Relays the answers the failed engine delivered before it failed; forgets the rest.
    async fn relay_delivered(&mut self) -> Result<(), SessionError> {
        let pending = std::mem::take(&mut self.answers);
        for answer in pending {
            if let Some((seq, Some(answer))) = answer.now_or_never() {
                self.answered(seq, answer).await?;
            }
        }
        Ok(())
    }

    /// Sends every unanswered request again; the inner error is an upstream failure.
    async fn resend_all(&mut self) -> Result<Result<usize, String>, SessionError> {
        let seqs: Vec<u64> = self.table.keys().copied().collect();
        for &seq in &seqs {
            if let Err(why) = self.send(seq).await? {
                return Ok(Err(why));
            }
        }
        if let Err(e) = self.engine.flush_queue().await {
            return Ok(Err(e.to_string()));
        }
        Ok(Ok(seqs.len()))
    }
}

fn answer_of(seq: u64, rx: oneshot::Receiver<Answer>) -> AnswerFuture {
    Box::pin(async move { (seq, rx.await.ok()) })
}
