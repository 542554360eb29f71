"""The streaming pipeline without I/O: samples in, alarm events out.

``AssetPipeline`` holds one asset's window, ensemble and alarm trackers. ``Pipeline`` runs
the assets together so that snapshots due at the same time are scored in one batch. The
MQTT service and the offline evaluation both drive this class, which is why a replay through
the broker and an offline run give the same alarms.

Stream hygiene on the grid (see ``agent.window`` for gaps, flat lines and stuck sensors):
samples that are not finite or fall outside a channel's configured physical range are
rejected by reason, like late and duplicate samples, and the rest go on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time

import numpy as np

from agent.alarms import AlarmEvent, AlarmTracker
from agent.bundle import ModelBundle
from agent.ensemble import Ensemble
from agent.snapshot import prepare, resample
from agent.window import AssetWindow, Snapshot

log = logging.getLogger(__name__)

MAX_BATCH = 64


@dataclasses.dataclass
class AssetSettings:
    """What an asset pipeline needs; built from the configuration and the bundle."""

    name: str
    channels: list[str]
    sample_period: float
    snapshot_length: int
    hop: int
    normalization: str = "bundle"
    ensemble: str = "mean"
    max_missing: float = 0.5
    max_lateness: float = 0.0
    threshold: float = 0.5
    hysteresis: float = 0.1
    min_duration: float = 0.0
    off_delay: float = 0.0
    # Physical range per channel, (min, max); None or a None bound: not limited.
    channel_ranges: list[tuple[float | None, float | None]] | None = None
    max_fill: int = 3  # samples: a gap of at most this many is interpolated and scored
    long_gap: int | None = None  # samples: a gap this long is guarded; None: length // 32
    gap_guard: int | None = None  # samples masked after a long gap; None: 3 * length // 64
    stuck_run: int = 10  # samples in a row at a range bound: the sensor is stuck at a rail

    def gap_slots(self) -> tuple[int, int]:
        """``long_gap`` and ``gap_guard`` in samples, with their defaults."""
        long_gap = self.snapshot_length // 32 if self.long_gap is None else self.long_gap
        guard = 3 * self.snapshot_length // 64 if self.gap_guard is None else self.gap_guard
        return long_gap, guard


@dataclasses.dataclass
class _Pending:
    snapshot: Snapshot | None  # None: nothing left to cut, only release the slots
    first_slot: int | None
    last: bool  # the stream stopped (shutdown or a long gap) after this snapshot
    clear_alarms: bool
    inputs: np.ndarray | None = None
    scores: np.ndarray | None = None


class AssetPipeline:
    """Window, ensemble and alarms of one asset."""

    def __init__(self, settings: AssetSettings, bundle: ModelBundle, backend):
        self.settings = settings
        self.name = settings.name
        self.bundle = bundle
        self.backend = backend
        self.channel_index = {name: i for i, name in enumerate(settings.channels)}
        self.normalizer = bundle.normalizer(settings.normalization)
        ranges = settings.channel_ranges or [(None, None)] * len(settings.channels)
        if len(ranges) != len(settings.channels):
            raise ValueError(f"asset {settings.name!r}: {len(ranges)} channel ranges for "
                             f"{len(settings.channels)} channels")
        self.low = np.array([math.nan if lo is None else lo for lo, _ in ranges], float)
        self.high = np.array([math.nan if hi is None else hi for _, hi in ranges], float)
        self.window = AssetWindow(
            len(settings.channels), settings.sample_period, settings.snapshot_length,
            settings.hop, settings.max_lateness, settings.max_missing,
            max_fill=settings.max_fill, long_gap=settings.gap_slots()[0],
            gap_guard=settings.gap_slots()[1], low=self.low, high=self.high,
            stuck_run=settings.stuck_run,
        )
        n_classes = len(bundle.classes)
        self.ensemble = Ensemble(n_classes, settings.snapshot_length, settings.hop,
                                 settings.ensemble)
        self.trackers = [
            AlarmTracker(settings.name, cls, bundle.model_id, settings.sample_period,
                         settings.threshold, settings.hysteresis, settings.min_duration,
                         settings.off_delay)
            for cls in bundle.classes
        ]
        self.pending: list[_Pending] = []
        self.counters: collections.Counter = collections.Counter()
        self._late_run = 0  # consecutive late samples
        # Optional observer of the ensembled scores as slots become final (offline
        # evaluation reads them): called with each non-empty ``agent.ensemble.Finalized``.
        self.on_final = None

    def add(self, samples) -> collections.Counter:
        """Place samples ``(channel, ts, value)`` on the grid; return rejections by reason
        (the caller counts and logs them): ``unknown_channel``, ``non_finite``,
        ``out_of_range`` (outside the channel's configured physical range), ``late`` and
        ``duplicate``.

        A run of late samples longer than a snapshot means the sensor's clock stepped back
        (or one sample came from the future): the window restarts on the new time base.
        """
        window, out = self.window, []
        rejected: collections.Counter = collections.Counter()
        low, high = self.low, self.high
        for channel, ts, value in samples:
            index = self.channel_index.get(channel)
            if index is None:
                rejected["unknown_channel"] += 1
                continue
            if not math.isfinite(value):
                rejected["non_finite"] += 1
                continue
            if value < low[index] or value > high[index]:  # NaN bound: not limited
                rejected["out_of_range"] += 1
                continue
            slot = window.slot(ts)
            if window.is_gap_restart(slot) or self._late_run >= self.settings.snapshot_length:
                reason = "gap" if self._late_run == 0 else "clock stepped back"
                self._queue(out)
                out = []
                self._stop_stream(clear_alarms=True)
                self._late_run = 0
                log.info("asset %s: window restarted (%s)", self.name, reason)
                self.counters["window_restarts"] += 1
            reason = window.add(index, slot, value, out)
            if reason is None:
                self.counters["samples_accepted"] += 1
                self._late_run = 0
            else:
                rejected[reason] += 1
                if reason == "late":
                    self._late_run += 1
        self._queue(out)
        return rejected

    def stop(self) -> None:
        """The stream stops (shutdown): cut and queue what is left; alarms stay as they are."""
        self._stop_stream(clear_alarms=False)

    def sensor_status(self) -> dict[str, str]:
        """The condition of each channel over the newest snapshot's span of slots.

        ``ok``; ``no_data`` (no sample: never received, or the window restarted after a long
        gap); ``flatline`` (every sample equal); ``stuck_high`` / ``stuck_low`` (the newest
        ``stuck_run`` samples sit at the channel's configured maximum / minimum). A flat or
        stuck channel is a sensor fault, not an anomaly: its snapshots are masked.
        """
        return dict(zip(self.settings.channels, self.window.channel_status()))

    def _queue(self, snapshots: list[Snapshot], last: bool = False, clear: bool = False):
        for i, snapshot in enumerate(snapshots):
            if snapshot.condition == "flatline":
                self.counters["flatline_snapshots"] += 1
            if snapshot.stuck:
                self.counters["stuck_snapshots"] += 1
            final = last and i == len(snapshots) - 1
            self.pending.append(_Pending(snapshot, self.window.first_slot, final, clear))

    def _stop_stream(self, clear_alarms: bool) -> None:
        if self.window.head is None:
            return
        snapshots = self.window.flush()
        if snapshots:
            self._queue(snapshots, last=True, clear=clear_alarms)
        else:
            self.pending.append(_Pending(None, None, True, clear_alarms))
        self.window.reset()

    def apply(self, item: _Pending) -> list[AlarmEvent]:
        """Ensemble one scored (or skipped) snapshot and update the alarms."""
        snap = item.snapshot
        if snap is None:
            final = self.ensemble.release_all()
        else:
            scores = None
            if item.scores is not None:
                scores = resample(item.scores.astype(np.float64), self.settings.snapshot_length)
            final = self.ensemble.add(snap.end_slot, scores, snap.missing, item.first_slot,
                                      last=item.last)
        events: list[AlarmEvent] = []
        if len(final.slots):
            if self.on_final is not None:
                self.on_final(final)
            self.counters["slots_final"] += len(final.slots)
            self.counters["slots_masked"] += int(final.masked.sum())
            for k, tracker in enumerate(self.trackers):
                events += tracker.update(final.slots, final.scores[:, k], final.masked)
        if item.last:
            self.ensemble.reset()
            if item.clear_alarms:
                for tracker in self.trackers:
                    events += tracker.interrupt()
        return events


class Pipeline:
    """All assets of an agent; scores due snapshots in batches per model."""

    def __init__(self, assets: list[AssetPipeline]):
        self.assets = {asset.name: asset for asset in assets}
        self.counters: collections.Counter = collections.Counter()
        self.inference_seconds = 0.0

    def step(self) -> list[AlarmEvent]:
        """Score every pending snapshot and return the alarm events that follow."""
        items = [(asset, item) for asset in self.assets.values() for item in asset.pending]
        if not items:
            return []
        self._score(items)
        events: list[AlarmEvent] = []
        for asset in self.assets.values():
            pending, asset.pending = asset.pending, []
            for item in pending:
                events += asset.apply(item)
        return events

    def stop(self) -> list[AlarmEvent]:
        """Stop every stream: score what is buffered and release every slot."""
        for asset in self.assets.values():
            asset.stop()
        return self.step()

    def _score(self, items) -> None:
        groups: dict[int, list] = collections.defaultdict(list)
        for asset, item in items:
            if item.snapshot is not None and item.snapshot.scored:
                item.inputs = prepare(item.snapshot.values, asset.bundle.model_length,
                                      asset.normalizer)
                groups[id(asset.backend)].append((asset, item))
            elif item.snapshot is not None and item.snapshot.condition != "flatline":
                self.counters["snapshots_skipped"] += 1  # too much missing, or a silent channel
        for group in groups.values():
            backend, bundle = group[0][0].backend, group[0][0].bundle
            for lo in range(0, len(group), MAX_BATCH):
                chunk = group[lo:lo + MAX_BATCH]
                batch = np.stack([item.inputs for _, item in chunk])
                started = time.perf_counter()
                outputs = bundle.class_scores(backend.run(batch))
                self.inference_seconds += time.perf_counter() - started
                self.counters["snapshots_scored"] += len(chunk)
                self.counters["inference_batches"] += 1
                for (_, item), output in zip(chunk, outputs):
                    item.scores, item.inputs = output, None

    def counter_totals(self) -> dict[str, int]:
        total = collections.Counter(self.counters)
        for asset in self.assets.values():
            total.update(asset.counters)
        return dict(total)


def settings_from_bundle(bundle: ModelBundle, name: str, channels: list[str] | None = None,
                         **overrides) -> AssetSettings:
    """Asset settings with the bundle's defaults; keyword arguments override (None: keep)."""
    meta = bundle.metadata
    settings = AssetSettings(
        name=name,
        channels=channels or bundle.channels,
        sample_period=float(meta.get("sample_period", 1.0)),
        snapshot_length=int(meta["snapshot_length"]),
        hop=int(meta["hop"]),
        threshold=float(meta["threshold"]),
        hysteresis=float(meta.get("hysteresis", 0.1)),
        min_duration=float(meta.get("min_duration", 0.0)),
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    if overrides.get("max_lateness") is None:
        settings.max_lateness = 2 * settings.sample_period
    if settings.hop > settings.snapshot_length:
        raise ValueError(f"asset {name!r}: hop {settings.hop} exceeds snapshot_length "
                         f"{settings.snapshot_length}; some samples would never be scored")
    return settings


def run_series(pipeline: Pipeline, asset: str, ts: np.ndarray, values: np.ndarray,
               channels: list[str], chunk: int = 256) -> list[AlarmEvent]:
    """Feed a whole series to ``pipeline`` as a stream would, then stop the stream.

    NaN values are not sent (a gateway sends nothing for a missing sample). This is the
    offline evaluation path; the MQTT service drives the same methods.
    """
    target = pipeline.assets[asset]
    events: list[AlarmEvent] = []
    for lo in range(0, len(ts), chunk):
        samples = [
            (channels[c], float(t), float(row[c]))
            for t, row in zip(ts[lo:lo + chunk], values[lo:lo + chunk])
            for c in range(len(channels))
            if np.isfinite(row[c])
        ]
        target.add(samples)
        events += pipeline.step()
    events += pipeline.stop()
    return events


def alarm_spans(events: list[AlarmEvent]) -> dict[str, tuple[float, float]]:
    """The span (start, end) of every alarm, by id, from its raise and clear events."""
    spans: dict[str, tuple[float, float]] = {}
    for event in events:
        spans[event.alarm_id] = (event.start, event.end)
    return spans
