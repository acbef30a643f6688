"""Nystrom self-attention (Xiong et al., "Nystromformer", AAAI 2021) computing
what lucidrains' ``nystrom_attention.NystromAttention`` (0.0.14, called without
its mask) computes, which MIL-Lab's TransMIL and RRT-MIL use, on a batch of
sequences of different lengths.

    out = softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V  [+ conv(V)]

lucidrains' computation, for one sequence of L tokens and m landmarks:
  * the sequence is zero-padded at the FRONT with P = (-L) mod m rows, to
    m * l tokens (l = ceil(L / m)); these rows have zero queries, keys and
    values (to_qkv has no bias) and, with no mask, take part as tokens;
  * landmark j is the sum of padded tokens j*l .. j*l + l - 1 divided by l
    (the zero rows count in the divisor);
  * all m landmarks enter the two landmark softmaxes (a landmark of zero rows
    only has logit 0), and the P zero keys enter softmax(Ql K^T) with logit 0;
  * pinv: third-order Newton iteration (Razavi et al. 2014) started at
    x^T / (max row sum * max column sum), the maxima over the WHOLE tensor,
    i.e. over all heads of their single sequence;
  * conv: a depthwise (per head) conv of kernel 33 along the sequence of V;
    the front zero rows act as the conv's own zero padding;
  * the last L rows of the output are returned.

Here sequence b is x[b, :lengths[b]], the rest of the row padding that takes
no part. Each sequence gets its own P_b and l_b; its P_b zero keys are folded
into one extra softmax column of logit log(P_b) (their values are zero), and
the pinv's start is scaled per sequence over its heads. A sequence therefore
gives lucidrains' result for it alone, alone or in any batch.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor


def iterative_pinv(x: Tensor, iters: int = 6) -> Tensor:
    """Approximate Moore-Penrose pseudo-inverse of each (m, m) matrix of x
    (B, ..., m, m), by lucidrains' ``moore_penrose_iter_pinv``: z0 = x^T / (max
    row sum of |x| * max column sum of |x|), the maxima taken per leading index
    b over all its matrices (lucidrains takes them over the whole tensor, which
    is one sequence's heads at batch size one), then ``iters`` steps of
    z <- z/4 (13 I - xz (15 I - xz (7 I - xz)))."""
    a = x.abs()
    scale = a.sum(dim=-1).flatten(1).amax(dim=1) * a.sum(dim=-2).flatten(1).amax(dim=1)  # (B,)
    z = x.transpose(-1, -2) / scale.view(-1, *[1] * (x.dim() - 1))
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """lucidrains' NystromAttention (same arguments, defaults and module names:
    ``to_qkv``, ``to_out.0``, ``res_conv``, so its state_dict loads as is). Their
    ``mask`` and ``eps`` (which only enters with it) are left out: ``lengths``
    takes its place, and means 'as if the sequence were alone', which their mask
    does not."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual: bool = True, residual_conv_kernel: int = 33,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None,
                return_first_row: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """x (B, L, dim); lengths (B,) int: sequence b is x[b, :lengths[b]] (None: all L).
        Returns out (B, L, dim), zero past each sequence's end, and with
        return_first_row also the Nystrom attention row of each sequence's
        first token over its tokens, per head (B, H, L), zero past the end (the
        share of the front zero keys is not in it, so it sums to less than 1
        when the sequence was padded)."""
        bsz, seq, _ = x.shape
        m = self.num_landmarks
        pos = torch.arange(seq, device=x.device)
        if lengths is None:
            lengths = torch.full((bsz,), seq, device=x.device, dtype=torch.long)
        real = pos < lengths[:, None]  # (B, L)
        q, k, v = rearrange(self.to_qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        pad = ~real[:, None, :, None]
        q, k, v = (t.masked_fill(pad, 0.0) for t in (q, k, v))  # padding rows zero, as lucidrains' own zero rows
        q = q * self.scale

        group = -(-lengths // m)  # (B,) l_b: padded tokens per landmark
        front = group * m - lengths  # (B,) P_b: zero rows lucidrains puts in front
        q_land, k_land = (self._landmarks(t, group, front) for t in (q, k))  # (B, H, m, d)

        attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, H, L, m)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, H, m, m)
        sim3 = (q_land @ k.transpose(-1, -2)).masked_fill(~real[:, None, None, :], float("-inf"))  # (B, H, m, L)
        zeros = torch.log(front.to(x.dtype)).view(bsz, 1, 1, 1).expand(*sim3.shape[:-1], 1)  # P_b keys of logit 0
        attn3 = torch.cat([sim3, zeros], dim=-1).softmax(dim=-1)[..., :seq]  # (B, H, m, L)
        left = attn1 @ iterative_pinv(attn2, self.pinv_iterations)  # (B, H, L, m)
        out = left @ (attn3 @ v)  # (B, H, L, d)
        if self.residual:
            out = out + self.res_conv(v)
        out = self.to_out(rearrange(out, "b h l d -> b l (h d)")).masked_fill(~real[..., None], 0.0)
        if not return_first_row:
            return out
        return out, (left[:, :, :1] @ attn3).squeeze(2)

    def _landmarks(self, t: Tensor, group: Tensor, front: Tensor) -> Tensor:
        """t (B, H, L, d) -> (B, H, m, d): landmark j of sequence b is the sum of its
        front-padded rows j*l_b .. j*l_b + l_b - 1, over l_b. Gathered into an
        (m, l_max) table (l_max from the static length), zeros where a slot holds a
        front zero row or lies past l_b."""
        m, seq = self.num_landmarks, t.shape[2]
        width = -(-seq // m)  # l_max >= every l_b
        slot = torch.arange(m * width, device=t.device)
        col = slot % width
        src = (slot // width) * group[:, None] + col - front[:, None]  # (B, m*l_max): row of x
        valid = (col < group[:, None]) & (src >= 0)
        src = torch.where(valid, src, 0)
        rows = torch.gather(t, 2, src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
        rows = rows * valid[:, None, :, None]
        table = rearrange(rows, "b h (m w) d -> b h m w d", m=m)
        return table.sum(dim=3) / group.to(t.dtype)[:, None, None, None]
