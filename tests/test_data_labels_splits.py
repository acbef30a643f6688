"""Label tables (mammoth_fast.data.labels), k-fold splits by case in CLAM's file
format (mammoth_fast.data.splits) and the slide dataset's checks."""
import json

import numpy as np
import pytest

from mammoth_fast.data import (DataError, FeatureFolder, LabelTable, SlideDataset, Split, load_classes, make_splits,
                               read_labels, read_splits, write_splits)
from mammoth_fast.data.synthetic import write_trident_h5


def _csv(path, text):
    path.write_text(text)
    return path


def _table(num_cases=60, classes=("LUAD", "LUSC", "normal"), seed=0):
    """``num_cases`` cases of 1-3 slides; classes of unequal sizes (about 3:2:1)."""
    rng = np.random.default_rng(seed)
    slides, cases, labels = [], [], []
    weights = np.arange(len(classes), 0, -1, dtype=float)
    for c in range(num_cases):
        label = int(rng.choice(len(classes), p=weights / weights.sum()))
        for s in range(int(rng.integers(1, 4))):
            slides.append(f"TCGA-{c:03d}-{s}")
            cases.append(f"TCGA-{c:03d}")
            labels.append(label)
    return LabelTable(slides, cases, np.asarray(labels, dtype=np.int64), list(classes), "table.csv")


def test_read_labels_maps_sorted_strings_and_saves_the_mapping(tmp_path):
    path = _csv(tmp_path / "labels.csv", "case_id,slide_id,subtype,grade\n"
                "p1,s1,LUSC,3\np1,s2,LUSC,3\np2,s3,LUAD,10\np3,s4,normal,2\n")
    table = read_labels(path, label_col="subtype")
    assert table.slide_ids == ["s1", "s2", "s3", "s4"] and table.case_ids == ["p1", "p1", "p2", "p3"]
    assert table.classes == ["LUAD", "LUSC", "normal"] and table.labels.tolist() == [1, 1, 0, 2]
    table.save_classes(tmp_path / "classes.json")
    assert json.loads((tmp_path / "classes.json").read_text())["class_to_index"] == {"LUAD": 0, "LUSC": 1, "normal": 2}
    assert load_classes(tmp_path / "classes.json") == ["LUAD", "LUSC", "normal"]
    assert read_labels(path, label_col="grade").classes == ["2", "3", "10"]  # numbers sort as numbers
    # a saved mapping imposed on another table (e.g. a test set with fewer classes)
    other = _csv(tmp_path / "other.csv", "case_id,slide_id,subtype\nq,t1,normal\n")
    assert read_labels(other, "subtype", classes=table.classes).labels.tolist() == [2]
    bad = _csv(tmp_path / "bad.csv", "case_id,slide_id,subtype\nq,t1,SCLC\n")
    with pytest.raises(DataError, match=r"bad.csv: slide 't1' has label 'SCLC', not one of the classes"):
        read_labels(bad, "subtype", classes=table.classes)
    # other column names
    named = _csv(tmp_path / "named.csv", "patient,slide,y\np,s,1\n")
    assert read_labels(named, label_col="y", slide_col="slide", case_col="patient").slide_ids == ["s"]


@pytest.mark.parametrize("text, kwargs, message", [
    ("case_id,slide_id,label\np,s,a\n", {"label_col": "subtype"},
     r"bad.csv: no label column 'subtype' \(columns: case_id, slide_id, label; choose another with label_col=\)"),
    ("case_id,label\np,a\n", {}, r"bad.csv: no slide id column 'slide_id'"),
    ("slide_id,label\ns,a\n", {}, r"bad.csv: no case id column 'case_id'"),
    ("case_id,slide_id,label\np,s,a\nq,s,b\n", {}, r"bad.csv, line 3: slide 's' appears twice \(first on line 2\)"),
    ("case_id,slide_id,label\np,s,\n", {}, r"bad.csv, line 2: empty 'label' \(slide 's'\)"),
    ("case_id,slide_id,label\n", {}, r"bad.csv: no rows"),
])
def test_bad_label_tables(tmp_path, text, kwargs, message):
    with pytest.raises(DataError, match=message):
        read_labels(_csv(tmp_path / "bad.csv", text), **kwargs)


def test_missing_label_table(tmp_path):
    with pytest.raises(DataError, match="nothing.csv: no such label table"):
        read_labels(tmp_path / "nothing.csv")


def _case_parts(split, table):
    case_of = dict(zip(table.slide_ids, table.case_ids))
    return [{case_of[s] for s in part} for part in split]


def test_splits_by_case_stratified_and_seeded():
    table = _table(num_cases=45)
    folds = make_splits(table, folds=5, val_frac=0.15, seed=3)
    assert folds == make_splits(table, folds=5, val_frac=0.15, seed=3)
    assert folds != make_splits(table, folds=5, val_frac=0.15, seed=4)
    overall = np.bincount(table.labels) / len(table)
    tests = []
    for split in folds:
        train, val, test = _case_parts(split, table)
        assert not (train & val) and not (train & test) and not (val & test)  # no case in two parts
        assert sorted(split.train + split.val + split.test) == sorted(table.slide_ids)
        index = table.index
        for part, share in ((split.test, 0.2), (split.val, 0.15)):
            assert abs(len(part) / len(table) - share) < 0.07
            freq = np.bincount(table.labels[[index[s] for s in part]], minlength=3) / len(part)
            assert np.abs(freq - overall).max() < 0.15  # stratified, approximately
        tests += split.test
    assert sorted(tests) == sorted(table.slide_ids)  # the test parts cover every slide once
    assert all(not s.val for s in make_splits(table, folds=3, val_frac=0.0))


def test_split_arguments_checked():
    table = _table(num_cases=4)
    with pytest.raises(DataError, match="4 cases cannot make 5 folds"):
        make_splits(table, folds=5)
    with pytest.raises(DataError, match="folds must be an int >= 2"):
        make_splits(table, folds=1)
    with pytest.raises(DataError, match=r"val_frac must be in \[0, 0.5\)"):
        make_splits(table, folds=2, val_frac=0.6)


def test_splits_round_trip_through_clam_files(tmp_path):
    table = _table(num_cases=20)
    folds = make_splits(table, folds=4, seed=0)
    paths = write_splits(folds, tmp_path / "splits", table)
    assert [p.name for p in paths] == [f"splits_{k}.csv" for k in range(4)]
    assert read_splits(tmp_path / "splits", table) == folds
    split = folds[0]
    lines = (tmp_path / "splits" / "splits_0.csv").read_text().splitlines()
    assert lines[0] == ",train,val,test" and len(lines) == 1 + len(split.train)
    assert lines[1] == f"0,{split.train[0]},{split.val[0]},{split.test[0]}"
    assert lines[-1] == f"{len(split.train) - 1},{split.train[-1]},,"  # shorter columns padded empty
    bools = (tmp_path / "splits" / "splits_0_bool.csv").read_text().splitlines()
    assert bools[0] == ",train,val,test" and len(bools) == 1 + len(table)
    assert bools[1] == f"{split.train[0]},True,False,False" and bools[-1] == f"{split.test[-1]},False,False,True"
    rows = [r.split(",") for r in (tmp_path / "splits" / "splits_0_descriptor.csv").read_text().splitlines()]
    assert rows[0] == ["", "train", "val", "test"] and [r[0] for r in rows[1:]] == table.classes
    index = table.index
    for p, part in enumerate(split):
        counts = np.bincount(table.labels[[index[s] for s in part]], minlength=3)
        assert [int(r[1 + p]) for r in rows[1:]] == counts.tolist()


def test_reads_clam_published_splits(tmp_path):
    # the shape of CLAM's splits/task_*/splits_k.csv: unnamed index, empty cells past a column's end
    table = LabelTable([f"slide_{i}" for i in range(6)], [f"p{i}" for i in range(6)],
                       np.array([0, 1, 0, 1, 0, 1]), ["a", "b"], "labels.csv")
    (tmp_path / "task").mkdir()
    _csv(tmp_path / "task" / "splits_0.csv", ",train,val,test\n0,slide_0,slide_4,slide_5\n1,slide_1,,\n"
         "2,slide_2,,\n")
    assert read_splits(tmp_path / "task", table) == [Split(("slide_0", "slide_1", "slide_2"), ("slide_4",),
                                                           ("slide_5",))]  # slide_3 unused: allowed


@pytest.mark.parametrize("text, message", [
    (",train,val,test\n0,slide_0,slide_9,slide_1\n",
     r"splits_0.csv: slide 'slide_9' \(val\) is not in the label table"),
    (",train,val,test\n0,slide_0,slide_0,slide_1\n",
     r"splits_0.csv: slide 'slide_0' is listed twice \(train and val\)"),
    (",train,val,test\n0,slide_0,slide_1,slide_2\n",
     r"splits_0.csv: case 'p0' is split across parts: slide 'slide_0' in train, slide 'slide_1' in val"),
    (",train,test\n0,slide_0,slide_2\n", r"splits_0.csv: no val column"),
    (",train,val,test\n0,,slide_2,\n", r"splits_0.csv: the train part is empty"),
])
def test_bad_split_files(tmp_path, text, message):
    table = LabelTable(["slide_0", "slide_1", "slide_2"], ["p0", "p0", "p1"], np.array([0, 0, 1]), ["a", "b"],
                       "labels.csv")
    _csv(tmp_path / "splits_0.csv", text)
    with pytest.raises(DataError, match=message):
        read_splits(tmp_path, table)


def test_split_folder_errors(tmp_path):
    table = _table(num_cases=8)
    with pytest.raises(DataError, match="no splits_{k}.csv files"):
        read_splits(tmp_path, table)
    write_splits(make_splits(table, folds=3), tmp_path, table)
    (tmp_path / "splits_1.csv").unlink()
    with pytest.raises(DataError, match=r"splits_1.csv is missing \(found splits_0.csv, splits_2.csv\)"):
        read_splits(tmp_path, table)
    with pytest.raises(DataError, match="nowhere: no such splits folder"):
        read_splits(tmp_path / "nowhere", table)


def test_dataset_requires_every_slide_to_have_features(tmp_path):
    write_trident_h5(tmp_path / "features_uni" / "s1.h5", np.ones((3, 4), np.float16))
    labels = _csv(tmp_path / "labels.csv", "case_id,slide_id,label\np1,s1,a\np1,s2,b\np2,s3,a\n")
    table = read_labels(labels)
    folder = FeatureFolder(tmp_path)
    with pytest.raises(DataError, match=r"slide 's2' of .*labels.csv has no features file \(looked for "
                                        r".*features_uni/s2.h5, .*features_uni/s2.pt\); 2 of 3 slides have none"):
        SlideDataset(table, folder)
    with pytest.raises(DataError, match=r"slide 'x' is not in the label table .*labels.csv"):
        SlideDataset(table, folder, ["s1", "x"])
    ds = SlideDataset(table, folder, ["s1"])
    item = ds[0]
    assert item.slide_id == "s1" and item.label == 0 and item.features.shape == (3, 4)
    assert ds.class_counts().tolist() == [1, 0]
