//! Starting `nbdkit` (the `file` plugin) as a destination for the end-to-end tests.
//!
//! nbdkit lives in a [`ChildGuard`] (SIGKILL and reaped on drop); every wait has a
//! deadline.

use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use super::cluster::LOCALHOST;
use super::*;

/// `nbdkit -f -i 127.0.0.1 -p PORT OPTIONS... file FILE` on a free loopback port, once it
/// accepts connections. `options` are nbdkit's own options before the plugin (for example
/// `--tls=require --tls-psk=...`, or `--filter=...`).
///
/// The port is only free a moment ago (see [`free_port`]), so a start that loses it to
/// another process is retried on another port: 5 attempts, each waiting at most 10 s for a
/// connection to be accepted. Panics if nbdkit could not be started.
pub fn start_nbdkit(options: &[String], file: &Path) -> (ChildGuard, u16) {
    (0..5)
        .find_map(|_| {
            let port = free_port();
            let mut cmd = tool("nbdkit");
            cmd.args(["-f", "-i", LOCALHOST, "-p", &port.to_string()])
                .args(options)
                .arg("file")
                .arg(file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = ChildGuard::new(cmd.spawn().expect("start nbdkit"));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect((LOCALHOST, port)).is_ok() {
                    return child.try_status().is_none().then_some((child, port));
                }
                if child.try_status().is_some() {
                    return None;
                }
                thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .expect("nbdkit could not start")
}
