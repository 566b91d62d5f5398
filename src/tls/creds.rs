//! Loading credentials: x509 directories and PSK files, checked whole at load time so that
//! every error names the file and says what is wrong, before any client connects.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Time, Asn1TimeRef};
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use super::TlsError;

/// The CA certificate(s) every x509 directory holds.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Longest PSK identity we accept: OpenSSL's limit in every version we build against.
pub const MAX_PSK_IDENTITY: usize = 128;
/// Longest PSK we accept (bytes): OpenSSL 1.1's limit; psktool makes 32-byte keys.
pub const MAX_PSK_KEY: usize = 256;

/// Which side an x509 directory is for: which of its files are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum X509Role {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, all required.
    Server,
    /// `ca-cert.pem`; `client-cert.pem` and `client-key.pem` together or not at all.
    Client,
}

/// An x509 credentials directory as qemu's `tls-creds-x509` object reads it (and nbdkit's
/// `--tls-certificates`), loaded and checked.
#[derive(Clone)]
pub struct X509Dir {
    pub dir: PathBuf,
    /// Trusted CAs: a peer's chain must end at one of them.
    pub ca: Vec<X509>,
    /// Our certificate first, then intermediates; `None` for a client without one.
    pub chain: Option<Vec<X509>>,
    pub key: Option<PKey<Private>>,
}

impl fmt::Debug for X509Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Dir")
            .field("dir", &self.dir)
            .field("ca", &self.ca.len())
            .field("has_certificate", &self.chain.is_some())
            .finish()
    }
}

impl X509Dir {
    /// Loads `dir` for `role`, checking that every file is there, is PEM of the right kind,
    /// that each certificate is valid now and that the key matches the certificate.
    pub fn load(dir: &Path, role: X509Role) -> Result<X509Dir, TlsError> {
        if !dir.is_dir() {
            return Err(match std::fs::metadata(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => TlsError::Missing(dir.into()),
                Err(e) => TlsError::Unreadable {
                    path: dir.into(),
                    why: e.to_string(),
                },
                Ok(_) => TlsError::Unreadable {
                    path: dir.into(),
                    why: "not a directory".into(),
                },
            });
        }
        let ca = certificates(&dir.join(CA_CERT))?;
        let (cert_name, key_name) = match role {
            X509Role::Server => (SERVER_CERT, SERVER_KEY),
            X509Role::Client => (CLIENT_CERT, CLIENT_KEY),
        };
        let (cert_path, key_path) = (dir.join(cert_name), dir.join(key_name));
        if role == X509Role::Client {
            match (cert_path.exists(), key_path.exists()) {
                (false, false) => {
                    return Ok(X509Dir {
                        dir: dir.into(),
                        ca,
                        chain: None,
                        key: None,
                    })
                }
                (true, false) => {
                    return Err(TlsError::HalfPair {
                        dir: dir.into(),
                        present: cert_name,
                        absent: key_name,
                    })
                }
                (false, true) => {
                    return Err(TlsError::HalfPair {
                        dir: dir.into(),
                        present: key_name,
                        absent: cert_name,
                    })
                }
                (true, true) => {}
            }
        }
        let chain = certificates(&cert_path)?;
        let key = private_key(&key_path)?;
        let matches = chain[0]
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(TlsError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        Ok(X509Dir {
            dir: dir.into(),
            ca,
            chain: Some(chain),
            key: Some(key),
        })
    }
}

/// Reads a file, telling a missing one from an unreadable one.
pub(super) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => TlsError::Missing(path.into()),
        _ => TlsError::Unreadable {
            path: path.into(),
            why: e.to_string(),
        },
    })
}

/// The certificates of a PEM file (at least one), each valid now.
fn certificates(path: &Path) -> Result<Vec<X509>, TlsError> {
    let pem = read(path)?;
    let not_pem = |why: String| TlsError::NotPem {
        path: path.into(),
        what: "certificate",
        why,
    };
    let certs = X509::stack_from_pem(&pem).map_err(|e| not_pem(first_reason(&e)))?;
    if certs.is_empty() {
        return Err(not_pem("no CERTIFICATE block".into()));
    }
    let now = Asn1Time::days_from_now(0)?;
    for cert in &certs {
        check_validity(path, cert.not_before(), cert.not_after(), &now)?;
    }
    Ok(certs)
}

fn check_validity(
    path: &Path,
    not_before: &Asn1TimeRef,
    not_after: &Asn1TimeRef,
    now: &Asn1Time,
) -> Result<(), TlsError> {
    if not_after < now {
        return Err(TlsError::Expired {
            path: path.into(),
            when: not_after.to_string(),
        });
    }
    if not_before > now {
        return Err(TlsError::NotYetValid {
            path: path.into(),
            when: not_before.to_string(),
        });
    }
    Ok(())
}

fn private_key(path: &Path) -> Result<PKey<Private>, TlsError> {
    let pem = read(path)?;
    if pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(TlsError::NotPem {
            path: path.into(),
            what: "private key",
            why: "the key is encrypted; give it unencrypted".into(),
        });
    }
    PKey::private_key_from_pem(&pem).map_err(|e| TlsError::NotPem {
        path: path.into(),
        what: "private key",
        why: first_reason(&e),
    })
}

/// OpenSSL's reason for the first error of a stack, for a short message.
fn first_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|e| e.reason())
        .unwrap_or("")
        .to_owned()
}

/// One line of a PSK file.
#[derive(Clone, PartialEq, Eq)]
pub struct PskEntry {
    pub username: String,
    pub key: Vec<u8>,
}

/// Never prints the key.
impl fmt::Debug for PskEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskEntry")
            .field("username", &self.username)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

/// A PSK file in the format of GnuTLS's `psktool` (what qemu's `tls-creds-psk` and
/// nbdkit's `--tls-psk` read): one `username:hexkey` line per identity.
#[derive(Clone, Debug)]
pub struct PskFile {
    pub path: PathBuf,
    pub entries: Vec<PskEntry>,
}

impl PskFile {
    /// Loads and checks every line (empty lines are skipped, as GnuTLS does).
    pub fn load(path: &Path) -> Result<PskFile, TlsError> {
        let text = read(path)?;
        let entries = Self::parse(path, &text)?;
        Ok(PskFile {
            path: path.into(),
            entries,
        })
    }

    /// Parses the contents of `path`.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Vec<PskEntry>, TlsError> {
        let bad = |line: usize, why: &str| TlsError::PskLine {
            path: path.into(),
            line,
            why: why.to_owned(),
        };
        let mut entries = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(raw) = std::str::from_utf8(raw) else {
                return Err(bad(line, "not UTF-8 text"));
            };
            let Some((user, hex)) = raw.split_once(':') else {
                return Err(bad(line, "expected 'username:hexkey'"));
            };
            if user.is_empty() {
                return Err(bad(line, "empty username"));
            }
            if user.len() > MAX_PSK_IDENTITY {
                return Err(bad(
                    line,
                    &format!("username longer than {MAX_PSK_IDENTITY} bytes"),
                ));
            }
            let key = decode_hex(hex.trim_end()).map_err(|why| bad(line, why))?;
            if key.len() > MAX_PSK_KEY {
                return Err(bad(line, &format!("key longer than {MAX_PSK_KEY} bytes")));
            }
            entries.push(PskEntry {
                username: user.to_owned(),
                key,
            });
        }
        if entries.is_empty() {
            return Err(TlsError::PskEmpty(path.into()));
        }
        Ok(entries)
    }

    /// The key of `identity`, if the file has it.
    pub fn key(&self, identity: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| e.username.as_bytes() == identity)
            .map(|e| &e.key[..])
    }

    /// The entry a client uses: `username`'s, or the file's first one.
    pub fn client_entry(&self, username: Option<&str>) -> Result<&PskEntry, TlsError> {
        match username {
            None => Ok(&self.entries[0]),
            Some(user) => self
                .entries
                .iter()
                .find(|e| e.username == user)
                .ok_or_else(|| TlsError::PskNoUser {
                    path: self.path.clone(),
                    user: user.to_owned(),
                }),
        }
    }
}

fn decode_hex(hex: &str) -> Result<Vec<u8>, &'static str> {
    if hex.is_empty() {
        return Err("empty key");
    }
    if !hex.len().is_multiple_of(2) {
        return Err("the hex key has an odd number of digits");
    }
    let digit = |b: u8| -> Result<u8, &'static str> {
        match b {
            b'0'..=b'9' => Ok(b - b'0'),
            b'a'..=b'f' => Ok(b - b'a' + 10),
            b'A'..=b'F' => Ok(b - b'A' + 10),
            _ => Err("the key is not hexadecimal"),
        }
    };
    hex.as_bytes()
        .chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}
