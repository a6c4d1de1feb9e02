"""The database layer: WAL set once by the daemon, readers that change nothing, UTC columns."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

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
