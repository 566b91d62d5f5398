//! One migration's task: attempts, the sweep, the passes, the final pass, the hand-off,
//! resending Commit while in doubt, and pacing to the bandwidth limit. The decisions are
//! [`super::policy`]'s; the hand-off's state machine lives in the actor, asked by [`Step`];
//! the destination is reached through `crate::client`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::client::{
    self, Ack, ConnectError, ConnectOptions, Engine, EngineConfig, EngineError, LinkOptions,
};
use crate::protocol::control::MirrorAction;
use crate::protocol::handoff::source::Next;
use crate::protocol::handoff::{HandoffReply, HandoffRequest, JoinPurpose, SameAs};
use crate::rate;
use crate::storage::ForwardRequest;

use super::super::listener::{CloseDoors, OpenDoors};
use super::policy::{self, AutoSwitch, CatchUp, Stage, SwitchReason};
use super::stats::{MirrorStats, Phase};
use super::{FirstFailure, Mirror, MirrorConfig, Outcome, Step};

/// TCP connect timeout (flexnbd §10.10).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole hello (or new-style negotiation) must arrive within this (flexnbd §10.2).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP_USER_TIMEOUT of the migration socket, and the keepalive that makes a silent peer
/// count as gone: a link that blackholes is detected in about this long in every phase.
const LINK_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 3;
/// Pause between attempts.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Dirty runs shorter than this are read in batches, without an extent lookup.
const SMALL_RUN: u64 = 1 << 20;
/// Largest WRITE the mirror sends, and requests in flight on the outbound connection.
const WRITE_SIZE: usize = 4 << 20;
/// In active mode the copy reads and queues this much at a time, so that a client's
/// forwarded write waits behind at most this much of the background copy.
const ACTIVE_STEP: usize = 1 << 20;
/// Forwarded writes served in one go (one blocking read for the small ones).
const FORWARD_BATCH: usize = 64;
const IN_FLIGHT: usize = 8;
/// Largest zero-range request (WRITE_ZEROES) the mirror sends.
const ZERO_SIZE: u64 = 256 << 20;
/// The sweep asks the filesystem for extents this much at a time.
const SWEEP_CHUNK: u64 = 64 << 20;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

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

impl From<EngineError> for AttemptError {
    fn from(e: EngineError) -> AttemptError {
        AttemptError::Transfer(e.to_string())
    }
}

impl From<ConnectError> for AttemptError {
    fn from(e: ConnectError) -> AttemptError {
        let failure = match e {
            ConnectError::Connect { .. } => FirstFailure::Connect,
            ConnectError::NoHello { .. } => FirstFailure::NoHello,
            ConnectError::IncompleteHello { .. }
            | ConnectError::Handshake(_)
            | ConnectError::Tls(_) => FirstFailure::Rejected,
        };
        AttemptError::Connect(failure, e.to_string())
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

/// What one call of [`Run::send_range_counted`] did.
struct Sent {
    /// Bytes of the range covered (data and holes).
    covered: u64,
    /// Of which sent as data.
    data: u64,
}

/// What the task does next.
enum Mode {
    /// A new attempt from scratch (doors open).
    Copy,
    /// Reconnect and resend Commit (doors closed).
    ResendCommit,
}

/// One migration's task.
pub(super) struct Run {
    pub(super) config: MirrorConfig,
    pub(super) stats: Arc<MirrorStats>,
    pub(super) cancel: CancellationToken,
    pub(super) first: Option<oneshot::Sender<Result<(), FirstFailure>>>,
    /// The bulk copy's inactivity limit, read once.
    pub(super) bulk_limit: Duration,
    /// The actor that owns the hand-off state machine.
    pub(super) mirror: Addr<Mirror>,
    /// Paces data to the bandwidth limit; new for every attempt.
    pub(super) bucket: Mutex<rate::TokenBucket>,
    /// This attempt sends holes as zero-range requests (else as zero-filled WRITEs).
    pub(super) zeroes_as_requests: bool,
    /// Client writes to forward (active mode), from the sessions through the dirty map.
    pub(super) forwards: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<ForwardRequest>>,
    /// `auto` mode's watch; `None` once the mode is settled (background, or active).
    pub(super) auto: Mutex<Option<AutoSwitch>>,
}

impl Run {
    pub(super) async fn run(mut self) -> Outcome {
        let target = SocketAddr::new(self.config.request.addr, self.config.request.port);
        // Grows with every connection, so the destination can fence stale ones.
        let mut attempt = 0u64;
        let mut mode = Mode::Copy;
        loop {
            attempt += 1;
            self.stats.start_attempt(attempt);
            let error = match self.one_attempt(&mode, attempt, target).await {
                Ok(()) => return self.completed().await,
                Err(e) => e,
            };
            let error = match self.ends_migration(error, target).await {
                Ok(error) => error,
                Err(outcome) => return outcome,
            };
            mode = match self.after_failure(error, attempt, target).await {
                Ok(mode) => mode,
                Err(outcome) => return outcome,
            };
            // The pause before the next attempt; `break` or a signal ends it at once.
            // Forwards still queued from the failed attempt mark their ranges dirty.
            tokio::select! {
                () = self.refusing_forwards(tokio::time::sleep(RETRY_DELAY)) => {}
                () = self.cancel.cancelled() => {
                    if let Next::Stop { reopen } = self.step(Step::Failed("abandoned".into())).await {
                        return self.stopped(reopen).await;
                    }
                }
            }
        }
    }

    /// Connection `attempt`: a copy from scratch, or a Commit resent.
    async fn one_attempt(
        &mut self,
        mode: &Mode,
        attempt: u64,
        target: SocketAddr,
    ) -> Result<(), AttemptError> {
        match mode {
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
        }
    }

    /// The failures that end the migration whatever the hand-off's phase (the first
    /// connection failed, a fatal error, a destination that must never receive it): their
    /// outcome. Any other failure is given back.
    async fn ends_migration(
        &mut self,
        error: AttemptError,
        target: SocketAddr,
    ) -> Result<AttemptError, Outcome> {
        match error {
            AttemptError::Connect(failure, why) if self.first.is_some() => {
                tracing::error!("Migration to {target} failed: {why}");
                // Before the answer: `mirror` tells its caller the cause too.
                self.stats.record_failure(&why);
                self.report_first(Err(failure));
                self.config.backing.dirty().stop();
                let _ = self.step(Step::Failed(why)).await;
                Err(Outcome::FirstAttemptFailed(failure))
            }
            AttemptError::Fatal(why) => {
                self.config.backing.dirty().stop();
                tracing::error!("Migration to {target} failed: {why}");
                Err(Outcome::Fatal(why))
            }
            AttemptError::Refused(failure, why) => {
                tracing::error!("Migration to {target} refused: {why}");
                self.stats.record_failure(&why);
                self.report_first(Err(failure));
                self.config.backing.dirty().stop();
                let _ = self.step(Step::Failed(why)).await;
                let _ = self.config.listener.send(OpenDoors).await;
                self.stats.set_phase(Phase::Abandoned);
                Err(Outcome::FirstAttemptFailed(failure))
            }
            e => Ok(e),
        }
    }

    /// After a failed attempt, the hand-off state machine says what comes next: another
    /// attempt from scratch (doors reopened), resending Commit (in doubt), or the end.
    async fn after_failure(
        &mut self,
        error: AttemptError,
        attempt: u64,
        target: SocketAddr,
    ) -> Result<Mode, Outcome> {
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
                Ok(Mode::Copy)
            }
            Next::ResendCommit => {
                self.stats.set_phase(Phase::InDoubt);
                tracing::error!(
                    "Migration {} is in doubt ({}): the destination may have taken control; this server will not serve again unless the destination proves it did not; resending Commit every {RETRY_DELAY:?}",
                    self.config.id,
                    error_text(&error)
                );
                Ok(Mode::ResendCommit)
            }
            Next::HandedOff => Err(self.completed().await),
            Next::Orphaned => {
                self.config.backing.dirty().stop();
                Err(Outcome::Fatal(
                    "the source file was removed and the destination did not take control: its file holds every acknowledged write; serve it".into(),
                ))
            }
            Next::Stop { reopen } => Err(self.stopped(reopen).await),
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
            .abandonable(self.refusing_forwards(connect_destination(
                &request,
                self.config.tls.clone(),
                self.config.backing.size(),
            )))
            .await??;
        let export = destination.export;
        tracing::info!(
            "Connected to {}:{} ({}, flags {:#x})",
            request.addr,
            request.port,
            if export.newstyle {
                "new-style"
            } else {
                "old-style"
            },
            export.flags
        );
        let stage = match purpose {
            JoinPurpose::Copy => Stage::Bulk,
            JoinPurpose::Commit => Stage::DoorsClosed,
        };
        let mut engine = Engine::start(
            destination.stream,
            export.flags,
            self.stats.acked(),
            &self.cancel,
            EngineConfig {
                in_flight: IN_FLIGHT,
                zero_size: ZERO_SIZE,
                limit: policy::inactivity_limit(stage, self.bulk_limit),
            },
        );
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
        self.zeroes_as_requests = policy::zeroes_as_requests(ours, engine.flags());
        tracing::info!(
            "The destination {} our acknowledged hand-off; holes go as {}",
            if ours { "speaks" } else { "does not speak" },
            if self.zeroes_as_requests {
                "zero-range requests"
            } else {
                "zero-filled writes"
            }
        );

        // Tracking starts before the sweep, so nothing written during it is missed.
        let backing = self.config.backing.clone();
        self.refuse_forwards();
        backing.dirty().start();
        self.stats.transfer_started();
        // Holes go as zero ranges and cost almost nothing: the estimate counts data only,
        // once the allocation map knows where it is.
        let map = backing.allocation();
        if map.is_built() {
            self.stats
                .data_total
                .store(map.allocated_bytes(), Ordering::Relaxed);
        }
        if let Ok(mut auto) = self.auto.lock() {
            if auto.is_some() {
                *auto = Some(AutoSwitch::new());
            }
        }
        if self.stats.is_active() {
            // Active from the start (`--mode active`, or an earlier attempt switched).
            backing.dirty().set_active(true);
        }
        if let Ok(mut bucket) = self.bucket.lock() {
            *bucket = rate::TokenBucket::new(Instant::now());
        }
        self.stats.set_phase(Phase::Sweep);
        self.sweep(&mut engine).await?;

        self.stats.set_phase(Phase::Copying);
        loop {
            let _ = self.serve_forwards(&mut engine).await?;
            let pending = backing.dirty().pending_bytes();
            self.stats.dirty.store(pending, Ordering::Relaxed);
            if !policy::another_pass(pending, self.stats.speed()) {
                break;
            }
            let pass_start = self
                .auto
                .lock()
                .ok()
                .and_then(|mut auto| auto.as_mut().and_then(|a| a.pass_starting(pending)));
            if let Some(reason) = pass_start {
                self.turn_active(reason);
            }
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let runs = backing.dirty().take(u64::MAX);
            self.send_pass(&mut engine, &runs).await?;
        }

        // Converged by flexnbd's rule. Send what is dirty now in catch-up passes while
        // clients still run (see `CatchUp`): the final pass, with the doors closed, then
        // only carries what was written during the last one, which keeps the pause clients
        // see short.
        let mut catch_up = CatchUp::new();
        while catch_up.another(|| backing.dirty().pending_bytes()) {
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let runs = backing.dirty().take(u64::MAX);
            self.send_pass(&mut engine, &runs).await?;
        }

        // Make the bulk durable on the destination while clients still run, so that the
        // sync at the hand-off only covers the final pass (it is part of the pause clients
        // see).
        if policy::flush_before_final_pass(engine.flags()) {
            self.abandonable(engine.flush()).await??;
        }

        // The final pass: no client may write any more once the doors are closed.
        if let Next::Stop { .. } = self.step(Step::CloseDoors).await {
            return Err(AttemptError::Abandoned);
        }
        self.stats.set_phase(Phase::FinalPass);
        engine.set_limit(policy::inactivity_limit(
            Stage::DoorsClosed,
            self.bulk_limit,
        ));
        self.close_doors(&mut engine).await?;
        // Forwards still queued belong to sessions that have ended (their grace ran out):
        // their writes were not acknowledged, but they are in the file; send them anyway.
        while self.serve_forwards(&mut engine).await? > 0 {}
        loop {
            let runs = backing.dirty().take(u64::MAX);
            if runs.is_empty() {
                break;
            }
            self.send_pass(&mut engine, &runs).await?;
        }
        self.stats.dirty.store(0, Ordering::Relaxed);
        self.abandonable(engine.drain()).await??;
        backing.dirty().stop();
        tracing::info!(
            "All data acknowledged: {} bytes sent as data, {} as zero ranges",
            self.stats.sent(),
            self.stats.zeroed()
        );
        self.hand_off(engine, ours).await
    }

    /// The whole export, extent by extent.
    async fn sweep(&self, engine: &mut Engine) -> Result<(), AttemptError> {
        let size = self.config.backing.size();
        let mut pos = 0u64;
        while pos < size {
            self.between_steps(engine).await?;
            let len = SWEEP_CHUNK.min(size - pos);
            let sent = self.send_range_counted(engine, pos, len, None).await?;
            pos += sent.covered;
            self.stats.swept.store(pos, Ordering::Relaxed);
            self.stats
                .swept_data
                .fetch_add(sent.data, Ordering::Relaxed);
            // Queued: from now on a forward of a write here goes out after it.
            self.config.backing.dirty().set_copied(pos);
        }
        Ok(())
    }

    /// One pass over `runs` (dirty ranges just taken), counted for `migration_progress`.
    async fn send_pass(
        &self,
        engine: &mut Engine,
        runs: &[(u64, u64)],
    ) -> Result<(), AttemptError> {
        self.stats
            .pass_started(runs.iter().map(|&(_, len)| len).sum());
        self.send_runs(engine, runs).await
    }

    /// The amount the copy reads and queues in one step (see [`ACTIVE_STEP`]).
    fn step_size(&self) -> usize {
        if self.config.backing.dirty().is_active() {
            ACTIVE_STEP
        } else {
            WRITE_SIZE
        }
    }

    /// Between two steps of the copy: `auto` mode looks at the progress, then the
    /// forwarded writes waiting are sent. Never called between reading a range and
    /// queueing it (see [`Run::serve_forwards`]).
    async fn between_steps(&self, engine: &mut Engine) -> Result<(), AttemptError> {
        self.stats
            .refresh_dirty(|| self.config.backing.dirty().pending_bytes());
        let stalled = self.auto.lock().ok().and_then(|mut auto| {
            auto.as_mut()
                .and_then(|a| a.observe(self.stats.bytes_left_now(), self.stats.elapsed()))
        });
        if let Some(reason) = stalled {
            self.turn_active(reason);
        }
        self.serve_forwards(engine).await.map(|_| ())
    }

    /// `auto` mode turns active, for the rest of the migration.
    fn turn_active(&self, reason: SwitchReason) {
        if let Ok(mut auto) = self.auto.lock() {
            *auto = None;
        }
        tracing::info!(
            "Migration {}: clients outrun the copy ({reason:?}); turning active: writes to copied ranges now reach the destination before they are answered",
            self.config.id
        );
        self.stats.set_active();
        self.config.backing.dirty().set_active(true);
    }

    /// Sends the forwarded writes waiting (at most [`FORWARD_BATCH`]), each read from the
    /// file now and queued at once, and each answering its session through an [`Ack`].
    ///
    /// Why reading here is right whatever the order forwards arrive in: the session wrote
    /// the file before it asked, so the data read here is at least as new as its write;
    /// and between this read and the queueing no other write to the destination is queued
    /// (this task is the only one that queues, and it does not serve forwards in the middle
    /// of a copy step). The engine never sends a write over an unanswered overlapping one,
    /// so the destination applies writes to a range in the order they were queued, and the
    /// last one queued holds the newest data.
    async fn serve_forwards(&self, engine: &mut Engine) -> Result<usize, AttemptError> {
        let batch = {
            let mut forwards = self.forwards.lock().await;
            let mut batch = Vec::new();
            while batch.len() < FORWARD_BATCH {
                match forwards.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let served = batch.len();
        let (small, large): (Vec<_>, Vec<_>) = batch.into_iter().partition(|r| r.len < SMALL_RUN);
        let ranges: Vec<(u64, u64)> = small.iter().map(|r| (r.offset, r.len)).collect();
        let pieces = self.read_ranges(ranges).await?;
        for (request, (offset, data)) in small.into_iter().zip(pieces) {
            self.count_forward(request.len);
            let ack = Ack::new(request.done);
            self.send_data(engine, offset, data, Some(&ack)).await?;
            ack.seal();
        }
        for request in large {
            self.forward_range(engine, request).await?;
        }
        Ok(served)
    }

    /// Forwards waiting now are refused: their sessions mark the ranges dirty.
    fn refuse_forwards(&self) {
        if let Ok(mut forwards) = self.forwards.try_lock() {
            while let Ok(request) = forwards.try_recv() {
                let _ = request.done.send(false);
            }
        }
    }

    /// Runs `future` while refusing every forward that arrives (no destination to send
    /// it to: between attempts, while connecting).
    async fn refusing_forwards<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(future);
        let mut forwards = self.forwards.lock().await;
        loop {
            tokio::select! {
                value = &mut future => return value,
                Some(request) = forwards.recv() => {
                    let _ = request.done.send(false);
                }
            }
        }
    }

    /// Closes the doors and waits until every session has ended, serving forwards
    /// meanwhile: a session ends only once its requests are answered, and a forwarded
    /// write is answered only once it has reached the destination.
    async fn close_doors(&self, engine: &mut Engine) -> Result<(), AttemptError> {
        enum Woken {
            Closed(Result<(), MailboxError>),
            Forward(ForwardRequest),
        }
        let close = self.config.listener.send(CloseDoors);
        tokio::pin!(close);
        loop {
            let woken = {
                let mut forwards = self.forwards.lock().await;
                tokio::select! {
                    closed = &mut close => Woken::Closed(closed),
                    Some(request) = forwards.recv() => Woken::Forward(request),
                    () = self.cancel.cancelled() => return Err(AttemptError::Abandoned),
                }
            };
            match woken {
                Woken::Closed(closed) => {
                    return closed
                        .map_err(|e| AttemptError::Transfer(format!("the listener is gone: {e}")))
                }
                Woken::Forward(request) => {
                    self.forward_range(engine, request).await?;
                    let _ = self.serve_forwards(engine).await?;
                }
            }
        }
    }

    /// Sends one forwarded range as the copy sends any range (holes as zero ranges), and
    /// answers its session through an [`Ack`] (see [`Run::serve_forwards`]).
    async fn forward_range(
        &self,
        engine: &mut Engine,
        request: ForwardRequest,
    ) -> Result<(), AttemptError> {
        self.count_forward(request.len);
        let ack = Ack::new(request.done);
        let mut done = 0;
        while done < request.len {
            let (at, left) = (request.offset + done, request.len - done);
            done += self.send_range(engine, at, left, Some(&ack)).await?;
        }
        ack.seal();
        Ok(())
    }

    fn count_forward(&self, len: u64) {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        self.stats.forwarded_bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// Sends dirty runs. Large runs go through [`Run::send_range`] (holes as zero ranges);
    /// small ones — typically scattered 4 KiB client writes — are read in batches, one
    /// blocking job per batch, without asking for extents: per-run overhead, not bandwidth,
    /// is what made a final pass of thousands of small runs slow. Between two steps, `auto`
    /// mode looks at the progress and forwarded writes go out.
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
                    self.between_steps(engine).await?;
                    let covered = self
                        .send_range(engine, offset + done, len - done, None)
                        .await?;
                    self.stats.pass_sent.fetch_add(covered, Ordering::Relaxed);
                    done += covered;
                }
                continue;
            }
            batch.push((offset, len));
            batched += len;
            if batched >= self.step_size() as u64 {
                self.between_steps(engine).await?;
                self.send_batch(engine, std::mem::take(&mut batch)).await?;
                batched = 0;
            }
        }
        if !batch.is_empty() {
            self.between_steps(engine).await?;
            self.send_batch(engine, batch).await?;
        }
        Ok(())
    }

    async fn send_batch(
        &self,
        engine: &mut Engine,
        batch: Vec<(u64, u64)>,
    ) -> Result<(), AttemptError> {
        for (offset, data) in self.read_ranges(batch).await? {
            let len = data.len() as u64;
            self.send_data(engine, offset, data, None).await?;
            self.stats.pass_sent.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `ranges` from the file in one blocking job.
    async fn read_ranges(
        &self,
        ranges: Vec<(u64, u64)>,
    ) -> Result<Vec<(u64, Bytes)>, AttemptError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let backing = self.config.backing.clone();
        tokio::task::spawn_blocking(move || {
            ranges
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
        .map_err(|e| AttemptError::Transfer(format!("reading the source failed: {e}")))
    }

    /// Sends `data` as WRITEs, each piece paced to the bandwidth limit before it is handed
    /// to the socket (see `crate::rate`); each piece answers `ack`.
    async fn send_data(
        &self,
        engine: &mut Engine,
        offset: u64,
        data: Bytes,
        ack: Option<&Ack>,
    ) -> Result<(), AttemptError> {
        let mut done = 0usize;
        while done < data.len() {
            let limit = self.stats.max_bps.load(Ordering::Relaxed);
            let n = (data.len() - done).min(rate::piece_size(limit, WRITE_SIZE as u64) as usize);
            self.pace(n as u64, limit).await?;
            let piece = data.slice(done..done + n);
            self.abandonable(engine.write(offset + done as u64, piece, ack))
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
        ack: Option<&Ack>,
    ) -> Result<(), AttemptError> {
        if self.zeroes_as_requests {
            return Ok(self.abandonable(engine.zeroes(offset, len, ack)).await??);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            let zeros = Bytes::from_static(&ZEROS[..n as usize]);
            self.send_data(engine, offset + done, zeros, ack).await?;
            done += n;
        }
        Ok(())
    }

    /// Sends `[offset, offset + len)` (or a first part of it): holes as zero ranges, data
    /// as writes read from the file now, one step (see [`Run::step_size`]) at most.
    /// Returns how much was covered.
    async fn send_range(
        &self,
        engine: &mut Engine,
        offset: u64,
        len: u64,
        ack: Option<&Ack>,
    ) -> Result<u64, AttemptError> {
        Ok(self
            .send_range_counted(engine, offset, len, ack)
            .await?
            .covered)
    }

    /// [`Run::send_range`], also saying how much of it went as data.
    async fn send_range_counted(
        &self,
        engine: &mut Engine,
        offset: u64,
        len: u64,
        ack: Option<&Ack>,
    ) -> Result<Sent, AttemptError> {
        let backing = self.config.backing.clone();
        let extents = tokio::task::spawn_blocking(move || backing.extents(offset, len, 1024))
            .await
            .map_err(|e| AttemptError::Transfer(e.to_string()))??;
        let step = self.step_size() as u64;
        let mut at = offset;
        let mut data_sent = 0;
        for extent in extents {
            if extent.hole {
                self.send_zeroes(engine, at, extent.length, ack).await?;
                at += extent.length;
                continue;
            }
            let n = extent.length.min(step);
            let data = self.read(at, n as usize).await?;
            self.send_data(engine, at, data, ack).await?;
            at += n;
            data_sent += n;
            if n < extent.length {
                break;
            }
        }
        Ok(Sent {
            covered: (at - offset).max(1).min(len),
            data: data_sent,
        })
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
        engine.set_limit(policy::inactivity_limit(Stage::Prepare, self.bulk_limit));
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
        engine.set_limit(policy::inactivity_limit(
            Stage::DoorsClosed,
            self.bulk_limit,
        ));
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

/// Connects to the destination and runs the handshake, checking the size: the first
/// attempt's result comes from here.
async fn connect_destination(
    request: &crate::protocol::control::MirrorRequest,
    tls: Option<Arc<crate::tls::ClientTls>>,
    size: u64,
) -> Result<client::Connection, AttemptError> {
    let target = SocketAddr::new(request.addr, request.port);
    let options = ConnectOptions {
        bind: request.bind,
        connect_timeout: CONNECT_TIMEOUT,
        hello_timeout: HELLO_TIMEOUT,
        link: LinkOptions {
            keepalive_idle: KEEPALIVE_IDLE,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_probes: KEEPALIVE_PROBES,
            user_timeout: LINK_TIMEOUT,
        },
        export: String::new(),
        tls,
    };
    let connection = client::connect(target, &options).await?;
    let remote_size = connection.export.size;
    if remote_size != size {
        return Err(AttemptError::Connect(
            FirstFailure::SizeMismatch,
            format!("{target} exports {remote_size} bytes, we have {size}"),
        ));
    }
    Ok(connection)
}
