"""Ahead-of-time GPU compile check: every kernel the public ops launch, compiled for real GPU targets on a
machine without a GPU (``memops gpu-check``).

Triton's interpreter runs our kernels on CPU tensors for the numerics, but it accepts code that no GPU
compiler will (a reassigned constexpr, a config over the shared-memory limit). This module closes that gap:

1. **Record.** Every family's launchers run at the shapes of its CUDA benchmark cases, on meta tensors
   (integer index inputs on CPU where a launcher reads them on the host), with the launch configs of a pinned
   GPU architecture (:func:`memops._backend.configs_for_arch`). ``JITFunction.run`` is replaced by a recorder,
   so nothing launches: what is recorded is exactly what each launcher passes, never a hand-kept copy.
2. **Specialise** each launch with Triton's own binder for the target (the same ``tt.divisibility`` and
   ``== 1`` specialisations a launch on that GPU makes), and drop duplicates.
3. **Compile** each variant with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and
   read the result: the TTGIR for the lowering of every ``tt.dot`` (wgmma / mma.sync / FMA), the cubin through
   the wheel's ``cuobjdump`` for registers, stack and the LDL/STL spill traffic, Triton's metadata for shared
   memory against the target's per-block limit, and from those an occupancy estimate.
4. **Judge** each variant (:func:`problems`): a compile error, shared memory over the limit, any stack or
   spill traffic, or a 16-bit / tf32 dot that is not on tensor cores fails it, unless :data:`ALLOWED` lists
   the kernel with its reason.

It proves the kernels compile and fit on the target, and what the compiler made of them. It cannot prove
timing, the absence of races, or numerics on hardware: those need the GPU session (docs/testing.md).

Usage: ``memops gpu-check`` (full sweep: every family, variant and target; writes JSON + markdown),
``memops gpu-check --subset`` (the CI subset: one variant per kernel, dtype class and code path, sm_90).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# Per-target limits (CUDA programming guide, compute capabilities table): the opt-in shared memory one block
# may use, the shared memory of one SM (each resident block also reserves 1 KiB), registers per SM, resident
# blocks and threads per SM.
TARGETS = {
    80: dict(
        name="sm_80", smem_per_block=166912, smem_per_sm=167936, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
    90: dict(
        name="sm_90", smem_per_block=232448, smem_per_sm=233472, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
    100: dict(
        name="sm_100", smem_per_block=232448, smem_per_sm=233472, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
}
DEFAULT_ARCHES = (90, 80)

# Variants that may break a rule, each with its reason: (kernel, predicate on the variant's labels, rule, why).
# Rules: "spill" (stack or LDL/STL), "tensor_cores" (a 16-bit or tf32 dot not on tensor cores).
ALLOWED: list[tuple[str, Callable[[dict], bool], str, str]] = [
    (
        "block_route_kernel",
        lambda row: row["config"].get("E", 0) >= 256,
        "spill",
        "E = 256 experts (LLaDA2): the (32 tokens, 256 experts) int64 packed-entry sorts of the vote and the top-k "
        "spill 160-170 B at 8 warps (1.2-3.2 KB at 4); removing it means splitting the expert axis across programs "
        "(not done yet). The kernel has no dots and runs once per block of tokens.",
    ),
]


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Variant:
    """One compile: a kernel at one specialisation for one target, and every scenario that launches it."""

    family: str
    kernel: str
    arch: int
    dtype: str  # "bf16", "fp16", "fp32" (ieee dots), "tf32" (fp32 inputs, tf32 dots)
    labels: list[str]  # "<case> <path>" of every scenario that produced this exact compile
    config: dict  # the constexprs and options that the launcher chose (for the report)
    key: str = ""
    launch: Launch | None = dataclasses.field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------
# Recording launches


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Launches made inside the block are recorded instead of run (no GPU, no driver needed); under
    TRITON_INTERPRET=1 the interpreter's launches too (then ``Launch.kernel`` is its InterpretedFunction)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        return None

    for cls in originals:
        cls.run = record
    try:
        yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


@contextlib.contextmanager
def _matmul_precision(dtype: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[dtype]


# While set (:func:`headline_source`): benchmark module -> the cases of the headline list, which then replace
# each module's CUDA cases as the scenarios' shapes.
_CASE_SOURCE: list[dict] = []


@contextlib.contextmanager
def headline_source(*, small: bool = False) -> Iterator[None]:
    """Scenarios record only the headline benchmark's cases (memops.benchmarks.headline), each at its own head
    dim; ``small``: at the rehearsal's small parameters."""
    from memops.tools.benchmarking import BENCHMARKS
    from memops.tools.gpu_plan import headline_cases

    source: dict[str, list] = {}
    for entry, case in headline_cases(rehearse=small):
        source.setdefault(BENCHMARKS[entry.op], []).append(case)
    _CASE_SOURCE.append(source)
    try:
        yield
    finally:
        _CASE_SOURCE.pop()


def _cases(module: str, subset: bool = False, keep=None) -> list:
    """The CUDA benchmark cases of a benchmark module (the headline ones under :func:`headline_source`), one per
    distinct params (fwd and fwd+bwd share); with ``subset``, only those ``keep(case)`` accepts."""
    import importlib

    seen, out = set(), []
    if _CASE_SOURCE:
        cases = _CASE_SOURCE[-1].get(module, [])
    else:
        cases = importlib.import_module(f"memops.benchmarks.{module}").cases("cuda", False)
    for case in cases:
        key = tuple(sorted(case.params.items()))
        if key not in seen and (not subset or keep is None or keep(case)):
            seen.add(key)
            out.append(case)
    return out


# Each scenario function takes (dtype, subset) and yields (label, thunk); the thunk calls launchers.


def _weighted_gather_scenarios(dtype, subset):
    from memops.kernels import product_key as kernels

    dt = _torch_dtype(dtype)
    for case in _cases("product_key", subset, keep=lambda case: case.params["D"] == 1024):
        p = case.params

        def run(p=p):
            T, K, S, D = p["T"], p["K"], p["S"], p["D"]
            values, weights = _meta(S, D, dtype=dt), _meta(T, K, dtype=dt)
            # Indices on CPU: the sorted-segment values grad reads them on the host.
            indices = torch.randint(0, S, (T, K), dtype=torch.int64)
            kernels.weighted_gather_fwd(values, indices, weights)
            for algorithm in ("atomic", "segment"):
                kernels.weighted_gather_bwd(
                    _meta(T, D, dtype=dt), values, indices, weights, values_grad_algorithm=algorithm
                )

        yield case.name, run


def _search_scenarios(dtype, subset):
    from memops.kernels import product_key as kernels
    from memops.product_key import search_backward

    dt = _torch_dtype(dtype)
    for case in _cases("product_key_search", subset, keep=lambda case: case.params["key_dim"] == 512):
        p = case.params

        def run(p=p):
            T, heads, key_dim, n_keys, topk = p["T"], p["heads"], p["key_dim"], p["n_keys"], p["topk"]
            queries, sub_keys = _meta(T, heads, key_dim, dtype=dt), _meta(heads, 2, n_keys, key_dim // 2, dtype=dt)
            if kernels.search_reference_instead(queries):  # the op's "auto" backend runs the reference here
                return
            kernels.product_key_search(queries, sub_keys, topk)
            indices = torch.randint(0, n_keys * n_keys, (T, heads, topk), dtype=torch.int64)
            search_backward(_meta(T, heads, topk, dtype=torch.float32), queries, sub_keys, indices)

        yield case.name, run


def _pkm_layer_scenarios(dtype, subset):
    """nn.ProductKeyMemory's kernels at its benchmark shapes: the search over (heads, 2, n_keys, key_dim / 2)
    sub-keys, then the weighted gather of heads x topk rows from the n_keys^2-row value table."""
    from memops.kernels import product_key as kernels
    from memops.product_key import search_backward

    dt = _torch_dtype(dtype)
    for case in _cases("product_key_memory", subset, keep=lambda case: case.name == "xlm"):
        p = case.params

        def run(p=p):
            T, heads, key_dim, n_keys, topk, D = (
                p["T"],
                p["heads"],
                p["key_dim"],
                p["n_keys"],
                p["topk"],
                p["value_dim"],
            )
            queries, sub_keys = _meta(T, heads, key_dim, dtype=dt), _meta(heads, 2, n_keys, key_dim // 2, dtype=dt)
            indices = torch.randint(0, n_keys * n_keys, (T, heads * topk), dtype=torch.int64)
            if not kernels.search_reference_instead(queries):
                kernels.product_key_search(queries, sub_keys, topk)
                search_backward(_meta(T, heads, topk, dtype=torch.float32), queries, sub_keys,
                                indices.view(T, heads, topk))  # fmt: skip
            # the layer's weights are the search's fp32 softmax
            values, weights = _meta(n_keys * n_keys, D, dtype=dt), _meta(T, heads * topk, dtype=torch.float32)
            kernels.weighted_gather_fwd(values, indices, weights)
            kernels.weighted_gather_bwd(_meta(T, D, dtype=dt), values, indices, weights, values_grad_algorithm="atomic")

        yield f"layer {case.name}", run


HEAD_DIMS = (64, 128, 256)


def _attention_paths(B, H, Hkv, N, Nk, M, D, causal, dt, subset):
    """(path label, thunk) for memory attention's forward and backward kernels at one shape."""
    from memops.kernels import attention as kernels

    q, k = _meta(B, H, N, D, dtype=dt), _meta(B, Hkv, Nk, D, dtype=dt)
    paths = [("shared-memory", _meta(Hkv, M, D, dtype=dt), None, False)]
    if not subset:
        paths += [
            ("per-sample-memory+bias", _meta(B, Hkv, M, D, dtype=dt), _meta(B, Hkv, M, dtype=dt), False),
            ("shared-memory deterministic", _meta(Hkv, M, D, dtype=dt), None, True),
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
                _meta(B, H, N, D, dtype=dt),
                q,
                k,
                k,
                mem,
                mem,
                bias,
                _meta(B, H, N, D, dtype=dt),
                _meta(B, H, N, dtype=torch.float32),
                causal=causal,
                scale=D**-0.5,
                deterministic=deterministic,
                grad_lse=_meta(B, H, N, dtype=torch.float32),
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
            vendor_out = _meta(B, N, H, D, dtype=dt).transpose(1, 2) if heads_inner else _meta(B, H, N, D, dtype=dt)
            vendor_lse = _meta(B, N, H, dtype=torch.float32).transpose(1, 2) if heads_inner else _meta(
                B, H, N, dtype=torch.float32)  # fmt: skip
            lse_merge(vendor_out, vendor_lse, out, lse, empty_a_rows=max(N - Nk, 0) if causal else 0)
        kernels.memory_attention_bwd(
            _meta(B, H, N, D, dtype=dt),
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

    q, k = _meta(B * N, H, D, dtype=dt), _meta(B * Nk, Hkv, D, dtype=dt)
    cu = _meta(B + 1, dtype=torch.int32)
    paths = [("varlen shared-memory", _meta(Hkv, M, D, dtype=dt), None)]
    if not subset:
        paths.append(("varlen per-sequence-memory+bias", _meta(B, Hkv, M, D, dtype=dt), _meta(B, Hkv, M, dtype=dt)))
    for label, mem, bias in paths:

        def run(mem=mem, bias=bias):
            if kernels.reference_instead(q, "varlen-memory", backward=True):
                return
            options = dict(causal=causal, scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, bias, **options)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, bias, out, lse, deterministic=False, **options)

        yield label, run


def _packed_scenarios(dt, subset):
    """memory_attention_varlen at the varlen benchmark's packed cases (S sequences of the drawn lengths, shared
    memory rows, causal), forward and backward."""
    from memops.benchmarks.attention_varlen import lengths
    from memops.kernels import attention as kernels

    for case in _cases("attention_varlen", subset):
        p = case.params
        lens = lengths(p["S"], p["min_len"], p["max_len"], p["seed"])
        total, S, H, Hkv, M, D = sum(lens), p["S"], p["H"], p["Hkv"], p["M"], p["D"]

        def run(total=total, S=S, H=H, Hkv=Hkv, M=M, D=D):
            q, k = _meta(total, H, D, dtype=dt), _meta(total, Hkv, D, dtype=dt)
            mem = _meta(Hkv, M, D, dtype=dt) if M else None
            if kernels.reference_instead(q, "varlen-memory", backward=True):
                return
            cu = _meta(S + 1, dtype=torch.int32)
            options = dict(causal=True, scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, None, **options)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, None, out, lse, deterministic=False, **options)

        yield f"{case.name} D={D} packed", run

        longest = max(lens)

        def padded(S=S, H=H, Hkv=Hkv, M=M, D=D, max_len=longest):
            # the benchmark's memops-padded baseline: memory_attention over the right-padded batch, heads
            # transposed out of the packed (S, max_len, heads, D) rows
            q = _meta(S, max_len, H, D, dtype=dt).transpose(1, 2)
            k = _meta(S, max_len, Hkv, D, dtype=dt).transpose(1, 2)
            mem = _meta(Hkv, M, D, dtype=dt) if M else None
            if kernels.reference_instead(q, "memory", backward=True):
                return
            out, lse = kernels.memory_attention_fwd(q, k, k, mem, mem, None, causal=True, scale=D**-0.5)
            kernels.memory_attention_bwd(q, q, k, k, mem, mem, None, out, lse, causal=True, scale=D**-0.5,
                                         deterministic=False)  # fmt: skip

        yield f"{case.name} D={D} padded", padded


def _cases_by_head_dim(module: str, subset: bool, subset_case: str):
    """(case, params, head dim) of a benchmark module's CUDA cases at every head dim; the subset keeps one case
    at its own head dim."""
    for case in _cases(module, subset, keep=lambda case: case.name == subset_case):
        for D in (case.params["D"],) if subset or _CASE_SOURCE else HEAD_DIMS:
            yield case, case.params, D


def _memory_attention_scenarios(dtype, subset):
    dt = _torch_dtype(dtype)
    for case, p, D in _cases_by_head_dim("attention", subset, "dit-mem"):
        for path, run in _attention_paths(
            p["B"], p["H"], p["Hkv"], p["N"], p["Nk"], p["M"], D, p["causal"], dt, subset
        ):
            yield f"{case.name} D={D} {path}", run
    yield from _packed_scenarios(dt, subset)


def _retention_scenarios(dtype, subset):
    from memops.kernels import attention, retention

    dt = _torch_dtype(dtype)
    for case, p, D in _cases_by_head_dim("retention", subset, "llm-4k"):
        # packed documents (position_ids / cu_seqlens): the DOCUMENTS variants; varlen: the VARLEN ones
        for documents in (False, True, "varlen"):

            def run(p=p, D=D, documents=documents):
                B, H, Hkv, N = p["B"], p["H"], p["Hkv"], p["N"]
                q, k = _meta(B, H, N, D, dtype=dt), _meta(B, Hkv, N, D, dtype=dt)
                log_beta = _meta(B, Hkv, N, dtype=torch.float32)
                if documents == "varlen":
                    q, k = _meta(B * N, H, D, dtype=dt), _meta(B * N, Hkv, D, dtype=dt)
                    log_beta, cu = _meta(Hkv, B * N, dtype=torch.float32), _meta(B + 1, dtype=torch.int32)
                    if not attention.reference_instead(q, "varlen-decay", backward=True):
                        packed = dict(scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
                        out, lse = attention.retention_attention_fwd(q, k, k, log_beta, None, None, **packed)
                        attention.memory_attention_bwd(q, q, k, k, None, None, None, out, lse, causal=True,
                                                       deterministic=True, log_beta=log_beta, **packed)  # fmt: skip
                    return
                bounds = _meta(B, N, dtype=torch.int32) if documents else None
                if attention.reference_instead(q, "decay", backward=False):  # the ops run the reference
                    return
                attention.retention_attention_fwd(q, k, k, log_beta, None, None, scale=D**-0.5, doc_start=bounds)
                if not attention.reference_instead(q, "decay", backward=True):
                    attention.memory_attention_bwd(
                        q,
                        q,
                        k,
                        k,
                        None,
                        None,
                        None,
                        q,
                        _meta(B, H, N, dtype=torch.float32),
                        causal=True,
                        scale=D**-0.5,
                        deterministic=True,
                        log_beta=log_beta,
                        doc_start=bounds,
                        doc_end=bounds,
                    )

            variant = {False: "", True: " documents", "varlen": " varlen"}[documents]
            yield f"{case.name} D={D} decay{variant}", run
    if dtype in ("fp32", "bf16"):  # the capacity kernels read log_beta (any float) and compute in fp32
        for case in _cases("retention_capacity"):
            p = case.params

            for documents in (False, True):

                def run(p=p, documents=documents):
                    log_beta = _meta(p["B"], p["Hkv"], p["N"], dtype=dt)
                    bounds = _meta(p["B"], p["N"], dtype=torch.int32) if documents else None
                    retention.retention_capacity_fwd(log_beta, bounds)
                    retention.retention_capacity_bwd(
                        _meta(p["B"], p["Hkv"], p["N"], dtype=torch.float32), log_beta, bounds
                    )

                yield f"capacity {case.name}{' documents' if documents else ''}", run
    for case in _cases("retention_cache"):
        p = case.params

        def run(p=p):
            rows, D, budget, buffer = p["B"] * p["Hkv"], p["D"], p["budget"], p["buffer"]
            # a prompt of `context` rows compacted at once, then the steady state: budget + buffer rows
            for L in (p["context"], p["context"] + buffer, budget + buffer):
                log_beta, positions = _meta(rows, L, dtype=torch.float32), _meta(rows, L, dtype=torch.int64)
                kept = retention.retention_select(log_beta, positions, L, L - 1, budget)
                # into the cache's storage: budget + buffer rows of room (memops.retention_cache.evict's flat views)
                room = budget + buffer
                retention.cache_gather(_meta(rows, L, D, dtype=dt), kept, _meta(rows, room, D, dtype=dt))
                retention.cache_gather(log_beta[..., None], kept, _meta(rows, room, 1, dtype=torch.float32))
                retention.cache_gather(positions[..., None], kept, _meta(rows, room, 1, dtype=torch.int64))
            # decode: one query over the kept rows, a growing view of the (budget + buffer)-row storage
            B, H, Hkv = p["B"], p["H"], p["Hkv"]
            storage = _meta(B, Hkv, budget + buffer, D, dtype=dt)
            for Nk in (budget, budget + 1):
                if not attention.reference_instead(storage, "memory", backward=False):
                    cache = storage.narrow(2, 0, Nk)
                    attention.memory_attention_fwd(_meta(B, H, 1, D, dtype=dt), cache, cache, None, None, None,
                                                   causal=False, scale=D**-0.5)  # fmt: skip

        yield f"cache {case.name}", run


def _looped_scenarios(dtype, subset):
    from memops.kernels import attention, looped

    dt = _torch_dtype(dtype)
    for case, p, D in _cases_by_head_dim("looped", subset, "ouro-4k"):
        for gate_width in (1, D):

            def run(p=p, D=D, gate_width=gate_width):
                B, H, Hkv, n, Nk = p["B"], p["H"], p["Hkv"], p["n"], p["Nk"]
                q, cache = _meta(B, H, n, D, dtype=dt), _meta(B, Hkv, Nk, D, dtype=dt)
                new = _meta(B, Hkv, n, D, dtype=dt)
                path = attention.fwd_path(gate_per_channel=gate_width != 1)
                for gate_dtype in dict.fromkeys((dt, torch.float32)):  # gates come in any float dtype
                    gate = _meta(B, Hkv, n, gate_width, dtype=gate_dtype)
                    if n == 1:  # decode (memops.looped_attention inplace=True): the update, then plain attention
                        looped.looped_update_fwd(cache, cache, new, new, gate, None, Nk - n, cache, cache)
                        if not attention.reference_instead(q, "memory", backward=False):
                            attention.memory_attention_fwd(q, cache, cache, None, None, None, causal=False,
                                                           scale=D**-0.5)  # fmt: skip
                        continue
                    if not attention.reference_instead(q, path, backward=False):  # else the ops run the reference
                        out, lse = attention.looped_attention_fwd(
                            q, cache, cache, new, new, gate, cache, cache, causal=True, scale=D**-0.5
                        )
                        if not attention.reference_instead(q, path, backward=True):  # looped_attention's backward
                            attention.memory_attention_bwd(q, q, cache, cache, None, None, None, out, lse, causal=True,
                                                           scale=D**-0.5, deterministic=True)  # fmt: skip
                    looped.looped_update_fwd(cache, cache, new, new, gate, None, Nk - n, cache, cache)
                    looped.looped_update_bwd(cache, cache, cache, cache, new, new, gate, None, Nk - n)
                    if not _CASE_SOURCE:  # looped_kv_update with its rows given: no headline case launches it
                        rows = torch.empty(n, dtype=torch.int64, device="meta")
                        looped.looped_update_fwd(cache, cache, new, new, gate, rows, 0, cache, cache)
                        looped.looped_update_bwd(cache, cache, cache, cache, new, new, gate, rows, 0)

            yield f"{case.name} D={D} gate={'row' if gate_width == 1 else 'channel'}", run

            def run_varlen(p=p, D=D, gate_width=gate_width):
                # the packed training path: S = B sequences of Nk tokens, every cache row blended
                B, H, Hkv, Nk = p["B"], p["H"], p["Hkv"], p["Nk"]
                q, rows = _meta(B * Nk, H, D, dtype=dt), _meta(B * Nk, Hkv, D, dtype=dt)
                gate, cu = _meta(B * Nk, Hkv, gate_width, dtype=dt), _meta(B + 1, dtype=torch.int32)
                path = attention.fwd_path(gate_per_channel=gate_width != 1)
                if not attention.reference_instead(q, f"varlen-{path}", backward=False):
                    attention.looped_attention_fwd(
                        q, rows, rows, rows, rows, gate, rows, rows, causal=True, scale=D**-0.5, cu_seqlens_q=cu,
                        cu_seqlens_k=cu,
                    )

            yield f"{case.name} D={D} gate={'row' if gate_width == 1 else 'channel'} varlen", run_varlen


def _moe_scenarios(dtype, subset):
    from memops.kernels import moe

    dt = _torch_dtype(dtype)
    for case in _cases("moe_routing", subset, keep=lambda case: case.name.startswith("llada2")):
        p = case.params

        def run(p=p):
            logits = _meta(p["B"], p["N"], p["E"], dtype=torch.float32)
            # block routing and token routing, with and without DeepSeek's expert bias
            for block_size, bias in itertools.product((32, None), (_meta(p["E"], dtype=torch.float32), None)):
                moe.block_route(
                    logits,
                    bias,
                    block_size=block_size,
                    top_k=p["top_k"],
                    top_p=0.9,
                    min_experts=p["min_experts"],
                    softmax=p["score_func"] == "softmax",
                    n_groups=p["n_groups"],
                    topk_groups=p["topk_groups"],
                    routed_scaling=p["routed_scaling"],
                    normalize=True,
                )

        yield f"route {case.name}", run
    for case in _cases("moe_layer", subset, keep=lambda case: case.name == "llada2-64blk"):
        p = case.params

        def run(p=p):
            T, d, inter, E, top_k = p["T"], p["d"], p["inter"], p["E"], p["top_k"]
            x, w_gate_up, w_down = _meta(T, d, dtype=dt), _meta(E, 2 * inter, d, dtype=dt), _meta(E, d, inter, dtype=dt)
            ids = _meta(T, top_k, dtype=torch.int32)
            moe.moe_experts_fwd(x, w_gate_up, w_down, ids, save_preact=False)  # the forward op
            # the backward op: the gate/up GEMM again for its pre-activations, then the grads
            _, (layout, h, preact) = moe.moe_experts_fwd(x, w_gate_up, w_down, ids, save_preact=True, down=False)
            moe.moe_experts_bwd(_meta(T * top_k, d, dtype=dt), x, w_gate_up, w_down, ids, layout, h, preact)

        yield f"experts {case.name}", run


def _engram_scenarios(dtype, subset):
    dt = _torch_dtype(dtype)
    # The benchmark's engram cases (the demo's config: B*L = 8192 tokens, orders 2..3 with 8 heads of d = 64, a
    # table of about 10.3 M rows, G = 4 streams of C = 1024), kernel 4 at dilation 3; the table's rows are the
    # module's own (the sum of its heads' primes).
    # Each distinct shape of the engram cases: the CUDA ones (the demo's config) in a sweep, the headline's in
    # a headline run.
    shapes = {}
    for case in _cases("engram"):
        if case.cuda_only or _CASE_SOURCE:
            shape = {k: v for k, v in case.params.items() if k != "part"}
            shapes.setdefault(tuple(sorted(shape.items())), shape)
    for p in shapes.values():
        yield from _engram_shape_scenarios(p, dt)


def _engram_shape_scenarios(p, dt):
    from memops.kernels import engram
    from memops.kernels.product_key import weighted_gather_bwd
    from memops.reference.engram import engram_hash_params

    _, primes = engram_hash_params(
        (1,),
        [p["vocab"]] * (p["N"] - 1),
        max_ngram_size=p["N"],
        n_head_per_ngram=p["h"],
        seed=0,
        tokenizer_vocab_size=128000,
    )[1]  # fmt: skip  (memops.benchmarks.engram's module: layer 1, seed 0)
    rows = int(primes.sum())
    B, L, heads, d, G, C, K = p["B"], p["L"], (p["N"] - 1) * p["h"], p["e"] // p["h"], p["G"], p["C"], 4

    def lookup():
        ids = _meta(B, L, dtype=torch.int64)
        multipliers = _meta(p["N"], dtype=torch.int64)
        primes = _meta(p["N"] - 1, p["h"], dtype=torch.int64)
        offsets, table = _meta(heads, dtype=torch.int64), _meta(rows, d, dtype=dt)
        engram.engram_lookup_fwd(ids, table, multipliers, primes, offsets, 2)
        engram.engram_lookup_fwd(_meta(B, 3, dtype=torch.int64), table, multipliers, primes, offsets, 2, 2)  # decode
        if not _CASE_SOURCE:  # the public hash (bare ids, no offsets): no headline case launches it
            engram.ngram_hash(ids, multipliers, primes, 2)
        row_ids = engram.ngram_hash(ids, multipliers, primes, 2, offsets).reshape(-1, 1)
        weighted_gather_bwd(
            _meta(B * L * heads, d, dtype=dt), table, row_ids, _meta(B * L * heads, 1, dtype=torch.float32),
            values_grad_algorithm="atomic", weights_grad=False,
        )  # fmt: skip

    def gate():
        key, query, value = _meta(B * L, G, C, dtype=dt), _meta(B * L, G, C, dtype=dt), _meta(B * L, C, dtype=dt)
        w_k, w_q = _meta(G, C, dtype=dt), _meta(G, C, dtype=dt)
        engram.engram_gate_fwd(key, query, w_k, w_q, value, 1e-6)
        engram.engram_gate_bwd(_meta(B * L, G, C, dtype=dt), key, query, w_k, w_q, value, 1e-6)

    def conv():
        x, weight, norm_weight = _meta(B, L, G, C, dtype=dt), _meta(G * C, K, dtype=dt), _meta(G, C, dtype=dt)
        options = dict(dilation=3, eps=1e-5, activation=True, residual=True)
        engram.short_conv_fwd(x, weight, norm_weight, **options)
        engram.short_conv_bwd(_meta(B, L, G, C, dtype=dt), x, weight, norm_weight, **options)

    shape = f"B={B} L={L} G={G} C={C}"
    yield f"engram lookup {shape}", lookup
    yield f"engram gate {shape}", gate
    yield f"engram short-conv {shape}", conv


FAMILIES = {
    "weighted_gather": _weighted_gather_scenarios,
    "product_key_search": lambda dtype, subset: itertools.chain(
        _search_scenarios(dtype, subset), _pkm_layer_scenarios(dtype, subset)
    ),
    "memory_attention": _memory_attention_scenarios,
    "retention": _retention_scenarios,
    "looped": _looped_scenarios,
    "moe": _moe_scenarios,
    "engram": _engram_scenarios,
}
DTYPES = ("bf16", "fp16", "fp32", "tf32")


def _specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as a launch on ``arch`` would compile, via Triton's
    own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _describe(value) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def collect(
    families=None, dtypes=DTYPES, arches=DEFAULT_ARCHES, subset: bool = False, kernels=None, label=None,
    headline: bool = False, small: bool = False,
) -> list[Variant]:  # fmt: skip
    """Record every scenario under every (dtype, arch) and return the distinct compiles; ``label``: only the
    scenarios whose label contains it (``"varlen"``: the packed variants); ``headline``: only the headline
    benchmark's cases, in their own dtype (bf16), at their ``small`` rehearsal parameters if asked."""
    if headline:
        with headline_source(small=small):
            return collect(families, ("bf16",), arches, subset, kernels, label)
    from memops._backend import configs_for_arch

    variants: dict[str, Variant] = {}
    for family, scenarios in FAMILIES.items():
        if families and family not in families:
            continue
        for dtype in dtypes:
            if subset and dtype == "fp16":  # same code path as bf16
                continue
            for arch in arches:
                with configs_for_arch(arch), _matmul_precision(dtype):
                    for name, run in scenarios(dtype, subset):
                        if label and label not in name:
                            continue
                        with recording() as launches:
                            run()
                        for launch in launches:
                            fn = launch.kernel
                            if kernels and fn.__name__ not in kernels:
                                continue
                            options, signature, constexprs, attrs = _specialise(launch, arch)
                            key = repr(
                                (
                                    fn.__name__,
                                    arch,
                                    sorted(signature.items()),
                                    sorted(constexprs.items()),
                                    sorted(attrs.items()),
                                    options.num_warps,
                                    options.num_stages,
                                )
                            )
                            if key in variants:
                                if name not in variants[key].labels:
                                    variants[key].labels.append(name)
                                continue
                            config = {
                                fn.arg_names[path[0]]: _describe(v)
                                for path, v in constexprs.items()
                                if len(path) == 1 and fn.arg_names[path[0]].isupper()
                            }
                            # absent inputs (None pointers) pick a code path as the flags do
                            absent = [fn.arg_names[path[0]] for path, v in constexprs.items()
                                      if len(path) == 1 and v is None]  # fmt: skip
                            if absent:
                                config["absent"] = ",".join(absent)
                            config.update(num_warps=options.num_warps, num_stages=options.num_stages)
                            variants[key] = Variant(family, fn.__name__, arch, dtype, [name], config, key, launch)
    out = list(variants.values())
    if subset:  # one variant per (kernel, dtype class, code path): the first of each
        seen, kept = set(), []
        for v in out:
            path = tuple(
                sorted(
                    (k, v.config[k])
                    for k in v.config
                    if k == "absent"
                    or k.isupper()
                    and (
                        k.startswith(
                            (
                                "HAS_",
                                "CAUSAL",
                                "BLEND",
                                "GATE_",
                                "MEMORY_",
                                "WEIGHTS_",
                                "ATOMIC_",
                                "SWIGLU",
                                "SAVE_",
                                "VOTE",
                                "SOFTMAX",
                                "A_ROWS",
                                "C_ROWS",
                                "G_ROWS",
                                "USE_",
                                "VARLEN",
                                "DOCUMENTS",
                            )
                        )
                    )
                )
            )
            k = (v.kernel, v.dtype, path)
            if k not in seen:
                seen.add(k)
                kept.append(v)
        out = kept
    return out


# ---------------------------------------------------------------------------------------------------------
# Compiling and reading the result


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _dot_lowering(ttgir: str) -> dict:
    """How many dots became wgmma (HGMMA), mma.sync (HMMA) or FMA, from the TTGIR."""
    definitions = re.findall(r"^(#\w+) = (#ttg\.\w+)<\{([^\n]*)", ttgir, flags=re.M)
    encodings = {alias: kind for alias, kind, _ in definitions}
    versions = {
        alias: int(m.group(1)) for alias, _, rest in definitions if (m := re.search(r"versionMajor = (\d+)", rest))
    }
    counts = {"wgmma": 0, "mma": 0, "fma": 0}
    counts["wgmma"] = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    for line in re.findall(r"= tt\.dot [^\n]*", ttgir):
        result = re.search(r"-> tensor<[^,>]*, (#\w+)>", line)
        alias = result.group(1) if result else ""
        if encodings.get(alias) == "#ttg.nvidia_mma":
            counts["wgmma" if versions.get(alias) == 3 else "mma"] += 1
        else:
            counts["fma"] += 1
    return counts


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    return dict(
        registers=field("REG"),
        stack=field("STACK"),
        local=field("LOCAL"),
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
    )


def _occupancy(registers: int, shared: int, num_warps: int, target: dict) -> int:
    """Resident blocks per SM from registers (256-register allocation units per warp), shared memory (plus the
    1 KiB each block reserves), threads and the block limit."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = target["regs_per_sm"] // (regs_per_warp * num_warps)
    by_smem = target["smem_per_sm"] // (shared + 1024)
    by_threads = target["max_threads"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, target["max_blocks"]))


def compile_variant(variant: Variant, analyze: bool = True) -> dict:
    """Compile one variant for its target; its figures (``analyze``: registers, spills, dots, shared memory),
    or the exact error. The compile goes through Triton's cache (``TRITON_CACHE_DIR``), where a launch of the
    same specialisation on that target finds it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    target = TARGETS[variant.arch]
    row = dict(
        family=variant.family,
        kernel=variant.kernel,
        arch=target["name"],
        dtype=variant.dtype,
        labels=variant.labels,
        config=variant.config,
        ok=False,
        error=None,
    )
    start = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _specialise(variant.launch, variant.arch)
        compiled = triton_compile(
            ASTSource(variant.launch.kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", variant.arch, 32),
            options=options.__dict__,
        )
        if not analyze:  # compile ahead: the cache entry is the point
            row.update(ok=True, problems=[], compile_s=round(time.perf_counter() - start, 2))
            return row
        resources = _resources(compiled.asm["cubin"])
        dots = _dot_lowering(compiled.asm["ttgir"])
        shared = int(compiled.metadata.shared)
        row.update(
            ok=True,
            shared=shared,
            shared_limit=target["smem_per_block"],
            dots=dots,
            **resources,
            blocks_per_sm=_occupancy(resources["registers"], shared, options.num_warps, target),
        )
    except Exception as error:  # noqa: BLE001 - the report carries the exact error of any compile failure
        # A CompilationError's text is the source position, the source line and the cause: keep the position
        # and the cause on one line.
        lines = [line.strip() for line in f"{type(error).__name__}: {error}".strip().splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        row["error"] = message[:400]
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["problems"] = problems(row)
    return row


def _allowed(row: dict, rule: str) -> str | None:
    for kernel, predicate, allowed_rule, why in ALLOWED:
        if kernel == row["kernel"] and allowed_rule == rule and predicate(row):
            return why
    return None


def problems(row: dict) -> list[str]:
    """What fails the check for one compiled variant (empty: clean)."""
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B over the {row['shared_limit']} B limit")
    if (row["stack"] or row["spill_instructions"]) and not _allowed(row, "spill"):
        out.append(f"spills: {row['stack']} B stack, {row['spill_instructions']} LDL/STL")
    needs_tensor_cores = row["dtype"] in ("bf16", "fp16", "tf32")
    off_tensor_cores = row["dots"]["fma"] + (row["dots"]["mma"] if row["arch"] == "sm_90" else 0)
    if needs_tensor_cores and off_tensor_cores and not _allowed(row, "tensor_cores"):
        lowering = "FMA" if row["dots"]["fma"] else "mma.sync (not wgmma)"
        out.append(f"{off_tensor_cores} of {sum(row['dots'].values())} dots on {lowering}")
    return out


# Each worker process records once, then compiles the variants it is handed by index.
_WORKER_VARIANTS: list[Variant] = []


_WORKER_ANALYZE: list[bool] = [True]


def _worker_init(families, dtypes, arches, subset, kernels, label, headline=False, small=False, analyze=True):
    os.environ.pop("TRITON_INTERPRET", None)
    _WORKER_ANALYZE[0] = analyze
    _WORKER_VARIANTS.extend(collect(families, dtypes, arches, subset, kernels, label, headline, small))


def _worker_compile(index: int) -> dict:
    return compile_variant(_WORKER_VARIANTS[index], _WORKER_ANALYZE[0])


def run_check(families=None, dtypes=DTYPES, arches=DEFAULT_ARCHES, subset=False, jobs: int | None = None,
              progress=None, kernels=None, label=None, headline=False, small=False, analyze=True) -> dict:  # fmt: skip
    """Compile every variant (in ``jobs`` processes) and return the report: rows and a summary. ``headline`` /
    ``small``: the headline benchmark's variants (:func:`collect`); ``analyze=False`` only compiles (the
    compile-ahead step of the GPU run, which fills the Triton cache its launches read)."""
    import triton

    # Triton 3.9 warns that its FP-fusion default will change; pin today's default (fusion on, as 3.6 does).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("memops gpu-check compiles for GPUs: run it without TRITON_INTERPRET=1")
    start = time.perf_counter()
    variants = collect(families, dtypes, arches, subset, kernels, label, headline, small)
    jobs = jobs or min(len(variants), os.cpu_count() or 1)
    rows = []
    if jobs <= 1:
        for variant in variants:
            rows.append(compile_variant(variant, analyze))
            if progress:
                progress(rows[-1])
    else:
        # spawn, not fork: a forked torch process can deadlock on locks held by the parent's threads
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs,
            mp_context=context,
            initializer=_worker_init,
            initargs=(families, dtypes, arches, subset, kernels, label, headline, small, analyze),
        ) as pool:
            for row in pool.map(_worker_compile, range(len(variants))):
                rows.append(row)
                if progress:
                    progress(row)
    failing = [r for r in rows if r["problems"]]
    return dict(
        triton=triton.__version__,
        torch=torch.__version__,
        subset=subset,
        arches=[TARGETS[a]["name"] for a in arches],
        variants=len(rows),
        failing=len(failing),
        wall_s=round(time.perf_counter() - start, 1),
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------------------
# Report


def _dots_text(row: dict) -> str:
    dots = row["dots"]
    parts = [f"{n} {name}" for name, n in (("wgmma", dots["wgmma"]), ("mma", dots["mma"]), ("FMA", dots["fma"])) if n]
    return ", ".join(parts) or "-"


def summary_table(reports: list[dict]) -> list[dict]:
    """Per (triton, target, kernel, dtype): variants, failures, and the worst registers / stack / shared."""
    groups: dict[tuple, list] = {}
    for report in reports:
        for row in report["rows"]:
            groups.setdefault((report["triton"], row["arch"], row["kernel"], row["dtype"]), []).append(row)
    out = []
    for (version, arch, kernel, dtype), rows in sorted(groups.items()):
        ok = [r for r in rows if r["ok"]]
        out.append(
            dict(
                triton=version,
                arch=arch,
                kernel=kernel,
                dtype=dtype,
                variants=len(rows),
                compiled=len(ok),
                failing=sum(1 for r in rows if r["problems"]),
                max_registers=max((r["registers"] for r in ok), default=None),
                max_stack=max((r["stack"] for r in ok), default=None),
                spill_instructions=sum(r["spill_instructions"] for r in ok),
                max_shared_kib=round(max((r["shared"] for r in ok), default=0) / 1024, 1),
                tensor_cores="n/a"
                if dtype == "fp32"
                else (
                    "yes"
                    if ok
                    and all(not r["dots"]["fma"] and not (r["arch"] == "sm_90" and r["dots"]["mma"]) for r in ok)
                    and any(sum(r["dots"].values()) for r in ok)
                    else ("no dots" if all(not sum(r["dots"].values()) for r in ok) else "no")
                ),
                min_blocks_per_sm=min((r["blocks_per_sm"] for r in ok), default=None),
            )
        )
    return out


def _summary_lines(reports: list[dict]) -> list[str]:
    lines = [
        "| triton | target | kernel | dtype | variants | failing | max regs | max stack B | LDL/STL | "
        "max smem KiB | tensor cores | min blocks/SM |",
        "|" + "---|" * 12,
    ]
    for r in summary_table(reports):
        lines.append(
            f"| {r['triton']} | {r['arch']} | {r['kernel']} | {r['dtype']} | {r['variants']} | {r['failing']} | "
            f"{r['max_registers']} | {r['max_stack']} | {r['spill_instructions']} | {r['max_shared_kib']} | "
            f"{r['tensor_cores']} | {r['min_blocks_per_sm']} |"
        )
    return lines


def _fallback_lines() -> list[str]:
    """The attention launch-table entries without a clean config (the ops' "auto" backend runs the
    reference there)."""
    from memops.kernels import attention

    lines = []
    for name, table in (
        ("forward", attention.FWD_CONFIGS),
        ("dQ", attention.DQ_CONFIGS),
        ("dK/dV", attention.DKDV_CONFIGS),
    ):
        for (arch, dtype, head_dim), (by_path, why) in sorted(table.items()):
            paths = [path for path, config in by_path.items() if config is None]
            if paths:
                where = "every path" if paths == ["*"] else ", ".join(paths)
                lines.append(f"- {name}, sm_{arch}, {dtype}, D={head_dim}, {where}: {why}")
    return lines


def merge_labelled(sweeps: list[dict], labelled: list[dict]) -> list[dict]:
    """Full sweeps with the rows of later label-filtered sweeps (``--label``, e.g. the varlen variants) of
    the same Triton version added: those compile variants the full sweep did not have yet."""
    by_version = {report["triton"]: report for report in sweeps}
    for extra in labelled:
        full = by_version.get(extra["triton"])
        if full is None:
            continue
        full["rows"] = full["rows"] + extra["rows"]
        full["variants"] += extra["variants"]
        full["failing"] += extra["failing"]
        full.setdefault("merged", []).append(
            f"with {extra['variants']} '{extra['label']}' variants from a later sweep ({extra['failing']} failing)"
        )
    return sweeps


def markdown(reports: list[dict], before: list[dict] | None = None) -> str:
    """docs/gpu-compile.md: the summary per kernel, then every failing variant with its reason; ``before``:
    reports of an earlier sweep, summarised after it for comparison."""
    lines = [
        "# GPU compile check",
        "",
        "Every kernel the public ops launch, compiled ahead of time on a CPU-only machine for real GPU targets",
        "at the launch configs the launchers choose on CUDA, at every family's CUDA benchmark shapes and for",
        "every dtype class (bf16, fp16, fp32 with ieee dots, fp32 with tf32 dots) and head dim",
        "(`python -m memops.tools.gpu_check`, which `memops gpu-check` runs; see `memops/tools/gpu_check.py` and",
        "docs/testing.md for what it proves and what it cannot). Regenerate with",
        "`memops gpu-check --out benchmarks/results/gpu-compile` under each Triton version, then `memops report`.",
        "",
    ]
    for report in reports:
        lines.append(
            f"- Triton {report['triton']} (torch {report['torch']}), targets {', '.join(report['arches'])}: "
            f"{report['variants']} variants, {report['failing']} failing, {report['wall_s']} s"
            f"{' (subset)' if report['subset'] else ''}"
            + "".join(f"; {extra}" for extra in report.get("merged", []))
            + "."
        )
    lines += [""] + _summary_lines(reports)
    # Failing variants, grouped by (triton, target, kernel, dtype, kind of problem), with one example each.
    groups: dict[tuple, list] = {}
    for report in reports:
        for row in report["rows"]:
            for problem in row["problems"]:
                kind = re.sub(r"\d+", "N", problem.split(":")[0])
                groups.setdefault((report["triton"], row["arch"], row["kernel"], row["dtype"], kind), []).append(
                    (row, problem)
                )
    lines += ["", "## Failing variants", ""]
    if not groups:
        lines.append("None.")
    for (version, arch, kernel, dtype, kind), items in sorted(groups.items()):
        row, problem = items[0]
        lines.append(
            f"- Triton {version}, {arch}, `{kernel}` {dtype}: {len(items)} variant(s), {kind}; e.g. "
            f"{row['labels'][0]} {row['config']}: {problem}"
        )
    if ALLOWED:
        lines += ["", "## Allowed exceptions", ""]
        lines += [f"- `{kernel}` ({rule}): {why}" for kernel, _, rule, why in ALLOWED]
    lines += [
        "",
        "## Reference fallbacks",
        "",
        "Attention launch-table entries (`memops/kernels/attention.py`) where no candidate compiled clean. There",
        'the public ops\' `"auto"` backend runs the reference (torch SDPA and matmuls) instead, so the',
        'sweep launches nothing; `memops.backend("triton")` still forces the kernels, at the smallest tile.',
        "",
    ]
    lines += _fallback_lines() or ["None."]
    if before:
        lines += [
            "",
            "## Before the fixes",
            "",
            "The first sweep, before the fixes above (launch configs of that commit; the search, routing and",
            "eviction kernels did not compile):",
            "",
        ]
        for report in before:
            lines.append(
                f"- Triton {report['triton']}, targets {', '.join(report['arches'])}: {report['variants']} "
                f"variants, {report['failing']} failing, {report['wall_s']} s."
            )
        lines += [""] + _summary_lines(before)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memops gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--subset", action="store_true", help="the CI subset (one variant per kernel, dtype class and code path, sm_90)"
    )
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    parser.add_argument("--arch", action="append", type=int, choices=sorted(TARGETS), help="targets (default 90, 80)")
    parser.add_argument("--kernel", action="append", help="only these kernels (by name)")
    parser.add_argument("--label", help="only the scenarios whose label contains this (e.g. varlen)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>/gpu-compile-triton<version>.json")
    parser.add_argument(
        "--headline", action="store_true", help="only the headline benchmark's variants (bf16, its cases' shapes)"
    )
    parser.add_argument("--small", action="store_true", help="with --headline: at the rehearsal's small shapes")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="compile only, into TRITON_CACHE_DIR (no analysis, nothing judged): the GPU run's compile-ahead step",
    )
    parser.add_argument("--count", action="store_true", help="record and count the variants; compile nothing")
    args = parser.parse_args(argv)
    arches = tuple(args.arch or ((90,) if args.subset or args.headline else DEFAULT_ARCHES))
    if args.small and not args.headline:
        parser.error("--small goes with --headline")
    if args.count:
        os.environ.pop("TRITON_INTERPRET", None)
        variants = collect(args.family, DTYPES, arches, args.subset, args.kernel, args.label, args.headline, args.small)
        kernels = sorted({v.kernel for v in variants})
        print(f"{len(variants)} variants of {len(kernels)} kernels: {', '.join(kernels)}")
        return 0
    if args.warm_cache:
        start = time.perf_counter()
        report = run_check(args.family, DTYPES, arches, args.subset, args.jobs, None, args.kernel, args.label,
                           args.headline, args.small, analyze=False)  # fmt: skip
        for row in report["rows"]:
            if not row["ok"]:
                print(f"{row['arch']} {row['kernel']} {row['config']}: {row['error']}")
        compiled = sum(row["ok"] for row in report["rows"])
        print(
            f"compile ahead: {compiled} of {report['variants']} variants compiled into "
            f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')} in {time.perf_counter() - start:.1f} s "
            f"(triton {report['triton']}, {', '.join(report['arches'])})"
        )
        return 0 if compiled == report["variants"] else 1

    def progress(row):
        status = "ok" if not row["problems"] else "FAIL " + "; ".join(row["problems"])
        figures = (
            f"regs {row['registers']} stack {row['stack']} smem {row['shared']} dots [{_dots_text(row)}]"
            if row["ok"]
            else ""
        )
        print(
            f"{row['arch']} {row['kernel']} {row['dtype']} {row['config']} {figures} {row['compile_s']}s: {status}",
            flush=True,
        )

    report = run_check(args.family, DTYPES, arches, args.subset, args.jobs, progress, args.kernel, args.label,
                       args.headline, args.small)  # fmt: skip
    report["label"] = args.label
    print(
        f"triton {report['triton']}: {report['variants']} variants, {report['failing']} failing, {report['wall_s']} s"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = ("-subset" if args.subset else "") + (f"-{args.label}" if args.label else "")
        name = f"gpu-compile-triton{report['triton']}{suffix}.json"
        (args.out / name).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if report["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
