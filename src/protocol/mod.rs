//! Wire formats of NBD, free of I/O and of actix types.
//!
//! Everything here works on byte slices and plain values so that it can be unit-tested,
//! property-tested and fuzzed without a socket. The session actor feeds socket bytes into
//! [`request::RequestFramer`] and turns the frames into file operations; the replies it
//! sends are encoded by [`reply`].
//!
//! Layout of the module:
//! - [`consts`]: magic numbers, transmission flags, command numbers and flags.
//! - [`errno`]: the error values that travel in replies.
//! - [`handshake`]: the old-style hello (new-style negotiation lives beside it).
//! - [`request`]: request headers (28-byte compact, 32-byte extended), the incremental
//!   framer, and the validation rules a server applies before touching the file.
//! - [`reply`]: simple reply headers (and, later, structured chunks).
//! - [`control`]: the control socket's text protocol and the status line.
//! - [`handoff`]: the acknowledged hand-off between two of our servers (extension).
//! - [`client`]: the client side of the handshakes, for the mirror's outbound connection.

pub mod client;
pub mod consts;
pub mod control;
pub mod errno;
pub mod handoff;
pub mod handshake;
pub mod newstyle;
pub mod reply;
pub mod request;
pub mod structured;
mod wire;

pub use consts::*;
pub use errno::Errno;
pub use request::{Command, Request};
