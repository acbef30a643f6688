"""Tile loads, dots and the softmax exponential shared by the dispatch and combine kernels."""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import LOG2E as LOG2E_

LOG2E = tl.constexpr(LOG2E_)


@triton.jit
def load_tile(base, offs_r, stride_r, offs_c, r_ok, c_ok):
    """The (rows, cols) tile base[offs_r * stride_r + offs_c], 0 outside r_ok x c_ok;
    row offsets in int64 (N * C reaches past 2**31 for large batches)."""
    return tl.load(base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :],
                   mask=r_ok[:, None] & c_ok[None, :], other=0.0)


@triton.jit
def mm(a, b, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """a @ b in ACC (``mma`` without an accumulator)."""
    if ACC == tl.float64:
        return tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    return tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=ACC)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b in ACC. In fp64 (the gradient checks' dtype) a broadcast
    product summed over K on the FMA units: triton 3.6 cannot lower the fp64
    MMAs of the masked dispatch and combine kernels ("fp64 don't support
    largeK MMA"), and fp64 tiles are 16 wide, so the product stays small."""
    if ACC == tl.float64:
        return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)


@triton.jit
def dot_rows(A, stride_a, offs_a, a_ok, B, stride_b, offs_b, b_ok,
             K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             ACC: tl.constexpr):
    """(len(offs_a), len(offs_b)) products of rows: sum over k < K of
    A[a, k] * B[b, k], streamed over k in BLOCK_K chunks, for the head widths
    too wide for one tile (the routing logits, and the dO . Y products)."""
    out = tl.zeros([offs_a.shape[0], offs_b.shape[0]], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = load_tile(A, offs_a, stride_a, offs_k, a_ok, k_ok).to(DOT_DTYPE)
        b = load_tile(B, offs_b, stride_b, offs_k, b_ok, k_ok).to(DOT_DTYPE)
        out = mma(a, tl.trans(b), out, INPUT_PRECISION, ACC)
    return out


@triton.jit
def exp_minus(s, m, FOLD_LOG2E: tl.constexpr):
    """exp(s - m) as exp2, for logits s and shifts m (a row or column that
    broadcasts against them): with FOLD_LOG2E one FMA per logit, s * log2(e) -
    m * log2(e), the second product taken on m's row; else (the legacy plan) a
    subtract and a multiply per logit. Exact in the keys: log2(e) is not
    rounded into half-precision keys."""
    if FOLD_LOG2E:
        return tl.exp2(tl.fma(s, LOG2E, -(m * LOG2E)))
    return tl.exp2((s - m) * LOG2E)
