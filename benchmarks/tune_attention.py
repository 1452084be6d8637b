"""Sweep the launch parameters of the memory-attention kernels on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_attention [--out DIR]

Times the forward and the backward (dQ and dK/dV kernels share one config) at the DiT-Mem shape with N
halved, bf16, and prints the fastest configs against the launchers' defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.testing

from memops.kernels import attention as kernels

SHAPES = [
    dict(B=1, H=12, Hkv=12, N=16384, M=1000, D=128, causal=False),
    dict(B=8, H=32, Hkv=8, N=2048, M=64, D=128, causal=True),
]


def _ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    report = []
    for shape in SHAPES:
        B, H, Hkv, N, M, D, causal = (shape[k] for k in ("B", "H", "Hkv", "N", "M", "D", "causal"))
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mem_k, mem_v = (torch.randn(Hkv, M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        grad_out = torch.randn_like(q)
        scale = D**-0.5
        flops = 4.0 * B * H * D * N * (M + (N + 1) / 2 if causal else M + N)
        out, lse = kernels.memory_attention_fwd(q, k, v, mem_k, mem_v, None, causal=causal, scale=scale)
        entry = {"shape": shape, "fwd": [], "bwd": []}
        print(shape)
        for name, configs, run, work in (
            (
                "fwd",
                itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)),
                lambda c: kernels.memory_attention_fwd(
                    q, k, v, mem_k, mem_v, None, causal=causal, scale=scale, config=c
                ),
                flops,
            ),
            (
                "bwd",
                itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2)),
                lambda c: kernels.memory_attention_bwd(
                    grad_out,
                    q,
                    k,
                    v,
                    mem_k,
                    mem_v,
                    None,
                    out,
                    lse,
                    causal=causal,
                    scale=scale,
                    deterministic=False,
                    config=c,
                ),
                2.5 * flops,
            ),
        ):
            for bm, bn, warps, stages in configs:
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                try:
                    ms = _ms(lambda: run(cfg))
                except Exception as error:  # out of shared memory or registers
                    print(f"  {name} {cfg}: {type(error).__name__}")
                    continue
                entry[name].append({"config": cfg, "ms": ms, "tflops": work / ms / 1e9})
            entry[name].sort(key=lambda r: r["ms"])
            default = (kernels.attention_config if name == "fwd" else kernels.attention_bwd_config)(D, q.device)
            default_ms = _ms(lambda: run(default))
            print(f"  {name} default {default} {default_ms:.3f} ms {work / default_ms / 1e9:.0f} TFLOP/s")
            for r in entry[name][:3]:
                print(f"  {name} best    {r['config']} {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s")
        report.append(entry)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tune_attention.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
