"""Slot dropout: the keep-mask on the routing logits, drawn from a counter-based
RNG so that no N x H x P mask is ever stored.

One Philox4x32-10 call gives four 32-bit draws, one for each of four
consecutive slots: with row = (b*N + n)*H + h,

    keep[b, n, h, p] = lane (p % 4) of tl.randint4x(seed, row * cdiv(P, 4) + p // 4) >= p_drop * 2**32

(unsigned compare; p_drop travels as fp32, so the keep probability is
1 - p_drop to about 2**-24 relative, and ``kernel_p_drop`` keeps p_drop
below 1 in fp32 so that the threshold fits in 32 bits).
Every kernel (dispatch and combine, forward and backward) regenerates the
same bits from the seed, whatever its tile shape: ``slot_keep_np`` and
``slot_keep_pn`` draw a tile of slots p0 + arange(BLOCK_P), p0 a multiple of
4, with one Philox call per four entries. Philox dominates the dispatch's
work per logit (the dots run on tensor cores), so the tiled draw matters.
``slot_keep_mask`` writes the mask out, for tests and for ``return_weights``.

The seed travels as a (1,) int64 tensor on the kernels' device, read by
``load_seed`` in each kernel, never as a launch-time constant: drawing it is a
device op (no host sync, no graph break under torch.compile), and a captured
CUDA graph redraws it on every replay instead of replaying one mask.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device

LANES = tl.constexpr(4)  # draws per Philox call, for consecutive slots


@triton.jit
def load_seed(SEED, HAS_DROP: tl.constexpr):
    """The slot-dropout seed, read from its (1,) int64 tensor; 0 without dropout."""
    seed = 0
    if HAS_DROP:
        seed = tl.load(SEED)
    return seed


@triton.jit
def _threshold(p_drop):
    """Draws at or above p_drop * 2**32 keep their logit (p_drop in [0, 1))."""
    return (tl.cast(p_drop, tl.float32) * 4294967296.0).to(tl.uint32)


@triton.jit
def _row(b, offs_n, h, N, H):
    """(b*N + n)*H + h in int64: the mask's (B, N, H) row of the patches offs_n."""
    return (b * N + offs_n.to(tl.int64)) * H + h


@triton.jit
def _keep4(seed, p_drop, counter):
    """Keep bits of the four slots of each counter: (*counter.shape, 2, 2), lane 2 i + j at [..., i, j]."""
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    thr = _threshold(p_drop)
    return tl.join(tl.join(r0 >= thr, r2 >= thr), tl.join(r1 >= thr, r3 >= thr))


@triton.jit
def slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P: tl.constexpr):
    """Keep bits (BLOCK_N, BLOCK_P) of the patches offs_n (BLOCK_N,) and the slots
    p0 + arange(BLOCK_P), p0 % 4 == 0: one Philox call per 4 slots."""
    groups = p0 // LANES + tl.arange(0, BLOCK_P // LANES)
    counter = _row(b, offs_n, h, N, H)[:, None] * tl.cdiv(P, LANES) + groups[None, :]  # (BLOCK_N, BLOCK_P / 4)
    keep = _keep4(seed, p_drop, counter)  # (BLOCK_N, BLOCK_P / 4, 2, 2)
    return tl.reshape(keep, (offs_n.shape[0], BLOCK_P))


@triton.jit
def slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P: tl.constexpr):
    """``slot_keep_np`` transposed: (BLOCK_P, BLOCK_N)."""
    groups = p0 // LANES + tl.arange(0, BLOCK_P // LANES)
    counter = _row(b, offs_n, h, N, H)[None, :] * tl.cdiv(P, LANES) + groups[:, None]  # (BLOCK_P / 4, BLOCK_N)
    keep = tl.permute(_keep4(seed, p_drop, counter), (0, 2, 3, 1))  # (BLOCK_P / 4, 2, 2, BLOCK_N)
    return tl.reshape(keep, (BLOCK_P, offs_n.shape[0]))


@triton.jit
def _slot_keep_mask_kernel(OUT, SEED, p_drop, N, H, P, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    seed = tl.load(SEED)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        keep = slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P)
        ok = (offs_n[:, None] < N) & (offs_p[None, :] < P)
        tl.store(OUT + ((b * N + offs_n[:, None]) * H + h) * P + offs_p[None, :], keep.to(tl.int8), mask=ok)


def slot_keep_mask_meta() -> dict:
    return dict(BLOCK_N=32, BLOCK_P=64)


MAX_P_DROP = 1.0 - 2.0**-24  # the largest fp32 below 1


def kernel_p_drop(p_drop: float) -> float:
    """p_drop as the kernels take it: in fp32 a p_drop within 3e-8 of 1 rounds to
    1.0, whose threshold 2**32 overflows uint32; clamp it to the largest fp32 below 1."""
    return min(float(p_drop), MAX_P_DROP)


def seed_tensor(seed, device) -> torch.Tensor:
    """A slot-dropout seed (a Python int, or a tensor holding one) as the kernels
    read it: a (1,) int64 tensor on ``device``."""
    return torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)


@on_device
def slot_keep_mask(seed, p_drop: float, b: int, n: int, h: int, p: int, device) -> torch.Tensor:
    """The (B, N, H, P) bool keep-mask the kernels use for ``seed`` (an int or a
    (1,) int64 tensor; N*H*P values: tests and return_weights only)."""
    out = torch.empty(b, n, h, p, device=device, dtype=torch.int8)
    meta = slot_keep_mask_meta()
    grid = (triton.cdiv(n, meta["BLOCK_N"]), b * h)
    _slot_keep_mask_kernel[grid](out, seed_tensor(seed, device), kernel_p_drop(p_drop), n, h, p, **meta)
    return out.bool()
