"""The headline benchmarks: what one GPU run must measure for every family, kept in one place.

``memops bench --headline`` times exactly these cases (each family's real-size shapes against the baselines
its goal is stated against); ``memops bench --headline --rehearse`` runs the same list on a CPU machine at the
``small`` shapes, the memops providers through Triton's interpreter, so a case that no longer exists or a
provider that crashes is found before a GPU is lent. ``memops gpu-check --headline`` compiles the Triton
variants these cases launch ahead of the run. The goals are stated, not claimed: the run's table says
whether each one was met.

Each entry names an op of ``memops.tools.benchmarking.BENCHMARKS``, a case of that benchmark module's CUDA
list (``cases("cuda", quick=False)``) and its modes, the gpu-check family (``memops.benchmarks.MODULES``) whose
kernels it exercises, the baselines its goal compares with, the metric that bounds it ("bandwidth": GB/s
against the measured copy bandwidth; "flops": TFLOP/s against the measured matmul rate of its dtype;
"time": ratios only) and ``small``, the parameters the rehearsal overrides.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Headline:
    family: str  # a gpu-check family of memops.benchmarks.MODULES
    op: str  # a key of memops.tools.benchmarking.BENCHMARKS
    case: str  # a case name of the op's benchmark module (its CUDA list)
    modes: tuple[str, ...]
    baselines: tuple[str, ...]  # provider names the goal compares with (timed beside the memops provider)
    metric: str  # "bandwidth", "flops" or "time"
    goal: str
    small: dict  # the rehearsal's parameters (overriding the case's)


ENGRAM_GOALS = dict(
    lookup=">= 85% of copy",
    gate="(part of the layer goal)",
    conv="(part of the layer goal)",
    layer=">= 3x torch, >= 1.5x torch.compile",
)
_TINY_ATTENTION = dict(H=2, Hkv=2, N=40, Nk=40, M=8, D=32)

HEADLINES: tuple[Headline, ...] = (
    Headline("weighted_gather", "weighted_gather", "mlas-D1024", ("fwd", "fwd+bwd"),
             ("embedding_bag", "gather_einsum"), "bandwidth", ">= 90% of copy forward; backward >= 60%",
             dict(T=16, K=8, S=64, D=64)),
    Headline("weighted_gather", "weighted_gather", "mlas-D4096", ("fwd", "fwd+bwd"),
             ("embedding_bag", "gather_einsum"), "bandwidth", ">= 90% of copy forward; backward >= 60%",
             dict(T=16, K=8, S=64, D=64)),
    Headline("weighted_gather", "weighted_gather", "mlas-D1024-fp8", ("fwd",), ("memops-bf16", "dequantize_einsum"),
             "bandwidth", ">= 85% of copy on the 8-bit bytes, >= 1.8x the bf16 gather",
             dict(T=16, K=8, S=64, D=64)),
    Headline("product_key_search", "product_key_topk", "mlas", ("fwd", "fwd+bwd"),
             ("xlm", "xlm-compiled"), "flops", ">= 10x XLM eager",
             dict(T=8, key_dim=32, n_keys=16, topk=4)),
    Headline("product_key_search", "product_key_memory", "mlas-D2048", ("fwd", "fwd+bwd"),
             ("xlm", "xlm-compiled"), "bandwidth", ">= 4x the XLM layer eager",
             dict(T=8, dim=32, n_keys=8, heads=2, topk=4, key_dim=16, value_dim=32)),
    Headline("memory_attention", "memory_attention", "dit-mem", ("fwd", "fwd+bwd"),
             ("cat_sdpa", "flex_attention"), "flops", ">= 1.0x cat+SDPA", dict(_TINY_ATTENTION)),
    Headline("memory_attention", "memory_attention", "prefix-tuning", ("fwd", "fwd+bwd"),
             ("cat_sdpa", "flex_attention"), "flops", ">= 1.0x cat+SDPA", dict(_TINY_ATTENTION, B=2, Hkv=1)),
    Headline("memory_attention", "memory_attention_varlen", "packed-16-memory", ("fwd", "fwd+bwd"),
             ("memops-padded", "cat_sdpa", "flash_varlen"), "flops", ">= 1.0x FlashAttention varlen",
             dict(S=3, min_len=8, max_len=24, H=2, Hkv=2, M=4, D=32)),
    Headline("retention", "retention_attention", "llm-4k", ("fwd", "fwd+bwd"),
             ("sdpa_causal", "flex_attention"), "flops", "<= 1.15x SDPA causal time; >= 1.5x Flex",
             dict(B=1, H=4, Hkv=2, N=48, D=32)),
    Headline("retention", "retention_cache", "llm-32k", ("decode",),
             ("full_cache",), "bandwidth", ">= 8x full-cache decode",
             dict(H=4, Hkv=2, D=32, context=256, budget=32, buffer=8)),
    Headline("looped", "looped_attention", "ouro-4k", ("fwd+bwd",),
             ("sdpa",), "flops", "<= 1.05x plain attention (sdpa) time",
             dict(H=2, Hkv=2, n=40, Nk=40, D=32)),
    Headline("looped", "looped_attention", "ouro-decode-8k", ("decode",),
             ("sdpa",), "flops", "<= 1.05x plain attention (sdpa) time",
             dict(H=2, Hkv=2, Nk=64, D=32)),
    Headline("moe", "block_route", "llada2-64blk", ("fwd",),
             ("reference", "torch_topk", "memops-token"), "time", ">= 20x torch routing",
             dict(N=64, E=64, min_experts=8)),
    Headline("moe", "block_route", "llada2-512blk", ("fwd",),
             ("reference", "torch_topk", "memops-token"), "time", ">= 20x torch routing",
             dict(B=2, N=64, E=64, min_experts=8)),
    Headline("moe", "block_moe", "llada2-64blk", ("fwd", "fwd+bwd"),
             ("grouped_mm", "expert_loop", "memops-token"), "flops",
             "layer >= 2.5x; grouped GEMM >= 70% of the bf16 matmul rate",
             dict(T=32, d=32, inter=16, E=16, top_k=4, n_groups=4, topk_groups=2, min_experts=8)),
    *(
        Headline("engram", "engram", f"{part}-demo", ("fwd", "fwd+bwd") if part == "layer" else ("fwd",),
                 # (torch.compile only where a goal names it: the layer's)
                 {"lookup": ("torch", "demo"), "layer": ("torch", "torch_compile", "demo")}.get(part, ("torch",)),
                 "bandwidth",
                 ENGRAM_GOALS[part],
                 dict(B=1, L=16, G=2, C=32, h=2, e=16, vocab=97))
        for part in ("lookup", "gate", "conv", "layer")
    ),
    # engram_lookup, its backward and the step: the goal's "backward + step" (the step alone: memops bench)
    Headline("optim", "optim", "engram-table", ("fwd+bwd",), ("torch-sparse-adam", "torch-adamw"), "bandwidth",
             ">= 5x torch.optim.SparseAdam, >= 20x fused AdamW (backward + step); >= 80% of copy",
             dict(R=4096, D=8, n=128, B=2, L=16, vocab=97, h=2)),  # (the lookup: engram's small heads)
    Headline("value_embedding", "value_embedding", "d20-m8", ("fwd", "fwd+bwd"),
             ("gather_einsum", "gather_einsum_compile"), "bandwidth",
             ">= 85% of copy forward; >= 2x gather + einsum (fwd and fwd+bwd), >= 1.3x its torch.compile",
             dict(V=64, B=2, N=16, H=2, Dh=32, M=4)),
)  # fmt: skip
