"""The Dodgers experiment with transfer: the base U-Net fine-tuned on the training half.

Everything but the model's start is the scratch experiment's (``trainer.dodgers``): the same
split, label windows, fixed normalization from the training half, random snapshots of 1,024
to 4,096 samples resampled to 1,024, augmentation, epochs and snapshots, the same 3-fold
cross-validation on the training half for the operating point (snapshot length and
threshold), and the same scoring of the test half through the agent's streaming pipeline,
game by game. The model is ``trainer.transfer.transfer_unet`` of the base bundle's Keras
model (every section but the output copied, a fresh one-class sigmoid output), trained with
``trainer.transfer.fine_tune`` and one of the paper's U-Net strategies:

- ``freeze`` (default): sections ``enc1`` and ``enc2`` frozen for the first half of the
  epochs, then everything trains;
- ``multipliers``: learning rates 0.01 (``enc1``) to 1.0 (``out``) times the base rate.

Soft Dice and Adam at 1e-3 as the scratch run. Writes ``results/dodgers-transfer.json``,
with the scratch run's test figures (``results/dodgers-unet.json``) beside it.

Known limitations: the base model was pretrained on per-snapshot normalized synthetic
series; here, as for the scratch run, inputs are normalized with the training half's fixed
scale, so the transferred features see a similar range but not the same scaling.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.evaluation import EventScore, events_with_data
from agent.snapshot import Normalizer
from agent.timeutil import to_iso
from trainer import dodgers
from trainer.export import code_version, export_bundle, repo_relative
from trainer.snapshots import event_mask, random_snapshots

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = ROOT / "models" / "base-unet"
DEFAULT_RESULTS = ROOT / "results" / "dodgers-transfer.json"
SCRATCH_RESULTS = ROOT / "results" / "dodgers-unet.json"
STRATEGIES = ("freeze", "multipliers")
LEARNING_RATE = 1e-3
BATCH = 32


def snapshot_batches(blocks: Sequence[tuple[np.ndarray, np.ndarray]], normalizer: Normalizer,
                     batch: int, seed: int, augment: bool):
    """Endless batches of random snapshots from ``blocks`` of (values, mask), each block
    drawn in proportion to its length (no snapshot spans two blocks), as the scratch run."""
    rng = np.random.default_rng([seed, 5])
    lengths = np.array([len(values) for values, _ in blocks], dtype=float)
    scale = dodgers.SCALE_RANGE if augment else (1.0, 1.0)
    jitter = dodgers.JITTER if augment else 0.0
    while True:
        counts = rng.multinomial(batch, lengths / lengths.sum())
        parts = [random_snapshots(values, mask, int(count), rng, normalizer,
                                  scale_range=scale, jitter=jitter)
                 for (values, mask), count in zip(blocks, counts) if count]
        yield np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def make_trainer(base, strategy: str):
    """A ``train_fn`` for ``dodgers.cross_validated_operating_point``: the base transferred
    and fine-tuned with ``strategy``; returns (model, loss per epoch)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")

    def train(blocks, normalizer: Normalizer, epochs: int, snapshots_per_epoch: int, seed: int,
              batch_size: int = BATCH, augment: bool = False):
        import keras

        from trainer.transfer import fine_tune, transfer_unet

        keras.utils.set_random_seed(seed)
        model = transfer_unet(base, 1, "sigmoid", name="dodgers_unet_transfer")
        history = fine_tune(model, snapshot_batches(blocks, normalizer, batch_size, seed,
                                                    augment),
                            epochs, strategy, lr=LEARNING_RATE, seed=seed, batch_size=batch_size,
                            steps_per_epoch=max(1, snapshots_per_epoch // batch_size),
                            on_epoch_end=_progress(epochs))
        return model, history["loss"]

    return train


def _progress(epochs: int):
    def report(epoch: int, history: dict) -> None:
        print(f"epoch {epoch}/{epochs}: dice loss {history['loss'][-1]:.4f} "
              f"({history['seconds'][-1]:.0f} s)", file=sys.stderr, flush=True)

    return report


def train_one(data: tuple, train_fn, out: Path, epochs: int, snapshots_per_epoch: int,
              seed: int, command: str, operating_point: dict, augment: bool, strategy: str,
              base_id: str) -> tuple[dict, EventScore]:
    """Fine-tune one seed on the whole training half, export it, score the test half."""
    series, events, split, train, test, mask = data
    started = time.perf_counter()
    normalizer = dodgers._fixed_normalizer(train.values)
    model, losses = train_fn([(train.values, mask[:len(train.ts)])], normalizer, epochs,
                             snapshots_per_epoch, seed, augment=augment)
    real = random_snapshots(test.values, mask[len(train.ts):], 4,
                            np.random.default_rng(seed + 1), normalizer)[0]
    meta = dodgers._metadata(normalizer, split, seed, epochs, snapshots_per_epoch, losses[-1],
                             time.perf_counter() - started, command, augment)
    meta["name"] = "dodgers-unet-transfer"
    meta["snapshot_length"] = operating_point["snapshot_length"]
    meta["threshold"] = operating_point["threshold"]
    meta["training"].update(operating_point=operating_point, strategy=strategy,
                            base_model_id=base_id)
    export_bundle(model, out, meta, real_inputs=real, tflite=False)
    test_score, _ = dodgers.evaluate_stream(dodgers.load_model(out), test, events)
    meta = json.loads((out / "bundle.json").read_text())
    print(f"seed {seed}: test {test_score.line()}", file=sys.stderr, flush=True)
    return meta, test_score


def run(data_dir: Path, base_dir: Path, results: Path, epochs: int, snapshots_per_epoch: int,
        seeds: Sequence[int], strategy: str, command: str, augment: bool = True,
        out: Path | None = None, operating_point: dict | None = None) -> dict:
    """Cross-validate the operating point (unless given), then fine-tune and score each seed.

    The first seed's bundle goes to ``out`` when given (else a temporary folder).
    """
    from agent.bundle import load_bundle
    from trainer.pretrain import load_keras

    started = time.perf_counter()
    version = code_version()
    base = load_keras(base_dir)
    base_id = load_bundle(base_dir).model_id
    train_fn = make_trainer(base, strategy)

    series, events, split = dodgers.load(data_dir)
    train, test = dodgers.halves(series, split)
    mask = event_mask(series.ts, [(e.window_start, e.window_end) for e in events])
    data = (series, events, split, train, test, mask)
    n_train = len(events_with_data(events, train, train.ts[0], train.ts[-1] + 1))
    print(f"Dodgers transfer ({strategy}) from {base_id}: train {len(train.ts)} samples "
          f"({n_train} games with data), test {len(test.ts)}", file=sys.stderr, flush=True)

    if operating_point is None:
        operating_point = dodgers.cross_validated_operating_point(
            data, epochs, snapshots_per_epoch, seeds[0], augment=augment, train_fn=train_fn)
    print(f"operating point: snapshot {operating_point['snapshot_length']}, threshold "
          f"{operating_point['threshold']}", file=sys.stderr, flush=True)

    rows, first = [], None
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            target = out if (out is not None and seed == seeds[0]) else Path(tmp) / "bundle"
            meta, score = train_one(data, train_fn, target, epochs, snapshots_per_epoch, seed,
                                    command, operating_point, augment, strategy, base_id)
        rows.append(_seed_row(seed, meta, score))
        if first is None:
            first = (meta, score)

    meta, score = first
    report = {
        "experiment": "dodgers-transfer",
        "command": command,
        "code_version": version,
        "seed": seeds[0],
        "strategy": strategy,
        "base": {"bundle": repo_relative(base_dir), "model_id": base_id},
        "split": {"train": [to_iso(train.ts[0]), to_iso(train.ts[-1])],
                  "test": [to_iso(test.ts[0]), to_iso(test.ts[-1])]},
        "training": {"epochs": epochs, "snapshots_per_epoch": snapshots_per_epoch,
                     "batch": BATCH, "augment": augment, "lr": LEARNING_RATE,
                     "loss": "soft dice"},
        "model_id": meta["model_id"],
        "operating_point": {k: meta[k] for k in ("snapshot_length", "hop", "threshold",
                                                 "min_duration")},
        "operating_point_cross_validation": operating_point,
        "test": {"detected": score.detected, "events": len(score.events),
                 "false_alarms": len(score.false_alarms), "alarms": score.n_alarms,
                 "false_alarm_spans": [[to_iso(a), to_iso(b)] for a, b in score.false_alarms],
                 "games": dodgers.game_table(score)},
        "seeds": rows,
        "spread": _spread(rows),
        "scratch": _scratch(SCRATCH_RESULTS),
        "paper": {"detected": 36, "events": 39},
        "seconds": round(time.perf_counter() - started, 1),
    }
    report["notes"] = notes(report)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _seed_row(seed: int, meta: dict, score: EventScore) -> dict:
    return {"seed": seed, "detected": score.detected, "events": len(score.events),
            "false_alarms": len(score.false_alarms), "model_id": meta["model_id"]}


def _spread(rows: list[dict]) -> dict:
    detected = np.array([r["detected"] for r in rows], float)
    false = np.array([r["false_alarms"] for r in rows], float)
    return {"detected_mean": float(detected.mean()), "detected_range": [int(detected.min()),
                                                                        int(detected.max())],
            "false_alarms_mean": float(false.mean()),
            "false_alarms_range": [int(false.min()), int(false.max())]}


def _scratch(path: Path) -> dict | None:
    """The scratch run's test figures, from its results file (None if it is missing)."""
    if not path.is_file():
        return None
    scratch = json.loads(path.read_text())
    rows = scratch.get("seeds") or [{"seed": scratch["seed"], **scratch["test"]}]
    return {"results": repo_relative(path), "command": scratch["command"],
            "code_version": scratch["code_version"], "model_id": scratch["model_id"],
            "operating_point": scratch["operating_point"],
            "test": {k: scratch["test"][k] for k in ("detected", "events", "false_alarms")},
            "seeds": [{k: r[k] for k in ("seed", "detected", "events", "false_alarms")}
                      for r in rows],
            "spread": _spread(rows)}


def notes(report: dict) -> list[str]:
    lines = []
    spread, paper = report["spread"], report["paper"]
    events = report["seeds"][0]["events"]
    if spread["detected_mean"] < paper["detected"] * events / paper["events"]:
        lines.append(f"transfer detects {spread['detected_mean']:.1f} of {events} test games "
                     f"on average over {len(report['seeds'])} seeds, below the paper's "
                     f"{paper['detected']} of {paper['events']}")
    scratch = report.get("scratch")
    if scratch:
        delta = spread["detected_mean"] - scratch["spread"]["detected_mean"]
        false = spread["false_alarms_mean"] - scratch["spread"]["false_alarms_mean"]
        lines.append(f"transfer minus scratch, mean over seeds: {delta:+.1f} games detected, "
                     f"{false:+.1f} false alarms")
    return lines
