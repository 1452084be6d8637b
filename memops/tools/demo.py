"""``memops train-demo`` / ``python -m memops.demo``: train a MemoryLM on associative recall, then generate.

The task is generated on the fly (nothing to download): a sequence of key-value pairs, a separator, then
one of the keys; the target is that key's value. Tokens: keys [0, n_keys), values [n_keys, n_keys +
n_values), the separator n_keys + n_values. Loss is on the answer only; accuracy is exact recall.

``--task ngram`` is where Engram's n-gram memory helps: sequences follow a fixed random rule, each token a
function of the two before it (NGRAM_VOCAB**2 = 9216 contexts to memorise). The same MemoryLM is trained
with and without an Engram in layer 0, whose hash of the last two tokens addresses exactly that context;
the Engram model predicts the rule faster (measured 2026-12-02, 2-core CPU, seed 0: 100 steps, 79.9% of
next tokens vs 55.6% without; 200 steps (the default, 17 s), 89.0% vs 80.3%).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

from memops.models import MemoryLM, MemoryLMConfig
from memops.nn import Engram, ProductKeyMemory, ValueEmbeddingBank
from memops.optim import RowwiseAdagrad, SparseAdam, apply_optimizer_in_backward
from memops.tools.arguments import add_demo_arguments

# --optimizer: the memory tables' optimizer (fused into the backward) and its learning rate as a multiple of the
# dense one (row-wise Adagrad's step shrinks as its accumulator grows: FBGEMM users start it 10x higher).
MEMORY_OPTIMIZERS = {"sparse-adam": (SparseAdam, 1.0), "rowwise-adagrad": (RowwiseAdagrad, 10.0)}


def table_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that hold the model's memory tables: product-key memories, Engrams and value-embedding banks
    (a bank shared by every layer once)."""
    return [m for m in model.modules() if isinstance(m, (ProductKeyMemory, Engram, ValueEmbeddingBank))]


def table_weight(layer: torch.nn.Module) -> torch.nn.Parameter:
    """A table layer's float table: the PKM's values, the Engram's hashed n-gram rows, the bank."""
    if isinstance(layer, ProductKeyMemory):
        return layer.values.weight
    return layer.multi_head_embedding.embedding.weight if isinstance(layer, Engram) else layer.weight


def memory_tables(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The model's memory tables (of :func:`table_layers`)."""
    return [table_weight(layer) for layer in table_layers(model)]


def make_optimizer(model: torch.nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """AdamW for every parameter (``adamw``), or for all but the memory tables, which get ``name``'s row-sparse
    optimizer applied in the backward (the returned AdamW never sees them)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    optimizer_class, lr_scale = MEMORY_OPTIMIZERS[name]
    tables = memory_tables(model)
    apply_optimizer_in_backward(optimizer_class, tables, {"lr": lr * lr_scale})
    return torch.optim.AdamW([p for p in model.parameters() if all(p is not t for t in tables)], lr=lr)


def recall_batch(batch: int, pairs: int, n_keys: int, n_values: int, generator: torch.Generator):
    """(tokens (B, 2 * pairs + 2), targets (B, 2 * pairs + 2) with -100 everywhere but the answer)."""
    keys = torch.stack([torch.randperm(n_keys, generator=generator)[:pairs] for _ in range(batch)])
    values = torch.randint(n_keys, n_keys + n_values, (batch, pairs), generator=generator)
    asked = torch.randint(0, pairs, (batch,), generator=generator)
    separator = torch.full((batch, 1), n_keys + n_values)
    query = keys.gather(1, asked[:, None])
    tokens = torch.cat([torch.stack([keys, values], dim=2).flatten(1), separator, query], dim=1)
    targets = torch.full_like(tokens, -100)
    targets[:, -1] = values.gather(1, asked[:, None])[:, 0]
    return tokens, targets


def demo_config(n_keys: int, n_values: int) -> MemoryLMConfig:
    sizes = dict(vocab_size=n_keys + n_values + 1, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_positions=256)
    return MemoryLMConfig(**sizes, prefix_length=4, pkm_layers=(1,), moe_block_size=16, kv_budget=32, kv_buffer=8)


PAIRS, N_KEYS, N_VALUES = 4, 8, 8


def train(
    steps: int = 1500,
    *,
    batch: int = 64,
    pairs: int = PAIRS,
    n_keys: int = N_KEYS,
    n_values: int = N_VALUES,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 100,
    progress: bool = True,
    lr: float = 1e-3,
    optimizer: str = "adamw",
):
    """Train; returns (model, list of (step, loss, accuracy)). ``optimizer``: the memory tables' (see
    :func:`make_optimizer`)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MemoryLM(demo_config(n_keys, n_values)).to(device)
    optimizer = make_optimizer(model, optimizer, lr)
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        tokens, targets = recall_batch(batch, pairs, n_keys, n_values, generator)
        tokens, targets = tokens.to(device), targets.to(device)
        loss = model.loss(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == 1 or step == steps:
            with torch.no_grad():
                accuracy = (model(tokens)[:, -1].argmax(-1) == targets[:, -1]).float().mean().item()
            history.append((step, loss.item(), accuracy))
            if progress:
                bar = "#" * (24 * step // steps)
                print(
                    f"[{bar:<24}] step {step:4d}/{steps}  loss {loss.item():.3f}  recall {accuracy:6.1%}  "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    return model, history


NGRAM_VOCAB, NGRAM_LENGTH = 96, 32


def ngram_batch(batch: int, rule: torch.Tensor, generator: torch.Generator, length: int = NGRAM_LENGTH):
    """(tokens (B, length), targets (B, length)): x[t] = rule[x[t-2], x[t-1]] after two random tokens; the
    targets are the next tokens, -100 where the rule cannot be known yet (the first two)."""
    vocab = rule.shape[0]
    x = torch.empty(batch, length + 1, dtype=torch.int64)
    x[:, :2] = torch.randint(0, vocab, (batch, 2), generator=generator)
    for t in range(2, length + 1):
        x[:, t] = rule[x[:, t - 2], x[:, t - 1]]
    targets = x[:, 1:].clone()
    targets[:, :1] = -100
    return x[:, :-1], targets


def ngram_config(engram: bool) -> MemoryLMConfig:
    sizes = dict(vocab_size=NGRAM_VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_positions=64)
    return MemoryLMConfig(
        **sizes, prefix_length=0, pkm_layers=(), moe_block_size=None, kv_budget=64,
        engram_layers=(0,) if engram else (), engram_table=2053, engram_heads=2, engram_embed=32,
    )  # fmt: skip


def train_ngram(
    steps: int, *, engram: bool, seed: int = 0, batch: int = 32, device: str = "cpu", lr: float = 3e-3,
    optimizer: str = "adamw", losses: list | None = None,
):  # fmt: skip
    """Train on the n-gram rule task; returns (model, next-token accuracy on 256 held-out sequences). Appends
    each step's loss to ``losses`` when given."""
    rule = torch.randint(0, NGRAM_VOCAB, (NGRAM_VOCAB, NGRAM_VOCAB), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = MemoryLM(ngram_config(engram)).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    fit(model, make_optimizer(model, optimizer, lr), lambda: ngram_batch(batch, rule, generator), steps, device,
        losses)  # fmt: skip
    return model, evaluate_ngram(model, seed, device)[1]


def fit(model: MemoryLM, optimizer, next_batch, steps: int, device: str, losses: list | None = None) -> None:
    """``steps`` optimizer steps on ``next_batch()``'s (tokens, targets); each loss appended to ``losses``."""
    for _ in range(steps):
        tokens, targets = next_batch()
        loss = model.loss(tokens.to(device), targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if losses is not None:
            losses.append(loss.item())


def held_out_quality(model: MemoryLM, tokens: torch.Tensor, targets: torch.Tensor, device: str):
    """(cross-entropy, next-token accuracy) over the known (!= -100) targets."""
    with torch.no_grad():
        logits = model(tokens.to(device)).float().cpu()
    known = targets != -100
    loss = torch.nn.functional.cross_entropy(logits[known], targets[known]).item()
    return loss, (logits.argmax(-1)[known] == targets[known]).float().mean().item()


def evaluate_ngram(model: MemoryLM, seed: int = 0, device: str = "cpu") -> tuple[float, float]:
    """(cross-entropy, next-token accuracy) on 256 held-out sequences of the seed's rule."""
    rule = torch.randint(0, NGRAM_VOCAB, (NGRAM_VOCAB, NGRAM_VOCAB), generator=torch.Generator().manual_seed(seed))
    return held_out_quality(model, *ngram_batch(256, rule, torch.Generator().manual_seed(seed + 99)), device)


# The 8-bit forms of the memory tables the demos report (memops.quantize_table's arguments; a value bank's
# blocks are cut to its head dim, which they must divide)
TABLE_FORMATS = {
    "fp8 (e4m3, e8m0 scales per 128 columns; a bank's per head)": dict(
        dtype=torch.float8_e4m3fn, block_size=128, scale_format="e8m0"
    ),
    "int8 (fp32 scale per row)": dict(dtype=torch.int8, block_size=None, scale_format="fp32"),
}


def quantized_quality(model: MemoryLM, evaluate=evaluate_ngram, seed: int = 0, device: str = "cpu") -> dict:
    """The trained model's held-out (loss, accuracy) (``evaluate(model, seed, device)``) with its memory tables
    as trained, in bf16 and in each 8-bit form of TABLE_FORMATS (the rest of the model unchanged)."""
    results = {"as trained (fp32)": evaluate(model, seed, device)}
    bf16 = copy.deepcopy(model)
    for weight in memory_tables(bf16):
        weight.data = weight.data.to(torch.bfloat16).float()
    results["bf16"] = evaluate(bf16, seed, device)
    for name, options in TABLE_FORMATS.items():
        quantized = copy.deepcopy(model)
        for layer in table_layers(quantized):
            block = options["block_size"]
            if isinstance(layer, ValueEmbeddingBank) and block is not None:
                block = math.gcd(block, layer.head_dim)
            layer.quantize_(**{**options, "block_size": block})
        results[name] = evaluate(quantized, seed, device)
    return results


def print_quality(quality: dict, table: str) -> None:
    base = quality["as trained (fp32)"][0]
    for name, (loss, accuracy) in quality.items():
        print(f"    {table} {name}: held-out loss {loss:.4f} ({(loss - base) / base:+.2%}), accuracy {accuracy:.1%}")


def loss_curve(losses: list[float], points: int = 8) -> str:
    """The mean loss over ``points`` equal spans of the steps: 'step: loss' pairs."""
    spans = [(len(losses) * i // points, len(losses) * (i + 1) // points) for i in range(points)]
    return "  ".join(f"{end}: {sum(losses[a:end]) / (end - a):.3f}" for a, end in spans if end > a)


def main_ngram(steps: int, seed: int, device: str, optimizer: str = "adamw") -> int:
    print(
        f"training MemoryLM on a 2-gram rule task ({NGRAM_VOCAB}**2 contexts), {steps} steps, with and without "
        f"Engram; memory tables: {optimizer}"
    )
    results = {}
    for engram in (False, True):
        start, losses = time.perf_counter(), []
        model, results[engram] = train_ngram(steps, engram=engram, seed=seed, device=device, optimizer=optimizer,
                                             losses=losses)  # fmt: skip
        label = "with an Engram in layer 0" if engram else "without Engram           "
        print(f"  {label}: next-token accuracy {results[engram]:.1%} ({time.perf_counter() - start:.0f} s)")
        print(f"    loss by step: {loss_curve(losses)}")
        if engram:  # the trained table served from 8 bits
            print_quality(quantized_quality(model, evaluate_ngram, seed, device), "Engram table")
    print(f"Engram's n-gram table: {results[True] - results[False]:+.1%} at {steps} steps")
    return 0


# --task facts: every token id carries a fixed random fact (another token); the target at each position is the
# fact of the token before it, so attention must carry token identity one step and the model must remember
# FACTS_VOCAB facts. MoVE's bank gives every token id its own value vectors to carry. Measured 2026-12-07 (2-core
# CPU, seed 0; next-token accuracy without value memory / LaVE / MoVE): 100 steps 0.8% / 0.8% / 1.0%; 200 steps
# (the default, 9 s) 0.8% / 3.4% / 98.6%; 300 steps 2.1% / 99.9% / 100.0%; without value memory 99.96% at 1,500.
FACTS_VOCAB, FACTS_LENGTH = 512, 32


def facts_batch(batch: int, facts: torch.Tensor, generator: torch.Generator, length: int = FACTS_LENGTH):
    """(tokens (B, length), targets (B, length)): targets[t] = facts[tokens[t - 1]], -100 at t = 0."""
    tokens = torch.randint(0, facts.shape[0], (batch, length), generator=generator)
    targets = torch.full_like(tokens, -100)
    targets[:, 1:] = facts[tokens[:, :-1]]
    return tokens, targets


def facts_config(variant: str) -> MemoryLMConfig:
    """A small model for the facts task: no value memory, LaVE (a one-slot bank per layer) or MoVE (4 slots)."""
    memory = {"none": {}, "lave": dict(value_embeddings="layer"), "move": dict(move_slots=4)}[variant]
    sizes = dict(vocab_size=FACTS_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_positions=64)
    return MemoryLMConfig(**sizes, prefix_length=0, pkm_layers=(), moe_block_size=None, kv_budget=64, **memory)


def train_facts(steps: int, *, variant: str, seed: int = 0, batch: int = 32, device: str = "cpu", lr: float = 3e-3):
    """Train on the facts task; returns (model, accuracy on 256 held-out sequences)."""
    facts = torch.randint(0, FACTS_VOCAB, (FACTS_VOCAB,), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = MemoryLM(facts_config(variant)).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    fit(model, torch.optim.AdamW(model.parameters(), lr=lr), lambda: facts_batch(batch, facts, generator), steps,
        device)  # fmt: skip
    return model, evaluate_facts(model, seed, device)[1]


def evaluate_facts(model: MemoryLM, seed: int = 0, device: str = "cpu") -> tuple[float, float]:
    """(cross-entropy, next-token accuracy) on 256 held-out sequences of the seed's facts."""
    facts = torch.randint(0, FACTS_VOCAB, (FACTS_VOCAB,), generator=torch.Generator().manual_seed(seed))
    return held_out_quality(model, *facts_batch(256, facts, torch.Generator().manual_seed(seed + 99)), device)


def main_facts(steps: int, seed: int, device: str) -> int:
    print(f"training MemoryLM on a token-facts task ({FACTS_VOCAB} ids, one fact each), {steps} steps: without value "
          "memory, with LaVE and with MoVE")  # fmt: skip
    results = {}
    for variant, label in (("none", "no value memory     "), ("lave", "LaVE (per-layer, M=1)"),
                           ("move", "MoVE (shared, M=4)  ")):  # fmt: skip
        start = time.perf_counter()
        model, results[variant] = train_facts(steps, variant=variant, seed=seed, device=device)
        print(f"  {label}: next-token accuracy {results[variant]:.1%} ({time.perf_counter() - start:.0f} s)")
        if variant == "move":  # the trained bank served from 8 bits
            print_quality(quantized_quality(model, evaluate_facts, seed, device), "MoVE bank")
    print(f"MoVE's bank: {results['move'] - results['none']:+.1%} at {steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memops train-demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    given = any(a == "--steps" or a.startswith("--steps=") for a in (sys.argv[1:] if argv is None else argv))
    if args.task == "ngram":
        return main_ngram(args.steps if given else 200, args.seed, device, args.optimizer)
    if args.task == "facts":
        return main_facts(args.steps if given else 200, args.seed, device)
    print(
        f"training MemoryLM on associative recall ({device}; "
        f"{'Triton kernels' if device == 'cuda' else 'the PyTorch reference path'}; memory tables: {args.optimizer})"
    )
    model, history = train(args.steps, seed=args.seed, device=device, optimizer=args.optimizer)
    generator = torch.Generator().manual_seed(args.seed + 1)
    held_out, answers = recall_batch(512, PAIRS, N_KEYS, N_VALUES, generator)
    with torch.no_grad():
        accuracy = (model(held_out.to(device))[:, -1].argmax(-1).cpu() == answers[:, -1]).float().mean().item()
    prompt = held_out[:4].to(device)
    tokens, cache = model.generate(prompt, max_new_tokens=96)
    rows, total = cache.get_seq_length(0), tokens.shape[1]
    print(
        f"loss {history[0][1]:.3f} -> {history[-1][1]:.3f}; recall on 512 held-out sequences: {accuracy:.1%} "
        f"(chance {1 / N_VALUES:.1%})"
    )
    print(
        f"generated {total - prompt.shape[1]} tokens per sequence with a RetentionKVCache: {rows} rows per layer "
        f"and KV head (budget {model.config.kv_budget} + buffer {model.config.kv_buffer}) instead of {total} for a "
        f"full cache ({1 - rows / total:.0%} less K/V memory), {cache.memory_bytes() / 1024:.1f} KiB allocated"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
