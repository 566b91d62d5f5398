//! TLS on our client side (docs/tls.md): the mirror's link to a destination and
//! flexnbd-proxy's upstream, against `nbdkit --tls=require` (GnuTLS) with credentials
//! generated here (`flexnbd::tls::testing`), x509 and PSK.

mod support;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use flexnbd::tls::testing::{generate, TestCredentials};
use support::cluster::*;
use support::proxy::{assert_qemu_ok, proxy_bin, qemu_io, Proxy};
use support::*;

const SIZE: usize = 8 * MIB;

fn credentials() -> (tempfile::TempDir, TestCredentials) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let creds = generate(dir.path()).expect("generating credentials");
    (dir, creds)
}

/// `nbdkit -f --tls=require TLS... file FILE` on a free loopback port, once it accepts
/// connections.
fn start_nbdkit(file: &Path, tls: &[String]) -> (ChildGuard, u16) {
    (0..5)
        .find_map(|_| {
            let port = free_port();
            let mut cmd = tool("nbdkit");
            cmd.args([
                "-f",
                "-i",
                LOCALHOST,
                "-p",
                &port.to_string(),
                "--tls=require",
            ])
            .args(tls)
            .arg("file")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
            let mut child = ChildGuard::new(cmd.spawn().expect("start nbdkit"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect((LOCALHOST, port)).is_ok() {
                    return child.try_status().is_none().then_some((child, port));
                }
                if child.try_status().is_some() {
                    return None;
                }
                thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .expect("nbdkit could not start")
}

fn x509_args(dir: &Path) -> Vec<String> {
    vec![format!("--tls-certificates={}", dir.display())]
}

fn psk_args(file: &Path) -> Vec<String> {
    vec![format!("--tls-psk={}", file.display())]
}

/// Stops nbdkit (it does not exit on DISC) so that its file is complete.
fn stop(mut nbdkit: ChildGuard) {
    nbdkit.signal("TERM");
    assert!(
        nbdkit.wait_timeout(Duration::from_secs(10)).is_some(),
        "nbdkit did not stop on SIGTERM"
    );
}

/// A whole migration into nbdkit over TLS: the source exits 0 and nbdkit's file is the
/// source's.
fn migrate_into_nbdkit(nbdkit_tls: &[String], mirror_tls: &[&str]) {
    let src = Image::with_data(&pattern(161, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);
    let (nbdkit, port) = start_nbdkit(&dst.path, nbdkit_tls);
    start_mirror(&sock, port, mirror_tls);
    assert_exit(&mut source, 0, "the source");
    source.expect_log("uses TLS");
    stop(nbdkit);
    assert_same_files(&dst.path, &src.path, "nbdkit's file after a TLS migration");
}

#[test]
fn mirror_into_nbdkit_with_x509() {
    let (_dir, c) = credentials();
    migrate_into_nbdkit(
        &x509_args(&c.pki),
        &["--tls-creds", c.pki.to_str().unwrap()],
    );
}

#[test]
fn mirror_into_nbdkit_with_psk() {
    let (_dir, c) = credentials();
    migrate_into_nbdkit(&psk_args(&c.psk), &["--tls-psk", c.psk.to_str().unwrap()]);
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
    let src = Image::with_data(&pattern(162, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    let (nbdkit, port) = start_nbdkit(&dst.path, &x509_args(&c.pki));
    let out = mirror_cli(&sock, port, &["--tls-creds", c.other.to_str().unwrap()]);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    assert!(text.contains("Mirror was rejected"), "{text}");
    assert!(
        text.contains("the server's certificate was refused"),
        "the cause is missing: {text}"
    );
    assert_still_serving(&source, &src, &sock);
    stop(nbdkit);
}

#[test]
fn mirror_without_credentials_into_required_tls_says_so() {
    let (_dir, c) = credentials();
    let src = Image::with_data(&pattern(163, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    let (nbdkit, port) = start_nbdkit(&dst.path, &psk_args(&c.psk));
    let out = mirror_cli(&sock, port, &[]);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    assert!(
        text.contains("the destination requires TLS; give --tls-creds or --tls-psk"),
        "{text}"
    );
    assert_still_serving(&source, &src, &sock);
    // With the other key: refused as well, and the source still serves.
    let out = mirror_cli(&sock, port, &["--tls-psk", c.other_psk.to_str().unwrap()]);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    assert!(
        text.contains("closed the connection during the TLS handshake (the server does not accept our PSK username or key)"),
        "{text}"
    );
    assert_still_serving(&source, &src, &sock);
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
    let out = mirror_cli(&sock, 1, &["--tls-creds", mixed.to_str().unwrap()]);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "{}: the private key does not match the certificate",
            mixed.join("client-key.pem").display()
        )),
        "{text}"
    );
    assert_still_serving(&source, &src, &sock);
    // The proxy refuses to start, naming the file.
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
            c.expired.to_str().unwrap(),
        ]),
        None,
        TOOL_TIMEOUT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    // A client directory reads only ca-cert.pem and the client pair: the expired server
    // certificate is not its business; the proxy therefore got past the credentials and
    // failed to reach upstream.
    assert!(
        out.stderr.contains("Couldn't connect to upstream"),
        "{out:?}"
    );
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
            mixed.to_str().unwrap(),
        ]),
        None,
        TOOL_TIMEOUT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains(&mixed.join("client-key.pem").display().to_string()),
        "{out:?}"
    );
}

/// The proxy in front of `nbdkit --tls=require`: qemu-io writes and reads through it.
fn proxy_into_nbdkit(nbdkit_tls: &[String], proxy_tls: &[&str]) {
    let dst = destination(SIZE as u64);
    let (nbdkit, port) = start_nbdkit(&dst.path, nbdkit_tls);
    let upstream = SocketAddr::new(LOOPBACK, port);
    let mut proxy = Proxy::start(upstream, proxy_tls, &[]);
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
    let (_dir, c) = credentials();
    proxy_into_nbdkit(
        &x509_args(&c.pki),
        &["--tls-creds", c.pki.to_str().unwrap()],
    );
}

#[test]
fn proxy_upstream_over_tls_psk() {
    let (_dir, c) = credentials();
    proxy_into_nbdkit(&psk_args(&c.psk), &["--tls-psk", c.psk.to_str().unwrap()]);
}
