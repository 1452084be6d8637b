"""The one question both the reference and the argument checks ask of a tensor: may its data be read on the
host? Below every other module of memops (torch only), so the reference and memops._validation share it."""

from __future__ import annotations

import torch


def can_read_values(t: torch.Tensor) -> bool:
    """Whether a value check (a reduction and a host sync) may look at t's data: not while torch.compile or
    FakeTensor tracing runs, and not for meta tensors, which have no data (those skip the check)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)
