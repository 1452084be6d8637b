"""Triton kernels and their launchers (torch tensors in, torch tensors out, no autograd).

Shipped as ``memops.kernels``; import it by that name. One file per op family.
"""
