"""A torch Dataset of slides: each item is one slide's bag of features with its
class index, read from a features store by slide id.

A store is anything that maps a slide id to its float32 features (N, D) with
``store[slide_id]`` and answers ``slide_id in store``: a
:class:`~mammoth_fast.data.features.FeatureFolder` (the .h5 / .pt files), a
:class:`~mammoth_fast.data.cache.FeatureCache` (one memory-mapped file), or a
plain dict of tensors (bags held in memory).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError
from .labels import LabelTable


class SlideItem(NamedTuple):
    features: Tensor  # (N, D) float32
    label: int  # class index
    slide_id: str


class SlideDataset(Dataset):
    """The slides ``slide_ids`` (default: all of ``table``, in its order) of a
    label table, their features read from ``store``. Every slide must be in the
    table and in the store: a slide without features is a DataError here, not a
    slide skipped later."""

    def __init__(self, table: LabelTable, store, slide_ids: Optional[Iterable[str]] = None):
        index = table.index
        self.slide_ids = list(table.slide_ids if slide_ids is None else slide_ids)
        unknown = [s for s in self.slide_ids if s not in index]
        if unknown:
            raise DataError(f"slide {unknown[0]!r} is not in the label table {table.source}"
                            + (f" ({len(unknown)} slides are not)" if len(unknown) > 1 else ""))
        missing = [s for s in self.slide_ids if s not in store]
        if missing:
            first = missing[0]
            looked = (f" (looked for {', '.join(str(p) for p in store.candidates(first))})"
                      if hasattr(store, "candidates") else "")
            more = f"; {len(missing)} of {len(self.slide_ids)} slides have none" if len(missing) > 1 else ""
            raise DataError(f"slide {first!r} of {table.source} has no features file{looked}{more}")
        self.store = store
        self.table = table
        self.labels = table.labels[[index[s] for s in self.slide_ids]]  # (len,) int64

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> SlideItem:
        slide = self.slide_ids[i]
        return SlideItem(self.store[slide], int(self.labels[i]), slide)

    def class_counts(self) -> np.ndarray:
        """(C,) int64: slides per class."""
        return np.bincount(self.labels, minlength=len(self.table.classes))


__all__ = ["SlideDataset", "SlideItem"]
