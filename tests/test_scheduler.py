"""scheduler.py in process: the job store follows the pending instances, and jobs hand their key
to the registered runtime. A real database (SQLite in tmp_path, and PostgreSQL); the scheduler
really runs where a job must fire (its trigger is already due, so nothing waits for a clock)."""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

import models
import scheduler
from daemon_harness import wait_until
from mounts import fill, small_disk
from scheduler import LEAD, PROBE_JOB_ID, TOPUP_JOB_ID, Scheduler, SyncReport

T0 = datetime(2030, 3, 1, 17, 0, tzinfo=UTC)

pytestmark = pytest.mark.both_databases


class Recorder:
    """A runtime (scheduler.Runtime) that records what the jobs asked for."""

    def __init__(self) -> None:
        self.booked: list[str] = []
        self.topups = 0
        self.rehearsals = 0
        self.event = threading.Event()

    def book(self, key: str) -> None:
        self.booked.append(key)
        self.event.set()

    def topup(self) -> None:
        self.topups += 1

    def rehearse(self) -> None:
        self.rehearsals += 1


@pytest.fixture
def sched(engine: Engine) -> Iterator[Scheduler]:
    made = Scheduler(engine, workers=4)
    yield made
    made.shutdown(wait=True)
    scheduler.set_runtime(None)


def stored(engine: Engine) -> dict[str, datetime]:
    """The job store's jobs: id -> when it runs (aware UTC)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, next_run_time FROM apscheduler_jobs")
        return {job_id: datetime.fromtimestamp(run_at, UTC) for job_id, run_at in rows}


def test_sync_keeps_one_job_per_pending_instance_at_its_trigger_minus_the_lead(
    engine: Engine, sched: Scheduler
) -> None:
    pending = {"a@1": T0, "b@1": T0 + timedelta(days=7)}

    assert sched.sync(pending) == SyncReport(added=2, moved=0, removed=0)

    assert stored(engine) == {"a@1": T0 - LEAD, "b@1": T0 + timedelta(days=7) - LEAD}
    assert sched.sync(pending) == SyncReport(added=0, moved=0, removed=0)


def test_each_stored_job_is_the_state_apscheduler_itself_would_store(
    engine: Engine, sched: Scheduler
) -> None:
    from apscheduler.job import Job
    from apscheduler.triggers.date import DateTrigger

    sched.sync({"a@1": T0, "b@1": T0 + timedelta(days=7)})
    with engine.connect() as conn:
        states = {
            job_id: pickle.loads(state)  # noqa: S301 (our own job store, written by the test)
            for job_id, state in conn.exec_driver_sql("SELECT id, job_state FROM apscheduler_jobs")
        }
    for key, run_at in (("a@1", T0 - LEAD), ("b@1", T0 + timedelta(days=7) - LEAD)):
        own = Job(
            sched._scheduler,
            id=key,
            func=scheduler.run_booking,
            trigger=DateTrigger(run_at, timezone=UTC),
            executor="default",
            args=(key,),
            kwargs={},
            name=f"book {key}",
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
            next_run_time=run_at,
        ).__getstate__()
        ours = states[key]
        trigger, own_trigger = ours.pop("trigger"), own.pop("trigger")
        assert trigger.__getstate__() == own_trigger.__getstate__()
        assert trigger.run_date == run_at and trigger.run_date.tzinfo is UTC
        assert ours == own


def test_sync_moves_changed_triggers_and_removes_what_is_no_longer_pending(
    engine: Engine, sched: Scheduler
) -> None:
    sched.sync({"a@1": T0, "b@1": T0, "c@1": T0})

    report = sched.sync({"a@1": T0 + timedelta(hours=1), "c@1": T0, "d@1": T0})

    assert report == SyncReport(added=1, moved=1, removed=1)
    assert stored(engine) == {
        "a@1": T0 + timedelta(hours=1) - LEAD,
        "c@1": T0 - LEAD,
        "d@1": T0 - LEAD,
    }


def test_an_instance_whose_flow_prepares_fires_that_much_earlier(
    engine: Engine, sched: Scheduler
) -> None:
    sched.sync({"login@1": T0, "plain@1": T0}, prepare={"login@1": 60})

    assert stored(engine) == {"login@1": T0 - timedelta(seconds=60) - LEAD, "plain@1": T0 - LEAD}
    # A flow whose preparation time changes moves its jobs.
    assert sched.sync({"login@1": T0, "plain@1": T0}, prepare={"login@1": 120}) == SyncReport(
        added=0, moved=1, removed=0
    )
    assert stored(engine)["login@1"] == T0 - timedelta(seconds=120) - LEAD
    assert scheduler.job_lead(0) == LEAD


def test_sync_leaves_a_booking_under_way_alone(engine: Engine, sched: Scheduler) -> None:
    sched.sync({"a@1": T0, "b@1": T0})

    # a@1 is being booked here (no longer pending): its job is neither removed nor re-added.
    report = sched.sync({"b@1": T0 + timedelta(minutes=5)}, busy=frozenset({"a@1"}))

    assert report == SyncReport(added=0, moved=1, removed=0)
    assert set(stored(engine)) == {"a@1", "b@1"}


def test_sync_keys_looks_at_the_keys_given_and_nothing_else(
    engine: Engine, sched: Scheduler
) -> None:
    sched.sync({"a@1": T0, "b@1": T0, "c@1": T0, "d@1": T0})

    # a@1 moved, b@1 no longer pending, e@1 new; c@1 is not pending either, but not asked about;
    # d@1 is being booked here.
    report = sched.sync_keys(
        {"a@1": T0 + timedelta(hours=1), "e@1": T0},
        ["a@1", "b@1", "d@1", "e@1"],
        busy=frozenset({"d@1"}),
    )

    assert report == SyncReport(added=1, moved=1, removed=1)
    assert stored(engine) == {
        "a@1": T0 + timedelta(hours=1) - LEAD,
        "c@1": T0 - LEAD,
        "d@1": T0 - LEAD,
        "e@1": T0 - LEAD,
    }
    assert sched.sync_keys({"a@1": T0 + timedelta(hours=1)}, ["a@1"]) == SyncReport(0, 0, 0)


def test_a_full_sync_keeps_the_given_jobs_and_the_topup_job_and_drops_the_rest(
    engine: Engine, sched: Scheduler
) -> None:
    keys = [f"k{i:02d}@1" for i in range(7)]
    sched.sync(dict.fromkeys(keys, T0))
    sched.start()  # adds the top-up job to the same table

    # The instances within the horizon now: one kept as it was, one moved; the rest went
    # beyond it (or are no longer pending).
    kept = {keys[1]: T0, keys[4]: T0 + timedelta(hours=1)}
    assert sched.sync(kept) == SyncReport(added=0, moved=1, removed=5)
    assert stored(engine) == {
        keys[1]: T0 - LEAD,
        keys[4]: T0 + timedelta(hours=1) - LEAD,
        TOPUP_JOB_ID: stored(engine)[TOPUP_JOB_ID],
    }


def test_a_due_job_hands_its_key_to_the_runtime_and_the_topup_job_is_kept_apart(
    engine: Engine, sched: Scheduler
) -> None:
    runtime = Recorder()
    scheduler.set_runtime(runtime)
    due = datetime.now(UTC) - timedelta(seconds=1)
    sched.sync({"due@1": due + LEAD})

    sched.start()

    assert runtime.event.wait(10), "the due job never ran"
    assert runtime.booked == ["due@1"]
    # The top-up job lives in the same store but is no instance: sync never touches it.
    assert TOPUP_JOB_ID in stored(engine)
    assert sched.sync({}) == SyncReport(added=0, moved=0, removed=0)
    assert TOPUP_JOB_ID in stored(engine)
    # The rehearsals' job (in memory: it writes nothing to the database) looks at once.
    assert wait_until(lambda: runtime.rehearsals >= 1, 10)
    assert scheduler.REHEARSE_JOB_ID not in stored(engine)
    # Two looks for rehearsals at once would rehearse (and notify) the same instances twice; a
    # look at the horizon asked for while one runs comes after it instead of being dropped.
    looks = {
        job.id: job.max_instances for job in sched._scheduler.get_jobs(jobstore=scheduler.MEMORY)
    }
    assert looks == {scheduler.REHEARSE_JOB_ID: 1, scheduler.HORIZON_JOB_ID: 2}


def test_jobs_without_a_runtime_log_and_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    scheduler.set_runtime(None)
    caplog.set_level(logging.INFO, logger="scheduler")

    scheduler.run_booking("lost@1")
    scheduler.run_topup()

    assert caplog.messages == [
        "booking job lost@1 ran with no daemon registered; it will run at restart"
    ]


def test_jobs_call_the_registered_runtime() -> None:
    runtime = Recorder()
    scheduler.set_runtime(runtime)
    try:
        scheduler.run_booking("k@1")
        scheduler.run_topup()
        scheduler.run_rehearsals()
    finally:
        scheduler.set_runtime(None)
    assert (runtime.booked, runtime.topups, runtime.rehearsals) == (["k@1"], 1, 1)


def test_a_daemon_no_longer_active_neither_fires_nor_changes_the_shared_jobs(
    engine: Engine,
) -> None:
    active = threading.Event()
    active.set()
    sched = Scheduler(engine, workers=4, allowed=active.is_set)
    runtime = Recorder()
    scheduler.set_runtime(runtime)
    try:
        due = datetime.now(UTC) - timedelta(seconds=1)
        sched.sync({"due@1": due + LEAD, "later@1": T0})
        active.clear()  # another daemon is the active one now: the store is its
        rounds = []
        process = sched._scheduler._process_jobs
        sched._scheduler._process_jobs = lambda: rounds.append(1) or process()  # type: ignore[method-assign]
        sched.start()
        assert not runtime.event.wait(0.5), "a job fired after the role was lost"
        assert len(rounds) <= 3  # it sleeps: no spinning on the due job it may not fire
        sched.sync({})  # would remove both
        assert set(stored(engine)) == {"due@1", "later@1"}  # the top-up job was not added either

        active.set()  # the role is back: the same job fires (nothing else kept it)
        sched._scheduler.wakeup()
        assert runtime.event.wait(10), "the due job never ran"
        assert runtime.booked == ["due@1"]
        # and, allowed again, removes its fired job (before the shutdown, which would race it)
        deadline = time.monotonic() + 10
        while "due@1" in stored(engine) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert set(stored(engine)) == {"later@1"}  # no top-up job: it started fenced
    finally:
        sched.shutdown(wait=True)
        scheduler.set_runtime(None)


# --------------------------------------------------------------------------- the watchdog's handles


def test_problem_is_none_while_running_and_says_when_not(engine: Engine, sched: Scheduler) -> None:
    assert sched.problem() == "the scheduler is not running"
    sched.start()
    assert sched.problem() is None
    sched.shutdown(wait=True)
    assert sched.problem() == "the scheduler is not running"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB disk (tmpfs) that the test fills up."""
    with small_disk(tmp_path / "disk") as mounted:
        yield mounted


def test_a_job_store_write_that_fails_stops_the_thread_then_a_restart_fires_the_job(
    disk: Path,
) -> None:
    """APScheduler 3 lets a failed write in its loop (``remove_job`` once a date job ran) end its
    thread, ``state`` still saying running: ``problem`` says so and why; once the disk has room,
    a restart (the jobs synced again, none lost) fires what is due."""
    engine = models.make_engine(f"sqlite:///{disk / 'db.sqlite'}")
    made = Scheduler(engine, workers=2)
    runtime = Recorder()
    scheduler.set_runtime(runtime)
    try:
        made.start()
        run_at = datetime.now(UTC) + timedelta(seconds=1.5)
        made.sync({"soon@1": run_at + LEAD})
        filler = fill(disk)
        with pytest.raises(models.DatabaseError):
            made.probe_write()

        assert runtime.event.wait(10), "the job never ran"
        assert wait_until(lambda: made.problem() is not None, 10)
        assert made.problem() == (
            "the scheduler's thread stopped: OperationalError: database or disk is full"
        )
        assert made._scheduler.running  # APScheduler itself still says so

        filler.unlink()
        made.probe_write()
        runtime.event.clear()
        made.restart()
        assert made.sync({"soon@1": run_at + LEAD}) == SyncReport(added=0, moved=0, removed=0)
        made.start()

        assert made.problem() is None
        assert runtime.event.wait(10), "the restarted scheduler did not fire the due job"
        assert runtime.booked == ["soon@1", "soon@1"]
        assert wait_until(lambda: "soon@1" not in stored(engine), 10)
        assert PROBE_JOB_ID not in stored(engine)
    finally:
        made.shutdown(wait=True)
        scheduler.set_runtime(None)
        engine.dispose()


def test_a_sync_whose_write_fails_is_a_problem_until_a_restart(disk: Path) -> None:
    engine = models.make_engine(f"sqlite:///{disk / 'db.sqlite'}")
    made = Scheduler(engine, workers=2)
    try:
        made.start()
        filler = fill(disk)
        with pytest.raises(models.DatabaseError):
            made.sync({"later@1": datetime.now(UTC) + timedelta(days=1)})
        assert made.problem() == (
            "a write to the job store failed: OperationalError: database or disk is full"
        )
        filler.unlink()
        made.restart()
        assert made.sync({"later@1": datetime.now(UTC) + timedelta(days=1)}).added == 1
        made.start()
        assert made.problem() is None
    finally:
        made.shutdown(wait=True)
        engine.dispose()
