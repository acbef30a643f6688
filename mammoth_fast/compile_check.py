"""Ahead-of-time compile check of the Triton kernels for an H100 (sm_90a), no GPU needed.

    python -m mammoth_fast.compile_check [--json rows.json] [--jobs N]

Every kernel in ``KERNELS`` is compiled with ``triton.compile`` at the block
sizes its launcher picks (the same ``*_meta`` functions), for the recommended
layer on one bag of N in {1000, 100000} patches, in fp32 and bf16, and for each
flag variant its launcher passes. Arguments are specialized as the launcher's
call specializes them (pointers and 16-divisible ints get ``tt.divisibility``,
ints equal to 1 become constants); identical compile jobs run once, spread
over one process per CPU. Per job it reports registers, spilled bytes, shared
memory and whether the dots run on tensor cores (n/a: no dots), and fails on
a compile error, a spill, or shared memory above the H100's 227 KiB per
block. Where TRITON_INTERPRET is set (the tests without a GPU),
``run_checks`` compiles in a child process without it.

Adding a kernel is one ``Kernel`` entry: its file, its name, a function
giving every argument its launcher passes (a torch dtype stands for a pointer
to that dtype), plus ``num_warps`` / ``num_stages`` where the launcher sets
them, its flags and, where some combinations of them are never launched, a
predicate that drops those.
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

from .kernels._launch import TORCH_TO_TL, acc_dtype, dot_dtype, interpreting
from .kernels._slot_dropout import slot_keep_mask_meta
from .kernels.combine import combine_dkdy_meta, combine_dq_meta, combine_meta
from .kernels.dispatch import dispatch_dk_meta, dispatch_dq_meta, dispatch_meta
from .kernels.experts import experts_bwd_meta, experts_meta
from .kernels.query import query_meta, query_norm_bwd_meta
from .sizes import LayerSizes

H100 = GPUTarget("cuda", 90, 32)  # compiles for sm_90a
H100_SM_COUNT = 132
H100_SMEM_PER_BLOCK = 227 * 1024  # 232448 bytes
N_VALUES = (1000, 100_000)
DTYPES = (torch.float32, torch.bfloat16)
INPUT_PRECISION = "ieee"  # fp32 dots under torch's default (TF32 matmuls off)
OPTIONS = ("num_warps", "num_stages")
PACKAGE = "mammoth_fast.kernels"
MODULE = "mammoth_fast.compile_check"
PTR_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.uint8: "u8", torch.int8: "i8", torch.int64: "i64"}
P_DROP = 0.1  # slot dropout where HAS_DROP


@dataclass(frozen=True)
class Sizes(LayerSizes):
    """The recommended layer (Din 1024, D 512, C 256, H 16, E 30, S 10, rank 17)
    on B bags of N patches computing in ``dtype``. Parameters stay fp32: bf16
    runs under autocast."""
    n: int = 1000
    dtype: torch.dtype = torch.float32
    param: torch.dtype = torch.float32

    @property
    def acc(self) -> torch.dtype:
        return acc_dtype(self.dtype)


def _precision(sz: Sizes) -> dict:
    """The dtype constexprs of the launchers, as on a GPU."""
    return dict(DOT_DTYPE=dot_dtype(sz.dtype), INPUT_PRECISION=INPUT_PRECISION, ACC=TORCH_TO_TL[sz.acc])


def _mask(sz: Sizes, has_mask: bool) -> torch.dtype:
    """The mask pointer: bool viewed as uint8, or q standing in when there is none."""
    return torch.uint8 if has_mask else sz.dtype


def _dispatch_meta(sz: Sizes) -> dict:
    return dispatch_meta(sz.n, sz.p, sz.dh, sz.b * sz.h, sz.dtype, H100_SM_COUNT)


def _drop(sz: Sizes, has_drop: bool) -> dict:
    """The seed pointer, (1,) int64 (q standing in when there is no dropout), and p."""
    return dict(SEED=torch.int64 if has_drop else sz.dtype, p_drop=P_DROP if has_drop else 0.0)


# One function per kernel, mirroring its launcher's call on contiguous tensors.

def _query_args(sz: Sizes, USE_LAYERNORM: bool, STORE_Y: bool) -> dict:
    m = sz.b * sz.n
    return dict(
        X=sz.dtype, W=sz.dtype, BIAS=sz.param, GAMMA=sz.param, BETA=sz.param, Q=sz.dtype, Y=sz.dtype,
        MEAN=sz.acc, RSTD=sz.acc, M=m, K=sz.din, C=sz.c, stride_xm=sz.din, stride_xk=1, stride_wc=sz.din,
        stride_wk=1, stride_qm=sz.c, eps=1e-5, USE_LAYERNORM=USE_LAYERNORM, STORE_Y=STORE_Y, **_precision(sz),
        **query_meta(m, sz.din, sz.c, sz.dtype),
    )


def _query_norm_bwd_args(sz: Sizes, USE_LAYERNORM: bool, NEED_DY: bool, NEED_DGAMMA: bool) -> dict:
    """dq (M, C) contiguous from autograd in q's dtype; y, dy in x's dtype; stats and dgamma partials in ACC."""
    return dict(
        DQ=sz.dtype, Y=sz.dtype, MEAN=sz.acc, RSTD=sz.acc, GAMMA=sz.param, DY=sz.dtype, DGAMMA_PART=sz.acc,
        M=sz.b * sz.n, C=sz.c, stride_dqm=sz.c, stride_dqc=1,
        USE_LAYERNORM=USE_LAYERNORM, NEED_DY=NEED_DY, NEED_DGAMMA=NEED_DGAMMA, ACC=TORCH_TO_TL[sz.acc],
        **query_norm_bwd_meta(sz.c),
    )


def _dispatch_partial_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    meta = _dispatch_meta(sz)
    del meta["n_splits"]  # the grid's third dim
    return dict(
        Q=sz.dtype, K=sz.acc, MASK=_mask(sz, HAS_MASK), M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc,
        N=sz.n, P=sz.p, H=sz.h, n_per_split=meta.pop("n_per_split"), **_drop(sz, HAS_DROP),
        stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh,
        **_precision(sz), **meta,
    )


def _dispatch_merge_args(sz: Sizes) -> dict:
    meta = _dispatch_meta(sz)
    return dict(
        M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc, Z=sz.acc, LSE=sz.acc, P=sz.p, n_splits=meta["n_splits"],
        DH=sz.dh, BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], ACC=TORCH_TO_TL[sz.acc],
    )


def _dispatch_bwd_dq_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    """dz, lse, delta and K in ACC; q and dq (B, N, C) contiguous in q's dtype."""
    return dict(
        Q=sz.dtype, K=sz.acc, DZ=sz.acc, LSE=sz.acc, DELTA=sz.acc, MASK=_mask(sz, HAS_MASK), DQ=sz.dtype,
        N=sz.n, P=sz.p, H=sz.h, **_drop(sz, HAS_DROP), stride_qb=sz.n * sz.c, stride_qn=sz.c,
        stride_dqb=sz.n * sz.c, stride_dqn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh,
        **_precision(sz), **dispatch_dq_meta(sz.n, sz.p, sz.dh, sz.dtype),
    )


def _dispatch_bwd_dk_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    """The partials' grid, as the forward's; dK partials in ACC."""
    meta = dispatch_dk_meta(sz.n, sz.p, sz.dh, sz.b * sz.h, sz.dtype, H100_SM_COUNT)
    del meta["n_splits"]
    return dict(
        Q=sz.dtype, K=sz.acc, DZ=sz.acc, LSE=sz.acc, DELTA=sz.acc, MASK=_mask(sz, HAS_MASK), DK_PART=sz.acc,
        N=sz.n, P=sz.p, H=sz.h, n_per_split=meta.pop("n_per_split"), **_drop(sz, HAS_DROP),
        stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh,
        **_precision(sz), **meta,
    )


def _slot_keep_mask_args(sz: Sizes) -> dict:
    """``slot_keep_mask``'s launch: an int8 (B, N, H, P) mask (tests and return_weights)."""
    return dict(OUT=torch.int8, **_drop(sz, True), N=sz.n, H=sz.h, P=sz.p, **slot_keep_mask_meta())


def _experts_args(sz: Sizes, SHARED: bool) -> dict:
    return dict(
        Z=sz.acc, A=sz.param, ABIAS=sz.param, BW=sz.param, CBIAS=sz.param, G=sz.param, Y=sz.acc, INV_NORM=sz.acc,
        S=sz.s, H=sz.h, R=sz.r, DO=sz.do, SHARED=SHARED, DH=sz.dh, INPUT_PRECISION=INPUT_PRECISION,
        ACC=TORCH_TO_TL[sz.acc], **experts_meta(sz.s, sz.dh, sz.r, sz.do),
    )


def _experts_bwd_args(sz: Sizes, SHARED: bool, PARAM_GRADS: bool, INPUT_GRAD: bool) -> dict:
    """Z, dY, dZ, the inverse norms and the partials in ACC; parameters in their dtype."""
    return dict(
        Z=sz.acc, A=sz.param, ABIAS=sz.param, BW=sz.param, CBIAS=sz.param, G=sz.param, INV_NORM=sz.acc,
        DY=sz.acc, DZ=sz.acc, DA_PART=sz.acc, DABIAS_PART=sz.acc, DBW_PART=sz.acc, DCBIAS_PART=sz.acc,
        DG_PART=sz.acc, S=sz.s, H=sz.h, R=sz.r, DO=sz.do, SHARED=SHARED, DH=sz.dh, PARAM_GRADS=PARAM_GRADS,
        INPUT_GRAD=INPUT_GRAD, INPUT_PRECISION=INPUT_PRECISION, ACC=TORCH_TO_TL[sz.acc],
        **experts_bwd_meta(sz.s, sz.dh, sz.r, sz.do),
    )


def _combine_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    return dict(
        Q=sz.dtype, K=sz.acc, Y=sz.acc, MASK=_mask(sz, HAS_MASK), OUT=sz.dtype, LSE=sz.acc, N=sz.n, P=sz.p, H=sz.h,
        **_drop(sz, HAS_DROP), stride_qb=sz.n * sz.c, stride_qn=sz.c, stride_ob=sz.n * sz.d, stride_on=sz.d,
        HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh, DO=sz.do, **_precision(sz),
        **combine_meta(sz.n, sz.p, sz.dh, sz.do, sz.dtype),
    )


def _combine_bwd_dq_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, NEED_DQ: bool) -> dict:
    """q, out, dO and dq (B, N, *) contiguous in the compute dtype; K, Y, LSE and delta_c in ACC."""
    return dict(
        Q=sz.dtype, K=sz.acc, Y=sz.acc, MASK=_mask(sz, HAS_MASK), OUT=sz.dtype, DOUT=sz.dtype, LSE=sz.acc,
        DELTA=sz.acc, DQ=sz.dtype, N=sz.n, P=sz.p, H=sz.h, **_drop(sz, HAS_DROP), stride_qb=sz.n * sz.c,
        stride_qn=sz.c, stride_dqb=sz.n * sz.c, stride_dqn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP,
        NEED_DQ=NEED_DQ, DH=sz.dh, DO=sz.do, **_precision(sz),
        **combine_dq_meta(sz.n, sz.p, sz.dh, sz.do, sz.dtype),
    )


def _combine_bwd_dkdy_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool, NEED_DK: bool, NEED_DY: bool) -> dict:
    """dK and dY partials in ACC, on the split-n grid."""
    meta = combine_dkdy_meta(sz.n, sz.p, sz.dh, sz.do, sz.b * sz.h, sz.dtype, H100_SM_COUNT)
    del meta["n_splits"]
    return dict(
        Q=sz.dtype, K=sz.acc, MASK=_mask(sz, HAS_MASK), DOUT=sz.dtype, LSE=sz.acc, DELTA=sz.acc, Y=sz.acc,
        DK_PART=sz.acc, DY_PART=sz.acc, N=sz.n, P=sz.p, H=sz.h, n_per_split=meta.pop("n_per_split"),
        **_drop(sz, HAS_DROP), stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP,
        NEED_DK=NEED_DK, NEED_DY=NEED_DY, DH=sz.dh, DO=sz.do, **_precision(sz), **meta,
    )


@dataclass(frozen=True)
class Kernel:
    module: str  # file in kernels/
    name: str  # the @triton.jit function
    args: Callable[..., dict]  # (Sizes, **flags) -> every kernel argument, and the launch options
    flags: dict = field(default_factory=dict)  # constexpr flag -> the values to compile
    launched: Callable[..., bool] = lambda **flags: True  # (**flags) -> whether a launcher passes the combo


def _any_output(NEED_DY: bool, NEED_DGAMMA: bool, **_) -> bool:
    return NEED_DY or NEED_DGAMMA


def _any_grad(PARAM_GRADS: bool, INPUT_GRAD: bool, **_) -> bool:
    return PARAM_GRADS or INPUT_GRAD


def _dk_or_dy(NEED_DK: bool, NEED_DY: bool, **_) -> bool:
    return NEED_DK or NEED_DY


MASK_DROP = {"HAS_MASK": (False, True), "HAS_DROP": (False, True)}
KERNELS = (
    Kernel("query", "_query_fwd_kernel", _query_args, {"USE_LAYERNORM": (True, False), "STORE_Y": (True, False)}),
    Kernel("query", "_query_norm_bwd_kernel", _query_norm_bwd_args,
           {"USE_LAYERNORM": (True, False), "NEED_DY": (True, False), "NEED_DGAMMA": (True, False)}, _any_output),
    Kernel("dispatch", "_dispatch_partial_kernel", _dispatch_partial_args, MASK_DROP),
    Kernel("dispatch", "_dispatch_merge_kernel", _dispatch_merge_args),
    Kernel("dispatch", "_dispatch_bwd_dq_kernel", _dispatch_bwd_dq_args, MASK_DROP),
    Kernel("dispatch", "_dispatch_bwd_dk_kernel", _dispatch_bwd_dk_args, MASK_DROP),
    Kernel("_slot_dropout", "_slot_keep_mask_kernel", _slot_keep_mask_args),
    Kernel("experts", "_experts_fwd_kernel", _experts_args, {"SHARED": (True, False)}),
    Kernel("experts", "_experts_bwd_kernel", _experts_bwd_args,
           {"SHARED": (True, False), "PARAM_GRADS": (True, False), "INPUT_GRAD": (True, False)}, _any_grad),
    Kernel("combine", "_combine_fwd_kernel", _combine_args, MASK_DROP),
    Kernel("combine", "_combine_bwd_dq_kernel", _combine_bwd_dq_args, {**MASK_DROP, "NEED_DQ": (True, False)}),
    Kernel("combine", "_combine_bwd_dkdy_kernel", _combine_bwd_dkdy_args,
           {**MASK_DROP, "NEED_DK": (True, False), "NEED_DY": (True, False)}, _dk_or_dy),
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


def _run_in_child(workers: int | None) -> list[dict]:
    """The rows of ``python -m mammoth_fast.compile_check`` run without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        jobs = ["--jobs", str(workers)] if workers else []
        proc = subprocess.run([sys.executable, "-m", MODULE, "--json", str(out), *jobs], env=env,
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


def _problems(row: dict) -> list[str]:
    problems = []
    if row["spill_bytes"]:
        problems.append(f"spills {row['spill_bytes']} bytes per thread")
    if row["shared"] is not None and row["shared"] > H100_SMEM_PER_BLOCK:
        problems.append(f"shared memory {row['shared']} B > {H100_SMEM_PER_BLOCK} B")
    return problems


def _check(job: Job, cases: list, fn: JITFunction) -> dict:
    row = dict(
        kernel=job.name,
        dtypes=list(dict.fromkeys(str(dtype).removeprefix("torch.") for dtype, _ in cases)),
        n=list(dict.fromkeys(n for _, n in cases)),
        constexprs={k: v for k, v in job.constexprs if isinstance(v, bool) or k.startswith("BLOCK_")},
        num_warps=None, num_stages=None, n_regs=None, spill_bytes=None, shared=None, tensor_cores=None,
        problems=[],
    )
    start = time.perf_counter()
    try:
        compiled = _compile(job, fn)
    except Exception as err:  # noqa: BLE001 - any compile failure is a reported result
        row["problems"] = [f"compile error: {type(err).__name__}: {err}"]
        return row
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    meta = compiled.metadata
    row.update(num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared,
               **_binary_facts(compiled.asm["cubin"], compiled.asm["ptx"]))
    if "tt.dot" not in compiled.asm["ttir"]:
        row["tensor_cores"] = None  # no dots: n/a
    row["problems"] = _problems(row)
    return row


def _flag_combos(kernel: Kernel):
    """The flag combinations a launcher passes."""
    combos = [dict(zip(kernel.flags, values)) for values in itertools.product(*kernel.flags.values())]
    return [flags for flags in combos if kernel.launched(**flags)]


def _check_in_worker(job: Job, cases: list, module: str) -> dict:
    """``_check`` in a worker process: the kernel found again by its file and name."""
    return _check(job, cases, getattr(importlib.import_module(f"{PACKAGE}.{module}"), job.name))


def _workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_checks(workers: int | None = None) -> list[dict]:
    """Compile every (kernel, N, dtype, flags) case for sm_90a, each distinct
    job once, on ``workers`` processes (default: one per available CPU); one
    row per job. A row with ``problems`` fails the check."""
    if not _compiles_here():
        return _run_in_child(workers)
    jobs, modules = {}, {}
    for kernel in KERNELS:
        fn = _kernel_function(kernel)
        modules[kernel.name] = kernel.module
        for n, dtype in itertools.product(N_VALUES, DTYPES):
            for flags in _flag_combos(kernel):
                job = _job(kernel, fn, kernel.args(Sizes(n=n, dtype=dtype), **flags))
                jobs.setdefault(job, []).append((dtype, n))
    args = [(job, cases, modules[job.name]) for job, cases in jobs.items()]
    workers = min(workers or _workers(), len(args))
    if workers <= 1:
        return [_check_in_worker(*a) for a in args]
    # spawn: no fork of a process that imported torch; each worker imports the kernels once
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_check_in_worker, *zip(*args)))


def _na(value) -> str:
    return "n/a" if value is None else str(value)


def _what(row: dict) -> tuple[str, str, str, str]:
    """kernel, dtypes, N and the shown constexprs of a row, as text."""
    flags = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in row["constexprs"].items())
    return row["kernel"], ",".join(row["dtypes"]), ",".join(map(str, row["n"])), flags


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "N", "constexprs", "warps", "stages", "regs", "spill B", "smem B", "TC")
    body = [(*_what(r), *map(_na, (r["num_warps"], r["num_stages"], r["n_regs"], r["spill_bytes"], r["shared"])),
             {True: "yes", False: "no", None: "n/a"}[r["tensor_cores"]]) for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (head, *body))


def failures(rows: list[dict]) -> list[str]:
    """One line per failed row: what was compiled, and what is wrong."""
    return [f"FAIL {' '.join(_what(r))}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mammoth_fast.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--jobs", type=int, help="compile processes (default: one per available CPU)")
    args = parser.parse_args(argv)
    if not _tool("cuobjdump"):
        print("compile_check: cuobjdump not found: registers and spills are n/a")
    start = time.perf_counter()
    rows = run_checks(args.jobs)
    print(format_table(rows))
    print(f"{len(rows)} compile jobs for sm_90a in {time.perf_counter() - start:.1f} s on {args.jobs or _workers()} "
          f"processes ({sum(r['seconds'] for r in rows):.1f} s of compiling; triton {triton.__version__})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(*failures(rows), sep="\n")
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
