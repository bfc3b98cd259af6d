"""gkcp benchmarks: python -m bench [--quick] (see docs/BENCHMARKS.md)."""
