"""Data readers on the real files, with their format traps."""

import datetime as dt

import numpy as np
import pytest

from agent.datasets import (dodgers_split, read_csv_series, read_dodgers, read_dodgers_events)
from agent.evaluation import events_with_data, score_events
from agent.timeutil import to_iso

from conftest import SHARED_DATA


def test_dodgers_series_keeps_missing_as_nan(dodgers_dir):
    series = read_dodgers(dodgers_dir / "Dodgers.data")
    assert len(series.ts) == 50_400
    assert int(np.isnan(series.values).sum()) == 2_903
    assert np.nanmin(series.values) == 0 and np.nanmax(series.values) == 90
    # Local PDT 2005-04-10 00:00 is 07:00 UTC.
    assert to_iso(series.ts[0]) == "2005-04-10T07:00:00Z"


def test_dodgers_events_read_latin1_and_split_42_39(dodgers_dir):
    series = read_dodgers(dodgers_dir / "Dodgers.data")
    events = read_dodgers_events(dodgers_dir / "Dodgers.events")
    assert len(events) == 81
    assert events[0].name == "2005-04-12 San Francisco"
    split = dodgers_split(series)
    assert sum(e.window_start < split for e in events) == 42
    assert sum(e.window_start >= split for e in events) == 39
    # Label window: [end - 30 min, end + 90 min].
    assert events[0].window_end - events[0].end == 5400
    assert events[0].end - events[0].window_start == 1800
    # Two training games and one test game fall in sensor outages.
    with_data = events_with_data(events, series, series.ts[0], series.ts[-1] + 1)
    assert len(with_data) == 78


def test_event_scoring_counts_detections_and_false_alarms(dodgers_dir):
    events = read_dodgers_events(dodgers_dir / "Dodgers.events")[:3]
    first, second = events[0], events[1]
    alarms = [(first.end, first.end + 600), (second.window_end + 60, second.window_end + 900),
              (0.0, 100.0)]
    score = score_events(alarms, events)
    assert [r.detected for r in score.events] == [True, False, False]
    assert len(score.false_alarms) == 2 and score.n_alarms == 3
    assert score.line("x.db") == "detected 1 of 3 labelled events, 2 false alarms, 3 alarms in x.db"


def test_csv_with_semicolons_and_naive_times():
    path = SHARED_DATA / "skab" / "valve1" / "1.csv"
    if not path.is_file():
        pytest.fail(f"SKAB data expected at {path}")
    series = read_csv_series(path, naive_tz=dt.timezone.utc)
    assert series.channels[0] == "Accelerometer1RMS" and "Volume Flow RateRMS" in series.channels
    assert series.values.shape == (len(series.ts), 10)
    assert to_iso(series.ts[0]) == "2020-03-09T10:34:33Z"
    assert np.all(np.diff(series.ts) >= 0)


def test_csv_with_epoch_times_commas_and_empty_cells(tmp_path):
    path = tmp_path / "historian.csv"
    path.write_text("timestamp,flow,pressure\n1700000000,1.5,\n1700000001,,2.5\n")
    series = read_csv_series(path)
    assert series.channels == ["flow", "pressure"]
    assert series.ts.tolist() == [1_700_000_000.0, 1_700_000_001.0]
    assert np.isnan(series.values[0, 1]) and np.isnan(series.values[1, 0])
