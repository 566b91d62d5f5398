//! The listener's migration handshakes: close-doors / open-doors with real sessions (the
//! source's final pass), and the `listen` server's hand-off state (the destination),
//! driven both by [`HandoffMessage`]s sent straight to the listener and by raw clients.

use std::pin::pin;

use actix::prelude::*;
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::time::{sleep, timeout, Instant};

use crate::actors::listener::{CloseDoors, Listener, OpenDoors};
use crate::actors::session::HandoffMessage;
use crate::actors::ServerEvent;
use crate::protocol::handoff::{HandoffReply, HandoffRequest, MigrationId, HANDOFF, PROBE};
use crate::protocol::request::Command;
use crate::protocol::Errno;

use super::*;

const MIB: u64 = 1 << 20;
const A: MigrationId = MigrationId([0xa1; 16]);
const B: MigrationId = MigrationId([0xb2; 16]);

/// An export whose sessions answer the hand-off requests (the rules of a `listen` server).
fn target_export(size: u64) -> Export {
    let Export { file, config } = Export::new(size, Limits::default());
    let config = Arc::new(SessionConfig {
        backing: config.backing.clone(),
        rules: ExportRules {
            migration_target: true,
            ..config.rules
        },
        hello: config.hello.clone(),
        newstyle: None,
        sync_writes: config.sync_writes,
        max_in_flight: config.max_in_flight,
        payload_budget: config.payload_budget,
        part_size: config.part_size,
        killswitch: None,
        grace: config.grace,
        busy_poll: config.busy_poll,
        write_queue: None,
    });
    Export { file, config }
}

/// A `listen` server's listener and the receiving end of its event channel.
fn start_target(export: &Export) -> (Addr<Listener>, SocketAddr, UnboundedReceiver<ServerEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (listener, addr) = spawn_listener(export.config.clone(), Some(tx));
    (listener, addr, rx)
}

async fn handoff(listener: &Addr<Listener>, request: HandoffRequest) -> HandoffReply {
    timeout(WAIT, listener.send(HandoffMessage(request)))
        .await
        .expect("HandoffMessage not answered within the wait")
        .expect("the listener's mailbox is closed")
}

async fn expect_event(events: &mut UnboundedReceiver<ServerEvent>, expected: ServerEvent) {
    let got = timeout(WAIT, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no {expected:?} within the wait"))
        .expect("the event channel closed");
    assert_eq!(got, expected);
}

async fn expect_no_event(events: &mut UnboundedReceiver<ServerEvent>) {
    if let Ok(event) = timeout(QUIET, events.recv()).await {
        panic!("unexpected event: {event:?}");
    }
}

/// Polls the status until `has_control` is set (taking control after a DISC is
/// asynchronous: the file is synced first).
async fn expect_control_taken(listener: &Addr<Listener>) {
    let deadline = Instant::now() + WAIT;
    while !listener_status(listener).await.has_control {
        assert!(
            Instant::now() < deadline,
            "has_control not set within the wait"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// A HANDOFF request over the wire: header and encoded message.
fn handoff_req(cookie: u64, request: &HandoffRequest) -> Vec<u8> {
    let body = request.encode();
    let mut out = header(Command::Unknown(HANDOFF), 0, cookie, 0, body.len() as u64);
    out.extend_from_slice(&body);
    out
}

/// Reads the answer to a HANDOFF request: simple reply (error 0), 32-bit length, message.
async fn handoff_answer(client: &mut Client, cookie: u64) -> HandoffReply {
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, 0));
    let len: [u8; 4] = client.read_exact(4).await.try_into().expect("4 bytes");
    let body = client.read_exact(u32::from_be_bytes(len) as usize).await;
    HandoffReply::decode(&body).expect("a well-formed hand-off answer")
}

#[actix::test]
async fn close_doors_waits_for_a_slow_read_and_open_doors_admits_again() {
    let export = Export::new(16 * MIB, Limits::default());
    let (listener, addr) = spawn_listener(export.config.clone(), None);

    // One client that has already gone.
    let mut gone = Client::connect(addr, None).await.expect("connect");
    gone.hello(&export).await;
    drop(gone);

    // One slow client: a 12 MiB READ it does not read yet (more than the socket buffers
    // hold), so the request stays in flight.
    let mut slow = Client::connect(addr, Some(SMALL_RCVBUF))
        .await
        .expect("connect");
    slow.hello(&export).await;
    let len = 12 * MIB;
    slow.send(&read_req(0x71, 0, len)).await;
    sleep(QUIET).await;

    let mut closed = pin!(listener.send(CloseDoors));
    assert!(
        timeout(QUIET, &mut closed).await.is_err(),
        "CloseDoors was answered while a READ was still in flight"
    );
    // Meanwhile new clients get no hello, and the status says so.
    expect_no_hello(addr).await;
    let status = listener_status(&listener).await;
    assert!(!status.clients_allowed, "doors closed, yet {status:?}");
    assert!(status.has_control);
    assert_eq!(status.num_clients, 1, "only the slow client is alive");
    assert!(
        timeout(QUIET, &mut closed).await.is_err(),
        "CloseDoors was answered while a READ was still in flight"
    );

    // The slow client gets its whole reply, then EOF; only then is CloseDoors answered.
    let reply = slow.reply().await;
    assert_eq!((reply.cookie, reply.error), (0x71, 0));
    let data = slow.read_exact(len as usize).await;
    assert!(data == pattern(0, len as usize), "the READ data differs");
    slow.expect_eof().await;
    timeout(WAIT, closed)
        .await
        .expect("CloseDoors not answered after every session ended")
        .expect("listener mailbox closed");

    // A second CloseDoors while closed resolves (nothing left to wait for).
    timeout(WAIT, listener.send(CloseDoors))
        .await
        .expect("a second CloseDoors was not answered")
        .expect("listener mailbox closed");
    expect_no_hello(addr).await;
    assert!(!listener_status(&listener).await.clients_allowed);

    timeout(WAIT, listener.send(OpenDoors))
        .await
        .expect("OpenDoors not answered")
        .expect("listener mailbox closed");
    let status = listener_status(&listener).await;
    assert!(status.clients_allowed, "doors reopened, yet {status:?}");
    let mut client = expect_admitted(addr, &export).await;
    client.send(&read_req(0x72, MIB, 4096)).await;
    let answers = client.answers(&[(0x72, 4096)]).await;
    assert_eq!(answers[&0x72].data, pattern(MIB, 4096));
}

/// A WRITE whose header arrived before the doors closed is read to its end, written and
/// answered before CloseDoors resolves: the final pass cannot miss an acknowledged write.
#[actix::test]
async fn close_doors_waits_for_a_write_whose_payload_arrives_late() {
    let export = Export::new(MIB, Limits::default());
    let (listener, addr) = spawn_listener(export.config.clone(), None);
    let mut client = Client::connect(addr, None).await.expect("connect");
    client.hello(&export).await;

    let data = marker(0x33, 64 * 1024);
    let request = write_req(0x81, 8192, &data);
    let split = 28 + 10_000;
    client.send(&request[..split]).await;
    sleep(QUIET).await;

    let mut closed = pin!(listener.send(CloseDoors));
    assert!(
        timeout(QUIET, &mut closed).await.is_err(),
        "CloseDoors was answered while a WRITE's payload was still arriving"
    );
    expect_no_hello(addr).await;
    client.send(&request[split..]).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (0x81, 0));
    client.expect_eof().await;
    timeout(WAIT, closed)
        .await
        .expect("CloseDoors not answered after the session ended")
        .expect("listener mailbox closed");
    assert_eq!(export.contents(8192, data.len()), data);
}

#[actix::test]
async fn close_doors_with_no_session_resolves_at_once() {
    let export = Export::new(MIB, Limits::default());
    let (listener, addr) = spawn_listener(export.config.clone(), None);
    timeout(QUIET, listener.send(CloseDoors))
        .await
        .expect("CloseDoors with no session was not answered at once")
        .expect("listener mailbox closed");
    expect_no_hello(addr).await;
    timeout(WAIT, listener.send(OpenDoors))
        .await
        .expect("OpenDoors not answered")
        .expect("listener mailbox closed");
    expect_admitted(addr, &export).await;
}

#[actix::test]
async fn a_serve_listener_refuses_hand_off_messages() {
    let export = Export::new(MIB, Limits::default());
    let (listener, _addr) = spawn_listener(export.config.clone(), None);
    let reply = handoff(&listener, HandoffRequest::Prepare { id: A, size: MIB }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    let status = listener_status(&listener).await;
    assert!(status.has_control);
    assert_eq!(status.target_phase, None);
}

#[actix::test]
async fn prepare_then_commit_takes_control_exactly_once() {
    let export = target_export(MIB);
    let (listener, _addr, mut events) = start_target(&export);
    let status = listener_status(&listener).await;
    assert!(!status.has_control);
    assert_eq!(status.target_phase, Some("receiving"));

    // Commit without Prepare: refused, nothing changes.
    let reply = handoff(&listener, HandoffRequest::Commit { id: A }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    // A Prepare for another size: refused, nothing changes.
    let reply = handoff(
        &listener,
        HandoffRequest::Prepare {
            id: A,
            size: 2 * MIB,
        },
    )
    .await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    let status = listener_status(&listener).await;
    assert!(!status.has_control);
    assert_eq!(status.target_phase, Some("receiving"));

    // Prepare: answered once the file is synced; control is not taken yet.
    let reply = handoff(&listener, HandoffRequest::Prepare { id: A, size: MIB }).await;
    assert_eq!(reply, HandoffReply::Prepared { id: A });
    let status = listener_status(&listener).await;
    assert!(!status.has_control, "control taken at Prepare");
    assert_eq!(status.target_phase, Some("in_doubt"));
    expect_no_event(&mut events).await;

    // A Commit of another migration is refused.
    let reply = handoff(&listener, HandoffRequest::Commit { id: B }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    assert!(!listener_status(&listener).await.has_control);

    let reply = handoff(&listener, HandoffRequest::Commit { id: A }).await;
    assert_eq!(reply, HandoffReply::Committed { id: A });
    let status = listener_status(&listener).await;
    assert!(status.has_control);
    assert_eq!(status.target_phase, Some("committed"));
    expect_event(&mut events, ServerEvent::MigrationReceived).await;

    // A resent Commit gets the same answer and takes control only once.
    let reply = handoff(&listener, HandoffRequest::Commit { id: A }).await;
    assert_eq!(reply, HandoffReply::Committed { id: A });
    // Prepare after Commit is refused.
    let reply = handoff(&listener, HandoffRequest::Prepare { id: A, size: MIB }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    assert!(listener_status(&listener).await.has_control);
    expect_no_event(&mut events).await;
}

/// The whole destination path over the wire: the probe, data, Prepare, Commit through a
/// real session; the source's connection then ends without a DISC.
#[actix::test]
async fn the_hand_off_over_a_session_takes_control_once() {
    let export = target_export(MIB);
    let (listener, addr, mut events) = start_target(&export);
    let mut source = Client::connect(addr, None).await.expect("connect");
    source.hello(&export).await;

    source
        .send(&header(Command::Unknown(PROBE), 0, 1, 0, 0))
        .await;
    let reply = source.reply().await;
    assert_eq!((reply.cookie, reply.error), (1, 0), "the probe must get 0");

    let data = marker(0x44, 128 * 1024);
    source.send(&write_req(2, 4096, &data)).await;
    let answers = source.answers(&[(2, 0)]).await;
    assert_eq!(answers[&2].error, 0);
    let zeroes = header(Command::WriteZeroes, 0, 3, 512 * 1024, 64 * 1024);
    source.send(&zeroes).await;
    let answers = source.answers(&[(3, 0)]).await;
    assert_eq!(answers[&3].error, 0, "a migration target takes zero ranges");

    source
        .send(&handoff_req(4, &HandoffRequest::Commit { id: A }))
        .await;
    assert!(matches!(
        handoff_answer(&mut source, 4).await,
        HandoffReply::Refused { .. }
    ));
    source
        .send(&handoff_req(
            5,
            &HandoffRequest::Prepare { id: A, size: MIB },
        ))
        .await;
    assert_eq!(
        handoff_answer(&mut source, 5).await,
        HandoffReply::Prepared { id: A }
    );
    assert!(!listener_status(&listener).await.has_control);
    source
        .send(&handoff_req(6, &HandoffRequest::Commit { id: A }))
        .await;
    assert_eq!(
        handoff_answer(&mut source, 6).await,
        HandoffReply::Committed { id: A }
    );
    assert!(listener_status(&listener).await.has_control);
    expect_event(&mut events, ServerEvent::MigrationReceived).await;
    assert_eq!(export.contents(4096, data.len()), data);
    assert_eq!(export.contents(512 * 1024, 64 * 1024), vec![0; 64 * 1024]);

    // The source then disconnects with a DISC: control is not taken a second time.
    source.send(&header(Command::Disconnect, 0, 7, 0, 0)).await;
    source.expect_eof().await;
    expect_no_event(&mut events).await;
}

/// flexnbd's legacy hand-off: a client that ends with NBD_CMD_DISC completes the migration
/// (the file synced, has_control, one event); later DISCs change nothing.
#[actix::test]
async fn a_disconnect_completes_the_migration_once() {
    let export = target_export(MIB);
    let (listener, addr, mut events) = start_target(&export);
    let mut source = Client::connect(addr, None).await.expect("connect");
    source.hello(&export).await;
    let data = marker(0x55, 8192);
    let mut batch = write_req(1, 0, &data);
    batch.extend(header(Command::Disconnect, 0, 2, 0, 0));
    source.send(&batch).await;
    let answers = source.answers(&[(1, 0)]).await;
    assert_eq!(answers[&1].error, 0);
    source.expect_eof().await;

    expect_event(&mut events, ServerEvent::MigrationReceived).await;
    expect_control_taken(&listener).await;
    assert_eq!(export.contents(0, data.len()), data);

    let mut other = Client::connect(addr, None).await.expect("connect");
    other.hello(&export).await;
    other.send(&header(Command::Disconnect, 0, 3, 0, 0)).await;
    other.expect_eof().await;
    expect_no_event(&mut events).await;
    assert!(listener_status(&listener).await.has_control);
}

/// Two sources that disconnect at the same moment: `take_control` syncs the file before it
/// sets `has_control`, so the second end must not start a second take-over.
#[actix::test]
async fn simultaneous_disconnects_report_the_migration_once() {
    let export = target_export(MIB);
    let (listener, addr, mut events) = start_target(&export);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = Client::connect(addr, None).await.expect("connect");
        client.hello(&export).await;
        clients.push(client);
    }
    let disc = header(Command::Disconnect, 0, 9, 0, 0);
    let sends = clients.iter_mut().map(|c| c.sock.write_all(&disc));
    for result in timeout(WAIT, futures_util::future::join_all(sends))
        .await
        .expect("sending the DISCs timed out")
    {
        result.expect("sending a DISC failed");
    }
    for client in &mut clients {
        client.expect_eof().await;
    }
    expect_event(&mut events, ServerEvent::MigrationReceived).await;
    expect_control_taken(&listener).await;
    expect_no_event(&mut events).await;
}

/// Neither a bad magic nor a plain hang-up is a hand-off.
#[actix::test]
async fn a_bad_magic_or_a_hang_up_does_not_complete_the_migration() {
    let export = target_export(MIB);
    let (listener, addr, mut events) = start_target(&export);

    let mut bad = Client::connect(addr, None).await.expect("connect");
    bad.hello(&export).await;
    let mut request = header(Command::Disconnect, 0, 0xbad, 0, 0);
    request[0] ^= 0x80;
    bad.send(&request).await;
    let reply = bad.reply().await;
    assert_eq!((reply.cookie, reply.error), (0xbad, Errno::EBADMSG.0));
    bad.expect_eof().await;

    let mut hang_up = Client::connect(addr, None).await.expect("connect");
    hang_up.hello(&export).await;
    drop(hang_up);

    expect_no_event(&mut events).await;
    let status = listener_status(&listener).await;
    assert!(!status.has_control, "control taken without a hand-off");
    assert_eq!(status.target_phase, Some("receiving"));
}
