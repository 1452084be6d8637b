"""memops.integrations.hf: RetentionCache / SharedLoopCache as transformers caches in model.generate, and
replace_mlp, on a tiny randomly initialised Llama built locally (no hub access)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from decoding import greedy  # noqa: E402

from memops.integrations.hf import RetentionCache, SharedLoopCache, constant_decay, replace_mlp  # noqa: E402
from memops.nn import BlockMoE, ProductKeyMemory  # noqa: E402


@pytest.fixture
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def generate(model, prompt, new_tokens, cache):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        cache=cache,
        pad_token_id=0,
    )


def full_cache_output(model, prompt, new_tokens):
    return generate(model, prompt, new_tokens, transformers.DynamicCache(config=model.config))


def test_retention_cache_with_room_for_everything_equals_the_full_cache(llama):
    prompt = torch.randint(0, 50, (2, 10))
    expected = full_cache_output(llama, prompt, 20)
    assert torch.equal(generate(llama, prompt, 20, RetentionCache(2, budget=64, buffer=8)), expected)


def test_retention_cache_stays_within_budget_plus_buffer(llama):
    prompt = torch.randint(0, 50, (2, 12))
    cache = RetentionCache(2, budget=8, buffer=2)
    tokens = generate(llama, prompt, 30, cache)
    assert tokens.shape == (2, 42)
    for layer in range(2):
        assert cache.memory.get_seq_length(layer) < 8 + 2
        assert cache.get_seq_length(layer) == 41  # positions still count every token
    # constant retention keeps the most recent tokens
    assert cache.memory.positions(0)[0, 0].tolist() == list(range(41 - cache.memory.get_seq_length(0), 41))
    full = transformers.DynamicCache(config=llama.config)
    generate(llama, prompt, 30, full)
    assert cache.memory_bytes() < sum(layer.keys.numel() * 2 * 4 for layer in full.layers)


def test_retention_cache_uses_the_given_retention(llama):
    # Retention that favours even positions: those survive eviction.
    seen = {}

    def log_beta_fn(layer_idx, key_states):
        start = seen.get(layer_idx, 0)
        seen[layer_idx] = start + key_states.shape[2]
        positions = torch.arange(start, start + key_states.shape[2])
        values = torch.where(positions % 2 == 0, -0.001, -1.0)
        return values.expand(*key_states.shape[:2], -1).float()

    cache = RetentionCache(2, budget=6, buffer=2, log_beta_fn=log_beta_fn)
    generate(llama, torch.randint(0, 50, (1, 16)), 8, cache)
    assert (cache.memory.positions(1) % 2 == 0).float().mean() > 0.6


def test_shared_loop_cache_in_an_unlooped_model_is_a_plain_cache(llama):
    prompt = torch.randint(0, 50, (1, 7))
    cache = SharedLoopCache(2)
    assert torch.equal(generate(llama, prompt, 12, cache), full_cache_output(llama, prompt, 12))
    assert cache.memory_bytes() > 0 and cache.memory.get_seq_length(0) == 18


@pytest.mark.parametrize(
    "kind, cls, kwargs",
    [
        ("pkm", ProductKeyMemory, dict(n_keys=8, heads=2, topk=4, key_dim=16)),
        ("moe", BlockMoE, dict(d_expert=16, n_experts=4, top_k=2, block_size=8, min_experts=2)),
    ],
)
def test_replace_mlp(llama, kind, cls, kwargs):
    created = replace_mlp(llama, [1], kind, **kwargs)
    assert isinstance(llama.model.layers[1].mlp, cls) and created[0] is llama.model.layers[1].mlp
    prompt = torch.randint(0, 50, (1, 9))
    assert generate(llama, prompt, 4, transformers.DynamicCache(config=llama.config)).shape == (1, 13)
    llama.train()
    llama(prompt, labels=prompt).loss.backward()
    assert any(p.grad is not None for p in created[0].parameters())


def test_replace_mlp_errors(llama):
    with pytest.raises(ValueError, match=r"expected a Llama-family model with model.model.layers\[i\].mlp"):
        replace_mlp(torch.nn.Linear(2, 2), [0], "pkm")
    with pytest.raises(ValueError, match="kind must be 'pkm' or 'moe'"):
        replace_mlp(llama, [0], "ffn")
    with pytest.raises(ValueError, match=r"layer 5 is not in \[0, 2\)"):
        replace_mlp(llama, [5], "pkm")
    assert constant_decay(-0.5)(0, torch.zeros(1, 2, 3, 4)).tolist() == [[[-0.5] * 3] * 2]


def test_insert_engram_generates_like_full_recomputation(llama):
    from memops.integrations.hf import insert_engram

    (engram,) = insert_engram(llama, [1], vocab_sizes=[101, 103], n_embed_per_ngram=16, n_head_per_ngram=2)
    assert "model.layers.1.engram.multi_head_embedding.embedding.weight" in llama.state_dict()
    assert "model.layers.0.mlp.up_proj.weight" in llama.state_dict()  # the checkpoint's own names unchanged
    prompt = torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        plain_logits = llama(prompt, use_cache=False).logits
        engram.value_proj.bias.add_(1.0)  # the Engram's output moves the logits
        assert not torch.allclose(llama(prompt, use_cache=False).logits, plain_logits)
    out = full_cache_output(llama, prompt, 6)
    assert torch.equal(out, greedy(lambda tokens: llama(tokens, use_cache=False).logits, prompt, 6))
    with pytest.raises(ValueError, match="n_head_per_ngram= is required"):
        insert_engram(llama, [0], vocab_sizes=[101, 103], n_embed_per_ngram=16)


def test_insert_value_embeddings_generates_like_full_recomputation(llama):
    from memops.integrations.hf import insert_value_embeddings

    prompt = torch.randint(1, 50, (2, 5))
    with torch.no_grad():
        plain_logits = llama(prompt, use_cache=False).logits
    bank = insert_value_embeddings(llama, slots=2)
    state = llama.state_dict()
    assert bank.weight.shape == (50, 2, 2 * 8) and "model.value_bank.weight" in state
    assert "model.layers.1.self_attn.value_gate.proj.weight" in state and "model.layers.0.mlp.up_proj.weight" in state
    with torch.no_grad():
        torch.nn.init.normal_(llama.model.layers[0].self_attn.value_gate.proj.weight, std=0.5)
        mixed_logits = llama(prompt, use_cache=False).logits
    assert not torch.allclose(mixed_logits, plain_logits)  # the bank moves the logits
    out = full_cache_output(llama, prompt, 6)  # the cache keeps the mixed values
    assert torch.equal(out, greedy(lambda tokens: llama(tokens, use_cache=False).logits, prompt, 6))
    # a fresh model with the same insertion loads the checkpoint and gives the same logits
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(llama.config).eval()
    insert_value_embeddings(other, slots=2)
    other.load_state_dict(llama.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(prompt, use_cache=False).logits, mixed_logits)
    # the bank trains through the model
    llama(prompt, labels=prompt).loss.backward()
    assert bank.weight.grad[prompt.unique()].ne(0).any()
    with pytest.raises(ValueError, match="already has a value bank"):
        insert_value_embeddings(llama, slots=2)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        insert_value_embeddings(other, slots=0)
