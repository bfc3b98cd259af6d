"""Summarise py-spy raw (collapsed) profiles: top functions by self and total time.

    python bench/pyspy_top.py FILE.txt [FILE.txt ...] [--top 15]

FILE is what `py-spy record -f raw` writes (bench/links.py --profile DIR
records the tunnel processes during each load phase): one line per stack,
`frame;frame;...;leaf COUNT`.  Idle samples (the gevent hub waiting in
its loop) are counted apart so the percentages are of busy time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from typing import Counter, List

IDLE = re.compile(r"^(run \(gevent/hub\.py|run \(gevent\._gevent_c_hub)")


def short(frame: str) -> str:
    # "flush (gkcp/kcp.py:312)" -> "flush (kcp.py)"
    m = re.match(r"^(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame.strip())
    return f"{m.group(1)} ({m.group(2)})" if m else frame.strip()


def summarise(path: str, top: int) -> str:
    self_t: Counter[str] = collections.Counter()
    total_t: Counter[str] = collections.Counter()
    samples = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [short(x) for x in stack.split(";") if x]
            samples += n
            if frames and IDLE.match(frames[-1]):
                idle += n
                continue
            if frames:
                self_t[frames[-1]] += n
            for fr in set(frames):
                total_t[fr] += n
    busy = max(samples - idle, 1)
    out: List[str] = [f"{path}: {samples} samples, {100 * (samples - idle) / max(samples, 1):.0f}%"
                      " busy (not waiting in the gevent hub)"]
    out.append(f"  {'self%':>6} {'total%':>6}  function (of busy samples)")
    for fr, n in self_t.most_common(top):
        out.append(f"  {100 * n / busy:6.1f} {100 * total_t[fr] / busy:6.1f}  {fr}")
    out.append("  -- by total time --")
    for fr, n in total_t.most_common(top):
        out.append(f"  {100 * self_t[fr] / busy:6.1f} {100 * n / busy:6.1f}  {fr}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    for path in args.files:
        print(summarise(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
