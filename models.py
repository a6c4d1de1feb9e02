"""The database: one row per booking instance (table ``schedules``) and encrypted tokens.

Times are stored as UTC. SQLite runs in WAL mode with a busy timeout so the scheduler's worker
threads, the job store and a ``status`` reader in another process never see "database is locked".
"""

from __future__ import annotations

import contextlib
import os
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
from sqlalchemy.exc import OperationalError, SQLAlchemyError
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

#: What the database layer raises (for modules that do not import SQLAlchemy).
DatabaseError = SQLAlchemyError


def error_text(exc: BaseException) -> str:
    """A database error in one line: the driver's own words ("OperationalError: database or
    disk is full"), without SQLAlchemy's echo of the statement, its parameters and help link."""
    cause = getattr(exc, "orig", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return f"{shown.__class__.__name__}: {lines[0]}" if lines else shown.__class__.__name__


def display_url(url: str) -> str:
    """A database URL fit for a message: its password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (an unparsable URL: say so without echoing it)
        return "(an invalid DATABASE_URL)"


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
