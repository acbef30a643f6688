"""Transformer MIL: a class token and pre-norm transformer encoder layers over
the tokens, as the authors' MIL-Lab ``transformer`` (same module names, config
keys and computation).

    [cls; tokens] -> num_attention_layers x (x + MHA(LN(x)); x + MLP(LN2(x))) -> LN -> cls -> classifier

MHA is torch's nn.MultiheadAttention (num_heads, attention dropout = dropout);
MLP is MIL-Lab's create_mlp(end_with_fc=False): Linear(D, encoder_mlp_dim), ReLU,
Dropout(dropout), Linear(encoder_mlp_dim, D), ReLU (the authors' configs have
encoder_mlp_dim 2048; <= 0 leaves the MLP and LN2 out, as their class default
-1). Exact softmax attention, so O(T^2) in the number of tokens: cheap on
Mammoth's E*S slot tokens, heavy on raw bags of many thousand patches. Padded
tokens are masked as keys, so they take no part.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .base import MILModel, make_patch_embed, mlp


class TransLayer(nn.Module):
    """MIL-Lab's transformer TransLayer: pre-norm residual multi-head self-attention,
    then (mlp_dim > 0) a pre-norm residual ReLU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float, mlp_dim: Optional[int]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        if mlp_dim is not None and mlp_dim > 0:
            self.mlp = mlp(dim, [mlp_dim], dim, dropout)
            self.norm2 = nn.LayerNorm(dim)
        else:
            self.mlp = self.norm2 = None

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
    """MIL-Lab's Transformer. 'attention' (B, T): the class token's row of the
    first layer's attention (MIL-Lab returns that layer's whole matrix), averaged
    over heads, without its share on itself (a row sums to a little less than 1)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, num_attention_layers: int = 2, num_heads: int = 8,
                 encoder_mlp_dim: Optional[int] = -1, moe_args: Optional[dict] = None) -> None:
        mammoth = bool(moe_args) and moe_args.get("num_experts", 0) > 0
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         None if mammoth else make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        if num_attention_layers < 1:
            raise ValueError(f"TransformerMIL: num_attention_layers must be >= 1, got {num_attention_layers}")
        # MIL-Lab's construction order (their initial weights for a given seed)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            TransLayer(embed_dim, num_heads, dropout, encoder_mlp_dim) for _ in range(num_attention_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        bsz = x.shape[0]
        seq = torch.cat([self.cls_token.expand(bsz, -1, -1), x], dim=1)  # (B, 1 + T, D)
        pad = None if mask is None else torch.cat([mask.new_zeros(bsz, 1), ~mask], dim=1)
        out = {}
        for i, block in enumerate(self.blocks):
            seq, weights = block(seq, pad, need_weights=return_attention and i == 0)
            if weights is not None:
                out["attention"] = weights[:, 0, 1:]  # (B, T)
        out["logits"] = self.classifier(self.norm(seq[:, 0]))
        return out
