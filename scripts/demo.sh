#!/usr/bin/env bash
# The main job on sample data: build flexnbd, serve a sample disk image, migrate it live to a
# second server while a client keeps writing to it, and check that the destination — now
# serving on the address the source used — holds every write the source acknowledged.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
echo "== Building flexnbd (cargo build --release: about a minute the first time, seconds after)"
cargo build --release --bin flexnbd
flexnbd=$(realpath "${CARGO_TARGET_DIR:-target}")/release/flexnbd

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# What the source's migration_phase means (docs/migration.md has the state machine).
explain_phase() {
    case "$1" in
        connecting) echo "the source is connecting to the destination" ;;
        sweep) echo "the source is copying every block once: data as writes, holes as zero ranges" ;;
        copying) echo "the source copies again, pass after pass, the blocks the client wrote meanwhile" ;;
        final_pass) echo "clients are shut out; the source sends the last blocks written" ;;
        handing_off) echo "the destination makes the copy durable before it may take over" ;;
        in_doubt) echo "the source sent Commit: control is passing to the destination" ;;
        completed) echo "the destination has control; the source exits" ;;
        retrying) echo "an attempt failed; the source starts again from scratch" ;;
        *) echo "" ;;
    esac
}

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "timed out waiting for $1" >&2; exit 1; }

echo "== A 256 MiB sample image: 32 MiB of random data in four places, the rest holes"
truncate -s 256M source.img
for at in 0 64 128 192; do head -c 8M /dev/urandom | dd of=source.img bs=1M seek=$at conv=notrunc status=none; done
truncate -s 256M destination.img
src_port=$(free_port); dst_port=$(free_port)

echo "== Source: flexnbd serve on 127.0.0.1:$src_port"
"$flexnbd" serve --addr 127.0.0.1 --port "$src_port" --file source.img --sock source.sock -v 2>source.log &
source_pid=$!; pids+=("$source_pid")
echo "== Destination: flexnbd listen on 127.0.0.1:$dst_port, to serve on :$src_port afterwards"
"$flexnbd" listen --addr 127.0.0.1 --port "$dst_port" --file destination.img --sock destination.sock \
    --rebind-addr 127.0.0.1 --rebind-port "$src_port" -v 2>destination.log &
dest_pid=$!; pids+=("$dest_pid")
wait_for source.sock; wait_for destination.sock

echo "== A client writes 64 KiB blocks to the source while it migrates"
(
    i=0
    while [ $i -lt 2000 ]; do
        head -c 65536 /dev/urandom > "block.$i"
        # Once the final pass closes the source to clients, the write is refused: the loop ends.
        if "$flexnbd" write --addr 127.0.0.1 --port "$src_port" --from $((i * 131072)) --size 65536 -q < "block.$i" 2>/dev/null; then
            echo "$i" >> acknowledged
        else
            rm -f "block.$i"
            break
        fi
        i=$((i + 1))
    done
) &
writer=$!
sleep 0.5

echo "== flexnbd mirror (bandwidth limited to 32 MiB/s so the writer overlaps the copy)"
"$flexnbd" mirror --sock source.sock --addr 127.0.0.1 --port "$dst_port" | sed 's/^/   flexnbd mirror: /'
echo "      -> the source reached the destination, checked that the sizes match, and started copying"
"$flexnbd" mirror-speed --sock source.sock --max-speed $((32 << 20)) | sed 's/^/   flexnbd mirror-speed: /'
echo "      -> the bandwidth limit is in force"
echo "   The source's status every half second (flexnbd status --sock source.sock):"
echo "   migration_phase: what the source is doing; migration_bytes_sent: data the destination"
echo "   acknowledged; migration_bytes_zeroed: holes sent as zero ranges (no data on the wire);"
echo "   migration_passes: passes over the blocks written during the copy."
for _ in $(seq 6); do
    line=$("$flexnbd" status --sock source.sock 2>/dev/null) || break
    keys=$(echo "$line" | tr ' ' '\n' | grep -E '^migration_(phase|bytes_sent|bytes_zeroed|passes)=' | tr '\n' ' ')
    key() { echo "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
    phase=$(key migration_phase)
    mib() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
    echo "   $keys"
    echo "      -> $phase: $(explain_phase "$phase")"
    echo "         ($(mib "$(key migration_bytes_sent)") of data and $(mib "$(key migration_bytes_zeroed)") of holes so far)"
    sleep 0.5
done
status=0
wait "$source_pid" || status=$?
[ "$status" = 0 ] || { cat source.log; echo "the source exited with status $status" >&2; exit 1; }
wait "$writer" || true
echo "   the source handed over and exited 0; $(wc -l < acknowledged) writes were acknowledged"

echo "== The destination took control and serves on :$src_port"
for _ in $(seq 100); do
    "$flexnbd" status --sock destination.sock 2>/dev/null | grep -q 'rebind=serving' && break
    sleep 0.1
done
"$flexnbd" status --sock destination.sock | tr ' ' '\n' | grep -E '^(has_control|handoff_phase|rebind)=' | sed 's/^/   /'
echo "   has_control=true: the destination holds every acknowledged write and accepts writes;"
echo "   handoff_phase=committed: it received the source's Commit; rebind=serving: it serves the"
echo "   file on the address the source used. nbdinfo (libnbd) connects there and sees:"
nbdinfo "nbd://127.0.0.1:$src_port" | sed -n '1,3p' | sed 's/^/   /'

echo "== Every acknowledged write is on the destination, and every other byte too"
cp source.img expected.img 2>/dev/null || true
while read -r i; do
    dd if="block.$i" of=expected.img bs=65536 seek=$((i * 2)) conv=notrunc status=none
done < acknowledged
qemu-img convert -f raw -O raw "nbd://127.0.0.1:$src_port" served.img
cmp served.img expected.img
cmp destination.img expected.img
echo "   identical; allocated: source $(du -k source.img | cut -f1) KiB, destination $(du -k destination.img | cut -f1) KiB"

echo "== SIGTERM: the destination flushes and exits 0"
kill -TERM "$dest_pid"
status=0
wait "$dest_pid" || status=$?
[ "$status" = 0 ] || { cat destination.log; echo "the destination exited with status $status" >&2; exit 1; }
echo "Demo OK"
