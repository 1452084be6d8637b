"""``python -m memops.demo``: the training demo, kept at its documented name (it lives in memops.tools.demo)."""

from memops.tools.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
