//! `flexnbd mirror --wait` and the control command behind it, `mirror_wait` (ours,
//! docs/control.md): the client follows a migration to its end and its exit status says
//! how it ended, even when the source exits right after the hand-off.
//!
//! A migration that must still be running when the test acts (`break`) is stalled with the
//! fault-injecting relay (a blackhole after the first MiBs), never with a fixed sleep. Every
//! process is in a guard, every wait has a deadline.

mod support;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::Duration;

use support::cluster::*;
use support::relay::{Dir, Fault, Relay};
use support::*;

const SIZE: usize = 8 * MIB;

/// `flexnbd mirror --wait --sock SOCK --addr 127.0.0.1 --port PORT EXTRA...` on a thread.
fn mirror_wait_cli(sock: &Path, port: u16, extra: &[&str]) -> thread::JoinHandle<ToolOutput> {
    let sock = sock.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    thread::spawn(move || {
        let mut args = vec!["--wait"];
        args.extend(extra.iter().map(String::as_str));
        mirror_cli(&sock, port, &args)
    })
}

#[test]
fn mirror_wait_reports_a_completed_exit_migration_before_the_source_exits() {
    let src = Image::with_data(&pattern(71, SIZE));
    let dst = destination(SIZE as u64);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, None, 0, &[]);

    let out = mirror_cli(&src_sock, target.port, &["--wait"]);
    assert_eq!(out.code(), Some(0), "mirror --wait: {out:?}");
    let stdout = out.stdout_str();
    assert!(stdout.starts_with("Mirror started\n"), "{stdout:?}");
    assert!(stdout.ends_with("migration completed\n"), "{stdout:?}");
    assert_eq!(out.stderr, "", "{out:?}");

    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    assert_same_files(&dst.path, &src.path, "destination after mirror --wait");
}

#[test]
fn mirror_wait_to_a_closed_port_fails_as_mirror_does() {
    let src = Image::with_data(&pattern(72, SIZE));
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let closed = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);

    let out = mirror_cli(&src_sock, port, &["--wait"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    // flexnbd's text, then the cause the server found.
    assert!(
        out.stderr.starts_with("Mirror failed to connect\n")
            && out.stderr.contains("Connection refused"),
        "{out:?}"
    );
    assert_eq!(out.stdout_str(), "", "{out:?}");
    // Nothing is registered any more, and the source serves on.
    assert_eq!(control(&src_sock, "mirror_wait", &[]), "1: not mirroring\n");
    assert!(
        source.is_running(),
        "the source exited: {}",
        source.stderr()
    );
}

#[test]
fn break_during_mirror_wait_reports_mirror_stopped() {
    let src = Image::with_data(&pattern(73, SIZE));
    let dst = destination(SIZE as u64);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let target = start_listen(&dst.path, None, 0, &[]);
    // The sweep stalls after 2 MiB: the migration is still running when `break` comes.
    let relay = Relay::start(std::net::SocketAddr::new(LOOPBACK, target.port));
    relay.arm_after_bytes(
        Dir::ToDestination,
        2 * MIB as u64,
        Fault::Blackhole(Dir::ToDestination),
    );

    let waiting = mirror_wait_cli(&src_sock, relay.port(), &["--mode", "background"]);
    wait_status(&src_sock, "the sweep stalls", STATE_TIMEOUT, |s| {
        get(s, "is_mirroring") == Some("true") && relay.armed() == 0
    });
    let brk = flexnbd(&["break", "--sock", src_sock.to_str().unwrap()], None);
    assert_eq!(brk.code(), Some(0), "break: {brk:?}");
    assert_eq!(brk.stdout_str(), "mirror stopped\n");

    let out = waiting.join().expect("the mirror --wait thread");
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout_str().starts_with("Mirror started\n"), "{out:?}");
    assert_eq!(out.stderr, "mirror stopped\n", "{out:?}");
    assert!(
        source.is_running(),
        "the source exited: {}",
        source.stderr()
    );
    assert_eq!(control(&src_sock, "mirror_wait", &[]), "1: not mirroring\n");
}

#[test]
fn a_bad_mode_is_refused_before_anything_is_sent() {
    let dir = disk_dir();
    let sock = dir.path().join("fake.sock");
    let fake = UnixListener::bind(&sock).unwrap();
    fake.set_nonblocking(true).unwrap();

    let out = flexnbd(
        &[
            "mirror",
            "--sock",
            sock.to_str().unwrap(),
            "--addr",
            LOCALHOST,
            "--port",
            "4777",
            "--mode",
            "bogus",
            "--wait",
        ],
        None,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("--mode must be 'background', 'active' or 'auto', not 'bogus'.\n"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("Usage: flexnbd mirror"),
        "no help: {out:?}"
    );
    assert_eq!(out.stdout_str(), "", "{out:?}");
    match fake.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the client connected although its arguments were bad: {other:?}"),
    }
}

#[test]
fn mirror_wait_without_a_migration_answers_at_once() {
    let src = Image::zeroed(SIZE);
    let src_sock = src.sibling("src.sock");
    let _source = start_source(&src.path, &src_sock);
    let started = std::time::Instant::now();
    assert_eq!(control(&src_sock, "mirror_wait", &[]), "1: not mirroring\n");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_waiting_mirror_wait_gets_the_outcome_although_the_source_exits() {
    let src = Image::with_data(&pattern(74, SIZE));
    let dst = destination(SIZE as u64);
    let src_sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &src_sock);
    let mut target = start_listen(&dst.path, None, 0, &[]);
    // About half a second: the request below is registered long before the hand-off.
    start_limited_mirror(&src_sock, target.port, 16 * MIB as u64);
    let answer = control(&src_sock, "mirror_wait", &[]);
    assert_eq!(answer, "0: migration completed\n");
    assert_exit(&mut source, 0, "the source");
    assert_exit(&mut target, 0, "the destination");
    assert_same_files(&dst.path, &src.path, "destination after the migration");
}
