"""The ``heatmap`` subcommand's flags and its run, for :mod:`mammoth_fast.cli`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .render import NORMALIZATIONS


def _experts(text: str) -> Optional[List[int]]:
    """'all' -> None; '0,3,5' -> [0, 3, 5]."""
    if text.strip().lower() == "all":
        return None
    try:
        experts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or expert indices such as 0,3,5, got {text!r}") from None
    if not experts:
        raise argparse.ArgumentTypeError(f"expected 'all' or expert indices such as 0,3,5, got {text!r}")
    return experts


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, got {text}")
    return value


def _colormap(text: str) -> str:
    from .render import lookup_table

    try:
        lookup_table(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_parser(sub, int_at_least, model_name) -> None:
    """Add ``heatmap`` to the subparsers ``sub``; the flag types are cli.py's."""
    from ..layer import BACKENDS

    h = sub.add_parser(
        "heatmap", help="per-patch expert scores, attention and prediction of a checkpoint on whole slides, drawn",
        description="Score every patch of one or more slides with a checkpoint (each Mammoth expert's share of the "
                    "patch's dispatch weight, the aggregator's attention, the slide's prediction) and draw them over "
                    "the slide. Writes per slide OUT/<slide_id>/scores.csv (x, y, attention, expert_0 ..), "
                    "prediction.json, expert_{e}.png, experts_grid.png, argmax_expert.png, attention.png and, with "
                    "the slide, top_patches/expert_{e}/*.png and top_patches/expert_{e}.png; OUT/heatmaps.json "
                    "lists the slides.")
    h.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a fold_{k}/checkpoint.pt of train, or a bare state_dict (e.g. MIL-Lab's) with --model")
    h.add_argument("--features", required=True, metavar="PATH",
                   help="one slide's features .h5 (TRIDENT or CLAM, with coords), a features folder (every .h5 in it), "
                        "or a text file listing .h5 files, one a line, each optionally followed by a comma or tab "
                        "and its slide file")
    h.add_argument("--out", required=True, metavar="DIR", help="output folder (created; a slide's files are replaced)")
    h.add_argument("--model", type=model_name, default=None, metavar="NAME",
                   help="the create_model name: checked against a train checkpoint's model (default: the "
                        "checkpoint's); needed for a bare state_dict, built for the features' width")
    h.add_argument("--num-classes", type=int_at_least(1), default=None, metavar="C",
                   help="bare state_dict only: its number of classes (default: read from its classifier)")
    h.add_argument("--slide", default=None, metavar="WSI",
                   help="the slide of a single .h5 (any format openslide reads): maps over its thumbnail and top "
                        "patches cropped from it; without a slide the maps are drawn on a blank canvas")
    h.add_argument("--slides", default=None, metavar="DIR",
                   help="a folder of slides matched to the features by slide id (file name without its suffix)")
    h.add_argument("--experts", type=_experts, default=None, metavar="all|i,j,..",
                   help="the experts drawn one by one and whose top patches are saved (default: all); the grid and "
                        "the argmax map always show every expert")
    h.add_argument("--topk", type=int_at_least(0), default=10, metavar="K",
                   help="top patches saved per chosen expert, at full level-0 resolution (needs the slide; 0: none) "
                        "(default: 10)")
    h.add_argument("--size", type=int_at_least(16), default=4000, metavar="PX",
                   help="longest side of the thumbnail (or blank canvas) the maps are drawn on (default: 4000)")
    h.add_argument("--cmap", type=_colormap, default="turbo", metavar="NAME",
                   help="matplotlib colormap of the expert maps (default: turbo)")
    h.add_argument("--attention-cmap", type=_colormap, default="coolwarm", metavar="NAME",
                   help="matplotlib colormap of the attention map (default: coolwarm)")
    h.add_argument("--alpha", type=_alpha, default=None, metavar="A",
                   help="opacity of the colours, in (0, 1] (default: 0.3 over a thumbnail, 1 on a blank canvas)")
    h.add_argument("--normalize", choices=NORMALIZATIONS, default="percentile",
                   help="colour scale of each map: percentile (each patch's rank among the slide's patches), "
                        "minmax, or none (scores as they are, in [0, 1]) (default: percentile)")
    h.add_argument("--patch-size", type=int_at_least(1), default=None, metavar="PX",
                   help="patch side in level-0 pixels, for h5 files whose coords lack it (CLAM's h5_files); "
                        "default: from the coords' attributes")
    h.add_argument("--chunk", type=int_at_least(1), default=None, metavar="N",
                   help="patches per chunk of the expert scores (default: as many as hold about 64 MB of routing "
                        "logits)")
    h.add_argument("--encoder", default=None, metavar="NAME",
                   help="with a TRIDENT run folder holding several features_{encoder}/ folders: the encoder to use")
    h.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default: auto)")
    h.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="Mammoth's backend for the model's forward (default: auto, triton on CUDA, sdpa on the CPU)")


def run(args: argparse.Namespace, prog: str) -> int:
    """Run ``heatmap``; 0 on success, 1 on bad input (one line on stderr)."""
    from ..data import DataError
    from ..train import TrainError
    from .run import HeatmapOptions, run_heatmap

    options = HeatmapOptions(experts=args.experts, topk=args.topk, size=args.size, cmap=args.cmap,
                             attention_cmap=args.attention_cmap, alpha=args.alpha, normalize=args.normalize,
                             patch_size=args.patch_size, chunk=args.chunk)
    try:
        summary = run_heatmap(args.checkpoint, args.features, args.out, slide=args.slide, slides=args.slides,
                              model=args.model, num_classes=args.num_classes, encoder=args.encoder, options=options,
                              backend=args.backend, device=args.device)
    except (DataError, TrainError) as exc:
        print(f"{prog} heatmap: error: {exc}", file=sys.stderr)
        return 1
    for slide in summary["slides"]:
        said = f"risk {slide['risk']:.4g}" if slide["task"] == "survival" else slide["predicted_class"]
        print(f"{slide['slide_id']}: {said} ({slide['patches']} patches) -> {args.out}/{slide['slide_id']}/",
              flush=True)
    return 0
