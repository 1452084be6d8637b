"""``memops train-demo`` / ``python -m memops.demo``: train a MemoryLM on associative recall, then generate.

The task is generated on the fly (nothing to download): a sequence of key-value pairs, a separator, then
one of the keys; the target is that key's value. Tokens: keys [0, n_keys), values [n_keys, n_keys +
n_values), the separator n_keys + n_values. Loss is on the answer only; accuracy is exact recall.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from memops.models import MemoryLM, MemoryLMConfig


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
):
    """Train; returns (model, list of (step, loss, accuracy))."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = MemoryLM(demo_config(n_keys, n_values)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memops train-demo", description=__doc__.splitlines()[0])
    from memops.tools.cli import positive_int_type

    parser.add_argument(
        "--steps", type=positive_int_type("--steps"), default=1500, help="training steps (default 1500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed of the model, data and sampling (default 0)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"training MemoryLM on associative recall ({device}; "
        f"{'Triton kernels' if device == 'cuda' else 'the PyTorch reference path'})"
    )
    model, history = train(args.steps, seed=args.seed, device=device)
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
