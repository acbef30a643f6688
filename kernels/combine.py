"""Combine (keep_slots=False): each patch takes a softmax-weighted sum of the
expert outputs of its head, attention with the patches as queries:

    out[b, n, h*do:(h+1)*do] = sum_p softmax_p(q[b, n, h] . K[h, p]) Y[b, p, h*do:(h+1)*do]

Forward: one program takes BLOCK_N patches of one head of one bag and streams
the P slots in tiles with an online softmax (P = 300 at the recommended
sizes). Padded patches (mask False) get zero output. Saved for backward:
LSE[b, n, h] = log sum_p exp(L), (B, N, H) in the accumulator dtype (+inf for
a patch whose every slot is dropped: its weights recompute to 0, its output is 0).

Backward (SPEC section 8), as flash attention's, weights recomputed tile by
tile from q, K and the LSE:

    dCw = dO . Y,   dL_c = Cw * (dCw - delta_c),   delta_c[b, n, h] = dO . out
    dq  = sum_p dL_c K[p]                      (_combine_bwd_dq_kernel, per patch tile)
    dK  = sum_{b,n} dL_c q,  dY = sum_n Cw dO  (_combine_bwd_dkdy_kernel, per slot tile
                                                and n-chunk; partials summed by torch)

The dq kernel also computes delta_c from the saved output and stores it
(N * H values) for the dK/dY kernel, which runs after it. Padded patches'
dO counts as 0: their output is the constant 0.
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
def _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P,
             HAS_DROP: tl.constexpr, BLOCK_P: tl.constexpr, P_MAJOR: tl.constexpr):
    """Which logits of the tile of patches offs_n and slots p0 + arange(BLOCK_P)
    take part in the softmax over p: real slots, not slot-dropped.
    (BLOCK_P, BLOCK_N) with P_MAJOR, else (BLOCK_N, BLOCK_P); without HAS_DROP,
    a row or column that broadcasts to it."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    if P_MAJOR:
        ok = (offs_p < P)[:, None]
        if HAS_DROP:
            ok = ok & slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P)
    else:
        ok = (offs_p < P)[None, :]
        if HAS_DROP:
            ok = ok & slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P)
    return ok


@triton.jit
def _row_keep(MASK, b, offs_n, n_end, N, HAS_MASK: tl.constexpr):
    """Real patches: before n_end and, with a mask (B, N), not padding."""
    keep = offs_n < n_end
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * N + offs_n, mask=keep, other=0) != 0)
    return keep


@triton.jit
def _combine_fwd_kernel(
    Q, K, Y, MASK, OUT, LSE,
    N, P, H, SEED, p_drop,
    stride_qb, stride_qn, stride_ob, stride_on,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    seed = load_seed(SEED, HAS_DROP)
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
    q = load_tile(Q + b * stride_qb + h * DH, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        k = load_tile(K + h * P * DH, offs_p, DH, offs_dh, p_ok, dh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_P)
        ok = _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P, HAS_DROP, BLOCK_P, False)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # every slot so far dropped: avoid inf - inf
        alpha = tl.exp2((m_i - m_ref) * LOG2E)
        w = tl.exp2((s - m_ref[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(w, axis=1)
        y = load_tile(Y + b * P * D + h * DO, offs_p, D, offs_do, p_ok, do_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
        acc = acc * alpha[:, None] + tl.dot(w.to(DOT_DTYPE), y, input_precision=INPUT_PRECISION)
        m_i = m_new

    reached = l_i > 0  # False only for a patch whose every slot is dropped
    out = acc / tl.where(reached, l_i, 1.0)[:, None]
    lse = tl.where(reached, m_i + tl.log(tl.where(reached, l_i, 1.0)), float("inf"))
    if HAS_MASK:
        out = tl.where(_row_keep(MASK, b, offs_n, N, N, HAS_MASK)[:, None], out, 0.0)
    tl.store(OUT + b * stride_ob + offs_n[:, None].to(tl.int64) * stride_on + h * DO + offs_do[None, :],
             out.to(OUT.dtype.element_ty), mask=n_ok[:, None] & do_ok[None, :])
    tl.store(LSE + (b * N + offs_n) * H + h, lse, mask=n_ok)


@triton.jit
def _combine_bwd_dq_kernel(
    Q, K, Y, MASK, OUT, DOUT, LSE, DELTA, DQ,
    N, P, H, SEED, p_drop,
    stride_qb, stride_qn, stride_dqb, stride_dqn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DQ: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """BLOCK_N patches of one head of one bag: delta_c = dO . out (stored), and
    with NEED_DQ, dq = sum_p Cw (dO . Y[p] - delta_c) K[p] over all P slots."""
    seed = load_seed(SEED, HAS_DROP)
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
    # dO of padded patches counts as 0: their output is the constant 0
    keep = _row_keep(MASK, b, offs_n, N, N, HAS_MASK)
    ndo_ok = keep[:, None] & do_ok[None, :]
    o_offs = (b * N + offs_n[:, None].to(tl.int64)) * D + h * DO + offs_do[None, :]  # out, dO contiguous (B, N, D)
    do = tl.load(DOUT + o_offs, mask=ndo_ok, other=0.0).to(ACC)  # (BLOCK_N, BLOCK_DO)
    delta = tl.sum(do * tl.load(OUT + o_offs, mask=ndo_ok, other=0.0).to(ACC), axis=1)  # (BLOCK_N,)
    tl.store(DELTA + (b * N + offs_n) * H + h, delta, mask=n_ok)
    if NEED_DQ:
        q = load_tile(Q + b * stride_qb + h * DH, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)
        lse = tl.load(LSE + (b * N + offs_n) * H + h, mask=n_ok, other=float("inf"))  # (BLOCK_N,)
        do = do.to(DOT_DTYPE)
        dq = tl.zeros([BLOCK_N, BLOCK_DH], ACC)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < P
            k = load_tile(K + h * P * DH, offs_p, DH, offs_dh, p_ok, dh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
            y = load_tile(Y + b * P * D + h * DO, offs_p, D, offs_do, p_ok, do_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_P)
            ok = _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P, HAS_DROP, BLOCK_P, False)
            w = tl.where(ok, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)  # Cw
            dcw = tl.dot(do, tl.trans(y), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_P)
            dl = w * (dcw - delta[:, None])
            dq += tl.dot(dl.to(DOT_DTYPE), k, input_precision=INPUT_PRECISION)
        tl.store(DQ + b * stride_dqb + offs_n[:, None].to(tl.int64) * stride_dqn + h * DH + offs_dh[None, :],
                 dq.to(DQ.dtype.element_ty), mask=n_ok[:, None] & dh_ok[None, :])


@triton.jit
def _combine_bwd_dkdy_kernel(
    Q, K, MASK, DOUT, LSE, DELTA, Y, DK_PART, DY_PART,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DK: tl.constexpr, NEED_DY: tl.constexpr,
    DH: tl.constexpr, DO: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (p-block, b*h, n-chunk): partial dK[p] = sum_n dL_c q[n] and
    dY[p] = sum_n Cw dO[n] over the chunk's patches."""
    seed = load_seed(SEED, HAS_DROP)
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = pid_bh // H
    h = pid_bh % H
    D = H * DO
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_do = tl.arange(0, BLOCK_DO)
    p_ok = offs_p < P
    dh_ok = offs_dh < DH
    do_ok = offs_do < DO
    k = load_tile(K + h * P * DH, offs_p, DH, offs_dh, p_ok, dh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
    if NEED_DK:
        y = load_tile(Y + b * P * D + h * DO, offs_p, D, offs_do, p_ok, do_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
    dk = tl.zeros([BLOCK_P, BLOCK_DH], ACC)
    dy = tl.zeros([BLOCK_P, BLOCK_DO], ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        keep = _row_keep(MASK, b, offs_n, n_end, N, HAS_MASK)
        q = load_tile(Q + b * stride_qb + h * DH, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)
        do = tl.load(DOUT + (b * N + offs_n[:, None].to(tl.int64)) * D + h * DO + offs_do[None, :],
                     mask=keep[:, None] & do_ok[None, :], other=0.0).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_DO)
        lse = tl.load(LSE + (b * N + offs_n) * H + h, mask=n_ok, other=float("inf"))  # (BLOCK_N,)
        s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_P, BLOCK_N)
        ok = _slot_ok(seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, N, H, P, HAS_DROP, BLOCK_P, True)
        w = tl.where(ok, tl.exp2((s - lse[None, :]) * LOG2E), 0.0)  # Cw^T
        if NEED_DY:
            dy += tl.dot(w.to(DOT_DTYPE), do, input_precision=INPUT_PRECISION)
        if NEED_DK:
            delta = tl.load(DELTA + (b * N + offs_n) * H + h, mask=n_ok, other=0.0)
            dcw = tl.dot(y, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_P, BLOCK_N)
            dl = w * (dcw - delta[None, :])
            dk += tl.dot(dl.to(DOT_DTYPE), q, input_precision=INPUT_PRECISION)
    part = (pid_bh * n_splits + pid_s) * P + offs_p  # (B*H, n_splits, P)
    if NEED_DK:
        tl.store(DK_PART + part[:, None] * DH + offs_dh[None, :], dk, mask=p_ok[:, None] & dh_ok[None, :])
    if NEED_DY:
        tl.store(DY_PART + part[:, None] * DO + offs_do[None, :], dy, mask=p_ok[:, None] & do_ok[None, :])


def combine_meta(n: int, p: int, dh: int, do: int, dtype: torch.dtype) -> dict:
    """Forward: BLOCK_N patches a program, the P slots streamed in tiles."""
    return dict(BLOCK_N=64, BLOCK_P=block(p, maximum=64), BLOCK_DH=block(dh), BLOCK_DO=block(do),
                num_warps=4, num_stages=2)


def combine_dq_meta(n: int, p: int, dh: int, do: int, dtype: torch.dtype) -> dict:
    """dq: the forward's tiles; fp32 on 8 warps, as its FMA dots on 4 sit at
    ptxas's 255-register ceiling on sm_90a (one more tile would spill)."""
    return {**combine_meta(n, p, dh, do, dtype), "num_warps": 4 if dtype.itemsize <= 2 else 8}


def combine_dkdy_meta(n: int, p: int, dh: int, do: int, bh: int, dtype: torch.dtype, sm_count: int = 132) -> dict:
    """dK/dY: programs along P and B*H are few (5 * 16 for one bag at the
    recommended sizes), so n is split until the grid covers the GPU about four
    times over, keeping at least four n-tiles per chunk (as the dispatch).
    64 x 64 (BLOCK_P x BLOCK_N) tiles for 16-bit inputs; fp32's IEEE dots are
    FMA loops on operands in registers, and spill there on sm_90a: 64 x 32
    tiles on 8 warps, unpipelined."""
    block_p = block(p, maximum=64)
    half = dtype.itemsize <= 2
    block_n = 64 if half else 32
    tiles = triton.cdiv(n, block_n)
    programs = triton.cdiv(p, block_p) * bh
    n_splits = max(1, min(triton.cdiv(4 * sm_count, programs), triton.cdiv(tiles, 4)))
    n_per_split = triton.cdiv(tiles, n_splits) * block_n
    return dict(BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_DH=block(dh), BLOCK_DO=block(do),
                n_splits=triton.cdiv(n, n_per_split), n_per_split=n_per_split, num_warps=4 if half else 8,
                num_stages=2 if half else 1)


def _common_args(q: torch.Tensor, mask, drop) -> tuple:
    seed, p_drop = (seed_tensor(drop[0], q.device), kernel_p_drop(drop[1])) if drop is not None else (q, 0.0)
    mask_arg = mask.contiguous().view(torch.uint8) if mask is not None else q
    consts = dict(HAS_MASK=mask is not None, HAS_DROP=drop is not None, DOT_DTYPE=dot_dtype(q.dtype),
                  INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[acc_dtype(q.dtype)])
    return mask_arg, seed, p_drop, consts


@on_device
def combine_forward(q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                    out_dtype: torch.dtype, drop=None):
    """q (B, N, C) unit stride along C; k (H, P, dh) and y (B, P, D) in the
    accumulator dtype; mask (B, N) bool or None; drop (seed, p) of slot
    dropout or None. Returns out (B, N, D) in out_dtype and LSE (B, N, H) in
    the accumulator dtype."""
    check_device(q, k, y)
    bsz, n, _ = q.shape
    h, p, dh = k.shape
    d = y.shape[2]
    do = d // h
    assert q.stride(2) == 1 and k.is_contiguous() and y.is_contiguous()
    meta = combine_meta(n, p, dh, do, q.dtype)
    out = torch.empty(bsz, n, d, device=q.device, dtype=out_dtype)
    lse = torch.empty(bsz, n, h, device=q.device, dtype=acc_dtype(q.dtype))
    mask_arg, seed, p_drop, consts = _common_args(q, mask, drop)
    traceable(_combine_fwd_kernel)[(triton.cdiv(n, meta["BLOCK_N"]), h, bsz)](
        q, k, y, mask_arg, out, lse,
        n, p, h, seed, p_drop, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        DH=dh, DO=do, **consts, **meta,
    )
    return out, lse


@on_device
def combine_backward(dout, q, k, y, out, lse, mask, drop, need_dq: bool, need_dk: bool, need_dy: bool):
    """dO (B, N, D) -> dq (B, N, C) in q's dtype, dK (H, P, dh) and dY (B, P, D)
    in the accumulator dtype; None where not needed. dK and dY are reduced
    over n-chunks (and bags, for dK) from per-program partials: deterministic."""
    bsz, n, c = q.shape
    h, p, dh = k.shape
    d = y.shape[2]
    do = d // h
    dout = dout.contiguous()
    mask_arg, seed, p_drop, consts = _common_args(q, mask, drop)
    acc = dict(device=q.device, dtype=acc_dtype(q.dtype))
    dq = dk = dy = None
    delta = torch.empty(bsz, n, h, **acc)  # delta_c: N * H values
    if need_dq or need_dk:
        meta = combine_dq_meta(n, p, dh, do, q.dtype)
        dq = torch.empty(bsz, n, c, device=q.device, dtype=q.dtype) if need_dq else None
        dq_arg = dq if need_dq else q
        traceable(_combine_bwd_dq_kernel)[(triton.cdiv(n, meta["BLOCK_N"]), h, bsz)](
            q, k, y, mask_arg, out, dout, lse, delta, dq_arg,
            n, p, h, seed, p_drop, q.stride(0), q.stride(1), dq_arg.stride(0), dq_arg.stride(1),
            NEED_DQ=need_dq, DH=dh, DO=do, **consts, **meta,
        )
    if need_dk or need_dy:
        meta = combine_dkdy_meta(n, p, dh, do, bsz * h, q.dtype, sm_count(q.device))
        n_splits = meta.pop("n_splits")
        n_per_split = meta.pop("n_per_split")
        dk_part = torch.empty(bsz, h, n_splits, p, dh, **acc) if need_dk else delta
        dy_part = torch.empty(bsz, h, n_splits, p, do, **acc) if need_dy else delta
        traceable(_combine_bwd_dkdy_kernel)[(triton.cdiv(p, meta["BLOCK_P"]), bsz * h, n_splits)](
            q, k, mask_arg, dout, lse, delta, y, dk_part, dy_part,
            n, p, h, n_per_split, seed, p_drop, q.stride(0), q.stride(1),
            NEED_DK=need_dk, NEED_DY=need_dy, DH=dh, DO=do, **consts, **meta,
        )
        if need_dk:
            dk = dk_part.sum(dim=(0, 2))  # (H, P, dh)
        if need_dy:
            dy = dy_part.sum(dim=2).permute(0, 2, 1, 3).reshape(bsz, p, d)  # (B, H, P, do) -> (B, P, D)
    return dq, dk, dy


class CombineFunction(torch.autograd.Function):
    """out = combine(q, K, Y) (B, N, D); saves q, K, Y, out and LSE (B, N, H):
    no N*H*P tensor."""

    @staticmethod
    def forward(ctx, q, k, y, mask, drop, out_dtype):
        seed, ctx.p_drop = _ops.drop_args(drop, q)
        out, lse = _ops.combine_forward(q, k, y, mask, out_dtype, _ops.make_drop(seed, ctx.p_drop))
        ctx.save_for_backward(q, k, y, out, lse, mask, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, y, out, lse, mask, seed = ctx.saved_tensors
        drop = _ops.make_drop(seed, ctx.p_drop)
        dq, dk, dy = _ops.combine_backward(dout, q, k, y, out, lse, mask, drop, *ctx.needs_input_grad[:3])
        return dq, dk, dy, None, None, None


def combine(q, k, y, mask=None, drop=None, out_dtype=None):
    """Differentiable combine: q (B, N, C), K (H, P, dh), Y (B, P, D) -> out (B, N, D)."""
    return CombineFunction.apply(q, k, y, mask, drop, out_dtype or q.dtype)


from . import _ops  # noqa: E402  (the launchers as custom ops; imports this module)
