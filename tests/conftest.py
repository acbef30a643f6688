"""Shared test setup.

Without CUDA the Triton kernels run on CPU tensors under the interpreter,
which must be switched on before triton is first imported.
"""
import os

try:  # decide before anything imports triton
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mammoth_fast import Mammoth  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: `-n 2` on 2 cores with torch's default of one
    # thread per core oversubscribes them, and small ops then spin-wait for the other worker
    torch.set_num_threads(1)

DEVICE = torch.device("cuda" if _HAS_CUDA else "cpu")

# (input_dim, dim, num_experts, num_slots, num_heads, slot_dim): the recommended
# sizes, and awkward ones (E = 1, S = 1, H = 1, odd ranks, dh and do not powers of two).
RECOMMENDED = dict(input_dim=1024, dim=512, num_experts=30, num_slots=10, num_heads=16, slot_dim=256)
SIZES = {
    "recommended": RECOMMENDED,
    "small": dict(input_dim=64, dim=48, num_experts=3, num_slots=4, num_heads=4, slot_dim=16),
    "one_expert": dict(input_dim=40, dim=24, num_experts=1, num_slots=3, num_heads=2, slot_dim=12),
    "one_slot_one_head": dict(input_dim=36, dim=20, num_experts=4, num_slots=1, num_heads=1, slot_dim=6),
    "odd": dict(input_dim=166, dim=60, num_experts=5, num_slots=7, num_heads=3, slot_dim=9),
}


@pytest.fixture
def device():
    return DEVICE


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensor, in float64 (SPEC section 10)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_layer(size="small", seed: int = 0, **kw) -> Mammoth:
    """A float64 eval-mode layer of SIZES[size] (or of the sizes ``size``, a dict)
    with random (not default) norm and bias values, so that every parameter
    matters in the comparisons."""
    torch.manual_seed(seed)
    layer = Mammoth(**{**(SIZES[size] if isinstance(size, str) else size), **kw}).double().eval()
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            if name.endswith("gamma"):
                prm.uniform_(0.5, 1.5)
            elif name == "wq.bias":
                prm.normal_(0.0, 0.1)
    return layer


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor, in fp32 elements, that an out-of-place aten op
    (allocations included) returns. In-place ops allocate nothing (the
    interpreter moves kernel arguments with set_ and copy_)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.name.endswith("_"):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size() // 4)
        return out


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel test workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys):
    """``mammoth-fast argv`` in this process: (exit code, the stderr lines but
    progress bars: tqdm redraws after a carriage return)."""
    import re

    from mammoth_fast.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    return rc, [line for line in re.split(r"[\r\n]", err) if line.strip() and "%|" not in line]
