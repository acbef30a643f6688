"""Where a slide's patches lie: level-0 coordinates and patch size from the
features' h5 attributes (FORMATS.md), the slide's extent, and the whole-slide
image itself through openslide (imported only when a slide is opened).

- TRIDENT: ``coords`` attributes ``patch_size_level0``, ``level0_width``,
  ``level0_height``.
- CLAM patch files: ``patch_size`` at ``patch_level`` and ``downsample``, that
  level's downsample (a number or an (x, y) pair); without ``downsample`` the
  slide's own level downsample is used, and patch_level 0 needs none. CLAM's
  ``h5_files`` carry no attributes: the patch size must then be given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..data.errors import DataError
from ..data.features import Bag


@dataclass
class PatchLayout:
    """One slide's patches at level 0."""
    coords: np.ndarray  # (N, 2) int64 top-left (x, y)
    patch_size: int  # the side of a patch
    width: int  # the slide's extent
    height: int
    source: str  # where patch_size came from


def _number(attrs: Dict[str, Any], key: str) -> Optional[float]:
    value = attrs.get(key)
    if isinstance(value, (list, tuple)) and value:
        value = float(np.mean(value))  # CLAM's (x, y) downsample
    return None if value is None else float(value)


def patch_size_level0(attrs: Dict[str, Any], where: str, override: Optional[int] = None,
                      slide=None) -> Tuple[int, str]:
    """(patch side in level-0 pixels, its source): ``override``, else TRIDENT's
    ``patch_size_level0``, else CLAM's ``patch_size`` x ``downsample`` (or the
    slide's downsample of ``patch_level``); DataError naming ``where`` if none applies."""
    if override is not None:
        return int(override), "given"
    if attrs.get("patch_size_level0") is not None:
        return int(round(_number(attrs, "patch_size_level0"))), "patch_size_level0 attribute"
    size, level, down = _number(attrs, "patch_size"), attrs.get("patch_level"), _number(attrs, "downsample")
    if size is not None and down is not None:
        return int(round(size * down)), "patch_size x downsample attributes"
    if size is not None and level is not None:
        level = int(level)
        if level == 0:
            return int(round(size)), "patch_size attribute (patch_level 0)"
        if slide is not None and level < slide.level_count:
            return (int(round(size * slide.level_downsamples[level])),
                    f"patch_size x the slide's level-{level} downsample")
    raise DataError(f"{where}: the coords carry no level-0 patch size (TRIDENT's patch_size_level0, or CLAM's "
                    "patch_size with downsample or patch_level); give it (--patch-size, in level-0 pixels)")


def patch_layout(bag: Bag, where: str, slide=None, patch_size: Optional[int] = None) -> PatchLayout:
    """The bag's PatchLayout; the extent is the slide's when given, else TRIDENT's
    level0_width / level0_height, else the patches' bounding box. DataError when
    there are no coords, when TRIDENT's extent differs from the slide's, or when
    a patch's top-left lies outside the extent."""
    if bag.coords is None:
        raise DataError(f"{where}: no coords (a heatmap needs each patch's level-0 position; a .pt file holds the "
                        "features alone: use the slide's .h5)")
    coords = bag.coords.numpy().astype(np.int64)  # (N, 2)
    size, source = patch_size_level0(bag.attrs, where, patch_size, slide)
    if size < 1:
        raise DataError(f"{where}: level-0 patch size {size} ({source}) must be at least 1")
    recorded = (bag.attrs.get("level0_width"), bag.attrs.get("level0_height"))
    if slide is not None:
        width, height = slide.dimensions
        extent = "the slide's"
        if None not in recorded and (int(recorded[0]), int(recorded[1])) != (width, height):
            raise DataError(f"{where}: the features come from a slide of {int(recorded[0])} x {int(recorded[1])} "
                            f"level-0 pixels (level0_width, level0_height) but the slide given is {width} x {height}: "
                            "is it the right slide?")
    elif None not in recorded:
        width, height, extent = int(recorded[0]), int(recorded[1]), "level0_width, level0_height"
    else:
        width, height = (int(v) for v in coords.max(axis=0) + size)
        extent = "the patches' bounding box"
    outside = (coords < 0).any(axis=1) | (coords[:, 0] >= width) | (coords[:, 1] >= height)  # (N,)
    if outside.any():
        first = coords[np.flatnonzero(outside)[0]]
        raise DataError(f"{where}: {int(outside.sum())} of {len(coords)} patches lie outside the slide's level-0 "
                        f"extent {width} x {height} ({extent}), e.g. (x, y) = ({first[0]}, {first[1]}): are these "
                        "the features of this slide?")
    return PatchLayout(coords, size, width, height, source)


def open_wsi(path: Path, where: str):
    """The whole-slide image at ``path`` as an ``openslide.OpenSlide``; DataError
    when openslide is missing or cannot read it."""
    try:
        import openslide
    except ImportError as exc:
        raise DataError(f"{where}: reading slides needs openslide-python and openslide-bin "
                        f"(pip install openslide-python openslide-bin): {exc}") from None
    if not Path(path).is_file():
        raise DataError(f"{where}: slide {path}: no such file")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as exc:
        raise DataError(f"{where}: openslide cannot open slide {path} ({type(exc).__name__}: {exc})") from None


def read_patch(slide, x: int, y: int, size: int):
    """The level-0 region [x, x + size) x [y, y + size) as an RGB PIL image, at
    full resolution; parts outside the slide are white."""
    from PIL import Image

    region = slide.read_region((int(x), int(y)), 0, (size, size))  # RGBA
    page = Image.new("RGB", region.size, (255, 255, 255))
    page.paste(region, mask=region.getchannel("A"))
    return page
