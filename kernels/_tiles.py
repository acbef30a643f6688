"""Tile loads shared by the dispatch and combine kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(base, offs_r, stride_r, offs_c, r_ok, c_ok):
    """The (rows, cols) tile base[offs_r * stride_r + offs_c], 0 outside r_ok x c_ok;
    row offsets in int64 (N * C reaches past 2**31 for large batches)."""
    return tl.load(base + offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :],
                   mask=r_ok[:, None] & c_ok[None, :], other=0.0)
