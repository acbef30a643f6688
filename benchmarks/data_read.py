"""Epoch read time of slide features: TRIDENT's HDF5 files vs the memory-mapped cache.

    python -m benchmarks.data_read [--slides 300] [--min-patches 1000] [--max-patches 20000]
                                   [--dim 1024] [--dtype float16] [--dir DIR] [--keep]
                                   [--epochs 2] [--no-evict] [--seed 0] [--json PATH]

Writes a synthetic TRIDENT-like set (``features_synthetic/{slide}.h5``, features
and coords in one-row chunks as TRIDENT writes them; patch counts uniform in
[min, max]) into ``--dir`` (default a temporary folder, deleted afterwards
unless ``--keep``; a folder that already holds the same set is reused), builds
the cache (:func:`mammoth_fast.data.load_or_build_cache`), then times
``--epochs`` epochs of reading every slide as float32 (N, D) tensors, in a
random order per epoch, from the h5 files (``FeatureFolder``) and from the cache
(``FeatureCache``). With eviction (the default) the files are dropped from the
page cache (fsync + posix_fadvise DONTNEED) before the first epoch of each, so
epoch 1 reads from disk ("cold") and later epochs from memory where the set
fits ("warm").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from mammoth_fast.data import FeatureCache, FeatureFolder, load_or_build_cache
from mammoth_fast.data.synthetic import write_trident_h5

ENCODER = "synthetic"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=300)
    p.add_argument("--min-patches", type=int, default=1000)
    p.add_argument("--max-patches", type=int, default=20000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--dir", type=Path, default=None, help="where the set and cache go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the set and cache afterwards")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--no-evict", action="store_true", help="do not drop the files from the page cache first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.slides < 1 or args.epochs < 1 or args.dim < 1 or not 1 <= args.min_patches <= args.max_patches:
        p.error("need --slides, --epochs, --dim >= 1 and 1 <= --min-patches <= --max-patches")
    return args


def write_set(root: Path, args) -> List[str]:
    """The synthetic set under ``root`` (reused if ``params.json`` matches); its slide ids."""
    params = {k: getattr(args, k) for k in ("slides", "min_patches", "max_patches", "dim", "dtype", "seed")}
    folder = root / f"features_{ENCODER}"
    slide_ids = [f"slide_{i:05d}" for i in range(args.slides)]
    marker = root / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return slide_ids
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    # a pool of random rows, sliced at random offsets: fast to make, distinct per slide
    pool = rng.standard_normal((2 * args.max_patches, args.dim), dtype=np.float32).astype(args.dtype)
    start = time.perf_counter()
    for slide in slide_ids:
        n = int(rng.integers(args.min_patches, args.max_patches + 1))
        at = int(rng.integers(0, len(pool) - n + 1))
        write_trident_h5(folder / f"{slide}.h5", pool[at:at + n], encoder=ENCODER)
    print(f"wrote {args.slides} slides in {time.perf_counter() - start:.1f} s", flush=True)
    marker.write_text(json.dumps(params))
    return slide_ids


def evict(paths: Sequence[Path]) -> None:
    """Drop the files' pages from the OS page cache (Linux; clean pages only, hence fsync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_epochs(store, slide_ids: List[str], epochs: int, seed: int) -> List[float]:
    """Seconds per epoch of reading every slide's float32 features from ``store``."""
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(epochs):
        order = rng.permutation(len(slide_ids))
        start = time.perf_counter()
        for i in order:
            store[slide_ids[i]]
        times.append(time.perf_counter() - start)
    return times


def run(args) -> Dict:
    root = args.dir if args.dir is not None else Path(tempfile.mkdtemp(prefix="data_read_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        slide_ids = write_set(root, args)
        folder = FeatureFolder(root / f"features_{ENCODER}", expected_dim=args.dim)
        start = time.perf_counter()
        cache: FeatureCache = load_or_build_cache(folder, slide_ids, root / "cache")
        build_s = time.perf_counter() - start
        h5_files = [folder.path(s) for s in slide_ids]
        rows = int(cache.offsets[-1])
        h5_bytes = sum(p.stat().st_size for p in h5_files)
        cache_bytes = (root / "cache" / "features.npy").stat().st_size
        evictable = hasattr(os, "posix_fadvise") and not args.no_evict
        if evictable:
            evict(h5_files)
        h5_times = time_epochs(folder, slide_ids, args.epochs, args.seed)
        if evictable:
            evict([root / "cache" / "features.npy"])
        cache_times = time_epochs(cache, slide_ids, args.epochs, args.seed)
        result = {
            "machine": {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                        "numpy": np.__version__, "torch": torch.__version__},
            "set": {"slides": args.slides, "patches": rows, "dim": args.dim, "dtype": args.dtype,
                    "h5_gb": h5_bytes / 1e9, "cache_gb": cache_bytes / 1e9, "evicted_first": evictable},
            "cache_build_s": build_s if cache.build_reason is not None else None,
            "h5_epoch_s": h5_times,
            "cache_epoch_s": cache_times,
        }
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    gb = rows * args.dim * 4 / 1e9  # float32 delivered per epoch
    built = f", cache built in {build_s:.1f} s" if result["cache_build_s"] is not None else ""
    print(f"{args.slides} slides, {rows} patches x {args.dim} {args.dtype}: h5 files {h5_bytes / 1e9:.2f} GB, "
          f"cache {cache_bytes / 1e9:.2f} GB{built}")
    for name, times in (("h5 files", h5_times), ("cache", cache_times)):
        cells = ", ".join(f"epoch {e + 1}: {t:.2f} s ({gb / t:.2f} GB/s fp32)" for e, t in enumerate(times))
        print(f"  {name:9s} {cells}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> Dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
