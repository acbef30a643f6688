"""Query: q = norm(feats @ Wq^T + bq), a GEMM with the row norm in its epilogue.

Why fused rather than a library GEMM plus a norm kernel: per patch the GEMM
reads Din inputs and does Din * C multiply-adds; an unfused norm would write
y (C values), read it back and write q (C values) again. At the recommended
sizes in bf16 (Din 1024, C 256) that is 2 KiB read + 0.5 KiB written fused
against 2 KiB + 1.5 KiB unfused per patch: the separate norm adds 40 % to the
bytes of a kernel that is memory-bound on an H100 (2 * 262k FLOP per 2.5 KiB
= 205 FLOP/byte, under the ridge of 800 TFLOP/s / 3.0 TB/s = 267 FLOP/byte).
(In training the kernel also writes y for the backward: 0.5 KiB more.)
Up to C = 512 each program owns whole rows (BLOCK_C covers C) and normalizes
them in registers. Wider queries (C in (512, 1024]) do not fit one tile row
(the Wq tiles alone would pass the 227 KiB of shared memory a block may
have), and there the GEMM is relatively heavier (Din * C multiply-adds for the
same bytes): the library GEMM computes x @ Wq^T and a row kernel
(``_query_norm_fwd_kernel``) adds the bias and normalizes.

LayerNorm (eps 1e-5, weight gamma, bias beta) or the RMS variant
y / max(||y||, 1e-8) * sqrt(C) * gamma. Saved for backward, per row in the
accumulator dtype (fp32; fp64 for fp64 input): the mean (LayerNorm) and rstd
(1/sqrt(var + eps), or 1/max(||y||, 1e-8)).

Backward: the forward also stores the pre-norm y (N * C values in x's dtype)
rather than have the backward recompute it with a second Din x C GEMM; a
row-norm kernel turns dq into dy and dgamma, and library GEMMs give
dx = dy @ Wq, dWq = dy^T @ x and dbq = sum_n dy.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import (TORCH_TO_TL, Ladder, acc_dtype, block, candidates, check_device, choose, dot_dtype, input_precision,
                      launch, on_device)

FUSED_MAX_C = 512
"""The widest query the fused GEMM + norm kernel takes (one tile row)."""


@triton.jit
def _norm_rows(y, offs_m, m_ok, offs_c, c_ok, GAMMA, BETA, Q, Y, MEAN, RSTD, C, stride_qm, eps,
               USE_LAYERNORM: tl.constexpr, STORE_Y: tl.constexpr, ACC: tl.constexpr):
    """Epilogue on whole rows y (BLOCK_M, BLOCK_C) in ACC, 0 in the padding
    columns: stores y (STORE_Y), q = norm(y), and the row statistics."""
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
        q = y * (rstd * tl.sqrt(tl.cast(C, ACC)))[:, None] * gamma[None, :]
    tl.store(RSTD + offs_m, rstd, mask=m_ok)
    tl.store(Q + out_offs, q.to(Q.dtype.element_ty), mask=out_ok)


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
    """BLOCK_M whole rows: the GEMM over Din in BLOCK_K steps, then the norm."""
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
    _norm_rows(y, offs_m, m_ok, offs_c, c_ok, GAMMA, BETA, Q, Y, MEAN, RSTD, C, stride_qm, eps,
               USE_LAYERNORM, STORE_Y, ACC)


@triton.jit
def _query_norm_fwd_kernel(
    XW, BIAS, GAMMA, BETA, Q, Y, MEAN, RSTD,
    M, C, stride_qm, eps,
    USE_LAYERNORM: tl.constexpr, STORE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """BLOCK_M whole rows of x @ Wq^T (M, C) contiguous, from the library GEMM:
    adds the bias, then the norm."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    c_ok = offs_c < C
    y = tl.load(XW + offs_m[:, None] * C + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
    y += tl.load(BIAS + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    _norm_rows(y, offs_m, m_ok, offs_c, c_ok, GAMMA, BETA, Q, Y, MEAN, RSTD, C, stride_qm, eps,
               USE_LAYERNORM, STORE_Y, ACC)


def query_meta(c: int, dtype: torch.dtype) -> dict:
    """The fused kernel (C <= FUSED_MAX_C): whole rows per program (BLOCK_C
    covers C); fewer rows when C is wide, or in fp32, whose FMA dot with
    64 x 256 accumulators spills on sm_90a (32 rows: about 170 registers, the
    epilogue and y's store included); 16 rows for fp32 at C = 512."""
    block_c = block(c)
    half = dtype.itemsize == 2
    block_m = (64 if block_c <= 256 else 32) if half else (32 if block_c <= 256 else 16)
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=64 if half else 32, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=None)
def query_metas(c: int, dtype: torch.dtype) -> Ladder:
    """The fused kernel's candidates (``_launch.choose`` takes the first that compiles without spills)."""
    return candidates(query_meta(c, dtype), ("BLOCK_M", "BLOCK_K"))


@functools.lru_cache(maxsize=None)
def query_rows_metas(c: int, dtype: torch.dtype) -> Ladder:
    return candidates(query_rows_meta(c, dtype), ("BLOCK_M",))


def query_rows_meta(c: int, dtype: torch.dtype) -> dict:
    """The row kernels (the norm after a library GEMM, and the norm's backward):
    whole rows per program, 8192 elements (32 per thread in one tile; 4096 in
    fp64)."""
    block_c = block(c)
    elements = 4096 if dtype == torch.float64 else 8192
    return dict(BLOCK_M=max(1, min(128, elements // block_c)), BLOCK_C=block_c, num_warps=8, num_stages=2)


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
    q = torch.empty(m, c, device=x.device, dtype=x.dtype)
    if y_out is not None:
        assert y_out.shape == q.shape and y_out.stride() == q.stride() and y_out.dtype == q.dtype
    stat = dict(device=x.device, dtype=acc_dtype(x.dtype))
    mean = torch.empty(m, **stat) if use_layernorm else None
    rstd = torch.empty(m, **stat)
    # absent outputs: inputs stand in (never written), not buffers another argument writes
    args = dict(BIAS=bias, GAMMA=gamma, BETA=beta if beta is not None else gamma, Q=q,
                Y=y_out if y_out is not None else x, MEAN=mean if mean is not None else gamma, RSTD=rstd,
                M=m, C=c, stride_qm=q.stride(0), eps=eps, USE_LAYERNORM=use_layernorm, STORE_Y=y_out is not None,
                ACC=TORCH_TO_TL[stat["dtype"]])
    if c <= FUSED_MAX_C:
        kernel, metas = _query_fwd_kernel, query_metas(c, x.dtype)
        args.update(X=x, W=weight, K=k, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wc=weight.stride(0),
                    stride_wk=weight.stride(1), DOT_DTYPE=dot_dtype(x.dtype), INPUT_PRECISION=input_precision())
    else:
        kernel, metas = _query_norm_fwd_kernel, query_rows_metas(c, x.dtype)
        with torch.autocast(x.device.type, enabled=False):  # x @ Wq^T in x's dtype, as the fused kernel's dots
            args.update(XW=(x @ weight.t()).contiguous())
    meta, _ = choose(kernel, x.device, args, metas)
    launch(kernel, (triton.cdiv(m, meta["BLOCK_M"]),), **args, **meta)
    return q, mean, rstd


@triton.jit
def _query_norm_bwd_kernel(
    DQ, Y, MEAN, RSTD, GAMMA, DY, DGAMMA_PART, DB_PART,
    M, C,
    stride_dqm, stride_dqc,
    USE_LAYERNORM: tl.constexpr, NEED_DY: tl.constexpr, NEED_DGAMMA: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """BLOCK_M whole rows: dq -> dy, and this program's partials of dgamma
    and (NEED_DB) of the projection's bias gradient db = sum_rows dy, taken
    from dy before its rounding to y's dtype: no second pass over dy.

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
        scale = rstd * tl.sqrt(tl.cast(C, ACC))
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
        dy = (g - yhat * proj[:, None]) * scale[:, None]  # (BLOCK_M, BLOCK_C); 0 in padded rows (dq = 0)
        tl.store(DY + y_offs, dy.to(DY.dtype.element_ty), mask=ok)
        if NEED_DB:
            tl.store(DB_PART + pid * C + offs_c, tl.sum(dy, axis=0), mask=c_ok)


@on_device
def query_norm_backward(dq: torch.Tensor, y: torch.Tensor, mean: torch.Tensor | None, rstd: torch.Tensor,
                        gamma: torch.Tensor, use_layernorm: bool, need_dy: bool, need_dgamma: bool,
                        need_db: bool = False):
    """dq (M, C) any strides; y (M, C) contiguous, mean (LayerNorm; else None)
    and rstd (M,) as ``query_forward`` saved them; gamma (C,). Returns dy (M, C)
    in y's dtype, and dgamma (C,) and db = dy.sum(0) (C,) in the accumulator
    dtype, None where not needed (db needs dy). dgamma and db sum per-program
    partials: deterministic, no atomics."""
    check_device(dq, y)
    m, c = y.shape
    need_db = need_db and need_dy
    dy = torch.empty_like(y) if need_dy else None
    # absent outputs: inputs stand in (never written)
    args = dict(DQ=dq, Y=y, MEAN=mean if mean is not None else rstd, RSTD=rstd, GAMMA=gamma, DY=dy if need_dy else y,
                M=m, C=c, stride_dqm=dq.stride(0), stride_dqc=dq.stride(1), USE_LAYERNORM=use_layernorm,
                NEED_DY=need_dy, NEED_DGAMMA=need_dgamma, NEED_DB=need_db, ACC=TORCH_TO_TL[rstd.dtype])
    meta, _ = choose(_query_norm_bwd_kernel, y.device, {**args, "DGAMMA_PART": rstd, "DB_PART": rstd},
                     query_rows_metas(c, y.dtype))
    grid = (triton.cdiv(m, meta["BLOCK_M"]),)
    part = dict(device=y.device, dtype=rstd.dtype)
    dgamma_part = torch.empty(grid[0], c, **part) if need_dgamma else rstd
    db_part = torch.empty(grid[0], c, **part) if need_db else rstd
    launch(_query_norm_bwd_kernel, grid, DGAMMA_PART=dgamma_part, DB_PART=db_part, **args, **meta)
    return dy, dgamma_part.sum(0) if need_dgamma else None, db_part.sum(0) if need_db else None
