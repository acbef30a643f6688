"""DTFD-MIL: double-tier feature distillation (Zhang et al., "DTFD-MIL:
Double-Tier Feature Distillation Multiple Instance Learning for Histopathology
Whole Slide Image Classification", CVPR 2022); ``dftd`` in the authors' registry.

    tokens -> [residual blocks] -> split at random into num_groups pseudo-bags
    tier 1, per pseudo-bag: gated attention pooling -> classifier -> pseudo-bag logits
           (each pseudo-bag inherits the bag's label: 'tier1_loss')
    distillation, per pseudo-bag: instance scores from the tier-1 classifier
           (CAM: softmax over classes of W (a_t x_t), last class), then
           MaxMinS: the instances_per_group highest- and lowest-scoring tokens,
           MaxS: the highest only, AFS: the pseudo-bag's pooled feature
    tier 2: gated attention pooling over the distilled features -> classifier -> logits
    loss = bag_weight * tier2_loss + (1 - bag_weight) * tier1_loss (the authors' MIL-Lab weighting)

Pseudo-bags: a random permutation of the bag's real tokens cut into
min(num_groups, n) near-equal parts (np.array_split), so no pseudo-bag is empty.
In training the permutation comes from ``self.generator`` (a torch.Generator;
None: torch's global RNG), so ``model.generator = torch.Generator().manual_seed(s)``
makes the splits reproducible. In eval mode it is drawn from a fresh generator
seeded with ``eval_seed`` for every bag, so inference is deterministic and a
bag's split depends on its size only (the original draws at random at test
time too).

Batches: every bag gets its own permutation and pseudo-bags; the pseudo-bags
are masks over the (B, T) tokens, so the rest runs batched. A bag gives the
same output alone or in a padded batch in eval mode; in training its split
depends on where it is in the batch (the permutations are drawn bag after bag).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .attention import GlobalGatedAttention
from .base import MILModel, make_patch_embed, masked_softmax, safe_masked_softmax

DISTILL = ("MaxMinS", "MaxS", "AFS")


class ResidualBlock(nn.Module):
    """x + relu(W2 relu(W1 x)), bias-free (the original's DimReduction blocks)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                   nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class DTFDMIL(MILModel):
    """'attention': each token's tier-1 weight within its pseudo-bag divided by
    the number of pseudo-bags (B, T), so a bag's weights sum to 1; zero on padding.
    Also returns 'pseudo_logits' (B, num_groups, C) and 'pseudo_mask' (B,
    num_groups), False for the pseudo-bags a bag of fewer than num_groups tokens
    lacks; with a label and loss_fn 'tier1_loss' (per bag the mean over its
    pseudo-bags, then the mean over bags), 'tier2_loss' and 'loss'."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attn_dim: int = 128,
                 dropout: float = 0.25, attn_dropout: float = 0.25, num_groups: int = 8, instances_per_group: int = 1,
                 distill: str = "MaxMinS", bag_weight: float = 0.7, num_residuals: int = 0, eval_seed: int = 0,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        if distill not in DISTILL:
            raise ValueError(f"DTFDMIL: distill must be one of {DISTILL}, got {distill!r}")
        if num_groups < 1 or instances_per_group < 1:
            raise ValueError(f"DTFDMIL: num_groups and instances_per_group must be >= 1, "
                             f"got {num_groups}, {instances_per_group}")
        self.num_groups, self.instances_per_group, self.distill = num_groups, instances_per_group, distill
        self.bag_weight, self.eval_seed = bag_weight, eval_seed
        self.generator: Optional[torch.Generator] = None
        self.res_blocks = nn.Sequential(*(ResidualBlock(embed_dim) for _ in range(num_residuals)))
        self.tier1_attention = GlobalGatedAttention(embed_dim, attn_dim, attn_dropout)
        self.tier1_classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))
        self.tier2_attention = GlobalGatedAttention(embed_dim, attn_dim, 0.0)
        self.tier2_classifier = nn.Linear(embed_dim, num_classes)

    def pseudo_bags(self, mask: Optional[Tensor], bsz: int, t: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """-> (B, T) pseudo-bag of each token (-1 on padding) and (B,) pseudo-bags per bag."""
        n = torch.full((bsz,), t, device=device) if mask is None else mask.sum(dim=1)
        order = (torch.arange(t, device=device).expand(bsz, t) if mask is None
                 else torch.argsort(~mask, dim=1, stable=True))  # real tokens first
        rank = torch.full((bsz, t), -1, dtype=torch.long, device=device)
        for b, nb in enumerate(n.tolist()):
            gen = torch.Generator().manual_seed(self.eval_seed) if not self.training else self.generator
            perm = torch.randperm(nb, generator=gen).to(device)
            rank[b, order[b, :nb][perm]] = torch.arange(nb, device=device)
        groups = n.clamp(max=self.num_groups)
        q, r = (n // groups)[:, None], (n % groups)[:, None]  # np.array_split: r parts of q + 1, then parts of q
        big = r * (q + 1)
        group = torch.where(rank < big, rank // (q + 1), r + (rank - big) // q)
        return torch.where(rank >= 0, group, -1), groups

    def aggregate(self, x, mask, label, return_attention):
        bsz, t, _ = x.shape
        x = self.res_blocks(x)
        group, groups = self.pseudo_bags(mask, bsz, t, x.device)
        g = torch.arange(self.num_groups, device=x.device)
        member = group[:, None, :] == g[None, :, None]  # (B, G, T)
        present = g[None, :] < groups[:, None]  # (B, G)

        # tier 1: attention pooling within each pseudo-bag
        scores = self.tier1_attention(x)  # (B, T)
        a = safe_masked_softmax(scores[:, None, :], member, dim=-1)  # (B, G, T)
        pooled = a @ x  # (B, G, D)
        pseudo_logits = self.tier1_classifier(pooled)  # (B, G, C)
        weight = a.sum(dim=1)  # (B, T): each token's weight in its own pseudo-bag

        # distillation
        if self.distill == "AFS":
            feats, keep = pooled, present
        else:
            cam = weight.unsqueeze(-1) * (x @ self.tier1_classifier[-1].weight.t())  # (B, T, C)
            score = cam.softmax(dim=-1)[..., -1]
            k = min(self.instances_per_group, t)
            picks, keep = [], []
            for sign in ((1.0, -1.0) if self.distill == "MaxMinS" else (1.0,)):
                val, idx = (sign * score)[:, None, :].masked_fill(~member, float("-inf")).topk(k, dim=-1)
                picks.append(idx)
                keep.append(torch.isfinite(val))  # False where a pseudo-bag has fewer than k tokens
            idx, keep = torch.cat(picks, dim=-1).flatten(1), torch.cat(keep, dim=-1).flatten(1)  # (B, G * m)
            feats = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        # tier 2: attention pooling over the distilled features
        b2 = masked_softmax(self.tier2_attention(feats), keep, dim=-1)
        logits = self.tier2_classifier(torch.einsum("bk,bkd->bd", b2, feats))
        out = {"logits": logits, "pseudo_logits": pseudo_logits, "pseudo_mask": present}
        if return_attention:
            out["attention"] = weight / groups[:, None].to(x.dtype)
        return out

    def losses(self, out, label, loss_fn):
        present, pseudo = out["pseudo_mask"], out["pseudo_logits"]
        tier1 = torch.stack([
            loss_fn(pseudo[b][present[b]], label[b:b + 1].expand(int(present[b].sum()), *label.shape[1:]))
            for b in range(pseudo.shape[0])
        ]).mean()
        tier2 = loss_fn(out["logits"], label)
        return {"tier1_loss": tier1, "tier2_loss": tier2,
                "loss": self.bag_weight * tier2 + (1 - self.bag_weight) * tier1}
