"""`gkcp demo`: a server, a local, a lossy link and a target in one process.

::

    client --TCP--> local ==KCP==> [LossyLink: loss, delay] ==KCP==> server --TCP--> target

The bulk client downloads a known pseudo-random stream for `--seconds` and
checks every byte; an echo client measures the round trip of 8-byte
requests meanwhile.  It ends with a table and exit 0 (1 if a byte was
wrong or nothing arrived).
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
from collections import deque
from typing import Deque, List, Optional, Tuple

import gevent
from gevent import socket as gsocket
from gevent.event import Event
from gevent.server import StreamServer

from .endpoint import udp_socket
from .local import LocalEndpoint
from .run import load_options
from .server import ServerEndpoint

PATTERN = random.Random(20261122).randbytes(1 << 20)  # the bulk stream repeats this


class LossyLink:
    """A UDP relay with loss and one-way delay each way (user space, loopback)."""

    def __init__(self, server: Tuple[str, int], loss: float, one_way_ms: float,
                 seed: int = 1) -> None:
        self.server = server
        self.loss = loss
        self.delay_s = one_way_ms / 1000.0
        self.rng = random.Random(seed)
        self.front = udp_socket(socket.AF_INET)  # the local endpoint talks to this
        self.front.bind(("127.0.0.1", 0))
        self.back = udp_socket(socket.AF_INET)  # this talks to the server
        self.back.bind(("127.0.0.1", 0))
        for s in (self.front, self.back):
            s.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        self.client: Optional[Tuple[str, int]] = None
        self.queue: Deque[Tuple[float, socket.socket, bytes, Tuple]] = deque()
        self.wake = Event()
        self.dropped = 0
        self.passed = 0
        self.greenlets = [gevent.spawn(self._read, self.front, True),
                          gevent.spawn(self._read, self.back, False),
                          gevent.spawn(self._deliver)]

    @property
    def address(self) -> Tuple[str, int]:
        return self.front.getsockname()

    def _read(self, sock: socket.socket, from_client: bool) -> None:
        while True:
            gsocket.wait_read(sock.fileno())
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if from_client:
                    self.client = addr
                if self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                if from_client:
                    out, dest = self.back, self.server
                elif self.client is not None:
                    out, dest = self.front, self.client
                else:
                    continue
                self.queue.append((time.monotonic() + self.delay_s, out, data, dest))
                self.wake.set()

    def _deliver(self) -> None:
        while True:
            self.wake.clear()
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                _, out, data, dest = self.queue.popleft()
                try:
                    out.sendto(data, dest)
                    self.passed += 1
                except OSError:
                    self.dropped += 1
            self.wake.wait(self.queue[0][0] - now if self.queue else None)

    def close(self) -> None:
        gevent.killall(self.greenlets)
        self.front.close()
        self.back.close()


def _target(sock: socket.socket, _addr: object) -> None:
    kind = sock.recv(1)
    try:
        if kind == b"B":
            view = memoryview(PATTERN)
            while True:
                sock.sendall(view)
        elif kind == b"E":
            while True:
                data = sock.recv(64)
                if not data:
                    break
                sock.sendall(data)
    except OSError:
        pass
    finally:
        sock.close()


class Run:
    def __init__(self) -> None:
        self.received = 0
        self.corrupt = False
        self.rtts_ms: List[float] = []


def _bulk(addr: Tuple, seconds: float, run: Run) -> None:
    sock = gsocket.create_connection(addr)
    sock.sendall(b"B")
    deadline = time.monotonic() + seconds
    offset = 0
    size = len(PATTERN)
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        start = offset % size
        chunk = PATTERN[start:start + len(data)]
        if len(chunk) < len(data):
            chunk += PATTERN[:len(data) - len(chunk)]
        if chunk != data:
            run.corrupt = True
        offset += len(data)
        run.received = offset
    sock.close()


def _echo(addr: Tuple, seconds: float, run: Run) -> None:
    sock = gsocket.create_connection(addr)
    sock.sendall(b"E")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        sock.sendall(b"12345678")
        got = b""
        while len(got) < 8:
            data = sock.recv(8 - len(got))
            if not data:
                return
            got += data
        run.rtts_ms.append((time.monotonic() - t0) * 1000)
        gevent.sleep(0.05)
    sock.close()


def _percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def demo(args: argparse.Namespace) -> int:
    options = load_options(args.options)
    target = StreamServer(("127.0.0.1", 0), _target)
    target.start()
    server = ServerEndpoint(options, [("127.0.0.1", 0)], ("127.0.0.1", target.server_port))
    server.start()
    link = LossyLink(server.bound_addresses[0], args.loss / 100.0, args.rtt / 2.0)
    local = LocalEndpoint(options, [("127.0.0.1", 0)], [link.address])
    local.start()
    addr = local.bound_addresses[0]
    print(f"gkcp demo: {args.seconds:g} s download through a link with {args.loss:g}% loss "
          f"each way and {args.rtt:g} ms RTT (mode={options.mode}, mtu={options.mtu}, "
          f"window {options.sndwnd}/{options.rcvwnd})")
    run = Run()
    started = time.monotonic()
    jobs = [gevent.spawn(_bulk, addr, args.seconds, run),
            gevent.spawn(_echo, addr, args.seconds, run)]
    last = 0
    while not all(j.ready() for j in jobs):
        gevent.joinall(jobs, timeout=1.0)
        elapsed = time.monotonic() - started
        rate = (run.received - last) * 8 / 1e6
        last = run.received
        rtt = f"{run.rtts_ms[-1]:.0f} ms" if run.rtts_ms else "-"
        print(f"  {elapsed:5.1f} s  {run.received / 1e6:8.1f} MB  {rate:7.1f} Mbit/s  "
              f"rtt {rtt}", flush=True)
    elapsed = time.monotonic() - started
    wire = server.stats.bytes_out + local.stats.bytes_out
    retrans = sum(c.kcp.xmit for c in server.conversations() + local.conversations())
    local.stop()
    server.stop()
    link.close()
    target.stop()
    payload = max(run.received, 1)
    rows = [
        ("throughput", f"{run.received * 8 / elapsed / 1e6:.1f} Mbit/s"),
        ("received", f"{run.received / 1e6:.1f} MB, {'CORRUPT' if run.corrupt else 'intact'}"),
        ("RTT p50 / p99", f"{_percentile(run.rtts_ms, 0.5):.0f} / "
                          f"{_percentile(run.rtts_ms, 0.99):.0f} ms ({len(run.rtts_ms)} requests)"),
        ("retransmissions", f"{retrans} timeouts; link dropped {link.dropped} datagrams"),
        ("wire / payload", f"{wire / payload:.3f} bytes per payload byte"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    ok = run.received > 0 and not run.corrupt
    if not ok:
        print("gkcp demo: FAILED", file=sys.stderr)
    return 0 if ok else 1


__all__ = ["demo", "LossyLink"]
