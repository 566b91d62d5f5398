//! The actors of a server process and the messages between them.
//!
//! - [`listener::Listener`]: owns the NBD listening socket, the ACL, the client limit and the
//!   registry of sessions; the only actor that knows every session.
//! - [`session::Session`]: one per client connection; decodes requests, does the file I/O
//!   (inline when the page cache has the data, on the blocking pool otherwise) and sends
//!   replies through its own writer task.
//! - [`control::Control`]: the Unix control socket.
//! - [`allocation_map::AllocationMapBuilder`]: the background walk of the file's extents.
//! - [`mirror::Mirror`]: one outbound migration.
//! - [`inbound::Inbound`]: a `listen` server's inbound migration: who may write, the
//!   hand-off, when control is taken.
//! - [`rebind::Rebinder`]: after a received migration, serves the file on a new address.
//!
//! Actors are thin glue: wire formats live in `crate::protocol`, file access in
//! `crate::storage`. See `docs/architecture.md` for the handshakes.

pub mod allocation_map;
pub mod control;
pub mod inbound;
pub mod listener;
pub mod mirror;
mod negotiate;
mod poll;
mod reader;
pub mod rebind;
pub mod session;
pub mod write_queue;
mod writer;

#[cfg(test)]
mod tests;

/// Identifies a session within its listener's registry.
pub type ClientId = u64;

/// What actors tell the process's main task (which owns shutdown and the exit status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// `listen`: the inbound migration completed and this server has control.
    MigrationReceived,
    /// `serve`: the outbound migration handed over (action `exit` or `unlink`): shut down
    /// and exit 0.
    MigrationSent,
    /// `serve`: the outbound migration failed in a way that leaves this server unable to
    /// serve its copy (the source file could not be removed, the hand-off is in doubt):
    /// shut down and exit non-zero.
    MigrationFatal(String),
}

/// The sending side of the main task's event channel.
pub type Events = tokio::sync::mpsc::UnboundedSender<ServerEvent>;
