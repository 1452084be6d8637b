"""The GPU run (``benchmarks/gpu/run.sh``): the headline benchmark, the ceilings its figures are a percentage
of, each step's budget, and the check of what comes back.

A lent GPU gives one call of at most 10 minutes, and at most 8 files come back from it. Plan ``check`` spends
it in steps whose budgets are derived here from counts (``budget_rows``): the Triton variants to compile and
their measured compile seconds (the committed ``memops gpu-check`` sweep), the CUDA tests, the sanitizer's
cases, the headline benchmark's timed jobs. ``run.sh rehearse`` runs the same steps on a CPU machine, under
Triton's interpreter at the headline list's small shapes, and :func:`check_outputs` fails it on a missing
file, a file too large or too many files.

``memops bench --headline`` (:func:`run_headline`):

1. measures the ceilings in the same run: the DRAM copy and read bandwidth and the bf16 and tf32 matmul rates;
2. an untimed warm-up pass calls every provider of every headline case once (Triton's and torch.compile's
   caches filled; a FlexAttention that fell back to its unfused form is noted);
3. the timed pass, case by case: each finished case's results are appended to ``headline.jsonl`` at once, so
   a call killed mid-run keeps every case done so far;
4. ``headline.md``: every figure as a percentage of the ceiling that bounds it, the speedups against the
   goal's baselines, and the goal; per-op JSON (``memops report`` renders them) and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from memops.tools import benchmarking

MAX_FILES = 8  # what comes back from the device call
MAX_FILE_BYTES = 16 << 20
PLAN_SECONDS = 9 * 60  # plan "check" must fit in one device call of 10 minutes, with a minute spare
# Each step's time limit in run.sh (SIGINT at the limit, SIGKILL 15 s later): they sum to at most PLAN_SECONDS.
STEP_LIMITS = dict(info=25, compile=80, tests=100, sanitize=85, bench=240)
# Plan "tune": the sweeps' limits (info 30 s first), also summing to at most PLAN_SECONDS.
TUNE_LIMITS = {"tune-attention": 150, "tune-gather": 90, "tune-search": 100, "tune-moe": 90, "tune-engram": 50}
# The files plan "check" leaves in $OUT (the rehearsal checks them): bench.tar holds the per-op JSON and plots,
# the compile-ahead log, the tests' junit XML and the sanitized script's own output.
CHECK_FILES = (
    "device.txt", "tests.log", "tests-at-scale.log", "sanitize.log", "bench.log", "headline.jsonl", "headline.md",
    "extras.tar",
)  # fmt: skip


def headline_providers(entry, case) -> list[str]:
    """The providers one headline case times: memops' (not its CPU path) and the goal's baselines. Each baseline
    must exist in at least one of the entry's modes (torch._grouped_mm, for one, has no backward)."""
    module = benchmarking.load(entry.op)
    available = list(module.providers(case, "cuda"))
    in_any_mode = {
        name for mode in entry.modes for name in module.providers(dataclasses.replace(case, mode=mode), "cuda")
    }
    missing = [name for name in entry.baselines if name not in in_any_mode]
    if missing:
        raise LookupError(f"headline {entry.op} {entry.case}: no provider {missing} in any mode; has {available}")
    ours = [name for name in available if name in module.MEMOPS_PROVIDERS and name != "memops-reference"]
    return ours + [name for name in available if name in entry.baselines]


# ---------------------------------------------------------------------------------------------------------
# Ceilings


def measure_ceilings(device: str) -> dict:
    """The run's ceilings: DRAM copy and read bandwidth (GB/s) and the bf16 and tf32 matmul rates (TFLOP/s)."""
    read_gbps = benchmarking.Ceiling(device).read_gbps((1 << 30) if device == "cuda" else (1 << 22))
    n = 8192 if device == "cuda" else 256
    rates = {}
    for name, dtype, precision in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high")):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            ms = benchmarking.measure(lambda a=a, b=b: a @ b, device, min_run_s=0.1).median
        finally:
            torch.set_float32_matmul_precision(previous)
        rates[name] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b
    return dict(
        copy_gbps=benchmarking.copy_bandwidth_gbps(device),
        read_gbps=read_gbps,
        matmul_bf16_tflops=rates["bf16"],
        matmul_tf32_tflops=rates["tf32"],
        matmul_n=n,
    )


def ceiling_of(result: dict, metric: str, ceilings: dict) -> tuple[str, float | None]:
    """(what bounds the figure, the figure as a fraction of it) for one result."""
    if result.get("median_ms") is None:
        return "", None
    if metric == "bandwidth":
        return "copy", result["gbps"] / ceilings["copy_gbps"]
    if metric == "flops" and result.get("tflops"):
        dtype = result["params"].get("dtype", "bfloat16")
        rate = ceilings["matmul_bf16_tflops" if dtype in ("bfloat16", "float16") else "matmul_tf32_tflops"]
        return ("bf16 matmul" if dtype in ("bfloat16", "float16") else "tf32 matmul"), result["tflops"] / rate
    return "", None


# ---------------------------------------------------------------------------------------------------------
# The headline run


def compiled_provider(name: str) -> bool:
    """A baseline whose first call compiles with torch.compile (tens of seconds each)."""
    return "compile" in name or "flex" in name


def _warm_up(entry, case, names: list[str], device: str) -> dict:
    """Call the named providers of the case once, untimed: provider -> None, or a note (an error, or a
    FlexAttention that fell back to its unfused form)."""
    module = benchmarking.load(entry.op)
    builds = module.providers(case, "cuda")
    notes = {}
    for name in names:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call = builds[name](module.make_inputs(case, device, 0))
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
            texts = " ".join(str(w.message) for w in caught).lower()
            fell_back = "recompile" in texts or "unfused" in texts or "without torch.compile" in texts
            notes[name] = "ran unfused (torch.compile fell back)" if "flex" in name and fell_back else None
        except Exception as error:  # noqa: BLE001 - recorded; the timed pass reports it again
            notes[name] = benchmarking._error_text(error)
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    return notes


def _warm_compiled_job(job: tuple[int, str, bool]) -> str:
    index, name, rehearse = job
    entry, case = benchmarking.headline_cases(rehearse=rehearse)[index]
    device = "cuda" if torch.cuda.is_available() and not rehearse else "cpu"
    note = _warm_up(entry, case, [name], device)[name]
    return f"{entry.op} {case.name} {case.mode} {name}: {note or 'compiled'}"


def warm_compiled(processes: int, *, rehearse: bool = False, progress=print) -> int:
    """Call every compiled baseline of the headline list once, each in its own process, ``processes`` at a time:
    torch.compile's on-disk caches (FX graphs, generated Triton kernels) are then warm for the headline run's
    own first calls. Returns the number of baselines warmed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (index, name, rehearse)
        for index, (entry, case) in enumerate(benchmarking.headline_cases(rehearse=rehearse))
        for name in headline_providers(entry, case)
        if compiled_provider(name)
    ]
    # spawn: a forked process would inherit the parent's CUDA and torch thread state
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(_warm_compiled_job, jobs):
            progress(f"warm compiled: {line}")
    return len(jobs)


def _expected_error(text: str | None, rehearse: bool) -> bool:
    """On a CPU rehearsal a provider torch implements for CUDA only (FlexAttention's backward, FlashAttention's
    varlen op) raises NotImplementedError: expected there, an error anywhere else."""
    return rehearse and text is not None and text.startswith("NotImplementedError")


SKIPPED = "skipped: the step's time budget ran out"


def _timed_case(entry, case, names, notes, jsonl, ceilings, ceiling, device, rehearse, left, progress, counter):
    """Time the providers ``names`` of one headline case (those with time left), append their rows to
    headline.jsonl at once; returns the rows."""
    key = (entry.op, case.name, case.mode)
    keep = {n for n in names if notes[key].get(n) != SKIPPED}
    if left() < len(keep) * TIMED_JOB_SECONDS:
        keep = set()
    progress(f"timed {counter}: {key}, {len(keep)} providers")
    results = benchmarking.run_op(
        entry.op, device=device, quick=False, bandwidth_gbps=ceilings["copy_gbps"], progress=False,
        ceiling=ceiling, cases=[case], keep_provider=keep.__contains__, rehearsal=rehearse,
    )  # fmt: skip
    results += [
        benchmarking.Result(op=entry.op, case=case.name, mode=case.mode, provider=n, params=case.params,
                            device=device, error=SKIPPED)
        for n in names if n not in keep
    ]  # fmt: skip
    rows = []
    with jsonl.open("a") as f:
        for result in results:
            row = dataclasses.asdict(result)
            bound, fraction = ceiling_of(row, entry.metric, ceilings)
            warm = notes[key].get(result.provider)
            if warm and row["error"] is None and not warm.startswith("ran unfused"):
                row["error"] = warm
            elif warm and warm != SKIPPED:
                row["note"] = "; ".join(filter(None, [row.get("note"), warm]))
            row.update(
                kind="result", family=entry.family, metric=entry.metric, goal=entry.goal,
                baselines=list(entry.baselines), bound=bound, fraction_of_bound=fraction,
                expected_error=_expected_error(row["error"], rehearse),
            )  # fmt: skip
            rows.append(row)
            f.write(json.dumps(row, default=str) + "\n")
    return rows


def run_headline(
    out_dir: Path, *, rehearse: bool = False, deadline_s: float | None = None, reserve_s: float = 60.0, progress=print
) -> list[dict]:
    """The headline benchmark (module docstring): returns the result rows written to headline.jsonl.
    ``deadline_s``: seconds this run may take; compiled baselines are warmed up only while ``reserve_s`` is
    left for the timed pass, and providers left out for time are written as skipped."""
    import triton

    import memops

    device = "cuda" if torch.cuda.is_available() and not rehearse else "cpu"
    if device != "cuda" and not rehearse:
        raise RuntimeError("memops bench --headline needs a CUDA device (--rehearse runs it on CPU at small shapes)")
    # One compiled FlexAttention graph per case and mode: more than torch's default limit of 8 recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = benchmarking.headline_cases(rehearse=rehearse)
    label = benchmarking.device_name(device) + (" (rehearsal: interpreter, small shapes)" if rehearse else "")
    start = time.perf_counter()
    ceilings = measure_ceilings(device)
    progress(
        f"ceilings: copy {ceilings['copy_gbps']:,.0f} GB/s, read {ceilings['read_gbps']:,.0f} GB/s, matmul "
        f"bf16 {ceilings['matmul_bf16_tflops']:.1f} / tf32 {ceilings['matmul_tf32_tflops']:.1f} TFLOP/s"
    )
    jsonl = out_dir / "headline.jsonl"
    header = dict(
        kind="run", date=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), device=label, torch=torch.__version__,
        triton=triton.__version__, rehearsal=rehearse, ceilings=ceilings, cases=len(jobs),
    )  # fmt: skip
    with jsonl.open("w") as f:
        f.write(json.dumps(header) + "\n")

    def left() -> float:
        return math.inf if deadline_s is None else deadline_s - (time.perf_counter() - start)

    backend = memops.backend("triton" if rehearse else "auto")  # the rehearsal runs the kernels (interpreter)
    rows: list[dict] = []
    compiled_seconds: list[float] = []
    try:
        with backend:
            # Warm-up: every provider but the compiled baselines first, then those while the budget allows (a
            # compiled baseline left out for time is reported as such, not killed half-way); their cost is
            # what the earlier ones took, at least COMPILED_BASELINE_SECONDS.
            notes = {(entry.op, case.name, case.mode): {} for entry, case in jobs}
            # once per case: building a case's providers is not free (FlexAttention's block masks)
            providers_of = [headline_providers(entry, case) for entry, case in jobs]
            for compiled in (False, True):
                for index, (entry, case) in enumerate(jobs):
                    names = [n for n in providers_of[index] if compiled_provider(n) == compiled]
                    key = (entry.op, case.name, case.mode)
                    each = max([COMPILED_BASELINE_SECONDS, *compiled_seconds[-4:]])
                    if compiled and left() < len(names) * each + reserve_s:
                        notes[key].update({n: SKIPPED for n in names})
                        continue
                    if names:
                        progress(f"warm-up {'compiled ' if compiled else ''}{index + 1}/{len(jobs)}: {key}")
                        began = time.perf_counter()
                        notes[key].update(_warm_up(entry, case, names, device))
                        if compiled:
                            compiled_seconds.append((time.perf_counter() - began) / len(names))
            progress(f"warm-up done in {time.perf_counter() - start:.0f} s")
            ceiling = benchmarking.Ceiling(device)
            for index, (entry, case) in enumerate(jobs):
                rows += _timed_case(entry, case, providers_of[index], notes, jsonl, ceilings, ceiling, device,
                                    rehearse, left, progress, f"{index + 1}/{len(jobs)}")  # fmt: skip
    finally:  # a SIGINT at the step's limit still leaves the table and files of every case done
        (out_dir / "headline.md").write_text(headline_markdown(header, rows))
        write_op_files(header, rows, out_dir / "bench")
    progress(f"headline run done in {time.perf_counter() - start:.0f} s")
    return rows


def read_jsonl(path: Path) -> tuple[dict, list[dict]]:
    """(the run's header, its result rows) from a headline.jsonl, however far the run got."""
    header, rows = {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("kind") == "run":
            header = record
        elif record.get("kind") == "result":
            rows.append(record)
    return header, rows


def write_op_files(header: dict, rows: list[dict], folder: Path) -> list[Path]:
    """Per-op JSON (the ``memops bench --out`` format ``memops report`` renders) and plots from the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {f.name for f in dataclasses.fields(benchmarking.Result)}
    written = []
    for op in dict.fromkeys(row["op"] for row in rows):
        results = [
            benchmarking.Result(**{k: v for k, v in row.items() if k in fields}) for row in rows if row["op"] == op
        ]
        path = folder / f"{op}.json"
        copy = header.get("ceilings", {}).get("copy_gbps", 0.0)
        benchmarking.write_json(results, path, header.get("device", "?"), copy)
        benchmarking.write_plot(results, folder / f"{op}.png", header.get("device", "?"),
                                metric=getattr(benchmarking.load(op), "METRIC", "time"))  # fmt: skip
        written.append(path)
    return written


def headline_markdown(header: dict, rows: list[dict]) -> str:
    """The headline table: per case and provider the time and spread, the figure as a percentage of what bounds
    it, the speedups against the goal's baselines, and the goal."""
    ceilings = header.get("ceilings", {})
    lines = [
        f"# memops headline benchmark ({header.get('device', '?')})",
        "",
        f"{header.get('date', '?')}; torch {header.get('torch', '?')}, triton {header.get('triton', '?')}. "
        + (
            "**Rehearsal on CPU (interpreter, small shapes): the times mean nothing.** "
            if header.get("rehearsal")
            else ""
        )
        + f"Ceilings measured in this run: copy {ceilings.get('copy_gbps', 0):,.0f} GB/s, read "
        f"{ceilings.get('read_gbps', 0):,.0f} GB/s, matmul bf16 {ceilings.get('matmul_bf16_tflops', 0):.1f} and "
        f"tf32 {ceilings.get('matmul_tf32_tflops', 0):.1f} TFLOP/s ({ceilings.get('matmul_n', '?')}^3).",
        "",
        f"{len(rows)} results over {header.get('cases', '?')} cases.",
        "",
        "| family | op | case | mode | provider | ms | IQR | GB/s | TFLOP/s | % of bound | speedup vs goal "
        "baselines | goal | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        ms = row.get("median_ms")
        fraction = row.get("fraction_of_bound")
        percent = f"{100 * fraction:.1f}% {row['bound']}" if fraction is not None else "—"
        speedups = ", ".join(f"{b} {s:.2f}x" for b, s in row.get("speedup_vs", {}).items() if b in row["baselines"])
        note = row.get("error") or row.get("note") or ""
        lines.append(
            f"| {row['family']} | {row['op']} | {row['case']} | {row['mode']} | {row['provider']} | "
            f"{'—' if ms is None else f'{ms:.3f}'} | {benchmarking.spread_text(row)} | "
            f"{'—' if row.get('gbps') is None else format(row['gbps'], '.1f')} | "
            f"{'—' if row.get('tflops') is None else format(row['tflops'], '.1f')} | {percent} | {speedups} | "
            f"{row['goal']} | {note} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Budgets and the returned files


def sanitizer_cases() -> list[str]:
    from memops.benchmarks.gpu_sanitize import CASES

    return [name for name, _ in CASES]


def _compile_seconds(sweep_dir: Path) -> dict[tuple[str, str], float]:
    """Median compile seconds per (kernel, dtype) at sm_90 under Triton 3.6.0 (the GPU's), from the committed
    sweep (one compile process per core)."""
    seconds: dict[tuple[str, str], list[float]] = {}
    for path in sorted(sweep_dir.glob("gpu-compile-triton3.6.0*.json")):
        for row in json.loads(path.read_text()).get("rows", []):
            if row["arch"] == "sm_90":
                seconds.setdefault((row["kernel"], row["dtype"]), []).append(row["compile_s"])
    return {key: sorted(values)[len(values) // 2] for key, values in seconds.items()}


# The seconds each counted unit is assumed to take on the GPU machine (16 cores, H100), and why. The compile
# seconds themselves are measured: the committed sweep's per-kernel medians.
GPU_CORES = 16
COMPILE_START_S = 20  # spawning the compile processes (each imports torch and records the scenarios)
COLD_COMPILED_BASELINE_SECONDS = 25.0  # a torch.compile / FlexAttention baseline compiled from nothing
COMPILE_WARM_PROCESSES = 8  # processes warming the compiled baselines (inductor's on-disk caches)
TEST_SECONDS = 4.0  # per CUDA test on one worker, compile included (H100 run of 2026-11: 94 tests, 82 s, 16 workers)
AT_SCALE_TEST_SECONDS = 8.0  # a serial at-scale test (that whole H100 run, at-scale tests included, took 82 s)
SANITIZER_CASE_SECONDS = 6.0  # one case under memcheck, its compiles already cached
WARM_UP_SECONDS = 0.5  # one untimed call: its inputs made, kernels cached
COMPILED_BASELINE_SECONDS = 4.0  # a compiled baseline's first call once the compile step filled inductor's caches
TIMED_JOB_SECONDS = 1.0  # do_bench(warmup=25 ms, rep=100 ms) plus its inputs, the peak-memory call and a rerun


def budget_rows(*, sweep_dir: Path | None = None, tests: tuple[int, int] | None = None) -> list[dict]:
    """Plan ``check``'s steps: what each does, its count, the seconds that count is estimated to take, and the
    limit run.sh gives it. ``tests``: (CUDA tests, at-scale ones), counted by collection when not given."""
    from memops.tools import gpu_check

    sweep_dir = sweep_dir or Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu-compile"
    variants = gpu_check.collect(arches=(90,), headline=True)
    per_kernel = _compile_seconds(sweep_dir) if sweep_dir.is_dir() else {}
    measured = sorted(s for s in (per_kernel.get((v.kernel, v.dtype)) for v in variants) if s is not None)
    typical = measured[len(measured) // 2] if measured else 2.0  # a kernel the sweep has no figure for
    compile_total = sum(per_kernel.get((v.kernel, v.dtype), typical) for v in variants)
    n_tests, n_at_scale = tests if tests is not None else count_cuda_tests()
    cases = benchmarking.headline_cases(rehearse=False)
    jobs = [(entry, case, name) for entry, case in cases for name in headline_providers(entry, case)]
    compiled = [job for job in jobs if compiled_provider(job[2])]
    n_sanitizer = len(sanitizer_cases())

    def row(step, what, count, estimate_s):
        return dict(step=step, what=what, count=count, estimate_s=math.ceil(estimate_s), limit_s=STEP_LIMITS[step])

    bench_s = 10 + len(jobs) * (WARM_UP_SECONDS + TIMED_JOB_SECONDS) + len(compiled) * COMPILED_BASELINE_SECONDS
    return [
        row("info", "device, versions, install", "1 install", 20),
        row(
            "compile",
            f"Triton variants of the headline cases (sm_90) on {GPU_CORES} cores; then, side by side, the "
            f"sanitizer's cases once each and the compiled baselines warmed in {COMPILE_WARM_PROCESSES} processes",
            f"{len(variants)} variants ({compile_total:.0f} s serial); {n_sanitizer} cases; {len(compiled)} baselines",
            COMPILE_START_S
            + compile_total / GPU_CORES
            + math.ceil(len(compiled) / COMPILE_WARM_PROCESSES) * COLD_COMPILED_BASELINE_SECONDS,
        ),
        row(
            "tests",
            f"CUDA-marked tests on {GPU_CORES - 1} xdist workers; beside them the at-scale ones, one at a time",
            f"{n_tests} tests, {n_at_scale} of them at scale",
            max((n_tests - n_at_scale) * TEST_SECONDS / (GPU_CORES - 1), n_at_scale * AT_SCALE_TEST_SECONDS) + 20,
        ),
        row(
            "sanitize",
            "compute-sanitizer memcheck, one awkward case per kernel",
            f"{n_sanitizer} cases",
            15 + n_sanitizer * SANITIZER_CASE_SECONDS,
        ),
        row(
            "bench",
            "headline benchmark: ceilings, warm-up pass, timed pass",
            f"{len(cases)} cases, {len(jobs)} timed jobs ({len(compiled)} compiled baselines)",
            bench_s,
        ),
    ]


def count_cuda_tests() -> tuple[int, int]:
    """(CUDA-marked tests, at-scale ones) by one pytest collection of tests/ (in a subprocess)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, pytest\n"
        "class Count:\n"
        "    def pytest_collection_finish(self, session):\n"
        "        marks = [{m.name for m in item.iter_markers()} for item in session.items]\n"
        "        print('COUNTS', sum('cuda' in m for m in marks), sum({'cuda', 'at_scale'} <= m for m in marks))\n"
        "pytest.main(['--collect-only', '-q', '-n', '0', sys.argv[1]], plugins=[Count()])\n"
    )
    text = subprocess.run([sys.executable, "-c", code, str(root / "tests")], capture_output=True, text=True,
                          cwd=root).stdout  # fmt: skip
    line = next(line for line in text.splitlines() if line.startswith("COUNTS"))
    return int(line.split()[1]), int(line.split()[2])


def budget_markdown(rows: list[dict]) -> str:
    lines = ["| step | what | count | estimate s | limit s |", "|---|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['step']} | {row['what']} | {row['count']} | {row['estimate_s']} | {row['limit_s']} |")
    total_estimate = sum(row["estimate_s"] for row in rows)
    total_limit = sum(row["limit_s"] for row in rows)
    lines.append(f"| **total** | | | **{total_estimate}** | **{total_limit}** (plan limit {PLAN_SECONDS}) |")
    return "\n".join(lines) + "\n"


def check_outputs(out: Path, expected=CHECK_FILES) -> list[str]:
    """What is wrong with a plan's $OUT: missing files, more than MAX_FILES, a file over MAX_FILE_BYTES, or
    anything that is not a plain file (empty: all is well)."""
    problems = []
    entries = sorted(Path(out).iterdir())
    names = {entry.name for entry in entries}
    problems += [f"missing {name}" for name in expected if name not in names]
    if len(entries) > MAX_FILES:
        problems.append(f"{len(entries)} entries in {out}, at most {MAX_FILES} come back: {sorted(names)}")
    for entry in entries:
        if not entry.is_file() or entry.is_symlink():
            problems.append(f"{entry.name} is not a plain file")
        elif entry.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{entry.name}: {entry.stat().st_size} bytes, over {MAX_FILE_BYTES}")
    return problems


class _CpuAsSm90Driver:
    """A stand-in for Triton's CUDA driver that reports an sm_90 device: the runtime's binder, cache key and
    compile run as on an H100, on a machine without a GPU. Nothing is launched (see :func:`cache_check`)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def _memops_providers_on_cpu(*, small: bool):
    """(entry, case, name, call) for every memops-built provider of the headline cases, with the public ops
    taking CPU tensors on the triton backend at sm_90's launch configs: whatever a call launches goes through
    ``JITFunction.run``, which the caller replaces (recording, or compile-only)."""
    import memops
    from memops import _backend

    def calls():
        for entry, case in benchmarking.headline_cases(rehearse=small):
            module = benchmarking.load(entry.op)
            for name in headline_providers(entry, case):
                if name.startswith("memops"):  # memops' providers, and baselines built on memops ops
                    yield entry, case, name, lambda m=module, c=case, n=name: m.providers(c, "cuda")[n](
                        m.make_inputs(c, "cpu", 0))()  # fmt: skip

    interpreter_enabled = _backend.interpreter_enabled
    _backend.interpreter_enabled = lambda: True  # CPU tensors pass the backend's device check
    try:
        with memops.backend("triton"), _backend.configs_for_arch(90):
            yield calls()
    finally:
        _backend.interpreter_enabled = interpreter_enabled


def cache_check(
    kernels: list[str] | None, cache_dir: Path, log: Path, *, jobs: int = 1, runtime_env: dict | None = None
) -> dict:
    """The compile-ahead step's claim, checked without a GPU: compile the headline variants of ``kernels`` (at
    the rehearsal's small shapes) the way ``memops gpu-check --warm-cache`` does, into ``cache_dir``; then run
    the headline cases' memops providers through Triton's real runtime path (``JITFunction.run``: binder,
    specialisation, cache key, cache lookup) with an sm_90 target and launches turned into compile-only
    warm-ups. Returns the counting cache manager's summary of the second part: every lookup of ``kernels``
    should hit (``kernels`` None: every kernel). ``runtime_env``: environment variables set between the two
    parts. Needs a process without TRITON_INTERPRET (Triton reads it at import)."""
    import os

    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from memops.tools import gpu_check, triton_cache

    os.environ.update(
        TRITON_CACHE_DIR=str(cache_dir), TRITON_DEFAULT_FP_FUSION="1",
        TRITON_CACHE_MANAGER="memops.tools.triton_cache:CountingCacheManager",
    )  # fmt: skip
    report = gpu_check.run_check(kernels=kernels, arches=(90,), headline=True, small=True, analyze=False, jobs=jobs)
    compiled = sum(row["ok"] for row in report["rows"])
    os.environ[triton_cache.LOG_VARIABLE] = str(log)
    os.environ.update(runtime_env or {})
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return original_run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = compile_only
    previous_driver = driver._active  # None without a GPU: reset_active() would look for one and fail
    driver.set_active(_CpuAsSm90Driver())
    families = {row["family"] for row in report["rows"]}
    ran = []
    try:
        with _memops_providers_on_cpu(small=True) as calls:
            for entry, case, name, call in calls:
                if entry.family not in families:
                    continue
                try:
                    call()
                    ran.append(f"{entry.op} {case.name} {case.mode} {name}")
                except Exception as error:  # noqa: BLE001 - outputs are never written: a later step may fail
                    ran.append(f"{entry.op} {case.name} {case.mode} {name}: {type(error).__name__}")
    finally:
        JITFunction.run = original_run
        driver.set_active(previous_driver)
    counts = triton_cache.summarize(log, set(kernels) if kernels else None)
    return dict(compiled=compiled, variants=report["variants"], hits=counts["memops"]["hit"],
                misses=counts["memops"]["miss"], missed=dict(counts["missed"]), ran=ran)  # fmt: skip


def _launch_key(launch) -> tuple:
    """What Triton's cache key holds of one launch, for sm_90: the kernel, its signature, constexprs,
    specialisation attributes and options (``memops.tools.gpu_check._specialise``, Triton's own binder)."""
    from memops.tools import gpu_check

    options, signature, constexprs, attrs = gpu_check._specialise(launch, 90)
    return (
        launch.kernel.__name__,
        tuple(sorted(signature.items())),
        tuple(sorted((k, str(v)) for k, v in constexprs.items())),
        tuple(sorted((k, str(v)) for k, v in attrs.items())),
        options.num_warps,
        options.num_stages,
    )


# Kernels whose launches the CPU check cannot reproduce, with the reason.
UNCHECKABLE = {
    "lse_merge_kernel": "its first inputs are the vendor attention's (out, lse), whose strides come from torch's "
    "CPU flash kernel here and from cuDNN / FlashAttention on the GPU (the scenario compiles both layouts; the "
    "GPU run's device.txt reports the real hits)",
}


def key_mismatches(*, small: bool = True) -> tuple[int, list[str]]:
    """The compile-ahead step's coverage, without compiling: the launches the headline cases' memops providers
    make through the public ops (recorded at sm_90's launch configs, on CPU tensors, nothing run) against the
    variants ``memops gpu-check --headline`` compiles. Returns (launches checked, one line per launch whose
    specialisation the step does not compile, with the fields that differ from the nearest variant).
    Needs a process without TRITON_INTERPRET."""
    from memops.tools import gpu_check

    planned = {_launch_key(v.launch): v.labels for v in gpu_check.collect(arches=(90,), headline=True, small=small)}
    checked, problems = 0, []
    with _memops_providers_on_cpu(small=small) as calls:
        for entry, case, name, call in calls:
            with gpu_check.recording() as launches:
                try:
                    call()
                except Exception:  # noqa: BLE001, S110 - kernels never write their outputs here
                    pass
            for launch in launches:
                key = _launch_key(launch)
                if key[0] in UNCHECKABLE:
                    continue
                checked += 1
                if key in planned:
                    continue
                same = [k for k in planned if k[0] == key[0]]
                nearest = min(same, key=lambda k: sum(a != b for a, b in zip(k, key)), default=None)
                fields = ["signature", "constexprs", "attributes", "num_warps", "num_stages"]
                differ = [
                    f"{field} planned {sorted(set(a) - set(b)) if isinstance(a, tuple) else a} launched "
                    f"{sorted(set(b) - set(a)) if isinstance(b, tuple) else b}"
                    for field, a, b in zip(fields, nearest[1:], key[1:]) if a != b
                ] if nearest else ["no variant of this kernel planned"]  # fmt: skip
                problems.append(f"{entry.op} {case.name} {case.mode} {name}: {key[0]}: {'; '.join(differ)}")
    return checked, problems


BUDGET_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "budget.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memops.tools.gpu_plan", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    budget = commands.add_parser("budget", help="plan check's budget table (markdown), computed from the counts")
    budget.add_argument(
        "--write", type=Path, help="also write it, with every step's limit, as JSON (benchmarks/gpu/budget.json)"
    )
    check = commands.add_parser("check-outputs", help="fail when $OUT misses a file, has too many or too large")
    check.add_argument("out", type=Path)
    check.add_argument("--expect", nargs="*", default=list(CHECK_FILES))
    args = parser.parse_args(argv)
    if args.command == "budget":
        rows = budget_rows()
        if args.write:
            plan = dict(check=rows, limits={**STEP_LIMITS, **TUNE_LIMITS})
            args.write.write_text(json.dumps(plan, indent=1) + "\n")
        print(budget_markdown(rows), end="")
        return 0
    problems = check_outputs(args.out, args.expect)
    for problem in problems:
        print(f"check-outputs: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
