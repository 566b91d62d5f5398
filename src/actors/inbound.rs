//! The inbound-migration actor of a `listen` server: the one owner of "who may write" on a
//! destination, and of the hand-off ([`TargetHandoff`], whose module docs give the rule).
//!
//! Sessions never ask it before a write: it publishes the one connection allowed to write
//! in a [`WriteGate`] that every session of a `listen` server checks around each file
//! mutation (two atomics, no lock). When it takes the right away from a connection (a newer
//! attempt joined, Prepare, shutdown) it waits until no write is in flight before it
//! answers, so a write that was refused the right is never applied afterwards.
//!
//! # Handshakes
//! - [`Admit`] (listener → inbound, for each accepted connection of a `listen` server):
//!   answered at once with whether to start a session; a refused connection is closed
//!   without a hello. An admitted connection that has not joined a migration of ours
//!   within [`JOIN_LIMIT`] (while one is being received) is closed.
//! - [`SessionGone`] (listener → inbound): a session ended; may complete a legacy
//!   migration (the legacy client's DISC). No answer.
//! - [`HandoffMessage`] (session → inbound): a hand-off request; answered after its effect
//!   (fencing, `fdatasync`, taking control). If the inbound actor is gone the session
//!   answers Refused.
//! - [`CloseClient`] (inbound → listener): close a fenced connection.
//! - [`GetTargetStatus`] (control → inbound): `has_control`, the hand-off phase, the
//!   current attempt; answered at once.
//! - [`StopInbound`] (main → inbound, on a signal): refuse everything from now on; answer
//!   whether control was taken (after a legacy completion still syncing has ended). The
//!   exit status depends on it, so a Commit and a signal racing each other cannot end in
//!   an exit status that contradicts the answer the source got.
//! - [`ServerEvent::MigrationReceived`] (inbound → main): control was taken.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::protocol::handoff::target::{Admission, TargetEffect, TargetHandoff, Writer};
use crate::protocol::handoff::{HandoffReply, HandoffRequest};
use crate::storage::Backing;

use super::listener::{CloseClient, Listener};
use super::{ClientId, Events, ServerEvent};

/// An admitted connection must join a migration of ours within this, while one is being
/// received (our sources join right after the hello).
pub const JOIN_LIMIT: Duration = Duration::from_secs(5);
/// How often a fence checks whether the revoked writes have finished.
const QUIESCE_POLL: Duration = Duration::from_millis(1);

/// The write permission of a `listen` server's sessions. See the module docs.
#[derive(Debug, Default)]
pub struct WriteGate {
    /// The connection allowed to write: [`WriteGate::NOBODY`], [`WriteGate::EVERYONE`] or a
    /// [`ClientId`] (which starts at 1 and never reaches `u64::MAX`).
    writer: AtomicU64,
    /// Writes between [`WriteRight::enter`] and the end of their file operation.
    in_flight: AtomicU64,
}

impl WriteGate {
    const NOBODY: u64 = 0;
    const EVERYONE: u64 = u64::MAX;

    pub fn new() -> WriteGate {
        WriteGate::default()
    }

    fn publish(&self, writer: Writer) {
        let value = match writer {
            Writer::Nobody => Self::NOBODY,
            Writer::Only(conn) => conn,
            Writer::Everyone => Self::EVERYONE,
        };
        self.writer.store(value, Ordering::SeqCst);
    }

    /// True once no write that entered before now is still running.
    fn quiet(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// A session's right to write through a gate (`None`: no gate, always allowed).
#[derive(Clone, Debug)]
pub struct WriteRight {
    gate: Option<Arc<WriteGate>>,
    conn: ClientId,
}

/// Held for the duration of one file mutation.
pub struct WriteTicket<'a>(Option<&'a WriteGate>);

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        if let Some(gate) = self.0 {
            gate.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl WriteRight {
    pub fn new(gate: Option<Arc<WriteGate>>, conn: ClientId) -> WriteRight {
        WriteRight { gate, conn }
    }

    /// Asks to mutate the file now; `None` means the write must fail (EPERM) and not be
    /// applied. The in-flight count is raised before the permission is read, and the
    /// fence publishes before it reads the count (both sequentially consistent): either
    /// this write sees the revocation, or the fence sees this write and waits for it.
    pub fn enter(&self) -> Option<WriteTicket<'_>> {
        let Some(gate) = self.gate.as_deref() else {
            return Some(WriteTicket(None));
        };
        gate.in_flight.fetch_add(1, Ordering::SeqCst);
        let writer = gate.writer.load(Ordering::SeqCst);
        if writer == WriteGate::EVERYONE || writer == self.conn {
            Some(WriteTicket(Some(gate)))
        } else {
            gate.in_flight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }
}

/// Listener → inbound: may this new connection start a session?
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct Admit(pub ClientId);

/// Listener → inbound: a session has ended.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SessionGone {
    pub id: ClientId,
    pub disconnect_seen: bool,
}

/// Session → inbound: a hand-off request from connection `conn`.
#[derive(Message, Debug)]
#[rtype(result = "HandoffReply")]
pub struct HandoffMessage {
    pub conn: ClientId,
    pub request: HandoffRequest,
}

/// Control → inbound.
#[derive(Message, Debug)]
#[rtype(result = "TargetStatus")]
pub struct GetTargetStatus;

/// The destination's part of the status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, MessageResponse)]
pub struct TargetStatus {
    pub has_control: bool,
    pub phase: &'static str,
    pub attempt: u64,
}

/// Main → inbound, on a signal. Answers whether control was taken.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct StopInbound;

/// Main → inbound: where fenced connections are closed (sent once, after both started).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachListener(pub Addr<Listener>);

pub struct Inbound {
    machine: TargetHandoff,
    gate: Arc<WriteGate>,
    backing: Arc<Backing>,
    events: Events,
    listener: Option<Addr<Listener>>,
    /// [`StopInbound`] requests waiting for a legacy completion's sync.
    stop_waiters: Vec<oneshot::Sender<bool>>,
}

impl Inbound {
    pub fn new(backing: Arc<Backing>, events: Events) -> Inbound {
        Inbound {
            machine: TargetHandoff::new(backing.size()),
            gate: Arc::new(WriteGate::new()),
            backing,
            events,
            listener: None,
            stop_waiters: Vec::new(),
        }
    }

    /// The gate the sessions of this server check.
    pub fn gate(&self) -> Arc<WriteGate> {
        self.gate.clone()
    }

    /// Publishes the machine's writer. Returns the gate to wait on (with [`quiesce`]) when
    /// a connection lost the right to write.
    fn publish(&self, before: Writer) -> Option<Arc<WriteGate>> {
        let after = self.machine.writer();
        self.gate.publish(after);
        (before != after && before != Writer::Nobody).then(|| self.gate.clone())
    }

    fn close(&self, conn: ClientId) {
        if let Some(listener) = &self.listener {
            listener.do_send(CloseClient(conn));
        }
    }

    fn control_taken(&self, how: &str) {
        tracing::info!("Migration received ({how}); this server now has control");
        let _ = self.events.send(ServerEvent::MigrationReceived);
    }

    fn answer_stop_waiters(&mut self) {
        let has_control = self.machine.has_control();
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(has_control);
        }
    }
}

/// Ends once every write that entered `gate` before now has finished (at once for `None`).
async fn quiesce(gate: Option<Arc<WriteGate>>) {
    let Some(gate) = gate else {
        return;
    };
    let mut waited = Duration::ZERO;
    while !gate.quiet() {
        tokio::time::sleep(QUIESCE_POLL).await;
        waited += QUIESCE_POLL;
        if waited == Duration::from_secs(10) {
            tracing::warn!("Still waiting for fenced writes to finish after 10 s");
        }
    }
}

impl Actor for Inbound {
    type Context = Context<Self>;
}

impl Handler<AttachListener> for Inbound {
    type Result = ();

    fn handle(&mut self, msg: AttachListener, _ctx: &mut Self::Context) {
        self.listener = Some(msg.0);
    }
}

impl Handler<Admit> for Inbound {
    type Result = bool;

    fn handle(&mut self, msg: Admit, ctx: &mut Self::Context) -> bool {
        let before = self.machine.writer();
        let admitted = match self.machine.admit(msg.0) {
            Admission::Admit => true,
            Admission::Refuse(why) => {
                tracing::warn!("Refusing a connection: {why}");
                false
            }
        };
        // Admitting in the legacy phase makes the client the writer; nobody loses a right.
        self.publish(before);
        if self.machine.is_candidate(msg.0) {
            let conn = msg.0;
            ctx.run_later(JOIN_LIMIT, move |act, _| {
                if act.machine.is_candidate(conn) {
                    tracing::warn!(
                        "Session {conn} did not join the migration within {JOIN_LIMIT:?}; closing it"
                    );
                    act.close(conn);
                }
            });
        }
        admitted
    }
}

impl Handler<SessionGone> for Inbound {
    type Result = ();

    fn handle(&mut self, msg: SessionGone, ctx: &mut Self::Context) {
        let before = self.machine.writer();
        let completes = self.machine.on_session_ended(msg.id, msg.disconnect_seen);
        let quiesced = quiesce(self.publish(before));
        if !completes {
            return;
        }
        // flexnbd's hand-off: the legacy client's DISC completes the migration, once
        // everything it wrote is durable.
        let backing = self.backing.clone();
        let synced = async move {
            quiesced.await;
            tokio::task::spawn_blocking(move || backing.sync_data()).await
        };
        ctx.spawn(synced.into_actor(self).map(|result, act, _| {
            let ok = match result {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::error!("Flushing the received export failed: {e}; not taking control");
                    false
                }
                Err(e) => {
                    tracing::error!("Flushing the received export failed: {e}; not taking control");
                    false
                }
            };
            let before = act.machine.writer();
            act.machine.legacy_synced(ok);
            act.publish(before);
            if act.machine.has_control() {
                act.control_taken("the source disconnected");
            }
            act.answer_stop_waiters();
        }));
    }
}

impl Handler<HandoffMessage> for Inbound {
    type Result = ResponseActFuture<Self, HandoffReply>;

    fn handle(&mut self, msg: HandoffMessage, _ctx: &mut Self::Context) -> Self::Result {
        let before = self.machine.writer();
        let (reply, effect) = self.machine.on_request(msg.conn, &msg.request);
        tracing::info!(
            "Hand-off from session {}: {:?} → {reply:?}",
            msg.conn,
            msg.request
        );
        let quiesced = quiesce(self.publish(before));
        match effect {
            TargetEffect::None => {}
            TargetEffect::Close(conn) => self.close(conn),
            TargetEffect::TakeControl => {
                // Prepare made everything durable and nothing was written since (nobody
                // may write while prepared).
                self.control_taken("acknowledged hand-off");
            }
            TargetEffect::SyncFirst => {
                let backing = self.backing.clone();
                let synced = async move {
                    quiesced.await;
                    tokio::task::spawn_blocking(move || backing.sync_data()).await
                };
                return Box::pin(synced.into_actor(self).map(move |result, act, _| {
                    let failure = match result {
                        Ok(Ok(())) => return reply,
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!("Making the received data durable failed: {failure}");
                    let before = act.machine.writer();
                    act.machine.sync_failed();
                    act.publish(before);
                    HandoffReply::Refused {
                        reason: format!("making the data durable failed: {failure}"),
                    }
                }));
            }
        }
        Box::pin(quiesced.into_actor(self).map(move |(), _, _| reply))
    }
}

impl Handler<GetTargetStatus> for Inbound {
    type Result = TargetStatus;

    fn handle(&mut self, _msg: GetTargetStatus, _ctx: &mut Self::Context) -> TargetStatus {
        TargetStatus {
            has_control: self.machine.has_control(),
            phase: self.machine.phase().name(),
            attempt: self.machine.attempt(),
        }
    }
}

impl Handler<StopInbound> for Inbound {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _msg: StopInbound, _ctx: &mut Self::Context) -> Self::Result {
        let before = self.machine.writer();
        let has_control = self.machine.stop();
        self.publish(before);
        if !self.machine.is_committing() {
            return Box::pin(async move { has_control });
        }
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_only_the_published_writer_and_counts_writes() {
        let gate = Arc::new(WriteGate::new());
        let one = WriteRight::new(Some(gate.clone()), 1);
        let two = WriteRight::new(Some(gate.clone()), 2);
        assert!(one.enter().is_none(), "nobody may write at first");
        gate.publish(Writer::Only(1));
        let ticket = one.enter().expect("the writer may write");
        assert!(two.enter().is_none());
        assert!(!gate.quiet(), "a write is in flight");
        drop(ticket);
        assert!(gate.quiet());
        gate.publish(Writer::Everyone);
        assert!(two.enter().is_some());
        assert!(WriteRight::new(None, 7).enter().is_some(), "no gate");
    }
}
