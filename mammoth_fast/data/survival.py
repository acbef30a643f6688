"""A survival table: one row per slide with its slide id, case (patient) id,
follow-up time and event indicator (1: the event was observed, e.g. death or
recurrence; 0: censored at that time), read from a CSV.

The outcome belongs to the case: all slides of a case must carry the same time
and event (a disagreement is an error naming the rows). Times must be finite
and >= 0; events 0 or 1 (also written 1.0, true, false); a bad row is an error
naming its line (up to ten listed).

For splitting, each slide gets a stratum: its event and the quantile bin of its
case's time among the uncensored cases (:func:`quantile_edges`), so that
:func:`~mammoth_fast.data.splits.make_splits` stratifies the folds by event and
time, by case. A :class:`SurvivalTable` is a :class:`~.labels.LabelTable` whose
``labels`` are those strata and ``classes`` their names (``event1_bin0``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import numpy as np

from .errors import DataError
from .labels import LabelTable, read_table_rows

PathLike = Union[str, Path]
EVENT_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


def quantile_edges(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """(n_bins + 1,) bin edges of follow-up time: 0, the 1/n_bins .. (n_bins - 1)/n_bins
    quantiles of the uncensored times, +inf (the discrete-time survival bins of
    MCAT / Patho-Bench: each bin holds about as many events). Edges that
    coincide (many equal event times) are merged, so there may be fewer bins."""
    event_times = np.asarray(times, dtype=np.float64)[np.asarray(events) == 1]
    if event_times.size == 0:
        raise DataError("no uncensored case: time bins need at least one event")
    inner = np.quantile(event_times, np.arange(1, n_bins) / n_bins) if n_bins > 1 else np.zeros(0)
    return np.unique(np.concatenate([[0.0], inner, [np.inf]]))


def time_bins(times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(S,) int64 bin of each time: bin k is [edges[k], edges[k + 1])."""
    return np.clip(np.searchsorted(edges, np.asarray(times, dtype=np.float64), side="right") - 1, 0, len(edges) - 2)


@dataclass
class SurvivalTable(LabelTable):
    """Slides with their case, follow-up time and event, in the CSV's row order;
    ``labels`` / ``classes`` are the split strata (event x time bin)."""
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (S,) float64, >= 0
    events: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (S,) int64, 1 = event observed

    def outcome(self) -> Dict[str, tuple]:
        """Slide id -> (time, event)."""
        return {s: (float(t), int(e)) for s, t, e in zip(self.slide_ids, self.times, self.events)}

    def cases(self, slide_ids) -> Dict[str, List[str]]:
        """Case id -> its slides among ``slide_ids`` (first-seen order)."""
        case_of = dict(zip(self.slide_ids, self.case_ids))
        out: Dict[str, List[str]] = {}
        for s in slide_ids:
            out.setdefault(case_of[s], []).append(s)
        return out


def _bad_rows(path: Path, what: str, rows: List[str]) -> DataError:
    shown = "; ".join(rows[:10]) + (f"; ... ({len(rows)} rows in all)" if len(rows) > 10 else "")
    return DataError(f"{path}: {what}: {shown}")


def read_survival_labels(csv_path: PathLike, time_col: str = "time", event_col: str = "event",
                         slide_col: str = "slide_id", case_col: str = "case_id", strata_bins: int = 4) -> SurvivalTable:
    """Read a survival table (see the module's docstring); the strata use
    ``strata_bins`` quantile bins of the uncensored cases' times."""
    path = Path(csv_path)
    rows = read_table_rows(path, ((slide_col, "slide id", "--slide-col"), (case_col, "case id", "--case-col"),
                                  (time_col, "time", "--time-col"), (event_col, "event", "--event-col")))
    slide_ids, case_ids, times, events = [], [], [], []
    bad_time, bad_event = [], []
    seen: Dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        slide, case = row[slide_col], row[case_col]
        for value, col in ((slide, slide_col), (case, case_col)):
            if not value:
                raise DataError(f"{path}, line {line}: empty {col!r}" + (f" (slide {slide!r})" if slide else ""))
        if slide in seen:
            raise DataError(f"{path}, line {line}: slide {slide!r} appears twice (first on line {seen[slide]})")
        seen[slide] = line
        try:
            t = float(row[time_col])
        except ValueError:
            t = float("nan")
        if not np.isfinite(t) or t < 0:
            bad_time.append(f"line {line} (slide {slide!r}): {row[time_col]!r}")
        event = EVENT_VALUES.get(row[event_col].lower())
        if event is None:
            bad_event.append(f"line {line} (slide {slide!r}): {row[event_col]!r}")
        slide_ids.append(slide)
        case_ids.append(case)
        times.append(t)
        events.append(event)
    if bad_time:
        raise _bad_rows(path, f"column {time_col!r} needs a finite time >= 0, missing or bad on", bad_time)
    if bad_event:
        raise _bad_rows(path, f"column {event_col!r} needs 1 (event) or 0 (censored), bad on", bad_event)
    first: Dict[str, int] = {}
    for i, case in enumerate(case_ids):
        j = first.setdefault(case, i)
        if (times[i], events[i]) != (times[j], events[j]):
            raise DataError(f"{path}: case {case!r} has two outcomes: line {j + 2} (slide {slide_ids[j]!r}) says "
                            f"time {times[j]:g}, event {events[j]}; line {i + 2} (slide {slide_ids[i]!r}) says "
                            f"time {times[i]:g}, event {events[i]} (a case's slides share its outcome)")
    times_arr, events_arr = np.asarray(times, dtype=np.float64), np.asarray(events, dtype=np.int64)
    if not events_arr.any():
        raise DataError(f"{path}: no row has an event ({event_col!r} is 0 everywhere): survival models need events")
    case_rows = np.asarray(list(first.values()))  # one row per case: the bins count cases, not slides
    edges = quantile_edges(times_arr[case_rows], events_arr[case_rows], strata_bins)
    strata = events_arr * (len(edges) - 1) + time_bins(times_arr, edges)  # (S,)
    names = [f"event{e}_bin{b}" for e in (0, 1) for b in range(len(edges) - 1)]
    present = np.unique(strata)
    remap = np.full(len(names), -1)
    remap[present] = np.arange(len(present))
    return SurvivalTable(slide_ids, case_ids, remap[strata].astype(np.int64), [names[k] for k in present], str(path),
                         times=times_arr, events=events_arr)


__all__ = ["SurvivalTable", "quantile_edges", "read_survival_labels", "time_bins"]
