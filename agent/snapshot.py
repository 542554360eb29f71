"""Snapshot preparation: fill missing samples, resample to the model length, normalize.

The trainer uses these same functions to build its training snapshots, so that a model sees
in production exactly the preprocessing it was trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_MIN_SCALE = 1e-6


def fill_missing(values: np.ndarray) -> np.ndarray:
    """Fill NaN samples of a (length, channels) array by linear interpolation per channel.

    Samples before the first or after the last valid one take the nearest valid value; a
    channel with no valid sample at all is filled with zeros (the caller masks it).
    """
    filled = np.array(values, dtype=np.float64, copy=True)
    index = np.arange(filled.shape[0])
    for ch in range(filled.shape[1]):
        column = filled[:, ch]
        valid = np.isfinite(column)
        if valid.all():
            continue
        if not valid.any():
            column[:] = 0.0
            continue
        column[~valid] = np.interp(index[~valid], index[valid], column[valid])
    return filled


def resample(values: np.ndarray, length: int) -> np.ndarray:
    """Linearly resample axis -2 of a (..., n, channels) array to ``length`` points.

    The first and last points map onto each other, so resampling there and back is exact
    at both ends.
    """
    n = values.shape[-2]
    if n == length:
        return values
    position = np.linspace(0.0, n - 1, length)
    left = np.minimum(position.astype(np.int64), n - 2) if n > 1 else np.zeros(length, int)
    frac = (position - left)[:, None]
    right = np.minimum(left + 1, n - 1)
    return values[..., left, :] * (1.0 - frac) + values[..., right, :] * frac


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-channel scaling: fixed centers and scales from training, or per snapshot.

    Values are clipped to ``clip`` after scaling, the range the model was trained on. In
    ``snapshot`` mode a channel that barely moves (standard deviation at most 1e-6, a flat
    line) is only centered, never divided by its spread: no division by zero, and no noise
    blown up to the clip limits. The agent does not score such snapshots anyway (see
    ``agent.window``); the rule keeps the function safe for any caller.
    """

    mode: str  # "fixed" or "snapshot"
    center: np.ndarray | None = None
    scale: np.ndarray | None = None
    clip: float = 10.0

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.mode == "fixed":
            center = self.center
            scale = np.maximum(self.scale, _MIN_SCALE)
        else:
            center = values.mean(axis=-2, keepdims=True)
            spread = values.std(axis=-2, keepdims=True)
            scale = np.where(spread > _MIN_SCALE, spread, 1.0)
        return np.clip((values - center) / scale, -self.clip, self.clip)


def prepare(raw: np.ndarray, model_length: int, normalizer: Normalizer) -> np.ndarray:
    """Model input (model_length, channels) float32 from a raw snapshot with NaN gaps."""
    return normalizer(resample(fill_missing(raw), model_length)).astype(np.float32)
