"""NAB zero-shot: the base bundle, not fine-tuned, on the NAB series, through the agent.

Each NAB file is streamed through the agent's own pipeline (``agent.pipeline``: window,
snapshot preparation, ONNX Runtime, ensemble) with the bundle's operating point, and the
anomaly score of a row is the largest of the three classes' ensembled scores at the row's
slot (``stream_scores``). NAB's scorer (``trainer.metrics.score_nab``, standard profile)
then sweeps the threshold over the corpus, as NAB's optimizer does for every detector on
its scoreboard; the score at the bundle's own threshold, with nothing tuned, is reported
next to it. NAB counts every row at or above the threshold outside a window as a false
positive, so a segmentation model, whose scores stay high over a whole span, pays for each
row of it; the agent's alarms, one detection at the first row of each, are scored as a
second detector (what an operator would be shown).

Grid. NAB feeds a detector row by row, and so does this run: row ``i`` of a file is the
sample at ``i`` sample periods after its first row, with the file's median step as the
sample period (``grid="rows"``). Three of the ten files are irregular (``realTraffic``:
40 to 170 distinct steps, gaps of up to three days), and on their timestamps' grid the
agent would interpolate or mask much of them as gaps; ``grid="timestamps"`` streams the
files on their own times (``trainer.datasets.nab_stream_ts``), with the agent's default gap
handling, and is reported as well.

Known limitations: the corpus here is 10 of NAB's 58 files (25 of its windows), so the
score is on NAB's scale but is not a scoreboard entry; the first snapshot's worth of rows of
a file is scored only once a snapshot has filled (the first 1/8 of a snapshot is masked as
the stream's start), which NAB's probationary period (15 %) mostly covers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from agent.alarms import AlarmEvent
from agent.pipeline import AssetPipeline, Pipeline, run_series, settings_from_bundle
from trainer.datasets import DEFAULT_DATA as SHARED_DATA
from trainer.datasets import NabSeries, nab_stream_ts, read_nab
from trainer.export import code_version
from trainer.metrics import NAB_PROFILES, NAB_SCOREBOARD_STANDARD, NabInput, score_nab

log = logging.getLogger(__name__)

DEFAULT_DATA = SHARED_DATA / "nab"
NAB_FILES = 58
GRIDS = ("rows", "timestamps")


@dataclasses.dataclass
class StreamScores:
    """What the agent made of one series: its alarm events and, per row of the input, the
    ensembled score of each class (NaN where the slot was masked or never scored)."""

    alarms: list[AlarmEvent]
    scores: np.ndarray
    counters: dict


def load_onnx(bundle_dir: str | Path) -> tuple:
    """A bundle and its self-tested ONNX Runtime backend (CPU), for ``stream_scores``.

    ONNX Runtime, not the agent's fastest backend, so that evaluations run the graph that
    every bundle has, whatever runtimes the machine has installed.
    """
    from agent.bundle import load_bundle
    from agent.inference import load_backend

    bundle = load_bundle(bundle_dir)
    return bundle, load_backend(bundle, "onnxruntime", strict=True)


def stream_scores(model: tuple, asset: str, ts: np.ndarray, values: np.ndarray,
                  channels: list[str], **overrides) -> StreamScores:
    """Stream a series through the agent's pipeline and read back the ensembled scores.

    ``model`` is ``(bundle, backend)`` (``load_onnx``); ``overrides`` are
    asset settings (``agent.pipeline.AssetSettings`` fields: ``sample_period``,
    ``snapshot_length``, ``hop``, ``threshold``, ...). Rows that share a slot share its
    score; a row whose sample was rejected (late, duplicate) still gets its slot's score.
    """
    bundle, backend = model
    settings = settings_from_bundle(bundle, asset, channels=channels, **overrides)
    asset_pipeline = AssetPipeline(settings, bundle, backend)
    finals = []
    asset_pipeline.on_final = finals.append
    pipeline = Pipeline([asset_pipeline])
    values = np.asarray(values, dtype=np.float64).reshape(len(ts), -1)
    alarms = run_series(pipeline, asset, np.asarray(ts, dtype=np.float64), values, channels)

    n_classes = len(bundle.classes)
    scores = np.full((len(ts), n_classes), np.nan)
    if finals:
        slots = np.concatenate([f.slots for f in finals])
        final = np.concatenate([f.scores for f in finals]).reshape(-1, n_classes)
        masked = np.concatenate([f.masked for f in finals])
        final = np.where(masked[:, None], np.nan, final)
        # A slot finalized twice (after a window restart) keeps its latest score.
        index = {int(slot): k for k, slot in enumerate(slots)}
        row_slots = np.rint(np.asarray(ts, dtype=np.float64) / settings.sample_period)
        rows = [index.get(int(slot), -1) for slot in row_slots]
        found = np.array([k >= 0 for k in rows], bool)
        scores[found] = final[np.array(rows)[found]]
    return StreamScores(alarms, scores, pipeline.counter_totals())


def anomaly_score(scores: np.ndarray) -> np.ndarray:
    """Per row, the largest class score (NaN where every class is NaN), clipped to [0, 1]."""
    best = np.fmax.reduce(np.asarray(scores, dtype=np.float64), axis=1)
    return np.clip(best, 0.0, 1.0)


def stream_times(series: NabSeries, grid: str) -> tuple[np.ndarray, float]:
    """Stream times of a NAB file's rows and the sample period of its grid."""
    period = series.period
    if grid == "rows":
        return series.ts[0] + period * np.arange(len(series.ts)), period
    if grid == "timestamps":
        return nab_stream_ts(series.ts), period
    raise ValueError(f"grid must be one of {GRIDS}, not {grid!r}")


def alarm_onsets(ts: np.ndarray, alarms: list[AlarmEvent]) -> np.ndarray:
    """1.0 at the first row of each alarm (its start), 0.0 elsewhere."""
    onsets = np.zeros(len(ts))
    starts = {event.alarm_id: event.start for event in alarms}
    rows = np.searchsorted(ts, np.array(sorted(starts.values())), side="left")
    onsets[rows[rows < len(ts)]] = 1.0
    return onsets


def score_corpus(model: tuple, corpus: list[NabSeries], grid: str) -> dict:
    """Stream every file on ``grid`` and score the corpus with every NAB profile.

    Two detectors are scored: the per-row anomaly score (threshold swept, and the bundle's
    threshold), and the agent's alarms, each a detection at its first row (``alarms``:
    what an operator is shown).
    """
    bundle = model[0]
    inputs, onset_inputs, files = [], [], []
    for series in corpus:
        ts, period = stream_times(series, grid)
        streamed = stream_scores(model, "nab", ts, series.values[:, None], ["value"],
                                 sample_period=period)
        score = anomaly_score(streamed.scores)
        inputs.append(NabInput.for_series(series, score))
        onset_inputs.append(NabInput.for_series(series, alarm_onsets(ts, streamed.alarms)))
        files.append({"file": series.name, "rows": len(ts), "period": period,
                      "rows_unscored": int(np.isnan(score).sum()),
                      "alarms": len({e.alarm_id for e in streamed.alarms}),
                      "snapshots_scored": streamed.counters.get("snapshots_scored", 0)})
        print(f"NAB {grid}: {series.name}: {files[-1]['alarms']} alarms, "
              f"{files[-1]['rows_unscored']} of {len(ts)} rows unscored", file=sys.stderr)

    profiles = {}
    for profile in NAB_PROFILES:
        swept = score_nab(inputs, profile)
        fixed = score_nab(inputs, profile, threshold=bundle.metadata["threshold"])
        profiles[profile] = {"score": swept.score, "threshold": swept.threshold,
                             "score_at_bundle_threshold": fixed.score}
        if profile == "standard":
            for entry, swept_file, fixed_file in zip(files, swept.files, fixed.files):
                entry.update(windows=swept_file.windows, detected=swept_file.detected,
                             false_positive_rows=swept_file.false_positives,
                             raw=swept_file.raw, detected_at_bundle_threshold=fixed_file.detected,
                             false_positive_rows_at_bundle_threshold=fixed_file.false_positives)
    onsets = score_nab(onset_inputs, "standard", threshold=1.0)
    alarms = {"score": onsets.score, "detected": sum(f.detected for f in onsets.files),
              "windows": sum(f.windows for f in onsets.files),
              "false_positives": sum(f.false_positives for f in onsets.files)}
    return {"grid": grid, "profiles": profiles, "alarms": alarms, "files": files}


def run(bundle_dir: Path, data_dir: Path = DEFAULT_DATA, results: Path | None = None,
        command: str = "", grids: tuple[str, ...] = GRIDS) -> dict:
    """Score the bundle zero-shot on the NAB files in ``data_dir``; write ``results``."""
    started = time.perf_counter()
    model = load_onnx(bundle_dir)
    bundle = model[0]
    corpus = read_nab(data_dir)
    scored = {grid: score_corpus(model, corpus, grid) for grid in grids}
    main = scored[grids[0]]["profiles"]["standard"]
    print(f"NAB standard profile, {grids[0]} grid: {main['score']:.1f} (threshold "
          f"{main['threshold']:.3f}); at the bundle's threshold "
          f"{bundle.metadata['threshold']}: {main['score_at_bundle_threshold']:.1f}",
          file=sys.stderr)

    report = {
        "experiment": "nab-zero-shot",
        "command": command,
        "code_version": code_version(),
        "bundle": str(bundle_dir),
        "model_id": bundle.model_id,
        "backend": "onnxruntime (CPU)",
        "operating_point": {k: bundle.metadata[k] for k in ("snapshot_length", "hop",
                                                            "threshold", "min_duration")},
        "anomaly_score": "max over the classes of the agent's ensembled scores",
        "corpus": {"files": len(corpus), "of": NAB_FILES,
                   "windows": sum(len(s.windows) for s in corpus),
                   "names": [s.name for s in corpus]},
        "grids": scored,
        "scoreboard_standard": NAB_SCOREBOARD_STANDARD,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=2) + "\n")
    return report
