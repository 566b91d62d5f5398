//! Starting `flexnbd-proxy` for the end-to-end tests, and the upstream servers it talks to.
//!
//! The proxy lives in a [`ChildGuard`] (SIGKILL and reaped on drop); its stderr is read on a
//! thread; every wait has a deadline.

use std::ffi::OsString;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::*;

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn proxy_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flexnbd-proxy")
}

/// A running `flexnbd-proxy -v`.
pub struct Proxy {
    child: ChildGuard,
    log: Arc<Mutex<Vec<u8>>>,
    /// Where clients connect (TCP), if it listens on TCP.
    pub addr: Option<SocketAddr>,
    /// The UNIX socket path, if it listens on one.
    pub path: Option<PathBuf>,
}

/// Reads `pipe` to its end on a thread into the returned buffer.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let text = Arc::new(Mutex::new(Vec::new()));
    let sink = text.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    text
}

impl Proxy {
    /// Spawns the proxy with `args` (`-v` is added) and `env`, without waiting.
    pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Proxy {
        let mut cmd = Command::new(proxy_bin());
        cmd.args(args)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = ChildGuard::new(cmd.spawn().expect("spawning flexnbd-proxy"));
        let log = drain(child.child_mut().stderr.take().expect("piped stderr"));
        Proxy {
            child,
            log,
            addr: None,
            path: None,
        }
    }

    /// A proxy on a free loopback port to `upstream`, started and listening.
    pub fn start(upstream: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
        let port = free_port();
        let mut args = upstream_args(upstream);
        args.extend(["--addr", "127.0.0.1", "--port"].map(String::from));
        args.push(port.to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proxy = Proxy::spawn(&args, env);
        proxy.wait_listening();
        proxy.addr = Some(SocketAddr::new(LOOPBACK, port));
        proxy
    }

    /// A proxy on the UNIX socket `path` to `upstream`, started and listening.
    pub fn start_unix(upstream: SocketAddr, path: &Path, extra: &[&str]) -> Proxy {
        let mut args = upstream_args(upstream);
        args.push("--addr".into());
        args.push(path.to_str().unwrap().into());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proxy = Proxy::spawn(&args, &[]);
        proxy.wait_listening();
        proxy.path = Some(path.to_owned());
        proxy
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.stderr().contains("Proxy listening on") {
            if let Some(status) = self.child.try_status() {
                panic!("flexnbd-proxy exited with {status}:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "flexnbd-proxy did not start listening:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sockaddr(&self) -> SocketAddr {
        self.addr.expect("a TCP proxy")
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}", self.sockaddr())
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// How many times the log holds `text`.
    pub fn count(&self, text: &str) -> usize {
        self.stderr().matches(text).count()
    }

    /// Waits until the log holds `text` at least `n` times.
    pub fn wait_log(&self, text: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(text) < n {
            assert!(
                Instant::now() < deadline,
                "the proxy never logged {text:?} {n} times within {timeout:?}; its log:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&mut self, name: &str) {
        self.child.signal(name);
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_status()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.child.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "the proxy did not exit within {timeout:?}; its log:\n{}",
                self.stderr()
            ),
        }
    }

    pub fn connect(&self) -> RawClient {
        RawClient::connect(self.sockaddr())
    }
}

fn upstream_args(upstream: SocketAddr) -> Vec<String> {
    vec![
        "--conn-addr".into(),
        upstream.ip().to_string(),
        "--conn-port".into(),
        upstream.port().to_string(),
    ]
}

/// `flexnbd serve -l 127.0.0.1 -p PORT -f FILE EXTRA... -v` on a chosen port (to restart a
/// server where the proxy expects it), waiting for its `Serving` line.
pub fn serve_on(port: u16, file: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<OsString> = vec!["serve".into(), "-l".into(), "127.0.0.1".into()];
    args.push("-p".into());
    args.push(port.to_string().into());
    args.push("-f".into());
    args.push(file.into());
    args.extend(extra.iter().map(OsString::from));
    args.push("-v".into());
    // The port was just released by a killed server: binding may need a moment.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match Server::launch(LOOPBACK, &args) {
            Ok(server) => return server,
            Err(e) if Instant::now() < deadline => {
                eprintln!("serve on {port} did not start, retrying: {e}");
                thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Runs fio's nbd engine against `uri` with `extra` job options; returns its output.
pub fn fio(uri: &str, dir: &Path, extra: &[&str]) -> ToolOutput {
    let mut cmd = tool("fio");
    cmd.args([
        "--name=proxy",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--thread",
        "--output-format=normal",
    ])
    .args(extra)
    .current_dir(dir);
    run_tool(&mut cmd, None, TOOL_TIMEOUT)
}

/// Panics unless fio finished without an error and without a verify failure.
pub fn assert_fio_ok(out: &ToolOutput, what: &str) {
    out.assert_success(what);
    let text = out.stdout_str();
    assert!(
        text.contains("err= 0"),
        "{what}: fio reported an error:\n{text}\n{}",
        out.stderr
    );
    assert!(
        !text.contains("verify:") && !out.stderr.contains("verify:"),
        "{what}: fio's verify failed:\n{text}\n{}",
        out.stderr
    );
}

/// qemu-io against `uri` with `commands` (each a `-c`); returns its output.
pub fn qemu_io(uri: &str, commands: &[&str]) -> ToolOutput {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    run_tool(&mut cmd, None, TOOL_TIMEOUT)
}

/// Panics unless qemu-io exited 0 without reporting a failed command.
pub fn assert_qemu_ok(out: &ToolOutput, what: &str) {
    out.assert_success(what);
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification"),
        "{what}: qemu-io reported a failure:\n{text}"
    );
}
