"""Never silently (CONTRACT section 9), end to end: the real daemon in a subprocess against the
sandbox club, on disks that misbehave and under a wall clock that jumps.

1. start-up: a read-only or full DATA_DIR, an unwritable log file, a database that cannot be
   opened: exit 2 with one line naming the path and the fix;
2. a disk that fills up 3.5 s before a burst of bookings: noticed at once, `health` 1 while it
   lasts, every booking made once the space is back;
3. the wall clock stepped forward an hour, then back 5 s (libfaketime): the trigger the step
   carried past is booked at once; none is sent before its trigger by the clock at send time.

Disks are a small tmpfs and a read-only bind mount (tests/mounts.py: root only, else skipped);
the clock is libfaketime (Debian's `faketime`, installed by `make faketime`; else skipped).
Each test prints its figures (``pytest -rA``); docs/reliability.md quotes them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from daemon_harness import (
    READY_SECONDS,
    DaemonProcess,
    cli,
    desired_for_trigger_in,
    iso_z,
    wait_until,
)
from mounts import fill, read_only, small_disk
from reliability_helpers import db_rows
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-watchdog-7c1e"
WINDOW = timedelta(hours=168)
#: A booking job starts this long before its trigger (scheduler.LEAD).
LEAD = 2.0
FAKETIME_LIBS = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))


def record(test: str, **figures: Any) -> None:
    print(f"FIGURES {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def base_env(data: Path, api_url: str = "http://127.0.0.1:9/bookings") -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "BOOKING_API_URL": api_url,
        "DATA_DIR": str(data),
        "RETRY_BASE_SECONDS": "0.2",
        "HTTP_TIMEOUT_SECONDS": "2",
    }


def config_files(data: Path, entries: list[dict[str, Any]] | None = None) -> None:
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    (data / "schedules.json").write_text(json.dumps(entries or []))


def one_off(entry_id: str, desired: datetime, court: object) -> dict[str, Any]:
    return {"id": entry_id, "type": "one-off", "desired_time": iso_z(desired), "court_id": court}


def exits_2_with(spawn: Callable[..., DaemonProcess], env: dict[str, str], line: str) -> None:
    daemon = spawn(env)
    assert daemon.wait(30) == 2, daemon.output()
    assert daemon.output().splitlines() == [line]


def log_time(line: str) -> float:
    """The epoch seconds of a log line's UTC timestamp."""
    stamp = datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    return stamp.timestamp()


def first_line(output: str, pattern: str) -> str:
    for line in output.splitlines():
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matches {pattern!r}:\n{output}")


# --------------------------------------------------------------------------- 1. start-up


@pytest.mark.parametrize("log_file", [None, "-"], ids=["log-in-data-dir", "console-only"])
def test_a_read_only_data_dir_at_start_is_exit_2_with_one_line(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], log_file: str | None
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    config_files(source)
    with read_only(source, tmp_path / "ro") as data:
        env = base_env(data) | ({"LOG_FILE": log_file} if log_file else {})
        exits_2_with(
            spawn,
            env,
            f"courtbot: cannot start: DATA_DIR {data} cannot be written (Read-only file system): "
            "mount it read-write, or set DATA_DIR to a writable directory",
        )


def test_an_unwritable_log_file_at_start_is_exit_2_with_one_line(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config_files(data)
    (tmp_path / "logs").mkdir()
    with read_only(tmp_path / "logs", tmp_path / "ro-logs") as logs:
        env = base_env(data) | {"LOG_FILE": str(logs / "bot.log")}
        exits_2_with(
            spawn,
            env,
            f"courtbot: cannot start: LOG_FILE {logs / 'bot.log'} cannot be written (Read-only "
            "file system): mount it read-write, or set LOG_FILE to a writable file, or to - "
            "(console only)",
        )


def test_a_full_data_dir_at_start_is_exit_2_with_one_line(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    with small_disk(tmp_path / "disk", size="1m") as data:
        config_files(data)
        fill(data)
        exits_2_with(
            spawn,
            base_env(data),
            f"courtbot: cannot start: DATA_DIR {data} cannot be written (No space left on "
            "device): free space on its disk, or set DATA_DIR to a writable directory",
        )


def test_a_database_that_cannot_be_opened_is_exit_2_with_one_line(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config_files(data)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database, whatever its name says\n" * 100)
    env = base_env(data) | {"LOG_FILE": "-", "DATABASE_URL": f"sqlite:///{garbage}"}
    exits_2_with(
        spawn,
        env,
        f"courtbot: cannot start: cannot open the database sqlite:///{garbage}: DatabaseError: "
        f"file is not a database; {garbage} is not a SQLite database: check DATABASE_URL",
    )
    (tmp_path / "dbdir").mkdir()
    with read_only(tmp_path / "dbdir", tmp_path / "ro-db") as ro:
        env |= {"DATABASE_URL": f"sqlite:///{ro / 'db.sqlite'}"}
        exits_2_with(
            spawn,
            env,
            f"courtbot: cannot start: DATABASE_URL {ro / 'db.sqlite.lock'} cannot be written "
            "(Read-only file system): mount it read-write, or set DATABASE_URL to a writable "
            "place (the lock file goes beside it)",
        )


# --------------------------------------------------------------------------- 2. a full disk


class HealthPoller:
    """Runs `main.py health` over and over in a thread; keeps (started, ended, exit code,
    stderr) of each call."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.seen: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            done = cli(self.env, "health")
            self.seen.append((started, time.time(), done.returncode, done.stderr.strip()))
            self._stop.wait(0.1)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, start: float, end: float) -> list[tuple[float, float, int, str]]:
        """The calls made wholly between ``start`` and ``end``."""
        return [call for call in self.seen if call[0] >= start and call[1] <= end]


def test_a_disk_that_fills_before_a_burst_is_noticed_at_once_and_every_booking_made_once_freed(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """The issue's worst case: DATA_DIR (database, job store, log file, heartbeat) on a 4 MB
    disk that fills 3.5 s before 10 bookings share a trigger, and is freed 2 s after it. The
    jobs start 2 s before the trigger: the first one's claim cannot be written and APScheduler's
    ``remove_job`` kills its thread. Noticed within a second (an error, `health` 1), recovered
    within a second of the space coming back: all 10 booked once each, none early."""
    with SandboxClub(tokens=(TOKEN,)) as club, small_disk(tmp_path / "disk") as data:
        desired = desired_for_trigger_in(READY_SECONDS + 3.5)
        trigger = (desired - WINDOW).timestamp()
        keys = [f"burst-{n}@{iso_z(desired)}" for n in range(10)]
        config_files(data, [one_off(f"burst-{n}", desired, f"c{n}") for n in range(10)])
        env = base_env(data, club.url)
        daemon = spawn(env)
        daemon.wait_ready(before=trigger - 3.5)
        assert wait_until(lambda: time.time() >= trigger - 3.5, 10)
        filler = fill(data)
        with HealthPoller(env) as health:
            assert wait_until(lambda: time.time() >= trigger + 2.0, 10)
            sent_while_full = len(club.received)
            filler.unlink()
            freed = time.time()
            assert club.wait_for(lambda: len(club.received) >= 10, 15), daemon.output()
            assert wait_until(lambda: "scheduler working again" in daemon.output(), 10)
            back = time.time()
            assert wait_until(lambda: health.between(back, time.time()), 15)
        assert wait_until(
            lambda: all(db_rows(data / "db.sqlite").get(k, ("",))[0] == "booked" for k in keys), 10
        )
        assert daemon.stop() == 0
        out = daemon.output()

    per_key = club.bookings_per_key()
    arrivals = sorted(r.arrived for r in club.received)
    error = first_line(out, r"ERROR watchdog: scheduler not working: ")
    noticed = log_time(error) - (trigger - LEAD)
    recovered_line = first_line(out, r"WARNING watchdog: scheduler working again after ")
    during = health.between(log_time(error), freed)
    later = health.between(back, float("inf"))
    record(
        "full_disk_burst",
        bookings=len(keys),
        sent_while_full=sent_while_full,
        noticed_after_the_first_job_s=round(noticed, 2),
        health_calls_while_full=len(during),
        health_1_while_full=sum(1 for call in during if call[2] == 1),
        first_booking_after_freeing_s=round(arrivals[0] - freed, 2),
        last_booking_after_freeing_s=round(arrivals[-1] - freed, 2),
        booked=sum(per_key.values()),
        double_bookings=sum(1 for n in per_key.values() if n > 1),
    )
    assert sent_while_full == 0
    assert error.endswith(
        "scheduler not working: the scheduler's thread stopped: OperationalError: database or "
        "disk is full; recovering (`health` reports it until then)"
    )
    assert noticed < 2.0
    # `health` is 1 for every call made while the disk was full, and 0 again afterwards.
    assert during and all(call[2] == 1 for call in during), health.seen
    assert all(call[3].startswith("courtbot health: not working since ") for call in during)
    assert all("database or disk is full" in call[3] for call in during)
    assert later and all(call[2] == 0 for call in later), health.seen
    assert "restarted and re-synced from the instances" in recovered_line
    assert dict(per_key) == dict.fromkeys(keys, 1)
    assert arrivals[0] >= trigger and arrivals[-1] - freed < 3.0
    # One line per event: no traceback from a dying thread or a failing log file.
    assert "Traceback" not in out and "Logging error" not in out
    assert out.count("cannot write the log file") <= 1


# --------------------------------------------------------------------------- 3. the wall clock


def test_the_wall_clock_steps_forward_an_hour_then_back_five_seconds(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """libfaketime moves the daemon's wall clock (its monotonic clock stays true, as an NTP step
    leaves it). The daemon starts an hour behind: APScheduler sleeps an hour toward the first
    trigger. Once it runs (T+R, R = READY_SECONDS) the clock steps forward: `ahead` (trigger
    T+R-1 s) is booked at once. At T+R+2 s it steps back 5 s: `after` (trigger T+R+6 s) leaves
    at T+R+11 s, its trigger by the clock at send time, and no earlier."""
    if not FAKETIME_LIBS:
        pytest.skip("libfaketime is not installed (`make faketime`, or apt-get install faketime)")
    offset = tmp_path / "faketime"
    offset.write_text("-3600\n")
    with SandboxClub(tokens=(TOKEN,)) as club:
        data = tmp_path / "data"
        data.mkdir()
        t0 = time.time()
        step = t0 + READY_SECONDS  # the step forward
        ahead = (datetime.fromtimestamp(step - 1, UTC) + WINDOW).replace(microsecond=0)
        after = (datetime.fromtimestamp(step + 6, UTC) + WINDOW).replace(microsecond=0)
        config_files(data, [one_off("ahead", ahead, 1), one_off("after", after, 2)])
        env = base_env(data, club.url) | {
            "LOG_FILE": "-",
            "LD_PRELOAD": str(FAKETIME_LIBS[0]),
            "FAKETIME_TIMESTAMP_FILE": str(offset),
            "FAKETIME_NO_CACHE": "1",
            # CLOCK_MONOTONIC stays true (as an NTP step leaves it); without the "monotonic
            # fix" libfaketime's condition waits stay fast.
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_FORCE_MONOTONIC_FIX": "0",
        }
        daemon = spawn(env)
        daemon.wait_ready(before=step)
        assert wait_until(lambda: time.time() >= step, 15)
        offset.write_text("+0\n")
        forward = time.time()
        assert wait_until(lambda: time.time() >= step + 2, 5)
        offset.write_text("-5\n")
        backward = time.time()
        assert club.wait_for(lambda: len(club.received) >= 2, 20), daemon.output()
        assert daemon.stop() == 0
        out = daemon.output()

    arrived = {r.idempotency_key.split("@")[0]: r.arrived for r in club.received}
    ahead_trigger = (ahead - WINDOW).timestamp()
    after_trigger = (after - WINDOW).timestamp()
    step_up = first_line(out, r"wall clock jumped forward by 3600\.\d s")
    step_back = first_line(out, r"wall clock jumped backward by 5\.\d s")
    record(
        "clock_jumps",
        forward_noticed_s=round(log_time(step_up) - forward, 2),
        carried_past_booked_after_the_step_s=round(arrived["ahead"] - forward, 2),
        backward_noticed_s=round(log_time(step_back) + 5 - backward, 2),
        after_sent_past_its_trigger_by_the_daemon_clock_ms=round(
            (arrived["after"] - 5 - after_trigger) * 1000, 1
        ),
    )
    assert len(club.received) == 2
    assert arrived["ahead"] >= ahead_trigger
    assert arrived["ahead"] - forward < 2.5
    # By the daemon's clock (5 s behind the club's after the step back), never before.
    assert arrived["after"] - 5 >= after_trigger
    assert arrived["after"] - 5 - after_trigger < 0.5
    assert log_time(step_up) - forward < 2.0
    assert log_time(step_back) + 5 - backward < 2.0
    assert "Traceback" not in out


# --------------------------------------------------------------------------- 4. the database back


@contextlib.contextmanager
def immutable(paths: list[Path]) -> Iterator[Callable[[], None]]:
    """``chattr +i`` on ``paths`` (root on ext4 and the like: not even root can write them, and
    SQLite opens them read-only); yields the function that lifts it, lifted at the end anyway."""
    done: list[bool] = []

    def lift() -> None:
        if not done:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
            done.append(True)

    attempt = subprocess.run(
        ["chattr", "+i", *map(str, paths)], check=False, capture_output=True, text=True
    )
    if attempt.returncode != 0:
        pytest.skip(f"chattr +i is not possible here: {attempt.stderr.strip()}")
    try:
        yield lift
    finally:
        lift()


def test_a_database_made_unwritable_then_writable_again_is_recovered_within_seconds(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """db.sqlite and its -wal and -shm made immutable 3 s before 5 bookings share a trigger, and
    writable again 3 s after it: the daemon notices at once (`health` 1), and once writes succeed
    again reopens its connections (a SQLite connection opened meanwhile stays read-only for
    good), re-syncs the scheduler and books all 20 within seconds; `health` is 0 again and the
    daemon never gives up (exit 3)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    with SandboxClub(tokens=(TOKEN,)) as club:
        data = tmp_path / "data"
        data.mkdir()
        desired = desired_for_trigger_in(READY_SECONDS + 3.0)
        trigger = (desired - WINDOW).timestamp()
        keys = [f"ro-{n}@{iso_z(desired)}" for n in range(20)]
        config_files(data, [one_off(f"ro-{n}", desired, f"c{n}") for n in range(20)])
        env = base_env(data, club.url)
        daemon = spawn(env)
        daemon.wait_ready(before=trigger - 3.0)
        assert wait_until(lambda: time.time() >= trigger - 3.0, 10)
        files = [p for p in data.glob("db.sqlite*") if not p.name.endswith(".lock")]
        with immutable(files) as lift, HealthPoller(env) as health:
            assert wait_until(lambda: time.time() >= trigger + 3.0, 10)
            sent_while_immutable = len(club.received)
            lift()
            back = time.time()
            booked = wait_until(
                lambda: all(db_rows(data / "db.sqlite").get(k, ("",))[0] == "booked" for k in keys),
                30,
            )
            all_booked = time.time()
            assert booked, daemon.output()
            # `health` is 0 again from the look that finds the scheduler working again.
            assert wait_until(lambda: "scheduler working again" in daemon.output(), 10)
            recovered = time.time()
            assert wait_until(lambda: health.between(recovered, time.time()), 15)
            # From the first write the outage stops (the jobs start LEAD before the trigger;
            # one second to notice) until the files are writable again.
            during = health.between(trigger - LEAD + 1.0, back)
            later = health.between(recovered, float("inf"))
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.output()
        assert daemon.stop() == 0
        out = daemon.output()

    per_key = club.bookings_per_key()
    arrivals = sorted(r.arrived for r in club.received)
    record(
        "immutable_database",
        bookings=len(keys),
        sent_while_immutable=sent_while_immutable,
        health_1_while_immutable=f"{sum(1 for c in during if c[2] == 1)}/{len(during)}",
        first_booking_after_writable_s=round(arrivals[0] - back, 2),
        all_booked_after_writable_s=round(all_booked - back, 2),
    )
    assert during and all(call[2] == 1 for call in during), health.seen
    assert later and all(call[2] == 0 for call in later), health.seen
    assert dict(per_key) == dict.fromkeys(keys, 1)
    assert arrivals[0] >= trigger
    assert all_booked - back < 5.0, out
    assert "Traceback" not in out
