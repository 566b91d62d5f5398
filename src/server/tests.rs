//! A whole server started through [`Server`], without the binary: the file is a temporary
//! one, the port is picked by the system, and the shutdown is asked for with a
//! [`ShutdownHandle`] instead of a signal. The end-to-end tests in `tests/` drive the
//! binary; these check that the composition root works as a library.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::protocol::reply::decode_simple_reply;
use crate::protocol::request::{Command, HeaderStyle, Request};
use crate::protocol::{OLDSTYLE_HELLO_LEN, SIMPLE_REPLY_LEN};

/// Upper bound of every wait that is expected to succeed.
const WAIT: Duration = Duration::from_secs(10);
const SIZE: u64 = 1 << 20;

/// The options `flexnbd serve --addr 127.0.0.1 --port 0 --file FILE` would give.
fn options(mode: Mode, file: &Path, sock: Option<&Path>) -> Options {
    Options {
        mode,
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port: 0,
        file: file.to_owned(),
        sock: sock.map(Path::to_owned),
        acl: Acl::default(),
        killswitch: false,
        max_clients: DEFAULT_MAX_CLIENTS,
        sync_writes: false,
        grace: Duration::from_secs(1),
        busy_poll: SessionConfig::DEFAULT_BUSY_POLL,
        read_only: false,
        lock: true,
        newstyle: None,
        tls: None,
    }
}

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(SIZE))
        .expect("create the image");
    path
}

/// Runs the server on a thread of its own (an actix `System` per thread), like `main` does
/// on its main thread; the receiver gets what [`Server::run`] returned.
fn spawn(server: Server) -> mpsc::Receiver<anyhow::Result<i32>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.run());
    });
    rx
}

fn exit_status(done: &mpsc::Receiver<anyhow::Result<i32>>) -> i32 {
    done.recv_timeout(WAIT + Duration::from_secs(10))
        .expect("the server ends")
        .expect("no fatal error")
}

fn connect(server: &Server) -> TcpStream {
    let client = TcpStream::connect(server.local_addr()).expect("connect");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    client
}

fn hello(client: &mut TcpStream) -> OldstyleHello {
    let mut hello = [0u8; OLDSTYLE_HELLO_LEN];
    client.read_exact(&mut hello).expect("read the hello");
    OldstyleHello::decode(&hello).expect("an old-style hello")
}

#[test]
fn a_serve_server_runs_without_the_binary_and_shuts_down_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = image(dir.path());
    let sock = dir.path().join("ctl.sock");
    let server = Server::bind(options(Mode::Serve, &file, Some(&sock))).expect("bind");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0, "the system picked a port");
    assert!(
        sock.exists(),
        "the control socket exists once the port listens"
    );
    let stop = server.shutdown_handle();
    let mut client = connect(&server);
    let done = spawn(server);

    assert_eq!(
        hello(&mut client),
        OldstyleHello {
            size: SIZE,
            flags: tflags::FLEXNBD_COMPAT,
        }
    );
    let data = vec![0xa5u8; 4096];
    let mut request = Vec::new();
    Request {
        flags: 0,
        command: Command::Write,
        cookie: 7,
        offset: 8192,
        length: data.len() as u64,
    }
    .encode(HeaderStyle::Compact, &mut request)
    .expect("encode");
    request.extend_from_slice(&data);
    client.write_all(&request).expect("send the write");
    let mut reply = [0u8; SIMPLE_REPLY_LEN];
    client.read_exact(&mut reply).expect("read the reply");
    let reply = decode_simple_reply(&reply).expect("a simple reply");
    assert_eq!((reply.error, reply.cookie), (0, 7));

    stop.shut_down();
    assert_eq!(exit_status(&done), 0, "a requested shutdown exits 0");
    // The session was closed, the control socket's path removed, the port closed, and
    // the acknowledged write is in the file.
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing after the reply: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(!sock.exists(), "the control socket is removed at exit");
    assert_eq!(
        TcpStream::connect(addr).map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionRefused)
    );
    let mut written = vec![0u8; data.len()];
    std::fs::File::open(&file)
        .and_then(|f| f.read_exact_at(&mut written, 8192))
        .expect("read the file");
    assert_eq!(written, data);
}

#[test]
fn a_listen_server_stopped_before_any_migration_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = image(dir.path());
    let server = Server::bind(options(Mode::Listen { rebind: None }, &file, None)).expect("bind");
    let stop = server.shutdown_handle();
    let mut client = connect(&server);
    // A request made before the server runs is kept for it.
    stop.shut_down();
    let done = spawn(server);
    // Control was never taken: exit 1 proves it to whoever supervises the migration.
    assert_eq!(exit_status(&done), 1);
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
}

#[test]
fn an_existing_control_socket_path_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = image(dir.path());
    let sock = dir.path().join("ctl.sock");
    std::fs::write(&sock, b"not ours").expect("create the path");
    let err = Server::bind(options(Mode::Serve, &file, Some(&sock)))
        .err()
        .expect("the path exists");
    assert!(
        err.to_string().starts_with(&format!(
            "Couldn't bind control socket to {}",
            sock.display()
        )),
        "{err:#}"
    );
    assert_eq!(std::fs::read(&sock).expect("still there"), b"not ours");
}
