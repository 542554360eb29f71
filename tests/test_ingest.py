"""Payload decoding: the accepted formats, timestamps, and rejections by reason."""

import pytest

from agent.ingest import PayloadError, Route, decode_payload
from agent.timeutil import parse_timestamp

CHANNEL = Route("pump1", "flow", frozenset({"flow", "pressure"}))
ASSET = Route("pump1", None, frozenset({"flow", "pressure"}))
T = 1_733_313_600.0  # 2024-12-04T12:00:00Z


@pytest.mark.parametrize("ts", [T, int(T), T * 1000, "2024-12-04T12:00:00Z",
                                "2024-12-04T13:00:00+01:00", "2024-12-04T12:00:00.000+00:00"])
def test_timestamps_become_utc_epoch_seconds(ts):
    assert parse_timestamp(ts) == pytest.approx(T)


def test_channel_topic_single_and_batch():
    assert decode_payload(b'{"ts": 1733313600, "value": 3.5}', CHANNEL).samples == [
        ("flow", T, 3.5)]
    batch = decode_payload(b'[{"ts": 1733313600, "value": 1}, {"ts": 1733313601, "value": 2}]',
                           CHANNEL)
    assert batch.samples == [("flow", T, 1.0), ("flow", T + 1, 2.0)]


def test_asset_topic_values():
    decoded = decode_payload(
        b'{"ts": "2024-12-04T12:00:00Z", "values": {"flow": 1.5, "pressure": 2}}', ASSET)
    assert sorted(decoded.samples) == [("flow", T, 1.5), ("pressure", T, 2.0)]


@pytest.mark.parametrize("payload, reason", [
    (b"{not json", "malformed_json"),
    (b"\xff\xfe", "not_utf8"),
    (b'{"ts": 1, "value": NaN}', "non_finite"),
    (b'{"ts": 1, "value": Infinity}', "non_finite"),
    (b'{"ts": 1, "value": "3.5"}', "not_a_number"),
    (b'{"ts": 1, "value": true}', "not_a_number"),
    (b'{"value": 1}', "malformed_sample"),
    (b'{"ts": "2024-12-04 12:00", "value": 1}', "bad_timestamp"),
    (b'{"ts": "yesterday", "value": 1}', "bad_timestamp"),
    (b"[]", "malformed_sample"),
    (b"42", "malformed_sample"),
])
def test_bad_payloads_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(PayloadError) as info:
        decode_payload(payload, CHANNEL)
    assert info.value.reason == reason


def test_unknown_channel_on_asset_topic():
    with pytest.raises(PayloadError) as info:
        decode_payload(b'{"ts": 1, "values": {"speed": 1}}', ASSET)
    assert info.value.reason == "unknown_channel"


def test_oversized_payload():
    with pytest.raises(PayloadError) as info:
        decode_payload(b" " * 2_000_000, CHANNEL)
    assert info.value.reason == "oversized"


def test_a_bad_sample_in_a_batch_is_dropped_alone():
    decoded = decode_payload(b'[{"ts": 1, "value": 1}, {"ts": 2, "value": "x"}, '
                             b'{"ts": 3, "value": 3}]', CHANNEL)
    assert [s[2] for s in decoded.samples] == [1.0, 3.0]
    assert [reason for reason, _ in decoded.rejected] == ["not_a_number"]
