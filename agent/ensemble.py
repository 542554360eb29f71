"""Ensemble: every time point is scored by each snapshot that covers it; combine the scores.

With snapshots of ``L`` slots every ``hop`` slots, a slot is covered by up to
``ceil(L / hop)`` snapshots. After the snapshot ending at slot ``e`` is scored, no later
snapshot covers the slots up to ``e + hop - L``: they are final and are released, with the
combined score (mean by default, or median or max) and a mask for slots that were missing
or never scored.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np


@dataclasses.dataclass
class Finalized:
    """Slots whose score is final: ``scores`` (k, classes), ``masked`` (k,) bool."""

    slots: np.ndarray
    scores: np.ndarray
    masked: np.ndarray
    counts: np.ndarray


class Ensemble:
    """Running combination of overlapping snapshot scores for one asset."""

    def __init__(self, n_classes: int, snapshot_length: int, hop: int, method: str = "mean"):
        if method not in ("mean", "median", "max"):
            raise ValueError(f"ensemble method must be mean, median or max, not {method!r}")
        self.n_classes = n_classes
        self.length = snapshot_length
        self.hop = hop
        self.method = method
        self.depth = -(-snapshot_length // hop) + 1  # most snapshots that can cover a slot
        self.reset()

    def reset(self) -> None:
        self.lo: int | None = None  # first slot not yet final
        self.total = np.zeros((0, self.n_classes))
        self.peak = np.zeros((0, self.n_classes))
        self.stack = np.zeros((0, self.depth, self.n_classes))
        self.count = np.zeros(0, dtype=np.int64)
        self.missing = np.zeros(0, dtype=bool)

    def add(
        self,
        end_slot: int,
        scores: np.ndarray | None,
        missing: np.ndarray,
        first_slot: int,
        last: bool = False,
    ) -> Finalized:
        """Add one snapshot's scores (snapshot_length, classes), or None if it was skipped.

        ``first_slot`` is the stream's first slot: earlier slots are not data. With
        ``last`` (the stream stopped), every slot up to ``end_slot`` is released.
        """
        start = end_slot - self.length + 1
        if self.lo is None:
            self.lo = max(start, first_slot)
        self._grow(end_slot)

        # Only slots not yet final take part (a last, unaligned snapshot overlaps final ones).
        lo = max(start, self.lo)
        if lo <= end_slot:
            rows = slice(lo - self.lo, end_slot - self.lo + 1)
            cols = slice(lo - start, self.length)
            self.missing[rows] |= missing[cols]
            if scores is not None:
                part = scores[cols]
                self.total[rows] += part
                self.peak[rows] = np.maximum(self.peak[rows], part)
                if self.method == "median":
                    index = np.arange(rows.start, rows.stop)
                    self.stack[index, np.minimum(self.count[rows], self.depth - 1)] = part
                self.count[rows] += 1

        through = end_slot if last else end_slot + self.hop - self.length
        return self._release(through)

    def release_all(self) -> Finalized:
        """Release every slot held (the stream stopped after its last snapshot)."""
        if self.lo is None:
            return self._release_none()
        return self._release(self.lo + len(self.count) - 1)

    def _release_none(self) -> Finalized:
        empty = np.zeros(0, dtype=np.int64)
        return Finalized(empty, np.zeros((0, self.n_classes)), np.zeros(0, bool), empty)

    def _grow(self, end_slot: int) -> None:
        need = end_slot - self.lo + 1 - len(self.count)
        if need <= 0:
            return
        self.total = np.concatenate([self.total, np.zeros((need, self.n_classes))])
        self.peak = np.concatenate([self.peak, np.zeros((need, self.n_classes))])
        self.count = np.concatenate([self.count, np.zeros(need, dtype=np.int64)])
        self.missing = np.concatenate([self.missing, np.zeros(need, dtype=bool)])
        if self.method == "median":
            self.stack = np.concatenate(
                [self.stack, np.full((need, self.depth, self.n_classes), np.nan)]
            )

    def _release(self, through: int) -> Finalized:
        k = max(0, min(through - self.lo + 1, len(self.count)))
        count = self.count[:k]
        with np.errstate(invalid="ignore", divide="ignore"):
            if self.method == "mean":
                scores = self.total[:k] / count[:, None]
            elif self.method == "max":
                scores = np.where(count[:, None] > 0, self.peak[:k], np.nan)
            elif k:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: never scored
                    scores = np.nanmedian(self.stack[:k], axis=1)
            else:
                scores = self.total[:0]
        out = Finalized(
            slots=np.arange(self.lo, self.lo + k, dtype=np.int64),
            scores=scores,
            masked=self.missing[:k] | (count == 0),
            counts=count.copy(),
        )
        self.total, self.peak = self.total[k:], self.peak[k:]
        self.count, self.missing = self.count[k:], self.missing[k:]
        if self.method == "median":
            self.stack = self.stack[k:]
        self.lo += k
        return out
