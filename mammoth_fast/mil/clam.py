"""CLAM-SB: single-branch clustering-constrained attention MIL (Lu et al.,
"Data-efficient and weakly supervised computational pathology on whole-slide
images", Nature Biomedical Engineering 2021), as MIL-Lab builds it (module names,
config keys, initialization, instance loss and total loss are theirs).

Attention pooling as ABMIL, plus the instance-level clustering loss: per bag, the
k tokens with the highest attention score are pseudo-labelled positive and the k
lowest negative for the instance classifier of the bag's class; with ``subtyping``
the k highest are also negatives for every other class's classifier. The instance
loss is MIL-Lab's default smooth top-1 SVM (:class:`SmoothTop1SVM`, ours, equal to
oval-group/smooth-topk's) or cross-entropy; total loss = bag_weight * cls_loss +
(1 - bag_weight) * instance_loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .attention import global_attention
from .base import MILModel, make_patch_embed, masked_softmax

INSTANCE_LOSSES = ("svm", "ce")


class SmoothTop1SVM(nn.Module):
    """The smooth top-1 multiclass SVM loss (Berrada et al., "Smooth Loss Functions
    for Deep Top-k Classification", ICLR 2018), computing what oval-group/smooth-topk's
    ``SmoothTop1SVM(n_classes)`` computes (commit 12c1645), which MIL-Lab's CLAM uses
    as its instance loss (their code needs that package and CUDA; this runs anywhere).

    For scores x (N, C) and labels y (N,), with s_j = x_j + alpha [j != y] - x_y:
        smooth: tau * log sum_j exp(s_j / tau)
        hard:   max_j s_j, for a row whose two largest scores differ by at least
                tau * log(1000) (smooth-topk's switch, a fixed, non-differentiable choice)
    reduction 'mean' (smooth-topk's: the sum over rows / N), 'sum' or 'none' ((N,)).
    ``labels`` (arange(n_classes)) is smooth-topk's buffer, so their state_dict loads."""

    thresh = 1e3  # smooth-topk's threshold of the hard switch

    def __init__(self, n_classes: int, alpha: float = 1.0, tau: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if n_classes < 2 or alpha < 0 or tau <= 0 or reduction not in ("mean", "sum", "none"):
            raise ValueError(f"SmoothTop1SVM: need n_classes >= 2, alpha >= 0, tau > 0 and reduction in "
                             f"('mean', 'sum', 'none'), got {n_classes}, {alpha}, {tau}, {reduction!r}")
        self.n_classes, self.alpha, self.tau, self.reduction = n_classes, float(alpha), float(tau), reduction
        self.register_buffer("labels", torch.arange(n_classes))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # x (N, C), y (N,) -> () or (N,)
        s = x + self.alpha * (self.labels != y[:, None]).to(x.dtype) - x.gather(1, y[:, None])  # (N, C)
        top2 = x.detach().topk(2, dim=1).values  # (N, 2)
        hard = top2[:, 0] - top2[:, 1] >= self.tau * math.log(self.thresh)  # (N,)
        loss = torch.where(hard, s.max(dim=1).values, self.tau * torch.logsumexp(s / self.tau, dim=1))  # (N,)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.sum() / x.shape[0]


class CLAMSB(MILModel):
    """MIL-Lab's CLAMSB. Modules (their names): ``patch_embed`` (n_fc_layers Linear +
    ReLU, or Mammoth), ``global_attn`` (gated when ``gate``), ``classifier``,
    ``instance_classifiers`` (one Linear(embed_dim, 2) per class) and
    ``instance_loss_fn`` (SmoothTop1SVM(2) for 'svm', which holds a ``labels`` buffer
    as theirs does, or cross-entropy for 'ce'; both per row here, averaged below).

    Output: 'attention', the softmax weights (B, T) (MIL-Lab logs the scores before
    the softmax); with a label 'instance_loss', the mean over the bags of each bag's
    instance loss; with loss_fn also 'cls_loss' = loss_fn(logits, label) and 'loss' =
    bag_weight * cls_loss + (1 - bag_weight) * instance_loss, MIL-Lab's 'loss' for one
    bag. As in MIL-Lab (not the original CLAM, where it is a training-only option), the
    instance loss is computed whenever a label is given, in eval mode too.

    A bag's instance loss, as MIL-Lab computes it on the attention scores before the
    softmax (the same top-k as after it): with k = k_sample, ``top`` / ``bottom`` = the
    k real tokens of highest / lowest score (they overlap when the bag has fewer than
    2k tokens, as in MIL-Lab), L(rows, target) the mean loss over the rows,
        L_c = L(classifier_c(top) -> 1 and classifier_c(bottom) -> 0)   for c = the label
        L_c = L(classifier_c(top) -> 0)                                 for c != the label
    and the bag's loss L_label, or with ``subtyping`` sum_c L_c / num_classes.
    A bag of n < k_sample tokens, where MIL-Lab's torch.topk raises, uses k = n (all its
    tokens are both top and bottom)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, n_fc_layers: int = 1,
                 dropout: float = 0.25, gate: bool = True, attention_dim: int = 384, k_sample: int = 8,
                 subtyping: bool = False, instance_loss_fn: str = "svm", bag_weight: float = 0.7,
                 moe_args: Optional[dict] = None) -> None:
        if instance_loss_fn not in INSTANCE_LOSSES or k_sample < 1:
            raise ValueError(f"CLAMSB: instance_loss_fn must be one of {INSTANCE_LOSSES} and k_sample >= 1, "
                             f"got {instance_loss_fn!r}, {k_sample}")
        mammoth = bool(moe_args) and moe_args.get("num_experts", 0) > 0
        # their construction order (one patch_embed, built first): with the Linear one a seed gives their init
        super().__init__(in_dim, embed_dim, num_classes, moe_args,
                         None if mammoth else make_patch_embed(in_dim, embed_dim, None, n_fc_layers, dropout))
        self.k_sample, self.subtyping, self.bag_weight = k_sample, subtyping, bag_weight
        self.global_attn = global_attention(gate, embed_dim, attention_dim, dropout)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(num_classes))
        self.instance_loss_fn = SmoothTop1SVM(2, reduction="none") if instance_loss_fn == "svm" \
            else nn.CrossEntropyLoss(reduction="none")
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        scores = self.global_attn(x).squeeze(-1)  # (B, T)
        a = masked_softmax(scores, mask, dim=-1)  # (B, T)
        out = {"logits": self.classifier(torch.einsum("bt,btd->bd", a, x))}  # (B, C)
        if label is not None:
            out["instance_loss"] = self.instance_losses(x, scores, mask, label.reshape(-1)).mean()
        if return_attention:
            out["attention"] = a
        return out

    def instance_losses(self, x: Tensor, scores: Tensor, mask: Optional[Tensor], label: Tensor) -> Tensor:
        """x (B, T, D), scores (B, T), mask (B, T) or None, label (B,) -> each bag's instance loss (B,)."""
        bsz, t, dim = x.shape
        kmax = min(self.k_sample, t)
        if mask is None:
            hi, lo, n = scores, -scores, torch.full((bsz,), t, device=x.device)
        else:  # padding is never picked; a bag with n < kmax real tokens has kmax - n invalid picks
            hi, lo, n = scores.masked_fill(~mask, -math.inf), (-scores).masked_fill(~mask, -math.inf), mask.sum(-1)
        k = n.clamp(max=self.k_sample)  # (B,)
        valid = torch.arange(kmax, device=x.device) < k[:, None]  # (B, K)

        def pick(s):  # the K tokens of highest s: (B, K, D)
            return x.gather(1, s.topk(kmax, dim=-1).indices.unsqueeze(-1).expand(-1, -1, dim))

        def loss_sum(logits, target):  # logits (B, K, 2), target (B,) -> sum over the valid rows (B,)
            rows = self.instance_loss_fn(logits.reshape(-1, 2), target.repeat_interleave(kmax))
            return rows.view(bsz, kmax).masked_fill(~valid, 0.0).sum(-1)

        top, bottom = pick(hi), pick(lo)  # (B, K, D)
        zeros = torch.zeros_like(label)
        total = x.new_zeros(bsz)
        for c, classifier in enumerate(self.instance_classifiers):
            own = label == c  # (B,)
            top_sum = loss_sum(classifier(top), own.long())  # targets: 1 for the bag's class, else 0
            in_class = (top_sum + loss_sum(classifier(bottom), zeros)) / (2 * k)
            if self.subtyping:
                total = total + torch.where(own, in_class, top_sum / k)
            else:
                total = total + torch.where(own, in_class, 0.0)
        return total / len(self.instance_classifiers) if self.subtyping else total

    def losses(self, out, label, loss_fn):
        cls_loss = loss_fn(out["logits"], label)
        return {"cls_loss": cls_loss, "loss": cls_loss * self.bag_weight + (1 - self.bag_weight) * out["instance_loss"]}
