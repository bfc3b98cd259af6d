"""An emulated link between two network namespaces, in user space (no netem).

::

    client ns               (emulator, per direction)                server ns
    10.201.0.1 --[TUN gkbt0]-- loss -> queue/rate -> delay+jitter --[TUN gkbt0]-- 10.201.0.2
               <----------------- the same, other direction ------------------

`Lab` creates two namespaces named gkbench-<pid>-c and gkbench-<pid>-s,
one persistent TUN device in each (10.201.0.1/24 and 10.201.0.2/24, IPv6
off) and removes them again on exit, also after a failure; at start it
removes leftovers of earlier runs whose bench process is gone (same name
prefix), after stopping the processes still inside them.

`Emulator` runs the forwarder: bench/linkemu.c, compiled with gcc into a
temporary directory (the default), or the same thing in Python
(`--python-emulator`, or when gcc is missing).  Measured here (2 cores,
`selftest`, iperf3 TCP through the link): unlimited, C carries 2.4 Gbit/s
and Python 0.98 Gbit/s; at 100 Mbit/s 5 ms both keep up (94.5 Mbit/s).  C
is the default all the same: it schedules each packet with nanosecond
timers (ppoll, 1 ns timer slack), while Python's poll() has 1 ms
resolution, so its pacing at 100 Mbit/s comes in 1 ms bursts, and its
timing suffers more when the Python tunnels next to it load both cores.

    python bench/linkemu.py selftest [RATE:DELAY:JITTER:LOSS:QUEUE] [--python-emulator]
        iperf3 (TCP) through the link for 5 s: Mbit/s and the forwarder's CPU
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import BENCH_DIR, BenchError, Missing, log  # noqa: E402

PREFIX = "gkbench-"
DEV = "gkbt0"
CLIENT_IP = "10.201.0.1"
SERVER_IP = "10.201.0.2"
NETNS_DIR = "/var/run/netns"


@dataclass
class LinkParams:
    """One direction of the link."""

    rate_mbit: float = 0.0  # 0 = unlimited
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability, 0..1
    queue: int = 0  # packets, 0 = unlimited

    def spec(self) -> str:
        return f"{self.rate_mbit}:{self.delay_ms}:{self.jitter_ms}:{self.loss}:{self.queue}"


def _ip(*args: str, check: bool = True, netns: Optional[str] = None) -> subprocess.CompletedProcess:
    argv = ["ip"] + (["netns", "exec", netns, "ip"] if netns else []) + list(args)
    out = subprocess.run(argv, capture_output=True, timeout=20)
    if check and out.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {out.stderr.decode(errors='replace').strip()}")
    return out


def _sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}"],
                   capture_output=True, timeout=20, check=False)


def cleanup_leftovers() -> None:
    """Remove gkbench-<pid>-* namespaces whose bench process is gone."""
    if not os.path.isdir(NETNS_DIR):
        return
    for name in sorted(os.listdir(NETNS_DIR)):
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[cs]", name)
        if not m:
            continue
        owner = int(m.group(1))
        if owner != os.getpid() and _pid_alive(owner) and _is_bench(owner):
            continue  # another bench is running right now
        _delete_ns(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_bench(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bench" in f.read()
    except OSError:
        return False


def _delete_ns(name: str) -> None:
    """Stop the processes left in our namespace (by PID), then delete it."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=20)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p)]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


class Lab:
    """Two namespaces joined by nothing but the emulator's TUN devices."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise Missing("network namespaces need root")
        if shutil.which("ip") is None:
            raise Missing("ip (iproute2) not found")
        if not os.path.exists("/dev/net/tun"):
            raise Missing("/dev/net/tun missing")
        self.client_ns = f"{PREFIX}{os.getpid()}-c"
        self.server_ns = f"{PREFIX}{os.getpid()}-s"

    def __enter__(self) -> "Lab":
        cleanup_leftovers()
        try:
            for ns, addr in ((self.client_ns, CLIENT_IP), (self.server_ns, SERVER_IP)):
                _ip("netns", "add", ns)
                _sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
                _sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
                _sysctl(ns, "net.ipv4.tcp_congestion_control", "cubic")
                # socket buffers up to 8 MiB (the bulk client asks for 4 MiB)
                _sysctl(ns, "net.core.rmem_max", "8388608")
                _sysctl(ns, "net.core.wmem_max", "8388608")
                _ip("link", "set", "lo", "up", netns=ns)
                _ip("tuntap", "add", "dev", DEV, "mode", "tun", netns=ns)
                _ip("link", "set", DEV, "txqueuelen", "1000", netns=ns)
                _ip("addr", "add", f"{addr}/24", "dev", DEV, netns=ns)
                _ip("link", "set", DEV, "up", netns=ns)
        except BaseException:
            self.close()
            raise
        return self

    def ns_path(self, ns: str) -> str:
        return os.path.join(NETNS_DIR, ns)

    def close(self) -> None:
        for ns in (self.client_ns, self.server_ns):
            if os.path.exists(self.ns_path(ns)):
                _delete_ns(ns)

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the forwarder process ------------------------------------------------------------
def compile_c(workdir: str) -> Optional[str]:
    """gcc -O2 bench/linkemu.c into workdir; None when there is no compiler."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    exe = os.path.join(workdir, "linkemu")
    out = subprocess.run([gcc, "-O2", "-Wall", "-o", exe, os.path.join(BENCH_DIR, "linkemu.c")],
                         capture_output=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"gcc linkemu.c failed: {out.stderr.decode(errors='replace')[-800:]}")
    return exe


class Emulator:
    """The running forwarder; counters via its stdin protocol (see linkemu.c)."""

    def __init__(self, lab: Lab, ab: LinkParams, ba: LinkParams, *, seed: int = 1,
                 python: bool = False, max_seconds: float = 3600.0) -> None:
        self.tmp = tempfile.mkdtemp(prefix="gkbench-emu-")
        exe = None if python else compile_c(self.tmp)
        if exe is None:
            argv = [sys.executable, os.path.abspath(__file__), "emulate"]
            self.kind = "python"
        else:
            argv = [exe]
            self.kind = "c"
        argv += [lab.ns_path(lab.client_ns), DEV, lab.ns_path(lab.server_ns), DEV,
                 ab.spec(), ba.spec(), str(seed), str(max_seconds)]
        from bench.common import _die_with_parent
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        line = self._readline(10.0)
        if line != "ready":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None \
                else ""
            self.close()
            raise BenchError(f"link emulator did not start ({line!r}): {err}")

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise BenchError("link emulator did not answer")
        return self.proc.stdout.readline().decode().strip()

    def command(self, text: str) -> str:
        assert self.proc.stdin is not None
        if self.proc.poll() is not None:
            raise BenchError(f"link emulator exited {self.proc.returncode}")
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()
        return self._readline(5.0)

    def set(self, ab: LinkParams, ba: LinkParams) -> None:
        for d, p in (("ab", ab), ("ba", ba)):
            if self.command(f"p {d} {p.spec()}") != "ok":
                raise BenchError(f"link emulator refused {p}")

    def zero(self) -> None:
        self.command("z")

    def stats(self) -> dict:
        return json.loads(self.command("s"))

    def cpu_seconds(self) -> float:
        from bench.common import cpu_seconds
        return cpu_seconds([self.pid])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"q\n")
                self.proc.stdin.flush()
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the Python forwarder (fallback, and to measure why C is the default) ---------------
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_CLONE_NEWNET = 0x40000000


def _open_tun(ns_path: str, dev: str) -> int:
    import fcntl
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(ns_path, os.O_RDONLY)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, _TUNSETIFF, struct.pack("16sH", dev.encode(), _IFF_TUN | _IFF_NO_PI))
    os.set_blocking(tun, False)
    return tun


class _PyDir:
    def __init__(self, name: str, params: str) -> None:
        self.name = name
        self.set(params)
        self.ring: list = []  # [dep, due, data]
        self.head = 0  # deliver from here
        self.qhead = 0  # first still queued
        self.last_dep = 0.0
        self.last_due = 0.0
        self.zero()

    def set(self, params: str) -> None:
        rate, delay, jitter, loss, queue = params.split(":")
        self.rate = float(rate) * 1e6
        self.delay = float(delay) / 1000
        self.jitter = float(jitter) / 1000
        self.loss = float(loss)
        self.queue = int(queue)

    def zero(self) -> None:
        self.c = dict(rx_pkts=0, rx_bytes=0, loss_drops=0, queue_drops=0, tx_pkts=0,
                      tx_bytes=0, write_errors=0, max_queue=0)


def python_emulate(argv: List[str]) -> int:
    ns_a, dev_a, ns_b, dev_b, p_ab, p_ba, seed = argv[:7]
    max_s = float(argv[7]) if len(argv) > 7 else 3600.0
    rng = random.Random(int(seed))
    fa = _open_tun(ns_a, dev_a)
    fb = _open_tun(ns_b, dev_b)
    dirs = {"ab": _PyDir("ab", p_ab), "ba": _PyDir("ba", p_ba)}
    route = {fa: (dirs["ab"], fb), fb: (dirs["ba"], fa)}
    out_fd = {id(dirs["ab"]): fb, id(dirs["ba"]): fa}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    poller = select.poll()
    for fd in (fa, fb, 0):
        poller.register(fd, select.POLLIN)
    clock = time.monotonic
    deadline = clock() + max_s
    pending = b""
    while True:
        now = clock()
        if now >= deadline:
            return 0
        nxt = deadline
        for d in dirs.values():
            ring = d.ring
            fd = out_fd[id(d)]
            while d.head < len(ring) and ring[d.head][1] <= now:
                data = ring[d.head][2]
                try:
                    os.write(fd, data)
                    d.c["tx_pkts"] += 1
                    d.c["tx_bytes"] += len(data)
                except OSError:
                    d.c["write_errors"] += 1
                d.head += 1
            if d.head > 4096:
                del ring[:d.head]
                d.qhead = max(0, d.qhead - d.head)
                d.head = 0
            if d.qhead < d.head:
                d.qhead = d.head
            if d.head < len(ring):
                nxt = min(nxt, ring[d.head][1])
        events = poller.poll(max(0.0, (nxt - now) * 1000))
        now = clock()
        for fd, _ev in events:
            if fd == 0:
                chunk = os.read(0, 4096)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    text = line.decode().strip()
                    if text == "q":
                        return 0
                    if text == "s":
                        reply = json.dumps({k: dict(d.c, in_flight=len(d.ring) - d.head)
                                            for k, d in dirs.items()})
                    elif text == "z":
                        for d in dirs.values():
                            d.zero()
                        reply = "ok"
                    elif text.startswith("p "):
                        _, which, params = text.split()
                        dirs[which].set(params)
                        reply = "ok"
                    else:
                        reply = "error"
                    sys.stdout.write(reply + "\n")
                    sys.stdout.flush()
                continue
            d, _out = route[fd]
            c = d.c
            ring = d.ring
            for _ in range(64):
                try:
                    data = os.read(fd, 2048)
                except BlockingIOError:
                    break
                c["rx_pkts"] += 1
                c["rx_bytes"] += len(data)
                if d.loss and rng.random() < d.loss:
                    c["loss_drops"] += 1
                    continue
                while d.qhead < len(ring) and ring[d.qhead][0] <= now:
                    d.qhead += 1
                queued = len(ring) - d.qhead
                if d.queue and queued >= d.queue:
                    c["queue_drops"] += 1
                    continue
                dep = max(now, d.last_dep) + (len(data) * 8 / d.rate if d.rate else 0.0)
                due = dep + d.delay + (rng.random() * d.jitter if d.jitter else 0.0)
                due = max(due, d.last_due)
                d.last_dep, d.last_due = dep, due
                ring.append([dep, due, data])
                c["max_queue"] = max(c["max_queue"], queued + 1)


# -- self test: how fast is each forwarder? ----------------------------------------------
def selftest(python: bool, params: LinkParams, seconds: float = 5.0) -> dict:
    """iperf3 (plain TCP) through the link: throughput and forwarder CPU."""
    from bench.common import Proc, free_port, run_json
    with Lab() as lab:
        emu = Emulator(lab, params, params, python=python, max_seconds=120)
        try:
            port = free_port()
            srv = Proc(["iperf3", "-s", "-p", str(port)], name="iperf3-s", netns=lab.server_ns)
            try:
                time.sleep(0.5)
                c0 = emu.cpu_seconds()
                t0 = time.monotonic()
                res = run_json(["iperf3", "-c", SERVER_IP, "-p", str(port), "-t", str(seconds),
                                "-J"], timeout=seconds + 30, netns=lab.client_ns)
                cpu = 100 * (emu.cpu_seconds() - c0) / (time.monotonic() - t0)
            finally:
                srv.stop()
            mbit = res["end"]["sum_received"]["bits_per_second"] / 1e6
            rtt = res["end"]["streams"][0]["sender"].get("mean_rtt")
            return {"emulator": emu.kind, "link": params.spec(), "tcp_mbit": round(mbit, 1),
                    "tcp_mean_rtt_ms": rtt / 1000 if rtt else None,
                    "emulator_cpu_pct": round(cpu, 1), "stats": emu.stats()}
        finally:
            emu.close()


def main(argv: List[str]) -> int:
    if argv and argv[0] == "emulate":
        return python_emulate(argv[1:])
    if argv and argv[0] == "selftest":
        spec = [a for a in argv[1:] if not a.startswith("--")]
        params = LinkParams(*map(float, spec[0].split(":"))) if spec else LinkParams()
        params.queue = int(params.queue)
        print(json.dumps(selftest("--python-emulator" in argv, params)))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Missing as exc:
        log(f"skipped: {exc}")
        sys.exit(0)
