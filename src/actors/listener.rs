//! The listener: accept loop, ACL, client limit and the registry of sessions.
//!
//! # Handshakes
//! - [`Shutdown`] (main → listener): stop accepting (the listening socket is closed), ask
//!   every session to [`Close`], answer once the registry is empty. A second `Shutdown`
//!   waits for the same moment.
//! - [`SessionEnded`] (session → listener): removes the session from the registry; answers
//!   pending shutdown waiters when it was the last one.
//! - [`GetStatus`] (control → listener): answered at once with the client count and whether
//!   clients are admitted. A connection whose peer has already closed is not counted, even
//!   if its session has not noticed yet.
//! - [`ReplaceAcl`] (control → listener): replaces the ACL and sends [`Close`] to every
//!   session whose peer the new list no longer admits; answered once the list is in force.
//! - [`CloseDoors`] (mirror → listener, the final pass of a migration): stop admitting
//!   clients (new connections are closed at once, with no hello), ask every session to
//!   close, answer once no session is left (the old `serve_wait_for_close`).
//! - [`OpenDoors`] (mirror → listener, after a failed or abandoned migration, or one whose
//!   action is `nothing`): admit clients again. Answered at once.
//! - [`HandoffMessage`] (session → listener of a `listen` server): apply the hand-off state
//!   machine; answered after its effect (`fdatasync`, taking control) is done.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::Stream;
use tokio::sync::oneshot;

use crate::acl::Acl;

use super::session::{Close, CloseReason, HandoffMessage, Session, SessionConfig, SessionEnded};
use super::{ClientId, Events, ServerEvent};
use crate::protocol::handoff::{HandoffReply, TargetEffect, TargetHandoff};

/// Pause after a failing `accept()` (for example EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Settings of a listener.
pub struct ListenerConfig {
    pub acl: Acl,
    pub max_clients: usize,
    pub session: Arc<SessionConfig>,
    /// Arbiters the sessions run on, used round-robin.
    pub arbiters: Vec<ArbiterHandle>,
}

struct SessionEntry {
    addr: Addr<Session>,
    peer: SocketAddr,
    /// A duplicate of the client's socket, polled by `status` to leave out connections
    /// whose peer has closed but whose session has not reported its end yet.
    probe: Option<std::os::fd::OwnedFd>,
}

impl SessionEntry {
    /// False once the peer has closed or reset the connection.
    fn peer_alive(&self) -> bool {
        let Some(fd) = &self.probe else {
            return true;
        };
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for an open descriptor we own; a zero timeout
        // makes poll return at once.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready <= 0 || pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) == 0
    }
}

pub struct Listener {
    socket: Option<std::net::TcpListener>,
    accept: Option<SpawnHandle>,
    config: ListenerConfig,
    sessions: HashMap<ClientId, SessionEntry>,
    next_id: ClientId,
    next_arbiter: usize,
    /// Answered when the registry becomes empty (after a shutdown began, or once the doors
    /// are closed for a migration's final pass).
    empty_waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
    /// New clients are admitted (false during a migration's final pass).
    doors_open: bool,
    /// `serve`: always; `listen`: once the inbound migration completed.
    has_control: bool,
    /// `listen`: the hand-off state and where to report completion.
    target: Option<(TargetHandoff, Events)>,
    /// A legacy completion is making the data durable; control is taken once, when it ends.
    taking_control: bool,
}

/// Main → listener: stop accepting and close every session; answered when none is left.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Control → listener: how many clients, and are new ones admitted.
#[derive(Message, Debug)]
#[rtype(result = "ListenerStatus")]
pub struct GetStatus;

/// The listener's part of the status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, MessageResponse)]
pub struct ListenerStatus {
    pub num_clients: usize,
    pub clients_allowed: bool,
    pub has_control: bool,
    /// `listen`: where the inbound hand-off is (`receiving`, `in_doubt`, `committed`).
    pub target_phase: Option<&'static str>,
}

/// Mirror → listener: close the doors for the final pass; answered once no session is left.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CloseDoors;

/// Mirror → listener: admit clients again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct OpenDoors;

/// Control → listener: put a new access control list in force.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReplaceAcl(pub Acl);

/// A new connection from the accept loop.
struct Accepted(std::io::Result<(tokio::net::TcpStream, SocketAddr)>);

impl Listener {
    pub fn new(socket: std::net::TcpListener, config: ListenerConfig) -> Listener {
        Listener {
            socket: Some(socket),
            accept: None,
            config,
            sessions: HashMap::new(),
            next_id: 1,
            next_arbiter: 0,
            empty_waiters: Vec::new(),
            shutting_down: false,
            doors_open: true,
            has_control: true,
            target: None,
            taking_control: false,
        }
    }

    /// Makes this the listener of a `listen` server: it has no control until an inbound
    /// migration completes (a legacy DISC, or our acknowledged hand-off), then it reports
    /// [`ServerEvent::MigrationReceived`] on `events`.
    pub fn migration_target(mut self, events: Events) -> Listener {
        let size = self.config.session.backing.size();
        self.target = Some((TargetHandoff::new(size), events));
        self.has_control = false;
        self
    }

    /// Takes control after an inbound migration: everything received is made durable
    /// first, then `has_control` is set and main is told.
    fn take_control(&mut self, how: &'static str, ctx: &mut Context<Self>) {
        if self.has_control || self.taking_control {
            return;
        }
        self.taking_control = true;
        let backing = self.config.session.backing.clone();
        let synced = tokio::task::spawn_blocking(move || backing.sync_data());
        ctx.spawn(synced.into_actor(self).map(move |result, act, _| {
            act.taking_control = false;
            if act.has_control {
                // An acknowledged Commit got there first.
                return;
            }
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!("Flushing the received export failed: {e}; not taking control");
                    return;
                }
                Err(e) => {
                    tracing::error!("Flushing the received export failed: {e}; not taking control");
                    return;
                }
            }
            act.has_control = true;
            tracing::info!("Migration received ({how}); this server now has control");
            if let Some((_, events)) = &act.target {
                let _ = events.send(ServerEvent::MigrationReceived);
            }
        }));
    }

    fn accept_stream(listener: tokio::net::TcpListener) -> impl Stream<Item = Accepted> {
        futures_util::stream::unfold(listener, |listener| async move {
            let result = listener.accept().await;
            if let Err(e) = &result {
                tracing::error!("accept() failed: {e}; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
            Some((Accepted(result), listener))
        })
    }

    fn admit(&mut self, stream: tokio::net::TcpStream, peer: SocketAddr, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        if !self.doors_open {
            tracing::info!("Rejecting client {peer}: a migration is in its final pass");
            return;
        }
        if let Err(e) = crate::net::configure_accepted(&stream) {
            tracing::error!("Couldn't set socket options for client {peer}: {e}; closing it");
            return;
        }
        if !self.config.acl.allows(&peer.ip()) {
            tracing::warn!("Rejecting client {peer}: Access control error");
            return;
        }
        if self.sessions.len() >= self.config.max_clients {
            tracing::warn!(
                "Rejecting client {peer}: too many clients ({} connected)",
                self.sessions.len()
            );
            return;
        }
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("Couldn't hand over the socket of client {peer}: {e}");
                return;
            }
        };
        let probe = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().ok();
        let id = self.next_id;
        self.next_id += 1;
        let arbiters = &self.config.arbiters;
        let session_config = self.config.session.clone();
        let me = ctx.address();
        let handoff = self.target.is_some().then(|| me.clone().recipient());
        let make = move |_: &mut Context<Session>| {
            let session = Session::new(id, peer, socket, session_config, me.recipient());
            match handoff {
                Some(target) => session.with_handoff_target(target),
                None => session,
            }
        };
        let addr = if arbiters.is_empty() {
            Session::create(make)
        } else {
            let arbiter = &arbiters[self.next_arbiter % arbiters.len()];
            self.next_arbiter += 1;
            Session::start_in_arbiter(arbiter, make)
        };
        tracing::info!(
            "Client {} port {} accepted (session {id}).",
            peer.ip(),
            peer.port()
        );
        self.sessions.insert(id, SessionEntry { addr, peer, probe });
    }

    fn answer_waiters_if_empty(&mut self) {
        if self.sessions.is_empty() {
            for waiter in self.empty_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let socket = self.socket.take().expect("the listener starts once");
        match tokio::net::TcpListener::from_std(socket) {
            Ok(listener) => self.accept = Some(ctx.add_stream(Self::accept_stream(listener))),
            Err(e) => {
                crate::fatal!("Couldn't register the listening socket: {e}");
                System::current().stop_with_code(1);
            }
        }
    }
}

impl StreamHandler<Accepted> for Listener {
    fn handle(&mut self, item: Accepted, ctx: &mut Self::Context) {
        if let Accepted(Ok((stream, peer))) = item {
            self.admit(stream, peer, ctx);
        }
    }

    /// The accept stream never ends by itself; it is cancelled at shutdown, which must not
    /// stop the listener while sessions are still closing.
    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

impl Handler<SessionEnded> for Listener {
    type Result = ();

    fn handle(&mut self, msg: SessionEnded, ctx: &mut Self::Context) {
        if let Some(entry) = self.sessions.remove(&msg.id) {
            tracing::info!("Client {} disconnected (session {}).", entry.peer, msg.id);
        }
        // flexnbd's hand-off: any client that ends its connection with a DISC completes
        // an inbound migration (never a bad magic, which does not set the flag).
        if msg.disconnect_seen && self.target.is_some() {
            self.take_control("the source disconnected", ctx);
        }
        self.answer_waiters_if_empty();
    }
}

impl Handler<Shutdown> for Listener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        if !self.shutting_down {
            self.shutting_down = true;
            if let Some(accept) = self.accept.take() {
                ctx.cancel_future(accept);
            }
            tracing::info!("Closing {} client(s) for shutdown", self.sessions.len());
            for entry in self.sessions.values() {
                entry.addr.do_send(Close(CloseReason::Shutdown));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.empty_waiters.push(tx);
        self.answer_waiters_if_empty();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<GetStatus> for Listener {
    type Result = ListenerStatus;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Self::Context) -> ListenerStatus {
        ListenerStatus {
            num_clients: self.sessions.values().filter(|s| s.peer_alive()).count(),
            clients_allowed: !self.shutting_down && self.doors_open,
            has_control: self.has_control,
            target_phase: self.target.as_ref().map(|(t, _)| t.phase().name()),
        }
    }
}

impl Handler<ReplaceAcl> for Listener {
    type Result = ();

    fn handle(&mut self, msg: ReplaceAcl, _ctx: &mut Self::Context) {
        self.config.acl = msg.0;
        for (id, entry) in &self.sessions {
            if !self.config.acl.allows(&entry.peer.ip()) {
                tracing::warn!(
                    "Client {} (session {id}) is no longer allowed by the access control list; disconnecting it",
                    entry.peer
                );
                entry.addr.do_send(Close(CloseReason::AclChanged));
            }
        }
    }
}

impl Handler<CloseDoors> for Listener {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: CloseDoors, _ctx: &mut Self::Context) -> Self::Result {
        self.doors_open = false;
        tracing::info!(
            "Final pass: closing {} client(s) and refusing new ones",
            self.sessions.len()
        );
        for entry in self.sessions.values() {
            entry.addr.do_send(Close(CloseReason::Migration));
        }
        let (tx, rx) = oneshot::channel();
        self.empty_waiters.push(tx);
        self.answer_waiters_if_empty();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<OpenDoors> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: OpenDoors, _ctx: &mut Self::Context) {
        if !self.doors_open {
            tracing::info!("Admitting clients again");
        }
        self.doors_open = true;
    }
}

impl Handler<HandoffMessage> for Listener {
    type Result = ResponseActFuture<Self, HandoffReply>;

    fn handle(&mut self, msg: HandoffMessage, _ctx: &mut Self::Context) -> Self::Result {
        let Some((target, _)) = &mut self.target else {
            let refused = HandoffReply::Refused {
                reason: "this server is not a migration target".into(),
            };
            return Box::pin(actix::fut::ready(refused));
        };
        let (reply, effect) = target.on_request(&msg.0);
        tracing::info!("Hand-off: {:?} → {reply:?}", msg.0);
        match effect {
            TargetEffect::None => Box::pin(actix::fut::ready(reply)),
            TargetEffect::SyncFirst => {
                let backing = self.config.session.backing.clone();
                let synced = tokio::task::spawn_blocking(move || backing.sync_data());
                Box::pin(
                    synced
                        .into_actor(self)
                        .map(move |result, _, _| match result {
                            Ok(Ok(())) => reply,
                            Ok(Err(e)) => HandoffReply::Refused {
                                reason: format!("making the data durable failed: {e}"),
                            },
                            Err(e) => HandoffReply::Refused {
                                reason: format!("making the data durable failed: {e}"),
                            },
                        }),
                )
            }
            TargetEffect::TakeControl if self.has_control => Box::pin(actix::fut::ready(reply)),
            TargetEffect::TakeControl => {
                // Prepare already made everything durable; nothing was written since (the
                // source sends nothing between Prepared and Commit).
                self.has_control = true;
                tracing::info!(
                    "Migration received (acknowledged hand-off); this server now has control"
                );
                if let Some((_, events)) = &self.target {
                    let _ = events.send(ServerEvent::MigrationReceived);
                }
                Box::pin(actix::fut::ready(reply))
            }
        }
    }
}
