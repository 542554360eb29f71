"""Windowing: samples land on an asset's regular grid; every hop a snapshot is cut.

Grid slots are ``round(ts / sample_period)``, counted from the Unix epoch, so two agents
(or a replay and an offline evaluation) cut the same snapshots from the same samples. All
channels of an asset share the grid: a snapshot is a (snapshot_length, channels) block of
the same slots. Snapshots end on slots ``e`` with ``(e + 1) % hop == 0`` and cover the
``snapshot_length`` slots up to ``e``. A snapshot is due when the newest sample (of any
channel) is ``max_lateness`` past its end: until then, samples that arrive out of order or
from a lagging channel take their slot as if they had come in order. Once a snapshot is
cut, samples at or before its end are late and rejected, so every snapshot that covers a
slot sees the same data; a repeat of a sample still held is a duplicate.

Gaps and bad sensors, as each snapshot is cut (the model input itself is filled by
``agent.snapshot.fill_missing``, linear interpolation per channel):

- a run of at most ``max_fill`` missing slots of a channel is a short gap: interpolated and
  scored like data;
- a longer run is masked: its scores never count, so the values filled across it cannot
  raise an alarm;
- a gap of at least ``long_gap`` slots also masks the ``gap_guard`` slots after it: data
  that resumes after a long straight line moves the model's scores for a while (on the
  Dodgers model, alarms up to about 80 samples after gaps of 100 samples and more). The
  slots before the stream started count as such a gap;
- a run of at least ``stuck_run`` samples at a channel's configured minimum or maximum is a
  sensor stuck at a rail: those samples are taken out and treated as a gap;
- a snapshot in which all samples of a channel are equal is a flat line: it is masked whole
  and not scored (per-snapshot normalization never meets a zero spread), and the whole run
  of equal samples it belongs to is masked in the snapshots that overlap it. A snapshot in
  which a channel has no sample left is masked whole too.

Missing slots do not break a run of samples (stuck or flat): a run counts samples.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Relative tolerance for "all samples equal" and "at the rail".
FLAT_TOLERANCE = 1e-9


@dataclasses.dataclass
class Snapshot:
    """Raw samples of one snapshot: ``values`` (snapshot_length, channels), NaN where missing.

    ``missing`` marks the slots whose scores must not count (long gaps with their guard,
    slots before the stream, flat and stuck samples); ``condition`` says why a snapshot is
    not scored: ``missing`` (more than ``max_missing`` of it), ``no_data`` (a channel has no
    sample in it) or ``flatline`` (a channel's samples are all equal).
    """

    end_slot: int
    values: np.ndarray
    missing: np.ndarray  # (snapshot_length,) bool: masked slots
    scored: bool  # False when it must not be scored (see condition)
    condition: str = "ok"
    stuck: bool = False  # samples of a channel stuck at a rail were taken out
    flat: bool = False  # samples of a flat-lined channel are masked in it


def runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in a 1-D bool array, as ``(start, stop)`` index pairs."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), stops.tolist()))


class AssetWindow:
    """The grid buffer of one asset and the snapshots cut from it."""

    def __init__(
        self,
        n_channels: int,
        sample_period: float,
        snapshot_length: int,
        hop: int,
        max_lateness: float,
        max_missing: float,
        *,
        max_fill: int = 0,
        long_gap: int = 0,
        gap_guard: int = 0,
        low: np.ndarray | None = None,
        high: np.ndarray | None = None,
        stuck_run: int = 0,
    ):
        self.n_channels = n_channels
        self.period = sample_period
        self.length = snapshot_length
        self.hop = hop
        self.lateness = max(0, int(math.ceil(max_lateness / sample_period - 1e-9)))
        self.max_missing = max_missing
        self.max_fill = max_fill
        self.long_gap = long_gap
        self.gap_guard = gap_guard
        self.low = _rail(low, n_channels, -math.inf)
        self.high = _rail(high, n_channels, math.inf)
        bounds = np.stack([self.low, self.high])
        magnitude = np.where(np.isfinite(bounds), np.abs(bounds), 0.0).max(axis=0)
        self.rail_tolerance = FLAT_TOLERANCE * np.maximum(1.0, magnitude)  # "at the rail"
        self.stuck_run = stuck_run
        self.min_samples = max(2, int(math.ceil((1.0 - max_missing) * snapshot_length)))
        self.capacity = 2 * snapshot_length + hop + self.lateness + 2
        self.reset()

    def reset(self) -> None:
        """Forget every sample; the next sample starts a new stream."""
        self.values = np.full((self.capacity, self.n_channels), np.nan)
        self.flat = np.zeros((self.capacity, self.n_channels), dtype=bool)  # flat-line samples
        self.base = 0  # slot of values[0]
        self.head: int | None = None  # newest slot seen on any channel
        self.first_slot: int | None = None
        self.cut_through: int | None = None  # end slot of the newest snapshot cut
        self.next_end: int | None = None

    def slot(self, ts: float) -> int:
        return int(round(ts / self.period))

    def slot_time(self, slot: int) -> float:
        return slot * self.period

    def is_gap_restart(self, slot: int) -> bool:
        """True when ``slot`` is so far past the newest sample that the window must restart."""
        return self.head is not None and slot - self.head > self.length

    def add(self, channel: int, slot: int, value: float, out: list[Snapshot]) -> str | None:
        """Place one sample; append snapshots that became due to ``out``.

        Returns a rejection reason (``late``, ``duplicate``) or None when accepted. A sample
        for a slot that already holds one is a duplicate (a QoS 1 redelivery), also after the
        snapshot covering it was cut, as long as the buffer still holds that slot.
        """
        if self.head is None:
            self._start(slot)
        elif self.cut_through is not None and slot <= self.cut_through:
            if slot >= self.base and not math.isnan(self.values[slot - self.base, channel]):
                return "duplicate"
            return "late"
        elif slot < self.base:
            return "late"

        self._make_room(slot)
        index = slot - self.base
        if not math.isnan(self.values[index, channel]):
            return "duplicate"
        self.values[index, channel] = value

        if slot > self.head:
            self.head = slot
        while self._due(self.next_end):
            out.append(self._cut(self.next_end))
            self.next_end += self.hop
        return None

    def flush(self) -> list[Snapshot]:
        """Cut what is left when the stream stops: the aligned snapshots not yet due, and a
        last one ending at the newest sample, so that every sample gets scored."""
        out: list[Snapshot] = []
        if self.head is None:
            return out
        while self.next_end <= self.head:
            out.append(self._cut(self.next_end))
            self.next_end += self.hop
        if self.cut_through is None or self.cut_through < self.head:
            out.append(self._cut(self.head))
        return out

    def channel_status(self) -> list[str]:
        """Each channel's condition over the newest ``snapshot_length`` slots.

        ``no_data`` (no sample), ``stuck_high`` / ``stuck_low`` (its newest samples are a
        stuck run at the configured maximum / minimum), ``flatline`` (its newest sample
        belongs to a flat line, or the samples of these slots, as many as a snapshot needs to
        be scored, are all equal) or ``ok``.
        """
        if self.head is None:
            return ["no_data"] * self.n_channels
        hi = self.head - self.base + 1
        lo = max(0, hi - self.length)
        region = self.values[lo:hi]
        stuck_high, stuck_low = self._stuck(region)
        flat = self.flat[lo:hi]
        status = []
        for ch in range(self.n_channels):
            column = region[:, ch]
            valid = np.flatnonzero(~np.isnan(column))
            if not len(valid):
                status.append("no_data")
                continue
            newest = valid[-1]
            if stuck_high[newest, ch]:
                status.append("stuck_high")
            elif stuck_low[newest, ch]:
                status.append("stuck_low")
            elif flat[newest, ch] or (len(valid) >= self.min_samples
                                      and _is_flat(column[valid])):
                status.append("flatline")
            else:
                status.append("ok")
        return status

    def _start(self, slot: int) -> None:
        self.head = slot
        self.first_slot = slot
        self.base = slot - self.length
        first_end = slot + (-(slot + 1)) % self.hop
        self.next_end = first_end

    def _due(self, end: int) -> bool:
        return self.head >= end + self.lateness

    def _make_room(self, slot: int) -> None:
        overflow = slot - (self.base + self.capacity - 1)
        if overflow <= 0:
            return
        # Keep one hop more than the next snapshot needs: the last snapshot that ``flush``
        # cuts (ending at the newest sample, before the next aligned end) finds its samples.
        needed_from = (self.next_end - self.length + 1 - self.hop) if self.next_end is not None \
            else slot
        shift = min(overflow + self.hop, needed_from - self.base)
        if shift < overflow:
            raise AssertionError("window capacity too small for the pending snapshots")
        self.values[:-shift] = self.values[shift:]
        self.values[-shift:] = np.nan
        self.flat[:-shift] = self.flat[shift:]
        self.flat[-shift:] = False
        self.base += shift

    def _cut(self, end: int) -> Snapshot:
        start = end - self.length + 1
        self.cut_through = end

        # Everything the buffer holds up to the end: runs are judged on their whole length,
        # also where they begin before the snapshot. Slots before the stream are not data.
        region = self.values[:end - self.base + 1].copy()
        pre = max(0, min(len(region), self.first_slot - self.base))
        stuck_high, stuck_low = self._stuck(region)
        stuck = stuck_high | stuck_low
        region[stuck] = np.nan
        absent = np.isnan(region)
        absent[:pre] = True
        masked = self._gap_mask(absent)

        lo = start - self.base
        flat = self._flat(region, max(lo, pre))
        masked |= flat.any(axis=1)
        values = np.full((self.length, self.n_channels), np.nan)
        missing = np.ones(self.length, dtype=bool)
        src_lo = max(lo, 0)
        values[src_lo - lo:] = region[src_lo:]
        missing[src_lo - lo:] = masked[src_lo:]
        in_stream = slice(max(0, pre - lo), self.length)
        is_stuck = bool(stuck[src_lo:].any())
        is_flat = bool(flat[max(lo, pre):].any())

        condition = "ok"
        if float(np.isnan(values).mean()) > self.max_missing:
            condition = "missing"
        else:
            data = values[in_stream]
            for ch in range(self.n_channels):
                column = data[:, ch]
                valid = column[~np.isnan(column)]
                if not len(valid):
                    condition = "no_data"
                    break
                if len(valid) >= 2 and _is_flat(valid):
                    condition = "flatline"
                    break
        if condition in ("no_data", "flatline"):
            missing[:] = True
        return Snapshot(end, values, missing, scored=condition == "ok", condition=condition,
                        stuck=is_stuck, flat=is_flat)

    def _stuck(self, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, channels) masks of the samples in runs of at least ``stuck_run`` at a
        channel's maximum, and at its minimum."""
        high = np.zeros(region.shape, dtype=bool)
        low = np.zeros(region.shape, dtype=bool)
        if self.stuck_run <= 0:
            return high, low
        with np.errstate(invalid="ignore"):
            at_high = region >= self.high - self.rail_tolerance
            at_low = region <= self.low + self.rail_tolerance
        for ch in range(self.n_channels):
            if not (at_high[:, ch].any() or at_low[:, ch].any()):
                continue
            slots = np.flatnonzero(~np.isnan(region[:, ch]))
            for rail, at in ((high, at_high[slots, ch]), (low, at_low[slots, ch])):
                for a, b in runs(at):
                    if b - a >= self.stuck_run:
                        rail[slots[a]:slots[b - 1] + 1, ch] = True
        return high, low

    def _flat(self, region: np.ndarray, first: int) -> np.ndarray:
        """Mark flat-line samples in ``self.flat`` and return its rows for ``region``.

        A channel whose samples from ``first`` (the snapshot's first slot of data) to the end
        of the region are all equal, and as many as a snapshot needs to be scored, is flat;
        so is every sample of a run of equal samples that holds a flat one, before it and
        after it, as later snapshots come.
        """
        flags = self.flat[:len(region)]
        for ch in range(self.n_channels):
            slots = np.flatnonzero(~np.isnan(region[:, ch]))
            if len(slots) < 2:
                continue
            samples = region[slots, ch]
            inside = slots >= first
            if inside.sum() >= self.min_samples and _is_flat(samples[inside]):
                flags[slots[inside], ch] = True
            if not flags[slots, ch].any():
                continue
            tolerance = FLAT_TOLERANCE * np.maximum(1.0, np.abs(samples[1:]))
            for a, b in runs(np.abs(np.diff(samples)) <= tolerance):  # samples a..b equal
                if flags[slots[a:b + 1], ch].any():
                    flags[slots[a]:slots[b] + 1, ch] = True
        return flags

    def _gap_mask(self, absent: np.ndarray) -> np.ndarray:
        """Slots of gaps longer than ``max_fill``, and the guard after long gaps."""
        n = len(absent)
        masked = np.zeros(n, dtype=bool)
        for ch in range(self.n_channels):
            if not absent[:, ch].any():
                continue
            for a, b in runs(absent[:, ch]):
                if b - a <= self.max_fill:
                    continue
                guard = self.gap_guard if b - a >= self.long_gap else 0
                masked[a:min(n, b + guard)] = True
        return masked


def _is_flat(valid: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(valid).max()))
    return float(valid.max() - valid.min()) <= FLAT_TOLERANCE * scale


def _rail(bound: np.ndarray | None, n: int, default: float) -> np.ndarray:
    if bound is None:
        return np.full(n, default)
    out = np.array(bound, dtype=np.float64).reshape(n)
    return np.where(np.isnan(out), default, out)
