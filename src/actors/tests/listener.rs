//! The listener actor with a real listening socket and loopback clients. Its sessions are
//! real sessions on the current arbiter (`arbiters` is empty).

use std::pin::pin;

use actix::prelude::*;
use tokio::time::{sleep, timeout, Instant};

use crate::acl::Acl;
use crate::actors::listener::{Listener, ListenerConfig, Shutdown};
use crate::protocol::request::Command;

use super::*;

const MIB: u64 = 1 << 20;

fn start_listener(acl: Acl, max_clients: usize, export: &Export) -> (Addr<Listener>, SocketAddr) {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    let addr = socket.local_addr().expect("local addr");
    let listener = Listener::new(
        socket,
        ListenerConfig {
            acl,
            max_clients,
            session: export.config.clone(),
            arbiters: vec![],
        },
    )
    .start();
    (listener, addr)
}

/// A connection the listener turned away: closed before any byte (a connect refused by
/// the kernel counts too).
async fn expect_turned_away(addr: SocketAddr) {
    let Ok(mut client) = Client::connect(addr, None).await else {
        return;
    };
    assert_eq!(
        client.bytes_before_close().await,
        Some(0),
        "a turned-away client must be closed with no hello"
    );
}

/// A FLUSH round trip: the connection is served.
async fn expect_served(client: &mut Client, cookie: u64) {
    client.send(&header(Command::Flush, 0, cookie, 0, 0)).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, 0));
}

#[actix::test]
async fn acl_rejects_before_the_hello() {
    let export = Export::new(MIB, Limits::default());
    let acl = Acl::parse(&["10.9.8.7", "192.168.0.0/16"], false).expect("acl");
    let (_listener, addr) = start_listener(acl, 16, &export);
    expect_turned_away(addr).await;
    expect_turned_away(addr).await;

    // The same listener shape admits a matching peer.
    let acl = Acl::parse(&["10.9.8.7", "127.0.0.0/8"], false).expect("acl");
    let (_listener, addr) = start_listener(acl, 16, &export);
    let mut client = Client::connect(addr, None).await.expect("connect");
    client.hello(&export).await;
    expect_served(&mut client, 1).await;

    // --default-deny with an empty list admits nobody.
    let acl = Acl::parse::<&str>(&[], true).expect("acl");
    let (_listener, addr) = start_listener(acl, 16, &export);
    expect_turned_away(addr).await;
}

#[actix::test]
async fn max_clients_turns_away_the_extra_client_until_a_slot_frees() {
    let export = Export::new(MIB, Limits::default());
    let (_listener, addr) = start_listener(Acl::default(), 1, &export);
    let mut first = Client::connect(addr, None).await.expect("connect");
    first.hello(&export).await;

    expect_turned_away(addr).await;
    // Turning one away did not disturb the one being served.
    expect_served(&mut first, 1).await;

    first.send(&header(Command::Disconnect, 0, 2, 0, 0)).await;
    first.expect_eof().await;
    drop(first);

    // The listener learns of the end asynchronously: poll, within a bound.
    let deadline = Instant::now() + WAIT;
    let mut next = loop {
        let client = Client::connect(addr, None).await.expect("connect");
        let mut byte = [0u8; 1];
        match timeout(QUIET, client.sock.peek(&mut byte)).await {
            Ok(Ok(1)) => break client,
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("a connection was neither served nor closed"),
        }
        assert!(
            Instant::now() < deadline,
            "no client was served after the first one left"
        );
        sleep(std::time::Duration::from_millis(20)).await;
    };
    next.hello(&export).await;
    expect_served(&mut next, 3).await;
    // And the limit still holds.
    expect_turned_away(addr).await;
}

#[actix::test]
async fn shutdown_refuses_new_clients_and_answers_once_every_session_ended() {
    let export = Export::new(16 * MIB, Limits::default());
    let (listener, addr) = start_listener(Acl::default(), 16, &export);

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
    slow.send(&read_req(0x91, 0, len)).await;
    sleep(QUIET).await;

    let mut done = pin!(listener.send(Shutdown));
    assert!(
        timeout(QUIET, &mut done).await.is_err(),
        "Shutdown was answered while a READ was still in flight"
    );
    // The listener has handled Shutdown by now: new connections are turned away.
    expect_turned_away(addr).await;
    assert!(
        timeout(QUIET, &mut done).await.is_err(),
        "Shutdown was answered while a READ was still in flight"
    );

    // The slow client gets its whole reply, then EOF; only then is Shutdown answered.
    let reply = slow.reply().await;
    assert_eq!((reply.cookie, reply.error), (0x91, 0));
    let data = slow.read_exact(len as usize).await;
    assert!(data == pattern(0, len as usize), "the READ data differs");
    slow.expect_eof().await;
    timeout(WAIT, done)
        .await
        .expect("Shutdown not answered after every session ended")
        .expect("listener mailbox closed");

    // A second Shutdown waits for the same (already reached) moment.
    timeout(WAIT, listener.send(Shutdown))
        .await
        .expect("a second Shutdown was not answered")
        .expect("listener mailbox closed");
    expect_turned_away(addr).await;
}
