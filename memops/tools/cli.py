"""``memops`` command line: ``memops bench [--op NAME] [--quick | --headline [--rehearse]] [--out DIR]``,
``memops train-demo [--steps N]``, ``memops report``, ``memops compare`` and ``memops gpu-check``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memops.tools.arguments import add_demo_arguments, positive_int_type


def _output_folder(path: str, option: str) -> Path:
    """The folder ``path``, created; a clear ValueError when it cannot be (a file on the way, no permission)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{option} {path!r}: cannot create the folder ({error.strerror})") from None
    return folder


def _bench(args: argparse.Namespace) -> int:
    import torch

    from memops.tools import benchmarking

    if args.headline:
        from memops.tools import gpu_plan

        if args.op or args.quick:
            raise ValueError("--headline runs the headline list: without --op and --quick")
        if args.warm_compiled:
            gpu_plan.warm_compiled(args.warm_compiled, rehearse=args.rehearse)
            return 0
        rows = gpu_plan.run_headline(
            _output_folder(args.out, "--out"), rehearse=args.rehearse, deadline_s=args.deadline, progress=print
        )
        failed = [r for r in rows if r["error"] and not r["expected_error"] and r["error"] != gpu_plan.SKIPPED]
        for row in failed:
            print(f"error: {row['op']} {row['case']} {row['mode']} {row['provider']}: {row['error']}")
        return 1 if failed else 0
    if args.rehearse or args.deadline is not None or args.warm_compiled:
        raise ValueError("--rehearse, --deadline and --warm-compiled go with --headline")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ops = [args.op] if args.op else list(benchmarking.BENCHMARKS)
    for op in ops:
        benchmarking.load(op)  # an unknown --op fails before any timing
    out_dir = _output_folder(args.out, "--out")
    label = benchmarking.device_name(device)
    bandwidth = benchmarking.copy_bandwidth_gbps(device)
    ceiling = benchmarking.Ceiling(device)  # per-size ceilings, measured once for all ops
    for op in ops:
        results = benchmarking.run_op(op, device=device, quick=args.quick, bandwidth_gbps=bandwidth, ceiling=ceiling)
        # The copy bandwidth again after the op's cases: a shared machine whose speed drifted during them shows
        # it here (the IQR only sees noise within one case's timing window).
        after = benchmarking.copy_bandwidth_gbps(device)
        print(benchmarking.format_table(results, label, bandwidth))
        drift = benchmarking.drift_warning(bandwidth, after)
        if drift:
            print(drift)
        json_path = out_dir / f"{op}.json"
        benchmarking.write_json(results, json_path, label, bandwidth, bandwidth_after_gbps=after)
        bandwidth = after
        written = [str(json_path)]
        png_path = out_dir / f"{op}.png"
        metric = getattr(benchmarking.load(op), "METRIC", "time")
        if benchmarking.write_plot(results, png_path, label, metric=metric):
            written.append(str(png_path))
        else:
            print("(matplotlib is not installed: no plot; pip install 'memops[bench]')", file=sys.stderr)
        print("wrote " + ", ".join(written))
    if not args.op:  # the whole suite: one report page for this run
        from memops.tools.report import render

        report = out_dir / "benchmarks.md"
        source = f"this `memops bench{' --quick' if args.quick else ''}` run ({label})"
        paths = [out_dir / f"{op}.json" for op in ops]
        report.write_text(render(paths, title=f"memops benchmarks ({label})", page_dir=out_dir, source=source))
        print(f"wrote {report}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from memops.tools.report import render

    results = Path(args.results)
    if not results.is_dir():
        raise ValueError(f"--results {args.results!r}: no such folder (memops bench --out writes one)")
    # <device>/<op>.json (committed results) or <op>.json (what memops bench --out writes)
    paths = sorted([*results.glob("*.json"), *results.glob("*/*.json")])
    paths = [p for p in paths if not p.name.startswith("tune") and p.parent.name != "gpu-compile" and _is_bench(p)]
    sweeps = sorted(results.glob("gpu-compile/gpu-compile-triton*.json"))
    if not paths and not sweeps:
        raise ValueError(f"--results {args.results!r}: no benchmark results (<op>.json or <device>/<op>.json) in it")
    out = Path(args.out)
    _output_folder(str(out.parent), "--out")
    out.write_text(render(paths, page_dir=out.parent))
    print(f"wrote {out} from {len(paths)} result files")
    # The GPU compile check: the latest full sweep per Triton version, and the sweep before the fixes.
    from memops.tools import gpu_check

    loaded = [json.loads(p.read_text()) for p in sweeps if "-subset" not in p.stem]
    sweeps = gpu_check.merge_labelled([r for r in loaded if not r.get("label")], [r for r in loaded if r.get("label")])
    before = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("gpu-compile/before-fixes-*.json"))]
    if sweeps:
        compile_out = Path(args.compile_out)
        compile_out.write_text(gpu_check.markdown(sweeps, before))
        print(f"wrote {compile_out} from {len(sweeps)} compile sweeps")
    return 0


def _is_bench(path: Path) -> bool:
    """A JSON file memops bench wrote: an object with a "results" list (other JSON beside it is skipped)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("results"), list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memops", description="memops: Triton kernels for learnable-memory ops")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the ops against their baselines; print a table, write JSON + PNG")
    from memops.tools.benchmarking import BENCHMARKS

    bench.add_argument("--op", metavar="NAME", help=f"one op to run, of: {', '.join(BENCHMARKS)} (default: all)")
    bench.add_argument(
        "--quick", action="store_true", help="the small cases only (about a minute on a 2-core CPU machine)"
    )
    bench.add_argument(
        "--out", default="bench-results", help="folder for <op>.json and <op>.png (default: bench-results)"
    )
    bench.add_argument(
        "--headline",
        action="store_true",
        help="the headline list (memops.benchmarks.headline) at real size, warm-up then timed, ceilings measured; "
        "writes headline.jsonl as it goes, then headline.md and bench/<op>.json",
    )
    bench.add_argument(
        "--rehearse", action="store_true", help="with --headline: on CPU, small shapes, the kernels interpreted"
    )
    bench.add_argument(
        "--deadline", type=float, default=None, metavar="S", help="with --headline: seconds the run may take"
    )
    bench.add_argument(
        "--warm-compiled",
        type=positive_int_type("--warm-compiled"),
        metavar="N",
        help="with --headline: only call each torch.compile baseline once, N processes at a time (fills the caches)",
    )
    report = commands.add_parser("report", help="render committed bench results into one markdown page")
    report.add_argument("--results", default="benchmarks/results", help="folder of <device>/<op>.json results")
    report.add_argument("--out", default="docs/benchmarks.md", help="the page to write (default: docs/benchmarks.md)")
    report.add_argument(
        "--compile-out",
        default="docs/gpu-compile.md",
        help="the GPU compile check's page, from <results>/gpu-compile/*.json (default: docs/gpu-compile.md)",
    )
    compare = commands.add_parser(
        "compare", help="two memops bench folders of the same cases: do their medians agree within their spread?"
    )
    compare.add_argument("first", help="a memops bench --out folder")
    compare.add_argument("second", help="another one, of the same cases")
    demo = commands.add_parser(
        "train-demo",
        help="train a small MemoryLM on associative recall, then generate (44 s on a 2-core CPU, 2026-12-02)",
    )
    add_demo_arguments(demo)
    commands.add_parser(
        "gpu-check",
        add_help=False,
        help="compile every kernel ahead of time for sm_90/sm_80 and report registers, spills, smem, "
        "tensor cores (memops gpu-check --help)",
    )
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "gpu-check":  # its own parser: memops.tools.gpu_check
        from memops.tools import gpu_check

        return gpu_check.main(list(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "report":
        try:
            return _report(args)
        except ValueError as error:
            parser.error(str(error))
    if args.command == "compare":
        from memops.tools.report import compare_runs

        for folder in (args.first, args.second):
            if not Path(folder).is_dir():
                parser.error(f"compare: {folder!r}: no such folder (memops bench --out writes one)")
        lines, agreeing, compared = compare_runs(Path(args.first), Path(args.second))
        if not compared:
            parser.error("compare: the two folders share no timed case (<op>.json from memops bench --out)")
        print("\n".join(lines))
        print(f"\n{agreeing} of {compared} medians agree within their interquartile ranges")
        return 0
    if args.command == "train-demo":
        from memops.tools import demo as demo_module

        forwarded = ["--seed", str(args.seed), "--task", args.task, "--optimizer", args.optimizer]
        if args.task == "recall" or any(a == "--steps" or a.startswith("--steps=") for a in argv):
            forwarded += ["--steps", str(args.steps)]
        return demo_module.main(forwarded)
    if args.command == "bench":
        try:
            return _bench(args)
        except ValueError as error:
            parser.error(str(error))
    return 2


if __name__ == "__main__":
    sys.exit(main())
