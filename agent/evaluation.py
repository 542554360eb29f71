"""Event-level scoring of alarms against labelled events.

An event is detected when an alarm overlaps its label window; an alarm that overlaps no
label window is a false alarm. Events with no data in their window are not counted.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from agent.datasets import Event, Series


@dataclasses.dataclass(frozen=True)
class EventResult:
    event: Event
    detected: bool
    alarms: list  # (start, end) of the alarms that overlap the window


@dataclasses.dataclass(frozen=True)
class EventScore:
    events: list[EventResult]
    false_alarms: list  # (start, end)
    n_alarms: int

    @property
    def detected(self) -> int:
        return sum(result.detected for result in self.events)

    def line(self, database: str | None = None) -> str:
        text = (f"detected {self.detected} of {len(self.events)} labelled events, "
                f"{len(self.false_alarms)} false alarms")
        return f"{text}, {self.n_alarms} alarms in {database}" if database else text


def events_with_data(events: list[Event], series: Series, lo: float, hi: float) -> list[Event]:
    """Events whose label window lies in [lo, hi) and holds at least one valid sample."""
    kept = []
    valid_ts = series.ts[np.isfinite(series.values).any(axis=1)]
    for event in events:
        if not (lo <= event.window_start and event.window_end < hi):
            continue
        inside = (valid_ts >= event.window_start) & (valid_ts <= event.window_end)
        if inside.any():
            kept.append(event)
    return kept


def score_events(alarms: list[tuple[float, float]], events: list[Event]) -> EventScore:
    """Match alarms ``(start, end)`` (epoch seconds, inclusive) to events."""
    results = []
    for event in events:
        hits = [a for a in alarms if a[0] <= event.window_end and a[1] >= event.window_start]
        results.append(EventResult(event, bool(hits), hits))
    false = [a for a in alarms
             if not any(a[0] <= e.window_end and a[1] >= e.window_start for e in events)]
    return EventScore(results, false, len(alarms))
