"""Where each expert looks: per-patch expert scores, attention and prediction of
a MIL model on whole slides, drawn over the slide (``mammoth-fast heatmap``).

- ``scores.py``  expert scores in chunks of patches (never N x E x H x S at once),
                 per-patch attention, the slide's prediction
- ``slide.py``   level-0 coords, patch size and extent from the h5 attributes; the slide through openslide
- ``render.py``  vectorized drawing of patch rectangles, colormaps, colorbars, grids, legends
- ``run.py``     one slide's outputs, many slides, the checkpoint, the command

Typical use, with a model already loaded (e.g. at the end of a training fold)::

    from mammoth_fast.heatmap import HeatmapOptions, write_heatmaps
    write_heatmaps(model, ["feats/slide_1.h5"], "out/heatmaps", slides="wsi/", meta={"classes": ["benign", "tumor"]},
                   options=HeatmapOptions(topk=10))
"""
from .run import (HeatmapOptions, check_experts, check_options, heatmap_slide, load_model, prediction, run_heatmap,
                  slide_inputs, write_heatmaps)
from .scores import (SlideScores, dispatch_lse, expert_scores, mammoth_layer, routing_scores, score_slide,
                     scores_from_weights)
from .slide import PatchLayout, open_wsi, patch_layout, patch_size_level0, read_patch

__all__ = [
    "HeatmapOptions", "PatchLayout", "SlideScores", "check_experts", "check_options", "dispatch_lse", "expert_scores",
    "heatmap_slide", "load_model", "mammoth_layer", "open_wsi", "patch_layout", "patch_size_level0", "prediction",
    "read_patch", "routing_scores", "run_heatmap", "score_slide", "scores_from_weights", "slide_inputs",
    "write_heatmaps",
]
