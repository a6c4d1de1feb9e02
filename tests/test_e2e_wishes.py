"""CONTRACT section 13 end to end: a real daemon (``python main.py``) against the sandbox club
on 127.0.0.1, on the real clock. Every court of the desired time and of the fallback time is
taken at the trigger; the instance watches at the shortest interval a user may set
(WATCH_INTERVAL_SECONDS=60), survives a restart while it watches, and is booked from the watch
once the club frees the slot. The daemon is down long enough for its next try to come within
seconds of the restart (the test moves that try in the database, as a longer stop would have):
the test waits seconds, not the whole interval. Slow all the same (about 20 s): it runs beside
the serial tests (UNTIMED_SLOW in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from daemon_harness import (
    READY_SECONDS,
    DaemonProcess,
    db_status,
    desired_for_trigger_in,
    iso_z,
    status,
    wait_until,
)
from scheduler import LEAD
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-wishes-3e9a"
INTERVAL = 60.0


@pytest.fixture
def club() -> Iterator[SandboxClub]:
    with SandboxClub(tokens=(TOKEN,)) as running:
        yield running


@pytest.fixture
def env(tmp_path: Path, club: SandboxClub) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "BOOKING_API_URL": club.url,
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "RETRY_BASE_SECONDS": "0.05",
        "HTTP_TIMEOUT_SECONDS": "2",
        "WATCH_INTERVAL_SECONDS": str(int(INTERVAL)),
    }


def row_of(env: dict[str, str], key: str) -> dict[str, object]:
    return next(r for r in status(env) if r["key"] == key)


def test_taken_everywhere_watches_through_a_restart_and_books_when_a_court_frees(
    env: dict[str, str], club: SandboxClub, spawn: Callable[[dict[str, str]], DaemonProcess]
) -> None:
    # Nothing here is timed against the trigger itself: room for a busy machine to start.
    desired = desired_for_trigger_in(3 * READY_SECONDS + LEAD.total_seconds())
    # A fallback a minute earlier on the same date: its window is open already (at once).
    fallback = (desired - timedelta(minutes=1)).replace(second=0)
    if fallback.date() != desired.date():
        fallback = (desired + timedelta(minutes=1)).replace(second=0)
    for moment in (desired, fallback):
        club.set_taken("3", moment)
    entry = {
        "id": "watched",
        "type": "one-off",
        "desired_time": f"{desired:%Y-%m-%d %H:%M:%S}",
        "timezone": "UTC",
        "court_id": "3",
        "fallback_times": [f"{fallback:%H:%M}"],
        "watch": "1h",
    }
    (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps([entry]))
    key = f"watched@{iso_z(desired)}"
    daemon = spawn(env)
    daemon.wait_ready()

    assert wait_until(lambda: db_status(env, key) == "watching", 30), daemon.output()
    sent = [r for r in club.received if r.method == "POST"]
    assert [(r.idempotency_key, r.start_at) for r in sent] == [
        (key, desired),
        (f"{key}@{fallback:%H:%M}", fallback),
    ]
    watching = row_of(env, key)
    assert watching["next_try"] is not None
    next_try = watching["next_try"]
    assert isinstance(next_try, str)
    gap = (
        datetime_of(next_try) - datetime_of(str(watching["desired_time"])) + timedelta(hours=168)
    ).total_seconds()
    # WATCH_INTERVAL_SECONDS ±10 %, never under 60 s, counted from the taken answers.
    assert INTERVAL - 1 <= gap <= INTERVAL * 1.1 + 5, watching
    assert str(watching["last_error"]).startswith(f"{desired:%H:%M}: court 3: taken")

    # A restart while it watches: the watch is in the database, and goes on. The stop lasts
    # until its next try is seconds away (moved in the table, as if it had lasted that long).
    assert daemon.stop() == 0
    moved = (datetime.now(UTC) + timedelta(seconds=2 * READY_SECONDS)).replace(microsecond=0)
    with contextlib.closing(sqlite3.connect(Path(env["DATA_DIR"]) / "db.sqlite")) as conn:
        conn.execute(
            "UPDATE schedules SET next_try_at = ? WHERE key = ?",
            (f"{moved:%Y-%m-%d %H:%M:%S}.000000", key),
        )
        conn.commit()
    daemon = spawn(env)
    daemon.wait_ready()
    assert row_of(env, key)["status"] == "watching"
    club.free("3", desired)

    assert wait_until(lambda: db_status(env, key) == "booked", 30), daemon.output()
    tries = [r for r in club.received if r.method == "POST"][2:]
    assert [r.idempotency_key for r in tries] == [f"{key}~watch1"]
    # The try left at its time, not before (the interval itself is held above, as next_try).
    assert tries[0].arrived >= moved.timestamp()
    booked = row_of(env, key)
    assert (booked["booked_time"], booked["booking_ref"]) == (
        f"{desired:%H:%M}",
        club.bookings[0].id,
    )
    assert len(club.bookings) == 1
    assert daemon.stop() == 0
    log = (Path(env["DATA_DIR"]) / "bot.log").read_text()
    assert f"watching {key} " in log and "until=" in log
    assert f"booked {key} " in log and "from_watch" in log
    assert TOKEN not in log


def datetime_of(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
