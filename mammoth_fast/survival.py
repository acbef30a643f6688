"""Survival (time-to-event) losses, risks and metrics for slide-level MIL models.

Two losses over a model's outputs (its ``logits``):

- ``nll``: the discrete-time negative log-likelihood of MCAT / Patho-Bench. The
  model has K outputs, one hazard logit per time bin (bins: quantiles of the
  training cases' uncensored times, :func:`~mammoth_fast.data.survival.quantile_edges`);
  hazard h_k = sigmoid(z_k), survival S_k = prod_{j<=k} (1 - h_j). A case with
  its event in bin y adds -log S_{y-1} - log h_y, a case censored in bin y adds
  -log S_y; ``alpha`` reweights (1 - alpha) * all + alpha * uncensored terms
  (MCAT's alpha_surv). Computed with log-sigmoids, so without MCAT's 1e-7 clamp.
  Risk: -sum_k S_k (MCAT's), higher is worse.
- ``cox``: the Cox partial likelihood (Breslow's ties), the negative
  log-likelihood averaged over the events of the bags in the loss. The model
  has one output, the log-risk. The likelihood compares cases with each other,
  so it needs several cases (and at least one event) per loss: the training
  loop computes it over all bags of an optimizer step.

Metrics (scikit-survival): Harrell's concordance index (censoring-aware: a pair
is comparable when the earlier time is an event), Uno's IPCW concordance index
(censoring distribution estimated on the training cases, truncated at their
longest follow-up) and, for ``nll`` (which predicts survival curves), the
integrated Brier score over the test cases' 10th to 90th percentile of time
(below the training cases' longest follow-up, where the censoring estimate ends).
:func:`km_plot` draws the Kaplan-Meier curves of the cases split at the median
predicted risk with the log-rank p-value.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("nll", "cox")
METRICS = ("c_index", "c_index_ipcw", "ibs", "logrank_p")
PathLike = Union[str, Path]


def nll_loss(logits: Tensor, bins: Tensor, events: Tensor, alpha: float = 0.0) -> Tensor:
    """Mean discrete-time survival NLL of hazard logits (B, K), time bins (B,)
    int64 and events (B,) (1 observed, 0 censored); see the module's docstring."""
    logits = logits.float()
    log_h = F.logsigmoid(logits)  # (B, K) log hazard
    log_s = torch.cumsum(F.logsigmoid(-logits), dim=1)  # (B, K) log survival through bin k
    log_s_pad = F.pad(log_s, (1, 0))  # (B, K + 1): log S before bin 0 is 0
    y = bins.long().unsqueeze(1)  # (B, 1)
    event = events.to(logits.dtype)
    uncensored = -event * (log_s_pad.gather(1, y) + log_h.gather(1, y)).squeeze(1)  # (B,)
    censored = -(1.0 - event) * log_s_pad.gather(1, y + 1).squeeze(1)  # (B,)
    return ((1.0 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def cox_loss(risk: Tensor, times: Tensor, events: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood (Breslow's ties) of log-risks (B,),
    averaged over the events; 0 (with a zero gradient) when no bag has an event."""
    risk = risk.float().reshape(-1)  # (B,)
    order = torch.argsort(times, descending=True)
    r, t, e = risk[order], times[order].to(torch.float64), events[order].to(risk.dtype)
    log_cum = torch.logcumsumexp(r, dim=0)  # (B,) log sum of exp(risk) over times >= t_i, ties aside
    at_risk_end = torch.searchsorted(-t, -t, right=True) - 1  # (B,) last index with time >= t_i (takes in ties)
    terms = e * (r - log_cum[at_risk_end])
    return -terms.sum() / e.sum().clamp(min=1.0)


def survival_curves(logits: Tensor) -> Tensor:
    """(B, K) survival through each bin, prod_{j<=k} (1 - sigmoid(z_j)), of hazard logits (B, K)."""
    return torch.exp(torch.cumsum(F.logsigmoid(-logits.float()), dim=1))


def risk_scores(logits: Tensor, loss: str) -> Tensor:
    """(B,) risk, higher = earlier event: -sum of the survival curve (nll), the log-risk (cox)."""
    if loss == "cox":
        return logits.float().reshape(logits.shape[0], -1)[:, 0]
    return -survival_curves(logits).sum(1)


def _surv_array(times: np.ndarray, events: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(events).astype(bool), time=np.asarray(times, dtype=np.float64))


def harrell_c(times: np.ndarray, events: np.ndarray, risk: np.ndarray) -> Optional[float]:
    """Harrell's concordance index of risks (higher = earlier event); None without a comparable pair."""
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    events = np.asarray(events).astype(bool)
    if len(events) < 2 or not events.any():
        return None
    try:
        return float(concordance_index_censored(events, np.asarray(times, np.float64), np.asarray(risk, np.float64))[0])
    except NoComparablePairException:
        return None


def survival_metrics(times: np.ndarray, events: np.ndarray, risk: np.ndarray, train_times: np.ndarray,
                     train_events: np.ndarray, curves: Optional[np.ndarray] = None,
                     edges: Optional[np.ndarray] = None) -> Dict[str, Optional[float]]:
    """c_index (Harrell), c_index_ipcw (Uno, censoring from the training cases,
    truncated at their longest follow-up) and ibs (integrated Brier score, when
    survival ``curves`` (S, K) over the bins of ``edges`` are given) of one
    set of cases; None where undefined (no event, no comparable pair, too few
    distinct times)."""
    from sksurv.metrics import concordance_index_ipcw, integrated_brier_score

    times, events, risk = np.asarray(times, np.float64), np.asarray(events).astype(bool), np.asarray(risk, np.float64)
    out: Dict[str, Optional[float]] = {"c_index": harrell_c(times, events, risk), "c_index_ipcw": None, "ibs": None}
    if out["c_index"] is None:
        return out
    train = _surv_array(train_times, train_events)
    test = _surv_array(times, events)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["c_index_ipcw"] = float(concordance_index_ipcw(train, test, risk, tau=float(np.max(train_times)))[0])
        except (ValueError, ZeroDivisionError):  # no comparable pair before tau, or a zero censoring probability
            pass
        if curves is not None and edges is not None:
            # follow-up past the training cases' longest is administratively censored just before it (the
            # censoring distribution ends there); the Brier scores at times before it are unchanged
            end = np.nextafter(float(np.max(train_times)), -np.inf)
            ended = times > end
            test_end = _surv_array(np.where(ended, end, times), events & ~ended)
            grid = np.unique(np.percentile(times, np.linspace(10, 90, 9)))
            grid = grid[(grid >= times.min()) & (grid < min(times.max(), end))]
            if grid.size >= 2:
                bins = np.clip(np.searchsorted(edges, grid, side="right") - 1, 0, curves.shape[1] - 1)  # (T,)
                at_start = np.concatenate([np.ones((len(curves), 1)), curves[:, :-1]], axis=1)  # (S, K): S before bin k
                try:
                    out["ibs"] = float(integrated_brier_score(train, test_end, at_start[:, bins], grid))
                except ValueError:  # a zero censoring probability inside the grid
                    pass
    return out


def median_split_logrank(times: np.ndarray, events: np.ndarray, risk: np.ndarray):
    """(high-risk mask (S,), log-rank p-value or None): cases above the median risk against the rest."""
    from sksurv.compare import compare_survival

    high = np.asarray(risk) > np.median(risk)
    p = None
    if 0 < high.sum() < len(high) and np.asarray(events).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                p = float(compare_survival(_surv_array(times, events), high.astype(int))[1])
            except ValueError:
                pass
    return high, p


def km_plot(path: PathLike, times: np.ndarray, events: np.ndarray, risk: np.ndarray, title: str) -> Optional[float]:
    """Kaplan-Meier curves of the cases above / at or below the median risk,
    with the log-rank p-value in the legend, saved to ``path`` (PNG); returns p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    times, events = np.asarray(times, np.float64), np.asarray(events).astype(bool)
    high, p = median_split_logrank(times, events, risk)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for mask, name, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
        if mask.any():
            t, s = kaplan_meier_estimator(events[mask], times[mask])
            t, s = np.r_[0.0, t], np.r_[1.0, s]
            ax.step(t, s, where="post", color=color,
                    label=f"{name} (n={int(mask.sum())}, events={int(events[mask].sum())})")
            cens = times[mask & ~events]  # censoring ticks on the curve
            ax.plot(cens, s[np.searchsorted(t, cens, side="right") - 1], "|", color=color, ms=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_title(f"{title}: log-rank p = {'–' if p is None else f'{p:.3g}'}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return p


__all__ = ["LOSSES", "METRICS", "cox_loss", "harrell_c", "km_plot", "median_split_logrank", "nll_loss",
           "risk_scores", "survival_curves", "survival_metrics"]
