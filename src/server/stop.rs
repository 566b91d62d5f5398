//! What asks a running server to shut down gracefully from outside: SIGINT, SIGTERM and
//! SIGQUIT, or a [`ShutdownHandle`] (for tests and embedders, which cannot send the
//! process a signal without stopping everything else in it).

use anyhow::Context as _;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Asks a server to shut down as SIGTERM would (same order, same exit status), without a
/// signal. Obtained from [`super::Server::shutdown_handle`]; cloneable and usable from any
/// thread, before or while the server runs. Once the server has ended it does nothing.
///
/// The only difference from a signal is the log line: "Received a shutdown request:
/// shutting down" instead of "Received SIGTERM: shutting down".
#[derive(Clone, Debug)]
pub struct ShutdownHandle(UnboundedSender<()>);

impl ShutdownHandle {
    /// Requests the graceful shutdown. Requests after the first change nothing.
    pub fn shut_down(&self) {
        // The server may be gone already: then there is nothing left to stop.
        let _ = self.0.send(());
    }
}

/// The receiving side of the [`ShutdownHandle`]s of one server, created with it.
pub(super) struct Requests {
    rx: UnboundedReceiver<()>,
    /// Keeps the channel open while no handle exists, so that `recv` waits rather than
    /// ending.
    tx: UnboundedSender<()>,
}

impl Requests {
    pub(super) fn new() -> Requests {
        let (tx, rx) = unbounded_channel();
        Requests { rx, tx }
    }

    pub(super) fn handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.tx.clone())
    }
}

/// SIGINT, SIGTERM and SIGQUIT, the signals that start a graceful shutdown, and the
/// server's shutdown requests.
pub(super) struct Stop {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    requests: Requests,
}

impl Stop {
    /// Installs the signal handlers (inside the server's runtime).
    pub(super) fn install(requests: Requests) -> anyhow::Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Stop {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            quit: signal(SignalKind::quit()).context("installing the SIGQUIT handler")?,
            requests,
        })
    }

    /// Waits for a signal or a request and names it for the log line.
    pub(super) async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
            // Never `None`: `Requests` holds a sender.
            Some(()) = self.requests.rx.recv() => "a shutdown request",
        }
    }
}
