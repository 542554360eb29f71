"""Timestamps: parsing what sensors send, and writing UTC for alarms."""

from __future__ import annotations

import datetime as dt
import math

# Epoch values above this are read as milliseconds (1e11 s is the year 5138; 1e11 ms is 1973).
_MS_THRESHOLD = 1e11
# Timestamps must fall between 1970 and 2200 once read (anything else is a broken clock).
_LATEST = 7_258_118_400.0


class TimestampError(ValueError):
    """A timestamp that cannot be turned into UTC epoch seconds."""


def parse_timestamp(value: object) -> float:
    """Return UTC epoch seconds for epoch seconds, epoch milliseconds or ISO 8601 with offset.

    Numbers above 1e11 are milliseconds. ISO strings must carry an offset (``Z`` or
    ``+02:00``): a naive local time is ambiguous and is rejected.
    """
    if isinstance(value, bool):
        raise TimestampError("timestamp is a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise TimestampError("timestamp is not finite")
        return _in_range(seconds / 1000.0 if abs(seconds) >= _MS_THRESHOLD else seconds)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError as exc:
            raise TimestampError(f"not ISO 8601: {value!r}") from exc
        if parsed.tzinfo is None:
            raise TimestampError(f"ISO timestamp without offset: {value!r} (add Z or +HH:MM)")
        return _in_range(parsed.timestamp())
    raise TimestampError(f"timestamp must be a number or an ISO 8601 string, not {value!r}")


def _in_range(seconds: float) -> float:
    if not 0.0 <= seconds < _LATEST:
        raise TimestampError(f"timestamp {seconds:.0f} s is outside 1970 to 2200")
    return seconds


def to_iso(seconds: float) -> str:
    """UTC ISO 8601 with a ``Z`` suffix, to the second (milliseconds when present)."""
    stamp = dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
    if stamp.microsecond:
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``300``, ``30s``, ``5min``, ``2h``, ``1d``."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or like '5min'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        for unit in sorted(units, key=len, reverse=True):
            if text.endswith(unit):
                number = text[: -len(unit)].strip()
                try:
                    return float(number) * units[unit]
                except ValueError:
                    break
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(
        f"{value!r} is not a duration; use seconds or a number with one of "
        f"{', '.join(sorted(units))}"
    )
