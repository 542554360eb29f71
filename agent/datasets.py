"""Readers for the files that ``segwatch-agent replay`` publishes, and their labels.

- Dodgers Loop Sensor (UCI): ``Dodgers.data`` (``M/D/YYYY H:MM,count``, -1 = missing) and
  ``Dodgers.events`` (one home game per line, Latin-1 bytes). Times are Pacific daylight
  time (UTC-7) throughout the series: 2005-04-10 to 2005-10-01, no DST change.
- CSV as historians export it: a timestamp column and one column per channel, with the
  delimiter detected; empty cells are missing samples.

The label window of a game is ``[end - 30 min, end + 90 min]``: the sensor sits on an
on-ramp by the stadium, so the game's traffic leaves when the game ends. Averaged over the
games, the count rises above the same time of day on days without a game from about 30
minutes before the end, peaks 15 to 30 minutes after it, and is back to normal 90 minutes
after it (see ``docs/dodgers.md``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import logging
import math
from pathlib import Path

import numpy as np

from agent.timeutil import TimestampError, parse_timestamp

log = logging.getLogger(__name__)

DODGERS_UTC_OFFSET = dt.timezone(dt.timedelta(hours=-7))  # PDT
DODGERS_PERIOD = 300.0
WINDOW_BEFORE_END = 30 * 60.0
WINDOW_AFTER_END = 90 * 60.0


@dataclasses.dataclass(frozen=True)
class Series:
    """A multichannel series: ``ts`` (n,) UTC epoch seconds, ``values`` (n, channels)."""

    ts: np.ndarray
    values: np.ndarray
    channels: list[str]
    period: float | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """A labelled event: ``start`` and ``end`` in UTC epoch seconds, plus the label window."""

    name: str
    start: float
    end: float
    window_start: float
    window_end: float


def read_dodgers(data_path: str | Path) -> Series:
    """The Dodgers counts on their 5-minute grid; -1 (missing) becomes NaN."""
    data_path = Path(data_path)
    ts, values = [], []
    with open(data_path, encoding="ascii") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                stamp, count = line.split(",")
                local = dt.datetime.strptime(stamp, "%m/%d/%Y %H:%M")
                value = float(count)
            except ValueError:
                raise ValueError(f"{data_path}:{number}: expected 'M/D/YYYY H:MM,count', got "
                                 f"{line!r}") from None
            ts.append(local.replace(tzinfo=DODGERS_UTC_OFFSET).timestamp())
            values.append(math.nan if value < 0 else value)
    ts_arr = np.asarray(ts)
    if np.any(np.diff(ts_arr) != DODGERS_PERIOD):
        raise ValueError(f"{data_path}: the series is not on a regular 5-minute grid")
    return Series(ts_arr, np.asarray(values)[:, None], ["count"], DODGERS_PERIOD)


def read_dodgers_events(events_path: str | Path) -> list[Event]:
    """Home games with their label windows; the file's trailing 0xA0 bytes are stripped."""
    events_path = Path(events_path)
    events = []
    text = events_path.read_bytes().decode("latin-1")
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [field.strip("\xa0 \t\r") for field in line.split(",")]
        if len(fields) < 3 or not fields[0]:
            continue
        try:
            begin = dt.datetime.strptime(f"{fields[0]} {fields[1]}", "%m/%d/%y %H:%M:%S")
            end = dt.datetime.strptime(f"{fields[0]} {fields[2]}", "%m/%d/%y %H:%M:%S")
        except ValueError:
            raise ValueError(f"{events_path}:{number}: expected 'MM/DD/YY,HH:MM:SS,HH:MM:SS"
                             f",...', got {line!r}") from None
        start_s = begin.replace(tzinfo=DODGERS_UTC_OFFSET).timestamp()
        end_s = end.replace(tzinfo=DODGERS_UTC_OFFSET).timestamp()
        opponent = fields[4] if len(fields) > 4 else ""
        name = f"{begin:%Y-%m-%d} {opponent}".strip()
        events.append(Event(name, start_s, end_s, end_s - WINDOW_BEFORE_END,
                            end_s + WINDOW_AFTER_END))
    return events


def dodgers_split(series: Series) -> float:
    """The paper's split: the first half of the series trains, the second half tests.

    Returns the UTC epoch second where the test half starts (2005-07-06 12:00 local);
    42 games fall before it and 39 after.
    """
    return float(series.ts[len(series.ts) // 2])


def read_csv_series(path: str | Path, time_column: str | None = None,
                    naive_tz: dt.tzinfo = dt.timezone.utc) -> Series:
    """A historian CSV: a timestamp column and one numeric column per channel.

    The delimiter (comma, semicolon, tab, pipe) is detected. Timestamps are epoch seconds or
    milliseconds, or ISO 8601; ISO times without an offset are read in ``naive_tz``. Empty
    cells and cells that are not numbers are missing samples.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    if len(rows) < 2:
        raise ValueError(f"{path}: needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    time_index = _time_column(header, time_column, path)
    channels = [name for i, name in enumerate(header) if i != time_index]

    ts, values = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        ts.append(_csv_time(row[time_index], naive_tz, f"{path}:{number}"))
        values.append([_csv_number(row[i]) if i < len(row) else math.nan
                       for i in range(len(header)) if i != time_index])
    ts_arr = np.asarray(ts)
    order = np.argsort(ts_arr, kind="stable")
    return Series(ts_arr[order], np.asarray(values, dtype=np.float64)[order], channels)


def _time_column(header: list[str], wanted: str | None, path: Path) -> int:
    if wanted is not None:
        if wanted not in header:
            raise ValueError(f"{path}: no column {wanted!r}; columns: {', '.join(header)}")
        return header.index(wanted)
    for i, name in enumerate(header):
        if name.lower() in ("timestamp", "time", "datetime", "date", "ts"):
            return i
    return 0


def _csv_time(cell: str, naive_tz: dt.tzinfo, where: str) -> float:
    cell = cell.strip()
    try:
        return parse_timestamp(float(cell))
    except ValueError:
        pass
    try:
        return parse_timestamp(cell)
    except TimestampError:
        try:
            return dt.datetime.fromisoformat(cell).replace(tzinfo=naive_tz).timestamp()
        except ValueError:
            raise ValueError(f"{where}: cannot read the timestamp {cell!r}") from None


def _csv_number(cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan
