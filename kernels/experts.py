"""Experts: grouped low-rank matmuls on the B * P slot vectors, in one kernel.

Per slot (b, e, s) with input z = Z[b, :, e*S + s, :] (H heads x dh):

    u[h] = z[h] @ A[h] + a[h]          A (H, dh, r), or (E, H, dh, r) unshared
    v[h] = u[h] @ Bw[e, h] + c[e, h]   Bw (E, H, r, do)
    Y    = relu(v / max(||v||, 1e-8) * sqrt(D) * g[e])   norm over all D = H * do

One program takes BLOCK_S slots of one expert of one bag. The RMS norm spans
all heads, so a first sweep over the heads accumulates ||v||^2 and a second
recomputes v (a few kFLOP per slot) and writes Y. The work is independent of
N and tiny next to dispatch; what matters is one launch. Saved for backward:
the inverse norm per slot, (B, P) fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import TORCH_TO_TL, acc_dtype, block, check_device, input_precision


@triton.jit
def _expert_head(
    z_ptrs, a_ptrs, abias_ptrs, bw_ptrs, cbias_ptrs, s_ok, dh_ok, r_ok, do_ok,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """v = (z @ A + a) @ Bw + c for one head: (BLOCK_S, BLOCK_DO) fp32, zero in padding."""
    z = tl.load(z_ptrs, mask=s_ok[:, None] & dh_ok[None, :], other=0.0).to(ACC)
    a = tl.load(a_ptrs, mask=dh_ok[:, None] & r_ok[None, :], other=0.0).to(ACC)
    u = tl.dot(z, a, input_precision=INPUT_PRECISION)
    u += tl.load(abias_ptrs, mask=r_ok, other=0.0).to(ACC)[None, :]
    bw = tl.load(bw_ptrs, mask=r_ok[:, None] & do_ok[None, :], other=0.0).to(ACC)
    v = tl.dot(u, bw, input_precision=INPUT_PRECISION)
    v += tl.load(cbias_ptrs, mask=do_ok, other=0.0).to(ACC)[None, :]
    return tl.where(s_ok[:, None] & do_ok[None, :], v, 0.0)


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
    a_lead = 0 if SHARED else e * H  # A (H, dh, r) or (E, H, dh, r)

    ssq = tl.zeros([BLOCK_S], ACC)
    for h in range(H):
        v = _expert_head(
            Z + ((b * H + h) * P + slot[:, None]) * DH + offs_dh[None, :],
            A + ((a_lead + h) * DH + offs_dh[:, None]) * R + offs_r[None, :],
            ABIAS + (a_lead + h) * R + offs_r,
            BW + ((e * H + h) * R + offs_r[:, None]) * DO + offs_do[None, :],
            CBIAS + (e * H + h) * DO + offs_do,
            s_ok, dh_ok, r_ok, do_ok, INPUT_PRECISION, ACC,
        )
        ssq += tl.sum(v * v, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-8)
    tl.store(INV_NORM + b * P + slot, inv, mask=s_ok)

    scale = inv * tl.sqrt(D.to(ACC))
    for h in range(H):
        v = _expert_head(
            Z + ((b * H + h) * P + slot[:, None]) * DH + offs_dh[None, :],
            A + ((a_lead + h) * DH + offs_dh[:, None]) * R + offs_r[None, :],
            ABIAS + (a_lead + h) * R + offs_r,
            BW + ((e * H + h) * R + offs_r[:, None]) * DO + offs_do[None, :],
            CBIAS + (e * H + h) * DO + offs_do,
            s_ok, dh_ok, r_ok, do_ok, INPUT_PRECISION, ACC,
        )
        g = tl.load(G + e * D + h * DO + offs_do, mask=do_ok, other=0.0).to(ACC)
        y = tl.maximum(v * scale[:, None] * g[None, :], 0.0)
        tl.store(Y + (b * P + slot[:, None]) * D + h * DO + offs_do[None, :], y, mask=s_ok[:, None] & do_ok[None, :])


def experts_meta(s: int, dh: int, r: int, do: int) -> dict:
    """One program per 16..32 slots of an expert; every dot dim padded to >= 16."""
    return dict(BLOCK_S=block(s, maximum=32), BLOCK_DH=block(dh), BLOCK_R=block(r), BLOCK_DO=block(do),
                num_warps=4, num_stages=1)


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
    _experts_fwd_kernel[grid](
        z.contiguous(), shared_weight.contiguous(), shared_bias.contiguous(), expert_weights.contiguous(),
        expert_bias.contiguous(), expert_gamma.contiguous(), y, inv_norm,
        s, h, r, do,
        SHARED=shared_weight.dim() == 3, DH=dh, INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[z.dtype],
        **meta,
    )
    return y, inv_norm
