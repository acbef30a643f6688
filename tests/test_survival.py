"""Survival: the losses against float64 formulas and lifelines' Cox fit, the
metrics against lifelines (Harrell's c-index, a Kaplan-Meier IPCW Brier score),
the survival table's checks, the Cox epoch order, and `mammoth-fast train
--task survival` / `eval` on a synthetic set with a planted risk."""
import csv
import json

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index

from mammoth_fast.cli import main
from mammoth_fast.data import DataError, SlideDataset, read_splits
from mammoth_fast.data.survival import quantile_edges, read_survival_labels, time_bins
from mammoth_fast.data.synthetic import make_synthetic_survival_set
from mammoth_fast.survival import (cox_loss, harrell_c, median_split_logrank, nll_loss, risk_scores,
                                   survival_metrics)
from mammoth_fast.tasks import Survival

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = json.dumps({"embed_dim": 16, "attn_dim": 8, "dropout": 0.0})


def test_harrell_c_matches_lifelines():
    rng = np.random.default_rng(0)
    for n in (7, 60, 300):
        times = rng.exponential(10.0, n)
        events = rng.random(n) < 0.6
        risk = np.round(rng.standard_normal(n) - 0.1 * times, 1)  # rounded: tied risks count 1/2
        ours = harrell_c(times, events, risk)
        assert ours == pytest.approx(concordance_index(times, -risk, events), abs=1e-12)
    assert harrell_c(np.array([1.0, 2.0]), np.array([0, 0]), np.array([0.1, 0.2])) is None  # no event


def test_nll_loss_matches_a_float64_formula():
    rng = np.random.default_rng(1)
    b, k = 37, 5
    logits = torch.from_numpy(rng.standard_normal((b, k)) * 3)
    bins = torch.from_numpy(rng.integers(0, k, b))
    events = torch.from_numpy(rng.integers(0, 2, b))
    for alpha in (0.0, 0.3):
        h = 1 / (1 + np.exp(-logits.numpy()))  # (B, K) hazards
        total = 0.0
        for i in range(b):
            y, e = int(bins[i]), int(events[i])
            s_before = np.prod(1 - h[i, :y])  # survived the bins before y
            unc = -np.log(s_before) - np.log(h[i, y]) if e else 0.0
            cen = 0.0 if e else -np.log(np.prod(1 - h[i, :y + 1]))
            total += (1 - alpha) * (unc + cen) + alpha * unc
        assert float(nll_loss(logits, bins, events, alpha)) == pytest.approx(total / b, rel=1e-6)
    risk = risk_scores(logits, "nll").numpy()
    assert risk == pytest.approx(-np.cumprod(1 - h, axis=1).sum(1), rel=1e-6)


def test_cox_loss_matches_breslow_formula_with_ties():
    rng = np.random.default_rng(2)
    n = 41
    times = torch.from_numpy(rng.integers(1, 12, n).astype(np.float64))  # many tied times
    events = torch.from_numpy((rng.random(n) < 0.5).astype(np.int64))
    risk = torch.from_numpy(rng.standard_normal(n))
    t, e, r = times.numpy(), events.numpy(), risk.numpy()
    want = -sum(r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in range(n) if e[i]) / e.sum()
    assert float(cox_loss(risk, times, events)) == pytest.approx(want, rel=1e-6)
    assert float(cox_loss(risk, times, torch.zeros(n, dtype=torch.int64))) == 0.0  # no event: no signal


def test_cox_loss_fits_lifelines_coefficients():
    """A linear Cox model fitted by minimizing cox_loss has lifelines' CoxPHFitter
    coefficients (continuous times: no ties, so Breslow's and Efron's agree)."""
    import pandas as pd

    rng = np.random.default_rng(3)
    n = 200
    x = rng.standard_normal((n, 3))
    event_time = rng.exponential(1.0, n) * np.exp(-x @ np.array([0.8, -0.5, 0.0]))
    cens = rng.exponential(2.0, n)
    times, events = np.minimum(event_time, cens), (event_time <= cens).astype(int)
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    xt, tt, et = torch.from_numpy(x), torch.from_numpy(times), torch.from_numpy(events)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_loss(xt @ beta, tt, et).double()
        loss.backward()
        return loss

    opt.step(closure)
    cph = CoxPHFitter().fit(pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "T": times, "E": events}),
                            "T", "E")
    assert beta.detach().numpy() == pytest.approx(cph.params_.to_numpy(), abs=2e-4)


def test_ibs_matches_a_kaplan_meier_ipcw_formula():
    """The integrated Brier score of binned survival curves against Graf's formula
    with lifelines' Kaplan-Meier estimate of the training censoring; test follow-up
    past the training cases' longest is censored just before it."""
    rng = np.random.default_rng(4)
    train_t, test_t = rng.exponential(10, 80), rng.exponential(10, 50)
    train_e, test_e = rng.random(80) < 0.7, rng.random(50) < 0.7
    edges = quantile_edges(train_t, train_e, 4)
    curves = np.sort(rng.random((50, 4)), axis=1)[:, ::-1]  # (S, K) decreasing survival through each bin
    risk = -curves.sum(1)
    got = survival_metrics(test_t, test_e, risk, train_t, train_e, curves, edges)
    assert got["c_index"] == pytest.approx(concordance_index(test_t, -risk, test_e), abs=1e-12)
    assert got["c_index_ipcw"] is not None and 0 < got["c_index_ipcw"] < 1

    km = KaplanMeierFitter().fit(train_t, 1 - train_e)  # censoring "survival" G
    end = train_t.max()
    ended = test_t >= end
    t_obs, e_obs = np.where(ended, np.nextafter(end, 0), test_t), test_e & ~ended
    grid = np.unique(np.percentile(test_t, np.linspace(10, 90, 9)))
    grid = grid[(grid >= test_t.min()) & (grid < min(test_t.max(), np.nextafter(end, 0)))]
    at_start = np.concatenate([np.ones((50, 1)), curves[:, :-1]], axis=1)
    g_obs = km.survival_function_at_times(t_obs).to_numpy()
    scores = []
    for t in grid:
        s = at_start[:, time_bins([t], edges)[0]]  # S(t): survival before t's bin
        case = (t_obs <= t) & e_obs
        control = t_obs > t
        g_t = km.survival_function_at_times([t]).to_numpy()[0]
        scores.append(np.mean(np.where(case, s ** 2 / g_obs, 0) + np.where(control, (1 - s) ** 2 / g_t, 0)))
    assert got["ibs"] == pytest.approx(np.trapezoid(scores, grid) / (grid[-1] - grid[0]), rel=1e-9)


def test_median_split_logrank_matches_lifelines():
    rng = np.random.default_rng(5)
    times, events, risk = rng.exponential(5, 40), rng.random(40) < 0.7, rng.standard_normal(40)
    high, p = median_split_logrank(times, events, risk)
    want = logrank_test(times[high], times[~high], events[high], events[~high]).p_value
    assert high.sum() == 20 and p == pytest.approx(want, rel=1e-9)


def write_csv(path, rows, header=("case_id", "slide_id", "time", "event")):
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


@pytest.mark.parametrize("rows, needle", [
    ([("a", "s1", "-3", "1"), ("b", "s2", "5", "0")], "'time' needs a finite time >= 0, missing or bad on: line 2 "
                                                       "(slide 's1'): '-3'"),
    ([("a", "s1", "", "1"), ("b", "s2", "nan", "0")], "line 2 (slide 's1'): ''; line 3 (slide 's2'): 'nan'"),
    ([("a", "s1", "3", "2"), ("b", "s2", "5", "yes")], "'event' needs 1 (event) or 0 (censored), bad on: line 2 "
                                                       "(slide 's1'): '2'; line 3 (slide 's2'): 'yes'"),
    ([("a", "s1", "3", "1"), ("a", "s2", "4", "1")], "case 'a' has two outcomes: line 2 (slide 's1') says time 3, "
                                                     "event 1; line 3 (slide 's2') says time 4, event 1"),
    ([("a", "s1", "3", "0"), ("b", "s2", "4", "0")], "no row has an event"),
])
def test_survival_table_errors_name_the_rows(tmp_path, rows, needle):
    with pytest.raises(DataError, match=None) as info:
        read_survival_labels(write_csv(tmp_path / "t.csv", rows))
    assert needle in str(info.value) and "t.csv" in str(info.value)
    with pytest.raises(DataError, match="no time column 'os_months'.*--time-col"):
        read_survival_labels(write_csv(tmp_path / "u.csv", [("a", "s1", "3", "1")]), time_col="os_months")


def test_survival_table_strata_and_shared_outcomes(tmp_path):
    rows = [(f"c{i}", f"s{i}_{j}", f"{t:.1f}", e) for i, (t, e) in
            enumerate(zip([1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 1, 1, 0, 1, 1, 0])) for j in range(1 + i % 2)]
    table = read_survival_labels(write_csv(tmp_path / "t.csv", rows), strata_bins=2)
    assert len(table) == len(rows) and table.times[1:3].tolist() == [2.0, 2.0]  # a case's slides share it
    # edges: 0, the median of the uncensored cases' times (1, 3, 4, 6, 7 -> 4), inf
    assert quantile_edges(np.array([1, 2, 3, 4, 5, 6, 7, 8.]), np.array([1, 0, 1, 1, 0, 1, 1, 0]), 2).tolist() == \
        [0.0, 4.0, np.inf]
    names = [table.classes[k] for k in table.labels]
    assert names[0] == "event1_bin0" and names[1] == "event0_bin0" and names[-1] == "event0_bin1"


def test_cox_epoch_order_gives_every_step_an_event(tmp_path):
    data = make_synthetic_survival_set(tmp_path, num_cases=30, slides_per_case=(1, 1), dim=4, patches=(1, 2),
                                       censoring=0.6, seed=6)
    table = read_survival_labels(data.labels_csv)
    task = Survival(table, "cox", table.slide_ids)
    dataset = SlideDataset(table, {s: None for s in table.slide_ids})
    events = table.events.astype(bool)
    group = 30 // int(events.sum()) + 1  # enough steps for one event each... and a short last step
    order = task.epoch_order(dataset, False, group, np.random.default_rng(0), torch.Generator())
    assert sorted(order.tolist()) == list(range(30))
    steps = [order[i:i + group] for i in range(0, 30, group)]
    assert all(events[s].any() for s in steps)
    assert order.tolist() != task.epoch_order(dataset, False, group, np.random.default_rng(1), torch.Generator()).tolist()


def c_index_of_predictions(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    t, e, r = (np.array([float(row[k]) for row in rows]) for k in ("time", "event", "risk"))
    return rows, concordance_index(t, -r, e)


@pytest.fixture(scope="module")
def survival_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("surv")
    data = make_synthetic_survival_set(root / "data", layout="clam", num_cases=40, slides_per_case=(1, 2), dim=16,
                                       patches=(4, 40), signal=3.0, effect=2.0, censoring=0.3, seed=11)
    out = root / "out"
    rc = main(["train", "--task", "survival", "--features", str(data.features_dir), "--labels", str(data.labels_csv),
               "--model", "abmil.base", "--out", str(out), "--folds", "3", "--epochs", "10", "--lr", "5e-3",
               "--bins", "3", "--overrides", TINY])
    assert rc == 0
    return data, out


def test_survival_run_beats_chance_and_writes_its_outputs(survival_run):
    data, out = survival_run
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["task", "loss", "bins", "folds", "mean", "std"] and results["loss"] == "nll"
    keys = ["c_index", "c_index_ipcw", "ibs", "logrank_p"]
    assert list(results["mean"]) == keys and all(list(f["test"]) == keys for f in results["folds"])
    assert list(results["folds"][0]["val"]) == [*keys, "loss"]
    assert results["mean"]["c_index"] >= 0.7, results  # the planted risk is learnt
    assert 0 < results["mean"]["ibs"] < 0.3
    table = read_survival_labels(data.labels_csv)
    splits = read_splits(out / "splits", table)
    case_of = dict(zip(table.slide_ids, table.case_ids))
    run = json.loads((out / "run.json").read_text())
    for k, fold in enumerate(results["folds"]):
        rows, c = c_index_of_predictions(out / f"fold_{k}" / "predictions.csv")
        assert fold["test"]["c_index"] == pytest.approx(c, abs=1e-9)  # per case, as lifelines computes it
        assert sorted(r["case_id"] for r in rows) == sorted({case_of[s] for s in splits[k].test})
        assert len(rows[0]) == 5 + 3  # case_id, slide_ids, time, event, risk, survival_bin0..2
        assert (out / f"fold_{k}" / "km.png").stat().st_size > 10_000
        assert len(run["folds"][k]["bin_edges"]) == 3
        assert table.events[[table.index[s] for s in splits[k].test]].any()  # stratified: events in every test part
    md = (out / "results.md").read_text()
    assert "survival, nll loss over 3 time bins" in md and f"{results['mean']['c_index']:.3f}" in md


def test_survival_eval_reproduces_a_fold(survival_run, tmp_path):
    data, out = survival_run
    table = read_survival_labels(data.labels_csv)
    test = read_splits(out / "splits", table)[0].test
    with open(data.labels_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["slide_id"] in test]
    sub = write_csv(tmp_path / "test.csv", [tuple(r.values()) for r in rows])
    rc = main(["eval", "--checkpoint", str(out / "fold_0" / "checkpoint.pt"), "--features", str(data.features_dir),
               "--labels", str(sub), "--out", str(tmp_path / "ev")])
    assert rc == 0
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    fold = json.loads((out / "results.json").read_text())["folds"][0]["test"]
    assert got["task"] == "survival" and got["metrics"]["c_index"] == pytest.approx(fold["c_index"], abs=1e-9)
    assert (tmp_path / "ev" / "km.png").exists()


def test_cox_run_and_bad_settings(tmp_path, capsys):
    data = make_synthetic_survival_set(tmp_path / "data", num_cases=30, slides_per_case=(1, 1), dim=16,
                                       patches=(4, 40), signal=3.0, effect=2.0, seed=12)
    base = ["train", "--task", "survival", "--features", str(tmp_path / "data"), "--labels", str(data.labels_csv),
            "--model", "abmil.base", "--folds", "3", "--overrides", TINY]
    assert main([*base, "--out", str(tmp_path / "o1"), "--loss", "cox"]) == 1
    assert "the Cox loss compares the cases of an optimizer step" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o2"), "--balanced"]) == 1
    assert "survival has no classes" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o3"), "--time-col", "os"]) == 1
    assert "no time column 'os'" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "cox"), "--loss", "cox", "--accumulate", "8", "--epochs", "10",
                 "--lr", "5e-3"]) == 0
    results = json.loads((tmp_path / "cox" / "results.json").read_text())
    assert results["loss"] == "cox" and results["bins"] is None and results["mean"]["ibs"] is None
    assert results["mean"]["c_index"] >= 0.65, results
    ckpt = torch.load(tmp_path / "cox" / "fold_0" / "checkpoint.pt", weights_only=True)
    assert ckpt["num_classes"] == 1 and ckpt["task"] == "survival" and ckpt["columns"]["time"] == "time"


def test_folds_without_events(tmp_path, capsys):
    """A training part without an event is an error naming the fold; a test part
    without one warns and leaves its concordance indices null."""
    from mammoth_fast.data import Split, write_splits

    data = make_synthetic_survival_set(tmp_path / "data", num_cases=12, slides_per_case=(1, 1), dim=8,
                                       patches=(2, 6), censoring=0.4, seed=13)
    table = read_survival_labels(data.labels_csv)
    ev = [s for s, e in zip(table.slide_ids, table.events) if e]
    cens = [s for s, e in zip(table.slide_ids, table.events) if not e]
    assert len(ev) >= 4 and len(cens) >= 3
    base = ["train", "--task", "survival", "--features", str(tmp_path / "data"), "--labels", str(data.labels_csv),
            "--model", "abmil.base", "--epochs", "1", "--overrides", TINY]
    write_splits([Split(tuple(ev[:-2] + cens[1:]), (), tuple(ev[-2:] + cens[:1])),
                  Split(tuple(ev[:-2] + cens[1:]), (), tuple(cens[:1]))], tmp_path / "s1", table)
    with pytest.warns(UserWarning, match="fold 1: the test part .1 slides. has no event"):
        assert main([*base, "--out", str(tmp_path / "o1"), "--splits", str(tmp_path / "s1")]) == 0
    results = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert results["folds"][1]["test"]["c_index"] is None and results["folds"][0]["test"]["c_index"] is not None
    write_splits([Split(tuple(cens), (), tuple(ev))], tmp_path / "s2", table)
    assert main([*base, "--out", str(tmp_path / "o2"), "--splits", str(tmp_path / "s2")]) == 1
    assert f"fold 0's training part ({len(cens)} cases) has no event" in capsys.readouterr().err
