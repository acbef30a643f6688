"""A cache of all slides' features in one memory-mapped file, built once, read
every epoch (reading many small HDF5 files, TRIDENT's one-row chunks above all,
makes training I/O-bound: CLAM#224).

A cache folder holds:

- ``features.npy``: every bag's rows one after another, (total_N, D), a plain
  .npy (``np.load(path, mmap_mode="r")`` opens it). Its dtype is float16 when
  every source file holds float16, else float32 (float64 and bfloat16 sources
  are stored as float32, the dtype reads return): nothing is lost against a
  direct read, and fp16 sets keep half the size.
- ``offsets.npy``: (B + 1,) int64, slide b is rows ``offsets[b]:offsets[b + 1]``
  (the set's ``cu_seqlens``).
- ``manifest.json``: format version, width D, dtype, row count, and per slide
  (in the order of the offsets) its id, source file, size and mtime (ns).

The manifest is written last, after the arrays are complete, so an interrupted
build leaves no valid cache. :func:`stale_reason` compares the manifest with
the source files (same slides, same files, same sizes and mtimes, width) and
:func:`load_or_build_cache` rebuilds when anything differs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import DataError
from .features import FeatureFolder, features_shape, read_features_array

PathLike = Union[str, Path]
FORMAT = 1
FEATURES, OFFSETS, MANIFEST = "features.npy", "offsets.npy", "manifest.json"


def _stat(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class FeatureCache:
    """A built cache (see the module's docstring); ``cache[slide_id]`` is that
    slide's float32 features (N, D), a copy read from the memory map."""

    def __init__(self, cache_dir: PathLike):
        self.dir = Path(cache_dir)
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
            self.offsets = np.load(self.dir / OFFSETS)  # (B + 1,) int64
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.dir}: not a features cache ({type(exc).__name__}: {exc})") from None
        self.manifest = manifest
        self.width = int(manifest["width"])
        self.dtype = np.dtype(manifest["dtype"])
        self.slide_ids: List[str] = [s["slide_id"] for s in manifest["slides"]]
        self.index: Dict[str, int] = {s: i for i, s in enumerate(self.slide_ids)}
        self.build_reason: Optional[str] = None  # why load_or_build_cache (re)built it; None when reused
        self._features: Optional[np.ndarray] = None
        rows = int(manifest["rows"])
        if self.offsets.shape != (len(self.slide_ids) + 1,) or int(self.offsets[-1]) != rows:
            raise DataError(f"{self.dir / OFFSETS}: does not match {self.dir / MANIFEST} (damaged cache)")
        if self.features.shape != (rows, self.width) or self.features.dtype != self.dtype:
            raise DataError(f"{self.dir / FEATURES}: shape {self.features.shape} {self.features.dtype}, manifest says "
                            f"({rows}, {self.width}) {self.dtype} (damaged cache)")

    @property
    def features(self) -> np.ndarray:
        """The memory map (total_N, D), opened on first use in each process."""
        if self._features is None:
            self._features = np.load(self.dir / FEATURES, mmap_mode="r")
        return self._features

    def __getstate__(self):  # DataLoader workers reopen the map instead of pickling its contents
        state = self.__dict__.copy()
        state["_features"] = None
        return state

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.index

    def rows(self, slide_id: str) -> Tuple[int, int]:
        """The slide's rows [start, end) in ``features``."""
        if slide_id not in self.index:
            raise DataError(f"slide {slide_id!r} is not in the features cache {self.dir}")
        b = self.index[slide_id]
        return int(self.offsets[b]), int(self.offsets[b + 1])

    def __getitem__(self, slide_id: str) -> Tensor:
        start, end = self.rows(slide_id)
        return torch.from_numpy(np.array(self.features[start:end], dtype=np.float32))  # (N, D)

    @property
    def cu_seqlens(self) -> Tensor:
        """(B + 1,) int64: the offsets of all slides, in ``slide_ids`` order."""
        return torch.from_numpy(self.offsets.copy())


def stale_reason(cache_dir: PathLike, folder: FeatureFolder, slide_ids: Sequence[str]) -> Optional[str]:
    """Why the cache in ``cache_dir`` cannot serve ``slide_ids`` of ``folder`` (no
    cache, other slides, a source file changed, moved or gone, another width
    than ``folder.expected_dim``), or None when it can."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no cache in {cache_dir}"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest {cache_dir / MANIFEST} ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"{cache_dir / MANIFEST}: not a format-{FORMAT} features cache"
    entries = manifest["slides"]
    if [e["slide_id"] for e in entries] != list(slide_ids):
        return "the cache holds other slides"
    if folder.expected_dim is not None and manifest["width"] != folder.expected_dim:
        return f"the cache holds width {manifest['width']}, expected {folder.expected_dim}"
    for entry in entries:
        path = folder.find(entry["slide_id"])
        if path is None or str(path.resolve()) != entry["source"]:
            return f"slide {entry['slide_id']!r} is now read from {path} (cached from {entry['source']})"
        if list(_stat(path)) != [entry["size"], entry["mtime_ns"]]:
            return f"{path} changed since the cache was built"
    if not (cache_dir / FEATURES).is_file() or not (cache_dir / OFFSETS).is_file():
        return f"{cache_dir}: {FEATURES} or {OFFSETS} is missing"
    return None


def build_cache(folder: FeatureFolder, slide_ids: Sequence[str], cache_dir: PathLike,
                progress: bool = True) -> FeatureCache:
    """Read every slide of ``slide_ids`` from ``folder`` once (validated as any
    read is: width, empty bags, NaN/Inf; DataError naming the slide) into a new
    cache in ``cache_dir`` (created; an old cache there is replaced). The width
    is ``folder.expected_dim`` or else the first slide's, and all must share it.
    Shows a tqdm progress bar unless ``progress`` is False."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # invalid until the new one is complete
    slide_ids = list(slide_ids)
    if not slide_ids:
        raise DataError(f"{cache_dir}: no slides to cache")
    entries, lengths, dtypes = [], [], set()
    width, first = folder.expected_dim, None
    for slide in slide_ids:  # pass 1: sources and shapes (h5 metadata only)
        path = folder.path(slide)
        where = f"slide {slide!r} ({path})"
        size, mtime_ns = _stat(path)  # before the read: a file changed during the build shows as stale
        shape, dtype = features_shape(path, where)
        if len(shape) != 2 or shape[0] == 0:
            read_features_array(path, where=where)  # raises the reader's own error (not 2-D, empty)
        if width is None:
            width, first = shape[1], slide
        if shape[1] != width:
            expected = f"expected {width}" if folder.expected_dim is not None else f"but slide {first!r} has {width}"
            raise DataError(f"{where}: feature width {shape[1]}, {expected}")
        entries.append({"slide_id": slide, "source": str(path.resolve()), "size": size, "mtime_ns": mtime_ns})
        lengths.append(shape[0])
        dtypes.add(np.dtype(dtype))
    store = np.dtype(np.float16) if dtypes == {np.dtype(np.float16)} else np.dtype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (B + 1,)
    tmp = cache_dir / f"{FEATURES}.tmp{os.getpid()}"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=store, shape=(int(offsets[-1]), width))
    try:
        for b, entry in enumerate(tqdm(entries, desc="caching features", unit="slide", disable=not progress)):
            where = f"slide {entry['slide_id']!r} ({entry['source']})"
            arr = read_features_array(Path(entry["source"]), width, where)
            if arr.shape[0] != lengths[b]:
                raise DataError(f"{where}: changed during the cache build")
            out[offsets[b]:offsets[b + 1]] = arr
        out.flush()
    except BaseException:
        del out
        tmp.unlink(missing_ok=True)
        raise
    del out
    os.replace(tmp, cache_dir / FEATURES)
    np.save(cache_dir / OFFSETS, offsets)
    manifest = {"format": FORMAT, "width": width, "dtype": store.name, "rows": int(offsets[-1]), "slides": entries}
    tmp_manifest = cache_dir / f"{MANIFEST}.tmp{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp_manifest, cache_dir / MANIFEST)
    return FeatureCache(cache_dir)


def load_or_build_cache(folder: FeatureFolder, slide_ids: Sequence[str], cache_dir: PathLike,
                        progress: bool = True) -> FeatureCache:
    """The cache in ``cache_dir`` if it is fresh for ``slide_ids`` of ``folder``
    (:func:`stale_reason`), else a new one (:func:`build_cache`); the result's
    ``build_reason`` says why it was built (None when reused)."""
    reason = stale_reason(cache_dir, folder, slide_ids)
    if reason is None:
        return FeatureCache(cache_dir)
    cache = build_cache(folder, slide_ids, cache_dir, progress)
    cache.build_reason = reason
    return cache


__all__ = ["FeatureCache", "build_cache", "load_or_build_cache", "stale_reason"]
