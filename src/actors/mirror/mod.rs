//! The mirror: one outbound migration (flexnbd §10, design notes §1 and §4).
//!
//! A migration runs in attempts. Each attempt connects to the destination (old-style or
//! fixed new-style), identifies itself to one of our destinations (`Join`, with the
//! migration id and a number that grows with every connection), sweeps the whole export —
//! holes as zero-range requests where the destination takes them, data as WRITEs — then
//! sends the blocks that clients dirtied meanwhile, pass after pass, until the estimated
//! time left is under 5 s. Then the final pass: the listener closes the doors and waits
//! until every session has ended (a message handshake, no I/O lock), the last dirty blocks
//! go out, and the hand-off follows: acknowledged between two of our servers, flexnbd's
//! bare DISC otherwise.
//!
//! Whether this server may serve is decided in one place, the actor's [`SourceHandoff`]
//! (its module docs give the rule): the task asks it before every step that moves
//! authority, and `break` asks it too. A failure before a Commit may be on the wire
//! reopens the doors and retries from scratch a second later; after that, the source keeps
//! its doors closed and reconnects to resend Commit until the destination answers
//! Committed (done) or NotPrepared (proof: serve again and retry), or an operator forces it.
//!
//! # Handshakes
//! - [`SetMaxBps`] (control → mirror): new bandwidth limit; answered at once.
//! - [`Abandon`] (control → mirror, `break` or a signal): asks the hand-off state machine;
//!   answered at once when it refuses (in doubt, or the source file is gone), otherwise
//!   once the migration has stopped (doors reopened where this side is authoritative).
//! - [`Step`] (the migration's task → mirror): an event of the hand-off; answered at once
//!   with what to do next. The task asks before the first byte of a Commit is written.
//! - [`MirrorEnded`] (mirror → control): the migration ended by itself (first attempt
//!   failed, completed, or failed fatally); control ends the registration as flexnbd §6.4
//!   requires.
//! - [`CloseDoors`](super::listener::CloseDoors) / [`OpenDoors`](super::listener::OpenDoors)
//!   (mirror → listener): see the listener.
//! - [`ServerEvent`] (mirror → main): `MigrationSent` after a completed `exit`/`unlink`
//!   hand-off, `MigrationFatal` when this server can no longer serve its copy.
//!
//! # Layout
//! - this module: the actor, its messages, and how a migration ends ([`Outcome`]);
//! - [`stats`]: [`Phase`] and [`MirrorStats`], the `status` keys;
//! - `run`: the migration's task (attempts, sweep, passes, final pass, hand-off, resending
//!   Commit, pacing), which talks to the destination through `crate::client`;
//! - [`policy`]: the task's decisions as pure functions (convergence, catch-up passes,
//!   when the doors close, inactivity limits).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::protocol::control::{CopyMode, MirrorAction, MirrorRequest};
use crate::protocol::handoff::source::{BreakDecision, Next, SourceHandoff};
use crate::protocol::handoff::MigrationId;
use crate::rate;
use crate::storage::Backing;
use crate::tls::ClientTls;

use super::listener::Listener;
use super::{Events, ServerEvent};

pub mod policy;
mod run;
pub mod stats;

use run::Run;
pub use stats::{MirrorStats, Phase};

/// Forwarded writes queued for the migration's task at most (active mode). A session whose
/// forward finds the queue full waits (and with it, its client): this bounds the requests,
/// not the memory, which forwards do not hold (the task reads the data from the file).
const FORWARD_QUEUE: usize = 256;

/// Why the first attempt failed, with flexnbd's exact response texts (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstFailure {
    Connect,
    Rejected,
    NoHello,
    SizeMismatch,
    Abandoned,
    /// Ours: the destination is this very server.
    ThisServer,
    /// Ours: the destination serves this server's file.
    ThisFile,
}

impl FirstFailure {
    pub fn text(self) -> &'static str {
        match self {
            FirstFailure::Connect => "Mirror failed to connect",
            FirstFailure::Rejected => "Mirror was rejected",
            FirstFailure::NoHello => "Remote server failed to respond",
            FirstFailure::SizeMismatch => "Remote size does not match local size",
            FirstFailure::Abandoned => "Mirroring abandoned",
            FirstFailure::ThisServer => "Mirror was rejected: the destination is this server",
            FirstFailure::ThisFile => {
                "Mirror was rejected: the destination serves this server's own file"
            }
        }
    }
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    FirstAttemptFailed(FirstFailure),
    Abandoned,
    Completed(MirrorAction),
    /// This server can no longer serve its copy (the source file could not be removed,
    /// or was removed and the destination did not take control, or a legacy DISC could not
    /// be written).
    Fatal(String),
}

/// Control → mirror: a new bandwidth limit (bytes per second; `u64::MAX`: none).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetMaxBps(pub u64);

/// Control → mirror: stop (`break`, or a signal). See the module docs.
#[derive(Message, Debug, Clone, Copy, PartialEq, Eq)]
#[rtype(result = "AbandonAnswer")]
pub enum Abandon {
    /// `break`; `force_source` with `break --force-source`.
    Break { force_source: bool },
    /// A signal: the process exits whatever the phase.
    Signal,
}

/// The answer to [`Abandon`].
#[derive(Clone, Debug, PartialEq, Eq, MessageResponse)]
pub enum AbandonAnswer {
    /// The migration has stopped; this side serves again where it is authoritative.
    Stopped,
    /// Nothing changed; the text says why.
    Refused(String),
    /// The migration had completed.
    Completed,
}

/// The migration's task → mirror: a step of the hand-off (see [`SourceHandoff`]).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
#[rtype(result = "Next")]
enum Step {
    CloseDoors,
    Prepared,
    Unlinking,
    UnlinkFailed,
    /// Asked before the first byte of a Commit or a legacy DISC goes to the socket.
    CommitStarting,
    Committed,
    NotPrepared,
    Failed(String),
    FinishedWithoutHandoff,
}

/// Mirror → control: the migration ended by itself.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct MirrorEnded {
    /// Which migration: a late report of an earlier one must not end the registration of
    /// a newer one.
    pub id: MigrationId,
    pub outcome: Outcome,
}

/// Everything one migration needs.
pub struct MirrorConfig {
    pub request: MirrorRequest,
    pub id: MigrationId,
    pub backing: Arc<Backing>,
    pub listener: Addr<Listener>,
    pub events: Option<Events>,
    pub owner: Recipient<MirrorEnded>,
    /// TLS to the destination, loaded from what `request.tls` names (by the control actor,
    /// which answers a bad file before any migration starts).
    pub tls: Option<Arc<ClientTls>>,
}

pub struct Mirror {
    config: Option<MirrorConfig>,
    stats: Arc<MirrorStats>,
    /// Whether this side may serve: the one place it is decided.
    handoff: SourceHandoff,
    cancel: CancellationToken,
    first: Option<oneshot::Sender<Result<(), FirstFailure>>>,
    outcome: Option<Outcome>,
    /// Abandon requests waiting for the migration to stop.
    waiters: Vec<oneshot::Sender<AbandonAnswer>>,
}

impl Mirror {
    /// `first` receives the result of the first connection attempt (flexnbd's `mirror`
    /// command answers only then).
    pub fn new(config: MirrorConfig, first: oneshot::Sender<Result<(), FirstFailure>>) -> Mirror {
        let stats = Arc::new(MirrorStats::new(
            config.backing.size(),
            config.request.max_bps,
        ));
        Mirror {
            config: Some(config),
            stats,
            handoff: SourceHandoff::new(),
            cancel: CancellationToken::new(),
            first: Some(first),
            outcome: None,
            waiters: Vec::new(),
        }
    }

    pub fn stats(&self) -> Arc<MirrorStats> {
        self.stats.clone()
    }

    fn stop_after(&mut self) -> ResponseFuture<AbandonAnswer> {
        self.cancel.cancel();
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        Box::pin(async move { rx.await.unwrap_or(AbandonAnswer::Stopped) })
    }
}

impl Actor for Mirror {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(config) = self.config.take() else {
            return;
        };
        let owner = config.owner.clone();
        let events = config.events.clone();
        let id = config.id;
        // Sessions reach the migration through the export's dirty map: in active mode
        // their writes to copied ranges come here (see `storage::dirty`).
        let (forward_tx, forwards) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
        let backing = config.backing.clone();
        backing.dirty().set_forwarder(Some(forward_tx));
        let mode = config.request.mode;
        if mode == CopyMode::Active {
            self.stats.set_active();
        }
        let run = Run {
            stats: self.stats.clone(),
            cancel: self.cancel.clone(),
            first: self.first.take(),
            bulk_limit: policy::bulk_limit(
                std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
                    .ok()
                    .as_deref(),
            ),
            mirror: ctx.address(),
            bucket: Mutex::new(rate::TokenBucket::new(Instant::now())),
            zeroes_as_requests: false,
            forwards: tokio::sync::Mutex::new(forwards),
            auto: Mutex::new((mode == CopyMode::Auto).then(policy::AutoSwitch::new)),
            config,
        };
        let task = actix_rt::spawn(run.run());
        ctx.spawn(task.into_actor(self).map(move |result, act, ctx| {
            backing.dirty().set_forwarder(None);
            let outcome =
                result.unwrap_or_else(|e| Outcome::Fatal(format!("the mirror failed: {e}")));
            tracing::info!("Migration ended: {outcome:?}");
            match &outcome {
                Outcome::Completed(MirrorAction::Exit | MirrorAction::Unlink) => {
                    if let Some(events) = &events {
                        let _ = events.send(ServerEvent::MigrationSent);
                    }
                }
                Outcome::Fatal(why) => {
                    if let Some(events) = &events {
                        let _ = events.send(ServerEvent::MigrationFatal(why.clone()));
                    }
                }
                _ => {}
            }
            let answer = match outcome {
                Outcome::Completed(_) => AbandonAnswer::Completed,
                _ => AbandonAnswer::Stopped,
            };
            for waiter in act.waiters.drain(..) {
                let _ = waiter.send(answer.clone());
            }
            owner.do_send(MirrorEnded {
                id,
                outcome: outcome.clone(),
            });
            act.outcome = Some(outcome);
            ctx.stop();
        }));
    }
}

impl Handler<SetMaxBps> for Mirror {
    type Result = ();

    fn handle(&mut self, msg: SetMaxBps, _ctx: &mut Self::Context) {
        self.stats.max_bps.store(msg.0, Ordering::Relaxed);
    }
}

impl Handler<Abandon> for Mirror {
    type Result = ResponseFuture<AbandonAnswer>;

    fn handle(&mut self, msg: Abandon, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(outcome) = &self.outcome {
            let answer = match outcome {
                Outcome::Completed(_) => AbandonAnswer::Completed,
                _ => AbandonAnswer::Stopped,
            };
            return Box::pin(async move { answer });
        }
        let answer = match msg {
            Abandon::Signal => {
                self.handoff.on_signal();
                None
            }
            Abandon::Break { force_source } => match self.handoff.on_break(force_source) {
                BreakDecision::Stop { .. } => {
                    if force_source {
                        tracing::warn!(
                            "break --force-source: this source is authoritative again by the operator's decision"
                        );
                    }
                    None
                }
                BreakDecision::Refuse(why) => {
                    tracing::warn!("Refusing break: {why}");
                    Some(AbandonAnswer::Refused(why))
                }
                BreakDecision::AlreadyHandedOff => Some(AbandonAnswer::Completed),
            },
        };
        self.stats.publish_handoff(&self.handoff);
        match answer {
            Some(answer) => Box::pin(async move { answer }),
            None => self.stop_after(),
        }
    }
}

impl Handler<Step> for Mirror {
    type Result = MessageResult<Step>;

    fn handle(&mut self, msg: Step, _ctx: &mut Self::Context) -> Self::Result {
        let h = &mut self.handoff;
        let next = match &msg {
            Step::CloseDoors => h.close_doors(),
            Step::Prepared => h.prepared(),
            Step::Unlinking => h.unlinking(),
            Step::UnlinkFailed => {
                h.unlink_failed();
                Next::Proceed
            }
            Step::CommitStarting => h.commit_starting(),
            Step::Committed => h.committed(),
            Step::NotPrepared => h.not_prepared(),
            Step::Failed(why) => {
                self.stats.record_failure(why);
                h.failed()
            }
            Step::FinishedWithoutHandoff => h.finished_without_handoff(),
        };
        tracing::debug!(
            "Hand-off step {msg:?} → {next:?} (now {:?})",
            self.handoff.phase()
        );
        self.stats.publish_handoff(&self.handoff);
        MessageResult(next)
    }
}
