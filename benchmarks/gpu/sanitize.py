"""Run every kernel once on awkward shapes, for `compute-sanitizer --tool memcheck python ...`."""
import torch

import memops

torch.manual_seed(0)
for S, D, T, K, dtype in [(37, 70, 9, 5, torch.float32), (1000, 1030, 17, 33, torch.bfloat16), (5, 1, 3, 1, torch.float16)]:
    values = torch.randn(S, D, device="cuda", dtype=dtype, requires_grad=True)
    indices = torch.randint(0, S, (T, K), device="cuda", dtype=torch.int32)
    weights = torch.rand(T, K, device="cuda", dtype=dtype, requires_grad=True)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        memops.weighted_gather(values, indices, weights).square().sum().backward()
torch.cuda.synchronize()
print("sanitize run done")
