"""Sweep the Engram lookup kernel's launch parameters on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_engram [--out DIR] [--compile-only I/N]

At the Engram demo's config (8192 tokens, orders 2..3 with 8 heads of d = 64 each, a table of about 10.3 M rows,
bf16) it times the fused hash + gather (``engram_lookup_fwd``) for each (BLOCK_T, num_warps) against
``_lookup_config``'s choice, reports GB/s against a copy of the same bytes, and writes DIR/tune_engram.json and
the patch-ready DIR/tune-engram.md. The gate and the short conv hold whole rows per program: their tiles follow
from C (``_row_tile``), not from a sweep.
"""

from __future__ import annotations

import itertools

import torch
import triton

from memops.kernels import engram as kernels
from memops.reference.engram import engram_hash_params
from memops.tools import tuning
from memops.tools.tuning import sweep, time_ms

SHAPES = [dict(B=4, L=2048, N=3, h=8, d=64, vocab=129280 * 5, dtype=torch.bfloat16)]


def main() -> None:
    tuning.run_sweeps("engram", "_lookup_config (kernels/engram.py)", _sweep_shapes)


def _sweep_shapes(args, report: dict) -> None:
    for shape in SHAPES:
        print(shape)
        B, L, N, h, d = (shape[k] for k in ("B", "L", "N", "h", "d"))
        multipliers, primes = engram_hash_params(
            (1,), [shape["vocab"]] * (N - 1), max_ngram_size=N, n_head_per_ngram=h, seed=0,
            tokenizer_vocab_size=128000,
        )[1]  # fmt: skip
        multipliers, primes = multipliers.cuda(), primes.cuda()
        sizes = primes.reshape(-1)
        offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        table = torch.randn(int(sizes.sum()), d, device="cuda", dtype=shape["dtype"])
        ids = torch.randint(0, 128000, (B, L), device="cuda")

        def lookup(config):
            return kernels.engram_lookup_fwd(ids, table, multipliers, primes, offsets, 2, config=config)

        configs = [
            dict(BLOCK_T=t, BLOCK_D=triton.next_power_of_2(d), num_warps=w)
            for t, w in itertools.product((16, 32, 64, 128), (1, 2, 4, 8))
        ]
        entry = {"shape": {k: str(v) for k, v in shape.items()}}
        entry["lookup"] = sweep("lookup", configs, lookup, kernels._lookup_config(d, table.element_size()))
        moved = B * L * 8 + 2 * B * L * (N - 1) * h * d * table.element_size()
        copy = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        copy_gbps = moved / (time_ms(lambda: copy.clone()) * 1e-3) / 1e9
        if entry["lookup"]["all"]:
            gbps = moved / (entry["lookup"]["all"][0]["ms"] * 1e-3) / 1e9
            print(f"  lookup: {gbps:.0f} GB/s at the fastest config, {100 * gbps / copy_gbps:.0f}% of a copy")
        report["rows"].append((f"d={d} {shape['dtype']}", entry["lookup"]))
        report["shapes"].append(entry)


if __name__ == "__main__":
    main()
