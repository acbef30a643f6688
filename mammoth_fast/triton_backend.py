"""The triton backend: the layer as the chain of fused kernels

    feats -> query -> q (B, N, C) -> dispatch -> Z (B, H, P, dh) -> experts -> Y (B, P, D)
                                  \\____________ combine (keep_slots=False) ________/-> out (B, N, D)

each stage a ``torch.autograd.Function`` with its backward kernels when
autograd must differentiate the call, the bare forward launchers otherwise.
With keep_slots=False in the default kernel plan (bf16 and fp64,
``kernels.dispatch.routing_bwd_fused_ok``), dispatch, experts, Y's dropout and
combine are one Function (``RoutingFunction``), whose backward computes the
dq and dK of dispatch and combine in one kernel.
Only tensors of O(N * (Din + C + D) + P * D) values are made or saved (for
backward: the query's input and pre-norm rows, q, and under keep_slots=False
the output); the one N x H x P tensor is the dispatch weights, built when
``return_weights=True`` asks for them. Double backward is not supported: the
Functions are once-differentiable and say so when asked for it.

The slot keys K = slot_norm(slot_embeds) (H * P * dh values) and the dropout
on Y (B * P * D values) are plain PyTorch: small, and differentiated by
autograd (inside ``RoutingFunction``, Y's dropout mask is drawn the same way
and applied by hand). Slot dropout draws one seed per forward, a (1,) int64 tensor on the
device, and the kernels regenerate the keep-mask from it
(``kernels/_slot_dropout.py``): no host sync, no graph break under
torch.compile, and a captured CUDA graph draws a new mask on every replay.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .dtypes import compute_dtype
from .kernels import _launch
from .kernels._ops import combine_forward, dispatch_forward, experts_forward, query_forward
from .kernels._slot_dropout import slot_keep_mask
from .kernels.autograd import CombineFunction, DispatchFunction, ExpertsFunction, QueryFunction, RoutingFunction
from .kernels.dispatch import routing_bwd_fused_ok

SEED_RANGE = 2**31 - 1


def needs_grad(layer, feats: Tensor) -> bool:
    """Whether autograd will differentiate this forward."""
    return torch.is_grad_enabled() and (feats.requires_grad or any(p.requires_grad for p in layer.parameters()))


def draw_slot_seed(device) -> Tensor:
    """A slot-dropout seed, (1,) int64 on ``device``, from that device's default
    generator: no host sync, traced by torch.compile, redrawn by every replay of
    a captured CUDA graph; ``torch.manual_seed`` makes it reproducible."""
    return torch.randint(SEED_RANGE, (1,), device=device)


def forward(layer, feats: Tensor, mask: Optional[Tensor], return_weights: bool):
    """feats (B, N, Din) checked by the layer; mask (B, N) bool or None."""
    _launch.check_device(feats)
    p = layer.params()
    dtype = compute_dtype(feats)
    acc = _launch.acc_dtype(dtype)
    grad = needs_grad(layer, feats)
    bsz, n, din = feats.shape
    legacy = _launch.legacy_plan()  # the kernel plan of this forward; its backward follows it
    drop = None
    if layer.training and layer.slot_dropout > 0:
        drop = (draw_slot_seed(feats.device), float(layer.slot_dropout))

    x = feats.to(dtype).reshape(bsz * n, din)
    weight = p.wq_weight.to(dtype)
    if grad:
        q = QueryFunction.apply(x, weight, p.wq_bias, p.norm_gamma, p.norm_beta, p.use_layernorm)
    else:
        q, _, _, _ = query_forward(x, weight, p.wq_bias, p.norm_gamma, p.norm_beta, p.use_layernorm)
    q = q.view(bsz, n, -1)  # (B, N, C)
    k = reference.slot_keys(p, acc).contiguous()  # (H, P, dh): P * dh values, plain PyTorch
    lora = (p.shared_weight, p.shared_bias, p.expert_weights, p.expert_bias, p.expert_gamma)
    dropout = layer.expert_heads.dropout.p if layer.training else 0.0
    if grad and not layer.keep_slots and not legacy and routing_bwd_fused_ok(k.shape[1], k.shape[2],
                                                                             layer.dim // k.shape[0], dtype):
        # one Function for dispatch, experts and combine: its backward fuses their routing gradients
        out, lse_d = RoutingFunction.apply(q, k, mask, drop, dtype, dropout, *lora)
    else:
        out, lse_d = _chain(layer, q, k, mask, drop, lora, dropout, dtype, grad, legacy)
    if not return_weights:
        return out
    return out, dispatch_weights(q, k, lse_d, mask, drop, layer.num_experts, dtype, legacy)


def _chain(layer, q: Tensor, k: Tensor, mask: Optional[Tensor], drop, lora, dropout: float, dtype: torch.dtype,
           grad: bool, legacy: bool):
    """Dispatch, experts, Y's dropout and (keep_slots=False) combine, one
    Function each under autograd: -> out, LSE_d."""
    if grad:
        z, lse_d = DispatchFunction.apply(q, k, mask, drop, legacy)  # (B, H, P, dh), (B, H, P)
        y = ExpertsFunction.apply(z, *lora)  # (B, P, D)
    else:
        z, lse_d = dispatch_forward(q, k, mask, drop, legacy)
        y = experts_forward(z, *lora)[0]
    if dropout > 0:  # (B, P, D): small, plain PyTorch
        y = y * (torch.rand_like(y) >= dropout) / (1.0 - dropout)
    if layer.keep_slots:
        out = y.to(dtype)
    elif grad:
        out = CombineFunction.apply(q, k, y, mask, drop, dtype, legacy)
    else:
        out, _ = combine_forward(q, k, y, mask, dtype, drop, legacy)
    return out, lse_d


def dispatch_weights(q: Tensor, k: Tensor, lse: Tensor, mask: Optional[Tensor], drop, num_experts: int,
                     dtype: torch.dtype, legacy: bool = False) -> Tensor:
    """The dispatch weights (B, N, E, H, S), N x H x P by definition: exp(L - LSE)
    from the saved LSE; under autograd, a softmax that autograd differentiates
    (the LSE carries no gradient)."""
    bsz, n, _ = q.shape
    h, p, _ = k.shape
    with torch.autocast(q.device.type, enabled=False):  # logits in the LSE's precision
        logits = reference.routing_logits(q.to(k.dtype), k)  # (B, N, H, P)
    keep = None if drop is None else slot_keep_mask(drop[0], drop[1], bsz, n, h, p, q.device, fast_rng=not legacy)
    if mask is not None:
        pad_keep = mask[:, :, None, None].expand_as(logits)
        keep = pad_keep if keep is None else keep & pad_keep
    if torch.is_grad_enabled() and logits.requires_grad:
        dw = reference.dispatch_weights(logits, keep)
    else:
        dw = torch.exp(logits - lse[:, None])
        if keep is not None:
            dw = dw * keep
    return reference.dispatch_layout(dw.to(dtype), num_experts)
