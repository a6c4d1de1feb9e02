"""Run the real daemon (``python main.py run``) as a subprocess against a sandbox club.

Every wait is bounded; a daemon still running when a test ends is killed (the watchdog).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "main.py"
WINDOW_HOURS = 168
#: How far ahead of a daemon's start a test puts the first trigger that the daemon must meet
#: running. `python main.py run` is ready (its pid file written) 0.5 s after its start on an
#: idle machine, 0.9 s with both cores of a 2-core machine busy, 1.2 s on PostgreSQL (its
#: leadership settles first): 2.5 s leaves room for a loaded CI machine, and ``wait_ready``'s
#: ``before`` says so plainly when even that was not enough. A slower machine raises it with the
#: environment variable of that name (``READY_SECONDS=6 make test``).
DEFAULT_READY_SECONDS = 2.5


def ready_seconds(env: dict[str, str] | os._Environ[str]) -> float:
    """READY_SECONDS from ``env`` (at least the default: lowering it only makes tests flaky);
    a value that is no number is an error naming the variable."""
    raw = env.get("READY_SECONDS", "").strip()
    if not raw:
        return DEFAULT_READY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"READY_SECONDS: {raw!r} is not a number of seconds (e.g. 6)") from None
    return max(value, DEFAULT_READY_SECONDS)


READY_SECONDS = ready_seconds(os.environ)


def iso_z(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_for_trigger_in(seconds: float, *, window_hours: float = WINDOW_HOURS) -> datetime:
    """A whole-second desired start whose booking window opens ``seconds`` from now."""
    moment = datetime.now(UTC) + timedelta(hours=window_hours, seconds=seconds)
    return moment.replace(microsecond=0) + timedelta(seconds=1)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class DaemonProcess:
    """One ``python main.py`` child with its environment, its output in a file."""

    def __init__(self, env: dict[str, str], data_dir: Path, log_path: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(MAIN), *(args or ("run",))],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 15.0, *, before: float | None = None) -> None:
        """Wait for the pid file: signal handlers installed and the first load committed.

        ``before`` (epoch seconds): the moment the test needs the daemon ready by (a trigger
        it must meet running); being later fails here, saying so, rather than later and
        obscurely."""
        pid_file = self.data_dir / "bot.pid"

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            return pid_file.exists() and pid_file.read_text().strip() == str(self.pid)

        if not wait_until(ready, timeout):
            raise AssertionError(f"daemon not ready after {timeout} s:\n{self.output()}")
        if before is not None and time.time() >= before:
            raise AssertionError(
                f"daemon ready {time.time() - before:.2f} s after the moment the test needed it "
                f"by (a machine this slow needs more than READY_SECONDS={READY_SECONDS:g}: "
                f"raise it, e.g. READY_SECONDS={2 * READY_SECONDS:g} make test):\n"
                f"{self.output()}"
            )

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon did not exit in {timeout} s:\n{self.output()}") from None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python main.py ARGS`` to completion (60 s at most)."""
    return subprocess.run(
        [sys.executable, str(MAIN), *args],
        env=env,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status(env: dict[str, str]) -> list[dict[str, Any]]:
    """``main.py status --json`` as Python objects."""
    done = cli(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def by_key(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in status(env)}


def db_status(env: dict[str, str], key: str, column: str = "status") -> str | None:
    """The status (or another ``column``) of the instance ``key`` read straight from the
    daemon's database (None while it is not there): what a test polls for while it waits.
    ``status`` is a whole ``python main.py`` per look (about a second of a core), which a poll
    every 0.05 s turns into a core kept busy beside the daemon under test."""
    url = env.get("DATABASE_URL") or f"sqlite:///{Path(env['DATA_DIR']) / 'db.sqlite'}"
    query = f"SELECT {column} FROM schedules WHERE key = %s"  # noqa: S608 (the tests' names)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").partition("?")[0])
        if not path.exists():
            return None
        try:
            uri = f"file:{path}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
                row = conn.execute(query.replace("%s", "?"), (key,)).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return None
    else:
        with psycopg.connect(url, connect_timeout=10) as conn:
            try:
                row = conn.execute(query, (key,)).fetchone()
            except psycopg.errors.UndefinedTable:
                return None
    return None if row is None or row[0] is None else str(row[0])
