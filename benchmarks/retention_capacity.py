"""TRIM-KV capacity benchmarks: memops.retention_capacity (tiled, no N x N terms stored) against the
materialised N x N reference. Bytes: log_beta read and R written (the terms are compute, not traffic);
FLOPs: about 3 per (t, j) pair of the causal triangle (multiply, exp, add) forward, 3x for fwd+bwd."""

from __future__ import annotations

import torch

import memops
from memops import reference
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "retention_capacity"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("materialised",)
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("materialised",)


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for mode in ("fwd", "fwd+bwd"):
        out.append(Case("small", mode, dict(B=1, Hkv=8, N=1024), quick=True))
        if device == "cuda":
            out.append(Case("llm-8k", mode, dict(B=2, Hkv=8, N=8192), quick=True, cuda_only=True))
            if not quick:
                out.append(Case("llm-32k", mode, dict(B=1, Hkv=8, N=32768), cuda_only=True))
    return out


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    generator = torch.Generator(device=device).manual_seed(seed)
    log_beta = -0.01 * torch.rand(p["B"], p["Hkv"], p["N"], device=device, generator=generator)
    grad = torch.randn(p["B"], p["Hkv"], p["N"], device=device, generator=generator) if case.mode != "fwd" else None
    return log_beta, grad


def _build(forward, mode: str):
    def build(inputs):
        log_beta, grad = inputs
        if mode == "fwd":
            return lambda: forward(log_beta)
        log_beta = log_beta.requires_grad_()

        def step():
            log_beta.grad = None
            forward(log_beta).backward(grad)

        return step

    return build


def _memops(log_beta):
    return memops.retention_capacity(log_beta, check_log_beta=False)


def providers(case: Case, device: str) -> dict:
    out = {("memops" if device == "cuda" else "memops-reference"): _build(_memops, case.mode)}
    p = case.params
    # The materialised terms take B * Hkv * N * N * 4 bytes (8 GiB at N = 32K): leave out what cannot fit.
    if p["B"] * p["Hkv"] * p["N"] ** 2 * 4 * (1 if case.mode == "fwd" else 3) <= (24 << 30):
        out["materialised"] = _build(reference.retention_capacity, case.mode)
    return out


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    return 8 * p["B"] * p["Hkv"] * p["N"] * (1 if mode == "fwd" else 3)


def flops(case: Case, mode: str) -> float:
    p = case.params
    forward = 3.0 * p["B"] * p["Hkv"] * p["N"] * (p["N"] + 1) / 2
    return forward if mode == "fwd" else 3 * forward


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import retention

    dt = scenarios.torch_dtype(dtype)
    if dtype in ("fp32", "bf16"):  # the capacity kernels read log_beta (any float) and compute in fp32
        for case in scenarios.cases("retention_capacity"):
            p = case.params

            for documents in (False, True):

                def run(p=p, documents=documents):
                    log_beta = scenarios.meta(p["B"], p["Hkv"], p["N"], dtype=dt)
                    bounds = scenarios.meta(p["B"], p["N"], dtype=torch.int32) if documents else None
                    retention.retention_capacity_fwd(log_beta, bounds)
                    retention.retention_capacity_bwd(
                        scenarios.meta(p["B"], p["Hkv"], p["N"], dtype=torch.float32), log_beta, bounds
                    )

                yield f"capacity {case.name}{' documents' if documents else ''}", run
