"""Slot dropout's two counter-based generators (kernels/_slot_dropout.py):
Philox4x32-10 (FAST_RNG=False) and the keyed lowbias32 hash (FAST_RNG=True).

Each is checked bit for bit against a numpy model of its docstring formula
(for Philox: the mask of the plan before FAST_RNG, unchanged); the fast one's
keep rate and the independence of neighbouring logits (slots, patches, heads,
bags) and of seeds (chi-square on the 2x2 tables, and the correlation of the
bits); every tile (np or pn, any BLOCK_P, any p0) gives the same bit for the
same (b, n, h, p), which is what lets forward and backward kernels with
different tiles see one mask, also where the counters pass 2**32; and logits
whose counters agree mod 2**32 do not repeat each other's bits. On CPU the
kernels run under TRITON_INTERPRET=1 (conftest); the statistics draw their
masks with large tiles, which the interpreter runs far faster than the
launcher's 32 x 64 (the tile-invariance test is what makes that legitimate).
"""
import functools
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from mammoth_fast.kernels._slot_dropout import (
    _slot_keep_mask_kernel, kernel_p_drop, seed_tensor, slot_keep_mask, slot_keep_np, slot_keep_pn,
)

U32 = np.uint64(0xFFFFFFFF)
SEED = 0x5EED_1234_ABCD  # past 32 bits: both seed words matter
STATS_SHAPE = (2, 300, 4, 300)  # (B, N, H, P): 720k draws
P_DROPS = (0.1, 0.5, 0.9)


# ------------------------------------------------------------------ numpy models of the two generators
def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = _u64(x) & U32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & U32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & U32
    return x ^ (x >> np.uint64(16))


def _fast_draws(seed: int, b: int, h: int, H: int, P: int, n: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The keyed lowbias32 of the module docstring, in 64-bit numpy arithmetic."""
    s = seed % 2**64
    sa, sb = _u64(s & 0xFFFFFFFF), _u64(s >> 32)
    sb = sb ^ _lowbias32(sa ^ np.uint64(0x9E3779B9))
    sa = sa ^ _lowbias32(sb ^ np.uint64(0x85EBCA6B))
    sb = sb ^ _lowbias32(sa ^ np.uint64(0xC2B2AE35))
    t = _u64((b * H + h) % 2**32)
    ka = _lowbias32(_lowbias32(t ^ sa) ^ sb)
    km = _lowbias32(ka ^ sa)
    nP = _u64(n) * np.uint64(P)  # < 2**64
    k = ((nP >> np.uint64(32)) * np.uint64(0x9E3779B9) + km) & U32
    x = (nP + _u64(p) + ka) & U32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & U32
    x ^= (x >> np.uint64(15)) ^ k
    return (x * np.uint64(0x846CA68B)) & U32


def _philox_draws(seed: int, counter: np.ndarray) -> tuple:
    """Philox4x32-10 of (counter lo, counter hi, 0, 0) under the key (seed lo, seed hi), as tl.randint4x."""
    s = seed % 2**64
    c = _u64(counter)
    c0, c1, c2, c3 = c & U32, c >> np.uint64(32), c * np.uint64(0), c * np.uint64(0)
    k0, k1 = _u64(s & 0xFFFFFFFF), _u64(s >> 32)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        pa, pb = a * c0, b * c2  # < 2**64
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & U32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & U32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & U32, (k1 + np.uint64(0xBB67AE85)) & U32
    return c0, c1, c2, c3


def _threshold(p_drop: float) -> np.uint64:
    return np.uint64(int(np.float32(kernel_p_drop(p_drop)) * np.float32(2.0**32)))


def reference_bits(seed, p_drop, b, ns, h, N, H, P, fast: bool) -> np.ndarray:
    """(len(ns), P) keep bits of the patches ns of bag b, head h."""
    if fast:
        return _fast_draws(seed, b, h, H, P, np.asarray(ns)[:, None], np.arange(P)[None, :]) >= _threshold(p_drop)
    row = (b * N + np.asarray(ns, dtype=object)[:, None]) * H + h  # Python ints: exact past 2**63
    p = np.arange(P, dtype=object)[None, :]
    lanes = _philox_draws(seed, (row * (-(-P // 4)) + p // 4).astype(np.uint64))
    draws = np.choose((p % 4).astype(np.int64) + 0 * row.astype(np.int64), lanes)
    return draws >= _threshold(p_drop)


# ------------------------------------------------------------------ kernels
@triton.jit
def _tile_kernel(OUT_NP, OUT_PN, SEED, p_drop, NS, b, h, p0, N, H, P,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, FAST_RNG: tl.constexpr):
    """One (BLOCK_N, BLOCK_P) tile of the patches NS and slots p0 + arange(BLOCK_P),
    drawn through slot_keep_np and through slot_keep_pn (stored transposed back)."""
    seed = tl.load(SEED)
    i = tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_P)
    offs_n = tl.load(NS + i)
    keep = slot_keep_np(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
    tl.store(OUT_NP + i[:, None] * BLOCK_P + j[None, :], keep.to(tl.int8))
    keep_t = slot_keep_pn(seed, p_drop, b, offs_n, h, p0, N, H, P, BLOCK_P, FAST_RNG)
    tl.store(OUT_PN + j[:, None] * BLOCK_N + i[None, :], keep_t.to(tl.int8))


def tile_bits(seed, p_drop, b, ns, h, p0, N, H, P, block_p, fast) -> tuple:
    """The tile's bits through slot_keep_np and slot_keep_pn, both (len(ns), block_p)."""
    ns_t = torch.as_tensor(ns, dtype=torch.int64, device=DEVICE)
    out_np = torch.empty(len(ns), block_p, dtype=torch.int8, device=DEVICE)
    out_pn = torch.empty(block_p, len(ns), dtype=torch.int8, device=DEVICE)
    _tile_kernel[(1,)](out_np, out_pn, seed_tensor(seed, DEVICE), kernel_p_drop(p_drop), ns_t, b, h, p0, N, H, P,
                       BLOCK_N=len(ns), BLOCK_P=block_p, FAST_RNG=fast)
    return out_np.cpu().numpy().astype(bool), out_pn.cpu().numpy().T.astype(bool)


@functools.lru_cache(maxsize=None)
def stats_mask(seed: int, p_drop: float, fast: bool = True) -> np.ndarray:
    """The (B, N, H, P) mask of STATS_SHAPE from the mask kernel: in 512 x 512
    tiles under the interpreter, in the launcher's on a GPU."""
    b, n, h, p = STATS_SHAPE
    if DEVICE.type == "cuda":
        return slot_keep_mask(seed, p_drop, b, n, h, p, DEVICE, fast_rng=fast).cpu().numpy()
    out = torch.empty(STATS_SHAPE, dtype=torch.int8, device=DEVICE)
    _slot_keep_mask_kernel[(1, b * h)](out, seed_tensor(seed, DEVICE), kernel_p_drop(p_drop), n, h, p,
                                       BLOCK_N=512, BLOCK_P=512, FAST_RNG=fast)
    return out.cpu().numpy().astype(bool)


def chi2_independence(x: np.ndarray, y: np.ndarray) -> tuple:
    """(p-value of the chi-square test of the 2x2 table, correlation of the bits, pairs)."""
    x, y = x.ravel(), y.ravel()
    n = x.size
    a = np.count_nonzero(x & y)
    b_ = np.count_nonzero(x & ~y)
    c = np.count_nonzero(~x & y)
    d = n - a - b_ - c
    denom = float(a + b_) * float(c + d) * float(a + c) * float(b_ + d)
    phi = (float(a) * d - float(b_) * c) / math.sqrt(denom)
    chi2 = n * phi * phi  # 1 degree of freedom
    return math.erfc(math.sqrt(chi2 / 2)), phi, n


# ------------------------------------------------------------------ the generators, bit for bit
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "philox"])
def test_mask_matches_the_documented_generator(fast):
    """slot_keep_mask (the launcher's tiles) draws what the docstring formula says;
    for Philox that is the mask of the plan before FAST_RNG, unchanged."""
    b, n, h, p = 2, 37, 3, 70
    for seed in (SEED, -7):
        got = slot_keep_mask(seed, 0.3, b, n, h, p, DEVICE, fast_rng=fast).cpu().numpy()
        want = np.stack([reference_bits(seed, 0.3, bi, range(n), hi, n, h, p, fast)
                         for bi in range(b) for hi in range(h)]).reshape(b, h, n, p).transpose(0, 2, 1, 3)
        assert (got == want).all()
    default = slot_keep_mask(SEED, 0.3, 1, 5, 1, 8, DEVICE)  # fast_rng=False
    assert default.equal(slot_keep_mask(SEED, 0.3, 1, 5, 1, 8, DEVICE, fast_rng=False))


# ------------------------------------------------------------------ keep rate and independence of the fast one
@pytest.mark.parametrize("p_drop", P_DROPS)
def test_fast_keep_rate(p_drop):
    keep = stats_mask(SEED, p_drop)
    q = 1 - p_drop
    se = math.sqrt(q * (1 - q) / keep.size)
    assert abs(keep.mean() - q) < 4 * se, (keep.mean(), q, se)


def _pairs(kind: str, p_drop: float) -> tuple:
    m = stats_mask(SEED, p_drop)
    if kind == "slots":
        return m[..., :-1], m[..., 1:]
    if kind == "patches":
        return m[:, :-1], m[:, 1:]
    if kind == "heads":
        return m[:, :, :-1], m[:, :, 1:]
    if kind == "bags":
        return m[:-1], m[1:]
    if kind == "seeds":  # consecutive seeds: a counter-drawn seed must not give a related mask
        return m, stats_mask(SEED + 1, p_drop)
    if kind == "seed_words":  # seeds that differ in the high word alone
        return m, stats_mask(SEED ^ (1 << 40), p_drop)
    raise ValueError(kind)


@pytest.mark.parametrize("p_drop", P_DROPS)
@pytest.mark.parametrize("kind", ["slots", "patches", "heads", "bags", "seeds", "seed_words"])
def test_fast_bits_independent(kind, p_drop):
    x, y = _pairs(kind, p_drop)
    p_value, corr, n = chi2_independence(x, y)
    assert p_value > 1e-4, (kind, p_value, corr)
    assert abs(corr) < 4 / math.sqrt(n), (kind, corr, n)  # the correlation's standard error is 1/sqrt(n)


def test_fast_mask_differs_from_philox_and_follows_the_seed():
    fast, philox, other = stats_mask(SEED, 0.5), stats_mask(SEED, 0.5, fast=False), stats_mask(SEED + 1, 0.5)
    se = 0.5 / math.sqrt(fast.size)
    for m in (philox, other):
        assert abs((fast == m).mean() - 0.5) < 4 * se  # as two independent masks agree
    assert (slot_keep_mask(SEED, 0.5, 1, 4, 2, 16, DEVICE, fast_rng=True).cpu().numpy()
            != slot_keep_mask(SEED + 2**33, 0.5, 1, 4, 2, 16, DEVICE, fast_rng=True).cpu().numpy()).any()


# ------------------------------------------------------------------ the same bit whatever the tile
REGIONS = {  # (b, ns, h, N, H, P)
    "small": (1, [0, 1, 2, 5, 9, 16, 29, 30], 2, 31, 3, 40),
    # the 8 patches around the first whose n*P passes 2**32 (the fast generator's
    # next epoch), where Philox's counter (b*N + n)*H + h)*cdiv(P, 4) is past 2**33
    "past_2**32": (1, list(range(-(-2**32 // 40) - 3, -(-2**32 // 40) + 5)), 2, 200_000_000, 3, 40),
}


@pytest.mark.parametrize("region", list(REGIONS))
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "philox"])
def test_same_bit_whatever_the_tile(fast, region):
    b, ns, h, N, H, P = REGIONS[region]
    want = reference_bits(SEED, 0.5, b, ns, h, N, H, P, fast)
    # (BLOCK_P, first p0): the Philox draw needs p0 % 4 == 0, the hash any p0
    tilings = [(4, 0), (16, 0), (64, 0), (16, 8)] + ([(8, 3), (32, 5)] if fast else [])
    for block_p, start in tilings:
        got = np.full((len(ns), P), -1, dtype=np.int8)
        for p0 in sorted({0, *range(start, P, block_p)}):
            by_np, by_pn = tile_bits(SEED, 0.5, b, ns, h, p0, N, H, P, block_p, fast)
            assert (by_np == by_pn).all(), (block_p, p0)
            width = min(block_p, P - p0)
            seen = got[:, p0:p0 + width] >= 0  # overlapping tiles must agree
            assert (got[:, p0:p0 + width][seen] == by_np[:, :width][seen]).all(), (block_p, p0)
            got[:, p0:p0 + width] = by_np[:, :width]
        assert (got == want).all(), (block_p, start)


# ------------------------------------------------------------------ no repeats 2**32 counters apart
H_TRAP, P_TRAP, N_TRAP = 4, 64, 32  # H*P = 256


def _trap_bits(b, n0, N) -> np.ndarray:
    """The bits of N_TRAP consecutive patches from n0 of bag b, all heads and slots, in counter order (n, h, p)."""
    ns = list(range(n0, n0 + N_TRAP))
    return np.stack([tile_bits(SEED, 0.5, b, ns, h, 0, N, H_TRAP, P_TRAP, P_TRAP, True)[0]
                     for h in range(H_TRAP)], axis=1).ravel()


@pytest.mark.parametrize("pair", ["same_bag_next_epoch", "next_bag_flat_counter"])
def test_fast_counters_2_32_apart_do_not_repeat(pair):
    """Blocks of 8192 logits whose counters agree mod 2**32 draw independent bits,
    and no shift of one block onto the other repeats it: patches n and n + 2**32 / P
    of one (bag, head) (the same n*P + p mod 2**32, the next epoch), and bags b
    and b + 1 with N*H*P = 2**32 (the same flat counter ((b*N + n)*H + h)*P + p
    mod 2**32)."""
    if pair == "same_bag_next_epoch":
        first, second = _trap_bits(0, 5, 2**26 + 64), _trap_bits(0, 5 + 2**26, 2**26 + 64)
    else:
        first, second = _trap_bits(0, 5, 2**24), _trap_bits(1, 5, 2**24)
    p_value, corr, n = chi2_independence(first, second)
    assert p_value > 1e-4 and abs(corr) < 4 / math.sqrt(n), (p_value, corr)
    agree = [(first[max(d, 0):len(first) + min(d, 0)] == second[max(-d, 0):len(second) - max(d, 0)]).mean()
             for d in range(-512, 513)]
    assert max(agree) < 0.56, (int(np.argmax(agree)) - 512, max(agree))  # ~0.5 + 3.3 sd of 0.0057 by chance
