"""End to end: booking by the club's clock (CONTRACT section 6, "The club's clock").

A real daemon books at sandbox clubs on 127.0.0.1 whose clocks run ahead of ours and behind
it (their answers' ``Date`` and their windows both follow that clock). With ``clock`` the booking
reaches the club not before the club's own opening instant, and no ``425`` is ever earned;
a measurement that fails leaves the trigger ours. The assertions are on order (which side of
the club's opening), not on tight timing.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

import bot
from daemon_harness import (
    READY_SECONDS,
    DaemonProcess,
    by_key,
    cli,
    db_status,
    desired_for_trigger_in,
    iso_z,
    wait_until,
)
from tools.sandbox_club import ReceivedRequest, SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-clock-5d1e"
#: The measurement takes about five seconds of requests timed to the club's second boundaries.
TRIGGER_IN = 12.0
#: A booking job tries to measure when at least this long is left before its trigger.
CLOCK_LEFT = bot.CLOCK_DONE_BEFORE_SECONDS + bot.CLOCK_MIN_SECONDS
WINDOW_HOURS = 168


def request(club: SandboxClub, clock_url: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "method": "POST",
        "url": club.url,
        "headers": {"Authorization": "Bearer {token}", "Content-Type": "application/json"},
        "json": {
            "court_id": "{court_id}",
            "start": "{start}",
            "end": "{end}",
            "duration_minutes": "{duration_minutes}",
        },
    }
    if clock_url is not None:
        data["clock"] = {"url": clock_url}
    return data


def setup(tmp_path: Path, club_file: dict[str, Any]) -> dict[str, str]:
    data = tmp_path / "data"
    (data / "clubs").mkdir(parents=True)
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    (data / "clubs" / "home.json").write_text(json.dumps(club_file))
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "DATA_DIR": str(data),
        "LOG_FILE": "-",
        "BOOKING_TIMEZONE": "UTC",
        "RETRY_BASE_SECONDS": "0.05",
        "EARLY_RETRY_MS": "100",
    }


def one_off(env: dict[str, str], desired: datetime, clubs: tuple[str, ...] = ("home",)) -> str:
    """One entry at ``desired`` for each of ``clubs`` (ids ``e``, ``e-<club>``...); the first's
    key."""
    entries = [
        {
            "id": "e" if n == 0 else f"e-{club}",
            "type": "one-off",
            "desired_time": iso_z(desired),
            "court_id": "3",
            "club": club,
        }
        for n, club in enumerate(clubs)
    ]
    (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps(entries))
    return f"e@{iso_z(desired)}"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.cleanup()


def run_one(
    tmp_path: Path,
    daemon: list[DaemonProcess],
    club: SandboxClub,
    club_file: dict[str, Any],
    trigger_in: float = TRIGGER_IN,
) -> tuple[dict[str, Any], float, DaemonProcess]:
    env = setup(tmp_path, club_file)
    desired = desired_for_trigger_in(trigger_in)
    trigger = desired.timestamp() - WINDOW_HOURS * 3600
    key = one_off(env, desired)
    process = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "out.txt").start()
    daemon.append(process)
    process.wait_ready(before=trigger - CLOCK_LEFT)  # else no measurement is even tried
    assert wait_until(lambda: db_status(env, key) == "booked", trigger_in + 20), process.output()
    return by_key(env)[key], trigger, process


#: The clubs' clocks against ours: one runs ahead, the other behind. Both share one trigger in
#: one daemon, each booking measuring its own club's clock (two measurements of about five
#: seconds each, at once rather than one daemon after the other).
OFFSETS = {"ahead": 0.7, "behind": -0.45}


def test_booking_reaches_the_club_not_before_its_own_opening(
    tmp_path: Path, daemon: list[DaemonProcess]
) -> None:
    with contextlib.ExitStack() as stack:
        clubs = {
            name: stack.enter_context(SandboxClub(tokens=(TOKEN,), clock_offset=offset))
            for name, offset in OFFSETS.items()
        }
        env = setup(tmp_path, request(clubs["ahead"], clubs["ahead"].base_url + "/ping"))
        behind = Path(env["DATA_DIR"]) / "clubs" / "behind.json"
        behind.write_text(json.dumps(request(clubs["behind"], clubs["behind"].base_url + "/ping")))
        desired = desired_for_trigger_in(TRIGGER_IN)
        trigger = desired.timestamp() - WINDOW_HOURS * 3600
        keys = {"ahead": one_off(env, desired, ("home", "behind"))}
        keys["behind"] = f"e-behind@{iso_z(desired)}"
        process = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "out.txt").start()
        daemon.append(process)
        process.wait_ready(before=trigger - CLOCK_LEFT)  # else no measurement is even tried
        assert wait_until(
            lambda: all(db_status(env, key) == "booked" for key in keys.values()), TRIGGER_IN + 20
        ), process.output()
        rows = by_key(env)
        received = {name: club.received for name, club in clubs.items()}
    for name, offset in OFFSETS.items():
        booked_by_the_clubs_clock(rows[keys[name]], received[name], trigger, offset)
    log = process.output()
    assert all(f"booking {key}: the club's clock: offset " in log for key in keys.values()), log


def booked_by_the_clubs_clock(
    row: dict[str, Any], received: list[ReceivedRequest], trigger: float, offset: float
) -> None:
    """The booking ``row`` at a club whose clock runs ``offset`` s from ours, which ``received``
    those requests, reached it not before its own opening, the send moved by a measurement."""
    probes = [r for r in received if r.method == "GET"]
    posts = [r for r in received if r.method == "POST"]
    assert 3 <= len(probes) <= 20
    assert all(p.path == "/ping" for p in probes)
    assert posts and all(p.arrived < posts[0].arrived for p in probes)
    # The club opens at the trigger by its own clock: our trigger - offset.
    first = posts[0]
    assert first.club_time >= trigger
    assert [p.status for p in posts] == [201]  # never early: no 425 to retry
    if offset > 0:
        assert first.arrived < trigger - offset / 2  # sent ahead of our own trigger
    else:
        assert first.arrived > trigger - offset / 2  # held back for the club's clock
    said = re.fullmatch(
        r"sent [0-9.]+ ms after the window opened by the club's clock \(([+-]\d+) ms ± \d+ ms\)",
        row["sent"],
    )
    assert said is not None, row["sent"]
    assert abs(int(said[1]) - offset * 1000) <= 50


def test_a_failed_measurement_is_logged_and_the_trigger_stays_ours(
    tmp_path: Path, daemon: list[DaemonProcess]
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    with SandboxClub(tokens=(TOKEN,), clock_offset=0.0) as club:
        flow = {
            "hosts": ["127.0.0.1"],
            "clock": {"url": f"http://127.0.0.1:{dead_port}/ping"},
            "steps": [{"name": "book", "booking": True, **request(club, None)}],
        }
        # The measurement fails at once: no need to leave it the time of a whole one.
        row, trigger, process = run_one(
            tmp_path, daemon, club, flow, trigger_in=READY_SECONDS + CLOCK_LEFT + 1.0
        )
        posts = [r for r in club.received if r.method == "POST"]
    assert posts and posts[0].arrived >= trigger
    log = process.output()
    assert "the club's clock could not be measured" in log
    assert "the trigger stays ours" in log
    assert row["sent"].endswith(
        "after the window opened by our clock (the club's clock could not be measured)"
    )


def test_clock_command_prints_the_offset_and_fails_without_clock(tmp_path: Path) -> None:
    with SandboxClub(tokens=(TOKEN,), clock_offset=0.7) as club:
        env = setup(tmp_path, request(club, club.base_url + "/ping"))
        (Path(env["DATA_DIR"]) / "clubs" / "plain.json").write_text(json.dumps(request(club, None)))
        done = cli(env, "clock", "home")
        assert done.returncode == 0, done.stderr
        words = done.stdout.split()
        assert words[0] == "offset" and words[2:4] == ["ms", "±"], done.stdout
        assert 650 <= int(words[1]) <= 750
        assert [r.path for r in club.received if r.method != "GET"] == []

        plain = cli(env, "clock", "plain")
        assert plain.returncode == 1
        assert plain.stderr.strip().splitlines() == [
            f"club 'plain': its file ({Path(env['DATA_DIR']) / 'clubs' / 'plain.json'}) has no "
            '"clock": add "clock": {"url": "<a harmless GET on its hosts>"}'
        ]
    gone = cli(env, "clock", "home")
    assert gone.returncode == 1
    assert gone.stderr.startswith("club 'home': the club's clock could not be measured: ")
    assert len(gone.stderr.strip().splitlines()) == 1
