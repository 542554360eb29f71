"""The paper's second experiment: synthetic curves with unusual shapes, scratch vs transfer.

Data: ``trainer.synthetic.unusual_shapes(DATA_SEED, 1400)``, the first 700 series for
training and the last 700 for testing (the paper's split; one class, sigmoid output,
per-snapshot normalization as the generator prepares it). For every seed, three U-Nets
train on the same 700 series for the same epochs and are scored on the same 700 test
series (IoU of the points at or above 0.5, summed over the test set):

- ``scratch``: a fresh U-Net, every section at the base learning rate;
- ``transfer-multipliers``: ``trainer.transfer.transfer_unet`` from the base bundle's Keras
  model (all sections but the output copied), fine-tuned with the paper's learning-rate
  multipliers (0.01 for the first section up to 1.0 for the output section);
- ``transfer-freeze``: the same transfer, the first two sections frozen for the first half
  of the epochs, then every section trained.

The seed decides the fresh weights (the scratch model, the transferred output section) and
the order of the batches; the data are the same for every seed, so the spread is that of
training alone. Every variant trains 60 epochs, batch 16, Adam 1e-3, with the pretraining
loss (soft Dice plus cross-entropy). The recipe was chosen on a validation split of the
training series (560 / 140), never on the test series: with soft Dice alone and 30 epochs,
runs of the same recipe ended anywhere from 23 % to 76 % IoU depending on the seed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from trainer.export import code_version
from trainer.metrics import PAPER_FIGURES, segmentation_iou
from trainer.synthetic import MODEL_LENGTH, unusual_shapes

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIGURES = ROOT / "docs" / "figures"
DATA_SEED = 0
TRAIN, TEST = 700, 700
EPOCHS = 60
BATCH = 16
LEARNING_RATE = 1e-3
THRESHOLD = 0.5
CLASS_NAME = "unusual shape"
VARIANTS = {"scratch": "scratch", "transfer-multipliers": "multipliers",
            "transfer-freeze": "freeze"}


def split(seed: int = DATA_SEED, n_train: int = TRAIN, n_test: int = TEST,
          length: int = MODEL_LENGTH):
    """((x, y) train, (x, y) test): the first ``n_train`` series and the next ``n_test``."""
    x, y = unusual_shapes(seed, n_train + n_test, length)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def make_model(variant: str, base, seed: int, length: int):
    """A fresh U-Net (``scratch``) or one transferred from ``base``, for one class."""
    import keras

    from trainer.transfer import transfer_unet
    from trainer.unet import build_unet

    keras.utils.set_random_seed(seed)
    if variant == "scratch":
        return build_unet(1, 1, "sigmoid", length, name="curves_scratch")
    return transfer_unet(base, 1, "sigmoid", model_length=length, name="curves_transfer")


def train_variant(variant: str, base, train, test, seed: int, epochs: int, batch: int = BATCH,
                  lr: float = LEARNING_RATE, run_eagerly: bool = False
                  ) -> tuple[dict, np.ndarray]:
    """Train one variant with one seed; returns its row and its test predictions."""
    from trainer.pretrain import dice_bce_loss
    from trainer.transfer import fine_tune

    length = train[0].shape[1]
    model = make_model(variant, base, seed, length)
    history = fine_tune(model, train, epochs, VARIANTS[variant], lr=lr, seed=seed,
                        batch_size=batch, loss=dice_bce_loss, run_eagerly=run_eagerly)
    predicted = model.predict(test[0], batch_size=64, verbose=0)
    score = segmentation_iou(test[1], predicted, "sigmoid", THRESHOLD, [CLASS_NAME])
    row = {"seed": seed, "iou": score.mean, "final_loss": history["loss"][-1],
           "seconds": round(history["total_seconds"], 1)}
    print(f"curves {variant}, seed {seed}: test IoU {score.mean:.4f} "
          f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return row, predicted


def summary(rows: list[dict]) -> dict:
    values = np.array([r["iou"] for r in rows])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
            else 0.0, "min": float(values.min()), "max": float(values.max()), "seeds": rows}


def run(base_dir: Path, results: Path | None, seeds: tuple[int, ...] = (1, 2, 3),
        command: str = "", epochs: int | None = None, n_train: int = TRAIN,
        n_test: int = TEST, length: int = MODEL_LENGTH, figures: Path | None = DEFAULT_FIGURES,
        variants: tuple[str, ...] = tuple(VARIANTS), run_eagerly: bool = False) -> dict:
    """Every variant for every seed; writes ``results`` and the figures; returns the report.

    ``run_eagerly`` skips compiling the training steps (for runs of a few batches)."""
    from agent.bundle import load_bundle
    from trainer.pretrain import load_keras

    started = time.perf_counter()
    epochs = epochs or EPOCHS
    base = load_keras(base_dir)
    base_id = load_bundle(base_dir).model_id
    train, test = split(DATA_SEED, n_train, n_test, length)
    print(f"curves: {n_train} training and {n_test} test series; base {base_id}",
          file=sys.stderr)

    rows: dict[str, list[dict]] = {variant: [] for variant in variants}
    first: dict[str, np.ndarray] = {}
    for seed in seeds:
        for variant in variants:
            row, predicted = train_variant(variant, base, train, test, seed, epochs,
                                           run_eagerly=run_eagerly)
            rows[variant].append(row)
            first.setdefault(variant, predicted)

    scores = {variant: summary(variant_rows) for variant, variant_rows in rows.items()}
    report = {
        "experiment": "synthetic-curves",
        "command": command,
        "code_version": code_version(),
        "base_model_id": base_id,
        "data": {"generator": "trainer.synthetic.unusual_shapes", "seed": DATA_SEED,
                 "series": n_train + n_test, "length": length,
                 "train": f"first {n_train}", "test": f"last {n_test}"},
        "training": {"epochs": epochs, "batch": BATCH, "lr": LEARNING_RATE,
                     "optimizer": "adam", "loss": "soft dice + binary cross-entropy",
                     "strategies": {v: VARIANTS[v] for v in variants}},
        "threshold": THRESHOLD,
        "seeds": list(seeds),
        "scores": scores,
        "paper": PAPER_FIGURES["synthetic_iou"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if figures is not None:
        report["figures"] = write_figures(figures, test, first, seeds[0])
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_figures(folder: Path, test, predictions: dict[str, np.ndarray], seed: int,
                  count: int = 6) -> dict[str, str]:
    """The same test snapshots, with each variant's detections (its run with ``seed``)."""
    from trainer.plots import plot_snapshots

    x, y = test
    anomalous = np.flatnonzero(y.any(axis=(1, 2)))
    normal = np.flatnonzero(~y.any(axis=(1, 2)))
    shown = np.sort(np.concatenate([anomalous[:count - 1], normal[:1]]))
    written = {}
    for variant, predicted in predictions.items():
        path = folder / f"synthetic-curves-{variant}.png"
        plot_snapshots(path, x[shown], y[shown], predicted[shown], [CLASS_NAME],
                       title=f"Unusual shapes, {variant} (seed {seed}): test snapshots",
                       threshold=THRESHOLD, max_snapshots=len(shown))
        try:
            written[variant] = path.resolve().relative_to(ROOT).as_posix()
        except ValueError:
            written[variant] = str(path)
    return written
