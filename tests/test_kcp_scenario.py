"""ikcp's test.cpp latency scenario, for gkcp's engine and for ikcp.

Both engines run test.cpp's echo loop (``kcpsim.echo_latency``: 5 % loss
each way, 30-61 ms one way, an 8-byte message every 20 ms echoed back, 1001
messages, windows 128, modes default/normal/fast) through the same seeded
links; the per-message round-trip times must be identical.
bench/kcp_latency.py prints the averages next to the published ones.
"""

from __future__ import annotations

import pytest

from kcpsim import ECHO_MODES, MASK32, CRand, echo_latency, engine_factory, oracle_factory

# every test runs against each engine: compiled, pure (conftest.kcp_engine)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("kcp_engine")]

START_MS = MASK32 - 7000  # the clock wraps 7 s into a ~20 s run


@pytest.fixture(scope="module")
def results(kcp_engine):
    return {
        mode: (
            echo_latency(oracle_factory, mode, seed=1, start_ms=START_MS),
            echo_latency(engine_factory, mode, seed=1, start_ms=START_MS),
        )
        for mode in ECHO_MODES
    }


@pytest.mark.parametrize("mode", list(ECHO_MODES))
def test_echo_rtts_identical(results, mode):
    ikcp, gkcp = results[mode]
    # test.cpp stops after the loop pass in which echo 1000 came back, so a
    # few more than 1001 may be counted
    assert 1001 <= len(ikcp.rtts) <= 1010
    assert gkcp.rtts == ikcp.rtts
    assert (gkcp.tx1, gkcp.tx2, gkcp.elapsed_ms) == (ikcp.tx1, ikcp.tx2, ikcp.elapsed_ms)
    assert ikcp.elapsed_ms > 7000  # the clock wrapped
    assert min(ikcp.rtts) >= 60  # two one-way delays of at least 30 ms


def test_echo_modes_rank_as_published(results):
    avg = {mode: results[mode][0].avg for mode in ECHO_MODES}
    peak = {mode: results[mode][0].max for mode in ECHO_MODES}
    # default (congestion window, no fast resend) is far slower than the others
    assert avg["default"] > 2 * avg["normal"]
    assert avg["default"] > 2 * avg["fast"]
    assert peak["fast"] < peak["default"]


def test_echo_with_test_cpp_random_stream():
    """test.cpp's own draw order: one rand() stream for both directions,
    continued from mode to mode, clock from 0."""
    ikcp_rand, gkcp_rand = CRand(), CRand()
    for mode in ECHO_MODES:
        ikcp = echo_latency(oracle_factory, mode, rng=ikcp_rand)
        gkcp = echo_latency(engine_factory, mode, rng=gkcp_rand)
        assert gkcp.rtts == ikcp.rtts, mode
        assert gkcp.tx1 == ikcp.tx1, mode
