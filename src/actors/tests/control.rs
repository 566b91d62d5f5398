//! The control actor, the listener's status and ACL handshakes, and the allocation-map
//! builder, each started on its own.
//!
//! The control actor talks to a real [`Listener`] (on a loopback socket, with real
//! sessions on the current arbiter) because `status` and `acl` are only meaningful through
//! it; its requests are sent both as [`Execute`] messages (to check each response line
//! exactly, without the framing) and once over a real Unix socket in a temporary
//! directory. The builder walks a real sparse temporary file.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use actix::prelude::*;
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout};

use crate::acl::Acl;
use crate::actors::allocation_map::{AllocationMapBuilder, StopBuilder};
use crate::actors::control::{Control, ControlConfig, Execute, StopControl};
use crate::actors::inbound::Inbound;
use crate::actors::listener::{GetStatus, Listener, ListenerConfig, ListenerStatus, ReplaceAcl};
use crate::protocol::control::{ControlRequest, MirrorAction, MirrorRequest};
use crate::protocol::request::Command;
use crate::storage::allocation::{MapState, BLOCK};
use crate::storage::AllocationMap;

use super::*;

const MIB: u64 = 1 << 20;
const PID: u32 = 4242;

fn start_listener(acl: Acl, export: &Export) -> (Addr<Listener>, SocketAddr) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let addr = socket.local_addr().expect("local addr");
    let listener = Listener::new(
        socket,
        ListenerConfig {
            acl,
            max_clients: 16,
            session: export.config.clone(),
            arbiters: vec![],
        },
    )
    .start();
    (listener, addr)
}

/// A control actor on a Unix socket in its own temporary directory.
struct Ctl {
    addr: Addr<Control>,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Ctl {
    fn start(
        listener: &Addr<Listener>,
        size: u64,
        allocation: Arc<AllocationMap>,
        default_deny: bool,
    ) -> Ctl {
        Ctl::start_with(listener, size, allocation, default_deny, None)
    }

    /// As [`Ctl::start`], for a `listen` server with its inbound actor.
    fn start_with(
        listener: &Addr<Listener>,
        size: u64,
        allocation: Arc<AllocationMap>,
        default_deny: bool,
        inbound: Option<Addr<Inbound>>,
    ) -> Ctl {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ctl.sock");
        let socket = std::os::unix::net::UnixListener::bind(&path).expect("bind control");
        let addr = Control::new(
            socket,
            ControlConfig {
                pid: PID,
                size,
                default_deny,
                listener: listener.clone(),
                allocation,
                inbound,
            },
        )
        .start();
        Ctl {
            addr,
            path,
            _dir: dir,
        }
    }

    async fn exec(&self, request: ControlRequest) -> String {
        timeout(WAIT, self.addr.send(Execute(request)))
            .await
            .expect("Execute not answered within the wait")
            .expect("the control actor's mailbox is closed")
    }

    /// Sends `request` over the Unix socket (then EOF with `eof`) and reads until the
    /// control actor closes the connection.
    async fn over_socket(&self, request: &[u8], eof: bool) -> String {
        let mut sock = timeout(WAIT, UnixStream::connect(&self.path))
            .await
            .expect("connect timed out")
            .expect("connect");
        timeout(WAIT, sock.write_all(request))
            .await
            .expect("send timed out")
            .expect("send");
        if eof {
            sock.shutdown().await.expect("shutdown");
        }
        let mut answer = Vec::new();
        timeout(WAIT, sock.read_to_end(&mut answer))
            .await
            .expect("no answer within the wait")
            .expect("read");
        String::from_utf8(answer).expect("text")
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn status_line(num_clients: usize, map: &str, progress: u64) -> String {
    format!(
        "0: pid={PID} size={MIB} is_mirroring=false clients_allowed=true num_clients={num_clients} \
         has_control=true alloc_map={map} alloc_map_progress={progress} \n"
    )
}

/// A connection from the loopback address `local`, so that two local clients can be told
/// apart by an ACL.
async fn connect_from(local: &str, addr: SocketAddr) -> Client {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{local}:0").parse().unwrap())
        .expect("bind the client address");
    let sock = timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    Client { sock }
}

/// A FLUSH round trip: the connection is served.
async fn expect_served(client: &mut Client, cookie: u64) {
    client.send(&header(Command::Flush, 0, cookie, 0, 0)).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, 0));
}

/// Closed before any byte (a refused connect counts too).
async fn expect_turned_away(addr: SocketAddr) {
    let Ok(mut client) = Client::connect(addr, None).await else {
        return;
    };
    assert_eq!(client.bytes_before_close().await, Some(0));
}

async fn listener_status(listener: &Addr<Listener>) -> ListenerStatus {
    timeout(WAIT, listener.send(GetStatus))
        .await
        .expect("GetStatus not answered")
        .expect("listener mailbox closed")
}

// ---------------------------------------------------------------------------------------
// Control

#[actix::test]
async fn every_command_gets_its_exact_response_line() {
    let export = Export::new(MIB, Limits::default());
    let (listener, nbd) = start_listener(Acl::default(), &export);
    let map = Arc::new(AllocationMap::new(MIB));
    let ctl = Ctl::start(&listener, MIB, map.clone(), false);

    assert_eq!(
        ctl.exec(ControlRequest::Missing).await,
        "9: missing command\n"
    );
    assert_eq!(
        ctl.exec(ControlRequest::Unknown).await,
        "10: unknown command\n"
    );
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        status_line(0, "building", 0)
    );
    for force_source in [false, true] {
        assert_eq!(
            ctl.exec(ControlRequest::Break { force_source }).await,
            "1: not mirroring\n"
        );
    }
    for args in [vec![], strings(&["100"]), strings(&["1", "2"])] {
        assert_eq!(
            ctl.exec(ControlRequest::MirrorMaxBps(args)).await,
            "1: Not currently mirroring\n"
        );
    }
    assert_eq!(
        ctl.exec(ControlRequest::MirrorRefused("bad IP port number"))
            .await,
        "1: bad IP port number\n"
    );
    let mirror = MirrorRequest {
        addr: "127.0.0.1".parse().unwrap(),
        port: 4777,
        action: MirrorAction::Nothing,
        bind: None,
        max_bps: u64::MAX,
        mode: crate::protocol::control::CopyMode::Background,
        tls: None,
    };
    assert_eq!(
        ctl.exec(ControlRequest::Mirror(mirror)).await,
        "1: this server cannot start a migration\n"
    );
    // Parsed requests go the same way.
    assert_eq!(
        ctl.exec(ControlRequest::parse(&strings(&["mirror", "::1"])))
            .await,
        "1: mirror takes at least two parameters\n"
    );

    // acl: the first bad entry is named and nothing changes; a good list is in force
    // when the answer comes.
    assert_eq!(
        ctl.exec(ControlRequest::Acl(strings(&["127.0.0.1", "10.0.0.0/33"])))
            .await,
        "1: bad spec: 10.0.0.0/33\n"
    );
    let mut client = Client::connect(nbd, None).await.expect("connect");
    client.hello(&export).await;
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        status_line(1, "building", 0)
    );
    assert_eq!(
        ctl.exec(ControlRequest::Acl(strings(&["127.0.0.1", "::1/64"])))
            .await,
        "0: updated\n"
    );
    expect_served(&mut client, 1).await;

    // The map's state and progress are read live.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file().set_len(MIB).expect("size");
    map.build_from(file.as_file(), &AtomicBool::new(false))
        .expect("walk");
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        status_line(1, "built", 100)
    );
    drop(client);
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        status_line(0, "built", 100),
        "a client that closed is not counted, even before its session noticed"
    );
}

/// `listen`: `has_control` and the hand-off keys come from the inbound actor, and follow
/// the hand-off as a source of ours joins, prepares and commits.
#[actix::test]
async fn a_listen_servers_status_comes_from_its_inbound_actor() {
    const A: MigrationId = MigrationId([0xa1; 16]);
    let t = Target::start(MIB);
    let map = t.export.config.backing.allocation().clone();
    let ctl = Ctl::start_with(&t.listener, MIB, map, false, Some(t.inbound.clone()));
    let line = |clients: usize, control: bool, phase: &str, attempt: u64| {
        format!(
            "0: pid={PID} size={MIB} is_mirroring=false clients_allowed=true num_clients={clients} \
             has_control={control} alloc_map=building alloc_map_progress=0 \
             handoff_phase={phase} handoff_attempt={attempt} \n"
        )
    };
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        line(0, false, "receiving", 0)
    );
    let mut source = t.join(A, 3).await;
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        line(1, false, "receiving", 3)
    );
    let prepare = HandoffRequest::Prepare { id: A, size: MIB };
    assert_eq!(
        source.handoff(1, &prepare).await,
        HandoffReply::Prepared { id: A }
    );
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        line(1, false, "prepared", 3)
    );
    let commit = HandoffRequest::Commit { id: A };
    assert_eq!(
        source.handoff(2, &commit).await,
        HandoffReply::Committed { id: A }
    );
    assert_eq!(
        ctl.exec(ControlRequest::Status).await,
        line(1, true, "committed", 3)
    );
    assert_eq!(
        ctl.exec(ControlRequest::Break { force_source: true }).await,
        "1: not mirroring\n"
    );
}

#[actix::test]
async fn acl_replaces_the_listeners_list_and_keeps_default_deny() {
    let export = Export::new(MIB, Limits::default());
    let (listener, nbd) = start_listener(Acl::default(), &export);
    let ctl = Ctl::start(&listener, MIB, Arc::new(AllocationMap::new(MIB)), false);
    let mut client = Client::connect(nbd, None).await.expect("connect");
    client.hello(&export).await;

    assert_eq!(
        ctl.exec(ControlRequest::Acl(strings(&["10.0.0.1"]))).await,
        "0: updated\n"
    );
    client.expect_eof().await;
    expect_turned_away(nbd).await;
    // An empty list without default-deny admits everyone again.
    assert_eq!(ctl.exec(ControlRequest::Acl(vec![])).await, "0: updated\n");
    let mut again = Client::connect(nbd, None).await.expect("connect");
    again.hello(&export).await;
    expect_served(&mut again, 2).await;

    // With default-deny (fixed at startup), an empty list admits nobody.
    let (listener, nbd) = start_listener(Acl::parse(&["127.0.0.1"], true).unwrap(), &export);
    let ctl = Ctl::start(&listener, MIB, Arc::new(AllocationMap::new(MIB)), true);
    let mut client = Client::connect(nbd, None).await.expect("connect");
    client.hello(&export).await;
    assert_eq!(ctl.exec(ControlRequest::Acl(vec![])).await, "0: updated\n");
    client.expect_eof().await;
    expect_turned_away(nbd).await;
}

#[actix::test]
async fn the_unix_socket_serves_connections_concurrently() {
    let export = Export::new(MIB, Limits::default());
    let (listener, _nbd) = start_listener(Acl::default(), &export);
    let ctl = Ctl::start(&listener, MIB, Arc::new(AllocationMap::new(MIB)), false);

    // A client that connects and says nothing, and one that stops mid-line.
    let _silent = UnixStream::connect(&ctl.path).await.expect("connect");
    let mut partial = UnixStream::connect(&ctl.path).await.expect("connect");
    partial.write_all(b"stat").await.expect("send");

    let started = Instant::now();
    assert_eq!(
        ctl.over_socket(b"status\n\n", false).await,
        status_line(0, "building", 0)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "status took {:?} behind a silent client",
        started.elapsed()
    );
    assert_eq!(
        ctl.over_socket(b"bogus\n\n", false).await,
        "10: unknown command\n"
    );
    assert_eq!(ctl.over_socket(b"", true).await, "9: missing command\n");
    assert_eq!(
        ctl.over_socket(b"status", true).await,
        "9: missing command\n",
        "an unterminated last line is discarded"
    );
    assert_eq!(
        ctl.over_socket(b"acl\n127.0.0.1\n", true).await,
        "0: updated\n",
        "EOF ends a request too"
    );
    assert_eq!(
        ctl.over_socket(b"acl\nnope\n\n", false).await,
        "1: bad spec: nope\n"
    );

    // The partial request was left alone; finishing it gets its answer.
    let mut byte = [0u8; 1];
    assert!(
        timeout(QUIET, partial.read(&mut byte)).await.is_err(),
        "an unfinished request was answered or closed"
    );
    partial.write_all(b"us\n\n").await.expect("send");
    let mut answer = String::new();
    timeout(WAIT, partial.read_to_string(&mut answer))
        .await
        .expect("no answer")
        .expect("read");
    assert_eq!(answer, status_line(0, "building", 0));

    // StopControl closes the socket: new connections are refused, Execute fails.
    timeout(WAIT, ctl.addr.send(StopControl))
        .await
        .expect("StopControl not answered")
        .expect("mailbox");
    let deadline = Instant::now() + WAIT;
    while UnixStream::connect(&ctl.path).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the control socket still accepts after StopControl"
        );
        sleep(Duration::from_millis(10)).await;
    }
    assert!(ctl
        .addr
        .send(Execute(ControlRequest::Status))
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Listener: status and ACL

#[actix::test]
async fn get_status_counts_live_clients() {
    let export = Export::new(MIB, Limits::default());
    let (listener, nbd) = start_listener(Acl::default(), &export);
    let count = |s: ListenerStatus| {
        assert!(s.clients_allowed);
        s.num_clients
    };
    assert_eq!(count(listener_status(&listener).await), 0);
    let mut a = Client::connect(nbd, None).await.expect("connect");
    a.hello(&export).await;
    let mut b = Client::connect(nbd, None).await.expect("connect");
    b.hello(&export).await;
    assert_eq!(count(listener_status(&listener).await), 2);
    drop(a);
    assert_eq!(
        count(listener_status(&listener).await),
        1,
        "right after a client closed"
    );
    b.send(&header(Command::Disconnect, 0, 1, 0, 0)).await;
    b.expect_eof().await;
    assert_eq!(count(listener_status(&listener).await), 0);
}

#[actix::test]
async fn replace_acl_disconnects_only_the_clients_it_no_longer_admits() {
    let export = Export::new(MIB, Limits::default());
    let (listener, nbd) = start_listener(Acl::default(), &export);
    let mut kept = connect_from("127.0.0.1", nbd).await;
    kept.hello(&export).await;
    let mut dropped = connect_from("127.0.0.2", nbd).await;
    dropped.hello(&export).await;
    expect_served(&mut dropped, 1).await;

    let acl = Acl::parse(&["127.0.0.1"], false).unwrap();
    timeout(WAIT, listener.send(ReplaceAcl(acl)))
        .await
        .expect("ReplaceAcl not answered")
        .expect("mailbox");
    dropped.expect_eof().await;
    expect_served(&mut kept, 2).await;
    kept.expect_quiet().await;
    assert_eq!(listener_status(&listener).await.num_clients, 1);

    // New connections are checked against the new list.
    let mut refused = connect_from("127.0.0.2", nbd).await;
    assert_eq!(refused.bytes_before_close().await, Some(0));
    let mut admitted = connect_from("127.0.0.1", nbd).await;
    admitted.hello(&export).await;
    expect_served(&mut admitted, 3).await;
}

// ---------------------------------------------------------------------------------------
// AllocationMapBuilder

/// A sparse file of `size` bytes in `dir` with `data` written at each offset, synced.
fn sparse_file(dir: &str, size: u64, data: &[(u64, usize)]) -> NamedTempFile {
    let file = NamedTempFile::new_in(dir).expect("temp file");
    file.as_file().set_len(size).expect("size");
    for &(at, len) in data {
        file.as_file()
            .write_all_at(&vec![0x5a; len], at)
            .expect("write");
    }
    file.as_file().sync_all().expect("sync");
    file
}

async fn wait_until_settled(map: &AllocationMap) -> MapState {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = map.state();
        if state != MapState::Building {
            return state;
        }
        assert!(Instant::now() < deadline, "the map is still building");
        sleep(Duration::from_millis(5)).await;
    }
}

#[actix::test]
async fn builder_marks_data_and_keeps_writes() {
    let size = 64 * MIB;
    let file = sparse_file("/tmp", size, &[(8 * MIB, 8192), (40 * MIB + 100, 100)]);
    let backing = Arc::new(Backing::open(file.path()).expect("open"));
    let map = backing.allocation().clone();
    // A write before (and while) the walk runs.
    backing
        .write_at(&[1u8; 4096], 20 * MIB, false)
        .expect("write");
    let builder = AllocationMapBuilder::new(backing.clone()).start();
    let during = tokio::task::spawn_blocking({
        let backing = backing.clone();
        move || {
            for i in 0..64u64 {
                backing
                    .write_at(&[2u8; 512], 24 * MIB + i * 8192, false)
                    .expect("write");
            }
        }
    });
    assert_eq!(wait_until_settled(&map).await, MapState::Built);
    timeout(WAIT, during).await.expect("writes").expect("join");
    assert_eq!(map.progress_percent(), 100);

    for at in [8 * MIB, 8 * MIB + 4096, 40 * MIB, 20 * MIB] {
        assert!(map.is_allocated(at), "block at {at} should be set");
    }
    for i in 0..64u64 {
        assert!(
            map.is_allocated(24 * MIB + i * 8192),
            "write {i} lost its bit"
        );
    }
    for at in [0, 8 * MIB + 8192, 30 * MIB, 40 * MIB + BLOCK, size - 1] {
        assert!(!map.is_allocated(at), "block at {at} should be a hole");
    }
    // 2 + 1 + 1 + 64 blocks (a filesystem may report a little more around the data).
    let allocated = map.allocated_bytes();
    assert!(
        (68 * BLOCK..=68 * BLOCK + 64 * 1024).contains(&allocated),
        "{allocated} bytes marked"
    );

    // Once built: data into a hole sets its block, zeros into a hole do not.
    backing
        .write_at(&[3u8; 10], 50 * MIB + 5, false)
        .expect("write");
    assert!(map.is_allocated(50 * MIB));
    backing
        .write_at(&vec![0u8; 64 * 1024], 52 * MIB, false)
        .expect("write");
    assert!(!map.is_allocated(52 * MIB) && !map.is_allocated(52 * MIB + 60 * 1024));
    assert_eq!(map.allocated_bytes(), allocated + BLOCK);

    // StopBuilder stops the actor.
    builder.do_send(StopBuilder);
    let deadline = Instant::now() + WAIT;
    while builder.connected() {
        assert!(Instant::now() < deadline, "the builder did not stop");
        sleep(Duration::from_millis(5)).await;
    }
}

#[actix::test]
async fn stop_builder_ends_a_walk_in_progress() {
    // Many extents, so that the walk takes a while (on tmpfs, to create them quickly).
    let size = 1 << 32;
    let extents: Vec<(u64, usize)> = (0..20_000u64).map(|i| (i * 128 * 1024, 1)).collect();
    let file = sparse_file("/dev/shm", size, &extents);
    let backing = Arc::new(Backing::open(file.path()).expect("open"));
    let map = backing.allocation().clone();
    let started = Instant::now();
    let builder = AllocationMapBuilder::new(backing.clone()).start();
    builder.do_send(StopBuilder);
    let deadline = Instant::now() + WAIT;
    while builder.connected() {
        assert!(Instant::now() < deadline, "the builder did not stop");
        sleep(Duration::from_millis(1)).await;
    }
    let state = wait_until_settled(&map).await;
    let took = started.elapsed();
    eprintln!(
        "walk of 20000 extents after StopBuilder: {state:?} after {took:?}, {}% walked",
        map.progress_percent()
    );
    // Either the walk was cancelled (the map is never trusted) or it had already finished;
    // it never stays "building", and a cancelled walk never claims to be built.
    match state {
        MapState::Failed => assert!(map.progress_percent() < 100),
        MapState::Built => assert_eq!(map.progress_percent(), 100),
        MapState::Building => unreachable!(),
    }
    assert!(!map.is_built() || map.allocated_bytes() >= 20_000 * BLOCK);
}
