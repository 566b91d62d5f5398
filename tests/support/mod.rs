//! Shared harness of the end-to-end tests: it starts the real `flexnbd` binary on loopback,
//! runs real NBD clients against it with deadlines, and speaks the old-style NBD protocol
//! itself (a raw `TcpStream` client) for what the tools cannot do.
//!
//! Every child process lives in a [`ChildGuard`], whose `Drop` kills it (SIGKILL) and reaps
//! it, so a failing assertion never leaves a server behind. Every socket has read and write
//! timeouts and every loop is bounded, so a server bug fails a test instead of hanging it.

#![allow(dead_code)]

pub mod cluster;
pub mod nbdkit;
pub mod promise;
pub mod proxy;
pub mod relay;

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// Protocol constants (flexnbd-compat.md §4, §14)

pub const INIT_PASSWD: &[u8; 8] = b"NBDMAGIC";
pub const INIT_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const REPLY_MAGIC: u32 = 0x6744_6698;
pub const HELLO_LEN: usize = 152;
pub const REPLY_LEN: usize = 16;
/// HAS_FLAGS | SEND_FLUSH | SEND_FUA.
pub const FLAGS: u32 = 13;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EBADMSG: u32 = 74;

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

/// Deadline for a single socket read or write in the raw client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the server to report its port.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline for a client tool run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn flexnbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flexnbd")
}

// ---------------------------------------------------------------------------------------
// Child processes

/// Owns a child process: `Drop` kills it (SIGKILL) and waits for it, whatever happened.
pub struct ChildGuard {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            status: None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on a child");
        }
        self.status
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `QUIT`, ...) with kill(1), if still running.
    pub fn signal(&mut self, name: &str) {
        assert!(
            self.try_status().is_none(),
            "cannot send SIG{name}: the process has already exited"
        );
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.id().to_string())
            .status()
            .expect("running kill(1)");
        assert!(status.success(), "kill -{name} {} failed", self.id());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Child::kill sends SIGKILL; a child that already exited is simply reaped.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads a pipe to its end on a thread, keeping what it read.
struct Drain {
    text: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drain {
    fn start<R: Read + Send + 'static>(mut pipe: R) -> Drain {
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                }
            }
        });
        Drain {
            text,
            thread: Some(thread),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.text.lock().unwrap().clone()
    }

    fn string(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Waits (at most 5 s: a grandchild could keep the pipe open) for the pipe to close
    /// after the process has exited, then returns everything read.
    fn finish(mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.bytes()
    }
}

// ---------------------------------------------------------------------------------------
// Client tools

/// What a tool run produced.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ToolOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the tool's output unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout_str(),
            self.stderr
        );
        self
    }
}

/// Runs `cmd` to completion, feeding it `stdin` (or /dev/null), with a deadline: on expiry
/// the process is killed and the test fails.
pub fn run_tool(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> ToolOutput {
    let described = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut guard = ChildGuard::new(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start {described}: {e}")),
    );
    let feeder = stdin.map(|data| {
        let mut pipe = guard.child_mut().stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // The tool may stop reading early (that is what some tests check): ignore EPIPE.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let out = Drain::start(guard.child_mut().stdout.take().expect("piped stdout"));
    let err = Drain::start(guard.child_mut().stderr.take().expect("piped stderr"));
    let status = match guard.wait_timeout(timeout) {
        Some(status) => status,
        None => {
            drop(guard);
            panic!(
                "{described} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                out.string(),
                err.string()
            );
        }
    };
    let elapsed = start.elapsed();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    ToolOutput {
        status,
        stdout: out.finish(),
        stderr: String::from_utf8_lossy(&err.finish()).into_owned(),
        elapsed,
    }
}

/// `flexnbd ARGS...`, run to completion.
pub fn flexnbd(args: &[&str], stdin: Option<&[u8]>) -> ToolOutput {
    run_tool(
        Command::new(flexnbd_bin()).args(args),
        stdin,
        Duration::from_secs(30),
    )
}

/// A command for a tool from the Debian packages. `/usr/bin` comes first in PATH because
/// Debian's libnbd Python module is only visible to `/usr/bin/python3` (nbdsh runs
/// whatever `python3` PATH finds).
pub fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("/usr/bin:{path}"));
    cmd
}

/// Runs a Python script under `nbdsh -n` (no pre-made handle: the script makes its own, so
/// that it can turn libnbd's client-side checks off before connecting).
pub fn nbdsh(script: &str) -> ToolOutput {
    run_tool(tool("nbdsh").args(["-n", "-c", script]), None, TOOL_TIMEOUT)
}

// ---------------------------------------------------------------------------------------
// Images

/// Pseudo-random bytes (xorshift64*) from `seed`.
fn xorshift(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Deterministic test data, different for every seed and in every 4 KiB block: each block
/// is a window of a 64 KiB pseudo-random base, stamped with the seed and its index, so a
/// block written at the wrong offset is caught. (Built with copies rather than a
/// generator per byte because the tests run unoptimised.)
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    const BLOCK: usize = 4096;
    const BASE: usize = 64 * 1024;
    let base = xorshift(seed, BASE + BLOCK);
    let mut out = vec![0u8; len];
    for (i, block) in out.chunks_mut(BLOCK).enumerate() {
        let start = (i * 1031 * 8) % BASE;
        block.copy_from_slice(&base[start..start + block.len()]);
        let stamp = ((seed << 32) ^ i as u64 ^ 0x5555_0000_0000_0000).to_le_bytes();
        let n = block.len().min(stamp.len());
        block[..n].copy_from_slice(&stamp[..n]);
    }
    out
}

/// A temporary directory on the ext4 root file system.
pub fn disk_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("flexnbd-e2e-")
        .tempdir_in("/tmp")
        .expect("creating a temporary directory in /tmp")
}

/// A temporary directory on tmpfs.
pub fn shm_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("flexnbd-e2e-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory in /dev/shm")
}

/// A backing file in its own temporary directory (removed on drop).
pub struct Image {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl Image {
    /// A sparse all-zero image of `size` bytes in /tmp.
    pub fn zeroed(size: usize) -> Image {
        Image::zeroed_in(disk_dir(), size)
    }

    pub fn zeroed_in(dir: TempDir, size: usize) -> Image {
        let path = dir.path().join("disk.img");
        let file = fs::File::create(&path).expect("creating the image");
        file.set_len(size as u64).expect("sizing the image");
        Image { dir, path }
    }

    /// An image in /tmp holding `data`.
    pub fn with_data(data: &[u8]) -> Image {
        Image::with_data_in(disk_dir(), data)
    }

    pub fn with_data_in(dir: TempDir, data: &[u8]) -> Image {
        let path = dir.path().join("disk.img");
        fs::write(&path, data).expect("writing the image");
        Image { dir, path }
    }

    pub fn contents(&self) -> Vec<u8> {
        fs::read(&self.path).expect("reading the image")
    }

    /// A path for another file next to the image.
    pub fn sibling(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Asserts two byte strings are equal, reporting the first difference instead of dumping
/// megabytes.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    // Slice equality is a memcmp; the byte-wise search only runs to explain a failure.
    if actual != expected {
        let at = actual
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .expect("slices differ");
        panic!(
            "{what}: first difference at byte {at}: {:#04x} != expected {:#04x}",
            actual[at], expected[at]
        );
    }
}

/// Asserts every byte of `actual` is `byte`.
pub fn assert_filled(actual: &[u8], byte: u8, what: &str) {
    assert_same_bytes(actual, &vec![byte; actual.len()], what);
}

// ---------------------------------------------------------------------------------------
// The server

/// A running `flexnbd serve`, killed and reaped on drop. Its stderr is drained continuously
/// (so it never blocks on a full pipe) and kept for assertions.
pub struct Server {
    child: ChildGuard,
    log: Drain,
    pub addr: IpAddr,
    pub port: u16,
    /// The size the server announced in its `Serving` line.
    pub size: u64,
}

/// Fields of the `Serving <FILE> (<N> bytes) on <ADDR>:<PORT>` line.
fn parse_serving(log: &str) -> Option<(u64, u16)> {
    let line = log.lines().find(|l| l.contains(" Serving "))?;
    let rest = &line[line.find(" Serving ")? + " Serving ".len()..];
    let open = rest.rfind(" (")?;
    let size: u64 = rest[open + 2..].split(' ').next()?.parse().ok()?;
    let on = rest.rfind(" on ")?;
    let port: u16 = rest[on + 4..].rsplit(':').next()?.trim().parse().ok()?;
    Some((size, port))
}

impl Server {
    /// `flexnbd serve -l 127.0.0.1 -p 0 -f FILE EXTRA... -v`; panics if it does not start.
    pub fn start(file: &Path, extra: &[&str]) -> Server {
        Server::start_on("127.0.0.1", file, extra)
    }

    pub fn start_on(addr: &str, file: &Path, extra: &[&str]) -> Server {
        Server::try_start(addr, file, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts the server and waits for its `Serving` line. `-v` comes last, after the
    /// extra arguments, so that a flag in `extra` that wrongly swallowed the next word
    /// would show up as a server that never reports its port.
    pub fn try_start(addr: &str, file: &Path, extra: &[&str]) -> Result<Server, String> {
        let mut args: Vec<OsString> = ["serve", "-l", addr, "-p", "0", "-f"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(file.into());
        args.extend(extra.iter().map(OsString::from));
        args.push("-v".into());
        Server::launch(addr.parse().expect("a literal IP address"), &args)
    }

    /// Runs `flexnbd ARGS` (which must make it serve on port 0 with `-v`) and waits for its
    /// `Serving` line; `addr` is where clients connect.
    pub fn launch(addr: IpAddr, args: &[OsString]) -> Result<Server, String> {
        let mut cmd = Command::new(flexnbd_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(cmd.spawn().map_err(|e| format!("spawn: {e}"))?);
        let log = Drain::start(child.child_mut().stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some((size, port)) = parse_serving(&log.string()) {
                return Ok(Server {
                    child,
                    log,
                    addr,
                    port,
                    size,
                });
            }
            if let Some(status) = child.try_status() {
                let text = String::from_utf8_lossy(&log.finish()).into_owned();
                return Err(format!("flexnbd serve exited with {status}:\n{text}"));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "flexnbd serve did not report its port within {START_TIMEOUT:?}:\n{}",
                    log.string()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sockaddr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }

    /// `nbd://127.0.0.1:PORT` or `nbd://[::1]:PORT`.
    pub fn uri(&self) -> String {
        format!("nbd://{}", self.sockaddr())
    }

    /// Everything the server logged so far.
    pub fn stderr(&self) -> String {
        self.log.string()
    }

    /// Waits until the log contains `text` (the drain thread reads the pipe on its own
    /// schedule, so a line written just now may not be here yet); panics after 5 s.
    pub fn expect_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the server never logged {text:?}; its log:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&mut self, name: &str) {
        self.child.signal(name);
    }

    /// Waits for the server to exit; panics (killing it) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.child.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "the server did not exit within {timeout:?}; its log:\n{}",
                self.stderr()
            ),
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_status().is_none()
    }

    /// A raw client that has read and checked the hello.
    pub fn connect(&self) -> RawClient {
        RawClient::connect(self.sockaddr())
    }

    /// VmRSS of the server in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS")
    }

    /// VmHWM (peak RSS) of the server in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM")
    }
}

/// A field of /proc/PID/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"))
}

/// The log lines at level `letter` (`F`, `E`, ...), by the `<ms>:<L>:<pid> ` prefix.
pub fn log_lines_at(log: &str, letter: char) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let mut fields = l.splitn(3, ':');
            let ms = fields.next().unwrap_or("");
            let level = fields.next().unwrap_or("");
            !ms.is_empty()
                && ms.bytes().all(|b| b.is_ascii_digit())
                && level.len() == 1
                && level.starts_with(letter)
        })
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The raw protocol client

/// One reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
}

/// A 28-byte request header.
pub fn request_header(flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// What a fresh connection got instead of (or as) a hello.
#[derive(Debug)]
pub enum Greeting {
    Hello(RawClient),
    /// The server closed the connection without sending a byte.
    Eof,
    /// Some bytes, then the end: not a valid hello.
    Partial(usize),
    Error(io::Error),
}

/// An old-style NBD client on a plain `TcpStream`, with timeouts on every read and write.
#[derive(Debug)]
pub struct RawClient {
    pub stream: TcpStream,
    pub size: u64,
    pub flags: u32,
}

impl RawClient {
    /// Connects and reads the hello; a rejected connection is reported, not a panic.
    pub fn greet(addr: SocketAddr) -> Greeting {
        let stream = match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => s,
            Err(e) => return Greeting::Error(e),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut hello = [0u8; HELLO_LEN];
        let mut got = 0;
        while got < HELLO_LEN {
            match (&stream).read(&mut hello[got..]) {
                Ok(0) if got == 0 => return Greeting::Eof,
                Ok(0) => return Greeting::Partial(got),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Greeting::Error(e),
            }
        }
        assert_eq!(&hello[0..8], INIT_PASSWD, "hello passwd");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            INIT_MAGIC,
            "hello magic"
        );
        assert!(
            hello[28..].iter().all(|&b| b == 0),
            "the last 124 bytes of the hello must be zero"
        );
        Greeting::Hello(RawClient {
            stream,
            size: u64::from_be_bytes(hello[16..24].try_into().unwrap()),
            flags: u32::from_be_bytes(hello[24..28].try_into().unwrap()),
        })
    }

    /// Connects and reads the hello; panics if there is none.
    pub fn connect(addr: SocketAddr) -> RawClient {
        match RawClient::greet(addr) {
            Greeting::Hello(c) => c,
            other => panic!("no hello from {addr}: {other:?}"),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("sending to the server");
    }

    /// Sends a request header (no payload).
    pub fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
        self.send(&request_header(flags, kind, handle, offset, len));
    }

    /// Sends a WRITE header and its payload.
    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        let mut bytes = request_header(0, CMD_WRITE, handle, offset, data.len() as u32).to_vec();
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    /// Reads one reply header, checking its magic.
    pub fn read_reply(&mut self) -> Reply {
        let mut r = [0u8; REPLY_LEN];
        self.stream
            .read_exact(&mut r)
            .expect("reading a reply header");
        let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
        assert_eq!(magic, REPLY_MAGIC, "reply magic");
        Reply {
            error: u32::from_be_bytes(r[4..8].try_into().unwrap()),
            handle: u64::from_be_bytes(r[8..16].try_into().unwrap()),
        }
    }

    pub fn read_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).expect("reading data");
        buf
    }

    /// READ, expecting success; returns the data.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let handle = 0x5245_4144_0000_0000 | offset;
        self.request(0, CMD_READ, handle, offset, len as u32);
        let reply = self.read_reply();
        assert_eq!(
            reply,
            Reply { error: 0, handle },
            "reply to READ {len}@{offset}"
        );
        self.read_bytes(len)
    }

    /// WRITE, expecting success.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) {
        let handle = 0x5752_4954_0000_0000 | offset;
        self.send_write(handle, offset, data);
        let reply = self.read_reply();
        assert_eq!(
            reply,
            Reply { error: 0, handle },
            "reply to WRITE {}@{offset}",
            data.len()
        );
    }

    /// FLUSH, expecting success.
    pub fn flush(&mut self) {
        let handle = 0x464c_5553_4800_0000;
        self.request(0, CMD_FLUSH, handle, 0, 0);
        assert_eq!(
            self.read_reply(),
            Reply { error: 0, handle },
            "reply to FLUSH"
        );
    }

    /// Asserts the server closes the connection (EOF) without sending anything more.
    pub fn expect_eof(&mut self) {
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("expected EOF, got {n} more bytes: {:02x?}", &buf[..n]),
            Err(e) => panic!("expected EOF, got an error: {e}"),
        }
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Polls until a new connection gets a hello (a freed client slot is noticed by the server
/// asynchronously); panics after `timeout`.
pub fn connect_eventually(addr: SocketAddr, timeout: Duration) -> RawClient {
    let deadline = Instant::now() + timeout;
    loop {
        match RawClient::greet(addr) {
            Greeting::Hello(c) => return c,
            other if Instant::now() >= deadline => {
                panic!("still no hello from {addr} after {timeout:?}: {other:?}")
            }
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Page cache state

/// Pages of `len` bytes at `offset` of `path` that are dirty or under writeback, i.e. not
/// yet on stable storage, by cachestat(2). `None` if the kernel lacks it (before 6.5).
pub fn unsynced_pages(path: &Path, offset: u64, len: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// The same number on every architecture (it was added after the tables were unified).
    const SYS_CACHESTAT: libc::c_long = 451;
    let file = fs::File::open(path).expect("opening the file for cachestat");
    let range = Range { off: offset, len };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` to `stat`, both
    // live, properly laid out (#[repr(C)], all u64) locals; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSYS), "cachestat: {err}");
        return None;
    }
    Some(stat.nr_dirty + stat.nr_writeback)
}

// ---------------------------------------------------------------------------------------
// Servers started without waiting for them, ports, control sockets, allocation

impl Server {
    /// Starts `flexnbd ARGS` and returns at once, without waiting for any log line: for
    /// tests that watch the startup themselves. `port` is where clients will connect (the
    /// caller passed it in ARGS); `size` is left 0.
    pub fn spawn_unready(addr: IpAddr, port: u16, args: &[OsString]) -> Server {
        let mut cmd = Command::new(flexnbd_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::new(cmd.spawn().expect("spawning flexnbd"));
        let log = Drain::start(child.child_mut().stderr.take().expect("piped stderr"));
        Server {
            child,
            log,
            addr,
            port,
            size: 0,
        }
    }

    /// The exit status if the server has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_status()
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then released). Another
/// process may take it meanwhile; callers that bind it must cope with that.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0");
    listener.local_addr().expect("local address").port()
}

/// Sends `request` to the control socket at `sock` as it stands (with `eof`, the write
/// side is shut down afterwards) and reads everything the server sends until it closes the
/// connection, with [`IO_TIMEOUT`] on every read.
pub fn control_raw(sock: &Path, request: &[u8], eof: bool) -> io::Result<Vec<u8>> {
    use std::os::unix::net::UnixStream;
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request)?;
    if eof {
        stream.shutdown(Shutdown::Write)?;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(answer)
}

/// One well-formed control request (`command\n`, one line per argument, `\n`); returns the
/// whole answer (normally one `<code>: <text>\n` line). Panics if the exchange fails.
pub fn control(sock: &Path, command: &str, args: &[&str]) -> String {
    let mut request = format!("{command}\n");
    for a in args {
        request.push_str(a);
        request.push('\n');
    }
    request.push('\n');
    let answer = control_raw(sock, request.as_bytes(), false)
        .unwrap_or_else(|e| panic!("control request {command} {args:?} failed: {e}"));
    String::from_utf8(answer).expect("a control answer is text")
}

/// Bytes the file really occupies on disk (`st_blocks` * 512, what `du` reports).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks() * 512
}
