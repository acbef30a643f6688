"""Attention-score networks shared by the MIL models, with MIL-Lab's module names
(so their checkpoints load by name): one score per token and per output."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class GlobalAttention(nn.Module):
    """scores = W2 tanh(W1 x): ``module`` = Linear, Tanh, Dropout, Linear."""

    def __init__(self, dim: int, attn_dim: int, dropout: float = 0.0, num_outputs: int = 1) -> None:
        super().__init__()
        self.module = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout),
                                    nn.Linear(attn_dim, num_outputs))

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., num_outputs)
        return self.module(x)


class GlobalGatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): scores = w^T (tanh(V x) * sigmoid(U x)),
    V = ``attention_a``, U = ``attention_b``, w = ``attention_c``."""

    def __init__(self, dim: int, attn_dim: int, dropout: float = 0.0, num_outputs: int = 1) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(attn_dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., num_outputs)
        return self.attention_c(self.attention_a(x) * self.attention_b(x))


def global_attention(gate: bool, dim: int, attn_dim: int, dropout: float = 0.0, num_outputs: int = 1) -> nn.Module:
    """MIL-Lab's choice: gated when ``gate``."""
    return (GlobalGatedAttention if gate else GlobalAttention)(dim, attn_dim, dropout, num_outputs)
