"""Which daemon books: on PostgreSQL one *active* daemon and any number of *standbys*.

Leadership is a PostgreSQL session advisory lock held on a dedicated connection (autocommit,
not from the pool). The server releases it the moment the holder's process dies or its
connection drops, so a standby that tries for it about every second takes over within
seconds, kill -9 included. The active daemon checks the lock's connection every fraction of a
second (``still_held``) and stops booking as soon as it fails; TCP keepalives and a TCP user
timeout on that connection make the holder notice a cut network before the server frees the
lock (see KEEPALIVE_* and SERVER_KEEPALIVE_*).

Each daemon also holds a *presence* lock keyed on its own id, on a second dedicated connection:
a claim (``schedules.owner``) whose owner is no longer present belongs to a dead daemon and is
recovered as after a crash; one whose owner is present (say, an active daemon that lost only
its leadership connection and is finishing a request in flight) is left to it.

The ``daemons`` table lists the daemons with their role and heartbeat, for ``status``.

On SQLite the file lock beside the database already allows only one daemon: LocalLeadership
is always active.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, delete, select, text, update

import models
from models import Daemon

logger = logging.getLogger(__name__)


class _OnFirstUse:
    """psycopg, imported when first used: only a daemon on PostgreSQL needs it, and importing
    it takes 7 MB that a daemon on SQLite would keep for its whole life."""

    def __getattr__(self, name: str) -> Any:
        import psycopg  # noqa: PLC0415 (on purpose: see above)

        return getattr(psycopg, name)


if TYPE_CHECKING:
    import psycopg
else:
    psycopg = _OnFirstUse()

ACTIVE = "active"
STANDBY = "standby"
ROLES = (ACTIVE, STANDBY)

#: The name the leadership lock's key is derived from; one leader per database (advisory locks
#: are per database, so several courtbot databases on one server do not interfere).
LEADER_LOCK_NAME = "courtbot:active"
#: How often a standby tries for the lock; the takeover time is about this plus detection.
POLL_SECONDS = 1.0
#: How often the active daemon checks that it still holds the lock.
CHECK_SECONDS = 0.25
#: A daemon that lost leadership waits this long before it contends again, so that a healthy
#: standby (which tries every POLL_SECONDS) takes over rather than the one whose connection failed.
REJOIN_SECONDS = 2 * POLL_SECONDS
#: A new active daemon waits this long before it books, so that an old one whose connection
#: was cut has noticed (it checks every CHECK_SECONDS) and stopped.
SETTLE_SECONDS = 2 * CHECK_SECONDS
#: Every query on a leadership connection is tiny; one that takes longer means trouble.
STATEMENT_TIMEOUT_MS = 2000
#: The holder's side: a cut network fails its next check within about TCP_USER_TIMEOUT_MS
#: (unacknowledged data), and an idle connection is probed after a second.
TCP_USER_TIMEOUT_MS = 2000
KEEPALIVE_IDLE_SECONDS = 1
KEEPALIVE_INTERVAL_SECONDS = 1
KEEPALIVE_COUNT = 2
#: The server's side, set per session: it frees the lock of a client it cannot reach after
#: about idle + interval x count = 5 s, later than the holder notices (about 2 s).
SERVER_KEEPALIVE_IDLE_SECONDS = 3
SERVER_KEEPALIVE_INTERVAL_SECONDS = 1
SERVER_KEEPALIVE_COUNT = 2


def advisory_key(name: str) -> int:
    """The signed 64-bit advisory lock key for ``name`` (stable across versions and hosts)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def presence_key(ident: str) -> int:
    """The advisory lock key that daemon ``ident`` holds while it lives."""
    return advisory_key(f"courtbot:daemon:{ident}")


def new_daemon_id() -> str:
    """A fresh id for this daemon's life (its row in ``daemons``, its claims' ``owner``)."""
    return secrets.token_hex(8)


# pg_locks splits a bigint key in two oids (classid: high half, objid: low half, objsubid 1);
# int8 shifts wrap, which gives back the signed key.
_HELD_KEYS = """
SELECT (classid::int8 << 32) | objid::int8 FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 1 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_HOLD_CHECK = (
    _HELD_KEYS + " AND pid = pg_backend_pid() AND (classid::int8 << 32) | objid::int8 = %s"
)


def _conninfo(url: str) -> str:
    """A libpq URI for ``url`` (whatever driver name it carries)."""
    return models.engine_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Leadership:
    """Leadership of the daemons on one PostgreSQL database, for the daemon ``ident``.

    ``try_acquire`` (standby, about every second), ``still_held`` (active, every fraction of
    a second), ``release`` (clean stop or hand-over), ``close`` (at exit). Not thread-safe
    beyond ``active``, which any thread may read.
    """

    def __init__(self, url: str, ident: str, *, lock_name: str = LEADER_LOCK_NAME) -> None:
        self.url = url
        self.ident = ident
        self.key = advisory_key(lock_name)
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._presence_conn: psycopg.Connection[Any] | None = None
        self._held = False

    def __repr__(self) -> str:
        return f"<Leadership {self.ident} on {models.mask_url(self.url)} active={self._held}>"

    @property
    def active(self) -> bool:
        """True while this daemon holds leadership, as of the last check (no round trip)."""
        return self._held

    @property
    def backend_pid(self) -> int | None:
        """The server process of the lock's connection (what pg_terminate_backend takes)."""
        conn = self._lock_conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    def _connect(self, purpose: str) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                _conninfo(self.url),
                autocommit=True,
                connect_timeout=models.postgresql_connect_args(self.url)["connect_timeout"],
                keepalives=1,
                keepalives_idle=KEEPALIVE_IDLE_SECONDS,
                keepalives_interval=KEEPALIVE_INTERVAL_SECONDS,
                keepalives_count=KEEPALIVE_COUNT,
                tcp_user_timeout=TCP_USER_TIMEOUT_MS,
                application_name=f"courtbot {purpose} {self.ident}",
            )
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
            conn.execute(f"SET tcp_keepalives_idle = {SERVER_KEEPALIVE_IDLE_SECONDS}")
            conn.execute(f"SET tcp_keepalives_interval = {SERVER_KEEPALIVE_INTERVAL_SECONDS}")
            conn.execute(f"SET tcp_keepalives_count = {SERVER_KEEPALIVE_COUNT}")
        except psycopg.Error as exc:
            raise models.connect_error(self.url, exc) from None
        return conn

    def ensure_present(self) -> None:
        """Hold this daemon's presence lock (reconnecting if its connection was lost).

        Raises DatabaseConnectError when the server cannot be reached, RuntimeError when
        another live daemon has the same id."""
        conn = self._presence_conn
        if conn is not None and not conn.closed:
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error:
                conn.close()
        self._presence_conn = None
        conn = self._connect("presence")
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s)", (presence_key(self.ident),)
        ).fetchone()
        if not (row and row[0]):
            conn.close()
            raise RuntimeError(f"another live daemon has the id {self.ident!r}")
        self._presence_conn = conn

    def try_acquire(self) -> bool:
        """Try once, without waiting, to become the active daemon. True when this daemon
        holds leadership now (also when it already did). Raises DatabaseConnectError when the
        server cannot be reached (the caller logs it and tries again later)."""
        if self._held and self.still_held():
            return True
        self.ensure_present()
        conn = self._lock_conn
        if conn is None or conn.closed or conn.broken:
            self._lock_conn = conn = self._connect("leader")
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except psycopg.Error as exc:
            self._drop_lock_conn()
            raise models.connect_error(self.url, exc) from None
        self._held = bool(row and row[0])
        return self._held

    def still_held(self) -> bool:
        """A cheap check (one query on the lock's connection, bounded by the statement timeout
        and the TCP user timeout) that the server still shows this daemon holding the lock.
        False, and no longer ``active``, when it does not or the connection failed."""
        conn = self._lock_conn
        if not self._held or conn is None or conn.closed:
            self._held = False
            return False
        try:
            held = conn.execute(_HOLD_CHECK, (self.key,)).fetchone() is not None
        except psycopg.Error as exc:
            logger.warning(
                "leadership: lost the lock's connection to %s: %s",
                models.mask_url(self.url),
                " ".join(str(exc).split()) or exc.__class__.__name__,
            )
            self._drop_lock_conn()
            return False
        self._held = held
        return held

    def release(self) -> None:
        """Give leadership up (a standby may take it at once); stay connected and present."""
        if not self._held:
            return
        self._held = False
        conn = self._lock_conn
        if conn is None or conn.closed:
            return
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except psycopg.Error:
            self._drop_lock_conn()  # closing the session releases it all the same

    def alive_ids(self, idents: Iterable[str]) -> set[str]:
        """Those of ``idents`` whose daemon is alive (holds its presence lock), this one
        included. Raises DatabaseConnectError when the server cannot be reached."""
        self.ensure_present()
        assert self._presence_conn is not None
        try:
            held = {row[0] for row in self._presence_conn.execute(_HELD_KEYS).fetchall()}
        except psycopg.Error as exc:
            self._presence_conn.close()
            self._presence_conn = None
            raise models.connect_error(self.url, exc) from None
        return {ident for ident in idents if presence_key(ident) in held}

    def close(self) -> None:
        """Close both connections: leadership and presence end with them."""
        self._held = False
        self._drop_lock_conn()
        conn, self._presence_conn = self._presence_conn, None
        if conn is not None:
            conn.close()

    def _drop_lock_conn(self) -> None:
        self._held = False
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            conn.close()


class LocalLeadership:
    """SQLite: the file lock beside the database lets one daemon run, and it is active."""

    def __init__(self, url: str, ident: str) -> None:
        self.url = url
        self.ident = ident
        self._held = False

    @property
    def active(self) -> bool:
        return self._held

    @property
    def backend_pid(self) -> int | None:
        return None

    def ensure_present(self) -> None:
        return None

    def try_acquire(self) -> bool:
        self._held = True
        return True

    def still_held(self) -> bool:
        return self._held

    def release(self) -> None:
        self._held = False

    def alive_ids(self, idents: Iterable[str]) -> set[str]:
        """Only this daemon is alive: no other can run on the same SQLite database."""
        return {ident for ident in idents if ident == self.ident}

    def close(self) -> None:
        self._held = False


def leadership_for(url: str, ident: str) -> Leadership | LocalLeadership:
    """Leadership for a daemon on ``url``: shared on PostgreSQL, trivial on SQLite."""
    if models.is_postgresql(url):
        return Leadership(url, ident)
    return LocalLeadership(url, ident)


# --------------------------------------------------------------------------- the daemons table


@dataclass(frozen=True)
class DaemonState:
    """A row of ``daemons`` as ``status`` shows it; ``alive`` as of the query."""

    id: str
    host: str
    pid: int
    role: str
    started_at: datetime
    since: datetime
    heartbeat_at: datetime
    alive: bool


def present_ids(bind: Engine | Connection, idents: Iterable[str]) -> set[str]:
    """Those of ``idents`` whose daemon holds its presence lock (PostgreSQL only)."""
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return present_ids(conn, idents)
    held = {row[0] for row in bind.execute(text(_HELD_KEYS))}
    return {ident for ident in idents if presence_key(ident) in held}


def write_heartbeat(
    engine: Engine,
    *,
    ident: str,
    role: str,
    started_at: datetime,
    since: datetime,
    now: datetime,
    host: str | None = None,
    pid: int | None = None,
) -> None:
    """Record this daemon's row in ``daemons``: its role, since when, and ``now`` as its
    heartbeat. Only the daemon itself writes its row."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    values: dict[str, Any] = {
        "host": host or socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
        "role": role,
        "started_at": started_at,
        "since": since,
        "heartbeat_at": now,
    }
    with engine.begin() as conn:
        changed = conn.execute(update(Daemon).where(Daemon.id == ident).values(**values))
        if changed.rowcount == 0:
            conn.execute(Daemon.__table__.insert().values(id=ident, **values))


def list_daemons(
    engine: Engine, *, now: datetime, stale_after: timedelta = timedelta(seconds=60)
) -> list[DaemonState]:
    """Every row of ``daemons``, the active one first, then by ``since``. On PostgreSQL a
    daemon is alive while it holds its presence lock; on SQLite while its heartbeat is
    younger than ``stale_after``."""
    table = Daemon.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(*table.columns)).fetchall()
        if engine.dialect.name == "postgresql":
            alive = present_ids(conn, [row.id for row in rows])
        else:
            alive = {row.id for row in rows if now - row.heartbeat_at < stale_after}
    states = [DaemonState(**row._mapping, alive=row.id in alive) for row in rows]
    states.sort(key=lambda s: (not s.alive, s.role != ACTIVE, s.since, s.id))
    return states


def remove_daemon(engine: Engine, ident: str) -> None:
    """Remove this daemon's row (at a clean exit)."""
    with engine.begin() as conn:
        conn.execute(delete(Daemon).where(Daemon.id == ident))


def forget_dead(engine: Engine, *, now: datetime, older_than: timedelta) -> list[str]:
    """Remove the rows of daemons that are not alive and whose last heartbeat is older than
    ``older_than``; their ids."""
    dead = [
        state.id
        for state in list_daemons(engine, now=now, stale_after=older_than)
        if not state.alive and now - state.heartbeat_at > older_than
    ]
    if dead:
        with engine.begin() as conn:
            conn.execute(delete(Daemon).where(Daemon.id.in_(dead)))
    return dead
