"""Replay a data file onto MQTT as a sensor gateway would.

Samples are published in time order at ``speed`` times real time (0: as fast as the broker
takes them). Samples due in the same tick go out together as one JSON list, so a fast
replay sends batched payloads and a real-time replay sends one sample per message. Missing
samples (NaN) are not sent: a gateway sends nothing for a sample it does not have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import numpy as np
import paho.mqtt.client as mqtt

from agent.datasets import Series

log = logging.getLogger(__name__)

TICK = 0.05
MAX_BATCH = 500  # samples per message: far below the agent's 1 MB payload limit


@dataclasses.dataclass
class ReplayResult:
    samples: int
    messages: int
    seconds: float


def _payloads(series: Series, rows: np.ndarray, per_channel: bool) -> list[dict]:
    docs = []
    for i in rows:
        ts = round(float(series.ts[i]), 3)
        row = series.values[i]
        if per_channel:
            if np.isfinite(row[0]):
                docs.append({"ts": ts, "value": float(row[0])})
        else:
            values = {name: float(v) for name, v in zip(series.channels, row) if np.isfinite(v)}
            if values:
                docs.append({"ts": ts, "values": values})
    return docs


def replay(
    series: Series,
    host: str,
    port: int,
    topic: str,
    speed: float = 0.0,
    payload: str = "auto",
    qos: int = 1,
    progress: bool = True,
    client_id: str = "",
) -> ReplayResult:
    """Publish ``series`` on ``topic``; ``payload`` is ``channel``, ``asset`` or ``auto``.

    ``channel`` payloads (``{"ts", "value"}``) need a one-channel series; ``asset`` payloads
    carry ``{"ts", "values": {channel: x}}``. Returns the counts once the broker has
    acknowledged every message (QoS 1).
    """
    if not len(series.ts):
        raise ValueError("nothing to replay: the series is empty")
    per_channel = payload == "channel" or (payload == "auto" and len(series.channels) == 1)
    if per_channel and len(series.channels) != 1:
        raise ValueError("channel payloads need a one-channel file; use --payload asset")

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(0.2, 2)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise OSError(f"cannot connect to the MQTT broker at {host}:{port}: "
                      f"{exc.strerror or exc}") from None
    client.loop_start()

    n = len(series.ts)
    t0, wall0 = float(series.ts[0]), time.monotonic()
    sent_rows, messages, samples, last = 0, 0, 0, None
    shown = 0.0
    try:
        while sent_rows < n:
            if speed > 0:
                horizon = t0 + (time.monotonic() - wall0) * speed
                due = int(np.searchsorted(series.ts, horizon, side="right"))
                if due <= sent_rows:
                    time.sleep(TICK)
                    continue
            else:
                due = n
            due = min(due, sent_rows + max(1, MAX_BATCH // len(series.channels)))
            docs = _payloads(series, np.arange(sent_rows, due), per_channel)
            sent_rows = due
            if docs:
                body = json.dumps(docs[0] if len(docs) == 1 else docs, separators=(",", ":"))
                last = client.publish(topic, body, qos=qos)
                if last.rc == mqtt.MQTT_ERR_NO_CONN:
                    _wait_for_reconnect(client, host, port, samples)
                messages += 1
                samples += len(docs)
            if progress and time.monotonic() - shown >= 1.0:
                shown = time.monotonic()
                _progress(sent_rows, n, samples, shown - wall0)
        deadline = time.monotonic() + 60
        while last is not None and not last.is_published():
            if time.monotonic() > deadline:
                raise OSError("the broker did not acknowledge every message within 60 s")
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    seconds = time.monotonic() - wall0
    if progress:
        _progress(n, n, samples, seconds, end=True)
    return ReplayResult(samples, messages, seconds)


def _wait_for_reconnect(client, host: str, port: int, samples: int,
                        timeout: float = 30.0) -> None:
    """The broker went away: paho queues what is published and reconnects by itself; give
    up if it does not come back within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not client.is_connected():
        if time.monotonic() > deadline:
            raise OSError(f"lost the broker at {host}:{port} after {samples:,} samples and it "
                          f"did not come back within {timeout:.0f} s")
        time.sleep(0.1)


def _progress(done: int, total: int, samples: int, seconds: float, end: bool = False) -> None:
    rate = samples / seconds if seconds > 0 else 0.0
    line = (f"replay: {done:,}/{total:,} rows ({100 * done / max(total, 1):.0f} %), "
            f"{samples:,} samples sent, {rate:,.0f} samples/s")
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if end else "", file=sys.stderr, flush=True)
    elif end or int(seconds) % 5 == 0:
        print(line, file=sys.stderr, flush=True)
