"""memops.nn.ProductKeyMemory against a plain-PyTorch XLM HashingMemory layer with the same parameters:
forward, every parameter's gradient, the variants (norms, gated, value projection, shared tables), state
dicts, train/eval, torch.compile and the routing statistics."""
import copy

import pytest
import torch

import memops
from memops.benchmarks.product_key_memory import xlm_memory
from memops.nn import ProductKeyMemory
from memops.testing import assert_close_to_reference, count_launches

SMALL = dict(n_keys=8, heads=2, topk=4, key_dim=16)


def make_layer(input_dim=12, output_dim=10, seed=0, device="cpu", **kwargs):
    torch.manual_seed(seed)
    return ProductKeyMemory(input_dim, output_dim, **{**SMALL, **kwargs}).to(device)


def compare_with_xlm(layer, x, *, backend="triton"):
    """Our layer on ``backend`` against the XLM formulation run in float64 on a copy of the layer."""
    ours = layer
    theirs = copy.deepcopy(layer).double()
    x_ours = x.detach().clone().requires_grad_()
    x_theirs = x.detach().double().requires_grad_()
    with memops.backend(backend), count_launches() as launches:
        out = ours(x_ours)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    expected = xlm_memory(theirs, x_theirs)
    expected.backward(grad_out.double())
    assert_close_to_reference(out, expected, torch.float32, name="output")
    assert_close_to_reference(x_ours.grad, x_theirs.grad, torch.float32, name="grad x")
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        if their_params[name].grad.abs().max() < 1e-12:  # the query bias in front of a training-mode batch norm
            assert param.grad.abs().max() < 1e-6, f"grad {name}: should be zero"
            continue
        assert_close_to_reference(param.grad, their_params[name].grad, torch.float32, name=f"grad {name}")
    return launches


@pytest.mark.parametrize("query_norm", ["batchnorm", "layernorm", None])
def test_matches_xlm_layer(query_norm, device):
    layer = make_layer(query_norm=query_norm, device=device)
    launches = compare_with_xlm(layer, torch.randn(3, 5, 12, device=device))
    assert launches["product_key_search_kernel"] == 1 and launches["weighted_gather_fwd_kernel"] >= 1


@pytest.mark.parametrize("variant", [dict(gated=True), dict(value_dim=6), dict(gated=True, value_dim=20)])
def test_output_variants(variant, device):
    layer = make_layer(device=device, **variant)
    assert layer.out_proj is not None and (layer.gate_proj is not None) == variant.get("gated", False)
    compare_with_xlm(layer, torch.randn(17, 12, device=device))


def test_reference_backend_is_the_cpu_path():
    layer = make_layer(query_norm="layernorm")
    launches = compare_with_xlm(layer, torch.randn(9, 12), backend="reference")
    assert sum(launches.values()) == 0


def test_input_shapes(device):
    layer = make_layer(device=device).eval()
    x = torch.randn(2, 3, 12, device=device)
    with memops.backend("triton"):
        batched = layer(x)
        flat = layer(x.reshape(6, 12))
    assert batched.shape == (2, 3, 10) and flat.shape == (6, 10)
    torch.testing.assert_close(batched.reshape(6, 10), flat)


def test_train_and_eval_batchnorm(device):
    layer = make_layer(device=device)
    x = torch.randn(16, 12, device=device)
    with memops.backend("triton"):
        layer.train()
        layer(x)
        assert int(layer.query_norm.num_batches_tracked) == 1
        layer.eval()
        compare_with_xlm(layer, x)   # running statistics in eval
    assert int(layer.query_norm.num_batches_tracked) == 1


def test_state_dict_round_trip(device):
    layer = make_layer(device=device, gated=True, query_norm="batchnorm")
    assert set(layer.state_dict()) == {
        "query_proj.weight", "query_proj.bias", "query_norm.weight", "query_norm.bias", "query_norm.running_mean",
        "query_norm.running_var", "query_norm.num_batches_tracked", "sub_keys", "values.weight",
        "gate_proj.weight", "gate_proj.bias", "out_proj.weight", "out_proj.bias",
    }
    assert layer.sub_keys.shape == (2, 2, 8, 8) and layer.values.weight.shape == (64, 10)
    restored = make_layer(device=device, seed=1, gated=True, query_norm="batchnorm")
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(7, 12, device=device)
    with memops.backend("triton"):
        torch.testing.assert_close(restored.eval()(x), layer.eval()(x), rtol=0, atol=0)


def test_initialisation_follows_xlm():
    layer = ProductKeyMemory(32, 64, n_keys=64, heads=2, topk=8, key_dim=32)
    bound = 16 ** -0.5
    assert layer.sub_keys.abs().max() <= bound and layer.sub_keys.abs().max() > 0.9 * bound
    assert abs(layer.values.weight.std().item() - 64 ** -0.5) < 0.01


def test_shared_values_across_layers(device):
    first = make_layer(device=device)
    second = make_layer(device=device, seed=1, shared_values=first)
    third = make_layer(device=device, seed=2, shared_values=first.values)
    assert second.values is first.values and third.values is first.values
    x = torch.randn(6, 12, device=device)
    with memops.backend("triton"):
        (second(first(x).repeat(1, 2)[:, :12]).sum() + third(x).sum()).backward()
    # One table, trained by every layer that reads it.
    assert first.values.weight.grad is not None and first.values.weight.grad.ne(0).any()
    # A stack that shares a table round-trips through one state dict.
    stack = torch.nn.ModuleList([first, second])
    copy_stack = torch.nn.ModuleList([make_layer(device=device, seed=3), make_layer(device=device, seed=4)])
    copy_stack[1] = make_layer(device=device, seed=4, shared_values=copy_stack[0])
    copy_stack.load_state_dict(stack.state_dict())
    assert copy_stack[1].values is copy_stack[0].values
    torch.testing.assert_close(copy_stack[0].values.weight, first.values.weight)


def test_slot_usage(device):
    layer = make_layer(device=device)
    with pytest.raises(RuntimeError, match="no forward has run yet"):
        layer.slot_usage()
    with memops.backend("triton"):
        layer(torch.randn(5, 12, device=device))
    indices = layer.last_indices
    assert indices.shape == (5, 2, 4)
    stats = layer.slot_usage()
    counts = torch.bincount(indices.flatten().cpu(), minlength=64)
    assert stats["slots_used"] == (counts > 0).sum().item() / 64
    assert stats["top_slot_share"] == counts.max().item() / 40 and stats["reads"] == 40


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend, device):
    if backend == "reference":
        device = "cpu"
    layer = make_layer(device=device, gated=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(8, 12, device=device)
    with memops.backend(backend):
        with count_launches() as launches:
            out = compiled(x)
            out.sum().backward()
        expected = make_layer(device=device, gated=True)(x)
    assert (launches["product_key_search_kernel"] > 0) == (backend == "triton")
    assert_close_to_reference(out, expected, torch.float32)
    assert layer.values.weight.grad is not None and layer.last_indices.shape == (8, 2, 4)


BAD_ARGS = {
    "odd_key_dim": (dict(key_dim=15), ValueError, "key_dim must be even"),
    "topk_too_large": (dict(topk=9), ValueError, r"topk must be in \[1, n_keys=8\]"),
    "unknown_norm": (dict(query_norm="rmsnorm"), ValueError, "query_norm must be one of"),
    "shared_wrong_rows": (dict(shared_values=torch.nn.Embedding(63, 10)), ValueError, r"shared_values must have \(n_keys\*\*2=64"),
    "shared_wrong_width": (dict(shared_values=torch.nn.Embedding(64, 10), value_dim=6), ValueError, "value_dim=6"),
    "shared_not_a_table": (dict(shared_values=torch.zeros(64, 10)), TypeError, "shared_values must be a ProductKeyMemory"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments(case):
    kwargs, error, message = BAD_ARGS[case]
    with pytest.raises(error, match=message):
        make_layer(**kwargs)


@pytest.mark.cuda
def test_cuda_bf16_memory_layers_at_scale_layer():
    # Memory Layers at Scale geometry (1024^2 slots, key_dim 512, Memory+), fewer tokens.
    torch.manual_seed(0)
    layer = ProductKeyMemory(1024, 1024, n_keys=1024, heads=4, topk=32, key_dim=512, query_norm=None, gated=True,
                             device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16)
    with count_launches() as launches:
        out = layer(x)
        out.float().sum().backward()
    assert launches["product_key_search_kernel"] == 1
    expected = xlm_memory(copy.deepcopy(layer).float(), x.float())
    # bf16 scores can swap near-tied slots; compare outputs in aggregate.
    assert_close_to_reference(out, expected, torch.bfloat16, scale=5)
    assert layer.values.weight.grad is not None and layer.sub_keys.grad is not None
