//! The acknowledged hand-off between two of our servers (an extension of the old-style
//! protocol, used only when both ends are ours).
//!
//! C flexnbd hands a migration over with a bare NBD_CMD_DISC: a disconnect never proves that
//! the destination committed anything (flexnbd §13.2). Between two of our servers the
//! source instead identifies every connection of a migration, asks the destination to make
//! everything durable, and only once it has said so lets go of its copy and tells the
//! destination to take control:
//!
//! ```text
//! source                                   destination
//!   PROBE (type 0x4650, length 0)   ──▶      answers 0 (a C flexnbd answers EINVAL)
//!   HANDOFF Join{id, attempt, why}  ──▶      fences older attempts' connections
//!                                   ◀──      Joined{id, attempt}
//!   ... all data, acknowledged ...
//!   HANDOFF Prepare{id, size}       ──▶      no more writes; fdatasync; phase Prepared(id)
//!                                   ◀──      Prepared{id}
//!   (unlink the source file)
//!   HANDOFF Commit{id}              ──▶      has_control = true; phase Committed(id)
//!                                   ◀──      Committed{id}
//! ```
//!
//! A HANDOFF request carries its bincode-encoded message as payload (`length` bytes); a
//! successful reply is a simple reply with error 0 followed by a 32-bit length and the
//! bincode-encoded answer ([`encode_answer`]). Messages carry the migration id and are
//! idempotent: a resent Prepare or Commit (after a reconnect) gets the recorded answer.
//!
//! Each side's half is a pure state machine: [`target::TargetHandoff`] decides who may write
//! on the destination and when it takes control; [`source::SourceHandoff`] decides when the
//! source may serve, must refuse, or may never serve again. The rules that make the pair
//! safe are written next to each type.
//!
//! All bincode calls live in this module (bincode is pinned to 2.0.x). New variants are only
//! ever added at the end of an enum, so that older encodings keep their meaning.

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub mod model;
pub mod source;
pub mod target;

/// Request type of the probe. C flexnbd answers EINVAL (an unknown type, after the range
/// check, which offset 0 and length 0 pass); our migration targets answer 0.
pub const PROBE: u16 = 0x4650;
/// Request type of a hand-off message; its payload is the encoded [`HandoffRequest`].
pub const HANDOFF: u16 = 0x4648;
/// Request type asking a server of ours who it is (offset 0, length 0, no payload). Every
/// server of ours (`serve` and `listen`) answers 0 followed by the encoded [`Identity`]
/// (as a hand-off answer is framed); C flexnbd, qemu-nbd and nbdkit answer an error. A
/// migration source asks first, and refuses a destination that is itself or that serves
/// the same file: mirroring a file into itself overwrites what clients write meanwhile.
pub const IDENTIFY: u16 = 0x4649;

/// Who a server of ours is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Random per server process.
    pub server: [u8; 16],
    /// The host's boot id: device and inode numbers only compare within one boot of one
    /// host.
    pub boot: [u8; 16],
    /// Device and inode of the exported file.
    pub dev: u64,
    pub ino: u64,
}

/// Why a destination must not receive this server's migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameAs {
    /// The destination is this very server.
    ThisServer,
    /// The destination is another server exporting this server's file.
    ThisFile,
}

impl Identity {
    /// Whether `other` (a destination) is this server or serves this server's file.
    pub fn conflicts_with(&self, other: &Identity) -> Option<SameAs> {
        if self.server == other.server {
            Some(SameAs::ThisServer)
        } else if self.boot == other.boot && self.dev == other.dev && self.ino == other.ino {
            Some(SameAs::ThisFile)
        } else {
            None
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Identity, HandoffError> {
        decode(bytes)
    }
}
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

/// Why a source connects: to copy (a fresh attempt, which sends data) or to resend Commit
/// after the answer to an earlier one was lost (it sends nothing but Commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinPurpose {
    /// A new attempt from scratch. The source sends this only while it has never written
    /// a Commit for this migration, so it also proves that no Commit is on its way.
    Copy,
    /// Resending Commit: the source may have committed and waits for the answer.
    Commit,
}

/// Source → destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffRequest {
    /// Every byte has been sent and acknowledged and no client can write to the source any
    /// more: make everything durable. `size` guards against a mix-up of exports.
    Prepare { id: MigrationId, size: u64 },
    /// The source has let go of its copy: take control.
    Commit { id: MigrationId },
    /// The first message on every connection of a migration. `attempt` grows with every
    /// connection the source makes for this migration (a retry from scratch, or a
    /// reconnection to resend Commit), so the destination can tell a stale connection (one
    /// stuck on a dead path whose queued bytes arrive late) from the current one.
    Join {
        id: MigrationId,
        attempt: u64,
        purpose: JoinPurpose,
    },
}

/// Destination → source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffReply {
    /// Everything received is durable, and no write is accepted until the migration is
    /// committed or a new attempt joins.
    Prepared { id: MigrationId },
    /// The destination has control.
    Committed { id: MigrationId },
    /// The request does not fit the destination's state; nothing changed. Proves nothing
    /// about whether the destination took control.
    Refused { reason: String },
    /// This connection carries the migration's current attempt; older attempts are fenced.
    Joined { id: MigrationId, attempt: u64 },
    /// The answer to a Commit that proves the destination has not taken control for this
    /// migration and never will (it is not prepared for it, and only the source can
    /// prepare it again). The source may serve again.
    NotPrepared { id: MigrationId },
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

/// The answer to a HANDOFF request after its simple reply header: a 32-bit length, then
/// the encoded answer.
pub fn encode_answer(reply: &HandoffReply) -> Vec<u8> {
    framed(reply.encode())
}

/// The answer to an IDENTIFY request after its simple reply header.
pub fn encode_identity(identity: &Identity) -> Vec<u8> {
    framed(identity.encode())
}

fn framed(encoded: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + encoded.len());
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    body
}

/// The length announced in front of an answer, bounded before anyone trusts it.
pub fn answer_length(prefix: [u8; 4]) -> Result<usize, HandoffError> {
    let n = u32::from_be_bytes(prefix) as usize;
    if n > MAX_MESSAGE {
        return Err(HandoffError::TooLong(n));
    }
    Ok(n)
}

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
            HandoffRequest::Join {
                id: A,
                attempt: u64::MAX,
                purpose: JoinPurpose::Commit,
            },
        ] {
            assert_eq!(HandoffRequest::decode(&request.encode()), Ok(request));
        }
        for reply in [
            HandoffReply::Refused {
                reason: "no".into(),
            },
            HandoffReply::Joined { id: A, attempt: 7 },
            HandoffReply::NotPrepared { id: B },
        ] {
            assert_eq!(HandoffReply::decode(&reply.encode()), Ok(reply));
        }
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

    /// The variant index is the first byte of an encoding: test relays (and older peers)
    /// rely on these never moving.
    #[test]
    fn variant_numbers_are_stable() {
        let first = |v: Vec<u8>| v[0];
        assert_eq!(
            first(HandoffRequest::Prepare { id: A, size: 1 }.encode()),
            0
        );
        assert_eq!(first(HandoffRequest::Commit { id: A }.encode()), 1);
        let join = HandoffRequest::Join {
            id: A,
            attempt: 1,
            purpose: JoinPurpose::Copy,
        };
        assert_eq!(first(join.encode()), 2);
        assert_eq!(first(HandoffReply::Prepared { id: A }.encode()), 0);
        assert_eq!(first(HandoffReply::Committed { id: A }.encode()), 1);
        let refused = HandoffReply::Refused { reason: "x".into() };
        assert_eq!(first(refused.encode()), 2);
        assert_eq!(
            first(HandoffReply::Joined { id: A, attempt: 1 }.encode()),
            3
        );
        assert_eq!(first(HandoffReply::NotPrepared { id: A }.encode()), 4);
    }

    #[test]
    fn identities_round_trip_and_conflict_only_with_the_same_server_or_file() {
        let me = Identity {
            server: [1; 16],
            boot: [2; 16],
            dev: 3,
            ino: 4,
        };
        let framed = encode_identity(&me);
        let n = answer_length(framed[..4].try_into().unwrap()).unwrap();
        assert_eq!(Identity::decode(&framed[4..4 + n]), Ok(me));
        assert_eq!(me.conflicts_with(&me), Some(SameAs::ThisServer));
        let twin = Identity {
            server: [9; 16],
            ..me
        };
        assert_eq!(me.conflicts_with(&twin), Some(SameAs::ThisFile));
        let other_host = Identity {
            boot: [8; 16],
            ..twin
        };
        assert_eq!(me.conflicts_with(&other_host), None);
        let other_file = Identity { ino: 5, ..twin };
        assert_eq!(me.conflicts_with(&other_file), None);
    }

    #[test]
    fn answers_are_framed_with_a_bounded_length() {
        let reply = HandoffReply::Committed { id: A };
        let framed = encode_answer(&reply);
        let n = answer_length(framed[..4].try_into().unwrap()).unwrap();
        assert_eq!(HandoffReply::decode(&framed[4..4 + n]), Ok(reply));
        assert_eq!(
            answer_length((MAX_MESSAGE as u32 + 1).to_be_bytes()),
            Err(HandoffError::TooLong(MAX_MESSAGE + 1))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = HandoffRequest::decode(&bytes);
            let _ = HandoffReply::decode(&bytes);
        }
    }
}
