"""Slide features in: the data layer for training MIL models on the patch
features that TRIDENT or CLAM extracted (formats: shared/FORMATS.md).

One file per step of the path from a features folder and a label CSV to batches:

- ``features.py``  read one slide's bag (.h5 / .pt, TRIDENT or CLAM layout): FeatureFolder
- ``labels.py``    the label table (slide_id, case_id, label) and its class mapping
- ``splits.py``    k-fold train / val / test splits by case, CLAM's splits_{k}.csv files
- ``dataset.py``   SlideDataset: (features, label, slide_id) items from any features store
- ``cache.py``     all bags in one memory-mapped file with offsets, rebuilt when stale
- ``batching.py``  padded + mask or packed + cu_seqlens batches; class-balanced sampler
- ``errors.py``    DataError, raised for every bad input, naming the file or slide
- ``synthetic.py`` synthetic TRIDENT / CLAM folders with a planted signal (tests, benchmark)

Typical use::

    folder = FeatureFolder("trident_out/20x_256px_0px_overlap", expected_dim=1024)
    table = read_labels("labels.csv", label_col="subtype")
    splits = make_splits(table, folds=5, seed=0)
    write_splits(splits, "out/splits", table)
    store = load_or_build_cache(folder, table.slide_ids, "out/cache")
    train = SlideDataset(table, store, splits[0].train)
    loader = DataLoader(train, batch_size=4, collate_fn=collate_packed,
                        sampler=class_balanced_sampler(train.labels))
"""
from .batching import PackedBatch, PaddedBatch, class_balanced_sampler, collate_packed, collate_padded
from .cache import FeatureCache, build_cache, load_or_build_cache, stale_reason
from .dataset import SlideDataset, SlideItem
from .errors import DataError
from .features import (Bag, FeatureFolder, FeatureLayout, check_features, detect_layout, features_shape, read_bag,
                       read_features, read_features_array)
from .labels import LabelTable, load_classes, read_labels, sorted_classes
from .splits import Split, check_split, make_splits, read_splits, write_splits

__all__ = [
    "Bag", "DataError", "FeatureCache", "FeatureFolder", "FeatureLayout", "LabelTable", "PackedBatch", "PaddedBatch",
    "SlideDataset", "SlideItem", "Split", "build_cache", "check_features", "check_split", "class_balanced_sampler",
    "collate_packed", "collate_padded", "detect_layout", "features_shape", "load_classes", "load_or_build_cache",
    "make_splits", "read_bag", "read_features", "read_features_array", "read_labels", "read_splits",
    "sorted_classes", "stale_reason", "write_splits",
]
