"""Sweep the grouped expert GEMMs' tiles on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_moe [--out DIR] [--compile-only I/N]

At the LLaDA2.0-mini layer (2048 tokens, d 2048, 256 experts of 512, top-8, bf16) it times the forward (the
SwiGLU gate/up GEMM and the down GEMM) and the backward (two weight-grad and two data-grad GEMMs) for each
(BLOCK_N, BLOCK_K, num_warps, num_stages) with BLOCK_M = 64 (the slot layout's block), against GEMM_CONFIGS'
entry, and writes DIR/tune_moe.json and the patch-ready DIR/tune-moe.md.
"""

from __future__ import annotations

import itertools

import torch

from memops.kernels import moe as kernels
from memops.tools import tuning
from memops.tools.tuning import sweep

SHAPES = [dict(T=2048, d=2048, inter=512, E=256, top_k=8, dtype=torch.bfloat16)]


def _with_config(config: dict, fn):
    """Run fn with the launchers' gemm_config replaced by ``config``."""
    default = kernels.gemm_config
    kernels.gemm_config = lambda device, dtype=None: config
    try:
        return fn()
    finally:
        kernels.gemm_config = default


def main() -> None:
    tuning.run_sweeps(
        "moe", "GEMM_CONFIGS (kernels/moe.py): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)", _sweep_shapes
    )


def _sweep_shapes(args, report: dict) -> None:
    for shape in SHAPES:
        T, d, inter, E, top_k, dtype = (shape[k] for k in ("T", "d", "inter", "E", "top_k", "dtype"))
        print(shape)
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        w_gate_up = 0.02 * torch.randn(E, 2 * inter, d, device="cuda", dtype=dtype)
        w_down = 0.02 * torch.randn(E, d, inter, device="cuda", dtype=dtype)
        ids = torch.rand(T, E, device="cuda").topk(top_k, dim=-1).indices.to(torch.int32)
        grad_slots = torch.randn(T * top_k, d, device="cuda", dtype=dtype)
        configs = [
            dict(BLOCK_M=64, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
            for n, k, w, s in itertools.product((64, 128), (64, 128), (4, 8), (3,))
        ]

        def forward(config):
            return _with_config(config, lambda: kernels.moe_experts_fwd(x, w_gate_up, w_down, ids, save_preact=False))

        def backward(config):
            def run():
                _, (layout, h, preact) = kernels.moe_experts_fwd(
                    x, w_gate_up, w_down, ids, save_preact=True, down=False
                )
                return kernels.moe_experts_bwd(grad_slots, x, w_gate_up, w_down, ids, layout, h, preact)

            return _with_config(config, run)

        default = kernels.gemm_config(x.device, dtype)
        entry = {"shape": {k: str(v) for k, v in shape.items()}}
        entry["fwd"] = sweep("fwd", configs, forward, default)
        entry["bwd"] = sweep("bwd (+fwd recompute)", configs, backward, default)
        flops = 2.0 * T * top_k * d * 3 * inter  # gate, up and down GEMMs over every routed slot
        if entry["fwd"]["all"]:
            print(f"  fwd: {flops / entry['fwd']['all'][0]['ms'] / 1e9:.0f} TFLOP/s at the fastest config")
        report["rows"] += [("(90, '16') fwd", entry["fwd"]), ("(90, '16') bwd", entry["bwd"])]
        report["shapes"].append(entry)


if __name__ == "__main__":
    main()
