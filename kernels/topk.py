"""Top-k building blocks for Triton kernels: (score, index) entries packed into one int64, and a bitonic
top-k network over them.

An entry holds the score's order-preserving int32 image in its high half (negative floats get their
magnitude bits flipped; NaN maps to the largest key) and an index of up to 31 bits in its low half, so one
integer comparison orders by score, then by index, and the index travels with its score. A high half of
INT32_MIN, which no float maps to, marks an empty entry (masked rows, padding).

The network is the bitonic top-k of tl.topk (sort runs of k, keep the larger of two opposite-sorted runs,
re-merge), but its compare-and-swap is a max and a min over a size-2 axis: tl.topk's XOR-sum version costs
seconds per call in the interpreter, this one about a tenth of that.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _score_order(score):
    # fp32 -> int32 with the same order: negative floats get their magnitude bits flipped. NaN ranks above
    # everything, as in torch.topk, and decodes back to a NaN.
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(score != score, 0x7FFFFFFF, key)


@triton.jit
def pack_entries(score, index, valid):
    packed = (_score_order(score).to(tl.int64) << 32) | index.to(tl.int64)
    return tl.where(valid, packed, empty_entries(packed))


@triton.jit
def empty_entries(like):
    return tl.full(like.shape, -2147483648, tl.int64) << 32


@triton.jit
def unpack_entries(packed):
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), packed & 0x7FFFFFFF, key != -2147483648


@triton.jit
def _pair_side(N_DIMS: tl.constexpr, AXIS: tl.constexpr):
    """0 on the left, 1 on the right element of each pair along hypercube axis AXIS (of N_DIMS)."""
    return tl.reshape(tl.arange(0, 2), [1] * AXIS + [2] + [1] * (N_DIMS - AXIS - 1))


@triton.jit
def _compare_swap(h, N_DIMS: tl.constexpr, AXIS: tl.constexpr, flip):
    """Compare-and-swap across hypercube axis AXIS: the pair's max and min are both reductions over a size-2
    axis, which the interpreter runs as one numpy call each. flip 1 puts the max on the left."""
    high = tl.max(h, axis=AXIS, keep_dims=True)
    low = tl.min(h, axis=AXIS, keep_dims=True)
    return tl.where((_pair_side(N_DIMS, AXIS) ^ flip) != 0, high, low)


@triton.jit
def _bitonic_merge(h, N_DIMS: tl.constexpr, STAGE: tl.constexpr, ORDER: tl.constexpr):
    """Sort runs of 2**STAGE along the innermost hypercube axes of h ([2] * N_DIMS), each run bitonic:
    ORDER 0 ascending, 1 descending, 2 alternating from run to run (which makes runs of twice the length
    bitonic for the next stage)."""
    if ORDER == 2:
        flip = _pair_side(N_DIMS, N_DIMS - 1 - STAGE)
    else:
        flip = ORDER
    # Axes are passed as expressions, never bound to a local constexpr inside the loop: GPU compilers
    # reject a constexpr assigned twice ("constexpr cannot be reassigned"), the interpreter does not.
    for i in tl.static_range(STAGE):  # stride 2**(STAGE - 1 - i)
        h = _compare_swap(h, N_DIMS, N_DIMS - STAGE + i, flip)
    return h


@triton.jit
def _keep_larger_runs(h, N_DIMS: tl.constexpr, LOG_K: tl.constexpr, ORDER: tl.constexpr):
    """Of each two opposite-sorted runs of 2**LOG_K (axis N_DIMS - 1 - LOG_K), keep the elementwise larger
    (a bitonic run holding the pair's top 2**LOG_K), then sort it."""
    h = tl.max(h, axis=N_DIMS - 1 - LOG_K)
    return _bitonic_merge(h, N_DIMS - 1, LOG_K, ORDER)


@triton.jit
def topk_entries(x, ROWS_LOG2: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K largest entries of each row of x (2**ROWS_LOG2, 2**LOG_N), sorted descending: bitonic
    top-k (sort runs of k, then repeatedly keep the larger of two opposite-sorted runs and re-merge).
    """
    h = tl.reshape(x, [2] * (ROWS_LOG2 + LOG_N))
    for stage in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, ROWS_LOG2 + LOG_N, stage, 2 if stage < LOG_N else 1)
    for level in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = _keep_larger_runs(h, ROWS_LOG2 + LOG_N - (level - LOG_K - 1), LOG_K, 2 if level < LOG_N else 1)
    return tl.reshape(h, (1 << ROWS_LOG2, 1 << LOG_K))


@triton.jit
def merge_topk(best, more, BLOCK_T_LOG2: tl.constexpr, LOG_K: tl.constexpr):
    """Top 2**LOG_K of the union of two (BLOCK_T, 2**LOG_K) entry sets, sorted descending."""
    both = tl.reshape(tl.join(best, more), (1 << BLOCK_T_LOG2, 2 << LOG_K))
    return topk_entries(both, BLOCK_T_LOG2, LOG_K + 1, LOG_K)
