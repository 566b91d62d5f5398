//! The command line (§3): help and validation messages with their streams and exit
//! statuses, the log line format (§2.3), and bad startup input, which must always end in
//! one `F` line and exit status 1, never a panic and never a server that looks ready.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use support::*;

fn assert_general_help(text: &str) {
    assert!(
        text.contains("Usage: flexnbd"),
        "not the general help:\n{text}"
    );
    for mode in [
        "serve", "listen", "read", "write", "acl", "mirror", "status", "help",
    ] {
        assert!(
            text.contains(&format!("flexnbd {mode}")),
            "the general help does not list {mode}:\n{text}"
        );
    }
}

#[test]
fn no_mode_prints_general_help_on_stderr_and_fails() {
    let out = flexnbd(&[], None);
    assert_eq!(out.code(), Some(1));
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout_str());
    assert_general_help(&out.stderr);
}

#[test]
fn unknown_mode_prints_help_on_stdout_and_fails() {
    let out = flexnbd(&["bogus"], None);
    assert_eq!(out.code(), Some(1));
    assert_general_help(&out.stdout_str());
    // The help is chosen from what follows the unknown mode.
    let out = flexnbd(&["bogus", "serve"], None);
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stdout_str().contains("Usage: flexnbd serve"),
        "{}",
        out.stdout_str()
    );
}

#[test]
fn help_mode_prints_on_stdout_and_succeeds() {
    let out = flexnbd(&["help"], None);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
    assert_general_help(&out.stdout_str());
    let out = flexnbd(&["help", "read"], None);
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout_str().contains("Usage: flexnbd read"));
}

#[test]
fn dash_h_prints_mode_help_on_stdout() {
    for mode in ["serve", "read", "write"] {
        for flag in ["-h", "--help"] {
            let out = flexnbd(&[mode, flag], None);
            assert_eq!(out.code(), Some(0), "{mode} {flag}: {}", out.stderr);
            let text = out.stdout_str();
            assert!(
                text.contains(&format!("Usage: flexnbd {mode}")),
                "{mode} {flag}:\n{text}"
            );
            assert!(text.contains("\t--addr,-l"), "{mode} {flag}:\n{text}");
        }
    }
}

/// Runs a command line that must fail validation: exit 1, the messages and the mode help
/// on stderr, nothing on stdout.
fn assert_validation_failure(args: &[&str], messages: &[&str], absent: &[&str]) {
    let out = flexnbd(args, None);
    assert_eq!(out.code(), Some(1), "{args:?}: {}", out.stderr);
    assert!(
        out.stdout.is_empty(),
        "{args:?} stdout: {}",
        out.stdout_str()
    );
    for m in messages {
        assert!(
            out.stderr.lines().any(|l| l == *m),
            "{args:?}: no line {m:?} in stderr:\n{}",
            out.stderr
        );
    }
    for m in absent {
        assert!(!out.stderr.contains(m), "{args:?}: unexpected {m:?}");
    }
    let mode = args[0];
    assert!(
        out.stderr.contains(&format!("Usage: flexnbd {mode}")),
        "{args:?}: no {mode} help on stderr:\n{}",
        out.stderr
    );
}

const ADDR_PORT: &str = "both --addr and --port are required.";
const FILE: &str = "--file is required";
const FROM_SIZE: &str = "both --from and --size are required.";

#[test]
fn serve_validation_messages() {
    assert_validation_failure(&["serve", "-f", "x.img"], &[ADDR_PORT], &[FILE]);
    assert_validation_failure(
        &["serve", "-l", "127.0.0.1", "-f", "x.img"],
        &[ADDR_PORT],
        &[],
    );
    assert_validation_failure(&["serve", "-p", "4000", "-f", "x.img"], &[ADDR_PORT], &[]);
    assert_validation_failure(
        &["serve", "-l", "127.0.0.1", "-p", "4000"],
        &[FILE],
        &[ADDR_PORT],
    );
    assert_validation_failure(&["serve"], &[ADDR_PORT, FILE], &[]);
}

#[test]
fn read_and_write_validation_messages() {
    for mode in ["read", "write"] {
        assert_validation_failure(&[mode, "-F", "0", "-S", "512"], &[ADDR_PORT], &[FROM_SIZE]);
        assert_validation_failure(
            &[mode, "-l", "127.0.0.1", "-p", "4000", "-F", "0"],
            &[FROM_SIZE],
            &[ADDR_PORT],
        );
        assert_validation_failure(&[mode], &[ADDR_PORT, FROM_SIZE], &[]);
    }
}

#[test]
fn unknown_option_is_reported_getopt_style() {
    let out = flexnbd(
        &["serve", "--bogus", "-l", "127.0.0.1", "-p", "0", "-f", "x"],
        None,
    );
    assert_eq!(out.code(), Some(1));
    assert_eq!(
        out.stderr.lines().next(),
        Some("serve: unrecognized option '--bogus'"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Usage: flexnbd serve"));
    assert!(out.stdout.is_empty());
}

#[test]
fn killswitch_is_a_plain_flag() {
    let img = Image::zeroed(16 * MIB);
    // `--killswitch=x` is accepted and its value ignored.
    let mut server = Server::start(&img.path, &["--killswitch=x"]);
    let mut c = server.connect();
    c.write_at(0, &[1; 512]);
    server.signal("TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(15)).code(), Some(0));
    // `--killswitch` does not swallow the next word: the harness puts `-v` right after it,
    // and without `-v` no `Serving` line (and no port) would be logged.
    let server = Server::start(&img.path, &["--killswitch"]);
    assert_eq!(server.connect().read_at(0, 512), vec![1; 512]);
    drop(server);
    let server = Server::start(&img.path, &["-k"]);
    assert_eq!(server.connect().read_at(0, 512), vec![1; 512]);
}

#[test]
fn help_mode_rejects_modes_it_does_not_document() {
    for mode in ["break", "mirror-speed", "bogus"] {
        let out = flexnbd(&["help", mode], None);
        assert_eq!(out.code(), Some(1), "help {mode}");
        assert!(out.stdout.is_empty(), "help {mode}: {}", out.stdout_str());
        assert_general_help(&out.stderr);
    }
}

fn launch(addr: &str, args: &[&str]) -> Server {
    let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    Server::launch(addr.parse().unwrap(), &args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn getopt_style_syntax_is_accepted() {
    let img = Image::zeroed(16 * MIB);
    let file = img.path.to_str().unwrap();
    // `--opt=value`, an ACL entry before the options (permutation), a long-option prefix
    // (`--verb`), clustered short flags (`-dv`: default-deny with an entry that admits).
    let server = launch(
        "127.0.0.1",
        &[
            "serve",
            "127.0.0.0/8",
            "--addr=127.0.0.1",
            "--port",
            "0",
            &format!("--file={file}"),
            "-dv",
        ],
    );
    assert_eq!(server.connect().read_at(0, 512), vec![0; 512]);
    drop(server);
    let server = launch(
        "127.0.0.1",
        &["serve", "-l", "127.0.0.1", "-p0", "-f", file, "--verb"],
    );
    assert_eq!(server.connect().read_at(0, 512), vec![0; 512]);
    // The entry after the options still counts: this one rejects us.
    drop(server);
    let server = launch(
        "127.0.0.1",
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            file,
            "-v",
            "10.1.2.3",
        ],
    );
    assert!(matches!(RawClient::greet(server.sockaddr()), Greeting::Eof));
    // `--` ends the options; ACL entries may follow it.
    drop(server);
    let server = launch(
        "127.0.0.1",
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            file,
            "-v",
            "--",
            "127.0.0.1",
        ],
    );
    assert_eq!(server.connect().read_at(0, 512), vec![0; 512]);
}

#[test]
fn bracketed_ipv6_listen_address() {
    let img = Image::zeroed(16 * MIB);
    let file = img.path.to_str().unwrap();
    // §2.1: an optional leading `[` is skipped and the address ends at the first other
    // character, so `[::1]` means ::1.
    let server = launch(
        "::1",
        &["serve", "-l", "[::1]", "-p", "0", "-f", file, "-v", "[::1]"],
    );
    assert_eq!(server.connect().read_at(0, 512), vec![0; 512]);
}

#[test]
fn last_of_verbose_and_quiet_wins() {
    let img = Image::zeroed(16 * MIB);
    let file = img.path.to_str().unwrap();
    // `-v -q`: quiet, so not even the Serving line; give it a bad ACL entry afterwards
    // to see that F lines still appear and nothing else does.
    let out = flexnbd(
        &[
            "serve",
            "-v",
            "-q",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            file,
            "nonsense",
        ],
        None,
    );
    assert_eq!(out.code(), Some(1));
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert_eq!(log_lines_at(&out.stderr, 'F').len(), 1, "{}", out.stderr);
    // `-q -v`: verbose.
    let server = launch(
        "127.0.0.1",
        &[
            "serve",
            "-q",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            file,
            "-v",
        ],
    );
    server.connect();
    server.expect_log("accepted");
}

#[test]
fn log_lines_have_flexnbds_format() {
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, &[]);
    drop(server.connect());
    let log = server.stderr();
    let file = img.path.to_str().unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("Serving "))
        .expect("a Serving line");
    // <ms>:<L>:<pid> <thread> <context> <location>: <message>
    let (head, rest) = line.split_once(' ').unwrap();
    let fields: Vec<&str> = head.split(':').collect();
    assert_eq!(fields.len(), 3, "{line}");
    assert!(fields[0].parse::<u64>().is_ok(), "ms in {line}");
    assert_eq!(fields[1], "I", "level in {line}");
    assert_eq!(fields[2], server.pid().to_string(), "pid in {line}");
    let (thread, rest) = rest.split_once(' ').unwrap();
    assert!(
        thread.starts_with("0x") && u64::from_str_radix(&thread[2..], 16).is_ok(),
        "thread in {line}"
    );
    let (context, rest) = rest.split_once(' ').unwrap();
    assert_eq!(context, file, "context in {line}");
    let (_location, message) = rest.split_once(": ").unwrap();
    assert_eq!(
        message,
        format!(
            "Serving {file} ({} bytes) on 127.0.0.1:{}",
            16 * MIB,
            server.port
        )
    );
    // Every line has the format.
    for l in log.lines() {
        let head = l.split(' ').next().unwrap();
        let f: Vec<&str> = head.split(':').collect();
        assert!(
            f.len() == 3 && ["D", "I", "W", "E", "F"].contains(&f[1]),
            "malformed log line {l:?}"
        );
    }
}

/// `flexnbd serve` with bad input: exit 1 quickly, exactly one F line that names the
/// problem (`mentions`), no panic, and it never claimed to be serving. Returns the F line.
fn assert_startup_fails(args: &[&str], mentions: &str, why: &str) -> String {
    let out = run_tool(
        Command::new(flexnbd_bin()).args(args),
        None,
        Duration::from_secs(20),
    );
    assert_eq!(out.code(), Some(1), "{why}: {args:?}\n{}", out.stderr);
    assert!(
        !out.stderr.contains("panicked"),
        "{why}: panic:\n{}",
        out.stderr
    );
    let fatal = log_lines_at(&out.stderr, 'F');
    assert_eq!(
        fatal.len(),
        1,
        "{why}: expected one F line in:\n{}",
        out.stderr
    );
    assert!(
        fatal[0].contains(mentions),
        "{why}: the F line does not mention {mentions:?}: {}",
        fatal[0]
    );
    assert!(
        !out.stderr.contains("Serving "),
        "{why}: it claimed to serve:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(15),
        "{why}: took {:?}",
        out.elapsed
    );
    fatal[0].clone()
}

fn serve_args<'a>(addr: &'a str, port: &'a str, file: &'a str) -> Vec<&'a str> {
    vec!["serve", "-v", "-l", addr, "-p", port, "-f", file]
}

#[test]
fn missing_file_is_fatal() {
    let dir = disk_dir();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    assert_startup_fails(
        &serve_args("127.0.0.1", "0", missing),
        missing,
        "missing file",
    );
}

#[test]
fn fatal_messages_state_their_cause_once() {
    // `<location>: <message>`: an operator reads the message; the same clause twice in a
    // row (an error and its source both printed) is noise.
    let dir = disk_dir();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    let path = dir.path().to_str().unwrap();
    for (file, why) in [(missing, "missing file"), (path, "a directory")] {
        let line = assert_startup_fails(&serve_args("127.0.0.1", "0", file), file, why);
        let clauses: Vec<&str> = line.split(": ").skip(1).collect();
        for pair in clauses.windows(2) {
            assert_ne!(pair[0], pair[1], "{why}: repeated clause in {line:?}");
        }
    }
}

#[test]
fn unusable_files_are_fatal() {
    let dir = disk_dir();
    let path = dir.path().to_str().unwrap();
    assert_startup_fails(&serve_args("127.0.0.1", "0", path), path, "a directory");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let empty = empty.to_str().unwrap();
    assert_startup_fails(
        &serve_args("127.0.0.1", "0", empty),
        empty,
        "zero-size file",
    );
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, [7u8; 511]).unwrap();
    let tiny = tiny.to_str().unwrap();
    assert_startup_fails(
        &serve_args("127.0.0.1", "0", tiny),
        tiny,
        "511-byte file (zero-size export)",
    );
}

#[test]
fn bad_addresses_and_ports_are_fatal() {
    let img = Image::zeroed(MIB);
    let file = img.path.to_str().unwrap();

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert_startup_fails(
        &serve_args("127.0.0.1", &port, file),
        "in use",
        "address in use",
    );
    drop(taken);

    assert_startup_fails(
        &serve_args("localhost", "0", file),
        "localhost",
        "host name",
    );
    assert_startup_fails(
        &serve_args("not-an-address", "0", file),
        "not-an-address",
        "garbage address",
    );
    assert_startup_fails(
        &serve_args("127.0.0.1", "70000", file),
        "65535",
        "port 70000",
    );
}

#[test]
fn bad_options_are_fatal() {
    let img = Image::zeroed(MIB);
    let file = img.path.to_str().unwrap();
    let with = |extra: &[&'static str]| {
        let mut args = serve_args("127.0.0.1", "0", file);
        args.extend_from_slice(extra);
        args
    };
    for entry in ["10.0.0.0/33", "::1/129", "10.0.0.0/0", "bogus"] {
        assert_startup_fails(&with(&["127.0.0.1", entry]), entry, "bad ACL entry");
    }
    assert_startup_fails(
        &with(&["--max-clients", "0"]),
        "max-clients",
        "--max-clients 0",
    );
    assert_startup_fails(&with(&["--grace", "soon"]), "grace", "--grace soon");
    for value in ["-1", "1001", "fast"] {
        assert_startup_fails(&with(&["--busy-poll", value]), "busy-poll", value);
    }
}
