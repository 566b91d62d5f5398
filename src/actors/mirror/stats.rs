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
    /// When the migration (its first attempt) started (process milliseconds; 0: not yet).
    migration_started_ms: AtomicU64,
    /// When the mirror turned active (process milliseconds; 0: background). Kept across
    /// attempts: once clients have shown they outrun the copy, later attempts start active.
    active_since_ms: AtomicU64,
    /// Dirty bytes the current pass took, and how many of them have been queued.
    pub(super) pass_total: AtomicU64,
    pub(super) pass_sent: AtomicU64,
    /// Client writes forwarded to the destination (active mode), and their bytes.
    pub(super) forwarded: AtomicU64,
    pub(super) forwarded_bytes: AtomicU64,
    /// When `dirty` was last refreshed during a pass (process milliseconds).
    dirty_refreshed_ms: AtomicU64,
    /// Data bytes in the export when this attempt's sweep started (holes excluded: they
    /// go as zero ranges and cost almost nothing); the export's size when the allocation
    /// map was not built yet.
    pub(super) data_total: AtomicU64,
    /// Data bytes the sweep has queued so far.
    pub(super) swept_data: AtomicU64,
}

/// How often the dirty bytes shown are recomputed during a pass (a scan of the map).
const DIRTY_REFRESH: Duration = Duration::from_millis(250);

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
            migration_started_ms: AtomicU64::new(0),
            active_since_ms: AtomicU64::new(0),
            pass_total: AtomicU64::new(0),
            pass_sent: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            dirty_refreshed_ms: AtomicU64::new(0),
            data_total: AtomicU64::new(size),
            swept_data: AtomicU64::new(0),
        }
    }

    /// The transfer of an attempt starts now.
    pub(super) fn transfer_started(&self) {
        let now = process_ms();
        self.started_ms.store(now, Ordering::Relaxed);
        let _ = self.migration_started_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// The mirror turned active (write-blocking); the first call counts.
    pub(super) fn set_active(&self) {
        let _ = self.active_since_ms.compare_exchange(
            0,
            process_ms(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    pub fn is_active(&self) -> bool {
        self.active_since_ms.load(Ordering::Relaxed) != 0
    }

    /// Updates the dirty bytes shown while a pass runs: what the pass has still to send
    /// plus what clients dirtied since it started (`pending`, which scans the map: at most
    /// every [`DIRTY_REFRESH`]).
    pub(super) fn refresh_dirty(&self, pending: impl FnOnce() -> u64) {
        let now = process_ms();
        let last = self.dirty_refreshed_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < DIRTY_REFRESH.as_millis() as u64 {
            return;
        }
        self.dirty_refreshed_ms.store(now, Ordering::Relaxed);
        let left_in_pass = self
            .pass_total
            .load(Ordering::Relaxed)
            .saturating_sub(self.pass_sent.load(Ordering::Relaxed));
        // A block taken by this pass and dirtied again since counts twice here: never
        // report more than the export.
        let dirty = (left_in_pass + pending()).min(self.size);
        self.dirty.store(dirty, Ordering::Relaxed);
    }

    /// A pass starts with `dirty` bytes to send.
    pub(super) fn pass_started(&self, dirty: u64) {
        self.pass_total.store(dirty, Ordering::Relaxed);
        self.pass_sent.store(0, Ordering::Relaxed);
    }

    /// Seconds since the transfer of the current attempt started.
    pub(super) fn elapsed(&self) -> Duration {
        Duration::from_millis(self.elapsed_ms())
    }

    /// Bytes not yet swept plus dirty bytes as of the last look: what `auto` mode watches.
    pub(super) fn bytes_left_now(&self) -> u64 {
        self.bytes_left()
    }

    /// `migration_progress`: during the sweep the percent of the export copied at least
    /// once, afterwards the percent of the current pass's dirty data sent.
    pub fn progress_percent(&self) -> u64 {
        let percent = |part: u64, whole: u64| {
            if whole == 0 {
                100
            } else {
                (u128::from(part.min(whole)) * 100 / u128::from(whole)) as u64
            }
        };
        match self.phase() {
            Phase::Connecting | Phase::Retrying => 0,
            Phase::Sweep => percent(self.swept.load(Ordering::Relaxed), self.size),
            Phase::Copying | Phase::FinalPass => percent(
                self.pass_sent.load(Ordering::Relaxed),
                self.pass_total.load(Ordering::Relaxed),
            ),
            Phase::HandingOff | Phase::InDoubt | Phase::Completed => 100,
            Phase::Abandoned => percent(self.swept.load(Ordering::Relaxed), self.size),
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

    /// Why the last attempt failed, if one did.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().ok().and_then(|f| f.clone())
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
        self.pass_total.store(0, Ordering::Relaxed);
        self.pass_sent.store(0, Ordering::Relaxed);
        self.data_total.store(self.size, Ordering::Relaxed);
        self.swept_data.store(0, Ordering::Relaxed);
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

    /// Bytes that still have to cross the wire as data: what the sweep has not reached
    /// yet, holes excluded, plus what is dirty.
    fn bytes_left(&self) -> u64 {
        let unswept = self.size.saturating_sub(self.swept.load(Ordering::Relaxed));
        let unswept_data = self
            .data_total
            .load(Ordering::Relaxed)
            .saturating_sub(self.swept_data.load(Ordering::Relaxed))
            .min(unswept);
        self.dirty.load(Ordering::Relaxed) + unswept_data
    }

    /// The migration keys of the status line (flexnbd §7).
    pub fn status(&self) -> MigrationStatus {
        let speed = self.speed();
        let bytes_left = self.bytes_left();
        let limit = self.max_bps.load(Ordering::Relaxed);
        MigrationStatus {
            speed,
            duration_secs: self.elapsed_ms() / 1000,
            // No rate yet, no estimate (flexnbd's formula gave the bytes left as seconds).
            seconds_left: (speed > 0).then(|| policy::seconds_left(bytes_left, speed)),
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
        let mode = if self.is_active() {
            "active"
        } else {
            "background"
        };
        keys.push(("migration_mode", mode.to_owned()));
        keys.push(("migration_progress", self.progress_percent().to_string()));
        let (started, active) = (
            self.migration_started_ms.load(Ordering::Relaxed),
            self.active_since_ms.load(Ordering::Relaxed),
        );
        if active != 0 {
            let since = match started {
                0 => 0,
                started => active.saturating_sub(started) / 1000,
            };
            keys.push(("migration_active_since", since.to_string()));
        }
        keys.push((
            "migration_forwarded_writes",
            self.forwarded.load(Ordering::Relaxed).to_string(),
        ));
        keys.push((
            "migration_forwarded_bytes",
            self.forwarded_bytes.load(Ordering::Relaxed).to_string(),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_estimate_counts_data_only_and_waits_for_a_rate() {
        let stats = MirrorStats::new(1024 * MIB, u64::MAX);
        stats.start_attempt(1);
        stats.transfer_started();
        // 300 MiB of data in a 1 GiB export; the sweep is at 512 MiB and has sent 200.
        stats.data_total.store(300 * MIB, Ordering::Relaxed);
        stats.swept.store(512 * MIB, Ordering::Relaxed);
        stats.swept_data.store(200 * MIB, Ordering::Relaxed);
        stats.dirty.store(8 * MIB, Ordering::Relaxed);
        let status = stats.status();
        assert_eq!(
            status.bytes_left,
            108 * MIB,
            "100 MiB unswept data + 8 dirty"
        );
        assert_eq!(status.speed, 0);
        assert_eq!(status.seconds_left, None, "no rate yet: no estimate");
        // More data left than the sweep has still to cover: the unswept part bounds it.
        stats.swept.store(1000 * MIB, Ordering::Relaxed);
        assert_eq!(stats.status().bytes_left, 24 * MIB + 8 * MIB);
    }

    #[test]
    fn the_dirty_bytes_shown_never_exceed_the_export() {
        let stats = MirrorStats::new(32 * MIB, u64::MAX);
        stats.pass_started(32 * MIB);
        stats.refresh_dirty(|| 30 * MIB);
        assert_eq!(stats.dirty.load(Ordering::Relaxed), 32 * MIB);
    }
}
