"""Slot dropout: the keep-mask on the routing logits, drawn from a counter-based
RNG so that no N x H x P mask is ever stored.

Entry (b, n, h, p) of the mask is ``tl.rand(seed, ((b*N + n)*H + h)*P + p) >= p_drop``:
every kernel (dispatch and combine, forward and backward) regenerates the
same bits from the seed, whatever its tile shape. ``slot_keep_mask`` writes
the mask out, for tests and for ``return_weights``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def slot_keep(seed, p_drop, b, offs_n, h, offs_p, N, H, P):
    """Keep bits for the tile offs_n x offs_p (any 2-D broadcast of the two)."""
    off = ((b * N + offs_n.to(tl.int64)) * H + h) * P + offs_p
    return tl.rand(seed, off) >= p_drop


@triton.jit
def _slot_keep_mask_kernel(OUT, seed, p_drop, N, H, P, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        keep = slot_keep(seed, p_drop, b, offs_n[:, None], h, offs_p[None, :], N, H, P)
        ok = (offs_n[:, None] < N) & (offs_p[None, :] < P)
        tl.store(OUT + ((b * N + offs_n[:, None]) * H + h) * P + offs_p[None, :], keep.to(tl.int8), mask=ok)


def slot_keep_mask(seed: int, p_drop: float, b: int, n: int, h: int, p: int, device) -> torch.Tensor:
    """The (B, N, H, P) bool keep-mask the kernels use for ``seed`` (N*H*P: tests and return_weights only)."""
    out = torch.empty(b, n, h, p, device=device, dtype=torch.int8)
    _slot_keep_mask_kernel[(triton.cdiv(n, 32), b * h)](out, seed, p_drop, n, h, p, BLOCK_N=32, BLOCK_P=64)
    return out.bool()
