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
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, dot_dtype, input_precision, on_device, sm_count, traceable
from ._slot_dropout import kernel_p_drop, load_seed, seed_tensor, slot_keep_np, slot_keep_pn
from ._tiles import load_tile

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _patch_ok(MASK, seed, p_drop, b, offs_n, h, p0, n_end, N, H, P,
              HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, BLOCK_P: tl.constexpr, P_MAJOR: tl.constexpr):
    """Which logits of the tile of patches offs_n and slots p0 + arange(BLOCK_P)
    take part: real patches, not padding, not slot-dropped. (BLOCK_P, BLOCK_N)
    with P_MAJOR, else (BLOCK_N, BLOCK_P); without HAS_DROP, a row or column
    that broadcasts to it."""
    ok = offs_n < n_end
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * N + offs_n, mask=ok, other=0) != 0)
    if P_MAJOR:
        ok = ok[None, :]
        if HAS_DROP:
            ok = ok & slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P)
    else:
        ok = ok[:, None]
        if HAS_DROP:
            ok = ok & slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P)
    return ok


@triton.jit
def _dispatch_partial_kernel(
    Q, K, MASK, M_PART, L_PART, ACC_PART,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (p-block, b*h, n-chunk): partial (m, l, acc) over n in the chunk."""
    seed = load_seed(SEED, HAS_DROP)
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
    k = load_tile(K + h * P * DH, offs_p, DH, offs_d, p_ok, d_ok).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_P], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_P], ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)

    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    q_base = Q + b * stride_qb + h * DH
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        q = load_tile(q_base, offs_n, stride_qn, offs_d, offs_n < n_end, d_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_P, BLOCK_N)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, n_end, N, H, P,
                       HAS_MASK, HAS_DROP, BLOCK_P, True)
        s = tl.where(ok, s, float("-inf"))
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


@triton.jit
def _dispatch_bwd_dq_kernel(
    Q, K, DZ, LSE, DELTA, MASK, DQ,
    N, P, H, SEED, p_drop,
    stride_qb, stride_qn, stride_dqb, stride_dqn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dq for BLOCK_N patches of one (b, h), all P slots streamed:
    dq = sum_p Dw dZ[p] + sum_p Dw (dZ[p] . q - delta[p]) K[p]."""
    seed = load_seed(SEED, HAS_DROP)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nd_ok = (offs_n < N)[:, None] & (offs_d < DH)[None, :]
    q = load_tile(Q + b * stride_qb + h * DH, offs_n, stride_qn, offs_d, offs_n < N, offs_d < DH).to(DOT_DTYPE)
    dq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        pd_ok = p_ok[:, None] & (offs_d < DH)[None, :]
        slot = pid_bh * P + offs_p  # (B*H, P)
        k = load_tile(K + h * P * DH, offs_p, DH, offs_d, p_ok, offs_d < DH).to(DOT_DTYPE)
        dz = tl.load(DZ + slot[:, None] * DH + offs_d[None, :], mask=pd_ok, other=0.0).to(DOT_DTYPE)
        lse = tl.load(LSE + slot, mask=p_ok, other=float("inf"))  # +inf: weight 0
        delta = tl.load(DELTA + slot, mask=p_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_P)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, p0, N, N, H, P, HAS_MASK, HAS_DROP, BLOCK_P, False)
        w = tl.where(ok, tl.exp2((s - lse[None, :]) * LOG2E), 0.0)  # Dw^T
        dw = tl.dot(q, tl.trans(dz), input_precision=INPUT_PRECISION)  # dDw^T
        dl = w * (dw - delta[None, :])
        dq += tl.dot(w.to(DOT_DTYPE), dz, input_precision=INPUT_PRECISION)
        dq += tl.dot(dl.to(DOT_DTYPE), k, input_precision=INPUT_PRECISION)
    tl.store(DQ + b * stride_dqb + offs_n[:, None].to(tl.int64) * stride_dqn + h * DH + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=nd_ok)


@triton.jit
def _dispatch_bwd_dk_kernel(
    Q, K, DZ, LSE, DELTA, MASK, DK_PART,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Partial dK over one n-chunk for a p-block of one (b, h):
    dK[p] = sum_n Dw (dZ[p] . q - delta[p]) q[n]; summed over chunks and bags by the launcher."""
    seed = load_seed(SEED, HAS_DROP)
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
    pd_ok = p_ok[:, None] & d_ok[None, :]
    slot = pid_bh * P + offs_p
    k = load_tile(K + h * P * DH, offs_p, DH, offs_d, p_ok, d_ok).to(DOT_DTYPE)
    dz = tl.load(DZ + slot[:, None] * DH + offs_d[None, :], mask=pd_ok, other=0.0).to(DOT_DTYPE)
    lse = tl.load(LSE + slot, mask=p_ok, other=float("inf"))
    delta = tl.load(DELTA + slot, mask=p_ok, other=0.0)
    dk = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        q = load_tile(Q + b * stride_qb + h * DH, offs_n, stride_qn, offs_d, offs_n < n_end, d_ok).to(DOT_DTYPE)
        s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_P, BLOCK_N)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, n_end, N, H, P,
                       HAS_MASK, HAS_DROP, BLOCK_P, True)
        w = tl.where(ok, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)  # Dw
        dw = tl.dot(dz, tl.trans(q), input_precision=INPUT_PRECISION)  # dDw
        dl = w * (dw - delta[:, None])
        dk += tl.dot(dl.to(DOT_DTYPE), q, input_precision=INPUT_PRECISION)
    part = (pid_bh * n_splits + pid_s) * P + offs_p
    tl.store(DK_PART + part[:, None] * DH + offs_d[None, :], dk, mask=pd_ok)


def dispatch_meta(n: int, p: int, dh: int, bh: int, dtype: torch.dtype, sm_count: int = 132) -> dict:
    """Block sizes and the n-split for a bag of n patches (forward partials and dK).

    16-bit inputs: 128 x 64 (BLOCK_P x BLOCK_N) logit tiles; the dots run on
    tensor cores and the cost is reading q once per p-block. fp32: 64 x 32.
    Its IEEE dots are FMA loops on operands held in registers: on sm_90a,
    128 x 64 tiles spill (dK most), and 64 x 64 ones sit at ptxas's
    128-register target, where a variant spills 8 bytes (triton 3.6's ptxas);
    64 x 32 compiles without spills under triton 3.6 and 3.9 (100 to 220
    registers, slot dropout included). BLOCK_P = 64 also pads P = 300 to 320
    slots rather than 384.

    Programs along P and B*H alone are few (3 * 16 for one bag at the
    recommended sizes in bf16), so n is split until the grid covers the GPU
    about four times over, keeping at least four n-tiles per chunk.
    """
    half = dtype.itemsize <= 2
    block_p = block(p, maximum=128 if half else 64)
    block_n = 64 if half else 32
    tiles = triton.cdiv(n, block_n)
    programs = triton.cdiv(p, block_p) * bh
    n_splits = max(1, min(triton.cdiv(4 * sm_count, programs), triton.cdiv(tiles, 4)))
    n_per_split = triton.cdiv(tiles, n_splits) * block_n
    n_splits = triton.cdiv(n, n_per_split)
    return dict(BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_D=block(dh), n_splits=n_splits,
                n_per_split=n_per_split, num_warps=4, num_stages=2)


def dispatch_dk_meta(n: int, p: int, dh: int, bh: int, dtype: torch.dtype, sm_count: int = 132) -> dict:
    """dK partials: the forward's grid and tiles. fp32 unpipelined: with 2 stages
    triton 3.6's ptxas spills 8 bytes in the slot-dropout variant (168 registers)."""
    meta = dispatch_meta(n, p, dh, bh, dtype, sm_count)
    return meta if dtype.itemsize <= 2 else {**meta, "num_stages": 1}


def dispatch_dq_meta(n: int, p: int, dh: int, dtype: torch.dtype) -> dict:
    """dq: one program per BLOCK_N patches of a head, all P slots streamed.
    fp32 takes 8 warps: its FMA dots on the 64 x 64 tiles spill with 4 on
    sm_90a; with 8, 160 to 180 registers, slot dropout included."""
    return dict(BLOCK_N=64, BLOCK_P=block(p, maximum=64), BLOCK_D=block(dh),
                num_warps=4 if dtype.itemsize <= 2 else 8, num_stages=2)


def _common_args(q: torch.Tensor, mask, drop):
    """Kernel arguments shared by all dispatch kernels: the mask (or a dummy
    pointer), the slot-dropout (seed, p) and the dtype constexprs."""
    seed, p_drop = (seed_tensor(drop[0], q.device), kernel_p_drop(drop[1])) if drop is not None else (q, 0.0)
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else q
    consts = dict(HAS_MASK=mask is not None, HAS_DROP=drop is not None, DOT_DTYPE=dot_dtype(q.dtype),
                  INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[acc_dtype(q.dtype)])
    return mask_arg, seed, p_drop, consts


@on_device
def dispatch_forward(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, drop=None):
    """q (B, N, C) with unit stride along C; k (H, P, dh) contiguous, in the
    accumulator dtype; mask (B, N) bool or None; drop (seed, p) of slot
    dropout or None. Returns Z (B, H, P, dh) and LSE (B, H, P) in the
    accumulator dtype (fp32; fp64 for fp64 input)."""
    check_device(q, k)
    bsz, n, c = q.shape
    h, p, dh = k.shape
    assert c == h * dh and q.stride(2) == 1 and k.is_contiguous()
    meta = dispatch_meta(n, p, dh, bsz * h, q.dtype, sm_count(q.device))
    n_splits = meta.pop("n_splits")
    n_per_split = meta.pop("n_per_split")
    mask_arg, seed, p_drop, consts = _common_args(q, mask, drop)
    acc = dict(device=q.device, dtype=acc_dtype(q.dtype))
    m_part = torch.empty(bsz * h, n_splits, p, **acc)
    l_part = torch.empty(bsz * h, n_splits, p, **acc)
    acc_part = torch.empty(bsz * h, n_splits, p, dh, **acc)
    grid = (triton.cdiv(p, meta["BLOCK_P"]), bsz * h, n_splits)
    traceable(_dispatch_partial_kernel)[grid](
        q, k, mask_arg, m_part, l_part, acc_part,
        n, p, h, n_per_split, seed, p_drop, q.stride(0), q.stride(1), DH=dh, **consts, **meta,
    )
    z = torch.empty(bsz, h, p, dh, **acc)
    lse = torch.empty(bsz, h, p, **acc)
    traceable(_dispatch_merge_kernel)[(triton.cdiv(p, meta["BLOCK_P"]), bsz * h)](
        m_part, l_part, acc_part, z, lse, p, n_splits,
        DH=dh, BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], ACC=consts["ACC"],
    )
    return z, lse


@on_device
def dispatch_backward(dz, q, k, z, lse, mask, drop, need_dq: bool, need_dk: bool):
    """dZ (B, H, P, dh) -> dq (B, N, C) in q's dtype and dK (H, P, dh) in the
    accumulator dtype (None where not needed). dK is reduced over n-chunks and
    bags from per-program partials: deterministic."""
    bsz, n, c = q.shape
    h, p, dh = k.shape
    dz = dz.to(z.dtype).contiguous()
    # delta_d from dZ as the kernels' dots see it (rounded for half-precision dots),
    # so that sum_n dL_d stays 0 as the softmax requires
    dz_dot = dz.to(q.dtype).to(z.dtype) if dot_dtype(q.dtype) in (tl.float16, tl.bfloat16) else dz
    delta = (dz_dot * z).sum(-1)  # (B, H, P): P * H values
    mask_arg, seed, p_drop, consts = _common_args(q, mask, drop)
    dq = dk = None
    if need_dq:
        meta = dispatch_dq_meta(n, p, dh, q.dtype)
        dq = torch.empty(bsz, n, c, device=q.device, dtype=q.dtype)
        traceable(_dispatch_bwd_dq_kernel)[(triton.cdiv(n, meta["BLOCK_N"]), bsz * h)](
            q, k, dz, lse, delta, mask_arg, dq,
            n, p, h, seed, p_drop, q.stride(0), q.stride(1), dq.stride(0), dq.stride(1),
            DH=dh, **consts, **meta,
        )
    if need_dk:
        meta = dispatch_dk_meta(n, p, dh, bsz * h, q.dtype, sm_count(q.device))
        n_splits = meta.pop("n_splits")
        n_per_split = meta.pop("n_per_split")
        dk_part = torch.empty(bsz, h, n_splits, p, dh, device=q.device, dtype=z.dtype)
        traceable(_dispatch_bwd_dk_kernel)[(triton.cdiv(p, meta["BLOCK_P"]), bsz * h, n_splits)](
            q, k, dz, lse, delta, mask_arg, dk_part,
            n, p, h, n_per_split, seed, p_drop, q.stride(0), q.stride(1),
            DH=dh, **consts, **meta,
        )
        dk = dk_part.sum(dim=(0, 2))  # (H, P, dh)
    return dq, dk


class DispatchFunction(torch.autograd.Function):
    """(Z, LSE) = dispatch(q, K) per (bag, head); saves q, K, Z and LSE (no N*H*P
    tensor). LSE (B, H, P) is returned for ``return_weights`` and carries no gradient."""

    @staticmethod
    def forward(ctx, q, k, mask, drop):
        seed, ctx.p_drop = _ops.drop_args(drop, q)
        z, lse = _ops.dispatch_forward(q, k, mask, _ops.make_drop(seed, ctx.p_drop))
        ctx.save_for_backward(q, k, z, lse, mask, seed)
        ctx.mark_non_differentiable(lse)
        return z, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dz, _dlse):
        q, k, z, lse, mask, seed = ctx.saved_tensors
        drop = _ops.make_drop(seed, ctx.p_drop)
        dq, dk = _ops.dispatch_backward(dz, q, k, z, lse, mask, drop, *ctx.needs_input_grad[:2])
        return dq, dk, None, None


def dispatch(q, k, mask=None, drop=None):
    """Differentiable dispatch: q (B, N, C), k (H, P, dh) -> Z (B, H, P, dh)."""
    return DispatchFunction.apply(q, k, mask, drop)[0]


from . import _ops  # noqa: E402  (the launchers as custom ops; imports this module)
