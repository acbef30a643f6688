"""RRT-MIL as MIL-Lab builds it (their ``rrt``, commit fe36d4e): a pre-norm
Nystrom transformer with attention pooling, not the paper's R-MSA / CR-MSA
(Tang et al., "Feature Re-Embedding: Towards Foundation Model-Level Performance
in Computational Pathology", CVPR 2024).

    h -> patch_embed (Linear + act, or Mammoth) -> Dropout
      -> n_layers x n_cycle x [x + DropPath(Nystrom(LN(x))) (+ x + DropPath(Mlp(LN(x))) with ffn)
                               (-> PatchMerging with multi_scale, except in the last layer)]
      -> LN -> attention pooling (pool_fn) -> classifier

What their wrapper (RRTMILModel -> RRTMIL -> RRTEncoder -> TransLayer1) really
does with the config's keys, reproduced here:

- ``attn`` is consumed by RRTEncoder and never handed to its layers, so every
  layer is Nystrom attention ('ntrans'; lucidrains' nystrom_attention as copied
  into MIL-Lab): heads ``n_heads``, head width ``trans_dim``, 256 landmarks, 6
  pinv iterations, the 33-tap value convolution, no mask. The region keys
  (``region_num``, ``epeg``, ``min_region_num``, ``shift_size``, ``qkv_bias``)
  only matter for attn 'rrt', so they are unused.
- ``trans_dropout`` is swallowed by ``**kwargs`` and the layers get RRTMIL's
  own ``drop_out`` (0.0): the attention output has no dropout.
- ``pos`` ('ppeg' or 'peg') builds a position encoding (``pos_embedding``,
  kernel ``peg_k``) that forward never applies; it is kept only because its
  parameters are in their checkpoints ('sincos' has none, and their SINCOS
  fails to build under numpy >= 1.24). ``pos_pos`` and ``no_norm`` are unused.
- pooling (``pool`` 'attn'): ABMIL-style attention of hidden width 128 named
  ``pool_fn.attention``: plain (``.attention`` = Linear, ``da_act``, Dropout(0.25)
  with ``da_dropout``, Linear) or gated with ``da_gated`` (``attention_a/b/c``),
  biases with ``da_bias``; the classifier reads the pooled feature.
- Nystrom per bag: the sequence of n tokens is zero-padded at the front to a
  multiple of the 256 landmarks; those zero rows take part (they dilute the
  first landmark means and are keys of logit 0 with zero values in the
  landmark-to-token softmax), each landmark is the mean of ceil(n / 256)
  consecutive rows, and the pinv's starting scale is the largest row sum times
  the largest column sum over all heads of the bag.

Batches: each bag's real tokens are moved to the front (in order) and every
per-bag quantity above (front padding, landmark size, pinv scale, grid of the
patch merging) is computed from its own length, so a bag gives the same output
alone or in a padded batch; padding takes no part.

``original=True`` (ours; config 'original') is the paper's re-embedding in
the same skeleton: R-MSA layers and one CR-MSA layer (see RRTMIL).

Their code crashes for some settings; here: ``embed_dim != mlp_dim`` and
``multi_scale`` with ``n_layers < 2`` or ``n_cycle > 1`` raise ValueError (their
widths do not match), and ``pool`` other than 'attn' (their forward fails to
unpack the mean-pooled output) mean-pools the real tokens, 'attention' then
being the uniform weights.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .base import MILModel, masked_softmax, safe_masked_softmax
from .nystrom import NystromAttention

NUM_LANDMARKS, PINV_ITERATIONS = 256, 6  # MIL-Lab's TransLayer1 for attn 'ntrans'
POOL_DIM, POOL_DROPOUT = 128, 0.25  # their DAttention's hidden width and dropout
EPEG_K, CRMSA_K = 15, 3  # the paper's defaults (original=True)


def activation(name: str) -> nn.Module:
    """MIL-Lab's get_act (the gated pooling's activation)."""
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "leakyrelu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
            "silu": nn.SiLU}
    if name.lower() not in acts:
        raise ValueError(f"RRTMIL: invalid activation {name!r}, one of {sorted(acts)}")
    return acts[name.lower()]()


class DropPath(nn.Module):
    """Stochastic depth per bag (timm's DropPath, which MIL-Lab imports)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:  # (B, ...)
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p) if self.p < 1.0 else x * keep


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop (MIL-Lab's second Mlp, used with ffn)."""

    def __init__(self, dim: int, hidden: int, act: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchMerging(nn.Module):
    """multi_scale's downsampling, per bag: the n tokens fill a side x side grid
    row-major (side = ceil(sqrt(n)) rounded up to even, zero cells after them),
    each 2 x 2 block's cells (0,0), (1,0), (0,1), (1,1) are concatenated, then
    LN(4 dim) and a Linear to 2 dim: (side / 2)^2 tokens, all real afterwards."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, L, D), bag b's tokens its first lengths[b] -> (B, L', 2D), lengths (B,)."""
        bsz, seq, d = x.shape
        side = torch.ceil(torch.sqrt(lengths.double())).long()
        side = side + side % 2  # (B,)
        half = side // 2
        big = math.ceil(math.sqrt(seq))
        t = torch.arange((big + big % 2) ** 2 // 4, device=x.device)  # (L',): enough for every bag
        row, col = t // half[:, None], t % half[:, None]  # (B, L') block of each output token
        parts = []
        for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1)):
            cell = (2 * row + dr) * side[:, None] + 2 * col + dc  # (B, L')
            ok = (cell < lengths[:, None]) & (t < (half * half)[:, None])
            picked = torch.gather(x, 1, cell.clamp(max=seq - 1)[..., None].expand(-1, -1, d))
            parts.append(picked * ok[..., None])
        return self.reduction(self.norm(torch.cat(parts, dim=-1))), half * half


def region_layout(mask: Tensor, region_num: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Where each bag's real tokens sit in its regions (original=True).

    The n real tokens (mask (B, T), in order) fill a side x side grid row-major,
    side = ceil(sqrt(n)) rounded up to a multiple of region_num; region (i, j)
    is the i-th block row and j-th block column, of side s = side / region_num,
    its cells in row-major order. Returns index (B, R, N) (the token at cell n
    of region r), valid (B, R, N) (False on grid padding and on cells past the
    bag's own region size) and pos (B, T) (the flat cell r * N + n of each real
    token; 0 for padding), with R = region_num^2 and N the largest region size
    squared."""
    bsz, t = mask.shape
    device = mask.device
    n = mask.sum(dim=1)
    order = torch.argsort(~mask, dim=1, stable=True)  # real tokens first, in order
    side = torch.ceil(torch.sqrt(n.double())).long()
    side = (side + region_num - 1) // region_num * region_num  # (B,)
    size = side // region_num  # (B,) region side
    n_cells = int(size.max()) ** 2
    regions = region_num * region_num
    r = torch.arange(regions, device=device)[None, :, None]  # (1, R, 1)
    j = torch.arange(n_cells, device=device)[None, None, :]  # (1, 1, N)
    s, sd, nb = size[:, None, None], side[:, None, None], n[:, None, None]
    row = (r // region_num) * s + j // s
    col = (r % region_num) * s + j % s
    cell = row * sd + col  # (B, R, N): row-major grid position
    valid = (j < s * s) & (cell < nb)
    index = torch.gather(order, 1, torch.minimum(cell, nb - 1).flatten(1)).view(bsz, regions, n_cells)
    flat = torch.arange(regions * n_cells, device=device).expand(bsz, -1)
    pos = torch.zeros(bsz, t + 1, dtype=torch.long, device=device)  # column t collects the invalid cells
    pos.scatter_(1, torch.where(valid, index, t).flatten(1), flat)
    return index, valid, pos[:, :t]


def on_regions(attend, x: Tensor, lengths: Tensor, region_num: int) -> Tensor:
    """Run attend (cells (B, R, N, D), valid (B, R, N) -> (B, R, N, D)) on each bag's
    regions of x (B, L, D) (bag b's tokens its first lengths[b]); back in token
    order (B, L, D), zero on padding."""
    bsz, seq, d = x.shape
    real = torch.arange(seq, device=x.device) < lengths[:, None]  # (B, L)
    index, valid, pos = region_layout(real, region_num)
    cells = torch.gather(x, 1, index.view(bsz, -1, 1).expand(-1, -1, d)).view(*index.shape, d)
    z = attend(cells, valid).reshape(bsz, -1, d)
    return torch.gather(z, 1, pos[..., None].expand(-1, -1, d)) * real[..., None]


class RegionAttention(nn.Module):
    """R-MSA (original=True): multi-head self-attention within each region, with
    EPEG: a depthwise (epeg_k x 1) convolution of each head's attention logits
    along the query axis is added to them (padding query rows zeroed first,
    which is the convolution's zero padding); epeg_k = 0 turns it off."""

    def __init__(self, dim: int, heads: int, region_num: int, epeg_k: int, qkv_bias: bool, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"RRTMIL: dim={dim} is not divisible by n_heads={heads}")
        self.heads, self.region_num, self.scale = heads, region_num, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.pe = (nn.Conv2d(heads, heads, (epeg_k, 1), padding=(epeg_k // 2, 0), groups=heads)
                   if epeg_k else None)
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def attend(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (..., N, D), valid (..., N) -> (..., N, D); invalid cells give finite junk."""
        lead = x.shape[:-2]
        x, valid = x.reshape(-1, *x.shape[-2:]), valid.reshape(-1, valid.shape[-1])
        q, k, v = rearrange(self.qkv(x), "z n (three h d) -> three z h n d", three=3, h=self.heads)
        logits = (q * self.scale) @ k.transpose(-1, -2)  # (Z, H, N, N)
        if self.pe is not None:
            logits = logits.masked_fill(~valid[:, None, :, None], 0.0)
            logits = logits + self.pe(logits)
        attn = safe_masked_softmax(logits, valid[:, None, None, :], dim=-1)
        out = self.proj(rearrange(attn @ v, "z h n d -> z n (h d)"))
        return out.view(*lead, *out.shape[-2:])

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        return on_regions(self.attend, x, lengths, self.region_num)


class CrossRegionAttention(nn.Module):
    """CR-MSA (original=True): per region, k representatives, each a softmax (over
    the region's cells) of x @ phi weighted sum of the cells; multi-head
    self-attention across the regions, per representative; each cell gets back
    sum_k out_k * minmax_k * softmax_k, with minmax the min-max normalised logit
    over the region's cells and softmax over the k representatives. An
    all-padding region gives no representative."""

    def __init__(self, dim: int, heads: int, region_num: int, k: int, qkv_bias: bool, dropout: float) -> None:
        super().__init__()
        self.region_num = region_num
        self.attn = RegionAttention(dim, heads, region_num, 0, qkv_bias, dropout)
        self.phi = nn.Parameter(torch.empty(dim, k))
        nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))

    def attend(self, x: Tensor, valid: Tensor) -> Tensor:
        """x (B, R, N, D), valid (B, R, N) -> (B, R, N, D)."""
        logits = torch.einsum("brnd,dk->brkn", x, self.phi)  # (B, R, K, N)
        cell = valid[:, :, None, :]
        combine = safe_masked_softmax(logits, cell, dim=-1)  # over the region's real cells
        dispatch = logits.softmax(dim=2)  # over the k representatives, per cell
        region = valid.any(dim=-1)  # (B, R)
        has = region[:, :, None, None]
        lo = torch.where(has, logits.masked_fill(~cell, float("inf")).amin(dim=-1, keepdim=True), 0.0)
        hi = torch.where(has, logits.masked_fill(~cell, float("-inf")).amax(dim=-1, keepdim=True), 0.0)
        scaled = (logits - lo) / (hi - lo + 1e-8)
        reps = torch.einsum("brkn,brnd->bkrd", combine, x)  # (B, K, R, D)
        mixed = self.attn.attend(reps, region[:, None, :].expand(-1, reps.shape[1], -1))  # across regions
        return torch.einsum("bkrd,brkn->brnd", mixed, scaled * dispatch)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        return on_regions(self.attend, x, lengths, self.region_num)


class TransLayer(nn.Module):
    """MIL-Lab's TransLayer1 (module names theirs): n_cycle times
    x + DropPath(attn(norm(x))), then x + DropPath(mlp(norm2(x))) with ffn, then
    downsample (PatchMerging) with need_down. attn: a module (x (B, L, D),
    lengths (B,)) -> (B, L, D), Nystrom attention in MIL-Lab."""

    def __init__(self, dim: int, attn: nn.Module, drop_path: float, need_down: bool, ffn: bool, ffn_act: str,
                 mlp_ratio: float, n_cycle: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim) if ffn else None
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), ffn_act, dropout) if ffn else None
        self.downsample = PatchMerging(dim) if need_down else None
        self.n_cycle = n_cycle

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, L, D), bag b's tokens its first lengths[b] -> (B, L', D'), lengths (B,)."""
        for _ in range(self.n_cycle):
            x = x + self.drop_path(self.attn(self.norm(x), lengths))
            if self.mlp is not None:
                x = x + self.drop_path(self.mlp(self.norm2(x)))
            if self.downsample is not None:
                x, lengths = self.downsample(x, lengths)
        return x, lengths


class PositionEncoding(nn.Module):
    """The PPEG ('ppeg': proj, proj1, proj2 of kernels peg_k, 5, 3) or PEG ('peg':
    proj) that MIL-Lab's RRTEncoder builds as ``pos_embedding`` and never applies:
    parameters only, so that their checkpoints load; it has no forward."""

    def __init__(self, dim: int, pos: str, k: int) -> None:
        super().__init__()
        kernels = {"proj": k, "proj1": 5, "proj2": 3} if pos == "ppeg" else {"proj": k}
        for name, size in kernels.items():
            self.add_module(name, nn.Conv2d(dim, dim, size, padding=size // 2, groups=dim))


class Attention(nn.Module):
    """Their pooling score network: ``attention`` = Linear(dim, 128), act ('gelu',
    'relu' or 'tanh', else none), Dropout(0.25) with dropout, Linear(128, 1)."""

    def __init__(self, dim: int, act: str, bias: bool, dropout: bool) -> None:
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}
        layers = [nn.Linear(dim, POOL_DIM, bias=bias)] + ([acts[act]()] if act in acts else [])
        layers += [nn.Dropout(POOL_DROPOUT)] if dropout else []
        self.attention = nn.Sequential(*layers, nn.Linear(POOL_DIM, 1, bias=bias))

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., 1)
        return self.attention(x)


class AttentionGated(nn.Module):
    """Their gated score network: attention_c(attention_a(x) * attention_b(x)),
    a = Linear + get_act(act), b = Linear + Sigmoid (each + Dropout(0.25) with dropout)."""

    def __init__(self, dim: int, act: str, bias: bool, dropout: bool) -> None:
        super().__init__()
        drop = [nn.Dropout(POOL_DROPOUT)] if dropout else []
        self.attention_a = nn.Sequential(nn.Linear(dim, POOL_DIM, bias=bias), activation(act), *drop)
        drop = [nn.Dropout(POOL_DROPOUT)] if dropout else []
        self.attention_b = nn.Sequential(nn.Linear(dim, POOL_DIM, bias=bias), nn.Sigmoid(), *drop)
        self.attention_c = nn.Linear(POOL_DIM, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., 1)
        return self.attention_c(self.attention_a(x) * self.attention_b(x))


class AttentionPool(nn.Module):
    """MIL-Lab's DAttention (``pool_fn``): softmax over the tokens of the scores of ``attention``."""

    def __init__(self, dim: int, act: str, gated: bool, bias: bool, dropout: bool) -> None:
        super().__init__()
        self.attention = (AttentionGated if gated else Attention)(dim, act, bias, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, L, D), mask (B, L) -> pooled (B, D), weights (B, L)."""
        a = masked_softmax(self.attention(x).squeeze(-1), mask, dim=-1)
        return torch.einsum("bl,bld->bd", a, x), a


class RRTEncoder(nn.Module):
    """MIL-Lab's RRTEncoder: layer1, layers, norm, pool_fn (and the unused
    pos_embedding); with original, the layers' attention is R-MSA and cr_msa
    follows them."""

    def __init__(self, mlp_dim: int, n_layers: int, n_heads: int, trans_dim: int, drop_path: float,
                 multi_scale: bool, ffn: bool, ffn_act: str, mlp_ratio: float, n_cycle: int, pool: str, da_act: str,
                 da_gated: bool, da_bias: bool, da_dropout: bool, pos: str, peg_k: int, original: bool,
                 region_num: int, epeg: bool, qkv_bias: bool, trans_dropout: float,
                 num_landmarks: int = NUM_LANDMARKS) -> None:
        super().__init__()
        self.multi_scale = multi_scale
        self.final_dim = mlp_dim * 2 ** (n_layers - 1) if multi_scale else mlp_dim
        self.pool_fn = AttentionPool(self.final_dim, da_act, da_gated, da_bias, da_dropout) if pool == "attn" else None
        self.norm = nn.LayerNorm(self.final_dim)
        dropout = trans_dropout if original else 0.0  # MIL-Lab's layers get RRTMIL's drop_out = 0.0

        def attention(dim: int) -> nn.Module:
            if original:
                return RegionAttention(dim, n_heads, region_num, EPEG_K if epeg else 0, qkv_bias, dropout)
            return NystromAttention(dim, trans_dim, n_heads, num_landmarks, PINV_ITERATIONS)

        def layer(dim: int, need_down: bool) -> TransLayer:
            return TransLayer(dim, attention(dim), drop_path, need_down, ffn, ffn_act, mlp_ratio, n_cycle, dropout)

        self.layer1 = layer(mlp_dim, multi_scale)
        dims = [mlp_dim * 2 ** (i + 1) if multi_scale else mlp_dim for i in range(max(n_layers - 1, 0))]
        self.layers = nn.ModuleList(layer(d, multi_scale and i < len(dims) - 1) for i, d in enumerate(dims))
        self.pos_embedding = PositionEncoding(mlp_dim, pos, peg_k) if pos in ("ppeg", "peg") else None
        self.cr_msa = (TransLayer(self.final_dim, CrossRegionAttention(self.final_dim, n_heads, region_num, CRMSA_K,
                                                                       qkv_bias, dropout),
                                  drop_path, False, ffn, ffn_act, mlp_ratio, 1, dropout) if original else None)

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D), bag b's tokens its first lengths[b] -> pooled (B, final_dim),
        weights (B, L') over the last layer's tokens, and their lengths (B,)."""
        for layer in (self.layer1, *self.layers):
            x, lengths = layer(x, lengths)
        if self.cr_msa is not None:
            x, lengths = self.cr_msa(x, lengths)
        x = self.norm(x)
        real = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, L')
        if self.pool_fn is not None:
            pooled, a = self.pool_fn(x, real)
        else:  # mean over the real tokens (their code crashes here)
            a = real.to(x.dtype) / lengths[:, None].to(x.dtype)
            pooled = torch.einsum("bl,bld->bd", a, x)
        return pooled, a, lengths


class RRTMIL(MILModel):
    """MIL-Lab's RRTMIL: patch_embed, dropout, encoder, classifier on encoder.final_dim.

    The keyword arguments are MIL-Lab's config keys (defaults of their
    RRTMILConfig); see the module docstring for which of them their code uses.
    'attention': the pooling weights (B, T) over the tokens, zero on padding;
    with multi_scale over the last layer's merged tokens (B, T') instead.

    original (ours, default False = MIL-Lab): the paper's re-embedding instead of
    Nystrom attention: every layer's attention is R-MSA (region_num x region_num
    regions per bag, n_heads heads of width dim / n_heads, qkv biases with
    qkv_bias, EPEG of kernel 15 with epeg, output dropout trans_dropout, as the
    Mlp's) and one CR-MSA layer (``encoder.cr_msa``, 3 representatives per region)
    follows the layers, before the norm. The config 'original' has n_layers 1
    (the paper's one R-MSA + one CR-MSA), epeg and no position encoding. Unlike
    the paper's code, which fills the grid with zero tokens that take part, the
    grid padding is masked (see CrossRegionAttention). MIL-Lab checkpoints do
    not load into it.

    num_landmarks (ours): the Nystrom layers' landmark count, MIL-Lab's 256 by
    default (its cost, a 256 x 256 pseudo-inverse per bag and head, does not
    shrink with the bag; smaller values are for quick experiments and tests).
    """

    def __init__(self, in_dim: int = 1024, num_classes: int = 2, mlp_dim: int = 512, embed_dim: int = 512,
                 act: str = "relu", dropout: float = 0.25, pos_pos: int | str = "none", pos: str = "ppeg",
                 peg_k: int = 7, attn: str = "ntrans", pool: str = "attn", region_num: int = 8, n_layers: int = 2,
                 n_heads: int = 8, multi_scale: bool = False, drop_path: float = 0.0, da_act: str = "relu",
                 trans_dropout: float = 0.1, ffn: bool = False, ffn_act: str = "gelu", mlp_ratio: float = 4.0,
                 da_gated: bool = False, da_bias: bool = False, da_dropout: bool = False, trans_dim: int = 64,
                 n_cycle: int = 1, epeg: bool = False, min_region_num: int = 0, qkv_bias: bool = True,
                 shift_size: bool = False, no_norm: bool = False, moe_args: Optional[dict] = None,
                 original: bool = False, num_landmarks: int = NUM_LANDMARKS) -> None:
        del pos_pos, attn, min_region_num, shift_size, no_norm  # unused by MIL-Lab's code (and ours)
        if embed_dim != mlp_dim:
            raise ValueError(f"RRTMIL: embed_dim ({embed_dim}) must equal mlp_dim ({mlp_dim}), the encoder's width")
        if multi_scale and (n_layers < 2 or n_cycle > 1):
            raise ValueError("RRTMIL: multi_scale needs n_layers >= 2 and n_cycle == 1 (MIL-Lab's widths do not "
                             f"match otherwise), got n_layers={n_layers}, n_cycle={n_cycle}")
        if original and region_num < 1:
            raise ValueError(f"RRTMIL: region_num must be >= 1, got {region_num}")
        acts = {"relu": [nn.ReLU()], "gelu": [nn.GELU()]}
        mammoth = bool(moe_args) and moe_args.get("num_experts", 0) > 0
        super().__init__(in_dim, embed_dim, num_classes, moe_args, None if mammoth else
                         nn.Sequential(nn.Linear(in_dim, embed_dim), *acts.get(act.lower(), [])))
        self.dropout = nn.Dropout(dropout)
        self.encoder = RRTEncoder(mlp_dim, n_layers, n_heads, trans_dim, drop_path, multi_scale, ffn, ffn_act,
                                  mlp_ratio, n_cycle, pool, da_act, da_gated, da_bias, da_dropout, pos, peg_k,
                                  original, region_num, epeg, qkv_bias, trans_dropout, num_landmarks)
        self.classifier = nn.Linear(self.encoder.final_dim, num_classes)
        self.initialize_weights()

    def aggregate(self, x, mask, label, return_attention):
        bsz, t, _ = x.shape
        x = self.dropout(x)
        if mask is None:
            lengths = torch.full((bsz,), t, device=x.device)
        else:
            lengths = mask.sum(dim=1)
            order = torch.argsort(~mask, dim=1, stable=True)  # (B, T): real tokens first, in order
            x = torch.gather(x, 1, order[..., None].expand_as(x))
        pooled, a, _ = self.encoder(x, lengths)
        out = {"logits": self.classifier(pooled)}
        if return_attention:
            if mask is not None and not self.encoder.multi_scale:  # back to the tokens' places
                a = torch.zeros_like(a).scatter(1, order, a)
            out["attention"] = a
        return out
