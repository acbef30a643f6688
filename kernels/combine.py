"""Combine (keep_slots=False): each patch takes a softmax-weighted sum of the
expert outputs of its head, attention with the patches as queries:

    out[b, n, h*do:(h+1)*do] = sum_p softmax_p(q[b, n, h] . K[h, p]) Y[b, p, h*do:(h+1)*do]

One program takes BLOCK_N patches of one head of one bag and streams the P
slots in tiles with an online softmax (P = 300 at the recommended sizes).
Padded patches (mask False) get zero output. Saved for backward:
LSE[b, n, h] = log sum_p exp(L), (B, N, H) fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, dot_dtype, input_precision

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine_fwd_kernel(
    Q, K, Y, MASK, OUT, LSE,
    N, P, H,
    stride_qb, stride_qn, stride_ob, stride_on,
    HAS_MASK: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    D = H * DO

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_do = tl.arange(0, BLOCK_DO)
    n_ok = offs_n < N
    dh_ok = offs_dh < DH
    do_ok = offs_do < DO
    q = tl.load(Q + b * stride_qb + offs_n[:, None].to(tl.int64) * stride_qn + h * DH + offs_dh[None, :],
                mask=n_ok[:, None] & dh_ok[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_DH)

    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        k = tl.load(K + (h * P + offs_p[:, None]) * DH + offs_dh[None, :],
                    mask=p_ok[:, None] & dh_ok[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_P)
        s = tl.where(p_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a real slot
        alpha = tl.exp2((m_i - m_new) * LOG2E)
        w = tl.exp2((s - m_new[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(w, axis=1)
        y = tl.load(Y + (b * P + offs_p[:, None]) * D + h * DO + offs_do[None, :],
                    mask=p_ok[:, None] & do_ok[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
        acc = acc * alpha[:, None] + tl.dot(w.to(DOT_DTYPE), y, input_precision=INPUT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = m_i + tl.log(l_i)
    if HAS_MASK:
        keep = tl.load(MASK + b * N + offs_n, mask=n_ok, other=0) != 0
        out = tl.where(keep[:, None], out, 0.0)
    tl.store(OUT + b * stride_ob + offs_n[:, None].to(tl.int64) * stride_on + h * DO + offs_do[None, :],
             out.to(OUT.dtype.element_ty), mask=n_ok[:, None] & do_ok[None, :])
    tl.store(LSE + (b * N + offs_n) * H + h, lse, mask=n_ok)


def combine_meta(n: int, p: int, dh: int, do: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_N=64, BLOCK_P=block(p, maximum=64), BLOCK_DH=block(dh), BLOCK_DO=block(do),
                num_warps=4, num_stages=2)


def combine_forward(q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                    out_dtype: torch.dtype):
    """q (B, N, C) unit stride along C; k (H, P, dh) and y (B, P, D) in the
    accumulator dtype; mask (B, N) bool or None. Returns out (B, N, D) in
    out_dtype and LSE (B, N, H) in the accumulator dtype."""
    check_device(q, k, y)
    bsz, n, _ = q.shape
    h, p, dh = k.shape
    d = y.shape[2]
    do = d // h
    assert q.stride(2) == 1 and k.is_contiguous() and y.is_contiguous()
    meta = combine_meta(n, p, dh, do, q.dtype)
    out = torch.empty(bsz, n, d, device=q.device, dtype=out_dtype)
    lse = torch.empty(bsz, n, h, device=q.device, dtype=acc_dtype(q.dtype))
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else q
    grid = (triton.cdiv(n, meta["BLOCK_N"]), h, bsz)
    _combine_fwd_kernel[grid](
        q, k, y, mask_arg, out, lse,
        n, p, h, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, DH=dh, DO=do,
        DOT_DTYPE=dot_dtype(q.dtype), INPUT_PRECISION=input_precision(),
        ACC=TORCH_TO_TL[acc_dtype(q.dtype)], **meta,
    )
    return out, lse
