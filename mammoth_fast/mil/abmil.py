"""ABMIL: gated attention pooling (Ilse et al., "Attention-based Deep Multiple
Instance Learning", ICML 2018)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .base import MILModel, masked_softmax


class GatedAttention(nn.Module):
    """One score per token: w^T (tanh(V x) * sigmoid(U x))."""

    def __init__(self, dim: int, attn_dim: int, dropout: float) -> None:
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T)
        return self.w(self.v(x) * self.u(x)).squeeze(-1)


class ABMIL(MILModel):
    """patch_embed, gated attention over the tokens, linear classifier.
    'attention': the softmax weights (B, T), zero on padding."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attn_dim: int = 384,
                 dropout: float = 0.25, moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, dropout, moe_args)
        self.attention = GatedAttention(embed_dim, attn_dim, dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        a = masked_softmax(self.attention(x), mask, dim=-1)  # (B, T)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", a, x))}
        if return_attention:
            out["attention"] = a
        return out
