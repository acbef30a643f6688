"""k-fold cross-validation of any create_model name on a MIL dataset.

    python -m mammoth_fast.examples.train --model abmil.base_mammoth --dataset musk1 --epochs 20 --out musk1.json

The bags become a dataset of the training data layer (one slide per bag, each
its own case; a dict of tensors as the store) and train through the one
training loop, mammoth_fast.train.fit, with this protocol (Ilse et al. 2018):
stratified folds (scikit-learn's StratifiedKFold, shuffled with the seed), no
validation part, instance features standardized per fold (fit on the training
bags), fused Adam (lr 5e-4, weight decay 1e-4), a fixed number of epochs, bags
one at a time (B = 1; --batch-size pads several with a mask), fold k seeded
with seed + k. Reports accuracy (threshold 0.5) and AUROC per fold and their
mean and standard deviation (population std over folds), and writes them to JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import LabelTable, SlideDataset
from ..train import TrainSettings, compute_metrics, fit, predict
from .datasets import DATASETS, load_dataset


def default_folds(dataset: str) -> int:
    """10 for MUSK (as Ilse et al. 2018), 5 otherwise."""
    return 10 if dataset.startswith("musk") else 5


def split_folds(labels: np.ndarray, folds: int, seed: int) -> List[np.ndarray]:
    """Stratified folds: a list of test-index arrays."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [test for _, test in skf.split(np.zeros(len(labels)), labels)]


def bag_table(labels: np.ndarray) -> LabelTable:
    """The bags as a label table: bag i is slide (and case) 'bag_i', classes '0' and '1'."""
    ids = [f"bag_{i}" for i in range(len(labels))]
    return LabelTable(ids, ids, np.asarray(labels, dtype=np.int64), ["0", "1"], "<bags>")


def standardized(bags: List[np.ndarray], table: LabelTable, idx: np.ndarray, mean: np.ndarray,
                 std: np.ndarray) -> SlideDataset:
    """The bags ``idx`` as a SlideDataset over a dict store of float32 tensors (n_i, d),
    instance features standardized: (x - mean) / std."""
    store = {table.slide_ids[i]: torch.from_numpy((bags[i] - mean) / std).float() for i in idx}
    return SlideDataset(table, store, [table.slide_ids[i] for i in idx])


def run_fold(model_name: str, bags, labels, train_idx, test_idx, epochs: int, lr: float, weight_decay: float,
             seed: int, overrides: Optional[dict] = None, progress=None,
             batch_size: int = 1) -> Tuple[Dict[str, float], nn.Module]:
    """Train on train_idx (batch_size bags per step, padded with a mask), evaluate
    on test_idx (same batching), features standardized with the training bags'
    instance mean and std (+ 1e-6); returns (accuracy and AUROC, the trained model)."""
    table = bag_table(labels)
    train_x = np.concatenate([bags[i] for i in train_idx])  # (sum n_i, d)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    settings = TrainSettings(model=model_name, overrides={"in_dim": int(bags[0].shape[1]), **(overrides or {})},
                             epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, optimizer="adam")
    fitted = fit(settings, 2, standardized(bags, table, train_idx, mean, std), None, seed, bar=progress)
    preds = predict(fitted.model, standardized(bags, table, test_idx, mean, std), batch_size)
    metrics = compute_metrics(preds.labels, preds.probs)
    return {"accuracy": metrics["accuracy"], "auroc": metrics["auroc"]}, fitted.model


def summarize(per_fold: List[Dict[str, float]]) -> Dict[str, float]:
    out = {}
    for key in ("accuracy", "auroc"):
        vals = np.asarray([f[key] for f in per_fold], dtype=float)
        out[f"{key}_mean"], out[f"{key}_std"] = float(np.nanmean(vals)), float(np.nanstd(vals))
    return out


def cross_validate(model: str, dataset: str, folds: Optional[int] = None, epochs: int = 20, lr: float = 5e-4,
                   weight_decay: float = 1e-4, seed: int = 0, overrides: Optional[dict] = None,
                   dataset_args: Optional[dict] = None, progress: bool = True, data=None,
                   batch_size: int = 1) -> dict:
    """k-fold CV of create_model name `model` on `dataset`; returns the result dict
    (settings, per-fold metrics, mean/std accuracy and AUROC, wall seconds)."""
    from tqdm.auto import tqdm

    folds = folds or default_folds(dataset)
    bags, labels = data if data is not None else load_dataset(dataset, **(dataset_args or {}))
    test_sets = split_folds(labels, folds, seed)
    start = time.perf_counter()
    per_fold = []
    bar = tqdm(total=folds * epochs, desc=f"{model} on {dataset}", unit="epoch", disable=not progress, leave=False)
    for k, test_idx in enumerate(test_sets):
        train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
        metrics, _ = run_fold(model, bags, labels, train_idx, test_idx, epochs, lr, weight_decay, seed + k, overrides,
                              progress=bar, batch_size=batch_size)
        per_fold.append(metrics)
        bar.set_postfix(acc=f"{np.mean([f['accuracy'] for f in per_fold]):.3f}")
    bar.close()
    return {
        "model": model, "dataset": dataset, "folds": folds, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
        "seed": seed, "batch_size": batch_size, "num_bags": len(labels), "in_dim": int(bags[0].shape[1]), "overrides": overrides or {},
        "dataset_args": dataset_args or {}, "per_fold": per_fold, **summarize(per_fold),
        "seconds": time.perf_counter() - start,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="abmil.base_mammoth", help="create_model name, e.g. abmil.base or dsmil.base_mammoth")
    p.add_argument("--dataset", default="musk1", choices=DATASETS)
    p.add_argument("--folds", type=int, default=None, help="default: 10 for MUSK, 5 otherwise")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="bags per step (padded with a mask when > 1)")
    p.add_argument("--bag-size", type=int, default=10, help="MNIST-bags: digits per bag")
    p.add_argument("--num-bags", type=int, default=200, help="MNIST-bags: number of bags")
    p.add_argument("--target", type=int, default=9, help="MNIST-bags: the digit that makes a bag positive")
    p.add_argument("--overrides", default="{}", help="JSON dict of create_model overrides, e.g. '{\"embed_dim\": 64}'")
    p.add_argument("--out", default=None, help="JSON output path (default: <model>-<dataset>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dataset_args = {"bag_size": a.bag_size, "num_bags": a.num_bags, "target": a.target} if a.dataset == "mnist_bags" else {}
    res = cross_validate(a.model, a.dataset, a.folds, a.epochs, a.lr, a.weight_decay, a.seed,
                         json.loads(a.overrides), dataset_args, batch_size=a.batch_size)
    out = a.out or f"{a.model}-{a.dataset}.json"
    with open(out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"{a.model} on {a.dataset}: accuracy {res['accuracy_mean']:.3f} ± {res['accuracy_std']:.3f}, "
          f"AUROC {res['auroc_mean']:.3f} ± {res['auroc_std']:.3f} ({res['folds']} folds, {res['epochs']} epochs, "
          f"{res['seconds']:.0f} s) -> {out}")
    return res


if __name__ == "__main__":
    main()
