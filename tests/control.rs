//! The control socket of `serve` end to end (flexnbd §3.6-3.11, §5.1, §6, §7, §8, §9): the
//! real binary, its Unix control socket spoken to both raw (to check the exact bytes) and
//! through the `flexnbd` client modes (to check what operators and scripts see), and raw
//! NBD clients to observe what `status` counts and what `acl` disconnects.
//!
//! Timing matters in three places and is measured rather than slept for: `status` right
//! after a client closed must already count it out, a silent control client must not delay
//! the others, and the control socket must never exist before the NBD port answers.

mod support;

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const SIZE: usize = 16 * MIB;

/// The keys of the status line, in order: flexnbd's six, then ours.
const STATUS_KEYS: [&str; 8] = [
    "pid",
    "size",
    "is_mirroring",
    "clients_allowed",
    "num_clients",
    "has_control",
    "alloc_map",
    "alloc_map_progress",
];

/// `flexnbd serve` on an image with `--sock DIR/ctl.sock` and `extra` arguments.
fn start_controlled(img: &Image, extra: &[&str]) -> (Server, PathBuf) {
    let sock = img.sibling("ctl.sock");
    let mut args = vec!["--sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = Server::start(&img.path, &args);
    assert!(
        is_socket(&sock),
        "the control socket exists once the server serves"
    );
    (server, sock)
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Splits a status line (without `0: ` and the newline) into its pairs, checking the
/// format: every pair followed by exactly one space, the keys in the documented order.
fn parse_status_line(line: &str) -> Vec<(String, String)> {
    assert!(
        line.ends_with(' '),
        "the status line ends with a space: {line:?}"
    );
    assert!(!line.contains("  "), "one space between pairs: {line:?}");
    let pairs: Vec<(String, String)> = line
        .strip_suffix(' ')
        .unwrap()
        .split(' ')
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("{pair:?} is not key=value in {line:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, STATUS_KEYS, "status keys in {line:?}");
    pairs
}

/// `status` over the raw socket: the exact answer is `0: <line>\n`, then EOF.
fn status(sock: &Path) -> Vec<(String, String)> {
    let answer = control(sock, "status", &[]);
    let line = answer
        .strip_prefix("0: ")
        .and_then(|a| a.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("status answer {answer:?}"));
    assert!(!line.contains('\n'), "one line only: {answer:?}");
    parse_status_line(line)
}

fn field<'a>(pairs: &'a [(String, String)], key: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {pairs:?}"))
}

fn num_clients(sock: &Path) -> String {
    field(&status(sock), "num_clients").to_owned()
}

/// `flexnbd MODE --sock SOCK ARGS...`.
fn client_mode(mode: &str, sock: &Path, args: &[&str]) -> ToolOutput {
    let mut all = vec![mode, "--sock", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    flexnbd(&all, None)
}

fn assert_rejected(addr: SocketAddr, why: &str) {
    match RawClient::greet(addr) {
        Greeting::Eof => {}
        Greeting::Hello(_) => panic!("{why}: the client was served"),
        other => panic!("{why}: expected EOF without hello, got {other:?}"),
    }
}

/// A client served end to end: a write and a read back.
fn assert_served(client: &mut RawClient, offset: u64, byte: u8) {
    client.write_at(offset, &[byte; 512]);
    assert_eq!(client.read_at(offset, 512), vec![byte; 512]);
}

/// A raw client whose connection comes from the loopback address `local` (any of
/// 127.0.0.0/8 works on Linux), so that ACL entries can tell two local clients apart.
fn connect_from(local: &str, server: &Server) -> RawClient {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{local}:0").parse().unwrap();
    socket
        .bind(&from.into())
        .expect("binding the client address");
    socket
        .connect_timeout(&server.sockaddr().into(), IO_TIMEOUT)
        .expect("connecting");
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut hello = [0u8; HELLO_LEN];
    stream.read_exact(&mut hello).expect("reading the hello");
    assert_eq!(&hello[..8], INIT_PASSWD);
    RawClient {
        stream,
        size: u64::from_be_bytes(hello[16..24].try_into().unwrap()),
        flags: u32::from_be_bytes(hello[24..28].try_into().unwrap()),
    }
}

fn assert_no_panic(server: &Server) {
    let log = server.stderr();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

// ---------------------------------------------------------------------------------------
// status

#[test]
fn status_counts_clients_as_they_come_and_go() {
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &[]);

    let first = status(&sock);
    assert_eq!(field(&first, "pid"), server.pid().to_string());
    assert_eq!(field(&first, "size"), SIZE.to_string());
    assert_eq!(field(&first, "is_mirroring"), "false");
    assert_eq!(field(&first, "clients_allowed"), "true");
    assert_eq!(field(&first, "num_clients"), "0");
    assert_eq!(field(&first, "has_control"), "true");
    assert!(
        ["building", "built", "failed"].contains(&field(&first, "alloc_map")),
        "{first:?}"
    );
    let progress: u64 = field(&first, "alloc_map_progress").parse().unwrap();
    assert!(progress <= 100, "{first:?}");

    let a = server.connect();
    let mut b = server.connect();
    assert_eq!(num_clients(&sock), "2");
    // Closed by the client, then asked at once: the count is already lower.
    a.close();
    assert_eq!(num_clients(&sock), "1", "right after one client closed");
    assert_served(&mut b, 0, 0x5a);
    drop(b);
    assert_eq!(
        num_clients(&sock),
        "0",
        "right after the last client closed"
    );
    // Again with more clients, closed one by one: each close shows at once.
    let mut many: Vec<RawClient> = (0..8).map(|_| server.connect()).collect();
    assert_eq!(num_clients(&sock), "8");
    for left in (0..8).rev() {
        many.pop().unwrap().close();
        assert_eq!(num_clients(&sock), left.to_string(), "right after a close");
    }

    // The same line through `flexnbd status`, on stdout with a newline, exit 0.
    let out = client_mode("status", &sock, &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr, "");
    let text = out.stdout_str();
    let line = text.strip_suffix('\n').expect("a newline after the line");
    let via_cli = parse_status_line(line);
    let now = status(&sock);
    assert_eq!(via_cli[..6], now[..6], "the compatible keys agree");

    // `--json`: a JSON object with the same keys in the same order, numbers and booleans
    // unquoted. Python re-prints each value as JSON so that its type shows.
    let json = client_mode("status", &sock, &["--json"]);
    assert_eq!(json.code(), Some(0), "{json:?}");
    let script = "import json,sys\n\
                  d = json.load(sys.stdin)\n\
                  assert isinstance(d, dict)\n\
                  print(' '.join('%s=%s' % (k, json.dumps(v)) for k, v in d.items()))";
    let parsed = run_tool(
        Command::new("/usr/bin/python3").args(["-c", script]),
        Some(&json.stdout),
        TOOL_TIMEOUT,
    );
    parsed.assert_success("parsing `status --json` with python3");
    let expected: Vec<String> = status(&sock)
        .iter()
        .map(|(k, v)| {
            let bare = v == "true" || v == "false" || v.bytes().all(|b| b.is_ascii_digit());
            if bare {
                format!("{k}={v}")
            } else {
                format!("{k}=\"{v}\"")
            }
        })
        .collect();
    assert_eq!(
        parsed.stdout_str().trim_end(),
        expected.join(" "),
        "JSON was {}",
        json.stdout_str()
    );
    assert_no_panic(&server);
}

// ---------------------------------------------------------------------------------------
// acl

#[test]
fn acl_replacement_disconnects_clients_it_no_longer_admits() {
    let data = pattern(31, 32 * MIB);
    let img = Image::with_data(&data);
    let (server, sock) = start_controlled(&img, &[]);

    let mut busy = server.connect();
    let mut idle = server.connect();
    // A 16 MiB READ whose reply cannot fit in the socket buffers while nobody reads it:
    // it is still in flight when the ACL changes.
    let len = 16 * MIB;
    busy.request(0, CMD_READ, 0xac1, 0, len as u32);
    thread::sleep(Duration::from_millis(100));

    let out = client_mode("acl", &sock, &["10.0.0.1"]);
    assert_eq!(
        (out.code(), out.stdout_str().as_str(), out.stderr.as_str()),
        (Some(0), "updated\n", ""),
        "acl 10.0.0.1"
    );
    // The request in flight is answered in full, then the connection ends.
    let reply = busy.read_reply();
    assert_eq!(
        reply,
        Reply {
            error: 0,
            handle: 0xac1
        }
    );
    assert_same_bytes(&busy.read_bytes(len), &data[..len], "the READ in flight");
    busy.expect_eof();
    idle.expect_eof();
    assert_rejected(server.sockaddr(), "a new client after acl 10.0.0.1");
    assert_eq!(
        num_clients(&sock),
        "0",
        "after both clients were disconnected"
    );

    // Admitted again.
    let out = client_mode("acl", &sock, &["127.0.0.1"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let mut kept = server.connect();
    assert_served(&mut kept, 4096, 1);

    // A bad entry changes nothing: the connected client and new ones are still served.
    let out = client_mode("acl", &sock, &["10.0.0.1", "127.0.0.1/99"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(out.stderr, "bad spec: 127.0.0.1/99\n");
    assert_eq!(out.stdout_str(), "");
    assert_served(&mut kept, 8192, 2);
    assert_served(&mut server.connect(), 8192 + 512, 3);
    assert_eq!(
        control(&sock, "acl", &["::1", "not-an-address"]),
        "1: bad spec: not-an-address\n"
    );
    assert_served(&mut kept, 8192, 4);

    // Two local clients told apart by their source address: only the one the new list
    // does not admit is disconnected.
    assert_eq!(control(&sock, "acl", &["127.0.0.0/8"]), "0: updated\n");
    let mut from2 = connect_from("127.0.0.2", &server);
    assert_served(&mut from2, 0, 5);
    assert_eq!(control(&sock, "acl", &["127.0.0.1/32"]), "0: updated\n");
    from2.expect_eof();
    assert_served(&mut kept, 0, 6);
    assert_eq!(num_clients(&sock), "1");
    assert_no_panic(&server);
}

#[test]
fn empty_acl_keeps_the_default_deny_setting() {
    // With --default-deny, an empty list admits nobody, and the connected client goes.
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &["-d", "127.0.0.1"]);
    let mut before = server.connect();
    assert_served(&mut before, 0, 1);
    let out = client_mode("acl", &sock, &[]);
    assert_eq!(
        (out.code(), out.stdout_str()),
        (Some(0), "updated\n".into())
    );
    before.expect_eof();
    assert_rejected(server.sockaddr(), "empty ACL with --default-deny");

    // Without it, an empty list admits everyone, even after a list that admitted no one.
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &["10.0.0.1"]);
    assert_rejected(server.sockaddr(), "started with 10.0.0.1 only");
    let out = client_mode("acl", &sock, &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_served(&mut server.connect(), 0, 2);
}

// ---------------------------------------------------------------------------------------
// Concurrency and readiness

#[test]
fn silent_control_clients_delay_nobody() {
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &[]);
    // One connection that says nothing, one that stops in the middle of its command.
    let silent = UnixStream::connect(&sock).unwrap();
    let mut partial = UnixStream::connect(&sock).unwrap();
    partial.write_all(b"sta").unwrap();
    thread::sleep(Duration::from_millis(50));

    let workers: Vec<_> = (0..10)
        .map(|_| {
            let sock = sock.clone();
            thread::spawn(move || {
                let start = Instant::now();
                let answer = control(&sock, "status", &[]);
                (start.elapsed(), answer)
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for w in workers {
        let (took, answer) = w.join().expect("a status thread");
        assert!(answer.starts_with("0: pid="), "{answer:?}");
        assert!(
            took < Duration::from_secs(2),
            "a status took {took:?} while another client was silent"
        );
        slowest = slowest.max(took);
    }
    eprintln!("ten concurrent status answers, the slowest in {slowest:?}");

    // The partial request is still pending (no answer yet), and completes normally.
    partial
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut byte = [0u8; 1];
    match partial.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("an unfinished request was answered or closed: {other:?}"),
    }
    partial.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    partial.write_all(b"tus\n\n").unwrap();
    let mut answer = String::new();
    partial.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("0: pid="), "{answer:?}");
    drop(silent);
    assert_no_panic(&server);
}

/// Spawns `serve -p PORT --sock SOCK` without waiting for anything; returns the server and
/// the moment it was spawned.
fn spawn_on_port(img: &Image, sock: &Path, port: u16) -> (Server, Instant) {
    let mut args: Vec<OsString> = ["serve", "-l", "127.0.0.1", "-p"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(port.to_string().into());
    args.extend(["-f".into(), img.path.clone().into_os_string()]);
    args.extend(["--sock".into(), sock.as_os_str().to_owned()]);
    args.push("-v".into());
    let spawned = Instant::now();
    let server = Server::spawn_unready("127.0.0.1".parse().unwrap(), port, &args);
    (server, spawned)
}

/// What a tight poll for the control socket path saw.
enum Watched {
    /// The path appeared this long after the spawn.
    Appeared(Duration),
    /// The port chosen beforehand was taken by someone else meanwhile.
    PortTaken,
}

/// Polls (without sleeping, bounded by [`START_TIMEOUT`]) until `sock` exists.
fn watch_for_socket(server: &mut Server, sock: &Path, spawned: Instant) -> Watched {
    let deadline = spawned + START_TIMEOUT;
    let mut polls = 0u64;
    while fs::symlink_metadata(sock).is_err() {
        polls += 1;
        if polls.is_multiple_of(64) {
            if let Some(status) = server.try_status() {
                if server.stderr().contains("Failed to bind") {
                    return Watched::PortTaken;
                }
                panic!("the server exited with {status}:\n{}", server.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket within {START_TIMEOUT:?}:\n{}",
                server.stderr()
            );
        }
        thread::yield_now();
    }
    Watched::Appeared(spawned.elapsed())
}

/// The order is checked from outside, so a wrong order shows only if a poll falls in the
/// gap between the two binds: twenty starts make that likely.
#[test]
fn control_socket_appears_only_once_the_nbd_port_answers() {
    const STARTS: usize = 20;
    let img = Image::zeroed(SIZE);
    let mut seen: Vec<(Duration, Duration)> = Vec::new();
    for attempt in 0..STARTS + 10 {
        if seen.len() == STARTS {
            break;
        }
        let sock = img.sibling(&format!("ready{attempt}.sock"));
        let (mut server, spawned) = spawn_on_port(&img, &sock, free_port());
        let appeared = match watch_for_socket(&mut server, &sock, spawned) {
            Watched::Appeared(after) => after,
            Watched::PortTaken => continue,
        };
        // At this very moment, the port must accept and greet.
        match RawClient::greet(server.sockaddr()) {
            Greeting::Hello(c) => assert_eq!(c.size, SIZE as u64),
            other => panic!(
                "the control socket existed but the NBD port gave {other:?}\n{}",
                server.stderr()
            ),
        }
        seen.push((appeared, spawned.elapsed()));
        // And a clean exit removes it.
        server.signal("TERM");
        let status = server.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "{}", server.stderr());
        assert!(
            fs::symlink_metadata(&sock).is_err(),
            "the control socket was left behind after SIGTERM"
        );
        assert_no_panic(&server);
    }
    assert_eq!(
        seen.len(),
        STARTS,
        "ports kept being taken by other processes"
    );
    let socket_times: Vec<Duration> = seen.iter().map(|s| s.0).collect();
    let hello_times: Vec<Duration> = seen.iter().map(|s| s.1).collect();
    eprintln!(
        "{STARTS} starts: control socket after {:?}..{:?}, hello after {:?}..{:?}",
        socket_times.iter().min().unwrap(),
        socket_times.iter().max().unwrap(),
        hello_times.iter().min().unwrap(),
        hello_times.iter().max().unwrap(),
    );
}

// ---------------------------------------------------------------------------------------
// Startup refusals and shutdown

fn serve_with_sock(img: &Image, sock: &Path) -> ToolOutput {
    flexnbd(
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            img.path.to_str().unwrap(),
            "--sock",
            sock.to_str().unwrap(),
        ],
        None,
    )
}

fn assert_fatal_mentions(out: &ToolOutput, text: &str) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let fatal = log_lines_at(&out.stderr, 'F');
    assert!(
        fatal.iter().any(|l| l.contains(text)),
        "no F line mentioning {text:?}:\n{}",
        out.stderr
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[test]
fn an_existing_control_socket_path_is_refused_unless_stale() {
    let img = Image::zeroed(SIZE);

    let file = img.sibling("a-regular-file");
    fs::write(&file, b"not a socket").unwrap();
    let out = serve_with_sock(&img, &file);
    assert_fatal_mentions(&out, file.to_str().unwrap());
    assert_eq!(
        fs::read(&file).unwrap(),
        b"not a socket",
        "the file was touched"
    );

    // A socket left behind by a dead server (nobody accepts on it): removed, and the
    // server starts on it, saying so.
    let stale = img.sibling("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(is_socket(&stale));
    let server = Server::start(&img.path, &["--sock", stale.to_str().unwrap()]);
    server.expect_log("Removing the control socket");
    assert!(is_socket(&stale));
    // A live server answers on it: refused, naming that server's pid, and left alone.
    let other = Image::zeroed(SIZE);
    let out = serve_with_sock(&other, &stale);
    assert_fatal_mentions(&out, &format!("pid {}", server.pid()));
    assert!(is_socket(&stale), "the live server's socket was removed");
    let status = flexnbd(&["status", "--sock", stale.to_str().unwrap()], None);
    assert_eq!(
        status.code(),
        Some(0),
        "the live server lost its socket: {status:?}"
    );
    drop(server);

    // A path that does not fit a Unix socket address.
    let long = img.sibling(&"x".repeat(120));
    let out = serve_with_sock(&img, &long);
    assert_fatal_mentions(&out, "107");
    assert!(
        fs::symlink_metadata(&long).is_err(),
        "a too long path was created"
    );
}

#[test]
fn sigterm_removes_the_control_socket() {
    let img = Image::zeroed(SIZE);
    let (mut server, sock) = start_controlled(&img, &[]);
    let _client = server.connect();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "the control socket is still there after SIGTERM"
    );
    assert_no_panic(&server);
}

// ---------------------------------------------------------------------------------------
// Protocol robustness and answers

#[test]
fn garbage_on_the_control_socket_gets_a_documented_answer() {
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &[]);
    let mut long_line = vec![b'a'; 10 * KIB];
    long_line.push(b'\n');
    let cases: Vec<(&str, Vec<u8>, bool, Option<&str>)> = vec![
        (
            "nothing, then EOF",
            vec![],
            true,
            Some("9: missing command\n"),
        ),
        (
            "only a newline",
            b"\n".to_vec(),
            false,
            Some("9: missing command\n"),
        ),
        (
            "status without its newline, then EOF",
            b"status".to_vec(),
            true,
            Some("9: missing command\n"),
        ),
        (
            "an unknown command",
            b"bogus\n\n".to_vec(),
            false,
            Some("10: unknown command\n"),
        ),
        (
            "an unknown command ended by EOF",
            b"frobnicate\narg\n".to_vec(),
            true,
            Some("10: unknown command\n"),
        ),
        (
            // Lines are cut at 256 bytes: the command is 256 'a's.
            "a 10 KiB line without newline, then EOF",
            vec![b'a'; 10 * KIB],
            true,
            Some("10: unknown command\n"),
        ),
        (
            "a 10 KiB line",
            [long_line.as_slice(), b"\n"].concat(),
            false,
            Some("10: unknown command\n"),
        ),
        (
            "CR is not special",
            b"status\r\n\n".to_vec(),
            false,
            Some("10: unknown command\n"),
        ),
        (
            "binary junk",
            [&[0u8, 0xff, 0xfe, 0x80, 7, 0][..], b"\n\n"].concat(),
            false,
            Some("10: unknown command\n"),
        ),
        ("random bytes, then EOF", pattern(99, 8 * KIB), true, None),
        ("random bytes", pattern(98, 512), true, None),
    ];
    for (what, request, eof, expected) in cases {
        let answer = control_raw(&sock, &request, eof)
            .unwrap_or_else(|e| panic!("{what}: the exchange failed: {e}"));
        let answer = String::from_utf8_lossy(&answer).into_owned();
        match expected {
            Some(text) => assert_eq!(answer, text, "{what}"),
            None => {
                // Whatever the lines were, the answer is one documented line or nothing.
                let documented = answer.is_empty()
                    || (answer.ends_with('\n')
                        && answer.matches('\n').count() == 1
                        && ["0: ", "1: ", "9: ", "10: "]
                            .iter()
                            .any(|p| answer.starts_with(p)));
                assert!(documented, "{what}: answer {answer:?}");
            }
        }
        assert!(
            status(&sock)[0].1 == server.pid().to_string(),
            "status after {what}"
        );
    }

    // A request that never ends (2 MiB of lines, no blank line) is answered as it stands
    // once the server's 1 MiB limit is reached, and the connection closed. The sender is
    // a thread of its own: the server stops reading before it has sent everything.
    let mut endless = UnixStream::connect(&sock).unwrap();
    endless.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut sender = endless.try_clone().unwrap();
    sender.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let feeder = thread::spawn(move || {
        let mut lines = b"status\n".to_vec();
        lines.extend(b"x\n".repeat(MIB));
        let _ = sender.write_all(&lines);
    });
    // The server closes with our unread bytes still queued, so the end may come as a
    // reset (ECONNRESET) after its answer rather than as EOF.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match endless.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("reading the answer to a 2 MiB request: {e}"),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("0: pid=") && answer.matches('\n').count() == 1,
        "a 2 MiB request: {answer:?}"
    );
    feeder.join().unwrap();

    // Clients that leave without reading the answer, or in the middle of a request.
    for _ in 0..5 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"status\n\n").unwrap();
        drop(s);
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"acl\n127.0.0.1\n").unwrap();
        drop(s);
    }
    assert_eq!(field(&status(&sock), "num_clients"), "0");
    assert_no_panic(&server);
}

#[test]
fn control_client_exit_codes() {
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &[]);

    let out = client_mode("status", &sock, &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout_str().starts_with("pid="), "{out:?}");

    let cases: [(&str, &[&str], i32, &str); 6] = [
        ("break", &[], 1, "not mirroring"),
        ("break", &["ignored", "args"], 1, "not mirroring"),
        (
            "mirror-speed",
            &["--max-speed", "1000"],
            1,
            "Not currently mirroring",
        ),
        (
            "mirror",
            &["--addr", "127.0.0.1", "--port", "4777"],
            1,
            "Mirror failed to connect",
        ),
        ("acl", &["127.0.0.1/0"], 1, "bad spec: 127.0.0.1/0"),
        (
            "mirror",
            &["-l", "::1", "-p", "4777", "--unlink", "--bind", "::1"],
            1,
            "Mirror failed to connect",
        ),
    ];
    for (mode, args, code, text) in cases {
        let out = client_mode(mode, &sock, args);
        assert_eq!(out.code(), Some(code), "{mode} {args:?}: {out:?}");
        if mode == "mirror" {
            // flexnbd's text, then the cause (ours).
            let cause = out
                .stderr
                .strip_prefix(&format!("{text}\n"))
                .unwrap_or_else(|| panic!("{mode} {args:?}: {out:?}"));
            assert!(
                cause.contains("Connection refused"),
                "{mode} {args:?}: {out:?}"
            );
        } else {
            assert_eq!(out.stderr, format!("{text}\n"), "{mode} {args:?}");
        }
        assert_eq!(out.stdout_str(), "", "{mode} {args:?}");
    }
    let out = client_mode("acl", &sock, &["127.0.0.1", "::1/128"]);
    assert_eq!(
        (out.code(), out.stdout_str()),
        (Some(0), "updated\n".into())
    );

    // Code 10 exists only over the raw socket; exactly one line, nothing after it.
    assert_eq!(control(&sock, "frob", &[]), "10: unknown command\n");

    // Local failures exit 2 with an F line.
    let local_failure = |path: &Path, what: &str| {
        let out = client_mode("status", path, &[]);
        assert_eq!(out.code(), Some(2), "{what}: {out:?}");
        assert_eq!(out.stdout_str(), "", "{what}");
        assert_eq!(log_lines_at(&out.stderr, 'F').len(), 1, "{what}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{what}: {out:?}");
    };
    local_failure(&img.sibling("no-such.sock"), "no socket file");
    let dead = img.sibling("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    local_failure(&dead, "nobody listening");
    // A server that hangs up without answering.
    let mute = img.sibling("mute.sock");
    let listener = UnixListener::bind(&mute).unwrap();
    let hang_up = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    });
    local_failure(&mute, "no answer");
    hang_up.join().unwrap();

    // The other required options of the modes that have them.
    for (mode, args, message) in [
        (
            "mirror",
            &["--addr", "127.0.0.1"][..],
            "both --addr and --port are required.\n",
        ),
        ("mirror-speed", &[][..], "--max-speed is required.\n"),
    ] {
        let out = client_mode(mode, &sock, args);
        assert_eq!(out.code(), Some(1), "{mode} {args:?}: {out:?}");
        assert!(out.stderr.starts_with(message), "{mode} {args:?}: {out:?}");
    }

    // Without --sock: the message, the mode's help, exit 1.
    for (mode, args) in [
        ("status", &[][..]),
        ("acl", &["127.0.0.1"][..]),
        ("break", &[][..]),
        ("mirror-speed", &["--max-speed", "5"][..]),
        ("mirror", &["--addr", "127.0.0.1", "--port", "4777"][..]),
    ] {
        let mut all = vec![mode];
        all.extend_from_slice(args);
        let out = flexnbd(&all, None);
        assert_eq!(out.code(), Some(1), "{mode} without --sock: {out:?}");
        assert!(
            out.stderr.starts_with("--sock is required.\n"),
            "{mode}: {out:?}"
        );
        assert!(
            out.stderr.contains(&format!("flexnbd {mode} ")),
            "{mode}: the help is missing: {out:?}"
        );
        assert_eq!(out.stdout_str(), "", "{mode}");
    }
    assert_no_panic(&server);
}

#[test]
fn mirror_arguments_are_checked_with_the_documented_texts() {
    let img = Image::zeroed(SIZE);
    let (server, sock) = start_controlled(&img, &[]);
    let unavailable = "1: Mirror failed to connect\n";
    let cases: &[(&[&str], &str)] = &[
        (&[], "1: mirror takes at least two parameters\n"),
        (&["127.0.0.1"], "1: mirror takes at least two parameters\n"),
        (&["localhost", "4777"], "1: bad IP address\n"),
        (&["127.0.0.300", "4777"], "1: bad IP address\n"),
        (&["127.0.0.1", "65536"], "1: bad IP port number\n"),
        (&["127.0.0.1", "-1"], "1: bad IP port number\n"),
        (
            &["::1", "4777", "stay"],
            "1: action must be 'exit' or 'nothing'\n",
        ),
        (&["::1", "4777", "exit", "nowhere"], "1: bad bind address\n"),
        (
            &["::1", "4777", "exit", "::1", "18446744073709551616"],
            "1: max_bps out of range\n",
        ),
        // Ours: the sixth argument is the copy mode.
        (
            &["::1", "4777", "exit", "::1", "100", "extra"],
            "1: mode must be 'background', 'active' or 'auto'\n",
        ),
        (
            &["::1", "4777", "exit", "::1", "100", "auto", "extra"],
            "1: unrecognised parameters to mirror\n",
        ),
        // Checks run in order: a bad address wins over everything after it.
        (&["nowhere", "99999", "stay"], "1: bad IP address\n"),
        (&["127.0.0.1", "4777"], unavailable),
        (&["127.0.0.1", "0"], unavailable),
        (&["127.0.0.1", "65535", "nothing"], unavailable),
        (&["127.0.0.1", "4777", "unlink", "127.0.0.1"], unavailable),
        (&["::1", "4777", "exit", "::1", "garbage"], unavailable),
        (
            &["::1", "4777", "exit", "::1", "18446744073709551615"],
            unavailable,
        ),
    ];
    for (args, expected) in cases {
        let answer = control(&sock, "mirror", args);
        if *expected != unavailable {
            assert_eq!(&answer, expected, "mirror {args:?}");
            continue;
        }
        // flexnbd's line, then (ours) one line with the cause, which C clients never read.
        let cause = answer
            .strip_prefix(unavailable)
            .unwrap_or_else(|| panic!("mirror {args:?}: {answer:?}"));
        assert!(
            cause.starts_with("1: ") && cause.ends_with('\n') && cause.lines().count() == 1,
            "mirror {args:?}: the cause line is {cause:?}"
        );
        assert!(
            cause.contains("refused") || cause.contains("connect"),
            "mirror {args:?}: {cause:?}"
        );
    }
    for args in [&[][..], &["1000"][..], &["1", "2"][..]] {
        assert_eq!(
            control(&sock, "mirror_max_bps", args),
            "1: Not currently mirroring\n",
            "mirror_max_bps {args:?}"
        );
    }
    assert_eq!(control(&sock, "break", &["x"]), "1: not mirroring\n");
    // Nothing was registered by any of it.
    assert_eq!(field(&status(&sock), "is_mirroring"), "false");
    assert_no_panic(&server);
}

// ---------------------------------------------------------------------------------------
// The allocation map

#[test]
fn a_1_tib_sparse_export_is_served_and_answers_status_at_once() {
    let dir = disk_dir();
    let img = Image {
        path: dir.path().join("huge.img"),
        dir,
    };
    let file = fs::File::create(&img.path).unwrap();
    file.set_len(1 << 40).unwrap();
    drop(file);
    let sock = img.sibling("huge.sock");
    // (Should another process take the port meanwhile, the handshake fails loudly.)
    let (server, spawned) = spawn_on_port(&img, &sock, free_port());
    let addr = server.sockaddr();

    let hello = thread::spawn(move || {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(stream) = TcpStream::connect(addr) {
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut hello = [0u8; HELLO_LEN];
                (&stream).read_exact(&mut hello).expect("the hello");
                let took = spawned.elapsed();
                return (took, u64::from_be_bytes(hello[16..24].try_into().unwrap()));
            }
            assert!(Instant::now() < deadline, "no NBD port");
            thread::sleep(Duration::from_micros(200));
        }
    });
    let status_sock = sock.clone();
    let first_status = thread::spawn(move || {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(answer) = control_raw(&status_sock, b"status\n\n", false) {
                return (spawned.elapsed(), String::from_utf8(answer).unwrap());
            }
            assert!(Instant::now() < deadline, "no control socket");
            thread::sleep(Duration::from_micros(200));
        }
    });
    let (hello_after, size) = hello.join().expect("the handshake thread");
    let (status_after, answer) = first_status.join().expect("the status thread");
    eprintln!(
        "1 TiB sparse export: hello {hello_after:?}, first status {status_after:?} after \
         spawning the server ({})",
        answer.trim_end()
    );
    assert_eq!(size, 1 << 40);
    let pairs = parse_status_line(
        answer
            .strip_prefix("0: ")
            .and_then(|a| a.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("{answer:?}")),
    );
    assert_eq!(field(&pairs, "size"), (1u64 << 40).to_string());
    assert!(
        hello_after < Duration::from_secs(2),
        "hello after {hello_after:?}"
    );
    assert!(
        status_after < Duration::from_secs(2),
        "status after {status_after:?}"
    );
    assert_no_panic(&server);
}

/// Writes zeros over the whole of a 1 GiB sparse image holding 1 MiB of data, with a
/// writer that really sends 1 GiB of zero bytes, and checks the file stays sparse while
/// the data it held is overwritten.
fn zeros_written_into_holes_keep_the_image_sparse(dir: tempfile::TempDir) {
    const GIB: u64 = 1 << 30;
    const DATA_AT: u64 = 100 * MIB as u64;
    let img = Image::zeroed_in(dir, GIB as usize);
    {
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
        file.write_all_at(&pattern(5, MIB), DATA_AT).unwrap();
        file.sync_all().unwrap();
    }
    let before = allocated_bytes(&img.path);
    assert!(
        (MIB as u64..8 * MIB as u64).contains(&before),
        "the image holds about 1 MiB: {before} bytes allocated"
    );
    let (server, sock) = start_controlled(&img, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pairs = status(&sock);
        match field(&pairs, "alloc_map") {
            "built" => {
                assert_eq!(field(&pairs, "alloc_map_progress"), "100");
                break;
            }
            "building" => {}
            other => panic!("alloc_map={other}:\n{}", server.stderr()),
        }
        assert!(
            Instant::now() < deadline,
            "the map was not built: {pairs:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let script = format!(
        "exec \"$0\" write -l 127.0.0.1 -p {} -F 0 -S {GIB} < /dev/zero",
        server.port
    );
    let written = run_tool(
        Command::new("sh").args(["-c", &script, flexnbd_bin()]),
        None,
        TOOL_TIMEOUT,
    );
    written.assert_success("flexnbd write of 1 GiB of zeros");
    let mut client = server.connect();
    client.flush();
    let data = client.read_at(DATA_AT, MIB);
    assert_filled(&data, 0, "the data region after writing zeros over it");
    assert_filled(&client.read_at(GIB - 4096, 4096), 0, "the last block");
    client.close();
    let after = allocated_bytes(&img.path);
    eprintln!(
        "{}: {before} bytes allocated before, {after} after writing 1 GiB of zeros in {:?}",
        img.dir.path().display(),
        written.elapsed
    );
    assert!(
        after <= before + MIB as u64,
        "the image filled up: {before} bytes allocated before, {after} after"
    );
    assert_no_panic(&server);
}

#[test]
fn zeros_keep_a_sparse_image_sparse_on_ext4() {
    zeros_written_into_holes_keep_the_image_sparse(disk_dir());
}

#[test]
fn zeros_keep_a_sparse_image_sparse_on_tmpfs() {
    zeros_written_into_holes_keep_the_image_sparse(shm_dir());
}
