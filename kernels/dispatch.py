"""Dispatch: the softmax over the bag, streamed like flash attention.

For each (bag b, head h) the P slot keys K[h] (P, dh) are the queries and the
patches' q[b, :, h, :] (N, dh) are both keys and values; the weights are a
softmax over n with no scaling:

    Z[b, h, p, :] = sum_n softmax_n(K[h, p] . q[b, n, h]) q[b, n, h, :]

N is large and P * H small, so N is split across programs (flash-decoding):
each program streams its chunk of n with a running max m, sum l and
accumulator acc, and a second kernel merges the chunks with a log-sum-exp
merge. Nothing of size N x H x P is stored. Saved for backward:
LSE[b, h, p] = m + log(l) (+inf for a slot that no patch reaches, so that
recomputed weights are 0 there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, dot_dtype, input_precision

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dispatch_partial_kernel(
    Q, K, MASK, M_PART, L_PART, ACC_PART,
    N, P, H, n_per_split,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, DH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (p-block, b*h, n-chunk): partial (m, l, acc) over n in the chunk."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = pid_bh // H
    h = pid_bh % H

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    d_ok = offs_d < DH
    # slot keys of head h: (BLOCK_P, BLOCK_D), laid out (H, P, DH) contiguous
    k = tl.load(K + (h * P + offs_p[:, None]) * DH + offs_d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
    k = k.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_P], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_P], ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)

    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    q_base = Q + b * stride_qb + h * DH
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        q = tl.load(q_base + offs_n[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_P, BLOCK_N) fp32
        if HAS_MASK:
            n_ok = n_ok & (tl.load(MASK + b * N + offs_n, mask=n_ok, other=0) != 0)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no patch yet: avoid inf - inf
        alpha = tl.exp2((m_i - m_ref) * LOG2E)
        w = tl.exp2((s - m_ref[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(w, axis=1)
        acc = acc * alpha[:, None] + tl.dot(w.to(DOT_DTYPE), q, input_precision=INPUT_PRECISION)
        m_i = m_new

    part = (pid_bh * n_splits + pid_s) * P + offs_p  # (B*H, n_splits, P)
    tl.store(M_PART + part, m_i, mask=p_ok)
    tl.store(L_PART + part, l_i, mask=p_ok)
    tl.store(ACC_PART + part[:, None] * DH + offs_d[None, :], acc, mask=p_ok[:, None] & d_ok[None, :])


@triton.jit
def _dispatch_merge_kernel(
    M_PART, L_PART, ACC_PART, Z, LSE,
    P, n_splits,
    DH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Log-sum-exp merge of the n-chunks: Z = acc / l and LSE = m + log(l)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    pd_ok = p_ok[:, None] & (offs_d[None, :] < DH)

    m = tl.full([BLOCK_P], float("-inf"), ACC)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(M_PART + (pid_bh * n_splits + s) * P + offs_p, mask=p_ok, other=float("-inf")))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_P], ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    for s in range(n_splits):
        part = (pid_bh * n_splits + s) * P + offs_p
        scale = tl.exp2((tl.load(M_PART + part, mask=p_ok, other=float("-inf")) - m_ref) * LOG2E)
        l += tl.load(L_PART + part, mask=p_ok, other=0.0) * scale
        acc += tl.load(ACC_PART + part[:, None] * DH + offs_d[None, :], mask=pd_ok, other=0.0) * scale[:, None]

    reached = l > 0
    z = acc / tl.where(reached, l, 1.0)[:, None]
    lse = tl.where(reached, m_ref + tl.log(tl.where(reached, l, 1.0)), float("inf"))
    out = pid_bh * P + offs_p  # (B*H, P)
    tl.store(Z + out[:, None] * DH + offs_d[None, :], z, mask=pd_ok)
    tl.store(LSE + out, lse, mask=p_ok)


def dispatch_meta(n: int, p: int, dh: int, bh: int, dtype: torch.dtype, sm_count: int = 132) -> dict:
    """Block sizes and the n-split for a bag of n patches.

    Programs along P and B*H alone are few (3 * 16 for one bag at the
    recommended sizes), so n is split until the grid covers the GPU about
    four times over, keeping at least four n-tiles per chunk.
    """
    block_p = block(p, maximum=128)
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    programs = triton.cdiv(p, block_p) * bh
    n_splits = max(1, min(triton.cdiv(4 * sm_count, programs), triton.cdiv(tiles, 4)))
    n_per_split = triton.cdiv(tiles, n_splits) * block_n
    n_splits = triton.cdiv(n, n_per_split)
    return dict(BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block(dh), n_splits=n_splits,
                n_per_split=n_per_split, num_warps=4, num_stages=2)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: keep a few chunks so the merge is exercised


def dispatch_forward(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, num_heads: int):
    """q (B, N, C) with unit stride along C; k (H, P, dh) contiguous, in the
    accumulator dtype; mask (B, N) bool or None. Returns Z (B, H, P, dh) and
    LSE (B, H, P) in the accumulator dtype (fp32; fp64 for fp64 input)."""
    check_device(q, k)
    bsz, n, c = q.shape
    h, p, dh = k.shape
    assert h == num_heads and c == h * dh and q.stride(2) == 1 and k.is_contiguous()
    meta = dispatch_meta(n, p, dh, bsz * h, q.dtype, _sm_count(q.device))
    n_splits = meta.pop("n_splits")
    n_per_split = meta.pop("n_per_split")
    acc = dict(device=q.device, dtype=acc_dtype(q.dtype))
    m_part = torch.empty(bsz * h, n_splits, p, **acc)
    l_part = torch.empty(bsz * h, n_splits, p, **acc)
    acc_part = torch.empty(bsz * h, n_splits, p, dh, **acc)
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else q
    grid = (triton.cdiv(p, meta["BLOCK_P"]), bsz * h, n_splits)
    _dispatch_partial_kernel[grid](
        q, k, mask_arg, m_part, l_part, acc_part,
        n, p, h, n_per_split, q.stride(0), q.stride(1),
        HAS_MASK=mask is not None, DH=dh,
        DOT_DTYPE=dot_dtype(q.dtype), INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[acc["dtype"]], **meta,
    )
    z = torch.empty(bsz, h, p, dh, **acc)
    lse = torch.empty(bsz, h, p, **acc)
    _dispatch_merge_kernel[(triton.cdiv(p, meta["BLOCK_P"]), bsz * h)](
        m_part, l_part, acc_part, z, lse, p, n_splits,
        DH=dh, BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], ACC=TORCH_TO_TL[acc["dtype"]],
    )
    return z, lse
