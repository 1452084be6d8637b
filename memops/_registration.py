"""One way to put a kernel behind ``torch.library``: the forward custom op, its fake, the backward custom op,
setup_context and register_autograd, built from a compact spec.

Every custom op in memops is the Triton path of its public function; the public function calls
``memops.reference`` directly for backend "reference" (differentiable by autograd), so no custom op takes a
``backend`` argument. An op family's file then reads::

    def _fwd(q, k, v, ..., causal, scale):
        from memops.kernels import attention as attention_kernels   # where it launches: triton stays optional

        return attention_kernels.memory_attention_fwd(...)

    def _bwd(grad_out, grad_lse, q, k, v, ..., out, lse, causal, scale, deterministic):
        return dq, dk, ...                              # None for an absent input's grad

    _op = custom_op("memory_attention", _fwd, "(Tensor q, ..., float scale) -> (Tensor out, Tensor lse)",
                    fake=attention_outputs_like,
                    backward=backward_op("memory_attention_backward", _bwd, "(Tensor grad_out, ...) -> (...)",
                                         grads=("q", "k", ...)))

The schema (torch.library's, with named returns) is the op's typed signature, so the Python functions
behind it stay short.

The backward op's parameters are wired **by name**: ``grad_<output>`` is the grad of that forward output, a
forward input's or output's name is its saved value, ``deterministic`` is
``torch.are_deterministic_algorithms_enabled()`` (or'ed with the op's own ``deterministic`` input where it
has one: one name, one idea) and ``<input>_grad`` is ``ctx.needs_input_grad`` of that
input. It returns one grad per name in ``grads``: a custom op returns tensors only, so a None travels as an
empty placeholder (of the input's dtype, or of the first input's where the input itself is None) and comes
back to autograd as None, as does the grad of any input that needs none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

# ---------------------------------------------------------------------------------------------------------
# Layout guards for kernel inputs


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with stride 1 along its last dim (the kernels' only layout requirement for most operands)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t in the contiguous layout; clone(), unlike contiguous(), also traces on fake CUDA tensors."""
    return t if t is None or t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def contiguous(*tensors: torch.Tensor | None) -> tuple:
    """Each tensor contiguous (None stays None): for kernels that address operands as dense row-major."""
    return tuple(dense(t) for t in tensors)


def empty_like_dense(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------
# The spec


def _parse(name: str, schema: str) -> tuple[list[str], set[str], list[str]]:
    """(argument names, the tensor ones, return names) of a torch.library schema string."""
    parsed = torch._C.parse_schema(f"memops::{name}{schema}")
    names = [a.name for a in parsed.arguments]
    tensors = {a.name for a in parsed.arguments if str(a.type) in ("Tensor", "Optional[Tensor]")}
    return names, tensors, [r.name for r in parsed.returns]


def _placeholder_grads(values: dict, grads: Sequence[str], first: torch.Tensor, results) -> tuple:
    """The backward op's results with every None as an empty placeholder, and every grad contiguous."""
    out = []
    for name, grad in zip(grads, results):
        if grad is None or values.get(f"{name}_grad", True) is False:
            like = values.get(name)
            out.append((like if like is not None else first).new_empty(0))
        else:
            out.append(dense(grad))
    return tuple(out)


def backward_op(name: str, impl: Callable, schema: str, *, grads: Sequence[str]):
    """The custom op ``memops::<name>`` with ``schema`` that computes the grads of the forward inputs named
    ``grads`` (see the module docstring for how its parameters are wired), with a fake derived from them."""
    params, tensors, _ = _parse(name, schema)
    missing = [g for g in grads if g not in params]
    if missing:
        raise TypeError(f"backward_op {name}: the schema must take the inputs it differentiates, missing {missing}")
    first_tensor = next(p for p in params if p in tensors and not p.startswith("grad_"))

    def finish(args: tuple, results) -> tuple | torch.Tensor:
        values = dict(zip(params, args))
        results = results if isinstance(results, tuple) else (results,)
        grads_out = _placeholder_grads(values, grads, values[first_tensor], results)
        return grads_out if len(grads_out) > 1 else grads_out[0]

    def real(*args):
        return finish(args, impl(*args))

    def fake(*args):
        values = dict(zip(params, args))
        like = [values[g] if values.get(f"{g}_grad", True) is not False else None for g in grads]
        return finish(args, tuple(None if t is None else empty_like_dense(t) for t in like))

    op = torch.library.custom_op(f"memops::{name}", real, mutates_args=(), schema=schema)
    op.register_fake(fake)
    op._memops_spec = SimpleNamespace(params=params, grads=tuple(grads))
    return op


def call_with(op, values: dict, **overrides):
    """Call a :func:`backward_op` with each parameter taken by name from ``overrides``, else ``values``."""
    return op(*(overrides[p] if p in overrides else values[p] for p in op._memops_spec.params))


def custom_op(
    name: str,
    impl: Callable,
    schema: str,
    *,
    fake: Callable,
    backward=None,
    grads: Sequence[str] | None = None,
    save: Sequence[str] | None = None,
    materialize_grads: bool = True,
):
    """The custom op ``memops::<name>`` with ``schema`` (torch.library's, with named returns), running
    ``impl``, with ``fake`` for tracing, and autograd when ``backward`` is given.

    ``backward`` is a :func:`backward_op` (wired by name; its ``grads`` say which inputs get grads), or a
    function ``backward(saved, *output_grads)`` returning one grad per name in ``grads``, where ``saved`` holds
    the inputs and outputs named in ``save`` (default: all of them) and ``saved.deterministic``.
    ``materialize_grads=False``: an unused output's grad arrives as None.
    """
    names, tensor_inputs, outputs = _parse(name, schema)
    op = torch.library.custom_op(f"memops::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    if backward is None:
        return op
    if isinstance(backward, torch._library.custom_ops.CustomOpDef):
        spec = backward._memops_spec
        grads = spec.grads
        sources = {}
        for p in spec.params:
            if p.startswith("grad_") and p[5:] in outputs:
                sources[p] = ("grad", outputs.index(p[5:]))
            elif p == "deterministic":  # the op's own flag where it takes one, or'ed with the global switch
                sources[p] = ("deterministic", p if p in names else None)
            elif p in names or p in outputs:
                sources[p] = ("saved", p)
            elif p.endswith("_grad") and p[:-5] in names:
                sources[p] = ("needs_grad", names.index(p[:-5]))
            else:
                raise TypeError(f"custom_op {name}: backward parameter {p!r} names no output grad, input or output")
        save = [source for kind, source in sources.values() if kind in ("saved", "deterministic") and source]
        backward_op_def = backward
    elif grads is None:
        raise TypeError(f"custom_op {name}: a backward function needs grads=")
    else:
        backward_op_def = None
        save = [*names, *outputs] if save is None else save
    grads = tuple(grads)
    unknown = [g for g in grads if g not in names]
    if unknown:
        raise TypeError(f"custom_op {name}: grads {unknown} are not inputs of {name}")
    tensors = [s for s in save if s in outputs or s in tensor_inputs]
    attrs = [s for s in save if s not in tensors]

    def setup_context(ctx, inputs, output):
        values = dict(zip(names, inputs))
        values.update(zip(outputs, output if isinstance(output, tuple) else (output,)))
        ctx.save_for_backward(*(values[t] for t in tensors))
        ctx.memops_attrs = {a: values[a] for a in attrs}
        ctx.memops_given = [n in grads and values[n] is not None for n in names]
        if not materialize_grads:
            ctx.set_materialize_grads(False)

    def backward_fn(ctx, *output_grads):
        saved = dict(zip(tensors, ctx.saved_tensors), **ctx.memops_attrs)
        deterministic = torch.are_deterministic_algorithms_enabled()
        if backward_op_def is not None:
            args = []
            for kind, source in sources.values():
                if kind == "grad":
                    args.append(output_grads[source])
                elif kind == "saved":
                    args.append(saved[source])
                elif kind == "deterministic":
                    args.append(deterministic or (source is not None and bool(saved[source])))
                else:
                    args.append(ctx.needs_input_grad[source])
            results = backward_op_def(*args)
        else:
            # the global switch, or'ed with the op's own deterministic input where it has one
            saved["deterministic"] = deterministic or bool(saved.get("deterministic", False))
            results = backward(SimpleNamespace(**saved), *output_grads)
        results = results if isinstance(results, tuple) else (results,)
        by_name = dict(zip(grads, results))
        return tuple(
            by_name[n] if given and ctx.needs_input_grad[i] else None
            for i, (n, given) in enumerate(zip(names, ctx.memops_given))
        )

    op.register_autograd(backward_fn, setup_context=setup_context)
    return op
