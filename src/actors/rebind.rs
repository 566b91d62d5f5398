//! The rebinding actor (`listen --rebind-addr ADDR --rebind-port PORT`).
//!
//! After a completed inbound migration the process does not exit: main closes the listen
//! socket (the migration listener shuts down first, so the file is never served from two
//! places) and starts a `Rebinder`, which binds the serving address and starts a serve-mode
//! [`Listener`] there, keeping the control socket. Binding fails while the old source is
//! still exiting (address in use) or the address is not configured yet: those errors are
//! retried once a second, logged and shown in `status`; it never gives up silently.
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

const RETRY: Duration = Duration::from_secs(1);

pub struct Rebinder {
    target: SocketAddr,
    config: Option<ListenerConfig>,
    control: Option<Addr<Control>>,
    done: Option<oneshot::Sender<Result<Addr<Listener>, String>>>,
    attempts: u64,
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
                tracing::warn!(
                    "Couldn't bind {} yet ({e}); retrying every second (attempt {})",
                    self.target,
                    self.attempts
                );
                self.report(format!("waiting:{}", reason(&e)));
                ctx.run_later(RETRY, |act, ctx| act.try_bind(ctx));
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
