"""Readers for the data sets of the paper's experiments, with their format traps handled.

- **EMG gestures** (UCI, Lobov et al. 2018), 10 of 36 subjects: 8-channel surface EMG
  and a gesture class per row, tab-separated with a header. ``time`` is in milliseconds
  on an irregular grid of about 1 kHz, but the MYO bracelet samples at about 200 Hz, so
  rows repeat (hold) the last sample. Class 0 marks the unlabelled pauses between
  gestures; class 7 (extended palm) occurs in no staged file.
- **SKAB v0.9** (Skoltech Anomaly Benchmark): a water-circulation test bed, 8 sensors at
  1 sample per second with gaps, semicolon-separated; every labelled file is one
  experiment with one anomaly segment. Labels are written as floats (``0.0``/``1.0``).
- **NAB** (Numenta Anomaly Benchmark), 10 real series: ``timestamp,value`` CSV files and
  NAB's label JSONs (inclusive windows, written with microseconds). Timestamps are kept
  in row order: one file steps back 55 minutes and another repeats one time 12 times at
  a daylight-saving change.

Naive times are read as UTC throughout, the convention of ``agent.datasets.read_csv_series``
by default: a series keeps its wall-clock readings, which is all that scoring needs.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.datasets import Event
from agent.snapshot import Normalizer

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

# --- EMG gestures -------------------------------------------------------------------------

EMG_CHANNELS = [f"channel{i}" for i in range(1, 9)]
EMG_LABELS = {
    0: "unmarked",
    1: "hand at rest",
    2: "fist",
    3: "wrist flexion",
    4: "wrist extension",
    5: "radial deviation",
    6: "ulnar deviation",
    7: "extended palm",
}
# The mask's classes: the five active gestures. Rest (1) and the unmarked pauses (0) are
# both a relaxed hand, alike in the EMG, so they form the background together.
EMG_GESTURES = (2, 3, 4, 5, 6)
# The MYO's own sample period; the files' rows hold each sample for about 5 ms.
EMG_PERIOD_MS = 5.0
_EMG_HEADER = ["time", *EMG_CHANNELS, "class"]
_EMG_NAME = re.compile(r"^([12])_raw_data_(\d\d)-(\d\d)_(\d\d)\.(\d\d)\.(\d\d)\.txt$")


@dataclasses.dataclass(frozen=True)
class EmgRecording:
    """One series of one subject.

    ``ts`` (n,) seconds from the start of the recording (the file's milliseconds / 1000),
    ``values`` (n, 8) EMG in the file's units (steps of 1e-05), ``labels`` (n,) the class
    of each row, 0-7 (see ``EMG_LABELS``). ``series`` is 1 or 2 (0 for a file not named
    ``N_raw_data_...``); ``started`` is the local start time taken from the file name (the
    time zone is not recorded).
    """

    subject: str
    series: int
    ts: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    started: dt.datetime | None = None


def read_emg_file(path: str | Path, subject: str | None = None) -> EmgRecording:
    """One ``N_raw_data_HH-MM_DD.MM.YY.txt`` file.

    Rows whose time does not rise past the previous row's are dropped (none occur in the
    staged files; the reader logs how many it drops).
    """
    path = Path(path)
    with open(path, encoding="ascii") as handle:
        header = handle.readline().split()
    if header != _EMG_HEADER:
        raise ValueError(f"{path}: expected the tab-separated header {' '.join(_EMG_HEADER)}, "
                         f"got {' '.join(header)}")
    try:
        table = np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot read the rows as 10 numbers each: {exc}") from None

    ts_ms = table[:, 0]
    keep = np.ones(len(ts_ms), bool)
    keep[1:] = ts_ms[1:] > np.maximum.accumulate(ts_ms)[:-1]
    if not keep.all():
        log.warning("%s: dropped %d rows whose time does not rise", path, int((~keep).sum()))
    table = table[keep]

    labels = table[:, 9]
    if np.any(labels != np.round(labels)) or labels.min() < 0 or labels.max() > 7:
        raise ValueError(f"{path}: the class column must hold integers 0-7")
    match = _EMG_NAME.match(path.name)
    started = None
    series = 0
    if match:
        series = int(match.group(1))
        hour, minute, day, month, year = (int(g) for g in match.groups()[1:])
        started = dt.datetime(2000 + year, month, day, hour, minute)
    return EmgRecording(subject or path.parent.name, series, table[:, 0] / 1000.0,
                        table[:, 1:9].copy(), labels.astype(np.int64), started)


def read_emg(data_dir: str | Path = DEFAULT_DATA / "emg_gestures"
             ) -> dict[str, list[EmgRecording]]:
    """Every subject folder (``01``, ``03``, ...) with its recordings, series 1 then 2."""
    data_dir = Path(data_dir)
    subjects = sorted(p for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"no EMG subject folders in {data_dir} (expected 01/, 03/, ...)")
    recordings = {}
    for folder in subjects:
        files = sorted(folder.glob("*_raw_data_*.txt"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *_raw_data_*.txt files")
        recordings[folder.name] = [read_emg_file(f, folder.name) for f in files]
    return recordings


def emg_classes(gestures: Sequence[int] = EMG_GESTURES) -> list[str]:
    """Names of the mask channels: ``background`` first, then one per gesture class."""
    return ["background"] + [EMG_LABELS[g] for g in gestures]


def emg_split(subjects: Sequence[str], seed: int, test_count: int = 3
              ) -> tuple[list[str], list[str]]:
    """Split subjects into train and test, no subject in both (7 and 3 of the 10 staged).

    The sorted subjects are permuted with ``numpy.random.default_rng(seed)``; the first
    ``test_count`` go to test. The same subjects and seed always give the same split; each
    list comes back sorted.
    """
    ordered = sorted(subjects)
    if not 0 < test_count < len(ordered):
        raise ValueError(f"test_count must be between 1 and {len(ordered) - 1}, got {test_count}")
    order = np.random.default_rng(seed).permutation(len(ordered))
    test = sorted(ordered[i] for i in order[:test_count])
    train = sorted(s for s in ordered if s not in test)
    return train, test


def emg_mask(labels: np.ndarray, gestures: Sequence[int] = EMG_GESTURES) -> np.ndarray:
    """(n, 1 + len(gestures)) one-hot float32: channel 0 for background, then each gesture.

    Every label not in ``gestures`` (unmarked, rest, extended palm) is background, so each
    row has exactly one class (multi-class, single-label).
    """
    channel = np.zeros(len(labels), np.int64)
    for k, gesture in enumerate(gestures, start=1):
        channel[labels == gesture] = k
    return np.eye(1 + len(gestures), dtype=np.float32)[channel]


def emg_resample(recording: EmgRecording, period_ms: float = EMG_PERIOD_MS) -> EmgRecording:
    """The recording on a regular grid of ``period_ms``, each point holding the last row.

    The files repeat each MYO sample over several rows of an irregular ~1 kHz grid; holding
    the latest row at each grid time (a zero-order hold) keeps the samples as recorded and
    their labels with them. At the default 5 ms a snapshot of 1,024 points spans 5.1 s:
    one gesture of about 3 s and parts of the pauses around it. Resampling to the MYO rate
    is this project's choice, not a step the paper states.
    """
    period = period_ms / 1000.0
    count = int(np.floor((recording.ts[-1] - recording.ts[0]) / period)) + 1
    grid = recording.ts[0] + period * np.arange(count)
    rows = np.searchsorted(recording.ts, grid + 1e-9, side="right") - 1
    return dataclasses.replace(recording, ts=grid, values=recording.values[rows],
                               labels=recording.labels[rows])


def emg_windows(recordings: Sequence[EmgRecording], length: int = 1024, hop: int = 512,
                gestures: Sequence[int] = EMG_GESTURES, period_ms: float = EMG_PERIOD_MS,
                normalizer: Normalizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Snapshots (count, length, 8) and one-hot masks (count, length, 1 + gestures).

    Each recording is resampled (``emg_resample``) and cut every ``hop`` points, with one
    more snapshot aligned to its end so that every point is covered; snapshots overlap when
    ``hop < length``. Values are float32 in the file's units unless a ``normalizer`` (as in
    ``agent.snapshot``) is given.
    """
    xs, ys = [], []
    for recording in recordings:
        grid = emg_resample(recording, period_ms)
        n = len(grid.ts)
        if n < length:
            raise ValueError(f"subject {recording.subject} series {recording.series}: {n} points "
                             f"at {period_ms} ms, fewer than one snapshot of {length}")
        starts = list(range(0, n - length + 1, hop))
        if starts[-1] != n - length:
            starts.append(n - length)
        mask = emg_mask(grid.labels, gestures)
        for start in starts:
            xs.append(_emg_values(grid.values[start:start + length], normalizer))
            ys.append(mask[start:start + length])
    return np.stack(xs), np.stack(ys)


def emg_random_snapshots(recordings: Sequence[EmgRecording], count: int,
                         rng: np.random.Generator, length: int = 1024,
                         gestures: Sequence[int] = EMG_GESTURES,
                         period_ms: float = EMG_PERIOD_MS, normalizer: Normalizer | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` snapshots at random recordings and offsets, for training (shapes as above)."""
    grids = [emg_resample(r, period_ms) for r in recordings]
    masks = [emg_mask(g.labels, gestures) for g in grids]
    xs = np.empty((count, length, len(EMG_CHANNELS)), np.float32)
    ys = np.empty((count, length, 1 + len(gestures)), np.float32)
    for i in range(count):
        k = int(rng.integers(len(grids)))
        start = int(rng.integers(0, len(grids[k].ts) - length + 1))
        xs[i] = _emg_values(grids[k].values[start:start + length], normalizer)
        ys[i] = masks[k][start:start + length]
    return xs, ys


def _emg_values(raw: np.ndarray, normalizer: Normalizer | None) -> np.ndarray:
    return (normalizer(raw) if normalizer is not None else raw).astype(np.float32)


# --- SKAB -----------------------------------------------------------------------------------

SKAB_CHANNELS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure",
                 "Temperature", "Thermocouple", "Voltage", "Volume Flow RateRMS"]
SKAB_PERIOD = 1.0
SKAB_FOLDERS = ("valve1", "valve2", "other")


@dataclasses.dataclass(frozen=True)
class SkabRun:
    """One SKAB experiment: ``ts`` (n,) epoch seconds (naive times read as UTC; the test
    bed is in Moscow, UTC+3), ``values`` (n, 8), ``anomaly`` and ``changepoint`` (n,) 0/1.
    """

    name: str
    ts: np.ndarray
    values: np.ndarray
    channels: list[str]
    anomaly: np.ndarray
    changepoint: np.ndarray

    @property
    def changepoint_rows(self) -> np.ndarray:
        return np.flatnonzero(self.changepoint)

    def events(self) -> list[Event]:
        """Each contiguous anomaly segment as an event whose label window is the segment."""
        return [Event(self.name, start, end, start, end)
                for start, end in mask_spans(self.ts, self.anomaly.astype(bool))]


def read_skab_file(path: str | Path, name: str | None = None) -> SkabRun:
    """A SKAB CSV: ``datetime;<8 sensors>[;anomaly;changepoint]``, semicolon-separated."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter=";"))
    header = rows[0] if rows else []
    if header[:9] != ["datetime", *SKAB_CHANNELS]:
        raise ValueError(f"{path}: expected the semicolon-separated header datetime;"
                         f"{';'.join(SKAB_CHANNELS)}[;anomaly;changepoint], got {';'.join(header)}")
    labelled = header[9:] == ["anomaly", "changepoint"]

    ts, values = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            if len(row) != len(header):
                raise ValueError
            stamp = dt.datetime.strptime(row[0], "%Y-%m-%d %H:%M:%S")
            values.append([float(cell) for cell in row[1:]])
        except ValueError:
            raise ValueError(f"{path}:{number}: expected 'YYYY-MM-DD hh:mm:ss' and "
                             f"{len(header) - 1} numbers, got {';'.join(row)}") from None
        ts.append(stamp.replace(tzinfo=dt.timezone.utc).timestamp())
    ts_arr = np.asarray(ts)
    table = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(np.diff(ts_arr) <= 0)
    if len(bad):
        raise ValueError(f"{path}:{bad[0] + 3}: time does not rise past the row before")
    if not np.isfinite(table).all():
        raise ValueError(f"{path}: holds values that are not finite numbers")

    zeros = np.zeros(len(ts_arr), np.int8)
    anomaly = table[:, 8].astype(np.int8) if labelled else zeros
    changepoint = table[:, 9].astype(np.int8) if labelled else zeros.copy()
    return SkabRun(name or path.stem, ts_arr, table[:, :8].copy(), list(SKAB_CHANNELS),
                   anomaly, changepoint)


def read_skab(data_dir: str | Path = DEFAULT_DATA / "skab") -> list[SkabRun]:
    """The labelled experiments, named ``valve1/0`` ..., by folder then file number."""
    data_dir = Path(data_dir)
    runs = []
    for folder in SKAB_FOLDERS:
        files = sorted((data_dir / folder).glob("*.csv"), key=lambda p: int(p.stem))
        runs += [read_skab_file(f, f"{folder}/{f.stem}") for f in files]
    if not runs:
        raise FileNotFoundError(f"no SKAB experiments in {data_dir}/{{{','.join(SKAB_FOLDERS)}}}")
    return runs


def read_skab_anomaly_free(data_dir: str | Path = DEFAULT_DATA / "skab") -> SkabRun:
    """``anomaly-free/anomaly-free.csv``: normal operation only; its labels are all 0."""
    path = Path(data_dir) / "anomaly-free" / "anomaly-free.csv"
    if not path.is_file():
        raise FileNotFoundError(f"the SKAB anomaly-free file is expected at {path}")
    return read_skab_file(path, "anomaly-free")


# --- NAB --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NabSeries:
    """One NAB file, in row order.

    ``ts`` (n,) epoch seconds of the naive wall-clock stamps read as UTC, duplicates and
    back-steps kept as in the file; ``values`` (n,); ``windows`` the inclusive label windows
    ``(start, end)`` in the same clock; ``window_rows`` their first and last rows, found as
    NAB does (the first row stamped with each limit); ``label_ts`` the labelled anomaly
    points (one per window, two in the window of ``cpu_utilization_asg_misconfiguration``).
    """

    name: str
    ts: np.ndarray
    values: np.ndarray
    windows: list[tuple[float, float]]
    window_rows: list[tuple[int, int]]
    label_ts: list[float]

    @property
    def period(self) -> float:
        """The median step, in seconds."""
        return float(np.median(np.diff(self.ts)))


def read_nab(data_dir: str | Path = DEFAULT_DATA / "nab") -> list[NabSeries]:
    """Every file under ``data/`` with its windows from ``labels/combined_windows.json``.

    Label keys without a data file (NAB lists all 58 of its files) are ignored; a data file
    without a key is an error. Series come sorted by name.
    """
    data_dir = Path(data_dir)
    windows_path = data_dir / "labels" / "combined_windows.json"
    labels_path = data_dir / "labels" / "combined_labels.json"
    for path in (windows_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"NAB label file expected at {path}")
    all_windows = json.loads(windows_path.read_text())
    all_labels = json.loads(labels_path.read_text())

    series = []
    for path in sorted((data_dir / "data").glob("*/*.csv")):
        name = path.relative_to(data_dir / "data").as_posix()
        if name not in all_windows:
            raise ValueError(f"{path}: no windows for {name!r} in {windows_path}")
        ts, values = _read_nab_csv(path)
        windows = [(_nab_time(a, windows_path), _nab_time(b, windows_path))
                   for a, b in all_windows[name]]
        rows = [nab_window_rows(ts, start, end) for start, end in windows]
        label_ts = [_nab_time(t, labels_path) for t in all_labels.get(name, [])]
        series.append(NabSeries(name, ts, values, windows, rows, label_ts))
    if not series:
        raise FileNotFoundError(f"no NAB data files in {data_dir / 'data'}/<category>/*.csv")
    return series


def nab_window_rows(ts: np.ndarray, start: float, end: float) -> tuple[int, int]:
    """First and last row of the window ``[start, end]`` in a series kept in row order.

    As NAB: the window opens at the first row stamped ``start`` and closes at the first row
    stamped ``end``. Limits that match no row fall back to the first row at or after
    ``start`` and the last row before the first later row stamped after ``end``.
    """
    exact = np.flatnonzero(ts == start)
    after = np.flatnonzero(ts >= start)
    if not len(after):
        raise ValueError(f"window [{start}, {end}] starts after the series ends")
    first = int(exact[0] if len(exact) else after[0])
    exact = np.flatnonzero(ts[first:] == end)
    if len(exact):
        return first, first + int(exact[0])
    beyond = np.flatnonzero(ts[first:] > end)
    last = first + (int(beyond[0]) - 1 if len(beyond) else len(ts) - 1 - first)
    if last < first:
        raise ValueError(f"window [{start}, {end}] holds no row")
    return first, last


def nab_stream_ts(ts: np.ndarray, min_step: float = 1.0) -> np.ndarray:
    """Strictly rising times for streaming a NAB series through the agent, row for row.

    A row stamped at or before its predecessor is moved to ``min_step`` seconds after it;
    every other row keeps its time. Scores computed on these times stay aligned with the
    file's rows, which is what NAB scores.
    """
    out = np.array(ts, dtype=np.float64, copy=True)
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            out[i] = out[i - 1] + min_step
    return out


def _read_nab_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != ["timestamp", "value"]:
        raise ValueError(f"{path}: expected the header 'timestamp,value'")
    ts, values = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            ts.append(_nab_time(row[0], path))
            values.append(float(row[1]))
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{number}: expected 'YYYY-MM-DD HH:MM:SS,value', got "
                             f"{','.join(row)}") from None
    return np.asarray(ts), np.asarray(values, dtype=np.float64)


def _nab_time(text: str, where: Path) -> float:
    """``YYYY-MM-DD HH:MM:SS[.ffffff]`` read as UTC."""
    try:
        stamp = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{where}: cannot read the time {text!r}") from None
    return stamp.replace(tzinfo=dt.timezone.utc).timestamp()


# --- shared -----------------------------------------------------------------------------------

def mask_spans(ts: np.ndarray, mask: np.ndarray) -> list[tuple[float, float]]:
    """``(start, end)`` times of each run of consecutive True rows (inclusive)."""
    mask = np.asarray(mask, bool)
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1
    return [(float(ts[a]), float(ts[b])) for a, b in zip(starts, ends)]
