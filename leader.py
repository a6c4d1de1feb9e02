"""Which daemon books: on PostgreSQL one *active* daemon and any number of *standbys*.

Being active is a *lease* in the ``leases`` table (CONTRACT section 10): holder, epoch, and an
expiry by the database's clock (``now()``, never a host's). The active daemon renews it every
RENEW_SECONDS, each renewal bounded by RENEW_DEADLINE_SECONDS; it knows from its last renewal
how long it may send (``proves``: a clock read, checked before every request to the club) and
stops strictly before a standby may take the lease. A standby takes it once it has expired or
its holder's session is gone, ending that session (``pg_terminate_backend``) if it must; each
takeover raises the epoch, the fencing token that claims carry and outcome writes are
conditional on (``instances.Fence``), and the new daemon takes the former one's claims over by
the lease's rules (``take_over``).

A PostgreSQL session advisory lock on a dedicated connection (autocommit, not from the pool)
is kept beside the lease as the fast path: the server releases it the moment the holder's
process dies or its connection drops. TCP keepalives and a TCP user timeout on that connection
make the holder notice a cut network quickly (see KEEPALIVE_* and SERVER_KEEPALIVE_*).

Each daemon also holds a *presence* lock keyed on its own id, on a second dedicated connection
(SQLite's claims of a live daemon are its own; ``status`` shows who is alive).

The ``daemons`` table lists the daemons with their role and heartbeat, for ``status``.

On SQLite the file lock beside the database already allows only one daemon: LocalLeadership
is always active.

``Roles`` is a daemon's role on its database and the loop's hooks for it (CONTRACT section 10);
``LeaderWatch`` is the thread that notices a lost role at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Connection, Engine, delete, select, text, update

import instances
import models
import watchdog
from models import Daemon

if TYPE_CHECKING:
    import bot
    import config_loader
    import notify
    import scheduler

logger = logging.getLogger(__name__)
#: What Roles says goes to the daemon's log, under the daemon's name (as it did in cli.py).
daemon_logger = logging.getLogger("courtbot")


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
#: The lease (CONTRACT section 10): what decides who is active. It lasts LEASE_SECONDS by the
#: database's clock from each renewal; the active daemon renews it every RENEW_SECONDS, and a
#: renewal that does not answer within RENEW_DEADLINE_SECONDS costs the role. A standby takes
#: it once it has expired (or at once when the holder's session is gone), so within about
#: LEASE_SECONDS + POLL_SECONDS + SETTLE_SECONDS (4 s) after the last renewal.
LEASE_NAME = models.LEASE_ACTIVE
LEASE_SECONDS = 2.5
RENEW_SECONDS = 1.0
RENEW_DEADLINE_SECONDS = 1.0
#: The holder believes its lease for LEASE_SECONDS - PROOF_MARGIN_SECONDS from the moment it
#: *sent* the renewal that succeeded (the database's now() is later than that moment), so it
#: stops sending strictly before a standby may take the lease.
PROOF_MARGIN_SECONDS = 0.5
#: A trigger instant's burst is sent only if the lease is proven for this long after the check
#: (every request of the burst leaves within it).
BURST_PROOF_SECONDS = 0.2
#: A claim the former active daemon may have sent is held back this much longer than
#: HTTP_TIMEOUT_SECONDS after that daemon's lease ended (clocks of hosts differ a little).
HOLD_MARGIN_SECONDS = 1.0
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
# The leases table as models.Lease declares it (a Leadership may come before make_engine).
_LEASE_TABLE = """
CREATE TABLE IF NOT EXISTS leases (
    name VARCHAR(32) NOT NULL PRIMARY KEY, holder VARCHAR(64), epoch BIGINT,
    expires_at TIMESTAMP WITHOUT TIME ZONE, previous_expires_at TIMESTAMP WITHOUT TIME ZONE,
    backend_pid INTEGER)
"""
# Take the lease when it is free, expired (by the database's clock), or its holder's session is
# gone: a new epoch, this session recorded, and when the former lease ended.
_TAKE_LEASE = """
WITH old AS (SELECT holder, epoch, expires_at, backend_pid FROM leases
             WHERE name = %(name)s FOR UPDATE)
UPDATE leases AS l SET holder = %(me)s, epoch = COALESCE(old.epoch, 0) + 1,
    backend_pid = pg_backend_pid(),
    expires_at = timezone('UTC', now()) + make_interval(secs => %(ttl)s),
    previous_expires_at = COALESCE(old.expires_at, timezone('UTC', now()))
FROM old
WHERE l.name = %(name)s AND (old.holder IS NULL OR old.expires_at IS NULL
    OR old.expires_at <= timezone('UTC', now())
    OR old.backend_pid IS NULL
    OR NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = old.backend_pid))
RETURNING l.epoch, old.holder, old.backend_pid
"""
_RENEW_LEASE = """
UPDATE leases SET expires_at = timezone('UTC', now()) + make_interval(secs => %(ttl)s)
WHERE name = %(name)s AND holder = %(me)s AND epoch = %(epoch)s
    AND expires_at > timezone('UTC', now())
RETURNING epoch
"""
_RELEASE_LEASE = """
UPDATE leases SET holder = NULL, backend_pid = NULL, expires_at = timezone('UTC', now())
WHERE name = %(name)s AND holder = %(me)s AND epoch = %(epoch)s
"""


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
        #: Whether the advisory lock is held too (the lease decides; the lock is the fast path).
        self._locked = False
        #: The lease's epoch while this daemon holds it (the fencing token of its claims).
        self.epoch: int | None = None
        #: Until when (time.monotonic) this daemon may send: its last renewal's send time plus
        #: LEASE_SECONDS - PROOF_MARGIN_SECONDS.
        self._valid_until = 0.0
        self._next_renew = 0.0
        self._lease_ready = False

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

    def proves(self, ahead: float = 0.0) -> bool:
        """Whether this daemon's lease is proven valid for ``ahead`` seconds more, by its last
        renewal (no round trip: a monotonic clock read). False once it cannot prove it."""
        return self._held and time.monotonic() + ahead < self._valid_until

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
        """Try once, without waiting, to become the active daemon: take the lease when it is
        free, expired, or its holder's session is gone (ending that session's lock if it must).
        True when this daemon holds the lease now (also when it already did). Raises
        DatabaseConnectError when the server cannot be reached (the caller logs it and tries
        again later)."""
        if self._held and self.still_held():
            return True
        self.ensure_present()
        conn = self._lock_conn
        if conn is None or conn.closed or conn.broken:
            self._lock_conn = conn = self._connect("leader")
            self._locked = False
        try:
            self._lease_table(conn)
            if not self._locked:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                self._locked = bool(row and row[0])
            took = self._take_lease(conn)
            if took and not self._locked:
                self._locked = self._lock_after_takeover(conn)
            elif not took and self._locked:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                self._locked = False
        except psycopg.Error as exc:
            self._drop_lock_conn()
            raise models.connect_error(self.url, exc) from None
        self._held = took
        return took

    def _lease_table(self, conn: psycopg.Connection[Any]) -> None:
        """The leases table and its row (once per connection's life: cheap after)."""
        if self._lease_ready:
            return
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (models.SCHEMA_LOCK_KEY,))
            conn.execute(_LEASE_TABLE)
            conn.execute(
                "INSERT INTO leases (name, epoch) VALUES (%s, 0) ON CONFLICT (name) DO NOTHING",
                (LEASE_NAME,),
            )
        self._lease_ready = True

    def _take_lease(self, conn: psycopg.Connection[Any]) -> bool:
        sent = time.monotonic()
        row = conn.execute(
            _TAKE_LEASE, {"name": LEASE_NAME, "me": self.ident, "ttl": LEASE_SECONDS}
        ).fetchone()
        if row is None:
            return False
        epoch, holder, old_pid = row
        self.epoch = int(epoch)
        self._valid_until = sent + LEASE_SECONDS - PROOF_MARGIN_SECONDS
        self._next_renew = sent + RENEW_SECONDS
        if holder is not None and old_pid is not None and old_pid != conn.info.backend_pid:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s",
                (old_pid,),
            ).fetchone()
            if ended and ended[0]:
                daemon_logger.warning(
                    "leadership: the lease of daemon %s had expired; ended its database "
                    "session (server pid %d) and its lock",
                    holder,
                    old_pid,
                )
        return True

    def _lock_after_takeover(self, conn: psycopg.Connection[Any]) -> bool:
        """The advisory lock, once the former holder's session has ended (briefly retried)."""
        deadline = time.monotonic() + 1.0
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            if row and row[0]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def still_held(self) -> bool:
        """A cheap check that this daemon still holds the lease: the local proof, and every
        RENEW_SECONDS a renewal (otherwise the lock's presence), one round trip that must
        answer within RENEW_DEADLINE_SECONDS. False, and no longer ``active``, when the lease
        is gone or cannot be proven, or the connection failed."""
        conn = self._lock_conn
        if not self._held or conn is None or conn.closed:
            self._held = False
            return False
        now = time.monotonic()
        if now >= self._valid_until:
            daemon_logger.error(
                "leadership: this daemon's lease on %s ran out before it could renew it (the "
                "process was paused, or the database did not answer); it sends nothing more",
                models.mask_url(self.url),
            )
            self._abandon_lock_conn()
            return False
        renew = now >= self._next_renew
        try:
            held = _with_deadline(lambda: self._check(conn, renew), RENEW_DEADLINE_SECONDS)
        except TimeoutError:
            daemon_logger.error(
                "leadership: the database at %s did not answer within %g s (a network that "
                "drops packets, or a stalled server): this daemon can no longer prove its lease "
                "and stops booking",
                models.mask_url(self.url),
                RENEW_DEADLINE_SECONDS,
            )
            self._abandon_lock_conn()
            return False
        except psycopg.Error as exc:
            logger.warning(
                "leadership: lost the lock's connection to %s: %s",
                models.mask_url(self.url),
                " ".join(str(exc).split()) or exc.__class__.__name__,
            )
            self._drop_lock_conn()
            return False
        self._held = bool(held)
        return self._held

    def _check(self, conn: psycopg.Connection[Any], renew: bool) -> bool:
        if not renew:
            if not self._locked:
                return True  # the lease alone: renewed every RENEW_SECONDS
            return conn.execute(_HOLD_CHECK, (self.key,)).fetchone() is not None
        sent = time.monotonic()
        row = conn.execute(
            _RENEW_LEASE,
            {"name": LEASE_NAME, "me": self.ident, "epoch": self.epoch, "ttl": LEASE_SECONDS},
        ).fetchone()
        if row is None:
            daemon_logger.error(
                "leadership: this daemon's lease on %s was taken over or had expired; it sends "
                "nothing more",
                models.mask_url(self.url),
            )
            return False
        self._valid_until = sent + LEASE_SECONDS - PROOF_MARGIN_SECONDS
        self._next_renew = sent + RENEW_SECONDS
        return True

    def release(self) -> None:
        """Give leadership up (a standby may take it at once); stay connected and present."""
        if not self._held:
            return
        self._held = False
        self._valid_until = 0.0
        conn = self._lock_conn
        if conn is None or conn.closed:
            return

        def give_up() -> None:
            conn.execute(
                _RELEASE_LEASE, {"name": LEASE_NAME, "me": self.ident, "epoch": self.epoch}
            )
            if self._locked:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
                self._locked = False

        try:
            _with_deadline(give_up, RENEW_DEADLINE_SECONDS)
        except TimeoutError:
            self._abandon_lock_conn()  # the lease expires by itself
        except psycopg.Error:
            self._drop_lock_conn()  # closing the session releases the lock; the lease expires

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
        self._locked = False
        self._valid_until = 0.0
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            conn.close()

    def _abandon_lock_conn(self) -> None:
        """Leave the lock's connection to the thread stuck on it (closing it here could wait
        as long): that thread, or the process's end, closes it."""
        self._held = False
        self._locked = False
        self._valid_until = 0.0
        self._lock_conn = None


def _with_deadline(func: Callable[[], bool | None], seconds: float) -> bool | None:
    """``func()`` in a thread of its own; TimeoutError when it has not returned within
    ``seconds`` (the thread is left to finish whenever it can)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = func()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            box["error"] = exc

    thread = threading.Thread(target=run, name="courtbot-lease", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


class LocalLeadership:
    """SQLite: the file lock beside the database lets one daemon run, and it is active."""

    def __init__(self, url: str, ident: str) -> None:
        self.url = url
        self.ident = ident
        self._held = False

    @property
    def active(self) -> bool:
        return self._held

    #: No lease on SQLite: the file lock is the fence.
    epoch: int | None = None

    @property
    def backend_pid(self) -> int | None:
        return None

    def proves(self, ahead: float = 0.0) -> bool:
        return self._held

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


# --------------------------------------------------------------------------- active and standbys


class Host(Protocol):
    """What Roles needs of the daemon it serves (``daemon.Daemon``)."""

    settings: config_loader.Settings
    engine: models.Engine | None
    factory: models.SessionFactory | None
    scheduler: scheduler.Scheduler | None
    notifier: notify.Notifier | None
    ctx: bot.BookingContext | None

    def become_active(self, reason: str) -> None: ...
    def write_pid(self) -> None: ...
    def heartbeat(self, state: str | None = None) -> None: ...
    def reset_watch(self) -> None: ...
    def wake(self) -> None: ...
    def sync(self) -> scheduler.SyncReport: ...


#: How often a daemon on a shared database writes its row in ``daemons`` (a standby: its
#: heartbeat file too), and the active one looks for claims of daemons that died.
BEAT_SECONDS = 5.0
#: How often the active daemon on a shared database looks for pending instances changed
#: elsewhere (a booking handed back, a `retry` on another host): as often as the watchdog
#: looks, so that their jobs exist before it would call them overdue.
LOOK_SECONDS = watchdog.INTERVAL
#: A stopped daemon's row in ``daemons`` is removed this long after its last heartbeat.
FORGET_AFTER = timedelta(minutes=1)
#: How long a claim's owner that seems gone is given to show it lives (a standby takes its
#: presence lock again at its next try, every POLL_SECONDS).
PRESENCE_GRACE_SECONDS = 1.5 * POLL_SECONDS


def take_over(
    daemon: Host, fence: instances.Fence, held: list[tuple[str, datetime]], *, sync: bool
) -> list[tuple[str, datetime]]:
    """The claims of former active daemons (an older lease), taken over by the active one
    holding ``fence`` (CONTRACT section 10): never sent ones pending at once, maybe sent ones
    held until HTTP_TIMEOUT_SECONDS after that daemon's lease ended, then sent again with the
    same Idempotency-Key. ``held``: those held at the last look; returns those held now."""
    assert daemon.factory is not None
    done = instances.take_over_claims(
        daemon.factory,
        fence,
        datetime.now(UTC),
        hold_seconds=daemon.settings.http_timeout + HOLD_MARGIN_SECONDS,
        margin_seconds=HOLD_MARGIN_SECONDS,
    )
    new_holds = [key for key, _ in done.held if key not in dict(held)]
    if new_holds:
        daemon_logger.warning(
            "%d booking(s) of the former active daemon may have been sent by it: held until "
            "%s (HTTP_TIMEOUT_SECONDS after its lease ended), then sent again with the same "
            "Idempotency-Key: %s",
            len(new_holds),
            max(until for _, until in done.held).isoformat(timespec="seconds"),
            ", ".join(new_holds),
        )
    if done.released:
        daemon_logger.info(
            "%d booking(s) claimed by the former active daemon were never sent (their trigger "
            "is after its lease ended): booked here: %s",
            len(done.released),
            ", ".join(done.released),
        )
    if done.retried:
        daemon_logger.warning(
            "%d booking(s) were interrupted by a stop; retried now with the same "
            "Idempotency-Key: %s",
            len(done.retried),
            ", ".join(done.retried),
        )
    if daemon.notifier is not None:
        for row in done.failed:
            daemon.notifier.notify(instances.outcome_of(row))
    if sync and (done.released or done.retried or done.failed):
        daemon.sync()
    return done.held


class LeaderWatch:
    """A thread that checks every ``CHECK_SECONDS`` that the daemon still holds the
    active role, and calls ``on_lost`` once, at once, when it does not."""

    def __init__(self, lead: Leadership | LocalLeadership, on_lost: Callable[[], None]) -> None:
        self.lead = lead
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="courtbot-leader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_SECONDS):
            try:
                held = self.lead.still_held()
            except Exception:
                daemon_logger.exception("leadership check failed")
                held = False
            if not held:
                if not self._stop.is_set():
                    self.on_lost()
                return

    def stop(self) -> None:
        """Stop checking (and wait for a check under way, so nobody else uses the lock's
        connection at the same time)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)


class Roles:
    """This daemon's role on its database (CONTRACT section 10) and the loop's hooks for it.

    On SQLite the file lock let only this daemon start: it is active at once and stays so. On
    PostgreSQL it is active while it holds ``Leadership``; otherwise a standby, which
    tries for it every ``POLL_SECONDS``, writes its heartbeat, ignores SIGHUP, and
    sends and loads nothing. The active daemon checks the lock every ``CHECK_SECONDS``
    from a thread of its own and, once it is lost, stops booking at once (``may_send``
    cleared: no request leaves, the job store is fenced) and goes back to standby with a
    fresh scheduler when it wins the role again.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ident = new_daemon_id()
        self.lead = leadership_for(url, self.ident)
        self.shared = isinstance(self.lead, Leadership)
        self.beat_seconds = BEAT_SECONDS
        self.role = STANDBY
        self.started_at = datetime.now(UTC)
        self.since = self.started_at
        self._watch: LeaderWatch | None = None
        self._lost = threading.Event()
        self._next_try = 0.0
        self._next_beat = 0.0
        self._next_look = 0.0
        self._outage: str | None = None
        #: The context of the last period as the active daemon, while its bookings end.
        self._leftover: bot.BookingContext | None = None
        self._pending_mark: tuple[int, datetime | None] | None = None
        #: Claims of a former active daemon held back until its requests could have ended.
        self._held_claims: list[tuple[str, datetime]] = []

    @property
    def is_active(self) -> bool:
        return self.role == ACTIVE

    def fence(self) -> instances.Fence | None:
        """The fencing token of this daemon's lease, for its booking context (None alone)."""
        epoch = self.lead.epoch
        if not self.shared or epoch is None:
            return None
        return instances.Fence(self.ident, epoch)

    # -- hooks of the daemon and its loop ------------------------------------------------

    def join(self, daemon: Host) -> None:
        """At start: the active role if it is free (always on SQLite), else standby."""
        try:
            acquired = self.lead.try_acquire()
        except models.DatabaseConnectError as exc:
            self._report_outage(exc)
            acquired = False
        if acquired:
            self._activate(daemon, "start")
        else:
            self._wait(daemon, rejoin=False)

    def next_due(self) -> float:
        """When (``time.monotonic``) the loop must call ``tick`` at the latest."""
        if not self.shared:
            return math.inf  # alone on its database: nothing to beat or try
        if self.is_active:
            return min(self._next_beat, self._next_look)
        return min(self._next_try, self._next_beat)

    def tick(self, daemon: Host, signals: set[int]) -> bool:
        """One turn of the loop. True when the rest of the turn (reloads, the active
        daemon's heartbeat) is not for this daemon now: it is a standby, or just became one."""
        if self.is_active:
            if self._lost.is_set():
                self._step_down(daemon)
                return True
            now = time.monotonic()
            if self.shared and now >= self._next_look:
                self._next_look = now + LOOK_SECONDS
                self._pick_up(daemon)
            if self.shared and now >= self._next_beat:
                self.beat(daemon)
            return False
        if signal.SIGHUP in signals:
            daemon_logger.info(
                "SIGHUP received: this daemon is a standby; it loads the files when it becomes "
                "the active one"
            )
        now = time.monotonic()
        if now >= self._next_try:
            self._next_try = now + POLL_SECONDS
            if self._try_acquire():
                self._activate(daemon, "became active")
                return True
        if now >= self._next_beat:
            self._beat_standby(daemon)
        return True

    def before_sync(self, factory: models.SessionFactory) -> None:
        """Note the pending instances as they are before the jobs follow them, so that a
        change made elsewhere afterwards is seen (shared databases only)."""
        if self.shared:
            self._pending_mark = instances.pending_mark(factory)

    def live_owners(self, factory: models.SessionFactory) -> frozenset[str]:
        """The owners of ``booking`` claims whose daemon lives (this one included): their
        claims are theirs, never taken over."""
        owners = {owner for owner in instances.booking_owners(factory) if owner}
        return frozenset(self._alive(owners - {self.ident}) | {self.ident})

    def _alive(self, owners: set[str]) -> set[str]:
        """Those of ``owners`` whose daemon lives. One that seems gone is looked at again
        after PRESENCE_GRACE_SECONDS: a daemon whose connections were cut (not killed) takes
        its presence again within a second, and its claims stay its own."""
        if not owners:
            return set()
        alive = self.lead.alive_ids(owners)
        if self.shared and owners - alive:
            time.sleep(PRESENCE_GRACE_SECONDS)
            alive |= self.lead.alive_ids(owners)
        return alive

    def hand_over(self, daemon: Host) -> None:
        """At a clean stop, before waiting for bookings in flight: no request leaves any more
        (a booking waiting for its trigger or a retry goes back to pending) and a standby may
        take the role at once."""
        if self.shared and daemon.ctx is not None:
            daemon.ctx.may_send.clear()
            daemon.ctx.stop.set()
            busy = bool(daemon.ctx.under_way())
            if busy and self.is_active:
                # Its outcome is written under this lease: kept (renewed) until it ends (leave).
                self._leftover = daemon.ctx
                return
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self.lead.release()

    def leave(self, daemon: Host) -> None:
        """At exit, after the bookings in flight (those of an earlier period as the active
        daemon too): this daemon's row goes, then its locks."""
        leftover = self._leftover
        if leftover is not None:
            deadline = time.monotonic() + daemon.settings.http_timeout + 1.0
            while leftover.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self.lead.release()
        if daemon.engine is not None:
            try:
                remove_daemon(daemon.engine, self.ident)
            except Exception as exc:  # noqa: BLE001 (the row is forgotten later anyway)
                daemon_logger.warning("could not remove this daemon's row: %s", self._one_line(exc))
        self.lead.close()

    # -- the active role -----------------------------------------------------------------

    def _activate(self, daemon: Host, reason: str) -> None:
        self.role = ACTIVE
        self.since = datetime.now(UTC)
        self._lost.clear()
        self._next_beat = time.monotonic() + self.beat_seconds
        self._next_look = time.monotonic() + LOOK_SECONDS
        if not self.shared:
            daemon.become_active(reason)
            return
        daemon_logger.info(
            "active: this daemon (%s pid %d) is the active one on %s",
            socket.gethostname(),
            os.getpid(),
            models.mask_url(self.url),
        )
        # An active daemon whose connection was cut notices within CHECK_SECONDS and stops
        # sending: give it that time before anything is sent from here.
        time.sleep(SETTLE_SECONDS)
        self._watch = LeaderWatch(self.lead, lambda: self._on_lost(daemon))
        self._watch.start()
        try:
            self._take_over(daemon, sync=False)  # become_active loads and schedules it all
            daemon.become_active(reason)
        except Exception:
            daemon_logger.exception("could not take up the active role; back to standby")
            self._on_lost(daemon, quiet=True)
            self._step_down(daemon)

    def _on_lost(self, daemon: Host, *, quiet: bool = False) -> None:
        """The role is gone (the lock's connection failed, or it was taken): stop booking now,
        from whatever thread noticed; the loop steps down next."""
        ctx = daemon.ctx
        if ctx is not None:
            ctx.may_send.clear()
            ctx.stop.set()
        self._lost.set()
        if not quiet:
            daemon_logger.error(
                "lost the active role on %s (its database connection failed): stopped booking "
                "at once; a booking in flight may finish; a standby takes over",
                models.mask_url(self.url),
            )
            # `health` says 1 at once, until this daemon reaches the database again (its beat
            # as a standby): the loop may be held up by a database that does not answer.
            with contextlib.suppress(OSError):
                daemon.heartbeat(
                    f"lost the active role on {models.mask_url(self.url)}: the database "
                    "connection failed or did not answer"
                )
        daemon.wake()

    def beat(self, daemon: Host) -> None:
        """The active daemon's beat on a shared database: its row in ``daemons``, the claims
        of daemons that died, and pending instances changed elsewhere. (Alone on SQLite it
        has nothing to say: ``status`` reads its pid file and heartbeat.)"""
        if not self.shared:
            return
        assert daemon.engine is not None and daemon.factory is not None
        self._next_beat = time.monotonic() + self.beat_seconds
        now = datetime.now(UTC)
        try:
            self._write_row(daemon, now)
            self._take_over(daemon)
            forget_dead(daemon.engine, now=now, older_than=FORGET_AFTER)
        except Exception as exc:  # noqa: BLE001 (the database is away: the watch acts on it)
            self._report_outage(exc)
            return
        self._recovered()

    def _pick_up(self, daemon: Host) -> None:
        """Pending instances changed elsewhere (a booking handed back by a daemon that lost the
        role, a `retry` run on another host): their jobs follow. A cheap look (a count and a
        time on the status index) unless something changed."""
        assert daemon.factory is not None
        try:
            if self._held_claims:
                self._take_over(daemon)
            if instances.pending_mark(daemon.factory) == self._pending_mark:
                return
            changed = daemon.sync()
        except Exception as exc:  # noqa: BLE001 (the database is away: the watch acts on it)
            self._report_outage(exc)
            return
        if changed.added or changed.moved or changed.removed:
            daemon_logger.info(
                "instances changed elsewhere: jobs %d added, %d moved, %d removed",
                changed.added,
                changed.moved,
                changed.removed,
            )

    def _take_over(self, daemon: Host, *, sync: bool = True) -> None:
        """Claims of former active daemons, by the lease's rules (``take_over``)."""
        fence = self.fence()
        if fence is not None and daemon.factory is not None:
            self._held_claims = take_over(daemon, fence, self._held_claims, sync=sync)

    def _step_down(self, daemon: Host) -> None:
        """Back to standby after losing the role: the scheduler stops (its store is fenced
        already), presence is taken again (this daemon's claims in flight stay its own)."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._lost.clear()
        if daemon.scheduler is not None:
            daemon.scheduler.shutdown(wait=False)
        daemon.reset_watch()
        self.lead.release()
        try:
            self.lead.ensure_present()
        except Exception as exc:  # noqa: BLE001 (the database is away: logged, retried)
            self._report_outage(exc)
        self._leftover = daemon.ctx
        self._wait(daemon, rejoin=True)

    # -- the standby role ----------------------------------------------------------------

    def _wait(self, daemon: Host, *, rejoin: bool) -> None:
        """Become (or start as) a standby: ``bot.pid`` written, heartbeat, one log line."""
        self.role = STANDBY
        self.since = datetime.now(UTC)
        pause = REJOIN_SECONDS if rejoin else POLL_SECONDS
        self._next_try = time.monotonic() + pause
        self._beat_standby(daemon)
        daemon_logger.info(
            "standby: this daemon (%s pid %d) waits on %s%s; it sends nothing and takes over "
            "within seconds when the active one ends",
            socket.gethostname(),
            os.getpid(),
            models.mask_url(self.url),
            self._active_one(daemon),
        )
        daemon.write_pid()

    def _active_one(self, daemon: Host) -> str:
        """`` while <host> pid <pid> is active`` when the database says so, else ``""``."""
        if daemon.engine is None:
            return ""
        try:
            states = list_daemons(daemon.engine, now=datetime.now(UTC))
        except Exception:  # noqa: BLE001 (a detail of a log line)
            return ""
        for state in states:
            if state.alive and state.role == ACTIVE and state.id != self.ident:
                return f" while {state.host} pid {state.pid} is active"
        return ""

    def _try_acquire(self) -> bool:
        try:
            acquired = self.lead.try_acquire()
        except Exception as exc:  # noqa: BLE001 (unreachable: logged once, tried again)
            self._report_outage(exc)
            return False
        self._recovered()
        return acquired

    def _beat_standby(self, daemon: Host) -> None:
        """A standby's row and heartbeat file (only while it reaches the database: one that
        cannot would not take over, so ``health`` says 1), and the end of its own claims."""
        self._next_beat = time.monotonic() + self.beat_seconds
        now = datetime.now(UTC)
        try:
            self._write_row(daemon, now)
            self._release_leftovers(daemon, now)
        except Exception as exc:  # noqa: BLE001 (logged once, tried again)
            self._report_outage(exc)
            return
        self._recovered()
        daemon.heartbeat()

    def _release_leftovers(self, daemon: Host, now: datetime) -> None:
        """Claims of this daemon's last active period still in ``booking`` whose booking is
        no longer under way (its end could not be written: the database was away) are put
        back as after a crash, for whichever daemon is active. A booking still under way is
        left to finish, and looked at again at the next beat."""
        ctx = self._leftover
        if ctx is None or daemon.factory is None:
            return
        busy = ctx.under_way()
        if self.shared:
            # A standby writes nothing of a booking: the active daemon takes its claims over.
            if not busy:
                self._leftover = None
            return
        retried, unknown = instances.recover_in_flight(
            daemon.factory, now, owner=self.ident, keep=busy
        )
        if retried or unknown:
            daemon_logger.warning(
                "claims of this daemon whose end could not be written are put back: %s",
                ", ".join(retried + [row.key for row in unknown]),
            )
        if daemon.notifier is not None:
            for row in unknown:
                daemon.notifier.notify(instances.outcome_of(row))
        if not busy:
            self._leftover = None

    # -- both ------------------------------------------------------------------------------

    def _write_row(self, daemon: Host, now: datetime) -> None:
        assert daemon.engine is not None
        write_heartbeat(
            daemon.engine,
            ident=self.ident,
            role=self.role,
            started_at=self.started_at,
            since=self.since,
            now=now,
        )

    def _one_line(self, exc: BaseException) -> str:
        if isinstance(exc, models.DatabaseConnectError):
            return str(exc)
        return str(models.connect_error(self.url, exc))

    def _report_outage(self, exc: BaseException) -> None:
        """Log a database error once per outage (the password masked)."""
        if self._outage is None:
            daemon_logger.error(
                "%s: %s; trying again every %g s",
                self.role,
                self._one_line(exc),
                POLL_SECONDS if not self.is_active else self.beat_seconds,
            )
        self._outage = self._one_line(exc)

    def _recovered(self) -> None:
        if self._outage is not None:
            daemon_logger.info("%s: the database answers again", self.role)
            self._outage = None
