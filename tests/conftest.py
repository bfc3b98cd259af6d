"""Shared pytest options and fixtures for gkcp's tests."""

import pytest

import gkcp.kcp

DEFAULT_KCP_SEEDS = 500

# The KCP engines the conformance suite runs against: the compiled one only
# when gkcp.kcp selected it (test_engine_selection.py fails when
# GKCP_REQUIRE_COMPILED=1 and it did not).
KCP_ENGINES = ["compiled", "pure"] if gkcp.kcp.IMPLEMENTATION == "compiled" else ["pure"]


def pytest_addoption(parser):
    parser.addoption(
        "--kcp-seeds",
        type=int,
        default=DEFAULT_KCP_SEEDS,
        help=f"seeds per randomised KCP differential test (default {DEFAULT_KCP_SEEDS})",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_report_header(config):
    return (f"KCP engine: {gkcp.kcp.engine_description()}; "
            f"conformance tests run against: {', '.join(KCP_ENGINES)}")


@pytest.fixture(scope="module", params=KCP_ENGINES)
def kcp_engine(request):
    """Run a module's tests once per KCP engine (the conformance suite does).

    For "pure", gkcp.kcp.KCP is the pure-Python class and GKCP_PURE_PYTHON=1
    is set for subprocesses; everything that looks KCP up when it is called
    (kcpsim.engine_class()) gets the engine of the current parameter.
    """
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "pure":
            mp.setattr(gkcp.kcp, "KCP", gkcp.kcp.PURE_KCP)
            mp.setenv("GKCP_PURE_PYTHON", "1")
        yield request.param
