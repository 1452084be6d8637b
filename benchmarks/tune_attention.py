"""Sweep the launch parameters of the memory-attention kernels on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_attention [--out DIR] [--compile-only I/N]

Times the forward and the backward (dQ and dK/dV kernels share one config) at the DiT-Mem shape with N
halved and prefix tuning at 2K, bf16; prints the fastest configs against the launchers' defaults and writes
DIR/tune_attention.json and the patch-ready DIR/tune-attention.md.
"""

from __future__ import annotations

import itertools

import torch

from memops.kernels import attention as kernels
from memops.tools import tuning
from memops.tools.tuning import sweep

SHAPES = [
    dict(B=1, H=12, Hkv=12, N=16384, M=1000, D=128, causal=False),
    dict(B=8, H=32, Hkv=8, N=2048, M=64, D=128, causal=True),
]


def main() -> None:
    tuning.run_sweeps(
        "attention", "FWD_CONFIGS / DQ_CONFIGS / DKDV_CONFIGS (kernels/attention.py), path memory", _sweep_shapes
    )


def _sweep_shapes(args, report: dict) -> None:
    for shape in SHAPES:
        B, H, Hkv, N, M, D, causal = (shape[k] for k in ("B", "H", "Hkv", "N", "M", "D", "causal"))
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mem_k, mem_v = (torch.randn(Hkv, M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        grad_out = torch.randn_like(q)
        scale = D**-0.5
        flops = 4.0 * B * H * D * N * (M + (N + 1) / 2 if causal else M + N)
        out, lse = kernels.memory_attention_fwd(q, k, v, mem_k, mem_v, None, causal=causal, scale=scale)
        print(shape)

        def forward(config):
            return kernels.memory_attention_fwd(q, k, v, mem_k, mem_v, None, causal=causal, scale=scale, config=config)

        def backward(config):
            return kernels.memory_attention_bwd(
                grad_out, q, k, v, mem_k, mem_v, None, out, lse, causal=causal, scale=scale, deterministic=False,
                config=config,
            )  # fmt: skip

        def configs(block_m, block_n, warps, stages):
            return [
                {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
                for bm, bn, w, st in itertools.product(block_m, block_n, warps, stages)
            ]

        entry = {"shape": shape}
        # the dQ and dK/dV kernels share one config in this sweep
        entry["fwd"] = sweep("fwd", configs((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)), forward,
                             kernels.attention_config(D, q.device))  # fmt: skip
        entry["bwd"] = sweep("bwd", configs((32, 64, 128), (32, 64, 128), (4, 8), (1, 2)), backward,
                             kernels.attention_bwd_config(D, q.device))  # fmt: skip
        for name, work in (("fwd", flops), ("bwd", 2.5 * flops)):
            if entry[name]["all"]:
                print(f"  {name}: {work / entry[name]['all'][0]['ms'] / 1e9:.0f} TFLOP/s at the fastest config")
        key = f"(90, '16', {D}) {'causal' if causal else 'full'} M={M}"
        report["rows"] += [(f"{key} fwd", entry["fwd"]), (f"{key} dq+dkdv", entry["bwd"])]
        report["shapes"].append(entry)


if __name__ == "__main__":
    main()
