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
//! - [`CloseClient`] (inbound → listener of a `listen` server): close one session (a
//!   fenced attempt of a migration, or a connection that did not join in time).
//! - A `listen` server's listener asks the inbound-migration actor whether to admit each
//!   connection ([`Admit`]) instead of applying the client limit, and tells it when a
//!   session ended ([`SessionGone`]); the inbound actor owns "who may write".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::Stream;
use tokio::sync::oneshot;

use crate::acl::Acl;

use super::inbound::{Admit, Inbound, SessionGone};
use super::session::{Close, CloseReason, Session, SessionConfig, SessionEnded};
use super::ClientId;

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
    /// `listen`: the inbound-migration actor, which decides admissions and owns the
    /// hand-off.
    inbound: Option<Addr<Inbound>>,
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
}

/// Mirror → listener: close the doors for the final pass; answered once no session is left.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CloseDoors;

/// Mirror → listener: admit clients again.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct OpenDoors;

/// Inbound → listener: close this session (it was fenced, or did not join in time).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct CloseClient(pub ClientId);

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
            inbound: None,
        }
    }

    /// Makes this the listener of a `listen` server: `inbound` decides which connections
    /// are admitted and owns the hand-off (the sessions' config must carry its gate).
    pub fn migration_target(mut self, inbound: Addr<Inbound>) -> Listener {
        self.inbound = Some(inbound);
        self
    }

    fn accept_stream(listener: tokio::net::TcpListener) -> impl Stream<Item = Accepted> {
        futures_util::stream::unfold(listener, |listener| async move {
            let result = listener.accept().await;
            if let Err(e) = &result {
                crate::throttled!(error, "accept() failed: {e}; retrying");
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
            crate::throttled!(warn, "Rejecting client {peer}: Access control error");
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let Some(inbound) = self.inbound.clone() else {
            if self.sessions.len() >= self.config.max_clients {
                crate::throttled!(
                    warn,
                    "Rejecting client {peer}: too many clients ({} connected)",
                    self.sessions.len()
                );
                return;
            }
            self.start_session(id, stream, peer, ctx);
            return;
        };
        // A migration target: the inbound actor decides (one legacy client, or the
        // current attempt and a few candidates). The stream waits for the answer.
        ctx.spawn(
            inbound.send(Admit(id)).into_actor(self).map(
                move |admitted, act, ctx| match admitted {
                    Ok(true) if !act.shutting_down && act.doors_open => {
                        act.start_session(id, stream, peer, ctx)
                    }
                    Ok(true) => {
                        tracing::info!("Rejecting client {peer}: the server is closing");
                        // The inbound actor counted it: tell it the session is gone.
                        if let Some(inbound) = &act.inbound {
                            inbound.do_send(SessionGone {
                                id,
                                disconnect_seen: false,
                            });
                        }
                    }
                    _ => tracing::warn!(
                        "Rejecting client {peer}: not admitted while receiving a migration"
                    ),
                },
            ),
        );
    }

    fn start_session(
        &mut self,
        id: ClientId,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        ctx: &mut Context<Self>,
    ) {
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("Couldn't hand over the socket of client {peer}: {e}");
                if let Some(inbound) = &self.inbound {
                    inbound.do_send(SessionGone {
                        id,
                        disconnect_seen: false,
                    });
                }
                return;
            }
        };
        let probe = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().ok();
        let arbiters = &self.config.arbiters;
        let session_config = self.config.session.clone();
        let me = ctx.address();
        let handoff = self.inbound.clone().map(|inbound| inbound.recipient());
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

    /// Asks every session to close (the one path of shutdown and of a migration's final
    /// pass); [`Listener::when_empty`] tells when they all have.
    fn close_everyone(&self, reason: CloseReason) {
        for entry in self.sessions.values() {
            entry.addr.do_send(Close(reason));
        }
    }

    /// Answers once the registry is empty (at once if it is).
    fn when_empty(&mut self) -> ResponseFuture<()> {
        let (tx, rx) = oneshot::channel();
        self.empty_waiters.push(tx);
        self.answer_waiters_if_empty();
        Box::pin(async move {
            let _ = rx.await;
        })
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

    fn handle(&mut self, msg: SessionEnded, _ctx: &mut Self::Context) {
        if let Some(entry) = self.sessions.remove(&msg.id) {
            tracing::info!("Client {} disconnected (session {}).", entry.peer, msg.id);
        }
        // The inbound actor decides whether this completes a legacy migration (a DISC
        // from the legacy client; never a bad magic, which does not set the flag).
        if let Some(inbound) = &self.inbound {
            inbound.do_send(SessionGone {
                id: msg.id,
                disconnect_seen: msg.disconnect_seen,
            });
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
            self.close_everyone(CloseReason::Shutdown);
        }
        self.when_empty()
    }
}

impl Handler<GetStatus> for Listener {
    type Result = ListenerStatus;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Self::Context) -> ListenerStatus {
        ListenerStatus {
            num_clients: self.sessions.values().filter(|s| s.peer_alive()).count(),
            clients_allowed: !self.shutting_down && self.doors_open,
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
        self.close_everyone(CloseReason::Migration);
        self.when_empty()
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

impl Handler<CloseClient> for Listener {
    type Result = ();

    fn handle(&mut self, msg: CloseClient, _ctx: &mut Self::Context) {
        if let Some(entry) = self.sessions.get(&msg.0) {
            tracing::warn!(
                "Closing client {} (session {}): it no longer carries the migration",
                entry.peer,
                msg.0
            );
            entry.addr.do_send(Close(CloseReason::Fenced));
        }
    }
}
