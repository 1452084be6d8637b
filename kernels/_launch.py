"""Host-side launch plumbing shared by every launcher in this package (torch only, no triton import).

- A launch counter, so tests can prove that a Triton kernel really ran (no silent fallback to the
  reference); ``memops.testing.count_launches`` re-exports it.
- The GPU architecture and dtype class that launch tables are keyed by, and a way to pin the architecture
  for ahead-of-time compiles on machines without a GPU (``memops.tools.gpu_check``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch

_active: list[Counter] = []


def record_launch(kernel_name: str) -> None:
    """Called by every launcher just before it launches ``kernel_name``."""
    for counter in _active:
        counter[kernel_name] += 1


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    """Count Triton kernel launches made inside the block, by kernel name.

    >>> with count_launches() as launches:
    ...     memops.weighted_gather(values, indices, weights)
    >>> launches["weighted_gather_fwd_kernel"]
    1
    """
    counter: Counter = Counter()
    _active.append(counter)
    try:
        yield counter
    finally:
        # by identity: Counters compare by content, so remove() could drop an equal outer counter instead
        _active[:] = [active for active in _active if active is not counter]


def dtype_class(dtype: torch.dtype) -> str:
    """The dtype class that launch tables are keyed by: "16" (bf16, fp16), "tf32" (fp32 with
    torch.get_float32_matmul_precision() "high" or "medium") or "fp32" (fp32 at "highest": ieee dots)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "16"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


# Launch configurations are chosen per GPU architecture (compute capability as 10 * major + minor: 80 for
# A100, 90 for H100/H200). ``memops.tools.gpu_check`` compiles kernels ahead of time on machines without a GPU, so it
# can pin the architecture the launchers choose their configs for.
_pinned_arch: list[int] = []


def launch_arch(device: torch.device) -> int | None:
    """The architecture whose launch configs apply to kernels on ``device``: the CUDA device's compute
    capability (e.g. 90), the one pinned by :func:`configs_for_arch`, or None (the interpreter)."""
    if _pinned_arch:
        return _pinned_arch[-1]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return None


@contextlib.contextmanager
def configs_for_arch(arch: int) -> Iterator[None]:
    """Make every launcher pick the configs of GPU architecture ``arch`` (for ahead-of-time compiles)."""
    _pinned_arch.append(int(arch))
    try:
        yield
    finally:
        _pinned_arch.pop()
