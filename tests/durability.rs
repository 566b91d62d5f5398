//! Shutdown and durability (§2.5, §5.5, §4.4): a signal stops the server gracefully,
//! requests in flight are finished, and every WRITE the server acknowledged is in the file
//! afterwards, even when the signal arrives in the middle of a stream of writes.
//!
//! "On stable storage" is checked without pulling the plug: cachestat(2) tells whether any
//! page of a range is still dirty or under writeback. That is asked right after a FUA or
//! `--sync-writes` WRITE is acknowledged, after a FLUSH, and after the server has exited.

mod support;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const WRITE_LEN: usize = 64 * KIB;

/// Pipelines WRITEs of distinct data to distinct offsets, sends SIGTERM once some are
/// acknowledged, reads replies until EOF, and checks every acknowledged write.
fn sigterm_during_writes(extra: &[&str]) {
    const WRITES: usize = 1024;
    let img = Image::zeroed(WRITES * WRITE_LEN);
    let mut server = Server::start(&img.path, extra);
    let client = server.connect();
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let handle_of = |i: usize| 0x7772_0000_0000 + i as u64;
    let data_of = |i: usize| pattern(1000 + i as u64, WRITE_LEN);

    // Everything is built up front so that the sender only copies into the socket and
    // keeps the server busy; `sent` counts the writes that have left completely.
    let mut stream_bytes = Vec::with_capacity(WRITES * (28 + WRITE_LEN));
    for i in 0..WRITES {
        stream_bytes.extend_from_slice(&request_header(
            0,
            CMD_WRITE,
            handle_of(i),
            (i * WRITE_LEN) as u64,
            WRITE_LEN as u32,
        ));
        stream_bytes.extend_from_slice(&data_of(i));
    }
    let sent = Arc::new(AtomicUsize::new(0));
    let mut sink = client.stream.try_clone().unwrap();
    sink.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sender = {
        let sent = sent.clone();
        thread::spawn(move || {
            let mut done = 0;
            for chunk in stream_bytes.chunks(256 * KIB) {
                // Once the server stops reading, sending fails: that is expected.
                if sink.write_all(chunk).is_err() {
                    break;
                }
                done += chunk.len();
                sent.store(done / (28 + WRITE_LEN), Ordering::SeqCst);
            }
        })
    };

    let mut acked: HashSet<u64> = HashSet::new();
    let mut replies = 0usize;
    let mut signalled_at: Option<(usize, usize)> = None;
    let mut stream = &client.stream;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "replies did not end in time");
        let mut r = [0u8; REPLY_LEN];
        match stream.read_exact(&mut r) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            // The server may close with our unread payload in its buffer (a reset).
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading replies: {e}"),
        }
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), REPLY_MAGIC);
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let index = handle.wrapping_sub(handle_of(0)) as usize;
        assert!(index < WRITES, "reply for unknown handle {handle:#x}");
        replies += 1;
        if error == 0 {
            assert!(
                acked.insert(handle),
                "handle {handle:#x} acknowledged twice"
            );
        }
        if signalled_at.is_none() && acked.len() >= 64 {
            signalled_at = Some((sent.load(Ordering::SeqCst), acked.len()));
            server.signal("TERM");
        }
    }
    let (sent_at_signal, acked_at_signal) =
        signalled_at.expect("fewer than 64 writes were acknowledged before the connection ended");
    let status = server.wait_exit(Duration::from_secs(30));
    sender.join().unwrap();
    let log = server.stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        sent.load(Ordering::SeqCst) > acked_at_signal,
        "no write was sent after the ones acknowledged before SIGTERM: nothing was in flight"
    );
    eprintln!(
        "SIGTERM after {sent_at_signal} writes sent and {acked_at_signal} acknowledged; \
         {replies} replies, {} acknowledged in total, {} sent in total",
        acked.len(),
        sent.load(Ordering::SeqCst)
    );

    // The last step of a graceful shutdown is a data sync of the whole file.
    if let Some(n) = unsynced_pages(&img.path, 0, (WRITES * WRITE_LEN) as u64) {
        assert_eq!(
            n, 0,
            "{n} pages were still unsynced after the server exited"
        );
    }
    let file = img.contents();
    let mut checked = 0;
    for i in 0..WRITES {
        if acked.contains(&handle_of(i)) {
            let at = i * WRITE_LEN;
            assert_same_bytes(
                &file[at..at + WRITE_LEN],
                &data_of(i),
                &format!("acknowledged write {i}"),
            );
            checked += 1;
        }
    }
    assert_eq!(checked, acked.len());
}

#[test]
fn sigterm_while_writes_are_in_flight_keeps_every_acknowledged_write() {
    sigterm_during_writes(&[]);
}

#[test]
fn sigterm_while_synchronous_writes_are_in_flight() {
    sigterm_during_writes(&["--sync-writes"]);
}

/// An idle server with an idle client exits 0 on each of the three signals, closes the
/// client and stops listening.
fn idle_shutdown(signal: &str) {
    let img = Image::zeroed(16 * MIB);
    let mut server = Server::start(&img.path, &[]);
    let mut client = server.connect();
    client.write_at(0, &[1; 4096]);
    let addr = server.sockaddr();
    let start = Instant::now();
    server.signal(signal);
    client.expect_eof();
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{signal}; log:\n{}",
        server.stderr()
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "an idle shutdown took {:?}",
        start.elapsed()
    );
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("the port still accepts connections after exit"),
    }
    assert_filled(&img.contents()[..4096], 1, "data written before the signal");
    if let Some(n) = unsynced_pages(&img.path, 0, 4096) {
        assert_eq!(n, 0, "the write was not synced at shutdown");
    }
}

#[test]
fn sigint_shuts_down_gracefully() {
    idle_shutdown("INT");
}

#[test]
fn sigterm_shuts_down_gracefully() {
    idle_shutdown("TERM");
}

#[test]
fn sigquit_shuts_down_gracefully() {
    idle_shutdown("QUIT");
}

#[test]
fn a_client_that_stops_reading_cannot_delay_shutdown_beyond_the_grace() {
    let img = Image::zeroed(64 * MIB);
    let mut server = Server::start(&img.path, &["--grace", "1"]);
    let hog = server.connect();
    // Enough 1 MiB READs that their replies cannot all fit in the socket buffers.
    let mut headers = Vec::new();
    for i in 0..512u64 {
        headers.extend_from_slice(&request_header(
            0,
            CMD_READ,
            i,
            (i % 64) * MIB as u64,
            MIB as u32,
        ));
    }
    (&hog.stream).write_all(&headers).unwrap();
    thread::sleep(Duration::from_millis(500));

    // A well-behaved client still works meanwhile.
    let mut other = server.connect();
    other.write_at(0, &[5; 4096]);

    let start = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(20));
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.stderr());
    assert!(
        took < Duration::from_secs(8),
        "shutdown with --grace 1 took {took:?}"
    );
    assert_filled(
        &img.contents()[..4096],
        5,
        "data of the well-behaved client",
    );
    drop(hog);
}

#[test]
fn a_second_signal_does_not_cut_shutdown_short() {
    // While a shutdown waits for a slow client, more signals have no additional effect:
    // the exit status stays 0.
    let img = Image::zeroed(64 * MIB);
    let mut server = Server::start(&img.path, &["--grace", "2"]);
    let hog = server.connect();
    let mut headers = Vec::new();
    for i in 0..512u64 {
        headers.extend_from_slice(&request_header(
            0,
            CMD_READ,
            i,
            (i % 64) * MIB as u64,
            MIB as u32,
        ));
    }
    (&hog.stream).write_all(&headers).unwrap();
    thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    thread::sleep(Duration::from_millis(200));
    if server.is_running() {
        server.signal("INT");
    }
    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", server.stderr());
    drop(hog);
}

/// Writes through the server and asks the kernel, as soon as each reply is in, whether any
/// page of the written range is still dirty: a durable write has none.
fn unsynced_after_acknowledged_writes(extra: &[&str], flags: u16) -> Option<u64> {
    // ext4, not tmpfs: tmpfs has no stable storage to sync to.
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, extra);
    let mut c = server.connect();
    let mut unsynced = 0;
    for i in 0..8u64 {
        let data = pattern(40 + i, 256 * KIB);
        let offset = i * MIB as u64;
        c.send(&request_header(
            flags,
            CMD_WRITE,
            i,
            offset,
            data.len() as u32,
        ));
        c.send(&data);
        assert_eq!(
            c.read_reply(),
            Reply {
                error: 0,
                handle: i
            }
        );
        unsynced += unsynced_pages(&img.path, offset, data.len() as u64)?;
    }
    Some(unsynced)
}

#[test]
fn fua_writes_are_durable_when_acknowledged() {
    match unsynced_after_acknowledged_writes(&[], FLAG_FUA) {
        None => eprintln!("cachestat(2) is not available: cannot check"),
        Some(n) => assert_eq!(n, 0, "{n} pages of acknowledged FUA writes were not synced"),
    }
}

#[test]
fn sync_writes_option_makes_every_write_durable_when_acknowledged() {
    match unsynced_after_acknowledged_writes(&["--sync-writes"], 0) {
        None => eprintln!("cachestat(2) is not available: cannot check"),
        Some(n) => assert_eq!(n, 0, "{n} pages of acknowledged writes were not synced"),
    }
}

#[test]
fn flush_makes_earlier_writes_durable() {
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    for i in 0..8u64 {
        c.write_at(i * MIB as u64, &pattern(50 + i, 256 * KIB));
    }
    c.flush();
    if let Some(n) = unsynced_pages(&img.path, 0, 16 * MIB as u64) {
        assert_eq!(
            n, 0,
            "{n} pages written before an acknowledged FLUSH were not synced"
        );
    }
}
