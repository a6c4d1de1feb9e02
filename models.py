"""The database: one row per booking instance (table ``schedules``) and encrypted tokens.

Times are stored as UTC. SQLite runs in WAL mode with a busy timeout so the scheduler's worker
threads, the job store and a ``status`` reader in another process never see "database is locked".
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    false,
    inspect,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateColumn

PENDING = "pending"
BOOKING = "booking"
BOOKED = "booked"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"
STATUSES = (PENDING, BOOKING, BOOKED, FAILED, EXPIRED, CANCELLED)
FINAL = (BOOKED, FAILED, EXPIRED)

SQLITE_BUSY_TIMEOUT_MS = 30_000


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored naive in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Instance(Base):
    """One booking: one desired start of one schedule entry.

    ``id`` is a surrogate key and ``key`` the natural one, so that an owner column can be added
    later (making ``(owner, key)`` unique) without rewriting references.
    """

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    schedule_id: Mapped[str] = mapped_column(String(64), index=True)
    type: Mapped[str] = mapped_column(String(16))
    desired_time: Mapped[datetime] = mapped_column(UTCDateTime())
    trigger_time: Mapped[datetime] = mapped_column(UTCDateTime())
    timezone: Mapped[str] = mapped_column(String(64))
    rrule: Mapped[str | None] = mapped_column(Text)
    # court_id: the wanted court as the user reads it ("3"; "3, 4" for a list; NULL for any);
    # courts: the same as a JSON list for the code; booked_court: the one the club gave us.
    court_id: Mapped[str | None] = mapped_column(Text)
    courts: Mapped[str] = mapped_column(Text, default="[null]")
    booked_court: Mapped[str | None] = mapped_column(Text)
    token_name: Mapped[str] = mapped_column(String(128), default="default")
    duration_minutes: Mapped[int] = mapped_column(Integer, default=60)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    booking_ref: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: A booking cut off by a crash (it may have reached the club): set when it is retried at
    #: start, cleared by its final status or a ``retry``. Its 409 may be our own earlier request.
    interrupted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (Index("ix_schedules_status_trigger", "status", "trigger_time"),)

    def __repr__(self) -> str:
        return f"<Instance {self.key} {self.status}>"


class Token(Base):
    """A club API token, only ever stored encrypted. ``error`` is set while tokens.json holds a
    value for it that no key decrypts: its bookings then fail with that reason."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    encrypted_token: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    database = parsed.database
    if database.startswith("file:"):
        # A SQLite URI (``sqlite:///file:db.sqlite?uri=true``): the same file, differently named.
        if parsed.query.get("mode") == "memory":
            return None
        database = database[len("file:") :].split("?", 1)[0]
    if database in ("", ":memory:"):
        return None
    return Path(database)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL (set once by the daemon, see _enable_wal; it stays in the file) with
        # synchronous=NORMAL is durable against process crashes (kill -9), which is what this
        # daemon must survive; only an OS crash may lose the last commits.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _enable_wal(engine: Engine, *, timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> None:
    """Put the database in WAL mode (it stays so in the file). Switching needs the database to
    itself, and SQLite answers "locked" at once rather than waiting while a reader (a `status`
    from the CLI) holds it: retry until it is free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with engine.connect() as conn:
                mode = conn.exec_driver_sql("PRAGMA journal_mode=WAL").scalar()
            if str(mode).lower() == "wal":
                return
        except OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            mode = "locked"
        if time.monotonic() > deadline:
            raise OperationalError("PRAGMA journal_mode=WAL", {}, Exception(f"mode {mode!r}"))
        time.sleep(0.05)


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url``. For SQLite: WAL, busy timeout, the file created 0600.

    With ``create`` the tables are created when missing.
    """
    path = sqlite_path(url)
    kwargs: dict[str, Any] = {}
    if path is not None:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Create it ourselves so that it never exists with a wider mode.
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        kwargs["connect_args"] = {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
        }
    engine = create_engine(url, **kwargs)
    if path is not None:
        event.listen(engine, "connect", _sqlite_pragmas)
    if create:
        if path is not None:
            _enable_wal(engine)
        Base.metadata.create_all(engine)
        add_missing_columns(engine)
        if path is not None:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").chmod(0o600)
    return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns a database made by an earlier release lacks (each has a default, so
    existing rows read as before). Returns the names added."""
    present = {column["name"] for column in inspect(engine).get_columns(Instance.__tablename__)}
    added = []
    for column in Instance.__table__.columns:
        if column.name in present:
            continue
        ddl = CreateColumn(column).compile(dialect=engine.dialect)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ALTER TABLE {Instance.__tablename__} ADD COLUMN {ddl}")
        added.append(column.name)
    return added


def has_tables(engine: Engine) -> bool:
    """True when the database already holds courtbot's tables."""
    return inspect(engine).has_table(Instance.__tablename__)


#: What the other modules hold to open sessions (so that they need not import SQLAlchemy).
SessionFactory = sessionmaker[Session]


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextlib.contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    with factory() as session, session.begin():
        yield session


class SqliteGuard:
    """Notices the SQLite database file deleted or replaced under a running daemon, and saves
    what the daemon's database held.

    A deleted file lives on for its open connections (a ghost): the daemon would go on booking
    into it, and a restart would start from an empty database and book again what was booked.
    The guard remembers the file's identity (device and inode) and keeps a connection of its own
    to it, through which the ghost can still be read and written back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._anchor = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        # A first read opens the WAL too: the guard sees the commits not yet checkpointed.
        # (Read to the end and closed: no read transaction stays open to hold checkpoints.)
        cursor = self._anchor.execute("SELECT count(*) FROM sqlite_master")
        cursor.fetchall()
        cursor.close()
        self._identity = _identity(path)
        #: The WAL and shared-memory files the connections use (they live as long as one does).
        self._companions = {
            suffix: _identity(Path(f"{path}{suffix}")) for suffix in ("-wal", "-shm")
        }

    def check(self) -> str | None:
        """None while ``path`` is still the file the daemon opened; "deleted" or "replaced"."""
        try:
            identity = _identity(self.path)
        except OSError:
            return None  # cannot tell (a transient error): say nothing rather than stop
        if identity is None:
            return "deleted"
        return None if identity == self._identity else "replaced"

    def save(self) -> Path:
        """Write the database as the daemon's connections see it to a file of its own (0600)
        and close the guard: back to ``path`` when nothing holding courtbot's tables is there
        (deleted, or recreated empty by a late connection), else beside it with a ``.lost-``
        suffix. Call it once every other connection is closed. Returns the file written;
        OSError when it cannot be written."""
        saved = self.path.with_name(f".{self.path.name}.saving")
        fd = os.open(saved, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        try:
            with contextlib.closing(sqlite3.connect(saved)) as copy:
                self._anchor.backup(copy)
        except sqlite3.Error as exc:
            saved.unlink()
            raise OSError(f"SQLite: {exc}") from None
        finally:
            self._anchor.close()
        # SQLite leaves the ghost's -wal and -shm under the path's names when the database file
        # is gone: read with whatever is at the path next, the ghost's pages would overlay it.
        for suffix, identity in self._companions.items():
            companion = Path(f"{self.path}{suffix}")
            with contextlib.suppress(OSError):
                if identity is not None and _identity(companion) == identity:
                    companion.unlink()
        target = self.path
        if _holds_something(self.path):
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            target = self.path.with_name(f"{self.path.name}.lost-{stamp}")
        os.replace(saved, target)
        return target

    def close(self) -> None:
        self._anchor.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """A file's device and inode (None when there is no such file)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _holds_something(path: Path) -> bool:
    """False when ``path`` is missing, empty, or a SQLite database without courtbot's tables
    (what a connection opened after the deletion leaves); True for anything else, which is
    someone's and is kept."""
    try:
        if path.stat().st_size == 0:
            return False
        with contextlib.closing(sqlite3.connect(path)) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (Instance.__tablename__,),
            ).fetchall()
    except FileNotFoundError:
        return False
    except (OSError, sqlite3.Error):
        return True
    return bool(found)
