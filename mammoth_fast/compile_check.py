"""Ahead-of-time compile check of the Triton kernels for an H100 (sm_90a), no GPU needed.

    python -m mammoth_fast.compile_check [--sizes din=..,d=..,c=..,h=..,e=..,s=..[,r=..] ...]
                                         [--hardest] [--json rows.json] [--jobs N]

Every kernel in ``KERNELS`` is compiled with ``triton.compile`` at the tile
sizes its launcher picks (the same ``*_meta`` functions), for each layer size
of ``SIZE_MATRIX`` (or the ``--sizes`` given), in fp32 and bf16 (and fp64 at
a few sizes), and for each flag variant its launcher passes (``--hardest``:
only the variant with every flag on, the most registers). The matrix spans
the valid sizes beyond the recommended one: H from 1 to 32, C and D up to
1024 (dh and do up to 1024 at H = 1), E from 1 to 64, S up to 16, ranks from
8 to ~1200, Din from 166 to 2560. Arguments are specialized as the launcher's
call specializes them (pointers and 16-divisible ints get ``tt.divisibility``,
ints equal to 1 become constants); identical compile jobs run once, spread
over one process per CPU. Per job it reports registers, spilled bytes, shared
memory and whether the dots run on tensor cores (n/a: no dots), and fails on
a compile error, a spill, or shared memory above the H100's 227 KiB per
block. fp64 (the gradient checks' dtype, at small sizes) must compile; its
16-wide tiles may spill at wide sizes, which costs only speed there, so fp64
spills are reported, not failed. Where TRITON_INTERPRET is set (the tests
without a GPU), ``run_checks`` compiles in a child process without it.

Adding a kernel is one ``Kernel`` entry: its file, its name, a function
giving every argument its launcher passes (a torch dtype stands for a pointer
to that dtype), plus ``num_warps`` / ``num_stages`` where the launcher sets
them, its flags, and a predicate saying which flag combinations (and sizes)
its launcher uses.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .kernels._launch import RESCALE_MAX_LOG2, TL_TO_TORCH, TORCH_TO_TL, acc_dtype, dot_dtype, interpreting
from .kernels._slot_dropout import slot_keep_mask_meta
from .kernels.combine import combine_dkdy_metas, combine_dq_metas, combine_metas
from .kernels.dispatch import (dispatch_bwd_fused_ok, dispatch_bwd_metas, dispatch_dk_metas,
                               dispatch_dq_metas, dispatch_merge_metas, dispatch_metas, routing_bwd_fused_ok)
from .kernels.experts import experts_norm_metas, experts_proj_bwd_metas, experts_proj_metas
from .kernels.query import FUSED_MAX_C, query_metas, query_rows_metas
from .sizes import LayerSizes

H100 = GPUTarget("cuda", 90, 32)  # compiles for sm_90a
H100_SMEM_PER_BLOCK = 227 * 1024  # 232448 bytes
INPUT_PRECISION = "ieee"  # fp32 dots under torch's default (TF32 matmuls off)
OPTIONS = ("num_warps", "num_stages")
PACKAGE = "mammoth_fast.kernels"
MODULE = "mammoth_fast.compile_check"
PTR_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.uint8: "u8", torch.int8: "i8", torch.int64: "i64", torch.bool: "i1"}
P_DROP = 0.1  # slot dropout where HAS_DROP
DTYPES = (torch.float32, torch.bfloat16)

RECOMMENDED = LayerSizes()
SIZE_MATRIX = (
    RECOMMENDED,  # dh 16, do 32, r 17
    LayerSizes(din=1536, d=1024, c=768, h=1, e=1, s=16),  # dh 768, do 1024, r 219: one head, as wide as it gets
    LayerSizes(din=1536, d=1024, c=128, h=2, e=1, s=8),  # dh 64, do 512, r 1195: the widest rank
    LayerSizes(din=1024, d=1024, c=1024, h=2, e=16, s=4, rank=64),  # dh 512, do 512, C = 1024
    LayerSizes(din=2560, d=1024, c=1024, h=32, e=64, s=16, rank=16),  # dh 32, do 32, P = 1024
    LayerSizes(din=166, d=64, c=32, h=32, e=4, s=3, rank=8),  # dh 1, do 2: tiny heads
    LayerSizes(din=768, d=256, c=512, h=4, e=8, s=12, rank=32),  # dh 128, do 64, C = 512
    LayerSizes(din=2560, d=768, c=384, h=8, e=30, s=10),  # dh 48, do 96, r 42
    LayerSizes(din=1024, d=512, c=256, h=4, e=2, s=1),  # dh 64, do 128, r 205, E = 2, S = 1
)
"""The layer sizes checked by default: the recommended one and corners of the valid range."""
FP64_SIZES = (RECOMMENDED, SIZE_MATRIX[1])
N_VALUES = {RECOMMENDED: (1000, 100_000)}  # bag sizes: N % 16 decides a specialization; 100k elsewhere


@dataclass(frozen=True)
class Sizes(LayerSizes):
    """A layer size on B bags of N patches computing in ``dtype``. Parameters
    stay fp32: bf16 runs under autocast."""
    n: int = 1000
    dtype: torch.dtype = torch.float32
    param: torch.dtype = torch.float32

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)

    @staticmethod
    def of(size: LayerSizes, n: int, dtype: torch.dtype) -> "Sizes":
        return Sizes(**{f: getattr(size, f) for f in LayerSizes.__dataclass_fields__}, n=n, dtype=dtype,
                     param=torch.float64 if dtype == torch.float64 else torch.float32)


def _precision(sz: Sizes) -> dict:
    """The dtype constexprs of the launchers, as on a GPU."""
    return dict(DOT_DTYPE=dot_dtype(sz.dtype), INPUT_PRECISION=INPUT_PRECISION, ACC=TORCH_TO_TL[sz.acc])


def _mask(sz: Sizes, has_mask: bool) -> torch.dtype:
    """The mask pointer: the bool mask, or q standing in when there is none."""
    return torch.bool if has_mask else sz.dtype


def _drop(sz: Sizes, has_drop: bool) -> dict:
    """The seed pointer, (1,) int64 (q standing in when there is no dropout), and p."""
    return dict(SEED=torch.int64 if has_drop else sz.dtype, p_drop=P_DROP if has_drop else 0.0)


SPLIT = dict(n_per_split=64 * 7)
"""The n-chunk length of a split kernel: a multiple of BLOCK_N (any; it specializes alike)."""


# One function per kernel, mirroring its launcher's call on contiguous tensors.

def _norm_out_args(sz: Sizes, USE_LAYERNORM: bool, STORE_Y: bool) -> dict:
    """The query forwards' row-norm outputs; absent ones are inputs standing in."""
    return dict(BIAS=sz.param, GAMMA=sz.param, BETA=sz.param, Q=sz.dtype, Y=sz.dtype,
                MEAN=sz.acc if USE_LAYERNORM else sz.param, RSTD=sz.acc, M=sz.b * sz.n, C=sz.c, stride_qm=sz.c,
                eps=1e-5, USE_LAYERNORM=USE_LAYERNORM, STORE_Y=STORE_Y, ACC=TORCH_TO_TL[sz.acc])


def _query_args(sz: Sizes, USE_LAYERNORM: bool, STORE_Y: bool) -> dict:
    prec = _precision(sz)
    return dict(X=sz.dtype, W=sz.dtype, K=sz.din, stride_xm=sz.din, stride_xk=1, stride_wc=sz.din, stride_wk=1,
                DOT_DTYPE=prec["DOT_DTYPE"], INPUT_PRECISION=INPUT_PRECISION,
                **_norm_out_args(sz, USE_LAYERNORM, STORE_Y))


def _query_norm_fwd_args(sz: Sizes, USE_LAYERNORM: bool, STORE_Y: bool) -> dict:
    """The norm after the library GEMM (C > FUSED_MAX_C): x @ Wq^T in the compute dtype."""
    return dict(XW=sz.dtype, **_norm_out_args(sz, USE_LAYERNORM, STORE_Y))


def _query_norm_bwd_args(sz: Sizes, USE_LAYERNORM: bool, NEED_DY: bool, NEED_DGAMMA: bool) -> dict:
    """dq (M, C) contiguous from autograd in q's dtype; y, dy in x's dtype; stats, dgamma and db partials in
    ACC (db wherever dy: the projection's bias trains with its weight)."""
    return dict(
        DQ=sz.dtype, Y=sz.dtype, MEAN=sz.acc, RSTD=sz.acc, GAMMA=sz.param, DY=sz.dtype, DGAMMA_PART=sz.acc,
        DB_PART=sz.acc, M=sz.b * sz.n, C=sz.c, stride_dqm=sz.c, stride_dqc=1,
        USE_LAYERNORM=USE_LAYERNORM, NEED_DY=NEED_DY, NEED_DGAMMA=NEED_DGAMMA, NEED_DB=NEED_DY, ACC=TORCH_TO_TL[sz.acc],
    )


def _dispatch_common(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    return dict(Q=sz.dtype, K=sz.acc, MASK=_mask(sz, HAS_MASK), N=sz.n, P=sz.p, H=sz.h, **_drop(sz, HAS_DROP),
                stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh,
                **_precision(sz))


def _operand(sz: Sizes) -> torch.dtype:
    """The dot operands' dtype (what the fused backward kernels take K, dZ and Y in)."""
    return TL_TO_TORCH[dot_dtype(sz.dtype)]


def _dispatch_partial_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, FOLD_LOG2E: bool, FAST_RNG: bool) -> dict:
    return dict(M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc, FOLD_LOG2E=FOLD_LOG2E, FAST_RNG=FAST_RNG, **SPLIT,
                **_dispatch_common(sz, HAS_MASK, HAS_DROP))


def _dispatch_merge_args(sz: Sizes) -> dict:
    return dict(M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc, Z=sz.acc, LSE=sz.acc, P=sz.p, n_splits=11,
                DH=sz.dh, ACC=TORCH_TO_TL[sz.acc])


def _dispatch_bwd_dq_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, FAST_RNG: bool) -> dict:
    """dz, lse, delta and K in ACC; q and dq (B, N, C) contiguous in q's dtype."""
    return dict(DZ=sz.acc, LSE=sz.acc, DELTA=sz.acc, DQ=sz.dtype, stride_dqb=sz.n * sz.c, stride_dqn=sz.c,
                FAST_RNG=FAST_RNG, **_dispatch_common(sz, HAS_MASK, HAS_DROP))


def _dispatch_bwd_dk_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, FAST_RNG: bool) -> dict:
    """The partials' grid, as the forward's; dK partials in ACC."""
    return dict(DZ=sz.acc, LSE=sz.acc, DELTA=sz.acc, DK_PART=sz.acc, FAST_RNG=FAST_RNG, **SPLIT,
                **_dispatch_common(sz, HAS_MASK, HAS_DROP))


def _dispatch_bwd_fused_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, NEED_DQ: bool, NEED_DK: bool,
                             COMBINE: bool, FAST_RNG: bool) -> dict:
    """The fused backward: K, dZ (and with COMBINE, beta Y) in the dot dtype (cast by the launcher),
    dq in q's dtype, dK partials in ACC; combine's dO and out in q's dtype, its LSE, beta and g in ACC."""
    common = {**_dispatch_common(sz, HAS_MASK, HAS_DROP), "K": _operand(sz)}
    return dict(DZ=_operand(sz), LSE=sz.acc, DELTA=sz.acc, DQ=sz.dtype, DK_PART=sz.acc, stride_dqb=sz.n * sz.c,
                stride_dqn=sz.c, NEED_DQ=NEED_DQ, NEED_DK=NEED_DK, FAST_RNG=FAST_RNG, COMBINE=COMBINE,
                RESCALE_MAX_LOG2=RESCALE_MAX_LOG2, DO=sz.do, DOUT=sz.dtype, OUT=sz.dtype, YB=_operand(sz),
                DQ_FAR=sz.dtype,
                LSE_C=sz.acc, BETA=sz.acc, GMAX=sz.acc, **SPLIT, **common)


def _slot_keep_mask_args(sz: Sizes, FAST_RNG: bool) -> dict:
    """``slot_keep_mask``'s launch: an int8 (B, N, H, P) mask (tests and return_weights), either generator."""
    return dict(OUT=torch.int8, **_drop(sz, True), N=sz.n, H=sz.h, P=sz.p, FAST_RNG=FAST_RNG)


def _experts_common(sz: Sizes, SHARED: bool) -> dict:
    """The projections run in the accumulator dtype; parameters in theirs."""
    return dict(Z=sz.acc, A=sz.param, ABIAS=sz.param, BW=sz.param, S=sz.s, E=sz.e, H=sz.h, NS=-(-sz.s // 16),
                SHARED=SHARED, DH=sz.dh, R=sz.r, DO=sz.do, INPUT_PRECISION=INPUT_PRECISION, ACC=TORCH_TO_TL[sz.acc])


def _experts_proj_args(sz: Sizes, SHARED: bool) -> dict:
    return dict(CBIAS=sz.param, V=sz.acc, **_experts_common(sz, SHARED))


def _experts_norm_args(sz: Sizes) -> dict:
    return dict(V=sz.acc, G=sz.param, Y=sz.acc, INV_NORM=sz.acc, ROWS=sz.b * sz.p, P=sz.p, S=sz.s, D=sz.d,
                BLOCK_ROWS=16, ACC=TORCH_TO_TL[sz.acc])


def _experts_norm_bwd_args(sz: Sizes, PARAM_GRADS: bool) -> dict:
    return dict(V=sz.acc, G=sz.param, INV_NORM=sz.acc, DY=sz.acc, DV=sz.acc, DG_PART=sz.acc, DC_PART=sz.acc,
                S=sz.s, E=sz.e, D=sz.d, PARAM_GRADS=PARAM_GRADS, BLOCK_S=16, ACC=TORCH_TO_TL[sz.acc])


def _experts_proj_bwd_args(sz: Sizes, SHARED: bool, PARAM_GRADS: bool, INPUT_GRAD: bool) -> dict:
    return dict(DV=sz.acc, DZ_PART=sz.acc, DA_PART=sz.acc, DABIAS_PART=sz.acc, DBW_PART=sz.acc,
                PARAM_GRADS=PARAM_GRADS, INPUT_GRAD=INPUT_GRAD, **_experts_common(sz, SHARED))


def _combine_common(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    return dict(Q=sz.dtype, K=sz.acc, Y=sz.acc, MASK=_mask(sz, HAS_MASK), N=sz.n, P=sz.p, H=sz.h,
                **_drop(sz, HAS_DROP), stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP,
                DH=sz.dh, DO=sz.do, **_precision(sz))


def _combine_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, FOLD_LOG2E: bool, FAST_RNG: bool) -> dict:
    return dict(OUT=sz.dtype, LSE=sz.acc, stride_ob=sz.n * sz.d, stride_on=sz.d, FOLD_LOG2E=FOLD_LOG2E,
                FAST_RNG=FAST_RNG, **_combine_common(sz, HAS_MASK, HAS_DROP))


def _far(FAR: bool) -> dict:
    """The far patches of the fused routing backward: g (B, H, 1) in ACC and the bound."""
    return dict(FAR=FAR, RESCALE_MAX_LOG2=RESCALE_MAX_LOG2)


def _combine_bwd_dq_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, NEED_DQ: bool, FAR: bool,
                         FAST_RNG: bool) -> dict:
    """q, out, dO and dq (B, N, *) contiguous in the compute dtype; K, Y, LSE, delta_c and g in ACC."""
    return dict(OUT=sz.dtype, DOUT=sz.dtype, LSE=sz.acc, DELTA=sz.acc, DQ=sz.dtype, GMAX=sz.acc,
                stride_dqb=sz.n * sz.c, stride_dqn=sz.c, NEED_DQ=NEED_DQ, FAST_RNG=FAST_RNG, **_far(FAR),
                **_combine_common(sz, HAS_MASK, HAS_DROP))


def _combine_bwd_dkdy_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, NEED_DK: bool, NEED_DY: bool, FAR: bool,
                           FAST_RNG: bool) -> dict:
    """dK and dY partials in ACC, on the split-n grid; an absent one is the LSE standing in."""
    return dict(DOUT=sz.dtype, LSE=sz.acc, DELTA=sz.acc, DK_PART=sz.acc, DY_PART=sz.acc, GMAX=sz.acc,
                NEED_DK=NEED_DK, NEED_DY=NEED_DY, FAST_RNG=FAST_RNG, **_far(FAR), **SPLIT,
                **_combine_common(sz, HAS_MASK, HAS_DROP))


@dataclass(frozen=True)
class Kernel:
    module: str  # file in kernels/
    name: str  # the @triton.jit function
    args: Callable[..., dict]  # (Sizes, **flags) -> every kernel argument but the tile sizes and launch options
    metas: Callable[..., list]  # (Sizes, legacy) -> the launcher's candidate tile sizes and launch options, in order
    flags: dict = field(default_factory=dict)  # constexpr flag -> the values to compile
    launched: Callable[..., bool] = lambda sz, legacy, **flags: True  # whether a launcher passes these flags
    plans: tuple = (False,)  # the kernel plans (legacy or not, _launch.legacy_kernels) that launch it


def _any_output(sz, legacy, NEED_DY: bool, NEED_DGAMMA: bool, **_) -> bool:
    return NEED_DY or NEED_DGAMMA


def _any_grad(sz, legacy, PARAM_GRADS: bool, INPUT_GRAD: bool, **_) -> bool:
    return PARAM_GRADS or INPUT_GRAD


def _fused_query(sz, legacy, **_) -> bool:
    return sz.c <= FUSED_MAX_C


def _gemm_then_norm(sz, legacy, **_) -> bool:
    return sz.c > FUSED_MAX_C


def _rng(legacy: bool, HAS_DROP: bool, FAST_RNG: bool) -> bool:
    """The generator a plan passes: the fast one with slot dropout, outside the legacy plan."""
    return FAST_RNG == (HAS_DROP and not legacy)


def _routing_fwd(sz, legacy, HAS_DROP: bool, FOLD_LOG2E: bool, FAST_RNG: bool, **_) -> bool:
    return FOLD_LOG2E == (not legacy) and _rng(legacy, HAS_DROP, FAST_RNG)


def _dispatch_two_kernels(sz, legacy, HAS_DROP: bool, FAST_RNG: bool, **_) -> bool:
    return _rng(legacy, HAS_DROP, FAST_RNG) and (legacy or not dispatch_bwd_fused_ok(sz.p, sz.dh, sz.dtype))


def _dispatch_fused(sz, legacy, HAS_DROP: bool, FAST_RNG: bool, NEED_DQ: bool, NEED_DK: bool, COMBINE: bool,
                    **_) -> bool:
    return (not legacy and dispatch_bwd_fused_ok(sz.p, sz.dh, sz.dtype) and _rng(legacy, HAS_DROP, FAST_RNG)
            and (NEED_DQ or NEED_DK) and (not COMBINE or routing_bwd_fused_ok(sz.p, sz.dh, sz.do, sz.dtype)))


def _combine_bwd(sz, legacy, HAS_DROP: bool, FAST_RNG: bool, FAR: bool, **_) -> bool:
    """The chain's combine backward, or (FAR) the far patches' part where the fused routing backward runs."""
    return _rng(legacy, HAS_DROP, FAST_RNG) and (not FAR or not legacy and routing_bwd_fused_ok(sz.p, sz.dh, sz.do,
                                                                                                  sz.dtype))


def _combine_dkdy(sz, legacy, NEED_DK: bool, NEED_DY: bool, FAR: bool, **flags) -> bool:
    return (NEED_DK or NEED_DY) and not (FAR and NEED_DY) and _combine_bwd(sz, legacy, FAR=FAR, **flags)


MASK_DROP = {"HAS_MASK": (False, True), "HAS_DROP": (False, True)}
RNG = {"FAST_RNG": (False, True)}
ROUTING_FWD = {**MASK_DROP, "FOLD_LOG2E": (True, False), **RNG}
PLANS = (False, True)
NORM = {"USE_LAYERNORM": (True, False), "STORE_Y": (True, False)}
def _heads(metas, planned: bool = False):
    """A candidates function of (p, dh, do, dtype[, legacy]) as one of (Sizes, legacy)."""
    if planned:
        return lambda sz, legacy: metas(sz.p, sz.dh, sz.do, sz.dtype, legacy)
    return lambda sz, legacy: metas(sz.p, sz.dh, sz.do, sz.dtype)


def _slots(metas, planned: bool = False):
    """A candidates function of (p, dh, dtype[, legacy]) as one of (Sizes, legacy)."""
    if planned:
        return lambda sz, legacy: metas(sz.p, sz.dh, sz.dtype, legacy)
    return lambda sz, legacy: metas(sz.p, sz.dh, sz.dtype)


KERNELS = (
    Kernel("query", "_query_fwd_kernel", _query_args,
           lambda sz, legacy: query_metas(sz.c, sz.dtype), NORM, _fused_query),
    Kernel("query", "_query_norm_fwd_kernel", _query_norm_fwd_args,
           lambda sz, legacy: query_rows_metas(sz.c, sz.dtype), NORM, _gemm_then_norm),
    Kernel("query", "_query_norm_bwd_kernel", _query_norm_bwd_args,
           lambda sz, legacy: query_rows_metas(sz.c, sz.dtype),
           {"USE_LAYERNORM": (True, False), "NEED_DY": (True, False), "NEED_DGAMMA": (True, False)}, _any_output),
    Kernel("dispatch", "_dispatch_partial_kernel", _dispatch_partial_args, _slots(dispatch_metas, True), ROUTING_FWD,
           _routing_fwd, PLANS),
    Kernel("dispatch", "_dispatch_merge_kernel", _dispatch_merge_args, _slots(dispatch_merge_metas, True),
           plans=PLANS),
    Kernel("dispatch", "_dispatch_bwd_kernel", _dispatch_bwd_fused_args,
           lambda sz, legacy: dispatch_bwd_metas(sz.p, sz.dh, sz.dtype, sz.do),
           {**MASK_DROP, "NEED_DQ": (True, False), "NEED_DK": (True, False), "COMBINE": (True, False), **RNG},
           _dispatch_fused, PLANS),
    Kernel("dispatch", "_dispatch_bwd_dq_kernel", _dispatch_bwd_dq_args, _slots(dispatch_dq_metas),
           {**MASK_DROP, **RNG}, _dispatch_two_kernels, PLANS),
    Kernel("dispatch", "_dispatch_bwd_dk_kernel", _dispatch_bwd_dk_args, _slots(dispatch_dk_metas, True),
           {**MASK_DROP, **RNG}, _dispatch_two_kernels, PLANS),
    Kernel("_slot_dropout", "_slot_keep_mask_kernel", _slot_keep_mask_args, lambda sz, legacy: [slot_keep_mask_meta()],
           RNG),
    Kernel("experts", "_experts_proj_kernel", _experts_proj_args,
           lambda sz, legacy: experts_proj_metas(sz.s, sz.dh, sz.r, sz.do, sz.acc), {"SHARED": (True, False)}),
    Kernel("experts", "_experts_norm_kernel", _experts_norm_args, lambda sz, legacy: experts_norm_metas(sz.d)),
    Kernel("experts", "_experts_norm_bwd_kernel", _experts_norm_bwd_args, lambda sz, legacy: experts_norm_metas(sz.d),
           {"PARAM_GRADS": (True, False)}),
    Kernel("experts", "_experts_proj_bwd_kernel", _experts_proj_bwd_args,
           lambda sz, legacy: experts_proj_bwd_metas(sz.s, sz.dh, sz.r, sz.do, sz.acc),
           {"SHARED": (True, False), "PARAM_GRADS": (True, False), "INPUT_GRAD": (True, False)}, _any_grad),
    Kernel("combine", "_combine_fwd_kernel", _combine_args, _heads(combine_metas, True), ROUTING_FWD, _routing_fwd,
           PLANS),
    Kernel("combine", "_combine_bwd_dq_kernel", _combine_bwd_dq_args, _heads(combine_dq_metas),
           {**MASK_DROP, "NEED_DQ": (True, False), "FAR": (True, False), **RNG}, _combine_bwd, PLANS),
    Kernel("combine", "_combine_bwd_dkdy_kernel", _combine_bwd_dkdy_args, _heads(combine_dkdy_metas),
           {**MASK_DROP, "NEED_DK": (True, False), "NEED_DY": (True, False), "FAR": (True, False), **RNG},
           _combine_dkdy, PLANS),
)


@dataclass(frozen=True)
class Job:
    """One ``triton.compile`` call, hashable so that identical ones are merged."""
    name: str  # the kernel
    signature: tuple  # (arg, type) in argument order; "constexpr" for constants
    constexprs: tuple  # (arg, value)
    divisible: tuple  # indices of the args divisible by 16
    options: tuple  # (option, value)


def _specialize(value) -> tuple[str, bool]:
    """(type, divisible by 16) of a runtime argument, as Triton's launcher
    specializes it; an int equal to 1 becomes the constant 1."""
    if isinstance(value, torch.dtype):
        return "*" + PTR_TYPES[value], True  # torch allocations are 16-byte aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"compile_check: no Triton type for argument value {value!r}")


def _job(kernel: Kernel, fn: JITFunction, args: dict) -> Job:
    options = tuple((k, args.pop(k)) for k in OPTIONS if k in args)
    if set(args) != set(fn.arg_names):
        raise TypeError(f"compile_check: {kernel.name} takes {fn.arg_names}, the spec gives {sorted(args)}")
    signature, constexprs, divisible = [], [], []
    for i, prm in enumerate(fn.params):
        value = args[prm.name]
        ty, div = ("constexpr", False) if prm.is_constexpr else _specialize(value)
        signature.append((prm.name, ty))
        constexprs += [(prm.name, value)] if ty == "constexpr" else []
        divisible += [i] if div else []
    return Job(kernel.name, tuple(signature), tuple(constexprs), tuple(divisible), options)


def _compile(job: Job, fn: JITFunction):
    attrs = {(i,): [["tt.divisibility", 16]] for i in job.divisible}
    src = ASTSource(fn, dict(job.signature), dict(job.constexprs), attrs)
    return triton.compile(src, target=H100, options=dict(job.options))


def _kernel_function(kernel: Kernel):
    return getattr(importlib.import_module(f"{PACKAGE}.{kernel.module}"), kernel.name)


def _compiles_here() -> bool:
    """Compiling needs triton's and the kernels' JIT functions and the launchers'
    GPU dtypes: not where TRITON_INTERPRET is set, or was when they were
    imported (as the tests do without a GPU)."""
    fns = [tl.standard.cdiv, *map(_kernel_function, KERNELS)]
    return not interpreting() and all(isinstance(fn, JITFunction) for fn in fns)


def _run_in_child(args: list[str]) -> list[dict]:
    """The rows of ``python -m mammoth_fast.compile_check <args>`` run without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, "-m", MODULE, "--json", str(out), *args], env=env,
                              capture_output=True, text=True)
        if not out.is_file():
            raise RuntimeError(f"compile_check: the child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


@functools.lru_cache(maxsize=None)
def _tool(name: str) -> str | None:
    """A CUDA binary tool: the one in Triton's wheel, else one on PATH."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.is_file() else shutil.which(name)


def _run_tool(cmd: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*cmd, f.name], check=True, capture_output=True, text=True).stdout


def _binary_facts(cubin: bytes, ptx: str) -> dict:
    """Registers and spilled bytes per thread (ptxas's stack frame plus local
    memory, as Triton's n_spills * 4) from ``cuobjdump -res-usage``, None where
    it is not at hand; and whether the dots run on tensor cores: mma / wgmma in
    the PTX, which ptxas lowers to HMMA / HGMMA and nothing else (disassembling
    the SASS to see those takes 0.4 s a kernel, as long as most compiles)."""
    usage = {}
    if _tool("cuobjdump"):
        out = _run_tool([_tool("cuobjdump"), "-res-usage"], cubin)
        usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    return dict(n_regs=usage.get("REG"), spill_bytes=usage["STACK"] + usage["LOCAL"] if usage else None,
                tensor_cores=re.search(r"\b(wgmma\.mma_async|mma\.sync)\.", ptx) is not None)


SPILL_FALLBACK = {"_dispatch_bwd_kernel": "COMBINE"}
"""kernel -> the flag whose variants the launcher does not launch where every
candidate spills (``_launch.spill_free``): the fused routing backward, replaced
by combine's own dq and dK kernels. Their spills are reported, not failed."""


def _problems(row: dict) -> list[str]:
    problems = []
    fallback = row["constexprs"].get(SPILL_FALLBACK.get(row["kernel"]))
    if row["spill_bytes"] and fallback:
        row["note"] = "spills: the launcher falls back (not launched)"
    elif row["spill_bytes"] and row["dtypes"] != ["float64"]:  # fp64 (gradcheck only): spills cost speed alone
        problems.append(f"spills {row['spill_bytes']} bytes per thread")
    if row["shared"] is not None and row["shared"] > H100_SMEM_PER_BLOCK:
        problems.append(f"shared memory {row['shared']} B > {H100_SMEM_PER_BLOCK} B")
    return problems


def _compile_row(job: Job, fn: JITFunction) -> dict:
    """Registers, spills, shared memory, tensor cores and problems of one compile."""
    row = dict(constexprs={k: v for k, v in job.constexprs if isinstance(v, bool) or k.startswith(("BLOCK_", "NUM_"))
                           or k in ("DH", "DO", "R", "D")},
               num_warps=None, num_stages=None, n_regs=None, spill_bytes=None, shared=None, tensor_cores=None)
    start = time.perf_counter()
    try:
        compiled = _compile(job, fn)
    except Exception as err:  # noqa: BLE001 - any compile failure is a reported result
        row["error"] = f"compile error: {type(err).__name__}: {str(err)[-400:]}"
        return row
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    meta = compiled.metadata
    row.update(num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared,
               **_binary_facts(compiled.asm["cubin"], compiled.asm["ptx"]))
    if "tt.dot" not in compiled.asm["ttir"]:
        row["tensor_cores"] = None  # no dots: n/a
    return row


def _check(jobs: tuple, cases: list, fn: JITFunction) -> dict:
    """Compiles the launcher's candidates (``jobs``, in its order) until one
    has no problem, as ``_launch.choose`` does on a GPU: the row of that one
    (``candidate``: its place), or of the last, whose problems then fail the check."""
    seconds = 0.0
    for i, job in enumerate(jobs):
        row = _compile_row(job, fn)
        row.update(kernel=job.name, dtypes=list(dict.fromkeys(dtype for dtype, _ in cases)),
                   sizes=list(dict.fromkeys(size for _, size in cases)), candidate=f"{i + 1}/{len(jobs)}")
        seconds += row["seconds"]
        row["problems"] = [row.pop("error")] if "error" in row else _problems(row)
        if not row["problems"] and "note" not in row:  # a spill that is not a problem: try the next candidate
            break
    row["seconds"] = round(seconds, 2)
    return row


HARDEST_ONLY_IN_TESTS = {"_dispatch_bwd_kernel": "COMBINE", "_combine_bwd_dq_kernel": "FAR",
                         "_combine_bwd_dkdy_kernel": "FAR"}
"""kernel -> a flag whose variants (keep_slots=False's fused routing backward and its
far patches) the tests' check compiles in the hardest of them only, at the
recommended size too (the command compiles every one)."""


def _hardest(combos: list) -> dict:
    return max(combos, key=lambda flags: sum(map(bool, flags.values())))


def _flag_combos(kernel: Kernel, sz: Sizes, hardest: bool, legacy: bool, tests: bool = False):
    """The flag combinations a launcher passes at this size in this plan
    (``hardest``: the one with every flag on that it passes, or the closest to it;
    ``tests``: those of HARDEST_ONLY_IN_TESTS's flag cut to their hardest)."""
    combos = [dict(zip(kernel.flags, values)) for values in itertools.product(*kernel.flags.values())]
    combos = [flags for flags in combos if kernel.launched(sz, legacy, **flags)]
    if hardest and combos:
        return [_hardest(combos)]
    key = HARDEST_ONLY_IN_TESTS.get(kernel.name) if tests else None
    if key and any(flags[key] for flags in combos):
        return [flags for flags in combos if not flags[key]] + [_hardest([f for f in combos if f[key]])]
    return combos


def _check_in_worker(jobs: tuple, cases: list, module: str) -> dict:
    """``_check`` in a worker process: the kernel found again by its file and name."""
    return _check(jobs, cases, getattr(importlib.import_module(f"{PACKAGE}.{module}"), jobs[0].name))


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(sizes=SIZE_MATRIX, hardest: bool = False, hardest_beyond_recommended: bool = False) -> list:
    """[(Sizes, hardest)] to check: every size in fp32 and bf16, fp64 at
    FP64_SIZES; ``hardest_beyond_recommended`` (what the tests run): all
    fp32 and bf16 variants at the recommended size (but HARDEST_ONLY_IN_TESTS), fp64 there only and in its
    hardest variants, the hardest elsewhere (and the legacy kernel plan only at
    the recommended size, in its hardest variants: ``run_checks``)."""
    out = []
    for size in sizes:
        fp64 = size == RECOMMENDED if hardest_beyond_recommended else size in FP64_SIZES
        dtypes = DTYPES + ((torch.float64,) if fp64 else ())
        for dtype in dtypes:
            # the tests' check: one bag size (N % 16 == 0) at the recommended size too
            ns = (100_000,) if hardest_beyond_recommended else N_VALUES.get(size, (100_000,))
            for n in ns:
                # the tests: fp64 (gradcheck only, where spills are allowed) in its hardest variants
                only_hardest = hardest or (hardest_beyond_recommended and (size != RECOMMENDED or dtype == torch.float64))
                out.append((Sizes.of(size, n, dtype), only_hardest))
    return out


def run_checks(workers: int | None = None, sizes=SIZE_MATRIX, hardest: bool = False,
               hardest_beyond_recommended: bool = False) -> list[dict]:
    """Compile every (kernel, size, dtype, flags) case for sm_90a, each distinct
    job once, on ``workers`` processes (default: one per available CPU); one
    row per job. A row with ``problems`` fails the check."""
    if not _compiles_here():
        args = [*(["--jobs", str(workers)] if workers else []), *(["--hardest"] if hardest else []),
                *(["--hardest-beyond-recommended"] if hardest_beyond_recommended else []),
                "--sizes", *(format_size(s) for s in sizes)]
        return _run_in_child(args)
    jobs, modules = {}, {}
    for sz, only_hardest in plan(sizes, hardest, hardest_beyond_recommended):
        for kernel in KERNELS:
            fn = _kernel_function(kernel)
            modules[kernel.name] = kernel.module
            for legacy in kernel.plans:
                if legacy and hardest_beyond_recommended and only_hardest:
                    continue  # the tests' check: the legacy plan (the kernels checked before it) at the recommended size
                metas = kernel.metas(sz, legacy)
                hardest_here = only_hardest or (legacy and hardest_beyond_recommended)  # ... in its hardest variants
                for flags in _flag_combos(kernel, sz, hardest_here, legacy, hardest_beyond_recommended):
                    args = kernel.args(sz, **flags)
                    unit = tuple(_job(kernel, fn, {**args, **meta}) for meta in metas)
                    cases = jobs.setdefault(unit, [])
                    case = (str(sz.dtype).removeprefix("torch."), sz.describe())
                    if case not in cases:  # the same job in both plans: once
                        cases.append(case)
    args = [(unit, cases, modules[unit[0].name]) for unit, cases in jobs.items()]
    workers = min(workers or _workers(), len(args))
    if workers <= 1:
        return [_check_in_worker(*a) for a in args]
    # spawn: no fork of a process that imported torch; each worker imports the kernels once
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_check_in_worker, *zip(*args)))


def format_size(sz: LayerSizes) -> str:
    return f"din={sz.din},d={sz.d},c={sz.c},h={sz.h},e={sz.e},s={sz.s},r={sz.r}"


def parse_size(text: str) -> LayerSizes:
    """'din=1024,d=512,c=256,h=16,e=30,s=10[,r=17]' -> LayerSizes (r: auto_rank when left out)."""
    names = {"din": "din", "d": "d", "c": "c", "h": "h", "e": "e", "s": "s", "r": "rank"}
    try:
        given = {names[k.strip()]: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: use din=..,d=..,c=..,h=..,e=..,s=..[,r=..] "
                                         "(integers)") from None
    size = LayerSizes(**given)
    problems = [msg for bad, msg in ((size.c % size.h, "c % h != 0"), (size.d % size.h, "d % h != 0"),
                                     (size.r < 1, f"rank {size.r} < 1 (give r=..)")) if bad]
    if problems:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: {'; '.join(problems)}")
    return size


def _na(value) -> str:
    return "n/a" if value is None else str(value)


def _what(row: dict) -> tuple[str, str, str, str]:
    """kernel, dtypes, sizes (their count, past 1) and the shown constexprs of a row, as text."""
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in row["constexprs"].items())
    sizes = row["sizes"][0] if len(row["sizes"]) == 1 else f"{len(row['sizes'])} sizes"
    return row["kernel"], ",".join(row["dtypes"]), sizes, flags


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "size", "constexprs", "cand.", "warps", "stages", "regs", "spill B", "smem B", "TC")
    body = [(*_what(r), r["candidate"],
             *map(_na, (r["num_warps"], r["num_stages"], r["n_regs"], r["spill_bytes"], r["shared"])),
             {True: "yes", False: "no", None: "n/a"}[r["tensor_cores"]]) for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def failures(rows: list[dict]) -> list[str]:
    """One line per failed row: what was compiled, at which sizes, and what is wrong."""
    return [f"FAIL {' '.join(_what(r)[:2])} {r['constexprs']} at {'; '.join(r['sizes'])}: {'; '.join(r['problems'])}"
            for r in rows if r["problems"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mammoth_fast.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+", metavar="din=..,d=..,c=..,h=..,e=..,s=..[,r=..]",
                        help="check these layer sizes instead of the default matrix (r: the LoRA rank, "
                             "auto_rank's when left out)")
    parser.add_argument("--hardest", action="store_true",
                        help="compile only the flag variant with every flag on (the most registers) of each kernel")
    parser.add_argument("--hardest-beyond-recommended", action="store_true",
                        help="every variant at the recommended size, the hardest at the others (the tests' check)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per available CPU)")
    args = parser.parse_args(argv)
    sizes = tuple(args.sizes) if args.sizes else SIZE_MATRIX
    if not _tool("cuobjdump"):
        print("compile_check: cuobjdump not found: registers and spills are n/a")
    start = time.perf_counter()
    rows = run_checks(args.jobs, sizes, args.hardest, args.hardest_beyond_recommended)
    print(format_table(rows))
    print(f"{len(rows)} kernel variants compiled for sm_90a over {len(sizes)} layer sizes in {time.perf_counter() - start:.1f} s "
          f"on {args.jobs or _workers()} processes ({sum(r.get('seconds', 0) for r in rows):.1f} s of compiling; "
          f"triton {triton.__version__})")
    for size in sizes:
        print(f"  {format_size(size)} (dh {size.dh}, do {size.do})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(*failures(rows), sep="\n")
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
