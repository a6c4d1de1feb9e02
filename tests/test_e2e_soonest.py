"""End to end: a load at start schedules what is due soon before it finishes the rest (issue
24, soonest first). A real daemon loads a few hundred weekly schedules from an empty database;
an instance whose window is already open is booked while the rest is still loading, not after.
The assertion is on order (the booking against the load's own log line), not on timing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from daemon_harness import DaemonProcess, db_status, iso_z, wait_until
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-soonest-3a9c"
#: Enough weekly schedules for the rest of the load to take seconds (52 instances each).
SCHEDULES = 300
_LOADED = re.compile(r"^(\S+) INFO courtbot: config loaded \(start\)", re.M)
_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def weekly(count: int, first_day: datetime) -> list[dict[str, object]]:
    """``count`` weekly entries, each in its own ten minutes of the week (none overlap)."""
    return [
        {
            "id": f"w{i:04d}",
            "type": "recurring",
            "desired_time": (first_day + timedelta(minutes=10 * (i // 7))).strftime(
                "%Y-%m-%d %H:%M"
            ),
            "rrule": f"FREQ=WEEKLY;BYDAY={_DAYS[i % 7]}",
            "duration_minutes": 5,
        }
        for i in range(count)
    ]


def test_an_instance_due_at_start_is_booked_before_the_load_finishes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with SandboxClub(tokens=(TOKEN,)) as club:
        # Its window opened a minute ago; its start is still a week ahead: booked at once.
        desired = (datetime.now(UTC) + timedelta(hours=168, minutes=-1)).replace(microsecond=0)
        first_day = (datetime.now(UTC) + timedelta(days=9)).replace(hour=0, minute=0)
        entries = [
            *weekly(SCHEDULES, first_day),
            {"id": "due", "type": "one-off", "desired_time": iso_z(desired), "court_id": "3"},
        ]
        (data / "schedules.json").write_text(json.dumps(entries))
        (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
        env = {
            "PATH": "/usr/bin:/bin",
            "FERNET_KEY": Fernet.generate_key().decode(),
            "DATA_DIR": str(data),
            "LOG_FILE": "-",
            "LOG_LEVEL": "INFO",
            "BOOKING_API_URL": club.url,
            "BOOKING_TIMEZONE": "UTC",
        }
        process = DaemonProcess(env, data, tmp_path / "out.txt").start()
        try:
            process.wait_ready(timeout=240)
            key = f"due@{iso_z(desired)}"
            assert wait_until(lambda: db_status(env, key) == "booked", 30)
            posts = [r for r in club.received if r.method == "POST"]
        finally:
            process.cleanup()
    loaded = _LOADED.search(process.output())
    assert loaded is not None, process.output()[-2000:]
    loaded_at = datetime.fromisoformat(loaded[1].replace("Z", "+00:00")).timestamp()
    assert len(posts) == 1
    # The booking reached the club while the other 15,600 instances were still being loaded.
    assert posts[0].arrived < loaded_at
    assert "soonest first: 1 instance(s) due by" in process.output()
