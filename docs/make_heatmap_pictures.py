"""Make the README's heatmap pictures (docs/images/heatmap_*.png) on a synthetic slide.

    python docs/make_heatmap_pictures.py [--work DIR]

1. Features of 16 synthetic slides (mammoth_fast.heatmap.synthetic: stroma, fat
   and, in half of them, a tumor disc; each tissue type its own mean feature),
   labelled tumor / benign, train abmil.base_mammoth with 8 experts for a few
   epochs (``run_train``, 2 folds; fold 0's checkpoint is used).
2. A new tumor slide, written as a tiled TIFF, goes through the command
   ``mammoth-fast heatmap --checkpoint ... --features ... --slide ... --out ...``.
3. Three of its pictures, shrunk to 640 px (the largest one palette-quantized),
   are copied to docs/images/ (under 200 KB together).
Runs in about a minute on a 2-core CPU; seeded, so the pictures are the same each run.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from PIL import Image

from mammoth_fast.cli import main
from mammoth_fast.heatmap.synthetic import make_synthetic_slide
from mammoth_fast.train import TrainSettings, run_train

IMAGES = Path(__file__).resolve().parent / "images"
PICTURES = {"experts_grid.png": "heatmap_experts_grid.png", "argmax_expert.png": "heatmap_argmax_expert.png",
            "attention.png": "heatmap_attention.png"}
MOE = {"num_experts": 8, "num_slots": 4, "num_heads": 2, "slot_dim": 16, "auto_rank": False, "lora_rank": 4,
       "dropout": 0.0}
SIZE = dict(width=4096, height=3072, patch=128, dim=16)  # a 32 x 24 grid of 128 px patches


def train(work: Path) -> Path:
    """Fold 0's checkpoint of abmil.base_mammoth trained on 16 synthetic slides' features."""
    rows = []
    for i in range(16):
        tumor = i % 2 == 0
        name = f"train_{i:02d}"
        make_synthetic_slide(work, name, tumor=tumor, seed=100 + i, write_slide=False, **SIZE)
        rows.append((f"case_{i:02d}", name, "tumor" if tumor else "benign"))
    labels = work / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([("case_id", "slide_id", "label"), *rows])
    settings = TrainSettings(model="abmil.base_mammoth", epochs=10, lr=5e-3,
                             overrides={"embed_dim": 16, "attn_dim": 8, "dropout": 0.0, "moe_args": MOE})
    run_train(work / "features_synthetic", labels, "abmil.base_mammoth", work / "run", settings, folds=2, val_frac=0.0,
              progress=False)
    return work / "run" / "fold_0" / "checkpoint.pt"


def main_(work: Path) -> None:
    checkpoint = train(work)
    demo = make_synthetic_slide(work / "demo", "demo_slide", seed=7, noise=0, **SIZE)  # flat colours: small PNGs
    out = work / "heatmaps"
    rc = main(["heatmap", "--checkpoint", str(checkpoint), "--features", str(demo.features), "--slide",
               str(demo.slide), "--out", str(out), "--size", "1024", "--experts", "0,1", "--topk", "5",
               "--alpha", "0.6"])
    if rc:
        raise SystemExit(rc)
    IMAGES.mkdir(exist_ok=True)
    for name, target in PICTURES.items():
        image = Image.open(out / "demo_slide" / name).convert("RGB")
        image.thumbnail((640, 640), Image.LANCZOS)
        image.save(IMAGES / target, optimize=True)
        if (IMAGES / target).stat().st_size > 100_000:
            image.quantize(colors=256).save(IMAGES / target, optimize=True)
    prediction = json.loads((out / "demo_slide" / "prediction.json").read_text())
    print(f"predicted {prediction['predicted_class']} {prediction['probabilities']}; pictures in {IMAGES}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    if args.work:
        main_(Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main_(Path(tmp))
