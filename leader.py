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

``Roles`` is a daemon's role on its database and the loop's hooks for it (CONTRACT section 10);
``LeaderWatch`` is the thread that notices a lost role at once.
"""

from __future__ import annotations

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
    def heartbeat(self) -> None: ...
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

    @property
    def is_active(self) -> bool:
        return self.role == ACTIVE

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
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.shared and daemon.ctx is not None:
            daemon.ctx.may_send.clear()
            daemon.ctx.stop.set()
        self.lead.release()

    def leave(self, daemon: Host) -> None:
        """At exit, after the bookings in flight (those of an earlier period as the active
        daemon too): this daemon's row goes, then its locks."""
        leftover = self._leftover
        if leftover is not None:
            deadline = time.monotonic() + daemon.settings.http_timeout + 1.0
            while leftover.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
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
            self._release_leftovers(daemon, self.since)
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
            self._recover_dead_claims(daemon, now)
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

    def _recover_dead_claims(self, daemon: Host, now: datetime) -> None:
        """Claims of daemons that died since this one became active: as after a crash."""
        assert daemon.factory is not None and daemon.notifier is not None
        owners = instances.booking_owners(daemon.factory) - {self.ident}
        if not owners:
            return
        live = self._alive({owner for owner in owners if owner}) | {self.ident}
        if owners <= live:
            return
        retried, unknown = instances.recover_in_flight(
            daemon.factory, now, live_owners=frozenset(live)
        )
        for row in unknown:
            daemon.notifier.notify(instances.outcome_of(row))
        if retried:
            daemon_logger.warning(
                "%d booking(s) of a daemon that stopped are retried now with the same "
                "Idempotency-Key: %s",
                len(retried),
                ", ".join(retried),
            )
        daemon.sync()

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
        with ctx.in_flight_lock:
            busy = frozenset(ctx.in_flight)
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
