"""RRT-MIL: re-embedded regional transformer (Tang et al., "Feature
Re-Embedding: Towards Foundation Model-Level Performance in Computational
Pathology", CVPR 2024).

    tokens -> square grid -> region_num x region_num regions
           -> num_rmsa_layers x (x + R-MSA(LN(x)))   self-attention inside each region, EPEG on its logits
           -> x + CR-MSA(LN(x))                      cross-region attention between region representatives
           -> LN -> attention pooling -> classifier

Grid and regions, as the original: the grid side is ceil(sqrt(n)) rounded up
to a multiple of region_num; the n tokens fill it row-major; region (i, j) is
the i-th block row and j-th block column, of side s = side / region_num, its
cells in row-major order. There are always region_num^2 regions, so small bags
(or Mammoth's E*S slot tokens) get small regions (s = 1 below region_num^2
tokens). The cells past the n tokens are padding; unlike the original, which
fills them with zero tokens that take part in attention, they are masked: no
token attends to them, they give no region representative, and an all-padding
region takes no part in CR-MSA.

R-MSA: multi-head self-attention within each region; EPEG (embedded position
encoding generator) adds a depthwise (epeg_k x 1) convolution of each head's
attention logits along the query axis (padding query rows zeroed first, which
is the convolution's zero padding), epeg_k = 0 turns it off.

CR-MSA: per region, crmsa_k representatives, each a softmax (over the region's
cells) of x @ phi weighted sum of the cells; multi-head self-attention across
the regions, per representative; each cell gets back sum_k out_k * minmax_k *
softmax_k, with minmax the min-max normalised logit over the region's cells
and softmax over the k representatives (so a region of one real cell gets 0).

Batches: each bag has its own grid side and region size; regions are padded to
the largest region size in the batch and the extra cells masked (they sit
after the bag's own cells, so EPEG sees them as its zero padding). A bag gives
the same output alone or in a padded batch.

Defaults as the original (mlp_dim 512, 8 heads, 8 x 8 regions, one R-MSA
layer, EPEG k = 15, CR-MSA k = 3, attention dropout 0.1, non-gated ReLU
attention pooling of width 128 without biases).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .base import MILModel, make_patch_embed, masked_softmax, safe_masked_softmax


def region_layout(mask: Optional[Tensor], bsz: int, t: int, region_num: int,
                  device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """Where each bag's real tokens sit in its regions.

    Returns index (B, R, N) (the token at cell n of region r), valid (B, R, N)
    (False on grid padding and on cells past the bag's own region size) and
    pos (B, T) (the flat cell r * N + n of each real token; 0 for padding),
    with R = region_num^2 and N the largest region size squared."""
    if mask is None:
        n = torch.full((bsz,), t, device=device)
        order = torch.arange(t, device=device).expand(bsz, t)
    else:
        n = mask.sum(dim=1)
        order = torch.argsort(~mask, dim=1, stable=True)  # real tokens first, in order
    side = torch.ceil(torch.sqrt(n.double())).long()
    side = (side + region_num - 1) // region_num * region_num  # (B,)
    size = side // region_num  # (B,) region side
    n_cells = int(size.max()) ** 2
    regions = region_num * region_num
    r = torch.arange(regions, device=device)[None, :, None]  # (1, R, 1)
    j = torch.arange(n_cells, device=device)[None, None, :]  # (1, 1, N)
    s, sd, nb = size[:, None, None], side[:, None, None], n[:, None, None]
    row = (r // region_num) * s + j // s
    col = (r % region_num) * s + j % s
    cell = row * sd + col  # (B, R, N): row-major grid position
    valid = (j < s * s) & (cell < nb)
    index = torch.gather(order, 1, torch.minimum(cell, nb - 1).flatten(1)).view(bsz, regions, n_cells)
    flat = torch.arange(regions * n_cells, device=device).expand(bsz, -1)
    pos = torch.zeros(bsz, t + 1, dtype=torch.long, device=device)  # column t collects the invalid cells
    pos.scatter_(1, torch.where(valid, index, t).flatten(1), flat)
    return index, valid, pos[:, :t]


class RegionAttention(nn.Module):
    """Multi-head self-attention within each region (R-MSA), with EPEG."""

    def __init__(self, dim: int, heads: int, epeg_k: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"RRTMIL: dim={dim} is not divisible by heads={heads}")
        if epeg_k < 0 or (epeg_k and epeg_k % 2 == 0):
            raise ValueError(f"RRTMIL: epeg_k must be 0 (off) or odd, got {epeg_k}")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.pe = (nn.Conv2d(heads, heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=heads)
                   if epeg_k else None)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (..., N, D), valid (..., N) -> (..., N, D); invalid cells give finite junk."""
        lead = x.shape[:-2]
        x, valid = x.reshape(-1, *x.shape[-2:]), valid.reshape(-1, valid.shape[-1])
        q, k, v = rearrange(self.qkv(x), "z n (three h d) -> three z h n d", three=3, h=self.heads)
        logits = (q * self.scale) @ k.transpose(-1, -2)  # (Z, H, N, N)
        if self.pe is not None:
            logits = logits.masked_fill(~valid[:, None, :, None], 0.0)
            logits = logits + self.pe(logits)
        attn = safe_masked_softmax(logits, valid[:, None, None, :], dim=-1)
        out = self.proj(rearrange(attn @ v, "z h n d -> z n (h d)"))
        return out.view(*lead, *out.shape[-2:])


class CrossRegionAttention(nn.Module):
    """CR-MSA: self-attention across the regions' k representatives."""

    def __init__(self, dim: int, heads: int, k: int, dropout: float) -> None:
        super().__init__()
        self.attn = RegionAttention(dim, heads, 0, dropout)
        self.phi = nn.Parameter(torch.empty(dim, k))
        nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, R, N, D), valid (B, R, N) -> (B, R, N, D)."""
        logits = torch.einsum("brnd,dk->brkn", x, self.phi)  # (B, R, K, N)
        cell = valid[:, :, None, :]
        combine = safe_masked_softmax(logits, cell, dim=-1)  # over the region's real cells
        dispatch = logits.softmax(dim=2)  # over the k representatives, per cell
        region = valid.any(dim=-1)  # (B, R)
        has = region[:, :, None, None]
        lo = torch.where(has, logits.masked_fill(~cell, float("inf")).amin(dim=-1, keepdim=True), 0.0)
        hi = torch.where(has, logits.masked_fill(~cell, float("-inf")).amax(dim=-1, keepdim=True), 0.0)
        scaled = (logits - lo) / (hi - lo + 1e-8)
        reps = torch.einsum("brkn,brnd->bkrd", combine, x)  # (B, K, R, D)
        mixed = self.attn(reps, region[:, None, :].expand(-1, reps.shape[1], -1))  # across regions
        return torch.einsum("bkrd,brkn->brnd", mixed, scaled * dispatch)


class RegionLayer(nn.Module):
    """x + attn(LN(x)), the attention run on each bag's regions."""

    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn

    def forward(self, x: Tensor, layout: Tuple[Tensor, Tensor, Tensor], mask: Optional[Tensor]) -> Tensor:
        index, valid, pos = layout
        bsz, regions, n_cells = index.shape
        d = x.shape[-1]
        cells = torch.gather(self.norm(x), 1, index.view(bsz, -1, 1).expand(-1, -1, d))
        z = self.attn(cells.view(bsz, regions, n_cells, d), valid).reshape(bsz, -1, d)
        z = torch.gather(z, 1, pos.unsqueeze(-1).expand(-1, -1, d))  # back to token order
        if mask is not None:
            z = z * mask.unsqueeze(-1)
        return x + z


class RRTMIL(MILModel):
    """'attention': the attention pooling's softmax weights (B, T), zero on padding."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_heads: int = 8,
                 region_num: int = 8, num_rmsa_layers: int = 1, epeg_k: int = 15, crmsa_k: int = 3,
                 attn_dim: int = 128, attn_dropout: float = 0.1, dropout: float = 0.25,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        if region_num < 1 or crmsa_k < 1:
            raise ValueError(f"RRTMIL: region_num and crmsa_k must be >= 1, got {region_num}, {crmsa_k}")
        self.region_num = region_num
        self.rmsa = nn.ModuleList(
            RegionLayer(embed_dim, RegionAttention(embed_dim, num_heads, epeg_k, attn_dropout))
            for _ in range(num_rmsa_layers)
        )
        self.crmsa = RegionLayer(embed_dim, CrossRegionAttention(embed_dim, num_heads, crmsa_k, attn_dropout))
        self.norm = nn.LayerNorm(embed_dim)
        self.attention = nn.Sequential(nn.Linear(embed_dim, attn_dim, bias=False), nn.ReLU(),
                                       nn.Linear(attn_dim, 1, bias=False))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        layout = region_layout(mask, x.shape[0], x.shape[1], self.region_num, x.device)
        for layer in self.rmsa:
            x = layer(x, layout, mask)
        x = self.norm(self.crmsa(x, layout, mask))
        a = masked_softmax(self.attention(x).squeeze(-1), mask, dim=-1)  # (B, T)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", a, x))}
        if return_attention:
            out["attention"] = a
        return out
