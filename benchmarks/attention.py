"""Memory-token attention benchmarks: memops.memory_attention against what users write today.

Baselines, same run: ``cat_sdpa`` (torch.cat of the memory onto K/V, then F.scaled_dot_product_attention with
a boolean mask when one is needed; the SDPA backend torch picked is recorded), ``flex_attention`` (cat, then
the compiled FlexAttention with a block mask and a score_mod for the bias; CUDA only) and ``reference``
(memops.reference, the float-mask SDPA spec). memops runs as ``memops`` (``impl="auto"``), ``memops-composed``
(torch's fused attention over the sequence + memops' memory part, merged by log-sum-exp) and ``memops-fused``
(the single kernel); the note says which implementation and vendor op ran. FLOPs count the memory keys:
4·B·H·N·(M + visible keys)·D forward, 2.5x that more for the backward.

Dedupe cases (``copies`` > 1): the memory is ``M`` distinct rows each repeated ``copies`` times, as DiT-Mem's
1,000 rows are 10 distinct vectors x 100. The baselines get the repeated (Hkv, M x copies, D) table users
build today; memops gets the M distinct rows with ``mem_bias = ln copies``, which is exact. FLOPs count
the M x copies keys of the problem solved.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import memops
from memops import reference
from memops.testing import count_launches
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid, random_source

OP = "memory_attention"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-composed", "memops-fused", "memops-reference")
BASELINES = ("cat_sdpa", "flex_attention", "reference")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("cat_sdpa",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(B=1, H=4, Hkv=4, N=256, Nk=256, M=32, D=64, dtype="float32", causal=False, shared=True)
    small_causal = dict(small, causal=True, Hkv=2)
    dit_mem = dict(B=1, H=12, Hkv=12, N=32760, Nk=32760, M=1000, D=128, dtype="bfloat16", causal=False, shared=True)
    prefix = dict(B=8, H=32, Hkv=8, N=4096, Nk=4096, M=64, D=128, dtype="bfloat16", causal=True, shared=True)
    decode = dict(B=8, H=32, Hkv=8, N=1, Nk=8192, M=256, D=128, dtype="bfloat16", causal=True, shared=False)
    small_dedupe = dict(small, M=4, copies=8)
    dit_mem_dedupe = dict(dit_mem, M=10, copies=100)
    out = case_grid(
        device,
        quick,
        quick_cases=[("small", small), ("small-dedupe", small_dedupe)],
        full_cases=[("small-causal-gqa", small_causal)],
        cuda_quick=[("dit-mem", dit_mem)],
        cuda_full=[("dit-mem-dedupe", dit_mem_dedupe), ("prefix-tuning", prefix)],
    )
    if device == "cuda" and not quick:  # decode is inference only
        out.append(Case("decode", "fwd", decode, cuda_only=True))
    return out


def make_inputs(case: Case, device: str, seed: int):
    p, _, _, randn = random_source(case, device, seed)

    mem_shape = (p["Hkv"], p["M"], p["D"]) if p["shared"] else (p["B"], p["Hkv"], p["M"], p["D"])
    tensors = dict(
        q=randn(p["B"], p["H"], p["N"], p["D"]),
        k=randn(p["B"], p["Hkv"], p["Nk"], p["D"]),
        v=randn(p["B"], p["Hkv"], p["Nk"], p["D"]),
        mem_k=randn(*mem_shape),
        mem_v=randn(*mem_shape),
    )
    copies = p.get("copies", 1)
    if copies > 1:  # the baselines' repeated table, and memops' distinct rows + ln(copies)
        tensors["repeated_mem_k"] = tensors["mem_k"].repeat_interleave(copies, dim=-2)
        tensors["repeated_mem_v"] = tensors["mem_v"].repeat_interleave(copies, dim=-2)
        tensors["mem_bias"] = torch.full((p["M"],), math.log(copies), device=device, dtype=torch.float32)
    grad_out = randn(p["B"], p["H"], p["N"], p["D"]) if case.mode != "fwd" else None
    return tensors, grad_out


def _visible_keys(p) -> int:
    """Sum over queries of the keys each sees (memory + sequence)."""
    N, Nk, M = p["N"], p["Nk"], p["M"] * p.get("copies", 1)
    if not p["causal"]:
        return N * (M + Nk)
    sequence = torch.arange(N).add(Nk - N + 1).clamp(0, Nk).sum().item()  # query i sees i + Nk - N + 1 keys
    return N * M + sequence


def flops(case: Case, mode: str) -> float:
    p = case.params
    forward = 4.0 * p["B"] * p["H"] * p["D"] * _visible_keys(p)
    return forward if mode == "fwd" else 3.5 * forward


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    mem_rows = p["M"] * p.get("copies", 1) * (1 if p["shared"] else p["B"])
    elements = (
        2 * p["B"] * p["H"] * p["N"] * p["D"]
        + 2 * p["B"] * p["Hkv"] * p["Nk"] * p["D"]
        + 2 * mem_rows * p["Hkv"] * p["D"]
    )
    return elements * item * (1 if mode == "fwd" else 3)


def _concatenated(tensors):
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    mem_k, mem_v = tensors.get("repeated_mem_k", tensors["mem_k"]), tensors.get("repeated_mem_v", tensors["mem_v"])
    B = q.shape[0]
    if mem_k.dim() == 3:
        mem_k, mem_v = mem_k.expand(B, -1, -1, -1), mem_v.expand(B, -1, -1, -1)
    return q, torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)


def _causal_with_memory_mask(N, Nk, M, device):
    rows = torch.arange(N, device=device)[:, None]
    cols = torch.arange(M + Nk, device=device)[None, :]
    return (cols < M) | (cols - M <= rows + Nk - N)


def _cat_sdpa(p):
    def forward(tensors):
        q, keys, values = _concatenated(tensors)
        mask = _causal_with_memory_mask(p["N"], p["Nk"], p["M"], q.device) if p["causal"] else None
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=p["H"] != p["Hkv"])

    return forward


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(p):
    from torch.nn.attention.flex_attention import create_block_mask

    N, Nk, M = p["N"], p["Nk"], p["M"]
    shift = Nk - N

    M = M * p.get("copies", 1)

    def memory_or_causal(b, h, q_idx, kv_idx):
        return (kv_idx < M) | (kv_idx - M <= q_idx + shift)

    block_mask = create_block_mask(memory_or_causal, None, None, N, M + Nk) if p["causal"] else None

    def forward(tensors):
        q, keys, values = _concatenated(tensors)
        return _compiled_flex()(q, keys, values, block_mask=block_mask, enable_gqa=p["H"] != p["Hkv"])

    return forward


def _memops_inputs(tensors) -> dict:
    """What memops is called with: the distinct memory rows (+ mem_bias in a dedupe case)."""
    return {n: t for n, t in tensors.items() if not n.startswith("repeated_")}


def _memops(p, impl="auto"):
    def forward(tensors):
        return memops.memory_attention(**_memops_inputs(tensors), causal=p["causal"], impl=impl)

    return forward


def _reference(p):
    def forward(tensors):
        return reference.memory_attention(**_memops_inputs(tensors), causal=p["causal"])

    return forward


def _build(forward, mode: str):
    def build(inputs):
        tensors, grad_out = inputs
        if mode == "fwd":
            return lambda: forward(tensors)
        for t in tensors.values():
            t.requires_grad_()

        def step():
            for t in tensors.values():
                t.grad = None
            forward(tensors).backward(grad_out)

        return step

    return build


def providers(case: Case, device: str) -> dict:
    p = case.params
    out = {("memops" if device == "cuda" else "memops-reference"): _build(_memops(p), case.mode)}
    if device == "cuda":
        out["memops-composed"] = _build(_memops(p, "composed"), case.mode)
        out["memops-fused"] = _build(_memops(p, "fused"), case.mode)
    out["cat_sdpa"] = _build(_cat_sdpa(p), case.mode)
    if device == "cuda":
        out["flex_attention"] = _build(_flex(p), case.mode)
        out["reference"] = _build(_reference(p), case.mode)
    return out


def note(case: Case, provider: str, device: str) -> str | None:
    """Which implementation a memops provider ran (and the composed path's vendor op), from the launch
    record; which SDPA kernel torch picked for the cat_sdpa baseline, read off the profiler's kernel names."""
    if device != "cuda" or provider not in ("cat_sdpa", "memops", "memops-composed", "memops-fused"):
        return None
    if provider.startswith("memops"):
        tensors, _ = make_inputs(case, device, 0)
        impl = {"memops": "auto", "memops-composed": "composed", "memops-fused": "fused"}[provider]
        with count_launches() as launches:
            _memops(case.params, impl)(tensors)
        ran = [name for name in launches if name.startswith("memory_attention.")]
        return "impl: " + ", ".join(name.removeprefix("memory_attention.") for name in ran) if ran else None
    tensors, _ = make_inputs(case, device, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        _cat_sdpa(case.params)(tensors)
        torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in profile.events())
    for backend, marker in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "fmha"), ("efficient", "efficient")):
        if marker in names:
            return f"SDPA backend: {backend}"
    return "SDPA backend: math"


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def _attention_paths(B, H, Hkv, N, Nk, M, D, causal, dt, subset):
    """(path label, thunk) for memory attention's forward and backward kernels at one shape."""
    from memops.kernels import attention as kernels

    q, k = scenarios.meta(B, H, N, D, dtype=dt), scenarios.meta(B, Hkv, Nk, D, dtype=dt)
    paths = [("shared-memory", scenarios.meta(Hkv, M, D, dtype=dt), None, False)]
    if not subset:
        paths += [
            (
                "per-sample-memory+bias",
                scenarios.meta(B, Hkv, M, D, dtype=dt),
                scenarios.meta(B, Hkv, M, dtype=dt),
                False,
            ),
            ("shared-memory deterministic", scenarios.meta(Hkv, M, D, dtype=dt), None, True),
        ]
    for label, mem, bias, deterministic in paths:

        def run(mem=mem, bias=bias, deterministic=deterministic):
            # Where the launch tables have no clean config the ops' "auto" backend runs the reference, so
            # nothing is launched to check (the report lists those table entries).
            if kernels.reference_instead(q, "memory", backward=False):
                return
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, bias, causal=causal, scale=D**-0.5)
            if kernels.reference_instead(q, "memory", backward=True):
                return
            kernels.memory_attention_bwd(
                scenarios.meta(B, H, N, D, dtype=dt),
                q,
                k,
                k,
                mem,
                mem,
                bias,
                scenarios.meta(B, H, N, D, dtype=dt),
                scenarios.meta(B, H, N, dtype=torch.float32),
                causal=causal,
                scale=D**-0.5,
                deterministic=deterministic,
                grad_lse=scenarios.meta(B, H, N, dtype=torch.float32),
            )

        yield label, run

    def composed(mem=paths[0][1]):
        # memops' part of the composed path (memops.attention._composed_fwd/_bwd): the kernels over the memory
        # rows alone (no sequence keys, so never causal) and the LSE merge; the vendor op is not Triton's.
        from memops.kernels.attention_lse_merge import lse_merge

        if kernels.reference_instead(q, "memory", backward=True):
            return
        none = k.narrow(2, 0, 0)
        out, lse = kernels.memory_attention_fwd(q, none, none, mem, mem, None, causal=False, scale=D**-0.5)
        # The vendor's (out, lse) come first; their layout is the vendor's: contiguous, or with the heads
        # innermost (torch's flash kernels allocate (B, N, H, ...) and return a transposed view).
        for heads_inner in (False, True):
            vendor_out = (
                scenarios.meta(B, N, H, D, dtype=dt).transpose(1, 2)
                if heads_inner
                else scenarios.meta(B, H, N, D, dtype=dt)
            )
            vendor_lse = (scenarios.meta(B, N, H, dtype=torch.float32).transpose(1, 2) if heads_inner
                          else scenarios.meta(B, H, N, dtype=torch.float32))  # fmt: skip
            lse_merge(vendor_out, vendor_lse, out, lse, empty_a_rows=max(N - Nk, 0) if causal else 0)
        kernels.memory_attention_bwd(
            scenarios.meta(B, H, N, D, dtype=dt),
            q,
            none,
            none,
            mem,
            mem,
            None,
            out,
            lse,
            causal=False,
            scale=D**-0.5,
            deterministic=False,
        )

    yield "composed", composed
    yield from _varlen_attention_paths(B, H, Hkv, N, Nk, M, D, causal, dt, subset)


def _varlen_attention_paths(B, H, Hkv, N, Nk, M, D, causal, dt, subset):
    """(path label, thunk) for the packed (VARLEN) variants: the case's batch as S = B packed sequences."""
    from memops.kernels import attention as kernels

    q, k = scenarios.meta(B * N, H, D, dtype=dt), scenarios.meta(B * Nk, Hkv, D, dtype=dt)
    cu = scenarios.meta(B + 1, dtype=torch.int32)
    paths = [("varlen shared-memory", scenarios.meta(Hkv, M, D, dtype=dt), None)]
    if not subset:
        paths.append(
            (
                "varlen per-sequence-memory+bias",
                scenarios.meta(B, Hkv, M, D, dtype=dt),
                scenarios.meta(B, Hkv, M, dtype=dt),
            )
        )
    for label, mem, bias in paths:

        def run(mem=mem, bias=bias):
            if kernels.reference_instead(q, "varlen-memory", backward=True):
                return
            options = dict(causal=causal, scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, bias, **options)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, bias, out, lse, deterministic=False, **options)

        yield label, run


def compile_scenarios(dtype, subset):
    dt = scenarios.torch_dtype(dtype)
    for case, p, D in scenarios.cases_by_head_dim("attention", subset, "dit-mem"):
        for path, run in _attention_paths(
            p["B"], p["H"], p["Hkv"], p["N"], p["Nk"], p["M"], D, p["causal"], dt, subset
        ):
            yield f"{case.name} D={D} {path}", run
