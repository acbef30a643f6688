"""Experts: grouped low-rank matmuls on the B * P slot vectors.

Per slot (b, e, s) with input z = Z[b, :, e*S + s, :] (H heads x dh):

    u[h] = z[h] @ A[h] + a[h]          A (H, dh, r), or (E, H, dh, r) unshared
    v[h] = u[h] @ Bw[e, h] + c[e, h]   Bw (E, H, r, do)
    Y    = relu(v / max(||v||, 1e-8) * sqrt(D) * g[e])   norm over all D = H * do

Two kernels, each with a program per small independent piece, so that the
work (independent of N, a few MFLOP) is spread over the GPU rather than
serialized in a few programs:

- ``_experts_proj_kernel``: v for BLOCK_S slots of one (expert, head) of one
  bag (a do-slice of it where do is wide): E * H * B programs, 480 for one
  bag at the recommended sizes. The rank and dh are streamed in chunks, so
  any rank fits (E = 1 with Din 1536 and D 1024 gives r ~ 1200).
- ``_experts_norm_kernel``: the RMS norm over each slot's D values, the
  expert's gain and the ReLU, BLOCK_ROWS slots a program.

v (B, P, D) in the accumulator dtype is kept for the backward (300 x 512
values for one bag): the backward needs it and does not recompute it.

Backward, the same two steps reversed: ``_experts_norm_bwd_kernel`` turns dY
into dv (the norm's gradient couples a slot's D values) and stores partial
sums of dg and dc per (bag, slot block, expert); ``_experts_proj_bwd_kernel``
takes dv back through Bw and A for one (rank chunk, expert, head, bag, slot
block): dz (partials per rank chunk where the rank spans several) and partial
dA, da, dBw. Every partial is summed by torch in a fixed order:
deterministic, no atomics.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import (Ladder, TORCH_TO_TL, acc_dtype, block, candidates, cap, check_device, choose, input_precision, launch,
                      on_device)
from ._tiles import load_tile

L2NORM_EPS = tl.constexpr(1e-8)


@triton.jit
def _low_rank_u(A, ABIAS, z_rows, s_ok, a_row, offs_r, r_ok,
                DH: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """u = z @ A[a_row][:, offs_r] + a[a_row][offs_r] (BLOCK_S, BLOCK_R), dh
    streamed in BLOCK_DH chunks; z_rows points at the slots' rows (stride DH)."""
    u = tl.zeros([BLOCK_S, offs_r.shape[0]], ACC)
    for d0 in range(0, DH, BLOCK_DH):
        offs_d = d0 + tl.arange(0, BLOCK_DH)
        d_ok = offs_d < DH
        z = load_tile(z_rows, tl.arange(0, BLOCK_S), DH, offs_d, s_ok, d_ok).to(ACC)  # (BLOCK_S, BLOCK_DH)
        a = load_tile(A + a_row * DH * R, offs_d, R, offs_r, d_ok, r_ok).to(ACC)  # (BLOCK_DH, BLOCK_R)
        u = tl.dot(z, a, u, input_precision=INPUT_PRECISION, out_dtype=ACC)
    return u + tl.load(ABIAS + a_row * R + offs_r, mask=r_ok, other=0.0).to(ACC)[None, :]


@triton.jit
def _program_slots(S, E, H, NS, BLOCK_S: tl.constexpr):
    """The (expert x head, bag x slot block) of a projection program (grid axes 1
    and 2): e, h, e * H + h, b * NS + slot block, b, the block's first slot s0
    in the expert, its BLOCK_S slots' offsets there and their validity, and
    their slot indices p = e * S + s."""
    eh = tl.program_id(1).to(tl.int64)
    pid_bs = tl.program_id(2).to(tl.int64)
    s0 = (pid_bs % NS) * BLOCK_S
    offs_s = s0 + tl.arange(0, BLOCK_S)
    e = eh // H
    return e, eh % H, eh, pid_bs, pid_bs // NS, s0, offs_s, offs_s < S, e * S + offs_s


@triton.jit
def _experts_proj_kernel(
    Z, A, ABIAS, BW, CBIAS, V,
    S, E, H, NS,
    SHARED: tl.constexpr, DH: tl.constexpr, R: tl.constexpr, DO: tl.constexpr, NUM_VO: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """v = (z @ A[h] + a[h]) @ Bw[e, h] + c[e, h] for BLOCK_S slots of expert e,
    head h, bag b: a (BLOCK_S, BLOCK_DO) slice of V (B, P, D)."""
    pid_v = tl.program_id(0)
    e, h, eh, pid_bs, b, s0, offs_s, s_ok, slot = _program_slots(S, E, H, NS, BLOCK_S)
    P = E * S
    D = H * DO
    offs_vo = pid_v * BLOCK_DO + tl.arange(0, BLOCK_DO)
    vo_ok = offs_vo < DO
    a_row = h if SHARED else eh  # A (H, dh, r) or (E, H, dh, r), a (H, r) or (E, H, r)
    z_rows = Z + ((b * H + h) * P + e * S + s0) * DH  # Z (B, H, P, dh): the block's first slot

    v = tl.zeros([BLOCK_S, BLOCK_DO], ACC)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        u = _low_rank_u(A, ABIAS, z_rows, s_ok, a_row, offs_r, r_ok, DH, R, BLOCK_S, BLOCK_DH,
                        INPUT_PRECISION, ACC)
        bw = load_tile(BW + eh * R * DO, offs_r, DO, offs_vo, r_ok, vo_ok).to(ACC)  # (BLOCK_R, BLOCK_DO)
        v = tl.dot(u, bw, v, input_precision=INPUT_PRECISION, out_dtype=ACC)
    v += tl.load(CBIAS + eh * DO + offs_vo, mask=vo_ok, other=0.0).to(ACC)[None, :]
    tl.store(V + (b * P + slot[:, None]) * D + h * DO + offs_vo[None, :], v, mask=s_ok[:, None] & vo_ok[None, :])


@triton.jit
def _experts_norm_kernel(
    V, G, Y, INV_NORM,
    ROWS, P, S,
    D: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Y = relu(v / max(||v||, 1e-8) * sqrt(D) * g[e]) for BLOCK_ROWS slot rows
    of V (B * P, D); the inverse norms go to INV_NORM (B * P,)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    m_ok = offs_m < ROWS
    e = (offs_m % P) // S  # the slot's expert
    offs_d = tl.arange(0, BLOCK_D)
    ssq = tl.zeros([BLOCK_ROWS], ACC)
    for d0 in range(0, D, BLOCK_D):
        v = load_tile(V + d0, offs_m, D, offs_d, m_ok, d0 + offs_d < D)
        ssq += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ssq), L2NORM_EPS)
    tl.store(INV_NORM + offs_m, inv, mask=m_ok)
    scale = inv * tl.sqrt(tl.cast(D, ACC))
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + offs_d < D
        v = load_tile(V + d0, offs_m, D, offs_d, m_ok, d_ok)
        g = load_tile(G + d0, e, D, offs_d, m_ok, d_ok).to(ACC)
        tl.store(Y + offs_m[:, None] * D + d0 + offs_d[None, :], tl.maximum(v * scale[:, None] * g, 0.0),
                 mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _experts_norm_bwd_kernel(
    V, G, INV_NORM, DY, DV, DG_PART, DC_PART,
    S, E,
    D: tl.constexpr, PARAM_GRADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """dv (B, P, D) for BLOCK_S slots of expert e of bag b, and this program's
    partial sums of dg and dc = sum_s dv at index (b, slot block, e) of
    DG_PART and DC_PART (B, NS, E, D).

    With vhat = v * inv, dw = dY * (w > 0) and dvhat = dw * g * sqrt(D):
    dv = inv * (dvhat - vhat * <vhat, dvhat>) = scale * (dw * g - v * inv^2 * <v, dw * g>),
    scale = inv * sqrt(D), the inner products over all D values of the slot.
    Where ||v|| < 1e-8 the clamped norm is a constant and dv = scale * dw * g."""
    sb = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    NS = tl.num_programs(0)
    P = E * S
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    rows = b * P + e * S + offs_s  # rows of V, dY, dv (B * P, D)
    offs_d = tl.arange(0, BLOCK_D)
    inv = tl.load(INV_NORM + rows, mask=s_ok, other=0.0)
    scale = inv * tl.sqrt(tl.cast(D, ACC))
    ssq = tl.zeros([BLOCK_S], ACC)
    vdwg = tl.zeros([BLOCK_S], ACC)
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + offs_d < D
        v = load_tile(V + d0, rows, D, offs_d, s_ok, d_ok)
        g = tl.load(G + e * D + d0 + offs_d, mask=d_ok, other=0.0).to(ACC)[None, :]
        dw = tl.where(v * g > 0, load_tile(DY + d0, rows, D, offs_d, s_ok, d_ok).to(ACC), 0.0)
        ssq += tl.sum(v * v, axis=1)
        vdwg += tl.sum(v * dw * g, axis=1)
    # torch's clamp_min passes the gradient where ||v|| >= eps
    coef = tl.where(tl.sqrt(ssq) >= L2NORM_EPS, inv * inv * vdwg, 0.0)  # (BLOCK_S,)
    part = (b * NS + sb) * E + e
    for d0 in range(0, D, BLOCK_D):
        d_ok = d0 + offs_d < D
        v = load_tile(V + d0, rows, D, offs_d, s_ok, d_ok)
        g = tl.load(G + e * D + d0 + offs_d, mask=d_ok, other=0.0).to(ACC)[None, :]
        dw = tl.where(v * g > 0, load_tile(DY + d0, rows, D, offs_d, s_ok, d_ok).to(ACC), 0.0)
        dv = scale[:, None] * (dw * g - v * coef[:, None])  # 0 in padded rows
        tl.store(DV + rows[:, None] * D + d0 + offs_d[None, :], dv, mask=s_ok[:, None] & d_ok[None, :])
        if PARAM_GRADS:
            tl.store(DG_PART + part * D + d0 + offs_d, tl.sum(dw * v * scale[:, None], axis=0), mask=d_ok)
            tl.store(DC_PART + part * D + d0 + offs_d, tl.sum(dv, axis=0), mask=d_ok)


@triton.jit
def _experts_proj_bwd_kernel(
    Z, A, ABIAS, BW, DV, DZ_PART, DA_PART, DABIAS_PART, DBW_PART,
    S, E, H, NS,
    SHARED: tl.constexpr, DH: tl.constexpr, R: tl.constexpr, DO: tl.constexpr,
    PARAM_GRADS: tl.constexpr, INPUT_GRAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One (rank chunk, expert e x head h, bag b x slot block): du = dv @ Bw^T on
    the chunk, then dz's share of it (du @ A^T, at DZ_PART (NUM_R, B, H, P, dh)
    index pid_r) and the partial dA, da, dBw over the block's slots, at index
    (b * NS + slot block, e, h) of DA_PART (B*NS, E, H, dh, r), DABIAS_PART
    (B*NS, E, H, r) and DBW_PART (B*NS, E, H, r, do)."""
    pid_r = tl.program_id(0)
    e, h, eh, pid_bs, b, s0, offs_s, s_ok, slot = _program_slots(S, E, H, NS, BLOCK_S)
    P = E * S
    D = H * DO
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_do = tl.arange(0, BLOCK_DO)
    a_row = h if SHARED else eh
    z_rows = Z + ((b * H + h) * P + e * S + s0) * DH
    dv_rows = DV + (b * P + e * S + s0) * D + h * DO  # this head's columns of dv (B, P, D)
    bw_base = BW + eh * R * DO

    du = tl.zeros([BLOCK_S, BLOCK_R], ACC)  # dv @ Bw[e, h]^T on the rank chunk, 0 in padded slots
    for d0 in range(0, DO, BLOCK_DO):
        do_ok = d0 + offs_do < DO
        dv = load_tile(dv_rows + d0, tl.arange(0, BLOCK_S), D, offs_do, s_ok, do_ok)  # (BLOCK_S, BLOCK_DO)
        bw = load_tile(bw_base + d0, offs_r, DO, offs_do, r_ok, do_ok).to(ACC)  # (BLOCK_R, BLOCK_DO)
        du = tl.dot(dv, tl.trans(bw), du, input_precision=INPUT_PRECISION, out_dtype=ACC)
    if INPUT_GRAD:
        for d0 in range(0, DH, BLOCK_DH):
            dh_ok = d0 + offs_dh < DH
            a = load_tile(A + a_row * DH * R + d0 * R, offs_dh, R, offs_r, dh_ok, r_ok).to(ACC)  # (BLOCK_DH, BLOCK_R)
            dz = tl.dot(du, tl.trans(a), input_precision=INPUT_PRECISION, out_dtype=ACC)  # (BLOCK_S, BLOCK_DH)
            dz_rows = DZ_PART + (((pid_r * (tl.num_programs(2) // NS) + b) * H + h) * P) * DH
            tl.store(dz_rows + slot[:, None] * DH + d0 + offs_dh[None, :], dz, mask=s_ok[:, None] & dh_ok[None, :])
    if PARAM_GRADS:
        ph = (pid_bs * E + e) * H + h  # the partials' (B*NS, E, H) index
        tl.store(DABIAS_PART + ph * R + offs_r, tl.sum(du, axis=0), mask=r_ok)
        for d0 in range(0, DH, BLOCK_DH):
            dh_ok = d0 + offs_dh < DH
            z = load_tile(z_rows + d0, tl.arange(0, BLOCK_S), DH, offs_dh, s_ok, dh_ok).to(ACC)  # (BLOCK_S, BLOCK_DH)
            da = tl.dot(tl.trans(z), du, input_precision=INPUT_PRECISION, out_dtype=ACC)  # (BLOCK_DH, BLOCK_R)
            tl.store(DA_PART + (ph * DH + d0 + offs_dh[:, None]) * R + offs_r[None, :], da,
                     mask=dh_ok[:, None] & r_ok[None, :])
        u = _low_rank_u(A, ABIAS, z_rows, s_ok, a_row, offs_r, r_ok, DH, R, BLOCK_S, BLOCK_DH,
                        INPUT_PRECISION, ACC)
        for d0 in range(0, DO, BLOCK_DO):
            do_ok = d0 + offs_do < DO
            dv = load_tile(dv_rows + d0, tl.arange(0, BLOCK_S), D, offs_do, s_ok, do_ok)
            dbw = tl.dot(tl.trans(u), dv, input_precision=INPUT_PRECISION, out_dtype=ACC)  # (BLOCK_R, BLOCK_DO)
            tl.store(DBW_PART + (ph * R + offs_r[:, None]) * DO + d0 + offs_do[None, :], dbw,
                     mask=r_ok[:, None] & do_ok[None, :])


# ------------------------------------------------------------------ tile sizes
def experts_meta(s: int, dh: int, r: int, do: int, dtype: torch.dtype) -> dict:
    """Tiles of the projections (``dtype``: the accumulator dtype they run in):
    16 slots a program (the dot minimum; S = 10 recommended), dh, rank and do
    in chunks of up to 32 (16 in fp64), a program per do-slice."""
    block_do = block(do, maximum=cap(dtype, 32, 32))
    return dict(BLOCK_S=16, BLOCK_DH=block(dh, maximum=cap(dtype, 32, 32)), BLOCK_R=block(r, maximum=cap(dtype, 32, 32)),
                BLOCK_DO=block_do, NUM_VO=triton.cdiv(do, block_do), num_warps=4, num_stages=1)


def experts_norm_meta(d: int) -> dict:
    """The norm kernels: 16 slot rows a program, D in chunks of up to 64."""
    return dict(BLOCK_D=block(d, maximum=64), num_warps=4)


@functools.lru_cache(maxsize=None)
def experts_proj_metas(s: int, dh: int, r: int, do: int, dtype: torch.dtype) -> Ladder:
    """Tile candidates of the forward projection (``_launch.choose`` takes the
    first that compiles without spills): smaller rank and dh chunks."""
    return candidates(experts_meta(s, dh, r, do, dtype), ("BLOCK_R", "BLOCK_DH"))


@functools.lru_cache(maxsize=None)
def experts_proj_bwd_metas(s: int, dh: int, r: int, do: int, dtype: torch.dtype) -> Ladder:
    meta = experts_meta(s, dh, r, do, dtype)
    del meta["NUM_VO"]
    return candidates(meta, ("BLOCK_DO", "BLOCK_DH", "BLOCK_R"))


@functools.lru_cache(maxsize=None)
def experts_norm_metas(d: int) -> Ladder:
    return candidates(experts_norm_meta(d), ("BLOCK_D",))


# ------------------------------------------------------------------ launchers
def _params(shared_weight, shared_bias, expert_weights) -> dict:
    return dict(A=shared_weight.contiguous(), ABIAS=shared_bias.contiguous(), BW=expert_weights.contiguous(),
                SHARED=shared_weight.dim() == 3)


@on_device
def experts_forward(z: torch.Tensor, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    """Z (B, H, P, dh) in the accumulator dtype (fp32, or fp64) -> Y (B, P, D),
    the inverse norms (B, P) and v (B, P, D, before the norm), all in Z's
    dtype. Parameters in the layer's layout and dtype (upcast in the kernels)."""
    check_device(z)
    bsz, h, p, dh = z.shape
    e, _, r, do = expert_weights.shape
    s, d = p // e, h * do
    acc = dict(device=z.device, dtype=z.dtype)
    v = torch.empty(bsz, p, d, **acc)
    ns = triton.cdiv(s, 16)  # BLOCK_S: 16 slots a program, in every candidate
    args = dict(Z=z.contiguous(), **_params(shared_weight, shared_bias, expert_weights),
                CBIAS=expert_bias.contiguous(), V=v, S=s, E=e, H=h, NS=ns, DH=dh, R=r, DO=do,
                INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[z.dtype])
    meta, _ = choose(_experts_proj_kernel, z.device, args, experts_proj_metas(s, dh, r, do, z.dtype))
    launch(_experts_proj_kernel, (meta["NUM_VO"], e * h, bsz * ns), **args, **meta)
    y = torch.empty(bsz, p, d, **acc)
    inv_norm = torch.empty(bsz, p, **acc)
    rows = bsz * p
    args = dict(V=v, G=expert_gamma.contiguous(), Y=y, INV_NORM=inv_norm, ROWS=rows, P=p, S=s, D=d, BLOCK_ROWS=16,
                ACC=TORCH_TO_TL[z.dtype])
    meta, _ = choose(_experts_norm_kernel, z.device, args, experts_norm_metas(d))
    launch(_experts_norm_kernel, (triton.cdiv(rows, 16),), **args, **meta)
    return y, inv_norm, v


@on_device
def experts_backward(dy, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, v, inv_norm,
                     need_param_grads: bool = True, need_dz: bool = True):
    """dY (B, P, D) -> (dZ, dA, da, dBw, dc, dg), each None where not needed;
    v and inv_norm as ``experts_forward`` returned them. dZ (B, H, P, dh) in
    Z's dtype, parameter gradients in each parameter's dtype; the kernels work
    in the accumulator dtype of Z (fp32, or fp64). The per-program partials are
    summed by torch over (bag, slot block) and, for a shared A and a, over
    experts too: deterministic."""
    if not (need_param_grads or need_dz):
        return None, None, None, None, None, None
    check_device(dy, z)
    bsz, h, p, dh = z.shape
    e, _, r, do = expert_weights.shape
    s, d = p // e, h * do
    ns = triton.cdiv(s, 16)  # BLOCK_S
    acc = dict(device=z.device, dtype=acc_dtype(z.dtype))
    consts = dict(ACC=TORCH_TO_TL[acc["dtype"]])
    dv = torch.empty(bsz, p, d, **acc)
    # partials (B, NS, E, D) of dg and dc; where not needed, an input stands in (never written)
    dg_part, dc_part = [torch.empty(bsz, ns, e, d, **acc) for _ in range(2)] if need_param_grads else (v, v)
    args = dict(V=v, G=expert_gamma.contiguous(), INV_NORM=inv_norm, DY=dy.contiguous(), DV=dv, DG_PART=dg_part,
                DC_PART=dc_part, S=s, E=e, D=d, PARAM_GRADS=need_param_grads, BLOCK_S=16, **consts)
    meta, _ = choose(_experts_norm_bwd_kernel, z.device, args, experts_norm_metas(d))
    launch(_experts_norm_bwd_kernel, (ns, e, bsz), **args, **meta)
    args = dict(Z=z.contiguous(), **_params(shared_weight, shared_bias, expert_weights), DV=dv, S=s, E=e, H=h,
                NS=ns, DH=dh, R=r, DO=do, PARAM_GRADS=need_param_grads, INPUT_GRAD=need_dz,
                INPUT_PRECISION=input_precision(), **consts)
    meta, _ = choose(_experts_proj_bwd_kernel, z.device, {**args, **dict.fromkeys(
        ("DZ_PART", "DA_PART", "DABIAS_PART", "DBW_PART"), dv)}, experts_proj_bwd_metas(s, dh, r, do, z.dtype))
    num_r = triton.cdiv(r, meta["BLOCK_R"])
    dz_part = torch.empty(num_r, bsz, h, p, dh, **acc) if need_dz else z
    part_shapes = ((e, h, dh, r), (e, h, r), (e, h, r, do))  # dA, da, dBw partials per (bag, slot block)
    da_part, dab_part, dbw_part = ([torch.empty(bsz * ns, *shape, **acc) for shape in part_shapes]
                                   if need_param_grads else (z, z, z))
    launch(_experts_proj_bwd_kernel, (num_r, e * h, bsz * ns), DZ_PART=dz_part, DA_PART=da_part,
           DABIAS_PART=dab_part, DBW_PART=dbw_part, **args, **meta)
    dz = (dz_part.view(z.shape) if num_r == 1 else dz_part.sum(0)).to(z.dtype) if need_dz else None
    if not need_param_grads:
        return dz, None, None, None, None, None
    shared = shared_weight.dim() == 3
    da = da_part.sum((0, 1)) if shared else da_part.sum(0)  # a shared A and a: summed over experts too
    dab = dab_part.sum((0, 1)) if shared else dab_part.sum(0)
    grads = (da, dab, dbw_part.sum(0), dc_part.sum((0, 1)).reshape(e, h, do), dg_part.sum((0, 1)))
    params = (shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)
    return dz, *(g.reshape(prm.shape).to(prm.dtype) for g, prm in zip(grads, params))
