"""cli.py: the CLI of CONTRACT section 1, and the daemon's loop in process (reload on SIGHUP or a
changed file; a standby that takes over and steps down, section 10); the daemon as a subprocess
is in test_e2e.py and test_failover.py. The tests that touch the database run on SQLite and on
PostgreSQL."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import platform
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker

import cli
import config_loader
import instances
import leader
import models
import scheduler
import utils
import watchdog
from conftest import PingServer, make_jwt, previous_release_database, write_json
from daemon_harness import MAIN
from daemon_harness import cli as run_cli
from models import Instance
from mounts import fill, small_disk

LONDON = ZoneInfo("Europe/London")


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """cli.main() sets up logging for its process; in this one, give pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def run(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> int:
    for name in list(cli.os.environ):
        if name.startswith(("BOOKING_", "FERNET_", "DATA_", "DATABASE_", "LOG_", "SMTP_")):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli.main(list(argv))


def future(days: float = 20) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(second=0, microsecond=0)


# ---------------------------------------------------------------- check


def test_check_prints_each_schedule_with_its_next_five_instances(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "plain-token-xyz"})
    write_json(
        data_dir / "schedules.json",
        [
            {
                "id": "wed-evening",
                "type": "recurring",
                "rrule": "every Wednesday at 17:00",
                "timezone": "Europe/London",
                "court_id": 3,
            },
            {"id": "once", "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"},
        ],
    )
    before = (data_dir / "tokens.json").read_bytes()
    assert run(monkeypatch, env, "check") == 0
    out = capsys.readouterr().out
    assert "wed-evening (#1): recurring, Europe/London, court 3" in out
    assert "rule: DTSTART:" in out and "RRULE:FREQ=WEEKLY;BYDAY=WE" in out
    block = out.split("wed-evening (#1)")[1].split("once (#2)")[0]
    lines = [ln for ln in block.splitlines() if re.match(r"\s+Wed \d{4}-\d\d-\d\d 17:00 ", ln)]
    assert len(lines) == 5
    for line in lines:
        assert re.search(r"= \d{4}-\d\d-\d\dT1[67]:00:00Z\s+trigger \d{4}-\d\d-\d\dT", line)
    assert "once (#2): one-off, UTC" in out
    assert out.rstrip().endswith("OK")
    # check never writes: the plaintext token stays, no database appears.
    assert (data_dir / "tokens.json").read_bytes() == before
    assert not (data_dir / "db.sqlite").exists()


def test_check_exit_1_on_an_invalid_entry_with_the_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "ok", "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"},
            {"id": "wed-evening", "type": "recurring", "rrule": "FREQ=WEEKY"},
        ],
    )
    assert run(monkeypatch, env, "check") == 1
    err = capsys.readouterr().err
    assert (
        "schedules.json entry 'wed-evening' (#2): rrule: 'FREQ=WEEKY' is not a valid rule "
        "('FREQ=WEEKY': FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY)"
    ) in err


def test_check_exit_2_without_a_usable_fernet_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
) -> None:
    assert run(monkeypatch, {k: v for k, v in env.items() if k != "FERNET_KEY"}, "check") == 2
    assert "FERNET_KEY is not set" in capsys.readouterr().err
    assert run(monkeypatch, env | {"FERNET_KEY": "short"}, "check") == 2


def test_check_warnings_do_not_change_the_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "past", "type": "one-off", "desired_time": "2020-01-01 10:00"},
            {
                "id": "gap",
                "type": "recurring",
                "rrule": "FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU",
                "desired_time": "2026-01-01 01:30",
                "timezone": "Europe/London",
            },
        ],
    )
    assert run(monkeypatch, env, "check") == 0
    captured = capsys.readouterr()
    assert "'2020-01-01 10:00' is in the past; skipped, never booked" in captured.err
    assert "does not exist in Europe/London (DST gap)" in captured.out


def test_check_warns_before_money_is_spent_and_still_exits_0(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    write_json(data_dir / "tokens.json", {"default": make_jwt({"exp": int(expires.timestamp())})})
    start = future(20)
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "fri-a", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}"},
            {
                "id": "fri-b",
                "type": "one-off",
                "desired_time": f"{start + timedelta(minutes=30):%Y-%m-%d %H:%M}",
            },
        ],
    )
    assert run(monkeypatch, env, "check") == 0
    err = capsys.readouterr().err.splitlines()
    assert (
        "warning: schedules.json: entries 'fri-a' (#1) and 'fri-b' (#2) would book overlapping "
        f"times: {start:%a %Y-%m-%d %H:%M}-{start + timedelta(hours=1):%H:%M} UTC and "
        f"{start + timedelta(minutes=30):%a %Y-%m-%d %H:%M}-"
        f"{start + timedelta(minutes=90):%H:%M} UTC; that is two courts booked and paid for: if "
        "one is enough, keep one entry (a list in court_id tries several courts in order)"
    ) in err
    key = f"fri-a@{start:%Y-%m-%dT%H:%M:%SZ}"
    assert (
        f"warning: tokens.json token 'default': a JWT that expires {utils.format_utc(expires)}, "
        f"before the trigger of 2 booking(s), the first {key} (window opens "
        f"{utils.format_utc(start - timedelta(hours=168))}): the club would reject it then; put "
        "a fresh token in tokens.json before that"
    ) in err


def test_check_missing_schedules_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    assert run(monkeypatch, env, "check") == 0
    assert "schedules.json: no such file" in capsys.readouterr().err


def test_check_prints_each_entrys_request_source_window_and_request(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    fernet_value = Fernet(env["FERNET_KEY"].encode()).encrypt(b"tok-enc-5521").decode()
    write_json(
        data_dir / "tokens.json",
        {
            "default": fernet_value,
            "partner": "tok-plain-8812",
            "padel": {"token": "tok-obj-4410", "password": "pw-obj-3301"},
        },
    )
    (data_dir / "clubs").mkdir()
    write_json(
        data_dir / "clubs" / "padel.json",
        {
            "url": "https://padel.example/book/{court_id}",
            "headers": {"X-Key": "{token}"},
            "window": "6d@08:00",
        },
    )
    start = future(20).replace(hour=17, minute=0)
    entries = [
        {"id": "p", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}", "club": "padel",
         "token": "padel", "court_id": 3},
        {"id": "plain", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}",
         "token": "partner", "window": "2d@07:30"},
    ]  # fmt: skip
    write_json(data_dir / "schedules.json", entries)
    before = (data_dir / "tokens.json").read_bytes()

    assert run(monkeypatch, env, "check") == 0

    out = capsys.readouterr().out
    assert "tokens.json: 3 token(s)\n" in out
    assert "  'default': encrypted\n" in out
    assert "  'partner': plaintext (the daemon encrypts it in the file when it loads it)\n" in out
    assert "  'padel': object of token, password, plaintext (the daemon encrypts it" in out
    block = out.split("\np (#1)")[1].split("\nplain (#2)")[0]
    assert f"  club: padel ({data_dir}/clubs/padel.json)\n" in block
    assert f"  window: 6d@08:00 (from {data_dir}/clubs/padel.json)\n" in block
    opens = utils.format_utc(start - timedelta(days=6) + timedelta(hours=-9))
    assert f"= {utils.format_utc(start)}  trigger {opens}" in block
    assert (
        "  request (next instance, token masked):\n    POST https://padel.example/book/3\n" in block
    )
    assert "    X-Key: ***\n" in block
    plain = out.split("\nplain (#2)")[1]
    assert "  request: BOOKING_API_URL (http://club.test/bookings)\n" in plain
    assert "  window: 2d@07:30 (entry)\n" in plain
    assert f"trigger {utils.format_utc(start - timedelta(days=2) + timedelta(hours=-9.5))}" in plain
    assert "    POST http://club.test/bookings\n    Authorization: Bearer ***\n" in plain
    for secret in ("tok-enc-5521", "tok-plain-8812", "tok-obj-4410", "pw-obj-3301"):
        assert secret not in out
    assert (data_dir / "tokens.json").read_bytes() == before


def test_check_exit_1_on_an_invalid_club_file_naming_the_file_and_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "padel.json", {"url": "https://padel.example/b", "json": 1,
                                                   "form": {}})  # fmt: skip
    desired = f"{future():%Y-%m-%d %H:%M}"
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "p", "type": "one-off", "desired_time": desired, "club": "padel"},
            {"id": "ok", "type": "one-off", "desired_time": desired},
        ],
    )
    assert run(monkeypatch, env, "check") == 1
    captured = capsys.readouterr()
    assert (
        f"error: schedules.json entry 'p' (#1): club: 'padel': {data_dir}/clubs/padel.json: "
        "json, form: give one body, not both\n"
    ) in captured.err
    assert "\nok (#1)" not in captured.out and "\nok (#2)" in captured.out


def test_run_without_booking_api_url_needs_every_entry_to_name_a_club(
    env: dict[str, str], data_dir: Path
) -> None:
    without = {k: v for k, v in env.items() if k != "BOOKING_API_URL"}
    settings = cli.load_settings(without)
    fernet = cli.load_fernet(settings)
    write_json(data_dir / "tokens.json", {"default": "t"})
    desired = f"{future():%Y-%m-%d %H:%M}"
    write_json(
        data_dir / "schedules.json", [{"id": "a", "type": "one-off", "desired_time": desired}]
    )
    message = (
        "BOOKING_API_URL is not set: set it to the club's booking endpoint "
        "(e.g. https://club.example/api/bookings)"
    )
    with pytest.raises(cli.StartError) as raised:
        cli.require_api_url(settings, fernet)
    assert str(raised.value) == message  # no club files: the URL is what is missing
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "padel.json", {"url": "https://padel.example/b"})
    with pytest.raises(cli.StartError) as raised:
        cli.require_api_url(settings, fernet)
    assert str(raised.value) == f"{message}, or name a club file in schedules.json entry 'a' (#1)"
    write_json(
        data_dir / "schedules.json",
        [{"id": "a", "type": "one-off", "desired_time": desired, "club": "padel"}],
    )
    cli.require_api_url(settings, fernet)  # every entry names a club: it may start
    write_json(data_dir / "schedules.json", [])
    cli.require_api_url(settings, fernet)  # club files, no entries yet: a first deploy


# ---------------------------------------------------------------- status and retry


def add(factory: sessionmaker[Session], key: str, **fields: Any) -> None:
    desired = fields.pop("desired", future())
    with models.transaction(factory) as session:
        session.add(
            Instance(
                key=f"{key}@{desired:%Y-%m-%dT%H:%M:%SZ}",
                schedule_id=key,
                type="one-off",
                desired_time=desired,
                trigger_time=desired - timedelta(hours=168),
                timezone="Europe/London",
                court_id="3",
                courts='["3"]',
                **fields,
            )
        )


@pytest.mark.both_databases
def test_status_json_and_table(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
) -> None:
    add(factory, "late", desired=future(30), status="pending")
    add(
        factory,
        "early",
        desired=future(10),
        status="booked",
        attempts=1,
        booking_ref="bk-9",
        booked_court="3",
    )
    assert run(monkeypatch, env, "status", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == ["early", "late"]  # soonest trigger first
    first = rows[0]
    for name in (
        "schedule",
        "key",
        "type",
        "desired_time",
        "trigger_time",
        "timezone",
        "court_id",
        "status",
        "attempts",
        "last_error",
        "booking_ref",
    ):
        assert name in first
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["desired_time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["trigger_time"])
    assert (first["status"], first["booking_ref"], first["court_id"]) == ("booked", "bk-9", "3")
    assert run(monkeypatch, env, "status") == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index("") + 1 :]
    assert table[0].split()[:3] == ["SCHEDULE", "KEY", "DESIRED"]
    assert "booked" in table[1] and "bk-9" in table[1]


@pytest.mark.both_databases
def test_status_without_a_database(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    assert run(monkeypatch, env, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (data_dir / "db.sqlite").exists()


def lines_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_status_for_a_person_starts_with_a_summary(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
) -> None:
    now = datetime.now(UTC)
    soon = (now + timedelta(days=5, hours=4, minutes=30)).replace(second=0, microsecond=0)
    later = (now + timedelta(days=9, hours=2, minutes=30)).replace(second=0, microsecond=0)
    add(
        factory,
        "wed-evening",
        desired=soon,
        status="booked",
        booked_court="3",
        booking_ref="bk-7",
        attempts=1,
        finished_at=now - timedelta(days=2),
        first_sent_at=soon - timedelta(hours=168, microseconds=-800),
    )
    add(factory, "fri", desired=later, status="pending")
    add(
        factory,
        "old",
        desired=now - timedelta(days=9),
        status="booked",
        finished_at=now - timedelta(days=9),
    )
    add(
        factory,
        "sat",
        desired=now - timedelta(days=1),
        status="expired",
        finished_at=now - timedelta(days=1),
    )

    assert run(monkeypatch, env, "status") == 0

    def when(moment: datetime) -> str:
        return utils.format_local_short(moment, LONDON, now)

    lines = lines_of(capsys)
    assert lines[: lines.index("")] == [
        "courtbot: not running",
        "Next bookings:",
        f"  wed-evening  {when(soon)}, court 3, in 5 d 4 h: booked, ref bk-7",
        f"  fri          {when(later)}, court 3, in 9 d 2 h: pending, window opens in 2 d 2 h",
        "Last 7 days: 1 booked, 0 failed, 1 expired",
        f"  sat          {when(now - timedelta(days=1))}, court 3: expired; not sent: courtbot was "
        "not running at the trigger",
        f"  wed-evening  {when(soon)}, court 3: booked, ref bk-7; sent 0.8 ms after the window "
        "opened",
    ]
    table = lines[lines.index("") + 1 :]
    assert re.split(r"\s{2,}", table[0])[:5] == [
        "SCHEDULE",
        "KEY",
        "DESIRED (LOCAL)",
        "TRIGGER (LOCAL)",
        "TRIGGER (UTC)",
    ]
    assert len(table) == 5
    # The trigger in local time too.
    trigger = soon - timedelta(hours=168)
    assert utils.format_local(trigger, LONDON) in table[3] and utils.format_utc(trigger) in table[3]


def test_status_says_a_daemon_runs_with_its_pid_and_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    daemon: cli.Daemon,
) -> None:
    assert run(monkeypatch, env, "status") == 0
    first = lines_of(capsys)[0]
    assert re.fullmatch(
        rf"courtbot: running \(pid {os.getpid()}\), active, heartbeat [01] s ago", first
    ), first


def test_status_shows_the_active_daemon_and_the_standbys_of_the_daemons_table(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    engine: models.Engine,
) -> None:
    now = datetime.now(UTC)
    for ident, role, host, pid in (("a", "active", "host-a", 101), ("b", "standby", "host-b", 102)):
        leader.write_heartbeat(
            engine, ident=ident, role=role, started_at=now, since=now, now=now, host=host, pid=pid
        )
    leader.write_heartbeat(
        engine,
        ident="gone",
        role="standby",
        started_at=now,
        since=now,
        now=now - timedelta(hours=1),
        host="host-c",
        pid=103,
    )
    assert run(monkeypatch, env, "status") == 0
    lines = lines_of(capsys)
    assert lines[0] == "courtbot: running"
    since = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert re.fullmatch(
        rf"  active on host-a \(pid 101\) since {since}, heartbeat [01] s ago", lines[1]
    )
    assert re.fullmatch(
        rf"  standby on host-b \(pid 102\) since {since}, heartbeat [01] s ago", lines[2]
    )
    assert lines[3] == "Next bookings: none ahead"


@pytest.fixture
def various(factory: sessionmaker[Session]) -> None:
    add(factory, "a", desired=future(10), status="pending")
    add(factory, "a", desired=future(11), status="booking")
    add(factory, "a", desired=future(12), status="failed", last_error="club down")
    add(factory, "b", desired=future(13), status="pending")
    add(factory, "b", desired=future(14), status="cancelled")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ["a", "a", "a", "b", "b"]),
        (("--schedule", "b"), ["b", "b"]),
        (("--status", "failed"), ["a"]),
        (("--upcoming",), ["a", "a", "b"]),
        (("--upcoming", "--schedule", "a"), ["a", "a"]),
        (("--limit", "2"), ["a", "a"]),
        (("--schedule", "nope"), []),
    ],
)
def test_status_filters_apply_to_both_forms(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    various: None,
    args: tuple[str, ...],
    expected: list[str],
) -> None:
    assert run(monkeypatch, env, "status", "--json", *args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == expected
    statuses = [r["status"] for r in rows]

    assert run(monkeypatch, env, "status", *args) == 0
    lines = lines_of(capsys)
    table = lines[lines.index("") + 1 :]
    if expected:
        assert [line.split()[0] for line in table[1:]] == expected
        assert [line.split("  ")[0] for line in table[1:]] == [r["schedule"] for r in rows]
        assert all(status in line for status, line in zip(statuses, table[1:], strict=True))
    else:
        assert table == ["no instance matches"]


def test_status_summary_follows_the_schedule_filter(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    various: None,
) -> None:
    assert run(monkeypatch, env, "status", "--schedule", "b", "--status", "cancelled") == 0
    lines = lines_of(capsys)
    summary = lines[: lines.index("")]
    assert [line.split()[0] for line in summary[2:-1]] == ["b"]  # the next booking is b's
    assert [line.split()[0] for line in lines[lines.index("") + 2 :]] == ["b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--status", "failed", "--upcoming"), "not allowed with argument"),
        (("--status", "done"), "invalid choice: 'done'"),
        (("--limit", "0"), "'0' is not a whole number of at least 1"),
        (("--limit", "x"), "'x' is not a whole number of at least 1"),
    ],
)
def test_status_refuses_bad_filters(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    args: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(monkeypatch, env, "status", *args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_status_on_an_empty_database_says_no_instances_yet(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
) -> None:
    assert run(monkeypatch, env, "status") == 0
    assert lines_of(capsys) == [
        "courtbot: not running",
        "Next bookings: none ahead",
        "Last 7 days: no outcome",
        "",
        "no instances yet",
    ]


def on_a_terminal(env: dict[str, str], *args: str) -> str:
    """``python main.py ARGS`` with its stdout on a pseudo-terminal; what it printed there."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *args],
        env=env,
        cwd=MAIN.parent,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode()


def test_status_colours_only_on_a_terminal_and_never_with_no_color(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    add(factory, "a", desired=future(3), status="booked", booking_ref="bk-1", booked_court="3")
    add(factory, "b", desired=future(4), status="failed", last_error="club down")
    terminal = env | {"TERM": "xterm"}

    coloured = on_a_terminal(terminal, "status")
    assert "\x1b[32mbooked" in coloured and "\x1b[31mfailed" in coloured
    assert "\x1b[" not in on_a_terminal(terminal | {"NO_COLOR": "1"}, "status")
    assert "\x1b[" not in run_cli(terminal, "status").stdout  # a pipe, not a terminal
    assert "\x1b[" not in on_a_terminal(terminal, "status", "--json")


def into_a_closed_pipe(env: dict[str, str], *args: str) -> tuple[bytes, bytes, int]:
    """Run ``python main.py ARGS``, read its first line, close the pipe as ``| head -1``
    does; returns that line, its stderr and its exit code."""
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *args],
        env=env,
        cwd=MAIN.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    return first, err, proc.wait(60)


def test_status_into_a_closed_pipe_ends_quietly(
    env: dict[str, str], factory: sessionmaker[Session]
) -> None:
    # More than a pipe holds (64 KiB), so that writing goes on after the reader has gone.
    start = future(3)
    with models.transaction(factory) as session:
        session.execute(
            models.Instance.__table__.insert(),
            [
                {
                    "key": f"s{i}@{start + timedelta(hours=i):%Y-%m-%dT%H:%M:%SZ}",
                    "schedule_id": f"s{i}",
                    "type": "one-off",
                    "desired_time": start + timedelta(hours=i),
                    "trigger_time": start + timedelta(hours=i - 168),
                    "timezone": "UTC",
                    "courts": '["3"]',
                    "court_id": "3",
                    "token_name": "default",
                    "duration_minutes": 60,
                    "status": "pending",
                    "attempts": 0,
                    "created_at": start,
                    "updated_at": start,
                }
                for i in range(800)
            ],
        )
    first, err, code = into_a_closed_pipe(env, "status")
    assert first == b"courtbot: not running\n"
    assert err == b""
    assert code == errno.EPIPE  # as Python's own CLIs end (python -m json.tool)


def test_check_into_a_closed_pipe_ends_quietly(env: dict[str, str], data_dir: Path) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    entries = [
        {"id": f"e{i}", "type": "recurring", "rrule": f"every {days[i % 7]} at {i // 7:02d}:00"}
        for i in range(160)
    ]
    write_json(data_dir / "schedules.json", entries)
    first, err, code = into_a_closed_pipe(env, "check")
    assert first.startswith(b"notifications: email off")
    assert err == b""
    assert code == errno.EPIPE


@pytest.mark.both_databases
def test_retry_puts_failed_instances_still_ahead_back_to_pending(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
) -> None:
    add(factory, "a", status="failed", attempts=3, last_error="club down")
    add(factory, "a", desired=future(40), status="booked")
    add(
        factory,
        "a",
        desired=datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1),
        status="failed",
    )
    assert run(monkeypatch, env, "retry", "a") == 0
    out = capsys.readouterr().out
    assert "pending again: a@" in out
    with factory() as session:
        states = sorted((r.status, r.attempts, r.last_error) for r in session.query(Instance))
    assert states == [("booked", 0, None), ("failed", 0, None), ("pending", 0, None)]
    assert run(monkeypatch, env, "retry", "a") == 1
    assert "no failed instance" in capsys.readouterr().err


def test_status_and_retry_work_on_a_database_of_the_previous_release(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    previous_release_database(data_dir / "db.sqlite")
    assert run(monkeypatch, env, "status", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["key"], row["status"]) == ("old@2030-01-01T10:00:00Z", "failed")

    assert run(monkeypatch, env, "retry", "old") == 0

    assert "pending again: old@2030-01-01T10:00:00Z" in capsys.readouterr().out
    assert run(monkeypatch, env, "status", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


# ---------------------------------------------------------------- keys and tokens


def test_generate_key_prints_a_fernet_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    assert run(monkeypatch, env, "generate-key") == 0
    key = capsys.readouterr().out.strip()
    Fernet(key.encode())  # raises if it is not one


def test_encrypt_token_reads_stdin(env: dict[str, str]) -> None:
    done = run_cli(env, "encrypt-token", stdin="my-secret-token\n")
    assert done.returncode == 0, done.stderr
    encrypted = done.stdout.strip()
    assert "my-secret-token" not in done.stdout
    assert Fernet(env["FERNET_KEY"].encode()).decrypt(encrypted.encode()) == b"my-secret-token"
    no_key = run_cli(
        {k: v for k, v in env.items() if k != "FERNET_KEY"}, "encrypt-token", stdin="x"
    )
    assert no_key.returncode == 2
    assert run_cli(env, "encrypt-token", stdin="").returncode == 1


def test_health_needs_a_daemon_holding_data_dir_and_a_fresh_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    assert run(monkeypatch, env, "health") == 1
    capsys.readouterr()
    (data_dir / "heartbeat").write_text(f"{datetime.now(UTC).timestamp():.0f}\n")
    # A fresh heartbeat alone is a daemon that stopped (or was killed) a moment ago.
    assert run(monkeypatch, env, "health") == 1
    assert capsys.readouterr().err == f"courtbot health: no daemon runs on {data_dir}\n"
    lock = cli.DirLock(data_dir / "bot.lock")
    assert lock.acquire()
    try:
        (data_dir / "bot.pid").write_text(f"{os.getpid()}\n")
        assert run(monkeypatch, env, "health") == 0
        gone = 2**22 + 1  # above Linux's pid_max: no such process
        (data_dir / "bot.pid").write_text(f"{gone}\n")
        capsys.readouterr()
        assert run(monkeypatch, env, "health") == 1
        assert capsys.readouterr().err == (
            f"courtbot health: the daemon of bot.pid (pid {gone}) is gone\n"
        )
    finally:
        lock.release()
    assert run(monkeypatch, env, "health") == 1


def test_every_log_event_is_one_line_whatever_its_values_hold(
    env: dict[str, str], data_dir: Path
) -> None:
    log_file = data_dir / "bot.log"
    cli.setup_logging(cli.Settings.from_env(env | {"LOG_FILE": str(log_file)}))
    log = logging.getLogger("bot")
    forged = "bk-1\r\n2026-11-23T12:00:00.000Z ERROR bot: forged\x1b[2J\x85\u2028"
    log.warning("booked %s ref=%s", "k@2026-12-02T17:00:00Z", forged)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("unexpected")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        " WARNING bot: booked k@2026-12-02T17:00:00Z ref=bk-1\\r\\n2026-11-23T12:00:00.000Z "
        "ERROR bot: forged\\x1b[2J\\x85\\u2028"
    )
    assert re.fullmatch(
        r"\S+Z ERROR bot: unexpected\\nTraceback \(most recent call last\):\\n.*"
        r"\\nValueError: boom\\nsecond line",
        lines[1],
    )


def test_the_bundled_examples_pass_check(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    examples = Path(__file__).resolve().parent.parent / "data"
    (data_dir / "schedules.json").write_text((examples / "schedules.example.json").read_text())
    (data_dir / "tokens.json").write_text((examples / "tokens.example.json").read_text())
    assert run(monkeypatch, env, "check") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for entry_id in ("wed-evening", "weekend-mornings", "fortnightly-friday", "club-night"):
        assert f"{entry_id} (#" in out
    assert "\n  skip: 2026-12-23, 2026-12-30\n" in out


def test_check_lists_notification_channels_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(data_dir / "schedules.json", [])
    secret = "123456789:AAsecretBotTokenValue"
    channels = env | {
        "SMTP_HOST": "smtp.example.com",
        "NOTIFY_EMAIL": "me@example.com",
        "NOTIFY_URLS": f"tgram://{secret}/987654 ntfys://courtbot-topic",
    }
    assert run(monkeypatch, channels, "check") == 0
    out = capsys.readouterr().out
    assert "notifications: email to me@example.com via smtp.example.com:587 (starttls)" in out
    assert out.count("notifications: channel ") == 2
    assert "tgram://" in out and "ntfys://" in out
    assert secret not in out
    bad = env | {"NOTIFY_URLS": "notascheme://whatever"}
    assert run(monkeypatch, bad, "check") == 1
    assert "NOTIFY_URLS:" in capsys.readouterr().err


# ---------------------------------------------------------------- the daemon's loop, in process


@contextlib.contextmanager
def started_daemon(env: dict[str, str]) -> Iterator[cli.Daemon]:
    """A daemon started in this process on ``env`` (its handlers and wakeup fd restored after)."""
    handlers = {signum: signal.getsignal(signum) for signum in cli.DAEMON_SIGNALS}
    settings = cli.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600"})
    made = cli.Daemon(settings, cli.load_fernet(settings), None)
    try:
        made.start()
        yield made
    finally:
        made.shutdown()
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture
def daemon(env: dict[str, str], data_dir: Path) -> Iterator[cli.Daemon]:
    """A started daemon in this process, with one entry."""
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [one_off("a")])
    with started_daemon(env) as made:
        yield made


def one_off(schedule_id: str) -> dict[str, Any]:
    return {"id": schedule_id, "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"}


def pending(daemon: cli.Daemon) -> list[str]:
    rows = instances.status_rows(daemon.factory)
    return sorted(row["schedule"] for row in rows if row["status"] == "pending")


@pytest.mark.both_databases
def test_sighup_reloads_in_the_loop_and_a_broken_file_keeps_the_last_good_state(
    daemon: cli.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
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
    daemon: cli.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
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
    daemon: cli.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
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


def test_a_reload_with_no_file_changed_sends_no_sql(
    daemon: cli.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.engine is not None
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.load(reason="SIGHUP") is True
    assert seen == []
    (line,) = [m for m in caplog.messages if m.startswith("config unchanged")]
    assert re.fullmatch(r"config unchanged \(SIGHUP\), checked in \d+\.\d ms", line)

    # The same listener does see the statements of a load that has something to do.
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.load(reason="SIGHUP") is True
    assert any(statement.startswith("INSERT INTO schedules") for statement in seen)


def test_a_retry_reaches_the_scheduler_by_its_keys_without_a_full_sync(
    daemon: cli.Daemon,
    data_dir: Path,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert daemon.engine is not None and daemon.factory is not None
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    daemon.load(reason="file change")
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
        assert daemon.pick_up_retries() == 1

    assert jobs(daemon.engine) == {b_key: trigger_b}
    assert instances.wakeups(daemon.factory) == []
    assert not any("FROM schedules" in s and "WHERE" not in s for s in seen)
    assert (
        f"retry: 1 instance(s) back to pending picked up ({b_key}); jobs: 1 added, 0 moved"
        in caplog.messages
    )
    # Its own writes changed the file: one more look, which finds nothing.
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.pick_up_retries() == 0
    assert len(seen) == 1 and "FROM wakeups" in seen[0]
    # The file as it was at that look: no query at all (two stats instead, each second).
    with statements_of_this_thread(daemon.engine) as seen:
        assert daemon.pick_up_retries() == 0
    assert seen == []


def test_retries_recorded_while_no_daemon_ran_are_scheduled_at_start(
    env: dict[str, str],
    data_dir: Path,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    desired = future()
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
    daemon: cli.Daemon,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b"), one_off("c")])
    daemon.load(reason="file change")
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

    daemon.load(reason="file change")

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
    daemon: cli.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
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
        daemon.load(reason="SIGHUP")  # nothing changed: nothing to give back
        assert (full_collections, given_back()) == ([], [])

        # A small change: its garbage collected, the heap trimmed; the connections kept.
        write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
        daemon.load(reason="SIGHUP")
        assert full_collections == ["start", "stop"]
        # The same pool, its connection still open (idle, or lent to the daemon's own threads
        # at this instant: the watchdog's look or the scheduler may hold it for a moment).
        assert daemon.engine.pool is pool and pool.checkedin() + pool.checkedout() >= 1
        (small,) = given_back()
        assert re.fullmatch(line + rf"kept \(a small change\), heap {re.escape(heap)}", small)

        # 20 weekly entries: 1,040 instances; the idle connections are closed too.
        write_json(data_dir / "schedules.json", [weekly(f"w{i}") for i in range(20)])
        daemon.load(reason="SIGHUP")
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
    assert cli.trim_heap() is glibc


def test_the_start_freezes_what_lives_on_and_the_stop_unfreezes_it(
    env: dict[str, str], data_dir: Path
) -> None:
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [one_off("a")])
    assert gc.get_freeze_count() == 0
    with started_daemon(env):
        # The libraries' objects are out of the collector's sight: a reload's collection is
        # short (cli.Daemon._give_back_memory).
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


# ---------------------------------------------------------------- daemons (section 10)


def test_status_names_the_active_daemon_on_a_shared_database(
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    unstarted: Callable[..., cli.Daemon],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [])
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


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("retry", "x")])
def test_status_and_retry_on_an_unreachable_database_say_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    command: tuple[str, ...],
) -> None:
    from pg_server import free_port

    port = free_port()
    url = f"postgresql://courtbot:pw-S3cret@127.0.0.1:{port}/courtbot"
    assert run(monkeypatch, env | {"DATABASE_URL": url}, *command) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"courtbot {command[0]}: cannot open the database "
        f"postgresql://courtbot:***@127.0.0.1:{port}/courtbot (host 127.0.0.1, port {port}, "
        "database courtbot): connection refused; check that PostgreSQL runs at 127.0.0.1 port "
        f"{port} and accepts TCP connections, or fix the host and port in DATABASE_URL\n"
    )


def test_run_on_an_unreachable_database_exits_2_with_one_line(
    env: dict[str, str], data_dir: Path
) -> None:
    from pg_server import free_port

    port = free_port()
    url = f"postgresql://courtbot:pw-S3cret@127.0.0.1:{port}/courtbot"
    done = run_cli(env | {"DATABASE_URL": url}, "run")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "courtbot: cannot start: cannot open the database "
        f"postgresql://courtbot:***@127.0.0.1:{port}/courtbot (host 127.0.0.1, port {port}, "
        "database courtbot): connection refused; check that PostgreSQL runs at 127.0.0.1 port "
        f"{port} and accepts TCP connections, or fix the host and port in DATABASE_URL\n"
    )
    assert not (data_dir / "bot.pid").exists()


@pytest.fixture
def unstarted(env: dict[str, str], data_dir: Path) -> Iterator[Callable[..., cli.Daemon]]:
    """Make a daemon in this process (not started); its handlers are restored afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in cli.DAEMON_SIGNALS}
    made: list[cli.Daemon] = []

    def make(**extra: str) -> cli.Daemon:
        settings = cli.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600", **extra})
        made.append(cli.Daemon(settings, cli.load_fernet(settings), None))
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
    unstarted: Callable[..., cli.Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other = leader.Leadership(pg_url, "other-daemon")
    assert other.try_acquire()
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [one_off("a")])
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
    unstarted: Callable[..., cli.Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [])
    daemon = unstarted(DATABASE_URL=pg_url)
    daemon.start()
    assert daemon.roles.is_active and daemon.factory is not None and daemon.engine is not None
    live = leader.Leadership(pg_url, "live-daemon")
    try:
        live.ensure_present()
        # Claims made after this daemon took over: one of a daemon that lives (an old active
        # one finishing its request), one of a daemon that died since; and a failed instance
        # that a `retry` on another host puts back.
        add(daemon.factory, "live", status="pending")
        add(daemon.factory, "dead", status="pending")
        add(daemon.factory, "again", status="failed")
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

        rows = {r["schedule"]: r for r in instances.status_rows(daemon.factory)}
        assert (rows["live"]["status"], rows["dead"]["status"], rows["again"]["status"]) == (
            "booking",
            "pending",
            "pending",
        )
        assert daemon.scheduler is not None
        jobs = set(daemon.scheduler._stored())
        assert {rows["dead"]["key"], rows["again"]["key"]} <= jobs
        assert rows["live"]["key"] not in jobs
        assert (
            "1 booking(s) of a daemon that stopped are retried now with the same "
            f"Idempotency-Key: {rows['dead']['key']}"
        ) in caplog.messages
    finally:
        live.close()


def test_jobs_of_a_club_whose_flow_prepares_start_that_much_before_the_trigger(
    daemon: cli.Daemon, data_dir: Path
) -> None:
    clubs = data_dir / "clubs"
    clubs.mkdir()
    login = {"name": "login", "url": "https://padel.example/login", "ok": {"status": [200]}}
    book = {"name": "book", "booking": True, "url": "https://padel.example/book"}
    write_json(clubs / "padel.json", {"prepare_seconds": 90, "steps": [login, book]})
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
    write_json(clubs / "padel.json", {"prepare_seconds": 30, "steps": [login, book]})
    daemon.safe_load("file change")
    p_key = next(row["key"] for row in rows if row["schedule"] == "p")
    trigger = next(row["trigger_time"] for row in rows if row["schedule"] == "p")
    lead = (
        datetime.fromisoformat(trigger.replace("Z", "+00:00")).timestamp() - jobs_of(daemon)[p_key]
    )
    assert lead == pytest.approx(32)


def jobs_of(daemon: cli.Daemon) -> dict[str, float]:
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
        assert daemon.warn_expiring_tokens(datetime.now(UTC)) == []  # sent at start already
        daemon.safe_load("SIGHUP")
        assert daemon.warn_expiring_tokens(datetime.now(UTC)) == []
    with started_daemon(env) as again:  # remembered across restarts too
        assert again.warn_expiring_tokens(datetime.now(UTC)) == []

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
    subject, body = cli._token_expiry_message(
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


def test_an_invalid_heartbeat_url_stops_run_and_fails_check_without_its_secret(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    bad = env | {"HEARTBEAT_URL": "ftp://hc-ping.example/5e3c-secret-uuid"}
    message = (
        "HEARTBEAT_URL: 'ftp://hc-ping.example/****' is not an http(s) URL (e.g. "
        "https://hc-ping.com/<uuid>)"
    )
    assert run(monkeypatch, bad, "check") == 1
    assert capsys.readouterr().err == f"courtbot check: {message}\n"
    assert run(monkeypatch, bad, "run") == 2
    err = capsys.readouterr().err
    assert err == f"courtbot: cannot start: {message}\n"
    assert "secret" not in err


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
    assert cli.club_location(settings, None) == "book.club.example"
    assert cli.club_location(cli.load_settings(env | {"BOOKING_API_URL": ""}), None) is None


# ---------------------------------------------------------------- the watchdog, in process


def watchdog_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "watchdog"]


def test_a_stopped_scheduler_is_an_error_at_the_next_look_and_is_restarted(
    daemon: cli.Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    daemon.watch()
    assert watchdog_lines(caplog) == []
    assert daemon.scheduler is not None
    daemon.scheduler.shutdown(wait=True)

    daemon.watch()  # noticed, restarted
    assert daemon.scheduler.problem() is None
    assert daemon.watchdog.health() is not None
    daemon.watch()  # and working since: recovered

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
    assert daemon.watchdog.health() is None


def test_a_trigger_the_scheduler_missed_is_overdue_at_the_second_look_then_run(
    daemon: cli.Daemon, caplog: pytest.LogCaptureFixture
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

    daemon.watch()
    assert watchdog_lines(caplog) == []
    daemon.watch()
    wait_for(lambda: instances.status_rows(daemon.factory)[0]["status"] == "expired")
    daemon.watch()

    (error, recovered) = watchdog_lines(caplog)
    assert error == (
        logging.ERROR,
        f"scheduler not working: 1 booking(s) overdue: their trigger came and no booking started "
        f"({key}); recovering (`health` reports it until then)",
    )
    assert "(jobs: 0 added, 1 moved, 0 removed); overdue bookings go now" in recovered[1]


def test_a_restart_that_does_not_get_the_overdue_booking_going_is_no_recovery(
    daemon: cli.Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
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
        daemon.watch()
    wait_for(lambda: ran == [key])
    daemon.watch()  # still pending: not recovered, restarted again

    assert [level for level, _ in watchdog_lines(caplog)] == [logging.ERROR]
    assert daemon.watchdog.problem is not None
    assert daemon.watchdog.problem.startswith("1 booking(s) overdue")
    wait_for(lambda: ran == [key, key])


def test_the_instances_are_asked_about_only_when_a_trigger_is_near_or_the_jobs_changed(
    daemon: cli.Daemon, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[datetime] = []
    real_overdue = instances.overdue

    def counting(factory: Any, before: datetime, **kw: Any) -> list[str]:
        asked.append(before)
        return real_overdue(factory, before, **kw)

    monkeypatch.setattr(instances, "overdue", counting)
    for _ in range(4):  # the only trigger is days ahead: read once, then nothing to ask
        daemon.watch()
    assert len(asked) == 1
    daemon.safe_load("SIGHUP")  # nothing changed: no job either
    daemon.watch()
    assert len(asked) == 1
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
    daemon.safe_load("SIGHUP")  # jobs synced: the earliest trigger may have changed
    daemon.watch()
    daemon.watch()
    assert len(asked) == 2
    monkeypatch.setattr(watchdog, "NEXT_DUE_REFRESH", 0.0)  # and read again now and then anyway
    daemon.watch()
    assert len(asked) == 3


def test_a_clock_jump_is_logged_and_wakes_the_scheduler(
    daemon: cli.Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    wall = [1_800_000_000.0]
    mono = [100.0]
    daemon.clock = watchdog.ClockWatch(wall=lambda: wall[0], monotonic=lambda: mono[0])
    woken: list[bool] = []
    monkeypatch.setattr(daemon.scheduler, "wakeup", lambda: woken.append(True))

    wall[0] += 3601.0
    mono[0] += 1.0
    daemon.watch()
    wall[0] += 1.0 - 42.5
    mono[0] += 1.0
    daemon.watch()

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
) -> Iterator[tuple[cli.Daemon, dict[str, str], Path]]:
    """A started daemon in this process whose DATA_DIR is a 4 MB disk (tmpfs) the test fills."""
    handlers = {signum: signal.getsignal(signum) for signum in cli.DAEMON_SIGNALS}
    with small_disk(tmp_path / "disk") as disk:
        write_json(disk / "tokens.json", {"default": "tok-secret"})
        write_json(disk / "schedules.json", [one_off("a")])
        disk_env = env | {"DATA_DIR": str(disk), "RELOAD_INTERVAL_SECONDS": "3600"}
        settings = cli.load_settings(disk_env)
        made = cli.Daemon(settings, cli.load_fernet(settings), None)
        try:
            made.start()
            yield made, disk_env, disk
        finally:
            made.shutdown()
            signal.set_wakeup_fd(-1)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def test_not_recovering_for_the_give_up_time_stops_the_loop_with_exit_3_health_1_meanwhile(
    disk_daemon: tuple[cli.Daemon, dict[str, str], Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk is full and stays so: no recovery can write. `health` says why at once (the
    heartbeat is rewritten in place: a full disk takes no new file); after the give-up time
    (60 s; 2 s here) the loop ends and the process would exit 3 for its supervisor."""
    daemon, env, disk = disk_daemon
    caplog.set_level(logging.INFO)
    daemon.watchdog.give_up_after = 2.0
    fill(disk)
    assert daemon.scheduler is not None
    daemon.scheduler.shutdown(wait=True)
    seen: list[tuple[int, str]] = []

    def health_meanwhile() -> None:
        wait_for(lambda: daemon.watchdog.problem is not None)
        assert cli.cmd_health(env) == 1
        seen.append((1, capsys.readouterr().err))

    looker = threading.Thread(target=health_meanwhile)
    looker.start()
    started = time.monotonic()
    daemon.run_forever()
    looker.join(10)

    assert daemon.exit_code == cli.EXIT_NOT_WORKING == 3
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


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_console_keeps_every_line(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        log_file = disk / "bot.log"
        cli.setup_logging(cli.load_settings(env | {"LOG_FILE": str(log_file)}))
        log = logging.getLogger("courtbot")
        log.warning("before")
        filler = fill(disk)
        for n in range(3):
            log.warning("line %d %s", n, "x" * 5000)  # more than the page the file has left
        filler.unlink()
        log.warning("after")

        err = capsys.readouterr().err
        text = log_file.read_text()

    assert "Logging error" not in err and "Traceback" not in err
    said = [line for line in err.splitlines() if "the log file" in line]
    assert [line.split(" ", 1)[1] for line in said] == [
        f"ERROR courtbot: cannot write the log file {log_file} (No space left on device); the "
        "console still gets every line",
        f"WARNING courtbot: the log file {log_file} is written again",
    ]
    assert all(f"line {n} " in err for n in range(3))
    assert "before" in text and "after" in text


# --------------------------------------------------------------------------- section 13


def test_check_shows_fallback_times_watch_and_players_and_a_missing_player_is_exit_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    (data_dir / "clubs").mkdir()
    club = write_json(
        data_dir / "clubs" / "duo.json",
        {"url": "https://club.example/book", "json": {"with": "{players[1]}"}},
    )
    start = future()
    entry = {
        "id": "match",
        "type": "one-off",
        "desired_time": f"{start:%Y-%m-%d} 18:00",
        "club": "duo",
        "fallback_times": ["19:30", "18:00"],
        "watch": "2h",
        "players": ["ana@example.com", "Ben"],
    }
    write_json(data_dir / "schedules.json", [entry])
    assert run(monkeypatch, env, "check") == 0
    captured = capsys.readouterr()
    day = f"{start:%Y-%m-%d}"
    before = (start - timedelta(days=7)).strftime("%Y-%m-%d")
    assert (
        f"  fallback times (next instance): 19:30 (trigger {before}T19:30:00Z), 18:00 "
        "(skipped: the desired time)"
    ) in captured.out
    assert f"  watch: until {start:%a} {day} 16:00 UTC (next instance)" in captured.out
    assert "  players: ana@example.com, Ben" in captured.out
    assert '"with": "Ben"' in captured.out  # the request check prints
    assert (
        "warning: schedules.json entry 'match' (#1): fallback_times: '18:00' is the desired "
        "time itself; it is skipped (list only other times)"
    ) in captured.err
    write_json(data_dir / "schedules.json", [entry | {"players": ["ana@example.com"]}])
    assert run(monkeypatch, env, "check") == 1
    assert (
        f"error: schedules.json entry 'match' (#1): players: {club} names {{players[1]}}, and "
        'this entry has 1 player; give at least 2 (e.g. ["ana@example.com", "Ben"])'
    ) in capsys.readouterr().err


CANCEL_TOKEN = "tok-cancel-9d1e"


def _booked_row(
    factory: sessionmaker[Session],
    fernet: Any,
    key: str,
    *,
    ref: str | None,
    status: str = models.BOOKED,
    club: str | None = None,
) -> None:
    with models.transaction(factory) as session:
        if session.get(models.Token, "default") is None:
            encrypted = fernet.encrypt(CANCEL_TOKEN.encode()).decode()
            session.add(models.Token(id="default", encrypted_token=encrypted))
        desired = future()
        session.add(
            Instance(
                key=key,
                schedule_id=key.split("@", maxsplit=1)[0],
                type="one-off",
                desired_time=desired,
                trigger_time=desired - timedelta(hours=168),
                timezone="UTC",
                court_id="3",
                courts='["3"]',
                booked_court="3",
                status=status,
                booking_ref=ref,
                club=club,
            )
        )


@pytest.fixture
def sandbox() -> Iterator[Any]:
    from tools.sandbox_club import SandboxClub

    with SandboxClub(tokens=(CANCEL_TOKEN,)) as club:
        yield club


def test_cancel_deletes_the_booking_at_the_club_and_marks_it_cancelled(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
    fernet: Any,
    sandbox: Any,
) -> None:
    import requests

    start = future(days=2)  # its window is open at the club
    made = requests.post(
        sandbox.url,
        json={
            "court_id": "3",
            "start": start.isoformat(),
            "end": (start + timedelta(hours=1)).isoformat(),
            "duration_minutes": 60,
        },
        headers={"Authorization": f"Bearer {CANCEL_TOKEN}"},
        timeout=5,
    ).json()
    _booked_row(factory, fernet, "m@1", ref=made["id"])
    env = env | {"BOOKING_API_URL": sandbox.url}
    assert run(monkeypatch, env, "cancel", "m@1") == 0
    assert capsys.readouterr().out == f"cancelled at the club: m@1 (ref {made['id']})\n"
    (delete,) = [r for r in sandbox.received if r.method == "DELETE"]
    assert delete.path == f"/bookings/{made['id']}"
    assert delete.headers["Authorization"] == f"Bearer {CANCEL_TOKEN}"
    assert sandbox.cancelled == [made["id"]] and sandbox.bookings == []
    assert instances.status_of(factory, "m@1") == models.CANCELLED
    # Cancelled already: exit 1, nothing sent.
    assert run(monkeypatch, env, "cancel", "m@1") == 1
    assert capsys.readouterr().err == (
        "courtbot cancel: m@1 is cancelled, not booked: only a booked instance can be cancelled\n"
    )
    assert len([r for r in sandbox.received if r.method == "DELETE"]) == 1


def test_cancel_of_a_booking_the_club_no_longer_has_is_done(
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    factory: sessionmaker[Session],
    fernet: Any,
    sandbox: Any,
) -> None:
    _booked_row(factory, fernet, "m@2", ref="bk-gone")
    assert run(monkeypatch, env | {"BOOKING_API_URL": sandbox.url}, "cancel", "m@2") == 0
    assert instances.status_of(factory, "m@2") == models.CANCELLED


@pytest.mark.parametrize(
    ("status", "ref", "club", "message"),
    [
        (
            models.PENDING,
            "bk-1",
            None,
            "m@3 is pending, not booked: only a booked instance can be cancelled",
        ),
        (
            models.BOOKED,
            None,
            None,
            "m@3 is booked without a booking reference (the club's answer gave none): cancel "
            "it with the club",
        ),
        (
            models.BOOKED,
            "bk-1",
            "plain",
            'm@3: club file {clubs}/plain.json has no "cancel" steps; nothing was sent: '
            "cancel it with the club",
        ),
    ],
)
def test_cancel_is_exit_1_with_one_line_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
    factory: sessionmaker[Session],
    fernet: Any,
    sandbox: Any,
    status: str,
    ref: str | None,
    club: str | None,
    message: str,
) -> None:
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "plain.json", {"url": sandbox.url})
    _booked_row(factory, fernet, "m@3", ref=ref, status=status, club=club)
    assert run(monkeypatch, env | {"BOOKING_API_URL": sandbox.url}, "cancel", "m@3") == 1
    err = capsys.readouterr().err
    assert err == f"courtbot cancel: {message.format(clubs=data_dir / 'clubs')}\n"
    assert sandbox.received == []
    assert instances.status_of(factory, "m@3") == status


def test_cancel_with_a_club_files_cancel_steps_and_a_refusal_keeps_it_booked(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
    factory: sessionmaker[Session],
    fernet: Any,
    sandbox: Any,
) -> None:
    (data_dir / "clubs").mkdir()
    write_json(
        data_dir / "clubs" / "own.json",
        {
            "url": sandbox.url,
            "cancel": [
                {
                    "name": "drop",
                    "method": "DELETE",
                    "url": sandbox.url + "/{booking_ref}",
                    "headers": {"Authorization": "Bearer {token}"},
                    "ok": {"status": [204]},
                }
            ],
        },
    )
    _booked_row(factory, fernet, "m@4", ref="bk-404", club="own")
    assert run(monkeypatch, env, "cancel", "m@4") == 1
    assert capsys.readouterr().err == (
        "courtbot cancel: m@4: step 'drop': HTTP 404: no such booking (not its ok answer); it "
        "stays booked\n"
    )
    assert instances.status_of(factory, "m@4") == models.BOOKED
