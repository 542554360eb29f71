"""Delivery of the outbox: committed events out to the broker, in commit order, until PUBACK.

Every event (alarm raise and clear, ack, shelve, unshelve) is first committed to the store;
then it is published with QoS 1 and stays pending until the broker's PUBACK marks it
published. While the agent is offline nothing is sent; at each connection the pending
events go out oldest first, before any newer one. Events that paho was still sending when
the connection dropped are sent again by paho itself on the next connection (MQTT requires
it), so they are not queued a second time.

When the database cannot be written (disk full, I/O errors, a lock held elsewhere), an event
is published anyway, counted in ``db_errors``, and kept in memory; the write is tried again
every ``RETRY_INTERVAL`` seconds, in order, and an event the broker already acknowledged is
then stored as published. Events held only in memory are lost if the agent dies before the
database recovers, and a replay cannot be recognised as such while the database is down
(its alarms are published again, with the same ids).

All methods run on the agent's worker thread; paho's network thread only queues PUBACKs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from agent.store import AlarmStore, OutboxItem

log = logging.getLogger(__name__)

RETRY_INTERVAL = 5.0
LOG_INTERVAL = 60.0

# write(published) commits an event and returns what to publish (None: stored already).
Write = Callable[[bool], "list[OutboxItem] | None"]


@dataclasses.dataclass(eq=False)
class _Unstored:
    """An event the database refused: kept in memory until a write succeeds."""

    write: Write
    topic: str
    payload: str
    publish: bool
    acked: bool = False
    outbox_id: int | None = None


class Outbox:
    """Commit-then-publish of events, PUBACK tracking, and the backlog after an outage.

    ``publish(topic, payload)`` hands a QoS 1 message to the MQTT client and returns its
    message id, or None when the client did not take it; ``online()`` says whether the
    client is connected.
    """

    def __init__(self, store: AlarmStore, publish: Callable[[str, str], int | None],
                 online: Callable[[], bool], counters: collections.Counter):
        self.store = store
        self.publish = publish
        self.online = online
        self.counters = counters
        self.inflight: dict[int, int | _Unstored] = {}  # message id -> outbox id or entry
        self.unstored: list[_Unstored] = []
        self.synced = False  # no older event waits: new events may be sent at once
        self._to_mark: list[int] = []
        self._next_retry = 0.0
        self._last_log = -1e9

    def submit(self, write: Write, topic: str, payload: str, publish: bool = True) -> str:
        """Commit an event, then publish it; ``stored``, ``duplicate`` or ``unstored``."""
        entry = _Unstored(write, topic, payload, publish)
        if self.unstored and not self._retry_unstored():
            return self._keep(entry)
        try:
            items = write(False)
        except SQLAlchemyError as exc:
            self._db_failed(exc)
            return self._keep(entry)
        if items is None:
            return "duplicate"
        for item in items:
            self._send(item.topic, item.payload, item.id, in_order=True)
        return "stored"

    def submit_many(self, entries: list[tuple[Write, str, str, bool]],
                    write_all: Callable[[], "list[list[OutboxItem] | None]"]) \
            -> list[str] | None:
        """Group commit: ``write_all()`` commits every event of ``entries`` (each ``(write,
        topic, payload, publish)``, as ``submit`` takes them) in one transaction; then they
        are published in order. Per entry what ``submit`` returns; None when the group was
        refused whole (an ``IntegrityError``, rolled back): the caller submits one by one."""
        if self.unstored and not self._retry_unstored():
            return [self._keep(_Unstored(*entry)) for entry in entries]
        try:
            results = write_all()
        except IntegrityError:
            return None
        except SQLAlchemyError as exc:
            self._db_failed(exc)
            return [self._keep(_Unstored(*entry)) for entry in entries]
        statuses = []
        for items in results:
            if items is None:
                statuses.append("duplicate")
                continue
            for item in items:
                self._send(item.topic, item.payload, item.id, in_order=True)
            statuses.append("stored")
        return statuses

    def on_connected(self) -> None:
        """A (re)connection: send the backlog in commit order, then allow direct sends."""
        waiting = set(self.inflight.values())
        try:
            backlog = self.store.pending()
        except SQLAlchemyError as exc:
            self._db_failed(exc)
            backlog = []
        sent = 0
        for item in backlog:
            if item.id not in waiting:
                if not self._send(item.topic, item.payload, item.id, in_order=False):
                    return
                sent += 1
        for entry in self.unstored:
            if entry.publish and not entry.acked and entry not in waiting:
                if not self._send(entry.topic, entry.payload, entry, in_order=False):
                    return
                sent += 1
        if sent:
            log.info("publishing %d pending event(s) in commit order", sent)
        self.synced = True

    def forget_inflight(self) -> None:
        """A new MQTT client: the old one's message ids mean nothing; what they carried is
        still pending and goes out again at the next connection."""
        self.inflight.clear()
        self.synced = False

    def on_refused(self, mid: int) -> None:
        """The broker refused a message (MQTT 5): it stays pending for the next connection."""
        self.inflight.pop(mid, None)

    def on_puback(self, mid: int) -> None:
        key = self.inflight.pop(mid, None)
        if isinstance(key, int):
            self._to_mark.append(key)
        elif key is not None:
            key.acked = True
            if key.outbox_id is not None:
                self._to_mark.append(key.outbox_id)

    def tick(self) -> None:
        """Mark acknowledged events published; retry the writes that failed."""
        if self._to_mark:
            try:
                self.store.mark_published(self._to_mark)
                self._to_mark = []
            except SQLAlchemyError as exc:
                self._db_failed(exc)
        if self.unstored:
            self._retry_unstored()

    def retry_writes(self) -> None:
        """Try the held writes now (at shutdown), whatever the retry interval says."""
        if self.unstored:
            self._next_retry = 0.0
            self._retry_unstored()

    def pending_count(self) -> int:
        """Events not yet acknowledged by the broker (stored or held in memory)."""
        held = sum(1 for e in self.unstored if e.publish and not e.acked)
        try:
            return self.store.pending_count() + held
        except SQLAlchemyError as exc:
            self._db_failed(exc)
            return held

    def _keep(self, entry: _Unstored) -> str:
        self.unstored.append(entry)
        if entry.publish:
            self._send(entry.topic, entry.payload, entry, in_order=True)
        return "unstored"

    def _send(self, topic: str, payload: str, key, in_order: bool) -> bool:
        """Publish one event; ``in_order``: only if no older event is waiting."""
        if (in_order and not self.synced) or not self.online():
            self.synced = False
            return False
        mid = self.publish(topic, payload)
        if mid is None:
            self.synced = False
            return False
        self.inflight[mid] = key
        return True

    def _retry_unstored(self) -> bool:
        """Write the events held in memory, in order; True once none is left."""
        now = time.monotonic()
        if now < self._next_retry:
            return False
        stored = 0
        while self.unstored:
            entry = self.unstored[0]
            try:
                items = entry.write(entry.acked)
            except SQLAlchemyError as exc:
                self._db_failed(exc)
                return False
            self.unstored.pop(0)
            stored += 1
            if items is None or entry.acked:
                continue
            self._adopt(entry, items)
        log.warning("database writable again: %d event(s) held in memory are stored", stored)
        return True

    def _adopt(self, entry: _Unstored, items: list[OutboxItem]) -> None:
        """A held event is now stored: track it by its outbox id from here on."""
        for mid, key in self.inflight.items():
            if key is entry:
                entry.outbox_id = items[0].id if items else None
                self.inflight[mid] = entry.outbox_id if items else entry
                return
        for item in items:
            if entry.publish:
                self._send(item.topic, item.payload, item.id, in_order=True)

    def _db_failed(self, exc: SQLAlchemyError) -> None:
        self.counters["db_errors"] += 1
        self._next_retry = time.monotonic() + RETRY_INTERVAL
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            reason = getattr(exc, "orig", None) or exc
            log.error("database %s cannot be written (%s); alarms are published anyway and "
                      "kept in memory (%d held); retrying every %g s",
                      self.store.path, reason, len(self.unstored), RETRY_INTERVAL)
