//! `flexnbd serve --newstyle` driven end to end: real clients (nbdinfo, nbdcopy, nbdsh with
//! libnbd 1.14, qemu-img and qemu-io from QEMU 10) and a raw fixed new-style client on a
//! `TcpStream` for what no tool lets us send (wrong export names over EXPORT_NAME, ABORT,
//! unknown options and client flags, commands a client library refuses to build).
//!
//! What the tools say is checked against the file itself: holes by `lseek(SEEK_DATA /
//! SEEK_HOLE)` and `st_blocks`, contents byte by byte. libnbd errors are checked to come
//! from the server ("command failed"), not from libnbd's own checks (strict mode is off).
//! Backing files live on ext4 (/tmp) and tmpfs (/dev/shm), whose fallocate support differs.

mod support;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

// ---------------------------------------------------------------------------------------
// Protocol constants (shared/spec/nbd-protocol.md)

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const CHUNK_FLAG_DONE: u16 = 1;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_ERROR: u16 = 0x8001;

const CMD_CACHE: u16 = 5;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_DF: u16 = 1 << 2;

/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN |
/// SEND_CACHE | SEND_FAST_ZERO: a writable export without structured replies.
const TFLAGS_PLAIN: u16 = 0x0d6d;
/// The same plus SEND_DF, which only structured replies make meaningful.
const TFLAGS_STRUCTURED: u16 = TFLAGS_PLAIN | 0x0080;

/// The name our servers export (the empty name names it too).
const NAME: &str = "disk";

/// `flexnbd serve --newstyle --export-name disk EXTRA... -v` on loopback, port 0.
fn serve(file: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--newstyle", "--export-name", NAME];
    args.extend_from_slice(extra);
    Server::start(file, &args)
}

/// `nbd://127.0.0.1:PORT/disk`.
fn uri(server: &Server) -> String {
    format!("{}/{NAME}", server.uri())
}

/// A `size`-byte sparse image in `dir` with `data` written at `offset` (the rest is holes).
fn sparse_image(dir: tempfile::TempDir, size: usize, offset: u64, data: &[u8]) -> Image {
    let img = Image::zeroed_in(dir, size);
    let file = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    file.write_all_at(data, offset)
        .expect("writing the image's data");
    img
}

/// Bytes the file occupies on disk (`st_blocks` * 512).
fn occupied_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat").blocks() * 512
}

/// `lseek(fd, from, whence)` on a fresh descriptor of `path`; `None` past the last data.
fn seek(path: &Path, from: u64, whence: i32) -> Option<u64> {
    let file = File::open(path).expect("opening the image");
    // SAFETY: lseek only reads its integer arguments; the descriptor is open.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO), "lseek: {err}");
        return None;
    }
    Some(at as u64)
}

/// Asserts `[offset, offset + len)` of the file is a hole (nothing allocated in it).
fn assert_hole(path: &Path, offset: u64, len: u64, what: &str) {
    assert_eq!(
        seek(path, offset, libc::SEEK_HOLE),
        Some(offset),
        "{what}: SEEK_HOLE from {offset} should stay there"
    );
    let data = seek(path, offset, libc::SEEK_DATA);
    assert!(
        data.is_none_or(|d| d >= offset + len),
        "{what}: data at {data:?}, inside the hole [{offset}, {})",
        offset + len
    );
}

/// Asserts the tool ran and reported no failure.
fn tool_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = run_tool(cmd, None, TOOL_TIMEOUT);
    out.assert_success(what);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        !text.contains("failed"),
        "{what} reported a failure:\n{text}"
    );
    text
}

/// The value of `"key": value` in nbdinfo's JSON (flat scan, enough for its output).
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"'))
}

/// Parses the `name=value` lines a script printed.
fn results(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Runs an nbdsh script and returns its `name=value` results, failing on a missing name.
fn nbdsh_results(script: &str) -> impl Fn(&str) -> String {
    let out = nbdsh(script);
    out.assert_success("nbdsh script");
    let stdout = out.stdout_str();
    let r = results(&stdout);
    move |k: &str| {
        r.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} in the nbdsh output:\n{stdout}"))
    }
}

/// `nbdinfo --map`: (offset, length, type) per line.
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run_tool(tool("nbdinfo").args(["--map", uri]), None, TOOL_TIMEOUT);
    out.assert_success("nbdinfo --map");
    out.stdout_str()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| -> u64 {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("cannot parse nbdinfo --map line {l:?}"))
            };
            (num(0), num(1), num(2) as u32)
        })
        .collect()
}

/// Compares two files in 8 MiB pieces (gigabyte files are never held in memory whole).
fn assert_same_files(a: &Path, b: &Path, what: &str) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{what}: sizes differ");
    let mut ba = vec![0u8; 8 * MIB];
    let mut bb = vec![0u8; 8 * MIB];
    let mut at = 0u64;
    while at < la {
        let n = (la - at).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            assert_same_bytes(&bb[..n], &ba[..n], &format!("{what} (piece at {at})"));
        }
        at += n as u64;
    }
}

/// Number of connections the server has accepted so far.
fn accepted(server: &Server) -> usize {
    server
        .stderr()
        .lines()
        .filter(|l| l.contains(" accepted (session "))
        .count()
}

/// Connections accepted since `before` was counted, waiting up to 5 s for at least `want`
/// (the log pipe is drained on its own schedule).
fn accepted_since(server: &Server, before: usize, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = accepted(server) - before;
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// A raw fixed new-style client

struct OptionReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Chunk {
    /// The errno of an error chunk.
    fn error(&self) -> u32 {
        assert_eq!(self.kind, CHUNK_ERROR, "expected an error chunk");
        u32::from_be_bytes(self.payload[0..4].try_into().unwrap())
    }
}

/// The client side of fixed new-style negotiation and a structured-reply transmission,
/// with a timeout on every read and write.
struct Newstyle {
    stream: TcpStream,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Newstyle {
    /// Connects and checks the greeting: NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES.
    fn connect(addr: SocketAddr) -> Newstyle {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connecting");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut c = Newstyle { stream };
        let g = c.read(18);
        assert_eq!(&g[0..8], b"NBDMAGIC", "greeting magic");
        assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting IHAVEOPT");
        assert_eq!(
            be16(&g[16..]),
            3,
            "handshake flags FIXED_NEWSTYLE | NO_ZEROES"
        );
        c
    }

    /// Connects and sends the client flags.
    fn start(addr: SocketAddr, flags: u32) -> Newstyle {
        let mut c = Newstyle::connect(addr);
        c.send(&flags.to_be_bytes());
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("sending to the server");
    }

    fn read(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("reading {len} bytes from the server: {e}"));
        buf
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    fn reply(&mut self) -> OptionReply {
        let h = self.read(20);
        assert_eq!(be64(&h), OPTION_REPLY_MAGIC, "option reply magic");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 64 * KIB, "option reply of {len} bytes");
        OptionReply {
            option: be32(&h[8..]),
            kind: be32(&h[12..]),
            data: self.read(len),
        }
    }

    /// INFO or GO for `name` without information requests: returns the export's size and
    /// transmission flags from NBD_INFO_EXPORT (after the final ACK), or the error type.
    fn info_or_go(&mut self, option: u32, name: &str) -> Result<(u64, u16), u32> {
        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        self.option(option, &payload);
        let mut export = None;
        for _ in 0..16 {
            let r = self.reply();
            assert_eq!(r.option, option, "reply to the wrong option");
            match r.kind {
                REP_INFO if be16(&r.data) == 0 => {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    export = Some((be64(&r.data[2..]), be16(&r.data[10..])));
                }
                REP_INFO => {}
                REP_ACK => return Ok(export.expect("ACK without NBD_INFO_EXPORT")),
                err => return Err(err),
            }
        }
        panic!("no ACK after 16 replies");
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_header(flags, kind, cookie, offset, len));
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.read(16);
        assert_eq!(be32(&r), REPLY_MAGIC, "simple reply magic");
        (be32(&r[4..]), be64(&r[8..]))
    }

    /// One structured reply chunk.
    fn chunk(&mut self) -> Chunk {
        let h = self.read(20);
        assert_eq!(be32(&h), STRUCTURED_REPLY_MAGIC, "structured reply magic");
        let len = be32(&h[16..]) as usize;
        assert!(len <= 33 * MIB, "chunk of {len} bytes");
        Chunk {
            flags: be16(&h[4..]),
            kind: be16(&h[6..]),
            cookie: be64(&h[8..]),
            payload: self.read(len),
        }
    }

    /// Asserts the server closes the connection without sending anything more.
    fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 256];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "{what}: expected the server to close, got {:02x?}",
                &buf[..n]
            ),
            Err(e) => panic!("{what}: expected the server to close, got {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// nbdinfo and qemu-img map

#[test]
fn nbdinfo_lists_the_export_and_reports_its_flags() {
    let img = Image::zeroed_in(shm_dir(), 16 * MIB);
    let server = serve(&img.path, &["--description", "a disk for tests"]);

    let list = run_tool(
        tool("nbdinfo").args(["--list", &server.uri()]),
        None,
        TOOL_TIMEOUT,
    );
    list.assert_success("nbdinfo --list");
    let text = list.stdout_str();
    assert!(text.contains("export=\"disk\":"), "no export in\n{text}");
    assert!(
        text.contains("description: a disk for tests"),
        "no description in\n{text}"
    );
    assert!(text.contains("base:allocation"), "no context in\n{text}");

    let json_of = |uri: &str| {
        let out = run_tool(tool("nbdinfo").args(["--json", uri]), None, TOOL_TIMEOUT);
        out.assert_success("nbdinfo --json");
        out.stdout_str()
    };
    let check = |json: &str, expect: &[(&str, &str)]| {
        for (key, value) in expect {
            assert_eq!(json_value(json, key), Some(*value), "{key} in\n{json}");
        }
    };
    let common = [
        ("protocol", "newstyle-fixed"),
        ("structured", "true"),
        ("export-size", "16777216"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_cache", "true"),
        ("can_df", "true"),
        ("can_multi_conn", "true"),
        ("block_size_minimum", "1"),
        ("block_size_preferred", "4096"),
        ("block_size_maximum", "33554432"),
    ];
    let writable = [
        ("is_read_only", "false"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        ("can_fast_zero", "true"),
    ];
    let json = json_of(&uri(&server));
    check(&json, &common);
    check(&json, &writable);
    check(&json, &[("description", "a disk for tests")]);
    // The empty name is the same export.
    let json = json_of(&server.uri());
    check(&json, &common);
    check(&json, &writable);
    drop(server);

    let ro = serve(&img.path, &["-r"]);
    let json = json_of(&uri(&ro));
    check(&json, &common);
    check(
        &json,
        &[
            ("is_read_only", "true"),
            ("can_trim", "false"),
            ("can_zero", "false"),
            ("can_fast_zero", "false"),
        ],
    );
}

#[test]
fn nbdinfo_map_and_qemu_img_map_report_the_holes_exactly() {
    // 64 MiB with data at [16 MiB, 20 MiB) only.
    let img = sparse_image(disk_dir(), 64 * MIB, 16 * MIB as u64, &pattern(1, 4 * MIB));
    let server = serve(&img.path, &[]);
    let (m16, m4) = (16 * MIB as u64, 4 * MIB as u64);

    assert_eq!(
        nbdinfo_map(&uri(&server)),
        vec![(0, m16, 3), (m16, m4, 0), (m16 + m4, 44 * MIB as u64, 3)],
        "nbdinfo --map"
    );

    let out = run_tool(
        tool("qemu-img").args(["map", "--output=json", "-f", "raw", &uri(&server)]),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-img map");
    let json = out.stdout_str();
    let ranges: Vec<(u64, u64, String, String)> = json
        .lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let num = |k: &str| json_value(l, k).and_then(|v| v.parse().ok()).unwrap();
            let flag = |k: &str| json_value(l, k).unwrap().to_owned();
            (num("start"), num("length"), flag("zero"), flag("data"))
        })
        .collect();
    let (t, f) = (|| "true".to_owned(), || "false".to_owned());
    assert_eq!(
        ranges,
        vec![
            (0, m16, t(), f()),
            (m16, m4, f(), t()),
            (m16 + m4, 44 * MIB as u64, t(), f())
        ],
        "qemu-img map:\n{json}"
    );
    // QEMU asked for the allocation with extended headers.
    server.expect_log("extended headers true, block status true");
}

// ---------------------------------------------------------------------------------------
// Copies

#[test]
fn qemu_img_convert_and_nbdcopy_copy_a_sparse_gigabyte_exactly() {
    // 1 GiB with ten 10 MiB data regions, spread out: 10% allocated.
    let dir = disk_dir();
    let src = dir.path().join("src.img");
    {
        let file = File::create(&src).unwrap();
        file.set_len(1 << 30).unwrap();
        for i in 0..10u64 {
            let at = (i * 100 + 7) * MIB as u64;
            file.write_all_at(&pattern(100 + i, 10 * MIB), at).unwrap();
        }
    }
    let src_allocated = occupied_bytes(&src);
    assert!(
        (100 * MIB as u64..=110 * MIB as u64).contains(&src_allocated),
        "the source occupies {src_allocated} bytes"
    );
    let server = serve(&src, &[]);
    let started = Instant::now();

    let out1 = dir.path().join("qemu.img");
    tool_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri(&server)])
            .arg(&out1),
        "qemu-img convert",
    );
    let out2 = dir.path().join("nbdcopy.img");
    tool_ok(
        tool("nbdcopy").arg(uri(&server)).arg(&out2),
        "nbdcopy from NBD",
    );
    for (copy, what) in [(&out1, "qemu-img convert"), (&out2, "nbdcopy")] {
        assert_same_files(&src, copy, what);
        let allocated = occupied_bytes(copy);
        assert!(
            allocated.abs_diff(src_allocated) <= src_allocated / 20,
            "{what}: the copy occupies {allocated} bytes, the source {src_allocated}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "copying took {:?}",
        started.elapsed()
    );
}

#[test]
fn nbdcopy_with_four_connections_both_ways() {
    const SIZE: usize = 48 * MIB;
    let mut a = pattern(20, SIZE);
    a[8 * MIB..12 * MIB].fill(0);
    let img = Image::with_data(&a);
    let server = serve(&img.path, &[]);

    let out = img.sibling("out.img");
    let before = accepted(&server);
    tool_ok(
        tool("nbdcopy")
            .args(["--threads=4", "--connections=4", &uri(&server)])
            .arg(&out),
        "nbdcopy from NBD",
    );
    assert_same_bytes(&fs::read(&out).unwrap(), &a, "nbdcopy of the export");
    let used = accepted_since(&server, before, 4);
    assert!(used >= 4, "nbdcopy used {used} connections");

    // Into the export: the zero regions of the source must overwrite old data, through
    // whatever zeroing commands nbdcopy picks, on four connections at once.
    let mut b = pattern(21, SIZE);
    b[MIB..5 * MIB].fill(0);
    b[30 * MIB..SIZE].fill(0);
    let src = img.sibling("src.img");
    {
        let file = File::create(&src).unwrap();
        file.set_len(SIZE as u64).unwrap();
        file.write_all_at(&b[..30 * MIB], 0).unwrap();
    }
    let before = accepted(&server);
    tool_ok(
        tool("nbdcopy")
            .args(["--threads=4", "--connections=4"])
            .arg(&src)
            .arg(uri(&server)),
        "nbdcopy to NBD",
    );
    let used = accepted_since(&server, before, 4);
    assert!(used >= 4, "nbdcopy used {used} connections");
    assert_same_bytes(&img.contents(), &b, "export after nbdcopy to it");
}

// ---------------------------------------------------------------------------------------
// Trim and write zeroes from qemu-io

/// Runs one qemu-io command against the export and returns the change of the file's
/// allocation (st_blocks * 512) it caused.
fn qemu_io_step(server: &Server, path: &Path, command: &str, report: &str) -> i64 {
    let before = occupied_bytes(path) as i64;
    let text = tool_ok(
        tool("qemu-io").args(["-f", "raw", "-c", command, &uri(server)]),
        command,
    );
    assert!(text.contains(report), "{command}: no {report:?} in\n{text}");
    occupied_bytes(path) as i64 - before
}

/// qemu-io `discard`, `write -z -u` (may punch) and `write -z` (NO_HOLE) on an image with
/// data in its first 8 MiB. `seek_sees_zeroed_data`: the filesystem reports ranges zeroed
/// in place as data (tmpfs writes zeros; ext4 keeps them as unwritten extents, which
/// SEEK_DATA treats as holes, so there only the allocation is checked).
fn trim_and_zero(dir: tempfile::TempDir, seek_sees_zeroed_data: bool) {
    const SIZE: usize = 16 * MIB;
    let data = pattern(30, 8 * MIB);
    let img = sparse_image(dir, SIZE, 0, &data);
    let server = serve(&img.path, &[]);
    let p = &img.path;
    let m = MIB as u64;
    let slack = 64 * KIB as i64;
    let mib = MIB as i64;

    let freed = -qemu_io_step(&server, p, "discard 1M 1M", "discard 1048576/1048576");
    assert!(freed >= mib - slack, "discard freed only {freed} bytes");
    assert_hole(p, m, m, "after discard");

    let freed = -qemu_io_step(&server, p, "write -z -u 3M 1M", "wrote 1048576/1048576");
    assert!(freed >= mib - slack, "write -z -u freed only {freed} bytes");
    assert_hole(p, 3 * m, m, "after write -z -u");

    // NO_HOLE over data: zeroed in place, nothing freed.
    let change = qemu_io_step(&server, p, "write -z 5M 1M", "wrote 1048576/1048576");
    assert!(
        change >= -slack,
        "write -z (NO_HOLE) freed {} bytes",
        -change
    );
    // NO_HOLE over a hole: zeroed and allocated.
    let grown = qemu_io_step(&server, p, "write -z 10M 1M", "wrote 1048576/1048576");
    assert!(
        grown >= mib - slack,
        "write -z (NO_HOLE) allocated {grown} bytes"
    );
    if seek_sees_zeroed_data {
        assert_eq!(seek(p, 5 * m, libc::SEEK_DATA), Some(5 * m));
        assert_eq!(seek(p, 5 * m, libc::SEEK_HOLE), Some(8 * m));
        assert_eq!(seek(p, 10 * m, libc::SEEK_DATA), Some(10 * m));
        assert_eq!(seek(p, 10 * m, libc::SEEK_HOLE), Some(11 * m));
    }

    // Everything reads back as zeros through the server, and the file says the same.
    tool_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0 3M 1M",
            "-c",
            "read -P 0 5M 1M",
            "-c",
            "read -P 0 8M 8M",
            &uri(&server),
        ]),
        "qemu-io read -P 0",
    );
    let mut expected = data;
    expected.resize(SIZE, 0);
    for at in [1, 3, 5] {
        expected[at * MIB..(at + 1) * MIB].fill(0);
    }
    assert_same_bytes(
        &img.contents(),
        &expected,
        "the file after trims and zeroes",
    );

    // The server's block status agrees with the file.
    let map = nbdinfo_map(&uri(&server));
    for hole in [m, 3 * m] {
        assert!(
            map.iter()
                .any(|&(o, l, t)| o <= hole && hole + m <= o + l && t == 3),
            "[{hole}, +1 MiB) is not reported as a hole: {map:?}"
        );
    }
}

#[test]
fn qemu_io_trim_and_zero_on_ext4() {
    trim_and_zero(disk_dir(), false);
}

#[test]
fn qemu_io_trim_and_zero_on_tmpfs() {
    trim_and_zero(shm_dir(), true);
}

// ---------------------------------------------------------------------------------------
// libnbd: error codes, block status, structured reads and DF

/// Python helpers for the nbdsh scripts: `code(f)` runs a call and returns the errno it
/// failed with ("0" for success), marked "client-side" unless libnbd reports an error the
/// server sent ("command failed").
const PY_HELPERS: &str = r#"
import errno, nbd
M = 1 << 20

def code(f):
    try:
        f()
        return "0"
    except nbd.Error as e:
        n = e.errno
        n = n if isinstance(n, int) else getattr(errno, n)
        return "%d%s" % (n, "" if "command failed" in (e.string or "") else " client-side")

def ref(n, off):
    with open(PATH, "rb") as f:
        f.seek(off)
        return f.read(n)
"#;

#[test]
fn nbdsh_error_codes_block_status_and_structured_reads() {
    // tmpfs: no FALLOC_FL_ZERO_RANGE, so FAST_ZERO with NO_HOLE must fail with ENOTSUP.
    let img = sparse_image(shm_dir(), 16 * MIB, 4 * MIB as u64, &pattern(2, 2 * MIB));
    let server = serve(&img.path, &[]);
    // Hole chunks are only sent once the allocation map is built.
    server.expect_log("Allocation map built");
    let script = format!(
        r#"
PATH = "{path}"
{PY_HELPERS}
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri("{uri}")
size = h.get_size()
print("size=%d" % size)
print("meta=%d" % h.can_meta_context("base:allocation"))

def extents(n, off, flags=0):
    got = []
    def cb(ctx, o, e, err):
        got.append("%s@%d:%s" % (ctx, o, ",".join(str(x) for x in e)))
        return 0
    h.block_status(n, off, cb, flags)
    return ";".join(got)

def chunks(n, off, flags=0):
    got = []
    def cb(buf, o, st, err):
        got.append("%d:%d:%d" % (o, len(buf), st))
        return 0
    buf = h.pread_structured(n, off, cb, flags)
    return ";".join(got), buf

print("status_all=%s" % extents(size, 0))
print("status_mid=%s" % extents(4 * M, 2 * M))
print("status_one=%s" % extents(size, 0, nbd.CMD_FLAG_REQ_ONE))

c, buf = chunks(M, 8 * M)
print("hole_chunks=%s" % c)
print("hole_zeros=%d" % (buf == bytes(M)))
c, buf = chunks(M, 8 * M, nbd.CMD_FLAG_DF)
print("hole_df_chunks=%s" % c)
print("hole_df_zeros=%d" % (buf == bytes(M)))
c, buf = chunks(M, 4 * M + 512, nbd.CMD_FLAG_DF)
print("data_df_chunks=%s" % c)
print("data_df_ok=%d" % (buf == ref(M, 4 * M + 512)))
c, buf = chunks(size, 0, nbd.CMD_FLAG_DF)
print("all_df_chunks=%s" % c)
print("all_df_ok=%d" % (buf == ref(size, 0)))
print("pread_df_hole=%d" % (h.pread(M, 8 * M, nbd.CMD_FLAG_DF) == bytes(M)))
print("pread_df_data=%d" % (h.pread(3 * M, 3 * M, nbd.CMD_FLAG_DF) == ref(3 * M, 3 * M)))

print("read_past_end=%s" % code(lambda: h.pread(512, size - 256)))
print("read_at_end=%s" % code(lambda: h.pread(512, size)))
print("cache_past_end=%s" % code(lambda: h.cache(4096, size - 512)))
print("status_past_end=%s" % code(lambda: h.block_status(4096, size, lambda *a: 0)))
print("status_zero_len=%s" % code(lambda: h.block_status(0, 0, lambda *a: 0)))
print("trim_past_end=%s" % code(lambda: h.trim(4096, size - 512)))
print("write_past_end=%s" % code(lambda: h.pwrite(b"x" * 4096, size - 512)))
print("zero_past_end=%s" % code(lambda: h.zero(4096, size - 512)))
print("read_fua=%s" % code(lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA)))
print("write_no_hole=%s" % code(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE)))
print("trim_df=%s" % code(lambda: h.trim(512, 0, nbd.CMD_FLAG_DF)))
print("zero_req_one=%s" % code(lambda: h.zero(512, 0, nbd.CMD_FLAG_REQ_ONE)))
print("cache_ok=%s" % code(lambda: h.cache(M, 4 * M)))
print("flush_ok=%s" % code(lambda: h.flush()))

before = ref(64 * 1024, 4 * M)
print("fast_zero_no_hole=%s" % code(
    lambda: h.zero(64 * 1024, 4 * M, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)))
print("fast_zero_untouched=%d" % (ref(64 * 1024, 4 * M) == before and before != bytes(64 * 1024)))
print("fast_zero_punch=%s" % code(lambda: h.zero(M, 5 * M, nbd.CMD_FLAG_FAST_ZERO)))
print("zero_no_hole=%s" % code(lambda: h.zero(64 * 1024, 4 * M, nbd.CMD_FLAG_NO_HOLE)))
print("zeroed=%d" % (h.pread(M, 5 * M) == bytes(M) and h.pread(64 * 1024, 4 * M) == bytes(64 * 1024)))
print("status_after=%s" % extents(size, 0))
h.pwrite(b"after-errors" * 100, 8 * M + 4096)
print("read_back_ok=%d" % (h.pread(1200, 8 * M + 4096) == b"after-errors" * 100))
h.shutdown()
"#,
        path = img.path.display(),
        uri = uri(&server),
    );
    let get = nbdsh_results(&script);
    let (m, size) = (MIB, 16 * MIB);
    assert_eq!(get("size"), size.to_string());
    assert_eq!(get("meta"), "1");

    let ctx = "base:allocation@0:";
    assert_eq!(
        get("status_all"),
        format!("{ctx}{},3,{},0,{},3", 4 * m, 2 * m, 10 * m)
    );
    assert_eq!(
        get("status_mid"),
        format!("base:allocation@{}:{},3,{},0", 2 * m, 2 * m, 2 * m)
    );
    assert_eq!(get("status_one"), format!("{ctx}{},3", 4 * m));

    // A hole without DF: one hole chunk (libnbd status 2); with DF: one data chunk (1).
    assert_eq!(get("hole_chunks"), format!("{}:{m}:2", 8 * m));
    assert_eq!(get("hole_zeros"), "1");
    assert_eq!(get("hole_df_chunks"), format!("{}:{m}:1", 8 * m));
    assert_eq!(get("hole_df_zeros"), "1");
    assert_eq!(get("data_df_chunks"), format!("{}:{m}:1", 4 * m + 512));
    assert_eq!(get("data_df_ok"), "1");
    // The whole export with DF, holes and data, larger than a server part: one chunk.
    assert_eq!(get("all_df_chunks"), format!("0:{size}:1"));
    assert_eq!(get("all_df_ok"), "1");
    assert_eq!(get("pread_df_hole"), "1");
    assert_eq!(get("pread_df_data"), "1");

    for (key, want) in [
        ("read_past_end", "22"),
        ("read_at_end", "22"),
        ("cache_past_end", "22"),
        ("status_past_end", "22"),
        ("status_zero_len", "22"),
        ("trim_past_end", "22"),
        ("write_past_end", "28"),
        ("zero_past_end", "28"),
        ("read_fua", "22"),
        ("write_no_hole", "22"),
        ("trim_df", "22"),
        ("zero_req_one", "22"),
        ("cache_ok", "0"),
        ("flush_ok", "0"),
        ("fast_zero_no_hole", "95"),
        ("fast_zero_punch", "0"),
        ("zero_no_hole", "0"),
    ] {
        assert_eq!(get(key), want, "{key}");
    }
    assert_eq!(
        get("fast_zero_untouched"),
        "1",
        "FAST_ZERO must fail before zeroing"
    );
    assert_eq!(get("zeroed"), "1");
    // [5 MiB, 6 MiB) was punched; [4 MiB, 4 MiB + 64 KiB) zeroed in place stays data.
    assert_eq!(
        get("status_after"),
        format!("{ctx}{},3,{},0,{},3", 4 * m, m, 11 * m)
    );
    assert_eq!(get("read_back_ok"), "1");

    let file = img.contents();
    assert_filled(&file[..512], 0, "rejected writes must not touch the file");
    assert_filled(
        &file[size - 512..],
        0,
        "rejected writes must not touch the end",
    );
    assert_filled(&file[4 * m..4 * m + 64 * KIB], 0, "the NO_HOLE zeroes");
    assert_same_bytes(
        &file[4 * m + 64 * KIB..5 * m],
        &pattern(2, 2 * m)[64 * KIB..m],
        "data next to the zeroes",
    );
    assert_filled(&file[5 * m..6 * m], 0, "the punched zeroes");
    assert_hole(
        &img.path,
        5 * m as u64,
        m as u64,
        "after FAST_ZERO without NO_HOLE",
    );
}

#[test]
fn nbdsh_read_only_export_refuses_writes_with_eperm() {
    let data = pattern(3, 4 * MIB);
    let img = Image::with_data(&data);
    let server = serve(&img.path, &["-r"]);
    let script = format!(
        r#"
PATH = "{path}"
{PY_HELPERS}
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{uri}")
size = h.get_size()
print("read_only=%d" % h.is_read_only())
print("write=%s" % code(lambda: h.pwrite(b"x" * 4096, 0)))
print("write_fua=%s" % code(lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)))
print("trim=%s" % code(lambda: h.trim(4096, 0)))
print("zero=%s" % code(lambda: h.zero(4096, 0)))
print("zero_past_end=%s" % code(lambda: h.zero(4096, size)))
print("read_ok=%d" % (h.pread(M, M) == ref(M, M)))
print("flush=%s" % code(lambda: h.flush()))
h.shutdown()
"#,
        path = img.path.display(),
        uri = uri(&server),
    );
    let get = nbdsh_results(&script);
    assert_eq!(get("read_only"), "1");
    for key in ["write", "write_fua", "trim", "zero", "zero_past_end"] {
        assert_eq!(get(key), "1", "{key}: EPERM from the server");
    }
    assert_eq!(get("read_ok"), "1");
    assert_eq!(get("flush"), "0");
    assert_same_bytes(&img.contents(), &data, "the read-only export");
}

// ---------------------------------------------------------------------------------------
// QEMU with extended headers

#[test]
fn qemu_negotiates_extended_headers_and_its_io_works() {
    let img = Image::zeroed(16 * MIB);
    let server = serve(&img.path, &[]);
    tool_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1M 256k",
            "-c",
            "read -P 0x5a 1M 256k",
            "-c",
            "write -P 0x33 3M 8M",
            "-c",
            "read -P 0x33 3M 8M",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "flush",
            &uri(&server),
        ]),
        "qemu-io",
    );
    server.expect_log("negotiated: structured replies true, extended headers true");
    let file = img.contents();
    assert_filled(&file[..MIB], 0, "before the writes");
    assert_filled(&file[MIB..MIB + 256 * KIB], 0x5a, "the first write");
    assert_filled(&file[MIB + 256 * KIB..3 * MIB], 0, "between the writes");
    assert_filled(&file[3 * MIB..11 * MIB], 0x33, "the second write");
    assert_filled(&file[11 * MIB..], 0, "after the writes");
}

// ---------------------------------------------------------------------------------------
// Export names

#[test]
fn a_wrong_export_name_is_refused_and_the_right_one_works() {
    let data = pattern(4, MIB);
    let img = Image::with_data(&data);
    let mut server = serve(&img.path, &[]);
    let wrong = format!("{}/wrong", server.uri());

    let out = run_tool(tool("nbdinfo").arg(&wrong), None, TOOL_TIMEOUT);
    assert!(!out.status.success(), "nbdinfo on a wrong name succeeded");
    assert!(
        // NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT.
        out.stderr.contains("No such file or directory") && out.stderr.contains("wrong"),
        "nbdinfo's error: {}",
        out.stderr
    );
    let out = run_tool(tool("qemu-img").args(["info", &wrong]), None, TOOL_TIMEOUT);
    assert!(
        !out.status.success(),
        "qemu-img info on a wrong name succeeded"
    );
    assert!(
        out.stderr.contains("export not available"),
        "qemu-img's error: {}",
        out.stderr
    );

    for good in [uri(&server), server.uri()] {
        let text = tool_ok(tool("qemu-img").args(["info", &good]), "qemu-img info");
        assert!(text.contains("virtual size: 1 MiB"), "{text}");
        tool_ok(tool("nbdinfo").arg(&good), "nbdinfo");
    }

    // EXPORT_NAME has no error reply: a wrong name closes the connection, silently.
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"wrong");
    c.expect_closed("EXPORT_NAME wrong");

    // The right name (and the empty one, and a client that is not even fixed new-style):
    // size, flags and 124 zeros, then transmission with simple replies.
    for (flags, name) in [
        (CLIENT_FIXED_NEWSTYLE, NAME),
        (CLIENT_FIXED_NEWSTYLE, ""),
        (0, NAME),
    ] {
        let mut c = Newstyle::start(server.sockaddr(), flags);
        c.option(OPT_EXPORT_NAME, name.as_bytes());
        let r = c.read(134);
        assert_eq!(be64(&r), MIB as u64, "export size");
        assert_eq!(be16(&r[8..]), TFLAGS_PLAIN, "transmission flags");
        assert_filled(&r[10..], 0, "EXPORT_NAME padding");
        c.request(0, CMD_READ, 7, 4096, 4096);
        assert_eq!(c.simple_reply(), (0, 7));
        assert_same_bytes(&c.read(4096), &data[4096..8192], "READ after EXPORT_NAME");
        c.request(0, CMD_DISC, 8, 0, 0);
        c.expect_closed("after DISC");
    }

    // NO_ZEROES: exactly 10 bytes; the next bytes are already the reply to a READ.
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    c.option(OPT_EXPORT_NAME, NAME.as_bytes());
    let r = c.read(10);
    assert_eq!((be64(&r), be16(&r[8..])), (MIB as u64, TFLAGS_PLAIN));
    c.request(0, CMD_READ, 9, 0, 512);
    assert_eq!(c.simple_reply(), (0, 9), "no padding after NO_ZEROES");
    assert_same_bytes(&c.read(512), &data[..512], "READ after NO_ZEROES");

    // GO and INFO with a wrong name are refused, and negotiation goes on.
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE);
    assert_eq!(c.info_or_go(OPT_INFO, "wrong"), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.info_or_go(OPT_GO, "wrong"), Err(REP_ERR_UNKNOWN));
    assert_eq!(c.info_or_go(OPT_INFO, NAME), Ok((MIB as u64, TFLAGS_PLAIN)));
    assert_eq!(c.info_or_go(OPT_GO, NAME), Ok((MIB as u64, TFLAGS_PLAIN)));
    c.request(0, CMD_READ, 10, 0, 512);
    assert_eq!(c.simple_reply(), (0, 10));
    assert_same_bytes(&c.read(512), &data[..512], "READ after GO");
    assert!(server.is_running());
}

// ---------------------------------------------------------------------------------------
// Raw negotiation: abort, unknown options, unknown client flags

#[test]
fn abort_is_acknowledged_then_the_connection_closes() {
    let img = Image::zeroed(MIB);
    let mut server = serve(&img.path, &[]);
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    c.option(OPT_ABORT, &[]);
    let r = c.reply();
    assert_eq!((r.option, r.kind, r.data.len()), (OPT_ABORT, REP_ACK, 0));
    c.expect_closed("after ABORT");
    server.expect_log("ended negotiation");
    assert!(server.is_running());
}

#[test]
fn an_unknown_option_is_refused_and_go_still_works() {
    let data = pattern(5, MIB);
    let img = Image::with_data(&data);
    let server = serve(&img.path, &[]);
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE);
    c.option(99, b"some payload");
    let r = c.reply();
    assert_eq!((r.option, r.kind), (99, REP_ERR_UNSUP));
    assert_eq!(c.info_or_go(OPT_GO, NAME), Ok((MIB as u64, TFLAGS_PLAIN)));

    // Without structured replies, errors come as simple replies.
    c.request(0, 42, 1, 0, 512);
    assert_eq!(c.simple_reply(), (EINVAL, 1), "unknown command");
    c.request(FLAG_DF, CMD_READ, 2, 0, 512);
    assert_eq!(
        c.simple_reply(),
        (EINVAL, 2),
        "DF without structured replies"
    );
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 512);
    assert_eq!(
        c.simple_reply(),
        (EINVAL, 3),
        "BLOCK_STATUS without a context"
    );
    c.request(0, CMD_READ, 4, 8192, 1024);
    assert_eq!(c.simple_reply(), (0, 4));
    assert_same_bytes(&c.read(1024), &data[8192..9216], "READ after the errors");
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let img = Image::zeroed(MIB);
    let mut server = serve(&img.path, &[]);
    for flags in [CLIENT_FIXED_NEWSTYLE | 4, 0x8000_0000] {
        let mut c = Newstyle::start(server.sockaddr(), flags);
        // An option after the flags changes nothing: no reply, just the close. (The
        // server may already have closed, so a failed send is no error.)
        let mut go = IHAVEOPT.to_be_bytes().to_vec();
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&[0, 0, 0, 6, 0, 0, 0, 0, 0, 0]);
        let _ = c.stream.write_all(&go);
        c.expect_closed(&format!("client flags {flags:#x}"));
    }
    // The server goes on serving.
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE);
    assert_eq!(c.info_or_go(OPT_GO, ""), Ok((MIB as u64, TFLAGS_PLAIN)));
    assert!(server.is_running());
}

#[test]
fn structured_replies_carry_errors_and_data_chunks() {
    let data = pattern(6, MIB);
    let img = Image::with_data(&data);
    let server = serve(&img.path, &[]);
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let r = c.reply();
    assert_eq!((r.option, r.kind), (OPT_STRUCTURED_REPLY, REP_ACK));
    assert_eq!(
        c.info_or_go(OPT_GO, NAME),
        Ok((MIB as u64, TFLAGS_STRUCTURED))
    );

    let size = MIB as u64;
    // (flags, command, offset, length, errno, what)
    let cases: [(u16, u16, u64, u32, u32, &str); 7] = [
        (
            0,
            CMD_BLOCK_STATUS,
            0,
            4096,
            EINVAL,
            "BLOCK_STATUS without base:allocation",
        ),
        (0, 42, 0, 512, EINVAL, "an unknown command"),
        (FLAG_FUA, CMD_READ, 0, 512, EINVAL, "READ with FUA"),
        (FLAG_DF, CMD_CACHE, 0, 512, EINVAL, "CACHE with DF"),
        (0, CMD_CACHE, size, 512, EINVAL, "CACHE past the end"),
        (0, CMD_TRIM, size - 512, 1024, EINVAL, "TRIM past the end"),
        (
            0,
            CMD_WRITE_ZEROES,
            size,
            512,
            ENOSPC,
            "WRITE_ZEROES past the end",
        ),
    ];
    for (i, (flags, kind, offset, len, errno, what)) in cases.into_iter().enumerate() {
        let cookie = 0x100 + i as u64;
        c.request(flags, kind, cookie, offset, len);
        let chunk = c.chunk();
        assert_eq!(chunk.cookie, cookie, "{what}: cookie");
        assert_eq!(chunk.flags, CHUNK_FLAG_DONE, "{what}: one final chunk");
        assert_eq!(chunk.error(), errno, "{what}");
    }

    // A READ of data with DF: one final OFFSET_DATA chunk with the bytes.
    c.request(FLAG_DF, CMD_READ, 0x200, 4096, 8192);
    let chunk = c.chunk();
    assert_eq!(
        (chunk.cookie, chunk.flags, chunk.kind),
        (0x200, CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA)
    );
    assert_eq!(be64(&chunk.payload), 4096, "data chunk offset");
    assert_same_bytes(&chunk.payload[8..], &data[4096..12288], "data chunk");
}

/// Options are handed to the negotiation a slice at a time (so that one message of replies
/// stays small); options that straddle slices, and ones longer than a slice, must be
/// answered exactly as if they had come alone. 20,000 pipelined LISTs with a 10 KiB
/// unknown option and an INFO among them, in one write, all answered in order.
#[test]
fn pipelined_options_across_slices_are_all_answered_in_order() {
    const OPT_LIST: u32 = 3;
    const REP_SERVER: u32 = 2;
    let img = Image::zeroed(MIB);
    let server = serve(&img.path, &[]);
    let mut c = Newstyle::start(server.sockaddr(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
    let option = |kind: u32, data: &[u8]| {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    };
    let mut info = (NAME.len() as u32).to_be_bytes().to_vec();
    info.extend_from_slice(NAME.as_bytes());
    info.extend_from_slice(&0u16.to_be_bytes());
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for i in 0..20_000 {
        match i {
            7_777 => {
                wire.extend(option(0x4242, &vec![0xab; 10 * KIB]));
                expected.push(0x4242);
            }
            13_333 => {
                wire.extend(option(OPT_INFO, &info));
                expected.push(OPT_INFO);
            }
            _ => {
                wire.extend(option(OPT_LIST, &[]));
                expected.push(OPT_LIST);
            }
        }
    }
    let writer = {
        let mut stream = c.stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(&wire))
    };
    for (i, &kind) in expected.iter().enumerate() {
        let mut r = c.reply();
        assert_eq!(r.option, kind, "reply {i} is to the wrong option");
        match kind {
            OPT_LIST => {
                assert_eq!(r.kind, REP_SERVER, "LIST {i}");
                r = c.reply();
                assert_eq!((r.option, r.kind), (OPT_LIST, REP_ACK), "LIST {i}");
            }
            OPT_INFO => {
                while r.kind == REP_INFO {
                    r = c.reply();
                }
                assert_eq!(r.kind, REP_ACK, "INFO");
            }
            _ => assert_eq!(r.kind, REP_ERR_UNSUP, "the unknown option"),
        }
    }
    writer.join().unwrap().expect("sending the options");
    assert_eq!(
        c.info_or_go(OPT_GO, NAME).map(|(size, _)| size),
        Ok(MIB as u64)
    );
}
