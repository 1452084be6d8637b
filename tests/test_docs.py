"""The generated docs are current: docs/api.md is what `python -m memops.tools.apidoc` prints."""

from pathlib import Path

from memops.tools import apidoc

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_api_reference_is_current():
    assert (DOCS / "api.md").read_text() == apidoc.render() + "\n", "rerun: python -m memops.tools.apidoc > docs/api.md"


def test_every_public_name_is_documented():
    text = (DOCS / "api.md").read_text()
    import memops

    for name in memops.__all__:
        if name not in ("BACKENDS", "__version__"):
            assert f"`memops.{name}`" in text, name
