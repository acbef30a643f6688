"""A synthetic whole slide for tests and the README's pictures: a tiled,
pyramidal RGB TIFF (written by tifffile, read by openslide as a generic TIFF)
of a tissue ellipse on a white background holding three tissue types, and
its patches' coords and features (each tissue type its own mean feature plus
noise) in the TRIDENT or CLAM h5 layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Tuple, Union

import h5py
import numpy as np

from ..data.synthetic import write_clam_h5, write_trident_h5

PathLike = Union[str, Path]
TISSUES = ("background", "stroma", "tumor", "fat")
COLORS = np.array([(246, 246, 246), (232, 160, 196), (122, 64, 152), (250, 232, 206)], dtype=np.uint8)  # (4, 3)


class SyntheticSlide(NamedTuple):
    slide: Path  # the TIFF
    features: Path  # the h5
    image: np.ndarray  # (H, W, 3) uint8, level 0 as written
    coords: np.ndarray  # (N, 2) int64 level-0 top-left of the tissue patches
    tissue: np.ndarray  # (N,) int64 index into TISSUES of each patch's centre


def tissue_map(width: int, height: int, tumor: bool = True) -> np.ndarray:
    """(height, width) int8 tissue index: an ellipse of stroma holding a tumor
    disc (when ``tumor``) and two fat discs, background elsewhere."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    tissue = np.zeros((height, width), dtype=np.int8)
    tissue[((u - 0.5) / 0.46) ** 2 + ((v - 0.5) / 0.44) ** 2 < 1] = 1
    for cu, cv, r in ((0.25, 0.62, 0.12), (0.55, 0.25, 0.08)):
        tissue[(tissue == 1) & (((u - cu) * width) ** 2 + ((v - cv) * height) ** 2 < (r * width) ** 2)] = 3
    if tumor:
        tissue[(((u - 0.66) * width) ** 2 + ((v - 0.58) * height) ** 2) < (0.17 * width) ** 2] = 2
    return tissue


def slide_image(tissue: np.ndarray, seed: int = 0, noise: int = 12) -> np.ndarray:
    """(H, W, 3) uint8: each tissue's colour plus uniform noise in [-noise, noise]."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-noise, noise + 1, size=tissue.shape + (3,), dtype=np.int16)
    return np.clip(COLORS[tissue].astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_tiled_tiff(path: PathLike, image: np.ndarray, tile: int = 256, levels: int = 2, mpp: float = 0.25) -> Path:
    """A tiled pyramidal TIFF: level 0 then ``levels - 1`` levels each 4x smaller
    (reduced-resolution pages), zlib-compressed, ``mpp`` microns per pixel."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            page = image[:: 4 ** level, :: 4 ** level]
            size = max(16, min(tile, 16 * (min(page.shape[:2]) // 16)))  # tiles are multiples of 16
            tif.write(np.ascontiguousarray(page), tile=(size, size), photometric="rgb", compression="zlib",
                      subfiletype=1 if level else 0, resolution=(1e4 / (mpp * 4 ** level),) * 2,
                      resolutionunit="CENTIMETER")
    return path


def tissue_patches(tissue: np.ndarray, patch: int) -> Tuple[np.ndarray, np.ndarray]:
    """(coords (N, 2) int64, tissue (N,)) of the grid patches whose centre is tissue."""
    height, width = tissue.shape
    ys, xs = np.mgrid[0:height - patch + 1:patch, 0:width - patch + 1:patch]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)  # (M, 2)
    kind = tissue[coords[:, 1] + patch // 2, coords[:, 0] + patch // 2].astype(np.int64)  # (M,)
    keep = kind > 0
    return coords[keep], kind[keep]


def patch_features(tissue: np.ndarray, dim: int, seed: int = 0, signal: float = 2.0) -> np.ndarray:
    """(N, dim) float32: a fixed random mean per tissue type (the same for every
    seed) times ``signal``, plus N(0, 1) noise drawn from ``seed``."""
    means = np.random.default_rng(1234).standard_normal((len(TISSUES), dim)).astype(np.float32)  # (T, D)
    noise = np.random.default_rng(seed).standard_normal((len(tissue), dim)).astype(np.float32)
    return signal * means[tissue] + noise


def make_synthetic_slide(root: PathLike, name: str = "slide_0", width: int = 2048, height: int = 1536,
                         patch: int = 128, dim: int = 16, layout: str = "trident", tumor: bool = True,
                         seed: int = 0, write_slide: bool = True, noise: int = 12) -> SyntheticSlide:
    """``root/slides/{name}.tiff`` and its features h5: TRIDENT's
    ``root/features_synthetic/{name}.h5`` (coords attributes patch_size_level0,
    level0_width, level0_height, ...) or CLAM's ``root/h5_files/{name}.h5`` with
    CLAM's patching attributes on coords (patch_size at patch_level 1, downsample 4)."""
    if layout not in ("trident", "clam"):
        raise ValueError(f"layout must be 'trident' or 'clam', got {layout!r}")
    root = Path(root)
    tissue = tissue_map(width, height, tumor)
    image = slide_image(tissue, seed, noise)
    slide = root / "slides" / f"{name}.tiff"
    if write_slide:
        write_tiled_tiff(slide, image)
    coords, kind = tissue_patches(tissue, patch)
    feats = patch_features(kind, dim, seed)
    if layout == "trident":
        h5 = write_trident_h5(root / "features_synthetic" / f"{name}.h5", feats, coords, patch_size=patch // 2,
                              patch_size_level0=patch)
        with h5py.File(h5, "a") as f:
            f["coords"].attrs.update({"level0_width": width, "level0_height": height})
    else:
        h5 = write_clam_h5(root / "h5_files" / f"{name}.h5", feats, coords)
        with h5py.File(h5, "a") as f:
            f["coords"].attrs.update({"patch_size": patch // 4, "patch_level": 1, "downsample": (4.0, 4.0),
                                      "downsampled_level_dim": (width // 4, height // 4),
                                      "level_dim": (width // 4, height // 4), "name": name,
                                      "save_path": str(h5.parent)})
    return SyntheticSlide(slide, h5, image, coords, kind)
