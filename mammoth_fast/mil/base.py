"""What every MIL model here shares: the patch embedding (Linear + ReLU, or
Mammoth), the input checks, and one forward signature and output dict.

    h (B, M, in_dim) -> patch_embed -> x (B, T, D) -> aggregate -> logits (B, num_classes)

T = M patches, or T = E*S slot tokens when Mammoth keeps its slots (then no
token is padding and the aggregator gets mask=None). A subclass implements
``aggregate`` (and ``losses`` when its loss is not ``loss_fn(logits, label)``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import packing
from ..host_reads import host_reads_allowed
from ..layer import Mammoth


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0, end_with_act: bool = True,
        act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """MIL-Lab's create_mlp: (Linear, act, Dropout) per hidden width, then Linear (and
    act when end_with_act). Module indices are theirs, so their keys load."""
    layers: List[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), act(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    if end_with_act:
        layers.append(act())
    return nn.Sequential(*layers)


def make_patch_embed(in_dim: int, embed_dim: int, moe_args: Optional[dict], num_fc_layers: int = 1,
                     dropout: float = 0.0) -> nn.Module:
    """Mammoth(input_dim=in_dim, dim=embed_dim, **moe_args) when moe_args holds
    num_experts > 0, else MIL-Lab's patch MLP: num_fc_layers Linear + ReLU layers
    (Dropout between them, none after the last). moe_args may repeat input_dim and
    dim (as the authors' examples do) if they agree."""
    if not moe_args or moe_args.get("num_experts", 0) <= 0:
        return mlp(in_dim, [embed_dim] * (num_fc_layers - 1), embed_dim, dropout)
    args = dict(moe_args)
    for key, value in (("input_dim", in_dim), ("dim", embed_dim)):
        if args.pop(key, value) != value:
            raise ValueError(f"moe_args[{key!r}] = {moe_args[key]} contradicts the model's {value}")
    return Mammoth(input_dim=in_dim, dim=embed_dim, **args)


def masked_softmax(scores: Tensor, mask: Optional[Tensor], dim: int) -> Tensor:
    """Softmax over ``dim`` with -inf where ``mask`` (broadcastable bool) is False."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim)


def safe_masked_softmax(scores: Tensor, mask: Tensor, dim: int) -> Tensor:
    """masked_softmax that gives all-zero weights (and zero gradients) where
    every entry along ``dim`` is masked, e.g. a region or pseudo-bag holding no
    real token, instead of NaN. ``scores`` and ``mask`` broadcast together."""
    scores, mask = torch.broadcast_tensors(scores, mask)
    empty = ~mask.any(dim=dim, keepdim=True)
    weights = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0).softmax(dim)
    return weights.masked_fill(empty, 0.0)


class MILModel(nn.Module):
    """Base of the MIL models: ``patch_embed`` then the subclass's aggregator.

    forward(h, mask=None, label=None, loss_fn=None, return_attention=False,
    return_moe_weights=False, cu_seqlens=None, max_seqlen=None) -> dict:
      h      (B, M, in_dim) or (M, in_dim) (B = 1)
      mask   (B, M) or (M,) bool, False for padded patches: they take no part
             anywhere, so bags of different sizes can share a batch
      cu_seqlens  (B + 1,) int32/int64 offsets of B bags packed along the rows
             of h (total_N, in_dim), as Mammoth takes them (``mammoth_fast.packing``);
             the bags are padded to the longest (or to max_seqlen) with a mask
             on entry, so 'attention' over patches is (B, max_len), zero on
             padding, and 'moe_weights' comes back packed (total_N, E, H, S)
      label  (B,) class indices; with loss_fn (e.g. nn.CrossEntropyLoss()) adds 'loss'
    The dict holds 'logits' (B, num_classes); 'loss' and any named auxiliary
    loss when asked; 'attention' (over the aggregator's T tokens: patches, or
    slots under keep_slots) with return_attention; 'moe_weights' (Mammoth's
    dispatch weights (B, M, E, H, S), None without Mammoth) with return_moe_weights.
    """

    slide_head = "classifier"  # the submodule whose input is the slide-level feature

    def __init__(self, in_dim: int, embed_dim: int, num_classes: int, moe_args: Optional[dict],
                 patch_embed: Optional[nn.Module] = None) -> None:
        """patch_embed: the Linear path's module when it is not make_patch_embed's
        default (one Linear + ReLU); Mammoth whenever moe_args has experts."""
        super().__init__()
        self.in_dim, self.embed_dim, self.num_classes = in_dim, embed_dim, num_classes
        mammoth = moe_args and moe_args.get("num_experts", 0) > 0
        self.patch_embed = make_patch_embed(in_dim, embed_dim, moe_args) if mammoth or patch_embed is None \
            else patch_embed

    def forward(self, h: Tensor, mask: Optional[Tensor] = None, label: Optional[Tensor] = None,
                loss_fn: Optional[Callable] = None, return_attention: bool = False,
                return_moe_weights: bool = False, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> dict:
        layout = packing.packed_layout(type(self).__name__, h, mask, cu_seqlens, max_seqlen)
        if layout is not None:
            h, mask = packing.pad_packed(h, layout)
        h, mask = self._check_input(h, mask)
        x, mask, moe_weights = self.embed(h, mask, return_moe_weights)
        out = self.aggregate(x, mask, label, return_attention)
        if label is not None and loss_fn is not None:
            out.update(self.losses(out, label, loss_fn))
        if return_moe_weights:
            out["moe_weights"] = moe_weights if layout is None or moe_weights is None else \
                packing.unpad(moe_weights, layout)
        return out

    def initialize_weights(self) -> None:
        """MIL-Lab's initialization, which their models run at the end of __init__: every
        nn.Linear (Mammoth's query projection included) kaiming-uniform for ReLU with zero
        bias, LayerNorm and BatchNorm ones and zeros."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, h: Tensor, mask: Optional[Tensor],
              return_moe_weights: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """h (B, M, in_dim) -> tokens (B, T, D), their mask (None: all real), dispatch weights."""
        weights = None
        if isinstance(self.patch_embed, Mammoth):
            x = self.patch_embed(h, return_weights=return_moe_weights, mask=mask)
            if return_moe_weights:
                x, weights = x
            if self.patch_embed.keep_slots:
                return x, None, weights  # (B, E*S, D): Mammoth consumed the mask
        else:
            x = self.patch_embed(h)
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding content cannot leak
        return x, mask, weights

    def aggregate(self, x: Tensor, mask: Optional[Tensor], label: Optional[Tensor],
                  return_attention: bool) -> dict:
        """x (B, T, D), mask (B, T) or None -> dict with 'logits' (B, num_classes),
        'attention' when asked, and any auxiliary loss computable from the label."""
        raise NotImplementedError

    def losses(self, out: dict, label: Tensor, loss_fn: Callable) -> dict:
        return {"loss": loss_fn(out["logits"], label)}

    def _check_input(self, h: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        name = type(self).__name__
        if not isinstance(h, Tensor) or h.dim() not in (2, 3) or h.shape[-1] != self.in_dim:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"{name}: h must be (B, M, {self.in_dim}) or (M, {self.in_dim}), got {got}")
        if h.dim() == 2:
            h = h.unsqueeze(0)
        if h.shape[1] == 0:
            raise ValueError(f"{name}: empty bag (M = 0 patches)")
        if mask is None:
            return h, None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name}: mask must be a bool tensor")
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.shape != h.shape[:2]:
            raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match h's (B, M) = {tuple(h.shape[:2])}")
        if host_reads_allowed(mask) and not bool(mask.any(dim=1).all()):
            raise ValueError(f"{name}: a bag has no unmasked patch")
        return h, mask
