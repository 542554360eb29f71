"""Alarms: ensembled scores to raise and clear events, and the operator's view of them.

Two layers, on two clocks:

- ``AlarmTracker`` decides, on sample time, when an alarm of one (asset, class) is raised
  and cleared. The offline evaluation and the MQTT service drive the same tracker, so a
  replay gives the same alarms at any speed.
- ``AlarmBoard`` holds, on the wall clock, what an operator sees: the active alarms, their
  acknowledgement, and the shelved classes. Operator commands (``parse_command``) change it;
  the service stores and publishes what it returns.

Raise and clear (``AlarmTracker``): an alarm is raised when the score of consecutive final
slots stays at or above ``threshold`` for ``min_duration`` (the on-delay); it starts at the
first of those slots. It stays active while the score stays at or above the clear level
``threshold - hysteresis`` (the deadband), and clears once the score has stayed below the
clear level for ``off_delay`` (at the first slot below when ``off_delay`` is 0). The alarm
ends at the last slot at or above the clear level. A masked slot (missing data, or never
scored) counts as below, and so does a slot that never arrived: a gap never raises an alarm
and never holds one open longer than the off-delay.

Alarm ids are UUID 5 of the asset, class, start time and model id, so a replay of the same
data through the same model gives the same ids.

Acknowledgement and shelving (``AlarmBoard``) follow ISA-18.2: they are attributes of an
alarm, separate from its state. An acknowledged alarm stays active until its score clears
it. A shelved class raises no announced alarm until the shelve ends (by command or when it
expires); its alarms are still tracked and stored. A shelve always has an end, at most
``max_shelve`` ahead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from typing import Callable

import numpy as np

from agent.timeutil import TimestampError, parse_duration, parse_timestamp, to_iso

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
    """The alarm state of one (asset, class), on sample time."""

    def __init__(
        self,
        asset: str,
        class_name: str,
        model_id: str,
        sample_period: float,
        threshold: float,
        hysteresis: float,
        min_duration: float,
        off_delay: float = 0.0,
    ):
        self.asset = asset
        self.class_name = class_name
        self.model_id = model_id
        self.period = sample_period
        self.on = threshold
        self.off = max(0.0, threshold - hysteresis)
        self.min_slots = max(1, int(round(min_duration / sample_period)))
        # The alarm clears at slot s below the clear level when s - last_above >= off_slots.
        self.off_slots = max(1, int(math.ceil(off_delay / sample_period - 1e-9)))
        self.run_start: int | None = None
        self.run_length = 0
        self.run_peak = 0.0
        self.active: AlarmEvent | None = None
        self.active_last = 0
        self.resumed: AlarmEvent | None = None

    def update(self, slots: np.ndarray, scores: np.ndarray, masked: np.ndarray) -> list:
        """Feed final slots in order; return the raise and clear events they cause."""
        events: list[AlarmEvent] = []
        values = np.where(masked, -1.0, np.nan_to_num(scores, nan=-1.0))
        for slot, score in zip(slots.tolist(), values.tolist()):
            if self.resumed is not None and slot > self._slot(self.resumed.end):
                events += self._take_resumed()

            # An active alarm: held in the deadband, waiting out the off-delay, or cleared.
            if self.active is not None:
                if slot - self.active_last > self.off_slots:
                    events.append(self._clear())  # slots that never came were below
                elif score >= self.off:
                    self.active_last = slot
                    self.run_peak = max(self.run_peak, score)
                    continue
                elif slot - self.active_last >= self.off_slots:
                    events.append(self._clear())
                else:
                    continue

            # No active alarm: count the run above the threshold against the on-delay.
            if score >= self.on:
                if self.run_start is None:
                    self.run_start, self.run_length, self.run_peak = slot, 0, 0.0
                self.run_length += 1
                self.run_peak = max(self.run_peak, score)
                if self.run_length >= self.min_slots:
                    events.append(self._raise(slot))
            else:
                self.run_start = None
        return events

    def resume(self, event: AlarmEvent) -> None:
        """Take over an alarm that was active when the agent last stopped.

        The alarm continues (same id) with the first final slot after its last slot above
        the clear level; the slots between count as below, so it clears when they span the
        off-delay. Older slots (a replay of earlier data) leave it waiting.
        """
        self.resumed = event

    def interrupt(self) -> list:
        """The stream broke off (a long gap, or a new model): clear the active alarm (and
        one resumed from the last run and not yet taken over), and forget the run."""
        self.run_start = None
        events = []
        if self.resumed is not None:
            if self.active is None or self.active.alarm_id != self.resumed.alarm_id:
                events.append(dataclasses.replace(self.resumed, state="cleared"))
            self.resumed = None
        if self.active is not None:
            events.append(self._clear())
        return events

    def current(self) -> AlarmEvent | None:
        """The active alarm as it stands (its last slot above and peak so far), or None."""
        if self.active is None:
            return None
        return dataclasses.replace(self.active, end=self.active_last * self.period,
                                   peak_score=float(self.run_peak))

    def _slot(self, seconds: float) -> int:
        return int(round(seconds / self.period))

    def _raise(self, slot: int) -> AlarmEvent:
        start = self.run_start * self.period
        self.active = AlarmEvent(
            alarm_id=alarm_id(self.asset, self.class_name, start, self.model_id),
            asset=self.asset,
            class_name=self.class_name,
            state="active",
            start=start,
            end=slot * self.period,
            peak_score=float(self.run_peak),
            model_id=self.model_id,
            threshold=self.on,
        )
        self.active_last = slot
        self.run_start = None
        return self.active

    def _clear(self) -> AlarmEvent:
        event = dataclasses.replace(self.current(), state="cleared")
        self.active = None
        return event

    def _take_resumed(self) -> list:
        resumed, self.resumed = self.resumed, None
        if self.active is None:
            self.active = resumed
            self.active_last = self._slot(resumed.end)
            self.run_peak = resumed.peak_score
            self.run_start = None
            return []
        if self.active.alarm_id == resumed.alarm_id:
            return []  # the replayed data raised the same alarm again
        return [dataclasses.replace(resumed, state="cleared")]


# Operator commands ---------------------------------------------------------------------

COMMANDS = ("ack", "shelve", "unshelve")
MAX_COMMAND_BYTES = 4096
MAX_OPERATOR_LENGTH = 128
_COMMAND_KEYS = {
    "ack": {"command", "alarm_id", "class", "by"},
    "shelve": {"command", "alarm_id", "class", "by", "until", "duration"},
    "unshelve": {"command", "alarm_id", "class", "by"},
}


class CommandError(ValueError):
    """A command refused; ``reason`` is a short counter name, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Command:
    """A valid operator command for one asset; exactly one of alarm_id and class_name."""

    command: str
    by: str
    alarm_id: str | None = None
    class_name: str | None = None
    until: float | None = None  # shelve: wall-clock epoch seconds


def parse_command(payload: bytes, now: float, max_shelve: float) -> Command:
    """Validate a command payload; raise CommandError with the reason it is refused."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError("oversized", f"{len(payload)} bytes > {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommandError("not_utf8", "the payload is not UTF-8") from None
    except ValueError as exc:
        raise CommandError("malformed_json", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("not_an_object", "a command is a JSON object")

    command = doc.get("command")
    if command not in COMMANDS:
        raise CommandError("unknown_command", f"'command' must be one of {', '.join(COMMANDS)}"
                           f", not {command!r}")
    unknown = sorted(set(doc) - _COMMAND_KEYS[command])
    if unknown:
        raise CommandError("unknown_key", f"{command}: unknown key {unknown[0]!r}; allowed: "
                           f"{', '.join(sorted(_COMMAND_KEYS[command]))}")

    by = doc.get("by")
    if not isinstance(by, str) or not by.strip() or len(by) > MAX_OPERATOR_LENGTH:
        raise CommandError("no_operator", f"'by' must name who sends the command (a string of "
                           f"1 to {MAX_OPERATOR_LENGTH} characters)")
    target = {key: doc[key] for key in ("alarm_id", "class") if doc.get(key) is not None}
    if len(target) != 1 or not all(isinstance(v, str) and v for v in target.values()):
        raise CommandError("bad_target", "give exactly one of 'alarm_id' and 'class' (strings)")

    until = None
    if command == "shelve":
        until = _shelve_until(doc, now, max_shelve)
    return Command(command, by.strip(), alarm_id=target.get("alarm_id"),
                   class_name=target.get("class"), until=until)


def _shelve_until(doc: dict, now: float, max_shelve: float) -> float:
    if ("until" in doc) == ("duration" in doc):
        raise CommandError("bad_duration", "shelve needs exactly one of 'until' (a time) and "
                           "'duration' (seconds or like '2h')")
    try:
        if "until" in doc:
            until = parse_timestamp(doc["until"])
        else:
            until = now + parse_duration(doc["duration"])
    except (TimestampError, ValueError) as exc:
        raise CommandError("bad_duration", str(exc)) from None
    if not math.isfinite(until) or until <= now:
        raise CommandError("bad_duration", "the shelve would end in the past")
    if until - now > max_shelve + 1e-6:
        raise CommandError("shelve_too_long", f"a shelve may last at most {max_shelve:g} s "
                           "(max_shelve)")
    return until


# The operator's picture ----------------------------------------------------------------

@dataclasses.dataclass
class BoardAlarm:
    """An alarm as the operator sees it: its last event, acknowledgement, announcement."""

    event: AlarmEvent  # the raise while active; the clear once cleared
    acked_by: str | None = None
    acked_at: float | None = None
    suppressed: bool = False  # raised while its class was shelved: not announced (yet)

    @property
    def alarm_id(self) -> str:
        return self.event.alarm_id

    @property
    def asset(self) -> str:
        return self.event.asset

    @property
    def class_name(self) -> str:
        return self.event.class_name

    @property
    def state(self) -> str:
        return self.event.state


@dataclasses.dataclass(frozen=True)
class Shelve:
    """A shelved class of an asset, from ``at`` until ``until`` (wall clock)."""

    asset: str
    class_name: str
    by: str
    at: float
    until: float


@dataclasses.dataclass(frozen=True)
class Ack:
    """Effect: an alarm was acknowledged."""

    alarm: BoardAlarm
    by: str
    at: float

    def to_message(self) -> dict:
        return {"event": "ack", "alarm_id": self.alarm.alarm_id, "asset": self.alarm.asset,
                "class": self.alarm.class_name, "state": self.alarm.state, "by": self.by,
                "at": to_iso(self.at)}


@dataclasses.dataclass(frozen=True)
class ShelveChange:
    """Effect: a class was shelved (``shelved``), or its shelve ended.

    An ended shelve names who ended it (None when it expired) and the alarms of the class
    that are still active and were never announced: they are announced now.
    """

    shelve: Shelve
    shelved: bool
    at: float
    by: str | None = None
    reason: str = "command"  # "command", "expired" or "replaced"
    released: tuple[BoardAlarm, ...] = ()

    def to_message(self) -> dict:
        message = {"event": "shelve" if self.shelved else "unshelve",
                   "asset": self.shelve.asset, "class": self.shelve.class_name,
                   "by": self.shelve.by if self.shelved else self.by, "at": to_iso(self.at),
                   "until": to_iso(self.shelve.until)}
        if not self.shelved:
            message["reason"] = self.reason
        return message


class AlarmBoard:
    """Active alarms, acknowledgements and shelves of one agent, on the wall clock.

    No I/O: the service restores the board from the database, applies what the trackers
    raise and clear, and stores and publishes the effects that commands return.
    """

    def __init__(self, classes: dict[str, list[str]]):
        self.classes = {asset: list(names) for asset, names in classes.items()}
        self.active: dict[str, BoardAlarm] = {}
        self.shelves: dict[tuple[str, str], Shelve] = {}

    def restore(self, alarms: list[BoardAlarm], shelves: list[Shelve]) -> None:
        for alarm in alarms:
            self.active[alarm.alarm_id] = alarm
        for shelve in shelves:
            self.shelves[(shelve.asset, shelve.class_name)] = shelve

    def is_shelved(self, asset: str, class_name: str, now: float) -> bool:
        shelve = self.shelves.get((asset, class_name))
        return shelve is not None and now < shelve.until

    def classify(self, event: AlarmEvent, now: float) -> BoardAlarm:
        """The alarm of a tracker's raise or clear, as it would stand on the board.

        A raise while its class is shelved is ``suppressed`` (not announced); a clear keeps
        what its raise was. Nothing changes until ``apply``.
        """
        known = self.active.get(event.alarm_id)
        if known is None:
            return BoardAlarm(event, suppressed=(
                event.state == "active" and self.is_shelved(event.asset, event.class_name, now)))
        return dataclasses.replace(known, event=event)

    def apply(self, alarm: BoardAlarm) -> None:
        """Put a raised alarm on the board, or take a cleared one off."""
        if alarm.state == "active":
            self.active[alarm.alarm_id] = alarm
        else:
            self.active.pop(alarm.alarm_id, None)

    def command(self, asset: str, command: Command, now: float,
                lookup: Callable[[str], BoardAlarm | None]) -> list:
        """Apply a command sent on ``asset``'s command topic; return its effects.

        ``lookup`` finds an alarm that is no longer active (in the database). A command that
        changes nothing (a second ack, an unshelve of a class not shelved) returns no effect.
        """
        if command.alarm_id is not None:
            alarm = self.active.get(command.alarm_id) or lookup(command.alarm_id)
            if alarm is None or alarm.asset != asset:
                raise CommandError("unknown_alarm", f"asset {asset} has no alarm "
                                   f"{command.alarm_id!r}")
            class_name, targets = alarm.class_name, [alarm]
        else:
            class_name = command.class_name
            if class_name not in self.classes.get(asset, ()):
                raise CommandError("unknown_class", f"asset {asset} has no class "
                                   f"{class_name!r}; classes: "
                                   f"{', '.join(self.classes.get(asset, ()))}")
            targets = [a for a in self.active.values()
                       if a.asset == asset and a.class_name == class_name]

        if command.command == "ack":
            return [self._ack(alarm, command.by, now) for alarm in targets
                    if alarm.acked_by is None]
        if command.command == "shelve":
            return self._shelve(Shelve(asset, class_name, command.by, now, command.until), now)
        return self._unshelve(asset, class_name, now, command.by, "command")

    def expire(self, now: float) -> list:
        """End the shelves whose time is up; return their effects."""
        effects = []
        for (asset, class_name), shelve in list(self.shelves.items()):
            if now >= shelve.until:
                effects += self._unshelve(asset, class_name, now, None, "expired")
        return effects

    def picture(self, asset: str, now: float) -> dict:
        """What the retained state topic shows for ``asset`` (without sample times)."""
        alarms = sorted((a for a in self.active.values() if a.asset == asset),
                        key=lambda a: (a.event.start, a.class_name))
        shelves = sorted((s for s in self.shelves.values() if s.asset == asset),
                         key=lambda s: s.class_name)
        return {
            "active_alarms": [{
                "alarm_id": a.alarm_id, "class": a.class_name, "state": a.state,
                "start": to_iso(a.event.start), "model_id": a.event.model_id,
                "acked": a.acked_by is not None, "acked_by": a.acked_by,
                "acked_at": to_iso(a.acked_at) if a.acked_at is not None else None,
                "shelved": self.is_shelved(asset, a.class_name, now),
            } for a in alarms],
            "shelved_classes": [{"class": s.class_name, "by": s.by, "at": to_iso(s.at),
                                 "until": to_iso(s.until)} for s in shelves],
        }

    def _ack(self, alarm: BoardAlarm, by: str, now: float) -> Ack:
        alarm.acked_by, alarm.acked_at = by, now
        return Ack(dataclasses.replace(alarm), by, now)

    def _shelve(self, shelve: Shelve, now: float) -> list:
        key = (shelve.asset, shelve.class_name)
        old = self.shelves.get(key)
        if old is not None and old.until == shelve.until:
            return []  # the same shelve again (a redelivered command)
        effects = []
        if old is not None:
            effects.append(ShelveChange(old, False, now, shelve.by, "replaced"))
        self.shelves[key] = shelve
        return effects + [ShelveChange(shelve, True, now)]

    def _unshelve(self, asset: str, class_name: str, now: float, by: str | None,
                  reason: str) -> list:
        shelve = self.shelves.pop((asset, class_name), None)
        if shelve is None:
            return []
        released = []
        for alarm in self.active.values():
            if alarm.asset == asset and alarm.class_name == class_name and alarm.suppressed:
                alarm.suppressed = False
                released.append(dataclasses.replace(alarm))
        return [ShelveChange(shelve, False, now, by, reason, tuple(released))]
