//! The proxy's connections to upstream: made with the client module's [`connect`] (TCP with
//! timeouts and keepalive, old-style or new-style handshake) and driven by its [`Engine`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::tls::ClientTls;

use crate::client::{
    connect, Acknowledged, ConnectError, ConnectOptions, Connection, Engine, EngineConfig,
    LinkOptions,
};

/// flexnbd's pause between two failed connection attempts (§12.4): always taken.
pub const RETRY_PAUSE: Duration = Duration::from_secs(3);
/// The cap on any single wait while connecting (§12.4: `min(15, T)`).
const WAIT_CAP: Duration = Duration::from_secs(15);
/// Requests a session keeps in flight upstream at most.
pub const IN_FLIGHT: usize = 64;

/// The export as upstream announced it last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

/// How to reach upstream, shared by every session.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    options: ConnectOptions,
    /// The inactivity limit (`FLEXNBD_UPSTREAM_TIMEOUT`).
    pub timeout: Duration,
    /// Size and flags of the last handshake: the hello a new client gets.
    export: Mutex<Export>,
    /// The connection made at startup, kept for the first client.
    spare: Mutex<Option<Connection>>,
}

impl Upstream {
    /// `tls`: upgrade every connection (the first and each reconnection) with STARTTLS.
    pub fn new(
        addr: SocketAddr,
        bind: Option<IpAddr>,
        export: &str,
        timeout: Duration,
        tls: Option<Arc<ClientTls>>,
    ) -> Self {
        let wait = timeout.min(WAIT_CAP);
        Upstream {
            addr,
            options: ConnectOptions {
                bind,
                connect_timeout: wait,
                hello_timeout: wait,
                link: LinkOptions {
                    keepalive_idle: wait,
                    keepalive_interval: Duration::from_secs(5).min(wait),
                    keepalive_probes: 3,
                    user_timeout: timeout,
                },
                export: export.to_owned(),
                tls,
            },
            timeout,
            export: Mutex::new(Export { size: 0, flags: 0 }),
            spare: Mutex::new(None),
        }
    }

    /// The export as last announced.
    pub fn export(&self) -> Export {
        *self.export.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One attempt; a success updates the remembered export (a change is only logged, as in
    /// flexnbd: clients keep the size they were given).
    pub async fn connect_once(&self) -> Result<Connection, ConnectError> {
        let connection = connect(self.addr, &self.options).await?;
        let now = Export {
            size: connection.export.size,
            flags: connection.export.flags,
        };
        let mut known = self.export.lock().unwrap_or_else(|e| e.into_inner());
        if known.size != 0 && *known != now {
            tracing::warn!(
                "Upstream {} changed its export from {} bytes, flags {} to {} bytes, flags {}",
                self.addr,
                known.size,
                known.flags,
                now.size,
                now.flags
            );
        }
        *known = now;
        Ok(connection)
    }

    /// The first connection, at startup: kept for the first client.
    pub async fn connect_first(&self) -> Result<Export, ConnectError> {
        let connection = self.connect_once().await?;
        *self.spare.lock().unwrap_or_else(|e| e.into_inner()) = Some(connection);
        Ok(self.export())
    }

    /// Connects, retrying every [`RETRY_PAUSE`] until it works or `stop` is cancelled
    /// (then `None`). Uses the startup connection if it is still unused.
    pub async fn connect_retrying(&self, stop: &CancellationToken) -> Option<(Connection, u32)> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(connection) = spare {
            return Some((connection, 0));
        }
        let started = Instant::now();
        let mut failures = 0u32;
        loop {
            let attempt = tokio::select! {
                attempt = self.connect_once() => attempt,
                () = stop.cancelled() => return None,
            };
            match attempt {
                Ok(connection) => return Some((connection, failures)),
                Err(e) => {
                    failures += 1;
                    // One line per attempt: every 3 s per session, never a storm.
                    tracing::warn!(
                        "Couldn't reach upstream {} ({e}); attempt {failures} failed, {:.1} s \
                         so far, retrying in {} s",
                        self.addr,
                        started.elapsed().as_secs_f64(),
                        RETRY_PAUSE.as_secs()
                    );
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY_PAUSE) => {}
                () = stop.cancelled() => return None,
            }
        }
    }

    /// Starts an engine on `connection`, with the upstream timeout as inactivity limit.
    pub fn engine(&self, connection: Connection, stop: &CancellationToken) -> Engine {
        Engine::start(
            connection.stream,
            connection.export.flags,
            Arc::new(Acknowledged::default()),
            stop,
            EngineConfig {
                in_flight: IN_FLIGHT,
                zero_size: 1 << 20,
                limit: self.timeout,
            },
        )
    }
}
