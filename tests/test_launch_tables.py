"""The CUDA launch tables: complete, shaped as the kernels need, and the "auto" fallback follows them.

The compile figures behind each entry come from `memops gpu-check` (tests/test_gpu_check.py compiles the CI
subset); these checks need no compiler."""

from __future__ import annotations

import itertools

import pytest
import torch

from memops._backend import configs_for_arch
from memops.kernels import attention, moe, product_key

TABLES = {"forward": attention.FWD_CONFIGS, "dQ": attention.DQ_CONFIGS, "dK/dV": attention.DKDV_CONFIGS}


@pytest.mark.parametrize("name", TABLES)
def test_attention_tables_cover_every_arch_dtype_and_head_dim(name):
    table = TABLES[name]
    assert set(table) == set(itertools.product((90, 80), ("16", "tf32", "fp32"), (64, 128, 256)))
    for (arch, dtype, head_dim), (by_path, why) in table.items():
        assert "*" in by_path and why, (arch, dtype, head_dim)
        for path, config in by_path.items():
            if config is None:
                continue
            block_m, block_n, warps, stages = config
            assert warps in (4, 8) and stages in (1, 2, 3)
            if arch == 90 and dtype != "fp32":  # wgmma: 64 rows per warpgroup in every dot
                rows = block_n if name == "dK/dV" else block_m
                assert rows >= 64, (name, arch, dtype, head_dim, path, config)


def test_fallback_follows_the_tables():
    q16 = torch.empty(1, 2, 8, 128, dtype=torch.bfloat16, device="meta")
    q32 = torch.empty(1, 2, 8, 128, dtype=torch.float32, device="meta")
    with configs_for_arch(90):
        assert attention.reference_instead(q16, "memory", backward=True) is None
        assert attention.reference_instead(q32, "memory", backward=False)  # ieee fp32: FMA dots spill
        assert attention.attention_config(128, q16.device, torch.bfloat16, "blend-channel")["num_stages"] == 2
        bwd = attention.attention_bwd_config(128, q16.device, torch.bfloat16, "memory")
        assert set(bwd) == {"dq", "dkdv"}
        assert product_key.search_reference_instead(torch.empty(4, 2, 64, device="meta")) is not None
        assert product_key.search_reference_instead(torch.empty(4, 2, 64, dtype=torch.bfloat16, device="meta")) is None
    with configs_for_arch(80):
        q256 = torch.empty(1, 2, 8, 256, dtype=torch.bfloat16, device="meta")
        assert attention.reference_instead(q256, "memory", backward=False) is None
        assert attention.reference_instead(q256, "memory", backward=True)  # dK/dV at D=256 spills everywhere
        assert attention.reference_instead(q256, "blend-channel", backward=False)
    # no pinned arch on a CPU tensor: the interpreter, which never falls back
    assert attention.reference_instead(torch.empty(1, 2, 8, 128), "memory", backward=True) is None


def test_grouped_gemm_configs_keep_the_layout_block():
    for config, why in moe.GEMM_CONFIGS.values():
        assert config[0] == 64 and why
    with configs_for_arch(90):
        assert moe.gemm_config(torch.device("meta"), torch.float32)["BLOCK_K"] == 16


def test_varlen_paths_derive_from_the_padded_tiles():
    """A packed (varlen) path takes the padded path's tile with one pipeline stage less (half the key block at
    one stage) unless the table lists it; None there sends "auto" to the reference on that GPU."""
    q16 = torch.empty(4, 2, 128, dtype=torch.bfloat16, device="meta")  # packed (total, H, D)
    with configs_for_arch(90):
        padded = attention.attention_config(128, q16.device, torch.bfloat16, "memory")
        packed = attention.attention_config(128, q16.device, torch.bfloat16, "varlen-memory")
        assert packed == dict(padded, num_stages=padded["num_stages"] - 1)
        assert attention.reference_instead(q16, "varlen-memory", backward=True) is None
        q256 = torch.empty(4, 2, 256, dtype=torch.bfloat16, device="meta")
        assert attention.reference_instead(q256, "blend-channel", backward=False) is None
        assert attention.reference_instead(q256, "varlen-blend-channel", backward=False)  # listed as None
    with configs_for_arch(80):
        assert attention.reference_instead(q16, "varlen-decay", backward=True)  # dQ listed as None
        assert attention.reference_instead(q16, "varlen-memory", backward=True) is None
