"""Argument types and option sets shared by the ``memops`` command and the scripts it forwards to (no torch
import: ``memops --help`` stays fast)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse turns the ValueError into a clear usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_int_type(name: str):
    """argparse type: an int >= 1, with an error that names the option ``name``."""

    def parse(text: str) -> int:
        try:
            return positive_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= 1, got {text!r}") from None

    return parse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the training demo: ``memops train-demo`` and ``python -m memops.tools.demo``."""
    steps = positive_int_type("--steps")
    parser.add_argument("--steps", type=steps, default=1500, help="training steps (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the model, data and sampling (default 0)")
    parser.add_argument(
        "--task",
        choices=("recall", "ngram", "facts"),
        default="recall",
        help="recall: associative recall (default); ngram: a 2-gram rule task trained with and without Engram "
        "(200 steps unless --steps is given); facts: token-identity facts trained without value memory, with LaVE "
        "and with MoVE (200 steps unless --steps is given)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "sparse-adam", "rowwise-adagrad"),
        default="adamw",
        help="the memory tables' optimizer: adamw (dense, with the rest of the model; default), or memops.optim's "
        "SparseAdam / RowwiseAdagrad fused into the backward (the rest stays AdamW)",
    )
