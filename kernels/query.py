"""Query: q = norm(feats @ Wq^T + bq), a GEMM with the row norm in its epilogue.

Why fused rather than a library GEMM plus a norm kernel: per patch the GEMM
reads Din inputs and does Din * C multiply-adds; an unfused norm would write
y (C values), read it back and write q (C values) again. At the recommended
sizes in bf16 (Din 1024, C 256) that is 2 KiB read + 0.5 KiB written fused
against 2 KiB + 1.5 KiB unfused per patch: the separate norm adds 40 % to the
bytes of a kernel that is memory-bound on an H100 (2 * 262k FLOP per 2.5 KiB
= 205 FLOP/byte, under the ridge of 800 TFLOP/s / 3.0 TB/s = 267 FLOP/byte).
C = 256 fits one tile row, so each
program owns whole rows and normalizes them in registers.

LayerNorm (eps 1e-5, weight gamma, bias beta) or the RMS variant
y / max(||y||, 1e-8) * sqrt(C) * gamma. Saved for backward, per row in fp32:
the mean (LayerNorm) and rstd (1/sqrt(var + eps), or 1/max(||y||, 1e-8)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, dot_dtype, input_precision


@triton.jit
def _query_fwd_kernel(
    X, W, BIAS, GAMMA, BETA, Q, MEAN, RSTD,
    M, K, C,
    stride_xm, stride_xk, stride_wc, stride_wk, stride_qm,
    eps,
    USE_LAYERNORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    c_ok = offs_c < C

    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + offs_c[None, :] * stride_wc + offs_k[:, None] * stride_wk  # (BLOCK_K, BLOCK_C) = Wq^T
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y = acc + tl.load(BIAS + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]  # padding columns stay 0
    gamma = tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(ACC)
    if USE_LAYERNORM:
        mean = tl.sum(y, axis=1) / C
        diff = tl.where(c_ok[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
        beta = tl.load(BETA + offs_c, mask=c_ok, other=0.0).to(ACC)
        q = diff * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(MEAN + offs_m, mean, mask=m_ok)
    else:
        rstd = 1.0 / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), 1e-8)
        q = y * (rstd * tl.sqrt(C.to(ACC)))[:, None] * gamma[None, :]
    tl.store(RSTD + offs_m, rstd, mask=m_ok)
    tl.store(Q + offs_m[:, None] * stride_qm + offs_c[None, :], q.to(Q.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


def query_meta(m: int, k: int, c: int, dtype: torch.dtype) -> dict:
    """Whole rows per program (BLOCK_C covers C); fewer rows when C is wide."""
    block_c = block(c)
    block_m = 64 if block_c <= 256 else 32
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=64 if dtype.itemsize == 2 else 32,
                num_warps=8, num_stages=3)


def query_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                  beta: torch.Tensor | None, use_layernorm: bool, eps: float = 1e-5):
    """x (M, Din) any strides; weight (C, Din); bias, gamma, beta (C,).
    Returns q (M, C) in x's dtype, and in the accumulator dtype (fp32; fp64 for
    fp64 input) mean (M,) (LayerNorm; else None) and rstd (M,)."""
    check_device(x, weight)
    m, k = x.shape
    c = weight.shape[0]
    meta = query_meta(m, k, c, x.dtype)
    q = torch.empty(m, c, device=x.device, dtype=x.dtype)
    stat = dict(device=x.device, dtype=acc_dtype(x.dtype))
    mean = torch.empty(m, **stat) if use_layernorm else None
    rstd = torch.empty(m, **stat)
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    _query_fwd_kernel[grid](
        x, weight, bias, gamma, beta if beta is not None else gamma, q, mean if mean is not None else rstd, rstd,
        m, k, c, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), q.stride(0),
        eps, USE_LAYERNORM=use_layernorm,
        DOT_DTYPE=dot_dtype(x.dtype), INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[stat["dtype"]], **meta,
    )
    return q, mean, rstd
