"""TRIM-KV cache benchmarks: the eviction step and the per-layer decode step of a memory-bounded cache.

- ``evict``: one compaction of a layer holding budget + buffer rows to the top-``budget`` rows
  (memops.retention_cache.evict: Triton select + gather on CUDA) against ``topk_gather`` (torch.topk on the
  scores, torch.sort of the kept indices, torch.gather of K, V, log_beta and positions).
- ``decode``: one decode step of one layer at a long context: append the new token, attend, evict when
  due (every ``buffer`` steps; the timing loop amortises it as decoding does), with ``RetentionKVCache``
  and ``memops.memory_attention`` (memops) against ``full_cache``, the same step over a full cache
  (in-place append into a preallocated buffer, SDPA over all rows). Bytes: the K/V rows each reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memops
from memops.retention_cache import evict
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "retention_cache"
METRIC = "bandwidth"  # the plot's third panel: % of the bandwidth ceiling
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("topk_gather", "full_cache")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("topk_gather",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(B=1, H=8, Hkv=2, D=64, context=2048, budget=256, buffer=32, dtype="float32")
    llm = dict(B=1, H=32, Hkv=8, D=128, context=32768, budget=1024, buffer=128, dtype="bfloat16")
    llm_b4 = dict(llm, B=4)
    out = [Case("small", "evict", small, quick=True), Case("small", "decode", small, quick=True)]
    if device == "cuda":
        out += [
            Case("llm-32k", "evict", llm, quick=True, cuda_only=True),
            Case("llm-32k", "decode", llm, quick=True, cuda_only=True),
        ]
        if not quick:
            out += [
                Case("llm-32k-B4", "evict", llm_b4, cuda_only=True),
                Case("llm-32k-B4", "decode", llm_b4, cuda_only=True),
            ]
    return out


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    rows = p["budget"] + p["buffer"] if case.mode == "evict" else p["context"]
    B, Hkv, D = p["B"], p["Hkv"], p["D"]
    keys = torch.randn(B, Hkv, rows, D, device=device, generator=generator).to(dtype)
    values = torch.randn(B, Hkv, rows, D, device=device, generator=generator).to(dtype)
    log_beta = -0.01 * torch.rand(B, Hkv, rows, device=device, generator=generator)
    return dict(keys=keys, values=values, log_beta=log_beta, generator=generator)


def _evict_memops(p):
    def build(inputs):
        rows = inputs["keys"].shape[2]
        positions = torch.arange(rows, device=inputs["keys"].device).expand(inputs["log_beta"].shape).contiguous()
        return lambda: evict(
            inputs["keys"],
            inputs["values"],
            inputs["log_beta"],
            positions,
            newest_position=rows - 1,
            budget=p["budget"],
        )

    return build


def _evict_topk_gather(p):
    def build(inputs):
        keys, values, log_beta = inputs["keys"], inputs["values"], inputs["log_beta"]
        rows = keys.shape[2]
        positions = torch.arange(rows, device=keys.device).expand(log_beta.shape).contiguous()

        def step():
            scores = log_beta * (rows - positions).to(log_beta.dtype)
            kept = scores.topk(p["budget"], dim=-1).indices.sort(dim=-1).values
            index = kept.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, index), values.gather(2, index), log_beta.gather(2, kept), positions.gather(2, kept)

        return step

    return build


def _decode_memops(p):
    def build(inputs):
        keys, values, log_beta, generator = inputs["keys"], inputs["values"], inputs["log_beta"], inputs["generator"]
        cache = memops.RetentionKVCache(p["budget"], p["buffer"])
        cache.update(keys, values, 0, log_beta)  # the prompt: attended once, then compacted
        B, H, D = p["B"], p["H"], p["D"]
        q = torch.randn(B, H, 1, D, device=keys.device, generator=generator).to(keys.dtype)
        new_k, new_v, new_beta = keys[:, :, :1].clone(), values[:, :, :1].clone(), log_beta[:, :, :1].clone()

        def step():
            cached_k, cached_v = cache.update(new_k, new_v, 0, new_beta)
            return memops.memory_attention(q, cached_k, cached_v)

        return step

    return build


def _decode_full_cache(p):
    def build(inputs):
        keys, values, generator = inputs["keys"], inputs["values"], inputs["generator"]
        B, H, Hkv, D, context = p["B"], p["H"], p["Hkv"], p["D"], p["context"]
        k_buffer = torch.cat([keys, keys[:, :, :1]], dim=2)  # one spare row for the new token
        v_buffer = torch.cat([values, values[:, :, :1]], dim=2)
        q = torch.randn(B, H, 1, D, device=keys.device, generator=generator).to(keys.dtype)
        new_k, new_v = keys[:, :, :1].clone(), values[:, :, :1].clone()

        def step():
            k_buffer[:, :, context:] = new_k
            v_buffer[:, :, context:] = new_v
            return F.scaled_dot_product_attention(q, k_buffer, v_buffer, enable_gqa=H != Hkv)

        return step

    return build


def providers(case: Case, device: str) -> dict:
    ours = "memops" if device == "cuda" else "memops-reference"
    if case.mode == "evict":
        return {ours: _evict_memops(case.params), "topk_gather": _evict_topk_gather(case.params)}
    return {ours: _decode_memops(case.params), "full_cache": _decode_full_cache(case.params)}


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    row = 2 * p["D"] * item + 12  # K, V, log_beta and position of one (batch, kv head) row
    heads = p["B"] * p["Hkv"]
    if mode == "evict":  # read the scores, read and write the kept rows
        return heads * ((p["budget"] + p["buffer"]) * 12 + 2 * p["budget"] * row)
    return heads * p["budget"] * row  # the bounded cache's decode reads about budget rows


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import attention, retention

    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("retention_cache"):
        p = case.params

        def run(p=p):
            rows, D, budget, buffer = p["B"] * p["Hkv"], p["D"], p["budget"], p["buffer"]
            # a prompt of `context` rows compacted at once, then the steady state: budget + buffer rows
            for L in (p["context"], p["context"] + buffer, budget + buffer):
                log_beta, positions = (
                    scenarios.meta(rows, L, dtype=torch.float32),
                    scenarios.meta(rows, L, dtype=torch.int64),
                )
                kept = retention.retention_select(log_beta, positions, L, L - 1, budget)
                # into the cache's storage: budget + buffer rows of room (memops.retention_cache.evict's flat views)
                room = budget + buffer
                retention.cache_gather(
                    scenarios.meta(rows, L, D, dtype=dt), kept, scenarios.meta(rows, room, D, dtype=dt)
                )
                retention.cache_gather(log_beta[..., None], kept, scenarios.meta(rows, room, 1, dtype=torch.float32))
                retention.cache_gather(positions[..., None], kept, scenarios.meta(rows, room, 1, dtype=torch.int64))
            # decode: one query over the kept rows, a growing view of the (budget + buffer)-row storage
            B, H, Hkv = p["B"], p["H"], p["Hkv"]
            storage = scenarios.meta(B, Hkv, budget + buffer, D, dtype=dt)
            for Nk in (budget, budget + 1):
                if not attention.reference_instead(storage, "memory", backward=False):
                    cache = storage.narrow(2, 0, Nk)
                    attention.memory_attention_fwd(scenarios.meta(B, H, 1, D, dtype=dt), cache, cache, None, None, None,
                                                   causal=False, scale=D**-0.5)  # fmt: skip

        yield f"cache {case.name}", run
