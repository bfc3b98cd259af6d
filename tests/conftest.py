"""Shared pytest options for gkcp's tests."""

DEFAULT_KCP_SEEDS = 500


def pytest_addoption(parser):
    parser.addoption(
        "--kcp-seeds",
        type=int,
        default=DEFAULT_KCP_SEEDS,
        help=f"seeds per randomised KCP differential test (default {DEFAULT_KCP_SEEDS})",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test")
