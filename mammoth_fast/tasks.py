"""What the training loop (:mod:`mammoth_fast.train`) optimizes and reports, per
kind of label:

- :class:`Classification`: cross-entropy (plus the model's own auxiliary losses,
  e.g. CLAM's instance loss), per-slide class probabilities, scikit-learn's
  metrics (:func:`compute_metrics`);
- :class:`Survival`: the discrete-time NLL or the Cox partial likelihood of
  :mod:`mammoth_fast.survival` on a :class:`~mammoth_fast.data.survival.SurvivalTable`,
  per-case risks (the mean over the case's slides), concordance indices, the
  integrated Brier score and the log-rank p-value of a median risk split.

A task turns a batch's model outputs into the training loss, a set's
predictions into its validation loss, metrics and predictions.csv rows, and
draws each epoch's order of the training slides.
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import survival as surv
from .data import DataError, SlideDataset, class_balanced_sampler
from .data.survival import SurvivalTable, quantile_edges, time_bins

PathLike = Union[str, Path]
METRICS = ("auroc", "balanced_accuracy", "accuracy", "kappa", "f1_macro")


@dataclass
class Predictions:
    """A model's outputs on a dataset, in the dataset's order."""
    slide_ids: List[str]  # (S,)
    labels: np.ndarray  # (S,) int64 (classification: class indices; survival: split strata)
    logits: np.ndarray  # (S, C) float32

    @property
    def probs(self) -> np.ndarray:
        """(S, C) float32 softmax of the logits."""
        return torch.from_numpy(self.logits).softmax(-1).numpy()

    @property
    def loss(self) -> float:
        """Mean cross-entropy of the logits."""
        return float(F.cross_entropy(torch.from_numpy(self.logits), torch.from_numpy(self.labels)))


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) == probs.shape[1]:
        return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    # a class absent from these slides: one-vs-rest over the classes present
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def compute_metrics(labels: np.ndarray, probs: np.ndarray) -> Dict[str, float]:
    """Scikit-learn's metrics of class probabilities ``probs`` (S, C) against
    ``labels`` (S,), predictions their argmax: AUROC (of class 1 for two classes;
    macro one-vs-rest for more, over the classes present), balanced accuracy,
    accuracy, quadratic-weighted Cohen's kappa (over all C classes), macro F1
    (over the classes in labels or predictions). NaN where undefined (one class)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score

    labels = np.asarray(labels)
    pred = probs.argmax(1)
    with warnings.catch_warnings():  # undefined values on tiny sets come back as NaN
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(labels, pred, weights="quadratic", labels=list(range(probs.shape[1])))
        return {"auroc": _auroc(labels, probs),
                "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
                "accuracy": float(accuracy_score(labels, pred)),
                "kappa": float(kappa),
                "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0))}


def write_predictions(path: PathLike, preds: Predictions, classes: Sequence[str]) -> None:
    """CSV: slide_id, label (class name), prob_{class} per class."""
    probs = preds.probs
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["slide_id", "label", *(f"prob_{c}" for c in classes)])
        for slide, label, row in zip(preds.slide_ids, preds.labels, probs):
            out.writerow([slide, classes[label], *(f"{p:.9g}" for p in row)])


def _json_value(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def epoch_order(n: int, labels: np.ndarray, balanced: bool, order_rng: np.random.Generator,
                draw: torch.Generator) -> np.ndarray:
    """(n,) indices of one epoch: a permutation from ``order_rng``, or with
    ``balanced`` n class-balanced draws with replacement from ``draw``."""
    if balanced:
        return np.fromiter(class_balanced_sampler(labels, generator=draw), dtype=np.int64, count=n)
    return order_rng.permutation(n)


class Classification:
    """Slide classification into ``classes``."""
    kind = "classification"
    step_loss = False  # the loss is a mean over each batch's bags

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.num_outputs = len(self.classes)
        self.metric_keys = METRICS
        self.loss_fn = nn.CrossEntropyLoss()

    def forward_kwargs(self, batch) -> dict:
        """What the model's forward takes besides the bags: the labels and loss, so that
        its auxiliary losses (CLAM's instance loss, ...) join 'loss'."""
        return {"label": batch.labels, "loss_fn": self.loss_fn}

    def loss(self, out: dict, slide_ids: Sequence[str]) -> Tensor:
        return out["loss"]

    def epoch_order(self, dataset: SlideDataset, balanced: bool, group: int, order_rng: np.random.Generator,
                    draw: torch.Generator) -> np.ndarray:
        """(n,) slide indices of one epoch: a permutation, or class-balanced draws with replacement."""
        return epoch_order(len(dataset), dataset.labels, balanced, order_rng, draw)

    def val_loss(self, preds: Predictions) -> float:
        return preds.loss

    def metrics(self, preds: Predictions) -> Dict[str, Optional[float]]:
        return {k: _json_value(v) for k, v in compute_metrics(preds.labels, preds.probs).items()}

    def write_predictions(self, path: PathLike, preds: Predictions) -> None:
        write_predictions(path, preds, self.classes)

    def meta(self) -> dict:
        """What a checkpoint stores to rebuild this task."""
        return {"task": self.kind, "num_classes": self.num_outputs, "classes": self.classes}


@dataclass
class CaseRisks:
    """Per-case outcomes and predictions of a set of slides (a case's slides averaged)."""
    case_ids: List[str]  # (P,)
    slides: List[List[str]]  # (P,) each case's slides
    times: np.ndarray  # (P,) float64
    events: np.ndarray  # (P,) int64
    risk: np.ndarray  # (P,) float64, higher = earlier event
    curves: Optional[np.ndarray]  # (P, K) survival through each bin (nll), None (cox)


class Survival:
    """Time-to-event prediction (see :mod:`mammoth_fast.survival`). ``train_ids``:
    the training slides, whose cases give the NLL's time bins (``n_bins``
    quantiles of their uncensored times) and the censoring distribution of the
    IPCW metrics; ``edges`` (from a checkpoint) replaces the bins."""
    kind = "survival"

    def __init__(self, table: SurvivalTable, loss: str, train_ids: Sequence[str], n_bins: int = 4,
                 alpha: float = 0.0, edges: Optional[Sequence[float]] = None, where: str = "the training part"):
        if loss not in surv.LOSSES:
            raise ValueError(f"unknown survival loss {loss!r}: choose one of {', '.join(surv.LOSSES)}")
        self.table, self.loss_name, self.alpha = table, loss, alpha
        outcome = table.outcome()
        cases = table.cases(train_ids)
        self.train_times = np.asarray([outcome[s[0]][0] for s in cases.values()], dtype=np.float64)  # (P,)
        self.train_events = np.asarray([outcome[s[0]][1] for s in cases.values()], dtype=np.int64)  # (P,)
        if not self.train_events.any():
            raise DataError(f"{where} ({len(cases)} cases) has no event: survival models need events to learn "
                            "from and to be scored on")
        if loss == "cox":
            self.edges = None
            self.num_outputs = 1
        else:
            self.edges = (np.asarray(list(edges) + [np.inf], dtype=np.float64) if edges is not None
                          else quantile_edges(self.train_times, self.train_events, n_bins))  # (K + 1,)
            self.num_outputs = len(self.edges) - 1
        self.step_loss = loss == "cox"  # the partial likelihood compares the bags of an optimizer step
        self.metric_keys = surv.METRICS
        times = np.asarray([outcome[s][0] for s in table.slide_ids])
        self._row = table.index
        self._times = torch.as_tensor(times, dtype=torch.float64)  # (S,)
        self._events = torch.as_tensor(table.events, dtype=torch.int64)  # (S,)
        self._bins = torch.as_tensor(time_bins(times, self.edges) if self.edges is not None
                                     else np.zeros(len(times), np.int64))  # (S,)

    def _targets(self, slide_ids: Sequence[str], device) -> Tuple[Tensor, Tensor, Tensor]:
        rows = torch.as_tensor([self._row[s] for s in slide_ids])
        return tuple(x[rows].to(device) for x in (self._times, self._events, self._bins))

    def forward_kwargs(self, batch) -> dict:
        return {}

    def loss(self, out: dict, slide_ids: Sequence[str]) -> Tensor:
        """The loss of the bags ``slide_ids`` from their outputs ``out['logits']`` (B, K)."""
        logits = out["logits"]
        times, events, bins = self._targets(slide_ids, logits.device)
        if self.loss_name == "cox":
            return surv.cox_loss(logits.reshape(-1), times, events)
        return surv.nll_loss(logits, bins, events, self.alpha)

    def epoch_order(self, dataset: SlideDataset, balanced: bool, group: int, order_rng: np.random.Generator,
                    draw: torch.Generator) -> np.ndarray:
        """(n,) slide indices of one epoch: a permutation; with the Cox loss, the events
        dealt out over the optimizer steps of ``group`` bags so that every step has
        one where there are enough (the partial likelihood of a step without an
        event is zero)."""
        n = len(dataset)
        if not self.step_loss:
            return order_rng.permutation(n)
        events = self._events[[self._row[s] for s in dataset.slide_ids]].numpy().astype(bool)  # (n,)
        steps = -(-n // group)
        room = [group] * (steps - 1) + [n - (steps - 1) * group]  # bags per step; the last may be short
        slots: List[List[int]] = [[] for _ in range(steps)]
        k = 0
        for i in order_rng.permutation(np.flatnonzero(events)):  # events round-robin over the steps with room
            while len(slots[k % steps]) == room[k % steps]:
                k += 1
            slots[k % steps].append(int(i))
            k += 1
        rest = [int(i) for i in order_rng.permutation(np.flatnonzero(~events))]
        for step, size in zip(slots, room):  # then the censored bags fill each step up
            while len(step) < size:
                step.append(rest.pop())
        full = slots[:-1] if room[-1] < group else slots  # a short last step stays last
        order_rng.shuffle(full)
        slots = full + slots[len(full):]
        return np.asarray([i for step in slots for i in order_rng.permutation(step)], dtype=np.int64)

    def case_risks(self, preds: Predictions) -> CaseRisks:
        """The predictions of ``preds``' slides averaged per case."""
        logits = torch.from_numpy(preds.logits)
        risk = surv.risk_scores(logits, self.loss_name).double().numpy()  # (S,)
        curves = None if self.loss_name == "cox" else surv.survival_curves(logits).double().numpy()  # (S, K)
        cases = self.table.cases(preds.slide_ids)
        at = {s: i for i, s in enumerate(preds.slide_ids)}
        outcome = self.table.outcome()
        rows = [[at[s] for s in slides] for slides in cases.values()]
        return CaseRisks(list(cases), [list(s) for s in cases.values()],
                         np.asarray([outcome[s[0]][0] for s in cases.values()], dtype=np.float64),
                         np.asarray([outcome[s[0]][1] for s in cases.values()], dtype=np.int64),
                         np.asarray([risk[r].mean() for r in rows]),
                         None if curves is None else np.stack([curves[r].mean(0) for r in rows]))

    def val_loss(self, preds: Predictions) -> float:
        """The loss over all of a set's slides (Cox: one partial likelihood over them)."""
        return float(self.loss({"logits": torch.from_numpy(preds.logits)}, preds.slide_ids))

    def metrics(self, preds: Predictions) -> Dict[str, Optional[float]]:
        """c_index, c_index_ipcw, ibs and logrank_p over the cases of ``preds``."""
        cr = self.case_risks(preds)
        out = surv.survival_metrics(cr.times, cr.events, cr.risk, self.train_times, self.train_events, cr.curves,
                                    self.edges)
        out["logrank_p"] = surv.median_split_logrank(cr.times, cr.events, cr.risk)[1]
        return {k: _json_value(v) for k, v in out.items()}

    def write_predictions(self, path: PathLike, preds: Predictions) -> None:
        """CSV, one row per case: case_id, slide_ids (';'-joined), time, event, risk
        and, for nll, the predicted survival through each time bin."""
        cr = self.case_risks(preds)
        k = 0 if cr.curves is None else cr.curves.shape[1]
        with open(path, "w", newline="") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(["case_id", "slide_ids", "time", "event", "risk", *(f"survival_bin{b}" for b in range(k))])
            for i, case in enumerate(cr.case_ids):
                out.writerow([case, ";".join(cr.slides[i]), f"{cr.times[i]:.9g}", int(cr.events[i]),
                              f"{cr.risk[i]:.9g}", *(f"{v:.9g}" for v in (cr.curves[i] if k else ()))])

    def km_plot(self, path: PathLike, preds: Predictions, title: str) -> Optional[float]:
        cr = self.case_risks(preds)
        return surv.km_plot(path, cr.times, cr.events, cr.risk, title)

    def meta(self) -> dict:
        return {"task": self.kind, "num_classes": self.num_outputs, "loss": self.loss_name, "alpha": self.alpha,
                "bin_edges": None if self.edges is None else [float(e) for e in self.edges[:-1]]}


__all__ = ["CaseRisks", "Classification", "METRICS", "Predictions", "Survival", "compute_metrics", "epoch_order",
           "write_predictions"]
