//! systemd's readiness protocol (`sd_notify`), spoken directly: a datagram of
//! `KEY=value` lines to the Unix socket named by `NOTIFY_SOCKET` (a path, or an abstract
//! name written with a leading `@`). No library: the protocol is one `sendto`, and a
//! server run without systemd (no `NOTIFY_SOCKET`) sends nothing at all.
//!
//! What we send and when:
//! - `READY=1` once the NBD port listens and the control socket exists — the moment
//!   flexnbd's contract calls "ready" (clients may connect, `status` answers);
//! - `STATUS=...` while a migration runs (phase, progress, mode), every few seconds, and
//!   when it ends;
//! - `STOPPING=1` when shutdown begins.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where readiness goes, if this process was started by a service manager that asked.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when it is unset, empty or unusable (logged).
    pub fn from_env() -> Option<Notifier> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let name = name.to_str()?.to_owned();
        if name.is_empty() {
            return None;
        }
        match Notifier::to(&name) {
            Ok(notifier) => Some(notifier),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET={name} is not usable ({e}); not notifying");
                None
            }
        }
    }

    fn to(name: &str) -> io::Result<Notifier> {
        let target = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None => SocketAddr::from_pathname(name)?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            target,
        })
    }

    /// Sends `state` (`KEY=value` lines); a failure is logged, never fatal: the server
    /// serves whether or not its supervisor hears it.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.target) {
            tracing::warn!("Couldn't notify the service manager ({state:?}): {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=Shutting down");
    }
}

/// A STATUS value is one line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.to_str().unwrap()).unwrap();
        notifier.ready("Serving disk.img\non 127.0.0.1:4777");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            b"READY=1\nSTATUS=Serving disk.img on 127.0.0.1:4777"
        );

        let name = format!("flexnbd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::to(&format!("@{name}")).unwrap().stopping();
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=Shutting down");
    }
}
