"""Ingest: MQTT payloads to samples.

Accepted payloads (UTF-8 JSON):

- on a channel topic: ``{"ts": ..., "value": x}``
- on an asset topic: ``{"ts": ..., "values": {"channel": x, ...}}``
- a JSON list of either, for batched samples.

``ts`` is epoch seconds, epoch milliseconds, or ISO 8601 with an offset. A payload that
cannot be read is rejected whole with a reason; inside a good payload, a bad sample is
rejected alone and the rest are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math

from agent.timeutil import TimestampError, parse_timestamp

MAX_PAYLOAD_BYTES = 1_000_000


class PayloadError(ValueError):
    """A payload rejected whole; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def decode_payload(payload: bytes, route: Route) -> Decoded:
    """Decode one MQTT payload for ``route`` into samples."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", str(exc)) from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PayloadError("malformed_json", str(exc)) from None
    except RecursionError:
        raise PayloadError("malformed_json", "nested too deeply") from None

    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise PayloadError("malformed_sample", "empty list")
    decoded = Decoded([], [])
    for item in items:
        try:
            _decode_item(item, route, decoded.samples)
        except PayloadError as exc:
            if not isinstance(doc, list):
                raise
            decoded.rejected.append((exc.reason, exc.detail))
    return decoded


def _decode_item(item: object, route: Route, out: list) -> None:
    if not isinstance(item, dict):
        raise PayloadError("malformed_sample", "a sample must be a JSON object")
    if "ts" not in item:
        raise PayloadError("malformed_sample", "missing 'ts'")
    try:
        ts = parse_timestamp(item["ts"])
    except TimestampError as exc:
        raise PayloadError("bad_timestamp", str(exc)) from None

    if route.channel is not None:
        if "value" not in item:
            raise PayloadError("malformed_sample", "a channel topic needs 'value'")
        out.append((route.channel, ts, _number(item["value"])))
        return

    values = item.get("values")
    if not isinstance(values, dict) or not values:
        raise PayloadError("malformed_sample", "an asset topic needs 'values': {channel: x}")
    unknown = [name for name in values if name not in route.channels]
    if unknown:
        raise PayloadError("unknown_channel", f"{_short(unknown[0])} is not a channel of "
                           f"{route.asset!r}")
    for name, value in values.items():
        out.append((name, ts, _number(value)))


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PayloadError("not_a_number", f"value {_short(value)} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise PayloadError("non_finite", "value is not finite")
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
