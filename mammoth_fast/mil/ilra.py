"""ILRA: low-rank attention MIL (Xiang et al., "Exploring Low-Rank Property in
Multiple Instance Learning for Whole Slide Image Classification", ICLR 2023).

    tokens -> num_layers x GAB -> non-local pooling (NLP) -> classifier

GAB (gated attention block) goes through a learnable low-rank proxy: L
(num_latents x D) attends to the tokens, H = MHA(L, X), and the tokens attend
back to it, X' = MHA(X, H), so a layer costs O(T * num_latents), not O(T^2).
NLP is a learnable query attending to the tokens. Each MHA block is the
original's: fc_q/fc_k/fc_v, multi-head attention, O = Q' + A, optional
LayerNorm, O + relu(fc_o(O)), optional LayerNorm, and in GAB a SiLU gate of
the query. The original's first GAB maps the encoder features itself; here
``patch_embed`` does (as in the other models), and every GAB is embed_dim wide.

Defaults as the authors' MIL-Lab ``ilra``: embed_dim 256, 8 heads, 64 latents
(their ``topk``), 2 layers, LayerNorm on. embed_dim 256 equals Mammoth's
default slot_dim, for which the auto rank is 0, so the ``base_mammoth`` config
uses slot_dim 128 (rank 17 at in_dim 1024) and keeps the aggregator unchanged.
Padded tokens are masked as keys (latents and the pooling query never see them).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import MILModel, make_patch_embed


class MultiHeadAttention(nn.Module):
    """The original's attention block (a Set-Transformer MAB, optionally gated)."""

    def __init__(self, dim: int, heads: int, ln: bool, gated: bool) -> None:
        super().__init__()
        self.fc_q, self.fc_k, self.fc_v = (nn.Linear(dim, dim) for _ in range(3))
        self.multihead_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln0 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.ln1 = nn.LayerNorm(dim) if ln else nn.Identity()
        self.fc_o = nn.Linear(dim, dim)
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.SiLU()) if gated else None

    def forward(self, q: Tensor, kv: Tensor, pad: Optional[Tensor] = None, need_weights: bool = False):
        """q (B, Lq, D) attends to kv (B, Lk, D); pad (B, Lk) True on padding ->
        (B, Lq, D), and with need_weights the weights (B, Lq, Lk) averaged over heads."""
        q_proj = self.fc_q(q)
        a, weights = self.multihead_attention(q_proj, self.fc_k(kv), self.fc_v(kv), key_padding_mask=pad,
                                              need_weights=need_weights, average_attn_weights=True)
        o = self.ln0(q_proj + a)
        o = self.ln1(o + F.relu(self.fc_o(o)))
        if self.gate is not None:
            o = o * self.gate(q)
        return o, weights


class GAB(nn.Module):
    """Gated attention block through num_latents learnable latent tokens."""

    def __init__(self, dim: int, heads: int, num_latents: int, ln: bool) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.empty(1, num_latents, dim))
        nn.init.xavier_uniform_(self.latent)
        self.project_forward = MultiHeadAttention(dim, heads, ln, gated=True)
        self.project_backward = MultiHeadAttention(dim, heads, ln, gated=True)

    def forward(self, x: Tensor, pad: Optional[Tensor]) -> Tensor:
        h, _ = self.project_forward(self.latent.expand(x.shape[0], -1, -1), x, pad)  # (B, K, D)
        return self.project_backward(x, h)[0]  # (B, T, D)


class NLP(nn.Module):
    """Non-local pooling: one learnable query attending to the tokens."""

    def __init__(self, dim: int, heads: int, ln: bool) -> None:
        super().__init__()
        self.S = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.S)
        self.mha = MultiHeadAttention(dim, heads, ln, gated=False)

    def forward(self, x: Tensor, pad: Optional[Tensor], need_weights: bool):
        out, weights = self.mha(self.S.expand(x.shape[0], -1, -1), x, pad, need_weights)
        return out[:, 0], None if weights is None else weights[:, 0]


class ILRA(MILModel):
    """'attention': the pooling query's attention over the tokens (B, T), averaged over heads."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 256, num_layers: int = 2,
                 num_heads: int = 8, num_latents: int = 64, ln: bool = True, dropout: float = 0.25,
                 moe_args: Optional[dict] = None) -> None:
        super().__init__(in_dim, embed_dim, num_classes, moe_args, make_patch_embed(in_dim, embed_dim, None, 1, dropout))
        self.gab_blocks = nn.ModuleList(GAB(embed_dim, num_heads, num_latents, ln) for _ in range(num_layers))
        self.pooling = NLP(embed_dim, num_heads, ln)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def aggregate(self, x, mask, label, return_attention):
        pad = None if mask is None else ~mask
        for block in self.gab_blocks:
            x = block(x, pad)
        bag, weights = self.pooling(x, pad, return_attention)
        out = {"logits": self.classifier(bag)}
        if return_attention:
            out["attention"] = weights
        return out
