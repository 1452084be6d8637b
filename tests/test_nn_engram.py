"""nn.Engram, the layer: its state dict is the official demo's (names and shapes), it equals the demo's forward
on both backends, decodes token by token as it computes the whole sequence, reads a compressed vocabulary,
and its kernels (fp32) agree with float64 on the output and every gradient."""

import pytest
import torch
from engram_demo import ENGRAM, engram_pair

import memops
from memops.testing import assert_close_to_reference, count_launches


def test_engram_state_dict_names_are_the_demos(device):
    demo, ours = engram_pair(device)
    assert list(ours.state_dict()) == list(demo.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in demo.state_dict().items()}
    again = memops.nn.Engram(**ENGRAM, layer_ids=(1, 3)).to(device)
    again.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_engram_equals_the_demo(backend, device):
    demo, ours = engram_pair(device)
    hidden = torch.randn(2, 9, 2, 32, device=device)
    ids = torch.randint(0, 90, (2, 9), device=device)
    expected = demo(hidden, ids)
    with memops.backend(backend), count_launches() as launches:
        got = ours(hidden, ids)
        got.sum().backward()
    assert (launches["engram_lookup_fwd_kernel"] > 0) == (backend == "triton")
    assert_close_to_reference(got, expected, torch.float32)
    expected.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), demo.parameters()):
        assert_close_to_reference(p.grad, q.grad, torch.float32, name=name, scale=3)


@pytest.mark.parametrize("prompt", [0, 1, 5])
def test_engram_decode_equals_full(prompt, device):
    _, ours = engram_pair(device)
    hidden = torch.randn(2, 10, 2, 32, device=device)
    ids = torch.randint(0, 90, (2, 10), device=device)
    with memops.backend("triton"), torch.no_grad():
        full = ours(hidden, ids)
        state = ours.new_state(2)
        parts = [ours(hidden[:, :prompt], ids[:, :prompt], state=state)] if prompt else []
        for t in range(prompt, 10):
            parts.append(ours(hidden[:, t : t + 1], ids[:, t : t + 1], state=state))
    assert_close_to_reference(torch.cat(parts, dim=1), full, torch.float32)


def test_engram_compression_lookup(device):
    compression = torch.randperm(200)[:200] % 90
    _, ours = engram_pair(device)
    compressed = memops.nn.Engram(**ENGRAM, layer_ids=(1, 3), compression=compression).to(device)
    compressed.load_state_dict(ours.state_dict(), strict=True)
    raw = torch.randint(0, 200, (1, 7), device=device)
    hidden = torch.randn(1, 7, 2, 32, device=device)
    assert compressed.pad_id == int(compression[2])
    ours.pad_id = compressed.pad_id
    assert torch.equal(compressed(hidden, raw), ours(hidden, compression.to(device)[raw]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_engram_layer_on_cuda_against_float64(dtype):
    # 16-bit tables, projections and activations on a real GPU (the interpreter's bf16 math is not trusted):
    # the whole layer and its grads against the same layer in float64 on the reference backend.
    _, ours = engram_pair("cuda")
    hidden = torch.randn(2, 64, 2, 32, device="cuda")
    ids = torch.randint(0, 90, (2, 64), device="cuda")
    low = memops.nn.Engram(**ENGRAM, layer_ids=(1, 3)).to("cuda", dtype)
    low.load_state_dict(ours.state_dict())
    high = memops.nn.Engram(**ENGRAM, layer_ids=(1, 3)).to("cuda", torch.float64)
    high.load_state_dict(ours.state_dict())
    with memops.backend("triton"), count_launches() as launches:
        out = low(hidden.to(dtype), ids)
        out.float().square().sum().backward()
    assert launches["engram_lookup_fwd_kernel"] == 1 and launches["short_conv_bwd_dx_kernel"] == 1
    with memops.backend("reference"):
        ref = high(hidden.double(), ids)
        ref.square().sum().backward()
    assert_close_to_reference(out, ref, dtype)
    for (name, p), q in zip(low.named_parameters(), high.parameters()):
        assert_close_to_reference(p.grad, q.grad, dtype, name=name, scale=5)


def test_engram_layer_kernels_against_float64(device):
    # The whole layer on the kernels (fp32) against the same weights in float64 on the reference: output and
    # the grads of the table, the projections, the norms, the conv weight and the hidden states.
    _, ours = engram_pair(device)
    high = memops.nn.Engram(**ENGRAM, layer_ids=(1, 3)).to(device, torch.float64)
    high.load_state_dict(ours.state_dict())
    hidden = torch.randn(2, 9, 2, 32, device=device)
    ids = torch.randint(0, 90, (2, 9), device=device)
    leaf, leaf64 = hidden.clone().requires_grad_(), hidden.double().requires_grad_()
    grad_out = torch.randn(2, 9, 2, 32, device=device)
    with memops.backend("triton"), count_launches() as launches:
        out = ours(leaf, ids)
        out.backward(grad_out)
    assert launches["engram_gate_bwd_kernel"] == 1 and launches["short_conv_bwd_dy_kernel"] == 1
    with memops.backend("reference"):
        ref = high(leaf64, ids)
        ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, torch.float32)
    assert_close_to_reference(leaf.grad, leaf64.grad, torch.float32, name="grad hidden_states")
    for (name, p), q in zip(ours.named_parameters(), high.parameters()):
        assert_close_to_reference(p.grad, q.grad, torch.float32, name=f"grad {name}", scale=3)
