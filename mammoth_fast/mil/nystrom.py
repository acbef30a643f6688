"""Nystrom self-attention (Xiong et al., "Nystromformer", AAAI 2021) on
variable-length sequences, as TransMIL uses it.

    softmax(Q K^T) V  ~  softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V + conv(V)

Ql, Kl are m landmarks, the means of m contiguous, near-equal segments of the
real tokens; pinv is the iterative Moore-Penrose approximation; conv is a
depthwise convolution over the sequence of each head's values.

Sequence b's real tokens are its first lengths[b]; the rest is padding and
takes no part. A sequence of L real tokens gets min(m, L) landmarks (token i is
in segment floor(i * m_b / L)), so every segment is non-empty; absent landmarks
are masked, and their rows and columns of the m x m kernel are zero, which the
pseudo-inverse keeps zero. The pinv's starting scale is taken per matrix, so a
sequence gives the same output alone or in any batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .base import masked_softmax


def iterative_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in x (..., m, m) by
    the third-order iteration of Razavi et al. (2014), as Nystromformer."""
    a = x.abs()
    scale = a.sum(dim=-1).amax(dim=-1) * a.sum(dim=-2).amax(dim=-1)  # (...,): max row sum * max column sum
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 8, num_landmarks: int = 256, pinv_iterations: int = 6,
                 conv_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"NystromAttention: dim={dim} is not divisible by heads={heads}")
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                                  bias=False)

    def forward(self, x: Tensor, lengths: Tensor, return_first_row: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """x (B, L, dim), lengths (B,) -> (B, L, dim), and with return_first_row
        the attention of token 0 over the sequence (B, L), averaged over heads."""
        seq = x.shape[1]
        pos = torch.arange(seq, device=x.device)
        real = pos < lengths[:, None]  # (B, L)
        q, k, v = rearrange(self.to_qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k, v = (t.masked_fill(~real[:, None, :, None], 0.0) for t in (q, k, v))
        q = q * self.scale

        m = self.num_landmarks
        n_land = lengths.clamp(max=m)  # (B,)
        segment = pos * n_land[:, None] // lengths[:, None]  # (B, L)
        member = (segment[:, None, :] == torch.arange(m, device=x.device)[:, None]) & real[:, None, :]  # (B, m, L)
        mean = member.to(x.dtype) / member.sum(dim=-1, keepdim=True).clamp(min=1)
        q_land, k_land = (torch.einsum("bml,bhld->bhmd", mean, t) for t in (q, k))  # (B, H, m, d)
        land = (torch.arange(m, device=x.device) < n_land[:, None])[:, None, None, :]  # (B, 1, 1, m)

        attn1 = masked_softmax(q @ k_land.transpose(-1, -2), land, dim=-1)  # (B, H, L, m)
        attn2 = masked_softmax(q_land @ k_land.transpose(-1, -2), land, dim=-1)  # (B, H, m, m)
        attn2 = attn2 * land.transpose(-1, -2)  # rows of absent landmarks zero
        attn3 = masked_softmax(q_land @ k.transpose(-1, -2), real[:, None, None, :], dim=-1)  # (B, H, m, L)
        left = attn1 @ iterative_pinv(attn2, self.pinv_iterations)  # (B, H, L, m)
        out = left @ (attn3 @ v) + self.res_conv(v)  # (B, H, L, d)
        out = self.to_out(rearrange(out, "b h l d -> b l (h d)"))
        first_row = (left[:, :, :1] @ attn3).squeeze(2).mean(dim=1) if return_first_row else None
        return out, first_row
