"""Query: q = norm(feats @ Wq^T + bq), a GEMM with the row norm in its epilogue.

Why fused rather than a library GEMM plus a norm kernel: per patch the GEMM
reads Din inputs and does Din * C multiply-adds; an unfused norm would write
y (C values), read it back and write q (C values) again. At the recommended
sizes in bf16 (Din 1024, C 256) that is 2 KiB read + 0.5 KiB written fused
against 2 KiB + 1.5 KiB unfused per patch: the separate norm adds 40 % to the
bytes of a kernel that is memory-bound on an H100 (2 * 262k FLOP per 2.5 KiB
= 205 FLOP/byte, under the ridge of 800 TFLOP/s / 3.0 TB/s = 267 FLOP/byte).
(In training the kernel also writes y for the backward: 0.5 KiB more.)
C = 256 fits one tile row, so each program owns whole rows and normalizes
them in registers.

LayerNorm (eps 1e-5, weight gamma, bias beta) or the RMS variant
y / max(||y||, 1e-8) * sqrt(C) * gamma. Saved for backward, per row in the
accumulator dtype (fp32; fp64 for fp64 input): the mean (LayerNorm) and rstd
(1/sqrt(var + eps), or 1/max(||y||, 1e-8)).

Backward (``QueryFunction``): the forward also stores the pre-norm y (N * C
values in x's dtype) rather than have the backward recompute it with a second
Din x C GEMM; a row-norm kernel turns dq into dy and dgamma, and library GEMMs
give dx = dy @ Wq, dWq = dy^T @ x and dbq = sum_n dy.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, dot_dtype, input_precision, on_device, traceable


@triton.jit
def _query_fwd_kernel(
    X, W, BIAS, GAMMA, BETA, Q, Y, MEAN, RSTD,
    M, K, C,
    stride_xm, stride_xk, stride_wc, stride_wk, stride_qm,
    eps,
    USE_LAYERNORM: tl.constexpr, STORE_Y: tl.constexpr,
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
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)  # out_dtype: fp64 needs it in triton 3.6
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    y = acc + tl.load(BIAS + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]  # padding columns stay 0
    out_offs = offs_m[:, None] * stride_qm + offs_c[None, :]  # (BLOCK_M, BLOCK_C), q and y alike
    out_ok = m_ok[:, None] & c_ok[None, :]
    if STORE_Y:
        tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=out_ok)
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
    tl.store(Q + out_offs, q.to(Q.dtype.element_ty), mask=out_ok)


def query_meta(m: int, k: int, c: int, dtype: torch.dtype) -> dict:
    """Whole rows per program (BLOCK_C covers C); fewer rows when C is wide,
    or in fp32, whose FMA dot with 64 x 256 accumulators spills on sm_90a
    (32 rows: about 170 registers, the epilogue and y's store included)."""
    block_c = block(c)
    block_m = 64 if block_c <= 256 and dtype.itemsize == 2 else 32
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=64 if dtype.itemsize == 2 else 32,
                num_warps=8, num_stages=3)


@on_device
def query_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                  beta: torch.Tensor | None, use_layernorm: bool, eps: float = 1e-5, *,
                  y_out: torch.Tensor | None = None):
    """x (M, Din) any strides; weight (C, Din); bias, gamma, beta (C,).
    Returns q (M, C) in x's dtype, and in the accumulator dtype (fp32; fp64 for
    fp64 input) mean (M,) (LayerNorm; else None) and rstd (M,). ``y_out``, an
    empty contiguous (M, C) tensor in x's dtype, also receives the pre-norm
    y = x @ W^T + b for the backward."""
    check_device(x, weight)
    m, k = x.shape
    c = weight.shape[0]
    meta = query_meta(m, k, c, x.dtype)
    q = torch.empty(m, c, device=x.device, dtype=x.dtype)
    if y_out is not None:
        assert y_out.shape == q.shape and y_out.stride() == q.stride() and y_out.dtype == q.dtype
    stat = dict(device=x.device, dtype=acc_dtype(x.dtype))
    mean = torch.empty(m, **stat) if use_layernorm else None
    rstd = torch.empty(m, **stat)
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    traceable(_query_fwd_kernel)[grid](
        x, weight, bias, gamma, beta if beta is not None else gamma, q, y_out if y_out is not None else q,
        mean if mean is not None else rstd, rstd,
        m, k, c, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), q.stride(0),
        eps, USE_LAYERNORM=use_layernorm, STORE_Y=y_out is not None,
        DOT_DTYPE=dot_dtype(x.dtype), INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[stat["dtype"]], **meta,
    )
    return q, mean, rstd


@triton.jit
def _query_norm_bwd_kernel(
    DQ, Y, MEAN, RSTD, GAMMA, DY, DGAMMA_PART,
    M, C,
    stride_dqm, stride_dqc,
    USE_LAYERNORM: tl.constexpr, NEED_DY: tl.constexpr, NEED_DGAMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """BLOCK_M whole rows: dq -> dy, and this program's partial dgamma.

    With yhat the normalized row before gamma (xhat for LayerNorm, y * rstd *
    sqrt(C) for RMS), q = yhat * gamma (+ beta), so dgamma = sum_rows dq * yhat
    and, with g = dq * gamma,
      LayerNorm: dy = rstd * (g - mean_c(g) - yhat * mean_c(g * yhat))
      RMS:       dy = rstd * sqrt(C) * (g - yhat * mean_c(g * yhat)),
    the projection dropped where ||y|| < 1e-8: F.normalize's clamp passes no
    gradient to the norm there.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    c_ok = offs_c < C
    ok = m_ok[:, None] & c_ok[None, :]  # (BLOCK_M, BLOCK_C)
    y_offs = offs_m[:, None] * C + offs_c[None, :]  # y and dy: contiguous (M, C)

    # dq = 0 outside: the padding's yhat (-mean * rstd) reaches no sum, and its dy no store
    dq = tl.load(DQ + offs_m[:, None] * stride_dqm + offs_c[None, :] * stride_dqc, mask=ok, other=0.0).to(ACC)
    y = tl.load(Y + y_offs, mask=ok, other=0.0).to(ACC)  # (BLOCK_M, BLOCK_C)
    rstd = tl.load(RSTD + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
    if USE_LAYERNORM:
        mean = tl.load(MEAN + offs_m, mask=m_ok, other=0.0)
        yhat = (y - mean[:, None]) * rstd[:, None]
        scale = rstd
    else:
        scale = rstd * tl.sqrt(C.to(ACC))
        yhat = y * scale[:, None]
    if NEED_DGAMMA:
        tl.store(DGAMMA_PART + pid * C + offs_c, tl.sum(dq * yhat, axis=0), mask=c_ok)
    if NEED_DY:
        g = dq * tl.load(GAMMA + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]  # dL/dyhat
        proj = tl.sum(g * yhat, axis=1) / C  # (BLOCK_M,)
        if USE_LAYERNORM:
            g -= (tl.sum(g, axis=1) / C)[:, None]
        else:
            proj = tl.where(tl.sqrt(tl.sum(y * y, axis=1)) >= 1e-8, proj, 0.0)
        dy = (g - yhat * proj[:, None]) * scale[:, None]
        tl.store(DY + y_offs, dy.to(DY.dtype.element_ty), mask=ok)


def query_norm_bwd_meta(c: int) -> dict:
    """Whole rows per program, 8192 elements (32 per thread in one tile)."""
    block_c = block(c)
    return dict(BLOCK_M=max(1, min(128, 8192 // block_c)), BLOCK_C=block_c, num_warps=8)


@on_device
def query_norm_backward(dq: torch.Tensor, y: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                        gamma: torch.Tensor, use_layernorm: bool, need_dy: bool, need_dgamma: bool):
    """dq (M, C) any strides; y (M, C) contiguous, mean (LayerNorm; else None)
    and rstd (M,) as ``query_forward`` saved them; gamma (C,). Returns dy (M, C)
    in y's dtype and dgamma (C,) in the accumulator dtype, None where not
    needed. dgamma sums per-program partials: deterministic, no atomics."""
    check_device(dq, y)
    m, c = y.shape
    meta = query_norm_bwd_meta(c)
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    dy = torch.empty_like(y) if need_dy else None
    dgamma_part = torch.empty(grid[0], c, device=y.device, dtype=rstd.dtype) if need_dgamma else None
    traceable(_query_norm_bwd_kernel)[grid](
        dq, y, mean if mean is not None else rstd, rstd, gamma,
        dy if need_dy else y, dgamma_part if need_dgamma else rstd,
        m, c, dq.stride(0), dq.stride(1),
        USE_LAYERNORM=use_layernorm, NEED_DY=need_dy, NEED_DGAMMA=need_dgamma,
        ACC=TORCH_TO_TL[rstd.dtype], **meta,
    )
    return dy, dgamma_part.sum(0) if need_dgamma else None


class QueryFunction(torch.autograd.Function):
    """q = norm(x @ W^T + b) (M, C) in x's dtype. Saves x (only if W needs a
    gradient), W, gamma and, for the backward, y (M, C), mean and rstd (M,):
    O(M * C) beyond the inputs.
    beta is a buffer: it gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, use_layernorm: bool):
        q, mean, rstd, y = _ops.query_forward(x, weight, bias, gamma, beta, use_layernorm,
                                              store_y=any(ctx.needs_input_grad[:4]))
        # x (M, Din), under autocast a half copy of the features, is kept only for dWq
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, gamma, y, mean, rstd)
        ctx.use_layernorm = use_layernorm
        ctx.bias_dtype = bias.dtype
        return q

    @staticmethod
    @once_differentiable
    def backward(ctx, dq):
        x, weight, gamma, y, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dgamma = ctx.needs_input_grad[:4]
        need_dy = need_dx or need_dw or need_db
        if not (need_dy or need_dgamma):
            return None, None, None, None, None, None
        dy, dgamma = _ops.query_norm_backward(dq, y, mean, rstd, gamma, ctx.use_layernorm, need_dy, need_dgamma)
        # dy is in x's dtype, so with bf16/fp16 inputs the GEMMs run on tensor
        # cores with fp32 accumulation, as the eager layer's backward under
        # autocast does; fp32 GEMMs would first copy x, the largest tensor, to
        # fp32, for accuracy beyond what SPEC section 10 asks.
        dx = dy @ weight.to(dy.dtype) if need_dx else None  # (M, Din)
        dw = (dy.t() @ x).to(weight.dtype) if need_dw else None  # (C, Din)
        db = dy.sum(0, dtype=rstd.dtype).to(ctx.bias_dtype) if need_db else None  # (C,)
        dgamma = dgamma.to(gamma.dtype) if need_dgamma else None
        return dx, dw, db, dgamma, None, None


from . import _ops  # noqa: E402  (the launchers as custom ops; imports this module)
