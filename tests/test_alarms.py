"""Alarm raise and clear: threshold, on-delay, hysteresis, masking, stable ids."""

import numpy as np

from agent.alarms import AlarmTracker


def tracker(min_duration=3.0):
    return AlarmTracker("pump1", "spike", "model-1", sample_period=1.0, threshold=0.5,
                        hysteresis=0.2, min_duration=min_duration)


def feed(t, scores, masked=None, start=0):
    scores = np.asarray(scores, float)
    masked = np.zeros(len(scores), bool) if masked is None else np.asarray(masked)
    return t.update(np.arange(start, start + len(scores)), scores, masked)


def test_on_delay_then_hysteresis_clear():
    t = tracker()
    events = feed(t, [0.1, 0.6, 0.7, 0.4, 0.6, 0.6, 0.6, 0.4, 0.35, 0.2])
    assert [e.state for e in events] == ["active", "cleared"]
    raised, cleared = events
    assert raised.start == 4.0  # the run at 1-2 was too short for the 3 s on-delay
    assert cleared.start == 4.0 and cleared.end == 8.0  # 0.4 and 0.35 stay above 0.3
    assert cleared.peak_score == 0.6
    assert raised.alarm_id == cleared.alarm_id


def test_a_masked_slot_neither_raises_nor_holds_an_alarm():
    t = tracker(min_duration=1.0)
    assert feed(t, [0.9, 0.9], masked=[True, True]) == []
    events = feed(t, [0.9, 0.9, 0.9], masked=[False, True, False], start=2)
    assert [e.state for e in events] == ["active", "cleared", "active"]


def test_ids_are_stable_across_runs_and_differ_by_start():
    a = feed(tracker(1.0), [0.9, 0.1])
    b = feed(tracker(1.0), [0.9, 0.1])
    c = feed(tracker(1.0), [0.1, 0.9, 0.1])
    assert a[0].alarm_id == b[0].alarm_id
    assert a[0].alarm_id != c[0].alarm_id


def test_message_fields():
    raised = feed(tracker(1.0), [0.9])[0]
    message = raised.to_message()
    assert message["state"] == "active" and message["end"] is None
    assert message["start"] == "1970-01-01T00:00:00Z"
    assert set(message) == {"alarm_id", "asset", "class", "state", "start", "end", "last_above",
                            "peak_score", "threshold", "model_id"}
