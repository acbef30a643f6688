"""CLAM-SB: single-branch clustering-constrained attention MIL (Lu et al.,
"Data-efficient and weakly supervised computational pathology on whole-slide
images", Nature Biomedical Engineering 2021).

Gated attention pooling as ABMIL, plus the instance-level clustering loss: per
bag, the k tokens with the highest attention are pseudo-labelled positive and
the k lowest negative for the instance classifier of the bag's class; with
``subtyping`` the k highest are also negatives for every other class's
classifier. Cross-entropy instance loss (the original also offers a smooth
top-1 SVM); total loss = bag_weight * cls_loss + (1 - bag_weight) * instance_loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import GlobalGatedAttention
from .base import MILModel, make_patch_embed, masked_softmax


class CLAMSB(MILModel):
    """'attention': the softmax weights (B, T). 'instance_loss' (mean over the
    bags) whenever a label is given; with loss_fn also 'cls_loss' and 'loss'.
    k = min(k_sample, n // 2) for a bag of n real tokens, so that no token is
    both a positive and a negative (the original needs n >= k_sample)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attn_dim: int = 384,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = False, bag_weight: float = 0.7,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        self.k_sample, self.subtyping, self.bag_weight = k_sample, subtyping, bag_weight
        self.attention = GlobalGatedAttention(embed_dim, attn_dim, dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(num_classes))

    def aggregate(self, x, mask, label, return_attention):
        scores = self.attention(x)  # (B, T)
        a = masked_softmax(scores, mask, dim=-1)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", a, x))}
        if label is not None:
            bags = [(x[b], scores[b]) if mask is None else (x[b][mask[b]], scores[b][mask[b]])
                    for b in range(x.shape[0])]
            label = label.reshape(-1).tolist()
            out["instance_loss"] = torch.stack([self.bag_instance_loss(*bag, y) for bag, y in zip(bags, label)]).mean()
        if return_attention:
            out["attention"] = a
        return out

    def bag_instance_loss(self, x: Tensor, scores: Tensor, label: int) -> Tensor:
        """x (n, D) and scores (n,) of one bag's real tokens -> scalar."""
        k = min(self.k_sample, x.shape[0] // 2)
        if k == 0:
            return x.new_zeros(())
        top, bottom = scores.topk(k).indices, (-scores).topk(k).indices
        ones, zeros = (torch.full((k,), v, dtype=torch.long, device=x.device) for v in (1, 0))
        total = x.new_zeros(())
        for c, classifier in enumerate(self.instance_classifiers):
            if c == label:  # in-class: top k positive, bottom k negative
                total = total + F.cross_entropy(classifier(x[torch.cat([top, bottom])]), torch.cat([ones, zeros]))
            elif self.subtyping:  # out-of-class: top k negative
                total = total + F.cross_entropy(classifier(x[top]), zeros)
        return total / len(self.instance_classifiers) if self.subtyping else total

    def losses(self, out, label, loss_fn):
        cls_loss = loss_fn(out["logits"], label)
        return {"cls_loss": cls_loss, "loss": self.bag_weight * cls_loss + (1 - self.bag_weight) * out["instance_loss"]}
