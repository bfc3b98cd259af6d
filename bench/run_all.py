"""Run every bench (loopback, links, idle) and print one table.

    python -m bench [--quick] [--only loopback|links|idle ...] [--json FILE]
                    [--markdown FILE] [--profile DIR]
    python bench/run_all.py ...          (the same)

--quick runs each part for a few seconds with tiny counts (a smoke test for
CI: the numbers mean little).  Exit status: 0 when every part ran (a part
or row whose tool or privilege is missing is reported as skipped), 1 when a
part crashed or one of its rows FAILED (e.g. a tunnel did not come up), 2
on a usage error.  The table goes to stdout, progress to stderr.  After
the table, the targets (gkcp vs kcptun at equal settings) are checked and
reported as met / not met; they never change the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import Row, format_markdown, format_table, log  # noqa: E402

PARTS = ("loopback", "links", "idle")


def _cmd(argv: List[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10)
        text = (out.stdout or out.stderr).decode(errors="replace").strip()
        return text.splitlines()[0] if text else ""
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def machine() -> Dict[str, str]:
    cpu = "n/a"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    try:
        import gevent
        gevent_version = gevent.__version__
    except ImportError:
        gevent_version = "n/a"
    try:
        import gkcp
        gkcp_version = gkcp.__version__
    except ImportError:
        gkcp_version = "n/a"
    kcptun = _cmd(["dpkg-query", "-W", "-f", "${Version}", "kcptun"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _cmd(["git", "-C", root, "log", "-1", "--format=%h %cd", "--date=iso", "--", "gkcp"])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent_version,
        "gkcp": f"{gkcp_version}, last gkcp/ commit {commit}" + (
            " + uncommitted changes" if _cmd(["git", "-C", root, "status", "--porcelain", "--",
                                              "gkcp"]) not in ("", "n/a") else ""),
        "kcptun": f"{kcptun} ({_cmd(['kcptun-client', '-v'])})",
        "iperf3": _cmd(["iperf3", "-v"]),
    }


def find(rows: List[Row], part: str, impl: str, scenario: Optional[str] = None) -> List[Row]:
    return [r for r in rows if r.part == part and r.impl == impl
            and (scenario is None or r.scenario == scenario)]


def targets(rows: List[Row]) -> List[str]:
    """The brief's targets, gkcp fast2 vs kcptun fast2, met or not."""
    out: List[str] = []

    def verdict(name: str, ours: Optional[float], theirs: Optional[float], *,
                higher_is_better: bool, unit: str, fmt: str = "{:.1f}") -> None:
        if ours is None or theirs is None:
            out.append(f"{name}: not measured")
            return
        ok = ours >= theirs if higher_is_better else ours <= theirs
        ratio = f", {ours / theirs:.2f}x" if theirs else ""
        out.append(f"{name}: gkcp {fmt.format(ours)} vs kcptun {fmt.format(theirs)} {unit}"
                   f"{ratio}: {'met' if ok else 'NOT met'}")

    for g in find(rows, "loopback", "gkcp fast2"):
        k = find(rows, "loopback", "kcptun fast2", g.scenario)
        verdict("loopback goodput >= kcptun", g.goodput, k[0].goodput if k else None,
                higher_is_better=True, unit="Mbit/s", fmt="{:.0f}")
    for g in find(rows, "links", "gkcp fast2"):
        if "clean" in g.scenario:
            continue
        k = find(rows, "links", "kcptun fast2", g.scenario)
        kr = k[0] if k else None
        verdict(f"{g.scenario}: goodput >= kcptun", g.goodput, kr.goodput if kr else None,
                higher_is_better=True, unit="Mbit/s")
        verdict(f"{g.scenario}: RTT p99 under load <= kcptun", g.rtt_load and g.rtt_load[1],
                kr and kr.rtt_load and kr.rtt_load[1], higher_is_better=False, unit="ms")
        verdict(f"{g.scenario}: RTT p99 idle <= kcptun", g.rtt_idle and g.rtt_idle[1],
                kr and kr.rtt_idle and kr.rtt_idle[1], higher_is_better=False, unit="ms")
    for g in find(rows, "links", "gkcp fast2 paced"):
        if "clean" in g.scenario:
            continue
        link = float(g.scenario.split("M", 1)[0])
        bbr = find(rows, "links", "tcp bbr", g.scenario)
        k = find(rows, "links", "kcptun fast2", g.scenario)
        paced_checks(out, g, link, bbr[0] if bbr else None, k[0] if k else None)
    for g in find(rows, "idle", "gkcp fast2"):
        k = find(rows, "idle", "kcptun fast2", g.scenario)
        kr = k[0] if k else None
        verdict("idle CPU <= kcptun", g.cpu, kr.cpu if kr else None, higher_is_better=False,
                unit="% of a core", fmt="{:.2f}")
        verdict("idle RSS per connection <= kcptun", g.rss_conn, kr.rss_conn if kr else None,
                higher_is_better=False, unit="KiB")
    return out


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def paced_checks(out: List[str], g: Row, link: float, bbr: Optional[Row],
                 kcptun: Optional[Row]) -> None:
    """The targets for gkcp paced at the link's rate (ratelimit)."""
    name = f"{g.scenario}: paced"

    def check(what: str, ok: Optional[bool], shown: str) -> None:
        out.append(f"{name}: {what}: {shown}: "
                   + ("not measured" if ok is None else "met" if ok else "NOT met"))

    gp = g.goodput
    check(">= 0.9x link rate", None if gp is None else gp >= 0.9 * link,
          "-" if gp is None else f"{gp:.1f} = {gp / link:.2f}x {link:g} Mbit/s")
    b = bbr.goodput if bbr else None
    check(">= tcp bbr", None if gp is None or b is None else gp >= b,
          f"{_num(gp)} vs {_num(b)} Mbit/s")
    pct = g.extra.get("qdrop_pct")
    check("bottleneck drops < 5%", None if pct is None else pct < 5,
          "-" if pct is None else f"{pct:.2f}% of packets")
    if "1%" in g.scenario:
        check("wire <= 1.15 B per payload B", None if g.wire is None else g.wire <= 1.15,
              f"{g.wire}" if g.wire is None else f"{g.wire:.3f}")
    mine = g.rtt_load[1] if g.rtt_load else None
    theirs = kcptun.rtt_load[1] if kcptun and kcptun.rtt_load else None
    check("RTT p99 under load <= kcptun", None if mine is None or theirs is None
          else mine <= theirs, f"{_num(mine)} vs {_num(theirs)} ms")


def run_part(name: str, quick: bool, profile: Optional[str]) -> List[Row]:
    if name == "loopback":
        from bench import loopback
        return loopback.run(quick)
    if name == "links":
        from bench import links
        return links.run(quick, profile_dir=profile)
    if name == "idle":
        from bench import idle
        return idle.run(quick)
    raise ValueError(name)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds per part (CI smoke)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part")
    ap.add_argument("--json", help="write machine info and rows as JSON here")
    ap.add_argument("--markdown", help="write the table as Markdown here")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record gkcp during the link runs")
    args = ap.parse_args(argv)
    started = time.monotonic()
    info = machine()
    log("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    rows: List[Row] = []
    crashed: List[str] = []
    runner: Callable[[str, bool, Optional[str]], List[Row]] = run_part
    for part in args.only or PARTS:
        t0 = time.monotonic()
        try:
            part_rows = runner(part, args.quick, args.profile)
            rows.extend(part_rows)
            if any(r.note.startswith("FAILED") for r in part_rows):
                crashed.append(part)
        except Exception as exc:  # a crashed part: report it, go on, exit 1
            traceback.print_exc()
            crashed.append(part)
            rows.append(Row(part, "-", "-", note=f"CRASHED: {type(exc).__name__}: {exc}"[:200]))
        log(f"{part} took {time.monotonic() - t0:.0f}s")
    elapsed = time.monotonic() - started
    gkcp_after = machine()["gkcp"]
    if gkcp_after != info["gkcp"]:
        info["gkcp"] += f" (CHANGED during the run, now {gkcp_after})"
    print(f"gkcp benchmarks{' (quick)' if args.quick else ''}: {info['date']}, "
          f"{info['nproc']} x {info['cpu']}, Linux {info['kernel']}, Python {info['python']}, "
          f"gevent {info['gevent']}, kcptun {info['kcptun']}, gkcp {info['gkcp']}")
    print(format_table(rows))
    print()
    print("units: goodput Mbit/s; vs kcptun = goodput ratio; cpu% = tunnel client+server, % of "
          "one core (loopback/links: during the transfer, idle: while idle); rtt ms; wire/B = "
          "bytes on the wire per payload byte; qdrops = bottleneck queue drops; KiB/conn = RSS "
          "per idle connection; conn/s = short connections per second")
    print()
    print("targets (gkcp fast2 vs kcptun fast2):")
    for line in targets(rows):
        print("  " + line)
    print(f"\ntotal time {elapsed:.0f}s; "
          + (f"CRASHED: {', '.join(crashed)}" if crashed else "every part ran"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "quick": args.quick, "seconds": elapsed,
                       "crashed": crashed, "targets": targets(rows),
                       "rows": [r.to_json() for r in rows]}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows) + "\n")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
