"""8-bit memory tables: quantize_table / dequantize_table round trips within each format's bound, and the
table-reading ops on a QuantizedTable equal the same op on its dequantized table (both backends, the kernels
through the interpreter), with the weights' grad; opcheck, compile, bad input."""

import contextlib
import copy
import io

import pytest
import torch

import memops
from memops.reference.quantized import expand_scales
from memops.testing import check_compiled_grads, count_launches

BACKENDS = ["reference", "triton"]
FORMATS = [(torch.float8_e4m3fn, "e8m0"), (torch.float8_e4m3fn, "fp32"), (torch.int8, "e8m0"), (torch.int8, "fp32")]
FORMAT_IDS = ["e4m3-e8m0", "e4m3-fp32", "int8-e8m0", "int8-fp32"]
BLOCKS = [None, 32, 128]


def table(rows=40, D=300, seed=0, dtype=torch.float32):
    """Rows spanning five decades of magnitude, a zero row and a zero block."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, D, generator=generator) * torch.logspace(-3, 2, rows)[:, None]
    t[3] = 0
    t[5, :64] = 0
    return t.to(dtype)


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("dtype, scale_format", FORMATS, ids=FORMAT_IDS)
def test_round_trip_within_the_bound(dtype, scale_format, block_size):
    t = table()
    qt = memops.quantize_table(t, dtype=dtype, block_size=block_size, scale_format=scale_format)
    block = block_size or t.shape[1]
    assert qt.data.dtype == dtype and qt.scales.shape == (40, -(-300 // block)) and qt.dtype == torch.float32
    assert qt.scales.dtype == (torch.uint8 if scale_format == "e8m0" else torch.float32)
    scale = expand_scales(qt.scales, qt.block_size, 300)
    error = (memops.dequantize_table(qt) - t).abs()
    if dtype == torch.int8:
        assert (error <= scale / 2 * (1 + 1e-6)).all()
    else:  # e4m3: 2^-4 relative in its normal range, 2^-10 of the scale (half its subnormal step) below it
        assert (error <= t.abs() * 2**-4 + scale * 2**-10).all()
    # the scale is the smallest of its format at which nothing saturates: the block maximum reaches the top
    # binade (e8m0: above half the largest value; fp32: the largest value itself)
    top = qt.data.float().abs().amax(dim=1)
    limit = 448.0 if dtype == torch.float8_e4m3fn else 127.0
    nonzero = t.abs().amax(dim=1) > 0
    assert (top[nonzero] <= limit).all() and (top[nonzero] > limit / 2 - 1).all()
    assert torch.equal(qt.data[3].float(), torch.zeros(300)) and (scale[3] == 1).all()  # a zero row: scale 1


# every format and blocking on both backends
GATHER_RUNS = [(*f, b, backend) for backend in ("triton", "reference") for f in FORMATS for b in BLOCKS]


GATHER_IDS = [f"{FORMAT_IDS[FORMATS.index((d, s))]}-{b}-{be}" for d, s, b, be in GATHER_RUNS]


@pytest.mark.parametrize("dtype, scale_format, block_size, backend", GATHER_RUNS, ids=GATHER_IDS)
def test_weighted_gather_equals_the_dequantized_table(dtype, scale_format, block_size, backend, poison_empty):
    t = table()
    qt = memops.quantize_table(t, dtype=dtype, block_size=block_size, scale_format=scale_format)
    generator = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 40, (2, 3, 5), generator=generator)
    weights = torch.randn(2, 3, 5, generator=generator)
    ours, theirs = weights.clone().requires_grad_(), weights.double().requires_grad_()
    expected = memops.reference.weighted_gather(memops.dequantize_table(qt).double(), indices.view(6, 5),
                                                theirs.view(6, 5)).view(2, 3, 300)  # fmt: skip
    with memops.backend(backend), count_launches() as launches:
        out = memops.weighted_gather(qt, indices, ours)
        out.backward(torch.ones_like(out))
    expected.backward(torch.ones_like(expected))
    assert (launches["weighted_gather_fwd_kernel"] == 1) == (backend == "triton")
    assert out.dtype == torch.float32 and out.shape == (2, 3, 300)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-4)


def test_out_dtype_and_bf16_tables():
    qt = memops.quantize_table(table(dtype=torch.bfloat16), block_size=64)
    assert qt.dtype == torch.bfloat16
    indices, weights = torch.randint(0, 40, (4, 3)), torch.rand(4, 3)
    with memops.backend("triton"):
        assert memops.weighted_gather(qt, indices, weights).dtype == torch.bfloat16
        out = memops.weighted_gather(qt, indices, weights, out_dtype=torch.float32)
    torch.testing.assert_close(out, memops.weighted_gather(qt.dequantize(), indices, weights), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trips_and_to():
    qt = memops.quantize_table(table(), dtype=torch.int8, block_size=32, scale_format="fp32")
    buffer = io.BytesIO()
    torch.save(qt.state_dict(), buffer)
    loaded = memops.QuantizedTable.from_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(loaded.dequantize(), qt.dequantize()) and loaded.block_size == 32
    assert loaded.to("cpu").device.type == "cpu" and "int8, fp32 scales per 32 columns" in repr(loaded)
    assert qt.nbytes() == 40 * 300 + 40 * 10 * 4


def test_opcheck_and_compile(device):
    qt = memops.quantize_table(table(D=64), block_size=32).to(device)
    indices = torch.randint(0, 40, (6, 4), device=device)
    weights = torch.rand(6, 4, device=device, requires_grad=True)
    op = torch.ops.memops.weighted_gather_quantized.default
    int8 = memops.quantize_table(table(D=64), dtype=torch.int8, block_size=32, scale_format="fp32").to(device)
    torch.library.opcheck(op, (int8.data, int8.scales, indices, weights, 32, torch.float32))
    # (opcheck's schema test multiplies every input, which PyTorch does not implement for float8 on CPU)
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (qt.data, qt.scales, indices, weights, 32, torch.float32), test_utils=checks)

    def loss(weights):
        return memops.weighted_gather(qt, indices, weights, check_indices=False).sin().sum()

    for backend in BACKENDS:
        check_compiled_grads(loss, [weights], backend=backend, device=device, kernel="weighted_gather_fwd_kernel")


def test_bad_input():
    t = table(D=64)
    with pytest.raises(TypeError, match="dtype must be torch.float8_e4m3fn or torch.int8"):
        memops.quantize_table(t, dtype=torch.float16)
    with pytest.raises(ValueError, match="scale_format must be 'e8m0' or 'fp32'"):
        memops.quantize_table(t, scale_format="e4m3")
    with pytest.raises(ValueError, match="block_size must be an int >= 1 or None"):
        memops.quantize_table(t, block_size=0)
    with pytest.raises(TypeError, match="table must be a floating-point"):
        memops.quantize_table(t.long())
    with pytest.raises(ValueError, match="NaN or infinite"):
        memops.quantize_table(torch.full((2, 4), float("inf")))
    qt = memops.quantize_table(t)
    with pytest.raises(TypeError, match="the table is quantized"):
        memops.weighted_gather(qt, torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3), sparse=True)
    with pytest.raises(TypeError, match="quantized tables are for inference"):
        qt.requires_grad_()
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 40\)"):
        memops.weighted_gather(qt, torch.full((2, 3), 40), torch.rand(2, 3))
    with pytest.raises(TypeError, match="out_dtype must be a floating-point"):
        memops.weighted_gather(qt, torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3), out_dtype=torch.int8)
    with pytest.raises(TypeError, match="dequantize_table: qt must be a memops.QuantizedTable"):
        memops.dequantize_table(t)
    # a bare 8-bit tensor (its scales left behind) is refused where a float table is read as it is
    indices, weights = torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3)
    for data in (qt.data, memops.quantize_table(t, dtype=torch.int8).data):
        with pytest.raises(TypeError, match=f"values is a bare {data.dtype} tensor"):
            memops.weighted_gather(data, indices, weights)
    multipliers, primes, offsets, engram_table = engram_case()
    with pytest.raises(TypeError, match="table is a bare torch.float8_e4m3fn tensor"):
        memops.engram_lookup(torch.zeros(2, 3, dtype=torch.long), memops.quantize_table(engram_table).data,
                             multipliers, primes, offsets, pad_id=1)  # fmt: skip
    v, gates, ids, bank = bank_case(M=1, H=1, Dh=64)
    with pytest.raises(TypeError, match="bank is a bare torch.int8 tensor"):
        memops.value_embedding_mix(
            v, gates, ids, memops.quantize_table(bank.flatten(1), dtype=torch.int8).data.view(bank.shape)
        )


@pytest.mark.parametrize("dtype, scale_format", [FORMATS[0], FORMATS[3]], ids=[FORMAT_IDS[0], FORMAT_IDS[3]])
def test_product_key_memory_quantizes_in_place_and_checkpoints(dtype, scale_format):
    """quantize_() gives the output of the same layer on the dequantized table (Triton path); its state_dict
    loads into another layer quantized alike; the query network still trains."""
    torch.manual_seed(0)
    layer = memops.nn.ProductKeyMemory(16, 16, n_keys=8, heads=2, topk=4, key_dim=16)
    x = torch.randn(2, 5, 16)
    assert layer.quantize_(dtype=dtype, block_size=32, scale_format=scale_format) is layer
    dequantized = copy.deepcopy(layer)
    dequantized.values = torch.nn.Embedding.from_pretrained(layer.values.table.dequantize())
    with memops.backend("triton"):
        with count_launches() as launches:
            out = layer(x)
        out.square().sum().backward()
    assert launches["weighted_gather_fwd_kernel"] == 1 and layer.query_proj.weight.grad is not None
    torch.testing.assert_close(out, dequantized(x), rtol=1e-5, atol=1e-6)
    assert set(layer.values.state_dict()) == {"data", "scales", "_extra_state"}
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    torch.manual_seed(1)
    other = memops.nn.ProductKeyMemory(16, 16, n_keys=8, heads=2, topk=4, key_dim=16).quantize_(
        dtype=dtype, block_size=32, scale_format=scale_format
    )
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    torch.testing.assert_close(other(x), out.detach())
    with pytest.raises(TypeError, match="quantized"):
        _ = layer.values.weight


def test_e4m3_bytes_decode_before_sm89():
    """Before sm_89 (no e4m3 type) the kernels read e4m3 data as bytes and decode the bits: every finite e4m3
    value (the 254 non-NaN codes) comes out as PyTorch's float8 cast gives it; launch configs pinned to sm_80."""
    from memops.kernels._launch import configs_for_arch

    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    data = codes.view(torch.float8_e4m3fn).view(-1, 1)
    qt = memops.QuantizedTable(data, torch.full((data.shape[0], 1), 127, dtype=torch.uint8), 1, torch.float32)
    indices = torch.arange(data.shape[0]).view(-1, 1)
    with memops.backend("triton"), configs_for_arch(80):
        out = memops.weighted_gather(qt, indices, torch.ones(data.shape[0], 1))
    assert torch.equal(out, data.float())


def engram_case():
    from memops.reference.engram import engram_hash_params, table_offsets

    multipliers, primes = engram_hash_params((5,), (23, 30), max_ngram_size=3, n_head_per_ngram=4, seed=0,
                                             tokenizer_vocab_size=300)[5]  # fmt: skip
    rows = int(primes.sum())
    return multipliers, primes, table_offsets(primes), table(rows=rows, D=160)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, scale_format", FORMATS, ids=FORMAT_IDS)
def test_engram_lookup_equals_the_dequantized_table(dtype, scale_format, backend, poison_empty):
    multipliers, primes, offsets, t = engram_case()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    for block_size in BLOCKS:  # (160 columns: blocks of 128 leave a short last one)
        qt = memops.quantize_table(t, dtype=dtype, block_size=block_size, scale_format=scale_format)
        expected = memops.engram_lookup(ids, qt.dequantize(), multipliers, primes, offsets, pad_id=1, context=1)
        with memops.backend(backend), count_launches() as launches:
            out = memops.engram_lookup(ids, qt, multipliers, primes, offsets, pad_id=1, context=1)
        assert (launches["engram_lookup_fwd_kernel"] == 1) == (backend == "triton")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a copy of dequantized rows: exact
    if backend == "triton" and dtype == torch.int8:  # (opcheck multiplies inputs: no float8 on CPU)
        torch.library.opcheck(torch.ops.memops.engram_lookup_quantized.default,
                              (ids, qt.data, qt.scales, multipliers, primes, offsets, 1, 1, qt.block_size,
                               torch.float32))  # fmt: skip
    if backend == "triton":  # torch.compile(fullgraph=True) traces the 8-bit lookup (aot_eager on CPU)
        compiled = torch.compile(lambda ids: memops.engram_lookup(ids, qt, multipliers, primes, offsets, pad_id=1),
                                 fullgraph=True, backend="aot_eager")  # fmt: skip
        with memops.backend(backend), count_launches() as launches:
            out = compiled(ids)
        assert launches["engram_lookup_fwd_kernel"] == 1
        torch.testing.assert_close(out, memops.engram_lookup(ids, qt.dequantize(), multipliers, primes, offsets,
                                                             pad_id=1), rtol=0, atol=0)  # fmt: skip
    with pytest.raises(TypeError, match="the table is quantized"):
        memops.engram_lookup(ids, qt, multipliers, primes, offsets, pad_id=1, sparse=True)
    with pytest.raises(TypeError, match="out_dtype is for a QuantizedTable"):
        memops.engram_lookup(ids, t, multipliers, primes, offsets, pad_id=1, out_dtype=torch.float16)


def test_engram_layer_quantizes_in_place_and_checkpoints():
    from engram_demo import ENGRAM

    torch.manual_seed(0)
    layer = memops.nn.Engram(**ENGRAM)
    hidden, ids = torch.randn(2, 7, 2, 32), torch.randint(0, 90, (2, 7))
    dequantized = copy.deepcopy(layer)
    assert layer.quantize_() is layer
    dequantized.multi_head_embedding.embedding.weight.data = layer.multi_head_embedding.table.dequantize()
    with memops.backend("triton"), count_launches() as launches:
        out = layer(hidden, ids)
    assert launches["engram_lookup_fwd_kernel"] == 1
    torch.testing.assert_close(out, dequantized(hidden, ids), rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    other = memops.nn.Engram(**ENGRAM).quantize_()
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(hidden, ids), out)


# --- the value-embedding bank (MoVE) -----------------------------------------------------------------------------


def bank_case(M=3, H=2, Dh=128, V=13, seed=3):
    """v, gates (fp32), ids (repeated within and across rows) and a float bank (V, M, H * Dh)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(2, 5, H, Dh, generator=generator)
    gates = 2 * torch.rand(2, 5, H, M + 1, generator=generator)
    ids = torch.randint(0, V, (2, 5), generator=generator)
    ids[0, 1] = ids[0, 3] = ids[1, 2]
    bank = table(rows=V, D=M * H * Dh, seed=seed).view(V, M, H * Dh)
    return v, gates, ids, bank


BANK_RUNS = GATHER_RUNS + [(torch.float8_e4m3fn, "e8m0", 32, "triton-sm80")]


@pytest.mark.parametrize("dtype, scale_format, block_size, backend", BANK_RUNS, ids=GATHER_IDS + ["e4m3-e8m0-32-sm80"])
def test_value_embedding_mix_equals_the_dequantized_bank(dtype, scale_format, block_size, backend, poison_empty):
    """v' and the grads of v and the gates on the 8-bit bank equal the float64 op on its dequantized bank; the
    bank is read in 8 bits by the forward kernel and by the gates' grad (sm80: e4m3 decoded from its bytes)."""
    from memops.kernels._launch import configs_for_arch

    v, gates, ids, bank = bank_case()
    qt = memops.quantize_table(bank.flatten(1), dtype=dtype, block_size=block_size, scale_format=scale_format)
    leaves = [v.clone().requires_grad_(), gates.clone().requires_grad_()]
    reference = [v.double().requires_grad_(), gates.double().requires_grad_()]
    expected = memops.reference.value_embedding_mix(*reference, ids, qt.dequantize(torch.float64).view(bank.shape))
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    expected.backward(grad_out.double())
    arch = configs_for_arch(80) if backend.endswith("sm80") else contextlib.nullcontext()
    with memops.backend(backend.removesuffix("-sm80")), count_launches() as launches, arch:
        out = memops.value_embedding_mix(*leaves, ids, qt)
        out.backward(grad_out)
    triton = backend != "reference"
    assert (launches["value_embedding_mix_fwd_kernel"] == 1) == triton
    assert (launches["weighted_gather_bwd_kernel"] == 1) == triton  # the slot gates' grad reads the 8-bit bank
    assert out.dtype == torch.float32 and out.shape == v.shape
    for ours, theirs in zip((out, *(t.grad for t in leaves)), (expected, *(t.grad for t in reference))):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_value_embedding_bank_quantizes_in_place_and_checkpoints():
    """ValueEmbeddingBank.quantize_() gives the bank's output on its dequantized weight (Triton path), its
    state_dict loads into another bank quantized alike, and the gates still get their grad."""
    v, gates, ids, _ = bank_case()
    torch.manual_seed(0)
    bank = memops.nn.ValueEmbeddingBank(13, 3, 2, 128)
    float_bank = copy.deepcopy(bank)
    assert bank.quantize_(dtype=torch.int8, block_size=64, scale_format="fp32") is bank
    float_bank.weight.data = bank.table.dequantize().view(13, 3, 256)
    leaf = gates.clone().requires_grad_()
    with memops.backend("triton"), count_launches() as launches:
        out = bank(v, leaf, ids)
        out.square().sum().backward()
    assert launches["value_embedding_mix_fwd_kernel"] == 1 and leaf.grad is not None
    torch.testing.assert_close(out, float_bank(v, gates, ids), rtol=1e-5, atol=1e-6)
    assert set(bank.state_dict()) == {"weight.data", "weight.scales", "weight._extra_state"}
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    torch.manual_seed(1)
    other = memops.nn.ValueEmbeddingBank(13, 3, 2, 128).quantize_(dtype=torch.int8, block_size=64, scale_format="fp32")
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    torch.testing.assert_close(other(v, gates, ids), out.detach())
    e8m0 = memops.nn.ValueEmbeddingBank(13, 3, 2, 128).quantize_(dtype=torch.int8, block_size=64)
    with pytest.raises(RuntimeError, match="the checkpoint holds torch.float32, this layer torch.uint8"):
        e8m0.load_state_dict(bank.state_dict())  # (a buffer's copy would turn fp32 scales into wrong bytes)
    with pytest.raises(ValueError, match="already quantized"):
        bank.quantize_()
    with pytest.raises(ValueError, match="block_size=48 must divide head_dim=128"):
        memops.nn.ValueEmbeddingBank(13, 3, 2, 128).quantize_(block_size=48)
    with pytest.raises(ValueError, match="a sparse=True bank trains"):
        memops.nn.ValueEmbeddingBank(13, 3, 2, 128, sparse=True).quantize_()


def test_value_embedding_opcheck_compile_and_bad_input(device):
    v, gates, ids, bank = (t.to(device) for t in bank_case(M=2, H=2, Dh=64))
    op = torch.ops.memops.value_embedding_mix_quantized.default
    int8 = memops.quantize_table(bank.flatten(1), dtype=torch.int8, block_size=32, scale_format="fp32")
    gates = gates.requires_grad_()
    torch.library.opcheck(op, (v, gates, ids, int8.data, int8.scales, 32))
    qt = memops.quantize_table(bank.flatten(1), block_size=None)  # e4m3, one e8m0 scale per row
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (v, gates, ids, qt.data, qt.scales, qt.block_size), test_utils=checks)

    def loss(gates):
        return memops.value_embedding_mix(v, gates, ids, qt, check_ids=False).sin().sum()

    for backend in BACKENDS:
        check_compiled_grads(loss, [gates], backend=backend, device=device, kernel="value_embedding_mix_fwd_kernel")
    with pytest.raises(ValueError, match=r"block_size \(32\) must divide the head dim Dh = 16"):
        memops.value_embedding_mix(v.view(2, 5, 8, 16), gates.new_ones(2, 5, 8, 3), ids, int8)
    with pytest.raises(ValueError, match=r"a quantized bank must be \(V, M \* H \* Dh\)"):
        memops.value_embedding_mix(v, gates[..., :2], ids, int8)
    with pytest.raises(TypeError, match="the table is quantized"):
        memops.value_embedding_mix(v, gates, ids, qt, sparse=True)
    with pytest.raises(IndexError, match=r"ids must lie in \[0, 13\)"):
        memops.value_embedding_mix(v, gates, torch.full_like(ids, 13), qt)


@pytest.mark.cuda
def test_8bit_reads_on_the_gpu():
    """On the GPU's own e4m3 / int8 loads (sm_89+; sm_80 decodes e4m3 bytes): the gather (with the weights'
    grad), the Engram lookup and the MoVE mix (with the gates' grad) on bf16 tables quantized to e4m3 with e8m0
    scales and to int8 with fp32 scales equal the same ops on the dequantized tables."""
    device = "cuda"
    generator = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(4096, 1024, device=device, generator=generator).bfloat16()
    indices = torch.randint(0, 4096, (512, 32), device=device, generator=generator)
    weights = torch.rand(512, 32, device=device, generator=generator).softmax(-1)
    multipliers, primes, offsets, engram_table = (t.to(device) for t in engram_case())
    ids = torch.randint(0, 300, (4, 64), device=device, generator=generator)
    v, gates, token_ids, bank = (t.to(device) for t in bank_case(M=8, H=10, Dh=128, V=97))
    for dtype, scale_format in (FORMATS[0], FORMATS[3]):
        quantize = dict(dtype=dtype, block_size=128, scale_format=scale_format)
        qt = memops.quantize_table(values, **quantize)
        ours, theirs = weights.clone().requires_grad_(), weights.clone().requires_grad_()
        out = memops.weighted_gather(qt, indices, ours, out_dtype=torch.float32)
        expected = memops.weighted_gather(qt.dequantize(), indices, theirs)
        out.sum().backward()
        expected.sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-4)
        qt = memops.quantize_table(engram_table, dtype=dtype, block_size=16, scale_format=scale_format)
        torch.testing.assert_close(
            memops.engram_lookup(ids, qt, multipliers, primes, offsets, pad_id=1),
            memops.engram_lookup(ids, qt.dequantize(), multipliers, primes, offsets, pad_id=1), rtol=0, atol=0
        )  # fmt: skip
        qt = memops.quantize_table(bank.flatten(1), **quantize)
        ours, theirs = gates.clone().requires_grad_(), gates.clone().requires_grad_()
        out = memops.value_embedding_mix(v, ours, token_ids, qt)
        expected = memops.value_embedding_mix(v, theirs, token_ids, qt.dequantize().view(bank.shape))
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-4)
