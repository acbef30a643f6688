"""k-fold train / val / test splits by case, in CLAM's file format.

Splits are made by case (patient): all slides of a case go to the same part, so
that no patient is in both training and test (CLAM#269). Fold k's test part is
the k-th of ``folds`` stratified group folds (scikit-learn's
StratifiedGroupKFold over the slides' labels, grouped by case, shuffled with
``seed``): the test parts of the folds cover every case once. Its val part is
carved from the remaining cases the same way, about ``val_frac`` of all slides
(more on sets of a few cases).

Files, as CLAM's ``create_splits_seq.py`` writes them (``splits/{task}/``):

- ``splits_{k}.csv``: an unnamed index column, then columns ``train``, ``val``,
  ``test`` of slide ids, of unequal lengths, the shorter ones padded empty;
- ``splits_{k}_bool.csv``: one row per slide (the index), True/False in
  ``train``, ``val``, ``test``;
- ``splits_{k}_descriptor.csv``: one row per class (its label), the number of
  slides of that class in ``train``, ``val``, ``test``.

:func:`read_splits` reads the ``splits_{k}.csv`` files of a folder (CLAM's
published splits or ours) and checks them against a label table.
"""
from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple, Union

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from .errors import DataError
from .labels import LabelTable

PathLike = Union[str, Path]
PARTS = ("train", "val", "test")


class Split(NamedTuple):
    """One fold's slide ids per part (made: in the label table's order; read: in the file's)."""
    train: Tuple[str, ...]
    val: Tuple[str, ...]
    test: Tuple[str, ...]


def _group_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> List[np.ndarray]:
    """The held-out rows of each of ``n_splits`` stratified group folds."""
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [held for _, held in folds.split(np.zeros(len(labels)), labels, groups)]


def make_splits(table: LabelTable, folds: int = 5, val_frac: float = 0.1, seed: int = 0) -> List[Split]:
    """``folds`` splits of ``table`` by case (see the module's docstring);
    ``val_frac`` = 0 leaves the val parts empty. Deterministic for a seed."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise DataError(f"folds must be an int >= 2, got {folds!r}")
    if not 0.0 <= val_frac < 1.0 - 1.0 / folds:
        raise DataError(f"val_frac must be in [0, {1.0 - 1.0 / folds:g}) with {folds} folds, got {val_frac!r}")
    cases = np.asarray(table.case_ids)
    n_cases = len(set(table.case_ids))
    if n_cases < folds:
        raise DataError(f"{table.source}: {n_cases} cases cannot make {folds} folds split by case")
    if np.bincount(table.labels).max() < folds:
        raise DataError(f"{table.source}: no class has {folds} slides, too few for {folds} stratified folds")
    slides = np.asarray(table.slide_ids)
    splits = []
    for k, test in enumerate(_group_folds(table.labels, cases, folds, seed)):
        rest = np.setdiff1d(np.arange(len(table)), test)
        val = rest[:0]
        if val_frac > 0:
            # val: one of n_inner folds of the rest, about val_frac of all slides (fewer
            # folds, so a larger val part, where the rest has fewer cases than that)
            rest_cases = len(set(cases[rest]))
            if rest_cases < 3 or np.bincount(table.labels[rest]).max() < 2:
                raise DataError(f"{table.source}: {rest_cases} cases outside test fold {k} are too few "
                                "to split into train and val")
            n_inner = min(max(2, round((1.0 - 1.0 / folds) / val_frac)), rest_cases,
                          int(np.bincount(table.labels[rest]).max()))
            with warnings.catch_warnings():  # classes with fewer cases than n_inner: val is stratified loosely
                warnings.filterwarnings("ignore", "The least populated class", UserWarning)
                val = rest[_group_folds(table.labels[rest], cases[rest], n_inner, seed + 1 + k)[0]]
        train = np.setdiff1d(rest, val)
        splits.append(Split(*(tuple(slides[np.sort(part)]) for part in (train, val, test))))
    return splits


def write_splits(splits: Sequence[Split], folder: PathLike, table: LabelTable) -> List[Path]:
    """Write ``splits_{k}.csv``, ``splits_{k}_bool.csv`` and
    ``splits_{k}_descriptor.csv`` for every fold into ``folder`` (created);
    returns the ``splits_{k}.csv`` paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    label_of = dict(zip(table.slide_ids, table.labels.tolist()))
    written = []
    for k, split in enumerate(splits):
        check_split(split, table, f"split {k}")
        path = folder / f"splits_{k}.csv"
        with open(path, "w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["", *PARTS])
            for i in range(max(len(part) for part in split)):
                out.writerow([i, *(part[i] if i < len(part) else "" for part in split)])
        with open(folder / f"splits_{k}_bool.csv", "w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["", *PARTS])
            for p, part in enumerate(split):
                for slide in part:
                    out.writerow([slide, *(str(p == q) for q in range(len(PARTS)))])
        with open(folder / f"splits_{k}_descriptor.csv", "w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["", *PARTS])
            counts = [np.bincount([label_of[s] for s in part], minlength=len(table.classes)) for part in split]
            for c, name in enumerate(table.classes):
                out.writerow([name, *(int(n[c]) for n in counts)])
        written.append(path)
    return written


def check_split(split: Split, table: LabelTable, where: str) -> None:
    """DataError (naming ``where``, a file or fold) unless every slide of ``split``
    is in ``table``, no slide is listed twice, no case has slides in two parts
    and the train part is not empty. Slides of the table that the split leaves
    out are allowed (published splits may use a subset)."""
    known = set(table.slide_ids)
    case_of = dict(zip(table.slide_ids, table.case_ids))
    part_of: Dict[str, str] = {}
    case_part: Dict[str, Tuple[str, str]] = {}
    for name, part in zip(PARTS, split):
        for slide in part:
            if slide not in known:
                raise DataError(f"{where}: slide {slide!r} ({name}) is not in the label table {table.source}")
            if slide in part_of:
                raise DataError(f"{where}: slide {slide!r} is listed twice ({part_of[slide]} and {name})")
            part_of[slide] = name
            case = case_of[slide]
            if case in case_part and case_part[case][0] != name:
                other_part, other_slide = case_part[case]
                raise DataError(f"{where}: case {case!r} is split across parts: slide {other_slide!r} in "
                                f"{other_part}, slide {slide!r} in {name} (splits must be by case)")
            case_part.setdefault(case, (name, slide))
    if not split.train:
        raise DataError(f"{where}: the train part is empty")


def _read_split_csv(path: Path) -> Split:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    header = [c.strip() for c in rows[0]] if rows else []
    missing = [p for p in PARTS if p not in header]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} column(s) (header: {header}); "
                        "expected CLAM's splits_{k}.csv with columns train, val, test")
    cols = [header.index(p) for p in PARTS]
    parts = tuple(tuple(row[c].strip() for row in rows[1:] if c < len(row) and row[c].strip()) for c in cols)
    return Split(*parts)


def read_splits(folder: PathLike, table: LabelTable) -> List[Split]:
    """The splits of ``folder``'s ``splits_0.csv``, ``splits_1.csv``, ... (numbered
    from 0 without gaps), each checked against ``table`` (:func:`check_split`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such splits folder")
    found = {}
    for path in folder.iterdir():
        match = re.fullmatch(r"splits_(\d+)\.csv", path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise DataError(f"{folder}: no splits_{{k}}.csv files")
    gaps = sorted(set(range(max(found) + 1)) - set(found))
    if gaps:
        names = ", ".join(found[k].name for k in sorted(found))
        raise DataError(f"{folder}: splits_{gaps[0]}.csv is missing (found {names})")
    splits = []
    for k in range(len(found)):
        split = _read_split_csv(found[k])
        check_split(split, table, str(found[k]))
        splits.append(split)
    return splits


__all__ = ["PARTS", "Split", "check_split", "make_splits", "read_splits", "write_splits"]
