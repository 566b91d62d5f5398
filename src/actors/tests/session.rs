//! The session actor against a loopback client and a fake listener.

use std::collections::HashSet;

use actix::prelude::*;
use std::time::Duration;

use tokio::time::{sleep, timeout};

use crate::actors::session::{Close, CloseReason, Session};
use crate::protocol::cflags;
use crate::protocol::handshake::OldstyleHello;
use crate::protocol::request::Command;
use crate::protocol::{Errno, OLDSTYLE_HELLO_LEN};

use super::*;

const ID: u64 = 7;
const MIB: u64 = 1 << 20;

/// A started session, its client (hello already read and checked) and its fake listener.
struct Harness {
    client: Client,
    session: Addr<Session>,
    ends: Ends,
    export: Export,
}

impl Harness {
    async fn start(export: Export, rcvbuf: Option<u32>) -> Harness {
        let mut h = Harness::start_without_hello(export, rcvbuf).await;
        h.client.hello(&h.export).await;
        h
    }

    async fn start_without_hello(export: Export, rcvbuf: Option<u32>) -> Harness {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = server.local_addr().expect("local addr");
        let (accepted, client) = tokio::join!(
            timeout(WAIT, server.accept()),
            Client::connect(addr, rcvbuf)
        );
        let (stream, peer) = accepted.expect("accept timed out").expect("accept");
        let client = client.expect("connect");
        let socket = stream.into_std().expect("into_std");
        let ends = Ends::start();
        let session =
            Session::new(ID, peer, socket, export.config.clone(), ends.recipient()).start();
        Harness {
            client,
            session,
            ends,
            export,
        }
    }

    async fn close(&self) {
        timeout(WAIT, self.session.send(Close(CloseReason::Shutdown)))
            .await
            .expect("Close not answered within the wait")
            .expect("the session's mailbox is closed");
    }

    /// The client sees EOF, then the listener learns the end.
    async fn expect_end(&mut self, disconnect_seen: bool) {
        self.client.expect_eof().await;
        let end = self.ends.next().await;
        assert_eq!(end.id, ID);
        assert_eq!(end.disconnect_seen, disconnect_seen);
    }
}

#[actix::test]
async fn hello_is_sent_first_and_alone() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start_without_hello(export, None).await;
    let hello: [u8; OLDSTYLE_HELLO_LEN] = h
        .client
        .read_exact(OLDSTYLE_HELLO_LEN)
        .await
        .try_into()
        .expect("152 bytes");
    assert_eq!(
        OldstyleHello::decode(&hello),
        Ok(OldstyleHello {
            size: MIB,
            flags: tflags::FLEXNBD_COMPAT
        })
    );
    // Nothing follows until the client asks.
    h.client.expect_quiet().await;
    h.ends.none_yet().await;
}

#[actix::test]
async fn pipelined_writes_reads_and_flushes_are_answered_by_cookie() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start(export, None).await;
    let a = marker(1, 4096);
    let b = marker(2, 1000);
    let c = marker(3, 512);
    // Reads touch only ranges no write in the same batch touches: requests in flight
    // are not ordered against each other.
    let mut batch = write_req(0x11, 0, &a);
    batch.extend(read_req(0x12, 16384, 4096));
    batch.extend(write_req(0x13, 8192 + 3, &b));
    batch.extend(header(Command::Flush, 0, 0x14, 0, 0));
    batch.extend(read_req(0x15, 4096, 100));
    let mut fua = header(Command::Write, cflags::FUA, 0x16, 65536, c.len() as u64);
    fua.extend_from_slice(&c);
    batch.extend(fua);
    batch.extend(read_req(0x17, MIB - 512, 512));
    h.client.send(&batch).await;

    let answers = h
        .client
        .answers(&[
            (0x11, 0),
            (0x12, 4096),
            (0x13, 0),
            (0x14, 0),
            (0x15, 100),
            (0x16, 0),
            (0x17, 512),
        ])
        .await;
    for (cookie, answer) in &answers {
        assert_eq!(answer.error, 0, "cookie {cookie:#x}");
    }
    assert_eq!(answers[&0x12].data, pattern(16384, 4096));
    assert_eq!(answers[&0x15].data, pattern(4096, 100));
    assert_eq!(answers[&0x17].data, pattern(MIB - 512, 512));

    // The file holds the writes and nothing else changed around them.
    assert_eq!(h.export.contents(0, 4096), a);
    assert_eq!(h.export.contents(4096, 4099), pattern(4096, 4099));
    assert_eq!(h.export.contents(8192 + 3, 1000), b);
    assert_eq!(
        h.export.contents(8192 + 1003, 65536 - 9195),
        pattern(8192 + 1003, 65536 - 9195)
    );
    assert_eq!(h.export.contents(65536, 512), c);

    // And the session reads back what it wrote.
    h.client.send(&read_req(0x18, 8192, 1010)).await;
    let answers = h.client.answers(&[(0x18, 1010)]).await;
    let mut expected = pattern(8192, 3);
    expected.extend_from_slice(&b);
    expected.extend(pattern(8192 + 1003, 7));
    assert_eq!(answers[&0x18].data, expected);
    h.client.expect_quiet().await;
}

#[actix::test]
async fn out_of_range_write_gets_enospc_and_its_payload_is_skipped() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start(export, None).await;
    let size = h.export.size();
    // Ends 3.5 KiB past the end; its payload must be read and thrown away, not taken
    // for the next header.
    let junk = marker(9, 4096);
    let mut batch = write_req(0x21, size - 512, &junk);
    // A READ past the end gets ENOSPC too (range check before type), and no data.
    batch.extend(read_req(0x22, size, 512));
    // An end that overflows 64 bits is out of range, not wrapped around.
    batch.extend(read_req(0x23, u64::MAX - 100, 512));
    // Empty requests: at the very end they are in range, one byte further they are not.
    batch.extend(header(Command::Write, 0, 0x26, size, 0));
    batch.extend(header(Command::Write, 0, 0x27, size + 1, 0));
    batch.extend(read_req(0x28, size, 0));
    h.client.send(&batch).await;
    let answers = h
        .client
        .answers(&[
            (0x21, 0),
            (0x22, 512),
            (0x23, 512),
            (0x26, 0),
            (0x27, 0),
            (0x28, 0),
        ])
        .await;
    assert_eq!(answers[&0x26].error, 0);
    assert_eq!(answers[&0x28].error, 0);
    for cookie in [0x21, 0x22, 0x23, 0x27] {
        assert_eq!(
            answers[&cookie].error,
            Errno::ENOSPC.0,
            "cookie {cookie:#x}"
        );
    }

    // The connection still works.
    let good = marker(4, 512);
    let mut batch = write_req(0x24, size - 512, &good);
    batch.extend(read_req(0x25, 0, 512));
    h.client.send(&batch).await;
    let answers = h.client.answers(&[(0x24, 0), (0x25, 512)]).await;
    assert_eq!(answers[&0x24].error, 0);
    assert_eq!(answers[&0x25].error, 0);
    assert_eq!(answers[&0x25].data, pattern(0, 512));
    assert_eq!(h.export.contents(size - 512, 512), good);
    assert_eq!(h.export.file_len(), size, "the file must not grow");
    h.client.expect_quiet().await;
}

#[actix::test]
async fn unknown_and_unsupported_types_get_einval() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start(export, None).await;
    let mut batch = header(Command::Unknown(99), 0, 0x31, 0, 0);
    batch.extend(header(Command::Trim, 0, 0x32, 0, 4096));
    // Out of range comes first, even for an unknown type.
    batch.extend(header(Command::Unknown(99), 0, 0x33, MIB, 4096));
    // No payload is consumed for an unknown type: the next header follows at once.
    batch.extend(header(Command::Flush, 0, 0x34, 0, 0));
    h.client.send(&batch).await;
    let answers = h
        .client
        .answers(&[(0x31, 0), (0x32, 0), (0x33, 0), (0x34, 0)])
        .await;
    assert_eq!(answers[&0x31].error, Errno::EINVAL.0);
    assert_eq!(answers[&0x32].error, Errno::EINVAL.0);
    assert_eq!(answers[&0x33].error, Errno::ENOSPC.0);
    assert_eq!(answers[&0x34].error, 0);
    assert_eq!(h.export.contents(0, 8192), pattern(0, 8192));
    h.client.expect_quiet().await;
    h.ends.none_yet().await;
}

#[actix::test]
async fn bad_magic_is_answered_with_ebadmsg_then_the_session_ends() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start(export, None).await;
    // A WRITE still on its way to the file is answered too.
    let data = marker(12, 65536);
    let mut batch = write_req(0x01, 0, &data);
    let mut bad = header(Command::Read, 0, 0xfeed_f00d, 0, 512);
    bad[0] ^= 0x80;
    batch.extend(bad);
    h.client.send(&batch).await;
    let answers = h.client.answers(&[(0x01, 0), (0xfeed_f00d, 0)]).await;
    assert_eq!(answers[&0x01].error, 0);
    assert_eq!(answers[&0xfeed_f00d].error, Errno::EBADMSG.0);
    assert_eq!(h.export.contents(0, data.len()), data);
    // A bad magic is not a disconnect.
    h.expect_end(false).await;
}

#[actix::test]
async fn disconnect_answers_what_came_before_then_ends_the_session() {
    let export = Export::new(MIB, Limits::default());
    let mut h = Harness::start(export, None).await;
    let data = marker(5, 8192);
    let mut batch = write_req(0x41, 4096, &data);
    batch.extend(header(Command::Disconnect, 0, 0x42, 0, 0));
    h.client.send(&batch).await;
    let answers = h.client.answers(&[(0x41, 0)]).await;
    assert_eq!(answers[&0x41].error, 0);
    // No reply to the DISC itself.
    h.expect_end(true).await;
    assert_eq!(h.export.contents(4096, 8192), data);
}

#[actix::test]
async fn close_answers_a_request_in_flight_before_ending() {
    let export = Export::new(16 * MIB, Limits::default());
    let mut h = Harness::start(export, Some(SMALL_RCVBUF)).await;
    // 12 MiB cannot fit in the socket buffers (4 MiB at most) while the client does not
    // read: the READ stays in flight.
    let len = 12 * MIB;
    h.client.send(&read_req(0x51, MIB, len)).await;
    sleep(QUIET).await;
    h.close().await;
    // The session waits for the reply to be sent: it neither ends nor reports its end.
    h.ends.none_yet().await;

    let reply = h.client.reply().await;
    assert_eq!((reply.cookie, reply.error), (0x51, 0));
    let data = h.client.read_exact(len as usize).await;
    assert!(
        data == pattern(MIB, len as usize),
        "the READ data differs from the file"
    );
    h.expect_end(false).await;
}

/// flexnbd §5.5 step 6: "In-flight requests complete; a client stuck in the middle of a
/// payload delays shutdown". A WRITE whose header was read holds an in-flight slot (the
/// session's own definition of in flight), so Close must answer it, successfully or with
/// an error, before the connection ends.
#[actix::test]
async fn close_answers_a_write_whose_payload_is_still_arriving() {
    let limits = Limits {
        part_size: 4096,
        payload_budget: 4096,
        ..Limits::default()
    };
    let export = Export::new(MIB, limits);
    let mut h = Harness::start(export, None).await;
    let data = marker(6, 12288);
    let request = write_req(0x61, 8192, &data);
    // The header and one and a half parts now, the rest after the Close.
    let split = 28 + 6000;
    h.client.send(&request[..split]).await;
    sleep(QUIET).await;
    h.close().await;
    sleep(QUIET).await;
    // The server may already have closed; a failed send shows up as a missing reply.
    let _ = timeout(WAIT, h.client.sock.write_all(&request[split..])).await;

    let mut head = [0u8; SIMPLE_REPLY_LEN];
    let got = timeout(WAIT, h.client.sock.read_exact(&mut head)).await;
    match got {
        Err(_) => panic!("no reply and no close within the wait"),
        Ok(Err(e)) => panic!(
            "the WRITE (cookie 0x61) whose header arrived before Close was never answered: \
             the connection ended first ({e})"
        ),
        Ok(Ok(_)) => {}
    }
    let reply = decode_simple_reply(&head).expect("reply magic");
    assert_eq!(reply.cookie, 0x61);
    if reply.error == 0 {
        assert_eq!(h.export.contents(8192, data.len()), data);
    }
    h.expect_end(false).await;
}

/// With `max_in_flight` = 2, two READs whose replies cannot leave (the client does not
/// read) use both slots; the session must stop reading the socket, so a WRITE pipelined
/// behind them does not reach the file until the client drains the replies.
#[actix::test]
async fn a_client_that_stops_reading_stops_the_session_reading() {
    let limits = Limits {
        max_in_flight: 2,
        part_size: 256 << 10,
        payload_budget: MIB as usize,
        ..Limits::default()
    };
    let export = Export::new(24 * MIB, limits);
    let mut h = Harness::start(export, Some(SMALL_RCVBUF)).await;
    let len = 8 * MIB;
    let data = marker(7, 4096);
    let mut batch = read_req(0x71, 0, len);
    batch.extend(read_req(0x72, len, len));
    batch.extend(write_req(0x73, 20 * MIB, &data));
    batch.extend(header(Command::Flush, 0, 0x74, 0, 0));
    h.client.send(&batch).await;

    // Give the session ample time; the WRITE must stay unread.
    sleep(QUIET * 2).await;
    assert_eq!(
        h.export.contents(20 * MIB, 4096),
        pattern(20 * MIB, 4096),
        "the WRITE behind two blocked READs reached the file: the session kept reading \
         past max_in_flight"
    );

    // Draining the replies lets everything through, once each.
    let answers = h
        .client
        .answers(&[
            (0x71, len as usize),
            (0x72, len as usize),
            (0x73, 0),
            (0x74, 0),
        ])
        .await;
    for (cookie, answer) in &answers {
        assert_eq!(answer.error, 0, "cookie {cookie:#x}");
    }
    assert!(answers[&0x71].data == pattern(0, len as usize));
    assert!(answers[&0x72].data == pattern(len, len as usize));
    assert_eq!(h.export.contents(20 * MIB, 4096), data);
    h.client.expect_quiet().await;
}

/// A WRITE five times the part size, whose payload trickles in: written whole, in the
/// right place, answered exactly once.
#[actix::test]
async fn a_write_larger_than_a_part_is_written_and_answered_once() {
    let limits = Limits {
        part_size: 4096,
        payload_budget: 4096,
        ..Limits::default()
    };
    let export = Export::new(MIB, limits);
    let mut h = Harness::start(export, None).await;
    let data = marker(8, 5 * 4096 - 700);
    let offset = 1000;
    let request = write_req(0x81, offset, &data);
    for chunk in request.chunks(3001) {
        h.client.send(chunk).await;
        sleep(std::time::Duration::from_millis(10)).await;
    }
    h.client.send(&header(Command::Flush, 0, 0x82, 0, 0)).await;
    let answers = h.client.answers(&[(0x81, 0), (0x82, 0)]).await;
    assert_eq!(answers[&0x81].error, 0);
    assert_eq!(answers[&0x82].error, 0);
    h.client.expect_quiet().await;
    assert_eq!(h.export.contents(0, offset as usize), pattern(0, 1000));
    assert_eq!(h.export.contents(offset, data.len()), data);
    let end = offset + data.len() as u64;
    assert_eq!(h.export.contents(end, 4096), pattern(end, 4096));

    // Two large writes back to back, pipelined: each answered once.
    let d1 = marker(10, 3 * 4096 + 1);
    let d2 = marker(11, 2 * 4096);
    let mut batch = write_req(0x83, 65536, &d1);
    batch.extend(write_req(0x84, 131072, &d2));
    h.client.send(&batch).await;
    let answers = h.client.answers(&[(0x83, 0), (0x84, 0)]).await;
    let errors: HashSet<u32> = answers.values().map(|a| a.error).collect();
    assert_eq!(errors, HashSet::from([0]));
    assert_eq!(h.export.contents(65536, d1.len()), d1);
    assert_eq!(h.export.contents(131072, d2.len()), d2);
    h.client.expect_quiet().await;
}

/// flexnbd §11: the killswitch cuts off a request that makes no progress, never an idle
/// connection — right after the hello, or after a completed request. (The reader holds the
/// slot of the next request while it waits for its header; that slot is not a request.)
#[actix::test]
async fn the_killswitch_never_cuts_off_an_idle_client() {
    let limits = Limits {
        killswitch: Some(Duration::from_millis(500)),
        ..Limits::default()
    };
    let export = Export::new(MIB, limits);
    let mut h = Harness::start(export, None).await;
    // Idle after the hello for several killswitch periods (checked once a second).
    sleep(Duration::from_millis(2500)).await;
    h.client.send(&read_req(1, 0, 4096)).await;
    let reply = h.client.reply().await;
    assert_eq!((reply.cookie, reply.error), (1, 0));
    assert_eq!(h.client.read_exact(4096).await, pattern(0, 4096));
    // Idle after a completed request.
    sleep(Duration::from_millis(2500)).await;
    h.client.send(&read_req(2, 4096, 512)).await;
    let reply = h.client.reply().await;
    assert_eq!((reply.cookie, reply.error), (2, 0));
    assert_eq!(h.client.read_exact(512).await, pattern(4096, 512));
    h.ends.none_yet().await;
}

/// ... while a request that stalls half-way (a header cut short) is cut off.
#[actix::test]
async fn the_killswitch_cuts_off_a_stalled_request() {
    let limits = Limits {
        killswitch: Some(Duration::from_millis(500)),
        ..Limits::default()
    };
    let export = Export::new(MIB, limits);
    let mut h = Harness::start(export, None).await;
    let request = read_req(1, 0, 4096);
    h.client.send(&request[..10]).await;
    h.expect_end(false).await;
}
