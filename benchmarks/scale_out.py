"""Scale-out timings over torch.distributed: ``python -m memops.benchmarks.scale_out [--world 1 2]``.

Spawns one process per rank (NCCL on GPUs when there are enough, gloo on CPU) and times, per world size, a
column-parallel ShardedProductKeyMemory and an ExpertParallelBlockMoE forward+backward at a fixed total size,
printing tokens/s and the bytes per token each rank handed to collectives (memops.distributed.COMMUNICATED).
CPU gloo timings measure the schemes' overheads on one host, not GPU scaling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(step, repeats: int = 5) -> float:
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def _worker(rank: int, world: int, port: int, out: str, tokens: int) -> None:
    from memops import distributed as md

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    pkm = md.ShardedProductKeyMemory(256, 256, n_keys=128, heads=4, topk=16, key_dim=64, query_norm=None).to(device)
    torch.manual_seed(0)
    moe = md.ExpertParallelBlockMoE(256, 128, 16, 2, block_size=32, min_experts=4).to(device)
    x = torch.randn(1, tokens, 256, device=device)
    report = {}
    for name, layer in (("sharded_pkm", pkm), ("expert_parallel_moe", moe)):

        def step():
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()
            if cuda:
                torch.cuda.synchronize()

        seconds = _time(step)
        md.COMMUNICATED.clear()
        step()
        report[name] = {
            "tokens_per_s": tokens / seconds,
            "bytes_per_token": sum(md.COMMUNICATED.values()) / tokens,
            "ms": 1e3 * seconds,
        }
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(out, f"world{world}.json"), "w") as handle:
            json.dump({"device": "cuda" if cuda else "cpu (gloo)", **report}, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    for world in args.world:
        mp.start_processes(_worker, args=(world, _free_port(), out, args.tokens), nprocs=world, start_method="spawn")
        result = json.load(open(os.path.join(out, f"world{world}.json")))
        for name in ("sharded_pkm", "expert_parallel_moe"):
            r = result[name]
            print(
                f"{result['device']:<12} world {world}  {name:<20} {r['ms']:8.2f} ms  "
                f"{r['tokens_per_s']:10.0f} tokens/s  "
                f"{r['bytes_per_token']:8.1f} bytes/token handed to collectives (rank 0)"
            )


if __name__ == "__main__":
    main()
