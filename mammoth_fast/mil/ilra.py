"""ILRA: low-rank attention MIL (Xiang et al., "Exploring Low-Rank Property in
Multiple Instance Learning for Whole Slide Image Classification", ICLR 2023), as
MIL-Lab builds it (same module names, same math).

    features -> num_attention_layers x GAB -> non-local pooling (NLP) -> classifier

GAB (gated attention block) goes through ``topk`` learnable latent tokens L
(topk x D): H = MHA(L, X), then X' = MHA(X, H), so a layer costs O(T * topk),
not O(T^2). NLP is one learnable query S attending to the tokens. Each MHA
block: Q' = fc_q(Q), A = multi-head attention(Q', fc_k(K), fc_v(K)), O = Q' + A,
LayerNorm ln0, O + relu(fc_o(O)), LayerNorm ln1, and in GAB a SiLU gate of the
raw query: O * silu(gate(Q)).

As in MIL-Lab, there is no patch embedding without Mammoth (``patch_embed`` is
the identity) and the first GAB takes the in_dim features itself (its fc_k/fc_v
of the forward block and fc_q/gate of the backward block are in_dim wide); with
Mammoth every GAB is embed_dim wide.

MIL-Lab's wrapper (ILRAModel, which builds their checkpoints) does not pass
``ln`` or ``mode`` to its ILRA, so their models always have the LayerNorms and
classify. Here ``ln=False`` is likewise ignored (with a warning) unless
``honour_ln=True``, which drops the LayerNorms as their ILRA class would; ``mode``
must be 'classification' (their 'survival' branch calls functions that do not
exist).

Defaults as the authors' MIL-Lab ``ilra``: embed_dim 256, 8 heads, 64 latents, 2
layers. embed_dim 256 equals Mammoth's default slot_dim, for which the auto rank
is 0 (their code fails: ZeroDivisionError), so our ``base_mammoth`` config uses
slot_dim 128 (rank 17 at in_dim 1024) and keeps the aggregator unchanged.
Padded tokens are masked as keys (the latents and the pooling query never see
them), so a padded batch equals its bags run alone.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import MILModel


class MultiHeadAttention(nn.Module):
    """MIL-Lab's attention block (a Set-Transformer MAB, optionally gated): queries
    dim_q wide, keys/values dim_k wide, output dim_v wide."""

    def __init__(self, dim_q: int, dim_k: int, dim_v: int, num_heads: int, ln: bool, gated: bool) -> None:
        super().__init__()
        self.multihead_attention = nn.MultiheadAttention(dim_v, num_heads, batch_first=True)
        self.fc_q = nn.Linear(dim_q, dim_v)
        self.fc_k = nn.Linear(dim_k, dim_v)
        self.fc_v = nn.Linear(dim_k, dim_v)
        self.ln0 = nn.LayerNorm(dim_v) if ln else nn.Identity()
        self.ln1 = nn.LayerNorm(dim_v) if ln else nn.Identity()
        self.fc_o = nn.Linear(dim_v, dim_v)
        self.gate = nn.Sequential(nn.Linear(dim_q, dim_v), nn.SiLU()) if gated else None

    def forward(self, q: Tensor, kv: Tensor, pad: Optional[Tensor] = None, need_weights: bool = False):
        """q (B, Lq, dim_q) attends to kv (B, Lk, dim_k); pad (B, Lk) True on padding ->
        (B, Lq, dim_v), and with need_weights the weights (B, Lq, Lk) averaged over heads."""
        q_proj = self.fc_q(q)
        a, weights = self.multihead_attention(q_proj, self.fc_k(kv), self.fc_v(kv), key_padding_mask=pad,
                                              need_weights=need_weights, average_attn_weights=True)
        o = self.ln0(q_proj + a)
        o = self.ln1(o + F.relu(self.fc_o(o)))
        if self.gate is not None:
            o = o * self.gate(q)
        return o, weights


class GAB(nn.Module):
    """Gated attention block through num_latents learnable latent tokens (``latent``):
    dim_in-wide tokens in, dim_out-wide tokens out."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, num_latents: int, ln: bool) -> None:
        super().__init__()
        self.latent = nn.Parameter(torch.empty(1, num_latents, dim_out))
        nn.init.xavier_uniform_(self.latent)
        self.project_forward = MultiHeadAttention(dim_out, dim_in, dim_out, num_heads, ln, gated=True)
        self.project_backward = MultiHeadAttention(dim_in, dim_out, dim_out, num_heads, ln, gated=True)

    def forward(self, x: Tensor, pad: Optional[Tensor]) -> Tensor:
        h, _ = self.project_forward(self.latent.expand(x.shape[0], -1, -1), x, pad)  # (B, K, D)
        return self.project_backward(x, h)[0]  # (B, T, D)


class NLP(nn.Module):
    """Non-local pooling: one learnable query ``S`` attending to the tokens."""

    def __init__(self, dim: int, num_heads: int, ln: bool) -> None:
        super().__init__()
        self.S = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.S)
        self.mha = MultiHeadAttention(dim, dim, dim, num_heads, ln, gated=False)

    def forward(self, x: Tensor, pad: Optional[Tensor], need_weights: bool):
        out, weights = self.mha(self.S.expand(x.shape[0], -1, -1), x, pad, need_weights)
        return out[:, 0], None if weights is None else weights[:, 0]  # (B, D), (B, T)


class ILRA(MILModel):
    """'attention': the pooling query's attention over the tokens (B, T), averaged over
    heads. topk: the number of latent tokens per GAB (MIL-Lab's name).

    honour_ln: False (MIL-Lab's wrapper) always builds the LayerNorms, whatever ``ln``
    says; True makes ``ln=False`` drop them (as MIL-Lab's ILRA class itself does)."""

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, embed_dim: int = 256, num_attention_layers: int = 2,
                 num_heads: int = 8, topk: int = 64, ln: bool = True, mode: str = "classification",
                 moe_args: Optional[dict] = None, honour_ln: bool = False) -> None:
        if mode != "classification":
            raise ValueError(f"ILRA: mode must be 'classification' (MIL-Lab's wrapper ignores mode and their "
                             f"'survival' branch is unimplemented), got {mode!r}")
        if not ln and not honour_ln:
            warnings.warn("ILRA: ln=False is ignored, as MIL-Lab's wrapper ignores it (their models keep the "
                          "LayerNorms); pass honour_ln=True to drop them", stacklevel=2)
        ln = ln or not honour_ln
        super().__init__(in_dim, embed_dim, num_classes, moe_args, nn.Identity())
        first_dim = in_dim if isinstance(self.patch_embed, nn.Identity) else embed_dim
        self.gab_blocks = nn.ModuleList(GAB(first_dim if i == 0 else embed_dim, embed_dim, num_heads, topk, ln)
                                        for i in range(num_attention_layers))
        self.pooling = NLP(embed_dim, num_heads, ln)
        self.classifier = nn.Linear(embed_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        pad = None if mask is None else ~mask  # (B, T) True on padding
        for block in self.gab_blocks:
            x = block(x, pad)
        bag, weights = self.pooling(x, pad, return_attention)
        out = {"logits": self.classifier(bag)}
        if return_attention:
            out["attention"] = weights
        return out
