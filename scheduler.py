"""APScheduler 3 wiring: one date job per pending instance due within the horizon, in the same
database.

Nobody else imports APScheduler. Jobs are module-level functions taking only the instance key
(persistent stores pickle the callable's reference and its arguments); they hand the key to the
runtime that ``daemon`` registers. The instance table is the truth: ``sync`` makes the job store
match the pending instances, cheaply, at start and after every load. Only the instances whose
trigger comes within ``HORIZON`` have a job: a cold load of 52,000 instances (1,000 weekly
schedules) writes about 300 jobs, not 52,000, and the horizon's look (every
``HORIZON_INTERVAL``, in memory) gives the next ones theirs, days before their trigger.

APScheduler 3 retries a failed *read* of due jobs, but a failed *write* in its loop (``remove_job``
after a date job ran, ``update_job``) escapes ``_main_loop``: its thread dies while ``state`` still
says running, and nothing fires again (agronholm/apscheduler#109, #1083). It also sleeps on a wait
computed from the wall clock, which a clock jump makes wrong ("the scheduler relies on the system
clock being correct", #339; #794, open). So ``problem`` says when it cannot fire, ``wakeup`` makes
it look at the clock again, and ``restart`` gives a fresh one: the daemon's watchdog uses them.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import STATE_RUNNING
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import ColumnElement, Engine, select

from models import error_text, insert_many

logger = logging.getLogger(__name__)

#: A booking job starts this long before its trigger: it claims the instance, opens the
#: connection to the club, then waits out the last moment precisely (see bot.book_slot). An
#: instance whose flow has preparation steps starts that much earlier again (``job_lead``).
LEAD = timedelta(seconds=2)
JOBS_TABLE = "apscheduler_jobs"
TOPUP_JOB_ID = "courtbot:topup"
TOPUP_INTERVAL = timedelta(hours=24)
REHEARSE_JOB_ID = "courtbot:rehearse"
#: The job store of the jobs that keep no state (the rehearsals' look).
MEMORY = "memory"
#: How often the due rehearsals are looked for (each is due at its own time, within this).
REHEARSE_INTERVAL = timedelta(minutes=1)
#: Jobs are kept for the pending instances whose trigger (a watching one's next try) comes
#: within this much of now; the others get theirs as the horizon moves on.
HORIZON = timedelta(days=2)
#: How often the horizon's look gives the instances that came within it their jobs.
HORIZON_INTERVAL = timedelta(minutes=10)
HORIZON_JOB_ID = "courtbot:horizon"
#: Enough workers that a burst of bookings with one trigger never queues.
DEFAULT_WORKERS = 128
#: Jobs read, built and written this many at a time: a cold load of 52,000 instances never
#: holds more than a page of Job objects and pickles (what it leaves behind stays in the heap).
PAGE = 200
#: Jobs written in one INSERT (a cold load writes thousands).
WRITE_ROWS = 500
#: The job store's row written and deleted to learn whether the database takes writes again.
PROBE_JOB_ID = "courtbot:write-probe"


class Runtime(Protocol):
    """What the jobs call into (the daemon, daemon.Daemon)."""

    def book(self, key: str) -> None: ...

    def topup(self) -> None: ...

    def rehearse(self) -> None: ...

    def extend(self) -> None: ...


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def set_runtime(runtime: Runtime | None) -> None:
    """Register the object the jobs hand their work to (None to unregister)."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime


def run_booking(key: str) -> None:
    """Job: book the instance ``key``."""
    runtime = _runtime
    if runtime is None:
        logger.error("booking job %s ran with no daemon registered; it will run at restart", key)
        return
    runtime.book(key)


def run_topup() -> None:
    """Job: keep every recurring entry at its full number of future instances."""
    runtime = _runtime
    if runtime is not None:
        runtime.topup()


def run_rehearsals() -> None:
    """Job: run the rehearsals that are due (CONTRACT section 12), recomputed each time from
    the instances."""
    runtime = _runtime
    if runtime is not None:
        runtime.rehearse()


def run_horizon() -> None:
    """Job: the pending instances that came within the horizon get their jobs."""
    runtime = _runtime
    if runtime is not None:
        runtime.extend()


def horizon_end() -> datetime:
    """The latest trigger that has a job now."""
    return datetime.now(UTC) + HORIZON


def job_lead(prepare_seconds: float) -> timedelta:
    """How long before its trigger an instance's job starts: LEAD, plus the preparation time
    of its flow (its steps run ``prepare_seconds`` before the trigger)."""
    return LEAD + timedelta(seconds=max(prepare_seconds, 0.0))


@dataclass(frozen=True)
class SyncReport:
    """What ``sync`` changed in the job store."""

    added: int
    moved: int
    removed: int

    def __add__(self, other: SyncReport) -> SyncReport:
        return SyncReport(
            self.added + other.added, self.moved + other.moved, self.removed + other.removed
        )


class _Store(SQLAlchemyJobStore):
    """The job store in the daemon's database. The engine is the daemon's: shutting the
    scheduler down (or retiring one, ``Scheduler.restart``) must not dispose of it.

    The store is shared through the database by every daemon on it, and only the active one
    may fire or change jobs. Once ``allowed()`` is false (the role lost), this scheduler's
    thread finds no due job and no next run time (it sleeps rather than spins) and its writes
    are dropped, so that however late it notices it was stopped it never fires or removes a
    job that the new active daemon's scheduler owns."""

    def __init__(self, *, allowed: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._allowed = allowed

    def shutdown(self) -> None:
        """Nothing: the daemon disposes of its engine itself."""

    def get_due_jobs(self, now: datetime) -> list[Job]:
        return super().get_due_jobs(now) if self._allowed() else []  # type: ignore[no-any-return]

    def get_next_run_time(self) -> datetime | None:
        return super().get_next_run_time() if self._allowed() else None  # type: ignore[no-any-return]

    def add_job(self, job: Job) -> None:
        if self._allowed():
            super().add_job(job)

    def update_job(self, job: Job) -> None:
        if self._allowed():
            super().update_job(job)

    def remove_job(self, job_id: str) -> None:
        if self._allowed():
            super().remove_job(job_id)

    def remove_all_jobs(self) -> None:
        if self._allowed():
            super().remove_all_jobs()


def _always() -> bool:
    return True


class _Background(BackgroundScheduler):
    """APScheduler's background scheduler, keeping why its thread stopped (``failure``)."""

    failure: str | None = None

    def _main_loop(self) -> None:
        try:
            super()._main_loop()
        except Exception as exc:  # noqa: BLE001 (kept for the watchdog, which logs it)
            self.failure = error_text(exc)

    @property
    def thread_alive(self) -> bool:
        thread = getattr(self, "_thread", None)
        return thread is not None and thread.is_alive()


def _retire(old: _Background) -> None:
    """Shut a replaced scheduler down without waiting: a booking it started goes on."""
    try:
        if old.running:
            old.shutdown(wait=False)
    except Exception as exc:  # noqa: BLE001 (a broken scheduler is being dropped anyway)
        logger.debug("retiring the old scheduler: %s", error_text(exc))


class Scheduler:
    """A BackgroundScheduler whose job store lives in the courtbot database.

    ``allowed`` (default: always) says whether this daemon may still fire and change jobs: on a
    database shared by several daemons, only while it is the active one."""

    def __init__(
        self,
        engine: Engine,
        *,
        workers: int = DEFAULT_WORKERS,
        allowed: Callable[[], bool] = _always,
    ) -> None:
        self._engine = engine
        self._workers = workers
        self._allowed = allowed
        self._store, self._scheduler = self._build()
        # The store creates its table when the scheduler starts; sync runs before that.
        self._store.jobs_t.create(engine, checkfirst=True)
        self._lock = threading.Lock()
        self._write_failure: str | None = None
        #: A booking job's state as APScheduler stores it (``_rows``), built once.
        self._job_state: dict[str, Any] | None = None
        for name in ("apscheduler.scheduler", "apscheduler.executors.default"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def _build(self) -> tuple[_Store, _Background]:
        store = _Store(allowed=self._allowed, engine=self._engine, tablename=JOBS_TABLE)
        background = _Background(
            # The rehearsals' job lives in memory: it holds no state (what is due is read from
            # the instances each time), and a look every minute must not write to the database.
            jobstores={"default": store, MEMORY: MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=self._workers)},
            job_defaults={
                # Run a job however late it is: the booking itself decides between "book at
                # once" (desired start still ahead) and "expired" (APScheduler's default grace
                # of 1 s would silently drop a trigger missed while the daemon was down).
                "misfire_grace_time": None,
                "coalesce": True,
                "max_instances": 1,
            },
            timezone=UTC,
        )
        return store, background

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Start firing jobs (their store is synced first by the caller)."""
        self._scheduler.start()
        self._every(run_topup, TOPUP_JOB_ID, TOPUP_INTERVAL)
        # The looks that keep no state, in memory: the rehearsals' at once (an instance loaded
        # late rehearses at once), then every minute, one at a time (two would rehearse the same
        # instances); the horizon's an interval on (the sync before the start covered it), and
        # one asked for now (``_look_now``) while one runs comes after it (the daemon runs them
        # one at a time), with the clock as it is then.
        now = datetime.now(UTC)
        self._every(
            run_rehearsals,
            REHEARSE_JOB_ID,
            REHEARSE_INTERVAL,
            jobstore=MEMORY,
            next_run_time=now,
            max_instances=1,
        )
        self._every(
            run_horizon,
            HORIZON_JOB_ID,
            HORIZON_INTERVAL,
            jobstore=MEMORY,
            next_run_time=now + HORIZON_INTERVAL,
            max_instances=2,
        )

    def _every(
        self, func: Callable[[], None], job_id: str, every: timedelta, **options: Any
    ) -> None:
        """The job ``job_id`` running ``func`` every ``every``, in place of any before it."""
        self._scheduler.add_job(
            func,
            "interval",
            seconds=every.total_seconds(),
            id=job_id,
            replace_existing=True,
            **options,
        )

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop taking triggers; with ``wait``, let running jobs finish first, for at most
        ``timeout`` seconds when given (a thread stuck in the database must not hold the
        process). False when that time ran out."""
        if not self._scheduler.running:
            return True
        if timeout is None:
            self._scheduler.shutdown(wait=wait)
            return True
        stopping = threading.Thread(
            target=self._scheduler.shutdown,
            kwargs={"wait": wait},
            name="scheduler-shutdown",
            daemon=True,
        )
        stopping.start()
        stopping.join(timeout)
        return not stopping.is_alive()

    def rehearse_soon(self) -> None:
        """Look for due rehearsals now rather than at the next minute."""
        self._look_now(REHEARSE_JOB_ID, "rehearsals")

    def extend_soon(self) -> None:
        """Move the horizon on now rather than at its next look (the wall clock jumped ahead:
        triggers that came within it, or passed, need their jobs)."""
        self._look_now(HORIZON_JOB_ID, "the horizon")

    def _look_now(self, job_id: str, what: str) -> None:
        try:
            self._scheduler.modify_job(job_id, jobstore=MEMORY, next_run_time=datetime.now(UTC))
        except Exception as exc:  # noqa: BLE001 (not running, no such job: its interval comes)
            logger.debug("%s looked at at the next interval: %s", what, error_text(exc))

    # -- the watchdog's handles ---------------------------------------------------------

    def problem(self) -> str | None:
        """Why no job can fire now, or None while they can: APScheduler's thread stopped (and
        why), it is not running, or the last write to the job store failed."""
        background = self._scheduler
        if background.failure is not None:
            return f"the scheduler's thread stopped: {background.failure}"
        if background.state != STATE_RUNNING:
            return "the scheduler is not running"
        if not background.thread_alive:
            return "the scheduler's thread is gone"
        if self._write_failure is not None:
            return f"a write to the job store failed: {self._write_failure}"
        return None

    def wakeup(self) -> None:
        """Make the scheduler look at the clock and its jobs now (after a clock jump)."""
        if self._scheduler.running:
            self._scheduler.wakeup()

    def probe_write(self) -> None:
        """Write to the job store and take it back, committed: raises (``models.DatabaseError``)
        while the database cannot be written (a full or read-only disk)."""
        if not self._allowed():
            return  # not the active daemon: the store is another's to write
        table = self._store.jobs_t
        with self._store.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.id == PROBE_JOB_ID))
            conn.execute(table.insert().values(id=PROBE_JOB_ID, next_run_time=None, job_state=b""))
        with self._store.engine.begin() as conn:
            conn.execute(table.delete().where(table.c.id == PROBE_JOB_ID))

    def restart(self) -> None:
        """Replace APScheduler with a fresh one, not started: the caller syncs the jobs, then
        ``start``. The old one is shut down in the background, without waiting: a booking it
        started goes on, and a thread stuck in the database cannot hold the caller."""
        old = self._scheduler
        self._store, self._scheduler = self._build()
        self._write_failure = None
        threading.Thread(target=_retire, args=(old,), name="scheduler-retire", daemon=True).start()

    def _stored(self, keys: Collection[str] | None = None) -> dict[str, float | None]:
        """The stored booking jobs' run times by id: all of them, or those among ``keys``."""
        table = self._store.jobs_t
        if keys is None:
            return self._booking_jobs([table.c.id.is_not(None)])
        wanted = sorted(keys)
        pages = [wanted[start : start + PAGE] for start in range(0, len(wanted), PAGE)]
        return self._booking_jobs([table.c.id.in_(page) for page in pages])

    def _booking_jobs(self, conditions: list[ColumnElement[bool]]) -> dict[str, float | None]:
        """The run times by id of the stored jobs each condition selects, but the top-up's and
        the probe's."""
        table = self._store.jobs_t
        query = select(table.c.id, table.c.next_run_time)
        with self._store.engine.connect() as conn:
            rows = [row for where in conditions for row in conn.execute(query.where(where))]
        return {
            job_id: run_at for job_id, run_at in rows if job_id not in (TOPUP_JOB_ID, PROBE_JOB_ID)
        }

    def sync(
        self,
        pending: Mapping[str, datetime],
        *,
        busy: frozenset[str] = frozenset(),
        prepare: Mapping[str, float] | None = None,
    ) -> SyncReport:
        """Make the job store hold exactly one job per instance of ``pending`` (key -> trigger:
        those within the horizon), at its trigger minus ``job_lead`` of its preparation time
        (``prepare`` by key; none: 0), and no other booking job. ``busy`` keys (a booking under
        way in this process) are left alone. All changes are written in one transaction."""
        with self._lock:
            stored = self._stored()
            return self._apply(pending, stored.keys() | pending.keys(), stored, busy, prepare)

    def sync_keys(
        self,
        pending: Mapping[str, datetime],
        keys: Collection[str],
        *,
        busy: frozenset[str] = frozenset(),
        prepare: Mapping[str, float] | None = None,
    ) -> SyncReport:
        """``sync`` for ``keys`` only (the instances a reload or a ``retry`` changed): those in
        ``pending`` get their job, the others lose theirs. The rest of the store is neither read
        nor touched, so the cost follows the change."""
        with self._lock:
            return self._apply(pending, keys, self._stored(keys), busy, prepare)

    def _apply(
        self,
        pending: Mapping[str, datetime],
        keys: Collection[str],
        stored: Mapping[str, float | None],
        busy: frozenset[str],
        prepare: Mapping[str, float] | None,
    ) -> SyncReport:
        upserts: list[tuple[str, datetime]] = []
        removals: list[str] = []
        moved = 0
        for key in sorted(keys):
            if key in busy:
                continue
            have = stored.get(key)
            trigger = pending.get(key)
            if trigger is None:
                if key in stored:
                    removals.append(key)
                continue
            run_at = trigger - job_lead(prepare.get(key, 0.0) if prepare else 0.0)
            if have is not None and abs(have - run_at.timestamp()) < 1e-3:
                continue
            upserts.append((key, run_at))
            moved += key in stored
        self._write(upserts, removals, replaced=moved > 0)
        report = SyncReport(added=len(upserts) - moved, moved=moved, removed=len(removals))
        if upserts or removals:
            logger.debug("jobs: %d added, %d moved, %d removed", *astuple(report))
        return report

    def _write(
        self, upserts: list[tuple[str, datetime]], removals: list[str], *, replaced: bool = True
    ) -> None:
        """Remove the ``removals`` and write the ``upserts`` in one transaction; the old rows of
        upserts are deleted first unless none is ``replaced`` (all new: a cold load)."""
        if not upserts and not removals:
            return
        if not self._allowed():
            logger.warning("jobs not written: this daemon is no longer the active one")
            return
        table = self._store.jobs_t
        gone = removals + ([key for key, _ in upserts] if replaced else [])
        try:
            with self._store.engine.begin() as conn:
                for start in range(0, len(gone), PAGE):
                    conn.execute(table.delete().where(table.c.id.in_(gone[start : start + PAGE])))
                for start in range(0, len(upserts), WRITE_ROWS):
                    insert_many(conn, table, self._rows(upserts[start : start + WRITE_ROWS]))
        except Exception as exc:
            # The jobs no longer match the instances: the watchdog re-syncs once writes work.
            self._write_failure = error_text(exc)
            raise
        self._write_failure = None
        if self._scheduler.running:
            self._scheduler.wakeup()

    def _rows(self, upserts: list[tuple[str, datetime]]) -> list[dict[str, object]]:
        """The job store's rows for booking jobs, as APScheduler itself would store them. One
        ``Job`` is built (and its callable checked) once; each row is its state with the key and
        the time put in, so a cold load of thousands of jobs builds no ``Job`` per row."""
        if self._job_state is None:
            first = upserts[0][1] if upserts else datetime.now(UTC)
            job = Job(
                self._scheduler,
                id="template",
                func=run_booking,
                trigger=DateTrigger(first, timezone=UTC),
                executor="default",
                args=("template",),
                kwargs={},
                name="book template",
                misfire_grace_time=None,
                coalesce=True,
                max_instances=1,
                next_run_time=first,
            )
            self._job_state = job.__getstate__()
        base = self._job_state
        protocol = self._store.pickle_protocol
        rows: list[dict[str, object]] = []
        for key, run_at in upserts:
            # DateTrigger(run_at, timezone=UTC) without its checks: run_at is aware, in UTC.
            trigger = DateTrigger.__new__(DateTrigger)
            trigger.run_date = run_at.astimezone(UTC)
            state = dict(base)
            state.update(
                id=key,
                trigger=trigger,
                args=(key,),
                name=f"book {key}",
                next_run_time=run_at,
            )
            rows.append(
                {
                    "id": key,
                    "next_run_time": run_at.timestamp(),
                    "job_state": pickle.dumps(state, protocol),
                }
            )
        return rows
