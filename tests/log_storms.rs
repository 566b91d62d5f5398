//! A storm of identical failures writes a few log lines, not thousands: an fd-exhaustion
//! storm against `accept()` (issue: hardening). The server keeps serving its clients.

mod support;

use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn an_emfile_storm_is_logged_once_per_period_with_a_count() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &["--max-clients", "256"]);
    let mut good = server.connect();
    good.write_at(0, &[0x42; 4096]);
    // Leave room for a few more descriptors only, then queue connections it cannot take.
    let limit = open_fds(server.pid()) + 2;
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &server.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit failed: {status}");
    let clients: Vec<TcpStream> = (0..20)
        // Once the backlog is full the kernel drops SYNs: do not wait for those.
        .filter_map(|_| {
            TcpStream::connect_timeout(&server.sockaddr(), Duration::from_millis(300)).ok()
        })
        .collect();
    assert!(!clients.is_empty());
    // accept() fails with EMFILE and is retried every 100 ms: about 60 failures in 6 s.
    let deadline = Instant::now() + Duration::from_secs(6) + Duration::from_millis(500);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let log = server.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("accept() failed"))
        .collect();
    eprintln!(
        "STORM: {} accept() lines:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(!lines.is_empty(), "no accept() failure was logged:\n{log}");
    assert!(lines.len() <= 3, "{} lines for one storm", lines.len());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("similar messages suppressed")),
        "the suppressed lines are not counted:\n{}",
        lines.join("\n")
    );
    // The established client is unaffected.
    assert_eq!(good.read_at(0, 4096), vec![0x42; 4096]);
    drop(clients);
}
