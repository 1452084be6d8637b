"""memops.nn.ValueEmbeddingBank and MoVEGate, in an attention layer and in MemoryLM (MoVE's shared bank and
LaVE's per-layer banks): gradients through the router and the hidden state against float64, generation with
a cache equal to full recomputation, state_dict round trips, bad input."""

import copy

import pytest
import torch
from decoding import greedy, tiny_model

import memops
from memops import reference
from memops.models import MemoryLM, MemoryLMConfig
from memops.nn import MemoryAttention, MoVEGate, ValueEmbeddingBank
from memops.testing import TINY_MEMORY_LM, assert_close_to_reference, count_launches


def test_gate_starts_at_one_and_bank_init():
    gate = MoVEGate(32, 4, 3)
    gates = gate(torch.randn(2, 5, 32))
    assert gates.shape == (2, 5, 4, 4) and torch.equal(gates, torch.ones_like(gates))
    bank = ValueEmbeddingBank(100, 3, 4, 8)
    assert bank.weight.shape == (100, 3, 32)
    bound = (3.0 / 32) ** 0.5
    assert bank.weight.abs().max() <= bound and bank.weight.std() > bound / 2  # uniform in [-s, s]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attention_layer_with_a_bank_matches_float64(backend):
    """An attention layer whose values get the bank through value_mix: the output and the grads of the hidden
    state, W_G (MoVE's router, trained off its zero init for one step first) and the bank against float64."""
    torch.manual_seed(0)
    attention = MemoryAttention(32, 4, num_kv_heads=2, causal=True)
    gate, bank = MoVEGate(32, 2, 3), ValueEmbeddingBank(23, 3, 2, 8)
    torch.nn.init.normal_(gate.proj.weight, std=0.3)  # (the zero init would hide the router's grad path)
    x = torch.randn(2, 7, 32, requires_grad=True)
    ids = torch.randint(0, 23, (2, 7))
    ids[:, :3] = 5  # a repeated id

    def run(modules, x):
        attention, gate, bank = modules
        q, k, v = attention.project(x, lambda v: bank(v, gate(x), ids))
        out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               is_causal=True)  # fmt: skip
        return out.square().sum()

    modules = (attention, gate, bank)
    with memops.backend(backend), count_launches() as launches:
        run(modules, x).backward()
    assert (launches["value_embedding_mix_fwd_kernel"] == 1) == (backend == "triton")
    modules64 = [copy.deepcopy(m).double() for m in modules]
    for m in modules64:
        m.zero_grad()
    x64 = x.detach().double().requires_grad_()
    with memops.backend("reference"):
        run(modules64, x64).backward()
    assert_close_to_reference(x.grad, x64.grad, torch.float32, name="hidden state grad")
    assert_close_to_reference(gate.proj.weight.grad, modules64[1].proj.weight.grad, torch.float32, name="W_G grad")
    assert_close_to_reference(bank.weight.grad, modules64[2].weight.grad, torch.float32, name="bank grad")
    assert bank.weight.grad[5].ne(0).any() and bank.weight.grad[[i for i in range(23) if i not in ids]].eq(0).all()


@pytest.mark.parametrize("overrides", [dict(move_slots=3), dict(value_embeddings="layer"), dict(move_slots=2, loops=2)],
                         ids=["move", "lave", "move-looped"])  # fmt: skip
def test_memory_lm_trains_and_generates_equal_to_full_recomputation(overrides):
    model = tiny_model(moe_block_size=None, kv_budget=40, retention_in_attention=False, **overrides)
    tokens = torch.randint(0, 17, (2, 12))
    model.loss(tokens, tokens).backward()
    banks = [model.value_bank] if model.value_bank is not None else [layer.value_embedding for layer in model.layers]
    assert all(bank is not None and bank.weight.grad.ne(0).any() for bank in banks)
    # every layer's router trains (off its zero init the grad reaches W_G through the gates)
    assert all(layer.value_gate.proj.weight.grad.ne(0).any() for layer in model.layers)
    prompt = torch.randint(0, 17, (2, 5))
    generated, _ = model.generate(prompt, max_new_tokens=8)
    assert torch.equal(generated, greedy(model, prompt, 8))


def test_memory_lm_state_dict_round_trips(tmp_path):
    model = tiny_model(move_slots=2)
    assert "value_bank.weight" in model.state_dict() and "layers.0.value_gate.proj.weight" in model.state_dict()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = MemoryLM(MemoryLMConfig(**{**TINY_MEMORY_LM, "move_slots": 2})).eval()
    restored.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    tokens = torch.randint(0, 17, (2, 9))
    torch.testing.assert_close(restored(tokens), model(tokens), rtol=0, atol=0)


def test_bank_is_the_reference_mix():
    bank, gate = ValueEmbeddingBank(11, 2, 3, 4), MoVEGate(8, 3, 2)
    torch.nn.init.normal_(gate.proj.weight)
    v, h, ids = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(bank(v, gate(h), ids), reference.value_embedding_mix(v, gate(h), ids, bank.weight))


def test_bad_input():
    with pytest.raises(ValueError, match="slots"):
        ValueEmbeddingBank(10, 0, 2, 4)
    with pytest.raises(TypeError, match="n_heads"):
        MoVEGate(8, 2.0, 1)
    with pytest.raises(ValueError, match="MoVEGate: h must have 8 features"):
        MoVEGate(8, 2, 1)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="move_slots .* and value_embeddings='layer' .* are alternatives"):
        MemoryLMConfig(**{**TINY_MEMORY_LM, "move_slots": 2, "value_embeddings": "layer"}).validate()
    with pytest.raises(ValueError, match="value_embeddings must be None or 'layer'"):
        MemoryLMConfig(**{**TINY_MEMORY_LM, "value_embeddings": "global"}).validate()
    with pytest.raises(ValueError, match="no value_mix"):
        cu_seqlens = torch.tensor([0, 5], dtype=torch.int32)
        memops.nn.RetentionAttention(8, 2)(torch.randn(5, 8), torch.zeros(2, 5), cu_seqlens=cu_seqlens, max_seqlen=5,
                                           value_mix=lambda v: v)  # fmt: skip
