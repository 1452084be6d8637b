"""Token-indexed value memory benchmarks (issue 33): memops.value_embedding_mix against the known formulation,
a gather of the token's M bank rows into a (B, N, M, H, Dh) tensor reduced by an einsum with the gates (and its
torch.compile on CUDA).

Shapes: MoVE's D20 model (vocab 65,536, d_model 1,280 = 10 heads of 128, sequences of 2,048, B * N = 16,384
tokens) at M = 1, 4, 8 and 32 slots, bf16; ``small`` on CPU.

The ``-fp8`` / ``-int8`` cases read an 8-bit copy of the bank (memops.quantize_table of its (V, M * H * Dh)
view, e8m0 scales per 128 columns; inference, forward only): providers memops-fp8 / memops-int8 against the bf16
bank's own memops mix (memops-bf16) and plain PyTorch that dequantizes the gathered rows before the einsum
(dequantize_einsum). Their bytes count the 8-bit rows and their scales.

Bytes (the fewest the op must move): forward, per token the ids, its M bank rows of H * Dh, v read and v'
written, the gates; backward, dv' read, v read and dv written, the M bank rows read again (the slot gates'
grads) and their grad rows written, the gates read and their grads written.
"""

from __future__ import annotations

import math

import torch

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, quantized_providers

OP = "value_embedding"
METRIC = "bandwidth"
MEMOPS_PROVIDERS = ("memops", "memops-reference", "memops-fp8", "memops-int8")
BASELINES = ("gather_einsum", "gather_einsum_compile", "memops-bf16", "dequantize_einsum")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("gather_einsum", "dequantize_einsum")
QUANTIZED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}

D20 = dict(V=65536, B=8, N=2048, H=10, Dh=128, dtype="bf16")


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(V=4096, B=2, N=256, H=4, Dh=64, M=4, dtype="fp32")
    out = [Case("small", mode, small, quick=True) for mode in ("fwd", "fwd+bwd")]
    if device == "cuda":
        for M in (1, 4, 8, 32):
            out += [
                Case(f"d20-m{M}", mode, dict(D20, M=M), quick=M == 4, cuda_only=True) for mode in ("fwd", "fwd+bwd")
            ]
    # 8-bit banks, for inference: the forward
    out.append(Case("small-fp8", "fwd", dict(small, table="fp8"), quick=True))
    if device == "cuda":
        out += [Case(f"d20-m8-{table}", "fwd", dict(D20, M=8, table=table), cuda_only=True) for table in QUANTIZED]
    return out


def _dtype(p: dict) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[p["dtype"]]


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    B, N, H, Dh, M, V = p["B"], p["N"], p["H"], p["Dh"], p["M"], p["V"]
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = _dtype(p)
    inputs = dict(
        v=torch.randn(B, N, H, Dh, device=device, generator=generator).to(dtype),
        gates=(2 * torch.sigmoid(torch.randn(B, N, H, M + 1, device=device, generator=generator))).to(dtype),
        ids=torch.randint(0, V, (B, N), device=device, generator=generator),
        bank=(0.05 * torch.randn(V, M, H * Dh, device=device, generator=generator)).to(dtype),
    )
    if case.mode != "fwd":
        inputs["grad"] = torch.randn(B, N, H, Dh, device=device, generator=generator).to(dtype)
    if "table" in p:  # (the float bank's mix is the baseline; its 8-bit copy is read by memops-fp8/int8)
        block = math.gcd(128, Dh)
        inputs["qt"] = memops.quantize_table(inputs["bank"].flatten(1), dtype=QUANTIZED[p["table"]], block_size=block)
    return inputs


def gather_einsum(v, gates, ids, bank):
    """The known formulation (MoVE's and nanochat's code shape): gather the M rows, reduce with the gates."""
    return mix_rows(v, gates, bank[ids])


def mix_rows(v, gates, rows):
    """gather_einsum's sum over every token's gathered M rows ``rows`` (B, N, M, H * Dh)."""
    B, N, H, Dh = v.shape
    return gates[..., :1] * v + torch.einsum("bnhm,bnmhd->bnhd", gates[..., 1:], rows.view(B, N, -1, H, Dh))


def _build(flavour: str, mode: str, compile_it: bool = False):
    def build(inputs):
        if flavour == "memops":
            fn = memops.value_embedding_mix
            options = dict(check_ids=False)
        else:
            fn, options = gather_einsum, {}
        if compile_it:
            fn = torch.compile(fn)
        args = (inputs["v"], inputs["gates"], inputs["ids"], inputs["bank"])
        if mode == "fwd":
            return lambda: fn(*args, **options)
        leaves = [t.requires_grad_() for t in (inputs["v"], inputs["gates"], inputs["bank"])]

        def step():
            for t in leaves:
                t.grad = None
            fn(*args, **options).backward(inputs["grad"])

        return step

    return build


def _quantized(flavour: str):
    def build(inputs):
        v, gates, ids, qt = inputs["v"], inputs["gates"], inputs["ids"], inputs["qt"]
        if flavour in ("memops", "memops-bf16"):
            bank = qt if flavour == "memops" else inputs["bank"]
            return lambda: memops.value_embedding_mix(v, gates, ids, bank, check_ids=False)

        def dequantize_einsum():  # plain PyTorch: dequantize the gathered rows, then gather_einsum's sum
            flat = ids.reshape(-1)
            scales = memops.reference.quantized.expand_scales(qt.scales[flat], qt.block_size, qt.shape[1])
            rows = (qt.data[flat].float() * scales).to(v.dtype)
            return mix_rows(v, gates, rows.view(*ids.shape, gates.shape[-1] - 1, -1))

        return dequantize_einsum

    return build


def providers(case: Case, device: str) -> dict:
    if "table" in case.params:
        return quantized_providers(case, device, _quantized, "dequantize_einsum")
    out = {("memops" if device == "cuda" else "memops-reference"): _build("memops", case.mode)}
    out["gather_einsum"] = _build("torch", case.mode)
    if device == "cuda":
        out["gather_einsum_compile"] = _build("torch", case.mode, compile_it=True)
    return out


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = 4 if p["dtype"] == "fp32" else 2
    T, HD, M = p["B"] * p["N"], p["H"] * p["Dh"], p["M"]
    gates = T * p["H"] * (M + 1) * item
    forward = T * 8 + T * M * HD * item + 2 * T * HD * item + gates
    if "table" in p:  # 8-bit rows and their e8m0 scales (one byte per block of up to 128 columns)
        forward += T * M * HD * (1 - item) + T * M * HD // math.gcd(128, p["Dh"])
    if mode == "fwd":
        return forward
    return forward + 3 * T * HD * item + 2 * T * M * HD * item + 2 * gates


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import value_embedding as kernels

    if dtype == "tf32":  # no dots: the same compile as fp32
        return
    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("value_embedding", subset, keep=lambda case: case.name == "d20-m8"):
        p = case.params

        def run(p=p):
            B, N, H, Dh, M, V = p["B"], p["N"], p["H"], p["Dh"], p["M"], p["V"]
            v, gates = scenarios.meta(B, N, H, Dh, dtype=dt), scenarios.meta(B, N, H, M + 1, dtype=dt)
            bank = scenarios.meta(V, M, H * Dh, dtype=dt)
            # ids on CPU: the deterministic bank grad sorts the slot rows on the host
            ids = torch.randint(0, V, (B, N), dtype=torch.int64)
            kernels.value_embedding_mix_fwd(v, gates, ids, bank)
            # (the headline launches the default, atomic bank grad only)
            for deterministic in (False,) if scenarios.headline_run() else (False, True):
                kernels.value_embedding_mix_bwd(scenarios.meta(B, N, H, Dh, dtype=dt), v, gates, ids, bank,
                                                deterministic=deterministic)  # fmt: skip
            if scenarios.headline_run():
                return
            # 8-bit banks (inference; v and the gates' grads): e4m3 with e8m0 scales per block of the head dim (up
            # to 128 columns), int8 with one fp32 scale per row
            for data_dtype, scale_dtype, block in ((torch.float8_e4m3fn, torch.uint8, math.gcd(128, Dh)),
                                                   (torch.int8, torch.float32, M * H * Dh)):  # fmt: skip
                data = scenarios.meta(V, M * H * Dh, dtype=data_dtype)
                scales = scenarios.meta(V, M * H * Dh // block, dtype=scale_dtype)
                kernels.value_embedding_mix_fwd(v, gates, ids, data, scales=scales, block_size=block)
                kernels.value_embedding_mix_bwd(scenarios.meta(B, N, H, Dh, dtype=dt), v, gates, ids, data,
                                                deterministic=False, bank_grad=False, scales=scales,
                                                block_size=block)  # fmt: skip

        yield f"{case.name} M={p['M']}", run
