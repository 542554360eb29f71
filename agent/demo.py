"""``segwatch-agent demo``: the Dodgers test half through a real MQTT broker.

1. An embedded broker (amqtt) listens on a free loopback port.
2. The agent starts as its own process with ``edge_configs/dodgers-demo.yaml`` and the
   shipped bundle ``models/dodgers-unet``.
3. A subscriber prints every alarm the agent publishes.
4. The test half of the Dodgers series (second half, 39 games) is replayed onto the broker.
5. Once the agent has taken every message, it is stopped with SIGTERM, scores what is
   buffered and exits; the alarms in ``demo.db`` are matched to the games.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from agent.datasets import dodgers_split, read_dodgers, read_dodgers_events, Series
from agent.evaluation import events_with_data, score_events
from agent.replay import replay
from agent.store import AlarmStore
from agent.timeutil import to_iso

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "edge_configs" / "dodgers-demo.yaml"
DEFAULT_DATA = ROOT / "data" / "dodgers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1 in a background thread (anonymous, no persistence)."""

    def __init__(self, port: int):
        self.port = port
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)

    def __enter__(self) -> "EmbeddedBroker":
        self._thread.start()
        if not self._ready.wait(20) or self._error:
            raise RuntimeError(f"the embedded MQTT broker did not start: {self._error}")
        return self

    def __exit__(self, *_exc) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await broker.shutdown()


class AlarmWatcher:
    """Subscribes to alarms and the agent's status; prints alarms as they arrive."""

    def __init__(self, port: int, prefix: str, status_topic: str):
        self.status: dict = {}
        self.alarms: list[dict] = []
        self.status_topic = status_topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="segwatch-demo",
                                  protocol=mqtt.MQTTv311)
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"{prefix}/+/alarm", 1), (status_topic, 1)])
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        doc = json.loads(message.payload)
        if message.topic == self.status_topic:
            self.status = doc
            return
        self.alarms.append(doc)
        when = doc["start"] if doc["state"] == "active" else doc["end"]
        verb = "RAISED " if doc["state"] == "active" else "cleared"
        print(f"  alarm {verb} {doc['asset']}/{doc['class']} {when} "
              f"(peak {doc['peak_score']:.2f}, id {doc['alarm_id'][:8]})", flush=True)

    def wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_demo(data_dir: Path = DEFAULT_DATA, database: Path = Path("demo.db"),
             speed: float = 250_000.0) -> int:
    data_dir = Path(data_dir)
    if not (data_dir / "Dodgers.data").is_file():
        print(f"demo: no Dodgers.data in {data_dir}; pass --data FOLDER", file=sys.stderr)
        return 2
    series = read_dodgers(data_dir / "Dodgers.data")
    events = read_dodgers_events(data_dir / "Dodgers.events")
    split = dodgers_split(series)
    test_rows = series.ts >= split
    test = Series(series.ts[test_rows], series.values[test_rows], series.channels,
                  series.period)
    database = Path(database).resolve()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)

    port = free_port()
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["broker"]["port"] = port
    raw["database"] = str(database)
    raw["status_interval"] = 0.5
    for asset in raw["assets"]:
        asset["model"] = str((DEMO_CONFIG.parent / asset["model"]).resolve())
    prefix = raw.get("alarm_prefix", "segwatch")
    status = f"{prefix}/agents/{raw['broker']['client_id']}/status"

    print(f"demo: embedded MQTT broker on 127.0.0.1:{port}", flush=True)
    with EmbeddedBroker(port), tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "demo.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        watcher = AlarmWatcher(port, prefix, status)
        command = [sys.executable, "-m", "agent", "--log-level", "warning", "run", "--config",
                   str(config_path)]
        agent = subprocess.Popen(command, env=_child_env())
        try:
            watcher.wait(lambda: "models" in watcher.status or agent.poll() is not None, 120,
                         "the agent to come online")
            if agent.poll() is not None:
                print("demo: the agent exited at start; see its log above", file=sys.stderr)
                return 1
            print(f"demo: agent online with model {watcher.status['models']}", flush=True)
            print(f"demo: replaying the test half, {to_iso(test.ts[0])} to "
                  f"{to_iso(test.ts[-1])}, at {speed:,.0f}x", flush=True)
            result = replay(test, "127.0.0.1", port, raw["assets"][0]["channels"][0]["topic"],
                            speed=speed)
            watcher.wait(lambda: watcher.status.get("counters", {}).get("messages_received", 0)
                         >= result.messages, 120, "the agent to take every message")
            agent.send_signal(signal.SIGTERM)
            agent.wait(120)
            watcher.wait(lambda: watcher.status.get("state") == "offline", 30,
                         "the agent's offline status")
        finally:
            if agent.poll() is None:
                agent.kill()
            watcher.close()

    store = AlarmStore(database)
    rows = store.alarms()
    store.close()
    spans = [(row.start_ts, row.end_ts) for row in rows]
    scored = events_with_data(events, test, test.ts[0], test.ts[-1] + 1)
    score = score_events(spans, scored)
    _print_table(score, len([e for e in events if e.window_start >= split]))
    print(score.line(database.name))
    return 0 if agent.returncode == 0 else 1


def _print_table(score, games_in_half: int) -> None:
    print()
    print(f"{'game':<28} {'label window (UTC)':<36} result")
    for result in score.events:
        event = result.event
        window = f"{to_iso(event.window_start)[5:16]} .. {to_iso(event.window_end)[5:16]}"
        mark = "detected" if result.detected else "MISSED"
        print(f"{event.name:<28} {window:<36} {mark}")
    for start, end in score.false_alarms:
        print(f"{'false alarm':<28} {to_iso(start)[5:16]} .. {to_iso(end)[5:16]}")
    skipped = games_in_half - len(score.events)
    if skipped:
        print(f"({skipped} game(s) of the test half fall entirely in missing data and are not "
              "counted)")
    print()


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env
