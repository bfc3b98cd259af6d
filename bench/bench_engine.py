"""Bulk-transfer throughput of gkcp's engine next to ikcp (siokcp).

Moves --mb megabytes (default 64) from one engine to another in memory, in
stream mode, over a perfect link and over a link losing --loss (default 2 %)
of datagrams each way, and prints MB/s, payload segments/s and microseconds
per payload segment for each engine, side by side.

The link is a list swap: what an engine outputs during tick n is input on
the other side at tick n+1 (one tick = one interval = 10 ms of virtual time,
so RTT 20 ms); the sender keeps its send queue topped up to twice its window.
The figures are wall-clock CPU throughput and include the small Python
harness loop, which is most of siokcp's cost.  Each run stops at
--time-limit seconds (default 60) and is then marked partial.

    python bench/bench_engine.py [--mb 64] [--loss 0.02] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from kcpsim import OracleKCP, engine_class  # noqa: E402


def transfer(cls, *, total: int, loss: float, seed: int, time_limit_s: float, mtu: int, wnd: int):
    rng = random.Random(seed)
    chance = rng.random
    to_b: list[bytes] = []
    to_a: list[bytes] = []
    datagrams = 0

    def out_a(d):
        nonlocal datagrams
        datagrams += 1
        if not loss or chance() >= loss:
            to_b.append(d)

    def out_b(d):
        nonlocal datagrams
        datagrams += 1
        if not loss or chance() >= loss:
            to_a.append(d)

    a, b = cls(1, out_a), cls(1, out_b)
    for k in (a, b):
        k.stream = 1
        k.setmtu(mtu)
        k.wndsize(wnd, wnd)
        k.nodelay(1, 10, 2, 1)
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = received = 0
    now = 0
    started = time.perf_counter()
    deadline = started + time_limit_s
    while received < total:
        now += 10
        inbound_b, inbound_a = to_b[:], to_a[:]
        to_b.clear()
        to_a.clear()
        for d in inbound_b:
            b.input(d)
        for d in inbound_a:
            a.input(d)
        while sent < total and a.waitsnd() < 2 * wnd:
            sent += a.send(chunk[: total - sent])
        a.update(now)
        b.update(now)
        while (m := b.recv()) is not None:
            received += len(m)
        if (now & 0x3FF) == 0 and time.perf_counter() > deadline:
            break
    wall = time.perf_counter() - started
    return {
        "bytes": received,
        "wall": wall,
        "segments": -(-received // a.mss),
        "datagrams": datagrams,
        "timeouts": a.xmit,
        "virtual_s": now / 1000,
        "partial": received < total,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0, help="megabytes to move per run")
    parser.add_argument("--loss", type=float, default=0.02, help="loss rate of the lossy runs")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per run at most")
    parser.add_argument("--mtu", type=int, default=1400)
    parser.add_argument("--wnd", type=int, default=1024, help="send and receive window")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    total = int(args.mb * 1024 * 1024)
    engines = [("ikcp", OracleKCP), ("gkcp", engine_class())]
    print(
        f"stream mode, mtu {args.mtu}, wnd {args.wnd}, nodelay(1, 10, 2, 1), "
        f"{args.mb:g} MB per run, RTT 20 ms virtual"
    )
    header = (
        f"{'link':<10} {'engine':<6} {'MB':>7} {'wall s':>8} {'MB/s':>8} {'seg/s':>9} "
        f"{'us/seg':>7} {'datagrams':>10} {'timeouts':>8} {'virt s':>7}"
    )
    print(header)
    print("-" * len(header))
    for link, loss in (("perfect", 0.0), (f"{args.loss:.0%} loss", args.loss)):
        rates = {}
        for name, cls in engines:
            r = transfer(cls, total=total, loss=loss, seed=args.seed, time_limit_s=args.time_limit,
                         mtu=args.mtu, wnd=args.wnd)
            mb = r["bytes"] / (1024 * 1024)
            rates[name] = mb / r["wall"]
            print(
                f"{link:<10} {name:<6} {mb:>7.1f} {r['wall']:>8.2f} {rates[name]:>8.2f} "
                f"{r['segments'] / r['wall']:>9.0f} {1e6 * r['wall'] / r['segments']:>7.2f} "
                f"{r['datagrams']:>10} {r['timeouts']:>8} {r['virtual_s']:>7.1f}"
                + ("  (partial: time limit)" if r["partial"] else "")
            )
        print(f"{'':<10} gkcp/ikcp throughput: {rates['gkcp'] / rates['ikcp']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
