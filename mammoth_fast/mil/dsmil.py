"""DSMIL: dual-stream MIL (Li et al., "Dual-stream Multiple Instance Learning
Network for Whole Slide Image Classification with Self-supervised Contrastive
Learning", CVPR 2021), as MIL-Lab builds it (same module names, same math).

Stream 1 (``i_classifier``) scores every token per class; its max over the
tokens is the max-instance logit. Stream 2 (``b_classifier``) takes, per class,
the highest-scoring ("critical") token and attends from its query to every
token's query (scaled dot product); the attended values, layer-normed, form a
(num_classes, D) bag embedding that ``classifier`` (a Conv1d over the classes)
turns into the bag logit. MIL-Lab returns logits = (bag + max-instance) / 2 and
trains on loss_fn(logits) alone.

The config "original" (``original=True``) is the original repository's
(dsmil-wsi) stream 2 and loss instead: query Linear-ReLU-Linear-Tanh, values are
the tokens themselves, no LayerNorm, loss = (loss_fn(bag) + loss_fn(max)) / 2.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .base import MILModel, make_patch_embed, masked_softmax


class InstanceClassifier(nn.Module):
    """Stream 1: a score per token and class, ``inst_classifier`` (MIL-Lab's name)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.inst_classifier = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, T, D) -> (B, T, C)
        return self.inst_classifier(x)


class BagAttention(nn.Module):
    """Stream 2: attention from each class's critical token over all tokens.

    MIL-Lab: q = Linear(D, attn_dim), v = (Dropout, Linear(D, D)), LayerNorm on
    the attended embedding, and ``fcc``, a Conv1d(3, 3, kernel_size=D) that they
    build but never use (a leftover of the original's bag classifier, with the
    class count hard-coded to 3): we build it too, only so that their
    checkpoints load strictly. Original (dsmil-wsi): q = Linear, ReLU,
    Linear(attn_dim, attn_dim), Tanh; v = identity; no norm; no fcc.
    The scores are divided by sqrt(attn_dim) rounded to float32, as both codes
    do (torch.sqrt of a float32 tensor).
    """

    def __init__(self, dim: int, attn_dim: int, dropout_v: float, original: bool) -> None:
        super().__init__()
        if original:
            self.q = nn.Sequential(nn.Linear(dim, attn_dim), nn.ReLU(), nn.Linear(attn_dim, attn_dim), nn.Tanh())
            self.v, self.norm = nn.Identity(), nn.Identity()
        else:
            self.q = nn.Linear(dim, attn_dim)
            self.v = nn.Sequential(nn.Dropout(dropout_v), nn.Linear(dim, dim))
            self.norm = nn.LayerNorm(dim)
            self.fcc = nn.Conv1d(3, 3, kernel_size=dim)  # unused: MIL-Lab's checkpoints hold it
        self.scale = torch.tensor(float(attn_dim), dtype=torch.float32, device="cpu").sqrt().item()  # a float

    def forward(self, x, critical, mask):
        """x (B, T, D), critical (B, C) token index per class, mask (B, T) or None
        -> bag embedding (B, C, D), attention (B, C, T) (zero on padding)."""
        q = self.q(x)  # (B, T, A)
        q_crit = self.q(torch.gather(x, 1, critical.unsqueeze(-1).expand(-1, -1, x.shape[-1])))  # (B, C, A)
        scores = torch.einsum("bta,bca->bct", q, q_crit) / self.scale  # (B, C, T)
        a = masked_softmax(scores, None if mask is None else mask.unsqueeze(1), dim=-1)  # (B, C, T)
        return self.norm(torch.einsum("bct,btd->bcd", a, self.v(x))), a  # (B, C, D)


class DSMIL(MILModel):
    """patch_embed (num_fc_layers Linear + ReLU, or Mammoth), then the two streams.

    Returns 'logits' = (bag_logits + max_logits) / 2, and 'bag_logits',
    'max_logits' (B, num_classes); 'attention' per class (B, num_classes, T),
    zero on padding. 'loss' = loss_fn(logits) (MIL-Lab); with ``original``,
    'bag_loss', 'max_loss' and 'loss' = their mean (dsmil-wsi).
    Padded tokens are never critical nor the max (MIL-Lab's code, which masks
    only the softmax, would let them be; a bag alone is unaffected).
    """

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, num_fc_layers: int = 1,
                 dropout: float = 0.25, attn_dim: int = 384, dropout_v: float = 0.0,
                 moe_args: Optional[dict] = None, original: bool = False) -> None:
        """MIL-Lab's config keys; ``original``: the original repository's stream 2 and
        two-term loss (see the module docstring); False reproduces MIL-Lab."""
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         make_patch_embed(in_dim, embed_dim, None, num_fc_layers, dropout))
        self.original = original
        self.i_classifier = InstanceClassifier(embed_dim, num_classes)
        self.b_classifier = BagAttention(embed_dim, attn_dim, dropout_v, original)
        self.classifier = nn.Conv1d(num_classes, num_classes, kernel_size=embed_dim)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        scores = self.i_classifier(x)  # (B, T, C)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = scores.max(dim=1)  # (B, C): best score and its token, per class
        bag, a = self.b_classifier(x, critical, mask)  # (B, C, D), (B, C, T)
        bag_logits = self.classifier(bag).squeeze(-1)  # (B, C)
        out = {"logits": 0.5 * (bag_logits + max_logits), "bag_logits": bag_logits, "max_logits": max_logits}
        if return_attention:
            out["attention"] = a
        return out

    def losses(self, out, label, loss_fn):
        if not self.original:
            return {"loss": loss_fn(out["logits"], label)}
        bag_loss, max_loss = loss_fn(out["bag_logits"], label), loss_fn(out["max_logits"], label)
        return {"bag_loss": bag_loss, "max_loss": max_loss, "loss": 0.5 * (bag_loss + max_loss)}
