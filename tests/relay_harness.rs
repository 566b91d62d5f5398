//! Self-tests of the fault-injection harness (tests/support/relay.rs, promise.rs), against
//! the real binary and against a fake upstream that lets a test see both ends of a relayed
//! connection: every fault the later migration tests rely on is shown to do what it says,
//! and the checker is shown to catch a missing block.

mod support;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use support::promise::{
    accepts_write, accepts_write_within, check_holds_all, seq_block, Probe, Refusal, SeqWriter,
    WriterOptions, BLOCK,
};
use support::relay::{Dir, Fault, Msg, Relay};
use support::*;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// Deadline for something that should happen at once.
const SOON: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Helpers

/// `flexnbd listen -l 127.0.0.1 -p 0 -f FILE -v`, once it reports its port.
fn start_listen(file: &Path) -> Server {
    support::cluster::start_listen(file, None, 0, &[])
}

/// A 152-byte old-style hello for an export of `size` bytes.
fn hello(size: u64) -> Vec<u8> {
    let mut h = vec![0u8; HELLO_LEN];
    h[0..8].copy_from_slice(INIT_PASSWD);
    h[8..16].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    h[16..24].copy_from_slice(&size.to_be_bytes());
    h[24..28].copy_from_slice(&FLAGS.to_be_bytes());
    h
}

fn reply(error: u32, handle: u64) -> Vec<u8> {
    let mut r = REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&error.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r
}

fn write_request(handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut r = request_header(0, CMD_WRITE, handle, offset, data.len() as u32).to_vec();
    r.extend_from_slice(data);
    r
}

/// A fake upstream: a listener the test accepts from itself, to see what the relay
/// delivers and how it closes.
struct Fake {
    listener: TcpListener,
}

impl Fake {
    fn new() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Fake { listener }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// Accepts the relay's upstream connection (within 5 s).
    fn accept(&self) -> TcpStream {
        let deadline = Instant::now() + SOON;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(SOON)).unwrap();
                    s.set_write_timeout(Some(SOON)).unwrap();
                    return s;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the relay never connected");
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// A client connected through `relay` and the fake's end of it, the hello passed.
    fn pair(&self, relay: &Relay) -> (TcpStream, TcpStream) {
        let mut client = TcpStream::connect_timeout(&relay.addr(), SOON).unwrap();
        client.set_read_timeout(Some(SOON)).unwrap();
        client.set_write_timeout(Some(SOON)).unwrap();
        let mut server = self.accept();
        server.write_all(&hello(1 << 20)).unwrap();
        let mut h = [0u8; HELLO_LEN];
        client.read_exact(&mut h).unwrap();
        assert_eq!(h.to_vec(), hello(1 << 20));
        (client, server)
    }
}

/// One read with a `QUIET` timeout: asserts nothing arrives.
fn assert_quiet(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
        other => panic!("{what}: expected nothing, got {other:?}"),
    }
    s.set_read_timeout(Some(SOON)).unwrap();
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

/// The block at `offset` of the file.
fn block_at(path: &Path, offset: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

fn wait_block(path: &Path, offset: u64, want: &[u8], what: &str) {
    let deadline = Instant::now() + SOON;
    while block_at(path, offset) != want {
        assert!(Instant::now() < deadline, "{what}: the block never landed");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Events as (connection, direction, message), without the times.
fn trace(relay: &Relay) -> Vec<(usize, Dir, Msg)> {
    relay
        .events()
        .into_iter()
        .map(|(c, d, m, _)| (c, d, m))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Traffic passes, and is recognised

#[test]
fn traffic_passes_through_the_relay_and_is_logged() {
    let data = pattern(11, 4 * MIB);
    let img = Image::with_data(&data);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let mut c = RawClient::connect(relay.addr());
    assert_eq!(c.size, 4 * MIB as u64);

    // A READ of 1 MiB crosses many reads of the relay: its data must not be taken for
    // replies.
    assert_same_bytes(
        &c.read_at(0, MIB),
        &data[..MIB],
        "1 MiB read through the relay",
    );
    let block = pattern(12, 8 * KIB);
    c.write_at(2 * MIB as u64, &block);
    c.flush();
    assert_same_bytes(&c.read_at(2 * MIB as u64, block.len()), &block, "read back");
    c.request(0, CMD_DISC, 99, 0, 0);
    c.expect_eof();
    c.close();

    let mut expected = data.clone();
    expected[2 * MIB..2 * MIB + block.len()].copy_from_slice(&block);
    assert_same_bytes(&img.contents(), &expected, "the file behind the relay");

    use Dir::*;
    assert_eq!(
        trace(&relay),
        vec![
            (0, ToSource, Msg::Hello),
            (0, ToDestination, Msg::Read),
            (0, ToSource, Msg::OtherReply),
            (0, ToDestination, Msg::Write),
            (0, ToSource, Msg::OtherReply),
            (0, ToDestination, Msg::Flush),
            (0, ToSource, Msg::OtherReply),
            (0, ToDestination, Msg::Read),
            (0, ToSource, Msg::OtherReply),
            (0, ToDestination, Msg::Disc),
        ]
    );
    assert!(relay.notes().is_empty(), "{:?}", relay.notes());
    assert_eq!(relay.connections(), 1);
    // The server's close was passed on, and the relay let go of the connection.
    let deadline = Instant::now() + SOON;
    while relay.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the relay kept the connection");
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        relay.delivered(ToSource),
        (HELLO_LEN + 4 * 16 + MIB + 8 * KIB) as u64
    );
    assert_eq!(relay.delivered(ToDestination), (5 * 28 + 8 * KIB) as u64);
}

#[test]
fn a_stream_that_does_not_parse_is_passed_through_and_noted() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);
    // Not a request: the relay notes it and forwards it, and everything after it.
    let junk: Vec<u8> = (0..100u8).collect();
    client.write_all(&junk).unwrap();
    assert_eq!(read_n(&mut server, junk.len()), junk);
    client.write_all(b"more").unwrap();
    assert_eq!(read_n(&mut server, 4), b"more");
    let notes = relay.notes();
    assert!(
        notes.iter().any(|n| n.contains("request magic")),
        "{notes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. A real migration through the relay

#[test]
fn a_migration_through_the_relay_completes() {
    const SIZE: usize = 8 * MIB;
    let src = Image::with_data(&pattern(21, SIZE));
    let dst = Image::zeroed(SIZE);
    let sock = src.sibling("src.sock");
    let mut source = Server::start(&src.path, &["--sock", sock.to_str().unwrap()]);
    let mut target = start_listen(&dst.path);
    let relay = Relay::start(target.sockaddr());

    let port = relay.port().to_string();
    let out = flexnbd(
        &[
            "mirror",
            "--sock",
            sock.to_str().unwrap(),
            "--addr",
            "127.0.0.1",
            "--port",
            &port,
        ],
        None,
    );
    assert_eq!(out.code(), Some(0), "flexnbd mirror: {out:?}");
    assert_eq!(out.stdout_str(), "Mirror started\n", "{out:?}");
    let status = source.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "source log:\n{}", source.stderr());
    let status = target.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "target log:\n{}", target.stderr());
    assert_same_bytes(
        &dst.contents(),
        &src.contents(),
        "destination after migration",
    );

    let events = trace(&relay);
    let first = |m: Msg| events.iter().position(|e| e.2 == m);
    let last = |m: Msg| events.iter().rposition(|e| e.2 == m);
    for m in [
        Msg::Hello,
        Msg::Probe,
        Msg::Write,
        Msg::Prepare,
        Msg::Prepared,
        Msg::Commit,
        Msg::Committed,
    ] {
        assert!(first(m).is_some(), "the relay never saw {m:?}: {events:?}");
    }
    assert!(first(Msg::Probe) < first(Msg::Write), "{events:?}");
    assert!(last(Msg::Write) < first(Msg::Prepare), "{events:?}");
    assert!(first(Msg::Prepare) < first(Msg::Prepared), "{events:?}");
    assert!(first(Msg::Prepared) < first(Msg::Commit), "{events:?}");
    assert!(first(Msg::Commit) < first(Msg::Committed), "{events:?}");
    assert!(relay.notes().is_empty(), "{:?}", relay.notes());
    // Every byte of the image went through as WRITE payload (at least once).
    assert!(relay.delivered(Dir::ToDestination) >= SIZE as u64);
}

// ---------------------------------------------------------------------------------------
// 3. Faults, seen from both ends

#[test]
fn cut_rst_resets_both_peers() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);
    relay.fault_now(Fault::CutRst);
    let mut b = [0u8; 16];
    for (s, who) in [(&mut client, "client"), (&mut server, "server")] {
        match s.read(&mut b) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{who}: expected a reset, got {other:?}"),
        }
    }
    assert_eq!(relay.open_connections(), 0);
}

#[test]
fn cut_fin_ends_both_streams() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);
    relay.fault_now(Fault::CutFin);
    let mut b = [0u8; 16];
    for (s, who) in [(&mut client, "client"), (&mut server, "server")] {
        match s.read(&mut b) {
            Ok(0) => {}
            other => panic!("{who}: expected EOF, got {other:?}"),
        }
    }
    // What is sent afterwards is not delivered (the relay discards it).
    let before = relay.delivered(Dir::ToDestination);
    client.write_all(&write_request(1, 0, &[7; 512])).unwrap();
    thread::sleep(QUIET);
    assert_eq!(server.read(&mut b).unwrap(), 0, "nothing after the FIN");
    assert_eq!(relay.delivered(Dir::ToDestination), before);
    assert_eq!(relay.open_connections(), 0);
}

#[test]
fn a_blackhole_holds_one_direction_until_restored() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);

    relay.fault_now(Fault::Blackhole(Dir::ToSource));
    let request = write_request(5, 4096, &[3; 4096]);
    client.write_all(&request).unwrap();
    assert_eq!(
        read_n(&mut server, request.len()),
        request,
        "requests still flow"
    );
    server.write_all(&reply(0, 5)).unwrap();
    assert_quiet(&mut client, "blackholed reply");
    assert!(relay.wait_for(Msg::OtherReply, SOON), "the reply was read");
    assert_eq!(relay.held(Dir::ToSource), 16);
    relay.restore();
    assert_eq!(read_n(&mut client, 16), reply(0, 5), "the held reply");

    relay.fault_now(Fault::Blackhole(Dir::ToDestination));
    client.write_all(&request).unwrap();
    assert_quiet(&mut server, "blackholed request");
    relay.heal();
    assert_eq!(
        read_n(&mut server, request.len()),
        request,
        "the held request"
    );
}

#[test]
fn a_delay_slows_one_direction() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let mut c = RawClient::connect(relay.addr());
    c.write_at(0, &[1; 4096]);

    relay.fault_now(Fault::Delay(Dir::ToSource, Duration::from_millis(400)));
    let start = Instant::now();
    c.write_at(4096, &[2; 4096]);
    let slow = start.elapsed();
    assert!(
        slow >= Duration::from_millis(400) && slow < Duration::from_secs(3),
        "{slow:?}"
    );
    relay.restore();
    let start = Instant::now();
    c.write_at(8192, &[3; 4096]);
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn an_armed_fault_fires_before_or_after_its_message() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let mut c = RawClient::connect(relay.addr());
    c.stream.set_read_timeout(Some(QUIET)).unwrap();

    // Before: the WRITE never reaches the server while the blackhole holds it.
    relay.arm(Msg::Write, false, Fault::Blackhole(Dir::ToDestination));
    let a = seq_block(1);
    c.send_write(1, 0, &a);
    let mut b = [0u8; 16];
    assert!(c.stream.read(&mut b).is_err(), "no reply while held");
    assert_eq!(
        block_at(&img.path, 0),
        vec![0; BLOCK],
        "not written while held"
    );
    assert_eq!(relay.armed(), 0, "the fault fired");
    relay.heal();
    c.stream.set_read_timeout(Some(SOON)).unwrap();
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 1
        }
    );
    assert_eq!(block_at(&img.path, 0), a);

    // After: the WRITE lands, its reply is held.
    relay.arm(Msg::Write, true, Fault::Blackhole(Dir::ToSource));
    let d = seq_block(2);
    c.send_write(2, 4096, &d);
    wait_block(&img.path, 4096, &d, "a write armed 'after'");
    c.stream.set_read_timeout(Some(QUIET)).unwrap();
    assert!(c.stream.read(&mut b).is_err(), "its reply is held");
    relay.restore();
    c.stream.set_read_timeout(Some(SOON)).unwrap();
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 2
        }
    );

    // After, in the same direction: of two WRITEs sent together, the first lands and is
    // answered, the second is held.
    relay.arm(Msg::Write, true, Fault::Blackhole(Dir::ToDestination));
    let (e, f) = (seq_block(3), seq_block(4));
    let mut two = request_header(0, CMD_WRITE, 3, 8192, BLOCK as u32).to_vec();
    two.extend_from_slice(&e);
    two.extend_from_slice(&request_header(0, CMD_WRITE, 4, 12288, BLOCK as u32));
    two.extend_from_slice(&f);
    c.send(&two);
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 3
        }
    );
    assert_eq!(block_at(&img.path, 8192), e);
    c.stream.set_read_timeout(Some(QUIET)).unwrap();
    assert!(c.stream.read(&mut b).is_err(), "the second is held");
    assert_eq!(block_at(&img.path, 12288), vec![0; BLOCK]);
    relay.heal();
    c.stream.set_read_timeout(Some(SOON)).unwrap();
    assert_eq!(
        c.read_reply(),
        Reply {
            error: 0,
            handle: 4
        }
    );
    assert_eq!(block_at(&img.path, 12288), f);

    // A cut before a FLUSH: it never arrives, the client sees a reset.
    relay.arm(Msg::Flush, false, Fault::CutRst);
    c.request(0, CMD_FLUSH, 3, 0, 0);
    match c.stream.read(&mut b) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
    assert_eq!(relay.count(Msg::Flush), 1, "seen, not delivered");
    // Only the four WRITE replies and the hello went back.
    assert_eq!(relay.delivered(Dir::ToSource), (HELLO_LEN + 4 * 16) as u64);
}

#[test]
fn a_fault_armed_at_a_byte_count_cuts_there() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);
    let one = write_request(1, 0, &[1; 4096]);
    let cut_at = one.len() as u64 + 100;
    relay.arm_after_bytes(Dir::ToDestination, cut_at, Fault::CutFin);
    let mut both = one.clone();
    both.extend_from_slice(&write_request(2, 4096, &[2; 4096]));
    client.write_all(&both).unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, cut_at, "exactly the bytes before the cut");
    assert_eq!(got[..], both[..cut_at as usize]);
    let mut b = [0u8; 4];
    assert_eq!(client.read(&mut b).unwrap(), 0, "the client got a FIN");
}

#[test]
fn a_message_is_held_until_its_kind_is_known() {
    let fake = Fake::new();
    let relay = Relay::start(fake.addr());
    let (mut client, mut server) = fake.pair(&relay);
    relay.arm(Msg::Flush, false, Fault::CutFin);
    let flush = request_header(0, CMD_FLUSH, 1, 0, 0);
    // The first 10 bytes could start anything: the relay holds them...
    client.write_all(&flush[..10]).unwrap();
    assert_quiet(&mut server, "the start of a request");
    // ... so a cut before the FLUSH delivers none of it.
    client.write_all(&flush[10..]).unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).unwrap();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(relay.count(Msg::Flush), 1);
}

#[test]
fn refused_connections_are_reset_until_accepted_again() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    relay.refuse_new();
    match RawClient::greet(relay.addr()) {
        Greeting::Eof => {}
        Greeting::Error(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset connection, got {other:?}"),
    }
    assert_eq!(relay.connections(), 0);
    relay.accept_again();
    let mut c = RawClient::connect(relay.addr());
    c.write_at(0, &[9; 512]);
    assert_eq!(relay.connections(), 1);
}

// ---------------------------------------------------------------------------------------
// 4. Partition and heal

#[test]
fn a_partition_holds_everything_and_heal_delivers_it_late() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let mut a = RawClient::connect(relay.addr());
    // Two more clients that will give up during the partition, one with a FIN, one with a
    // RST: their WRITEs, sent before they went, still arrive after the heal.
    let fin = RawClient::connect(relay.addr());
    let rst = RawClient::connect(relay.addr());

    relay.partition();
    let partitioned = Instant::now();
    let (ba, bf, br) = (seq_block(10), seq_block(11), seq_block(12));
    a.send_write(10, 0, &ba);
    let mut fin = fin;
    fin.send_write(11, 4096, &bf);
    fin.close();
    let mut rst = rst;
    rst.send_write(12, 8192, &br);
    let _ = socket2::SockRef::from(&rst.stream).set_linger(Some(Duration::ZERO));
    drop(rst);
    // A new connection is accepted but gets no hello.
    let mut late = TcpStream::connect_timeout(&relay.addr(), SOON).unwrap();
    assert!(relay.wait_connections(4, SOON));
    assert!(
        relay.wait_count(Msg::Write, 3, SOON),
        "{:?}",
        relay.events()
    );
    assert_quiet(&mut late, "hello during the partition");
    a.stream.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 16];
    assert!(
        a.stream.read(&mut b).is_err(),
        "no reply during the partition"
    );
    for off in [0, 4096, 8192] {
        assert_eq!(block_at(&img.path, off), vec![0; BLOCK], "written at {off}");
    }
    assert_eq!(
        relay.held(Dir::ToDestination),
        3 * (28 + BLOCK as u64),
        "the three WRITEs are held"
    );

    // Longer than the relay's grace for a reset it could not deliver behind its bytes
    // (1 s): a partition holds it however long it lasts.
    thread::sleep(Duration::from_millis(1300).saturating_sub(partitioned.elapsed()));
    let healed = Instant::now();
    relay.heal();
    a.stream.set_read_timeout(Some(SOON)).unwrap();
    assert_eq!(
        a.read_reply(),
        Reply {
            error: 0,
            handle: 10
        }
    );
    assert!(healed.elapsed() < Duration::from_secs(2));
    wait_block(&img.path, 0, &ba, "the partitioned client's write");
    wait_block(&img.path, 4096, &bf, "the write of the client that closed");
    wait_block(&img.path, 8192, &br, "the write of the client that reset");
    late.set_read_timeout(Some(SOON)).unwrap();
    let h = read_n(&mut late, HELLO_LEN);
    assert_eq!(&h[..8], INIT_PASSWD, "the held hello");
}

// ---------------------------------------------------------------------------------------
// 5. The promise checker

#[test]
fn seq_writer_writes_and_check_holds_all_catches_a_missing_block() {
    const SIZE: u64 = 16 * MIB as u64;
    let img = Image::zeroed(SIZE as usize);
    let server = Server::start(&img.path, &[]);
    let writer = SeqWriter::start(&[server.sockaddr()], SIZE);
    assert!(writer.wait_acked(300, None, Duration::from_secs(10)));
    let log = writer.stop();
    assert!(log.errors.is_empty() && log.unsure.is_empty(), "{log:?}");
    assert_eq!(
        log.address_runs(),
        vec![(server.sockaddr(), log.acked.len())]
    );
    let expected = log.expected();
    assert_eq!(expected.len(), log.acked.len(), "distinct offsets");
    check_holds_all(&img.path, &expected).unwrap();

    // One block lost, one replaced by another write: both are caught.
    let file = fs::OpenOptions::new().write(true).open(&img.path).unwrap();
    let (lost, other) = (expected[7].0, expected[100].0);
    file.write_all_at(&vec![0; BLOCK], lost).unwrap();
    file.write_all_at(&seq_block(999_999), other).unwrap();
    let err = check_holds_all(&img.path, &expected).unwrap_err();
    assert!(
        err.starts_with(&format!("2 of {} ", expected.len())),
        "{err}"
    );
    assert!(err.contains(&format!("{lost} (zeros)")), "{err}");
    assert!(
        err.contains(&format!("{other} (block of seq 999999)")),
        "{err}"
    );
}

#[test]
fn seq_writer_moves_to_the_next_address_when_its_server_goes() {
    const SIZE: u64 = 16 * MIB as u64;
    let img = Image::zeroed(SIZE as usize);
    let server = Server::start(&img.path, &[]);
    let relay = Relay::start(server.sockaddr());
    let dead = SocketAddr::new(LOOPBACK, free_port());
    let mut opts = WriterOptions::new(&[dead, relay.addr(), server.sockaddr()], SIZE);
    opts.io_timeout = Duration::from_secs(1);
    let writer = SeqWriter::start_with(opts);
    assert!(writer.wait_acked(50, Some(relay.addr()), SOON));
    // The relayed server "goes": its connection is reset, new ones too.
    relay.refuse_new();
    relay.fault_now(Fault::CutRst);
    assert!(writer.wait_acked(50, Some(server.sockaddr()), SOON));
    let log = writer.stop();

    assert_eq!(
        log.attempts[0].result,
        Err(Refusal::ConnectionRefused),
        "{:?}",
        log.attempts
    );
    let runs = log.address_runs();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!((runs[0].0, runs[1].0), (relay.addr(), server.sockaddr()));
    assert!(log.unsure.len() <= 1, "{:?}", log.unsure);
    check_holds_all(&img.path, &log.expected()).unwrap();
}

#[test]
fn seq_writer_records_error_replies_and_goes_on() {
    // The writer believes the export is twice its size: the upper half gets ENOSPC.
    const SIZE: u64 = 4 * MIB as u64;
    let img = Image::zeroed(SIZE as usize);
    let server = Server::start(&img.path, &[]);
    let mut opts = WriterOptions::new(&[server.sockaddr()], 2 * SIZE);
    opts.pause = Duration::ZERO;
    opts.max_backoff = Duration::from_millis(20);
    let writer = SeqWriter::start_with(opts);
    assert!(writer.wait_acked(100, None, SOON));
    let log = writer.stop();
    assert!(!log.errors.is_empty());
    for e in &log.errors {
        assert_eq!(e.why, Refusal::Errno(ENOSPC), "{e:?}");
        assert!(e.offset >= SIZE, "{e:?}");
    }
    assert!(log.acked.iter().all(|a| a.offset < SIZE));
    check_holds_all(&img.path, &log.expected()).unwrap();
}

#[test]
fn accepts_write_reports_each_outcome() {
    let img = Image::zeroed(MIB);
    let server = Server::start(&img.path, &[]);
    let probe = accepts_write(server.sockaddr(), 8192);
    let acked = probe.acked().unwrap_or_else(|| panic!("{probe:?}"));
    check_holds_all(&img.path, &[acked]).unwrap();

    let dead = SocketAddr::new(LOOPBACK, free_port());
    assert_eq!(
        accepts_write(dead, 0),
        Probe::Refused(Refusal::ConnectionRefused)
    );
    assert_eq!(
        accepts_write(server.sockaddr(), MIB as u64),
        Probe::Refused(Refusal::Errno(ENOSPC))
    );

    let relay = Relay::start(server.sockaddr());
    relay.refuse_new();
    assert_eq!(
        accepts_write(relay.addr(), 0),
        Probe::Refused(Refusal::ClosedWithoutHello)
    );
    relay.accept_again();
    relay.arm(Msg::Write, false, Fault::CutRst);
    assert_eq!(
        accepts_write(relay.addr(), 0),
        Probe::Refused(Refusal::ClosedBeforeReply)
    );
    relay.arm(Msg::Write, true, Fault::Blackhole(Dir::ToSource));
    assert_eq!(
        accepts_write_within(relay.addr(), 0, QUIET),
        Probe::Refused(Refusal::Timeout)
    );
    relay.restore();
    assert!(accepts_write(relay.addr(), 0).is_accepted());
}
