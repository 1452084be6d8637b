"""A launch counter, so tests can prove a Triton kernel really ran (no silent fallback to the reference)."""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

_active: list[Counter] = []


def record_launch(kernel_name: str) -> None:
    """Called by every launcher in ``memops.kernels`` just before it launches ``kernel_name``."""
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
        _active.remove(counter)
