"""Engram benchmarks: the fused n-gram hash + lookup, the context gate, the short conv, and the whole layer.

Cases are named ``<part>-<shape>``: ``lookup`` (hash + multi-head gather), ``gate`` (RMSNorms, dot, signed
sqrt, sigmoid, value scale), ``conv`` (RMSNorm, causal dilated depthwise conv, SiLU, residual) and ``layer``
(memops.nn.Engram.forward, projections included). Providers:

- ``memops`` (CUDA) / ``memops-reference`` (CPU): the memops ops, or the Engram module built from them;
- ``torch``: the same math in plain PyTorch on the device, written as one would by hand (the hash with
  F.pad / XOR / %, F.embedding, the demo's per-stream loop of RMSNorms, F.conv1d);
- ``torch_compile``: torch.compile of ``torch`` (CUDA only: compiling on the CPU costs more than the run);
- ``demo``: the official demo's formulation: the hash in NumPy on the host (ids copied to the host and the
  hashes back), nn.Embedding, then the PyTorch gate and conv (lookup and layer cases).

The ``lookup-<shape>-fp8`` / ``-int8`` cases read an 8-bit copy of the table (memops.quantize_table, block 128,
e8m0 scales; inference, forward only): providers memops-fp8 / memops-int8 against the bf16 table's own memops
lookup (memops-bf16) and plain PyTorch that hashes and dequantizes the picked rows (dequantize_torch). Their
bytes are the ids, the 8-bit rows and their scales, and the output.

Shapes: ``small`` (CPU: B*L = 512, G = 2, C = 128, 8 heads of d = 16, tables of ~40 K rows) and ``demo``
(CUDA: the demo's config, B*L = 8192, G = 4, C = 1024, orders 2..3 with 8 heads of d = 64 in a table of
~10.3 M rows, bf16). Bytes: the lookup reads the ids and one table row per head and token and writes them;
the gate reads key, query and value and writes the output; the conv reads and writes x once; the layer
counts those three.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

import memops
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case, quantized_providers

OP = "engram"
METRIC = "bandwidth"
MEMOPS_PROVIDERS = ("memops", "memops-reference", "memops-fp8", "memops-int8")
BASELINES = ("torch", "torch_compile", "demo", "memops-bf16", "dequantize_torch")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("torch", "dequantize_torch")
QUANTIZED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}

SHAPES = {
    "small": dict(B=2, L=256, G=2, C=128, N=3, h=4, e=64, vocab=5003, dtype="float32"),
    "demo": dict(B=4, L=2048, G=4, C=1024, N=3, h=8, e=512, vocab=129280 * 5, dtype="bfloat16"),
}
PARTS = ("lookup", "gate", "conv", "layer")


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    for shape in ("small", "demo") if device == "cuda" else ("small",):
        params = SHAPES[shape]
        cuda_only = shape == "demo"
        for part in PARTS:
            out.append(Case(f"{part}-{shape}", "fwd", dict(params, part=part), quick=True, cuda_only=cuda_only))
        out.append(Case(f"layer-{shape}", "fwd+bwd", dict(params, part="layer"), quick=True, cuda_only=cuda_only))
    # 8-bit tables, for inference: the lookup's forward
    out.append(Case("lookup-small-fp8", "fwd", dict(SHAPES["small"], part="lookup", table="fp8"), quick=True))
    if device == "cuda":
        out += [Case(f"lookup-demo-{table}", "fwd", dict(SHAPES["demo"], part="lookup", table=table), cuda_only=True)
                for table in QUANTIZED]  # fmt: skip
    return out


def _module(p: dict, device: str, dtype: torch.dtype) -> memops.nn.Engram:
    module = memops.nn.Engram(
        layer_id=1, hidden_size=p["C"], hc_mult=p["G"], vocab_sizes=[p["vocab"]] * (p["N"] - 1),
        max_ngram_size=p["N"], n_embed_per_ngram=p["e"], n_head_per_ngram=p["h"], kernel_size=4, pad_id=2, seed=0,
        tokenizer_vocab_size=128000,
    )  # fmt: skip
    return module.to(device=device, dtype=dtype)


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, p["dtype"])
    B, L, G, C = p["B"], p["L"], p["G"], p["C"]
    inputs = dict(ids=torch.randint(0, 128000, (B, L), device=device, generator=generator))
    inputs["hidden"] = torch.randn(B, L, G, C, device=device, generator=generator).to(dtype)
    if p["part"] in ("lookup", "layer"):
        torch.manual_seed(seed)
        inputs["module"] = _module(p, device, dtype)
    if "table" in p:  # (the float table's lookup is the baseline; its 8-bit copy is read by memops-fp8/int8)
        weight = inputs["module"].multi_head_embedding.embedding.weight.detach()
        inputs["table"] = memops.quantize_table(weight, dtype=QUANTIZED[p["table"]], block_size=128)
    if p["part"] == "gate":
        inputs["key"] = torch.randn(B, L, G, C, device=device, generator=generator).to(dtype)
        inputs["value"] = torch.randn(B, L, C, device=device, generator=generator).to(dtype)
        inputs["w_k"] = (torch.rand(G, C, device=device, generator=generator) + 0.5).to(dtype)
        inputs["w_q"] = (torch.rand(G, C, device=device, generator=generator) + 0.5).to(dtype)
    if p["part"] == "conv":
        inputs["weight"] = (0.3 * torch.randn(G * C, 1, 4, device=device, generator=generator)).to(dtype)
        inputs["norm_weight"] = (torch.rand(G, C, device=device, generator=generator) + 0.5).to(dtype)
    if case.mode != "fwd":
        inputs["grad"] = torch.randn(B, L, G, C, device=device, generator=generator).to(dtype)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# The plain-PyTorch formulations


def torch_hash(ids, multipliers, primes, pad_id):
    """The demo's hash, in torch on the ids' device: shifted copies, XOR of products, % per head."""
    L, N = ids.shape[1], multipliers.shape[0]
    shifts = [ids] + [F.pad(ids, (k, 0), value=pad_id)[:, :L] for k in range(1, N)]
    hashes = []
    for n in range(2, N + 1):
        mix = shifts[0] * multipliers[0]
        for k in range(1, n):
            mix = torch.bitwise_xor(mix, shifts[k] * multipliers[k])
        hashes += [mix % primes[n - 2, j] for j in range(primes.shape[1])]
    return torch.stack(hashes, dim=2)


def numpy_hash(ids, multipliers, primes, pad_id):
    """The demo's hash on the host in NumPy (its NgramHashMapping), the ids copied there and the hashes back."""
    x = ids.cpu().numpy()
    m, sizes = multipliers.cpu().numpy(), primes.tolist()
    L, N = x.shape[1], m.shape[0]
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad_id)[:, :L] for k in range(1, N)]
    hashes = []
    for n in range(2, N + 1):
        mix = shifts[0] * m[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * m[k])
        hashes += [mix % sizes[n - 2][j] for j in range(len(sizes[0]))]
    return torch.from_numpy(np.stack(hashes, axis=2)).to(ids.device)


def torch_gate(key, query, w_k, w_q, value):
    """The demo's per-stream loop (nn.RMSNorm's math with its default eps)."""
    C = key.shape[-1]
    gates = []
    for g in range(key.shape[-2]):
        normed_key = F.rms_norm(key[:, :, g], (C,), w_k[g])
        normed_query = F.rms_norm(query[:, :, g], (C,), w_q[g])
        score = (normed_key * normed_query).sum(-1) / math.sqrt(C)
        gates.append(torch.sigmoid(score.abs().clamp_min(1e-6).sqrt() * score.sign()).unsqueeze(-1))
    return torch.stack(gates, dim=2) * value.unsqueeze(2)


def torch_conv(x, weight, norm_weight, dilation):
    """The demo's ShortConv (RMSNorm per stream, cat, Conv1d, crop, SiLU) plus the residual."""
    B, L, G, C = x.shape
    normed = torch.cat([F.rms_norm(x[:, :, g], (C,), norm_weight[g], eps=1e-5) for g in range(G)], dim=-1)
    y = F.conv1d(normed.transpose(1, 2), weight, padding=(weight.shape[-1] - 1) * dilation, dilation=dilation,
                 groups=G * C)[..., :L]  # fmt: skip
    return x + F.silu(y).transpose(1, 2).reshape(B, L, G, C)


def torch_layer(module, hidden, ids, hash_fn=torch_hash):
    table = module.multi_head_embedding
    hashes = hash_fn(ids, module.multipliers, module.primes, module.pad_id)
    embeddings = F.embedding(hashes + table.offsets, table.embedding.weight).flatten(-2)
    key = torch.stack([proj(embeddings) for proj in module.key_projs], dim=2)
    w_k = torch.stack([n.weight for n in module.norm1])
    w_q = torch.stack([n.weight for n in module.norm2])
    value = torch_gate(key, hidden, w_k, w_q, module.value_proj(embeddings))
    conv = module.short_conv
    return torch_conv(value, conv.conv.weight, conv.norm_weight(), conv.dilation)


# ---------------------------------------------------------------------------------------------------------


def _build(part: str, mode: str, flavour: str, compile_it: bool = False):
    def build(inputs):
        module = inputs.get("module")
        if part == "lookup":
            table = module.multi_head_embedding
            args = (inputs["ids"], table.embedding.weight, module.multipliers, module.primes, table.offsets)
            if flavour == "memops":
                fn = lambda: memops.engram_lookup(*args, pad_id=module.pad_id)  # noqa: E731
            else:
                hash_fn = numpy_hash if flavour == "demo" else torch_hash

                def fn():
                    hashes = hash_fn(args[0], args[2], args[3], module.pad_id)
                    return F.embedding(hashes + args[4], args[1]).flatten(-2)

        elif part == "gate":
            args = (inputs["key"], inputs["hidden"], inputs["w_k"], inputs["w_q"], inputs["value"])
            fn = (lambda: memops.engram_gate(*args)) if flavour == "memops" else (lambda: torch_gate(*args))
        elif part == "conv":
            args = (inputs["hidden"], inputs["weight"], inputs["norm_weight"])
            if flavour == "memops":
                fn = lambda: memops.short_conv(*args, dilation=3)  # noqa: E731
            else:
                fn = lambda: torch_conv(*args, 3)  # noqa: E731
        else:
            hidden, ids = inputs["hidden"], inputs["ids"]
            if flavour == "memops":
                fn = lambda: module(hidden, ids)  # noqa: E731
            else:
                hash_fn = numpy_hash if flavour == "demo" else torch_hash
                fn = lambda: torch_layer(module, hidden, ids, hash_fn)  # noqa: E731
        if compile_it:
            fn = torch.compile(fn)
        if mode == "fwd":
            return fn
        hidden = inputs["hidden"].requires_grad_()
        grad = inputs["grad"]

        def step():
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            fn().backward(grad)

        return step

    return build


def _quantized_lookup(flavour: str):
    def build(inputs):
        module, ids, qt = inputs["module"], inputs["ids"], inputs["table"]
        table = module.multi_head_embedding
        if flavour == "memops-bf16":
            return lambda: memops.engram_lookup(ids, table.embedding.weight, module.multipliers, module.primes,
                                                table.offsets, pad_id=module.pad_id)  # fmt: skip
        if flavour == "memops":
            return lambda: memops.engram_lookup(ids, qt, module.multipliers, module.primes, table.offsets,
                                                pad_id=module.pad_id)  # fmt: skip

        def dequantize_torch():  # plain PyTorch: hash, then dequantize the picked rows
            rows = (torch_hash(ids, module.multipliers, module.primes, module.pad_id) + table.offsets).reshape(-1)
            scales = memops.reference.quantized.expand_scales(qt.scales[rows], qt.block_size, qt.shape[1])
            picked = qt.data[rows].float() * scales
            return picked.view(*ids.shape, -1).to(qt.dtype)

        return dequantize_torch

    return build


def providers(case: Case, device: str) -> dict:
    part = case.params["part"]
    if "table" in case.params:
        return quantized_providers(case, device, _quantized_lookup, "dequantize_torch")
    out = {("memops" if device == "cuda" else "memops-reference"): _build(part, case.mode, "memops")}
    out["torch"] = _build(part, case.mode, "torch")
    if device == "cuda":
        out["torch_compile"] = _build(part, case.mode, "torch", compile_it=True)
    if part in ("lookup", "layer"):
        out["demo"] = _build(part, case.mode, "demo")
    return out


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    item = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    rows = p["B"] * p["L"]
    heads, d = (p["N"] - 1) * p["h"], p["e"] // p["h"]
    lookup = rows * 8 + 2 * rows * heads * d * item
    if "table" in p:  # the 8-bit rows, their e8m0 scales (one byte per block of 128) and the output
        lookup = rows * 8 + rows * heads * (d + -(-d // 128) + d * item)
    gate = rows * (3 * p["G"] + 1) * p["C"] * item
    conv = 2 * rows * p["G"] * p["C"] * item
    moved = {"lookup": lookup, "gate": gate, "conv": conv, "layer": lookup + gate + conv}[p["part"]]
    return moved if mode == "fwd" else 3 * moved


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    dt = scenarios.torch_dtype(dtype)
    # The benchmark's engram cases (the demo's config: B*L = 8192 tokens, orders 2..3 with 8 heads of d = 64, a
    # table of about 10.3 M rows, G = 4 streams of C = 1024), kernel 4 at dilation 3; the table's rows are the
    # module's own (the sum of its heads' primes).
    # Each distinct shape of the engram cases: the CUDA ones (the demo's config) in a sweep, the headline's in
    # a headline run.
    shapes = {}
    for case in scenarios.cases("engram"):
        if case.cuda_only or scenarios.headline_run():
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
        ids = scenarios.meta(B, L, dtype=torch.int64)
        multipliers = scenarios.meta(p["N"], dtype=torch.int64)
        primes = scenarios.meta(p["N"] - 1, p["h"], dtype=torch.int64)
        offsets, table = scenarios.meta(heads, dtype=torch.int64), scenarios.meta(rows, d, dtype=dt)
        engram.engram_lookup_fwd(ids, table, multipliers, primes, offsets, 2)
        engram.engram_lookup_fwd(
            scenarios.meta(B, 3, dtype=torch.int64), table, multipliers, primes, offsets, 2, 2
        )  # decode
        if not scenarios.headline_run():  # 8-bit tables (inference): e4m3 with e8m0 scales, int8 with fp32 ones
            for data_dtype, scale_dtype in ((torch.float8_e4m3fn, torch.uint8), (torch.int8, torch.float32)):
                engram.engram_lookup_fwd(ids, scenarios.meta(rows, d, dtype=data_dtype), multipliers, primes, offsets,
                                         2, scales=scenarios.meta(rows, 1, dtype=scale_dtype), block_size=d,
                                         out_dtype=dt)  # fmt: skip
        if not scenarios.headline_run():  # the public hash (bare ids, no offsets): no headline case launches it
            engram.ngram_hash(ids, multipliers, primes, 2)
        row_ids = engram.ngram_hash(ids, multipliers, primes, 2, offsets).reshape(-1, 1)
        weighted_gather_bwd(
            scenarios.meta(B * L * heads, d, dtype=dt), table, row_ids,
            scenarios.meta(B * L * heads, 1, dtype=torch.float32), values_grad_algorithm="atomic", weights_grad=False,
        )  # fmt: skip

    def gate():
        key, query, value = (
            scenarios.meta(B * L, G, C, dtype=dt),
            scenarios.meta(B * L, G, C, dtype=dt),
            scenarios.meta(B * L, C, dtype=dt),
        )
        w_k, w_q = scenarios.meta(G, C, dtype=dt), scenarios.meta(G, C, dtype=dt)
        engram.engram_gate_fwd(key, query, w_k, w_q, value, 1e-6)
        engram.engram_gate_bwd(scenarios.meta(B * L, G, C, dtype=dt), key, query, w_k, w_q, value, 1e-6)

    def conv():
        x, weight, norm_weight = (
            scenarios.meta(B, L, G, C, dtype=dt),
            scenarios.meta(G * C, K, dtype=dt),
            scenarios.meta(G, C, dtype=dt),
        )
        options = dict(dilation=3, eps=1e-5, activation=True, residual=True)
        engram.short_conv_fwd(x, weight, norm_weight, **options)
        engram.short_conv_bwd(scenarios.meta(B, L, G, C, dtype=dt), x, weight, norm_weight, **options)

    shape = f"B={B} L={L} G={G} C={C}"
    yield f"engram lookup {shape}", lookup
    yield f"engram gate {shape}", gate
    yield f"engram short-conv {shape}", conv
