//! The control socket's path: checked before the NBD port is bound, bound after it, removed
//! at exit.
//!
//! A path left behind by a server that died (`kill -9`, a crash) would otherwise stop every
//! restart under a supervisor until someone deletes it; so an existing path is looked at
//! before it is refused: a socket nothing accepts on is removed (and the log says so); a
//! socket a live server answers on is refused, naming that server's pid; anything else is
//! refused and left alone.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

/// How long a live server on an existing path has to answer `status`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What an existing control socket path turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    /// Not a socket: never ours to remove.
    NotASocket,
    /// A socket nothing accepts on: left behind by a server that died.
    Stale,
    /// A live server answers on it, with its pid when it told it.
    Live(Option<u32>),
}

/// The control socket's path, removed when the server exits (on every path this process
/// controls: a clean shutdown, and errors after the socket was created).
pub(super) struct ControlSocket {
    path: PathBuf,
    listener: Cell<Option<UnixListener>>,
    removed: Cell<bool>,
}

impl ControlSocket {
    /// Unix socket paths longer than this do not fit `sockaddr_un` (C flexnbd silently
    /// truncated them).
    const MAX_PATH: usize = 107;

    pub(super) fn check_path(path: &Path) -> anyhow::Result<()> {
        let len = path.as_os_str().len();
        if len > Self::MAX_PATH {
            bail!(
                "Control socket path {} is {len} bytes long; at most {} fit",
                path.display(),
                Self::MAX_PATH
            );
        }
        Ok(())
    }

    /// Binds the socket. An existing path is removed only when it is a socket nothing
    /// accepts on (see the module docs); otherwise it is refused and left as it is.
    pub(super) fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
        let listener = match UnixListener::bind(path) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Self::replace_stale(path, e)?;
                UnixListener::bind(path)
            }
            other => other,
        }
        .map_err(|e| anyhow::anyhow!("Couldn't bind control socket to {}: {e}", path.display()))?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener: Cell::new(Some(listener)),
            removed: Cell::new(false),
        })
    }

    /// `path` exists (`error` is what binding it said): removes it if it is a stale socket,
    /// fails otherwise.
    fn replace_stale(path: &Path, error: std::io::Error) -> anyhow::Result<()> {
        let shown = path.display();
        match Self::look_at(path) {
            Existing::Stale => {
                tracing::warn!(
                    "Removing the control socket {shown} left behind by a server that is gone (nothing accepts on it)"
                );
                std::fs::remove_file(path)
                    .map_err(|e| anyhow::anyhow!("Couldn't remove the stale control socket {shown}: {e}"))
            }
            Existing::Live(Some(pid)) => bail!(
                "Couldn't bind control socket to {shown}: a running flexnbd (pid {pid}) answers on it"
            ),
            Existing::Live(None) => bail!(
                "Couldn't bind control socket to {shown}: a running process accepts connections on it"
            ),
            Existing::NotASocket => bail!(
                "Couldn't bind control socket to {shown}: {error} (it is not a socket; remove it if nothing needs it)"
            ),
        }
    }

    fn look_at(path: &Path) -> Existing {
        let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
        if !is_socket {
            return Existing::NotASocket;
        }
        match UnixStream::connect(path) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Existing::Stale,
            Err(_) => Existing::NotASocket,
            Ok(stream) => Existing::Live(Self::pid_of(stream)),
        }
    }

    /// Asks the server on `stream` for its status and reads its pid.
    fn pid_of(mut stream: UnixStream) -> Option<u32> {
        stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
        stream.write_all(b"status\n\n").ok()?;
        let mut answer = Vec::new();
        let _ = stream.take(4096).read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        answer
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix("pid="))
            .and_then(|pid| pid.parse().ok())
    }

    pub(super) fn take_listener(&self) -> UnixListener {
        self.listener
            .take()
            .expect("the control socket is handed over once")
    }

    pub(super) fn remove(&self) {
        if !self.removed.replace(true) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(
                    "Couldn't remove the control socket {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert_eq!(ControlSocket::look_at(&stale), Existing::Stale);
        let socket = ControlSocket::bind(&stale).expect("a stale socket is replaced");
        assert_eq!(
            ControlSocket::look_at(&stale),
            Existing::Live(None),
            "bound again (nobody answers status here)"
        );
        drop(socket);

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let error = ControlSocket::bind(&file)
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("not a socket"), "{error}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x");

        let live = dir.path().join("live.sock");
        let listener = UnixListener::bind(&live).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 8];
            conn.read_exact(&mut request).unwrap();
            conn.write_all(b"0: pid=4242 size=0 \n").unwrap();
        });
        let error = ControlSocket::bind(&live)
            .err()
            .expect("refused")
            .to_string();
        server.join().unwrap();
        assert!(error.contains("pid 4242"), "{error}");
        assert!(live.exists());
    }
}
