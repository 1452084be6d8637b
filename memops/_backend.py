"""Backend selection: which implementation a public op runs.

``"triton"`` runs the kernels in ``memops.kernels``; ``"reference"`` runs ``memops.reference``;
``"auto"`` (the default) picks triton for CUDA tensors when triton imports, reference otherwise.

The choice comes from, in order: the innermost ``memops.backend(name)`` block in this thread, the
``MEMOPS_BACKEND`` environment variable, then ``"auto"``. The override lives in a ``threading.local``
rather than a ``ContextVar`` because torch.compile traces (and guards on) the former but graph-breaks
on ``ContextVar.get``; a compiled function therefore recompiles when the block's backend changes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import torch

# The kernel layer owns its launch plumbing; re-exported here for the ops and tests that pin an architecture.
from memops.kernels._launch import configs_for_arch, launch_arch  # noqa: F401

BACKENDS = ("auto", "triton", "reference")


class _Overrides(threading.local):
    def __init__(self) -> None:
        self.stack: list[str] = []


_overrides = _Overrides()


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend name in force here: ``"auto"``, ``"triton"`` or ``"reference"``."""
    if _overrides.stack:
        return _overrides.stack[-1]
    return _validate(os.environ.get("MEMOPS_BACKEND", "auto").strip().lower() or "auto", "MEMOPS_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops called inside the block on backend ``name`` (auto|triton|reference).

    Per thread; nests; restores the previous choice on exit, also when the block raises.
    """
    _overrides.stack.append(_validate(name, "memops.backend"))
    try:
        yield
    finally:
        _overrides.stack.pop()


def _import_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an ImportError, or a broken install raising something else at import
        return False
    return True


# Probed once at import (about 0.15 s): a plain constant is what torch.compile traces best.
TRITON_AVAILABLE = _import_triton()


def triton_available() -> bool:
    return TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(tensor: torch.Tensor, *, reference_instead: Callable[[], bool] | None = None) -> str:
    """The concrete backend (``"triton"`` or ``"reference"``) for an op whose main input is ``tensor``.

    ``reference_instead``: the op family's own policy, asked only when "auto" would launch the kernels; True
    runs the reference instead (the kernels have no clean launch config for these inputs on this GPU, for
    example). An explicit backend "triton" always launches the kernels."""
    name = get_backend()
    if name == "auto":
        if not (tensor.is_cuda and triton_available()):
            return "reference"
        return "reference" if reference_instead is not None and reference_instead() else "triton"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(
                "memops backend 'triton' was requested but triton cannot be imported; "
                "install triton or use memops.backend('reference')"
            )
        if not (tensor.is_cuda or interpreter_enabled()):
            raise RuntimeError(
                f"memops backend 'triton' needs CUDA tensors (got device {tensor.device}); "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
            )
    return name
