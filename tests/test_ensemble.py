"""Ensemble arithmetic on hand-made cases, and snapshot cutting on the grid."""

import numpy as np
import pytest

from agent.ensemble import Ensemble
from agent.window import AssetWindow


def snapshot_scores(values):
    return np.asarray(values, dtype=float)[:, None]


def test_mean_of_overlapping_snapshots_released_when_no_snapshot_can_cover_them():
    # Snapshots of 4 slots every 2 slots, ending on slots 1, 3, 5; the stream starts at 0.
    ensemble = Ensemble(n_classes=1, snapshot_length=4, hop=2)
    none = np.zeros(4, bool)

    out = ensemble.add(1, snapshot_scores([10, 11, 12, 13]), none, first_slot=0)
    assert len(out.slots) == 0  # slots 0 and 1 will be covered again by the snapshot at 3

    out = ensemble.add(3, snapshot_scores([20, 21, 22, 23]), none, first_slot=0)
    assert out.slots.tolist() == [0, 1]
    assert out.scores[:, 0].tolist() == [16.0, 17.0]  # (12 + 20) / 2, (13 + 21) / 2
    assert out.counts.tolist() == [2, 2]

    out = ensemble.add(5, snapshot_scores([30, 31, 32, 33]), none, first_slot=0)
    assert out.slots.tolist() == [2, 3]
    assert out.scores[:, 0].tolist() == [26.0, 27.0]

    # The stream stops at slot 6: a last snapshot ends there and every slot is released;
    # slot 3 is already final and is not changed by it.
    out = ensemble.add(6, snapshot_scores([40, 41, 42, 43]), none, first_slot=0, last=True)
    assert out.slots.tolist() == [4, 5, 6]
    assert out.scores[:, 0].tolist() == [36.5, 37.5, 43.0]
    assert out.counts.tolist() == [2, 2, 1]


@pytest.mark.parametrize("method, expected", [("max", [20.0, 21.0]), ("median", [16.0, 17.0])])
def test_other_combinations(method, expected):
    ensemble = Ensemble(1, 4, 2, method)
    none = np.zeros(4, bool)
    ensemble.add(1, snapshot_scores([10, 11, 12, 13]), none, first_slot=0)
    out = ensemble.add(3, snapshot_scores([20, 21, 22, 23]), none, first_slot=0)
    assert out.scores[:, 0].tolist() == expected


def test_skipped_snapshots_and_missing_slots_are_masked():
    ensemble = Ensemble(1, 4, 2)
    missing = np.array([False, False, True, False])
    ensemble.add(1, None, np.zeros(4, bool), first_slot=0)  # too much missing: not scored
    out = ensemble.add(3, snapshot_scores([1, 1, 1, 1]), missing, first_slot=0)
    assert out.masked.tolist() == [False, False]
    out = ensemble.add(5, None, np.zeros(4, bool), first_slot=0)
    assert out.slots.tolist() == [2, 3]
    assert out.masked.tolist() == [True, False]  # slot 2 was missing in the data


def test_window_cuts_aligned_snapshots_when_due():
    window = AssetWindow(n_channels=1, sample_period=60.0, snapshot_length=8, hop=4,
                         max_lateness=0.0, max_missing=0.5)
    cut = []
    for slot in range(100, 112):
        assert window.add(0, slot, float(slot), cut) is None
    assert [s.end_slot for s in cut] == [103, 107, 111]
    last = cut[-1]
    assert last.values[:, 0].tolist() == [float(s) for s in range(104, 112)]
    assert not last.missing.any() and last.scored
    assert cut[0].missing.sum() == 4 and cut[0].scored  # 4 slots before the stream began


def test_window_rejects_late_and_duplicate_samples():
    window = AssetWindow(1, 1.0, 8, 4, max_lateness=0.0, max_missing=0.5)
    cut = []
    for slot in [0, 1, 3, 4, 5, 6, 7]:
        window.add(0, slot, 1.0, cut)
    assert window.add(0, 2, 1.0, cut) == "late"  # already inside a cut snapshot
    assert window.add(0, 3, 1.0, cut) == "duplicate"  # a redelivery, also after the cut
    window.add(0, 9, 1.0, cut)
    assert window.add(0, 9, 2.0, cut) == "duplicate"
    assert window.add(0, 8, 1.0, cut) is None  # out of order but not yet cut: accepted


def test_window_flush_cuts_up_to_the_newest_sample():
    window = AssetWindow(1, 1.0, 8, 4, max_lateness=0.0, max_missing=0.5)
    cut = []
    for slot in range(0, 10):
        window.add(0, slot, 1.0, cut)
    assert [s.end_slot for s in cut] == [3, 7]
    assert [s.end_slot for s in window.flush()] == [9]
