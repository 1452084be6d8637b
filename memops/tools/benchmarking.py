"""The benchmark harness behind ``memops bench`` and ``pytest tests/benchmark_timings.py``.

A benchmark module (``memops.benchmarks.<family>``, from the repo's ``benchmarks/`` folder, one per op
family; ``BENCHMARKS`` maps each op to its module) defines, for one op:

- ``OP``: the op's name; ``BASELINES``: provider names the memops provider is compared with;
- ``cases(device, quick) -> list[Case]``;
- ``make_inputs(case, device, seed) -> object`` (fresh random inputs, never zeros);
- ``providers(case, device) -> dict[name, Callable[[inputs], Callable[[], object]]]``;
- ``bytes_moved(case, mode) -> int`` (the fewest bytes the op must move) and optionally ``flops``.

Every case is warmed up, then timed over many repeats, and reported as the median with its spread (the
interquartile range), its min and max, and the repeat count. On CUDA the repeats are
``triton.testing.do_bench(return_mode="all")`` (one call each, L2 flushed before each, rotating among several
input sets when one set fits in L2). On CPU they are ``torch.utils.benchmark.Timer.blocked_autorange`` blocks
(each the mean of ``calls_per_repeat`` calls, all of torch's threads), the providers of a case timed in turn
over CPU_ROUNDS rounds so that a shared machine's slow spell falls on all of them alike. A case whose spread exceeds
``NOISY_SPREAD`` of its median is timed again, up to ``RERUNS`` times; the tightest timing is kept and one that
stays noisy is flagged. Interpreter timings are never taken: the harness refuses to run with TRITON_INTERPRET=1.

GB/s counts the fewest bytes the op must move. Its ceiling is measured for each case's byte count: the faster
of a copy and a read-only pass over that many bytes (so a case whose bytes fit in a CPU cache is held to the
cache's speed, not DRAM's). "% of ceiling" above 100% would mean the byte count does not bound the op; it is
then not reported (None) and the case is flagged.
"""

from __future__ import annotations

import contextlib
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

from memops.benchmarks import MODULES

# op name -> benchmark module (one module per op family)
BENCHMARKS = {op: module for module, (op, _) in MODULES.items()}  # op -> its benchmark module
L2_BYTES_GUESS = 64 << 20
NOISY_SPREAD = 0.10  # IQR / median above which a case is timed again
# blocked_autorange's minimum measuring time per provider and case, over all rounds. MEMOPS_BENCH_MIN_RUN_S
# shortens it, and MEMOPS_BENCH_RERUNS=0 drops the noisy reruns, where only the run's outputs matter (the
# suite's check that `memops bench --quick` works, on a machine busy with the other tests).
RERUNS = int(os.environ.get("MEMOPS_BENCH_RERUNS", "2"))
CPU_MIN_RUN_S = float(os.environ.get("MEMOPS_BENCH_MIN_RUN_S", "0.45"))
CPU_ROUNDS = 3  # a CPU case's providers are timed in turn, this many rounds


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
    q1_ms: float | None = None  # first and third quartiles of the repeats: the spread is q3 - q1
    q3_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int | None = None
    calls_per_repeat: int | None = None
    noisy: bool = False  # the spread stayed above NOISY_SPREAD of the median after the reruns
    gbps: float | None = None
    tflops: float | None = None
    ceiling_gbps: float | None = None  # the faster of a copy and a read of this case's byte count
    fraction_of_ceiling: float | None = None
    speedup_vs: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    peak_memory_mb: float | None = None
    note: str | None = None


def quantized_providers(case: Case, device: str, build, plain: str) -> dict:
    """The providers of an 8-bit table case (``case.params["table"]``: "fp8" or "int8"): memops on the 8-bit
    table (``memops-fp8`` / ``memops-int8``; on CPU ``memops-reference``, named as every module's CPU path is),
    the plain-PyTorch dequantizing formulation named ``plain`` and, on CUDA, memops on the bf16 table
    (``memops-bf16``). ``build(flavour)`` makes each, flavour "memops", "torch" or "memops-bf16"."""
    ours = f"memops-{case.params['table']}" if device == "cuda" else "memops-reference"
    out = {ours: build("memops"), plain: build("torch")}
    if device == "cuda":
        out["memops-bf16"] = build("memops-bf16")
    return out


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


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repeated timings of one call, in milliseconds per call."""

    samples: tuple[float, ...]
    calls_per_repeat: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        q1, q3 = self.quartiles
        return (q3 - q1) / self.median if self.median > 0 else 0.0


_SINGLE_CALLS: list[bool] = []  # a rehearsal: measure() calls fn once (the times of a dry run mean nothing)


@contextlib.contextmanager
def _single_calls(active: bool):
    _SINGLE_CALLS.append(active)
    try:
        yield
    finally:
        _SINGLE_CALLS.pop()


def measure(fn: Callable[[], object], device: str, *, min_run_s: float = CPU_MIN_RUN_S) -> Timing:
    """Warm ``fn`` up, then time it over many repeats (see the module docstring)."""
    if _SINGLE_CALLS and _SINGLE_CALLS[-1]:
        start = time.perf_counter()
        fn()
        return Timing(((time.perf_counter() - start) * 1e3,))
    if device == "cuda":
        import triton.testing

        samples = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all")
        return Timing(tuple(float(t) for t in samples))
    from torch.utils import benchmark

    for _ in range(2):  # warm-up: first-call allocations, lazy inits, caches
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_s)
    return Timing(tuple(t * 1e3 for t in measurement.times), measurement.number_per_run)


def measure_steady(fn: Callable[[], object], device: str) -> tuple[Timing, bool]:
    """``measure``, again up to RERUNS times while the spread exceeds NOISY_SPREAD: (the tightest timing,
    whether it is still noisy)."""
    best = measure(fn, device)
    for _ in range(RERUNS):
        if best.spread <= NOISY_SPREAD:
            break
        again = measure(fn, device)
        best = min(best, again, key=lambda t: t.spread)
    return best, best.spread > NOISY_SPREAD


class Ceiling:
    """The bandwidth ceiling for moving a given number of bytes on this device: the faster of a copy
    (bytes/2 read, bytes/2 written) and a read-only sum over that many bytes, measured once per
    power-of-two size and cached."""

    def __init__(self, device: str):
        self.device = device
        self._gbps: dict[int, float] = {}

    def gbps(self, nbytes: int) -> float:
        # Rounded down: a smaller buffer is at least as fast, so the ceiling errs high, never low.
        bucket = max(1 << 16, 1 << (max(int(nbytes), 1).bit_length() - 1))
        if bucket not in self._gbps:
            self._gbps[bucket] = max(self.copy_gbps(bucket), self.read_gbps(bucket))
        return self._gbps[bucket]

    def copy_gbps(self, nbytes: int) -> float:
        src = torch.randn(max(nbytes // 8, 1), device=self.device)
        dst = torch.empty_like(src)
        ms = measure(lambda: dst.copy_(src), self.device, min_run_s=min(0.1, CPU_MIN_RUN_S)).median
        return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9

    def read_gbps(self, nbytes: int) -> float:
        src = torch.randn(max(nbytes // 4, 1), device=self.device)
        out = torch.empty((), device=self.device)
        ms = measure(lambda: torch.sum(src, dim=0, out=out), self.device, min_run_s=min(0.1, CPU_MIN_RUN_S)).median
        return src.numel() * 4 / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: str) -> float:
    """Measured device copy bandwidth (bytes read + bytes written per second) at DRAM size: the roof for a
    gather whose table does not fit in a cache."""
    numel = (1 << 28) if device == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), device, min_run_s=min(0.2, CPU_MIN_RUN_S)).median
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def input_bytes(inputs) -> int:
    """The bytes of the tensors in an input set (nested dicts, tuples and lists; a module's parameters and
    buffers)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.numel() * inputs.element_size()
    if isinstance(inputs, torch.nn.Module):
        return sum(input_bytes(t) for t in itertools.chain(inputs.parameters(), inputs.buffers()))
    if isinstance(inputs, dict):
        return sum(input_bytes(v) for v in inputs.values())
    if isinstance(inputs, (tuple, list)):
        return sum(input_bytes(v) for v in inputs)
    return 0


def _rotating(
    make: Callable[[int], object], build: Callable[[object], Callable[[], object]], set_bytes: int, device: str
):
    # When one input set fits in a GPU's L2, repeated calls would time the cache: cycle through enough
    # sets. (On CPU the extra sets only add page faults and noise.) A set is as large as the larger of the
    # bytes the op moves and the tensors it is given (a 1 GB table read at a few rows is not in L2).
    first = make(0)
    set_bytes = max(set_bytes, input_bytes(first))
    sets = 1
    if device == "cuda" and set_bytes < 4 * L2_BYTES_GUESS:
        sets = max(1, min(8, -(-4 * L2_BYTES_GUESS // max(set_bytes, 1))))
    calls = [build(first)] + [build(make(seed)) for seed in range(1, sets)]
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


def run_op(
    op: str, *, device: str, quick: bool, bandwidth_gbps: float, progress: bool = True, ceiling: Ceiling | None = None,
    cases: list[Case] | None = None, keep_provider: Callable[[str], bool] | None = None, rehearsal: bool = False,
) -> list[Result]:  # fmt: skip
    """Time every case and provider of ``op``; ``bandwidth_gbps`` is the DRAM copy bandwidth the table header
    quotes, ``ceiling`` the per-size bandwidth ceiling (one is made when not given). ``cases`` replaces the
    module's list and ``keep_provider`` filters the providers (the headline run). ``rehearsal``: the GPU's
    providers on this (CPU) device, each call timed once, the interpreter allowed: a dry run of the GPU plan
    whose times mean nothing."""
    if os.environ.get("TRITON_INTERPRET") == "1" and not rehearsal:
        raise RuntimeError("memops bench: TRITON_INTERPRET=1 is set; interpreter timings are not performance numbers")
    module = load(op)
    ceiling = ceiling or Ceiling(device)
    jobs = []
    for case in module.cases(device, quick) if cases is None else cases:
        if case.cuda_only and device != "cuda" and not rehearsal:
            continue
        for provider, build in module.providers(case, "cuda" if rehearsal else device).items():
            if keep_provider is None or keep_provider(provider):
                jobs.append((case, provider, build))
    results: list[Result] = []
    with _single_calls(rehearsal):
        timed = _timings(module, jobs, device, progress, op)
    for case, provider, _ in jobs:
        identity = dict(op=op, case=case.name, mode=case.mode, provider=provider, params=case.params, device=device)
        outcome = timed[(id(case), provider)]
        if isinstance(outcome, str):
            results.append(Result(**identity, error=outcome))
            continue
        fn, timing, noisy = outcome
        peak = _peak_memory_mb(fn, device)
        moved = module.bytes_moved(case, case.mode)
        flops = module.flops(case, case.mode) if hasattr(module, "flops") else None
        ms = timing.median
        gbps = moved / (ms * 1e-3) / 1e9
        roof = ceiling.gbps(moved)
        fraction = gbps / roof
        q1, q3 = timing.quartiles
        results.append(
            Result(
                **identity,
                median_ms=ms,
                q1_ms=q1,
                q3_ms=q3,
                min_ms=min(timing.samples),
                max_ms=max(timing.samples),
                repeats=len(timing.samples),
                calls_per_repeat=timing.calls_per_repeat,
                noisy=noisy or fraction > 1.0,
                gbps=gbps,
                tflops=(flops / (ms * 1e-3) / 1e12) if flops else None,
                ceiling_gbps=roof,
                # Above 1 the byte count does not bound the op (the data was reused from a cache it was not
                # counted against): no percentage is claimed.
                fraction_of_ceiling=fraction if fraction <= 1.0 else None,
                peak_memory_mb=peak,
                note=module.note(case, provider, device) if hasattr(module, "note") else None,
            )
        )
    _fill_speedups(results, module.MEMOPS_PROVIDERS, module.BASELINES)
    return results


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def _timings(module, jobs, device: str, progress: bool, op: str) -> dict:
    """(id(case), provider) -> (fn, Timing, noisy) or an error string. On CUDA each provider is timed on its own
    (one input set at a time: the large cases fill the GPU). On CPU a case's providers are timed in turn,
    CPU_ROUNDS rounds of a CPU_MIN_RUN_S / CPU_ROUNDS window each, and their samples pooled: a shared
    machine's slow spell then falls on every provider of the case, not on whichever ran during it."""
    out: dict = {}
    cases = list({id(case): case for case, _, _ in jobs}.values())  # Case holds a dict: not hashable
    done = 0
    for case in cases:
        members = [(provider, build) for c, provider, build in jobs if c is case]
        calls = {}
        for provider, build in members:
            if progress:
                _progress(done, len(jobs), f"{op} {case.name} {case.mode} {provider}")
            done += 1
            try:
                calls[provider] = _rotating(
                    lambda seed, c=case: module.make_inputs(c, device, seed), build, module.bytes_moved(case, "fwd"),
                    device,
                )  # fmt: skip
                if device == "cuda":
                    timing, noisy = measure_steady(calls[provider], device)
                    out[(id(case), provider)] = (calls.pop(provider), timing, noisy)
            except Exception as error:  # noqa: BLE001 - a provider without this dtype, mode or torch feature
                calls.pop(provider, None)
                out[(id(case), provider)] = _error_text(error)
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        if calls:
            out.update({(id(case), name): value for name, value in _interleaved(calls, device).items()})
    if progress:
        _progress(len(jobs), len(jobs), f"{op} done")
    return out


def _interleaved(calls: dict, device: str) -> dict:
    def one_pass(names):
        samples = {name: [] for name in names}
        blocks = {name: 1 for name in names}
        failed = {}
        for _ in range(1 if _SINGLE_CALLS and _SINGLE_CALLS[-1] else CPU_ROUNDS):
            for name in names:
                if name in failed:
                    continue
                try:
                    timing = measure(calls[name], device, min_run_s=CPU_MIN_RUN_S / CPU_ROUNDS)
                except Exception as error:  # noqa: BLE001 - recorded, as in the CUDA path
                    failed[name] = _error_text(error)
                    continue
                samples[name] += timing.samples
                blocks[name] = timing.calls_per_repeat
        timings = {n: Timing(tuple(samples[n]), blocks[n]) for n in names if n not in failed}
        return timings, failed

    timings, failed = one_pass(list(calls))
    for _ in range(RERUNS):  # the noisy providers again, in turn; each keeps its tighter timing
        noisy = [name for name, timing in timings.items() if timing.spread > NOISY_SPREAD]
        if not noisy:
            break
        again, _ = one_pass(noisy)
        for name, timing in again.items():
            timings[name] = min(timings[name], timing, key=lambda t: t.spread)
    out = {name: (calls[name], t, t.spread > NOISY_SPREAD) for name, t in timings.items()}
    return {**out, **failed}


def _fill_speedups(results: list[Result], ours: tuple[str, ...], baselines: tuple[str, ...]) -> None:
    by_key = {(r.case, r.mode, r.provider): r for r in results if r.median_ms is not None}
    for r in by_key.values():
        if r.provider in ours:
            for baseline in baselines:
                other = by_key.get((r.case, r.mode, baseline))
                if other is not None:
                    r.speedup_vs[baseline] = other.median_ms / r.median_ms


def spread_text(r) -> str:
    """The interquartile range over the median, as 'x.y%', for a Result or its JSON dict."""
    get = r.get if isinstance(r, dict) else lambda key: getattr(r, key, None)
    if get("q1_ms") is None or not get("median_ms"):
        return "—"
    return f"{100 * (get('q3_ms') - get('q1_ms')) / get('median_ms'):.1f}%"


def format_table(results: list[Result], device_label: str, bandwidth_gbps: float) -> str:
    lines = [
        f"device: {device_label}   measured DRAM copy bandwidth: {bandwidth_gbps:,.0f} GB/s"
        + ("   (CPU timings: reference and baselines only)" if results and results[0].device == "cpu" else ""),
        "ms: median of N repeats; IQR: interquartile range / median; ceiling: the faster of a copy and a read "
        "of the case's bytes, measured now; * noisy (spread > 10% after reruns) or above the ceiling",
        f"{'op':<20}{'case':<18}{'mode':<9}{'provider':<22}{'ms':>10}{'IQR':>8}{'N':>5}{'GB/s':>9}"
        f"{'ceiling':>9}{'%':>7}{'TFLOP/s':>9}{'peak MB':>9}  speedup (baseline time / ours)",
    ]
    for r in results:
        head = f"{r.op:<20}{r.case:<18}{r.mode:<9}{r.provider:<22}"
        if r.median_ms is None:
            lines.append(f"{head}{'—':>10}{'—':>8}{'—':>5}{'—':>9}{'—':>9}{'—':>7}{'—':>9}{'—':>9}  {r.error}")
            continue
        speedups = ", ".join(f"{b} {s:.2f}x" for b, s in r.speedup_vs.items())
        tflops = f"{r.tflops:.1f}" if r.tflops is not None else "—"
        peak = f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "—"
        percent = f"{100 * r.fraction_of_ceiling:.1f}" if r.fraction_of_ceiling is not None else ">100"
        ceiling = f"{r.ceiling_gbps:.0f}" if r.ceiling_gbps is not None else "—"
        flag = "*" if r.noisy else " "
        lines.append(
            f"{head}{r.median_ms:>9.3f}{flag}{spread_text(r):>8}{r.repeats:>5}{r.gbps:>9.1f}{ceiling:>9}{percent:>7}"
            f"{tflops:>9}{peak:>9}  {speedups}{'  (' + r.note + ')' if r.note else ''}"
        )
    return "\n".join(lines)


def drift_warning(before_gbps: float, after_gbps: float) -> str | None:
    """A warning when the DRAM copy bandwidth measured before and after an op's cases differs by more than
    NOISY_SPREAD: the machine's speed changed under the run (a shared or throttling machine), so its times
    compare with another run's only loosely; the ratios within the run still hold."""
    change = after_gbps / before_gbps - 1
    if abs(change) <= NOISY_SPREAD:
        return None
    return (
        f"warning: the copy bandwidth moved {100 * change:+.0f}% during these cases ({before_gbps:,.0f} -> "
        f"{after_gbps:,.0f} GB/s): not a quiet machine; compare speedups, not times, with other runs"
    )


def write_json(
    results: list[Result], path: Path, device_label: str, bandwidth_gbps: float, *, bandwidth_after_gbps=None
) -> None:
    import triton

    payload = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "device": device_label,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gbps": bandwidth_gbps,
        "copy_bandwidth_after_gbps": bandwidth_after_gbps,  # measured again after the cases (None: not measured)
        "timing": {
            "method": "triton.testing.do_bench(return_mode='all'), L2 flushed per call"
            if results and results[0].device == "cuda"
            else f"torch.utils.benchmark blocked_autorange after 2 warm-up calls; a case's providers in turn, "
            f"{CPU_ROUNDS} rounds of min_run_time={CPU_MIN_RUN_S / CPU_ROUNDS:.2f} s each, samples pooled",
            "statistic": "median of the repeats; spread = interquartile range (q1_ms..q3_ms)",
            "rerun_when_spread_above": NOISY_SPREAD,
            "reruns": RERUNS,
            "ceiling": "the faster of a copy and a read-only sum over the case's byte count, measured in this run",
        },
        "results": [dataclasses.asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))


def write_plot(results: list[Result], path: Path, device_label: str, *, metric: str = "time") -> bool:
    """The op's figure, False when matplotlib is not installed. Panels: time per case and provider (log scale,
    error bars from the quartiles); speedup of each memops provider against each baseline (with the 1.0
    line); and, for ``metric`` "bandwidth", the fraction of the bandwidth ceiling (with the 100% line), for
    "flops", the achieved TFLOP/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    timed = [r for r in results if r.median_ms is not None]
    if not timed:
        return False
    groups = list(dict.fromkeys((r.case, r.mode) for r in timed))
    labels = [f"{c}\n{m}" for c, m in groups]
    providers = list(dict.fromkeys(r.provider for r in timed))
    by_key = {(r.case, r.mode, r.provider): r for r in timed}
    pairs = list(dict.fromkeys((r.provider, b) for r in timed for b in r.speedup_vs))
    panels = ["time"] + (["speedup"] if pairs else []) + ([metric] if metric in ("bandwidth", "flops") else [])
    width_in = min(18, 6 + 1.1 * len(groups))  # room on the right for the legends
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.2 * len(panels)), squeeze=False)

    def bars(ax, series, value, error=None):
        width = 0.8 / max(len(series), 1)
        for index, (label, key) in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for g_index, group in enumerate(groups):
                r = by_key.get((*group, key))
                y = value(r, label) if r is not None else None
                if y is not None:
                    xs.append(g_index - 0.4 + width * (index + 0.5))
                    ys.append(y)
                    low, high = error(r) if error else (y, y)
                    lo.append(y - low)
                    hi.append(high - y)
            if xs:
                ax.bar(xs, ys, width, label=label, yerr=[lo, hi] if error else None, capsize=2)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(axis="y", alpha=0.3)

    for ax, panel in zip(axes[:, 0], panels):
        if panel == "time":
            bars(ax, [(p, p) for p in providers], lambda r, _: r.median_ms, lambda r: (r.q1_ms, r.q3_ms))
            ax.set_yscale("log")
            ax.set_ylabel("ms per call (log)\nmedian, IQR bars")
        elif panel == "speedup":

            def speedup(r, label):
                return r.speedup_vs.get(label.split(" vs ")[1])

            bars(ax, [(f"{ours} vs {base}", ours) for ours, base in pairs], speedup)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3gx"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel("speedup (log)\nbaseline time / ours")
        elif panel == "bandwidth":
            bars(ax, [(p, p) for p in providers],
                 lambda r, _: None if r.fraction_of_ceiling is None else 100 * r.fraction_of_ceiling)  # fmt: skip
            ax.axhline(100.0, color="black", linewidth=0.8)
            ax.set_ylabel("% of the bandwidth\nceiling (copy or read)")
        else:
            bars(ax, [(p, p) for p in providers], lambda r, _: r.tflops)
            ax.set_ylabel("TFLOP/s")
    axes[0, 0].set_title(f"{results[0].op} on {device_label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def headlines():
    """The headline list (memops/benchmarks/headline.py)."""
    from memops.benchmarks.headline import HEADLINES

    return HEADLINES


def headline_cases(*, rehearse: bool) -> list[tuple[object, Case]]:
    """(headline, case) for every headline entry and mode, the case taken from its benchmark module's CUDA
    list; ``rehearse``: with the entry's small parameters. A missing case, or a family of the compile check
    (memops.benchmarks.MODULES) without an entry, raises LookupError."""
    families = {family for _, family in MODULES.values()}
    missing = sorted(families - {entry.family for entry in headlines()})
    if missing:
        raise LookupError(f"no headline entry for the famil{'ies' if len(missing) > 1 else 'y'} {missing}: add "
                          "its real-size cases and goal to memops/benchmarks/headline.py")  # fmt: skip
    out = []
    for entry in headlines():
        cases = load(entry.op).cases("cuda", False)
        for mode in entry.modes:
            found = [case for case in cases if case.name == entry.case and case.mode == mode]
            if not found:
                raise LookupError(
                    f"headline {entry.op} {entry.case!r} {mode}: no such case in memops.benchmarks."
                    f"{BENCHMARKS[entry.op]} (its CUDA cases: "
                    f"{sorted({(c.name, c.mode) for c in cases})})"
                )
            case = found[0]
            if rehearse:
                case = dataclasses.replace(case, params={**case.params, **entry.small})
            out.append((entry, case))
    return out
