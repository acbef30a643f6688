"""WiKG: whole-slide image as a knowledge graph (Li et al., "Dynamic Graph
Representation with Knowledge-aware Attention for Histopathology Whole Slide
Image Analysis", CVPR 2024).

    x <- (x + mean(x)) / 2;  head e_h = W_head x, tail e_t = W_tail x
    neighbours: per token, the top-k tokens by (e_h / sqrt(D)) . e_t (itself included)
    knowledge-aware attention: p = softmax over the k of the similarities,
        e_r = p * e_t[nb] + (1 - p) * e_h,  w = softmax over the k of e_t[nb] . tanh(e_h + e_r),
        e_N = sum_k w * e_t[nb]
    aggregation (bi-interaction): LeakyReLU(W1 (e_h + e_N)) + LeakyReLU(W2 (e_h * e_N))  (or 'gcn', 'sage')
    readout: dropout, attention pooling (Linear-LeakyReLU-Linear gate, softmax over
        the tokens, as torch_geometric's GlobalAttention), LayerNorm, classifier

written with torch alone. The original also defines gate_U/V/W layers that its
forward never uses; they are left out. Its patch embedding ends in LeakyReLU;
here it is the shared ``patch_embed``. Defaults as the authors' MIL-Lab
``wikg`` config (top-k 4, dropout 0.25).

Masks: the mean is over real tokens and padded tokens are never neighbours; a
bag of n < k tokens uses its n. The n x n similarities are computed in blocks
of query rows, so memory is O(block * T), not O(T^2).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .base import MILModel, make_patch_embed, masked_softmax

AGG_TYPES = ("gcn", "sage", "bi-interaction")


class WiKG(MILModel):
    """'attention': the readout's softmax weights (B, T), zero on padding."""

    block_elements = 1 << 24  # similarity entries computed at once (per batch)

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, topk: int = 4,
                 agg_type: str = "bi-interaction", dropout: float = 0.25, moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        if agg_type not in AGG_TYPES:
            raise ValueError(f"WiKG: agg_type must be one of {AGG_TYPES}, got {agg_type!r}")
        if topk < 1:
            raise ValueError(f"WiKG: topk must be >= 1, got {topk}")
        self.topk, self.agg_type, self.scale = topk, agg_type, embed_dim ** -0.5
        self.W_head = nn.Linear(embed_dim, embed_dim)
        self.W_tail = nn.Linear(embed_dim, embed_dim)
        if agg_type == "bi-interaction":
            self.linear1 = nn.Linear(embed_dim, embed_dim)
            self.linear2 = nn.Linear(embed_dim, embed_dim)
        else:
            self.linear = nn.Linear(embed_dim * (2 if agg_type == "sage" else 1), embed_dim)
        self.activation = nn.LeakyReLU()
        self.message_dropout = nn.Dropout(dropout)
        self.readout = nn.Sequential(nn.Linear(embed_dim, embed_dim // 2), nn.LeakyReLU(),
                                     nn.Linear(embed_dim // 2, 1))
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        if mask is None:
            mean = x.mean(dim=1, keepdim=True)
        else:
            w = mask.to(x.dtype)
            mean = torch.einsum("bt,btd->bd", w / w.sum(dim=1, keepdim=True), x).unsqueeze(1)
        x = 0.5 * (x + mean)
        e_h, e_t = self.W_head(x), self.W_tail(x)
        sim, index = self.neighbours(e_h, e_t, mask)  # (B, T, k)
        real = torch.isfinite(sim)  # False where a bag has fewer than k tokens
        nb = e_t[torch.arange(x.shape[0], device=x.device)[:, None, None], index]  # (B, T, k, D)
        p = sim.softmax(dim=-1).unsqueeze(-1)
        e_r = p * nb + (1 - p) * e_h.unsqueeze(2)
        gate = torch.tanh(e_h.unsqueeze(2) + e_r)
        w = masked_softmax(torch.einsum("btkd,btkd->btk", nb, gate), real, dim=-1)
        e_n = torch.einsum("btk,btkd->btd", w, nb)
        if self.agg_type == "bi-interaction":
            h = self.activation(self.linear1(e_h + e_n)) + self.activation(self.linear2(e_h * e_n))
        elif self.agg_type == "sage":
            h = self.activation(self.linear(torch.cat([e_h, e_n], dim=-1)))
        else:
            h = self.activation(self.linear(e_h + e_n))
        h = self.message_dropout(h)
        a = masked_softmax(self.readout(h).squeeze(-1), mask, dim=-1)  # (B, T)
        out = {"logits": self.classifier(self.norm(torch.einsum("bt,btd->bd", a, h)))}
        if return_attention:
            out["attention"] = a
        return out

    def neighbours(self, e_h: Tensor, e_t: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Each token's top-k similarities (B, T, k) and neighbour indices; -inf
        similarities mark padding picked because the bag has fewer than k tokens."""
        bsz, t, _ = e_h.shape
        k = min(self.topk, t)
        block = max(1, self.block_elements // (bsz * t))
        sims, indices = [], []
        for start in range(0, t, block):
            logits = (e_h[:, start:start + block] * self.scale) @ e_t.transpose(1, 2)  # (B, block, T)
            if mask is not None:
                logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            sim, index = logits.topk(k, dim=-1)
            sims.append(sim)
            indices.append(index)
        return torch.cat(sims, dim=1), torch.cat(indices, dim=1)
