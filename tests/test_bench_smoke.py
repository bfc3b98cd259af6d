"""Smoke test of the benchmarks: `python -m bench --quick` runs and prints its table.

It checks that every part ran (exit 0) and that the table has rows for
gkcp, kcptun and plain TCP; it does not judge the numbers.  The emulated
links need root (network namespaces, TUN), kcptun-client/-server and
iperf3: without them the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 90


def _missing() -> list:
    missing = [tool for tool in ("kcptun-client", "kcptun-server", "iperf3", "ip")
               if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    return missing


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_bench_quick_runs_and_prints_table() -> None:
    missing = _missing()
    if missing:
        pytest.skip("bench prerequisites missing: " + ", ".join(missing))
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT_S)
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-3000:]}"
    impls = set()
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] in ("loopback", "links", "idle"):
            impls.add(cols[0])
            assert "CRASHED" not in line and "skipped" not in line, line
            impls.update(c for c in cols if c in ("gkcp", "kcptun", "tcp"))
    for part in ("loopback", "links", "idle"):
        assert part in impls, f"no {part} rows:\n{out}"
    for impl in ("gkcp", "kcptun", "tcp"):
        assert impl in impls, f"no {impl} row:\n{out}"
    assert "every part ran" in out
