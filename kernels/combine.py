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
dO counts as 0: their output is the constant 0. (A fused backward computing
dq, dK and dY from one exponential pass, as dispatch's, holds dK and dY of
all P slots, P x (dh + do) accumulators: at the recommended sizes it spilled
on sm_90a at every tile size and warp count tried.) Where the fused routing
backward runs (keep_slots=False in bf16, ``dispatch.routing_bwd_fused_ok``),
combine's dq and dK come from dispatch's backward kernel instead, and these
kernels give dY alone, and (``far_gmax``) the dq and dK of the far patches the
rescale of that kernel cannot reach (``_far_rows``; with realistic logits
none, and their programs only read the LSE).
The forward's weights are exp2 of one FMA per logit (``_tiles.exp_minus``)
outside the legacy plan.

Head widths: outputs are written in slices (out and dY in BLOCK_DO-wide slices
of do, dq and dK in BLOCK_DH-wide slices of dh), one program each; where dh
or do is wider than one tile, the products over it (the logits q . K, and
dO . Y) are streamed in chunks (``dot_rows``) and recomputed per slice.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import LOG2E as LOG2E_
from ._launch import (Ladder, acc_dtype, block, candidates, cap, check_device, choose, dot_consts, launch,
                      mask_arg, on_device, slot_block, split_n)
from ._slot_dropout import fast_rng, kernel_p_drop, load_seed, seed_tensor, slot_keep_np, slot_keep_pn
from ._tiles import dot_rows, exp_minus, load_tile, mm, mma

LOG2E = tl.constexpr(LOG2E_)


@triton.jit
def _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P,
             HAS_DROP: tl.constexpr, BLOCK_P: tl.constexpr, P_MAJOR: tl.constexpr, FAST_RNG: tl.constexpr):
    """Which logits of the tile of patches offs_n and slots p0 + arange(BLOCK_P)
    take part in the softmax over p: real slots, not slot-dropped.
    (BLOCK_P, BLOCK_N) with P_MAJOR, else (BLOCK_N, BLOCK_P); without HAS_DROP,
    a row or column that broadcasts to it."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    if P_MAJOR:
        ok = (offs_p < P)[:, None]
        if HAS_DROP:
            ok = ok & slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
    else:
        ok = (offs_p < P)[None, :]
        if HAS_DROP:
            ok = ok & slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
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
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr, NUM_VO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    FOLD_LOG2E: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """A do-slice of out for BLOCK_N patches of one head of one bag, all P slots streamed."""
    seed = load_seed(SEED, HAS_DROP)
    pid_n = tl.program_id(0) // NUM_VO
    pid_v = tl.program_id(0) % NUM_VO
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    D = H * DO

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_vo = pid_v * BLOCK_DO + tl.arange(0, BLOCK_DO)  # this program's slice of do
    n_ok = offs_n < N
    dh_ok = offs_dh < DH
    vo_ok = offs_vo < DO
    q_base = Q + b * stride_qb + h * DH
    k_base = K + h * P * DH
    if DH <= BLOCK_DH:
        q = load_tile(q_base, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        if DH <= BLOCK_DH:
            k = load_tile(k_base, offs_p, DH, offs_dh, p_ok, dh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
            s = mm(q, tl.trans(k), INPUT_PRECISION, ACC)  # (BLOCK_N, BLOCK_P)
        else:
            s = dot_rows(q_base, stride_qn, offs_n, n_ok, k_base, DH, offs_p, p_ok, DH, BLOCK_DH,
                         DOT_DTYPE, INPUT_PRECISION, ACC)
        ok = _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P, HAS_DROP, BLOCK_P, False, FAST_RNG)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # every slot so far dropped: avoid inf - inf
        alpha = tl.exp2((m_i - m_ref) * LOG2E)
        w = exp_minus(s, m_ref[:, None], FOLD_LOG2E)
        l_i = l_i * alpha + tl.sum(w, axis=1)
        y = load_tile(Y + b * P * D + h * DO, offs_p, D, offs_vo, p_ok, vo_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
        acc = mma(w.to(DOT_DTYPE), y, acc * alpha[:, None], INPUT_PRECISION, ACC)
        m_i = m_new

    reached = l_i > 0  # False only for a patch whose every slot is dropped
    out = acc / tl.where(reached, l_i, 1.0)[:, None]
    lse = tl.where(reached, m_i + tl.log(tl.where(reached, l_i, 1.0)), float("inf"))
    if HAS_MASK:
        out = tl.where(_row_keep(MASK, b, offs_n, N, N, HAS_MASK)[:, None], out, 0.0)
    tl.store(OUT + b * stride_ob + offs_n[:, None].to(tl.int64) * stride_on + h * DO + offs_vo[None, :],
             out.to(OUT.dtype.element_ty), mask=n_ok[:, None] & vo_ok[None, :])
    if pid_v == 0:  # the same for every slice: the first stores it
        tl.store(LSE + (b * N + offs_n) * H + h, lse, mask=n_ok)


@triton.jit
def _far_rows(LSE, GMAX, b, h, offs_n, n_ok, N, H, RESCALE_MAX_LOG2: tl.constexpr):
    """The patches of a tile whose combine weights the fused routing backward
    leaves out (``dispatch._combine_rows``): (g - LSE_c) log2(e) > RESCALE_MAX_LOG2."""
    lse = tl.load(LSE + (b * N + offs_n) * H + h, mask=n_ok, other=float("inf"))
    return n_ok & ((tl.load(GMAX + b * H + h) - lse) * LOG2E > RESCALE_MAX_LOG2)


@triton.jit
def _combine_bwd_dq_kernel(
    Q, K, Y, MASK, OUT, DOUT, LSE, DELTA, DQ, GMAX,
    N, P, H, SEED, p_drop,
    stride_qb, stride_qn, stride_dqb, stride_dqn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DQ: tl.constexpr, FAR: tl.constexpr,
    RESCALE_MAX_LOG2: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr,
    NUM_VH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_DO: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    FAST_RNG: tl.constexpr,
):
    """BLOCK_N patches of one head of one bag: delta_c = dO . out (stored), and
    with NEED_DQ, a dh-slice of dq = sum_p Cw (dO . Y[p] - delta_c) K[p] over all
    P slots. FAR: only the far patches (``_far_rows``; a tile without one does
    nothing), whose dq rows the fused routing backward then adds to its own."""
    pid_n = tl.program_id(0) // NUM_VH
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # dO of padded patches counts as 0: their output is the constant 0
    keep = _row_keep(MASK, b, offs_n, N, N, HAS_MASK)
    if FAR:
        keep = keep & _far_rows(LSE, GMAX, b, h, offs_n, offs_n < N, N, H, RESCALE_MAX_LOG2)
        if tl.max(keep.to(tl.int32), axis=0) > 0:
            _combine_dq_rows(Q, K, Y, OUT, DOUT, LSE, DELTA, DQ, SEED, p_drop, b, h, offs_n, keep, N, P, H,
                             stride_qb, stride_qn, stride_dqb, stride_dqn, HAS_DROP, NEED_DQ, DH, DO, NUM_VH,
                             BLOCK_P, BLOCK_DH, BLOCK_DO, DOT_DTYPE, INPUT_PRECISION, ACC, FAST_RNG)
    else:
        _combine_dq_rows(Q, K, Y, OUT, DOUT, LSE, DELTA, DQ, SEED, p_drop, b, h, offs_n, keep, N, P, H,
                         stride_qb, stride_qn, stride_dqb, stride_dqn, HAS_DROP, NEED_DQ, DH, DO, NUM_VH,
                         BLOCK_P, BLOCK_DH, BLOCK_DO, DOT_DTYPE, INPUT_PRECISION, ACC, FAST_RNG)


@triton.jit
def _combine_dq_rows(Q, K, Y, OUT, DOUT, LSE, DELTA, DQ, SEED, p_drop, b, h, offs_n, keep, N, P, H,
                     stride_qb, stride_qn, stride_dqb, stride_dqn,
                     HAS_DROP: tl.constexpr, NEED_DQ: tl.constexpr, DH: tl.constexpr,
                     DO: tl.constexpr, NUM_VH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_DH: tl.constexpr,
                     BLOCK_DO: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     ACC: tl.constexpr, FAST_RNG: tl.constexpr):
    """``_combine_bwd_dq_kernel``'s work on its tile, the patches ``keep`` taking
    part (dO counts as 0 elsewhere)."""
    seed = load_seed(SEED, HAS_DROP)
    pid_v = tl.program_id(0) % NUM_VH
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    D = H * DO
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_vh = pid_v * BLOCK_DH + tl.arange(0, BLOCK_DH)  # this program's slice of dh
    offs_do = tl.arange(0, BLOCK_DO)
    n_ok = offs_n < N
    dh_ok = offs_dh < DH
    vh_ok = offs_vh < DH
    do_ok = offs_do < DO
    o_base = b * N * D + h * DO  # out and dO: contiguous (B, N, D)
    delta = tl.zeros([BLOCK_N], ACC)
    for d0 in range(0, DO, BLOCK_DO):
        do_c = load_tile(DOUT + o_base + d0, offs_n, D, offs_do, keep, d0 + offs_do < DO).to(ACC)
        delta += tl.sum(do_c * load_tile(OUT + o_base + d0, offs_n, D, offs_do, keep, d0 + offs_do < DO).to(ACC), 1)
    if pid_v == 0:
        tl.store(DELTA + (b * N + offs_n) * H + h, delta, mask=n_ok)
    if NEED_DQ:
        q_base = Q + b * stride_qb + h * DH
        k_base = K + h * P * DH
        y_base = Y + b * P * D + h * DO
        if DH <= BLOCK_DH:
            q = load_tile(q_base, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)
        if DO <= BLOCK_DO:
            do = load_tile(DOUT + o_base, offs_n, D, offs_do, keep, do_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_DO)
        lse = tl.load(LSE + (b * N + offs_n) * H + h, mask=n_ok, other=float("inf"))  # (BLOCK_N,)
        dq = tl.zeros([BLOCK_N, BLOCK_DH], ACC)
        for p0 in range(0, P, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            p_ok = offs_p < P
            kv = load_tile(k_base, offs_p, DH, offs_vh, p_ok, vh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
            if DH <= BLOCK_DH:
                s = mm(q, tl.trans(kv), INPUT_PRECISION, ACC)  # (BLOCK_N, BLOCK_P)
            else:
                s = dot_rows(q_base, stride_qn, offs_n, n_ok, k_base, DH, offs_p, p_ok, DH, BLOCK_DH,
                             DOT_DTYPE, INPUT_PRECISION, ACC)
            if DO <= BLOCK_DO:
                y = load_tile(y_base, offs_p, D, offs_do, p_ok, do_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
                dcw = mm(do, tl.trans(y), INPUT_PRECISION, ACC)  # (BLOCK_N, BLOCK_P)
            else:
                dcw = dot_rows(DOUT + o_base, D, offs_n, keep, y_base, D, offs_p, p_ok, DO, BLOCK_DO,
                               DOT_DTYPE, INPUT_PRECISION, ACC)
            ok = _slot_ok(seed, p_drop, b, offs_n, h, p0, N, H, P, HAS_DROP, BLOCK_P, False, FAST_RNG)
            w = tl.where(ok, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)  # Cw
            dl = w * (dcw - delta[:, None])
            dq = mma(dl.to(DOT_DTYPE), kv, dq, INPUT_PRECISION, ACC)
        tl.store(DQ + b * stride_dqb + offs_n[:, None].to(tl.int64) * stride_dqn + h * DH + offs_vh[None, :],
                 dq.to(DQ.dtype.element_ty), mask=n_ok[:, None] & vh_ok[None, :])


@triton.jit
def _combine_bwd_dkdy_kernel(
    Q, K, MASK, DOUT, LSE, DELTA, Y, DK_PART, DY_PART, GMAX,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DK: tl.constexpr, NEED_DY: tl.constexpr,
    FAR: tl.constexpr, RESCALE_MAX_LOG2: tl.constexpr,
    DH: tl.constexpr, DO: tl.constexpr, NUM_V: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_DO: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """One (p-block x slice v, b*h, n-chunk): partial dK[p] = sum_n dL_c q[n] in
    the v-th dh-slice and dY[p] = sum_n Cw dO[n] in the v-th do-slice (a slice
    past the end of its width stores nothing), over the chunk's patches. FAR:
    over its far patches only (``_far_rows``), tiles without one skipped."""
    seed = load_seed(SEED, HAS_DROP)
    pid_p = tl.program_id(0) // NUM_V
    pid_v = tl.program_id(0) % NUM_V
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = pid_bh // H
    h = pid_bh % H
    D = H * DO
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_do = tl.arange(0, BLOCK_DO)
    offs_vh = pid_v * BLOCK_DH + offs_dh  # this program's slice of dh (for dK) ...
    offs_vo = pid_v * BLOCK_DO + offs_do  # ... and of do (for dY)
    p_ok = offs_p < P
    dh_ok = offs_dh < DH
    do_ok = offs_do < DO
    vh_ok = offs_vh < DH
    vo_ok = offs_vo < DO
    q_base = Q + b * stride_qb + h * DH
    k_base = K + h * P * DH
    y_base = Y + b * P * D + h * DO
    do_base = DOUT + b * N * D + h * DO  # dO contiguous (B, N, D)
    if DH <= BLOCK_DH:
        k = load_tile(k_base, offs_p, DH, offs_dh, p_ok, dh_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DH)
    if NEED_DK:
        if DO <= BLOCK_DO:
            y = load_tile(y_base, offs_p, D, offs_do, p_ok, do_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_DO)
    dk = tl.zeros([BLOCK_P, BLOCK_DH], ACC)
    dy = tl.zeros([BLOCK_P, BLOCK_DO], ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        keep = _row_keep(MASK, b, offs_n, n_end, N, HAS_MASK)
        runs = 1
        if FAR:  # the tile once if it holds a far patch, else not at all
            keep = keep & _far_rows(LSE, GMAX, b, h, offs_n, n_ok, N, H, RESCALE_MAX_LOG2)
            runs = tl.max(keep.to(tl.int32), axis=0)
        for _ in range(runs):
            lse = tl.load(LSE + (b * N + offs_n) * H + h, mask=n_ok, other=float("inf"))  # (BLOCK_N,)
            if DH <= BLOCK_DH:  # one slice: the whole head
                qv = load_tile(q_base, offs_n, stride_qn, offs_dh, n_ok, dh_ok).to(DOT_DTYPE)
                s = mm(k, tl.trans(qv), INPUT_PRECISION, ACC)  # (BLOCK_P, BLOCK_N)
            else:
                qv = load_tile(q_base, offs_n, stride_qn, offs_vh, n_ok, vh_ok).to(DOT_DTYPE)
                s = dot_rows(k_base, DH, offs_p, p_ok, q_base, stride_qn, offs_n, n_ok, DH, BLOCK_DH,
                             DOT_DTYPE, INPUT_PRECISION, ACC)
            ok = _slot_ok(seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, N, H, P, HAS_DROP, BLOCK_P, True, FAST_RNG)
            w = tl.where(ok, tl.exp2((s - lse[None, :]) * LOG2E), 0.0)  # Cw^T
            if DO <= BLOCK_DO:
                dov = load_tile(do_base, offs_n, D, offs_do, keep, do_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_DO)
            else:
                dov = load_tile(do_base, offs_n, D, offs_vo, keep, vo_ok).to(DOT_DTYPE)
            if NEED_DY:
                dy = mma(w.to(DOT_DTYPE), dov, dy, INPUT_PRECISION, ACC)
            if NEED_DK:  # delta_c of the patches taking part (0 elsewhere, as their dO)
                delta = tl.load(DELTA + (b * N + offs_n) * H + h, mask=keep, other=0.0)
                if DO <= BLOCK_DO:
                    dcw = mm(y, tl.trans(dov), INPUT_PRECISION, ACC)  # (BLOCK_P, BLOCK_N)
                else:
                    dcw = dot_rows(y_base, D, offs_p, p_ok, do_base, D, offs_n, keep, DO, BLOCK_DO,
                                   DOT_DTYPE, INPUT_PRECISION, ACC)
                dl = w * (dcw - delta[None, :])
                dk = mma(dl.to(DOT_DTYPE), qv, dk, INPUT_PRECISION, ACC)
    part = (pid_bh * n_splits + pid_s) * P + offs_p  # (B*H, n_splits, P)
    if NEED_DK:
        tl.store(DK_PART + part[:, None] * DH + offs_vh[None, :], dk, mask=p_ok[:, None] & vh_ok[None, :])
    if NEED_DY:
        tl.store(DY_PART + part[:, None] * DO + offs_vo[None, :], dy, mask=p_ok[:, None] & vo_ok[None, :])


# ------------------------------------------------------------------ tile sizes
def _head_blocks(dh: int, do: int, dtype: torch.dtype) -> dict:
    """Slices of dh and do: up to 64 wide for 16-bit inputs, 32 for fp32 (wider
    FMA tiles spill), 16 for fp64."""
    block_dh = block(dh, maximum=cap(dtype, 64, 32))
    block_do = block(do, maximum=cap(dtype, 64, 32))
    return dict(BLOCK_DH=block_dh, BLOCK_DO=block_do)


def _wide(dh: int, do: int, heads: dict) -> bool:
    """Whether dh or do spans several slices (their products streamed in chunks)."""
    return dh > heads["BLOCK_DH"] or do > heads["BLOCK_DO"]


def combine_meta(p: int, dh: int, do: int, dtype: torch.dtype, legacy: bool = False) -> dict:
    """Forward: BLOCK_N patches a program and do-slice, the P slots streamed in
    tiles (``slot_block``; the legacy plan: the power of two up to 64); fp32 on
    8 warps (its FMA dots spill a few bytes on 4 at some sizes), and on
    32-patch tiles where dh or do spans several slices."""
    heads = _head_blocks(dh, do, dtype)
    wide = _wide(dh, do, heads)
    block_p = block(p, maximum=cap(dtype, 64, 64)) if legacy else slot_block(p, maximum=cap(dtype, 64, 64))
    return dict(BLOCK_N=cap(dtype, 64, 32 if wide else 64), BLOCK_P=block_p,
                NUM_VO=triton.cdiv(do, heads["BLOCK_DO"]), **heads, num_warps=4 if dtype.itemsize <= 2 else 8,
                num_stages=2)


def combine_dq_meta(p: int, dh: int, do: int, dtype: torch.dtype) -> dict:
    """dq: the forward's tiles, per dh-slice; fp32 on 8 warps, as its FMA dots
    on 4 sit at ptxas's 255-register ceiling on sm_90a, and where dh or do
    spans several slices, 16-bit on 8 warps and fp32 on 32 x 32 tiles, unpipelined."""
    meta = combine_meta(p, dh, do, dtype, legacy=True)
    del meta["NUM_VO"]
    wide = _wide(dh, do, meta)
    half = dtype.itemsize <= 2
    return {**meta, "NUM_VH": triton.cdiv(dh, meta["BLOCK_DH"]), "num_warps": 4 if half and not wide else 8,
            **({"BLOCK_N": 32, "BLOCK_P": block(p, maximum=32), "num_stages": 1}
               if wide and dtype == torch.float32 else {})}


def combine_dkdy_meta(p: int, dh: int, do: int, dtype: torch.dtype) -> dict:
    """dK/dY partials: 64 x 64 (BLOCK_P x BLOCK_N) tiles for 16-bit inputs;
    fp32's IEEE dots are FMA loops on operands in registers, and spill there on
    sm_90a: 64 x 32 tiles on 8 warps, unpipelined. Where dh or do spans several
    slices, 32-slot tiles on 8 warps. Slice v of a program covers dK's v-th
    dh-slice and dY's v-th do-slice."""
    half = dtype.itemsize <= 2
    heads = _head_blocks(dh, do, dtype)
    num_v = max(triton.cdiv(dh, heads["BLOCK_DH"]), triton.cdiv(do, heads["BLOCK_DO"]))
    wide = _wide(dh, do, heads)
    return dict(BLOCK_P=block(p, maximum=cap(dtype, 32 if wide else 64, 32 if wide else 64)),
                BLOCK_N=cap(dtype, 64, 32), NUM_V=num_v, **heads, num_warps=4 if half and not wide else 8,
                num_stages=2 if half else 1)


@functools.lru_cache(maxsize=None)
def combine_metas(p: int, dh: int, do: int, dtype: torch.dtype, legacy: bool = False) -> Ladder:
    """Tile candidates (``_launch.choose`` takes the first that compiles without
    spills): the meta above, then smaller tiles."""
    return candidates(combine_meta(p, dh, do, dtype, legacy), ("BLOCK_N", "BLOCK_P"))


@functools.lru_cache(maxsize=None)
def combine_dq_metas(p: int, dh: int, do: int, dtype: torch.dtype) -> Ladder:
    return candidates(combine_dq_meta(p, dh, do, dtype), ("BLOCK_N", "BLOCK_P"))


@functools.lru_cache(maxsize=None)
def combine_dkdy_metas(p: int, dh: int, do: int, dtype: torch.dtype) -> Ladder:
    return candidates(combine_dkdy_meta(p, dh, do, dtype), ("BLOCK_P", "BLOCK_N"))


# ------------------------------------------------------------------ launchers
def _common_args(q: torch.Tensor, mask, drop, legacy: bool) -> dict:
    """The mask (bool; an input stands in for an absent one, never a buffer a
    kernel writes), the slot-dropout (seed, p) and its generator, and the dtype constexprs."""
    seed, p_drop = (seed_tensor(drop[0], q.device), kernel_p_drop(drop[1])) if drop is not None else (q, 0.0)
    return dict(MASK=mask_arg(mask) if mask is not None else q, SEED=seed, p_drop=p_drop,
                HAS_MASK=mask is not None, HAS_DROP=drop is not None, FAST_RNG=fast_rng(drop, legacy),
                **dot_consts(q.dtype))


@on_device
def combine_forward(q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                    out_dtype: torch.dtype, drop=None, legacy: bool = False):
    """q (B, N, C) unit stride along C; k (H, P, dh) and y (B, P, D) in the
    accumulator dtype; mask (B, N) bool or None; drop (seed, p) of slot
    dropout or None; legacy: the legacy kernel plan. Returns out (B, N, D) in
    out_dtype and LSE (B, N, H) (natural log) in the accumulator dtype."""
    check_device(q, k, y)
    bsz, n, _ = q.shape
    h, p, dh = k.shape
    d = y.shape[2]
    do = d // h
    assert q.stride(2) == 1 and k.is_contiguous() and y.is_contiguous()
    out = torch.empty(bsz, n, d, device=q.device, dtype=out_dtype)
    lse = torch.empty(bsz, n, h, device=q.device, dtype=acc_dtype(q.dtype))
    args = dict(Q=q, K=k, Y=y, OUT=out, LSE=lse, N=n, P=p, H=h, stride_qb=q.stride(0), stride_qn=q.stride(1),
                stride_ob=out.stride(0), stride_on=out.stride(1), DH=dh, DO=do, FOLD_LOG2E=not legacy,
                **_common_args(q, mask, drop, legacy))
    meta, _ = choose(_combine_fwd_kernel, q.device, args, combine_metas(p, dh, do, q.dtype, legacy))
    launch(_combine_fwd_kernel, (triton.cdiv(n, meta["BLOCK_N"]) * meta["NUM_VO"], h, bsz), **args, **meta)
    return out, lse


@on_device
def combine_backward(dout, q, k, y, out, lse, mask, drop, need_dq: bool, need_dk: bool, need_dy: bool,
                     legacy: bool = False, far_gmax: torch.Tensor | None = None):
    """dO (B, N, D) -> dq (B, N, C) in q's dtype, dK (H, P, dh) and dY (B, P, D)
    in the accumulator dtype; None where not needed. dK and dY are reduced
    over n-chunks (and bags, for dK) from per-program partials: deterministic.
    ``legacy`` picks the slot-dropout generator of the forward's plan.

    ``far_gmax``, g (B, H, 1) of the dispatch LSE (``_launch.finite_max``): the
    far patches' part only, which the fused routing backward leaves out
    (``_far_rows``): dq in their rows (others unwritten; the fused kernel adds
    these rows to its dq) and their dK; no dY. Programs and tiles without a far patch do nothing."""
    bsz, n, c = q.shape
    h, p, dh = k.shape
    d = y.shape[2]
    do = d // h
    dout = dout.contiguous()
    far = far_gmax is not None
    common = dict(Q=q, K=k, Y=y, DOUT=dout, LSE=lse, N=n, P=p, H=h, stride_qb=q.stride(0), stride_qn=q.stride(1),
                  DH=dh, DO=do, FAR=far, RESCALE_MAX_LOG2=_launch.RESCALE_MAX_LOG2,
                  GMAX=far_gmax if far else lse, **_common_args(q, mask, drop, legacy))
    acc = dict(device=q.device, dtype=acc_dtype(q.dtype))
    dq = dk = dy = None
    delta = torch.empty(bsz, n, h, **acc) if need_dq or need_dk else lse  # delta_c: N * H values (lse stands in)
    if need_dq or need_dk:
        dq = torch.empty(bsz, n, c, device=q.device, dtype=q.dtype) if need_dq else None
        dq_arg = dq if need_dq else q  # q stands in: never written without NEED_DQ
        args = dict(OUT=out, DELTA=delta, DQ=dq_arg, stride_dqb=dq_arg.stride(0), stride_dqn=dq_arg.stride(1),
                    NEED_DQ=need_dq, **common)
        meta, _ = choose(_combine_bwd_dq_kernel, q.device, args, combine_dq_metas(p, dh, do, q.dtype))
        launch(_combine_bwd_dq_kernel, (triton.cdiv(n, meta["BLOCK_N"]) * meta["NUM_VH"], h, bsz), **args, **meta)
    need_dy = need_dy and not far
    if need_dk or need_dy:
        args = dict(DELTA=delta, NEED_DK=need_dk, NEED_DY=need_dy, **common)
        meta, resident = choose(_combine_bwd_dkdy_kernel, q.device,
                                {**args, "DK_PART": delta, "DY_PART": delta, "n_per_split": 64},
                                combine_dkdy_metas(p, dh, do, q.dtype))
        blocks = triton.cdiv(p, meta["BLOCK_P"]) * meta["NUM_V"]
        args.update(meta)
        n_splits, n_per_split = split_n(n, meta["BLOCK_N"], blocks * bsz * h, resident)
        # an absent partial: an input stands in, never a buffer a kernel writes; FAR: tiles
        # without a far patch add nothing, so the partials start at 0
        dk_part = (torch.zeros if far else torch.empty)(bsz, h, n_splits, p, dh, **acc) if need_dk else lse
        dy_part = torch.empty(bsz, h, n_splits, p, do, **acc) if need_dy else lse
        launch(_combine_bwd_dkdy_kernel, (blocks, bsz * h, n_splits), DK_PART=dk_part, DY_PART=dy_part,
               n_per_split=n_per_split, **args)
        if need_dk:
            dk = dk_part.sum(dim=(0, 2))  # (H, P, dh)
        if need_dy:
            dy = dy_part.sum(dim=2).permute(0, 2, 1, 3).reshape(bsz, p, d)  # (B, H, P, do) -> (B, P, D)
    return dq, dk, dy
