"""TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple
Instance Learning for Whole Slide Image Classification", NeurIPS 2021), as the
authors' MIL-Lab builds it (same module names, config keys and computation).

    tokens (n) -> square grid (s = ceil(sqrt(n)); the first s*s - n tokens repeated at the end)
           -> [cls; grid] -> block 0 -> PPEG on the grid -> blocks 1.. -> LayerNorm -> cls -> classifier

A block is x + NystromAttention(LayerNorm(x)) with lucidrains' layer as MIL-Lab
configures it: heads = num_heads, dim_head = embed_dim // num_heads, embed_dim // 2
landmarks, 6 pinv iterations, the value conv residual, dropout 0.1 after the
output projection (nystrom.py: the sequence of 1 + s*s tokens is zero-padded at
the front to a multiple of the landmarks, and those rows take part).

Padding: each bag's real tokens are moved to the front (in order) and the bag
gets its own grid side s_b and sequence length 1 + s_b^2 (the Nystrom layers
front-pad each sequence by its own length), and PPEG convolves each bag's
s_b x s_b grid in the top-left corner of a zero canvas, which is exactly the
zero-padded convolution of that grid alone. A bag therefore gives the same
output alone or in a padded batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .base import MILModel, make_patch_embed
from .nystrom import NystromAttention


class PPEG(nn.Module):
    """MIL-Lab's PPEG: grid + its 7x7, 5x5 and 3x3 depthwise convolutions (``proj``, ``proj1``, ``proj2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, grid: Tensor) -> Tensor:  # (B, D, S, S)
        return self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)


class TransLayer(nn.Module):
    """MIL-Lab's TransLayer: pre-norm residual Nystrom attention."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(dim, dim_head=dim // num_heads, heads=num_heads, num_landmarks=dim // 2,
                                          pinv_iterations=6, residual=True, dropout=0.1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:  # (B, L, D), (B,)
        return x + self.attention(self.norm(x), lengths)


class TransMIL(MILModel):
    """MIL-Lab's TransMIL. 'attention' (B, T) is MIL-Lab's: after block 0 (before
    PPEG), the dot product of each grid token with the cls token (unnormalized);
    a token's entry is that of its own grid cell (the repeated copies that fill
    the square are left out), zero on padding."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, num_attention_layers: int = 2, num_heads: int = 8,
                 moe_args: Optional[dict] = None) -> None:
        mammoth = bool(moe_args) and moe_args.get("num_experts", 0) > 0
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         None if mammoth else make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        # MIL-Lab's construction order (their initial weights for a given seed)
        self.pos_layer = PPEG(embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList(TransLayer(embed_dim, num_heads) for _ in range(num_attention_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        bsz, t, d = x.shape
        dev = x.device
        if mask is None:
            n = torch.full((bsz,), t, device=dev)
            order = torch.arange(t, device=dev).expand(bsz, t)
        else:
            n = mask.sum(dim=1)
            order = torch.argsort(~mask, dim=1, stable=True)  # (B, T): real tokens first, in order
        side = torch.ceil(torch.sqrt(n.double())).long()  # (B,) s_b
        g = math.isqrt(t - 1) + 1  # canvas side: ceil(sqrt(T)) >= every s_b
        cell = torch.arange(g * g, device=dev)
        on_grid = cell < (side * side)[:, None]  # (B, g*g): cell j of bag b's s_b x s_b grid, row-major
        src = torch.gather(order, 1, torch.where(on_grid, cell % n[:, None], 0))  # (B, g*g): token at cell j
        tokens = torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, d)) * on_grid.unsqueeze(-1)
        seq = torch.cat([self.cls_token.expand(bsz, -1, -1), tokens], dim=1)  # (B, 1 + g*g, D)
        lengths = 1 + side * side

        out = {}
        for i, block in enumerate(self.blocks):
            seq = block(seq, lengths)
            if i == 0:
                if return_attention:
                    scores = torch.einsum("bjd,bd->bj", seq[:, 1:t + 1], seq[:, 0])  # (B, T): cells 0..T-1
                    scores = scores.masked_fill(torch.arange(t, device=dev) >= n[:, None], 0.0)
                    out["attention"] = torch.zeros_like(scores).scatter(1, order, scores)  # cell j -> token order[j]
                seq = torch.cat([seq[:, :1], self._ppeg(seq[:, 1:], side, on_grid)], dim=1)
        out["logits"] = self.classifier(self.norm(seq[:, 0]))
        return out

    def _ppeg(self, tokens: Tensor, side: Tensor, on_grid: Tensor) -> Tensor:
        """tokens (B, g*g, D), bag b's grid its first s_b^2 -> PPEG of each bag's own grid."""
        g = math.isqrt(tokens.shape[1])
        s = side[:, None]
        cell = torch.arange(g * g, device=tokens.device)
        row, col = cell // g, cell % g  # canvas position of canvas cell c
        inside = (row < s) & (col < s)  # (B, g*g)
        to_canvas = torch.where(inside, row * s + col, 0)  # grid cell held by each canvas cell
        to_grid = torch.where(on_grid, (cell // s) * g + cell % s, 0)  # canvas cell of each grid cell
        d = tokens.shape[-1]
        canvas = torch.gather(tokens, 1, to_canvas.unsqueeze(-1).expand(-1, -1, d)) * inside.unsqueeze(-1)
        canvas = self.pos_layer(rearrange(canvas, "b (r c) d -> b d r c", r=g))
        canvas = rearrange(canvas, "b d r c -> b (r c) d")
        return torch.gather(canvas, 1, to_grid.unsqueeze(-1).expand(-1, -1, d)) * on_grid.unsqueeze(-1)
