"""The benchmark report: every ``memops bench`` JSON (one per op and device) rendered into one markdown page.

``memops report`` renders the results committed under ``benchmarks/results/<device>/`` into
``docs/benchmarks.md``; ``memops bench`` without ``--op`` also writes ``<out>/benchmarks.md`` for its own run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memops.tools.benchmarking import drift_warning, spread_text


def _shape(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _number(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render_payload(payload: dict) -> list[str]:
    results = payload["results"]
    if not results:
        return []
    op = results[0]["op"]
    device = results[0]["device"]
    label = "GPU" if device == "cuda" else "CPU timings (reference and baselines only)"
    lines = [
        f"### {op} on {payload['device']}",
        "",
        f"{label}; torch {payload.get('torch', '?')}, triton {payload.get('triton', '?')}, "
        f"date {payload.get('date', 'not recorded')}, "
        f"measured DRAM copy bandwidth {payload.get('copy_bandwidth_gbps', 0):,.0f} GB/s.",
        "",
        "Timing: "
        + (
            f"{payload['timing']['method']}; {payload['timing']['statistic']}; rerun while the IQR is above "
            f"{100 * payload['timing']['rerun_when_spread_above']:.0f}% of the median (at most "
            f"{payload['timing']['reruns']} times). Ceiling: {payload['timing']['ceiling']}."
            if "timing" in payload
            else "median only (written before the harness recorded spread and repeats); % is of the DRAM copy "
            "bandwidth."
        ),
        "",
    ]
    after = payload.get("copy_bandwidth_after_gbps")
    if after:
        drift = drift_warning(payload["copy_bandwidth_gbps"], after)
        lines += [
            f"**{drift[len('warning: ') :]}.**" if drift else f"Copy bandwidth after the cases: {after:,.0f} GB/s.",
            "",
        ]
    lines += [
        "| case | mode | provider | ms | IQR | N | GB/s | ceiling GB/s | % ceiling | TFLOP/s "
        "| speedup (baseline time / ours) | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    shapes = {}
    for r in results:
        shapes.setdefault(r["case"], r["params"])
        speedups = ", ".join(f"{b} {s:.2f}x" for b, s in r.get("speedup_vs", {}).items())
        note = r.get("note") or (r.get("error") or "")
        if r.get("noisy"):
            note = "noisy: IQR above 10% after reruns, or above the ceiling" + (f"; {note}" if note else "")
        if "fraction_of_ceiling" in r:
            fraction, roof = r["fraction_of_ceiling"], r.get("ceiling_gbps")
            percent = _number(None if fraction is None else 100 * fraction, ".1f")
            if fraction is None and r.get("median_ms") is not None:
                percent = ">100 (not bounded)"
        else:  # results written before per-size ceilings: the fraction of the DRAM copy bandwidth
            fraction, roof = r.get("fraction_of_copy_bandwidth"), payload.get("copy_bandwidth_gbps")
            percent = _number(None if fraction is None else 100 * fraction, ".1f")
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['provider']} | {_number(r.get('median_ms'), '.3f')} | "
            f"{spread_text(r)} | {_number(r.get('repeats'), 'd')} | {_number(r.get('gbps'), '.1f')} | "
            f"{_number(roof, ',.0f')} | {percent} | {_number(r.get('tflops'), '.1f')} | {speedups} | {note} |"
        )
    lines += ["", "Shapes: " + "; ".join(f"**{case}** {_shape(params)}" for case, params in shapes.items()), ""]
    return lines


def render(
    paths: list[Path], *, title: str = "memops benchmarks", page_dir: Path = Path("."), source: str | None = None
) -> str:
    """One markdown page from bench JSON files, GPU results first, then CPU. Plot links are relative to
    ``page_dir``, the folder the page is written to; ``source`` says where the results came from."""
    payloads = []
    for path in sorted(paths):
        payload = json.loads(Path(path).read_text())
        if payload.get("results"):
            payloads.append((payload["results"][0]["device"] != "cuda", payload["device"], path, payload))
    payloads.sort(key=lambda item: item[:3])
    lines = [
        f"# {title}",
        "",
        f"Generated from {source or 'the `memops bench` results in ' + ', '.join(sorted(_folders(paths, page_dir)))}.",
        "Speedups are baseline time / memops time from the same run. ms is the median of N repeats and IQR the",
        'interquartile range over the median. GB/s counts the fewest bytes an op must move; "% ceiling" is that',
        "over the faster of a copy and a read of the same number of bytes, measured in the same run, and is not",
        "claimed when above 100%. CPU tables time the reference path and the baselines only; they are not GPU",
        "performance numbers.",
        "",
    ]
    for _, _, path, payload in payloads:
        lines += render_payload(payload)

        plot = Path(path).with_suffix(".png")
        if plot.exists():
            lines += [f"![{payload['results'][0]['op']}]({_relative(plot, page_dir)})", ""]
    # benchmarks/cpu_ratio.py's table, where a results folder holds one
    for table in sorted({Path(path).parent / "cpu_ratio.md" for _, _, path, _ in payloads}):
        if table.exists():
            lines += [f"### The CPU path against the best plain-PyTorch formulation ({table.parent.name})", ""]
            lines += [table.read_text(), ""]
    return "\n".join(lines)


def _relative(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def _folders(paths: list[Path], page_dir: Path) -> set[str]:
    return {f"`{_relative(Path(p).parent, page_dir)}/`" for p in paths}


def compare_runs(first: Path, second: Path) -> tuple[list[str], int, int]:
    """Two ``memops bench`` folders of the same cases: a markdown table of each case's medians and whether they
    agree within their reported spread (the interquartile ranges overlap). Returns (lines, agreeing, compared)."""
    lines = [
        f"| op | case | mode | provider | {first.name} ms [q1, q3] | {second.name} ms [q1, q3] | difference | agree |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    agreeing = compared = 0
    for path in sorted(first.glob("*.json")):
        other = second / path.name
        if not other.exists():
            continue
        rows = {}
        for folder, file in ((0, path), (1, other)):
            payload = json.loads(file.read_text())
            for r in payload.get("results", []) if isinstance(payload, dict) else []:
                if r.get("median_ms") is not None and r.get("q1_ms") is not None:
                    rows.setdefault((r["op"], r["case"], r["mode"], r["provider"]), [None, None])[folder] = r
        for key, (a, b) in rows.items():
            if a is None or b is None:
                continue
            agree = a["q1_ms"] <= b["q3_ms"] and b["q1_ms"] <= a["q3_ms"]
            compared += 1
            agreeing += agree
            difference = 100 * (b["median_ms"] - a["median_ms"]) / a["median_ms"]
            lines.append(
                f"| {' | '.join(key)} | {a['median_ms']:.3f} [{a['q1_ms']:.3f}, {a['q3_ms']:.3f}] | "
                f"{b['median_ms']:.3f} [{b['q1_ms']:.3f}, {b['q3_ms']:.3f}] | {difference:+.1f}% | "
                f"{'yes' if agree else 'no'} |"
            )
    return lines, agreeing, compared
