//! The server driven by real NBD clients from the Debian packages (qemu-img, qemu-io,
//! nbdinfo, nbdcopy, nbdsh/libnbd): the compatibility that matters in production is with
//! these, not with our own client. Backing files live on ext4 (/tmp) and on tmpfs
//! (/dev/shm), because the server's I/O paths (RWF_NOWAIT reads, data syncs) behave
//! differently on the two.

mod support;

use std::collections::HashMap;
use std::fs;

use support::*;

const SIZE: usize = 32 * MIB;

/// qemu-img convert out of the server and back into it, comparing bytes both ways.
fn qemu_img_round_trip(dir: tempfile::TempDir) {
    let a = pattern(10, SIZE);
    let img = Image::with_data_in(dir, &a);
    let server = Server::start(&img.path, &[]);

    let out = img.sibling("out.raw");
    run_tool(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &server.uri()])
            .arg(&out),
        None,
        TOOL_TIMEOUT,
    )
    .assert_success("qemu-img convert from NBD");
    assert_same_bytes(&fs::read(&out).unwrap(), &a, "qemu-img copy of the export");

    // The other direction, with a zero region in the middle: qemu-img must not be able to
    // skip it (the server cannot zero), so the old data there has to be overwritten.
    let mut b = pattern(11, SIZE);
    b[5 * MIB..7 * MIB].fill(0);
    let src = img.sibling("src.raw");
    fs::write(&src, &b).unwrap();
    run_tool(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(server.uri()),
        None,
        TOOL_TIMEOUT,
    )
    .assert_success("qemu-img convert to NBD");
    assert_same_bytes(&img.contents(), &b, "export after qemu-img convert to it");
}

#[test]
fn qemu_img_convert_both_ways_on_ext4() {
    qemu_img_round_trip(disk_dir());
}

#[test]
fn qemu_img_convert_both_ways_on_tmpfs() {
    qemu_img_round_trip(shm_dir());
}

#[test]
fn qemu_io_pattern_write_read_and_flush() {
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, &[]);
    let out = run_tool(
        tool("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 65536",
            "-c",
            "read -P 0xab 4096 65536",
            "-c",
            "flush",
            &server.uri(),
        ]),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("qemu-io");
    let text = format!("{}{}", out.stdout_str(), out.stderr);
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification failed"),
        "qemu-io reported a failure:\n{text}"
    );
    assert!(
        text.contains("wrote 65536/65536"),
        "no write report:\n{text}"
    );
    assert!(text.contains("read 65536/65536"), "no read report:\n{text}");

    let file = img.contents();
    assert_filled(&file[4096..4096 + 65536], 0xab, "the written range");
    assert_filled(&file[..4096], 0, "bytes before the write");
    assert_filled(&file[4096 + 65536..], 0, "bytes after the write");

    // The pattern check is real: a wrong pattern is reported.
    let wrong = run_tool(
        tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xcd 4096 65536", &server.uri()]),
        None,
        TOOL_TIMEOUT,
    );
    let text = format!("{}{}", wrong.stdout_str(), wrong.stderr);
    assert!(
        text.contains("Pattern verification failed"),
        "qemu-io should have noticed the wrong pattern:\n{text}"
    );
}

/// The value of `"key": value` in nbdinfo's JSON (flat scan, enough for its output).
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('"'))
}

#[test]
fn nbdinfo_reports_size_flags_and_oldstyle() {
    // 20 MiB + 300 bytes: the export is rounded down to 20 MiB.
    let img = Image::with_data(&pattern(12, 20 * MIB + 300));
    let server = Server::start(&img.path, &[]);

    let out = run_tool(
        tool("nbdinfo").args(["--json", &server.uri()]),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("nbdinfo --json");
    let json = out.stdout_str();
    let expect: HashMap<&str, &str> = [
        ("protocol", "oldstyle"),
        ("export-size", "20971520"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_trim", "false"),
        ("can_zero", "false"),
        ("is_read_only", "false"),
    ]
    .into_iter()
    .collect();
    for (key, value) in expect {
        assert_eq!(json_value(&json, key), Some(value), "{key} in\n{json}");
    }

    let plain = run_tool(tool("nbdinfo").arg(server.uri()), None, TOOL_TIMEOUT);
    plain.assert_success("nbdinfo");
    let text = plain.stdout_str();
    let protocol = text
        .lines()
        .find(|l| l.starts_with("protocol:"))
        .unwrap_or_else(|| panic!("no protocol line in\n{text}"));
    assert!(protocol.contains("oldstyle"), "{protocol}");
}

#[test]
fn nbdcopy_both_ways() {
    let a = pattern(13, SIZE);
    let img = Image::with_data(&a);
    let server = Server::start(&img.path, &[]);

    let out = img.sibling("out.raw");
    run_tool(
        tool("nbdcopy").arg(server.uri()).arg(&out),
        None,
        TOOL_TIMEOUT,
    )
    .assert_success("nbdcopy from NBD");
    assert_same_bytes(&fs::read(&out).unwrap(), &a, "nbdcopy of the export");

    let mut b = pattern(14, SIZE);
    b[MIB..3 * MIB].fill(0);
    let src = img.sibling("src.raw");
    fs::write(&src, &b).unwrap();
    run_tool(
        tool("nbdcopy").arg(&src).arg(server.uri()),
        None,
        TOOL_TIMEOUT,
    )
    .assert_success("nbdcopy to NBD");
    assert_same_bytes(&img.contents(), &b, "export after nbdcopy to it");
}

/// Parses the `name=value` lines a script printed.
fn results(stdout: &str) -> HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn nbdsh_sees_exact_error_codes_and_the_connection_survives() {
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, &[]);
    // libnbd checks bounds and advertised commands itself unless strict mode is off, so
    // the script makes its own handle and turns that off before connecting.
    let script = format!(
        r#"
import errno, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri("{uri}")
size = h.get_size()
print("size=%d" % size)

def code(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        n = e.errno
        return n if isinstance(n, int) else getattr(errno, n)

print("read_past_end=%d" % code(lambda: h.pread(512, size)))
print("read_straddling_end=%d" % code(lambda: h.pread(1024, size - 512)))
print("write_past_end=%d" % code(lambda: h.pwrite(b"x" * 4096, size - 512)))
print("read_overflow=%d" % code(lambda: h.pread(512, 2**64 - 256)))
print("trim=%d" % code(lambda: h.trim(4096, 0)))
print("zero=%d" % code(lambda: h.zero(4096, 0)))
h.pwrite(b"after-errors" * 100, 8192)
print("read_back_ok=%d" % (h.pread(1200, 8192) == b"after-errors" * 100))
print("flush=%d" % code(lambda: h.flush()))
h.shutdown()
"#,
        uri = server.uri()
    );
    let out = nbdsh(&script);
    out.assert_success("nbdsh script");
    let r = results(&out.stdout_str());
    let get = |k: &str| {
        r.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} in the nbdsh output:\n{}", out.stdout_str()))
    };
    assert_eq!(get("size"), (16 * MIB).to_string());
    assert_eq!(get("read_past_end"), "28", "ENOSPC for a READ past the end");
    assert_eq!(get("read_straddling_end"), "28");
    assert_eq!(
        get("write_past_end"),
        "28",
        "ENOSPC for a WRITE past the end"
    );
    assert_eq!(
        get("read_overflow"),
        "28",
        "ENOSPC for an overflowing offset"
    );
    assert_eq!(get("trim"), "22", "EINVAL for TRIM");
    assert_eq!(get("zero"), "22", "EINVAL for WRITE_ZEROES");
    assert_eq!(
        get("read_back_ok"),
        "1",
        "the connection must work after errors"
    );
    assert_eq!(get("flush"), "0");
    let file = img.contents();
    assert_eq!(&file[8192..8192 + 12], b"after-errors");
    assert_filled(
        &file[16 * MIB - 512..],
        0,
        "the rejected write must not touch the file",
    );
}

#[test]
fn fio_verifies_pipelined_random_writes_from_several_connections() {
    // Small writes: the server does them on the session's thread.
    fio_verify(&[], "4k-64k");
}

#[test]
fn fio_verifies_long_multi_part_writes_without_polling() {
    // Writes up to 1 MiB: the server reads them in 256 KiB parts into exact buffers and
    // writes them on its write thread (with write-behind); no busy polling between requests.
    fio_verify(&["--busy-poll", "0"], "128k-1m");
}

/// fio's nbd engine keeps 32 requests in flight per connection and checks every block it
/// wrote (crc32c headers); four jobs, one connection each, on disjoint 4 MiB regions.
fn fio_verify(server_args: &[&str], bsrange: &str) {
    let img = Image::zeroed(16 * MIB);
    let server = Server::start(&img.path, server_args);
    let out = run_tool(
        tool("fio")
            .args([
                "--name=e2e",
                "--ioengine=nbd",
                &format!("--uri={}", server.uri()),
                "--rw=randwrite",
                &format!("--bsrange={bsrange}"),
                "--size=4M",
                "--numjobs=4",
                "--offset_increment=4M",
                "--iodepth=32",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--group_reporting",
                // No verify state files (fio writes them to its working directory otherwise).
                "--verify_state_save=0",
            ])
            .current_dir(img.dir.path()),
        None,
        TOOL_TIMEOUT,
    );
    out.assert_success("fio");
    let text = out.stdout_str();
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    assert!(
        !text.contains("verify:"),
        "fio reported a verify problem:\n{text}"
    );
    // fio really wrote through the server: the file is no longer all zeroes.
    let file = img.contents();
    for region in file.chunks(4 * MIB) {
        assert!(region != vec![0u8; 4 * MIB], "a job wrote nothing");
    }
}
