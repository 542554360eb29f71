"""The agent service: MQTT in, pipeline, alarms out to MQTT and SQLite.

Threads: paho's network thread only queues incoming messages (bounded; a full queue is
counted); one worker thread decodes, windows, scores and raises alarms, in arrival order.
Alarm events are committed to SQLite before they are published with QoS 1; the broker's
acknowledgement marks them published. Unacknowledged events are published again on the
next connection.

Topics (``<prefix>`` is ``alarm_prefix``):

- ``<prefix>/<asset>/alarm``: alarm raise and clear, QoS 1, not retained;
- ``<prefix>/agents/<client_id>/status``: the agent's status, QoS 1, retained; ``online``
  with counters while running, ``offline`` on a clean stop and as the last will.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from agent import __version__
from agent.alarms import AlarmEvent
from agent.bundle import load_bundle
from agent.config import AgentConfig, AssetConfig
from agent.inference import load_backend
from agent.ingest import PayloadError, Route, decode_payload
from agent.pipeline import AssetPipeline, Pipeline, settings_from_bundle
from agent.store import AlarmStore, alarm_payload
from agent.timeutil import to_iso

log = logging.getLogger(__name__)

DRAIN_BATCH = 512
ACK_TIMEOUT = 10.0
WARN_INTERVAL = 10.0
_GRID_REASONS = {
    "late": "arrived after the snapshot covering them was cut (max_lateness)",
    "duplicate": "repeat a slot that already has a sample",
    "unknown_channel": "name a channel the asset does not have",
}
MAX_FUTURE = 86_400.0  # samples further ahead of the wall clock are a broken sensor clock


class StartupError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


def status_topic(config: AgentConfig) -> str:
    return f"{config.alarm_prefix}/agents/{config.broker.client_id}/status"


def alarm_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/alarm"


def build_pipeline(config: AgentConfig, backend_kind: str = "auto") -> Pipeline:
    """Load every asset's bundle (once per path), its backend, and the asset pipelines."""
    loaded: dict = {}
    assets = []
    for asset in config.assets:
        if asset.model not in loaded:
            bundle = load_bundle(asset.model)
            loaded[asset.model] = (bundle, load_backend(bundle, backend_kind,
                                                        config.inference_threads))
        bundle, backend = loaded[asset.model]
        assets.append(AssetPipeline(_settings(asset, bundle), bundle, backend))
    return Pipeline(assets)


def open_store(path) -> AlarmStore:
    """Open the alarm database, or say what is wrong with the path."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return AlarmStore(path)
    except (OSError, SQLAlchemyError) as exc:
        reason = getattr(exc, "orig", None) or exc
        raise StartupError(f"database {path}: cannot open it as SQLite: {reason}; check the "
                           "'database' key and the folder's permissions") from None


def _settings(asset: AssetConfig, bundle):
    channels = [c.name for c in asset.channels]
    if len(channels) != len(bundle.channels):
        raise StartupError(
            f"asset {asset.name!r} has {len(channels)} channels but its model "
            f"{bundle.model_id} takes {len(bundle.channels)} ({', '.join(bundle.channels)})"
        )
    bundle_period = bundle.metadata.get("sample_period")
    if bundle_period and abs(float(bundle_period) - asset.sample_period) > 1e-9:
        log.warning("asset %s: sample_period %g s differs from the %g s the model %s was "
                    "trained on; snapshots cover a different time span", asset.name,
                    asset.sample_period, float(bundle_period), bundle.model_id)
    if channels != bundle.channels:
        log.info("asset %s: channels %s feed model inputs %s in that order", asset.name,
                 channels, bundle.channels)
    try:
        return settings_from_bundle(
            bundle, asset.name, channels,
            sample_period=asset.sample_period,
            snapshot_length=asset.snapshot_length,
            hop=asset.hop,
            normalization=asset.normalization,
            ensemble=asset.ensemble,
            max_missing=asset.max_missing,
            max_lateness=asset.max_lateness,
            threshold=asset.alarm.threshold,
            hysteresis=asset.alarm.hysteresis,
            min_duration=asset.alarm.min_duration,
        )
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def routes(config: AgentConfig) -> dict[str, Route]:
    table = {}
    for asset in config.assets:
        names = frozenset(c.name for c in asset.channels)
        if asset.topic:
            table[asset.topic] = Route(asset.name, None, names)
        for channel in asset.channels:
            if channel.topic:
                table[channel.topic] = Route(asset.name, channel.name, names)
    return table


class AgentService:
    """One running agent: MQTT client, worker loop, pipeline and alarm store."""

    def __init__(self, config: AgentConfig, backend: str = "auto"):
        self.config = config
        self.backend_kind = backend
        self.routes = routes(config)
        self.counters: collections.Counter = collections.Counter()
        self.inbox: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.started = time.time()
        self._acks: queue.Queue = queue.Queue()
        self._inflight: dict[int, int] = {}
        self._inflight_lock = threading.Lock()
        self._last_warning: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self.pipeline: Pipeline | None = None
        self.store: AlarmStore | None = None
        self.client: mqtt.Client | None = None

    # Start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load models, open the store, connect to the broker."""
        self.pipeline = build_pipeline(self.config, self.backend_kind)
        self.store = open_store(self.config.database)
        self.client = self._make_client()
        broker = self.config.broker
        log.info("connecting to %s:%d as %s", broker.host, broker.port, broker.client_id)
        try:
            self.client.connect_async(broker.host, broker.port, keepalive=broker.keepalive)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot connect to {broker.host}:{broker.port}: {exc}") from exc
        self.client.loop_start()

    def _make_client(self) -> mqtt.Client:
        broker = self.config.broker
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=broker.client_id,
                             clean_session=True, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 30)
        client.will_set(status_topic(self.config), json.dumps(self._status("offline")),
                        qos=1, retain=True)
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls is not None:
            tls = broker.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(tls.insecure)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # paho callbacks (network thread): never block --------------------------------------

    def _on_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the connection: %s", reason_code)
            return
        log.info("connected to the broker")
        if not self.stopping.is_set():
            client.subscribe([(topic, 1) for topic in self.routes])
        # The network thread publishes no counters: the worker owns them (publish_status).
        client.publish(status_topic(self.config),
                       json.dumps(self._status("online", counters=False)), qos=1, retain=True)
        self.connected.set()
        self._acks.put(("resend", None))

    def _on_connect_fail(self, _client, _userdata) -> None:
        broker = self.config.broker
        self._reject_log("connect_failed", f"cannot reach the broker at {broker.host}:"
                         f"{broker.port}; retrying (check broker.host and broker.port)")

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        if not self.stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            self.inbox.put_nowait((message.topic, message.payload))
        except queue.Full:
            self._reject("queue_full", f"topic {message.topic}: the worker is behind; "
                         f"{self.config.queue_size} messages are waiting (inference.queue_size)")

    def _on_publish(self, _client, _userdata, mid, _reason_code, _properties) -> None:
        self._acks.put(("ack", mid))

    # Worker loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Process messages until stop() is called; then drain, score what is left, exit."""
        next_status = time.monotonic()
        try:
            while not self.stopping.is_set():
                self._process_inbox(timeout=0.2)
                self._handle_acks()
                if time.monotonic() >= next_status:
                    self.publish_status()
                    next_status = time.monotonic() + self.config.status_interval
        finally:
            self._shutdown()

    def stop(self, *_args) -> None:
        """Ask the worker loop to stop (signal-safe)."""
        self.stopping.set()

    def _process_inbox(self, timeout: float) -> None:
        try:
            items = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return
        while len(items) < DRAIN_BATCH:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for topic, payload in items:
            try:
                self._ingest(topic, payload)
            except Exception:  # a bug must not stop the agent: count it, log it, go on
                self.counters["errors.ingest"] += 1
                log.exception("error while ingesting a message on %s; message dropped", topic)
        self._emit(self._step())

    def _step(self) -> list[AlarmEvent]:
        try:
            return self.pipeline.step()
        except Exception:
            self.counters["errors.inference"] += 1
            log.exception("error while scoring snapshots; the pending snapshots are dropped")
            for asset in self.pipeline.assets.values():
                asset.pending.clear()
            return []

    def _ingest(self, topic: str, payload: bytes) -> None:
        self.counters["messages_received"] += 1
        route = self.routes.get(topic)
        if route is None:
            self._reject("unknown_topic", f"topic {topic!r} is not configured")
            return
        try:
            decoded = decode_payload(payload, route)
        except PayloadError as exc:
            self._reject(exc.reason, f"topic {topic}: {exc.detail}")
            return
        for reason, detail in decoded.rejected:
            self._reject(reason, f"topic {topic}: a sample in a batch: {detail}")
        samples = decoded.samples
        horizon = time.time() + MAX_FUTURE
        if any(ts > horizon for _, ts, _ in samples):
            samples = [s for s in samples if s[1] <= horizon]
            self._reject("future_timestamp", f"topic {topic}: a sample is more than "
                         f"{MAX_FUTURE / 3600:.0f} h ahead of this machine's clock")
        rejected = self.pipeline.assets[route.asset].add(samples)
        for reason, count in rejected.items():
            self._reject(reason, f"topic {topic}: {count} sample(s) {_GRID_REASONS[reason]}",
                         count=count)

    def _reject(self, reason: str, detail: str, count: int = 1) -> None:
        """Count a rejection and log it, rate-limited."""
        self.counters[f"rejected.{reason}"] += count
        self._reject_log(reason, detail, count)

    def _reject_log(self, reason: str, detail: str, count: int = 1) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(reason, -1e9) >= WARN_INTERVAL:
            more = self._suppressed.pop(reason, 0)
            tail = f" ({more} more since the last warning)" if more else ""
            log.warning("rejected (%s): %s%s", reason, detail[:300], tail)
            self._last_warning[reason] = now
        else:
            self._suppressed[reason] += count

    def _emit(self, events: list[AlarmEvent]) -> None:
        for event in events:
            topic = alarm_topic(self.config, event.asset)
            outbox_id = self.store.record(event, topic)
            if outbox_id is None:
                self.counters["alarms_duplicate"] += 1
                continue
            self.counters["alarms_raised" if event.state == "active" else "alarms_cleared"] += 1
            if event.state == "active":
                log.info("alarm %s raised: %s/%s since %s (score %.2f)", event.alarm_id[:8],
                         event.asset, event.class_name, to_iso(event.start), event.peak_score)
            else:
                log.info("alarm %s cleared: %s/%s from %s to %s (peak %.2f)",
                         event.alarm_id[:8], event.asset, event.class_name,
                         to_iso(event.start), to_iso(event.end), event.peak_score)
            self._publish_outbox(outbox_id, topic, alarm_payload(event))

    def _publish_outbox(self, outbox_id: int, topic: str, payload: str) -> None:
        if not self.connected.is_set():
            return  # stays pending; published again on the next connection
        with self._inflight_lock:
            info = self.client.publish(topic, payload, qos=1)
            # NO_CONN: paho keeps the message and sends it on reconnect; track it either way.
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._inflight[info.mid] = outbox_id

    def _handle_acks(self, resend: bool = True) -> None:
        acked = []
        wants_resend = False
        while True:
            try:
                kind, mid = self._acks.get_nowait()
            except queue.Empty:
                break
            if kind == "resend":
                wants_resend = True
                continue
            with self._inflight_lock:
                outbox_id = self._inflight.pop(mid, None)
            if outbox_id is not None:
                acked.append(outbox_id)
        self.store.mark_published(acked)
        if wants_resend and resend:
            self._resend_pending()

    def _resend_pending(self) -> None:
        with self._inflight_lock:
            waiting = set(self._inflight.values())
        for row in self.store.pending():
            if row.id not in waiting:
                self._publish_outbox(row.id, row.topic, row.payload)

    # Status and shutdown ------------------------------------------------------------------

    def _status(self, state: str, counters: bool = True) -> dict:
        status = {
            "state": state,
            "client_id": self.config.broker.client_id,
            "version": __version__,
            "pid": os.getpid(),
            "started": to_iso(self.started),
            "time": to_iso(time.time()),
        }
        if counters and self.pipeline is not None:
            counters = dict(self.counters)
            counters.update(self.pipeline.counter_totals())
            status["counters"] = dict(sorted(counters.items()))
            status["inference_seconds"] = round(self.pipeline.inference_seconds, 3)
            status["models"] = {name: a.bundle.model_id
                                for name, a in self.pipeline.assets.items()}
            status["queue_depth"] = self.inbox.qsize()
            status["outbox_pending"] = self.store.pending_count()
        return status

    def publish_status(self) -> None:
        if self.connected.is_set():
            self.client.publish(status_topic(self.config), json.dumps(self._status("online")),
                                qos=1, retain=True)

    def _shutdown(self) -> None:
        log.info("stopping: no new samples; scoring what is buffered")
        try:
            self.client.unsubscribe(list(self.routes))
        except (ValueError, OSError):
            pass
        while not self.inbox.empty():
            self._process_inbox(timeout=0.0)
        try:
            self._emit(self.pipeline.stop())
        except Exception:
            log.exception("error while scoring the buffered samples at shutdown")
        if self.connected.is_set():
            self._wait_for_acks()
            self.publish_status()
            info = self.client.publish(status_topic(self.config),
                                       json.dumps(self._status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=5.0)
            except (RuntimeError, ValueError):
                pass  # the connection dropped: the broker publishes the will instead
        self.client.disconnect()
        self.client.loop_stop()
        self._handle_acks(resend=False)
        pending = self.store.pending_count()
        if pending:
            log.warning("%d alarm events not acknowledged by the broker; they are kept in %s "
                        "and published at the next start", pending, self.config.database)
        self.store.close()
        log.info("stopped")

    def _wait_for_acks(self) -> None:
        deadline = time.monotonic() + ACK_TIMEOUT
        while time.monotonic() < deadline:
            self._handle_acks()
            with self._inflight_lock:
                if not self._inflight:
                    return
            time.sleep(0.05)


def run_agent(config: AgentConfig, backend: str = "auto") -> int:
    """Run until SIGTERM or SIGINT; exit status 0 after a clean drain."""
    service = AgentService(config, backend)
    service.start()

    def stop(_signum, _frame):
        # A second signal during the drain is ignored: the drain finishes and exits 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
    return 0
