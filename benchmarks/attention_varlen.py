"""Packed (varlen) memory attention benchmarks: memops.memory_attention_varlen against padding and against
FlashAttention's varlen kernel.

A case is S sequences with lengths drawn from [min_len, max_len] (a fixed seed), queries and keys sharing the
boundaries, causal, with or without M memory rows per sequence (shared by every sequence, as a prefix).
Every provider takes the packed tensors and returns the packed output, so what each costs end to end is
timed, padding included:

- ``memops`` (CUDA) / ``memops-reference`` (CPU): memops.memory_attention_varlen, no padding anywhere;
- ``memops-padded``: right-pad to (S, H, max_len, D) (the causal mask then hides the padding keys from
  every real query), memops.memory_attention, unpad;
- ``cat_sdpa``: right-pad, concatenate the memory onto K/V, SDPA (is_causal without memory, else a boolean
  mask), unpad: what users write today;
- ``flash_varlen`` (CUDA, torch.nn.attention.varlen where it exists): the memory rows concatenated into
  each sequence's packed keys (bottom-right causal then keeps them visible), then FlashAttention's varlen.

FLOPs count real tokens only (4·H·D·visible keys forward, 3.5x that for forward+backward), so padded
providers get no credit for the padding they compute; the note gives the padding a padded batch carries.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid, random_source

OP = "memory_attention_varlen"
METRIC = "flops"
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("memops-padded", "cat_sdpa", "flash_varlen", "reference")
EQUIVALENT = ("cat_sdpa",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(S=4, min_len=16, max_len=96, H=4, Hkv=2, M=0, D=64, dtype="float32", seed=0)
    small_memory = dict(small, M=8)
    packed = dict(S=16, min_len=128, max_len=8192, H=16, Hkv=16, M=0, D=128, dtype="bfloat16", seed=0)
    packed_memory = dict(packed, M=64)
    return case_grid(
        device,
        quick,
        quick_cases=[("small-packed", small), ("small-packed-memory", small_memory)],
        cuda_quick=[("packed-16", packed), ("packed-16-memory", packed_memory)],
    )


@functools.cache
def lengths(S: int, min_len: int, max_len: int, seed: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(min_len, max_len + 1, (S,), generator=generator).tolist())


def _lengths(p) -> tuple[int, ...]:
    return lengths(p["S"], p["min_len"], p["max_len"], p["seed"])


def make_inputs(case: Case, device: str, seed: int):
    p, _, _, randn = random_source(case, device, seed)
    lens = _lengths(p)
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    tensors = dict(q=randn(total, p["H"], p["D"]), k=randn(total, p["Hkv"], p["D"]), v=randn(total, p["Hkv"], p["D"]))
    if p["M"]:
        tensors["mem_k"], tensors["mem_v"] = randn(p["Hkv"], p["M"], p["D"]), randn(p["Hkv"], p["M"], p["D"])
    grad_out = randn(total, p["H"], p["D"]) if case.mode != "fwd" else None
    return (tensors, cu, max(lens)), grad_out


def flops(case: Case, mode: str) -> float:
    p = case.params
    visible = sum(n * p["M"] + n * (n + 1) // 2 for n in _lengths(p))  # causal, queries = keys
    forward = 4.0 * p["H"] * p["D"] * visible
    return forward if mode == "fwd" else 3.5 * forward


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    total = sum(_lengths(p))
    elements = 2 * total * p["H"] * p["D"] + 2 * total * p["Hkv"] * p["D"] + 2 * p["M"] * p["Hkv"] * p["D"]
    return elements * item * (1 if mode == "fwd" else 3)


def _padded_slots(cu: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
    """Each packed row's flat index in a right-padded (S * max_len) layout."""
    bounds = cu.long()
    index = torch.arange(total, device=cu.device)
    sequence = torch.searchsorted(bounds[1:], index, right=True)
    return sequence * max_len + index - bounds[sequence]


def _pad(t: torch.Tensor, slots: torch.Tensor, S: int, max_len: int) -> torch.Tensor:
    """Packed (total, heads, D) -> padded (S, heads, max_len, D), zeros at the padding."""
    out = t.new_zeros(S * max_len, *t.shape[1:]).index_copy(0, slots, t)
    return out.unflatten(0, (S, max_len)).transpose(1, 2)


def _unpad(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).flatten(0, 1).index_select(0, slots)


def _memops_varlen(tensors, cu, max_len):
    return memops.memory_attention_varlen(
        tensors["q"], tensors["k"], tensors["v"], cu, cu, max_len, max_len,
        tensors.get("mem_k"), tensors.get("mem_v"), causal=True,
    )  # fmt: skip


def _padded(tensors, cu, max_len):
    """(q, k, v) right-padded to (S, heads, max_len, D), and the packed rows' slots. With right padding the
    causal mask alone hides the padding keys from every real query (they sit after its diagonal), so the
    padded ops need no padding mask; the padding queries' rows are computed and dropped."""
    S, total = cu.shape[0] - 1, tensors["q"].shape[0]
    slots = _padded_slots(cu, total, max_len)
    return [_pad(tensors[n], slots, S, max_len) for n in ("q", "k", "v")], slots


def _memops_padded(tensors, cu, max_len):
    (q, k, v), slots = _padded(tensors, cu, max_len)
    return _unpad(memops.memory_attention(q, k, v, tensors.get("mem_k"), tensors.get("mem_v"), causal=True), slots)


def _cat_sdpa(tensors, cu, max_len):
    (q, k, v), slots = _padded(tensors, cu, max_len)
    gqa = q.shape[1] != k.shape[1]
    if "mem_k" not in tensors:  # SDPA's own causal path (flash / cuDNN on CUDA)
        return _unpad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), slots)
    S, M = q.shape[0], tensors["mem_k"].shape[1]
    k = torch.cat([tensors["mem_k"].expand(S, -1, -1, -1), k], 2)
    v = torch.cat([tensors["mem_v"].expand(S, -1, -1, -1), v], 2)
    rows = torch.arange(max_len, device=q.device)
    causal = rows[None, :] <= rows[:, None]
    mask = torch.cat([causal.new_ones(max_len, M), causal], -1)  # memory visible to every query
    return _unpad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa), slots)


def _with_memory_rows(t: torch.Tensor, mem: torch.Tensor, cu: torch.Tensor):
    """Packed keys (total, Hkv, D) with the (Hkv, M, D) memory rows put in front of every sequence's keys,
    and the new boundaries: what a FlashAttention-varlen user builds to attend over [memory ; sequence]."""
    S, M, total = cu.shape[0] - 1, mem.shape[1], t.shape[0]
    bounds = cu.long()
    index = torch.arange(total, device=t.device)
    sequence = torch.searchsorted(bounds[1:], index, right=True)
    out = t.new_empty(total + S * M, *t.shape[1:])
    out = out.index_copy(0, index + M * (sequence + 1), t)
    memory_slots = (bounds[:-1] + M * torch.arange(S, device=t.device))[:, None] + torch.arange(M, device=t.device)
    rows = mem.transpose(0, 1).expand(S, -1, -1, -1).flatten(0, 1)  # (S * M, Hkv, D)
    out = out.index_copy(0, memory_slots.flatten(), rows)
    new_cu = (cu + M * torch.arange(S + 1, device=cu.device, dtype=cu.dtype)).to(torch.int32)
    return out, new_cu


@functools.cache
def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _flash_varlen(tensors, cu, max_len):
    varlen_attn = _varlen_attn()
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    cu_k, max_k = cu, max_len
    if "mem_k" in tensors:
        k, cu_k = _with_memory_rows(k, tensors["mem_k"], cu)
        v, _ = _with_memory_rows(v, tensors["mem_v"], cu)
        max_k = max_len + tensors["mem_k"].shape[1]
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            causal["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return varlen_attn(q, k, v, cu, cu_k, max_len, max_k, **causal)


def _reference(tensors, cu, max_len):
    return memops.reference.memory_attention_varlen(
        tensors["q"], tensors["k"], tensors["v"], cu, cu, tensors.get("mem_k"), tensors.get("mem_v"), causal=True
    )


def _build(forward, mode: str):
    def build(inputs):
        (tensors, cu, max_len), grad_out = inputs
        if mode == "fwd":
            return lambda: forward(tensors, cu, max_len)
        for t in tensors.values():
            t.requires_grad_()

        def step():
            for t in tensors.values():
                t.grad = None
            forward(tensors, cu, max_len).backward(grad_out)

        return step

    return build


def providers(case: Case, device: str) -> dict:
    out = {("memops" if device == "cuda" else "memops-reference"): _build(_memops_varlen, case.mode)}
    out["cat_sdpa"] = _build(_cat_sdpa, case.mode)
    if device == "cuda":
        out["memops-padded"] = _build(_memops_padded, case.mode)
        if _varlen_attn() is not None:
            out["flash_varlen"] = _build(_flash_varlen, case.mode)
        out["reference"] = _build(_reference, case.mode)
    return out


def note(case: Case, provider: str, device: str) -> str | None:
    """The padding a padded batch of these lengths carries (the work the packed op does not do)."""
    if provider not in ("memops-padded", "cat_sdpa"):
        return None
    lens = _lengths(case.params)
    padded = len(lens) * max(lens)
    return f"padding: {padded - sum(lens)} of {padded} rows ({(padded - sum(lens)) / padded:.0%})"


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    """memory_attention_varlen at the varlen benchmark's packed cases (S sequences of the drawn lengths, shared
    memory rows, causal), forward and backward, and the memops-padded baseline."""
    from memops.kernels import attention as kernels

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("attention_varlen", subset):
        p = case.params
        lens = lengths(p["S"], p["min_len"], p["max_len"], p["seed"])
        total, S, H, Hkv, M, D = sum(lens), p["S"], p["H"], p["Hkv"], p["M"], p["D"]

        def run(total=total, S=S, H=H, Hkv=Hkv, M=M, D=D):
            q, k = scenarios.meta(total, H, D, dtype=dt), scenarios.meta(total, Hkv, D, dtype=dt)
            mem = scenarios.meta(Hkv, M, D, dtype=dt) if M else None
            if kernels.reference_instead(q, "varlen-memory", backward=True):
                return
            cu = scenarios.meta(S + 1, dtype=torch.int32)
            options = dict(causal=True, scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, None, **options)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, None, out, lse, deterministic=False, **options)

        yield f"{case.name} D={D} packed", run

        longest = max(lens)

        def padded(S=S, H=H, Hkv=Hkv, M=M, D=D, max_len=longest):
            # the benchmark's memops-padded baseline: memory_attention over the right-padded batch, heads
            # transposed out of the packed (S, max_len, heads, D) rows
            q = scenarios.meta(S, max_len, H, D, dtype=dt).transpose(1, 2)
            k = scenarios.meta(S, max_len, Hkv, D, dtype=dt).transpose(1, 2)
            mem = scenarios.meta(Hkv, M, D, dtype=dt) if M else None
            if kernels.reference_instead(q, "memory", backward=True):
                return
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, None, causal=True, scale=D**-0.5)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, None, out, lse, causal=True, scale=D**-0.5,
                                         deterministic=False)  # fmt: skip

        yield f"{case.name} D={D} padded", padded
