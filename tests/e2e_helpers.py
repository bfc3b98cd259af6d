"""Helpers for the end-to-end tests: real shadowsocks, real plugins, curl.

Theory of operation
-------------------
A test starts real processes (``ss-server``, ``ss-local``, ``gkcp-*`` run
directly, an HTTP server) through a ``ProcessTracker``.  The tracker writes
each process's stdout and stderr to files (no pipes to fill up), remembers
every process it started *and* every descendant it has seen (shadowsocks
starts gkcp, gkcp starts its secondary plugin), and at the end SIGKILLs
whatever of those is still alive.  It never looks at processes it did not
start or see below one it started, so tests running beside others on the
same machine stay out of each other's way.

Readiness is always polled against a deadline, never slept for:
``wait_until`` for conditions, ``wait_ready`` for a proxy chain (the first
fetches may fail: ss-local listens before gkcp-local does).  Only then is
the big file fetched, once, by ``fetch_big``: a broken transfer is a
failure, never retried.

Rules kept here:

* every wait has a deadline and says what it waited for when it fails,
  with the tails of the processes' logs;
* a process counts as gone when it no longer exists or is a zombie (an
  orphan is reaped by whatever adopted it, which may be never in a
  container);
* ports are picked free on the address they will be used on; a UDP+TCP pair
  for a shadowsocks server port, since the KCP server takes its UDP side.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil

#: where the interpreter running the tests lives: gkcp-local etc. are there
BIN_DIR = Path(sys.executable).parent
PASSWORD = "pw"
METHOD = "chacha20-ietf-poly1305"

READY_S = 20.0  # start-up of a whole chain, until a first fetch succeeds
EXIT_S = 5.0  # a process told (or left) to stop must be gone within this
ATTEMPT_S = 3.0  # one readiness attempt of curl
FETCH_S = 30.0  # the big download, once the chain is ready

SS_VARS = ("SS_REMOTE_HOST", "SS_REMOTE_PORT", "SS_LOCAL_HOST", "SS_LOCAL_PORT",
           "SS_PLUGIN_OPTIONS")


# -- environment ---------------------------------------------------------------------

def missing_binaries(*names: str) -> List[str]:
    return [name for name in names if shutil.which(name) is None]


def gkcp_entry_points() -> List[str]:
    """gkcp's scripts not installed next to sys.executable (should be none)."""
    return [name for name in ("gkcp", "gkcp-local", "gkcp-server")
            if not (BIN_DIR / name).exists()]


def process_env(**extra: str) -> Dict[str, str]:
    """os.environ with BIN_DIR first on PATH, no proxy and no SS_* variables."""
    env = {key: value for key, value in os.environ.items()
           if key not in SS_VARS and not key.lower().endswith("_proxy")}
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", os.defpath)])
    env.update(extra)
    return env


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1", *, udp: bool = True, tcp: bool = True) -> int:
    """A port free on `host` for UDP and/or TCP (at the time of asking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = [kind for kind, wanted in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp))
             if wanted]
    for _ in range(100):
        socks = []
        try:
            first = socket.socket(family, kinds[0])
            socks.append(first)
            first.bind((host, 0))
            port = first.getsockname()[1]
            for kind in kinds[1:]:
                other = socket.socket(family, kind)
                socks.append(other)
                other.bind((host, port))
            return int(port)
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no free port on {host}")


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- processes -----------------------------------------------------------------------

def is_gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `predicate` until true (-> True) or `timeout_s` passed (-> False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def catches_signal(pid: int, signum: int) -> bool:
    """Linux: has `pid` installed a handler for `signum` (SigCgt in /proc/PID/status)?

    A precise readiness signal for "gkcp is serving": it installs its stop
    handlers only once it is set up.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} {' '.join(proc.cmdline())!r} ({proc.status()})"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def cmdline_has(proc: psutil.Process, word: str) -> bool:
    """True if `word` is one of the argv items or their base names."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return False
    return any(word in (arg, os.path.basename(arg)) for arg in argv)


@dataclass
class Started:
    """One process a test started, with its logs on disk."""

    name: str
    popen: subprocess.Popen
    proc: psutil.Process
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def wait_exit(self, timeout_s: float) -> Optional[int]:
        """The exit status, or None if still running after `timeout_s`."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


class ProcessTracker:
    """Starts processes, remembers them and their descendants, kills them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: List[Started] = []
        self.seen: Dict[int, psutil.Process] = {}

    def start(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> Started:
        stdout_path = self.workdir / f"{name}.stdout"
        stderr_path = self.workdir / f"{name}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, env=env if env is not None else process_env(),
                                     cwd=cwd or self.workdir)
        proc = psutil.Process(popen.pid)
        self.seen[popen.pid] = proc
        started = Started(name, popen, proc, stdout_path, stderr_path)
        self.started.append(started)
        return started

    def descendants(self, started: Started) -> List[psutil.Process]:
        """The live descendants of `started`, remembered for the clean-up."""
        try:
            found = started.proc.children(recursive=True)
        except psutil.Error:
            return []
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
        return [proc for proc in found if not is_gone(proc)]

    def wait_descendant(self, started: Started, word: str,
                        timeout_s: float = READY_S) -> psutil.Process:
        """The descendant whose argv has `word` (e.g. 'obfs-local'), once it exists."""
        found: List[psutil.Process] = []

        def look() -> bool:
            found[:] = [p for p in self.descendants(started) if cmdline_has(p, word)]
            return bool(found)

        if not wait_until(look, timeout_s):
            raise AssertionError(f"no {word} below {started.name} after {timeout_s:g} s\n"
                                 + self.report())
        return found[0]

    def remember_all(self) -> None:
        for started in self.started:
            if not started.exited():
                self.descendants(started)

    def report(self) -> str:
        """Process states and log tails, for assertion messages."""
        lines = []
        for started in self.started:
            code = started.popen.poll()
            lines.append(f"--- {started.name} (pid {started.pid}, "
                         f"{'running' if code is None else f'exit {code}'})")
            for label, text in (("stdout", started.stdout()), ("stderr", started.stderr())):
                tail = text.strip().splitlines()[-15:]
                if tail:
                    lines.append(f"  [{label}]")
                    lines.extend(f"    {line}" for line in tail)
        return "\n".join(lines)

    def cleanup(self) -> List[str]:
        """SIGKILL everything started or seen that is still alive; reap our children.

        Returns descriptions of processes that would not die (should be none).
        """
        self.remember_all()
        for proc in self.seen.values():
            if not is_gone(proc):
                try:
                    proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        for started in self.started:
            try:
                started.popen.wait(timeout=EXIT_S)
            except subprocess.TimeoutExpired:
                pass
        stubborn: List[str] = []
        for proc in self.seen.values():
            if not wait_until(lambda p=proc: is_gone(p), EXIT_S):
                stubborn.append(describe(proc))
        return stubborn


def assert_all_gone(tracker: ProcessTracker, procs: Sequence[psutil.Process],
                    timeout_s: float, what: str) -> None:
    if wait_until(lambda: all(is_gone(p) for p in procs), timeout_s):
        return
    left = [describe(p) for p in procs if not is_gone(p)]
    raise AssertionError(f"{what}: still running after {timeout_s:g} s: {left}\n"
                         + tracker.report())


# -- shadowsocks ---------------------------------------------------------------------

def start_ss_server(tracker: ProcessTracker, host: str, port: int, plugin: str,
                    opts: Optional[str] = None, name: str = "ss-server",
                    extra: Sequence[str] = ()) -> Started:
    argv = ["ss-server", "-v", *extra, "-s", host, "-p", str(port), "-k", PASSWORD,
            "-m", METHOD, "--plugin", plugin]
    if opts is not None:
        argv += ["--plugin-opts", opts]
    return tracker.start(name, argv)


def start_ss_local(tracker: ProcessTracker, host: str, port: int, socks_port: int, plugin: str,
                   opts: Optional[str] = None, bind: str = "127.0.0.1",
                   name: str = "ss-local") -> Started:
    argv = ["ss-local", "-v", "-s", host, "-p", str(port), "-k", PASSWORD, "-m", METHOD,
            "-b", bind, "-l", str(socks_port), "--plugin", plugin]
    if opts is not None:
        argv += ["--plugin-opts", opts]
    return tracker.start(name, argv)


# -- HTTP and curl ---------------------------------------------------------------------

@dataclass
class WebSite:
    """Our HTTP server: a small token file for readiness, a big random file."""

    port: int
    token: bytes
    big_sha256: str
    big_size: int
    popen: subprocess.Popen

    READY = "ready.txt"
    BIG = "big.bin"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


def start_website(root: Path, big_size: int, timeout_s: float = 10.0) -> WebSite:
    """Write the files and start `python -m http.server` on a kernel-chosen port."""
    token = os.urandom(16).hex().encode()
    (root / WebSite.READY).write_bytes(token)
    big = os.urandom(big_size)
    (root / WebSite.BIG).write_bytes(big)
    popen = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
         "--directory", str(root)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=process_env())
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = b""
    while time.monotonic() < deadline and b"\n" not in line:
        ready, _, _ = select.select([popen.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(popen.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    match = re.search(rb"port (\d+)", line)
    if match is None:
        stop_website_process(popen)
        raise RuntimeError(f"http.server did not say its port: {line!r}")
    return WebSite(int(match.group(1)), token, hashlib.sha256(big).hexdigest(), big_size, popen)


def stop_website_process(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        popen.kill()
    popen.wait(timeout=EXIT_S)
    if popen.stdout is not None:
        popen.stdout.close()


def curl(url: str, out: Path, max_time_s: float, socks: Optional[str] = None) -> \
        subprocess.CompletedProcess:
    """One curl run (through the SOCKS5 proxy `socks` if given) into `out`."""
    argv = ["curl", "-sS", "--fail", "--max-time", f"{max_time_s:g}", "-o", str(out)]
    argv += ["--socks5-hostname", socks] if socks else ["--noproxy", "*"]
    argv.append(url)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=process_env(), timeout=max_time_s + 10)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wait_ready(site: WebSite, tracker: ProcessTracker, socks: Optional[str] = None,
               url_base: Optional[str] = None, ready_s: float = READY_S,
               watch: Sequence[Started] = ()) -> int:
    """Poll the token file until it comes through; returns the attempts it took.

    `socks` is a SOCKS5 proxy (ss-local); without it, `url_base` replaces the
    site's own address (a direct gkcp tunnel).  Fails early if a process in
    `watch` exits.
    """
    out = tracker.workdir / "ready.out"
    url = f"{url_base}/{WebSite.READY}" if url_base else site.url(WebSite.READY)
    deadline = time.monotonic() + ready_s
    attempts = 0
    while True:
        attempts += 1
        result = curl(url, out, ATTEMPT_S, socks)
        if result.returncode == 0 and out.read_bytes() == site.token:
            return attempts
        last = f"curl exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
        dead = [s.name for s in watch if s.exited()]
        if dead or time.monotonic() >= deadline:
            why = f"{dead} exited" if dead else f"not ready after {ready_s:g} s"
            raise AssertionError(f"{why} ({attempts} attempts, last: {last})\n"
                                 + tracker.report())
        time.sleep(0.05)  # pacing between polls, not a readiness guess


def fetch_big(site: WebSite, tracker: ProcessTracker, socks: Optional[str] = None,
              url_base: Optional[str] = None) -> float:
    """Download the big file once (the chain is ready) and check it; returns seconds."""
    out = tracker.workdir / "big.out"
    url = f"{url_base}/{WebSite.BIG}" if url_base else site.url(WebSite.BIG)
    start = time.monotonic()
    result = curl(url, out, FETCH_S, socks)
    took = time.monotonic() - start
    assert result.returncode == 0, (
        f"big fetch failed after {took:.1f} s: curl exit {result.returncode}: "
        f"{result.stderr.decode(errors='replace').strip()}\n" + tracker.report())
    size = out.stat().st_size
    assert size == site.big_size and sha256_file(out) == site.big_sha256, (
        f"big file corrupted: {size} bytes of {site.big_size}, sha256 differs\n"
        + tracker.report())
    return took


def udp_ports(proc: psutil.Process) -> List[Tuple[str, int]]:
    """The local addresses of `proc`'s UDP sockets."""
    return [(conn.laddr.ip, conn.laddr.port) for conn in proc.net_connections(kind="udp")
            if conn.laddr]


def gkcp_complaints(text: str) -> List[str]:
    """Lines where gkcp warned, failed or crashed."""
    return [line for line in text.splitlines()
            if "gkcp: warning" in line or "gkcp: error" in line or "Traceback" in line]
