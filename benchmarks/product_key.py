"""Product-key memory benchmarks. weighted_gather against F.embedding_bag(mode="sum", per_sample_weights=...)
and gather-then-einsum.

The forward must read T*K*D table elements and write T*D: its floor is those bytes over the measured copy
bandwidth. fwd+bwd adds reading dout and V rows again (weights grad), writing the dense (S, D) values grad,
and the scatter of T*K*D contributions.

The ``-fp8`` and ``-int8`` cases read an 8-bit copy of the table (memops.quantize_table, block 128, e8m0
scales; inference, forward only): providers memops-fp8 / memops-int8 against the bf16 table's own memops
gather (memops-bf16) and plain PyTorch on the dequantized picks (dequantize_einsum). Their bytes are the 8-bit
rows and their scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid, quantized_providers

OP = "weighted_gather"
METRIC = "bandwidth"  # the plot's third panel: % of the bandwidth ceiling
MEMOPS_PROVIDERS = (
    "memops", "memops-reference", "memops-unchecked", "memops-deterministic", "memops-fp8", "memops-int8",
)  # fmt: skip
BASELINES = ("embedding_bag", "gather_einsum", "memops-bf16", "dequantize_einsum")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("embedding_bag", "gather_einsum", "dequantize_einsum")
QUANTIZED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(T=256, K=32, S=1 << 16, D=256, dtype="float32")
    medium = dict(T=1024, K=64, S=1 << 18, D=512, dtype="float32")
    # Memory Layers at Scale: 4 heads x top-32 = 128 rows per token from a 1024^2-row bf16 table.
    mlas_1k = dict(T=4096, K=128, S=1 << 20, D=1024, dtype="bfloat16")
    mlas_4k = dict(T=4096, K=128, S=1 << 20, D=4096, dtype="bfloat16")
    out = case_grid(
        device,
        quick,
        quick_cases=[("small", small)],
        full_cases=[("medium", medium)],
        cuda_quick=[("mlas-D1024", mlas_1k)],
        cuda_full=[("mlas-D4096", mlas_4k)],
    )
    # 8-bit tables, for inference: the forward only
    out.append(Case("small-fp8", "fwd", dict(small, table="fp8"), quick=True))
    if device == "cuda":
        for name, params in (("mlas-D1024", mlas_1k), ("mlas-D4096", mlas_4k)):
            out += [Case(f"{name}-{table}", "fwd", dict(params, table=table), cuda_only=True) for table in QUANTIZED]
    return out


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    dtype = getattr(torch, p["dtype"])
    generator = torch.Generator(device=device).manual_seed(seed)
    values = torch.randn(p["S"], p["D"], device=device, dtype=dtype, generator=generator)
    if "table" in p:  # (the float table's gather is the baseline; its 8-bit copy is read by memops-fp8/int8)
        values = (values, memops.quantize_table(values, dtype=QUANTIZED[p["table"]], block_size=128))
    indices = torch.randint(0, p["S"], (p["T"], p["K"]), device=device, generator=generator)
    weights = torch.rand(p["T"], p["K"], device=device, generator=generator).softmax(-1).to(dtype)
    grad_out = (
        torch.randn(p["T"], p["D"], device=device, dtype=dtype, generator=generator) if case.mode != "fwd" else None
    )
    return values, indices, weights, grad_out


def _gather_einsum(values, indices, weights):
    return torch.einsum("tk,tkd->td", weights, values[indices])


def _embedding_bag(values, indices, weights):
    return F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")


def _memops(**kwargs):
    def fn(values, indices, weights):
        return memops.weighted_gather(values, indices, weights, **kwargs)

    return fn


def _build(forward, mode: str, deterministic: bool = False):
    def build(inputs):
        values, indices, weights, grad_out = inputs
        if mode == "fwd":
            return lambda: forward(values, indices, weights)
        values, weights = values.requires_grad_(), weights.requires_grad_()

        def step():
            values.grad = weights.grad = None
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                forward(values, indices, weights).backward(grad_out)
            finally:
                torch.use_deterministic_algorithms(before)

        return step

    return build


def _quantized(flavour: str):
    def build(inputs):
        (values, qt), indices, weights, _ = inputs
        if flavour == "memops-bf16":
            return lambda: memops.weighted_gather(values, indices, weights)
        if flavour == "memops":
            return lambda: memops.weighted_gather(qt, indices, weights)

        def dequantize_einsum():  # plain PyTorch: dequantize the picked rows, then the weighted sum
            rows = qt.data[indices].float() * memops.reference.quantized.expand_scales(
                qt.scales[indices.reshape(-1)], qt.block_size, qt.shape[1]
            ).view(*indices.shape, -1)
            return torch.einsum("tk,tkd->td", weights.float(), rows).to(values.dtype)

        return dequantize_einsum

    return build


def providers(case: Case, device: str) -> dict:
    if "table" in case.params:
        return quantized_providers(case, device, _quantized, "dequantize_einsum")
    ours = "memops" if device == "cuda" else "memops-reference"
    out = {ours: _build(_memops(), case.mode)}
    if device == "cuda":
        out["memops-unchecked"] = _build(_memops(check_indices=False), case.mode)
        if case.mode != "fwd":
            out["memops-deterministic"] = _build(_memops(), case.mode, deterministic=True)
    out["embedding_bag"] = _build(_embedding_bag, case.mode)
    if case.params["T"] * case.params["K"] * case.params["D"] <= 1 << 31:
        out["gather_einsum"] = _build(_gather_einsum, case.mode)
    return out


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    T, K, S, D = p["T"], p["K"], p["S"], p["D"]
    index_bytes = T * K * (8 + item)
    if "table" in p:  # the 8-bit rows and their e8m0 scales (one byte per 128 columns), the bf16 output
        return T * K * (D + -(-D // 128)) + T * D * item + index_bytes
    forward = T * K * D * item + T * D * item + index_bytes
    if mode == "fwd":
        return forward
    # backward: read dout, re-read the selected rows (weights grad), write the dense values grad.
    return forward + T * D * item + T * K * D * item + S * D * item + T * K * item


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def indices_of(p: dict) -> torch.Tensor:
    return torch.randint(0, p["S"], (p["T"], p["K"]), dtype=torch.int64)


def compile_scenarios(dtype, subset):
    from memops.kernels import product_key as kernels

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("product_key", subset, keep=lambda case: case.params["D"] == 1024):
        p = case.params

        def run(p=p):
            T, K, S, D = p["T"], p["K"], p["S"], p["D"]
            values, weights = scenarios.meta(S, D, dtype=dt), scenarios.meta(T, K, dtype=dt)
            if "table" in p:  # an 8-bit table (the forward, and the weights grad it still gives)
                scales = scenarios.meta(S, -(-D // 128), dtype=torch.uint8)
                # (a headline run: what its case launches, the forward of its format with e8m0 scales)
                headline = scenarios.headline_run()
                for table in (QUANTIZED[p["table"]],) if headline else (torch.float8_e4m3fn, torch.int8):
                    data = scenarios.meta(S, D, dtype=table)
                    for scale in (scales,) if headline else (scales, scales.float()):
                        kernels.weighted_gather_fwd(data, indices_of(p), weights, scales=scale, block_size=128,
                                                    out_dtype=dt)  # fmt: skip
                        if not headline:
                            kernels.weighted_gather_bwd(scenarios.meta(T, D, dtype=dt), data, indices_of(p), weights,
                                                        values_grad=False, scales=scale, block_size=128)  # fmt: skip
                return
            # Indices on CPU: the sorted-segment values grad reads them on the host.
            indices = torch.randint(0, S, (T, K), dtype=torch.int64)
            kernels.weighted_gather_fwd(values, indices, weights)
            for algorithm in ("atomic", "segment"):
                kernels.weighted_gather_bwd(
                    scenarios.meta(T, D, dtype=dt), values, indices, weights, values_grad_algorithm=algorithm
                )

        yield case.name, run
