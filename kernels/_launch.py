"""Launch helpers shared by the kernels: device checks, dot precision, block sizes,
the SM count for split grids, and how launches are registered for torch.compile.

Every launcher picks its block sizes with a ``*_meta`` function of this
package; ``mammoth_fast.compile_check`` compiles the kernels for sm_90a with
the very same functions, so what is checked is what runs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Tensor-core dots need every dim >= 16.
MIN_DOT = 16


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting()
"""Whether the launchers are registered as ``torch.library.triton_op`` (torch >=
2.6, compiled kernels): torch.compile then traces into each launcher and sees
every kernel launch. Under the interpreter the kernels are plain Python
functions that cannot be traced, and the launchers are opaque
``torch.library.custom_op`` ops instead (``kernels/_ops.py``)."""


def traceable(kernel):
    """``kernel`` as its launcher calls it: through ``torch.library.wrap_triton``
    when the launchers are triton_ops, so that tracing records the launch."""
    return torch.library.wrap_triton(kernel) if TRITON_OP else kernel


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter, all
    on one device."""
    for t in tensors:
        if t.is_cuda or (t.device.type == "cpu" and interpreting()):
            continue
        if t.device.type == "cpu":
            raise RuntimeError(
                "mammoth_fast: the triton backend got a CPU tensor. Move the layer and its input to a "
                "CUDA GPU, use backend='eager', or run the kernels on CPU under the Triton interpreter "
                "by setting the environment variable TRITON_INTERPRET=1 before triton is imported."
            )
        raise RuntimeError(f"mammoth_fast: the triton backend supports CUDA tensors, got one on {t.device}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(f"mammoth_fast: the triton backend got tensors on several devices "
                           f"({', '.join(sorted(map(str, devices)))}); move the layer and its input to one device")


def on_device(launcher):
    """Decorates a launcher so that its kernels run on the device of its first
    tensor argument. Triton launches on the *current* CUDA device and stream:
    without this guard a layer on cuda:1 called while cuda:0 is current would
    hand cuda:1 pointers to a kernel running on cuda:0."""

    @functools.wraps(launcher)
    def run(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and first.is_cuda and torch.cuda.is_available():
            with torch.cuda.device(first.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return run


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, for sizing the split-n grids; 4
    under the interpreter (a few chunks, so that the merges are exercised)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def block(size: int, minimum: int = MIN_DOT, maximum: int | None = None) -> int:
    """The power-of-two block covering ``size`` (masked beyond it), within bounds."""
    b = max(minimum, triton.next_power_of_2(size))
    return b if maximum is None else min(b, maximum)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators and softmax statistics: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot operands are cast to: the input's half type on GPU, fp32
    for fp32 inputs, fp64 for fp64. bf16 dots are wrong in the interpreter,
    which gets fp32."""
    if dtype == torch.float64:
        return tl.float64
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def torch_allows_tf32() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32. Torch >= 2.9 keeps this in
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none"
    when nothing is set; a setting of ``torch.backends.fp32_precision`` or of
    the legacy ``allow_tf32`` shows through it). Reading the legacy
    ``torch.backends.cuda.matmul.allow_tf32`` there raises once anyone used the
    new API, so the legacy flag is read only where the new one does not exist."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch < 2.9
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def input_precision() -> str:
    """fp32 dots follow torch's setting: IEEE unless TF32 is allowed for matmuls."""
    if interpreting():
        return "ieee"
    return "tf32" if torch_allows_tf32() else "ieee"


TORCH_TO_TL = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
