"""Shared parts of the benches: tunnels, processes, statistics, tables.

Every process a bench starts goes through `Proc`, which remembers its PID
and stops exactly that PID (SIGTERM, then SIGKILL); nothing is ever killed
by name.  Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
LOADGEN = os.path.join(BENCH_DIR, "loadgen.py")

# The equal settings every KCP tunnel runs with (kcptun's names in KCPTUN_ARGS).
KCP_MODE = "fast2"
KCP_SNDWND = 1024
KCP_RCVWND = 1024
KCP_MTU = 1350


class BenchError(Exception):
    """A part could not run (a tunnel did not come up, a tool failed)."""


class Missing(Exception):
    """A prerequisite is missing: the row is reported as skipped."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile(limit: int = 65536) -> None:
    """Children inherit this: 1,000 tunnelled connections need ~4,000 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise Missing(f"{tool} not found on PATH")
    return path


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for TCP and UDP on 127.0.0.1 (namespaces have their own ports)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise BenchError("no free port")


# -- processes ----------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the bench dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Proc:
    """One child process, stopped by its own PID only."""

    def __init__(self, argv: Sequence[str], *, name: str, netns: Optional[str] = None,
                 stdin: Optional[int] = None, stdout: Optional[int] = subprocess.DEVNULL,
                 stderr_path: Optional[str] = None) -> None:
        full = list(argv)
        if netns is not None:
            # `ip netns exec` execs the command: the PID is the command's own
            full = ["ip", "netns", "exec", netns] + full
        self.name = name
        self.argv = full
        self.stderr_path = stderr_path
        self._err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(full, stdin=stdin, stdout=stdout, stderr=self._err,
                                      start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 3.0) -> Optional[int]:
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        if self._err is not subprocess.DEVNULL:
            self._err.close()
            self._err = subprocess.DEVNULL
        return self.popen.returncode

    def stderr_tail(self, n: int = 800) -> str:
        if not self.stderr_path:
            return ""
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""


def run_json(argv: Sequence[str], *, timeout: float, netns: Optional[str] = None) -> dict:
    """Run a command that prints one JSON object as its last stdout line."""
    full = list(argv)
    if netns is not None:
        full = ["ip", "netns", "exec", netns] + full
    try:
        out = subprocess.run(full, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(argv[:4])}") from None
    text = out.stdout.decode(errors="replace").strip()
    lines = text.splitlines()
    if out.returncode != 0 or not lines:
        raise BenchError(f"{' '.join(argv[:4])} exited {out.returncode}: "
                         f"{out.stderr.decode(errors='replace')[-600:]} {text[-300:]}")
    try:
        return json.loads(text)  # iperf3 -J: one object over many lines
    except ValueError:
        return json.loads(lines[-1])


def loadgen(*args: object) -> List[str]:
    return [sys.executable, LOADGEN] + [str(a) for a in args]


# -- tunnels --------------------------------------------------------------------------
@dataclass
class Impl:
    """One way to carry the benchmark's TCP connections."""

    name: str  # row label
    kind: str  # gkcp, kcptun, tcp
    options: str = ""  # gkcp -o, or kcptun extra flags
    cc: str = "cubic"  # TCP congestion control of the plain-TCP sender

    @property
    def tunnel(self) -> bool:
        return self.kind != "tcp"


def gkcp_options(extra: str = "") -> str:
    base = f"mode={KCP_MODE};sndwnd={KCP_SNDWND};rcvwnd={KCP_RCVWND};mtu={KCP_MTU}"
    return base + (";" + extra if extra else "")


def kcptun_args() -> List[str]:
    return ["--mode", KCP_MODE, "--crypt", "none", "--nocomp", "--datashard", "0",
            "--parityshard", "0", "--sndwnd", str(KCP_SNDWND), "--rcvwnd", str(KCP_RCVWND),
            "--mtu", str(KCP_MTU), "--quiet"]


# kcptun's fast2 (nodelay 1, interval 20, resend 2) with its congestion window on
KCPTUN_FAST2_NC0 = "--mode manual --nodelay 1 --interval 20 --resend 2 --nc 0"


def gkcp_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "gkcp", *args]


@dataclass
class Tunnel:
    """A running tunnel: client listener `listen` forwards to `target` via `server`."""

    impl: Impl
    procs: List[Proc] = field(default_factory=list)
    listen: tuple = ("127.0.0.1", 0)

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs = []


def start_tunnel(impl: Impl, *, server_addr: tuple, target: tuple, client_listen: tuple,
                 server_ns: Optional[str] = None, client_ns: Optional[str] = None,
                 logdir: str) -> Tunnel:
    """Start the server side, then the client side; no readiness check here."""
    tun = Tunnel(impl, listen=client_listen)
    srv = f"{server_addr[0]}:{server_addr[1]}"
    tgt = f"{target[0]}:{target[1]}"
    lst = f"{client_listen[0]}:{client_listen[1]}"
    tag = impl.name.replace(" ", "_").replace("=", "").replace("/", "_")
    if impl.kind == "gkcp":
        server = gkcp_cmd("server", "-l", srv, "-t", tgt, "-o", impl.options, "-q")
        client = gkcp_cmd("local", "-l", lst, "-r", srv, "-o", impl.options, "-q")
    elif impl.kind == "kcptun":
        need("kcptun-server")
        need("kcptun-client")
        extra = impl.options.split() if impl.options else []
        base = kcptun_args()
        if "--mode" in extra:  # e.g. manual mode with explicit nodelay/interval/resend/nc
            i = base.index("--mode")
            del base[i:i + 2]
        server = ["kcptun-server", "-l", srv, "-t", tgt] + base + extra
        client = ["kcptun-client", "-l", lst, "-r", srv] + base + extra
    else:
        raise ValueError(impl.kind)
    try:
        tun.procs.append(Proc(server, name=f"{tag}-server", netns=server_ns,
                              stderr_path=os.path.join(logdir, f"{tag}-server.log")))
        tun.procs.append(Proc(client, name=f"{tag}-client", netns=client_ns,
                              stderr_path=os.path.join(logdir, f"{tag}-client.log")))
    except BaseException:
        tun.stop()
        raise
    return tun


def wait_ready(tun: Tunnel, *, netns: Optional[str] = None, timeout: float = 15.0) -> None:
    """An echo round trip through the tunnel (retried) proves both sides are up."""
    try:
        run_json(loadgen("probe", tun.listen[0], tun.listen[1], timeout),
                 timeout=timeout + 10, netns=netns)
    except BenchError as exc:
        dead = [f"{p.name} exited {p.popen.returncode}: {p.stderr_tail()}"
                for p in tun.procs if not p.alive()]
        raise BenchError(f"{tun.impl.name} did not come up: {exc} {' '.join(dead)}") from None


def finish_logs(logdir: str, rows: Sequence["Row"]) -> None:
    """Delete the processes' stderr logs, unless a row failed (then say where they are)."""
    if any(r.note.startswith("FAILED") for r in rows):
        log(f"logs of the tunnels kept in {logdir}")
    else:
        shutil.rmtree(logdir, ignore_errors=True)


# -- resource use -------------------------------------------------------------------
def cpu_seconds(pids: Sequence[int]) -> float:
    import psutil
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


class CpuMeter:
    """% of one core used by `pids` between start() and stop()."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.t0 = self.c0 = 0.0

    def start(self) -> "CpuMeter":
        self.t0 = time.monotonic()
        self.c0 = cpu_seconds(self.pids)
        return self

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        return 100.0 * (cpu_seconds(self.pids) - self.c0) / wall if wall > 0 else 0.0


# -- statistics --------------------------------------------------------------------------
def median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100)."""
    vals = sorted(values)
    if not vals:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(vals)))
    return vals[min(rank, len(vals)) - 1]


# -- results and the table -------------------------------------------------------------------
@dataclass
class Row:
    part: str
    scenario: str
    impl: str
    goodput: Optional[float] = None  # Mbit/s
    cpu: Optional[float] = None  # % of one core, tunnel client + server
    rtt_idle: Optional[tuple] = None  # (p50, p99) ms
    rtt_load: Optional[tuple] = None
    wire: Optional[float] = None  # bytes on the wire per payload byte
    qdrops: Optional[int] = None
    rss_conn: Optional[float] = None  # KiB per connection
    setup_rate: Optional[float] = None  # connections/s
    ratio: Optional[float] = None  # main figure vs kcptun
    note: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


COLUMNS = [
    ("part", 8), ("scenario", 22), ("impl", 13), ("goodput", 8), ("vs kcptun", 9),
    ("cpu%", 6), ("rtt idle p50/p99", 16), ("rtt load p50/p99", 16), ("wire/B", 6),
    ("qdrops", 6), ("KiB/conn", 8), ("conn/s", 7), ("note", 0),
]


def _num(v: Optional[float], fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _pair(v: Optional[tuple]) -> str:
    if not v or v[0] is None:
        return "-"
    return f"{v[0]:.1f}/{v[1]:.1f}"


def cells(r: Row) -> List[str]:
    goodput = r.goodput
    return [
        r.part, r.scenario, r.impl,
        _num(goodput, "{:.1f}" if goodput is not None and goodput < 100 else "{:.0f}"),
        _num(r.ratio, "{:.2f}x"),
        _num(r.cpu, "{:.1f}" if r.cpu is not None and r.cpu < 10 else "{:.0f}"),
        _pair(r.rtt_idle), _pair(r.rtt_load),
        _num(r.wire, "{:.3f}"), _num(r.qdrops), _num(r.rss_conn, "{:.1f}"),
        _num(r.setup_rate), r.note,
    ]


def format_table(rows: Sequence[Row]) -> str:
    header = [c for c, _ in COLUMNS]
    body = [cells(r) for r in rows]
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(len(header))]
    lines = []
    fmt = lambda cols: "  ".join(  # noqa: E731
        c.ljust(widths[i]) if i < 3 or i == len(cols) - 1 else c.rjust(widths[i])
        for i, c in enumerate(cols)).rstrip()
    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    for b in body:
        lines.append(fmt(b))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    header = [c for c, _ in COLUMNS]
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i < 3 or i == len(header) - 1 else "---:"
                          for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |")
    return "\n".join(out)


def add_ratios(rows: List[Row], key: str, *, higher_is_better: bool = True) -> None:
    """Set `ratio` = this row's `key` / kcptun's in the same part and scenario.

    The kcptun row with the same settings suffix is the reference ("gkcp
    fast2 nc=0" -> "kcptun fast2 nc=0"), else "kcptun fast2".
    """
    ref: Dict[tuple, float] = {}
    for r in rows:
        if r.impl.startswith("kcptun ") and getattr(r, key) is not None:
            ref[(r.part, r.scenario, r.impl.split(" ", 1)[1])] = getattr(r, key)
    for r in rows:
        suffix = r.impl.split(" ", 1)[1] if " " in r.impl else ""
        base = ref.get((r.part, r.scenario, suffix), ref.get((r.part, r.scenario, KCP_MODE)))
        val = getattr(r, key)
        if base and val is not None:
            r.ratio = val / base if higher_is_better else base / val if val else None
