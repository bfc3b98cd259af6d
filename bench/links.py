"""Emulated links: goodput, latency under load and overhead, tunnels vs TCP.

::

    client ns (10.201.0.1)            bench/linkemu.c            server ns (10.201.0.2)
    bulk/echo clients                  loss, queue, rate,         target (bulk, echo)
      -> tunnel client  ==KCP/UDP==>   delay, jitter   ==>        tunnel server -> target
      (plain TCP rows: clients -> target directly, sender's CC set per socket)

For each scenario and implementation:

* idle RTT: an echo client sends a 16-byte request every 50 ms over its
  own connection for `--idle` seconds; p50/p99 of the round trips;
* under load: a bulk download (target -> client) for `--seconds` while the
  echo client keeps going on its own connection through the same tunnel:
  goodput (payload Mbit/s over the whole period, slow start included) and
  RTT p50/p99;
* wire/B: IP bytes the emulator received in both directions during the
  load phase (what the endpoints put on the wire, dropped or not) per
  payload byte downloaded;
* qdrops: packets dropped at the bottleneck queues (both directions);
* cpu%: the tunnel's two processes, % of one core, during the load phase.

"gkcp fast2 paced" is gkcp fast2 with ratelimit set to the link's rate
(what a user who knows the path's rate would set); "gkcp fast2 auto" has
ratelimit=auto (the rate measured).

    python bench/links.py [--quick] [--seconds 10] [--idle 8] [--reps 3]
                          [--scenario NAME] [--impl NAME] [--add-gkcp OPTIONS]
                          [--profile DIR] [--python-emulator] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (  # noqa: E402
    KCPTUN_FAST2_NC0,
    BenchError,
    CpuMeter,
    Impl,
    Missing,
    Proc,
    Row,
    add_ratios,
    finish_logs,
    format_table,
    gkcp_options,
    loadgen,
    log,
    median,
    percentile,
    raise_nofile,
    start_tunnel,
    wait_ready,
)
from bench.linkemu import SERVER_IP, Emulator, Lab, LinkParams  # noqa: E402

PART = "links"
TARGET_PORT = 9000  # for the tunnels (system default CC: cubic)
TCP_PORTS = {"cubic": 9001, "bbr": 9002}
ECHO_INTERVAL_MS = 50


@dataclass
class Scenario:
    name: str
    link: LinkParams  # both directions alike


SCENARIOS = [
    Scenario("100M 5ms clean", LinkParams(100, 5, 0, 0.0, 100)),
    Scenario("50M 20ms 1% q100", LinkParams(50, 20, 1, 0.01, 100)),
    Scenario("20M 50ms 5% q100", LinkParams(20, 50, 2, 0.05, 100)),
]


#: in an Impl's options, replaced by the scenario's link rate (e.g. "50M")
LINK_RATE = "{link_rate}"


def impls() -> List[Impl]:
    return [Impl("gkcp fast2", "gkcp", gkcp_options()),
            Impl("gkcp fast2 paced", "gkcp", gkcp_options(f"ratelimit={LINK_RATE}")),
            Impl("gkcp fast2 auto", "gkcp", gkcp_options("ratelimit=auto")),
            Impl("gkcp fast2 nc=0", "gkcp", gkcp_options("nc=0")),
            Impl("kcptun fast2", "kcptun"),
            Impl("kcptun fast2 nc=0", "kcptun", KCPTUN_FAST2_NC0),
            Impl("tcp cubic", "tcp", cc="cubic"),
            Impl("tcp bbr", "tcp", cc="bbr")]


def spawn(argv: List[str], netns: str) -> subprocess.Popen:
    from bench.common import _die_with_parent
    return subprocess.Popen(["ip", "netns", "exec", netns] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_die_with_parent)


def collect(p: subprocess.Popen, timeout: float, what: str) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate(timeout=5)
        raise BenchError(f"{what} did not finish within {timeout:.0f}s") from None
    lines = out.decode(errors="replace").strip().splitlines()
    if p.returncode != 0 or not lines:
        raise BenchError(f"{what} exited {p.returncode}: {err.decode(errors='replace')[-500:]}")
    return json.loads(lines[-1])


def rtt_pair(rtts: List[float]) -> Optional[tuple]:
    if not rtts:
        return None
    return (percentile(rtts, 50), percentile(rtts, 99))


class Profiler:
    """py-spy record of the tunnel processes during the load phase (optional)."""

    def __init__(self, outdir: Optional[str]) -> None:
        self.outdir = outdir
        self.exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                          "py-spy")
        if outdir and not os.path.exists(self.exe):
            log("py-spy not found: no profiles")
            self.outdir = None
        self.procs: List[Proc] = []

    def start(self, tag: str, pids: Dict[str, int], seconds: float) -> None:
        if not self.outdir:
            return
        os.makedirs(self.outdir, exist_ok=True)
        for side, pid in pids.items():
            out = os.path.join(self.outdir, f"{tag}-{side}.txt")
            self.procs.append(Proc([self.exe, "record", "-p", str(pid), "-d", str(int(seconds)),
                                    "-r", "200", "-f", "raw", "-o", out, "--nonblocking"],
                                   name=f"py-spy-{side}", stderr_path=out + ".log"))

    def wait(self) -> None:
        for p in self.procs:
            try:
                p.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
            p.stop()
        self.procs = []


def measure(impl: Impl, scenario: Scenario, *, lab: Lab, emu: Emulator, seconds: float,
            idle_s: float, index: int, logdir: str, profiler: Profiler) -> Row:
    row = Row(PART, scenario.name, impl.name)
    tun = None
    if LINK_RATE in impl.options:  # paced at the link's rate (IP bytes, as linkemu counts)
        impl = dataclasses.replace(
            impl, options=impl.options.replace(LINK_RATE, f"{scenario.link.rate_mbit:g}M"))
    if impl.tunnel:
        listen = ("127.0.0.1", 1080 + index)
        tun = start_tunnel(impl, server_addr=(SERVER_IP, 29900 + index),
                           target=("127.0.0.1", TARGET_PORT), client_listen=listen,
                           server_ns=lab.server_ns, client_ns=lab.client_ns, logdir=logdir)
        host, port = listen
    else:
        host, port = SERVER_IP, TCP_PORTS[impl.cc]
    try:
        if tun is not None:
            wait_ready(tun, netns=lab.client_ns, timeout=20)
        # idle RTT
        idle = collect(spawn(loadgen("echo", host, port, idle_s, ECHO_INTERVAL_MS),
                             lab.client_ns), idle_s + 30, "idle echo")
        # under load
        emu.zero()
        meter = CpuMeter(tun.pids if tun else []).start()
        echo_p = spawn(loadgen("echo", host, port, seconds, ECHO_INTERVAL_MS), lab.client_ns)
        bulk_p = spawn(loadgen("bulk", host, port, seconds), lab.client_ns)
        if tun is not None and impl.kind == "gkcp":
            tag = f"{scenario.name}-{impl.name}".replace(" ", "_").replace("%", "pct")
            profiler.start(tag, {"server": tun.procs[0].pid, "client": tun.procs[1].pid},
                           seconds - 1)
        bulk = collect(bulk_p, seconds + 30, "bulk download")
        load = collect(echo_p, seconds + 30, "echo under load")
        cpu = meter.stop() if tun else None
        stats = emu.stats()
        profiler.wait()
    finally:
        if tun is not None:
            tun.stop()
    wire = sum(stats[d]["rx_bytes"] for d in ("ab", "ba"))
    row.goodput = bulk["mbit"]
    row.cpu = cpu
    row.rtt_idle = rtt_pair(idle["rtts"])
    row.rtt_load = rtt_pair(load["rtts"])
    row.wire = wire / bulk["bytes"] if bulk["bytes"] else None
    row.qdrops = sum(stats[d]["queue_drops"] for d in ("ab", "ba"))
    packets = sum(stats[d]["rx_pkts"] for d in ("ab", "ba"))
    notes = [f"{what}: {res['error']}" for what, res in
             (("bulk", bulk), ("idle echo", idle), ("echo", load)) if res.get("error")]
    row.note = "; ".join(notes)
    row.extra = {"qdrop_pct": 100.0 * row.qdrops / packets if packets else None,
                 "bulk_bytes": bulk["bytes"], "first_byte_s": bulk["first_byte_s"],
                 "echo_samples_idle": len(idle["rtts"]), "echo_samples_load": len(load["rtts"]),
                 "rtt_idle_p90_max": [percentile(idle["rtts"], 90),
                                      max(idle["rtts"], default=None)],
                 "rtt_load_p90_max": [percentile(load["rtts"], 90),
                                      max(load["rtts"], default=None)],
                 "rtts_idle": [round(x, 1) for x in idle["rtts"]],
                 "emulator": stats}
    return row


def merge(rows: List[Row]) -> Row:
    """Several repetitions of one (scenario, impl): medians of each figure."""
    if len(rows) == 1:
        return rows[0]
    first = rows[0]
    out = Row(first.part, first.scenario, first.impl)
    for key in ("goodput", "cpu", "wire", "qdrops"):
        setattr(out, key, median([getattr(r, key) for r in rows if getattr(r, key) is not None]))
    for key in ("rtt_idle", "rtt_load"):
        pairs = [getattr(r, key) for r in rows if getattr(r, key)]
        if pairs:
            setattr(out, key, (median([p[0] for p in pairs]), median([p[1] for p in pairs])))
    out.note = "; ".join(r.note for r in rows if r.note)
    pcts = [r.extra["qdrop_pct"] for r in rows if r.extra.get("qdrop_pct") is not None]
    out.extra = {"qdrop_pct": median(pcts) if pcts else None,
                 "reps": [r.to_json() for r in rows]}
    return out


def run(quick: bool = False, seconds: float = 10.0, idle_s: float = 8.0, reps: int = 3,
        only_scenarios: Optional[List[str]] = None, only_impls: Optional[List[str]] = None,
        profile_dir: Optional[str] = None, python_emulator: bool = False,
        add_gkcp: Optional[List[str]] = None) -> List[Row]:
    scenarios = SCENARIOS
    if quick:
        seconds, idle_s, reps = 2.5, 1.0, 1
        scenarios = [SCENARIOS[1]]
    if only_scenarios:
        scenarios = [s for s in SCENARIOS if s.name in only_scenarios]
    chosen = [i for i in impls() if not only_impls or i.name in only_impls]
    if quick and not only_impls:  # the smoke run: one of each kind
        chosen = [i for i in chosen if "nc=0" not in i.name and "auto" not in i.name]
    chosen += [Impl(f"gkcp {extra}", "gkcp", gkcp_options(extra)) for extra in add_gkcp or []]
    raise_nofile()
    logdir = tempfile.mkdtemp(prefix="gkbench-links-")
    rows: List[Row] = []
    profiler = Profiler(profile_dir)
    try:
        lab_cm = Lab()
    except Missing as exc:
        return [Row(PART, s.name, i.name, note=f"skipped: {exc}") for s in scenarios
                for i in chosen]
    with lab_cm as lab:
        emu = Emulator(lab, scenarios[0].link, scenarios[0].link, seed=20261122,
                       python=python_emulator)
        target = Proc(loadgen("target", TARGET_PORT, *(f"{p}:{cc}" for cc, p in TCP_PORTS.items()),
                              "--max-seconds", 3600),
                      name="target", netns=lab.server_ns,
                      stderr_path=os.path.join(logdir, "target.log"))
        try:
            time.sleep(0.5)
            for scenario in scenarios:
                emu.set(scenario.link, scenario.link)
                for index, impl in enumerate(chosen):
                    reps_rows = []
                    for rep in range(reps):
                        log(f"links: {scenario.name}: {impl.name} ({rep + 1}/{reps}), "
                            f"{idle_s:g}s idle + {seconds:g}s load")
                        try:
                            reps_rows.append(measure(impl, scenario, lab=lab, emu=emu,
                                                     seconds=seconds, idle_s=idle_s,
                                                     index=index, logdir=logdir,
                                                     profiler=profiler))
                        except Missing as exc:
                            reps_rows.append(Row(PART, scenario.name, impl.name,
                                                 note=f"skipped: {exc}"))
                            break
                        except BenchError as exc:  # this row failed: go on, exit 1 at the end
                            log(f"links: {scenario.name}: {impl.name} FAILED: {exc}")
                            reps_rows.append(Row(PART, scenario.name, impl.name,
                                                 note=f"FAILED: {exc}"[:200]))
                            break
                        time.sleep(1.0)  # let the queues drain
                    rows.append(merge(reps_rows))
        finally:
            target.stop()
            emu.close()
    add_ratios(rows, "goodput")
    for r in rows:
        r.extra["emulator_kind"] = emu.kind
    finish_logs(logdir, rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0, help="bulk download, s")
    ap.add_argument("--idle", type=float, default=8.0, help="idle echo before it, s")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians shown)")
    ap.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    ap.add_argument("--impl", action="append", help="only this implementation (repeatable)")
    ap.add_argument("--add-gkcp", action="append", metavar="OPTIONS",
                    help="also run gkcp with these extra options, e.g. 'nodelay=2'")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record the tunnels into DIR")
    ap.add_argument("--python-emulator", action="store_true",
                    help="use the Python forwarder instead of linkemu.c")
    ap.add_argument("--json", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = run(args.quick, args.seconds, args.idle, args.reps, args.scenario, args.impl,
               args.profile, args.python_emulator, args.add_gkcp)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
