"""The memory-mapped features cache (mammoth_fast.data.cache), batches of bags
(mammoth_fast.data.batching) and the read benchmark's smoke run."""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mammoth_fast import packing
from mammoth_fast.data import (DataError, FeatureFolder, SlideDataset, build_cache,
                               class_balanced_sampler, collate_packed, collate_padded, load_or_build_cache,
                               read_labels, stale_reason)
from mammoth_fast.data.synthetic import make_synthetic_set, write_clam_h5, write_pt

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ lives at the repository root, not installed
    sys.path.insert(0, str(ROOT))

SIZES = [1, 3000, 2, 40, 7, 150, 1, 64, 9, 23]


@pytest.fixture(scope="module", params=[("trident", np.float16), ("clam", np.float32)], ids=["trident16", "clam32"])
def synthetic(request, tmp_path_factory):
    layout, dtype = request.param
    root = tmp_path_factory.mktemp(layout)
    syn = make_synthetic_set(root, layout, num_cases=5, dim=16, sizes=SIZES, dtype=dtype, seed=2)
    return syn, FeatureFolder(syn.features_dir, expected_dim=16), read_labels(syn.labels_csv), dtype


def test_cache_equals_direct_reads_bit_for_bit(synthetic, tmp_path):
    syn, folder, table, dtype = synthetic
    cache = load_or_build_cache(folder, table.slide_ids, tmp_path / "cache", progress=False)
    assert cache.build_reason.startswith("no cache in")
    assert cache.dtype == dtype and cache.width == 16  # stored as the sources are
    assert cache.features.dtype == dtype and isinstance(cache.features, np.memmap)
    lengths = [folder[s].shape[0] for s in table.slide_ids]
    assert cache.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    for slide in table.slide_ids:
        direct, cached = folder[slide], cache[slide]
        assert cached.dtype == torch.float32 and torch.equal(cached, direct)
    # a plain .npy: readable without this package
    assert np.load(tmp_path / "cache" / "features.npy", mmap_mode="r").shape == (sum(lengths), 16)
    # reused as it is while fresh
    mtime = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    again = load_or_build_cache(folder, table.slide_ids, tmp_path / "cache", progress=False)
    assert again.build_reason is None and (tmp_path / "cache" / "features.npy").stat().st_mtime_ns == mtime
    # DataLoader workers reopen the map rather than receive its contents
    assert len(pickle.dumps(cache)) < 20_000 and torch.equal(pickle.loads(pickle.dumps(cache))[slide], direct)


def test_stale_cache_is_detected_and_rebuilt(tmp_path):
    syn = make_synthetic_set(tmp_path / "set", "clam", num_cases=3, dim=8, patches=(1, 20), seed=1)
    folder, slides = FeatureFolder(syn.features_dir), list(syn.slide_ids)
    cache_dir = tmp_path / "cache"
    build_cache(folder, slides, cache_dir, progress=False)
    assert stale_reason(cache_dir, folder, slides) is None
    assert stale_reason(cache_dir, folder, slides[:-1]) == "the cache holds other slides"
    assert stale_reason(cache_dir, FeatureFolder(syn.features_dir, expected_dim=9), slides) == \
        "the cache holds width 8, expected 9"
    # a source rewritten with new values
    new = np.full((5, 8), 0.5, np.float32)
    path = write_clam_h5(folder.path(slides[0]), new)
    assert stale_reason(cache_dir, folder, slides) == f"{path} changed since the cache was built"
    rebuilt = load_or_build_cache(folder, slides, cache_dir, progress=False)
    assert rebuilt.build_reason.endswith("changed since the cache was built")
    assert torch.equal(rebuilt[slides[0]], torch.from_numpy(new))
    # only touched: the mtime alone counts
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert "changed" in stale_reason(cache_dir, folder, slides)
    load_or_build_cache(folder, slides, cache_dir, progress=False)
    # a slide now read from another file (its .h5 gone, a .pt left)
    write_pt(folder.layout.root / "pt_files" / f"{slides[1]}.pt", new)
    folder.path(slides[1]).unlink()
    assert stale_reason(cache_dir, folder, slides).startswith(f"slide {slides[1]!r} is now read from")
    # an interrupted build leaves no manifest
    (cache_dir / "manifest.json").unlink()
    assert stale_reason(cache_dir, folder, slides) == f"no cache in {cache_dir}"


def test_bad_source_fails_the_build_naming_the_slide(tmp_path):
    syn = make_synthetic_set(tmp_path / "set", "trident", num_cases=3, dim=8, patches=(2, 20), seed=1)
    folder = FeatureFolder(syn.features_dir)
    bad = syn.slide_ids[-1]
    feats = np.ones((4, 8), np.float16)
    feats[3, 1] = np.nan
    write_clam_h5(folder.path(bad), feats)
    with pytest.raises(DataError, match=rf"slide '{bad}' \(.*{bad}.h5\): 1 of 4 patches hold NaN or Inf"):
        build_cache(folder, syn.slide_ids, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache").glob("*.tmp*"))
    write_clam_h5(folder.path(bad), np.ones((4, 5), np.float16))
    with pytest.raises(DataError, match=rf"slide '{bad}' .*feature width 5, but slide '{syn.slide_ids[0]}' has 8"):
        build_cache(folder, syn.slide_ids, tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match=r"slide 'ghost': no features file"):
        build_cache(folder, ["ghost"], tmp_path / "cache", progress=False)


def test_mixed_dtypes_cached_as_float32(tmp_path):
    a, b = np.arange(6, dtype=np.float16).reshape(3, 2), np.arange(4, dtype=np.float64).reshape(2, 2) / 3
    write_clam_h5(tmp_path / "h5_files" / "a.h5", a)
    write_clam_h5(tmp_path / "h5_files" / "b.h5", b)
    folder = FeatureFolder(tmp_path)
    cache = build_cache(folder, ["a", "b"], tmp_path / "cache", progress=False)
    assert cache.dtype == np.float32
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["dtype"] == "float32"
    for slide in "ab":
        assert torch.equal(cache[slide], folder[slide])


def test_padded_and_packed_batches_hold_exactly_the_bags(synthetic, tmp_path):
    syn, folder, table, _ = synthetic
    data = SlideDataset(table, folder)
    items = [data[i] for i in range(len(data))]
    padded = collate_padded(items)
    packed = collate_packed(items)
    lengths = [item.features.shape[0] for item in items]
    assert padded.features.shape == (len(items), max(lengths), 16) and padded.mask.dtype == torch.bool
    assert packed.features.shape == (sum(lengths), 16) and packed.max_seqlen == max(lengths)
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    for b, item in enumerate(items):
        n = lengths[b]
        assert torch.equal(padded.features[b, :n], item.features) and not padded.features[b, n:].any()
        assert padded.mask[b, :n].all() and not padded.mask[b, n:].any()
        assert torch.equal(packed.features[packed.cu_seqlens[b]:packed.cu_seqlens[b + 1]], item.features)
    labels = torch.tensor([item.label for item in items])
    assert torch.equal(padded.labels, labels) and torch.equal(packed.labels, labels)
    assert padded.slide_ids == packed.slide_ids == table.slide_ids
    # the packed batch is the padded one under packing.py's convention
    layout = packing.packed_layout("test", packed.features, None, packed.cu_seqlens, packed.max_seqlen)
    feats, mask = packing.pad_packed(packed.features, layout)
    assert torch.equal(feats, padded.features) and torch.equal(mask, padded.mask)
    # through a DataLoader over the cache, moved with .to()
    cache = build_cache(folder, table.slide_ids, tmp_path / "cache", progress=False)
    loader = DataLoader(SlideDataset(table, cache), batch_size=4, collate_fn=collate_packed)
    batches = [batch.to("cpu") for batch in loader]
    assert torch.equal(torch.cat([b.features for b in batches]), packed.features)


def test_class_balanced_sampler():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = class_balanced_sampler(labels, num_samples=20000, generator=torch.Generator().manual_seed(0))
    drawn = labels[list(sampler)]
    assert abs(drawn.mean() - 0.5) < 0.02  # each class drawn about as often
    again = class_balanced_sampler(labels, num_samples=20000, generator=torch.Generator().manual_seed(0))
    assert list(again) == list(class_balanced_sampler(labels, 20000, torch.Generator().manual_seed(0)))
    assert len(class_balanced_sampler(labels)) == 100


def test_read_benchmark_smoke(tmp_path):
    from benchmarks import data_read

    out = tmp_path / "result.json"
    result = data_read.main(["--slides", "4", "--min-patches", "1", "--max-patches", "50", "--dim", "8",
                             "--epochs", "1", "--dir", str(tmp_path / "set"), "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["set"]["slides"] == 4 and len(result["h5_epoch_s"]) == len(result["cache_epoch_s"]) == 1
    assert (tmp_path / "set" / "cache" / "manifest.json").exists()
