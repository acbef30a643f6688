"""The Mammoth layer's math in plain PyTorch: the numerical oracle.

Every function takes its parameters explicitly and works in any floating dtype
(float64 included), so each stage can be checked on its own against a kernel.
The module's eager backend calls :func:`forward`; there is no second copy of
the math. Symbols follow SPEC.md section 1:

    B bags, N patches, Din input width, C slot_dim, H heads, dh = C / H,
    E experts, S slots per expert, P = E * S (slot p = e * S + s),
    D output width, do = D / H, r the low-rank width.

Canonical layouts of the intermediates (the ones the Triton kernels use):

    q  (B, N, C)        queries, head h is columns h*dh .. h*dh+dh-1
    K  (H, P, dh)       slot keys
    L  (B, N, H, P)     routing logits (no 1/sqrt(dh) scaling)
    Dw (B, N, H, P)     dispatch weights, softmax over n
    Z  (B, H, P, dh)    slot inputs
    Y  (B, P, D)        expert outputs, D laid out head-major (h*do + j)
    Cw (B, N, H, P)     combine weights, softmax over p
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

LAYERNORM_EPS = 1e-5  # F.layer_norm's default, as upstream uses it
L2NORM_EPS = 1e-8  # F.normalize's eps in upstream's RMS norms


@dataclass(frozen=True)
class MammothParams:
    """The layer's tensors, named after their state_dict keys (SPEC section 4)."""

    wq_weight: Tensor  # (C, Din)
    wq_bias: Tensor  # (C,)
    norm_gamma: Tensor  # (C,)
    norm_beta: Optional[Tensor]  # (C,) zeros buffer, LayerNorm only
    slot_embeds: Tensor  # (E, H, S, dh)
    slot_gamma: Tensor  # (dh,)
    slot_beta: Optional[Tensor]  # (dh,) zeros buffer, LayerNorm only
    shared_weight: Tensor  # A: (H, dh, r), or (E, H, dh, r) unshared
    shared_bias: Tensor  # a: (H, r), or (E, H, r) unshared
    expert_weights: Tensor  # Bw: (E, H, r, do)
    expert_bias: Tensor  # c: (E, H, do)
    expert_gamma: Tensor  # g: (E, D)
    use_layernorm: bool

    @property
    def num_experts(self) -> int:
        return self.slot_embeds.shape[0]

    @property
    def num_heads(self) -> int:
        return self.slot_embeds.shape[1]

    @property
    def num_slots(self) -> int:
        return self.slot_embeds.shape[2]

    @property
    def share_lora_weights(self) -> bool:
        return self.shared_weight.dim() == 3

    def to(self, dtype: torch.dtype) -> "MammothParams":
        """A copy with every tensor cast to ``dtype`` (e.g. float64 for the oracle)."""
        cast = {
            k: (v.to(dtype) if isinstance(v, Tensor) else v)
            for k, v in self.__dict__.items()
        }
        return MammothParams(**cast)


def norm_last(x: Tensor, gamma: Tensor, beta: Optional[Tensor], use_layernorm: bool) -> Tensor:
    """The layer's row norm over the last axis: LayerNorm, or the RMS variant
    x / max(||x||, 1e-8) * sqrt(width) * gamma (SPEC section 2, step 2)."""
    if use_layernorm:
        return F.layer_norm(x, x.shape[-1:], gamma, beta, eps=LAYERNORM_EPS)
    return F.normalize(x, dim=-1, eps=L2NORM_EPS) * math.sqrt(x.shape[-1]) * gamma


def query(feats: Tensor, p: MammothParams) -> Tensor:
    """q = norm(feats @ Wq^T + bq): (B, N, Din) -> (B, N, C)."""
    return norm_last(F.linear(feats, p.wq_weight, p.wq_bias), p.norm_gamma, p.norm_beta, p.use_layernorm)


def slot_keys(p: MammothParams, dtype: Optional[torch.dtype] = None) -> Tensor:
    """K = norm_dh(slot_embeds), laid out (H, P, dh) with p = e * S + s,
    computed in ``dtype`` (default: the parameters')."""
    dtype = dtype or p.slot_embeds.dtype
    beta = None if p.slot_beta is None else p.slot_beta.to(dtype)
    k = norm_last(p.slot_embeds.to(dtype), p.slot_gamma.to(dtype), beta, p.use_layernorm)  # (E, H, S, dh)
    return rearrange(k, "e h s d -> h (e s) d")


def routing_logits(q: Tensor, k: Tensor) -> Tensor:
    """L[b, n, h, p] = q[b, n, h, :] . K[h, p, :]: -> (B, N, H, P)."""
    q4 = rearrange(q, "b n (h d) -> b n h d", h=k.shape[0])
    return torch.einsum("bnhd,hpd->bnhp", q4, k)


def _softmax(logits: Tensor, keep: Optional[Tensor], dim: int) -> Tensor:
    """Softmax along ``dim``; entries where ``keep`` is False get weight 0.
    A softmax whose entries are all dropped gives all-zero weights (not NaN)."""
    if keep is None:
        return F.softmax(logits, dim=dim)
    x = logits.masked_fill(~keep, float("-inf"))
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(x - m)
    s = e.sum(dim=dim, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def dispatch_weights(logits: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Dw: softmax of L over the bag (axis n), (B, N, H, P)."""
    return _softmax(logits, keep, dim=1)


def combine_weights(logits: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """Cw: softmax of L over the P slots of each head, (B, N, H, P)."""
    return _softmax(logits, keep, dim=-1)


def slot_inputs(q: Tensor, dw: Tensor) -> Tensor:
    """Z[b, h, p, :] = sum_n Dw[b, n, h, p] q[b, n, h, :]: -> (B, H, P, dh)."""
    q4 = rearrange(q, "b n (h d) -> b n h d", h=dw.shape[2])
    return torch.einsum("bnhp,bnhd->bhpd", dw, q4)


def experts(
    z: Tensor,
    p: MammothParams,
    y_keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Grouped low-rank experts on the slot vectors: Z (B, H, P, dh) -> Y (B, P, D).

    u = z @ A + a (per head, shared or per expert), v = u @ Bw[e] + c[e],
    expert-wise RMS norm over all D = H * do values, ReLU, then dropout with
    the explicit keep-mask ``y_keep`` (B, P, D) scaled by 1 / (1 - dropout_p).
    """
    z5 = rearrange(z, "b h (e s) d -> b e s h d", e=p.num_experts)
    if p.share_lora_weights:
        u = torch.einsum("beshd,hdr->beshr", z5, p.shared_weight) + p.shared_bias
    else:
        u = torch.einsum("beshd,ehdr->beshr", z5, p.shared_weight) + p.shared_bias[None, :, None]
    v = torch.einsum("beshr,ehro->besho", u, p.expert_weights) + p.expert_bias[None, :, None]
    v = rearrange(v, "b e s h o -> b e s (h o)")
    w = F.normalize(v, dim=-1, eps=L2NORM_EPS) * math.sqrt(v.shape[-1]) * p.expert_gamma[None, :, None]
    y = rearrange(F.relu(w), "b e s d -> b (e s) d")
    if y_keep is not None:
        y = y * y_keep / (1.0 - dropout_p)
    return y


def combine(cw: Tensor, y: Tensor) -> Tensor:
    """out[b, n, h*do:(h+1)*do] = sum_p Cw[b, n, h, p] Y[b, p, h*do:(h+1)*do]: -> (B, N, D)."""
    y4 = rearrange(y, "b p (h o) -> b h p o", h=cw.shape[2])
    return rearrange(torch.einsum("bnhp,bhpo->bnho", cw, y4), "b n h o -> b n (h o)")


def dispatch_layout(dw: Tensor, num_experts: int) -> Tensor:
    """Dw from the canonical (B, N, H, P) to upstream's (B, N, E, H, S)."""
    return rearrange(dw, "b n h (e s) -> b n e h s", e=num_experts)


def forward(
    feats: Tensor,
    p: MammothParams,
    *,
    keep_slots: bool = True,
    mask: Optional[Tensor] = None,
    slot_keep: Optional[Tensor] = None,
    y_keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    return_intermediates: bool = False,
) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
    """The whole layer on a batched input ``feats`` (B, N, Din).

    mask:      (B, N) bool, False marks padding: those patches take no part in
               dispatch and get zero output under keep_slots=False.
    slot_keep: (B, N, H, P) bool slot-dropout keep-mask on the logits (both softmaxes).
    y_keep:    (B, P, D) bool dropout keep-mask on the expert outputs.
    Returns out ((B, P, D) or (B, N, D)) and, when asked, a dict with
    q, K, L, Dw, Z, Y and (keep_slots=False) Cw in the canonical layouts.
    """
    q = query(feats, p)
    k = slot_keys(p)
    logits = routing_logits(q, k)
    keep = slot_keep
    if mask is not None:
        pad_keep = mask[:, :, None, None].expand_as(logits)
        keep = pad_keep if keep is None else keep & pad_keep
    dw = dispatch_weights(logits, keep)
    z = slot_inputs(q, dw)
    y = experts(z, p, y_keep, dropout_p)
    inter = {"q": q, "K": k, "L": logits, "Dw": dw, "Z": z, "Y": y}
    if keep_slots:
        out = y
    else:
        cw = combine_weights(logits, slot_keep)
        out = combine(cw, y)
        if mask is not None:
            out = out * mask[:, :, None].to(out.dtype)
        inter["Cw"] = cw
    if return_intermediates:
        return out, inter
    return out


def auto_rank(input_dim: int, slot_dim: int, dim: int, num_experts: int) -> int:
    """The low-rank width that makes Mammoth's parameter count match nn.Linear's
    (SPEC section 5): r = int((Din*D - Din*C) / (C + E*D) + 0.5)."""
    return int((input_dim * dim - input_dim * slot_dim) / (slot_dim + num_experts * dim) + 0.5)
