"""The database: one row per booking instance (table ``schedules``), encrypted tokens, daemons.

Times are stored as UTC. SQLite runs in WAL mode with a busy timeout so the scheduler's worker
threads, the job store and a ``status`` reader in another process never see "database is locked".
PostgreSQL (``postgresql://`` URLs) is opened with psycopg 3, the driver requirements.txt installs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    false,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateColumn, Table

logger = logging.getLogger(__name__)

PENDING = "pending"
BOOKING = "booking"
BOOKED = "booked"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"
#: Every court and time was taken; tried again every WATCH_INTERVAL_SECONDS (CONTRACT 13).
WATCHING = "watching"
STATUSES = (PENDING, BOOKING, WATCHING, BOOKED, FAILED, EXPIRED, CANCELLED)
FINAL = (BOOKED, FAILED, EXPIRED)
#: Token.kind
KIND_STRING = "string"
KIND_OBJECT = "object"

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: SQLite's page cache per connection, in KiB.
SQLITE_CACHE_KIB = 256
#: How long connecting to a database server may take before it counts as unreachable.
CONNECT_TIMEOUT_SECONDS = 10
#: What ``postgresql://`` means here (SQLAlchemy's default driver, psycopg2, is not installed).
POSTGRESQL_DRIVER = "postgresql+psycopg"

#: What the database layer raises (for modules that do not import SQLAlchemy).
DatabaseError = SQLAlchemyError


def error_text(exc: BaseException) -> str:
    """A database error in one line: the driver's own words ("OperationalError: database or
    disk is full"), without SQLAlchemy's echo of the statement, its parameters and help link."""
    cause = getattr(exc, "orig", None)
    shown = cause if isinstance(cause, BaseException) else exc
    lines = str(shown).strip().splitlines()
    return f"{shown.__class__.__name__}: {lines[0]}" if lines else shown.__class__.__name__


class UTCDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out; stored naive in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return _utc_naive(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def sqlite_datetime(value: datetime) -> str:
    """A naive datetime as SQLAlchemy's SQLite ``DateTime`` stores it (``2026-12-09
    05:00:00.000000``: the text its comparisons and ORDER BY read), at a fifth of the cost."""
    return value.isoformat(" ", "microseconds")


def insert_many(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts with the same keys) into ``table``, in the connection's
    transaction (``insert_tuples``)."""
    if not rows:
        return
    columns = list(rows[0])
    insert_tuples(conn, table, columns, [tuple(row[name] for name in columns) for row in rows])


def insert_tuples(
    conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` (each the values of ``columns``, in that order) into ``table``, in the
    connection's transaction.

    The values are converted here, as the column types would convert them, and handed to the
    driver in bulk: on SQLite its ``executemany``, on PostgreSQL ``COPY ... FROM STDIN``.
    SQLAlchemy's per-value processing (SQLite) and one statement a row (psycopg's pipelined
    ``executemany``, PostgreSQL) were most of the cost of writing the 52,000 rows of a cold load
    of 1,000 weekly schedules. Columns the rows leave out take their scalar default, as
    SQLAlchemy's INSERT gives them (``tests/test_models.py`` holds the two ways to the same rows
    on both databases)."""
    if not rows:
        return
    dialect = conn.dialect
    given = list(columns)
    if dialect.name not in ("sqlite", "postgresql"):
        conn.execute(insert(table), [dict(zip(given, row, strict=True)) for row in rows])
        return
    # The columns SQLAlchemy would fill in from their Python-side default; a callable one
    # (a time stamp) must be given.
    filled = [c for c in table.columns if c.key not in given and c.default is not None]
    tail = tuple(_bind_converter(c, dialect)(_scalar_default(table, c)) for c in filled)
    converters = [
        (i, convert)
        for i, name in enumerate(given)
        if (convert := _bind_converter(table.c[name], dialect)) is not _same
    ]
    # Converted a column at a time, and the rows rebuilt from the columns (in C, by zip).
    values = list(zip(*rows, strict=True))
    for i, convert in converters:
        values[i] = _converted(convert, values[i])
    params = list(zip(*values, *(repeat(value, len(rows)) for value in tail), strict=True))
    preparer = dialect.identifier_preparer
    target = preparer.format_table(table)
    names = ", ".join(preparer.quote(name) for name in [*given, *(c.key for c in filled)])
    # Below: our own table's quoted identifiers; every value is bound or copied as data.
    if dialect.name == "sqlite":
        marks = ", ".join("?" * (len(given) + len(filled)))
        conn.exec_driver_sql(f"INSERT INTO {target} ({names}) VALUES ({marks})", params)  # noqa: S608
        return
    with (
        conn.connection.dbapi_connection.cursor() as cursor,  # type: ignore[union-attr]
        cursor.copy(f"COPY {target} ({names}) FROM STDIN") as copy,
    ):
        for one in params:
            copy.write_row(one)


#: Rows written by one load from which a PostgreSQL table's planner statistics are refreshed.
ANALYZE_AFTER_ROWS = 1000


def refresh_statistics(conn: Connection, table: Table | str, rows: int) -> None:
    """After ``rows`` were written to ``table`` by one load: on PostgreSQL, once they are many,
    ``ANALYZE`` it. Without, the planner takes a table that a cold load has just filled for
    the empty one it last counted, and walks all of it for each page of 500 instances that the
    job sync reads (4 s for 52,000; autovacuum would count them only later). SQLite plans by
    its indexes without statistics."""
    if conn.dialect.name != "postgresql" or rows < ANALYZE_AFTER_ROWS:
        return
    preparer = conn.dialect.identifier_preparer
    name = preparer.quote(table) if isinstance(table, str) else preparer.format_table(table)
    conn.exec_driver_sql(f"ANALYZE {name}")


def _converted(convert: Callable[[Any], Any], values: Sequence[Any]) -> Sequence[Any]:
    """``convert`` applied to each of ``values``; once when they are all the same object (a
    load's time stamp in every row's created_at and updated_at, or NULL). Not when they are only
    equal: two datetimes of one zone that differ only in ``fold`` compare equal, yet they are
    two instants."""
    first = values[0]
    if all(value is first for value in values):
        return [convert(first)] * len(values)
    return list(map(convert, values))


def _scalar_default(table: Table, column: Any) -> Any:
    default = column.default
    if not default.is_scalar:
        raise ValueError(
            f"insert_many: {table.name}.{column.key} needs a value (no scalar default)"
        )
    return default.arg


def _bind_converter(column: Any, dialect: Dialect) -> Callable[[Any], Any]:
    """What the column's type does to a value before the driver gets it."""
    if isinstance(column.type, UTCDateTime):
        return _utc_text if dialect.name == "sqlite" else _utc_naive
    process = column.type.dialect_impl(dialect).bind_processor(dialect)
    return _same if process is None else process  # type: ignore[no-any-return]


def _utc_text(value: datetime | None) -> str | None:
    """``UTCDateTime``'s value as SQLite holds it (see ``sqlite_datetime``)."""
    if value is not None and value.tzinfo is UTC:
        return value.isoformat(" ", "microseconds")[:-6]  # less "+00:00"
    naive = _utc_naive(value)
    return None if naive is None else sqlite_datetime(naive)


def _utc_naive(value: datetime | None) -> datetime | None:
    """``UTCDateTime``'s value as a driver takes it: naive, in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def _same(value: Any) -> Any:
    return value


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
    #: The daemon (``daemons.id``) whose claim this is while ``booking``; NULL for none (and in
    #: rows from before this column, which a starting daemon adds: add_missing_columns).
    owner: Mapped[str | None] = mapped_column(String(64), default=None)
    #: The club file its entry names (``DATA_DIR/clubs/<club>.json``) when it was last loaded;
    #: NULL: BOOKING_REQUEST_TEMPLATE or the request of CONTRACT section 6.
    club: Mapped[str | None] = mapped_column(String(64))

    #: When the booking step's first request left (NULL until one has): how late it was
    #: against ``trigger_time`` is what every outcome reports.
    first_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    #: Why a first request may leave after the trigger, noted when it became due late (a code of
    #: ``instances.LATE_CAUSES``; NULL: nothing known, on time).
    late_cause: Mapped[str | None] = mapped_column(String(16), default=None)
    #: The club took the booking (its booking step answered booked) and finishing steps were
    #: still to run (CONTRACT section 12): set before they run. Such an instance is never booked
    #: again: not by ``retry``, not after a crash; if a finishing step fails it stays ``failed``.
    club_took: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: The club's clock as measured before the trigger (CONTRACT section 6, "The club's clock"):
    #: its offset from ours and the uncertainty, in ms; NULL: sent by our clock.
    clock_offset_ms: Mapped[float | None] = mapped_column(Float, default=None)
    clock_uncertainty_ms: Mapped[float | None] = mapped_column(Float, default=None)
    #: Why the club's clock could not be measured (its file names one): the trigger stayed ours.
    clock_error: Mapped[str | None] = mapped_column(String(300), default=None)
    #: The lease epoch (``leases.epoch``, a fencing token) under which ``owner`` claimed it, on
    #: a shared PostgreSQL database; NULL on SQLite. A claim of an older epoch is the former
    #: active daemon's: the new one holds it back until that daemon's request could have ended.
    claim_epoch: Mapped[int | None] = mapped_column(BigInteger, default=None)

    # CONTRACT section 13. What the entry asks for, copied like its courts: its fallback times
    # as JSON ``[["18:00", start UTC, trigger UTC], ...]``, its players as a JSON list, and when
    # the instance's watch ends (NULL: no watch).
    fallbacks: Mapped[str | None] = mapped_column(Text, default=None)
    players: Mapped[str | None] = mapped_column(Text, default=None)
    watch_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    #: The fallback reached (0: the desired time; N: the Nth fallback time), and its start
    #: while it is tried (NULL: the desired time). ``trigger_time`` is then the fallback's.
    fallback_step: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    slot_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    #: Each time tried so far with what the club said (``18:00: taken (...)``), for the reason.
    tried: Mapped[str | None] = mapped_column(Text, default=None)
    #: The local ``HH:MM`` that was booked (NULL until booked).
    booked_time: Mapped[str | None] = mapped_column(String(5), default=None)
    #: While ``watching``: when the next try leaves, and how many tries the watch has made.
    next_try_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    watch_tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Cancelled at the club by ``cancel`` (booked -> cancelled): never revived by a reload.
    cancelled_booking: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    #: The last rehearsal of its flow's preparation steps (CONTRACT section 12), as ``status``
    #: shows it: ``ok <UTC time>`` or ``failed <UTC time>: <reason>``; NULL: none yet.
    rehearsal: Mapped[str | None] = mapped_column(Text, default=None)
    #: When that rehearsal ran (the next one is due an hour after a failed one).
    rehearsed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)

    __table_args__ = (Index("ix_schedules_status_trigger", "status", "trigger_time"),)

    def __repr__(self) -> str:
        return f"<Instance {self.key} {self.status}>"


#: The index a large load into a nearly empty table builds after its rows (on SQLite,
#: ``index_built_after``): its keys come in no order, and inserting each row into it was a
#: third of the time a cold load of 52,000 rows took to write them.
STATUS_TRIGGER_INDEX: Index = next(
    index for index in Instance.__table__.indexes if index.name == "ix_schedules_status_trigger"
)


class Token(Base):
    """A club API token, only ever stored encrypted. ``error`` is set while tokens.json holds a
    value for it that no key decrypts: its bookings then fail with that reason.

    ``kind`` "string": ``encrypted_token`` is one Fernet token. "object" (a token of several
    secrets, e.g. an email and a password): ``encrypted_token`` is a JSON object of its field
    names, each mapped to that field's own Fernet token, as tokens.json holds it.
    """

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    encrypted_token: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default=KIND_STRING, server_default=KIND_STRING)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Daemon(Base):
    """One running daemon on this database: the active one or a standby, with its heartbeat."""

    __tablename__ = "daemons"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # "active" or "standby"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    since: Mapped[datetime] = mapped_column(UTCDateTime())  # when it took its current role
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())


#: The one row of ``leases``: the active daemon's lease.
LEASE_ACTIVE = "active"


class Lease(Base):
    """Who is the active daemon on a shared PostgreSQL database (CONTRACT section 10): one row,
    ``name`` "active". ``expires_at`` is by the database's clock (``now()``), never a daemon's;
    ``epoch`` grows by one at each takeover and fences the claims and outcome writes of the
    daemon that held it before. ``backend_pid``: the server process of the holder's lock
    connection (what a taking-over daemon ends with pg_terminate_backend).
    ``previous_expires_at``: when the lease before this epoch ended (or was to end): the former
    holder sent nothing after it."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    previous_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    backend_pid: Mapped[int | None] = mapped_column(Integer)


class Wakeup(Base):
    """An instance that a command changed behind the daemon's back: ``retry`` put it back to
    ``pending``. The active daemon, wherever it runs, reads this table about every second (a
    read of an empty table when nothing happened), schedules just these keys and deletes the
    rows it handled; a daemon that starts schedules everything and clears it."""

    __tablename__ = "wakeups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Notice(Base):
    """A warning already sent by email and channels (e.g. a token that expires before a
    booking's trigger), so that it goes out once, not at every reload or start."""

    __tablename__ = "notices"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Load(Base):
    """One load of the config files by the active daemon (at start, on SIGHUP, on a change):
    what ``reload`` prints and ``status`` sums up. Only the last ``LOADS_KEPT`` are kept."""

    __tablename__ = "loads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())  # when it finished
    reason: Mapped[str] = mapped_column(String(32))  # "start", "SIGHUP", "file change"
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    summary: Mapped[str] = mapped_column(Text)  # the counts, as the log line has them
    errors: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of the error lines
    at_once: Mapped[str] = mapped_column(Text, default="[]")  # JSON list: what books at once


#: How many loads the ``loads`` table keeps (the latest).
LOADS_KEPT = 20


class DatabaseConnectError(Exception):
    """The database server cannot be reached, refuses us, or does not let us make our tables.

    ``str()`` is one line naming the URL (password masked), host, port and database, the reason
    and the fix."""

    def __init__(self, url: str, reason: str, fix: str) -> None:
        self.url = mask_url(url)
        self.reason = reason
        self.fix = fix
        self.host, self.port, self.database = _server_of(url)
        super().__init__(
            f"cannot open the database {self.url} (host {self.host}, port {self.port}, "
            f"database {self.database}): {reason}; {fix}"
        )


def engine_url(url: str) -> URL:
    """``url`` as SQLAlchemy should open it: ``postgresql://`` (and ``postgres://``, as some
    hosts write it) with psycopg 3; any other URL as given."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername=POSTGRESQL_DRIVER)
    return parsed


def url_problem(url: str) -> str | None:
    """Why DATABASE_URL cannot be read as a database URL, in one line with the password masked
    (None when it can): asked before anything opens it, so a typo is a line, not a traceback."""
    try:
        backend = engine_url(url).get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return (
            f"{mask_url(url)!r} is not a database URL; expected sqlite:////path/to/db.sqlite or "
            "postgresql://user:password@host:5432/db"
        )
    if backend == "sqlite" and sqlite_path(url) is None:
        return (
            f"{url!r} is a SQLite database in memory: every booking and its state "
            "would be lost at a restart; give a file, e.g. sqlite:////app/data/db.sqlite"
        )
    return None


def is_postgresql(url: str) -> bool:
    """True for a PostgreSQL URL, whatever its driver."""
    return engine_url(url).get_backend_name() == "postgresql"


_PASSWORD_QUERY_KEYS = ("password", "sslpassword")


def mask_url(url: str) -> str:
    """``url`` fit for a log line or an error: its password (in the user part or the query)
    written ``***``, e.g. ``postgresql://user:***@host/db``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    query = {
        key: ("***" if key.lower() in _PASSWORD_QUERY_KEYS else value)
        for key, value in parsed.query.items()
    }
    rendered = parsed.set(query=query).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")  # the query's mask, unescaped for reading


def _server_of(url: str) -> tuple[str, str, str]:
    """Host, port and database of a server URL as libpq would resolve them, for messages."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "?", "?", "?"
    query_host = parsed.query.get("host")
    query_port = parsed.query.get("port")
    host = parsed.host or (query_host if isinstance(query_host, str) else None)
    port = parsed.port or (query_port if isinstance(query_port, str) else None)
    if host is None:
        host = "localhost (Unix socket)"
    if port is None:
        port = "5432" if parsed.get_backend_name() in ("postgresql", "postgres") else "default"
    return host, str(port), parsed.database or "(default)"


def connect_error(url: str, exc: BaseException) -> DatabaseConnectError:
    """The one-line error for a failed connection, with a fix a person can act on."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)
    text = " ".join(str(orig).split())
    first_line = " ".join((str(orig).strip().splitlines() or [""])[0].split())
    password = make_url(url).password if "://" in url else None
    if password:
        text = text.replace(str(password), "***")
        first_line = first_line.replace(str(password), "***")
    lowered = text.lower()
    host, port, database = _server_of(url)
    user = make_url(url).username or "(default)"
    if "password authentication failed" in lowered or sqlstate == "28P01":
        return DatabaseConnectError(
            url,
            f"password authentication failed for user {user!r}",
            "check the user name and password in DATABASE_URL",
        )
    if "no password supplied" in lowered:
        return DatabaseConnectError(
            url, f"the server wants a password for user {user!r}", "add it to DATABASE_URL"
        )
    if re.search(r'database "[^"]*" does not exist', lowered) or sqlstate == "3D000":
        return DatabaseConnectError(
            url,
            f"database {database!r} does not exist",
            f"create it (createdb -h {host} -p {port} -U {user} {database}) or fix the "
            "database name in DATABASE_URL",
        )
    if re.search(r'role "[^"]*" does not exist', lowered):
        return DatabaseConnectError(
            url, f"user {user!r} does not exist", "create it or fix the user name in DATABASE_URL"
        )
    if "pg_hba.conf" in lowered or sqlstate == "28000":
        return DatabaseConnectError(
            url,
            "the server does not accept this user from this machine (pg_hba.conf)",
            "allow it in the server's pg_hba.conf, or check the user, database and sslmode in "
            "DATABASE_URL",
        )
    if "permission denied" in lowered or sqlstate == "42501":
        return DatabaseConnectError(
            url,
            f"user {user!r} may not create courtbot's tables ({first_line})",
            f"make {user!r} the database's owner (ALTER DATABASE {database} OWNER TO {user}) "
            f"or grant it CREATE on the schema (GRANT CREATE ON SCHEMA public TO {user})",
        )
    if "connection refused" in lowered:
        return DatabaseConnectError(
            url,
            "connection refused",
            f"check that PostgreSQL runs at {host} port {port} and accepts TCP connections, "
            "or fix the host and port in DATABASE_URL",
        )
    if "could not translate host name" in lowered or "name or service not known" in lowered:
        return DatabaseConnectError(
            url, f"unknown host {host!r}", "fix the host name in DATABASE_URL"
        )
    if "timeout expired" in lowered or "timed out" in lowered:
        return DatabaseConnectError(
            url,
            f"no answer within {_connect_timeout(url)} s",
            "check the host and port in DATABASE_URL and that the network lets this machine "
            "reach the server",
        )
    if isinstance(orig, ModuleNotFoundError | NoSuchModuleError):
        return DatabaseConnectError(
            url,
            f"no driver for {make_url(url).drivername!r} ({text})",
            "write the URL as postgresql://user:password@host/db (psycopg 3, which "
            "requirements.txt installs)",
        )
    return DatabaseConnectError(url, text or orig.__class__.__name__, "check DATABASE_URL")


def _connect_timeout(url: str) -> int:
    """The connect timeout in force for ``url``: its own ``connect_timeout``, else ours."""
    try:
        value = make_url(url).query.get("connect_timeout")
        return int(value) if isinstance(value, str) else CONNECT_TIMEOUT_SECONDS
    except (ArgumentError, ValueError):
        return CONNECT_TIMEOUT_SECONDS


#: Every PostgreSQL connection (the pool's and the leadership's): an idle one is probed after a
#: second (keepalives), unacknowledged data fails it after TCP_USER_TIMEOUT_MS, and the server
#: ends a statement after STATEMENT_TIMEOUT_MS. A network that drops packets is noticed within
#: seconds, not when TCP gives up (about 15 minutes).
KEEPALIVE_IDLE_SECONDS = 1
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_COUNT = 2
TCP_USER_TIMEOUT_MS = 3000
STATEMENT_TIMEOUT_MS = 15_000


def postgresql_connect_args(url: str) -> dict[str, Any]:
    """libpq options for every PostgreSQL connection: a bounded connect (the URL's own
    ``connect_timeout`` wins), TCP keepalives and a TCP user timeout so that a dead server or a
    network that drops packets is noticed in seconds, a statement timeout, and a name in
    pg_stat_activity."""
    return {
        "connect_timeout": _connect_timeout(url),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE_SECONDS,
        "keepalives_interval": KEEPALIVE_INTERVAL_SECONDS,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        "application_name": "courtbot",
    }


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
        # Each connection would keep up to 2 MB of pages (SQLite's default) for the daemon's
        # life after a scan; its queries are small lookups, and the kernel caches the file.
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
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
    """An engine for ``url``. For SQLite: WAL, busy timeout, the file created 0600. For a
    database server: a first connection is made here, so that an unreachable or misconfigured
    one raises DatabaseConnectError (one line, password masked) rather than failing later.

    With ``create`` the tables (and columns added since a database was made) are created when
    missing.
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
    target = engine_url(url)
    postgresql = target.get_backend_name() == "postgresql"
    if postgresql:
        # A connection the server dropped (restart, failover, idle timeout) is replaced, not
        # handed to a booking.
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = postgresql_connect_args(url)
    try:
        engine = create_engine(target, **kwargs)
    except (ModuleNotFoundError, NoSuchModuleError) as exc:
        raise connect_error(url, exc) from None
    if path is not None:
        event.listen(engine, "connect", _sqlite_pragmas)
        if create:
            _enable_wal(engine)
            Base.metadata.create_all(engine)
            add_missing_columns(engine)
            add_missing_indexes(engine)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{path}{suffix}").chmod(0o600)
        return engine
    if target.get_backend_name() == "sqlite":  # in-memory SQLite
        if create:
            Base.metadata.create_all(engine)
        return engine
    try:
        with engine.begin() as conn:
            if create and postgresql:
                # Daemons starting together (an active one and its standbys) would race to
                # create the same tables: one at a time, for this transaction.
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
            if create:
                Base.metadata.create_all(conn)
                add_missing_columns(conn)
    except DBAPIError as exc:
        engine.dispose()
        raise connect_error(url, exc) from None
    return engine


#: The advisory lock that serializes creating the tables on PostgreSQL.
_SCHEMA_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"courtbot:schema").digest()[:8], "big", signed=True
)
#: The same, for leader.Leadership (which may create the leases table before make_engine).
SCHEMA_LOCK_KEY = _SCHEMA_LOCK_KEY


def add_missing_columns(bind: Engine | Connection) -> list[str]:
    """Add the columns that a database made by an earlier release lacks (``create_all`` only
    creates whole tables; each added column is nullable or has a default, so existing rows
    read as before). Returns the names added."""
    inspector = inspect(bind)
    added = []
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = CreateColumn(column).compile(dialect=inspector.dialect)
            statement = f"ALTER TABLE {table.name} ADD COLUMN {ddl}"
            if isinstance(bind, Engine):
                with bind.begin() as conn:
                    conn.exec_driver_sql(statement)
            else:
                bind.exec_driver_sql(statement)
            added.append(f"{table.name}.{column.name}")
    return added


def add_missing_indexes(engine: Engine) -> None:
    """Create the indexes of existing tables that the database lacks: one that a load was
    building after its rows (``index_built_after``) when the process died."""
    with engine.begin() as conn:
        inspector = inspect(conn)
        for table in Base.metadata.sorted_tables:
            if not table.indexes or not inspector.has_table(table.name):
                continue
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn)


@contextlib.contextmanager
def index_built_after(factory: sessionmaker[Session], index: Index) -> Iterator[None]:
    """On SQLite: ``index`` dropped for the block and built again after it (also when it
    fails), from the rows in one pass, which is cheaper than inserting many rows into it one
    at a time in no order. A process that dies in between gets it back at its next start
    (``add_missing_indexes``). Elsewhere nothing is done: PostgreSQL's ``DROP INDEX`` would
    lock the table against every reader. Building it holds SQLite's write lock for about a
    tenth of a second for 52,000 rows (a claim waits that long; no send does). When the block
    fails, a failure to build it again is logged, not raised: the block's error is the one to
    report (a full disk would fail both)."""
    with transaction(factory) as session:
        conn = session.connection()
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            index.drop(conn, checkfirst=True)
    try:
        yield
    except BaseException:
        if sqlite:
            try:
                _create_index(factory, index)
            except Exception as exc:  # noqa: BLE001 (the block's error is raised instead)
                logger.warning(
                    "index %s could not be built again (%s): the next start builds it",
                    index.name,
                    error_text(exc),
                )
        raise
    if sqlite:
        _create_index(factory, index)


def _create_index(factory: sessionmaker[Session], index: Index) -> None:
    with transaction(factory) as session:
        index.create(session.connection(), checkfirst=True)


def add_missing_tables(engine: Engine) -> None:
    """Create the tables that a database made by an earlier release lacks (``wakeups``), for a
    command that writes to a database no daemon of this release has opened yet."""
    with engine.begin() as conn:
        if engine.url.get_backend_name() == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        Base.metadata.create_all(conn, checkfirst=True)


def close_idle_connections(engine: Engine) -> None:
    """Close the pool's idle connections, and with them what they cache (SQLite keeps up to
    2 MB of pages per connection). A connection checked out by a session under way stays with
    that session and is closed when it is given back; the next checkout opens a fresh one. An
    in-memory SQLite database lives only in its connections: left alone."""
    if engine.url.get_backend_name() == "sqlite" and sqlite_path(str(engine.url)) is None:
        return
    engine.dispose(close=True)


def has_tables(engine: Engine) -> bool:
    """True when the database already holds courtbot's tables."""
    return inspect(engine).has_table(Instance.__tablename__)


def has_table(engine: Engine, name: str) -> bool:
    """True when the database holds the table ``name`` (an older one may lack a newer table)."""
    return inspect(engine).has_table(name)


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
