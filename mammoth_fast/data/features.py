"""One slide's bag of patch features, read from the folders that TRIDENT and CLAM
write (see shared/FORMATS.md).

- TRIDENT: ``features_{encoder}/{slide}.h5`` holding ``features`` (N, D) and
  ``coords`` (N, 2) with the patching attributes (``patch_size_level0``, ...),
  and optionally ``features_{encoder}/{slide}.pt``, the features alone.
- CLAM: ``h5_files/{slide}.h5`` holding ``features`` (N, D) and ``coords``
  (N, 2), and ``pt_files/{slide}.pt``, the features alone.

A slide's ``.h5`` is preferred to its ``.pt`` (it carries the coordinates).
Features of any float dtype are accepted and returned as float32; datasets are
read whole (TRIDENT writes one row per chunk, so row-wise reads are slow). Every
problem raises :class:`DataError` naming the file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import h5py
import numpy as np
import torch
from torch import Tensor

from .errors import DataError

PathLike = Union[str, Path]

# Whole-slide image suffixes that a label table's slide ids sometimes keep
# ("slide_1.svs"); the feature files are named without them.
WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".czi",
                ".dcm", ".isyntax", ".sdpc", ".svslide")


@dataclass
class Bag:
    """One slide's bag as read from its file."""
    features: Tensor  # (N, D) float32
    coords: Optional[Tensor]  # (N, 2) int64 top-left (x, y) in level-0 pixels; None for .pt files
    attrs: Dict[str, Any] = field(default_factory=dict)  # attributes of `coords` (patch_size_level0, ...)
    path: Optional[Path] = None


@dataclass(frozen=True)
class FeatureLayout:
    """Where a folder keeps its slides' files: ``kind`` is "trident", "clam" or
    "folder" (plain ``{slide}.h5`` / ``{slide}.pt`` files); ``h5_dir`` / ``pt_dir``
    are None where that kind of file is absent."""
    kind: str
    root: Path
    h5_dir: Optional[Path]
    pt_dir: Optional[Path]


def _has_files(folder: Path, suffix: str) -> bool:
    return folder.is_dir() and any(folder.glob(f"*{suffix}"))


def detect_layout(root: PathLike, encoder: Optional[str] = None) -> FeatureLayout:
    """The layout of ``root``, which may be a CLAM feature folder (holding
    ``h5_files/`` and/or ``pt_files/``), a TRIDENT run folder (holding
    ``features_{encoder}/``; with several encoders, ``encoder`` picks one), or a
    folder of ``{slide}.h5`` / ``{slide}.pt`` files itself (such as
    ``features_uni_v1/`` or ``h5_files/``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such features folder")
    h5_dir, pt_dir = root / "h5_files", root / "pt_files"
    if h5_dir.is_dir() or pt_dir.is_dir():
        return FeatureLayout("clam", root, h5_dir if h5_dir.is_dir() else None, pt_dir if pt_dir.is_dir() else None)
    trident = sorted(p.name for p in root.glob("features_*") if p.is_dir())
    if trident:
        if encoder is not None:
            name = f"features_{encoder}"
            if name not in trident:
                raise DataError(f"{root}: no {name}/ folder (found {', '.join(trident)})")
        elif len(trident) > 1:
            raise DataError(f"{root}: several encoders' features ({', '.join(trident)}); "
                            "choose one (encoder=...) or pass that folder")
        else:
            name = trident[0]
        return FeatureLayout("trident", root, root / name, root / name)
    if _has_files(root, ".h5") or _has_files(root, ".pt"):
        kind = ("trident" if root.name.startswith("features_")
                else "clam" if root.name in ("h5_files", "pt_files") else "folder")
        return FeatureLayout(kind, root, root, root)
    raise DataError(f"{root}: no slide features found: expected TRIDENT's features_{{encoder}}/, "
                    "CLAM's h5_files/ or pt_files/, or {slide}.h5 / {slide}.pt files")


def check_features(arr: np.ndarray, where: str, expected_dim: Optional[int] = None) -> np.ndarray:
    """Validate a bag's features (N, D): 2-D, floating point, at least one patch,
    width ``expected_dim`` when given, all values finite. ``where`` (a file or a
    slide) starts the error messages. Returns ``arr``."""
    if arr.ndim != 2:
        raise DataError(f"{where}: features must be (N patches, D), got shape {tuple(arr.shape)}")
    if arr.dtype.kind != "f":
        raise DataError(f"{where}: features must be floating point, got {arr.dtype}")
    n, d = arr.shape
    if n == 0:
        raise DataError(f"{where}: empty slide (0 patches)")
    if expected_dim is not None and d != expected_dim:
        raise DataError(f"{where}: feature width {d}, expected {expected_dim}")
    finite = np.isfinite(arr).all(axis=1)  # (N,)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{where}: {bad.size} of {n} patches hold NaN or Inf (first: row {int(bad[0])})")
    return arr


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_h5(path: Path, where: str) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    if not h5py.is_hdf5(path):
        raise DataError(f"{where}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{where}: cannot be opened as HDF5 ({exc})") from None


def _dataset(f: h5py.File, name: str, where: str) -> Optional[h5py.Dataset]:
    ds = f.get(name)
    if name == "features" and not isinstance(ds, h5py.Dataset):
        raise DataError(f"{where}: no 'features' dataset (holds: {', '.join(sorted(f.keys())) or 'nothing'})")
    return ds if isinstance(ds, h5py.Dataset) else None


def _read_whole(ds: h5py.Dataset, where: str) -> np.ndarray:
    """A dataset in one read (one-row chunks make row-wise reads slow)."""
    try:
        return ds[()]
    except OSError as exc:  # a damaged or truncated file
        raise DataError(f"{where}: cannot read {ds.name.lstrip('/')!r} ({exc})") from None


def _numpy_safe_globals() -> List[Any]:
    """What ``torch.load(weights_only=True)`` needs to load a numpy float array."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64))]


def _read_pt(path: Path, where: str) -> np.ndarray:
    """The features (N, D) that a .pt file holds (a tensor, or a numpy array), in
    their own dtype (bfloat16, which numpy lacks, as float32)."""
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow(_numpy_safe_globals()) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"{where}: cannot be read as a PyTorch features file ({type(exc).__name__}: {first})") from None
    if isinstance(obj, Tensor):
        obj = obj.detach()
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    if isinstance(obj, np.ndarray):
        return obj
    raise DataError(f"{where}: holds a {type(obj).__name__}, expected the features tensor (N, D)")


def read_features_array(path: PathLike, expected_dim: Optional[int] = None, where: Optional[str] = None) -> np.ndarray:
    """A .h5 or .pt file's features (N, D), validated (:func:`check_features`), in
    the file's own float dtype. ``where`` starts error messages (default: the path)."""
    path = Path(path)
    where = str(path) if where is None else where
    if path.suffix == ".pt":
        return check_features(_read_pt(path, where), where, expected_dim)
    with _open_h5(path, where) as f:
        return check_features(_read_whole(_dataset(f, "features", where), where), where, expected_dim)


def read_features(path: PathLike, expected_dim: Optional[int] = None, where: Optional[str] = None) -> Tensor:
    """A .h5 or .pt file's features as a float32 tensor (N, D), validated."""
    return torch.from_numpy(read_features_array(path, expected_dim, where)).float()


def read_bag(path: PathLike, expected_dim: Optional[int] = None, where: Optional[str] = None) -> Bag:
    """A .h5 or .pt file's bag: float32 features (N, D) and, from a .h5 that has
    them, the int64 coordinates (N, 2) and their attributes."""
    path = Path(path)
    where = str(path) if where is None else where
    if path.suffix == ".pt":
        return Bag(read_features(path, expected_dim, where), None, {}, path)
    with _open_h5(path, where) as f:
        feats = check_features(_read_whole(_dataset(f, "features", where), where), where, expected_dim)
        coords, attrs = None, {}
        ds = _dataset(f, "coords", where)
        if ds is not None:
            arr = _read_whole(ds, where)
            if arr.shape != (feats.shape[0], 2):
                raise DataError(f"{where}: coords have shape {tuple(arr.shape)}, expected ({feats.shape[0]}, 2) "
                                "(one (x, y) per patch)")
            coords = torch.from_numpy(arr.astype(np.int64))
            attrs = {k: _attr_value(v) for k, v in ds.attrs.items()}
    return Bag(torch.from_numpy(feats).float(), coords, attrs, path)


def features_shape(path: PathLike, where: Optional[str] = None) -> Tuple[Tuple[int, ...], np.dtype]:
    """A file's features shape and dtype; a .h5 is not read beyond its metadata."""
    path = Path(path)
    where = str(path) if where is None else where
    if path.suffix == ".pt":
        arr = _read_pt(path, where)
        return tuple(arr.shape), arr.dtype
    with _open_h5(path, where) as f:
        ds = _dataset(f, "features", where)
        return tuple(ds.shape), ds.dtype


class FeatureFolder:
    """The slides of a TRIDENT or CLAM features folder (:func:`detect_layout`),
    by slide id. ``folder[slide_id]`` is the float32 features (N, D);
    ``expected_dim``, when given, is checked on every read."""

    def __init__(self, root: PathLike, expected_dim: Optional[int] = None, encoder: Optional[str] = None):
        self.layout = detect_layout(root, encoder)
        self.expected_dim = expected_dim

    def candidates(self, slide_id: str) -> List[Path]:
        """The files that may hold the slide's features, in order of preference."""
        names = [slide_id]
        stem, dot, suffix = slide_id.rpartition(".")
        if dot and stem and f".{suffix.lower()}" in WSI_SUFFIXES:
            names.append(stem)
        dirs = [(d, s) for d, s in ((self.layout.h5_dir, ".h5"), (self.layout.pt_dir, ".pt")) if d is not None]
        return [d / f"{name}{s}" for name in names for d, s in dirs]

    def find(self, slide_id: str) -> Optional[Path]:
        """The slide's file (.h5 before .pt), or None."""
        return next((p for p in self.candidates(slide_id) if p.is_file()), None)

    def path(self, slide_id: str) -> Path:
        """The slide's file; DataError naming the paths tried when there is none."""
        found = self.find(slide_id)
        if found is None:
            tried = ", ".join(str(p) for p in self.candidates(slide_id))
            raise DataError(f"slide {slide_id!r}: no features file (looked for {tried})")
        return found

    def __contains__(self, slide_id: str) -> bool:
        return self.find(slide_id) is not None

    def _where(self, slide_id: str, path: Path) -> str:
        return f"slide {slide_id!r} ({path})"

    def array(self, slide_id: str) -> np.ndarray:
        """The slide's features (N, D) in the file's own dtype, validated."""
        path = self.path(slide_id)
        return read_features_array(path, self.expected_dim, self._where(slide_id, path))

    def __getitem__(self, slide_id: str) -> Tensor:
        """The slide's features as float32 (N, D)."""
        return torch.from_numpy(self.array(slide_id)).float()

    def bag(self, slide_id: str) -> Bag:
        """The slide's features with its coordinates and their attributes."""
        path = self.path(slide_id)
        return read_bag(path, self.expected_dim, self._where(slide_id, path))

    def shape(self, slide_id: str) -> Tuple[Tuple[int, ...], np.dtype]:
        """The slide's features shape and dtype (:func:`features_shape`)."""
        path = self.path(slide_id)
        return features_shape(path, self._where(slide_id, path))

    def width(self, slide_ids) -> int:
        """The features width D shared by ``slide_ids``' files (read from metadata);
        DataError naming a slide whose width differs from the first one's."""
        width, first = None, None
        for slide_id in slide_ids:
            shape, _ = self.shape(slide_id)
            if len(shape) != 2:
                raise DataError(f"{self._where(slide_id, self.path(slide_id))}: features must be (N patches, D), "
                                f"got shape {shape}")
            if width is None:
                width, first = shape[1], slide_id
            elif shape[1] != width:
                raise DataError(f"{self._where(slide_id, self.path(slide_id))}: feature width {shape[1]}, "
                                f"but slide {first!r} has {width}")
        if width is None:
            raise DataError(f"{self.layout.root}: no slides given")
        return width


__all__ = ["Bag", "FeatureLayout", "FeatureFolder", "WSI_SUFFIXES", "check_features", "detect_layout",
           "features_shape", "read_bag", "read_features", "read_features_array"]
