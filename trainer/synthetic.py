"""Synthetic series with labelled anomalies: the pretraining set and the unusual-shapes task.

Pretraining set
---------------
Every series is ``length`` points of one of eight nominal families: four shapes (``smooth``
curves, piecewise-``linear``, piecewise-``constant``, ``pulse``-like) each either cyclic or
not. A non-cyclic series is a random function of a continuous time ``u`` (random sinusoids
of incommensurate low frequencies, random knots, random change points, pulses at random
times; knots and change points at least 2 % and 3 % of the domain apart, so that no pair of
nominal steps makes a spike that looks like an outlier); a cyclic one is a random waveform
of the same four kinds evaluated on a phase that advances by 4 to 25 cycles over the series,
plus a slow wander. The nominal series is varied at several intensities, each drawn per
series: cropping (a random window of the time domain of a non-cyclic curve, 50 % to 100 % of
it), time warping (a smooth monotone warp whose local speed varies by up to 1.2x on cyclic
series and up to 2.2x on others), a random trend (linear plus quadratic, up to twice the
shape's standard deviation) and jitter (white noise up to 0.2 of the shape's standard
deviation).

Three anomaly classes (``CLASSES``), at three time scales, are then injected into random
segments; the mask has one channel per class and is 1 exactly where a class was injected:

- ``outlier``: 1 to 5 additive outliers of 1 to 3 points, each 3 to 7 times the shape's
  spread (its standard deviation, or 0.3 of its range when larger, as for pulse trains) plus
  5 local noise standard deviations away from the nominal value.
- ``volatility``: 1 or 2 segments of 3 % to 20 % of the series where the noise changes: its
  standard deviation rises to 3 to 6 times the jitter and at least 0.1 to 0.4 of the shape's
  standard deviation (Gaussian, Laplace or uniform noise), or, on a series with enough
  jitter, falls to at most a fifth of it.
- ``cycle`` (cyclic series only): one segment of 2 to 4 cycles where the cyclic pattern is
  violated: the frequency changes (m cycles in the time of n, with m/n at least 1.5 or at
  most 2/3, so that the phase is continuous at both ends), the cycling stops (the waveform is
  stuck at its current value or at its mean), the amplitude changes (to 0.1-0.35 or 2-3
  times), or the waveform is replaced by one of another shape with the same mean and spread.

A fifth of the series are fully normal; the others carry each class with probability one
half (at least one class). Classes may overlap in time. The generator's nominal time warp on
cyclic series (at most 1.2x) stays below the frequency changes of the ``cycle`` class (at
least 1.5x), so that the two are never confused.

Batches are prepared as the agent prepares a snapshot with per-snapshot normalization
(``agent.snapshot.prepare`` with ``Normalizer("snapshot")``), so that a model trained on them
can be deployed with ``normalization.mode: snapshot``. ``make_batch`` makes 3,000 to 4,000
series of 1,024 points per second of one core's CPU time, about half that with the eight
augmentations allowed for ``CLASSES`` (``OMP_NUM_THREADS=1 python -m trainer.synthetic``).

Unusual shapes
--------------
``unusual_shapes`` builds the paper's second experiment, the transfer target. Each series
is a cyclic curve of one family (a fundamental with random second and third harmonics, the
same waveform in every cycle with 5 % cycle-to-cycle variation of the harmonics, 5 to 12
cycles, a mild time warp, noise and a small trend). One or two segments of 0.7 to 1.5 cycles
(90 % of the series; the others are normal) are redrawn with an unusual waveform: clipped to
a square-ish wave, a triangle, a sawtooth, a waveform rich in higher harmonics, the waveform
upside down, or a plateau. The unusual waveform is rescaled to the same minimum and maximum
as the normal cycles and cross-faded in over 8 % of a cycle at both ends, so level and
amplitude stay plausible and there is no jump: only the shape tells the segment apart, and
an outlier or volatility detector sees nothing. It differs from the pretraining ``cycle``
class in length (about one cycle instead of 2 to 4), in its subtler within-family changes,
and in keeping amplitude and level. Measured difficulty: the paper's U-Net trained from
scratch on the 700 training series of seed 0 (Adam 1e-3, soft Dice loss, batches of 32)
has a test IoU of 0.16 after one epoch, 0.50 after 15 and 40 (median 0.51 over epochs 15
to 40, swinging between 0.11 and 0.75 from epoch to epoch).

Known limitations: the nominal families are generic, not physical models of a plant; an
anomaly class injected at a low intensity into a series with strong jitter can be hard to
see even though it is labelled; the pulse shapes of ``pulse`` series and the widest (3-point)
outliers are at least 2.5 times apart in width but can look alike after heavy cropping.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import numpy as np

from agent.snapshot import Normalizer, prepare

log = logging.getLogger(__name__)

CLASSES = ("outlier", "volatility", "cycle")
SHAPES = ("smooth", "linear", "constant", "pulse")
MODEL_LENGTH = 1024
NORMAL_FRACTION = 0.2
CLASS_PROBABILITY = 0.5
CYCLIC_FRACTION = 0.5

# Per-series intensity levels of the nominal variations.
_JITTER_LEVELS = (0.0, 0.01, 0.03, 0.08, 0.2)
_TREND_LEVELS = (0.0, 0.5, 1.0, 2.0)
_WARP_CYCLIC = (1.0, 1.1, 1.2)
_WARP_OTHER = (1.0, 1.3, 1.7, 2.2)
_CROP_LEVELS = (1.0, 0.8, 0.5)

# The cycle class's frequency changes: m cycles in the time of n, |log(m / n)| >= log 1.5.
_FREQUENCY_CHANGES = {2: (1, 3, 4), 3: (1, 2, 5, 6), 4: (1, 2, 6, 7, 8)}

Waveform = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class SeriesInfo:
    """What ``make_series`` drew: the family, the nominal series and each injected anomaly.

    ``anomalies`` holds ``(class, start, end, variant)`` with ``end`` exclusive; ``nominal``
    is the series as it would be without anomalies (jitter included); ``scale`` is the
    standard deviation of the nominal shape and ``jitter`` that of its noise, in the
    series' units.
    """

    shape: str
    cyclic: bool
    cycles: float
    nominal: np.ndarray
    scale: float
    jitter: float
    anomalies: list[tuple[str, int, int, str]] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Nominal behaviour


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """One uniform draw (``Generator.uniform`` costs ten times more per scalar)."""
    return low + (high - low) * rng.random()


def _integer(rng: np.random.Generator, low: int, high: int) -> int:
    """One integer in [low, high)."""
    return low + int((high - low) * rng.random())


def _sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.random() < 0.5 else 1.0


def _pick(rng: np.random.Generator, options):
    return options[_integer(rng, 0, len(options))]


@functools.lru_cache(maxsize=16)
def _grid(length: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``np.linspace(low, high, length)``, made once (read-only)."""
    grid = np.linspace(low, high, length)
    grid.flags.writeable = False
    return grid


def _warp(rng: np.random.Generator, length: int, ratio: float) -> np.ndarray:
    """A monotone map of ``length`` points onto [0, 1] whose local speed varies by ``ratio``."""
    grid = _grid(length)
    if ratio <= 1.0:
        return grid
    knots = _integer(rng, 3, 8)
    speeds = np.exp(rng.uniform(-0.5, 0.5, knots) * np.log(ratio))
    speed = np.interp(grid, _grid(knots), speeds)
    position = np.cumsum(speed)
    return (position - position[0]) / (position[-1] - position[0])


def _spaced(rng: np.random.Generator, count: int, gap: float) -> np.ndarray:
    """``count`` sorted points in [0, 1) at least ``gap`` apart, also across the wrap at 1."""
    return np.sort(rng.uniform(0.0, 1.0 - count * gap, count)) + gap * np.arange(count)


def _pulses(distance: np.ndarray, kind: str) -> np.ndarray:
    """Pulse profile of peak 1 at ``distance`` (in pulse widths) from its centre."""
    if kind == "rect":
        return (np.abs(distance) < 0.5).astype(np.float64)
    if kind == "triangle":
        return np.maximum(0.0, 1.0 - 2.0 * np.abs(distance))
    if kind == "gauss":
        return np.exp(-0.5 * (distance * 4.0) ** 2)
    # "decay": sharp rise, exponential decay
    return np.where(distance >= -0.5, np.exp(-3.0 * (distance + 0.5)), 0.0)


def _curve(rng: np.random.Generator, shape: str, u: np.ndarray) -> np.ndarray:
    """A non-cyclic curve of the given shape on time ``u`` in [0, 1]."""
    if shape == "smooth":
        count = _integer(rng, 2, 6)
        freq = rng.uniform(0.3, 4.0, count)
        amp = rng.uniform(0.3, 1.0, count) / np.sqrt(freq)
        phase = rng.uniform(0.0, 2 * np.pi, count)
        return (amp[:, None] * np.sin(2 * np.pi * freq[:, None] * u + phase[:, None])).sum(0)
    if shape == "linear":
        count = _integer(rng, 2, 12)
        knots = np.concatenate(([0.0], _spaced(rng, count, 0.02) + 0.01, [1.0]))
        return np.interp(u, knots, np.cumsum(rng.normal(0.0, 1.0, count + 2)))
    if shape == "constant":
        count = _integer(rng, 1, 8)
        changes = _spaced(rng, count, 0.03)
        levels = np.cumsum(rng.normal(0.0, 1.0, count + 1))
        return levels[np.searchsorted(changes, u)]

    count = _integer(rng, 2, 16)
    centre = rng.uniform(0.0, 1.0, count)
    width = rng.uniform(0.008, 0.04, count)
    height = rng.uniform(0.5, 1.5, count)
    profile = _pulses((u[None, :] - centre[:, None]) / width[:, None],
                      _pick(rng, ("rect", "triangle", "gauss", "decay")))
    return (height[:, None] * profile).sum(0)


def _waveform(rng: np.random.Generator, shape: str) -> Waveform:
    """A random periodic waveform of period 1 in the phase, of the given shape."""
    if shape == "smooth":
        count = _integer(rng, 1, 5)
        harmonic = np.arange(1, count + 1)
        amp = np.concatenate(([1.0], rng.uniform(0.0, 0.6, count - 1))) / harmonic
        offset = rng.uniform(0.0, 2 * np.pi, count)
        return lambda phase: (amp[:, None] * np.sin(
            2 * np.pi * harmonic[:, None] * phase + offset[:, None])).sum(0)
    if shape == "linear":
        count = _integer(rng, 2, 6)
        knots = _spaced(rng, count, 0.02)
        values = rng.uniform(-1.0, 1.0, count)
        values[np.argmax(values)], values[np.argmin(values)] = 1.0, -1.0
        return lambda phase: np.interp(phase, knots, values, period=1.0)
    if shape == "constant":
        count = _integer(rng, 2, 5)
        breaks = _spaced(rng, count, 0.08)
        levels = rng.uniform(-1.0, 1.0, count)
        levels[0], levels[-1] = 1.0, -1.0
        return lambda phase: levels[np.searchsorted(breaks, phase % 1.0, side="right") - 1]

    count = _integer(rng, 1, 3)
    centre = rng.uniform(0.0, 1.0, count)
    width = rng.uniform(0.04, 0.3, count)
    height = rng.uniform(0.5, 1.5, count)
    kind = _pick(rng, ("rect", "triangle", "gauss", "decay"))

    def pulse_train(phase: np.ndarray) -> np.ndarray:
        distance = (phase[None, :] - centre[:, None] + 0.5) % 1.0 - 0.5
        return (height[:, None] * _pulses(distance / width[:, None], kind)).sum(0)

    return pulse_train


def _cycle_sample(waveform: Waveform) -> np.ndarray:
    return waveform(_grid(256, 0.0, 255 / 256))


# ---------------------------------------------------------------------------------------
# Anomaly injection


def inject_outliers(values: np.ndarray, rng: np.random.Generator, scale: float,
                    local_sd: np.ndarray | float = 0.0, count: int | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Add up to ``count`` (1 to 5) outliers of 1 to 3 points to ``values``.

    Returns the new values and the outliers' mask. A drawn outlier that would touch an
    earlier one is left out (the first always stays), so each keeps its own sign and size.

    Each outlier point moves away from its value by ``3..7 * scale + 5 * local_sd`` (one
    sign per outlier), where ``local_sd`` is the noise standard deviation there.
    """
    length = len(values)
    out = values.copy()
    mask = np.zeros(length, bool)
    count = _integer(rng, 1, 6) if count is None else count
    local_sd = np.broadcast_to(np.asarray(local_sd, np.float64), (length,))
    for _ in range(count):
        width = _integer(rng, 1, 4)
        start = _integer(rng, 0, length - width + 1)
        span = slice(start, start + width)
        if mask[max(start - 1, 0):start + width + 1].any():
            continue
        size = _uniform(rng, 3.0, 7.0) * scale * rng.uniform(0.8, 1.0, width)
        out[span] += _sign(rng) * (size + 5.0 * local_sd[span])
        mask[span] = True
    return out, mask


def inject_volatility(noise: np.ndarray, rng: np.random.Generator, scale: float,
                      jitter: float) -> tuple[np.ndarray, np.ndarray, str]:
    """Change the noise in one segment of 3 % to 20 % of the series.

    ``noise`` is the series' noise component, of standard deviation ``jitter``; returns the
    new noise, the segment's mask and the variant (``increase`` or ``decrease``).
    """
    length = len(noise)
    out = noise.copy()
    mask = np.zeros(length, bool)
    width = max(16, int(_uniform(rng, 0.03, 0.2) * length))
    start = _integer(rng, 0, length - width + 1)
    span = slice(start, start + width)
    mask[span] = True

    if jitter >= 0.05 * scale and rng.random() < 0.3:
        out[span] *= _uniform(rng, 0.0, 0.2)
        return out, mask, "decrease"

    target = max(_uniform(rng, 3.0, 6.0) * jitter, _uniform(rng, 0.1, 0.4) * scale)
    extra = np.sqrt(target ** 2 - jitter ** 2)
    kind = _pick(rng, ("gauss", "gauss", "laplace", "uniform"))
    if kind == "gauss":
        out[span] += rng.normal(0.0, extra, width)
    elif kind == "laplace":
        out[span] += rng.laplace(0.0, extra / np.sqrt(2.0), width)
    else:
        out[span] += rng.uniform(-1.0, 1.0, width) * extra * np.sqrt(3.0)
    return out, mask, "increase"


def inject_cycle_violation(waveform: Waveform, phase: np.ndarray, rng: np.random.Generator,
                           shape: str = "smooth") -> tuple[np.ndarray, np.ndarray, str]:
    """The cyclic component ``waveform(phase)`` with 2 to 4 of its cycles violated.

    ``phase`` must increase by at least 2 cycles over the series. Returns the component with
    the violation, the segment's mask and the variant (``frequency``, ``stuck``, ``stopped``,
    ``amplitude`` or ``waveform``); see the module docstring.
    """
    component = waveform(phase)
    total = phase[-1] - phase[0]
    cycles = _integer(rng, 2, 5)
    cycles = max(2, min(cycles, int(0.6 * total), 4))
    if total < cycles:
        raise ValueError(f"a cycle violation needs {cycles} cycles, the series has {total:.1f}")
    start = _integer(rng, 0, np.searchsorted(phase, phase[-1] - cycles, side="right"))
    end = int(np.searchsorted(phase, phase[start] + cycles))
    span = slice(start, end)
    mask = np.zeros(len(phase), bool)
    mask[span] = True

    sample = _cycle_sample(waveform)
    mean = sample.mean()
    variant = _pick(rng, ("frequency", "stuck", "stopped", "amplitude", "waveform"))
    if variant == "frequency":
        ratio = _pick(rng, _FREQUENCY_CHANGES[cycles]) / cycles
        component[span] = waveform(phase[start] + (phase[span] - phase[start]) * ratio)
    elif variant == "stuck":
        component[span] = component[start]
    elif variant == "stopped":
        component[span] = mean
    elif variant == "amplitude":
        factor = _uniform(rng, 0.1, 0.35) if rng.random() < 0.5 else _uniform(rng, 2.0, 3.0)
        component[span] = mean + factor * (component[span] - mean)
    else:
        other = _other_waveform(rng, shape, sample)
        if other is None:
            component[span] = mean
            variant = "stopped"
        else:
            component[span] = other(phase[span])
    return component, mask, variant


def _other_waveform(rng: np.random.Generator, shape: str, sample: np.ndarray) -> Waveform | None:
    """A waveform of another shape, with the sample's mean and spread, clearly different."""
    for _ in range(5):
        candidate = _waveform(rng, _pick(rng, [s for s in SHAPES if s != shape]))
        drawn = _cycle_sample(candidate)
        spread = drawn.std()
        if spread < 1e-9:
            continue
        gain = sample.std() / spread
        offset = sample.mean() - gain * drawn.mean()
        if np.corrcoef(sample, gain * drawn + offset)[0, 1] < 0.8:
            return lambda phase, f=candidate, g=gain, o=offset: g * f(phase) + o
    return None


# ---------------------------------------------------------------------------------------
# Series and batches


def _draw_classes(rng: np.random.Generator, cyclic: bool) -> set[str]:
    if rng.random() < NORMAL_FRACTION:
        return set()
    candidates = CLASSES if cyclic else CLASSES[:2]
    while True:
        chosen = {c for c in candidates if rng.random() < CLASS_PROBABILITY}
        if chosen:
            return chosen


def generate_series(rng: np.random.Generator, length: int = MODEL_LENGTH,
                    ) -> tuple[np.ndarray, np.ndarray, SeriesInfo]:
    """``make_series`` with a description of what was drawn (for figures and tests)."""
    shape = _pick(rng, SHAPES)
    cyclic = bool(rng.random() < CYCLIC_FRACTION)
    classes = _draw_classes(rng, cyclic)
    grid = _grid(length, -1.0, 1.0)

    # Nominal shape: a cyclic waveform plus a slow wander, or a cropped non-cyclic curve.
    if cyclic:
        cycles = float(np.exp(_uniform(rng, np.log(4.0), np.log(25.0))))
        phase = cycles * _warp(rng, length, _pick(rng, _WARP_CYCLIC)) + rng.random()
        waveform = _waveform(rng, shape)
        component = waveform(phase)
        scale = max(float(component.std()), 1e-3)
        coarse = _curve(rng, "smooth", _uniform(rng, 0.1, 0.5) * _grid(64))
        wander = np.interp(_grid(length), _grid(64), coarse)
        background = _uniform(rng, 0.0, 0.3) * scale * wander / max(np.abs(wander).max(), 1e-9)
    else:
        cycles = 0.0
        crop = _uniform(rng, _pick(rng, _CROP_LEVELS), 1.0)
        left = _uniform(rng, 0.0, 1.0 - crop)
        u = left + crop * _warp(rng, length, _pick(rng, _WARP_OTHER))
        background = _curve(rng, shape, u)
        component = np.zeros(length)
        scale = max(float(background.std()), 1e-3)

    # Nominal variations: random trend and jitter, at a per-series intensity.
    trend_size = _pick(rng, _TREND_LEVELS) * scale
    trend = trend_size * (_uniform(rng, -1, 1) * grid + _uniform(rng, -1, 1) * (grid ** 2 - 1 / 3))
    jitter = _pick(rng, _JITTER_LEVELS) * scale
    noise = rng.normal(0.0, jitter, length) if jitter else np.zeros(length)
    nominal = component + background + trend + noise
    info = SeriesInfo(shape, cyclic, cycles, nominal, scale, jitter)
    mask = np.zeros((length, len(CLASSES)), np.float32)

    # Anomalies, longest time scale first so that outliers stand out of what is under them.
    if "cycle" in classes:
        component, segment, variant = inject_cycle_violation(waveform, phase, rng, shape)
        _record(info, mask, "cycle", segment, variant)
    if "volatility" in classes:
        for _ in range(_integer(rng, 1, 3)):
            noise, segment, variant = inject_volatility(noise, rng, scale, jitter)
            _record(info, mask, "volatility", segment, variant)
    values = component + background + trend + noise
    if "outlier" in classes:
        local_sd = np.where(mask[:, 1] > 0, max(6.0 * jitter, 0.4 * scale), jitter)
        shape_range = np.ptp(component + background)
        values, points = inject_outliers(values, rng, max(scale, 0.3 * shape_range), local_sd)
        _record(info, mask, "outlier", points, "additive")

    # Random level and unit: invisible after per-snapshot normalization, kept for realism.
    gain = float(np.exp(_uniform(rng, np.log(0.01), np.log(1000.0))))
    level = rng.normal(0.0, 5.0) * gain
    info.nominal = nominal * gain + level
    info.scale, info.jitter = scale * gain, jitter * gain
    return values * gain + level, mask, info


def _record(info: SeriesInfo, mask: np.ndarray, name: str, segment: np.ndarray,
            variant: str) -> None:
    channel = CLASSES.index(name)
    mask[segment, channel] = 1.0
    edges = np.flatnonzero(np.diff(np.concatenate(([0], segment.astype(np.int8), [0]))))
    for start, end in zip(edges[::2], edges[1::2]):
        info.anomalies.append((name, int(start), int(end), variant))


def make_series(rng: np.random.Generator, length: int = MODEL_LENGTH,
                ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic series: raw values (length,) float64 and mask (length, 3) float32.

    The mask's channels follow ``CLASSES`` and are 1 exactly where that class was injected.
    """
    values, mask, _ = generate_series(rng, length)
    return values, mask


def make_batch(rng: np.random.Generator, n: int, length: int = MODEL_LENGTH,
               augment: Callable | None = None, clip: float = 10.0,
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` model inputs (n, length, 1) float32 and masks (n, length, 3) float32.

    Raw series go through ``augment`` first when given (a ``trainer.augment.Augmenter``
    built for ``CLASSES``, called with this ``rng``), then each through the agent's snapshot
    preparation with per-snapshot normalization clipped at ``clip``.
    """
    raw = np.empty((n, length, 1))
    y = np.empty((n, length, len(CLASSES)), np.float32)
    for i in range(n):
        raw[i, :, 0], y[i] = make_series(rng, length)

    if augment is not None:
        raw, y = augment(raw, y, rng=rng)
        y = y.astype(np.float32)

    normalizer = Normalizer("snapshot", clip=clip)
    x = np.empty((n, length, 1), np.float32)
    for i in range(n):
        x[i] = prepare(raw[i], length, normalizer)
    return x, y


def batch_seed(seed: int, index: int) -> np.random.Generator:
    """The generator of batch ``index`` of the stream ``seed``: batches are independent."""
    return np.random.default_rng([int(seed), int(index)])


def dataset(seed: int, batch_size: int, length: int = MODEL_LENGTH,
            augment: Callable | None = None, clip: float = 10.0,
            parallel: int | None = None):
    """An infinite ``tf.data.Dataset`` of ``make_batch`` batches (x, y), reproducible by seed.

    Batch ``i`` is ``make_batch(batch_seed(seed, i), batch_size, ...)``, so the stream is the
    same whatever the parallelism and never held in memory. ``parallel`` batches are made at
    once (default: ``tf.data.AUTOTUNE``; the generator is NumPy under the GIL, so more than
    a few threads gain little), and the stream is prefetched.
    """
    import tensorflow as tf

    channels = len(CLASSES)

    def one_batch(index):
        return make_batch(batch_seed(seed, int(index)), batch_size, length, augment, clip)

    def make(index):
        x, y = tf.numpy_function(one_batch, [index], (tf.float32, tf.float32), stateful=False)
        x.set_shape((batch_size, length, 1))
        y.set_shape((batch_size, length, channels))
        return x, y

    calls = tf.data.AUTOTUNE if parallel is None else parallel
    log.info("synthetic stream: seed %d, batches of %d series of %d points%s", seed,
             batch_size, length, ", augmented" if augment is not None else "")
    return (tf.data.Dataset.range(2 ** 62)
            .map(make, num_parallel_calls=calls, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


# ---------------------------------------------------------------------------------------
# The unusual-shapes task

UNUSUAL_SHAPES = ("square", "triangle", "sawtooth", "harmonics", "inverted", "plateau")


def _family_waveform(harmonics: np.ndarray, offsets: np.ndarray, phase: np.ndarray):
    order = np.arange(1, len(harmonics) + 1)[:, None]
    return (harmonics[:, None] * np.sin(2 * np.pi * order * phase + offsets[:, None])).sum(0)


def _unusual(kind: str, phase: np.ndarray, normal: np.ndarray, rng) -> np.ndarray:
    """An unusual waveform on ``phase``, before rescaling to the normal range."""
    frac = phase % 1.0
    if kind == "square":
        return np.tanh(_uniform(rng, 2.5, 6.0) * normal / max(np.abs(normal).max(), 1e-9))
    if kind == "triangle":
        return 1.0 - 4.0 * np.abs(((frac + 0.25) % 1.0) - 0.5)
    if kind == "sawtooth":
        return (2.0 * frac - 1.0) * _sign(rng)
    if kind == "harmonics":
        order = _integer(rng, 4, 8)
        return np.sin(2 * np.pi * frac) + _uniform(rng, 0.4, 0.8) * np.sin(
            2 * np.pi * order * frac + _uniform(rng, 0, 2 * np.pi))
    if kind == "inverted":
        return -normal
    # plateau: the top 40 % to 60 % of the cycle held flat
    return np.minimum(normal, np.quantile(normal, _uniform(rng, 0.4, 0.6)))


def _unusual_series(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    cycles = _uniform(rng, 5.0, 12.0)
    phase = cycles * _warp(rng, length, _uniform(rng, 1.0, 1.15)) + rng.random()
    harmonics = np.array([1.0, _uniform(rng, 0.0, 0.5), _uniform(rng, 0.0, 0.3)])
    offsets = rng.uniform(0.0, 2 * np.pi, 3)

    # Cycle-to-cycle variation: the harmonics wander by 5 % from one cycle to the next.
    cycle_index = np.floor(phase).astype(int)
    cycle_index -= cycle_index[0]
    drift = rng.normal(1.0, 0.05, (cycle_index[-1] + 1, 3))[cycle_index]
    order = np.arange(1, 4)
    values = (harmonics * drift * np.sin(
        2 * np.pi * order * phase[:, None] + offsets)).sum(1)
    mask = np.zeros(length, np.float32)

    count = 0 if rng.random() < 0.1 else _integer(rng, 1, 3)
    for _ in range(count):
        width = _uniform(rng, 0.7, 1.5)
        first = _uniform(rng, phase[0], phase[-1] - width)
        span = (phase >= first) & (phase < first + width)
        kind = _pick(rng, UNUSUAL_SHAPES)
        cycle = _family_waveform(harmonics, offsets, phase[span])
        shaped = _unusual(kind, phase[span], cycle, rng)

        # Same minimum and maximum as the normal waveform, cross-faded in at both ends.
        ref = _family_waveform(harmonics, offsets, np.linspace(0, 1, 256, endpoint=False))
        low, high = shaped.min(), shaped.max()
        shaped = ref.min() + (shaped - low) * (ref.max() - ref.min()) / max(high - low, 1e-9)
        inside = phase[span] - first
        fade = np.clip(np.minimum(inside, width - inside) / 0.08, 0.0, 1.0)
        values[span] = fade * shaped + (1.0 - fade) * values[span]
        mask[span] = 1.0

    scale = values.std()
    grid = np.linspace(-1.0, 1.0, length)
    values = values + _uniform(rng, -0.3, 0.3) * scale * grid
    values = values + rng.normal(0.0, _uniform(rng, 0.02, 0.1) * scale, length)
    return values, mask


def unusual_shapes(seed: int, n: int = 1400, length: int = MODEL_LENGTH, clip: float = 10.0,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The unusual-shapes task: inputs (n, length, 1) float32 and masks (n, length, 1).

    Series are independent; the paper's split is the first half for training and the second
    half for testing. Inputs are prepared like ``make_batch``'s (per-snapshot
    normalization). See the module docstring for the design.
    """
    rng = np.random.default_rng([int(seed), 0x5A4E])
    normalizer = Normalizer("snapshot", clip=clip)
    x = np.empty((n, length, 1), np.float32)
    y = np.empty((n, length, 1), np.float32)
    for i in range(n):
        values, mask = _unusual_series(rng, length)
        x[i] = prepare(values[:, None], length, normalizer)
        y[i, :, 0] = mask
    return x, y


def _measure(count: int = 2048, batch: int = 256, augment: Callable | None = None,
             ) -> tuple[float, float]:
    """Series per second of ``make_batch``: by wall-clock time and by this process's CPU time."""
    import time

    rng = np.random.default_rng(0)
    make_batch(rng, 8, augment=augment)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count // batch):
        make_batch(rng, batch, augment=augment)
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


if __name__ == "__main__":
    # Generator speed on one core: OMP_NUM_THREADS=1 python -m trainer.synthetic
    from trainer.augment import allowed, make_augmenter

    for label, augmenter in (("plain", None),
                             ("augmented", make_augmenter(allowed(CLASSES), CLASSES, 0))):
        wall, cpu = _measure(augment=augmenter)
        print(f"make_batch, {label}: {wall:.0f} series/s wall clock, {cpu:.0f} series/s CPU")
