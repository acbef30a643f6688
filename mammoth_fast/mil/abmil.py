"""ABMIL: gated attention pooling (Ilse et al., "Attention-based Deep Multiple
Instance Learning", ICML 2018), as MIL-Lab builds it (same module names)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import global_attention
from .base import MILModel, make_patch_embed, masked_softmax


class ABMIL(MILModel):
    """patch_embed (num_fc_layers Linear + ReLU, or Mammoth), gated (``gate``) or plain
    attention over the tokens, linear classifier. 'attention': the softmax weights
    (B, T), zero on padding."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attn_dim: int = 384,
                 num_fc_layers: int = 1, dropout: float = 0.25, gate: bool = True,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        self.global_attn = global_attention(gate, embed_dim, attn_dim, dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        a = masked_softmax(self.global_attn(x).squeeze(-1), mask, dim=-1)  # (B, T)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", a, x))}
        if return_attention:
            out["attention"] = a
        return out
