"""The GPU run's plan (benchmarks/gpu/run.sh, memops.tools.gpu_plan): its lists match the code, its compile-ahead
step compiles what the runtime launches, its budget table is current, and what it leaves in $OUT comes back.
The whole rehearsal (`run.sh rehearse`) runs in .ci/run beside the suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memops.tools import benchmarking, gpu_plan, triton_cache

ROOT = Path(__file__).resolve().parents[1]


def run_without_interpreter(code: str, timeout: int = 600) -> dict:
    """Run ``code`` (which prints one JSON line last) in a process where Triton compiles for GPUs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_headline_list_covers_every_family_and_names_real_cases():
    from memops.tools.gpu_check import FAMILIES

    entries = benchmarking.headlines()
    assert set(FAMILIES) <= {entry.family for entry in entries}, set(FAMILIES) - {e.family for e in entries}
    for rehearse in (False, True):
        for entry, case in benchmarking.headline_cases(rehearse=rehearse):  # raises for a case that does not exist
            names = gpu_plan.headline_providers(entry, case)  # raises for a baseline that does not exist
            assert any(name.startswith("memops") for name in names), (entry, case)
            assert entry.metric in ("bandwidth", "flops", "time") and entry.goal


def test_a_headline_naming_a_missing_case_baseline_or_family_is_caught(monkeypatch):
    import dataclasses

    entry, *rest = benchmarking.headlines()
    others = tuple(e for e in rest if e.family != entry.family)
    monkeypatch.setattr(benchmarking, "headlines", lambda: (dataclasses.replace(entry, case="no-such-case"), *rest))
    with pytest.raises(LookupError, match="no such case"):
        benchmarking.headline_cases(rehearse=False)
    bad_baseline = (dataclasses.replace(entry, baselines=("no-such",)), *rest)
    monkeypatch.setattr(benchmarking, "headlines", lambda: bad_baseline)
    with pytest.raises(LookupError, match="no provider"):
        gpu_plan.headline_providers(*benchmarking.headline_cases(rehearse=False)[0])
    monkeypatch.setattr(benchmarking, "headlines", lambda: others)  # a family of the compile check without an entry
    with pytest.raises(LookupError, match=f"no headline entry for the family \\['{entry.family}'\\]"):
        benchmarking.headline_cases(rehearse=False)


def test_sanitizer_run_fails_when_a_kernel_did_not_launch(monkeypatch, capsys):
    # The full list launching all 26 kernels is checked by the rehearsal; here: the check can fail.
    from memops.benchmarks import gpu_sanitize

    monkeypatch.setattr(gpu_sanitize, "CASES", [case for case in gpu_sanitize.CASES if case[0] == "retention_cache"])
    assert gpu_sanitize.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "no case launches" in out and "engram_gate_fwd_kernel" in out
    assert "retention_select_kernel" not in out.split("no case launches")[1]


def test_compile_ahead_plans_every_launch_of_the_headline_cases():
    # Recorded through the public ops at sm_90's launch configs (small shapes): every specialisation the memops
    # providers launch is one `memops gpu-check --headline` compiles. (It found, among others, the product-key
    # layer's fp32 gather weights, the looped backward and the retention cache's decode attention missing.)
    result = run_without_interpreter(
        "import json; from memops.tools.gpu_plan import key_mismatches; n, p = key_mismatches(); "
        "print(json.dumps(dict(checked=n, problems=p)))"
    )
    assert result["checked"] > 100
    assert result["problems"] == []


KERNELS = [
    "weighted_gather_fwd_kernel",
    "weighted_gather_bwd_kernel",
    "engram_gate_fwd_kernel",
    "short_conv_fwd_kernel",
]


@pytest.mark.parametrize("runtime_fp_fusion, hits", [("1", True), ("0", False)])
def test_runtime_launch_hits_the_compile_ahead_cache(tmp_path, runtime_fp_fusion, hits):
    # The compile-ahead step's compiles (triton.compile into TRITON_CACHE_DIR) are found by Triton's runtime
    # path (JITFunction.run with an sm_90 target): the same cache key. Changing a cache-invalidating variable
    # in between (TRITON_DEFAULT_FP_FUSION, which memops gpu-check pins) makes every lookup miss: the check can
    # fail, and run.sh exports the variable for every step.
    kernels = KERNELS if hits else KERNELS[:2]  # (every lookup missing is shown on fewer compiles)
    cache, log = str(tmp_path / "cache"), str(tmp_path / "log")
    code = (
        "import json; from pathlib import Path; from memops.tools.gpu_plan import cache_check; "
        f"r = cache_check({kernels!r}, Path({cache!r}), Path({log!r}), "
        f"runtime_env={{'TRITON_DEFAULT_FP_FUSION': {runtime_fp_fusion!r}}}); print(json.dumps(r))"
    )
    result = run_without_interpreter(code)
    assert result["compiled"] == result["variants"] > 0
    if hits:
        assert result["hits"] >= result["variants"] and result["misses"] == 0, result
    else:
        assert result["hits"] == 0 and result["misses"] > 0, result


def collected_cuda_tests(session) -> tuple[int, int] | None:
    """(CUDA-marked tests, at-scale ones) from this session's collection when it holds the whole suite (every
    test file: the suite's own run, each xdist worker collecting it all); None otherwise (a file run alone), and
    the budget counts them by a collection of its own."""
    files = {path.name for path in (ROOT / "tests").glob("test_*.py")}
    if {item.path.name for item in session.items} != files:
        return None
    marks = [{mark.name for mark in item.iter_markers()} for item in session.items]
    return sum("cuda" in m for m in marks), sum({"cuda", "at_scale"} <= m for m in marks)


def test_committed_budget_is_current_and_fits_the_call(request):
    counts = collected_cuda_tests(request.session)  # (saves the budget's own pytest collection, ~8 s)
    rows = run_without_interpreter(
        f"import json; from memops.tools.gpu_plan import budget_rows; print(json.dumps(budget_rows(tests={counts!r})))"
    )
    committed = json.loads(gpu_plan.BUDGET_FILE.read_text())
    assert committed["limits"] == {**gpu_plan.STEP_LIMITS, **gpu_plan.TUNE_LIMITS}
    assert rows == committed["check"], (
        "regenerate: python -m memops.tools.gpu_plan budget --write benchmarks/gpu/budget.json"
    )
    # 9 minutes of limits in a call of at most 10: a minute spare; each step expected inside its limit
    assert sum(row["limit_s"] for row in rows) <= gpu_plan.PLAN_SECONDS == 9 * 60
    assert all(row["estimate_s"] <= row["limit_s"] for row in rows)
    assert gpu_plan.budget_markdown(rows) in (ROOT / "docs" / "testing.md").read_text()


def test_check_outputs(tmp_path):
    for name in gpu_plan.CHECK_FILES:
        (tmp_path / name).write_text("x")
    assert gpu_plan.check_outputs(tmp_path) == []
    (tmp_path / "headline.md").unlink()
    assert gpu_plan.check_outputs(tmp_path) == ["missing headline.md"]
    (tmp_path / "headline.md").write_text("x")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(gpu_plan.MAX_FILE_BYTES + 1)
    (tmp_path / "bench").mkdir()
    problems = gpu_plan.check_outputs(tmp_path)
    assert any(f"{len(gpu_plan.CHECK_FILES) + 2} entries" in p for p in problems)
    assert any(p.startswith("big.bin") for p in problems) and "bench is not a plain file" in problems


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "rehearsee"],
        capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)),
    )  # fmt: skip
    assert done.returncode == 2 and "unknown step or plan 'rehearsee'" in done.stderr
    assert not (tmp_path / "device.txt").exists()


def test_cache_log_summary(tmp_path):
    log = tmp_path / "log"
    log.write_text("hit weighted_gather_fwd_kernel\nmiss weighted_gather_fwd_kernel\nmiss triton_poi_fused_0\nhit x\n")
    counts = triton_cache.summarize(log, {"weighted_gather_fwd_kernel"})
    assert counts["memops"] == {"hit": 1, "miss": 1} and counts["other"] == {"hit": 1, "miss": 1}
    assert "missed: weighted_gather_fwd_kernel x1" in triton_cache.summary_line(log, {"weighted_gather_fwd_kernel"})


def test_headline_jsonl_keeps_what_a_killed_run_wrote(tmp_path):
    path = tmp_path / "headline.jsonl"
    path.write_text(
        json.dumps(dict(kind="run", device="d", ceilings={})) + "\n"
        + json.dumps(dict(kind="result", op="weighted_gather", case="c")) + "\n"
        + '{"kind": "result", "op": "cut sh'
    )  # fmt: skip
    header, rows = gpu_plan.read_jsonl(path)
    assert header["device"] == "d" and [r["case"] for r in rows] == ["c"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--headline", "--op", "engram"], "without --op and --quick"),
        (["--rehearse"], "go with --headline"),
        (["--warm-compiled", "2"], "go with --headline"),
    ],
)
def test_bench_headline_options(argv, message, capsys):
    from memops.tools.cli import main

    with pytest.raises(SystemExit):
        main(["bench", *argv])
    assert message in capsys.readouterr().err


def test_tune_plan_fits_the_call_and_its_sweeps_exist():
    import importlib

    assert gpu_plan.STEP_LIMITS["info"] + sum(gpu_plan.TUNE_LIMITS.values()) <= gpu_plan.PLAN_SECONDS
    script = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()
    for step in gpu_plan.TUNE_LIMITS:
        module = script.split(f"step_{step}() {{ tune_sweep ")[1].split()[0]
        assert callable(importlib.import_module(f"memops.benchmarks.{module}").main), step


def test_tune_table_is_patch_ready(tmp_path):
    from memops.tools.tuning import write_table

    faster = {"default": {"BLOCK": 64}, "default_ms": 2.0, "all": [{"ms": 1.0, "config": {"BLOCK": 128}}]}
    same = {"default": {"BLOCK": 64}, "default_ms": 1.01, "all": [{"ms": 1.0, "config": {"BLOCK": 32}}]}
    text = write_table(tmp_path, "x", "X_CONFIGS", [("(90, '16') fwd", faster), ("(90, '16') bwd", same)]).read_text()
    assert "(90, '16') fwd: {'BLOCK': 128},  # 1.000 ms vs 2.000 ms default" in text
    assert "{'BLOCK': 32}," not in text  # within 3%: not proposed
    assert "| (90, '16') fwd | {'BLOCK': 64} | 2.000 | {'BLOCK': 128} | 1.000 | 2.00x |" in text


@pytest.mark.parametrize("compile_only", [None, "1/3"])
def test_sweeps_shard_their_compiles_and_write_what_they_timed(tmp_path, monkeypatch, compile_only):
    from memops.tools import tuning

    configs = [{"BLOCK": b} for b in (16, 32, 64, 128, 256)]
    launched = []

    def run(config):
        launched.append(config["BLOCK"])

    def sweep_shapes(args, report):
        result = tuning.sweep("k", configs, run, {"BLOCK": 64})
        report["shapes"].append({"k": result})
        report["rows"].append(("(90, '16')", result))

    monkeypatch.setattr(tuning, "time_ms", lambda fn: fn() or 1.0 + 0.001 * launched[-1])
    monkeypatch.setattr(tuning, "_SHARD", [])
    argv = ["tune", "--out", str(tmp_path)] + (["--compile-only", compile_only] if compile_only else [])
    monkeypatch.setattr(sys, "argv", argv)
    tuning.run_sweeps("k", "K_CONFIGS", sweep_shapes)
    if compile_only:  # every third config from the second, once each, and nothing written
        assert launched == [32, 256] and not list(tmp_path.iterdir())
    else:
        assert sorted(set(launched)) == [16, 32, 64, 128, 256]
        timings = json.loads((tmp_path / "tune_k.json").read_text())
        assert [r["config"]["BLOCK"] for r in timings["shapes"][0]["k"]["all"]] == [16, 32, 64, 128, 256]
        assert "(90, '16'): {'BLOCK': 16}," in (tmp_path / "tune-k.md").read_text()
