"""Fine-tuning a base bundle on a plant's own data: a task YAML in, a bundle and its
evaluation out.

Inputs, named in the task file (paths relative to it; keys in ``docs/transfer.md``):

- CSV files of channels as historians export them: a time column and one column per
  channel (``agent.datasets.read_csv_series``: the delimiter is detected, empty cells are
  missing samples). Several files are one stream, joined in time order (an export split
  by day, say); a gap longer than a snapshot splits it, as it restarts the agent's window.
- A CSV of labelled spans, ``start,end,class`` (ISO times, naive ones read as UTC, or epoch
  seconds; inclusive), one row per labelled anomaly.
- A base bundle with its Keras model (``segwatch-train pretrain`` writes one).

Steps (``run``):

1. read the channels, put them on the asset's grid of ``sample_period`` (as the agent
   does: a sample lands in the slot nearest its time) and mark each slot's classes from
   the spans;
2. split in time: slots before ``split.test_from`` (or before the last
   ``split.test_fraction`` of the rows) train, the rest is the holdout;
3. build the model: one channel, a U-Net (``trainer.transfer.transfer_unet``); several, a
   MU-Net (``transfer_munet``), each from the base's Keras model (strategy ``scratch``:
   not transferred);
4. train on random snapshots of ``snapshot_length`` slots from the training part, drawn
   afresh every epoch, each through the task's augmentations (``trainer.augment``) and the
   agent's own preparation (fill, resample to the model length, normalize);
5. export the bundle with the task's operating point, then stream the holdout through the
   agent's pipeline (ONNX Runtime) and score it: per-class IoU of the slots whose
   ensembled score reaches the threshold, and labelled spans detected by alarms, with
   false alarms; written to ``<out>/evaluation.json``.

Known limitations: no validation split inside the training part (epochs are fixed by the
task); a softmax task scores each class's probability against the threshold like a
sigmoid one, as the agent's alarms do, and points where spans of two classes overlap take
the class listed first.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import glob
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from agent.datasets import Event, read_csv_series
from agent.snapshot import Normalizer, fill_missing, prepare, resample
from agent.timeutil import TimestampError, parse_duration, parse_timestamp, to_iso
from trainer.export import code_version, export_bundle
from trainer.metrics import event_detection, segmentation_iou

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("multipliers", "freeze", "all", "scratch", "munet-stages")
EVALUATION_FILE = "evaluation.json"
_KEYS = {"name", "base", "out", "data", "labels", "classes", "activation", "strategy",
         "augmentations", "augmentation_intensity", "epochs", "snapshots_per_epoch", "batch",
         "lr", "seed", "snapshot_length", "model_length", "normalization", "split", "hop",
         "threshold", "hysteresis", "min_duration", "max_missing"}
_DATA_KEYS = {"files", "time_column", "channels", "sample_period"}


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file, the key and the fix."""


# --- The task file -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """A validated task file; paths are absolute."""

    path: Path
    name: str
    base: Path | None
    out: Path
    files: list[Path]
    time_column: str | None
    channels: list[str] | None
    sample_period: float | None
    labels: Path
    classes: dict[str, str]
    activation: str
    strategy: str | None
    augmentations: list[str]
    augmentation_intensity: float
    epochs: int
    snapshots_per_epoch: int
    batch: int
    lr: float
    seed: int
    snapshot_length: int | None
    model_length: int | None
    normalization: str
    test_from: float | None
    test_fraction: float | None
    hop: int | None
    threshold: float
    hysteresis: float
    min_duration: float
    max_missing: float


def load_task(path: str | Path) -> Task:
    """Read and check a task file; raises ``TaskError`` naming the key and the fix."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file") from None
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: must be a mapping of keys to values")
    check = _Check(path)
    check.no_unknown(raw, "", _KEYS)

    name = check.string(raw.get("name"), "name")
    data = raw.get("data")
    if not isinstance(data, dict):
        check.fail("data", "must be a mapping with 'files' (and optionally 'time_column', "
                   "'channels', 'sample_period')")
    check.no_unknown(data, "data", _DATA_KEYS)
    files = check.files(data.get("files"), "data.files")
    channels = data.get("channels")
    if channels is not None and (not isinstance(channels, list) or not channels
                                 or not all(isinstance(c, str) for c in channels)):
        check.fail("data.channels", "must be a list of column names")
    period = data.get("sample_period")
    period = check.duration(period, "data.sample_period") if period is not None else None

    classes = raw.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        classes = {c: c for c in classes}
    if not isinstance(classes, dict) or not classes:
        check.fail("classes", "must list the class names, or map each class name to its "
                   "anomaly kind (trainer.augment.KINDS), e.g. {valve_fault: level}")
    classes = {str(k): str(v) for k, v in classes.items()}

    split = raw.get("split")
    if not isinstance(split, dict) or len(split) != 1 or \
            next(iter(split)) not in ("test_from", "test_fraction"):
        check.fail("split", "must be {test_from: <time>} or {test_fraction: <0..1>}: the "
                   "holdout is the end of the data in time")
    test_from = test_fraction = None
    if "test_from" in split:
        test_from = check.time(split["test_from"], "split.test_from")
    else:
        test_fraction = check.number(split["test_fraction"], "split.test_fraction", 0.01, 0.9)

    activation = raw.get("activation", "sigmoid")
    if activation not in ("sigmoid", "softmax"):
        check.fail("activation", f"{activation!r} is not allowed; use sigmoid (classes may "
                   "overlap) or softmax (one class per point)")
    strategy = raw.get("strategy")
    if strategy is not None and strategy not in STRATEGIES:
        check.fail("strategy", f"{strategy!r} is not allowed; use one of {', '.join(STRATEGIES)}")
    base = raw.get("base")
    if base is None and strategy != "scratch":
        check.fail("base", "is required (the base bundle folder), unless strategy is scratch")
    augmentations = raw.get("augmentations") or []
    if not isinstance(augmentations, list) or not all(isinstance(a, str) for a in augmentations):
        check.fail("augmentations", "must be a list of names from trainer.augment")

    def optional_int(key, lo):
        return check.integer(raw[key], key, lo) if raw.get(key) is not None else None

    out = raw.get("out")
    return Task(
        path=path, name=name,
        base=check.resolve(base, "base") if base is not None else None,
        out=check.resolve(out, "out") if out is not None else ROOT / "build" / name,
        files=files, time_column=data.get("time_column"), channels=channels,
        sample_period=period, labels=check.resolve(raw.get("labels"), "labels"),
        classes=classes, activation=activation, strategy=strategy,
        augmentations=augmentations,
        augmentation_intensity=check.number(raw.get("augmentation_intensity", 0.5),
                                            "augmentation_intensity", 0.0, 1.0),
        epochs=check.integer(raw.get("epochs", 20), "epochs", 1),
        snapshots_per_epoch=check.integer(raw.get("snapshots_per_epoch", 512),
                                          "snapshots_per_epoch", 1),
        batch=check.integer(raw.get("batch", 16), "batch", 1),
        lr=check.number(raw.get("lr", 1e-3), "lr", 1e-7, 1.0),
        seed=check.integer(raw.get("seed", 1), "seed", 0),
        snapshot_length=optional_int("snapshot_length", 16),
        model_length=optional_int("model_length", 256),
        normalization=check.choice(raw.get("normalization", "snapshot"), "normalization",
                                   ("snapshot", "fixed")),
        test_from=test_from, test_fraction=test_fraction,
        hop=optional_int("hop", 1),
        threshold=check.number(raw.get("threshold", 0.5), "threshold", 0.0, 1.0),
        hysteresis=check.number(raw.get("hysteresis", 0.1), "hysteresis", 0.0, 1.0),
        min_duration=check.duration(raw.get("min_duration", 0), "min_duration"),
        max_missing=check.number(raw.get("max_missing", 0.5), "max_missing", 0.0, 1.0),
    )


class _Check:
    """Typed getters that raise TaskError naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise TaskError(f"{self.path}: key '{key}': {message}")

    def no_unknown(self, raw: dict, key: str, allowed: set[str]) -> None:
        unknown = sorted(set(map(str, raw)) - allowed)
        if unknown:
            where = f"{key}.{unknown[0]}" if key else unknown[0]
            self.fail(where, f"unknown key; allowed here: {', '.join(sorted(allowed))}")

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, "must be a non-empty string")
        return value

    def integer(self, value: Any, key: str, lo: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            self.fail(key, f"must be an integer of at least {lo}, not {value!r}")
        return value

    def number(self, value: Any, key: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not lo <= value <= hi:
            self.fail(key, f"must be a number from {lo} to {hi}, not {value!r}")
        return float(value)

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            self.fail(key, f"{value!r} is not allowed; use one of: {', '.join(allowed)}")
        return value

    def duration(self, value: Any, key: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
        if seconds < 0:
            self.fail(key, "must not be negative")
        return seconds

    def time(self, value: Any, key: str) -> float:
        try:
            return parse_time(value)
        except ValueError as exc:
            self.fail(key, str(exc))

    def resolve(self, value: Any, key: str) -> Path:
        path = Path(self.string(value, key)).expanduser()
        return path if path.is_absolute() else (self.path.parent / path).resolve()

    def files(self, value: Any, key: str) -> list[Path]:
        patterns = [value] if isinstance(value, str) else value
        if not isinstance(patterns, list) or not patterns:
            self.fail(key, "must be a CSV file or a list of them (glob patterns allowed)")
        found: list[Path] = []
        for pattern in patterns:
            full = self.resolve(pattern, key)
            matches = sorted(Path(p) for p in glob.glob(str(full)))
            if not matches:
                self.fail(key, f"{pattern!r} matches no file (looked for {full})")
            found += matches
        return found


def parse_time(value: Any) -> float:
    """UTC epoch seconds from epoch seconds, ISO 8601 (naive: UTC) or a YAML datetime."""
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return stamp.timestamp()
    if isinstance(value, str):
        try:
            return parse_timestamp(float(value))
        except ValueError:
            pass
        try:
            return parse_timestamp(value)
        except TimestampError:
            try:
                stamp = dt.datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError(f"cannot read the time {value!r}; use ISO 8601 "
                                 "(2024-05-01 12:00:00, naive times are UTC) or epoch "
                                 "seconds") from None
            return stamp.replace(tzinfo=dt.timezone.utc).timestamp()
    try:
        return parse_timestamp(value)
    except TimestampError as exc:
        raise ValueError(str(exc)) from None


# --- Data --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Span:
    start: float
    end: float
    cls: str


def read_spans(path: Path, classes: list[str]) -> list[Span]:
    """The labelled spans of a ``start,end,class`` CSV (header required)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise TaskError(f"{path}: the labels file does not exist") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if header[:3] != ["start", "end", "class"]:
        raise TaskError(f"{path}: expected the header start,end,class, got {','.join(header)}")
    spans = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        try:
            start, end = parse_time(row[0].strip()), parse_time(row[1].strip())
        except (ValueError, IndexError) as exc:
            raise TaskError(f"{path}:{number}: {exc}") from None
        cls = row[2].strip() if len(row) > 2 else ""
        if cls not in classes:
            raise TaskError(f"{path}:{number}: class {cls!r} is not one of the task's classes "
                            f"{classes}; add it to 'classes' or fix the row")
        if end < start:
            raise TaskError(f"{path}:{number}: the span ends before it starts")
        spans.append(Span(start, end, cls))
    if not spans:
        raise TaskError(f"{path}: no labelled spans")
    return spans


def span_mask(ts: np.ndarray, spans: list[Span], classes: list[str]) -> np.ndarray:
    """(n, classes) 0/1: a time is marked for a class when a span of that class covers it."""
    mask = np.zeros((len(ts), len(classes)), np.float32)
    for span in spans:
        mask[(ts >= span.start) & (ts <= span.end), classes.index(span.cls)] = 1.0
    return mask


@dataclasses.dataclass(frozen=True)
class Stream:
    """The task's rows: ``ts`` (n,) rising, ``values`` (n, channels) with NaN gaps."""

    ts: np.ndarray
    values: np.ndarray
    channels: list[str]

    def part(self, keep: np.ndarray) -> "Stream":
        return Stream(self.ts[keep], self.values[keep], self.channels)


def read_stream(task: Task) -> Stream:
    """Every CSV of the task joined in time order, with the task's channels."""
    parts = []
    for path in task.files:
        try:
            series = read_csv_series(path, task.time_column)
        except ValueError as exc:
            raise TaskError(str(exc)) from None
        wanted = task.channels or series.channels
        missing = [c for c in wanted if c not in series.channels]
        if missing:
            raise TaskError(f"{path}: no column {missing[0]!r} (data.channels); columns: "
                            f"{', '.join(series.channels)}")
        index = [series.channels.index(c) for c in wanted]
        parts.append((series.ts, series.values[:, index], wanted))
    channels = parts[0][2]
    ts = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    keep = np.concatenate([[True], np.diff(ts) > 0])  # one row per time (the first)
    return Stream(ts[keep], values[keep], channels)


def on_grid(stream: Stream, period: float, max_gap: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments of the stream on its grid: (slot times, values with NaN where missing).

    A sample lands in the slot nearest its time (the first sample of a slot wins); a gap of
    more than ``max_gap`` slots starts a new segment.
    """
    slots = np.rint(stream.ts / period).astype(np.int64)
    keep = np.concatenate([[True], np.diff(slots) > 0])
    slots, values = slots[keep], stream.values[keep]
    breaks = np.flatnonzero(np.diff(slots) > max_gap) + 1
    segments = []
    for rows in np.split(np.arange(len(slots)), breaks):
        first, last = slots[rows[0]], slots[rows[-1]]
        grid = np.full((last - first + 1, values.shape[1]), np.nan)
        grid[slots[rows] - first] = values[rows]
        segments.append(((first + np.arange(last - first + 1)) * period, grid))
    return segments


def split_time(task: Task, stream: Stream) -> float:
    """The time where the holdout starts."""
    if task.test_from is not None:
        return task.test_from
    return float(stream.ts[int(round((1.0 - task.test_fraction) * (len(stream.ts) - 1)))])


def normalizer_for(task: Task, values: np.ndarray) -> Normalizer:
    if task.normalization == "snapshot":
        return Normalizer("snapshot")
    center = np.nanmean(values, axis=0)
    scale = np.nanstd(values, axis=0)
    if not (np.isfinite(center).all() and np.isfinite(scale).all()):
        raise TaskError(f"{task.path}: a channel has no valid sample in the training part; "
                        "fixed normalization cannot scale it")
    return Normalizer("fixed", center=center, scale=np.maximum(scale, 1e-6))


def training_batches(segments, masks, task: Task, snapshot_length: int, model_length: int,
                     normalizer: Normalizer, augmenter, rng: np.random.Generator):
    """An endless stream of (x, y) batches of random training snapshots."""
    room = np.array([max(0, len(values) - snapshot_length + 1) for _, values in segments])
    weights = room / room.sum()
    while True:
        xs, ys = [], []
        while len(xs) < task.batch:
            k = int(rng.choice(len(segments), p=weights))
            start = int(rng.integers(room[k]))
            raw = segments[k][1][start:start + snapshot_length]
            if np.isnan(raw).mean() > task.max_missing:
                continue
            raw = fill_missing(raw)
            mask = masks[k][start:start + snapshot_length].astype(np.float64)
            if augmenter is not None:
                raw, mask = augmenter(raw, mask, rng=rng)
            xs.append(prepare(raw, model_length, normalizer))
            ys.append(resample(mask, model_length) >= 0.5)
        y = np.stack(ys).astype(np.float32)
        if task.activation == "softmax":
            y = _single_label(y)
        yield np.stack(xs), y


def _single_label(y: np.ndarray) -> np.ndarray:
    """Multi-label masks (..., M) to one-hot (..., M + 1), background first; the first
    class listed wins where spans overlap."""
    first = np.where(y.any(-1), np.argmax(y, -1) + 1, 0)
    return np.eye(y.shape[-1] + 1, dtype=np.float32)[first]


# --- Model -------------------------------------------------------------------------------


def build_model(task: Task, n_channels: int, model_length: int):
    """(model, base model id or None): transferred from the base, or fresh for scratch."""
    import keras

    from trainer.transfer import transfer_munet, transfer_unet
    from trainer.unet import build_munet, build_unet

    keras.utils.set_random_seed(task.seed)
    n_classes = len(task.classes)
    if task.strategy == "scratch":
        build = build_unet if n_channels == 1 else build_munet
        return build(n_channels, n_classes, task.activation, model_length), None

    from agent.bundle import load_bundle
    from trainer.pretrain import load_keras

    base = load_keras(task.base)
    base_id = load_bundle(task.base).model_id
    if n_channels == 1:
        return transfer_unet(base, n_classes, task.activation, model_length=model_length,
                             name="unet_finetuned"), base_id
    return transfer_munet(base, n_channels, n_classes, task.activation,
                          model_length=model_length, name="munet_finetuned"), base_id


def base_model_length(task: Task) -> int:
    if task.model_length:
        return task.model_length
    if task.base is None:
        return 1024
    from agent.bundle import load_bundle

    return load_bundle(task.base).model_length


# --- Run ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The task's rows, its grid and its split: what training and evaluation read."""

    stream: Stream
    period: float
    model_length: int
    snapshot_length: int
    hop: int
    spans: list[Span]
    cut: float
    train: Stream
    test: Stream
    segments: list[tuple[np.ndarray, np.ndarray]]  # training part on the grid
    masks: list[np.ndarray]  # their classes, slot by slot


def prepare_data(task: Task) -> TaskData:
    """Read the channels and spans, put the training part on the grid, split in time."""
    classes = list(task.classes)
    stream = read_stream(task)
    period = task.sample_period or float(np.median(np.diff(stream.ts)))
    model_length = base_model_length(task)
    snapshot_length = task.snapshot_length or model_length
    spans = read_spans(task.labels, classes)
    cut = split_time(task, stream)
    train, test = stream.part(stream.ts < cut), stream.part(stream.ts >= cut)
    if len(train.ts) < snapshot_length or len(test.ts) == 0:
        raise TaskError(f"{task.path}: the split at {to_iso(cut)} leaves {len(train.ts)} "
                        f"training rows and {len(test.ts)} holdout rows; training needs at "
                        f"least a snapshot ({snapshot_length}) and the holdout some rows")
    segments = [s for s in on_grid(train, period, snapshot_length)
                if len(s[0]) >= snapshot_length]
    if not segments:
        raise TaskError(f"{task.path}: no stretch of the training part without a gap is as "
                        f"long as a snapshot ({snapshot_length} samples of {period:g} s)")
    masks = [span_mask(slot_ts, spans, classes) for slot_ts, _ in segments]
    for cls, count in zip(classes, np.concatenate(masks).sum(0)):
        if count == 0:
            log.warning("class %s has no labelled slot in the training part", cls)
    return TaskData(stream, period, model_length, snapshot_length,
                    task.hop or max(1, snapshot_length // 4), spans, cut, train, test,
                    segments, masks)


def run(config: str | Path, command: str = "", out: Path | None = None, tflite: bool = True,
        run_eagerly: bool = False) -> dict:
    """Fine-tune as the task file says; export ``<out>`` and ``<out>/evaluation.json``.

    ``tflite=False`` leaves the LiteRT file out of the bundle; ``run_eagerly`` skips
    compiling the training steps (both for runs of a few batches, as in the tests)."""
    from trainer.augment import make_augmenter
    from trainer.transfer import fine_tune

    started = time.perf_counter()
    task = load_task(config)
    out = Path(out) if out is not None else task.out
    try:
        augmenter = (make_augmenter(task.augmentations, task.classes, task.seed,
                                    intensity=task.augmentation_intensity)
                     if task.augmentations else None)
    except ValueError as exc:
        raise TaskError(f"{task.path}: key 'augmentations': {exc}") from None
    data = prepare_data(task)
    n_channels = len(data.stream.channels)
    print(f"finetune {task.name}: {n_channels} channels, {len(data.train.ts)} training rows "
          f"({len(data.segments)} segments), {len(data.test.ts)} holdout rows from "
          f"{to_iso(data.cut)}", file=sys.stderr)

    # Model and training on fresh random snapshots every epoch.
    normalizer = normalizer_for(task, np.concatenate([v for _, v in data.segments]))
    model, base_id = build_model(task, n_channels, data.model_length)
    strategy = task.strategy or ("multipliers" if n_channels == 1 else "munet-stages")
    batches = training_batches(data.segments, data.masks, task, data.snapshot_length,
                               data.model_length, normalizer, augmenter,
                               np.random.default_rng(task.seed))
    history = fine_tune(model, batches, task.epochs, strategy, lr=task.lr, seed=task.seed,
                        batch_size=task.batch,
                        steps_per_epoch=max(1, task.snapshots_per_epoch // task.batch),
                        run_eagerly=run_eagerly)

    # Export with the task's operating point; evaluate the holdout through the agent, with
    # a snapshot's worth of rows before it to fill the agent's window.
    export_bundle(model, out, _metadata(task, data, normalizer, strategy, base_id, history,
                                        command), tflite=tflite)
    context = data.stream.part(data.stream.ts >= data.cut - data.snapshot_length * data.period)
    evaluation = evaluate(out, context, data.cut, data.spans, list(task.classes))
    evaluation.update(task=str(task.path), command=command, code_version=code_version(),
                      split={"test_from": to_iso(data.cut), "train_rows": len(data.train.ts),
                             "holdout_rows": len(data.test.ts)},
                      training={"strategy": strategy, "epochs": task.epochs,
                                "loss": history["loss"],
                                "seconds": round(history["total_seconds"], 1)},
                      seconds=round(time.perf_counter() - started, 1))
    (out / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    print(f"finetune {task.name}: holdout IoU {evaluation['iou']['mean']:.4f}, "
          f"{evaluation['events']['line']}; bundle {out}", file=sys.stderr)
    return evaluation


def _metadata(task: Task, data: TaskData, normalizer: Normalizer, strategy: str,
              base_id: str | None, history: dict, command: str) -> dict:
    channels = data.stream.channels
    normalization = {"mode": normalizer.mode, "clip": normalizer.clip}
    if normalizer.mode == "fixed":
        normalization.update(center=normalizer.center.tolist(), scale=normalizer.scale.tolist())
    return {
        "name": task.name,
        "architecture": "unet" if len(channels) == 1 else "munet",
        "channels": list(channels),
        "classes": list(task.classes),
        "activation": task.activation,
        "normalization": normalization,
        "sample_period": data.period,
        "snapshot_length": data.snapshot_length,
        "hop": data.hop,
        "threshold": task.threshold,
        "hysteresis": task.hysteresis,
        "min_duration": task.min_duration,
        "training": {
            "task": str(task.path),
            "base_model_id": base_id,
            "data": [str(p) for p in task.files],
            "labels": str(task.labels),
            "class_kinds": task.classes,
            "split": {"train_until": to_iso(data.cut), "test_from": to_iso(data.cut)},
            "strategy": strategy,
            "augmentations": task.augmentations,
            "epochs": task.epochs,
            "snapshots_per_epoch": task.snapshots_per_epoch,
            "batch": task.batch,
            "lr": task.lr,
            "seed": task.seed,
            "loss": "soft dice" if task.activation == "sigmoid" else "cross-entropy + dice",
            "final_loss": history["loss"][-1],
            "train_seconds": round(history["total_seconds"], 1),
            "command": command,
        },
    }


def evaluate(bundle_dir: Path, stream: Stream, cut: float, spans: list[Span],
             classes: list[str]) -> dict:
    """Stream ``stream`` through the agent with the bundle's settings; score the rows from
    ``cut`` on (the rows before it only fill the agent's window, as on a running agent)."""
    from trainer.nab import load_onnx, stream_scores

    model = load_onnx(bundle_dir)
    bundle = model[0]
    streamed = stream_scores(model, "holdout", stream.ts, stream.values, stream.channels)
    holdout = stream.ts >= cut
    ts, scores = stream.ts[holdout], streamed.scores[holdout]
    threshold = float(bundle.metadata["threshold"])
    truth = span_mask(ts, spans, classes)
    detected = np.nan_to_num(scores, nan=0.0) >= threshold
    iou = segmentation_iou(truth, detected.astype(np.float32), "sigmoid", 0.5, classes)

    lo, hi = ts[0], ts[-1]
    alarms = {}
    for event in streamed.alarms:
        if event.end >= cut:
            alarms[event.alarm_id] = (event.class_name, event.start, event.end)
    per_class = {}
    for cls in classes:
        events = [Event(f"{cls} {to_iso(s.start)}", s.start, s.end, s.start, s.end)
                  for s in spans if s.cls == cls and s.end >= lo and s.start <= hi]
        found = [(a, b) for c, a, b in alarms.values() if c == cls]
        counts = event_detection([found], [events])
        per_class[cls] = dataclasses.asdict(counts)
    total = {key: sum(c[key] for c in per_class.values())
             for key in ("events", "detected", "alarms", "false_alarms")}
    line = (f"detected {total['detected']} of {total['events']} labelled spans, "
            f"{total['false_alarms']} false alarms of {total['alarms']} alarms")
    return {
        "model_id": bundle.model_id,
        "backend": "onnxruntime (CPU)",
        "operating_point": {k: bundle.metadata[k] for k in ("snapshot_length", "hop",
                                                            "threshold", "min_duration")},
        "iou": {"per_class": iou.as_dict(), "mean": iou.mean,
                "how": "holdout slots whose ensembled score reaches the threshold, "
                       "through the agent's pipeline"},
        "events": {"per_class": per_class, **total, "line": line},
        "rows_unscored": int(np.isnan(scores).all(axis=1).sum()),
    }
