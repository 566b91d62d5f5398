//! The manual pages checked in under `man/` are the ones the option tables make now
//! (`flexnbd help --man [flexnbd-proxy]`), and groff formats them without a warning.

use std::path::PathBuf;
use std::process::Command;

/// The pages, with the arguments of `flexnbd help --man` that make each.
const PAGES: &[(&str, &[&str])] = &[("flexnbd.1", &[]), ("flexnbd-proxy.1", &["flexnbd-proxy"])];

fn checked_in(page: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("man")
        .join(page)
}

fn generated(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flexnbd"))
        .args(["help", "--man"])
        .args(args)
        .output()
        .expect("run flexnbd help --man");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout).expect("the page is UTF-8")
}

#[test]
fn the_checked_in_pages_are_current() {
    assert_eq!(generated(&[]), flexnbd::cli::man::flexnbd_page());
    assert_eq!(
        generated(&["flexnbd-proxy"]),
        flexnbd::proxy::options::man_page()
    );
    for (page, args) in PAGES {
        let text = generated(args);
        let file = std::fs::read_to_string(checked_in(page)).unwrap_or_default();
        if file != text {
            let line = file
                .lines()
                .zip(text.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| file.lines().count().min(text.lines().count()));
            panic!(
                "man/{page} differs from the generated page from line {}: the help texts \
                 changed. Regenerate it with `cargo run -- help --man {} > man/{page}` (or \
                 `make man`) and commit it.",
                line + 1,
                args.join(" ")
            );
        }
    }
}

#[test]
fn groff_formats_the_pages_without_warnings() {
    for (page, _) in PAGES {
        // -ww: every warning; -z: no output, only the diagnostics.
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(checked_in(page))
            .output()
            .expect("groff (Debian: groff-base; scripts/install-deps.sh installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "groff on {page}: {stderr}"
        );
    }
}
