//! A model of both halves of the hand-off over a network that loses, delays and reorders
//! connections, with an operator who breaks, a signal, a destination that restarts and
//! `--unlink` that may fail, checked for "never two writers". The property test below
//! and the `handoff_messages` fuzz target (`crate::fuzzing`) both drive it.
//!
//! The source is driven the way the mirror drives its [`SourceHandoff`]: every connection
//! starts with a Join (with a growing attempt number), the source asks the machine before
//! each step and follows its answer. The network keeps the messages of every connection in
//! order, but may deliver any connection's next message at any time (a path that heals
//! late), drop whole connections, and fail the source's view of its current connection.

use std::collections::VecDeque;

use super::source::{BreakDecision, Next, SourceHandoff};
use super::target::TargetHandoff;
use super::{HandoffReply, HandoffRequest, JoinPurpose, MigrationId};

/// The export size both halves agree on.
pub const SIZE: u64 = 1 << 20;

/// One connection of the world: requests on their way to the destination, answers on
/// their way back.
#[derive(Default)]
pub struct Conn {
    to_destination: VecDeque<HandoffRequest>,
    to_source: VecDeque<HandoffReply>,
    /// The destination incarnation it belongs to (a restart drops every connection).
    incarnation: u32,
}

/// Both halves over a network that loses, delays and reorders connections, with an
/// operator who breaks, a signal, a destination that restarts, and `--unlink` that may
/// fail. The source is driven as the mirror drives it.
pub struct World {
    source: SourceHandoff,
    source_done: bool,
    purpose: JoinPurpose,
    current: Option<usize>,
    attempt: u64,
    target: TargetHandoff,
    incarnation: u32,
    conns: Vec<Conn>,
    unlink: bool,
    /// Bit `i % 8`: the `i`-th unlink fails.
    unlink_failures: u8,
    unlinks: u32,
}

pub const ID: MigrationId = MigrationId([7; 16]);

impl World {
    pub fn connect(&mut self, purpose: JoinPurpose) {
        self.attempt += 1;
        self.purpose = purpose;
        let mut conn = Conn {
            incarnation: self.incarnation,
            ..Conn::default()
        };
        conn.to_destination.push_back(HandoffRequest::Join {
            id: ID,
            attempt: self.attempt,
            purpose,
        });
        self.conns.push(conn);
        let index = self.conns.len() - 1;
        self.target.admit(index as u64 + 1);
        self.current = Some(index);
    }

    pub fn follow(&mut self, next: Next) {
        match next {
            Next::Proceed => {}
            Next::Retry => self.connect(JoinPurpose::Copy),
            Next::ResendCommit => self.connect(JoinPurpose::Commit),
            Next::HandedOff | Next::Orphaned | Next::Stop { .. } => {
                self.source_done = true;
                self.current = None;
            }
        }
    }

    pub fn send(&mut self, request: HandoffRequest) {
        if let Some(index) = self.current {
            self.conns[index].to_destination.push_back(request);
        }
    }

    pub fn deliver_to_destination(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.incarnation != self.incarnation {
            conn.to_destination.clear();
            return;
        }
        let Some(request) = conn.to_destination.pop_front() else {
            return;
        };
        // The sync of a Prepare succeeds here; a failed one only sends Refused.
        let (reply, _) = self.target.on_request(index as u64 + 1, &request);
        self.conns[index].to_source.push_back(reply);
    }

    pub fn deliver_to_source(&mut self, index: usize) {
        if self.current != Some(index) || self.source_done {
            return;
        }
        let Some(reply) = self.conns[index].to_source.pop_front() else {
            return;
        };
        match reply {
            HandoffReply::Joined { .. } => match self.purpose {
                JoinPurpose::Copy => {
                    let next = self.source.close_doors();
                    if next == Next::Proceed {
                        self.send(HandoffRequest::Prepare { id: ID, size: SIZE });
                    } else {
                        self.follow(next);
                    }
                }
                JoinPurpose::Commit => self.commit(),
            },
            HandoffReply::Prepared { .. } => {
                let next = self.source.prepared();
                if next != Next::Proceed {
                    self.follow(next);
                    return;
                }
                if self.unlink {
                    let next = self.source.unlinking();
                    if next != Next::Proceed {
                        self.follow(next);
                        return;
                    }
                    let fails = (self.unlink_failures >> (self.unlinks % 8)) & 1 == 1;
                    self.unlinks += 1;
                    if fails {
                        // The mirror stops; the source copy stays authoritative.
                        self.source.unlink_failed();
                        self.source_done = true;
                        self.current = None;
                        return;
                    }
                }
                self.commit();
            }
            HandoffReply::Committed { .. } => {
                let next = self.source.committed();
                self.follow(next);
            }
            HandoffReply::NotPrepared { .. } => {
                let next = self.source.not_prepared();
                self.follow(next);
            }
            HandoffReply::Refused { .. } => {
                let next = self.source.failed();
                self.follow(next);
            }
        }
    }

    pub fn commit(&mut self) {
        let next = self.source.commit_starting();
        if next == Next::Proceed {
            self.send(HandoffRequest::Commit { id: ID });
        } else {
            self.follow(next);
        }
    }

    pub fn source_fails(&mut self) {
        if self.source_done || self.current.is_none() {
            return;
        }
        let next = self.source.failed();
        self.follow(next);
    }

    pub fn operator_breaks(&mut self) {
        if self.source_done {
            return;
        }
        if let BreakDecision::Stop { .. } = self.source.on_break(false) {
            self.source_done = true;
            self.current = None;
        }
    }

    pub fn signal(&mut self) {
        if self.source_done {
            return;
        }
        self.source.on_signal();
        self.source_done = true;
        self.current = None;
    }

    pub fn restart_destination(&mut self) {
        self.incarnation += 1;
        self.target = TargetHandoff::new(SIZE);
        for conn in &mut self.conns {
            conn.to_destination.clear();
            conn.to_source.clear();
        }
    }

    pub fn writers(&self) -> usize {
        usize::from(self.source.has_control()) + usize::from(self.target.has_control())
    }
}

impl World {
    /// A world whose source has just opened its first connection. With `unlink`, the
    /// source removes its file after Prepared; bit `i % 8` of `unlink_failures` makes the
    /// `i`-th removal fail.
    pub fn new(unlink: bool, unlink_failures: u8) -> World {
        let mut world = World {
            source: SourceHandoff::new(),
            source_done: false,
            purpose: JoinPurpose::Copy,
            current: None,
            attempt: 0,
            target: TargetHandoff::new(SIZE),
            incarnation: 0,
            conns: Vec::new(),
            unlink,
            unlink_failures,
            unlinks: 0,
        };
        world.connect(JoinPurpose::Copy);
        world
    }

    /// One step of a schedule: `action` picks what happens, `which` to which connection.
    pub fn step(&mut self, action: u8, which: u8) {
        let which = usize::from(which);
        let n = self.conns.len();
        match action % 7 {
            0 | 1 => self.deliver_to_destination(which % n),
            2 | 3 => self.deliver_to_source(which % n),
            4 => match which % 4 {
                0 => self.operator_breaks(),
                1 => self.restart_destination(),
                2 => self.signal(),
                _ => {}
            },
            // The source's current connection and its last messages, in order: the
            // common path, so that schedules reach the hand-off quickly.
            5 => {
                if let Some(c) = self.current {
                    self.deliver_to_destination(c);
                    self.deliver_to_source(c);
                }
            }
            _ => self.source_fails(),
        }
    }

    pub fn source(&self) -> &SourceHandoff {
        &self.source
    }

    pub fn target(&self) -> &TargetHandoff {
        &self.target
    }
}

/// Runs a schedule and panics at the first moment both halves have control.
pub fn check_schedule(unlink: bool, unlink_failures: u8, steps: &[(u8, u8)]) {
    let mut world = World::new(unlink, unlink_failures);
    for &(action, which) in steps {
        world.step(action, which);
        assert!(
            world.writers() <= 1,
            "two writers: source {:?}, target {:?}",
            world.source.phase(),
            world.target.phase()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever the schedule: at most one side has control at any moment.
        #[test]
        fn never_two_writers(
            unlink in any::<bool>(),
            failures in any::<u8>(),
            steps in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..160),
        ) {
            check_schedule(unlink, failures, &steps);
        }
    }

    #[test]
    fn the_model_can_complete_a_hand_off() {
        let mut world = World::new(false, 0);
        for _ in 0..3 {
            world.deliver_to_destination(0);
            world.deliver_to_source(0);
        }
        assert!(world.target().has_control());
        assert!(!world.source().has_control());
    }
}
