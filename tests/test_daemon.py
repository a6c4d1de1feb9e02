"""daemon.py: the daemon's life in process: start, loads (SIGHUP, a changed file), retries
picked up, memory given back, the active role and standbys (section 10), tokens that expire,
HEARTBEAT_URL, and the watchdog's looks and recovery (section 9). Its commands are in test_cli.py.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import platform
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

import cli
import config_loader
import daemon as daemon_module
import instances
import leader
import models
import scheduler
import utils
import watchdog
from conftest import PingServer, future, make_jwt, write_json
from conftest import add_instance as add
from conftest import main_in_process as run
from daemon import (
    DAEMON_SIGNALS,
    EXIT_NOT_WORKING,
    Daemon,
    _token_expiry_message,
    club_location,
    trim_heap,
    warn_expiring_tokens,
)
from models import Instance
from mounts import fill, small_disk

LONDON = ZoneInfo("Europe/London")
pytestmark = pytest.mark.usefixtures("keep_root_logging")


# ---------------------------------------------------------------- the daemon's loop, in process


def write_files(data_dir: Path, entries: list[dict[str, Any]]) -> None:
    """tokens.json with the one token ``default`` and schedules.json with ``entries``."""
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", entries)


@contextlib.contextmanager
def started_daemon(env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon started in this process on ``env`` (its handlers and wakeup fd restored after)."""
    handlers = {signum: signal.getsignal(signum) for signum in DAEMON_SIGNALS}
    settings = cli.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600"})
    made = Daemon(settings, cli.load_fernet(settings), None)
    try:
        made.start()
        yield made
    finally:
        made.shutdown()
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture
def daemon(env: dict[str, str], data_dir: Path) -> Iterator[Daemon]:
    """A started daemon in this process, with one entry."""
    write_files(data_dir, [one_off("a")])
    with started_daemon(env) as made:
        yield made


#: Days ahead of a test's one-off: its trigger (168 hours before) a day ahead, within the
#: jobs' horizon (scheduler.HORIZON), so that it has its job.
SOON = 8


def one_off(schedule_id: str, days: float = SOON) -> dict[str, Any]:
    desired = future(days)
    return {"id": schedule_id, "type": "one-off", "desired_time": f"{desired:%Y-%m-%d %H:%M}"}


def pending(daemon: Daemon) -> list[str]:
    rows = instances.status_rows(daemon.factory)
    return sorted(row["schedule"] for row in rows if row["status"] == "pending")


@pytest.mark.both_databases
def test_sighup_reloads_in_the_loop_and_a_broken_file_keeps_the_last_good_state(
    daemon: Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seen: list[list[str]] = []

    def operator() -> None:
        try:
            write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: pending(daemon) == ["a", "b"])
            seen.append(pending(daemon))
            (data_dir / "schedules.json").write_text("[{broken")
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: any("not valid JSON" in m for m in caplog.messages))
            seen.append(pending(daemon))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    daemon.run_forever()  # returns on the SIGTERM
    thread.join(10)

    assert seen == [["a", "b"], ["a", "b"]]
    assert caplog.messages.count("SIGHUP received: reloading") == 2
    assert "SIGTERM received: stopping (a booking under way may finish)" in caplog.messages
    (broken,) = [m for m in caplog.messages if "not valid JSON" in m]
    assert broken == (
        "schedules.json: not valid JSON (line 1 column 3: Expecting property name enclosed in "
        "double quotes); nothing loaded from it, the last good state stays"
    )
    assert any(m.startswith("config loaded (SIGHUP) in ") for m in caplog.messages)


@pytest.mark.both_databases
def test_a_changed_file_is_reloaded_and_an_unchanged_one_is_not(
    daemon: Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.config_changed() is False
    daemon.safe_load("file change")
    assert any(m.startswith("config unchanged (file change)") for m in caplog.messages)

    write_json(data_dir / "schedules.json", [one_off("c")])
    assert daemon.config_changed() is True
    daemon.safe_load("file change")

    assert pending(daemon) == ["c"]
    (loaded,) = [m for m in caplog.messages if m.startswith("config loaded (file change)")]
    assert "1 added, 0 changed, 1 cancelled, 0 revived" in loaded
    assert loaded.endswith("; entries changed: c")  # the new entry; a removal is counted above
    assert daemon.config_changed() is False


def test_club_files_are_loaded_reloaded_on_change_and_kept_when_broken(
    daemon: Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.ctx is not None
    clubs = data_dir / "clubs"
    clubs.mkdir()
    write_json(clubs / "padel.json", {"url": "https://padel.example/book"})
    entry = one_off("p") | {"club": "padel"}
    write_json(data_dir / "schedules.json", [one_off("a"), entry])
    assert daemon.config_changed() is True
    daemon.safe_load("file change")
    good = daemon.ctx.clubs["padel"]
    assert good.booking_step.url.source() == "https://padel.example/book"
    assert daemon.ctx.flow_for("padel") is good
    assert "club file(s) loaded: padel" in caplog.messages
    (row,) = [r for r in instances.status_rows(daemon.factory) if r["schedule"] == "p"]
    first_trigger = row["trigger_time"]

    # A club file's change alone is a change: the new window moves the trigger.
    write_json(clubs / "padel.json", {"url": "https://padel.example/book", "window": "1d@06:00"})
    assert daemon.config_changed() is True
    daemon.safe_load("file change")
    (row,) = [r for r in instances.status_rows(daemon.factory) if r["schedule"] == "p"]
    assert row["trigger_time"] != first_trigger
    assert row["trigger_time"].endswith("T06:00:00Z")
    good = daemon.ctx.clubs["padel"]
    assert good.window == "1d@06:00"

    # Broken: the entry is rejected (its instance kept), the last good flow stays in use.
    write_json(clubs / "padel.json", {"url": "https://padel.example/book", "method": "BREW"})
    daemon.safe_load("file change")
    assert any(
        m.startswith("schedules.json entry 'p' (#2): club: 'padel': ") and "method: 'BREW'" in m
        for m in caplog.messages
    )
    assert "club 'padel': its last good file stays in use" in caplog.messages
    assert daemon.ctx.flow_for("padel") == good
    assert pending(daemon) == ["a", "p"]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ---------------------------------------------------------------- reload cost, retries, memory


def jobs(engine: Engine) -> dict[str, datetime]:
    """The booking jobs in the job store: key -> when the job runs."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, next_run_time FROM apscheduler_jobs"))
        return {
            key: datetime.fromtimestamp(run_at, UTC)
            for key, run_at in rows
            if key != scheduler.TOPUP_JOB_ID
        }


@contextlib.contextmanager
def statements_of_this_thread(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement this thread sends through ``engine`` meanwhile."""
    seen: list[str] = []
    me = threading.get_ident()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() == me:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_a_reload_with_no_file_changed_sends_no_sql_but_its_result(
    daemon: Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.engine is not None
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.loads.load(reason="SIGHUP") is True
    # No instance, job or token is read or written: only the load's result, kept for `reload`.
    assert [s.split(" (")[0].split(" WHERE")[0] for s in seen] == [
        "INSERT INTO loads",
        "DELETE FROM loads",
    ]
    (line,) = [m for m in caplog.messages if m.startswith("config unchanged")]
    assert re.fullmatch(r"config unchanged \(SIGHUP\), checked in \d+\.\d ms", line)

    # The same listener does see the statements of a load that has something to do.
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.loads.load(reason="SIGHUP") is True
    assert any(statement.startswith("INSERT INTO schedules") for statement in seen)


def test_a_retry_reaches_the_scheduler_by_its_keys_without_a_full_sync(
    daemon: Daemon,
    data_dir: Path,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert daemon.engine is not None and daemon.factory is not None
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    daemon.loads.load(reason="file change")
    (b_key,) = [k for k in jobs(daemon.engine) if k.startswith("b@")]
    (a_key,) = [k for k in jobs(daemon.engine) if k.startswith("a@")]
    trigger_b = jobs(daemon.engine)[b_key]
    # b was booked and failed (its job ran and is gone); a's job went missing too: only a full
    # sync would put a's back.
    with models.transaction(daemon.factory) as session:
        session.execute(text("UPDATE schedules SET status = 'failed' WHERE key = :k"), {"k": b_key})
    with daemon.engine.begin() as conn:
        conn.execute(
            text("DELETE FROM apscheduler_jobs WHERE id IN (:a, :b)"), {"a": a_key, "b": b_key}
        )

    assert run(monkeypatch, env, "retry", "b") == 0
    assert capsys.readouterr().out == (
        f"pending again: {b_key}\nthe daemon (pid {os.getpid()}) picks them up within a second\n"
    )
    logging.getLogger().addHandler(caplog.handler)  # the CLI set up its own logging
    caplog.set_level(logging.INFO)
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.loads.pick_up_retries() == 1

    assert jobs(daemon.engine) == {b_key: trigger_b}
    assert instances.wakeups(daemon.factory) == []
    assert not any("FROM schedules" in s and "WHERE" not in s for s in seen)
    assert (
        f"retry: 1 instance(s) back to pending picked up ({b_key}); jobs: 1 added, 0 moved"
        in caplog.messages
    )
    # Its own writes changed the file: one more look, which finds nothing.
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.loads.pick_up_retries() == 0
    assert len(seen) == 1 and "FROM wakeups" in seen[0]
    # The file as it was at that look: no query at all (two stats instead, each second).
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.loads.pick_up_retries() == 0
    assert seen == []


def test_retries_recorded_while_no_daemon_ran_are_scheduled_at_start(
    env: dict[str, str],
    data_dir: Path,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    desired = future(SOON)
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    entry = {"id": "r", "type": "one-off", "desired_time": f"{desired:%Y-%m-%d %H:%M}"}
    write_json(data_dir / "schedules.json", [entry])
    add(factory, "r", desired=desired, status="failed")
    assert run(monkeypatch, env, "retry", "r") == 0
    assert capsys.readouterr().out.endswith(
        "no daemon runs on this DATA_DIR: they are booked when one starts (an active daemon on "
        "another host sharing the database picks them up within a second)\n"
    )
    assert len(instances.wakeups(factory)) == 1

    with started_daemon(env) as made:
        assert made.engine is not None
        assert list(jobs(made.engine)) == [f"r@{desired:%Y-%m-%dT%H:%M:%SZ}"]
        assert instances.wakeups(factory) == []


def test_an_edited_reload_validates_and_reconciles_only_the_entry_that_changed(
    daemon: Daemon,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b"), one_off("c")])
    daemon.loads.load(reason="file change")
    validated: list[str] = []
    real = config_loader._validate_entry

    def counting(raw: Any, *args: Any, **kwargs: Any) -> Any:
        validated.append(raw["id"])
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(config_loader, "_validate_entry", counting)
    caplog.set_level(logging.INFO)
    write_json(
        data_dir / "schedules.json", [one_off("a"), one_off("b") | {"court_id": 4}, one_off("c")]
    )

    daemon.loads.load(reason="file change")

    assert validated == ["b"]
    (line,) = [m for m in caplog.messages if m.startswith("config loaded (file change)")]
    assert ": 3 schedule(s) (1 validated), 0 error(s); instances: 0 added, 1 changed," in line
    assert line.endswith("; entries changed: b")


def weekly(schedule_id: str) -> dict[str, Any]:
    """A weekly entry: 52 instances."""
    start = future()
    return {
        "id": schedule_id,
        "type": "recurring",
        "desired_time": f"{start:%Y-%m-%d %H:%M}",
        "rrule": "FREQ=WEEKLY",
    }


def test_a_load_that_changed_something_gives_its_memory_back(
    daemon: Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert daemon.engine is not None
    caplog.set_level(logging.DEBUG, logger="courtbot")
    instances.status_rows(daemon.factory)  # an idle connection waits in the pool
    pool = daemon.engine.pool
    assert pool.checkedin() >= 1
    full_collections: list[str] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            full_collections.append(phase)

    def given_back() -> list[str]:
        return [m for m in caplog.messages if m.startswith("memory given back")]

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    heap = "trimmed" if glibc else "not trimmable here (no glibc)"
    line = r"memory given back in \d+\.\d ms: \d+ object\(s\) collected, idle database connections "
    gc.callbacks.append(watch)
    try:
        daemon.loads.load(reason="SIGHUP")  # nothing changed: nothing to give back
        assert (full_collections, given_back()) == ([], [])

        # A small change: its garbage collected, the heap trimmed; the connections kept.
        write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
        daemon.loads.load(reason="SIGHUP")
        assert full_collections == ["start", "stop"]
        # The same pool, its connection still open (idle, or lent to the daemon's own threads
        # at this instant: the watchdog's look or the scheduler may hold it for a moment).
        assert daemon.engine.pool is pool and pool.checkedin() + pool.checkedout() >= 1
        (small,) = given_back()
        assert re.fullmatch(line + rf"kept \(a small change\), heap {re.escape(heap)}", small)

        # 20 weekly entries: 1,040 instances; the idle connections are closed too.
        write_json(data_dir / "schedules.json", [weekly(f"w{i}") for i in range(20)])
        daemon.loads.load(reason="SIGHUP")
    finally:
        gc.callbacks.remove(watch)

    assert full_collections == ["start", "stop"] * 2
    # A new pool; the old one's idle connections closed. (One the daemon's own threads had
    # borrowed at that instant, the watchdog's look or the scheduler's, goes back to the old
    # pool and closes with it: on a busy machine that happens now and then.)
    assert daemon.engine.pool is not pool and pool.checkedin() + pool.checkedout() <= 1
    assert re.fullmatch(line + rf"closed, heap {re.escape(heap)}", given_back()[1])


def test_trim_heap_trims_with_glibc_and_does_nothing_elsewhere() -> None:
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert trim_heap() is glibc


def test_the_start_freezes_what_lives_on_and_the_stop_unfreezes_it(
    env: dict[str, str], data_dir: Path
) -> None:
    write_files(data_dir, [one_off("a")])
    assert gc.get_freeze_count() == 0
    with started_daemon(env):
        # The libraries' objects are out of the collector's sight: a reload's collection is
        # short (Memory.give_back).
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def test_a_loads_collection_waits_while_a_booking_is_under_way_then_the_loop_does_it(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection holds the interpreter (a tenth of a second after a large load): not
    while a booking waits for its trigger or sends."""
    assert daemon.ctx is not None
    collections: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real(*a))
    daemon.ctx.in_flight.add("a@2026-12-09T17:00:00Z")

    with daemon.memory.paused():  # as a load does
        daemon.memory.give_back(touched=5)
    daemon.memory.collect_owed()  # the loop's look: still under way
    assert collections == [] and not gc.isenabled()  # no automatic pass meanwhile either

    daemon.ctx.in_flight.clear()
    daemon.memory.collect_owed()
    assert collections == [1] and gc.isenabled()
    # A daemon that seldom has no booking under way collects after OWED_AT_MOST all the same.
    daemon.ctx.in_flight.add("a@2026-12-09T17:00:00Z")
    with daemon.memory.paused():
        daemon.memory.give_back(touched=5)
    monkeypatch.setattr(daemon_module, "OWED_AT_MOST", 0.0)
    daemon.memory.collect_owed()
    assert collections == [1, 1] and gc.isenabled()
    daemon.ctx.in_flight.clear()
    daemon.memory.collect_owed()  # nothing owed any more
    assert collections == [1, 1]
    daemon.memory.give_back(touched=5)  # no booking under way: at once
    assert collections == [1, 1, 1]


# ---------------------------------------------------------------- daemons (section 10)


def test_status_says_a_daemon_runs_with_its_pid_and_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    daemon: Daemon,
) -> None:
    assert run(monkeypatch, env, "status") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.fullmatch(
        rf"courtbot: running \(pid {os.getpid()}\), active, heartbeat [01] s ago", first
    ), first


def test_status_names_the_active_daemon_on_a_shared_database(
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    unstarted: Callable[..., Daemon],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_files(data_dir, [])
    daemon = unstarted(DATABASE_URL=pg_url)
    daemon.start()
    shared = env | {"DATABASE_URL": pg_url}
    host = os.uname().nodename
    since = utils_format(daemon.roles.since)

    assert run(monkeypatch, shared, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "courtbot: running"
    assert re.fullmatch(
        rf"  active on {re.escape(host)} \(pid {os.getpid()}\) since {since}, heartbeat [01] s ago",
        lines[1],
    ), lines
    assert run(monkeypatch, shared, "status", "--daemons") == 0
    assert capsys.readouterr().out.splitlines() == lines[:2]
    assert run(monkeypatch, shared, "status", "--daemons", "--json") == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown == {
        "id": daemon.roles.ident,
        "host": host,
        "pid": os.getpid(),
        "role": "active",
        "alive": True,
        "since": since,
        "started_at": utils_format(daemon.roles.started_at),
        "heartbeat_at": shown["heartbeat_at"],
    }
    assert run(monkeypatch, shared, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []  # still one array of instances


def utils_format(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def unstarted(env: dict[str, str], data_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """Make a daemon in this process (not started); its handlers are restored afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in DAEMON_SIGNALS}
    made: list[Daemon] = []

    def make(**extra: str) -> Daemon:
        settings = cli.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600", **extra})
        made.append(Daemon(settings, cli.load_fernet(settings), None))
        return made[-1]

    try:
        yield make
    finally:
        for daemon in made:
            daemon.shutdown()
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_standby_waits_then_takes_over_and_steps_down_when_its_lock_goes(
    pg_server: Any,
    pg_url: str,  # first: the database outlives the daemon
    unstarted: Callable[..., Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other = leader.Leadership(pg_url, "other-daemon")
    assert other.try_acquire()
    write_files(data_dir, [one_off("a")])
    tokens_before = (data_dir / "tokens.json").read_text()
    daemon = unstarted(DATABASE_URL=pg_url)
    seen: dict[str, Any] = {}

    daemon.start()  # the role is taken: it returns as a standby

    assert daemon.roles.role == "standby"
    assert daemon.is_healthy() is False  # only the active daemon pings HEARTBEAT_URL
    assert (data_dir / "bot.pid").read_text() == f"{os.getpid()}\n"
    assert (data_dir / "heartbeat").exists()
    assert instances.status_rows(daemon.factory) == []  # it loaded nothing
    assert (data_dir / "tokens.json").read_text() == tokens_before  # nor rewrote the tokens
    assert daemon.engine is not None
    (row,) = leader.list_daemons(daemon.engine, now=datetime.now(UTC))
    assert (row.role, row.pid, row.alive) == ("standby", os.getpid(), True)

    def operator() -> None:
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: any("this daemon is a standby" in m for m in caplog.messages))
            seen["after SIGHUP"] = pending(daemon)
            other.release()  # the active one ends: the standby takes over
            wait_for(lambda: pending(daemon) == ["a"] and daemon.is_healthy())
            seen["role"] = daemon.roles.role
            seen["healthy"] = daemon.is_healthy()
            backend = daemon.roles.lead.backend_pid
            with pg_server.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            wait_for(other.try_acquire)  # another daemon may take it now
            wait_for(lambda: daemon.roles.role == "standby")
            assert daemon.scheduler is not None
            seen["scheduler running"] = daemon.scheduler._scheduler.running
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    daemon.run_forever()
    thread.join(10)
    other.close()

    assert seen == {
        "after SIGHUP": [],
        "role": "active",
        "healthy": True,
        "scheduler running": False,
    }
    messages = caplog.messages
    assert (
        "SIGHUP received: this daemon is a standby; it loads the files when it becomes the "
        "active one"
    ) in messages
    lost = next(i for i, m in enumerate(messages) if m.startswith("lost the active role on "))
    assert messages[lost] == (
        f"lost the active role on {models.mask_url(pg_url)} (its database connection failed): "
        "stopped booking at once; a booking in flight may finish; a standby takes over"
    )
    assert any(m.startswith("standby: this daemon (") for m in messages[lost:])
    assert any(m.startswith("config loaded (became active) in ") for m in messages)
    assert pg_server.password not in caplog.text


def test_the_active_daemon_takes_over_dead_daemons_claims_and_changes_made_elsewhere(
    pg_url: str,  # first: the database outlives the daemon
    unstarted: Callable[..., Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    write_files(data_dir, [])
    daemon = unstarted(DATABASE_URL=pg_url)
    daemon.start()
    assert daemon.roles.is_active and daemon.factory is not None and daemon.engine is not None
    live = leader.Leadership(pg_url, "live-daemon")
    try:
        live.ensure_present()
        # Claims made after this daemon took over: one of a daemon that lives (an old active
        # one finishing its request), one of a daemon that died since; and a failed instance
        # that a `retry` on another host puts back.
        add(daemon.factory, "live", status="pending", desired=future(SOON))
        add(daemon.factory, "dead", status="pending", desired=future(SOON))
        add(daemon.factory, "again", status="failed", desired=future(SOON))
        for schedule, owner in (("live", "live-daemon"), ("dead", "dead-daemon")):
            (key,) = [
                r["key"] for r in instances.status_rows(daemon.factory) if r["schedule"] == schedule
            ]
            assert instances.claim(daemon.factory, key, datetime.now(UTC), owner=owner)
            instances.record_attempt(daemon.factory, key, 1)
        assert instances.retry(daemon.factory, "again", datetime.now(UTC))

        # the loop's hook, with its beat (every 5 s) and its look (every second) both due
        daemon.roles._next_beat = daemon.roles._next_look = 0.0
        assert daemon.roles.tick(daemon, set()) is False  # active: the loop goes on

        # Claims under no current lease are the former active daemons' (CONTRACT section 10):
        # whether their daemon lives or not, one whose trigger comes after that lease ended was
        # never sent (a daemon proves its lease before each send), so it is pending again and
        # booked here; a retry elsewhere is picked up too.
        rows = {r["schedule"]: r for r in instances.status_rows(daemon.factory)}
        assert (rows["live"]["status"], rows["dead"]["status"], rows["again"]["status"]) == (
            "pending",
            "pending",
            "pending",
        )
        assert daemon.scheduler is not None
        jobs = set(daemon.scheduler._stored())
        assert {rows["live"]["key"], rows["dead"]["key"], rows["again"]["key"]} <= jobs
        assert any(
            m.startswith("2 booking(s) claimed by the former active daemon were never sent")
            for m in caplog.messages
        ), caplog.messages
    finally:
        live.close()


def padel_club(data_dir: Path, prepare_seconds: int) -> None:
    """``clubs/padel.json``: a flow that logs in ``prepare_seconds`` before the trigger."""
    clubs = data_dir / "clubs"
    clubs.mkdir(exist_ok=True)
    login = {"name": "login", "url": "https://padel.example/login", "ok": {"status": [200]}}
    book = {"name": "book", "booking": True, "url": "https://padel.example/book"}
    flow = {"prepare_seconds": prepare_seconds, "steps": [login, book]}
    write_json(clubs / "padel.json", flow)


def test_jobs_of_a_club_whose_flow_prepares_start_that_much_before_the_trigger(
    daemon: Daemon, data_dir: Path
) -> None:
    padel_club(data_dir, 90)
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("p") | {"club": "padel"}])
    daemon.safe_load("file change")
    assert daemon.engine is not None

    rows = [r for r in instances.status_rows(daemon.factory) if r["status"] == "pending"]
    with daemon.engine.connect() as conn:
        jobs = dict(list(conn.exec_driver_sql("SELECT id, next_run_time FROM apscheduler_jobs")))
    leads = {
        row["schedule"]: datetime.fromisoformat(
            row["trigger_time"].replace("Z", "+00:00")
        ).timestamp()
        - jobs[row["key"]]
        for row in rows
    }
    assert leads == {"a": pytest.approx(2), "p": pytest.approx(92)}

    # Only the club file changes: its instances' jobs move with its preparation time (the
    # reload's other jobs are looked at only when their instances change).
    padel_club(data_dir, 30)
    daemon.safe_load("file change")
    p_key = next(row["key"] for row in rows if row["schedule"] == "p")
    trigger = next(row["trigger_time"] for row in rows if row["schedule"] == "p")
    lead = (
        datetime.fromisoformat(trigger.replace("Z", "+00:00")).timestamp() - jobs_of(daemon)[p_key]
    )
    assert lead == pytest.approx(32)


def test_a_watched_instance_of_a_club_that_prepares_gets_its_clubs_lead(
    daemon: Daemon, data_dir: Path
) -> None:
    padel_club(data_dir, 90)
    write_json(data_dir / "schedules.json", [one_off("p") | {"club": "padel"}])
    daemon.safe_load("file change")
    assert daemon.factory is not None
    (key,) = [r["key"] for r in instances.status_rows(daemon.factory) if r["schedule"] == "p"]
    next_try = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    with models.transaction(daemon.factory) as session:
        session.execute(
            text("UPDATE schedules SET status = 'watching', next_try_at = :t WHERE key = :k"),
            {"t": next_try.replace(tzinfo=None), "k": key},
        )

    # Whether its job is looked at by key (a retry, a reload) or in a full sync (at start).
    daemon.loads.sync([key])
    assert next_try.timestamp() - jobs_of(daemon)[key] == pytest.approx(92)
    with daemon.engine.begin() as conn:  # type: ignore[union-attr]
        conn.execute(text("DELETE FROM apscheduler_jobs WHERE id = :k"), {"k": key})
    daemon.loads.sync()
    assert next_try.timestamp() - jobs_of(daemon)[key] == pytest.approx(92)


def test_jobs_are_kept_for_the_triggers_within_the_horizon_and_strays_are_dropped(
    daemon: Daemon, data_dir: Path
) -> None:
    assert daemon.engine is not None and daemon.factory is not None and daemon.scheduler
    # Triggers 1 day ahead (within the two days' horizon), then 3 and 13 days ahead.
    entries = [one_off("b"), one_off("c"), one_off("far", days=10), one_off("farther", days=20)]
    write_json(data_dir / "schedules.json", entries)
    daemon.safe_load("file change")
    assert pending(daemon) == ["b", "c", "far", "farther"]
    keys = sorted(jobs(daemon.engine))
    assert [k.split("@")[0] for k in keys] == ["b", "c"]
    # Jobs whose instances are gone, and one instance whose job went missing.
    when = datetime.now(UTC) + timedelta(days=1)
    strays = ["0-gone@x", "c-gone@x", "zz-gone@x"]
    daemon.scheduler.sync_keys(dict.fromkeys(strays, when), strays)
    with daemon.engine.begin() as conn:
        conn.execute(text("DELETE FROM apscheduler_jobs WHERE id = :k"), {"k": keys[0]})

    report = daemon.loads.sync()

    assert sorted(jobs(daemon.engine)) == keys
    assert (report.added, report.moved, report.removed) == (1, 0, 3)
    assert daemon.loads.sync() == scheduler.SyncReport(0, 0, 0)


def load_far_one_off(daemon: Daemon, data_dir: Path) -> str:
    """Load a one-off whose trigger is 3 days ahead (beyond the jobs' horizon); its key."""
    write_json(data_dir / "schedules.json", [one_off("far", days=10)])
    daemon.safe_load("file change")
    (far,) = [r["key"] for r in instances.status_rows(daemon.factory) if r["schedule"] == "far"]
    return far


def test_the_horizons_look_gives_instances_their_jobs_as_their_triggers_come_within_it(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert daemon.engine is not None
    far = load_far_one_off(daemon, data_dir)
    assert far not in jobs(daemon.engine)  # its trigger is 3 days ahead

    # A day on (the horizon reaches 4 days ahead): the look gives it its job.
    monkeypatch.setattr(scheduler, "HORIZON", scheduler.HORIZON + timedelta(days=2))
    daemon.extend()
    assert far in jobs(daemon.engine)
    # A job beyond the horizon is taken away at the next look (as after a reload that moved
    # its trigger further ahead).
    monkeypatch.setattr(scheduler, "HORIZON", timedelta(days=2))
    daemon.extend()
    assert far not in jobs(daemon.engine)


def test_a_jump_forward_moves_the_horizon_on_at_once_in_the_schedulers_thread(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert daemon.engine is not None
    far = load_far_one_off(daemon, data_dir)
    # As if the clock had jumped two days ahead: the trigger is within the horizon now.
    monkeypatch.setattr(scheduler, "HORIZON", scheduler.HORIZON + timedelta(days=2))
    time.sleep(0.3)
    assert far not in jobs(daemon.engine)  # the look comes 10 minutes after the start

    daemon.recovery._clock_jumped(2 * 86400.0)

    wait_for(lambda: far in jobs(daemon.engine), timeout=5.0)


def test_syncs_run_one_at_a_time_from_reading_the_instances_to_writing_the_jobs(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The horizon's look (the scheduler's thread) and the active role's look for changes
    made elsewhere (the loop's) must not write what each read before the other wrote."""
    read = instances.pending_triggers
    inside, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow(*args: Any, **kwargs: Any) -> dict[str, datetime]:
        found = read(*args, **kwargs)
        if len(args) == 1:  # the full sync's read
            inside.set()
            release.wait(5.0)
        return found

    monkeypatch.setattr(instances, "pending_triggers", slow)
    full = threading.Thread(target=lambda: (daemon.loads.sync(), done.append("full")))
    full.start()
    assert inside.wait(5.0)
    by_keys = threading.Thread(target=lambda: (daemon.loads.sync(["x@1"]), done.append("keys")))
    by_keys.start()
    by_keys.join(0.3)
    assert by_keys.is_alive()  # waits for the full sync to have written
    release.set()
    full.join(5.0)
    by_keys.join(5.0)
    assert done == ["full", "keys"]


def test_a_horizon_not_moved_on_for_an_hour_is_a_problem_the_watchdog_recovers(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    now = datetime.now(UTC)
    daemon.horizon.covered_until = now + scheduler.HORIZON - timedelta(minutes=50)
    daemon.recovery.watch()
    assert watchdog_lines(caplog) == []  # 50 minutes of failing looks: not yet

    daemon.horizon.covered_until = now + scheduler.HORIZON - timedelta(hours=2)
    daemon.horizon._error = "OperationalError: database is locked"
    daemon.recovery.watch()  # reported, and recovered by a full sync
    daemon.recovery.watch()  # the next look confirms it

    (error, recovered) = watchdog_lines(caplog)
    assert error[1].startswith(
        "scheduler not working: the jobs of the triggers ahead were last added 2 h ago (up to "
    )
    assert error[1].endswith(
        "Z): OperationalError: database is locked; recovering (`health` reports it until then)"
    )
    assert recovered[1].startswith("scheduler working again")
    assert daemon.horizon.covered_until is not None
    assert daemon.horizon.covered_until > now + scheduler.HORIZON


def test_the_horizons_look_does_nothing_on_a_standby_nor_once_stopping(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[object] = []
    monkeypatch.setattr(
        daemon.loads, "sync", lambda keys=None: synced.append(keys) or scheduler.SyncReport(0, 0, 0)
    )
    monkeypatch.setattr(daemon.roles, "role", leader.STANDBY)
    daemon.extend()
    monkeypatch.setattr(daemon.roles, "role", leader.ACTIVE)
    daemon.stop.set()
    daemon.extend()
    daemon.stop.clear()
    assert synced == []
    daemon.extend()
    assert synced == [None]


def test_a_horizon_look_that_fails_says_why_and_when_it_tries_again(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(keys: Any = None) -> scheduler.SyncReport:
        raise OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(daemon.loads, "sync", broken)
    daemon.extend()
    (line,) = [m for m in caplog.messages if m.startswith("jobs for the triggers")]
    assert line.startswith("jobs for the triggers coming within 2 d could not be added (")
    assert "database is locked" in line and line.endswith("): tried again in 10 min")


def test_a_load_runs_without_the_garbage_collectors_passes_and_turns_it_back_on(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    reconcile = instances.reconcile

    def watched(*args: Any, **kwargs: Any) -> instances.Changes:
        seen.append(gc.isenabled())
        return reconcile(*args, **kwargs)

    monkeypatch.setattr(instances, "reconcile", watched)
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    assert gc.isenabled()
    daemon.safe_load("file change")
    assert seen == [False]
    assert gc.isenabled()


def test_a_load_expands_each_rule_once_and_lets_the_expansion_go(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weekly = [
        {
            "id": f"w{day}",
            "type": "recurring",
            "desired_time": f"{future():%Y-%m-%d} 17:00",
            "rrule": f"FREQ=WEEKLY;BYDAY={day}",
        }
        for day in ("MO", "TU", "WE")
    ]
    write_json(data_dir / "schedules.json", [one_off("a"), *weekly])
    expanded: list[str] = []
    expand = utils.expand_rule_walls

    def counted(rule: utils.ParsedRule, *args: Any, **kwargs: Any) -> Any:
        expanded.append(rule.rfc)
        return expand(rule, *args, **kwargs)

    monkeypatch.setattr(utils, "expand_rule_walls", counted)

    daemon.safe_load("file change")

    # Validated, planned due soon, reconciled: one expansion a rule.
    assert len(expanded) == 3 and len(set(expanded)) == 3
    assert len(pending(daemon)) == 1 + 3 * utils.INSTANCES_PER_RULE
    assert daemon.config is not None
    assert [e.expansion for e in daemon.config.schedules.entries] == [None] * 4


def jobs_of(daemon: Daemon) -> dict[str, float]:
    """The job store's run times by job id (epoch seconds)."""
    assert daemon.engine is not None
    with daemon.engine.connect() as conn:
        return dict(list(conn.exec_driver_sql("SELECT id, next_run_time FROM apscheduler_jobs")))


# ---------------------------------------------------------------- a token that expires


def test_a_token_expiring_before_a_near_trigger_is_reported_once(
    env: dict[str, str], data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    now = datetime.now(UTC)
    expires = (now + timedelta(hours=12)).replace(microsecond=0)
    token = make_jwt({"sub": "me", "exp": int(expires.timestamp())})
    write_json(data_dir / "tokens.json", {"default": token, "other": "opaque"})
    near = now + timedelta(days=8)  # its window opens in a day: within TOKEN_NOTICE_AHEAD
    far = now + timedelta(days=20)
    entries = [
        {"id": "near", "type": "one-off", "desired_time": f"{near:%Y-%m-%d %H:%M}"},
        {"id": "far", "type": "one-off", "desired_time": f"{far:%Y-%m-%d %H:%M}"},
        {
            "id": "opaque",
            "type": "one-off",
            "desired_time": f"{near:%Y-%m-%d %H:%M}",
            "token": "other",
        },
    ]
    write_json(data_dir / "schedules.json", entries)

    with started_daemon(env) as daemon:
        assert warn_expiring_tokens(daemon, datetime.now(UTC)) == []  # sent at start already
        daemon.safe_load("SIGHUP")
        assert warn_expiring_tokens(daemon, datetime.now(UTC)) == []
    with started_daemon(env) as again:  # remembered across restarts too
        assert warn_expiring_tokens(again, datetime.now(UTC)) == []

    sent = [m for m in caplog.messages if m.startswith("token 'default': ")]
    assert sent == [
        f"token 'default': Token 'default' expires {utils.format_utc(expires)}, before 2 booking(s)"
    ]
    assert token not in caplog.text


def test_the_token_expiry_report_says_what_to_do() -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    first = Instance(
        key="wed@2026-12-02T17:00:00Z",
        timezone="Europe/London",
        trigger_time=datetime(2026, 11, 25, 17, 0, tzinfo=UTC),
    )
    subject, body = _token_expiry_message(
        "default", datetime(2026, 11, 24, 10, 0, tzinfo=UTC), 3, first, now
    )
    assert subject == "Token 'default' expires 2026-11-24T10:00:00Z, before 3 booking(s)"
    assert body.splitlines() == [
        "Token 'default' in tokens.json is a JWT that expires 2026-11-24T10:00:00Z (in 22 h).",
        "3 pending booking(s) have their window open after that: at its trigger the club would "
        "reject the token (401). The first:",
        "",
        "    wed@2026-12-02T17:00:00Z: window opens Wed 2026-11-25 17:00 GMT (in 2 d 5 h)",
        "",
        "What to do: put a fresh token in tokens.json (python main.py encrypt-token encrypts it), "
        "then python main.py reload.",
    ]


# ---------------------------------------------------------------- HEARTBEAT_URL


def test_the_daemon_pings_its_heartbeat_url_at_start_and_stops_at_shutdown(
    env: dict[str, str], data_dir: Path, ping_server: PingServer
) -> None:
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    with started_daemon(env | {"HEARTBEAT_URL": ping_server.url("/ping/abc")}) as daemon:
        assert ping_server.wait_for(1)
        assert daemon.pinger is not None and daemon.is_healthy()
    assert ping_server.paths == ["/ping/abc"]
    assert daemon.is_healthy() is False


def test_calendar_entries_are_located_at_the_booking_hosts_name(env: dict[str, str]) -> None:
    # (A URL with a user and password is refused at start: BOOKING_API_URL names a plain host.)
    settings = cli.load_settings(env | {"BOOKING_API_URL": "https://book.club.example:8443/b"})
    assert club_location(settings, None) == "book.club.example"
    assert club_location(cli.load_settings(env | {"BOOKING_API_URL": ""}), None) is None


# ---------------------------------------------------------------- the watchdog, in process


def watchdog_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "watchdog"]


def test_a_stopped_scheduler_is_an_error_at_the_next_look_and_is_restarted(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    daemon.recovery.watch()
    assert watchdog_lines(caplog) == []
    assert daemon.scheduler is not None
    daemon.scheduler.shutdown(wait=True)

    daemon.recovery.watch()  # noticed, restarted
    assert daemon.scheduler.problem() is None
    assert daemon.recovery.watchdog.health() is not None
    daemon.recovery.watch()  # and working since: recovered

    (error, (level, text)) = watchdog_lines(caplog)
    assert error == (
        logging.ERROR,
        "scheduler not working: the scheduler is not running; recovering (`health` reports it "
        "until then)",
    )
    assert level == logging.WARNING
    assert re.fullmatch(
        r"scheduler working again after \d+\.\d s \(was: the scheduler is not running\): "
        r"restarted and re-synced from the instances \(jobs: 0 added, 0 moved, 0 removed\); "
        r"overdue bookings go now",
        text,
    ), text
    assert daemon.scheduler.problem() is None
    assert daemon.recovery.watchdog.health() is None


def test_a_recovery_reopens_the_connections_a_read_only_outage_left_read_only(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """A SQLite connection opened while the database file could not be written stays read-only
    for its life, however writable the file is again; left in the pool, the recovery's write
    probe (and every booking's claim) would fail on it until the daemon gave up (exit 3). Here a
    pooled connection is made read-only (``PRAGMA query_only``, which SQLite keeps per
    connection): the recovery disposes of the pool and writes on fresh connections."""
    caplog.set_level(logging.INFO)
    assert daemon.engine is not None and daemon.scheduler is not None
    models.close_idle_connections(daemon.engine)
    with daemon.engine.connect() as conn:  # the pool's only idle connection from now on
        conn.exec_driver_sql("PRAGMA query_only = ON")
    daemon.scheduler.shutdown(wait=True)

    daemon.recovery.watch()  # noticed, restarted on fresh connections
    daemon.recovery.watch()  # and working since: recovered

    texts = [text for _, text in watchdog_lines(caplog)]
    assert texts[0].startswith("scheduler not working: the scheduler is not running;"), texts
    assert texts[-1].startswith("scheduler working again after "), texts
    assert not any("readonly" in text for text in texts), texts
    assert daemon.recovery.watchdog.health() is None
    with daemon.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA query_only").scalar() == 0


def test_a_trigger_the_scheduler_missed_is_overdue_at_the_second_look_then_run(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """An instance whose job never came (here: its trigger moved in the table behind the
    scheduler's back) is late at one look and overdue at the next; the recovery re-syncs the
    jobs from the instances, and it runs at once: its start has passed too, so it expires."""
    caplog.set_level(logging.INFO)
    assert daemon.factory is not None
    (key,) = [row["key"] for row in instances.status_rows(daemon.factory)]
    past = datetime.now(UTC) - timedelta(minutes=1)
    with models.transaction(daemon.factory) as session:
        row = session.scalars(select(Instance).where(Instance.key == key)).one()
        row.desired_time, row.trigger_time = past, past - timedelta(hours=168)

    daemon.recovery.watch()
    assert watchdog_lines(caplog) == []
    daemon.recovery.watch()
    wait_for(lambda: instances.status_rows(daemon.factory)[0]["status"] == "expired")
    daemon.recovery.watch()

    (error, recovered) = watchdog_lines(caplog)
    assert error == (
        logging.ERROR,
        f"scheduler not working: 1 booking(s) overdue: their trigger came and no booking started "
        f"({key}); recovering (`health` reports it until then)",
    )
    assert "(jobs: 0 added, 1 moved, 0 removed); overdue bookings go now" in recovered[1]


def test_a_restart_that_does_not_get_the_overdue_booking_going_is_no_recovery(
    daemon: Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovered is what the look after the restart sees: a booking still not started keeps the
    daemon failing (and the time toward giving up running), however often it restarts."""
    caplog.set_level(logging.INFO)
    assert daemon.factory is not None
    ran: list[str] = []
    monkeypatch.setattr(daemon, "book", ran.append)  # its job runs; nothing books it
    (key,) = [row["key"] for row in instances.status_rows(daemon.factory)]
    with models.transaction(daemon.factory) as session:
        row = session.scalars(select(Instance).where(Instance.key == key)).one()
        row.trigger_time = datetime.now(UTC) - timedelta(minutes=1)

    for _ in range(2):  # late, then overdue: restarted
        daemon.recovery.watch()
    wait_for(lambda: ran == [key])
    daemon.recovery.watch()  # still pending: not recovered, restarted again

    assert [level for level, _ in watchdog_lines(caplog)] == [logging.ERROR]
    assert daemon.recovery.watchdog.problem is not None
    assert daemon.recovery.watchdog.problem.startswith("1 booking(s) overdue")
    wait_for(lambda: ran == [key, key])


def test_the_instances_are_asked_about_only_when_a_trigger_is_near_or_the_jobs_changed(
    daemon: Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[datetime] = []
    real_overdue = instances.overdue

    def counting(factory: Any, before: datetime, **kw: Any) -> list[str]:
        asked.append(before)
        return real_overdue(factory, before, **kw)

    monkeypatch.setattr(instances, "overdue", counting)
    for _ in range(4):  # the only trigger is days ahead: read once, then nothing to ask
        daemon.recovery.watch()
    assert len(asked) == 1
    daemon.safe_load("SIGHUP")  # nothing changed: no job either
    daemon.recovery.watch()
    assert len(asked) == 1
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    daemon.safe_load("SIGHUP")  # jobs synced: the earliest trigger may have changed
    daemon.recovery.watch()
    daemon.recovery.watch()
    assert len(asked) == 2
    monkeypatch.setattr(watchdog, "NEXT_DUE_REFRESH", 0.0)  # and read again now and then anyway
    daemon.recovery.watch()
    assert len(asked) == 3


def test_a_clock_jump_is_logged_and_wakes_the_scheduler(
    daemon: Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    wall = [1_800_000_000.0]
    mono = [100.0]
    daemon.recovery.clock = watchdog.ClockWatch(wall=lambda: wall[0], monotonic=lambda: mono[0])
    woken: list[bool] = []
    monkeypatch.setattr(daemon.scheduler, "wakeup", lambda: woken.append(True))

    wall[0] += 3601.0
    mono[0] += 1.0
    daemon.recovery.watch()
    wall[0] += 1.0 - 42.5
    mono[0] += 1.0
    daemon.recovery.watch()

    assert [m for m in caplog.messages if "wall clock" in m] == [
        "the wall clock jumped forward by 3600.0 s (an NTP step, a resumed VM?): scheduler "
        "woken; triggers it passed are booked now",
        "the wall clock jumped backward by 42.5 s: scheduler woken; no request leaves before "
        "its trigger by the clock",
    ]
    assert woken == [True, True]


@pytest.fixture
def disk_daemon(
    env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[Daemon, dict[str, str], Path]]:
    """A started daemon in this process whose DATA_DIR is a 4 MB disk (tmpfs) the test fills."""
    handlers = {signum: signal.getsignal(signum) for signum in DAEMON_SIGNALS}
    with small_disk(tmp_path / "disk") as disk:
        write_json(disk / "tokens.json", {"default": "tok-secret"})
        write_json(disk / "schedules.json", [one_off("a")])
        disk_env = env | {"DATA_DIR": str(disk), "RELOAD_INTERVAL_SECONDS": "3600"}
        settings = cli.load_settings(disk_env)
        made = Daemon(settings, cli.load_fernet(settings), None)
        try:
            made.start()
            yield made, disk_env, disk
        finally:
            made.shutdown()
            signal.set_wakeup_fd(-1)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def test_not_recovering_for_the_give_up_time_stops_the_loop_with_exit_3_health_1_meanwhile(
    disk_daemon: tuple[Daemon, dict[str, str], Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk is full and stays so: no recovery can write. `health` says why at once (the
    heartbeat is rewritten in place: a full disk takes no new file); after the give-up time
    (60 s; 2 s here) the loop ends and the process would exit 3 for its supervisor."""
    daemon, env, disk = disk_daemon
    caplog.set_level(logging.INFO)
    daemon.recovery.watchdog.give_up_after = 2.0
    fill(disk)
    assert daemon.scheduler is not None
    daemon.scheduler.shutdown(wait=True)
    seen: list[tuple[int, str]] = []

    def health_meanwhile() -> None:
        wait_for(lambda: daemon.recovery.watchdog.problem is not None)
        assert cli.cmd_health(env) == 1
        seen.append((1, capsys.readouterr().err))

    looker = threading.Thread(target=health_meanwhile)
    looker.start()
    started = time.monotonic()
    daemon.run_forever()
    looker.join(10)

    assert daemon.exit_code == EXIT_NOT_WORKING == 3
    assert 2.0 <= time.monotonic() - started < 10
    ((_, health_said),) = seen
    assert re.fullmatch(
        r"courtbot health: not working since \S+Z: (the scheduler is not running|the database "
        r"cannot be written \(OperationalError: database or disk is full\))\n",
        health_said,
    ), health_said
    lines = [text for _, text in watchdog_lines(caplog)]
    assert lines[0] == (
        "scheduler not working: the scheduler is not running; recovering (`health` reports it "
        "until then)"
    )
    assert lines[-1] == (
        "scheduler not working for 2 s: the database cannot be written (OperationalError: "
        "database or disk is full); exiting with status 3 for the supervisor to restart courtbot"
    )
    assert not list(disk.glob(".heartbeat.*"))  # a failed atomic write leaves no file behind
