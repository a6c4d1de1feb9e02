"""cli.py: the CLI of CONTRACT section 1, and the daemon's loop in process (reload on SIGHUP or a
changed file; a standby that takes over and steps down, section 10); the daemon as a subprocess
is in test_e2e.py and test_failover.py. The tests that touch the database run on SQLite and on
PostgreSQL."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet
from sqlalchemy.orm import Session, sessionmaker

import cli
import instances
import leader
import models
import utils
from conftest import add_instance as add
from conftest import future, make_jwt, previous_release_database, write_json
from conftest import main_in_process as run
from daemon_harness import MAIN
from daemon_harness import cli as run_cli
from datadir import DirLock, StartError
from models import Instance

LONDON = ZoneInfo("Europe/London")
pytestmark = pytest.mark.usefixtures("keep_root_logging")


class Cli:
    """``main.py`` run in this process on ``env``, its files in DATA_DIR, its output in capsys."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        env: dict[str, str],
        data_dir: Path,
    ) -> None:
        self.monkeypatch, self.capsys, self.env, self.data_dir = monkeypatch, capsys, env, data_dir

    def __call__(self, *argv: str) -> int:
        """The exit code of ``main.py *argv`` on the test's environment."""
        return run(self.monkeypatch, self.env, *argv)

    def on(self, env: dict[str, str], *argv: str) -> int:
        """The exit code of ``main.py *argv`` on ``env`` instead."""
        return run(self.monkeypatch, env, *argv)

    def files(self, schedules: Any = None, tokens: Any = None) -> None:
        """tokens.json (one token ``default: t`` unless given) and schedules.json if given."""
        write_json(self.data_dir / "tokens.json", {"default": "t"} if tokens is None else tokens)
        if schedules is not None:
            write_json(self.data_dir / "schedules.json", schedules)

    def read(self) -> pytest.CaptureResult[str]:
        """What was printed since the last read."""
        return self.capsys.readouterr()

    def lines(self) -> list[str]:
        """The lines printed on stdout since the last read."""
        return self.read().out.splitlines()


@pytest.fixture
def courtbot(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> Cli:
    return Cli(monkeypatch, capsys, env, data_dir)


# ---------------------------------------------------------------- check


def test_check_prints_each_schedule_with_its_next_five_instances(
    courtbot: Cli, data_dir: Path
) -> None:
    courtbot.files(
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
        tokens={"default": "plain-token-xyz"},
    )
    before = (data_dir / "tokens.json").read_bytes()
    assert courtbot("check") == 0
    out = courtbot.read().out
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


def test_check_exit_1_on_an_invalid_entry_with_the_message(courtbot: Cli) -> None:
    courtbot.files(
        [
            {"id": "ok", "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"},
            {"id": "wed-evening", "type": "recurring", "rrule": "FREQ=WEEKY"},
        ]
    )
    assert courtbot("check") == 1
    err = courtbot.read().err
    assert (
        "schedules.json entry 'wed-evening' (#2): rrule: 'FREQ=WEEKY' is not a valid rule "
        "('FREQ=WEEKY': FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY)"
    ) in err


def test_check_exit_2_without_a_usable_fernet_key(courtbot: Cli, env: dict[str, str]) -> None:
    assert courtbot.on({k: v for k, v in env.items() if k != "FERNET_KEY"}, "check") == 2
    assert "FERNET_KEY is not set" in courtbot.read().err
    assert courtbot.on(env | {"FERNET_KEY": "short"}, "check") == 2


def test_check_warnings_do_not_change_the_exit_code(courtbot: Cli) -> None:
    courtbot.files(
        [
            {"id": "past", "type": "one-off", "desired_time": "2020-01-01 10:00"},
            {
                "id": "gap",
                "type": "recurring",
                "rrule": "FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU",
                "desired_time": "2026-01-01 01:30",
                "timezone": "Europe/London",
            },
        ]
    )
    assert courtbot("check") == 0
    captured = courtbot.read()
    assert "'2020-01-01 10:00' is in the past; skipped, never booked" in captured.err
    assert "does not exist in Europe/London (DST gap)" in captured.out


def test_check_warns_before_money_is_spent_and_still_exits_0(courtbot: Cli, data_dir: Path) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    courtbot.files(tokens={"default": make_jwt({"exp": int(expires.timestamp())})})
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
    assert courtbot("check") == 0
    err = courtbot.read().err.splitlines()
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


def test_check_missing_schedules_is_a_warning(courtbot: Cli) -> None:
    courtbot.files()
    assert courtbot("check") == 0
    assert "schedules.json: no such file" in courtbot.read().err


def test_check_prints_each_entrys_request_source_window_and_request(
    courtbot: Cli, env: dict[str, str], data_dir: Path
) -> None:
    fernet_value = Fernet(env["FERNET_KEY"].encode()).encrypt(b"tok-enc-5521").decode()
    courtbot.files(
        tokens={
            "default": fernet_value,
            "partner": "tok-plain-8812",
            "padel": {"token": "tok-obj-4410", "password": "pw-obj-3301"},
        }
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

    assert courtbot("check") == 0

    out = courtbot.read().out
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


def test_check_prints_each_club_files_sources_and_checked_and_warns_when_stale(
    courtbot: Cli, data_dir: Path
) -> None:
    today = datetime.now(UTC).date()
    stale, fresh = today - timedelta(days=181), today - timedelta(days=180)
    (data_dir / "clubs").mkdir()
    write_json(
        data_dir / "clubs" / "padel.json",
        {"url": "https://padel.example/b", "checked": stale.isoformat(),
         "sources": ["github.com/someone/padel-client: client/book.py", "https://padel.example/api"]},
    )  # fmt: skip
    write_json(
        data_dir / "clubs" / "tennis.json",
        {"url": "https://tennis.example/b", "checked": fresh.isoformat()},
    )
    write_json(
        data_dir / "clubs" / "unused.json", {"url": "https://x.example/b", "checked": "2001-01-01"}
    )
    courtbot.files(tokens={"default": "tok-1"})
    start = future(20).replace(hour=17, minute=0)
    write_json(
        data_dir / "schedules.json",
        [
            {"id": club, "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}", "club": club}
            for club in ("padel", "tennis")
        ]
        + [{"id": "plain", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}"}],
    )

    assert courtbot("check") == 0

    out, err = courtbot.read()
    padel, tennis = data_dir / "clubs" / "padel.json", data_dir / "clubs" / "tennis.json"
    assert (
        f"\n{padel}: checked {stale.isoformat()}, 2 source(s)\n"
        "  source: github.com/someone/padel-client: client/book.py\n"
        "  source: https://padel.example/api\n"
    ) in out
    assert f"\n{tennis}: checked {fresh.isoformat()}, 0 source(s)\n" in out
    assert "unused.json" not in out + err
    assert err.splitlines() == [
        f"warning: {padel}: checked {stale.isoformat()}, 181 days ago (more than 180): systems "
        "change: run dry-run"
    ]


def test_check_exit_1_on_an_invalid_club_file_naming_the_file_and_key(
    courtbot: Cli, data_dir: Path
) -> None:
    courtbot.files()
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
    assert courtbot("check") == 1
    captured = courtbot.read()
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
    with pytest.raises(StartError) as raised:
        cli.require_api_url(settings, fernet)
    assert str(raised.value) == message  # no club files: the URL is what is missing
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "padel.json", {"url": "https://padel.example/b"})
    with pytest.raises(StartError) as raised:
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


@pytest.mark.both_databases
def test_status_json_and_table(courtbot: Cli, factory: sessionmaker[Session]) -> None:
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
    assert courtbot("status", "--json") == 0
    rows = json.loads(courtbot.read().out)
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
    assert courtbot("status") == 0
    out = courtbot.read().out.splitlines()
    table = out[out.index("") + 1 :]
    assert table[0].split()[:3] == ["SCHEDULE", "KEY", "DESIRED"]
    assert "booked" in table[1] and "bk-9" in table[1]


@pytest.mark.both_databases
def test_status_without_a_database(courtbot: Cli, data_dir: Path) -> None:
    assert courtbot("status", "--json") == 0
    assert json.loads(courtbot.read().out) == []
    assert not (data_dir / "db.sqlite").exists()


def test_status_for_a_person_starts_with_a_summary(
    courtbot: Cli, factory: sessionmaker[Session]
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

    assert courtbot("status") == 0

    def when(moment: datetime) -> str:
        return utils.format_local_short(moment, LONDON, now)

    lines = courtbot.lines()
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


def test_status_shows_the_active_daemon_and_the_standbys_of_the_daemons_table(
    courtbot: Cli, engine: models.Engine
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
    assert courtbot("status") == 0
    lines = courtbot.lines()
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
    courtbot: Cli,
    various: None,
    args: tuple[str, ...],
    expected: list[str],
) -> None:
    assert courtbot("status", "--json", *args) == 0
    rows = json.loads(courtbot.read().out)
    assert [r["schedule"] for r in rows] == expected
    statuses = [r["status"] for r in rows]

    assert courtbot("status", *args) == 0
    lines = courtbot.lines()
    table = lines[lines.index("") + 1 :]
    if expected:
        assert [line.split()[0] for line in table[1:]] == expected
        assert [line.split("  ")[0] for line in table[1:]] == [r["schedule"] for r in rows]
        assert all(status in line for status, line in zip(statuses, table[1:], strict=True))
    else:
        assert table == ["no instance matches"]


def test_status_summary_follows_the_schedule_filter(courtbot: Cli, various: None) -> None:
    assert courtbot("status", "--schedule", "b", "--status", "cancelled") == 0
    lines = courtbot.lines()
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
def test_status_refuses_bad_filters(courtbot: Cli, args: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        courtbot("status", *args)
    assert exited.value.code == 2
    assert message in courtbot.read().err


def test_status_on_an_empty_database_says_no_instances_yet(
    courtbot: Cli,
) -> None:
    assert courtbot("status") == 0
    assert courtbot.lines() == [
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
    courtbot: Cli, factory: sessionmaker[Session]
) -> None:
    add(factory, "a", status="failed", attempts=3, last_error="club down")
    add(factory, "a", desired=future(40), status="booked")
    add(
        factory,
        "a",
        desired=datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1),
        status="failed",
    )
    assert courtbot("retry", "a") == 0
    out = courtbot.read().out
    assert "pending again: a@" in out
    with factory() as session:
        states = sorted((r.status, r.attempts, r.last_error) for r in session.query(Instance))
    assert states == [("booked", 0, None), ("failed", 0, None), ("pending", 0, None)]
    assert courtbot("retry", "a") == 1
    assert "no failed instance" in courtbot.read().err


def test_status_and_retry_work_on_a_database_of_the_previous_release(
    courtbot: Cli, data_dir: Path
) -> None:
    previous_release_database(data_dir / "db.sqlite")
    assert courtbot("status", "--json") == 0
    (row,) = json.loads(courtbot.read().out)
    assert (row["key"], row["status"]) == ("old@2030-01-01T10:00:00Z", "failed")

    assert courtbot("retry", "old") == 0

    assert "pending again: old@2030-01-01T10:00:00Z" in courtbot.read().out
    assert courtbot("status", "--json") == 0
    (row,) = json.loads(courtbot.read().out)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


# ---------------------------------------------------------------- keys and tokens


def test_generate_key_prints_a_fernet_key(courtbot: Cli) -> None:
    assert courtbot("generate-key") == 0
    key = courtbot.read().out.strip()
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
    courtbot: Cli, data_dir: Path
) -> None:
    assert courtbot("health") == 1
    courtbot.read()
    (data_dir / "heartbeat").write_text(f"{datetime.now(UTC).timestamp():.0f}\n")
    # A fresh heartbeat alone is a daemon that stopped (or was killed) a moment ago.
    assert courtbot("health") == 1
    assert courtbot.read().err == f"courtbot health: no daemon runs on {data_dir}\n"
    lock = DirLock(data_dir / "bot.lock")
    assert lock.acquire()
    try:
        (data_dir / "bot.pid").write_text(f"{os.getpid()}\n")
        assert courtbot("health") == 0
        gone = 2**22 + 1  # above Linux's pid_max: no such process
        (data_dir / "bot.pid").write_text(f"{gone}\n")
        courtbot.read()
        assert courtbot("health") == 1
        assert courtbot.read().err == (
            f"courtbot health: the daemon of bot.pid (pid {gone}) is gone\n"
        )
    finally:
        lock.release()
    assert courtbot("health") == 1


def test_the_bundled_examples_pass_check(courtbot: Cli, data_dir: Path) -> None:
    examples = Path(__file__).resolve().parent.parent / "data"
    (data_dir / "schedules.json").write_text((examples / "schedules.example.json").read_text())
    (data_dir / "tokens.json").write_text((examples / "tokens.example.json").read_text())
    assert courtbot("check") == 0, courtbot.read().err
    out = courtbot.read().out
    for entry_id in ("wed-evening", "weekend-mornings", "fortnightly-friday", "club-night"):
        assert f"{entry_id} (#" in out
    assert "\n  skip: 2026-12-23, 2026-12-30\n" in out


def test_check_lists_notification_channels_with_secrets_masked(
    courtbot: Cli, env: dict[str, str]
) -> None:
    courtbot.files([])
    secret = "123456789:AAsecretBotTokenValue"
    channels = env | {
        "SMTP_HOST": "smtp.example.com",
        "NOTIFY_EMAIL": "me@example.com",
        "NOTIFY_URLS": f"tgram://{secret}/987654 ntfys://courtbot-topic",
    }
    assert courtbot.on(channels, "check") == 0
    out = courtbot.read().out
    assert "notifications: email to me@example.com via smtp.example.com:587 (starttls)" in out
    assert out.count("notifications: channel ") == 2
    assert "tgram://" in out and "ntfys://" in out
    assert secret not in out
    bad = env | {"NOTIFY_URLS": "notascheme://whatever"}
    assert courtbot.on(bad, "check") == 1
    assert "NOTIFY_URLS:" in courtbot.read().err


# ------------------------------------------------------- unreachable database; HEARTBEAT_URL


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("retry", "x")])
def test_status_and_retry_on_an_unreachable_database_say_so_in_one_line(
    courtbot: Cli, env: dict[str, str], command: tuple[str, ...]
) -> None:
    from pg_server import free_port

    port = free_port()
    url = f"postgresql://courtbot:pw-S3cret@127.0.0.1:{port}/courtbot"
    assert courtbot.on(env | {"DATABASE_URL": url}, *command) == 1
    captured = courtbot.read()
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


def test_an_invalid_heartbeat_url_stops_run_and_fails_check_without_its_secret(
    courtbot: Cli, env: dict[str, str]
) -> None:
    courtbot.files()
    bad = env | {"HEARTBEAT_URL": "ftp://hc-ping.example/5e3c-secret-uuid"}
    message = (
        "HEARTBEAT_URL: 'ftp://hc-ping.example/****' is not an http(s) URL (e.g. "
        "https://hc-ping.com/<uuid>)"
    )
    assert courtbot.on(bad, "check") == 1
    assert courtbot.read().err == f"courtbot check: {message}\n"
    assert courtbot.on(bad, "run") == 2
    err = courtbot.read().err
    assert err == f"courtbot: cannot start: {message}\n"
    assert "secret" not in err


# ---------------------------------------------------------------- the first hour (issue 25)


def test_check_says_what_books_at_once_when_loaded_but_not_what_is_booked_or_disabled(
    courtbot: Cli, data_dir: Path, factory: sessionmaker[Session]
) -> None:
    soon, done, off, far = future(3), future(3.5), future(4), future(20)

    def entry(entry_id: str, desired: datetime, **more: object) -> dict[str, object]:
        when = f"{desired:%Y-%m-%d %H:%M}"
        return {"id": entry_id, "type": "one-off", "desired_time": when, "timezone": "UTC"} | more

    entries = [entry("soon", soon), entry("done", done), entry("off", off, enabled=False)]
    write_json(data_dir / "schedules.json", [*entries, entry("far", far)])
    courtbot.files()
    add(factory, "done", desired=done, status=models.BOOKED)
    assert courtbot("check") == 0
    lines = {
        line.split("  = ")[1][:20]: line
        for line in courtbot.read().out.splitlines()
        if "  = " in line
    }
    assert lines[utils.format_utc(soon)].endswith("(window open: books at once when loaded)")
    assert lines[utils.format_utc(done)].endswith("(window open: booked)")
    assert lines[utils.format_utc(off)].endswith(
        f"trigger {utils.format_utc(off - timedelta(hours=168))}"
    )
    assert lines[utils.format_utc(far)].endswith(
        f"trigger {utils.format_utc(far - timedelta(hours=168))}"
    )


def test_check_counts_each_problem_once_in_good_english(courtbot: Cli, env: dict[str, str]) -> None:
    write_json(Path(env["DATA_DIR"]) / "schedules.json", [])
    write_json(Path(env["DATA_DIR"]) / "tokens.json", {"default": "t"})
    two = env | {"NOTIFY_URLS": "oops nosuch://host.example.org/x"}
    assert courtbot.on(two, "check") == 1
    err = courtbot.read().err
    assert err.count("error: NOTIFY_URLS: ") == 2
    assert err.endswith("\ninvalid: 2 problems; see the errors above\n")
    assert "'oops' is not a URL" in err


def test_notify_test_with_nothing_configured_exits_1(courtbot: Cli) -> None:
    assert courtbot("notify-test") == 1
    assert courtbot.read().err == (
        "courtbot notify-test: no channel is configured: set SMTP_HOST and NOTIFY_EMAIL, or "
        "NOTIFY_URLS\n"
    )


def test_notify_test_prints_each_channel_sent_or_why_not(
    courtbot: Cli, env: dict[str, str]
) -> None:
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posted: list[dict[str, object]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        urls = f"json://127.0.0.1:{port}/hook json://127.0.0.1:{closed}/gone"
        assert courtbot.on(env | {"NOTIFY_URLS": urls}, "notify-test") == 1
        out = courtbot.read().out.splitlines()
        assert out[0] == f"JSON json://127.0.0.1:{port}/hook: sent"
        assert out[1].startswith(f"JSON json://127.0.0.1:{closed}/gone: NOT sent: ")
        assert len(posted) == 1 and str(posted[0]["title"]).startswith("Test: ")
        assert courtbot.on(env | {"NOTIFY_URLS": urls.split(maxsplit=1)[0]}, "notify-test") == 0
    finally:
        server.shutdown()
        server.server_close()


def test_dry_run_on_a_ready_flow_with_its_placeholder_left_in_says_what_to_put_there(
    courtbot: Cli, data_dir: Path
) -> None:
    """Before: `dry-run` tried yourclub.perfectgym.com and said "check BOOKING_API_URL", a
    variable the flow does not use."""
    when = f"{future(20):%Y-%m-%d %H:%M}"
    entry = {"id": "gym", "type": "one-off", "desired_time": when, "club": "perfectgym"}
    write_json(data_dir / "schedules.json", [entry])
    secrets = {"email": "me@example.com", "password": "pw", "club_id": "1"}
    courtbot.files(tokens={"default": secrets})
    assert courtbot("dry-run", "gym") == 1
    err = courtbot.read().err
    assert "BOOKING_API_URL" not in err
    assert "perfectgym.json: hosts[0]: 'yourclub.perfectgym.com' still holds the placeholder" in err
    assert '{"use": "perfectgym", "yourclub": "<your club\'s subdomain>"}' in err
    # With a club file that gives the label, the entry loads (dry-run would now reach the club).
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "gym.json", {"use": "perfectgym", "yourclub": "riverside"})
    write_json(data_dir / "schedules.json", [entry | {"club": "gym"}])
    assert courtbot("check") == 0, courtbot.read().err
    assert "https://riverside.perfectgym.com/" in courtbot.read().out


@pytest.mark.parametrize(
    ("argv0", "name"),
    [
        ("main.py", "python main.py"),
        ("/app/main.py", "python main.py"),
        ("courtbot", "courtbot"),
        ("/home/me/.local/bin/courtbot", "courtbot"),
        ("/opt/courtbot-src/main.py", "python main.py"),
    ],
)
def test_usage_lines_name_the_command_as_the_user_called_it(argv0: str, name: str) -> None:
    assert cli.program_name(argv0) == name


def test_python_main_py_help_says_python_main_py(env: dict[str, str]) -> None:
    helped = run_cli(env, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: python main.py "), helped.stdout


# --------------------------------------------------------------------------- section 13


def test_check_shows_fallback_times_watch_and_players_and_a_missing_player_is_exit_1(
    courtbot: Cli, data_dir: Path
) -> None:
    courtbot.files()
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
    assert courtbot("check") == 0
    captured = courtbot.read()
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
    assert courtbot("check") == 1
    assert (
        f"error: schedules.json entry 'match' (#1): players: {club} names {{players[1]}}, and "
        'this entry has 1 player; give at least 2 (e.g. ["ana@example.com", "Ben"])'
    ) in courtbot.read().err


CANCEL_TOKEN = "tok-cancel-9d1e"


def _booked_row(
    factory: sessionmaker[Session],
    fernet: Any,
    key: str,
    *,
    ref: str | None,
    status: str = models.BOOKED,
    club: str | None = None,
) -> str:
    """A booked instance of schedule ``key`` (its token stored); returns its instance key."""
    with models.transaction(factory) as session:
        if session.get(models.Token, "default") is None:
            encrypted = fernet.encrypt(CANCEL_TOKEN.encode()).decode()
            session.add(models.Token(id="default", encrypted_token=encrypted))
    desired = future()
    add(factory, key, desired=desired, booked_court="3", status=status, booking_ref=ref, club=club)
    return f"{key}@{desired:%Y-%m-%dT%H:%M:%SZ}"


def _club_booking(sandbox: Any) -> str:
    """A booking made at the sandbox club (court 3, two days ahead); returns its id."""
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
    return str(made["id"])


@pytest.fixture
def sandbox() -> Iterator[Any]:
    from tools.sandbox_club import SandboxClub

    with SandboxClub(tokens=(CANCEL_TOKEN,)) as club:
        yield club


def test_cancel_deletes_the_booking_at_the_club_and_marks_it_cancelled(
    courtbot: Cli, factory: sessionmaker[Session], fernet: Any, sandbox: Any
) -> None:
    booking = _club_booking(sandbox)
    key = _booked_row(factory, fernet, "m1", ref=booking)
    courtbot.env = courtbot.env | {"BOOKING_API_URL": sandbox.url}
    assert courtbot("cancel", key) == 0
    assert courtbot.read().out == f"cancelled at the club: {key} (ref {booking})\n"
    (delete,) = [r for r in sandbox.received if r.method == "DELETE"]
    assert delete.path == f"/bookings/{booking}"
    assert delete.headers["Authorization"] == f"Bearer {CANCEL_TOKEN}"
    assert sandbox.cancelled == [booking] and sandbox.bookings == []
    assert instances.status_of(factory, key) == models.CANCELLED
    # Cancelled already: exit 1, nothing sent.
    assert courtbot("cancel", key) == 1
    assert courtbot.read().err == (
        f"courtbot cancel: {key} is cancelled, not booked: only a booked instance can be "
        "cancelled\n"
    )
    assert len([r for r in sandbox.received if r.method == "DELETE"]) == 1


def test_cancel_of_a_booking_the_club_no_longer_has_is_done(
    courtbot: Cli, env: dict[str, str], factory: sessionmaker[Session], fernet: Any, sandbox: Any
) -> None:
    key = _booked_row(factory, fernet, "m2", ref="bk-gone")
    assert courtbot.on(env | {"BOOKING_API_URL": sandbox.url}, "cancel", key) == 0
    assert instances.status_of(factory, key) == models.CANCELLED


@pytest.mark.parametrize(
    ("status", "ref", "club", "message"),
    [
        (
            models.PENDING,
            "bk-1",
            None,
            "{key} is pending, not booked: only a booked instance can be cancelled",
        ),
        (
            models.BOOKED,
            None,
            None,
            "{key} is booked without a booking reference (the club's answer gave none): cancel "
            "it with the club",
        ),
        (
            models.BOOKED,
            "bk-1",
            "plain",
            '{key}: club file {clubs}/plain.json has no "cancel" steps; nothing was sent: '
            "cancel it with the club",
        ),
    ],
)
def test_cancel_is_exit_1_with_one_line_and_sends_nothing(
    courtbot: Cli,
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
    key = _booked_row(factory, fernet, "m3", ref=ref, status=status, club=club)
    assert courtbot.on(env | {"BOOKING_API_URL": sandbox.url}, "cancel", key) == 1
    err = courtbot.read().err
    assert err == f"courtbot cancel: {message.format(clubs=data_dir / 'clubs', key=key)}\n"
    assert sandbox.received == []
    assert instances.status_of(factory, key) == status


def test_cancel_with_a_club_files_cancel_steps_and_a_refusal_keeps_it_booked(
    courtbot: Cli, data_dir: Path, factory: sessionmaker[Session], fernet: Any, sandbox: Any
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
    key = _booked_row(factory, fernet, "m4", ref="bk-404", club="own")
    assert courtbot("cancel", key) == 1
    assert courtbot.read().err == (
        f"courtbot cancel: {key}: step 'drop': HTTP 404: no such booking (not its ok answer); it "
        "stays booked\n"
    )
    assert instances.status_of(factory, key) == models.BOOKED


def test_cancel_runs_a_club_files_cancel_steps_in_order(
    courtbot: Cli, data_dir: Path, factory: sessionmaker[Session], fernet: Any, sandbox: Any
) -> None:
    booking = _club_booking(sandbox)
    (data_dir / "clubs").mkdir()
    auth = {"Authorization": "Bearer {token}"}
    write_json(
        data_dir / "clubs" / "own.json",
        {
            "url": sandbox.url,
            "cancel": [
                # A look first (the club answers 405 to a GET: its ok says so), then the delete.
                {
                    "name": "look",
                    "method": "GET",
                    "url": sandbox.url,
                    "headers": auth,
                    "ok": {"status": [405]},
                },
                {
                    "name": "drop",
                    "method": "DELETE",
                    "url": sandbox.url + "/{booking_ref}",
                    "headers": auth,
                    "ok": {"status": [204]},
                },
            ],
        },
    )
    key = _booked_row(factory, fernet, "m5", ref=booking, club="own")
    assert courtbot("cancel", key) == 0
    assert [(r.method, r.path) for r in sandbox.received][1:] == [
        ("GET", "/bookings"),
        ("DELETE", f"/bookings/{booking}"),
    ]
    assert sandbox.cancelled == [booking]
    assert instances.status_of(factory, key) == models.CANCELLED
