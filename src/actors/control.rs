//! The control actor: the Unix control socket and its text protocol (flexnbd §6).
//!
//! Unlike C flexnbd, control connections are served concurrently: each connection is a
//! task that reads its request, asks the control actor to execute it and writes the single
//! response line. A client that connects and never sends blocks nobody (it is dropped after
//! [`IDLE_LIMIT`] without an answer).
//!
//! # Handshakes
//! - [`Execute`] (connection task → control): answered with the exact response line. If
//!   the control actor is gone the task answers `1: shutting down` itself.
//! - Status: control → listener [`GetStatus`], answered at once.
//! - `acl`: control → listener [`ReplaceAcl`], answered once the list is in force.
//! - [`StopControl`] (main → control, at shutdown): stops accepting, answers the
//!   `mirror_wait` requests still waiting with `1: shutting down`; answered when the socket
//!   is closed and every `mirror_wait` answer has been written (at most
//!   [`ANSWER_WRITE_GRACE`]), so that main can unlink its path before the NBD port closes
//!   and a caller waiting for an `exit` migration learns its outcome before the process
//!   exits.
//! - `mirror`: control starts a [`Mirror`] and answers once its first connection attempt
//!   has a result; `break` sends it [`Abandon`]; `mirror_max_bps` sends [`SetMaxBps`]. The
//!   mirror reports its own end with [`MirrorEnded`], which ends the registration when
//!   flexnbd §6.4 says it must (first attempt failed, a `nothing` migration completed).
//! - `mirror_wait` (ours): control keeps a oneshot sender per request with the registered
//!   migration and answers it when the migration ends: from [`MirrorEnded`], or when a
//!   `break`, a failed first attempt or [`StopMirror`] ends the registration first.
//! - [`StopMirror`] (main → control, on a signal): refuse new migrations, abandon a running
//!   one, answer whether one was registered (the exit status depends on it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};

use crate::acl::Acl;
use crate::protocol::control::{
    parse_mirror_max_bps, response, ControlRequest, MirrorAction, MirrorRequest, MirrorTls,
    RequestReader, Status, FAILED, MISSING_COMMAND, OK, UNKNOWN_COMMAND,
};
use crate::protocol::handoff::MigrationId;
use crate::storage::{AllocationMap, Backing};
use crate::tls::ClientTls;

use super::inbound::{GetTargetStatus, Inbound};
use super::listener::{GetStatus, Listener, ReplaceAcl};
use super::mirror::{
    Abandon, AbandonAnswer, Mirror, MirrorConfig, MirrorEnded, MirrorStats, Outcome, SetMaxBps,
};
use super::Events;

/// A control connection that sends nothing for this long is closed without an answer.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How long [`StopControl`] waits for `mirror_wait` answers to be written: long enough for
/// a local socket, short enough not to hold up a shutdown for a client that stopped reading.
pub const ANSWER_WRITE_GRACE: Duration = Duration::from_secs(2);

/// What the control actor needs to answer.
pub struct ControlConfig {
    pub pid: u32,
    pub size: u64,
    /// Fixed at startup; `acl` keeps it (flexnbd §8).
    pub default_deny: bool,
    pub listener: Addr<Listener>,
    pub allocation: Arc<AllocationMap>,
    /// `listen`: the inbound-migration actor, which says whether this side has control.
    pub inbound: Option<Addr<Inbound>>,
}

pub struct Control {
    socket: Option<std::os::unix::net::UnixListener>,
    accept: Option<SpawnHandle>,
    config: ControlConfig,
    /// What a migration needs; `None` where migrations are not possible (`listen`).
    migration: Option<(Arc<Backing>, Option<Events>)>,
    /// The registered migration (flexnbd §6.4), if any.
    mirror: Option<Registered>,
    /// A signal arrived: no new migration may start.
    shutting_down: bool,
    /// `listen --rebind-*`: where rebinding is.
    rebind: Option<String>,
    /// [`StopControl`] arrived: `mirror_wait` is answered at once.
    stopping: bool,
    /// `mirror_wait` answers not yet written by their connections.
    pending: PendingAnswers,
}

/// Rebinder → control: the listener now serving the export.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReplaceListener(pub Addr<Listener>);

/// Rebinder → control: where rebinding is, for `status` (`binding`, `waiting:<reason>`,
/// `serving`, `failed`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RebindState(pub String);

/// A registered migration.
struct Registered {
    id: MigrationId,
    addr: Addr<Mirror>,
    stats: Arc<MirrorStats>,
    /// `mirror_wait` requests waiting for this migration's end.
    waiters: Vec<oneshot::Sender<String>>,
    /// The `mirror_wait` answer once the migration has ended while it stays registered (a
    /// completed `exit`/`unlink` hand-off, until the process exits).
    ended: Option<String>,
}

impl Registered {
    fn new(id: MigrationId, addr: Addr<Mirror>, stats: Arc<MirrorStats>) -> Registered {
        Registered {
            id,
            addr,
            stats,
            waiters: Vec::new(),
            ended: None,
        }
    }

    fn answer_waiters(&mut self, answer: &str) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(answer.to_owned());
        }
    }
}

/// `mirror`'s answer when the first attempt failed: flexnbd's line, unchanged, then
/// (ours) a second line with the cause the mirror found — the connect error, the two sizes,
/// what was wrong with the hello. C clients stop reading at the first newline, so they see
/// exactly C's answer; ours print the cause too.
/// The client credentials a `mirror` names, loaded and checked.
fn load_mirror_tls(tls: &MirrorTls) -> Result<ClientTls, crate::tls::TlsError> {
    match tls {
        MirrorTls::X509(dir) => ClientTls::x509(std::path::Path::new(dir)),
        MirrorTls::Psk(file) => ClientTls::psk(std::path::Path::new(file), None),
    }
}

fn first_failure(text: &str, cause: Option<String>) -> String {
    let mut answer = response(FAILED, text);
    if let Some(cause) = cause.filter(|c| c != text) {
        answer.push_str(&response(FAILED, &cause.replace(['\r', '\n'], " ")));
    }
    answer
}

/// The `mirror_wait` answer for how a migration ended (one line, whatever the reason says).
fn wait_answer(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Completed(_) => response(OK, "migration completed"),
        Outcome::Abandoned => response(FAILED, "mirror stopped"),
        Outcome::FirstAttemptFailed(failure) => response(FAILED, failure.text()),
        Outcome::Fatal(why) => response(FAILED, &why.replace(['\r', '\n'], " ")),
    }
}

/// Counts the `mirror_wait` answers not yet written by their connections. With action
/// `exit` the process ends right after the hand-off; [`StopControl`] waits on this so that
/// the answer reaches the client first.
#[derive(Clone, Default)]
struct PendingAnswers(Arc<PendingInner>);

#[derive(Default)]
struct PendingInner {
    count: AtomicUsize,
    idle: Notify,
}

/// One `mirror_wait` connection's answer, pending until dropped.
struct PendingAnswer(PendingAnswers);

impl PendingAnswers {
    fn enter(&self) -> PendingAnswer {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        PendingAnswer(self.clone())
    }

    /// Resolves once no answer is pending.
    async fn idle(&self) {
        loop {
            // Created before the check: `notify_waiters` reaches it even if not yet polled.
            let notified = self.0.idle.notified();
            if self.0.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for PendingAnswer {
    fn drop(&mut self) {
        if (self.0).0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            (self.0).0.idle.notify_waiters();
        }
    }
}

/// Main → control, on a signal: abandon the migration, if one is registered, and refuse
/// new ones. Answers `None` when none was registered, otherwise whether this side still
/// holds every acknowledged write once it has stopped (`false`: it had let go, in doubt).
#[derive(Message, Debug)]
#[rtype(result = "Option<bool>")]
pub struct StopMirror;

/// Main → control, every few seconds under a service manager: the registered migration
/// in a few words (its `STATUS=`), or `None` when none is registered.
#[derive(Message, Debug)]
#[rtype(result = "Option<String>")]
pub struct MigrationSummary;

/// Connection task → control: execute a parsed request, answer the response line.
#[derive(Message, Debug)]
#[rtype(result = "String")]
pub struct Execute(pub ControlRequest);

/// Main → control: stop accepting and close the socket; answered once the `mirror_wait`
/// answers are written (see [`ANSWER_WRITE_GRACE`]).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct StopControl;

struct Accepted(std::io::Result<UnixStream>);

impl Control {
    /// `socket` must already be bound and listening (after the NBD port, flexnbd §5.1).
    pub fn new(socket: std::os::unix::net::UnixListener, config: ControlConfig) -> Control {
        Control {
            socket: Some(socket),
            accept: None,
            config,
            migration: None,
            mirror: None,
            shutting_down: false,
            rebind: None,
            stopping: false,
            pending: PendingAnswers::default(),
        }
    }

    /// Lets this server migrate its export (`serve`): `mirror` commands start a [`Mirror`]
    /// on `backing`, which reports a completed or fatally failed hand-off on `events`.
    pub fn with_migration(mut self, backing: Arc<Backing>, events: Option<Events>) -> Control {
        self.migration = Some((backing, events));
        self
    }

    fn start_mirror(
        &mut self,
        request: MirrorRequest,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, String> {
        let ready =
            |text: String| -> ResponseActFuture<Self, String> { Box::pin(actix::fut::ready(text)) };
        if self.shutting_down {
            return ready(response(FAILED, "shutting down"));
        }
        if self.mirror.is_some() {
            return ready(response(FAILED, "mirror already running"));
        }
        let Some((backing, events)) = self.migration.clone() else {
            return ready(response(FAILED, "this server cannot start a migration"));
        };
        // Credentials are read here, by the server (the files are its), and checked whole:
        // a bad one is answered at once, naming the file, and no migration starts.
        let tls = match request.tls.as_ref().map(load_mirror_tls).transpose() {
            Ok(tls) => tls.map(Arc::new),
            Err(e) => return ready(response(FAILED, &e.to_string().replace(['\r', '\n'], " "))),
        };
        if let Some(tls) = &tls {
            tracing::info!(
                "Migration to {}:{} uses TLS: {}",
                request.addr,
                request.port,
                tls.description
            );
        }
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let id = MigrationId(crate::identity::random_id());
        let config = MirrorConfig {
            request,
            id,
            backing,
            listener: self.config.listener.clone(),
            events,
            owner: ctx.address().recipient(),
            tls,
        };
        let mirror = Mirror::new(config, first_tx);
        let stats = mirror.stats();
        let addr = mirror.start();
        self.mirror = Some(Registered::new(id, addr.clone(), stats.clone()));
        Box::pin(
            first_rx
                .into_actor(self)
                .map(move |first, act, _| match first {
                    Ok(Ok(())) => response(OK, "Mirror started"),
                    Ok(Err(failure)) => {
                        act.unregister(&addr, &response(FAILED, failure.text()));
                        first_failure(failure.text(), stats.last_failure())
                    }
                    Err(_) => response(FAILED, "Mirror failed to initialise"),
                }),
        )
    }

    /// `break`: the mirror's hand-off state machine decides. A refused break changes
    /// nothing and keeps the registration; a stopped one ends it.
    fn break_mirror(&mut self, force_source: bool) -> ResponseActFuture<Self, String> {
        let Some(registered) = &self.mirror else {
            return Box::pin(actix::fut::ready(response(FAILED, "not mirroring")));
        };
        // A completed hand-off stays registered until the process exits, but its actor has
        // stopped: answer from what it reported, never from a message it cannot receive.
        if registered.ended.is_some() {
            return Box::pin(actix::fut::ready(response(FAILED, "mirror completed")));
        }
        let addr = registered.addr.clone();
        Box::pin(
            addr.clone()
                .send(Abandon::Break { force_source })
                .into_actor(self)
                .map(move |answer, act, _| {
                    // The actor stopped before it could answer: the migration has ended
                    // by itself (its `MirrorEnded` is on its way). Nothing was stopped here,
                    // so never answer `0: mirror stopped`.
                    let answer = answer.unwrap_or_else(|_| {
                        AbandonAnswer::Refused("the migration has already ended".into())
                    });
                    if answer == AbandonAnswer::Stopped {
                        act.unregister(&addr, &response(FAILED, "mirror stopped"));
                    }
                    match answer {
                        AbandonAnswer::Completed => response(FAILED, "mirror completed"),
                        AbandonAnswer::Refused(why) => {
                            response(FAILED, &format!("break refused: {why}"))
                        }
                        AbandonAnswer::Stopped => response(OK, "mirror stopped"),
                    }
                }),
        )
    }

    /// Ends the registration of the migration at `addr`, if it is still the registered
    /// one, and gives its `mirror_wait` requests `answer`.
    fn unregister(&mut self, addr: &Addr<Mirror>, answer: &str) {
        if let Some(mut registered) = self.mirror.take_if(|m| m.addr == *addr) {
            registered.answer_waiters(answer);
        }
    }

    /// `mirror_wait`: the answer comes when the registered migration ends.
    fn wait_for_mirror(&mut self) -> ResponseFuture<String> {
        let now = |text: String| -> ResponseFuture<String> { Box::pin(async move { text }) };
        // A hand-off that completed stays registered until the process exits, stopping
        // included: its outcome is known, whatever comes next.
        if let Some(answer) = self.mirror.as_ref().and_then(|m| m.ended.clone()) {
            return now(answer);
        }
        if self.stopping {
            return now(response(FAILED, "shutting down"));
        }
        let Some(registered) = &mut self.mirror else {
            return now(response(FAILED, "not mirroring"));
        };
        let (tx, rx) = oneshot::channel();
        registered.waiters.push(tx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| response(FAILED, "shutting down"))
        })
    }

    fn max_bps(&self, args: &[String]) -> String {
        let Some(registered) = &self.mirror else {
            return response(FAILED, "Not currently mirroring");
        };
        match parse_mirror_max_bps(args) {
            Ok(limit) => {
                registered.addr.do_send(SetMaxBps(limit));
                response(OK, "updated")
            }
            Err(text) => response(FAILED, text),
        }
    }

    fn accept_stream(listener: tokio::net::UnixListener) -> impl Stream<Item = Accepted> {
        futures_util::stream::unfold(listener, |listener| async move {
            let result = listener.accept().await.map(|(stream, _)| stream);
            if let Err(e) = &result {
                tracing::error!("accept() on the control socket failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some((Accepted(result), listener))
        })
    }

    fn status(&self) -> ResponseFuture<String> {
        let listener = self.config.listener.clone();
        let inbound = self.config.inbound.clone();
        let map = self.config.allocation.clone();
        let (pid, size) = (self.config.pid, self.config.size);
        let mirror = self.mirror.as_ref().map(|m| m.stats.clone());
        let rebind = self.rebind.clone();
        Box::pin(async move {
            let Ok(clients) = listener.send(GetStatus).await else {
                return response(FAILED, "shutting down");
            };
            let target = match inbound {
                Some(inbound) => match inbound.send(GetTargetStatus).await {
                    Ok(target) => Some(target),
                    Err(_) => return response(FAILED, "shutting down"),
                },
                None => None,
            };
            let mut extra = vec![
                ("alloc_map", map.state().name().to_owned()),
                ("alloc_map_progress", map.progress_percent().to_string()),
            ];
            if let Some(stats) = &mirror {
                extra.extend(stats.extra());
            }
            if let Some(target) = &target {
                extra.push(("handoff_phase", target.phase.to_owned()));
                extra.push(("handoff_attempt", target.attempt.to_string()));
            }
            if let Some(rebind) = rebind {
                extra.push(("rebind", rebind));
            }
            // `has_control`: this side may accept writes (now, or once its doors reopen)
            // and holds every acknowledged write.
            let has_control = match (&target, &mirror) {
                (Some(target), _) => target.has_control,
                (None, Some(stats)) => stats.has_control(),
                (None, None) => true,
            };
            let status = Status {
                pid,
                size,
                is_mirroring: mirror.is_some(),
                clients_allowed: clients.clients_allowed,
                num_clients: clients.num_clients,
                has_control,
                migration: mirror.map(|stats| stats.status()),
                extra,
            };
            response(OK, &status.line())
        })
    }

    fn acl(&self, entries: Vec<String>) -> ResponseFuture<String> {
        let parsed = Acl::parse(&entries, self.config.default_deny);
        let listener = self.config.listener.clone();
        Box::pin(async move {
            match parsed {
                Err(bad) => response(FAILED, &format!("bad spec: {}", bad.0)),
                Ok(acl) => match listener.send(ReplaceAcl(acl)).await {
                    Ok(()) => response(OK, "updated"),
                    Err(_) => response(FAILED, "shutting down"),
                },
            }
        })
    }
}

impl Actor for Control {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        match socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(socket))
        {
            Ok(listener) => self.accept = Some(ctx.add_stream(Self::accept_stream(listener))),
            Err(e) => {
                tracing::error!(
                    "Couldn't register the control socket: {e}; control is unavailable"
                );
                ctx.stop();
            }
        }
    }
}

impl StreamHandler<Accepted> for Control {
    fn handle(&mut self, item: Accepted, ctx: &mut Self::Context) {
        if let Accepted(Ok(stream)) = item {
            actix_rt::spawn(serve_connection(
                stream,
                ctx.address(),
                self.pending.clone(),
            ));
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

impl Handler<Execute> for Control {
    type Result = ResponseActFuture<Self, String>;

    fn handle(&mut self, msg: Execute, ctx: &mut Self::Context) -> Self::Result {
        let now =
            |text: String| -> ResponseActFuture<Self, String> { Box::pin(actix::fut::ready(text)) };
        let wrap = |fut: ResponseFuture<String>, act: &Self| -> ResponseActFuture<Self, String> {
            Box::pin(fut.into_actor(act))
        };
        match msg.0 {
            ControlRequest::Missing => now(response(MISSING_COMMAND, "missing command")),
            ControlRequest::Unknown => now(response(UNKNOWN_COMMAND, "unknown command")),
            ControlRequest::Status => wrap(self.status(), self),
            ControlRequest::Acl(entries) => wrap(self.acl(entries), self),
            ControlRequest::Break { force_source } => self.break_mirror(force_source),
            ControlRequest::MirrorMaxBps(args) => now(self.max_bps(&args)),
            ControlRequest::MirrorRefused(text) => now(response(FAILED, text)),
            ControlRequest::Mirror(request) => self.start_mirror(request, ctx),
            ControlRequest::MirrorWait => wrap(self.wait_for_mirror(), self),
        }
    }
}

impl Handler<MirrorEnded> for Control {
    type Result = ();

    /// flexnbd §6.4 (corrected): the registration ends when the first attempt failed and
    /// when a `nothing` migration completed; a completed `exit`/`unlink` migration stays
    /// registered until the process exits (`break` then answers `1: mirror completed`).
    /// `mirror_wait` requests get the outcome here.
    fn handle(&mut self, msg: MirrorEnded, _ctx: &mut Self::Context) {
        let answer = wait_answer(&msg.outcome);
        let stays = matches!(
            msg.outcome,
            Outcome::Completed(MirrorAction::Exit | MirrorAction::Unlink)
        );
        if let Some(registered) = self.mirror.as_mut().filter(|m| m.id == msg.id) {
            registered.answer_waiters(&answer);
            if stays {
                registered.ended = Some(answer);
            } else {
                self.mirror = None;
            }
        }
    }
}

impl Handler<MigrationSummary> for Control {
    type Result = Option<String>;

    fn handle(&mut self, _msg: MigrationSummary, _ctx: &mut Self::Context) -> Self::Result {
        let stats = &self.mirror.as_ref()?.stats;
        let status = stats.status();
        let mode = if stats.is_active() {
            "active"
        } else {
            "background"
        };
        let mut text = format!(
            "Migrating: {}, {}%, {mode}",
            stats.phase().name(),
            stats.progress_percent()
        );
        if let Some(left) = status.seconds_left {
            text.push_str(&format!(", about {left} s left"));
        }
        Some(text)
    }
}

impl Handler<StopMirror> for Control {
    type Result = ResponseFuture<Option<bool>>;

    fn handle(&mut self, _msg: StopMirror, _ctx: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        let mirror = self.mirror.take().map(|mut m| {
            m.answer_waiters(&response(FAILED, "shutting down"));
            (m.addr, m.stats)
        });
        Box::pin(async move {
            let (addr, stats) = mirror?;
            let _ = addr.send(Abandon::Signal).await;
            Some(stats.has_control())
        })
    }
}

impl Handler<StopControl> for Control {
    type Result = ResponseActFuture<Self, ()>;

    /// The actor stays alive until the answers are written: a `mirror_wait` answered by a
    /// [`MirrorEnded`] just before (queued ahead of this message) is still on its way to
    /// its connection.
    fn handle(&mut self, _msg: StopControl, ctx: &mut Self::Context) -> Self::Result {
        if let Some(accept) = self.accept.take() {
            ctx.cancel_future(accept);
        }
        self.stopping = true;
        if let Some(registered) = &mut self.mirror {
            registered.answer_waiters(&response(FAILED, "shutting down"));
        }
        let pending = self.pending.clone();
        let written = async move {
            if tokio::time::timeout(ANSWER_WRITE_GRACE, pending.idle())
                .await
                .is_err()
            {
                tracing::warn!(
                    "A mirror_wait answer was not written within {ANSWER_WRITE_GRACE:?}; closing anyway"
                );
            }
        };
        Box::pin(written.into_actor(self).map(|(), _act, ctx| ctx.stop()))
    }
}

/// One control connection: read the request, execute it, write the answer, close. Only
/// reading the request is limited by [`IDLE_LIMIT`]; `mirror_wait`'s answer may come hours
/// later, and is counted in `pending` until written.
async fn serve_connection(mut stream: UnixStream, control: Addr<Control>, pending: PendingAnswers) {
    let mut reader = RequestReader::default();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(IDLE_LIMIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                if reader.feed(&buf[..n]) {
                    break;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("Reading a control request failed: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!("A control client sent nothing for {IDLE_LIMIT:?}; closing it");
                return;
            }
        }
    }
    let request = ControlRequest::parse(&reader.into_lines());
    tracing::info!("Control request: {request:?}");
    let _pending = matches!(request, ControlRequest::MirrorWait).then(|| pending.enter());
    let answer = control
        .send(Execute(request))
        .await
        .unwrap_or_else(|_| response(FAILED, "shutting down"));
    if let Ok(Err(e)) = tokio::time::timeout(IDLE_LIMIT, stream.write_all(answer.as_bytes())).await
    {
        tracing::warn!("Answering a control request failed: {e}");
    }
    let _ = stream.shutdown().await;
}

impl Handler<ReplaceListener> for Control {
    type Result = ();

    fn handle(&mut self, msg: ReplaceListener, _ctx: &mut Self::Context) {
        self.config.listener = msg.0;
    }
}

impl Handler<RebindState> for Control {
    type Result = ();

    fn handle(&mut self, msg: RebindState, _ctx: &mut Self::Context) {
        self.rebind = Some(msg.0);
    }
}
