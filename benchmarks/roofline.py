"""Roofline of the triton backend's kernels, and of nn.Linear(1024, 512), on an H100 SXM.

    python -m benchmarks.roofline [--n 100000] [--dtype bf16 fp32] [--keep-slots both] [--tf32]
    python -m benchmarks.roofline --write benchmarks/ROOFLINE.md      (the document, N = 100k)

Per kernel, at the benchmark sizes (Din 1024, D 512, C 256, H 16, E 30, S 10,
auto rank 17, one bag of N patches) and compute dtype:

- FLOPs: matmul FLOPs only, 2 * M * N * K per product (element-wise work is
  not counted);
- exponentials (exp2 on the SFU), counted apart from the FLOPs;
- bytes: the minimum, each input read once and each output written once, in
  the dtype the launcher gives it: feats, Wq, q, y, dq, dy, out and dO in the
  compute dtype; K, Z, Y, dZ, LSEs, deltas, row statistics and per-program
  partials in fp32 (the accumulator dtype); parameters in fp32 (bf16 runs
  under autocast with fp32 parameters, as the benchmark and the compile check
  do).

floor = max(bytes / bandwidth, FLOPs / matmul rate, exps / SFU rate). The
"tile" columns count the FLOPs and exponentials the kernels really issue on
their padded tiles (block sizes from the launchers' ``*_meta`` functions):
padded slots cost exponentials too.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mammoth_fast.kernels._launch import split_n
from mammoth_fast.kernels.combine import combine_dkdy_meta, combine_dq_meta, combine_meta
from mammoth_fast.kernels.dispatch import (dispatch_bwd_fused_ok, dispatch_bwd_meta, dispatch_dk_meta, dispatch_dq_meta,
                                           dispatch_meta, routing_bwd_fused_ok)
from mammoth_fast.kernels.experts import experts_meta
from mammoth_fast.kernels.query import query_meta, query_rows_meta
from mammoth_fast.sizes import LayerSizes as Sizes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ACC_BYTES = 4  # fp32 accumulators, statistics, partials
PARAM_BYTES = 4  # fp32 parameters (bf16 runs under autocast)


RECOMMENDED = Sizes()
RESIDENT_PER_SM = 2
"""Programs of a split-n kernel taken to run at once per SM, for the n-chunk
count (and so the partials' bytes) of the model; the launchers read the
compiled kernel's occupancy instead."""


@dataclass(frozen=True)
class Machine:
    """Peak rates used for the floors."""

    name: str
    bytes_per_s: float  # HBM bandwidth reached by a streaming kernel
    tensor_flops: float  # dense bf16/fp16 tensor-core matmul
    tf32_flops: float  # dense TF32 tensor-core matmul
    fp32_flops: float  # fp32 FMA (non-tensor): IEEE fp32 dots and SGEMM
    sfu_per_s: float  # exp2 (MUFU.EX2) results per second
    sm_count: int
    source: str


H100 = Machine(
    name="NVIDIA H100 SXM5 80 GB",
    bytes_per_s=3.0e12,
    tensor_flops=800e12,
    tf32_flops=400e12,
    fp32_flops=67e12,
    sfu_per_s=16 * 132 * 1.83e9,
    sm_count=132,
    source=(
        "HBM3 3.35 TB/s on the datasheet, 3.0 TB/s taken as what a streaming kernel reaches; "
        "bf16 dense tensor cores 989 TFLOP/s on the datasheet, 800 TFLOP/s taken as reachable; "
        "TF32 dense 495 on the datasheet, 400 taken; fp32 FMA (non-tensor) 67 TFLOP/s; "
        "exp2: 16 results per clock per SM on compute capability 9.0 (CUDA C++ Programming Guide, "
        "throughput of native arithmetic instructions) x 132 SMs x ~1.83 GHz (sustained; 1.98 GHz "
        "max boost), in line with the '3.9 TFLOPS of special functions' of the H100 SXM5 in the "
        "FlashAttention-3 paper"
    ),
)


H200 = Machine(
    name="NVIDIA H200 SXM 141 GB",
    bytes_per_s=4.3e12,
    tensor_flops=790e12,
    tf32_flops=400e12,
    fp32_flops=67e12,
    sfu_per_s=16 * 132 * 1.83e9,
    sm_count=132,
    source=(
        "HBM3e 4.8 TB/s on the datasheet, 4.3 TB/s taken: a device-to-device copy measured on an H200 of this "
        "project's lender; bf16 dense tensor cores 989 TFLOP/s on the datasheet, 790 TFLOP/s taken: an "
        "8192^3 bf16 torch.matmul measured there; TF32, fp32 FMA and exp2 as the H100 SXM (the same chip)"
    ),
)


def machine_for(gpu_name: str, sm_count: int) -> Machine:
    """The ceilings of the card ``gpu_name`` (an H200, else an H100's), with its SM count."""
    base = H200 if "H200" in gpu_name.upper() else H100
    return replace(base, sm_count=sm_count)


@dataclass(frozen=True)
class KernelCost:
    """One kernel (or library call, or torch op) of a forward or backward pass."""

    name: str
    stage: str  # "fwd" or "bwd"
    runs_on: str  # "triton", "cuBLAS" or "torch"
    dot: str  # matmul rate: "tensor", "tf32", "fp32", or "none"
    flops: float  # matmul FLOPs, the minimum
    exps: float  # exponentials, the minimum
    bytes: float  # minimum bytes
    tile_flops: float  # matmul FLOPs on the padded tiles the kernel issues
    tile_exps: float  # exponentials on the padded tiles
    chains: Tuple[str, ...] = ("train",)  # "infer" (forward, no grad), "train" (forward+backward)
    note: str = ""

    def times(self, m: Machine, tile: bool = False) -> Dict[str, float]:
        rate = {"tensor": m.tensor_flops, "tf32": m.tf32_flops, "fp32": m.fp32_flops, "none": math.inf}[self.dot]
        flops = self.tile_flops if tile else self.flops
        exps = self.tile_exps if tile else self.exps
        return {"memory": self.bytes / m.bytes_per_s, "matmul": flops / rate, "exp": exps / m.sfu_per_s}

    def floor(self, m: Machine, tile: bool = False) -> float:
        return max(self.times(m, tile).values())

    def bound(self, m: Machine) -> str:
        t = self.times(m)
        return max(t, key=t.get)


def _pad(x: int, block: int) -> int:
    return -(-x // block) * block


def _dot_kind(dtype: torch.dtype, tf32: bool) -> str:
    if dtype.itemsize <= 2:
        return "tensor"
    return "tf32" if tf32 else "fp32"


def mammoth_kernels(n: int, dtype: torch.dtype, keep_slots: bool, sz: Sizes = RECOMMENDED,
                    m: Machine = H100, tf32: bool = False, need_dx: bool = False,
                    legacy: bool = False) -> List[KernelCost]:
    """The kernels of the triton backend for one bag set of ``sz.b`` bags of ``n``
    patches computing in ``dtype``, in the order they run, as the launchers
    plan them (their ``*_meta`` functions, and the fused backward where
    ``*_bwd_fused_ok``; ``legacy``: the legacy kernel plan,
    ``_launch.legacy_kernels``). ``need_dx``: whether feats need a gradient
    (not in MIL training: the features are fixed)."""
    s, f, pf = dtype.itemsize, ACC_BYTES, PARAM_BYTES
    b, h, p, dh, do, c, din, d, r, e = sz.b, sz.h, sz.p, sz.dh, sz.do, sz.c, sz.din, sz.d, sz.r, sz.e
    bn = b * n  # patches over all bags
    bhp = b * h * p  # slot rows over all bags and heads
    dot = _dot_kind(dtype, tf32)
    acc_dot = _dot_kind(torch.float32, tf32)  # the experts work in fp32 (Z, Y in the accumulator dtype)
    k_bytes = h * p * dh * f  # slot keys K, fp32
    z_bytes = bhp * dh * f  # Z, dZ
    y_bytes = b * p * d * f  # Y, dY, fp32
    lse_d = bhp * f  # dispatch LSE, delta_d
    nh = bn * h * f  # combine LSE, delta_c
    out = []

    # --- query: q = norm(x @ Wq^T + bq); the training forward also stores y
    qm = query_meta(c, dtype)
    q_tile = 2 * _pad(bn, qm["BLOCK_M"]) * _pad(c, qm["BLOCK_C"]) * din
    q_in = bn * din * s + c * din * s + 3 * c * pf  # x, Wq (cast to the compute dtype), bias, gamma, beta
    q_out = bn * c * s + 2 * bn * f  # q, mean, rstd
    out.append(KernelCost("query fwd", "fwd", "triton", dot, 2 * bn * c * din, 0, q_in + q_out, q_tile, 0,
                          chains=("infer",), note="inference: no y stored"))
    out.append(KernelCost("query fwd (+y)", "fwd", "triton", dot, 2 * bn * c * din, 0, q_in + q_out + bn * c * s,
                          q_tile, 0, note="training: also writes the pre-norm y for the backward"))

    # --- dispatch: split-N partials, then the log-sum-exp merge
    dm = dispatch_meta(p, dh, dtype, legacy)
    bp, bnk = dm["BLOCK_P"], dm["BLOCK_N"]
    ns = split_n(n, bnk, -(-p // bp) * dm["NUM_DV"] * b * h, RESIDENT_PER_SM * m.sm_count)[0]
    p_pad, n_pad, tiles = _pad(p, bp), _pad(n, bnk), -(-n // bnk)
    parts = b * h * ns * p * (2 + dh) * f  # m, l, acc partials
    out.append(KernelCost(
        "dispatch fwd partial", "fwd", "triton", dot, 4 * bn * h * p * dh, bn * h * p,
        bn * c * s + k_bytes + parts, 4 * b * h * p_pad * n_pad * dh, b * h * p_pad * (n_pad + tiles),
        chains=("infer", "train"),
        note=f"{ns} n-chunks, {bp} x {bnk} tiles: {p_pad} slots computed for {p}"))
    out.append(KernelCost(
        "dispatch fwd merge", "fwd", "triton", "none", 0, bhp * (ns + 1), parts + z_bytes + lse_d, 0,
        b * h * p_pad * (ns + 1), chains=("infer", "train")))

    # --- experts: the projections per (expert, head), then the norm per slot
    em = experts_meta(sz.s, dh, r, do, torch.float32)
    eprog = -(-sz.s // em["BLOCK_S"]) * e * h * b  # (expert, head, bag, slot block) programs
    e_r, e_dh, e_do = _pad(r, em["BLOCK_R"]), _pad(dh, em["BLOCK_DH"]), _pad(do, em["BLOCK_DO"])
    e_tile = 2 * em["BLOCK_S"] * (e_dh * e_r * em["NUM_VO"] + e_r * e_do)  # per program
    lora_bytes = (h * dh * r + h * r + e * h * r * do + e * h * do + e * d) * pf
    out.append(KernelCost(
        "experts fwd", "fwd", "triton", acc_dot, 2 * b * p * h * (dh * r + r * do), 0,
        z_bytes + lora_bytes + 3 * y_bytes + 2 * b * p * f, eprog * e_tile, 0, chains=("infer", "train"),
        note="two kernels: v per (expert, head), written and read back by the norm"))

    # --- combine (keep_slots=False)
    if not keep_slots:
        cm = combine_meta(p, dh, do, dtype, legacy)
        cp_pad, cn_pad = _pad(p, cm["BLOCK_P"]), _pad(n, cm["BLOCK_N"])
        out.append(KernelCost(
            "combine fwd", "fwd", "triton", dot, 2 * bn * h * p * (dh + do), bn * h * p,
            bn * c * s + k_bytes + y_bytes + bn * d * s + nh,
            2 * b * h * cp_pad * cn_pad * (dh + do), b * h * cn_pad * (cp_pad + cp_pad // cm["BLOCK_P"]),
            chains=("infer", "train"), note=f"{cm['BLOCK_N']} x {cm['BLOCK_P']} tiles: {cp_pad} slots for {p}"))

    # small torch ops of the forward: Wq cast, slot keys, and Y's cast with keep_slots
    small_fwd = k_bytes * 2 + (c * din * (4 + s) if s < 4 else 0) + (y_bytes + b * p * d * s if keep_slots and s < 4 else 0)
    out.append(KernelCost("small torch ops (fwd)", "fwd", "torch", "none", 0, 0, small_fwd, 0, 0,
                          chains=("infer", "train"), note="Wq cast, slot keys, casts of Y"))

    # ================================================================ backward
    dispatch_fused = not legacy and dispatch_bwd_fused_ok(p, dh, dtype)
    routing_fused = not keep_slots and not legacy and routing_bwd_fused_ok(p, dh, do, dtype)
    c_splits = 0  # n-chunks of the combine backward's partials
    if not keep_slots:
        if not routing_fused:
            cq = combine_dq_meta(p, dh, do, dtype)
            qp_pad_c, qn_pad_c = _pad(p, cq["BLOCK_P"]), _pad(n, cq["BLOCK_N"])
            out.append(KernelCost(
                "combine bwd dq (+delta_c)", "bwd", "triton", dot, 2 * bn * h * p * (2 * dh + do), bn * h * p,
                bn * c * s + 2 * bn * d * s + nh + k_bytes + y_bytes + bn * c * s + nh,
                2 * b * h * qp_pad_c * qn_pad_c * (2 * dh + do), b * h * qp_pad_c * qn_pad_c,
                note="reads q, dO, out, LSE, K, Y; writes dq, delta_c"))
        ck = combine_dkdy_meta(p, dh, do, dtype)
        kp_pad, kn_pad = _pad(p, ck["BLOCK_P"]), _pad(n, ck["BLOCK_N"])
        ck["n_splits"] = c_splits = split_n(n, ck["BLOCK_N"], -(-p // ck["BLOCK_P"]) * ck["NUM_V"] * b * h,
                                            RESIDENT_PER_SM * m.sm_count)[0]
        if routing_fused:  # dY alone: the logits and Cw^T dO
            out.append(KernelCost(
                "combine bwd dY", "bwd", "triton", dot, 2 * bn * h * p * (dh + do), bn * h * p,
                bn * c * s + bn * d * s + nh + k_bytes + y_bytes + b * h * c_splits * p * do * f,
                2 * b * h * kp_pad * kn_pad * (dh + do), b * h * kp_pad * kn_pad,
                note=f"the dK/dY kernel without dK; {c_splits} n-chunks of partials"))
        else:
            out.append(KernelCost(
                "combine bwd dK/dY", "bwd", "triton", dot, 2 * bn * h * p * (2 * dh + 2 * do), bn * h * p,
                bn * c * s + bn * d * s + 2 * nh + k_bytes + y_bytes + b * h * c_splits * p * (dh + do) * f,
                2 * b * h * kp_pad * kn_pad * (2 * dh + 2 * do), b * h * kp_pad * kn_pad,
                note=f"{c_splits} n-chunks of partials"))

    ns_e = -(-sz.s // em["BLOCK_S"])
    eparts = b * ns_e * (e * h * (dh * r + r + r * do) + 2 * e * d) * f  # dA, da, dBw, dg, dc partials
    out.append(KernelCost(
        "experts bwd", "bwd", "triton", acc_dot, 2 * b * p * h * 2 * (dh * r + r * do), 0,
        z_bytes + lora_bytes + 3 * y_bytes + b * p * f + y_bytes + z_bytes + eparts,
        eprog * (2 * e_tile + 2 * em["BLOCK_S"] * e_dh * e_r), 0,
        note="the four backward products and u recomputed; dv written and read back"))

    if routing_fused:  # combine's dq and dK kernels for the far patches: with none, each program reads LSE_c
        far_dk = combine_dkdy_meta(p, dh, do, dtype)
        far_splits = split_n(n, far_dk["BLOCK_N"], -(-p // far_dk["BLOCK_P"]) * far_dk["NUM_V"] * b * h,
                             RESIDENT_PER_SM * m.sm_count)[0]
        out.append(KernelCost(
            "combine bwd far patches", "bwd", "triton", "none", 0, 0,
            nh * (1 + -(-p // far_dk["BLOCK_P"])) + b * h * f + b * h * far_splits * p * dh * f, 0, 0,
            note="combine's dq and dK kernels for the patches beyond the rescale's bound; with none (as "
                 "counted here) each program reads the LSE_c of its patches, and the dK partials are zeroed"))
    if dispatch_fused:
        db = dispatch_bwd_meta(p, dh, dtype, do if routing_fused else 0)
        dbp, dbn = _pad(p, db["BLOCK_P"]), _pad(n, db["BLOCK_N"])
        d_splits = split_n(n, db["BLOCK_N"], b * h, RESIDENT_PER_SM * m.sm_count)[0]
        fused_bytes = bn * c * s + k_bytes + z_bytes + 2 * lse_d + bn * c * s + b * h * d_splits * p * dh * f
        tiles = f"{db['BLOCK_N']} x {db['BLOCK_P']} tiles, {dbp} slots for {p}; {d_splits} n-chunks of partials"
        if routing_fused:  # + dO . Y per logit; reads dO, out, LSE_c and Y (dot dtype); alpha per patch
            out.append(KernelCost(
                "routing bwd (fused)", "bwd", "triton", dot, 2 * bn * h * p * (5 * dh + do), bn * h * p + bn * h,
                fused_bytes + 2 * bn * d * s + nh + b * p * d * s + 2 * lse_d,
                2 * b * h * dbp * dbn * (5 * dh + do), b * h * dbp * dbn + bn * h,
                note=f"dq and dK of dispatch and combine from one exponential pass (combine's weights by a "
                     f"rank-one rescale of dispatch's): {tiles}"))
        else:
            out.append(KernelCost(
                "dispatch bwd (fused)", "bwd", "triton", dot, 10 * bn * h * p * dh, bn * h * p, fused_bytes,
                10 * b * h * dbp * dbn * dh, b * h * dbp * dbn,
                note=f"dq and dK from one exponential pass: {tiles}"))
    else:
        dq_meta = dispatch_dq_meta(p, dh, dtype)
        qp_pad, qn_pad = _pad(p, dq_meta["BLOCK_P"]), _pad(n, dq_meta["BLOCK_N"])
        out.append(KernelCost(
            "dispatch bwd dq", "bwd", "triton", dot, 8 * bn * h * p * dh, bn * h * p,
            bn * c * s + k_bytes + z_bytes + 2 * lse_d + bn * c * s,
            8 * b * h * qp_pad * qn_pad * dh, b * h * qp_pad * qn_pad))
        dkm = dispatch_dk_meta(p, dh, dtype, legacy)
        kp_pad, kn_pad = _pad(p, dkm["BLOCK_P"]), _pad(n, dkm["BLOCK_N"])
        d_splits = split_n(n, dkm["BLOCK_N"], -(-p // dkm["BLOCK_P"]) * dkm["NUM_DV"] * b * h,
                           RESIDENT_PER_SM * m.sm_count)[0]
        out.append(KernelCost(
            "dispatch bwd dK", "bwd", "triton", dot, 6 * bn * h * p * dh, bn * h * p,
            bn * c * s + k_bytes + z_bytes + 2 * lse_d + b * h * d_splits * p * dh * f,
            6 * b * h * kp_pad * kn_pad * dh, b * h * kp_pad * kn_pad, note=f"{d_splits} n-chunks of partials"))
    if not keep_slots and not routing_fused:
        out.append(KernelCost("autograd dq add", "bwd", "torch", "none", 0, 0, 3 * bn * c * s, 0, 0,
                              note="dq of dispatch + dq of combine, summed by autograd"))

    nbm = query_rows_meta(c, dtype)
    ngrid = -(-bn // nbm["BLOCK_M"])
    out.append(KernelCost("query norm bwd", "bwd", "triton", "none", 0, 0,
                          bn * c * s * 2 + 2 * bn * f + c * pf + bn * c * s + 2 * ngrid * c * f, 0, 0,
                          note="dq, y, mean, rstd -> dy, dgamma and db partials (db = dy.sum(0) without a pass "
                               "over dy)"))
    if need_dx:
        out.append(KernelCost("query dx GEMM", "bwd", "cuBLAS", dot, 2 * bn * c * din, 0,
                              bn * c * s + c * din * s + bn * din * s, 2 * bn * c * din, 0))
    out.append(KernelCost("query dW GEMM", "bwd", "cuBLAS", dot, 2 * bn * c * din, 0,
                          bn * c * s + bn * din * s + c * din * s, 2 * bn * c * din, 0))
    # small torch ops of the backward: delta_d, partial sums (dK, dY, expert params, dgamma, db), casts
    small_bwd = (2 * z_bytes + lse_d + b * h * d_splits * p * dh * f + eparts + 2 * ngrid * c * f
                 + (c * din * (s + 4) if s < 4 else 0) + (y_bytes + b * p * d * s if keep_slots and s < 4 else 0))
    if not keep_slots:  # the combine partials' sums, dY's dropout, and (fused) beta Y, g, beta, dK's far sum
        small_bwd += (b * h * c_splits * p * (do if routing_fused else dh + do) * f + 2 * y_bytes
                      + (y_bytes + b * p * d * s + 3 * lse_d + b * h * far_splits * p * dh * f
                         if routing_fused else 0))
    out.append(KernelCost("small torch ops (bwd)", "bwd", "torch", "none", 0, 0, small_bwd, 0, 0,
                          note="delta_d, sums of partials, casts"))
    return out


def linear_kernels(n: int, dtype: torch.dtype, sz: Sizes = RECOMMENDED, tf32: bool = False,
                   need_dx: bool = False) -> List[KernelCost]:
    """nn.Linear(din, d) on ``sz.b`` bags of ``n`` patches (bf16 under autocast)."""
    s, bn, din, d = dtype.itemsize, sz.b * n, sz.din, sz.d
    dot = _dot_kind(dtype, tf32)
    fl = 2 * bn * din * d
    out = [
        KernelCost("linear fwd GEMM", "fwd", "cuBLAS", dot, fl, 0, bn * din * s + din * d * s + d * s + bn * d * s,
                   fl, 0, chains=("infer", "train")),
        KernelCost("linear dW GEMM", "bwd", "cuBLAS", dot, fl, 0, bn * d * s + bn * din * s + din * d * s, fl, 0),
        KernelCost("linear db (dO.sum)", "bwd", "torch", "none", 0, 0, bn * d * s + d * ACC_BYTES, 0, 0),
    ]
    if need_dx:
        out.append(KernelCost("linear dx GEMM", "bwd", "cuBLAS", dot, fl, 0, bn * d * s + din * d * s + bn * din * s,
                              fl, 0))
    return out


def _verdict(t: dict, target: float) -> str:
    """Whether a bf16 training tile floor is within ``target`` x nn.Linear's training floor."""
    ratio = t["mammoth_train_tile"] / t["linear_train"]
    return f"{ratio:.2f}x {'meets' if ratio <= target else 'misses'} {target}x"


def chain_floor(kernels: Iterable[KernelCost], chain: str, m: Machine = H100, tile: bool = False) -> float:
    """Sum of the floors of the kernels a pass runs, one after another (seconds)."""
    return sum(k.floor(m, tile) for k in kernels if chain in k.chains)


def launcher_floor(kernels: Sequence[KernelCost], names: Sequence[str], m: Machine = H100) -> float:
    """Sum of the floors of the named kernels (what one launcher runs), seconds."""
    by_name = {k.name: k for k in kernels}
    missing = [nm for nm in names if nm not in by_name]
    if missing:
        raise KeyError(f"roofline: no kernel named {missing}; have {sorted(by_name)}")
    return sum(by_name[nm].floor(m) for nm in names)


# ------------------------------------------------------------------ reporting
def _us(t: float) -> str:
    return f"{t * 1e6:.1f}"


def kernel_table(kernels: Sequence[KernelCost], m: Machine = H100) -> str:
    rows = ["| kernel | runs on | GFLOP | M exp | MB | t mem µs | t matmul µs | t exp µs | floor µs | bound "
            "| tile floor µs | note |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|---|"]
    for k in kernels:
        t = k.times(m)
        rows.append(
            f"| {k.name} | {k.runs_on} | {k.flops / 1e9:.2f} | {k.exps / 1e6:.1f} | {k.bytes / 1e6:.1f} "
            f"| {_us(t['memory'])} | {_us(t['matmul'])} | {_us(t['exp'])} | **{_us(k.floor(m))}** | {k.bound(m)} "
            f"| {_us(k.floor(m, tile=True))} | {k.note} |")
    return "\n".join(rows)


def totals(n: int, dtype: torch.dtype, keep_slots: bool, sz: Sizes = RECOMMENDED, m: Machine = H100,
           tf32: bool = False, legacy: bool = False) -> Dict[str, float]:
    """Floors (seconds) of Mammoth's (in the kernel plan ``legacy`` or not) and
    nn.Linear's inference forward and training step."""
    mk = mammoth_kernels(n, dtype, keep_slots, sz, m, tf32, legacy=legacy)
    lk = linear_kernels(n, dtype, sz, tf32)
    return {
        "mammoth_fwd": chain_floor(mk, "infer", m), "mammoth_train": chain_floor(mk, "train", m),
        "mammoth_fwd_tile": chain_floor(mk, "infer", m, tile=True),
        "mammoth_train_tile": chain_floor(mk, "train", m, tile=True),
        "linear_fwd": chain_floor(lk, "infer", m), "linear_train": chain_floor(lk, "train", m),
    }


def totals_table(n: int, dtype: torch.dtype, keep_slots: bool, sz: Sizes = RECOMMENDED, m: Machine = H100,
                 tf32: bool = False, legacy: bool = False) -> str:
    t = totals(n, dtype, keep_slots, sz, m, tf32, legacy)
    return "\n".join([
        "| pass | Mammoth floor µs | tile floor µs | nn.Linear floor µs | Mammoth / Linear | tile floor / Linear |",
        "|---|--:|--:|--:|--:|--:|",
        f"| forward (inference) | {_us(t['mammoth_fwd'])} | {_us(t['mammoth_fwd_tile'])} | {_us(t['linear_fwd'])} "
        f"| {t['mammoth_fwd'] / t['linear_fwd']:.2f}x | {t['mammoth_fwd_tile'] / t['linear_fwd']:.2f}x |",
        f"| forward+backward (training) | {_us(t['mammoth_train'])} | {_us(t['mammoth_train_tile'])} "
        f"| {_us(t['linear_train'])} | {t['mammoth_train'] / t['linear_train']:.2f}x "
        f"| {t['mammoth_train_tile'] / t['linear_train']:.2f}x |",
    ])


def report(n: int, dtypes: Sequence[str], keep_slots: Sequence[bool], sz: Sizes = RECOMMENDED, m: Machine = H100,
           tf32: bool = False, legacy: bool = False) -> str:
    parts = []
    plan = ", legacy kernel plan" if legacy else ""
    for dname in dtypes:
        dtype = DTYPES[dname]
        lk = linear_kernels(n, dtype, sz, tf32)
        parts.append(f"### nn.Linear({sz.din}, {sz.d}), {dname}, N = {n:,}\n\n{kernel_table(lk, m)}\n")
        for ks in keep_slots:
            mk = mammoth_kernels(n, dtype, ks, sz, m, tf32, legacy=legacy)
            parts.append(f"### Mammoth, {dname}, keep_slots={ks}, N = {n:,}{plan}\n\n{kernel_table(mk, m)}\n\n"
                         f"{totals_table(n, dtype, ks, sz, m, tf32, legacy)}\n")
    return "\n".join(parts)


def _by_name(kernels: Sequence[KernelCost]) -> Dict[str, KernelCost]:
    return {k.name: k for k in kernels}


def document(n: int = 100_000, sz: Sizes = RECOMMENDED, m: Machine = H100) -> str:
    """ROOFLINE.md: every number below is computed here."""
    bf, fp = DTYPES["bf16"], DTYPES["fp32"]
    kb = _by_name(mammoth_kernels(n, bf, False, sz, m))
    kbt = _by_name(mammoth_kernels(n, bf, True, sz, m))
    kf = _by_name(mammoth_kernels(n, fp, True, sz, m))
    lb = _by_name(linear_kernels(n, bf, sz))
    tb_t, tb_f = totals(n, bf, True, sz, m), totals(n, bf, False, sz, m)
    tf_t, tf_f = totals(n, fp, True, sz, m), totals(n, fp, False, sz, m)
    tf32_t = totals(n, fp, True, sz, m, tf32=True)
    lg_t, lg_f = totals(n, bf, True, sz, m, legacy=True), totals(n, bf, False, sz, m, legacy=True)
    disp = kb["dispatch fwd partial"]
    dt = disp.times(m)
    q = kbt["query fwd (+y)"]
    dm = dispatch_meta(sz.p, sz.dh, bf)
    dm_legacy = dispatch_meta(sz.p, sz.dh, bf, legacy=True)
    fused = kbt["dispatch bwd (fused)"]
    legacy_disp = _by_name(mammoth_kernels(n, bf, True, sz, m, legacy=True))["dispatch fwd partial"]
    cm = combine_meta(sz.p, sz.dh, sz.do, bf)
    routing = kb["routing bwd (fused)"]
    exp_share_t = sum(k.floor(m) for k in kbt.values() if k.exps and k.bound(m) == "exp") / tb_t["mammoth_train"]
    exp_share_f = sum(k.floor(m) for k in kb.values() if k.exps and k.bound(m) == "exp") / tb_f["mammoth_train"]
    fdisp = kf["dispatch fwd partial"]
    lin = lb["linear fwd GEMM"]
    return f"""# Roofline of the triton backend (H100 SXM)

Generated by `python -m benchmarks.roofline --write benchmarks/ROOFLINE.md`
(`benchmarks/roofline.py`): every number in this file is computed by that
module, for an H100 SXM; `machine_for` gives an H200's ceilings (4.3 TB/s
copy and 790 TFLOP/s bf16 matmul, both measured on one). Measured times against
these floors: `python -m benchmarks.gpu_check` (section `kernels`) and
`python -m benchmarks.run` on a CUDA GPU time every kernel launcher and report
its time as a multiple of its floor at the card's ceilings; results in
`benchmarks/results/` ([docs/gpu-acceptance.md](../docs/gpu-acceptance.md)). The n-chunk counts below
assume 2 programs of a split kernel resident per SM; the launchers read the
compiled kernel's occupancy instead.

Sizes: Din {sz.din}, D {sz.d}, C {sz.c}, H {sz.h} (dh {sz.dh}, do {sz.do}), E {sz.e}, S {sz.s}
(P {sz.p}), auto rank {sz.r}, one bag of N = {n:,} patches. bf16 means autocast: features,
q, y and their gradients in bf16, parameters, K, Z, Y, LSEs and partials in fp32.
The feature gradient is not computed (MIL features are fixed), so the query's dx
GEMM and nn.Linear's dx GEMM are left out of both sides.

## Model

- FLOPs: matmul FLOPs only, 2 x M x N x K per product.
- Exponentials: counted apart, they run on the SFU (exp2, MUFU.EX2), not on the tensor cores.
- Bytes: the minimum, each input read once and each output written once, in the dtype the
  launcher gives it (per-program partials included, as the launchers allocate them).
- floor = max(bytes / {m.bytes_per_s / 1e12:.1f} TB/s, FLOPs / matmul rate, exps / {m.sfu_per_s / 1e12:.2f}e12 exp2 per s),
  matmul rate {m.tensor_flops / 1e12:.0f} TFLOP/s for bf16 tensor-core dots, {m.fp32_flops / 1e12:.0f} TFLOP/s for
  fp32 (IEEE dots are FMA loops; torch's default keeps TF32 off), {m.tf32_flops / 1e12:.0f} TFLOP/s with TF32.
- Sources and assumptions: {m.source}.
- "tile floor": the same with the FLOPs and exponentials the kernels issue on their padded tiles.
- A pass's floor is the sum of its kernels' floors (they run one after another). Launch
  overhead (a few µs per launch) is not modeled: it dominates the experts kernels and the
  small torch ops, whose floors are below a microsecond.

## Where the time should go (N = {n:,})

- **nn.Linear(1024, 512)** is compute-bound on the tensor cores in bf16: {lin.flops / 1e9:.0f} GFLOP forward, floor
  {_us(lin.floor(m))} µs; its training step (forward, dW GEMM, db) has a floor of {_us(tb_t['linear_train'])} µs.
- **dispatch is exp-bound.** Each pass over the logits evaluates N x H x P = {disp.exps / 1e6:.0f} M exponentials:
  {_us(dt['exp'])} µs at the SFU rate, against {_us(dt['matmul'])} µs of tensor-core work (dh = {sz.dh}: only
  {disp.flops / disp.exps:.0f} FLOPs per exponential, where {m.tensor_flops / m.sfu_per_s:.0f} would balance the two) and {_us(dt['memory'])} µs
  of memory traffic (q read once, with K and the partials: {disp.bytes / 1e6:.1f} MB). The forward pays this once and
  the fused dispatch backward once more (dq and dK from one pass; the legacy plan's two backward kernels paid it
  twice). keep_slots=False adds two more passes: the combine forward, and combine's dY kernel in the backward;
  combine's dq and dK come from the fused backward's exponentials (the legacy plan: four backward passes, and a
  sum of two dq), whose combine weights are its dispatch weights rescaled by exp(LSE_d - g) exp(g - LSE_c) and
  whose dO . Y products add {_us(routing.times(m)['matmul'] - fused.times(m)['matmul'])} µs of tensor-core work: it is
  matmul-bound in this model ({_us(routing.floor(m))} µs). Exp-bound kernels:
  {100 * exp_share_t:.0f} % of the bf16 training floor with keep_slots=True, {100 * exp_share_f:.0f} % with keep_slots=False.
- **Padding costs exponentials.** The dispatch forward, its fused backward and the combine forward use
  {dm['BLOCK_P']}-slot tiles (``slot_block``: at most about 7 % padding), {_pad(sz.p, dm['BLOCK_P'])} slots computed for
  {sz.p}: tile floor {_us(disp.floor(m, tile=True))} µs against {_us(disp.floor(m))} µs for the dispatch forward and
  {_us(fused.floor(m, tile=True))} µs for the fused backward. The legacy plan's bf16 dispatch forward and dK used
  {dm_legacy['BLOCK_P']}-slot tiles ({_pad(sz.p, dm_legacy['BLOCK_P'])} slots; tile floor
  {_us(legacy_disp.floor(m, tile=True))} µs). Combine's dY kernel uses {cm['BLOCK_P']}-slot tiles.
- **query is memory-bound** in bf16 (the ridge is {m.tensor_flops / m.bytes_per_s:.0f} FLOP/byte): it reads feats
  ({n * sz.din * 2 / 1e6:.1f} MB) and writes q and y: {q.bytes / 1e6:.1f} MB, floor {_us(q.floor(m))} µs. Its backward
  (norm backward with db's partials, dW GEMM) costs
  {_us(kbt['query norm bwd'].floor(m) + kbt['query dW GEMM'].floor(m))} µs.
- **experts** work on P = {sz.p} slot vectors, independent of N: floors {_us(kbt['experts fwd'].floor(m))} µs forward and
  {_us(kbt['experts bwd'].floor(m))} µs backward, so their time is launch overhead.
- **Totals, bf16**: keep_slots=True, forward {_us(tb_t['mammoth_fwd'])} µs ({tb_t['mammoth_fwd'] / tb_t['linear_fwd']:.2f}x
  nn.Linear's {_us(tb_t['linear_fwd'])} µs), training step {_us(tb_t['mammoth_train'])} µs
  ({tb_t['mammoth_train'] / tb_t['linear_train']:.2f}x nn.Linear's {_us(tb_t['linear_train'])} µs); keep_slots=False,
  forward {_us(tb_f['mammoth_fwd'])} µs ({tb_f['mammoth_fwd'] / tb_f['linear_fwd']:.2f}x), training step
  {_us(tb_f['mammoth_train'])} µs ({tb_f['mammoth_train'] / tb_f['linear_train']:.2f}x).
- **fp32** (IEEE dots on FMA units): the routing products become the bound, e.g. the dispatch forward needs
  {fdisp.flops / 1e9:.1f} GFLOP, {_us(fdisp.times(m)['matmul'])} µs at {m.fp32_flops / 1e12:.0f} TFLOP/s, against
  {_us(fdisp.times(m)['exp'])} µs of exponentials. Training step: keep_slots=True {_us(tf_t['mammoth_train'])} µs
  ({tf_t['mammoth_train'] / tf_t['linear_train']:.2f}x nn.Linear's {_us(tf_t['linear_train'])} µs, an SGEMM),
  keep_slots=False {_us(tf_f['mammoth_train'])} µs ({tf_f['mammoth_train'] / tf_f['linear_train']:.2f}x). With TF32
  allowed (keep_slots=True): {_us(tf32_t['mammoth_train'])} µs against {_us(tf32_t['linear_train'])} µs.
- **Kernel plans** (``_launch.legacy_kernels``; bf16 training step, tile floors): keep_slots=True
  {_us(tb_t['mammoth_train_tile'])} µs, {tb_t['mammoth_train_tile'] / tb_t['linear_train']:.2f}x nn.Linear (legacy plan
  {_us(lg_t['mammoth_train_tile'])} µs, {lg_t['mammoth_train_tile'] / lg_t['linear_train']:.2f}x); keep_slots=False
  {_us(tb_f['mammoth_train_tile'])} µs, {tb_f['mammoth_train_tile'] / tb_f['linear_train']:.2f}x (legacy
  {_us(lg_f['mammoth_train_tile'])} µs, {lg_f['mammoth_train_tile'] / lg_f['linear_train']:.2f}x). Issue 19's targets,
  1.8x (keep_slots=True) and 2.9x (keep_slots=False): {_verdict(tb_t, 1.8)} and {_verdict(tb_f, 2.9)}.
- Ways below these floors would move work off the SFU (e.g. part of the exponentials as
  polynomials on the FMA units, as FlashAttention-4 does).

## Per kernel

{report(n, ['bf16', 'fp32'], [True, False], sz, m)}
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="patches in the bag (default 100000)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--keep-slots", choices=["true", "false", "both"], default="both")
    parser.add_argument("--tf32", action="store_true", help="fp32 dots and GEMMs on TF32 tensor cores")
    parser.add_argument("--legacy", action="store_true",
                        help="the legacy kernel plan (MAMMOTH_FAST_LEGACY_KERNELS=1): two backward kernels per "
                             "routing stage, 128-slot tiles in the 16-bit dispatch forward")
    parser.add_argument("--write", metavar="PATH", help="write the ROOFLINE.md document (N from --n) to PATH")
    args = parser.parse_args(argv)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(document(args.n))
        print(f"wrote {args.write}")
        return
    ks = {"true": [True], "false": [False], "both": [True, False]}[args.keep_slots]
    print(f"Roofline on {H100.name} (floors in µs)\n")
    print(report(args.n, args.dtype, ks, tf32=args.tf32, legacy=args.legacy))


if __name__ == "__main__":
    main()
