"""Scale-out over torch.distributed (NCCL on GPUs, gloo on CPU): column-parallel product-key memory and
expert-parallel block MoE, built from plain collectives with autograd.

- :class:`ShardedProductKeyMemory` keeps Dv / world_size columns of the value table per rank (Memory Layers
  at Scale's memory parallelism). Queries, search and softmax weights are replicated; each rank reads its
  columns with ``weighted_gather``. Per token: the output all-gather moves Dv values (none with
  ``gather_output=False``), and the backward all-reduces the heads x k weight gradients.
- :class:`ExpertParallelBlockMoE` gives each rank E / world_size experts. After block routing (replicated
  router), every (token, k) slot travels to the rank owning its expert (``all_to_all_single``), runs there
  through ``moe_ffn`` and travels back: 2 x k x d values per token each way, plus split sizes.
- :class:`ShardedValueEmbeddingBank` splits MoVE's bank by token ids, as ShardedEngram splits its table.
- :class:`ShardedEngram` splits the hashed n-gram table by rows; every rank of a tensor-parallel group
  reads the rows it owns for all tokens and one all-reduce sums the partial embeddings: (N - 1) x e values
  per token forward, nothing backward.

With the row-sparse optimizers of memops.optim (``sparse=True`` or ``apply_optimizer_in_backward``) each rank's
optimizer holds state for its own shard only (the rank's table is its own parameter) and steps on the rows
its reads touched: no communication beyond the layer's own.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from memops._validation import can_read_values
from memops.engram import ngram_hash
from memops.moe import moe_ffn, unique_experts
from memops.nn.engram import Engram
from memops.nn.moe import BlockMoE
from memops.nn.product_key import ProductKeyMemory
from memops.nn.value_embedding import ValueEmbeddingBank
from memops.optim import in_backward_optimizer, update_in_backward
from memops.product_key import weighted_gather
from memops.quantized import QuantizedTable
from memops.value_embedding import check_id_range, check_value_embedding_inputs, row_sparse_mix, value_embedding_mix

# Bytes each rank hands to collectives, by scheme and direction: what docs/scale_out.md's model predicts.
COMMUNICATED: Counter = Counter()


def _count(key: str, tensor: torch.Tensor) -> None:
    COMMUNICATED[key] += tensor.numel() * tensor.element_size()


def _group_size_and_rank(process_group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("memops.distributed: torch.distributed is not initialised (init_process_group first)")
    return dist.get_world_size(process_group), dist.get_rank(process_group)


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (a replicated input whose uses are
    split over ranks)."""

    @staticmethod
    def forward(ctx, tensor, group, label="pkm backward all_reduce"):
        ctx.group, ctx.label = group, label
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _count(ctx.label, grad)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


class _GatherColumns(torch.autograd.Function):
    """All-gather of column shards into full width; the backward keeps this rank's columns of the (replicated)
    output gradient, with no reduction."""

    @staticmethod
    def forward(ctx, shard, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.rank, ctx.width = group, rank, shard.shape[-1]
        pieces = [torch.empty_like(shard) for _ in range(world)]
        _count("pkm forward all_gather", shard)
        dist.all_gather(pieces, shard.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


class _AllToAll(torch.autograd.Function):
    """Rows exchanged between ranks (``all_to_all_single`` with split sizes); the backward sends the gradient
    back along the same routes."""

    @staticmethod
    def forward(ctx, rows, recv_splits, send_splits, group):
        ctx.recv_splits, ctx.send_splits, ctx.group = recv_splits, send_splits, group
        out = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        _count("moe forward all_to_all", rows)
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        _count("moe backward all_to_all", grad)
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


class _ShardCheckpoint:
    """The extra state of a sharded layer's checkpoint: its (rank, world_size). A shard saved at another rank or
    world size is refused, naming ``gather_helper``, the collective that assembles the full table."""

    gather_helper: str

    def get_extra_state(self):
        return {"rank": self.rank, "world_size": self.world_size}

    def set_extra_state(self, state) -> None:
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"{type(self).__name__}: checkpoint shard is rank {state['rank']} of {state['world_size']}, this "
                f"module is rank {self.rank} of {self.world_size}; convert with memops.distributed."
                f"{self.gather_helper} (the full table) and load that into modules of the new world size"
            )


class ShardedProductKeyMemory(_ShardCheckpoint, ProductKeyMemory):
    """A ProductKeyMemory whose value table is split by columns over ``process_group``.

    Each rank holds ``values.weight`` of (n_keys**2, value_dim / world_size): columns
    [rank * w, (rank + 1) * w). Everything else (query network, sub-keys, gate and output projections) is
    replicated and must be identical on every rank (same seed, or synchronised by DDP). ``gather_output``
    (default) returns the full (..., output_dim); False returns this rank's (..., value_dim / world_size)
    columns of y for a following column-parallel layer (only without gate or output projection).

    The state dict holds the local shard plus its (rank, world_size); loading it at another world size raises
    and names :func:`gather_value_table`, which assembles the full table for a single-process checkpoint.
    """

    gather_helper = "gather_value_table"

    def __init__(
        self, input_dim: int, output_dim: int, *, process_group=None, gather_output: bool = True, **kwargs
    ) -> None:
        world, rank = _group_size_and_rank(process_group)
        value_dim = kwargs.get("value_dim") or output_dim
        if value_dim % world:
            raise ValueError(f"ShardedProductKeyMemory: world_size={world} must divide value_dim={value_dim}")
        if kwargs.get("shared_values") is not None:
            raise ValueError(
                "ShardedProductKeyMemory: pass shared_values another ShardedProductKeyMemory's table "
                "after construction (tables must be sharded alike)"
            )
        gated = kwargs.get("gated", False) or kwargs.get("output_gate", False)
        if not gather_output and (gated or value_dim != output_dim):
            raise ValueError("ShardedProductKeyMemory: gather_output=False needs no gate and no output projection")
        super().__init__(input_dim, output_dim, **kwargs)
        self.process_group, self.gather_output = process_group, gather_output
        self.world_size, self.rank = world, rank
        full = self.values.weight.detach()
        width = value_dim // world
        # Every rank draws the full table with the same seed and keeps its columns: sharded training starts
        # from exactly the single-process initialisation.
        self.values = nn.Embedding.from_pretrained(full[:, rank * width : (rank + 1) * width].clone(), freeze=False)

    def share_values_with(self, other: ShardedProductKeyMemory) -> None:
        """Read and train ``other``'s value table (Memory Layers at Scale shares one across layers). Both
        layers must shard it over the same process group and width."""
        if not isinstance(other, ShardedProductKeyMemory):
            raise TypeError("share_values_with: other must be a ShardedProductKeyMemory")
        if other.process_group is not self.process_group or other.world_size != self.world_size:
            raise ValueError(
                "share_values_with: the two layers use different process groups; a table sharded "
                "over one group cannot be read by ranks of another"
            )
        if other.values.weight.shape != self.values.weight.shape:
            raise ValueError(
                f"share_values_with: shard shapes differ: {tuple(other.values.weight.shape)} vs "
                f"{tuple(self.values.weight.shape)}"
            )
        self.values = other.values

    def quantize_(
        self, *, dtype: torch.dtype = torch.float8_e4m3fn, block_size: int | None = 128, scale_format: str = "e8m0"
    ) -> ShardedProductKeyMemory:
        """:meth:`ProductKeyMemory.quantize_` on this rank's columns. A block must not straddle two shards, so
        ``block_size`` must divide the shard width value_dim / world_size, or be at least that width (then one
        scale per shard row); :func:`gather_value_table` then assembles the full 8-bit table."""
        width = self.values.weight.shape[1]
        valid = isinstance(block_size, int) and not isinstance(block_size, bool) and block_size >= 1
        if valid and block_size < width and width % block_size:  # (other bad values: quantize_table's error)
            raise ValueError(
                f"ShardedProductKeyMemory.quantize_: block_size={block_size} must divide the shard width {width} "
                "(value_dim / world_size) or be at least it, so that no block straddles two ranks"
            )
        return super().quantize_(dtype=dtype, block_size=block_size, scale_format=scale_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the dropouts draw on each rank's own generator: seed ranks alike for identical replicas)
        flat = torch.nn.functional.dropout(
            x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), self.input_dropout, self.training
        )
        T = flat.shape[0]
        weights, indices = self.search(flat)
        # Each rank's read uses only its columns, so the weights' gradient is a partial sum over columns:
        # the all-reduce in _AllReduceGrad's backward completes it.
        weights = _AllReduceGrad.apply(weights, self.process_group)
        y = weighted_gather(
            self.table,
            indices.view(T, self.heads * self.topk),
            weights.view(T, self.heads * self.topk),
            check_indices=False,
            sparse=self.sparse,
        )
        if self.gather_output:
            y = _GatherColumns.apply(y, self.process_group)
        # (without gathering there is no gate or projection: output() only applies the value dropout)
        out = self.output(y, flat)
        return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.no_grad()
def gather_value_table(module: ShardedProductKeyMemory) -> torch.Tensor | QuantizedTable:
    """The full (n_keys**2, value_dim) value table on every rank, for a single-process checkpoint (a
    collective: call it on every rank); of a quantized layer, the full 8-bit :class:`memops.QuantizedTable`,
    whose blocks are the shards' (``quantize_`` keeps them inside a shard)."""
    table = module.table
    if not isinstance(table, QuantizedTable):
        return _all_gather_columns(table, module.process_group)
    data = _all_gather_columns(table.data, module.process_group)
    scales = _all_gather_columns(table.scales, module.process_group)
    return QuantizedTable(data, scales, min(table.block_size, table.shape[1]), table.dtype)


def _all_gather_columns(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's (R, w) columns side by side in rank order: (R, world * w) on every rank (a collective)."""
    wire = _on_the_wire(local)
    pieces = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, wire, group=group)
    return torch.cat(pieces, dim=1).view(local.dtype)


class ExpertParallelBlockMoE(BlockMoE):
    """A BlockMoE whose experts are split over ``process_group``: rank r owns experts
    [r * E / world_size, (r + 1) * E / world_size). Each rank routes its own tokens (the router is
    replicated), sends every (token, k) slot to the owner of its expert with ``all_to_all_single``, runs
    ``moe_ffn`` on the local experts and sends the results back, where they are combined with the weights.
    Autograd runs through both exchanges. ``w_gate_up`` / ``w_down`` hold the local experts only.

    :meth:`ranks_per_block` gives the mean number of ranks a block's slots visited in the last forward
    (computed when asked, from ``last_topk_ids``: no host sync in the forward beyond the split sizes).
    """

    def __init__(
        self, d_model: int, d_expert: int, n_experts: int, top_k: int, *, process_group=None, **kwargs
    ) -> None:
        world, rank = _group_size_and_rank(process_group)
        if n_experts % world:
            raise ValueError(f"ExpertParallelBlockMoE: world_size={world} must divide n_experts={n_experts}")
        super().__init__(d_model, d_expert, n_experts, top_k, **kwargs)
        self.process_group, self.world_size, self.rank = process_group, world, rank
        self.n_experts, self.local_experts = n_experts, n_experts // world
        local = slice(rank * self.local_experts, (rank + 1) * self.local_experts)
        # Same seed everywhere: the local experts are exactly the single-process module's experts.
        self.w_gate_up = nn.Parameter(self.w_gate_up.detach()[local].clone())
        self.w_down = nn.Parameter(self.w_down.detach()[local].clone())

    @torch.no_grad()
    def ranks_per_block(self) -> float:
        if self.last_topk_ids is None:
            raise RuntimeError("ExpertParallelBlockMoE.ranks_per_block: no forward has run yet")
        owners = (self.last_topk_ids // self.local_experts).to(torch.int32)
        return unique_experts(owners, self.block_size or 32).float().mean().item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        ids, weights = self.route(x)
        flat = x.reshape(B * N, d)
        slot_owner = (ids.long() // self.local_experts).reshape(-1)  # the rank owning each slot
        order = torch.sort(slot_owner, stable=True).indices  # slots grouped by owner rank
        send_counts = torch.bincount(slot_owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        _count("moe forward all_to_all", send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.process_group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        k = ids.shape[-1]
        send_rows = flat[order // k]
        send_experts = ids.reshape(-1)[order].long() - slot_owner[order] * self.local_experts
        recv_rows = _AllToAll.apply(send_rows, recv_splits, send_splits, self.process_group)
        recv_experts = send_experts.new_empty(sum(recv_splits))
        _count("moe forward all_to_all", send_experts)
        dist.all_to_all_single(
            recv_experts, send_experts.contiguous(), recv_splits, send_splits, group=self.process_group
        )
        # Each received slot through its local expert, unweighted (the weights are applied at home).
        if recv_rows.shape[0]:
            out = moe_ffn(
                recv_rows,
                self.w_gate_up,
                self.w_down,
                recv_experts[:, None],
                torch.ones(recv_rows.shape[0], 1, device=x.device),
                check_ids=False,
            )
        else:  # nothing to run here: keep the local experts in the graph, so their gradient is zero, not None
            out = recv_rows * 0 + 0 * (self.w_gate_up.sum() + self.w_down.sum())
        back = _AllToAll.apply(out, send_splits, recv_splits, self.process_group)
        per_slot = torch.empty_like(back).index_copy(0, order, back)  # back in slot order
        acc = torch.promote_types(x.dtype, torch.float32)
        y = (per_slot.view(B * N, k, d).to(acc) * weights.reshape(B * N, k, 1).to(acc)).sum(1).to(x.dtype)
        return self.add_shared_experts(y, flat).reshape(B, N, d)


class _SumShards(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial outputs; the backward passes the (replicated) gradient through
    unchanged, as Megatron's vocab-parallel embedding does: each rank's rows get their grad locally."""

    @staticmethod
    def forward(ctx, partial, group, label="engram forward all_reduce"):
        out = partial.contiguous().clone()
        _count(label, out)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _OwnedRowsRead(torch.autograd.Function):
    """A rank's read of the rows it owns, ``local[rows[i]]`` (zeros where rows[i] is -1, a row of another
    rank), for the row-sparse optimizers: the backward gives ``local`` a sparse_coo grad of the owned entries
    only, or (``fused``) hands them to its in-backward optimizer. Other ranks' entries touch no row: a zero
    gradient would still move an Adam row."""

    @staticmethod
    def forward(ctx, local, rows, fused):
        ctx.save_for_backward(rows)
        ctx.table = local if fused else None
        ctx.shape = local.shape
        owned = (rows >= 0).to(local.dtype).unsqueeze(1)
        clamped = rows.clamp_min(0).unsqueeze(1)
        return weighted_gather(local.detach(), clamped, owned, check_indices=False)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        if ctx.table is not None:
            update_in_backward(ctx.table, rows, grad.contiguous())
            return None, None, None
        owned = (rows >= 0).nonzero().squeeze(1)  # (one host sync: the sparse path is eager anyway)
        grad_local = torch.sparse_coo_tensor(
            rows[owned].unsqueeze(0), grad[owned], ctx.shape, dtype=grad.dtype, check_invariants=False
        )
        return grad_local, None, None


class ShardedEngram(_ShardCheckpoint, Engram):
    """An Engram whose hashed embedding table is split by rows over ``process_group`` (row parallelism).

    Rank r holds rows [r * ceil(rows / W), (r + 1) * ceil(rows / W)) of
    ``multi_head_embedding.embedding.weight`` (the last shard may be shorter). Every rank sees the same
    tokens (a tensor-parallel group: activations replicated) and hashes them all; each reads the rows it
    owns (zeros elsewhere, a weighted gather with 0/1 weights) and one all-reduce sums the partial
    embeddings. Per token that moves (N - 1) * e values (the embedding width, 1024 for the demo) and no ids;
    the backward needs no communication, since each rank's rows take their gradient from the replicated
    output gradient. Chosen over an all-to-all of ids and rows (which a data-parallel layout would need):
    no data-dependent split sizes, so no host sync and nothing that blocks CUDA graphs or compile, at the
    cost of hashing every token on every rank (N int64 loads per token and head, cheap beside the rows).

    All other parameters are replicated and must be identical on every rank (same seed, or DDP). The state
    dict holds the local shard and its (rank, world_size); :func:`gather_engram_table` assembles the full
    table for a single-process (official-layout) checkpoint.
    """

    gather_helper = "gather_engram_table"

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        world, rank = _group_size_and_rank(process_group)
        super().__init__(*args, **kwargs)
        self.process_group, self.world_size, self.rank = process_group, world, rank
        full = self.multi_head_embedding.embedding.weight.detach()
        self.total_rows = full.shape[0]
        per_rank = -(-self.total_rows // world)
        self.row_start = min(rank * per_rank, self.total_rows)
        row_end = min(self.row_start + per_rank, self.total_rows)
        # Every rank draws the full table with the same seed and keeps its rows: sharded training starts from
        # exactly the single-process initialisation.
        local = full[self.row_start : row_end].clone()
        self.multi_head_embedding.embedding = nn.Embedding.from_pretrained(local, freeze=False)

    def embed(self, input_ids: torch.Tensor, *, context: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids if context is None else torch.cat([context, input_ids], dim=1)
        width = 0 if context is None else context.shape[1]
        table = self.multi_head_embedding
        rows = ngram_hash(ids, self.multipliers, self.primes, pad_id=self.pad_id)[:, width:] + table.offsets
        local = table.table  # (the weight, or the 8-bit table of a quantized layer)
        shifted = rows.reshape(-1, 1) - self.row_start
        owned = (shifted >= 0) & (shifted < local.shape[0])
        fused = isinstance(local, torch.Tensor) and in_backward_optimizer(local) is not None
        if self.sparse or fused:  # row-sparse optimizers: the owned entries alone (see _OwnedRowsRead)
            partial = _OwnedRowsRead.apply(local, torch.where(owned, shifted, -1).reshape(-1), fused)
        else:
            partial = weighted_gather(
                local, shifted.clamp(0, max(local.shape[0] - 1, 0)), owned.to(local.dtype), check_indices=False
            )
        out = _SumShards.apply(partial, self.process_group)
        return out.reshape(*rows.shape[:2], rows.shape[2] * local.shape[1])


class ShardedValueEmbeddingBank(_ShardCheckpoint, ValueEmbeddingBank):
    """MoVE's value-embedding bank split by rows (token ids) over ``process_group`` (row parallelism, as
    :class:`ShardedEngram`).

    Rank r holds ids [r * ceil(V / W), (r + 1) * ceil(V / W)) of ``weight`` (the last shard may be shorter).
    Every rank sees the same tokens (a tensor-parallel group: activations replicated): each mixes the slots of
    the ids it owns (the other tokens' slot gates masked to 0), one all-reduce sums the partial mixes, and the
    gate of v is applied once. Per token that moves H * Dh values forward and, backward, the H * M slot-gate
    grads (each rank has them for its own tokens); the bank's rows take their grad locally. With ``sparse=True``
    or an optimizer in its backward (memops.optim) each rank's optimizer holds state for its own rows and steps
    on the ids it owns.

    The state dict holds the local shard and its (rank, world_size); :func:`gather_value_bank` assembles the
    full bank for a single-process checkpoint.
    """

    gather_helper = "gather_value_bank"

    def __init__(
        self, vocab_size: int, slots: int, n_heads: int, head_dim: int, *, process_group=None, sparse: bool = False,
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        world, rank = _group_size_and_rank(process_group)
        if vocab_size < world:
            raise ValueError(f"ShardedValueEmbeddingBank: vocab_size={vocab_size} is below world_size={world}")
        super().__init__(vocab_size, slots, n_heads, head_dim, sparse=sparse, device=device, dtype=dtype)
        self.process_group, self.world_size, self.rank = process_group, world, rank
        per_rank = -(-vocab_size // world)
        self.row_start = min(rank * per_rank, vocab_size)
        row_end = min(self.row_start + per_rank, vocab_size)
        # Every rank draws the full bank with the same seed and keeps its rows: sharded training starts from
        # exactly the single-process initialisation.
        self.weight = nn.Parameter(self.weight.detach()[self.row_start : row_end].clone())

    def forward(self, v: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, *, check_ids: bool = True):
        """v (B, N, H, Dh), gates (B, N, H, M + 1), ids (B, N) in [0, vocab_size) -> v' (B, N, H, Dh)."""
        bank = self.table  # (the weight, or the 8-bit table of a quantized bank)
        check_value_embedding_inputs(v, gates, ids, bank)
        if check_ids and can_read_values(ids):
            check_id_range(ids, self.vocab_size)
        local = ids - self.row_start
        owned = (local >= 0) & (local < bank.shape[0])
        slot_gates = _AllReduceGrad.apply(gates[..., 1:], self.process_group, "value bank backward all_reduce")
        local_gates = torch.cat([torch.zeros_like(gates[..., :1]), slot_gates * owned[..., None, None]], dim=-1)
        rows = local.clamp(0, bank.shape[0] - 1)
        fused = isinstance(bank, torch.Tensor) and in_backward_optimizer(bank) is not None
        if self.sparse or fused:  # the other ranks' ids touch no row (-1): a zero grad would still move Adam's
            partial = row_sparse_mix(v.new_zeros(v.shape), local_gates, rows, bank, fused,
                                     torch.where(owned, local, -1))  # fmt: skip
        else:
            partial = value_embedding_mix(v.new_zeros(v.shape), local_gates, rows, bank, check_ids=False)
        return gates[..., :1] * v + _SumShards.apply(partial, self.process_group, "value bank forward all_reduce")


def _on_the_wire(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous, e4m3 as its bytes (gloo has no float8 type)."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _all_gather_rows(local: torch.Tensor, per_rank: int, total: int, group) -> torch.Tensor:
    """Every rank's (<= per_rank, ...) rows stacked in rank order: (total, ...) on every rank (a collective)."""
    wire = _on_the_wire(local)
    padded = wire.new_zeros(per_rank, *wire.shape[1:])
    padded[: wire.shape[0]] = wire
    pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat(pieces)[:total].view(local.dtype)


def _gather_rows_of(table, per_rank: int, total: int, group):
    """A row-sharded table (a tensor or a QuantizedTable, whose rows quantize independently) made whole."""
    if isinstance(table, QuantizedTable):
        data, scales = (_all_gather_rows(t, per_rank, total, group) for t in (table.data, table.scales))
        return QuantizedTable(data, scales, table.block_size, table.dtype)
    return _all_gather_rows(table, per_rank, total, group)


@torch.no_grad()
def gather_value_bank(module: ShardedValueEmbeddingBank) -> torch.Tensor | QuantizedTable:
    """The full (V, M, H * Dh) bank on every rank (a collective: call it on every rank); of a quantized bank,
    the full 8-bit (V, M * H * Dh) :class:`memops.QuantizedTable` (each row's scales are its own, so the
    shards' rows stack as they are: it loads at any world size)."""
    per_rank = -(-module.vocab_size // module.world_size)
    return _gather_rows_of(module.table, per_rank, module.vocab_size, module.process_group)


@torch.no_grad()
def gather_engram_table(module: ShardedEngram) -> torch.Tensor | QuantizedTable:
    """The full (rows, d) hashed embedding table on every rank (a collective: call it on every rank); of a
    quantized layer, the full 8-bit :class:`memops.QuantizedTable` (rows quantize independently, so it loads at
    any world size)."""
    per_rank = -(-module.total_rows // module.world_size)
    return _gather_rows_of(module.multi_head_embedding.table, per_rank, module.total_rows, module.process_group)
