"""Windowing: samples land on an asset's regular grid; every hop a snapshot is cut.

Grid slots are ``round(ts / sample_period)``, counted from the Unix epoch, so two agents
(or a replay and an offline evaluation) cut the same snapshots from the same samples.
Snapshots end on slots ``e`` with ``(e + 1) % hop == 0`` and cover the ``snapshot_length``
slots up to ``e``. A snapshot is due when every channel has reached its end, or when the
newest sample is ``max_lateness`` past it. Once a snapshot is cut, samples at or before its
end are late and rejected, so every snapshot that covers a slot sees the same data.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass
class Snapshot:
    """Raw samples of one snapshot: ``values`` (snapshot_length, channels), NaN where missing."""

    end_slot: int
    values: np.ndarray
    missing: np.ndarray  # (snapshot_length,) bool: a channel is missing at that slot
    scored: bool  # False when too much is missing to score it


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
    ):
        self.n_channels = n_channels
        self.period = sample_period
        self.length = snapshot_length
        self.hop = hop
        self.lateness = max(0, int(math.ceil(max_lateness / sample_period - 1e-9)))
        self.max_missing = max_missing
        self.capacity = 2 * snapshot_length + hop + self.lateness + 2
        self.reset()

    def reset(self) -> None:
        """Forget every sample; the next sample starts a new stream."""
        self.values = np.full((self.capacity, self.n_channels), np.nan)
        self.base = 0  # slot of values[0]
        self.head: int | None = None  # newest slot seen on any channel
        self.first_slot: int | None = None
        self.channel_head = np.full(self.n_channels, -(2**62), dtype=np.int64)
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

        Returns a rejection reason (``late``, ``duplicate``) or None when accepted.
        """
        if self.head is None:
            self._start(slot)
        elif self.cut_through is not None and slot <= self.cut_through:
            return "late"
        elif slot < self.base:
            return "late"

        self._make_room(slot)
        index = slot - self.base
        if not math.isnan(self.values[index, channel]):
            return "duplicate"
        self.values[index, channel] = value

        if slot > self.channel_head[channel]:
            self.channel_head[channel] = slot
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

    def _start(self, slot: int) -> None:
        self.head = slot
        self.first_slot = slot
        self.base = slot - self.length
        first_end = slot + (-(slot + 1)) % self.hop
        self.next_end = first_end

    def _due(self, end: int) -> bool:
        return self.head >= end + self.lateness or bool((self.channel_head >= end).all())

    def _make_room(self, slot: int) -> None:
        overflow = slot - (self.base + self.capacity - 1)
        if overflow <= 0:
            return
        needed_from = (self.next_end - self.length + 1) if self.next_end is not None else slot
        shift = min(overflow + self.hop, needed_from - self.base)
        if shift < overflow:
            raise AssertionError("window capacity too small for the pending snapshots")
        self.values[:-shift] = self.values[shift:]
        self.values[-shift:] = np.nan
        self.base += shift

    def _cut(self, end: int) -> Snapshot:
        start = end - self.length + 1
        lo, hi = start - self.base, end - self.base + 1
        values = np.full((self.length, self.n_channels), np.nan)
        src_lo = max(lo, 0)
        values[src_lo - lo:] = self.values[src_lo:hi]
        # Slots before the stream started are not data: keep them NaN (they are masked).
        missing = np.isnan(values).any(axis=1)
        self.cut_through = end
        fraction_missing = float(np.isnan(values).mean())
        return Snapshot(end, values, missing, scored=fraction_missing <= self.max_missing)
