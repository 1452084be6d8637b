"""memops.nn.MemoryAttention: same output as the hand-written cat + SDPA layer, state dicts that round-trip,
grads into the memory tokens and the prefix, RoPE on sequence rows only, the Triton path under the interpreter."""

import io

import pytest
import torch
import torch.nn.functional as F

import memops
from memops.nn import LoopedAttention, MemoryAttention, RetentionAttention
from memops.testing import assert_close_to_reference, count_launches


def hand_written(layer: MemoryAttention, x, memory=None, rotary=None):
    """What users write today: project, cat the memory onto K/V, SDPA with an explicit mask."""
    B, N, _ = x.shape
    H, Hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def heads(t, h):
        return t.view(B, -1, h, d).transpose(1, 2)

    q, k, v = heads(layer.q_proj(x), H), heads(layer.k_proj(x), Hkv), heads(layer.v_proj(x), Hkv)
    if rotary is not None:
        q, k = rotary(q, k)
    mem_k = [layer.prefix_k.expand(B, -1, -1, -1)] if layer.prefix_k is not None else []
    mem_v = [layer.prefix_v.expand(B, -1, -1, -1)] if layer.prefix_v is not None else []
    if memory is not None:
        mem_k.append(heads(layer.k_proj(memory), Hkv))
        mem_v.append(heads(layer.v_proj(memory), Hkv))
    M = sum(t.shape[2] for t in mem_k)
    keys, values = torch.cat(mem_k + [k], 2), torch.cat(mem_v + [v], 2)
    rows, cols = torch.arange(N)[:, None], torch.arange(M + N)[None, :]
    mask = (cols < M) | (cols - M <= rows) if layer.causal else None
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != Hkv)
    return layer.out_proj(out.transpose(1, 2).reshape(B, N, H * d))


def rotate_half_rope(q, k):
    # A small RoPE, as a user would pass it: positions are the sequence rows only.
    d = q.shape[-1]
    positions = torch.arange(q.shape[2], dtype=q.dtype)
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=q.dtype) / d))
    angles = torch.cat([positions[:, None] * freqs] * 2, dim=-1)

    def apply(t):
        first, second = t.chunk(2, dim=-1)
        return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()

    return apply(q), apply(k)


@pytest.mark.parametrize(
    "config",
    [
        dict(num_kv_heads=None, prefix_length=0, causal=False, memory=True, rotary=None),
        dict(num_kv_heads=2, prefix_length=5, causal=True, memory=False, rotary=rotate_half_rope),
        dict(num_kv_heads=1, prefix_length=3, causal=True, memory=True, rotary=rotate_half_rope),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_hand_written_layer(config, backend):
    torch.manual_seed(0)
    layer = MemoryAttention(
        64,
        4,
        num_kv_heads=config["num_kv_heads"],
        prefix_length=config["prefix_length"],
        causal=config["causal"],
        rotary=config["rotary"],
    )
    x = torch.randn(2, 19, 64, requires_grad=True)
    memory = torch.randn(2, 7, 64, requires_grad=True) if config["memory"] else None
    with memops.backend(backend), count_launches() as launches:
        out = layer(x, memory)
        out.square().sum().backward()
    assert (launches["memory_attention_fwd_kernel"] == 1) == (backend == "triton")
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    memory_grad = memory.grad.clone() if memory is not None else None
    layer.zero_grad(), x.grad.zero_()
    if memory is not None:
        memory.grad.zero_()
    expected = hand_written(layer, x, memory, config["rotary"])
    expected.square().sum().backward()
    assert_close_to_reference(out, expected, torch.float32)
    assert_close_to_reference(x_grad, x.grad, torch.float32, scale=3)
    if memory is not None:
        assert_close_to_reference(memory_grad, memory.grad, torch.float32, scale=3)
    for name, p in layer.named_parameters():
        assert_close_to_reference(grads[name], p.grad, torch.float32, name=name, scale=3)


def test_state_dict_round_trips():
    torch.manual_seed(1)
    layer = MemoryAttention(32, 2, num_kv_heads=1, prefix_length=4, bias=True)
    assert set(layer.state_dict()) == {
        "q_proj.weight",
        "q_proj.bias",
        "k_proj.weight",
        "k_proj.bias",
        "v_proj.weight",
        "v_proj.bias",
        "out_proj.weight",
        "out_proj.bias",
        "prefix_k",
        "prefix_v",
    }
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryAttention(32, 2, num_kv_heads=1, prefix_length=4, bias=True)
    restored.load_state_dict(torch.load(buffer))
    x, memory = torch.randn(2, 9, 32), torch.randn(2, 3, 32)
    assert torch.equal(layer(x, memory), restored(x, memory))


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        MemoryAttention(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="prefix_length must be >= 0"):
        MemoryAttention(48, 6, prefix_length=-1)


def test_attention_forms_share_memory_attention_state_dict():
    torch.manual_seed(0)
    plain = MemoryAttention(32, 4, num_kv_heads=2, prefix_length=3, causal=True)
    for form in (
        RetentionAttention(32, 4, num_kv_heads=2, prefix_length=3),
        LoopedAttention(32, 4, num_kv_heads=2, prefix_length=3, causal=True),
    ):
        form.load_state_dict(plain.state_dict())
        assert form.state_dict().keys() == plain.state_dict().keys()
        for key, value in plain.state_dict().items():
            assert torch.equal(form.state_dict()[key], value)
