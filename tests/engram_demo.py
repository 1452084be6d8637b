"""A transcription of the official Engram demo (deepseek-ai/Engram engram_demo_v1.py), the oracle of
tests/test_engram.py and tests/test_nn_engram.py: its NgramHashMapping (multipliers, primes,
_get_ngram_hashes), its gate loop, its ShortConv and the layer that combines them, with the state-dict names
of the demo's checkpoint. Not a test module (the name does not start with test_)."""

import numpy as np
import torch

import memops

# ---------------------------------------------------------------------------------------------------------
# A transcription of the demo's NgramHashMapping (its sympy isprime replaced by trial division, which is
# exact and fast at these sizes): the multipliers, the primes, and _get_ngram_hashes.


def demo_isprime(n):
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def demo_hash_mapping(layer_ids, vocab_sizes, max_ngram_size, n_head, seed, tokenizer_vocab_size):
    max_long = np.iinfo(np.int64).max
    half_bound = max(1, int(max_long // tokenizer_vocab_size) // 2)
    multipliers = {}
    for layer_id in layer_ids:
        g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
        r = g.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
        multipliers[layer_id] = r * 2 + 1
    seen, sizes = set(), {}
    for layer_id in layer_ids:
        per_layer = []
        for ngram in range(2, max_ngram_size + 1):
            start, heads = vocab_sizes[ngram - 2] - 1, []
            for _ in range(n_head):
                candidate = start + 1
                while not (demo_isprime(candidate) and candidate not in seen):
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
                start = candidate
            per_layer.append(heads)
        sizes[layer_id] = per_layer
    return multipliers, sizes


def demo_ngram_hashes(input_ids, multipliers, sizes, max_ngram_size, n_head, pad_id):
    x = np.asarray(input_ids, dtype=np.int64)
    B, T = x.shape

    def shift_k(k):
        if k == 0:
            return x
        return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]

    base_shifts = [shift_k(k) for k in range(max_ngram_size)]
    all_hashes = []
    for n in range(2, max_ngram_size + 1):
        tokens = base_shifts[:n]
        mix = tokens[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, tokens[k] * multipliers[k])
        for j in range(n_head):
            all_hashes.append((mix % int(sizes[n - 2][j])).astype(np.int64, copy=False))
    return np.stack(all_hashes, axis=2)


# ---------------------------------------------------------------------------------------------------------


def demo_gate(embeddings_key, hidden_states, norm1, norm2, value):
    """The demo's gate loop, with its key_projs outputs given (key (B, L, G, C)) and value_proj's output."""
    gates = []
    hidden_size = hidden_states.shape[-1]
    for hc_idx in range(hidden_states.shape[2]):
        normed_key = norm1[hc_idx](embeddings_key[:, :, hc_idx, :])
        normed_query = norm2[hc_idx](hidden_states[:, :, hc_idx, :])
        gate = (normed_key * normed_query).sum(dim=-1) / np.sqrt(hidden_size)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gates.append(gate.sigmoid().unsqueeze(-1))
    return torch.stack(gates, dim=2) * value.unsqueeze(2)


class DemoShortConv(torch.nn.Module):
    """The demo's ShortConv, transcribed (its forward returns silu(conv(norm(x))); the Engram layer adds x)."""

    def __init__(self, hidden_size, kernel_size, dilation, hc_mult, norm_eps=1e-5):
        super().__init__()
        total = hidden_size * hc_mult
        self.conv = torch.nn.Conv1d(
            total, total, kernel_size, groups=total, bias=False, padding=(kernel_size - 1) * dilation, dilation=dilation
        )
        self.norms = torch.nn.ModuleList([torch.nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    def forward(self, x):
        B, T, G, C = x.shape
        x_norm = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(G)], dim=-1)
        y = torch.nn.functional.silu(self.conv(x_norm.transpose(1, 2))[..., :T])
        return y.transpose(1, 2).view(B, T, G, C).contiguous()


ENGRAM = dict(
    layer_id=3, hidden_size=32, hc_mult=2, vocab_sizes=(61, 67), max_ngram_size=3, n_embed_per_ngram=16,
    n_head_per_ngram=2, kernel_size=4, pad_id=2, seed=5, tokenizer_vocab_size=90,
)  # fmt: skip


class DemoEngram(torch.nn.Module):
    def __init__(self, layer_ids, cfg):
        super().__init__()
        self.cfg = cfg
        self.multipliers, sizes = demo_hash_mapping(
            layer_ids, cfg["vocab_sizes"], cfg["max_ngram_size"], cfg["n_head_per_ngram"], cfg["seed"],
            cfg["tokenizer_vocab_size"],
        )  # fmt: skip
        self.multipliers, self.sizes = self.multipliers[cfg["layer_id"]], sizes[cfg["layer_id"]]
        flat = [x for y in self.sizes for x in y]
        self.multi_head_embedding = torch.nn.Module()
        self.multi_head_embedding.register_buffer("offsets", torch.tensor([0, *np.cumsum(flat)[:-1].tolist()]))
        self.multi_head_embedding.embedding = torch.nn.Embedding(
            sum(flat), cfg["n_embed_per_ngram"] // cfg["n_head_per_ngram"]
        )
        C, G = cfg["hidden_size"], cfg["hc_mult"]
        self.short_conv = DemoShortConv(C, cfg["kernel_size"], cfg["max_ngram_size"], G)
        hidden = (cfg["max_ngram_size"] - 1) * cfg["n_embed_per_ngram"]
        self.value_proj = torch.nn.Linear(hidden, C)
        self.key_projs = torch.nn.ModuleList([torch.nn.Linear(hidden, C) for _ in range(G)])
        self.norm1 = torch.nn.ModuleList([torch.nn.RMSNorm(C) for _ in range(G)])
        self.norm2 = torch.nn.ModuleList([torch.nn.RMSNorm(C) for _ in range(G)])

    def forward(self, hidden_states, input_ids):
        cfg = self.cfg
        hashes = demo_ngram_hashes(
            input_ids.cpu().numpy(), self.multipliers, self.sizes, cfg["max_ngram_size"], cfg["n_head_per_ngram"],
            cfg["pad_id"],
        )  # fmt: skip
        hashed = torch.from_numpy(hashes).to(hidden_states.device) + self.multi_head_embedding.offsets
        embeddings = self.multi_head_embedding.embedding(hashed).flatten(start_dim=-2)
        key = torch.stack([proj(embeddings) for proj in self.key_projs], dim=2)
        value = demo_gate(key, hidden_states, self.norm1, self.norm2, self.value_proj(embeddings))
        return value + self.short_conv(value)


def engram_pair(device, layer_ids=(1, 3)):
    torch.manual_seed(0)
    demo = DemoEngram(layer_ids, ENGRAM).to(device)
    with torch.no_grad():
        for p in demo.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    ours = memops.nn.Engram(**ENGRAM, layer_ids=layer_ids).to(device)
    ours.load_state_dict(demo.state_dict(), strict=True)
    return demo, ours
