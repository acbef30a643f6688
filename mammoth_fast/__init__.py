"""mammoth_fast: fused Triton kernels for the Mammoth mixture-of-mini-experts layer.

``Mammoth`` is a checkpoint-compatible twin of ``mammoth.Mammoth`` (mammoth-moe
0.1.2) with a ``backend=`` choice; ``reference`` holds the math in plain PyTorch.
"""
from . import reference
from .layer import BACKENDS, Mammoth
from .reference import MammothParams

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Mammoth", "MammothParams", "reference", "__version__"]
