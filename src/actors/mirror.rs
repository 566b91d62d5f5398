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
//! - [`CloseDoors`] / [`OpenDoors`] (mirror → listener): see the listener.
//! - [`ServerEvent`] (mirror → main): `MigrationSent` after a completed `exit`/`unlink`
//!   hand-off, `MigrationFatal` when this server can no longer serve its copy.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::protocol::client::{self, Greeting};
use crate::protocol::control::{MigrationStatus, MirrorAction, MirrorRequest};
use crate::protocol::handoff::source::{BreakDecision, Next, SourceHandoff};
use crate::protocol::handoff::{
    answer_length, HandoffReply, HandoffRequest, Identity, JoinPurpose, MigrationId, SameAs,
    HANDOFF, IDENTIFY, PROBE,
};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::reply::decode_simple_reply;
use crate::protocol::request::HeaderStyle;
use crate::protocol::{tflags, Command, Errno, Request, OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};
use crate::rate;
use crate::storage::Backing;

use super::listener::{CloseDoors, Listener, OpenDoors};
use super::{Events, ServerEvent};

/// TCP connect timeout (flexnbd §10.10).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole hello (or new-style negotiation) must arrive within this (flexnbd §10.2).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Inactivity limit of the bulk copy (sweep and passes, doors open): flexnbd's per-transfer
/// limit. `FLEXNBD_MS_REQUEST_LIMIT_SECS` overrides it, as in C.
const BULK_LIMIT: Duration = Duration::from_secs(60);
/// Inactivity limit once the doors are closed (final pass, Prepare, Commit): every second
/// is an outage for every client, so a stuck destination is given up quickly and the doors
/// reopen. A dead link is usually noticed sooner, by TCP (see [`LINK_TIMEOUT`]).
const HANDOFF_LIMIT: Duration = Duration::from_secs(5);
/// A Prepare makes the final pass durable on the destination (`fdatasync`): it may take
/// longer than a request.
const PREPARE_LIMIT: Duration = Duration::from_secs(10);
/// TCP_USER_TIMEOUT of the migration socket, and the keepalive that makes a silent peer
/// count as gone: a link that blackholes is detected in about this long in every phase.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 3;
/// Pause between attempts.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// The final pass starts once the estimated time left is below this.
const CONVERGE: Duration = Duration::from_secs(5);
/// Dirty runs shorter than this are read in batches, without an extent lookup.
const SMALL_RUN: u64 = 1 << 20;
/// Catch-up passes at most between convergence and the final pass.
const CATCH_UP_PASSES: usize = 4;
/// Largest WRITE the mirror sends, and requests in flight on the outbound connection.
const WRITE_SIZE: usize = 4 << 20;
const IN_FLIGHT: usize = 8;
/// Largest zero-range request (WRITE_ZEROES) the mirror sends.
const ZERO_SIZE: u64 = 256 << 20;
/// The sweep asks the filesystem for extents this much at a time.
const SWEEP_CHUNK: u64 = 64 << 20;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// What can happen to a migration, as its phase in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Sweep = 1,
    Copying = 2,
    FinalPass = 3,
    HandingOff = 4,
    /// A Commit may be on the wire and no answer came: the source never serves again on
    /// its own; it reconnects and resends Commit.
    InDoubt = 5,
    Completed = 6,
    Retrying = 7,
    Abandoned = 8,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            1 => Phase::Sweep,
            2 => Phase::Copying,
            3 => Phase::FinalPass,
            4 => Phase::HandingOff,
            5 => Phase::InDoubt,
            6 => Phase::Completed,
            7 => Phase::Retrying,
            8 => Phase::Abandoned,
            _ => Phase::Connecting,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Sweep => "sweep",
            Phase::Copying => "copying",
            Phase::FinalPass => "final_pass",
            Phase::HandingOff => "handing_off",
            Phase::InDoubt => "in_doubt",
            Phase::Completed => "completed",
            Phase::Retrying => "retrying",
            Phase::Abandoned => "abandoned",
        }
    }
}

fn process_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Progress of the current attempt, shared with `status` (atomics: the control actor reads
/// them without asking the mirror, so a status never waits on a transfer).
#[derive(Debug)]
pub struct MirrorStats {
    size: u64,
    phase: AtomicU8,
    attempt: AtomicU64,
    /// When the current attempt's transfer started (process milliseconds; 0: not yet).
    started_ms: AtomicU64,
    /// How far the sweep got; `size` once it is done.
    swept: AtomicU64,
    /// Data bytes acknowledged by the destination in this attempt.
    sent: AtomicU64,
    /// Zero-range bytes acknowledged (holes that did not cross the wire as data).
    zeroed: AtomicU64,
    passes: AtomicU64,
    max_bps: AtomicU64,
    /// Dirty bytes waiting, as of the last look.
    dirty: AtomicU64,
    /// Published by the actor after every hand-off step: this side is authoritative.
    has_control: AtomicBool,
    /// The hand-off state machine's phase name, published with `has_control`.
    handoff_phase: Mutex<&'static str>,
    /// Why the last attempt failed (for example the destination's ENOSPC).
    last_failure: Mutex<Option<String>>,
}

impl MirrorStats {
    fn new(size: u64, max_bps: u64) -> MirrorStats {
        MirrorStats {
            size,
            phase: AtomicU8::new(Phase::Connecting as u8),
            attempt: AtomicU64::new(0),
            started_ms: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
            passes: AtomicU64::new(0),
            max_bps: AtomicU64::new(max_bps),
            dirty: AtomicU64::new(0),
            has_control: AtomicBool::new(true),
            handoff_phase: Mutex::new("serving"),
            last_failure: Mutex::new(None),
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// This side holds every acknowledged write and may accept writes (now, or once its
    /// doors reopen): `has_control` in `status`.
    pub fn has_control(&self) -> bool {
        self.has_control.load(Ordering::SeqCst)
    }

    fn publish_handoff(&self, handoff: &SourceHandoff) {
        self.has_control
            .store(handoff.has_control(), Ordering::SeqCst);
        if let Ok(mut phase) = self.handoff_phase.lock() {
            *phase = handoff.phase().name();
        }
    }

    fn record_failure(&self, why: &str) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(why.to_owned());
        }
    }

    fn start_attempt(&self, attempt: u64) {
        self.attempt.store(attempt, Ordering::Relaxed);
        self.started_ms.store(0, Ordering::Relaxed);
        self.swept.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        self.zeroed.store(0, Ordering::Relaxed);
        self.passes.store(0, Ordering::Relaxed);
        self.dirty.store(0, Ordering::Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        match self.started_ms.load(Ordering::Relaxed) {
            0 => 0,
            start => process_ms().saturating_sub(start),
        }
    }

    /// flexnbd's speed: bytes sent / (elapsed seconds + 1).
    fn speed(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) / (self.elapsed_ms() / 1000 + 1)
    }

    fn bytes_left(&self) -> u64 {
        self.dirty.load(Ordering::Relaxed)
            + self.size.saturating_sub(self.swept.load(Ordering::Relaxed))
    }

    /// The migration keys of the status line (flexnbd §7).
    pub fn status(&self) -> MigrationStatus {
        let speed = self.speed();
        let bytes_left = self.bytes_left();
        let limit = self.max_bps.load(Ordering::Relaxed);
        MigrationStatus {
            speed,
            duration_secs: self.elapsed_ms() / 1000,
            seconds_left: bytes_left / (speed + 1),
            bytes_left,
            // What is enforced: 0 (garbage parses as 0) is no limit, so no key.
            speed_limit: (!rate::is_unlimited(limit)).then_some(limit),
        }
    }

    /// Our own keys, after flexnbd's.
    pub fn extra(&self) -> Vec<(&'static str, String)> {
        let handoff = self.handoff_phase.lock().map(|p| *p).unwrap_or("unknown");
        let mut keys = vec![
            ("migration_phase", self.phase().name().to_owned()),
            ("handoff_phase", handoff.to_owned()),
            (
                "migration_bytes_sent",
                self.sent.load(Ordering::Relaxed).to_string(),
            ),
            (
                "migration_bytes_zeroed",
                self.zeroed.load(Ordering::Relaxed).to_string(),
            ),
            (
                "migration_passes",
                self.passes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "migration_attempt",
                self.attempt.load(Ordering::Relaxed).to_string(),
            ),
        ];
        if let Some(why) = self.last_failure.lock().ok().and_then(|f| f.clone()) {
            keys.push(("migration_last_failure", status_word(&why)));
        }
        keys
    }
}

/// A reason as one status value: the status line is space-separated `key=value` pairs.
fn status_word(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

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
pub struct MirrorEnded(pub Outcome);

/// Everything one migration needs.
pub struct MirrorConfig {
    pub request: MirrorRequest,
    pub id: MigrationId,
    pub backing: Arc<Backing>,
    pub listener: Addr<Listener>,
    pub events: Option<Events>,
    pub owner: Recipient<MirrorEnded>,
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
        let run = Run {
            stats: self.stats.clone(),
            cancel: self.cancel.clone(),
            first: self.first.take(),
            bulk_limit: bulk_limit(),
            mirror: ctx.address(),
            bucket: Mutex::new(rate::TokenBucket::new(Instant::now())),
            config,
        };
        let task = actix_rt::spawn(run.run());
        ctx.spawn(task.into_actor(self).map(move |result, act, ctx| {
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
            owner.do_send(MirrorEnded(outcome.clone()));
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

/// Why an attempt ended early.
#[derive(Debug)]
enum AttemptError {
    /// Before the transfer: the first attempt reports it.
    Connect(FirstFailure, String),
    /// During the transfer or the hand-off.
    Transfer(String),
    /// `break` or a signal.
    Abandoned,
    /// Not retried: see [`Outcome::Fatal`].
    Fatal(String),
    /// The destination answered NotPrepared to our Commit.
    NotPrepared,
    /// The destination must never receive this migration (it is this server, or serves
    /// its file): the migration ends, on any attempt.
    Refused(FirstFailure, String),
}

impl From<io::Error> for AttemptError {
    fn from(e: io::Error) -> AttemptError {
        AttemptError::Transfer(e.to_string())
    }
}

impl AttemptError {
    fn reason(&self) -> String {
        match self {
            AttemptError::Connect(_, why)
            | AttemptError::Transfer(why)
            | AttemptError::Refused(_, why)
            | AttemptError::Fatal(why) => why.clone(),
            AttemptError::Abandoned => "abandoned".into(),
            AttemptError::NotPrepared => "the destination is not prepared".into(),
        }
    }
}

/// What the task does next.
enum Mode {
    /// A new attempt from scratch (doors open).
    Copy,
    /// Reconnect and resend Commit (doors closed).
    ResendCommit,
}

/// One migration's task.
struct Run {
    config: MirrorConfig,
    stats: Arc<MirrorStats>,
    cancel: CancellationToken,
    first: Option<oneshot::Sender<Result<(), FirstFailure>>>,
    /// The bulk copy's inactivity limit, read once.
    bulk_limit: Duration,
    /// The actor that owns the hand-off state machine.
    mirror: Addr<Mirror>,
    /// Paces data to the bandwidth limit; new for every attempt.
    bucket: Mutex<rate::TokenBucket>,
}

impl Run {
    async fn run(mut self) -> Outcome {
        let target = SocketAddr::new(self.config.request.addr, self.config.request.port);
        // Grows with every connection, so the destination can fence stale ones.
        let mut attempt = 0u64;
        let mut mode = Mode::Copy;
        loop {
            attempt += 1;
            self.stats.start_attempt(attempt);
            let result = match mode {
                Mode::Copy => {
                    self.stats.set_phase(Phase::Connecting);
                    tracing::info!(
                        "Migration {} to {target}: attempt {attempt}",
                        self.config.id
                    );
                    self.attempt(attempt).await
                }
                Mode::ResendCommit => {
                    self.stats.set_phase(Phase::InDoubt);
                    tracing::info!(
                        "Migration {} to {target}: resending Commit (connection {attempt})",
                        self.config.id
                    );
                    self.resend_commit(attempt).await
                }
            };
            let error = match result {
                Ok(()) => return self.completed().await,
                Err(AttemptError::Connect(failure, why)) if self.first.is_some() => {
                    tracing::error!("Migration to {target} failed: {why}");
                    self.report_first(Err(failure));
                    self.config.backing.dirty().stop();
                    let _ = self.step(Step::Failed(why)).await;
                    return Outcome::FirstAttemptFailed(failure);
                }
                Err(AttemptError::Fatal(why)) => {
                    self.config.backing.dirty().stop();
                    tracing::error!("Migration to {target} failed: {why}");
                    return Outcome::Fatal(why);
                }
                Err(AttemptError::Refused(failure, why)) => {
                    tracing::error!("Migration to {target} refused: {why}");
                    self.report_first(Err(failure));
                    self.config.backing.dirty().stop();
                    let _ = self.step(Step::Failed(why)).await;
                    let _ = self.config.listener.send(OpenDoors).await;
                    self.stats.set_phase(Phase::Abandoned);
                    return Outcome::FirstAttemptFailed(failure);
                }
                Err(e) => e,
            };
            let next = match &error {
                AttemptError::NotPrepared => {
                    tracing::warn!(
                        "The destination proved it did not take control of migration {}",
                        self.config.id
                    );
                    self.step(Step::NotPrepared).await
                }
                other => self.step(Step::Failed(other.reason())).await,
            };
            match next {
                Next::Retry | Next::Proceed => {
                    self.config.backing.dirty().stop();
                    let _ = self.config.listener.send(OpenDoors).await;
                    self.stats.set_phase(Phase::Retrying);
                    tracing::warn!(
                        "Migration attempt {attempt} to {target} failed: {}; retrying in {RETRY_DELAY:?}",
                        error_text(&error)
                    );
                    mode = Mode::Copy;
                }
                Next::ResendCommit => {
                    self.stats.set_phase(Phase::InDoubt);
                    tracing::error!(
                        "Migration {} is in doubt ({}): the destination may have taken control; this server will not serve again unless the destination proves it did not; resending Commit every {RETRY_DELAY:?}",
                        self.config.id,
                        error_text(&error)
                    );
                    mode = Mode::ResendCommit;
                }
                Next::HandedOff => return self.completed().await,
                Next::Orphaned => {
                    self.config.backing.dirty().stop();
                    return Outcome::Fatal(
                        "the source file was removed and the destination did not take control: its file holds every acknowledged write; serve it".into(),
                    );
                }
                Next::Stop { reopen } => return self.stopped(reopen).await,
            }
            // The pause before the next attempt; `break` or a signal ends it at once.
            tokio::select! {
                () = tokio::time::sleep(RETRY_DELAY) => {}
                () = self.cancel.cancelled() => {
                    if let Next::Stop { reopen } = self.step(Step::Failed("abandoned".into())).await {
                        return self.stopped(reopen).await;
                    }
                }
            }
        }
    }

    /// The hand-off state machine's answer to `step` (if the actor is gone, which cannot
    /// happen while this task runs, stop without reopening).
    async fn step(&self, step: Step) -> Next {
        self.mirror
            .send(step)
            .await
            .unwrap_or(Next::Stop { reopen: false })
    }

    async fn completed(&mut self) -> Outcome {
        self.stats.set_phase(Phase::Completed);
        self.config.backing.dirty().stop();
        let action = self.config.request.action;
        if action == MirrorAction::Nothing {
            let _ = self.step(Step::FinishedWithoutHandoff).await;
            let _ = self.config.listener.send(OpenDoors).await;
        }
        Outcome::Completed(action)
    }

    async fn stopped(&mut self, reopen: bool) -> Outcome {
        self.config.backing.dirty().stop();
        self.stats.set_phase(Phase::Abandoned);
        self.report_first(Err(FirstFailure::Abandoned));
        if reopen {
            let _ = self.config.listener.send(OpenDoors).await;
            return Outcome::Abandoned;
        }
        Outcome::Fatal(
            "the migration was stopped after this server let go of its copy; it will not serve again".into(),
        )
    }

    fn report_first(&mut self, result: Result<(), FirstFailure>) {
        if let Some(first) = self.first.take() {
            let _ = first.send(result);
        }
    }

    /// Races `future` against `break`.
    async fn abandonable<T>(
        &self,
        future: impl std::future::Future<Output = T>,
    ) -> Result<T, AttemptError> {
        tokio::select! {
            value = future => Ok(value),
            () = self.cancel.cancelled() => Err(AttemptError::Abandoned),
        }
    }

    /// Connects, probes and (to one of ours) joins the migration as connection `attempt`.
    /// Returns the engine and whether the destination is ours.
    async fn connect(
        &mut self,
        attempt: u64,
        purpose: JoinPurpose,
    ) -> Result<(Engine, bool), AttemptError> {
        let request = self.config.request.clone();
        let destination = self
            .abandonable(Destination::connect(&request, self.config.backing.size()))
            .await??;
        tracing::info!(
            "Connected to {}:{} ({}, flags {:#x})",
            request.addr,
            request.port,
            if destination.newstyle {
                "new-style"
            } else {
                "old-style"
            },
            destination.flags
        );
        let limit = match purpose {
            JoinPurpose::Copy => self.bulk_limit,
            JoinPurpose::Commit => HANDOFF_LIMIT,
        };
        let mut engine = Engine::start(destination, self.stats.clone(), self.cancel.clone(), limit);
        self.check_identity(&mut engine, purpose).await?;
        self.report_first(Ok(()));
        let ours = self.abandonable(engine.probe()).await??;
        if ours {
            let id = self.config.id;
            let join = HandoffRequest::Join {
                id,
                attempt,
                purpose,
            };
            match self.abandonable(engine.handoff(join)).await?? {
                HandoffReply::Joined {
                    id: got,
                    attempt: a,
                } if got == id && a == attempt => {}
                other => {
                    return Err(AttemptError::Transfer(format!(
                        "the destination answered {other:?} to Join"
                    )))
                }
            }
        }
        Ok((engine, ours))
    }

    /// Refuses a destination that is this server, or that serves this server's file:
    /// mirroring a file into itself overwrites what clients write meanwhile.
    async fn check_identity(
        &mut self,
        engine: &mut Engine,
        purpose: JoinPurpose,
    ) -> Result<(), AttemptError> {
        let Some(theirs) = self.abandonable(engine.identify()).await?? else {
            return Ok(());
        };
        let ours = crate::identity::of(&self.config.backing)
            .map_err(|e| AttemptError::Transfer(format!("identifying the export: {e}")))?;
        let Some(same) = ours.conflicts_with(&theirs) else {
            return Ok(());
        };
        let failure = match same {
            SameAs::ThisServer => FirstFailure::ThisServer,
            SameAs::ThisFile => FirstFailure::ThisFile,
        };
        let why = failure.text().to_owned();
        Err(match purpose {
            JoinPurpose::Copy => AttemptError::Refused(failure, why),
            // In doubt, nothing changes: keep resending to the configured destination.
            JoinPurpose::Commit => AttemptError::Transfer(why),
        })
    }

    async fn attempt(&mut self, attempt: u64) -> Result<(), AttemptError> {
        let (mut engine, ours) = self.connect(attempt, JoinPurpose::Copy).await?;
        engine.zeroes_as_requests = ours || engine.flags & tflags::SEND_WRITE_ZEROES != 0;
        tracing::info!(
            "The destination {} our acknowledged hand-off; holes go as {}",
            if ours { "speaks" } else { "does not speak" },
            if engine.zeroes_as_requests {
                "zero-range requests"
            } else {
                "zero-filled writes"
            }
        );

        // Tracking starts before the sweep, so nothing written during it is missed.
        let backing = self.config.backing.clone();
        backing.dirty().start();
        self.stats.started_ms.store(process_ms(), Ordering::Relaxed);
        if let Ok(mut bucket) = self.bucket.lock() {
            *bucket = rate::TokenBucket::new(Instant::now());
        }
        self.stats.set_phase(Phase::Sweep);
        self.sweep(&mut engine).await?;

        self.stats.set_phase(Phase::Copying);
        loop {
            let pending = backing.dirty().pending_bytes();
            self.stats.dirty.store(pending, Ordering::Relaxed);
            let eta_secs = pending / (self.stats.speed() + 1);
            if pending == 0 || eta_secs < CONVERGE.as_secs() {
                break;
            }
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let runs = backing.dirty().take(u64::MAX);
            self.send_runs(&mut engine, &runs).await?;
        }

        // Converged by flexnbd's rule. Send what is dirty now in catch-up passes while
        // clients still run, as long as each leaves less behind than the one before (at
        // most CATCH_UP_PASSES): the final pass, with the doors closed, then only carries
        // what was written during the last one, which keeps the pause clients see short.
        let mut previous = u64::MAX;
        for _ in 0..CATCH_UP_PASSES {
            let pending = backing.dirty().pending_bytes();
            if pending == 0 || pending >= previous {
                break;
            }
            previous = pending;
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let runs = backing.dirty().take(u64::MAX);
            self.send_runs(&mut engine, &runs).await?;
        }

        // Make the bulk durable on the destination while clients still run, so that the
        // sync at the hand-off only covers the final pass (it is part of the pause clients
        // see). Every destination advertises FLUSH (flexnbd's flags are 13).
        if engine.flags & tflags::SEND_FLUSH != 0 {
            self.abandonable(engine.flush()).await??;
        }

        // The final pass: no client may write any more once the doors are closed.
        if let Next::Stop { .. } = self.step(Step::CloseDoors).await {
            return Err(AttemptError::Abandoned);
        }
        self.stats.set_phase(Phase::FinalPass);
        engine.set_limit(HANDOFF_LIMIT);
        self.abandonable(self.config.listener.send(CloseDoors))
            .await?
            .map_err(|e| AttemptError::Transfer(format!("the listener is gone: {e}")))?;
        loop {
            let runs = backing.dirty().take(u64::MAX);
            if runs.is_empty() {
                break;
            }
            self.send_runs(&mut engine, &runs).await?;
        }
        self.stats.dirty.store(0, Ordering::Relaxed);
        self.abandonable(engine.drain()).await??;
        backing.dirty().stop();
        tracing::info!(
            "All data acknowledged: {} bytes sent as data, {} as zero ranges",
            self.stats.sent.load(Ordering::Relaxed),
            self.stats.zeroed.load(Ordering::Relaxed)
        );
        self.hand_off(engine, ours).await
    }

    /// The whole export, extent by extent.
    async fn sweep(&self, engine: &mut Engine) -> Result<(), AttemptError> {
        let size = self.config.backing.size();
        let mut pos = 0u64;
        while pos < size {
            let len = SWEEP_CHUNK.min(size - pos);
            let covered = self.send_range(engine, pos, len).await?;
            pos += covered;
            self.stats.swept.store(pos, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends dirty runs. Large runs go through [`Run::send_range`] (holes as zero ranges);
    /// small ones — typically scattered 4 KiB client writes — are read in batches, one
    /// blocking job per batch, without asking for extents: per-run overhead, not bandwidth,
    /// is what made a final pass of thousands of small runs slow.
    async fn send_runs(
        &self,
        engine: &mut Engine,
        runs: &[(u64, u64)],
    ) -> Result<(), AttemptError> {
        let mut batch: Vec<(u64, u64)> = Vec::new();
        let mut batched = 0u64;
        for &(offset, len) in runs {
            if len >= SMALL_RUN {
                let mut done = 0;
                while done < len {
                    done += self.send_range(engine, offset + done, len - done).await?;
                }
                continue;
            }
            batch.push((offset, len));
            batched += len;
            if batched >= WRITE_SIZE as u64 {
                self.send_batch(engine, std::mem::take(&mut batch)).await?;
                batched = 0;
            }
        }
        if !batch.is_empty() {
            self.send_batch(engine, batch).await?;
        }
        Ok(())
    }

    async fn send_batch(
        &self,
        engine: &mut Engine,
        batch: Vec<(u64, u64)>,
    ) -> Result<(), AttemptError> {
        let backing = self.config.backing.clone();
        let pieces = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|(offset, len)| {
                    let mut buf = BytesMut::with_capacity(len as usize);
                    backing
                        .read_into(&mut buf, offset, len as usize)
                        .map(|()| (offset, buf.freeze()))
                })
                .collect::<io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| AttemptError::Transfer(e.to_string()))?
        .map_err(|e| AttemptError::Transfer(format!("reading the source failed: {e}")))?;
        for (offset, data) in pieces {
            self.send_data(engine, offset, data).await?;
        }
        Ok(())
    }

    /// Sends `data` as WRITEs, each piece paced to the bandwidth limit before it is handed
    /// to the socket (see `crate::rate`).
    async fn send_data(
        &self,
        engine: &mut Engine,
        offset: u64,
        data: Bytes,
    ) -> Result<(), AttemptError> {
        let mut done = 0usize;
        while done < data.len() {
            let limit = self.stats.max_bps.load(Ordering::Relaxed);
            let n = (data.len() - done).min(rate::piece_size(limit, WRITE_SIZE as u64) as usize);
            self.pace(n as u64, limit).await?;
            let piece = data.slice(done..done + n);
            self.abandonable(engine.write(offset + done as u64, piece))
                .await??;
            done += n;
        }
        Ok(())
    }

    /// A hole: one zero-range request where the destination takes them (they cost no
    /// bandwidth), zero-filled WRITEs otherwise, paced like data.
    async fn send_zeroes(
        &self,
        engine: &mut Engine,
        offset: u64,
        len: u64,
    ) -> Result<(), AttemptError> {
        if engine.zeroes_as_requests {
            return self.abandonable(engine.zeroes(offset, len)).await?;
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            let zeros = Bytes::from_static(&ZEROS[..n as usize]);
            self.send_data(engine, offset + done, zeros).await?;
            done += n;
        }
        Ok(())
    }

    /// Sends `[offset, offset + len)` (or a first part of it): holes as zero ranges, data
    /// as writes read from the file now. Returns how much was covered.
    async fn send_range(
        &self,
        engine: &mut Engine,
        offset: u64,
        len: u64,
    ) -> Result<u64, AttemptError> {
        let backing = self.config.backing.clone();
        let extents = tokio::task::spawn_blocking(move || backing.extents(offset, len, 1024))
            .await
            .map_err(|e| AttemptError::Transfer(e.to_string()))??;
        let mut at = offset;
        for extent in extents {
            if extent.hole {
                self.send_zeroes(engine, at, extent.length).await?;
            } else {
                let mut done = 0;
                while done < extent.length {
                    let n = (extent.length - done).min(WRITE_SIZE as u64);
                    let data = self.read(at + done, n as usize).await?;
                    self.send_data(engine, at + done, data).await?;
                    done += n;
                }
            }
            at += extent.length;
        }
        Ok((at - offset).max(1).min(len))
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, AttemptError> {
        let backing = self.config.backing.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::with_capacity(len);
            backing
                .read_into(&mut buf, offset, len)
                .map(|()| buf.freeze())
        })
        .await
        .map_err(|e| AttemptError::Transfer(e.to_string()))?
        .map_err(|e| AttemptError::Transfer(format!("reading the source failed: {e}")))
    }

    /// Waits until `len` bytes may be sent under `limit` (flexnbd §10.9, held over every
    /// window of a few seconds: see `crate::rate`).
    async fn pace(&self, len: u64, limit: u64) -> Result<(), AttemptError> {
        let wait = match self.bucket.lock() {
            Ok(mut bucket) => bucket.take(Instant::now(), len, limit),
            Err(_) => Duration::ZERO,
        };
        if !wait.is_zero() {
            self.abandonable(tokio::time::sleep(wait)).await?;
        }
        Ok(())
    }

    /// The hand-off, with every byte acknowledged and the doors closed.
    async fn hand_off(&mut self, mut engine: Engine, ours: bool) -> Result<(), AttemptError> {
        let action = self.config.request.action;
        if action == MirrorAction::Nothing {
            return Ok(());
        }
        self.stats.set_phase(Phase::HandingOff);
        if !ours {
            // flexnbd's hand-off: unlink first (the --unlink guarantee), then a bare DISC,
            // which may be on the wire from its first byte: never serve again after that.
            self.unlink_if_asked().await?;
            if let Next::Stop { .. } = self.step(Step::CommitStarting).await {
                return Err(AttemptError::Abandoned);
            }
            engine.disconnect().await.map_err(|e| {
                AttemptError::Fatal(format!(
                    "sending the final DISCONNECT failed: {e}; the destination may or may not have taken over"
                ))
            })?;
            self.step(Step::Committed).await;
            return Ok(());
        }
        let id = self.config.id;
        let size = self.config.backing.size();
        engine.set_limit(PREPARE_LIMIT);
        match self
            .abandonable(engine.handoff(HandoffRequest::Prepare { id, size }))
            .await??
        {
            HandoffReply::Prepared { id: got } if got == id => {}
            other => {
                return Err(AttemptError::Transfer(format!(
                    "the destination answered {other:?} to Prepare"
                )))
            }
        }
        engine.set_limit(HANDOFF_LIMIT);
        tracing::info!("The destination made everything durable (migration {id})");
        if let Next::Stop { .. } = self.step(Step::Prepared).await {
            return Err(AttemptError::Abandoned);
        }
        self.unlink_if_asked().await?;
        self.commit(&mut engine).await
    }

    /// Writes Commit, once the state machine agrees (from then on this side is in doubt
    /// until an answer), and reads the answer.
    async fn commit(&mut self, engine: &mut Engine) -> Result<(), AttemptError> {
        if let Next::Stop { .. } = self.step(Step::CommitStarting).await {
            return Err(AttemptError::Abandoned);
        }
        self.stats.set_phase(Phase::InDoubt);
        let id = self.config.id;
        // No `abandonable` here: `break` cannot stop an in-doubt hand-off, and a signal
        // ends the process without serving.
        let answer = tokio::select! {
            answer = engine.handoff(HandoffRequest::Commit { id }) => answer?,
            () = self.cancel.cancelled() => return Err(AttemptError::Abandoned),
        };
        match answer {
            HandoffReply::Committed { id: got } if got == id => {
                tracing::info!("The destination has taken control (migration {id})");
                self.step(Step::Committed).await;
                Ok(())
            }
            HandoffReply::NotPrepared { id: got } if got == id => Err(AttemptError::NotPrepared),
            other => Err(AttemptError::Transfer(format!(
                "the destination answered {other:?} to Commit"
            ))),
        }
    }

    /// In doubt: a fresh connection that only resends Commit.
    async fn resend_commit(&mut self, attempt: u64) -> Result<(), AttemptError> {
        let (mut engine, ours) = self.connect(attempt, JoinPurpose::Commit).await?;
        if !ours {
            return Err(AttemptError::Transfer(
                "the destination does not speak our hand-off any more".into(),
            ));
        }
        self.commit(&mut engine).await
    }

    async fn unlink_if_asked(&mut self) -> Result<(), AttemptError> {
        if self.config.request.action != MirrorAction::Unlink {
            return Ok(());
        }
        if let Next::Stop { .. } = self.step(Step::Unlinking).await {
            return Err(AttemptError::Abandoned);
        }
        let path = self.config.backing.path().to_owned();
        if let Err(e) = std::fs::remove_file(&path) {
            self.step(Step::UnlinkFailed).await;
            return Err(AttemptError::Fatal(format!(
                "couldn't remove the source file {} ({e}); not handing over: the source copy stays authoritative",
                path.display()
            )));
        }
        tracing::info!("Removed the source file {}", path.display());
        Ok(())
    }
}

fn error_text(error: &AttemptError) -> String {
    error.reason()
}

/// A connected destination, after its handshake.
struct Destination {
    stream: TcpStream,
    flags: u16,
    newstyle: bool,
}

impl Destination {
    /// Connects and reads the hello (or negotiates), checking the size: the first attempt's
    /// result comes from here.
    async fn connect(request: &MirrorRequest, size: u64) -> Result<Destination, AttemptError> {
        let target = SocketAddr::new(request.addr, request.port);
        let connect_failed = |e: String| {
            AttemptError::Connect(
                FirstFailure::Connect,
                format!("couldn't connect to {target}: {e}"),
            )
        };
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| connect_failed(e.to_string()))?;
        if let Some(bind) = request.bind {
            socket
                .bind(SocketAddr::new(bind, 0))
                .map_err(|e| connect_failed(format!("binding to {bind}: {e}")))?;
        }
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_failed(e.to_string())),
            Err(_) => return Err(connect_failed("timed out".into())),
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = watch_link(&stream) {
            tracing::warn!("Couldn't set keepalive on the connection to {target}: {e}");
        }
        let received = AtomicU64::new(0);
        let handshake =
            tokio::time::timeout(HELLO_TIMEOUT, Self::handshake(&mut stream, &received));
        let (remote_size, flags, newstyle) = match handshake.await {
            Ok(result) => result?,
            // Nothing at all is "failed to respond"; a partial hello is a bad one.
            Err(_) if received.load(Ordering::Relaxed) == 0 => {
                return Err(AttemptError::Connect(
                    FirstFailure::NoHello,
                    format!("{target} sent no hello within {HELLO_TIMEOUT:?}"),
                ))
            }
            Err(_) => {
                return Err(AttemptError::Connect(
                    FirstFailure::Rejected,
                    format!("{target} sent an incomplete hello within {HELLO_TIMEOUT:?}"),
                ))
            }
        };
        if remote_size != size {
            return Err(AttemptError::Connect(
                FirstFailure::SizeMismatch,
                format!("{target} exports {remote_size} bytes, we have {size}"),
            ));
        }
        Ok(Destination {
            stream,
            flags,
            newstyle,
        })
    }

    async fn handshake(
        stream: &mut TcpStream,
        received: &AtomicU64,
    ) -> Result<(u64, u16, bool), AttemptError> {
        let rejected = |why: String| AttemptError::Connect(FirstFailure::Rejected, why);
        let mut first = [0u8; 16];
        read_counted(stream, &mut first, received)
            .await
            .map_err(|e| rejected(format!("reading the hello failed: {e}")))?;
        let greeting = match client::classify(&first) {
            Ok(greeting) => greeting,
            Err(e) => {
                // A hello with a wrong magic is read whole (within the hello time) before
                // it is rejected, so the peer does not see its hello cut off (flexnbd §10.2).
                let mut rest = [0u8; OLDSTYLE_HELLO_LEN - 16];
                let _ = read_counted(stream, &mut rest, received).await;
                return Err(rejected(e.to_string()));
            }
        };
        match greeting {
            Greeting::Oldstyle => {
                let mut hello = [0u8; OLDSTYLE_HELLO_LEN];
                hello[..16].copy_from_slice(&first);
                read_counted(stream, &mut hello[16..], received)
                    .await
                    .map_err(|e| rejected(format!("reading the hello failed: {e}")))?;
                let hello = OldstyleHello::decode(&hello).map_err(|e| rejected(e.to_string()))?;
                Ok((hello.size, hello.flags, false))
            }
            Greeting::Newstyle => {
                let mut flags = [0u8; 2];
                stream
                    .read_exact(&mut flags)
                    .await
                    .map_err(|e| rejected(e.to_string()))?;
                let go = client::go_request(u16::from_be_bytes(flags), "")
                    .map_err(|e| rejected(e.to_string()))?;
                stream
                    .write_all(&go)
                    .await
                    .map_err(|e| rejected(e.to_string()))?;
                let mut export = None;
                loop {
                    let mut header = [0u8; 20];
                    stream
                        .read_exact(&mut header)
                        .await
                        .map_err(|e| rejected(e.to_string()))?;
                    let (_, kind, len) = client::decode_option_reply(&header)
                        .map_err(|e| rejected(e.to_string()))?;
                    let mut payload = vec![0u8; len as usize];
                    stream
                        .read_exact(&mut payload)
                        .await
                        .map_err(|e| rejected(e.to_string()))?;
                    match kind {
                        crate::protocol::newstyle::rep::INFO => {
                            if let Some(info) = client::parse_info_export(&payload)
                                .map_err(|e| rejected(e.to_string()))?
                            {
                                export = Some(info);
                            }
                        }
                        crate::protocol::newstyle::rep::ACK => break,
                        other => {
                            return Err(rejected(format!(
                                "the destination refused the export (reply {other:#x})"
                            )))
                        }
                    }
                }
                let (size, flags) =
                    export.ok_or_else(|| rejected("no NBD_INFO_EXPORT before the ACK".into()))?;
                Ok((size, flags, true))
            }
        }
    }
}

/// Reads exactly `buf.len()` bytes, counting what arrived (to tell "no hello" from "a
/// partial hello" at the deadline).
async fn read_counted(
    stream: &mut TcpStream,
    buf: &mut [u8],
    received: &AtomicU64,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        received.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Makes a dead or blackholed link to the destination fail in about [`LINK_TIMEOUT`]:
/// keepalive probes while nothing is outstanding, TCP_USER_TIMEOUT for data that is never
/// acknowledged.
fn watch_link(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(LINK_TIMEOUT))
}

/// The bulk copy's inactivity limit: [`BULK_LIMIT`], or `FLEXNBD_MS_REQUEST_LIMIT_SECS`
/// (read once per migration).
fn bulk_limit() -> Duration {
    std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(BULK_LIMIT)
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
    },
    Probe(oneshot::Sender<u32>),
    Handoff(oneshot::Sender<Result<HandoffReply, String>>),
    /// The answer to IDENTIFY: `None` when the destination answered an error (it is not
    /// one of ours).
    Identify(oneshot::Sender<Result<Option<Identity>, String>>),
}

/// The outbound connection: requests pipelined on the write half, replies matched by
/// cookie on a reader task.
struct Engine {
    writer: OwnedWriteHalf,
    flags: u16,
    zeroes_as_requests: bool,
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
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Engine {
    fn start(
        destination: Destination,
        stats: Arc<MirrorStats>,
        cancel: CancellationToken,
        limit: Duration,
    ) -> Engine {
        let limit_ms = Arc::new(AtomicU64::new(limit.as_millis() as u64));
        let completed = Arc::new(tokio::sync::Notify::new());
        let (read_half, writer) = destination.stream.into_split();
        let pending: Arc<Mutex<HashMap<u64, Pending>>> = Arc::default();
        let failed = cancel.child_token();
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let activity = Arc::new(AtomicU64::new(process_ms()));
        let reader = tokio::spawn(read_replies(
            read_half,
            Replies {
                pending: pending.clone(),
                stats,
                failed: failed.clone(),
                failure: failure.clone(),
                activity: activity.clone(),
                limit_ms: limit_ms.clone(),
                completed: completed.clone(),
            },
        ));
        Engine {
            writer,
            flags: destination.flags,
            zeroes_as_requests: false,
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            pending,
            next_cookie: 1,
            failed,
            failure,
            reader,
            activity,
            limit_ms,
            completed,
        }
    }

    /// Sets the inactivity limit from now on.
    fn set_limit(&self, limit: Duration) {
        self.limit_ms
            .store(limit.as_millis() as u64, Ordering::Relaxed);
    }

    fn limit(&self) -> Duration {
        Duration::from_millis(self.limit_ms.load(Ordering::Relaxed))
    }

    fn failure(&self) -> AttemptError {
        let why = self
            .failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "the connection to the destination failed".into());
        AttemptError::Transfer(why)
    }

    async fn send(
        &mut self,
        command: Command,
        offset: u64,
        length: u64,
        payload: &[u8],
        pending: Pending,
    ) -> Result<(), AttemptError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let request = Request {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        };
        let mut header = Vec::with_capacity(28);
        request
            .encode(HeaderStyle::Compact, &mut header)
            .map_err(|e| AttemptError::Transfer(format!("request too long: {e}")))?;
        if let Ok(mut map) = self.pending.lock() {
            map.insert(cookie, pending);
        }
        self.activity.store(process_ms(), Ordering::Relaxed);
        let limit = self.limit();
        let write = async {
            self.writer.write_all(&header).await?;
            if !payload.is_empty() {
                self.writer.write_all(payload).await?;
            }
            io::Result::Ok(())
        };
        tokio::select! {
            result = tokio::time::timeout(limit, write) => match result {
                Ok(Ok(())) => {
                    self.activity.store(process_ms(), Ordering::Relaxed);
                    Ok(())
                }
                Ok(Err(e)) => Err(AttemptError::Transfer(format!("sending to the destination failed: {e}"))),
                Err(_) => Err(AttemptError::Transfer("the destination stopped reading".into())),
            },
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, AttemptError> {
        tokio::select! {
            permit = self.slots.clone().acquire_owned() => permit.map_err(|e| AttemptError::Transfer(e.to_string())),
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Waits until no request in flight writes to a range overlapping `[offset, offset +
    /// len)`. NBD gives no order to requests in flight: a server may apply them in any
    /// order (ours runs small writes inline and long ones on its write thread), so a block
    /// rewritten by a later pass must not be sent while the earlier write covering it is
    /// unanswered, or the older data could land last.
    async fn await_no_overlap(&self, offset: u64, len: u64) -> Result<(), AttemptError> {
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

    async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), AttemptError> {
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
            },
        )
        .await
    }

    /// A hole: a zero-range request where the destination takes one (ours, or a new-style
    /// server advertising WRITE_ZEROES), zero-filled writes otherwise (a C flexnbd
    /// destination keeps its file sparse by skipping zero blocks in holes).
    async fn zeroes(&mut self, offset: u64, len: u64) -> Result<(), AttemptError> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_SIZE);
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
                },
            )
            .await?;
            done += n;
        }
        Ok(())
    }

    /// Waits until every request has been acknowledged.
    async fn drain(&mut self) -> Result<(), AttemptError> {
        let all = IN_FLIGHT as u32;
        tokio::select! {
            biased;
            permits = self.slots.acquire_many(all) => {
                drop(permits);
                Ok(())
            }
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Waits until every request is acknowledged, then asks the destination to make them
    /// durable (NBD FLUSH).
    async fn flush(&mut self) -> Result<(), AttemptError> {
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
            },
        )
        .await?;
        self.drain().await
    }

    /// Asks the destination who it is: `None` unless it is a server of ours.
    async fn identify(&mut self) -> Result<Option<Identity>, AttemptError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unknown(IDENTIFY), 0, 0, &[], Pending::Identify(tx))
            .await?;
        tokio::select! {
            biased;
            answer = rx => match answer {
                Ok(Ok(identity)) => Ok(identity),
                Ok(Err(why)) => Err(AttemptError::Transfer(format!("a bad identity: {why}"))),
                Err(_) => Err(self.failure()),
            },
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// Asks whether the destination is ours (it answers 0); C flexnbd, qemu-nbd and
    /// nbdkit answer EINVAL. Any other error is a destination that fails (flexnbd §10.7):
    /// the attempt is retried, it is not taken for a legacy peer.
    async fn probe(&mut self) -> Result<bool, AttemptError> {
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
            other => Err(AttemptError::Transfer(format!(
                "the destination answered the probe with error {other}"
            ))),
        }
    }

    async fn handoff(&mut self, message: HandoffRequest) -> Result<HandoffReply, AttemptError> {
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
                Ok(Err(why)) => Err(AttemptError::Transfer(why)),
                Err(_) => Err(self.failure()),
            },
            () = self.failed.cancelled() => Err(self.failure()),
        }
    }

    /// flexnbd's hand-off: a DISC (no reply is awaited), then the socket is closed.
    async fn disconnect(mut self) -> io::Result<()> {
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

/// What the reply reader shares with the engine.
struct Replies {
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    stats: Arc<MirrorStats>,
    failed: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
    activity: Arc<AtomicU64>,
    limit_ms: Arc<AtomicU64>,
    completed: Arc<tokio::sync::Notify>,
}

impl Replies {
    fn fail(&self, why: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(why);
        }
        self.failed.cancel();
    }

    fn outstanding(&self) -> bool {
        self.pending.lock().map(|p| !p.is_empty()).unwrap_or(false)
    }
}

/// How often the reader checks the inactivity limit while it waits.
const TICK: Duration = Duration::from_millis(250);

/// Reads until `buf` holds `n` bytes. Reading is cancel-safe (`read_buf` into a buffer that
/// outlives each wait), so a tick that checks the inactivity limit loses no bytes. Fails the
/// attempt when requests are outstanding and no byte has moved for the limit (flexnbd
/// §10.10), whenever the request was sent relative to the start of this wait.
///
/// `mid_reply`: the bytes awaited belong to a reply already begun (a hand-off answer after
/// its header), whose request is no longer counted as outstanding: the limit applies all
/// the same.
async fn fill(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    n: usize,
    shared: &Replies,
    mid_reply: bool,
) -> Result<(), String> {
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

/// The reader task: matches replies to requests; any error fails the attempt. An answer is
/// always delivered before a failure that follows it is reported.
async fn read_replies(mut reader: OwnedReadHalf, shared: Replies) {
    let mut buf = BytesMut::with_capacity(4096);
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
            Pending::Transfer { len, data, .. } => {
                if reply.error != 0 {
                    shared.fail(format!(
                        "the destination refused a write with error {}",
                        crate::protocol::Errno(reply.error)
                    ));
                    return;
                }
                let counter = if data {
                    &shared.stats.sent
                } else {
                    &shared.stats.zeroed
                };
                counter.fetch_add(len, Ordering::Relaxed);
                // It is out of `pending`: writes waiting for its range may go now.
                shared.completed.notify_waiters();
            }
            Pending::Probe(tx) => {
                let _ = tx.send(reply.error);
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

/// The body that follows a successful reply to IDENTIFY or HANDOFF: a bounded 32-bit
/// length, then that many bytes.
async fn read_answer(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    shared: &Replies,
) -> Result<BytesMut, String> {
    fill(reader, buf, 4, shared, true).await?;
    let n = answer_length(buf[..4].try_into().expect("4 bytes")).map_err(|e| e.to_string())?;
    fill(reader, buf, 4 + n, shared, true).await?;
    let _ = buf.split_to(4);
    Ok(buf.split_to(n))
}
