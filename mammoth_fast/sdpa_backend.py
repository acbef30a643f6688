"""The sdpa backend: dispatch and combine as ``torch.nn.functional.scaled_dot_product_attention``

    feats -> query -> q (B, N, C) -> dispatch -> Z (B, H, P, dh) -> experts -> Y (B, P, D)
                                  \\____________ combine (keep_slots=False) ________/-> out (B, N, D)

Dispatch is attention with the slot keys K[h] as queries and q[b, :, h] as keys
and values (softmax over the bag n); combine has q as queries, K as keys and
Y viewed per head as values (softmax over the slots p); both unscaled. The
query, the slot keys and the experts are the reference's plain PyTorch.

Memory stays O(N * C + P * D), forward and backward, because SDPA takes its
fused path (on CPU the flash kernel, which streams the softmax): in torch 2.13
that path accepts bool and float masks, including the broadcast (B, 1, 1, N)
padding mask used here, but needs equal query/key and value head widths, else
it silently falls back to the math path that materializes N x H x P weights.
Combine therefore zero-pads q and K (dh wide) and Y (do wide) to one width:
the logits are unchanged, and the padded output columns are dropped.

Two cases hold N x H x P values by definition: slot dropout in training (the
(B, N, H, P) keep-mask, drawn by the layer as the eager path draws it, becomes
SDPA's attn_mask, which SDPA turns into an additive float mask of that size and
saves for backward; the attention itself stays fused), and ``return_weights=True``
(the dispatch weights, computed explicitly as the eager path does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from . import reference
from .dtypes import compute_dtype


def forward(layer, feats: Tensor, mask: Optional[Tensor], return_weights: bool):
    """feats (B, N, Din) checked by the layer; mask (B, N) bool or None."""
    p = layer.params()
    dtype = compute_dtype(feats)
    acc = torch.promote_types(dtype, torch.float32)
    slot_keep, y_keep = layer._draw_keep_masks(feats)  # (B, N, H, P) with slot dropout only; (B, P, D)
    keep_d, keep_c = attention_masks(slot_keep, mask)

    q = reference.query(feats, p).to(dtype)  # (B, N, C)
    k_acc = reference.slot_keys(p, acc)  # (H, P, dh)
    k = k_acc.to(dtype)
    z = dispatch(q, k, keep_d)  # (B, H, P, dh)
    y = reference.experts(z, p, y_keep, layer.expert_heads.dropout.p).to(dtype)  # (B, P, D)
    if layer.keep_slots:
        out = y
    else:
        out = combine(q, k, y, keep_c)  # (B, N, D)
        if mask is not None:
            out = out.masked_fill(~mask[:, :, None], 0.0)
    if not return_weights:
        return out
    return out, dispatch_weights(q.to(acc), k_acc, keep_d, layer.num_experts).to(dtype)


def attention_masks(slot_keep: Optional[Tensor], mask: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """SDPA's bool attn_masks (True = attend) for dispatch, broadcast to (B, H, P, N),
    and combine, (B, H, N, P). Padding alone is the O(N) mask (B, 1, 1, N) for
    dispatch and none for combine (padded queries are zeroed afterwards)."""
    pad = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
    if slot_keep is None:
        return pad, None
    keep_d = rearrange(slot_keep, "b n h p -> b h p n")  # (B, H, P, N), a view
    if pad is not None:
        keep_d = keep_d & pad
    return keep_d, rearrange(slot_keep, "b n h p -> b h n p")


def dispatch(q: Tensor, k: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Z[b, h, p, :] = sum_n softmax_n(K[h, p] . q[b, n, h]) q[b, n, h, :]: slots
    as queries, patches as keys and values. A slot that ``keep`` removes for every
    patch gets Z = 0 (SDPA's fully masked row), as SPEC section 3 defines."""
    qh = rearrange(q, "b n (h d) -> b h n d", h=k.shape[0])  # (B, H, N, dh)
    kb = k.expand(q.shape[0], *k.shape)  # (B, H, P, dh)
    return F.scaled_dot_product_attention(kb, qh, qh, attn_mask=keep, scale=1.0)  # (B, H, P, dh)


def combine(q: Tensor, k: Tensor, y: Tensor, keep: Optional[Tensor]) -> Tensor:
    """out[b, n, h*do:(h+1)*do] = sum_p softmax_p(q[b, n, h] . K[h, p]) Y[b, p, h*do:(h+1)*do]:
    patches as queries, slots as keys, Y per head as values; -> (B, N, D)."""
    h = k.shape[0]
    qh = rearrange(q, "b n (h d) -> b h n d", h=h)  # (B, H, N, dh)
    yh = rearrange(y, "b p (h o) -> b h p o", h=h)  # (B, H, P, do)
    width = max(qh.shape[-1], yh.shape[-1])  # one head width keeps the fused path
    kb = pad_last(k, width).expand(q.shape[0], -1, -1, -1)  # (B, H, P, width)
    out = F.scaled_dot_product_attention(pad_last(qh, width), kb, pad_last(yh, width), attn_mask=keep, scale=1.0)
    return rearrange(out[..., : yh.shape[-1]], "b h n o -> b n (h o)")  # (B, N, D)


def pad_last(x: Tensor, width: int) -> Tensor:
    """x zero-padded on the right of its last axis to ``width`` (x itself if that wide)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def dispatch_weights(q: Tensor, k: Tensor, keep: Optional[Tensor], num_experts: int) -> Tensor:
    """The dispatch weights (B, N, E, H, S), N x H x P by definition, computed as
    the eager path does (differentiable); ``keep`` is dispatch's attn_mask."""
    logits = reference.routing_logits(q, k)  # (B, N, H, P)
    keep = None if keep is None else rearrange(keep, "b h p n -> b n h p")  # broadcasts to the logits
    return reference.dispatch_layout(reference.dispatch_weights(logits, keep), num_experts)
