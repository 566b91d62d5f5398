//! TLS on our client side (docs/tls.md): the mirror's link to a destination and
//! flexnbd-proxy's upstream, against `nbdkit --tls=require` (GnuTLS) with credentials
//! generated here (`flexnbd::tls::testing`), x509 and PSK.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flexnbd::tls::testing::{generate, TestCredentials};
use support::cluster::*;
use support::nbdkit::start_nbdkit;
use support::proxy::{assert_qemu_ok, proxy_bin, qemu_io, Proxy};
use support::*;

const SIZE: usize = 8 * MIB;

fn credentials() -> (tempfile::TempDir, TestCredentials) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let creds = generate(dir.path()).expect("generating credentials");
    (dir, creds)
}

/// The kind of TLS credentials a test has nbdkit require and our side present.
#[derive(Clone, Copy)]
enum Tls {
    X509,
    Psk,
}

impl Tls {
    /// nbdkit's options for [`start_nbdkit`]: require TLS, with these credentials from `c`.
    fn nbdkit_options(self, c: &TestCredentials) -> Vec<String> {
        let creds = match self {
            Tls::X509 => format!("--tls-certificates={}", c.pki.display()),
            Tls::Psk => format!("--tls-psk={}", c.psk.display()),
        };
        vec!["--tls=require".to_string(), creds]
    }

    /// Our side's options (the mirror's and the proxy's) for the same credentials from `c`.
    fn client_options(self, c: &TestCredentials) -> [&str; 2] {
        match self {
            Tls::X509 => ["--tls-creds", c.pki.to_str().unwrap()],
            Tls::Psk => ["--tls-psk", c.psk.to_str().unwrap()],
        }
    }
}

/// Stops nbdkit (it does not exit on DISC) so that its file is complete.
fn stop(mut nbdkit: ChildGuard) {
    nbdkit.signal("TERM");
    assert!(
        nbdkit.wait_timeout(Duration::from_secs(10)).is_some(),
        "nbdkit did not stop on SIGTERM"
    );
}

/// A migration's two ends before the mirror: `flexnbd serve` of SIZE bytes of
/// `pattern(seed)` with its control socket, and a zeroed destination image of that size.
/// The fields drop in order: the source is stopped before its files are removed.
struct Ends {
    source: Server,
    sock: PathBuf,
    dst: Image,
    src: Image,
}

/// Sets up [`Ends`] for a test: the source's image from `seed`, the destination, the
/// source started.
fn ends(seed: u64) -> Ends {
    let src = Image::with_data(&pattern(seed, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    Ends {
        source,
        sock,
        dst,
        src,
    }
}

impl Ends {
    /// [`assert_still_serving`] for these ends' source.
    fn assert_still_serving(&self) {
        assert_still_serving(&self.source, &self.src, &self.sock);
    }
}

/// Runs `flexnbd mirror` from the source at `sock` to `port` with `extra`, which must be
/// refused (exit 1); returns its stdout and stderr together for the caller's checks.
fn mirror_refused(sock: &Path, port: u16, extra: &[&str]) -> String {
    let out = mirror_cli(sock, port, extra);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    text
}

/// A whole migration into nbdkit over TLS: the source exits 0 and nbdkit's file is the
/// source's.
fn migrate_into_nbdkit(tls: Tls) {
    let (_dir, c) = credentials();
    let mut e = ends(161);
    let (nbdkit, port) = start_nbdkit(&tls.nbdkit_options(&c), &e.dst.path);
    start_mirror(&e.sock, port, &tls.client_options(&c));
    assert_exit(&mut e.source, 0, "the source");
    e.source.expect_log("uses TLS");
    stop(nbdkit);
    assert_same_files(
        &e.dst.path,
        &e.src.path,
        "nbdkit's file after a TLS migration",
    );
}

#[test]
fn mirror_into_nbdkit_with_x509() {
    migrate_into_nbdkit(Tls::X509);
}

#[test]
fn mirror_into_nbdkit_with_psk() {
    migrate_into_nbdkit(Tls::Psk);
}

/// The source keeps serving its own file after a refused mirror, and is not mirroring.
fn assert_still_serving(source: &Server, src: &Image, sock: &Path) {
    let mut client = source.connect();
    let data = client.read_at(0, 64 * KIB);
    assert_same_bytes(
        &data,
        &src.contents()[..64 * KIB],
        "the source after a refused mirror",
    );
    let status = status(sock);
    assert_eq!(get(&status, "is_mirroring"), Some("false"), "{status:?}");
}

#[test]
fn mirror_trusting_another_ca_is_refused_with_the_cause() {
    let (_dir, c) = credentials();
    let e = ends(162);
    let (nbdkit, port) = start_nbdkit(&Tls::X509.nbdkit_options(&c), &e.dst.path);
    let text = mirror_refused(&e.sock, port, &["--tls-creds", c.other.to_str().unwrap()]);
    assert!(text.contains("Mirror was rejected"), "{text}");
    assert!(
        text.contains("the server's certificate was refused"),
        "the cause is missing: {text}"
    );
    e.assert_still_serving();
    stop(nbdkit);
}

#[test]
fn mirror_without_credentials_into_required_tls_says_so() {
    let (_dir, c) = credentials();
    let e = ends(163);
    let (nbdkit, port) = start_nbdkit(&Tls::Psk.nbdkit_options(&c), &e.dst.path);
    let text = mirror_refused(&e.sock, port, &[]);
    assert!(
        text.contains("the destination requires TLS; give --tls-creds or --tls-psk"),
        "{text}"
    );
    e.assert_still_serving();
    // With the other key: refused as well, and the source still serves.
    let text = mirror_refused(&e.sock, port, &["--tls-psk", c.other_psk.to_str().unwrap()]);
    assert!(
        text.contains("closed the connection during the TLS handshake (the server does not accept our PSK username or key)"),
        "{text}"
    );
    e.assert_still_serving();
    stop(nbdkit);
}

#[test]
fn bad_credentials_are_named() {
    let (dir, c) = credentials();
    let src = Image::with_data(&pattern(164, SIZE));
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    // The CLI's quick check: a missing file.
    let missing = dir.path().join("missing.psk");
    let out = mirror_cli(&sock, 1, &["--tls-psk", missing.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains(missing.to_str().unwrap()), "{out:?}");
    // The server's full check, through the control socket: a malformed key file...
    let bad = dir.path().join("bad.psk");
    std::fs::write(&bad, "flexnbd:not-hex\n").unwrap();
    let named = format!("tls-psk={}", bad.display());
    let answer = control(&sock, "mirror", &[LOCALHOST, "1", "exit", &named]);
    assert_eq!(
        answer,
        format!(
            "1: {}, line 1: the hex key has an odd number of digits\n",
            bad.display()
        )
    );
    // ... a key that is not the certificate's (through the CLI: it reads only ca-cert.pem).
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(c.pki.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    std::fs::copy(c.pki.join("client-cert.pem"), mixed.join("client-cert.pem")).unwrap();
    std::fs::copy(c.other.join("client-key.pem"), mixed.join("client-key.pem")).unwrap();
    let text = mirror_refused(&sock, 1, &["--tls-creds", mixed.to_str().unwrap()]);
    assert!(
        text.contains(&format!(
            "{}: the private key does not match the certificate",
            mixed.join("client-key.pem").display()
        )),
        "{text}"
    );
    assert_still_serving(&source, &src, &sock);
    // The proxy refuses to start, naming the file.
    let out = proxy_refused(&c.expired);
    // A client directory reads only ca-cert.pem and the client pair: the expired server
    // certificate is not its business; the proxy therefore got past the credentials and
    // failed to reach upstream.
    assert!(
        out.stderr.contains("Couldn't connect to upstream"),
        "{out:?}"
    );
    let out = proxy_refused(&mixed);
    assert!(
        out.stderr
            .contains(&mixed.join("client-key.pem").display().to_string()),
        "{out:?}"
    );
}

/// Runs `flexnbd-proxy --tls-creds CREDS` towards port 1 (where nothing listens), which
/// must fail to start (exit 1); returns its output for the caller's checks of the cause.
fn proxy_refused(creds: &Path) -> ToolOutput {
    let out = run_tool(
        std::process::Command::new(proxy_bin()).args([
            "--addr",
            LOCALHOST,
            "--port",
            &free_port().to_string(),
            "--conn-addr",
            LOCALHOST,
            "--conn-port",
            "1",
            "--tls-creds",
            creds.to_str().unwrap(),
        ]),
        None,
        TOOL_TIMEOUT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    out
}

/// The proxy in front of `nbdkit --tls=require`: qemu-io writes and reads through it.
fn proxy_into_nbdkit(tls: Tls) {
    let (_dir, c) = credentials();
    let dst = destination(SIZE as u64);
    let (nbdkit, port) = start_nbdkit(&tls.nbdkit_options(&c), &dst.path);
    let upstream = SocketAddr::new(LOOPBACK, port);
    let mut proxy = Proxy::start(upstream, &tls.client_options(&c), &[]);
    let out = qemu_io(
        &proxy.uri(),
        &[
            "write -P 0x5a 1M 256k",
            "read -P 0x5a 1M 256k",
            "read -P 0 0 64k",
        ],
    );
    assert_qemu_ok(&out, "qemu-io through the TLS proxy");
    proxy.signal("TERM");
    proxy.wait_exit(Duration::from_secs(10));
    stop(nbdkit);
    let data = dst.contents();
    assert_filled(&data[MIB..MIB + 256 * KIB], 0x5a, "nbdkit's file");
}

#[test]
fn proxy_upstream_over_tls_x509() {
    proxy_into_nbdkit(Tls::X509);
}

#[test]
fn proxy_upstream_over_tls_psk() {
    proxy_into_nbdkit(Tls::Psk);
}
