"""The alarm store on real SQLite files: outbox order, acks and shelves, durability settings,
retention, schema upgrade, and damaged files moved aside."""

import logging
import sqlite3

import pytest
import sqlalchemy

from agent.alarms import Ack, AlarmEvent, BoardAlarm, Shelve, ShelveChange
from agent.store import (SCHEMA_VERSION, AlarmStore, StoreError, alarm_payload,
                         check_database)

TOPIC = "segwatch/pump1/alarm"


def event(n: int, state: str = "active") -> AlarmEvent:
    return AlarmEvent(alarm_id=f"00000000-0000-5000-8000-{n:012d}", asset="pump1",
                      class_name="spike", state=state, start=1000.0 + 10 * n,
                      end=1005.0 + 10 * n, peak_score=0.9, model_id="m-1", threshold=0.5)


def filled_store(path, alarms: int = 400) -> None:
    """A database of several pages: raises and clears, all published (one transaction)."""
    AlarmStore(path).close()
    rows, events = [], []
    for n in range(alarms):
        e = event(n, "cleared")
        rows.append((e.alarm_id, e.asset, e.class_name, "cleared", "t0", "t1", e.start, e.end,
                     e.peak_score, e.threshold, e.model_id, "t0", "t1"))
        events += [(e.alarm_id, state, TOPIC, alarm_payload(e), "t0", "t1")
                   for state in ("active", "cleared")]
    with sqlite3.connect(path) as conn:
        conn.executemany("INSERT INTO alarms (alarm_id, asset, class_name, state, start_utc, "
                         "end_utc, start_ts, end_ts, peak_score, threshold, model_id, "
                         "raised_at, cleared_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT INTO alarm_events (alarm_id, state, topic, payload, "
                         "created_at, published_at) VALUES (?,?,?,?,?,?)", events)
    conn.close()


def test_a_new_database_is_durable_and_its_wal_bounded(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    with store.engine.connect() as conn:
        pragma = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                  for name in ("journal_mode", "synchronous", "journal_size_limit",
                               "user_version", "foreign_keys")}
    store.close()
    assert pragma == {"journal_mode": "wal", "synchronous": 2,  # FULL
                      "journal_size_limit": 64 * 1024 * 1024,
                      "user_version": SCHEMA_VERSION, "foreign_keys": 1}


def test_events_stay_pending_in_commit_order_until_marked_published(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    ids = [item.id for e in (event(1), event(2), event(1, "cleared"))
           for item in store.record(e, TOPIC)]
    assert [item.id for item in store.pending()] == ids == sorted(ids)
    assert store.pending()[0].payload == alarm_payload(event(1))

    assert store.record(event(1), TOPIC) is None  # a replayed raise after its clear
    assert store.record(event(2), TOPIC) is None  # a replayed raise
    store.mark_published(ids[:2])
    assert [item.id for item in store.pending()] == ids[2:]
    assert store.pending_count() == 1
    store.close()


def test_an_event_stored_after_the_broker_acknowledged_it_is_not_pending(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    assert len(store.record(event(1), TOPIC, published=True)) == 1
    assert store.pending_count() == 0
    store.close()


def test_a_raise_while_shelved_is_stored_not_pending_and_released_later(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    assert store.record(event(1), TOPIC, suppressed=True) == []
    assert store.pending_count() == 0
    assert store.find_alarm(event(1).alarm_id).suppressed

    released = store.record(event(1), TOPIC, suppressed=False)  # its shelve ended
    assert [item.payload for item in released] == [alarm_payload(event(1))]
    assert store.pending_count() == 1
    assert not store.find_alarm(event(1).alarm_id).suppressed
    assert store.record(event(1), TOPIC) is None
    store.close()


def test_the_clear_of_an_alarm_raised_while_shelved_is_not_published(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    store.record(event(1), TOPIC, suppressed=True)
    assert store.record(event(1, "cleared"), TOPIC) == []
    assert store.pending_count() == 0
    store.close()


def test_acks_and_shelves_persist_across_a_reopen(tmp_path):
    path = tmp_path / "alarms.db"
    store = AlarmStore(path)
    store.record(event(1), TOPIC)
    ack = Ack(BoardAlarm(event(1)), "operator-7", 2_000_000_000.0)
    assert len(store.record_ack(ack, "t/ack", "{}")) == 1
    assert store.record_ack(ack, "t/ack", "{}") is None  # acknowledged already
    shelve = Shelve("pump1", "spike", "operator-7", 2_000_000_000.0, 2_000_003_600.0)
    store.record_shelve(ShelveChange(shelve, True, shelve.at), "t/shelve", "{}")
    store.close()

    store = AlarmStore(path)
    [alarm] = store.active_alarms()
    assert alarm.alarm_id == event(1).alarm_id and alarm.acked_by == "operator-7"
    assert alarm.acked_at == 2_000_000_000.0
    assert store.open_shelves() == [shelve]
    store.record_shelve(ShelveChange(shelve, False, 2_000_000_100.0, "operator-8"),
                        "t/shelve", "{}")
    assert store.open_shelves() == []
    assert [item.topic for item in store.pending()] == [TOPIC, "t/ack", "t/shelve", "t/shelve"]
    store.close()


def test_retention_deletes_old_published_rows_and_truncates_the_wal(tmp_path):
    path = tmp_path / "alarms.db"
    store = AlarmStore(path)
    for n in range(3):
        store.record(event(n), TOPIC)
    store.record(event(0, "cleared"), TOPIC)
    store.record(event(1, "cleared"), TOPIC)
    everything = [item.id for item in store.pending()]
    store.mark_published(everything[:-1])  # the clear of alarm 1 stays pending
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alarm_events SET created_at = '2001-01-01T00:00:00Z'")
        conn.exec_driver_sql("UPDATE alarms SET cleared_at = '2001-01-01T00:00:00Z'")
    assert store.wal_bytes() > 0

    deleted = store.maintain(retention=30 * 86400)
    assert deleted == {"events": 4, "alarms": 1, "shelves": 0}
    left = {row.alarm_id: row.state for row in store.alarms()}
    # Alarm 0: cleared and published, gone. Alarm 1: its clear is pending. Alarm 2: active.
    assert left == {event(1).alarm_id: "cleared", event(2).alarm_id: "active"}
    assert store.pending_count() == 1
    assert store.wal_bytes() == 0
    store.close()


def test_retention_zero_keeps_everything(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    store.record(event(1), TOPIC, published=True)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alarm_events SET created_at = '2001-01-01T00:00:00Z'")
    assert store.maintain(retention=0) == {"events": 0, "alarms": 0, "shelves": 0}
    store.close()


V1_SCHEMA = """
CREATE TABLE alarms (alarm_id VARCHAR(36) NOT NULL, asset VARCHAR(128) NOT NULL,
  class_name VARCHAR(128) NOT NULL, state VARCHAR(16) NOT NULL,
  start_utc VARCHAR(32) NOT NULL, end_utc VARCHAR(32), start_ts FLOAT NOT NULL,
  end_ts FLOAT NOT NULL, peak_score FLOAT NOT NULL, threshold FLOAT NOT NULL,
  model_id VARCHAR(128) NOT NULL, raised_at VARCHAR(32) NOT NULL, cleared_at VARCHAR(32),
  PRIMARY KEY (alarm_id));
CREATE INDEX ix_alarms_asset ON alarms (asset);
CREATE INDEX ix_alarms_start_utc ON alarms (start_utc);
CREATE TABLE alarm_events (id INTEGER NOT NULL, alarm_id VARCHAR(36) NOT NULL,
  state VARCHAR(16) NOT NULL, topic VARCHAR(256) NOT NULL, payload TEXT NOT NULL,
  created_at VARCHAR(32) NOT NULL, published_at VARCHAR(32), PRIMARY KEY (id),
  CONSTRAINT uq_alarm_event UNIQUE (alarm_id, state),
  FOREIGN KEY(alarm_id) REFERENCES alarms (alarm_id));
CREATE INDEX ix_alarm_events_alarm_id ON alarm_events (alarm_id);
CREATE INDEX ix_alarm_events_published_at ON alarm_events (published_at);
INSERT INTO alarms VALUES ('a-1', 'pump1', 'spike', 'active', '1970-01-01T00:16:40Z', NULL,
  1000, 1005, 0.9, 0.5, 'm-1', '2026-01-01T00:00:00Z', NULL);
INSERT INTO alarm_events VALUES (7, 'a-1', 'active', 'segwatch/pump1/alarm', '{"x":1}',
  '2026-01-01T00:00:00Z', NULL);
"""


def test_a_database_of_the_first_schema_is_upgraded_keeping_its_rows(tmp_path):
    path = tmp_path / "alarms.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    conn.close()

    store = AlarmStore(path)
    assert [(item.id, item.payload) for item in store.pending()] == [(7, '{"x":1}')]
    [alarm] = store.active_alarms()
    assert alarm.alarm_id == "a-1" and alarm.acked_by is None and not alarm.suppressed
    shelve = Shelve("pump1", "spike", "op", 1.0, 2.0)
    store.record_shelve(ShelveChange(shelve, True, 1.0), "t", "{}")  # no alarm id: allowed
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA user_version").scalar() == SCHEMA_VERSION
    store.close()


def _garbage(path, offset: int, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes((n * 97 + 13) % 251 for n in range(size)))


@pytest.mark.parametrize("damage", ["garbage_in_pages", "garbage_in_schema", "truncated"])
def test_a_damaged_database_is_moved_aside_and_a_fresh_one_created(tmp_path, caplog, damage):
    path = tmp_path / "alarms.db"
    filled_store(path)
    size = path.stat().st_size
    assert size > 20 * 4096
    if damage == "garbage_in_pages":
        _garbage(path, 3 * 4096, 6 * 4096)
    elif damage == "garbage_in_schema":
        _garbage(path, 200, 3000)  # page 1 after the header: the schema table
    else:
        with open(path, "r+b") as handle:
            handle.truncate(size // 2 + 1000)
    assert check_database(path) is not None

    with caplog.at_level(logging.ERROR, logger="agent.store"):
        store = AlarmStore(path)
    assert store.moved_aside is not None and store.moved_aside.exists()
    assert store.moved_aside.name.startswith("alarms.db.corrupt-")
    assert store.moved_aside.stat().st_size == (size if damage != "truncated"
                                                else size // 2 + 1000)
    assert "DATABASE DAMAGED" in caplog.text and str(store.moved_aside) in caplog.text

    assert store.alarms() == [] and store.pending_count() == 0
    assert len(store.record(event(1), TOPIC)) == 1
    store.close()
    assert check_database(path) is None


def test_a_healthy_database_is_not_moved(tmp_path):
    path = tmp_path / "alarms.db"
    filled_store(path, alarms=50)
    store = AlarmStore(path, check="full")
    assert store.moved_aside is None and len(store.alarms()) == 50
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alarms.db"]


def test_a_file_that_is_not_sqlite_is_refused_not_moved(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("shift notes, not a database\n" * 50)
    with pytest.raises(StoreError, match="not a SQLite database"):
        AlarmStore(path)
    assert path.read_text().startswith("shift notes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_group_of_events_is_committed_in_one_transaction_as_one_by_one(tmp_path):
    """record_many (one commit per pipeline step) stores and returns what record would:
    a raise and its clear in one group, a replay, a suppressed raise, in commit order."""
    one, many = AlarmStore(tmp_path / "one.db"), AlarmStore(tmp_path / "many.db")
    one.record(event(9), TOPIC)
    many.record(event(9), TOPIC)
    group = [(event(1), TOPIC, False), (event(1, "cleared"), TOPIC, False),
             (event(2), TOPIC, True), (event(9), TOPIC, False),
             (event(9, "cleared"), TOPIC, False), (event(1), TOPIC, False)]
    commits = []
    sqlalchemy.event.listen(many.engine, "commit", lambda _conn: commits.append(1))

    expected = [one.record(e, topic, suppressed) for e, topic, suppressed in group]
    got = many.record_many(group)
    assert commits == [1]
    assert [None if r is None else [(i.topic, i.payload) for i in r] for r in got] == \
        [None if r is None else [(i.topic, i.payload) for i in r] for r in expected]
    assert [(i.topic, i.payload) for i in many.pending()] == \
        [(i.topic, i.payload) for i in one.pending()]
    assert [(a.alarm_id, a.state, a.end_ts, a.shelved) for a in many.alarms()] == \
        [(a.alarm_id, a.state, a.end_ts, a.shelved) for a in one.alarms()]


def test_progress_of_active_alarms_keeps_the_highest_peak(tmp_path):
    store = AlarmStore(tmp_path / "alarms.db")
    store.record(event(1), TOPIC)
    store.save_progress([AlarmEvent(**{**event(1).__dict__, "end": 2000.0, "peak_score": 0.6})])
    assert [(a.end_ts, a.peak_score) for a in store.alarms()] == [(2000.0, 0.9)]
    store.save_progress([AlarmEvent(**{**event(1).__dict__, "end": 2100.0, "peak_score": 0.95})])
    assert [(a.end_ts, a.peak_score) for a in store.alarms()] == [(2100.0, 0.95)]
