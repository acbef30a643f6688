"""Time ``mammoth-fast heatmap``'s parts on one large synthetic slide.

    python -m benchmarks.heatmap_render [--patches 200000] [--size 4000] [--experts 30] [--device cpu]

A 500-column grid of ``--patches`` patches of 512 level-0 pixels (a 256 000 px
wide slide at 40x, patched at 20x), random expert scores and attention:

- scores: the expert scores of the recommended Mammoth layer (Din 1024, C 256,
  H 16, E 30, S 10) on random features, two passes over chunks of patches
  (:func:`mammoth_fast.heatmap.expert_scores`);
- csv: writing scores.csv (x, y, attention, 30 experts);
- render: every picture on a blank canvas whose longest side is ``--size``,
  with one expert drawn alone, then with all of them.
Each is timed once (time.perf_counter); torch uses all CPU threads.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mammoth_fast import Mammoth
from mammoth_fast.heatmap import HeatmapOptions, PatchLayout, expert_scores
from mammoth_fast.heatmap.run import draw_pictures, write_scores
from mammoth_fast.heatmap.scores import SlideScores


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=4000, help="longest side of the canvas (default: 4000)")
    parser.add_argument("--experts", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="where the expert scores are computed (default: cpu)")
    args = parser.parse_args()
    n = args.patches
    i = np.arange(n)
    coords = np.stack([(i % 500) * 512, (i // 500) * 512], axis=1).astype(np.int64)  # (N, 2)
    layout = PatchLayout(coords, 512, int(coords[:, 0].max()) + 512, int(coords[:, 1].max()) + 512, "given")
    torch.manual_seed(0)
    layer = Mammoth(1024, 512, num_experts=args.experts).eval().to(args.device)
    feats = torch.randn(n, 1024)
    experts = timed(f"scores, {n} patches, recommended layer ({args.device})", lambda: expert_scores(layer, feats))
    rng = np.random.default_rng(0)
    scores = SlideScores(np.zeros(2, np.float32), np.full(2, 0.5, np.float32), 0, experts.numpy(),
                         rng.dirichlet(np.ones(n)).astype(np.float32), "")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        timed("scores.csv", lambda: write_scores(out / "scores.csv", layout, scores))
        for chosen in ([0], list(range(args.experts))):
            names = timed(f"render, {len(chosen)} expert map(s) + grid + argmax + attention, {args.size} px",
                          lambda: draw_pictures(out, layout, scores, chosen, None, HeatmapOptions(size=args.size)))
            print(f"  {len(names)} PNG files")


if __name__ == "__main__":
    main()
