"""Row-sparse optimizer benchmarks (issue 32): one optimizer step on a memory table whose gradient names n rows
(uniform at random, repeats summed): memops.optim.SparseAdam and RowwiseAdagrad (one kernel that sums the
repeats and updates the touched rows) against torch.optim.SparseAdam on the same sparse gradient and
torch.optim.AdamW over the dense gradient (fused on CUDA). The mode "fwd" is the step alone.

The mode "fwd+bwd" is a training step of the table: the read (forward), its backward and the optimizer step.
"memops-fused" / "memops-adagrad-fused" apply the optimizer in the backward (memops.optim.
apply_optimizer_in_backward: no gradient of the table is formed); "memops" reads with sparse=True and steps
SparseAdam on the sparse_coo grad; "torch-sparse-adam" the same with torch.optim.SparseAdam; "torch-adamw" reads
with a dense grad (zeroed to None each step, as training loops do) and steps fused AdamW. The Engram table is
read by engram_lookup (the demo's hash: 2- and 3-grams, 8 heads each, B x L = 4 x 2048), the MLaS values by
weighted_gather (4,096 tokens x 128 picks).

Bytes: what the touched rows require of the sparse steps, the n gradient rows read once and, per touched row,
the table row read and written and its state (Adam: two fp32 rows; Adagrad: one fp32 value) read and written;
for "fwd+bwd" also the forward's n row reads and its output written, and the output gradient read. Every
provider is measured against those bytes, so the dense AdamW's ratio shows what touching every row costs.
"""

from __future__ import annotations

import torch

import memops
from memops.optim import RowwiseAdagrad, SparseAdam, apply_optimizer_in_backward
from memops.reference.engram import engram_hash_params, table_offsets
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "optim"
METRIC = "bandwidth"
MEMOPS_PROVIDERS = (
    "memops", "memops-reference", "memops-adagrad", "memops-adagrad-reference", "memops-fused",
    "memops-fused-reference", "memops-adagrad-fused", "memops-adagrad-fused-reference",
)  # fmt: skip
BASELINES = ("torch-sparse-adam", "torch-adamw")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("torch-sparse-adam",)


# Engram's demo table: 2- and 3-grams (N = 3), 8 heads each of at least 129,280 * 5 rows, d = 64
ENGRAM_DEMO = dict(vocab=129280 * 5, N=3, h=8)


def cases(device: str, quick: bool) -> list[Case]:
    small = dict(R=65536, D=64, n=8192, dtype="fp32")
    out = [Case("small", "fwd", small, quick=True), Case("small", "fwd+bwd", dict(small, T=1024, K=8), quick=True)]
    if device == "cuda":
        # Engram's demo table (about 10.3 M rows of d = 64) read by B*L = 8,192 tokens x 16 heads, and Memory
        # Layers at Scale's value table (2^20 rows x 1024) read by 4,096 tokens x 128 slots, in bf16.
        engram = dict(R=10_300_000, D=64, n=8192 * 16, dtype="bf16")
        out.append(Case("engram-table", "fwd", engram, cuda_only=True))
        out.append(Case("engram-table", "fwd+bwd", dict(engram, B=4, L=2048, **ENGRAM_DEMO), cuda_only=True))
        mlas = dict(R=1 << 20, D=1024, n=4096 * 128, dtype="bf16")
        out.append(Case("mlas-values", "fwd", mlas, cuda_only=True))
        out.append(Case("mlas-values", "fwd+bwd", dict(mlas, T=4096, K=128), cuda_only=True))
    return out


def _dtype(case: Case) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[case.params["dtype"]]


def _engram_hash(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(multipliers, primes) of the demo's hash for one layer with these table sizes and heads."""
    hash_params = engram_hash_params(
        (1,), [p["vocab"]] * (p["N"] - 1), max_ngram_size=p["N"], n_head_per_ngram=p["h"], seed=0,
        tokenizer_vocab_size=128000,
    )  # fmt: skip
    return hash_params[1]


def _read_inputs(case: Case, device: str, generator: torch.Generator) -> dict:
    """The table, a read of it (``read(table, sparse)``: engram_lookup or weighted_gather) and its output grad."""
    p, dtype = case.params, _dtype(case)
    if "B" in p:  # the Engram table, read by engram_lookup with the demo's hash
        multipliers, primes = (t.to(device) for t in _engram_hash(p))
        offsets = table_offsets(primes)
        ids = torch.randint(0, 128000, (p["B"], p["L"]), device=device, generator=generator)
        rows = int(primes.sum())

        def read(table, sparse):
            return memops.engram_lookup(ids, table, multipliers, primes, offsets, pad_id=2, sparse=sparse)

        grad_shape = (p["B"], p["L"], primes.numel() * p["D"])
    else:
        rows = p["R"]
        indices = torch.randint(0, rows, (p["T"], p["K"]), device=device, generator=generator)
        weights = torch.softmax(torch.randn(p["T"], p["K"], device=device, generator=generator), -1).to(dtype)

        def read(table, sparse):
            return memops.weighted_gather(table, indices, weights, check_indices=False, sparse=sparse)

        grad_shape = (p["T"], p["D"])
    table = (0.02 * torch.randn(rows, p["D"], device=device, generator=generator)).to(dtype)
    grad = torch.randn(grad_shape, device=device, generator=generator).to(dtype)
    return dict(table=table, read=read, grad=grad)


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
    if case.mode == "fwd+bwd":
        return _read_inputs(case, device, torch.Generator(device=device).manual_seed(seed))
    generator = torch.Generator(device=device).manual_seed(seed)
    table = (0.02 * torch.randn(p["R"], p["D"], device=device, generator=generator)).to(_dtype(case))
    rows = torch.randint(0, p["R"], (p["n"],), device=device, generator=generator)
    values = torch.randn(p["n"], p["D"], device=device, generator=generator).to(_dtype(case))
    return table, rows, values


def _sparse_step(optimizer_class):
    def build(inputs):
        table, rows, values = inputs
        param = torch.nn.Parameter(table.clone())
        param.grad = torch.sparse_coo_tensor(rows.reshape(1, -1), values, param.shape, check_invariants=False)
        optimizer = optimizer_class([param], lr=1e-3)

        def step():
            optimizer.step()
            return param

        return step

    return build


def _dense_adamw(inputs):
    table, rows, values = inputs
    param = torch.nn.Parameter(table.clone())
    param.grad = torch.zeros_like(table).index_add_(0, rows, values)
    optimizer = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.0, fused=table.is_cuda)

    def step():
        optimizer.step()
        return param

    return step


def _fused_training_step(optimizer_class):
    def build(inputs):
        param = torch.nn.Parameter(inputs["table"].clone())
        apply_optimizer_in_backward(optimizer_class, [param], {"lr": 1e-3})

        def step():
            inputs["read"](param, False).backward(inputs["grad"])
            return param

        return step

    return build


def _training_step(optimizer_class, sparse: bool):
    def build(inputs):
        param = torch.nn.Parameter(inputs["table"].clone())
        fused = dict(fused=True) if optimizer_class is torch.optim.AdamW and param.is_cuda else {}
        optimizer = optimizer_class([param], lr=1e-3, **fused)

        def step():
            inputs["read"](param, sparse).backward(inputs["grad"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return param

        return step

    return build


def providers(case: Case, device: str) -> dict:
    cuda = device == "cuda"
    if case.mode == "fwd+bwd":
        suffix = "" if cuda else "-reference"
        out = {
            f"memops-fused{suffix}": _fused_training_step(SparseAdam),
            f"memops-adagrad-fused{suffix}": _fused_training_step(RowwiseAdagrad),
            f"memops{suffix}": _training_step(SparseAdam, sparse=True),
            "torch-sparse-adam": _training_step(torch.optim.SparseAdam, sparse=True),
        }
        if cuda or case.params["R"] * case.params["D"] <= (1 << 24):
            out["torch-adamw"] = _training_step(torch.optim.AdamW, sparse=False)
        return out
    out = {
        ("memops" if cuda else "memops-reference"): _sparse_step(SparseAdam),
        ("memops-adagrad" if cuda else "memops-adagrad-reference"): _sparse_step(RowwiseAdagrad),
        "torch-sparse-adam": _sparse_step(torch.optim.SparseAdam),
    }
    if cuda or case.params["R"] * case.params["D"] <= (1 << 24):
        out["torch-adamw"] = _dense_adamw
    return out


def _touched_rows(case: Case) -> float:
    """The expected number of distinct rows among n uniform draws from R."""
    R, n = case.params["R"], case.params["n"]
    return R * (1 - (1 - 1 / R) ** n)


def note(case: Case, provider: str, device: str) -> str:
    """The optimizer state the provider keeps for the table (SparseAdam, torch's SparseAdam and AdamW: two fp32
    values per element; row-wise Adagrad: one fp32 value per row), and AdamW's dense gradient beside it."""
    R = _engram_rows(case) if case.mode == "fwd+bwd" and "B" in case.params else case.params["R"]
    D, element = case.params["D"], 4 if case.params["dtype"] == "fp32" else 2
    state = R * 4 if "adagrad" in provider else R * D * 8
    text = f"optimizer state {state / 1e6:,.1f} MB"
    if provider == "torch-adamw":
        text += f" + dense grad {R * D * element / 1e6:,.1f} MB"
    return text


def _engram_rows(case: Case) -> int:
    return int(_engram_hash(case.params)[1].sum())


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    element = 4 if p["dtype"] == "fp32" else 2
    per_row = p["D"] * (2 * element + 16)  # the row read and written, and Adam's two fp32 state rows
    step = p["n"] * p["D"] * element + _touched_rows(case) * per_row
    if mode == "fwd":
        return int(step)
    outputs = p["T"] * p["D"] if "T" in p else p["n"] * p["D"]  # a gather's (T, D); the lookup's slice per entry
    return int(step + (p["n"] * p["D"] + 2 * outputs) * element)  # + the forward's reads and output, grad_out


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import optim

    if dtype == "tf32":  # no dots: the same compile as fp32
        return
    dt = scenarios.torch_dtype(dtype)
    # the subset: the step on the Engram table, and the fused backward of the MLaS gather (its scales)
    keep = lambda case: (case.name, case.mode) in (("engram-table", "fwd"), ("mlas-values", "fwd+bwd"))  # noqa: E731
    for case in scenarios.cases("optim", subset, keep=keep):
        p = case.params
        # (engram_lookup's fused backward hands one output-gradient slice per entry: the step's variant)
        gather = case.mode == "fwd+bwd" and "T" in p

        def run(p=p, gather=gather):
            table = scenarios.meta(p["R"], p["D"], dtype=dt)
            rows = scenarios.meta(p["n"], dtype=torch.int64)
            entries = {}
            if gather:  # a weighted gather's fused backward: grad_out rows shared by K picks, scaled by weights
                grads = scenarios.meta(p["T"], p["D"], dtype=dt)
                entries = dict(scales=scenarios.meta(p["n"], dtype=dt), group_size=p["K"])
            else:
                grads = scenarios.meta(p["n"], p["D"], dtype=dt)
            states = [scenarios.meta(p["R"], p["D"], dtype=torch.float32) for _ in range(2)]
            sum_sq = scenarios.meta(p["R"], dtype=torch.float32)
            # stochastic rounding (a seed) compiles its own variant for bf16 / fp16 tables
            for seed in (None, 7) if dt in (torch.bfloat16, torch.float16) else (None,):
                for maximize in (False, True):
                    optim.sparse_adam_step(table, *states, rows, grads, step=3, lr=1e-3, beta1=0.9, beta2=0.999,
                                           eps=1e-8, weight_decay=0.01, maximize=maximize, seed=seed,
                                           **entries)  # fmt: skip
                optim.rowwise_adagrad_step(table, sum_sq, rows, grads, lr=1e-2, eps=1e-8, weight_decay=0.01,
                                           seed=seed, **entries)  # fmt: skip

        yield f"{'fused backward' if gather else 'step'} {case.name} {case.mode}", run
