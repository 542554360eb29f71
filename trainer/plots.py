"""Figures: synthetic samples with their labelled classes, and test snapshots with spans.

Drawn with matplotlib's Agg backend (no display needed); every function writes one PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

CLASS_COLOURS = ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown",
                 "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """The (start, end) runs, end exclusive, where a 1-D mask is nonzero."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], (mask > 0).astype(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _shade(ax, mask: np.ndarray, colour: str, alpha: float, **kwargs) -> None:
    """Shade each span; spans under 0.4 % of the axis are drawn that wide, to stay visible."""
    least = len(mask) / 250
    for start, end in spans(mask):
        centre, half = (start + end - 1) / 2, max(end - start, least) / 2
        ax.axvspan(centre - half, centre + half, color=colour, alpha=alpha, lw=0, **kwargs)


def _legend(fig, classes: Sequence[str], extra: Sequence = (), top: float = 1.0) -> None:
    """Class colours in one row at ``top`` (a fraction of the figure's height)."""
    handles = [matplotlib.patches.Patch(color=CLASS_COLOURS[k % len(CLASS_COLOURS)], alpha=0.35,
                                        label=name) for k, name in enumerate(classes)]
    fig.legend(handles=[*handles, *extra], loc="upper center", bbox_to_anchor=(0.5, top),
               ncol=len(handles) + len(extra), frameon=False)


def plot_synthetic_samples(path: str | Path, seed: int, n: int = 8, length: int = 1024) -> Path:
    """A figure like the paper's Figure 4: ``n`` synthetic series, labelled classes shaded.

    Series are drawn from ``trainer.synthetic.generate_series`` with ``seed``; the first
    ones that together show every class, every shape, cyclic and non-cyclic families and a
    normal series are kept (then any), so that a small ``n`` still shows the whole set.
    """
    from trainer.synthetic import CLASSES, generate_series

    rng = np.random.default_rng(seed)
    chosen = _diverse_samples(rng, n, length, generate_series)

    cols = 2 if n > 3 else 1
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 1.7 * rows + 0.6), squeeze=False)
    for ax, (values, mask, info) in zip(axes.flat, chosen):
        ax.plot(values, color="black", lw=0.7)
        for k in range(len(CLASSES)):
            _shade(ax, mask[:, k], CLASS_COLOURS[k], 0.3)
        kind = f"cyclic, {info.cycles:.1f} cycles" if info.cyclic else "non-cyclic"
        found = sorted({f"{a[0]} ({a[3]})" for a in info.anomalies if a[0] != "outlier"})
        found += ["outliers"] if any(a[0] == "outlier" for a in info.anomalies) else []
        ax.set_title(f"{info.shape}, {kind}: {', '.join(found) or 'normal'}", fontsize=8)
        ax.set_xlim(0, length - 1)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)

    _legend(fig, CLASSES)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, path)


def _diverse_samples(rng, n: int, length: int, generate) -> list:
    """Up to ``n`` samples that together cover every class and shape, cyclic or not, and
    a normal series."""
    wanted = {"outlier", "volatility", "cycle", "cyclic", "non-cyclic", "normal",
              "smooth", "linear", "constant", "pulse"}
    chosen, spare = [], []
    for _ in range(50 * n):
        sample = generate(rng, length)
        info = sample[2]
        tags = {a[0] for a in info.anomalies} | {"cyclic" if info.cyclic else "non-cyclic"}
        tags |= {info.shape}
        tags |= set() if info.anomalies else {"normal"}
        if tags & wanted and len(chosen) < n:
            chosen.append(sample)
            wanted -= tags
        else:
            spare.append(sample)
        if not wanted and len(chosen) + len(spare) >= n:
            break
    return (chosen + spare)[:n]


def plot_snapshots(path: str | Path, x: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray,
                   classes: Sequence[str], title: str = "", threshold: float = 0.5,
                   max_snapshots: int = 12) -> Path:
    """Test snapshots with their true spans (shaded) and detected spans (bars underneath).

    ``x`` is (n, length, channels), ``y_true`` and ``y_pred`` are (n, length, classes): masks
    and predicted probabilities (or masks). A point is detected for a class when its
    probability is at least ``threshold``. Each snapshot gets a panel of its channels with
    the true spans shaded per class, and a strip underneath with the predicted probabilities
    and the detected spans. At most ``max_snapshots`` are drawn.
    """
    x, y_true, y_pred = (np.asarray(a) for a in (x, y_true, y_pred))
    if x.ndim == 2:
        x = x[:, :, None]
    if y_true.shape != y_pred.shape or y_true.shape[:2] != x.shape[:2]:
        raise ValueError(f"plot_snapshots: shapes differ: x {x.shape}, y_true {y_true.shape}, "
                         f"y_pred {y_pred.shape}")
    if y_true.shape[2] != len(classes):
        raise ValueError(f"plot_snapshots: {y_true.shape[2]} mask channels for "
                         f"{len(classes)} classes {list(classes)}")
    count = min(len(x), max_snapshots)
    length = x.shape[1]

    fig = plt.figure(figsize=(11, 1.9 * count + 1.2))
    grid = fig.add_gridspec(count * 2, 1, height_ratios=[3, 1] * count, hspace=0.15)
    for i in range(count):
        top = fig.add_subplot(grid[2 * i])
        strip = fig.add_subplot(grid[2 * i + 1], sharex=top)
        top.plot(x[i], color="black", lw=0.6, alpha=1.0 if x.shape[2] == 1 else 0.6)
        for k in range(len(classes)):
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            _shade(top, y_true[i, :, k], colour, 0.3)
            strip.plot(y_pred[i, :, k], color=colour, lw=0.8)
            _shade(strip, y_pred[i, :, k] >= threshold, colour, 0.35)
        strip.axhline(threshold, color="gray", lw=0.5, ls=":")
        strip.set_ylim(-0.05, 1.05)
        strip.set_yticks([])
        top.set_yticks([])
        top.set_xlim(0, length - 1)
        top.tick_params(labelbottom=False, labelsize=7)
        strip.tick_params(labelsize=7, labelbottom=i == count - 1)
        top.set_ylabel(f"#{i}", fontsize=7)

    height = fig.get_figheight()
    note = matplotlib.patches.Patch(facecolor="none", edgecolor="none",
                                    label="(shaded in a panel: true; in the strip: detected)")
    if title:
        fig.suptitle(title, y=1 - 0.08 / height, fontsize=10)
    _legend(fig, classes, [note], top=1 - (0.3 if title else 0.05) / height)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.45 / height,
                        top=1 - (0.75 if title else 0.5) / height)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


if __name__ == "__main__":
    # Regenerates the figure of the docs: python -m trainer.plots [path] [seed]
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "docs/figures/synthetic-samples.png"
    print(plot_synthetic_samples(target, seed=int(sys.argv[2]) if len(sys.argv) > 2 else 0))
