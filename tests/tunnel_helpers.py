"""Fixtures and helpers for the tunnel tests (test_tunnel.py, test_cli.py).

Monkey-patching
---------------
gevent must patch the standard library before anything creates a socket,
a lock or a thread.  This module patches on import (unless something
already did), and test_cli.py and test_tunnel.py import it before anything
else.  Caveats: pytest imports test modules in collection order, so modules
collected earlier (test_bench_smoke.py, or anything named on the command
line before these) are imported unpatched; that is harmless as long as they
create no sockets, threads or locks at import time, which none does today.
The patch cannot be undone: every test after the first of these modules runs
in a patched process (time.sleep, subprocess, select are gevent's).  The
whole suite passes that way.

What is here
------------
* `targets`: TCP servers in this process (echo, banner, ...), stopped at
  teardown with their handler greenlets.
* `tunnels`: a ServerEndpoint + LocalEndpoint pair in front of a target;
  every endpoint started through it is stopped at teardown.
* `clients`: client sockets and greenlets, closed and killed at teardown.
* `link`: wraps `UdpTransport.send` to drop, delay (reorder) and duplicate
  datagrams with a seeded RNG, or to black-hole one endpoint.
* `processes`: subprocesses of the CLI tests, killed at teardown (only the
  PIDs this fixture started).

Readiness is always detected by polling (a port, a predicate), never by a
fixed sleep.
"""

# ruff: noqa: E402  (the patch must come first)
from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

import dataclasses
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Deque, Dict, List, Optional, Tuple

import gevent
import pytest
from gevent.pool import Group
from gevent.server import StreamServer

REPO = Path(__file__).resolve().parent.parent
try:
    import gkcp  # noqa: F401
except ImportError:  # pragma: no cover - run from elsewhere without an install
    sys.path.insert(0, str(REPO))

import gkcp.options
from gkcp.endpoint import Endpoint, UdpTransport
from gkcp.local import LocalEndpoint
from gkcp.protocol import Timeouts
from gkcp.server import ServerEndpoint

Address = Tuple[str, int]
CHUNK = 65536


# -- small helpers ------------------------------------------------------------------

def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll `predicate` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(interval_s)


def random_chunks(seed: int, size: int, chunk: int = CHUNK):
    """`size` pseudo-random bytes from `seed`, in chunks."""
    rng = random.Random(seed)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def expected_digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for block in random_chunks(seed, size):
        h.update(block)
    return h.hexdigest()


def send_random(sock: socket.socket, seed: int, size: int, *, shut: bool = True) -> str:
    """Send `size` seeded random bytes; SHUT_WR after if `shut`. Returns their SHA-256."""
    h = hashlib.sha256()
    for block in random_chunks(seed, size):
        h.update(block)
        sock.sendall(block)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def recv_to_eof(sock: socket.socket) -> Tuple[int, str]:
    """Read until EOF. Returns (bytes read, their SHA-256). A reset raises."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(CHUNK)
        if not data:
            return total, h.hexdigest()
        total += len(data)
        h.update(data)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    parts: List[bytes] = []
    left = size
    while left:
        data = sock.recv(min(left, CHUNK))
        if not data:
            raise EOFError(f"EOF with {left} of {size} bytes missing")
        parts.append(data)
        left -= len(data)
    return b"".join(parts)


def wait_closed(sock: socket.socket, timeout_s: float) -> Tuple[str, float]:
    """Read (discarding data) until EOF or reset.

    Returns ("eof" | "reset" | "timeout", seconds waited).
    """
    start = time.monotonic()
    outcome = "timeout"
    with gevent.Timeout(timeout_s, False):
        try:
            while sock.recv(CHUNK):
                pass
            outcome = "eof"
        except (ConnectionResetError, BrokenPipeError):
            outcome = "reset"
    return outcome, time.monotonic() - start


def wait_quiet(endpoints, quiet_s: float = 0.3, timeout_s: float = 10.0) -> bool:
    """Poll until none of `endpoints` has sent a datagram for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    since = time.monotonic()
    while time.monotonic() < deadline:
        sent = tuple(e.stats.datagrams_out for e in endpoints)
        if sent != last:
            last, since = sent, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return True
        gevent.sleep(0.05)
    return False


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses that need a number)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def fast_options(timeouts: Optional[Timeouts] = None, text: str = "mode=fast2"):
    opts, warnings = gkcp.options.parse_options(text)
    assert not warnings
    if timeouts is not None:
        opts = dataclasses.replace(opts, timeouts=timeouts)
    return opts


# -- target servers ---------------------------------------------------------------

def echo_handler(sock: socket.socket, _addr) -> None:
    """Echo until EOF, then SHUT_WR (half-close passes through).

    A reset from the tunnel ends the handler quietly: the client side of
    each test is what asserts.
    """
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        # wait for the peer's close, so that our close() cannot become a reset
        with gevent.Timeout(30, False):
            while sock.recv(CHUNK):
                pass
    except (ConnectionResetError, BrokenPipeError):
        pass


class Targets:
    """TCP servers in this process; each `start(handler)` returns its address."""

    def __init__(self) -> None:
        self.servers: List[StreamServer] = []

    def start(self, handler: Callable, host: str = "127.0.0.1") -> Address:
        server = StreamServer((host, 0), handler)
        server.start()
        self.servers.append(server)
        return server.address[:2]

    def echo(self) -> Address:
        return self.start(echo_handler)

    def close(self) -> None:
        for server in self.servers:
            server.stop(timeout=1)  # closes the listener, then kills handlers


@pytest.fixture
def targets():
    t = Targets()
    yield t
    t.close()


# -- endpoints --------------------------------------------------------------------

class Tunnel:
    """A server endpoint and a local endpoint in front of a target."""

    def __init__(self, server: ServerEndpoint, local: LocalEndpoint) -> None:
        self.server = server
        self.local = local

    @property
    def address(self) -> Address:
        return self.local.bound_addresses[0][:2]

    @property
    def udp_address(self) -> Address:
        return self.server.bound_addresses[0][:2]


class Tunnels:
    """Starts endpoints and stops every one of them at teardown."""

    def __init__(self) -> None:
        self.endpoints: List[Endpoint] = []

    def server(self, target: Address, options=None, port: int = 0) -> ServerEndpoint:
        srv = ServerEndpoint(options or fast_options(), [("127.0.0.1", port)], target)
        srv.start()
        self.endpoints.append(srv)
        return srv

    def local(self, server_addr: Address, options=None) -> LocalEndpoint:
        loc = LocalEndpoint(options or fast_options(), [("127.0.0.1", 0)], [server_addr])
        loc.start()
        self.endpoints.append(loc)
        return loc

    def __call__(self, target: Address, options=None) -> Tunnel:
        srv = self.server(target, options)
        loc = self.local(srv.bound_addresses[0][:2], options)
        return Tunnel(srv, loc)

    def close(self) -> None:
        for endpoint in reversed(self.endpoints):
            if not endpoint.stopped.is_set():
                # End the endpoint's greenlets first, so that no reader is left
                # waiting on a UDP socket that stop() closes: libev aborts the
                # whole process on that (75a067d did it; the test
                # test_stop_under_traffic_does_not_crash checks stop() itself).
                # A teardown after a failed transfer must not take pytest down.
                endpoint.group.kill(block=True, timeout=2)
                endpoint.stop()


def describe(endpoints) -> str:
    """A one-line state of `endpoints` for failure messages."""
    parts = []
    for e in endpoints:
        peers = ", ".join(f"{p.addr[1]}: {len(p.conversations)} conv, "
                          f"{'validated' if p.validated else f'UNVALIDATED, {p.held_bytes} B held'}"
                          for p in e.peers.values())
        s = e.stats
        parts.append(f"{e.role}: in {s.datagrams_in} out {s.datagrams_out} "
                     f"dropped {s.send_dropped} rst {s.rst_sent}/{s.rst_received} [{peers}]")
    return "; ".join(parts)


@pytest.fixture
def tunnels():
    t = Tunnels()
    yield t
    t.close()


# -- clients ----------------------------------------------------------------------

class Clients:
    """Client sockets and greenlets, all closed or killed at teardown."""

    def __init__(self) -> None:
        self.sockets: List[socket.socket] = []
        self.group = Group()

    def connect(self, addr: Address, timeout_s: float = 5.0) -> socket.socket:
        sock = socket.create_connection(addr, timeout=timeout_s)
        sock.settimeout(None)  # deadlines come from gevent.Timeout in the tests
        self.sockets.append(sock)
        return sock

    def spawn(self, fn, *args, **kwargs) -> gevent.Greenlet:
        return self.group.spawn(fn, *args, **kwargs)

    def close(self) -> None:
        self.group.kill(block=True, timeout=5)
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def clients():
    c = Clients()
    yield c
    c.close()


# -- an unreliable link -------------------------------------------------------------

class Link:
    """What `UdpTransport.send` does to datagrams: drop, delay, duplicate, black-hole.

    Decisions come from one seeded RNG.  A delayed datagram is sent from a
    loop timer (never from a greenlet that could yield inside a KCP flush),
    so datagrams sent after it may overtake it: that is the reordering.
    """

    def __init__(self, original: Callable) -> None:
        self.original = original
        self.rng = random.Random(0)
        self.loss = 0.0
        self.reorder = 0.0
        self.duplicate = 0.0
        self.max_delay_s = 0.0
        self.muted: set = set()  # endpoints whose datagrams all vanish
        self.rate_bps = 0.0  # a bottleneck per sending endpoint (0: none) ...
        self.queue_limit = 0  # ... with a drop-tail queue of this many packets
        self.link_delay_s = 0.0  # ... and this propagation delay
        self._departures: Dict[object, Deque[float]] = {}
        self.drop_if: Optional[Callable[[UdpTransport, bytes], bool]] = None
        self.counts: Counter = Counter()
        self._timers: set = set()
        self._loop = gevent.get_hub().loop

    def impair(self, seed: int, loss: float = 0.10, reorder: float = 0.10,
               duplicate: float = 0.05, max_delay_s: float = 0.02) -> None:
        self.rng = random.Random(seed)
        self.loss, self.reorder, self.duplicate = loss, reorder, duplicate
        self.max_delay_s = max_delay_s

    def bottleneck(self, rate_bps: float, queue: int, delay_s: float = 0.0) -> None:
        """Each sender's datagrams leave one at a time at `rate_bps` (IP bytes);
        at most `queue` wait, the rest are dropped (counted as queue_drops);
        then they take `delay_s` more to arrive."""
        self.rate_bps, self.queue_limit, self.link_delay_s = rate_bps, queue, delay_s

    def _through_bottleneck(self, transport: UdpTransport, datagram: bytes, addr) -> None:
        now = time.monotonic()
        departures = self._departures.setdefault(transport.endpoint, deque())
        while departures and departures[0] <= now:
            departures.popleft()
        if len(departures) >= self.queue_limit:
            self.counts["queue_drops"] += 1
            return
        self.counts["through_bottleneck"] += 1
        start = departures[-1] if departures else now
        wire = len(datagram) + 28 + (28 if transport.sealer is not None else 0)  # IP, UDP, AEAD
        leaves = start + wire * 8 / self.rate_bps
        departures.append(leaves)
        self._later(leaves - now + self.link_delay_s, transport, datagram, addr)

    def mute(self, endpoint: Endpoint) -> None:
        self.muted.add(endpoint)

    def send(self, transport: UdpTransport, datagram: bytes, addr) -> None:
        counts = self.counts
        if transport.endpoint in self.muted or (self.drop_if and self.drop_if(transport, datagram)):
            counts["muted"] += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            counts["lost"] += 1
            return
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        counts["duplicated"] += copies - 1
        for _ in range(copies):
            if self.rate_bps:
                self._through_bottleneck(transport, datagram, addr)
            elif self.reorder and rng.random() < self.reorder:
                counts["delayed"] += 1
                self._later(rng.uniform(0.001, self.max_delay_s), transport, datagram, addr)
            else:
                self.original(transport, datagram, addr)

    def _later(self, delay_s: float, transport: UdpTransport, datagram: bytes, addr) -> None:
        timer = self._loop.timer(delay_s)

        def fire() -> None:
            self._timers.discard(timer)
            timer.close()
            self.original(transport, datagram, addr)  # a closed socket: counted as dropped

        self._timers.add(timer)
        timer.start(fire)

    def close(self) -> None:
        for timer in list(self._timers):
            timer.stop()
            timer.close()
        self._timers.clear()


@pytest.fixture
def link(monkeypatch):
    lk = Link(UdpTransport.send)

    def send(transport, datagram, addr):
        lk.send(transport, datagram, addr)

    monkeypatch.setattr(UdpTransport, "send", send)
    yield lk
    lk.close()


# -- subprocesses (CLI tests) -------------------------------------------------------

def gkcp_env() -> dict:
    """The environment of a subprocess: the repository and tests/ importable, no SS_*."""
    env = dict(os.environ)
    paths = [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    for key in [k for k in env if k.startswith("SS_")]:  # never plugin mode by accident
        del env[key]
    return env


class Processes:
    """Child processes of one test.

    Output goes to files (a pipe nobody reads could fill up and stall a
    child).  At teardown each child still running gets SIGTERM, then SIGKILL;
    only PIDs started here are ever signalled.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: List[subprocess.Popen] = []
        self._logs: dict = {}

    def python(self, *args: str) -> subprocess.Popen:
        """`python ARGS`, from the repository, output to files."""
        n = len(self.procs)
        out_path = self.log_dir / f"proc{n}.out"
        err_path = self.log_dir / f"proc{n}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, *args], cwd=str(REPO), env=gkcp_env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.procs.append(proc)
        self._logs[proc.pid] = (out_path, err_path)
        return proc

    def gkcp(self, *args: str) -> subprocess.Popen:
        return self.python("-m", "gkcp", *args)

    def output(self, proc: subprocess.Popen) -> Tuple[str, str]:
        out_path, err_path = self._logs[proc.pid]
        return (out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))

    def finish(self, proc: subprocess.Popen, timeout_s: float) -> subprocess.CompletedProcess:
        """Wait for `proc` to exit (TimeoutExpired if it does not)."""
        proc.wait(timeout=timeout_s)
        out, err = self.output(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
        """`python -m gkcp ARGS` to completion."""
        return self.finish(self.gkcp(*args), timeout_s)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@pytest.fixture
def processes(tmp_path):
    p = Processes(tmp_path)
    yield p
    p.close()


def udp_bound_by(pid: int, port: int) -> bool:
    """Has process `pid` a UDP socket bound to `port`? (a server's readiness)"""
    import psutil
    try:
        conns = psutil.Process(pid).net_connections(kind="udp")
    except psutil.NoSuchProcess:
        return False
    return any(c.laddr and c.laddr[1] == port for c in conns)


def wait_ready(processes: Processes, proc: subprocess.Popen, ready: Callable[[], bool],
               timeout_s: float = 20) -> None:
    """Poll `ready()` until it holds; fail at once if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode} before it was ready: "
                        f"{processes.output(proc)[1][-2000:]}")
        if time.monotonic() >= deadline:
            pytest.fail(f"{proc.args} not ready after {timeout_s}s: "
                        f"{processes.output(proc)[1][-2000:]}")
        gevent.sleep(0.02)
