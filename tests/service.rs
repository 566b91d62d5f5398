//! Running flexnbd as a service: what an operator (or a supervisor) meets around the
//! server itself — one server per file, and the files and sockets a restart finds.

mod support;

use support::cluster::{mirror_cli, spawn_command, start_listen};
use support::*;

const SIZE: usize = 4 * MIB;

/// `flexnbd ARGS... -f FILE` run to its end (it must fail at startup).
fn failed_start(mode: &str, file: &std::path::Path, extra: &[&str]) -> ToolOutput {
    let mut args = vec![
        mode,
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "-f",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    flexnbd(&args, None)
}

fn assert_refused_for_the_lock(out: &ToolOutput, holder: u32) {
    assert_eq!(out.code(), Some(1), "{out:?}");
    let fatal = log_lines_at(&out.stderr, 'F');
    assert!(
        fatal
            .iter()
            .any(|l| l.contains("is already served") && l.contains(&format!("process {holder}"))),
        "no F line naming the holder {holder}:\n{}",
        out.stderr
    );
}

#[test]
fn a_second_server_on_the_same_file_is_refused() {
    let img = Image::zeroed(SIZE);
    let first = Server::start(&img.path, &[]);
    assert_refused_for_the_lock(&failed_start("serve", &img.path, &[]), first.pid());
    // listen locks its destination too: a migration into a file being served is refused.
    assert_refused_for_the_lock(&failed_start("listen", &img.path, &[]), first.pid());
    // The first server is untouched.
    let mut client = first.connect();
    client.write_at(0, &[7; 512]);
    assert_eq!(client.read_at(0, 512), vec![7; 512]);
    // Once it is gone, the file is free again.
    drop(client);
    drop(first);
    let again = Server::start(&img.path, &[]);
    assert_eq!(again.connect().read_at(0, 512), vec![7; 512]);
}

#[test]
fn a_listen_server_holds_its_file_against_a_serve() {
    let img = Image::zeroed(SIZE);
    let sock = img.sibling("dst.sock");
    let port = free_port();
    let dest = start_listen(&img.path, Some(&sock), port, &[]);
    assert_refused_for_the_lock(&failed_start("serve", &img.path, &[]), dest.pid());
}

#[test]
fn no_lock_lets_an_operator_share_a_file_and_read_only_servers_share_it() {
    let img = Image::zeroed(SIZE);
    let first = Server::start(&img.path, &[]);
    let shared = Server::start(&img.path, &["--no-lock"]);
    assert_eq!(shared.connect().read_at(0, 512), vec![0; 512]);
    drop(shared);
    drop(first);

    let reader = Server::start(&img.path, &["--read-only"]);
    let other_reader = Server::start(&img.path, &["--read-only"]);
    assert_eq!(other_reader.connect().read_at(0, 512), vec![0; 512]);
    // A writer is refused while readers hold it.
    let out = failed_start("serve", &img.path, &[]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("is already served"), "{}", out.stderr);
    drop((reader, other_reader));
}

/// A control socket that records the one request it gets and answers `answer`.
struct FakeControl {
    path: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
    _dir: tempfile::TempDir,
}

impl FakeControl {
    fn new() -> FakeControl {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        FakeControl {
            path,
            listener,
            _dir: dir,
        }
    }

    fn sock(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Nobody connected.
    fn untouched(&self) -> bool {
        matches!(self.listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Runs `flexnbd ARGS` while serving one request; returns its output and the lines.
    fn exchange(&self, args: &[&str], answer: &str) -> (ToolOutput, Vec<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = self.listener.try_clone().unwrap();
        let answer = answer.to_owned();
        let server = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(5))
                    }
                    Err(e) => panic!("no request: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            let mut lines = Vec::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\n" {
                    break;
                }
                lines.push(line.trim_end_matches('\n').to_owned());
            }
            (&stream).write_all(answer.as_bytes()).unwrap();
            lines
        });
        let out = flexnbd(args, None);
        (out, server.join().unwrap())
    }
}

#[test]
fn mirror_speed_takes_suffixes_and_refuses_garbage_before_sending() {
    let fake = FakeControl::new();
    let (out, lines) = fake.exchange(
        &["mirror-speed", "--sock", fake.sock(), "--max-speed", "10M"],
        "0: updated\n",
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(lines, ["mirror_max_bps", "10485760"]);

    for bad in ["abc", "-5", "10MB", "1.5G"] {
        let out = flexnbd(
            &["mirror-speed", "--sock", fake.sock(), "--max-speed", bad],
            None,
        );
        assert_eq!(out.code(), Some(1), "{bad}: {out:?}");
        assert!(
            out.stderr.contains("--max-speed must be"),
            "{bad}: {}",
            out.stderr
        );
        assert!(fake.untouched(), "{bad}: a request was sent");
    }
}

#[test]
fn port_zero_is_refused_as_a_mirror_target_before_sending() {
    let fake = FakeControl::new();
    let out = flexnbd(
        &[
            "mirror",
            "--sock",
            fake.sock(),
            "--addr",
            "127.0.0.1",
            "--port",
            "0",
        ],
        None,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--port must be"), "{}", out.stderr);
    assert!(fake.untouched(), "a request was sent");
}

#[test]
fn version_is_printed_by_every_spelling() {
    let expected = format!("flexnbd {}\n", env!("CARGO_PKG_VERSION"));
    for spelling in ["--version", "version", "-V"] {
        let out = flexnbd(&[spelling], None);
        assert_eq!(out.code(), Some(0), "{spelling}: {out:?}");
        assert_eq!(out.stdout_str(), expected, "{spelling}");
        assert!(out.stderr.is_empty(), "{spelling}: {}", out.stderr);
    }
    let help = flexnbd(&["help"], None);
    assert!(help.stdout_str().contains("flexnbd version"), "{help:?}");
}

#[test]
fn a_port_in_use_is_named_in_the_error() {
    let img = Image::zeroed(SIZE);
    let first = Server::start(&img.path, &[]);
    let other = Image::zeroed(SIZE);
    let port = first.port.to_string();
    let out = flexnbd(
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-f",
            other.path.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    let fatal = log_lines_at(&out.stderr, 'F');
    assert!(
        fatal
            .iter()
            .any(|l| l.contains(&format!("127.0.0.1:{port}")) && l.contains("in use")),
        "{}",
        out.stderr
    );
}

#[test]
fn a_failed_mirror_says_why_after_flexnbds_text() {
    let src = Image::zeroed(SIZE);
    let sock = src.sibling("src.sock");
    let _source = Server::start(&src.path, &["--sock", sock.to_str().unwrap()]);
    // A destination of another size.
    let small = Image::zeroed(SIZE / 2);
    let dest = Server::start(&small.path, &[]);
    let out = mirror_cli(&sock, dest.port, &[]);
    let port = dest.port;
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "Remote size does not match local size\n127.0.0.1:{port} exports {} bytes, we have {}\n",
            SIZE / 2,
            SIZE
        )
    );
}

/// Datagrams a fake service manager received, with when each arrived.
fn notify_socket(dir: &std::path::Path) -> std::os::unix::net::UnixDatagram {
    let socket = std::os::unix::net::UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    socket
}

fn next_datagram(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 10 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_notified_only_once_the_port_and_the_control_socket_accept() {
    use std::time::Duration;
    let img = Image::zeroed(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let manager = notify_socket(dir.path());
    let sock = dir.path().join("ctl.sock");
    let port = free_port();
    let mut cmd = std::process::Command::new(flexnbd_bin());
    cmd.args(["serve", "-l", "127.0.0.1", "-p", &port.to_string(), "-f"])
        .arg(&img.path)
        .arg("--sock")
        .arg(&sock)
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"));
    let mut server = spawn_command("127.0.0.1".parse().unwrap(), port, cmd);

    let ready = next_datagram(&manager);
    // At this moment, and not later, both must accept.
    let client = RawClient::greet(server.sockaddr());
    assert!(
        matches!(client, Greeting::Hello(_)),
        "READY=1 came before the port served: {client:?}"
    );
    let status = flexnbd(&["status", "--sock", sock.to_str().unwrap()], None);
    assert_eq!(
        status.code(),
        Some(0),
        "READY=1 came before the control socket: {status:?}"
    );
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(
        ready.contains("STATUS=Serving") && ready.contains(&format!("127.0.0.1:{port}")),
        "{ready:?}"
    );

    server.signal("TERM");
    let stopping = next_datagram(&manager);
    assert!(
        stopping.starts_with("STOPPING=1"),
        "nothing changed, so nothing but STOPPING=1 is sent: {stopping:?}"
    );
    assert_eq!(server.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_migration_is_reported_to_the_service_manager() {
    use std::time::{Duration, Instant};
    // Data, not holes: holes would go as zero ranges, at no bandwidth cost.
    let src = Image::with_data(&pattern(7, SIZE));
    let dst = Image::zeroed(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let manager = notify_socket(dir.path());
    let sock = dir.path().join("src.sock");
    let port = free_port();
    let mut cmd = std::process::Command::new(flexnbd_bin());
    cmd.args(["serve", "-l", "127.0.0.1", "-p", &port.to_string(), "-f"])
        .arg(&src.path)
        .arg("--sock")
        .arg(&sock)
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"));
    let mut source = spawn_command("127.0.0.1".parse().unwrap(), port, cmd);
    assert!(next_datagram(&manager).starts_with("READY=1"));
    let dst_port = free_port();
    let _dest = start_listen(&dst.path, None, dst_port, &[]);
    // Slow enough (about 4 s) for a few STATUS lines.
    let answer = control(
        &sock,
        "mirror",
        &[
            "127.0.0.1",
            &dst_port.to_string(),
            "exit",
            "0.0.0.0",
            "1000000",
            "background",
        ],
    );
    assert_eq!(answer, "0: Mirror started\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let text = next_datagram(&manager);
        let stopping = text.starts_with("STOPPING=1");
        seen.push(text);
        if stopping {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|t| t.starts_with("STATUS=Migrating: ") && t.contains("background")),
        "{seen:?}"
    );
    assert_eq!(
        source.wait_exit(Duration::from_secs(30)).code(),
        Some(0),
        "{seen:?}"
    );
}

/// The units in contrib/systemd are valid for systemd (`systemd-analyze verify`, with
/// ExecStart pointed at the binary under test). Skipped, saying so, where systemd's tools
/// are not installed.
#[test]
fn the_systemd_units_verify() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("systemd-analyze is not installed: the units are not verified here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let units = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    for unit in ["flexnbd@.service", "flexnbd-listen@.service"] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        assert!(text.contains("Type=notify"), "{unit}");
        let text = text
            .replace("/usr/local/bin/flexnbd", flexnbd_bin())
            .lines()
            .filter(|l| !l.starts_with("Documentation="))
            .collect::<Vec<_>>()
            .join("\n");
        let instance = unit.replace("@.", "@vm1.");
        std::fs::write(dir.path().join(&instance), text).unwrap();
        let out = std::process::Command::new(analyze)
            .arg("verify")
            .arg(dir.path().join(&instance))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains(&instance),
            "{unit}: {stderr}"
        );
    }
    let serve = std::fs::read_to_string(units.join("flexnbd@.service")).unwrap();
    assert!(serve.contains("Restart=on-failure") && serve.contains("RestartPreventExitStatus=3"));
}
