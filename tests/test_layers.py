"""The package's layering holds: kernels/ imports nothing of memops but memops.kernels, custom ops are
registered only through memops._registration, and no op imports another op family's module for its checks."""

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
    return modules


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
        allowed = {"memops.attention"} if family == "looped" else set()
        assert not (imported_modules(ROOT / "memops" / f"{family}.py") & (others - allowed)), family
