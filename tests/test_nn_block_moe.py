"""memops.nn.BlockMoE: the Triton path (routing and grouped GEMMs launched) equals the float64 reference
backend, gradients of every parameter included, and its state dict round-trips."""

import pytest
import torch

import memops
from memops.testing import assert_close_to_reference, count_launches


@pytest.mark.parametrize("block_size", [8, None])
def test_block_moe_matches_reference_backend(block_size, device):
    torch.manual_seed(0)
    layer = memops.nn.BlockMoE(
        32,
        16,
        8,
        2,
        block_size=block_size,
        min_experts=4,
        shared_experts=1,
        n_groups=2,
        topk_groups=1,
        routed_scaling=2.5,
    ).to(device)
    x = torch.randn(2, 20, 32, device=device)
    with memops.backend("triton"), count_launches() as launches:
        y = layer(x)
        y.square().sum().backward()
    assert launches["block_route_kernel"] == 1 and launches["grouped_gemm_kernel"] == 5
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    cpu_layer = layer.cpu().double()
    with memops.backend("reference"):
        expected = cpu_layer(x.cpu().double())
        expected.square().sum().backward()
    assert_close_to_reference(y, expected, torch.float32)
    for name, p in cpu_layer.named_parameters():
        assert_close_to_reference(grads[name], p.grad, torch.float32, name=f"grad {name}", scale=2.0)
    counts = layer.unique_experts()
    assert counts.shape == (2, 3 if block_size else 1) and (counts <= 8).all()


def test_block_moe_state_dict_round_trip():
    torch.manual_seed(0)
    layer = memops.nn.BlockMoE(16, 8, 4, 2, block_size=4, min_experts=2)
    assert set(layer.state_dict()) == {"router.weight", "expert_bias", "w_gate_up", "w_down"}
    copy = memops.nn.BlockMoE(16, 8, 4, 2, block_size=4, min_experts=2)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 16)
    torch.testing.assert_close(copy(x), layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no forward has run yet"):
        memops.nn.BlockMoE(16, 8, 4, 2).unique_experts()
