#!/usr/bin/env python3
"""Compare flexnbd with qemu-nbd and nbdkit serving the same page-cached file.

Every server serves the same file, one server at a time. Trials are
interleaved: for each round, for each test, every server runs once, in an
order rotated from round to round, so that slow drifts of the machine (other
load, thermal state, page-cache state) hit every server alike instead of
landing on whichever server happened to run last. The figure reported per
(test, server) is the median over the rounds, and each flexnbd variant is
judged by its ratio to the best of the other servers.

Python 3 standard library only. See bench/README.md for how to read the
output. Run `python3 bench/bench.py --help` for the options.
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import random
import re
import select as select_mod  # `select` is this script's --only/--servers helper
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
MIB = 1 << 20

SERVER_START_TIMEOUT = 10.0  # seconds until a server must accept connections
SERVER_STOP_TIMEOUT = 15.0  # SIGTERM, then SIGKILL after this long
PROBE_SIZE = 4 * MIB  # size of the file served while probing each server


class BenchError(Exception):
    """A failure the user must see; the message says what went wrong."""


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived."""


# --------------------------------------------------------------------------
# Process handling. Every process we start is recorded in LIVE until it has
# been reaped, so that cleanup can stop exactly those (by pid, never by name).

LIVE: Dict[int, subprocess.Popen] = {}

_libc = None


def _die_with_parent():
    """preexec_fn: have the kernel SIGKILL the child if this script dies
    without running its cleanup (e.g. it is itself SIGKILLed)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def spawn(argv, stdout, stderr) -> subprocess.Popen:
    """Start argv in its own process group (so that Ctrl-C reaches only this
    script, which then stops the child in an orderly way)."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except OSError as e:
        raise BenchError("cannot run %s: %s" % (argv[0], e))
    LIVE[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen, term_timeout: float = SERVER_STOP_TIMEOUT) -> Optional[int]:
    """SIGTERM the process group of proc, SIGKILL it if it does not exit in
    time, and reap it. Returns the exit status. proc stays in LIVE until it
    has been reaped, so an interrupted stop() is finished by stop_all()."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=term_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    LIVE.pop(proc.pid, None)
    return proc.returncode


def stop_all():
    for proc in list(LIVE.values()):
        try:
            stop(proc, term_timeout=5)
        except Exception as e:  # keep going: stop every other one too
            print("warning: could not stop pid %d: %s" % (proc.pid, e), file=sys.stderr)


def run_client(argv, timeout: float, what: str) -> "tuple[float, str, str]":
    """Run a client to completion, bounded by timeout. Returns (wall-clock
    seconds, stdout, stderr). A non-zero exit is a BenchError."""
    t0 = time.monotonic()
    proc = spawn(argv, subprocess.PIPE, subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, term_timeout=2)
        raise BenchError("%s did not finish within %.0f s: %s" % (what, timeout, shlex.join(argv)))
    finally:
        stop(proc, term_timeout=2)  # only reaps it if it has exited
    elapsed = time.monotonic() - t0
    out = out.decode(errors="replace")
    err = err.decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(
            "%s failed (exit %s): %s\n%s" % (what, proc.returncode, shlex.join(argv), tail(out + err))
        )
    return elapsed, out, err


# --------------------------------------------------------------------------
# Busy host: CPU-bound processes beside the servers (--busy, --conditions).

CONDITIONS = ("quiet", "busy")  # in the order they run
BUSY_HOGS = 2  # CPU-bound processes in the busy condition
BUSY_NICE = 5
BUSY_ARGV = ["nice", "-n", str(BUSY_NICE), sys.executable, "-c", "while True: pass"]


class BusyHost:
    """Context manager: in the busy condition, BUSY_HOGS busy loops at nice
    BUSY_NICE run for as long as the block runs (a row's trials). They are
    started with spawn(), so they are in LIVE (stop_all() kills them on an
    error or Ctrl-C) and die with this script; on exit they are stopped."""

    def __init__(self, busy: bool):
        self.busy = busy
        self.procs: List[subprocess.Popen] = []

    def __enter__(self):
        if not self.busy:
            return self
        try:
            for _ in range(BUSY_HOGS):
                self.procs.append(spawn(BUSY_ARGV, subprocess.DEVNULL, subprocess.DEVNULL))
            time.sleep(0.2)  # let them get past the interpreter's start-up
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise BenchError("busy loop exited at once (status %s): %s"
                                 % (dead[0].returncode, shlex.join(BUSY_ARGV)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            stop(p, term_timeout=2)
        self.procs = []
        return False


# --------------------------------------------------------------------------
# Server CPU: utime + stime of the server, from /proc, around a client run.

CLK_TCK = os.sysconf("SC_CLK_TCK")


def session_cpu_ticks(sid: int) -> int:
    """utime + stime (fields 14, 15 of /proc/PID/stat: all threads of the
    process) of every process in session sid, that is the server (spawn()
    makes it a session leader) and any process it started, plus cutime +
    cstime (fields 16, 17) of the leader for children it has reaped."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3
        try:
            if int(fields[6 - 3]) != sid:
                continue
            total += int(fields[14 - 3]) + int(fields[15 - 3])
            if int(name) == sid:
                total += int(fields[16 - 3]) + int(fields[17 - 3])
        except (IndexError, ValueError):
            continue
    return total


def server_cpu(srv) -> float:
    """CPU seconds the running server (srv: a Running) has used so far."""
    return session_cpu_ticks(srv.proc.pid) / CLK_TCK


def cpu_info(cpu_s: float, requests: Optional[int] = None, mib_moved: Optional[float] = None):
    """Measurement.info entries for the server's CPU during a client run: per
    request when the number of requests is known, else per MiB moved."""
    info: Dict[str, object] = {"cpu_s": cpu_s}
    if requests:
        info.update(requests=requests, cpu_us=cpu_s * 1e6 / requests, cpu_unit="us/req")
    elif mib_moved:
        info.update(mib_moved=mib_moved, cpu_us=cpu_s * 1e6 / mib_moved, cpu_unit="us/MiB")
    return info


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + l for l in text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    """True when something on port answers with an NBD greeting. Reading the
    greeting before closing makes the close an orderly one (FIN, not RST), so
    the server logs a plain disconnect rather than an error."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as s:
            greeting = b""
            while len(greeting) < 8:
                chunk = s.recv(4096)
                if not chunk:
                    break
                greeting += chunk
            return greeting.startswith(b"NBDMAGIC")
    except OSError:
        return False


# --------------------------------------------------------------------------
# Servers. To add one, add an entry to SERVERS.
# role "candidate": judged by its ratio to the best "reference" server
# (against the row's target, or Server.target when set and higher).


@dataclass
class Server:
    id: str  # used with --servers and in table columns
    label: str  # how it is shown in the ratio rows
    role: str  # "candidate" or "reference"
    tool: Callable[["Ctx"], str]  # the executable (checked before running)
    argv: Callable[["Ctx", int, str], List[str]]  # (ctx, port, file) -> command line
    target: Optional[float] = None  # candidates: a floor under every row's target
    by_default: bool = True  # False: runs only when named in --servers
    # serves over TLS (x509, the credentials in ctx.tls_dir): runs only on the
    # TLS rows (Test.tls), which run only on TLS servers
    tls: bool = False


def flexnbd_argv(*extra):
    def argv(ctx, port, path):
        return [ctx.flexnbd, "serve", "-v", "-l", HOST, "-p", str(port), "-f", path, *extra]

    return argv


SERVERS = [
    Server("flexnbd", "flexnbd", "candidate", lambda c: c.flexnbd, flexnbd_argv()),
    Server(
        "flexnbd-sync",
        "flexnbd --sync-writes",
        "candidate",
        lambda c: c.flexnbd,
        flexnbd_argv("--sync-writes"),
    ),
    # Fixed new-style: structured replies, base:allocation block status,
    # multi-conn, trim/zero. Judged against the row's target, at least 1.0.
    Server(
        "flexnbd-newstyle",
        "flexnbd --newstyle",
        "candidate",
        lambda c: c.flexnbd,
        flexnbd_argv("--newstyle"),
        target=1.0,
    ),
    # Busy-polling variants, for choosing --busy-poll's default (run only when
    # named in --servers): never poll, and a long window.
    Server(
        "flexnbd-poll0",
        "flexnbd --busy-poll 0",
        "candidate",
        lambda c: c.flexnbd,
        flexnbd_argv("--busy-poll", "0"),
        by_default=False,
    ),
    Server(
        "flexnbd-poll500",
        "flexnbd --busy-poll 500",
        "candidate",
        lambda c: c.flexnbd,
        flexnbd_argv("--busy-poll", "500"),
        by_default=False,
    ),
    Server(
        "qemu-nbd",
        "qemu-nbd",
        "reference",
        lambda c: "qemu-nbd",
        lambda c, port, path: [
            "qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-x", "", "-t",
            "--shared=16", "--cache=writeback", "--aio=threads", path,
        ],
    ),
    Server(
        "nbdkit",
        "nbdkit",
        "reference",
        lambda c: "nbdkit",
        lambda c, port, path: ["nbdkit", "-f", "-i", HOST, "-p", str(port), "file", path],
    ),
]


# TLS servers (x509, --tls require): the TLS rows' columns. Credentials are
# made once per run by make_tls_credentials() in the work directory.
def flexnbd_tls_argv(ctx, port, path):
    return flexnbd_argv("--newstyle", "--tls", "require", "--tls-creds", ctx.tls_dir)(ctx, port, path)


SERVERS += [
    Server("flexnbd-tls", "flexnbd --newstyle --tls require", "candidate", lambda c: c.flexnbd,
           flexnbd_tls_argv, tls=True),
    Server(
        "qemu-nbd-tls",
        "qemu-nbd --tls-creds",
        "reference",
        lambda c: "qemu-nbd",
        lambda c, port, path: [
            "qemu-nbd", "-f", "raw", "-b", HOST, "-p", str(port), "-x", "", "-t",
            "--shared=16", "--cache=writeback", "--aio=threads",
            "--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=%s" % c.tls_dir,
            "--tls-creds", "tls0", path,
        ],
        tls=True,
    ),
    Server(
        "nbdkit-tls",
        "nbdkit --tls=require",
        "reference",
        lambda c: "nbdkit",
        lambda c, port, path: ["nbdkit", "-f", "-i", HOST, "-p", str(port), "--tls=require",
                               "--tls-certificates=%s" % c.tls_dir, "file", path],
        tls=True,
    ),
]


def nbd_uri(ctx, server: "Server", port) -> str:
    """libnbd's URI of a server: nbds:// with the run's CA for TLS servers."""
    if server.tls:
        return "nbds://%s:%s/?tls-certificates=%s" % (HOST, port, ctx.tls_dir)
    return "nbd://%s:%s" % (HOST, port)


# openssl configuration: the extensions GnuTLS (qemu-nbd, nbdkit, libnbd)
# insists on, as in src/tls/testing.rs. A config of our own, so that the
# system's openssl.cnf adds nothing.
TLS_REQ_CONF = """[req]
distinguished_name = dn
prompt = no
[dn]
O = flexnbd bench
CN = %s
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
TLS_LEAF_EXT = """basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = %s
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
%s"""


def make_tls_credentials(dir_path):
    """A CA, a server certificate for 127.0.0.1, ::1 and localhost, and a
    client certificate, made with the openssl CLI and laid out as qemu's
    tls-creds-x509, nbdkit's --tls-certificates, libnbd's tls-certificates and
    flexnbd's --tls-creds expect."""
    os.makedirs(dir_path, exist_ok=True)

    def path(name):
        return os.path.join(dir_path, name)

    def write(name, text):
        with open(path(name), "w") as f:
            f.write(text)

    def run(*argv):
        r = subprocess.run(["openssl", *argv], capture_output=True, timeout=60)
        if r.returncode != 0:
            raise BenchError("openssl %s failed: %s" % (shlex.join(argv), r.stderr.decode(errors="replace")))

    write("ca.cnf", TLS_REQ_CONF % "bench CA")
    run("req", "-x509", "-config", path("ca.cnf"), "-extensions", "ca", "-newkey", "rsa:2048", "-nodes",
        "-keyout", path("ca-key.pem"), "-out", path("ca-cert.pem"), "-days", "30")
    for leaf, usage, san in (("server", "serverAuth", "subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost\n"),
                             ("client", "clientAuth", "")):
        write("%s.cnf" % leaf, TLS_REQ_CONF % ("bench " + leaf))
        write("%s.ext" % leaf, TLS_LEAF_EXT % (usage, san))
        run("req", "-new", "-config", path("%s.cnf" % leaf), "-newkey", "rsa:2048", "-nodes",
            "-keyout", path("%s-key.pem" % leaf), "-out", path("%s.csr" % leaf))
        run("x509", "-req", "-in", path("%s.csr" % leaf), "-CA", path("ca-cert.pem"),
            "-CAkey", path("ca-key.pem"), "-CAcreateserial", "-days", "30",
            "-extfile", path("%s.ext" % leaf), "-out", path("%s-cert.pem" % leaf))


class Running:
    """Context manager: a server serving path on a fresh port, stopped (and
    reaped) on exit whatever happens."""

    def __init__(self, ctx: "Ctx", server: Server, path: str):
        self.ctx, self.server, self.path = ctx, server, path
        self.proc = None
        self.port = None

    def __enter__(self):
        last = ""
        for _attempt in range(3):  # the port may be taken between probe and bind
            self.port = free_port()
            argv = self.server.argv(self.ctx, self.port, self.path)
            log_path = os.path.join(self.ctx.workdir, "%s.log" % self.server.id)
            with open(log_path, "ab") as log:
                log.write(("\n=== %s %s\n" % (time.strftime("%H:%M:%S"), shlex.join(argv))).encode())
                log.flush()
                self.proc = spawn(argv, subprocess.DEVNULL, log)
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if accepts(self.port) and self.proc.poll() is None:
                    return self
                time.sleep(0.05)
            status = self.proc.poll()
            stop(self.proc)
            with open(log_path, "rb") as f:
                last = f.read().decode(errors="replace")[-3000:]
            if status is None:
                raise BenchError(
                    "%s did not accept connections on %s:%d within %.0f s: %s\nlog (%s):\n%s"
                    % (self.server.label, HOST, self.port, SERVER_START_TIMEOUT,
                       shlex.join(argv), log_path, tail(last))
                )
            # exited early: maybe the port was taken; try another one
        raise BenchError(
            "%s exited at start-up (3 attempts): %s\nlog (%s):\n%s"
            % (self.server.label, shlex.join(argv), log_path, tail(last))
        )

    def __exit__(self, *exc):
        if self.proc is not None:
            stop(self.proc)
        return False


# --------------------------------------------------------------------------
# Tests. To add a row, add an entry to TESTS. A test names the fixture file
# the servers serve and a measure function (ctx, test, srv) -> Measurement,
# where srv is the Running server (srv.port, srv.server, srv.path). Fixtures
# are created once per run by the functions in FIXTURES; a test that needs
# another one (e.g. a sparse image) adds it there and names it in `serves`
# or in params["source"].


@dataclass
class Measurement:
    # in the test's unit; higher is better (migration rows: seconds, lower is
    # better; None for a migration that did not complete)
    value: Optional[float]
    lat_us: Optional[float] = None  # clat p50, microseconds
    info: Dict[str, object] = field(default_factory=dict)


@dataclass
class Test:
    id: str
    label: str
    unit: str  # "MiB/s" or "IOPS"
    target: float  # flexnbd / best-other must be at least this
    measure: Callable[["Ctx", "Test", "Running"], Measurement]
    serves: str = "data"  # fixture the servers serve
    params: Dict[str, object] = field(default_factory=dict)
    skip: tuple = ()  # server ids not run on this row
    # server id -> why it is not comparable on this row: it still runs and
    # is shown (label + note), but gets no verdict
    notes: Dict[str, str] = field(default_factory=dict)
    # "server": run on every selected server, started by run_matrix;
    # "migration": run once per round, measure(ctx, test, None) starts its own
    # flexnbd processes (see the migration section)
    kind: str = "server"
    # runs on the TLS servers (Server.tls) only, and the others only on plain rows
    tls: bool = False
    # what the server's CPU is divided by: "us/req" (requests the client
    # completed) or "us/MiB" (MiB moved, where the request count is unknown)
    cpu_unit: str = "us/req"


def fio_argv(ctx, test, port, output):
    p = test.params
    return [
        "fio", "--name=%s" % test.id, "--ioengine=nbd", "--uri=nbd://%s:%d" % (HOST, port),
        "--rw=%s" % p["rw"], "--bs=%s" % p["bs"], "--iodepth=%d" % p["iodepth"],
        "--runtime=%d" % ctx.runtime, "--time_based", "--thread",
        "--output-format=json", "--output=%s" % output,
    ]


def measure_fio(ctx, test, srv) -> Measurement:
    """One fio job = one libnbd handle = one NBD connection; the nbd engine
    issues nbd_aio_* requests, so iodepth N really means N requests in
    flight on that connection. We check that in fio's iodepth histogram."""
    return fio_measure(ctx, test, srv.port, [srv], test.unit)[0]


def fio_measure(ctx, test, port, watched, unit) -> "tuple[Measurement, List[float]]":
    """measure_fio against port, in `unit` ("IOPS" or "MiB/s"). watched:
    Running processes whose CPU seconds during the run are returned, in
    order; the first one's is the Measurement's server CPU."""
    output = os.path.join(ctx.workdir, "fio.json")
    if os.path.exists(output):
        os.unlink(output)
    argv = fio_argv(ctx, test, port, output)
    cpu0 = [server_cpu(w) for w in watched]
    run_client(argv, timeout=ctx.runtime + 60, what="fio")
    cpus = [server_cpu(w) - c for w, c in zip(watched, cpu0)]
    cpu_s = cpus[0]
    try:
        with open(output) as f:
            text = f.read()
        report = json.loads(text[text.index("{"):])
        job = report["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError("cannot parse fio output %s: %s" % (output, e))
    if job.get("error"):
        raise BenchError("fio reported error %s for %s" % (job["error"], shlex.join(argv)))
    rw = "write" if "write" in test.params["rw"] else "read"
    d = job[rw]
    if not d.get("io_bytes"):
        raise BenchError("fio did no %s I/O: %s" % (rw, shlex.join(argv)))
    value = d["iops"] if unit == "IOPS" else d["bw_bytes"] / MIB
    pct = d.get("clat_ns", {}).get("percentile", {})
    lat = pct.get("50.000000")
    p99 = pct.get("99.000000")
    qd = test.params["iodepth"]
    levels = job.get("iodepth_level", {})
    at_depth = float(levels.get(str(qd), 0.0)) if qd > 1 else 100.0
    info = {"at_depth_pct": at_depth}
    requests = sum(int(job.get(k, {}).get("total_ios", 0)) for k in ("read", "write", "trim"))
    info.update(cpu_info(cpu_s, requests=requests))
    if p99 is not None:
        info["p99_us"] = p99 / 1000.0
    return Measurement(value, lat / 1000.0 if lat is not None else None, info), cpus


def measure_nbdcopy(ctx, test, srv) -> Measurement:
    """Wall clock of the whole nbdcopy process (connect, copy, and for the
    write direction the final flush), as MiB/s of the copied size."""
    uri = nbd_uri(ctx, srv.server, srv.port)
    argv = ["nbdcopy"] + ctx.nbdcopy_extra
    if test.params["direction"] == "read":
        argv += [uri, "null:"]
        copied = os.path.getsize(srv.path)
    else:
        argv += ["--flush", ctx.files[test.params["source"]], uri]
        copied = os.path.getsize(ctx.files[test.params["source"]])
    cpu0 = server_cpu(srv)
    secs, _, _ = run_client(argv, timeout=600, what="nbdcopy")
    cpu_s = server_cpu(srv) - cpu0
    # nbdcopy's requests vary in size (and number, with multi-conn): per MiB
    return Measurement(copied / MIB / secs, None, {"seconds": secs, **cpu_info(cpu_s, mib_moved=copied / MIB)})


QEMU_IMG_BENCH_PER_S = 1000  # requests per --runtime second (about 1 GB/s of 1 MiB requests)
QEMU_IMG_RUN_RE = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench_count(ctx) -> int:
    return max(100, QEMU_IMG_BENCH_PER_S * ctx.runtime)


def qemu_img_bench_argv(ctx, test, port):
    p = test.params
    return (["qemu-img", "bench", "-f", "raw", "-c", str(qemu_img_bench_count(ctx)), "-d", str(p["depth"]),
             "-s", p["bs"]] + (["-w"] if p["write"] else []) + ["nbd://%s:%d" % (HOST, port)])


def measure_qemu_img_bench(ctx, test, srv) -> Measurement:
    """qemu-img bench: COUNT requests of bs, depth in flight, at consecutive
    offsets (wrapping at the end of the image), on one NBD connection. The
    figure is COUNT * bs / the run time qemu-img reports ("Run completed in
    S seconds": the requests only, not opening and closing the image)."""
    argv = qemu_img_bench_argv(ctx, test, srv.port)
    count = qemu_img_bench_count(ctx)
    cpu0 = server_cpu(srv)
    wall, out, err = run_client(argv, timeout=ctx.runtime * 20 + 120, what="qemu-img bench")
    cpu_s = server_cpu(srv) - cpu0
    m = QEMU_IMG_RUN_RE.search(out + err)
    if not m or float(m.group(1)) <= 0:
        raise BenchError("no \"Run completed in S seconds\" in the output of %s:\n%s"
                         % (shlex.join(argv), tail(out + err)))
    secs = float(m.group(1))
    moved = count * test.params["bytes"] / MIB
    return Measurement(moved / secs, None, {"seconds": secs, "wall_seconds": wall,
                                            **cpu_info(cpu_s, requests=count)})


def qemu_img_convert_argv(ctx, test, port, size):
    """qemu-img convert from the server into null-co (which discards what it
    is given): qemu's own read path, over TLS with a credentials object.
    (qemu-img bench has no --object, so it cannot do TLS.)"""
    source = "driver=nbd,server.type=inet,server.host=%s,server.port=%s" % (HOST, port)
    tls = []
    if test.tls:
        tls = ["--object", "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % ctx.tls_dir]
        source += ",tls-creds=tls0"
    return (["qemu-img", "convert"] + tls + ["--image-opts", source, "-n",
            "--target-image-opts", "driver=null-co,size=%s" % size])


def measure_qemu_img_convert(ctx, test, srv) -> Measurement:
    """Wall clock of the whole qemu-img convert process (connect, the TLS
    handshake, the copy), as MiB/s of the file's size."""
    size = os.path.getsize(srv.path)
    argv = qemu_img_convert_argv(ctx, test, srv.port, size)
    cpu0 = server_cpu(srv)
    secs, _, _ = run_client(argv, timeout=600, what="qemu-img convert")
    cpu_s = server_cpu(srv) - cpu0
    return Measurement(size / MIB / secs, None, {"seconds": secs, **cpu_info(cpu_s, mib_moved=size / MIB)})


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def sparse_copy_argv(ctx, uri, dest):
    return ["nbdcopy"] + ctx.nbdcopy_extra + [uri, dest]


def measure_nbdcopy_sparse(ctx, test, srv) -> Measurement:
    """Copy the sparse image from the server into a fresh local file, timed
    as wall clock of the nbdcopy process. A server that reports holes
    (base:allocation) lets nbdcopy skip reading them. Not timed: the
    destination's allocated size (every trial), and once per server a
    byte-by-byte comparison with the source and the server's block-status
    map (nbdinfo --map), so that a fast but wrong or dense copy shows up."""
    src = ctx.files[test.serves]
    dest = os.path.join(ctx.workdir, "sparse-copy.raw")
    uri = "nbd://%s:%d" % (HOST, srv.port)
    if os.path.exists(dest):
        os.unlink(dest)
    try:
        cpu0 = server_cpu(srv)
        secs, _, _ = run_client(sparse_copy_argv(ctx, uri, dest), timeout=600, what="nbdcopy")
        cpu_s = server_cpu(srv) - cpu0
        info: Dict[str, object] = {
            **cpu_info(cpu_s, mib_moved=os.path.getsize(src) / MIB),
            "seconds": secs,
            "dest_alloc": allocated(dest),
            "src_alloc": allocated(src),
        }
        sid = srv.server.id
        if sid not in ctx.sparse_checked:
            diff = compare_files(src, dest)
            if diff is not None:
                raise BenchError("%s: the copy %s differs from the source %s: %s"
                                 % (srv.server.label, dest, src, diff))
            info["identical"] = True
            info["map"] = block_status_map(uri)
            ctx.sparse_checked[sid] = info["map"]
    finally:
        if os.path.exists(dest):
            os.unlink(dest)
    return Measurement(os.path.getsize(src) / MIB / secs, None, info)


def compare_files(a: str, b: str) -> Optional[str]:
    """None when a and b have the same bytes, else where they differ."""
    if os.path.getsize(a) != os.path.getsize(b):
        return "size %d vs %d" % (os.path.getsize(a), os.path.getsize(b))
    chunk = 4 * MIB
    off = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                i = next(i for i in range(min(len(x), len(y))) if x[i] != y[i]) if len(x) == len(y) else 0
                return "first difference at byte %d" % (off + i)
            if not x:
                return None
            off += len(x)


def block_status_map(uri: str) -> Dict[str, object]:
    """What the server reports through base:allocation: number of data
    extents and data bytes (extents that are not holes)."""
    argv = ["nbdinfo", "--map", "--json", uri]
    proc = spawn(argv, subprocess.PIPE, subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        raise BenchError("nbdinfo --map did not finish within 60 s: %s" % shlex.join(argv))
    finally:
        stop(proc, term_timeout=2)
    if proc.returncode != 0:
        text = (out + err).decode(errors="replace").strip()
        if "base:allocation" in text:
            return {"block_status": False}
        raise BenchError("nbdinfo --map failed (exit %s): %s\n%s"
                         % (proc.returncode, shlex.join(argv), tail(text)))
    try:
        extents = json.loads(out)
        data = [e for e in extents if not e["type"] & 1]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError("cannot parse nbdinfo --map output: %s" % e)
    return {"block_status": True, "data_extents": len(data),
            "data_bytes": sum(e["length"] for e in data)}


# --------------------------------------------------------------------------
# Migration rows. A trial needs two flexnbd processes: the source (`serve`
# with a control socket, serving a fixture) and the destination (`listen` on
# a fresh, truncated file of the same size; with --rebind-* on the pause
# row). The measure functions start them themselves (MigrationPair), once per
# round; the rows are judged on their own targets (times and bytes: lower is
# better), not against qemu-nbd or nbdkit.

MIGRATION_START_TIMEOUT = 30.0  # `flexnbd mirror` returns once connected
PAUSE_LIMIT = 10.0  # once the writer's connection has closed, a read must be served within this
IN_DOUBT_LIMIT = 10.0  # the destination exited (took control) but the source has not, this long
BLOCK = 4096  # the pause row's writes and read

# Old-style NBD, as flexnbd serves it by default.
NBD_HELLO_LEN = 152
NBD_OLDSTYLE_MAGIC = 0x00420281861253
NBD_REQUEST = struct.Struct(">IIQQI")  # magic, type, handle, offset, length
NBD_REPLY = struct.Struct(">IIQ")  # magic, error, handle
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2

SENT_RE = re.compile(r"All data acknowledged: (\d+) bytes sent as data, (\d+) as zero ranges")
ATTEMPT_RE = re.compile(r"Migration \S+ to \S+: attempt (\d+)")
BIND_RETRY_RE = re.compile(r"Couldn't bind \S+ yet")
# Steps of a migration as the logs show them. A log line starts with
# CLOCK_MONOTONIC in milliseconds, the clock of Python's time.monotonic(), so
# they go on the same time line as the writer and reader.
LOG_EVENTS = [  # (key, which log, message)
    ("all_acked", "source", "All data acknowledged"),
    ("durable", "source", "The destination made everything durable"),
    ("committed", "source", "The destination has taken control"),
    ("rebound", "destination", "Serving the received export on"),
]


class MigrationFailed(Exception):
    """The migration did not complete (in time): the trial is recorded as
    failed, the row gets FAIL, and the run goes on."""


def migration_timeout(size: int) -> float:
    """Bound of one migration (mirror command to the source's exit), and of
    one baseline copy: 60 s plus 10 MiB/s, far more than loopback needs."""
    return 60.0 + size / (10 * MIB)


def migration_server(mode: str, sock: str, rebind_port: Optional[int] = None) -> Server:
    """`flexnbd serve` (the source) or `flexnbd listen` (the destination),
    with a control socket."""

    def argv(c, port, path):
        a = [c.flexnbd, mode, "-v", "-l", HOST, "-p", str(port), "-f", path, "--sock", sock]
        if rebind_port is not None:
            a += ["--rebind-addr", HOST, "--rebind-port", str(rebind_port)]
        return a

    sid = "migrate-source" if mode == "serve" else "migrate-destination"
    return Server(sid, "flexnbd %s" % mode, "migration", lambda c: c.flexnbd, argv)


# The pseudo-server under which migration trials are recorded.
MIGRATION = Server("migration", "flexnbd serve -> flexnbd listen", "migration",
                   lambda c: c.flexnbd, lambda c, port, path: [])


def baseline_server() -> Server:
    """Serves the baseline copy's destination: new-style, so that nbdcopy
    can send holes as WRITE_ZEROES, as the mirror sends them as zero ranges."""
    return next(s for s in SERVERS if s.id == "flexnbd-newstyle")


def baseline_argv(ctx, src, uri):
    return ["nbdcopy"] + ctx.nbdcopy_extra + ["--flush", src, uri]


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def make_empty(path, size):
    remove(path)
    with open(path, "wb") as f:
        f.truncate(size)


def control_status(ctx, sock) -> Dict[str, str]:
    """`flexnbd status` of a running server, as key -> value."""
    _, out, _ = run_client([ctx.flexnbd, "status", "--sock", sock], 10, "flexnbd status")
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(0.02)


class ExitWatcher(threading.Thread):
    """Records the monotonic time at which a process exits, to the
    millisecond (Popen.wait with a timeout polls at up to 50 ms), without
    reaping it: a pidfd becomes readable when the process exits."""

    def __init__(self, proc):
        super().__init__(name="exit-watcher", daemon=True)
        self.proc = proc
        self.at: Optional[float] = None
        self.done = threading.Event()
        self.stop_ev = threading.Event()

    def _exited(self) -> bool:
        try:
            r = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            return r is not None
        except ChildProcessError:  # already reaped
            return True

    def run(self):
        fd = None
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            pass
        try:
            while not self.stop_ev.is_set():
                if fd is not None:
                    p = select_mod.poll()
                    p.register(fd, select_mod.POLLIN)
                    if p.poll(200):
                        break
                elif self._exited():
                    break
                else:
                    time.sleep(0.001)
            else:
                return
            self.at = time.monotonic()
            self.done.set()
        finally:
            if fd is not None:
                os.close(fd)


class MigrationPair:
    """Context manager: the source (`flexnbd serve --sock`) serving src and
    the destination (`flexnbd listen --sock`, with --rebind-* to the source's
    port when rebind) on a fresh, truncated file of the same size, both
    accepting and idle; on exit both are stopped and the files removed."""

    def __init__(self, ctx, src, rebind=False):
        self.ctx, self.src, self.rebind = ctx, src, rebind
        w = ctx.workdir
        self.dest = os.path.join(w, "migrate-dest.raw")
        self.ssock = os.path.join(w, "migrate-source.sock")
        self.dsock = os.path.join(w, "migrate-destination.sock")
        self.source: Optional[Running] = None
        self.destination: Optional[Running] = None
        self.watch: Optional[ExitWatcher] = None
        self.log_at: Dict[str, int] = {}
        self.t0: Optional[float] = None  # set by the caller to what mirror() returned

    def _start(self, server, path) -> Running:
        log = os.path.join(self.ctx.workdir, "%s.log" % server.id)
        self.log_at[server.id] = os.path.getsize(log) if os.path.exists(log) else 0
        r = Running(self.ctx, server, path)
        r.__enter__()
        return r

    def __enter__(self):
        try:
            for p in (self.ssock, self.dsock):
                remove(p)
            make_empty(self.dest, os.path.getsize(self.src))
            self.source = self._start(migration_server("serve", self.ssock), self.src)
            self.destination = self._start(
                migration_server("listen", self.dsock, self.source.port if self.rebind else None),
                self.dest)
            wait_until(lambda: os.path.exists(self.ssock) and os.path.exists(self.dsock), 10,
                       "the control sockets %s, %s" % (self.ssock, self.dsock))
            # The readiness probe was a client of the destination, which admits
            # one at a time: the mirror must not find it still registered.
            wait_until(lambda: control_status(self.ctx, self.dsock).get("num_clients") == "0", 10,
                       "the destination to have no client")
            self.watch = ExitWatcher(self.source.proc)
            self.watch.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        if self.watch is not None:
            self.watch.stop_ev.set()
        try:
            for r in (self.destination, self.source):
                if r is not None:
                    r.__exit__(None, None, None)
        finally:
            if self.watch is not None:
                self.watch.join(2)
            for p in (self.dest, self.ssock, self.dsock):
                remove(p)
        return False

    def mirror(self) -> float:
        """Runs `flexnbd mirror`; returns the monotonic time just before it
        was started."""
        t0 = time.monotonic()
        run_client([self.ctx.flexnbd, "mirror", "--sock", self.ssock, "--addr", HOST,
                    "--port", str(self.destination.port)], MIGRATION_START_TIMEOUT, "flexnbd mirror")
        return t0

    def log(self, which) -> str:
        sid = "migrate-source" if which == "source" else "migrate-destination"
        with open(os.path.join(self.ctx.workdir, "%s.log" % sid), "rb") as f:
            f.seek(self.log_at[sid])
            return f.read().decode(errors="replace")

    def last_error(self) -> str:
        lines = [l for l in self.log("source").splitlines() if ":E:" in l or ":F:" in l]
        if not lines:
            return ""
        return "; source's last error: " + re.sub(r"^.*?\.rs:\d+: ", "", lines[-1])[:300]

    def state(self) -> str:
        """Where the migration stands, for a failure message."""
        parts = []
        for name, r, sock, keys in (("source", self.source, self.ssock,
                                     ("migration_phase", "migration_attempt")),
                                    ("destination", self.destination, self.dsock,
                                     ("handoff_phase", "has_control", "rebind"))):
            rc = r.proc.poll()
            if rc is not None:
                parts.append("%s exited with status %s" % (name, rc))
                continue
            try:
                st = control_status(self.ctx, sock)
                parts.append("%s running, %s" % (name, " ".join(
                    "%s=%s" % (k, st[k]) for k in keys if k in st)))
            except BenchError:
                parts.append("%s running, no status" % name)
        return "; ".join(parts) + self.last_error()

    def wait_source(self, deadline) -> float:
        """Waits until the source has exited (with status 0, or
        MigrationFailed); returns when it exited."""
        dest_gone = None
        while not self.watch.done.wait(0.05):
            now = time.monotonic()
            if now > deadline:
                raise MigrationFailed("the source was still running %.0f s after the mirror command: %s"
                                      % (now - self.t0, self.state()))
            if not self.rebind and self.destination.proc.poll() is not None:
                dest_gone = dest_gone or now
                if now - dest_gone > IN_DOUBT_LIMIT:
                    raise MigrationFailed("the destination exited but the source was still running "
                                          "%.0f s later: %s" % (IN_DOUBT_LIMIT, self.state()))
        try:
            rc = self.source.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise MigrationFailed("the source exited with status %s%s" % (rc, self.last_error()))
        return self.watch.at

    def wait_destination(self):
        """Without --rebind-*: the destination exits 0 after the hand-off."""
        try:
            rc = self.destination.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise MigrationFailed("the destination was still running 30 s after the source exited: %s"
                                  % self.state())
        if rc != 0:
            raise MigrationFailed("the destination exited with status %s" % rc)

    def events(self) -> Dict[str, float]:
        """The monotonic time (s) of the last occurrence of each LOG_EVENTS step."""
        found: Dict[str, float] = {}
        for key, which, message in LOG_EVENTS:
            for line in self.log(which).splitlines():
                m = re.match(r"(\d+):[A-Z]:", line)
                if m and message in line:
                    found[key] = int(m.group(1)) / 1000.0
        return found

    def figures(self):
        """(attempts, bytes sent as data, bytes sent as zero ranges) of the
        last attempt, from the source's log."""
        text = self.log("source")
        sent = SENT_RE.findall(text)
        if not sent:
            raise BenchError("no \"All data acknowledged\" line in the source's log %s"
                             % os.path.join(self.ctx.workdir, "migrate-source.log"))
        attempts = max([int(a) for a in ATTEMPT_RE.findall(text)] or [1])
        return attempts, int(sent[-1][0]), int(sent[-1][1])


def migrate_once(ctx, src, check, info):
    """The migration: `flexnbd mirror` started until the source exits."""
    size = os.path.getsize(src)
    with MigrationPair(ctx, src) as pair:
        pair.t0 = t0 = pair.mirror()
        t1 = pair.wait_source(t0 + migration_timeout(size))
        pair.wait_destination()
        attempts, sent, zeroed = pair.figures()
        ev = pair.events()
        info.update(seconds=t1 - t0, sent=sent, zeroed=zeroed, attempts=attempts,
                    dest_alloc=allocated(pair.dest),
                    **{"to_" + k: ev[k] - t0 for k in ("all_acked", "durable") if k in ev})
        if check:
            diff = compare_files(src, pair.dest)
            if diff is not None:
                raise BenchError("after the migration, %s differs from the source %s: %s"
                                 % (pair.dest, src, diff))
            info["identical"] = True


def baseline_once(ctx, src, check, info):
    """The baseline: nbdcopy of the same file into a flexnbd serving a fresh,
    truncated file, wall clock of the nbdcopy process (with the final flush)."""
    size = os.path.getsize(src)
    dest = os.path.join(ctx.workdir, "baseline-dest.raw")
    make_empty(dest, size)
    try:
        with Running(ctx, baseline_server(), dest) as srv:
            secs, _, _ = run_client(baseline_argv(ctx, src, "nbd://%s:%d" % (HOST, srv.port)),
                                    timeout=migration_timeout(size), what="nbdcopy")
        info.update(baseline_seconds=secs, baseline_dest_alloc=allocated(dest))
        if check:
            diff = compare_files(src, dest)
            if diff is not None:
                raise BenchError("after nbdcopy, %s differs from the source %s: %s" % (dest, src, diff))
            info["baseline_identical"] = True
    finally:
        remove(dest)


def measure_migration(ctx, test, _srv) -> Measurement:
    """migrate-dense, migrate-sparse: the migration and its nbdcopy baseline,
    one after the other, in an order alternating from round to round. The
    first round also compares both copies with the source byte by byte."""
    src = ctx.files[test.serves]
    check = test.id not in ctx.migration_checked
    info: Dict[str, object] = {"src_alloc": allocated(src), "size": os.path.getsize(src)}
    steps = [migrate_once, baseline_once]
    if ctx.round % 2:
        steps.reverse()
    failed = None
    for i, step in enumerate(steps):
        if i:
            settle(ctx)
        try:
            step(ctx, src, check, info)
        except MigrationFailed as e:
            failed = str(e)
    if failed:
        info["failed"] = failed
        return Measurement(None, None, info)
    ctx.migration_checked.add(test.id)
    return Measurement(info["seconds"], None, info)


def recv_exact(sock, n) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def nbd_hello(sock) -> int:
    """Reads flexnbd's old-style hello; returns the export size."""
    hello = recv_exact(sock, NBD_HELLO_LEN)
    magic, kind, size = struct.unpack(">8sQQ", hello[:24])
    if magic != b"NBDMAGIC" or kind != NBD_OLDSTYLE_MAGIC:
        raise ValueError("not an old-style NBD hello")
    return size


def nbd_reply(sock, handle):
    magic, err, got = NBD_REPLY.unpack(recv_exact(sock, NBD_REPLY.size))
    if magic != NBD_REPLY_MAGIC or got != handle:
        raise ValueError("bad reply (magic %#x, handle %d for %d)" % (magic, got, handle))
    return err


class Writer(threading.Thread):
    """A client of the source: 4 KiB WRITEs at random offsets, one at a time,
    until the server closes the connection (the migration's final pass).
    Keeps the monotonic time, offset and payload of the last acknowledged
    write (each payload starts with its sequence number)."""

    def __init__(self, port, stop_ev):
        super().__init__(name="writer", daemon=True)
        self.port, self.stop_ev = port, stop_ev
        self.acked = 0
        self.last = None  # (time, offset, payload) of the last acknowledged write
        self.first = threading.Event()  # a write was acknowledged
        self.closed = threading.Event()  # the connection has ended
        self.closed_at: Optional[float] = None
        self.error: Optional[str] = None  # set when it ended other than by the server closing

    def run(self):
        try:
            self._run()
        except Exception as e:
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()

    def _run(self):
        rng = random.Random(0)
        base = os.urandom(BLOCK)
        with socket.create_connection((HOST, self.port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            blocks = nbd_hello(s) // BLOCK
            n = 0
            while not self.stop_ev.is_set():
                n += 1
                off = rng.randrange(blocks) * BLOCK
                payload = struct.pack(">Q", n) + base[8:]
                try:
                    s.sendall(NBD_REQUEST.pack(NBD_REQUEST_MAGIC, NBD_CMD_WRITE, n, off, BLOCK) + payload)
                    err = nbd_reply(s, n)
                except (EOFError, ConnectionResetError, BrokenPipeError):
                    return  # closed by the server: the final pass
                now = time.monotonic()
                if err:
                    raise ValueError("the write at %d was answered with error %d" % (off, err))
                self.last = (now, off, payload)
                self.acked += 1
                self.first.set()
            self.error = "stopped"
            s.sendall(NBD_REQUEST.pack(NBD_REQUEST_MAGIC, NBD_CMD_DISC, 0, 0, 0))


class Reader(threading.Thread):
    """Once the writer's connection has closed: connects to the source's port
    and READs the block of the last acknowledged write, again and again (every
    2 ms), until a server answers — the destination, once it has rebound the
    port. Keeps the time the first answer's data arrived, and that data."""

    def __init__(self, port, writer, stop_ev, limit):
        super().__init__(name="reader", daemon=True)
        self.port, self.writer, self.stop_ev, self.limit = port, writer, stop_ev, limit
        self.at: Optional[float] = None
        self.data: Optional[bytes] = None
        self.attempts = 0
        self.last_error = ""

    def run(self):
        while not self.writer.closed.wait(0.05):
            if self.stop_ev.is_set():
                return
        if self.writer.last is None:
            return
        off = self.writer.last[1]
        deadline = time.monotonic() + self.limit
        while not self.stop_ev.is_set() and time.monotonic() < deadline:
            self.attempts += 1
            try:
                self.at, self.data = self._read(off)
                return
            except (OSError, EOFError, ValueError) as e:
                self.last_error = "%s: %s" % (type(e).__name__, e)
                time.sleep(0.002)

    def _read(self, off):
        with socket.create_connection((HOST, self.port), timeout=2) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nbd_hello(s)
            s.sendall(NBD_REQUEST.pack(NBD_REQUEST_MAGIC, NBD_CMD_READ, 1, off, BLOCK))
            err = nbd_reply(s, 1)
            if err:
                raise ValueError("the read was answered with error %d" % err)
            data = recv_exact(s, BLOCK)
            at = time.monotonic()
            s.sendall(NBD_REQUEST.pack(NBD_REQUEST_MAGIC, NBD_CMD_DISC, 2, 0, 0))
            return at, data


def measure_migration_pause(ctx, test, _srv) -> Measurement:
    """migrate-pause: a writer on the source, the destination with
    --rebind-* to the source's port, and a reader; pause = first read served
    by the destination - last write acknowledged by the source."""
    src = ctx.files[test.serves]
    size = os.path.getsize(src)
    check = test.id not in ctx.migration_checked
    info: Dict[str, object] = {"size": size}
    stop_ev = threading.Event()
    threads = []
    try:
        with MigrationPair(ctx, src, rebind=True) as pair:
            try:
                port = pair.source.port
                writer = Writer(port, stop_ev)
                reader = Reader(port, writer, stop_ev, PAUSE_LIMIT)
                threads = [writer, reader]
                writer.start()
                if not writer.first.wait(10):
                    raise BenchError("no write acknowledged by the source within 10 s: %s" % writer.error)
                time.sleep(0.2)  # let the writer reach its steady rate
                if writer.closed.is_set():
                    raise BenchError("the writer's connection ended before the migration: %s" % writer.error)
                reader.start()
                pair.t0 = t0 = pair.mirror()
                deadline = t0 + migration_timeout(size)
                while not writer.closed.wait(0.05):
                    if time.monotonic() > deadline:
                        raise MigrationFailed("the source had not closed the writer's connection (final pass) "
                                              "%.0f s after the mirror command: %s"
                                              % (deadline - t0, pair.state()))
                if writer.error:
                    raise BenchError("the writer failed: %s" % writer.error)
                reader.join(PAUSE_LIMIT + 5)
                if reader.at is None:
                    raise MigrationFailed("no read served on port %d within %.0f s of the writer's connection "
                                          "closing (%d attempts, last: %s): %s"
                                          % (port, PAUSE_LIMIT, reader.attempts, reader.last_error, pair.state()))
                exited = pair.wait_source(time.monotonic() + 10)
                attempts, sent, zeroed = pair.figures()
                if attempts > 1:
                    raise MigrationFailed("the migration took %d attempts: the source reopened its doors, so the "
                                          "first read may have been served by it; not counted" % attempts)
                st = control_status(ctx, pair.dsock)
                if st.get("rebind") != "serving":
                    raise MigrationFailed("a read was served but the destination shows rebind=%s"
                                          % st.get("rebind"))
                last_at, off, payload = writer.last
                ev = pair.events()
                if reader.data != payload:
                    raise BenchError("the destination's block at offset %d is not the last acknowledged write "
                                     "(write #%d)" % (off, struct.unpack(">Q", payload[:8])[0]))
                info.update(
                    seconds=reader.at - last_at,
                    writes=writer.acked,
                    to_closed=writer.closed_at - last_at,
                    to_exit=exited - last_at,
                    migration_seconds=exited - t0,
                    read_attempts=reader.attempts,
                    bind_retries=len(BIND_RETRY_RE.findall(pair.log("destination"))),
                    sent=sent, zeroed=zeroed, attempts=attempts,
                    **{"to_" + k: ev[k] - last_at for k in ev},
                )
                if check:
                    stop_ev.set()
                    diff = compare_files(src, pair.dest)
                    if diff is not None:
                        raise BenchError("after the migration, %s differs from the source %s: %s"
                                         % (pair.dest, src, diff))
                    info["identical"] = True
            finally:
                stop_ev.set()
    except MigrationFailed as e:
        info["failed"] = str(e)
        return Measurement(None, None, info)
    finally:
        stop_ev.set()
        for t in threads:
            if t.is_alive():
                t.join(5)
    ctx.migration_checked.add(test.id)
    return Measurement(info["seconds"], None, info)


# --------------------------------------------------------------------------
# Active mirroring rows: a fio writer on the source during the migration.
# migrate-writer times the migration (auto mode, unlimited link) with and
# without the writer; writer-cost measures the writer before a migration,
# during a background-mode one and during an active-mode one.

WRITER_FIO_STOP = 30.0  # after the hand-off closed fio's connection, fio must end within this
WRITER_COST_SPAN = 4  # writer-cost: the migration's link lasts this many fio runtimes


def control_request(sock_path, command, args=(), timeout=10.0) -> str:
    """One control request (`command\\n`, one line per argument, `\\n`) on
    the Unix socket; returns the whole answer (`<code>: <text>\\n`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(("\n".join([command, *args]) + "\n\n").encode())
        answer = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode(errors="replace")


def mirror_mode(pair, mode, max_bps=0) -> float:
    """`mirror HOST DPORT exit 0.0.0.0 MAX_BPS MODE` on the source's control
    socket (no bind; MAX_BPS 0 is no limit); returns the monotonic time just
    before it was sent."""
    t0 = time.monotonic()
    answer = control_request(pair.ssock, "mirror",
                             [HOST, str(pair.destination.port), "exit", "0.0.0.0", str(max_bps), mode],
                             timeout=MIGRATION_START_TIMEOUT)
    if answer != "0: Mirror started\n":
        raise BenchError("mirror ... %s answered %r" % (mode, answer))
    return t0


def raw_status(sock_path) -> Dict[str, str]:
    """`status` on a control socket, as key -> value ({} if it cannot be read)."""
    try:
        answer = control_request(sock_path, "status", timeout=2)
    except OSError:
        return {}
    if not answer.startswith("0: "):
        return {}
    return dict(kv.split("=", 1) for kv in answer[3:].split() if "=" in kv)


class StatusPoller(threading.Thread):
    """Polls the source's status every 0.1 s until stopped (or the socket
    goes away), keeping what the migration went through."""

    def __init__(self, sock_path):
        super().__init__(name="status-poller", daemon=True)
        self.sock_path = sock_path
        self.stop_ev = threading.Event()
        self.modes: List[str] = []
        self.phases: List[str] = []
        self.active_at: Optional[float] = None  # first time the mode was seen active
        self.last: Dict[str, str] = {}
        self.max_passes = 0

    def run(self):
        deadline = time.monotonic() + 3600
        while not self.stop_ev.wait(0.1) and time.monotonic() < deadline:
            st = raw_status(self.sock_path)
            if st.get("is_mirroring") != "true":
                continue
            self.last = st
            for key, seen in (("migration_mode", self.modes), ("migration_phase", self.phases)):
                v = st.get(key)
                if v and v not in seen:
                    seen.append(v)
            if st.get("migration_mode") == "active" and self.active_at is None:
                self.active_at = time.monotonic()
            try:
                self.max_passes = max(self.max_passes, int(st.get("migration_passes", "0")))
            except ValueError:
                pass

    def finish(self):
        self.stop_ev.set()
        self.join(5)


def writer_fio_argv(ctx, port, runtime, output):
    """The writer: fio randwrite 4 KiB, 16 in flight, on one connection."""
    return ["fio", "--name=writer", "--ioengine=nbd", "--uri=nbd://%s:%d" % (HOST, port),
            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--time_based", "--runtime=%d" % runtime,
            "--thread", "--output-format=json", "--output=%s" % output]


def start_fio_writer(ctx, pair, runtime, output):
    """Starts the writer on the source and waits until it is connected
    (the source counts one client) and has run for 0.5 s."""
    remove(output)
    with open(os.path.join(ctx.workdir, "fio-writer.log"), "ab") as log:
        proc = spawn(writer_fio_argv(ctx, pair.source.port, runtime, output), log, log)
    try:
        wait_until(lambda: raw_status(pair.ssock).get("num_clients") == "1" or proc.poll() is not None,
                   10, "fio to connect to the source")
        if proc.poll() is not None:
            raise BenchError("fio exited at start (status %s); see %s"
                             % (proc.returncode, os.path.join(ctx.workdir, "fio-writer.log")))
        time.sleep(0.5)
    except BaseException:
        stop(proc, term_timeout=2)
        raise
    return proc


def fio_write_figures(output) -> "tuple[float, float]":
    """(write IOPS, p99 completion latency in microseconds) of a fio JSON report."""
    try:
        with open(output) as f:
            text = f.read()
        job = json.loads(text[text.index("{"):])["jobs"][0]
        w = job["write"]
        return w["iops"], w["clat_ns"]["percentile"]["99.000000"] / 1000.0
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError("cannot parse fio output %s: %s" % (output, e))


def writer_migration_once(ctx, src, with_writer, check, info):
    """One auto-mode migration of src, unlimited link, with or without the
    fio writer; records its seconds (mirror command -> source exit)."""
    size = os.path.getsize(src)
    key = "seconds" if with_writer else "baseline_seconds"
    output = os.path.join(ctx.workdir, "fio-writer.json")
    fio = None
    try:
        with MigrationPair(ctx, src) as pair:
            if with_writer:
                # Far longer than the migration: the hand-off ends it.
                fio = start_fio_writer(ctx, pair, int(migration_timeout(size)) + 60, output)
            poller = StatusPoller(pair.ssock)
            poller.start()
            try:
                pair.t0 = t0 = mirror_mode(pair, "auto")
                t1 = pair.wait_source(t0 + migration_timeout(size))
                pair.wait_destination()
            finally:
                poller.finish()
            info[key] = t1 - t0
            if with_writer:
                # The hand-off closed fio's connection: it fails, and must end.
                try:
                    fio.wait(timeout=WRITER_FIO_STOP)
                except subprocess.TimeoutExpired:
                    raise BenchError("fio still ran %.0f s after the source exited" % WRITER_FIO_STOP)
                attempts, sent, _ = pair.figures()
                info.update(modes=poller.modes, phases=poller.phases,
                            to_active=(poller.active_at - t0) if poller.active_at else None,
                            passes=poller.max_passes, attempts=attempts, sent=sent,
                            forwarded=int(poller.last.get("migration_forwarded_writes", "0") or 0))
            if check:
                diff = compare_files(src, pair.dest)
                if diff is not None:
                    raise BenchError("after the migration (%s writer), %s differs from the source %s: %s"
                                     % ("with" if with_writer else "without", pair.dest, src, diff))
                info["identical" if with_writer else "baseline_identical"] = True
    finally:
        if fio is not None:
            stop(fio, term_timeout=2)


def measure_migration_writer(ctx, test, _srv) -> Measurement:
    """migrate-writer: the migration with the writer and without it, one
    after the other, in an order alternating from round to round."""
    src = ctx.files[test.serves]
    check = test.id not in ctx.migration_checked
    info: Dict[str, object] = {"size": os.path.getsize(src)}
    steps = [True, False]
    if ctx.round % 2:
        steps.reverse()
    failed = None
    for i, with_writer in enumerate(steps):
        if i:
            settle(ctx)
        try:
            writer_migration_once(ctx, src, with_writer, check, info)
        except MigrationFailed as e:
            failed = "%s writer: %s" % ("with" if with_writer else "without", e)
    if failed:
        info["failed"] = failed
        return Measurement(None, None, info)
    ctx.migration_checked.add(test.id)
    return Measurement(info["seconds"], None, info)


def cost_phase(ctx, pair, name, runtime, info, mode=None, max_bps=0):
    """One writer-cost measurement: fio for `runtime` seconds, during a
    migration in `mode` (None: no migration). Records iops and p99; returns
    how the migration stood afterwards."""
    output = os.path.join(ctx.workdir, "fio-writer.json")
    poller = None
    if mode is not None:
        # One client at a time on the destination: the previous attempt's
        # connection must be gone.
        wait_until(lambda: raw_status(pair.dsock).get("num_clients") == "0", 10,
                   "the destination to drop the previous migration")
        mirror_mode(pair, mode, max_bps)
        wait_until(lambda: raw_status(pair.ssock).get("migration_phase") in ("sweep", "copying"), 10,
                   "the %s migration to start copying" % mode)
        poller = StatusPoller(pair.ssock)
        poller.start()
    fio = start_fio_writer(ctx, pair, runtime, output)
    try:
        try:
            fio.wait(timeout=runtime + 60)
        except subprocess.TimeoutExpired:
            raise BenchError("fio did not end within %d s" % (runtime + 60))
        st = raw_status(pair.ssock)
        if fio.returncode != 0:
            raise MigrationFailed("fio failed (exit %s) during the %s measurement (the migration "
                                  "completed or closed its connection?): %s"
                                  % (fio.returncode, name, pair.state()))
    finally:
        stop(fio, term_timeout=2)
        if poller is not None:
            poller.finish()
    iops, p99 = fio_write_figures(output)
    info[name + "_iops"], info[name + "_p99_us"] = iops, p99
    if mode is not None:
        if st.get("is_mirroring") != "true":
            raise MigrationFailed("the %s migration ended during the measurement: %s" % (mode, pair.state()))
        info[name + "_modes"] = poller.modes
        info[name + "_forwarded"] = int(st.get("migration_forwarded_writes", "0") or 0)
        info[name + "_progress"] = "%s %s%%" % (st.get("migration_phase"), st.get("migration_progress"))
        answer = control_request(pair.ssock, "break")
        if answer != "0: mirror stopped\n":
            raise BenchError("break after the %s measurement answered %r" % (name, answer))


def measure_writer_cost(ctx, test, _srv) -> Measurement:
    """writer-cost: the writer's IOPS and p99 alone, then during a
    background-mode migration, then during an active-mode one (each broken
    off after the measurement), on one pair of servers. The link is limited
    so that the migration outlasts the measurement."""
    src = ctx.files[test.serves]
    size = os.path.getsize(src)
    runtime = ctx.runtime
    max_bps = size // (WRITER_COST_SPAN * runtime)
    info: Dict[str, object] = {"size": size, "max_bps": max_bps, "runtime": runtime}
    try:
        with MigrationPair(ctx, src) as pair:
            cost_phase(ctx, pair, "idle", runtime, info)
            cost_phase(ctx, pair, "background", runtime, info, "background", max_bps)
            cost_phase(ctx, pair, "active", runtime, info, "active", max_bps)
    except MigrationFailed as e:
        info["failed"] = str(e)
        return Measurement(None, None, info)
    return Measurement(info["active_iops"] / info["idle_iops"], None, info)


# --------------------------------------------------------------------------
# Proxy rows: fio against `flexnbd serve` directly, then through
# `flexnbd-proxy` in front of the same server (or the other way round, alternating
# from round to round). Like the migration rows they run once per round with
# their own processes (kind "migration", so under the first condition only);
# the figure is the proxy's throughput / the direct throughput.


def proxy_binary(ctx) -> str:
    """flexnbd-proxy next to the flexnbd binary measured."""
    return os.path.join(os.path.dirname(ctx.flexnbd), "flexnbd-proxy")


def proxy_argv(ctx, port, upstream_port):
    return [proxy_binary(ctx), "--addr", HOST, "--port", str(port),
            "--conn-addr", HOST, "--conn-port", str(upstream_port)]


# The upstream server (plain old-style flexnbd serve) and the proxy, as
# Servers for Running (the proxy's "file" is the upstream port).
PROXY_UPSTREAM = Server("proxy-upstream", "flexnbd serve", "proxy", lambda c: c.flexnbd, flexnbd_argv())
PROXY = Server("flexnbd-proxy", "flexnbd-proxy", "proxy", proxy_binary,
               lambda c, port, up: proxy_argv(c, port, up))


def measure_proxy(ctx, test, _srv) -> Measurement:
    """One flexnbd serve on the fixture; fio directly against it, and fio
    through a flexnbd-proxy (started for that leg only) in front of it, in
    an order alternating from round to round. Value: proxy / direct."""
    unit = test.params["figure"]
    info: Dict[str, object] = {"figure_unit": unit}
    legs = ["direct", "proxy"]
    if ctx.round % 2:
        legs.reverse()
    info["first"] = legs[0]
    with Running(ctx, PROXY_UPSTREAM, ctx.files[test.serves]) as srv:
        for i, leg in enumerate(legs):
            if i:
                settle(ctx)
            if leg == "direct":
                m, cpus = fio_measure(ctx, test, srv.port, [srv], unit)
            else:
                with Running(ctx, PROXY, str(srv.port)) as proxy:
                    m, cpus = fio_measure(ctx, test, proxy.port, [srv, proxy], unit)
            requests = m.info["requests"]
            info[leg] = m.value
            info[leg + "_p50_us"] = m.lat_us
            info[leg + "_p99_us"] = m.info.get("p99_us")
            info[leg + "_at_depth_pct"] = m.info["at_depth_pct"]
            info[leg + "_requests"] = requests
            info[leg + "_server_cpu_us"] = cpus[0] * 1e6 / requests if requests else None
            if leg == "proxy":
                info["proxy_cpu_us"] = cpus[1] * 1e6 / requests if requests else None
    return Measurement(info["proxy"] / info["direct"] if info["direct"] else None, None, info)


def proxy_commands(ctx, t) -> str:
    """The header's description of a proxy row."""
    fio = shlex.join(fio_argv(ctx, t, 0, "OUT.json"))
    lines = ["server:      " + shlex.join(PROXY_UPSTREAM.argv(ctx, "SPORT", os.path.basename(ctx.files.get(
                 t.serves, FIXTURES[t.serves].file)))),
             "direct:      " + fio.replace("127.0.0.1:0", "127.0.0.1:SPORT"),
             "proxy:       " + shlex.join(proxy_argv(ctx, "PPORT", "SPORT"))
             + "   (started for this leg only)",
             "through it:  " + fio.replace("127.0.0.1:0", "127.0.0.1:PPORT"),
             "figure:      proxy %s / direct %s (fio's jobs[0].read); direct and proxy alternate "
             "going first, round by round; CPU: utime + stime of the server and of the proxy "
             "during each fio run / requests completed" % (t.params["figure"], t.params["figure"])]
    return ("\n" + " " * 21).join(lines)


def proxy_progress(m) -> str:
    i = m.info
    u = i["figure_unit"]
    return ("ratio %.3f  direct %s %s (server CPU %s us/req, p50 %s us)  proxy %s %s (server CPU %s us/req, "
            "proxy CPU %s us/req, p50 %s us)  %s first%s"
            % (m.value, fmt(i["direct"]), u, num(i["direct_server_cpu_us"], 1), num(i["direct_p50_us"], 1),
               fmt(i["proxy"]), u, num(i["proxy_server_cpu_us"], 1), num(i["proxy_cpu_us"], 1),
               num(i["proxy_p50_us"], 1), i["first"],
               "".join("  WARNING: only %.1f%% of %s I/O at depth 16" % (i[k + "_at_depth_pct"], k)
                       for k in ("direct", "proxy") if i[k + "_at_depth_pct"] < 90.0)))


def migration_commands(ctx, t) -> str:
    """The header's description of a migration row: command lines and what
    is timed."""
    src = os.path.basename(ctx.files.get(t.serves, FIXTURES[t.serves].file))
    pause = t.measure is measure_migration_pause
    source = migration_server("serve", "S.sock").argv(ctx, "SPORT", src)
    dest = migration_server("listen", "D.sock", "SPORT" if pause else None).argv(ctx, "DPORT", "DEST")
    mirror = [ctx.flexnbd, "mirror", "--sock", "S.sock", "--addr", HOST, "--port", "DPORT"]
    lines = ["source:      " + shlex.join(source),
             "destination: " + shlex.join(dest) + "   (DEST: a fresh file of the same size)"]
    writer = shlex.join(writer_fio_argv(ctx, 0, 0, "OUT.json")).replace(
        "127.0.0.1:0", "127.0.0.1:SPORT")
    if t.measure is measure_migration_writer:
        raw = "mirror %s DPORT exit 0.0.0.0 0 auto" % HOST
        lines += ["writer:      " + writer.replace("--runtime=0", "--runtime=LONG")
                  + "   from 0.5 s before the mirror until the hand-off closes its connection",
                  "timed:       control request `%s` (auto mode, no limit) until the source exits" % raw,
                  "reference:   the same migration without the writer, on the same image",
                  "order:       with and without the writer alternate going first, round by round; "
                  "both copies compared with the source once"]
        return ("\n" + " " * 21).join(lines)
    if t.measure is measure_writer_cost:
        lines += ["writer:      " + writer.replace("--runtime=0", "--runtime=%d" % ctx.runtime)
                  + "   three times on one source:",
                  "             1) no migration; 2) during `mirror %s DPORT exit 0.0.0.0 LIMIT background`; "
                  "3) during the same with `active`" % HOST,
                  "             LIMIT = image size / (%d x runtime) B/s, so that the migration outlasts "
                  "fio; each migration is stopped with `break` after fio" % WRITER_COST_SPAN,
                  "figures:     fio's jobs[0].write.iops and clat_ns percentile 99.000000 of each run"]
        return ("\n" + " " * 21).join(lines)
    if pause:
        lines += ["writer:      on SPORT, old-style NBD, 4 KiB WRITEs at random offsets, one at a time, "
                  "from 0.2 s before the mirror command until the source closes the connection",
                  "then:        " + shlex.join(mirror),
                  "reader:      once the writer's connection has closed, connects to SPORT every 2 ms and "
                  "READs the block of the last acknowledged write",
                  "figure:      time the first read was served (by the destination) - time the last write "
                  "was acknowledged (by the source); the block must hold that write"]
    else:
        lines += ["timed:       " + shlex.join(mirror) + "   from its start until the source exits",
                  "reference:   " + shlex.join(baseline_argv(ctx, src, "nbd://%s:PORT" % HOST))
                  + "   into " + shlex.join(baseline_server().argv(ctx, "PORT", "DEST"))
                  + ", a fresh DEST; timed: wall clock of nbdcopy",
                  "order:       migration and reference alternate going first, round by round; "
                  "both copies compared with the source once"]
    return ("\n" + " " * 21).join(lines)


# The pause row's time line: (info key, name), seconds after the last write
# acknowledged by the source.
PAUSE_STEPS = [
    ("to_closed", "writer closed"),
    ("to_all_acked", "all data acked"),
    ("to_durable", "durable (Prepared)"),
    ("to_committed", "Committed"),
    ("to_exit", "source exited"),
    ("to_rebound", "destination serving"),
    ("seconds", "first read"),
]


def migration_progress(test, m) -> str:
    """The progress line's figure and details for a migration trial."""
    i = m.info
    if test.measure is measure_proxy:
        return proxy_progress(m)
    if m.value is None:
        return "FAILED: %s" % i["failed"]
    if test.measure is measure_migration_writer:
        return ("%.2f s with the writer, %.2f s without (ratio %.2f); modes %s, active after %s s, "
                "%d passes, %d forwarded writes, %s sent as data, %d attempt(s)%s"
                % (m.value, i["baseline_seconds"], m.value / i["baseline_seconds"],
                   "->".join(i["modes"]) or "?", num(i.get("to_active")), i["passes"], i["forwarded"],
                   mib(i["sent"]), i["attempts"], "; bytes identical" if i.get("identical") else ""))
    if test.measure is measure_writer_cost:
        return ("writer IOPS / p99 us: idle %.0f / %.0f, background %.0f / %.0f, active %.0f / %.0f "
                "(link limit %.1f MB/s; forwarded writes: background %d, active %d; at the end: %s, %s)"
                % (i["idle_iops"], i["idle_p99_us"], i["background_iops"], i["background_p99_us"],
                   i["active_iops"], i["active_p99_us"], i["max_bps"] / 1e6, i["background_forwarded"],
                   i["active_forwarded"], i["background_progress"], i["active_progress"]))
    if test.measure is measure_migration_pause:
        steps = ", ".join("%s %s" % (name, num(i.get(key), 3)) for key, name in PAUSE_STEPS)
        return ("pause %.3f s  (after the last ack: %s; %d writes acknowledged; migration %.2f s; "
                "destination's failed binds: %d; read attempts: %d%s)"
                % (m.value, steps, i["writes"], i["migration_seconds"],
                   i["bind_retries"], i["read_attempts"], "; bytes identical" if i.get("identical") else ""))
    return ("%.2f s (all data acked %s s, durable %s s)  nbdcopy %.2f s (ratio %.2f)  sent %s as data + %s as zero ranges (source %s "
            "allocated; copies: %s, nbdcopy %s allocated)%s"
            % (m.value, num(i.get("to_all_acked")), num(i.get("to_durable")), i["baseline_seconds"],
               m.value / i["baseline_seconds"], mib(i["sent"]),
               mib(i["zeroed"]), mib(i["src_alloc"]), mib(i["dest_alloc"]), mib(i["baseline_dest_alloc"]),
               "; bytes identical" if i.get("identical") else ""))


def fio_test(id, label, rw, bs, iodepth, unit, target):
    return Test(id, label, unit, target, measure_fio,
                params={"rw": rw, "bs": bs, "iodepth": iodepth})


def qemu_img_bench_test(id, label, write, target):
    return Test(id, label, "MiB/s", target, measure_qemu_img_bench,
                params={"write": write, "bs": "1M", "bytes": MIB, "depth": 8})


# Targets (flexnbd / best other, at least), from the issue "Low-queue-depth
# latency": 4 KiB random read QD1 and 1 MiB sequential read QD1 1.1; every
# QD16 row 1.2; nbdcopy and qemu-img bench rows 1.0. They apply to every
# flexnbd variant (a variant's own target is only a floor). Server CPU per
# request: at most the best other's, on every row (CPU_TARGET).
TESTS = [
    fio_test("read-1m-qd1", "1 MiB sequential read, QD1", "read", "1M", 1, "MiB/s", 1.1),
    fio_test("write-1m-qd1", "1 MiB sequential write, QD1", "write", "1M", 1, "MiB/s", 1.0),
    fio_test("randread-4k-qd1", "4 KiB random read, QD1", "randread", "4k", 1, "IOPS", 1.1),
    fio_test("randread-4k-qd16", "4 KiB random read, QD16", "randread", "4k", 16, "IOPS", 1.2),
    fio_test("randwrite-4k-qd16", "4 KiB random write, QD16", "randwrite", "4k", 16, "IOPS", 1.2),
    Test("nbdcopy-read", "nbdcopy server -> null:", "MiB/s", 1.0, measure_nbdcopy,
         params={"direction": "read"}, cpu_unit="us/MiB"),
    Test("nbdcopy-write", "nbdcopy file -> server, --flush", "MiB/s", 1.0, measure_nbdcopy,
         params={"direction": "write", "source": "src"}, cpu_unit="us/MiB"),
    qemu_img_bench_test("qemu-img-bench-read", "qemu-img bench 1 MiB read, QD8", False, 1.0),
    qemu_img_bench_test("qemu-img-bench-write", "qemu-img bench 1 MiB write, QD8", True, 1.0),
    # qemu's read path as a whole-file copy, the plain twin of the TLS row
    # below (qemu-img bench cannot do TLS).
    Test("qemu-img-convert-read", "qemu-img convert server -> null-co", "MiB/s", 1.0,
         measure_qemu_img_convert, skip=("flexnbd-sync",), cpu_unit="us/MiB"),
    # TLS (x509, --tls require on every server): read throughput on the TLS
    # servers only; `plain` names the plain row the cost of TLS is taken
    # against (flexnbd-tls here / flexnbd-newstyle there, same run).
    Test("tls-nbdcopy-read", "TLS: nbdcopy nbds://server -> null:", "MiB/s", 1.0, measure_nbdcopy,
         params={"direction": "read", "plain": "nbdcopy-read"}, cpu_unit="us/MiB", tls=True),
    Test("tls-qemu-img-convert-read", "TLS: qemu-img convert server -> null-co (tls-creds-x509)", "MiB/s",
         1.0, measure_qemu_img_convert, params={"plain": "qemu-img-convert-read"}, cpu_unit="us/MiB",
         tls=True),
    # --sync-writes changes nothing on a copy from the server: not run.
    # Old-style flexnbd has no block status, so nbdcopy reads every byte of
    # it; it is shown for reference, without a verdict.
    Test("nbdcopy-sparse", "nbdcopy server -> new file, 10%-allocated image", "MiB/s", 1.0,
         measure_nbdcopy_sparse, serves="sparse10", skip=("flexnbd-sync",),
         notes={"flexnbd": "old-style, no block status"}, cpu_unit="us/MiB"),
    # Migration rows: once per round, flexnbd serve -> flexnbd listen, each
    # with its own target (a maximum: lower is better); see MigrationPair.
    Test("migrate-dense", "migration of the dense image vs. nbdcopy file -> flexnbd", "s", 1.3,
         measure_migration, serves="src", kind="migration"),
    Test("migrate-sparse", "migration of the 10%-allocated image vs. nbdcopy file -> flexnbd", "s", 1.3,
         measure_migration, serves="sparse10", kind="migration", params={"sent_target": 1.05}),
    Test("migrate-pause", "client-visible pause: last ack on the source -> first read on the destination",
         "s", 0.5, measure_migration_pause, serves="data", kind="migration"),
    # Active mirroring: a fio randwrite writer on the source (data.raw, which
    # the other writing rows write too; src.raw stays untouched).
    Test("migrate-writer", "auto-mode migration under a fio randwrite writer vs. without it", "s", 3.0,
         measure_migration_writer, serves="data", kind="migration"),
    Test("writer-cost", "the writer's IOPS and p99: no migration, background mode, active mode",
         "ratio", 0.0, measure_writer_cost, serves="data", kind="migration"),
    # flexnbd-proxy in front of flexnbd serve vs. flexnbd serve directly, both
    # at QD16 on one connection: throughput through the proxy / direct, at
    # least 0.8 (the proxy costs at most 20 %). Run like the migration rows.
    Test("proxy-randread-4k-qd16", "4 KiB random read, QD16: through flexnbd-proxy / direct",
         "ratio", 0.8, measure_proxy, serves="data", kind="migration",
         params={"rw": "randread", "bs": "4k", "iodepth": 16, "figure": "IOPS"}),
    Test("proxy-read-1m-qd16", "1 MiB sequential read, QD16: through flexnbd-proxy / direct",
         "ratio", 0.8, measure_proxy, serves="data", kind="migration",
         params={"rw": "read", "bs": "1M", "iodepth": 16, "figure": "MiB/s"}),
]


def fill_random(path, size):
    chunk = 4 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


SPARSE_REGIONS = 10
SPARSE_SIZE = 1 << 30  # the issue's "10%-allocated 1 GiB image", whatever --size is


def sparse_layout(size):
    """Ten random regions, each about 1 % of size (64 KiB aligned), at evenly
    spaced offsets: the image is 10 % allocated."""
    length = max(64 << 10, (size // 100) & ~0xFFFF)
    return [((i * size // SPARSE_REGIONS) & ~0xFFFF, length) for i in range(SPARSE_REGIONS)]


def fill_sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in sparse_layout(size):
            f.seek(off)
            left = length
            while left:
                n = min(4 * MIB, left)
                f.write(os.urandom(n))
                left -= n
        f.flush()
        os.fsync(f.fileno())
    want = sum(length for _, length in sparse_layout(size))
    if allocated(path) > 2 * want:
        print("warning: %s has %s allocated, expected about %s: its file system does not "
              "keep holes, so the sparse row measures nothing sparse"
              % (path, human(allocated(path)), human(want)), file=sys.stderr)


@dataclass
class Fixture:
    file: str
    create: Callable[[str, "Ctx"], None]
    what: Callable[["Ctx"], str]  # for the progress line
    disk: Callable[["Ctx"], int]  # bytes it (and what the tests write next to it) may take


FIXTURES = {
    "data": Fixture("data.raw", lambda path, ctx: fill_random(path, ctx.size),
                    lambda c: "%s of random data" % human(c.size), lambda c: c.size),
    "src": Fixture("src.raw", lambda path, ctx: fill_random(path, ctx.size),
                   lambda c: "%s of random data" % human(c.size), lambda c: c.size),
    "probe": Fixture("probe.raw", lambda path, ctx: fill_random(path, PROBE_SIZE),
                     lambda c: "%s of random data" % human(PROBE_SIZE), lambda c: PROBE_SIZE),
    # the copy made next to it may be dense if a server gets it wrong
    "sparse10": Fixture("sparse10.raw", lambda path, ctx: fill_sparse(path, SPARSE_SIZE),
                        lambda c: "%s, %d random regions, 10%% allocated" % (human(SPARSE_SIZE), SPARSE_REGIONS),
                        lambda c: SPARSE_SIZE // 10 + SPARSE_SIZE),
}


# --------------------------------------------------------------------------
# Run context, environment description.


class Ctx:
    def __init__(self, args):
        self.rounds = args.rounds
        self.runtime = args.runtime
        self.size = args.size
        self.flexnbd = args.flexnbd
        self.workdir = None
        self.tls_dir = "TLS_DIR"  # set by prepare()
        self.files: Dict[str, str] = {}
        self.sparse_checked: Dict[str, Dict[str, object]] = {}  # server id -> block-status map
        self.migration_checked: set = set()  # migration rows whose copies were compared
        self.round = 0
        self.conditions: List[str] = args.conditions
        self.probes: Dict[str, Dict[str, object]] = {}
        self.nbdcopy_extra = (["--connections=%d" % args.nbdcopy_connections]
                              if args.nbdcopy_connections else [])


def parse_size(text: str) -> int:
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            n = int(float(t[:-1]) * mult[t[-1]])
        else:
            n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError("bad size %r (use e.g. 1G, 256M)" % text)
    if n < 16 * MIB or n % MIB:
        raise argparse.ArgumentTypeError("size must be a whole number of MiB, at least 16M")
    return n


def human(n: int) -> str:
    return "%d GiB" % (n >> 30) if n % (1 << 30) == 0 else "%d MiB" % (n >> 20)


def first_line(argv) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, timeout=10)
        text = (r.stdout or r.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def fs_type(path: str) -> str:
    best, kind = "", "?"
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cached_pct(path: str) -> Optional[float]:
    if not shutil.which("fincore"):
        return None
    try:
        r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                           capture_output=True, timeout=30)
        return 100.0 * int(r.stdout.split()[0]) / os.path.getsize(path)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def git_describe() -> str:
    try:
        r = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=12"],
                           capture_output=True, timeout=10)
        return r.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def check_tools(ctx, servers, tests):
    needed: Dict[str, List[str]] = {}
    for s in servers:
        needed.setdefault(s.tool(ctx), []).append("server %s" % s.id)
    for t in tests:
        if t.kind == "migration":
            if runs_on(t, servers):
                needed.setdefault(ctx.flexnbd, []).append("test %s" % t.id)
                if t.measure is measure_migration:
                    needed.setdefault("nbdcopy", []).append("test %s" % t.id)
                if t.measure in (measure_migration_writer, measure_writer_cost, measure_proxy):
                    needed.setdefault("fio", []).append("test %s" % t.id)
                if t.measure is measure_proxy:
                    needed.setdefault(proxy_binary(ctx), []).append("test %s" % t.id)
            continue
        tool = {measure_fio: "fio", measure_qemu_img_bench: "qemu-img",
                measure_qemu_img_convert: "qemu-img"}.get(t.measure, "nbdcopy")
        needed.setdefault(tool, []).append("test %s" % t.id)
        if t.measure is measure_nbdcopy_sparse:
            needed.setdefault("nbdinfo", []).append("test %s" % t.id)
    if probed_servers(tests, servers):
        needed.setdefault("nbdcopy", []).append("probing the servers")
        needed.setdefault("nbdinfo", []).append("probing the servers")
    needed.setdefault("cat", []).append("page-caching the files")
    if any(s.tls for s in probed_servers(tests, servers)):
        needed.setdefault("openssl", []).append("making the TLS credentials")
    missing = []
    for tool, whys in needed.items():
        why = ", ".join(whys)
        found = (os.access(tool, os.X_OK) and os.path.isfile(tool)) if os.sep in tool else shutil.which(tool)
        if not found:
            missing.append("  %s (needed for %s)" % (tool, why))
    if missing:
        raise BenchError(
            "missing tools:\n%s\n(Debian: apt-get install qemu-utils nbdkit libnbd-bin fio; "
            "flexnbd: cargo build --release, or --flexnbd PATH)" % "\n".join(missing)
        )


def probe(ctx, server) -> Dict[str, object]:
    """Start the server on a small file, ask nbdinfo what it advertises and
    nbdcopy how many connections it would open. Also proves early that every
    server starts, before the long part of the run."""
    with Running(ctx, server, ctx.files["probe"]) as srv:
        uri = nbd_uri(ctx, server, srv.port)
        _, out, _ = run_client(["nbdinfo", "--json", "--no-content", uri], 30, "nbdinfo")
        info = json.loads(out)
        exp = info["exports"][0]
        flags = [k[4:] for k in sorted(exp) if k.startswith("can_") and exp[k] is True]
        contexts = exp.get("contexts") or []
        _, _, err = run_client(["nbdcopy", "-v"] + ctx.nbdcopy_extra + [uri, "null:"], 60, "nbdcopy")
        conns = "?"
        for line in err.splitlines():
            if line.startswith("nbdcopy: connections="):
                conns = line.split()[1].split("=")[1]
        return {
            "protocol": info.get("protocol", "?"),
            "structured": info.get("structured"),
            "flags": flags,
            "contexts": contexts,
            "nbdcopy_connections": conns,
        }


# --------------------------------------------------------------------------
# Results.


CPU_TARGET = 1.0  # server CPU per request: flexnbd / best other, at most


def is_qd1(test) -> bool:
    """fio rows with one request at a time: their p50 is shown next to the figure."""
    return test.measure is measure_fio and test.params.get("iodepth") == 1


class Results:
    """Trials keyed by (test id, server id, condition). Migration rows run
    under the first condition only (self.migration_condition)."""

    def __init__(self, tests, servers, conditions=("quiet",)):
        self.tests, self.servers = tests, servers
        self.conditions = list(conditions)
        self.migration_condition = self.conditions[0]
        self.trials: Dict[tuple, List[Measurement]] = {}

    def add(self, test, server, m, cond):
        self.trials.setdefault((test.id, server.id, cond), []).append(m)

    def _ms(self, test, server, cond) -> List[Measurement]:
        return self.trials.get((test.id, server.id, cond), [])

    def median(self, test, server, cond) -> Optional[float]:
        ms = self._ms(test, server, cond)
        return statistics.median(m.value for m in ms) if ms else None

    def lat_median(self, test, server, cond) -> Optional[float]:
        ls = [m.lat_us for m in self._ms(test, server, cond) if m.lat_us is not None]
        return statistics.median(ls) if ls else None

    def cpu_median(self, test, server, cond) -> Optional[float]:
        """Median server CPU per request (or per MiB: test.cpu_unit), in us."""
        cs = [m.info["cpu_us"] for m in self._ms(test, server, cond) if "cpu_us" in m.info]
        return statistics.median(cs) if cs else None

    def spread(self, test, server, cond) -> Optional[float]:
        return spread_pct([m.value for m in self._ms(test, server, cond)])

    def best_reference(self, test, cond, getter=None, lowest=False):
        """(server, median) of the best reference server: highest figure, or
        lowest (CPU) with lowest=True."""
        getter = getter or self.median
        best = None
        for s in self.servers:
            if s.role != "reference":
                continue
            v = getter(test, s, cond)
            if v is not None and (best is None or (v < best[1] if lowest else v > best[1])):
                best = (s, v)
        return best

    @staticmethod
    def target_of(test, server) -> float:
        """The row's target; a variant's own target is a floor."""
        return max(test.target, server.target) if server.target is not None else test.target

    def verdict(self, test, server, cond):
        """(median, best other, ratio, verdict) of a candidate on a row."""
        v = self.median(test, server, cond)
        if v is None:
            return None, None, None, "-"
        best = self.best_reference(test, cond)
        if best is None or not best[1]:
            return v, best, None, "n/a"
        ratio = v / best[1]
        verdict = "PASS" if ratio >= self.target_of(test, server) else "MISS"
        return v, best, ratio, "info" if test.notes.get(server.id) else verdict

    def cpu_verdict(self, test, server, cond):
        """(CPU per request, best (lowest) other, ratio, verdict)."""
        v = self.cpu_median(test, server, cond)
        if v is None:
            return None, None, None, "-"
        best = self.best_reference(test, cond, self.cpu_median, lowest=True)
        if best is None or not best[1]:
            return v, best, None, "n/a"
        ratio = v / best[1]
        verdict = "PASS" if ratio <= CPU_TARGET else "MISS"
        return v, best, ratio, "info" if test.notes.get(server.id) else verdict

    def ratio_header(self):
        head = ["test", "server", "unit", "target"]
        qd1 = any(is_qd1(t) for t in self.tests)
        for c in self.conditions:
            head += ["%s: median" % c] + (["p50 us"] if qd1 else []) + ["best other", "ratio", "result"]
        return head

    def ratio_rows(self):
        """One row per (test, candidate): target, then per condition side by
        side: median (and p50 for QD1 rows), best other, ratio, verdict."""
        rows = []
        qd1 = any(is_qd1(t) for t in self.tests)
        for t in self.tests:
            for s in self.servers:
                if s.role != "candidate" or not any(self._ms(t, s, c) for c in self.conditions):
                    continue
                note = t.notes.get(s.id)
                row = [t.id, s.label + (" (%s)" % note if note else ""), t.unit,
                       "-" if note else ">= %.2f" % self.target_of(t, s)]
                for c in self.conditions:
                    v, best, ratio, verdict = self.verdict(t, s, c)
                    row.append(fmt(v))
                    if qd1:
                        row.append(fmt(self.lat_median(t, s, c), 1) if is_qd1(t) else "")
                    row += ["%s %s" % (best[0].id, fmt(best[1])) if best else "-",
                            "%.2f" % ratio if ratio is not None else "-", verdict]
                rows.append(row)
        return rows

    def cpu_header(self):
        head = ["test", "server", "unit", "target"]
        for c in self.conditions:
            head += ["%s: CPU" % c, "best other", "ratio", "result"]
        return head

    def cpu_rows(self):
        """One row per (test, candidate): server CPU per request (or per MiB)
        against the lowest of the references, per condition side by side."""
        rows = []
        for t in self.tests:
            if t.kind != "server":
                continue
            for s in self.servers:
                if s.role != "candidate" or not any(self._ms(t, s, c) for c in self.conditions):
                    continue
                note = t.notes.get(s.id)
                row = [t.id, s.label + (" (%s)" % note if note else ""), t.cpu_unit,
                       "-" if note else "<= %.2f" % CPU_TARGET]
                for c in self.conditions:
                    v, best, ratio, verdict = self.cpu_verdict(t, s, c)
                    row += [fmt(v), "%s %s" % (best[0].id, fmt(best[1])) if best else "-",
                            "%.2f" % ratio if ratio is not None else "-", verdict]
                rows.append(row)
        return rows

    def sparse_rows(self, test):
        """Per (server, condition) on a sparse-copy row: time, allocation of
        the copy, the content check and what the server reported as block
        status."""
        rows = []
        for s in self.servers:
            for c in self.conditions:
                ms = self._ms(test, s, c)
                if not ms:
                    continue
                first = next((m.info for m in ms if "map" in m.info), {})
                if not first:  # checked once per server, maybe under the other condition
                    first = next((m.info for cc in self.conditions for m in self._ms(test, s, cc)
                                  if "map" in m.info), {})
                rows.append([
                    s.id, c, fmt(statistics.median(m.value for m in ms)),
                    "%.2f" % statistics.median(m.info["seconds"] for m in ms),
                    mib(ms[0].info["src_alloc"]),
                    mib(statistics.median(m.info["dest_alloc"] for m in ms)),
                    "yes" if first.get("identical") else "?",
                    map_text(first["map"]) if "map" in first else "?",
                ])
        return rows

    def median_rows(self, getter, digits=None, unit=None):
        """One row per (test, condition), one column per server."""
        rows = []
        for t in self.tests:
            for c in self.conditions:
                cells = [getter(t, s, c) for s in self.servers]
                if all(x is None for x in cells):
                    continue
                rows.append([t.id, c, unit(t) if unit else t.unit]
                            + [fmt(x, digits) if x is not None else "-" for x in cells])
        return rows

    def figure_cpu_rows(self):
        """Medians, all servers: 'figure (CPU)' per server, per (test, condition)."""
        rows = []
        for t in self.tests:
            if t.kind != "server":
                continue
            for c in self.conditions:
                cells = []
                for s in self.servers:
                    v = self.median(t, s, c)
                    cpu = self.cpu_median(t, s, c)
                    cells.append("-" if v is None else fmt(v) if cpu is None
                                 else "%s (%s)" % (fmt(v), fmt(cpu)))
                if all(x == "-" for x in cells):
                    continue
                rows.append([t.id, c, "%s (%s)" % (t.unit, t.cpu_unit)] + cells)
        return rows

    def has_server_trials(self) -> bool:
        return any(sid != MIGRATION.id for _, sid, _ in self.trials)

    def migration_trials(self, test) -> List[Measurement]:
        if test.kind != "migration":
            return []
        return self.trials.get((test.id, MIGRATION.id, self.migration_condition), [])

    def migration_rows(self):
        """The verdicts of the migration rows: medians of the trials that
        completed; a row with a failed trial is FAIL whatever its figures."""
        rows = []
        for t in self.tests:
            ms = self.migration_trials(t)
            if not ms or t.measure is measure_proxy:
                continue
            ok = [m for m in ms if m.value is not None]
            failed = len(ms) - len(ok)
            fail = "FAIL (%d of %d trials did not complete)" % (failed, len(ms)) if failed else None
            med = statistics.median(m.value for m in ok) if ok else None
            if t.measure is measure_writer_cost:
                def cost(key):
                    vs = [m.info[key] for m in ok if key in m.info]
                    return statistics.median(vs) if vs else None
                for what, suffix, digits in (("write IOPS", "_iops", 0), ("p99 latency (us)", "_p99_us", 0)):
                    idle = cost("idle" + suffix)
                    for mode in ("background", "active"):
                        v = cost(mode + suffix)
                        rows.append([t.id, "%s during %s (reference: no migration)" % (what, mode),
                                     num(v, digits), num(idle, digits),
                                     num(v / idle if v is not None and idle else None), "-", fail or "info"])
                continue
            if t.measure is measure_migration_writer:
                base = [m.info["baseline_seconds"] for m in ok]
                bmed = statistics.median(base) if base else None
                ratio = med / bmed if med is not None and bmed else None
                verdict = fail or ("PASS" if ratio is not None and ratio <= t.target else "MISS")
                rows.append([t.id, "time with the writer, s (reference: without)", num(med), num(bmed),
                             num(ratio), "<= %.2f" % t.target, verdict])
                continue
            if t.measure is measure_migration_pause:
                verdict = fail or ("PASS" if med < t.target else "MISS")
                rows.append([t.id, "pause, s", num(med, 3), "-", "-", "< %.2f" % t.target, verdict])
                continue
            base = [m.info["baseline_seconds"] for m in ms if "baseline_seconds" in m.info]
            bmed = statistics.median(base) if base else None
            ratio = med / bmed if med is not None and bmed else None
            verdict = fail or ("PASS" if ratio <= t.target else "MISS")
            rows.append([t.id, "time, s (reference: nbdcopy)", num(med), num(bmed), num(ratio),
                         "<= %.2f" % t.target, verdict])
            if "sent_target" in t.params and ok:
                sent = statistics.median(m.info["sent"] for m in ok)
                alloc = ok[0].info["src_alloc"]
                r = sent / alloc if alloc else None
                target = t.params["sent_target"]
                rows.append([t.id, "sent as data (reference: source allocated)", mib(sent), mib(alloc),
                             num(r, 3), "<= %.2f" % target,
                             fail or ("PASS" if r is not None and r <= target else "MISS")])
        return rows

    def proxy_rows(self):
        """The proxy rows: per row, median ratio with its verdict, the median
        throughputs, CPU per request and p50s of both legs."""
        rows = []
        for t in self.tests:
            ms = self.migration_trials(t) if t.measure is measure_proxy else []
            if not ms:
                continue

            def med(key):
                vs = [m.info[key] for m in ms if m.info.get(key) is not None]
                return statistics.median(vs) if vs else None

            ratio = statistics.median(m.value for m in ms)
            rows.append([t.id, t.params["figure"], fmt(med("direct")), fmt(med("proxy")), "%.3f" % ratio,
                         ">= %.2f" % t.target, "PASS" if ratio >= t.target else "MISS",
                         num(med("direct_server_cpu_us"), 1), num(med("proxy_server_cpu_us"), 1),
                         num(med("proxy_cpu_us"), 1), num(med("direct_p50_us"), 1),
                         num(med("proxy_p50_us"), 1),
                         num(spread_pct([m.value for m in ms]), 0)])
        return rows

    def proxy_summary(self):
        out = []
        for t in self.tests:
            ms = self.migration_trials(t) if t.measure is measure_proxy else []
            if not ms:
                continue
            ratio = statistics.median(m.value for m in ms)

            def med(key):
                vs = [m.info[key] for m in ms if m.info.get(key) is not None]
                return statistics.median(vs) if vs else None

            out.append({"test": t.id, "server": "flexnbd-proxy", "condition": self.migration_condition,
                        "unit": "ratio", "median": ratio, "target": t.target,
                        "result": "PASS" if ratio >= t.target else "MISS", "figure_unit": t.params["figure"],
                        **{k: med(k) for k in ("direct", "proxy", "direct_server_cpu_us",
                                               "proxy_server_cpu_us", "proxy_cpu_us", "direct_p50_us",
                                               "proxy_p50_us")},
                        "trials": len(ms)})
        return out

    def migration_copy_rows(self):
        rows = []
        for t in self.tests:
            ms = self.migration_trials(t)
            if t.measure is not measure_migration or not ms:
                continue
            ok = [m for m in ms if m.value is not None]
            base = [m.info["baseline_seconds"] for m in ms if "baseline_seconds" in m.info]
            size = ms[0].info["size"]

            def med(key, among=ok):
                vs = [m.info[key] for m in among if key in m.info]
                return statistics.median(vs) if vs else None

            mig, bas = med("seconds"), med("baseline_seconds", ms)
            checked = [m for m in ms if "identical" in m.info or "baseline_identical" in m.info]
            ident = "?"
            if checked:
                ident = "yes / yes" if all(m.info.get("identical") and m.info.get("baseline_identical")
                                           for m in checked) else "?"
            rows.append([
                t.id, num(mig), fmt(size / MIB / mig if mig else None),
                "%s / %s" % (num(med("to_all_acked")), num(med("to_durable"))), num(bas),
                fmt(size / MIB / bas if bas else None),
                mib(med("sent")) if ok else "-", mib(med("zeroed")) if ok else "-",
                "%d" % max(m.info["attempts"] for m in ok) if ok else "-",
                mib(ms[0].info["src_alloc"]), mib(med("dest_alloc")) if ok else "-",
                mib(med("baseline_dest_alloc", ms)) if base else "-", ident,
                "%s / %s" % (num(spread_pct([m.value for m in ok]), 0), num(spread_pct(base), 0)),
            ])
        return rows

    def migration_pause_rows(self):
        rows = []
        for t in self.tests:
            ms = [m for m in self.migration_trials(t) if m.value is not None]
            if t.measure is not measure_migration_pause or not ms:
                continue

            def med(key, digits=3):
                vs = [m.info[key] for m in ms if key in m.info]
                return num(statistics.median(vs), digits) if vs else "-"

            vs = [m.value for m in ms]
            rows.append([t.id, "%s - %s" % (num(min(vs), 3), num(max(vs), 3))]
                        + [med(key) for key, _ in PAUSE_STEPS]
                        + [med("writes", 0), med("migration_seconds", 2), med("bind_retries", 0),
                           med("read_attempts", 0), "yes" if any(m.info.get("identical") for m in ms) else "?"])
        return rows

    def migration_writer_rows(self):
        """migrate-writer: per trial, how the auto-mode migration went."""
        rows = []
        for t in self.tests:
            if t.measure is not measure_migration_writer:
                continue
            for i, m in enumerate(self.migration_trials(t)):
                if m.value is None:
                    continue
                x = m.info
                rows.append([t.id, str(i + 1), num(m.value), num(x["baseline_seconds"]),
                             num(m.value / x["baseline_seconds"]), "->".join(x["modes"]) or "?",
                             num(x.get("to_active")), str(x["passes"]), str(x["forwarded"]),
                             mib(x["sent"]), str(x["attempts"]), "yes" if x.get("identical") else "?"])
        return rows

    def migration_failures(self):
        rows = []
        for t in self.tests:
            for i, m in enumerate(self.migration_trials(t)):
                if m.value is None:
                    rows.append([t.id, str(i + 1), m.info.get("failed", "?")])
        return rows

    def to_json(self):
        """Every trial, keyed "test/server", each with its condition."""
        out: Dict[str, list] = {}
        for (tid, sid, cond), v in self.trials.items():
            out.setdefault("%s/%s" % (tid, sid), []).extend(
                {"condition": cond, "value": m.value, "lat_us": m.lat_us, **m.info} for m in v)
        return out

    def summary_json(self):
        """Medians, ratios and verdicts per (test, server, condition),
        including server CPU per request (cpu_us, in cpu_unit) and its ratio
        to the lowest reference (lower is better)."""
        out = []
        for t in self.tests:
            if t.kind != "server":
                continue
            for s in self.servers:
                for c in self.conditions:
                    if not self._ms(t, s, c):
                        continue
                    e: Dict[str, object] = {
                        "test": t.id, "server": s.id, "condition": c, "unit": t.unit,
                        "median": self.median(t, s, c), "p50_us": self.lat_median(t, s, c),
                        "cpu_unit": t.cpu_unit, "cpu_us": self.cpu_median(t, s, c),
                        "trials": len(self._ms(t, s, c)),
                    }
                    if s.role == "candidate":
                        _, best, ratio, verdict = self.verdict(t, s, c)
                        e.update(target=self.target_of(t, s), best_other=best[0].id if best else None,
                                 ratio=ratio, result=verdict)
                        _, cbest, cratio, cverdict = self.cpu_verdict(t, s, c)
                        e.update(cpu_target=CPU_TARGET, cpu_best_other=cbest[0].id if cbest else None,
                                 cpu_ratio=cratio, cpu_result=cverdict)
                    out.append(e)
        return out + self.proxy_summary()


def num(v, digits=2) -> str:
    return "-" if v is None else "%.*f" % (digits, v)


def spread_pct(vs) -> Optional[float]:
    """(max - min) / median, percent; None with fewer than two values."""
    if len(vs) < 2:
        return None
    med = statistics.median(vs)
    return 100.0 * (max(vs) - min(vs)) / med if med else None


def mib(n) -> str:
    return "%.1f MiB" % (n / MIB)


def map_text(m) -> str:
    if not m.get("block_status"):
        return "no block status (all data)"
    return "%d data extents, %s data" % (m["data_extents"], mib(m["data_bytes"]))


def fmt(v, digits=None) -> str:
    if v is None:
        return "-"
    if digits is not None:
        return "%.*f" % (digits, v)
    if v >= 1000:
        return "%.0f" % v
    if v >= 100:
        return "%.1f" % v
    return "%.2f" % v


def text_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(
            str(c).ljust(w) if i < 2 or not _numeric(c) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _numeric(c) -> bool:
    try:
        float(str(c))
        return True
    except ValueError:
        return False


def md_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def conditions_text(conditions) -> str:
    what = {"quiet": "quiet = nothing else started by the script",
            "busy": "busy = %d CPU-bound loops (%s) running beside the servers during each row's trials"
                    % (BUSY_HOGS, shlex.join(BUSY_ARGV[:3] + ["python3"] + BUSY_ARGV[4:]))}
    return "; ".join(what[c] for c in conditions)


def render(results, ctx, env, partial, table):
    """The result tables, with `table` as the table formatter."""
    ids = [s.id for s in results.servers]
    parts = []
    title = "Results" + (" (PARTIAL: run did not complete)" if partial else "")
    cond_title = ("conditions %s side by side" % " / ".join(results.conditions)
                  if len(results.conditions) > 1 else "condition %s" % results.conditions[0])
    if results.has_server_trials():
        ratio_rows = results.ratio_rows()
        if ratio_rows:
            done = max(len(v) for (_, sid, _), v in results.trials.items() if sid != MIGRATION.id)
            parts.append((title + ": flexnbd variants vs. the best other server, median of %d round(s), %s "
                          "(%s); higher is better%s"
                          % (done, cond_title, conditions_text(results.conditions),
                             "; p50 us: fio completion latency p50 of the variant on QD1 rows"
                             if any(is_qd1(t) for t in results.tests) else ""),
                          table(results.ratio_header(), ratio_rows)))
            cpu_rows = results.cpu_rows()
            if cpu_rows:
                parts.append(("Server CPU (utime + stime) per request in microseconds (us/MiB: per MiB "
                              "moved, for nbdcopy rows, whose request count is not known), median of "
                              "rounds, %s; LOWER is better; ratio = flexnbd / lowest other server, "
                              "PASS when ratio <= %.2f" % (cond_title, CPU_TARGET),
                              table(results.cpu_header(), cpu_rows)))
        else:
            title = "(no ratios: the selected servers lack a flexnbd variant or a reference) " + title
        head = ("Medians, all servers: figure (server CPU per request, us; or per MiB where the unit "
                "says us/MiB); figure higher is better, CPU lower is better")
        parts.append((title + ": " + head if not ratio_rows else head,
                      table(["test", "condition", "unit"] + ids, results.figure_cpu_rows())))
        title = None
        for t in results.tests:
            if t.measure is measure_nbdcopy_sparse:
                rows = results.sparse_rows(t)
                if rows:
                    parts.append(("%s: %s; median time and copy allocation, content checked once per server"
                                  % (t.id, t.label),
                                  table(["server", "condition", "MiB/s", "seconds", "source allocated",
                                         "copy allocated", "bytes identical",
                                         "server's block status (nbdinfo --map)"], rows)))
        lat = results.median_rows(results.lat_median, 1, unit=lambda t: "us")
        if lat:
            parts.append(("fio completion latency p50 in microseconds, median of rounds (lower is better)",
                          table(["test", "condition", "unit"] + ids, lat)))
        spread = results.median_rows(results.spread, 0, unit=lambda t: "%")
        if ctx.rounds > 1 and spread:
            parts.append(("Spread: (max - min) / median across rounds, percent",
                          table(["test", "condition", "unit"] + ids, spread)))
    proxy = proxy_parts(results, table, title)
    if proxy:
        title = None
    parts += proxy
    parts += migration_parts(results, table, title)
    return parts


def proxy_parts(results, table, title):
    """The proxy rows' table. title: the Results title when there are no
    other tables (it carries the PARTIAL mark)."""
    rows = results.proxy_rows()
    if not rows:
        return []
    done = max(len(results.migration_trials(t)) for t in results.tests if t.measure is measure_proxy)
    head = (title + ": proxy" if title else "Proxy")
    return [(head + ", fio through flexnbd-proxy vs. directly against the same flexnbd serve, median of "
             "%d round(s), condition %s; ratio = proxy / direct throughput, HIGHER is better, PASS when "
             ">= target; CPU in us per request (server: flexnbd serve during each leg; proxy: "
             "flexnbd-proxy itself), lower is better" % (done, results.migration_condition),
             table(["test", "unit", "direct", "proxy", "ratio", "target", "result", "server CPU direct",
                    "server CPU proxied", "proxy CPU", "p50 us direct", "p50 us proxy", "spread %"],
                   rows))]


def migration_parts(results, table, title):
    """The migration tables: verdicts, then the details of each kind of row,
    then the reasons of failed trials. title: the Results title when there
    are no other tables (it carries the PARTIAL mark)."""
    rows = results.migration_rows()
    if not rows:
        return []
    done = max(len(results.migration_trials(t)) for t in results.tests)
    head = (title + ": migration" if title else "Migration")
    parts = [(head + ", flexnbd serve -> flexnbd listen on loopback, median of %d round(s), condition %s; "
              "LOWER is better for every figure; ratio = migration / reference, PASS when ratio <= target "
              "(pause: when below the target)" % (done, results.migration_condition),
              table(["test", "figure", "migration", "reference", "ratio", "target", "result"], rows))]
    copy = results.migration_copy_rows()
    if copy:
        parts.append(("migrate-dense / migrate-sparse: median seconds (MiB/s of the image size), the "
                      "last attempt's bytes as the source's log reports them, allocation of the copies; "
                      "reference = nbdcopy --flush FILE into flexnbd --newstyle on a fresh file",
                      table(["test", "migration s", "MiB/s", "acked / durable s", "nbdcopy s", "MiB/s", "sent as data",
                             "as zero ranges", "attempts", "source allocated", "copy allocated",
                             "nbdcopy's copy", "bytes identical", "spread % (mig / nbdcopy)"], copy)))
    pause = results.migration_pause_rows()
    if pause:
        parts.append(("migrate-pause: time line, medians in seconds after the last write acknowledged by "
                      "the source (steps from the servers' logs, millisecond resolution); 'first read' "
                      "is the pause",
                      table(["test", "pause min - max"] + [name for _, name in PAUSE_STEPS]
                            + ["writes acked", "migration s", "failed binds", "read attempts",
                               "bytes identical"], pause)))
    writer = results.migration_writer_rows()
    if writer:
        parts.append(("migrate-writer: per round, seconds from the mirror command to the source's exit with "
                      "and without the fio writer, and what the source's status showed (polled every 0.1 s)",
                      table(["test", "round", "with writer s", "without s", "ratio", "modes seen",
                             "active after s", "passes", "forwarded writes", "sent as data", "attempts",
                             "bytes identical"], writer)))
    failed = results.migration_failures()
    if failed:
        parts.append(("Migration trials that did not complete", table(["test", "round", "what happened"], failed)))
    return parts


# --------------------------------------------------------------------------
# Main flow.


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)

    ctx = Ctx(args)
    tests = select(TESTS, args.only, "test")
    servers = select(SERVERS, args.servers, "server")
    if not any(runs_on(t, servers) for t in tests):
        raise SystemExit("nothing to run: %s not run on %s" % (
            "/".join(s.id for s in servers), ", ".join(t.id for t in tests)))
    results = Results(tests, servers, ctx.conditions)
    env: Dict[str, object] = {}
    status = 0
    completed = False
    try:
        if not args.no_build and not args.flexnbd_given and any(s.tool(ctx) == ctx.flexnbd for s in servers):
            build_flexnbd()
        check_tools(ctx, servers, tests)
        prepare(ctx, args, tests, servers)
        env = describe(ctx, args, servers, tests)
        print_header(env)
        run_matrix(ctx, tests, servers, results)
        completed = True
        env["cached_end"] = {n: cached_pct(p) for n, p in ctx.files.items() if n != "probe"}
    except BenchError as e:
        print("\nerror: %s" % e, file=sys.stderr)
        status = 1
    except (Interrupted, KeyboardInterrupt):
        print("\ninterrupted; stopping servers", file=sys.stderr)
        status = 130
    finally:
        stop_all()
        if ctx.workdir and not args.keep:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
        elif ctx.workdir:
            print("kept %s" % ctx.workdir, file=sys.stderr)

    if results.trials:
        report(results, ctx, env, args, partial=not completed)
    return status


def _raise_interrupted(signum, frame):
    # Restore defaults so that a second signal during cleanup is not caught
    # again mid-way; cleanup itself is bounded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted()


def select(items, wanted, what):
    if not wanted:
        return [i for i in items if getattr(i, "by_default", True)]
    ids = [w.strip() for w in wanted.split(",") if w.strip()]
    known = {i.id: i for i in items}
    bad = [w for w in ids if w not in known]
    if bad:
        raise SystemExit("unknown %s(s): %s (known: %s)" % (what, ", ".join(bad), ", ".join(known)))
    return [i for i in items if i.id in ids]  # keep table order


def build_flexnbd():
    print("building flexnbd: cargo build --release (pass --no-build to skip)", file=sys.stderr, flush=True)
    if not shutil.which("cargo"):
        raise BenchError("cargo not found; build flexnbd yourself and pass --flexnbd PATH or --no-build")
    proc = spawn(["cargo", "build", "--release", "--manifest-path", os.path.join(REPO, "Cargo.toml")],
                 None, None)
    try:
        proc.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        raise BenchError("cargo build --release took more than 30 minutes")
    finally:
        stop(proc, term_timeout=5)
    if proc.returncode != 0:
        raise BenchError("cargo build --release failed (exit %s)" % proc.returncode)


def prepare(ctx, args, tests, servers):
    if not os.path.isdir(args.dir):
        raise BenchError("--dir %s is not a directory" % args.dir)
    fixtures = ["probe"] + sorted({t.serves for t in tests} |
                                  {t.params["source"] for t in tests if "source" in t.params})
    need = sum(FIXTURES[f].disk(ctx) for f in fixtures)
    # a migration row's destination (and its baseline's), one at a time; as
    # large as the source if it came out dense
    need += max([SPARSE_SIZE if t.serves == "sparse10" else ctx.size
                 for t in tests if t.kind == "migration" and t.measure is not measure_proxy] or [0])
    free = shutil.disk_usage(args.dir).free
    if free < need + 256 * MIB:
        raise BenchError("%s has %s free; the run needs %s" % (args.dir, human(free), human(need)))
    avail = mem_available()
    if avail is not None and avail < need + 512 * MIB:
        print("warning: only %s of memory available for %s of files: they may not stay page-cached"
              % (human(avail), human(need)), file=sys.stderr)
    kind = fs_type(args.dir)
    if kind != "ext4":
        print("warning: %s is on %s, not ext4" % (args.dir, kind), file=sys.stderr)
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-bench.", dir=args.dir)
    ctx.tls_dir = os.path.join(ctx.workdir, "tls")
    if any(s.tls for s in probed_servers(tests, servers)):
        print("making TLS credentials in %s (openssl)" % ctx.tls_dir, file=sys.stderr, flush=True)
        make_tls_credentials(ctx.tls_dir)
    to_probe = probed_servers(tests, servers)
    for name in fixtures:
        if name != "probe" and to_probe and not ctx.probes:
            # Probe first: a server that does not start fails the run in
            # seconds, before the big files are written.
            print("probing the servers", file=sys.stderr, flush=True)
            ctx.probes = {s.id: probe(ctx, s) for s in to_probe}
        fix = FIXTURES[name]
        path = os.path.join(ctx.workdir, fix.file)
        print("creating %s (%s)" % (path, fix.what(ctx)), file=sys.stderr, flush=True)
        fix.create(path, ctx)
        # Read it once so that it is in the page cache: the servers then
        # compete on protocol handling and copying, not on the disk.
        with open(os.devnull, "wb") as null:
            r = subprocess.run(["cat", path], stdout=null, timeout=600)
        if r.returncode != 0:
            raise BenchError("cat %s failed" % path)
        ctx.files[name] = path


def describe(ctx, args, servers, tests):
    dummy_port = "PORT"
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "memory": human((mem_available() or 0) // MIB * MIB) + " available",
        "dir": "%s (%s)" % (ctx.workdir, fs_type(ctx.workdir)),
        "size": human(ctx.size),
        "files": {n: "%s (%s)" % (os.path.basename(p), FIXTURES[n].what(ctx))
                  for n, p in ctx.files.items() if n != "probe"},
        "rounds": ctx.rounds,
        "runtime": ctx.runtime,
        "conditions": ctx.conditions,
        "conditions_text": conditions_text(ctx.conditions),
        "server_cpu": "utime + stime of the server's session (/proc/PID/stat fields 14-17, %d ticks/s) "
                      "read before and after each client run, / requests completed (us/req) or / MiB "
                      "moved (us/MiB, nbdcopy rows)" % CLK_TCK,
        "flexnbd": "%s (git %s)" % (ctx.flexnbd, git_describe()),
        "versions": {
            "qemu-nbd": first_line(["qemu-nbd", "--version"]),
            "nbdkit": first_line(["nbdkit", "--version"]),
            "fio": first_line(["fio", "--version"]),
            "nbdcopy": first_line(["nbdcopy", "--version"]),
            "qemu-img": first_line(["qemu-img", "--version"]),
            "python": platform.python_version(),
        },
        "servers": {s.id: shlex.join(s.argv(ctx, dummy_port, "FILE")) for s in probed_servers(tests, servers)},
        "tests": {},
        "cached": {n: cached_pct(p) for n, p in ctx.files.items() if n != "probe"},
        "probes": ctx.probes,
    }
    for t in tests:
        if t.kind == "migration":
            if runs_on(t, servers):
                env["tests"][t.id] = (proxy_commands(ctx, t) if t.measure is measure_proxy
                                      else migration_commands(ctx, t))
            continue
        if t.measure is measure_fio:
            cmd = shlex.join(fio_argv(ctx, t, 0, "OUT.json")).replace("127.0.0.1:0", "127.0.0.1:PORT")
        elif t.measure is measure_qemu_img_bench:
            cmd = shlex.join(qemu_img_bench_argv(ctx, t, 0)).replace("127.0.0.1:0", "127.0.0.1:PORT")
            cmd += "   (figure: COUNT x 1 MiB / the run time qemu-img reports)"
        elif t.measure is measure_qemu_img_convert:
            cmd = shlex.join(qemu_img_convert_argv(ctx, t, "PORT", "SIZE"))
            cmd += "   (timed: wall clock of the process)"
        elif t.measure is measure_nbdcopy_sparse:
            cmd = shlex.join(sparse_copy_argv(ctx, "nbd://%s:PORT" % HOST,
                                              os.path.join(ctx.workdir, "sparse-copy.raw")))
            cmd += ("   (serving %s; timed: wall clock of the process; then, untimed: "
                    "allocated size, bytes compared and nbdinfo --map once per server, copy deleted)"
                    % os.path.basename(ctx.files[t.serves]))
        else:
            uri = ("nbds://%s:PORT/?tls-certificates=%s" % (HOST, ctx.tls_dir) if t.tls
                   else "nbd://%s:PORT" % HOST)
            src = ctx.files.get(t.params.get("source", ""), "")
            cmd = shlex.join(["nbdcopy"] + ctx.nbdcopy_extra +
                             ([uri, "null:"] if t.params["direction"] == "read" else ["--flush", src, uri]))
            cmd += "   (timed: wall clock of the process)"
        env["tests"][t.id] = cmd
    return env


def print_header(env):
    v = env["versions"]
    print("flexnbd benchmark  %s  on %s" % (env["date"], env["host"]))
    print("machine: %s CPUs (%s), kernel %s, %s" % (env["nproc"], env["cpu"], env["kernel"], env["memory"]))
    print("tools:   %s; %s; %s; %s; python %s"
          % (v["qemu-nbd"], v["nbdkit"], v["fio"], v["nbdcopy"], v["python"]))
    print("flexnbd: %s" % env["flexnbd"])
    print("files:   in %s:" % env["dir"])
    for n, what in env.get("files", {}).items():
        p = env["cached"].get(n)
        print("  %-13s %s, %s" % (n, what, "? cached" if p is None else "%.0f%% cached" % p))
    print("method:  %d round(s); in each, every test runs once on every server, in rotated order;"
          % env["rounds"])
    print("         fio jobs run %d s; figure = median over rounds; ratio = flexnbd / best other"
          % env["runtime"])
    print("         conditions, each row's trials under each in turn: %s" % env["conditions_text"])
    print("         server CPU: %s" % env["server_cpu"])
    if any(t.startswith("migrate-") for t in env["tests"]):
        print("         migration rows run once per round (flexnbd serve -> flexnbd listen), "
              "each against its own target, under the %s condition" % env["conditions"][0])
    if any(t.startswith("proxy-") for t in env["tests"]):
        print("         proxy rows run once per round (fio direct and through flexnbd-proxy, "
              "alternating which goes first), under the %s condition" % env["conditions"][0])
    if env["servers"]:
        print("servers:")
        for sid, cmd in env["servers"].items():
            print("  %-16s %s" % (sid, cmd))
        print("servers as seen by nbdinfo / nbdcopy -v:")
        for line in probe_lines(env):
            print("  " + line)
    print("tests:")
    for tid, cmd in env["tests"].items():
        print("  %-18s %s" % (tid, cmd))
    print(flush=True)


def probe_lines(env):
    return ["%-16s %s, structured replies: %s, flags: %s; meta contexts: %s; nbdcopy opens %s connection(s)"
            % (sid, p["protocol"], "yes" if p["structured"] else "no", ",".join(p["flags"]),
               ",".join(p.get("contexts") or []) or "none", p["nbdcopy_connections"])
            for sid, p in env.get("probes", {}).items()]


def settle(ctx):
    """Between trials: write back what the previous server dirtied, so that
    its writeback does not run during (and get charged to) the next trial."""
    for name, path in ctx.files.items():
        if name == "probe":
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def runs_on(test, servers):
    """What a test runs on: the selected servers it does not skip; for a
    migration row, the MIGRATION pseudo-server, once per round, if a flexnbd
    variant is selected."""
    if test.kind == "migration":
        return [MIGRATION] if any(s.id.startswith("flexnbd") for s in servers) else []
    return [s for s in servers if s.id not in test.skip and s.tls == test.tls]


def probed_servers(tests, servers):
    """The selected servers that a selected (non-migration) test runs on."""
    used = {s.id for t in tests if t.kind == "server" for s in runs_on(t, servers)}
    probed = [s for s in servers if s.id in used]
    # the migration rows' reference copy goes to new-style flexnbd: show it too
    ref = baseline_server()
    if ref not in probed and any(t.measure is measure_migration and runs_on(t, servers) for t in tests):
        probed.append(ref)
    return probed


def run_matrix(ctx, tests, servers, results):
    """For each round, for each test: under each condition in turn (quiet
    first, then busy, with the busy loops running for that condition's
    trials), every server once in rotated order. Migration rows run once per
    round, under the first condition."""
    conds = ctx.conditions
    total = ctx.rounds * sum(len(runs_on(t, servers)) * (1 if t.kind == "migration" else len(conds))
                             for t in tests)
    n = 0
    for rnd in range(ctx.rounds):
        ctx.round = rnd
        for ti, test in enumerate(tests):
            these = runs_on(test, servers)
            if not these:
                continue
            k = (rnd + ti) % len(these)
            order = these[k:] + these[:k]
            for cond in (conds[:1] if test.kind == "migration" else conds):
                with BusyHost(cond == "busy"):
                    for server in order:
                        n += 1
                        settle(ctx)
                        if test.kind == "migration":
                            m = test.measure(ctx, test, None)
                            results.add(test, server, m, cond)
                            print("[%3d/%d] round %d  %-5s %-18s %s"
                                  % (n, total, rnd + 1, cond, test.id, migration_progress(test, m)),
                                  file=sys.stderr, flush=True)
                            continue
                        with Running(ctx, server, ctx.files[test.serves]) as srv:
                            m = test.measure(ctx, test, srv)
                        results.add(test, server, m, cond)
                        print_progress(n, total, rnd, cond, test, server, m)


def print_progress(n, total, rnd, cond, test, server, m):
    extra = ""
    if m.lat_us is not None:
        extra += "  p50 %.1f us" % m.lat_us
    if "p99_us" in m.info:
        extra += "  p99 %.1f us" % m.info["p99_us"]
    if "cpu_us" in m.info:
        extra += "  server CPU %.1f %s (%.2f s" % (m.info["cpu_us"], m.info["cpu_unit"], m.info["cpu_s"])
        extra += (" / %d requests)" % m.info["requests"]) if "requests" in m.info else \
            (" / %.0f MiB)" % m.info["mib_moved"])
    if m.info.get("at_depth_pct", 100.0) < 90.0:
        extra += "  WARNING: only %.1f%% of I/O at depth %d" % (
            m.info["at_depth_pct"], test.params["iodepth"])
    if "dest_alloc" in m.info:
        extra += "  %.2f s  copy %s allocated (source %s)" % (
            m.info["seconds"], mib(m.info["dest_alloc"]), mib(m.info["src_alloc"]))
        if "map" in m.info:
            extra += "  bytes identical; " + map_text(m.info["map"])
    print("[%3d/%d] round %d  %-5s %-18s %-16s %10s %s%s"
          % (n, total, rnd + 1, cond, test.id, server.id, fmt(m.value), test.unit, extra),
          file=sys.stderr, flush=True)


def report(results, ctx, env, args, partial):
    parts = render(results, ctx, env, partial, text_table)
    print()
    for title, table in parts:
        print("== %s" % title)
        print(table)
        print()
    refs = [s.id for s in results.servers if s.role == "reference"]
    if refs and results.has_server_trials():
        print("ratio = median of the flexnbd variant / best median of (%s); PASS when ratio >= target."
              % ", ".join(refs))
        print("server CPU ratio = the variant's CPU per request / lowest of (%s); PASS when <= %.2f."
              % (", ".join(refs), CPU_TARGET))
        print("conditions: %s." % conditions_text(results.conditions))
    for line in tls_cost_lines(results):
        print(line)
    if env.get("cached_end"):
        print("page cache at the end: %s" % ", ".join(
            "%s %s" % (n, "?" if p is None else "%.0f%%" % p) for n, p in env["cached_end"].items()))
    print(flush=True)
    if args.markdown:
        write_markdown(results, ctx, env, partial, args.markdown)
        print("wrote %s" % args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "summary": results.summary_json(), "trials": results.to_json()}, f, indent=1)
        print("wrote %s" % args.json)


def tls_cost_lines(results) -> List[str]:
    """The cost of TLS for flexnbd: its median on each TLS row against its
    plain new-style median on the row named by params["plain"], same run."""
    servers = {s.id: s for s in results.servers}
    tests = {t.id: t for t in results.tests}
    tls_srv, plain_srv = servers.get("flexnbd-tls"), servers.get("flexnbd-newstyle")
    lines = []
    for t in results.tests:
        plain = tests.get(t.params.get("plain", ""))
        if not t.tls or plain is None or tls_srv is None or plain_srv is None:
            continue
        for c in results.conditions:
            a, b = results.median(t, tls_srv, c), results.median(plain, plain_srv, c)
            if a and b:
                lines.append("cost of TLS (%s): flexnbd %s %.0f %s over TLS vs %.0f plain (--newstyle): "
                             "%.2f of plain" % (c, t.id, a, t.unit, b, a / b))
    return lines


def write_markdown(results, ctx, env, partial, path):
    out = []
    if env:
        v = env["versions"]
        out += [
            "Measured %s on %s: %s CPUs (%s), kernel %s. %s; %s; %s; %s. flexnbd %s."
            % (env["date"], env["host"], env["nproc"], env["cpu"], env["kernel"],
               v["qemu-nbd"], v["nbdkit"], v["fio"], v["nbdcopy"], env["flexnbd"]),
            "",
            "Files, page-cached, on %s: %s. %d round(s), fio runtime %d s, median over rounds; "
            "servers interleaved in rotated order."
            % (env["dir"], "; ".join(env.get("files", {}).values()), env["rounds"], env["runtime"]),
            "",
            "Conditions: %s. Server CPU: %s." % (env["conditions_text"], env["server_cpu"]),
            "",
        ]
    for title, table in render(results, ctx, env, partial, md_table):
        out += ["**%s**" % title, "", table, ""]
    out += [l + "." for l in tls_cost_lines(results)] + ([""] if tls_cost_lines(results) else [])
    if env:
        out += ["Command lines (PORT is a free port chosen per trial):", "", "```"]
        out += ["%-16s %s" % kv for kv in env["servers"].items()]
        out += ["%-18s %s" % kv for kv in env["tests"].items()]
        out += ["```", "", "As the clients see the servers:", ""]
        out += ["- " + l for l in probe_lines(env)]
        out += [""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark flexnbd against qemu-nbd and nbdkit on the same page-cached file.",
        epilog="tests: %s\nservers: %s" % (", ".join(t.id for t in TESTS), ", ".join(s.id for s in SERVERS)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5)")
    p.add_argument("--runtime", type=int, default=None, help="seconds per fio job (default 5)")
    p.add_argument("--size", type=parse_size, default=None, help="file size, e.g. 1G, 256M (default 1G)")
    p.add_argument("--dir", default="/tmp", help="where to create the files (default /tmp; use ext4)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 2 s, 256 MiB (explicit options still win)")
    p.add_argument("--only", metavar="TEST[,TEST]", help="run only these tests")
    p.add_argument("--servers", metavar="SERVER[,SERVER]", help="run only these servers")
    p.add_argument("--markdown", metavar="FILE", help="also write the result tables as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write every trial as JSON")
    p.add_argument("--flexnbd", metavar="PATH", help="flexnbd binary (default: build target/release/flexnbd)")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build --release first")
    p.add_argument("--nbdcopy-connections", type=int, metavar="N",
                   help="pass --connections=N to nbdcopy (default: nbdcopy decides, "
                        "which depends on the server advertising multi-conn)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (files, server logs)")
    p.add_argument("--busy", action="store_true",
                   help="busy host: run every row with %d CPU-bound loops at nice %d beside the servers"
                        % (BUSY_HOGS, BUSY_NICE))
    p.add_argument("--conditions", metavar="COND[,COND]",
                   help="quiet, busy or quiet,busy (both in one run: quiet first, figures side by side)")
    a = p.parse_args(argv)
    if a.conditions:
        wanted = [c.strip() for c in a.conditions.split(",") if c.strip()]
        bad = [c for c in wanted if c not in CONDITIONS]
        if bad or not wanted:
            p.error("--conditions: unknown %s (known: %s)" % (", ".join(bad) or "(none)", ",".join(CONDITIONS)))
        if a.busy and wanted != ["busy"]:
            p.error("--busy means --conditions busy; give one of them")
        a.conditions = [c for c in CONDITIONS if c in wanted]
    else:
        a.conditions = ["busy"] if a.busy else ["quiet"]
    quick = a.quick
    a.rounds = a.rounds if a.rounds is not None else (1 if quick else 5)
    a.runtime = a.runtime if a.runtime is not None else (2 if quick else 5)
    a.size = a.size if a.size is not None else (256 * MIB if quick else 1 << 30)
    if a.rounds < 1 or a.runtime < 1:
        p.error("--rounds and --runtime must be at least 1")
    a.flexnbd_given = a.flexnbd is not None
    a.flexnbd = os.path.abspath(a.flexnbd or os.path.join(REPO, "target", "release", "flexnbd"))
    return a


if __name__ == "__main__":
    sys.exit(main())
