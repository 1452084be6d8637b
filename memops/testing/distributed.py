"""Multi-process checks of memops.distributed, run by tests/test_distributed.py in spawned gloo processes.

They live in the package (not the test file) so the spawned interpreters can import them. Each check
compares the sharded module against the single-process module built from the same seed.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import traceback

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=60)


def _close(a: torch.Tensor | None, b: torch.Tensor | None, tol: float = 1e-5) -> float:
    if a is None or b is None:
        raise AssertionError(f"a gradient is missing: {'ours' if a is None else 'expected'}")
    error = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    if not error <= tol:
        raise AssertionError(f"relative error {error:.3e} > {tol:.0e}")
    return error


def check_sharded_pkm(rank: int, world: int) -> dict:
    from memops import distributed as md
    from memops.nn import ProductKeyMemory

    kwargs = dict(n_keys=8, heads=2, topk=4, key_dim=16, query_norm="layernorm", gated=True)
    torch.manual_seed(0)
    single = ProductKeyMemory(12, 8, value_dim=16, **kwargs)
    torch.manual_seed(0)
    sharded = md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, module in (("single", single), ("sharded", sharded)):
        leaf = x.clone().requires_grad_()
        out = module(leaf)
        out.square().sum().backward()
        results[name] = (out.detach(), leaf.grad, {n: p.grad for n, p in module.named_parameters()})
    errors = {
        "out": _close(results["sharded"][0], results["single"][0]),
        "dx": _close(results["sharded"][1], results["single"][1]),
    }
    width = 16 // world
    for name, grad in results["sharded"][2].items():
        expected = results["single"][2][name]
        if name == "values.weight":
            expected = expected[:, rank * width : (rank + 1) * width]
        errors[name] = _close(grad, expected)
    # Without the weights' all-reduce the query and sub-key gradients are wrong: the all-reduce is needed.
    torch.manual_seed(0)
    unreduced = md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs)
    original = md._AllReduceGrad.apply
    md._AllReduceGrad.apply = staticmethod(lambda tensor, group: tensor)
    try:
        unreduced(x).square().sum().backward()
    finally:
        md._AllReduceGrad.apply = original
    difference = (unreduced.sub_keys.grad - results["single"][2]["sub_keys"]).norm() / results["single"][2][
        "sub_keys"
    ].norm()
    errors["sub_keys error without all-reduce"] = difference.item()
    if difference < 1e-3:
        raise AssertionError("the sub-key gradient came out right without the all-reduce: the check cannot fail")
    # Communication: the bytes each rank hands to collectives match docs/scale_out.md's model.
    md.COMMUNICATED.clear()
    out = sharded(x)
    out.square().sum().backward()
    tokens = x.shape[0] * x.shape[1]
    errors["bytes forward"] = md.COMMUNICATED["pkm forward all_gather"]
    errors["bytes backward"] = md.COMMUNICATED["pkm backward all_reduce"]
    if errors["bytes forward"] != tokens * (16 // world) * 4 or errors["bytes backward"] != tokens * 2 * 4 * 4:
        raise AssertionError(f"communicated bytes {dict(md.COMMUNICATED)} differ from the model")
    # Bad construction: a width the group does not divide; sharing with another group.
    try:
        md.ShardedProductKeyMemory(12, 8, value_dim=15, **kwargs)
    except ValueError as error:
        errors["indivisible width message"] = "must divide value_dim=15" in str(error)
    other_group = dist.new_group(ranks=[0])
    try:
        sharded.share_values_with(
            md.ShardedProductKeyMemory(12, 8, value_dim=16, process_group=dist.group.WORLD, **kwargs)
        )
        errors["same group shares"] = True
        fake = md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs)
        fake.process_group = other_group
        sharded.share_values_with(fake)
    except ValueError as error:
        errors["mismatched group message"] = "different process groups" in str(error)
    # Checkpoints: the shard round-trips at this world size, and the full table gathers back.
    state = sharded.state_dict()
    torch.manual_seed(0)
    fresh = md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs)
    fresh.load_state_dict(state)
    full = md.gather_value_table(sharded)
    _close(full, single.values.weight.detach() - 0 * full)  # same init; training steps not taken yet
    bad = dict(state)
    bad["_extra_state"] = {"rank": 0, "world_size": world + 1}
    try:
        fresh.load_state_dict(bad)
    except ValueError as error:
        errors["wrong world size message"] = "gather_value_table" in str(error)
    return errors


def check_expert_parallel_moe(rank: int, world: int) -> dict:
    from memops import distributed as md
    from memops.nn import BlockMoE

    kwargs = dict(block_size=4, min_experts=2, shared_experts=1)
    inputs = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    errors = {}
    for case in ("spread", "one_rank_owns_everything"):
        torch.manual_seed(0)
        single = BlockMoE(16, 8, 4, 2, **kwargs)
        torch.manual_seed(0)
        parallel = md.ExpertParallelBlockMoE(16, 8, 4, 2, **kwargs)
        if case == "one_rank_owns_everything":
            # Selection bias on rank 0's experts: rank 1 receives no slots, and its own tokens all leave.
            for module in (single, parallel):
                module.expert_bias[:2] = 10.0
        everything = torch.cat(inputs).requires_grad_()
        expected = single(everything)
        expected.square().sum().backward()
        mine = inputs[rank].clone().requires_grad_()
        out = parallel(mine)
        out.square().sum().backward()
        errors[f"{case} out"] = _close(out.detach(), expected.detach()[rank * 2 : (rank + 1) * 2])
        errors[f"{case} dx"] = _close(mine.grad, everything.grad[rank * 2 : (rank + 1) * 2])
        local = slice(rank * 2, (rank + 1) * 2)
        errors[f"{case} dw_gate_up"] = _close(parallel.w_gate_up.grad, single.w_gate_up.grad[local])
        errors[f"{case} dw_down"] = _close(parallel.w_down.grad, single.w_down.grad[local])
        router = parallel.router.weight.grad.clone()
        dist.all_reduce(router)  # each rank's router saw its own tokens
        errors[f"{case} d_router"] = _close(router, single.router.weight.grad)
        errors[f"{case} ranks per block"] = parallel.ranks_per_block()
    # Communication model, summed over ranks: each slot's d values go out once and come back once, with its
    # expert id; plus every rank's split sizes. (Per rank it depends on how many slots it receives.)
    md.COMMUNICATED.clear()
    parallel(inputs[rank].clone().requires_grad_()).sum().backward()
    slots, d = world * inputs[rank].shape[0] * inputs[rank].shape[1] * 2, 16
    counted = torch.tensor(
        [float(md.COMMUNICATED["moe forward all_to_all"]), float(md.COMMUNICATED["moe backward all_to_all"])]
    )
    dist.all_reduce(counted)
    expected = [slots * d * 4 * 2 + slots * 8 + world * world * 8, slots * d * 4 * 2]
    if counted.tolist() != expected:
        raise AssertionError(f"communicated bytes {counted.tolist()} != model {expected}")
    errors["moe bytes forward, backward (all ranks)"] = expected
    try:
        md.ExpertParallelBlockMoE(16, 8, 3, 2, **kwargs)
    except ValueError as error:
        errors["indivisible experts message"] = "must divide n_experts=3" in str(error)
    return errors


def check_ddp_memory_lm(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from memops.models import MemoryLM, MemoryLMConfig
    from memops.testing import TINY_MEMORY_LM

    config = {**TINY_MEMORY_LM, "max_positions": 32, "kv_budget": 64, "kv_buffer": 16, "capacity_weight": 0.0}
    generator = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 17, (4, 12), generator=generator) for _ in range(3)]
    torch.manual_seed(0)
    single = MemoryLM(MemoryLMConfig(**config))
    torch.manual_seed(0)
    # The retention gates only feed the capacity loss (weight 0 here): unused in DDP's forward.
    ddp = DistributedDataParallel(MemoryLM(MemoryLMConfig(**config)), find_unused_parameters=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, ddp)]
    losses = []
    for tokens in batches:
        optimizers[0].zero_grad()
        single_loss = single.loss(tokens[:, :-1], tokens[:, 1:])
        single_loss.backward()
        optimizers[0].step()
        # This rank's half of the global batch, through DDP's forward so its gradient hooks run.
        optimizers[1].zero_grad()
        half = tokens[rank * 2 : (rank + 1) * 2]
        logits = ddp(half[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), half[:, 1:].flatten())
        loss.backward()
        optimizers[1].step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append((single_loss.item(), global_loss.item() / world))
    for single_loss, ddp_loss in losses:
        if abs(single_loss - ddp_loss) > 1e-4 * max(1.0, abs(single_loss)):
            raise AssertionError(f"DDP loss {ddp_loss} != single-process loss {single_loss}")
    return {"losses": losses}


def check_sharded_engram(rank: int, world: int) -> dict:
    from memops import distributed as md
    from memops.nn import Engram

    # Three heads (orders 2..4, one head each) of odd prime sizes: an odd row count, so the last shard is shorter.
    config = dict(
        layer_id=1, hidden_size=16, hc_mult=2, vocab_sizes=(61, 67, 71), max_ngram_size=4, n_embed_per_ngram=8,
        n_head_per_ngram=1, kernel_size=4, pad_id=2, seed=0, tokenizer_vocab_size=90,
    )  # fmt: skip
    torch.manual_seed(0)
    single = Engram(**config)
    torch.manual_seed(0)
    sharded = md.ShardedEngram(**config)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 2, 16, generator=generator)
    ids = torch.randint(0, 90, (2, 7), generator=generator)
    results = {}
    for name, module in (("single", single), ("sharded", sharded)):
        leaf = hidden.clone().requires_grad_()
        out = module(leaf, ids)
        out.square().sum().backward()
        results[name] = (out.detach(), leaf.grad, {n: p.grad for n, p in module.named_parameters()})
    errors = {"out": _close(results["sharded"][0], results["single"][0]),
              "dhidden": _close(results["sharded"][1], results["single"][1])}  # fmt: skip
    start, rows = sharded.row_start, sharded.multi_head_embedding.embedding.weight.shape[0]
    for name, grad in results["sharded"][2].items():
        expected = results["single"][2][name]
        if name == "multi_head_embedding.embedding.weight":
            expected = expected[start : start + rows]
            errors["table rows on this rank"] = rows
        errors[name] = _close(grad, expected) if expected.abs().sum() > 0 else float((grad.abs().sum() == 0).item())
    total = single.multi_head_embedding.embedding.weight.shape[0]
    if total % world == 0:
        raise AssertionError("the table's row count divides the world size: the uneven last shard is not tested")
    # Communication: one all-reduce of the (tokens, (N - 1) * e) partial embeddings forward, nothing backward.
    md.COMMUNICATED.clear()
    sharded(hidden, ids).sum().backward()
    errors["bytes forward"] = md.COMMUNICATED["engram forward all_reduce"]
    if errors["bytes forward"] != 2 * 7 * 3 * 8 * 4 or len(md.COMMUNICATED) != 1:
        raise AssertionError(f"communicated bytes {dict(md.COMMUNICATED)} differ from the model")
    # Checkpoints: the full table gathers back to the single-process layout, which loads strictly.
    full = md.gather_engram_table(sharded)
    errors["gathered table"] = _close(full, single.multi_head_embedding.embedding.weight.detach())
    state = {k: v for k, v in sharded.state_dict().items() if k != "_extra_state"}
    state["multi_head_embedding.embedding.weight"] = full
    Engram(**config).load_state_dict(state, strict=True)
    return errors


def check_sharded_optimizers(rank: int, world: int) -> dict:
    """Row-sparse optimizers on sharded tables: each rank's in-backward optimizer (memops.optim) keeps state for
    its own shard and steps with no collective beyond the layer's own; after 4 steps every rank's shard equals
    its part of the single-process table trained by the unfused optimizer on sparse grads."""
    from memops import distributed as md
    from memops import optim
    from memops.nn import Engram, ProductKeyMemory

    errors = {}
    generator = torch.Generator().manual_seed(2)
    pkm_kwargs = dict(n_keys=8, heads=2, topk=4, key_dim=16, value_dim=16)
    engram_config = dict(
        layer_id=1, hidden_size=16, hc_mult=2, vocab_sizes=(61, 67, 71), max_ngram_size=4, n_embed_per_ngram=8,
        n_head_per_ngram=1, kernel_size=4, pad_id=2, seed=0, tokenizer_vocab_size=90,
    )  # fmt: skip
    cases = [
        ("pkm SparseAdam", optim.SparseAdam, lambda **kw: ProductKeyMemory(12, 8, **pkm_kwargs, **kw),
         lambda: md.ShardedProductKeyMemory(12, 8, **pkm_kwargs), lambda m: m.values.weight,
         lambda: (torch.randn(2, 5, 12, generator=generator),)),
        ("engram SparseAdam", optim.SparseAdam, lambda **kw: Engram(**engram_config, **kw),
         lambda: md.ShardedEngram(**engram_config), lambda m: m.multi_head_embedding.embedding.weight,
         lambda: (torch.randn(2, 7, 2, 16, generator=generator), torch.randint(0, 90, (2, 7), generator=generator))),
        ("engram RowwiseAdagrad", optim.RowwiseAdagrad, lambda **kw: Engram(**engram_config, **kw),
         lambda: md.ShardedEngram(**engram_config), lambda m: m.multi_head_embedding.embedding.weight,
         lambda: (torch.randn(2, 7, 2, 16, generator=generator), torch.randint(0, 90, (2, 7), generator=generator))),
    ]  # fmt: skip
    for name, optimizer_class, make_single, make_sharded, table_of, make_inputs in cases:
        torch.manual_seed(0)
        single = make_single(sparse=True)
        torch.manual_seed(0)
        sharded = make_sharded()
        unfused = optimizer_class([table_of(single)], lr=0.05)
        optim.apply_optimizer_in_backward(optimizer_class, [table_of(sharded)], {"lr": 0.05})
        initial = table_of(sharded).detach().clone()
        md.COMMUNICATED.clear()
        for _ in range(4):
            inputs = make_inputs()
            single(*inputs).square().sum().backward()
            unfused.step()
            unfused.zero_grad()
            sharded(*inputs).square().sum().backward()
        table = table_of(sharded)
        if table.grad is not None:
            raise AssertionError(f"{name}: the fused path left a grad on the table")
        if torch.equal(table.detach(), initial):
            raise AssertionError(f"{name}: the sharded table did not change")
        expected = table_of(single).detach()
        if isinstance(sharded, md.ShardedProductKeyMemory):
            width = expected.shape[1] // world
            expected = expected[:, rank * width : (rank + 1) * width]
        else:
            expected = expected[sharded.row_start : sharded.row_start + table.shape[0]]
        errors[name] = _close(table.detach(), expected, 1e-5)
        state = optim.in_backward_optimizer(table).state[table]
        state_shapes = [tuple(v.shape) for v in state.values() if isinstance(v, torch.Tensor)]
        if any(shape[0] != table.shape[0] for shape in state_shapes):
            raise AssertionError(f"{name}: optimizer state {state_shapes} is not the shard's {tuple(table.shape)}")
        errors[f"{name} state shapes"] = state_shapes
        keys = {key for key in md.COMMUNICATED if not key.startswith(("pkm ", "engram "))}
        if keys:
            raise AssertionError(f"{name}: collectives beyond the layer's own: {keys}")
    return errors


def check_sharded_value_bank(rank: int, world: int) -> dict:
    """ShardedValueEmbeddingBank against the single-process bank: output, the grads of v, gates and the rank's
    rows, the bytes communicated, and 3 steps of SparseAdam fused into the backward against the unfused
    optimizer on the single bank's sparse grad; the full bank gathers back."""
    from memops import distributed as md
    from memops import optim
    from memops.nn import ValueEmbeddingBank

    V, M, H, Dh = 37, 3, 2, 8  # an odd vocabulary: the last shard is shorter
    torch.manual_seed(0)
    single = ValueEmbeddingBank(V, M, H, Dh)
    torch.manual_seed(0)
    sharded = md.ShardedValueEmbeddingBank(V, M, H, Dh)
    generator = torch.Generator().manual_seed(3)

    def inputs():
        v = torch.randn(2, 6, H, Dh, generator=generator)
        gates = 2 * torch.sigmoid(torch.randn(2, 6, H, M + 1, generator=generator))
        return v, gates, torch.randint(0, V, (2, 6), generator=generator)

    v, gates, ids = inputs()
    results = {}
    md.COMMUNICATED.clear()
    for name, module in (("single", single), ("sharded", sharded)):
        leaves = [v.clone().requires_grad_(), gates.clone().requires_grad_()]
        out = module(leaves[0], leaves[1], ids)
        out.square().sum().backward()
        results[name] = (out.detach(), *(t.grad for t in leaves), module.weight.grad)
    start, rows = sharded.row_start, sharded.weight.shape[0]
    errors = {name: _close(results["sharded"][i], results["single"][i])
              for i, name in enumerate(("out", "dv", "dgates"))}  # fmt: skip
    errors["dbank rows"] = _close(results["sharded"][3], results["single"][3][start : start + rows])
    tokens = ids.numel()
    expected = {
        "value bank forward all_reduce": tokens * H * Dh * 4,
        "value bank backward all_reduce": tokens * H * M * 4,
    }
    if dict(md.COMMUNICATED) != expected:
        raise AssertionError(f"communicated bytes {dict(md.COMMUNICATED)} differ from the model {expected}")
    errors["bytes"] = dict(md.COMMUNICATED)
    # the bank trained by SparseAdam: fused into the sharded backward, unfused on the single bank's sparse grad
    single.weight.grad = sharded.weight.grad = None
    single.sparse = True
    unfused = optim.SparseAdam([single.weight], lr=0.05)
    optim.apply_optimizer_in_backward(optim.SparseAdam, [sharded.weight], {"lr": 0.05})
    for _ in range(3):
        v, gates, ids = inputs()
        single(v, gates, ids).square().sum().backward()
        unfused.step()
        unfused.zero_grad()
        sharded(v, gates, ids).square().sum().backward()
    if sharded.weight.grad is not None:
        raise AssertionError("the fused path left a grad on the bank")
    errors["trained rows"] = _close(sharded.weight.detach(), single.weight.detach()[start : start + rows])
    state = optim.in_backward_optimizer(sharded.weight).state[sharded.weight]
    if state["exp_avg"].shape != sharded.weight.shape:
        raise AssertionError(f"optimizer state {tuple(state['exp_avg'].shape)} is not the shard's")
    errors["gathered bank"] = _close(md.gather_value_bank(sharded), single.weight.detach())
    return errors


def _same_table(a, b) -> bool:
    """Two QuantizedTables hold the same bits (data, scales) and the same blocking."""
    return (a.block_size == b.block_size and a.dtype == b.dtype and torch.equal(a.scales, b.scales)
            and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)))  # fmt: skip


def _saved_and_loaded(qt):
    """``qt`` through torch.save and torch.load(weights_only=True), as a checkpoint file carries it."""
    from memops import QuantizedTable

    buffer = io.BytesIO()
    torch.save(qt.state_dict(), buffer)
    buffer.seek(0)
    return QuantizedTable.from_state_dict(torch.load(buffer, weights_only=True))


def check_sharded_quantized(rank: int, world: int) -> dict:
    """8-bit tables quantized per shard: each sharded layer's output equals the single-process layer quantized
    alike; the gather helpers assemble the full 8-bit table with the same bits as the single layer's, and that
    table, saved and loaded, serves a single-process layer (another world size) with the sharded output."""
    from memops import distributed as md
    from memops.nn import Engram, ProductKeyMemory, ValueEmbeddingBank

    errors = {}
    generator = torch.Generator().manual_seed(5)
    # ProductKeyMemory: columns sharded (width 16 / world); blocks of 4 and one scale per shard row
    kwargs = dict(n_keys=8, heads=2, topk=4, key_dim=16, query_norm="layernorm", gated=True)
    x = torch.randn(2, 5, 12, generator=generator)
    for block, fmt in ((4, dict(dtype=torch.float8_e4m3fn, scale_format="e8m0")),
                       (None, dict(dtype=torch.int8, scale_format="fp32"))):  # fmt: skip
        torch.manual_seed(0)
        sharded = md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs).quantize_(block_size=block, **fmt)
        full = _saved_and_loaded(md.gather_value_table(sharded))
        width = 16 // world
        torch.manual_seed(0)
        single = ProductKeyMemory(12, 8, value_dim=16, **kwargs).quantize_(block_size=block or width, **fmt)
        if not _same_table(full, single.values.table):
            raise AssertionError(f"pkm block {block}: the gathered 8-bit table differs from the single layer's")
        torch.manual_seed(0)
        loaded = ProductKeyMemory(12, 8, value_dim=16, **kwargs).quantize_(block_size=full.block_size, **fmt)
        state = loaded.state_dict()
        state.update({"values.data": full.data, "values.scales": full.scales})
        loaded.load_state_dict(state)
        with torch.no_grad():
            errors[f"pkm block {block} out"] = _close(sharded(x), loaded(x))
    torch.manual_seed(0)
    try:
        md.ShardedProductKeyMemory(12, 8, value_dim=16, **kwargs).quantize_(block_size=3)
    except ValueError as error:
        errors["straddling block message"] = "must divide the shard width" in str(error)
    else:
        raise AssertionError("a block straddling two shards was accepted")
    # Engram: rows sharded (an odd row count: the last shard is shorter)
    config = dict(
        layer_id=1, hidden_size=16, hc_mult=2, vocab_sizes=(61, 67, 71), max_ngram_size=4, n_embed_per_ngram=8,
        n_head_per_ngram=1, kernel_size=4, pad_id=2, seed=0, tokenizer_vocab_size=90,
    )  # fmt: skip
    fmt = dict(dtype=torch.int8, block_size=4, scale_format="fp32")
    torch.manual_seed(0)
    sharded = md.ShardedEngram(**config).quantize_(**fmt)
    torch.manual_seed(0)
    single = Engram(**config).quantize_(**fmt)
    full = _saved_and_loaded(md.gather_engram_table(sharded))
    if not _same_table(full, single.multi_head_embedding.table):
        raise AssertionError("engram: the gathered 8-bit table differs from the single layer's")
    torch.manual_seed(0)
    loaded = Engram(**config).quantize_(**fmt)
    state = loaded.state_dict()
    state.update({"multi_head_embedding.embedding.data": full.data,
                  "multi_head_embedding.embedding.scales": full.scales})  # fmt: skip
    loaded.load_state_dict(state)
    hidden = torch.randn(2, 7, 2, 16, generator=generator)
    ids = torch.randint(0, 90, (2, 7), generator=generator)
    with torch.no_grad():
        errors["engram out"] = _close(sharded(hidden, ids), loaded(hidden, ids))
    # the MoVE bank: rows (token ids) sharded, blocks of the head dim; the gates' grad still flows
    V, M, H, Dh = 37, 3, 2, 8
    fmt = dict(dtype=torch.float8_e4m3fn, block_size=4, scale_format="e8m0")
    torch.manual_seed(0)
    sharded = md.ShardedValueEmbeddingBank(V, M, H, Dh).quantize_(**fmt)
    torch.manual_seed(0)
    single = ValueEmbeddingBank(V, M, H, Dh).quantize_(**fmt)
    full = _saved_and_loaded(md.gather_value_bank(sharded))
    if not _same_table(full, single.table):
        raise AssertionError("value bank: the gathered 8-bit bank differs from the single bank's")
    v = torch.randn(2, 6, H, Dh, generator=generator)
    gates = 2 * torch.sigmoid(torch.randn(2, 6, H, M + 1, generator=generator))
    token_ids = torch.randint(0, V, (2, 6), generator=generator)
    results = {}
    for name, module in (("single", single), ("sharded", sharded)):
        leaf = gates.clone().requires_grad_()
        out = module(v, leaf, token_ids)
        out.square().sum().backward()
        results[name] = (out.detach(), leaf.grad)
    errors["value bank out"] = _close(results["sharded"][0], results["single"][0])
    errors["value bank dgates"] = _close(results["sharded"][1], results["single"][1])
    return errors


CHECKS = {
    "sharded_pkm": check_sharded_pkm,
    "expert_parallel_moe": check_expert_parallel_moe,
    "ddp_memory_lm": check_ddp_memory_lm,
    "sharded_engram": check_sharded_engram,
    "sharded_optimizers": check_sharded_optimizers,
    "sharded_value_bank": check_sharded_value_bank,
    "sharded_quantized": check_sharded_quantized,
}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Entry point of each spawned process: run every check, write rank<r>.json (results or the error)."""
    report = {}
    try:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    except Exception as error:  # noqa: BLE001 - reported to the test, which skips with the reason
        report["skip"] = f"gloo could not start: {type(error).__name__}: {error}"
    else:
        failed = False
        for name, check in CHECKS.items():
            if failed:  # a rank that failed mid-check leaves the collectives out of step: stop here
                report[name] = {"ok": False, "details": "not run: an earlier check failed"}
                continue
            try:
                report[name] = {"ok": True, "details": check(rank, world)}
            except Exception:  # noqa: BLE001 - reported to the test with the traceback
                report[name] = {"ok": False, "details": traceback.format_exc()}
            status = torch.tensor([0.0 if report[name]["ok"] else 1.0])
            try:
                dist.all_reduce(status)
            except Exception:  # noqa: BLE001 - the other rank is gone or out of step
                status.fill_(1.0)
            failed = bool(status.item())
    # The report is written before the process group is torn down: gloo's teardown can abort a process
    # ("terminate called without an active exception") when one rank leaves while the other is still in it;
    # the barrier keeps the two in step, and the results survive even if teardown crashes.
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle, default=str)
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
