"""Many idle connections, and connection setup rate: gkcp vs kcptun (loopback).

For each tunnel (equal KCP settings, see common.py):

1. 1,000 connections are opened through the tunnel (50 at a time), one byte
   is echoed through each, then they sit idle for `--idle` seconds (20);
2. cpu%: CPU the tunnel's client and server processes used during the idle
   period (user + system, psutil), % of one core;
3. KiB/conn: (RSS of both processes with the connections open, measured at
   the end of the idle period) - (their RSS before) / connections;
4. then one byte is echoed through each again (all must still work), they
   are closed, and
5. conn/s: 1,000 short connections (connect, 1-byte request/response,
   close), 8 at a time, per second.  A "tcp direct" row gives the same
   figure without a tunnel.

    python bench/idle.py [--quick] [--conns 1000] [--idle 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
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
    _die_with_parent,
    cpu_seconds,
    finish_logs,
    format_table,
    free_port,
    gkcp_options,
    loadgen,
    log,
    raise_nofile,
    rss_bytes,
    run_json,
    start_tunnel,
    wait_ready,
)
from bench.loopback import port_bound, wait_bound  # noqa: E402

PART = "idle"
SETUP_CONCURRENCY = 8


def impls() -> List[Impl]:
    return [Impl("gkcp fast2", "gkcp", gkcp_options()),
            Impl("kcptun fast2", "kcptun"),
            Impl("tcp direct", "tcp")]


def read_json_line(p: subprocess.Popen, timeout: float, what: str) -> dict:
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline().decode().strip() if ready else ""
    if not line:
        raise BenchError(f"{what}: no answer within {timeout:.0f}s")
    return json.loads(line)


def idle_conns(tun_pids: List[int], port: int, conns: int, idle_s: float) -> dict:
    time.sleep(1.0)
    rss0 = rss_bytes(tun_pids)
    p = subprocess.Popen(loadgen("idle", "127.0.0.1", port, conns, idle_s + 120),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    try:
        opened = read_json_line(p, 120, "opening connections")
        time.sleep(1.0)  # acknowledgements and timers settle
        meter = CpuMeter(tun_pids).start()
        time.sleep(idle_s)
        cpu = meter.stop()
        rss1 = rss_bytes(tun_pids)
        assert p.stdin is not None
        p.stdin.write(b"close\n")
        p.stdin.flush()
        final = read_json_line(p, 90, "checking connections")
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    n = opened["opened"]
    return {"opened": n, "failed": opened["failed"], "open_seconds": opened["seconds"],
            "alive_after_idle": final["alive_after_idle"], "cpu": cpu,
            "rss_before": rss0, "rss_after": rss1,
            "kib_per_conn": (rss1 - rss0) / 1024 / n if n else None}


def settle(pids: List[int], limit_s: float = 15.0) -> float:
    """Wait until the tunnel is done closing the idle connections (CPU < 5 %)."""
    t0 = time.monotonic()
    time.sleep(1.0)
    while time.monotonic() - t0 < limit_s:
        meter = CpuMeter(pids).start()
        time.sleep(0.5)
        if meter.stop() < 5.0:
            break
    return time.monotonic() - t0


def run_impl(impl: Impl, *, target_port: int, conns: int, idle_s: float, setup_n: int,
             logdir: str) -> Row:
    row = Row(PART, f"{conns} idle, {setup_n} short", impl.name)
    if not impl.tunnel:
        res = run_json(loadgen("setup", "127.0.0.1", target_port, setup_n, SETUP_CONCURRENCY),
                       timeout=180)
        row.setup_rate = res["rate"]
        row.extra = {"setup": res}
        return row
    listen = free_port()
    udp = free_port(socket.SOCK_DGRAM)
    tun = start_tunnel(impl, server_addr=("127.0.0.1", udp),
                       target=("127.0.0.1", target_port), client_listen=("127.0.0.1", listen),
                       logdir=logdir)
    try:
        wait_bound(listen, udp, tun.procs)
        wait_ready(tun)
        res = idle_conns(tun.pids, listen, conns, idle_s)
        res["settle_s"] = settle(tun.pids)
        c0 = cpu_seconds(tun.pids)
        setup = run_json(loadgen("setup", "127.0.0.1", listen, setup_n, SETUP_CONCURRENCY),
                         timeout=180)
        setup["cpu_ms_per_conn"] = (cpu_seconds(tun.pids) - c0) * 1000 / max(setup["ok"], 1)
        for p in tun.procs:
            if not p.alive():
                raise BenchError(f"{p.name} died: {p.stderr_tail()}")
    finally:
        tun.stop()
    row.cpu = res["cpu"]
    row.rss_conn = res["kib_per_conn"]
    row.setup_rate = setup["rate"]
    notes = []
    if res["opened"] < conns:
        notes.append(f"only {res['opened']}/{conns} opened")
    if res["alive_after_idle"] < res["opened"]:
        notes.append(f"{res['opened'] - res['alive_after_idle']} dead after idle")
    if setup["failed"]:
        notes.append(f"{setup['failed']} short connections failed")
    row.note = "; ".join(notes)
    row.extra = {"idle": res, "setup": setup}
    return row


def run(quick: bool = False, conns: int = 1000, idle_s: float = 20.0,
        setup_n: int = 1000) -> List[Row]:
    if quick:
        conns, idle_s, setup_n = 50, 2.0, 50
    raise_nofile()
    logdir = tempfile.mkdtemp(prefix="gkbench-idle-")
    port = free_port()
    target = Proc(loadgen("target", port, "--bind", "127.0.0.1", "--max-seconds", 3600),
                  name="target", stderr_path=os.path.join(logdir, "target.log"))
    rows: List[Row] = []
    try:
        deadline = time.monotonic() + 10
        while not port_bound(port, socket.SOCK_STREAM) and time.monotonic() < deadline:
            time.sleep(0.05)
        for impl in impls():
            log(f"idle: {impl.name}, {conns} connections idle {idle_s:g}s, "
                f"{setup_n} short connections")
            try:
                rows.append(run_impl(impl, target_port=port, conns=conns, idle_s=idle_s,
                                     setup_n=setup_n, logdir=logdir))
            except Missing as exc:
                rows.append(Row(PART, f"{conns} idle, {setup_n} short", impl.name,
                                note=f"skipped: {exc}"))
            except BenchError as exc:  # this row failed: go on, exit 1 at the end
                log(f"idle: {impl.name} FAILED: {exc}")
                rows.append(Row(PART, f"{conns} idle, {setup_n} short", impl.name,
                                note=f"FAILED: {exc}"[:200]))
    finally:
        target.stop()
    finish_logs(logdir, rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--setup", type=int, default=1000)
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.quick, args.conns, args.idle, args.setup)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
