"""The alarm store: SQLite through SQLAlchemy 2.

Two tables:

- ``alarms``: one row per alarm, its current state, start, end and peak score;
- ``alarm_events``: one row per raise and per clear, with the exact JSON published on MQTT
  and ``published_at`` once the broker acknowledged it (the outbox). ``(alarm_id, state)``
  is unique, so a replayed window never stores or publishes an event twice.

Each event is committed before it is published. The schema is described in
``docs/mqtt-and-database.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from sqlalchemy import (Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event, func, select)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.alarms import AlarmEvent
from agent.timeutil import to_iso

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


class AlarmRow(Base):
    __tablename__ = "alarms"

    alarm_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    asset: Mapped[str] = mapped_column(String(128), index=True)
    class_name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    start_utc: Mapped[str] = mapped_column(String(32), index=True)
    end_utc: Mapped[str | None] = mapped_column(String(32))
    start_ts: Mapped[float] = mapped_column(Float)
    end_ts: Mapped[float] = mapped_column(Float)
    peak_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    model_id: Mapped[str] = mapped_column(String(128))
    raised_at: Mapped[str] = mapped_column(String(32))
    cleared_at: Mapped[str | None] = mapped_column(String(32))


class AlarmEventRow(Base):
    __tablename__ = "alarm_events"
    __table_args__ = (UniqueConstraint("alarm_id", "state", name="uq_alarm_event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alarm_id: Mapped[str] = mapped_column(ForeignKey("alarms.alarm_id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str] = mapped_column(String(256))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))
    published_at: Mapped[str | None] = mapped_column(String(32), index=True)


def alarm_payload(alarm: AlarmEvent) -> str:
    """The JSON published for an alarm event, byte for byte as stored in the outbox."""
    return json.dumps(alarm.to_message(), separators=(",", ":"))


def _now() -> str:
    return to_iso(dt.datetime.now(dt.timezone.utc).timestamp())


class AlarmStore:
    """Alarms and the outbox of alarm events in one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path}")
        event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    def record(self, alarm: AlarmEvent, topic: str) -> int | None:
        """Commit an alarm event and return its outbox id; None if it was stored already."""
        payload = alarm_payload(alarm)
        now = _now()
        with Session(self.engine) as session:
            row = session.get(AlarmRow, alarm.alarm_id)
            if row is None:
                row = AlarmRow(
                    alarm_id=alarm.alarm_id, asset=alarm.asset, class_name=alarm.class_name,
                    start_utc=to_iso(alarm.start), start_ts=alarm.start,
                    threshold=alarm.threshold, model_id=alarm.model_id, raised_at=now,
                    state=alarm.state, end_ts=alarm.end, peak_score=alarm.peak_score,
                )
                session.add(row)
                session.flush()  # the alarm row first: alarm_events refers to it
            elif row.state == "cleared" and alarm.state == "active":
                return None  # a replay of a raise after its clear: nothing new
            row.state = alarm.state
            row.end_ts = alarm.end
            row.peak_score = max(row.peak_score, alarm.peak_score)
            if alarm.state == "cleared":
                row.end_utc, row.cleared_at = to_iso(alarm.end), now
            outbox = AlarmEventRow(alarm_id=alarm.alarm_id, state=alarm.state, topic=topic,
                                   payload=payload, created_at=now)
            session.add(outbox)
            try:
                session.commit()
            except IntegrityError as exc:
                session.rollback()
                log.debug("alarm event %s/%s already stored: %s", alarm.alarm_id, alarm.state,
                          exc.orig)
                return None
            return outbox.id

    def mark_published(self, outbox_ids: list[int]) -> None:
        if not outbox_ids:
            return
        with Session(self.engine) as session:
            rows = session.scalars(select(AlarmEventRow).where(AlarmEventRow.id.in_(outbox_ids)))
            now = _now()
            for row in rows:
                row.published_at = now
            session.commit()

    def pending(self) -> list[AlarmEventRow]:
        """Outbox events not yet acknowledged by the broker, oldest first."""
        with Session(self.engine) as session:
            query = (select(AlarmEventRow).where(AlarmEventRow.published_at.is_(None))
                     .order_by(AlarmEventRow.id))
            return list(session.scalars(query))

    def pending_count(self) -> int:
        with Session(self.engine) as session:
            query = select(func.count()).where(AlarmEventRow.published_at.is_(None))
            return int(session.scalar(query.select_from(AlarmEventRow)))

    def alarms(self) -> list[AlarmRow]:
        with Session(self.engine) as session:
            return list(session.scalars(select(AlarmRow).order_by(AlarmRow.start_ts)))

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
