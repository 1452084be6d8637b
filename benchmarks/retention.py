"""TRIM-KV retention-attention benchmarks: memops.retention_attention against FlexAttention and SDPA.

Baselines, same run: ``flex_attention`` (compiled FlexAttention with the decay as a score_mod and a causal
block mask: what the official TRIM-KV training code uses; CUDA only), ``sdpa_causal`` (plain causal SDPA
with no bias: the cost floor) and ``reference`` (memops.reference: SDPA with a materialised (B, H, N, Nk)
float bias). FLOPs count the visible (causal) keys: 4·B·H·D·Σ_i visible(i) forward, 3.5x that for fwd+bwd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memops
from memops import reference
from memops.benchmarks.attention import _build, _compiled_flex
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, case_grid, random_source

OP = "retention_attention"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("flex_attention", "sdpa_causal", "sdpa_bias", "reference")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("sdpa_bias",)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(B=1, H=4, Hkv=2, N=256, D=64, dtype="float32")
    llm_4k = dict(B=2, H=32, Hkv=8, N=4096, D=128, dtype="bfloat16")
    llm_16k = dict(B=1, H=32, Hkv=8, N=16384, D=128, dtype="bfloat16")
    return case_grid(
        device, quick, quick_cases=[("small", small)], cuda_quick=[("llm-4k", llm_4k)], cuda_full=[("llm-16k", llm_16k)]
    )


def make_inputs(case: Case, device: str, seed: int):
    p, _, generator, randn = random_source(case, device, seed)

    tensors = dict(
        q=randn(p["B"], p["H"], p["N"], p["D"]),
        k=randn(p["B"], p["Hkv"], p["N"], p["D"]),
        v=randn(p["B"], p["Hkv"], p["N"], p["D"]),
        # a gate fresh from its bias init keeps beta close to 1
        log_beta=-0.01 * torch.rand(p["B"], p["Hkv"], p["N"], device=device, generator=generator),
    )
    grad_out = randn(p["B"], p["H"], p["N"], p["D"]) if case.mode != "fwd" else None
    return tensors, grad_out


def flops(case: Case, mode: str) -> float:
    p = case.params
    forward = 4.0 * p["B"] * p["H"] * p["D"] * p["N"] * (p["N"] + 1) / 2
    return forward if mode == "fwd" else 3.5 * forward


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    elements = 2 * p["B"] * p["H"] * p["N"] * p["D"] + 2 * p["B"] * p["Hkv"] * p["N"] * p["D"]
    return (elements * item + 4 * p["B"] * p["Hkv"] * p["N"]) * (1 if mode == "fwd" else 3)


def _memops(tensors):
    return memops.retention_attention(**tensors, check_log_beta=False)


def _reference(tensors):
    return reference.retention_attention(**tensors)


def _sdpa_causal(tensors):
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_bias(tensors):
    # Written by hand: the decay as an additive float mask, (i - j) * log_beta[j] on and below the diagonal.
    q, k, v, log_beta = tensors["q"], tensors["k"], tensors["v"], tensors["log_beta"]
    N, group = q.shape[2], q.shape[1] // k.shape[1]
    positions = torch.arange(N, device=q.device)
    distance = (positions[:, None] - positions[None, :]).to(log_beta.dtype)
    bias = (distance * log_beta[:, :, None, :]).masked_fill(distance < 0, float("-inf"))
    bias = bias.repeat_interleave(group, dim=1).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=group != 1)


def _flex(p):
    from torch.nn.attention.flex_attention import create_block_mask

    group = p["H"] // p["Hkv"]
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, p["N"], p["N"])

    def forward(tensors):
        log_beta = tensors["log_beta"]

        def retention(score, b, h, q_idx, kv_idx):
            return score + (q_idx - kv_idx) * log_beta[b, h // group, kv_idx]

        return _compiled_flex()(
            tensors["q"], tensors["k"], tensors["v"], score_mod=retention, block_mask=block_mask, enable_gqa=group != 1
        )

    return forward


def providers(case: Case, device: str) -> dict:
    out = {("memops" if device == "cuda" else "memops-reference"): _build(_memops, case.mode)}
    if device == "cuda":
        out["flex_attention"] = _build(_flex(case.params), case.mode)
        out["reference"] = _build(_reference, case.mode)
    out["sdpa_causal"] = _build(_sdpa_causal, case.mode)
    out["sdpa_bias"] = _build(_sdpa_bias, case.mode)
    return out


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import attention

    dt = scenarios.torch_dtype(dtype)
    for case, p, D in scenarios.cases_by_head_dim("retention", subset, "llm-4k"):
        # packed documents (position_ids / cu_seqlens): the DOCUMENTS variants; varlen: the VARLEN ones
        for documents in (False, True, "varlen"):

            def run(p=p, D=D, documents=documents):
                B, H, Hkv, N = p["B"], p["H"], p["Hkv"], p["N"]
                q, k = scenarios.meta(B, H, N, D, dtype=dt), scenarios.meta(B, Hkv, N, D, dtype=dt)
                log_beta = scenarios.meta(B, Hkv, N, dtype=torch.float32)
                if documents == "varlen":
                    q, k = scenarios.meta(B * N, H, D, dtype=dt), scenarios.meta(B * N, Hkv, D, dtype=dt)
                    log_beta, cu = (
                        scenarios.meta(Hkv, B * N, dtype=torch.float32),
                        scenarios.meta(B + 1, dtype=torch.int32),
                    )
                    if not attention.reference_instead(q, "varlen-decay", backward=True):
                        packed = dict(scale=D**-0.5, cu_seqlens_q=cu, cu_seqlens_k=cu)
                        out, lse = attention.retention_attention_fwd(q, k, k, log_beta, None, None, **packed)
                        attention.memory_attention_bwd(q, q, k, k, None, None, None, out, lse, causal=True,
                                                       deterministic=True, log_beta=log_beta, **packed)  # fmt: skip
                    return
                bounds = scenarios.meta(B, N, dtype=torch.int32) if documents else None
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
                        scenarios.meta(B, H, N, dtype=torch.float32),
                        causal=True,
                        scale=D**-0.5,
                        deterministic=True,
                        log_beta=log_beta,
                        doc_start=bounds,
                        doc_end=bounds,
                    )

            variant = {False: "", True: " documents", "varlen": " varlen"}[documents]
            yield f"{case.name} D={D} decay{variant}", run
