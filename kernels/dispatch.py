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

Head widths: a program accumulates a BLOCK_D-wide slice of Z (or dq, dK). When
dh fits one slice (dh <= BLOCK_D, every recommended size) the logits are one
dot per tile; a wider head (dh up to C = 1024 at H = 1) is cut into dh /
BLOCK_D slices, one program each, and each program streams the logits' dh
products in BLOCK_D chunks (``dot_rows``): the exponentials are recomputed per
slice, which is cheap exactly where dh is wide (H, and so N * H * P, small).

Softmax weights are exp2 of one FMA per logit, s * log2(e) - m * log2(e),
the second product taken once per row (``exp_minus``); the legacy plan
subtracts and multiplies per logit.

Backward (SPEC section 8), weights recomputed tile by tile from q, K and LSE:
one kernel per n-chunk of a (b, h) evaluates each weight once and gives both
the dq of its patches and a partial dK over its chunk (``_dispatch_bwd_kernel``,
where the P x dh state of a head fits in registers: ``dispatch_bwd_fused_ok``);
elsewhere, and in the legacy plan (``_launch.legacy_kernels``), a dq kernel per
patch tile (all P slots streamed) and a dK kernel per slot tile and n-chunk,
each recomputing the weights. The dK partials are summed by torch:
deterministic.

With keep_slots=False the same logits carry combine's softmax over p, and
the fused kernel also gives combine's dq and dK (COMBINE; bf16 and fp64,
``routing_bwd_fused_ok``): Cw = Dw exp(LSE_d - g) exp(g - LSE_c) (g the
head's largest LSE_d), one exponential per logit for both softmaxes, and
combine's dO . Y products accumulate into the tile of dispatch's dZ . q. The
patches whose combine weights lie beyond that rescale's reach
(``_launch.RESCALE_MAX_LOG2``) take combine's own kernels.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _launch
from . import combine as _combine
from ._launch import LOG2E as LOG2E_
from ._launch import (TL_TO_TORCH, Ladder, acc_dtype, block, candidates, cap, check_device, choose, dot_consts,
                      dot_dtype, finite_max, launch, mask_arg, on_device, slot_block, spill_free, split_n)
from ._slot_dropout import fast_rng, kernel_p_drop, load_seed, seed_tensor, slot_keep_np, slot_keep_pn
from ._tiles import dot_rows, exp_minus, load_tile, mm, mma

LOG2E = tl.constexpr(LOG2E_)


@triton.jit
def _patch_ok(MASK, seed, p_drop, b, offs_n, h, p0, n_end, N, H, P,
              HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, BLOCK_P: tl.constexpr, P_MAJOR: tl.constexpr,
              FAST_RNG: tl.constexpr):
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
            ok = ok & slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
    else:
        ok = ok[:, None]
        if HAS_DROP:
            ok = ok & slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
    return ok


@triton.jit
def _dispatch_partial_kernel(
    Q, K, MASK, M_PART, L_PART, ACC_PART,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr, NUM_DV: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    FOLD_LOG2E: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """One (p-block x dh-slice, b*h, n-chunk): partial (m, l, acc) over the chunk's patches."""
    seed = load_seed(SEED, HAS_DROP)
    pid_p = tl.program_id(0) // NUM_DV
    pid_v = tl.program_id(0) % NUM_DV
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = pid_bh // H
    h = pid_bh % H

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_v = pid_v * BLOCK_D + tl.arange(0, BLOCK_D)  # this program's slice of dh
    p_ok = offs_p < P
    v_ok = offs_v < DH
    k_base = K + h * P * DH  # K (H, P, DH) contiguous
    q_base = Q + b * stride_qb + h * DH
    if DH <= BLOCK_D:
        k = load_tile(k_base, offs_p, DH, offs_v, p_ok, v_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_D)

    m_i = tl.full([BLOCK_P], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_P], ACC)
    acc = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        qv = load_tile(q_base, offs_n, stride_qn, offs_v, n_ok, v_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        if DH <= BLOCK_D:
            s = mm(k, tl.trans(qv), INPUT_PRECISION, ACC)  # (BLOCK_P, BLOCK_N)
        else:
            s = dot_rows(k_base, DH, offs_p, p_ok, q_base, stride_qn, offs_n, n_ok, DH, BLOCK_D,
                         DOT_DTYPE, INPUT_PRECISION, ACC)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, n_end, N, H, P,
                       HAS_MASK, HAS_DROP, BLOCK_P, True, FAST_RNG)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no patch yet: avoid inf - inf
        alpha = tl.exp2((m_i - m_ref) * LOG2E)
        w = exp_minus(s, m_ref[:, None], FOLD_LOG2E)
        l_i = l_i * alpha + tl.sum(w, axis=1)
        acc = mma(w.to(DOT_DTYPE), qv, acc * alpha[:, None], INPUT_PRECISION, ACC)
        m_i = m_new

    part = (pid_bh * n_splits + pid_s) * P + offs_p  # (B*H, n_splits, P)
    if pid_v == 0:  # m and l are the same for every slice: the first stores them
        tl.store(M_PART + part, m_i, mask=p_ok)
        tl.store(L_PART + part, l_i, mask=p_ok)
    tl.store(ACC_PART + part[:, None] * DH + offs_v[None, :], acc, mask=p_ok[:, None] & v_ok[None, :])


@triton.jit
def _dispatch_merge_kernel(
    M_PART, L_PART, ACC_PART, Z, LSE,
    P, n_splits,
    DH: tl.constexpr, NUM_DV: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Log-sum-exp merge of the n-chunks for one (p-block x dh-slice, b*h):
    Z = acc / l and LSE = m + log(l)."""
    pid_p = tl.program_id(0) // NUM_DV
    pid_v = tl.program_id(0) % NUM_DV
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_v = pid_v * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    pv_ok = p_ok[:, None] & (offs_v[None, :] < DH)

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
        acc += tl.load(ACC_PART + part[:, None] * DH + offs_v[None, :], mask=pv_ok, other=0.0) * scale[:, None]

    reached = l > 0
    z = acc / tl.where(reached, l, 1.0)[:, None]
    lse = tl.where(reached, m_ref + tl.log(tl.where(reached, l, 1.0)), float("inf"))
    out = pid_bh * P + offs_p  # (B*H, P)
    tl.store(Z + out[:, None] * DH + offs_v[None, :], z, mask=pv_ok)
    if pid_v == 0:
        tl.store(LSE + out, lse, mask=p_ok)


@triton.jit
def _dispatch_bwd_dq_kernel(
    Q, K, DZ, LSE, DELTA, MASK, DQ,
    N, P, H, SEED, p_drop,
    stride_qb, stride_qn, stride_dqb, stride_dqn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr, NUM_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """A dh-slice of dq for BLOCK_N patches of one (b, h), all P slots streamed:
    dq = sum_p Dw dZ[p] + sum_p Dw (dZ[p] . q - delta[p]) K[p]."""
    seed = load_seed(SEED, HAS_DROP)
    pid_n = tl.program_id(0) // NUM_DV
    pid_v = tl.program_id(0) % NUM_DV
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    v_ok = offs_v < DH
    q_base = Q + b * stride_qb + h * DH
    k_base = K + h * P * DH
    dz_base = DZ + pid_bh * P * DH  # dZ (B*H, P, DH)
    if DH <= BLOCK_D:
        q = load_tile(q_base, offs_n, stride_qn, offs_v, n_ok, v_ok).to(DOT_DTYPE)
    dq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        kv = load_tile(k_base, offs_p, DH, offs_v, p_ok, v_ok).to(DOT_DTYPE)  # (BLOCK_P, BLOCK_D)
        dzv = load_tile(dz_base, offs_p, DH, offs_v, p_ok, v_ok).to(DOT_DTYPE)
        lse = tl.load(LSE + pid_bh * P + offs_p, mask=p_ok, other=float("inf"))  # +inf: weight 0
        delta = tl.load(DELTA + pid_bh * P + offs_p, mask=p_ok, other=0.0)
        if DH <= BLOCK_D:
            s = mm(q, tl.trans(kv), INPUT_PRECISION, ACC)  # (BLOCK_N, BLOCK_P)
            dw = mm(q, tl.trans(dzv), INPUT_PRECISION, ACC)  # dDw^T
        else:
            s = dot_rows(q_base, stride_qn, offs_n, n_ok, k_base, DH, offs_p, p_ok, DH, BLOCK_D,
                         DOT_DTYPE, INPUT_PRECISION, ACC)
            dw = dot_rows(q_base, stride_qn, offs_n, n_ok, dz_base, DH, offs_p, p_ok, DH, BLOCK_D,
                          DOT_DTYPE, INPUT_PRECISION, ACC)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, p0, N, N, H, P, HAS_MASK, HAS_DROP, BLOCK_P, False, FAST_RNG)
        w = tl.where(ok, tl.exp2((s - lse[None, :]) * LOG2E), 0.0)  # Dw^T
        dl = w * (dw - delta[None, :])
        dq = mma(w.to(DOT_DTYPE), dzv, dq, INPUT_PRECISION, ACC)
        dq = mma(dl.to(DOT_DTYPE), kv, dq, INPUT_PRECISION, ACC)
    tl.store(DQ + b * stride_dqb + offs_n[:, None].to(tl.int64) * stride_dqn + h * DH + offs_v[None, :],
             dq.to(DQ.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@triton.jit
def _dispatch_bwd_dk_kernel(
    Q, K, DZ, LSE, DELTA, MASK, DK_PART,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, DH: tl.constexpr, NUM_DV: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """Partial dK over one n-chunk for a (p-block x dh-slice) of one (b, h):
    dK[p] = sum_n Dw (dZ[p] . q - delta[p]) q[n]; summed over chunks and bags by the launcher."""
    seed = load_seed(SEED, HAS_DROP)
    pid_p = tl.program_id(0) // NUM_DV
    pid_v = tl.program_id(0) % NUM_DV
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_v = pid_v * BLOCK_D + tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    v_ok = offs_v < DH
    q_base = Q + b * stride_qb + h * DH
    k_base = K + h * P * DH
    dz_base = DZ + pid_bh * P * DH
    if DH <= BLOCK_D:
        k = load_tile(k_base, offs_p, DH, offs_v, p_ok, v_ok).to(DOT_DTYPE)
        dz = load_tile(dz_base, offs_p, DH, offs_v, p_ok, v_ok).to(DOT_DTYPE)
    lse = tl.load(LSE + pid_bh * P + offs_p, mask=p_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * P + offs_p, mask=p_ok, other=0.0)
    dk = tl.zeros([BLOCK_P, BLOCK_D], ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        qv = load_tile(q_base, offs_n, stride_qn, offs_v, n_ok, v_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        if DH <= BLOCK_D:
            s = mm(k, tl.trans(qv), INPUT_PRECISION, ACC)  # (BLOCK_P, BLOCK_N)
            dw = mm(dz, tl.trans(qv), INPUT_PRECISION, ACC)  # dDw
        else:
            s = dot_rows(k_base, DH, offs_p, p_ok, q_base, stride_qn, offs_n, n_ok, DH, BLOCK_D,
                         DOT_DTYPE, INPUT_PRECISION, ACC)
            dw = dot_rows(dz_base, DH, offs_p, p_ok, q_base, stride_qn, offs_n, n_ok, DH, BLOCK_D,
                          DOT_DTYPE, INPUT_PRECISION, ACC)
        ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, pid_p * BLOCK_P, n_end, N, H, P,
                       HAS_MASK, HAS_DROP, BLOCK_P, True, FAST_RNG)
        w = tl.where(ok, tl.exp2((s - lse[:, None]) * LOG2E), 0.0)  # Dw
        dl = w * (dw - delta[:, None])
        dk = mma(dl.to(DOT_DTYPE), qv, dk, INPUT_PRECISION, ACC)
    part = (pid_bh * n_splits + pid_s) * P + offs_p
    tl.store(DK_PART + part[:, None] * DH + offs_v[None, :], dk, mask=p_ok[:, None] & v_ok[None, :])


@triton.jit
def zeros_tiles(NUM: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, ACC: tl.constexpr):
    """A tuple of NUM zero (ROWS, COLS) accumulators."""
    tiles = ()
    for _ in tl.static_range(NUM):
        tiles = tiles + (tl.zeros([ROWS, COLS], ACC),)
    return tiles


@triton.jit
def _dispatch_bwd_tile(q, dq, dk, rows_c, K_HEAD, DZ_HEAD, LSE_HEAD, DELTA_HEAD, YB_HEAD, BETA_HEAD, MASK, seed,
                       p_drop, b, offs_n, h, n_end, N, H, P, p0, ROWS: tl.constexpr, DH: tl.constexpr,
                       BLOCK_D: tl.constexpr, DO: tl.constexpr, BLOCK_O: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr,
                       COMBINE: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       ACC: tl.constexpr, FAST_RNG: tl.constexpr):
    """The slots p0 .. p0 + ROWS against a tile of patches q (BLOCK_N, BLOCK_D):
    dq (BLOCK_N, BLOCK_D) += sum_p Dw dZ + sum_p dL K, dk (ROWS, BLOCK_D) += dL^T q,
    with dL = dL_d = Dw (q . dZ - delta_d), or with COMBINE dL_d + dL_c,

        dL = Dw (q . dZ + alpha beta dO . Y - delta_d - alpha beta delta_c),

    Cw = Dw alpha[n] beta[p] (``_combine_rows``): the two products accumulate
    into one tile, alpha dO (``rows_c``, with alpha delta_c) against beta Y."""
    offs_p = p0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    k = load_tile(K_HEAD, offs_p, DH, offs_d, p_ok, offs_d < DH).to(DOT_DTYPE)  # (ROWS, BLOCK_D)
    dz = load_tile(DZ_HEAD, offs_p, DH, offs_d, p_ok, offs_d < DH).to(DOT_DTYPE)
    lse = tl.load(LSE_HEAD + offs_p, mask=p_ok, other=float("inf"))  # +inf: weight 0
    delta = tl.load(DELTA_HEAD + offs_p, mask=p_ok, other=0.0)
    s = mm(q, tl.trans(k), INPUT_PRECISION, ACC)  # (BLOCK_N, ROWS)
    ok = _patch_ok(MASK, seed, p_drop, b, offs_n, h, p0, n_end, N, H, P, HAS_MASK, HAS_DROP, ROWS, False, FAST_RNG)
    w = tl.where(ok, exp_minus(s, lse[None, :], True), 0.0)  # Dw^T
    dl = mm(q, tl.trans(dz), INPUT_PRECISION, ACC) - delta[None, :]  # dZ . q - delta_d
    if COMBINE:
        alpha_dout, alpha_delta_c, _ = rows_c
        offs_o = tl.arange(0, BLOCK_O)
        beta_y = load_tile(YB_HEAD, offs_p, DO, offs_o, p_ok, offs_o < DO)  # (ROWS, BLOCK_O)
        beta = tl.load(BETA_HEAD + offs_p, mask=p_ok, other=0.0)  # exp(LSE_d - g): 0 for unreached slots
        dl = mma(alpha_dout, tl.trans(beta_y), dl, INPUT_PRECISION, ACC) - alpha_delta_c[:, None] * beta[None, :]
    dl = w * dl  # dL^T: dL_d, or dL_d + dL_c
    if NEED_DQ:
        dq = mma(w.to(DOT_DTYPE), dz, dq, INPUT_PRECISION, ACC)
        dq = mma(dl.to(DOT_DTYPE), k, dq, INPUT_PRECISION, ACC)
    if NEED_DK:
        dk = mma(tl.trans(dl.to(DOT_DTYPE)), q, dk, INPUT_PRECISION, ACC)
    return dq, dk


@triton.jit
def _combine_rows(DOUT, OUT, LSE_C, gmax, MASK, b, offs_n, n_end, h, N, H, DO: tl.constexpr,
                  BLOCK_O: tl.constexpr, HAS_MASK: tl.constexpr, RESCALE_MAX_LOG2: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, ACC: tl.constexpr):
    """The combine side of a tile of patches: alpha dO (BLOCK_N, BLOCK_O) in the
    dot dtype, alpha delta_c (BLOCK_N,), delta_c = dO . out, and the far patches.

    Cw = exp(L - LSE_c) = Dw exp(LSE_d - g) exp(g - LSE_c), g the head's
    largest finite LSE_d: beta = exp(LSE_d - g) <= 1 per slot (the launcher),
    alpha = exp(g - LSE_c) per patch, where (g - LSE_c) log2(e) <=
    RESCALE_MAX_LOG2: there alpha <= 2**RESCALE_MAX_LOG2, and a Dw flushed to 0
    (below 2**-126) stands for a Cw below 2**(RESCALE_MAX_LOG2 - 126). Other
    patches (a logit spread beyond that bound), padded ones (their dO counts as
    0: their output is the constant 0) and those whose every slot is dropped
    (LSE_c = +inf) get alpha = 0 here; ``combine.combine_backward(far_gmax=)``
    computes the far patches' part from their own exponentials, and the kernel
    adds their dq."""
    offs_o = tl.arange(0, BLOCK_O)
    o_ok = offs_o < DO
    keep = offs_n < n_end
    if HAS_MASK:
        keep = keep & (tl.load(MASK + b * N + offs_n, mask=keep, other=0) != 0)
    o_base = b * N * H * DO + h * DO  # dO and out: contiguous (B, N, D)
    dout = load_tile(DOUT + o_base, offs_n, H * DO, offs_o, keep, o_ok).to(ACC)  # (BLOCK_N, BLOCK_O)
    delta_c = tl.sum(dout * load_tile(OUT + o_base, offs_n, H * DO, offs_o, keep, o_ok).to(ACC), axis=1)
    lse_c = tl.load(LSE_C + (b * N + offs_n) * H + h, mask=offs_n < n_end, other=float("inf"))
    gap = (gmax - lse_c) * LOG2E  # LSE_c = +inf: -inf, alpha 0
    near = keep & (gap <= RESCALE_MAX_LOG2)
    alpha = tl.where(near, tl.exp2(tl.minimum(gap, RESCALE_MAX_LOG2)), 0.0)  # no inf computed for far patches
    return (dout * alpha[:, None]).to(DOT_DTYPE), alpha * delta_c, keep & (gap > RESCALE_MAX_LOG2)  # as _far_rows


@triton.jit
def per_tile(pointers, n0):
    """``pointers`` (a tuple), offset by 0 in a way the compiler cannot see
    through (n0 // (2**31 - 1) is 0 for every n0 < N < 2**31): loads from them
    stay inside the loop over tiles of patches instead of being hoisted out of
    it, which would hold every slot tile's operands in registers at once."""
    zero = n0 // 2147483647
    out = ()
    for i in tl.static_range(len(pointers)):
        out = out + (pointers[i] + zero,)
    return out


@triton.jit
def store_slot_rows(BASE, acc, p0, P, COLS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """A (ROWS, BLOCK_C) accumulator to the rows p0 .. p0 + ROWS (below P) of BASE (P, COLS)."""
    offs_p = p0 + tl.arange(0, ROWS)
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(BASE + offs_p[:, None] * COLS + offs_c[None, :], acc, mask=(offs_p < P)[:, None] & (offs_c < COLS)[None, :])


@triton.jit
def _dispatch_bwd_kernel(
    Q, K, DZ, LSE, DELTA, MASK, DQ, DK_PART, DOUT, OUT, YB, LSE_C, DQ_FAR, BETA, GMAX,
    N, P, H, n_per_split, SEED, p_drop,
    stride_qb, stride_qn, stride_dqb, stride_dqn,
    HAS_MASK: tl.constexpr, HAS_DROP: tl.constexpr, NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr,
    COMBINE: tl.constexpr, RESCALE_MAX_LOG2: tl.constexpr, DH: tl.constexpr, DO: tl.constexpr,
    NUM_PT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr, FAST_RNG: tl.constexpr,
):
    """The dispatch backward of one n-chunk of one (b, h), its exponentials
    evaluated once: per tile of BLOCK_N patches, against all P slots (NUM_PT
    tiles of BLOCK_P, unrolled), the weights Dw = exp(L - LSE) (``exp_minus``),
    dL = Dw (dZ . q - delta), then the tile's dq = sum_p Dw dZ + sum_p dL K
    (stored) and the chunk's partial dK[p] = sum_n dL q[n] (summed by the
    launcher), whose accumulators for all P slots stay in registers
    (``dispatch_bwd_fused_ok``). K, dZ and beta Y come in the dot dtype
    (cast once by the launcher) and are re-read per tile of patches from the
    cache (``per_tile``). Smaller tail tiles (P = 300 as 4 x 64 + 32 + 16) would
    compute 304 slots instead of 320, but the masked variant without slot
    dropout spilled on sm_90a at every tile size, warp and stage count tried
    (triton 3.9), where the uniform tiles do not.

    COMBINE (keep_slots=False): the same logits also carry the combine
    softmax, and dq and dK take its part too: its weights come from Dw by a
    rank-one rescale (``_combine_rows``), no second exponential, and its
    dO . Y products accumulate into the tile of dispatch's dZ . q
    (``_dispatch_bwd_tile``). The routing backward then evaluates the N x H x
    P exponentials here and once more for dY (combine's dK/dY kernel without
    dK), not three times. (Combine's dO . Y as a dot of its own, with Cw
    apart, spilled on sm_90a: three 64 x 64 products live per slot tile.)"""
    seed = load_seed(SEED, HAS_DROP)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DH
    q_base = Q + b * stride_qb + h * DH
    # this (b, h)'s slot data (YB and BETA read only with COMBINE)
    heads_0 = (K + h * P * DH, DZ + pid_bh * P * DH, LSE + pid_bh * P, DELTA + pid_bh * P, YB + pid_bh * P * DO,
               BETA + pid_bh * P)
    gmax = 0.0
    if COMBINE:
        gmax = tl.load(GMAX + pid_bh)  # the largest finite LSE_d of the head (-inf: none)
    dk = zeros_tiles(NUM_PT, BLOCK_P, BLOCK_D, ACC)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        q = load_tile(q_base, offs_n, stride_qn, offs_d, n_ok, d_ok).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D)
        rows_c = ()
        if COMBINE:
            rows_c = _combine_rows(DOUT, OUT, LSE_C, gmax, MASK, b, offs_n, n_end, h, N, H, DO, BLOCK_O, HAS_MASK,
                                   RESCALE_MAX_LOG2, DOT_DTYPE, ACC)
        heads = per_tile(heads_0, n0)
        dq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dk_next = ()
        for t in tl.static_range(NUM_PT):
            dq, dk_t = _dispatch_bwd_tile(q, dq, dk[t], rows_c, *heads, MASK, seed, p_drop, b, offs_n, h, n_end,
                                          N, H, P, t * BLOCK_P, BLOCK_P, DH, BLOCK_D, DO, BLOCK_O, HAS_MASK, HAS_DROP,
                                          NEED_DQ, NEED_DK, COMBINE, DOT_DTYPE, INPUT_PRECISION, ACC, FAST_RNG)
            dk_next = dk_next + (dk_t,)
        dk = dk_next
        if NEED_DQ:
            dq_offs = b * stride_dqb + offs_n[:, None].to(tl.int64) * stride_dqn + h * DH + offs_d[None, :]
            if COMBINE:  # the far patches' combine part, from their own exponentials (q's layout)
                dq += tl.load(DQ_FAR + dq_offs, mask=rows_c[2][:, None] & d_ok[None, :], other=0.0).to(ACC)
            tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    if NEED_DK:
        part = DK_PART + (pid_bh * n_splits + pid_s) * P * DH  # (B*H, n_splits, P, DH)
        for t in tl.static_range(NUM_PT):
            store_slot_rows(part, dk[t], t * BLOCK_P, P, DH, BLOCK_P, BLOCK_D)


# ------------------------------------------------------------------ tile sizes
def dispatch_meta(p: int, dh: int, dtype: torch.dtype, legacy: bool = False) -> dict:
    """Tiles of the forward partials and dK: BLOCK_P x BLOCK_N logits, dh in
    BLOCK_D slices.

    16-bit inputs: 64 x 64 logit tiles (slot tiles from ``slot_block``: P =
    300 computes 320 slots), dh slices up to 64; the dots run on tensor cores
    and the cost is reading q once per p-block (the legacy plan: 128-slot
    tiles, 384 slots for 300). fp32: 64 x 32, slices up to 32: its IEEE dots
    are FMA loops on operands held in registers, and wider tiles spill on
    sm_90a. fp64 (gradcheck): 16-wide tiles."""
    half = dtype.itemsize <= 2
    block_d = block(dh, maximum=cap(dtype, 64, 32))
    if legacy:
        block_p = block(p, maximum=cap(dtype, 128 if block_d <= 32 else 64, 64))
    else:
        block_p = slot_block(p, maximum=cap(dtype, 64, 64))
    return dict(BLOCK_P=block_p, BLOCK_N=cap(dtype, 64, 32), BLOCK_D=block_d, NUM_DV=triton.cdiv(dh, block_d),
                num_warps=4 if half or block_d <= 16 else 8, num_stages=2)


def dispatch_dk_meta(p: int, dh: int, dtype: torch.dtype, legacy: bool = False) -> dict:
    """dK partials: the forward's grid and tiles; 16-bit on 8 warps (on 4, the
    128-slot tiles of the slot-dropout variant spill on sm_90a), fp32
    unpipelined (with 2 stages triton 3.6's ptxas spills 8 bytes in the
    slot-dropout variant) and, where dh spans several slices, 32-slot tiles."""
    meta = dispatch_meta(p, dh, dtype, legacy)
    if dtype.itemsize <= 2:
        return {**meta, "num_warps": 8}
    return {**meta, "num_stages": 1, **({"BLOCK_P": 32} if meta["NUM_DV"] > 1 else {})}


def dispatch_dq_meta(p: int, dh: int, dtype: torch.dtype) -> dict:
    """dq: one program per BLOCK_N patches and dh slice of a head, all P slots
    streamed. fp32 takes 8 warps (its FMA dots on the 64 x 64 tiles spill with
    4 on sm_90a) and 32 patches from dh = 32 on; 16-bit takes 8 warps from dh
    = 33 on (64-wide slices)."""
    block_d = block(dh, maximum=cap(dtype, 64, 32))
    half = dtype.itemsize <= 2
    return dict(BLOCK_N=cap(dtype, 64, 64 if dh < 32 else 32), BLOCK_P=block(p, maximum=cap(dtype, 64, 64)),
                BLOCK_D=block_d, NUM_DV=triton.cdiv(dh, block_d), num_warps=4 if half and block_d <= 32 else 8,
                num_stages=2)


FUSED_BWD_MAX_VALUES = 8192
"""The fused backward holds the dK accumulators of all P slots of a head in
registers: it runs where the padded P x dh tile is at most this many values
(P = 300, dh = 16: 5120, 40 fp32 registers a thread on 4 warps); wider heads
or more slots take the two-kernel backward."""


def dispatch_bwd_meta(p: int, dh: int, dtype: torch.dtype, do: int = 0) -> dict:
    """The fused backward: BLOCK_N patches a step against all slots in NUM_PT
    tiles of ``slot_block`` slots (P = 300: 5 x 64), the head whole (dh <=
    BLOCK_D); 4 warps, pipelined (the spill-free choice at the recommended
    size on sm_90a for every flag variant: 8 warps replicate the 64-row
    wgmma accumulators over two warpgroups); fp32's FMA dots on 16-patch steps.
    ``do`` > 0: with combine's part (COMBINE), dO and Y in BLOCK_O-wide tiles."""
    block_d = block(dh, maximum=cap(dtype, 64, 32))
    block_p = slot_block(p, maximum=cap(dtype, 64, 64))
    return dict(BLOCK_N=cap(dtype, 64, 16), BLOCK_P=block_p, BLOCK_D=block_d, NUM_PT=triton.cdiv(p, block_p),
                BLOCK_O=block(max(do, 1)), num_warps=4, num_stages=2)


def dispatch_bwd_fused_ok(p: int, dh: int, dtype: torch.dtype) -> bool:
    """Whether the fused backward runs at these sizes (else the two kernels)."""
    meta = dispatch_bwd_meta(p, dh, dtype)
    return dh <= meta["BLOCK_D"] and meta["NUM_PT"] * meta["BLOCK_P"] * meta["BLOCK_D"] <= FUSED_BWD_MAX_VALUES


ROUTING_BWD_MAX_DO = 64
"""The fused routing backward holds a head's dO (BLOCK_N x do) whole."""


def routing_bwd_fused_ok(p: int, dh: int, do: int, dtype: torch.dtype) -> bool:
    """Whether the fused backward also takes combine's dq and dK (keep_slots=False):
    where it runs, do <= ROUTING_BWD_MAX_DO, in bf16 (and fp64, the
    gradient checks'). Not fp16: alpha dO in the dot operand reaches 2**64 (fp16
    ends at 65504); not fp32: its FMA dots spill with combine's part on sm_90a.
    Elsewhere keep_slots=False runs the chain of the four Functions."""
    return (dtype in (torch.bfloat16, torch.float64) and dispatch_bwd_fused_ok(p, dh, dtype)
            and do <= ROUTING_BWD_MAX_DO)


@functools.lru_cache(maxsize=None)
def dispatch_metas(p: int, dh: int, dtype: torch.dtype, legacy: bool = False) -> Ladder:
    """The forward partials' tile candidates (``_launch.choose`` takes the first
    that compiles without spills): ``dispatch_meta``, then smaller tiles."""
    return candidates(dispatch_meta(p, dh, dtype, legacy), ("BLOCK_N", "BLOCK_P"))


@functools.lru_cache(maxsize=None)
def dispatch_merge_metas(p: int, dh: int, dtype: torch.dtype, legacy: bool = False) -> Ladder:
    meta = dispatch_meta(p, dh, dtype, legacy)
    return candidates(dict(BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], NUM_DV=meta["NUM_DV"], num_warps=4,
                           num_stages=2), ("BLOCK_P",))


@functools.lru_cache(maxsize=None)
def dispatch_dk_metas(p: int, dh: int, dtype: torch.dtype, legacy: bool = False) -> Ladder:
    return candidates(dispatch_dk_meta(p, dh, dtype, legacy), ("BLOCK_N", "BLOCK_P"))


@functools.lru_cache(maxsize=None)
def dispatch_bwd_metas(p: int, dh: int, dtype: torch.dtype, do: int = 0) -> Ladder:
    """The fused backward's candidates: fewer patches a step (the P x dh state does not shrink)."""
    return candidates(dispatch_bwd_meta(p, dh, dtype, do), ("BLOCK_N",))


@functools.lru_cache(maxsize=None)
def dispatch_dq_metas(p: int, dh: int, dtype: torch.dtype) -> Ladder:
    return candidates(dispatch_dq_meta(p, dh, dtype), ("BLOCK_N", "BLOCK_P"))


# ------------------------------------------------------------------ launchers
def _common_args(q: torch.Tensor, mask, drop, legacy: bool) -> dict:
    """Kernel arguments shared by all dispatch kernels: the mask (bool; an input
    stands in for an absent one, never a buffer a kernel writes), the
    slot-dropout (seed, p) and its generator, and the dtype constexprs."""
    seed, p_drop = (seed_tensor(drop[0], q.device), kernel_p_drop(drop[1])) if drop is not None else (q, 0.0)
    return dict(MASK=mask_arg(mask) if mask is not None else q, SEED=seed, p_drop=p_drop,
                HAS_MASK=mask is not None, HAS_DROP=drop is not None, FAST_RNG=fast_rng(drop, legacy),
                **dot_consts(q.dtype))


@on_device
def dispatch_forward(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, drop=None, legacy: bool = False):
    """q (B, N, C) with unit stride along C; k (H, P, dh) contiguous, in the
    accumulator dtype; mask (B, N) bool or None; drop (seed, p) of slot
    dropout or None; legacy: the legacy kernel plan (``_launch.legacy_kernels``).
    Returns Z (B, H, P, dh) and LSE (B, H, P) (natural log) in the accumulator
    dtype (fp32; fp64 for fp64 input)."""
    check_device(q, k)
    bsz, n, c = q.shape
    h, p, dh = k.shape
    assert c == h * dh and q.stride(2) == 1 and k.is_contiguous()
    acc = dict(device=q.device, dtype=acc_dtype(q.dtype))
    args = dict(Q=q, K=k, N=n, P=p, H=h, stride_qb=q.stride(0), stride_qn=q.stride(1), DH=dh,
                FOLD_LOG2E=not legacy, **_common_args(q, mask, drop, legacy))
    # the partials (m, l, acc) travel as k (their dtype) and n_per_split as 64 while the kernel is chosen
    meta, resident = choose(_dispatch_partial_kernel, q.device,
                            {**args, "M_PART": k, "L_PART": k, "ACC_PART": k, "n_per_split": 64},
                            dispatch_metas(p, dh, q.dtype, legacy))
    blocks = triton.cdiv(p, meta["BLOCK_P"]) * meta["NUM_DV"]
    n_splits, n_per_split = split_n(n, meta["BLOCK_N"], blocks * bsz * h, resident)
    m_part = torch.empty(bsz * h, n_splits, p, **acc)
    l_part = torch.empty(bsz * h, n_splits, p, **acc)
    acc_part = torch.empty(bsz * h, n_splits, p, dh, **acc)
    launch(_dispatch_partial_kernel, (blocks, bsz * h, n_splits), M_PART=m_part, L_PART=l_part, ACC_PART=acc_part,
           n_per_split=n_per_split, **args, **meta)
    z = torch.empty(bsz, h, p, dh, **acc)
    lse = torch.empty(bsz, h, p, **acc)
    merge = dict(M_PART=m_part, L_PART=l_part, ACC_PART=acc_part, Z=z, LSE=lse, P=p, n_splits=n_splits, DH=dh,
                 ACC=args["ACC"])
    meta, _ = choose(_dispatch_merge_kernel, q.device, merge, dispatch_merge_metas(p, dh, q.dtype, legacy))
    launch(_dispatch_merge_kernel, (triton.cdiv(p, meta["BLOCK_P"]) * meta["NUM_DV"], bsz * h), **merge, **meta)
    return z, lse


@on_device
def dispatch_backward(dz, q, k, z, lse, mask, drop, need_dq: bool, need_dk: bool, legacy: bool = False,
                      combine=None):
    """dZ (B, H, P, dh) -> dq (B, N, C) in q's dtype and dK (H, P, dh) in the
    accumulator dtype (None where not needed): one fused kernel where
    ``dispatch_bwd_fused_ok`` (not in the legacy plan), else a dq kernel and a
    dK kernel. dK is reduced over n-chunks and bags from per-program partials:
    deterministic.

    ``combine`` (dO (B, N, D), out (B, N, D), Y (B, P, D), LSE_c (B, N, H), as
    the combine forward saw and gave them; only where ``routing_bwd_fused_ok``):
    dq and dK of dispatch and combine together (combine's dY is not computed
    here: its backward runs before the experts'). The fused kernel takes
    combine's part from the same exponentials, and combine's kernels that of
    the far patches (``combine.combine_backward(far_gmax=)``); where that kernel
    would spill registers on this GPU (triton 3.6 at the recommended size),
    combine's dq and dK kernels take all of combine's part instead."""
    bsz, n, c = q.shape
    h, p, dh = k.shape
    dz = dz.to(z.dtype).contiguous()
    # delta_d from dZ as the kernels' dots see it (rounded for half-precision dots),
    # so that sum_n dL_d stays 0 as the softmax requires
    dz_dot = dz.to(q.dtype).to(z.dtype) if dot_dtype(q.dtype) in (tl.float16, tl.bfloat16) else dz
    delta = (dz_dot * z).sum(-1)  # (B, H, P): P * H values
    common = dict(Q=q, K=k, DZ=dz, LSE=lse, DELTA=delta, N=n, P=p, H=h, stride_qb=q.stride(0),
                  stride_qn=q.stride(1), DH=dh, **_common_args(q, mask, drop, legacy))
    dq = torch.empty(bsz, n, c, device=q.device, dtype=q.dtype) if need_dq else None
    dq_args = dict(DQ=q if dq is None else dq, stride_dqb=q.stride(0) if dq is None else dq.stride(0),
                   stride_dqn=q.stride(1) if dq is None else dq.stride(1))  # q stands in: never written without NEED_DQ
    if combine is not None:
        assert not legacy and routing_bwd_fused_ok(p, dh, combine[2].shape[2] // h, q.dtype)
    if not legacy and dispatch_bwd_fused_ok(p, dh, q.dtype):
        operand = TL_TO_TORCH[dot_dtype(q.dtype)]  # K, dZ and Y cast once here, not per tile of patches
        metas = dispatch_bwd_metas(p, dh, q.dtype, combine[2].shape[2] // h if combine is not None else 0)
        args = dict(NEED_DQ=need_dq, NEED_DK=need_dk, **dq_args, **_combine_args(combine, lse, operand, z),
                    **{**common, "K": k.to(operand), "DZ": dz.to(operand)})
        dk_far = None
        if combine is not None:
            dout, out, y, lse_c = combine
            if not spill_free(_dispatch_bwd_kernel, q.device, {**args, "DK_PART": z, "n_per_split": 64}, metas):
                dq_d, dk_d = dispatch_backward(dz, q, k, z, lse, mask, drop, need_dq, need_dk)
                dq_c, dk_c, _ = _combine.combine_backward(dout, q, k, y, out, lse_c, mask, drop, need_dq, need_dk,
                                                          False)
                return (dq_d + dq_c if need_dq else None), (dk_d + dk_c if need_dk else None)
            # the far patches (a logit spread beyond the rescale's bound; usually none): their dq rows for
            # the kernel to add, their dK
            dq_far, dk_far, _ = _combine.combine_backward(dout, q, k, y, out, lse_c, mask, drop, need_dq, need_dk,
                                                          False, False, args["GMAX"])
            args["DQ_FAR"] = dq_far if need_dq else q
        meta, resident = choose(_dispatch_bwd_kernel, q.device, {**args, "DK_PART": z, "n_per_split": 64}, metas)
        n_splits, n_per_split = split_n(n, meta["BLOCK_N"], bsz * h, resident)
        dk_part = torch.empty(bsz, h, n_splits, p, dh, device=q.device, dtype=z.dtype) if need_dk else z
        launch(_dispatch_bwd_kernel, (n_splits, bsz * h), DK_PART=dk_part, n_per_split=n_per_split, **args, **meta)
        dk = dk_part.sum(dim=(0, 2)) if need_dk else None  # (H, P, dh)
        return dq, dk if dk_far is None else dk + dk_far
    dk = None
    if need_dq:
        args = dict(**dq_args, **common)
        meta, _ = choose(_dispatch_bwd_dq_kernel, q.device, args, dispatch_dq_metas(p, dh, q.dtype))
        launch(_dispatch_bwd_dq_kernel, (triton.cdiv(n, meta["BLOCK_N"]) * meta["NUM_DV"], bsz * h), **args, **meta)
    if need_dk:
        meta, resident = choose(_dispatch_bwd_dk_kernel, q.device, {**common, "DK_PART": z, "n_per_split": 64},
                                dispatch_dk_metas(p, dh, q.dtype, legacy))
        blocks = triton.cdiv(p, meta["BLOCK_P"]) * meta["NUM_DV"]
        n_splits, n_per_split = split_n(n, meta["BLOCK_N"], blocks * bsz * h, resident)
        dk_part = torch.empty(bsz, h, n_splits, p, dh, device=q.device, dtype=z.dtype)
        launch(_dispatch_bwd_dk_kernel, (blocks, bsz * h, n_splits), DK_PART=dk_part, n_per_split=n_per_split,
               **common, **meta)
        dk = dk_part.sum(dim=(0, 2))  # (H, P, dh)
    return dq, dk


def routing_bwd_spill_free(q: torch.Tensor, k: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fused routing backward's kernel (every flag on but the mask and
    slot dropout) compiles without spills on q's GPU (True without one), for the
    benchmarks' notes; ``dispatch_backward`` checks each launch's own variant."""
    if q.device.type != "cuda" or not torch.cuda.is_available():
        return True
    h, p, dh = k.shape
    operand, acc = TL_TO_TORCH[dot_dtype(dtype)], acc_dtype(dtype)
    stand = {t: torch.empty(0, device=q.device, dtype=t) for t in (dtype, operand, acc)}  # choose reads dtypes
    args = dict(NEED_DQ=True, NEED_DK=True, DQ=stand[dtype], stride_dqb=0, stride_dqn=0, DK_PART=stand[acc],
                n_per_split=64, Q=stand[dtype], K=stand[operand], DZ=stand[operand], LSE=stand[acc],
                DELTA=stand[acc], N=q.shape[1], P=p, H=h, stride_qb=0, stride_qn=0, DH=dh,
                **_common_args(stand[dtype], None, None, False),
                **_combine_args((stand[dtype], stand[dtype], y, stand[acc]),
                                torch.zeros(y.shape[0], h, p, device=q.device), operand, stand[acc]))
    return spill_free(_dispatch_bwd_kernel, q.device, args, dispatch_bwd_metas(p, dh, dtype, y.shape[2] // h))


def _combine_args(combine, lse: torch.Tensor, operand: torch.dtype, stand_in: torch.Tensor) -> dict:
    """The fused kernel's combine arguments: dO and out (contiguous, in q's
    dtype), LSE_c, per (b, h) the largest finite LSE_d g (B, H, 1)
    (``finite_max``), beta = exp(LSE_d - g) (B, H, P), 0 for unreached slots
    (LSE_d = +inf), and beta Y (B, H, P, do) in the dot dtype: P * D values;
    the far patches' dq (DQ_FAR) is the launcher's to set. Without
    ``combine``, an input stands in for each (never read)."""
    bound = dict(RESCALE_MAX_LOG2=_launch.RESCALE_MAX_LOG2)
    if combine is None:
        return dict(COMBINE=False, DO=1, DOUT=stand_in, OUT=stand_in, YB=stand_in, LSE_C=stand_in, DQ_FAR=stand_in,
                    BETA=stand_in, GMAX=stand_in, **bound)
    dout, out, y, lse_c = combine
    bsz, h, p = lse.shape
    do = y.shape[2] // h
    gmax = finite_max(lse)
    beta = torch.where(torch.isfinite(lse), torch.exp(lse - gmax), 0.0)  # (B, H, P)
    beta_y = (beta[..., None] * y.view(bsz, p, h, do).transpose(1, 2)).to(operand).contiguous()  # (B, H, P, do)
    return dict(COMBINE=True, DO=do, DOUT=dout.to(out.dtype).contiguous(), OUT=out.contiguous(), YB=beta_y,
                LSE_C=lse_c, DQ_FAR=stand_in, BETA=beta, GMAX=gmax, **bound)
