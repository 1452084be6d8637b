"""The composed memory attention's CUDA branch, without a GPU.

Fake CUDA tensors (FakeTensorMode) run the vendor aten ops' meta kernels on this torch, and the Triton
launches are recorded instead of run (memops.tools.gpu_check.recording), so the exact aten ops and argument lists
that a GPU gets are traced, forward and backward, with the shapes and dtypes they return. The numerics of the
same composition run on CPU tensors in test_memory_attention.py (the CPU flash op)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import memops
from memops import attention
from memops._backend import configs_for_arch
from memops.testing import count_launches
from memops.tools.gpu_check import recording


class OpLog(TorchDispatchMode):
    """The aten ops dispatched inside the block, by name ("_scaled_dot_product_flash_attention", ...)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


VENDOR_OPS = {
    "cudnn": ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"),
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"),
    "efficient": ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"),
}

CASES = {
    #                        backend      dtype           B  H  Hkv N    Nk   M   D    causal memory      bias
    "cudnn_gqa_folded": ("cudnn", torch.bfloat16, 2, 8, 2, 96, 96, 16, 128, False, "shared", True),
    "cudnn_causal_square": ("cudnn", torch.float16, 1, 4, 4, 80, 80, 8, 64, True, "per_sample", False),
    "flash_causal_gqa": ("flash", torch.bfloat16, 2, 8, 2, 64, 100, 12, 128, True, "per_sample", True),
    "flash_d256_no_memory": ("flash", torch.bfloat16, 1, 2, 2, 70, 70, 0, 256, False, None, False),
    "flash_more_queries": ("flash", torch.float16, 1, 2, 1, 90, 40, 4, 64, True, "shared", False),
    "efficient_fp32_gqa": ("efficient", torch.float32, 2, 4, 2, 40, 72, 10, 64, False, "per_sample", False),
    "efficient_square": ("efficient", torch.bfloat16, 1, 2, 2, 33, 33, 5, 32, True, "shared", True),
}


def fake_inputs(dtype, B, H, Hkv, N, Nk, M, D, memory, bias):
    def empty(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="cuda")

    q, k, v = empty(B, H, N, D), empty(B, Hkv, Nk, D), empty(B, Hkv, Nk, D)
    mem_shape = (B, Hkv, M, D) if memory == "per_sample" else (Hkv, M, D)
    mem_k = empty(*mem_shape) if memory else None
    mem_v = empty(*mem_shape) if memory else None
    mem_bias = empty(1, Hkv, M, dtype=torch.float32) if bias else None
    return q, k, v, mem_k, mem_v, mem_bias


# cuDNN on sm_90 only, as the dispatch gives it
@pytest.mark.parametrize(
    "case,arch",
    [(case, arch) for case in sorted(CASES) for arch in (90, 80) if arch == 90 or CASES[case][0] != "cudnn"],
)
def test_cuda_branch_traces_forward_and_backward(case, arch):
    backend, dtype, B, H, Hkv, N, Nk, M, D, causal, memory, bias = CASES[case]
    with FakeTensorMode(), configs_for_arch(arch):
        q, k, v, mem_k, mem_v, mem_bias = fake_inputs(dtype, B, H, Hkv, N, Nk, M, D, memory, bias)
        forward_ops, backward_ops = OpLog(), OpLog()
        with recording() as forward_launches, forward_ops:
            out, lse, state_a, state_b = attention._composed_fwd(
                q, k, v, mem_k, mem_v, mem_bias, causal, D**-0.5, backend
            )
        assert out.shape == q.shape and out.dtype == dtype and out.device.type == "cuda"
        assert lse.shape == (B, H, N) and lse.dtype == torch.float32
        assert VENDOR_OPS[backend][0] in forward_ops.ops, forward_ops.ops
        kernels = sorted(launch.kernel.__name__ for launch in forward_launches)
        assert kernels == sorted(["lse_merge_kernel"] + (["memory_attention_fwd_kernel"] if M else []))

        grad_out = torch.empty_like(out)
        with recording() as backward_launches, backward_ops:
            grads = attention._composed_bwd(
                grad_out, q, k, v, mem_k, mem_v, mem_bias, out, lse, state_a, state_b, causal, D**-0.5, backend, False
            )
        assert VENDOR_OPS[backend][1] in backward_ops.ops, backward_ops.ops
        for grad, like in zip(grads, (q, k, v, mem_k, mem_v, mem_bias)):
            if like is None:
                assert grad.numel() == 0
            else:
                assert grad.shape == like.shape and grad.device.type == "cuda", (grad.shape, like.shape)
                assert grad.dtype == (like.dtype if like is not mem_k and like is not mem_v else dtype)
        kernels = sorted(launch.kernel.__name__ for launch in backward_launches)
        assert kernels == (
            sorted(["memory_attention_delta_kernel", "memory_attention_dq_kernel", "memory_attention_dkdv_kernel"])
            if M
            else []
        )


def _choice(dtype, N, Nk, D, causal, arch, impl="auto"):
    with FakeTensorMode(), configs_for_arch(arch):
        q = torch.empty(1, 4, N, D, dtype=dtype, device="cuda")
        return attention.attention_impl(q, Nk, causal=causal, impl=impl)


def test_dispatch_table():
    dit_mem = (torch.bfloat16, 32760, 32760, 128, False)
    assert _choice(*dit_mem, 90) == ("composed", "cudnn")
    assert _choice(*dit_mem, 80) == ("composed", "flash")
    # causal with N != Nk needs a bottom-right mask: flash has it, cuDNN's and efficient's is_causal do not
    assert _choice(torch.bfloat16, 1024, 4096, 128, True, 90) == ("composed", "flash")
    assert _choice(torch.bfloat16, 4096, 4096, 128, True, 90) == ("composed", "cudnn")
    assert _choice(torch.bfloat16, 4096, 4096, 256, False, 90) == ("composed", "flash")
    assert _choice(torch.float32, 4096, 4096, 64, False, 90) == ("composed", "efficient")
    assert _choice(torch.float32, 1024, 4096, 64, True, 90) == ("fused", None)  # no fp32 bottom-right op
    assert _choice(torch.bfloat16, 1, 4096, 128, True, 90) == ("fused", None)  # decode: one launch
    assert _choice(torch.bfloat16, 4096, 128, 128, False, 90) == ("fused", None)  # short sequence
    assert _choice(torch.bfloat16, 4096, 4096, 16, False, 90) == ("composed", "cudnn")
    assert _choice(torch.bfloat16, 1, 4096, 128, True, 90, impl="composed") == ("composed", "flash")
    assert _choice(*dit_mem, 90, impl="fused") == ("fused", None)


def test_dispatch_follows_the_sdpa_backend_switches():
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        assert _choice(torch.bfloat16, 4096, 4096, 128, False, 90) == ("composed", "flash")
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        assert _choice(torch.bfloat16, 4096, 4096, 128, False, 90) == ("composed", "efficient")
    with sdpa_kernel([SDPBackend.MATH]):
        assert _choice(torch.bfloat16, 4096, 4096, 128, False, 90) == ("fused", None)
        with pytest.raises(ValueError, match="impl='composed' needs"):
            _choice(torch.bfloat16, 4096, 4096, 128, False, 90, impl="composed")


def test_public_op_records_its_choice_on_fake_cuda():
    with FakeTensorMode(), configs_for_arch(90):
        q, k, v, mem_k, mem_v, mem_bias = fake_inputs(torch.bfloat16, 1, 4, 2, 512, 512, 16, 64, "shared", True)
        with count_launches() as launches:
            out, lse = memops.memory_attention(q, k, v, mem_k, mem_v, mem_bias=mem_bias.view(2, 16), return_lse=True)
            memops.memory_attention(q.narrow(2, 0, 1), k, v, mem_k, mem_v, causal=True)  # decode: fused
    assert launches["memory_attention.composed.cudnn"] == 1 and launches["memory_attention.fused"] == 1
    assert out.shape == q.shape and lse.shape == (1, 4, 512)


def test_bad_impl_is_a_value_error():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="impl must be one of"):
        memops.memory_attention(q, q, q, impl="flash")
    with memops.backend("triton"), pytest.raises(ValueError, match="needs sequence keys"):
        memops.memory_attention(q, q[:, :, :0], q[:, :, :0], q[0], q[0], impl="composed")
