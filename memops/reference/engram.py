"""Reference for Engram's hashed n-gram memory (DeepSeek, "Conditional Memory via Scalable Lookup",
deepseek-ai/Engram ``engram_demo_v1.py``): the per-layer hash parameters, the n-gram hash and the
multi-head table lookup.

Hash (token ids x (B, L), already compressed by the tokenizer lookup; max order N, h heads per order):

    x_k[t] = x[t - k] for t >= k, else pad_id                        (left padding within each row)
    mix_n[t] = XOR_{k < n} (x_k[t] * m_k)        n = 2..N             (int64, two's-complement wrap)
    id_{n,j}[t] = mix_n[t] mod p_{n,j}           j = 0..h-1          (floor mod: 0 <= id < p)

The ids are laid out order-major: column (n - 2) * h + j. The lookup reads
``table[offsets[c] + id_c]`` for each column c and concatenates the rows: (B, L, (N - 1) * h * d).

The multipliers and primes follow the demo's rule bit for bit, since that rule decides which row of a
checkpoint's table an n-gram reads: see :func:`engram_hash_params`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The demo's per-layer seed stride: rng seed = seed + LAYER_SEED_STRIDE * layer_id.
LAYER_SEED_STRIDE = 10007

# Deterministic Miller-Rabin witnesses: correct for every n < 3.3e24, far past any table size.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Exact primality of a Python int below 3.3e24 (deterministic Miller-Rabin)."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, taken: set[int] | frozenset[int] = frozenset()) -> int:
    """The smallest prime > start that is not in ``taken`` (the demo's ``find_next_prime``)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in taken):
        candidate += 1
    return candidate


def engram_hash_params(
    layer_ids: Sequence[int],
    vocab_sizes: Sequence[int],
    *,
    max_ngram_size: int,
    n_head_per_ngram: int,
    seed: int,
    tokenizer_vocab_size: int,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each Engram layer's hash multipliers and table sizes, as the official demo derives them.

    Args:
        layer_ids: every layer that holds an Engram, in the model's order. The primes are distinct across
            all of them and are drawn in this order, so a layer's table sizes depend on the layers before it.
        vocab_sizes: (max_ngram_size - 1) minimum table sizes, one per order n = 2..max_ngram_size.
        max_ngram_size: N, the largest n-gram order.
        n_head_per_ngram: h, hash heads per order.
        seed: the model's Engram seed.
        tokenizer_vocab_size: the compressed tokenizer's vocabulary size; it bounds the multipliers so that
            id * multiplier stays below 2**63 for ids in range.

    Returns:
        {layer_id: (multipliers (N,) int64, primes (N - 1, h) int64)}: multipliers are odd, from NumPy's
        ``default_rng(seed + 10007 * layer_id).integers(0, max(1, (2**63 - 1) // V // 2), N) * 2 + 1``;
        primes[n - 2, j] is the next unused prime after primes[n - 2, j - 1] (after vocab_sizes[n - 2] - 1
        for j = 0).
    """
    if len(vocab_sizes) != max_ngram_size - 1:
        raise ValueError(
            f"vocab_sizes: expected {max_ngram_size - 1} sizes (orders 2..{max_ngram_size}), got {len(vocab_sizes)}"
        )
    if tokenizer_vocab_size < 1:
        raise ValueError(f"tokenizer_vocab_size: expected >= 1, got {tokenizer_vocab_size}")
    half_bound = max(1, (int(np.iinfo(np.int64).max) // int(tokenizer_vocab_size)) // 2)
    taken: set[int] = set()
    params = {}
    for layer_id in layer_ids:
        rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
        multipliers = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64) * 2 + 1
        primes = []
        for vocab_size in vocab_sizes:
            start, order_primes = int(vocab_size) - 1, []
            for _ in range(n_head_per_ngram):
                start = next_prime(start, taken)
                taken.add(start)
                order_primes.append(start)
            primes.append(order_primes)
        params[int(layer_id)] = (torch.from_numpy(multipliers), torch.tensor(primes, dtype=torch.int64))
    return params


def table_offsets(primes: torch.Tensor) -> torch.Tensor:
    """First table row of each hash head: the exclusive cumsum of the flattened (order-major) table sizes,
    as the demo's ``MultiHeadEmbedding`` lays its heads out."""
    sizes = primes.reshape(-1).to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes


def ngram_hash(ids: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """(B, L) int token ids -> (B, L, (N - 1) * h) int64 hash ids; N = len(multipliers), primes (N - 1, h).

    int64 products wrap (two's complement), as NumPy's do in the demo; the mod is a floor mod, so ids of
    negative mixes land in [0, p) too.
    """
    x = ids.to(torch.int64)
    length = x.shape[-1]
    orders, heads = primes.shape
    multipliers = multipliers.to(device=x.device, dtype=torch.int64)
    primes = primes.to(device=x.device, dtype=torch.int64)
    # Left-pad once by N - 1 and take shifted views: x_k = padded[..., N-1-k : N-1-k+L]. (torch.cat of an
    # int64 fill, not F.pad: F.pad's fill value goes through a float, which rounds pad ids past 2^53.)
    padded = torch.cat([x.new_full((*x.shape[:-1], orders), int(pad_id)), x], dim=-1)
    mix = x * multipliers[0]
    out = []
    for k in range(1, orders + 1):
        mix = mix ^ (padded[..., orders - k : orders - k + length] * multipliers[k])
        out.append(torch.remainder(mix.unsqueeze(-1), primes[k - 1]))
    return torch.cat(out, dim=-1)


def engram_lookup(
    ids: torch.Tensor, table: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, offsets: torch.Tensor,
    *, pad_id: int, context: int = 0,
) -> torch.Tensor:  # fmt: skip
    """(B, context + L) ids -> (B, L, (N - 1) * h * d): row ``offsets[c] + hash_c`` of the (rows, d) table for
    each hash head c, concatenated in head order; the first ``context`` ids only feed the later hashes.
    Differentiable in ``table`` (a dense grad, as F.embedding's)."""
    hashes = ngram_hash(ids, multipliers, primes, pad_id=pad_id)[:, context:]
    rows = hashes + offsets.to(device=ids.device, dtype=torch.int64)
    return F.embedding(rows, table).flatten(-2)


# Below this |score| the demo clamps before the square root (its gradient there is zero).
GATE_SCORE_FLOOR = 1e-6


def engram_gate(
    key: torch.Tensor, query: torch.Tensor, w_k: torch.Tensor, w_q: torch.Tensor, value: torch.Tensor, *,
    eps: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Engram's context gate: ``out[..., g, :] = sigmoid(sign(s) sqrt(max(|s|, 1e-6))) * value`` with
    ``s = <RMSNorm(key[..., g, :]) * w_k[g], RMSNorm(query[..., g, :]) * w_q[g]> / sqrt(C)``.

    key (..., G, C) (the G key projections of the embedding), query (..., G, C) (the hidden streams),
    w_k / w_q (G, C) (the demo's norm1.{g} / norm2.{g} weights), value (..., C) (the value projection) ->
    (..., G, C). eps None is nn.RMSNorm's default, torch.finfo(dtype).eps.
    """
    C = key.shape[-1]
    if eps is None:
        eps = torch.finfo(key.dtype).eps
    out_dtype = value.dtype
    # fp32 math for 16-bit inputs (fp64 stays fp64), as the kernels compute: a 16-bit mean of squares and dot
    # lose the score (fp16 gradients were off by up to 84% at C = 64).
    compute = torch.float64 if key.dtype == torch.float64 else torch.float32
    key, query, w_k, w_q, value = (t.to(compute) for t in (key, query, w_k, w_q, value))
    # <k rk w_k, q rq w_q> = rk rq <k q, w_k w_q>: one product pass and one dot instead of two normed copies
    # (1.3x faster on CPU than normalising key and query first).
    rk = torch.rsqrt(key.square().mean(-1) + eps)
    rq = torch.rsqrt(query.square().mean(-1) + eps)
    score = torch.linalg.vecdot(key * query, w_k * w_q) * (rk * rq / math.sqrt(C))
    gate = torch.sigmoid(score.abs().clamp_min(GATE_SCORE_FLOOR).sqrt() * score.sign())
    return (gate.unsqueeze(-1) * value.unsqueeze(-2)).to(out_dtype)


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int, eps: float = 1e-5,
    activation: bool = True, residual: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Engram's ShortConv (plus the residual the Engram layer adds): per-stream RMSNorm, a depthwise causal
    conv over time (K taps at ``dilation``), SiLU, and ``x +``.

    x (B, L, G, C); weight (G*C, 1, K) or (G*C, K) (the demo's ``short_conv.conv.weight``); norm_weight
    (G, C) (its ``short_conv.norms.{g}.weight``) -> (B, L, G, C).
    """
    B, L, G, C = x.shape
    if x.numel() == 0:  # conv1d takes no empty time axis: an empty result that still has every input's grad
        return x * 0 + 0 * (weight.sum() + norm_weight.sum())
    # Only the taps that reach back into the sequence matter: j * dilation < L. (The rest would only read the
    # zero padding, and padding by (K - 1) * dilation rows would allocate them: a huge dilation, terabytes.)
    K = min(weight.shape[-1], (L - 1) // dilation + 1)
    normed = F.rms_norm(x, (C,), eps=eps) * norm_weight
    y = F.conv1d(
        normed.reshape(B, L, G * C).transpose(1, 2),
        weight.reshape(G * C, 1, weight.shape[-1])[..., -K:],
        padding=(K - 1) * dilation,
        dilation=dilation,
        groups=G * C,
    )[..., :L]
    y = y.transpose(1, 2).reshape(B, L, G, C)
    if activation:
        y = F.silu(y)
    return x + y if residual else y


def short_conv_step(
    x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, *, dilation: int,
    eps: float = 1e-5, activation: bool = True, residual: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One decode step of :func:`short_conv`: x (B, G, C), the new time step; state (B, (K-1)*dilation, G, C)
    the *normed* rows of the last (K-1)*dilation steps, oldest first (zeros before the sequence starts).
    Returns (out (B, G, C), the new state), equal to the last row of short_conv over the whole sequence."""
    B, G, C = x.shape
    K = weight.shape[-1]
    normed = F.rms_norm(x, (C,), eps=eps) * norm_weight
    window = torch.cat([state, normed.unsqueeze(1)], dim=1)  # (B, (K-1)*dil + 1, G, C)
    taps = window[:, ::dilation]  # the K rows t - (K-1)dil, ..., t
    y = (taps * weight.reshape(G, C, K).permute(2, 0, 1)).sum(1)
    if activation:
        y = F.silu(y)
    return (x + y if residual else y), window[:, 1:]
