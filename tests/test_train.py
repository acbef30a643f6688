"""mammoth_fast.train and `mammoth-fast train` / `eval`: k-fold training on the
synthetic TRIDENT and CLAM sets of mammoth_fast.data.synthetic (a planted signal
that a few epochs learn), its outputs checked against scikit-learn, split reuse,
checkpoints, the eval command, and the loop's parts (batches per process,
accumulation, early stopping, class-balanced draws, backend choice)."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score)

from mammoth_fast.checkpoints import read_state_dict
from mammoth_fast.cli import main
from mammoth_fast.data import DataError, FeatureFolder, LabelTable, SlideDataset, make_splits, read_labels, read_splits, write_splits
from mammoth_fast.data.synthetic import make_synthetic_set
from mammoth_fast.mil import create_model
from mammoth_fast.train import (CPU, METRICS, Runtime, TrainError, TrainSettings, backend_for, build_model,
                                compute_metrics, epoch_order, fit, model_overrides, predict, rank_batches)

TINY = {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}  # abmil.base, small and deterministic
TRAIN = ["--epochs", "8", "--lr", "5e-3", "--batch-size", "2", "--overrides", json.dumps(TINY)]


pytestmark = pytest.mark.usefixtures("one_thread")


def read_predictions(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def sklearn_metrics(rows, classes):
    """results.json's test metrics recomputed from a predictions.csv with scikit-learn."""
    y = np.array([classes.index(r["label"]) for r in rows])
    p = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    pred = p.argmax(1)
    auroc = (roc_auc_score(y, p[:, 1]) if len(classes) == 2
             else roc_auc_score(y, p, multi_class="ovr", average="macro"))
    return {"auroc": auroc, "balanced_accuracy": balanced_accuracy_score(y, pred), "accuracy": accuracy_score(y, pred),
            "kappa": cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(len(classes)))),
            "f1_macro": f1_score(y, pred, average="macro")}


@pytest.fixture(scope="module")
def trident_run(tmp_path_factory):
    """One 3-fold run on a TRIDENT set: fp16 h5 files (one-row chunks), 14 cases of
    1-3 slides, bags of 1 to 400 patches, string labels; read through a cache."""
    torch.set_num_threads(1)  # (module scope: before one_thread)
    root = tmp_path_factory.mktemp("trident")
    data = make_synthetic_set(root / "data", layout="trident", num_cases=14, dim=16, sizes=[1, 7, 60, 400, 150],
                              dtype=np.float16, signal=2.0, seed=3)
    out = root / "out"
    rc = main(["train", "--features", str(root / "data"), "--labels", str(data.labels_csv), "--model", "abmil.base",
               "--out", str(out), "--folds", "3", "--cache", str(root / "cache"), "--heatmaps", "--heatmap-size", "96",
               *TRAIN])
    assert rc == 0
    return data, out


def test_train_writes_heatmaps_of_each_folds_test_slides(trident_run):
    data, out = trident_run
    table = read_labels(data.labels_csv)
    for k, split in enumerate(read_splits(out / "splits", table)):
        summary = json.loads((out / f"fold_{k}" / "heatmaps" / "heatmaps.json").read_text())
        assert summary["errors"] == [] and sorted(s["slide_id"] for s in summary["slides"]) == sorted(split.test)
        for slide in split.test:
            with open(out / f"fold_{k}" / "heatmaps" / slide / "scores.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
            n = FeatureFolder(data.features_dir).shape(slide)[0][0]
            assert len(rows) == n and list(rows[0]) == ["x", "y", "attention"]  # ABMIL: attention, no experts
            assert sum(float(r["attention"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
            assert (out / f"fold_{k}" / "heatmaps" / slide / "attention.png").is_file()


def test_trident_run_learns_and_writes_every_output(trident_run):
    data, out = trident_run
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["classes", "folds", "mean", "std"]
    assert results["classes"] == ["benign", "tumor"]
    assert [f["fold"] for f in results["folds"]] == [0, 1, 2]
    for f in results["folds"]:
        assert list(f) == ["fold", "val", "test"]
        assert list(f["test"]) == list(METRICS) and list(f["val"]) == [*METRICS, "loss"]
    assert list(results["mean"]) == list(METRICS) == list(results["std"])
    assert results["mean"]["auroc"] >= 0.9, results  # the planted signal is learnt
    for key in METRICS:
        vals = [f["test"][key] for f in results["folds"]]
        assert results["mean"][key] == pytest.approx(np.mean(vals)) and results["std"][key] == pytest.approx(np.std(vals))
    md = (out / "results.md").read_text()
    assert all(f"| {key} | {results['mean'][key]:.3f} ± {results['std'][key]:.3f} |" in md for key in METRICS)
    table = read_labels(data.labels_csv)
    splits = read_splits(out / "splits", table)
    assert splits == make_splits(table, folds=3, seed=0)
    for k, split in enumerate(splits):
        assert (out / "splits" / f"splits_{k}_bool.csv").is_file() and (out / "splits" / f"splits_{k}_descriptor.csv").is_file()
        rows = read_predictions(out / f"fold_{k}" / "predictions.csv")
        assert [r["slide_id"] for r in rows] == list(split.test)
        assert [r["label"] for r in rows] == [table.classes[table.labels[table.index[s]]] for s in split.test]
        expected = sklearn_metrics(rows, results["classes"])
        for key in METRICS:
            assert results["folds"][k]["test"][key] == pytest.approx(expected[key], abs=1e-6), (k, key)
    run = json.loads((out / "run.json").read_text())
    assert [f["best_epoch"] for f in run["folds"]] == [int(np.argmin([h["val_loss"] for h in f["history"]]))
                                                       for f in run["folds"]]


def test_checkpoint_reloads_through_create_model(trident_run):
    data, out = trident_run
    path = out / "fold_1" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model_name"] == "abmil.base" and ckpt["classes"] == ["benign", "tumor"] and ckpt["in_dim"] == 16
    assert ckpt["overrides"] == {**TINY, "in_dim": 16}
    assert set(read_state_dict(str(path))) == set(ckpt["state_dict"])  # the layout checkpoints.read_state_dict reads
    net = create_model(ckpt["model_name"], ckpt["num_classes"], checkpoint_path=str(path), **ckpt["overrides"]).eval()
    rows = read_predictions(out / "fold_1" / "predictions.csv")
    folder = FeatureFolder(data.features_dir)
    with torch.no_grad():
        probs = np.concatenate([net(folder[r["slide_id"]])["logits"].softmax(-1).numpy() for r in rows])
    assert np.allclose(probs, [[float(r["prob_benign"]), float(r["prob_tumor"])] for r in rows], atol=1e-6)


def test_eval_command(trident_run, tmp_path):
    data, out = trident_run
    rc = main(["eval", "--checkpoint", str(out / "fold_0" / "checkpoint.pt"), "--features", str(data.features_dir),
               "--labels", str(data.labels_csv), "--out", str(tmp_path / "ev"), "--batch-size", "3"])
    assert rc == 0
    rows = read_predictions(tmp_path / "ev" / "predictions.csv")
    assert [r["slide_id"] for r in rows] == data.slide_ids
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["slides"] == len(rows) and metrics["classes"] == ["benign", "tumor"]
    expected = sklearn_metrics(rows, metrics["classes"])
    for key in METRICS:
        assert metrics["metrics"][key] == pytest.approx(expected[key], abs=1e-6)
    fold = {r["slide_id"]: r for r in read_predictions(out / "fold_0" / "predictions.csv")}
    for r in rows:  # the fold's test slides get the probabilities the training run wrote
        if r["slide_id"] in fold:
            assert float(r["prob_tumor"]) == pytest.approx(float(fold[r["slide_id"]]["prob_tumor"]), abs=1e-6)


def test_clam_fp32_three_classes_and_split_reuse(tmp_path):
    """CLAM layout (fp32 h5 and pt, bags up to 5,000 patches), three string classes
    (AUROC macro one-vs-rest), published splits reused: the folds are the
    files' (here made with another seed and val_frac 0), and a second run from
    OUT/splits gives the same results."""
    data = make_synthetic_set(tmp_path / "data", layout="clam", num_cases=12, slides_per_case=(1, 2),
                              classes=("grade_1", "grade_2", "grade_3"), dim=16, sizes=[5000, 3, 90, 1, 200],
                              dtype=np.float32, formats=("h5", "pt"), signal=2.0, seed=5)
    table = read_labels(data.labels_csv)
    write_splits(make_splits(table, folds=2, val_frac=0.0, seed=11), tmp_path / "published", table)
    args = ["train", "--features", str(tmp_path / "data"), "--labels", str(data.labels_csv), "--model", "abmil.base",
            "--epochs", "2", "--lr", "5e-3", "--batch-size", "2", "--overrides", json.dumps(TINY)]
    assert main([*args, "--out", str(tmp_path / "a"), "--splits", str(tmp_path / "published")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["classes"] == ["grade_1", "grade_2", "grade_3"] and len(results["folds"]) == 2
    for k, split in enumerate(read_splits(tmp_path / "published", table)):
        rows = read_predictions(tmp_path / "a" / f"fold_{k}" / "predictions.csv")
        assert [r["slide_id"] for r in rows] == list(split.test)
        assert results["folds"][k]["val"] == {}  # no val part: the last epoch is kept
        expected = sklearn_metrics(rows, results["classes"])
        assert results["folds"][k]["test"]["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
        assert results["folds"][k]["test"]["kappa"] == pytest.approx(expected["kappa"], abs=1e-6)
    assert read_splits(tmp_path / "a" / "splits", table) == read_splits(tmp_path / "published", table)
    assert main([*args, "--out", str(tmp_path / "b"), "--splits", str(tmp_path / "a" / "splits")]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == results


def _dict_set(n=12, dim=8, seed=0, flip=False):
    """A SlideDataset over a dict store: class-1 bags shifted (flip: labels swapped)."""
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % 2
    ids = [f"s{seed}_{i}" for i in range(n)]
    store = {s: torch.randn(3 + i % 4, dim, generator=g) + (1.5 * labels[i]) for i, s in enumerate(ids)}
    table = LabelTable(ids, ids, (1 - labels if flip else labels).astype(np.int64), ["a", "b"])
    return SlideDataset(table, store)


SMALL = TrainSettings(model="meanmil.base", overrides={"in_dim": 8, "embed_dim": 8, "dropout": 0.0}, epochs=2, lr=1e-2)


def test_accumulation_equals_a_larger_batch():
    train = _dict_set()
    a = fit(TrainSettings(**{**SMALL.__dict__, "batch_size": 2}), 2, train, None, seed=1)
    b = fit(TrainSettings(**{**SMALL.__dict__, "batch_size": 1, "accumulate": 2}), 2, train, None, seed=1)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_early_stopping_keeps_the_best_val_state():
    train, val = _dict_set(), _dict_set(seed=1, flip=True)  # learning the train set raises the val loss
    settings = TrainSettings(**{**SMALL.__dict__, "epochs": 10, "patience": 2})
    fitted = fit(settings, 2, train, val, seed=0)
    losses = [h["val_loss"] for h in fitted.history]
    assert len(losses) < 10 and fitted.best_epoch == int(np.argmin(losses))
    assert len(losses) == fitted.best_epoch + 3  # stopped after 2 epochs without a lower val loss
    assert predict(fitted.model, val).loss == pytest.approx(losses[fitted.best_epoch], abs=1e-6)


def test_rank_batches_share_global_batches():
    order = np.array([5, 2, 7, 0, 9, 4, 1])
    single = rank_batches(order, 4, CPU)
    assert single == [[5, 2, 7, 0], [9, 4, 1]]
    ranks = [rank_batches(order, 2, Runtime(torch.device("cpu"), r, 2)) for r in range(2)]
    assert ranks == [[[5, 7], [9, 1]], [[2, 0], [4, 5]]]  # padded with the order's start to a multiple of 2
    assert sorted(ranks[0][0] + ranks[1][0]) == sorted(single[0])  # global batch k = one process's batch k


def test_class_balanced_epoch_order():
    labels = np.array([0] * 90 + [1] * 10)
    draw = lambda: epoch_order(100, labels, True, np.random.default_rng(0), torch.Generator().manual_seed(3))  # noqa: E731
    order = draw()
    assert order.shape == (100,) and 30 < (labels[order] == 1).sum() < 70
    assert np.array_equal(order, draw())
    plain = epoch_order(100, labels, False, np.random.default_rng(0), torch.Generator())
    assert np.array_equal(np.sort(plain), np.arange(100))


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for classes in (2, 3):
        y = np.arange(30) % classes
        p = torch.randn(30, classes).softmax(-1).numpy()
        got = compute_metrics(y, p)
        auroc = roc_auc_score(y, p[:, 1]) if classes == 2 else roc_auc_score(y, p, multi_class="ovr")
        assert got["auroc"] == pytest.approx(auroc)
        assert got["kappa"] == pytest.approx(cohen_kappa_score(y, p.argmax(1), weights="quadratic"))
    one = compute_metrics(np.zeros(4, dtype=int), rng.dirichlet([1, 1], 4))
    assert np.isnan(one["auroc"]) and one["accuracy"] >= 0


def test_model_names_backend_and_width():
    assert model_overrides("abmil.base", 16, {"embed_dim": 8}) == {"embed_dim": 8, "in_dim": 16}
    assert model_overrides("abmil.base.conch_v1", 512) == {}
    with pytest.raises(DataError, match="768 wide but model 'abmil.base.uni' takes 1024"):
        model_overrides("abmil.base.uni", 768)
    with pytest.raises(TrainError, match="in_dim cannot be overridden"):
        model_overrides("abmil.base", 16, {"in_dim": 16})
    with pytest.raises(TrainError, match="unknown model name"):
        model_overrides("nomodel.base", 16)
    assert backend_for("auto", torch.device("cuda", 0)) == "triton" and backend_for("auto", CPU.device) == "sdpa"
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(TrainError, match="the triton backend needs a CUDA device"):
            backend_for("triton", CPU.device)
    moe = {"num_experts": 2, "num_slots": 2, "num_heads": 2, "slot_dim": 8}
    net = build_model("abmil.base_mammoth", 2, {"in_dim": 16, "embed_dim": 16, "attn_dim": 8, "moe_args": moe})
    assert net.patch_embed.backend == "sdpa"
    assert build_model("abmil.base_mammoth", 2, {"in_dim": 16, "embed_dim": 16, "attn_dim": 8, "moe_args": moe},
                       backend="eager").patch_embed.backend == "eager"
    with pytest.raises(TrainError, match="unknown override"):
        build_model("abmil.base", 2, {"in_dim": 16, "nonsense": 1})
