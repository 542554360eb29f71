"""The agent service: MQTT in, pipeline, alarms out to MQTT and SQLite.

Threads: paho's network thread only queues incoming messages (bounded; a full queue is
counted); one worker thread decodes, windows, scores and raises alarms, in arrival order.
Alarm events are committed to SQLite before they are published with QoS 1; the broker's
acknowledgement marks them published. Unacknowledged events are published again on the
next connection.

Connection: MQTT 5 with a persistent session (``broker.session_expiry``; the broker keeps
the subscriptions and queues samples while the agent is away), falling back to MQTT 3.1.1
when the broker refuses version 5. paho reconnects with a delay that doubles from
``reconnect_min_delay`` to ``reconnect_max_delay``; every connection subscribes again.

Signals: SIGTERM and SIGINT stop intake (unsubscribe), score what is buffered, wait for the
broker to acknowledge the outbox, publish ``offline`` and exit 0, all within
``stop_timeout``. SIGHUP reloads the configuration and the model bundles (``reload``).
Under systemd the agent reports READY, STATUS, WATCHDOG, RELOADING and STOPPING
(``agent.sdnotify``); the worker loop feeds the watchdog, so a stuck worker is restarted.

Topics (``<prefix>`` is ``alarm_prefix``):

- ``<prefix>/<asset>/alarm``: alarm raise and clear, QoS 1, not retained;
- ``<prefix>/<asset>/alarm/ack`` and ``<prefix>/<asset>/shelve``: acknowledgements, shelves
  and their ends, QoS 1, not retained (through the outbox, like raises and clears);
- ``<prefix>/<asset>/state``: the asset's current picture (active alarms with their ack
  and shelve state, shelved classes, sensor status, model, last sample), QoS 1, retained;
- ``<prefix>/<asset>/command``: operator commands in (ack, shelve, unshelve), QoS 1;
- ``<prefix>/agents/<client_id>/status``: the agent's status, QoS 1, retained; ``online``
  with counters while running, ``offline`` on a clean stop and as the last will. The same
  document is written to a status file next to the database (``agent.health``).

Alarm state survives a restart: active alarms, acknowledgements and shelves are read back
from the database at start, and each active alarm is resumed by its tracker, so that its
clear carries the same alarm id.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__
from agent.alarms import (Ack, AlarmBoard, AlarmEvent, BoardAlarm, CommandError, ShelveChange,
                          parse_command)
from agent.bundle import BundleError, load_bundle
from agent.config import AgentConfig, AssetConfig, ConfigError, load_config
from agent.inference import BackendError, load_backend
from agent.ingest import PayloadError, Route, decode_payload
from agent.pipeline import AssetPipeline, Pipeline, settings_from_bundle
from agent.sdnotify import Notifier
from agent.health import status_file, write_status_file
from agent.outbox import Outbox
from agent.store import AlarmStore, StoreError, alarm_payload
from agent.timeutil import to_iso

log = logging.getLogger(__name__)

DRAIN_BATCH = 512
UNSUBACK_TIMEOUT = 2.0  # at most this long waiting for the broker to confirm the stop
MAX_SESSION_EXPIRY = 0xFFFFFFFF  # MQTT 5: the session never expires
_UNSUPPORTED_PROTOCOL = 0x84  # CONNACK reason code; paho also maps a 3.1.1 refusal to it
_SESSION_TAKEN_OVER = 0x8E  # DISCONNECT reason code
CONNACK_TIMEOUT = 5.0  # no answer to an MQTT 5 CONNECT this long: try MQTT 3.1.1
WARN_INTERVAL = 10.0
STATE_INTERVAL = 0.5  # seconds: sensor status on the state topics, at most this late
SWEEP_INTERVAL = 10.0  # seconds: every asset's state looked at, changed or not
MAINTENANCE_INTERVAL = 3600.0  # database retention and WAL truncation
_GRID_REASONS = {
    "late": "arrived after the snapshot covering them was cut (max_lateness)",
    "duplicate": "repeat a slot that already has a sample",
    "unknown_channel": "name a channel the asset does not have",
    "non_finite": "are not finite numbers",
    "out_of_range": "lie outside the channel's physical range (channels[].min, .max)",
}


class StartupError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


def status_topic(config: AgentConfig) -> str:
    return f"{config.alarm_prefix}/agents/{config.broker.client_id}/status"


def alarm_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/alarm"


def ack_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/alarm/ack"


def shelve_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/shelve"


def state_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/state"


def command_topic(config: AgentConfig, asset: str) -> str:
    return f"{config.alarm_prefix}/{asset}/command"


def build_pipeline(config: AgentConfig, backend_kind: str | None = None) -> Pipeline:
    """Load every asset's bundle (once per path), its backend, and the asset pipelines.

    ``backend_kind`` None: the configuration's ``inference.backend``."""
    loaded: dict = {}
    assets = [load_asset(asset, config, backend_kind, loaded) for asset in config.assets]
    return Pipeline(assets)


def load_asset(asset: AssetConfig, config: AgentConfig, backend_kind: str | None = None,
               loaded: dict | None = None) -> AssetPipeline:
    """One asset's pipeline: its bundle checked (sha256) and its backend self-tested, with
    the ``inference`` settings of ``config`` (at start and at a reload).

    ``loaded`` caches ``(bundle, backend)`` by bundle path, so assets that share a bundle
    share one backend. Raises BundleError, BackendError or StartupError.
    """
    loaded = {} if loaded is None else loaded
    if asset.model not in loaded:
        bundle = load_bundle(asset.model)
        loaded[asset.model] = (bundle, load_backend(
            bundle, backend_kind or config.inference_backend, config.inference_threads,
            precision=config.inference_precision, engine_dir=config.engine_dir))
    bundle, backend = loaded[asset.model]
    return AssetPipeline(_settings(asset, bundle), bundle, backend)


def open_store(path, check: str = "quick") -> AlarmStore:
    """Open the alarm database (a damaged one is moved aside), or say what is wrong."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return AlarmStore(path, check)
    except (OSError, SQLAlchemyError, StoreError) as exc:
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
            off_delay=asset.alarm.off_delay,
            channel_ranges=[(c.min, c.max) for c in asset.channels],
            max_fill=asset.max_fill,
            long_gap=asset.long_gap,
            gap_guard=asset.gap_guard,
            stuck_run=asset.stuck_run,
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
        # Operator commands: subscribed with the samples, handled before decoding.
        table.setdefault(command_topic(config, asset.name), Route(asset.name, None, frozenset()))
    return table


def _same_pipeline(a: AssetConfig, b: AssetConfig) -> bool:
    """True when two asset configurations differ at most in their topics."""
    def untopic(asset: AssetConfig) -> AssetConfig:
        channels = tuple(dataclasses.replace(c, topic=None) for c in asset.channels)
        return dataclasses.replace(asset, topic=None, channels=channels)

    return untopic(a) == untopic(b)


class _PahoLog:
    """paho's log lines to ``on_log(client, userdata, level, message)``, as paho's logger:
    a line is formatted only when it would be shown. (paho formats every line, one per
    packet, for an ``on_log`` callback: a tenth of its thread at 3,000 messages/s.)"""

    def __init__(self, on_log):
        self.on_log = on_log

    def log(self, level: int, fmt: str, *args) -> None:
        if level >= logging.ERROR:
            self.on_log(None, None, mqtt.MQTT_LOG_ERR, fmt % args)
        elif level >= logging.WARNING:
            self.on_log(None, None, mqtt.MQTT_LOG_WARNING, fmt % args)
        elif log.isEnabledFor(logging.DEBUG):
            self.on_log(None, None, mqtt.MQTT_LOG_DEBUG, fmt % args)


class _Client(mqtt.Client):
    """paho's client, keeping why the last connection attempt failed (paho's
    ``on_connect_fail`` does not say), so that the log can tell the user what to fix, and
    when the last CONNECT went out (some MQTT 3.1.1 brokers never answer an MQTT 5 one)."""

    last_error: OSError | None = None
    connect_sent: float | None = None  # monotonic time of the last CONNECT sent

    def reconnect(self):
        try:
            result = super().reconnect()
        except OSError as exc:
            self.last_error = exc
            raise
        self.last_error = None
        self.connect_sent = time.monotonic()
        return result


def describe_connect_error(exc: OSError | None, config: AgentConfig) -> str:
    """Why a connection to the broker failed, and which key to check."""
    broker = config.broker
    where = f"{broker.host}:{broker.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = broker.tls.ca_file if broker.tls and broker.tls.ca_file else "the system CAs"
        return (f"TLS: the certificate of {where} is not trusted: {exc.verify_message}; check "
                f"broker.tls.ca_file ({ca}) and that the certificate names {broker.host}")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake with {where} failed: {exc.reason or exc}; check broker.tls "
                "(does the broker require a client certificate, cert_file and key_file, or "
                "is it not a TLS port?)")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where}: is the broker running on that port?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name {broker.host!r} ({exc.strerror}); check broker.host"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer from {where} (timed out); check broker.host, broker.port, firewalls"
    if exc is not None:
        return f"cannot reach {where}: {exc}"
    return f"cannot reach {where}"


class AgentService:
    """One running agent: MQTT client, worker loop, pipeline and alarm store."""

    def __init__(self, config: AgentConfig, backend: str | None = None):
        self.config = config
        self.backend_kind = backend  # None: the configuration's inference.backend
        self.routes = routes(config)
        self.counters: collections.Counter = collections.Counter()
        self.inbox: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.started = time.time()
        self._acks: queue.Queue = queue.Queue()
        self.outbox: Outbox | None = None
        self.board = AlarmBoard({})
        self.status_path = status_file(config.database)
        self._states_sent: dict[str, tuple] = {}  # asset -> (picture, last sample) published
        self._last_sample: dict[str, float] = {}  # asset -> newest sample time
        self._next_state_refresh = 0.0
        self._states_due: set[str] = set()  # alarm or command changes: looked at next loop
        self._states_fed: set[str] = set()  # got samples: looked at every STATE_INTERVAL
        self._next_fed_check = 0.0
        self._next_sweep = 0.0
        self._next_maintenance = 0.0
        self._next_progress = 0.0
        self._last_warning: dict[str, float] = {}
        self._suppressed: collections.Counter = collections.Counter()
        self.pipeline: Pipeline | None = None
        self.store: AlarmStore | None = None
        self.client: mqtt.Client | None = None
        self.protocol = config.broker.protocol  # "5" or "3.1.1"; may fall back at run time
        self.reload_requested = threading.Event()
        self.notifier = Notifier()
        self._downgrade = threading.Event()
        self._connack_seen = False  # any CONNACK from this broker, even a refusal
        self._unsubacks: set[int] = set()
        self._stop_deadline = float("inf")
        self._subscriptions: dict[int, list[str]] = {}
        self._ready_sent = False
        self._was_connected = False

    # Start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load models, open the store, connect to the broker."""
        self._check_tls_files()  # before the models load: a wrong path fails at once
        self.pipeline = build_pipeline(self.config, self.backend_kind)
        self.store = open_store(self.config.database, self.config.database_check)
        self._open_alarms()
        self._connect()

    def _connect(self) -> None:
        """Make a client for ``self.protocol`` and let paho's thread connect it."""
        broker = self.config.broker
        self.client = self._make_client()
        log.info("connecting to %s:%d as %s (MQTT %s)", broker.host, broker.port,
                 broker.client_id, self.protocol)
        options: dict = {}
        if self.protocol == "5":
            options["clean_start"] = broker.session_expiry == 0
            if broker.session_expiry > 0:
                options["properties"] = Properties(PacketTypes.CONNECT)
                options["properties"].SessionExpiryInterval = int(
                    min(broker.session_expiry, MAX_SESSION_EXPIRY))
        try:
            self.client.connect_async(broker.host, broker.port, keepalive=broker.keepalive,
                                      **options)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot connect to {broker.host}:{broker.port}: {exc}") from exc
        self.client.loop_start()

    def _make_client(self) -> mqtt.Client:
        broker = self.config.broker
        if self.protocol == "5":
            client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=broker.client_id,
                             protocol=mqtt.MQTTv5)
        else:
            # 3.1.1 has no expiry: a persistent session lasts until the broker drops it.
            client = _Client(mqtt.CallbackAPIVersion.VERSION2, client_id=broker.client_id,
                             clean_session=broker.session_expiry == 0, protocol=mqtt.MQTTv311)
        client.logger = _PahoLog(self._on_log)
        client.suppress_exceptions = True  # a bug in a callback must not end paho's thread
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(broker.reconnect_min_delay, broker.reconnect_max_delay)
        client.will_set(status_topic(self.config), json.dumps(self._status("offline")),
                        qos=1, retain=True)
        if broker.username is not None or broker.password is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls is not None:
            self._set_tls(client, broker.tls)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _check_tls_files(self) -> None:
        tls = self.config.broker.tls
        for key in ("ca_file", "cert_file", "key_file") if tls is not None else ():
            path = getattr(tls, key)
            if path is not None and not os.access(path, os.R_OK):
                why = "does not exist" if not path.exists() else "is not readable by this user"
                raise StartupError(f"{self.config.path}: key 'broker.tls.{key}': {path} {why}")

    def _set_tls(self, client: mqtt.Client, tls) -> None:
        """CA, client certificate and key; the broker's host name is checked unless
        ``tls.insecure``."""
        try:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartupError(f"{self.config.path}: key 'broker.tls': cannot load the "
                               f"certificates: {exc}; ca_file, cert_file and key_file must be "
                               "PEM files, the key without a passphrase") from None
        client.tls_insecure_set(tls.insecure)
        if tls.insecure:
            log.warning("broker.tls.insecure is true: the broker's host name is not checked")

    # paho callbacks (network thread): never block --------------------------------------

    def _on_connect(self, client, _userdata, flags, reason_code, _properties) -> None:
        broker = self.config.broker
        self._connack_seen = True
        if reason_code.is_failure:
            if reason_code.value == _UNSUPPORTED_PROTOCOL and self.protocol == "5":
                log.warning("the broker at %s:%d does not speak MQTT 5; falling back to MQTT "
                            "3.1.1 (set broker.protocol: '3.1.1' to skip this attempt)",
                            broker.host, broker.port)
                self._downgrade.set()  # the worker makes a 3.1.1 client
                return
            self._connection_warning(f"the broker at {broker.host}:{broker.port} refused the "
                                     f"connection: {reason_code}; check broker.username, the "
                                     "password and the broker's ACL for broker.client_id")
            return
        session = "resumed" if flags.session_present else "new"
        log.info("connected to %s:%d (MQTT %s, %s session)", broker.host, broker.port,
                 self.protocol, session)
        if not self.stopping.is_set():
            self._subscribe(client, list(self.routes))
        # The network thread publishes no counters: the worker owns them (publish_status).
        client.publish(status_topic(self.config),
                       json.dumps(self._status("online", counters=False)), qos=1, retain=True)
        self.connected.set()
        self._acks.put(("resend", None))

    def _subscribe(self, client, topics: list[str]) -> None:
        if not topics:
            return
        filters = self._filters(topics, self.routes)
        result, mid = client.subscribe([(topic, 1) for topic in filters])
        if result == mqtt.MQTT_ERR_SUCCESS:
            self._subscriptions[mid] = filters

    def _filters(self, topics: list[str], table: dict[str, Route]) -> list[str]:
        """Subscription filters: with ``broker.shared_group``, sample topics are shared
        (``$share/<group>/<topic>``; the broker's strategy picks one agent per message, so
        it must keep a topic on one agent); operator commands reach every agent."""
        group = self.config.broker.shared_group
        if group is None:
            return list(topics)
        return [f"$share/{group}/{topic}" if table[topic].channels else topic
                for topic in topics]

    def _on_log(self, _client, _userdata, level: int, message: str) -> None:
        # paho reports an error for every loop pass between two connection attempts; the
        # connection's own warnings say what is wrong.
        if level == mqtt.MQTT_LOG_ERR and not message.startswith("Client is not connected"):
            log.error("MQTT client: %s", message)
        elif level == mqtt.MQTT_LOG_WARNING:
            log.warning("MQTT client: %s", message)
        else:
            log.debug("MQTT client: %s", message)

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _properties) -> None:
        topics = self._subscriptions.pop(mid, [])
        for topic, code in zip(topics, reason_codes):
            if code.is_failure:
                self.counters["errors.subscribe"] += 1
                log.error("the broker refused the subscription to %s: %s; no samples arrive "
                          "from it (check the broker's ACL for %s)", topic, code,
                          self.config.broker.client_id)

    def _on_unsubscribe(self, _client, _userdata, mid, _reason_codes, _properties) -> None:
        self._unsubacks.add(mid)

    def _on_connect_fail(self, client, _userdata) -> None:
        detail = describe_connect_error(getattr(client, "last_error", None), self.config)
        self._connection_warning(f"{detail}; retrying, at most every "
                                 f"{self.config.broker.reconnect_max_delay:g} s")

    def _connection_warning(self, message: str, counter: str = "connect_failures") -> None:
        """Count and log a failure on the connection: the first at once, then at most one
        per ``WARN_INTERVAL`` while it keeps failing (paho retries with backoff)."""
        self.counters[counter] += 1
        now = time.monotonic()
        if now - self._last_warning.get("connection", -1e9) >= WARN_INTERVAL:
            log.warning("%s", message)
            self._last_warning["connection"] = now

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connected.clear()
        if self.stopping.is_set() or self._downgrade.is_set():
            return
        if reason_code.value == _SESSION_TAKEN_OVER:
            log.error("another client connected with client id %s and took this agent's "
                      "session; every agent needs its own broker.client_id",
                      self.config.broker.client_id)
        else:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, _client, _userdata, message) -> None:
        try:
            self.inbox.put_nowait((message.topic, message.payload))
        except queue.Full:
            self._reject("queue_full", f"topic {message.topic}: the worker is behind; "
                         f"{self.config.queue_size} messages are waiting (inference.queue_size)")

    def _on_publish(self, _client, _userdata, mid, reason_code, _properties) -> None:
        # MQTT 5: a PUBACK may refuse the message (an ACL, a quota); it then stays pending.
        self._acks.put(("refused" if reason_code.is_failure else "ack", mid))
        if reason_code.is_failure:
            self._connection_warning(f"the broker refused a message of this agent: "
                                     f"{reason_code}; alarm events stay pending in the outbox "
                                     "(check the broker's ACL for the alarm topics)",
                                     counter="errors.publish_refused")

    # Worker loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Process messages until stop() is called; then drain, score what is left, exit."""
        next_status = time.monotonic()
        try:
            while not self.stopping.is_set():
                self._process_inbox(timeout=0.2)
                self._handle_acks()
                self._alarm_tasks()
                self._connection_tasks()
                if time.monotonic() >= next_status:
                    self.publish_status()
                    self.notifier.status(self._systemd_status())
                    next_status = time.monotonic() + self.config.status_interval
        finally:
            self._shutdown()

    def stop(self, *_args) -> None:
        """Ask the worker loop to stop (signal-safe); the drain must end by the deadline."""
        if not self.stopping.is_set():
            self._stop_deadline = time.monotonic() + self.config.stop_timeout
        self.stopping.set()

    def request_reload(self, *_args) -> None:
        """Ask the worker loop to reload the configuration (signal-safe)."""
        self.reload_requested.set()

    def _connection_tasks(self) -> None:
        """Worker-side duties of the connection: protocol fallback, reload, systemd."""
        sent = getattr(self.client, "connect_sent", None)
        if self.protocol == "5" and not self._connack_seen and sent is not None \
                and time.monotonic() - sent > CONNACK_TIMEOUT:
            broker = self.config.broker
            log.warning("the broker at %s:%d did not answer an MQTT 5 CONNECT within %g s; "
                        "falling back to MQTT 3.1.1 (set broker.protocol: '3.1.1' to skip "
                        "this attempt)", broker.host, broker.port, CONNACK_TIMEOUT)
            self._downgrade.set()
        if self._downgrade.is_set():
            self._fall_back_to_311()
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.notifier.reloading()
            self.reload()
            self.notifier.ready(self._systemd_status())
        connected = self.connected.is_set()
        if connected and not self._ready_sent:
            self._ready_sent = True
            self.notifier.ready(self._systemd_status())
        elif connected != self._was_connected and self._ready_sent:
            self.notifier.status(self._systemd_status())
        self._was_connected = connected
        # The worker loop comes here after every batch: a worker stuck in inference, in
        # SQLite or in a bug stops feeding the watchdog, and systemd restarts the agent.
        self.notifier.watchdog()

    def _systemd_status(self) -> str:
        broker = self.config.broker
        link = "connected to" if self.connected.is_set() else "reconnecting to"
        return (f"{link} {broker.host}:{broker.port}; {len(self.pipeline.assets)} asset(s); "
                f"{self.counters['messages_received']} messages, "
                f"{self.counters['alarms_raised']} alarms raised")

    def _fall_back_to_311(self) -> None:
        """The broker refused MQTT 5: replace the client by a 3.1.1 one."""
        old = self.client
        old.disconnect()
        old.loop_stop()  # after this, no callback of the old client runs any more
        self._downgrade.clear()
        self.outbox.forget_inflight()  # their outbox rows stay pending and are sent again
        self.protocol = "3.1.1"
        self._connect()

    # Reload (SIGHUP) ----------------------------------------------------------------------

    def reload(self) -> None:
        """Take a new configuration and new model bundles without dropping buffered data.

        - An asset whose settings and bundle are unchanged keeps its pipeline: buffered
          samples, partly ensembled scores and alarms in progress carry on. Changing only
          its topics keeps it too.
        - An asset whose settings or bundle changed gets a new pipeline once the new bundle
          has passed its checksum and self-test. Its old stream ends as at a long gap: the
          buffered samples are scored by the old model, every slot is released and alarms in
          progress clear; the new model scores from the next sample on.
        - A removed asset ends the same way and is unsubscribed; an added one is subscribed.
        - A bundle (or asset) that fails is refused with an error in the log, and the
          asset keeps running as before; an added asset that fails is not added.
        - ``broker``, ``database``, ``alarm_prefix`` and ``inference.queue_size`` take
          effect at the next restart only; ``inference.threads`` applies to models loaded
          from now on.
        """
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        old = self.config
        restart_only = [key for key in ("broker", "database", "alarm_prefix", "queue_size")
                        if getattr(new, key) != getattr(old, key)]
        if restart_only:
            log.warning("reload: %s changed; this takes effect at the next restart",
                        ", ".join(restart_only))
        new = dataclasses.replace(new, broker=old.broker, database=old.database,
                                  alarm_prefix=old.alarm_prefix, queue_size=old.queue_size)

        running = {asset.name: asset for asset in old.assets}
        assets, replaced, added, refused, loaded = [], {}, [], 0, {}
        for asset in new.assets:
            current = self.pipeline.assets.get(asset.name)
            try:
                if current is not None and _same_pipeline(asset, running[asset.name]) \
                        and load_bundle(asset.model).metadata == current.bundle.metadata:
                    assets.append(asset)  # unchanged: its pipeline carries on
                    continue
                pipeline = load_asset(asset, new, self.backend_kind, loaded)
            except (BundleError, BackendError, StartupError) as exc:
                refused += 1
                self._refuse(asset.name, exc)
                if current is not None:
                    assets.append(running[asset.name])
                continue
            assets.append(asset)
            if current is None:
                added.append(pipeline)
            else:
                replaced[asset.name] = pipeline

        names = {asset.name for asset in assets}
        removed = [name for name in self.pipeline.assets if name not in names]
        self._end_streams(list(replaced) + removed)
        for name in removed:
            self.pipeline.counters.update(self.pipeline.assets.pop(name).counters)
        for name, pipeline in replaced.items():
            self.pipeline.counters.update(self.pipeline.assets[name].counters)
            self.pipeline.assets[name] = pipeline
        for pipeline in added:
            self.pipeline.assets[pipeline.name] = pipeline
        self.board.classes = self._classes()  # the alarm board follows the new assets

        self.config = dataclasses.replace(new, assets=tuple(assets))
        self._states_due.update(self.pipeline.assets)
        self._update_subscriptions(routes(self.config))
        log.info("reload done: %d asset(s) with a new model or settings, %d added, %d "
                 "removed, %d refused; the others carry on", len(replaced), len(added),
                 len(removed), refused)

    def _refuse(self, name: str, exc: Exception) -> None:
        self.counters["reload_refused"] += 1
        current = self.pipeline.assets.get(name)
        keeps = (f"it keeps running with model {current.bundle.model_id}" if current
                 else "it is not added")
        log.error("RELOAD REFUSED for asset %s: %s; %s", name, exc, keeps)

    def _end_streams(self, names: list[str]) -> None:
        """End the streams of these assets as a long gap does, scoring what is buffered."""
        if not names:
            return
        for name in names:
            self.pipeline.assets[name]._stop_stream(clear_alarms=True)
            self._states_due.add(name)
        self._emit(self._step())

    def _update_subscriptions(self, table: dict[str, Route]) -> None:
        gone = self._filters([t for t in self.routes if t not in table], self.routes)
        new = [topic for topic in table if topic not in self.routes]
        self.routes = table  # on_connect subscribes whatever is here
        if not self.connected.is_set():
            return
        if gone:
            self.client.unsubscribe(gone)
        self._subscribe(self.client, new)

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
        route = self.routes.get(topic)
        if route is not None and not route.channels:
            self._command(route.asset, payload)
            return
        self.counters["messages_received"] += 1
        if route is None:
            self._reject("unknown_topic", f"topic {topic!r} is not configured")
            return
        try:
            decoded = decode_payload(payload, route, self.config.ingest, now=time.time())
        except PayloadError as exc:
            self._reject(exc.reason, f"topic {topic}: {exc.detail}")
            return
        for reason, detail in decoded.rejected:
            self._reject(reason, f"topic {topic}: a sample in a batch: {detail}")
        samples = decoded.samples
        asset = self.pipeline.assets[route.asset]
        rejected = asset.add(samples)
        self._states_fed.add(route.asset)
        if asset.window.head is not None:
            newest = asset.window.slot_time(asset.window.head)
            self._last_sample[route.asset] = max(newest, self._last_sample.get(route.asset, 0))
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

    # Alarms: outbox, operator commands, state topics -------------------------------------

    def _open_alarms(self) -> None:
        """Make the outbox and restore the board: the alarms active at the last stop are
        resumed by their trackers (same ids), and the shelves still in force apply."""
        from sqlalchemy.exc import SQLAlchemyError

        self.counters["db_errors"] += 0  # always reported, zero included
        if self.store.moved_aside is not None:
            self.counters["db_moved_aside"] += 1
        self.outbox = Outbox(self.store, self._publish_event, self.connected.is_set,
                             self.counters)
        self.board.classes = self._classes()
        try:
            alarms, shelves = self.store.active_alarms(), self.store.open_shelves()
        except SQLAlchemyError as exc:
            raise StartupError(f"database {self.config.database}: cannot read the alarms: "
                               f"{getattr(exc, 'orig', None) or exc}") from None
        self.board.restore([], shelves)
        orphans = []
        for alarm in alarms:
            tracker = self._tracker(alarm.asset, alarm.class_name)
            if tracker is None:
                orphans.append(alarm)
                continue
            tracker.resume(alarm.event)
            self.board.restore([alarm], [])
        if alarms or shelves:
            log.info("from the last run: %d active alarm(s) resumed, %d shelve(s)",
                     len(alarms) - len(orphans), len(shelves))
        for alarm in orphans:
            log.warning("alarm %s (%s/%s) was active at the last stop, but its asset or class "
                        "is no longer configured; it is cleared", alarm.alarm_id[:8],
                        alarm.asset, alarm.class_name)
            self.board.restore([alarm], [])
            self._emit([dataclasses.replace(alarm.event, state="cleared")])

    def _classes(self) -> dict[str, list[str]]:
        return {name: list(a.bundle.classes) for name, a in self.pipeline.assets.items()}

    def _tracker(self, asset: str, class_name: str):
        pipeline = self.pipeline.assets.get(asset)
        for tracker in pipeline.trackers if pipeline is not None else ():
            if tracker.class_name == class_name:
                return tracker
        return None

    def _publish_event(self, topic: str, payload: str) -> int | None:
        """Hand one outbox event to paho (QoS 1); its message id, or None if refused.
        NO_CONN: paho keeps the message and sends it at the next connection."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            return info.mid
        return None

    def _emit(self, events: list[AlarmEvent]) -> None:
        """Commit the raises and clears, then publish them (not while their class is
        shelved). The events of one step are committed in one transaction (group commit),
        then published in order; an event that follows one of the same alarm (a raise and
        its clear in one step) is classified as the board will stand after the first."""
        if not events:
            return
        now = time.time()
        if len(events) > 1:
            alarms, view = [], {}
            for event in events:
                known = view.get(event.alarm_id)
                alarm = (dataclasses.replace(known, event=event) if known is not None
                         else self.board.classify(event, now))
                view[event.alarm_id] = alarm
                alarms.append(alarm)
            entries = [self._outbox_entry(event, alarm) for event, alarm in zip(events, alarms)]
            results = self.outbox.submit_many(entries, lambda: self.store.record_many(
                [(event, entry[1], alarm.suppressed)
                 for event, alarm, entry in zip(events, alarms, entries)]))
            if results is not None:
                for event, alarm, result in zip(events, alarms, results):
                    self._emitted(event, alarm, result)
                return
        for event in events:  # one by one (also after a group refused as a whole)
            alarm = self.board.classify(event, now)  # after the previous event's apply
            write, topic, payload, publish = self._outbox_entry(event, alarm)
            self._emitted(event, alarm, self.outbox.submit(write, topic, payload, publish))

    def _outbox_entry(self, event: AlarmEvent, alarm: BoardAlarm) -> tuple:
        """``(write, topic, payload, publish)`` of one raise or clear, for the outbox."""
        topic = alarm_topic(self.config, event.asset)

        def write(published, event=event, topic=topic, suppressed=alarm.suppressed):
            return self.store.record(event, topic, suppressed, published)

        return write, topic, alarm_payload(event), not alarm.suppressed

    def _emitted(self, event: AlarmEvent, alarm: BoardAlarm, result: str) -> None:
        """An event through the outbox: on the board, counted and logged."""
        if result == "duplicate":
            self.counters["alarms_duplicate"] += 1
            return
        self.board.apply(alarm)
        self._states_due.add(event.asset)
        shelved = " (class shelved: stored, not published)" if alarm.suppressed else ""
        if event.state == "active":
            self.counters["alarms_raised"] += 1
            if alarm.suppressed:
                self.counters["alarms_shelved"] += 1
            log.info("alarm %s raised: %s/%s since %s (score %.2f)%s", event.alarm_id[:8],
                     event.asset, event.class_name, to_iso(event.start), event.peak_score,
                     shelved)
        else:
            self.counters["alarms_cleared"] += 1
            log.info("alarm %s cleared: %s/%s from %s to %s (peak %.2f)%s",
                     event.alarm_id[:8], event.asset, event.class_name,
                     to_iso(event.start), to_iso(event.end), event.peak_score, shelved)

    def _command(self, asset: str, payload: bytes) -> None:
        """An operator command on ``<prefix>/<asset>/command``: validate, apply, publish."""
        now = time.time()
        self.counters["commands_received"] += 1
        self._states_due.add(asset)
        try:
            command = parse_command(payload, now, self.config.max_shelve)
            self.board.classes = self._classes()
            effects = self.board.command(asset, command, now, self._find_alarm)
        except CommandError as exc:
            self.counters[f"commands_rejected.{exc.reason}"] += 1
            self._reject_log(f"command.{exc.reason}",
                             f"command on {command_topic(self.config, asset)}: {exc.detail}")
            return
        self.counters["commands_accepted"] += 1
        target = command.alarm_id or f"class {command.class_name}"
        log.info("command %s on %s (%s) by %s: %s", command.command, asset, target, command.by,
                 f"{len(effects)} change(s)" if effects else "nothing to change")
        self._apply_effects(effects)

    def _find_alarm(self, alarm_id: str) -> BoardAlarm | None:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return self.store.find_alarm(alarm_id)
        except SQLAlchemyError:
            self.counters["db_errors"] += 1
            raise CommandError("db_error", "the database cannot be read now; send the "
                               "command again later") from None

    def _apply_effects(self, effects: list) -> None:
        """Commit and publish acks and shelve changes; an ended shelve first announces the
        alarms of its class that were raised while it was in force and are still active."""
        for effect in effects:
            self._states_due.add(effect.alarm.asset if isinstance(effect, Ack)
                                 else effect.shelve.asset)
            if isinstance(effect, Ack):
                topic, record = ack_topic(self.config, effect.alarm.asset), self.store.record_ack
            else:
                for alarm in effect.released:
                    self._announce(alarm)
                topic, record = shelve_topic(self.config, effect.shelve.asset), \
                    self.store.record_shelve
                self._log_shelve(effect)
            payload = json.dumps(effect.to_message(), separators=(",", ":"))

            def write(published, effect=effect, topic=topic, payload=payload, record=record):
                return record(effect, topic, payload, published)

            self.outbox.submit(write, topic, payload)

    def _announce(self, alarm: BoardAlarm) -> None:
        topic = alarm_topic(self.config, alarm.asset)
        self._states_due.add(alarm.asset)

        def write(published, event=alarm.event, topic=topic):
            return self.store.record(event, topic, False, published)

        self.outbox.submit(write, topic, alarm_payload(alarm.event))
        log.info("alarm %s (%s/%s) announced: its shelve ended while it is active",
                 alarm.alarm_id[:8], alarm.asset, alarm.class_name)

    @staticmethod
    def _log_shelve(change: ShelveChange) -> None:
        shelve = change.shelve
        if change.shelved:
            log.info("class %s/%s shelved by %s until %s", shelve.asset, shelve.class_name,
                     shelve.by, to_iso(shelve.until))
        else:
            log.info("class %s/%s unshelved (%s%s)", shelve.asset, shelve.class_name,
                     change.reason, f" by {change.by}" if change.by else "")

    def _alarm_tasks(self) -> None:
        """Worker-side duties of the alarms: shelves that expire, state topics, upkeep."""
        effects = self.board.expire(time.time())
        if effects:
            self._apply_effects(effects)
        self._publish_states()
        if time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + self.config.status_interval
            self._save_progress()
        if time.monotonic() >= self._next_maintenance:
            self._maintain()

    def _save_progress(self) -> None:
        """Store how far the active alarms have got, for a resume after a restart."""
        from sqlalchemy.exc import SQLAlchemyError

        progress = [tracker.current() for asset in self.pipeline.assets.values()
                    for tracker in asset.trackers if tracker.active is not None]
        if not progress:
            return
        try:
            self.store.save_progress(progress)
        except SQLAlchemyError:
            self.counters["db_errors"] += 1

    def _publish_states(self, force: bool = False) -> None:
        """Publish each asset's retained state when it changed; the last sample time alone
        refreshes it at most every ``status_interval``.

        Only the assets that may have changed are looked at: those with an alarm event, a
        command or a shelve change as soon as no message waits in the inbox (the alarms
        themselves are out already; samples come first); those that got samples (their
        sensor status, their last sample) at most every ``STATE_INTERVAL`` (or
        ``status_interval`` if shorter); every asset at a (re)connection and every
        ``SWEEP_INTERVAL``."""
        if not self.connected.is_set():
            return
        now = time.time()
        mono = time.monotonic()
        refresh = force or mono >= self._next_state_refresh
        fed = refresh or mono >= self._next_fed_check
        if force or mono >= self._next_sweep:
            names = set(self.pipeline.assets)
            self._next_sweep = mono + SWEEP_INTERVAL
        elif fed:
            names = self._states_due | self._states_fed
        elif self.inbox.empty():
            names = self._states_due
        else:
            return
        self._states_due = set()
        if fed:
            self._states_fed = set()
            self._next_fed_check = mono + min(STATE_INTERVAL, self.config.status_interval)
        for name in names:
            asset = self.pipeline.assets.get(name)
            if asset is None:
                continue  # removed by a reload
            picture = self.board.picture(name, now)
            picture["model_id"] = asset.bundle.model_id
            picture["sensors"] = asset.sensor_status()
            last = self._last_sample.get(name)
            shown = json.dumps(picture, sort_keys=True)
            sent = self._states_sent.get(name)
            changed = sent is None or sent[0] != shown
            moved = sent is None or sent[1] != last
            if not (force or changed or (refresh and moved)):
                continue
            doc = {"asset": name, "agent": self.config.broker.client_id, "time": to_iso(now),
                   "last_sample": to_iso(last) if last is not None else None, **picture}
            info = self.client.publish(state_topic(self.config, name), json.dumps(doc), qos=1,
                                       retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self._states_sent[name] = (shown, last)
            else:
                self._states_fed.add(name)  # tried again at the next look
        if refresh:
            self._next_state_refresh = time.monotonic() + self.config.status_interval

    def _maintain(self) -> None:
        """Retention and WAL truncation, every MAINTENANCE_INTERVAL."""
        from sqlalchemy.exc import SQLAlchemyError

        self._next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
        try:
            deleted = self.store.maintain(self.config.database_retention)
        except SQLAlchemyError as exc:
            self.counters["db_errors"] += 1
            log.error("database upkeep (retention, WAL checkpoint) failed: %s; retrying in "
                      "%g s", getattr(exc, "orig", None) or exc, MAINTENANCE_INTERVAL)
            return
        if any(deleted.values()):
            log.info("database upkeep: deleted %d event(s), %d alarm(s) and %d shelve(s) "
                     "older than database_retention", deleted["events"], deleted["alarms"],
                     deleted["shelves"])

    def _handle_acks(self, resend: bool = True) -> None:
        """PUBACKs from paho's thread; at a new connection, the backlog in commit order."""
        wants_resend = False
        while True:
            try:
                kind, mid = self._acks.get_nowait()
            except queue.Empty:
                break
            if kind == "resend":
                wants_resend = True
            elif kind == "ack":
                self.outbox.on_puback(mid)
            else:
                self.outbox.on_refused(mid)
        self.outbox.tick()
        if wants_resend and resend:
            self.outbox.on_connected()
            self._publish_states(force=True)

    # Status and shutdown ------------------------------------------------------------------

    def _status(self, state: str, counters: bool = True) -> dict:
        status = {
            "state": state,
            "client_id": self.config.broker.client_id,
            "version": __version__,
            "pid": os.getpid(),
            "started": to_iso(self.started),
            "time": to_iso(time.time()),
            "uptime_s": round(time.time() - self.started),
        }
        if counters and self.pipeline is not None and self.outbox is not None:
            counters = dict(self.counters)
            counters.update(self.pipeline.counter_totals())
            status["connected"] = self.connected.is_set()
            status["status_interval"] = self.config.status_interval
            status["counters"] = dict(sorted(counters.items()))
            status["inference_seconds"] = round(self.pipeline.inference_seconds, 3)
            status["models"] = {name: a.bundle.model_id
                                for name, a in self.pipeline.assets.items()}
            # Per model (assets that share a bundle share its backend): name and fallback.
            status["backends"] = {
                a.bundle.model_id: {
                    "backend": getattr(a.backend, "name", type(a.backend).__name__),
                    "fallback_reason": getattr(a.backend, "fallback_reason", None)}
                for a in self.pipeline.assets.values()}
            status["queue_depth"] = self.inbox.qsize()
            status["outbox_pending"] = self.outbox.pending_count()
            status["alarms_active"] = len(self.board.active)
            status["shelved_classes"] = len(self.board.shelves)
            moved = self.store.moved_aside
            status["database"] = {"path": str(self.config.database),
                                  "wal_bytes": self.store.wal_bytes(),
                                  "moved_aside": str(moved) if moved else None}
        return status

    def publish_status(self, state: str = "online") -> None:
        """The retained status topic and the status file, with every counter."""
        status = self._status(state)
        self._write_status_file(status)
        if self.connected.is_set():
            self.client.publish(status_topic(self.config), json.dumps(status), qos=1,
                                retain=True)

    def _write_status_file(self, status: dict) -> None:
        try:
            write_status_file(self.status_path, status)
        except OSError as exc:
            self.counters["errors.status_file"] += 1
            now = time.monotonic()
            if now - self._last_warning.get("status_file", -1e9) >= WARN_INTERVAL:
                self._last_warning["status_file"] = now
                log.warning("cannot write the status file %s: %s; `segwatch-agent status` "
                            "will report the agent as not running", self.status_path,
                            exc.strerror)

    def _shutdown(self) -> None:
        deadline = min(self._stop_deadline, time.monotonic() + self.config.stop_timeout)
        self.notifier.stopping("stopping: scoring buffered samples, flushing the outbox")
        log.info("stopping: no new samples; scoring what is buffered")
        self._stop_intake(deadline)
        while not self.inbox.empty():
            self._process_inbox(timeout=0.0)
            self.notifier.watchdog()
        try:
            self._emit(self.pipeline.stop())
        except Exception:
            log.exception("error while scoring the buffered samples at shutdown")
        self._save_progress()  # alarms still active are resumed at the next start
        if self.connected.is_set():
            # Keep a second for the offline status and the disconnect.
            self._wait_for_acks(deadline - 1.0)
            self.publish_status()
            info = self.client.publish(status_topic(self.config),
                                       json.dumps(self._status("offline")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - 0.2 - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # the connection dropped: the broker publishes the will instead
        self.client.disconnect()
        self.client.loop_stop()
        self._handle_acks(resend=False)
        self.outbox.retry_writes()
        pending = self.outbox.pending_count()
        if pending:
            log.warning("%d alarm events not acknowledged by the broker; they are kept in %s "
                        "and published at the next start", pending, self.config.database)
        if self.outbox.unstored:
            log.error("%d event(s) could not be written to the database and are lost with "
                      "this stop", len(self.outbox.unstored))
        self._write_status_file(self._status("offline"))
        self.store.close()
        log.info("stopped")

    def _stop_intake(self, deadline: float) -> None:
        """Unsubscribe and wait for the broker's confirmation: every sample it sent before
        is then in the inbox, and no more come. Unconnected, paho delivers nothing anyway."""
        if not self.connected.is_set() or not self.routes:
            return
        try:
            result, mid = self.client.unsubscribe(self._filters(list(self.routes),
                                                                self.routes))
        except (ValueError, OSError):
            return
        if result != mqtt.MQTT_ERR_SUCCESS:
            return
        until = min(deadline, time.monotonic() + UNSUBACK_TIMEOUT)
        while mid not in self._unsubacks and time.monotonic() < until \
                and self.connected.is_set():
            time.sleep(0.02)

    def _wait_for_acks(self, deadline: float) -> None:
        """Wait until the broker has acknowledged every alarm event sent, or ``deadline``."""
        while time.monotonic() < deadline:
            self._handle_acks()
            self.notifier.watchdog()
            if not self.outbox.inflight:
                return
            time.sleep(0.05)


def run_agent(config: AgentConfig, backend: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; exit status 0 after a clean drain. SIGHUP reloads."""
    service = AgentService(config, backend)

    def stop(_signum, _frame):
        # A second signal during the drain is ignored: the drain finishes and exits 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        service.stop()

    # Installed before the models load, so that a stop during start-up still drains.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, service.request_reload)
    service.start()
    service.run()
    return 0
