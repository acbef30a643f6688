"""Benchmarks of mammoth_fast (run from the repository root; not installed).

    python -m benchmarks.run         the comparison against nn.Linear (CPU or GPU)
    python -m benchmarks.roofline    per-kernel FLOPs, exponentials, bytes and H100 floors

``benchmarks/test_kernels_bench.py`` holds pytest-benchmark microbenchmarks of
the kernel launchers (CUDA only; not part of the default ``python -m pytest``).
"""
