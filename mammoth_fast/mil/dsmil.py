"""DSMIL: dual-stream MIL (Li et al., "Dual-stream Multiple Instance Learning
Network for Whole Slide Image Classification with Self-supervised Contrastive
Learning", CVPR 2021).

Stream 1 scores every token per class and max-pools the scores. Stream 2 takes,
per class, the highest-scoring ("critical") token and attends from it to all
tokens by the similarity of their queries; the attended bag embedding goes
through a Conv1d over the classes. logits = (bag_logits + max_logits) / 2;
loss = (loss_fn(bag_logits) + loss_fn(max_logits)) / 2, as the original trains.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .base import MILModel, make_patch_embed, masked_softmax


class DSMIL(MILModel):
    """'attention': per class (B, num_classes, T). Also returns 'bag_logits' and
    'max_logits'; with a label and loss_fn 'bag_loss', 'max_loss' and 'loss'."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attn_dim: int = 128,
                 dropout: float = 0.25, dropout_v: float = 0.0, passing_v: bool = False,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        self.instance_classifier = nn.Linear(embed_dim, num_classes)
        self.q = nn.Sequential(nn.Linear(embed_dim, attn_dim), nn.ReLU(), nn.Linear(attn_dim, attn_dim), nn.Tanh())
        self.v = (nn.Sequential(nn.Dropout(dropout_v), nn.Linear(embed_dim, embed_dim), nn.ReLU())
                  if passing_v else nn.Identity())
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=embed_dim)

    def aggregate(self, x, mask, label, return_attention):
        scores = self.instance_classifier(x)  # (B, T, C)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = scores.max(dim=1)  # (B, C): best score and its token, per class
        q = self.q(x)  # (B, T, A)
        q_crit = self.q(torch.gather(x, 1, critical.unsqueeze(-1).expand(-1, -1, x.shape[-1])))  # (B, C, A)
        sim = torch.einsum("bta,bca->bct", q, q_crit) / math.sqrt(q.shape[-1])
        a = masked_softmax(sim, None if mask is None else mask.unsqueeze(1), dim=-1)  # (B, C, T)
        bag = torch.einsum("bct,btd->bcd", a, self.v(x))  # (B, C, D)
        bag_logits = self.bag_classifier(bag).squeeze(-1)  # (B, C)
        out = {"logits": 0.5 * (bag_logits + max_logits), "bag_logits": bag_logits, "max_logits": max_logits}
        if return_attention:
            out["attention"] = a
        return out

    def losses(self, out, label, loss_fn):
        bag_loss, max_loss = loss_fn(out["bag_logits"], label), loss_fn(out["max_logits"], label)
        return {"bag_loss": bag_loss, "max_loss": max_loss, "loss": 0.5 * (bag_loss + max_loss)}
