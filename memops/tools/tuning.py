"""What the launch-table sweeps share (``python -m memops.benchmarks.tune_*``, run by ``benchmarks/gpu/run.sh tune``):
timing one config, sweeping a list of configs against the launcher's default, and writing the chosen configs as
a patch-ready table beside the raw timings.

Compiling a config costs seconds (the product-key search, tens of seconds) and timing it a fraction of one, so
plan "tune" first runs each sweep as N processes with ``--compile-only I/N``: process I launches every N-th
config once, which compiles it into Triton's cache, and times nothing; then one process times every config,
its launches found in the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` on the GPU (triton's do_bench, L2 flushed per call)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


_SHARD: list[tuple[int, int]] = []  # (I, N) under --compile-only I/N


def run_sweeps(name: str, where: str, sweep_shapes: Callable[[argparse.Namespace, dict], None]) -> None:
    """A sweep module's main. Options: ``--out DIR``, ``--quick`` (the first two shapes, where a module has more)
    and ``--compile-only I/N``. ``sweep_shapes(args, report)`` appends each shape's timings to
    ``report["shapes"]`` and its (table key, :func:`sweep` result) pairs to ``report["rows"]``; then, unless
    the process only compiles, ``<out>/tune_<name>.json`` and the patch-ready ``<out>/tune-<name>.md`` (see
    :func:`write_table` and ``where``) are written, also when the sweep is interrupted."""
    import torch
    import triton

    parser = argparse.ArgumentParser(prog=f"python -m memops.benchmarks.tune_*: {name}")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true", help="the first two shapes only")
    parser.add_argument(
        "--compile-only", metavar="I/N", help="launch every N-th config once, from the I-th (compiles), time nothing"
    )
    args = parser.parse_args()
    if args.compile_only:
        index, count = (int(part) for part in args.compile_only.split("/"))
        _SHARD.append((index, count))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    report = {"device": device, "triton": triton.__version__, "shapes": [], "rows": []}
    try:
        sweep_shapes(args, report)
    finally:  # what was swept, also when the plan's limit interrupts the sweep
        if not _SHARD:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            timings = {key: value for key, value in report.items() if key != "rows"}
            (out / f"tune_{name}.json").write_text(json.dumps(timings, indent=1, default=str))
            write_table(out, name, where, report["rows"])


def sweep(name: str, configs: list[dict], run: Callable[[dict], object], default: dict) -> dict:
    """Time ``run(config)`` for every config and the default: {"default", "default_ms", "all": fastest first}. A
    config the compiler rejects (registers, shared memory) is reported and skipped. Under ``--compile-only I/N``:
    launch this process's share once each and time nothing."""
    if _SHARD:
        index, count = _SHARD[0]
        for config in ([default] if index == 0 else []) + configs[index::count]:
            try:
                run(config)
            except Exception as error:  # noqa: BLE001 - reported again by the timing process
                print(f"  {name} {config}: {type(error).__name__}")
        return {"default": default, "default_ms": float("nan"), "all": []}
    rows = []
    for config in configs:
        try:
            rows.append((time_ms(lambda config=config: run(config)), config))
        except Exception as error:  # noqa: BLE001 - out of shared memory or registers: not a candidate
            print(f"  {name} {config}: {type(error).__name__}")
    rows.sort(key=lambda row: row[0])
    default_ms = time_ms(lambda: run(default))
    print(f"  {name:<14} default {default} {default_ms:.3f} ms")
    for ms, config in rows[:3]:
        print(f"  {'':<14} best    {config} {ms:.3f} ms ({default_ms / ms:.2f}x vs default)")
    return {"default": default, "default_ms": default_ms, "all": [{"ms": ms, "config": c} for ms, c in rows]}


def write_table(out_dir: Path, name: str, where: str, entries: list[tuple[str, dict]]) -> Path:
    """``tune-<name>.md``: per (table key, sweep result) the default and the fastest config with their times,
    then the fastest configs as Python lines for ``where`` (the launch table or config function they replace).
    A config is proposed only when it beats the default by more than 3% (the sweeps' run-to-run noise)."""
    import torch

    lines = [
        f"## {name}: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}",
        "",
        "| key | default | ms | fastest | ms | speedup |",
        "|---|---|---:|---|---:|---:|",
    ]
    patch = []
    for key, result in entries:
        if not result["all"]:
            lines.append(f"| {key} | {result['default']} | {result['default_ms']:.3f} | (none compiled) | | |")
            continue
        best = result["all"][0]
        speedup = result["default_ms"] / best["ms"]
        lines.append(
            f"| {key} | {result['default']} | {result['default_ms']:.3f} | {best['config']} | {best['ms']:.3f} | "
            f"{speedup:.2f}x |"
        )
        if speedup > 1.03:
            patch.append(f"{key}: {best['config']},  # {best['ms']:.3f} ms vs {result['default_ms']:.3f} ms default")
    lines += ["", f"Patch-ready for {where}:", "", "```python"]
    lines += patch or ["# the defaults are within 3% of the fastest config: nothing to change"]
    lines += ["```", ""]
    path = Path(out_dir) / f"tune-{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
