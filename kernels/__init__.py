"""Triton kernels of the Mammoth data path, installed as ``mammoth_fast.kernels``.

One file per stage: query (GEMM + row norm), dispatch (streaming softmax over
the bag), experts (grouped low-rank matmuls), combine (softmax over slots).
"""
