"""The package's layering holds: kernels/ imports nothing of memops but memops.kernels; the plumbing
(_backend, _registration, _validation) knows no op family; memops.nn builds on the public ops and
_validation only; op files name their kernel modules in imports (no module named by a string); custom ops
are registered only through memops._registration; and no op imports another op family's module for its
checks."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
            # ``from memops.kernels import attention``: the name may be a module itself
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


FAMILIES = (
    "attention", "attention_lse_merge", "retention", "retention_cache", "looped", "looped_cache", "product_key",
    "moe", "engram", "optim", "value_embedding", "quantized",
)  # fmt: skip


def test_kernels_import_nothing_above_them():
    offenders = {
        path.name: sorted(
            m for m in imported_modules(path) if m.startswith("memops") and not m.startswith("memops.kernels")
        )
        for path in sorted((ROOT / "kernels").glob("*.py"))
    }
    assert not any(offenders.values()), offenders


def test_custom_ops_are_registered_through_the_helper():
    direct = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "memops").rglob("*.py"))
        if path.name != "_registration.py" and "torch.library.custom_op" in path.read_text()
    ]
    assert not direct, direct


def test_op_families_do_not_import_each_other_for_checks():
    families = ("attention", "retention", "looped", "product_key", "moe", "engram")
    for family in families:
        others = {f"memops.{other}" for other in families if other != family}
        # looped attention's first loop and in-place path run memory attention itself: a call, not a check
        # retention attention runs on the attention kernels and under their launch policy (attention_backend)
        allowed = {"memops.attention"} if family in ("looped", "retention") else set()
        assert not (imported_modules(ROOT / "memops" / f"{family}.py") & (others - allowed)), family


def test_plumbing_knows_no_family():
    for name in ("_backend", "_registration", "_validation"):
        imported = imported_modules(ROOT / "memops" / f"{name}.py")
        family_modules = {f"memops.{f}" for f in FAMILIES} | {f"memops.kernels.{f}" for f in FAMILIES}
        assert not imported & family_modules, (name, sorted(imported & family_modules))
        assert not any(m.startswith("memops.reference") for m in imported), name


def test_nn_builds_on_public_ops_and_validation_only():
    public_ops = {f"memops.{f}" for f in FAMILIES} | {"memops.varlen"}  # and the packed-layout helpers
    for path in sorted((ROOT / "memops" / "nn").glob("*.py")):
        for module in imported_modules(path):
            if not module.startswith("memops"):
                continue
            op_module = module.rsplit(".", 1)[0] if module.rsplit(".", 1)[0] in public_ops else module
            allowed = op_module in public_ops or module.startswith(("memops._validation", "memops.nn"))
            assert allowed, f"{path.name} imports {module}"


def test_kernel_modules_are_named_in_imports():
    # no importlib / __import__ / string-named kernel module: a reader, an IDE and grep follow every call
    for path in sorted((ROOT / "memops").rglob("*.py")):
        text = path.read_text()
        assert "lazy_kernels" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("memops.kernels."), f"{path}: {node.value!r}"


# What CONTRIBUTING.md's "Adding an op family" says a family touches by hand: its own files (a glob per folder,
# the family's name in each) and the shared lists that name it. The counts there are these lists' lengths.
FAMILY_STEMS = ("attention", "product_key", "retention", "looped", "moe", "engram", "value_embedding")
FAMILY_FILES = (
    "memops/reference/*{}*.py", "kernels/*{}*.py", "memops/*{}*.py", "memops/nn/*{}*.py", "tests/test_*{}*.py",
    "tests/test_nn_*{}*.py", "benchmarks/*{}*.py", "docs/*{}*.md",
)  # fmt: skip
SHARED_LISTS = (
    "memops/reference/__init__.py", "memops/__init__.py", "memops/nn/__init__.py", "memops/testing/__init__.py",
    "benchmarks/__init__.py", "benchmarks/headline.py", "benchmarks/gpu_sanitize.py", "docs/index.md",
    "docs/choosing.md",
)  # fmt: skip


def test_a_family_is_found_by_its_name():
    for stem in FAMILY_STEMS:
        for pattern in FAMILY_FILES:
            assert list(ROOT.glob(pattern.format(stem))), f"family {stem}: no file {pattern.format(stem)}"
        for shared in SHARED_LISTS:
            assert stem in (ROOT / shared).read_text(), f"family {stem}: not in {shared}"
    # an op module launches its own family's kernels; kernels/attention.py also runs retention's and looped's
    # attention (their forward kernels, the shared backward)
    shared_kernels = {"attention": ("retention", "looped")}
    for path in (ROOT / "memops").glob("*.py"):
        for module in imported_modules(path):
            kernel = module.removeprefix("memops.kernels.")
            if module.startswith("memops.kernels.") and not kernel.startswith("_"):
                owner = next((stem for stem in FAMILY_STEMS if kernel.startswith(stem)), kernel)
                assert owner in path.stem or path.stem in shared_kernels.get(owner, ()), (path.name, module)
    text = (ROOT / "CONTRIBUTING.md").read_text()
    total = len(FAMILY_FILES) + len(SHARED_LISTS)
    expected = f"That is {total} files by hand ({len(FAMILY_FILES)} of the family's own, {len(SHARED_LISTS)} shared"
    assert expected in " ".join(text.split()), "CONTRIBUTING.md's count of the files a family touches is stale"
