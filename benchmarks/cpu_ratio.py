"""The CPU path's speed: every op's reference (``memops.<op>`` on CPU tensors, which runs ``memops.reference``)
against the fastest plain-PyTorch formulation of the same op, in one process, medians of repeats.

    python -m memops.benchmarks.cpu_ratio [--out benchmarks/results/cpu-2core]

The formulations are the baselines each benchmark module lists in ``EQUIVALENT``: the same op written as one
would by hand (``F.embedding_bag``, cat + SDPA, SDPA with the decay as a float mask, topk-based routing, ...).
Before timing, each formulation's forward output is checked against the reference's on the same inputs, so
a ratio always compares two ways of computing one thing. The providers are timed in turn, round after
round, so that the machine's slow spells fall on both. The ratio is reference time / best formulation's
time: at most ``TARGET`` is the goal (issue 18). Writes ``cpu_ratio.json`` and ``cpu_ratio.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from memops.tools import benchmarking

TARGET = 1.5
ROUNDS = 7
REFERENCE = "memops-reference"


@dataclasses.dataclass
class Ratio:
    op: str
    case: str
    mode: str
    reference_ms: float
    reference_iqr: float
    best: str
    best_ms: float
    best_iqr: float
    ratio: float
    repeats: int
    others: dict  # every formulation's median ms


def tensor_leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in tensor_leaves(item)]
    return []


def check_same_op(op: str, provider: str, ours, theirs) -> None:
    """The formulation's forward output equals the reference's (the leading tensors both return)."""
    mine, other = tensor_leaves(ours), tensor_leaves(theirs)
    if not mine or not other:
        raise AssertionError(f"{op}: {provider} or the reference returned no tensor to compare")
    for a, b in zip(mine, other):
        a, b = a.detach().double(), b.detach().double()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
            raise AssertionError(f"{op}: {provider} does not compute the reference's output")


def _interleaved(calls: dict, rounds: int = ROUNDS) -> dict[str, benchmarking.Timing]:
    """Per provider, the medians of ``rounds`` short timings taken in turn (reference, formulation, reference,
    ...), so a slow spell of the machine lands on every provider alike rather than on whichever ran then."""
    medians: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            medians[name].append(benchmarking.measure(call, "cpu", min_run_s=0.1).median)
    return {name: benchmarking.Timing(tuple(values)) for name, values in medians.items()}


def run(ops: list[str] | None = None, *, progress: bool = True) -> list[Ratio]:
    ratios = []
    for op in ops or benchmarking.BENCHMARKS:
        module = benchmarking.load(op)
        for case in module.cases("cpu", quick=True):
            if case.cuda_only:
                continue
            built = module.providers(case, "cpu")
            names = [name for name in getattr(module, "EQUIVALENT", ()) if name in built]
            if REFERENCE not in built or not names:
                continue
            if progress:
                print(f"{op} {case.name} {case.mode}: {REFERENCE} vs {', '.join(names)}", file=sys.stderr)
            calls = {name: built[name](module.make_inputs(case, "cpu", 0)) for name in [REFERENCE, *names]}
            if case.mode in ("fwd", "evict"):
                expected = calls[REFERENCE]()
                for name in names:
                    check_same_op(op, name, expected, calls[name]())
            timings = _interleaved(calls)
            best = min(names, key=lambda name: timings[name].median)
            ratios.append(
                Ratio(
                    op=op,
                    case=case.name,
                    mode=case.mode,
                    reference_ms=timings[REFERENCE].median,
                    reference_iqr=timings[REFERENCE].spread,
                    best=best,
                    best_ms=timings[best].median,
                    best_iqr=timings[best].spread,
                    ratio=timings[REFERENCE].median / timings[best].median,
                    repeats=len(timings[REFERENCE].samples),
                    others={name: timings[name].median for name in names},
                )
            )
    return ratios


def markdown(ratios: list[Ratio], label: str) -> str:
    worst = max((r.ratio for r in ratios), default=float("nan"))
    lines = [
        f"CPU path: the reference against the fastest plain-PyTorch formulation of the same op ({label}, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}; `python -m memops.benchmarks.cpu_ratio`). "
        f"Each time is the median of {ROUNDS} rounds taken in turn with the other provider (each round itself a "
        "median of repeats), in one process; IQR is the interquartile range of the rounds over their median. "
        f"Target: ratio <= "
        f"{TARGET}; worst here {worst:.2f}.",
        "",
        "| op | case | mode | reference ms (IQR) | best formulation | its ms (IQR) | ratio |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in ratios:
        lines.append(
            f"| {r.op} | {r.case} | {r.mode} | {r.reference_ms:.3f} ({100 * r.reference_iqr:.0f}%) | {r.best} | "
            f"{r.best_ms:.3f} ({100 * r.best_iqr:.0f}%) | {r.ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memops.benchmarks.cpu_ratio", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for cpu_ratio.json and cpu_ratio.md (default: print only)")
    parser.add_argument("--op", action="append", help="only this op (repeatable; default: every op)")
    args = parser.parse_args(argv)
    for op in args.op or ():
        benchmarking.load(op)  # unknown names fail before any timing
    if torch.cuda.is_available():
        print("note: CUDA is available, but this benchmark times the CPU path only", file=sys.stderr)
    label = benchmarking.device_name("cpu")
    ratios = run(args.op)
    text = markdown(ratios, label)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"device": label, "torch": torch.__version__, "target": TARGET,
                   "ratios": [dataclasses.asdict(r) for r in ratios]}  # fmt: skip
        (out / "cpu_ratio.json").write_text(json.dumps(payload, indent=2))
        (out / "cpu_ratio.md").write_text(text)
        print(f"wrote {out / 'cpu_ratio.json'}, {out / 'cpu_ratio.md'}")
    return 0 if all(r.ratio <= TARGET for r in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
