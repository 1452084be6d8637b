"""`memops bench`: the table, the JSON and the PNG; refusing interpreter timings; unknown ops."""

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from memops.tools import benchmarking, cli


def memops_cli(*argv: str) -> subprocess.CompletedProcess:
    """``memops ARGV`` in this process (a subprocess pays ~3 s of imports; the main-job and train-demo tests
    keep the real entry point): its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(argv)) or 0
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU quick run; the GPU run is benchmarks/gpu/run.sh")
def test_bench_quick_writes_table_json_and_png(tmp_path):
    # Every op, case and provider of the main job, with short timing windows: this checks what the run writes,
    # not its times.
    env = {**os.environ, "TRITON_INTERPRET": "0", "MEMOPS_BENCH_MIN_RUN_S": "0.001", "MEMOPS_BENCH_RERUNS": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "memops.tools.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "memops-reference" in result.stdout and "embedding_bag" in result.stdout
    assert "speedup" in result.stdout and "CPU timings" in result.stdout
    payload = json.loads((tmp_path / "weighted_gather.json").read_text())
    providers = {r["provider"] for r in payload["results"]}
    assert {"memops-reference", "embedding_bag", "gather_einsum"} <= providers
    assert all(r["median_ms"] > 0 for r in payload["results"])
    for r in payload["results"]:  # the spread and the repeats travel with every median
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["min_ms"] <= r["q1_ms"] and r["repeats"] >= 3
        assert r["fraction_of_ceiling"] is None or 0 < r["fraction_of_ceiling"] <= 1.0
    assert "blocked_autorange" in payload["timing"]["method"]
    assert "IQR" in result.stdout and "ceiling" in result.stdout
    assert (tmp_path / "weighted_gather.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run's own page: links relative to the page, and it says which run the results came from.
    page = (tmp_path / "benchmarks.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", page)
    assert len(links) == len(benchmarking.BENCHMARKS) and all((tmp_path / link).is_file() for link in links)
    assert "this `memops bench --quick` run" in page and "| IQR |" in page and "committed" not in page


def test_timing_statistics_and_noisy_reruns(monkeypatch):
    timing = benchmarking.Timing((1.0, 2.0, 3.0, 4.0, 5.0))
    assert timing.median == 3.0 and timing.quartiles == (2.0, 4.0) and timing.spread == pytest.approx(2 / 3)
    runs = iter([timing, benchmarking.Timing((1.0, 1.01, 1.02)), timing])
    monkeypatch.setattr(benchmarking, "measure", lambda fn, device: next(runs))
    steady, noisy = benchmarking.measure_steady(lambda: None, "cpu")  # the tight rerun is kept, not flagged
    assert steady.median == 1.01 and not noisy
    runs = iter([timing] * 3)
    steady, noisy = benchmarking.measure_steady(lambda: None, "cpu")  # noisy after every rerun: flagged
    assert noisy and steady is timing


def test_bench_refuses_interpreter_timings(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="interpreter timings"):
        benchmarking.run_op("weighted_gather", device="cpu", quick=True, bandwidth_gbps=1.0, progress=False)


def test_bench_unknown_op():
    result = memops_cli("bench", "--op", "nope")
    assert result.returncode == 2
    assert "unknown op 'nope'" in result.stderr and "weighted_gather" in result.stderr


def test_train_demo_command():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "memops.tools.cli", "train-demo", "--steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "recall on 512 held-out sequences" in result.stdout and "less K/V memory" in result.stdout


def test_report_renders_committed_results(tmp_path):
    results = tmp_path / "results" / "some-gpu"
    results.mkdir(parents=True)
    payload = {
        "device": "Some GPU",
        "torch": "2.11",
        "triton": "3.6",
        "date": "2026-11-25",
        "copy_bandwidth_gbps": 3000.0,
        "results": [
            {
                "op": "weighted_gather",
                "case": "small",
                "mode": "fwd",
                "provider": "memops",
                "params": {"T": 4},
                "device": "cuda",
                "median_ms": 0.5,
                "gbps": 10.0,
                "tflops": None,
                "fraction_of_copy_bandwidth": 0.01,
                "speedup_vs": {"embedding_bag": 2.0},
                "error": None,
                "peak_memory_mb": None,
                "note": None,
            }
        ],
    }
    (results / "weighted_gather.json").write_text(json.dumps(payload))
    out = tmp_path / "docs" / "benchmarks.md"
    result = memops_cli("report", "--results", str(tmp_path / "results"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "### weighted_gather on Some GPU" in text and "embedding_bag 2.00x" in text and "date 2026-11-25" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train-demo", "--steps", "0"], "--steps must be an integer >= 1, got '0'"),
        (["train-demo", "--steps", "-3"], "--steps must be an integer >= 1, got '-3'"),
        (["bench", "--op", "weighted_gather", "--out", "/dev/null/x"], "--out '/dev/null/x': cannot create the folder"),
        (["report", "--results", "/nonexistent-memops-results"], "no such folder"),
    ],
)
def test_cli_bad_arguments_give_clear_errors(argv, message):
    result = memops_cli(*argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_report_reads_what_bench_writes_and_refuses_an_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.json").write_text("[1, 2]")
    refused = memops_cli("report", "--results", str(empty), "--out", str(tmp_path / "r.md"))
    assert refused.returncode == 2 and "no benchmark results" in refused.stderr
    # memops bench --out writes <op>.json (and <op>.png) with no device folder; report reads that layout too
    bench_out = tmp_path / "bench"
    bench_out.mkdir()
    result = benchmarking.Result(op="weighted_gather", case="small", mode="fwd", provider="memops", params={},
                                 device="cpu", median_ms=1.0, gbps=1.0)  # fmt: skip
    benchmarking.write_json([result], bench_out / "weighted_gather.json", "cpu", 10.0)
    page = tmp_path / "page" / "r.md"
    rendered = memops_cli(
        "report", "--results", str(bench_out), "--out", str(page), "--compile-out", str(tmp_path / "c.md")
    )
    assert rendered.returncode == 0 and "from 1 result files" in rendered.stdout, rendered.stderr
    assert "### weighted_gather on cpu" in page.read_text()


def test_compare_runs_reads_two_bench_folders(tmp_path):
    def run(folder, median, q1, q3):
        folder.mkdir()
        result = benchmarking.Result(op="weighted_gather", case="small", mode="fwd", provider="memops", params={},
                                     device="cpu", median_ms=median, q1_ms=q1, q3_ms=q3, gbps=1.0)  # fmt: skip
        benchmarking.write_json([result], folder / "weighted_gather.json", "cpu", 10.0)

    run(tmp_path / "a", 1.0, 0.95, 1.05)
    run(tmp_path / "b", 1.02, 0.99, 1.06)  # overlapping quartiles: agree
    run(tmp_path / "c", 1.5, 1.4, 1.6)  # disjoint: disagree
    agree = memops_cli("compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert agree.returncode == 0 and "1 of 1 medians agree" in agree.stdout and "+2.0%" in agree.stdout
    differ = memops_cli("compare", str(tmp_path / "a"), str(tmp_path / "c"))
    assert differ.returncode == 0 and "0 of 1 medians agree" in differ.stdout and "| no |" in differ.stdout
    missing = memops_cli("compare", str(tmp_path / "a"), str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
