"""One-command acceptance run of mammoth_fast on a CUDA GPU.

    python -m benchmarks.gpu_check [--dry-run] [--out-dir DIR] [--budget-s 450] [--only NAME ...] [--skip NAME ...]

Made for a short slot on a borrowed H100 or H200 (torch and triton
preinstalled, no package index): run from the repository root, it sets itself
up, then measures, one section after another, each within its share of
``--budget-s`` (default 450 s, so that the whole run ends inside 8 minutes):

  setup      installs the wheels found in ``.whl/`` (no index, no dependencies)
             into a temporary folder, and the project itself (editable, offline)
             when ``mammoth_fast.kernels`` does not import
  machine    the card, driver, versions, and its measured ceilings: copy
             bandwidth and bf16 matmul rate
  tests      the CUDA-relevant part of the test suite (TEST_FILES), natively on
             the GPU, in parallel with pytest-xdist where it is installed
  accuracy   the triton backend against the float64 reference at the
             recommended sizes, forward and every gradient: bf16 by the
             FlashAttention rule (at most 2x the eager layer's own bf16 error,
             and <= 2e-2), fp32 with IEEE dots (<= 1e-5 outputs, 1e-4
             gradients) and with TF32 (<= 2e-3)
  compile    a training step of a small MIL model with the layer, under
             torch.compile with default Inductor, through the triton_op path:
             graph breaks, agreement with eager, compile and step times
  bench      ``benchmarks.run`` against nn.Linear, eager, mammoth-moe, sdpa and
             triton, N = 1k .. 200k, B = 1 and 2, fp32 and bf16, keep_slots
             both ways (its own JSON and plot)
  kernels    every kernel launcher against its roofline floor at the card's
             ceilings (benchmarks/roofline.py)
  memory     peak memory and time of a training step at N = 1,000,000
  multi_gpu  with more than one GPU: a layer on the last GPU while GPU 0 is
             current gives what it gives on GPU 0 (the launch device guard)

A section that runs out of its time stops (its unfinished parts are reported
as skipped); one that fails is reported, and the run goes on. The results are
written after every section, so a run cut short keeps what it measured:

  <card>-<date>-gpu-check.json   everything, per section
  <card>-<date>-gpu-check.md     the summary tables
  <card>-<date>-tests.log        pytest's output
  <card>-<date>-test-failures.log  each failure with its traceback, written as it happens
  <card>-<date>.json, .png       the benchmark rows and plot (benchmarks.run)

Wheels: the only package this run needs that the lender's image lacks is
mammoth-moe 0.1.2 (pure Python, 12.5 KB; the authors' layer, a benchmark
column). ``python -m benchmarks.gpu_check --fetch-wheels`` downloads it into
``.whl/`` (ignored by git) on a machine with a package index; bring that folder
along with the source tree (the device tool: ``carry: [".whl"]``). Without it,
the mammoth-moe column is skipped, with a note. Nothing else is installed.

``--dry-run`` (any machine, CPU included) imports everything, prints the plan,
the estimated time and the result paths, and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
WHEELS = ("mammoth-moe==0.1.2",)
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 450.0

TEST_FILES = (
    "tests/test_triton_forward.py", "tests/test_triton_backward.py", "tests/test_query_backward.py",
    "tests/test_experts_backward.py", "tests/test_packed.py", "tests/test_compile.py", "tests/test_layer.py",
    "tests/test_sdpa_backend.py", "tests/test_benchmarks.py::test_launcher_cases_run_and_map_to_roofline_kernels",
)
"""The tests that run kernels or CUDA-only code on the GPU (the rest of the suite is device-independent)."""

BENCH_N = (1_000, 4_000, 16_000, 64_000, 200_000)
BENCH_BAGS = (1, 2)
BENCH_IMPLS = ("linear", "eager", "mammoth-moe", "sdpa", "triton")
KERNEL_N = (16_000, 100_000)
MEMORY_N = 1_000_000
ACCURACY_N = 4_096
COMPILE_N = 8_000


@dataclass
class Section:
    name: str
    share_s: float  # its time at the default budget, scaled with --budget-s
    what: str
    run: Callable[["Check"], dict]


class Check:
    """The run's state: deadline, output paths, the results so far."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.end = self.t0 + args.budget_s
        self.results: dict = {"sections": {}}
        self.device = None
        self.slug = "gpu"
        self.date = args.date

        self.section_end = self.end

    def left(self) -> float:
        """Seconds left of the whole run."""
        return self.end - time.monotonic()

    def section_left(self) -> float:
        """Seconds left of the running section's share."""
        return min(self.section_end, self.end) - time.monotonic()

    def path(self, suffix: str) -> Path:
        return self.args.out_dir / f"{self.slug}-{self.date}{suffix}"

    def write(self) -> None:
        self.args.out_dir.mkdir(parents=True, exist_ok=True)
        self.results["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.path("-gpu-check.json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        self.path("-gpu-check.md").write_text(markdown(self.results) + "\n")


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------- setup
def fetch_wheels() -> int:
    """Downloads WHEELS into .whl/ (needs a package index)."""
    WHEEL_DIR.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(WHEEL_DIR), *WHEELS]
    print("+", " ".join(cmd))
    return subprocess.call(cmd)


def setup() -> dict:
    """Makes mammoth_fast and the carried wheels importable, offline; nothing else is
    installed. After installing the project it starts this command again (the
    editable install's import hook is read at interpreter start)."""
    done: dict = {"wheels": [], "project": "already importable"}
    if os.environ.get("GPU_CHECK_SETUP"):
        return json.loads(os.environ["GPU_CHECK_SETUP"])
    wheels = sorted(WHEEL_DIR.glob("*.whl"))
    if wheels:
        target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(target), *map(str, wheels)], check=True)
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
        done["wheels"] = [w.name for w in wheels]
    if not _imports("mammoth_fast.kernels"):
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
               "--use-pep517", "-e", str(ROOT)]
        if subprocess.run(pip).returncode == 0:
            done["project"] = "installed: " + " ".join(pip[1:-1]) + " ."
        else:  # no editable install here: a folder where mammoth_fast and its kernels sit as the install lays them
            shim = Path(tempfile.mkdtemp(prefix="gpu_check_src_"))
            (shim / "mammoth_fast").mkdir()
            for entry in (ROOT / "mammoth_fast").iterdir():
                (shim / "mammoth_fast" / entry.name).symlink_to(entry)
            (shim / "mammoth_fast" / "kernels").symlink_to(ROOT / "kernels")
            (shim / "benchmarks").symlink_to(ROOT / "benchmarks")
            os.chdir(shim)  # first on sys.path for python -m, here and in the test run
            done["project"] = f"not installable here: run from {shim}, mammoth_fast/kernels linked to kernels/"
        os.environ["GPU_CHECK_SETUP"] = json.dumps(done)
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_check", *sys.argv[1:]])
    return done


def _imports(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


# ----------------------------------------------------------------- sections
def machine(chk: Check) -> dict:
    import torch
    import triton

    from benchmarks.run import device_slug, machine_info, versions

    info = machine_info(chk.device)
    out = dict(machine=info, versions={**versions(), "source_sha256": source_hash()},
               device_count=torch.cuda.device_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
        res = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = res.stdout.strip()
    # the card's ceilings, measured: copy bandwidth (bytes read + written) and bf16 matmul rate
    x = torch.empty(2**30, dtype=torch.float32, device=chk.device)  # 4 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=20, rep=100, return_mode="median")
    out["copy_tb_per_s"] = 2 * x.numel() * 4 / (ms * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, device=chk.device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=20, rep=100, return_mode="median")
    out["bf16_matmul_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    chk.slug = device_slug(info)
    out["status"] = "ok"
    return out


def source_hash() -> str:
    """sha256 of the Python sources that run (kernels/, mammoth_fast/, benchmarks/, tests/), paths and
    contents: names the tree measured even where the checkout's git metadata is not the tree's
    (``python -c "from benchmarks.gpu_check import source_hash; print(source_hash())"`` at a commit)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for d in ("kernels", "mammoth_fast", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tests(chk: Check) -> dict:
    log_path = chk.path("-tests.log")
    timeout = max(30, int(chk.section_left() - 10))
    fail_path = chk.path("-test-failures.log")
    fail_path.write_text("")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "benchmarks._pytest_live"]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(min(12, max(2, (os.cpu_count() or 4) - 2)))]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", str(min(240, timeout))]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPU_CHECK_FAILURES"] = str(fail_path)
    log(" ".join(cmd[1:]))
    start = time.monotonic()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.run([*cmd, *(str(ROOT / t) for t in chk.args.tests)], env=env, stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log_path.read_text(errors="replace")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed)", text.splitlines()[-1]
                                                if text.strip() else "")}
    failed = re.findall(r"^FAILED (\S+)", fail_path.read_text(errors="replace"), flags=re.M)
    status = "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed")
    return dict(status=status, returncode=rc, counts=counts, failed=failed, command=" ".join([*cmd[1:], *chk.args.tests]),
                seconds=round(time.monotonic() - start, 1), log=log_path.name, failures=fail_path.name)


def _randomized(layer):
    """Norm weights and the query bias away from their defaults, so that every parameter matters."""
    import torch

    with torch.no_grad():
        for name, prm in layer.named_parameters():
            if name.endswith("gamma"):
                prm.uniform_(0.5, 1.5)
            elif name == "wq.bias":
                prm.normal_(0.0, 0.1)
    return layer


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextlib.contextmanager
def _tf32(on: bool):
    """TF32 for fp32 matmuls (and so for the kernels' fp32 dots) on or off, restored after."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if on else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = on
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def accuracy(chk: Check) -> dict:
    """Forward and every gradient of the triton and eager backends against float64 (SPEC section 10)."""
    import torch

    from benchmarks.run import SIZES
    from mammoth_fast import Mammoth

    dev = chk.device
    rows = []
    for keep_slots in (True, False):
        torch.manual_seed(0)
        ref = _randomized(Mammoth(**SIZES, keep_slots=keep_slots, backend="eager")).to(dev, torch.float64).eval()
        x = torch.randn(2, ACCURACY_N, SIZES["input_dim"], device=dev, dtype=torch.float64)
        mask = torch.ones(2, ACCURACY_N, dtype=torch.bool, device=dev)
        mask[1, ACCURACY_N * 3 // 4:] = False  # the second bag is shorter: padded
        out_ref = ref(x, mask=mask)
        g = torch.randn_like(out_ref)
        if not keep_slots:
            g = g * mask[..., None]
        names = [n for n, _ in ref.named_parameters()]
        grads_ref = torch.autograd.grad(out_ref, list(ref.parameters()), g)
        for mode in ("bf16", "fp32-ieee", "fp32-tf32"):
            errs = {}
            for backend in ("eager", "triton"):
                layer = Mammoth(**SIZES, keep_slots=keep_slots, backend=backend).to(dev).eval()
                layer.load_state_dict(ref.state_dict())
                xi = x.to(torch.bfloat16 if mode == "bf16" else torch.float32)
                cast = torch.autocast(dev.type, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
                with _tf32(mode == "fp32-tf32"), cast:
                    out = layer(xi, mask=mask)
                    grads = torch.autograd.grad(out, list(layer.parameters()), g.to(out.dtype))
                errs[backend] = {"out": _rel(out, out_ref), **{n: _rel(a, b) for n, a, b in zip(names, grads, grads_ref)}}
            for tensor in errs["triton"]:
                t, e = errs["triton"][tensor], errs["eager"][tensor]
                out = tensor == "out"
                if mode == "bf16":  # FlashAttention's rule; SPEC's 2e-2 cap on the output (eager's gradients pass it)
                    limit, rule = (min(max(2 * e, 1e-3), 2e-2), "<= 2x eager bf16, <= 2e-2") if out else (
                        max(2 * e, 1e-3), "<= 2x eager bf16")
                elif mode == "fp32-ieee":
                    limit, rule = (1e-5 if out else 1e-4), "SPEC fp32 IEEE"
                else:  # SPEC's 2e-3 on the output; gradients as bf16's rule (eager's TF32 gradients miss 2e-3)
                    limit, rule = (2e-3, "SPEC TF32") if out else (max(2 * e, 1e-3), "<= 2x eager TF32")
                ok = t <= limit
                rows.append(dict(keep_slots=keep_slots, mode=mode, tensor=tensor, triton=t, eager=e, limit=limit,
                                 rule=rule, ok=bool(ok)))
    bad = [r for r in rows if not r["ok"]]
    return dict(status="ok" if not bad else "failed", n=ACCURACY_N, bags=2, rows=rows,
                failed=[f"{r['mode']} keep_slots={r['keep_slots']} {r['tensor']}: {r['triton']:.2e} > {r['limit']:.2e}"
                        for r in bad])


def compile_step(chk: Check) -> dict:
    """A training step of ABMIL with the Mammoth layer (triton backend) under
    torch.compile (default Inductor) against the same step in eager mode."""
    import torch
    import triton

    from benchmarks.run import SIZES
    from mammoth_fast.kernels._launch import TRITON_OP
    from mammoth_fast.mil import create_model

    dev = chk.device
    out: dict = dict(triton_op=TRITON_OP)
    for keep_slots in (True, False):
        torch.manual_seed(0)
        moe = dict(keep_slots=keep_slots, backend="triton", dropout=0.0)
        din = SIZES["input_dim"]
        net = create_model("abmil.base_mammoth", 2, in_dim=din, dropout=0.0, moe_args=moe).to(dev).train()
        x = torch.randn(2, COMPILE_N, din, device=dev)
        mask = torch.ones(2, COMPILE_N, dtype=torch.bool, device=dev)
        mask[1, COMPILE_N * 3 // 4:] = False
        label = torch.tensor([0, 1], device=dev)
        prms = [p for p in net.parameters() if p.requires_grad]

        def step(model):
            logits = model(x, mask=mask)["logits"]
            loss = torch.nn.functional.cross_entropy(logits, label)
            return (loss, *torch.autograd.grad(loss, prms))

        torch._dynamo.reset()
        explain = torch._dynamo.explain(lambda t, m: net(t, mask=m)["logits"])(x, mask)
        compiled = torch.compile(net)
        t0 = time.perf_counter()
        got = step(compiled)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        want = step(net)
        # the loss, and all gradients as one vector (the attention bias's gradient is 0 in exact arithmetic)
        errs = [_rel(got[0], want[0]), _rel(torch.cat([g.flatten() for g in got[1:]]),
                                            torch.cat([g.flatten() for g in want[1:]]))]
        with torch.profiler.profile() as prof:
            step(compiled)
            torch.cuda.synchronize()
        ours = {k.fn.__name__ for kernels in _ops_kernels() for k in kernels}
        kernels = sorted({name for e in prof.events() for name in ours if name in e.name})
        eager_ms = triton.testing.do_bench(lambda: step(net), warmup=10, rep=50, return_mode="median")
        compiled_ms = triton.testing.do_bench(lambda: step(compiled), warmup=10, rep=50, return_mode="median")
        out[f"keep_slots={keep_slots}"] = dict(
            graph_breaks=explain.graph_break_count, graph_count=explain.graph_count, first_call_s=round(first_s, 1),
            max_rel_err_vs_eager=max(errs), our_kernels_in_compiled_step=kernels, eager_step_ms=eager_ms,
            compiled_step_ms=compiled_ms)
    ok = all(v["graph_breaks"] == 0 and v["max_rel_err_vs_eager"] < 1e-4
             for k, v in out.items() if k.startswith("keep_slots"))
    out["status"] = "ok" if ok else "failed"
    return out


def _ops_kernels():
    """The kernels each mammoth_fast operator declares it launches."""
    import torch

    from mammoth_fast.kernels import _ops

    table = getattr(torch._library.triton, "triton_ops_to_kernels", {})
    return [table.get(f"{_ops.NS}::{name}", []) for name in _ops.OPS]


def bench(chk: Check) -> dict:
    from benchmarks import run

    argv = ["--n", *map(str, chk.args.bench_n), "--bags", *map(str, BENCH_BAGS), "--impl", *chk.args.bench_impl,
            "--no-kernels", "--rep-ms", "40", "--out-dir", str(chk.args.out_dir), "--date", chk.date,
            "--time-limit-s", str(max(5, int(chk.section_left() - 15)))]
    res = run.main(argv)
    rows = res["rows"]
    return dict(status="ok" if not any(r["status"] == "error" for r in rows) else "failed", argv=argv,
                json=Path(res["json_path"]).name, png=Path(res["png_path"]).name, rows=rows,
                errors=[f"{r['impl']} {r['dtype']} B={r['bags']} N={r['n']}: {r['note']}"
                        for r in rows if r["status"] == "error"])


def kernels(chk: Check) -> dict:
    from benchmarks import run

    args = argparse.Namespace(dtype=list(run.DTYPES), n=list(KERNEL_N), rep_ms=40.0,
                              deadline=time.monotonic() + max(5, chk.section_left() - 5))
    rows = run.kernel_timings(args, chk.device)
    return dict(status="ok" if not any(r["status"] == "error" for r in rows) else "failed", rows=rows)


def memory(chk: Check) -> dict:
    """Peak extra memory and time of one training step (forward, then backward of
    a fixed random output gradient, made beforehand) at N = 1M, one bag."""
    import torch
    import torch.nn as nn

    from benchmarks.run import SIZES
    from mammoth_fast import Mammoth

    dev = chk.device
    rows = []
    for dname, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x = torch.randn(1, MEMORY_N, SIZES["input_dim"], device=dev, dtype=dtype)
        for impl, keep_slots in (("linear", None), ("triton", True), ("triton", False)):
            row = dict(impl=impl, dtype=dname, keep_slots=keep_slots)
            if chk.section_left() < 3:
                rows.append(dict(row, status="skipped", note="out of time"))
                continue
            torch.manual_seed(0)
            model = (nn.Linear(SIZES["input_dim"], SIZES["dim"]) if impl == "linear" else
                     Mammoth(**SIZES, keep_slots=keep_slots, backend="triton")).to(dev).train()
            cast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
            try:
                with cast:
                    out = model(x)  # compiles and warms up
                grad = torch.randn_like(out)
                out.backward(grad)
                del out
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                with cast:
                    out = model(x)
                out.backward(grad)
                torch.cuda.synchronize()
                rows.append(dict(row, status="ok", step_ms=1e3 * (time.perf_counter() - t0),
                                 peak_extra_gib=(torch.cuda.max_memory_allocated(dev) - base) / 2**30))
                del out, grad
            except Exception as exc:  # noqa: BLE001 - recorded
                rows.append(dict(row, status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}"))
            del model
            torch.cuda.empty_cache()
        del x
    return dict(status="ok" if all(r["status"] != "error" for r in rows) else "failed", n=MEMORY_N, rows=rows)


def multi_gpu(chk: Check) -> dict:
    """The launch device guard: the layer on the last GPU, called while GPU 0 is current."""
    import torch

    from benchmarks.run import SIZES
    from mammoth_fast import Mammoth

    count = torch.cuda.device_count()
    if count < 2:
        return dict(status="skipped", note=f"{count} GPU: nothing to check")
    other = torch.device(f"cuda:{count - 1}")
    torch.manual_seed(0)
    layers = {d: Mammoth(**SIZES, keep_slots=False, backend="triton", dropout=0.0).to(d)
              for d in (torch.device("cuda:0"), other)}
    layers[other].load_state_dict(layers[torch.device("cuda:0")].state_dict())
    x = torch.randn(2, 5000, SIZES["input_dim"])
    res = {}
    for d, layer in layers.items():
        with torch.cuda.device(0):
            out = layer(x.to(d))
            grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        res[str(d)] = [out.cpu(), *(g.cpu() for g in grads)]
    a, b = res.values()
    errs = [_rel(u, v) for u, v in zip(a, b)]
    return dict(status="ok" if max(errs) < 1e-6 else "failed", devices=list(res), max_rel_diff=max(errs))


SECTIONS = (
    Section("machine", 10, "card, versions, measured copy bandwidth and bf16 matmul rate", machine),
    Section("tests", 160, "the CUDA-relevant tests (TEST_FILES), natively", tests),
    Section("accuracy", 25, f"bf16 / fp32 / TF32 against float64, B = 2, N = {ACCURACY_N:,}, masked", accuracy),
    Section("compile", 60, "ABMIL + Mammoth training step under torch.compile (Inductor)", compile_step),
    Section("bench", 130, "benchmarks.run: linear, eager, mammoth-moe, sdpa, triton", bench),
    Section("kernels", 35, "each launcher against its roofline floor", kernels),
    Section("memory", 20, f"training step at N = {MEMORY_N:,}", memory),
    Section("multi_gpu", 10, "device guard across GPUs (skipped with one)", multi_gpu),
)


# ----------------------------------------------------------------- reporting
def _f(v, fmt=".1f") -> str:
    return "" if v is None else format(v, fmt)


def markdown(res: dict) -> str:
    from benchmarks import run

    s = res["sections"]
    m = s.get("machine", {})
    lines = [f"# GPU acceptance run, {res.get('date')}", ""]
    if m.get("status") == "ok":
        info, v = m["machine"], m["versions"]
        lines += [f"{info.get('gpu')} ({info.get('gpu_sm_count')} SMs, {info.get('gpu_memory_gib')} GiB), CUDA "
                  f"{info.get('cuda')}; torch {v.get('torch')}, triton {v.get('triton')}, python {v.get('python')}; "
                  f"commit {v.get('git_commit')}{' (modified: ' + ', '.join(v['git_modified_files']) + ')' if v.get('git_modified_files') else ''}"
                  f"; sources sha256 {str(v.get('source_sha256'))[:16]}.",
                  f"Measured ceilings: copy {m['copy_tb_per_s']:.2f} TB/s (read + write), bf16 matmul "
                  f"{m['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3).", ""]
    lines += ["| section | status | seconds | what |", "|---|---|--:|---|"]
    for sec in SECTIONS:
        r = s.get(sec.name)
        if r is not None:
            lines.append(f"| {sec.name} | {r.get('status')} | {_f(r.get('section_s'))} | {sec.what} |")
    t = s.get("tests")
    if t and "counts" in t:
        lines += ["", f"**Tests** ({t['command']}): " + ", ".join(f"{v} {k}" for k, v in t["counts"].items())
                  + f"; exit {t['returncode']}."]
        lines += [f"- {f}" for f in t.get("failed", [])[:40]]
    a = s.get("accuracy")
    if a and "rows" in a:
        lines += ["", f"**Accuracy** against float64 (B = 2, N = {a['n']:,}, masked): relative error of the "
                  "output and of each parameter gradient, the worst over the tensors:", "",
                  "| mode | keep_slots | triton worst | eager worst | limit | all within |", "|---|---|--:|--:|--:|---|"]
        for mode in ("bf16", "fp32-ieee", "fp32-tf32"):
            for ks in (True, False):
                rs = [r for r in a["rows"] if r["mode"] == mode and r["keep_slots"] == ks]
                if rs:
                    worst = max(rs, key=lambda r: r["triton"] / r["limit"])
                    lines.append(f"| {mode} | {ks} | {worst['triton']:.2e} ({worst['tensor']}) | "
                                 f"{max(r['eager'] for r in rs):.2e} | {worst['limit']:.1e} ({worst['rule']}) | "
                                 f"{'yes' if all(r['ok'] for r in rs) else 'NO'} |")
    c = s.get("compile")
    if c and any(k.startswith("keep_slots") for k in c):
        lines += ["", f"**torch.compile** (default Inductor), ABMIL + Mammoth training step, B = 2, N = {COMPILE_N:,}:", "",
                  "| keep_slots | graph breaks | first call s | eager step ms | compiled step ms | max rel. err |",
                  "|---|--:|--:|--:|--:|--:|"]
        for k, v in c.items():
            if k.startswith("keep_slots"):
                lines.append(f"| {k.split('=')[1]} | {v['graph_breaks']} | {v['first_call_s']} | "
                             f"{v['eager_step_ms']:.2f} | {v['compiled_step_ms']:.2f} | {v['max_rel_err_vs_eager']:.1e} |")
    b = s.get("bench")
    if b and "rows" in b:
        rows = b["rows"]
        ns = sorted({r["n"] for r in rows})
        for bags in sorted({r["bags"] for r in rows}):
            lines += ["", f"**Benchmark** (x nn.Linear(1024, 512)), B = {bags}:", ""]
            lines += [run.summary_table(rows, n, bags) + "\n" for n in ns if n >= 16_000]
    k = s.get("kernels")
    if k and "rows" in k:
        lines.append(run.format_kernels(k["rows"]))
    mem = s.get("memory")
    if mem and "rows" in mem:
        lines += ["", f"**Training step at N = {mem['n']:,}** (one bag):", "",
                  "| impl | dtype | keep_slots | step ms | peak extra GiB |", "|---|---|---|--:|--:|"]
        for r in mem["rows"]:
            lines.append(f"| {r['impl']} | {r['dtype']} | {_f(r['keep_slots'], '')} | {_f(r.get('step_ms'))} | "
                         f"{_f(r.get('peak_extra_gib'), '.2f')} |" if r["status"] == "ok" else
                         f"| {r['impl']} | {r['dtype']} | {_f(r['keep_slots'], '')} | {r['status']}: {r.get('note')} | |")
    for name, r in s.items():
        if r.get("error"):
            lines += ["", f"**{name}** raised: `{r['error']}`"]
    return "\n".join(lines)


# --------------------------------------------------------------------- main
def shares(args) -> Dict[str, float]:
    """Seconds per chosen section: those named by --share get theirs, the others
    split the rest of --budget-s in proportion to their default shares."""
    chosen = [s for s in SECTIONS if _chosen(s.name, args) or s.name == "machine"]
    fixed = {k: v for k, v in args.share.items() if any(s.name == k for s in chosen)}
    rest = [s for s in chosen if s.name not in fixed]
    left = max(0.0, args.budget_s - sum(fixed.values()))
    total = sum(s.share_s for s in rest) or 1.0
    return {s.name: fixed.get(s.name, left * s.share_s / total) for s in chosen}


def plan(args) -> str:
    secs = shares(args)
    lines = [f"python -m benchmarks.gpu_check: budget {args.budget_s:.0f} s "
             f"(estimated {sum(secs.values()):.0f} s), results in {args.out_dir}"]
    for s in SECTIONS:
        if s.name in secs:
            lines.append(f"  {s.name:<10} {secs[s.name]:5.0f} s  {s.what}")
    lines += ["tests:   " + " ".join(args.tests),
              f"bench:   N = {', '.join(f'{n:,}' for n in args.bench_n)}; B = {', '.join(map(str, BENCH_BAGS))}; "
              f"{', '.join(args.bench_impl)}; fp32 and bf16; keep_slots true and false",
              f"kernels: N = {', '.join(f'{n:,}' for n in KERNEL_N)}, fp32 and bf16",
              f"wheels:  {', '.join(p.name for p in sorted(WHEEL_DIR.glob('*.whl'))) or 'none in .whl/ (mammoth-moe column skipped)'}",
              f"files:   <card>-{args.date}-gpu-check.json, -gpu-check.md, -tests.log, <card>-{args.date}.json, .png"]
    return "\n".join(lines)


def _chosen(name: str, args) -> bool:
    return (not args.only or name in args.only) and name not in (args.skip or ())


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in SECTIONS]
    parser.add_argument("--dry-run", action="store_true", help="import everything, print the plan and exit")
    parser.add_argument("--fetch-wheels", action="store_true", help=f"download {', '.join(WHEELS)} into .whl/ and exit")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the whole run; each section gets its share (default 450)")
    parser.add_argument("--only", nargs="+", choices=names, help="run only these sections")
    parser.add_argument("--skip", nargs="+", choices=names, help="leave these sections out")
    parser.add_argument("--bench-n", type=int, nargs="+", default=list(BENCH_N), help="the benchmark's bag sizes")
    parser.add_argument("--bench-impl", nargs="+", default=list(BENCH_IMPLS),
                        help=f"the benchmark's implementations (default: {' '.join(BENCH_IMPLS)})")
    parser.add_argument("--tests", nargs="+", default=list(TEST_FILES),
                        help="test files (or node ids) to run on the GPU (default: TEST_FILES, the CUDA-relevant ones)")
    parser.add_argument("--share", type=_share, nargs="+", default=[], metavar="SECTION=SECONDS",
                        help="give these sections this many seconds; the others split the rest of the budget")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the results go")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    args = parser.parse_args(argv)
    args.share = dict(args.share)
    return args


def _share(text: str) -> tuple:
    name, _, secs = text.partition("=")
    if name not in {s.name for s in SECTIONS} or not secs.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"--share {text!r}: use SECTION=SECONDS, SECTION one of "
                                         f"{', '.join(s.name for s in SECTIONS)}")
    return name, float(secs)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels()
    setup_done = setup() if not args.dry_run else None
    import torch

    import benchmarks.launchers  # noqa: F401  (the dry run imports everything the sections use)
    import benchmarks.roofline  # noqa: F401
    import benchmarks.run  # noqa: F401
    import mammoth_fast.mil  # noqa: F401
    from mammoth_fast import Mammoth  # noqa: F401

    print(plan(args), flush=True)
    if args.dry_run:
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --dry-run shows the plan", file=sys.stderr)
        return 2
    chk = Check(args)
    chk.device = torch.device("cuda:0")
    chk.results.update(date=args.date, budget_s=args.budget_s, setup=setup_done, argv=sys.argv[1:])
    secs = shares(args)
    chosen = [s for s in SECTIONS if s.name in secs]
    for i, sec in enumerate(chosen):
        rest = sum(secs[s.name] for s in chosen[i:])
        # this section's part of what is left, so that time saved early goes to later sections
        share = chk.left() * secs[sec.name] / rest if rest > 0 else 0
        start = time.monotonic()
        if chk.left() < 3:
            res = dict(status="skipped", note="out of time")
        else:
            log(f"{sec.name}: {sec.what} (up to {share:.0f} s)")
            chk.section_end = start + share
            try:
                res = sec.run(chk)
            except Exception as exc:  # noqa: BLE001 - a failed section is a result; the run goes on
                res = dict(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
                log(res["traceback"])
        res["section_s"] = round(time.monotonic() - start, 1)
        chk.results["sections"][sec.name] = res
        chk.write()
        log(f"{sec.name}: {res.get('status')} in {res['section_s']} s")
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    print(markdown(chk.results))
    print(f"\nwrote {chk.path('-gpu-check.json')} and the files beside it ({chk.results['elapsed_s']} s)")
    return 0 if all(r.get("status") in ("ok", "skipped") for r in chk.results["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
