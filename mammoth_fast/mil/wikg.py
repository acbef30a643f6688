"""WiKG: whole-slide image as a knowledge graph (Li et al., "Dynamic Graph
Representation with Knowledge-aware Attention for Histopathology Whole Slide
Image Analysis", CVPR 2024), as MIL-Lab builds it (same module names, same math).

    x <- (x + mean(x)) / 2;  head e_h = W_head x, tail e_t = W_tail x
    neighbours: per token, the top-k tokens by (e_h . e_t) / sqrt(D) (itself included
        when it ranks), s = those k similarities, nb = their tails (k, D)
    knowledge-aware attention: p = softmax_k(s), e_r = p * nb,
        w = softmax_k(nb . tanh(e_h + e_r)),  e_N = sum_k w * nb
    aggregation ('bi-interaction'): act(linear1(e_h + e_N)) + act(linear2(e_h * e_N));
        'gcn': act(linear(e_h + e_N)); 'sage': act(linear([e_h, e_N]))
    readout: dropout, pooling over the tokens ('attn': torch_geometric's GlobalAttention
        with the gate Linear-LeakyReLU-Linear; 'mean'; 'max'), LayerNorm, classifier

MIL-Lab's e_r is p * nb: the authors' original WiKG code adds (1 - p) * e_h, which
MIL-Lab dropped; their checkpoints depend on it, so it is the default, and
``original_relation=True`` restores the original's term. MIL-Lab also builds
gate_U/V/W layers that its forward never uses: they are kept (untouched by the
forward) so that their state_dict loads strictly. The patch embedding is
MIL-Lab's (Linear + ReLU, or Mammoth). Their readout comes from torch_geometric;
here its math is written in torch: softmax with their + 1e-16 in the
denominator, then the weighted sum.

Where MIL-Lab's code fails, ours works: a bag with fewer than k tokens uses all it
has (their torch.topk raises), and masks work (they ignore attn_mask): the mean is
over real tokens and padded tokens are never neighbours, so a padded batch equals
its bags run alone. The T x T similarities are computed in blocks of query rows,
so memory is O(block * T), not O(T^2); MIL-Lab also returns the T x T softmax of
the kept similarities as 'attention': ours is the readout's weights (B, T).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .base import MILModel, make_patch_embed

AGG_TYPES = ("gcn", "sage", "bi-interaction")
POOLS = ("attn", "mean", "max")
ACTS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh}  # MIL-Lab's get_act


class GraphReadout(nn.Module):
    """MIL-Lab's readout over the tokens: torch_geometric's GlobalAttention with the
    gate network ``gate_nn`` (pool 'attn'), global_mean_pool ('mean') or
    global_max_pool ('max'), over the real tokens of each bag.

    forward(h (B, T, D), mask (B, T) or None) -> pooled (B, D), weights (B, T):
    the softmax weights ('attn'), the uniform weights ('mean'), or the share of the
    D channels whose max each token holds ('max'); zero on padding."""

    def __init__(self, pool: str, dim: int) -> None:
        super().__init__()
        self.pool = pool
        if pool == "attn":
            self.gate_nn = nn.Sequential(nn.Linear(dim, dim // 2), nn.LeakyReLU(), nn.Linear(dim // 2, 1))

    def forward(self, h: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.pool == "max":
            if mask is not None:
                h = h.masked_fill(~mask.unsqueeze(-1), float("-inf"))
            pooled, winner = h.max(dim=1)  # (B, D), (B, D) token index
            share = torch.full(winner.shape, 1.0 / h.shape[-1], dtype=h.dtype, device=h.device)
            return pooled, h.new_zeros(h.shape[:2]).scatter_add_(1, winner, share)
        if self.pool == "mean":
            w = h.new_ones(h.shape[:2]) if mask is None else mask.to(h.dtype)
            w = w / w.sum(dim=1, keepdim=True)  # (B, T)
        else:  # torch_geometric's softmax: exp(s - max) / (sum + 1e-16)
            s = self.gate_nn(h).squeeze(-1)  # (B, T)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            e = (s - s.detach().max(dim=1, keepdim=True).values).exp()
            w = e / (e.sum(dim=1, keepdim=True) + 1e-16)
        return torch.einsum("bt,btd->bd", w, h), w


class WiKG(MILModel):
    """'attention': the readout's weights over the tokens (B, T), zero on padding.

    original_relation: False (MIL-Lab's) e_r = p * nb; True adds (1 - p) * e_h as the
    authors' original WiKG code does (their checkpoints need False)."""

    block_elements = 1 << 24  # similarity entries computed at once (per batch)

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, topk: int = 4,
                 agg_type: str = "bi-interaction", pool: str = "attn", dropout: float = 0.25,
                 act: str = "leaky_relu", moe_args: Optional[dict] = None, original_relation: bool = False) -> None:
        for key, value, allowed in (("agg_type", agg_type, AGG_TYPES), ("pool", pool, POOLS), ("act", act, ACTS)):
            if value not in allowed:
                raise ValueError(f"WiKG: {key} must be one of {tuple(allowed)} (MIL-Lab's), got {value!r}")
        if topk < 1:
            raise ValueError(f"WiKG: topk must be >= 1, got {topk}")
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        self.topk, self.agg_type, self.original_relation = topk, agg_type, original_relation
        # MIL-Lab's unused layers (in their state_dict)
        self.gate_U = nn.Linear(embed_dim, embed_dim // 2)
        self.gate_V = nn.Linear(embed_dim, embed_dim // 2)
        self.gate_W = nn.Linear(embed_dim // 2, embed_dim)
        self.W_head = nn.Linear(embed_dim, embed_dim)
        self.W_tail = nn.Linear(embed_dim, embed_dim)
        self.scale = embed_dim ** -0.5
        if agg_type == "bi-interaction":
            self.linear1 = nn.Linear(embed_dim, embed_dim)
            self.linear2 = nn.Linear(embed_dim, embed_dim)
        else:
            self.linear = nn.Linear(embed_dim * (2 if agg_type == "sage" else 1), embed_dim)
        self.activation = ACTS[act]()
        self.message_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.readout = GraphReadout(pool, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        if mask is None:
            mean = x.mean(dim=1, keepdim=True)
        else:
            w = mask.to(x.dtype)
            mean = torch.einsum("bt,btd->bd", w / w.sum(dim=1, keepdim=True), x).unsqueeze(1)
        x = (x + mean) * 0.5  # (B, T, D)
        e_h, e_t = self.W_head(x), self.W_tail(x)
        sim, index = self.neighbours(e_h, e_t, mask)  # (B, T, k)
        nb = e_t[torch.arange(x.shape[0], device=x.device)[:, None, None], index]  # (B, T, k, D)
        p = sim.softmax(dim=-1).unsqueeze(-1)  # (B, T, k, 1), zero where sim is -inf
        e_r = p * nb
        if self.original_relation:
            e_r = e_r + (1 - p) * e_h.unsqueeze(2)
        gate = torch.tanh(e_h.unsqueeze(2) + e_r)
        logit = torch.einsum("btkd,btkd->btk", gate, nb).masked_fill(~torch.isfinite(sim), float("-inf"))
        e_n = torch.einsum("btk,btkd->btd", logit.softmax(dim=-1), nb)  # (B, T, D)
        if self.agg_type == "bi-interaction":
            h = self.activation(self.linear1(e_h + e_n)) + self.activation(self.linear2(e_h * e_n))
        elif self.agg_type == "sage":
            h = self.activation(self.linear(torch.cat([e_h, e_n], dim=-1)))
        else:
            h = self.activation(self.linear(e_h + e_n))
        pooled, a = self.readout(self.message_dropout(h), mask)  # (B, D), (B, T)
        out = {"logits": self.classifier(self.norm(pooled))}
        if return_attention:
            out["attention"] = a
        return out

    def neighbours(self, e_h: Tensor, e_t: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Each token's top-min(k, T) similarities (B, T, k) and neighbour indices;
        -inf similarities mark padding picked because a bag has fewer than k tokens."""
        bsz, t, _ = e_h.shape
        k = min(self.topk, t)
        block = max(1, self.block_elements // (bsz * t))
        sims, indices = [], []
        for start in range(0, t, block):
            logits = (e_h[:, start:start + block] @ e_t.transpose(1, 2)) * self.scale  # (B, block, T)
            if mask is not None:
                logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
            sim, index = logits.topk(k, dim=-1)
            sims.append(sim)
            indices.append(index)
        return torch.cat(sims, dim=1), torch.cat(indices, dim=1)
