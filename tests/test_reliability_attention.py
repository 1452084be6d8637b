"""Issue 30, memory attention (fused, composed, reference), varlen and the test helpers: each bad or extreme
input the second fuzz run found silently wrong or unclear, on both backends (Triton under the interpreter on
CPU). Each test failed on the code before its fix; the finding's number is in the test's name."""

import math

import pytest
import torch

import memops
from memops.testing import count_launches

PATHS = [("reference", "auto"), ("triton", "fused"), ("triton", "composed")]


def attention_inputs(where: str = "", M: int = 3, N: int = 6, Nk: int = 6):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, N, 16, generator=g)
    k, v = (torch.randn(1, 2, Nk, 16, generator=g) for _ in range(2))
    mem_k, mem_v = (torch.randn(2, M, 16, generator=g) for _ in range(2))
    if where == "nan q":
        q[0, 0, 2, 1] = float("nan")
    elif where == "nan k":
        k[0, 0, 0, 1] = float("nan")  # the first key: every row sees it, causal or not
    elif where == "inf k":
        k[0, 0, 0, 1] = float("inf")  # +inf or -inf logits, by the sign of q[..., 1]
    elif where == "nan mem_k":
        mem_k[0, 1, 1] = float("nan")
    elif where == "inf mem_k":
        mem_k[0, 1, 1] = float("inf")
    elif where == "nan v":
        v[0, 0, 0, 1] = float("nan")
    return q, k, v, mem_k, mem_v


def oracle(q, k, v, mem_k, mem_v, *, causal, scale):
    """Softmax attention in float64 written out: logits, mask by masked_fill, softmax, weighted sum."""
    q, k, v, mem_k, mem_v = (t.double() for t in (q, k, v, mem_k, mem_v))
    keys = torch.cat([mem_k.unsqueeze(0), k], 2)
    values = torch.cat([mem_v.unsqueeze(0), v], 2)
    logits = scale * q @ keys.transpose(-1, -2)
    N, Nk, M = q.shape[2], k.shape[2], mem_k.shape[1]
    if causal:
        rows, cols = torch.arange(N)[:, None], torch.arange(Nk)[None, :]
        hidden = torch.cat([torch.zeros(N, M, dtype=torch.bool), cols > rows + Nk - N], 1)
        logits = logits.masked_fill(hidden, float("-inf"))
    return torch.softmax(logits, -1) @ values


@pytest.mark.parametrize("backend, impl", PATHS)
@pytest.mark.parametrize("scale", [0.0, -0.5, -3.0])
@pytest.mark.parametrize("M", [0, 3])
def test_01_02_causal_attention_at_a_non_positive_scale(backend, impl, scale, M):
    q, k, v, mem_k, mem_v = attention_inputs(M=M)
    with memops.backend(backend):
        # without the lse too: the reference's square causal shortcut (SDPA's is_causal) serves that call
        out = memops.memory_attention(q, k, v, mem_k, mem_v, causal=True, scale=scale, impl=impl)
        _, lse = memops.memory_attention(q, k, v, mem_k, mem_v, causal=True, scale=scale, return_lse=True,
                                         impl=impl)  # fmt: skip
    expected = oracle(q, k, v, mem_k, mem_v, causal=True, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "where, M",
    [(where, M) for where in ("nan q", "nan k", "inf k", "nan mem_k", "inf mem_k", "nan v") for M in (0, 3)
     if M or "mem_k" not in where],
)  # fmt: skip
def test_03_paths_agree_on_nan_and_inf(where, causal, M):
    # The rows with a NaN output and the rows with a non-finite lse are the same on the three paths (the
    # composed path's lse for an infinite logit is the vendor op's: NaN on torch's CPU flash op, +inf on the
    # fused kernel; its output is NaN on every path). Nk = 8 > N: every causal row sees several keys (the
    # rows with one key or none are the next test's).
    results = {}
    for backend, impl in PATHS:
        with memops.backend(backend):
            out, lse = memops.memory_attention(*attention_inputs(where, M=M, Nk=8), causal=causal,
                                               return_lse=True, impl=impl)  # fmt: skip
        results[impl] = (out.isnan().any(-1), ~torch.isfinite(lse))
    nan_rows, bad_lse = results["auto"]
    assert nan_rows.any(), "the poison reached no row: the test would prove nothing"
    for impl in ("fused", "composed"):
        assert torch.equal(results[impl][0], nan_rows), (impl, results[impl][0], nan_rows)
        assert torch.equal(results[impl][1], bad_lse), (impl, results[impl][1], bad_lse)


@pytest.mark.parametrize("poisoned", ["k", "q"])
def test_03_a_row_with_one_nan_key_is_nan_and_a_row_with_no_key_is_zero(poisoned):
    # Causal, N = 3 > Nk = 2, no memory: row 0 sees no key, row 1 only key 0, row 2 keys 0 and 1. torch's
    # SDPA gave 0 for row 1 with a NaN in key 0 (CPU flash op), and NaN for row 0 with a NaN query (every
    # row, of every head, over zero keys); the spec and the kernels give NaN and 0. The packed ops likewise.
    q, k, v, _, _ = attention_inputs(M=0, N=3, Nk=2)
    if poisoned == "k":
        k[0, 0, 0, 3] = math.nan
        expected = torch.tensor([[False, True, True], [False, False, False]])
    else:
        q[0, 0, :, 3] = math.nan
        expected = torch.tensor([[False, True, True], [False, False, False]])
    zero_key = k[:, :, :0]
    for backend, impl in PATHS:
        with memops.backend(backend):
            out = memops.memory_attention(q, k, v, causal=True, impl=impl)[0]
            keyless = memops.memory_attention(q, zero_key, zero_key, impl="auto" if impl == "composed" else impl)
            cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
            rows = (t[0].transpose(0, 1) for t in (q, k, v))
            packed = memops.memory_attention_varlen(*rows, cu_q, cu_k, 3, 2, causal=True).transpose(0, 1)
        for result in (out, packed):
            assert torch.equal(result.isnan().any(-1), expected), (backend, impl, result)
            assert (result[:, 0] == 0).all(), (backend, impl, "row 0 sees no key")
        assert (keyless == 0).all(), (backend, impl, "no key at all")


@pytest.mark.parametrize("backend, impl", PATHS)
def test_08_lse_at_an_infinite_scale_is_inf_in_causal_rows(backend, impl):
    q, k, v, mem_k, mem_v = attention_inputs(M=0)
    q = q.abs()
    k = k.abs()  # every logit +inf
    with memops.backend(backend):
        _, lse = memops.memory_attention(q, k, v, causal=True, scale=math.inf, return_lse=True, impl=impl)
    assert torch.isposinf(lse).all(), lse


@pytest.mark.parametrize("op", ["memory_attention", "retention_attention"])
def test_15_reference_traces_on_meta_tensors(op):
    q, k, v, _, _ = attention_inputs()
    q, k, v = (t.to("meta") for t in (q, k, v))
    with memops.backend("reference"):
        if op == "memory_attention":
            out = memops.memory_attention(q, k, v, causal=True)
        else:
            out = memops.retention_attention(q, k, v, torch.empty(1, 2, 6, device="meta"))
    assert out.shape == q.shape and out.device.type == "meta"


def test_14_pad_input_refuses_duplicate_indices():
    with pytest.raises(ValueError, match="indices must be distinct"):
        memops.varlen.pad_input(torch.randn(3, 2), torch.tensor([0, 0, 1]), 1, 4)


def test_21_count_launches_nests():
    values = torch.randn(8, 16)
    indices = torch.randint(0, 8, (3, 2))
    with memops.backend("triton"), count_launches() as outer:
        with count_launches() as inner:  # equal counters at the inner exit: removal must be by identity
            memops.weighted_gather(values, indices, torch.rand(3, 2))
        memops.weighted_gather(values, indices, torch.rand(3, 2))
    assert outer["weighted_gather_fwd_kernel"] == 2 and inner["weighted_gather_fwd_kernel"] == 1


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_20_looped_varlen_errors_name_its_own_arguments(backend):
    total, H, D = 5, 2, 16
    q, k_new, v_new = (torch.randn(total, H, D) for _ in range(3))
    gate = torch.rand(total, H, 1)
    with memops.backend(backend):
        with pytest.raises(ValueError, match="cu_seqlens") as error:
            memops.looped_attention_varlen(q, k_new, v_new, gate, torch.tensor([0, 2, 9], dtype=torch.int32), 7)
    assert "cu_seqlens_q" not in str(error.value) and "cu_seqlens_k" not in str(error.value)
    with memops.backend(backend):
        with pytest.raises(ValueError, match="max_seqlen") as error:
            memops.looped_attention_varlen(q, k_new, v_new, gate, torch.tensor([0, 2, 5], dtype=torch.int32), 1)
    assert "max_seqlen_q" not in str(error.value)


def test_22_reference_in_place_update_into_an_expanded_cache():
    cache = torch.randn(1, 2, 1, 8).expand(1, 2, 4, 8)
    with memops.backend("reference"):
        with pytest.raises(ValueError, match="k_cache"):
            memops.looped_kv_update(cache, cache.clone(), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8),
                                    torch.rand(1, 2, 1, 1), rows=slice(-1, None), inplace=True)  # fmt: skip


def packed_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    cu_q = torch.tensor([0, 4, 4, 9], dtype=torch.int32)  # an empty sequence in the middle
    cu_k = torch.tensor([0, 6, 7, 12], dtype=torch.int32)
    q = torch.randn(9, 4, 16, generator=g, dtype=dtype)
    k, v = (torch.randn(12, 2, 16, generator=g, dtype=dtype) for _ in range(2))
    log_beta = -torch.rand(12, 2, generator=g, dtype=dtype)
    mem = torch.randn(3, 2, 3, 16, generator=g, dtype=dtype)  # per sequence
    return q, k, v, log_beta, mem, cu_q, cu_k


def packed_calls(q, k, v, log_beta, mem, cu_q, cu_k):
    return {
        "memory_attention_varlen": lambda: memops.memory_attention_varlen(
            q, k, v, cu_q, cu_k, 5, 6, mem, mem, causal=True, return_lse=True),
        "retention_attention_varlen": lambda: memops.retention_attention_varlen(
            q, k, v, log_beta, cu_q, cu_k, 5, 6, return_lse=True),
        "looped_attention_varlen": lambda: memops.looped_attention_varlen(
            q, k[:9], v[:9], torch.sigmoid(log_beta[:9, :, None]), cu_q, 5, k[:9], v[:9]),
    }  # fmt: skip


@pytest.mark.parametrize("op", ["memory_attention_varlen", "retention_attention_varlen", "looped_attention_varlen"])
def test_15_reference_varlen_ops_trace_on_meta_tensors(op):
    inputs = [t.to("meta") for t in packed_inputs()]
    with memops.backend("reference"):
        result = packed_calls(*inputs)[op]()
    assert all(t.device.type == "meta" for t in result) and result[0].shape == (9, 4, 16)


@pytest.mark.parametrize("op", ["memory_attention_varlen", "retention_attention_varlen", "looped_attention_varlen"])
def test_19_reference_varlen_ops_compile_fullgraph_and_agree_with_eager(op):
    inputs = packed_inputs(torch.float64)
    with memops.backend("reference"):
        eager = packed_calls(*inputs)[op]()
        compiled = torch.compile(lambda *t: packed_calls(*t)[op](), fullgraph=True, backend="aot_eager")(*inputs)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("module", ["MemoryAttention", "RetentionAttention"])
def test_20_packed_modules_name_their_own_cu_seqlens(module):
    x = torch.randn(7, 32)
    if module == "MemoryAttention":
        layer, extra = memops.nn.MemoryAttention(32, 4, causal=True), ()
    else:
        layer, extra = memops.nn.RetentionAttention(32, 4), (-torch.rand(4, 7),)
    with pytest.raises(ValueError, match=f"{module}: cu_seqlens must start at 0") as error:
        layer(x, *extra, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32), max_seqlen=6)
    assert "cu_seqlens_q" not in str(error.value)
    with pytest.raises(ValueError, match=f"{module}: max_seqlen=2 is smaller"):
        layer(x, *extra, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=2)
