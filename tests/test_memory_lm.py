"""memops.models.MemoryLM and the train-demo: a model assembled from memops parts trains, generates with a
bounded cache (equal to full recomputation while nothing is evicted), compiles, and validates its config."""

import pytest
import torch
from decoding import greedy, tiny_model

import memops
from memops.models import MemoryLM, MemoryLMConfig
from memops.testing import TINY_MEMORY_LM, count_launches
from memops.tools import demo

# a MemoryLM of every part at the smallest sizes (shared with the distributed checks)
TINY = TINY_MEMORY_LM


def test_forward_and_loss():
    model = tiny_model()
    tokens = torch.randint(0, 17, (2, 20))
    logits, log_betas = model(tokens, return_log_beta=True)
    assert logits.shape == (2, 20, 17) and len(log_betas) == 2 and log_betas[0].shape == (2, 1, 20)
    loss = model.loss(tokens, torch.randint(0, 17, (2, 20)))
    loss.backward()
    assert torch.isfinite(loss)
    # The memory prefix, the product-key memory and the experts all train.
    layer_0, layer_1 = model.layers
    assert layer_0.attn.prefix_k.grad.ne(0).any() and layer_1.ffn.values.weight.grad.ne(0).any()
    assert layer_0.ffn.w_gate_up.grad.ne(0).any()
    # The retention gates train through attention's decay (and the capacity loss past the budget).
    assert layer_0.retention.down.weight.grad.ne(0).any()


def test_gates_train_through_attention():
    model = tiny_model(capacity_weight=0.0, kv_budget=64)
    tokens = torch.randint(0, 17, (2, 12))
    model.loss(tokens, tokens).backward()
    assert model.layers[0].retention.down.weight.grad.ne(0).any()


def test_generate_with_a_cache_equals_full_recomputation():
    # Token routing (no block routing, which depends on how tokens are grouped) and a budget above the
    # final length: the cached decode must reproduce greedy decoding by full recomputation.
    # Decay-free training attention too: TRIM-KV's inference attention has no decay by design.
    model = tiny_model(moe_block_size=None, kv_budget=40, retention_in_attention=False)
    prompt = torch.randint(0, 17, (2, 6))
    tokens, cache = model.generate(prompt, max_new_tokens=10)
    expected = greedy(model, prompt, 10)
    assert torch.equal(tokens, expected)
    assert cache.get_seq_length(0) == 15  # the last token is produced, never fed back


def test_generate_stays_within_budget_plus_buffer():
    model = tiny_model()
    tokens, cache = model.generate(torch.randint(0, 17, (1, 12)), max_new_tokens=30)
    assert tokens.shape == (1, 42)
    for layer in range(2):
        assert cache.get_seq_length(layer) < 8 + 2
    assert cache.positions(0).max() == 40


def test_generate_rejects_too_long():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds max_positions=64"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"prompt must be \(B, N\)"):
        model.generate(torch.zeros(60, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_heads=3), "n_heads=3 must divide d_model=32"),
        (dict(n_kv_heads=3, n_heads=4), "n_kv_heads=3 must divide n_heads=4"),
        (dict(kv_budget=0), "kv_budget must be >= 1"),
        (dict(moe_block_size=0), "moe_block_size must be None or >= 1"),
        (dict(pkm_layers=(5,)), "pkm_layers entry 5 is not a layer index"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        MemoryLMConfig(**{**TINY, **overrides}).validate()


def test_state_dict_round_trip(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored = MemoryLM(MemoryLMConfig(**TINY)).eval()
    restored.load_state_dict(torch.load(tmp_path / "model.pt"))
    tokens = torch.randint(0, 17, (2, 9))
    torch.testing.assert_close(restored(tokens), model(tokens), rtol=0, atol=0)


def test_torch_compile_fullgraph():
    model = tiny_model(moe_block_size=8)
    tokens = torch.randint(0, 17, (2, 16))
    targets = torch.randint(0, 17, (2, 16))
    compiled = torch.compile(model.loss, fullgraph=True, backend="aot_eager")
    with memops.backend("reference"):
        loss = compiled(tokens, targets)
        expected = model.loss(tokens, targets)
    torch.testing.assert_close(loss, expected)
    loss.backward()


def test_demo_learns():
    _, history = demo.train(120, batch=32, progress=False, log_every=40)
    assert history[-1][1] < history[0][1] - 0.5


def test_demo_triton_and_reference_agree():
    # The first steps of training on the kernels (the interpreter on CPU) and on the reference path.
    curves = {}
    for backend in ("reference", "triton"):
        with memops.backend(backend), count_launches() as launches:
            _, history = demo.train(2, batch=2, pairs=2, progress=False, log_every=1)
        curves[backend] = [loss for _, loss, _ in history]
        assert (launches["product_key_search_kernel"] > 0) == (backend == "triton")
    torch.testing.assert_close(torch.tensor(curves["triton"]), torch.tensor(curves["reference"]), rtol=1e-3, atol=1e-4)


def test_looped_mode():
    # MELT: the stack applied 3 times with one KV cache per layer shared by the loops.
    model = tiny_model(loops=3, moe_block_size=None)
    tokens = torch.randint(0, 17, (2, 12))
    model.loss(tokens, tokens).backward()
    assert model.layers[0].loop_gate.weight.grad.ne(0).any()
    # The prefill of generate runs the same loops over the same rows as training: same first token.
    generated, cache = model.generate(tokens[:, :6], max_new_tokens=5)
    with torch.no_grad():
        assert torch.equal(generated[:, 6], model(tokens[:, :6])[:, -1].argmax(-1))
    assert isinstance(cache, memops.SharedLoopKVCache) and cache.get_seq_length(0) == 10
    # KV memory does not depend on the number of loops.
    _, cache_two = tiny_model(loops=2, moe_block_size=None).generate(tokens[:, :6], max_new_tokens=5)
    assert cache.memory_bytes() == cache_two.memory_bytes()


def test_loops_validation():
    with pytest.raises(ValueError, match="loops must be >= 1"):
        MemoryLMConfig(**{**TINY, "loops": 0}).validate()


def test_engram_layers_train_and_generate_equal_full_recomputation():
    model = tiny_model(engram_layers=(0,), moe_block_size=None, kv_budget=40, retention_in_attention=False)
    engram = model.layers[0].engram
    assert engram is not None and model.layers[1].engram is None
    tokens = torch.randint(0, 17, (2, 12))
    model.loss(tokens, tokens).backward()
    assert engram.multi_head_embedding.embedding.weight.grad.ne(0).any()
    assert engram.short_conv.conv.weight.grad.ne(0).any() and engram.key_projs[0].weight.grad.ne(0).any()
    # Decoding carries each Engram layer's n-gram ids and conv rows: equal to greedy full recomputation.
    prompt = torch.randint(0, 17, (2, 5))
    generated, _ = model.generate(prompt, max_new_tokens=8)
    expected = greedy(model, prompt, 8)
    assert torch.equal(generated, expected)
    with pytest.raises(ValueError, match="engram_layers with loops > 1"):
        MemoryLMConfig(**{**TINY, "engram_layers": (0,), "loops": 2}).validate()
    with pytest.raises(ValueError, match="engram_layers entry 5"):
        MemoryLMConfig(**{**TINY, "engram_layers": (5,)}).validate()


def test_ngram_demo_engram_helps():
    # The 2-gram rule task: the Engram's hash of the last two tokens addresses the rule's context directly.
    _, without = demo.train_ngram(60, engram=False)
    _, with_engram = demo.train_ngram(60, engram=True)
    assert with_engram > without + 0.1, (with_engram, without)


def test_ngram_batch_follows_the_rule():
    rule = torch.randint(0, demo.NGRAM_VOCAB, (demo.NGRAM_VOCAB, demo.NGRAM_VOCAB))
    tokens, targets = demo.ngram_batch(3, rule, torch.Generator().manual_seed(0))
    assert torch.equal(targets[:, 1:], rule[tokens[:, :-1], tokens[:, 1:]]) and (targets[:, 0] == -100).all()


def test_facts_batch_targets_the_previous_tokens_fact():
    facts = torch.randint(0, demo.FACTS_VOCAB, (demo.FACTS_VOCAB,), generator=torch.Generator().manual_seed(0))
    tokens, targets = demo.facts_batch(4, facts, torch.Generator().manual_seed(1))
    assert tokens.shape == targets.shape == (4, demo.FACTS_LENGTH) and (targets[:, 0] == -100).all()
    assert torch.equal(targets[:, 1:], facts[tokens[:, :-1]])
    assert demo.facts_config("move").move_slots == 4 and demo.facts_config("lave").value_embeddings == "layer"


def test_quantized_quality_reports_each_table_format():
    """The n-gram task's 8-bit evaluation: every format of demo.TABLE_FORMATS (and bf16) on the model's Engram
    table, the rest unchanged; the original model keeps its float table."""
    torch.manual_seed(0)
    model = MemoryLM(demo.ngram_config(True))
    quality = demo.quantized_quality(model)
    assert list(quality) == ["as trained (fp32)", "bf16", *demo.TABLE_FORMATS]
    base = quality["as trained (fp32)"][0]
    assert all(abs(loss - base) / base < 0.01 for loss, _ in quality.values())
    assert isinstance(model.layers[0].engram.multi_head_embedding.embedding, torch.nn.Embedding)
    # the facts task's MoVE bank (head dim 8: the fp8 form's blocks are cut to 8 columns)
    torch.manual_seed(0)
    model = MemoryLM(demo.facts_config("move"))
    quality = demo.quantized_quality(model, demo.evaluate_facts)
    assert list(quality) == ["as trained (fp32)", "bf16", *demo.TABLE_FORMATS]
    base = quality["as trained (fp32)"][0]
    assert all(abs(loss - base) / base < 0.01 for loss, _ in quality.values())
    assert isinstance(model.value_bank.weight, torch.nn.Parameter)
    assert demo.table_layers(model) == [model.value_bank]
