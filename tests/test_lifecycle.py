"""Alarm lifecycle: on-delay, deadband and off-delay on sample time; acknowledgement and
shelving on the wall clock; and through a real Mosquitto: operator commands, the retained
state topic, restarts, the durable outbox across a broker outage, a damaged or locked
database, and the health counters.

The MQTT tests run the agent in this process with a tiny ONNX bundle whose score is its
input clipped to [0, 1], so the values sent decide exactly when an alarm is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent.alarms import (Ack, AlarmBoard, AlarmEvent, AlarmTracker, Command, CommandError,
                          ShelveChange, parse_command)
from agent.config import load_config
from agent.service import AgentService
from agent.store import AlarmStore
from agent.timeutil import to_iso
from conftest import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
NOW = 2_000_000_000.0
ASSET = "pump1"
SENSOR_TOPIC = "sensors/pump1/x"
PREFIX = f"segwatch/{ASSET}"
STATUS = "segwatch/agents/lifecycle-agent/status"


# Sample time: raise, deadband, off-delay, restarts --------------------------------------

def tracker(**settings) -> AlarmTracker:
    options = dict(sample_period=1.0, threshold=0.5, hysteresis=0.2, min_duration=1.0,
                   off_delay=0.0)
    options.update(settings)
    return AlarmTracker(ASSET, "spike", options.pop("model_id", "m-1"), **options)


def feed(t: AlarmTracker, scores, start: int = 0) -> list[AlarmEvent]:
    scores = np.asarray(scores, float)
    return t.update(np.arange(start, start + len(scores)), scores, np.zeros(len(scores), bool))


def test_the_off_delay_holds_an_alarm_through_a_short_dip():
    scores = [0.9, 0.9, 0.9, 0.1, 0.1, 0.9, 0.1, 0.1, 0.1]
    assert [e.state for e in feed(tracker(), scores)] == ["active", "cleared"] * 2

    t = tracker(off_delay=3.0)
    assert [e.state for e in feed(t, scores[:8])] == ["active"]  # two slots below: held
    [cleared] = feed(t, scores[8:], start=8)  # the third slot below clears it
    assert cleared.state == "cleared" and cleared.start == 0.0 and cleared.end == 5.0


def test_a_noisy_score_does_not_chatter():
    rng = np.random.default_rng(0)
    level = np.r_[np.full(300, 0.1), np.full(300, 0.5), np.full(300, 0.1)]
    scores = level + rng.uniform(-0.15, 0.15, level.size)

    naive = feed(tracker(hysteresis=0.0), scores)
    assert sum(e.state == "active" for e in naive) > 30

    events = feed(tracker(hysteresis=0.25, min_duration=5.0, off_delay=10.0), scores)
    assert [e.state for e in events] == ["active", "cleared"]
    assert 300 <= events[0].start < 400
    assert events[1].end == 599.0  # the last slot of the noisy band, above the clear level


def test_slots_that_never_arrived_count_as_below_for_the_off_delay():
    t = tracker(off_delay=3.0)
    [raised] = feed(t, [0.9, 0.9])
    assert feed(t, [0.9], start=4) == []  # slots 2 and 3 missing: shorter than the off-delay
    events = feed(t, [0.9], start=9)  # slots 5 to 8 missing: the alarm cleared meanwhile
    assert [(e.state, e.start, e.end) for e in events] == [("cleared", 0.0, 4.0),
                                                          ("active", 9.0, 9.0)]
    assert events[0].alarm_id == raised.alarm_id


def test_an_alarm_resumed_after_a_restart_clears_with_its_own_id():
    first = tracker()
    [raised] = feed(first, [0.1, 0.9, 0.9])
    t = tracker(model_id="m-2")  # even with a new model, the alarm keeps its id
    t.resume(first.current())  # as the agent stored it at its stop
    assert feed(t, [0.9, 0.9], start=3) == []
    [cleared] = feed(t, [0.1], start=5)
    assert (cleared.alarm_id, cleared.start, cleared.end, cleared.model_id) == (
        raised.alarm_id, 1.0, 4.0, "m-1")


def test_a_replay_of_older_data_leaves_a_resumed_alarm_waiting():
    [raised] = feed(tracker(), [0.9] * 3, start=100)
    t = tracker()
    t.resume(raised)
    assert feed(t, [0.1] * 50) == []  # older slots: nothing to say about that alarm
    replayed = feed(t, [0.9] * 3, start=100)
    assert [e.alarm_id for e in replayed] == [raised.alarm_id]  # the same raise again
    [cleared] = feed(t, [0.1], start=103)
    assert cleared.alarm_id == raised.alarm_id and cleared.state == "cleared"


def test_a_long_gap_clears_a_resumed_alarm():
    [raised] = feed(tracker(), [0.9], start=10)
    t = tracker()
    t.resume(raised)
    assert [(e.alarm_id, e.state) for e in t.interrupt()] == [(raised.alarm_id, "cleared")]
    assert t.resumed is None and t.active is None


# Operator commands and the board (wall clock) -------------------------------------------

@pytest.mark.parametrize("payload, reason", [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"[1, 2]", "not_an_object"),
    (b'{"command": "silence", "class": "spike", "by": "op"}', "unknown_command"),
    (b'{"command": "ack", "by": "op"}', "bad_target"),
    (b'{"command": "ack", "alarm_id": "a", "class": "spike", "by": "op"}', "bad_target"),
    (b'{"command": "ack", "alarm_id": 7, "by": "op"}', "bad_target"),
    (b'{"command": "ack", "alarm_id": "a"}', "no_operator"),
    (b'{"command": "ack", "alarm_id": "a", "by": "   "}', "no_operator"),
    (b'{"command": "ack", "alarm_id": "a", "by": "op", "duration": 60}', "unknown_key"),
    (b'{"command": "shelve", "class": "spike", "by": "op"}', "bad_duration"),
    (b'{"command": "shelve", "class": "spike", "by": "op", "duration": 5, "until": 1}',
     "bad_duration"),
    (b'{"command": "shelve", "class": "spike", "by": "op", "duration": "soon"}', "bad_duration"),
    (b'{"command": "shelve", "class": "spike", "by": "op", "until": "2001-01-01T00:00:00Z"}',
     "bad_duration"),
    (b'{"command": "shelve", "class": "spike", "by": "op", "duration": "2d"}',
     "shelve_too_long"),
    (b'{"command": "ack", "alarm_id": "' + b"a" * 5000 + b'", "by": "op"}', "oversized"),
])
def test_bad_commands_are_refused_with_a_reason(payload, reason):
    with pytest.raises(CommandError) as refused:
        parse_command(payload, NOW, max_shelve=12 * 3600)
    assert refused.value.reason == reason


def test_good_commands():
    assert parse_command(b'{"command": "ack", "alarm_id": "a", "by": "op"}', NOW, 60) == \
        Command("ack", "op", alarm_id="a")
    shelve = parse_command(b'{"command": "shelve", "class": "spike", "by": "op", '
                           b'"duration": "2h"}', NOW, 12 * 3600)
    assert shelve.until == NOW + 7200 and shelve.class_name == "spike"
    until = parse_command(b'{"command": "shelve", "alarm_id": "a", "by": "op", '
                          b'"until": "2033-05-18T04:33:20Z"}', NOW, 12 * 3600)
    assert until.until == NOW + 3600


def raised(n: int, class_name: str = "spike", asset: str = ASSET) -> AlarmEvent:
    return AlarmEvent(f"alarm-{n}", asset, class_name, "active", 10.0 * n, 10.0 * n, 0.9,
                      "m-1", 0.5)


def on_board(board: AlarmBoard, event: AlarmEvent, now: float = NOW):
    alarm = board.classify(event, now)
    board.apply(alarm)
    return alarm


def board() -> AlarmBoard:
    return AlarmBoard({ASSET: ["spike", "leak"]})


def nothing(_alarm_id):
    return None


def test_an_ack_is_an_attribute_the_alarm_stays_active_until_it_clears():
    b = board()
    on_board(b, raised(1))
    [ack] = b.command(ASSET, Command("ack", "op-1", alarm_id="alarm-1"), NOW + 5, nothing)
    assert isinstance(ack, Ack) and ack.to_message()["by"] == "op-1"
    [shown] = b.picture(ASSET, NOW)["active_alarms"]
    assert (shown["state"], shown["acked"], shown["acked_by"]) == ("active", True, "op-1")
    assert b.command(ASSET, Command("ack", "op-2", alarm_id="alarm-1"), NOW, nothing) == []

    on_board(b, AlarmEvent(**{**raised(1).__dict__, "state": "cleared"}))
    assert b.picture(ASSET, NOW)["active_alarms"] == []


def test_an_ack_of_an_unknown_alarm_or_another_assets_alarm_is_refused():
    b = board()
    on_board(b, raised(1, asset="pump2"))
    for alarm_id in ("alarm-1", "alarm-9"):
        with pytest.raises(CommandError, match="unknown_alarm"):
            b.command(ASSET, Command("ack", "op", alarm_id=alarm_id), NOW, nothing)
    with pytest.raises(CommandError, match="unknown_class"):
        b.command(ASSET, Command("ack", "op", class_name="fire"), NOW, nothing)


def test_an_ack_by_class_acknowledges_its_active_alarms_and_a_cleared_one_by_id():
    b = board()
    on_board(b, raised(1))
    on_board(b, raised(2, "leak"))
    effects = b.command(ASSET, Command("ack", "op", class_name="spike"), NOW, nothing)
    assert [e.alarm.alarm_id for e in effects] == ["alarm-1"]

    old = on_board(board(), AlarmEvent(**{**raised(3).__dict__, "state": "cleared"}))
    [ack] = b.command(ASSET, Command("ack", "op", alarm_id="alarm-3"), NOW,
                      lambda alarm_id: old if alarm_id == "alarm-3" else None)
    assert ack.alarm.state == "cleared"


def test_a_shelved_class_raises_unannounced_alarms_until_its_shelve_expires():
    b = board()
    [change] = b.command(ASSET, Command("shelve", "op", class_name="spike", until=NOW + 60),
                         NOW, nothing)
    assert isinstance(change, ShelveChange) and change.shelved

    spike = on_board(b, raised(1), NOW + 10)
    leak = on_board(b, raised(2, "leak"), NOW + 10)
    assert spike.suppressed and not leak.suppressed
    picture = b.picture(ASSET, NOW + 10)
    assert [a["shelved"] for a in picture["active_alarms"]] == [True, False]
    assert [s["class"] for s in picture["shelved_classes"]] == ["spike"]

    assert b.expire(NOW + 59) == []
    [ended] = b.expire(NOW + 60)
    assert not ended.shelved and ended.reason == "expired" and ended.by is None
    assert [a.alarm_id for a in ended.released] == ["alarm-1"]  # announced now
    assert not on_board(b, raised(3), NOW + 61).suppressed
    assert b.picture(ASSET, NOW + 61)["shelved_classes"] == []


def test_unshelve_by_command_and_a_repeated_or_replaced_shelve():
    b = board()
    shelve = Command("shelve", "op", class_name="spike", until=NOW + 60)
    assert len(b.command(ASSET, shelve, NOW, nothing)) == 1
    assert b.command(ASSET, shelve, NOW + 1, nothing) == []  # redelivered: the same shelve
    longer = Command("shelve", "op-2", alarm_id="alarm-1", until=NOW + 600)
    on_board(b, raised(1), NOW + 2)
    replaced, new = b.command(ASSET, longer, NOW + 3, nothing)
    assert (replaced.shelved, replaced.reason, new.shelved) == (False, "replaced", True)
    assert new.shelve.until == NOW + 600

    [ended] = b.command(ASSET, Command("unshelve", "op-3", class_name="spike"), NOW + 4,
                        nothing)
    assert ended.by == "op-3" and ended.to_message()["reason"] == "command"
    assert [a.alarm_id for a in ended.released] == ["alarm-1"]
    assert b.command(ASSET, Command("unshelve", "op-3", class_name="spike"), NOW, nothing) == []


# Through Mosquitto ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def value_bundle(tmp_path_factory) -> Path:
    """A bundle whose model returns its input clipped to [0, 1]: score = value."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    path = tmp_path_factory.mktemp("bundles") / "value"
    path.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Clip", ["snapshot", "low", "high"], ["scores"])], "value",
        [helper.make_tensor_value_info("snapshot", TensorProto.FLOAT, [None, 16, 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 16, 1])],
        [helper.make_tensor("low", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("high", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path / "model.onnx")
    inputs = np.random.default_rng(0).uniform(-1, 2, (3, 16, 1)).astype(np.float32)
    np.savez(path / "reference.npz", inputs=inputs, outputs=np.clip(inputs, 0, 1))
    files = {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
             for name in ("model.onnx", "reference.npz")}
    metadata = {
        "format": "segwatch-bundle/1", "model_id": "value-test-1", "name": "value",
        "architecture": "clip", "model_length": 16, "channels": ["x"], "classes": ["spike"],
        "activation": "sigmoid", "sample_period": 1.0, "snapshot_length": 16, "hop": 4,
        "threshold": 0.5, "hysteresis": 0.2, "min_duration": 2.0,
        "normalization": {"mode": "fixed", "center": [0.0], "scale": [1.0], "clip": 10.0},
        "files": files,
    }
    (path / "bundle.json").write_text(json.dumps(metadata))
    return path


def write_config(tmp_path: Path, port: int, bundle: Path, **top) -> Path:
    config = {
        "broker": {"host": "127.0.0.1", "port": port, "client_id": "lifecycle-agent",
                   "reconnect_min_delay": 0.2, "reconnect_max_delay": 1},
        "database": str(tmp_path / "state" / "alarms.db"),
        "status_interval": 0.3,
        "assets": [{"name": ASSET, "sample_period": 1, "model": str(bundle),
                    "channels": [{"name": "x", "topic": SENSOR_TOPIC}]}],
        **top,
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


T0 = float(int(time.time()) - 100_000)


def levels(*segments: tuple[float, int], start: int = 0) -> list[tuple[float, float]]:
    """Samples (ts, value), one per second from T0 + start: (level, count) segments, with
    a small ripple so that no channel is flat."""
    values = [level + 0.01 * (i % 5) for level, count in segments for i in range(count)]
    return [(T0 + start + i, v) for i, v in enumerate(values)]


def send(port: int, samples, batch: int = 20) -> int:
    """Publish samples in batches (QoS 1); return the number of messages."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sender-{uuid.uuid4()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    messages = 0
    for lo in range(0, len(samples), batch):
        payload = json.dumps([{"ts": ts, "value": v} for ts, v in samples[lo:lo + batch]])
        client.publish(SENSOR_TOPIC, payload, qos=1).wait_for_publish(10)
        messages += 1
    client.disconnect()
    client.loop_stop()
    return messages


def command(port: int, payload) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"scada-{uuid.uuid4()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    body = payload if isinstance(payload, bytes) else json.dumps(payload)
    client.publish(f"{PREFIX}/command", body, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


class Watcher:
    """A SCADA-like subscriber to everything under ``segwatch/``."""

    def __init__(self, port: int, client_id: str | None = None, clean: bool = True):
        self.messages: list[tuple[str, dict, bool]] = []  # topic, document, retained
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"watcher-{uuid.uuid4()}",
                                  clean_session=clean)
        self.client.on_connect = lambda c, *_: c.subscribe("segwatch/#", qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, _client, _userdata, message):
        if message.payload and not message.topic.endswith("/command"):
            with self.lock:
                self.messages.append((message.topic, json.loads(message.payload),
                                      bool(message.retain)))

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [doc for t, doc, _ in self.messages if t == topic]

    def latest(self, topic: str) -> dict:
        docs = self.on(topic)
        return docs[-1] if docs else {}

    def counters(self) -> dict:
        return self.latest(STATUS).get("counters", {})

    def wait(self, condition, timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Agent:
    """The agent service in this process, its worker in a thread. Ready once ``watcher``
    sees it online: it subscribed before it published that status, so from then on the
    broker delivers samples and commands to it."""

    def __init__(self, config: Path, watcher: Watcher, run: bool = True):
        self.service = AgentService(load_config(config))
        self.service.start()
        self.thread = threading.Thread(target=self.service.run, name="worker", daemon=True)
        if run:
            self.thread.start()
        started = to_iso(self.service.started)
        watcher.wait(lambda: watcher.latest(STATUS).get("state") == "online"
                     and watcher.latest(STATUS).get("started") == started, what="the agent")

    def run(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def watcher(mosquitto):
    w = Watcher(mosquitto.port)
    yield w
    w.close()


def active_alarms(w: Watcher) -> list[dict]:
    return w.latest(f"{PREFIX}/state").get("active_alarms", [])


def raise_one(port: int, w: Watcher) -> dict:
    send(port, levels((0.1, 40), (0.9, 60)))
    w.wait(lambda: w.on(f"{PREFIX}/alarm"), what="the alarm")
    return w.on(f"{PREFIX}/alarm")[0]


def test_an_ack_command_changes_the_state_topic_and_the_database(mosquitto, watcher, tmp_path,
                                                                 value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    agent = Agent(config, watcher)
    try:
        alarm = raise_one(mosquitto.port, watcher)
        assert alarm["state"] == "active"
        watcher.wait(lambda: len(active_alarms(watcher)) == 1, what="the alarm in the state")
        assert active_alarms(watcher)[0]["acked"] is False

        command(mosquitto.port, b"{not json")
        command(mosquitto.port, {"command": "ack", "alarm_id": "nope", "by": "op-1"})
        command(mosquitto.port, {"command": "ack", "alarm_id": alarm["alarm_id"], "by": "op-1"})
        watcher.wait(lambda: active_alarms(watcher)[0]["acked"], what="the ack in the state")
        shown = active_alarms(watcher)[0]
        assert (shown["alarm_id"], shown["state"], shown["acked_by"]) == (
            alarm["alarm_id"], "active", "op-1")
        [ack] = watcher.on(f"{PREFIX}/alarm/ack")
        assert (ack["event"], ack["alarm_id"], ack["by"]) == ("ack", alarm["alarm_id"], "op-1")
        watcher.wait(lambda: watcher.counters().get("commands_accepted") == 1, what="counters")
        counters = watcher.counters()
        assert counters["commands_rejected.malformed_json"] == 1
        assert counters["commands_rejected.unknown_alarm"] == 1
    finally:
        agent.stop()

    store = AlarmStore(tmp_path / "state" / "alarms.db")
    found = store.find_alarm(alarm["alarm_id"])
    assert (found.state, found.acked_by) == ("active", "op-1")
    assert store.pending_count() == 0
    store.close()


def test_a_late_subscriber_gets_the_retained_state(mosquitto, watcher, tmp_path, value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    agent = Agent(config, watcher)
    try:
        alarm = raise_one(mosquitto.port, watcher)
        watcher.wait(lambda: len(active_alarms(watcher)) == 1, what="the state")
        late = Watcher(mosquitto.port)
        try:
            late.wait(lambda: late.on(f"{PREFIX}/state"), what="the retained state")
            topic, state, retained = next(m for m in late.messages
                                          if m[0] == f"{PREFIX}/state")
        finally:
            late.close()
    finally:
        agent.stop()
    assert retained
    assert state["asset"] == ASSET and state["agent"] == "lifecycle-agent"
    assert state["model_id"] == "value-test-1" and state["sensors"] == {"x": "ok"}
    assert state["last_sample"] is not None and state["shelved_classes"] == []
    assert [a["alarm_id"] for a in state["active_alarms"]] == [alarm["alarm_id"]]


def test_a_shelved_class_publishes_no_alarm_until_its_shelve_ends(mosquitto, watcher, tmp_path,
                                                                  value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    agent = Agent(config, watcher)
    try:
        command(mosquitto.port, {"command": "shelve", "class": "spike", "by": "op-1",
                                 "duration": "1h"})
        watcher.wait(lambda: watcher.on(f"{PREFIX}/shelve"), what="the shelve event")
        send(mosquitto.port, levels((0.1, 40), (0.9, 60)))
        watcher.wait(lambda: active_alarms(watcher), what="the shelved alarm in the state")
        [shown] = active_alarms(watcher)
        assert shown["shelved"] is True
        assert watcher.on(f"{PREFIX}/alarm") == []  # not announced
        assert agent.service.store.find_alarm(shown["alarm_id"]).suppressed  # but stored

        command(mosquitto.port, {"command": "unshelve", "class": "spike", "by": "op-2"})
        watcher.wait(lambda: watcher.on(f"{PREFIX}/alarm"), what="the announced alarm")
        [announced] = watcher.on(f"{PREFIX}/alarm")
        assert (announced["alarm_id"], announced["state"]) == (shown["alarm_id"], "active")
        watcher.wait(lambda: len(watcher.on(f"{PREFIX}/shelve")) == 2, what="the unshelve")
        shelve, unshelve = watcher.on(f"{PREFIX}/shelve")
        assert (shelve["event"], shelve["by"]) == ("shelve", "op-1")
        assert (unshelve["event"], unshelve["by"], unshelve["reason"]) == (
            "unshelve", "op-2", "command")
        watcher.wait(lambda: not active_alarms(watcher)[0]["shelved"], what="state unshelved")
        assert watcher.latest(f"{PREFIX}/state")["shelved_classes"] == []
    finally:
        agent.stop()


def test_an_alarm_active_at_a_restart_clears_with_the_same_id(mosquitto, watcher, tmp_path,
                                                              value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    agent = Agent(config, watcher)
    try:
        alarm = raise_one(mosquitto.port, watcher)
        command(mosquitto.port, {"command": "ack", "alarm_id": alarm["alarm_id"], "by": "op"})
        watcher.wait(lambda: active_alarms(watcher)[0]["acked"], what="the ack")
    finally:
        agent.stop()

    before = len(watcher.on(f"{PREFIX}/state"))
    agent = Agent(config, watcher)
    try:
        watcher.wait(lambda: len(watcher.on(f"{PREFIX}/state")) > before, what="a new state")
        [shown] = active_alarms(watcher)  # restored from the database
        assert (shown["alarm_id"], shown["acked_by"]) == (alarm["alarm_id"], "op")
        send(mosquitto.port, levels((0.1, 60), start=100))  # the stream goes on, low
        watcher.wait(lambda: len(watcher.on(f"{PREFIX}/alarm")) == 2, what="the clear")
    finally:
        agent.stop()
    cleared = watcher.on(f"{PREFIX}/alarm")[1]
    assert (cleared["alarm_id"], cleared["state"], cleared["start"]) == (
        alarm["alarm_id"], "cleared", alarm["start"])
    assert cleared["end"] == to_iso(T0 + 99)  # the last high sample, sent before the restart
    assert active_alarms(watcher) == []


def outbox_rows(database: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT id, alarm_id, state, published_at FROM alarm_events "
                            "ORDER BY id").fetchall()
    conn.close()
    return rows


def test_the_outbox_backlog_goes_out_in_commit_order_after_a_broker_outage(tmp_path,
                                                                           value_bundle):
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Mosquitto(folder, f"persistence true\npersistence_location {folder}/\n").start()
    watcher = Watcher(broker.port, client_id="scada-persistent", clean=False)
    config = write_config(tmp_path, broker.port, value_bundle)
    database = tmp_path / "state" / "alarms.db"
    agent = Agent(config, watcher, run=False)  # connected, but the worker waits
    try:
        assert agent.service.connected.wait(10)
        samples = levels((0.1, 40), (0.9, 30), (0.1, 40), (0.9, 30), (0.1, 40), (0.9, 30),
                         (0.1, 60))
        messages = send(broker.port, samples)
        watcher.wait(lambda: agent.service.inbox.qsize() == messages, what="the inbox")

        broker.stop()  # the samples are in the agent; the broker goes away
        agent.run()
        watcher.wait(lambda: agent.service.counters["alarms_cleared"] == 3, what="alarms")
        backlog = outbox_rows(database)
        assert len(backlog) == 6 and all(row[3] is None for row in backlog)  # all pending

        broker.start()  # same port: the agent and the watcher reconnect
        watcher.wait(lambda: len(watcher.on(f"{PREFIX}/alarm")) == 6, what="the backlog")
        watcher.wait(lambda: all(row[3] for row in outbox_rows(database)), what="PUBACKs")
    finally:
        agent.stop()
        watcher.close()
        broker.stop()
    got = [(m["alarm_id"], m["state"]) for m in watcher.on(f"{PREFIX}/alarm")]
    assert got == [(row[1], row[2]) for row in backlog]
    assert [state for _, state in got] == ["active", "cleared"] * 3


def damage(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(200)
        handle.write(bytes((n * 97 + 13) % 251 for n in range(3000)))


def test_a_corrupt_database_at_start_is_moved_aside_and_alarms_still_flow(mosquitto, watcher,
                                                                         tmp_path,
                                                                         value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    database = tmp_path / "state" / "alarms.db"
    store = AlarmStore(database)
    for n in range(50):
        store.record(AlarmEvent(f"old-{n}", ASSET, "spike", "active", n, n, 0.9, "m", 0.5), "t")
    store.close()
    damage(database)

    agent = Agent(config, watcher)
    try:
        alarm = raise_one(mosquitto.port, watcher)
        watcher.wait(lambda: watcher.counters().get("alarms_raised") == 1, what="the status")
        status = watcher.latest(STATUS)
    finally:
        agent.stop()
    [moved] = [p for p in database.parent.iterdir() if ".corrupt-" in p.name]
    assert status["counters"]["db_moved_aside"] == 1
    assert status["database"]["moved_aside"] == str(moved)
    store = AlarmStore(database)
    assert [row.alarm_id for row in store.alarms()] == [alarm["alarm_id"]]
    store.close()


def test_alarms_are_published_while_the_database_is_locked_and_stored_after(
        mosquitto, watcher, tmp_path, value_bundle, monkeypatch):
    monkeypatch.setattr("agent.store.BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr("agent.outbox.RETRY_INTERVAL", 0.5)
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    database = tmp_path / "state" / "alarms.db"
    agent = Agent(config, watcher)
    lock = sqlite3.connect(database, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        alarm = raise_one(mosquitto.port, watcher)
        watcher.wait(lambda: watcher.counters().get("db_errors", 0) >= 1, what="db_errors")
        assert outbox_rows(database) == []
        lock.execute("COMMIT")
        watcher.wait(lambda: [r[1:] for r in outbox_rows(database) if r[3]]
                     and not agent.service.outbox.unstored, what="the event stored")
    finally:
        lock.close()
        agent.stop()
    [(_, alarm_id, state, published_at)] = outbox_rows(database)
    assert (alarm_id, state) == (alarm["alarm_id"], "active") and published_at
    assert len(watcher.on(f"{PREFIX}/alarm")) == 1  # published once, not again after storing


def agent_status(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "agent", "status", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_status_topic_and_file_carry_the_health_counters(mosquitto, watcher, tmp_path,
                                                             value_bundle):
    config = write_config(tmp_path, mosquitto.port, value_bundle)
    agent = Agent(config, watcher)
    try:
        raise_one(mosquitto.port, watcher)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
        client.publish(SENSOR_TOPIC, b"{broken", qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        watcher.wait(lambda: watcher.counters().get("rejected.malformed_json") == 1
                     and watcher.counters().get("messages_received") == 6,
                     what="every message counted")
        status = watcher.latest(STATUS)
        running = agent_status("--config", str(config))
    finally:
        agent.stop()

    counters = status["counters"]
    assert counters["messages_received"] == 6 and counters["samples_accepted"] == 100
    assert counters["snapshots_scored"] > 0 and counters["alarms_raised"] == 1
    assert counters["db_errors"] == 0
    assert status["inference_seconds"] >= 0 and status["outbox_pending"] == 0
    assert status["uptime_s"] >= 0 and status["connected"] is True
    assert status["alarms_active"] == 1 and status["models"] == {ASSET: "value-test-1"}

    assert running.returncode == 0, running.stderr
    assert "agent lifecycle-agent: online" in running.stdout
    assert "rejected 1 (malformed_json 1)" in running.stdout
    assert "alarms raised 1" in running.stdout

    stopped = agent_status("--config", str(config))
    assert stopped.returncode == 1 and "offline" in stopped.stdout
    final = watcher.latest(STATUS)
    assert final["state"] == "offline" and final["counters"]["alarms_raised"] == 1
    missing = agent_status("--file", str(tmp_path / "no-such-status.json"))
    assert missing.returncode == 1 and "no status file" in missing.stderr
