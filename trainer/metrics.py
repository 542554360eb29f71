"""Scores of the paper's experiments and of the public benchmarks they are compared with.

- **IoU** of segmentation masks, per class and averaged over classes.
- **SKAB's point-wise scores**: F1, false-alarm rate and missed-alarm rate, as SKAB's
  leaderboard computes them (its ``chp_score(..., metric="binary")`` in ``core/metrics.py``
  of ``waico/SKAB``): confusion counts summed over all experiments, then
  ``F1 = TP / (TP + (FN + FP) / 2)``, ``FAR = 100 * FP / (FP + TN)`` and
  ``MAR = 100 * FN / (FN + TP)``. SKAB rounds them to two decimals; these are not rounded.
- **Event-level detection**: labelled events detected by an alarm, and alarms that touch
  no event (``agent.evaluation`` matches them, one experiment at a time).
- **NAB scoring** with its application profiles, written after NAB's published algorithm
  (``nab/sweeper.py``, ``nab/optimizer.py`` and ``nab/runner.py`` of ``numenta/NAB``),
  threshold optimized over the whole corpus.

The published figures these scores are set against are at the end, with their sources.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterable, Sequence

import numpy as np

from agent.datasets import Event
from agent.evaluation import score_events
from trainer.datasets import nab_window_rows

log = logging.getLogger(__name__)

# --- IoU --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IouScore:
    """Per-class IoU (NaN for a class absent from both truth and prediction) and their mean
    over the scored classes, as fractions in [0, 1]."""

    per_class: np.ndarray
    mean: float
    intersection: np.ndarray
    union: np.ndarray
    classes: list[str]

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.classes, (float(v) for v in self.per_class)))


def segmentation_iou(y_true: np.ndarray | Sequence[np.ndarray],
                     y_pred: np.ndarray | Sequence[np.ndarray], mode: str = "softmax",
                     threshold: float = 0.5, class_names: Sequence[str] | None = None
                     ) -> IouScore:
    """IoU of predicted against true masks, per class, summed over the whole test set.

    ``y_true`` and ``y_pred`` are arrays (..., length, M), or sequences of such arrays of
    any lengths (whole recordings), with the class on the last axis. For each class ``c``
    the intersection and the union of the time points marked ``c`` in truth and in
    prediction are summed over every snapshot and point, and ``IoU_c = I_c / U_c``; the
    score is the mean of ``IoU_c`` over the classes.

    - ``mode="softmax"`` (multi-class, single-label): each point takes the class of its
      largest channel, in truth and in prediction. Channel 0 is the background: it is not
      a class of its own and stays out of the mean.
    - ``mode="sigmoid"`` (multi-label): each channel is a class; a point is marked where the
      prediction is at least ``threshold`` (truth at least 0.5). Every channel is averaged.

    A class absent from both truth and prediction has no IoU (NaN) and is left out of the
    mean; if every class is absent the mean is NaN.
    """
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")
    if not isinstance(y_true, np.ndarray) and len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true masks but {len(y_pred)} predicted masks")
    pairs = [(y_true, y_pred)] if isinstance(y_true, np.ndarray) else list(zip(y_true, y_pred))
    intersection = union = None
    for truth, pred in pairs:
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape:
            raise ValueError(f"true {truth.shape} and predicted {pred.shape} masks differ in shape")
        t, p = _marked(truth, mode, 0.5), _marked(pred, mode, threshold)
        axes = tuple(range(t.ndim - 1))
        i = np.sum(t & p, axis=axes, dtype=np.int64)
        u = np.sum(t | p, axis=axes, dtype=np.int64)
        intersection = i if intersection is None else intersection + i
        union = u if union is None else union + u
    if intersection is None:
        raise ValueError("no masks to score")

    first = 1 if mode == "softmax" else 0
    intersection, union = intersection[first:], union[first:]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    scored = per_class[np.isfinite(per_class)]
    mean = float(scored.mean()) if len(scored) else math.nan
    names = list(class_names)[first:] if class_names is not None else [
        f"class{c}" for c in range(first, first + len(per_class))]
    return IouScore(per_class, mean, intersection, union, names)


def _marked(masks: np.ndarray, mode: str, threshold: float) -> np.ndarray:
    if mode == "sigmoid":
        return masks >= threshold
    return np.eye(masks.shape[-1], dtype=bool)[np.argmax(masks, axis=-1)]


# --- SKAB point-wise scores ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointScores:
    """Point-wise confusion counts and SKAB's scores from them (FAR and MAR in %)."""

    tp: int
    tn: int
    fp: int
    fn: int

    @property
    def f1(self) -> float:
        denominator = self.tp + (self.fn + self.fp) / 2
        return self.tp / denominator if denominator else 0.0

    @property
    def far(self) -> float:
        return 100.0 * self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        return 100.0 * self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0


def point_scores(true_labels: Sequence[np.ndarray], predicted: Sequence[np.ndarray]
                 ) -> PointScores:
    """Counts summed over all experiments: one 0/1 array per experiment for each side."""
    if len(true_labels) != len(predicted):
        raise ValueError(f"{len(true_labels)} true label arrays but {len(predicted)} predicted")
    tp = tn = fp = fn = 0
    for truth, pred in zip(true_labels, predicted):
        truth, pred = np.asarray(truth) == 1, np.asarray(pred) == 1
        if truth.shape != pred.shape:
            raise ValueError(f"true {truth.shape} and predicted {pred.shape} labels differ")
        tp += int(np.sum(truth & pred))
        tn += int(np.sum(~truth & ~pred))
        fp += int(np.sum(~truth & pred))
        fn += int(np.sum(truth & ~pred))
    return PointScores(tp, tn, fp, fn)


# --- Event-level detection ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EventCounts:
    """Events (attacks, failures) detected, and false alarms, over all experiments."""

    events: int
    detected: int
    alarms: int
    false_alarms: int

    def line(self) -> str:
        return (f"detected {self.detected} of {self.events} events, {self.false_alarms} false "
                f"alarms of {self.alarms} alarms")


def event_detection(alarms_by_run: Sequence[Iterable[tuple[float, float]]],
                    events_by_run: Sequence[Sequence[Event]]) -> EventCounts:
    """Match each experiment's alarm spans ``(start, end)`` with that experiment's events.

    An event is detected when an alarm overlaps its label window; an alarm overlapping no
    event window of its experiment is a false alarm (``agent.evaluation.score_events``).
    """
    if len(alarms_by_run) != len(events_by_run):
        raise ValueError(f"{len(alarms_by_run)} alarm lists but {len(events_by_run)} event lists")
    events = detected = alarms = false = 0
    for run_alarms, run_events in zip(alarms_by_run, events_by_run):
        score = score_events(list(run_alarms), list(run_events))
        events += len(score.events)
        detected += score.detected
        alarms += score.n_alarms
        false += len(score.false_alarms)
    return EventCounts(events, detected, alarms, false)


# --- NAB ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NabProfile:
    """Weights of an application profile (``config/profiles.json`` of NAB)."""

    tp: float
    fp: float
    fn: float


NAB_PROFILES = {
    "standard": NabProfile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": NabProfile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": NabProfile(tp=1.0, fp=0.11, fn=2.0),
}
# The first 15 % of each file, at most 750 rows, is not scored (NAB's probationary period).
NAB_PROBATION = 0.15
_NAB_PROBATION_CAP_ROWS = 5000
_NO_DETECTION = 1.1  # NAB's first threshold: above every score, nothing detected


def nab_scaled_sigmoid(position: np.ndarray | float) -> np.ndarray:
    """NAB's scaled sigmoid ``2 / (1 + exp(5 x)) - 1`` of a relative position ``x``.

    -1 is a window's first row (0.9866), 0 its right edge (0), positive positions lie past
    it (towards -1); positions of 3 or more give exactly -1.
    """
    x = np.asarray(position, dtype=np.float64)
    return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(np.minimum(5.0 * x, 700.0))) - 1.0)


@dataclasses.dataclass(frozen=True)
class NabInput:
    """One series to score: ``scores`` (n,) anomaly scores in [0, 1] aligned with the rows
    of ``ts`` (NaN: not scored, never a detection) and the inclusive ``windows``."""

    name: str
    ts: np.ndarray
    scores: np.ndarray
    windows: list[tuple[float, float]]

    @classmethod
    def for_series(cls, series, scores: np.ndarray) -> "NabInput":
        """From a ``trainer.datasets.NabSeries`` and one score per row of its file."""
        return cls(series.name, series.ts, np.asarray(scores, dtype=np.float64), series.windows)

    def window_rows(self) -> list[tuple[int, int]]:
        return [nab_window_rows(np.asarray(self.ts), a, b) for a, b in self.windows]


@dataclasses.dataclass(frozen=True)
class NabFileResult:
    name: str
    raw: float
    windows: int
    detected: int
    false_positives: int  # rows above the threshold outside every window, after probation


@dataclasses.dataclass(frozen=True)
class NabResult:
    """The normalized corpus score ``100 * (raw - null) / (perfect - null)``."""

    profile: str
    score: float
    threshold: float
    raw: float
    null: float
    perfect: float
    files: list[NabFileResult]


def score_nab(inputs: Sequence[NabInput], profile: str = "standard",
              probation: float = NAB_PROBATION, threshold: float | None = None) -> NabResult:
    """NAB's score of a detector over a corpus, with the threshold NAB would choose.

    Per row, after the probationary period (the first ``min(floor(0.15 n), 750)`` rows):

    - inside a window of ``W`` rows ending at row ``e``, a detection at row ``i`` is worth
      ``A_TP * sigma(-(e - i + 1) / W) / sigma(-1)``: ``A_TP`` at the window's first row,
      falling to about 0 at its last. Only the window's earliest detection counts; a
      window with no detection costs ``-A_FN``.
    - outside the windows, every detected row costs ``A_FP * sigma(|i - e| / (W - 1))``,
      with ``e`` and ``W`` of the closest preceding window (``-A_FP`` before the first
      window): detections just after a window cost little, late ones ``-A_FP``.

    A row is detected when its score is at least the threshold. Without ``threshold`` the
    scores of the whole corpus are swept from the highest down, and the threshold with the
    highest summed raw score is taken (the highest such threshold on a tie; 1.1, nothing
    detected, is a candidate), as NAB's optimizer does. The null detector scores
    ``-A_FN`` per window and the perfect one ``A_TP`` per window, so they normalize to 0 and
    100. Windows that lie wholly in the probationary period are neither scored nor counted
    (NAB's labels put none there).

    Limitations: NAB's scoreboard is over its 58 files; a score over a subset of them is
    not the same figure, only the same scale.
    """
    if profile not in NAB_PROFILES:
        raise ValueError(f"unknown NAB profile {profile!r}; choose one of {sorted(NAB_PROFILES)}")
    weights = NAB_PROFILES[profile]
    files = [_nab_rows(item, weights, probation) for item in inputs]
    if not files:
        raise ValueError("no series to score")
    n_windows = sum(f.n_windows for f in files)
    null, perfect = -weights.fn * n_windows, weights.tp * n_windows

    if threshold is None:
        threshold = _nab_best_threshold(files, weights, null)
    results = [_nab_file_score(f, weights, threshold) for f in files]
    raw = sum(r.raw for r in results)
    score = 100.0 * (raw - null) / (perfect - null) if perfect != null else math.nan
    return NabResult(profile, score, float(threshold), raw, null, perfect, results)


@dataclasses.dataclass(frozen=True)
class _NabRows:
    """A file's scorable rows: anomaly score, sweep weight, window number (-1 outside);
    the numbers of its windows that hold scorable rows, and its count of windows."""

    name: str
    scores: np.ndarray
    weights: np.ndarray
    window: np.ndarray
    scored_windows: tuple[int, ...]
    n_spans: int

    @property
    def n_windows(self) -> int:
        return len(self.scored_windows)


def _nab_rows(item: NabInput, weights: NabProfile, probation: float) -> _NabRows:
    scores = np.asarray(item.scores, dtype=np.float64)
    n = len(scores)
    if len(item.ts) != n:
        raise ValueError(f"{item.name}: {len(item.ts)} timestamps but {n} scores")
    finite = scores[np.isfinite(scores)]
    if len(finite) and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"{item.name}: anomaly scores must lie in [0, 1]")

    rows = np.arange(n)
    window = np.full(n, -1)
    value = np.full(n, -weights.fp)  # a detection before any window
    previous_end, previous_width = None, None
    spans = sorted(item.window_rows())
    for k, (first, last) in enumerate(spans):
        # Detections between the previous window and this one, by the previous window.
        if previous_end is not None:
            gap = slice(previous_end + 1, first)
            value[gap] = weights.fp * _past_window(rows[gap], previous_end, previous_width)
        width = last - first + 1
        inside = slice(first, last + 1)
        window[inside] = k
        value[inside] = (weights.tp * nab_scaled_sigmoid(-(last - rows[inside] + 1) / width)
                         / nab_scaled_sigmoid(-1.0))
        previous_end, previous_width = last, width
    if previous_end is not None:
        tail = slice(previous_end + 1, n)
        value[tail] = weights.fp * _past_window(rows[tail], previous_end, previous_width)

    length = min(math.floor(probation * n), probation * _NAB_PROBATION_CAP_ROWS)
    scorable = rows >= length
    scored = tuple(sorted({int(w) for w in window[scorable] if w >= 0}))
    if len(scored) < len(spans):
        log.warning("%s: %d windows lie in the probationary period and are not scored",
                    item.name, len(spans) - len(scored))
    keep = scorable & np.isfinite(scores)
    return _NabRows(item.name, scores[keep], value[keep], window[keep], scored, len(spans))


def _past_window(rows: np.ndarray, end: int, width: int) -> np.ndarray:
    # NAB divides by (width - 1); a one-row window would divide by zero, so it counts as 2.
    position = np.abs(rows - end) / (width - 1) if width > 1 else np.full(len(rows), 2.0)
    return nab_scaled_sigmoid(position)


def _nab_best_threshold(files: list[_NabRows], weights: NabProfile, null: float) -> float:
    """The threshold with the highest corpus score, sweeping scores from the highest down."""
    scores = np.concatenate([f.scores for f in files])
    values = np.concatenate([f.weights for f in files])
    offsets = np.cumsum([0] + [f.n_spans for f in files])
    window = np.concatenate([np.where(f.window >= 0, f.window + o, -1)
                             for f, o in zip(files, offsets[:-1])])
    order = np.argsort(-scores, kind="stable")
    scores, values, window = scores[order], values[order], window[order]

    best_score, best_threshold = null, _NO_DETECTION
    total = null
    window_value = np.full(int(offsets[-1]), -weights.fn)
    i = 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j] == scores[i]:
            k = window[j]
            if k < 0:
                total += values[j]
            elif values[j] > window_value[k]:
                total += values[j] - window_value[k]
                window_value[k] = values[j]
            j += 1
        if total > best_score + 1e-12:
            best_score, best_threshold = total, float(scores[i])
        i = j
    return best_threshold


def _nab_file_score(f: _NabRows, weights: NabProfile, threshold: float) -> NabFileResult:
    detected = f.scores >= threshold
    raw = float(np.sum(f.weights[detected & (f.window < 0)]))
    hit = 0
    for k in f.scored_windows:
        in_window = detected & (f.window == k)
        if in_window.any():
            raw += float(f.weights[in_window].max())
            hit += 1
        else:
            raw -= weights.fn
    fps = int(np.sum(detected & (f.window < 0)))
    return NabFileResult(f.name, raw, f.n_windows, hit, fps)


# --- Published reference figures ---------------------------------------------------------------

# NAB scoreboard, standard profile, normalized (null 0 and perfect 100 by construction).
# Source: numenta/NAB README scoreboard (NAB v1.1; Numenta HTM listed as 70.5-69.7 over
# runs) and results/final_results.json at commit 5a98e4f1 (ARTime 74.85, numenta 70.10).
NAB_SCOREBOARD_STANDARD = {
    "Perfect": 100.0,
    "ARTime (best published)": 74.9,
    "Numenta HTM": 70.5,
    "Null": 0.0,
}

# SKAB outlier-detection leaderboard, "Proposed Leaderboard" of waico/SKAB README.md at
# commit b2c0d46c (the commit of the staged data): (F1, FAR %, MAR %), evaluated as binary
# classification on SKAB's test part. Best F1 0.78 (Conv-AE).
SKAB_LEADERBOARD = {
    "Perfect detector": (1.0, 0.0, 0.0),
    "Conv-AE": (0.78, 13.55, 28.02),
    "MSET": (0.78, 39.73, 14.13),
    "T-squared+Q (PCA-based)": (0.76, 26.62, 24.92),
    "LSTM-AE": (0.74, 29.96, 25.92),
    "T-squared": (0.66, 19.21, 42.6),
    "LSTM-VAE": (0.56, 9.13, 55.03),
    "Vanilla LSTM": (0.54, 12.54, 59.53),
    "MSCRED": (0.36, 49.94, 69.88),
    "Vanilla AE": (0.39, 2.59, 75.15),
    "Isolation forest": (0.29, 2.56, 82.89),
    "Null detector": (0.0, 0.0, 100.0),
}

# Wen & Keyes (2019), the paper's own figures, for the results table.
PAPER_FIGURES = {
    "dodgers": "36 of 39 test games detected, a few false alarms",
    "synthetic_iou": {"scratch": 0.5096, "transfer": 0.7195},
    "emg_iou": {"unet_scratch": 0.5661, "munet_scratch": 0.6410, "munet_transfer": 0.7004},
    "gasoil_loop": "21 of 22 attacks detected, 3 false alarms",
}
