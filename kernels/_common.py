"""Helpers shared by the kernel files: jit constants, and the host-side choice of accumulator dtype and dot
precision that every launcher makes the same way.

- ``to_log2`` and ``to_ln`` convert between natural-log and base-2 units: the kernels keep logits and
  log-sum-exps in base 2 (``exp2(to_log2(x)) == exp(x)``), the fast form on GPUs. They are jit functions,
  not module-level constexprs (Triton releases differ in how jit code may read module-level globals), and
  their literals take the operand's dtype, so fp64 stays exact.
- fp64 inputs keep fp64 math, so fp64 gradcheck runs on the Triton path; everything else accumulates in fp32.
- fp32 dots follow torch's matmul setting: full fp32 ("ieee") by default, tf32 after
  ``torch.set_float32_matmul_precision("high")``. 16-bit dots accumulate in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e), for scales computed by launchers


@triton.jit
def to_log2(x):
    """x in natural-log units, in base-2 units: x * log2(e)."""
    return x * 1.4426950408889634


@triton.jit
def to_ln(x):
    """x in base-2 units, in natural-log units: x * ln(2)."""
    return x * 0.6931471805599453


@triton.jit
def finite_log_beta(log_beta):
    """A retention log_beta (<= 0) with -inf (beta = 0) as -1e30: a key's own position then decays by
    0 * -1e30 = 0 (beta**0 = 1, where 0 * -inf is NaN) and any later one by exp(<= -1e30) = 0. NaN stays NaN.
    Apply it to the (BLOCK_N,) vector, not the tile."""
    return tl.where(log_beta == float("-inf"), -1e30, log_beta)


def accumulator(*tensors: torch.Tensor):
    """tl.float64 when any input is fp64, else tl.float32."""
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def accumulator_torch_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The torch dtype of :func:`accumulator`."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dot_precision(t: torch.Tensor) -> str:
    """The ``input_precision`` of tl.dot for operands of t's dtype: "tf32" for fp32 under matmul precision
    "high" or "medium", "ieee" otherwise (fp32 at "highest", fp64; 16-bit dots ignore it)."""
    if t.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
