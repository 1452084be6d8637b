"""memops.optim: SparseAdam against torch.optim.SparseAdam and RowwiseAdagrad against a float64 transcription of
FBGEMM's exact row-wise Adagrad, on both backends (the Triton kernels through the interpreter), with duplicate
rows, empty steps and several param groups; state_dict round trips; bad input."""

import copy
import io
import math

import pytest
import torch

import memops
from memops.optim import RowwiseAdagrad, SparseAdam
from memops.testing import count_launches

BACKENDS = ["reference", "triton"]


def sparse_grad(rows: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    return torch.sparse_coo_tensor(rows.reshape(1, -1), values, shape, check_invariants=False)


def steps(generator, tables, n_steps, *, empty_at=(3, 11)):
    """(step, [grad per table]) with repeated rows, and steps where a table's gradient names no row."""
    for step in range(n_steps):
        grads = []
        for table in tables:
            n = 0 if step in empty_at else 24
            rows = torch.randint(0, table.shape[0], (n,), generator=generator)
            rows[: n // 3] = rows[n // 3 : 2 * (n // 3)]  # a third of the entries repeat another's row
            values = torch.randn(n, table.shape[1], generator=generator, dtype=table.dtype)
            grads.append(sparse_grad(rows, values, table.shape))
        yield step, grads


def two_groups(dtype):
    generator = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(30, 16, generator=generator, dtype=dtype))
    b = torch.nn.Parameter(torch.randn(11, 40, generator=generator, dtype=dtype))
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_adam_equals_torch_sparse_adam(backend):
    """20 steps, two param groups with their own lr and betas, repeated rows and empty steps: equal to
    torch.optim.SparseAdam to fp64 rounding (weight_decay 0, its only difference)."""
    ours, theirs = two_groups(torch.float64), [p.detach().clone().requires_grad_() for p in two_groups(torch.float64)]
    groups = lambda params: [dict(params=[params[0]]), dict(params=[params[1]], lr=0.05, betas=(0.8, 0.99))]
    optimizer = SparseAdam(groups(ours), lr=0.01)
    reference = torch.optim.SparseAdam(groups(theirs), lr=0.01)
    with memops.backend(backend), count_launches() as launches:
        for _, grads in steps(torch.Generator().manual_seed(1), ours, 20):
            for p, q, g in zip(ours, theirs, grads):
                p.grad, q.grad = g, g.clone()
            optimizer.step()
            reference.step()
    assert (launches["sparse_adam_kernel"] > 0) == (backend == "triton")
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=1e-13, atol=1e-14), (p - q).abs().max()
        assert optimizer.state[p]["step"] == 20


def transcribed_rowwise_adagrad(table, sum_sq, rows, values, lr, eps, weight_decay):
    """FBGEMM's exact row-wise Adagrad, one row at a time in float64 (its CPU kernel, weight decay mode L2)."""
    for row in sorted(set(rows.tolist())):
        grad = values[rows == row].sum(0)
        decayed = grad + weight_decay * table[row]
        sum_sq[row] += (decayed * decayed).sum() / table.shape[1]
        multiplier = lr / (math.sqrt(sum_sq[row]) + eps)
        table[row] = (1.0 - multiplier * weight_decay) * table[row] - multiplier * grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_rowwise_adagrad_equals_its_transcription(backend, weight_decay):
    ours = two_groups(torch.float64)
    tables = [p.detach().clone() for p in ours]
    sums = [torch.zeros(p.shape[0], dtype=torch.float64) for p in ours]
    optimizer = RowwiseAdagrad([dict(params=[ours[0]]), dict(params=[ours[1]], lr=0.3)], lr=0.1,
                               weight_decay=weight_decay)  # fmt: skip
    with memops.backend(backend), count_launches() as launches:
        for _, grads in steps(torch.Generator().manual_seed(2), ours, 20):
            for p, table, total, g, lr in zip(ours, tables, sums, grads, (0.1, 0.3)):
                p.grad = g
                transcribed_rowwise_adagrad(table, total, g._indices()[0], g._values(), lr, 1e-8, weight_decay)
            optimizer.step()
    assert (launches["rowwise_adagrad_kernel"] > 0) == (backend == "triton")
    for p, table, total in zip(ours, tables, sums):
        assert torch.allclose(p, table, rtol=1e-13, atol=1e-14), (p - table).abs().max()
        assert torch.allclose(optimizer.state[p]["sum_sq"], total, rtol=1e-13, atol=0)


@pytest.mark.parametrize("optimizer_class", [SparseAdam, RowwiseAdagrad])
def test_fp32_tables_agree_across_backends(optimizer_class):
    """fp32 tables, weight decay (and maximize for Adam): the kernels equal the reference to fp32 rounding (the
    duplicates are summed in another order)."""
    params = {backend: [p.float().detach().clone().requires_grad_() for p in two_groups(torch.float64)]
              for backend in BACKENDS}  # fmt: skip
    extra = dict(maximize=True) if optimizer_class is SparseAdam else {}
    optimizers = {b: optimizer_class(params[b], lr=0.02, weight_decay=0.1, **extra) for b in BACKENDS}
    for _, grads in steps(torch.Generator().manual_seed(3), params["reference"], 8):
        for backend in BACKENDS:
            for p, g in zip(params[backend], grads):
                p.grad = g.clone()
            with memops.backend(backend):
                optimizers[backend].step()
    for p, q in zip(params["reference"], params["triton"]):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), (p - q).abs().max()


@pytest.mark.parametrize("optimizer_class", [SparseAdam, RowwiseAdagrad])
def test_state_dict_round_trips_and_continues(optimizer_class):
    """Save after 5 steps (torch.save, loaded with weights_only=True), load into a fresh optimizer over copies
    of the tables, possibly on the other backend: the next 5 steps match."""
    params = list(two_groups(torch.float64))
    optimizer = optimizer_class(params, lr=0.05)
    generator = torch.Generator().manual_seed(4)
    schedule = list(steps(generator, params, 10))
    for _, grads in schedule[:5]:
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    copies = [p.detach().clone().requires_grad_() for p in params]
    restored = optimizer_class(copies, lr=0.05)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for step, grads in schedule[5:]:
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g, g.clone()
        with memops.backend("reference"):
            optimizer.step()
        with memops.backend("triton" if step % 2 else "reference"):
            restored.step()
    for p, q in zip(params, copies):
        assert torch.allclose(p, q, rtol=1e-13, atol=1e-14)


def test_zero_grad_and_steps_without_grads():
    a, b = two_groups(torch.float64)
    before = b.detach().clone()
    optimizer = SparseAdam([a, b])
    a.grad = sparse_grad(torch.tensor([1, 1]), torch.ones(2, 16, dtype=torch.float64), a.shape)
    optimizer.step()
    assert "step" not in optimizer.state[b] and torch.equal(b, before)
    optimizer.zero_grad()
    assert a.grad is None
    optimizer.step()  # nothing to do: the step count stays
    assert optimizer.state[a]["step"] == 1


def test_bad_input_is_refused_before_anything_changes():
    a, _ = two_groups(torch.float64)
    before = a.detach().clone()
    for optimizer_class in (SparseAdam, RowwiseAdagrad):
        optimizer = optimizer_class([a])
        a.grad = torch.ones_like(a)
        with pytest.raises(TypeError, match="dense gradient.*sparse=True"):
            optimizer.step()
        a.grad = torch.sparse_coo_tensor(
            torch.tensor([[0], [1]]), torch.ones(1, dtype=a.dtype), a.shape, check_invariants=False
        )
        with pytest.raises(ValueError, match="sparse_dim 2"):
            optimizer.step()
        assert torch.equal(a, before) and not optimizer.state[a]
    with pytest.raises(ValueError, match="lr"):
        SparseAdam([a], lr=-1.0)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        SparseAdam([a], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        SparseAdam([a], eps=0.0)
    with pytest.raises(TypeError, match="maximize"):
        SparseAdam([a], maximize=1)
    with pytest.raises(ValueError, match="weight_decay"):
        RowwiseAdagrad([a], weight_decay=-0.1)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        RowwiseAdagrad([a], stochastic_rounding="yes")


def test_deepcopy_of_an_optimizer_is_independent():
    a, _ = two_groups(torch.float64)
    optimizer = RowwiseAdagrad([a])
    a.grad = sparse_grad(torch.tensor([2, 2, 5]), torch.ones(3, 16, dtype=torch.float64), a.shape)
    optimizer.step()
    clone = copy.deepcopy(optimizer)
    assert clone.state_dict()["state"][0]["sum_sq"].data_ptr() != optimizer.state[a]["sum_sq"].data_ptr()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("optimizer_class", [SparseAdam, RowwiseAdagrad])
def test_low_precision_tables_on_cuda(optimizer_class, dtype):
    """bf16 / fp16 tables: the kernel computes in fp32 and rounds once, as the reference does; the tables agree
    to the dtype's rounding and the fp32 states closely."""
    generator = torch.Generator(device="cuda").manual_seed(5)
    tables = {b: torch.randn(500, 96, device="cuda", generator=torch.Generator(device="cuda").manual_seed(6))
              .to(dtype).requires_grad_() for b in BACKENDS}  # fmt: skip
    optimizers = {b: optimizer_class([tables[b]], lr=0.01, weight_decay=0.01) for b in BACKENDS}
    for _ in range(6):
        rows = torch.randint(0, 500, (700,), device="cuda", generator=generator)
        values = torch.randn(700, 96, device="cuda", generator=generator).to(dtype)
        for backend in BACKENDS:
            tables[backend].grad = sparse_grad(rows, values, tables[backend].shape)
            with memops.backend(backend):
                optimizers[backend].step()
    ulp = torch.finfo(dtype).eps
    a, b = tables["reference"].float(), tables["triton"].float()
    assert ((a - b).abs() <= 2 * ulp * a.abs().clamp_min(1e-3)).float().mean() > 0.99, (a - b).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_class", [SparseAdam, RowwiseAdagrad])
def test_stochastic_rounding_is_unbiased(backend, optimizer_class):
    """A bf16 row of 10,000 ones whose exact update is +0.3 of a unit in the last place: with stochastic
    rounding the rounded row's mean lands within 3 sigma of the exact value (sigma = ulp * sqrt(p (1 - p) / N));
    rounded to nearest it stays at 1 (the bias the option removes)."""
    D, ulp, p = 10_000, 2.0**-7, 0.3
    means = {}
    for stochastic in (True, False):
        table = torch.nn.Parameter(torch.ones(3, D, dtype=torch.bfloat16))
        # Adam's first step moves by lr * sign(-g) (to 1e-8); row-wise Adagrad's by lr * g / |g| for a constant g
        optimizer = optimizer_class([table], lr=p * ulp, eps=1e-12, stochastic_rounding=stochastic)
        table.grad = sparse_grad(torch.tensor([1]), -torch.ones(1, D, dtype=torch.bfloat16), table.shape)
        torch.manual_seed(11)
        with memops.backend(backend):
            optimizer.step()
        row = table.detach()[1].double()
        assert set(row.unique().tolist()) <= {1.0, 1.0 + ulp}
        means[stochastic] = row.mean().item()
    sigma = ulp * math.sqrt(p * (1 - p) / D)
    assert abs(means[True] - (1 + p * ulp)) <= 3 * sigma, (means[True], 1 + p * ulp, sigma)
    assert means[False] == 1.0
