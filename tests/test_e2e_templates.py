"""End to end with request templates: three club shapes, booked and taken (CONTRACT section 11)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet

from daemon_harness import DaemonProcess, by_key, cli, iso_z, wait_until
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-template-77aa"


def setup(tmp_path: Path, club: SandboxClub, template: dict[str, object]) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    (data / "club.json").write_text(json.dumps(template))
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "DATA_DIR": str(data),
        "LOG_FILE": "-",
        "BOOKING_REQUEST_TEMPLATE": "club.json",
        "BOOKING_TIMEZONE": "Europe/Madrid",
        "RETRY_BASE_SECONDS": "0.05",
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.cleanup()


@pytest.mark.parametrize("shape", ["path-form", "json-local", "taken-200"])
def test_template_books_and_detects_taken(
    tmp_path: Path, daemon: list[DaemonProcess], shape: str
) -> None:
    with SandboxClub(tokens=(TOKEN,), shape=shape, timezone="Europe/Madrid") as club:
        env = setup(tmp_path, club, club.template())
        start = (datetime.now(UTC) + timedelta(hours=50)).replace(minute=0, second=0, microsecond=0)
        taken_start = start + timedelta(hours=2)
        club.set_taken("4", taken_start)
        local = start.astimezone(ZoneInfo("Europe/Madrid"))
        entries = [
            {
                "id": "mine",
                "type": "one-off",
                "desired_time": local.strftime("%Y-%m-%d %H:%M"),
                "court_id": "3",
            },
            {"id": "gone", "type": "one-off", "desired_time": iso_z(taken_start), "court_id": 4},
        ]
        (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps(entries))

        checked = cli(env, "check")
        assert checked.returncode == 0, checked.stderr
        assert "request (next instance, token masked):" in checked.stdout
        assert TOKEN not in checked.stdout + checked.stderr
        assert "***" in checked.stdout

        process = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "out.txt").start()
        daemon.append(process)
        process.wait_ready()
        mine = f"mine@{iso_z(start)}"
        gone = f"gone@{iso_z(taken_start)}"

        def done() -> bool:
            rows = by_key(env)
            return rows[mine]["status"] == "booked" and rows[gone]["status"] == "failed"

        assert wait_until(done, 15), process.output()
        rows = by_key(env)
        assert rows[mine]["booking_ref"] == club.bookings[0].id
        assert "taken" in rows[gone]["last_error"]
        assert len(club.bookings) == 1
        assert process.stop() == 0
        assert TOKEN not in process.output()


def test_invalid_template_stops_run_and_fails_check(
    tmp_path: Path, daemon: list[DaemonProcess]
) -> None:
    with SandboxClub(tokens=(TOKEN,), shape="json-local") as club:
        template = club.template() | {"json": {"when": "{date"}}
        env = setup(tmp_path, club, template)
        (Path(env["DATA_DIR"]) / "schedules.json").write_text("[]")
        process = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "out.txt").start()
        daemon.append(process)
        assert process.wait(20) == 2
        lines = process.output().strip().splitlines()
        assert len(lines) == 1
        assert "BOOKING_REQUEST_TEMPLATE" in lines[0] and "json.when" in lines[0]
        checked = cli(env, "check")
        assert checked.returncode == 1
        assert "json.when: unbalanced '{'" in checked.stderr


def test_broken_template_on_reload_keeps_the_last_good_one(
    tmp_path: Path, daemon: list[DaemonProcess]
) -> None:
    with SandboxClub(tokens=(TOKEN,), shape="taken-200") as club:
        env = setup(tmp_path, club, club.template())
        (Path(env["DATA_DIR"]) / "schedules.json").write_text("[]")
        process = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "out.txt").start()
        daemon.append(process)
        process.wait_ready()
        (Path(env["DATA_DIR"]) / "club.json").write_text('{"method": "BREW"}')
        process.signal(signal.SIGHUP)
        assert wait_until(lambda: "the last good template stays" in process.output(), 5)
        start = (datetime.now(UTC) + timedelta(hours=30)).replace(microsecond=0)
        entry = {"id": "after", "type": "one-off", "desired_time": iso_z(start), "court_id": 1}
        (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps([entry]))
        process.signal(signal.SIGHUP)
        key = f"after@{iso_z(start)}"
        assert wait_until(lambda: by_key(env).get(key, {}).get("status") == "booked", 10), (
            process.output()
        )
        assert process.stop() == 0
