//! The backing file: positional reads and writes, durability, and (later) hole punching and
//! the allocation walk.
//!
//! Nothing here knows about sockets or actors. A [`Backing`] is opened once per server and
//! shared read-only (`Arc`) by every session: all operations are positional, so sessions
//! never contend on a cursor or a lock.

pub mod allocation;
mod backing;
pub mod bitmap;
pub mod dirty;
pub mod lock;
mod mapping;
mod write_behind;

pub use allocation::{AllocationMap, MapState};
pub use backing::{Backing, Extent, NowaitRead, StorageError, ZeroError};
pub use dirty::{DirtyMap, ForwardRequest};
