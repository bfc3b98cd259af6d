"""Loopback bulk throughput: gkcp (plain and key mode) vs kcptun vs plain TCP, iperf3.

    iperf3 -c --TCP--> tunnel client ==KCP/UDP 127.0.0.1==> tunnel server --TCP--> iperf3 -s

Both tunnels run at equal KCP settings (mode fast2, sndwnd/rcvwnd 1024,
mtu 1350; kcptun with --crypt none --nocomp and no FEC); "gkcp key" adds
`key=...` (ChaCha20-Poly1305 on every datagram) to show what key mode
costs.  Each implementation runs `--reps` iperf3 tests of `--seconds`
(upload through the tunnel); the table shows the median Mbit/s, the
ratio to kcptun's median, and the CPU the tunnel's two processes used
meanwhile (% of one core, median).

    python bench/loopback.py [--quick] [--reps 3] [--seconds 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import tempfile
import time
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    BenchError,
    CpuMeter,
    Impl,
    Missing,
    Proc,
    Row,
    add_ratios,
    finish_logs,
    format_table,
    free_port,
    gkcp_options,
    log,
    median,
    need,
    raise_nofile,
    run_json,
    start_tunnel,
)

PART = "loopback"


def impls() -> List[Impl]:
    return [Impl("gkcp fast2", "gkcp", gkcp_options()),
            Impl("gkcp key", "gkcp", gkcp_options("key=gkcp-bench-loopback")),
            Impl("kcptun fast2", "kcptun"),
            Impl("tcp cubic", "tcp", cc="cubic"),
            Impl("tcp bbr", "tcp", cc="bbr")]


def port_bound(port: int, kind: int) -> bool:
    """True when something on 127.0.0.1 holds `port` (a bind test, no traffic)."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def wait_bound(tcp_port: int, udp_port: int, procs: List[Proc], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited {p.popen.returncode}: {p.stderr_tail()}")
        if port_bound(tcp_port, socket.SOCK_STREAM) and port_bound(udp_port, socket.SOCK_DGRAM):
            return
        time.sleep(0.1)
    raise BenchError("tunnel did not bind its ports")


def iperf3(port: int, seconds: float, cc: str = "") -> float:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    if cc:
        argv += ["-C", cc]
    res = run_json(argv, timeout=seconds + 30)
    if "error" in res:
        raise BenchError(f"iperf3: {res['error']}")
    return res["end"]["sum_received"]["bits_per_second"] / 1e6


def run_impl(impl: Impl, *, iperf_port: int, reps: int, seconds: float, logdir: str) -> Row:
    row = Row(PART, "127.0.0.1 upload", impl.name)
    mbits: List[float] = []
    cpus: List[float] = []
    if not impl.tunnel:
        for _ in range(reps):
            mbits.append(iperf3(iperf_port, seconds, impl.cc))
        row.goodput = median(mbits)
        row.extra = {"mbit": mbits}
        return row
    listen = free_port()
    udp = free_port(socket.SOCK_DGRAM)
    tun = start_tunnel(impl, server_addr=("127.0.0.1", udp), target=("127.0.0.1", iperf_port),
                       client_listen=("127.0.0.1", listen), logdir=logdir)
    try:
        wait_bound(listen, udp, tun.procs)
        for _ in range(reps):
            meter = CpuMeter(tun.pids).start()
            mbits.append(iperf3(listen, seconds))
            cpus.append(meter.stop())
            time.sleep(0.5)  # let the previous test's connections close
    finally:
        tun.stop()
    row.goodput = median(mbits)
    row.cpu = median(cpus)
    row.extra = {"mbit": mbits, "cpu": cpus}
    return row


def run(quick: bool = False, reps: int = 3, seconds: float = 8.0) -> List[Row]:
    if quick:
        reps, seconds = 1, 1.5
    need("iperf3")
    raise_nofile()
    rows: List[Row] = []
    logdir = tempfile.mkdtemp(prefix="gkbench-loopback-")
    port = free_port()
    server = Proc(["iperf3", "-s", "-p", str(port)], name="iperf3-server",
                  stderr_path=os.path.join(logdir, "iperf3.log"))
    try:
        deadline = time.monotonic() + 10
        while not port_bound(port, socket.SOCK_STREAM) and time.monotonic() < deadline:
            time.sleep(0.05)
        for impl in impls():
            log(f"loopback: {impl.name}, {reps} x {seconds:g}s")
            try:
                rows.append(run_impl(impl, iperf_port=port, reps=reps, seconds=seconds,
                                     logdir=logdir))
            except Missing as exc:
                rows.append(Row(PART, "127.0.0.1 upload", impl.name, note=f"skipped: {exc}"))
            except BenchError as exc:  # this row failed: go on, exit 1 at the end
                log(f"loopback: {impl.name} FAILED: {exc}")
                rows.append(Row(PART, "127.0.0.1 upload", impl.name,
                                note=f"FAILED: {exc}"[:200]))
    finally:
        server.stop()
    add_ratios(rows, "goodput")
    finish_logs(logdir, rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.quick, args.reps, args.seconds)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
