"""Every python block of README.md and docs/*.md runs as written, on CPU (the reference backend, as a reader's
laptop runs it), so the docs cannot rot. The blocks of one page run in order in one namespace, as a reader
runs them. A block opts out with a comment on the line before its fence: ``<!-- not run: <reason> -->``.
docs/api.md is generated signature listings (tests/test_docs.py keeps it current)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)```", re.S)
OPT_OUT = re.compile(r"<!-- not run: \S.* -->")


def blocks(page: Path) -> list[tuple[int, str]]:
    text = "\n" + page.read_text()
    out = []
    for match in BLOCK.finditer(text):
        if OPT_OUT.fullmatch(match["before"].strip()):
            continue
        out.append((text[: match.start("code")].count("\n"), match["code"]))
    return out


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_examples_run(page, monkeypatch, tmp_path):
    import memops

    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the repo
    namespace = {"__name__": "__docs__"}
    with memops.backend("reference"):  # what "auto" picks for a reader's CPU tensors
        for line, code in blocks(page):
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)


def test_every_python_block_is_run_or_opts_out_with_a_reason():
    for page in PAGES:
        text = "\n" + page.read_text()
        for match in BLOCK.finditer(text):
            before = match["before"].strip()
            assert not before.startswith("<!-- not run") or OPT_OUT.fullmatch(before), (page.name, before)
