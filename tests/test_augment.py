"""Augmentations keep series and masks aligned; forbidden combinations are refused."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.augment import (AUGMENTATIONS, KINDS, Augmenter, allowed, make_augmenter,
                             resample_at)

LENGTH = 512
NAMES = sorted(AUGMENTATIONS)


def marked_series(rng: np.random.Generator, classes: int = 3):
    """A mask with spans of every length (1 point to 80) and a series that marks them.

    Channel k of the series is 1 where class k is labelled and 0 elsewhere, so wherever
    points of the series go, ``series >= 0.5`` tells whether they carry a label.
    """
    mask = np.zeros((LENGTH, classes))
    for k in range(classes):
        for width in (1, 2, 5, 20, 80):
            start = int(rng.integers(0, LENGTH - width))
            mask[start:start + width, k] = 1.0
    return mask.copy(), mask


@pytest.mark.parametrize("name", NAMES)
def test_augmentation_keeps_shapes_and_masks_in_range(name):
    aug = AUGMENTATIONS[name]
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.normal(size=(LENGTH, 2)), axis=0)
    mask = (rng.uniform(size=(LENGTH, 3)) < 0.1).astype(np.float64)
    for intensity in (0.0, 0.5, 1.0):
        out, out_mask = aug.apply(values, mask, rng, intensity, (values[::-1], mask[::-1]))
        assert out.shape == values.shape and out_mask.shape == mask.shape
        assert np.isfinite(out).all()
        assert out_mask.min() >= 0.0 and out_mask.max() <= 1.0


@pytest.mark.parametrize("name", [n for n in NAMES if AUGMENTATIONS[n].moves_time])
def test_mask_follows_the_points_when_time_moves(name):
    aug = AUGMENTATIONS[name]
    for seed in range(30):
        rng = np.random.default_rng(seed)
        values, mask = marked_series(rng)
        partner = marked_series(np.random.default_rng(1000 + seed))
        out, out_mask = aug.apply(values, mask, rng, 1.0, partner)
        assert np.allclose(out, out_mask, atol=1e-12), f"{name}, seed {seed}"


@pytest.mark.parametrize("name", [n for n in NAMES if not AUGMENTATIONS[n].moves_time])
def test_mask_is_unchanged_when_only_values_change(name):
    aug = AUGMENTATIONS[name]
    rng = np.random.default_rng(2)
    values = np.cumsum(rng.normal(size=(LENGTH, 2)), axis=0)
    mask = (rng.uniform(size=(LENGTH, 3)) < 0.1).astype(np.float64)
    changed = 0
    for _ in range(10):
        out, out_mask = aug.apply(values, mask, rng, 1.0, None)
        assert np.array_equal(out_mask, mask)
        changed += not np.allclose(out, values)
    assert changed >= 5


def test_reversal_reverses_series_and_mask_together():
    values, mask = marked_series(np.random.default_rng(3))
    out, out_mask = AUGMENTATIONS["reverse"].apply(values, mask, None, 1.0)
    assert np.array_equal(out, values[::-1]) and np.array_equal(out_mask, mask[::-1])


def test_mutation_brings_the_partners_labels_with_its_segment():
    own = np.zeros((LENGTH, 1)), np.zeros((LENGTH, 1))
    partner_values = np.zeros((LENGTH, 1))
    partner_mask = np.zeros((LENGTH, 1))
    partner_mask[::16] = 1.0  # an outlier every 16 points
    partner_values[::16] = 1.0
    brought = 0
    for seed in range(20):
        out, out_mask = AUGMENTATIONS["mutation"].apply(*own, np.random.default_rng(seed), 1.0,
                                                        (partner_values, partner_mask))
        assert np.array_equal(out, out_mask)
        brought += out_mask.sum() > 0
    assert brought >= 15


def test_mutation_joins_are_continuous_and_rescaled():
    values = np.sin(np.linspace(0, 20, LENGTH))[:, None]
    partner = 1000.0 + 50.0 * np.cos(np.linspace(0, 13, LENGTH))[:, None]
    none = np.zeros((LENGTH, 1))
    for seed in range(10):
        out, _ = AUGMENTATIONS["mutation"].apply(values, none, np.random.default_rng(seed),
                                                 1.0, (partner, none))
        assert not np.array_equal(out, values)
        assert np.abs(np.diff(out[:, 0])).max() < 0.2
        assert np.abs(out).max() < 3.0


def test_dropout_of_an_outlier_removes_its_label():
    values = np.zeros((5, LENGTH, 1))
    mask = np.zeros((5, LENGTH, 1))
    values[:, ::8], mask[:, ::8] = 5.0, 1.0
    augmenter = make_augmenter(["dropout"], ["outlier"], rng=5, intensity=1.0, probability=1.0)
    out, out_mask = augmenter(values, mask)
    lost = (mask > 0) & (out_mask == 0)
    assert lost.any()
    assert np.abs(out[lost]).max() < 2.5
    assert (out[out_mask > 0] >= 2.5).all()


def test_masks_are_soft_along_the_chain_and_binary_at_its_end():
    values = np.array([[0.0], [1.0], [0.0]])
    mask = np.array([[0.0], [1.0], [0.0]])
    out, out_mask = resample_at(values, mask, np.array([0.4, 0.5, 0.6, 1.5, 1.6]))
    assert out_mask[:, 0].tolist() == pytest.approx([0.4, 0.5, 0.6, 0.5, 0.4])
    assert np.array_equal(out, out_mask)

    rng = np.random.default_rng(8)
    values, mask = marked_series(rng)
    augmenter = make_augmenter(["time_warp", "crop"], ["outlier"], rng=1, probability=1.0)
    out, out_mask = augmenter(values, mask)
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    assert np.array_equal(out >= 0.5, out_mask > 0)


def test_every_augmentation_states_its_forbidden_kinds_and_why():
    assert len(AUGMENTATIONS) >= 12
    for aug in AUGMENTATIONS.values():
        assert aug.forbidden <= set(KINDS)
        assert len(aug.why) > 40
    assert "cycle" in AUGMENTATIONS["mutation"].forbidden
    assert "outlier" in AUGMENTATIONS["smooth"].forbidden


@pytest.mark.parametrize("name,kind", [(n, k) for n in NAMES
                                       for k in sorted(AUGMENTATIONS[n].forbidden)])
def test_forbidden_combinations_are_refused(name, kind):
    with pytest.raises(ValueError, match=f"'{name}' must not be used with class '{kind}'"):
        make_augmenter(["jitter", name], ["outlier", kind] if kind != "outlier" else [kind])


def test_classes_can_be_mapped_to_kinds():
    with pytest.raises(ValueError, match=r"class 'game' \(kind 'level'\)"):
        make_augmenter(["random_trend"], {"game": "level"})
    augmenter = make_augmenter(["time_warp", "jitter"], {"game": "level"}, rng=0)
    assert augmenter.names == ["time_warp", "jitter"]
    with pytest.raises(ValueError, match="class 'game' has no known anomaly kind"):
        make_augmenter(["jitter"], ["game"])


def test_unknown_names_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown augmentations \['warp'\]"):
        make_augmenter(["warp"], ["outlier"])
    with pytest.raises(ValueError, match="intensity must be in"):
        make_augmenter(["jitter"], ["outlier"], intensity=2.0)
    with pytest.raises(ValueError, match="probability must be in"):
        make_augmenter(["jitter"], ["outlier"], probability=-0.1)


def test_allowed_lists_exactly_the_augmentations_not_forbidden():
    names = allowed(["outlier", "volatility", "cycle"])
    assert "mutation" not in names and "time_warp" not in names and "smooth" not in names
    for name in names:
        make_augmenter([name], ["outlier", "volatility", "cycle"])
    assert allowed(["outlier"]) == [n for n in AUGMENTATIONS if n != "smooth"]


def test_augmenter_on_a_batch_is_reproducible_and_keeps_dtypes():
    rng = np.random.default_rng(6)
    values = rng.normal(size=(5, LENGTH, 1)).astype(np.float32)
    mask = (rng.uniform(size=(5, LENGTH, 3)) < 0.05).astype(np.float32)
    augmenter = make_augmenter(allowed(["outlier"]), ["outlier"], rng=0, intensity=1.0,
                               probability=1.0)
    assert isinstance(augmenter, Augmenter)
    first = augmenter(values, mask, rng=np.random.default_rng(1))
    again = augmenter(values, mask, rng=np.random.default_rng(1))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[0].dtype == np.float32 and first[1].dtype == np.float32
    assert first[0].shape == values.shape and first[1].shape == mask.shape
    assert not np.array_equal(first[0], values)

    one, one_mask = augmenter(values[0], mask[0])
    assert one.shape == values[0].shape and one_mask.shape == mask[0].shape
    with pytest.raises(ValueError, match="must be"):
        augmenter(values, mask[:, :100])


def test_marker_series_stay_aligned_through_a_chain_of_time_moves():
    rng = np.random.default_rng(7)
    pairs = [marked_series(rng, classes=1) for _ in range(6)]
    values = np.stack([p[0] for p in pairs])
    mask = np.stack([p[1] for p in pairs])
    chain = ["time_warp", "crop", "zoom", "reverse", "mutation", "dropout"]
    augmenter = make_augmenter(chain, ["outlier"], rng=3, intensity=1.0, probability=1.0)
    out, out_mask = augmenter(values, mask)

    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    assert np.array_equal(out >= 0.5, out_mask > 0)
