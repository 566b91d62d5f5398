//! The rebinding actor (`listen --rebind-addr ADDR --rebind-port PORT`).
//!
//! After a completed inbound migration the process does not exit: main closes the listen
//! socket (the migration listener shuts down first, so the file is never served from two
//! places) and starts a `Rebinder`, which binds the serving address and starts a serve-mode
//! [`Listener`] there, keeping the control socket. Binding fails while the old source is
//! still exiting (address in use) or the address is not configured yet: those errors are
//! retried (every 50 ms for the first 3 s, since the old source usually lets go within
//! milliseconds, then once a second), logged and shown in `status` at most once a second;
//! it never gives up silently.
//!
//! # Handshakes
//! - Rebinder → control: [`RebindState`] at each step (shown in `status`), then
//!   [`ReplaceListener`] once the new listener runs.
//! - Rebinder → main: the new listener's address (or the error that cannot clear) on the
//!   oneshot given at start; the rebinder then stops.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::control::{Control, RebindState, ReplaceListener};
use super::listener::{Listener, ListenerConfig};

/// Binding is retried this often for the first [`FAST_FOR`] (the old source usually frees
/// the port within milliseconds of the hand-off, and every retry interval adds to the pause
/// clients see), then once a second. Failures are logged and reported at most once a second.
const FAST_RETRY: Duration = Duration::from_millis(50);
const FAST_FOR: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_secs(1);

pub struct Rebinder {
    target: SocketAddr,
    config: Option<ListenerConfig>,
    control: Option<Addr<Control>>,
    done: Option<oneshot::Sender<Result<Addr<Listener>, String>>>,
    attempts: u64,
    started: std::time::Instant,
    /// When a failure was last logged.
    last_report: Option<std::time::Instant>,
}

impl Rebinder {
    pub fn new(
        target: SocketAddr,
        config: ListenerConfig,
        control: Option<Addr<Control>>,
        done: oneshot::Sender<Result<Addr<Listener>, String>>,
    ) -> Rebinder {
        Rebinder {
            target,
            config: Some(config),
            control,
            done: Some(done),
            attempts: 0,
            started: std::time::Instant::now(),
            last_report: None,
        }
    }

    fn report(&self, state: String) {
        if let Some(control) = &self.control {
            control.do_send(RebindState(state));
        }
    }

    fn try_bind(&mut self, ctx: &mut Context<Self>) {
        self.attempts += 1;
        match crate::net::bind_listener_once(self.target.ip(), self.target.port()) {
            Ok(socket) => {
                let Some(config) = self.config.take() else {
                    return;
                };
                let local = socket.local_addr().map_or(self.target, |a| a);
                let listener = Listener::new(socket, config).start();
                tracing::info!("Serving the received export on {local}");
                self.report("serving".into());
                if let Some(control) = &self.control {
                    control.do_send(ReplaceListener(listener.clone()));
                }
                if let Some(done) = self.done.take() {
                    let _ = done.send(Ok(listener));
                }
                ctx.stop();
            }
            Err(e) if retryable(&e) => {
                if self.last_report.is_none_or(|t| t.elapsed() >= RETRY) {
                    tracing::warn!(
                        "Couldn't bind {} yet ({e}); retrying (attempt {})",
                        self.target,
                        self.attempts
                    );
                    self.report(format!("waiting:{}", reason(&e)));
                    self.last_report = Some(std::time::Instant::now());
                }
                let delay = if self.started.elapsed() < FAST_FOR {
                    FAST_RETRY
                } else {
                    RETRY
                };
                ctx.run_later(delay, |act, ctx| act.try_bind(ctx));
            }
            Err(e) => {
                let why = format!(
                    "Couldn't bind {} to serve the received export: {e}",
                    self.target
                );
                tracing::error!("{why}");
                self.report("failed".into());
                if let Some(done) = self.done.take() {
                    let _ = done.send(Err(why));
                }
                ctx.stop();
            }
        }
    }
}

/// Errors that may clear by themselves: the old source still holds the port, the address
/// is not configured yet, a privileged port whose permission may be granted.
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL) | Some(libc::EACCES)
    )
}

fn reason(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => "address_in_use",
        Some(libc::EADDRNOTAVAIL) => "address_not_available",
        _ => "permission_denied",
    }
}

impl Actor for Rebinder {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.report("binding".into());
        self.try_bind(ctx);
    }
}
