"""Pictures of per-patch scores: patches drawn as rectangles of their value on a
downsampled canvas (a slide thumbnail, or a blank canvas of the slide's extent).

Drawing is vectorized, no loop over patches: each patch adds its value at the
four corners of its rectangle in a (h + 1, w + 1) difference array (one
``np.bincount``), and two cumulative sums turn that into every pixel's sum over
the patches covering it, O(N + pixels). Done once with ones (the count) and with
the patch indices, this gives each pixel's patch when no two patches overlap
(the usual grid), and every map is then one gather; with overlaps each map is
summed this way and divided by the count (overlapping patches are averaged).
Colours come from matplotlib's colormaps (a 256-entry lookup table); panels,
colorbars and legends are composed with PIL.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NORMALIZATIONS = ("percentile", "minmax", "none")
WHITE = (255, 255, 255)


class Raster:
    """Patches (level-0 top-left ``coords`` (N, 2), side ``patch_size``) on a canvas
    of ``size`` (w, h) pixels covering a level-0 extent (width, height). Where no
    two patches overlap (``owner`` is set), a map is one gather of per-patch
    values through ``owner``, each pixel's patch; otherwise pixels average the
    patches covering them (:meth:`paint`)."""

    def __init__(self, coords: np.ndarray, patch_size: int, extent: Tuple[int, int], size: Tuple[int, int]):
        self.w, self.h = size
        sx, sy = self.w / extent[0], self.h / extent[1]
        x0, x1 = self._span(coords[:, 0], patch_size, sx, self.w)  # (N,) each
        y0, y1 = self._span(coords[:, 1], patch_size, sy, self.h)
        stride = self.w + 1
        self._corners = np.concatenate([y0 * stride + x0, y0 * stride + x1, y1 * stride + x0, y1 * stride + x1])
        self.count = self._accumulate(np.ones(len(coords), dtype=np.int32))  # (h, w) patches covering each pixel
        self.covered = self.count > 0  # (h, w)
        self.owner = None  # (h, w) index of the pixel's patch (0 where none), when no patches overlap
        if self.count.max(initial=0) <= 1:
            self.owner = self._accumulate(np.arange(len(coords), dtype=np.int32))

    @staticmethod
    def _span(start: np.ndarray, size: int, scale: float, limit: int) -> Tuple[np.ndarray, np.ndarray]:
        """Pixel columns (or rows) [lo, hi) of each patch, at least one pixel, inside the canvas."""
        lo = np.clip(np.floor(start * scale).astype(np.int64), 0, limit - 1)
        hi = np.clip(np.floor((start + size) * scale).astype(np.int64), lo + 1, limit)
        return lo, hi

    def _accumulate(self, values: np.ndarray) -> np.ndarray:
        """(h, w): each pixel's sum of ``values`` (N,) over the patches covering it,
        int32 for int32 values (exact), else float64."""
        v = values.astype(np.float64)
        grid = np.bincount(self._corners, np.concatenate([v, -v, -v, v]), minlength=(self.h + 1) * (self.w + 1))
        if values.dtype == np.int32:
            grid = np.rint(grid).astype(np.int32)
        grid = grid.reshape(self.h + 1, self.w + 1)
        return grid.cumsum(0, dtype=grid.dtype).cumsum(1, dtype=grid.dtype)[: self.h, : self.w]

    def paint(self, values: np.ndarray) -> np.ndarray:
        """(h, w) float32: the mean value of the patches covering each pixel, NaN where none."""
        if self.owner is not None:
            return np.where(self.covered, np.asarray(values, dtype=np.float32)[self.owner], np.float32(np.nan))
        total = self._accumulate(values)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.covered, total / self.count, np.nan).astype(np.float32)

    def colorize(self, unit: np.ndarray, lut: np.ndarray) -> Image.Image:
        """Values in [0, 1] (N,) drawn through the lookup table ``lut`` (K, 3), an RGB
        image (the colour of uncovered pixels is unspecified)."""
        words = packed(lut)  # (K,)
        if self.owner is not None:
            return rgb_image(words[lut_index(unit, len(lut))].take(self.owner))
        return rgb_image(words[lut_index(np.nan_to_num(self.paint(unit), nan=0.0), len(lut))])

    def argmax(self, scores: np.ndarray) -> np.ndarray:
        """(h, w) index of the column of ``scores`` (N, K) highest at each pixel
        (after averaging overlapping patches)."""
        if self.owner is not None:
            return scores.argmax(axis=1)[self.owner]
        best = np.full((self.h, self.w), -np.inf, dtype=np.float32)
        label = np.zeros((self.h, self.w), dtype=np.intp)
        for k in range(scores.shape[1]):
            painted = np.nan_to_num(self.paint(scores[:, k]), nan=-np.inf)
            higher = painted > best
            best[higher], label[higher] = painted[higher], k
        return label


def packed(colors: np.ndarray) -> np.ndarray:
    """(K, 3) uint8 colours -> (K,) uint32 words holding them as PIL's raw 'RGBX'
    (gathering one word per pixel is much faster than three bytes)."""
    rgbx = np.zeros((len(colors), 4), dtype=np.uint8)
    rgbx[:, :3] = colors
    return rgbx.view(np.uint32)[:, 0]


def rgb_image(words: np.ndarray) -> Image.Image:
    """(h, w) uint32 words of :func:`packed` -> an RGB image."""
    h, w = words.shape
    words = np.ascontiguousarray(words, dtype=np.uint32)
    return Image.frombuffer("RGBX", (w, h), words, "raw", "RGBX", 0, 1).convert("RGB")


def lut_index(unit: np.ndarray, size: int) -> np.ndarray:
    """Values in [0, 1] -> indices into a lookup table of ``size`` entries."""
    return np.clip(np.rint(unit * (size - 1)), 0, size - 1).astype(np.intp)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """(N,) each value's rank among ``values`` scaled to [0, 1] (ties share their mean rank)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # (R,) first position of each run of ties
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks / max(n - 1, 1)


def normalize(values: np.ndarray, how: str) -> Tuple[np.ndarray, Tuple[str, str]]:
    """(values mapped to [0, 1], colorbar end labels): 'percentile' (rank
    percentiles, as the authors' pictures), 'minmax' or 'none' (values in [0, 1] as they are)."""
    values = np.asarray(values)
    if how == "percentile":
        return percentile_ranks(values), ("0%", "100%")
    values = values.astype(np.float64)
    if how == "minmax":
        lo, hi = float(values.min()), float(values.max())
        return (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5), (f"{lo:.3g}", f"{hi:.3g}")
    if how == "none":
        return np.clip(values, 0.0, 1.0), ("0", "1")
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {how!r}")


def lookup_table(cmap: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colormap; ValueError naming the valid ones."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; e.g. turbo, viridis, coolwarm, jet, magma") from None
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def categorical_colors(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: tab20, tab20b, tab20c, then repeated."""
    import matplotlib

    table = np.concatenate([np.asarray(matplotlib.colormaps[name].colors) for name in ("tab20", "tab20b", "tab20c")])
    return (table[np.arange(n) % len(table)] * 255 + 0.5).astype(np.uint8)


def blend(background: Image.Image, colors: Image.Image, covered: np.ndarray, alpha: float) -> Image.Image:
    """``colors`` over ``background`` with opacity alpha where ``covered`` (h, w)."""
    mixed = Image.blend(background, colors, alpha)
    return Image.composite(mixed, background, Image.fromarray(covered))


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def colorbar(height: int, lut: np.ndarray, labels: Tuple[str, str], title: str = "") -> Image.Image:
    """A panel (width about height / 6) with a vertical colour bar, high values on
    top, its end labels and a title above."""
    size = max(10, height // 30)
    bar_w, margin = size, size // 2
    top, bottom = 2 * size, height - size
    panel = Image.new("RGB", (bar_w + 4 * size + 2 * margin, height), WHITE)
    ramp = lut[np.linspace(len(lut) - 1, 0, max(bottom - top, 1)).round().astype(np.intp)]  # (rows, 3)
    panel.paste(Image.fromarray(np.repeat(ramp[:, None], bar_w, axis=1)), (margin, top))
    draw, text = ImageDraw.Draw(panel), font(size)
    draw.text((margin, 0), title, fill=(0, 0, 0), font=text)
    draw.text((margin + bar_w + margin // 2, top), labels[1], fill=(0, 0, 0), font=text, anchor="lt")
    draw.text((margin + bar_w + margin // 2, bottom), labels[0], fill=(0, 0, 0), font=text, anchor="lb")
    return panel


def beside(*images: Image.Image) -> Image.Image:
    """Images side by side, top-aligned, on white."""
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), WHITE)
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out


def score_map(raster: Raster, background: Image.Image, unit: np.ndarray, labels: Tuple[str, str],
              lut: np.ndarray, alpha: float, title: str) -> Image.Image:
    """One map: ``unit`` (N,) values in [0, 1] (:func:`normalize`) drawn over
    ``background``, with a colorbar whose ends read ``labels``."""
    image = blend(background, raster.colorize(unit, lut), raster.covered, alpha)
    return beside(image, colorbar(image.height, lut, labels, title))


def labelled(image: Image.Image, label: str, size: int) -> Image.Image:
    """``image`` with ``label`` on a white box at its top-left corner."""
    image = image.copy()
    draw, text = ImageDraw.Draw(image), font(size)
    box = draw.textbbox((2, 2), label, font=text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=WHITE)
    draw.text((2, 2), label, fill=(0, 0, 0), font=text)
    return image


def grid(panels: Sequence[Image.Image], columns: int, gap: int = 4) -> Image.Image:
    """Equal-sized panels in rows of ``columns``, ``gap`` white pixels apart."""
    w, h = panels[0].size
    rows = math.ceil(len(panels) / columns)
    out = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), WHITE)
    for i, panel in enumerate(panels):
        out.paste(panel, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return out


def experts_grid(raster: Raster, background: Image.Image, units: np.ndarray, labels: Tuple[str, str],
                 lut: np.ndarray, alpha: float, title: str) -> Image.Image:
    """Every expert's map (``units`` (N, E), normalized scores) on a small canvas,
    labelled, in a grid with one colorbar."""
    experts = units.shape[1]
    panels = []
    for e in range(experts):
        image = blend(background, raster.colorize(units[:, e], lut), raster.covered, alpha)
        panels.append(labelled(image, f"expert {e}", max(10, raster.h // 12)))
    sheet = grid(panels, min(experts, max(1, math.ceil(math.sqrt(experts * raster.h / raster.w)))))
    return beside(sheet, colorbar(sheet.height, lut, labels, title))


def argmax_map(raster: Raster, background: Image.Image, scores: np.ndarray, alpha: float) -> Image.Image:
    """Each pixel coloured by the expert of highest score (N, E), with a legend of
    the experts and their share of the patches."""
    experts = scores.shape[1]
    palette = categorical_colors(experts)
    image = blend(background, rgb_image(packed(palette)[raster.argmax(scores)]), raster.covered, alpha)
    share = np.bincount(scores.argmax(axis=1), minlength=experts) / len(scores)  # (E,) patches won
    return beside(image, legend(image.height, palette, [f"expert {e}: {100 * s:.1f}%" for e, s in enumerate(share)]))


def legend(height: int, palette: np.ndarray, entries: List[str]) -> Image.Image:
    """A panel listing colour swatches and their entries, top to bottom."""
    size = max(8, min(height // 30, (height - 4) // (len(entries) + 1)))
    text = font(size)
    width = 3 * size + max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(e, font=text) for e in entries)
    panel = Image.new("RGB", (int(width) + size, max(height, (len(entries) + 1) * size + 4)), WHITE)
    draw = ImageDraw.Draw(panel)
    draw.text((size // 2, 0), "argmax expert", fill=(0, 0, 0), font=text)
    for i, (entry, color) in enumerate(zip(entries, palette)):
        y = (i + 1) * size + 2
        draw.rectangle((size // 2, y + 1, size // 2 + size - 2, y + size - 2), fill=tuple(int(c) for c in color))
        draw.text((2 * size, y), entry, fill=(0, 0, 0), font=text)
    return panel


def contact_sheet(crops: Sequence[Image.Image], captions: Sequence[str], tile: int = 192,
                  columns: int = 5) -> Image.Image:
    """The crops shrunk to ``tile`` px, captioned, in rows of ``columns``."""
    panels = [labelled(c.resize((tile, tile), Image.LANCZOS) if c.size != (tile, tile) else c, caption, tile // 10)
              for c, caption in zip(crops, captions)]
    return grid(panels, min(columns, len(panels)))
