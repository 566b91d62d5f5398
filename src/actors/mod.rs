//! The actors of a server process and the messages between them.
//!
//! - [`listener::Listener`]: owns the NBD listening socket, the ACL, the client limit and the
//!   registry of sessions; the only actor that knows every session.
//! - [`session::Session`]: one per client connection; decodes requests, does the file I/O
//!   (inline when the page cache has the data, on the blocking pool otherwise) and sends
//!   replies through its own writer task.
//!
//! Actors are thin glue: wire formats live in `crate::protocol`, file access in
//! `crate::storage`. See `docs/architecture.md` for the handshakes.

pub mod allocation_map;
pub mod control;
pub mod listener;
mod reader;
pub mod session;
mod writer;

#[cfg(test)]
mod tests;

/// Identifies a session within its listener's registry.
pub type ClientId = u64;
