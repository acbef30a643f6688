"""Packed variable-length bags: B bags concatenated along N, described by
``cu_seqlens`` (B + 1 offsets from 0 to total_N, as flash-attention's varlen
interface), turned into the padded (B, max_len, ...) batch with a mask that the
layer and the MIL models run, and back.

``packed_layout`` validates the offsets and gives each packed row its bag and
its place in the bag; ``pad_packed`` scatters rows into the padded batch and
``unpad`` gathers per-row results back. With ``max_seqlen`` given, the padded
shape needs no host read of the offsets, so torch.compile traces it without a
graph break; the checks that read the offsets are skipped where host reads are
not possible (``host_reads``: under compile, during CUDA-graph capture).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .host_reads import host_reads_allowed


class PackedLayout(NamedTuple):
    bag: Tensor  # (total_N,) int64: the bag of each packed row
    pos: Tensor  # (total_N,) int64: its place in the bag
    num_bags: int
    max_len: int  # the padded length


def _check_max_seqlen(who: str, max_seqlen: Optional[int]) -> None:
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < 1):
        raise ValueError(f"{who}: max_seqlen must be a positive int, got {max_seqlen!r}")


def _check_offsets(who: str, cu_seqlens: Tensor, total: int, max_seqlen: Optional[int]) -> int:
    """The offsets' values (host reads): start, end, strictly increasing, max_seqlen
    covering the longest bag. Returns the longest bag's length."""
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"{who}: cu_seqlens must start at 0, got {first}")
    if last != total:
        raise ValueError(f"{who}: cu_seqlens must end at total_N = {total} packed rows, got {last}")
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if bool((lengths <= 0).any()):
        bags = (lengths <= 0).nonzero().flatten().tolist()
        raise ValueError(
            f"{who}: cu_seqlens must be strictly increasing; bag(s) {bags} are empty or negative "
            f"(lengths {lengths.tolist()})"
        )
    longest = int(lengths.max())
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{who}: max_seqlen = {max_seqlen} but the longest bag has {longest} patches")
    return longest


def packed_layout(who: str, feats: Tensor, mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
                  max_seqlen: Optional[int]) -> Optional[PackedLayout]:
    """The layout of packed ``feats`` (total_N, ...) given ``cu_seqlens`` (B + 1,)
    int32/int64 on feats' device, validated; None for padded input (no
    cu_seqlens). ``mask`` belongs to padded input only, ``max_seqlen`` to packed
    input only; ``who`` names the caller in the errors."""
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError(f"{who}: max_seqlen goes with cu_seqlens (packed bags)")
        return None
    if mask is not None:
        raise ValueError(f"{who}: pass either mask (padded bags) or cu_seqlens (packed bags), not both")
    if not isinstance(feats, Tensor) or feats.dim() != 2:
        got = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"{who}: with cu_seqlens, the features must be packed (total_N, dim), got {got}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        got = cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise TypeError(f"{who}: cu_seqlens must be an int32 or int64 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{who}: cu_seqlens must be 1-D with B + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != feats.device:
        raise ValueError(f"{who}: cu_seqlens is on {cu_seqlens.device} but the features are on {feats.device}")
    _check_max_seqlen(who, max_seqlen)
    total = feats.shape[0]
    if host_reads_allowed(cu_seqlens):
        longest = _check_offsets(who, cu_seqlens, total, max_seqlen)
        max_len = longest if max_seqlen is None else max_seqlen
    else:  # no checks: the padded length must come from max_seqlen
        max_len = max_seqlen if max_seqlen is not None else int(cu_seqlens.diff().max())
    starts = cu_seqlens.long()
    rows = torch.arange(total, device=feats.device)
    bag = torch.searchsorted(starts[1:], rows, right=True)
    return PackedLayout(bag, rows - starts[bag], cu_seqlens.numel() - 1, max_len)


def pad_packed(feats: Tensor, layout: PackedLayout) -> Tuple[Tensor, Tensor]:
    """(total_N, F) -> padded (B, max_len, F) with zeros, and the (B, max_len) bool mask."""
    shape = (layout.num_bags, layout.max_len)
    idx = (layout.bag, layout.pos)
    padded = feats.new_zeros(*shape, feats.shape[-1]).index_put(idx, feats)
    mask = torch.zeros(shape, dtype=torch.bool, device=feats.device).index_put(
        idx, torch.ones((), dtype=torch.bool, device=feats.device))
    return padded, mask


def unpad(padded: Tensor, layout: PackedLayout) -> Tensor:
    """(B, max_len, ...) -> packed (total_N, ...)."""
    return padded[layout.bag, layout.pos]
