"""Random training snapshots cut from a labelled series, as in the paper.

Each snapshot has a random length between ``min_length`` and ``max_length`` samples and is
resampled to the model length; the label mask is resampled with it. Snapshots go through
``agent.snapshot.prepare``, the agent's own preprocessing.
"""

from __future__ import annotations

import numpy as np

from agent.snapshot import Normalizer, prepare, resample


def random_snapshots(
    values: np.ndarray,
    mask: np.ndarray,
    count: int,
    rng: np.random.Generator,
    normalizer: Normalizer,
    model_length: int = 1024,
    min_length: int = 1024,
    max_length: int = 4096,
    max_missing: float = 0.5,
    scale_range: tuple[float, float] = (1.0, 1.0),
    jitter: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` snapshots (count, model_length, channels) and masks (count, model_length, M).

    ``values`` is (n, channels) with NaN where missing; ``mask`` is (n, M) in {0, 1}.
    Snapshots with more than ``max_missing`` missing samples are drawn again, as the agent
    would not score them. Two label-invariant augmentations are optional: the raw values are
    multiplied by a factor drawn log-uniformly from ``scale_range``, and Gaussian noise of
    standard deviation ``jitter`` is added after normalization.
    """
    n = len(values)
    max_length = min(max_length, n)
    xs = np.empty((count, model_length, values.shape[1]), np.float32)
    ys = np.empty((count, model_length, mask.shape[1]), np.float32)
    made = 0
    while made < count:
        length = int(rng.integers(min_length, max_length + 1))
        start = int(rng.integers(0, n - length + 1))
        raw = values[start:start + length]
        if np.isnan(raw).mean() > max_missing:
            continue
        if scale_range != (1.0, 1.0):
            raw = raw * np.exp(rng.uniform(*np.log(scale_range)))
        xs[made] = prepare(raw, model_length, normalizer)
        if jitter:
            xs[made] += rng.normal(0.0, jitter, xs[made].shape).astype(np.float32)
        ys[made] = resample(mask[start:start + length].astype(np.float64), model_length) >= 0.5
        made += 1
    return xs, ys


def event_mask(ts: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """(n, 1) mask: 1 inside any window [start, end], else 0."""
    mask = np.zeros((len(ts), 1), np.float32)
    for start, end in windows:
        mask[(ts >= start) & (ts <= end), 0] = 1.0
    return mask
