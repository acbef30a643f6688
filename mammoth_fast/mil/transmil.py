"""TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple
Instance Learning for Whole Slide Image Classification", NeurIPS 2021).

    tokens -> square grid (s = ceil(sqrt(n)), the first s*s - n tokens repeated)
           -> [cls; grid] -> Nystrom layer -> PPEG on the grid -> Nystrom layer(s)
           -> LayerNorm -> cls -> classifier

Padding: each bag's real tokens are moved to the front (in order) and the bag
gets its own grid side s_b and sequence length 1 + s_b^2; the Nystrom layers
mask everything past it (nystrom.py), and PPEG convolves each bag's s_b x s_b
grid in the top-left corner of a zero canvas, which is exactly the zero-padded
convolution of that grid alone. A bag therefore gives the same output alone or
in a padded batch.
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
    """Pyramid position encoding generator: grid + 7x7, 5x5 and 3x3 depthwise convolutions of it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, grid: Tensor) -> Tensor:  # (B, D, S, S)
        return grid + sum(conv(grid) for conv in self.convs)


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom attention."""

    def __init__(self, dim: int, heads: int, num_landmarks: int, pinv_iterations: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, num_landmarks, pinv_iterations, dropout=dropout)

    def forward(self, x, lengths, return_first_row=False):
        out, row = self.attn(self.norm(x), lengths, return_first_row)
        return x + out, row


class TransMIL(MILModel):
    """'attention': the cls token's Nystrom attention row in the last layer,
    averaged over heads, with a token's grid copies summed (B, T); an
    approximation of softmax attention, so rows need not sum to exactly 1."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_layers: int = 2,
                 num_heads: int = 8, num_landmarks: int = 256, pinv_iterations: int = 6, attn_dropout: float = 0.1,
                 dropout: float = 0.25, moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.layers = nn.ModuleList(
            TransLayer(embed_dim, num_heads, num_landmarks, pinv_iterations, attn_dropout) for _ in range(num_layers)
        )
        self.pos = PPEG(embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        bsz, t, d = x.shape
        dev = x.device
        if mask is None:
            n = torch.full((bsz,), t, device=dev)
            order = torch.arange(t, device=dev).expand(bsz, t)
        else:
            n = mask.sum(dim=1)
            order = torch.argsort(~mask, dim=1, stable=True)  # (B, T): real tokens first, in order
        side = torch.ceil(torch.sqrt(n.double())).long()  # (B,)
        g = int(side.max())
        cell = torch.arange(g * g, device=dev)
        on_grid = cell < (side * side)[:, None]  # (B, g*g): cell j of bag b's s_b x s_b grid, row-major
        src = torch.gather(order, 1, cell % n[:, None])  # (B, g*g): token index at grid cell j
        tokens = torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, d)) * on_grid.unsqueeze(-1)
        seq = torch.cat([self.cls_token.expand(bsz, -1, -1), tokens], dim=1)  # (B, 1 + g*g, D)
        lengths = 1 + side * side

        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            seq, row = layer(seq, lengths, return_first_row=return_attention and i == last)
            if i == 0:
                seq = torch.cat([seq[:, :1], self._ppeg(seq[:, 1:], side, on_grid)], dim=1)
        out = {"logits": self.classifier(self.norm(seq[:, 0]))}
        if return_attention:
            out["attention"] = x.new_zeros(bsz, t).scatter_add_(1, src, row[:, 1:] * on_grid)
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
        canvas = self.pos(rearrange(canvas, "b (r c) d -> b d r c", r=g))
        canvas = rearrange(canvas, "b d r c -> b (r c) d")
        return torch.gather(canvas, 1, to_grid.unsqueeze(-1).expand(-1, -1, d)) * on_grid.unsqueeze(-1)
