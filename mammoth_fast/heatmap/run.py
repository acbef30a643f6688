"""The ``mammoth-fast heatmap`` command: a checkpoint and slides' features (and
optionally the slides) in, per slide ``OUT/<slide_id>/``:

    scores.csv           x, y (level-0 top-left, as in the h5), attention (where defined), expert_0 .. expert_{E-1}
    prediction.json      the prediction (class probabilities, or a survival risk), patch size and extent used,
                         what 'attention' is
    expert_{e}.png       each chosen expert's map, with a colorbar
    experts_grid.png     all experts' maps, small, one colorbar
    argmax_expert.png    each place coloured by its expert of highest score, with a legend
    attention.png        the aggregator's attention (models that have it per patch)
    top_patches/expert_{e}/rank{r}_x{X}_y{Y}.png, top_patches/expert_{e}.png
                         each chosen expert's top-k patches read from the slide at level 0, and their contact sheet

and ``OUT/heatmaps.json`` listing the slides. :func:`write_heatmaps` does it
for a model already loaded (e.g. at the end of training); :func:`run_heatmap`
loads a checkpoint first.
"""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoints import read_state_dict
from ..data.errors import DataError
from ..data.features import WSI_SUFFIXES, detect_layout, features_shape, read_bag
from ..mil.builder import CHECKPOINT_PREFIXES, ENCODER_DIMS, MODELS, parse_name
from ..train import (CHECKPOINT_FORMAT, TrainError, build_model, load_trained, model_overrides, resolve_device)
from . import render
from .scores import SlideScores, mammoth_layer, score_slide
from .slide import PatchLayout, open_wsi, patch_layout, read_patch

PathLike = Union[str, Path]
SlideInput = Tuple[str, Path, Optional[Path]]  # (slide id, features .h5, whole-slide image or None)
SAVE_THREADS = min(4, os.cpu_count() or 1)  # PNG encoders (PIL releases the GIL while encoding)


@dataclass
class HeatmapOptions:
    """What :func:`write_heatmaps` draws, and how."""
    experts: Optional[Sequence[int]] = None  # experts drawn one by one, with top patches (None: all)
    topk: int = 10  # top patches per chosen expert (needs the slide; 0: none)
    size: int = 4000  # longest side of the thumbnail, or of the blank canvas, in pixels
    cmap: str = "turbo"  # expert maps
    attention_cmap: str = "coolwarm"  # attention map (TRIDENT's and CLAM's colormap)
    alpha: Optional[float] = None  # opacity of the colours; None: 0.3 over a thumbnail, 1.0 on a blank canvas
    normalize: str = "percentile"  # 'percentile', 'minmax' or 'none' (see render.normalize)
    patch_size: Optional[int] = None  # level-0 patch side when the h5 attributes lack it
    chunk: Optional[int] = None  # patches per chunk of the expert scores (None: about 64 MB of logits)
    grid_size: int = 320  # longest side of each panel of experts_grid.png


# ------------------------------------------------------------------ the model
def _strip(key: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key


def _read_checkpoint(path: Path):
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {first})") from None


def _check_model_name(path: Path, trained: str, in_dim: int, asked: str) -> None:
    """TrainError when ``asked`` is not the model ``trained`` (another model or config,
    or an encoder of another width)."""
    try:
        mine, theirs = parse_name(asked), parse_name(trained)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    wrong_width = len(asked.split(".")) >= 3 and ENCODER_DIMS[mine[2]] != in_dim
    if mine[:2] != theirs[:2] or wrong_width:
        raise TrainError(f"checkpoint {path} was trained as model {trained!r} (features {in_dim} wide), not {asked!r}")


def _num_classes(state: Mapping[str, torch.Tensor], model: str, path: Path) -> int:
    """The class count of a bare state_dict of ``model``: its slide classifier's output rows."""
    head = MODELS[parse_name(model)[0]].slide_head
    rows = [v.shape[0] for k, v in state.items() if _strip(k).startswith(head + ".") and _strip(k).endswith("weight")]
    if not rows:
        raise TrainError(f"{path}: no {head}.*weight to read the number of classes of a {model!r} model from; "
                         "give it (--num-classes)")
    return int(rows[-1])  # the last layer of a Sequential head


def load_model(checkpoint: PathLike, model: Optional[str] = None, in_dim: Optional[int] = None,
               num_classes: Optional[int] = None, backend: str = "auto",
               device: torch.device = torch.device("cpu")) -> Tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a checkpoint of ``mammoth-fast train``
    (``model``, when given, must be the one it was trained as; ``in_dim``, the
    features' width, must be its) or from a bare state_dict (e.g. MIL-Lab's) of
    ``model`` built for features ``in_dim`` wide, with ``num_classes`` (default:
    read from its classifier's weight). meta holds model_name, num_classes,
    classes and in_dim."""
    path = Path(checkpoint)
    ckpt = _read_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        if model is not None:
            _check_model_name(path, ckpt["model_name"], ckpt["in_dim"], model)
        if in_dim is not None and in_dim != ckpt["in_dim"]:
            raise DataError(f"the features are {in_dim} wide but checkpoint {path} takes {ckpt['in_dim']} "
                            f"(model {ckpt['model_name']!r}): features of another encoder?")
        return load_trained(path, backend, device)
    if model is None or in_dim is None:
        raise TrainError(f"{path}: not a checkpoint written by mammoth-fast train; to load it as a bare state_dict, "
                         "name its model (--model)" + ("" if in_dim is not None else " and the features' width"))
    try:
        state = read_state_dict(ckpt)
    except TypeError as exc:
        raise TrainError(f"{path}: {exc}") from None
    classes = num_classes or _num_classes(state, model, path)
    overrides = model_overrides(model, in_dim)
    net = build_model(model, classes, overrides, backend, device, checkpoint_path=path)
    return net.eval(), {"model_name": model, "num_classes": classes, "classes": [str(c) for c in range(classes)],
                        "in_dim": in_dim, "overrides": overrides}


def check_options(options: HeatmapOptions) -> None:
    """TrainError naming the first option that cannot work."""
    try:
        render.lookup_table(options.cmap)
        render.lookup_table(options.attention_cmap)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    bad = [(name, value) for name, value, ok in (
        ("normalize", options.normalize, options.normalize in render.NORMALIZATIONS),
        ("alpha", options.alpha, options.alpha is None or 0 < options.alpha <= 1),
        ("topk", options.topk, options.topk >= 0), ("size", options.size, options.size >= 1),
        ("grid_size", options.grid_size, options.grid_size >= 1),
        ("patch_size", options.patch_size, options.patch_size is None or options.patch_size >= 1),
        ("chunk", options.chunk, options.chunk is None or options.chunk >= 1)) if not ok]
    if bad:
        raise TrainError(f"heatmap option {bad[0][0]}={bad[0][1]!r} cannot work (normalize: one of "
                         f"{render.NORMALIZATIONS}; alpha in (0, 1]; sizes >= 1; topk >= 0)")


def check_experts(net: nn.Module, experts: Optional[Sequence[int]]) -> List[int]:
    """The experts to draw one by one: ``experts``, or all; TrainError for a model
    without Mammoth given experts, or an expert out of range."""
    layer = mammoth_layer(net)
    if layer is None:
        if experts:
            raise TrainError(f"--experts: {type(net).__name__} has no Mammoth layer, so no experts to draw")
        return []
    bad = [e for e in experts or () if not 0 <= e < layer.num_experts]
    if bad:
        raise TrainError(f"--experts: expert {bad[0]} is out of range: the model has {layer.num_experts} experts "
                         f"(0..{layer.num_experts - 1})")
    return list(range(layer.num_experts)) if experts is None else list(experts)


# ------------------------------------------------------------------ the inputs
def _slide_index(slides: Optional[PathLike]) -> Dict[str, Path]:
    """{slide id: whole-slide image} of a folder, the ids being the file names without a WSI suffix."""
    if slides is None:
        return {}
    folder = Path(slides)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such slides folder")
    index = {}
    for path in sorted(folder.iterdir()):
        stem, suffix = path.stem, path.suffix.lower()
        if path.is_file() and suffix in WSI_SUFFIXES:
            index.setdefault(stem, path)
    return index


def _listed(path: Path) -> List[Tuple[Path, Optional[Path]]]:
    """A list file's lines 'FEATURES.h5' or 'FEATURES.h5<tab or comma>SLIDE', paths
    relative to the list's folder; blank lines and '#' comments skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",", 1)]
        h5, wsi = (path.parent / parts[0], path.parent / parts[1] if len(parts) > 1 and parts[1] else None)
        rows.append((h5, wsi))
    if not rows:
        raise DataError(f"{path}: lists no features file")
    return rows


def slide_inputs(features: PathLike, slide: Optional[PathLike] = None, slides: Optional[PathLike] = None,
                 encoder: Optional[str] = None) -> List[SlideInput]:
    """(slide id, features h5, whole-slide image or None) for ``features``: one .h5
    file (with ``slide``), a features folder (TRIDENT or CLAM layout, every .h5), or
    a text file listing .h5 files (optionally each with its slide, comma- or
    tab-separated). Slides not given per file are matched by id in ``slides``."""
    path = Path(features)
    if path.suffix == ".pt":
        raise DataError(f"{path}: a .pt file holds the features alone, without coords: use the slide's .h5")
    if path.is_dir():
        if slide is not None:
            raise TrainError(f"--slide names one slide but {path} is a folder: match slides by id with --slides DIR")
        h5_dir = detect_layout(path, encoder).h5_dir
        files = [] if h5_dir is None else sorted(h5_dir.glob("*.h5"))
        if not files:
            raise DataError(f"{path}: no .h5 features files (a heatmap needs their coords; .pt files hold none)")
        rows = [(f, None) for f in files]
    elif path.suffix == ".h5":
        rows = [(path, None if slide is None else Path(slide))]
    elif path.is_file():
        if slide is not None:
            raise TrainError(f"--slide names one slide but {path} lists several: give each its slide in the list, "
                             "or --slides DIR")
        rows = _listed(path)
    else:
        raise DataError(f"{path}: no such features file or folder")
    index = _slide_index(slides)
    inputs = [(h5.stem, h5, wsi if wsi is not None else index.get(h5.stem)) for h5, wsi in rows]
    seen = set()
    for slide_id, h5, _ in inputs:
        if slide_id in seen:
            raise DataError(f"{h5}: slide id {slide_id!r} appears twice (its output folder would be overwritten)")
        seen.add(slide_id)
    return inputs


# ------------------------------------------------------------------ one slide
def write_scores(path: Path, layout: PatchLayout, scores: SlideScores) -> List[str]:
    """scores.csv: x, y, attention (where defined), expert_0 .. expert_{E-1}; returns the columns."""
    columns, values = ["x", "y"], [layout.coords.astype(np.float64)]
    if scores.attention is not None:
        columns.append("attention")
        values.append(scores.attention[:, None])
    if scores.experts is not None:
        columns += [f"expert_{e}" for e in range(scores.experts.shape[1])]
        values.append(scores.experts)
    table = np.concatenate(values, axis=1)  # (N, columns)
    np.savetxt(path, table, fmt=["%d", "%d"] + ["%.7g"] * (len(columns) - 2), delimiter=",",
               header=",".join(columns), comments="")
    return columns


def _canvas(layout: PatchLayout, wsi, size: int) -> Image.Image:
    """The slide's RGB thumbnail (longest side ``size``), or a white canvas of the
    slide's extent at the same scale (never above level 0)."""
    if wsi is not None:
        return wsi.get_thumbnail((size, size)).convert("RGB")
    return Image.new("RGB", _scaled((layout.width, layout.height), size), render.WHITE)


def _scaled(extent: Tuple[int, int], size: int) -> Tuple[int, int]:
    """(w, h) with the longest side ``size``, not enlarged."""
    scale = min(1.0, size / max(extent))
    return max(1, round(extent[0] * scale)), max(1, round(extent[1] * scale))


def _raster(layout: PatchLayout, background: Image.Image) -> render.Raster:
    return render.Raster(layout.coords, layout.patch_size, (layout.width, layout.height), background.size)


def _pictures(layout: PatchLayout, scores: SlideScores, chosen: Sequence[int], wsi,
              options: HeatmapOptions) -> Iterator[Tuple[str, Image.Image]]:
    """(file name, picture) of each map of one slide, one at a time."""
    background = _canvas(layout, wsi, options.size)
    raster = _raster(layout, background)
    alpha = options.alpha if options.alpha is not None else (0.3 if wsi is not None else 1.0)
    if scores.experts is not None:
        lut = render.lookup_table(options.cmap)
        normalized = [render.normalize(column, options.normalize) for column in scores.experts.T]
        units = np.stack([unit for unit, _ in normalized], axis=1)  # (N, E)
        for e in chosen:
            yield f"expert_{e}.png", render.score_map(raster, background, units[:, e], normalized[e][1], lut, alpha,
                                                      f"expert {e}")
        small = background.resize(_scaled(background.size, options.grid_size), Image.BILINEAR)
        ends = ("min", "max") if options.normalize == "minmax" else normalized[0][1]  # minmax: per-expert ends
        yield "experts_grid.png", render.experts_grid(_raster(layout, small), small, units, ends, lut, alpha,
                                                      options.normalize)
        yield "argmax_expert.png", render.argmax_map(raster, background, scores.experts, alpha)
    if scores.attention is not None:
        unit, ends = render.normalize(scores.attention, options.normalize)
        yield "attention.png", render.score_map(raster, background, unit, ends,
                                                render.lookup_table(options.attention_cmap), alpha, "attention")


def draw_pictures(folder: Path, layout: PatchLayout, scores: SlideScores, chosen: Sequence[int], wsi,
                  options: HeatmapOptions) -> List[str]:
    """Write the PNG maps of one slide in ``folder`` (PNG encoding in threads,
    a few pictures in flight); returns their file names. Expert maps of an
    earlier run with other ``--experts`` are removed, so the folder shows this run."""
    keep = {f"expert_{e}.png" for e in chosen}
    for old in folder.glob("expert_*.png"):
        if old.name not in keep:
            old.unlink()
    names, pending = [], []
    with ThreadPoolExecutor(max_workers=SAVE_THREADS) as pool:
        for name, image in _pictures(layout, scores, chosen, wsi, options):
            pending.append(pool.submit(image.save, folder / name, compress_level=3))
            names.append(name)
            if len(pending) > SAVE_THREADS:
                pending.pop(0).result()
        for done in pending:
            done.result()
    return names


def save_top_patches(folder: Path, layout: PatchLayout, experts: np.ndarray, chosen: Sequence[int], wsi,
                     k: int) -> Dict[str, List[str]]:
    """Each chosen expert's ``k`` patches of highest score read from the slide at
    level 0, full size: ``top_patches/expert_{e}/rank{r}_x{X}_y{Y}.png`` and the
    contact sheet ``top_patches/expert_{e}.png``; returns {expert: crop files}."""
    saved = {}
    for e in chosen:
        top = np.argsort(-experts[:, e], kind="stable")[:k]  # (k,) patch indices, best first
        where = folder / "top_patches" / f"expert_{e}"
        shutil.rmtree(where, ignore_errors=True)  # no crops of an earlier run left beside these
        where.mkdir(parents=True)
        crops, names = [], []
        for rank, i in enumerate(top):
            x, y = (int(v) for v in layout.coords[i])
            crops.append(read_patch(wsi, x, y, layout.patch_size))
            names.append(f"rank{rank:02d}_x{x}_y{y}.png")
            crops[-1].save(where / names[-1])
        captions = [f"{r} ({experts[i, e]:.3f})" for r, i in enumerate(top)]
        render.contact_sheet(crops, captions).save(folder / "top_patches" / f"expert_{e}.png")
        saved[str(e)] = [f"top_patches/expert_{e}/{n}" for n in names]
    return saved


def prediction(scores: SlideScores, meta: Optional[Mapping]) -> dict:
    """The slide's prediction for prediction.json: with a checkpoint's ``meta`` of
    a survival model (task 'survival', loss), its risk (and survival per time bin
    for the nll loss); else the class probabilities and the predicted class,
    named by meta's 'classes' (default: their indices)."""
    meta = meta or {}
    logits = [float(v) for v in scores.logits]
    if meta.get("task") == "survival":
        from ..survival import risk_scores, survival_curves

        z = torch.from_numpy(scores.logits)[None]  # (1, K)
        loss = meta.get("loss", "nll")
        curve = {} if loss == "cox" else {"survival": [float(v) for v in survival_curves(z)[0]]}
        return {"task": "survival", "risk": float(risk_scores(z, loss)[0]), **curve, "logits": logits}
    names = list(meta.get("classes") or [str(c) for c in range(len(logits))])
    return {"task": "classification", "predicted_class": names[scores.predicted],
            "probabilities": {c: float(p) for c, p in zip(names, scores.probs)}, "logits": logits}


def heatmap_slide(net: nn.Module, features: PathLike, out: PathLike, slide: Optional[PathLike] = None,
                  options: Optional[HeatmapOptions] = None, meta: Optional[Mapping] = None,
                  slide_id: Optional[str] = None) -> dict:
    """Scores and pictures of one slide (features .h5, optionally its whole-slide
    image) in ``out/<slide_id>/`` (slide_id: the file's stem); ``meta``: the
    checkpoint's (:func:`prediction`). Returns what prediction.json holds."""
    options = options or HeatmapOptions()
    features = Path(features)
    slide_id = slide_id or features.stem
    where = f"slide {slide_id!r} ({features})"
    chosen = check_experts(net, options.experts)
    bag = read_bag(features, where=where)
    if bag.features.shape[1] != net.in_dim:
        raise DataError(f"{where}: features are {bag.features.shape[1]} wide but the model takes {net.in_dim}: "
                        "features of another encoder?")
    wsi = None if slide is None else open_wsi(Path(slide), where)
    try:
        layout = patch_layout(bag, where, wsi, options.patch_size)
        scores = score_slide(net.eval(), bag.features, options.chunk)
        folder = Path(out) / slide_id
        folder.mkdir(parents=True, exist_ok=True)
        result = {
            "slide_id": slide_id, "features": str(features), "slide": None if slide is None else str(slide),
            "patches": len(layout.coords), "patch_size_level0": layout.patch_size,
            "patch_size_from": layout.source, "extent_level0": [layout.width, layout.height],
            **prediction(scores, meta),
            "experts": 0 if scores.experts is None else int(scores.experts.shape[1]),
            "attention": scores.attention_note,
            "columns": write_scores(folder / "scores.csv", layout, scores),
            "pictures": draw_pictures(folder, layout, scores, chosen, wsi, options),
            "top_patches": ({} if wsi is None or scores.experts is None or options.topk < 1 else
                            save_top_patches(folder, layout, scores.experts, chosen, wsi, options.topk)),
        }
    finally:
        if wsi is not None:
            wsi.close()
    (folder / "prediction.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------ many slides
def write_heatmaps(net: nn.Module, features: Sequence[Union[PathLike, SlideInput]], out: PathLike,
                   slides: Optional[Union[PathLike, Mapping[str, PathLike]]] = None, meta: Optional[Mapping] = None,
                   options: Optional[HeatmapOptions] = None, progress: bool = True, skip_errors: bool = False) -> dict:
    """Heatmaps of a loaded model (put in eval mode) for several slides, e.g. a
    fold's test slides at the end of training::

        write_heatmaps(model, [folder.path(s) for s in test_ids], fold_dir / "heatmaps",
                       slides=slides_dir, meta=checkpoint_meta)

    features: .h5 paths (slide id = file stem) or (slide id, h5, slide or None)
    tuples; slides: a folder of whole-slide images matched by slide id, or
    {slide id: path}; without one a slide is drawn on a blank canvas. meta: what
    the fold's checkpoint stores beside its state_dict ('classes', or 'task'
    'survival' and 'loss'), for the prediction (:func:`prediction`).
    skip_errors: a slide's DataError is recorded under 'errors' (and the other
    slides go on) instead of raised. Writes and returns ``out/heatmaps.json``:
    {'slides': [each slide's prediction.json], 'errors': [...]}."""
    options = options or HeatmapOptions()
    check_options(options)
    check_experts(net, options.experts)
    index = dict(slides) if isinstance(slides, Mapping) else _slide_index(slides)
    items = [item if isinstance(item, tuple) else (Path(item).stem, Path(item), None) for item in features]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"slides": [], "errors": []}
    for slide_id, h5, wsi in tqdm(items, desc="heatmaps", unit="slide", disable=not progress):
        wsi = wsi if wsi is not None else index.get(slide_id)
        try:
            summary["slides"].append(heatmap_slide(net, h5, out, wsi, options, meta, slide_id))
        except DataError as exc:
            if not skip_errors:
                raise
            summary["errors"].append({"slide_id": slide_id, "error": str(exc)})
    (out / "heatmaps.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_heatmap(checkpoint: PathLike, features: PathLike, out: PathLike, slide: Optional[PathLike] = None,
                slides: Optional[PathLike] = None, model: Optional[str] = None, num_classes: Optional[int] = None,
                encoder: Optional[str] = None, options: Optional[HeatmapOptions] = None, backend: str = "auto",
                device: str = "auto", progress: bool = True) -> dict:
    """The ``mammoth-fast heatmap`` command: load ``checkpoint`` (:func:`load_model`;
    in_dim from the first slide's features) and write the heatmaps of the slides
    of ``features`` (:func:`slide_inputs`) under ``out`` (:func:`write_heatmaps`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a folder")
    inputs = slide_inputs(features, slide, slides, encoder)
    shape, _ = features_shape(inputs[0][1], where=f"slide {inputs[0][0]!r} ({inputs[0][1]})")
    if len(shape) != 2:
        raise DataError(f"slide {inputs[0][0]!r} ({inputs[0][1]}): features must be (N patches, D), got {shape}")
    net, meta = load_model(checkpoint, model, int(shape[1]), num_classes, backend, resolve_device(device))
    return write_heatmaps(net, inputs, out, meta=meta, options=options, progress=progress)
