//! The migration's decisions, pure: no I/O, no actix, no clock (time comes in as a value).
//!
//! The migration task (`run`) asks, in this order, while the doors are open:
//! 1. after the sweep, pass after pass: [`another_pass`] (flexnbd's convergence rule, §10:
//!    the dirty bytes would take 5 s or more at [`speed`]);
//! 2. once converged, [`CatchUp::another`] (at most [`CATCH_UP_PASSES`], each leaving less
//!    behind than the one before);
//! 3. once that says no, the doors close: [`flush_before_final_pass`] first, then the final
//!    pass under [`Stage::DoorsClosed`]'s inactivity limit.

use std::time::Duration;

use crate::protocol::tflags;

/// The final pass starts once the estimated time left is below this.
pub const CONVERGE: Duration = Duration::from_secs(5);
/// Catch-up passes at most between convergence and the final pass.
pub const CATCH_UP_PASSES: usize = 4;
/// Inactivity limit of the bulk copy (sweep and passes, doors open): flexnbd's per-transfer
/// limit. `FLEXNBD_MS_REQUEST_LIMIT_SECS` overrides it, as in C.
pub const BULK_LIMIT: Duration = Duration::from_secs(60);
/// Inactivity limit once the doors are closed (final pass, Prepare, Commit): every second
/// is an outage for every client, so a stuck destination is given up quickly and the doors
/// reopen. A dead link is usually noticed sooner, by TCP (see `run::LINK_TIMEOUT`).
pub const HANDOFF_LIMIT: Duration = Duration::from_secs(5);
/// A Prepare makes the final pass durable on the destination (`fdatasync`): it may take
/// longer than a request.
pub const PREPARE_LIMIT: Duration = Duration::from_secs(10);

/// In `auto` mode, how long the estimate may go without improving before the mirror turns
/// active.
pub const STALL: Duration = Duration::from_secs(5);

/// `auto` mode's decision to turn active (write-blocking). Background copying converges
/// only while clients dirty the export slower than the mirror copies it; once that is
/// visibly not the case, waiting longer only makes the final pass bigger. Two signs, either
/// of which switches (for the rest of the migration):
/// - a pass did not shrink the dirty set (what was dirty when it started is still dirty,
///   or more);
/// - the bytes left (not yet swept, plus dirty) have not reached a new low for [`STALL`]:
///   clients dirty as fast as the mirror sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoSwitch {
    /// The lowest bytes-left seen, and when.
    best: Option<(u64, Duration)>,
    /// The dirty bytes when the last pass started.
    pass_start: Option<u64>,
}

/// Why `auto` mode turned active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchReason {
    /// A pass left at least as much dirty as it started with.
    PassDidNotShrink { before: u64, after: u64 },
    /// The bytes left have not improved for [`STALL`].
    Stalled { bytes_left: u64 },
}

impl Default for AutoSwitch {
    fn default() -> AutoSwitch {
        AutoSwitch::new()
    }
}

impl AutoSwitch {
    pub fn new() -> AutoSwitch {
        AutoSwitch {
            best: None,
            pass_start: None,
        }
    }

    /// The bytes left at time `now` (time since the attempt started): whether they have
    /// stalled.
    pub fn observe(&mut self, bytes_left: u64, now: Duration) -> Option<SwitchReason> {
        match self.best {
            Some((best, _)) if bytes_left >= best => {}
            _ => {
                self.best = Some((bytes_left, now));
                return None;
            }
        }
        let (_, since) = self.best?;
        (bytes_left > 0 && now.saturating_sub(since) >= STALL)
            .then_some(SwitchReason::Stalled { bytes_left })
    }

    /// A pass is about to start with `dirty` bytes: whether the previous pass shrank the
    /// dirty set.
    pub fn pass_starting(&mut self, dirty: u64) -> Option<SwitchReason> {
        let before = self.pass_start.replace(dirty)?;
        (dirty > 0 && dirty >= before).then_some(SwitchReason::PassDidNotShrink {
            before,
            after: dirty,
        })
    }
}

/// flexnbd's speed: bytes acknowledged / (whole seconds elapsed + 1).
pub fn speed(acknowledged: u64, elapsed: Duration) -> u64 {
    acknowledged / (elapsed.as_secs() + 1)
}

/// flexnbd's estimate of the time left, in seconds: `bytes_left / (speed + 1)`.
pub fn seconds_left(bytes_left: u64, speed: u64) -> u64 {
    bytes_left / (speed + 1)
}

/// Whether the copy needs another pass before it has converged: dirty bytes are `pending`
/// and the speed so far `speed`. Converged once nothing is dirty or it would take less than
/// [`CONVERGE`].
pub fn another_pass(pending: u64, speed: u64) -> bool {
    !(pending == 0 || seconds_left(pending, speed) < CONVERGE.as_secs())
}

/// The catch-up passes after convergence, while clients still run: each sends what is dirty,
/// as long as it is less than what the previous one sent, at most [`CATCH_UP_PASSES`]. The
/// final pass, with the doors closed, then only carries what was written during the last one
/// (the 5 s rule alone would let up to 5 s of data go out inside the pause clients see).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUp {
    passes: usize,
    previous: u64,
    /// It said no once: the doors close.
    over: bool,
}

impl Default for CatchUp {
    fn default() -> CatchUp {
        CatchUp::new()
    }
}

impl CatchUp {
    pub fn new() -> CatchUp {
        CatchUp {
            passes: 0,
            previous: u64::MAX,
            over: false,
        }
    }

    /// Whether to send another catch-up pass. `pending` (the dirty bytes now) is only asked
    /// while passes remain. Once this says no, the doors close.
    pub fn another(&mut self, pending: impl FnOnce() -> u64) -> bool {
        if self.over || self.passes >= CATCH_UP_PASSES {
            self.over = true;
            return false;
        }
        let pending = pending();
        if pending == 0 || pending >= self.previous {
            self.over = true;
            return false;
        }
        self.previous = pending;
        self.passes += 1;
        true
    }

    /// Catch-up passes sent so far.
    pub fn passes(&self) -> usize {
        self.passes
    }
}

/// Whether to make the bulk durable on the destination (NBD FLUSH) before the doors close,
/// so that the sync at the hand-off (inside the pause clients see) only covers the final
/// pass. Every destination advertises FLUSH (flexnbd's flags are 13).
pub fn flush_before_final_pass(flags: u16) -> bool {
    flags & tflags::SEND_FLUSH != 0
}

/// Whether holes go as zero-range requests (ours, or a server advertising WRITE_ZEROES),
/// rather than zero-filled WRITEs.
pub fn zeroes_as_requests(ours: bool, flags: u16) -> bool {
    ours || flags & tflags::SEND_WRITE_ZEROES != 0
}

/// Where a connection is in the migration, for its inactivity limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Sweep and passes, doors open.
    Bulk,
    /// The final pass, Commit, and the connections that resend it.
    DoorsClosed,
    /// Waiting for Prepared (the destination's `fdatasync`).
    Prepare,
}

/// The inactivity limit of `stage`; `bulk` is the bulk copy's (read once per migration).
pub fn inactivity_limit(stage: Stage, bulk: Duration) -> Duration {
    match stage {
        Stage::Bulk => bulk,
        Stage::DoorsClosed => HANDOFF_LIMIT,
        Stage::Prepare => PREPARE_LIMIT,
    }
}

/// The bulk copy's inactivity limit from `FLEXNBD_MS_REQUEST_LIMIT_SECS`'s value, if set:
/// a positive, finite number of seconds; [`BULK_LIMIT`] otherwise.
pub fn bulk_limit(setting: Option<&str>) -> Duration {
    setting
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(BULK_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn auto_switches_when_a_pass_does_not_shrink() {
        let mut auto = AutoSwitch::new();
        assert_eq!(auto.pass_starting(100 * MIB), None, "the first pass");
        assert_eq!(auto.pass_starting(60 * MIB), None);
        assert_eq!(auto.pass_starting(30 * MIB), None);
        assert_eq!(
            auto.pass_starting(30 * MIB),
            Some(SwitchReason::PassDidNotShrink {
                before: 30 * MIB,
                after: 30 * MIB
            })
        );
        let mut auto = AutoSwitch::new();
        auto.pass_starting(0);
        assert_eq!(
            auto.pass_starting(0),
            None,
            "nothing dirty is not a failure"
        );
    }

    #[test]
    fn auto_switches_when_the_estimate_stalls() {
        let s = Duration::from_secs;
        let mut auto = AutoSwitch::new();
        assert_eq!(auto.observe(100, s(0)), None);
        assert_eq!(auto.observe(90, s(3)), None, "a new low");
        assert_eq!(auto.observe(95, s(7)), None, "4 s without a new low");
        assert_eq!(
            auto.observe(90, s(8)),
            Some(SwitchReason::Stalled { bytes_left: 90 }),
            "5 s: equal is no improvement"
        );
        let mut auto = AutoSwitch::new();
        for (i, left) in (0..20).rev().enumerate() {
            assert_eq!(auto.observe(left, s(i as u64)), None, "steady progress");
        }
        assert_eq!(
            auto.observe(0, s(100)),
            None,
            "nothing left: nothing to switch for"
        );
    }

    #[test]
    fn speed_is_flexnbds() {
        assert_eq!(speed(0, Duration::ZERO), 0);
        assert_eq!(speed(10 * MIB, Duration::from_millis(999)), 10 * MIB);
        assert_eq!(speed(10 * MIB, Duration::from_millis(1000)), 5 * MIB);
        assert_eq!(speed(9, Duration::from_secs(2)), 3);
        assert_eq!(seconds_left(100, 9), 10);
        assert_eq!(seconds_left(100, 0), 100);
    }

    #[test]
    fn passes_go_on_until_less_than_five_seconds_are_left() {
        // Nothing dirty: converged whatever the speed.
        assert!(!another_pass(0, 0));
        assert!(!another_pass(0, u64::MAX - 1));
        // No speed yet: any dirty byte beyond 4 takes "5 s or more".
        assert!(!another_pass(4, 0));
        assert!(another_pass(5, 0));
        // At 1 MiB/s: 5 s of data is 5 * (1 MiB + 1) bytes.
        let s = MIB;
        assert!(!another_pass(5 * (s + 1) - 1, s));
        assert!(another_pass(5 * (s + 1), s));
        assert!(another_pass(u64::MAX, s));
    }

    #[test]
    fn catch_up_passes_shrink_or_stop() {
        let mut c = CatchUp::new();
        assert!(c.another(|| 100));
        assert!(c.another(|| 50));
        // Not less than the previous pass: the doors close.
        assert!(!c.another(|| 50));
        assert_eq!(c.passes(), 2);
        // Once it said no, it never asks again.
        assert!(!c.another(|| panic!("asked after the end")));

        let mut c = CatchUp::new();
        assert!(c.another(|| 10));
        assert!(!c.another(|| 11));

        let mut c = CatchUp::new();
        assert!(!c.another(|| 0), "nothing dirty: no pass");
        assert_eq!(c.passes(), 0);
    }

    #[test]
    fn at_most_four_catch_up_passes() {
        let mut c = CatchUp::new();
        let mut pending = 1000;
        let mut sent = 0;
        while c.another(|| pending) {
            sent += 1;
            pending -= 1;
        }
        assert_eq!(sent, CATCH_UP_PASSES);
        assert_eq!(c.passes(), CATCH_UP_PASSES);
        // The fifth decision closes the doors without looking at the dirty bytes.
        let mut c = CatchUp::new();
        for pending in (1..=CATCH_UP_PASSES as u64).rev() {
            assert!(c.another(|| pending));
        }
        assert!(!c.another(|| panic!("a fifth look")));
    }

    #[test]
    fn the_first_catch_up_pass_takes_any_amount() {
        let mut c = CatchUp::new();
        assert!(c.another(|| u64::MAX - 1));
        let mut c = CatchUp::new();
        assert!(
            !c.another(|| u64::MAX),
            "u64::MAX is never less than the start"
        );
    }

    #[test]
    fn flush_and_zero_ranges_follow_the_flags() {
        assert!(flush_before_final_pass(13), "flexnbd's flags");
        assert!(!flush_before_final_pass(tflags::HAS_FLAGS));
        assert!(zeroes_as_requests(true, 0));
        assert!(!zeroes_as_requests(false, 13));
        assert!(zeroes_as_requests(false, tflags::SEND_WRITE_ZEROES));
    }

    #[test]
    fn inactivity_limits_by_stage() {
        let bulk = Duration::from_secs(2);
        assert_eq!(inactivity_limit(Stage::Bulk, bulk), bulk);
        assert_eq!(
            inactivity_limit(Stage::DoorsClosed, bulk),
            Duration::from_secs(5)
        );
        assert_eq!(
            inactivity_limit(Stage::Prepare, bulk),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn bulk_limit_setting() {
        assert_eq!(bulk_limit(None), Duration::from_secs(60));
        assert_eq!(bulk_limit(Some("2")), Duration::from_secs(2));
        assert_eq!(bulk_limit(Some("0.5")), Duration::from_millis(500));
        for bad in ["", "abc", "0", "-1", "inf", "NaN"] {
            assert_eq!(bulk_limit(Some(bad)), BULK_LIMIT, "{bad:?}");
        }
    }
}
