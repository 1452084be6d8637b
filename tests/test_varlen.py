"""memops.varlen: padded batches <-> FlashAttention's packed layout (cu_seqlens) <-> packed position_ids."""

import pytest
import torch

from memops import varlen


def _mask(lengths, seqlen, left=False):
    positions = torch.arange(seqlen)
    lengths = torch.tensor(lengths)[:, None]
    return positions >= seqlen - lengths if left else positions < lengths


@pytest.mark.parametrize("left", [False, True])
def test_unpad_then_pad_round_trips(left):
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 0, 1, 7, 3]  # an empty row, a full row
    x = torch.randn(5, 7, 2, 3, generator=generator, requires_grad=True)
    mask = _mask(lengths, 7, left)
    packed, indices, cu_seqlens, max_seqlen = varlen.unpad_input(x, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 5, 5, 6, 13, 16] and max_seqlen == 7
    assert packed.shape == (16, 2, 3) and indices.dtype == torch.int64
    for b, n in enumerate(lengths):  # each row's tokens, in order
        expected = x[b][mask[b]]
        assert torch.equal(packed[cu_seqlens[b] : cu_seqlens[b + 1]], expected) and expected.shape[0] == n
    back = varlen.pad_input(packed, indices, 5, 7)
    assert torch.equal(back, torch.where(mask[..., None, None], x, 0.0))
    weights = torch.randn(back.shape, generator=generator)
    (back * weights).sum().backward()  # differentiable: the grad reaches exactly the real tokens
    assert torch.equal(x.grad, torch.where(mask[..., None, None], weights, 0.0))


def test_integer_masks_and_holes():
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.int64)
    x = torch.arange(8.0).view(2, 4)
    packed, indices, cu_seqlens, max_seqlen = varlen.unpad_input(x, mask)
    assert packed.tolist() == [0.0, 2.0, 3.0] and cu_seqlens.tolist() == [0, 3, 3] and max_seqlen == 3


def test_position_ids_and_cu_seqlens_convert_both_ways():
    cu_seqlens = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)  # an empty sequence in the middle
    position_ids = varlen.position_ids_from_cu_seqlens(cu_seqlens)
    assert position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    back, max_seqlen = varlen.cu_seqlens_from_position_ids(position_ids[None])
    assert back.dtype == torch.int32 and back.tolist() == [0, 3, 4, 8] and max_seqlen == 4  # empty ones vanish
    # transformers' packing: positions restart at 0; a jump (not +1) also starts a sequence
    assert varlen.cu_seqlens_from_position_ids(torch.tensor([0, 1, 0, 1, 2, 7, 8]))[0].tolist() == [0, 2, 5, 7]
    assert varlen.cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.int64))[0].tolist() == [0]
    # the padded -> packed path and the position_ids path agree
    mask = _mask([3, 1, 4], 4)
    _, _, from_mask, _ = varlen.unpad_input(torch.zeros(3, 4), mask)
    assert varlen.position_ids_from_cu_seqlens(from_mask).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: varlen.unpad_input(torch.zeros(2, 3), torch.ones(2, 4)), TypeError, "bool or integer"),
        (lambda: varlen.unpad_input(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool)), ValueError, r"\(B, L\)"),
        (lambda: varlen.unpad_input([1], torch.ones(1, 1, dtype=torch.bool)), TypeError, "hidden_states"),
        (lambda: varlen.pad_input(torch.zeros(2, 3), torch.tensor([0, 9]), 2, 2), IndexError, r"\[0, 4\)"),
        (lambda: varlen.pad_input(torch.zeros(2, 3), torch.tensor([0]), 2, 2), ValueError, "total"),
        (lambda: varlen.pad_input(torch.zeros(1, 3), torch.tensor([0.0]), 2, 2), TypeError, "integer"),
        (lambda: varlen.pad_input(torch.zeros(1, 3), torch.tensor([0]), -1, 2), ValueError, "batch"),
        (lambda: varlen.position_ids_from_cu_seqlens(torch.tensor([1, 3])), ValueError, "start at 0"),
        (lambda: varlen.position_ids_from_cu_seqlens(torch.tensor([0, 3, 2])), ValueError, "not decrease"),
        (lambda: varlen.cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.int64)), ValueError, "total"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
