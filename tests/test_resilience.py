"""The agent under outages: broker restarts, SIGKILL, SIGTERM, SIGHUP, systemd, scale-out.

Every test runs the agent as its own process (``python -m agent run --config ...``) against
a real Mosquitto process, with the shipped Dodgers bundle on four weeks of the test half,
and compares the alarms that reach a subscriber with the offline run of the same bundle on
the same samples: by id, after de-duplication (delivery is at least once), none lost.
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import ConfigError, load_config, parse_config
from agent.datasets import Series, dodgers_split, read_dodgers
from agent.demo import EmbeddedBroker, free_port
from agent.pipeline import run_series
from agent.replay import replay
from agent.sdnotify import Notifier
from agent.service import build_pipeline
from agent.store import AlarmStore
from conftest import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "sensors/dodgers/count"
WEEK = 7 * 288  # samples of 5 min


# Helpers ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _dodgers(path: Path) -> Series:
    return read_dodgers(path)


def dodgers_weeks(dodgers_dir: Path, weeks: int, offset_weeks: int = 0) -> Series:
    """``weeks`` weeks of the Dodgers test half, starting ``offset_weeks`` into it."""
    series = _dodgers(dodgers_dir / "Dodgers.data")
    start = int(np.searchsorted(series.ts, dodgers_split(series))) + offset_weeks * WEEK
    rows = slice(start, start + weeks * WEEK)
    return Series(series.ts[rows], series.values[rows], series.channels, series.period)


def dodgers_asset(name: str, topic: str, bundle: Path) -> dict:
    return {"name": name, "sample_period": "5min", "model": str(bundle),
            "channels": [{"name": "count", "topic": topic}]}


def write_config(tmp_path: Path, port: int, bundle: Path, client_id: str = "agent",
                 assets: list[dict] | None = None, broker: dict | None = None,
                 **top) -> Path:
    raw = {
        "broker": {"host": "127.0.0.1", "port": port, "client_id": client_id,
                   "reconnect_min_delay": 0.2, "reconnect_max_delay": 1, **(broker or {})},
        "database": str(tmp_path / f"{client_id}.db"),
        "status_interval": 0.3,
        "assets": assets or [dodgers_asset("dodgers", TOPIC, bundle)],
        **top,
    }
    path = tmp_path / f"{client_id}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


_OFFLINE: dict = {}


def offline_events(config_path: Path, series: Series, asset: str = "dodgers") -> set:
    """(alarm_id, state) of every alarm event the offline run of the same bundle gives."""
    config = load_config(config_path)
    settings = next(a for a in config.assets if a.name == asset)
    key = (settings.model, settings.sample_period, asset, series.ts[0], len(series.ts))
    if key not in _OFFLINE:  # the same asset on the same samples: computed once
        pipeline = build_pipeline(config)
        events = run_series(pipeline, asset, series.ts, series.values, series.channels)
        _OFFLINE[key] = {(e.alarm_id, e.state) for e in events}
    return _OFFLINE[key]


class Agent:
    """``python -m agent run --config FILE`` as a process of the test's own."""

    def __init__(self, config: Path, env: dict | None = None):
        self.config = config
        self.log_path = config.with_suffix(".log")
        # Never the service manager of the machine that runs the tests, and log lines with
        # their timestamps.
        inherited = {key: value for key, value in os.environ.items()
                     if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                    "JOURNAL_STREAM")}
        self.env = dict(inherited, PYTHONPATH=str(ROOT), **(env or {}))
        self.process: subprocess.Popen | None = None

    def start(self) -> "Agent":
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


class Watcher:
    """A SCADA-like subscriber: alarms of every asset and the status of every agent.

    With ``persistent``, an MQTT 5 session that outlives a disconnection, so that messages
    published while it reconnects are queued for it by the broker.
    """

    def __init__(self, port: int, persistent: bool = False, tls: dict | None = None,
                 client_id: str = "test-watcher"):
        self.alarms: list[dict] = []
        self.status: dict[str, dict] = {}
        self.on_alarm = None  # called in paho's thread when an alarm event arrives
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("segwatch/+/alarm", 1), ("segwatch/agents/+/status", 1)])
        self.client.on_message = self._on_message
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=not persistent,
                            properties=properties)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            doc = json.loads(message.payload)
            with self.lock:
                if message.topic.endswith("/status"):
                    self.status[message.topic.split("/")[2]] = doc
                else:
                    self.alarms.append(doc)
            if self.on_alarm is not None and not message.topic.endswith("/status"):
                self.on_alarm()
        except Exception as exc:  # kept for the failure message; paho's thread goes on
            self.errors.append(f"{message.topic}: {exc!r}: {message.payload[:100]!r}")

    def state(self, client_id: str) -> dict:
        with self.lock:
            return dict(self.status.get(client_id, {}))

    def counter(self, client_id: str, name: str) -> int:
        return self.state(client_id).get("counters", {}).get(name, 0)

    def events(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(a["alarm_id"], a["state"]) for a in self.alarms]

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, (
                f"timed out after {timeout} s: {what}; {len(self.alarms)} alarm event(s) "
                f"received, connected: {self.client.is_connected()}, errors: {self.errors}")
            time.sleep(0.05)

    def wait_for_events(self, expected: set, timeout: float = 20) -> None:
        """Wait until every expected (alarm_id, state) has arrived; say what is missing."""
        deadline = time.monotonic() + timeout
        while not set(self.events()) >= expected:
            if time.monotonic() > deadline:
                got = set(self.events())
                raise AssertionError(f"after {timeout} s, {len(expected - got)} of "
                                     f"{len(expected)} alarm events missing, "
                                     f"{len(got - expected)} unexpected; errors: {self.errors}")
            time.sleep(0.05)

    def wait_online(self, agent: Agent, client_id: str, timeout: float = 60) -> None:
        self.wait(lambda: not agent.alive() or (self.state(client_id).get("state") == "online"
                                                and self.state(client_id).get("pid") == agent.pid),
                  timeout, f"agent {client_id} online")
        assert agent.alive(), agent.log()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stop_and_check(agent: Agent, watcher: Watcher, client_id: str, timeout: float = 60) -> None:
    """SIGTERM: the agent drains, exits 0 and reports itself offline."""
    agent.send(signal.SIGTERM)
    assert agent.wait(timeout) == 0, agent.log()
    watcher.wait(lambda: watcher.state(client_id).get("state") == "offline", 10,
                 f"{client_id} offline")


def pending_in(database: Path) -> int:
    store = AlarmStore(database)
    try:
        return store.pending_count()
    finally:
        store.close()


@pytest.fixture
def series(dodgers_dir) -> Series:
    return dodgers_weeks(dodgers_dir, 4)


# Broker outages ---------------------------------------------------------------------------


# ``user root``: Mosquitto started as root would otherwise switch to the user mosquitto, who
# cannot write to the test's private folder (for any other user it changes nothing).
PERSISTENT_BROKER = ("persistence true\npersistence_location {dir}/\nuser root\n"
                     "log_type error\nlog_type warning\nlog_type notice\n"
                     "log_type information\nlog_type subscribe\n")


def test_broker_restart_mid_replay_loses_no_alarm(tmp_path, series, dodgers_bundle):
    """The broker (with persistence, as in a plant) stops at the first alarm a subscriber
    sees, while the agent is publishing the rest, and comes back on the same port. The
    agent reconnects, subscribes again and publishes what was not acknowledged; the samples
    the broker had not delivered yet wait in the agent's persistent session. Every alarm
    reaches the subscriber, exactly the offline ones by id."""
    data = tmp_path / "broker-data"
    data.mkdir()
    broker = Mosquitto(tmp_path, PERSISTENT_BROKER.format(dir=data)).start()
    config = write_config(tmp_path, broker.port, dodgers_bundle)
    expected = offline_events(config, series)

    watcher = Watcher(broker.port, persistent=True)
    agent = Agent(config).start()
    sent = []
    sender = threading.Thread(target=lambda: sent.append(replay(
        series, "127.0.0.1", broker.port, TOPIC, progress=False)))
    try:
        watcher.wait_online(agent, "agent")
        first_alarm = threading.Event()
        watcher.on_alarm = first_alarm.set
        sender.start()
        assert first_alarm.wait(60), "no alarm within 60 s"
        broker.stop()
        watcher.on_alarm = None
        log_before = Path(broker.log.name).read_text()
        time.sleep(0.5)
        broker.start()
        sender.join(60)  # the replay reconnects too and sends what was not acknowledged
        watcher.wait(lambda: sent and watcher.counter("agent", "messages_received")
                     >= sent[0].messages, 60, "every message at the agent")
        stop_and_check(agent, watcher, "agent")
        watcher.wait_for_events(expected)
    finally:
        agent.kill()
        watcher.close()
        broker.stop()
        if sender.is_alive():
            sender.join(60)

    assert set(watcher.events()) == expected
    assert pending_in(tmp_path / "agent.db") == 0
    # The agent subscribed on its first connection and again after the restart.
    log_after = Path(broker.log.name).read_text()
    assert f"agent 1 {TOPIC}" in log_before and f"agent 1 {TOPIC}" in log_after
    assert "disconnected from the broker" in agent.log()


def test_sigkill_in_a_burst_of_alarms_three_times_loses_none(mosquitto, tmp_path, series,
                                                             dodgers_bundle):
    """Three times: the agent publishes a burst of alarm events; at the first one the
    subscriber sees, the broker is frozen (SIGSTOP), so that the rest stay unacknowledged,
    and the agent is killed with SIGKILL. Every run replays the data from the start. After
    a last, clean run every alarm event reached the subscriber, exactly the offline ones by
    id."""
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle,
                          broker={"session_expiry": 0})
    expected = offline_events(config, series)
    database = tmp_path / "agent.db"
    pending_at_kill = []

    watcher = Watcher(mosquitto.port)
    agent = None
    try:
        # Each run goes on past the last kill: a new burst. On a loaded machine the broker
        # may have acknowledged a whole burst before it froze: then one more run, at most 3.
        runs = [3, 4, 4]
        while len(pending_at_kill) < len(runs):
            weeks = runs[len(pending_at_kill)]
            part = Series(series.ts[:weeks * WEEK], series.values[:weeks * WEEK],
                          series.channels, series.period)
            agent = Agent(config).start()
            watcher.wait_online(agent, "agent")
            frozen = threading.Event()
            watcher.on_alarm = lambda: frozen.is_set() or (
                mosquitto.process.send_signal(signal.SIGSTOP), frozen.set())
            sent = []
            sender = threading.Thread(target=lambda: sent.append(replay(
                part, "127.0.0.1", mosquitto.port, TOPIC, progress=False)))
            sender.start()
            try:
                watcher.wait(lambda: frozen.is_set() or (sent and watcher.counter(
                    "agent", "messages_received") >= sent[0].messages), 60, "a burst of alarms")
                watcher.on_alarm = None
                if not frozen.is_set():  # no new alarm in this run: freeze it all the same
                    mosquitto.process.send_signal(signal.SIGSTOP)
                time.sleep(0.3)  # the agent goes on committing alarms that get no PUBACK
                agent.process.kill()
                agent.wait(10)
            finally:
                watcher.on_alarm = None
                mosquitto.process.send_signal(signal.SIGCONT)
                sender.join(70)  # its last messages go nowhere: the agent's session is gone
            pending_at_kill.append(pending_in(database))
            if len(pending_at_kill) == len(runs) and not any(pending_at_kill) \
                    and len(runs) < 6:
                runs.append(runs[-1] + 1)

        agent = Agent(config).start()
        watcher.wait_online(agent, "agent")
        sent = replay(series, "127.0.0.1", mosquitto.port, TOPIC, speed=0, progress=False)
        watcher.wait(lambda: watcher.counter("agent", "messages_received") >= sent.messages,
                     60, "the last replay at the agent")
        stop_and_check(agent, watcher, "agent")
        watcher.wait_for_events(expected)
    finally:
        if agent is not None:
            agent.kill()
        watcher.close()

    received = watcher.events()
    assert set(received) == expected  # none lost, none that the offline run does not give
    assert pending_in(database) == 0
    assert sum(pending_at_kill) > 0, "no kill left an alarm event unacknowledged"
    duplicates = sum(n - 1 for n in collections.Counter(received).values())
    print(f"pending at each kill: {pending_at_kill}; duplicates delivered: {duplicates}")


# SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_drains_and_exits_0_with_the_outbox_empty(mosquitto, tmp_path, series,
                                                          dodgers_bundle):
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle, stop_timeout=10)
    expected = offline_events(config, series)
    watcher = Watcher(mosquitto.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        sent = replay(series, "127.0.0.1", mosquitto.port, TOPIC, speed=0, progress=False)
        watcher.wait(lambda: watcher.counter("agent", "messages_received") >= sent.messages,
                     60, "every message at the agent")
        started = time.monotonic()
        stop_and_check(agent, watcher, "agent")
        took = time.monotonic() - started
        watcher.wait_for_events(expected)
    finally:
        agent.kill()
        watcher.close()
    assert took < 10
    final = watcher.state("agent")
    assert final["state"] == "offline" and final["counters"]["snapshots_scored"] > 0
    assert set(watcher.events()) == expected  # the buffered tail was scored and published
    assert pending_in(tmp_path / "agent.db") == 0


def test_sigterm_with_a_hung_broker_exits_0_within_the_stop_timeout(mosquitto, tmp_path,
                                                                    dodgers_bundle):
    """The broker stops answering (SIGSTOP): the drain waits no longer than stop_timeout."""
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle, stop_timeout=3)
    watcher = Watcher(mosquitto.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        mosquitto.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            agent.send(signal.SIGTERM)
            assert agent.wait(30) == 0, agent.log()
            took = time.monotonic() - started
        finally:
            mosquitto.process.send_signal(signal.SIGCONT)
    finally:
        agent.kill()
        watcher.close()
    stamps = [dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
              for line in agent.log().splitlines()
              if line.endswith(("stopping: no new samples; scoring what is buffered",
                                "agent.service: stopped"))]
    drain = (stamps[-1] - stamps[0]).total_seconds()
    assert drain <= 3.0, f"the drain took {drain:.2f} s"
    assert took < 3 + 3, f"SIGTERM to exit took {took:.1f} s"  # and the interpreter's exit


# SIGHUP -----------------------------------------------------------------------------------


def test_sighup_keeps_buffered_windows_and_adds_an_asset(mosquitto, tmp_path, series,
                                                         dodgers_bundle):
    """A reload in the middle of the stream: the unchanged asset carries on with its
    buffered window (its alarms are those of one uninterrupted offline run), and an asset
    added by the reload is subscribed and scored."""
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle)
    expected = offline_events(config, series)
    half = len(series.ts) // 2
    first = Series(series.ts[:half], series.values[:half], series.channels, series.period)
    second = Series(series.ts[half:], series.values[half:], series.channels, series.period)

    watcher = Watcher(mosquitto.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        sent = replay(first, "127.0.0.1", mosquitto.port, TOPIC, speed=0, progress=False)
        watcher.wait(lambda: watcher.counter("agent", "messages_received") >= sent.messages,
                     60, "the first half at the agent")

        raw = yaml.safe_load(config.read_text())
        raw["assets"].append(dodgers_asset("second-ramp", "sensors/second/count",
                                           dodgers_bundle))
        config.write_text(yaml.safe_dump(raw))
        agent.send(signal.SIGHUP)
        watcher.wait(lambda: "second-ramp" in watcher.state("agent").get("models", {}), 30,
                     "the added asset in the status")

        sent2 = replay(second, "127.0.0.1", mosquitto.port, TOPIC, speed=0, progress=False)
        other = replay(first, "127.0.0.1", mosquitto.port, "sensors/second/count", speed=0,
                       progress=False)
        watcher.wait(lambda: watcher.counter("agent", "messages_received")
                     >= sent.messages + sent2.messages + other.messages, 60, "every message")
        stop_and_check(agent, watcher, "agent")
        watcher.wait_for_events(expected)
    finally:
        agent.kill()
        watcher.close()

    dodgers = {(a["alarm_id"], a["state"]) for a in watcher.alarms if a["asset"] == "dodgers"}
    assert dodgers == expected
    assert any(a["asset"] == "second-ramp" for a in watcher.alarms)
    assert "reload done: 0 asset(s) with a new model or settings, 1 added" in agent.log()


def test_sighup_refuses_a_broken_configuration_and_a_corrupt_bundle(mosquitto, tmp_path,
                                                                     dodgers_bundle):
    """Each refusal is logged loudly and the agent runs on as before; then a good new
    bundle is checked, self-tested and taken."""
    bundle = tmp_path / "bundle"
    shutil.copytree(dodgers_bundle, bundle)
    config = write_config(tmp_path, mosquitto.port, bundle)
    watcher = Watcher(mosquitto.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        watcher.wait(lambda: "models" in watcher.state("agent"), 10, "a status with models")
        model_id = watcher.state("agent")["models"]["dodgers"]

        # A configuration that does not validate: the running one stays.
        text = config.read_text()
        config.write_text(text.replace("sample_period: 5min", "sample_period: often"))
        agent.send(signal.SIGHUP)
        watcher.wait(lambda: "reload refused, the running configuration stays" in agent.log(),
                     30, "the refusal in the log")
        assert "assets[0].sample_period" in agent.log()
        config.write_text(text)

        # A bundle that fails its checksum: the old model stays.
        good = (bundle / "model.onnx").read_bytes()
        (bundle / "model.onnx").write_bytes(good + b"\0")
        agent.send(signal.SIGHUP)
        watcher.wait(lambda: "RELOAD REFUSED for asset dodgers" in agent.log(), 30,
                     "the refusal in the log")
        assert "checksum" in agent.log()
        watcher.wait(lambda: watcher.counter("agent", "reload_refused") == 1, 10,
                     "the refusal counted")
        assert watcher.state("agent")["models"]["dodgers"] == model_id

        # A good bundle with other metadata: checked, self-tested and taken.
        (bundle / "model.onnx").write_bytes(good)
        meta = json.loads((bundle / "bundle.json").read_text())
        meta["threshold"] = 0.55
        (bundle / "bundle.json").write_text(json.dumps(meta))
        agent.send(signal.SIGHUP)
        watcher.wait(lambda: "reload done: 1 asset(s) with a new model" in agent.log(), 30,
                     "the new bundle taken")
        stop_and_check(agent, watcher, "agent")
    finally:
        agent.kill()
        watcher.close()


# systemd ----------------------------------------------------------------------------------


class NotifySocket:
    """The datagram socket systemd would give a Type=notify service."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def read(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages += self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                pass
        return self.messages

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.messages:
            assert time.monotonic() < deadline, f"no {line} within {timeout} s: {self.messages}"
            self.read(0.1)

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_only_once_connected_then_watchdog_and_stopping(tmp_path,
                                                                       dodgers_bundle):
    broker = Mosquitto(tmp_path)  # its port is reserved; it listens only later
    config = write_config(tmp_path, broker.port, dodgers_bundle)
    notify = NotifySocket(tmp_path / "notify.sock")
    agent = Agent(config, env={"NOTIFY_SOCKET": str(notify.path),
                               "WATCHDOG_USEC": "1000000"}).start()
    try:
        # Models load, the broker is down: the watchdog is fed, READY is not sent.
        notify.wait_for("WATCHDOG=1", 60)
        notify.read(1.2)
        assert "READY=1" not in notify.messages
        assert notify.messages.count("WATCHDOG=1") >= 2

        broker.start()
        notify.wait_for("READY=1", 10)
        assert any(m.startswith("STATUS=connected to 127.0.0.1") for m in notify.messages)

        agent.send(signal.SIGHUP)
        notify.wait_for("RELOADING=1", 10)
        before = len(notify.messages)
        agent.send(signal.SIGTERM)
        assert agent.wait(30) == 0, agent.log()
        notify.read(0.2)
        assert "STOPPING=1" in notify.messages[before:]
        assert notify.messages.count("READY=1") == 2  # the start and the end of the reload
    finally:
        agent.kill()
        notify.close()
        if broker.process is not None:
            broker.stop()


def test_notifier_speaks_the_protocol_on_an_abstract_socket():
    name = f"segwatch-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(1)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000",
                             "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_interval == 2.0
        assert notifier.ready("serving")
        lines = server.recv(4096).decode().split("\n")
        assert lines[:2] == ["READY=1", "STATUS=serving"] and lines[2].startswith("MONOTONIC")
        assert notifier.watchdog() and not notifier.watchdog()  # at most every second
        assert server.recv(4096) == b"WATCHDOG=1"
        notifier.close()
    finally:
        server.close()
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert not Notifier({}).ready("outside systemd")


# Scale-out and protocol -------------------------------------------------------------------


def test_two_agents_on_one_broker_each_score_only_their_assets(mosquitto, tmp_path,
                                                               dodgers_dir, dodgers_bundle):
    east_data, west_data = dodgers_weeks(dodgers_dir, 3), dodgers_weeks(dodgers_dir, 3, 3)
    east = write_config(tmp_path, mosquitto.port, dodgers_bundle, client_id="gw-east",
                        assets=[dodgers_asset("east", "plant/east/count", dodgers_bundle)])
    west = write_config(tmp_path, mosquitto.port, dodgers_bundle, client_id="gw-west",
                        assets=[dodgers_asset("west", "plant/west/count", dodgers_bundle)])
    want_east = offline_events(east, east_data, "east")
    want_west = offline_events(west, west_data, "west")

    watcher = Watcher(mosquitto.port)
    agents = {"gw-east": Agent(east).start(), "gw-west": Agent(west).start()}
    try:
        for name, agent in agents.items():
            watcher.wait_online(agent, name)
        sent_east = replay(east_data, "127.0.0.1", mosquitto.port, "plant/east/count",
                           speed=0, progress=False)
        sent_west = replay(west_data, "127.0.0.1", mosquitto.port, "plant/west/count",
                           speed=0, progress=False)
        for name, sent in (("gw-east", sent_east), ("gw-west", sent_west)):
            watcher.wait(lambda: watcher.counter(name, "messages_received") >= sent.messages,
                         60, f"{name} got its messages")
        for name, agent in agents.items():
            stop_and_check(agent, watcher, name)
        watcher.wait_for_events(want_east | want_west)
    finally:
        for agent in agents.values():
            agent.kill()
        watcher.close()

    assert watcher.state("gw-east")["models"].keys() == {"east"}
    assert watcher.state("gw-west")["models"].keys() == {"west"}
    # Each agent received exactly the messages of its own asset, and scored them.
    assert watcher.counter("gw-east", "messages_received") == sent_east.messages
    assert watcher.counter("gw-west", "messages_received") == sent_west.messages
    by_asset = collections.defaultdict(set)
    for doc in watcher.alarms:
        by_asset[doc["asset"]].add((doc["alarm_id"], doc["state"]))
    assert by_asset["east"] == want_east and by_asset["west"] == want_west
    assert want_east and want_west


def test_an_agent_of_a_shared_group_takes_asset_topics_through_share(tmp_path, series,
                                                                     dodgers_bundle):
    """With broker.shared_group the sample topics are subscribed as $share/<group>/...;
    with one member in the group it receives every message and gives the offline alarms."""
    broker = Mosquitto(tmp_path, "log_type error\nlog_type warning\nlog_type notice\n"
                       "log_type information\nlog_type subscribe\n").start()
    asset = {"name": "dodgers", "sample_period": "5min", "model": str(dodgers_bundle),
             "topic": "plant/ramp/scan", "channels": [{"name": "count"}]}
    config = write_config(tmp_path, broker.port, dodgers_bundle, assets=[asset],
                          broker={"shared_group": "pool"})
    expected = offline_events(config, series)
    watcher = Watcher(broker.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        sent = replay(series, "127.0.0.1", broker.port, "plant/ramp/scan", speed=0,
                      payload="asset", progress=False)
        watcher.wait(lambda: watcher.counter("agent", "messages_received") >= sent.messages,
                     60, "every message at the agent")
        stop_and_check(agent, watcher, "agent")
        watcher.wait_for_events(expected)
    finally:
        agent.kill()
        watcher.close()
        broker.stop()
    assert set(watcher.events()) == expected
    log = Path(broker.log.name).read_text()
    assert "agent 1 $share/pool/plant/ramp/scan" in log
    assert "agent 1 segwatch/dodgers/command" in log  # commands are not shared


def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(tmp_path, dodgers_bundle):
    """amqtt speaks MQTT 3.1.1 only: the agent falls back and comes online."""
    port = free_port()
    config = write_config(tmp_path, port, dodgers_bundle)
    with EmbeddedBroker(port):
        statuses = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watch-311",
                             protocol=mqtt.MQTTv311)
        client.on_connect = lambda c, *_: c.subscribe("segwatch/agents/+/status", 1)
        client.on_message = lambda _c, _u, m: statuses.append(json.loads(m.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        agent = Agent(config).start()
        try:
            deadline = time.monotonic() + 60
            while not any(s["state"] == "online" for s in statuses):
                assert agent.alive() and time.monotonic() < deadline, agent.log()
                time.sleep(0.1)
            agent.send(signal.SIGTERM)
            assert agent.wait(30) == 0
        finally:
            agent.kill()
            client.disconnect()
            client.loop_stop()
    assert "falling back to MQTT 3.1.1" in agent.log()
    assert "(MQTT 3.1.1, new session)" in agent.log()
    assert "disconnected from the broker" not in agent.log()


def test_a_full_queue_is_counted_and_the_agent_goes_on(mosquitto, tmp_path, series,
                                                       dodgers_bundle):
    """The message callback never waits for the worker: with a queue of one message, a
    burst overflows it, the overflow is counted, and the agent keeps serving."""
    config = write_config(tmp_path, mosquitto.port, dodgers_bundle,
                          inference={"queue_size": 1})
    watcher = Watcher(mosquitto.port)
    agent = Agent(config).start()
    try:
        watcher.wait_online(agent, "agent")
        for week in range(4):
            part = slice(week * WEEK, (week + 1) * WEEK)
            replay(Series(series.ts[part], series.values[part], series.channels,
                          series.period), "127.0.0.1", mosquitto.port, TOPIC, speed=0,
                   progress=False)
        watcher.wait(lambda: watcher.counter("agent", "rejected.queue_full") > 0, 30,
                     "queue_full counted")
        stop_and_check(agent, watcher, "agent")
    finally:
        agent.kill()
        watcher.close()


# Configuration of the connection ----------------------------------------------------------


def _minimal(**broker) -> dict:
    return {"broker": {"client_id": "gw1", **broker}, "database": "a.db",
            "assets": [{"name": "p1", "sample_period": 1, "model": "m",
                        "channels": [{"name": "x", "topic": "plant/p1/x"}]}]}


def test_connection_keys_defaults_and_errors():
    path = Path("/etc/segwatch/agent.yaml")
    config = parse_config(_minimal(), path)
    assert config.broker.protocol == "5" and config.broker.session_expiry == 3600
    assert config.stop_timeout == 30
    assert parse_config(_minimal(protocol="3.1.1"), path).broker.protocol == "3.1.1"
    for broker, key in (({"protocol": 4}, "broker.protocol"),
                        ({"password_file": "a", "password_env": "B"}, "broker.password_file"),
                        ({"reconnect_min_delay": 5, "reconnect_max_delay": 1},
                         "broker.reconnect_max_delay")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            parse_config(_minimal(**broker), path)
    with pytest.raises(ConfigError, match="key 'assets\\[0\\].topic'.*asset topic"):
        parse_config(_minimal(shared_group="pool"), path)  # channel topics cannot be shared
    for prefix in ("plant//segwatch", "$SYS/x", "a/+/b", "a\0b"):
        raw = dict(_minimal(), alarm_prefix=prefix)
        with pytest.raises(ConfigError, match="key 'alarm_prefix'"):
            parse_config(raw, path)
