"""The Dodgers experiment: train the U-Net on the first half, evaluate on the second.

Steps: read the series and games; fixed normalization from the training half; random
snapshots of 1,024 to 4,096 samples resampled to 1,024 with their label masks; soft Dice
and Adam; export the bundle; pick the operating point (snapshot length, threshold) on the
training half through the agent's streaming pipeline; score the test half the same way,
game by game, and write ``results/dodgers-unet.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.bundle import load_bundle
from agent.datasets import (DODGERS_PERIOD, Series, dodgers_split, read_dodgers,
                            read_dodgers_events)
from agent.evaluation import EventScore, events_with_data, score_events
from agent.inference import load_backend
from agent.pipeline import AssetPipeline, Pipeline, alarm_spans, run_series, settings_from_bundle
from agent.snapshot import Normalizer
from agent.timeutil import to_iso
from trainer.export import code_version, export_bundle
from trainer.snapshots import event_mask, random_snapshots

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dodgers"
CLASS_NAME = "game_traffic"
SNAPSHOT_LENGTHS = (1024, 2048)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
HOP = 128
MIN_DURATION = 15 * 60.0
SCALE_RANGE = (0.8, 1.25)
JITTER = 0.1


def load(data_dir: Path):
    series = read_dodgers(data_dir / "Dodgers.data")
    events = read_dodgers_events(data_dir / "Dodgers.events")
    split = dodgers_split(series)
    return series, events, split


def halves(series: Series, split: float) -> tuple[Series, Series]:
    cut = int(np.searchsorted(series.ts, split))
    train = Series(series.ts[:cut], series.values[:cut], series.channels, series.period)
    test = Series(series.ts[cut:], series.values[cut:], series.channels, series.period)
    return train, test


def load_model(bundle_dir: Path) -> tuple:
    """A bundle and its self-tested ONNX Runtime backend, loaded once for many evaluations."""
    bundle = load_bundle(bundle_dir)
    return bundle, load_backend(bundle)


def evaluate_stream(model: tuple, series: Series, events, **overrides) -> tuple:
    """Alarms of ``model`` (from ``load_model``) on ``series`` through the agent's pipeline,
    scored by event."""
    bundle, backend = model
    settings = settings_from_bundle(bundle, "dodgers", **overrides)
    pipeline = Pipeline([AssetPipeline(settings, bundle, backend)])
    alarms = run_series(pipeline, "dodgers", series.ts, series.values, series.channels)
    spans = sorted(alarm_spans(alarms).values())
    scored = events_with_data(events, series, series.ts[0], series.ts[-1] + 1)
    return score_events(spans, scored), alarms


def cross_validated_operating_point(data: tuple, epochs: int, snapshots_per_epoch: int,
                                    seed: int, folds: int = 3, augment: bool = False,
                                    train_fn=None) -> dict:
    """Snapshot length and threshold chosen on the training half only, by cross-validation.

    The training half is cut into ``folds`` blocks of time; for each, a model trained on the
    other blocks scores it through the agent's pipeline at every candidate snapshot length
    and threshold. The candidate with the most games detected minus false alarms over the
    folds wins (ties: the threshold nearest 0.5, then the longer snapshot). A model never
    scores data it was trained on, so the choice reflects unseen games; the test half is
    never used. ``train_fn`` (default ``train_model``) trains each fold's model, with
    ``train_model``'s arguments and return value.
    """
    train_fn = train_fn or train_model
    series, events, split, train, test, mask = data
    edges = np.linspace(0, len(train.ts), folds + 1).astype(int)
    totals: dict[tuple[int, float], list[int]] = {}
    for k in range(folds):
        held = slice(edges[k], edges[k + 1])
        blocks = [(train.values[edges[i]:edges[i + 1]], mask[edges[i]:edges[i + 1]])
                  for i in range(folds) if i != k]
        normalizer = _fixed_normalizer(np.concatenate([v for v, _ in blocks]))
        print(f"operating point: fold {k + 1}/{folds}", file=sys.stderr, flush=True)
        model, history = train_fn(blocks, normalizer, epochs, snapshots_per_epoch, seed + k,
                                  augment=augment)
        held_series = Series(train.ts[held], train.values[held], train.channels, train.period)
        with tempfile.TemporaryDirectory() as tmp:
            fold_model = load_model(export_bundle(model, Path(tmp) / "fold", _metadata(
                normalizer, split, seed + k, epochs, snapshots_per_epoch, history[-1], 0.0,
                "cross-validation fold", augment)))
            for length in SNAPSHOT_LENGTHS:
                for threshold in THRESHOLDS:
                    score, _ = evaluate_stream(fold_model, held_series, events,
                                               snapshot_length=length, threshold=threshold)
                    total = totals.setdefault((length, threshold), [0, 0, 0])
                    total[0] += score.detected
                    total[1] += len(score.events)
                    total[2] += len(score.false_alarms)

    trials = [{"snapshot_length": length, "threshold": threshold, "detected": d,
               "events": n, "false_alarms": f}
              for (length, threshold), (d, n, f) in sorted(totals.items())]
    best = max(trials, key=lambda t: (t["detected"] - t["false_alarms"],
                                      -abs(t["threshold"] - 0.5), t["snapshot_length"]))
    return {"snapshot_length": best["snapshot_length"], "threshold": best["threshold"],
            "folds": folds, "trials": trials}


def _fixed_normalizer(values: np.ndarray) -> Normalizer:
    valid = values[np.isfinite(values).all(axis=1)]
    return Normalizer("fixed", center=valid.mean(0), scale=valid.std(0))


def train_model(blocks: list[tuple[np.ndarray, np.ndarray]], normalizer: Normalizer,
                epochs: int, snapshots_per_epoch: int, seed: int, batch_size: int = 32,
                augment: bool = False):
    """Train the U-Net on random snapshots drawn from ``blocks`` of (values, mask), each
    block contributing in proportion to its length (no snapshot spans two blocks)."""
    import keras
    import tensorflow as tf

    from trainer.losses import soft_dice_loss
    from trainer.unet import build_unet

    # Same seed, same machine: same weights.
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(seed)
    model = build_unet(n_channels=1, n_classes=1, activation="sigmoid", name="dodgers_unet")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=soft_dice_loss)
    lengths = np.array([len(values) for values, _ in blocks], dtype=float)
    counts = np.floor(snapshots_per_epoch * lengths / lengths.sum()).astype(int)
    counts[0] += snapshots_per_epoch - counts.sum()
    history = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        parts = [random_snapshots(values, block_mask, count, rng, normalizer,
                                  scale_range=SCALE_RANGE if augment else (1.0, 1.0),
                                  jitter=JITTER if augment else 0.0)
                 for (values, block_mask), count in zip(blocks, counts)]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        result = model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
        loss = float(result.history["loss"][-1])
        history.append(loss)
        print(f"epoch {epoch}/{epochs}: dice loss {loss:.4f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return model, history


def game_table(score: EventScore) -> list[dict]:
    return [
        {"game": r.event.name, "window_start": to_iso(r.event.window_start),
         "window_end": to_iso(r.event.window_end), "detected": r.detected,
         "alarms": [[to_iso(a), to_iso(b)] for a, b in r.alarms]}
        for r in score.events
    ]


def _metadata(normalizer: Normalizer, split: float, seed: int, epochs: int,
              snapshots_per_epoch: int, final_loss: float, seconds: float, command: str,
              augment: bool):
    return {
        "name": "dodgers-unet",
        "architecture": "unet",
        "channels": ["count"],
        "classes": [CLASS_NAME],
        "activation": "sigmoid",
        "normalization": {"mode": "fixed", "center": normalizer.center.tolist(),
                          "scale": normalizer.scale.tolist(), "clip": normalizer.clip},
        "sample_period": DODGERS_PERIOD,
        "snapshot_length": max(SNAPSHOT_LENGTHS),
        "hop": HOP,
        "threshold": 0.5,
        "hysteresis": 0.1,
        "min_duration": MIN_DURATION,
        "training": {
            "data": "UCI Dodgers Loop Sensor (Dodgers.data, Dodgers.events)",
            "split": {"train_until": to_iso(split), "test_from": to_iso(split)},
            "label_window": "[game end - 30 min, game end + 90 min]",
            "seed": seed, "epochs": epochs, "snapshots_per_epoch": snapshots_per_epoch,
            "snapshot_lengths": [1024, 4096],
            "augmentation": ({"scale_range": list(SCALE_RANGE), "jitter": JITTER}
                             if augment else None),
            "loss": "soft dice", "optimizer": "adam 1e-3", "final_loss": final_loss,
            "train_seconds": round(seconds, 1), "command": command,
        },
    }


def train_one(data: tuple, out: Path, epochs: int, snapshots_per_epoch: int, seed: int,
              command: str, operating_point: dict,
              augment: bool = False) -> tuple[dict, EventScore, EventScore]:
    """Train one seed on the whole training half, export its bundle to ``out`` with the
    operating point, and score both halves. Returns the bundle metadata and the scores."""
    series, events, split, train, test, mask = data
    started = time.perf_counter()
    normalizer = _fixed_normalizer(train.values)
    model, history = train_model([(train.values, mask[: len(train.ts)])], normalizer, epochs,
                                 snapshots_per_epoch, seed, augment=augment)
    real = random_snapshots(test.values, mask[len(train.ts):], 4,
                            np.random.default_rng(seed + 1), normalizer)[0]
    metadata = _metadata(normalizer, split, seed, epochs, snapshots_per_epoch, history[-1],
                         time.perf_counter() - started, command, augment)
    metadata["snapshot_length"] = operating_point["snapshot_length"]
    metadata["threshold"] = operating_point["threshold"]
    metadata["training"]["operating_point"] = operating_point
    export_bundle(model, out, metadata, real_inputs=real)

    loaded = load_model(out)
    train_score, _ = evaluate_stream(loaded, train, events)
    test_score, _ = evaluate_stream(loaded, test, events)
    meta = json.loads((out / "bundle.json").read_text())
    print(f"seed {seed}: test {test_score.line()}", file=sys.stderr)
    return meta, train_score, test_score


def run(data_dir: Path, out: Path, results: Path, epochs: int, snapshots_per_epoch: int,
        seed: int, command: str, spread_seeds: tuple[int, ...] = (),
        augment: bool = False) -> dict:
    """Train the shipped seed into ``out``; other seeds only measure the run-to-run spread."""
    started = time.perf_counter()
    version = code_version()  # before this run rewrites the tracked bundle
    series, events, split = load(data_dir)
    train, test = halves(series, split)
    mask = event_mask(series.ts, [(e.window_start, e.window_end) for e in events])
    data = (series, events, split, train, test, mask)
    n_train = len(events_with_data(events, train, train.ts[0], train.ts[-1] + 1))
    print(f"Dodgers: {len(series.ts)} samples, train {len(train.ts)} ({n_train} games with "
          f"data), test {len(test.ts)}", file=sys.stderr)

    point = cross_validated_operating_point(data, epochs, snapshots_per_epoch, seed,
                                            augment=augment)
    print(f"operating point: snapshot {point['snapshot_length']}, threshold "
          f"{point['threshold']}", file=sys.stderr)
    meta, train_score, test_score = train_one(data, out, epochs, snapshots_per_epoch, seed,
                                              command, point, augment)
    spread = [_seed_row(seed, meta, test_score)]
    for other in spread_seeds:
        with tempfile.TemporaryDirectory() as tmp:
            other_meta, _, other_test = train_one(data, Path(tmp) / "bundle", epochs,
                                                  snapshots_per_epoch, other, command, point,
                                                  augment)
        spread.append(_seed_row(other, other_meta, other_test))

    report = {
        "experiment": "dodgers-unet",
        "command": command,
        "code_version": version,
        "seed": seed,
        "split": {"train": [to_iso(train.ts[0]), to_iso(train.ts[-1])],
                  "test": [to_iso(test.ts[0]), to_iso(test.ts[-1])]},
        "model_id": meta["model_id"],
        "operating_point": {k: meta[k] for k in ("snapshot_length", "hop", "threshold",
                                                 "min_duration")},
        "operating_point_cross_validation": point,
        "train": {"detected": train_score.detected, "events": len(train_score.events),
                  "false_alarms": len(train_score.false_alarms)},
        "test": {"detected": test_score.detected, "events": len(test_score.events),
                 "false_alarms": len(test_score.false_alarms),
                 "alarms": test_score.n_alarms,
                 "false_alarm_spans": [[to_iso(a), to_iso(b)]
                                       for a, b in test_score.false_alarms],
                 "games": game_table(test_score)},
        "seeds": spread if spread_seeds else [],
        "paper": {"detected": 36, "events": 39},
        "seconds": round(time.perf_counter() - started, 1),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(test_score.line(), file=sys.stderr)
    return report


def run_cross_validation(data_dir: Path, results: Path, epochs: int,
                         snapshots_per_epoch: int, seed: int, augment: bool,
                         command: str) -> dict:
    """Only the cross-validation on the training half, to compare training recipes."""
    series, events, split = load(data_dir)
    train, test = halves(series, split)
    mask = event_mask(series.ts, [(e.window_start, e.window_end) for e in events])
    point = cross_validated_operating_point((series, events, split, train, test, mask), epochs,
                                            snapshots_per_epoch, seed, augment=augment)
    best = next(t for t in point["trials"] if (t["snapshot_length"], t["threshold"])
                == (point["snapshot_length"], point["threshold"]))
    report = {"experiment": "dodgers-unet-cross-validation", "command": command,
              "code_version": code_version(), "seed": seed, "augment": augment,
              "epochs": epochs, "split": "training half, 3 folds in time", "best": best,
              "merit": best["detected"] - best["false_alarms"], "trials": point["trials"]}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"best: {best}", file=sys.stderr)
    return report


def _seed_row(seed: int, meta: dict, score: EventScore) -> dict:
    return {"seed": seed, "detected": score.detected, "events": len(score.events),
            "false_alarms": len(score.false_alarms), "model_id": meta["model_id"],
            "snapshot_length": meta["snapshot_length"], "threshold": meta["threshold"]}
