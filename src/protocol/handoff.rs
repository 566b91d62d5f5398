//! The acknowledged hand-off between two of our servers (an extension of the old-style
//! protocol, used only when both ends are ours).
//!
//! C flexnbd hands a migration over with a bare NBD_CMD_DISC: a disconnect never proves that
//! the destination committed anything (flexnbd §13.2). Between two of our servers the
//! source instead asks the destination to make everything durable, and only once it has
//! said so does the source let go of its copy (unlinking it with `--unlink`) and tell the
//! destination to take control:
//!
//! ```text
//! source                                   destination
//!   PROBE (type 0x4650, length 0)   ──▶      answers 0 (a C flexnbd answers EINVAL)
//!   ... all data, acknowledged ...
//!   HANDOFF Prepare{id, size}       ──▶      fdatasync; phase Prepared(id)
//!                                   ◀──      Prepared{id}
//!   (unlink the source file)
//!   HANDOFF Commit{id}              ──▶      has_control = true; phase Committed(id)
//!                                   ◀──      Committed{id}
//! ```
//!
//! A HANDOFF request carries its bincode-encoded message as payload (`length` bytes); a
//! successful reply is a simple reply with error 0 followed by a 32-bit length and the
//! bincode-encoded answer. Messages carry the migration id and are idempotent: a resent
//! Prepare or Commit (after a reconnect) gets the recorded answer. Between Prepared and
//! Committed neither side serves writes: both report the phase `in_doubt` until the hand-off
//! completes or an operator resolves it (`docs/migration.md`).
//!
//! All bincode calls live in this module (bincode is pinned to 2.0.x).

use serde::{Deserialize, Serialize};

/// Request type of the probe. C flexnbd answers EINVAL (an unknown type, after the range
/// check, which offset 0 and length 0 pass); our migration targets answer 0.
pub const PROBE: u16 = 0x4650;
/// Request type of a hand-off message; its payload is the encoded [`HandoffRequest`].
pub const HANDOFF: u16 = 0x4648;
/// Largest encoded message either side accepts.
pub const MAX_MESSAGE: usize = 4096;

/// Identifies one migration (one `mirror` command) across its attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationId(pub [u8; 16]);

impl std::fmt::Display for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Source → destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffRequest {
    /// Every byte has been sent and acknowledged and no client can write to the source any
    /// more: make everything durable. `size` guards against a mix-up of exports.
    Prepare { id: MigrationId, size: u64 },
    /// The source has let go of its copy: take control.
    Commit { id: MigrationId },
}

/// Destination → source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffReply {
    /// Everything received is durable.
    Prepared { id: MigrationId },
    /// The destination has control.
    Committed { id: MigrationId },
    /// The request does not fit the destination's state; nothing changed.
    Refused { reason: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoffError {
    #[error("hand-off message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLong(usize),
    #[error("malformed hand-off message: {0}")]
    Malformed(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE>()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config()).expect("hand-off messages always encode")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, HandoffError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(HandoffError::TooLong(bytes.len()));
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| HandoffError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(HandoffError::Malformed(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}

impl HandoffRequest {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<HandoffRequest, HandoffError> {
        decode(bytes)
    }
}

impl HandoffReply {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<HandoffReply, HandoffError> {
        decode(bytes)
    }
}

/// Where a migration target is in the hand-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetPhase {
    /// Receiving data; the source may still retry from scratch.
    Receiving,
    /// Durable and waiting for Commit: neither side may serve writes ("in doubt" if the
    /// link breaks now).
    Prepared(MigrationId),
    /// Control taken.
    Committed(MigrationId),
}

impl TargetPhase {
    pub fn name(self) -> &'static str {
        match self {
            TargetPhase::Receiving => "receiving",
            TargetPhase::Prepared(_) => "in_doubt",
            TargetPhase::Committed(_) => "committed",
        }
    }
}

/// What the target must do before sending the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetEffect {
    None,
    /// `fdatasync` the export; if that fails, answer Refused instead.
    SyncFirst,
    /// Take control (has_control = true), then answer.
    TakeControl,
}

/// The destination's side of the hand-off, as a pure state machine.
#[derive(Debug)]
pub struct TargetHandoff {
    phase: TargetPhase,
    size: u64,
}

impl TargetHandoff {
    pub fn new(size: u64) -> TargetHandoff {
        TargetHandoff {
            phase: TargetPhase::Receiving,
            size,
        }
    }

    pub fn phase(&self) -> TargetPhase {
        self.phase
    }

    /// Applies a request: the answer to send once the effect has been carried out.
    pub fn on_request(&mut self, request: &HandoffRequest) -> (HandoffReply, TargetEffect) {
        let refuse = |reason: &str| {
            (
                HandoffReply::Refused {
                    reason: reason.to_owned(),
                },
                TargetEffect::None,
            )
        };
        match (*request, self.phase) {
            (HandoffRequest::Prepare { size, .. }, _) if size != self.size => {
                refuse("the export sizes differ")
            }
            (HandoffRequest::Prepare { .. }, TargetPhase::Committed(_)) => {
                refuse("this server has already taken control")
            }
            // A first Prepare, a resent one, or one from a new migration after the old
            // source gave up before committing: all make the data durable again.
            (HandoffRequest::Prepare { id, .. }, _) => {
                self.phase = TargetPhase::Prepared(id);
                (HandoffReply::Prepared { id }, TargetEffect::SyncFirst)
            }
            (HandoffRequest::Commit { id }, TargetPhase::Prepared(p)) if p == id => {
                self.phase = TargetPhase::Committed(id);
                (HandoffReply::Committed { id }, TargetEffect::TakeControl)
            }
            (HandoffRequest::Commit { id }, TargetPhase::Committed(c)) if c == id => {
                (HandoffReply::Committed { id }, TargetEffect::None)
            }
            (HandoffRequest::Commit { .. }, _) => {
                refuse("commit for a migration that is not prepared")
            }
        }
    }
}

// `match (*request, ...)` needs Copy; the enum is small and has no heap data.
impl Copy for HandoffRequest {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: MigrationId = MigrationId([1; 16]);
    const B: MigrationId = MigrationId([2; 16]);

    #[test]
    fn messages_round_trip_and_are_bounded() {
        for request in [
            HandoffRequest::Prepare {
                id: A,
                size: 1 << 30,
            },
            HandoffRequest::Commit { id: B },
        ] {
            assert_eq!(HandoffRequest::decode(&request.encode()), Ok(request));
        }
        let reply = HandoffReply::Refused {
            reason: "no".into(),
        };
        assert_eq!(HandoffReply::decode(&reply.encode()), Ok(reply));
        assert!(matches!(
            HandoffRequest::decode(&[0xff; 5000]),
            Err(HandoffError::TooLong(_))
        ));
        let mut trailing = HandoffRequest::Commit { id: A }.encode();
        trailing.push(0);
        assert!(matches!(
            HandoffRequest::decode(&trailing),
            Err(HandoffError::Malformed(_))
        ));
    }

    #[test]
    fn the_target_commits_only_after_prepare_and_answers_resends_alike() {
        let mut target = TargetHandoff::new(4096);
        assert!(matches!(
            target.on_request(&HandoffRequest::Commit { id: A }).0,
            HandoffReply::Refused { .. }
        ));
        assert_eq!(target.phase(), TargetPhase::Receiving);
        assert!(matches!(
            target
                .on_request(&HandoffRequest::Prepare { id: A, size: 512 })
                .0,
            HandoffReply::Refused { .. }
        ));
        let prepare = HandoffRequest::Prepare { id: A, size: 4096 };
        assert_eq!(
            target.on_request(&prepare),
            (HandoffReply::Prepared { id: A }, TargetEffect::SyncFirst)
        );
        assert_eq!(
            target.on_request(&prepare),
            (HandoffReply::Prepared { id: A }, TargetEffect::SyncFirst)
        );
        assert_eq!(target.phase().name(), "in_doubt");
        assert!(matches!(
            target.on_request(&HandoffRequest::Commit { id: B }).0,
            HandoffReply::Refused { .. }
        ));
        let commit = HandoffRequest::Commit { id: A };
        assert_eq!(
            target.on_request(&commit),
            (HandoffReply::Committed { id: A }, TargetEffect::TakeControl)
        );
        assert_eq!(
            target.on_request(&commit),
            (HandoffReply::Committed { id: A }, TargetEffect::None)
        );
        assert!(matches!(
            target.on_request(&prepare).0,
            HandoffReply::Refused { .. }
        ));
        assert_eq!(target.phase(), TargetPhase::Committed(A));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = HandoffRequest::decode(&bytes);
            let _ = HandoffReply::decode(&bytes);
        }

        #[test]
        fn control_is_taken_at_most_once(ops in proptest::collection::vec((any::<bool>(), any::<bool>()), 0..20)) {
            let mut target = TargetHandoff::new(8192);
            let mut taken = 0;
            for (prepare, first) in ops {
                let id = if first { A } else { B };
                let request = if prepare {
                    HandoffRequest::Prepare { id, size: 8192 }
                } else {
                    HandoffRequest::Commit { id }
                };
                let (reply, effect) = target.on_request(&request);
                if effect == TargetEffect::TakeControl {
                    taken += 1;
                    let committed = matches!(reply, HandoffReply::Committed { .. });
                    prop_assert!(committed);
                }
            }
            prop_assert!(taken <= 1);
        }
    }
}
