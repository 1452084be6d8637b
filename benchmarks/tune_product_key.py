"""Sweep the launch parameters of the weighted_gather kernels on a CUDA device (a tuning aid, not a test).

    python -m memops.benchmarks.tune_product_key [--out DIR] [--quick] [--compile-only I/N]

For each shape it times every config of the forward, the weights-grad (+ atomic values-grad) kernel and
the deterministic segment kernel with do_bench, prints the fastest few against the launchers' default
config, and writes all timings to DIR/tune_gather.json and the fastest as DIR/tune-gather.md.
"""

from __future__ import annotations

import itertools

import torch
import triton

from memops.kernels import product_key as kernels
from memops.tools import tuning
from memops.tools.tuning import sweep, time_ms

SHAPES = [
    # A hot row: a tenth of all picks land on row 0 (52K entries in one segment).
    dict(T=4096, K=128, S=1 << 20, D=1024, dtype=torch.bfloat16, hot_fraction=0.1),
    dict(T=4096, K=128, S=1 << 20, D=1024, dtype=torch.bfloat16),
    dict(T=4096, K=128, S=1 << 20, D=4096, dtype=torch.bfloat16),
    dict(T=4096, K=128, S=1 << 20, D=1024, dtype=torch.float32),
    dict(T=256, K=32, S=1 << 16, D=256, dtype=torch.float32),
]


def _inputs(shape):
    T, K, S, D, dtype = shape["T"], shape["K"], shape["S"], shape["D"], shape["dtype"]
    values = torch.randn(S, D, device="cuda", dtype=dtype)
    indices = torch.randint(0, S, (T, K), device="cuda")
    hot = torch.rand(T, K, device="cuda") < shape.get("hot_fraction", 0.0)
    indices[hot] = 0
    weights = torch.rand(T, K, device="cuda").softmax(-1).to(dtype)
    grad_out = torch.randn(T, D, device="cuda", dtype=dtype)
    return values, indices, weights, grad_out


def _configs(D, keys, *choices):
    # Block widths past D are clamped to next_power_of_2(D); duplicates that leaves are dropped.
    width = triton.next_power_of_2(D)
    unique = {
        tuple(min(c, width) if k == "BLOCK_D" else c for k, c in zip(keys, combo))
        for combo in itertools.product(*choices)
    }
    return [dict(zip(keys, combo)) for combo in sorted(unique)]


def _tune_shape(shape: dict) -> dict:
    """Sweep one shape's configs (its tensors are freed on return)."""
    values, indices, weights, grad_out = _inputs(shape)
    T, K, D = shape["T"], shape["K"], shape["D"]
    item = values.element_size()
    print(f"{shape}")
    entry = {"shape": {k: str(v) for k, v in shape.items()}}

    keys = ("BLOCK_K", "BLOCK_D", "num_warps")
    fwd_configs = _configs(D, keys, (4, 8, 16, 32), (512, 1024, 2048), (4, 8))
    entry["fwd"] = sweep(
        "fwd",
        fwd_configs,
        lambda cfg: kernels.weighted_gather_fwd(values, indices, weights, config=cfg),
        kernels.gather_config(K, D, item),
    )
    if entry["fwd"]["all"]:
        fwd_best = entry["fwd"]["all"][0]["ms"]
        entry["fwd_gbps"] = (T * K * D + T * D) * item / (fwd_best * 1e-3) / 1e9

    bwd_configs = _configs(D, keys, (8, 16, 32), (64, 128, 256), (4, 8))
    for algorithm, label in (("atomic", "wgrad+atomic"), ("segment", "wgrad-only")):
        entry[label] = sweep(
            label,
            bwd_configs,
            lambda cfg, a=algorithm: kernels.weighted_gather_bwd(
                grad_out,
                values,
                indices,
                weights,
                values_grad_algorithm=a,
                config=cfg,
                values_grad=(a == "atomic"),
            ),
            kernels.gather_bwd_config(K, D),
        )
    segment_configs = _configs(D, ("BLOCK_N", "BLOCK_D", "num_warps"), (1, 2, 4), (512, 1024, 2048), (2, 4, 8))
    entry["segment"] = sweep(
        "segment",
        segment_configs,
        lambda cfg: kernels.weighted_gather_bwd(
            grad_out,
            values,
            indices,
            weights,
            values_grad_algorithm="segment",
            weights_grad=False,
            segment_kernel_config=cfg,
        ),
        kernels.segment_config(D),
    )
    # The whole backward (weights grad + values grad, buffers and casts included) by algorithm.
    for algorithm in ("atomic", "segment"):
        entry[f"full_bwd_{algorithm}_ms"] = time_ms(
            lambda a=algorithm: kernels.weighted_gather_bwd(grad_out, values, indices, weights, values_grad_algorithm=a)
        )
        print(f"  full backward  {algorithm:<8} {entry[f'full_bwd_{algorithm}_ms']:.3f} ms")
    return entry


def main() -> None:
    tuning.run_sweeps(
        "gather", "gather_config / gather_bwd_config / segment_config (kernels/product_key.py)", _sweep_shapes
    )


def _sweep_shapes(args, report: dict) -> None:
    for shape in SHAPES[:2] if args.quick else SHAPES:
        entry = _tune_shape(shape)
        report["shapes"].append(entry)
        key = f"T={shape['T']} K={shape['K']} D={shape['D']} {shape['dtype']}"
        report["rows"] += [(f"{key} {part}", entry[part]) for part in ("fwd", "wgrad+atomic", "wgrad-only", "segment")]
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
