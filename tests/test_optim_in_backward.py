"""memops.optim.apply_optimizer_in_backward: the row update fused into the backward of weighted_gather,
engram_lookup and the nn layers, on both backends (the kernels through the interpreter). It equals the unfused
optimizer stepping on the sparse grad, leaves param.grad None, allocates nothing of the table's size, steps a
shared table once per backward, checkpoints with the module (weights_only, across backends), and a backward that
fails changes nothing."""

import io
from traceback import extract_stack

import pytest
import torch
from engram_demo import ENGRAM
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import memops
from memops import optim
from memops.optim import RowwiseAdagrad, SparseAdam, apply_optimizer_in_backward, in_backward_optimizers
from memops.reference.engram import engram_hash_params, table_offsets
from memops.testing import count_launches

BACKENDS = ["reference", "triton"]
OPTIMIZERS = [SparseAdam, RowwiseAdagrad]
KERNEL = {SparseAdam: "sparse_adam_kernel", RowwiseAdagrad: "rowwise_adagrad_kernel"}


def gather_inputs(generator, rows, T=6, K=4, dtype=torch.float64):
    indices = torch.randint(0, rows, (T, K), generator=generator)
    indices[0] = indices[1]  # repeated rows, within and across tokens
    return indices, torch.randn(T, K, generator=generator, dtype=dtype)


def engram_case(rows_per_head=(211, 223), B=2, L=9, seed=0):
    """ids and hash parameters of a 2-gram and 3-gram lookup with 2 heads each; the table has sum(primes) rows."""
    multipliers, primes = engram_hash_params((5,), rows_per_head, max_ngram_size=3, n_head_per_ngram=2, seed=seed,
                                             tokenizer_vocab_size=300)[5]  # fmt: skip
    ids = torch.randint(0, 300, (B, L), generator=torch.Generator().manual_seed(seed))
    return ids, multipliers, primes, table_offsets(primes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_fused_weighted_gather_equals_the_unfused_step(backend, optimizer_class):
    """4 steps: the fused table equals the table SparseAdam / RowwiseAdagrad stepped on the sparse_coo grad, the
    weights grads agree (taken before the update), param.grad stays None and the kernel ran."""
    generator = torch.Generator().manual_seed(0)
    unfused = torch.nn.Parameter(torch.randn(50, 8, generator=generator, dtype=torch.float64))
    fused = torch.nn.Parameter(unfused.detach().clone())
    initial = fused.detach().clone()
    reference_optimizer = optimizer_class([unfused], lr=0.05, weight_decay=0.01)
    apply_optimizer_in_backward(optimizer_class, [fused], {"lr": 0.05, "weight_decay": 0.01})
    with memops.backend(backend), count_launches() as launches:
        for _ in range(4):
            indices, weights = gather_inputs(generator, 50)
            weights_a, weights_b = weights.clone().requires_grad_(), weights.clone().requires_grad_()
            memops.weighted_gather(unfused, indices, weights_a, sparse=True).sin().sum().backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad()
            memops.weighted_gather(fused, indices, weights_b).sin().sum().backward()
            assert fused.grad is None
            torch.testing.assert_close(weights_b.grad, weights_a.grad, rtol=1e-13, atol=1e-14)
    assert (launches[KERNEL[optimizer_class]] == 8) == (backend == "triton")
    assert not torch.equal(fused.detach(), initial)
    torch.testing.assert_close(fused.detach(), unfused.detach(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_fused_engram_lookup_equals_the_unfused_step(backend, optimizer_class):
    ids, multipliers, primes, offsets = engram_case()
    generator = torch.Generator().manual_seed(1)
    unfused = torch.nn.Parameter(torch.randn(int(primes.sum()), 8, generator=generator, dtype=torch.float64))
    fused = torch.nn.Parameter(unfused.detach().clone())
    reference_optimizer = optimizer_class([unfused], lr=0.05)
    apply_optimizer_in_backward(optimizer_class, [fused], {"lr": 0.05})
    with memops.backend(backend), count_launches() as launches:
        for _ in range(3):
            ids = torch.randint(0, 300, ids.shape, generator=generator)
            grad_out = None
            for table in (unfused, fused):
                out = memops.engram_lookup(ids, table, multipliers, primes, offsets, pad_id=1, context=1,
                                           sparse=table is unfused)  # fmt: skip
                grad_out = (
                    torch.randn(out.shape, generator=generator, dtype=out.dtype) if grad_out is None else grad_out
                )
                out.backward(grad_out)
            reference_optimizer.step()
            reference_optimizer.zero_grad()
            assert fused.grad is None
    assert (launches[KERNEL[optimizer_class]] == 6) == (backend == "triton")
    torch.testing.assert_close(fused.detach(), unfused.detach(), rtol=1e-13, atol=1e-14)


class LargestAllocation(TorchDispatchMode):
    """The most elements an op's new output holds in memory (a sparse tensor counts its values; an in-place op's
    output, its input's memory, is not new; nor are the Triton interpreter's host copies of a kernel's arguments,
    which stand for the device memory a GPU kernel reads in place)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_sparse]
        memory = {t.untyped_storage().data_ptr() for t in inputs}
        out = func(*args, **(kwargs or {}))
        if any("triton" in frame.filename and "interpreter" in frame.filename for frame in extract_stack(limit=4)):
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and (
                tensor.is_sparse or tensor.untyped_storage().data_ptr() not in memory
            ):
                held = tensor._values().numel() if tensor.is_sparse else tensor.untyped_storage().nbytes()
                self.largest = max(self.largest, held // (1 if tensor.is_sparse else tensor.element_size()))
        return out


@pytest.mark.parametrize(
    "backend, optimizer_class", [("reference", SparseAdam), ("triton", SparseAdam), ("triton", RowwiseAdagrad)]
)
def test_backward_and_step_allocate_nothing_of_the_table_size(backend, optimizer_class):
    """A 4,096 x 16 table read by 8 x 4 picks: in steady state (the states exist after the first step) no op of
    the fused backward + step outputs more than 1/16 of the table; the dense backward does (so the check sees
    one), and the unfused sparse path forms the picks' rows."""
    generator = torch.Generator().manual_seed(2)
    table = torch.nn.Parameter(torch.randn(4096, 16, generator=generator))
    dense = torch.nn.Parameter(table.detach().clone())
    apply_optimizer_in_backward(optimizer_class, [table], {"lr": 0.01})
    with memops.backend(backend):
        for _ in range(2):
            indices, weights = gather_inputs(generator, 4096, T=8, dtype=torch.float32)
            out = memops.weighted_gather(table, indices, weights.requires_grad_())
            with LargestAllocation() as fused_backward:
                out.sum().backward()
        out = memops.weighted_gather(dense, indices, weights)
        with LargestAllocation() as dense_backward:
            out.sum().backward()
    assert fused_backward.largest < table.numel() // 16, fused_backward.largest
    assert dense_backward.largest >= table.numel()


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_a_shared_table_steps_once_per_backward(optimizer_class):
    """Two layers reading one table (Memory Layers at Scale shares its values): one step on both reads' rows,
    as the unfused optimizer on the accumulated sparse grad; the weights grads see the table before the step."""
    generator = torch.Generator().manual_seed(3)
    unfused = torch.nn.Parameter(torch.randn(40, 8, generator=generator, dtype=torch.float64))
    fused = torch.nn.Parameter(unfused.detach().clone())
    reference_optimizer = optimizer_class([unfused], lr=0.1)
    apply_optimizer_in_backward(optimizer_class, [fused], {"lr": 0.1})
    for _ in range(3):
        (i1, w1), (i2, w2) = gather_inputs(generator, 40), gather_inputs(generator, 40)
        grads = {}
        for table in (unfused, fused):
            w1_, w2_ = w1.clone().requires_grad_(), w2.clone().requires_grad_()
            sparse = table is unfused
            hidden = memops.weighted_gather(table, i1, w1_, sparse=sparse)
            out = memops.weighted_gather(table, i2, w2_ * hidden.sum(1, keepdim=True), sparse=sparse)
            out.square().sum().backward()
            grads[sparse] = (w1_.grad, w2_.grad)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        for a, b in zip(grads[True], grads[False]):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-14)
    if optimizer_class is SparseAdam:
        assert optim.in_backward_optimizer(fused).state[fused]["step"] == 3
    torch.testing.assert_close(fused.detach(), unfused.detach(), rtol=1e-13, atol=1e-14)


def test_micro_batches_accumulate_on_the_unfused_path():
    """The documented way to accumulate over micro-batches: sparse=True reads, several backward calls (their
    sparse grads add up in param.grad), one step: equal to one backward over the whole batch."""
    generator = torch.Generator().manual_seed(4)
    accumulated = torch.nn.Parameter(torch.randn(30, 8, generator=generator, dtype=torch.float64))
    whole = torch.nn.Parameter(accumulated.detach().clone())
    optimizers = [SparseAdam([accumulated], lr=0.1), SparseAdam([whole], lr=0.1)]
    indices, weights = gather_inputs(generator, 30, T=8)
    for part in (slice(0, 3), slice(3, 8)):
        memops.weighted_gather(accumulated, indices[part], weights[part], sparse=True).sin().sum().backward()
    memops.weighted_gather(whole, indices, weights, sparse=True).sin().sum().backward()
    for optimizer in optimizers:
        optimizer.step()
    torch.testing.assert_close(accumulated.detach(), whole.detach(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("layer_name, optimizer_class", [("pkm", SparseAdam), ("engram", RowwiseAdagrad)])
def test_layers_with_the_optimizer_in_backward(layer_name, optimizer_class):
    """nn.ProductKeyMemory and nn.Engram: the fused table equals the sparse=True layer stepped by the unfused
    optimizer (Triton path), and the sparse=True Engram's table grad equals the dense one."""
    generator = torch.Generator().manual_seed(5)
    pkm = dict(n_keys=8, heads=2, topk=4, key_dim=16, value_dim=16)
    layers = {
        "pkm": lambda: [memops.nn.ProductKeyMemory(12, 8, **pkm, sparse=sparse).double() for sparse in (True, False)],
        "engram": lambda: [memops.nn.Engram(**ENGRAM, sparse=sparse).double() for sparse in (True, False)],
    }
    inputs = {
        "pkm": lambda: (torch.randn(2, 5, 12, generator=generator, dtype=torch.float64),),
        "engram": lambda: (torch.randn(2, 7, 2, 32, generator=generator, dtype=torch.float64),
                           torch.randint(0, 90, (2, 7), generator=generator)),
    }  # fmt: skip
    for name in (layer_name,):
        unfused_layer, fused_layer = layers[name]()
        fused_layer.load_state_dict(unfused_layer.state_dict())
        table_name = "values.weight" if name == "pkm" else "multi_head_embedding.embedding.weight"
        unfused, fused = (layer.get_parameter(table_name) for layer in (unfused_layer, fused_layer))
        reference_optimizer = optimizer_class([unfused], lr=0.05)
        apply_optimizer_in_backward(optimizer_class, [fused], {"lr": 0.05})
        with memops.backend("triton"), count_launches() as launches:
            for _ in range(2):
                args = inputs[name]()
                unfused_layer(*args).square().sum().backward()
                assert unfused.grad.is_sparse
                reference_optimizer.step()
                reference_optimizer.zero_grad()
                fused_layer(*args).square().sum().backward()
                assert fused.grad is None
        assert launches[KERNEL[optimizer_class]] == 4, name
        torch.testing.assert_close(fused.detach(), unfused.detach(), rtol=1e-12, atol=1e-13, msg=name)
        assert in_backward_optimizers(fused_layer) == [optim.in_backward_optimizer(fused)]
    if layer_name != "engram":
        return
    dense_layer, sparse_layer = (memops.nn.Engram(**ENGRAM, sparse=s).double() for s in (False, True))
    sparse_layer.load_state_dict(dense_layer.state_dict())
    args = inputs["engram"]()
    for layer in (dense_layer, sparse_layer):
        layer(*args).square().sum().backward()
    table = "multi_head_embedding.embedding.weight"
    torch.testing.assert_close(sparse_layer.get_parameter(table).grad.to_dense(),
                               dense_layer.get_parameter(table).grad, rtol=1e-12, atol=1e-13)  # fmt: skip


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS)
def test_checkpoint_of_module_and_optimizer_round_trips_across_backends(optimizer_class):
    """Train 3 steps on the reference, save the module's and the in-backward optimizers' state dicts (read back
    with weights_only=True), load both into a fresh layer, train 3 more steps with the kernels: equal to 6
    uninterrupted steps on the reference."""
    pkm = dict(n_keys=8, heads=2, topk=4, key_dim=16, value_dim=16)
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randn(2, 5, 12, generator=generator, dtype=torch.float64) for _ in range(6)]

    def fresh():
        torch.manual_seed(0)
        layer = memops.nn.ProductKeyMemory(12, 8, **pkm).double()
        apply_optimizer_in_backward(optimizer_class, [layer.values.weight], {"lr": 0.05})
        return layer

    uninterrupted, first = fresh(), fresh()
    with memops.backend("reference"):
        for x in batches:
            uninterrupted(x).square().sum().backward()
        for x in batches[:3]:
            first(x).square().sum().backward()
    buffer = io.BytesIO()
    torch.save({"module": first.state_dict(), "optimizers": [o.state_dict() for o in in_backward_optimizers(first)]},
               buffer)  # fmt: skip
    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = fresh()
    resumed.load_state_dict(checkpoint["module"])
    for optimizer, state in zip(in_backward_optimizers(resumed), checkpoint["optimizers"], strict=True):
        optimizer.load_state_dict(state)
    with memops.backend("triton"):
        for x in batches[3:]:
            resumed(x).square().sum().backward()
    torch.testing.assert_close(resumed.values.weight.detach(), uninterrupted.values.weight.detach(),
                               rtol=1e-12, atol=1e-13)  # fmt: skip


def test_a_failed_backward_changes_nothing():
    """A backward that raises after the gather's backward ran: the table and state stay as they were, and the
    next backward applies only its own rows."""
    generator = torch.Generator().manual_seed(7)
    table = torch.nn.Parameter(torch.randn(20, 4, generator=generator, dtype=torch.float64))
    twin = torch.nn.Parameter(table.detach().clone())
    apply_optimizer_in_backward(SparseAdam, [table], {"lr": 0.1})
    twin_optimizer = SparseAdam([twin], lr=0.1)
    before = table.detach().clone()
    indices, weights = gather_inputs(generator, 20)
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)

    def fail(grad):
        raise RuntimeError("a later node fails")

    failing_weights = weights * x
    failing_weights.register_hook(fail)
    with pytest.raises(RuntimeError, match="a later node fails"):
        memops.weighted_gather(table, indices, failing_weights).sum().backward()
    assert torch.equal(table.detach(), before) and not optim.in_backward_optimizer(table).state
    indices, weights = gather_inputs(generator, 20)
    memops.weighted_gather(table, indices, weights).sum().backward()
    memops.weighted_gather(twin, indices, weights, sparse=True).sum().backward()
    twin_optimizer.step()
    torch.testing.assert_close(table.detach(), twin.detach(), rtol=1e-13, atol=1e-14)


def test_bad_input():
    table = torch.nn.Parameter(torch.randn(10, 4))
    with pytest.raises(TypeError, match="optimizer_class must be memops.optim.SparseAdam"):
        apply_optimizer_in_backward(torch.optim.AdamW, [table], {})
    with pytest.raises(TypeError, match="optimizer_kwargs"):
        apply_optimizer_in_backward(SparseAdam, [table], None)
    with pytest.raises(ValueError, match=r"params\[1\] must be an \(R, D\) \(or \(R, ...\)\) leaf"):
        apply_optimizer_in_backward(SparseAdam, [table, table * 2], {})
    with pytest.raises(ValueError, match="lr"):
        apply_optimizer_in_backward(SparseAdam, [table], {"lr": -1.0})
    assert optim.in_backward_optimizer(table) is None  # nothing was set by the failed calls
    apply_optimizer_in_backward(SparseAdam, [table], {"lr": 0.1})
    with pytest.raises(ValueError, match="already has an optimizer"):
        apply_optimizer_in_backward(RowwiseAdagrad, [table], {})
    # a dense grad reaching the table another way is refused by the hook, naming the sparse alternatives
    with pytest.raises(TypeError, match="dense gradient.*sparse=True"):
        (table * 2).sum().backward()
    # a sparse one (nn.Embedding(sparse=True)'s) is stepped on and cleared
    before = table.detach().clone()
    torch.nn.functional.embedding(torch.tensor([3, 3, 7]), table, sparse=True).sum().backward()
    assert table.grad is None
    changed = (table.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 7]


def test_torch_compile_runs_the_fused_read_eagerly():
    """torch.compile graph-breaks around the fused read (the update still happens, equal to eager);
    fullgraph=True refuses it with the reason."""
    generator = torch.Generator().manual_seed(8)
    compiled_table = torch.nn.Parameter(torch.randn(30, 8, generator=generator))
    eager_table = torch.nn.Parameter(compiled_table.detach().clone())
    initial = eager_table.detach().clone()
    for table in (compiled_table, eager_table):
        apply_optimizer_in_backward(SparseAdam, [table], {"lr": 0.1})
    indices, weights = gather_inputs(generator, 30, dtype=torch.float32)

    def loss(table):
        return memops.weighted_gather(table, indices, weights).sin().sum()

    torch.compile(loss)(compiled_table).backward()
    loss(eager_table).backward()
    assert compiled_table.grad is None
    torch.testing.assert_close(compiled_table.detach(), eager_table.detach())
    assert not torch.equal(compiled_table.detach(), initial)

    def another_loss(table):  # (a new code object: dynamo's cache of ``loss`` would skip the fullgraph trace)
        return memops.weighted_gather(table, indices, weights).sum()

    with pytest.raises(Exception, match="runs eagerly"):
        torch.compile(another_loss, fullgraph=True)(compiled_table)
