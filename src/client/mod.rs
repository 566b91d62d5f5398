//! An NBD client over TCP, free of actix: what the mirror uses to reach its destination,
//! and what a proxy can reuse.
//!
//! - [`connect()`]: the TCP connection with its timeouts and socket options (keepalive and
//!   TCP_USER_TIMEOUT, so a dead link is noticed), then the handshake, old-style or fixed
//!   new-style, driven by the pure [`crate::protocol::client::ClientHandshake`].
//! - [`Engine`]: the transmission phase: requests pipelined on the write half, replies
//!   matched by cookie on a reader task, an inactivity limit, and no two overlapping writes
//!   in flight. It reports acknowledged bytes through [`Acknowledged`], a shared counter.
//!   [`Engine::forward`] (or [`Engine::queue`] and [`Engine::flush_queue`], to batch) carries
//!   any request as it came and hands its [`Answer`] back: what `flexnbd-proxy` relays to
//!   its clients.
//!
//! Configuration comes in as values ([`ConnectOptions`], [`EngineConfig`]); nothing here
//! reads the environment.

pub mod connect;
pub mod engine;

pub use connect::{connect, ConnectError, ConnectOptions, Connection, LinkOptions};
pub use engine::{Ack, Acknowledged, Answer, Engine, EngineConfig, EngineError, Forward};
