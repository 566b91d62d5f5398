//! The source's half of a migration's hand-off, as a pure state machine: whether the source
//! may serve, must keep its doors closed, or may never serve again.
//!
//! # The rule
//!
//! **Once the first byte of a Commit may have been handed to the socket, the source can
//! never know that it did not land.** From then on it is *committed or in doubt* for ever:
//! no `break`, signal, timeout or error lets it serve again on its own. Only two things do:
//!
//! - proof from the destination, over a fresh connection, that it is not prepared for this
//!   migration ([`super::HandoffReply::NotPrepared`]): it then never takes control for it,
//!   because only a Prepare makes it prepared and the source sends none once it has written
//!   a Commit;
//! - an operator's explicit `break --force-source`, whose name says what it risks (the
//!   documented check first: the destination stopped, its exit status 1).
//!
//! The same holds once the source file has been removed (`--unlink`): the source cannot
//! serve its copy any more, so the destination must get the Commit.
//!
//! Before that point every failure reopens the doors and the migration is retried from
//! scratch: a Prepare only makes data durable, it moves no authority.
//!
//! The legacy hand-off (a bare NBD_CMD_DISC to a destination that is not ours) follows the
//! same rule: once the DISC may be on the wire, the source never serves again.
//!
//! The mirror actor owns one [`SourceHandoff`]; its task asks it before every step that
//! moves authority ([`SourceHandoff::commit_starting`] before the Commit's first byte) and
//! `break` asks it too, so the two are decided in one place, in one order.

/// Where the source is. See the module docs for the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourcePhase {
    /// Authoritative; clients may write (the doors are open).
    Serving,
    /// Authoritative; the doors are closed for the final pass and the hand-off.
    DoorsClosed,
    /// The destination made everything durable; still authoritative (nothing committed).
    Prepared,
    /// The source file was removed: this server can never serve again; the destination
    /// must take control.
    Unlinked,
    /// A Commit (or a legacy DISC) may be on the wire: never serves again on its own.
    InDoubt { unlinked: bool },
    /// The destination confirmed that it took control (or a legacy DISC was sent).
    HandedOff,
    /// The destination proved it did not take control, but the source file is gone:
    /// nobody serves; the destination's file holds every acknowledged write (it was
    /// prepared). An operator must start a server on it.
    Orphaned,
    /// Stopped by `break` or a signal.
    Stopped { authoritative: bool },
}

impl SourcePhase {
    pub fn name(self) -> &'static str {
        match self {
            SourcePhase::Serving => "serving",
            SourcePhase::DoorsClosed => "doors_closed",
            SourcePhase::Prepared => "prepared",
            SourcePhase::Unlinked => "unlinked",
            SourcePhase::InDoubt { .. } => "in_doubt",
            SourcePhase::HandedOff => "handed_off",
            SourcePhase::Orphaned => "orphaned",
            SourcePhase::Stopped { .. } => "stopped",
        }
    }
}

/// What the mirror does after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Go on with the step that was asked about.
    Proceed,
    /// Reopen the doors and retry the migration from scratch (after the retry delay).
    Retry,
    /// Keep the doors closed; reconnect and resend Commit (after the retry delay).
    ResendCommit,
    /// The migration is over and this server never serves again.
    HandedOff,
    /// Nobody can serve: see [`SourcePhase::Orphaned`].
    Orphaned,
    /// `break` or a signal stopped the migration: stop now, reopening the doors only if
    /// `reopen`.
    Stop { reopen: bool },
}

/// The answer to `break`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakDecision {
    /// Stop the migration; reopen the doors if `reopen`.
    Stop { reopen: bool },
    /// Nothing changes; the text says why (a `1: ...` line).
    Refuse(String),
    /// The migration had completed already.
    AlreadyHandedOff,
}

/// The source's side of the hand-off.
#[derive(Debug)]
pub struct SourceHandoff {
    phase: SourcePhase,
}

impl Default for SourceHandoff {
    fn default() -> Self {
        SourceHandoff::new()
    }
}

impl SourceHandoff {
    pub fn new() -> SourceHandoff {
        SourceHandoff {
            phase: SourcePhase::Serving,
        }
    }

    pub fn phase(&self) -> SourcePhase {
        self.phase
    }

    /// This side is authoritative: it holds every acknowledged write and may accept
    /// writes again (now, or once its doors reopen). `status` shows it as `has_control`.
    pub fn has_control(&self) -> bool {
        matches!(
            self.phase,
            SourcePhase::Serving
                | SourcePhase::DoorsClosed
                | SourcePhase::Prepared
                | SourcePhase::Stopped {
                    authoritative: true
                }
        )
    }

    fn stopped(&self) -> Option<Next> {
        match self.phase {
            SourcePhase::Stopped { authoritative } => Some(Next::Stop {
                reopen: authoritative,
            }),
            _ => None,
        }
    }

    /// The final pass is about to close the doors.
    pub fn close_doors(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        if self.phase == SourcePhase::Serving {
            self.phase = SourcePhase::DoorsClosed;
        }
        Next::Proceed
    }

    /// The destination answered Prepared.
    pub fn prepared(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        if self.phase == SourcePhase::DoorsClosed {
            self.phase = SourcePhase::Prepared;
        }
        Next::Proceed
    }

    /// The source file is about to be removed (`--unlink`, after Prepared or before a
    /// legacy DISC): from the first attempt on, this server may never serve again.
    pub fn unlinking(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        match self.phase {
            SourcePhase::DoorsClosed | SourcePhase::Prepared => {
                self.phase = SourcePhase::Unlinked;
                Next::Proceed
            }
            _ => Next::Proceed,
        }
    }

    /// Removing the source file failed: it is still there, this server stays
    /// authoritative, the hand-off does not happen.
    pub fn unlink_failed(&mut self) {
        if self.phase == SourcePhase::Unlinked {
            self.phase = SourcePhase::DoorsClosed;
        }
    }

    /// Asked before the first byte of a Commit (or a legacy DISC) is handed to the
    /// socket. `Proceed` makes this side committed-or-in-doubt for ever.
    pub fn commit_starting(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        match self.phase {
            SourcePhase::DoorsClosed | SourcePhase::Prepared => {
                self.phase = SourcePhase::InDoubt { unlinked: false };
                Next::Proceed
            }
            SourcePhase::Unlinked => {
                self.phase = SourcePhase::InDoubt { unlinked: true };
                Next::Proceed
            }
            SourcePhase::InDoubt { .. } => Next::Proceed,
            SourcePhase::HandedOff => Next::HandedOff,
            SourcePhase::Orphaned => Next::Orphaned,
            // Never commit with open doors: clients could be writing.
            SourcePhase::Serving => Next::Retry,
            SourcePhase::Stopped { .. } => unreachable!("handled above"),
        }
    }

    /// The destination answered Committed (or the legacy DISC was written).
    pub fn committed(&mut self) -> Next {
        self.phase = SourcePhase::HandedOff;
        Next::HandedOff
    }

    /// The destination answered NotPrepared to our Commit: proof that it did not take
    /// control and never will for this migration.
    pub fn not_prepared(&mut self) -> Next {
        match self.phase {
            SourcePhase::InDoubt { unlinked: false } => {
                self.phase = SourcePhase::Serving;
                Next::Retry
            }
            SourcePhase::InDoubt { unlinked: true } | SourcePhase::Unlinked => {
                self.phase = SourcePhase::Orphaned;
                Next::Orphaned
            }
            _ => self.failed(),
        }
    }

    /// The attempt failed (connection lost, a refusal that proves nothing, a timeout).
    pub fn failed(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        match self.phase {
            SourcePhase::Serving | SourcePhase::DoorsClosed | SourcePhase::Prepared => {
                self.phase = SourcePhase::Serving;
                Next::Retry
            }
            // The file is gone: the destination must still get a Commit.
            SourcePhase::Unlinked | SourcePhase::InDoubt { .. } => Next::ResendCommit,
            SourcePhase::HandedOff => Next::HandedOff,
            SourcePhase::Orphaned => Next::Orphaned,
            SourcePhase::Stopped { .. } => unreachable!("handled above"),
        }
    }

    /// A migration with action `nothing` finished without a hand-off: serve again. Only
    /// while nothing moved authority (such a migration never prepares or commits).
    pub fn finished_without_handoff(&mut self) -> Next {
        if let Some(stop) = self.stopped() {
            return stop;
        }
        match self.phase {
            SourcePhase::Serving | SourcePhase::DoorsClosed | SourcePhase::Prepared => {
                self.phase = SourcePhase::Serving;
                Next::Proceed
            }
            _ => self.failed(),
        }
    }

    /// The operator's `break` (`force_source`: `break --force-source`).
    pub fn on_break(&mut self, force_source: bool) -> BreakDecision {
        match self.phase {
            SourcePhase::Serving | SourcePhase::DoorsClosed | SourcePhase::Prepared => {
                self.phase = SourcePhase::Stopped {
                    authoritative: true,
                };
                BreakDecision::Stop { reopen: true }
            }
            SourcePhase::InDoubt { unlinked: false } if force_source => {
                self.phase = SourcePhase::Stopped {
                    authoritative: true,
                };
                BreakDecision::Stop { reopen: true }
            }
            SourcePhase::InDoubt { unlinked: false } => BreakDecision::Refuse(
                "the hand-off is in doubt: the destination may have taken control; \
                 stop the destination first, then use break --force-source"
                    .into(),
            ),
            SourcePhase::Unlinked | SourcePhase::InDoubt { unlinked: true } => {
                BreakDecision::Refuse(
                    "the source file was removed: the destination holds the only copy".into(),
                )
            }
            SourcePhase::Orphaned => BreakDecision::Refuse(
                "the source file was removed and the destination did not take control: \
                 serve the destination's file"
                    .into(),
            ),
            SourcePhase::HandedOff => BreakDecision::AlreadyHandedOff,
            SourcePhase::Stopped { authoritative } => BreakDecision::Stop {
                reopen: authoritative,
            },
        }
    }

    /// A signal stops the migration whatever its phase (the process exits, so nothing is
    /// served either way); the doors reopen only where this side is authoritative.
    pub fn on_signal(&mut self) -> Next {
        let authoritative = self.has_control();
        if !matches!(self.phase, SourcePhase::HandedOff | SourcePhase::Orphaned) {
            self.phase = SourcePhase::Stopped { authoritative };
        }
        Next::Stop {
            reopen: authoritative,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(phase: SourcePhase) -> SourceHandoff {
        SourceHandoff { phase }
    }

    const ALL: [SourcePhase; 10] = [
        SourcePhase::Serving,
        SourcePhase::DoorsClosed,
        SourcePhase::Prepared,
        SourcePhase::Unlinked,
        SourcePhase::InDoubt { unlinked: false },
        SourcePhase::InDoubt { unlinked: true },
        SourcePhase::HandedOff,
        SourcePhase::Orphaned,
        SourcePhase::Stopped {
            authoritative: true,
        },
        SourcePhase::Stopped {
            authoritative: false,
        },
    ];

    #[test]
    fn the_happy_path() {
        let mut s = SourceHandoff::new();
        assert!(s.has_control());
        assert_eq!(s.close_doors(), Next::Proceed);
        assert!(s.has_control());
        assert_eq!(s.prepared(), Next::Proceed);
        assert!(s.has_control(), "Prepared moves no authority");
        assert_eq!(s.commit_starting(), Next::Proceed);
        assert!(!s.has_control());
        assert_eq!(s.phase().name(), "in_doubt");
        assert_eq!(s.committed(), Next::HandedOff);
        assert!(!s.has_control());
    }

    #[test]
    fn once_a_commit_may_be_on_the_wire_nothing_but_proof_or_force_reopens() {
        for unlinked in [false, true] {
            let mut s = at(SourcePhase::InDoubt { unlinked });
            assert_eq!(s.failed(), Next::ResendCommit);
            assert!(matches!(s.on_break(false), BreakDecision::Refuse(_)));
            assert!(!s.has_control());
            assert_eq!(s.commit_starting(), Next::Proceed, "resending is allowed");
            let forced = s.on_break(true);
            if unlinked {
                assert!(matches!(forced, BreakDecision::Refuse(_)));
                assert!(!s.has_control());
            } else {
                assert_eq!(forced, BreakDecision::Stop { reopen: true });
                assert!(s.has_control());
            }
        }
    }

    #[test]
    fn proof_of_no_control_returns_the_source_to_serving() {
        let mut s = at(SourcePhase::InDoubt { unlinked: false });
        assert_eq!(s.not_prepared(), Next::Retry);
        assert_eq!(s.phase(), SourcePhase::Serving);
        assert!(s.has_control());
        let mut s = at(SourcePhase::InDoubt { unlinked: true });
        assert_eq!(s.not_prepared(), Next::Orphaned);
        assert!(!s.has_control());
        assert!(matches!(s.on_break(true), BreakDecision::Refuse(_)));
    }

    #[test]
    fn failures_before_a_commit_reopen_and_retry() {
        for phase in [
            SourcePhase::Serving,
            SourcePhase::DoorsClosed,
            SourcePhase::Prepared,
        ] {
            let mut s = at(phase);
            assert_eq!(s.failed(), Next::Retry, "{phase:?}");
            assert_eq!(s.phase(), SourcePhase::Serving);
        }
        let mut s = at(SourcePhase::Unlinked);
        assert_eq!(s.failed(), Next::ResendCommit, "the file is gone");
        let mut s = at(SourcePhase::Prepared);
        assert_eq!(s.unlinking(), Next::Proceed);
        s.unlink_failed();
        assert!(s.has_control(), "the file is still there");
    }

    #[test]
    fn break_before_commit_wins_over_the_commit() {
        let mut s = at(SourcePhase::Prepared);
        assert_eq!(s.on_break(false), BreakDecision::Stop { reopen: true });
        assert_eq!(s.commit_starting(), Next::Stop { reopen: true });
        assert!(s.has_control());
        assert_eq!(s.failed(), Next::Stop { reopen: true });
    }

    #[test]
    fn every_event_in_every_phase_keeps_the_rule() {
        type Event = fn(&mut SourceHandoff) -> Next;
        let events: [(&str, Event); 8] = [
            ("close_doors", SourceHandoff::close_doors),
            ("prepared", SourceHandoff::prepared),
            ("unlinking", SourceHandoff::unlinking),
            ("commit_starting", SourceHandoff::commit_starting),
            ("not_prepared", SourceHandoff::not_prepared),
            ("failed", SourceHandoff::failed),
            (
                "finished_without_handoff",
                SourceHandoff::finished_without_handoff,
            ),
            ("on_signal", SourceHandoff::on_signal),
        ];
        for phase in ALL {
            for (name, event) in events {
                let mut s = at(phase);
                let next = event(&mut s);
                let lost_authority = !at(phase).has_control();
                // Authority, once lost, comes back only through not_prepared (proof).
                if lost_authority && s.has_control() {
                    assert_eq!(
                        name,
                        "not_prepared",
                        "{phase:?} --{name}--> {:?}",
                        s.phase()
                    );
                    assert_eq!(phase, SourcePhase::InDoubt { unlinked: false });
                }
                if let Next::Stop { reopen } = next {
                    assert_eq!(reopen, s.has_control(), "{phase:?} {name}");
                }
                if next == Next::Retry {
                    assert!(s.has_control(), "{phase:?} {name}: retry reopens the doors");
                }
            }
            for force in [false, true] {
                let mut s = at(phase);
                let was = s.has_control();
                match s.on_break(force) {
                    BreakDecision::Stop { reopen } => {
                        assert_eq!(reopen, s.has_control());
                        if !was && reopen {
                            assert!(force, "{phase:?}: only a forced break reopens");
                        }
                    }
                    BreakDecision::Refuse(_) | BreakDecision::AlreadyHandedOff => {
                        assert_eq!(s.phase(), phase, "a refused break changes nothing")
                    }
                }
            }
        }
    }
}
