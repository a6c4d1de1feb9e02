"""The database layer: WAL set once by the daemon, readers that change nothing, UTC columns."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    insert,
    select,
    text,
)

import models


def journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def test_the_daemon_gets_wal_even_while_a_reader_holds_the_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()  # a fresh file, in SQLite's default rollback mode
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM sqlite_master").fetchall()  # holds a shared lock
    timer = threading.Timer(0.3, lambda: reader.execute("COMMIT"))
    timer.start()
    try:
        engine = models.make_engine(f"sqlite:///{path}")
    finally:
        timer.join()
        reader.close()
    engine.dispose()
    assert journal_mode(path) == "wal"
    assert models.has_tables(models.make_engine(f"sqlite:///{path}", create=False))


def test_a_reader_neither_creates_the_file_nor_changes_its_mode(tmp_path: Path) -> None:
    missing = tmp_path / "none.sqlite"
    engine = models.make_engine(f"sqlite:///{missing}", create=False)
    engine.dispose()
    assert not missing.exists()
    path = tmp_path / "db.sqlite"
    sqlite3.connect(path).close()
    reader = models.make_engine(f"sqlite:///{path}", create=False)
    with reader.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    reader.dispose()
    assert journal_mode(path) == "delete"


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    models.make_engine(f"sqlite:///{path}").dispose()
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///data/db.sqlite", "data/db.sqlite"),
        ("sqlite:///file:data/db.sqlite?uri=true", "data/db.sqlite"),
        ("sqlite:///file:mem?mode=memory&uri=true", None),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://u@h/db", None),
    ],
)
def test_sqlite_path(url: str, expected: str | None) -> None:
    path = models.sqlite_path(url)
    assert (str(path) if path else None) == expected


def test_utc_columns_store_instants(tmp_path: Path) -> None:
    column = models.UTCDateTime()
    plus_two = datetime(2026, 8, 10, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    stored = column.process_bind_param(plus_two, None)  # type: ignore[arg-type]
    assert stored == datetime(2026, 8, 10, 12, 0)
    assert column.process_result_value(stored, None) == datetime(2026, 8, 10, 12, 0, tzinfo=UTC)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="naive datetime"):
        column.process_bind_param(datetime(2026, 8, 10, 12, 0), None)  # type: ignore[arg-type]


def instance_rows() -> list[dict[str, Any]]:
    """Rows as reconcile writes them: aware times in UTC and in another zone, microseconds,
    NULLs, and columns left to their defaults (``interrupted``, ``attempts`` ...)."""
    london = ZoneInfo("Europe/London")
    stamp = datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=UTC)
    rows = []
    for i, desired in enumerate(
        [
            datetime(2026, 12, 9, 17, 0, tzinfo=UTC),
            datetime(2026, 7, 1, 18, 30, 0, 5, tzinfo=london),
            datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),
        ]
    ):
        rows.append(
            {
                "key": f"s{i}@x",
                "schedule_id": f"s{i}",
                "type": "recurring",
                "desired_time": desired,
                "trigger_time": desired - timedelta(hours=168),
                "timezone": "Europe/London",
                "rrule": None if i else "FREQ=WEEKLY",
                "court_id": "3",
                "status": "pending",
                "club": None,
                "watch_until": desired - timedelta(minutes=30) if i == 1 else None,
                "created_at": stamp,
                "updated_at": stamp,
            }
        )
    return rows


def test_insert_many_writes_what_sqlalchemys_insert_writes(tmp_path: Path) -> None:
    stored = []
    for name, write in (
        ("sqlalchemy", lambda conn, rows: conn.execute(insert(models.Instance), rows)),
        (
            "insert_many",
            lambda conn, rows: models.insert_many(conn, models.Instance.__table__, rows),
        ),
    ):
        path = tmp_path / f"{name}.sqlite"
        engine = models.make_engine(f"sqlite:///{path}")
        with engine.begin() as conn:
            write(conn, instance_rows())
        engine.dispose()
        with sqlite3.connect(path) as raw:  # the text as SQLite holds it, not as read back
            stored.append(raw.execute("SELECT * FROM schedules ORDER BY id").fetchall())

    assert stored[0] == stored[1]
    assert stored[0][0][4] == "2026-12-09 17:00:00.000000"  # desired_time, as compared
    factory = models.session_factory(
        models.make_engine(f"sqlite:///{tmp_path / 'insert_many.sqlite'}")
    )
    with factory() as session:
        (first,) = session.scalars(select(models.Instance).where(models.Instance.key == "s1@x"))
    assert first.desired_time == datetime(2026, 7, 1, 17, 30, 0, 5, tzinfo=UTC)
    assert (first.attempts, first.interrupted, first.courts) == (0, False, "[null]")


def test_insert_many_on_each_database_stores_what_sqlalchemy_stores(db_url: str) -> None:
    """Instances, and a table with the other kinds of column a job row has (bytes, a float,
    a flag left to its default), written both ways into one database and read back raw."""
    metadata = MetaData()
    jobs = Table(
        "bulk_jobs",
        metadata,
        Column("id", String(191), primary_key=True),
        Column("next_run_time", Float, index=True),
        Column("job_state", LargeBinary, nullable=False),
        Column("paused", Boolean, default=False),
    )
    engine = models.make_engine(db_url)
    metadata.create_all(engine)
    states = [b"\x80\x05state\x00\xff", b""]
    job_rows = [
        {"id": f"j{i}", "next_run_time": 1796230800.25 + i, "job_state": state}
        for i, state in enumerate(states)
    ]
    raw = []
    for way, write in (
        ("sa", lambda conn, table, rows: conn.execute(insert(table), rows)),
        ("bulk", models.insert_many),
    ):
        with engine.begin() as conn:
            rows = [r | {"key": f"{way}-{r['key']}"} for r in instance_rows()]
            write(conn, models.Instance.__table__, rows)
            write(conn, jobs, [r | {"id": f"{way}-{r['id']}"} for r in job_rows])
        with engine.connect() as conn:
            mine = {"mine": f"{way}-%"}
            instances = conn.execute(
                text("SELECT * FROM schedules WHERE key LIKE :mine ORDER BY key"), mine
            ).all()
            job_table = conn.execute(
                text("SELECT * FROM bulk_jobs WHERE id LIKE :mine ORDER BY id"), mine
            ).all()
        # Neither the surrogate id nor the key's prefix: every other column as stored.
        raw.append(
            (
                [tuple(row)[2:] for row in instances],
                [(tuple(row)[1:], bytes(row[2])) for row in job_table],
            )
        )
    engine.dispose()

    assert raw[0] == raw[1]
    assert [state for _, state in raw[1][1]] == states
    assert len(raw[1][0]) == 3


def test_insert_many_refuses_a_naive_time_and_a_missing_stamp(tmp_path: Path) -> None:
    engine = models.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    table = models.Instance.__table__
    naive = instance_rows()[:1]
    naive[0]["desired_time"] = datetime(2026, 12, 9, 17, 0)
    with engine.begin() as conn, pytest.raises(ValueError, match="naive datetime"):
        models.insert_many(conn, table, naive)  # type: ignore[arg-type]
    unstamped = [{k: v for k, v in instance_rows()[0].items() if k != "created_at"}]
    with engine.begin() as conn, pytest.raises(ValueError, match="created_at needs a value"):
        models.insert_many(conn, table, unstamped)  # type: ignore[arg-type]


def test_insert_many_converts_two_instants_that_compare_equal_each_as_itself(
    tmp_path: Path,
) -> None:
    """01:30 on the night the clocks go back, once in summer time and once in winter time:
    Python compares the two as equal (same zone, fold ignored), yet they are an hour apart."""
    london = ZoneInfo("Europe/London")
    first = datetime(2027, 10, 31, 1, 30, tzinfo=london)
    second = first.replace(fold=1)
    assert first == second
    rows = instance_rows()[:2]
    rows[0]["desired_time"], rows[1]["desired_time"] = first, second
    rows[1]["key"] = "s2@fold"
    engine = models.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        models.insert_many(conn, models.Instance.__table__, rows)
        stored = conn.execute(text("SELECT desired_time FROM schedules ORDER BY id")).scalars()
        assert list(stored) == ["2027-10-31 00:30:00.000000", "2027-10-31 01:30:00.000000"]
    engine.dispose()


def test_a_block_that_fails_reports_its_own_error_not_the_index_build_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = models.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    factory = models.session_factory(engine)
    index = models.STATUS_TRIGGER_INDEX

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_create_index", full)
    with (
        pytest.raises(RuntimeError, match="the batch failed"),
        models.index_built_after(factory, index),
    ):
        raise RuntimeError("the batch failed")
    assert "ix_schedules_status_trigger could not be built again" in caplog.text
    assert "the next start builds it" in caplog.text
    # A block that succeeded: the build's error is the one.
    with pytest.raises(OSError, match="No space left"), models.index_built_after(factory, index):
        pass
    engine.dispose()


def test_a_start_puts_back_an_index_a_load_left_unbuilt(tmp_path: Path) -> None:
    """A daemon killed while its cold load built the (status, trigger) index after the rows
    (instances.reconcile) left the table without it: the next start builds it."""
    path = tmp_path / "db.sqlite"
    models.make_engine(f"sqlite:///{path}").dispose()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute("DROP INDEX ix_schedules_status_trigger")
        raw.commit()

    engine = models.make_engine(f"sqlite:///{path}")
    engine.dispose()

    with contextlib.closing(sqlite3.connect(path)) as raw:
        (sql,) = raw.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_schedules_status_trigger'"
        ).fetchone()
    assert sql == "CREATE INDEX ix_schedules_status_trigger ON schedules (status, trigger_time)"


def test_closing_idle_connections_leaves_a_session_under_way_alone(tmp_path: Path) -> None:
    engine = models.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    factory = models.session_factory(engine)
    with factory() as idle:
        idle.execute(select(models.Instance.key)).all()
    pool = engine.pool
    assert pool.checkedin() == 1

    with models.transaction(factory) as busy:
        busy.add(models.Token(id="t", encrypted_token="x"))
        busy.flush()
        models.close_idle_connections(engine)
        # The idle connection is closed; the one this session holds is still its own.
        assert pool.checkedin() == 0 and engine.pool is not pool
        busy.add(models.Token(id="u", encrypted_token="y"))

    with factory() as later:
        assert sorted(later.scalars(select(models.Token.id))) == ["t", "u"]
    engine.dispose()


def test_an_in_memory_database_keeps_its_connection() -> None:
    engine = models.make_engine("sqlite://")
    factory = models.session_factory(engine)
    with models.transaction(factory) as session:
        session.add(models.Token(id="t", encrypted_token="x"))
    pool = engine.pool

    models.close_idle_connections(engine)

    assert engine.pool is pool
    with factory() as session:
        assert list(session.scalars(select(models.Token.id))) == ["t"]


def test_a_sqlite_connection_keeps_a_small_page_cache(tmp_path: Path) -> None:
    engine = models.make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == -256
    engine.dispose()


def _tokens(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM tokens ORDER BY id")]


def _add_token(engine: models.Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO tokens (id, updated_at) VALUES (?, '2026-01-01')", (name,)
        )


def test_the_guard_writes_a_deleted_database_back_with_what_was_written_since(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite"
    engine = models.make_engine(f"sqlite:///{path}")
    guard = models.SqliteGuard(path)
    _add_token(engine, "before")
    assert guard.check() is None
    path.unlink()
    assert guard.check() == "deleted"
    _add_token(engine, "after")  # into the ghost
    engine.dispose()
    assert guard.save() == path
    assert _tokens(path) == ["after", "before"]
    assert path.stat().st_mode & 0o777 == 0o600
    # The ghost's -wal and -shm are gone with it; only the saved database is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.sqlite"]


def test_the_guard_keeps_a_database_put_in_place_and_saves_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    engine = models.make_engine(f"sqlite:///{path}")
    guard = models.SqliteGuard(path)
    _add_token(engine, "ours")
    backup = tmp_path / "backup" / "db.sqlite"
    made = models.make_engine(f"sqlite:///{backup}")
    _add_token(made, "theirs")
    made.dispose()
    backup.replace(path)  # someone's backup, moved into its place while the daemon runs
    assert guard.check() == "replaced"
    engine.dispose()
    saved = guard.save()
    assert saved is not None and saved.name.startswith("db.sqlite.lost-")
    assert _tokens(saved) == ["ours"]
    assert _tokens(path) == ["theirs"]  # not overlaid with the old file's WAL
