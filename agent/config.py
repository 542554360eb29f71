"""The agent's YAML configuration: loaded once at start and validated key by key.

Every error names the file, the key (as a dotted path) and what is allowed. The reference
for every key is ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from agent.ingest import IngestLimits
from agent.timeutil import TimestampError, parse_duration, parse_timestamp

_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENSEMBLES = ("mean", "median", "max")
_NORMALIZATIONS = ("bundle", "snapshot")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what to fix."""


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "segwatch-agent"
    keepalive: int = 30
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: TlsConfig | None = None
    protocol: str = "5"  # "5" (falls back to 3.1.1 when the broker refuses it) or "3.1.1"
    session_expiry: float = 3600.0  # seconds the broker keeps the session; 0: clean session
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 60.0
    shared_group: str | None = None  # subscribe to samples as $share/<group>/<topic>


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
    name: str
    topic: str | None
    min: float | None = None  # physical range; samples outside are rejected (out_of_range)
    max: float | None = None


@dataclasses.dataclass(frozen=True)
class AlarmConfig:
    threshold: float | None  # None: the bundle's suggested threshold
    hysteresis: float | None  # None: the bundle's
    min_duration: float | None  # seconds of sample time; None: the bundle's
    off_delay: float | None = None  # seconds below the clear level before a clear; None: 0


@dataclasses.dataclass(frozen=True)
class AssetConfig:
    name: str
    channels: tuple[ChannelConfig, ...]
    topic: str | None
    sample_period: float
    model: Path
    snapshot_length: int | None  # None: the bundle's
    hop: int | None  # None: the bundle's
    normalization: str
    ensemble: str
    max_missing: float
    max_lateness: float  # seconds of sample time
    alarm: AlarmConfig
    max_fill: int = 3  # samples: shorter gaps are interpolated and scored
    long_gap: int | None = None  # samples: gaps this long are guarded; None: the pipeline's
    gap_guard: int | None = None  # samples masked after a long gap; None: the pipeline's
    stuck_run: int = 10  # samples in a row at min or max: stuck at a rail; 0: off


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    path: Path
    broker: BrokerConfig
    assets: tuple[AssetConfig, ...]
    alarm_prefix: str
    database: Path
    status_interval: float
    inference_threads: int
    queue_size: int
    stop_timeout: float  # seconds from SIGTERM to exit, drain included
    ingest: IngestLimits = IngestLimits()  # what a payload may hold (the ``ingest`` key)
    inference_backend: str = "auto"  # auto, onnxruntime, litert, tensorrt
    inference_precision: str = "fp16"  # TensorRT's: fp16 or fp32
    engine_dir: Path | None = None  # TensorRT engine cache; None: <bundle>/engines
    database_retention: float = 90 * 86400.0  # seconds; 0 keeps every row
    database_check: str = "quick"  # integrity check at start: quick or full
    max_shelve: float = 12 * 3600.0  # the longest shelve a command may ask for, seconds


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read and validate a configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, path)


def parse_config(raw: Any, path: Path) -> AgentConfig:
    """Validate an already-parsed YAML document; relative paths are relative to ``path``."""
    v = _Validator(path)
    top = v.mapping(raw, "", required=True)
    v.no_unknown(
        top,
        "",
        {"broker", "assets", "alarm_prefix", "database", "status_interval", "inference",
         "stop_timeout", "database_retention", "database_check", "max_shelve", "ingest"},
    )
    broker = _broker(v, v.mapping(top.get("broker"), "broker", required=True))

    assets_raw = top.get("assets")
    if not isinstance(assets_raw, list) or not assets_raw:
        v.fail("assets", "must be a non-empty list of assets")
    assets = tuple(_asset(v, item, f"assets[{i}]") for i, item in enumerate(assets_raw))
    names = [a.name for a in assets]
    for name in names:
        if names.count(name) > 1:
            v.fail("assets", f"asset name {name!r} is used twice; names must be unique")
    _check_topics_unique(v, assets)
    if broker.shared_group is not None:
        for i, asset in enumerate(assets):
            if asset.topic is None or any(c.topic for c in asset.channels):
                v.fail(f"assets[{i}].topic", "with broker.shared_group an asset sends every "
                       "channel on its asset topic and no channel topics: the broker keeps "
                       "a topic, not an asset, on one agent of the group")

    prefix = v.string(top.get("alarm_prefix", "segwatch"), "alarm_prefix")
    if any(ch in prefix for ch in "+#\0") or prefix.startswith(("/", "$")) \
            or "" in prefix.rstrip("/").split("/"):
        v.fail("alarm_prefix", f"{prefix!r} must be a topic prefix without '+', '#', NUL, "
               "empty levels ('//') or a leading '/' or '$'")
    inference = v.mapping(top.get("inference", {}), "inference")
    v.no_unknown(inference, "inference",
                 {"threads", "queue_size", "backend", "precision", "engine_dir"})
    return AgentConfig(
        path=path,
        broker=broker,
        assets=assets,
        alarm_prefix=prefix.rstrip("/"),
        database=v.path(top.get("database"), "database", required=True),
        status_interval=v.duration(top.get("status_interval", 10), "status_interval", 0.1),
        inference_threads=v.integer(inference.get("threads", 0), "inference.threads", 0, 256),
        queue_size=v.integer(inference.get("queue_size", 10000), "inference.queue_size", 1),
        stop_timeout=v.duration(top.get("stop_timeout", 30), "stop_timeout", 1.0),
        ingest=_ingest(v, v.mapping(top.get("ingest", {}), "ingest")),
        inference_backend=v.choice(inference.get("backend", "auto"), "inference.backend",
                                   ("auto", "onnxruntime", "litert", "tensorrt")),
        inference_precision=v.choice(inference.get("precision", "fp16"),
                                     "inference.precision", ("fp16", "fp32")),
        engine_dir=v.path(inference.get("engine_dir"), "inference.engine_dir"),
        database_retention=v.duration(top.get("database_retention", "90d"),
                                      "database_retention"),
        database_check=v.choice(top.get("database_check", "quick"), "database_check",
                                ("quick", "full")),
        max_shelve=v.duration(top.get("max_shelve", "12h"), "max_shelve", 1.0),
    )


def _broker(v: _Validator, raw: dict) -> BrokerConfig:
    v.no_unknown(
        raw,
        "broker",
        {"host", "port", "client_id", "keepalive", "username", "password_file",
         "password_env", "tls", "protocol", "session_expiry", "reconnect_min_delay",
         "reconnect_max_delay", "shared_group"},
    )
    if "password" in raw:
        v.fail("broker.password", "passwords are never read from the YAML itself; use "
               "broker.password_file or broker.password_env")
    if raw.get("password_file") is not None and raw.get("password_env") is not None:
        v.fail("broker.password_file", "give broker.password_file or broker.password_env, "
               "not both")
    password = None
    if raw.get("password_file") is not None:
        pw_path = v.path(raw["password_file"], "broker.password_file")
        try:
            lines = pw_path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            v.fail("broker.password_file", f"cannot read {pw_path}: {exc.strerror}")
        if not lines or not lines[0]:
            v.fail("broker.password_file", f"{pw_path}: the first line (the password) is empty")
        password = lines[0]
    elif raw.get("password_env") is not None:
        env = v.string(raw["password_env"], "broker.password_env")
        if env not in os.environ:
            v.fail("broker.password_env", f"environment variable {env} is not set")
        password = os.environ[env]
    tls = None
    if raw.get("tls") is not None:
        tls_raw = v.mapping(raw["tls"], "broker.tls")
        v.no_unknown(tls_raw, "broker.tls", {"ca_file", "cert_file", "key_file", "insecure"})
        tls = TlsConfig(
            ca_file=v.path(tls_raw.get("ca_file"), "broker.tls.ca_file"),
            cert_file=v.path(tls_raw.get("cert_file"), "broker.tls.cert_file"),
            key_file=v.path(tls_raw.get("key_file"), "broker.tls.key_file"),
            insecure=v.boolean(tls_raw.get("insecure", False), "broker.tls.insecure"),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            v.fail("broker.tls", "cert_file and key_file go together: give both or neither")
    protocol = str(raw.get("protocol", "5"))
    if protocol not in ("5", "3.1.1"):
        v.fail("broker.protocol", f"{raw.get('protocol')!r} is not allowed; use 5 (MQTT 5, "
               "falls back to 3.1.1 when the broker refuses it) or '3.1.1'")
    reconnect_min = v.duration(raw.get("reconnect_min_delay", 1), "broker.reconnect_min_delay",
                               0.1)
    reconnect_max = v.duration(raw.get("reconnect_max_delay", 60), "broker.reconnect_max_delay",
                               reconnect_min)
    return BrokerConfig(
        host=v.string(raw.get("host", "127.0.0.1"), "broker.host"),
        port=v.integer(raw.get("port", 1883), "broker.port", 1, 65535),
        client_id=v.segment(raw.get("client_id", "segwatch-agent"), "broker.client_id"),
        keepalive=v.integer(raw.get("keepalive", 30), "broker.keepalive", 5, 3600),
        username=(v.string(raw["username"], "broker.username")
                  if raw.get("username") is not None else None),
        password=password,
        tls=tls,
        protocol=protocol,
        session_expiry=v.duration(raw.get("session_expiry", 3600), "broker.session_expiry"),
        reconnect_min_delay=reconnect_min,
        reconnect_max_delay=reconnect_max,
        shared_group=(v.segment(raw["shared_group"], "broker.shared_group")
                      if raw.get("shared_group") is not None else None),
    )


def _ingest(v: _Validator, raw: dict) -> IngestLimits:
    v.no_unknown(raw, "ingest", {"max_payload_bytes", "max_samples", "min_timestamp",
                                 "max_future"})
    epoch = raw.get("min_timestamp", "2000-01-01T00:00:00Z")
    try:
        min_timestamp = parse_timestamp(epoch)
    except TimestampError as exc:
        v.fail("ingest.min_timestamp", f"{exc}; give ISO 8601 with an offset or epoch seconds")
    return IngestLimits(
        max_payload_bytes=v.integer(raw.get("max_payload_bytes", 1_000_000),
                                    "ingest.max_payload_bytes", 64, 256_000_000),
        max_samples=v.integer(raw.get("max_samples", 10_000), "ingest.max_samples", 1),
        min_timestamp=min_timestamp,
        max_future=v.duration(raw.get("max_future", "1d"), "ingest.max_future", 1.0),
    )


def _asset(v: _Validator, raw: Any, key: str) -> AssetConfig:
    raw = v.mapping(raw, key, required=True)
    v.no_unknown(
        raw,
        key,
        {"name", "channels", "topic", "sample_period", "model", "snapshot_length", "hop",
         "normalization", "ensemble", "max_missing", "max_lateness", "alarm", "max_fill",
         "long_gap", "gap_guard", "stuck_run"},
    )
    name = v.segment(raw.get("name"), f"{key}.name")
    if name == "agents":
        v.fail(f"{key}.name", "'agents' is reserved for the agents' status topics")
    channels_raw = raw.get("channels")
    if not isinstance(channels_raw, list) or not channels_raw:
        v.fail(f"{key}.channels", "must be a non-empty list of {name, topic}")
    channels = []
    for i, ch in enumerate(channels_raw):
        ck = f"{key}.channels[{i}]"
        ch = v.mapping(ch, ck, required=True)
        v.no_unknown(ch, ck, {"name", "topic", "min", "max"})
        topic = ch.get("topic")
        low = v.number(ch["min"], f"{ck}.min") if ch.get("min") is not None else None
        high = v.number(ch["max"], f"{ck}.max") if ch.get("max") is not None else None
        if low is not None and high is not None and not low < high:
            v.fail(f"{ck}.max", f"must be above {ck}.min ({low:g})")
        channels.append(ChannelConfig(
            name=v.string(ch.get("name"), f"{ck}.name"),
            topic=v.topic(topic, f"{ck}.topic") if topic is not None else None,
            min=low,
            max=high,
        ))
    channel_names = [c.name for c in channels]
    if len(set(channel_names)) != len(channel_names):
        v.fail(f"{key}.channels", "channel names must be unique within an asset")
    topic = raw.get("topic")
    topic = v.topic(topic, f"{key}.topic") if topic is not None else None
    if topic is None and any(c.topic is None for c in channels):
        v.fail(f"{key}.topic", "give the asset a topic, or every channel its own topic")

    snapshot_length = raw.get("snapshot_length")
    hop = raw.get("hop")
    snapshot_length = (v.integer(snapshot_length, f"{key}.snapshot_length", 16, 1_000_000)
                       if snapshot_length is not None else None)
    hop = v.integer(hop, f"{key}.hop", 1, 1_000_000) if hop is not None else None
    if snapshot_length and hop and hop > snapshot_length:
        v.fail(f"{key}.hop", f"must not exceed snapshot_length ({snapshot_length})")

    alarm_raw = v.mapping(raw.get("alarm", {}), f"{key}.alarm")
    v.no_unknown(alarm_raw, f"{key}.alarm",
                 {"threshold", "hysteresis", "min_duration", "off_delay"})
    threshold = alarm_raw.get("threshold")
    alarm = AlarmConfig(
        threshold=(v.number(threshold, f"{key}.alarm.threshold", 0.0, 1.0)
                   if threshold is not None else None),
        hysteresis=(v.number(alarm_raw["hysteresis"], f"{key}.alarm.hysteresis", 0.0, 1.0)
                    if alarm_raw.get("hysteresis") is not None else None),
        min_duration=(v.duration(alarm_raw["min_duration"], f"{key}.alarm.min_duration")
                      if alarm_raw.get("min_duration") is not None else None),
        off_delay=(v.duration(alarm_raw["off_delay"], f"{key}.alarm.off_delay")
                   if alarm_raw.get("off_delay") is not None else None),
    )
    period = v.duration(raw.get("sample_period"), f"{key}.sample_period", 1e-3, required=True)
    return AssetConfig(
        name=name,
        channels=tuple(channels),
        topic=topic,
        sample_period=period,
        model=v.path(raw.get("model"), f"{key}.model", required=True),
        snapshot_length=snapshot_length,
        hop=hop,
        normalization=v.choice(raw.get("normalization", "bundle"), f"{key}.normalization",
                               _NORMALIZATIONS),
        ensemble=v.choice(raw.get("ensemble", "mean"), f"{key}.ensemble", _ENSEMBLES),
        max_missing=v.number(raw.get("max_missing", 0.5), f"{key}.max_missing", 0.0, 1.0),
        max_lateness=v.duration(raw.get("max_lateness", 2 * period), f"{key}.max_lateness"),
        alarm=alarm,
        max_fill=v.integer(raw.get("max_fill", 3), f"{key}.max_fill", 0),
        long_gap=(v.integer(raw["long_gap"], f"{key}.long_gap", 1)
                  if raw.get("long_gap") is not None else None),
        gap_guard=(v.integer(raw["gap_guard"], f"{key}.gap_guard", 0)
                   if raw.get("gap_guard") is not None else None),
        stuck_run=v.integer(raw.get("stuck_run", 10), f"{key}.stuck_run", 0),
    )


def _check_topics_unique(v: _Validator, assets: tuple[AssetConfig, ...]) -> None:
    seen: dict[str, str] = {}
    for asset in assets:
        topics = [(asset.topic, f"{asset.name} (asset topic)")]
        topics += [(c.topic, f"{asset.name}/{c.name}") for c in asset.channels]
        for topic, owner in topics:
            if topic is None:
                continue
            if topic in seen:
                v.fail("assets", f"topic {topic!r} is used by {seen[topic]} and {owner}; "
                       "every topic belongs to one asset topic or one channel")
            seen[topic] = owner


class _Validator:
    """Typed getters that raise ConfigError naming the file and the dotted key."""

    def __init__(self, path: Path):
        self.file = path

    def fail(self, key: str, message: str):
        where = f"key '{key}'" if key else "top level"
        raise ConfigError(f"{self.file}: {where}: {message}")

    def mapping(self, value: Any, key: str, required: bool = False) -> dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(key, "must be a mapping of keys to values")
        return value

    def no_unknown(self, raw: dict, key: str, allowed: set[str]) -> None:
        unknown = sorted(set(map(str, raw)) - allowed)
        if unknown:
            prefix = f"{key}." if key else ""
            self.fail(f"{prefix}{unknown[0]}",
                      f"unknown key; allowed here: {', '.join(sorted(allowed))}")

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, "must be a non-empty string")
        return value

    def segment(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if not _SEGMENT.match(value):
            self.fail(key, f"{value!r} may use only letters, digits, '_', '-' and '.' "
                      "(it becomes an MQTT topic segment)")
        return value

    def topic(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if any(ch in value for ch in "+#\0") or value.startswith("$"):
            self.fail(key, f"{value!r} must be a plain topic: no wildcards '+' or '#', "
                      "no leading '$'")
        return value

    def integer(self, value: Any, key: str, lo: int | None = None, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, not {value!r}")
        self._range(value, key, lo, hi)
        return value

    def number(self, value: Any, key: str, lo: float | None = None,
               hi: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            self.fail(key, f"must be a finite number, not {value!r}")
        self._range(value, key, lo, hi)
        return float(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        return value

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            self.fail(key, f"{value!r} is not allowed; use one of: {', '.join(allowed)}")
        return value

    def duration(self, value: Any, key: str, lo: float = 0.0, required: bool = False) -> float:
        if value is None:
            if required:
                self.fail(key, "is required (seconds, or a string like '5min')")
            return 0.0
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
        self._range(seconds, key, lo, None)
        return seconds

    def path(self, value: Any, key: str, required: bool = False) -> Path | None:
        if value is None:
            if required:
                self.fail(key, "is required (a file path, relative to the configuration file)")
            return None
        path = Path(os.path.expanduser(self.string(value, key)))
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def _range(self, value: float, key: str, lo: float | None, hi: float | None) -> None:
        if lo is not None and value < lo:
            self.fail(key, f"{value!r} is below the minimum {lo}")
        if hi is not None and value > hi:
            self.fail(key, f"{value!r} is above the maximum {hi}")
