//! TLS on our server side (docs/tls.md): `serve --newstyle --tls on|require` against real
//! clients (qemu-img and qemu-io with `tls-creds-x509` / `tls-creds-psk` objects, libnbd's
//! nbdinfo and nbdcopy with `nbds://` URIs), client certificates, startup errors, a stalled
//! handshake, and a migration between two of our servers over TLS. Credentials are
//! generated here (`flexnbd::tls::testing`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flexnbd::tls::testing::{generate, TestCredentials, PSK_USER};
use support::cluster::*;
use support::*;

const SIZE: usize = 32 * MIB;

fn credentials() -> (tempfile::TempDir, TestCredentials) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let creds = generate(dir.path()).expect("generating credentials");
    (dir, creds)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// `serve --newstyle --tls MODE --tls-creds DIR` (x509).
fn serve_x509(file: &Path, mode: &str, dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--newstyle", "--tls", mode, "--tls-creds", s(dir)];
    args.extend_from_slice(extra);
    Server::start(file, &args)
}

/// `serve --newstyle --tls require --tls-psk FILE`.
fn serve_psk(file: &Path, psk: &Path) -> Server {
    Server::start(
        file,
        &["--newstyle", "--tls", "require", "--tls-psk", s(psk)],
    )
}

/// `nbds://127.0.0.1:PORT/?tls-certificates=DIR`.
fn nbds_x509(server: &Server, dir: &Path) -> String {
    format!(
        "nbds://{}/?tls-certificates={}",
        server.sockaddr(),
        dir.display()
    )
}

/// `nbds://flexnbd@127.0.0.1:PORT/?tls-psk-file=FILE` (libnbd takes the PSK username from
/// the URI's user).
fn nbds_psk(server: &Server, psk: &Path) -> String {
    format!(
        "nbds://{PSK_USER}@{}/?tls-psk-file={}",
        server.sockaddr(),
        psk.display()
    )
}

fn nbdinfo(uri: &str) -> ToolOutput {
    run_tool(tool("nbdinfo").arg(uri), None, TOOL_TIMEOUT)
}

fn nbdcopy(from: &str, to: &str) -> ToolOutput {
    run_tool(tool("nbdcopy").args([from, to]), None, TOOL_TIMEOUT)
}

/// The qemu options that connect to `server` over TLS with the credentials object `object`
/// (whose id must be `tls0`).
fn qemu_tls_args(server: &Server, object: &str) -> Vec<String> {
    vec![
        "--object".into(),
        object.into(),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},tls-creds=tls0",
            server.port
        ),
    ]
}

fn x509_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

/// qemu's PSK object reads `keys.psk` in `dir`.
fn psk_object(dir: &Path) -> String {
    format!(
        "tls-creds-psk,id=tls0,endpoint=client,dir={},username={PSK_USER}",
        dir.display()
    )
}

fn qemu_img_info(server: &Server, object: &str) -> ToolOutput {
    run_tool(
        tool("qemu-img")
            .arg("info")
            .args(qemu_tls_args(server, object)),
        None,
        TOOL_TIMEOUT,
    )
}

fn qemu_io_tls(server: &Server, object: &str, commands: &[&str]) -> ToolOutput {
    let mut cmd = tool("qemu-io");
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.args(qemu_tls_args(server, object));
    run_tool(&mut cmd, None, TOOL_TIMEOUT)
}

fn assert_qemu_ok(out: &ToolOutput, what: &str) {
    out.assert_success(what);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification"),
        "{what}: qemu-io reported a failure:\n{text}"
    );
}

/// qemu-img info and qemu-io's writes and reads (1 MiB, and 12 MiB: longer than a part,
/// so streamed by the writer) with `object`; the file holds what was written.
fn qemu_clients_work(server: &Server, image: &Image, object: &str) {
    let info = qemu_img_info(server, object);
    info.assert_success("qemu-img info over TLS");
    assert!(
        info.stdout_str().contains(&format!("{SIZE}")),
        "qemu-img info does not show the size: {}",
        info.stdout_str()
    );
    let out = qemu_io_tls(
        server,
        object,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1M 12M",
            "read -P 0xcd 1M 12M",
            "read -P 0xab 0 4k",
        ],
    );
    assert_qemu_ok(&out, "qemu-io over TLS");
    let data = image.contents();
    assert_filled(&data[..MIB], 0xab, "the file after qemu-io's first write");
    assert_filled(
        &data[MIB..13 * MIB],
        0xcd,
        "the file after qemu-io's second write",
    );
}

#[test]
fn qemu_over_x509() {
    let (_dir, c) = credentials();
    let image = Image::zeroed(SIZE);
    let server = serve_x509(&image.path, "require", &c.pki, &[]);
    server.expect_log("TLS required, with the x509 credentials in");
    qemu_clients_work(&server, &image, &x509_object(&c.pki));
    server.expect_log(", over TLS");
}

#[test]
fn qemu_over_psk() {
    let (dir, c) = credentials();
    let image = Image::zeroed(SIZE);
    let server = serve_psk(&image.path, &c.psk);
    qemu_clients_work(&server, &image, &psk_object(dir.path()));
}

/// nbdinfo, and nbdcopy into and out of the server: a cached file read back in 256 KiB
/// requests (the size at which plain connections use `sendfile`) arrives intact.
fn libnbd_clients_work(image: &Image, uri: &str) {
    let info = nbdinfo(uri);
    info.assert_success("nbdinfo over TLS");
    assert!(
        info.stdout_str().contains(&format!("{SIZE}")),
        "{}",
        info.stdout_str()
    );
    let data = pattern(171, SIZE);
    let src = image.sibling("upload.raw");
    std::fs::write(&src, &data).unwrap();
    nbdcopy(s(&src), uri).assert_success("nbdcopy into the server over TLS");
    assert_same_bytes(&image.contents(), &data, "the file after nbdcopy in");
    let back = image.sibling("download.raw");
    nbdcopy(uri, s(&back)).assert_success("nbdcopy out of the server over TLS");
    assert_same_bytes(
        &std::fs::read(&back).unwrap(),
        &data,
        "what nbdcopy read back",
    );
}

#[test]
fn libnbd_over_x509() {
    let (_dir, c) = credentials();
    let image = Image::zeroed(SIZE);
    let server = serve_x509(&image.path, "require", &c.pki, &[]);
    let uri = nbds_x509(&server, &c.pki);
    libnbd_clients_work(&image, &uri);
}

#[test]
fn libnbd_over_psk() {
    let (_dir, c) = credentials();
    let image = Image::zeroed(SIZE);
    let server = serve_psk(&image.path, &c.psk);
    let uri = nbds_psk(&server, &c.psk);
    libnbd_clients_work(&image, &uri);
    // Another key for the same username: refused.
    let out = nbdinfo(&nbds_psk(&server, &c.other_psk));
    assert!(!out.status.success(), "a wrong PSK was accepted: {out:?}");
}

#[test]
fn plain_clients_are_refused_under_require_and_served_under_on() {
    let (_dir, c) = credentials();
    let image = Image::with_data(&pattern(172, MIB));
    let server = serve_x509(&image.path, "require", &c.pki, &[]);
    let out = nbdinfo(&server.uri());
    assert!(!out.status.success(), "a plain client was served: {out:?}");
    drop(server);

    let server = serve_x509(&image.path, "on", &c.pki, &[]);
    server.expect_log("TLS offered");
    let out = nbdinfo(&server.uri());
    out.assert_success("a plain nbdinfo under --tls on");
    nbdinfo(&nbds_x509(&server, &c.pki)).assert_success("nbdinfo over TLS under --tls on");
    let back = image.sibling("back.raw");
    nbdcopy(&server.uri(), s(&back)).assert_success("plain nbdcopy under --tls on");
    assert_same_bytes(
        &std::fs::read(&back).unwrap(),
        &image.contents(),
        "plain nbdcopy",
    );
}

/// A directory with the CA of `ca` and the client pair of `client` (either may be absent).
fn client_dir(root: &Path, name: &str, ca: &Path, client: Option<&Path>) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
    if let Some(client) = client {
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(client.join(f), dir.join(f)).unwrap();
        }
    }
    dir
}

#[test]
fn verify_peer_wants_a_client_certificate_of_our_ca() {
    let (dir, c) = credentials();
    let image = Image::zeroed(SIZE);
    let server = serve_x509(&image.path, "require", &c.pki, &["--tls-verify-peer"]);
    server.expect_log("client certificates required");
    // Trusts our server, presents a certificate of another CA.
    let stranger = client_dir(dir.path(), "stranger", &c.pki, Some(&c.other));
    let out = nbdinfo(&nbds_x509(&server, &stranger));
    assert!(
        !out.status.success(),
        "a client of another CA was served: {out:?}"
    );
    // GnuTLS sends no certificate that the server's CA list does not name: refused either
    // way.
    server.expect_log("the client presented no certificate");
    // Presents no certificate at all.
    let anonymous = client_dir(dir.path(), "anonymous", &c.pki, None);
    let out = nbdinfo(&nbds_x509(&server, &anonymous));
    assert!(
        !out.status.success(),
        "a client without a certificate was served: {out:?}"
    );
    // Ours, through qemu and libnbd.
    nbdinfo(&nbds_x509(&server, &c.pki)).assert_success("nbdinfo with our client certificate");
    let out = qemu_io_tls(
        &server,
        &x509_object(&c.pki),
        &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
    );
    assert_qemu_ok(&out, "qemu-io with our client certificate");
}

/// `flexnbd serve ARGS` that must exit 1 at once; returns its log.
fn startup_error(file: &Path, args: &[&str]) -> String {
    let mut all = vec!["serve", "-l", LOCALHOST, "-p", "0", "-f", s(file)];
    all.extend_from_slice(args);
    let out = flexnbd(&all, None);
    assert_eq!(out.code(), Some(1), "flexnbd {all:?}: {out:?}");
    out.stderr
}

#[test]
fn startup_errors_name_the_file() {
    let (dir, c) = credentials();
    let image = Image::zeroed(MIB);
    let f = &image.path;
    let tls = |creds: &str, path: &Path| {
        vec![
            "--newstyle".to_string(),
            "--tls".into(),
            "require".into(),
            creds.into(),
            s(path).into(),
        ]
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        startup_error(f, &args)
    };

    let missing = dir.path().join("nowhere");
    let log = run(tls("--tls-creds", &missing));
    assert!(log.contains(&format!("{}", missing.display())), "{log}");

    // A key that cannot be read (a directory in its place: the tests run as root, whom
    // permissions do not stop).
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(c.pki.join(f), broken.join(f)).unwrap();
    }
    std::fs::create_dir(broken.join("server-key.pem")).unwrap();
    let log = run(tls("--tls-creds", &broken));
    let key = broken.join("server-key.pem");
    assert!(
        log.contains(&format!("{}: unreadable", key.display())),
        "{log}"
    );

    let log = run(tls("--tls-creds", &c.expired));
    let cert = c.expired.join("server-cert.pem");
    assert!(
        log.contains(&format!("{}: the certificate expired", cert.display())),
        "{log}"
    );

    let bad = dir.path().join("bad.psk");
    std::fs::write(&bad, "flexnbd:xyz\n").unwrap();
    let log = run(tls("--tls-psk", &bad));
    assert!(log.contains(&format!("{}, line 1", bad.display())), "{log}");

    // TLS without new-style: old-style cannot negotiate.
    let log = startup_error(f, &["--tls", "require", "--tls-creds", s(&c.pki)]);
    assert!(log.contains("--tls require needs --newstyle"), "{log}");
    // Modes and credentials that do not go together.
    let log = startup_error(f, &["--newstyle", "--tls", "on"]);
    assert!(
        log.contains("--tls on needs --tls-creds DIR or --tls-psk FILE"),
        "{log}"
    );
    let log = startup_error(
        f,
        &[
            "--newstyle",
            "--tls",
            "require",
            "--tls-psk",
            s(&c.psk),
            "--tls-verify-peer",
        ],
    );
    assert!(log.contains("--tls-verify-peer needs --tls-creds"), "{log}");
    let log = startup_error(f, &["--newstyle", "--tls-creds", s(&c.pki)]);
    assert!(log.contains("need --tls on or --tls require"), "{log}");
    let log = startup_error(f, &["--newstyle", "--tls", "maybe"]);
    assert!(log.contains("TLS mode must be"), "{log}");
}

/// The fixed new-style client start and STARTTLS, by hand: returns the connection right
/// after the server's ACK, where the TLS handshake should begin.
fn start_tls_by_hand(server: &Server) -> TcpStream {
    let mut c = TcpStream::connect(server.sockaddr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut option = Vec::new();
    option.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes()); // IHAVEOPT
    option.extend_from_slice(&5u32.to_be_bytes()); // STARTTLS
    option.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&option).unwrap();
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply[12..16],
        &1u32.to_be_bytes(),
        "STARTTLS was not acknowledged"
    );
    c
}

#[test]
fn a_stalled_handshake_is_dropped_and_others_are_served() {
    let (_dir, c) = credentials();
    let image = Image::with_data(&pattern(173, MIB));
    let server = serve_x509(&image.path, "require", &c.pki, &["--max-clients", "2"]);
    let started = Instant::now();
    let mut stalled = start_tls_by_hand(&server);
    // Half a ClientHello's record header, then nothing.
    stalled.write_all(&[0x16, 0x03]).unwrap();
    // Meanwhile another client is served.
    nbdinfo(&nbds_x509(&server, &c.pki)).assert_success("nbdinfo beside a stalled handshake");
    // The stalled one is closed after the negotiation limit (10 s), not before.
    let mut byte = [0u8; 1];
    let end = stalled.read(&mut byte);
    let waited = started.elapsed();
    assert!(
        matches!(end, Ok(0)) || end.is_err(),
        "expected the connection to close, got {end:?}"
    );
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(18),
        "closed after {waited:?}"
    );
    server.expect_log("did not complete within");
    // Its slot is free again: two more clients at once are fine.
    nbdinfo(&nbds_x509(&server, &c.pki)).assert_success("nbdinfo after the stalled handshake");
}

/// A client that sends an option in clear where the TLS handshake should start is closed,
/// and the log says why.
#[test]
fn plaintext_instead_of_a_handshake_is_refused() {
    let (_dir, c) = credentials();
    let image = Image::zeroed(MIB);
    let server = serve_x509(&image.path, "on", &c.pki, &[]);
    let mut conn = start_tls_by_hand(&server);
    let mut option = Vec::new();
    option.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    option.extend_from_slice(&2u32.to_be_bytes()); // ABORT
    option.extend_from_slice(&0u32.to_be_bytes());
    conn.write_all(&option).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed only after {:?}",
        started.elapsed()
    );
    server.expect_log("TLS handshake with");
    server.expect_log("; closing the connection");
}

/// `listen --newstyle --tls require` with `tls` as destination, the source a `serve`.
fn migrate_between_ours(listen_tls: &[&str], mirror_tls: &[&str]) {
    let src = Image::with_data(&pattern(174, SIZE));
    let dst = destination(SIZE as u64);
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);
    let mut extra = vec!["--newstyle", "--tls", "require"];
    extra.extend_from_slice(listen_tls);
    let mut dest = start_listen(&dst.path, None, 0, &extra);
    start_mirror(&sock, dest.port, mirror_tls);
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut dest, 0, "the destination");
    dest.expect_log(", over TLS");
    assert_same_files(
        &dst.path,
        &src.path,
        "the destination after a TLS migration",
    );
}

#[test]
fn migration_between_ours_over_x509() {
    let (_dir, c) = credentials();
    migrate_between_ours(
        &["--tls-creds", s(&c.pki), "--tls-verify-peer"],
        &["--tls-creds", s(&c.pki)],
    );
}

#[test]
fn migration_between_ours_over_psk() {
    let (_dir, c) = credentials();
    migrate_between_ours(&["--tls-psk", s(&c.psk)], &["--tls-psk", s(&c.psk)]);
}

#[test]
fn plain_mirror_into_a_tls_destination_is_refused_with_the_cause() {
    let (_dir, c) = credentials();
    let src = Image::with_data(&pattern(175, 4 * MIB));
    let dst = destination(4 * MIB as u64);
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    let dest = start_listen(
        &dst.path,
        None,
        0,
        &["--newstyle", "--tls", "require", "--tls-creds", s(&c.pki)],
    );
    let out = mirror_cli(&sock, dest.port, &[]);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert_eq!(out.code(), Some(1), "{text}");
    assert!(
        text.contains("the destination requires TLS; give --tls-creds or --tls-psk"),
        "{text}"
    );
    // The source still serves its file.
    let mut client = source.connect();
    let data = client.read_at(0, 64 * KIB);
    assert_same_bytes(&data, &src.contents()[..64 * KIB], "the source");
    drop(dest);
}
