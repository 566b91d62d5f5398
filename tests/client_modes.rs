//! `flexnbd read` and `flexnbd write` (§3.4, §3.5) against a real server, including the C
//! bugs the successor must not have: IPv6 needs no `--bind`, a short stdin is an error and
//! not a hang, and every failure exits non-zero with nothing on stdout.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

const SIZE: usize = 16 * MIB;

fn read_cmd(server: &Server, from: u64, size: &str, extra: &[&str]) -> ToolOutput {
    let (addr, port) = (server.addr.to_string(), server.port.to_string());
    let from = from.to_string();
    let mut args = vec!["read", "-l", &addr, "-p", &port, "-F", &from, "-S", size];
    args.extend_from_slice(extra);
    flexnbd(&args, None)
}

fn write_cmd(server: &Server, from: u64, size: &str, stdin: &[u8]) -> ToolOutput {
    let (addr, port) = (server.addr.to_string(), server.port.to_string());
    let from = from.to_string();
    flexnbd(
        &["write", "-l", &addr, "-p", &port, "-F", &from, "-S", size],
        Some(stdin),
    )
}

fn round_trip(server: &Server, img: &Image, seed: u64) {
    let data = pattern(seed, MIB + 1000);
    let from = 3 * MIB as u64 + 17;
    let size = data.len().to_string();
    write_cmd(server, from, &size, &data).assert_success("flexnbd write");
    let at = from as usize;
    assert_same_bytes(
        &img.contents()[at..at + data.len()],
        &data,
        "file after write",
    );
    let out = read_cmd(server, from, &size, &[]);
    out.assert_success("flexnbd read");
    assert_same_bytes(&out.stdout, &data, "flexnbd read output");
}

#[test]
fn write_then_read_round_trip() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    round_trip(&server, &img, 30);
    // With --bind, too.
    let out = read_cmd(&server, 0, "4096", &["-b", "127.0.0.1"]);
    out.assert_success("flexnbd read --bind");
    assert_eq!(out.stdout, vec![0; 4096]);
}

#[test]
fn ipv6_works_without_bind() {
    let img = Image::zeroed(SIZE);
    let server = Server::start_on("::1", &img.path, &[]);
    round_trip(&server, &img, 31);
}

#[test]
fn write_size_naming_a_file_sends_the_whole_file() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let data = pattern(32, 200 * KIB + 3);
    // The value starts with a letter (>= ':'), so it is a file name; relative to the
    // working directory.
    std::fs::write(img.sibling("payload.bin"), &data).unwrap();
    let port = server.port.to_string();
    let out = run_tool(
        Command::new(flexnbd_bin())
            .args(["write", "-l", "127.0.0.1", "-p", &port, "-F", "8192"])
            .args(["-S", "payload.bin"])
            .current_dir(img.dir.path()),
        Some(b"stdin must be ignored"),
        Duration::from_secs(30),
    );
    out.assert_success("flexnbd write -S payload.bin");
    assert_same_bytes(
        &img.contents()[8192..8192 + data.len()],
        &data,
        "file after writing payload.bin",
    );
}

#[test]
fn short_stdin_fails_quickly() {
    let img = Image::zeroed(SIZE);
    let mut server = Server::start(&img.path, &[]);
    let out = write_cmd(&server, 0, "1048576", &[0x11; 1000]);
    assert_ne!(
        out.code(),
        Some(0),
        "a short stdin must fail:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(5),
        "a short stdin took {:?}",
        out.elapsed
    );
    assert!(out.stdout.is_empty());
    assert!(server.is_running());
    // The server is fine afterwards.
    assert_eq!(server.connect().read_at(MIB as u64, 16), vec![0; 16]);
    // And an empty stdin, too.
    let out = write_cmd(&server, 0, "512", &[]);
    assert_ne!(out.code(), Some(0));
    assert!(out.elapsed < Duration::from_secs(5));
}

#[test]
fn out_of_range_fails_without_output() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    for (from, size) in [
        (SIZE as u64 - 512, "1024"),
        (SIZE as u64, "1"),
        (u64::MAX - 10, "512"),
    ] {
        let out = read_cmd(&server, from, size, &[]);
        assert_ne!(out.code(), Some(0), "read {from}+{size}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "read {from}+{size} printed data");
        let out = write_cmd(&server, from, size, &vec![0xaa; size.parse().unwrap()]);
        assert_ne!(out.code(), Some(0), "write {from}+{size}: {}", out.stderr);
    }
    assert_filled(&img.contents()[SIZE - 512..], 0, "end of the export");
    // In range right up to the end is fine.
    let out = read_cmd(&server, SIZE as u64 - 512, "512", &[]);
    out.assert_success("read of the last sector");
    assert_eq!(out.stdout.len(), 512);
}

#[test]
fn connection_failures_exit_non_zero() {
    // Nothing listens on the port of a server that has exited.
    let img = Image::zeroed(SIZE);
    let mut server = Server::start(&img.path, &[]);
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(15));
    let out = read_cmd(&server, 0, "512", &[]);
    assert_ne!(out.code(), Some(0), "read from a closed port");
    assert!(out.stdout.is_empty());
    assert!(out.elapsed < Duration::from_secs(10));

    // A server whose ACL rejects us closes the connection before the hello.
    let server = Server::start(&img.path, &["10.0.0.1"]);
    let out = read_cmd(&server, 0, "512", &[]);
    assert_ne!(out.code(), Some(0), "read rejected by the ACL");
    assert!(out.stdout.is_empty());
    let out = write_cmd(&server, 0, "512", &[1; 512]);
    assert_ne!(out.code(), Some(0), "write rejected by the ACL");
}

#[test]
fn bad_numbers_are_refused() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    let out = read_cmd(&server, 0, "12abc", &[]);
    assert_ne!(out.code(), Some(0), "size 12abc");
    assert!(out.stdout.is_empty());
    let port = server.port.to_string();
    let out = flexnbd(
        &[
            "read",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-F",
            "-5",
            "-S",
            "1",
        ],
        None,
    );
    assert_ne!(out.code(), Some(0), "negative offset");
    // A value going down the numeric path but not a number ("./x" starts below ':') must
    // not silently write 0 bytes and succeed.
    let out = write_cmd(&server, 0, "./payload", b"");
    assert_ne!(out.code(), Some(0), "size ./payload");
}
