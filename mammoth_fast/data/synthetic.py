"""Synthetic feature folders in the TRIDENT and CLAM layouts, for tests, the
read benchmark and demos: the same files those tools write (shared/FORMATS.md),
with random features and a planted class signal that a MIL model learns in a
few epochs.

- TRIDENT: ``features_{encoder}/{slide}.h5``, ``features`` (N, D) and
  ``coords`` (N, 2) int64 both written one row per chunk, with TRIDENT's
  attributes; ``.pt`` beside it holds the features tensor.
- CLAM: ``h5_files/{slide}.h5``, ``features`` (N, D) and ``coords`` (N, 2)
  int32 in resizable chunks of 32 rows, no attributes; ``pt_files/{slide}.pt``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import torch

PathLike = Union[str, Path]


def grid_coords(n: int, step: int = 512, columns: int = 100) -> np.ndarray:
    """(n, 2) int64 top-left (x, y) of patches on a grid, ``step`` level-0 pixels apart."""
    i = np.arange(n, dtype=np.int64)
    return np.stack([(i % columns) * step, (i // columns) * step], axis=1)


def write_trident_h5(path: PathLike, features: np.ndarray, coords: Optional[np.ndarray] = None,
                     encoder: str = "synthetic", patch_size: int = 256, patch_size_level0: int = 512) -> Path:
    """Write a slide's features (N, D) as TRIDENT does: one-row chunks, resizable,
    with its attributes on ``features`` and ``coords`` (default: a grid)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = grid_coords(len(features), patch_size_level0) if coords is None else coords
    name = path.stem
    with h5py.File(path, "w") as f:
        for key, arr in (("features", features), ("coords", coords)):
            f.create_dataset(key, data=arr, chunks=(1,) + arr.shape[1:] if len(arr) else None,
                             maxshape=(None,) + arr.shape[1:])
        f["features"].attrs.update({"name": name, "savetodir": str(path.parent), "encoder": encoder})
        f["coords"].attrs.update({
            "patch_size": patch_size, "patch_size_level0": patch_size_level0, "level0_magnification": 40,
            "target_magnification": 20, "overlap": 0, "name": name, "savetodir": str(path.parent),
            "level0_width": int(coords[:, 0].max(initial=0)) + patch_size_level0,
            "level0_height": int(coords[:, 1].max(initial=0)) + patch_size_level0})
    return path


def write_clam_h5(path: PathLike, features: np.ndarray, coords: Optional[np.ndarray] = None) -> Path:
    """Write a slide's features (N, D) as CLAM does: resizable chunks of 32 rows,
    int32 coords, no attributes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coords = (grid_coords(len(features)) if coords is None else coords).astype(np.int32)
    with h5py.File(path, "w") as f:
        for key, arr in (("features", features), ("coords", coords)):
            f.create_dataset(key, data=arr, chunks=(32,) + arr.shape[1:] if len(arr) else None,
                             maxshape=(None,) + arr.shape[1:])
    return path


def write_pt(path: PathLike, features: np.ndarray) -> Path:
    """Write a slide's features (N, D) as a .pt file holding the tensor alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.from_numpy(np.ascontiguousarray(features)), path)
    return path


class SyntheticSet(NamedTuple):
    features_dir: Path  # what a user passes as the features folder
    labels_csv: Path  # case_id, slide_id, label
    slide_ids: List[str]
    case_ids: List[str]
    labels: List[str]


def make_synthetic_set(root: PathLike, layout: str = "trident", num_cases: int = 12,
                       slides_per_case: Tuple[int, int] = (1, 3), classes: Sequence[str] = ("benign", "tumor"),
                       dim: int = 32, patches: Tuple[int, int] = (1, 300), sizes: Optional[Sequence[int]] = None,
                       dtype=np.float16, formats: Sequence[str] = ("h5",), signal: float = 1.0,
                       encoder: str = "synthetic", seed: int = 0) -> SyntheticSet:
    """A features folder and label CSV under ``root``. Cases get the classes in
    turn (balanced), each case 1..k slides (``slides_per_case``) of its class;
    slide i has ``sizes[i % len(sizes)]`` patches, or a random count in ``patches`` (both
    ends included). Features are N(0, 1) in ``dtype``; in a slide of class c a
    fifth of its patches (at least one) are shifted by ``signal`` times a fixed
    random +-1 vector of class c. ``layout``: "trident" or "clam"; ``formats``:
    which of "h5", "pt" to write."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    directions = rng.choice([-1.0, 1.0], size=(len(classes), dim))  # (C, D)
    case_ids, slide_ids, labels = [], [], []
    class_of_case = rng.permutation(np.arange(num_cases) % len(classes))
    for c in range(num_cases):
        for s in range(int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))):
            case_ids.append(f"case_{c:03d}")
            slide_ids.append(f"case_{c:03d}_slide_{s}")
            labels.append(classes[class_of_case[c]])
    shifts = [signal * directions[list(classes).index(label)] for label in labels]  # (D,) per slide
    features_dir = _write_bags(root, layout, slide_ids, shifts, rng, dim, patches, sizes, dtype, formats, encoder)
    labels_csv = root / "labels.csv"
    with open(labels_csv, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["case_id", "slide_id", "label"])
        out.writerows(zip(case_ids, slide_ids, labels))
    return SyntheticSet(features_dir, labels_csv, slide_ids, case_ids, labels)


def _write_bags(root: Path, layout: str, slide_ids: Sequence[str], shifts: Sequence[np.ndarray],
                rng: np.random.Generator, dim: int, patches: Tuple[int, int], sizes: Optional[Sequence[int]],
                dtype, formats: Sequence[str], encoder: str) -> Path:
    """Write each slide's bag: N(0, 1) features (N, dim), a fifth of its patches
    (at least one) shifted by the slide's ``shifts`` vector (dim,); returns the
    features folder."""
    if layout not in ("trident", "clam"):
        raise ValueError(f"layout must be 'trident' or 'clam', got {layout!r}")
    if layout == "trident":
        features_dir = root / f"features_{encoder}"
        h5_dir = pt_dir = features_dir
    else:
        features_dir = root
        h5_dir, pt_dir = root / "h5_files", root / "pt_files"
    for i, slide in enumerate(slide_ids):
        n = int(sizes[i % len(sizes)]) if sizes is not None else int(rng.integers(patches[0], patches[1] + 1))
        feats = rng.standard_normal((n, dim), dtype=np.float32)  # (N, D)
        key = rng.permutation(n)[:max(1, n // 5)]
        feats[key] += shifts[i]
        feats = feats.astype(dtype)
        if "h5" in formats:
            if layout == "trident":
                write_trident_h5(h5_dir / f"{slide}.h5", feats, encoder=encoder)
            else:
                write_clam_h5(h5_dir / f"{slide}.h5", feats)
        if "pt" in formats:
            write_pt(pt_dir / f"{slide}.pt", feats)
    return features_dir


class SyntheticSurvivalSet(NamedTuple):
    features_dir: Path
    labels_csv: Path  # case_id, slide_id, time, event
    slide_ids: List[str]
    case_ids: List[str]
    risk: np.ndarray  # (cases,) the planted log-hazard of each case
    times: np.ndarray  # (cases,) observed follow-up
    events: np.ndarray  # (cases,) int64, 1 = event observed


def make_synthetic_survival_set(root: PathLike, layout: str = "trident", num_cases: int = 40,
                                slides_per_case: Tuple[int, int] = (1, 2), dim: int = 32,
                                patches: Tuple[int, int] = (1, 300), sizes: Optional[Sequence[int]] = None,
                                dtype=np.float16, formats: Sequence[str] = ("h5",), signal: float = 1.0,
                                effect: float = 1.5, censoring: float = 0.3, encoder: str = "synthetic",
                                seed: int = 0) -> SyntheticSurvivalSet:
    """A features folder and survival label CSV under ``root``, with a planted
    risk. Case c has a log-hazard ``effect * z_c``, z_c ~ N(0, 1); its event time
    is exponential with that hazard (times in months, median about 24 at z = 0),
    censored by an independent exponential time drawn so that about
    ``censoring`` of the cases are censored. Its slides' patches are as in
    :func:`make_synthetic_set`, a fifth shifted by ``signal * z_c`` times a
    fixed random +-1 vector, so the risk can be read from the features."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    direction = rng.choice([-1.0, 1.0], size=dim)  # (D,)
    z = rng.standard_normal(num_cases)  # (cases,)
    event_time = rng.exponential(24.0 / np.log(2.0), num_cases) * np.exp(-effect * z)
    # censoring hazard: censoring / (1 - censoring) of the event hazard at z = 0, about that share censored
    cens_time = rng.exponential(24.0 / np.log(2.0) * (1.0 - censoring) / max(censoring, 1e-9), num_cases)
    times = np.round(np.minimum(event_time, cens_time), 2) + 0.01  # (cases,) > 0
    events = (event_time <= cens_time).astype(np.int64)
    case_ids, slide_ids, shifts, rows = [], [], [], []
    for c in range(num_cases):
        for s in range(int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))):
            case_ids.append(f"case_{c:03d}")
            slide_ids.append(f"case_{c:03d}_slide_{s}")
            shifts.append(signal * z[c] * direction)
            rows.append((case_ids[-1], slide_ids[-1], f"{times[c]:.2f}", int(events[c])))
    features_dir = _write_bags(root, layout, slide_ids, shifts, rng, dim, patches, sizes, dtype, formats, encoder)
    labels_csv = root / "survival.csv"
    with open(labels_csv, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["case_id", "slide_id", "time", "event"])
        out.writerows(rows)
    return SyntheticSurvivalSet(features_dir, labels_csv, slide_ids, case_ids, effect * z, times, events)


__all__ = ["SyntheticSet", "SyntheticSurvivalSet", "grid_coords", "make_synthetic_set", "make_synthetic_survival_set",
           "write_clam_h5", "write_pt", "write_trident_h5"]
