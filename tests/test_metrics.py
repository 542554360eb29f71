"""Scores: segmentation IoU, SKAB's point-wise scores, event detection, and NAB scoring."""

import math

import numpy as np
import pytest

from agent.datasets import Event
from trainer.datasets import read_nab
from trainer.metrics import (NAB_SCOREBOARD_STANDARD, SKAB_LEADERBOARD, NabInput,
                             event_detection, nab_scaled_sigmoid, point_scores, score_nab,
                             segmentation_iou)

from conftest import SHARED_DATA


def one_hot(labels, classes=3):
    return np.eye(classes)[np.asarray(labels)]


# --- IoU --------------------------------------------------------------------------------------

def test_softmax_iou_per_gesture_class_leaves_the_background_out():
    truth = one_hot([0, 1, 1, 2, 2, 0])
    pred = one_hot([0, 1, 2, 2, 2, 1]) * 0.8 + 0.05  # probabilities: argmax decides
    score = segmentation_iou(truth, pred, mode="softmax", class_names=["bg", "a", "b"])
    # a: marked at {1, 2} and {1, 5} -> 1 of 3; b: {3, 4} and {2, 3, 4} -> 2 of 3.
    assert score.per_class == pytest.approx([1 / 3, 2 / 3])
    assert score.mean == pytest.approx(0.5)
    assert score.as_dict() == pytest.approx({"a": 1 / 3, "b": 2 / 3})


def test_iou_sums_intersections_and_unions_over_the_test_set_before_dividing():
    truth = np.stack([one_hot([1, 1, 1, 1]), one_hot([0, 0, 0, 1])])
    pred = np.stack([one_hot([1, 1, 1, 1]), one_hot([0, 0, 1, 1])])
    score = segmentation_iou(truth, pred)
    # Pooled: class 1 has I = 5, U = 6 (not the mean of 1 and 1/2 per snapshot).
    assert score.per_class[0] == pytest.approx(5 / 6)
    assert list(score.intersection) == [5, 0] and list(score.union) == [6, 0]
    assert math.isnan(score.per_class[1]) and score.mean == pytest.approx(5 / 6)


def test_sigmoid_iou_thresholds_each_class_channel_and_accepts_whole_recordings():
    truth = [np.array([[1, 0], [1, 0], [0, 1]]), np.array([[0, 0], [1, 1]])]
    pred = [np.array([[0.9, 0.1], [0.4, 0.2], [0.1, 0.7]]), np.array([[0.6, 0.0], [0.8, 0.5]])]
    score = segmentation_iou(truth, pred, mode="sigmoid", threshold=0.5)
    # class 0: truth at 3 points, predicted at 3, 2 shared -> 2 / 4; class 1: 2 of 2.
    assert score.per_class == pytest.approx([0.5, 1.0])
    assert score.mean == pytest.approx(0.75)


def test_iou_rejects_masks_of_different_shapes_and_unknown_modes():
    with pytest.raises(ValueError, match="differ in shape"):
        segmentation_iou(np.zeros((2, 4, 3)), np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="mode"):
        segmentation_iou(np.zeros((4, 3)), np.zeros((4, 3)), mode="argmax")


def test_iou_refuses_recording_lists_of_different_counts_instead_of_dropping_some():
    truth = [one_hot([1, 1, 0]), one_hot([2, 2, 2])]
    with pytest.raises(ValueError, match="2 true masks but 1 predicted"):
        segmentation_iou(truth, [one_hot([1, 1, 0])])


# --- SKAB point-wise scores and events ---------------------------------------------------------

def test_skab_f1_far_mar_from_counts_summed_over_experiments():
    truth = [np.array([0, 0, 1, 1, 1, 0]), np.array([0, 1, 1, 0])]
    pred = [np.array([0, 1, 1, 0, 1, 0]), np.array([0, 1, 1, 0])]
    scores = point_scores(truth, pred)
    assert (scores.tp, scores.tn, scores.fp, scores.fn) == (4, 4, 1, 1)
    assert scores.f1 == pytest.approx(4 / (4 + (1 + 1) / 2))
    assert scores.far == pytest.approx(100 * 1 / 5)
    assert scores.mar == pytest.approx(100 * 1 / 5)


def test_skab_perfect_and_null_detectors_match_the_leaderboard_rows():
    truth = [np.array([0, 1, 1, 0]), np.array([1, 0, 0, 0])]
    perfect = point_scores(truth, truth)
    null = point_scores(truth, [np.zeros(4), np.zeros(4)])
    assert (perfect.f1, perfect.far, perfect.mar) == SKAB_LEADERBOARD["Perfect detector"]
    assert (null.f1, null.far, null.mar) == SKAB_LEADERBOARD["Null detector"]
    assert max(f1 for f1, _, _ in SKAB_LEADERBOARD.values() if f1 < 1) == 0.78


def test_event_detection_matches_alarms_within_each_experiment():
    events = [[Event("a", 100, 200, 100, 200)], [Event("b", 100, 200, 100, 200)]]
    alarms = [[(150, 160), (500, 510)], [(300, 320)]]
    counts = event_detection(alarms, events)
    assert (counts.events, counts.detected, counts.alarms, counts.false_alarms) == (2, 1, 3, 2)
    assert counts.line() == "detected 1 of 2 events, 2 false alarms of 3 alarms"


# --- NAB --------------------------------------------------------------------------------------

def nab_case(scores, windows=((40, 49),), n=100):
    """A series of ``n`` rows one minute apart with windows given as row ranges."""
    ts = np.arange(n) * 60.0
    values = np.zeros(n)
    for row, score in scores.items():
        values[row] = score
    return NabInput("case", ts, values, [(ts[a], ts[b]) for a, b in windows])


def sigma(x):
    return 2 / (1 + math.exp(5 * x)) - 1


def test_nab_scaled_sigmoid_matches_nab_reference_values():
    assert nab_scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert nab_scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab_scaled_sigmoid(0.0) == pytest.approx(0.0)
    assert nab_scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert nab_scaled_sigmoid(3.0) == -1.0


def test_nab_hand_computed_case_with_threshold_sweep():
    case = nab_case({45: 0.9, 60: 0.9, 10: 0.5})
    tp = sigma(-(49 - 45 + 1) / 10) / sigma(-1)     # halfway into the 10-row window
    fp_after = 0.11 * sigma(abs(60 - 49) / (10 - 1))  # by the preceding window's distance
    fp_before = -0.11                               # no window before it
    result = score_nab([case], probation=0.0)
    # Thresholds: 1.1 gives -1; 0.9 gives tp + fp_after; 0.5 adds fp_before. 0.9 wins.
    assert result.threshold == 0.9
    assert result.raw == pytest.approx(tp + fp_after)
    assert (result.null, result.perfect) == (-1.0, 1.0)
    assert result.score == pytest.approx(100 * (tp + fp_after + 1) / 2)
    assert result.files[0].detected == 1 and result.files[0].false_positives == 1

    fixed = score_nab([case], probation=0.0, threshold=0.5)
    assert fixed.raw == pytest.approx(tp + fp_after + fp_before)


def test_nab_counts_only_the_earliest_detection_in_a_window():
    early = score_nab([nab_case({40: 1.0, 41: 1.0, 48: 1.0})], probation=0.0)
    assert early.raw == pytest.approx(1.0) and early.score == pytest.approx(100.0)
    late = score_nab([nab_case({49: 1.0})], probation=0.0)
    assert late.raw == pytest.approx(sigma(-1 / 10) / sigma(-1))


def test_nab_perfect_detector_scores_100_and_null_detector_0():
    windows = ((20, 29), (60, 79))
    perfect = nab_case({r: 1.0 for a, b in windows for r in range(a, b + 1)}, windows)
    assert score_nab([perfect], probation=0.0).score == pytest.approx(100.0)
    null = nab_case({r: 0.5 for r in range(100)}, windows)
    result = score_nab([null], probation=0.0)
    assert result.score == pytest.approx(0.0) and result.threshold == 1.1
    silent = nab_case({}, windows)
    silent.scores[:] = np.nan  # never scored: no detection anywhere
    assert score_nab([silent], probation=0.0).score == pytest.approx(0.0)


def test_nab_detector_with_only_false_positives_scores_below_zero():
    case = nab_case({r: 1.0 for r in range(60, 70)})
    result = score_nab([case], probation=0.0, threshold=1.0)
    assert result.score < 0
    assert result.files[0].false_positives == 10 and result.files[0].detected == 0


def test_nab_probationary_period_is_15_percent_capped_at_750_rows():
    windows = ((3000, 3099),)
    ignored = nab_case({700: 1.0, 3000: 1.0}, windows, n=6000)
    assert score_nab([ignored]).score == pytest.approx(100.0)
    counted = nab_case({800: 1.0, 3000: 1.0}, windows, n=6000)  # 800 > 750, although < 900
    assert score_nab([counted]).raw == pytest.approx(1.0 - 0.11)


def test_nab_threshold_is_chosen_over_the_whole_corpus():
    alone = nab_case({40: 0.6})
    noisy = nab_case({r: 0.6 for r in range(0, 20)})  # 20 false positives before its window
    assert score_nab([alone], probation=0.0).threshold == 0.6
    corpus = score_nab([alone, noisy], probation=0.0)
    # At 0.6: +1 - 1 - 20 * 0.11 = -2.2, below the -2 of detecting nothing.
    assert corpus.threshold == 1.1 and corpus.score == pytest.approx(0.0)


def test_nab_rejects_scores_outside_zero_to_one_and_unknown_profiles():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_nab([nab_case({3: 1.5})])
    with pytest.raises(ValueError, match="profile"):
        score_nab([nab_case({})], profile="lenient")


def test_nab_on_the_shared_series_perfect_null_and_scoreboard():
    path = SHARED_DATA / "nab"
    if not path.exists():
        pytest.skip(f"the shared data set is not here: expected {path} (../shared/data)")
    corpus = read_nab(path)

    def inputs(make):
        return [NabInput.for_series(s, make(s)) for s in corpus]

    def window_flags(s):
        flags = np.zeros(len(s.ts))
        for first, last in s.window_rows:
            flags[first:last + 1] = 1.0
        return flags

    perfect = score_nab(inputs(window_flags))
    assert perfect.score == pytest.approx(100.0) and perfect.perfect == 25.0
    assert score_nab(inputs(lambda s: np.full(len(s.ts), 0.5))).score == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    noise = score_nab(inputs(lambda s: rng.random(len(s.ts))))
    assert 0.0 <= noise.score < 50.0
    assert NAB_SCOREBOARD_STANDARD["ARTime (best published)"] == 74.9
    assert NAB_SCOREBOARD_STANDARD["Numenta HTM"] == 70.5
