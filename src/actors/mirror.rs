//! The mirror: one outbound migration (flexnbd §10, design notes §1 and §4).
//!
//! A migration runs in attempts. Each attempt connects to the destination (old-style or
//! fixed new-style), sweeps the whole export — holes as zero-range requests where the
//! destination takes them, data as WRITEs — then sends the blocks that clients dirtied
//! meanwhile, pass after pass, until the estimated time left is under 5 s. Then the final
//! pass: the listener closes the doors and waits until every session has ended (a message
//! handshake, no I/O lock), the last dirty blocks go out, and the hand-off follows:
//! acknowledged between two of our servers, flexnbd's bare DISC otherwise. A failure after
//! the first successful connection reopens the doors and retries from scratch a second
//! later; `break` (or a signal) abandons.
//!
//! # Handshakes
//! - [`SetMaxBps`] (control → mirror): new bandwidth limit; answered at once.
//! - [`Abandon`] (control → mirror, `break` or shutdown): stop at the next step, reopen the
//!   doors (unless the hand-off is in doubt after the source file was removed), answered
//!   once the migration has stopped, with whether it had already completed.
//! - [`MirrorEnded`] (mirror → control): the migration ended by itself (first attempt
//!   failed, completed, or failed fatally); control ends the registration as flexnbd §6.4
//!   requires.
//! - [`CloseDoors`] / [`OpenDoors`] (mirror → listener): see the listener.
//! - [`ServerEvent`] (mirror → main): `MigrationSent` after a completed `exit`/`unlink`
//!   hand-off, `MigrationFatal` when this server can no longer serve its copy.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
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
use crate::protocol::handoff::{
    HandoffReply, HandoffRequest, MigrationId, HANDOFF, MAX_MESSAGE, PROBE,
};
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::reply::decode_simple_reply;
use crate::protocol::request::HeaderStyle;
use crate::protocol::{tflags, Command, Request, OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};
use crate::storage::Backing;

use super::listener::{CloseDoors, Listener, OpenDoors};
use super::{Events, ServerEvent};

/// TCP connect timeout (flexnbd §10.10).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The whole hello (or new-style negotiation) must arrive within this (flexnbd §10.2).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-transfer inactivity limit (`FLEXNBD_MS_REQUEST_LIMIT_SECS` overrides it).
const REQUEST_LIMIT: Duration = Duration::from_secs(60);
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
    /// Prepared was acknowledged but Commit not (yet): neither side serves writes.
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
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
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
            speed_limit: (limit != u64::MAX).then_some(limit),
        }
    }

    /// Our own keys, after flexnbd's.
    pub fn extra(&self) -> Vec<(&'static str, String)> {
        vec![
            ("migration_phase", self.phase().name().to_owned()),
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
        ]
    }
}

/// Why the first attempt failed, with flexnbd's exact response texts (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstFailure {
    Connect,
    Rejected,
    NoHello,
    SizeMismatch,
    Abandoned,
}

impl FirstFailure {
    pub fn text(self) -> &'static str {
        match self {
            FirstFailure::Connect => "Mirror failed to connect",
            FirstFailure::Rejected => "Mirror was rejected",
            FirstFailure::NoHello => "Remote server failed to respond",
            FirstFailure::SizeMismatch => "Remote size does not match local size",
            FirstFailure::Abandoned => "Mirroring abandoned",
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
    /// or was removed and the hand-off is in doubt).
    Fatal(String),
}

/// Control → mirror: a new bandwidth limit (bytes per second; `u64::MAX`: none).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SetMaxBps(pub u64);

/// Control → mirror: stop. Answered once stopped: true if the migration had completed.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct Abandon;

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
    cancel: CancellationToken,
    first: Option<oneshot::Sender<Result<(), FirstFailure>>>,
    outcome: Option<Outcome>,
    /// Abandon requests waiting for the migration to stop.
    waiters: Vec<oneshot::Sender<bool>>,
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
            cancel: CancellationToken::new(),
            first: Some(first),
            outcome: None,
            waiters: Vec::new(),
        }
    }

    pub fn stats(&self) -> Arc<MirrorStats> {
        self.stats.clone()
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
            unlinked: false,
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
            let completed = matches!(outcome, Outcome::Completed(_));
            for waiter in act.waiters.drain(..) {
                let _ = waiter.send(completed);
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
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, _msg: Abandon, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(outcome) = &self.outcome {
            let completed = matches!(outcome, Outcome::Completed(_));
            return Box::pin(async move { completed });
        }
        self.cancel.cancel();
        let (tx, rx) = oneshot::channel();
        self.waiters.push(tx);
        Box::pin(async move { rx.await.unwrap_or(false) })
    }
}

/// Why an attempt ended early.
#[derive(Debug)]
enum AttemptError {
    /// Before the transfer: the first attempt reports it.
    Connect(FirstFailure, String),
    /// During the transfer or the hand-off: retried.
    Transfer(String),
    Abandoned,
    /// Not retried: see [`Outcome::Fatal`].
    Fatal(String),
}

impl From<io::Error> for AttemptError {
    fn from(e: io::Error) -> AttemptError {
        AttemptError::Transfer(e.to_string())
    }
}

/// One migration's task.
struct Run {
    config: MirrorConfig,
    stats: Arc<MirrorStats>,
    cancel: CancellationToken,
    first: Option<oneshot::Sender<Result<(), FirstFailure>>>,
    /// The source file has been removed (action `unlink`): this server can never serve its
    /// copy again.
    unlinked: bool,
}

impl Run {
    async fn run(mut self) -> Outcome {
        let target = SocketAddr::new(self.config.request.addr, self.config.request.port);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            self.stats.start_attempt(attempt);
            self.stats.set_phase(Phase::Connecting);
            tracing::info!(
                "Migration {} to {target}: attempt {attempt}",
                self.config.id
            );
            let result = self.attempt().await;
            // Reopening the doors is explicit on each path: after a completed exit/unlink
            // hand-off, or when this server can no longer serve its copy, they stay closed.
            let doors = || self.config.listener.send(OpenDoors);
            match result {
                Ok(action) => {
                    self.stats.set_phase(Phase::Completed);
                    if action == MirrorAction::Nothing {
                        let _ = doors().await;
                    }
                    return Outcome::Completed(action);
                }
                Err(AttemptError::Connect(failure, why)) if self.first.is_some() => {
                    tracing::error!("Migration to {target} failed: {why}");
                    self.report_first(Err(failure));
                    return Outcome::FirstAttemptFailed(failure);
                }
                Err(AttemptError::Abandoned) => {
                    self.config.backing.dirty().stop();
                    self.stats.set_phase(Phase::Abandoned);
                    if self.unlinked {
                        return Outcome::Fatal(
                            "the migration was abandoned after the source file was removed".into(),
                        );
                    }
                    let _ = doors().await;
                    self.report_first(Err(FirstFailure::Abandoned));
                    return Outcome::Abandoned;
                }
                Err(AttemptError::Fatal(why)) => {
                    self.config.backing.dirty().stop();
                    tracing::error!("Migration to {target} failed: {why}");
                    return Outcome::Fatal(why);
                }
                Err(AttemptError::Connect(_, why) | AttemptError::Transfer(why)) => {
                    self.config.backing.dirty().stop();
                    let _ = doors().await;
                    self.stats.set_phase(Phase::Retrying);
                    tracing::warn!(
                        "Migration attempt {attempt} to {target} failed: {why}; retrying in {RETRY_DELAY:?}"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                        () = self.cancel.cancelled() => {
                            self.stats.set_phase(Phase::Abandoned);
                            return Outcome::Abandoned;
                        }
                    }
                }
            }
        }
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

    async fn attempt(&mut self) -> Result<MirrorAction, AttemptError> {
        let request = self.config.request.clone();
        let destination = self
            .abandonable(Destination::connect(&request, self.config.backing.size()))
            .await??;
        self.report_first(Ok(()));
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
        let mut engine = Engine::start(destination, self.stats.clone(), self.cancel.clone());
        let ours = self.abandonable(engine.probe()).await??;
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
        self.stats.set_phase(Phase::FinalPass);
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
        self.hand_off(engine, ours).await?;
        Ok(self.config.request.action)
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
        self.throttle().await?;
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
            self.abandonable(engine.write(offset, data)).await??;
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
                self.abandonable(engine.zeroes(at, extent.length)).await??;
            } else {
                let mut done = 0;
                while done < extent.length {
                    let n = (extent.length - done).min(WRITE_SIZE as u64);
                    self.throttle().await?;
                    let data = self.read(at + done, n as usize).await?;
                    self.abandonable(engine.write(at + done, data)).await??;
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

    /// Keeps the attempt's average speed under the limit (flexnbd §10.9).
    async fn throttle(&self) -> Result<(), AttemptError> {
        let limit = self.stats.max_bps.load(Ordering::Relaxed);
        if limit == u64::MAX || limit == 0 {
            return Ok(());
        }
        let allowed = limit as f64 * self.stats.elapsed_ms() as f64 / 1000.0;
        let sent = self.stats.sent.load(Ordering::Relaxed) as f64;
        if sent > allowed {
            let wait = Duration::from_secs_f64(((sent - allowed) / limit as f64).min(1.0));
            self.abandonable(tokio::time::sleep(wait)).await?;
        }
        Ok(())
    }

    async fn hand_off(&mut self, mut engine: Engine, ours: bool) -> Result<(), AttemptError> {
        let action = self.config.request.action;
        if action == MirrorAction::Nothing {
            return Ok(());
        }
        self.stats.set_phase(Phase::HandingOff);
        if !ours {
            // flexnbd's hand-off: unlink first (the --unlink guarantee), then a bare DISC.
            self.unlink_if_asked()?;
            engine.disconnect().await.map_err(|e| {
                AttemptError::Fatal(format!("sending the final DISCONNECT failed: {e}"))
            })?;
            return Ok(());
        }
        let id = self.config.id;
        let size = self.config.backing.size();
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
        tracing::info!("The destination made everything durable (migration {id})");
        self.unlink_if_asked()?;
        self.stats.set_phase(Phase::InDoubt);
        let mut engine = Some(engine);
        loop {
            let result = match engine.as_mut() {
                Some(e) => e.handoff(HandoffRequest::Commit { id }).await,
                None => Err(AttemptError::Transfer("not connected".into())),
            };
            match result {
                Ok(HandoffReply::Committed { id: got }) if got == id => {
                    tracing::info!("The destination has taken control (migration {id})");
                    return Ok(());
                }
                Ok(other) => {
                    return Err(AttemptError::Fatal(format!(
                        "the destination answered {other:?} to Commit; the hand-off is in doubt"
                    )))
                }
                Err(AttemptError::Abandoned) => return Err(AttemptError::Abandoned),
                Err(e) => {
                    // The link broke between Prepared and Committed: in doubt. Reconnect and
                    // resend Commit (the destination answers a resend alike) until it is
                    // acknowledged or an operator runs `break`.
                    tracing::error!(
                        "Migration {id} is in doubt ({e:?}): the destination made the data durable but did not confirm taking control; retrying the commit every {RETRY_DELAY:?}"
                    );
                    engine = None;
                    self.abandonable(tokio::time::sleep(RETRY_DELAY)).await?;
                    let request = self.config.request.clone();
                    if let Ok(Ok(destination)) =
                        self.abandonable(Destination::connect(&request, size)).await
                    {
                        let mut fresh =
                            Engine::start(destination, self.stats.clone(), self.cancel.clone());
                        if let Ok(true) = fresh.probe().await {
                            engine = Some(fresh);
                        }
                    }
                }
            }
        }
    }

    fn unlink_if_asked(&mut self) -> Result<(), AttemptError> {
        if self.config.request.action != MirrorAction::Unlink {
            return Ok(());
        }
        let path = self.config.backing.path().to_owned();
        std::fs::remove_file(&path).map_err(|e| {
            AttemptError::Fatal(format!(
                "couldn't remove the source file {} ({e}); not handing over: the source copy stays authoritative",
                path.display()
            ))
        })?;
        self.unlinked = true;
        tracing::info!("Removed the source file {}", path.display());
        Ok(())
    }
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
        let handshake = tokio::time::timeout(HELLO_TIMEOUT, Self::handshake(&mut stream));
        let (remote_size, flags, newstyle) = match handshake.await {
            Ok(result) => result?,
            Err(_) => {
                return Err(AttemptError::Connect(
                    FirstFailure::NoHello,
                    format!("{target} sent no complete hello within {HELLO_TIMEOUT:?}"),
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

    async fn handshake(stream: &mut TcpStream) -> Result<(u64, u16, bool), AttemptError> {
        let rejected = |why: String| AttemptError::Connect(FirstFailure::Rejected, why);
        let mut first = [0u8; 16];
        stream
            .read_exact(&mut first)
            .await
            .map_err(|e| rejected(format!("reading the hello failed: {e}")))?;
        match client::classify(&first).map_err(|e| rejected(e.to_string()))? {
            Greeting::Oldstyle => {
                let mut hello = [0u8; OLDSTYLE_HELLO_LEN];
                hello[..16].copy_from_slice(&first);
                stream
                    .read_exact(&mut hello[16..])
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

/// What a request in flight is waiting for.
enum Pending {
    /// A write or zero range: counted once acknowledged.
    Transfer {
        len: u64,
        data: bool,
        _slot: OwnedSemaphorePermit,
    },
    Probe(oneshot::Sender<u32>),
    Handoff(oneshot::Sender<Result<HandoffReply, String>>),
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
    ) -> Engine {
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
        }
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
        let write = async {
            self.writer.write_all(&header).await?;
            if !payload.is_empty() {
                self.writer.write_all(payload).await?;
            }
            io::Result::Ok(())
        };
        tokio::select! {
            result = tokio::time::timeout(request_limit(), write) => match result {
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

    async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), AttemptError> {
        let slot = self.slot().await?;
        let len = data.len() as u64;
        self.send(
            Command::Write,
            offset,
            len,
            &data,
            Pending::Transfer {
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
            let slot = self.slot().await?;
            if self.zeroes_as_requests {
                let n = (len - done).min(ZERO_SIZE);
                self.send(
                    Command::WriteZeroes,
                    offset + done,
                    n,
                    &[],
                    Pending::Transfer {
                        len: n,
                        data: false,
                        _slot: slot,
                    },
                )
                .await?;
                done += n;
            } else {
                let n = (len - done).min(ZEROS.len() as u64);
                self.send(
                    Command::Write,
                    offset + done,
                    n,
                    &ZEROS[..n as usize],
                    Pending::Transfer {
                        len: n,
                        data: true,
                        _slot: slot,
                    },
                )
                .await?;
                done += n;
            }
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
                len: 0,
                data: false,
                _slot: slot,
            },
        )
        .await?;
        self.drain().await
    }

    /// Asks whether the destination is ours: C flexnbd answers EINVAL.
    async fn probe(&mut self) -> Result<bool, AttemptError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unknown(PROBE), 0, 0, &[], Pending::Probe(tx))
            .await?;
        tokio::select! {
            answer = rx => answer.map(|error| error == 0).map_err(|_| self.failure()),
            () = self.failed.cancelled() => Err(self.failure()),
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

fn request_limit() -> Duration {
    std::env::var("FLEXNBD_MS_REQUEST_LIMIT_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(REQUEST_LIMIT)
}

/// What the reply reader shares with the engine.
struct Replies {
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    stats: Arc<MirrorStats>,
    failed: CancellationToken,
    failure: Arc<Mutex<Option<String>>>,
    activity: Arc<AtomicU64>,
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
async fn fill(
    reader: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    n: usize,
    shared: &Replies,
) -> Result<(), String> {
    let limit = request_limit();
    while buf.len() < n {
        tokio::select! {
            read = reader.read_buf(buf) => match read {
                Ok(0) => return Err("the connection to the destination ended".into()),
                Ok(_) => shared.activity.store(process_ms(), Ordering::Relaxed),
                Err(e) => return Err(format!("reading from the destination failed: {e}")),
            },
            () = tokio::time::sleep(TICK) => {
                let idle = process_ms().saturating_sub(shared.activity.load(Ordering::Relaxed));
                if shared.outstanding() && idle > limit.as_millis() as u64 {
                    return Err(format!("the destination answered nothing for {limit:?}"));
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
        if let Err(why) = fill(&mut reader, &mut buf, SIMPLE_REPLY_LEN, &shared).await {
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
                // The answer follows: its length, then the encoded reply.
                let body = async {
                    fill(&mut reader, &mut buf, 4, &shared).await?;
                    let n = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                    if n > MAX_MESSAGE {
                        return Err("the hand-off answer is too long".to_owned());
                    }
                    fill(&mut reader, &mut buf, 4 + n, &shared).await?;
                    let _ = buf.split_to(4);
                    Ok(buf.split_to(n))
                };
                match body.await {
                    Ok(bytes) => {
                        let _ = tx.send(HandoffReply::decode(&bytes).map_err(|e| e.to_string()));
                    }
                    Err(why) => {
                        shared.fail(format!("reading the hand-off answer failed: {why}"));
                        return;
                    }
                }
            }
        }
    }
}
