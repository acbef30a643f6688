"""DTFD-MIL: double-tier feature distillation (Zhang et al., "DTFD-MIL:
Double-Tier Feature Distillation Multiple Instance Learning for Histopathology
Whole Slide Image Classification", CVPR 2022), as MIL-Lab builds it (``dftd``
in their registry; same module names, so their checkpoints load).

Per bag of n patches, as MIL-Lab's DFTD computes it:

    split: python's random.shuffle of [0, n) cut by np.array_split into num_group
           pseudo-bags (in eval too; some are empty when n < num_group)
    per pseudo-bag: patch_embed on its patches alone (fc1 Linear + ReLU, then
           num_residuals bias-free residual blocks; or Mammoth, whose routing then
           sees the pseudo-bag only, and which under keep_slots gives E*S tokens
           per pseudo-bag) -> tokens x_t
      tier 1: a_t = gated attention score (raw: no softmax), pooled = sum_t a_t x_t,
           pseudo-bag logits = classifier(pooled)
      distillation: p_t = softmax over classes of W (a_t x_t) (W: the tier-1
           classifier's weight), last class; tokens sorted by p_t descending,
           k = total_instance // num_group; MaxMinS: the first k and the last k
           (python slicing: order[-0:] is every token, so k = 0, which MIL-Lab's
           configs give (4 // 8), keeps every token once), MaxS: the first k (none
           for k = 0: the logits are then the tier-2 classifier's bias), AFS: pooled
    tier 2 over the distilled features f: b_f = gated attention score (raw),
           logits = classifier(sum_f b_f f)
    loss = bag_weight * loss_fn(logits, label)
           + (1 - bag_weight) * mean over pseudo-bags of cross_entropy(pseudo-bag logits, label)

The one switch: ``attention_softmax=True`` normalises both tiers' scores with a
softmax (over each pseudo-bag's tokens, and over the distilled features), as the
DTFD paper and its code do; MIL-Lab's default (False) uses the raw scores.

Pseudo-bags are drawn bag after bag from ``self.rng`` (a ``random.Random``;
None, the default: python's global ``random``, which MIL-Lab uses), each bag
calling shuffle once on the list of its real patches in order. So a bag alone
after ``random.seed(s)`` gets MIL-Lab's split, and a padded (or packed) batch
equals its bags run one at a time in order from the same RNG state; a bag's
result depends on the RNG state it meets, not on its batch.
"""
from __future__ import annotations

import random
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..layer import Mammoth
from .attention import GlobalGatedAttention
from .base import MILModel, mlp, safe_masked_softmax

DISTILL = ("MaxMinS", "MaxS", "AFS")


class Classifier1fc(nn.Module):
    """MIL-Lab's Classifier_1fc: dropout (when droprate > 0) then ``fc``."""

    def __init__(self, dim: int, num_classes: int, droprate: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        self.dropout = nn.Dropout(droprate)  # holds no parameters: absent or not, the state_dict is theirs

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x))


class ResidualBlock(nn.Module):
    """x + relu(W2 relu(W1 x)), bias-free (MIL-Lab's residual_block, module ``block``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False),
                                   nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class DimReduction(nn.Module):
    """MIL-Lab's DimReduction: ``fc1`` (Linear + ReLU), then ``resBlocks``."""

    def __init__(self, in_dim: int, embed_dim: int, num_residuals: int) -> None:
        super().__init__()
        self.fc1 = mlp(in_dim, [], embed_dim)
        self.resBlocks = nn.Sequential(*(ResidualBlock(embed_dim) for _ in range(num_residuals)))

    def forward(self, x: Tensor) -> Tensor:
        return self.resBlocks(self.fc1(x))


class AttentionWithClassifier(nn.Module):
    """Tier 2's modules, MIL-Lab's Attention_with_Classifier: ``global_attn`` (gated,
    no dropout) and ``classifier`` (Classifier_1fc, no dropout)."""

    def __init__(self, dim: int, attn_dim: int, num_classes: int) -> None:
        super().__init__()
        self.global_attn = GlobalGatedAttention(dim, attn_dim)
        self.classifier = Classifier1fc(dim, num_classes)


class DTFDMIL(MILModel):
    """MIL-Lab's DFTD (see the module docstring). Keywords are MIL-Lab's config keys;
    ``num_fc_layers`` is accepted and, as in MIL-Lab, unused (fc1 is one Linear).

    forward's dict: 'logits' (B, C); 'pseudo_logits' (B, num_group, C) (tier 1);
    with a label and loss_fn 'loss', 'cls_loss' (loss_fn on the logits) and
    'instance_loss' (tier 1's cross-entropy, mean over all pseudo-bags), MIL-Lab's
    names; with return_attention 'attention': each token's weight in the feature
    the tier-2 classifier sees (logits = fc(sum_t attention_t x_t)); over patches
    (B, M), zero on padding, or under Mammoth's keep_slots over the slot tokens
    (B, num_group * E * S), pseudo-bag g's at [g*E*S, (g+1)*E*S). For MaxMinS with
    k = 0 these are MIL-Lab's tier-2 weights (their log 'attention') in patch order.
    """

    slide_head = "attCls.classifier"  # tier 2's

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 512, attention_dim: int = 128,
                 num_residuals: int = 4, num_fc_layers: int = 1, dropout: float = 0.25, attention_drop: float = 0.25,
                 distill: str = "MaxMinS", num_group: int = 8, total_instance: int = 4, bag_weight: float = 0.7,
                 moe_args: Optional[dict] = None, attention_softmax: bool = False) -> None:
        if distill not in DISTILL:
            raise ValueError(f"DTFDMIL: distill must be one of {DISTILL}, got {distill!r}")
        if num_group < 1 or total_instance < 0:
            raise ValueError(f"DTFDMIL: num_group must be >= 1 and total_instance >= 0, got {num_group}, "
                             f"{total_instance}")
        super().__init__(in_dim, embed_dim, num_classes, moe_args, DimReduction(in_dim, embed_dim, num_residuals))
        self.classifier = Classifier1fc(embed_dim, num_classes, dropout)
        self.attention = GlobalGatedAttention(embed_dim, attention_dim, attention_drop)
        self.attCls = AttentionWithClassifier(embed_dim, attention_dim, num_classes)
        self.distill, self.num_group, self.total_instance = distill, num_group, total_instance
        self.instance_per_group = total_instance // num_group  # MIL-Lab's k (0 with their configs)
        self.bag_weight, self.attention_softmax = bag_weight, attention_softmax
        self.rng: Optional[random.Random] = None  # None: python's global random, as MIL-Lab
        self.initialize_weights()

    # ------------------------------------------------------------ pseudo-bags
    def pseudo_bags(self, mask: Optional[Tensor], bsz: int, m: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """-> idx (B, G, L) patch positions of each pseudo-bag, member (B, G, L) (False: padding).

        Bag b's real patches in order are shuffled (one shuffle call on
        list(range(n_b)), bag after bag) and cut as np.array_split does: the first
        n_b % G pseudo-bags get n_b // G + 1 patches, the others n_b // G."""
        g = self.num_group
        counts: List[int] = [m] * bsz if mask is None else mask.sum(dim=1).tolist()
        width = max(1, -(-max(counts) // g))  # L: the largest pseudo-bag
        idx = torch.zeros(bsz, g, width, dtype=torch.long)
        member = torch.zeros(bsz, g, width, dtype=torch.bool)
        shuffle = (self.rng or random).shuffle
        for b, n in enumerate(counts):
            order = list(range(n))
            shuffle(order)
            real = torch.arange(m) if mask is None else mask[b].nonzero().flatten().cpu()
            q, r = divmod(n, g)
            i = torch.arange(n)
            big = r * (q + 1)  # patches in the r larger pseudo-bags
            group = torch.where(i < big, i // (q + 1), r + (i - big) // max(q, 1))
            slot = torch.where(i < big, i % (q + 1), (i - big) % max(q, 1))
            idx[b, group, slot] = real[torch.tensor(order, dtype=torch.long)]
            member[b, group, slot] = True
        return idx.to(device), member.to(device)

    # ------------------------------------------------------------ embedding
    def embed(self, h, mask, return_moe_weights):
        """MIL-Lab embeds each pseudo-bag apart (aggregate does it): the patches pass
        through; Mammoth's dispatch weights, when asked, come from a call on the whole
        bag, as MIL-Lab's return_moe_weights makes one."""
        weights = None
        if return_moe_weights and isinstance(self.patch_embed, Mammoth):
            _, weights = self.patch_embed(h, return_weights=True, mask=mask)
        return h, mask, weights

    def embed_pseudo_bags(self, hg: Tensor, member: Tensor) -> Tuple[Tensor, Tensor]:
        """hg (B, G, L, in_dim) patches of each pseudo-bag -> tokens (B, G, T, D) and
        their mask (B, G, T): T = L patches, or E*S slots under keep_slots (all real,
        an empty pseudo-bag's too: Mammoth on no patch gives the experts' output for
        all-zero slot inputs, as MIL-Lab's does)."""
        bsz, g, width, _ = hg.shape
        if not isinstance(self.patch_embed, Mammoth):
            return self.patch_embed(hg) * member.unsqueeze(-1).to(hg.dtype), member
        flat, fmask = hg.flatten(0, 1), member.flatten(0, 1)  # (B*G, L, in_dim), (B*G, L)
        full = bool(fmask.any(dim=1).all())
        rows = slice(None) if full else fmask.any(dim=1)
        out = self.patch_embed(flat[rows], mask=fmask[rows])  # (K, E*S or L, D): our Mammoth takes no empty bag
        if self.patch_embed.keep_slots:
            if not full:
                mam = self.patch_embed
                zero = hg.new_zeros(1, mam.num_heads, mam.num_experts * mam.num_slots, mam.slot_dim // mam.num_heads)
                empty = mam.expert_heads.dropout(reference.experts(zero, mam.params()))  # (1, E*S, D)
                out = empty.expand(bsz * g, -1, -1).contiguous().index_put((rows.nonzero().flatten(),), out)
            tokens = out.unflatten(0, (bsz, g))  # (B, G, E*S, D)
            return tokens, torch.ones(tokens.shape[:3], dtype=torch.bool, device=hg.device)
        if not full:
            out = out.new_zeros(bsz * g, width, out.shape[-1]).index_put((rows.nonzero().flatten(),), out)
        return out.unflatten(0, (bsz, g)), member  # padding rows are zero (Mammoth's masked output)

    # ------------------------------------------------------------ the two tiers
    def scores(self, net: GlobalGatedAttention, x: Tensor, keep: Tensor) -> Tensor:
        """Gated attention scores (..., T) of x (..., T, D), zero where keep is False;
        softmax over T (among kept) with attention_softmax."""
        s = net(x).squeeze(-1)
        if self.attention_softmax:
            return safe_masked_softmax(s, keep, dim=-1)
        return s.masked_fill(~keep, 0.0)

    def distilled_counts(self, p: Tensor, member: Tensor) -> Tensor:
        """How often each token (B, G, T) is among MIL-Lab's distilled instances: their
        order = tokens by p descending, MaxMinS order[:k] + order[-k:], MaxS order[:k]
        (python slicing: order[-0:] is the whole order)."""
        k = self.instance_per_group
        n = member.sum(dim=-1, keepdim=True)  # (B, G, 1)
        order = p.masked_fill(~member, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(p.shape[-1], device=p.device).expand_as(order))
        top = member & (rank < k)
        if self.distill == "MaxS":
            return top.to(p.dtype)
        bottom = member & (rank >= n - k) if k > 0 else member
        return top.to(p.dtype) + bottom.to(p.dtype)

    def aggregate(self, h, mask, label, return_attention):
        bsz, m, _ = h.shape
        idx, member = self.pseudo_bags(mask, bsz, m, h.device)  # (B, G, L)
        bag = torch.arange(bsz, device=h.device)[:, None, None].expand_as(idx)  # (B, G, L)
        hg = h[bag, idx] * member.unsqueeze(-1).to(h.dtype)  # (B, G, L, in_dim), padding zeroed
        x, keep = self.embed_pseudo_bags(hg, member)  # (B, G, T, D), (B, G, T)

        # tier 1, per pseudo-bag
        a = self.scores(self.attention, x, keep)  # (B, G, T)
        att_feats = a.unsqueeze(-1) * x  # (B, G, T, D)
        pooled = att_feats.sum(dim=2)  # (B, G, D)
        pseudo_logits = self.classifier(pooled)  # (B, G, C)

        # tier 2 over the distilled features, each with its count
        if self.distill == "AFS":
            feats, count = pooled, torch.ones(pooled.shape[:2], dtype=x.dtype, device=x.device)  # (B, G, D), (B, G)
        else:
            p = (att_feats @ self.classifier.fc.weight.t()).softmax(dim=-1)[..., -1]  # (B, G, T): MIL-Lab's CAM
            feats, count = x.flatten(1, 2), self.distilled_counts(p, keep).flatten(1)  # (B, G*T, D), (B, G*T)
        b2 = self.attCls.global_attn(feats).squeeze(-1)  # (B, F)
        if self.attention_softmax:
            b2 = safe_masked_softmax(b2 + count.log(), count > 0, dim=-1)  # softmax over the distilled multiset
        else:
            b2 = b2 * count
        logits = self.attCls.classifier(torch.einsum("bf,bfd->bd", b2, feats))
        out = {"logits": logits, "pseudo_logits": pseudo_logits}
        if return_attention:
            # each token's weight in the tier-2 pooled feature: b2 directly, or b2 of its pseudo-bag times a (AFS)
            w = (b2.unsqueeze(-1) * a if self.distill == "AFS" else b2.view_as(a))  # (B, G, T)
            if isinstance(self.patch_embed, Mammoth) and self.patch_embed.keep_slots:
                out["attention"] = w.flatten(1)  # (B, G*E*S)
            else:
                out["attention"] = w.new_zeros(bsz, m).index_put((bag[member], idx[member]), w[member])  # (B, M)
        return out

    def losses(self, out, label, loss_fn):
        """MIL-Lab's: loss_fn for the bag; their instance loss is a plain
        cross-entropy over every pseudo-bag (each with the bag's label), whatever loss_fn."""
        pseudo = out["pseudo_logits"]
        cls_loss = loss_fn(out["logits"], label)
        instance_loss = F.cross_entropy(pseudo.flatten(0, 1), label.repeat_interleave(pseudo.shape[1]))
        return {"cls_loss": cls_loss, "instance_loss": instance_loss,
                "loss": self.bag_weight * cls_loss + (1 - self.bag_weight) * instance_loss}
