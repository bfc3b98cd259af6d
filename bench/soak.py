"""Long soak: real gkcp processes, a lossy link, mixed traffic; resource growth.

    driver --TCP--> gkcp local ==KCP/UDP==> link ==KCP/UDP==> gkcp server --TCP--> target
    (threads)       (process)              (process:          (process)             (driver)
                                            loss, delay)

Many short connections (`--short-workers` at a time, 1 B .. `--short-max`
bytes each) and a few long ones (`--long`, each `--long-seconds` at
`--long-mbit`, then a new one) run for `--minutes`.  Every connection is
an echo, a download or an upload of a seeded pattern, and every byte is
checked against the pattern (the target checks uploads and answers OK or
NO).  The link is gkcp.demo's LossyLink (user space UDP relay, `--loss`
percent each way, `--rtt` ms) in a process of its own.

Every `--every` seconds the driver samples both gkcp processes: RSS, open
file descriptors and threads (psutil, from outside) and greenlets,
conversations and lingering conversations (from inside: each gkcp process
runs through this file's `_gkcp` wrapper, which is `python -m gkcp` with a
SIGUSR2 handler added that writes those counts to a file; gkcp's own
SIGUSR1 table lists conversations but not greenlets).

Verdict: the first `--warmup` of the run (10%) is warm-up; the median of
the samples in the next 10% is the steady-state baseline, the median of
the last 10% is the end; growth = end - baseline, per process, must stay
under the thresholds (RSS `--max-rss-growth` MiB, fds
`--max-fd-growth`, greenlets `--max-greenlet-growth`).  After the
traffic stops and every conversation is gone, fds and greenlets must be
back at their idle level measured before the soak (+2 fds, +3 greenlets,
as in tests/test_security.py's short soak).  Exit 1 if a byte was wrong,
a connection failed (more than `--max-errors`), a gkcp process died or a
threshold was exceeded; 2 if the soak could not start.

    python bench/soak.py --minutes 30 [--every 30] [--json FILE]
    python bench/soak.py --quick                    (2 minutes, a sample every 5 s)

Every process it starts is stopped by its PID (SIGTERM, then SIGKILL), also
on failure or Ctrl-C; the children also get SIGTERM if the driver dies.
The gkcp processes import gkcp from this file's tree (not from the current
directory), so a snapshot (`git worktree add`) soaks that snapshot.
"""

# ruff: noqa: E402  (the tree's root goes on sys.path first)
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import argparse
import json
import random
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from bench.common import BenchError, Proc, free_port, gkcp_options, log, raise_nofile
from bench.loopback import wait_bound

MiB = 1 << 20
KiB = 1 << 10
HEAD = struct.Struct("!cQII")  # op, size, seed, pacing rate in kbit/s (0: none)
OPS = (b"E", b"D", b"U")  # echo, download, upload
IO_TIMEOUT_S = 60.0  # any single socket operation; gkcp's dead timeout is 30 s
PATTERN_LEN = (4 << 20) + 7
CHUNK = 64 * KiB


# ====================================================================================
# Inside the child processes: the gkcp wrapper and the link
# ====================================================================================

def gkcp_child(argv: List[str]) -> int:
    """`python -m gkcp ARGS` plus a SIGUSR2 handler writing counts to argv[0]."""
    from gevent import monkey
    monkey.patch_all()  # as gkcp.cli does first; it then sees the stdlib patched
    import gc

    import gevent
    import greenlet

    import gkcp
    from gkcp.cli import main

    path, args = argv[0], argv[1:]
    seq = [0]

    def root(g: greenlet.greenlet) -> greenlet.greenlet:
        while g.parent is not None:
            g = g.parent
        return g

    def dump() -> None:
        from gkcp.endpoint import Endpoint
        gc.collect()
        main_greenlet = root(greenlet.getcurrent())
        count, endpoints = 0, []
        for obj in gc.get_objects():
            if isinstance(obj, greenlet.greenlet):
                # as tests/security_helpers.greenlets(): this thread's, less the main one
                if obj.parent is not None and root(obj) is main_greenlet:
                    count += 1
            elif isinstance(obj, Endpoint):
                endpoints.append(obj)
        seq[0] += 1
        counts = {"seq": seq[0], "greenlets": count, "gkcp": gkcp.__file__,
                  "conversations": sum(len(e.conversations()) for e in endpoints),
                  "lingering": sum(len(e.lingering) for e in endpoints),
                  "peers": sum(len(e.peers) for e in endpoints)}
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)

    gevent.signal_handler(signal.SIGUSR2, dump)
    return main(args)


def link_child(argv: List[str]) -> int:
    """gkcp.demo.LossyLink to host:port; writes its address and counts to argv[5]."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.event import Event

    from gkcp.demo import LossyLink

    host, port, loss, one_way_ms, seed, path = argv
    link = LossyLink((host, int(port)), float(loss), float(one_way_ms), int(seed))
    stop = Event()
    handlers = [gevent.signal_handler(s, stop.set) for s in (signal.SIGTERM, signal.SIGINT)]

    def write() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({"address": list(link.address), "passed": link.passed,
                       "dropped": link.dropped, "queued": len(link.queue)}, f)
        os.replace(path + ".tmp", path)

    write()
    while not stop.wait(2.0):
        write()
    write()
    for h in handlers:
        h.cancel()
    link.close()
    return 0


# ====================================================================================
# The traffic: a seeded pattern, checked byte for byte
# ====================================================================================

@lru_cache(maxsize=1)
def pattern() -> memoryview:
    """4 MiB of seeded random bytes, and its first CHUNK again (the driver's only)."""
    block = random.Random(20261122).randbytes(PATTERN_LEN)
    return memoryview(block + block[:CHUNK])


def expected(seed: int, offset: int, n: int) -> memoryview:
    """Bytes offset..offset+n of stream `seed` (n <= CHUNK)."""
    start = (seed + offset) % PATTERN_LEN
    return pattern()[start:start + n]


class Corrupt(Exception):
    """Bytes that differ from the pattern, or bytes after the end."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def recv_checked(sock: socket.socket, seed: int, size: int) -> None:
    """Receive exactly `size` bytes of stream `seed`; raise Corrupt at the first wrong one."""
    offset = 0
    while offset < size:
        data = sock.recv(min(CHUNK, size - offset))
        if not data:
            raise EOFError(f"EOF after {offset} of {size} bytes")
        if expected(seed, offset, len(data)) != data:
            raise Corrupt(f"wrong bytes at offset {offset} of {size} (seed {seed})")
        offset += len(data)


def send_pattern(sock: socket.socket, seed: int, size: int, kbit: int) -> None:
    """Send `size` bytes of stream `seed`, paced at `kbit` kbit/s (0: as fast as possible)."""
    start = time.monotonic()
    offset = 0
    step = 16 * KiB if kbit else CHUNK
    while offset < size:
        n = min(step, size - offset)
        sock.sendall(expected(seed, offset, n))
        offset += n
        if kbit:
            ahead = offset * 8 / (kbit * 1000.0) - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def expect_eof(sock: socket.socket) -> None:
    if sock.recv(1):
        raise Corrupt("bytes after the end of the transfer")


class TargetHandler(socketserver.BaseRequestHandler):
    """E: echo until EOF.  D: send the stream, then wait for EOF.  U: check the
    uploaded stream and EOF, answer OK or NO."""

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(IO_TIMEOUT_S)
        try:
            op, size, seed, kbit = HEAD.unpack(recv_exact(sock, HEAD.size))
            if op == b"E":
                while True:
                    data = sock.recv(CHUNK)
                    if not data:
                        break
                    sock.sendall(data)
            elif op == b"D":
                send_pattern(sock, seed, size, kbit)
                sock.recv(1)
            elif op == b"U":
                try:
                    recv_checked(sock, seed, size)
                    expect_eof(sock)
                    verdict = b"OK"
                except Corrupt:
                    verdict = b"NO"
                sock.sendall(verdict)
        except (OSError, EOFError):
            pass  # the client sees the failure too, and counts it


class Target(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def transfer(addr: Tuple[str, int], op: bytes, size: int, seed: int, kbit: int) -> None:
    """One connection through the tunnel: `op` of `size` bytes; raises on any failure."""
    sock = socket.create_connection(addr, timeout=IO_TIMEOUT_S)
    try:
        sock.sendall(HEAD.pack(op, size, seed, kbit))
        if op == b"D":
            recv_checked(sock, seed, size)
        elif op == b"U":
            send_pattern(sock, seed, size, kbit)
        else:  # echo: a writer thread, so that neither side's buffers fill up
            failed: List[BaseException] = []

            def write() -> None:
                try:
                    send_pattern(sock, seed, size, kbit)
                except BaseException as exc:  # noqa: BLE001  (reported by the reader)
                    failed.append(exc)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            try:
                recv_checked(sock, seed, size)
            except BaseException:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # unblocks the writer
                except OSError:
                    pass
                raise
            finally:
                writer.join(IO_TIMEOUT_S)
            if failed:
                raise failed[0]
        sock.shutdown(socket.SHUT_WR)
        if op == b"U":
            verdict = sock.recv(2)
            if verdict != b"OK":
                raise (Corrupt if verdict == b"NO" else EOFError)(
                    f"upload of {size} bytes: the target answered {verdict!r}")
        expect_eof(sock)
    finally:
        sock.close()


@dataclass
class Counters:
    short: int = 0
    long: int = 0
    bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    messages: List[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def done(self, kind: str, size: int) -> None:
        with self.lock:
            setattr(self, kind, getattr(self, kind) + 1)
            self.bytes += size

    def failed(self, what: str, exc: BaseException) -> None:
        with self.lock:
            if isinstance(exc, Corrupt):
                self.corrupt += 1
            else:
                self.errors += 1
            if len(self.messages) < 20:
                self.messages.append(f"{time.strftime('%H:%M:%S')} {what}: "
                                     f"{type(exc).__name__}: {exc}")

    def snapshot(self) -> Dict[str, int]:
        with self.lock:
            return {"short": self.short, "long": self.long, "bytes": self.bytes,
                    "errors": self.errors, "corrupt": self.corrupt}


class Traffic:
    """The short and long workers (threads); `stop()` ends them within bounded time."""

    def __init__(self, addr: Tuple[str, int], args: argparse.Namespace, end: float) -> None:
        self.addr = addr
        self.args = args
        self.end = end
        self.counters = Counters()
        self.stopping = threading.Event()
        self.threads = ([threading.Thread(target=self._short, args=(n,), daemon=True)
                         for n in range(args.short_workers)]
                        + [threading.Thread(target=self._long, args=(n,), daemon=True)
                           for n in range(args.long)])

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _one(self, kind: str, op: bytes, size: int, seed: int, kbit: int) -> None:
        try:
            transfer(self.addr, op, size, seed, kbit)
        except (OSError, EOFError, Corrupt) as exc:
            self.counters.failed(f"{kind} {op.decode()} {size} B", exc)
            self.stopping.wait(1.0)  # no tight loop of failures
        else:
            self.counters.done(kind, size)

    def _short(self, n: int) -> None:
        rng = random.Random(1000 + n)
        while not self.stopping.is_set() and time.monotonic() < self.end:
            self._one("short", rng.choice(OPS), rng.randint(1, self.args.short_max),
                      rng.getrandbits(32), 0)

    def _long(self, n: int) -> None:
        rng = random.Random(2000 + n)
        kbit = int(self.args.long_mbit * 1000)
        i = 0
        while not self.stopping.is_set():
            seconds = min(self.args.long_seconds, self.end - time.monotonic())
            size = int(seconds * kbit * 1000 / 8)
            if size < CHUNK:
                break
            self._one("long", OPS[(n + i) % len(OPS)], size, rng.getrandbits(32), kbit)
            i += 1

    def stop(self, timeout_s: float) -> List[str]:
        """Stop and join; returns the names of threads still running after `timeout_s`."""
        self.stopping.set()
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]


# ====================================================================================
# The driver
# ====================================================================================

@dataclass
class ProcSample:
    rss: float  # MiB
    fds: int
    threads: int
    cpu: float  # % of one core since the previous sample
    greenlets: Optional[int]
    conversations: Optional[int]
    lingering: Optional[int]


@dataclass
class Sample:
    t: float
    procs: Dict[str, ProcSample]
    counters: Dict[str, int]
    link: Dict[str, int]


class Watched:
    """One gkcp process: psutil from outside, the wrapper's counts from inside."""

    def __init__(self, name: str, proc, probe_path: str) -> None:
        import psutil
        self.name = name
        self.proc = proc
        self.probe_path = probe_path
        self.ps = psutil.Process(proc.pid)
        self.last_seq = 0
        self.last_cpu = self._cpu()
        self.last_t = time.monotonic()
        self.info: Dict[str, object] = {}

    def _cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def counts(self, timeout_s: float = 10.0) -> Dict[str, object]:
        """Ask the wrapper (SIGUSR2) and wait for its answer; {} if none in time."""
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with open(self.probe_path) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            if info.get("seq", 0) > self.last_seq:
                self.last_seq = info["seq"]
                self.info = info
                return info
            time.sleep(0.05)
        return {}

    def sample(self) -> ProcSample:
        info = self.counts()
        now, cpu = time.monotonic(), self._cpu()
        share = 100.0 * (cpu - self.last_cpu) / max(now - self.last_t, 1e-6)
        self.last_cpu, self.last_t = cpu, now
        return ProcSample(rss=self.ps.memory_info().rss / MiB, fds=self.ps.num_fds(),
                          threads=self.ps.num_threads(), cpu=share,
                          greenlets=info.get("greenlets"),  # type: ignore[arg-type]
                          conversations=info.get("conversations"),  # type: ignore[arg-type]
                          lingering=info.get("lingering"))  # type: ignore[arg-type]


def read_json(path: str) -> Dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def wait_for(what: str, predicate, timeout_s: float, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise BenchError(f"{what}: not within {timeout_s:.0f}s")


def git_commit(root: str) -> str:
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             timeout=10, check=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "gkcp"],
                               capture_output=True, timeout=10, text=True).stdout.strip()
        return out + (" (gkcp/ modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def settle(watched: List[Watched], timeout_s: float) -> bool:
    """Wait until neither gkcp process holds a conversation (lingering ones included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.counts().get("conversations") == 0 for w in watched):
            return True
        time.sleep(1.0)
    return False


# -- the verdict ------------------------------------------------------------------------

def median(values: List[float]) -> float:
    vals = sorted(values)
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def windows(samples: List[Sample], minutes: float, warmup: float
            ) -> Tuple[List[Sample], List[Sample]]:
    """(baseline, end): the samples of the 10% after warm-up, and of the last 10%."""
    total = minutes * 60
    tenth = max(total * 0.1, 1e-9)
    start = total * warmup
    base = [s for s in samples if start <= s.t < start + tenth]
    end = [s for s in samples if s.t >= total - tenth]
    # at least two samples in each (short runs, few samples)
    if len(base) < 2:
        base = [s for s in samples if s.t >= start][:2]
    if len(end) < 2:
        end = samples[-2:]
    return base, end


def verdict(samples: List[Sample], idle_before: Dict[str, ProcSample],
            idle_after: Optional[Dict[str, ProcSample]], counters: Dict[str, int],
            args: argparse.Namespace, problems: List[str]) -> Tuple[List[str], bool]:
    lines: List[str] = []
    ok = not problems
    base, end = windows(samples, args.minutes, args.warmup)
    limits = {"rss": args.max_rss_growth, "fds": args.max_fd_growth,
              "greenlets": args.max_greenlet_growth}
    if base and end:
        lines.append(f"steady state: baseline = median of {len(base)} samples at "
                     f"{base[0].t:.0f}-{base[-1].t:.0f} s, end = median of {len(end)} "
                     f"samples at {end[0].t:.0f}-{end[-1].t:.0f} s")
        for name in sorted(base[0].procs):
            for metric, limit in limits.items():
                b_vals = [getattr(s.procs[name], metric) for s in base]
                e_vals = [getattr(s.procs[name], metric) for s in end]
                if None in b_vals or None in e_vals:
                    lines.append(f"  {name:6} {metric:9} not observed: FAIL")
                    ok = False
                    continue
                b, e = median(b_vals), median(e_vals)
                good = e - b <= limit
                ok &= good
                unit = " MiB" if metric == "rss" else ""
                lines.append(f"  {name:6} {metric:9} {b:8.1f} -> {e:8.1f}{unit}  growth "
                             f"{e - b:+7.1f} (limit +{limit:g}): {'ok' if good else 'FAIL'}")
    else:
        lines.append("steady state: too few samples")
        ok = False
    if idle_after is None:
        lines.append("idle after the soak: conversations never all ended: FAIL")
        ok = False
    else:
        lines.append("idle before -> after the soak (no conversation left):")
        for name in sorted(idle_before):
            a, b = idle_before[name], idle_after[name]
            for metric, slack in (("fds", 2), ("greenlets", 3)):
                x, y = getattr(a, metric), getattr(b, metric)
                good = x is not None and y is not None and y <= x + slack
                ok &= good
                lines.append(f"  {name:6} {metric:9} {x} -> {y} (limit +{slack}): "
                             f"{'ok' if good else 'FAIL'}")
            lines.append(f"  {name:6} rss       {a.rss:.1f} -> {b.rss:.1f} MiB (reported; "
                         f"the allocator keeps what the load needed)")
    c = counters
    good = c["corrupt"] == 0
    ok &= good
    lines.append(f"traffic: {c['short']} short + {c['long']} long connections, "
                 f"{c['bytes'] / MiB:.1f} MiB verified byte for byte, {c['corrupt']} corrupted, "
                 f"{c['errors']} failed (limit {args.max_errors})")
    if c["errors"] > args.max_errors:
        ok = False
    if c["short"] == 0 or (args.long and c["long"] == 0):
        problems.append("no connection completed")
    for p in problems:
        lines.append(f"problem: {p}")
        ok = False
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'}")
    return lines, ok


def format_samples(samples: List[Sample]) -> str:
    names = sorted(samples[0].procs) if samples else []
    head = ["t s"]
    for n in names:
        head += [f"{n} MiB", "fds", "thr", "glets", "convs", "ling", "cpu%"]
    head += ["short", "long", "MiB ok", "err", "bad", "link drop"]
    rows = [head]

    def num(v) -> str:
        return "-" if v is None else str(v)

    for s in samples:
        row = [f"{s.t:.0f}"]
        for n in names:
            p = s.procs[n]
            row += [f"{p.rss:.1f}", str(p.fds), str(p.threads), num(p.greenlets),
                    num(p.conversations), num(p.lingering), f"{p.cpu:.0f}"]
        c = s.counters
        passed, dropped = s.link.get("passed", 0), s.link.get("dropped", 0)
        row += [str(c["short"]), str(c["long"]), f"{c['bytes'] / MiB:.0f}", str(c["errors"]),
                str(c["corrupt"]), f"{dropped}/{passed + dropped}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# -- the run ------------------------------------------------------------------------------

def soak(args: argparse.Namespace) -> int:
    import psutil

    raise_nofile()
    logdir = tempfile.mkdtemp(prefix="gkcp-soak-")
    options = gkcp_options(";".join(o for o in (args.options,
                                                "key=gkcp-soak" if args.key else "") if o))
    commit = git_commit(ROOT)
    me = os.path.abspath(__file__)
    procs: List[Proc] = []
    target: Optional[Target] = None
    serving: Optional[threading.Thread] = None
    traffic: Optional[Traffic] = None
    samples: List[Sample] = []
    problems: List[str] = []
    idle_after: Optional[Dict[str, ProcSample]] = None
    ok = False

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        target = Target(("127.0.0.1", 0), TargetHandler)
        server_udp = free_port(socket.SOCK_DGRAM)
        listen = free_port()
        link_info = os.path.join(logdir, "link.json")

        def start(name: str, argv: List[str]) -> Proc:
            proc = Proc([sys.executable, me] + argv, name=name,
                        stderr_path=os.path.join(logdir, f"{name}.log"))
            procs.append(proc)
            return proc

        server = start("server", ["_gkcp", os.path.join(logdir, "server.json"), "server",
                                  "-l", f"127.0.0.1:{server_udp}",
                                  "-t", f"127.0.0.1:{target.server_address[1]}",
                                  "-o", options, "-q"])
        start("link", ["_link", "127.0.0.1", str(server_udp), str(args.loss / 100.0),
                       str(args.rtt / 2.0), "1", link_info])
        link_addr = wait_for("the link", lambda: read_json(link_info).get("address"), 15)
        local = start("local", ["_gkcp", os.path.join(logdir, "local.json"), "local",
                                "-l", f"127.0.0.1:{listen}",
                                "-r", f"{link_addr[0]}:{link_addr[1]}", "-o", options, "-q"])
        serving = threading.Thread(target=target.serve_forever,
                                   kwargs={"poll_interval": 0.5}, daemon=True)
        serving.start()
        wait_bound(listen, server_udp, [server, local])
        watched = [Watched("server", server, os.path.join(logdir, "server.json")),
                   Watched("local", local, os.path.join(logdir, "local.json"))]
        addr = ("127.0.0.1", listen)

        # warm-up: a transfer of each kind, then the idle level
        def warm() -> bool:
            try:
                for i, op in enumerate(OPS):
                    transfer(addr, op, 256 * KiB, i, 0)
                return True
            except (OSError, EOFError):
                return False

        wait_for("a first transfer through the tunnel", warm, 60, 1.0)
        if not settle(watched, 60):
            raise BenchError("conversations still held after the warm-up")
        idle_before = {w.name: w.sample() for w in watched}
        log(f"soak: gkcp {watched[0].info.get('gkcp')} at commit {commit}, options {options}, "
            f"link loss {args.loss:g}% each way, RTT {args.rtt:g} ms; {args.minutes:g} min, "
            f"{args.short_workers} short workers (1 B..{args.short_max} B), {args.long} long "
            f"({args.long_seconds:g} s at {args.long_mbit:g} Mbit/s), a sample every "
            f"{args.every:g} s")

        started, started_wall = time.monotonic(), time.time()
        end = started + args.minutes * 60
        # the traffic goes on past the last sample, so that it samples a full load
        traffic = Traffic(addr, args, end + args.every)
        traffic.start()
        next_at = started
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(min(next_at - now, 1.0))
            dead = [p.name for p in procs if not p.alive()]
            if dead:
                problems.append(f"exited during the soak: {', '.join(dead)}")
                break
            if time.monotonic() < next_at:
                continue
            t = time.monotonic() - started
            try:
                procs_now = {w.name: w.sample() for w in watched}
            except psutil.Error as exc:
                problems.append(f"a gkcp process vanished: {exc}")
                break
            samples.append(Sample(t=t, procs=procs_now, counters=traffic.counters.snapshot(),
                                  link=read_json(link_info)))
            s = samples[-1]
            log(f"soak {t:5.0f}s: " + ", ".join(
                f"{n} {p.rss:.0f} MiB {p.fds} fds {p.greenlets} greenlets {p.conversations} "
                f"convs" for n, p in s.procs.items())
                + f"; {s.counters['short']}+{s.counters['long']} conns, "
                f"{s.counters['errors']} err, {s.counters['corrupt']} bad")
            if next_at >= end:
                break
            next_at = min(next_at + args.every, end)
        stuck = traffic.stop(args.long_seconds + 2 * IO_TIMEOUT_S)
        if stuck:
            problems.append(f"workers still running after the soak: {stuck}")
        if not problems:
            if settle(watched, 90):
                time.sleep(1.0)
                idle_after = {w.name: w.sample() for w in watched}
        counters = traffic.counters.snapshot()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_wall))
        print(f"gkcp soak: {args.minutes:g} min from {when}, commit {commit}; options "
              f"{options}; link loss {args.loss:g}% each way, RTT {args.rtt:g} ms; gkcp "
              f"{watched[0].info.get('gkcp')}")
        print(format_samples(samples))
        if idle_after:
            print("idle before: " + ", ".join(f"{n} {p.fds} fds {p.greenlets} greenlets "
                                              f"{p.rss:.1f} MiB" for n, p in idle_before.items()))
            print("idle after:  " + ", ".join(f"{n} {p.fds} fds {p.greenlets} greenlets "
                                              f"{p.rss:.1f} MiB" for n, p in idle_after.items()))
        lines, ok = verdict(samples, idle_before, idle_after, counters, args, problems)
        for m in traffic.counters.messages:
            print(f"failure: {m}")
        print("\n".join(lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"commit": commit, "options": options, "args": {
                    k: v for k, v in vars(args).items() if k != "json"},
                    "samples": [{"t": s.t, "procs": {n: vars(p) for n, p in s.procs.items()},
                                 "counters": s.counters, "link": s.link} for s in samples],
                    "idle_before": {n: vars(p) for n, p in idle_before.items()},
                    "idle_after": {n: vars(p) for n, p in (idle_after or {}).items()},
                    "counters": counters, "verdict": lines, "ok": ok}, f, indent=1)
        return 0 if ok else 1
    except BenchError as exc:
        print(f"gkcp soak: could not run: {exc}", file=sys.stderr)
        for p in procs:
            if not p.alive():
                print(f"  {p.name} exited {p.popen.returncode}: {p.stderr_tail()}",
                      file=sys.stderr)
        return 2
    finally:
        if traffic is not None:
            traffic.stopping.set()
        for p in reversed(procs):
            p.stop()
        if serving is not None and target is not None:
            target.shutdown()  # waits for serve_forever: only if it ever ran
        if target is not None:
            target.server_close()
        for s, handler in old.items():
            signal.signal(s, handler)
        if ok:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"gkcp soak: the processes' logs are in {logdir}", file=sys.stderr)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the traffic runs")
    ap.add_argument("--quick", action="store_true",
                    help="2 minutes, a sample every 5 s, long connections of 20 s")
    ap.add_argument("--every", type=float, help="seconds between samples (default: 60 "
                    "samples, at least 5 s apart)")
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the run")
    ap.add_argument("--short-workers", type=int, default=8)
    ap.add_argument("--short-max", type=int, default=64 * KiB, help="bytes")
    ap.add_argument("--long", type=int, default=3)
    ap.add_argument("--long-seconds", type=float, default=120.0)
    ap.add_argument("--long-mbit", type=float, default=16.0)
    ap.add_argument("--loss", type=float, default=1.0, help="percent, each way")
    ap.add_argument("--rtt", type=float, default=20.0, help="ms")
    ap.add_argument("--options", default="", help="more gkcp options (-o), after the "
                    "bench's fast2 settings")
    ap.add_argument("--key", action="store_true", help="run in key mode")
    ap.add_argument("--max-rss-growth", type=float, default=16.0, help="MiB per process")
    ap.add_argument("--max-fd-growth", type=float, default=16.0,
                    help="per process; a live connection holds one")
    ap.add_argument("--max-greenlet-growth", type=float, default=32.0,
                    help="per process; a live connection has about two")
    ap.add_argument("--max-errors", type=int, default=0, help="failed connections allowed")
    ap.add_argument("--json", help="write samples and verdict here")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.long_seconds = 2.0, 20.0
        args.every = args.every or 5.0
    args.every = args.every or max(5.0, args.minutes)
    return args


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_gkcp":
        return gkcp_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "_link":
        return link_child(sys.argv[2:])
    return soak(parse_args())


if __name__ == "__main__":
    sys.exit(main())
