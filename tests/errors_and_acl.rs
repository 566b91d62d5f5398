//! Who gets served, and what one client can cost the others: access control (§8), the
//! client limit (§5.2), and the memory bound for a client that never reads its replies.
//! A rejected client is accepted and closed at once, so "rejected" here means: the TCP
//! connect succeeds and the first read is EOF with no hello. Also what the file itself can
//! do to the server: an image shrunk under it must not bring it down.

mod support;

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

const SIZE: usize = 16 * MIB;

fn assert_rejected(addr: SocketAddr, why: &str) {
    match RawClient::greet(addr) {
        Greeting::Eof => {}
        Greeting::Hello(_) => panic!("{why}: the client was served"),
        other => panic!("{why}: expected EOF without hello, got {other:?}"),
    }
}

fn assert_served(server: &Server) {
    let mut c = server.connect();
    c.write_at(0, &[0x42; 512]);
    assert_eq!(c.read_at(0, 512), vec![0x42; 512]);
}

#[test]
fn acl_entry_admits_its_address() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["127.0.0.1"]);
    assert_served(&server);
}

#[test]
fn acl_without_a_matching_entry_rejects() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["10.0.0.1"]);
    assert_rejected(server.sockaddr(), "10.0.0.1 entry, client 127.0.0.1");
    server.expect_log("Access control");
}

#[test]
fn default_deny_with_empty_acl_rejects_everyone() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["-d"]);
    assert_rejected(server.sockaddr(), "-d with no entries");
    // The long form, too.
    drop(server);
    let server = Server::start(&img.path, &["--default-deny"]);
    assert_rejected(server.sockaddr(), "--default-deny with no entries");
}

#[test]
fn default_deny_with_a_matching_entry_admits() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["-d", "127.0.0.1"]);
    assert_served(&server);
}

#[test]
fn empty_acl_admits_everyone() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &[]);
    assert_served(&server);
}

#[test]
fn acl_cidr_entries() {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["127.0.0.0/8"]);
    assert_served(&server);
    drop(server);
    let server = Server::start(&img.path, &["10.0.0.0/8", "192.168.0.0/16"]);
    assert_rejected(server.sockaddr(), "10.0.0.0/8 and 192.168.0.0/16");
    // Any matching entry admits.
    drop(server);
    let server = Server::start(&img.path, &["10.0.0.0/8", "127.0.0.2/24"]);
    assert_served(&server);
}

#[test]
fn acl_ipv6() {
    let img = Image::zeroed(SIZE);
    let server = Server::start_on("::1", &img.path, &["::1"]);
    assert!(
        server.stderr().contains(&format!("[::1]:{}", server.port)),
        "{}",
        server.stderr()
    );
    assert_served(&server);
    drop(server);
    let server = Server::start_on("::1", &img.path, &["fe80::/10"]);
    assert_rejected(server.sockaddr(), "fe80::/10, client ::1");
    // Families never cross-match: an IPv4 entry cannot admit an IPv6 client.
    drop(server);
    let server = Server::start_on("::1", &img.path, &["127.0.0.1"]);
    assert_rejected(server.sockaddr(), "127.0.0.1 entry, client ::1");
}

/// Opens `limit` served clients, checks the next one is rejected, frees a slot and checks
/// a new client is served again.
fn check_client_limit(extra: &[&str], limit: usize) {
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, extra);
    let mut clients: Vec<RawClient> = (0..limit).map(|_| server.connect()).collect();
    assert_rejected(server.sockaddr(), "one client over the limit");
    server.expect_log("too many clients");
    // The served clients are unaffected.
    let last = clients.last_mut().unwrap();
    last.write_at(4096, &[7; 512]);
    assert_eq!(last.read_at(4096, 512), vec![7; 512]);

    clients.remove(0).close();
    let mut again = connect_eventually(server.sockaddr(), Duration::from_secs(10));
    assert_eq!(again.read_at(4096, 512), vec![7; 512]);
    // Full again.
    assert_rejected(server.sockaddr(), "full again after the slot was reused");
}

#[test]
fn default_client_limit_is_16() {
    check_client_limit(&[], 16);
}

#[test]
fn max_clients_option() {
    check_client_limit(&["--max-clients", "2"], 2);
}

/// A client sends READs of `read_len` bytes without ever reading a reply; the server's
/// memory must stay bounded (64 requests and a 32 MiB payload budget per connection) and
/// other clients must still be served.
fn client_that_never_reads_replies(read_len: usize) {
    let img = Image::zeroed(64 * MIB);
    let server = Server::start(&img.path, &[]);
    let baseline = server.rss_kib();

    // Thousands of READs, and not one reply read. The socket is non-blocking: the
    // sender stops once the server has stopped reading for a second (back-pressure), or
    // after 5 s.
    let greedy = server.connect();
    const REQUESTS: usize = 200_000;
    let mut headers = Vec::with_capacity(REQUESTS * 28);
    let slots = 64 * MIB / read_len;
    for i in 0..REQUESTS {
        let offset = ((i % slots) * read_len) as u64;
        let header = request_header(0, CMD_READ, i as u64, offset, read_len as u32);
        headers.extend_from_slice(&header);
    }
    greedy.stream.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let mut peak = 0u64;
    let start = Instant::now();
    let mut progress = Instant::now();
    while sent < headers.len()
        && start.elapsed() < Duration::from_secs(5)
        && progress.elapsed() < Duration::from_secs(1)
    {
        match (&greedy.stream).write(&headers[sent..]) {
            Ok(n) => {
                sent += n;
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                peak = peak.max(server.rss_kib());
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("sending requests failed after {sent} bytes: {e}"),
        }
    }
    let requests_sent = sent / 28;
    assert!(
        requests_sent >= 1000,
        "only {requests_sent} requests could be sent"
    );
    // Let the server do whatever it is going to do with them.
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(100));
        peak = peak.max(server.rss_kib());
    }

    // Another client is still served meanwhile.
    let mut other = server.connect();
    let data = pattern(20, 256 * KIB);
    other.write_at(10 * MIB as u64, &data);
    assert_same_bytes(
        &other.read_at(10 * MIB as u64, data.len()),
        &data,
        "a second client while the first one hogs its replies",
    );

    peak = peak.max(server.rss_kib());
    let hwm = server.peak_rss_kib();
    eprintln!(
        "sent {requests_sent} requests of {read_len} bytes ({} GiB requested); RSS \
         baseline {baseline} KiB, peak sampled {peak} KiB, VmHWM {hwm} KiB",
        requests_sent * read_len / 1024 / MIB
    );
    const LIMIT_KIB: u64 = 200 * 1024;
    assert!(peak < LIMIT_KIB, "RSS reached {peak} KiB");
    assert!(hwm < LIMIT_KIB, "peak RSS (VmHWM) reached {hwm} KiB");

    // The hog leaving frees everything; the server is still fine.
    drop(greedy);
    let mut after = connect_eventually(server.sockaddr(), Duration::from_secs(5));
    assert_same_bytes(
        &after.read_at(10 * MIB as u64, 4096),
        &data[..4096],
        "after",
    );
}

#[test]
fn client_that_never_reads_1_mib_replies_does_not_grow_the_server() {
    client_that_never_reads_replies(MIB);
}

#[test]
fn client_that_never_reads_16_mib_replies_does_not_grow_the_server() {
    // Replies larger than the server's 8 MiB part are streamed from the file.
    client_that_never_reads_replies(16 * MIB);
}

#[test]
fn clients_that_leave_free_their_slots() {
    // With one slot, twenty clients that connect and leave at once (some before the hello
    // has even been read) must each give their slot back.
    let img = Image::zeroed(SIZE);
    let server = Server::start(&img.path, &["--max-clients", "1"]);
    for _ in 0..20 {
        drop(TcpStream::connect(server.sockaddr()).unwrap());
    }
    let mut c = connect_eventually(server.sockaddr(), Duration::from_secs(10));
    c.write_at(0, &[0x42; 512]);
    assert_eq!(c.read_at(0, 512), vec![0x42; 512]);
}

/// Sends READs of `len` at each of `offsets` back to back, then reads every reply. Returns
/// (offset, Some(data)) for a successful reply and (offset, None) for an error.
fn pipelined_reads(c: &mut RawClient, offsets: &[u64], len: usize) -> Vec<(u64, Option<Vec<u8>>)> {
    for &offset in offsets {
        c.request(0, CMD_READ, offset, offset, len as u32);
    }
    let mut answers: Vec<(u64, Option<Vec<u8>>)> = offsets
        .iter()
        .map(|_| {
            let reply = c.read_reply();
            let data = (reply.error == 0).then(|| c.read_bytes(len));
            (reply.handle, data)
        })
        .collect();
    answers.sort_by_key(|(offset, _)| *offset);
    let mut asked = offsets.to_vec();
    asked.sort();
    let answered: Vec<u64> = answers.iter().map(|(o, _)| *o).collect();
    assert_eq!(answered, asked, "one reply per READ");
    answers
}

/// An image shrunk under a running server (an operator's mistake) must not bring it down.
/// Large cached READs are sent from a mapping of the export or with `sendfile`, and both
/// are used only where `cachestat` has just found every page cached; pages past the new
/// end of the file are not, so those READs take the copying path and fail (or read zeros),
/// and the server goes on answering.
#[test]
fn an_image_shrunk_under_the_server_does_not_bring_it_down() {
    let data = pattern(71, SIZE);
    let img = Image::with_data(&data);
    let mut server = Server::start(&img.path, &[]);
    let mut c = server.connect();
    let offsets: Vec<u64> = (0..8).map(|i| (i * MIB) as u64).collect();
    // Through both large-read paths, with others in flight and alone.
    for (offset, got) in pipelined_reads(&mut c, &offsets, MIB) {
        let at = offset as usize;
        assert_same_bytes(&got.expect("READ"), &data[at..at + MIB], "READ before");
    }
    assert_same_bytes(
        &c.read_at(MIB as u64, MIB),
        &data[MIB..2 * MIB],
        "READ alone",
    );

    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.path)
        .unwrap()
        .set_len((SIZE / 4) as u64)
        .unwrap();

    let past_end: Vec<u64> = (0..8).map(|i| (SIZE / 2 + i * MIB) as u64).collect();
    for _ in 0..3 {
        for (offset, got) in pipelined_reads(&mut c, &past_end, MIB) {
            if let Some(got) = got {
                assert_filled(&got, 0, &format!("READ at {offset} past the new end"));
            }
        }
        let alone = pipelined_reads(&mut c, &past_end[..1], MIB);
        assert_eq!(alone.len(), 1);
    }
    assert!(server.is_running(), "the server died: {}", server.stderr());
    assert_same_bytes(&c.read_at(0, 256 * KIB), &data[..256 * KIB], "READ after");
}
