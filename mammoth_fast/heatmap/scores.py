"""Per-patch scores of one slide: each Mammoth expert's share of the patch's
dispatch weight, the aggregator's attention brought to the patches, and the
slide's prediction.

Expert scores, as the authors' routing pictures define them (FORMATS.md): the
dispatch weights Dw (N, E, H, S) are a softmax over the bag's N patches per
(expert, head, slot); each patch's weights are normalized over (E, H, S) and an
expert's score is the sum over its heads and slots, so a patch's scores sum to 1.

The whole slide's Dw (N x E x H x S values: 960M at N = 200k with the
recommended sizes) is never held at once. Two passes over chunks of patches:
pass 1 streams the per-slot log-sum-exp of the routing logits over all N,
pass 2 recomputes each chunk's logits, subtracts it (log Dw) and normalizes per
patch after subtracting the patch's largest log Dw, which stays finite where
all of a patch's weights underflow in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .. import reference
from ..layer import Mammoth

CHUNK_ELEMENTS = 1 << 24  # logits held per chunk (64 MB in float32)


def mammoth_layer(net: nn.Module) -> Optional[Mammoth]:
    """The model's Mammoth patch embedding, or None (a model without Mammoth)."""
    embed = getattr(net, "patch_embed", None)
    return embed if isinstance(embed, Mammoth) else None


def default_chunk(layer: Mammoth) -> int:
    """Patches per chunk: CHUNK_ELEMENTS logits, H * E * S per patch."""
    return max(1, CHUNK_ELEMENTS // (layer.num_heads * layer.num_experts * layer.num_slots))


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    return (slice(i, min(i + chunk, n)) for i in range(0, n, chunk))


class _Router:
    """The layer's routing logits for chunks of patches, in the layer's dtype and on its device."""

    def __init__(self, layer: Mammoth):
        self.params = layer.params()
        self.keys = reference.slot_keys(self.params)  # (H, P, dh)
        self.weight = self.params.wq_weight

    def logits(self, feats: Tensor) -> Tensor:
        """feats (n, Din) on any device -> L (n, H, P)."""
        x = feats.to(self.weight.device, self.weight.dtype, non_blocking=True)
        q = reference.query(x.unsqueeze(0), self.params)  # (1, n, C)
        return reference.routing_logits(q, self.keys)[0]  # (n, H, P)


def _check(layer: Mammoth, feats: Tensor, chunk: Optional[int]) -> int:
    if feats.dim() != 2 or feats.shape[1] != layer.input_dim or feats.shape[0] == 0:
        raise ValueError(f"expert scores: feats must be (N >= 1, {layer.input_dim}), got {tuple(feats.shape)}")
    chunk = default_chunk(layer) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"expert scores: chunk must be >= 1, got {chunk}")
    return chunk


@torch.no_grad()
def dispatch_lse(layer: Mammoth, feats: Tensor, chunk: Optional[int] = None) -> Tensor:
    """log sum_n exp(L[n, h, p]) over all N patches, (H, P), streamed over chunks (pass 1)."""
    chunk = _check(layer, feats, chunk)
    router = _Router(layer)
    lse = None
    for rows in _chunks(feats.shape[0], chunk):
        part = torch.logsumexp(router.logits(feats[rows]), dim=0)  # (H, P)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return lse


@torch.no_grad()
def routing_scores(layer: Mammoth, feats: Tensor, slot_attention: Optional[Tensor] = None,
                   chunk: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Expert scores (N, E) of the patches feats (N, Din) and, given attention
    over the layer's slot tokens ``slot_attention`` (E * S,) (an aggregator's
    under keep_slots), that attention brought to the patches (N,):
    a_n = sum_p a_p * mean_h Dw[n, h, p], which sums to 1 over the patches when
    a does over the slots. Eval-mode routing (no slot dropout); the layer's dtype
    and device, ``chunk`` patches at a time (default :func:`default_chunk`);
    results on the CPU."""
    chunk = _check(layer, feats, chunk)
    lse = dispatch_lse(layer, feats, chunk)  # (H, P)
    router = _Router(layer)
    heads, experts, slots = layer.num_heads, layer.num_experts, layer.num_slots
    a = None if slot_attention is None else slot_attention.to(lse.device, lse.dtype).reshape(experts * slots)
    scores, attention = [], []
    for rows in _chunks(feats.shape[0], chunk):
        log_dw = router.logits(feats[rows]).sub_(lse)  # (n, H, P) log Dw
        top = log_dw.amax(dim=(1, 2), keepdim=True)  # (n, 1, 1) each patch's largest
        w = log_dw.sub_(top).exp_()  # (n, H, P) Dw / exp(top): finite where Dw underflows
        per_expert = w.view(-1, heads, experts, slots).sum(dim=(1, 3))  # (n, E)
        scores.append((per_expert / per_expert.sum(dim=1, keepdim=True)).cpu())  # normalized over (E, H, S)
        if a is not None:
            attention.append((torch.einsum("nhp,p->n", w, a) * top.view(-1).exp() / heads).cpu())  # (n,)
    return torch.cat(scores), (torch.cat(attention) if a is not None else None)


def expert_scores(layer: Mammoth, feats: Tensor, chunk: Optional[int] = None) -> Tensor:
    """Each expert's score per patch, (N, E), computed in chunks (:func:`routing_scores`)."""
    return routing_scores(layer, feats, None, chunk)[0]


def scores_from_weights(weights: Tensor) -> Tensor:
    """The same scores from whole dispatch weights (1, N, E, H, S) or (N, E, H, S)
    as ``Mammoth(..., return_weights=True)`` returns them: normalized per patch
    over (E, H, S), summed over H and S -> (N, E). Holds all N x E x H x S values:
    for small bags and tests."""
    w = weights[0] if weights.dim() == 5 else weights  # (N, E, H, S)
    return (w / w.sum(dim=(1, 2, 3), keepdim=True)).sum(dim=(2, 3))


@dataclass
class SlideScores:
    """One slide's prediction and per-patch scores."""
    logits: np.ndarray  # (C,) float32
    probs: np.ndarray  # (C,) float32
    predicted: int  # the class of highest probability
    experts: Optional[np.ndarray]  # (N, E) float32; None without Mammoth
    attention: Optional[np.ndarray]  # (N,) float32 per patch; None where the model has none per patch
    attention_note: str  # what 'attention' is, or why there is none


def _attention_source(net: nn.Module, attention: Optional[Tensor], predicted: int, n: int,
                      layer: Optional[Mammoth]) -> Tuple[Optional[Tensor], Optional[Tensor], str]:
    """(per-patch attention (N,) or None, attention over the slots (E*S,) to bring
    to the patches or None, a note) from the model's 'attention' of one bag."""
    name = type(net).__name__
    if attention is None:
        return None, None, f"{name} returns no attention"
    a = attention[0].float()  # (T,), or (C, T) per class
    note = ""
    if a.dim() == 2:
        a = a[predicted]
        note = f"the predicted class's row of {name}'s per-class attention; "
    tokens = a.shape[-1]
    if layer is not None and layer.keep_slots:
        if tokens == layer.num_experts * layer.num_slots:
            return None, a, note + (f"{name}'s attention over Mammoth's E*S slot tokens, brought to the patches "
                                    "through the dispatch weights: sum_p a_p * mean_h Dw[n, h, p]")
        return None, None, (f"{name}'s attention is over {tokens} tokens (not Mammoth's "
                            f"{layer.num_experts * layer.num_slots} slots): no per-patch attention")
    if tokens == n:
        return a, None, note + f"{name}'s attention over the patches"
    return None, None, f"{name}'s attention is over {tokens} tokens, not the {n} patches: no per-patch attention"


@torch.no_grad()
def score_slide(net: nn.Module, feats: Tensor, chunk: Optional[int] = None) -> SlideScores:
    """The model (eval mode) on one bag feats (N, in_dim): its prediction, the
    expert scores (Mammoth models) and the per-patch attention where defined:
    over the patches directly; per class (DSMIL): the predicted class's; over
    Mammoth's slots (keep_slots): brought to the patches by :func:`routing_scores`;
    over other tokens (DTFD's pseudo-bag slots, RRT's multi-scale tokens): none."""
    param = next(net.parameters())
    out = net(feats.to(param.device, param.dtype).unsqueeze(0), return_attention=True)
    logits = out["logits"][0].float()  # (C,)
    predicted = int(logits.argmax())
    layer = mammoth_layer(net)
    direct, slot_attention, note = _attention_source(net, out.get("attention"), predicted, feats.shape[0], layer)
    experts = attention = None
    if layer is not None:
        experts, attention = routing_scores(layer, feats, slot_attention, chunk)
    if direct is not None:
        attention = direct
    as_numpy = lambda t: None if t is None else t.float().cpu().numpy()  # noqa: E731
    return SlideScores(logits.cpu().numpy(), logits.softmax(-1).cpu().numpy(), predicted, as_numpy(experts),
                       as_numpy(attention), note)
