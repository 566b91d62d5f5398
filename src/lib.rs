//! flexnbd: a fast NBD server that serves a disk image and migrates it live.
//!
//! Components, from the wire inwards:
//! - [`protocol`]: NBD wire formats, pure (no I/O, no actix).
//! - [`storage`]: the backing file.
//! - [`actors`]: the listener and one session per client (actix).
//! - [`server`]: builds and runs a `serve` or `listen` server from validated options.
//! - [`cli`]: the `flexnbd` command line; [`logging`]: flexnbd's log line format.
//! - [`acl`], [`addr`], [`net`]: access control, address parsing, socket options.
//! - [`rate`]: pacing a migration to its bandwidth limit.
//! - [`tls`]: TLS credentials, handshakes and the plain-or-TLS transport.

pub mod acl;
pub mod actors;
pub mod addr;
pub mod cli;
pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod logging;
pub mod net;
pub mod protocol;
pub mod proxy;
pub mod rate;
pub mod server;
pub mod storage;
pub mod tls;
