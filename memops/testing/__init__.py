"""Helpers for testing memops kernels: relative errors against float64 references, launch counting."""

from __future__ import annotations

import torch

from memops.kernels._launch import count_launches

__all__ = [
    "TINY_MEMORY_LM",
    "count_launches",
    "relative_error",
    "assert_close_to_reference",
    "check_compiled_grads",
    "TOLERANCES",
    "kernel_names",
]

# A MemoryLMConfig of every part at the smallest sizes (the model tests and the distributed checks).
TINY_MEMORY_LM = {
    **dict(vocab_size=17, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_positions=64, prefix_length=2),
    **dict(pkm_layers=(1,), pkm_n_keys=4, pkm_heads=1, pkm_topk=2, pkm_key_dim=16),
    **dict(moe_experts=4, moe_top_k=2, moe_d_expert=16, moe_min_experts=2),
    **dict(retention_hidden=8, kv_budget=8, kv_buffer=2),
}

# Relative error ‖out − ref‖ / ‖ref‖ allowed against a float64 reference, by compute dtype.
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
    "tf32": 3e-4,
}


def kernel_names() -> set[str]:
    """Every Triton kernel memops launches: the ``*_kernel`` JIT functions of the ``memops.kernels`` modules (the
    names launchers count with ``count_launches``)."""
    import pkgutil

    import memops.kernels
    from memops.kernels import (
        attention,
        attention_lse_merge,
        engram,
        looped,
        moe,
        optim,
        product_key,
        retention,
        topk,
        value_embedding,
    )

    modules = (
        attention, attention_lse_merge, engram, looped, moe, optim, product_key, retention, topk, value_embedding,
    )  # fmt: skip
    on_disk = {info.name for info in pkgutil.iter_modules(memops.kernels.__path__) if not info.name.startswith("_")}
    unlisted = on_disk - {module.__name__.rsplit(".", 1)[1] for module in modules}
    if unlisted:  # a new kernel module must be listed above, or its kernels would go unchecked
        raise RuntimeError(f"memops.testing.kernel_names: kernel modules not listed: {sorted(unlisted)}")
    names = set()
    for module in modules:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "fn") and hasattr(value, "arg_names"):
                names.add(name)
    return names


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf if out has a NaN or Inf (so unwritten NaN-poisoned memory fails)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denominator = ref64.norm().item()
    difference = (out64 - ref64).norm().item()
    return difference / denominator if denominator > 0 else difference


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype, *, name: str = "output", scale: float = 1.0):
    """Assert ``relative_error(out, ref) <= scale * TOLERANCES[dtype]``."""
    tolerance = scale * TOLERANCES[dtype]
    error = relative_error(out, ref)
    assert error <= tolerance, f"{name}: relative error {error:.3e} > tolerance {tolerance:.1e} ({dtype})"
    return error


def check_compiled_grads(loss, tensors, *, backend: str, device: str, kernel: str) -> None:
    """``torch.compile(loss, fullgraph=True)`` on ``backend`` gives the eager gradients of every tensor, and
    launched ``kernel`` exactly when the backend is triton (aot_eager on CPU: the interpreter has no inductor)."""
    import memops

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    first = [t.detach().clone().requires_grad_() for t in tensors]
    second = [t.detach().clone().requires_grad_() for t in tensors]
    with memops.backend(backend):
        with count_launches() as launches:
            compiled(*first).backward()
        loss(*second).backward()
    assert (launches[kernel] > 0) == (backend == "triton"), dict(launches)
    for a, b in zip(first, second):
        assert_close_to_reference(a.grad, b.grad, torch.float32)
