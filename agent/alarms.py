"""Alarms: ensembled scores to raise and clear events, per asset and class.

An alarm is raised when the score of consecutive final slots stays at or above
``threshold`` for ``min_duration``; it starts at the first of those slots. It stays active
while the score stays at or above ``threshold - hysteresis`` and clears at the first slot
below, ending at the last slot above. A masked slot (missing data, or never scored) counts
as below: a gap never raises an alarm and never holds one open.

Alarm ids are UUID 5 of the asset, class, start time and model id, so a replay of the same
data through the same model gives the same ids.
"""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np

from agent.timeutil import to_iso

_NAMESPACE = uuid.UUID("5e6d7761-7463-6800-8000-000000000001")


@dataclasses.dataclass(frozen=True)
class AlarmEvent:
    """One raise (``state='active'``) or clear (``state='cleared'``) of an alarm."""

    alarm_id: str
    asset: str
    class_name: str
    state: str
    start: float  # epoch seconds of the first slot
    end: float  # epoch seconds of the last slot above the clear level so far
    peak_score: float
    model_id: str
    threshold: float

    def to_message(self) -> dict:
        """The JSON document published on ``<prefix>/<asset>/alarm``."""
        return {
            "alarm_id": self.alarm_id,
            "asset": self.asset,
            "class": self.class_name,
            "state": self.state,
            "start": to_iso(self.start),
            "end": to_iso(self.end) if self.state == "cleared" else None,
            "last_above": to_iso(self.end),
            "peak_score": round(self.peak_score, 4),
            "threshold": self.threshold,
            "model_id": self.model_id,
        }


def alarm_id(asset: str, class_name: str, start: float, model_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{asset}|{class_name}|{to_iso(start)}|{model_id}"))


class AlarmTracker:
    """The alarm state of one (asset, class)."""

    def __init__(
        self,
        asset: str,
        class_name: str,
        model_id: str,
        sample_period: float,
        threshold: float,
        hysteresis: float,
        min_duration: float,
    ):
        self.asset = asset
        self.class_name = class_name
        self.model_id = model_id
        self.period = sample_period
        self.on = threshold
        self.off = max(0.0, threshold - hysteresis)
        self.min_slots = max(1, int(round(min_duration / sample_period)))
        self.run_start: int | None = None
        self.run_length = 0
        self.run_peak = 0.0
        self.active: AlarmEvent | None = None
        self.active_last = 0

    def update(self, slots: np.ndarray, scores: np.ndarray, masked: np.ndarray) -> list:
        """Feed final slots in order; return the raise and clear events they cause."""
        events: list[AlarmEvent] = []
        values = np.where(masked, -1.0, np.nan_to_num(scores, nan=-1.0))
        for slot, score in zip(slots.tolist(), values.tolist()):
            if self.active is not None:
                if score >= self.off:
                    self.active_last = slot
                    self.run_peak = max(self.run_peak, score)
                    continue
                events.append(self._event("cleared"))
                self.active = None
            if score >= self.on:
                if self.run_start is None:
                    self.run_start, self.run_length, self.run_peak = slot, 0, 0.0
                self.run_length += 1
                self.run_peak = max(self.run_peak, score)
                if self.run_length >= self.min_slots:
                    self.active_last = slot
                    self.active = self._event("active")
                    events.append(self.active)
                    self.run_start = None
            else:
                self.run_start = None
        return events

    def _event(self, state: str) -> AlarmEvent:
        start_slot = self.run_start if state == "active" else None
        start = start_slot * self.period if start_slot is not None else self.active.start
        return AlarmEvent(
            alarm_id=alarm_id(self.asset, self.class_name, start, self.model_id),
            asset=self.asset,
            class_name=self.class_name,
            state=state,
            start=start,
            end=self.active_last * self.period,
            peak_score=float(self.run_peak),
            model_id=self.model_id,
            threshold=self.on,
        )

    def interrupt(self) -> list:
        """The stream broke off (a long gap): clear an active alarm and forget the run."""
        self.run_start = None
        if self.active is None:
            return []
        event = self._event("cleared")
        self.active = None
        return [event]
