"""Experts: grouped low-rank matmuls on the B * P slot vectors, in one kernel.

Per slot (b, e, s) with input z = Z[b, :, e*S + s, :] (H heads x dh):

    u[h] = z[h] @ A[h] + a[h]          A (H, dh, r), or (E, H, dh, r) unshared
    v[h] = u[h] @ Bw[e, h] + c[e, h]   Bw (E, H, r, do)
    Y    = relu(v / max(||v||, 1e-8) * sqrt(D) * g[e])   norm over all D = H * do

One program takes BLOCK_S slots of one expert of one bag. The RMS norm spans
all heads, so a first sweep over the heads accumulates ||v||^2 and a second
recomputes v (a few kFLOP per slot) and writes Y. The work is independent of
N and tiny next to dispatch; what matters is one launch. Saved for backward:
the inverse norm per slot, (B, P) in the accumulator dtype (fp32; fp64 for
fp64 input).

Backward, with the same grid and the same two sweeps: the first recomputes v
and reduces <v, dw * g> over all heads (the norm's gradient couples them), the
second recomputes u and v and writes dZ and per-program partial parameter
gradients, which the launcher sums in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._launch import MIN_DOT, TORCH_TO_TL, acc_dtype, block, check_device, input_precision, on_device, traceable

L2NORM_EPS = tl.constexpr(1e-8)


@triton.jit
def _expert_head(
    Z, A, ABIAS, BW, CBIAS, b, e, h, P, H, R, DO,
    slot, offs_dh, offs_r, offs_do, s_ok, dh_ok, r_ok, do_ok,
    SHARED: tl.constexpr, DH: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Head h of the slots ``slot`` (BLOCK_S,) of expert e in bag b, in ACC:
    v = u @ Bw[e, h] + c[e, h] (BLOCK_S, BLOCK_DO), u = z @ A[h] + a[h] (BLOCK_S, BLOCK_R),
    and the tiles z (BLOCK_S, BLOCK_DH), A[h] (BLOCK_DH, BLOCK_R), Bw[e, h] (BLOCK_R, BLOCK_DO).
    Everything is zero in the padding, except u in padded slot rows (there u = a)."""
    ah = h if SHARED else e * H + h  # row of A (H, dh, r) or (E, H, dh, r), and of a
    eh = e * H + h  # row of Bw (E, H, r, do) and c (E, H, do)
    z = tl.load(Z + ((b * H + h) * P + slot[:, None]) * DH + offs_dh[None, :],
                mask=s_ok[:, None] & dh_ok[None, :], other=0.0).to(ACC)
    a = tl.load(A + (ah * DH + offs_dh[:, None]) * R + offs_r[None, :],
                mask=dh_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
    u = tl.dot(z, a, input_precision=INPUT_PRECISION)
    u += tl.load(ABIAS + ah * R + offs_r, mask=r_ok, other=0.0).to(ACC)[None, :]
    bw = tl.load(BW + (eh * R + offs_r[:, None]) * DO + offs_do[None, :],
                 mask=r_ok[:, None] & do_ok[None, :], other=0.0).to(ACC)
    v = tl.dot(u, bw, input_precision=INPUT_PRECISION)
    v += tl.load(CBIAS + eh * DO + offs_do, mask=do_ok, other=0.0).to(ACC)[None, :]
    v = tl.where(s_ok[:, None] & do_ok[None, :], v, 0.0)
    return v, u, z, a, bw


@triton.jit
def _head_w(G, v, scale, e, h, D, DO, offs_do, do_ok, ACC: tl.constexpr):
    """w = v * scale * g[e, h] before the ReLU (BLOCK_S, BLOCK_DO), and g[e, h] (BLOCK_DO,)."""
    g = tl.load(G + e * D + h * DO + offs_do, mask=do_ok, other=0.0).to(ACC)
    return v * scale[:, None] * g[None, :], g


@triton.jit
def _experts_fwd_kernel(
    Z, A, ABIAS, BW, CBIAS, G, Y, INV_NORM,
    S, H, R, DO,
    SHARED: tl.constexpr, DH: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    E = tl.num_programs(1)
    P = E * S
    D = H * DO

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_r = tl.arange(0, BLOCK_R)
    offs_do = tl.arange(0, BLOCK_DO)
    s_ok = offs_s < S
    dh_ok = offs_dh < DH
    r_ok = offs_r < R
    do_ok = offs_do < DO
    slot = e * S + offs_s  # p

    ssq = tl.zeros([BLOCK_S], ACC)
    for h in range(H):
        v = _expert_head(Z, A, ABIAS, BW, CBIAS, b, e, h, P, H, R, DO, slot, offs_dh, offs_r, offs_do,
                         s_ok, dh_ok, r_ok, do_ok, SHARED, DH, INPUT_PRECISION, ACC)[0]
        ssq += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ssq), L2NORM_EPS)
    tl.store(INV_NORM + b * P + slot, inv, mask=s_ok)

    scale = inv * tl.sqrt(D.to(ACC))
    for h in range(H):
        v = _expert_head(Z, A, ABIAS, BW, CBIAS, b, e, h, P, H, R, DO, slot, offs_dh, offs_r, offs_do,
                         s_ok, dh_ok, r_ok, do_ok, SHARED, DH, INPUT_PRECISION, ACC)[0]
        w = _head_w(G, v, scale, e, h, D, DO, offs_do, do_ok, ACC)[0]
        tl.store(Y + (b * P + slot[:, None]) * D + h * DO + offs_do[None, :], tl.maximum(w, 0.0),
                 mask=s_ok[:, None] & do_ok[None, :])


@triton.jit
def _experts_bwd_kernel(
    Z, A, ABIAS, BW, CBIAS, G, INV_NORM, DY, DZ,
    DA_PART, DABIAS_PART, DBW_PART, DCBIAS_PART, DG_PART,
    S, H, R, DO,
    SHARED: tl.constexpr, DH: tl.constexpr, PARAM_GRADS: tl.constexpr, INPUT_GRAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dZ (B, H, P, dh) for BLOCK_S slots of one expert of one bag, and this
    program's partial parameter gradients over them, stored at partial index
    (b, pid_s, e) of DA_PART (B, NS, E, H, dh, r), DABIAS_PART (B, NS, E, H, r),
    DBW_PART (B, NS, E, H, r, do), DCBIAS_PART and DG_PART (B, NS, E, D).

    With vhat = v * inv, dw = dY * (w > 0) and dvhat = dw * g * sqrt(D):
    dv = inv * (dvhat - vhat * <vhat, dvhat>) = scale * (dw * g - v * inv^2 * <v, dw * g>),
    scale = inv * sqrt(D), the inner products over all D values of the slot.
    Where ||v|| < 1e-8 the clamped norm is a constant and dv = scale * dw * g."""
    pid_s = tl.program_id(0)
    e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    NS = tl.num_programs(0)
    E = tl.num_programs(1)
    P = E * S
    D = H * DO

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_dh = tl.arange(0, BLOCK_DH)
    offs_r = tl.arange(0, BLOCK_R)
    offs_do = tl.arange(0, BLOCK_DO)
    s_ok = offs_s < S
    dh_ok = offs_dh < DH
    r_ok = offs_r < R
    do_ok = offs_do < DO
    slot = e * S + offs_s  # p
    sdo_ok = s_ok[:, None] & do_ok[None, :]
    dy_ptrs = DY + (b * P + slot[:, None]) * D + offs_do[None, :]  # + h * DO
    part = (b * NS + pid_s) * E + e  # this program's index in the partials' (B, NS, E)

    inv = tl.load(INV_NORM + b * P + slot, mask=s_ok, other=0.0).to(ACC)  # (BLOCK_S,), 0 in padding
    scale = inv * tl.sqrt(D.to(ACC))

    # Sweep 1: ||v||^2 (only to tell a clamped norm) and <v, dw * g> over all heads.
    ssq = tl.zeros([BLOCK_S], ACC)
    vdwg = tl.zeros([BLOCK_S], ACC)
    for h in range(H):
        v = _expert_head(Z, A, ABIAS, BW, CBIAS, b, e, h, P, H, R, DO, slot, offs_dh, offs_r, offs_do,
                         s_ok, dh_ok, r_ok, do_ok, SHARED, DH, INPUT_PRECISION, ACC)[0]
        w, g = _head_w(G, v, scale, e, h, D, DO, offs_do, do_ok, ACC)
        dw = tl.where(w > 0, tl.load(dy_ptrs + h * DO, mask=sdo_ok, other=0.0).to(ACC), 0.0)
        ssq += tl.sum(v * v, axis=1)
        vdwg += tl.sum(v * dw * g[None, :], axis=1)
    # torch's clamp_min passes the gradient where ||v|| >= eps
    coef = tl.where(tl.sqrt(ssq) >= L2NORM_EPS, inv * inv * vdwg, 0.0)  # (BLOCK_S,)

    # Sweep 2, per head: dv, then back through Bw and A.
    for h in range(H):
        v, u, z, a, bw = _expert_head(Z, A, ABIAS, BW, CBIAS, b, e, h, P, H, R, DO, slot, offs_dh, offs_r, offs_do,
                                      s_ok, dh_ok, r_ok, do_ok, SHARED, DH, INPUT_PRECISION, ACC)
        w, g = _head_w(G, v, scale, e, h, D, DO, offs_do, do_ok, ACC)
        dw = tl.where(w > 0, tl.load(dy_ptrs + h * DO, mask=sdo_ok, other=0.0).to(ACC), 0.0)
        dv = scale[:, None] * (dw * g[None, :] - v * coef[:, None])  # (BLOCK_S, BLOCK_DO), 0 in padding
        du = tl.dot(dv, tl.trans(bw), input_precision=INPUT_PRECISION)  # (BLOCK_S, BLOCK_R), 0 in padding
        if INPUT_GRAD:
            dz = tl.dot(du, tl.trans(a), input_precision=INPUT_PRECISION)  # (BLOCK_S, BLOCK_DH)
            tl.store(DZ + ((b * H + h) * P + slot[:, None]) * DH + offs_dh[None, :], dz.to(DZ.dtype.element_ty),
                     mask=s_ok[:, None] & dh_ok[None, :])
        if PARAM_GRADS:
            ph = part * H + h
            tl.store(DG_PART + part * D + h * DO + offs_do, tl.sum(dw * v * scale[:, None], axis=0), mask=do_ok)
            tl.store(DCBIAS_PART + part * D + h * DO + offs_do, tl.sum(dv, axis=0), mask=do_ok)
            dbw = tl.dot(tl.trans(u), dv, input_precision=INPUT_PRECISION)  # (BLOCK_R, BLOCK_DO)
            tl.store(DBW_PART + (ph * R + offs_r[:, None]) * DO + offs_do[None, :], dbw,
                     mask=r_ok[:, None] & do_ok[None, :])
            tl.store(DABIAS_PART + ph * R + offs_r, tl.sum(du, axis=0), mask=r_ok)
            da = tl.dot(tl.trans(z), du, input_precision=INPUT_PRECISION)  # (BLOCK_DH, BLOCK_R)
            tl.store(DA_PART + (ph * DH + offs_dh[:, None]) * R + offs_r[None, :], da,
                     mask=dh_ok[:, None] & r_ok[None, :])


def experts_meta(s: int, dh: int, r: int, do: int) -> dict:
    """One program per 16..32 slots of an expert; every dot dim padded to >= 16."""
    return dict(BLOCK_S=block(s, maximum=32), BLOCK_DH=block(dh), BLOCK_R=block(r), BLOCK_DO=block(do),
                num_warps=4, num_stages=1)


def experts_bwd_meta(s: int, dh: int, r: int, do: int) -> dict:
    """As the forward, but 16 slots a program (the dot minimum): the second
    sweep holds about twice the forward's tiles. On sm_90a at the recommended
    sizes, 16 slots take about 180 registers in fp32 and 254 in fp64, no
    spills; 32 slots spill (tf32 and fp64)."""
    return {**experts_meta(s, dh, r, do), "BLOCK_S": MIN_DOT}


@on_device
def experts_forward(z: torch.Tensor, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    """Z (B, H, P, dh) in the accumulator dtype (fp32, or fp64) -> Y (B, P, D)
    and the inverse norms (B, P), both in Z's dtype. Parameters in the layer's
    layout and dtype (upcast in the kernel)."""
    check_device(z)
    bsz, h, p, dh = z.shape
    e, _, r, do = expert_weights.shape
    s = p // e
    meta = experts_meta(s, dh, r, do)
    y = torch.empty(bsz, p, h * do, device=z.device, dtype=z.dtype)
    inv_norm = torch.empty(bsz, p, device=z.device, dtype=z.dtype)
    grid = (triton.cdiv(s, meta["BLOCK_S"]), e, bsz)
    traceable(_experts_fwd_kernel)[grid](
        z.contiguous(), shared_weight.contiguous(), shared_bias.contiguous(), expert_weights.contiguous(),
        expert_bias.contiguous(), expert_gamma.contiguous(), y, inv_norm,
        s, h, r, do,
        SHARED=shared_weight.dim() == 3, DH=dh, INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[z.dtype],
        **meta,
    )
    return y, inv_norm


@on_device
def experts_backward(dy, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, inv_norm,
                     need_param_grads: bool = True, need_dz: bool = True):
    """dY (B, P, D) -> (dZ, dA, da, dBw, dc, dg), each None where not needed.
    dZ (B, H, P, dh) in Z's dtype, parameter gradients in each parameter's
    dtype; the kernel works in the accumulator dtype of Z (fp32, or fp64).
    The per-program partials are summed by torch over (bag, slot block) and,
    for a shared A and a, over experts too: deterministic."""
    if not (need_param_grads or need_dz):
        return None, None, None, None, None, None
    check_device(dy, z)
    bsz, h, p, dh = z.shape
    e, _, r, do = expert_weights.shape
    s = p // e
    params = (shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)
    meta = experts_bwd_meta(s, dh, r, do)
    ns = triton.cdiv(s, meta["BLOCK_S"])
    acc = dict(device=z.device, dtype=acc_dtype(z.dtype))
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype) if need_dz else None
    # partials (B, NS, E, ...) of dA, da, dBw, dc, dg; where not needed, z and dy stand in as
    # pointers that are never written
    part_shapes = ((h, dh, r), (h, r), (h, r, do), (h * do,), (h * do,))
    parts = [torch.empty(bsz, ns, e, *shape, **acc) for shape in part_shapes] if need_param_grads else [dy] * 5
    traceable(_experts_bwd_kernel)[(ns, e, bsz)](
        z.contiguous(), *(t.contiguous() for t in params), inv_norm.contiguous(), dy.contiguous(),
        z if dz is None else dz, *parts,
        s, h, r, do,
        SHARED=shared_weight.dim() == 3, DH=dh, PARAM_GRADS=need_param_grads, INPUT_GRAD=need_dz,
        INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[acc["dtype"]], **meta,
    )
    if not need_param_grads:
        return dz, None, None, None, None, None
    lora_dims = (0, 1, 2) if shared_weight.dim() == 3 else (0, 1)  # a shared A and a: summed over experts too
    sum_dims = (lora_dims, lora_dims, (0, 1), (0, 1), (0, 1))
    return dz, *(part.sum(dims).reshape(prm.shape).to(prm.dtype) for part, dims, prm in zip(parts, sum_dims, params))


class ExpertsFunction(torch.autograd.Function):
    """Y = experts(Z) with the kernels; saves Z, the parameters and the inverse
    norms (B, P): nothing of size B * P * D."""

    @staticmethod
    def forward(ctx, z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
        y, inv_norm = _ops.experts_forward(z.to(acc_dtype(z.dtype)), shared_weight, shared_bias, expert_weights,
                                      expert_bias, expert_gamma)
        ctx.save_for_backward(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma, inv_norm)
        # no no-op .to(): under torch.compile, torch 2.11 drops the gradient of a
        # Function output that is a no-op .to() of a custom op's output (zeros in backward)
        return y if y.dtype == z.dtype else y.to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        need_dz, *need_params = ctx.needs_input_grad
        grads = _ops.experts_backward(dy, *ctx.saved_tensors, need_param_grads=any(need_params), need_dz=need_dz)
        return grads[0], *(g if need else None for g, need in zip(grads[1:], need_params))


def experts(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma):
    """Differentiable experts: Z (B, H, P, dh) -> Y (B, P, D)."""
    return ExpertsFunction.apply(z, shared_weight, shared_bias, expert_weights, expert_bias, expert_gamma)


from . import _ops  # noqa: E402  (the launchers as custom ops; imports this module)
