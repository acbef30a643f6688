"""Batches of several bags for a DataLoader's ``collate_fn``, in the two forms
the layer and the MIL models take (see ``mammoth_fast/packing.py``):

- padded: features (B, M, D) with M the longest bag, zeros past each bag's
  end, and a (B, M) bool mask, True for real patches;
- packed: the bags concatenated, features (total_N, D), with ``cu_seqlens``
  (B + 1,) int32 offsets from 0 to total_N and ``max_seqlen`` = M.

And a class-balanced sampler: each slide drawn with probability inversely
proportional to its class's size, so every class is drawn equally often.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import WeightedRandomSampler

from .dataset import SlideItem


class PaddedBatch(NamedTuple):
    features: Tensor  # (B, M, D), zeros past each bag's end
    mask: Tensor  # (B, M) bool, True for real patches
    labels: Tensor  # (B,) int64
    slide_ids: List[str]

    def to(self, device, non_blocking: bool = False) -> "PaddedBatch":
        return PaddedBatch(self.features.to(device, non_blocking=non_blocking),
                           self.mask.to(device, non_blocking=non_blocking),
                           self.labels.to(device, non_blocking=non_blocking), self.slide_ids)


class PackedBatch(NamedTuple):
    features: Tensor  # (total_N, D), the bags one after another
    cu_seqlens: Tensor  # (B + 1,) int32: bag b is rows cu_seqlens[b]:cu_seqlens[b + 1]
    max_seqlen: int  # the longest bag's length
    labels: Tensor  # (B,) int64
    slide_ids: List[str]

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return PackedBatch(self.features.to(device, non_blocking=non_blocking),
                           self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen,
                           self.labels.to(device, non_blocking=non_blocking), self.slide_ids)


def _labels(items: Sequence[SlideItem]) -> Tensor:
    return torch.tensor([item.label for item in items], dtype=torch.int64)


def collate_padded(items: Sequence[SlideItem]) -> PaddedBatch:
    """Pad B bags (N_b, D) to (B, max N_b, D) with a mask."""
    feats = [item.features for item in items]
    lengths = torch.tensor([f.shape[0] for f in feats])  # (B,)
    padded = pad_sequence(feats, batch_first=True)  # (B, M, D)
    mask = torch.arange(padded.shape[1]) < lengths[:, None]  # (B, M)
    return PaddedBatch(padded, mask, _labels(items), [item.slide_id for item in items])


def collate_packed(items: Sequence[SlideItem]) -> PackedBatch:
    """Concatenate B bags (N_b, D) into (sum N_b, D) with their offsets."""
    feats = [item.features for item in items]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int32)  # (B,)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])  # (B + 1,)
    return PackedBatch(torch.cat(feats), cu_seqlens, int(lengths.max()), _labels(items),
                       [item.slide_id for item in items])


def class_balanced_sampler(labels, num_samples: Optional[int] = None,
                           generator: Optional[torch.Generator] = None) -> WeightedRandomSampler:
    """A sampler (with replacement) of ``num_samples`` indices (default: as many
    as labels) into ``labels`` (S,), each index weighted 1 / (its class's count)."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)  # (C,)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)  # (S,)
    return WeightedRandomSampler(weights, len(labels) if num_samples is None else num_samples,
                                 replacement=True, generator=generator)


__all__ = ["PackedBatch", "PaddedBatch", "class_balanced_sampler", "collate_packed", "collate_padded"]
