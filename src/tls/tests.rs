//! Credentials loading and the handshakes, on loopback with generated credentials.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::testing::{generate, TestCredentials, PSK_USER};
use super::*;

const LIMIT: Duration = Duration::from_secs(5);

fn creds() -> (tempfile::TempDir, TestCredentials) {
    let dir = tempfile::tempdir().unwrap();
    let creds = generate(dir.path()).unwrap();
    (dir, creds)
}

#[test]
fn modes_parse() {
    assert_eq!(TlsMode::parse("off").unwrap(), TlsMode::Off);
    assert_eq!(TlsMode::parse("on").unwrap(), TlsMode::On);
    assert_eq!(TlsMode::parse("require").unwrap(), TlsMode::Require);
    let e = TlsMode::parse("yes").unwrap_err().to_string();
    assert_eq!(e, "TLS mode must be 'off', 'on' or 'require', not \"yes\"");
}

fn psk_error(text: &str) -> String {
    PskFile::parse(Path::new("/k.psk"), text.as_bytes())
        .unwrap_err()
        .to_string()
}

#[test]
fn psk_lines_are_checked() {
    let ok = PskFile::parse(Path::new("/k.psk"), b"alice:00ff\n\nbob:ABCD\r\n").unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[0].username, "alice");
    assert_eq!(ok[0].key, vec![0, 0xff]);
    assert_eq!(ok[1].key, vec![0xab, 0xcd]);
    assert!(
        !format!("{:?}", ok[0]).contains("ff"),
        "Debug never shows a key"
    );
    assert_eq!(
        psk_error("alice\n"),
        "/k.psk, line 1: expected 'username:hexkey'"
    );
    assert_eq!(psk_error("\n:00\n"), "/k.psk, line 2: empty username");
    assert_eq!(psk_error("a:\n"), "/k.psk, line 1: empty key");
    assert_eq!(
        psk_error("a:abc\n"),
        "/k.psk, line 1: the hex key has an odd number of digits"
    );
    assert_eq!(
        psk_error("a:zz\n"),
        "/k.psk, line 1: the key is not hexadecimal"
    );
    assert_eq!(psk_error("\n\n"), "/k.psk: no 'username:hexkey' line");
}

#[test]
fn credential_errors_name_the_file() {
    let (dir, c) = creds();
    let missing = dir.path().join("nowhere");
    assert_eq!(
        X509Dir::load(&missing, X509Role::Client)
            .unwrap_err()
            .to_string(),
        format!("{}: missing", missing.display())
    );
    assert_eq!(
        ClientTls::psk(&missing, None).unwrap_err().to_string(),
        format!("{}: missing", missing.display())
    );
    // A server directory needs its certificate.
    let only_ca = dir.path().join("only-ca");
    std::fs::create_dir(&only_ca).unwrap();
    std::fs::copy(c.pki.join("ca-cert.pem"), only_ca.join("ca-cert.pem")).unwrap();
    assert_eq!(
        ServerTls::x509(&only_ca, false).unwrap_err().to_string(),
        format!("{}: missing", only_ca.join("server-cert.pem").display())
    );
    // ... but a client directory does not.
    ClientTls::x509(&only_ca).unwrap();
    std::fs::copy(
        c.pki.join("client-cert.pem"),
        only_ca.join("client-cert.pem"),
    )
    .unwrap();
    assert!(ClientTls::x509(&only_ca)
        .unwrap_err()
        .to_string()
        .contains("client-cert.pem is there but client-key.pem is missing"));

    // Not PEM.
    let garbage = dir.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join("ca-cert.pem"), "hello\n").unwrap();
    let e = ClientTls::x509(&garbage).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: not a PEM certificate",
            garbage.join("ca-cert.pem").display()
        )),
        "{e}"
    );

    // A key of another certificate.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(c.pki.join(f), mixed.join(f)).unwrap();
    }
    std::fs::copy(c.other.join("server-key.pem"), mixed.join("server-key.pem")).unwrap();
    let e = ServerTls::x509(&mixed, false).unwrap_err().to_string();
    assert!(e.contains("does not match the certificate"), "{e}");
    assert!(
        e.starts_with(&mixed.join("server-key.pem").display().to_string()),
        "{e}"
    );

    // Expired.
    let e = ServerTls::x509(&c.expired, false).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: the certificate expired on",
            c.expired.join("server-cert.pem").display()
        )),
        "{e}"
    );

    // Unknown PSK user.
    let e = ClientTls::psk(&c.psk, Some("mallory"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("{}: no key for the username \"mallory\"", c.psk.display())
    );
    ClientTls::psk(&c.psk, Some(PSK_USER)).unwrap();
}

async fn pair() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Runs both handshakes; returns both results, and if both succeeded, checks that data
/// crosses both ways through the split halves.
async fn handshake(
    server: &ServerTls,
    client: &ClientTls,
    host: &str,
) -> (Result<(), String>, Result<(), String>) {
    let (listener, addr) = pair().await;
    let server = server.clone();
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match accept(tcp, &server, LIMIT).await {
            Ok(stream) => {
                let (mut r, mut w) = stream.into_split();
                let mut buf = [0u8; 5];
                r.read_exact(&mut buf).await.unwrap();
                w.write_all(&buf).await.unwrap();
                w.flush().await.unwrap();
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = match connect(tcp, client, host, LIMIT).await {
        Ok(stream) => {
            assert!(stream.is_tls());
            let (mut r, mut w) = stream.into_split();
            let slices = [std::io::IoSlice::new(b"he"), std::io::IoSlice::new(b"llo")];
            // With TLS 1.3 a server refuses a client's certificate after the client's
            // handshake has completed: the client sees it when it next reads.
            let exchange = async {
                let n = w.write_vectored(&slices).await?;
                assert_eq!(n, 5, "small slices are written together");
                w.flush().await?;
                let mut buf = [0u8; 5];
                r.read_exact(&mut buf).await?;
                assert_eq!(&buf, b"hello");
                Ok::<(), std::io::Error>(())
            };
            exchange.await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    let server = tokio::time::timeout(LIMIT * 2, accepting)
        .await
        .unwrap()
        .unwrap();
    (server, client)
}

#[tokio::test]
async fn x509_handshakes() {
    let (_dir, c) = creds();
    let server = ServerTls::x509(&c.pki, false).unwrap();
    let client = ClientTls::x509(&c.pki).unwrap();
    let (s, cl) = handshake(&server, &client, "127.0.0.1").await;
    assert_eq!((s, cl), (Ok(()), Ok(())));
    let (s, cl) = handshake(&server, &client, "localhost").await;
    assert_eq!((s, cl), (Ok(()), Ok(())));

    // The certificate does not name the address.
    let (_, cl) = handshake(&server, &client, "127.0.0.2").await;
    let e = cl.unwrap_err();
    assert!(
        e.contains("the server's certificate was refused") && e.contains("IP address mismatch"),
        "{e}"
    );

    // A client that trusts another CA.
    let other = ClientTls::x509(&c.other).unwrap();
    let (_, cl) = handshake(&server, &other, "127.0.0.1").await;
    let e = cl.unwrap_err();
    assert!(e.contains("the server's certificate was refused"), "{e}");
    assert!(e.contains("local issuer"), "{e}");
}

#[tokio::test]
async fn client_certificates_are_checked_when_asked() {
    let (dir, c) = creds();
    let server = ServerTls::x509(&c.pki, true).unwrap();
    let client = ClientTls::x509(&c.pki).unwrap();
    let (s, cl) = handshake(&server, &client, "127.0.0.1").await;
    assert_eq!((s, cl), (Ok(()), Ok(())));

    // A client certificate from CA B, trusting A: refused by the server.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(c.pki.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(c.other.join(f), mixed.join(f)).unwrap();
    }
    let (s, _) = handshake(&server, &ClientTls::x509(&mixed).unwrap(), "127.0.0.1").await;
    let e = s.unwrap_err();
    assert!(e.contains("the client's certificate was refused"), "{e}");

    // No client certificate at all.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(c.pki.join("ca-cert.pem"), bare.join("ca-cert.pem")).unwrap();
    let (s, _) = handshake(&server, &ClientTls::x509(&bare).unwrap(), "127.0.0.1").await;
    assert!(s.is_err());
}

#[tokio::test]
async fn psk_handshakes() {
    let (_dir, c) = creds();
    let server = ServerTls::psk(&c.psk).unwrap();
    let (s, cl) = handshake(&server, &ClientTls::psk(&c.psk, None).unwrap(), "127.0.0.1").await;
    assert_eq!((s, cl), (Ok(()), Ok(())));
    // Same username, another key.
    let (s, cl) = handshake(&server, &ClientTls::psk(&c.other_psk, None).unwrap(), "x").await;
    assert!(s.is_err() && cl.is_err(), "{s:?} {cl:?}");
    // x509 against PSK.
    let (s, cl) = handshake(&server, &ClientTls::x509(&c.pki).unwrap(), "127.0.0.1").await;
    assert!(s.is_err() && cl.is_err(), "{s:?} {cl:?}");
}

#[tokio::test]
async fn stalled_and_closed_handshakes_end() {
    let (_dir, c) = creds();
    let client = ClientTls::psk(&c.psk, None).unwrap();
    let (listener, addr) = pair().await;
    let holder = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(tcp);
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = connect(tcp, &client, "127.0.0.1", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(e, TlsError::Timeout { .. }), "{e}");
    holder.abort();

    let (listener, addr) = pair().await;
    let closer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        drop(tcp);
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let e = connect(tcp, &client, "127.0.0.1", LIMIT).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("closed the connection during the TLS handshake"),
        "{e}"
    );
    closer.await.unwrap();
}

/// Writes `slices` whole through a TLS write half, as the server's writer does.
async fn write_all_vectored(w: &mut WriteHalf, slices: &[&[u8]]) {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        slices.iter().map(|s| std::io::IoSlice::new(s)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await.unwrap();
        assert!(n > 0);
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
}

/// The bytes a TLS 1.3 record adds to its plaintext: the inner content type and the
/// AEAD tag (no padding from OpenSSL by default).
const TLS13_OVERHEAD: usize = 17;

/// Reads TLS 1.3 application data records off the raw socket under a TLS client until
/// `plaintext` bytes have arrived; returns each record's plaintext length.
async fn raw_records(tcp: &TcpStream, plaintext: usize) -> Vec<usize> {
    let mut raw = Vec::new();
    let mut lengths = Vec::new();
    let mut parsed = 0;
    while lengths.iter().sum::<usize>() < plaintext {
        tcp.readable().await.unwrap();
        let mut chunk = [0u8; 64 * 1024];
        match tcp.try_read(&mut chunk) {
            Ok(0) => panic!("the connection ended"),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("{e}"),
        }
        while raw.len() >= parsed + 5 {
            let len = usize::from(u16::from_be_bytes([raw[parsed + 3], raw[parsed + 4]]));
            if raw.len() < parsed + 5 + len {
                break;
            }
            assert_eq!(raw[parsed], 23, "an application data record");
            lengths.push(len - TLS13_OVERHEAD);
            parsed += 5 + len;
        }
    }
    assert_eq!(parsed, raw.len(), "nothing follows the records");
    lengths
}

/// A reply header and its payload, written with one vectored write, go in one record when
/// they fit (a 4 KiB READ reply is one record, not a 16-byte record and another), and a
/// large payload goes in full 16 KiB records.
#[tokio::test]
async fn replies_are_written_in_few_full_records() {
    let (_dir, c) = creds();
    let server = ServerTls::x509(&c.pki, false).unwrap();
    let client = ClientTls::x509(&c.pki).unwrap();
    let (listener, addr) = pair().await;
    const BIG: usize = 1 << 20;
    let writing = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = accept(tcp, &server, LIMIT).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let mut ping = [0u8; 4];
        r.read_exact(&mut ping).await.unwrap();
        w.write_all(b"pong").await.unwrap();
        let header = [7u8; 16];
        write_all_vectored(&mut w, &[&header, &[1u8; 4096]]).await;
        let data = vec![2u8; BIG];
        write_all_vectored(&mut w, &[&header, &data]).await;
        // Keeps the connection open until the client has read everything.
        let _ = r.read(&mut ping).await;
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = connect(tcp, &client, "127.0.0.1", LIMIT).await.unwrap();
    // A round trip first, so that the session tickets a TLS 1.3 server sends after the
    // handshake are consumed by OpenSSL rather than counted here.
    stream.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    stream.read_exact(&mut pong).await.unwrap();
    let mut records = tokio::time::timeout(LIMIT, raw_records(stream.tcp(), 16 + 4096 + 16 + BIG))
        .await
        .unwrap();
    let big = records.split_off(1);
    let small = records;
    assert_eq!(small, [16 + 4096], "a 4 KiB reply in one record");
    let expected = (16 + BIG).div_ceil(16 * 1024);
    assert_eq!(big.len(), expected, "records of a 1 MiB reply: {big:?}");
    assert!(
        big[..big.len() - 1].iter().all(|&len| len == 16 * 1024),
        "records of a 1 MiB reply are full: {big:?}"
    );
    drop(stream);
    writing.await.unwrap();
}
