//! The destination's half of a migration, as a pure state machine: who may write into the
//! export, which connections are admitted, and when control is taken.
//!
//! # The rule
//!
//! A destination that has not taken control accepts writes from **one connection at most**,
//! the migration's own:
//!
//! - Before any source has spoken our protocol on this server ([`TargetPhase::Legacy`]),
//!   flexnbd's contract holds: one client at a time, which may write, and whose
//!   NBD_CMD_DISC completes the migration. This is how a C flexnbd source migrates here.
//! - Once a source has joined with our protocol, that contract is gone for good: only the
//!   connection that carries the current attempt (highest `attempt` of the current
//!   migration id) may write, and only until Prepare. A newer attempt **fences** the older
//!   one: its write permission is revoked, and the actor waits until none of its writes is
//!   in flight before answering Joined, so a stale connection's queued WRITEs (arriving
//!   late over a healed path) are refused, never applied. Other connections are admitted
//!   only as candidates (at most [`MAX_CANDIDATES`]), which may only join or be closed. A
//!   DISC completes nothing.
//! - After Prepared nobody writes, until a new attempt joins to copy again (the source sends
//!   `Join{Copy}` only while it has never written a Commit for that migration).
//! - Control is taken only by the Commit of the prepared migration, from its current
//!   connection. A Commit the destination cannot honour because it is not prepared for that
//!   migration is answered [`HandoffReply::NotPrepared`], which proves to the source that
//!   this server did not and will not take control for it.
//!
//! Time and I/O are the actor's: it publishes [`TargetHandoff::writer`] to the sessions'
//! write gate after every step, closes the connections named in [`TargetEffect::Close`],
//! runs the `fdatasync` of [`TargetEffect::SyncFirst`] and closes candidates that do not
//! join in time.

use std::collections::{BTreeSet, VecDeque};

use super::{HandoffReply, HandoffRequest, JoinPurpose, MigrationId};

/// A connection (session) of the destination, as its listener numbers them.
pub type ConnId = u64;

/// Connections admitted, besides the current one, while a migration of ours is received:
/// room for a source's retry while its old connection is still stuck, and no more.
pub const MAX_CANDIDATES: usize = 4;
/// Migration ids remembered as superseded (a late Join of one is refused).
const RETIRED: usize = 16;

/// Where a migration target is in the hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetPhase {
    /// No source has spoken our protocol here yet: flexnbd's contract (one client, which
    /// may write; its DISC completes the migration).
    Legacy,
    /// Receiving data from a source of ours; only its current connection may write.
    Receiving(MigrationId),
    /// Everything received is durable; nobody may write; waiting for Commit.
    Prepared(MigrationId),
    /// Control taken, by our Commit (`Some`) or a legacy DISC (`None`).
    Committed(Option<MigrationId>),
}

impl TargetPhase {
    pub fn name(self) -> &'static str {
        match self {
            TargetPhase::Legacy | TargetPhase::Receiving(_) => "receiving",
            TargetPhase::Prepared(_) => "prepared",
            TargetPhase::Committed(_) => "committed",
        }
    }
}

/// Who may write into the export right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    Nobody,
    Only(ConnId),
    Everyone,
}

/// Whether a new connection is admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Closed at once, without a hello; the reason is logged.
    Refuse(&'static str),
}

/// What the target must do before sending the answer (besides publishing the writer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetEffect {
    None,
    /// Close this connection (a fenced older attempt, or a stale one).
    Close(ConnId),
    /// `fdatasync` the export; if that fails, call [`TargetHandoff::sync_failed`] and
    /// answer Refused instead.
    SyncFirst,
    /// Control is taken: tell the process, then answer.
    TakeControl,
}

/// The destination's side of the hand-off. See the module docs for the rule it keeps.
#[derive(Debug)]
pub struct TargetHandoff {
    phase: TargetPhase,
    size: u64,
    /// `Legacy`: the one admitted connection.
    legacy: Option<ConnId>,
    /// Ours: the connection of the current attempt, while it is open.
    current: Option<ConnId>,
    /// Ours: the current attempt number.
    attempt: u64,
    /// Ours: admitted connections that have not joined.
    candidates: BTreeSet<ConnId>,
    /// Migration ids replaced by a newer migration.
    retired: VecDeque<MigrationId>,
    /// A legacy DISC is being made durable before control is taken.
    committing: bool,
    /// The server is shutting down: nothing more is admitted, written or taken.
    stopping: bool,
}

impl TargetHandoff {
    pub fn new(size: u64) -> TargetHandoff {
        TargetHandoff {
            phase: TargetPhase::Legacy,
            size,
            legacy: None,
            current: None,
            attempt: 0,
            candidates: BTreeSet::new(),
            retired: VecDeque::new(),
            committing: false,
            stopping: false,
        }
    }

    pub fn phase(&self) -> TargetPhase {
        self.phase
    }

    /// The current attempt of our migration (0 before any joined).
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    pub fn has_control(&self) -> bool {
        matches!(self.phase, TargetPhase::Committed(_))
    }

    /// A legacy DISC is being made durable (control is not taken yet).
    pub fn is_committing(&self) -> bool {
        self.committing
    }

    /// The connection allowed to write, if any.
    pub fn writer(&self) -> Writer {
        if self.stopping || self.committing {
            return Writer::Nobody;
        }
        match self.phase {
            TargetPhase::Legacy => self.legacy.map_or(Writer::Nobody, Writer::Only),
            TargetPhase::Receiving(_) => self.current.map_or(Writer::Nobody, Writer::Only),
            TargetPhase::Prepared(_) => Writer::Nobody,
            TargetPhase::Committed(_) => Writer::Everyone,
        }
    }

    /// A new connection asks to be admitted.
    pub fn admit(&mut self, conn: ConnId) -> Admission {
        if self.stopping {
            return Admission::Refuse("the server is shutting down");
        }
        if self.committing || self.has_control() {
            return Admission::Refuse("the migration has completed");
        }
        match self.phase {
            TargetPhase::Legacy if self.legacy.is_some() => {
                Admission::Refuse("too many clients (a migration source is connected)")
            }
            TargetPhase::Legacy => {
                self.legacy = Some(conn);
                Admission::Admit
            }
            _ if self.candidates.len() >= MAX_CANDIDATES => {
                Admission::Refuse("a migration is being received")
            }
            _ => {
                self.candidates.insert(conn);
                Admission::Admit
            }
        }
    }

    /// True while `conn` is admitted but has not joined a migration of ours.
    pub fn is_candidate(&self, conn: ConnId) -> bool {
        self.candidates.contains(&conn)
    }

    /// Applies a hand-off request from `conn`: the answer to send once the effect (and the
    /// publication of [`TargetHandoff::writer`]) has been carried out.
    pub fn on_request(
        &mut self,
        conn: ConnId,
        request: &HandoffRequest,
    ) -> (HandoffReply, TargetEffect) {
        if self.stopping {
            return refuse("the server is shutting down");
        }
        match *request {
            HandoffRequest::Join {
                id,
                attempt,
                purpose,
            } => self.join(conn, id, attempt, purpose),
            HandoffRequest::Prepare { id, size } => self.prepare(conn, id, size),
            HandoffRequest::Commit { id } => self.commit(conn, id),
        }
    }

    fn join(
        &mut self,
        conn: ConnId,
        id: MigrationId,
        attempt: u64,
        purpose: JoinPurpose,
    ) -> (HandoffReply, TargetEffect) {
        if self.retired.contains(&id) {
            self.forget(conn);
            return (
                HandoffReply::Refused {
                    reason: "this migration was superseded by a newer one".into(),
                },
                TargetEffect::Close(conn),
            );
        }
        if self.committing {
            return refuse("this server is taking control after a legacy disconnect");
        }
        let previous = match self.phase {
            TargetPhase::Committed(Some(c)) if c == id && purpose == JoinPurpose::Commit => {
                self.current = Some(conn);
                self.candidates.remove(&conn);
                return (HandoffReply::Joined { id, attempt }, TargetEffect::None);
            }
            TargetPhase::Committed(_) => return refuse("this server has already taken control"),
            TargetPhase::Legacy => self.legacy.take(),
            TargetPhase::Receiving(p) | TargetPhase::Prepared(p) if p == id => {
                if attempt <= self.attempt {
                    self.forget(conn);
                    return (
                        HandoffReply::Refused {
                            reason: format!(
                                "attempt {attempt} is not newer than the current attempt {}",
                                self.attempt
                            ),
                        },
                        TargetEffect::Close(conn),
                    );
                }
                if purpose == JoinPurpose::Copy {
                    // Only a source that never wrote a Commit for `id` copies again.
                    self.phase = TargetPhase::Receiving(id);
                }
                self.current.take()
            }
            TargetPhase::Receiving(p) | TargetPhase::Prepared(p) => {
                // A new migration (a new `mirror` command) replaces the old one, whose
                // source gave it up.
                if self.retired.len() == RETIRED {
                    self.retired.pop_front();
                }
                self.retired.push_back(p);
                self.phase = TargetPhase::Receiving(id);
                self.current.take()
            }
        };
        if let TargetPhase::Legacy = self.phase {
            self.phase = TargetPhase::Receiving(id);
        }
        self.candidates.remove(&conn);
        self.current = Some(conn);
        self.attempt = attempt;
        let effect = match previous {
            Some(old) if old != conn => TargetEffect::Close(old),
            _ => TargetEffect::None,
        };
        (HandoffReply::Joined { id, attempt }, effect)
    }

    /// `conn` is being closed as stale: it is neither current nor a candidate any more.
    fn forget(&mut self, conn: ConnId) {
        self.candidates.remove(&conn);
        if self.current == Some(conn) {
            self.current = None;
        }
    }

    fn prepare(
        &mut self,
        conn: ConnId,
        id: MigrationId,
        size: u64,
    ) -> (HandoffReply, TargetEffect) {
        if size != self.size {
            return refuse("the export sizes differ");
        }
        match self.phase {
            TargetPhase::Committed(_) => refuse("this server has already taken control"),
            _ if self.current != Some(conn) => {
                refuse("this connection does not carry the migration's current attempt")
            }
            TargetPhase::Receiving(p) | TargetPhase::Prepared(p) if p == id => {
                self.phase = TargetPhase::Prepared(id);
                (HandoffReply::Prepared { id }, TargetEffect::SyncFirst)
            }
            _ => refuse("prepare for a migration that is not the current one"),
        }
    }

    fn commit(&mut self, conn: ConnId, id: MigrationId) -> (HandoffReply, TargetEffect) {
        match self.phase {
            TargetPhase::Committed(Some(c)) if c == id => {
                (HandoffReply::Committed { id }, TargetEffect::None)
            }
            TargetPhase::Committed(_) => {
                refuse("this server has taken control for another migration")
            }
            _ if self.current != Some(conn) => {
                refuse("this connection does not carry the migration's current attempt")
            }
            TargetPhase::Prepared(p) if p == id => {
                self.phase = TargetPhase::Committed(Some(id));
                (HandoffReply::Committed { id }, TargetEffect::TakeControl)
            }
            // Not prepared for `id`: control for it can only follow a new Prepare, which
            // the source never sends once it has written a Commit.
            _ => (HandoffReply::NotPrepared { id }, TargetEffect::None),
        }
    }

    /// The `fdatasync` of a Prepare failed: the data is not known to be durable, so the
    /// migration is back to receiving (the source retries).
    pub fn sync_failed(&mut self) {
        if let TargetPhase::Prepared(id) = self.phase {
            self.phase = TargetPhase::Receiving(id);
        }
    }

    /// A connection ended. Returns true when it completes a legacy migration (the legacy
    /// client sent DISC): the actor makes the data durable, then calls
    /// [`TargetHandoff::legacy_synced`].
    pub fn on_session_ended(&mut self, conn: ConnId, disconnect_seen: bool) -> bool {
        self.candidates.remove(&conn);
        if self.current == Some(conn) {
            self.current = None;
        }
        if self.legacy == Some(conn) {
            self.legacy = None;
            if self.phase == TargetPhase::Legacy && disconnect_seen && !self.stopping {
                self.committing = true;
                return true;
            }
        }
        false
    }

    /// The legacy completion's sync finished: control is taken if it succeeded.
    pub fn legacy_synced(&mut self, ok: bool) {
        if !self.committing {
            return;
        }
        self.committing = false;
        if ok {
            self.phase = TargetPhase::Committed(None);
        }
    }

    /// The server is shutting down: nothing more is admitted, written or committed.
    /// Returns whether control was taken (the exit status depends on it). A legacy
    /// completion still syncing decides it when it ends.
    pub fn stop(&mut self) -> bool {
        self.stopping = true;
        self.has_control()
    }
}

fn refuse(reason: &str) -> (HandoffReply, TargetEffect) {
    (
        HandoffReply::Refused {
            reason: reason.to_owned(),
        },
        TargetEffect::None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: MigrationId = MigrationId([1; 16]);
    const B: MigrationId = MigrationId([2; 16]);
    const SIZE: u64 = 1 << 20;

    fn join(id: MigrationId, attempt: u64, purpose: JoinPurpose) -> HandoffRequest {
        HandoffRequest::Join {
            id,
            attempt,
            purpose,
        }
    }

    fn copy(id: MigrationId, attempt: u64) -> HandoffRequest {
        join(id, attempt, JoinPurpose::Copy)
    }

    const PREPARE_A: HandoffRequest = HandoffRequest::Prepare { id: A, size: SIZE };
    const COMMIT_A: HandoffRequest = HandoffRequest::Commit { id: A };

    fn is_refused(reply: &HandoffReply) -> bool {
        matches!(reply, HandoffReply::Refused { .. })
    }

    /// A target with connection 1 joined as attempt 1 of migration A.
    fn receiving() -> TargetHandoff {
        let mut t = TargetHandoff::new(SIZE);
        assert_eq!(t.admit(1), Admission::Admit);
        let (reply, effect) = t.on_request(1, &copy(A, 1));
        assert_eq!(reply, HandoffReply::Joined { id: A, attempt: 1 });
        assert_eq!(effect, TargetEffect::None);
        t
    }

    #[test]
    fn legacy_keeps_flexnbds_contract() {
        let mut t = TargetHandoff::new(SIZE);
        assert_eq!(t.phase(), TargetPhase::Legacy);
        assert_eq!(t.writer(), Writer::Nobody);
        assert_eq!(t.admit(1), Admission::Admit);
        assert_eq!(t.writer(), Writer::Only(1));
        assert!(matches!(t.admit(2), Admission::Refuse(_)), "one at a time");
        // Ending without DISC completes nothing and frees the slot.
        assert!(!t.on_session_ended(1, false));
        assert_eq!(t.writer(), Writer::Nobody);
        assert_eq!(t.admit(3), Admission::Admit);
        assert!(t.on_session_ended(3, true), "a DISC completes");
        assert!(t.is_committing());
        assert_eq!(t.writer(), Writer::Nobody, "nobody writes while syncing");
        assert!(matches!(t.admit(4), Admission::Refuse(_)));
        t.legacy_synced(true);
        assert_eq!(t.phase(), TargetPhase::Committed(None));
        assert!(t.has_control());
    }

    #[test]
    fn a_failed_legacy_sync_takes_no_control() {
        let mut t = TargetHandoff::new(SIZE);
        t.admit(1);
        assert!(t.on_session_ended(1, true));
        t.legacy_synced(false);
        assert_eq!(t.phase(), TargetPhase::Legacy);
        assert!(!t.has_control());
    }

    #[test]
    fn once_a_source_of_ours_joined_a_disc_completes_nothing() {
        let mut t = receiving();
        assert!(!t.on_session_ended(1, true));
        assert_eq!(t.admit(2), Admission::Admit);
        assert!(!t.on_session_ended(2, true), "a stray DISC");
        assert!(!t.has_control());
        assert_eq!(t.phase(), TargetPhase::Receiving(A));
    }

    #[test]
    fn only_the_current_attempt_writes_and_candidates_are_bounded() {
        let mut t = receiving();
        assert_eq!(t.writer(), Writer::Only(1));
        for conn in 10..10 + MAX_CANDIDATES as u64 {
            assert_eq!(t.admit(conn), Admission::Admit);
            assert!(t.is_candidate(conn));
        }
        assert!(matches!(t.admit(99), Admission::Refuse(_)));
        assert_eq!(t.writer(), Writer::Only(1), "candidates never write");
        // A candidate cannot prepare or commit.
        assert!(is_refused(&t.on_request(10, &PREPARE_A).0));
        assert!(is_refused(&t.on_request(10, &COMMIT_A).0));
    }

    #[test]
    fn a_newer_attempt_fences_the_older_one_and_stale_ones_are_refused() {
        let mut t = receiving();
        t.admit(2);
        let (reply, effect) = t.on_request(2, &copy(A, 2));
        assert_eq!(reply, HandoffReply::Joined { id: A, attempt: 2 });
        assert_eq!(
            effect,
            TargetEffect::Close(1),
            "the older attempt is closed"
        );
        assert_eq!(t.writer(), Writer::Only(2));
        // The old attempt's late messages change nothing.
        assert!(is_refused(&t.on_request(1, &PREPARE_A).0));
        t.admit(3);
        let (reply, effect) = t.on_request(3, &copy(A, 1));
        assert!(is_refused(&reply));
        assert_eq!(effect, TargetEffect::Close(3));
        let (reply, _) = t.on_request(3, &copy(A, 2));
        assert!(is_refused(&reply), "an equal attempt is stale too");
        assert_eq!(t.writer(), Writer::Only(2));
        assert_eq!(t.attempt(), 2);
    }

    #[test]
    fn prepare_stops_every_write_and_commit_takes_control_once() {
        let mut t = receiving();
        assert!(is_refused(
            &t.on_request(1, &HandoffRequest::Prepare { id: A, size: 512 })
                .0
        ));
        assert_eq!(
            t.on_request(1, &PREPARE_A),
            (HandoffReply::Prepared { id: A }, TargetEffect::SyncFirst)
        );
        assert_eq!(t.phase().name(), "prepared");
        assert_eq!(t.writer(), Writer::Nobody);
        assert_eq!(
            t.on_request(1, &PREPARE_A),
            (HandoffReply::Prepared { id: A }, TargetEffect::SyncFirst),
            "a resent Prepare syncs again"
        );
        assert_eq!(
            t.on_request(1, &COMMIT_A),
            (HandoffReply::Committed { id: A }, TargetEffect::TakeControl)
        );
        assert_eq!(
            t.on_request(1, &COMMIT_A),
            (HandoffReply::Committed { id: A }, TargetEffect::None),
            "a resent Commit gets the recorded answer"
        );
        assert!(is_refused(&t.on_request(1, &PREPARE_A).0));
        assert!(is_refused(
            &t.on_request(1, &HandoffRequest::Commit { id: B }).0
        ));
        assert!(t.has_control());
        assert_eq!(t.writer(), Writer::Everyone);
    }

    #[test]
    fn a_commit_resent_on_a_new_connection_completes() {
        let mut t = receiving();
        t.on_request(1, &PREPARE_A);
        t.on_session_ended(1, false);
        t.admit(2);
        let (reply, _) = t.on_request(2, &join(A, 2, JoinPurpose::Commit));
        assert_eq!(reply, HandoffReply::Joined { id: A, attempt: 2 });
        assert_eq!(t.phase(), TargetPhase::Prepared(A), "still prepared");
        assert_eq!(t.writer(), Writer::Nobody);
        assert_eq!(
            t.on_request(2, &COMMIT_A),
            (HandoffReply::Committed { id: A }, TargetEffect::TakeControl)
        );
        // After control, the source may reconnect once more to hear the answer.
        t.on_session_ended(2, false);
        let (reply, _) = t.on_request(3, &join(A, 3, JoinPurpose::Commit));
        assert_eq!(reply, HandoffReply::Joined { id: A, attempt: 3 });
        assert_eq!(
            t.on_request(3, &COMMIT_A),
            (HandoffReply::Committed { id: A }, TargetEffect::None)
        );
        assert!(is_refused(&t.on_request(4, &copy(A, 4)).0));
    }

    #[test]
    fn a_copy_attempt_after_prepared_means_no_commit_is_coming() {
        let mut t = receiving();
        t.on_request(1, &PREPARE_A);
        t.admit(2);
        let (reply, effect) = t.on_request(2, &copy(A, 2));
        assert_eq!(reply, HandoffReply::Joined { id: A, attempt: 2 });
        assert_eq!(effect, TargetEffect::Close(1));
        assert_eq!(t.phase(), TargetPhase::Receiving(A));
        assert_eq!(t.writer(), Writer::Only(2));
    }

    #[test]
    fn commit_without_prepare_proves_no_control() {
        // A restarted destination: the source in doubt joins to resend Commit.
        let mut t = TargetHandoff::new(SIZE);
        t.admit(1);
        assert!(is_refused(&t.on_request(1, &COMMIT_A).0), "not joined");
        t.on_request(1, &join(A, 9, JoinPurpose::Commit));
        assert_eq!(
            t.on_request(1, &COMMIT_A),
            (HandoffReply::NotPrepared { id: A }, TargetEffect::None)
        );
        assert!(!t.has_control());
        // Prepared for another migration proves the same for A.
        let mut t = TargetHandoff::new(SIZE);
        t.admit(1);
        t.on_request(1, &copy(B, 1));
        t.on_request(1, &HandoffRequest::Prepare { id: B, size: SIZE });
        assert_eq!(
            t.on_request(1, &COMMIT_A),
            (HandoffReply::NotPrepared { id: A }, TargetEffect::None)
        );
    }

    #[test]
    fn a_new_migration_supersedes_the_old_one_for_good() {
        let mut t = receiving();
        t.on_request(1, &PREPARE_A);
        t.admit(2);
        let (reply, effect) = t.on_request(2, &copy(B, 1));
        assert_eq!(reply, HandoffReply::Joined { id: B, attempt: 1 });
        assert_eq!(effect, TargetEffect::Close(1));
        assert_eq!(t.phase(), TargetPhase::Receiving(B));
        t.admit(3);
        let (reply, effect) = t.on_request(3, &join(A, 50, JoinPurpose::Commit));
        assert!(is_refused(&reply), "a late join of the old migration");
        assert_eq!(effect, TargetEffect::Close(3));
        assert_eq!(t.writer(), Writer::Only(2));
    }

    #[test]
    fn a_failed_sync_goes_back_to_receiving() {
        let mut t = receiving();
        t.on_request(1, &PREPARE_A);
        t.sync_failed();
        assert_eq!(t.phase(), TargetPhase::Receiving(A));
        assert!(matches!(
            t.on_request(1, &COMMIT_A).0,
            HandoffReply::NotPrepared { .. }
        ));
    }

    #[test]
    fn stopping_refuses_everything() {
        let mut t = receiving();
        t.on_request(1, &PREPARE_A);
        assert!(!t.stop());
        assert_eq!(t.writer(), Writer::Nobody);
        assert!(is_refused(&t.on_request(1, &COMMIT_A).0));
        assert!(matches!(t.admit(5), Admission::Refuse(_)));
        assert!(!t.has_control());
        // A legacy DISC at shutdown completes nothing.
        let mut t = TargetHandoff::new(SIZE);
        t.admit(1);
        t.stop();
        assert!(!t.on_session_ended(1, true));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit(u64),
        Ended(u64, bool),
        Request(u64, u8, u8, u64, bool),
        SyncFailed,
        Stop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6u64).prop_map(Op::Admit),
            (0..6u64, any::<bool>()).prop_map(|(c, d)| Op::Ended(c, d)),
            (0..6u64, 0..3u8, 0..2u8, 0..5u64, any::<bool>())
                .prop_map(|(c, k, m, a, p)| Op::Request(c, k, m, a, p)),
            Just(Op::SyncFailed),
            Just(Op::Stop),
        ]
    }

    proptest! {
        /// Whatever arrives in whatever order: control is taken at most once, only by the
        /// current connection's Commit of a prepared migration; at most one connection may
        /// write before control; a connection refused as stale never writes again; nothing
        /// is taken after stop.
        #[test]
        fn the_target_keeps_its_rule(ops in proptest::collection::vec(op(), 0..60)) {
            let mut t = TargetHandoff::new(SIZE);
            let mut taken = 0;
            let mut fenced: BTreeSet<u64> = BTreeSet::new();
            let mut stopped = false;
            for op in ops {
                match op {
                    Op::Admit(c) => { t.admit(c); }
                    Op::Ended(c, d) => {
                        if t.on_session_ended(c, d) {
                            t.legacy_synced(true);
                            taken += 1;
                            prop_assert!(!stopped);
                        }
                    }
                    Op::Request(c, kind, m, a, p) => {
                        let id = if m == 0 { A } else { B };
                        let request = match kind {
                            0 => join(id, a, if p { JoinPurpose::Copy } else { JoinPurpose::Commit }),
                            1 => HandoffRequest::Prepare { id, size: SIZE },
                            _ => HandoffRequest::Commit { id },
                        };
                        let before = t.phase();
                        let current = t.current;
                        let (reply, effect) = t.on_request(c, &request);
                        match effect {
                            TargetEffect::TakeControl => {
                                taken += 1;
                                prop_assert!(!stopped);
                                prop_assert_eq!(before, TargetPhase::Prepared(id));
                                prop_assert_eq!(current, Some(c));
                                let committed = matches!(reply, HandoffReply::Committed { .. });
                                prop_assert!(committed);
                            }
                            TargetEffect::Close(old) => { fenced.insert(old); }
                            _ => {}
                        }
                        if matches!(reply, HandoffReply::NotPrepared { .. }) {
                            prop_assert!(!t.has_control());
                        }
                        if let HandoffReply::Joined { .. } = reply {
                            fenced.remove(&c);
                        }
                    }
                    Op::SyncFailed => t.sync_failed(),
                    Op::Stop => { stopped = true; t.stop(); }
                }
                prop_assert!(taken <= 1);
                if let Writer::Only(c) = t.writer() {
                    prop_assert!(!fenced.contains(&c), "a fenced connection may write");
                }
                if stopped {
                    prop_assert_eq!(t.writer(), Writer::Nobody);
                }
            }
        }
    }
}
