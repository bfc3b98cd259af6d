"""Traffic for the benches: a target server and the clients that measure.

Run as a separate process (inside a network namespace with `ip netns exec`
when the bench needs it); each client prints one JSON object on its last
stdout line.  Every mode is bounded in time.

    loadgen.py target PORT[:CC] [PORT[:CC] ...] [--max-seconds S] [--bind ADDR]
        one server per port; CC (cubic, bbr, reno) is set with TCP_CONGESTION
        on every accepted socket.  A connection's first byte picks the service:
        B  bulk: send pseudo-random bytes until the peer goes away
        E  echo: send back whatever arrives
    loadgen.py probe HOST PORT TIMEOUT        echo round trip, retried until TIMEOUT
    loadgen.py bulk HOST PORT SECONDS         download for SECONDS: bytes, Mbit/s
    loadgen.py echo HOST PORT SECONDS INTERVAL_MS
        a 16-byte request every INTERVAL_MS (the next one waits for the answer);
        RTT of each, ms
    loadgen.py idle HOST PORT N MAX_SECONDS
        open N connections (1-byte echo through each), print {"opened": ...},
        then wait for a line on stdin (or MAX_SECONDS), echo 1 byte through each
        again, close all, print the result
    loadgen.py setup HOST PORT N CONCURRENCY  N short connections (connect, 1
        request/response, close), CONCURRENCY at a time: connections/s
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time

PATTERN = random.Random(20261122).randbytes(1 << 20)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by peer")
        buf += chunk
    return buf


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- target ------------------------------------------------------------------------
def target(args: list) -> int:
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.server import StreamServer

    max_s = 3600.0
    bind = "0.0.0.0"
    for flag in ("--max-seconds", "--bind"):
        if flag in args:
            i = args.index(flag)
            if flag == "--bind":
                bind = args[i + 1]
            else:
                max_s = float(args[i + 1])
            del args[i:i + 2]

    def handler(cc: str):
        def handle(sock: socket.socket, _addr: object) -> None:
            try:
                if cc:
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, cc.encode())
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                kind = sock.recv(1)
                if kind == b"B":
                    view = memoryview(PATTERN)
                    while True:
                        sock.sendall(view)
                elif kind == b"E":
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        sock.sendall(data)
            except OSError:
                pass
            finally:
                sock.close()
        return handle

    servers = []
    for spec in args:
        port, _, cc = spec.partition(":")
        srv = StreamServer((bind, int(port)), handler(cc), backlog=4096)
        srv.init_socket()
        srv.start()
        servers.append(srv)
    emit({"listening": [s.address[1] for s in servers]})
    gevent.sleep(max_s)
    return 0


# -- clients ------------------------------------------------------------------------
def probe(host: str, port: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            with connect(host, port, 3.0) as sock:
                sock.sendall(b"Eping")
                if recv_exact(sock, 4) == b"ping":
                    emit({"ok": True, "rtt_ms": (time.monotonic() - t0) * 1000})
                    return 0
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    emit({"ok": False, "error": last})
    return 1


def bulk(host: str, port: int, seconds: float) -> int:
    buf = bytearray(1 << 18)
    total = 0
    first_byte_s = None
    t0 = time.monotonic()
    deadline = t0 + seconds
    error = None
    try:
        sock = connect(host, port, 10.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.sendall(b"B")
        sock.settimeout(0.5)
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                n = sock.recv_into(buf)
            except socket.timeout:
                continue
            if not n:
                error = "closed by peer"
                break
            if first_byte_s is None:
                first_byte_s = time.monotonic() - t0
            total += n
        sock.close()
    except OSError as exc:
        error = str(exc)
    elapsed = min(time.monotonic(), deadline) - t0
    emit({"bytes": total, "seconds": elapsed, "mbit": total * 8 / elapsed / 1e6,
          "first_byte_s": first_byte_s, "error": error})
    return 0


def echo(host: str, port: int, seconds: float, interval_ms: float) -> int:
    rtts = []
    error = None
    interval = interval_ms / 1000.0
    t0 = time.monotonic()
    deadline = t0 + seconds
    try:
        sock = connect(host, port, 10.0)
        sock.sendall(b"E")
        sock.settimeout(max(5.0, seconds))
        seq = 0
        next_t = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if next_t > now:
                time.sleep(min(next_t - now, deadline - now))
                continue
            msg = seq.to_bytes(16, "little")
            seq += 1
            t = time.monotonic()
            sock.sendall(msg)
            if recv_exact(sock, 16) != msg:
                raise ConnectionError("echo mismatch")
            rtts.append((time.monotonic() - t) * 1000.0)
            next_t += interval
            if next_t < time.monotonic():
                next_t = time.monotonic()
        sock.close()
    except OSError as exc:
        error = str(exc)
    emit({"rtts": rtts, "error": error})
    return 0


def _gevent():
    from gevent import monkey
    monkey.patch_all()
    import gevent
    import gevent.pool
    return gevent


def idle(host: str, port: int, n: int, max_s: float) -> int:
    gevent = _gevent()
    from gevent.pool import Pool
    socks: list = []
    failed = [0]

    def open_one(_i: int) -> None:
        try:
            sock = connect(host, port, 15.0)
            sock.sendall(b"Ex")
            recv_exact(sock, 1)
            socks.append(sock)
        except OSError:
            failed[0] += 1

    t0 = time.monotonic()
    pool = Pool(50)
    for i in range(n):
        pool.spawn(open_one, i)
    pool.join(timeout=max_s)
    emit({"opened": len(socks), "failed": failed[0], "seconds": time.monotonic() - t0})
    from gevent.os import make_nonblocking, nb_read
    make_nonblocking(0)
    with gevent.Timeout(max_s, False):
        nb_read(0, 100)
    alive = [0]

    def check(sock: socket.socket) -> None:
        try:
            sock.settimeout(10.0)
            sock.sendall(b"y")
            recv_exact(sock, 1)
            alive[0] += 1
        except OSError:
            pass

    pool = Pool(50)
    for sock in socks:
        pool.spawn(check, sock)
    pool.join(timeout=60)
    for sock in socks:
        sock.close()
    emit({"opened": len(socks), "failed": failed[0], "alive_after_idle": alive[0]})
    return 0


def setup(host: str, port: int, n: int, concurrency: int) -> int:
    _gevent()
    from gevent.pool import Pool
    ok = [0]
    failed = [0]

    def one(_i: int) -> None:
        try:
            with connect(host, port, 10.0) as sock:
                sock.sendall(b"Eq")
                recv_exact(sock, 1)
            ok[0] += 1
        except OSError:
            failed[0] += 1

    t0 = time.monotonic()
    pool = Pool(concurrency)
    for i in range(n):
        pool.spawn(one, i)
    pool.join(timeout=120)
    elapsed = time.monotonic() - t0
    emit({"ok": ok[0], "failed": failed[0], "seconds": elapsed, "rate": ok[0] / elapsed})
    return 0


def main(argv: list) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    mode, args = argv[0], argv[1:]
    if mode == "target":
        return target(args)
    host, port = args[0], int(args[1])
    if mode == "probe":
        return probe(host, port, float(args[2]))
    if mode == "bulk":
        return bulk(host, port, float(args[2]))
    if mode == "echo":
        return echo(host, port, float(args[2]), float(args[3]))
    if mode == "idle":
        return idle(host, port, int(args[2]), float(args[3]))
    if mode == "setup":
        return setup(host, port, int(args[2]), int(args[3]))
    print(f"unknown mode {mode}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
