"""The benchmark harness behind ``memops bench`` and ``pytest benchmarks/``.

A benchmark module (``memops.benchmarks.<family>``, from the repo's ``benchmarks/`` folder, one per op
family; ``BENCHMARKS`` maps each op to its module) defines, for one op:

- ``OP``: the op's name; ``BASELINES``: provider names the memops provider is compared with;
- ``cases(device, quick) -> list[Case]``;
- ``make_inputs(case, device, seed) -> object`` (fresh random inputs, never zeros);
- ``providers(case, device) -> dict[name, Callable[[inputs], Callable[[], object]]]``;
- ``bytes_moved(case, mode) -> int`` (the fewest bytes the op must move) and optionally ``flops``.

On CUDA, times are ``triton.testing.do_bench`` medians, rotating among several input sets when one set
fits in L2. On CPU, the reference and the baselines are timed with a wall clock and labelled as CPU
timings. Interpreter timings are never taken: the harness refuses to run with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# op name -> benchmark module (one module per op family)
BENCHMARKS = {
    "weighted_gather": "product_key",
    "product_key_topk": "product_key_search",
    "product_key_memory": "product_key_memory",
    "memory_attention": "attention",
    "retention_attention": "retention",
    "retention_capacity": "retention_capacity",
    "retention_cache": "retention_cache",
    "looped_attention": "looped",
    "block_route": "moe_routing",
    "block_moe": "moe_layer",
}
L2_BYTES_GUESS = 64 << 20


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mode: str  # "fwd" or "fwd+bwd"
    params: dict
    quick: bool = False
    cuda_only: bool = False


@dataclasses.dataclass
class Result:
    op: str
    case: str
    mode: str
    provider: str
    params: dict
    device: str
    median_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    fraction_of_copy_bandwidth: float | None = None
    speedup_vs: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    peak_memory_mb: float | None = None
    note: str | None = None


def case_grid(
    device: str, quick: bool, *, quick_cases=(), full_cases=(), cuda_quick=(), cuda_full=(), modes=("fwd", "fwd+bwd"),
) -> list[Case]:  # fmt: skip
    """The usual case list of a benchmark module, each group a sequence of (name, params): per mode, the
    quick cases; on full runs the full ones; on CUDA the CUDA-only quick ones, and on full CUDA runs the rest."""
    out = []
    for mode in modes:
        out += [Case(name, mode, params, quick=True) for name, params in quick_cases]
        if not quick:
            out += [Case(name, mode, params) for name, params in full_cases]
        if device == "cuda":
            out += [Case(name, mode, params, quick=True, cuda_only=True) for name, params in cuda_quick]
            if not quick:
                out += [Case(name, mode, params, cuda_only=True) for name, params in cuda_full]
    return out


def random_source(case: Case, device: str, seed: int):
    """(params, dtype, generator, randn) for a case's make_inputs: ``randn(*shape)`` draws fresh standard-normal
    values in the case's dtype from ``generator``, seeded with ``seed``."""
    dtype = getattr(torch, case.params["dtype"])
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(dtype)

    return case.params, dtype, generator, randn


def load(op: str):
    if op not in BENCHMARKS:
        raise ValueError(f"--op: unknown op {op!r}; expected one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"memops.benchmarks.{BENCHMARKS[op]}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    samples, deadline = [], time.perf_counter() + 1.0
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 100):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device copy bandwidth (bytes read + bytes written per second): the roof for a gather."""
    numel = (1 << 28) if device == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _rotating(
    make: Callable[[int], object], build: Callable[[object], Callable[[], object]], set_bytes: int, device: str
):
    # When one input set fits in a GPU's L2, repeated calls would time the cache: cycle through enough
    # sets. (On CPU the extra sets only add page faults and noise.)
    sets = 1
    if device == "cuda" and set_bytes < 4 * L2_BYTES_GUESS:
        sets = max(1, min(8, -(-4 * L2_BYTES_GUESS // max(set_bytes, 1))))
    calls = [build(make(seed)) for seed in range(sets)]
    if len(calls) == 1:
        return calls[0]
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def _peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory one call allocates on top of what was already live (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _progress(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty() and done not in (0, total):
        return
    width = 24
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_op(op: str, *, device: str, quick: bool, bandwidth_gbps: float, progress: bool = True) -> list[Result]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("memops bench: TRITON_INTERPRET=1 is set; interpreter timings are not performance numbers")
    module = load(op)
    jobs = []
    for case in module.cases(device, quick):
        if case.cuda_only and device != "cuda":
            continue
        for provider, build in module.providers(case, device).items():
            jobs.append((case, provider, build))
    results: list[Result] = []
    for n, (case, provider, build) in enumerate(jobs):
        if progress:
            _progress(n, len(jobs), f"{op} {case.name} {case.mode} {provider}")
        identity = dict(op=op, case=case.name, mode=case.mode, provider=provider, params=case.params, device=device)
        try:
            fn = _rotating(
                lambda seed, c=case: module.make_inputs(c, device, seed), build, module.bytes_moved(case, "fwd"), device
            )
            ms = time_ms(fn, device)
        except Exception as error:  # noqa: BLE001 - a provider without this dtype, mode or torch feature: record it, go on
            results.append(Result(**identity, error=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        peak = _peak_memory_mb(fn, device)
        moved = module.bytes_moved(case, case.mode)
        flops = module.flops(case, case.mode) if hasattr(module, "flops") else None
        gbps = moved / (ms * 1e-3) / 1e9
        results.append(
            Result(
                **identity,
                median_ms=ms,
                gbps=gbps,
                tflops=(flops / (ms * 1e-3) / 1e12) if flops else None,
                fraction_of_copy_bandwidth=gbps / bandwidth_gbps,
                peak_memory_mb=peak,
                note=module.note(case, provider, device) if hasattr(module, "note") else None,
            )
        )
    if progress:
        _progress(len(jobs), len(jobs), f"{op} done")
    _fill_speedups(results, module.MEMOPS_PROVIDERS, module.BASELINES)
    return results


def _fill_speedups(results: list[Result], ours: tuple[str, ...], baselines: tuple[str, ...]) -> None:
    by_key = {(r.case, r.mode, r.provider): r for r in results if r.median_ms is not None}
    for r in by_key.values():
        if r.provider in ours:
            for baseline in baselines:
                other = by_key.get((r.case, r.mode, baseline))
                if other is not None:
                    r.speedup_vs[baseline] = other.median_ms / r.median_ms


def format_table(results: list[Result], device_label: str, bandwidth_gbps: float) -> str:
    lines = [
        f"device: {device_label}   measured copy bandwidth: {bandwidth_gbps:,.0f} GB/s"
        + ("   (CPU timings: reference and baselines only)" if results and results[0].device == "cpu" else ""),
        f"{'op':<20}{'case':<18}{'mode':<9}{'provider':<22}{'ms':>10}{'GB/s':>9}{'% copy':>8}{'TFLOP/s':>9}"
        f"{'peak MB':>9}  speedup (baseline time / ours)",
    ]
    for r in results:
        head = f"{r.op:<20}{r.case:<18}{r.mode:<9}{r.provider:<22}"
        if r.median_ms is None:
            lines.append(f"{head}{'—':>10}{'—':>9}{'—':>8}{'—':>9}{'—':>9}  {r.error}")
            continue
        speedups = ", ".join(f"{b} {s:.2f}x" for b, s in r.speedup_vs.items())
        tflops = f"{r.tflops:.1f}" if r.tflops is not None else "—"
        peak = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "—"
        lines.append(
            f"{head}{r.median_ms:>10.3f}{r.gbps:>9.1f}{100 * r.fraction_of_copy_bandwidth:>7.1f}%{tflops:>9}{peak:>9}"
            f"  {speedups}{'  (' + r.note + ')' if r.note else ''}"
        )
    return "\n".join(lines)


def write_json(results: list[Result], path: Path, device_label: str, bandwidth_gbps: float) -> None:
    import triton

    payload = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": device_label,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gbps": bandwidth_gbps,
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))


def write_plot(results: list[Result], path: Path, device_label: str) -> bool:
    """A bar chart of achieved GB/s per case and provider; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r.case, r.mode) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    by_key = {(r.case, r.mode, r.provider): r for r in results if r.gbps is not None}
    fig, ax = plt.subplots(figsize=(min(14, 3 + 1.3 * len(groups)), 4.5))
    width = 0.8 / len(providers)
    for p_index, provider in enumerate(providers):
        xs, ys = [], []
        for g_index, (case, mode) in enumerate(groups):
            r = by_key.get((case, mode, provider))
            if r is not None:
                xs.append(g_index + p_index * width)
                ys.append(r.gbps)
        ax.bar(xs, ys, width, label=provider)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=8)
    ax.set_ylabel("GB/s (minimum bytes moved / time)")
    ax.set_title(f"{results[0].op} on {device_label}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
