"""Routing pictures: what each Mammoth expert attends to on MNIST-bags.

    python -m mammoth_fast.examples.routing --out-dir routing_pngs --epochs 3

Trains ABMIL base_mammoth briefly on MNIST-bags (sklearn 8x8 digits), then reads
the dispatch weights (model(..., return_moe_weights=True): (B, M, E, H, S), the
layer's return_weights) on every bag. An instance's weight for expert e is its
dispatch weight summed over heads and slots. Saves
  experts_top_digits.png  one row per expert: the instances with the largest weight
                          for it (over all bags), with their digit class
  expert_usage_per_class.png  per digit class, the mean share of each expert
                          (an instance's weights normalized over experts)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch


def expert_scores(model, bags: List[np.ndarray]) -> List[np.ndarray]:
    """Per bag, (n, E): dispatch weight of each instance for each expert (summed over H and S)."""
    model.eval()
    out = []
    with torch.no_grad():
        for b in bags:
            w = model(torch.as_tensor(b, dtype=torch.float32)[None], return_moe_weights=True)["moe_weights"]
            if w is None:
                raise ValueError("the model has no Mammoth patch embedding (use a base_mammoth config)")
            out.append(w[0].sum(dim=(-1, -2)).float().numpy())
    return out


def routing_pictures(model, bags: List[np.ndarray], digits: List[np.ndarray], out_dir, images: Optional[List[np.ndarray]] = None,
                     top_k: int = 8, max_experts: Optional[int] = None) -> List[Path]:
    """Write the two PNGs (see module doc) for `bags` (model inputs) whose instances
    are the digits `digits` (class per instance) drawn from `images` (per bag
    (n, 64) pixels; default: the bags themselves). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = bags if images is None else images
    scores = np.concatenate(expert_scores(model, bags))            # (N, E)
    pix = np.concatenate(images).reshape(-1, 8, 8)
    cls = np.concatenate(digits)
    num_e = scores.shape[1] if max_experts is None else min(max_experts, scores.shape[1])

    fig, axes = plt.subplots(num_e, top_k, figsize=(top_k * 0.6, num_e * 0.62), squeeze=False)
    for e in range(num_e):
        top = np.argsort(-scores[:, e])[:top_k]
        for j, i in enumerate(top):
            ax = axes[e, j]
            ax.imshow(pix[i], cmap="gray_r", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(str(cls[i]), fontsize=6, pad=1)
        axes[e, 0].set_ylabel(f"E{e}", fontsize=6, rotation=0, labelpad=10)
    fig.suptitle("top digits per expert (dispatch weight)", fontsize=8)
    fig.tight_layout(pad=0.2, h_pad=0.1, w_pad=0.1, rect=(0, 0, 1, 1 - 0.5 / (num_e * 0.62)))
    grid = out_dir / "experts_top_digits.png"
    fig.savefig(grid, dpi=80)
    plt.close(fig)

    share = scores / np.clip(scores.sum(1, keepdims=True), 1e-12, None)
    classes = np.unique(cls)
    usage = np.stack([share[cls == c].mean(0) for c in classes])     # (C, E)
    ncol = 5
    nrow = int(np.ceil(len(classes) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 2.4, nrow * 1.8), sharey=True, squeeze=False)
    for k, c in enumerate(classes):
        ax = axes.flat[k]
        ax.bar(np.arange(usage.shape[1]), usage[k], color="C0" if k % 2 == 0 else "C1")
        ax.set_title(f"digit {c}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("expert", fontsize=6)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("mean share", fontsize=7)
    fig.suptitle("expert usage per digit class", fontsize=9)
    fig.tight_layout()
    bars = out_dir / "expert_usage_per_class.png"
    fig.savefig(bars, dpi=80)
    plt.close(fig)
    return [grid, bars]


def main(argv=None) -> List[Path]:
    from .datasets import mnist_bags
    from .train import run_fold

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="abmil.base_mammoth")
    p.add_argument("--out-dir", default="routing_pngs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-bags", type=int, default=100)
    p.add_argument("--bag-size", type=int, default=10)
    p.add_argument("--target", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", default="{}", help="JSON dict of create_model overrides")
    a = p.parse_args(argv)

    bags, labels, digits = mnist_bags(a.num_bags, a.bag_size, a.target, a.seed, return_digits=True)
    idx = np.arange(len(labels))  # train on all bags, evaluate on them too
    metrics, net = run_fold(a.model, bags, labels, idx, idx, a.epochs, 5e-4, 1e-4, a.seed, json.loads(a.overrides),
                            batch_size=a.batch_size)
    print(f"trained {a.model} on {len(labels)} MNIST-bags (target {a.target}), train accuracy {metrics['accuracy']:.3f}")
    # run_fold standardizes with the training statistics; do the same for the pictures
    allx = np.concatenate(bags)
    mean, std = allx.mean(0), allx.std(0) + 1e-6
    paths = routing_pictures(net, [(b - mean) / std for b in bags], digits, a.out_dir, images=bags, top_k=a.top_k)
    for path in paths:
        print("wrote", path)
    return paths


if __name__ == "__main__":
    main()
