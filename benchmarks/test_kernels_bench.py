"""pytest-benchmark microbenchmarks of the kernel launchers (CUDA only).

    python -m pytest benchmarks/test_kernels_bench.py [--benchmark-json out.json]

Not collected by the default ``python -m pytest`` (pytest.ini's testpaths is
``tests``); skipped without a CUDA GPU. One benchmark per launcher (query,
dispatch, experts and combine, forward and backward), bag size and dtype, at
the recommended sizes; ``extra_info`` carries the H100 roofline floor of the
kernels the launcher runs (``benchmarks/roofline.py``).
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel microbenchmarks need a CUDA GPU")

from benchmarks.launchers import CASE_NAMES, build_cases  # noqa: E402
from benchmarks.roofline import H100, launcher_floor, mammoth_kernels  # noqa: E402

N_VALUES = (16_000, 100_000)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.lru_cache(maxsize=None)  # 4 sets of inputs, a few GB at N = 100k
def _cases(n: int, dtype_name: str):
    return build_cases(n, DTYPES[dtype_name], "cuda")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_launcher(benchmark, case, n, dtype_name):
    c = _cases(n, dtype_name)[case]

    def run():
        c.fn()
        torch.cuda.synchronize()

    run()  # compile and warm up outside the measurement
    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    machine = dataclasses.replace(H100, sm_count=sm)  # the launchers' n-splits follow the SM count
    floor = launcher_floor(mammoth_kernels(n, DTYPES[dtype_name], False, m=machine), c.kernels, machine)
    benchmark.extra_info.update(kernels=list(c.kernels), floor_us=floor * 1e6, device=torch.cuda.get_device_name(0))
