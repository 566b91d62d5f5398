//! The control socket's path: checked before the NBD port is bound, bound after it, removed
//! at exit.

use std::cell::Cell;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::bail;

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

    /// Binds the socket. An existing path is refused, never removed: a stale path is the
    /// operator's (or supervisor's) to remove (flexnbd §6.1).
    pub(super) fn bind(path: &Path) -> anyhow::Result<ControlSocket> {
        let listener = UnixListener::bind(path).map_err(|e| {
            anyhow::anyhow!("Couldn't bind control socket to {}: {e}", path.display())
        })?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener: Cell::new(Some(listener)),
            removed: Cell::new(false),
        })
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
