"""Slot dropout: the keep-mask on the routing logits, drawn from a counter-based
RNG so that no N x H x P mask is ever stored.

Every kernel (dispatch and combine, forward and backward) regenerates the
same bits from the seed, whatever its tile shape: ``slot_keep_np`` and
``slot_keep_pn`` draw a tile of slots p0 + arange(BLOCK_P) of the patches
offs_n, and the bit of logit (b, n, h, p) depends on the seed, (b, n, h, p)
and the sizes alone. The generator drives the dispatch's work per logit (its
dots run on tensor cores), so there are two, picked by the ``FAST_RNG``
constexpr of the kernels (and ``fast_rng`` of ``slot_keep_mask``); they give
different masks.

``FAST_RNG=False``: Philox4x32-10, the legacy plan's generator. One
``tl.randint4x`` call gives four 32-bit draws, one for each of four
consecutive slots: with row = (b*N + n)*H + h,

    keep[b, n, h, p] = lane (p % 4) of tl.randint4x(seed, row * cdiv(P, 4) + p // 4) >= p_drop * 2**32

(p0 and BLOCK_P multiples of 4). 10 rounds of 2 mul.hi + 2 mul.lo per four
logits: 10 32-bit multiplies per logit (5 IMAD.WIDE in SASS), and the four
lanes regrouped into the tile.

``FAST_RNG=True``: one keyed 32-bit integer hash per logit, the default of the
new kernel plan. Within one (bag, head) the counter is n*P + p, in 32 bits:

    ka, km = the keys of (seed, b*H + h)                     # per (bag, head)
    k  = km + (n*P >> 32) * 0x9e3779b9                       # per patch (mod 2**32)
    x  = (n*P + p + ka) mod 2**32                            # per logit
    x ^= x >> 16;  x *= 0x7feb352d
    x ^= (x >> 15) ^ k;  x *= 0x846ca68b
    keep[b, n, h, p] = x >= p_drop * 2**32

The hash is Chris Wellons' ``lowbias32``, the hash-prospector's best 32-bit
integer hash with two multiplies (https://github.com/skeeto/hash-prospector,
"Prospecting for Hash Functions", https://nullprogram.com/blog/2018/07/31/),
keyed: ka added to its input, k xored in between its two multiply rounds (in
the 3-input xor that is there anyway); and without its final ``x ^= x >> 16``,
which changes only the low 16 bits: the compare reads those only where the top
16 bits tie the threshold's, and x is a bijection of the counter either way.
The keys: a 3-round Feistel network with lowbias32 rounds turns the 64-bit seed
into (sa, sb), a bijection; then ka = lowbias32(lowbias32(t ^ sa) ^ sb) and
km = lowbias32(ka ^ sa) for t = b*H + h (for one seed a bijection of t, for one
t a bijection of the seed). Why so:

* cost: per logit 1 IMAD for the counter and key, 2 for the hash, 2 shifts,
  2 xors (LOP3) and the compare; per patch an IMAD.HI and an IMAD (the Weyl
  step of k); per slot an add. No 64-bit arithmetic, and nothing per (b, n, h)
  row: N does not enter. Against Philox-10: 3 32-bit multiplies a logit
  instead of 10 and one word of state instead of four per four logits; in the
  dispatch and combine loops (sm_90a, bf16, recommended size) 1.3-3x fewer
  IMADs and up to 60% fewer generator instructions (a third fewer in the
  dispatch forward, about as many in dispatch dK, where Philox's four lanes
  fall in place), as many or fewer registers except in the dispatch forward
  (126 against 100: the per-patch keys, 16 patches a thread in its P-major
  MMA layout).
* no repeats: for one (bag, head) the draw's input n*P + p + ka is a bijection
  of the counter, so no two logits of a (bag, head) share a draw while
  N*P <= 2**32 (N up to 4.2M at P = 1024). Past that, logits whose counters
  agree mod 2**32 lie in different 2**32 epochs, n*P >> 32, and their mid-hash
  keys differ by multiples of the golden-ratio Weyl increment (the key schedule
  of Philox, the gamma of SplitMix): no shifted or xor-permuted copy of another
  epoch's mask (but a few pairs of logits next to each multiple of 2**32 when
  P is not a power of two). Different (bag, head)s, and different seeds, get
  different key pairs. (n, P and b*H + h are taken mod 2**32: far past any
  real size.)
* quality: a mask bit is one threshold compare of the top bits of the last
  multiply; the tests check the keep rate and the independence of adjacent
  slots, patches, heads, bags and seeds (chi-square and correlation), and that
  masks 2**32 counters apart do not repeat.

p_drop travels as fp32, so the keep probability is 1 - p_drop to about
2**-24 relative, and ``kernel_p_drop`` keeps p_drop below 1 in fp32 so that the
threshold fits in 32 bits. ``slot_keep_mask`` writes the mask out, for tests
and for ``return_weights``.

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


LOWBIAS_M1 = tl.constexpr(0x7FEB352D)  # lowbias32's multipliers (Wellons' hash-prospector)
LOWBIAS_M2 = tl.constexpr(0x846CA68B)
WEYL = tl.constexpr(0x9E3779B9)  # 2**32 / golden ratio: the patch epochs' key increment
FEISTEL_C0 = tl.constexpr(0x9E3779B9)  # the seed's Feistel round constants (golden ratio, Murmur3's)
FEISTEL_C1 = tl.constexpr(0x85EBCA6B)
FEISTEL_C2 = tl.constexpr(0xC2B2AE35)


@triton.jit
def _lowbias32(x):
    """Wellons' lowbias32 of a uint32 tensor: a bijection of the 32-bit words."""
    x = x ^ (x >> 16)
    x = tl.mul(x, LOWBIAS_M1, sanitize_overflow=False)
    x = x ^ (x >> 15)
    x = tl.mul(x, LOWBIAS_M2, sanitize_overflow=False)
    return x ^ (x >> 16)


@triton.jit
def _seed_keys(seed):
    """(sa, sb), uint32, of the int64 seed: a 3-round Feistel network with
    lowbias32 rounds on its low and high words (a bijection of the seed)."""
    s = tl.cast(seed, tl.int64)
    sa = s.to(tl.uint32)
    sb = (s >> 32).to(tl.uint32)
    sb = sb ^ _lowbias32(sa ^ FEISTEL_C0)
    sa = sa ^ _lowbias32(sb ^ FEISTEL_C1)
    sb = sb ^ _lowbias32(sa ^ FEISTEL_C2)
    return sa, sb


@triton.jit
def _head_keys(seed, b, h, H):
    """(ka, km), uint32, of bag b and head h: for one seed a bijection of
    b*H + h, for one (b, h) a bijection of the seed."""
    sa, sb = _seed_keys(seed)
    t = tl.cast(b * H + h, tl.int64).to(tl.uint32)
    ka = _lowbias32(_lowbias32(t ^ sa) ^ sb)
    km = _lowbias32(ka ^ sa)
    return ka, km


@triton.jit
def _hash_keep(seed, p_drop, b, h, H, P, n, p):
    """Keep bits of the patches n and slots p (integer tensors that broadcast
    against each other) of bag b, head h: the keyed lowbias32 of the module
    docstring. Scalar work per (bag, head), loop-invariant in the kernels."""
    ka, km = _head_keys(seed, b, h, H)
    n32 = n.to(tl.uint32)
    P32 = tl.cast(P, tl.uint32)
    k = tl.add(tl.mul(tl.umulhi(n32, P32), WEYL, sanitize_overflow=False), km, sanitize_overflow=False)
    x = tl.add(tl.mul(n32, P32, sanitize_overflow=False), tl.add(p.to(tl.uint32), ka, sanitize_overflow=False),
               sanitize_overflow=False)
    x = x ^ (x >> 16)
    x = tl.mul(x, LOWBIAS_M1, sanitize_overflow=False)
    x = x ^ (x >> 15) ^ k
    x = tl.mul(x, LOWBIAS_M2, sanitize_overflow=False)
    return x >= _threshold(p_drop)


@triton.jit
def slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P: tl.constexpr, FAST_RNG: tl.constexpr = False):
    """Keep bits (BLOCK_N, BLOCK_P) of the patches offs_n (BLOCK_N,) and the slots
    p0 + arange(BLOCK_P). FAST_RNG: one keyed lowbias32 hash per slot, any p0;
    else one Philox call per 4 slots, p0 % 4 == 0."""
    if FAST_RNG:
        keep = _hash_keep(seed, p_drop, b, h, H, P, offs_n[:, None], (p0 + tl.arange(0, BLOCK_P))[None, :])
    else:
        groups = p0 // LANES + tl.arange(0, BLOCK_P // LANES)
        counter = _row(b, offs_n, h, N, H)[:, None] * tl.cdiv(P, LANES) + groups[None, :]  # (BLOCK_N, BLOCK_P / 4)
        keep4 = _keep4(seed, p_drop, counter)  # (BLOCK_N, BLOCK_P / 4, 2, 2)
        keep = tl.reshape(keep4, (offs_n.shape[0], BLOCK_P))
    return keep


@triton.jit
def slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P: tl.constexpr, FAST_RNG: tl.constexpr = False):
    """``slot_keep_np`` transposed: (BLOCK_P, BLOCK_N)."""
    if FAST_RNG:
        keep = _hash_keep(seed, p_drop, b, h, H, P, offs_n[None, :], (p0 + tl.arange(0, BLOCK_P))[:, None])
    else:
        groups = p0 // LANES + tl.arange(0, BLOCK_P // LANES)
        counter = _row(b, offs_n, h, N, H)[None, :] * tl.cdiv(P, LANES) + groups[:, None]  # (BLOCK_P / 4, BLOCK_N)
        keep4 = tl.permute(_keep4(seed, p_drop, counter), (0, 2, 3, 1))  # (BLOCK_P / 4, 2, 2, BLOCK_N)
        keep = tl.reshape(keep4, (BLOCK_P, offs_n.shape[0]))
    return keep


@triton.jit
def _slot_keep_mask_kernel(OUT, SEED, p_drop, N, H, P, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                           FAST_RNG: tl.constexpr):
    seed = tl.load(SEED)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        keep = slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
        ok = (offs_n[:, None] < N) & (offs_p[None, :] < P)
        tl.store(OUT + ((b * N + offs_n[:, None]) * H + h) * P + offs_p[None, :], keep.to(tl.int8), mask=ok)


def slot_keep_mask_meta() -> dict:
    return dict(BLOCK_N=32, BLOCK_P=64)


MAX_P_DROP = 1.0 - 2.0**-24  # the largest fp32 below 1


def kernel_p_drop(p_drop: float) -> float:
    """p_drop as the kernels take it: in fp32 a p_drop within 3e-8 of 1 rounds to
    1.0, whose threshold 2**32 overflows uint32; clamp it to the largest fp32 below 1."""
    return min(float(p_drop), MAX_P_DROP)


def fast_rng(drop, legacy: bool) -> bool:
    """The slot-dropout generator of a plan: the one-hash generator, Philox in the
    legacy plan (False without slot dropout: the flag is then unused)."""
    return drop is not None and not legacy


def seed_tensor(seed, device) -> torch.Tensor:
    """A slot-dropout seed (a Python int, or a tensor holding one) as the kernels
    read it: a (1,) int64 tensor on ``device``."""
    return torch.as_tensor(seed, dtype=torch.int64, device=device).reshape(1)


@on_device
def slot_keep_mask(seed, p_drop: float, b: int, n: int, h: int, p: int, device, fast_rng: bool = False) -> torch.Tensor:
    """The (B, N, H, P) bool keep-mask the kernels use for ``seed`` (an int or a
    (1,) int64 tensor; N*H*P values: tests and return_weights only), drawn with
    the kernels' FAST_RNG=``fast_rng`` generator (Philox without it)."""
    out = torch.empty(b, n, h, p, device=device, dtype=torch.int8)
    meta = slot_keep_mask_meta()
    grid = (triton.cdiv(n, meta["BLOCK_N"]), b * h)
    _slot_keep_mask_kernel[grid](out, seed_tensor(seed, device), kernel_p_drop(p_drop), n, h, p,
                                 FAST_RNG=bool(fast_rng), **meta)
    return out.bool()
