"""Row-sparse optimizer benchmarks (issue 32): one optimizer step on a memory table whose gradient names n rows
(uniform at random, repeats summed): memops.optim.SparseAdam and RowwiseAdagrad (one kernel that sums the
repeats and updates the touched rows) against torch.optim.SparseAdam on the same sparse gradient and
torch.optim.AdamW over the dense gradient (fused on CUDA). The mode "fwd" is the step alone.

Bytes: what the touched rows require of the sparse steps, the n gradient rows read once and, per touched row,
the table row read and written and its state (Adam: two fp32 rows; Adagrad: one fp32 value) read and written;
every provider is measured against those bytes, so the dense AdamW's ratio shows what touching every row costs.
"""

from __future__ import annotations

import torch

from memops.optim import RowwiseAdagrad, SparseAdam
from memops.tools import compile_scenarios as scenarios
from memops.tools.benchmarking import Case

OP = "optim"
METRIC = "bandwidth"
MEMOPS_PROVIDERS = ("memops", "memops-reference", "memops-adagrad", "memops-adagrad-reference")
BASELINES = ("torch-sparse-adam", "torch-adamw")
# Baselines that compute this very op in plain PyTorch: benchmarks/cpu_ratio.py holds the reference to them.
EQUIVALENT = ("torch-sparse-adam",)


def cases(device: str, quick: bool) -> list[Case]:
    out = [Case("small", "fwd", dict(R=65536, D=64, n=8192, dtype="fp32"), quick=True)]
    if device == "cuda":
        # Engram's demo table (about 10.3 M rows of d = 64) read by B*L = 8,192 tokens x 16 heads, and Memory
        # Layers at Scale's value table (2^20 rows x 1024) read by 4,096 tokens x 128 slots, in bf16.
        out.append(Case("engram-table", "fwd", dict(R=10_300_000, D=64, n=8192 * 16, dtype="bf16"), cuda_only=True))
        out.append(Case("mlas-values", "fwd", dict(R=1 << 20, D=1024, n=4096 * 128, dtype="bf16"), cuda_only=True))
    return out


def _dtype(case: Case) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[case.params["dtype"]]


def make_inputs(case: Case, device: str, seed: int):
    p = case.params
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


def providers(case: Case, device: str) -> dict:
    cuda = device == "cuda"
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


def bytes_moved(case: Case, mode: str) -> int:
    p = case.params
    element = 4 if p["dtype"] == "fp32" else 2
    per_row = p["D"] * (2 * element + 16)  # the row read and written, and Adam's two fp32 state rows
    return int(p["n"] * p["D"] * element + _touched_rows(case) * per_row)


# ---------------------------------------------------------------------------------------------------------
# Compile scenarios: what `memops gpu-check` compiles for this module (memops/tools/compile_scenarios.py)


def compile_scenarios(dtype, subset):
    from memops.kernels import optim

    if dtype == "tf32":  # no dots: the same compile as fp32
        return
    dt = scenarios.torch_dtype(dtype)
    for case in scenarios.cases("optim", subset, keep=lambda case: case.name == "engram-table"):
        p = case.params

        def run(p=p):
            table, grads = scenarios.meta(p["R"], p["D"], dtype=dt), scenarios.meta(p["n"], p["D"], dtype=dt)
            rows = scenarios.meta(p["n"], dtype=torch.int64)
            states = [scenarios.meta(p["R"], p["D"], dtype=torch.float32) for _ in range(2)]
            sum_sq = scenarios.meta(p["R"], dtype=torch.float32)
            # stochastic rounding (a seed) compiles its own variant for bf16 / fp16 tables
            for seed in (None, 7) if dt in (torch.bfloat16, torch.float16) else (None,):
                for maximize in (False, True):
                    optim.sparse_adam_step(table, *states, rows, grads, step=3, lr=1e-3, beta1=0.9, beta2=0.999,
                                           eps=1e-8, weight_decay=0.01, maximize=maximize, seed=seed)  # fmt: skip
                optim.rowwise_adagrad_step(table, sum_sq, rows, grads, lr=1e-2, eps=1e-8, weight_decay=0.01,
                                           seed=seed)  # fmt: skip

        yield f"step {case.name}", run
