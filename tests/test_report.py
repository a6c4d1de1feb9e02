"""report.py: what ``status`` shows a person (CONTRACT section 1), as exact text. Pure: rows are
given as ``instances.status_rows`` makes them (test_cli.py runs the command on a real database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import report
from report import DaemonFacts, DaemonInfo, Palette

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)  # a Friday


def z(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def row(
    schedule: str, desired: datetime, status: str, *, zone: str = "Europe/London", **fields: Any
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "schedule": schedule,
        "key": f"{schedule}@{z(desired)}",
        "type": "recurring",
        "desired_time": z(desired),
        "trigger_time": z(desired - timedelta(hours=168)),
        "timezone": zone,
        "court_id": "3",
        "booked_court": None,
        "token": "default",
        "duration_minutes": 60,
        "status": status,
        "attempts": 0,
        "last_error": None,
        "booking_ref": None,
        "finished_at": None,
        "first_sent_at": None,
        "sent": None,
    }
    values.update(fields)
    return values


# --------------------------------------------------------------------------- the daemon


@pytest.mark.parametrize(
    ("facts", "lines"),
    [
        (DaemonFacts(None, None), ["courtbot: not running"]),
        (
            DaemonFacts(None, 3 * 3600 + 301.0),
            ["courtbot: not running (last heartbeat 3 h 5 min ago)"],
        ),
        (
            DaemonFacts(4242, 4.2),
            ["courtbot: running (pid 4242), active, heartbeat 4 s ago"],
        ),
        (DaemonFacts(4242, None), ["courtbot: running (pid 4242), active, no heartbeat yet"]),
        (
            DaemonFacts(4242, 95.0),
            [
                "courtbot: running (pid 4242), active, heartbeat 1 min 35 s ago, "
                "stale: `health` fails"
            ],
        ),
        (
            DaemonFacts(
                None,
                None,
                (
                    DaemonInfo("host-b", 77, "standby", 1.0),
                    DaemonInfo("host-a", 4242, "active", 2.0, since=NOW - timedelta(minutes=5)),
                    DaemonInfo("host-c", 9, "standby", 600.0, alive=False),
                ),
            ),
            [
                "courtbot: running",
                "  active on host-a (pid 4242) since 2026-11-27T11:55:00Z, heartbeat 2 s ago",
                "  standby on host-b (pid 77), heartbeat 1 s ago",
            ],
        ),
        (
            DaemonFacts(None, None, (DaemonInfo("host-b", 77, "standby", 1.0),)),
            ["courtbot: running, no active", "  standby on host-b (pid 77), heartbeat 1 s ago"],
        ),
    ],
    ids=["none", "stopped", "running", "no-beat", "stale", "active-standby", "standby-only"],
)
def test_daemon_lines(facts: DaemonFacts, lines: list[str]) -> None:
    assert report.daemon_lines(facts) == lines


# --------------------------------------------------------------------------- the summary


def test_next_bookings_in_local_time_with_how_far_ahead() -> None:
    rows = [
        row(
            "wed-evening",
            datetime(2026, 12, 2, 17, 0, tzinfo=UTC),
            "booked",
            booked_court="3",
            booking_ref="bk-7",
        ),
        row("fri-lunch", datetime(2026, 12, 4, 12, 0, tzinfo=UTC), "pending", court_id=["1", "2"]),
        row("wed-evening", datetime(2026, 12, 9, 17, 0, tzinfo=UTC), "pending"),
        row("berlin", datetime(2027, 1, 8, 17, 0, tzinfo=UTC), "booking", zone="Europe/Berlin"),
        row("any", datetime(2026, 11, 28, 9, 0, tzinfo=UTC), "pending", court_id=None),
    ]
    assert report.next_lines(rows, NOW) == [
        "Next bookings:",
        "  wed-evening  Wed 2 Dec 17:00 GMT, court 3, in 5 d 5 h: booked, ref bk-7",
        "  fri-lunch    Fri 4 Dec 12:00 GMT, courts 1, 2, in 7 d: pending, window opened 0 s ago",
        "  wed-evening  Wed 9 Dec 17:00 GMT, court 3, in 12 d 5 h: pending, window opens in "
        "5 d 5 h",
        "  berlin       Fri 8 Jan 2027 18:00 CET, court 3, in 42 d 5 h: booking",
        "  any          Sat 28 Nov 09:00 GMT, any court, in 21 h: pending, window opened "
        "6 d 3 h ago",
    ]
    assert report.next_lines([], NOW) == ["Next bookings: none ahead"]


def test_outcomes_of_the_last_days_counted_then_listed() -> None:
    rows = [
        row(
            "sat-morning",
            datetime(2026, 11, 28, 9, 0, tzinfo=UTC),
            "booked",
            booked_court="2",
            booking_ref="bk-8",
            sent="sent 0.8 ms after the window opened",
        ),
        row(
            "fri-lunch",
            datetime(2026, 11, 27, 12, 0, tzinfo=UTC),
            "failed",
            last_error="court 3: taken (HTTP 409); " + "x" * 100,
            sent="sent 10.9 s late: courtbot was not running at the trigger",
        ),
        row(
            "wed-evening",
            datetime(2026, 11, 25, 17, 0, tzinfo=UTC),
            "expired",
            sent="not sent: courtbot was not running at the trigger",
        ),
    ]
    assert report.outcome_lines(rows, NOW) == [
        "Last 7 days: 1 booked, 1 failed, 1 expired",
        "  sat-morning  Sat 28 Nov 09:00 GMT, court 2: booked, ref bk-8; sent 0.8 ms after the "
        "window opened",
        "  fri-lunch    Fri 27 Nov 12:00 GMT, court 3: failed; sent 10.9 s late: courtbot was not "
        "running at the trigger",
        "               court 3: taken (HTTP 409); " + "x" * 50 + "...",
        "  wed-evening  Wed 25 Nov 17:00 GMT, court 3: expired; not sent: courtbot was not running "
        "at the trigger",
    ]
    assert report.outcome_lines([], NOW) == ["Last 7 days: no outcome"]


def test_only_the_latest_outcomes_are_listed() -> None:
    rows = [row(f"s{i:02d}", datetime(2026, 11, 26, 9, 0, tzinfo=UTC), "booked") for i in range(13)]
    lines = report.outcome_lines(rows, NOW)
    assert lines[0] == "Last 7 days: 13 booked, 0 failed, 0 expired"
    assert len(lines) == 1 + report.OUTCOMES_SHOWN + 1
    assert lines[-1] == "  ... and 3 more"


# --------------------------------------------------------------------------- the rows


def test_rows_have_the_trigger_in_local_time_too() -> None:
    rows = [
        row(
            "wed-evening",
            datetime(2026, 7, 1, 16, 0, tzinfo=UTC),
            "booked",
            booked_court="4",
            court_id=["3", "4"],
            attempts=2,
            booking_ref="bk-7",
        ),
        row("x", datetime(2026, 12, 4, 12, 0, tzinfo=UTC), "failed", last_error="club down"),
    ]
    assert report.table_lines(rows) == [
        "SCHEDULE     KEY                               DESIRED (LOCAL)           "
        "TRIGGER (LOCAL)           TRIGGER (UTC)         COURT  STATUS  TRIES  REF   LAST ERROR",
        "wed-evening  wed-evening@2026-07-01T16:00:00Z  Wed 2026-07-01 17:00 BST  "
        "Wed 2026-06-24 17:00 BST  2026-06-24T16:00:00Z  4      booked  2      bk-7  -",
        "x            x@2026-12-04T12:00:00Z            Fri 2026-12-04 12:00 GMT  "
        "Fri 2026-11-27 12:00 GMT  2026-11-27T12:00:00Z  3      failed  0      -     club down",
    ]


def test_render_puts_the_summary_first_then_the_rows() -> None:
    pending = row("wed", datetime(2026, 12, 9, 17, 0, tzinfo=UTC), "pending")
    text = report.render(DaemonFacts(None, None), [pending], [], [pending], now=NOW)
    lines = text.splitlines()
    assert lines[:5] == [
        "courtbot: not running",
        "Next bookings:",
        "  wed  Wed 9 Dec 17:00 GMT, court 3, in 12 d 5 h: pending, window opens in 5 d 5 h",
        "Last 7 days: no outcome",
        "",
    ]
    assert lines[5].startswith("SCHEDULE  KEY")
    assert len(lines) == 7 and text.endswith("\n")
    empty = report.render(DaemonFacts(None, None), [], [], [], now=NOW, empty="no instances yet")
    assert empty.splitlines()[-1] == "no instances yet"


# --------------------------------------------------------------------------- colour


def test_colour_marks_status_words_only_when_on() -> None:
    booked = row("a", datetime(2026, 12, 2, 17, 0, tzinfo=UTC), "booked", booking_ref="r")
    failed = row("b", datetime(2026, 12, 2, 17, 0, tzinfo=UTC), "failed")
    coloured = report.table_lines([booked, failed], Palette(enabled=True))
    assert "\033[32mbooked\033[0m" in coloured[1]
    assert "\033[31mfailed\033[0m" in coloured[2]
    assert "\033[" not in coloured[0]
    plain = report.table_lines([booked, failed], Palette(enabled=False))
    assert all("\033[" not in line for line in plain)
    # Colour never moves a column: without the codes, the lines are the plain ones.
    assert [
        line.replace("\033[32m", "").replace("\033[31m", "").replace("\033[0m", "")
        for line in coloured
    ] == plain
    running = report.daemon_lines(DaemonFacts(7, 1.0), Palette(enabled=True))
    assert running == ["courtbot: \033[32mrunning\033[0m (pid 7), active, heartbeat 1 s ago"]


@pytest.mark.parametrize(
    ("terminal", "env", "wanted"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # no-color.org: present and not empty
        (True, {"TERM": "dumb"}, False),
    ],
)
def test_colour_only_on_a_terminal_and_never_with_no_color(
    terminal: bool, env: dict[str, str], wanted: bool
) -> None:
    assert report.colour_wanted(terminal, env) is wanted


def test_the_last_load_with_its_time_and_its_first_error() -> None:
    assert report.load_lines(None, NOW) == []
    clean = report.LoadFacts(at=NOW - timedelta(minutes=3), reason="SIGHUP")
    assert report.load_lines(clean, NOW) == [
        "last load: 2026-11-27T11:57:00Z (SIGHUP, 3 min ago), no error"
    ]
    errors = (
        "schedules.json entry 'wed' (#1): rrule: 'every Wendesday at 17:00' ...",
        "schedules.json entry #2: type: missing",
    )
    failed = report.LoadFacts(at=NOW - timedelta(seconds=5), reason="file change", errors=errors)
    assert report.load_lines(failed, NOW) == [
        "last load: 2026-11-27T11:59:55Z (file change, 5 s ago), 2 errors; the first: "
        "schedules.json entry 'wed' (#1): rrule: 'every Wendesday at 17:00' ..."
    ]
    one = report.LoadFacts(at=NOW, reason="start", errors=("line\nbreak",))
    assert report.load_lines(one, NOW) == [
        "last load: 2026-11-27T12:00:00Z (start, 0 s ago), 1 error; the first: line\\nbreak"
    ]
    shown = report.render(DaemonFacts(pid=None, heartbeat_age=None), [], [], [], now=NOW, load=one)
    assert shown.splitlines()[1].startswith("last load: ")


def test_what_reload_prints_of_a_load() -> None:
    clean = report.LoadFacts(
        at=NOW,
        reason="SIGHUP",
        summary="2 schedule(s) (1 validated), 0 error(s); instances: 1 added",
        at_once=("now@2026-11-30T09:00:00Z (Mon 2026-11-30 09:00 GMT): books at once when loaded",),
    )
    assert report.reload_lines(clean, 41) == (
        [
            "courtbot (pid 41) loaded the config files (SIGHUP): 2 schedule(s) (1 validated), "
            "0 error(s); instances: 1 added",
            "  now@2026-11-30T09:00:00Z (Mon 2026-11-30 09:00 GMT): books at once when loaded",
        ],
        [],
    )
    bad = report.LoadFacts(at=NOW, reason="SIGHUP", summary="s", errors=("a\x1b[2J", "b"))
    assert report.reload_lines(bad, 41)[1] == [
        "error: a\\x1b[2J",
        "error: b",
        "2 errors: what each names was not loaded (what it had stays as it was); the daemon "
        "goes on with the rest",
    ]
