"""Benchmark modules, one per op family; shipped as ``memops.benchmarks`` and run by ``memops bench`` (see
memops/tools/benchmarking.py for the interface) or by ``pytest tests/benchmark_timings.py -n 0 --benchmark-only``.
"""
