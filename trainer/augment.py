"""Label-invariant augmentations that transform a series and its label mask together.

Each augmentation is an ``Augmentation`` registered in ``AUGMENTATIONS`` under its name, with
the anomaly kinds (``KINDS``) it must not be used with and the reason. A task's
configuration lists augmentation names; ``make_augmenter`` builds the callable and refuses a
name that is forbidden with one of the task's classes.

Why our own module: tsaug (Arundo, by the paper's first author) transforms series and masks
together, and its 0.2.1 does run under NumPy 2.4 (checked in a scratch virtual environment:
``TimeWarp``, ``Crop``, ``Drift``, ``Quantize``, ``Reverse``, ``AddNoise``, ``Convolve``,
``Dropout``, ``Pool`` and ``Resize`` with a 3-channel mask). But it is not maintained: 0.2.1
of April 2020 is its last release, declared for Python 3.5 to 3.8, and it needs SciPy, which
nothing else here does. It also lacks several of the paper's operations (mutation between
series, a random linear operation, zooming out, random trend) and any notion of which
anomaly kinds an augmentation breaks. So these are written here, on NumPy alone.

How masks follow: an augmentation that moves time (warp, crop, zoom, reversal, mutation,
dropout-then-fill) moves the mask with the same positions and interpolation weights as the
values, so that along a chain of augmentations the mask stays soft: at every point, the
fraction of its value that comes from labelled points. ``Augmenter`` makes it binary at the
end of the chain, labelling a point when at least half of its value comes from labelled
points (the rule of ``trainer.snapshots``); binarizing after every step instead would let
labels and values drift apart at span edges. An augmentation that only changes values
leaves the mask as it is. Arrays are (length, channels) series and (length, classes)
masks, or batches of them; every channel of a series is moved in time together. Values
must be finite: fill gaps first (``agent.snapshot.fill_missing``).

Known limitations: linear interpolation at fractional positions smooths white noise (where
a warp, crop or zoom lands between samples its standard deviation falls by 18 % on average,
29 % midway), evenly enough over a series not to read as a change of volatility; an
augmentation applied at full intensity to a weak anomaly can hide it while its label stays.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from agent.snapshot import fill_missing

log = logging.getLogger(__name__)

KINDS = {
    "outlier": "isolated points far from their neighbours (short)",
    "volatility": "a temporary change of the noise level (medium)",
    "cycle": "a violation of a cyclic pattern: period, amplitude or waveform (long)",
    "shape": "a segment whose waveform is unusual for the task, at a plausible level",
    "level": "a sustained departure of the level from its normal range (events, faults)",
    "trend": "a slow drift away from normal (sensor drift, wear)",
}

Apply = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One label-invariant augmentation.

    ``apply(values, mask, rng, intensity, partner)`` takes one series (length, channels)
    float64 and its mask (length, classes) float64 in [0, 1], a strength ``intensity`` in
    [0, 1] and, for mutation, another series and mask; it returns new arrays of the same
    shapes, the mask soft (see the module docstring).
    """

    name: str
    forbidden: frozenset[str]
    moves_time: bool
    why: str
    apply: Apply


AUGMENTATIONS: dict[str, Augmentation] = {}


def _register(name: str, forbidden: Sequence[str], moves_time: bool, why: str):
    unknown = set(forbidden) - set(KINDS)
    if unknown:
        raise ValueError(f"augmentation {name!r}: unknown kinds {sorted(unknown)}")

    def decorate(apply: Apply) -> Apply:
        AUGMENTATIONS[name] = Augmentation(name, frozenset(forbidden), moves_time, why, apply)
        return apply

    return decorate


# ---------------------------------------------------------------------------------------
# Resampling shared by the augmentations that move time


def resample_at(values: np.ndarray, mask: np.ndarray, position: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Values and (soft) mask at fractional source ``position``, both interpolated linearly."""
    n = len(values)
    position = np.clip(position, 0.0, n - 1)
    left = np.minimum(position.astype(np.int64), n - 2) if n > 1 else np.zeros(len(position), int)
    frac = (position - left)[:, None]
    right = np.minimum(left + 1, n - 1)
    out = values[left] * (1.0 - frac) + values[right] * frac
    return out, mask[left] * (1.0 - frac) + mask[right] * frac


def _fold(position: np.ndarray, n: int) -> np.ndarray:
    """Reflect positions outside [0, n - 1] back inside (mirror at both ends)."""
    period = 2.0 * (n - 1)
    folded = np.mod(position, period)
    return np.where(folded > n - 1, period - folded, folded)


def _normal_stats(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation over the unlabelled points (all if too few)."""
    normal = values[~(mask > 0).any(axis=1)]
    if len(normal) < 2:
        normal = values
    return normal.mean(axis=0), normal.std(axis=0)


def _spread(values: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation, never zero."""
    return np.maximum(values.std(axis=0), 1e-12)


# ---------------------------------------------------------------------------------------
# Augmentations that move time


@_register("time_warp", ["cycle", "shape"], True,
           "a warp changes the local period and the waveform of cycles, which is what a cycle "
           "violation or an unusual shape is; outliers, volatility, levels and trends move "
           "with their mask")
def time_warp(values, mask, rng, intensity, partner=None):
    """Smooth monotone warp: local speed varies by up to ``1 + intensity`` (2x at 1)."""
    n = len(values)
    ratio = 1.0 + intensity
    knots = int(rng.integers(4, 9))
    speeds = np.exp(rng.uniform(-0.5, 0.5, knots) * np.log(ratio))
    speed = np.interp(np.arange(n), np.linspace(0, n - 1, knots), speeds)
    position = np.concatenate(([0.0], np.cumsum(speed[:-1])))
    return resample_at(values, mask, position * (n - 1) / position[-1])


@_register("crop", [], True,
           "a window of at least half the series, resampled back, changes every time scale "
           "alike: cycles stay regular, shapes keep their proportions, spans are cut with "
           "their mask (a cycle violation cut to a sliver at an end keeps its label)")
def crop(values, mask, rng, intensity, partner=None):
    """A random window of ``1 - intensity / 2`` to all of the series, resampled back."""
    n = len(values)
    keep = rng.uniform(1.0 - 0.5 * intensity, 1.0)
    start = rng.uniform(0.0, (1.0 - keep) * (n - 1))
    return resample_at(values, mask, start + np.linspace(0.0, keep * (n - 1), n))


@_register("zoom", ["cycle", "shape", "trend"], True,
           "zooming out mirrors the series at its ends to fill the snapshot: a mirrored "
           "asymmetric cycle is another waveform, and the mirror is a kink in any trend")
def zoom(values, mask, rng, intensity, partner=None):
    """Time scale times 1 / (1 + intensity) to 1 + intensity about a random centre."""
    n = len(values)
    factor = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(intensity)))
    centre = rng.uniform(0.0, n - 1)
    position = centre + (np.arange(n) - centre) / factor
    return resample_at(values, mask, _fold(position, n))


@_register("reverse", ["shape"], True,
           "time reversal keeps outliers, volatility, levels and the regularity of cycles, "
           "but mirrors every waveform: a task whose unusual shapes are mirrored normal ones "
           "would see them swap")
def reverse(values, mask, rng, intensity, partner=None):
    """The series backwards in time."""
    return values[::-1].copy(), mask[::-1].copy()


@_register("dropout", [], True,
           "dropped samples are filled by interpolation as the agent fills missing samples, "
           "and the mask is filled the same way, so a dropped outlier loses its label; "
           "bursts of at most 5 samples are far shorter than the other kinds' spans")
def dropout(values, mask, rng, intensity, partner=None):
    """Drop up to 10 % of the samples (bursts of 1 to 1 + 4 * intensity), fill by interpolation."""
    n = len(values)
    longest = 1 + int(round(4 * intensity))
    bursts = int(round(rng.uniform(0.0, 0.1 * intensity) * n / (1 + longest) * 2))
    starts = rng.integers(0, n, bursts)
    ends = np.minimum(starts + rng.integers(1, longest + 1, bursts), n)
    edges = np.zeros(n + 1)
    np.add.at(edges, starts, 1.0)
    np.add.at(edges, ends, -1.0)
    dropped = np.cumsum(edges[:n]) > 0.5
    if dropped.all() or not dropped.any():
        return values.copy(), mask.copy()
    gappy = np.where(dropped[:, None], np.nan, values)
    return fill_missing(gappy), fill_missing(np.where(dropped[:, None], np.nan, mask))


@_register("mutation", ["cycle", "volatility", "shape", "level", "trend"], True,
           "a segment spliced from another series breaks a cyclic pattern, brings its own "
           "noise level, waveform and level, and its joins make a kink: only outliers, whose "
           "spans the splice points avoid, survive it unchanged")
def mutation(values, mask, rng, intensity, partner=None):
    """Splice 5 % to 10 + 30 * intensity % of the partner series (same positions) in.

    The partner's segment is rescaled to this series' per-channel spread (both measured on
    unlabelled points; not rescaled when either is flat) and shifted by a linear ramp so
    that it starts and ends on this series' values; the splice points are chosen where
    neither series is labelled, so no span is cut. The mask there is the partner's.
    """
    other, other_mask = partner
    n = len(values)
    free = ~((mask > 0).any(axis=1) | (other_mask > 0).any(axis=1))
    for _ in range(10):
        width = max(2, int(rng.uniform(0.05, 0.1 + 0.3 * intensity) * n))
        start = int(rng.integers(0, n - width + 1))
        end = start + width
        if free[start] and free[end - 1]:
            break
    else:
        return values.copy(), mask.copy()

    # The donor in this series' units, judged on unlabelled points only.
    own_centre, own_spread = _normal_stats(values, mask)
    other_centre, other_spread = _normal_stats(other, other_mask)
    gain = np.where((own_spread > 0) & (other_spread > 0),
                    own_spread / np.maximum(other_spread, 1e-300), 1.0)
    donor = (other[start:end] - other_centre) * gain + own_centre
    first = values[start] - donor[0]
    last = values[end - 1] - donor[-1]
    ramp = np.linspace(0.0, 1.0, width)[:, None]
    out, out_mask = values.copy(), mask.copy()
    out[start:end] = donor + first + (last - first) * ramp
    out_mask[start:end] = other_mask[start:end]
    return out, out_mask


# ---------------------------------------------------------------------------------------
# Augmentations that change values only


@_register("jitter", [], False,
           "white noise of at most a tenth of the series' spread adds to every point's "
           "variance alike, so a change of volatility stays a change and the rest stay")
def jitter(values, mask, rng, intensity, partner=None):
    """Gaussian noise of up to ``0.1 * intensity`` times each channel's spread."""
    sd = rng.uniform(0.0, 0.1 * intensity) * _spread(values)
    return values + rng.normal(0.0, 1.0, values.shape) * sd, mask.copy()


@_register("random_trend", ["trend", "level"], False,
           "an added trend is what a trend anomaly is, and it carries normal points to "
           "levels that a level anomaly is judged by")
def random_trend(values, mask, rng, intensity, partner=None):
    """Linear plus quadratic trend of up to ``intensity`` times each channel's spread."""
    t = np.linspace(-1.0, 1.0, len(values))[:, None]
    size = intensity * _spread(values)
    slope, bend = (rng.uniform(-1.0, 1.0, values.shape[1]) * size for _ in range(2))
    return values + slope * t + bend * (t ** 2 - 1.0 / 3.0), mask.copy()


@_register("drift", ["trend", "level", "shape"], False,
           "a random-walk drift with knots a sixth to a third of the series apart is a trend "
           "or level change in itself and bends waveforms at the scale of a cycle")
def drift(values, mask, rng, intensity, partner=None):
    """A random walk through 3 to 7 knots, up to ``0.5 * intensity`` of each channel's spread."""
    n, channels = values.shape
    knots = int(rng.integers(3, 8))
    walk = np.cumsum(rng.normal(0.0, 1.0, (knots, channels)), axis=0)
    walk -= walk.mean(axis=0)
    walk /= np.maximum(np.abs(walk).max(axis=0), 1e-12)
    size = rng.uniform(0.0, 0.5 * intensity, channels) * _spread(values)
    curve = np.stack([np.interp(np.arange(n), np.linspace(0, n - 1, knots), walk[:, c])
                      for c in range(channels)], axis=1)
    return values + curve * size, mask.copy()


@_register("linear", ["shape", "level"], False,
           "a*x + b with a of either sign keeps outliers, volatility, cycles and trends, but "
           "turns waveforms upside down and moves levels that are judged in absolute terms")
def linear(values, mask, rng, intensity, partner=None):
    """``a * x + b``: |a| in [1 / (1 + intensity), 1 + intensity], sign flipped half the time."""
    channels = values.shape[1]
    gain = np.exp(rng.uniform(-1.0, 1.0, channels) * np.log1p(intensity))
    gain *= rng.choice((-1.0, 1.0), channels)
    offset = rng.uniform(-1.0, 1.0, channels) * intensity * _spread(values)
    return gain * values + offset, mask.copy()


@_register("scale", ["level"], False,
           "one gain per channel changes the unit, which per-snapshot normalization undoes; "
           "only a level judged in absolute units (fixed normalization) is affected")
def scale(values, mask, rng, intensity, partner=None):
    """Magnitude scaling: each channel times a gain in [1 / (1 + 2i), 1 + 2i]."""
    gain = np.exp(rng.uniform(-1.0, 1.0, values.shape[1]) * np.log1p(2.0 * intensity))
    return values * gain, mask.copy()


@_register("magnitude_warp", ["volatility", "cycle", "level"], False,
           "a smooth gain that varies along the series changes the local noise level and the "
           "amplitude of cycles, which is what volatility and cycle anomalies are")
def magnitude_warp(values, mask, rng, intensity, partner=None):
    """Deviations from the mean times a smooth curve through 4 to 8 log-normal knots."""
    n, channels = values.shape
    knots = int(rng.integers(4, 9))
    gains = np.exp(rng.normal(0.0, 0.3 * intensity, (knots, channels)))
    curve = np.stack([np.interp(np.arange(n), np.linspace(0, n - 1, knots), gains[:, c])
                      for c in range(channels)], axis=1)
    centre = values.mean(axis=0)
    return centre + (values - centre) * curve, mask.copy()


@_register("quantize", ["volatility"], False,
           "rounding to levels erases noise smaller than a level and leaves a noise that "
           "depends on the local slope: it makes and unmakes changes of volatility")
def quantize(values, mask, rng, intensity, partner=None):
    """Round each channel to 200 (intensity 0) down to 10 (intensity 1) levels of its range."""
    levels = np.exp(np.log(200.0) + rng.uniform(0.0, intensity) * (np.log(10.0) - np.log(200.0)))
    low = values.min(axis=0)
    step = np.maximum(values.max(axis=0) - low, 1e-12) / levels
    return low + np.round((values - low) / step) * step, mask.copy()


@_register("smooth", ["outlier"], False,
           "a moving average divides an outlier by the window and spreads it over unlabelled "
           "neighbours; other kinds are longer than the window and stay")
def smooth(values, mask, rng, intensity, partner=None):
    """Moving average over 3 to 3 + 6 * intensity points (odd), edges mirrored."""
    half = int(rng.integers(1, 2 + int(round(3 * intensity))))
    width = 2 * half + 1
    padded = np.pad(values, ((half, half), (0, 0)), mode="reflect")
    total = np.cumsum(np.concatenate((np.zeros((1, values.shape[1])), padded)), axis=0)
    return (total[width:] - total[:-width]) / width, mask.copy()


# ---------------------------------------------------------------------------------------
# Building an augmenter from a task configuration


def class_kinds(classes: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """The anomaly kind of each class: a class is its own kind unless a mapping names one."""
    pairs = dict(classes) if isinstance(classes, Mapping) else {c: c for c in classes}
    for name, kind in pairs.items():
        if kind not in KINDS:
            raise ValueError(
                f"class {name!r} has no known anomaly kind ({kind!r}); give the classes as a "
                f"mapping from class to kind, e.g. {{{name!r}: 'level'}}, with kinds "
                f"{sorted(KINDS)}")
    return pairs


def allowed(classes: Sequence[str] | Mapping[str, str]) -> list[str]:
    """The names of the augmentations that may be used with these classes."""
    kinds = set(class_kinds(classes).values())
    return [name for name, aug in AUGMENTATIONS.items() if not aug.forbidden & kinds]


class Augmenter:
    """Applies each configured augmentation with probability ``probability``, in order.

    Call with a batch ``values`` (n, length, channels) and ``mask`` (n, length, classes), or
    one series (length, channels) and mask (length, classes); returns new arrays of the same
    shapes and dtypes. ``rng`` overrides the augmenter's own generator for one call (so that
    a seeded batch is reproducible whatever was augmented before). Mutation takes its
    partner from another series of the batch (from the series itself when alone).
    """

    def __init__(self, augmentations: Sequence[Augmentation], classes: dict[str, str],
                 intensity: float, probability: float, rng: np.random.Generator):
        self.augmentations = tuple(augmentations)
        self.classes = classes
        self.intensity = intensity
        self.probability = probability
        self.rng = rng

    @property
    def names(self) -> list[str]:
        return [aug.name for aug in self.augmentations]

    def __call__(self, values: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng if rng is None else rng
        values, mask = np.asarray(values), np.asarray(mask)
        single = values.ndim == 2
        batch_values = values[None] if single else values
        batch_mask = mask[None] if single else mask
        if batch_values.ndim != 3 or batch_mask.shape[:2] != batch_values.shape[:2]:
            raise ValueError(f"augment: values {values.shape} and mask {mask.shape} must be "
                             "(n, length, channels) and (n, length, classes) or one series")

        out = np.empty_like(batch_values)
        out_mask = np.empty_like(batch_mask)
        for i in range(len(batch_values)):
            out[i], out_mask[i] = self.one(batch_values, batch_mask, i, rng)
        return (out[0], out_mask[0]) if single else (out, out_mask)

    def one(self, values: np.ndarray, mask: np.ndarray, index: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Series ``index`` of a batch, augmented (partners are the batch's originals)."""
        x, m = values[index].astype(np.float64), mask[index].astype(np.float64)
        for aug in self.augmentations:
            if rng.uniform() >= self.probability:
                continue
            partner = None
            if aug.name == "mutation":
                other = index if len(values) == 1 else int(rng.integers(len(values) - 1))
                other += int(other >= index and len(values) > 1)
                partner = (values[other].astype(np.float64), mask[other].astype(np.float64))
            x, m = aug.apply(x, m, rng, self.intensity, partner)
        return x, (m >= 0.5).astype(np.float64)


def make_augmenter(names: Sequence[str], classes: Sequence[str] | Mapping[str, str],
                   rng: np.random.Generator | int | None = None, intensity: float = 0.5,
                   probability: float = 0.5) -> Augmenter:
    """An ``Augmenter`` of the named augmentations for a task with these classes.

    ``classes`` are the task's class names, each an anomaly kind of ``KINDS``, or a mapping
    from class name to kind. Raises ``ValueError`` for an unknown name, an unknown kind, an
    intensity or probability outside [0, 1], and an augmentation forbidden with one of the
    classes (naming both and the reason).
    """
    kinds = class_kinds(classes)
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; known: {sorted(AUGMENTATIONS)}")
    for label, value in (("intensity", intensity), ("probability", probability)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"augmentation {label} must be in [0, 1], got {value}")

    for name in names:
        aug = AUGMENTATIONS[name]
        for cls, kind in kinds.items():
            if kind in aug.forbidden:
                shown = repr(cls) if cls == kind else f"{cls!r} (kind {kind!r})"
                raise ValueError(
                    f"augmentation {name!r} must not be used with class {shown}: {aug.why}; "
                    f"remove it from the task's augmentations (allowed here: "
                    f"{allowed(kinds)})")

    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    log.debug("augmenter %s for classes %s, intensity %.2f", list(names), kinds, intensity)
    return Augmenter([AUGMENTATIONS[n] for n in names], kinds, intensity, probability, generator)
