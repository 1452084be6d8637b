"""Run every kernel once on awkward shapes, for `compute-sanitizer --tool memcheck python ...`."""

import torch

import memops

torch.manual_seed(0)
for S, D, T, K, dtype in [
    (37, 70, 9, 5, torch.float32),
    (1000, 1030, 17, 33, torch.bfloat16),
    (5, 1, 3, 1, torch.float16),
]:
    values = torch.randn(S, D, device="cuda", dtype=dtype, requires_grad=True)
    indices = torch.randint(0, S, (T, K), device="cuda", dtype=torch.int32)
    weights = torch.rand(T, K, device="cuda", dtype=dtype, requires_grad=True)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        memops.weighted_gather(values, indices, weights).square().sum().backward()
# a hot row (2,048 picks of row 3) takes the chunked deterministic path
values = torch.randn(50, 300, device="cuda", requires_grad=True)
indices = torch.randint(0, 50, (64, 40), device="cuda")
indices[:, :32] = 3
torch.use_deterministic_algorithms(True)
memops.weighted_gather(values, indices, torch.rand(64, 40, device="cuda")).square().sum().backward()

# memory attention: odd lengths, GQA, shared and per-sample memory, bias, causal with N > Nk, decode
for B, H, Hkv, N, Nk, M, D, shared, causal in [
    (2, 4, 2, 37, 45, 19, 64, True, False),
    (1, 2, 1, 70, 33, 0, 128, False, True),
    (3, 8, 2, 1, 100, 7, 32, False, True),
    (2, 2, 2, 65, 65, 130, 16, True, True),
]:
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        mem_shape = (Hkv, M, D) if shared else (B, Hkv, M, D)
        mem_k, mem_v = (
            torch.randn(mem_shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
        )
        bias = torch.randn(Hkv, M, device="cuda", requires_grad=True) if M else None
        out, lse = memops.memory_attention(q, k, v, mem_k, mem_v, causal=causal, mem_bias=bias, return_lse=True)
        (out.float().square().sum() + lse[torch.isfinite(lse)].sum()).backward()

# product-key search: n_keys not a multiple of the key block, topk not a power of two, half dim not a power of
# two, a token count off the token block, and the whole layer
for T, heads, key_dim, n_keys, topk, dtype in [
    (37, 3, 24, 130, 5, torch.float32),
    (70, 4, 256, 512, 32, torch.bfloat16),
    (1, 1, 16, 3, 1, torch.float16),
]:
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        queries = torch.randn(T, heads, key_dim, device="cuda", dtype=dtype, requires_grad=True)
        sub_keys = torch.randn(heads, 2, n_keys, key_dim // 2, device="cuda", dtype=dtype, requires_grad=True)
        scores, indices = memops.product_key_topk(queries, sub_keys, topk)
        scores.square().sum().backward()
torch.use_deterministic_algorithms(False)
layer = memops.nn.ProductKeyMemory(64, 64, n_keys=40, heads=2, topk=8, key_dim=32, gated=True).cuda()
layer(torch.randn(3, 11, 64, device="cuda")).sum().backward()

# TRIM-KV: retention attention (GQA, N != Nk), capacity (odd N), a cache stream with compactions
for B, H, Hkv, N, Nk, D in [(2, 4, 2, 37, 45, 64), (1, 8, 2, 70, 33, 128)]:
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    log_beta = (-0.1 * torch.rand(B, Hkv, Nk, device="cuda")).requires_grad_()
    memops.retention_attention(q, k, v, log_beta).float().square().sum().backward()
    memops.capacity_loss(log_beta, 8).backward()
cache = memops.RetentionKVCache(budget=37, buffer=5)
for n in (50, 1, 3, 1, 1, 7, 1):
    kv = torch.randn(2, 3, n, 64, device="cuda", dtype=torch.bfloat16)
    cache.update(kv, kv, 0, -torch.rand(2, 3, n, device="cuda"))

# MELT: fused looped attention (suffix of a cache, per-channel gate, GQA), the update with index rows, decode cache
for n, Nk, gate_width in [(37, 45, 1), (70, 70, 64), (1, 33, 1)]:
    q = torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k_new, v_new = (torch.randn(2, 2, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    k_cache, v_cache = (
        torch.randn(2, 2, Nk, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    gate = torch.rand(2, 2, n, gate_width, device="cuda", requires_grad=True)
    out, k, v = memops.looped_attention(q, k_new, v_new, gate, k_cache, v_cache)
    (out.float().square().sum() + k.float().sum() + v.float().sum()).backward()
rows = torch.tensor([5, 0, 9], device="cuda")
memops.looped_kv_update(
    *(torch.randn(1, 2, 10, 32, device="cuda") for _ in range(2)),
    *(torch.randn(1, 2, 3, 32, device="cuda") for _ in range(2)),
    torch.rand(1, 2, 3, 32, device="cuda"),
    rows=rows,
)
loop_cache = memops.SharedLoopKVCache(1)
for loop in range(4):
    kv = torch.randn(1, 2, 1, 64, device="cuda")
    loop_cache.update(kv, kv, 0, loop, torch.rand(1, 2, 1, 1, device="cuda"))

# dMoE: routing (partial block, groups, bias; softmax with E not a power of two) and the expert GEMMs
logits = torch.randn(2, 45, 256, device="cuda", requires_grad=True)
ids, weights, _ = memops.block_route(
    logits, block_size=32, top_k=8, n_groups=8, topk_groups=4, expert_bias=0.01 * torch.randn(256, device="cuda")
)
weights.sum().backward()
memops.block_route(torch.randn(1, 37, 60, device="cuda"), block_size=16, top_k=6, score_func="softmax")
x = torch.randn(90, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w_gate_up = (0.05 * torch.randn(256, 256, 256, device="cuda", dtype=torch.bfloat16)).requires_grad_()
w_down = (0.05 * torch.randn(256, 256, 128, device="cuda", dtype=torch.bfloat16)).requires_grad_()
memops.moe_ffn(
    x, w_gate_up, w_down, ids.reshape(-1, 8)[:90], weights.detach().reshape(-1, 8)[:90]
).float().sum().backward()
torch.cuda.synchronize()
print("sanitize run done")
