"""The dtype a forward computes in, shared by the backends."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(feats: Tensor) -> torch.dtype:
    """The input's dtype, or the autocast dtype inside ``torch.autocast``."""
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) and feats.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return feats.dtype
