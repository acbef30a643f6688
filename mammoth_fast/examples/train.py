"""k-fold cross-validation of any create_model name on a MIL dataset.

    python -m mammoth_fast.examples.train --model abmil.base_mammoth --dataset musk1 --epochs 20 --out musk1.json

Bags go one at a time (B = 1; --batch-size pads several with a mask), fused Adam (lr 5e-4, weight decay 1e-4 as Ilse et al.
2018), a fixed number of epochs, instance features standardized per fold (fit
on the training bags). Reports accuracy and AUROC per fold and their mean and
standard deviation (population std over folds), and writes them to JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from ..mil import create_model
from .datasets import DATASETS, load_dataset


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_folds(dataset: str) -> int:
    """10 for MUSK (as Ilse et al. 2018), 5 otherwise."""
    return 10 if dataset.startswith("musk") else 5


def split_folds(labels: np.ndarray, folds: int, seed: int) -> List[np.ndarray]:
    """Stratified folds: a list of test-index arrays."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [test for _, test in skf.split(np.zeros(len(labels)), labels)]


def build_model(model: str, in_dim: int, **overrides) -> nn.Module:
    """create_model('<model>.<config>', num_classes=2, in_dim=in_dim, **overrides)."""
    return create_model(model, num_classes=2, in_dim=in_dim, **overrides)


def pad_bags(bags: List[torch.Tensor]):
    """(B, max_n, d) zero-padded batch and its (B, max_n) bool mask; no mask for B = 1."""
    if len(bags) == 1:
        return bags[0][None], None
    n = max(len(b) for b in bags)
    h = torch.zeros(len(bags), n, bags[0].shape[1])
    mask = torch.zeros(len(bags), n, dtype=torch.bool)
    for j, b in enumerate(bags):
        h[j, : len(b)], mask[j, : len(b)] = b, True
    return h, mask


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def run_fold(model_name: str, bags, labels, train_idx, test_idx, epochs: int, lr: float, weight_decay: float,
             seed: int, overrides: Optional[dict] = None, progress=None, batch_size: int = 1) -> Dict[str, float]:
    """Train on train_idx (batch_size bags per step, padded with a mask), evaluate
    on test_idx (same batching); returns accuracy and AUROC."""
    set_seed(seed)
    train_x = np.concatenate([bags[i] for i in train_idx])
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    norm = [torch.from_numpy((b - mean) / std).float() for b in bags]
    y = torch.from_numpy(labels)
    net = build_model(model_name, bags[0].shape[1], **(overrides or {}))
    # fused Adam: the per-parameter loop of the default one dominates a step on small CPU models
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        net.train()
        order = gen.permutation(train_idx)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            h, mask = pad_bags([norm[i] for i in idx])
            out = net(h, mask=mask, label=y[idx], loss_fn=loss_fn)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    net.eval()
    probs = []
    with torch.no_grad():  # padded batches give the same output as bags alone (mask)
        for start in range(0, len(test_idx), max(batch_size, 1)):
            h, mask = pad_bags([norm[i] for i in test_idx[start : start + max(batch_size, 1)]])
            probs.extend(net(h, mask=mask)["logits"].softmax(-1)[:, 1].tolist())
    probs = np.asarray(probs)
    truth = labels[test_idx]
    return {"accuracy": float(((probs > 0.5) == truth).mean()), "auroc": _auroc(truth, probs)}


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
        per_fold.append(run_fold(model, bags, labels, train_idx, test_idx, epochs, lr, weight_decay, seed + k,
                                 overrides, progress=bar, batch_size=batch_size))
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
