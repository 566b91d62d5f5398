//! The inbound-migration actor of a `listen` server with real sessions: a [`Target`] wires
//! the actor, its write gate, the listener and the sessions as `server` does, and raw
//! loopback clients play the sources (a legacy one, ours, stale or stray connections).
//! What a client was told is checked against the file itself: a refused write must not be
//! in it.

use tokio::time::{sleep, timeout, Instant};

use crate::actors::inbound::{StopInbound, JOIN_LIMIT};
use crate::protocol::handoff::target::MAX_CANDIDATES;
use crate::protocol::request::Command;
use crate::protocol::{Errno, COMPACT_REQUEST_LEN};

use super::*;

const MIB: u64 = 1 << 20;
const A: MigrationId = MigrationId([0xa1; 16]);
const B: MigrationId = MigrationId([0xb2; 16]);
/// Larger than the sessions' inline-write limit: such a WRITE goes through the write queue.
const QUEUED: usize = 200 * 1024;

/// Sends a WRITE of fresh data at `offset` and checks that it fails with EPERM and that
/// the file still holds what it held before.
async fn expect_refused_write(
    t: &Target,
    client: &mut Client,
    cookie: u64,
    offset: u64,
    len: usize,
) {
    let before = t.export.contents(offset, len);
    let data = marker(cookie as u8, len);
    assert_ne!(data, before);
    client.send(&write_req(cookie, offset, &data)).await;
    let reply = client.reply().await;
    assert_eq!(
        (reply.cookie, reply.error),
        (cookie, Errno::EPERM.0),
        "a write that may not be applied"
    );
    assert_eq!(
        t.export.contents(offset, len),
        before,
        "a refused write is in the file"
    );
}

/// Sends a WRITE of fresh data at `offset` and checks that it succeeds and is in the file.
async fn expect_applied_write(
    t: &Target,
    client: &mut Client,
    cookie: u64,
    offset: u64,
    len: usize,
) {
    let data = marker(cookie as u8, len);
    client.send(&write_req(cookie, offset, &data)).await;
    let reply = client.reply().await;
    assert_eq!(
        (reply.cookie, reply.error),
        (cookie, 0),
        "a write that may be applied"
    );
    assert_eq!(
        t.export.contents(offset, len),
        data,
        "the write is not in the file"
    );
}

/// Sends a WRITE_ZEROES and checks that it fails with EPERM and the range is untouched.
async fn expect_refused_zeroes(
    t: &Target,
    client: &mut Client,
    cookie: u64,
    offset: u64,
    len: usize,
) {
    let before = t.export.contents(offset, len);
    assert_ne!(before, vec![0; len]);
    client
        .send(&header(Command::WriteZeroes, 0, cookie, offset, len as u64))
        .await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, Errno::EPERM.0));
    assert_eq!(t.export.contents(offset, len), before);
}

/// Polls until the listener counts `n` live clients.
async fn expect_clients(t: &Target, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let count = listener_status(&t.listener).await.num_clients;
        if count == n {
            return;
        }
        assert!(Instant::now() < deadline, "{count} clients, expected {n}");
        sleep(Duration::from_millis(10)).await;
    }
}

#[actix::test]
async fn once_a_source_joined_another_client_is_only_a_candidate() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    // Admitted (it gets a hello), but only as a candidate, which may not write.
    let mut other = t.connect().await;
    expect_refused_write(&t, &mut other, 0x11, 0, 4096).await;
    expect_refused_write(&t, &mut other, 0x12, 8192, QUEUED).await;
    expect_refused_zeroes(&t, &mut other, 0x13, 512 * 1024, 64 * 1024).await;
    // It may read.
    other.send(&read_req(0x14, 4096, 512)).await;
    assert_eq!(
        other.answers(&[(0x14, 512)]).await[&0x14].data,
        pattern(4096, 512)
    );
    // The source of the current attempt still writes, through both write paths.
    expect_applied_write(&t, &mut source, 0x21, 0, 4096).await;
    expect_applied_write(&t, &mut source, 0x22, 8192, QUEUED).await;

    // The candidate's DISC completes nothing.
    other
        .send(&header(Command::Disconnect, 0, 0x15, 0, 0))
        .await;
    other.expect_eof().await;
    t.settle().await;
    t.expect_no_event().await;
    let status = t.status().await;
    assert!(!status.has_control, "a candidate's DISC took control");
    assert_eq!((status.phase, status.attempt), ("receiving", 1));
    expect_applied_write(&t, &mut source, 0x23, 16384, 512).await;
}

/// Besides the current connection, at most MAX_CANDIDATES are admitted; one that leaves
/// makes room for another.
#[actix::test]
async fn candidates_are_bounded() {
    let t = Target::start(MIB);
    let _source = t.join(A, 1).await;
    let mut candidates = Vec::new();
    for _ in 0..MAX_CANDIDATES {
        candidates.push(t.connect().await);
    }
    expect_no_hello(t.addr).await;
    let mut gone = candidates.pop().expect("a candidate");
    gone.send(&header(Command::Disconnect, 0, 1, 0, 0)).await;
    gone.expect_eof().await;
    t.settle().await;
    t.connect().await;
}

/// A newer attempt's Join fences the older connection: it is closed, and a WRITE of it
/// that was on its way (its header read, its payload late, as over a path that heals after
/// the source gave it up) is refused by the gate, never applied.
#[actix::test]
async fn a_newer_attempt_fences_the_older_connection() {
    let t = Target::start(MIB);
    let mut old = t.join(A, 1).await;
    expect_applied_write(&t, &mut old, 0x11, 0, 4096).await;

    let late_at = 64 * 1024;
    let before = t.export.contents(late_at, 4096);
    let late = write_req(0x12, late_at, &marker(0x12, 4096));
    let split = COMPACT_REQUEST_LEN + 1000;
    old.send(&late[..split]).await;
    sleep(QUIET).await;

    let mut new = t.join(A, 2).await;
    assert_eq!(t.status().await.attempt, 2);
    // Joined was answered: the older connection has lost the right to write.
    old.send(&late[split..]).await;
    let reply = old.reply().await;
    assert_eq!(
        (reply.cookie, reply.error),
        (0x12, Errno::EPERM.0),
        "a fenced connection's write"
    );
    old.expect_eof().await;
    assert_eq!(
        t.export.contents(late_at, 4096),
        before,
        "a fenced write is in the file"
    );
    expect_clients(&t, 1).await;
    expect_applied_write(&t, &mut new, 0x21, late_at, 4096).await;
}

/// A WRITE the older connection sends once the newer Join has been answered never reaches
/// the file, whether the closing session still reads it (refused) or not (closed).
#[actix::test]
async fn a_write_sent_after_the_newer_join_is_never_applied() {
    let t = Target::start(MIB);
    let mut old = t.join(A, 1).await;
    let mut new = t.join(A, 2).await;
    let at = 128 * 1024;
    let before = t.export.contents(at, 4096);
    // The session may already be gone: the send may fail.
    let _ = timeout(
        WAIT,
        old.sock
            .write_all(&write_req(0x31, at, &marker(0x31, 4096))),
    )
    .await;
    let mut buf = [0u8; SIMPLE_REPLY_LEN];
    match timeout(WAIT, old.sock.read_exact(&mut buf)).await {
        Err(_) => panic!("the fenced connection was not closed"),
        Ok(Err(_)) => {}
        Ok(Ok(_)) => {
            let reply = decode_simple_reply(&buf).expect("a reply");
            assert_eq!((reply.cookie, reply.error), (0x31, Errno::EPERM.0));
            old.expect_eof().await;
        }
    }
    assert_eq!(
        t.export.contents(at, 4096),
        before,
        "a fenced write is in the file"
    );
    expect_applied_write(&t, &mut new, 0x32, at, 4096).await;
}

#[actix::test]
async fn a_stale_join_is_refused_and_its_connection_closed() {
    let t = Target::start(MIB);
    let mut current = t.join(A, 2).await;
    for (attempt, cookie) in [(1, 0x41), (2, 0x42)] {
        let mut stale = t.connect().await;
        stale.probe(cookie).await;
        let join = HandoffRequest::Join {
            id: A,
            attempt,
            purpose: JoinPurpose::Copy,
        };
        let reply = stale.handoff(cookie + 0x100, &join).await;
        assert!(
            matches!(reply, HandoffReply::Refused { .. }),
            "attempt {attempt} after attempt 2: {reply:?}"
        );
        stale.expect_eof().await;
    }
    assert_eq!(t.status().await.attempt, 2);
    expect_applied_write(&t, &mut current, 0x43, 0, 4096).await;

    // A new migration supersedes this one; a late Join of the old one is refused, even
    // with a higher attempt.
    let mut newer = t.join(B, 1).await;
    current.expect_eof().await;
    let mut late = t.connect().await;
    let join = HandoffRequest::Join {
        id: A,
        attempt: 50,
        purpose: JoinPurpose::Commit,
    };
    let reply = late.handoff(0x44, &join).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    late.expect_eof().await;
    expect_applied_write(&t, &mut newer, 0x45, 4096, 4096).await;
}

#[actix::test]
async fn after_prepare_the_current_connection_may_not_write() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    expect_applied_write(&t, &mut source, 0x51, 0, 4096).await;
    let prepare = HandoffRequest::Prepare { id: A, size: MIB };
    assert_eq!(
        source.handoff(0x52, &prepare).await,
        HandoffReply::Prepared { id: A }
    );
    assert_eq!(t.status().await.phase, "prepared");
    expect_refused_write(&t, &mut source, 0x53, 4096, 4096).await;
    expect_refused_write(&t, &mut source, 0x54, 8192, QUEUED).await;
    expect_refused_zeroes(&t, &mut source, 0x55, 512 * 1024, 4096).await;
    assert!(!t.status().await.has_control);
    t.expect_no_event().await;
}

#[actix::test]
async fn commit_after_prepare_takes_control_exactly_once() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    let mut candidate = t.connect().await;
    expect_applied_write(&t, &mut source, 0x61, 0, 4096).await;
    let prepare = HandoffRequest::Prepare { id: A, size: MIB };
    assert_eq!(
        source.handoff(0x62, &prepare).await,
        HandoffReply::Prepared { id: A }
    );
    // Only the current connection commits.
    let commit = HandoffRequest::Commit { id: A };
    let reply = candidate.handoff(0x63, &commit).await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    t.expect_no_event().await;
    assert!(!t.status().await.has_control);

    assert_eq!(
        source.handoff(0x64, &commit).await,
        HandoffReply::Committed { id: A }
    );
    t.expect_event(ServerEvent::MigrationReceived).await;
    let status = t.status().await;
    assert!(status.has_control);
    assert_eq!(status.phase, "committed");
    // A resent Commit gets the same answer and takes control no second time.
    assert_eq!(
        source.handoff(0x65, &commit).await,
        HandoffReply::Committed { id: A }
    );
    t.expect_no_event().await;
    // This server has control: every connection may write; nobody new is admitted.
    expect_applied_write(&t, &mut source, 0x66, 4096, 4096).await;
    expect_applied_write(&t, &mut candidate, 0x67, 8192, 4096).await;
    expect_no_hello(t.addr).await;
    // Shutting down now reports control taken.
    let taken = timeout(WAIT, t.inbound.send(StopInbound))
        .await
        .expect("StopInbound not answered")
        .expect("the inbound actor's mailbox is closed");
    assert!(taken);
}

#[actix::test]
async fn commit_without_prepare_answers_not_prepared() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    let commit = HandoffRequest::Commit { id: A };
    assert_eq!(
        source.handoff(0x71, &commit).await,
        HandoffReply::NotPrepared { id: A }
    );
    t.expect_no_event().await;
    let status = t.status().await;
    assert!(!status.has_control);
    assert_eq!(status.phase, "receiving");
    // Nothing changed: the source may still write.
    expect_applied_write(&t, &mut source, 0x72, 0, 4096).await;

    // A restarted destination: the source in doubt joins to resend Commit.
    let mut t = Target::start(MIB);
    let mut source = t.connect().await;
    source.probe(0x73).await;
    let join = HandoffRequest::Join {
        id: A,
        attempt: 9,
        purpose: JoinPurpose::Commit,
    };
    assert_eq!(
        source.handoff(0x74, &join).await,
        HandoffReply::Joined { id: A, attempt: 9 }
    );
    assert_eq!(
        source.handoff(0x75, &commit).await,
        HandoffReply::NotPrepared { id: A }
    );
    t.expect_no_event().await;
    assert!(!t.status().await.has_control);
}

/// A signal: StopInbound answers that control was not taken, and from then on nothing
/// takes it, and nothing is written.
#[actix::test]
async fn stop_inbound_before_control_answers_false_and_refuses_the_commit() {
    let mut t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    let prepare = HandoffRequest::Prepare { id: A, size: MIB };
    assert_eq!(
        source.handoff(0x81, &prepare).await,
        HandoffReply::Prepared { id: A }
    );
    let taken = timeout(WAIT, t.inbound.send(StopInbound))
        .await
        .expect("StopInbound not answered")
        .expect("the inbound actor's mailbox is closed");
    assert!(!taken, "StopInbound says control was taken");
    let reply = source
        .handoff(0x82, &HandoffRequest::Commit { id: A })
        .await;
    assert!(matches!(reply, HandoffReply::Refused { .. }), "{reply:?}");
    t.expect_no_event().await;
    assert!(!t.status().await.has_control);
    expect_refused_write(&t, &mut source, 0x83, 0, 4096).await;
    expect_no_hello(t.addr).await;
}

/// While a migration of ours is received, an admitted connection that does not join
/// within JOIN_LIMIT is closed; the current one is not.
#[actix::test]
async fn a_candidate_that_does_not_join_in_time_is_closed() {
    let t = Target::start(MIB);
    let mut source = t.join(A, 1).await;
    let started = Instant::now();
    let mut idle = t.connect().await;
    let mut buf = [0u8; 16];
    let limit = JOIN_LIMIT + Duration::from_secs(2);
    match timeout(limit, idle.sock.read(&mut buf)).await {
        Err(_) => panic!("the candidate is still open after {limit:?}"),
        Ok(Ok(0)) => {}
        Ok(other) => panic!("expected EOF, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took + Duration::from_millis(500) >= JOIN_LIMIT,
        "closed after {took:?}, before the limit"
    );
    expect_clients(&t, 1).await;
    expect_applied_write(&t, &mut source, 0x91, 0, 4096).await;
}
