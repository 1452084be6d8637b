"""memops.distributed on CPU: two processes spawned with the gloo backend (loopback only), every
collective under a 60 s timeout and the whole run under a deadline, so nothing can hang the suite.
The checks themselves live in memops.testing.distributed (the spawned interpreters import them)."""

import json
import socket
import time
import warnings

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from memops.testing import distributed as distributed_testing

WORLD = 2
DEADLINE_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(
        distributed_testing.worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the distributed workers did not finish within {DEADLINE_S} s")
    except mp.ProcessExitedException as error:
        # A worker that died after writing its report crashed in gloo's teardown, not in a check: the
        # reports carry every check's result. One that died earlier fails the run.
        if not all((out / f"rank{r}.json").exists() for r in range(WORLD)):
            raise
        warnings.warn(f"a distributed worker crashed after its checks: {error}", stacklevel=1)
    loaded = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    if any("skip" in report for report in loaded):
        pytest.skip(next(report["skip"] for report in loaded if "skip" in report))
    return loaded


@pytest.mark.parametrize("check", sorted(distributed_testing.CHECKS))
def test_distributed_check(reports, check):
    for rank, report in enumerate(reports):
        assert report[check]["ok"], f"rank {rank}:\n{report[check]['details']}"


def test_block_routing_bounds_the_ranks_a_block_visits(reports):
    details = reports[0]["expert_parallel_moe"]["details"]
    assert details["one_rank_owns_everything ranks per block"] == 1.0
    assert 1.0 <= details["spread ranks per block"] <= WORLD


def test_wrong_world_size_checkpoint_names_the_helper(reports):
    assert all(report["sharded_pkm"]["details"]["wrong world size message"] for report in reports)


def test_bad_construction_without_a_process_group():
    from memops.distributed import ShardedProductKeyMemory

    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ShardedProductKeyMemory(8, 8, n_keys=4, heads=1, topk=2, key_dim=8)


def test_communication_matches_the_model(reports):
    for report in reports:
        details = report["sharded_pkm"]["details"]
        assert details["bytes forward"] > 0 and details["bytes backward"] > 0
    assert "moe bytes forward, backward (all ranks)" in reports[0]["expert_parallel_moe"]["details"]


def test_bad_construction_inside_a_group(reports):
    for report in reports:
        assert report["sharded_pkm"]["details"]["indivisible width message"]
        assert report["sharded_pkm"]["details"]["mismatched group message"]
        assert report["expert_parallel_moe"]["details"]["indivisible experts message"]
