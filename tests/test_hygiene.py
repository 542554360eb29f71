"""Stream hygiene: every kind of bad input is counted by its reason and good data keeps
flowing; gaps, flat lines and stuck sensors never raise an alarm by themselves.

Most tests drive the pipeline with stand-in models (the point is the bookkeeping); one uses
the shipped Dodgers bundle on real data, and one runs the real service against a real
Mosquitto.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.config import ConfigError, load_config, parse_config
from agent.datasets import Series, dodgers_split, read_dodgers
from agent.ingest import IngestLimits, PayloadError, Route, decode_payload
from agent.pipeline import (AssetPipeline, AssetSettings, Pipeline, alarm_spans, run_series,
                            settings_from_bundle)
from agent.snapshot import Normalizer, fill_missing, prepare
from agent.window import AssetWindow

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0  # 2023-11-14: after the default epoch, in the past
NOW = T0 + 100_000.0
LIMITS = IngestLimits(max_payload_bytes=8192, max_samples=100,
                      min_timestamp=946_684_800.0, max_future=86_400.0)


class ValueBackend:
    """Score = the snapshot's own (normalized, clipped) value: values above 0.5 alarm."""

    def run(self, batch):
        return np.clip(batch[..., :1], 0.0, 1.0)


class RampBackend:
    """A model that fires wherever its input is a straight line: exactly what linear
    interpolation across a gap produces, and what noisy real data never is."""

    def run(self, batch):
        x = batch[..., 0].astype(np.float64)
        second = np.abs(np.diff(x, n=2, axis=-1))
        straight = np.zeros_like(x)
        straight[:, 1:-1] = second < 1e-6
        return straight[..., None].astype(np.float32)


class StandInBundle:
    model_id = "stand-in"
    model_length = 64
    classes = ["anomaly"]
    activation = "sigmoid"

    def __init__(self, n_channels: int = 1):
        self.n_channels = n_channels

    def normalizer(self, mode):
        return Normalizer("fixed", center=np.zeros(self.n_channels),
                          scale=np.ones(self.n_channels))

    def class_scores(self, outputs):
        return outputs


def make(channels=("x",), backend=None, **overrides):
    values = dict(sample_period=1.0, snapshot_length=64, hop=16, threshold=0.5,
                  hysteresis=0.1, min_duration=2.0, max_lateness=0.0)
    values.update(overrides)
    settings = AssetSettings("a", list(channels), **values)
    asset = AssetPipeline(settings, StandInBundle(len(channels)), backend or ValueBackend())
    return Pipeline([asset]), asset


def feed(pipeline, asset, route, payloads, limits=LIMITS, now=NOW):
    """What the service does with each message: decode, place on the grid, count reasons."""
    counts: collections.Counter = collections.Counter()
    events = []
    for payload in payloads:
        try:
            decoded = decode_payload(payload, route, limits, now=now)
        except PayloadError as exc:
            counts[exc.reason] += 1
            continue
        counts.update(reason for reason, _ in decoded.rejected)
        counts.update(asset.add(decoded.samples))
        events += pipeline.step()
    return counts, events + pipeline.stop()


def sample(ts, value):
    return json.dumps({"ts": ts, "value": value}).encode()


def spike_series(n=300, at=150):
    rng = np.random.default_rng(0)
    values = 0.1 + 0.05 * rng.standard_normal(n)
    values[at:at + 10] = 1.0
    return T0 + np.arange(n, dtype=float), values


# Decoder and grid: each bad input, its reason, and the good data still flowing ------------

def test_every_bad_input_is_counted_by_reason_and_the_good_data_gives_the_same_alarms():
    ts, values = spike_series()
    good = [sample(t, v) for t, v in zip(ts, values)]
    clean_pipeline, _ = make(channel_ranges=[(-1.0, 10.0)])
    clean_counts, clean = feed(clean_pipeline, clean_pipeline.assets["a"],
                               Route("a", "x", frozenset({"x"})), good)
    assert clean_counts == {} and len(clean) == 2  # raise and clear of the spike

    t = float(ts[200])
    bad = [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b'{"ts": %d, "value": nan}' % t,  # lower case: not even Python reads it
        b'{"ts": %d, "value": NaN}' % t,
        b'{"ts": %d, "value": Infinity}' % t,
        b'{"ts": %d, "value": -Infinity}' % t,
        b'{"ts": %d, "value": 1e400}' % t,
        b'{"ts": %d, "value": ' % t + b"9" * 5000 + b"}",
        b'{"ts": %d, "value": "3.5"}' % t,
        b'{"ts": %d, "value": {"a": [1, {"b": null}]}}' % t,
        b'{"ts": {"nested": [1, 2]}, "value": 1}',
        b'[[1, 2], "x", {"ts": %d}]' % t,  # three malformed samples in one batch
        b"[" * 4000 + b"]" * 4000,  # nested too deeply, within the size limit
        b" " * (LIMITS.max_payload_bytes + 1),
        json.dumps([{"ts": t, "value": 0.1}] * (LIMITS.max_samples + 1)).encode(),
        sample(12_345.0, 0.1),  # uptime of a sensor without a clock
        sample(NOW + 2 * 86_400.0, 0.1),
        sample(t, -5.0),  # below the channel's physical range
        sample(t, 11.0),
    ]
    expected = collections.Counter({
        "malformed_json": 3, "not_utf8": 1, "non_finite": 5, "not_a_number": 2,
        "bad_timestamp": 1, "malformed_sample": 3, "oversized": 1, "too_many_samples": 1,
        "before_epoch": 1, "future_timestamp": 1, "out_of_range": 2,
        "duplicate": 1, "late": 1,
    })
    # Bad input in the middle of the stream; a redelivered sample and a very late one.
    stream = good[:200] + bad + [good[199], sample(float(ts[10]) + 0.2, 0.1)] + good[200:]
    pipeline, asset = make(channel_ranges=[(-1.0, 10.0)])
    counts, events = feed(pipeline, asset, Route("a", "x", frozenset({"x"})), stream)
    assert counts == expected
    assert alarm_spans(events) == alarm_spans(clean)
    assert asset.counters["samples_accepted"] == len(good)


def test_unknown_channels_are_dropped_alone_on_an_asset_topic():
    route = Route("a", None, frozenset({"x", "y"}))
    decoded = decode_payload(
        json.dumps({"ts": T0, "values": {"x": 1, "speed": 2, "y": 3, "rpm": 4}}).encode(),
        route, LIMITS, now=NOW)
    assert sorted(decoded.samples) == [("x", T0, 1.0), ("y", T0, 3.0)]
    assert [reason for reason, _ in decoded.rejected] == ["unknown_channel"] * 2
    with pytest.raises(PayloadError) as info:
        decode_payload(json.dumps({"ts": T0, "values": {"speed": 2}}).encode(), route, LIMITS)
    assert info.value.reason == "unknown_channel"


def test_non_finite_and_out_of_range_values_are_rejected_on_the_grid():
    _, asset = make(channels=("x", "y"), channel_ranges=[(0.0, 1.0), (None, 5.0)])
    rejected = asset.add([("x", T0, float("nan")), ("x", T0 + 1, float("inf")),
                          ("x", T0 + 2, -0.1), ("x", T0 + 3, 1.5), ("x", T0 + 4, 1.0),
                          ("y", T0, -1e9), ("y", T0 + 1, 5.1), ("z", T0, 1.0)])
    assert rejected == {"non_finite": 2, "out_of_range": 3, "unknown_channel": 1}
    assert asset.counters["samples_accepted"] == 2  # x = 1.0 (at the bound) and y = -1e9


def test_out_of_order_samples_within_the_lateness_are_reordered_and_beyond_are_late():
    ts, values = spike_series(n=200, at=100)
    in_order, _ = make(max_lateness=4.0)
    reference = run_series(in_order, "a", ts, values[:, None], ["x"])

    order = np.arange(len(ts))
    for lo in range(0, len(ts), 4):  # every block of 4 samples arrives reversed
        order[lo:lo + 4] = order[lo:lo + 4][::-1]
    shuffled, asset = make(max_lateness=4.0)
    rejected = asset.add([("x", float(ts[i]), float(values[i])) for i in order])
    events = shuffled.step()
    assert rejected == {}

    rejected = asset.add([("x", float(ts[i]) + 0.3, 0.1) for i in range(10)])  # cut long ago
    assert rejected == {"late": 10}
    events += shuffled.stop()
    assert alarm_spans(events) == alarm_spans(reference)


# Gaps --------------------------------------------------------------------------------------

def test_a_short_gap_is_interpolated_and_scored_a_long_gap_is_masked_with_its_guard():
    window = AssetWindow(1, 1.0, 64, 64, max_lateness=0.0, max_missing=0.5, max_fill=3,
                         gap_guard=5)
    cut = []
    for slot in range(1024, 1089):
        if not (1034 <= slot < 1037 or 1054 <= slot < 1064):  # gaps of 3 and 10 slots
            window.add(0, slot, float(slot), cut)
    [snap] = cut
    assert snap.end_slot == 1087 and snap.scored and snap.condition == "ok"
    masked = [1024 + i for i in np.flatnonzero(snap.missing)]
    # The guard after the stream's start, then the long gap and 5 slots after it; the short
    # gap is not masked.
    assert masked == list(range(1024, 1029)) + list(range(1054, 1069))

    filled = fill_missing(snap.values)[:, 0]  # linear: the ramp of the data itself
    assert filled.tolist() == [float(s) for s in range(1024, 1088)]


def test_values_filled_across_a_gap_never_raise_an_alarm():
    rng = np.random.default_rng(1)
    n = 2000
    ts = T0 + np.arange(n, dtype=float)
    values = 0.2 + 0.05 * rng.standard_normal(n)
    for start, length in [(300, 4), (500, 12), (800, 40), (1200, 90), (1600, 150)]:
        values[start:start + length] = np.nan

    pipeline, asset = make(backend=RampBackend(), snapshot_length=256, hop=32, max_fill=3)
    assert run_series(pipeline, "a", ts, values[:, None], ["x"]) == []
    assert asset.counters["slots_masked"] > 12 + 40 + 90 + 150

    # The same stream with the gaps treated as data: the filled ramps do raise alarms.
    unguarded, _ = make(backend=RampBackend(), snapshot_length=256, hop=32, max_fill=1000)
    assert len(run_series(unguarded, "a", ts, values[:, None], ["x"])) > 0


def test_a_gap_longer_than_a_snapshot_restarts_the_window_cleanly():
    ts, values = spike_series(n=200, at=50)
    ts = np.concatenate([ts, ts + 1000.0])
    values = np.concatenate([values, values])
    pipeline, asset = make()
    events = run_series(pipeline, "a", ts, values[:, None], ["x"])
    assert asset.counters["window_restarts"] == 1
    assert len(alarm_spans(events)) == 2  # one spike before and one after the gap
    assert asset.counters["samples_accepted"] == 400
    assert asset.sensor_status() == {"x": "no_data"}  # stopped: nothing buffered


# Flat lines and stuck sensors ----------------------------------------------------------------

def test_a_flat_line_is_a_sensor_status_not_an_anomaly():
    pipeline, asset = make()
    ts = T0 + np.arange(400, dtype=float)
    values = np.full(400, 1.0)  # flat at a level the stand-in model scores as 1
    values[300:] = 0.1 + 0.05 * np.random.default_rng(2).standard_normal(100)
    values[350:360] = 1.0  # a real spike once the sensor is alive again

    events = []
    asset.add([("x", float(t), float(v)) for t, v in zip(ts[:200], values[:200])])
    events += pipeline.step()
    assert asset.sensor_status() == {"x": "flatline"}
    asset.add([("x", float(t), float(v)) for t, v in zip(ts[200:], values[200:])])
    events += pipeline.step()
    assert asset.sensor_status() == {"x": "ok"}
    events += pipeline.stop()

    spans = list(alarm_spans(events).values())
    assert spans == [(T0 + 350, T0 + 359)]  # the spike, never the flat line
    assert asset.counters["flatline_snapshots"] > 0


def test_a_sensor_stuck_at_its_rail_is_reported_and_masked():
    ts = T0 + np.arange(400, dtype=float)
    values = 0.1 + 0.05 * np.random.default_rng(3).standard_normal(400)
    values[100:160] = 10.0  # at the top of its range: the stand-in model would score 1
    values[250:300] = -1.0  # at the bottom

    pipeline, asset = make(channel_ranges=[(-1.0, 10.0)], stuck_run=10)
    assert asset.add([("x", float(t), float(v)) for t, v in zip(ts[:160], values[:160])]) == {}
    events = pipeline.step()
    assert asset.sensor_status() == {"x": "stuck_high"}
    asset.add([("x", float(t), float(v)) for t, v in zip(ts[160:300], values[160:300])])
    events += pipeline.step()
    assert asset.sensor_status() == {"x": "stuck_low"}
    asset.add([("x", float(t), float(v)) for t, v in zip(ts[300:], values[300:])])
    events += pipeline.stop()
    assert events == [] and asset.counters["stuck_snapshots"] > 0
    assert asset.counters["samples_accepted"] == 400

    control, _ = make(channel_ranges=[(-1.0, 10.0)], stuck_run=0)  # detection off
    assert len(run_series(control, "a", ts, values[:, None], ["x"])) > 0


def test_a_channel_that_never_sent_is_no_data():
    _, asset = make(channels=("x", "y"))
    assert asset.sensor_status() == {"x": "no_data", "y": "no_data"}
    rng = np.random.default_rng(4)
    asset.add([("x", T0 + i, float(rng.random())) for i in range(100)])
    assert asset.sensor_status() == {"x": "ok", "y": "no_data"}


@pytest.mark.parametrize("raw", [np.zeros((64, 2)), np.full((64, 2), 7.5), np.full((64, 2), 1e12),
                                 3.0 + 1e-9 * np.arange(128.0).reshape(64, 2)])
def test_per_snapshot_normalization_never_divides_by_zero(raw):
    with np.errstate(all="raise"):
        out = prepare(raw, 32, Normalizer("snapshot", clip=10.0))
    assert np.isfinite(out).all() and np.abs(out).max() < 1e-3


def test_fixed_normalization_uses_the_bundle_scales_and_clips_to_the_trained_range():
    norm = Normalizer("fixed", center=np.array([10.0, 0.0]), scale=np.array([2.0, 0.5]),
                      clip=3.0)
    out = norm(np.array([[12.0, 0.25], [100.0, -100.0]]))
    assert out.tolist() == [[1.0, 0.5], [3.0, -3.0]]


# Multichannel assets ---------------------------------------------------------------------------

def test_three_channels_share_one_grid_with_a_lagging_and_a_missing_channel():
    rng = np.random.default_rng(5)
    n = 400
    ts = T0 + np.arange(n, dtype=float)
    data = 0.2 + 0.05 * rng.standard_normal((n, 3))
    data[150:250, 1] = np.nan  # channel b is silent for 100 samples
    names = ["a", "b", "c"]

    pipeline, asset = make(channels=names, max_lateness=3.0, snapshot_length=64, hop=16)
    rejected = collections.Counter()
    for i in range(n):
        batch = [(names[k], float(ts[i]), float(data[i, k])) for k in (0, 1)
                 if np.isfinite(data[i, k])]
        if i >= 2:  # channel c lags two samples behind the others
            batch.append(("c", float(ts[i - 2]), float(data[i - 2, 2])))
        rejected.update(asset.add(batch))
        if i == 240:  # b silent for longer than a snapshot
            assert asset.sensor_status() == {"a": "ok", "b": "no_data", "c": "ok"}
    rejected.update(asset.add([("c", float(ts[i]), float(data[i, 2])) for i in (n - 2, n - 1)]))
    cuts = [item.snapshot for item in asset.pending if item.snapshot is not None]
    events = pipeline.step() + pipeline.stop()

    assert rejected == {} and events == []
    slot0 = asset.window.slot(ts[0])
    for snapshot in cuts:
        rows = np.arange(snapshot.end_slot - 63, snapshot.end_slot + 1) - slot0
        inside = rows >= 0
        expected = data[rows[inside]]
        assert np.array_equal(snapshot.values[inside], expected, equal_nan=True)
        silent = (rows >= 150) & (rows < 250)
        assert snapshot.missing[silent].all()
    assert asset.counters["samples_accepted"] == int(np.isfinite(data).sum())


# Configuration ----------------------------------------------------------------------------------

def _config(tmp_path, asset_extra=None, top_extra=None, channel_extra=None):
    raw = {
        "broker": {"host": "127.0.0.1", "port": 1883},
        "database": "alarms.db",
        "assets": [{"name": "pump", "sample_period": 1, "model": "model",
                    "channels": [{"name": "flow", "topic": "s/flow", **(channel_extra or {})}],
                    **(asset_extra or {})}],
        **(top_extra or {}),
    }
    return parse_config(raw, tmp_path / "agent.yaml")


def test_configuration_keys_for_hygiene(tmp_path):
    config = _config(tmp_path)
    assert config.ingest.min_timestamp == 946_684_800.0  # 2000-01-01T00:00:00Z
    assert config.ingest.max_future == 86_400.0 and config.ingest.max_payload_bytes == 1_000_000
    asset = config.assets[0]
    assert (asset.max_fill, asset.long_gap, asset.gap_guard, asset.stuck_run) == (
        3, None, None, 10)
    assert (asset.channels[0].min, asset.channels[0].max) == (None, None)

    config = _config(tmp_path, {"max_fill": 5, "gap_guard": 40, "stuck_run": 0},
                     {"ingest": {"min_timestamp": "2020-01-01T00:00:00Z", "max_future": "1h",
                                 "max_payload_bytes": 4096, "max_samples": 50}},
                     {"min": 0, "max": 250.5})
    assert config.ingest == IngestLimits(4096, 50, 1_577_836_800.0, 3600.0)
    assert (config.assets[0].channels[0].min, config.assets[0].channels[0].max) == (0.0, 250.5)
    assert config.assets[0].gap_guard == 40


@pytest.mark.parametrize("asset_extra, top_extra, channel_extra, key", [
    ({}, {}, {"min": 5, "max": 5}, "channels[0].max"),
    ({}, {}, {"min": "low"}, "channels[0].min"),
    ({"max_fill": -1}, {}, {}, "max_fill"),
    ({}, {"ingest": {"min_timestamp": "2000-01-01"}}, {}, "ingest.min_timestamp"),
    ({}, {"ingest": {"max_samples": 0}}, {}, "ingest.max_samples"),
    ({}, {"ingest": {"limit": 3}}, {}, "ingest.limit"),
])
def test_bad_hygiene_keys_are_refused_by_name(tmp_path, asset_extra, top_extra, channel_extra,
                                              key):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, asset_extra, top_extra, channel_extra)
    assert key in str(info.value)


# Real data, real model: a gap in a normal stretch of the Dodgers series ---------------------

# (first missing sample, gap length) in stretches with no game within a day; each of the
# gaps of 100 samples and more raises an alarm after it when the guard is off (measured,
# see docs/configuration.md).
DODGERS_GAPS = [(41350, 3), (29207, 36), (32898, 100), (36875, 128), (18720, 200),
                (19463, 300), (29207, 600), (20819, 900), (19228, 2000)]


def test_a_gap_in_a_normal_stretch_of_dodgers_data_raises_no_alarm(dodgers_dir, dodgers_bundle):
    from agent.bundle import load_bundle
    from agent.inference import load_backend

    series = read_dodgers(dodgers_dir / "Dodgers.data")
    bundle = load_bundle(dodgers_bundle)
    backend = load_backend(bundle)

    def alarms(values, lo, hi, **overrides):
        settings = settings_from_bundle(bundle, "dodgers", **overrides)
        pipeline = Pipeline([AssetPipeline(settings, bundle, backend)])
        events = run_series(pipeline, "dodgers", series.ts[lo:hi], values[lo:hi],
                            series.channels)
        return sorted(alarm_spans(events).values())

    def new(got, reference):
        return [a for a in got if not any(a[0] <= r[1] and a[1] >= r[0] for r in reference)]

    unguarded = 0
    for start, length in DODGERS_GAPS:
        lo, hi = start - 3000, start + length + 3000
        reference = alarms(series.values, lo, hi)
        values = series.values.copy()
        values[start:start + length] = np.nan
        assert new(alarms(values, lo, hi), reference) == [], (start, length)
        if length >= 100:
            unguarded += len(new(alarms(values, lo, hi, gap_guard=0), reference)) > 0
    assert unguarded == len([g for g in DODGERS_GAPS if g[1] >= 100])  # the guard matters


# The service through a real Mosquitto -----------------------------------------------------------

class Watcher:
    """Subscribes to the agent's status and alarm topics."""

    def __init__(self, port: int):
        self.status: dict = {}
        self.counters: dict = {}
        self.alarms: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hygiene-watcher")
        self.client.on_connect = lambda c, *_: c.subscribe([("segwatch/+/alarm", 1),
                                                            ("segwatch/agents/+/status", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message):
        doc = json.loads(message.payload)
        with self.lock:
            if message.topic.endswith("/status"):
                self.status = doc
                self.counters = doc.get("counters", self.counters)
            else:
                self.alarms.append(doc)

    def wait(self, condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; last status {self.status}"
            time.sleep(0.05)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hygiene-sensor")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_service_counts_bad_input_by_reason_and_keeps_alarming_on_good_data(
        mosquitto, tmp_path, dodgers_dir, dodgers_bundle):
    from agent.bundle import load_bundle
    from agent.inference import load_backend
    from agent.replay import replay
    from agent.service import _settings

    topic, asset_topic = "sensors/dodgers/count", "sensors/dodgers/all"
    series = read_dodgers(dodgers_dir / "Dodgers.data")
    first = int(np.searchsorted(series.ts, dodgers_split(series)))
    rows = slice(first, first + 14 * 288)  # two weeks: four home games
    good = Series(series.ts[rows], series.values[rows], series.channels, series.period)
    half = len(good.ts) // 2
    halves = [Series(good.ts[s], good.values[s], good.channels, good.period)
              for s in (slice(0, half), slice(half, None))]

    config_path = tmp_path / "agent.yaml"
    config_path.write_text(yaml.safe_dump({
        "broker": {"host": "127.0.0.1", "port": mosquitto.port, "client_id": "hygiene-agent"},
        "database": str(tmp_path / "alarms.db"),
        "status_interval": 0.3,
        "assets": [{"name": "dodgers", "sample_period": "5min", "model": str(dodgers_bundle),
                    "topic": asset_topic,
                    "channels": [{"name": "count", "topic": topic, "min": -1, "max": 1000}]}],
    }))
    config = load_config(config_path)
    bundle = load_bundle(dodgers_bundle)
    offline = Pipeline([AssetPipeline(_settings(config.assets[0], bundle), bundle,
                                      load_backend(bundle))])
    expected_ids = {e.alarm_id for e in run_series(offline, "dodgers", good.ts, good.values,
                                                   good.channels)}
    assert len(expected_ids) >= 2

    newest = half - 1
    while not np.isfinite(good.values[newest, 0]):
        newest -= 1
    t_mid, v_mid = float(good.ts[newest]), float(good.values[newest, 0])
    bad = [
        (topic, b"{not json"),
        (topic, b"\xff\xfe\xfd"),
        (topic, b'{"ts": %d, "value": NaN}' % t_mid),
        (topic, b'{"ts": %d, "value": -Infinity}' % t_mid),
        (topic, b'{"ts": %d, "value": "41"}' % t_mid),
        (topic, b'{"ts": %d, "value": [[{"deep": [1]}]]}' % t_mid),
        (topic, b"[" + b" " * 1_000_000 + b"]"),
        (topic, json.dumps([{"ts": t_mid, "value": 1.0}] * 10_001).encode()),
        (topic, sample(86_400.0 * 3, 12.0)),  # uptime: three days since boot
        (topic, sample(time.time() + 30 * 86_400.0, 12.0)),
        (topic, sample(t_mid, -5.0)),
        (topic, sample(t_mid, v_mid)),  # a redelivery of the newest good sample
        (topic, sample(float(good.ts[0]) - 3600.0, 12.0)),  # long cut
        (asset_topic, json.dumps({"ts": t_mid, "values": {"speed": 3}}).encode()),
    ]
    expected_rejections = {
        "rejected.malformed_json": 1, "rejected.not_utf8": 1, "rejected.non_finite": 2,
        "rejected.not_a_number": 2, "rejected.oversized": 1, "rejected.too_many_samples": 1,
        "rejected.before_epoch": 1, "rejected.future_timestamp": 1,
        "rejected.out_of_range": 1, "rejected.duplicate": 1, "rejected.late": 1,
        "rejected.unknown_channel": 1,
    }

    watcher = Watcher(mosquitto.port)
    log = open(tmp_path / "agent.log", "a")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config_path)],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        watcher.wait(lambda: agent.poll() is not None or (
            watcher.status.get("state") == "online" and watcher.status.get("pid") == agent.pid))
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        sent = replay(halves[0], "127.0.0.1", mosquitto.port, topic, progress=False).messages
        publish_all(mosquitto.port, bad)
        sent += replay(halves[1], "127.0.0.1", mosquitto.port, topic, progress=False).messages
        sent += len(bad)
        watcher.wait(lambda: watcher.counters.get("messages_received", 0) >= sent)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
        watcher.wait(lambda: watcher.status.get("state") == "offline", 30)
        watcher.wait(lambda: {a["alarm_id"] for a in watcher.alarms} >= expected_ids, 10)
    finally:
        if agent.poll() is None:
            agent.kill()
        watcher.close()
        log.close()

    counters = watcher.counters
    rejections = {k: v for k, v in counters.items() if k.startswith("rejected.")}
    assert rejections == expected_rejections
    assert counters["samples_accepted"] == int(np.isfinite(good.values).sum())
    assert counters["snapshots_scored"] > 0 and counters.get("errors.ingest", 0) == 0
    assert {a["alarm_id"] for a in watcher.alarms} == expected_ids
