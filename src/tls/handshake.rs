//! TLS contexts (built once from checked credentials, shared by every connection) and the
//! two handshakes, bounded in time, with errors that say what to fix.

use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslVerifyMode,
    SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::X509VerifyResult;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use super::creds::{PskFile, X509Dir, X509Role};
use super::stream::Stream;
use super::TlsError;

/// TLS 1.2 ciphers for certificates (forward secret, AEAD), and for PSK (GnuTLS's
/// defaults include these). TLS 1.3 suites: [`TLS13_SUITES`].
const X509_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
     ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
     ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:\
     DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";
const PSK_CIPHERS: &str = "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-CBC-SHA256:\
     ECDHE-PSK-AES256-CBC-SHA384:DHE-PSK-AES128-GCM-SHA256:DHE-PSK-AES256-GCM-SHA384:\
     DHE-PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384";

/// TLS 1.3 suites, AES-128-GCM first and chosen by the server's order: with AES
/// instructions it costs both ends about a third less per byte than AES-256-GCM (the
/// order OpenSSL and GnuTLS clients offer), and every byte of a disk goes through it. The
/// others stay available to clients that do not offer it.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

/// A context with what both sides share: TLS 1.2 at least, no compression, and the write
/// modes that let an async writer retry (ACCEPT_MOVING_WRITE_BUFFER) and make progress a
/// record at a time (ENABLE_PARTIAL_WRITE).
fn base(method: SslMethod, ciphers: &str) -> Result<SslContextBuilder, TlsError> {
    let mut ctx = SslContextBuilder::new(method)?;
    ctx.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::NO_SSLV2
            | SslOptions::NO_SSLV3
            | SslOptions::NO_TLSV1
            | SslOptions::NO_TLSV1_1
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    ctx.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    ctx.set_mode(
        SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE,
    );
    ctx.set_cipher_list(ciphers)?;
    ctx.set_ciphersuites(TLS13_SUITES)?;
    Ok(ctx)
}

/// Trusts exactly the CAs of `creds` (not the system's).
fn trust(ctx: &mut SslContextBuilder, creds: &X509Dir) -> Result<(), TlsError> {
    let mut store = X509StoreBuilder::new()?;
    for ca in &creds.ca {
        store.add_cert(ca.clone())?;
    }
    ctx.set_verify_cert_store(store.build())?;
    Ok(())
}

/// Uses the certificate chain and key of `creds`, if it has them.
fn present(ctx: &mut SslContextBuilder, creds: &X509Dir) -> Result<(), TlsError> {
    if let (Some(chain), Some(key)) = (&creds.chain, &creds.key) {
        ctx.set_certificate(&chain[0])?;
        for extra in &chain[1..] {
            ctx.add_extra_chain_cert(extra.clone())?;
        }
        ctx.set_private_key(key)?;
        ctx.check_private_key()?;
    }
    Ok(())
}

/// How a server authenticates itself and its clients.
#[derive(Clone)]
pub struct ServerTls {
    ctx: SslContext,
    /// What the log says about the credentials.
    pub description: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl ServerTls {
    /// x509 from `dir` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`); with
    /// `verify_peer`, clients must present a certificate signed by the CA.
    pub fn x509(dir: &Path, verify_peer: bool) -> Result<ServerTls, TlsError> {
        let creds = X509Dir::load(dir, X509Role::Server)?;
        let mut ctx = base(SslMethod::tls_server(), X509_CIPHERS)?;
        present(&mut ctx, &creds)?;
        if verify_peer {
            trust(&mut ctx, &creds)?;
            let mut names = openssl::stack::Stack::new()?;
            for ca in &creds.ca {
                names.push(ca.subject_name().to_owned()?)?;
            }
            ctx.set_client_ca_list(names);
            ctx.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        } else {
            ctx.set_verify(SslVerifyMode::NONE);
        }
        Ok(ServerTls {
            ctx: ctx.build(),
            description: format!(
                "x509 credentials in {}{}",
                dir.display(),
                if verify_peer {
                    ", client certificates required"
                } else {
                    ""
                }
            ),
        })
    }

    /// PSK from `path`: a client's identity is looked up in the file.
    pub fn psk(path: &Path) -> Result<ServerTls, TlsError> {
        let file = Arc::new(PskFile::load(path)?);
        let mut ctx = base(SslMethod::tls_server(), PSK_CIPHERS)?;
        ctx.set_verify(SslVerifyMode::NONE);
        let keys = file.clone();
        ctx.set_psk_server_callback(move |_ssl, identity, out| {
            // An unknown identity or a key that does not fit: no PSK, the handshake fails.
            match identity.and_then(|id| keys.key(id)) {
                Some(key) if key.len() <= out.len() => {
                    out[..key.len()].copy_from_slice(key);
                    Ok(key.len())
                }
                _ => Ok(0),
            }
        });
        Ok(ServerTls {
            ctx: ctx.build(),
            description: format!("PSK credentials in {}", path.display()),
        })
    }
}

/// How a client checks a server and authenticates itself.
#[derive(Clone)]
pub struct ClientTls {
    ctx: SslContext,
    /// Certificates are checked against the server's address; PSK has nothing to check.
    x509: bool,
    pub description: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl ClientTls {
    /// x509 from `dir`: the server's chain must end at `ca-cert.pem` and its certificate
    /// name the address we connect to; `client-cert.pem` and `client-key.pem`, if there,
    /// are presented to servers that ask.
    pub fn x509(dir: &Path) -> Result<ClientTls, TlsError> {
        let creds = X509Dir::load(dir, X509Role::Client)?;
        let mut ctx = base(SslMethod::tls_client(), X509_CIPHERS)?;
        trust(&mut ctx, &creds)?;
        present(&mut ctx, &creds)?;
        ctx.set_verify(SslVerifyMode::PEER);
        Ok(ClientTls {
            ctx: ctx.build(),
            x509: true,
            description: format!("x509 credentials in {}", dir.display()),
        })
    }

    /// PSK from `path`, as `username` or the file's first entry.
    pub fn psk(path: &Path, username: Option<&str>) -> Result<ClientTls, TlsError> {
        let file = PskFile::load(path)?;
        let entry = file.client_entry(username)?.clone();
        let mut ctx = base(SslMethod::tls_client(), PSK_CIPHERS)?;
        ctx.set_verify(SslVerifyMode::NONE);
        let description = format!(
            "PSK credentials in {} (identity {:?})",
            path.display(),
            entry.username
        );
        ctx.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
            let id = entry.username.as_bytes();
            // OpenSSL wants the identity NUL-terminated.
            if id.len() >= identity.len() || entry.key.len() > psk.len() {
                return Ok(0);
            }
            identity[..id.len()].copy_from_slice(id);
            identity[id.len()] = 0;
            psk[..entry.key.len()].copy_from_slice(&entry.key);
            Ok(entry.key.len())
        });
        Ok(ClientTls {
            ctx: ctx.build(),
            x509: false,
            description,
        })
    }

    pub fn is_x509(&self) -> bool {
        self.x509
    }
}

/// The server's TLS handshake on `tcp` (after the STARTTLS ACK was sent), within `limit`.
pub async fn accept(tcp: TcpStream, tls: &ServerTls, limit: Duration) -> Result<Stream, TlsError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the client".into());
    let ssl = Ssl::new(&tls.ctx)?;
    let mut stream = SslStream::new(ssl, tcp)?;
    match tokio::time::timeout(limit, Pin::new(&mut stream).accept()).await {
        Err(_) => Err(TlsError::Timeout { peer, limit }),
        Ok(Err(e)) => Err(explain(&peer, &stream, &e, Side::Server)),
        Ok(Ok(())) => Ok(Stream::Tls(Box::new(stream))),
    }
}

/// The client's TLS handshake on `tcp` (after the server acknowledged STARTTLS), within
/// `limit`. With x509, the server's certificate must name `host`: an IP address is matched
/// against its IP SANs, anything else against its DNS names (as qemu does); a DNS name is
/// also sent as SNI.
pub async fn connect(
    tcp: TcpStream,
    tls: &ClientTls,
    host: &str,
    limit: Duration,
) -> Result<Stream, TlsError> {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| host.to_owned());
    let mut ssl = Ssl::new(&tls.ctx)?;
    if tls.x509 {
        let param = ssl.param_mut();
        param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
        match host.parse::<IpAddr>() {
            Ok(ip) => param.set_ip(ip)?,
            Err(_) => {
                param.set_host(host)?;
                ssl.set_hostname(host)?;
            }
        }
    }
    let mut stream = SslStream::new(ssl, tcp)?;
    match tokio::time::timeout(limit, Pin::new(&mut stream).connect()).await {
        Err(_) => Err(TlsError::Timeout { peer, limit }),
        Ok(Err(e)) => Err(match explain(&peer, &stream, &e, Side::Client) {
            // GnuTLS servers (nbdkit, qemu-nbd) hang up without an alert on a PSK they
            // cannot use.
            TlsError::PeerClosed { peer, why } if !tls.x509 && why.is_empty() => {
                TlsError::PeerClosed {
                    peer,
                    why: "the server does not accept our PSK username or key".into(),
                }
            }
            other => other,
        }),
        Ok(Ok(())) => Ok(Stream::Tls(Box::new(stream))),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// Turns a failed handshake into a sentence: what the certificate check said, or what the
/// peer's alert means, or how the connection ended.
fn explain(
    peer: &str,
    stream: &SslStream<TcpStream>,
    e: &openssl::ssl::Error,
    side: Side,
) -> TlsError {
    let verify = stream.ssl().verify_result();
    if verify != X509VerifyResult::OK {
        let whose = match side {
            Side::Client => "the server's",
            Side::Server => "the client's",
        };
        return TlsError::Handshake {
            peer: peer.to_owned(),
            why: format!("{whose} certificate was refused: {}", verify.error_string()),
        };
    }
    let reasons: Vec<String> = e
        .ssl_error()
        .map(|stack| {
            stack
                .errors()
                .iter()
                .filter_map(|e| e.reason().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if reasons.is_empty() {
        let why = match e.io_error() {
            Some(io) => io.to_string(),
            None => String::new(),
        };
        if e.code() == ErrorCode::SYSCALL || e.code() == ErrorCode::ZERO_RETURN {
            return TlsError::PeerClosed {
                peer: peer.to_owned(),
                why,
            };
        }
        return TlsError::Handshake {
            peer: peer.to_owned(),
            why: if why.is_empty() { e.to_string() } else { why },
        };
    }
    let joined = reasons.join("; ");
    let hint = hint(&joined, side);
    TlsError::Handshake {
        peer: peer.to_owned(),
        why: if hint.is_empty() {
            joined
        } else {
            format!("{joined} ({hint})")
        },
    }
}

/// What an OpenSSL reason usually means for an NBD operator.
fn hint(reasons: &str, side: Side) -> &'static str {
    if reasons.contains("unknown ca") || reasons.contains("bad certificate") {
        match side {
            Side::Client => {
                "the server does not accept our certificate: is it signed by the server's CA?"
            }
            Side::Server => "the client does not trust our certificate: does it have our CA?",
        }
    } else if reasons.contains("certificate required")
        || reasons.contains("peer did not return a certificate")
    {
        match side {
            Side::Client => "the server requires a client certificate: put client-cert.pem and client-key.pem in the credentials directory",
            Side::Server => "the client presented no certificate",
        }
    } else if reasons.contains("certificate expired") {
        "the peer refused an expired certificate"
    } else if reasons.contains("unknown psk identity") {
        "the PSK username is not in the peer's key file"
    } else if reasons.contains("decrypt") || reasons.contains("bad record mac") {
        "the PSK keys differ"
    } else if reasons.contains("no shared cipher")
        || reasons.contains("handshake failure")
        || reasons.contains("no suitable")
    {
        "the two sides have no credentials in common: x509 against PSK, or an unknown PSK identity"
    } else if reasons.contains("wrong version number") || reasons.contains("packet length too long")
    {
        "the peer is not speaking TLS"
    } else {
        ""
    }
}
