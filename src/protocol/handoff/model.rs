//! A model of both halves of the hand-off over a network that loses, delays and reorders
//! connections, with an operator who breaks and a destination that restarts, checked for
//! "never two writers" over random schedules.
//!
//! The source is driven the way the mirror drives its [`SourceHandoff`]: every connection
//! starts with a Join (with a growing attempt number), the source asks the machine before
//! each step and follows its answer. The network keeps the messages of every connection in
//! order, but may deliver any connection's next message at any time (a path that heals
//! late), drop whole connections, and fail the source's view of its current connection.

use std::collections::VecDeque;

use proptest::prelude::*;

use super::source::{BreakDecision, Next, SourceHandoff};
use super::target::{TargetEffect, TargetHandoff};
use super::{HandoffReply, HandoffRequest, JoinPurpose, MigrationId};

const ID: MigrationId = MigrationId([7; 16]);
const SIZE: u64 = 4096;

/// One connection: requests on their way to the destination, answers on their way back.
#[derive(Default)]
struct Conn {
    to_destination: VecDeque<HandoffRequest>,
    to_source: VecDeque<HandoffReply>,
    /// The destination incarnation it belongs to (a restart drops every connection).
    incarnation: u32,
}

struct World {
    source: SourceHandoff,
    /// The source's stopped (abandoned): it sends nothing more.
    source_done: bool,
    /// What the source does on its current connection.
    purpose: JoinPurpose,
    current: Option<usize>,
    attempt: u64,
    target: TargetHandoff,
    incarnation: u32,
    /// A destination that took control and was then restarted still "has" its file, but
    /// no process serves it: it is not a writer.
    conns: Vec<Conn>,
}

impl World {
    fn new() -> World {
        World {
            source: SourceHandoff::new(),
            source_done: false,
            purpose: JoinPurpose::Copy,
            current: None,
            attempt: 0,
            target: TargetHandoff::new(SIZE),
            incarnation: 0,
            conns: Vec::new(),
        }
    }

    /// The source opens a connection for `purpose` and sends its Join.
    fn connect(&mut self, purpose: JoinPurpose) {
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

    fn follow(&mut self, next: Next) {
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

    fn send(&mut self, request: HandoffRequest) {
        if let Some(index) = self.current {
            self.conns[index].to_destination.push_back(request);
        }
    }

    /// The destination takes the next request of connection `index`.
    fn deliver_to_destination(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        if conn.incarnation != self.incarnation {
            conn.to_destination.clear();
            return;
        }
        let Some(request) = conn.to_destination.pop_front() else {
            return;
        };
        let (reply, effect) = self.target.on_request(index as u64 + 1, &request);
        if let TargetEffect::SyncFirst = effect {
            // The sync succeeds in this model; a failed one only sends Refused.
        }
        self.conns[index].to_source.push_back(reply);
    }

    /// The source takes the next answer on connection `index` (only its current one
    /// matters; answers on abandoned connections are never read).
    fn deliver_to_source(&mut self, index: usize) {
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
                if next == Next::Proceed {
                    self.commit();
                } else {
                    self.follow(next);
                }
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

    fn commit(&mut self) {
        let next = self.source.commit_starting();
        if next == Next::Proceed {
            self.send(HandoffRequest::Commit { id: ID });
        } else {
            self.follow(next);
        }
    }

    /// The source gives up on its current connection (a timeout, a reset it saw); what
    /// it sent may still arrive later.
    fn source_fails(&mut self) {
        if self.source_done || self.current.is_none() {
            return;
        }
        let next = self.source.failed();
        self.follow(next);
    }

    fn operator_breaks(&mut self) {
        if self.source_done {
            return;
        }
        if let BreakDecision::Stop { .. } = self.source.on_break(false) {
            self.source_done = true;
            self.current = None;
        }
    }

    /// The destination process is killed and started again, empty-handed.
    fn restart_destination(&mut self) {
        self.incarnation += 1;
        self.target = TargetHandoff::new(SIZE);
        for conn in &mut self.conns {
            conn.to_destination.clear();
            conn.to_source.clear();
        }
    }

    fn writers(&self) -> usize {
        usize::from(self.source.has_control()) + usize::from(self.target.has_control())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever the schedule: at most one side has control at any moment; and a source
    /// that never lost control, or a destination that took it, is what the run ends with.
    #[test]
    fn never_two_writers(steps in proptest::collection::vec((0..6u8, 0..8usize), 1..120)) {
        let mut world = World::new();
        world.connect(JoinPurpose::Copy);
        for (action, which) in steps {
            let n = world.conns.len();
            match action {
                0 | 1 => world.deliver_to_destination(which % n),
                2 | 3 => world.deliver_to_source(which % n),
                4 if which == 0 => world.operator_breaks(),
                4 if which == 1 => world.restart_destination(),
                4 => {}
                _ => world.source_fails(),
            }
            prop_assert!(world.writers() <= 1, "two writers: source {:?}, target {:?}",
                world.source.phase(), world.target.phase());
        }
    }
}

#[test]
fn the_model_can_complete_a_hand_off() {
    let mut world = World::new();
    world.connect(JoinPurpose::Copy);
    for _ in 0..3 {
        world.deliver_to_destination(0);
        world.deliver_to_source(0);
    }
    assert!(world.target.has_control());
    assert!(!world.source.has_control());
    assert!(world.source_done);
}
