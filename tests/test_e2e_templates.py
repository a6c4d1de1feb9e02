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

from daemon_harness import DaemonProcess, by_key, cli, db_status, iso_z, wait_until
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
            return db_status(env, mine) == "booked" and db_status(env, gone) == "failed"

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
        assert wait_until(lambda: db_status(env, key) == "booked", 10), process.output()
        assert process.stop() == 0


def test_club_files_decide_the_url_and_the_window(
    tmp_path: Path, daemon: list[DaemonProcess]
) -> None:
    """No BOOKING_API_URL: each entry's club file gives its URL, its window applies unless the
    entry has its own, a club file without one falls back to BOOKING_WINDOW; an object token
    gives {token}; a club file's new window moves its pending instances (noticed on its own)."""
    with SandboxClub(tokens=(TOKEN,), shape="json-local", window_seconds=10 * 86400) as club:
        data = tmp_path / "data"
        (data / "clubs").mkdir(parents=True)
        (data / "tokens.json").write_text(json.dumps({"default": {"token": TOKEN, "pin": "4471"}}))
        (data / "clubs" / "padel.json").write_text(
            json.dumps(club.template() | {"window": "3d@00:00"})
        )
        (data / "clubs" / "plain.json").write_text(json.dumps(club.template()))
        env = {
            "PATH": "/usr/bin:/bin",
            "FERNET_KEY": Fernet.generate_key().decode(),
            "DATA_DIR": str(data),
            "LOG_FILE": "-",
            "BOOKING_WINDOW": "1h",
            "RETRY_BASE_SECONDS": "0.05",
            "RELOAD_INTERVAL_SECONDS": "0.2",
        }
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        soon, later = now + timedelta(hours=3), now + timedelta(days=2)
        entries = [
            # The club's 3d@00:00 opened days ago: booked at once, at the club's URL.
            {"id": "soon", "type": "one-off", "desired_time": iso_z(soon), "club": "padel",
             "court_id": "3"},
            # The entry's own window wins over the club's (which would be open already).
            {"id": "own", "type": "one-off", "desired_time": iso_z(later), "club": "padel",
             "window": "2h", "court_id": "4"},
            # A club file without a window: BOOKING_WINDOW.
            {"id": "plain", "type": "one-off", "desired_time": iso_z(later), "club": "plain",
             "court_id": "5"},
        ]  # fmt: skip
        (data / "schedules.json").write_text(json.dumps(entries))

        checked = cli(env, "check")
        assert checked.returncode == 0, checked.stderr
        assert f"  club: padel ({data}/clubs/padel.json)" in checked.stdout
        assert f"  window: 3d@00:00 (from {data}/clubs/padel.json)" in checked.stdout
        assert "  window: 2h (entry)" in checked.stdout
        assert "  window: 1h (from BOOKING_WINDOW)" in checked.stdout
        assert "  'default': object of token, pin, plaintext" in checked.stdout
        assert TOKEN not in checked.stdout + checked.stderr

        process = DaemonProcess(env, data, tmp_path / "out.txt").start()
        daemon.append(process)
        process.wait_ready()
        soon_key, own_key = f"soon@{iso_z(soon)}", f"own@{iso_z(later)}"
        plain_key = f"plain@{iso_z(later)}"
        assert wait_until(lambda: db_status(env, soon_key) == "booked", 10), process.output()
        rows = by_key(env)
        assert [b.court_id for b in club.bookings] == ["3"]
        assert rows[soon_key]["booking_ref"] == club.bookings[0].id
        assert rows[soon_key]["trigger_time"] == iso_z(
            datetime.combine(soon.date() - timedelta(days=3), datetime.min.time(), tzinfo=UTC)
        )
        assert (rows[own_key]["status"], rows[own_key]["trigger_time"]) == (
            "pending",
            iso_z(later - timedelta(hours=2)),
        )
        assert (rows[plain_key]["status"], rows[plain_key]["trigger_time"]) == (
            "pending",
            iso_z(later - timedelta(hours=1)),
        )
        # The object token is encrypted in place, field by field.
        stored = json.loads((data / "tokens.json").read_text())["default"]
        assert sorted(stored) == ["pin", "token"] and all(
            v.startswith("gAAAA") for v in stored.values()
        )

        # A window added to plain.json moves its pending instance; the key stays.
        (data / "clubs" / "plain.json").write_text(
            json.dumps(club.template() | {"window": "1d@06:30"})
        )
        moved = iso_z(
            datetime.combine(later.date() - timedelta(days=1), datetime.min.time(), tzinfo=UTC)
            + timedelta(hours=6, minutes=30)
        )
        assert wait_until(lambda: by_key(env)[plain_key]["trigger_time"] == moved, 10), (
            process.output()
        )
        assert by_key(env)[plain_key]["status"] == "pending"
        assert process.stop() == 0
        output = process.output()
        for secret in (TOKEN, "4471"):
            assert secret not in output
            assert secret not in (data / "tokens.json").read_text()
