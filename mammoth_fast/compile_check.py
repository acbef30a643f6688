"""Ahead-of-time compile check of the Triton kernels for an H100 (sm_90a), no GPU needed.

    python -m mammoth_fast.compile_check [--json rows.json]

Every kernel in ``KERNELS`` is compiled with ``triton.compile`` at the block
sizes its launcher picks (the same ``*_meta`` functions), for the recommended
layer on one bag of N in {1000, 100000} patches, in fp32 and bf16, and for each
of its flag variants. Arguments are specialized as the launcher's call
specializes them (pointers and 16-divisible ints get ``tt.divisibility``, ints
equal to 1 become constants); identical compile jobs run once. Per job it
reports registers, spilled bytes, shared memory and whether the SASS uses
tensor cores, and fails on a compile error, a spill, or shared memory above
the H100's 227 KiB per block. Where TRITON_INTERPRET is set (the tests
without a GPU), ``run_checks`` compiles in a child process without it.

Adding a kernel is one ``Kernel`` entry: its file, its name, and a function
giving every argument its launcher passes (a torch dtype stands for a pointer
to that dtype), plus ``num_warps`` / ``num_stages`` where the launcher sets them.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
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
from .kernels.combine import combine_meta
from .kernels.dispatch import dispatch_meta
from .kernels.experts import experts_meta
from .kernels.query import query_meta

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
             torch.uint8: "u8"}


@dataclass(frozen=True)
class Sizes:
    """The recommended layer (Din 1024, D 512, C 256, H 16, E 30, S 10, rank 17)
    on B bags of N patches computing in ``dtype``. Parameters stay fp32: bf16
    runs under autocast."""
    n: int
    dtype: torch.dtype
    b: int = 1
    din: int = 1024
    d: int = 512
    c: int = 256
    h: int = 16
    e: int = 30
    s: int = 10
    r: int = 17
    param: torch.dtype = torch.float32

    @property
    def dh(self) -> int:
        return self.c // self.h

    @property
    def do(self) -> int:
        return self.d // self.h

    @property
    def p(self) -> int:
        return self.e * self.s

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


# One function per kernel, mirroring its launcher's call on contiguous tensors.

def _query_args(sz: Sizes, USE_LAYERNORM: bool) -> dict:
    m = sz.b * sz.n
    return dict(
        X=sz.dtype, W=sz.dtype, BIAS=sz.param, GAMMA=sz.param, BETA=sz.param, Q=sz.dtype, MEAN=sz.acc, RSTD=sz.acc,
        M=m, K=sz.din, C=sz.c, stride_xm=sz.din, stride_xk=1, stride_wc=sz.din, stride_wk=1, stride_qm=sz.c,
        eps=1e-5, USE_LAYERNORM=USE_LAYERNORM, **_precision(sz), **query_meta(m, sz.din, sz.c, sz.dtype),
    )


def _dispatch_partial_args(sz: Sizes, HAS_MASK: bool, HAS_DROP: bool) -> dict:
    meta = _dispatch_meta(sz)
    del meta["n_splits"]  # the grid's third dim
    seed, p_drop = (12345, 0.1) if HAS_DROP else (0, 0.0)
    return dict(
        Q=sz.dtype, K=sz.acc, MASK=_mask(sz, HAS_MASK), M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc,
        N=sz.n, P=sz.p, H=sz.h, n_per_split=meta.pop("n_per_split"), seed=seed, p_drop=p_drop,
        stride_qb=sz.n * sz.c, stride_qn=sz.c, HAS_MASK=HAS_MASK, HAS_DROP=HAS_DROP, DH=sz.dh,
        **_precision(sz), **meta,
    )


def _dispatch_merge_args(sz: Sizes) -> dict:
    meta = _dispatch_meta(sz)
    return dict(
        M_PART=sz.acc, L_PART=sz.acc, ACC_PART=sz.acc, Z=sz.acc, LSE=sz.acc, P=sz.p, n_splits=meta["n_splits"],
        DH=sz.dh, BLOCK_P=meta["BLOCK_P"], BLOCK_D=meta["BLOCK_D"], ACC=TORCH_TO_TL[sz.acc],
    )


def _experts_args(sz: Sizes, SHARED: bool) -> dict:
    return dict(
        Z=sz.acc, A=sz.param, ABIAS=sz.param, BW=sz.param, CBIAS=sz.param, G=sz.param, Y=sz.acc, INV_NORM=sz.acc,
        S=sz.s, H=sz.h, R=sz.r, DO=sz.do, SHARED=SHARED, DH=sz.dh, INPUT_PRECISION=INPUT_PRECISION,
        ACC=TORCH_TO_TL[sz.acc], **experts_meta(sz.s, sz.dh, sz.r, sz.do),
    )


def _combine_args(sz: Sizes, HAS_MASK: bool) -> dict:
    return dict(
        Q=sz.dtype, K=sz.acc, Y=sz.acc, MASK=_mask(sz, HAS_MASK), OUT=sz.dtype, LSE=sz.acc, N=sz.n, P=sz.p, H=sz.h,
        stride_qb=sz.n * sz.c, stride_qn=sz.c, stride_ob=sz.n * sz.d, stride_on=sz.d, HAS_MASK=HAS_MASK,
        DH=sz.dh, DO=sz.do, **_precision(sz), **combine_meta(sz.n, sz.p, sz.dh, sz.do, sz.dtype),
    )


@dataclass(frozen=True)
class Kernel:
    module: str  # file in kernels/
    name: str  # the @triton.jit function
    args: Callable[..., dict]  # (Sizes, **flags) -> every kernel argument, and the launch options
    flags: dict = field(default_factory=dict)  # constexpr flag -> the values to compile


KERNELS = (
    Kernel("query", "_query_fwd_kernel", _query_args, {"USE_LAYERNORM": (True, False)}),
    Kernel("dispatch", "_dispatch_partial_kernel", _dispatch_partial_args,
           {"HAS_MASK": (False, True), "HAS_DROP": (False, True)}),
    Kernel("dispatch", "_dispatch_merge_kernel", _dispatch_merge_args),
    Kernel("experts", "_experts_fwd_kernel", _experts_args, {"SHARED": (True, False)}),
    Kernel("combine", "_combine_fwd_kernel", _combine_args, {"HAS_MASK": (False, True)}),
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


def _run_in_child() -> list[dict]:
    """The rows of ``python -m mammoth_fast.compile_check`` run without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, "-m", MODULE, "--json", str(out)], env=env,
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


def _binary_facts(cubin: bytes) -> dict:
    """Registers and spilled bytes per thread (ptxas's stack frame plus local
    memory, as Triton's n_spills * 4) from ``cuobjdump -res-usage``, and whether
    the SASS has HMMA/HGMMA; None where no tool is at hand."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if not (cuobjdump or nvdisasm):
        return dict(n_regs=None, spill_bytes=None, tensor_cores=None)
    out = _run_tool([cuobjdump, "-res-usage", "-sass"] if cuobjdump else [nvdisasm], cubin)
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    return dict(n_regs=usage.get("REG"), spill_bytes=usage["STACK"] + usage["LOCAL"] if usage else None,
                tensor_cores=re.search(r"\bH(G)?MMA\b", out) is not None)


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
    try:
        compiled = _compile(job, fn)
    except Exception as err:  # noqa: BLE001 - any compile failure is a reported result
        row["problems"] = [f"compile error: {type(err).__name__}: {err}"]
        return row
    meta = compiled.metadata
    row.update(num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared,
               **_binary_facts(compiled.asm["cubin"]))
    row["problems"] = _problems(row)
    return row


def _flag_combos(flags: dict):
    return [dict(zip(flags, values)) for values in itertools.product(*flags.values())]


def run_checks() -> list[dict]:
    """Compile every (kernel, N, dtype, flags) case for sm_90a, each distinct
    job once; one row per job. A row with ``problems`` fails the check."""
    if not _compiles_here():
        return _run_in_child()
    jobs, fns = {}, {}
    for kernel in KERNELS:
        fn = fns[kernel.name] = _kernel_function(kernel)
        for n, dtype in itertools.product(N_VALUES, DTYPES):
            for flags in _flag_combos(kernel.flags):
                job = _job(kernel, fn, kernel.args(Sizes(n, dtype), **flags))
                jobs.setdefault(job, []).append((dtype, n))
    return [_check(job, cases, fns[job.name]) for job, cases in jobs.items()]


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
    args = parser.parse_args(argv)
    if not _tool("cuobjdump"):
        print("compile_check: cuobjdump not found: registers and spills are n/a (SASS from nvdisasm if present)")
    start = time.perf_counter()
    rows = run_checks()
    print(format_table(rows))
    print(f"{len(rows)} compile jobs for sm_90a in {time.perf_counter() - start:.1f} s (triton {triton.__version__})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(*failures(rows), sep="\n")
    return 1 if failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
