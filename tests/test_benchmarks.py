"""The benchmark command (``python -m benchmarks.run --quick``), the roofline
model and the kernel-launcher cases the GPU microbenchmarks time."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import roofline, run  # noqa: E402
from benchmarks.launchers import CASE_NAMES, build_cases  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run.main(["--quick", "--device", "cpu", "--out-dir", str(out), "--date", "2000-01-02"])
    return out, result


def test_quick_run_writes_json_and_png(quick):
    out, result = quick
    json_path = out / "cpu-{}core-2000-01-02.json".format(result["machine"]["cpu_cores"])
    png_path = json_path.with_suffix(".png")
    assert json_path.exists() and png_path.exists() and png_path.stat().st_size > 1000
    data = json.loads(json_path.read_text())
    assert data["date"] == "2000-01-02"
    for key in ("cpu", "cpu_cores", "torch_threads"):
        assert data["machine"][key]
    for key in ("torch", "triton", "python"):
        assert data["versions"][key]
    assert data["settings"]["n"] == list(run.QUICK_N_CPU)
    assert {"timing", "memory", "bf16"} <= set(data["settings"])


def test_quick_run_rows(quick):
    _, result = quick
    rows = result["rows"]
    keys = {(r["impl"], r["dtype"], r["keep_slots"], r["n"]) for r in rows}
    assert len(keys) == len(rows)  # one row per implementation, dtype, keep_slots and N
    for impl in run.IMPLS:
        for dtype in run.DTYPES:
            for ks in (True, False):
                for n in run.QUICK_N_CPU:
                    assert (impl, dtype, ks, n) in keys
    by = {(r["impl"], r["dtype"], r["keep_slots"], r["n"]): r for r in rows}
    for r in rows:
        assert r["status"] in ("ok", "skipped", "error")
        if r["impl"] in ("linear", "eager", "mammoth-moe"):
            assert r["status"] == "ok", r
        if r["status"] == "ok":
            for f in run.RATIO_FIELDS:
                assert r[f] > 0, (r["impl"], f)
                lin = by[("linear", r["dtype"], r["keep_slots"], r["n"])]
                assert math.isclose(r[f + "_x"], r[f] / lin[f]), (r["impl"], f)
            if r["impl"] == "linear":
                assert all(r[f + "_x"] == 1.0 for f in run.RATIO_FIELDS)
        else:
            assert r["note"]
    assert all("needs a CUDA GPU" in by[("triton", d, ks, n)]["note"] for d in run.DTYPES for ks in (True, False)
               for n in run.QUICK_N_CPU)
    assert all(by[("compile", d, True, n)]["status"] == "skipped" for d in run.DTYPES for n in run.QUICK_N_CPU)
    # keep_slots=False has a patch-sized output, keep_slots=True one row per slot
    n = run.QUICK_N_CPU[0]
    assert by[("eager", "fp32", False, n)]["out_shape"] == [1, n, 512]
    assert by[("eager", "fp32", True, n)]["out_shape"] == [1, 300, 512]
    assert by[("eager", "bf16", True, n)]["fwd_peak_mib"] > 0


def test_cpu_peak_bytes_counts_allocations():
    a = torch.ones(1000, 1000)  # allocated before: not counted

    def fn():
        b = torch.empty(1000, 1000)  # 4 MB
        c = torch.empty(500, 1000)  # + 2 MB while b lives
        del b, c
        d = torch.empty(100, 1000)  # after both are freed
        return d

    peak = run.cpu_peak_bytes(fn)
    assert 6_000_000 <= peak < 6_100_000
    assert a.sum() > 0


def test_roofline_counts():
    sz = roofline.RECOMMENDED
    assert (sz.r, sz.p, sz.dh, sz.do) == (17, 300, 16, 32)
    n = 100_000
    ks = {k.name: k for k in roofline.mammoth_kernels(n, torch.bfloat16, keep_slots=False)}
    disp = ks["dispatch fwd partial"]
    assert disp.exps == n * 16 * 300 and disp.flops == 4 * n * 16 * 300 * 16
    assert disp.bound(roofline.H100) == "exp"
    assert ks["query fwd"].flops == 2 * n * 256 * 1024
    assert ks["query fwd"].bytes > n * (1024 + 256) * 2  # feats read and q written, bf16
    assert ks["query fwd (+y)"].bytes - ks["query fwd"].bytes == n * 256 * 2  # y
    assert disp.tile_exps > disp.exps  # padded slots cost exponentials
    assert "query dx GEMM" not in ks  # MIL features need no gradient
    assert "combine fwd" not in {k.name for k in roofline.mammoth_kernels(n, torch.bfloat16, keep_slots=True)}
    lin = roofline.linear_kernels(n, torch.bfloat16)
    assert lin[0].flops == 2 * n * 1024 * 512
    t = roofline.totals(n, torch.bfloat16, True)
    assert t["linear_train"] > t["linear_fwd"] > 0 and t["mammoth_train"] > t["mammoth_fwd"] > 0
    assert "occupancy" in roofline.document(n)
    h200 = roofline.machine_for("NVIDIA H200", 132)
    assert h200.bytes_per_s > roofline.H100.bytes_per_s and roofline.machine_for("NVIDIA H100 80GB HBM3", 132) == roofline.H100


def test_roofline_counts_the_kernel_plan_that_runs():
    """The default plan: one fused dispatch backward (its exponentials once), 64-slot
    tiles (320 slots for 300); the legacy plan: dq and dK kernels, 128-slot tiles in bf16."""
    n, logits = 100_000, 100_000 * 16 * 300

    def train_exps(legacy):
        ks = roofline.mammoth_kernels(n, torch.bfloat16, True, legacy=legacy)
        return {k.name: k for k in ks}, sum(k.exps for k in ks if "train" in k.chains and k.name != "dispatch fwd merge")

    new, new_exps = train_exps(False)
    old, old_exps = train_exps(True)
    assert "dispatch bwd (fused)" in new and "dispatch bwd dq" not in new
    assert {"dispatch bwd dq", "dispatch bwd dK"} <= set(old) and "dispatch bwd (fused)" not in old
    assert (new_exps, old_exps) == (2 * logits, 3 * logits)  # two passes over the logits, not three
    assert new["dispatch bwd (fused)"].tile_exps == roofline._pad(n, 64) * 16 * 320  # 64-patch steps, 320 slots
    assert new["dispatch fwd partial"].tile_exps > n * 16 * 320
    assert old["dispatch fwd partial"].tile_exps > n * 16 * 384  # 128-slot tiles
    for keep_slots in (True, False):
        t_new, t_old = (roofline.totals(n, torch.bfloat16, keep_slots, legacy=legacy) for legacy in (False, True))
        assert t_new["mammoth_train_tile"] < t_old["mammoth_train_tile"] and t_new["linear_train"] == t_old["linear_train"]


def test_roofline_counts_the_fused_routing_backward():
    """keep_slots=False in bf16, default plan: the training step's backward evaluates the
    logits' exponentials twice (combine's dY kernel, the fused routing backward; the
    legacy plan: four times), no dq sum; the issue-19 targets hold on the tile floors."""
    n, logits = 100_000, 100_000 * 16 * 300

    def bwd(legacy):
        ks = {k.name: k for k in roofline.mammoth_kernels(n, torch.bfloat16, False, legacy=legacy) if k.stage == "bwd"}
        return ks, sum(k.exps for k in ks.values())

    (new, new_exps), (old, old_exps) = bwd(False), bwd(True)
    assert {"combine bwd dY", "routing bwd (fused)", "combine bwd far patches"} <= set(new)
    assert not {"autograd dq add", "dispatch bwd (fused)", "combine bwd dK/dY"} & set(new)
    assert new_exps == 2 * logits + n * 16 and old_exps == 4 * logits  # + alpha per patch and head
    assert new["combine bwd far patches"].exps == new["combine bwd far patches"].flops == 0
    for keep_slots, target in ((True, 1.8), (False, 2.9)):
        t = roofline.totals(n, torch.bfloat16, keep_slots)
        assert t["mammoth_train_tile"] / t["linear_train"] <= target, keep_slots


def test_launcher_cases_run_and_map_to_roofline_kernels():
    """Every launcher case runs (under the Triton interpreter without a GPU) and
    names kernels the roofline knows."""
    sz = roofline.Sizes(din=64, d=48, c=16, h=4, e=3, s=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 in the default plan: keep_slots=False's fused routing backward and combine's dY and far-patch kernels
    for dtype, legacy in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        cases = build_cases(50, dtype, device, sz, legacy=legacy)
        assert tuple(cases) == CASE_NAMES
        kernels = roofline.mammoth_kernels(50, dtype, False, sz, legacy=legacy)
        for c in cases.values():
            c.fn()
            assert roofline.launcher_floor(kernels, c.kernels) > 0
        assert ("routing bwd (fused)" in cases["dispatch_bwd"].kernels) == (dtype == torch.bfloat16)


def test_gpu_check_dry_run_prints_the_plan_on_cpu():
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    run_ = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--budget-s", "200",
                           "--share", "tests=120", "--skip", "multi_gpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-2000:]
    out = run_.stdout
    assert "budget 200 s (estimated 200 s)" in out and "tests        120 s" in out and "multi_gpu" not in out
    for what in ("tests:", "bench:", "kernels:", "wheels:", "gpu-check.json"):
        assert what in out


def test_gpu_check_shares_and_report():
    from benchmarks import gpu_check

    args = gpu_check.parse_args(["--budget-s", "300", "--share", "tests=100", "--only", "tests", "bench", "kernels"])
    secs = gpu_check.shares(args)
    assert set(secs) == {"machine", "tests", "bench", "kernels"} and secs["tests"] == 100
    assert abs(sum(secs.values()) - 300) < 1e-6
    assert secs["bench"] / secs["kernels"] == gpu_check.SECTIONS[4].share_s / gpu_check.SECTIONS[5].share_s
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--share", "nonsense=3"])
    # the committed H200 run renders (every section's table)
    res = json.loads((ROOT / "benchmarks" / "results" / "h200-2026-11-29-gpu-check.json").read_text())
    md = gpu_check.markdown(res)
    for what in ("| tests |", "**Accuracy**", "**torch.compile**", "**Benchmark**", "kernel launchers",
                 "**Training step at N = 1,000,000**"):
        assert what in md


@pytest.mark.parametrize("bad", [["--bags", "0"], ["--n", "-5"], ["--bags", "two"]])
def test_run_refuses_bad_sizes(bad, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(bad, torch.device("cpu"))
    assert "--" in capsys.readouterr().err


def test_run_times_batches_of_bags(tmp_path):
    res = run.main(["--quick", "--device", "cpu", "--impl", "sdpa", "--dtype", "fp32", "--keep-slots", "true",
                    "--bags", "1", "2", "--n", "64", "--out-dir", str(tmp_path), "--date", "2000-01-03"])
    rows = {(r["impl"], r["bags"]): r for r in res["rows"]}
    assert rows[("sdpa", 2)]["status"] == "ok" and rows[("linear", 2)]["status"] == "ok"
    assert rows[("linear", 2)]["fwdbwd_peak_mib"] > rows[("linear", 1)]["fwdbwd_peak_mib"]  # twice the patches
    assert math.isclose(rows[("sdpa", 2)]["fwdbwd_ms_x"], rows[("sdpa", 2)]["fwdbwd_ms"] / rows[("linear", 2)]["fwdbwd_ms"])
