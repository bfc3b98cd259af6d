"""ikcp's test.cpp latency test, for gkcp's engine and for ikcp (siokcp).

Runs test.cpp's echo scenario (see tests/kcpsim.py ``echo_latency``: 5 %
loss each way, 30-61 ms one way, an 8-byte message every 20 ms echoed back,
1001 messages, windows 128) on a virtual clock for the three modes of
test.cpp, and prints average and maximum RTT next to the figures published
in test.cpp.

Two runs per mode and engine:

* "test.cpp rand()": both directions draw from one clone of glibc's rand(),
  in test.cpp's order, modes in sequence, clock from 0.  This reproduces a
  build of test.cpp whose iclock()/isleep() run on a virtual 1 ms counter.
* "seeded": independent seeded links per direction, clock starting just
  below 2**32 so it wraps during the run.

The published figures match ikcp 1.0: a virtual-clock build of 1.0's
test.cpp gives 682/1525, 163/852, 137/385 ms.  From release 1.3 on (and in
the 2024 code both engines follow) the same loop gives about 4400 ms in
"default" mode; "normal" and "fast" stay close to the published figures.

    python bench/kcp_latency.py [--seed N] [--messages N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from kcpsim import (  # noqa: E402
    ECHO_MODES,
    ECHO_PUBLISHED,
    MASK32,
    CRand,
    echo_latency,
    engine_factory,
    oracle_factory,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="link seed for the seeded runs")
    parser.add_argument("--messages", type=int, default=1000, help="stop after echo N (test.cpp: 1000)")
    parser.add_argument("--start-ms", type=int, default=MASK32 - 7000, help="clock start, seeded runs")
    args = parser.parse_args(argv)

    engines = [("ikcp", oracle_factory), ("gkcp", engine_factory)]
    runs = [
        ("test.cpp rand()", {name: {"rng": CRand()} for name, _ in engines}),
        (f"seeded {args.seed}", {name: {"seed": args.seed, "start_ms": args.start_ms} for name, _ in engines}),
    ]
    header = (
        f"{'run':<16} {'mode':<8} {'published':>11} {'ikcp avg/max':>14} {'gkcp avg/max':>14} "
        f"{'tx1 ikcp/gkcp':>14} {'same RTTs':>9} {'wall ikcp/gkcp':>15}"
    )
    print("test.cpp echo latency (RTT ms); virtual clock, 1 ms loop")
    print(header)
    print("-" * len(header))
    all_same = True
    for run_name, kwargs in runs:
        for mode in ECHO_MODES:
            results, walls = {}, {}
            for name, factory in engines:
                t = time.perf_counter()
                results[name] = echo_latency(factory, mode, messages=args.messages, **kwargs[name])
                walls[name] = time.perf_counter() - t
            ikcp, gkcp = results["ikcp"], results["gkcp"]
            same = ikcp.rtts == gkcp.rtts
            all_same &= same
            cells = [
                "%d/%d" % ECHO_PUBLISHED[mode],
                f"{ikcp.avg}/{ikcp.max}",
                f"{gkcp.avg}/{gkcp.max}",
                f"{ikcp.tx1}/{gkcp.tx1}",
                "yes" if same else "NO",
                "%.2f/%.2f s" % (walls["ikcp"], walls["gkcp"]),
            ]
            print(
                f"{run_name:<16} {mode:<8} {cells[0]:>11} {cells[1]:>14} {cells[2]:>14} "
                f"{cells[3]:>14} {cells[4]:>9} {cells[5]:>15}"
            )
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
