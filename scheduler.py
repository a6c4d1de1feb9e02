"""APScheduler 3 wiring: one date job per pending instance, in the same database.

Nobody else imports APScheduler. Jobs are module-level functions taking only the instance key
(persistent stores pickle the callable's reference and its arguments); they hand the key to the
runtime that ``main`` registers. The instance table is the truth: ``sync`` makes the job store
match the pending instances, cheaply, at start and after every load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, select

logger = logging.getLogger(__name__)

#: A booking job starts this long before its trigger: it claims the instance, opens the
#: connection to the club, then waits out the last moment precisely (see bot.book_slot).
LEAD = timedelta(seconds=2)
JOBS_TABLE = "apscheduler_jobs"
TOPUP_JOB_ID = "courtbot:topup"
TOPUP_INTERVAL = timedelta(hours=24)
#: Enough workers that a burst of bookings with one trigger never queues.
DEFAULT_WORKERS = 128


class Runtime(Protocol):
    """What the jobs call into (the daemon in main.py)."""

    def book(self, key: str) -> None: ...

    def topup(self) -> None: ...


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


@dataclass(frozen=True)
class SyncReport:
    """What ``sync`` changed in the job store."""

    added: int
    moved: int
    removed: int


class Scheduler:
    """A BackgroundScheduler whose job store lives in the courtbot database."""

    def __init__(self, engine: Engine, *, workers: int = DEFAULT_WORKERS) -> None:
        self._store = SQLAlchemyJobStore(engine=engine, tablename=JOBS_TABLE)
        self._scheduler = BackgroundScheduler(
            jobstores={"default": self._store},
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
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
        # The store creates its table when the scheduler starts; sync runs before that.
        self._store.jobs_t.create(engine, checkfirst=True)
        self._lock = threading.Lock()
        for name in ("apscheduler.scheduler", "apscheduler.executors.default"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def start(self) -> None:
        """Start firing jobs (their store is synced first by the caller)."""
        self._scheduler.start()
        self._scheduler.add_job(
            run_topup,
            "interval",
            seconds=TOPUP_INTERVAL.total_seconds(),
            id=TOPUP_JOB_ID,
            replace_existing=True,
        )

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking triggers; with ``wait``, let running jobs finish first."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    def _stored(self) -> dict[str, float | None]:
        table = self._store.jobs_t
        with self._store.engine.connect() as conn:
            rows = conn.execute(select(table.c.id, table.c.next_run_time))
            return {job_id: run_at for job_id, run_at in rows if job_id != TOPUP_JOB_ID}

    def sync(
        self, pending: Mapping[str, datetime], *, busy: frozenset[str] = frozenset()
    ) -> SyncReport:
        """Make the job store hold exactly one job per pending instance, at its trigger minus
        ``LEAD``. ``busy`` keys (a booking under way in this process) are left alone."""
        with self._lock:
            stored = self._stored()
            added = moved = removed = 0
            for key, trigger in pending.items():
                if key in busy:
                    continue
                run_at = trigger - LEAD
                have = stored.get(key)
                if have is not None and abs(have - run_at.timestamp()) < 1e-3:
                    continue
                self._scheduler.add_job(
                    run_booking,
                    "date",
                    run_date=run_at,
                    args=[key],
                    id=key,
                    name=f"book {key}",
                    replace_existing=True,
                )
                if key in stored:
                    moved += 1
                else:
                    added += 1
            for key in set(stored) - set(pending) - busy:
                try:
                    self._scheduler.remove_job(key)
                    removed += 1
                except JobLookupError:
                    pass
        if added or moved or removed:
            logger.debug("jobs: %d added, %d moved, %d removed", added, moved, removed)
        return SyncReport(added=added, moved=moved, removed=removed)

    def next_run(self) -> datetime | None:
        """When the next booking job starts (aware UTC), if any."""
        table = self._store.jobs_t
        with self._store.engine.connect() as conn:
            row = conn.execute(
                select(table.c.next_run_time)
                .where(table.c.id != TOPUP_JOB_ID)
                .order_by(table.c.next_run_time)
                .limit(1)
            ).first()
        if row is None or row[0] is None:
            return None
        return datetime.fromtimestamp(row[0], UTC)
