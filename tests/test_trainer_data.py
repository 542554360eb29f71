"""Readers of the experiment data sets (EMG gestures, SKAB, NAB) on the real files."""

import datetime as dt

import numpy as np
import pytest

from agent.timeutil import to_iso
from trainer.datasets import (EMG_GESTURES, EMG_LABELS, SKAB_CHANNELS, emg_classes, emg_mask,
                              emg_random_snapshots, emg_resample, emg_split, emg_windows,
                              mask_spans, nab_stream_ts, read_emg, read_emg_file, read_nab,
                              read_skab, read_skab_anomaly_free, read_skab_file)

from conftest import SHARED_DATA

EMG_DIR = SHARED_DATA / "emg_gestures"
SKAB_DIR = SHARED_DATA / "skab"
NAB_DIR = SHARED_DATA / "nab"


def _require(path):
    if not path.exists():
        pytest.skip(f"the shared data set is not here: expected {path} (../shared/data)")
    return path


@pytest.fixture(scope="module")
def emg():
    return read_emg(_require(EMG_DIR))


@pytest.fixture(scope="module")
def skab():
    return read_skab(_require(SKAB_DIR))


@pytest.fixture(scope="module")
def nab():
    return {s.name: s for s in read_nab(_require(NAB_DIR))}


# --- EMG --------------------------------------------------------------------------------------

def test_emg_has_ten_subjects_with_two_recordings_each(emg):
    assert list(emg) == ["01", "03", "05", "06", "14", "15", "28", "29", "31", "36"]
    recordings = [r for rs in emg.values() for r in rs]
    assert [r.series for r in emg["01"]] == [1, 2]
    assert min(len(r.ts) for r in recordings) == 44_927
    assert max(len(r.ts) for r in recordings) == 63_196
    assert emg["01"][0].started == dt.datetime(2016, 3, 22, 13, 12)


def test_emg_time_is_seconds_rising_and_values_are_eight_quantised_channels(emg):
    for recording in (r for rs in emg.values() for r in rs):
        assert recording.values.shape == (len(recording.ts), 8)
        assert np.all(np.diff(recording.ts) > 0)
        assert recording.ts[0] < 0.1 and 40 < recording.ts[-1] < 70
        assert np.isfinite(recording.values).all()
        assert np.abs(recording.values).max() < 2e-3
        steps = recording.values / 1e-5
        assert np.allclose(steps, np.round(steps), atol=1e-6)


def test_emg_labels_are_gestures_one_to_six_twice_each_with_unmarked_pauses(emg):
    for recording in (r for rs in emg.values() for r in rs):
        labels = recording.labels
        assert labels.min() == 0 and labels.max() == 6  # class 7 never occurs
        changes = np.flatnonzero(np.diff(labels)) + 1
        segments = labels[np.concatenate([[0], changes])]
        gestures = segments[segments != 0]
        assert list(gestures) == [1, 2, 3, 4, 5, 6] * 2
    assert emg["31"][0].labels[0] == 1  # the one file with no leading pause


def test_emg_reader_rejects_a_wrong_header_and_drops_repeated_times(tmp_path):
    bad = tmp_path / "1_raw_data_10-00_01.01.16.txt"
    bad.write_text("time,channel1,channel2\n1,0,0\n")
    with pytest.raises(ValueError, match="tab-separated header"):
        read_emg_file(bad)

    good = tmp_path / "2_raw_data_10-00_01.01.16.txt"
    header = "\t".join(["time"] + [f"channel{i}" for i in range(1, 9)] + ["class"])
    rows = ["1\t" + "\t".join(["1e-05"] * 8) + "\t0", "1\t" + "\t".join(["2e-05"] * 8) + "\t0",
            "3\t" + "\t".join(["-1e-05"] * 8) + "\t2"]
    good.write_text(header + "\n" + "\n".join(rows) + "\n")
    recording = read_emg_file(good, "99")
    assert list(recording.ts) == [0.001, 0.003]
    assert list(recording.labels) == [0, 2] and recording.series == 2


def test_emg_resampling_holds_the_latest_row_on_a_5_ms_grid(emg):
    recording = emg["05"][1]
    grid = emg_resample(recording)
    assert np.allclose(np.diff(grid.ts), 0.005)
    rows = np.searchsorted(recording.ts, grid.ts + 1e-9, side="right") - 1
    assert np.array_equal(grid.values, recording.values[rows])
    assert np.array_equal(grid.labels, recording.labels[rows])
    # About 3 s of each gesture survive as about 600 points of 5 ms.
    counts = np.bincount(grid.labels, minlength=7)
    assert all(450 < counts[g] < 900 for g in EMG_GESTURES)


def test_emg_masks_are_one_hot_with_rest_and_unmarked_as_background():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    mask = emg_mask(labels)
    assert mask.shape == (8, 6)
    assert np.array_equal(mask.sum(axis=1), np.ones(8))
    assert list(np.argmax(mask, axis=1)) == [0, 0, 1, 2, 3, 4, 5, 0]
    assert emg_classes() == ["background", "fist", "wrist flexion", "wrist extension",
                             "radial deviation", "ulnar deviation"]
    assert emg_classes((1, 2))[1] == EMG_LABELS[1]


def test_emg_snapshots_cover_recordings_in_1024_point_windows(emg):
    x, y = emg_windows(emg["14"], length=1024, hop=1024)
    grid_lengths = [len(emg_resample(r).ts) for r in emg["14"]]
    assert x.shape[1:] == (1024, 8) and y.shape[1:] == (1024, 6)
    assert len(x) == sum(int(np.ceil(n / 1024)) for n in grid_lengths)
    assert x.dtype == np.float32 and np.array_equal(y.sum(axis=2), np.ones(y.shape[:2]))
    assert (y[..., 1:].sum(axis=(0, 1)) > 0).all()  # every gesture appears

    a = emg_random_snapshots(emg["14"], 5, np.random.default_rng(7))
    b = emg_random_snapshots(emg["14"], 5, np.random.default_rng(7))
    assert a[0].shape == (5, 1024, 8) and np.array_equal(a[0], b[0])


def test_emg_split_is_by_subject_and_deterministic(emg):
    train, test = emg_split(list(emg), seed=1)
    assert len(train) == 7 and len(test) == 3 and not set(train) & set(test)
    assert sorted(train + test) == sorted(emg)
    assert emg_split(list(reversed(list(emg))), seed=1) == (train, test)
    assert len({tuple(emg_split(list(emg), seed=s)[1]) for s in range(6)}) > 1
    with pytest.raises(ValueError, match="test_count"):
        emg_split(list(emg), seed=1, test_count=10)


# --- SKAB -------------------------------------------------------------------------------------

def test_skab_has_32_experiments_with_one_anomaly_segment_each(skab):
    assert len(skab) == 32
    assert [r.name for r in skab[:3]] == ["valve1/0", "valve1/1", "valve1/2"]
    assert skab[-1].name == "other/14"
    for run in skab:
        assert 745 <= len(run.ts) <= 1327
        assert run.values.shape == (len(run.ts), 8) and np.isfinite(run.values).all()
        assert run.channels == SKAB_CHANNELS
        assert set(np.unique(run.anomaly)) == {0, 1}
        assert len(run.events()) == 1
        assert 188 <= run.anomaly.sum() <= 586
        assert 2 <= len(run.changepoint_rows) <= 4


def test_skab_labels_and_times_match_the_file(skab):
    run = next(r for r in skab if r.name == "valve1/0")
    anomalous = np.flatnonzero(run.anomaly)
    assert (anomalous[0], anomalous[-1]) == (573, 973)
    assert list(run.changepoint_rows) == [573, 630, 917, 974]
    event = run.events()[0]
    assert (event.start, event.end) == (run.ts[573], run.ts[973])

    first = next(r for r in skab if r.name == "valve1/1")
    assert to_iso(first.ts[0]) == "2020-03-09T10:34:33Z"  # naive times read as UTC
    # Nominally 1 s with gaps: five gaps of 54-247 s, more than the data README's 33 s.
    steps = np.concatenate([np.diff(r.ts) for r in skab])
    assert steps.min() >= 1 and np.median(steps) == 1.0
    assert np.sum(steps > 33) == 5 and steps.max() == 247


def test_skab_anomaly_free_file_has_no_labels():
    run = read_skab_anomaly_free(_require(SKAB_DIR))
    assert run.name == "anomaly-free" and run.values.shape == (9405, 8)
    assert not run.anomaly.any() and not run.changepoint.any()


def test_skab_reader_names_the_semicolon_format_when_given_commas(tmp_path):
    path = tmp_path / "0.csv"
    path.write_text("datetime,Accelerometer1RMS\n2020-03-09 10:14:33,0.1\n")
    with pytest.raises(ValueError, match="semicolon-separated"):
        read_skab_file(path)


# --- NAB --------------------------------------------------------------------------------------

def test_nab_series_windows_and_labels(nab):
    assert len(nab) == 10
    assert sum(len(s.windows) for s in nab.values()) == 25
    assert len(nab["realKnownCause/machine_temperature_system_failure.csv"].ts) == 22_695
    assert len(nab["realTraffic/speed_7578.csv"].ts) == 1_127
    for series in nab.values():
        assert np.isfinite(series.values).all() and len(series.values) == len(series.ts)
        for (start, end), (first, last) in zip(series.windows, series.window_rows):
            # Window limits with microseconds land exactly on data rows.
            assert series.ts[first] == start and series.ts[last] == end
        for label in series.label_ts:
            assert any(start < label < end for start, end in series.windows)
    # One labelled point per window, except two in the one window of cpu_utilization.
    assert sum(len(s.label_ts) for s in nab.values()) == 26


def test_nab_keeps_row_order_through_clock_steps(nab):
    machine = nab["realKnownCause/machine_temperature_system_failure.csv"]
    assert to_iso(machine.ts[10148]) == "2014-01-07T02:55:00Z"
    assert to_iso(machine.ts[10149]) == "2014-01-07T02:00:00Z"
    ec2 = nab["realKnownCause/ec2_request_latency_system_failure.csv"]
    stamp = dt.datetime(2014, 3, 9, 3, tzinfo=dt.timezone.utc).timestamp()
    assert int(np.sum(ec2.ts == stamp)) == 12
    assert nab["realKnownCause/nyc_taxi.csv"].period == 1800.0

    # Streaming times rise strictly; only the 12 rows of the step back move (1 s apart).
    stream = nab_stream_ts(machine.ts)
    assert np.all(np.diff(stream) > 0)
    moved = np.flatnonzero(stream != machine.ts)
    assert list(moved) == list(range(10149, 10161))
    assert stream[10160] - stream[10148] == 12.0


def test_mask_spans_are_inclusive_runs():
    ts = np.arange(8) * 10.0
    assert mask_spans(ts, [0, 1, 1, 0, 0, 1, 0, 1]) == [(10.0, 20.0), (50.0, 50.0), (70.0, 70.0)]
    assert mask_spans(ts, np.zeros(8)) == []
