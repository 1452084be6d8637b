"""Sweep the launch parameters of the product-key search kernel on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_product_key_search [--out DIR] [--compile-only I/N]

For the XLM and Memory Layers at Scale shapes it times every (BLOCK_T, BLOCK_N, num_warps) config with
do_bench, prints the fastest few against `search_config`'s default, and writes all timings to
DIR/tune_search.json and the fastest as DIR/tune-search.md.
"""

from __future__ import annotations

import itertools

import torch
import triton

from memops.kernels import product_key as kernels
from memops.tools import tuning
from memops.tools.tuning import sweep

SHAPES = [
    dict(T=8192, heads=4, key_dim=512, n_keys=1024, topk=32, dtype=torch.bfloat16),  # Memory Layers at Scale
    dict(T=8192, heads=4, key_dim=256, n_keys=512, topk=32, dtype=torch.bfloat16),  # XLM
]


def main() -> None:
    tuning.run_sweeps("search", "search_config (kernels/product_key.py)", _sweep_shapes)


def _sweep_shapes(args, report: dict) -> None:
    for shape in SHAPES:
        print(shape)
        queries = torch.randn(shape["T"], shape["heads"], shape["key_dim"], device="cuda", dtype=shape["dtype"])
        sub_keys = torch.randn(
            shape["heads"], 2, shape["n_keys"], shape["key_dim"] // 2, device="cuda", dtype=shape["dtype"]
        )
        k_pad = max(2, triton.next_power_of_2(shape["topk"]))
        configs = [
            dict(BLOCK_T=t, BLOCK_N=n, num_warps=w)
            for t, n, w in itertools.product((16, 32, 64), (64, 128), (4, 8))
            if n >= k_pad
        ]
        entry = {"shape": {k: str(v) for k, v in shape.items()}}
        entry["search"] = sweep(
            "search",
            configs,
            lambda cfg: kernels.product_key_search(queries, sub_keys, shape["topk"], config=cfg),
            kernels.search_config(shape["n_keys"], k_pad, queries.device),
        )
        best = entry["search"]["all"][0]["ms"] if entry["search"]["all"] else float("nan")
        entry["best_tflops"] = (
            2.0 * shape["T"] * shape["heads"] * shape["n_keys"] * shape["key_dim"] / (best * 1e-3) / 1e12
        )
        print(f"  best: {entry['best_tflops']:.1f} TFLOP/s of half-score matmuls")
        report["shapes"].append(entry)
        key = f"T={shape['T']} key_dim={shape['key_dim']} n_keys={shape['n_keys']}"
        report["rows"].append((key, entry["search"]))


if __name__ == "__main__":
    main()
