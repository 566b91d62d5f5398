//! The listener's migration handshakes: close-doors / open-doors with real sessions (the
//! source's final pass), and the `listen` server's hand-off (the destination), driven both
//! by [`HandoffMessage`]s sent straight to an [`Inbound`] actor and by raw clients of a
//! [`Target`] (listener, inbound actor and sessions wired as `server` wires them).

use std::pin::pin;

use actix::prelude::*;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};

use crate::actors::inbound::{Admit, HandoffMessage, Inbound};
use crate::actors::listener::{CloseDoors, OpenDoors};
use crate::protocol::request::Command;
use crate::protocol::Errno;

use super::*;

const MIB: u64 = 1 << 20;
const A: MigrationId = MigrationId([0xa1; 16]);
const B: MigrationId = MigrationId([0xb2; 16]);

/// An inbound actor on its own (no listener, no session): messages are sent to it the way
/// the listener and the sessions would send them.
struct Alone {
    inbound: Addr<Inbound>,
    events: mpsc::UnboundedReceiver<ServerEvent>,
    _export: Export,
}

impl Alone {
    fn start(size: u64) -> Alone {
        let export = Export::new(size, Limits::default());
        let (tx, events) = mpsc::unbounded_channel();
        let inbound = Inbound::new(export.config.backing.clone(), tx).start();
        Alone {
            inbound,
            events,
            _export: export,
        }
    }

    async fn admit(&self, conn: u64) -> bool {
        timeout(WAIT, self.inbound.send(Admit(conn)))
            .await
            .expect("Admit not answered within the wait")
            .expect("the inbound actor's mailbox is closed")
    }

    async fn handoff(&self, conn: u64, request: HandoffRequest) -> HandoffReply {
        timeout(WAIT, self.inbound.send(HandoffMessage { conn, request }))
            .await
            .expect("HandoffMessage not answered within the wait")
            .expect("the inbound actor's mailbox is closed")
    }

    async fn status(&self) -> TargetStatus {
        timeout(WAIT, self.inbound.send(GetTargetStatus))
            .await
            .expect("GetTargetStatus not answered within the wait")
            .expect("the inbound actor's mailbox is closed")
    }

    async fn expect_event(&mut self, expected: ServerEvent) {
        let got = timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {expected:?} within the wait"))
            .expect("the event channel closed");
        assert_eq!(got, expected);
    }

    async fn expect_no_event(&mut self) {
        if let Ok(event) = timeout(QUIET, self.events.recv()).await {
            panic!("unexpected event: {event:?}");
        }
    }
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

/// A `serve` server is no migration target: its sessions answer the PROBE with EINVAL (as C
/// flexnbd does) and a HANDOFF request with EINVAL, consuming no payload for it (an unknown
/// type, flexnbd §4.4): the next request follows its header directly.
#[actix::test]
async fn a_serve_server_refuses_hand_off_messages() {
    let export = Export::new(MIB, Limits::default());
    let (_listener, addr) = spawn_listener(export.config.clone(), None);
    let mut client = Client::connect(addr, None).await.expect("connect");
    client.hello(&export).await;
    client
        .send(&header(Command::Unknown(PROBE), 0, 1, 0, 0))
        .await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (1, Errno::EINVAL.0));
    client
        .send(&header(Command::Unknown(HANDOFF), 0, 2, 0, 40))
        .await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (2, Errno::EINVAL.0));
    // No payload was read for it: the next request is answered at once.
    client.send(&header(Command::Flush, 0, 3, 0, 0)).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (3, 0));
    client.expect_quiet().await;
}

#[actix::test]
async fn prepare_then_commit_takes_control_exactly_once() {
    let mut t = Alone::start(MIB);
    let status = t.status().await;
    assert!(!status.has_control);
    assert_eq!((status.phase, status.attempt), ("receiving", 0));
    assert!(t.admit(1).await);

    // Commit from a connection that has not joined: refused, nothing changes.
    let reply = t.handoff(1, HandoffRequest::Commit { id: A }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    let join = HandoffRequest::Join {
        id: A,
        attempt: 1,
        purpose: JoinPurpose::Copy,
    };
    assert_eq!(
        t.handoff(1, join).await,
        HandoffReply::Joined { id: A, attempt: 1 }
    );
    assert_eq!(t.status().await.attempt, 1);
    // Commit without Prepare: the proof that control was not taken; nothing changes.
    assert_eq!(
        t.handoff(1, HandoffRequest::Commit { id: A }).await,
        HandoffReply::NotPrepared { id: A }
    );
    // A Prepare for another size: refused, nothing changes.
    let reply = t
        .handoff(
            1,
            HandoffRequest::Prepare {
                id: A,
                size: 2 * MIB,
            },
        )
        .await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    let status = t.status().await;
    assert!(!status.has_control);
    assert_eq!(status.phase, "receiving");

    // Prepare: answered once the file is synced; control is not taken yet.
    let reply = t
        .handoff(1, HandoffRequest::Prepare { id: A, size: MIB })
        .await;
    assert_eq!(reply, HandoffReply::Prepared { id: A });
    let status = t.status().await;
    assert!(!status.has_control, "control taken at Prepare");
    assert_eq!(status.phase, "prepared");
    t.expect_no_event().await;

    // A Commit of another migration proves it is not prepared for that one; a Commit of
    // this one from a connection that does not carry it is refused. Neither takes control.
    assert_eq!(
        t.handoff(1, HandoffRequest::Commit { id: B }).await,
        HandoffReply::NotPrepared { id: B }
    );
    assert!(t.admit(2).await, "a candidate is admitted");
    let reply = t.handoff(2, HandoffRequest::Commit { id: A }).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    let status = t.status().await;
    assert!(!status.has_control);
    assert_eq!(status.phase, "prepared");

    let reply = t.handoff(1, HandoffRequest::Commit { id: A }).await;
    assert_eq!(reply, HandoffReply::Committed { id: A });
    let status = t.status().await;
    assert!(status.has_control);
    assert_eq!(status.phase, "committed");
    t.expect_event(ServerEvent::MigrationReceived).await;

    // A resent Commit gets the same answer and takes control only once.
    let reply = t.handoff(1, HandoffRequest::Commit { id: A }).await;
    assert_eq!(reply, HandoffReply::Committed { id: A });
    // Prepare after Commit is refused.
    let reply = t
        .handoff(1, HandoffRequest::Prepare { id: A, size: MIB })
        .await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    assert!(t.status().await.has_control);
    t.expect_no_event().await;
}

/// The whole destination path over the wire: the probe, Join, data, Prepare, Commit
/// through a real session; the source's connection then ends with a DISC, which takes
/// control no second time.
#[actix::test]
async fn the_hand_off_over_a_session_takes_control_once() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;

    let data = marker(0x44, 128 * 1024);
    source.send(&write_req(2, 4096, &data)).await;
    let answers = source.answers(&[(2, 0)]).await;
    assert_eq!(answers[&2].error, 0);
    let zeroes = header(Command::WriteZeroes, 0, 3, 512 * 1024, 64 * 1024);
    source.send(&zeroes).await;
    let answers = source.answers(&[(3, 0)]).await;
    assert_eq!(answers[&3].error, 0, "a migration target takes zero ranges");

    assert_eq!(
        source.handoff(4, &HandoffRequest::Commit { id: A }).await,
        HandoffReply::NotPrepared { id: A },
        "a Commit before Prepare"
    );
    assert_eq!(
        source
            .handoff(5, &HandoffRequest::Prepare { id: A, size: MIB })
            .await,
        HandoffReply::Prepared { id: A }
    );
    assert!(!t.status().await.has_control);
    assert_eq!(
        source.handoff(6, &HandoffRequest::Commit { id: A }).await,
        HandoffReply::Committed { id: A }
    );
    assert!(t.status().await.has_control);
    t.expect_event(ServerEvent::MigrationReceived).await;
    assert_eq!(t.export.contents(4096, data.len()), data);
    assert_eq!(t.export.contents(512 * 1024, 64 * 1024), vec![0; 64 * 1024]);

    // The source then disconnects with a DISC: control is not taken a second time.
    source.send(&header(Command::Disconnect, 0, 7, 0, 0)).await;
    source.expect_eof().await;
    t.settle().await;
    t.expect_no_event().await;
}

/// flexnbd's legacy hand-off: a client that never spoke our protocol and ends with
/// NBD_CMD_DISC completes the migration (the file synced, has_control, one event); once
/// control is taken nobody else is admitted, so nothing can complete it again.
#[actix::test]
async fn a_disconnect_completes_the_migration_once() {
    let mut t = Target::start(MIB);
    let mut source = t.connect().await;
    let data = marker(0x55, 8192);
    let mut batch = write_req(1, 0, &data);
    batch.extend(header(Command::Disconnect, 0, 2, 0, 0));
    source.send(&batch).await;
    let answers = source.answers(&[(1, 0)]).await;
    assert_eq!(answers[&1].error, 0, "the legacy client may write");
    source.expect_eof().await;

    t.expect_event(ServerEvent::MigrationReceived).await;
    t.expect_control_taken().await;
    assert_eq!(t.status().await.phase, "committed");
    assert_eq!(t.export.contents(0, data.len()), data);

    expect_no_hello(t.addr).await;
    t.settle().await;
    t.expect_no_event().await;
    assert!(t.status().await.has_control);
}

/// flexnbd's contract before a source of ours joined: one client at a time. Of four
/// clients that connect together only one gets a hello; when all of them send a DISC at
/// the same moment the migration is reported once.
#[actix::test]
async fn simultaneous_disconnects_report_the_migration_once() {
    let mut t = Target::start(MIB);
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(t.addr, None).await.expect("connect"));
    }
    let mut admitted = 0;
    for client in &mut clients {
        let mut hello = vec![0; OLDSTYLE_HELLO_LEN];
        match timeout(WAIT, client.sock.read_exact(&mut hello)).await {
            Err(_) => panic!("a connection was neither served nor closed"),
            Ok(Ok(_)) => {
                assert_eq!(hello, t.export.config.hello, "the hello differs");
                admitted += 1;
            }
            Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
        }
    }
    assert_eq!(admitted, 1, "a migration target admits one legacy client");
    let disc = header(Command::Disconnect, 0, 9, 0, 0);
    let sends = clients.iter_mut().map(|c| c.sock.write_all(&disc));
    // The turned-away connections may fail to take it.
    timeout(WAIT, futures_util::future::join_all(sends))
        .await
        .expect("sending the DISCs timed out");
    for client in &mut clients {
        assert_eq!(client.bytes_before_close().await, Some(0));
    }
    t.expect_event(ServerEvent::MigrationReceived).await;
    t.expect_control_taken().await;
    t.settle().await;
    t.expect_no_event().await;
}

/// Neither a bad magic nor a plain hang-up is a hand-off; each frees the one legacy slot.
#[actix::test]
async fn a_bad_magic_or_a_hang_up_does_not_complete_the_migration() {
    let mut t = Target::start(MIB);

    let mut bad = t.connect().await;
    let mut request = header(Command::Disconnect, 0, 0xbad, 0, 0);
    request[0] ^= 0x80;
    bad.send(&request).await;
    let reply = bad.reply().await;
    assert_eq!((reply.cookie, reply.error), (0xbad, Errno::EBADMSG.0));
    bad.expect_eof().await;
    t.settle().await;

    let hang_up = t.connect().await;
    drop(hang_up);

    t.expect_no_event().await;
    t.settle().await;
    let status = t.status().await;
    assert!(!status.has_control, "control taken without a hand-off");
    assert_eq!(status.phase, "receiving");
    // The slot is free again.
    t.connect().await;
}
