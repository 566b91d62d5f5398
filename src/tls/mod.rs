//! TLS for NBD: credentials, the handshakes and the transport both sides use.
//!
//! The stack is OpenSSL (the `openssl` and `tokio-openssl` crates): rustls has no
//! external-PSK support, and PSK must interoperate with GnuTLS (qemu, nbdkit) in the
//! `username:hexkey` format of `psktool`, which OpenSSL's PSK callbacks do.
//!
//! - [`TlsMode`]: `off`, `on` (clients may upgrade) or `require`.
//! - Credentials, checked whole when loaded so that a bad file stops a server at startup
//!   with an error naming it: [`X509Dir`] (a directory laid out as qemu's `tls-creds-x509`
//!   expects) and [`PskFile`] (psktool's `username:hexkey` lines).
//! - [`ServerTls`] and [`ClientTls`]: the configured contexts (TLS 1.2 at least), built
//!   once and shared by every connection.
//! - [`accept`] and [`connect`]: the handshakes, bounded by a timeout, with errors a
//!   person can act on ([`TlsError`]).
//! - [`Stream`], [`ReadHalf`], [`WriteHalf`]: plain TCP or TLS behind one type. The plain
//!   case is the TCP socket itself (its split costs nothing), so serving without TLS pays
//!   one branch per call.
//!
//! Records: OpenSSL's maximum (16 KiB of plaintext per record) is kept. Each `write` call
//! on a TLS stream becomes at least one record, so a writer should hand a reply header and
//! its payload to one write (or one vectored write, which [`WriteHalf`] coalesces when it is
//! small) rather than writing a 16-byte header on its own, which would cost a record (and
//! its 22+ bytes of overhead and a MAC) per reply.

mod creds;
mod handshake;
mod stream;
#[doc(hidden)]
pub mod testing;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use creds::{PskEntry, PskFile, X509Dir, X509Role};
pub use handshake::{accept, connect, ClientTls, ServerTls};
pub use stream::{ReadHalf, Stream, WriteHalf};

/// How long a TLS handshake may take, by default, before the connection is dropped: a peer
/// that stalls must not hold a connection (or a client slot) for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a server offers TLS, and whether it insists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused.
    #[default]
    Off,
    /// Clients may upgrade with STARTTLS; plain clients are served as before.
    On,
    /// Every option but STARTTLS and ABORT is refused until the client has upgraded.
    Require,
}

impl TlsMode {
    /// Parses `off`, `on` or `require`.
    pub fn parse(text: &str) -> Result<TlsMode, TlsError> {
        match text {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            other => Err(TlsError::BadMode(other.to_owned())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TlsMode {
    type Err = TlsError;
    fn from_str(text: &str) -> Result<TlsMode, TlsError> {
        TlsMode::parse(text)
    }
}

/// Everything that can go wrong with TLS: loading credentials, building a context, a
/// handshake. The texts name the file or the peer and say what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS mode must be 'off', 'on' or 'require', not {0:?}")]
    BadMode(String),
    #[error("{}: missing", .0.display())]
    Missing(PathBuf),
    #[error("{}: unreadable: {why}", path.display())]
    Unreadable { path: PathBuf, why: String },
    #[error("{}: not a PEM {what}{}", path.display(), detail(why))]
    NotPem {
        path: PathBuf,
        what: &'static str,
        why: String,
    },
    #[error("{}: the private key does not match the certificate {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("{}: the certificate expired on {when}", path.display())]
    Expired { path: PathBuf, when: String },
    #[error("{}: the certificate is not valid before {when}", path.display())]
    NotYetValid { path: PathBuf, when: String },
    #[error("{}: {present} is there but {absent} is missing (give both or neither)", dir.display())]
    HalfPair {
        dir: PathBuf,
        present: &'static str,
        absent: &'static str,
    },
    #[error("{}, line {line}: {why}", path.display())]
    PskLine {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{}: no 'username:hexkey' line", .0.display())]
    PskEmpty(PathBuf),
    #[error("{}: no key for the username {user:?}", path.display())]
    PskNoUser { path: PathBuf, user: String },
    /// OpenSSL refused our configuration (should not happen with checked credentials).
    #[error("setting up TLS failed: {0}")]
    Setup(String),
    #[error("TLS handshake with {peer} did not complete within {limit:?}")]
    Timeout { peer: String, limit: Duration },
    #[error("{peer} closed the connection during the TLS handshake{}", detail(why))]
    PeerClosed { peer: String, why: String },
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
}

fn detail(why: &str) -> String {
    if why.is_empty() {
        String::new()
    } else {
        format!(" ({why})")
    }
}

impl From<openssl::error::ErrorStack> for TlsError {
    fn from(e: openssl::error::ErrorStack) -> TlsError {
        TlsError::Setup(e.to_string())
    }
}

#[cfg(test)]
mod tests;
