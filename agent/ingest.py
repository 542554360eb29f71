"""Ingest: MQTT payloads to samples.

Accepted payloads (UTF-8 JSON):

- on a channel topic: ``{"ts": ..., "value": x}``
- on an asset topic: ``{"ts": ..., "values": {"channel": x, ...}}``
- a JSON list of either, for batched samples.

``ts`` is epoch seconds, epoch milliseconds, or ISO 8601 with an offset. A payload that
cannot be read is rejected whole with a reason; inside a good payload, a bad sample is
rejected alone and the rest are kept. On an asset topic, a value for a channel the asset
does not have is rejected alone (``unknown_channel``) and the sample's other values are
kept.

Reasons, whole payload: ``oversized``, ``not_utf8``, ``malformed_json`` (also nesting too
deep and numbers too long to read), ``non_finite`` (bare ``NaN``, ``Infinity`` or
``-Infinity``, which Python's ``json`` accepts and JSON does not), ``too_many_samples``
(more values in one payload than ``IngestLimits.max_samples``). Per sample (the whole payload
when it holds a single sample): ``malformed_sample``, ``bad_timestamp``, ``before_epoch``
(before ``IngestLimits.min_timestamp``: a sensor that booted without a clock sends its
uptime), ``future_timestamp`` (more than ``IngestLimits.max_future`` ahead of ``now``),
``not_a_number`` (strings, booleans, lists, objects, null), ``non_finite`` (numbers too
large for a double), ``unknown_channel``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import reprlib

from agent.timeutil import TimestampError, parse_timestamp, to_iso

MAX_PAYLOAD_BYTES = 1_000_000
MAX_SAMPLES = 10_000
# Integers with more digits than this are read as floats: a huge integer cannot overflow,
# and Python's limit on integer string conversion (4,300 digits) is never reached.
_MAX_INT_DIGITS = 18

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 2, 60, 60
_repr.maxlist = _repr.maxdict = 4


class PayloadError(ValueError):
    """A payload rejected whole; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class IngestLimits:
    """What a payload may hold. These defaults are permissive on time (any timestamp
    from 1970 on, no future check); the configuration's ``ingest`` defaults are stricter."""

    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_samples: int = MAX_SAMPLES  # values in one payload, over all its samples
    min_timestamp: float = 0.0  # epoch seconds; earlier samples are ``before_epoch``
    max_future: float | None = None  # seconds ahead of ``now``; None: no check


DEFAULT_LIMITS = IngestLimits()


@dataclasses.dataclass(frozen=True)
class Route:
    """Where a topic's samples go: an asset, and a channel for channel topics."""

    asset: str
    channel: str | None
    channels: frozenset[str]


@dataclasses.dataclass
class Decoded:
    """Samples from one payload, and the reasons of the samples rejected inside it."""

    samples: list[tuple[str, float, float]]  # (channel, ts, value)
    rejected: list[tuple[str, str]]  # (reason, detail)


def _reject_constant(token: str):
    raise PayloadError("non_finite", f"bare {token} is not JSON")


def _parse_int(text: str) -> int | float:
    return int(text) if len(text) <= _MAX_INT_DIGITS else float(text)


def decode_payload(payload: bytes, route: Route, limits: IngestLimits = DEFAULT_LIMITS,
                   now: float | None = None) -> Decoded:
    """Decode one MQTT payload for ``route`` into samples.

    ``now`` (epoch seconds, the agent's clock) enables the ``future_timestamp`` check.
    Raises ``PayloadError`` for a payload rejected whole; never anything else for any bytes.
    """
    if len(payload) > limits.max_payload_bytes:
        raise PayloadError("oversized", f"{len(payload)} bytes > {limits.max_payload_bytes} "
                           "(ingest.max_payload_bytes)")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", str(exc)) from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except PayloadError:
        raise
    except RecursionError:
        raise PayloadError("malformed_json", "nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and numbers Python refuses to convert
        raise PayloadError("malformed_json", str(exc)[:200]) from None

    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise PayloadError("malformed_sample", "empty list")
    if len(items) > limits.max_samples:
        raise PayloadError("too_many_samples", f"{len(items)} samples in one payload > "
                           f"{limits.max_samples} (ingest.max_samples)")
    decoded = Decoded([], [])
    horizon = now + limits.max_future if now is not None and limits.max_future is not None \
        else math.inf
    for item in items:
        try:
            _decode_item(item, route, limits, horizon, decoded)
        except PayloadError as exc:
            if not isinstance(doc, list):
                raise
            decoded.rejected.append((exc.reason, exc.detail))
        if len(decoded.samples) + len(decoded.rejected) > limits.max_samples:
            raise PayloadError("too_many_samples", f"more than {limits.max_samples} values "
                               "in one payload (ingest.max_samples)")
    return decoded


def _decode_item(item: object, route: Route, limits: IngestLimits, horizon: float,
                 out: Decoded) -> None:
    if not isinstance(item, dict):
        raise PayloadError("malformed_sample", "a sample must be a JSON object")
    if "ts" not in item:
        raise PayloadError("malformed_sample", "missing 'ts'")
    try:
        ts = parse_timestamp(item["ts"])
    except (TimestampError, ValueError, OverflowError) as exc:
        raise PayloadError("bad_timestamp", _short_text(str(exc))) from None
    if ts < limits.min_timestamp:
        raise PayloadError("before_epoch", f"timestamp {to_iso(ts)} is before "
                           f"{to_iso(limits.min_timestamp)} (ingest.min_timestamp); a sensor "
                           "without a set clock sends its uptime")
    if ts > horizon:
        raise PayloadError("future_timestamp", f"timestamp {to_iso(ts)} is more than "
                           f"{limits.max_future:g} s ahead of this machine's clock "
                           "(ingest.max_future)")

    if route.channel is not None:
        if "value" not in item:
            raise PayloadError("malformed_sample", "a channel topic needs 'value'")
        out.samples.append((route.channel, ts, _number(item["value"])))
        return

    values = item.get("values")
    if not isinstance(values, dict) or not values:
        raise PayloadError("malformed_sample", "an asset topic needs 'values': {channel: x}")
    if len(values) > limits.max_samples:
        raise PayloadError("too_many_samples", f"{len(values)} values in one sample > "
                           f"{limits.max_samples} (ingest.max_samples)")
    known = {name: value for name, value in values.items() if name in route.channels}
    unknown = [name for name in values if name not in route.channels]
    if not known:
        raise PayloadError("unknown_channel", f"{_short(unknown[0])} is not a channel of "
                           f"{route.asset!r}")
    numbers = [(name, ts, _number(value)) for name, value in known.items()]
    out.samples.extend(numbers)
    for name in unknown:
        out.rejected.append(("unknown_channel", f"{_short(name)} is not a channel of "
                             f"{route.asset!r}"))


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError("not_a_number", f"value {_short(value)} is not a number")
    try:
        value = float(value)
    except OverflowError:
        raise PayloadError("non_finite", "value is too large for a double") from None
    if not math.isfinite(value):
        raise PayloadError("non_finite", "value is not finite")
    return value


def _short(value: object) -> str:
    """A bounded repr for log lines, whatever the value's size or depth."""
    return _repr.repr(value)


def _short_text(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
