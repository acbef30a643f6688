"""MeanMIL and MaxMIL (ours; MIL-Lab has none): patch_embed (Linear + ReLU as MIL-Lab's
models, or Mammoth), mean or max over the tokens, linear classifier."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import MILModel, make_patch_embed


class MeanMIL(MILModel):
    """Mean over the real tokens. 'attention': the uniform weights (B, T)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        w = x.new_ones(x.shape[:2]) if mask is None else mask.to(x.dtype)
        w = w / w.sum(dim=1, keepdim=True)  # (B, T)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", w, x))}
        if return_attention:
            out["attention"] = w
        return out


class MaxMIL(MILModel):
    """Channel-wise max over the real tokens. 'attention': the share of the D
    channels whose max each token holds (B, T)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled, winner = x.max(dim=1)  # (B, D), (B, D) token index
        out = {"logits": self.classifier(pooled)}
        if return_attention:
            share = torch.full(winner.shape, 1.0 / x.shape[-1], dtype=x.dtype, device=x.device)
            out["attention"] = x.new_zeros(x.shape[:2]).scatter_add_(1, winner, share)
        return out
