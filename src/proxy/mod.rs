//! `flexnbd-proxy`: a resilient NBD proxy (flexnbd §12), pipelined.
//!
//! Clients connect to the proxy (TCP or a UNIX socket; old-style hello by default, fixed
//! new-style with `--newstyle`); each gets its own upstream connection, made and driven by
//! the client module ([`crate::client`]). Requests are forwarded as they arrive, many in
//! flight, and replies relayed as they come. When upstream fails (an end of stream, an
//! error, a bad reply, or no byte moving for `FLEXNBD_UPSTREAM_TIMEOUT` while requests are
//! outstanding) the session reconnects, every 3 s until it works, and sends every
//! unanswered request again in the client's order: the client only sees a delay.
//!
//! - [`options`]: the command line and the environment.
//! - [`rules`]: the pure decisions (request limits, memory budget, prefetch cache).
//! - [`negotiate`]: new-style negotiation towards clients with upstream's flags.
//! - [`upstream`]: connecting and reconnecting to upstream.
//! - [`session`]: one client.
//!
//! The design, its bounds and why resending is safe are in `docs/proxy.md`.

pub mod negotiate;
pub mod options;
pub mod rules;
pub mod session;
pub mod upstream;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::tls::ClientTls;
use crate::{fatal, logging};
use options::{Listen, Options, Parsed, UpstreamTls};
use session::Settings;
use upstream::Upstream;

/// Runs `flexnbd-proxy` with the arguments after the program name; returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let options = match options::parse(&args) {
        Parsed::Run(o) => o,
        Parsed::Help => {
            print!("{}", options::help());
            return 0;
        }
        Parsed::Invalid { message, with_help } => {
            if with_help {
                eprintln!("{message}");
                eprint!("{}", options::help());
            } else {
                logging::init(logging::WARN);
                fatal!("{message}");
            }
            return 1;
        }
    };
    logging::init(options.threshold);
    logging::set_context(&format!(
        "{}:{}",
        options.upstream.ip(),
        options.upstream.port()
    ));
    let env = std::env::var("FLEXNBD_UPSTREAM_TIMEOUT").ok();
    let timeout = options::upstream_timeout(env.as_deref());
    if env.is_some() {
        tracing::info!("Upstream timeout is {} s", timeout.as_secs());
    }
    // One thread: a session's three tasks (client reader, core, upstream reply reader) hand
    // each request and reply to one another; on one thread that is a queue push, across
    // threads a futex wake-up and a context switch per hand-over, which cost more than the
    // forwarding itself (measured: docs/proxy.md, "Speed").
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            fatal!("Couldn't start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(run(options, timeout))
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("couldn't install the signal handlers: {0}")]
    Signals(io::Error),
    #[error("couldn't listen on {0}: {1}")]
    Listen(String, io::Error),
}

/// The three signals that stop the proxy (flexnbd §12.6).
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, ProxyError> {
        let one = |kind| signal(kind).map_err(ProxyError::Signals);
        Ok(Signals {
            int: one(SignalKind::interrupt())?,
            term: one(SignalKind::terminate())?,
            quit: one(SignalKind::quit())?,
        })
    }

    async fn any(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

/// Startup in flexnbd's order (§12.2): signals, then upstream, and only then the listening
/// socket; then the accept loop until a signal.
async fn run(options: Options, timeout: Duration) -> i32 {
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            fatal!("{e}");
            return 1;
        }
    };
    // Credentials are checked whole before anything else: a bad file is a startup error
    // that names it.
    let tls = match &options.upstream_tls {
        None => None,
        Some(UpstreamTls::X509(dir)) => Some(ClientTls::x509(dir)),
        Some(UpstreamTls::Psk(file)) => Some(ClientTls::psk(file, None)),
    };
    let tls = match tls.transpose() {
        Ok(tls) => tls.map(Arc::new),
        Err(e) => {
            fatal!("{e}");
            return 1;
        }
    };
    if let Some(tls) = &tls {
        tracing::info!("Upstream connections use TLS: {}", tls.description);
    }
    let upstream = Arc::new(Upstream::new(
        options.upstream,
        options.bind,
        &options.upstream_export,
        timeout,
        tls,
    ));
    let first = tokio::select! {
        first = upstream.connect_first() => first,
        name = signals.any() => {
            tracing::warn!("Received {name} before upstream answered; exiting");
            return 0;
        }
    };
    match first {
        Ok(export) => tracing::info!(
            "Upstream {} serves {} bytes (flags {})",
            options.upstream,
            export.size,
            export.flags
        ),
        Err(e) => {
            fatal!("Couldn't connect to upstream {}: {e}", options.upstream);
            return 1;
        }
    }
    let listener = match Listener::bind(&options.listen) {
        Ok(l) => l,
        Err(e) => {
            fatal!("{e}");
            return 1;
        }
    };
    let settings = Arc::new(Settings {
        upstream,
        cache: options.cache,
        newstyle: options.newstyle,
        stop: CancellationToken::new(),
    });
    let name = tokio::select! {
        () = listener.accept_loop(&settings) => "an accept failure",
        name = signals.any() => name,
    };
    tracing::warn!("Received {name}; closing every connection and exiting");
    settings.stop.cancel();
    listener.remove_path();
    0
}

/// The listening socket.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(listen: &Listen) -> Result<Listener, ProxyError> {
        match listen {
            Listen::Tcp(addr) => {
                let failed = |e| ProxyError::Listen(addr.to_string(), e);
                let std = crate::net::bind_listener(addr.ip(), addr.port()).map_err(failed)?;
                let listener = TcpListener::from_std(std).map_err(failed)?;
                let local = listener.local_addr().map_err(failed)?;
                tracing::info!("Proxy listening on {local}");
                Ok(Listener::Tcp(listener))
            }
            Listen::Unix(path) => {
                let failed = |e| ProxyError::Listen(path.display().to_string(), e);
                let listener = UnixListener::bind(path).map_err(failed)?;
                tracing::info!("Proxy listening on {}", path.display());
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    /// Accepts clients, one session task each. Accept errors (EMFILE, ...) are logged and
    /// retried after a pause; they never stop the proxy.
    async fn accept_loop(&self, settings: &Arc<Settings>) {
        loop {
            let accepted = match self {
                Listener::Tcp(l) => l.accept().await.map(|(stream, peer)| {
                    if let Err(e) = crate::net::configure_accepted(&stream) {
                        tracing::warn!("Couldn't set the socket options of {peer}: {e}");
                    }
                    let session = session::serve(stream, peer.to_string(), settings.clone());
                    tokio::spawn(session);
                }),
                Listener::Unix(l, path) => l.accept().await.map(|(stream, _)| {
                    let peer = format!("on {}", path.display());
                    tokio::spawn(session::serve(stream, peer, settings.clone()));
                }),
            };
            if let Err(e) = accepted {
                crate::throttled!(error, "Couldn't accept a client: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn remove_path(&self) {
        if let Listener::Unix(_, path) = self {
            remove(path);
        }
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!("Couldn't remove {}: {e}", path.display());
    }
}
