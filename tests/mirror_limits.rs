//! Operator mistakes and limits around `mirror` (issue: hardening): a server mirrored into
//! itself, or into another server of the same file, is refused with a reason; a bandwidth
//! limit holds over every window of a few seconds, measured on the wire by a relay; the
//! status line shows the limit that is enforced.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use support::cluster::*;
use support::promise::{accepts_write, SeqWriter};
use support::relay::{Dir, Relay};
use support::*;

/// `mirror` through the raw control command (the only way to give action `nothing` and a
/// limit): the answer line.
fn raw_mirror(sock: &std::path::Path, port: u16, action: &str, max_bps: Option<u64>) -> String {
    let port = port.to_string();
    let limit = max_bps.map(|l| l.to_string());
    let mut args = vec![LOCALHOST, port.as_str(), action];
    if let Some(limit) = &limit {
        args.push(LOCALHOST);
        args.push(limit);
    }
    control(sock, "mirror", &args)
}

#[test]
fn a_server_mirrored_into_itself_is_refused_and_keeps_every_write() {
    const SIZE: usize = 8 * MIB;
    let src = Image::with_data(&pattern(31, SIZE));
    let sock = src.sibling("src.sock");
    let source = start_source(&src.path, &sock);
    let writer = SeqWriter::start(&[source.sockaddr()], SIZE as u64);
    assert!(writer.wait_acked(20, None, Duration::from_secs(10)));

    let answer = raw_mirror(&sock, source.sockaddr().port(), "nothing", None);
    assert_eq!(
        answer, "1: Mirror was rejected: the destination is this server\n",
        "mirroring into itself"
    );
    let out = mirror_cli(&sock, source.sockaddr().port(), &[]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("the destination is this server"),
        "{out:?}"
    );
    let s = status(&sock);
    assert_eq!(get(&s, "is_mirroring"), Some("false"), "{s:?}");
    assert_eq!(get(&s, "has_control"), Some("true"), "{s:?}");
    assert_eq!(get(&s, "clients_allowed"), Some("true"), "{s:?}");

    // The writer never noticed; everything it was acknowledged is in the file.
    thread::sleep(Duration::from_millis(300));
    let log = writer.stop();
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    support::promise::check_holds_all(&src.path, &log.expected()).expect("acknowledged writes");
}

#[test]
fn a_second_server_of_the_same_file_is_refused_as_a_destination() {
    const SIZE: usize = 4 * MIB;
    let src = Image::with_data(&pattern(32, SIZE));
    let sock = src.sibling("src.sock");
    let _source = start_source(&src.path, &sock);
    // The operator's mistake: a second server on the very same file (it has to pass
    // --no-lock to start at all: see tests/service.rs).
    let twin = Server::start(&src.path, &["--no-lock"]);
    let answer = raw_mirror(&sock, twin.sockaddr().port(), "exit", None);
    assert_eq!(
        answer,
        "1: Mirror was rejected: the destination serves this server's own file\n"
    );
    let s = status(&sock);
    assert_eq!(get(&s, "is_mirroring"), Some("false"), "{s:?}");
    assert!(accepts_write(_source.sockaddr(), 0).is_accepted());
}

/// Samples what a relay delivered to the destination every 50 ms for `span`.
fn sample_delivered(relay: &Relay, span: Duration) -> Vec<(Duration, u64)> {
    let start = Instant::now();
    let mut samples = vec![(Duration::ZERO, relay.delivered(Dir::ToDestination))];
    while start.elapsed() < span {
        thread::sleep(Duration::from_millis(50));
        samples.push((start.elapsed(), relay.delivered(Dir::ToDestination)));
    }
    samples
}

/// The most bytes delivered in any window of `window` among the samples.
fn max_in_window(samples: &[(Duration, u64)], window: Duration) -> u64 {
    let mut best = 0;
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        for &(t, b) in &samples[i..] {
            if t - t0 > window {
                break;
            }
            best = best.max(b - b0);
        }
    }
    best
}

fn check_limit(limit: u64, size: usize, seed: u64) {
    let src = Image::with_data(&pattern(seed, size));
    let dst = Image::zeroed(size);
    let sock = src.sibling("src.sock");
    let mut source = start_source(&src.path, &sock);
    let target = start_listen(&dst.path, None, 0, &[]);
    let relay = Relay::start(target.sockaddr());

    let started = Instant::now();
    let answer = raw_mirror(&sock, relay.port(), "exit", Some(limit));
    assert_eq!(answer, "0: Mirror started\n");
    let samples = sample_delivered(&relay, Duration::from_secs(4));
    let s = status(&sock);
    assert_eq!(
        get(&s, "migration_speed_limit"),
        Some(limit.to_string().as_str()),
        "{s:?}"
    );
    // Headers, the hello, the probe and the join are not data; allow for them.
    let overhead = 64 * 1024;
    for window in [Duration::from_secs(1), Duration::from_secs(2)] {
        let most = max_in_window(&samples, window);
        let allowed = (limit as f64 * (window.as_secs_f64() + 0.25 + 0.1)) as u64 + overhead;
        eprintln!(
            "LIMIT {limit} B/s: at most {most} bytes in a {window:?} window (allowed {allowed})"
        );
        assert!(
            most <= allowed,
            "{most} bytes in {window:?} at a limit of {limit} B/s"
        );
    }
    // And the limit is not a stall: at least 60 % of it on average.
    let (t, b) = *samples.last().unwrap();
    assert!(
        b as f64 >= 0.6 * limit as f64 * t.as_secs_f64(),
        "only {b} bytes in {t:?} at {limit} B/s"
    );
    eprintln!(
        "LIMIT {limit} B/s: {b} bytes in {:?} since the mirror command",
        started.elapsed()
    );
    // Garbage parses as 0, which is no limit: the key goes away with it, and the rest
    // goes at full speed.
    assert_eq!(control(&sock, "mirror_max_bps", &["abc"]), "0: updated\n");
    let s = status(&sock);
    assert_eq!(get(&s, "migration_speed_limit"), None, "{s:?}");
    assert_exit(&mut source, 0, "the source after an unlimited finish");
    assert_same_files(&dst.path, &src.path, "the destination");
}

#[test]
fn a_limit_of_one_megabyte_per_second_holds_from_the_first_second() {
    check_limit(1_000_000, 16 * MIB, 41);
}

#[test]
fn a_limit_of_one_hundred_kilobytes_per_second_holds_too() {
    check_limit(100_000, 32 * MIB, 42);
}
