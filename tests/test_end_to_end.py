"""End to end through a real Mosquitto: replay -> agent -> alarms on MQTT and in SQLite.

The alarms that reach a subscriber, and the rows in the database, are exactly those of the
offline evaluation of the same bundle on the same samples.
"""

from __future__ import annotations

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

from agent.bundle import load_bundle
from agent.config import load_config
from agent.datasets import Series, dodgers_split, read_dodgers
from agent.inference import load_backend
from agent.pipeline import Pipeline, run_series
from agent.replay import replay
from agent.service import _settings
from agent.pipeline import AssetPipeline
from agent.store import AlarmStore

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "sensors/dodgers/count"
WEEKS = 4


class Watcher:
    def __init__(self, port: int):
        self.status: dict = {}
        self.counters: dict = {}
        self.alarms: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-watcher")
        self.client.on_connect = lambda c, *_: c.subscribe([("segwatch/+/alarm", 1),
                                                            ("segwatch/agents/+/status", 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c, _u, message):
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


@pytest.fixture
def test_slice(dodgers_dir) -> Series:
    series = read_dodgers(dodgers_dir / "Dodgers.data")
    start = np.searchsorted(series.ts, dodgers_split(series))
    rows = slice(start, start + WEEKS * 7 * 288)
    return Series(series.ts[rows], series.values[rows], series.channels, series.period)


def write_config(tmp_path: Path, port: int, bundle: Path) -> Path:
    config = {
        "broker": {"host": "127.0.0.1", "port": port, "client_id": "e2e-agent"},
        "database": str(tmp_path / "alarms.db"),
        "status_interval": 0.3,
        "assets": [{
            "name": "dodgers", "sample_period": "5min", "model": str(bundle),
            "channels": [{"name": "count", "topic": TOPIC}],
        }],
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_agent(config: Path, tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(tmp_path / "agent.log", "a")
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def run_agent_on(series, config, tmp_path, watcher, port):
    agent = start_agent(config, tmp_path)
    try:
        watcher.wait(lambda: agent.poll() is not None or (
            watcher.status.get("state") == "online" and watcher.status.get("pid") == agent.pid),
            60)
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        result = replay(series, "127.0.0.1", port, TOPIC, speed=0, progress=False)
        watcher.wait(lambda: watcher.status.get("counters", {}).get("messages_received", 0)
                     >= result.messages, 60)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
        watcher.wait(lambda: watcher.status.get("state") == "offline", 30)
    finally:
        if agent.poll() is None:
            agent.kill()
    return result


def offline_alarms(config_path: Path, series: Series):
    config = load_config(config_path)
    asset = config.assets[0]
    bundle = load_bundle(asset.model)
    pipeline = Pipeline([AssetPipeline(_settings(asset, bundle), bundle, load_backend(bundle))])
    return run_series(pipeline, "dodgers", series.ts, series.values, series.channels)


def test_replay_through_mosquitto_gives_the_offline_alarms(mosquitto, tmp_path, test_slice,
                                                          dodgers_bundle):
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle)
    expected = offline_alarms(config, test_slice)
    assert len(expected) >= 4, "the slice should hold several game alarms"

    watcher = Watcher(mosquitto.port)
    try:
        result = run_agent_on(test_slice, config, tmp_path, watcher, mosquitto.port)
        watcher.wait(lambda: len(watcher.alarms) >= len(expected), 10)
    finally:
        watcher.close()

    assert result.samples == int(np.isfinite(test_slice.values).sum())
    got = [(a["alarm_id"], a["state"], a["start"], a["end"]) for a in watcher.alarms]
    want = [(e.to_message()["alarm_id"], e.state, e.to_message()["start"],
             e.to_message()["end"]) for e in expected]
    assert sorted(got) == sorted(want)
    for message in watcher.alarms:
        assert message["asset"] == "dodgers" and message["class"] == "game_traffic"
        assert message["model_id"] == load_bundle(dodgers_bundle).model_id

    store = AlarmStore(tmp_path / "alarms.db")
    rows = store.alarms()
    assert store.pending_count() == 0  # every event was acknowledged by the broker
    store.close()
    assert {r.alarm_id for r in rows} == {e.alarm_id for e in expected}
    cleared = {e.alarm_id: e for e in expected if e.state == "cleared"}
    for row in rows:
        if row.alarm_id in cleared:
            assert row.state == "cleared" and row.end_ts == cleared[row.alarm_id].end


def test_a_second_replay_of_the_same_data_publishes_no_alarm_twice(mosquitto, tmp_path,
                                                                  test_slice, dodgers_bundle):
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle)
    watcher = Watcher(mosquitto.port)
    try:
        run_agent_on(test_slice, config, tmp_path, watcher, mosquitto.port)
        first = len(watcher.alarms)
        assert first > 0
        run_agent_on(test_slice, config, tmp_path, watcher, mosquitto.port)
        time.sleep(0.5)
        counters = watcher.counters
    finally:
        watcher.close()
    assert len(watcher.alarms) == first
    assert counters["alarms_duplicate"] == first and "alarms_raised" not in counters
    store = AlarmStore(tmp_path / "alarms.db")
    assert len(store.alarms()) == len({a["alarm_id"] for a in watcher.alarms})
    store.close()


def test_agent_rejects_a_bad_configuration_with_a_clear_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("broker: {port: 1883}\ndatabase: a.db\nassets: []\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "key 'assets'" in done.stderr and "non-empty list" in done.stderr


def test_a_killed_agent_is_reported_offline_by_its_last_will(mosquitto, tmp_path,
                                                             dodgers_bundle):
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle)
    watcher = Watcher(mosquitto.port)
    agent = start_agent(config, tmp_path)
    try:
        watcher.wait(lambda: watcher.status.get("state") == "online", 60)
        agent.kill()
        agent.wait(10)
        # The broker publishes the will once it notices the dead connection.
        watcher.wait(lambda: watcher.status.get("state") == "offline", 10)
    finally:
        if agent.poll() is None:
            agent.kill()
        watcher.close()


def test_an_unusable_database_path_is_a_clear_startup_error(tmp_path, dodgers_bundle):
    config = write_config(tmp_path, 1, dodgers_bundle)
    raw = yaml.safe_load(config.read_text())
    (tmp_path / "not-a-db").write_text("this is not SQLite " * 100)
    raw["database"] = str(tmp_path / "not-a-db")
    config.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "cannot open it as SQLite" in done.stderr and "Traceback" not in done.stderr
