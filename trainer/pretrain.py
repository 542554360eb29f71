"""Pretraining of the base U-Net on the streaming synthetic set, and the base model bundle.

``run`` trains a U-Net for the three synthetic classes (``outlier``, ``volatility``,
``cycle``; sigmoid outputs; soft Dice plus cross-entropy, ``dice_bce_loss``) on series
streamed from ``trainer.synthetic.dataset``: ``series`` series in all, each seen once, in
``epochs`` equal parts. It then

1. picks the bundle's threshold on a validation set of synthetic series (its own seed): the
   threshold of ``THRESHOLDS`` with the best mean IoU over the classes;
2. scores the per-class IoU on a held-out test set (``TEST_SEED``, fixed, never trained on);
3. exports the bundle (``normalization.mode: snapshot``, as the generator prepares its
   series) and, next to it, the Keras model (``keras/model.keras``) that transfer learning
   starts from;
4. writes ``results/pretrain.json`` and a figure of held-out snapshots.

The bundle is deployable as it is, on any univariate stream. Its operating point, for a
generic stream whose time scales are unknown:

- ``snapshot_length`` 1,024 samples: the model length, so no resampling; the classes' time
  scales are then those the model was trained on (outliers of 1 to 3 samples, volatility
  changes of 30 to 200, cycle violations of 2 to 4 cycles of 40 to 250 samples);
- ``hop`` 256: every sample is scored by four snapshots, whose mean is the ensembled score;
- ``threshold``: chosen on the validation set as above;
- ``min_duration`` 0: an outlier lasts one to three samples, and any on-delay would drop it.

An asset's configuration overrides each of them (and sets its own ``sample_period``).

Known limitations: the model learns what the generator makes, nothing physical; the
shipped run is sized for a 2-core CPU (see ``docs/transfer.md``) and a larger ``series``
(a GPU) gives a better model with the same command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.export import code_version, export_bundle, repo_relative
from trainer.metrics import segmentation_iou
from trainer.synthetic import CLASSES, MODEL_LENGTH, batch_seed, dataset, make_batch

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "base-unet"
DEFAULT_RESULTS = ROOT / "results" / "pretrain.json"
DEFAULT_FIGURE = ROOT / "docs" / "figures" / "pretrain-heldout.png"
KERAS_FILE = "keras/model.keras"
VERSION = 1

# Stream seeds: training uses the run's seed; validation and test have their own, far from
# any seed a user would pass, so that no series is both trained on and scored.
VALIDATION_SEED = 2 ** 31 - 2
TEST_SEED = 2 ** 31 - 1
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
HOP_FRACTION = 4  # hop = snapshot_length / 4
LEARNING_RATE = 1e-3


def dice_bce_loss(y_true, y_pred):
    """Soft Dice (``trainer.losses.soft_dice_loss``) plus binary cross-entropy, per snapshot.

    Dice alone lets an output unit that saturates early stay saturated (its gradient
    vanishes with the sigmoid's); the cross-entropy term keeps a gradient there. Dice keeps
    the short outliers, a few points of 1,024, from being drowned by the background.
    """
    import keras
    from keras import ops

    from trainer.losses import soft_dice_loss

    y_true = ops.cast(y_true, y_pred.dtype)
    cross_entropy = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=1)
    return soft_dice_loss(y_true, y_pred) + cross_entropy


def synthetic_set(seed: int, n: int, length: int = MODEL_LENGTH, batch: int = 256,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic series (x, y) of the stream ``seed``, made batch by batch."""
    parts = [make_batch(batch_seed(seed, i), min(batch, n - lo), length)
             for i, lo in enumerate(range(0, n, batch))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def train_base(series: int, epochs: int, batch: int, seed: int, length: int = MODEL_LENGTH,
               validation: tuple[np.ndarray, np.ndarray] | None = None, lr: float = LEARNING_RATE,
               run_eagerly: bool = False):
    """A U-Net trained on ``series`` streamed synthetic series; returns (model, history).

    The stream is ``trainer.synthetic.dataset(seed, batch, length)``; an epoch is
    ``series // (epochs * batch)`` batches (at least one) of it, so every series is new.
    The learning rate is constant: a tenth of it for the last 30 % of the epochs gave a
    worse model at the shipped size (held-out ``cycle`` IoU 47.7 % instead of 53.1 %),
    which was still learning fast when the run ended.
    """
    import keras

    from trainer.transfer import fine_tune
    from trainer.unet import build_unet

    steps = max(1, series // (epochs * batch))
    keras.utils.set_random_seed(seed)
    model = build_unet(1, len(CLASSES), "sigmoid", length, name="base_unet")
    history = fine_tune(model, dataset(seed, batch, length), epochs, "scratch", lr=lr,
                        val_data=validation, loss=dice_bce_loss, seed=seed, batch_size=batch,
                        steps_per_epoch=steps, run_eagerly=run_eagerly,
                        on_epoch_end=_progress("pretrain", epochs))
    history["series_seen"] = steps * epochs * batch
    history["steps_per_epoch"] = steps
    return model, history


def _progress(what: str, epochs: int):
    """An ``on_epoch_end`` callback that prints one line per epoch (long runs on a CPU)."""
    def report(epoch: int, history: dict) -> None:
        val = f", val {history['val_loss'][-1]:.4f}" if "val_loss" in history else ""
        print(f"{what} epoch {epoch}/{epochs}: loss {history['loss'][-1]:.4f}{val} "
              f"({history['seconds'][-1]:.0f} s)", file=sys.stderr, flush=True)

    return report


def predict(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return model.predict(x, batch_size=batch, verbose=0)


def choose_threshold(y_true: np.ndarray, y_pred: np.ndarray,
                     thresholds=THRESHOLDS) -> tuple[float, list[dict]]:
    """The threshold with the best mean IoU over the classes (ties: nearest 0.5)."""
    trials = []
    for threshold in thresholds:
        score = segmentation_iou(y_true, y_pred, "sigmoid", threshold, CLASSES)
        trials.append({"threshold": threshold, "mean_iou": score.mean,
                       "per_class": score.as_dict()})
    best = max(trials, key=lambda t: (t["mean_iou"], -abs(t["threshold"] - 0.5)))
    return best["threshold"], trials


def save_keras(model, path: Path) -> str:
    """Save the Keras model (no optimizer state) and return the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path, include_optimizer=False)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_keras(bundle_dir: str | Path):
    """The Keras model saved next to a base bundle (``keras/model.keras``), for transfer.

    Checked against the sha256 that the bundle's metadata records for it.
    """
    import keras

    from agent.bundle import load_bundle

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    record = bundle.metadata.get("training", {}).get("keras_model")
    path = bundle_dir / KERAS_FILE
    if record is None or not path.is_file():
        raise FileNotFoundError(f"{bundle_dir}: no Keras model ({KERAS_FILE}) next to the "
                                "bundle; transfer needs one: rerun segwatch-train pretrain")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record["sha256"]:
        raise ValueError(f"{path}: checksum does not match bundle.json (training.keras_model); "
                         "the file was changed after export")
    return keras.models.load_model(path, compile=False)


def metadata(threshold: float, length: int, history: dict, seed: int, epochs: int,
             batch: int, seconds: float, command: str, keras_sha: str, heldout: dict,
             version: int = VERSION) -> dict:
    return {
        "name": f"base-unet-v{version}",
        "version": version,
        "architecture": "unet",
        "channels": ["value"],
        "classes": list(CLASSES),
        "activation": "sigmoid",
        "normalization": {"mode": "snapshot", "clip": 10.0},
        "sample_period": 1.0,
        "snapshot_length": length,
        "hop": length // HOP_FRACTION,
        "threshold": threshold,
        "hysteresis": 0.1,
        "min_duration": 0.0,
        "training": {
            "data": "synthetic series streamed by trainer.synthetic.dataset (each seen once)",
            "series": history["series_seen"],
            "epochs": epochs,
            "batch": batch,
            "steps_per_epoch": history["steps_per_epoch"],
            "seed": seed,
            "loss": "soft dice + binary cross-entropy",
            "optimizer": f"adam {history['lr']:g}",
            "final_loss": history["loss"][-1],
            "val_loss": history.get("val_loss", [None])[-1],
            "train_seconds": round(history["total_seconds"], 1),
            "seconds": round(seconds, 1),
            "command": command,
            "code_version": code_version(),
            "threshold_choice": "best mean IoU on a validation set of synthetic series",
            "heldout_iou": heldout,
            "keras_model": {"file": KERAS_FILE, "sha256": keras_sha},
        },
    }


def run(out: Path = DEFAULT_OUT, results: Path | None = DEFAULT_RESULTS, series: int = 160_000,
        epochs: int = 10, batch: int = 32, seed: int = 1, command: str = "",
        length: int = MODEL_LENGTH, validation_series: int = 512, test_series: int = 1024,
        figure: Path | None = DEFAULT_FIGURE, tflite: bool = True,
        run_eagerly: bool = False) -> dict:
    """Pretrain, choose the threshold, score the held-out set, export; see the module doc."""
    started = time.perf_counter()
    out = Path(out)
    version = code_version()
    validation = synthetic_set(VALIDATION_SEED, validation_series, length)
    model, history = train_base(series, epochs, batch, seed, length, validation,
                                run_eagerly=run_eagerly)

    # Operating threshold on the validation set; IoU on the held-out test set.
    threshold, trials = choose_threshold(validation[1], predict(model, validation[0]))
    x_test, y_test = synthetic_set(TEST_SEED, test_series, length)
    p_test = predict(model, x_test)
    test = segmentation_iou(y_test, p_test, "sigmoid", threshold, CLASSES)
    at_half = segmentation_iou(y_test, p_test, "sigmoid", 0.5, CLASSES)
    heldout = {"seed": TEST_SEED, "series": test_series, "threshold": threshold,
               "per_class": test.as_dict(), "mean": test.mean,
               "mean_at_0.5": at_half.mean}
    print(f"held-out IoU at threshold {threshold}: mean {test.mean:.4f} "
          f"({', '.join(f'{k} {v:.4f}' for k, v in test.as_dict().items())})", file=sys.stderr)

    # Export: the Keras file is saved first so that its checksum goes into the metadata.
    with tempfile.TemporaryDirectory() as tmp:
        keras_tmp = Path(tmp) / "model.keras"
        keras_sha = save_keras(model, keras_tmp)
        meta = metadata(threshold, length, history, seed, epochs, batch,
                        time.perf_counter() - started, command, keras_sha, heldout)
        export_bundle(model, out, meta, real_inputs=x_test[:4], tflite=tflite)
        (out / KERAS_FILE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keras_tmp, out / KERAS_FILE)
    bundle_meta = json.loads((out / "bundle.json").read_text())

    if figure is not None:
        from trainer.plots import plot_snapshots

        shown = _figure_choice(y_test)
        plot_snapshots(figure, x_test[shown], y_test[shown], p_test[shown], CLASSES,
                       title=f"{bundle_meta['model_id']}: held-out synthetic series",
                       threshold=threshold, max_snapshots=len(shown))

    report = {
        "experiment": "pretrain",
        "command": command,
        "code_version": version,
        "seed": seed,
        "model_id": bundle_meta["model_id"],
        "bundle": repo_relative(out),
        "data": {"kind": "synthetic, streamed (trainer.synthetic)",
                 "series_seen": history["series_seen"], "model_length": length,
                 "validation": {"seed": VALIDATION_SEED, "series": validation_series},
                 "test": {"seed": TEST_SEED, "series": test_series}},
        "training": {"epochs": epochs, "batch": batch,
                     "steps_per_epoch": history["steps_per_epoch"], "lr": history["lr"],
                     "loss": history["loss"], "val_loss": history.get("val_loss"),
                     "seconds": round(history["total_seconds"], 1)},
        "threshold_trials": trials,
        "operating_point": {k: bundle_meta[k] for k in ("snapshot_length", "hop", "threshold",
                                                        "min_duration")},
        "test": heldout,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _figure_choice(y: np.ndarray, count: int = 6) -> list[int]:
    """Held-out series that together show each class, and a normal one."""
    chosen: list[int] = []
    for k in range(y.shape[2]):
        chosen += [i for i in np.flatnonzero(y[:, :, k].any(1)) if i not in chosen][:1]
    chosen += [i for i in np.flatnonzero(y.sum((1, 2)) == 0) if i not in chosen][:1]
    chosen += [i for i in range(len(y)) if i not in chosen][:max(0, count - len(chosen))]
    return sorted(chosen[:count])
