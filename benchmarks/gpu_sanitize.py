"""One awkward case per Triton kernel, forward and backward, for ``compute-sanitizer --tool memcheck``.

    python -m memops.benchmarks.gpu_sanitize [--device cuda|cpu] [--case NAME ...] [--warm N] [--list]

Every case runs on backend "triton" (so no launch-table fallback hides a kernel), with shapes off every tile
(odd lengths, a dimension not a power of two, K = 1, one-row tables, empty memory), and the run fails when a
kernel of ``memops.kernels`` did not launch: a kernel added without a case here fails the GPU plan's rehearsal
(``benchmarks/gpu/run.sh rehearse``, which runs these cases on CPU through Triton's interpreter).
``--warm N`` runs each case once in its own process, N at a time, without the sanitizer: the GPU run's
compile-ahead step, so that the sanitized run finds every kernel in Triton's cache (the same launches, so the
same cache keys). ``RACECHECK`` names the cases whose kernels use atomics or shared scratch, for
``compute-sanitizer --tool racecheck``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch

import memops
from memops.testing import count_launches, kernel_names

CASES: list[tuple[str, Callable[[str], None]]] = []


def case(fn: Callable[[str], None]) -> Callable[[str], None]:
    CASES.append((fn.__name__, fn))
    return fn


def _randn(*shape, device, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


@case
def weighted_gather(device):
    """Forward, weights grad and both values grads (atomic; the sorted-segment reduction under deterministic
    algorithms), a hot row that takes the chunked segment path, D off the block, K = 1; 8-bit tables."""
    for S, D, T, K, dtype in [(37, 70, 9, 5, torch.float32), (300, 1030, 17, 33, torch.bfloat16),
                              (5, 1, 3, 1, torch.float16)]:  # fmt: skip
        values = _randn(S, D, device=device, dtype=dtype, grad=True)
        indices = torch.randint(0, S, (T, K), device=device, dtype=torch.int32)
        weights = torch.rand(T, K, device=device, dtype=dtype).requires_grad_()
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            memops.weighted_gather(values, indices, weights).float().square().sum().backward()
    values = _randn(50, 300, device=device, grad=True)
    indices = torch.randint(0, 50, (64, 40), device=device)
    indices[:, :32] = 3  # 2,048 picks of row 3
    torch.use_deterministic_algorithms(True)
    memops.weighted_gather(values, indices, torch.rand(64, 40, device=device)).square().sum().backward()
    torch.use_deterministic_algorithms(False)
    # 8-bit tables: e4m3 and int8, e8m0 and fp32 scales, a last block shorter than the others (300 = 2 x 128 + 44)
    for dtype, scale_format in ((torch.float8_e4m3fn, "e8m0"), (torch.int8, "fp32")):
        qt = memops.quantize_table(values.detach(), dtype=dtype, block_size=128, scale_format=scale_format)
        weights = torch.rand(64, 40, device=device, requires_grad=True)
        memops.weighted_gather(qt, indices, weights).square().sum().backward()


@case
def memory_attention(device):
    """The fused kernels: GQA, shared and per-sample memory with a bias, causal with N > Nk, decode, M > N;
    deterministic dK/dV; the composed path (memory kernels + LSE merge)."""
    for B, H, Hkv, N, Nk, M, D, shared, causal in [
        (2, 4, 2, 37, 45, 19, 64, True, False),
        (1, 2, 1, 70, 33, 0, 128, False, True),
        (3, 4, 2, 1, 100, 7, 32, False, True),
        (2, 2, 2, 65, 65, 130, 16, True, True),
    ]:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            q = _randn(B, H, N, D, device=device, dtype=torch.bfloat16, grad=True)
            k, v = (_randn(B, Hkv, Nk, D, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
            mem_shape = (Hkv, M, D) if shared else (B, Hkv, M, D)
            mem_k, mem_v = (_randn(*mem_shape, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
            bias = _randn(Hkv, M, device=device, grad=True) if M else None
            out, lse = memops.memory_attention(
                q, k, v, mem_k, mem_v, causal=causal, mem_bias=bias, return_lse=True, impl="fused"
            )
            (out.float().square().sum() + lse[torch.isfinite(lse)].sum()).backward()
    torch.use_deterministic_algorithms(False)
    q = _randn(2, 4, 37, 64, device=device, dtype=torch.bfloat16, grad=True)
    k, v = (_randn(2, 2, 45, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    mem_k, mem_v = (_randn(2, 19, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    memops.memory_attention(q, k, v, mem_k, mem_v, causal=True, impl="composed").float().square().sum().backward()


@case
def memory_attention_varlen(device):
    """Packed sequences of odd lengths (one of a single token), shared memory with a bias, causal."""
    lengths = torch.tensor([37, 1, 70], device=device)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(lengths.sum())
    q = _randn(total, 4, 64, device=device, dtype=torch.bfloat16, grad=True)
    k, v = (_randn(total, 2, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    mem_k, mem_v = (_randn(2, 9, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    out = memops.memory_attention_varlen(
        q, k, v, cu, cu, 70, 70, mem_k, mem_v, causal=True, mem_bias=_randn(2, 9, device=device, grad=True)
    )
    out.float().square().sum().backward()


@case
def product_key_search(device):
    """n_keys off the key block, topk not a power of two, half dim not a power of two, one token; the layer."""
    for T, heads, key_dim, n_keys, topk, dtype in [
        (37, 3, 24, 130, 5, torch.float32),
        (20, 2, 96, 96, 32, torch.bfloat16),
        (1, 1, 16, 3, 1, torch.float16),
    ]:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            queries = _randn(T, heads, key_dim, device=device, dtype=dtype, grad=True)
            sub_keys = _randn(heads, 2, n_keys, key_dim // 2, device=device, dtype=dtype, grad=True)
            scores, _ = memops.product_key_topk(queries, sub_keys, topk)
            scores.float().square().sum().backward()
    torch.use_deterministic_algorithms(False)
    layer = memops.nn.ProductKeyMemory(64, 64, n_keys=40, heads=2, topk=8, key_dim=32, gated=True).to(device)
    layer(torch.randn(3, 11, 64, device=device)).sum().backward()


@case
def retention(device):
    """Retention attention (GQA, N != Nk), packed documents (position_ids) and varlen, the capacity and its
    loss (odd N, documents)."""
    for B, H, Hkv, N, Nk, D in [(2, 4, 2, 37, 45, 64), (1, 4, 2, 70, 33, 128)]:
        q = _randn(B, H, N, D, device=device, dtype=torch.bfloat16, grad=True)
        k, v = (_randn(B, Hkv, Nk, D, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
        log_beta = (-0.1 * torch.rand(B, Hkv, Nk, device=device)).requires_grad_()
        memops.retention_attention(q, k, v, log_beta).float().square().sum().backward()
        memops.capacity_loss(log_beta, 8).backward()
    positions = torch.cat([torch.arange(20), torch.arange(17)]).to(device)  # two documents in one row
    q = _randn(1, 4, 37, 64, device=device, dtype=torch.bfloat16, grad=True)
    k, v = (_randn(1, 2, 37, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    log_beta = (-0.1 * torch.rand(1, 2, 37, device=device)).requires_grad_()
    memops.retention_attention(q, k, v, log_beta, position_ids=positions).float().square().sum().backward()
    memops.capacity_loss(log_beta, 8, position_ids=positions).backward()
    cu = torch.tensor([0, 20, 21, 58], device=device, dtype=torch.int32)
    q = _randn(58, 4, 64, device=device, dtype=torch.bfloat16, grad=True)
    k, v = (_randn(58, 2, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    log_beta = (-0.1 * torch.rand(58, 2, device=device)).requires_grad_()
    memops.retention_attention_varlen(q, k, v, log_beta, cu, cu, 37, 37).float().square().sum().backward()


@case
def retention_cache(device):
    """A cache stream with compactions (select + gather), single-token and multi-token updates."""
    cache = memops.RetentionKVCache(budget=37, buffer=5)
    for n in (50, 1, 3, 1, 1, 7, 1):
        kv = torch.randn(2, 3, n, 64, device=device, dtype=torch.bfloat16)
        cache.update(kv, kv, 0, -torch.rand(2, 3, n, device=device))


@case
def looped(device):
    """Fused looped attention (a suffix of the cache, per-row and per-channel gates, GQA, decode), the update
    with index rows, the decode cache, and the packed (varlen) form."""
    for n, Nk, gate_width in [(37, 45, 1), (70, 70, 64), (1, 33, 1)]:
        q = _randn(2, 4, n, 64, device=device, dtype=torch.bfloat16, grad=True)
        k_new, v_new = (_randn(2, 2, n, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
        k_cache, v_cache = (_randn(2, 2, Nk, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
        gate = torch.rand(2, 2, n, gate_width, device=device).requires_grad_()
        out, k, v = memops.looped_attention(q, k_new, v_new, gate, k_cache, v_cache)
        (out.float().square().sum() + k.float().sum() + v.float().sum()).backward()
    rows = torch.tensor([5, 0, 9], device=device)
    memops.looped_kv_update(
        *(torch.randn(1, 2, 10, 32, device=device) for _ in range(2)),
        *(torch.randn(1, 2, 3, 32, device=device) for _ in range(2)),
        torch.rand(1, 2, 3, 32, device=device),
        rows=rows,
    )
    loop_cache = memops.SharedLoopKVCache(1)
    for loop in range(4):
        kv = torch.randn(1, 2, 1, 64, device=device)
        loop_cache.update(kv, kv, 0, loop, torch.rand(1, 2, 1, 1, device=device))
    cu = torch.tensor([0, 20, 21, 58], device=device, dtype=torch.int32)
    q = _randn(58, 4, 64, device=device, dtype=torch.bfloat16, grad=True)
    k_new, v_new, k_cache, v_cache = (
        _randn(58, 2, 64, device=device, dtype=torch.bfloat16, grad=True) for _ in range(4)
    )
    gate = torch.rand(58, 2, 1, device=device).requires_grad_()
    out, k, v = memops.looped_attention_varlen(q, k_new, v_new, gate, cu, 37, k_cache, v_cache)
    (out.float().square().sum() + k.float().sum() + v.float().sum()).backward()


@case
def moe(device):
    """Routing (a partial block, groups, bias; softmax with E not a power of two) and the expert GEMMs with
    empty experts, forward and backward."""
    logits = _randn(2, 45, 24, device=device, grad=True)
    ids, weights, _ = memops.block_route(
        logits, block_size=32, top_k=8, n_groups=8, topk_groups=4, expert_bias=0.01 * torch.randn(24, device=device)
    )
    weights.sum().backward()
    memops.block_route(torch.randn(1, 37, 60, device=device), block_size=16, top_k=6, score_func="softmax")
    x = _randn(90, 96, device=device, dtype=torch.bfloat16, grad=True)
    w_gate_up = (0.05 * torch.randn(24, 2 * 48, 96, device=device, dtype=torch.bfloat16)).requires_grad_()
    w_down = (0.05 * torch.randn(24, 96, 48, device=device, dtype=torch.bfloat16)).requires_grad_()
    memops.moe_ffn(
        x, w_gate_up, w_down, ids.reshape(-1, 8)[:90], weights.detach().reshape(-1, 8)[:90]
    ).float().sum().backward()


@case
def engram(device):
    """The n-gram hash, the fused lookup (a decode context; atomic and sorted-segment table grads), the gate
    (G streams, C off the block) and the short conv (dilation, residual), forward and backward."""
    from memops.reference.engram import engram_hash_params

    multipliers, primes = engram_hash_params((1,), [97, 89], max_ngram_size=3, n_head_per_ngram=3, seed=0,
                                             tokenizer_vocab_size=500)[1]  # fmt: skip
    multipliers, primes = multipliers.to(device), primes.to(device)
    offsets = torch.nn.functional.pad(primes.reshape(-1).cumsum(0)[:-1], (1, 0)).to(device)
    ids = torch.randint(0, 500, (2, 37), device=device)
    memops.ngram_hash(ids, multipliers, primes, pad_id=2)
    table = _randn(int(primes.sum()), 24, device=device, grad=True)
    for deterministic in (False, True):
        memops.engram_lookup(ids, table, multipliers, primes, offsets, pad_id=2, deterministic=deterministic).sum(
        ).backward()  # fmt: skip
    memops.engram_lookup(ids[:, -3:], table, multipliers, primes, offsets, pad_id=2, context=2)
    key, query = (_randn(2, 37, 3, 70, device=device, dtype=torch.bfloat16, grad=True) for _ in range(2))
    value = _randn(2, 37, 70, device=device, dtype=torch.bfloat16, grad=True)
    w_k, w_q = (torch.rand(3, 70, device=device, dtype=torch.bfloat16).add(0.5).requires_grad_() for _ in range(2))
    memops.engram_gate(key, query, w_k, w_q, value).float().square().sum().backward()
    x = _randn(2, 37, 3, 70, device=device, dtype=torch.bfloat16, grad=True)
    weight = (0.3 * torch.randn(3 * 70, 4, device=device, dtype=torch.bfloat16)).requires_grad_()
    norm_weight = torch.rand(3, 70, device=device, dtype=torch.bfloat16).add(0.5).requires_grad_()
    memops.short_conv(x, weight, norm_weight, dilation=3).float().square().sum().backward()


@case
def optim(device):
    """Both row-sparse optimizers on fp32 and bf16 tables: repeated rows (a hot row read 200 times), a row at
    each end of the table, D off the block, and an empty step; then fused into the backward of a weighted gather
    (scales and 5 picks per output row) and of a read whose other-rank rows are -1 (skipped)."""
    from memops.optim import RowwiseAdagrad, SparseAdam, apply_optimizer_in_backward

    for rows, D, dtype in [(41, 70, torch.float32), (1000, 1030, torch.bfloat16)]:
        tables = [_randn(rows, D, device=device, dtype=dtype, grad=True) for _ in range(2)]
        rounding = dict(stochastic_rounding=dtype == torch.bfloat16)
        optimizers = [SparseAdam([tables[0]], weight_decay=0.01, **rounding),
                      RowwiseAdagrad([tables[1]], weight_decay=0.01, **rounding)]  # fmt: skip
        for n in (300, 0):
            index = torch.randint(0, rows, (n,), device=device)
            if n:
                index[:200] = 7
                index[-2:] = torch.tensor([0, rows - 1], device=device)
            values = torch.randn(n, D, device=device, dtype=dtype)
            for table, optimizer in zip(tables, optimizers):
                table.grad = torch.sparse_coo_tensor(index.reshape(1, -1), values, table.shape, check_invariants=False)
                optimizer.step()
        for optimizer_class in (SparseAdam, RowwiseAdagrad):
            table = _randn(rows, D, device=device, dtype=dtype, grad=True)
            apply_optimizer_in_backward(optimizer_class, [table], {"weight_decay": 0.01, **rounding})
            index = torch.randint(0, rows, (60, 5), device=device)
            index[:40] = 7
            weights = torch.softmax(torch.randn(60, 5, device=device), -1).to(dtype)
            memops.weighted_gather(table, index, weights).float().square().sum().backward()
            picked = torch.randint(0, rows, (200,), device=device)
            skipped = torch.where(torch.rand(200, device=device) < 0.5, -1, picked)
            grads = torch.randn(200, D, device=device, dtype=dtype)
            optimizer_class([table]).update_rows(table, skipped, grads)


@case
def value_embedding(device):
    """The bank mix forward and backward in bf16: 3 heads of Dh = 72 (off the block), M = 5 slots (off the slot
    block), repeated ids and the last bank row; atomic and deterministic bank grads; then the bank in 8 bits
    (e4m3 with e8m0 scales per 24 columns, int8 with one fp32 scale per row) with the gates' grad."""
    B, N, H, Dh, M, V = 2, 37, 3, 72, 5, 50
    v = _randn(B, N, H, Dh, device=device, dtype=torch.bfloat16, grad=True)
    gates = _randn(B, N, H, M + 1, device=device, dtype=torch.bfloat16, grad=True)
    bank = _randn(V, M, H * Dh, device=device, dtype=torch.bfloat16, grad=True)
    ids = torch.randint(0, V, (B, N), device=device)
    ids[0, :20] = 7
    ids[1, -1] = V - 1
    for deterministic in (False, True):
        memops.value_embedding_mix(v, gates, ids, bank, deterministic=deterministic).float().square().sum().backward()
    # (the last 6 tokens, the last bank row among them: the 8-bit reads' bounds at a sixth of the work)
    last = (v.detach()[:, -6:].requires_grad_(), gates.detach()[:, -6:].requires_grad_(), ids[:, -6:])
    for dtype, block_size, scale_format in ((torch.float8_e4m3fn, 24, "e8m0"), (torch.int8, None, "fp32")):
        qt = memops.quantize_table(bank.detach().flatten(1), dtype=dtype, block_size=block_size,
                                   scale_format=scale_format)  # fmt: skip
        memops.value_embedding_mix(last[0], last[1], last[2], qt).float().square().sum().backward()


# Cases whose kernels use atomics (values grads, the deterministic-off dK/dV) or shared scratch (the sorts).
# (value_embedding's bank grad is the weighted gather's backward, racechecked there; its own kernels have neither)
RACECHECK = ("weighted_gather", "memory_attention", "product_key_search", "moe", "engram")


def run(names: list[str], device: str) -> Counter:
    """Run the named cases on backend "triton"; the launches made, by kernel name."""
    by_name = dict(CASES)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise SystemExit(f"gpu_sanitize: unknown case(s) {unknown}; the cases: {', '.join(by_name)}")
    torch.manual_seed(0)
    launches = Counter()
    with memops.backend("triton"), count_launches() as counted:
        for name in names:
            start = time.perf_counter()
            by_name[name](device)
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: done in {time.perf_counter() - start:.1f} s", flush=True)
    launches.update(counted)
    return launches


def _run_one(name_and_device) -> tuple[str, Counter]:
    name, device = name_and_device
    return name, run([name], device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memops.benchmarks.gpu_sanitize", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", action="append", help="only this case (repeatable); default: all")
    parser.add_argument("--warm", type=int, metavar="N", help="run each case in its own process, N at a time")
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="run the cases in N processes (the rehearsal: one per core)"
    )
    parser.add_argument("--list", action="store_true", help="print the case names")
    args = parser.parse_args(argv)
    names = args.case or [name for name, _ in CASES]
    if args.list:
        print("\n".join(names))
        return 0
    if args.warm or args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        start, launches = time.perf_counter(), Counter()
        # spawn: a forked process would inherit the parent's CUDA and torch thread state
        with ProcessPoolExecutor(args.warm or args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for name, launched in pool.map(_run_one, [(name, args.device) for name in names]):
                launches.update(launched)
                print(f"{'warm' if args.warm else 'ran'}: {name}", flush=True)
        if args.warm:
            print(f"warm: {len(names)} cases in {time.perf_counter() - start:.1f} s")
            return 0
    else:
        launches = run(names, args.device)
    print("launched: " + ", ".join(f"{k} x{n}" for k, n in sorted(launches.items())))
    if not args.case:  # the whole list: every kernel must have launched
        missing = sorted(kernel_names() - set(launches))
        if missing:
            print(f"gpu_sanitize: no case launches {missing}: add one to memops/benchmarks/gpu_sanitize.py")
            return 1
        print(f"sanitize run done: all {len(kernel_names())} kernels launched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
