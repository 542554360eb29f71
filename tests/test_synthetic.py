"""The synthetic pretraining set and the unusual-shapes task: labels match what was injected."""

from __future__ import annotations

import numpy as np
import pytest

from agent.snapshot import Normalizer, prepare
from trainer import synthetic
from trainer.augment import allowed, make_augmenter
from trainer.plots import plot_snapshots, plot_synthetic_samples, spans
from trainer.synthetic import (CLASSES, generate_series, inject_cycle_violation,
                               inject_outliers, inject_volatility, make_batch, make_series,
                               unusual_shapes)

LENGTH = 1024


@pytest.fixture(scope="module")
def sample():
    """300 series with what was drawn for each."""
    rng = np.random.default_rng(11)
    return [generate_series(rng, LENGTH) for _ in range(300)]


def test_outliers_mark_exactly_the_points_they_move():
    for seed in range(50):
        flat = np.zeros(LENGTH)
        values, mask = inject_outliers(flat, np.random.default_rng(seed), scale=1.0)
        assert mask.dtype == bool
        assert np.array_equal(mask, values != 0.0)
        assert 1 <= mask.sum() <= 15
        assert np.abs(values[mask]).min() >= 2.4


def test_outliers_stand_out_of_the_local_noise():
    local_sd = np.full(LENGTH, 0.5)
    values, mask = inject_outliers(np.zeros(LENGTH), np.random.default_rng(3), 1.0, local_sd)
    assert np.abs(values[mask]).min() >= 2.4 + 5 * 0.5


def test_volatility_raises_the_noise_only_inside_its_segment():
    for seed in range(50):
        noise, mask, variant = inject_volatility(np.zeros(LENGTH), np.random.default_rng(seed),
                                                 scale=1.0, jitter=0.0)
        assert variant == "increase"
        assert len(spans(mask)) == 1
        assert 0.03 * LENGTH - 1 <= mask.sum() <= 0.2 * LENGTH + 1
        assert not noise[~mask].any()
        assert noise[mask].std() >= 0.05


def test_volatility_decrease_calms_the_noise_only_inside_its_segment():
    decreases = 0
    for seed in range(60):
        base = np.random.default_rng(1000 + seed).normal(0.0, 0.2, LENGTH)
        noise, mask, variant = inject_volatility(base, np.random.default_rng(seed), 1.0, 0.2)
        assert np.array_equal(noise[~mask], base[~mask])
        if variant == "decrease":
            decreases += 1
            assert noise[mask].std() <= 0.2 * base[mask].std() + 1e-12
        else:
            assert noise[mask].std() > 2.0 * base[mask].std()
    assert decreases > 5


def test_cycle_violation_changes_only_its_segment_of_two_to_four_cycles():
    phase = np.linspace(0.0, 12.0, LENGTH)

    def waveform(p):
        return np.sin(2 * np.pi * p)

    seen = set()
    for seed in range(80):
        component, mask, variant = inject_cycle_violation(waveform, phase,
                                                          np.random.default_rng(seed))
        seen.add(variant)
        original = waveform(phase)
        assert len(spans(mask)) == 1
        assert np.array_equal(component[~mask], original[~mask])
        assert np.abs(component[mask] - original[mask]).max() > 0.3
        cycles = phase[mask][-1] - phase[mask][0]
        assert 1.9 <= cycles <= 4.05
    assert seen == {"frequency", "stuck", "stopped", "amplitude", "waveform"}


def test_series_differ_from_their_nominal_only_where_labelled(sample):
    for values, mask, info in sample:
        labelled = mask.any(axis=1)
        assert np.array_equal(values[~labelled], info.nominal[~labelled])
        if not info.anomalies:
            assert not labelled.any()
            assert np.array_equal(values, info.nominal)


def test_every_labelled_span_is_an_injected_anomaly(sample):
    for values, mask, info in sample:
        for k, name in enumerate(CLASSES):
            recorded = sorted((s, e) for c, s, e, _ in info.anomalies if c == name)
            merged = spans(mask[:, k])
            assert sum(e - s for s, e in merged) == mask[:, k].sum()
            covered = np.zeros(LENGTH, bool)
            for s, e in recorded:
                covered[s:e] = True
            assert np.array_equal(covered, mask[:, k] > 0)


def test_outlier_points_deviate_from_the_nominal_series(sample):
    checked = 0
    for values, mask, info in sample:
        points = mask[:, 0] > 0
        if points.any():
            assert np.abs(values[points] - info.nominal[points]).min() >= 2.4 * info.scale
            checked += 1
    assert checked > 50


def test_volatility_segments_change_the_noise_level(sample):
    checked = 0
    for values, mask, info in sample:
        for name, start, end, variant in info.anomalies:
            if name != "volatility" or mask[start:end, [0, 2]].any():
                continue
            change = (values - info.nominal)[start:end]
            if variant == "increase":
                added = change.std()
                assert added >= max(2.0 * info.jitter, 0.08 * info.scale)
            else:
                # The noise is multiplied by at most 0.2: the change is most of the noise.
                assert info.jitter >= 0.05 * info.scale
                assert change.std() >= 0.5 * info.jitter
            checked += 1
    assert checked > 40


def test_class_frequencies_and_cycle_only_on_cyclic_series(sample):
    present = np.array([m.any(axis=0) for _, m, _ in sample])
    cyclic = np.array([info.cyclic for *_, info in sample])
    assert not present[~cyclic, 2].any()
    assert 0.1 < (~present.any(axis=1)).mean() < 0.3
    for k in range(len(CLASSES)):
        assert present[:, k].mean() > 0.15
    assert {info.shape for *_, info in sample} == set(synthetic.SHAPES)


def test_series_and_masks_have_the_public_shapes_and_types():
    values, mask = make_series(np.random.default_rng(0))
    assert values.shape == (LENGTH,) and values.dtype == np.float64
    assert mask.shape == (LENGTH, 3) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    values, mask = make_series(np.random.default_rng(0), length=300)
    assert values.shape == (300,) and mask.shape == (300, 3)


def test_series_are_reproducible_by_seed():
    a = [make_series(np.random.default_rng(5)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])
    b = make_series(np.random.default_rng(6))
    assert not np.array_equal(a[0][0], b[0])


def test_batches_are_prepared_exactly_as_the_agent_prepares_snapshots():
    x, y = make_batch(np.random.default_rng(9), 6)
    assert x.shape == (6, LENGTH, 1) and x.dtype == np.float32
    assert y.shape == (6, LENGTH, 3) and y.dtype == np.float32
    rng = np.random.default_rng(9)
    for i in range(6):
        values, mask = make_series(rng)
        expected = prepare(values[:, None], LENGTH, Normalizer("snapshot", clip=10.0))
        assert np.array_equal(x[i], expected)
        assert np.array_equal(y[i], mask)


def test_augmented_batches_keep_binary_masks_and_are_reproducible():
    augmenter = make_augmenter(allowed(CLASSES), CLASSES, rng=0, intensity=1.0, probability=0.8)
    x1, y1 = make_batch(np.random.default_rng(4), 8, augment=augmenter)
    x2, y2 = make_batch(np.random.default_rng(4), 8, augment=augmenter)
    plain, _ = make_batch(np.random.default_rng(4), 8)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, plain)
    assert y1.dtype == np.float32 and set(np.unique(y1)) <= {0.0, 1.0}
    assert np.abs(x1).max() <= 10.0


def test_dataset_streams_reproducible_batches():
    tf = pytest.importorskip("tensorflow")
    first = [(x.numpy(), y.numpy()) for x, y in synthetic.dataset(7, 4, length=256).take(3)]
    again = [(x.numpy(), y.numpy()) for x, y in synthetic.dataset(7, 4, length=256).take(3)]
    other = next(iter(synthetic.dataset(8, 4, length=256)))

    spec = synthetic.dataset(7, 4, length=256).element_spec
    assert spec[0].shape == (4, 256, 1) and spec[0].dtype == tf.float32
    assert spec[1].shape == (4, 256, 3) and spec[1].dtype == tf.float32
    for (x, y), (x2, y2) in zip(first, again):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(first[0][0], first[1][0])
    assert not np.array_equal(first[0][0], other[0].numpy())
    expected = make_batch(synthetic.batch_seed(7, 2), 4, length=256)
    assert np.array_equal(first[2][0], expected[0])


def test_unusual_shapes_task():
    x, y = unusual_shapes(1, n=60)
    assert x.shape == (60, LENGTH, 1) and y.shape == (60, LENGTH, 1)
    assert x.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    assert np.array_equal(x, unusual_shapes(1, n=60)[0])

    labelled = y[:, :, 0] > 0
    assert 0.8 <= labelled.any(axis=1).mean() < 1.0
    assert 0.05 < labelled.mean() < 0.35
    for i in range(60):
        runs = spans(y[i, :, 0])
        assert len(runs) <= 2
        if runs:
            # Level and amplitude stay plausible: the unusual segment stays in the normal range.
            inside, outside = x[i, labelled[i], 0], x[i, ~labelled[i], 0]
            assert inside.max() <= outside.max() + 0.8
            assert inside.min() >= outside.min() - 0.8


def test_synthetic_sample_figure_is_written(tmp_path):
    path = plot_synthetic_samples(tmp_path / "samples.png", seed=0, n=4, length=256)
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_snapshot_figure_is_written_and_checks_shapes(tmp_path):
    x, y = make_batch(np.random.default_rng(0), 3, length=256)
    path = plot_snapshots(tmp_path / "snap.png", x, y, y * 0.9, CLASSES, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="3 mask channels for 1 classes"):
        plot_snapshots(tmp_path / "bad.png", x, y, y, ["event"])
