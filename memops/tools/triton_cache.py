"""Count Triton's compile-cache hits and misses across the processes of a run (the GPU plan's device.txt).

``triton.compile`` looks every kernel up in its cache before compiling it: once per specialisation and
process, at the first launch (the JIT keeps compiled kernels in memory after that). Pointing Triton's
documented ``TRITON_CACHE_MANAGER`` knob at :class:`CountingCacheManager` (``memops.tools.triton_cache:
CountingCacheManager``) keeps Triton's own file cache and appends one line per lookup, ``hit <kernel>`` or
``miss <kernel>``, to the file named by ``MEMOPS_TRITON_CACHE_LOG``. Neither variable is part of Triton's cache
key, so counting changes no kernel's key. A miss is a kernel compiled at its launch: after the compile-ahead
step, a memops kernel that misses was launched with a specialisation the step did not foresee.

``python -m memops.tools.triton_cache LOG`` prints the counts: memops' kernels (by name) and the rest
(torch.compile's generated kernels) apart.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from triton.runtime.cache import FileCacheManager

LOG_VARIABLE = "MEMOPS_TRITON_CACHE_LOG"


class CountingCacheManager(FileCacheManager):
    """Triton's file cache manager, logging each kernel lookup (``get_group`` of a ``<kernel>.json``)."""

    def get_group(self, filename: str):
        group = super().get_group(filename)
        log = os.environ.get(LOG_VARIABLE)
        if log and filename.endswith(".json"):
            outcome = "hit" if group is not None and filename in group else "miss"
            with open(log, "a") as f:  # one short append per line: whole lines from concurrent processes
                f.write(f"{outcome} {filename[: -len('.json')]}\n")
        return group


def summarize(log: Path, ours: set[str] | None = None) -> dict:
    """{"memops": Counter(hit=, miss=), "other": Counter, "missed": Counter(kernel name)} from a log."""
    from memops.testing import kernel_names

    ours = kernel_names() if ours is None else ours
    counts = {"memops": Counter(), "other": Counter(), "missed": Counter()}
    if not Path(log).exists():
        return counts
    for line in Path(log).read_text().splitlines():
        outcome, _, kernel = line.partition(" ")
        if outcome not in ("hit", "miss"):
            continue
        group = "memops" if kernel in ours else "other"
        counts[group][outcome] += 1
        if outcome == "miss" and group == "memops":
            counts["missed"][kernel] += 1
    return counts


def summary_line(log: Path, ours: set[str] | None = None) -> str:
    counts = summarize(log, ours)
    mine, other = counts["memops"], counts["other"]
    line = (
        f"triton cache: memops kernels {mine['hit']} hits, {mine['miss']} misses; other kernels (torch.compile) "
        f"{other['hit']} hits, {other['miss']} misses"
    )
    if counts["missed"]:
        line += "; missed: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts["missed"].items()))
    return line


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}: {summary_line(Path(path))}")
