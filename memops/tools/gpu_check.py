"""Ahead-of-time GPU compile check: every kernel the public ops launch, compiled for real GPU targets on a
machine without a GPU (``memops gpu-check``).

Triton's interpreter runs our kernels on CPU tensors for the numerics, but it accepts code that no GPU
compiler will (a reassigned constexpr, a config over the shared-memory limit). This module closes that gap:

1. **Record.** Every family's launchers run at the shapes of its CUDA benchmark cases (each benchmark
   module's ``compile_scenarios``, grouped into ``FAMILIES`` by memops.benchmarks.MODULES), on meta tensors
   (integer index inputs on CPU where a launcher reads them on the host), with the launch configs of a pinned
   GPU architecture (:func:`memops._backend.configs_for_arch`). ``JITFunction.run`` is replaced by a recorder,
   so nothing launches: what is recorded is exactly what each launcher passes, never a hand-kept copy.
2. **Specialise** each launch with Triton's own binder for the target (the same ``tt.divisibility`` and
   ``== 1`` specialisations a launch on that GPU makes), and drop duplicates.
3. **Compile** each variant with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and
   read the result: the TTGIR for the lowering of every ``tt.dot`` (wgmma / mma.sync / FMA), the cubin through
   the wheel's ``cuobjdump`` for registers, stack and the LDL/STL spill traffic, Triton's metadata for shared
   memory against the target's per-block limit, and from those an occupancy estimate.
4. **Judge** each variant (:func:`problems`): a compile error, shared memory over the limit, any stack or
   spill traffic, or a 16-bit / tf32 dot that is not on tensor cores fails it, unless :data:`ALLOWED` lists
   the kernel with its reason.

It proves the kernels compile and fit on the target, and what the compiler made of them. It cannot prove
timing, the absence of races, or numerics on hardware: those need the GPU session (docs/testing.md).

Usage: ``memops gpu-check`` (full sweep: every family, variant and target; writes JSON + markdown),
``memops gpu-check --subset`` (the CI subset, sm_90: one bf16 variant per kernel and code path, and one fp32
and one tf32 variant per kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from memops.benchmarks import MODULES
from memops.tools import compile_scenarios

# Per-target limits (CUDA programming guide, compute capabilities table): the opt-in shared memory one block
# may use, the shared memory of one SM (each resident block also reserves 1 KiB), registers per SM, resident
# blocks and threads per SM.
TARGETS = {
    80: dict(
        name="sm_80", smem_per_block=166912, smem_per_sm=167936, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
    90: dict(
        name="sm_90", smem_per_block=232448, smem_per_sm=233472, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
    100: dict(
        name="sm_100", smem_per_block=232448, smem_per_sm=233472, regs_per_sm=65536, max_blocks=32, max_threads=2048
    ),
}
DEFAULT_ARCHES = (90, 80)

# Variants that may break a rule, each with its reason: (kernel, predicate on the variant's labels, rule, why).
# Rules: "spill" (stack or LDL/STL), "tensor_cores" (a 16-bit or tf32 dot not on tensor cores).
ALLOWED: list[tuple[str, Callable[[dict], bool], str, str]] = [
    (
        "block_route_kernel",
        lambda row: row["config"].get("E", 0) >= 256,
        "spill",
        "E = 256 experts (LLaDA2): the (32 tokens, 256 experts) int64 packed-entry sorts of the vote and the top-k "
        "spill 160-170 B at 8 warps (1.2-3.2 KB at 4); removing it means splitting the expert axis across programs "
        "(not done yet). The kernel has no dots and runs once per block of tokens.",
    ),
]


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Variant:
    """One compile: a kernel at one specialisation for one target, and every scenario that launches it."""

    family: str
    kernel: str
    arch: int
    dtype: str  # "bf16", "fp16", "fp32" (ieee dots), "tf32" (fp32 inputs, tf32 dots)
    labels: list[str]  # "<case> <path>" of every scenario that produced this exact compile
    config: dict  # the constexprs and options that the launcher chose (for the report)
    key: str = ""
    launch: Launch | None = dataclasses.field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------
# Recording launches


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Launches made inside the block are recorded instead of run (no GPU, no driver needed); under
    TRITON_INTERPRET=1 the interpreter's launches too (then ``Launch.kernel`` is its InterpretedFunction)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        return None

    for cls in originals:
        cls.run = record
    try:
        yield launches
    finally:
        for cls, run in originals.items():
            cls.run = run


@contextlib.contextmanager
def _matmul_precision(dtype: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def headline_source(*, small: bool = False) -> Iterator[None]:
    """Scenarios record only the headline benchmark's cases (memops.benchmarks.headline), each at its own head
    dim; ``small``: at the rehearsal's small parameters."""
    from memops.tools.benchmarking import BENCHMARKS, headline_cases

    source: dict[str, list] = {}
    for entry, case in headline_cases(rehearse=small):
        source.setdefault(BENCHMARKS[entry.op], []).append(case)
    compile_scenarios.CASE_SOURCE.append(source)
    try:
        yield
    finally:
        compile_scenarios.CASE_SOURCE.pop()


def _family_scenarios(modules: list[str]) -> Callable:
    """The scenarios of a family: its benchmark modules' ``compile_scenarios(dtype, subset)``, in turn."""

    def scenarios(dtype: str, subset: bool):
        for module in modules:
            yield from importlib.import_module(f"memops.benchmarks.{module}").compile_scenarios(dtype, subset)

    return scenarios


# family -> its scenarios, from the one list of benchmark modules (memops/benchmarks/__init__.py)
_FAMILY_MODULES: dict[str, list[str]] = {}
for _module, (_, _family) in MODULES.items():
    _FAMILY_MODULES.setdefault(_family, []).append(_module)
FAMILIES = {family: _family_scenarios(modules) for family, modules in _FAMILY_MODULES.items()}
DTYPES = ("bf16", "fp16", "fp32", "tf32")


def _specialise(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as a launch on ``arch`` would compile, via Triton's
    own binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def _describe(value) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def collect(
    families=None, dtypes=DTYPES, arches=DEFAULT_ARCHES, subset: bool = False, kernels=None, label=None,
    headline: bool = False, small: bool = False,
) -> list[Variant]:  # fmt: skip
    """Record every scenario under every (dtype, arch) and return the distinct compiles; ``label``: only the
    scenarios whose label contains it (``"varlen"``: the packed variants); ``headline``: only the headline
    benchmark's cases, in their own dtype (bf16), at their ``small`` rehearsal parameters if asked."""
    if headline:
        with headline_source(small=small):
            return collect(families, ("bf16",), arches, subset, kernels, label)
    from memops._backend import configs_for_arch

    variants: dict[str, Variant] = {}
    for family, scenarios in FAMILIES.items():
        if families and family not in families:
            continue
        for dtype in dtypes:
            if subset and dtype == "fp16":  # same code path as bf16
                continue
            for arch in arches:
                with configs_for_arch(arch), _matmul_precision(dtype):
                    for name, run in scenarios(dtype, subset):
                        if label and label not in name:
                            continue
                        with recording() as launches:
                            run()
                        for launch in launches:
                            fn = launch.kernel
                            if kernels and fn.__name__ not in kernels:
                                continue
                            options, signature, constexprs, attrs = _specialise(launch, arch)
                            key = repr(
                                (
                                    fn.__name__,
                                    arch,
                                    sorted(signature.items()),
                                    sorted(constexprs.items()),
                                    sorted(attrs.items()),
                                    options.num_warps,
                                    options.num_stages,
                                )
                            )
                            if key in variants:
                                if name not in variants[key].labels:
                                    variants[key].labels.append(name)
                                continue
                            config = {
                                fn.arg_names[path[0]]: _describe(v)
                                for path, v in constexprs.items()
                                if len(path) == 1 and fn.arg_names[path[0]].isupper()
                            }
                            # absent inputs (None pointers) pick a code path as the flags do
                            absent = [fn.arg_names[path[0]] for path, v in constexprs.items()
                                      if len(path) == 1 and v is None]  # fmt: skip
                            if absent:
                                config["absent"] = ",".join(absent)
                            config.update(num_warps=options.num_warps, num_stages=options.num_stages)
                            variants[key] = Variant(family, fn.__name__, arch, dtype, [name], config, key, launch)
    out = list(variants.values())
    # One variant per (kernel, code path) in bf16, the first of each, and one per kernel in fp32 and in tf32: the
    # code-path flags lower the same way in every dtype, so bf16 carries them (the full sweep keeps them all).
    if subset:
        seen, kept = set(), []
        for v in out:
            path = tuple(
                sorted(
                    (k, v.config[k])
                    for k in v.config
                    if k == "absent"
                    or k.isupper()
                    and (
                        k.startswith(
                            (
                                "HAS_",
                                "CAUSAL",
                                "BLEND",
                                "GATE_",
                                "MEMORY_",
                                "WEIGHTS_",
                                "ATOMIC_",
                                "SWIGLU",
                                "SAVE_",
                                "VOTE",
                                "SOFTMAX",
                                "A_ROWS",
                                "C_ROWS",
                                "G_ROWS",
                                "USE_",
                                "VARLEN",
                                "DOCUMENTS",
                            )
                        )
                    )
                )
            )
            k = (v.kernel, v.dtype, path if v.dtype == "bf16" else ())
            if k not in seen:
                seen.add(k)
                kept.append(v)
        out = kept
    return out


# ---------------------------------------------------------------------------------------------------------
# Compiling and reading the result


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _dot_lowering(ttgir: str) -> dict:
    """How many dots became wgmma (HGMMA), mma.sync (HMMA) or FMA, from the TTGIR."""
    definitions = re.findall(r"^(#\w+) = (#ttg\.\w+)<\{([^\n]*)", ttgir, flags=re.M)
    encodings = {alias: kind for alias, kind, _ in definitions}
    versions = {
        alias: int(m.group(1)) for alias, _, rest in definitions if (m := re.search(r"versionMajor = (\d+)", rest))
    }
    counts = {"wgmma": 0, "mma": 0, "fma": 0}
    counts["wgmma"] = len(re.findall(r"= ttng\.warp_group_dot ", ttgir))
    for line in re.findall(r"= tt\.dot [^\n]*", ttgir):
        result = re.search(r"-> tensor<[^,>]*, (#\w+)>", line)
        alias = result.group(1) if result else ""
        if encodings.get(alias) == "#ttg.nvidia_mma":
            counts["wgmma" if versions.get(alias) == 3 else "mma"] += 1
        else:
            counts["fma"] += 1
    return counts


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    return dict(
        registers=field("REG"),
        stack=field("STACK"),
        local=field("LOCAL"),
        spill_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
    )


def _occupancy(registers: int, shared: int, num_warps: int, target: dict) -> int:
    """Resident blocks per SM from registers (256-register allocation units per warp), shared memory (plus the
    1 KiB each block reserves), threads and the block limit."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = target["regs_per_sm"] // (regs_per_warp * num_warps)
    by_smem = target["smem_per_sm"] // (shared + 1024)
    by_threads = target["max_threads"] // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, target["max_blocks"]))


def compile_variant(variant: Variant, analyze: bool = True) -> dict:
    """Compile one variant for its target; its figures (``analyze``: registers, spills, dots, shared memory),
    or the exact error. The compile goes through Triton's cache (``TRITON_CACHE_DIR``), where a launch of the
    same specialisation on that target finds it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    target = TARGETS[variant.arch]
    row = dict(
        family=variant.family,
        kernel=variant.kernel,
        arch=target["name"],
        dtype=variant.dtype,
        labels=variant.labels,
        config=variant.config,
        ok=False,
        error=None,
    )
    start = time.perf_counter()
    try:
        options, signature, constexprs, attrs = _specialise(variant.launch, variant.arch)
        compiled = triton_compile(
            ASTSource(variant.launch.kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", variant.arch, 32),
            options=options.__dict__,
        )
        if not analyze:  # compile ahead: the cache entry is the point
            row.update(ok=True, problems=[], compile_s=round(time.perf_counter() - start, 2))
            return row
        resources = _resources(compiled.asm["cubin"])
        dots = _dot_lowering(compiled.asm["ttgir"])
        shared = int(compiled.metadata.shared)
        row.update(
            ok=True,
            shared=shared,
            shared_limit=target["smem_per_block"],
            dots=dots,
            **resources,
            blocks_per_sm=_occupancy(resources["registers"], shared, options.num_warps, target),
        )
    except Exception as error:  # noqa: BLE001 - the report carries the exact error of any compile failure
        # A CompilationError's text is the source position, the source line and the cause: keep the position
        # and the cause on one line.
        lines = [line.strip() for line in f"{type(error).__name__}: {error}".strip().splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        row["error"] = message[:400]
    row["compile_s"] = round(time.perf_counter() - start, 2)
    row["problems"] = problems(row)
    return row


def _allowed(row: dict, rule: str) -> str | None:
    for kernel, predicate, allowed_rule, why in ALLOWED:
        if kernel == row["kernel"] and allowed_rule == rule and predicate(row):
            return why
    return None


def problems(row: dict) -> list[str]:
    """What fails the check for one compiled variant (empty: clean)."""
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B over the {row['shared_limit']} B limit")
    if (row["stack"] or row["spill_instructions"]) and not _allowed(row, "spill"):
        out.append(f"spills: {row['stack']} B stack, {row['spill_instructions']} LDL/STL")
    needs_tensor_cores = row["dtype"] in ("bf16", "fp16", "tf32")
    off_tensor_cores = row["dots"]["fma"] + (row["dots"]["mma"] if row["arch"] == "sm_90" else 0)
    if needs_tensor_cores and off_tensor_cores and not _allowed(row, "tensor_cores"):
        lowering = "FMA" if row["dots"]["fma"] else "mma.sync (not wgmma)"
        out.append(f"{off_tensor_cores} of {sum(row['dots'].values())} dots on {lowering}")
    return out


# Each worker process records once, then compiles the variants it is handed by index.
_WORKER_VARIANTS: list[Variant] = []


_WORKER_ANALYZE: list[bool] = [True]


def _worker_init(families, dtypes, arches, subset, kernels, label, headline=False, small=False, analyze=True):
    os.environ.pop("TRITON_INTERPRET", None)
    _WORKER_ANALYZE[0] = analyze
    _WORKER_VARIANTS.extend(collect(families, dtypes, arches, subset, kernels, label, headline, small))


def _worker_compile(index: int) -> dict:
    return compile_variant(_WORKER_VARIANTS[index], _WORKER_ANALYZE[0])


def run_check(families=None, dtypes=DTYPES, arches=DEFAULT_ARCHES, subset=False, jobs: int | None = None,
              progress=None, kernels=None, label=None, headline=False, small=False, analyze=True) -> dict:  # fmt: skip
    """Compile every variant (in ``jobs`` processes) and return the report: rows and a summary. ``headline`` /
    ``small``: the headline benchmark's variants (:func:`collect`); ``analyze=False`` only compiles (the
    compile-ahead step of the GPU run, which fills the Triton cache its launches read)."""
    import triton

    # Triton 3.9 warns that its FP-fusion default will change; pin today's default (fusion on, as 3.6 does).
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("memops gpu-check compiles for GPUs: run it without TRITON_INTERPRET=1")
    start = time.perf_counter()
    variants = collect(families, dtypes, arches, subset, kernels, label, headline, small)
    jobs = jobs or min(len(variants), os.cpu_count() or 1)
    rows = []
    if jobs <= 1:
        for variant in variants:
            rows.append(compile_variant(variant, analyze))
            if progress:
                progress(rows[-1])
    else:
        # spawn, not fork: a forked torch process can deadlock on locks held by the parent's threads
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs,
            mp_context=context,
            initializer=_worker_init,
            initargs=(families, dtypes, arches, subset, kernels, label, headline, small, analyze),
        ) as pool:
            for row in pool.map(_worker_compile, range(len(variants))):
                rows.append(row)
                if progress:
                    progress(row)
    failing = [r for r in rows if r["problems"]]
    return dict(
        triton=triton.__version__,
        torch=torch.__version__,
        subset=subset,
        arches=[TARGETS[a]["name"] for a in arches],
        variants=len(rows),
        failing=len(failing),
        wall_s=round(time.perf_counter() - start, 1),
        rows=rows,
    )


# ---------------------------------------------------------------------------------------------------------
# Report


def _dots_text(row: dict) -> str:
    dots = row["dots"]
    parts = [f"{n} {name}" for name, n in (("wgmma", dots["wgmma"]), ("mma", dots["mma"]), ("FMA", dots["fma"])) if n]
    return ", ".join(parts) or "-"


def summary_table(reports: list[dict]) -> list[dict]:
    """Per (triton, target, kernel, dtype): variants, failures, and the worst registers / stack / shared."""
    groups: dict[tuple, list] = {}
    for report in reports:
        for row in report["rows"]:
            groups.setdefault((report["triton"], row["arch"], row["kernel"], row["dtype"]), []).append(row)
    out = []
    for (version, arch, kernel, dtype), rows in sorted(groups.items()):
        ok = [r for r in rows if r["ok"]]
        out.append(
            dict(
                triton=version,
                arch=arch,
                kernel=kernel,
                dtype=dtype,
                variants=len(rows),
                compiled=len(ok),
                failing=sum(1 for r in rows if r["problems"]),
                max_registers=max((r["registers"] for r in ok), default=None),
                max_stack=max((r["stack"] for r in ok), default=None),
                spill_instructions=sum(r["spill_instructions"] for r in ok),
                max_shared_kib=round(max((r["shared"] for r in ok), default=0) / 1024, 1),
                tensor_cores="n/a"
                if dtype == "fp32"
                else (
                    "yes"
                    if ok
                    and all(not r["dots"]["fma"] and not (r["arch"] == "sm_90" and r["dots"]["mma"]) for r in ok)
                    and any(sum(r["dots"].values()) for r in ok)
                    else ("no dots" if all(not sum(r["dots"].values()) for r in ok) else "no")
                ),
                min_blocks_per_sm=min((r["blocks_per_sm"] for r in ok), default=None),
            )
        )
    return out


def _summary_lines(reports: list[dict]) -> list[str]:
    lines = [
        "| triton | target | kernel | dtype | variants | failing | max regs | max stack B | LDL/STL | "
        "max smem KiB | tensor cores | min blocks/SM |",
        "|" + "---|" * 12,
    ]
    for r in summary_table(reports):
        lines.append(
            f"| {r['triton']} | {r['arch']} | {r['kernel']} | {r['dtype']} | {r['variants']} | {r['failing']} | "
            f"{r['max_registers']} | {r['max_stack']} | {r['spill_instructions']} | {r['max_shared_kib']} | "
            f"{r['tensor_cores']} | {r['min_blocks_per_sm']} |"
        )
    return lines


def _fallback_lines() -> list[str]:
    """The attention launch-table entries without a clean config (the ops' "auto" backend runs the
    reference there)."""
    from memops.kernels import attention

    lines = []
    for name, table in (
        ("forward", attention.FWD_CONFIGS),
        ("dQ", attention.DQ_CONFIGS),
        ("dK/dV", attention.DKDV_CONFIGS),
    ):
        for (arch, dtype, head_dim), (by_path, why) in sorted(table.items()):
            paths = [path for path, config in by_path.items() if config is None]
            if paths:
                where = "every path" if paths == ["*"] else ", ".join(paths)
                lines.append(f"- {name}, sm_{arch}, {dtype}, D={head_dim}, {where}: {why}")
    return lines


def merge_labelled(sweeps: list[dict], labelled: list[dict]) -> list[dict]:
    """Full sweeps with the rows of later label-filtered sweeps (``--label``, e.g. the varlen variants) of
    the same Triton version added: those compile variants the full sweep did not have yet."""
    by_version = {report["triton"]: report for report in sweeps}
    for extra in labelled:
        full = by_version.get(extra["triton"])
        if full is None:
            continue
        full["rows"] = full["rows"] + extra["rows"]
        full["variants"] += extra["variants"]
        full["failing"] += extra["failing"]
        full.setdefault("merged", []).append(
            f"with {extra['variants']} '{extra['label']}' variants from a later sweep ({extra['failing']} failing)"
        )
    return sweeps


def markdown(reports: list[dict], before: list[dict] | None = None) -> str:
    """docs/gpu-compile.md: the summary per kernel, then every failing variant with its reason; ``before``:
    reports of an earlier sweep, summarised after it for comparison."""
    lines = [
        "# GPU compile check",
        "",
        "Every kernel the public ops launch, compiled ahead of time on a CPU-only machine for real GPU targets",
        "at the launch configs the launchers choose on CUDA, at every family's CUDA benchmark shapes and for",
        "every dtype class (bf16, fp16, fp32 with ieee dots, fp32 with tf32 dots) and head dim",
        "(`python -m memops.tools.gpu_check`, which `memops gpu-check` runs; see `memops/tools/gpu_check.py` and",
        "docs/testing.md for what it proves and what it cannot). Regenerate with",
        "`memops gpu-check --out benchmarks/results/gpu-compile` under each Triton version, then `memops report`.",
        "",
    ]
    for report in reports:
        lines.append(
            f"- Triton {report['triton']} (torch {report['torch']}), targets {', '.join(report['arches'])}: "
            f"{report['variants']} variants, {report['failing']} failing, {report['wall_s']} s"
            f"{' (subset)' if report['subset'] else ''}"
            + "".join(f"; {extra}" for extra in report.get("merged", []))
            + "."
        )
    lines += [""] + _summary_lines(reports)
    # Failing variants, grouped by (triton, target, kernel, dtype, kind of problem), with one example each.
    groups: dict[tuple, list] = {}
    for report in reports:
        for row in report["rows"]:
            for problem in row["problems"]:
                kind = re.sub(r"\d+", "N", problem.split(":")[0])
                groups.setdefault((report["triton"], row["arch"], row["kernel"], row["dtype"], kind), []).append(
                    (row, problem)
                )
    lines += ["", "## Failing variants", ""]
    if not groups:
        lines.append("None.")
    for (version, arch, kernel, dtype, kind), items in sorted(groups.items()):
        row, problem = items[0]
        lines.append(
            f"- Triton {version}, {arch}, `{kernel}` {dtype}: {len(items)} variant(s), {kind}; e.g. "
            f"{row['labels'][0]} {row['config']}: {problem}"
        )
    if ALLOWED:
        lines += ["", "## Allowed exceptions", ""]
        lines += [f"- `{kernel}` ({rule}): {why}" for kernel, _, rule, why in ALLOWED]
    lines += [
        "",
        "## Reference fallbacks",
        "",
        "Attention launch-table entries (`memops/kernels/attention.py`) where no candidate compiled clean. There",
        'the public ops\' `"auto"` backend runs the reference (torch SDPA and matmuls) instead, so the',
        'sweep launches nothing; `memops.backend("triton")` still forces the kernels, at the smallest tile.',
        "",
    ]
    lines += _fallback_lines() or ["None."]
    if before:
        lines += [
            "",
            "## Before the fixes",
            "",
            "The first sweep, before the fixes above (launch configs of that commit; the search, routing and",
            "eviction kernels did not compile):",
            "",
        ]
        for report in before:
            lines.append(
                f"- Triton {report['triton']}, targets {', '.join(report['arches'])}: {report['variants']} "
                f"variants, {report['failing']} failing, {report['wall_s']} s."
            )
        lines += [""] + _summary_lines(before)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memops gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--subset",
        action="store_true",
        help="the CI subset (sm_90: bf16 per kernel and code path, fp32 and tf32 per kernel)",
    )
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    parser.add_argument("--arch", action="append", type=int, choices=sorted(TARGETS), help="targets (default 90, 80)")
    parser.add_argument("--kernel", action="append", help="only these kernels (by name)")
    parser.add_argument("--label", help="only the scenarios whose label contains this (e.g. varlen)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>/gpu-compile-triton<version>.json")
    parser.add_argument(
        "--headline", action="store_true", help="only the headline benchmark's variants (bf16, its cases' shapes)"
    )
    parser.add_argument("--small", action="store_true", help="with --headline: at the rehearsal's small shapes")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="compile only, into TRITON_CACHE_DIR (no analysis, nothing judged): the GPU run's compile-ahead step",
    )
    parser.add_argument("--count", action="store_true", help="record and count the variants; compile nothing")
    args = parser.parse_args(argv)
    arches = tuple(args.arch or ((90,) if args.subset or args.headline else DEFAULT_ARCHES))
    if args.small and not args.headline:
        parser.error("--small goes with --headline")
    if args.count:
        os.environ.pop("TRITON_INTERPRET", None)
        variants = collect(args.family, DTYPES, arches, args.subset, args.kernel, args.label, args.headline, args.small)
        kernels = sorted({v.kernel for v in variants})
        print(f"{len(variants)} variants of {len(kernels)} kernels: {', '.join(kernels)}")
        return 0
    if args.warm_cache:
        start = time.perf_counter()
        report = run_check(args.family, DTYPES, arches, args.subset, args.jobs, None, args.kernel, args.label,
                           args.headline, args.small, analyze=False)  # fmt: skip
        for row in report["rows"]:
            if not row["ok"]:
                print(f"{row['arch']} {row['kernel']} {row['config']}: {row['error']}")
        compiled = sum(row["ok"] for row in report["rows"])
        print(
            f"compile ahead: {compiled} of {report['variants']} variants compiled into "
            f"{os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')} in {time.perf_counter() - start:.1f} s "
            f"(triton {report['triton']}, {', '.join(report['arches'])})"
        )
        return 0 if compiled == report["variants"] else 1

    def progress(row):
        status = "ok" if not row["problems"] else "FAIL " + "; ".join(row["problems"])
        figures = (
            f"regs {row['registers']} stack {row['stack']} smem {row['shared']} dots [{_dots_text(row)}]"
            if row["ok"]
            else ""
        )
        print(
            f"{row['arch']} {row['kernel']} {row['dtype']} {row['config']} {figures} {row['compile_s']}s: {status}",
            flush=True,
        )

    report = run_check(args.family, DTYPES, arches, args.subset, args.jobs, progress, args.kernel, args.label,
                       args.headline, args.small)  # fmt: skip
    report["label"] = args.label
    print(
        f"triton {report['triton']}: {report['variants']} variants, {report['failing']} failing, {report['wall_s']} s"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = ("-subset" if args.subset else "") + (f"-{args.label}" if args.label else "")
        name = f"gpu-compile-triton{report['triton']}{suffix}.json"
        (args.out / name).write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 1 if report["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
