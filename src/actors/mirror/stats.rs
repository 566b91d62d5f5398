//! A migration's progress as `status` shows it: [`Phase`] and [`MirrorStats`] (flexnbd's
//! migration keys, then ours).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::client::Acknowledged;
use crate::protocol::control::MigrationStatus;
use crate::protocol::handoff::source::SourceHandoff;
use crate::rate;

use super::policy;

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
    pub(super) fn from_u8(value: u8) -> Phase {
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

/// Milliseconds since the process's first look (never 0, which means "not yet").
pub(super) fn process_ms() -> u64 {
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
    pub(super) started_ms: AtomicU64,
    /// How far the sweep got; `size` once it is done.
    pub(super) swept: AtomicU64,
    /// Bytes acknowledged by the destination in this attempt: data (WRITEs), and zero
    /// ranges (holes that did not cross the wire as data). The connection counts them.
    acked: Arc<Acknowledged>,
    pub(super) passes: AtomicU64,
    pub(super) max_bps: AtomicU64,
    /// Dirty bytes waiting, as of the last look.
    pub(super) dirty: AtomicU64,
    /// Published by the actor after every hand-off step: this side is authoritative.
    has_control: AtomicBool,
    /// The hand-off state machine's phase name, published with `has_control`.
    handoff_phase: Mutex<&'static str>,
    /// Why the last attempt failed (for example the destination's ENOSPC).
    last_failure: Mutex<Option<String>>,
}

impl MirrorStats {
    pub(super) fn new(size: u64, max_bps: u64) -> MirrorStats {
        MirrorStats {
            size,
            phase: AtomicU8::new(Phase::Connecting as u8),
            attempt: AtomicU64::new(0),
            started_ms: AtomicU64::new(0),
            swept: AtomicU64::new(0),
            acked: Arc::default(),
            passes: AtomicU64::new(0),
            max_bps: AtomicU64::new(max_bps),
            dirty: AtomicU64::new(0),
            has_control: AtomicBool::new(true),
            handoff_phase: Mutex::new("serving"),
            last_failure: Mutex::new(None),
        }
    }

    pub(super) fn set_phase(&self, phase: Phase) {
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

    pub(super) fn publish_handoff(&self, handoff: &SourceHandoff) {
        self.has_control
            .store(handoff.has_control(), Ordering::SeqCst);
        if let Ok(mut phase) = self.handoff_phase.lock() {
            *phase = handoff.phase().name();
        }
    }

    pub(super) fn record_failure(&self, why: &str) {
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(why.to_owned());
        }
    }

    pub(super) fn start_attempt(&self, attempt: u64) {
        self.attempt.store(attempt, Ordering::Relaxed);
        self.started_ms.store(0, Ordering::Relaxed);
        self.swept.store(0, Ordering::Relaxed);
        self.acked.reset();
        self.passes.store(0, Ordering::Relaxed);
        self.dirty.store(0, Ordering::Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        match self.started_ms.load(Ordering::Relaxed) {
            0 => 0,
            start => process_ms().saturating_sub(start),
        }
    }

    /// Where the connection counts acknowledged bytes.
    pub(super) fn acked(&self) -> Arc<Acknowledged> {
        self.acked.clone()
    }

    /// Data bytes acknowledged in this attempt.
    pub(super) fn sent(&self) -> u64 {
        self.acked.data()
    }

    /// Zero-range bytes acknowledged in this attempt.
    pub(super) fn zeroed(&self) -> u64 {
        self.acked.zeroed()
    }

    /// flexnbd's speed: bytes sent / (elapsed seconds + 1).
    pub(super) fn speed(&self) -> u64 {
        policy::speed(self.sent(), Duration::from_millis(self.elapsed_ms()))
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
            seconds_left: policy::seconds_left(bytes_left, speed),
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
            ("migration_bytes_sent", self.sent().to_string()),
            ("migration_bytes_zeroed", self.zeroed().to_string()),
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
