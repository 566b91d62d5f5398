//! End-to-end tests of `flexnbd-proxy` (flexnbd §12 and the pipelined extensions): real
//! processes (`flexnbd serve`/`listen`, the proxy, qemu-io, fio, nbdinfo) on loopback.
//! Every process sits in a guard that kills it on every path; every wait has a deadline.

mod support;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::cluster::{assert_exit, start_listen, start_mirror};
use support::proxy::*;
use support::relay::{Dir, Fault, Msg, Relay};
use support::*;

const SIZE: usize = 32 * MIB;

/// A fio job that reads and writes at random with md5 verification, for `secs` seconds.
fn fio_randrw(secs: u64) -> Vec<String> {
    [
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=md5",
        "--time_based",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--runtime={secs}")])
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn qemu_io_and_fio_read_and_write_through_the_proxy() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);

    let out = qemu_io(
        &proxy.uri(),
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "read -P 0xab 0 1M",
            "read -P 0 1M 1M",
            "read -P 0xcd 4M 64k",
            "flush",
        ],
    );
    assert_qemu_ok(&out, "qemu-io through the proxy");
    let data = image.contents();
    assert_filled(&data[..MIB], 0xab, "the first MiB on the server");
    assert_filled(
        &data[4 * MIB..4 * MIB + 64 * KIB],
        0xcd,
        "the 64 KiB at 4 MiB",
    );

    let out = fio(&proxy.uri(), image.dir.path(), &strs(&fio_randrw(3)));
    assert_fio_ok(&out, "fio randrw through the proxy");
    // Large requests too: 1 MiB blocks, several in flight.
    let big = [
        "--rw=randrw",
        "--bs=1M",
        "--iodepth=4",
        "--size=16M",
        "--verify=md5",
    ];
    assert_fio_ok(
        &fio(&proxy.uri(), image.dir.path(), &big),
        "fio 1M through the proxy",
    );
}

#[test]
fn pipelined_requests_are_all_answered_and_several_clients_are_served_at_once() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut a = proxy.connect();
    // C serves one client at a time: this one would wait for a hello.
    let mut b = proxy.connect();
    b.write_at(8 * MIB as u64, &[7u8; 4096]);

    // 32 writes, then their replies; then 32 reads, then theirs.
    let blocks: Vec<Vec<u8>> = (0..32).map(|i| pattern(i, 4096)).collect();
    for (i, block) in blocks.iter().enumerate() {
        a.send_write(0x100 + i as u64, (i * 8192) as u64, block);
    }
    let mut handles = HashSet::new();
    for _ in 0..32 {
        let reply = a.read_reply();
        assert_eq!(reply.error, 0);
        handles.insert(reply.handle);
    }
    assert_eq!(handles, (0x100..0x120).collect::<HashSet<u64>>());
    for i in 0..32u64 {
        a.request(0, CMD_READ, 0x200 + i, i * 8192, 4096);
    }
    let mut seen = HashMap::new();
    for _ in 0..32 {
        let reply = a.read_reply();
        assert_eq!(reply.error, 0);
        seen.insert(reply.handle, a.read_bytes(4096));
    }
    for (i, block) in blocks.iter().enumerate() {
        assert_same_bytes(&seen[&(0x200 + i as u64)], block, "a pipelined read");
    }
    assert_eq!(b.read_at(8 * MIB as u64, 4096), vec![7u8; 4096]);
    a.close();
    b.close();
}

#[test]
fn a_server_killed_and_restarted_mid_run_is_invisible_to_fio() {
    let image = Image::zeroed(SIZE);
    let port = free_port();
    let server = serve_on(port, &image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let uri = proxy.uri();
    let dir = image.dir.path().to_owned();
    let run = thread::spawn(move || fio(&uri, &dir, &strs(&fio_randrw(8))));
    proxy.wait_log("connected", 1, Duration::from_secs(10));
    thread::sleep(Duration::from_secs(2));
    drop(server); // SIGKILL
    thread::sleep(Duration::from_millis(1500));
    let _server = serve_on(port, &image.path, &[]);
    let out = run.join().expect("the fio thread");
    assert_fio_ok(&out, "fio across a server restart");
    proxy.wait_log("is back after", 1, Duration::from_secs(5));
    let log = proxy.stderr();
    assert!(log.contains("unanswered requests to resend"), "{log}");
    eprintln!("fio across a restart: {:?}", out.elapsed);
}

#[test]
fn a_migration_under_fio_reaches_the_destination_through_the_proxy() {
    let src = Image::zeroed(SIZE);
    let dst = Image::zeroed(SIZE);
    let sock = src.sibling("control.sock");
    let port = free_port();
    let mut source = serve_on(port, &src.path, &["--sock", sock.to_str().unwrap()]);
    let p = port.to_string();
    let mut destination = start_listen(
        &dst.path,
        None,
        0,
        &["--rebind-addr", "127.0.0.1", "--rebind-port", &p],
    );
    let proxy = Proxy::start(source.sockaddr(), &[], &[]);
    let uri = proxy.uri();
    let dir = src.dir.path().to_owned();
    // A write job: every block written is read back and checked at the end, by then from
    // the destination.
    let job = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16M",
        "--verify=md5",
        // About 8 s of writes: the hand-off and the reconnect fall in the middle.
        "--rate_iops=500",
    ];
    let run = thread::spawn(move || fio(&uri, &dir, &job));
    proxy.wait_log("connected", 1, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    start_mirror(&sock, destination.port, &[]);
    assert_exit(&mut source, 0, "the source after the hand-off");
    proxy.wait_log("is back after", 1, Duration::from_secs(20));
    eprintln!("hand-off to upstream back: {:?}", started.elapsed());
    assert!(
        !run.is_finished(),
        "fio had finished before the proxy reached the destination"
    );
    let out = run.join().expect("the fio thread");
    assert_fio_ok(&out, "fio across a migration");
    assert!(
        destination.is_running(),
        "the destination serves after the migration"
    );
    // What fio read back came from the destination, and so does this.
    let mut client = proxy.connect();
    let data = dst.contents();
    for at in [0usize, 5 * MIB, 15 * MIB] {
        let got = client.read_at(at as u64, 64 * KIB);
        assert_same_bytes(&got, &data[at..at + 64 * KIB], "the destination's data");
    }
    client.close();
}

#[test]
fn an_upstream_that_blackholes_is_reconnected_after_the_timeout() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let proxy = Proxy::start(relay.addr(), &[], &[("FLEXNBD_UPSTREAM_TIMEOUT", "2")]);
    let mut client = proxy.connect();
    client.write_at(0, &[1u8; 4096]);
    relay.fault_now(Fault::Blackhole(Dir::ToSource));
    relay.fault_now(Fault::Blackhole(Dir::ToDestination));
    let started = Instant::now();
    client.write_at(4096, &[2u8; 4096]);
    assert_eq!(client.read_at(4096, 4096), vec![2u8; 4096]);
    let took = started.elapsed();
    eprintln!("blackholed write answered after {took:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "{took:?}"
    );
    let log = proxy.stderr();
    assert!(log.contains("answered nothing for 2000 ms"), "{log}");
    assert!(log.contains("resent 1 unanswered requests"), "{log}");
    assert_eq!(&image.contents()[4096..8192], &[2u8; 4096][..]);
}

#[test]
fn a_refusing_upstream_is_retried_every_3_s_while_the_client_waits() {
    let image = Image::zeroed(SIZE);
    let port = free_port();
    let server = serve_on(port, &image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = proxy.connect();
    client.write_at(0, &[1u8; 4096]);
    drop(server);
    let down = Instant::now();
    client.send_write(0x77, 8192, &[3u8; 4096]);
    thread::sleep(Duration::from_millis(4000));
    let _server = serve_on(port, &image.path, &[]);
    assert_eq!(
        client.read_reply(),
        Reply {
            error: 0,
            handle: 0x77
        }
    );
    let took = down.elapsed();
    eprintln!("write answered {took:?} after the server died");
    // Attempts at about 0 s, 3 s (refused) and 6 s (the server is back).
    assert!(
        took >= Duration::from_millis(5500) && took < Duration::from_secs(9),
        "{took:?}"
    );
    let log = proxy.stderr();
    assert!(log.contains("attempt 2 failed"), "{log}");
    assert!(!log.contains("attempt 3 failed"), "{log}");
    assert!(log.contains("(3 connection attempts)"), "{log}");
    assert_eq!(client.read_at(8192, 4096), vec![3u8; 4096]);
}

#[test]
fn a_session_whose_client_left_stops_retrying() {
    let image = Image::zeroed(SIZE);
    let port = free_port();
    let server = serve_on(port, &image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = proxy.connect();
    client.write_at(0, &[1u8; 4096]);
    drop(server);
    client.send_write(0x78, 8192, &[3u8; 4096]);
    proxy.wait_log("attempt 1 failed", 1, Duration::from_secs(5));
    client.close();
    thread::sleep(Duration::from_millis(3500));
    let attempts = proxy.count("Couldn't reach upstream");
    thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        proxy.count("Couldn't reach upstream"),
        attempts,
        "{}",
        proxy.stderr()
    );
    assert!(attempts <= 2, "{}", proxy.stderr());
}

#[test]
fn every_session_starts_clean() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    // A client leaves half a header behind, another half a WRITE.
    let mut first = proxy.connect();
    first.send(&request_header(0, CMD_WRITE, 1, 0, 4096)[..10]);
    first.close();
    let mut second = proxy.connect();
    second.send(&request_header(0, CMD_WRITE, 2, 0, 4096));
    second.send(&[9u8; 1000]);
    second.close();
    // A readiness probe: connect and go.
    drop(TcpStream::connect(proxy.sockaddr()).unwrap());
    let mut third = proxy.connect();
    third.write_at(4096, &[5u8; 512]);
    assert_eq!(third.read_at(0, 4096), vec![0u8; 4096]);
    assert_eq!(third.read_at(4096, 512), vec![5u8; 512]);
    // DISCONNECT ends the session after the answers, and is not forwarded.
    third.send_write(0x99, 8192, &[6u8; 512]);
    third.request(0, CMD_DISC, 0x9a, 0, 0);
    assert_eq!(
        third.read_reply(),
        Reply {
            error: 0,
            handle: 0x99
        }
    );
    third.expect_eof();
    let mut fourth = proxy.connect();
    assert_eq!(fourth.read_at(8192, 512), vec![6u8; 512]);
    assert_filled(&image.contents()[..4096], 0, "stale bytes never written");
}

#[test]
fn error_replies_are_relayed_without_data_and_never_hang() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = proxy.connect();
    let started = Instant::now();
    // A READ past the end: C waited for data that never came, and resent it forever.
    client.request(0, CMD_READ, 0x10, SIZE as u64 - 512, 4096);
    assert_eq!(
        client.read_reply(),
        Reply {
            error: ENOSPC,
            handle: 0x10
        }
    );
    // An unknown command and a WRITE past the end: their errors as upstream sent them.
    client.request(0, 0x55, 0x11, 0, 0);
    assert_eq!(client.read_reply().error, EINVAL);
    client.send_write(0x12, SIZE as u64, &[1u8; 512]);
    assert_eq!(client.read_reply().error, ENOSPC);
    // FUA and FLUSH pass through; the next READ gets its own data, nothing stale.
    let mut fua = request_header(FLAG_FUA, CMD_WRITE, 0x13, 0, 512).to_vec();
    fua.extend_from_slice(&[4u8; 512]);
    client.send(&fua);
    assert_eq!(client.read_reply().error, 0);
    client.flush();
    assert_eq!(client.read_at(0, 512), vec![4u8; 512]);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        !proxy.stderr().contains("reconnecting"),
        "{}",
        proxy.stderr()
    );
}

#[test]
fn requests_over_32_mib_end_the_session_and_32_mib_is_allowed() {
    let image = Image::zeroed(64 * MIB);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = proxy.connect();
    let data = pattern(3, 32 * MIB);
    client.write_at(MIB as u64, &data);
    assert_same_bytes(
        &client.read_at(MIB as u64, 32 * MIB),
        &data,
        "a 32 MiB read",
    );
    client.request(0, CMD_READ, 1, 0, 32 * MIB as u32 + 1);
    client.expect_eof();
    let mut client = proxy.connect();
    client.request(0, CMD_WRITE, 2, 0, 32 * MIB as u32 + 1);
    client.expect_eof();
    // The proxy itself goes on.
    let mut client = proxy.connect();
    assert_eq!(client.read_at(MIB as u64, 4096), data[..4096].to_vec());
}

#[test]
fn the_cache_prefetches_only_up_to_32_mib_and_forgets_on_writes() {
    let data = pattern(11, 64 * MIB);
    let image = Image::with_data(&data);
    let server = Server::start(&image.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let proxy = Proxy::start(relay.addr(), &["--cache=67108864"], &[]);
    let mut client = proxy.connect();
    let reads = || relay.count(Msg::Read);

    // 2·20 MiB is over 32 MiB: forwarded unchanged (C overflowed its buffer here).
    let at = 20 * MIB;
    assert_same_bytes(&client.read_at(0, at), &data[..at], "READ 20 MiB");
    assert_same_bytes(
        &client.read_at(at as u64, at),
        &data[at..2 * at],
        "READ the next 20 MiB",
    );
    assert_eq!(reads(), 2, "no prefetch over 32 MiB");

    // 16 MiB: 32 MiB fetched, the next 16 MiB answered from the cache.
    let len = 16 * MIB;
    assert_same_bytes(&client.read_at(0, len), &data[..len], "READ 16 MiB");
    assert_same_bytes(
        &client.read_at(len as u64, len),
        &data[len..2 * len],
        "the cached half",
    );
    assert_eq!(reads(), 3, "the second half came from the cache");

    // A small sequential reader, then a write into what was prefetched.
    assert_same_bytes(&client.read_at(0, 4096), &data[..4096], "READ 4 KiB");
    client.write_at(4096, &[8u8; 4096]);
    assert_eq!(client.read_at(4096, 4096), vec![8u8; 4096], "not stale");
    assert_eq!(reads(), 5);
}

#[test]
fn an_unreachable_upstream_at_startup_exits_1_without_listening() {
    let port = free_port();
    let upstream = free_port();
    let args: Vec<String> = [
        "--addr",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--conn-addr",
        "127.0.0.1",
        "--conn-port",
        &upstream.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proxy = Proxy::spawn(&args, &[]);
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", proxy.stderr());
    let log = proxy.stderr();
    assert!(log.contains("Couldn't connect to upstream"), "{log}");
    assert!(!log.contains("listening"), "{log}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn command_line_errors_and_help() {
    let run = |args: &[&str]| run_tool(tool(proxy_bin()).args(args), None, TOOL_TIMEOUT);
    let up = ["--conn-addr", "127.0.0.1", "--conn-port", "1"];
    let out = run(&up);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.starts_with("--addr is required.\n"), "{out:?}");
    assert!(out.stderr.contains("Usage: flexnbd-proxy"), "{out:?}");
    let out = run(&["--addr", "/tmp/x.sock", "--conn-addr", "127.0.0.1"]);
    assert_eq!(out.code(), Some(1));
    assert!(out
        .stderr
        .starts_with("both --conn-addr and --conn-port are required."));
    let out = run(&[&up[..], &["--addr", "127.0.0.1"]].concat());
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains(":F:") && out.stderr.contains("Downstream port not specified"),
        "{out:?}"
    );
    let out = run(&[&up[..], &["-l", "/x", "-c", "5"]].concat());
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("invalid option -- 'c'"), "{out:?}");
    let out = run(&["-h"]);
    assert_eq!(out.code(), Some(0));
    assert!(out.stdout_str().starts_with("Usage: flexnbd-proxy"));
}

#[test]
fn a_unix_socket_proxy_serves_qemu_io_and_is_removed_on_sigterm() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let path = image.sibling("proxy.sock");
    let mut proxy = Proxy::start_unix(server.sockaddr(), &path, &[]);
    let uri = format!("nbd+unix:///?socket={}", path.display());
    let out = qemu_io(&uri, &["write -P 0x5a 0 256k", "read -P 0x5a 0 256k"]);
    assert_qemu_ok(&out, "qemu-io over the UNIX socket");
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
    assert!(!path.exists(), "the socket path is still there");
    // An existing path is refused at startup.
    fs::write(&path, b"").unwrap();
    let args: Vec<String> = vec![
        "--addr".into(),
        path.to_str().unwrap().into(),
        "--conn-addr".into(),
        "127.0.0.1".into(),
        "--conn-port".into(),
        server.port.to_string(),
    ];
    let mut again = Proxy::spawn(&args, &[]);
    assert_eq!(again.wait_exit(Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn newstyle_clients_negotiate_with_upstreams_flags() {
    let image = Image::zeroed(SIZE);
    let server = Server::start(&image.path, &[]);
    let mut proxy = Proxy::start(server.sockaddr(), &["--newstyle"], &[]);
    let out = run_tool(
        tool("nbdinfo").args(["--json", &proxy.uri()]),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("nbdinfo");
    let json = out.stdout_str().replace(' ', "");
    assert!(json.contains(&format!("\"export-size\":{SIZE}")), "{json}");
    // Upstream (old-style flexnbd) has no TRIM: neither does the proxy's export.
    assert!(json.contains("\"can_trim\":false"), "{json}");
    // Block status is answered by the proxy: all data.
    let out = run_tool(
        tool("nbdinfo").args(["--map", &proxy.uri()]),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("nbdinfo --map");
    let map: Vec<String> = out
        .stdout_str()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(map, [format!("0 {SIZE} 0 data")], "{map:?}");
    let out = qemu_io(
        &proxy.uri(),
        &[
            "write -P 0x3c 1M 128k",
            "read -P 0x3c 1M 128k",
            "read -P 0 0 4k",
        ],
    );
    assert_qemu_ok(&out, "qemu-io, new-style");
    assert_fio_ok(
        &fio(&proxy.uri(), image.dir.path(), &strs(&fio_randrw(2))),
        "fio, new-style",
    );
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)).code(), Some(0));
}

#[test]
fn a_newstyle_upstream_is_proxied_with_its_trim_and_zeroes() {
    let image = Image::with_data(&vec![0x11u8; SIZE]);
    let server = Server::start(&image.path, &["--newstyle"]);
    let proxy = Proxy::start(server.sockaddr(), &["--newstyle"], &[]);
    let out = qemu_io(
        &proxy.uri(),
        &[
            "write -z 0 64k",
            "read -P 0 0 64k",
            "discard 1M 1M",
            "write -P 0x22 4M 4k",
            "read -P 0x22 4M 4k",
        ],
    );
    assert_qemu_ok(&out, "qemu-io with zeroes and trims");
    let data = image.contents();
    assert_filled(&data[..64 * KIB], 0, "zeroed through the proxy");
    assert_filled(
        &data[4 * MIB..4 * MIB + 4096],
        0x22,
        "written through the proxy",
    );
    // Old-style clients too, with upstream's flags in their hello.
    let plain = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = plain.connect();
    assert!(
        client.flags & 0x20 != 0,
        "TRIM announced: {:#x}",
        client.flags
    );
    assert_eq!(client.read_at(4 * MIB as u64, 4096), vec![0x22u8; 4096]);
}

#[test]
fn big_pipelined_writes_stay_within_the_memory_budget() {
    let image = Image::zeroed(64 * MIB);
    let server = Server::start(&image.path, &[]);
    let proxy = Proxy::start(server.sockaddr(), &[], &[]);
    let mut client = proxy.connect();
    let data = pattern(5, 32 * MIB);
    let before = proc_status_kib(proxy.pid(), "VmHWM");
    // 192 MiB sent before the first reply is read: the proxy holds at most its 64 MiB
    // budget, TCP holds back the rest.
    let mut writer = client.stream.try_clone().unwrap();
    let payload = data.clone();
    let sending = thread::spawn(move || {
        use std::io::Write;
        for i in 0..6u64 {
            let at = (i % 2) * 32 * MIB as u64;
            writer
                .write_all(&request_header(0, CMD_WRITE, i, at, payload.len() as u32))
                .unwrap();
            writer.write_all(&payload).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(500));
    let mut handles = HashSet::new();
    for _ in 0..6 {
        let reply = client.read_reply();
        assert_eq!(reply.error, 0);
        handles.insert(reply.handle);
    }
    sending.join().unwrap();
    assert_eq!(handles.len(), 6);
    let peak = proc_status_kib(proxy.pid(), "VmHWM");
    eprintln!("proxy peak RSS {before} KiB before, {peak} KiB after 192 MiB of writes");
    assert!(peak < 160 * 1024, "peak RSS {peak} KiB");
    assert_same_bytes(&image.contents()[..32 * MIB], &data, "the first half");
}
