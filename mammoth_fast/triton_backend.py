"""The triton backend: the layer as the chain of fused kernels

    feats -> query -> q (B, N, C) -> dispatch -> Z (B, H, P, dh) -> experts -> Y (B, P, D)
                                  \\____________ combine (keep_slots=False) ________/-> out (B, N, D)

Only O(N * C + P * D) tensors are made; the one N x H x P tensor is the
dispatch weights, built from q and the saved log-sum-exp when
``return_weights=True`` asks for them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .kernels import _launch
from .kernels.combine import combine_forward
from .kernels.dispatch import dispatch_forward
from .kernels.experts import experts_forward
from .kernels.query import query_forward


def compute_dtype(feats: Tensor) -> torch.dtype:
    """The input's dtype, or the autocast dtype inside ``torch.autocast``."""
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) and feats.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return feats.dtype


def needs_grad(layer, feats: Tensor) -> bool:
    return torch.is_grad_enabled() and (feats.requires_grad or any(p.requires_grad for p in layer.parameters()))


def forward(layer, feats: Tensor, mask: Optional[Tensor], return_weights: bool):
    """feats (B, N, Din) checked by the layer; mask (B, N) bool or None."""
    if layer.training and layer.slot_dropout > 0:
        raise NotImplementedError(
            "mammoth_fast: slot_dropout in training is not yet implemented in the triton backend; "
            "use backend='eager' to train with slot_dropout > 0"
        )
    _launch.check_device(feats)
    p = layer.params()
    dtype = compute_dtype(feats)
    acc = _launch.acc_dtype(dtype)
    bsz, n, din = feats.shape
    x = feats.to(dtype).reshape(bsz * n, din)
    q, _, _ = query_forward(x, p.wq_weight.to(dtype), p.wq_bias, p.norm_gamma, p.norm_beta, p.use_layernorm)
    q = q.view(bsz, n, -1)  # (B, N, C)
    k = reference.slot_keys(p, acc).contiguous()  # (H, P, dh): P * dh values, plain PyTorch
    z, lse_d = dispatch_forward(q, k, mask)  # (B, H, P, dh), (B, H, P)
    y, _ = experts_forward(z, p.shared_weight, p.shared_bias, p.expert_weights, p.expert_bias, p.expert_gamma)
    drop = layer.expert_heads.dropout.p
    if layer.training and drop > 0:  # (B, P, D): small, plain PyTorch
        y = y * (torch.rand_like(y) >= drop) / (1.0 - drop)
    if layer.keep_slots:
        out = y.to(dtype)
    else:
        out, _ = combine_forward(q, k, y, mask, dtype)
    if not return_weights:
        return out
    # the dispatch weights are N x H x P by definition: built only on request
    logits = reference.routing_logits(q.to(acc), k)  # (B, N, H, P)
    dw = torch.exp(logits - lse_d[:, None])
    if mask is not None:
        dw = dw * mask[:, :, None, None]
    return out, reference.dispatch_layout(dw.to(dtype), layer.num_experts)
