"""Transformer MIL: a class token and standard pre-norm transformer encoder
layers over the tokens, as the authors' MIL-Lab ``transformer``.

    [cls; tokens] -> num_layers x (x + MHA(LN(x)) [+ MLP(LN(x))]) -> LN -> cls -> classifier

Exact softmax attention (torch's nn.MultiheadAttention), so it is O(T^2) in
the number of tokens: cheap on Mammoth's E*S slot tokens, heavy on raw bags of
many thousand patches. The authors' configuration has no feed-forward
sublayer (``mlp_dim=0``); ``mlp_dim > 0`` adds the usual Linear-GELU-Linear one.
Padded tokens are masked as keys, so they take no part.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .base import MILModel, make_patch_embed


class EncoderLayer(nn.Module):
    """Pre-norm residual multi-head self-attention, then an optional pre-norm residual MLP."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=attn_dropout, batch_first=True)
        if mlp_dim > 0:
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                     nn.Dropout(dropout))
        else:
            self.norm2 = self.mlp = None

    def forward(self, x: Tensor, pad: Optional[Tensor], need_weights: bool):
        """x (B, L, D), pad (B, L) True where a token is padding -> (B, L, D), and
        with need_weights the attention (B, L, L) averaged over heads."""
        y = self.norm(x)
        out, weights = self.attention(y, y, y, key_padding_mask=pad, need_weights=need_weights,
                                      average_attn_weights=True)
        x = x + out
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, weights


class TransformerMIL(MILModel):
    """'attention': the class token's attention over the tokens in the last
    layer, averaged over heads (B, T); the share it keeps on itself is left
    out, so a row sums to a little less than 1."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_layers: int = 2,
                 num_heads: int = 8, mlp_dim: int = 0, attn_dropout: float = 0.25, dropout: float = 0.25,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        if num_layers < 1:
            raise ValueError(f"TransformerMIL: num_layers must be >= 1, got {num_layers}")
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            EncoderLayer(embed_dim, num_heads, attn_dropout, mlp_dim, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        bsz = x.shape[0]
        seq = torch.cat([self.cls_token.expand(bsz, -1, -1), x], dim=1)  # (B, 1 + T, D)
        pad = None if mask is None else torch.cat([mask.new_zeros(bsz, 1), ~mask], dim=1)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            seq, weights = block(seq, pad, need_weights=return_attention and i == last)
        out = {"logits": self.classifier(self.norm(seq[:, 0]))}
        if return_attention:
            out["attention"] = weights[:, 0, 1:]
        return out
