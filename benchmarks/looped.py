"""MELT shared looped KV cache benchmarks: one loop of a layer (update the shared cache, attend over it).

Providers, same run: ``memops`` (memops.looped_attention: the gated update fused into the attention pass;
at decode the in-place update kernel, then attention), ``unfused`` (torch.lerp of the cache rows, then
SDPA: what one writes by hand), ``per_loop`` (Ouro-style: every loop keeps its own cache, so a loop is plain
attention over it, with T times the KV memory) and ``sdpa`` (plain attention on the same shapes: the
floor). Times are per loop; the note gives the KV memory of the shared cache vs T per-loop caches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, random_source

OP = "looped_attention"
METRIC = "flops"  # the plot's third panel: TFLOP/s
MEMOPS_PROVIDERS = ("memops", "memops-reference")
BASELINES = ("unfused", "per_loop", "sdpa")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("unfused",)
LOOPS = 4


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(B=1, H=4, Hkv=4, n=256, Nk=256, D=64, dtype="float32")
    small_decode = dict(small, n=1, Nk=1024)
    # Ouro-1.4B-like: 16 heads x 128, prefill chunks of 4K tokens, decode at 8K and 32K context.
    ouro = dict(B=1, H=16, Hkv=16, n=4096, Nk=4096, D=128, dtype="bfloat16")
    out = [
        Case("small", "fwd", small, quick=True),
        Case("small", "fwd+bwd", small, quick=True),
        Case("small-decode", "decode", small_decode, quick=True),
    ]
    if device == "cuda":
        out += [
            Case("ouro-4k", "fwd", ouro, quick=True, cuda_only=True),
            Case("ouro-decode-8k", "decode", dict(ouro, n=1, Nk=8192), quick=True, cuda_only=True),
        ]
        if not quick:
            out += [
                Case("ouro-4k", "fwd+bwd", ouro, cuda_only=True),
                Case("ouro-decode-32k", "decode", dict(ouro, B=4, n=1, Nk=32768), cuda_only=True),
            ]
    return out


def make_inputs(case: Case, device: str, seed: int):
    p, _, generator, randn = random_source(case, device, seed)

    B, H, Hkv, n, Nk, D = p["B"], p["H"], p["Hkv"], p["n"], p["Nk"], p["D"]
    tensors = dict(
        q=randn(B, H, n, D),
        k_new=randn(B, Hkv, n, D),
        v_new=randn(B, Hkv, n, D),
        gate=torch.rand(B, Hkv, n, 1, device=device, generator=generator),
        k_cache=randn(B, Hkv, Nk, D),
        v_cache=randn(B, Hkv, Nk, D),
    )
    grad_out = randn(B, H, n, D) if case.mode == "fwd+bwd" else None
    return tensors, grad_out


def _memops(causal: bool, inplace: bool):
    def forward(t):
        return memops.looped_attention(
            t["q"], t["k_new"], t["v_new"], t["gate"], t["k_cache"], t["v_cache"], causal=causal, inplace=inplace
        )[0]

    return forward


def _unfused(causal: bool):
    def forward(t):
        n = t["k_new"].shape[2]
        gate = t["gate"].to(t["k_new"].dtype)
        k = torch.cat([t["k_cache"][:, :, :-n], torch.lerp(t["k_new"], t["k_cache"][:, :, -n:], gate)], dim=2)
        v = torch.cat([t["v_cache"][:, :, :-n], torch.lerp(t["v_new"], t["v_cache"][:, :, -n:], gate)], dim=2)
        return F.scaled_dot_product_attention(
            t["q"], k, v, is_causal=causal and n > 1, enable_gqa=t["q"].shape[1] != k.shape[1]
        )

    return forward


def _plain(t, causal: bool):
    q, k, v = t["q"], t["k_cache"], t["v_cache"]
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=q.shape[1] != k.shape[1]
    )


def _build(forward, mode: str, differentiable=("q", "k_new", "v_new", "gate", "k_cache", "v_cache")):
    def build(inputs):
        tensors, grad_out = inputs
        if mode != "fwd+bwd":

            def run():
                with torch.no_grad():
                    return forward(tensors)

            return run
        leaves = [tensors[name].requires_grad_() for name in differentiable]

        def step():
            for t in leaves:
                t.grad = None
            forward(tensors).backward(grad_out)

        return step

    return build


def providers(case: Case, device: str) -> dict:
    mode = case.mode
    # Prefill chunks (n = Nk) attend causally; at decode the one new query sees the whole cache.
    causal = case.params["n"] > 1
    ours = "memops" if device == "cuda" else "memops-reference"
    out = {ours: _build(_memops(causal, inplace=mode == "decode"), mode)}
    out["unfused"] = _build(_unfused(causal), mode)
    # A per-loop cache is never updated: each loop is attention over its own cache (same time as sdpa, T x the
    # memory, see the note); sdpa is the same call, kept as the floor of the comparison.
    out["per_loop"] = _build(lambda t: _plain(t, causal), mode, ("q", "k_cache", "v_cache"))
    out["sdpa"] = _build(lambda t: _plain(t, causal), mode, ("q", "k_cache", "v_cache"))
    return out


def _kv_bytes(p: dict) -> int:
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    return 2 * p["B"] * p["Hkv"] * p["Nk"] * p["D"] * item


def note(case: Case, provider: str, device: str) -> str | None:
    kv = _kv_bytes(case.params)
    if provider == "per_loop":
        return f"KV memory {LOOPS * kv / 2**20:.1f} MiB for T={LOOPS} loops"
    if provider in MEMOPS_PROVIDERS:
        return f"KV memory {kv / 2**20:.1f} MiB for any number of loops"
    return None


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    q_and_out = 2 * p["B"] * p["H"] * p["n"] * p["D"] * item
    new_rows = 2 * p["B"] * p["Hkv"] * p["n"] * p["D"] * item * 2  # read k/v new, write the updated rows
    return (q_and_out + _kv_bytes(p) + new_rows) * (3 if mode == "fwd+bwd" else 1)


def flops(case: Case, mode: str) -> float:
    p = case.params
    visible = p["n"] * (p["Nk"] - p["n"]) + p["n"] * (p["n"] + 1) / 2 if p["n"] > 1 else p["Nk"]
    forward = 4.0 * p["B"] * p["H"] * p["D"] * visible
    return forward * (3.5 if mode == "fwd+bwd" else 1)


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import attention, looped

    dt = scenarios.torch_dtype(dtype)
    for case, p, D in scenarios.cases_by_head_dim("looped", subset, "ouro-4k"):
        for gate_width in (1, D):

            def run(p=p, D=D, gate_width=gate_width):
                B, H, Hkv, n, Nk = p["B"], p["H"], p["Hkv"], p["n"], p["Nk"]
                q, cache = scenarios.meta(B, H, n, D, dtype=dt), scenarios.meta(B, Hkv, Nk, D, dtype=dt)
                new = scenarios.meta(B, Hkv, n, D, dtype=dt)
                path = attention.fwd_path(gate_per_channel=gate_width != 1)
                for gate_dtype in dict.fromkeys((dt, torch.float32)):  # gates come in any float dtype
                    gate = scenarios.meta(B, Hkv, n, gate_width, dtype=gate_dtype)
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
                    if (
                        not scenarios.headline_run()
                    ):  # looped_kv_update with its rows given: no headline case launches it
                        rows = torch.empty(n, dtype=torch.int64, device="meta")
                        looped.looped_update_fwd(cache, cache, new, new, gate, rows, 0, cache, cache)
                        looped.looped_update_bwd(cache, cache, cache, cache, new, new, gate, rows, 0)

            yield f"{case.name} D={D} gate={'row' if gate_width == 1 else 'channel'}", run

            def run_varlen(p=p, D=D, gate_width=gate_width):
                # the packed training path: S = B sequences of Nk tokens, every cache row blended
                B, H, Hkv, Nk = p["B"], p["H"], p["Hkv"], p["Nk"]
                q, rows = scenarios.meta(B * Nk, H, D, dtype=dt), scenarios.meta(B * Nk, Hkv, D, dtype=dt)
                gate, cu = scenarios.meta(B * Nk, Hkv, gate_width, dtype=dt), scenarios.meta(B + 1, dtype=torch.int32)
                path = attention.fwd_path(gate_per_channel=gate_width != 1)
                if not attention.reference_instead(q, f"varlen-{path}", backward=False):
                    attention.looped_attention_fwd(
                        q,
                        rows,
                        rows,
                        rows,
                        rows,
                        gate,
                        rows,
                        rows,
                        causal=True,
                        scale=D**-0.5,
                        cu_seqlens_q=cu,
                        cu_seqlens_k=cu,
                    )

            yield f"{case.name} D={D} gate={'row' if gate_width == 1 else 'channel'} varlen", run_varlen
