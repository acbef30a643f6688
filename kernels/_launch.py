"""Launch helpers shared by the kernel launchers: device checks and guards, dot
precision, tile sizes, grids sized in whole waves, and how a launch is issued
(directly in eager mode, through ``torch.library.wrap_triton`` when torch traces).

Every launcher picks its tile sizes with a ``*_meta`` function of its module;
``mammoth_fast.compile_check`` compiles the kernels for sm_90a with the very
same functions, so what is checked is what runs.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

MIN_DOT = 16
"""Tensor-core dots need every dim >= 16."""

FP64_MAX_K = 16
"""fp64 dots (gradcheck only) keep every dim <= 16: triton 3.6 cannot lower an
fp64 MMA whose K exceeds 16 ("fp64 don't support largeK MMA"), so fp64 tiles are
16 wide and wider head dims are looped over in 16-wide chunks."""


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreting()
"""Whether the launchers are registered as ``torch.library.triton_op`` (torch >=
2.6, compiled kernels): torch.compile then traces into each launcher and sees
every kernel launch. Under the interpreter the kernels are plain Python
functions that cannot be traced, and the launchers are opaque
``torch.library.custom_op`` ops instead (``kernels/_ops.py``)."""


def tracing() -> bool:
    """Whether torch is tracing this call (torch.compile / export, or make_fx and
    FakeTensorMode, which run under a dispatch mode) rather than running it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def launch(kernel, grid, **args) -> None:
    """``kernel[grid](**args)``; while torch traces, through ``wrap_triton`` so that
    the trace records the launch (triton_op launchers)."""
    if TRITON_OP and tracing():
        torch.library.wrap_triton(kernel)[grid](**args)
    else:
        kernel[grid](**args)


# ------------------------------------------------------------------ devices
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


@functools.lru_cache(maxsize=None)
def _device_props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, for sizing the split-n grids; 4
    under the interpreter (a few chunks, so that the merges are exercised)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# --------------------------------------------------------- dtypes, precision
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
TL_TO_TORCH = {v: k for k, v in TORCH_TO_TL.items()}


def mask_arg(mask: torch.Tensor) -> torch.Tensor:
    """A (B, N) bool mask as the kernels read it: the bool tensor itself (a
    pointer to i1, loaded as Inductor does), viewed as uint8 under the
    interpreter, which cannot load through bool pointers. No view on GPU: under
    torch.compile Inductor cannot lower a bool -> uint8 view of a graph input."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if interpreting() else mask


def dot_consts(dtype: torch.dtype) -> dict:
    """The dtype constexprs of a kernel whose dots take inputs of ``dtype``."""
    return dict(DOT_DTYPE=dot_dtype(dtype), INPUT_PRECISION=input_precision(), ACC=TORCH_TO_TL[acc_dtype(dtype)])


# ---------------------------------------------------------------- tile sizes
def block(size: int, minimum: int = MIN_DOT, maximum: int | None = None) -> int:
    """The power-of-two block covering ``size`` (masked beyond it), within bounds."""
    b = max(minimum, triton.next_power_of_2(size))
    return b if maximum is None else max(minimum, min(b, maximum))


def cap(dtype: torch.dtype, half: int, fp32: int) -> int:
    """A tile dim's upper bound for inputs of ``dtype``: ``half`` for 16-bit,
    ``fp32`` for fp32, FP64_MAX_K for fp64."""
    if dtype == torch.float64:
        return FP64_MAX_K
    return half if dtype.itemsize <= 2 else fp32


# -------------------------------------------------------------- kernel plan
LOG2E = 1.4426950408889634

RESCALE_MAX_LOG2 = 64.0
"""The fused routing backward (keep_slots=False) takes a patch's combine
weights from its dispatch weights, Cw = Dw exp(LSE_d - g) exp(g - LSE_c), where
(g - LSE_c) log2(e) is at most this (a factor of at most 2**64), and from their
own exponentials elsewhere (``dispatch._combine_rows``, ``combine._far_rows``).
Read at each launch, so that tests can force either path."""


def finite_max(lse: torch.Tensor) -> torch.Tensor:
    """g: per (bag, head) the largest finite dispatch LSE, (B, H, 1) from (B, H,
    P); -inf where no slot is reached. The fused routing backward's reference."""
    return torch.where(torch.isfinite(lse), lse, float("-inf")).amax(-1, keepdim=True).contiguous()


_PLAN = {"legacy": os.environ.get("MAMMOTH_FAST_LEGACY_KERNELS", "0") not in ("", "0")}


@contextlib.contextmanager
def legacy_kernels(enabled: bool = True):
    """Within this block (or everywhere, with the environment variable
    MAMMOTH_FAST_LEGACY_KERNELS=1), the layer runs the routing kernels of
    2026-11-29, kept selectable until a GPU run has timed both plans
    (``benchmarks.gpu_check``):

    - legacy: a subtract and a multiply by log2(e) per logit before exp2,
      128-slot tiles in the 16-bit dispatch forward and dK, a backward of two
      kernels per routing stage (each evaluating the exponentials again),
      Philox slot dropout;
    - default: log2(e) folded into one FMA per logit in the forwards
      (``_tiles.exp_minus``; scaling the keys by it instead would round
      log2(e) K into half-precision dot operands, which measurably loosened
      the fp16 gradients), slot tiles picked to pad at most about 7 %
      (``slot_block``), one fused dispatch backward (its exponentials evaluated
      once; ``dispatch_bwd_fused_ok`` says where it applies), a
      one-hash-per-logit slot-dropout generator. The combine backward keeps
      its two kernels (see ``kernels/combine.py``).

    A layer reads the plan at its forward, and its backward follows that plan
    (the slot-dropout mask must be the same). Read when a launcher runs."""
    old = _PLAN["legacy"]
    _PLAN["legacy"] = enabled
    try:
        yield
    finally:
        _PLAN["legacy"] = old


def legacy_plan() -> bool:
    """Whether the legacy kernel plan is selected (``legacy_kernels``)."""
    return _PLAN["legacy"]


def slot_block(p: int, maximum: int) -> int:
    """The slot tile (a power of two from MIN_DOT to ``maximum``) for P slots:
    the largest whose padding stays within about 7 % (ceil(P / b) * b <= 1.07 P),
    else the one padding least (P = 300: 64, 320 slots; P = 200: 16, 208;
    P = 100: 16, 112)."""
    sizes = []
    b = block(p, maximum=maximum)
    while b >= MIN_DOT:
        sizes.append(b)
        b //= 2
    padded = {b: -(-p // b) * b for b in sizes}
    good = [b for b in sizes if padded[b] <= 1.07 * p]
    return good[0] if good else min(sizes, key=lambda b: (padded[b], -b))


# ------------------------------------------------------------------- waves
FIXED_CHUNK_TILES = 32
"""n-tiles per chunk of the split-n grids in the fixed chunking mode."""

_CHUNKING = {"fixed": os.environ.get("MAMMOTH_FAST_FIXED_CHUNKS", "0") not in ("", "0")}


@contextlib.contextmanager
def fixed_chunks(enabled: bool = True):
    """Within this block (or everywhere, with the environment variable
    MAMMOTH_FAST_FIXED_CHUNKS=1), the split-n kernels (dispatch forward and dK,
    combine dK/dY) cut a bag into chunks of FIXED_CHUNK_TILES n-tiles whatever
    the GPU, instead of sizing the chunks to the GPU's SM count and the
    kernel's occupancy. Their sums over the chunks then run in the same order
    on every GPU, so results are bitwise reproducible across GPU models that
    run the same compiled kernels (same architecture, Triton and torch
    versions), at the cost of more partials to merge. By default results are
    bitwise reproducible for a fixed GPU model, batch shape and dtype. Read
    when a kernel is launched (or traced by torch.compile)."""
    old = _CHUNKING["fixed"]
    _CHUNKING["fixed"] = enabled
    try:
        yield
    finally:
        _CHUNKING["fixed"] = old


def chunking_is_fixed() -> bool:
    return _CHUNKING["fixed"]


def _occupancy(n_regs: int, shared: int, num_warps: int, props) -> int:
    """Programs of one kernel resident on one SM (CUDA occupancy rules:
    registers allocated per warp in units of 256, shared memory with 1 KiB
    reserved per block, at most 32 blocks and 2048 threads)."""
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    warp_regs = -(-max(n_regs, 1) * 32 // 256) * 256
    fits = [regs // (warp_regs * num_warps), threads // (32 * num_warps), 32]
    if shared:
        fits.append(smem // (shared + 1024))
    return max(1, min(fits))


class Ladder(tuple):
    """Candidate metas (dicts, read-only by convention) in order, hashable by
    value: ``choose`` caches its pick under it."""

    def __new__(cls, metas):
        self = super().__new__(cls, metas)
        self.key = tuple(tuple(sorted(m.items())) for m in metas)
        self.hash = hash(self.key)
        return self

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return isinstance(other, Ladder) and self.key == other.key


def candidates(meta: dict, shrink: tuple = ()) -> Ladder:
    """``meta`` (tile sizes and launch options), then variants of it that hold
    fewer registers per thread, in order: the other warp count (4 <-> 8), then
    the ``shrink`` tile dims halved one after another down to MIN_DOT, each with
    either warp count, then unpipelined. ``choose`` launches the first that
    compiles without spilling; ptxas's register allocation moves with the size,
    the flags and its version, so a fixed table cannot promise that."""
    other = {4: 8, 8: 4}
    out = [meta, {**meta, "num_warps": other[meta["num_warps"]]}]
    cur = meta
    for key in shrink:
        while cur[key] > MIN_DOT:
            cur = {**cur, key: cur[key] // 2}
            out += [cur, {**cur, "num_warps": other[cur["num_warps"]]}]
    out += [{**m, "num_stages": 1} for m in out if m.get("num_stages", 1) > 1]
    unique = []
    for m in out:
        if m not in unique:
            unique.append(m)
    return Ladder(unique)


_CHOSEN: dict = {}
_CONSTEXPRS: dict = {}  # kernel -> the names of its constexpr parameters


def _hinted(value):
    """A traced symbolic int as the value it stands for here (its hint)."""
    if isinstance(value, torch.SymInt):
        from torch.fx.experimental import symbolic_shapes

        for name in ("optimization_hint", "hint_int"):  # torch >= 2.12, and before
            hint = getattr(symbolic_shapes, name, None)
            if hint is not None:
                return int(hint(value))
        return int(value.node.hint)
    return value


def choose(kernel, device: torch.device, args: dict, metas: Ladder) -> tuple:
    """(meta, resident): the first of ``metas`` whose compiled ``kernel`` (with
    ``args``, its other arguments) spills no register, and how many of its
    programs the GPU runs at once (its occupancy, from the compiled kernel's
    registers, shared memory and warps, times the SM count). Where every
    candidate spills, the one that spills least. Compiles as the launch would
    (the launch then finds the kernel compiled), once per kernel variant and
    device. Without a real GPU (the interpreter, or tracing on fake CUDA
    tensors): the first candidate, and one program per SM."""
    if device.type != "cuda" or not torch.cuda.is_available():
        sms = sm_count(device) if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
        return metas[0], sms
    return _chosen(kernel, device, args, metas)[:2]


def spill_free(kernel, device: torch.device, args: dict, metas: Ladder) -> bool:
    """Whether ``choose`` finds a candidate of ``kernel`` that spills no register
    on ``device`` (compiling them as it does); True without a real GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return _chosen(kernel, device, args, metas)[2] == 0


def _chosen(kernel, device: torch.device, args: dict, metas: Ladder) -> tuple:
    """(meta, resident, spills) of ``choose`` on a GPU, compiled once per kernel variant and device."""
    # the kernel variant: its constexprs and pointer dtypes (not the runtime ints, which follow the shapes)
    constexprs = _CONSTEXPRS.get(kernel)
    if constexprs is None:
        constexprs = _CONSTEXPRS[kernel] = frozenset(p.name for p in kernel.params if p.is_constexpr)
    key = (kernel, device.index, metas, tuple(v.dtype if isinstance(v, torch.Tensor) else v
                                              for k, v in args.items() if k in constexprs or isinstance(v, torch.Tensor)))
    found = _CHOSEN.get(key)
    if found is None:
        from triton.runtime.jit import MockTensor

        mock = {k: MockTensor(v.dtype) if isinstance(v, torch.Tensor) else _hinted(v) for k, v in args.items()}
        props = _device_props(device)
        best = None
        with torch.cuda.device(device):
            for meta in metas:
                compiled = kernel.warmup(grid=(1,), **mock, **meta)
                compiled._init_handles()
                if best is None or compiled.n_spills < best[1].n_spills:
                    best = (meta, compiled)
                if compiled.n_spills == 0:
                    break
        meta, compiled = best
        per_sm = _occupancy(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps, props)
        found = _CHOSEN[key] = (meta, per_sm * props.multi_processor_count, compiled.n_spills)
    return found


def split_n(n, block_n: int, programs: int, resident: int, min_tiles: int = 4) -> tuple:
    """(n_splits, n_per_split): how a bag of ``n`` patches is cut into chunks of
    whole ``block_n`` tiles for a grid of ``programs`` programs per chunk, when
    ``resident`` programs run at once.

    The time of the split kernel goes as its waves times the tiles each program
    streams, plus a fixed cost per program (loads of its keys, its partials):
    ``ceil(programs * s / resident) * (ceil(tiles / s) + 2)``. The chunk count s
    minimizing it, at least ``min_tiles`` tiles a chunk, fills whole waves
    (e.g. 528 programs on 396 resident slots would run a second wave a third
    full; s is chosen so that they do not). In the fixed chunking mode
    (``fixed_chunks``) chunks are FIXED_CHUNK_TILES tiles whatever the GPU.

    While torch traces with a symbolic n (dynamic shapes), the chunk count
    comes from n's hint and the chunk length is symbolic, so that the graph
    covers any n with a fixed grid and fixed partial buffers per bag (chunks
    past the end of a shorter bag are empty, and merge as nothing); in the
    fixed chunking mode the chunks stay FIXED_CHUNK_TILES tiles and their
    count is symbolic, as in eager mode."""
    fixed = chunking_is_fixed()
    if isinstance(n, torch.SymInt):
        tiles = (n + block_n - 1) // block_n
        if fixed:
            per = FIXED_CHUNK_TILES * block_n
            return (n + per - 1) // per, per
        splits = _split_n(_hinted(n), block_n, programs, _hinted(resident), min_tiles, False)[0]
        return splits, (tiles + splits - 1) // splits * block_n
    return _split_n(n, block_n, programs, resident, min_tiles, fixed)


@functools.lru_cache(maxsize=4096)
def _split_n(n: int, block_n: int, programs: int, resident: int, min_tiles: int, fixed: bool) -> tuple:
    """split_n for a concrete n."""
    tiles = -(-n // block_n)
    if fixed:
        per = min(tiles, FIXED_CHUNK_TILES)
    else:
        most = max(1, tiles // min_tiles)
        candidates = {1, most} | {min(most, max(1, k * resident // programs)) for k in range(1, 33)}
        best = min(candidates, key=lambda s: (math.ceil(programs * s / resident) * (math.ceil(tiles / s) + 2), s))
        per = -(-tiles // best)
    return -(-tiles // per), per * block_n
