"""The pipeline without MQTT: gaps, restarts and bad timestamps, with a stand-in model.

The stand-in backend scores each point by its normalized value (a real ONNX bundle is used in
the end-to-end and bundle tests); here the point is the pipeline's bookkeeping.
"""

import numpy as np
import pytest

from agent.ingest import PayloadError, Route, decode_payload
from agent.pipeline import AssetPipeline, AssetSettings, Pipeline, alarm_spans, run_series
from agent.snapshot import Normalizer


class ValueBackend:
    """Score = the snapshot's own (normalized, clipped) value: spikes above 0.5 alarm."""

    name = "value"

    def run(self, batch):
        return np.clip(batch, 0.0, 1.0)


class StandInBundle:
    model_id = "stand-in"
    model_length = 64
    classes = ["spike"]
    activation = "sigmoid"

    def normalizer(self, mode):
        return Normalizer("fixed", center=np.zeros(1), scale=np.ones(1))

    def class_scores(self, outputs):
        return outputs


def pipeline(snapshot_length=64, hop=16):
    settings = AssetSettings("a", ["x"], sample_period=1.0, snapshot_length=snapshot_length,
                             hop=hop, threshold=0.5, hysteresis=0.1, min_duration=2.0,
                             max_lateness=0.0)
    asset = AssetPipeline(settings, StandInBundle(), ValueBackend())
    return Pipeline([asset]), asset


def test_a_spike_raises_one_alarm_covering_it():
    p, _ = pipeline()
    ts = np.arange(1000.0, 1300.0)
    values = np.zeros((300, 1))
    values[100:110, 0] = 1.0
    events = run_series(p, "a", ts, values, ["x"])
    spans = list(alarm_spans(events).values())
    assert spans == [(1100.0, 1109.0)]
    assert [e.state for e in events] == ["active", "cleared"]


def test_a_long_gap_restarts_the_window_and_clears_alarms():
    p, asset = pipeline()
    ts = np.concatenate([np.arange(1000.0, 1100.0), np.arange(5000.0, 5100.0)])
    values = np.zeros((200, 1))
    values[95:100, 0] = 1.0  # alarm in progress when the gap starts
    events = run_series(p, "a", ts, values, ["x"])
    assert asset.counters["window_restarts"] == 1
    assert [e.state for e in events] == ["active", "cleared"]
    assert asset.counters["samples_accepted"] == 200


def test_missing_samples_never_raise_an_alarm():
    p, _ = pipeline()
    ts = np.arange(1000.0, 1300.0)
    values = np.zeros((300, 1))
    values[100:130, 0] = np.nan  # a gap shorter than a snapshot, filled and masked
    assert run_series(p, "a", ts, values, ["x"]) == []


def test_every_slot_is_released_exactly_once():
    p, asset = pipeline(snapshot_length=64, hop=16)
    run_series(p, "a", np.arange(0.0, 517.0), np.zeros((517, 1)), ["x"])
    assert asset.counters["slots_final"] == 517


@pytest.mark.parametrize("payload", [b"[" * 100_000 + b"]" * 100_000,
                                     b'{"ts": 1e23, "value": 1}', b'{"ts": -5, "value": 1}'])
def test_hostile_payloads_are_rejected_not_raised(payload):
    route = Route("a", "x", frozenset({"x"}))
    with pytest.raises(PayloadError):
        decode_payload(payload, route)


def test_a_clock_that_steps_back_restarts_the_window_instead_of_blinding_the_asset():
    p, asset = pipeline(snapshot_length=64, hop=16)
    ts = np.arange(1000.0, 1200.0)
    run_series(p, "a", ts[:100], np.zeros((100, 1)), ["x"])
    asset.add([("x", 1150.0 + 20_000.0, 0.0)])  # one sample from a clock far ahead (< 1 day)
    rejected = asset.add([("x", float(t), 0.0) for t in ts[100:200]])
    assert rejected["late"] == 64  # one snapshot's worth, then the window restarts
    assert asset.counters["window_restarts"] >= 1
    assert asset.counters["samples_accepted"] == 100 + 1 + 36
