//! Two servers and a migration between them, for the end-to-end migration tests: starting a
//! `serve` source and a `listen` destination, driving `mirror`, reading `status`, and
//! comparing what arrived. Every process is in a guard (killed and reaped on drop), every
//! wait has a deadline.

use std::fs;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::*;

pub const LOCALHOST: &str = "127.0.0.1";
pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Deadline for a migration to finish once it may (the source has exited by then).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(40);
/// Deadline for a state `status` should reach.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// One status line as its `key=value` pairs, in order.
pub type Status = Vec<(String, String)>;

pub fn parse_status(answer: &str) -> Option<Status> {
    let line = answer.strip_prefix("0: ")?.strip_suffix('\n')?;
    Some(
        line.split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// `status` on the control socket at `sock`; panics unless the answer is a status line.
pub fn status(sock: &Path) -> Status {
    let answer = control(sock, "status", &[]);
    parse_status(&answer).unwrap_or_else(|| panic!("status answer {answer:?}"))
}

pub fn get<'a>(status: &'a Status, key: &str) -> Option<&'a str> {
    status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub fn num(status: &Status, key: &str) -> u64 {
    get(status, key)
        .unwrap_or_else(|| panic!("no {key} in {status:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {status:?}"))
}

/// Polls `status` every 10 ms until `done` holds; returns that status. Panics after
/// `timeout` with the last one.
pub fn wait_status(
    sock: &Path,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(sock);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {timeout:?}; last status: {s:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 10 ms; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `status` on a thread until stopped, keeping every answer: a record of the states
/// a migration went through. Errors (the socket vanishing when its server exits) are
/// skipped.
pub struct StatusWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Status>>>,
}

impl StatusWatch {
    pub fn start(sock: &Path) -> StatusWatch {
        let sock = sock.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(answer) = control_raw(&sock, b"status\n\n", false) {
                    if let Some(s) = parse_status(&String::from_utf8_lossy(&answer)) {
                        seen.push(s);
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        StatusWatch {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Vec<Status> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the status watcher panicked")
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every value `key` took in `seen`, in order of first appearance.
pub fn values_of(seen: &[Status], key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in seen {
        if let Some(v) = get(s, key) {
            if !out.iter().any(|o| o == v) {
                out.push(v.to_owned());
            }
        }
    }
    out
}

/// `flexnbd serve` on `file` with a control socket next to it.
pub fn start_source(file: &Path, sock: &Path) -> Server {
    Server::start(file, &["--sock", sock.to_str().unwrap()])
}

/// `flexnbd listen -l 127.0.0.1 -p PORT -f FILE [--sock SOCK] EXTRA... -v`, waiting for its
/// `Listening for a migration into FILE (N bytes) on ADDR:PORT` line; `port` 0 lets the
/// kernel choose (read back from that line).
pub fn start_listen(file: &Path, sock: Option<&Path>, port: u16, extra: &[&str]) -> Server {
    start_listen_with(file, sock, port, extra, |_| {})
}

pub fn parse_listening(log: &str) -> Option<(u64, u16)> {
    const MARK: &str = "Listening for a migration into ";
    let line = log.lines().find(|l| l.contains(MARK))?;
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let open = rest.rfind(" (")?;
    let size = rest[open + 2..].split(' ').next()?.parse().ok()?;
    let on = rest.rfind(" on ")?;
    let port = rest[on + 4..].rsplit(':').next()?.trim().parse().ok()?;
    Some((size, port))
}

/// `flexnbd mirror --sock SOCK --addr 127.0.0.1 --port PORT EXTRA...`.
pub fn mirror_cli(sock: &Path, port: u16, extra: &[&str]) -> ToolOutput {
    let port = port.to_string();
    let mut args = vec![
        "mirror",
        "--sock",
        sock.to_str().unwrap(),
        "--addr",
        LOCALHOST,
        "--port",
        &port,
    ];
    args.extend_from_slice(extra);
    flexnbd(&args, None)
}

/// Starts a migration with the CLI and checks flexnbd's success answer.
pub fn start_mirror(sock: &Path, port: u16, extra: &[&str]) {
    let out = mirror_cli(sock, port, extra);
    assert_eq!(out.code(), Some(0), "flexnbd mirror: {out:?}");
    assert_eq!(out.stdout_str(), "Mirror started\n", "{out:?}");
}

/// Starts a migration (action `exit`) limited to `max_bps` with the raw control command,
/// the only way to give the limit from the start (flexnbd §3.7).
pub fn start_limited_mirror(sock: &Path, port: u16, max_bps: u64) {
    let answer = control(
        sock,
        "mirror",
        &[
            LOCALHOST,
            &port.to_string(),
            "exit",
            LOCALHOST,
            &max_bps.to_string(),
        ],
    );
    assert_eq!(answer, "0: Mirror started\n");
}

/// The source's own account of the last attempt: (data bytes, zero-range bytes).
pub fn bytes_acknowledged(source: &Server) -> (u64, u64) {
    const MARK: &str = "All data acknowledged: ";
    source.expect_log(MARK);
    let log = source.stderr();
    let line = log.lines().rev().find(|l| l.contains(MARK)).unwrap();
    let words: Vec<&str> = line[line.find(MARK).unwrap() + MARK.len()..]
        .split(' ')
        .collect();
    // "N bytes sent as data, M as zero ranges"
    (words[0].parse().unwrap(), words[5].parse().unwrap())
}

pub fn assert_exit(server: &mut Server, code: i32, what: &str) {
    let status = server.wait_exit(MIGRATION_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(code),
        "{what} exited with {status}; its log:\n{}",
        server.stderr()
    );
}

/// Compares two files chunk by chunk, reporting the first difference.
pub fn assert_same_files(actual: &Path, expected: &Path, what: &str) {
    let (mut a, mut e) = (
        fs::File::open(actual).expect("opening the file"),
        fs::File::open(expected).expect("opening the file"),
    );
    let len = e.metadata().unwrap().len();
    assert_eq!(a.metadata().unwrap().len(), len, "{what}: sizes differ");
    const CHUNK: usize = 8 * MIB;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0u64;
    while at < len {
        let n = CHUNK.min((len - at) as usize);
        a.read_exact(&mut x[..n]).unwrap();
        e.read_exact(&mut y[..n]).unwrap();
        if x[..n] != y[..n] {
            let i = x[..n]
                .iter()
                .zip(&y[..n])
                .position(|(p, q)| p != q)
                .unwrap();
            panic!(
                "{what}: first difference at byte {}: {:#04x} != expected {:#04x}",
                at + i as u64,
                x[i],
                y[i]
            );
        }
        at += n as u64;
    }
}

/// A sparse image of `size` bytes with `regions` (offset, length) of pattern data.
pub fn sparse_image(size: u64, regions: &[(u64, usize)], seed: u64) -> Image {
    let img = Image::zeroed(size as usize);
    let file = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    for (i, &(offset, len)) in regions.iter().enumerate() {
        file.write_all_at(&pattern(seed + i as u64, len), offset)
            .unwrap();
    }
    file.sync_all().unwrap();
    img
}

/// An empty (sparse) destination file of `size` bytes in its own directory.
pub fn destination(size: u64) -> Image {
    Image::zeroed(size as usize)
}

/// Fills `ranges` of `path` with garbage, so that a migration must overwrite them.
pub fn scribble(path: &Path, ranges: &[(u64, usize)]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    for &(offset, len) in ranges {
        file.write_all_at(&vec![0xee; len], offset).unwrap();
    }
    file.sync_all().unwrap();
}

pub fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

pub fn assert_refused(port: u16, what: &str) {
    match TcpStream::connect_timeout(&SocketAddr::new(LOOPBACK, port), IO_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => panic!("{what}: expected ECONNREFUSED on port {port}, got {other:?}"),
    }
}

/// Reads the whole export through a raw client and compares it with `expected`.
pub fn assert_served_bytes(client: &mut RawClient, expected: &Path, what: &str) {
    let expected = fs::read(expected).unwrap();
    assert_eq!(client.size, expected.len() as u64, "{what}: export size");
    for (i, chunk) in expected.chunks(MIB).enumerate() {
        let got = client.read_at((i * MIB) as u64, chunk.len());
        assert_same_bytes(&got, chunk, &format!("{what}, MiB {i}"));
    }
}

// ---------------------------------------------------------------------------------------
// Additions for tests/handoff_link_faults.rs: servers started from a command the caller
// configured (environment variables, resource limits set in `pre_exec`).

/// Starts `cmd` (a `flexnbd` command with its arguments, environment, ...) with stdin and
/// stdout to /dev/null and stderr drained, without waiting for any log line (as
/// [`Server::spawn_unready`]). `port` is where clients will connect; `size` is left 0.
pub fn spawn_command(addr: IpAddr, port: u16, mut cmd: std::process::Command) -> Server {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = ChildGuard::new(cmd.spawn().expect("spawning flexnbd"));
    let log = super::Drain::start(child.child_mut().stderr.take().expect("piped stderr"));
    Server {
        child,
        log,
        addr,
        port,
        size: 0,
    }
}

/// `flexnbd serve -l 127.0.0.1 -p 0 -f FILE --sock SOCK -v` with `env` added to its
/// environment; waits for its `Serving` line (panics if it does not start).
pub fn start_source_with_env(file: &Path, sock: &Path, env: &[(&str, &str)]) -> Server {
    let mut cmd = std::process::Command::new(flexnbd_bin());
    cmd.args(["serve", "-l", LOCALHOST, "-p", "0", "-f"])
        .arg(file)
        .arg("--sock")
        .arg(sock)
        .arg("-v");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut server = spawn_command(LOOPBACK, 0, cmd);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some((size, port)) = super::parse_serving(&server.stderr()) {
            server.port = port;
            server.size = size;
            return server;
        }
        if let Some(status) = server.try_status() {
            panic!("flexnbd serve exited with {status}:\n{}", server.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "flexnbd serve did not report its port:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// [`start_listen`], with `configure` applied to the command before it is spawned (for
/// example a `pre_exec` that sets a resource limit).
pub fn start_listen_with(
    file: &Path,
    sock: Option<&Path>,
    port: u16,
    extra: &[&str],
    configure: impl FnOnce(&mut std::process::Command),
) -> Server {
    let mut cmd = std::process::Command::new(flexnbd_bin());
    cmd.arg("listen")
        .args(["-l", LOCALHOST, "-p", &port.to_string(), "-f"])
        .arg(file);
    if let Some(sock) = sock {
        cmd.arg("--sock").arg(sock);
    }
    cmd.args(extra).arg("-v");
    configure(&mut cmd);
    let mut server = spawn_command(LOOPBACK, port, cmd);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some((size, port)) = parse_listening(&server.stderr()) {
            server.port = port;
            server.size = size;
            return server;
        }
        if let Some(status) = server.try_status() {
            panic!("flexnbd listen exited with {status}:\n{}", server.stderr());
        }
        assert!(
            Instant::now() < deadline,
            "flexnbd listen did not report its port:\n{}",
            server.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}
