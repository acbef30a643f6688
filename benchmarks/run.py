"""Time Mammoth's implementations against the nn.Linear it replaces.

    python -m benchmarks.run [--n N ...] [--bags B ...] [--dtype fp32 bf16] [--keep-slots both|true|false]
                             [--impl NAME ...] [--repeats R] [--quick] [--out-dir DIR]

For each dtype, keep_slots and bag size N, every implementation (one entry of
IMPLS, built by a small factory) gets: forward time (eval mode, no grad),
forward+backward time (train mode; backward of the output against a fixed
random gradient, i.e. the gradient of (out * grad).sum(); the features need no
gradient, as in MIL training, the parameters do), and the peak extra memory of
each, all with the ratio to nn.Linear(1024, 512) at the same dtype and N.

Sizes: the recommended layer, Din 1024, D 512, C 256, H 16, E 30, S 10, auto
rank 17, on B bags of N patches each (``--bags``, default one bag); nn.Linear
maps all B * N patches.

- Timing: on a GPU, ``triton.testing.do_bench`` (CUDA events, median of the
  runs that fill ``--rep-ms``, 100 ms by default); on CPU,
  the median of runs timed with time.perf_counter after two warm-up runs: at
  least ``--repeats`` (5) and, for cheap calls, as many as fill
  ``--min-time-s`` (1 s, at most 100 runs); a series of slow calls stops
  after 3 runs once it passes ``--budget-s`` (10 s).
- Memory: on a GPU, torch.cuda.max_memory_allocated minus the memory allocated
  before the call (features, parameters and the gradient tensor); on CPU, the
  peak of the running total of bytes that torch's CPU allocator hands out during
  the call, from torch.profiler's memory events (profile_memory=True), in a
  separate run. Gradients of the parameters are set to None before each call,
  so they count as extra memory for every implementation alike.
- bf16: torch.autocast(dtype=torch.bfloat16) with fp32 parameters (mixed
  precision as in training) and features stored in bf16, on CPU and GPU alike.

Writes ``<device>-<date>.json`` (machine, versions, every row) and a log-log
plot ``<device>-<date>.png`` into ``--out-dir`` (default benchmarks/results).
On a CUDA GPU it also times each kernel launcher (``benchmarks/launchers.py``)
and prints its time as a multiple of its roofline floor at the card's ceilings (H100 or H200)
(``benchmarks/roofline.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

SIZES = dict(input_dim=1024, dim=512, num_experts=30, num_slots=10, num_heads=16, slot_dim=256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_N = (1_000, 4_000, 16_000, 64_000, 100_000, 200_000)
CPU_N = (1_000, 4_000, 10_000)
QUICK_N_CPU = (128,)
QUICK_N_GPU = (1_000,)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
MIB = 2.0**20


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


@dataclass(frozen=True)
class Ctx:
    device: torch.device
    dtype: torch.dtype  # compute dtype: fp32, or bf16 under autocast (parameters stay fp32)
    keep_slots: bool
    bags: int = 1  # B, bags of N patches in one call
    quick: bool = False
    explicit: bool = False  # the implementation was named with --impl


@dataclass(frozen=True)
class Impl:
    """One implementation: ``factory(ctx)`` returns a module mapping feats (1, N, Din) to
    its output, or raises Skip. ``materializes``: holds N x H x P tensors, so its
    memory is estimated before a large N is tried."""

    name: str
    factory: Callable[[Ctx], nn.Module]
    description: str
    materializes: bool = False


# ----------------------------------------------------------------- factories
def _mammoth(ctx: Ctx, backend: str) -> nn.Module:
    from mammoth_fast import Mammoth

    return Mammoth(**SIZES, keep_slots=ctx.keep_slots, backend=backend, device=ctx.device)


def make_linear(ctx: Ctx) -> nn.Module:
    return nn.Linear(SIZES["input_dim"], SIZES["dim"], device=ctx.device)


def make_eager(ctx: Ctx) -> nn.Module:
    return _mammoth(ctx, "eager")


def make_upstream(ctx: Ctx) -> nn.Module:
    try:
        import mammoth
    except ImportError as exc:
        raise Skip(f"mammoth-moe is not installed ({exc}); pip install mammoth-moe==0.1.2") from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the auto rank
        layer = mammoth.Mammoth(SIZES["input_dim"], SIZES["dim"], num_experts=SIZES["num_experts"],
                                num_slots=SIZES["num_slots"], num_heads=SIZES["num_heads"],
                                slot_dim=SIZES["slot_dim"], keep_slots=ctx.keep_slots)
    return layer.to(ctx.device)


def make_compiled(ctx: Ctx) -> nn.Module:
    if ctx.quick and not ctx.explicit:
        raise Skip("not run under --quick (compiling takes minutes on a CPU); name it with --impl compile")
    import torch._dynamo

    torch._dynamo.reset()  # one compiled layer at a time: keep the recompile limit for this one
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    return torch.compile(_mammoth(ctx, "eager"))


def make_sdpa(ctx: Ctx) -> nn.Module:
    from mammoth_fast import layer

    if "sdpa" not in layer.BACKENDS:
        raise Skip(f"backend 'sdpa' not in mammoth_fast.layer.BACKENDS {layer.BACKENDS} yet")
    return _mammoth(ctx, "sdpa")


def make_triton(ctx: Ctx) -> nn.Module:
    if ctx.device.type != "cuda":
        raise Skip("needs a CUDA GPU")
    return _mammoth(ctx, "triton")


IMPLS: Dict[str, Impl] = {i.name: i for i in (
    Impl("linear", make_linear, "nn.Linear(1024, 512), the layer Mammoth replaces; every ratio is to it"),
    Impl("eager", make_eager, "mammoth_fast Mammoth(backend='eager'), the PyTorch reference", materializes=True),
    Impl("mammoth-moe", make_upstream, "the authors' mammoth.Mammoth (mammoth-moe 0.1.2)", materializes=True),
    Impl("compile", make_compiled, "torch.compile of mammoth_fast's eager layer (default options)", materializes=True),
    Impl("sdpa", make_sdpa, "mammoth_fast Mammoth(backend='sdpa')"),
    Impl("triton", make_triton, "mammoth_fast Mammoth(backend='triton'), the fused kernels"),
)}


# ------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict:
    info = {
        "device_type": device.type,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu=prop.name, gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                    gpu_sm_count=prop.multi_processor_count, cuda=torch.version.cuda)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*cmd: str) -> Optional[str]:
    import subprocess

    try:
        return subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 -- not a git checkout
        return None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    out["git_commit"] = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    out["git_modified_files"] = status.splitlines() if status else ([] if status is not None else None)
    for mod, key in (("triton", "triton"), ("mammoth_fast", "mammoth_fast"), ("matplotlib", "matplotlib")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 -- a missing optional package is just not listed
            out[key] = None
    try:
        from importlib.metadata import version

        out["mammoth-moe"] = version("mammoth-moe")
    except Exception:  # noqa: BLE001
        out["mammoth-moe"] = None
    return out


def device_slug(info: dict) -> str:
    if info["device_type"] == "cuda":
        found = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]*)\b", info["gpu"])
        return (found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")).lower()
    return f"cpu-{info['cpu_cores']}core"


def _mem_available() -> Optional[float]:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------- measuring
def _cpu_busy_s() -> Optional[float]:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """The average number of cores kept busy by everything but this process
    (other processes, and time stolen by the hypervisor) while the block runs:
    a measurement on a quiet machine reads about 0."""

    def __enter__(self):
        self.busy0, self.own0, self.t0 = _cpu_busy_s(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy1, own1 = _cpu_busy_s(), sum(os.times()[:2])
        wall = time.perf_counter() - self.t0
        self.cores = (None if self.busy0 is None or busy1 is None or wall <= 0 else
                      max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / wall))
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running total of bytes torch's CPU allocator handed out during
    ``fn()`` (allocations minus frees, in time order), from torch.profiler's
    memory events; frees of memory allocated before the call count as well."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


NOISY_CORES = 0.1  # a CPU row measured while other processes kept more cores busy is measured again


def wait_for_quiet(max_wait_s: float = 120.0, window_s: float = 2.0) -> float:
    """Wait (at most max_wait_s) until other processes keep < NOISY_CORES cores
    busy over a window; returns that load (cores)."""
    t0 = time.perf_counter()
    while True:
        with OtherLoad() as load:
            time.sleep(window_s)
        if load.cores is None or load.cores < NOISY_CORES or time.perf_counter() - t0 > max_wait_s:
            return load.cores or 0.0


def peak_extra_bytes(fn: Callable[[], object], reset: Callable[[], None], device: torch.device) -> int:
    reset()
    if device.type == "cuda":
        gc.collect()  # cycles holding device memory would sit in the baseline
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def time_ms(fn: Callable[[], object], reset: Callable[[], None], device: torch.device, repeats: int,
            budget_s: float, params: Sequence[torch.Tensor], min_total_s: float = 1.0,
            max_runs: int = 100, rep_ms: float = 100.0) -> tuple:
    """(median ms, runs). The caller has run ``fn`` once already (warm-up). On
    CPU: at least ``repeats`` runs and, for cheap calls, as many more as fill
    ``min_total_s`` (at most ``max_runs``); a series of slow calls stops after
    3 runs once it passes ``budget_s``."""
    if device.type == "cuda":
        import triton.testing

        reset()
        ms = triton.testing.do_bench(fn, warmup=max(1, int(rep_ms // 4)), rep=int(rep_ms),
                                     grad_to_none=list(params) or None, return_mode="median")
        return float(ms), None
    reset()
    fn()  # a second warm-up run: the first runs of a process are slower (allocator, thread pool)
    times: List[float] = []
    while len(times) < max_runs:
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total = sum(times)
        if len(times) >= repeats and total >= min_total_s:
            break  # enough runs, and enough time for cheap calls to settle
        if len(times) >= min(3, repeats) and total > budget_s:
            break  # slow calls: at least 3 runs
    time_ms.last = (1e3 * min(times), 1e3 * max(times))
    return 1e3 * statistics.median(times), len(times)


def measure(model: nn.Module, ctx: Ctx, n: int, args) -> dict:
    """Forward and forward+backward time and peak extra memory of ``model`` on ctx.bags bags of n patches."""
    device = ctx.device
    torch.manual_seed(0)
    x = torch.randn(ctx.bags, n, SIZES["input_dim"], device=device, dtype=ctx.dtype)  # requires_grad=False
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if ctx.dtype == torch.bfloat16
                else contextlib.nullcontext())

    def reset():
        for p in params:
            p.grad = None

    def fwd():
        with torch.no_grad(), autocast:
            return model(x)

    grad = None

    def train():
        with autocast:
            out = model(x)
        out.backward(grad)  # = d/dparams of (out * grad).sum()

    row: dict = {}
    # warm-up (and compile) outside the timings
    model.eval()
    t0 = time.perf_counter()
    out = fwd()
    _sync(device)
    first_fwd = time.perf_counter() - t0
    grad = torch.randn(out.shape, device=device, dtype=out.dtype)
    row["out_shape"] = list(out.shape)
    row["out_dtype"] = str(out.dtype).replace("torch.", "")
    del out
    model.train()
    reset()
    t0 = time.perf_counter()
    train()
    _sync(device)
    first_train = time.perf_counter() - t0

    with OtherLoad() as load:  # after the warm-up: torch.compile's worker processes would count
        model.eval()
        row["fwd_ms"], row["fwd_runs"] = time_ms(fwd, reset, device, args.repeats, args.budget_s, params,
                                                 args.min_time_s, rep_ms=args.rep_ms)
        row["fwd_ms_min_max"] = getattr(time_ms, "last", None) if device.type != "cuda" else None
        row["fwd_peak_mib"] = peak_extra_bytes(fwd, reset, device) / MIB
        model.train()
        row["fwdbwd_ms"], row["fwdbwd_runs"] = time_ms(train, reset, device, args.repeats, args.budget_s,
                                                       params, args.min_time_s, rep_ms=args.rep_ms)
        row["fwdbwd_ms_min_max"] = getattr(time_ms, "last", None) if device.type != "cuda" else None
        row["fwdbwd_peak_mib"] = peak_extra_bytes(train, reset, device) / MIB
    row["other_load_cores"] = load.cores
    reset()
    row["first_call_s"] = {"fwd": first_fwd, "fwdbwd": first_train}
    if hasattr(model, "_orig_mod"):  # torch.compile: compile time ~ first calls minus steady-state runs
        row["compile_s"] = max(0.0, first_fwd - row["fwd_ms"] / 1e3) + max(0.0, first_train - row["fwdbwd_ms"] / 1e3)
    return row


def predicted_skip(impl: Impl, ctx: Ctx, n: int, done: List[dict], args) -> Optional[str]:
    """A reason not to try ``impl`` at ``n``: its time or memory, extrapolated
    linearly in N from its largest measured bag (or, for an implementation that
    holds N x H x P tensors, estimated at 12 of them in fp32), exceeds the budget."""
    if args.no_skip:
        return None
    prev = [r for r in done if r["status"] == "ok" and r["n"] * r["bags"] < n * ctx.bags]
    est_mem = est_time = None
    if prev:
        last = max(prev, key=lambda r: r["n"] * r["bags"])
        scale = n * ctx.bags / (last["n"] * last["bags"])
        est_mem = max(last["fwd_peak_mib"], last["fwdbwd_peak_mib"]) * MIB * scale
        est_time = last["fwdbwd_ms"] / 1e3 * scale
    elif impl.materializes:
        est_mem = 12 * ctx.bags * n * SIZES["num_heads"] * SIZES["num_experts"] * SIZES["num_slots"] * 4
    if ctx.device.type == "cuda":  # what the caching allocator could still hand out
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        budget = 0.9 * (total - torch.cuda.memory_allocated(ctx.device))
    else:
        avail = _mem_available()
        budget = 0.5 * avail if avail else math.inf
    if est_mem is not None and est_mem > budget:
        return f"skipped at {_size(n, ctx.bags)}: estimated peak {est_mem / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
    if est_time is not None and est_time > args.max_call_s:
        return (f"skipped at {_size(n, ctx.bags)}: estimated {est_time:.0f} s per forward+backward > --max-call-s "
                f"{args.max_call_s:g}")
    return None


# ---------------------------------------------------------------- the sweep
def _size(n: int, bags: int) -> str:
    return f"N={n:,}" if bags == 1 else f"B={bags}, N={n:,}"


def out_of_time(args) -> bool:
    """Whether ``args.deadline`` (a time.monotonic() value, or None) has passed."""
    return args.deadline is not None and time.monotonic() > args.deadline


def run_sweep(args, device: torch.device) -> List[dict]:
    rows: List[dict] = []
    grid = [(b, n) for b in args.bags for n in args.n]
    for dname in args.dtype:
        dtype = DTYPES[dname]
        linear_rows: Dict[tuple, dict] = {}
        for keep_slots in args.keep_slots:
            for name in args.impl:
                impl = IMPLS[name]
                base = dict(impl=name, dtype=dname, keep_slots=keep_slots)
                if name == "linear" and linear_rows:  # independent of keep_slots: measured once per dtype
                    rows.extend({**linear_rows[bn], **base} for bn in grid)
                    continue
                for bags in args.bags:
                    ctx = Ctx(device, dtype, keep_slots, bags=bags, quick=args.quick,
                              explicit=name in args.explicit_impl)
                    rows.extend(_sweep_impl(impl, ctx, base, args, device, linear_rows))
    add_ratios(rows)
    return rows


def _sweep_impl(impl: Impl, ctx: Ctx, base: dict, args, device: torch.device, linear_rows: dict) -> List[dict]:
    """One implementation at one dtype, keep_slots and B, over the bag sizes."""
    name, bags, dname, keep_slots = impl.name, ctx.bags, base["dtype"], ctx.keep_slots
    base = dict(base, bags=bags)
    try:
        model = impl.factory(ctx)
    except Skip as exc:
        _log(f"{dname} keep_slots={keep_slots} {name}: {exc}")
        return [dict(base, n=n, status="skipped", note=str(exc)) for n in args.n]
    rows: List[dict] = []
    done: List[dict] = []
    failed = None
    for n in args.n:
        row = dict(base, n=n)
        reason = failed or ("out of time (the run's deadline passed)" if out_of_time(args) else None) \
            or predicted_skip(impl, ctx, n, done, args)
        if reason:
            row.update(status="skipped", note=reason)
        else:
            _log(f"{dname} keep_slots={keep_slots} {name} {_size(n, bags)} ...")
            try:
                row.update(status="ok", **measure(model, ctx, n, args))
                for attempt in range(args.retries if device.type == "cpu" else 0):
                    if (row["other_load_cores"] or 0.0) <= NOISY_CORES:
                        break
                    _log(f"  other processes kept {row['other_load_cores']:.2f} cores busy: "
                         f"waiting for a quiet machine, then measuring again")
                    wait_for_quiet()
                    again = measure(model, ctx, n, args)
                    again["remeasured"] = attempt + 1
                    if again["other_load_cores"] < row["other_load_cores"]:
                        row.update(again)
            except Exception as exc:  # noqa: BLE001 -- recorded in the row, and the sweep goes on
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                oom = isinstance(exc, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False
                if name == "compile" and not done:
                    failed = f"torch.compile failed: {msg[:300]}"
                    row.update(status="skipped", note=failed)
                else:
                    row.update(status="error", note=("out of memory: " if oom else "") + msg[:300])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        done.append(row)
        rows.append(row)
        if name == "linear":
            linear_rows[(bags, n)] = {k: v for k, v in row.items() if k not in ("impl", "dtype", "keep_slots")}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


RATIO_FIELDS = ("fwd_ms", "fwdbwd_ms", "fwd_peak_mib", "fwdbwd_peak_mib")


def add_ratios(rows: List[dict]) -> None:
    """<field>_x = value / nn.Linear's value at the same dtype and N."""
    lin = {(r["dtype"], r["n"], r["bags"]): r for r in rows if r["impl"] == "linear" and r["status"] == "ok"}
    for r in rows:
        ref = lin.get((r["dtype"], r["n"], r["bags"]))
        for f in RATIO_FIELDS:
            if r.get("status") == "ok" and ref is not None and ref[f] > 0:
                r[f + "_x"] = r[f] / ref[f]
            elif r.get("status") == "ok":
                r[f + "_x"] = None


# --------------------------------------------------------------- reporting
def _cell(r: dict, f: str, fmt: str) -> str:
    x = r.get(f + "_x")
    return f"{format(r[f], fmt)} ({x:.1f}x)" if x is not None else format(r[f], fmt)


def _noisy_mark(r: dict) -> str:
    return " *" if (r.get("other_load_cores") or 0.0) > NOISY_CORES else ""


NOISY_NOTE = (f"* measured while other processes kept more than {NOISY_CORES} cores busy (other_load_cores "
              "in the JSON): the times may be inflated")


def format_table(rows: List[dict], args) -> str:
    out = []
    for dname in args.dtype:
        for ks in args.keep_slots:
            block = [r for r in rows if r["dtype"] == dname and r["keep_slots"] == ks]
            if not block:
                continue
            mode = "fp32" if dname == "fp32" else "bf16 (autocast, fp32 parameters, bf16 features)"
            out.append(f"\n{mode}, keep_slots={ks}: time ms and peak extra memory MiB (x nn.Linear)\n")
            out.append("| B | N | impl | forward ms | fwd+bwd ms | forward MiB | fwd+bwd MiB |")
            out.append("|--:|--:|---|--:|--:|--:|--:|")
            not_run = {}
            for name in args.impl:
                rs = [r for r in block if r["impl"] == name]
                if rs and all(r["status"] != "ok" for r in rs) and len({r["note"] for r in rs}) == 1:
                    not_run[name] = rs[0]["note"]
            for bags, n in ((b, n) for b in args.bags for n in args.n):
                for r in block:
                    if r["n"] != n or r["bags"] != bags or r["impl"] in not_run:
                        continue
                    if r["status"] == "ok":
                        out.append(f"| {bags} | {n:,} | {r['impl']}{_noisy_mark(r)} | {_cell(r, 'fwd_ms', '.1f')} "
                                   f"| {_cell(r, 'fwdbwd_ms', '.1f')} | {_cell(r, 'fwd_peak_mib', '.1f')} "
                                   f"| {_cell(r, 'fwdbwd_peak_mib', '.1f')} |")
                    else:
                        out.append(f"| {bags} | {n:,} | {r['impl']} | {r['status']}: {r['note']} | | | |")
            if not_run:
                out.append("")
                out.extend(f"- {name}: {note}" for name, note in not_run.items())
    if any(_noisy_mark(r) for r in rows):
        out.append(f"\n{NOISY_NOTE}")
    return "\n".join(out)


def summary_table(rows: List[dict], n: int, bags: int = 1) -> str:
    """Forward+backward time and peak extra memory at one B and N, one column per dtype and keep_slots."""
    rows = [r for r in rows if r["n"] == n and r["bags"] == bags]
    configs = [(d, ks) for d in DTYPES for ks in (True, False)
               if any(r["dtype"] == d and r["keep_slots"] == ks for r in rows)]
    by = {(r["impl"], r["dtype"], r["keep_slots"]): r for r in rows}
    where = f"N = {n:,}" if bags == 1 else f"B = {bags}, N = {n:,}"
    lines = [f"| {where}: fwd+bwd ms, peak MiB | " + " | ".join(f"{d}, keep_slots={ks}" for d, ks in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for name in IMPLS:
        cells = []
        for d, ks in configs:
            r = by.get((name, d, ks))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["note"] if len(r["note"]) <= 24 else r["status"])
            else:
                cells.append(", ".join(
                    f"{r[f]:.1f} {unit}" + (f" ({r[f + '_x']:.1f}x)" if name != "linear" and r.get(f + "_x") else "")
                    for f, unit in (("fwdbwd_ms", "ms"), ("fwdbwd_peak_mib", "MiB"))) + _noisy_mark(r))
        if any(c for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(_noisy_mark(r) for r in by.values()):
        lines.append(f"\n{NOISY_NOTE}")
    return "\n".join(lines)


def plot(rows: List[dict], args, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [(d, ks) for d in args.dtype for ks in args.keep_slots]
    metrics = [("fwd_ms", "forward, ms"), ("fwdbwd_ms", "forward+backward, ms"),
               ("fwdbwd_peak_mib", "fwd+bwd peak extra memory, MiB")]
    fig, axes = plt.subplots(len(configs), len(metrics), figsize=(4.6 * len(metrics), 3.4 * len(configs)),
                             squeeze=False)
    for i, (dname, ks) in enumerate(configs):
        for j, (field, label) in enumerate(metrics):
            ax = axes[i][j]
            for idx, name in enumerate(IMPLS):
                if name not in args.impl:
                    continue
                for bags, style in zip(args.bags, ("-", "--", ":", "-.")):
                    pts = sorted((r["n"], r[field]) for r in rows if r["impl"] == name and r["dtype"] == dname
                                 and r["keep_slots"] == ks and r["bags"] == bags and r["status"] == "ok"
                                 and r[field] > 0)
                    if pts:
                        label = name if len(args.bags) == 1 else f"{name}, B={bags}"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label,
                                color=f"C{idx}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (patches per bag)")
            ax.set_title(f"{dname}, keep_slots={ks}: {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def kernel_timings(args, device: torch.device) -> List[dict]:
    """Each launcher at each dtype and N, with do_bench, against its roofline floor,
    in both kernel plans side by side (``plan`` "default" and "legacy",
    ``mammoth_fast.kernels._launch.legacy_kernels``)."""
    import triton.testing

    from .launchers import build_cases
    from .roofline import launcher_floor, machine_for, mammoth_kernels

    prop = torch.cuda.get_device_properties(device)
    machine = machine_for(prop.name, prop.multi_processor_count)
    out = []
    for dname in args.dtype:
        for n in args.n:
            for legacy in (False, True):
                plan = "legacy" if legacy else "default"
                if out_of_time(args):
                    out.append(dict(dtype=dname, n=n, plan=plan, launcher="(all)", status="skipped",
                                    note="out of time (the run's deadline passed)"))
                    continue
                try:
                    cases = build_cases(n, DTYPES[dname], device, legacy=legacy)
                except Exception as exc:  # noqa: BLE001
                    out.append(dict(dtype=dname, n=n, plan=plan, launcher="(all)", status="error",
                                    note=f"{type(exc).__name__}: {exc}"))
                    continue
                kernels = mammoth_kernels(n, DTYPES[dname], False, m=machine, legacy=legacy)
                for c in cases.values():
                    floor = launcher_floor(kernels, c.kernels, machine)
                    try:
                        c.fn()
                        us = 1e3 * triton.testing.do_bench(c.fn, warmup=max(1, int(args.rep_ms // 4)),
                                                           rep=int(args.rep_ms), return_mode="median")
                        out.append(dict(dtype=dname, n=n, plan=plan, launcher=c.name, kernels=list(c.kernels),
                                        status="ok", time_us=us, floor_us=floor * 1e6,
                                        time_over_floor=us / (floor * 1e6), machine=machine.name,
                                        **({"note": c.note} if c.note else {})))
                    except Exception as exc:  # noqa: BLE001
                        out.append(dict(dtype=dname, n=n, plan=plan, launcher=c.name, status="error",
                                        floor_us=floor * 1e6, note=f"{type(exc).__name__}: {exc}"))
                del cases
                torch.cuda.empty_cache()
    return out


def format_kernels(krows: List[dict]) -> str:
    machines = sorted({r["machine"] for r in krows if "machine" in r}) or ["H100"]
    lines = [f"\nkernel launchers: time (do_bench median) against the roofline floor of {', '.join(machines)} "
             "(benchmarks/roofline.py)\n",
             "| dtype | N | plan | launcher | time µs | floor µs | time / floor |", "|---|--:|---|---|--:|--:|--:|"]
    for r in krows:
        plan = r.get("plan", "default")
        if r["status"] == "ok":
            launcher = r["launcher"] + (f" ({r['note']})" if r.get("note") else "")
            lines.append(f"| {r['dtype']} | {r['n']:,} | {plan} | {launcher} | {r['time_us']:.1f} "
                         f"| {r['floor_us']:.1f} | {r['time_over_floor']:.2f}x |")
        else:
            lines.append(f"| {r['dtype']} | {r['n']:,} | {plan} | {r['launcher']} | {r['status']}: {r['note']} | | |")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[benchmarks.run] {msg}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def parse_args(argv: Optional[Sequence[str]], device: torch.device):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=_positive, nargs="+",
                        help=f"bag sizes (default: {', '.join(map(str, GPU_N))} on a GPU, "
                             f"{', '.join(map(str, CPU_N))} on CPU)")
    parser.add_argument("--bags", type=_positive, nargs="+", default=[1],
                        help="B, the number of bags of N patches in one call (default: 1)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--keep-slots", choices=["both", "true", "false"], default="both")
    parser.add_argument("--impl", nargs="+", choices=list(IMPLS), help="implementations (default: all)")
    parser.add_argument("--repeats", type=int, help="timed runs on CPU (default 5; 1 with --quick)")
    parser.add_argument("--min-time-s", type=float, default=None,
                        help="CPU: time cheap calls for at least this long, up to 100 runs (default 1; 0 with --quick)")
    parser.add_argument("--budget-s", type=float, default=10.0,
                        help="CPU: stop a timing series (after 3 runs) once it has taken this long")
    parser.add_argument("--max-call-s", type=float, default=None,
                        help="skip an N where one forward+backward is estimated to take longer "
                             "(default 30 on CPU, 10 on a GPU)")
    parser.add_argument("--no-skip", action="store_true", help="try every N, whatever the estimates")
    parser.add_argument("--rep-ms", type=float, default=100.0,
                        help="GPU: do_bench's timing window per measurement, ms (warm-up a quarter of it)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop measuring after this many seconds: the rows left are reported as skipped")
    parser.add_argument("--retries", type=int, default=None,
                        help="CPU: measure a row again (after waiting for a quiet machine) while other processes "
                             f"kept more than {NOISY_CORES} cores busy, at most this often (default 4; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sweep (N = 128 on CPU, 1000 on a GPU), 1 timed run, no torch.compile (the tests)")
    parser.add_argument("--no-kernels", action="store_true", help="GPU: do not time the kernel launchers")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--date", default=None, help="date in the file names (default: today)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    args.explicit_impl = set(args.impl or ())
    args.impl = args.impl or list(IMPLS)
    if "linear" not in args.impl:
        args.impl = ["linear"] + args.impl  # every ratio is to it
    args.keep_slots = {"both": [True, False], "true": [True], "false": [False]}[args.keep_slots]
    gpu = device.type == "cuda"
    if args.n is None:
        args.n = list((QUICK_N_GPU if gpu else QUICK_N_CPU) if args.quick else (GPU_N if gpu else CPU_N))
    args.n = sorted(set(args.n))
    args.bags = sorted(set(args.bags))
    args.deadline = None if args.time_limit_s is None else time.monotonic() + args.time_limit_s
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.retries is None:
        args.retries = 0 if args.quick else 4
    if args.min_time_s is None:
        args.min_time_s = 0.0 if args.quick else 1.0
    if args.max_call_s is None:
        args.max_call_s = 10.0 if gpu else 30.0
    args.date = args.date or datetime.date.today().isoformat()
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--device", default=None)
    known, _ = pre.parse_known_args(argv)
    device = torch.device(known.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = parse_args(argv, device)
    info = machine_info(device)
    vers = versions()
    where = (f"{info['gpu']}" if device.type == "cuda" else
             f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads")
    print(f"Mammoth vs nn.Linear(1024, 512) on {where}; torch {vers['torch']}, triton {vers['triton']}, "
          f"python {vers['python']}; {args.date}")
    print(f"N = {', '.join(f'{n:,}' for n in args.n)}; dtypes {', '.join(args.dtype)}; keep_slots "
          f"{', '.join(map(str, args.keep_slots))}; implementations {', '.join(args.impl)}")
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rows = run_sweep(args, device)
    krows = kernel_timings(args, device) if device.type == "cuda" and not args.no_kernels else []
    elapsed = time.perf_counter() - t0

    print(format_table(rows, args))
    print(f"\nSummary (x nn.Linear):\n\n{summary_table(rows, max(args.n), min(args.bags))}")
    loads = [r["other_load_cores"] for r in rows if r.get("other_load_cores") is not None]
    other_load = max(loads) if loads else None
    if other_load is not None:
        print(f"\nCPU load from other processes during the measurements: at most {other_load:.2f} cores "
              f"(average per row; {'quiet' if other_load <= NOISY_CORES else 'NOT quiet: see the rows marked *'})")
    if krows:
        print(format_kernels(krows))
    elif device.type != "cuda":
        print("\n(kernel launcher timings and their roofline fractions need a CUDA GPU)")

    result = {
        "date": args.date,
        "machine": info,
        "versions": vers,
        "settings": {
            "sizes": {**SIZES, "lora_rank": "auto (17)"},
            "n": args.n, "bags": args.bags, "dtypes": args.dtype, "keep_slots": args.keep_slots, "impls": args.impl,
            "impl_descriptions": {k: IMPLS[k].description for k in args.impl},
            "repeats": args.repeats, "quick": args.quick,
            "bf16": "torch.autocast(dtype=bfloat16), fp32 parameters, features stored in bf16",
            "forward": "eval mode, torch.no_grad()",
            "forward_backward": "train mode (dropout 0.1 on the expert outputs), out.backward(grad) with a fixed "
                                "random grad; features requires_grad=False, parameters require grad",
            "timing": ("triton.testing.do_bench, CUDA events, median" if device.type == "cuda" else
                       f"median of at least {args.repeats} runs (time.perf_counter) after two warm-up runs, "
                       f"more for cheap calls until {args.min_time_s:g} s of runs (at most 100); a series of "
                       f"slow calls stops after 3 runs once it passes {args.budget_s:g} s"),
            "memory": ("torch.cuda.max_memory_allocated minus memory_allocated before the call"
                       if device.type == "cuda" else
                       "peak of the running total of torch CPU-allocator bytes during the call "
                       "(torch.profiler memory events, profile_memory=True), separate run"),
            "other_load_cores": "per row: cores kept busy by other processes during the timed and memory runs "
                                "(/proc/stat busy time minus this process's CPU time, over wall time)",
            "compile": "torch.compile(layer) with default options; compile time is left out of the timings "
                       "(compile_s: the first calls minus the steady-state times; short when torch's on-disk "
                       "compile caches are warm from an earlier run); from the second bag size on torch "
                       "recompiles with a dynamic N (automatic dynamic shapes)",
        },
        "elapsed_s": elapsed,
        "loadavg_at_start": load_start,
        "other_load_max_cores": other_load,
        "rows": rows,
        "kernel_rows": krows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{device_slug(info)}-{args.date}"
    json_path = args.out_dir / f"{stem}.json"
    png_path = args.out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(rows, args, png_path, f"Mammoth vs nn.Linear(1024, 512): {where}, {args.date}")
    result["json_path"], result["png_path"] = str(json_path), str(png_path)
    print(f"\nwrote {json_path} and {png_path} ({elapsed:.0f} s)")
    return result


if __name__ == "__main__":
    main()
