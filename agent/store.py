"""The alarm store: SQLite through SQLAlchemy 2.

Three tables (schema version 2, in ``PRAGMA user_version``):

- ``alarms``: one row per alarm: its state, start, end, peak score, acknowledgement, and
  whether it was raised while its class was shelved;
- ``shelves``: one row per shelve of an (asset, class), with how and when it ended;
- ``alarm_events``: the outbox: one row per raise, clear, ack, shelve and unshelve, with the
  exact JSON published on MQTT and ``published_at`` once the broker acknowledged it.
  ``(alarm_id, state)`` is unique, so a replayed window never stores or publishes an event
  twice.

Each event is committed (``synchronous=FULL``) before it is published. The database runs in
WAL mode with a bounded WAL (``journal_size_limit``, and ``maintain`` truncates it);
``maintain`` also deletes rows older than the retention. At open, ``PRAGMA quick_check`` (or
``integrity_check``) runs; a damaged database is moved aside with a timestamp and a fresh
one created. A file that does not start with the SQLite header is refused instead: it is
more likely a wrong path than a damaged database, and the agent moves only its own files.

A damaged database loses what it held: the alarms that were active, the acknowledgements,
the shelves, and the events not yet published (``sqlite3 FILE .recover`` may save some of
them by hand). The schema is described in ``docs/mqtt-and-database.md``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from sqlalchemy import (Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint,
                        bindparam, create_engine, delete, event, func, inspect, select, text,
                        update)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from agent.alarms import Ack, AlarmEvent, BoardAlarm, Shelve, ShelveChange
from agent.timeutil import parse_timestamp, to_iso

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
SQLITE_HEADER = b"SQLite format 3\x00"
CHECKS = ("quick", "full")
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes of WAL kept after a checkpoint
BUSY_TIMEOUT_MS = 2000  # how long a write waits for a lock held by another process


class StoreError(RuntimeError):
    """The database cannot be used; the message says what to fix."""


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
    acked_by: Mapped[str | None] = mapped_column(String(128))
    acked_at: Mapped[str | None] = mapped_column(String(32))
    shelved: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))


class ShelveRow(Base):
    __tablename__ = "shelves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset: Mapped[str] = mapped_column(String(128), index=True)
    class_name: Mapped[str] = mapped_column(String(128))
    shelved_by: Mapped[str] = mapped_column(String(128))
    shelved_at: Mapped[str] = mapped_column(String(32))
    shelved_ts: Mapped[float] = mapped_column(Float)
    until_utc: Mapped[str] = mapped_column(String(32))
    until_ts: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[str | None] = mapped_column(String(32))
    ended_by: Mapped[str | None] = mapped_column(String(128))
    end_reason: Mapped[str | None] = mapped_column(String(16))


class AlarmEventRow(Base):
    __tablename__ = "alarm_events"
    __table_args__ = (UniqueConstraint("alarm_id", "state", name="uq_alarm_event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alarm_id: Mapped[str | None] = mapped_column(ForeignKey("alarms.alarm_id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str] = mapped_column(String(256))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))
    published_at: Mapped[str | None] = mapped_column(String(32), index=True)
    suppressed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("0"))


@dataclasses.dataclass(frozen=True)
class OutboxItem:
    """A committed event to publish: outbox id, topic and payload."""

    id: int
    topic: str
    payload: str


def alarm_payload(alarm: AlarmEvent) -> str:
    """The JSON published for an alarm event, byte for byte as stored in the outbox."""
    return json.dumps(alarm.to_message(), separators=(",", ":"))


def _now() -> str:
    return to_iso(dt.datetime.now(dt.timezone.utc).timestamp())


class AlarmStore:
    """Alarms, shelves and the outbox of events in one SQLite file.

    ``moved_aside`` is the path the damaged database was moved to at open, or None.
    """

    def __init__(self, path: str | Path, check: str = "quick"):
        self.path = Path(path)
        self.moved_aside: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        problem = check_database(self.path, check)
        if problem is not None:
            self.moved_aside = move_aside(self.path)
            log.error("DATABASE DAMAGED: %s failed its integrity check (%s). It was moved "
                      "aside to %s and a fresh database was created; the alarms, shelves and "
                      "unpublished events it held are not carried over (sqlite3 '%s' .recover "
                      "may save some)", self.path, problem, self.moved_aside,
                      self.moved_aside)
        self.engine = create_engine(f"sqlite:///{self.path}")
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._create_schema()

    # Writes: each commits an outbox event and returns what to publish -------------------

    def record(self, alarm: AlarmEvent, topic: str, suppressed: bool = False,
               published: bool = False) -> list[OutboxItem] | None:
        """Commit a raise or clear; None if it was stored already.

        ``suppressed``: a raise while its class is shelved, stored but not to be published
        (the clear of such an alarm is suppressed too). A raise stored suppressed and
        recorded again unsuppressed (its shelve ended) becomes due for publishing.
        ``published``: the broker already acknowledged it (stored after a database outage).
        """
        try:
            return self._record_all([(alarm, topic, suppressed)], published)[0]
        except IntegrityError as exc:  # stored meanwhile by another writer
            log.debug("event %s/%s already stored: %s", alarm.alarm_id, alarm.state, exc.orig)
            return None

    def record_many(self, alarms: list[tuple[AlarmEvent, str, bool]]) -> \
            list[list[OutboxItem] | None]:
        """Commit several raises and clears, ``(alarm, topic, suppressed)`` each, in order
        and in ONE transaction (group commit: one ``synchronous=FULL`` sync for all); per
        alarm what ``record`` returns. An ``IntegrityError`` (an event stored meanwhile by
        another writer) rolls back all of them and is raised: record them one by one."""
        return self._record_all(alarms, False)

    def _record_all(self, alarms: list[tuple[AlarmEvent, str, bool]],
                    published: bool) -> list[list[OutboxItem] | None]:
        """``record`` for each alarm, in one transaction, with SQLAlchemy Core statements
        (the ORM's unit of work costs about a millisecond per event)."""
        ids = list({alarm.alarm_id for alarm, _, _ in alarms})
        alarms_table, events_table = AlarmRow.__table__, AlarmEventRow.__table__
        with self.engine.begin() as conn:
            rows, stored = {}, {}
            for lo in range(0, len(ids), 500):  # under SQLite's limit of bound variables
                chunk = ids[lo:lo + 500]
                for r in conn.execute(select(alarms_table).where(
                        alarms_table.c.alarm_id.in_(chunk))):
                    rows[r.alarm_id] = dict(r._mapping)
                for r in conn.execute(select(events_table).where(
                        events_table.c.alarm_id.in_(chunk))):
                    stored[(r.alarm_id, r.state)] = dict(r._mapping)
            return [self._record_one(conn, rows, stored, alarm, topic, suppressed, published)
                    for alarm, topic, suppressed in alarms]

    @staticmethod
    def _record_one(conn, rows: dict, stored: dict, alarm: AlarmEvent, topic: str,
                    suppressed: bool, published: bool) -> list[OutboxItem] | None:
        """One raise or clear, given the alarm rows and events read (``rows``, ``stored``,
        kept up to date here for the next alarms of the same transaction)."""
        alarms_table, events_table = AlarmRow.__table__, AlarmEventRow.__table__
        payload = alarm_payload(alarm)
        now = _now()
        row = rows.get(alarm.alarm_id)
        changes = {"state": alarm.state, "end_ts": alarm.end, "peak_score": alarm.peak_score}
        if alarm.state == "cleared":
            changes.update(end_utc=to_iso(alarm.end), cleared_at=now)
        if row is None:
            row = dict(alarm_id=alarm.alarm_id, asset=alarm.asset, class_name=alarm.class_name,
                       start_utc=to_iso(alarm.start), start_ts=alarm.start,
                       threshold=alarm.threshold, model_id=alarm.model_id, raised_at=now,
                       end_utc=None, cleared_at=None, acked_by=None, acked_at=None,
                       shelved=suppressed and alarm.state == "active", **changes)
            conn.execute(alarms_table.insert(), row)
            rows[alarm.alarm_id] = row
        elif row["state"] == "cleared" and alarm.state == "active":
            return None  # a replay of a raise after its clear: nothing new
        else:
            event = stored.get((alarm.alarm_id, alarm.state))
            if event is not None:
                return _release(conn, row, event, suppressed)
            changes["peak_score"] = max(row["peak_score"], alarm.peak_score)
            conn.execute(alarms_table.update()
                         .where(alarms_table.c.alarm_id == alarm.alarm_id).values(**changes))
            row.update(changes)
        suppressed = bool(row["shelved"])
        event = dict(alarm_id=alarm.alarm_id, state=alarm.state, topic=topic, payload=payload,
                     created_at=now, published_at=now if published else None,
                     suppressed=suppressed)
        event["id"] = conn.execute(events_table.insert(), event).inserted_primary_key[0]
        stored[(alarm.alarm_id, alarm.state)] = event
        return [] if suppressed else [OutboxItem(event["id"], topic, payload)]

    def record_ack(self, ack: Ack, topic: str, payload: str,
                   published: bool = False) -> list[OutboxItem] | None:
        """Commit an acknowledgement; None if the alarm is unknown or acknowledged already."""
        with Session(self.engine) as session:
            row = session.get(AlarmRow, ack.alarm.alarm_id)
            if row is None or row.acked_by is not None:
                return None
            row.acked_by, row.acked_at = ack.by, to_iso(ack.at)
            return self._add_event(session, row.alarm_id, "acked", topic, payload, published,
                                   False)

    def record_shelve(self, change: ShelveChange, topic: str, payload: str,
                      published: bool = False) -> list[OutboxItem] | None:
        """Commit a shelve, or the end of one."""
        shelve = change.shelve
        with Session(self.engine) as session:
            if change.shelved:
                session.add(ShelveRow(
                    asset=shelve.asset, class_name=shelve.class_name, shelved_by=shelve.by,
                    shelved_at=to_iso(shelve.at), shelved_ts=shelve.at,
                    until_utc=to_iso(shelve.until), until_ts=shelve.until))
            else:
                session.execute(
                    update(ShelveRow)
                    .where(ShelveRow.asset == shelve.asset,
                           ShelveRow.class_name == shelve.class_name,
                           ShelveRow.ended_at.is_(None))
                    .values(ended_at=to_iso(change.at), ended_by=change.by,
                            end_reason=change.reason))
            state = "shelved" if change.shelved else "unshelved"
            return self._add_event(session, None, state, topic, payload, published, False)

    def save_progress(self, alarms: list[AlarmEvent]) -> None:
        """Store how far active alarms have got (last slot above, peak), so that an alarm
        resumed after a restart continues from there. Nothing is published."""
        if not alarms:
            return
        table = AlarmRow.__table__
        statement = (table.update()
                     .where(table.c.alarm_id == bindparam("b_id"), table.c.state == "active")
                     .values(end_ts=bindparam("b_end"),
                             peak_score=func.max(table.c.peak_score, bindparam("b_peak"))))
        with self.engine.begin() as conn:  # one statement, executed for every alarm
            conn.execute(statement, [{"b_id": a.alarm_id, "b_end": a.end, "b_peak": a.peak_score}
                                     for a in alarms])

    def mark_published(self, outbox_ids: list[int]) -> None:
        if not outbox_ids:
            return
        with Session(self.engine) as session:
            session.execute(update(AlarmEventRow).where(AlarmEventRow.id.in_(outbox_ids))
                            .values(published_at=_now()))
            session.commit()

    def _add_event(self, session: Session, alarm_id: str | None, state: str, topic: str,
                   payload: str, published: bool, suppressed: bool) -> list[OutboxItem] | None:
        now = _now()
        outbox = AlarmEventRow(alarm_id=alarm_id, state=state, topic=topic, payload=payload,
                               created_at=now, published_at=now if published else None,
                               suppressed=suppressed)
        session.add(outbox)
        try:
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            log.debug("event %s/%s already stored: %s", alarm_id, state, exc.orig)
            return None
        return [] if suppressed else [OutboxItem(outbox.id, topic, payload)]

    # Reads -------------------------------------------------------------------------------

    def pending(self) -> list[OutboxItem]:
        """Outbox events not yet acknowledged by the broker, in commit order."""
        with Session(self.engine) as session:
            query = (select(AlarmEventRow).where(AlarmEventRow.published_at.is_(None),
                                                 AlarmEventRow.suppressed.is_(False))
                     .order_by(AlarmEventRow.id))
            return [OutboxItem(r.id, r.topic, r.payload) for r in session.scalars(query)]

    def pending_count(self) -> int:
        with Session(self.engine) as session:
            query = select(func.count()).where(AlarmEventRow.published_at.is_(None),
                                               AlarmEventRow.suppressed.is_(False))
            return int(session.scalar(query.select_from(AlarmEventRow)))

    def alarms(self) -> list[AlarmRow]:
        with Session(self.engine) as session:
            return list(session.scalars(select(AlarmRow).order_by(AlarmRow.start_ts)))

    def find_alarm(self, alarm_id: str) -> BoardAlarm | None:
        with Session(self.engine) as session:
            row = session.get(AlarmRow, alarm_id)
            return _board_alarm(row) if row is not None else None

    def active_alarms(self) -> list[BoardAlarm]:
        """The alarms active when the agent last stopped, oldest first."""
        with Session(self.engine) as session:
            rows = session.scalars(select(AlarmRow).where(AlarmRow.state == "active")
                                   .order_by(AlarmRow.start_ts))
            return [_board_alarm(row) for row in rows]

    def open_shelves(self) -> list[Shelve]:
        """Shelves that had not ended when the agent last stopped (some may have expired)."""
        with Session(self.engine) as session:
            rows = session.scalars(select(ShelveRow).where(ShelveRow.ended_at.is_(None))
                                   .order_by(ShelveRow.id))
            return [Shelve(r.asset, r.class_name, r.shelved_by, r.shelved_ts, r.until_ts)
                    for r in rows]

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(f"{self.path}-wal")
        except OSError:
            return 0

    # Upkeep ------------------------------------------------------------------------------

    def maintain(self, retention: float, now: float | None = None) -> dict[str, int]:
        """Delete what is older than ``retention`` seconds (0 keeps all); truncate the WAL.

        Deleted: published (or suppressed) events, cleared alarms left without events, and
        ended shelves. Pending events and active alarms are kept whatever their age.
        """
        deleted = {"events": 0, "alarms": 0, "shelves": 0}
        if retention > 0:
            cutoff = to_iso((time.time() if now is None else now) - retention)
            with Session(self.engine) as session:
                done = AlarmEventRow.published_at.is_not(None) | AlarmEventRow.suppressed
                deleted["events"] = session.execute(delete(AlarmEventRow).where(
                    AlarmEventRow.created_at < cutoff, done)).rowcount
                referenced = select(AlarmEventRow.alarm_id).where(
                    AlarmEventRow.alarm_id.is_not(None))
                deleted["alarms"] = session.execute(delete(AlarmRow).where(
                    AlarmRow.state == "cleared", AlarmRow.cleared_at < cutoff,
                    AlarmRow.alarm_id.not_in(referenced))).rowcount
                deleted["shelves"] = session.execute(delete(ShelveRow).where(
                    ShelveRow.ended_at.is_not(None), ShelveRow.ended_at < cutoff)).rowcount
                session.commit()
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted

    def close(self) -> None:
        self.engine.dispose()

    def _create_schema(self) -> None:
        with self.engine.begin() as conn:
            version = conn.exec_driver_sql("PRAGMA user_version").scalar()
            tables = set(inspect(conn).get_table_names())
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this "
                                 f"agent's ({SCHEMA_VERSION}); run the newer agent, or give "
                                 "this one another 'database'")
            if "alarm_events" in tables and version < 2:
                _migrate_v1(conn)
                log.info("database %s: schema upgraded to version %d", self.path,
                         SCHEMA_VERSION)
            Base.metadata.create_all(conn)
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _release(conn, row: dict, event: dict, suppressed: bool) -> list[OutboxItem] | None:
    """An event stored already: None, unless it is a raise stored suppressed that is now
    recorded unsuppressed (its shelve ended): then it becomes due for publishing."""
    if not (event["suppressed"] and not suppressed and event["state"] == "active"):
        return None  # stored already
    alarms_table, events_table = AlarmRow.__table__, AlarmEventRow.__table__
    conn.execute(events_table.update().where(events_table.c.id == event["id"])
                 .values(suppressed=False))
    conn.execute(alarms_table.update().where(alarms_table.c.alarm_id == row["alarm_id"])
                 .values(shelved=False))
    event["suppressed"], row["shelved"] = False, False
    item = OutboxItem(event["id"], event["topic"], event["payload"])
    return [] if event["published_at"] is not None else [item]


def _board_alarm(row: AlarmRow) -> BoardAlarm:
    alarm = AlarmEvent(alarm_id=row.alarm_id, asset=row.asset, class_name=row.class_name,
                       state=row.state, start=row.start_ts, end=row.end_ts,
                       peak_score=row.peak_score, model_id=row.model_id,
                       threshold=row.threshold)
    acked_at = parse_timestamp(row.acked_at) if row.acked_at else None
    return BoardAlarm(alarm, row.acked_by, acked_at, bool(row.shelved))


def _migrate_v1(conn) -> None:
    """Schema 1 (before acks and shelves) to 2, keeping every row."""
    for statement in (
        "ALTER TABLE alarms ADD COLUMN acked_by VARCHAR(128)",
        "ALTER TABLE alarms ADD COLUMN acked_at VARCHAR(32)",
        "ALTER TABLE alarms ADD COLUMN shelved BOOLEAN NOT NULL DEFAULT 0",
        "DROP INDEX IF EXISTS ix_alarm_events_alarm_id",
        "DROP INDEX IF EXISTS ix_alarm_events_published_at",
        "ALTER TABLE alarm_events RENAME TO alarm_events_v1",
    ):
        conn.exec_driver_sql(statement)
    AlarmEventRow.__table__.create(conn)
    conn.exec_driver_sql(
        "INSERT INTO alarm_events (id, alarm_id, state, topic, payload, created_at, "
        "published_at, suppressed) SELECT id, alarm_id, state, topic, payload, created_at, "
        "published_at, 0 FROM alarm_events_v1")
    conn.exec_driver_sql("DROP TABLE alarm_events_v1")


def check_database(path: Path, check: str = "quick") -> str | None:
    """Run SQLite's integrity check on an existing file; return the damage found, or None.

    A missing or empty file is fine (a new database). Raise StoreError for a file that is
    not SQLite at all, or one that cannot be checked (locked, unreadable).
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, not {check!r}")
    try:
        if path.stat().st_size == 0:
            return None
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read it: {exc.strerror}") from None
    if header != SQLITE_HEADER:
        raise StoreError(f"{path} is not a SQLite database (it does not start with the "
                         "SQLite header); the agent moves aside only a damaged database, "
                         "never another file")

    pragma = "quick_check" if check == "quick" else "integrity_check"
    try:
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            rows = [str(r[0]) for r in connection.execute(f"PRAGMA {pragma}(20)")]
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        if _is_damage(exc):
            return str(exc)
        raise StoreError(f"{path}: cannot check it: {exc}") from None
    return None if rows == ["ok"] else "; ".join(rows[:5])


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return True
    message = str(exc).lower()
    return "malformed" in message or "not a database" in message


def move_aside(path: Path) -> Path:
    """Rename a damaged database (and its WAL and shared-memory files) with a UTC stamp."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{target}{suffix}"))
    return target


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    cursor.close()
