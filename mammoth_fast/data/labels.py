"""A label table: one row per slide with its slide id, case (patient) id and
label, read from a CSV (CLAM's dataset CSV: ``case_id``, ``slide_id``, label
columns; the column names are configurable). Several slides may share a case.

Labels are strings; the classes are the distinct labels sorted (numerically
when every label is a number, so "2" comes before "10"), and a slide's class
index is its label's place in that list. The mapping is saved as JSON
(:meth:`LabelTable.save_classes`) and can be imposed on another table
(``classes=``), so that a checkpoint's outputs keep their meaning.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import DataError

PathLike = Union[str, Path]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sorted_classes(labels: Sequence[str]) -> List[str]:
    """The distinct labels, sorted numerically when all are numbers, else as strings."""
    distinct = set(labels)
    if all(_is_number(x) for x in distinct):
        return sorted(distinct, key=lambda x: (float(x), x))
    return sorted(distinct)


@dataclass
class LabelTable:
    """Slides with their case and class index, in the CSV's row order."""
    slide_ids: List[str]  # (S,)
    case_ids: List[str]  # (S,)
    labels: np.ndarray  # (S,) int64 class indices into `classes`
    classes: List[str]  # (C,) label strings; index = class
    source: str = "<memory>"  # the CSV it came from, for error messages

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def class_to_index(self) -> Dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def index(self) -> Dict[str, int]:
        """Slide id -> row."""
        return {s: i for i, s in enumerate(self.slide_ids)}

    def save_classes(self, path: PathLike) -> None:
        """Write the class mapping as JSON: {"classes": [...], "class_to_index": {...}}."""
        Path(path).write_text(json.dumps({"classes": self.classes, "class_to_index": self.class_to_index}, indent=2)
                              + "\n")


def load_classes(path: PathLike) -> List[str]:
    """The class list saved by :meth:`LabelTable.save_classes`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        classes = data["classes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a class mapping saved by save_classes ({type(exc).__name__}: {exc})") from None
    if (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise DataError(f"{path}: 'classes' must be a list of distinct strings, got {classes!r}")
    return classes


def read_table_rows(path: Path, needed: Sequence[Tuple[str, str, str]]) -> List[Dict[str, str]]:
    """The rows of a label CSV as {column: stripped value}; DataError for a missing
    or unreadable file, no rows, or a column of ``needed`` ((name, what it holds,
    how to choose another)) that is not there."""
    if not path.is_file():
        raise DataError(f"{path}: no such label table")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    for col, what, option in needed:
        if col not in columns:
            raise DataError(f"{path}: no {what} column {col!r} (columns: {', '.join(columns) or 'none'}; "
                            f"choose another with {option})")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_labels(csv_path: PathLike, label_col: str = "label", slide_col: str = "slide_id",
                case_col: str = "case_id", classes: Optional[Sequence[str]] = None) -> LabelTable:
    """Read a label table. Every row needs a slide id, a case id and a label;
    slide ids must be unique. With ``classes`` (e.g. from :func:`load_classes`)
    the labels are mapped to that list, and a label outside it is an error;
    without, the classes are the table's labels sorted (:func:`sorted_classes`)."""
    path = Path(csv_path)
    rows = read_table_rows(path, ((slide_col, "slide id", "slide_col="), (case_col, "case id", "case_col="),
                                  (label_col, "label", "label_col=")))
    slide_ids, case_ids, names = [], [], []
    seen: Dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        slide, case, label = row[slide_col], row[case_col], row[label_col]
        for value, col in ((slide, slide_col), (case, case_col), (label, label_col)):
            if not value:
                raise DataError(f"{path}, line {line}: empty {col!r}" + (f" (slide {slide!r})" if slide else ""))
        if slide in seen:
            raise DataError(f"{path}, line {line}: slide {slide!r} appears twice (first on line {seen[slide]})")
        seen[slide] = line
        slide_ids.append(slide)
        case_ids.append(case)
        names.append(label)
    if classes is None:
        classes = sorted_classes(names)
    classes = list(classes)
    lookup = {name: i for i, name in enumerate(classes)}
    for slide, label in zip(slide_ids, names):
        if label not in lookup:
            raise DataError(f"{path}: slide {slide!r} has label {label!r}, not one of the classes {classes}")
    labels = np.asarray([lookup[x] for x in names], dtype=np.int64)
    return LabelTable(slide_ids, case_ids, labels, classes, str(path))


__all__ = ["LabelTable", "load_classes", "read_labels", "sorted_classes"]
