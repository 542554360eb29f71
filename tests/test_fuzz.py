"""Fuzz of the payload decoder: whatever arrives on a topic, ``decode_payload`` returns
samples it has checked or raises ``PayloadError`` with a known reason; never anything else.

The number of examples is bounded so the file runs in seconds; hypothesis keeps any
failing example in ``.hypothesis/`` and replays it first on the next run.
"""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.ingest import IngestLimits, PayloadError, Route, decode_payload

CHANNEL = Route("pump1", "flow", frozenset({"flow", "pressure"}))
ASSET = Route("pump1", None, frozenset({"flow", "pressure"}))
LIMITS = IngestLimits(max_payload_bytes=20_000, max_samples=50,
                      min_timestamp=946_684_800.0, max_future=86_400.0)
NOW = 1_733_313_600.0
REASONS = {"oversized", "not_utf8", "malformed_json", "non_finite", "too_many_samples",
           "malformed_sample", "bad_timestamp", "before_epoch", "future_timestamp",
           "not_a_number", "unknown_channel"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=9e8, max_value=2e9), st.floats(min_value=9e11, max_value=2e12),
    st.text(max_size=20),
    st.sampled_from(["2024-12-04T12:00:00Z", "2024-12-04 12:00", "1e400", "", "NaN"]),
)
keys = st.one_of(st.sampled_from(["ts", "value", "values", "flow", "pressure", "speed"]),
                 st.text(max_size=8))
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
samples = st.fixed_dictionaries(
    {"ts": st.one_of(st.floats(min_value=0, max_value=3e9), junk)},
    optional={"value": junk,
              "values": st.dictionaries(keys, st.one_of(st.floats(), junk), max_size=4)},
)
documents = st.one_of(junk, samples, st.lists(samples, max_size=60))


def check(payload: bytes, route: Route) -> None:
    try:
        decoded = decode_payload(payload, route, LIMITS, now=NOW)
    except PayloadError as exc:
        assert exc.reason in REASONS, exc.reason
        return
    assert len(decoded.samples) + len(decoded.rejected) <= LIMITS.max_samples
    for reason, detail in decoded.rejected:
        assert reason in REASONS and isinstance(detail, str) and len(detail) < 1000
    for channel, ts, value in decoded.samples:
        assert channel in route.channels
        assert isinstance(ts, float) and LIMITS.min_timestamp <= ts <= NOW + LIMITS.max_future
        assert isinstance(value, float) and math.isfinite(value)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(payload):
    check(payload, CHANNEL)
    check(payload, ASSET)


@FUZZ
@given(documents)
def test_arbitrary_json_documents(doc):
    # allow_nan: json.dumps writes the bare NaN / Infinity tokens the decoder must refuse.
    payload = json.dumps(doc, allow_nan=True).encode()
    check(payload, CHANNEL)
    check(payload, ASSET)


@FUZZ
@given(documents, st.data())
def test_damaged_json_documents(doc, data):
    payload = bytearray(json.dumps(doc).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        if payload:
            at = data.draw(st.integers(0, len(payload) - 1))
            payload[at] = data.draw(st.integers(0, 255))
    check(bytes(payload), CHANNEL)
    check(bytes(payload), ASSET)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5000), st.sampled_from("[{"))
def test_deep_nesting(depth, bracket):
    closing = "]" if bracket == "[" else "}"
    inner = '{"ts": 1733313600, "value": ' + bracket * depth + closing * depth + "}"
    check(inner.encode(), CHANNEL)
    check((bracket * depth + closing * depth).encode(), CHANNEL)
