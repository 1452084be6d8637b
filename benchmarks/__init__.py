"""Benchmark modules, one per op family; shipped as ``memops.benchmarks`` and run by ``memops bench``
(see memops/tools/benchmarking.py for the interface) or by ``pytest benchmarks/ --benchmark-only``."""
