"""Benchmarks: `python -m benchmarks <scenario|all>` (see __main__.py, docs/scaling.md)."""
