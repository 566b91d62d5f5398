//! The manual page checked in at `man/flexnbd.1` is the one the table of modes makes now
//! (`flexnbd help --man`), and groff formats it without a warning.

use std::path::PathBuf;
use std::process::Command;

const REGENERATE: &str = "cargo run -- help --man > man/flexnbd.1";

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("man/flexnbd.1")
}

fn generated() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flexnbd"))
        .args(["help", "--man"])
        .output()
        .expect("run flexnbd help --man");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout).expect("the page is UTF-8")
}

#[test]
fn the_checked_in_page_is_current() {
    let page = generated();
    assert_eq!(page, flexnbd::cli::man::flexnbd_page());
    let file = std::fs::read_to_string(checked_in()).unwrap_or_default();
    if file != page {
        let line = file
            .lines()
            .zip(page.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| file.lines().count().min(page.lines().count()));
        panic!(
            "man/flexnbd.1 differs from the generated page from line {}: the help texts \
             changed. Regenerate it with `{REGENERATE}` and commit it.",
            line + 1
        );
    }
}

#[test]
fn groff_formats_the_page_without_warnings() {
    // -ww: every warning; -z: no output, only the diagnostics.
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(checked_in())
        .output()
        .expect("groff (Debian: groff-base; scripts/install-deps.sh installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "groff: {stderr}");
}
