"""Benchmark modules, one per op family; shipped as ``memops.benchmarks`` and run by ``memops bench`` (see
memops/tools/benchmarking.py for the interface) or by ``pytest tests/benchmark_timings.py -n 0 --benchmark-only``.
Each module also holds its op's compile scenarios for ``memops gpu-check`` (``compile_scenarios``).
"""

# The one list of benchmark modules: module -> (the public op it times, its OP; the gpu-check family its
# compile scenarios belong to), in the order gpu-check records them. memops.tools.benchmarking.BENCHMARKS
# (op -> module) and memops.tools.gpu_check.FAMILIES (family -> modules) are derived from it.
MODULES = {
    "product_key": ("weighted_gather", "weighted_gather"),
    "product_key_search": ("product_key_topk", "product_key_search"),
    "product_key_memory": ("product_key_memory", "product_key_search"),
    "attention": ("memory_attention", "memory_attention"),
    "attention_varlen": ("memory_attention_varlen", "memory_attention"),
    "retention": ("retention_attention", "retention"),
    "retention_capacity": ("retention_capacity", "retention"),
    "retention_cache": ("retention_cache", "retention"),
    "looped": ("looped_attention", "looped"),
    "moe_routing": ("block_route", "moe"),
    "moe_layer": ("block_moe", "moe"),
    "engram": ("engram", "engram"),
    "optim": ("optim", "optim"),
    "value_embedding": ("value_embedding", "value_embedding"),
}
