"""memops.value_embedding_mix against the float64 reference: the mixed values and the grads of v, gates and the
bank (atomic and deterministic), duplicate ids within a batch and across two layers sharing the bank, M = 1 and
M = 32, Dh = 64 and 128, bf16 / fp16 banks; opcheck, torch.compile(fullgraph=True), meta tensors, bad input."""

import pytest
import torch

import memops
from memops import reference
from memops.testing import assert_close_to_reference, check_compiled_grads, count_launches

BACKENDS = ["reference", "triton"]


def mix_case(device, *, B=2, N=5, H=3, Dh=64, M=4, V=11, dtype=torch.float32, seed=0):
    """(v, gates, ids, bank): gates around 1 (MoVE's 2 * sigmoid at init), ids with repeats in and across rows."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(B, N, H, Dh, generator=generator)
    gates = 2 * torch.sigmoid(torch.randn(B, N, H, M + 1, generator=generator))
    ids = torch.randint(0, V, (B, N), generator=generator)
    ids[0, : N // 2] = ids[1, : N // 2] = 3  # one id read by several tokens of both rows
    bank = torch.randn(V, M, H * Dh, generator=generator)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (v, gates, ids, bank)]


def reference_grads(v, gates, ids, bank, grad_out):
    """The output and the grads of v, gates and bank in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (v, gates, bank)]
    out = reference.value_embedding_mix(leaves[0], leaves[1], ids, leaves[2])
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


# every shape in fp32; bf16 at M = 4 and 32; fp16 and fp64 once each
CASES = [
    (torch.float32, 1, 64), (torch.float32, 4, 128), (torch.float32, 32, 64), (torch.bfloat16, 4, 128),
    (torch.bfloat16, 32, 64), (torch.float16, 1, 64), (torch.float64, 4, 128),
]  # fmt: skip


# the deterministic bank grad on fp32's shapes and bf16 M = 32; the atomic one everywhere
RUNS = [(*case, False) for case in CASES] + [(*case, True) for case in CASES[:3] + CASES[4:5]]


RUN_IDS = [f"{str(d)[6:]}-M{m}-D{h}-{'segment' if det else 'atomic'}" for d, m, h, det in RUNS]


@pytest.mark.parametrize("dtype, M, Dh, deterministic", RUNS, ids=RUN_IDS)
def test_mix_matches_float64(dtype, deterministic, M, Dh, device, poison_empty):
    v, gates, ids, bank = mix_case(device, M=M, Dh=Dh, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (v, gates, bank)]
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with memops.backend("triton"), count_launches() as launches:
        out = memops.value_embedding_mix(leaves[0], leaves[1], ids, leaves[2], deterministic=deterministic)
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert launches["value_embedding_mix_fwd_kernel"] == 1 and launches["weighted_gather_bwd_kernel"] == 1
    if deterministic:
        assert launches["values_grad_segment_kernel"] == 1
    ref_out, ref_grads = reference_grads(v, gates, ids, bank, grad_out)
    assert out.dtype == dtype and out.shape == v.shape
    assert_close_to_reference(out, ref_out, dtype)
    for name, grad, ref in zip(("v", "gates", "bank"), grads, ref_grads):
        assert grad.dtype == dtype
        # (the bank grad of M = 32 sums 32 slots' worth of tokens per row: a looser bound in 16-bit)
        assert_close_to_reference(grad, ref, dtype, name=f"grad {name}", scale=2.0)


def test_deterministic_bank_grad_is_bit_identical(device):
    v, gates, ids, bank = mix_case(device, N=16, V=5, M=2)
    bank = bank.requires_grad_()
    grad_out = torch.randn_like(v)
    results = []
    with memops.backend("triton"):
        for _ in range(2):
            (grad,) = torch.autograd.grad(memops.value_embedding_mix(v, gates, ids, bank, deterministic=True), bank,
                                          grad_out)  # fmt: skip
            results.append(grad)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_layers_sharing_the_bank_sum_their_grads(backend, device):
    """Two layers read one bank (MoVE's global bank) with different values and gates: its grad equals the
    float64 sum of both layers' contributions."""
    v1, g1, ids, bank = mix_case(device, seed=2)
    v2, g2, _, _ = mix_case(device, seed=3)
    bank = bank.requires_grad_()
    with memops.backend(backend):
        hidden = memops.value_embedding_mix(v1, g1, ids, bank)
        out = memops.value_embedding_mix(v2 + hidden, g2, ids, bank)
        out.square().sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (v1, g1, v2, g2, bank)]
    ref_hidden = reference.value_embedding_mix(leaves[0], leaves[1], ids, leaves[4])
    reference.value_embedding_mix(leaves[2] + ref_hidden, leaves[3], ids, leaves[4]).square().sum().backward()
    assert_close_to_reference(bank.grad, leaves[4].grad, torch.float32, name="shared bank grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_value_embedding_is_v_plus_the_row(backend, device):
    """M = 1 with every gate 1 (a plain ``v + embedding``, LaVE's base form): v + bank[ids]."""
    v, gates, ids, bank = mix_case(device, M=1)
    with memops.backend(backend):
        out = memops.value_embedding_mix(v, torch.ones_like(gates), ids, bank)
    expected = v + bank[ids].reshape(v.shape)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_opcheck(device):
    v, gates, ids, bank = mix_case(device, M=2, Dh=16)
    args = (v.requires_grad_(), gates.requires_grad_(), ids, bank.requires_grad_())
    torch.library.opcheck(torch.ops.memops.value_embedding_mix.default, (*args, False))
    torch.library.opcheck(torch.ops.memops.value_embedding_mix.default, (*args, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    v, gates, ids, bank = mix_case(device, M=2, Dh=16)

    def loss(v, gates, bank):
        return memops.value_embedding_mix(v, gates, ids, bank, check_ids=False).sin().sum()

    check_compiled_grads(loss, [v, gates, bank], backend=backend, device=device,
                         kernel="value_embedding_mix_fwd_kernel")  # fmt: skip


def test_meta_tensors_trace():
    v, gates, ids, bank = (t.to("meta") for t in mix_case("cpu", M=2, Dh=16))
    with memops.backend("triton"):
        out = memops.value_embedding_mix(v, gates, ids, bank)
    assert out.shape == v.shape and out.device.type == "meta"


def test_bad_input():
    v, gates, ids, bank = mix_case("cpu", M=2, Dh=16)
    mix = memops.value_embedding_mix
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 11\)"):
        mix(v, gates, torch.full_like(ids, 11), bank)
    with pytest.raises(IndexError, match="ids must lie"):
        mix(v, gates, torch.full_like(ids, -1), bank)
    with pytest.raises(ValueError, match=r"gates must be \(B, N, H, M \+ 1\) = \(2, 5, 3, 3\)"):
        mix(v, gates[..., :2], ids, bank)
    with pytest.raises(ValueError, match=r"bank must be \(V, M, H \* Dh\) = \(V, M, 48\)"):
        mix(v, gates, ids, bank[..., :40])
    with pytest.raises(ValueError, match=r"v must be \(B, N, H, Dh\)"):
        mix(v[0], gates, ids, bank)
    with pytest.raises(ValueError, match=r"ids must be \(B, N\) = \(2, 5\)"):
        mix(v, gates, ids[:, :3], bank)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        mix(v, gates, ids.float(), bank)
    with pytest.raises(TypeError, match="bank must be floating point"):
        mix(v, gates, ids, bank.long())
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        mix(v, gates, ids, bank, deterministic=1)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        mix(None, gates, ids, bank)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 32])
def test_d20_heads_on_cuda(M):
    """MoVE's D20 heads (10 of 128) in bf16 on the GPU, compiled kernels: the output and every grad against
    float64."""
    v, gates, ids, bank = mix_case("cuda", B=2, N=512, H=10, Dh=128, M=M, V=1000, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (v, gates, bank)]
    grad_out = torch.randn_like(v)
    out = memops.value_embedding_mix(leaves[0], leaves[1], ids, leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_out, ref_grads = reference_grads(v, gates, ids, bank, grad_out)
    assert_close_to_reference(out, ref_out, torch.bfloat16)
    for name, grad, ref in zip(("v", "gates", "bank"), grads, ref_grads):
        assert_close_to_reference(grad, ref, torch.bfloat16, name=f"grad {name}", scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_bank_grad_equals_the_dense_one(backend, device):
    v, gates, ids, bank = mix_case(device, M=3, Dh=16)
    dense = [t.clone().requires_grad_() for t in (v, gates, bank)]
    sparse = [t.clone().requires_grad_() for t in (v, gates, bank)]
    grad_out = torch.randn_like(v)
    with memops.backend(backend):
        memops.value_embedding_mix(dense[0], dense[1], ids, dense[2]).backward(grad_out)
        out = memops.value_embedding_mix(sparse[0], sparse[1], ids, sparse[2], sparse=True)
        out.backward(grad_out)
    assert sparse[2].grad.is_sparse and sparse[2].grad._nnz() == ids.numel()
    for a, b in zip(sparse, dense):
        grad = a.grad.to_dense() if a.grad.is_sparse else a.grad
        torch.testing.assert_close(grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_with_the_optimizer_in_backward(backend, device):
    """A (V, M, H * Dh) bank (rows of M * H * Dh) with SparseAdam fused into the backward equals SparseAdam on
    the sparse grad after 3 steps; the bank's grad stays None."""
    from memops.optim import SparseAdam, apply_optimizer_in_backward

    _, _, _, bank = mix_case(device, M=2, Dh=16, dtype=torch.float64)
    unfused, fused = torch.nn.Parameter(bank.clone()), torch.nn.Parameter(bank.clone())
    optimizer = SparseAdam([unfused], lr=0.05)
    apply_optimizer_in_backward(SparseAdam, [fused], {"lr": 0.05})
    with memops.backend(backend):
        for seed in range(3):
            v, gates, ids, _ = mix_case(device, M=2, Dh=16, dtype=torch.float64, seed=seed + 10)
            memops.value_embedding_mix(v, gates, ids, unfused, sparse=True).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            memops.value_embedding_mix(v, gates, ids, fused).square().sum().backward()
    assert fused.grad is None and not torch.equal(fused.detach(), bank)
    torch.testing.assert_close(fused.detach(), unfused.detach(), rtol=1e-12, atol=1e-13)
