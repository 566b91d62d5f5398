//! `flexnbd-proxy`: see [`flexnbd::proxy`] and `docs/proxy.md`.

fn main() {
    let code = flexnbd::proxy::main(std::env::args_os().skip(1).collect());
    std::process::exit(code);
}
