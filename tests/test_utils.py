"""utils.py: zones, desired times, windows and triggers, ids and keys, backoff, Retry-After,
Fernet, and rules (CONTRACT sections 3 and 4: English sentences, RFC 5545, expansion in
wall-clock time across DST, the same through ``config_loader.read_schedules`` and ``Entry.plan``).
Pure functions, so every test passes its own ``now``; nothing sleeps. The rules' property tests
have an oracle that walks the calendar day by day and never asks dateutil; those for UNTIL,
DST gaps and the bounded search cross-check against python-dateutil's own answers where it
and RFC 5545 agree (a zoned start, its plain expansion)."""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import itertools
import re
import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet, MultiFernet
from dateutil import rrule as du_rrule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import config_loader
import utils
from conftest import NOW, make_jwt, write_json

LONDON = ZoneInfo("Europe/London")
BERLIN = ZoneInfo("Europe/Berlin")
SYDNEY = ZoneInfo("Australia/Sydney")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
UTC_ZONE = ZoneInfo("UTC")

EXPECTED_DESIRED = "expected 'YYYY-MM-DD HH:MM' (e.g. '2026-12-02 17:00')"
EXPECTED_WINDOW = (
    "is not a window; expected '<N>h' (hours, e.g. '168h' or '47.5h'), '<N>d' "
    "(whole calendar days, e.g. '7d') or '<N>d@HH:MM' (at that local time N calendar days "
    "before, e.g. '6d@08:00')"
)
KEY_FIX = "generate one with `python main.py generate-key`"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --------------------------------------------------------------------------- zones


def test_get_zone_returns_the_named_zone() -> None:
    assert utils.get_zone("Europe/London") == LONDON
    assert utils.get_zone("UTC").key == "UTC"


@pytest.mark.parametrize("name", ["Mars/Olympus", "", " Europe/London", "Europe/London ", "../etc"])
def test_get_zone_rejects_unknown_names_with_an_example(name: str) -> None:
    with pytest.raises(ValueError) as info:
        utils.get_zone(name)
    assert str(info.value) == f"{name!r} is not an IANA time zone (e.g. 'Europe/London')"


def test_get_zone_rejects_a_non_string() -> None:
    with pytest.raises(ValueError, match=r"^3 is not an IANA time zone"):
        utils.get_zone(3)  # type: ignore[arg-type]


def test_localize_is_fold_zero() -> None:
    # An ordinary time: just the zone attached.
    assert utils.localize(datetime(2026, 7, 1, 17, 0), LONDON) == utc(2026, 7, 1, 16, 0)
    # A gap (London, 2025-03-30 01:00 -> 02:00): the pre-gap offset, so 01:30 GMT = 02:30 BST.
    gap = utils.localize(datetime(2025, 3, 30, 1, 30), LONDON)
    assert gap == utc(2025, 3, 30, 1, 30)
    assert gap.astimezone(LONDON).strftime("%H:%M %Z") == "02:30 BST"
    # An overlap (London, 2025-10-26 01:00-02:00 twice): the first occurrence, still BST.
    # (Aware datetimes whose offset depends on fold never equal one in another zone, so the
    # comparisons go through UTC.)
    overlap = utils.localize(datetime(2025, 10, 26, 1, 30), LONDON)
    assert utils.as_utc(overlap) == utc(2025, 10, 26, 0, 30)
    assert overlap.fold == 0
    assert overlap.strftime("%H:%M %Z") == "01:30 BST"


@pytest.mark.parametrize(
    ("wall", "zone", "issue"),
    [
        (datetime(2025, 3, 30, 1, 30), LONDON, "gap"),
        (datetime(2025, 3, 30, 1, 0), LONDON, "gap"),
        (datetime(2025, 3, 30, 2, 0), LONDON, None),
        (datetime(2025, 3, 30, 0, 59), LONDON, None),
        (datetime(2025, 10, 26, 1, 30), LONDON, "overlap"),
        (datetime(2025, 10, 26, 1, 0), LONDON, "overlap"),
        (datetime(2025, 10, 26, 2, 0), LONDON, None),
        (datetime(2025, 10, 5, 2, 30), SYDNEY, "gap"),
        (datetime(2025, 4, 6, 2, 30), SYDNEY, "overlap"),
        (datetime(2025, 3, 9, 2, 30), NEW_YORK, "gap"),
        (datetime(2025, 11, 2, 1, 30), NEW_YORK, "overlap"),
        (datetime(2025, 3, 30, 1, 30), KOLKATA, None),
        (datetime(2025, 3, 30, 1, 30), UTC_ZONE, None),
        (datetime(2026, 7, 1, 17, 0), LONDON, None),
    ],
)
def test_wall_clock_issue(wall: datetime, zone: ZoneInfo, issue: str | None) -> None:
    assert utils.wall_clock_issue(wall, zone) == issue


def test_describe_wall_clock_issue() -> None:
    assert utils.describe_wall_clock_issue(datetime(2025, 3, 30, 1, 30), LONDON) == (
        "2025-03-30 01:30 does not exist in Europe/London (DST gap): "
        "it is taken as 02:30 BST (2025-03-30T01:30:00Z)"
    )
    assert utils.describe_wall_clock_issue(datetime(2025, 10, 26, 1, 30), LONDON) == (
        "2025-10-26 01:30 happens twice in Europe/London (DST overlap): "
        "the first one is taken (01:30 BST, 2025-10-26T00:30:00Z)"
    )
    assert utils.describe_wall_clock_issue(datetime(2025, 7, 1, 1, 30), LONDON) is None


# --------------------------------------------------------------------------- desired_time


@pytest.mark.parametrize(
    ("text", "wall"),
    [
        ("2026-12-02 17:00", datetime(2026, 12, 2, 17, 0)),
        ("2026-12-02T17:00", datetime(2026, 12, 2, 17, 0)),
        ("2026-12-02 17:00:30", datetime(2026, 12, 2, 17, 0, 30)),
        ("2026-12-02T17:00:30", datetime(2026, 12, 2, 17, 0, 30)),
        ("  2026-12-02 17:00 ", datetime(2026, 12, 2, 17, 0)),
    ],
)
def test_desired_time_without_offset_is_a_wall_clock_in_the_zone(text: str, wall: datetime) -> None:
    parsed = utils.parse_desired_time(text, LONDON)
    assert parsed.wall == wall
    assert parsed.moment == wall.replace(tzinfo=LONDON)
    assert parsed.moment.tzinfo == LONDON
    assert parsed.explicit_offset is False


def test_desired_time_follows_the_zone_offset_of_its_date() -> None:
    summer = utils.parse_desired_time("2026-07-01 17:00", LONDON)
    winter = utils.parse_desired_time("2026-12-02 17:00", LONDON)
    assert utils.format_utc(summer.moment) == "2026-07-01T16:00:00Z"
    assert utils.format_utc(winter.moment) == "2026-12-02T17:00:00Z"


@pytest.mark.parametrize(
    ("text", "instant", "wall"),
    [
        ("2026-08-10 14:00+02:00", utc(2026, 8, 10, 12, 0), datetime(2026, 8, 10, 13, 0)),
        ("2026-08-10T14:00:00+02:00", utc(2026, 8, 10, 12, 0), datetime(2026, 8, 10, 13, 0)),
        ("2026-08-10 14:00Z", utc(2026, 8, 10, 14, 0), datetime(2026, 8, 10, 15, 0)),
        ("2026-08-10T14:00:00Z", utc(2026, 8, 10, 14, 0), datetime(2026, 8, 10, 15, 0)),
        ("2026-12-10 14:00-05:00", utc(2026, 12, 10, 19, 0), datetime(2026, 12, 10, 19, 0)),
        ("2026-12-10 14:00+0530", utc(2026, 12, 10, 8, 30), datetime(2026, 12, 10, 8, 30)),
    ],
)
def test_desired_time_with_offset_is_an_absolute_instant(
    text: str, instant: datetime, wall: datetime
) -> None:
    parsed = utils.parse_desired_time(text, LONDON)
    assert parsed.moment == instant
    assert parsed.moment.tzinfo == LONDON  # the instant, seen in the entry's zone
    assert parsed.wall == wall
    assert parsed.explicit_offset is True


def test_desired_time_with_offset_does_not_depend_on_the_zone() -> None:
    moments = {
        utils.parse_desired_time("2026-03-29 01:30+00:00", zone).moment
        for zone in (LONDON, SYDNEY, NEW_YORK, KOLKATA, UTC_ZONE)
    }
    assert moments == {utc(2026, 3, 29, 1, 30)}


def test_desired_time_offset_in_an_overlap_keeps_the_second_occurrence() -> None:
    # 01:30 GMT on the autumn night is the *second* 01:30 in London: an explicit offset pins it.
    parsed = utils.parse_desired_time("2025-10-26 01:30+00:00", LONDON)
    assert utils.as_utc(parsed.moment) == utc(2025, 10, 26, 1, 30)
    assert parsed.moment.strftime("%H:%M %Z") == "01:30 GMT"
    assert parsed.wall == datetime(2025, 10, 26, 1, 30)


def test_desired_time_in_a_gap_moves_forward() -> None:
    parsed = utils.parse_desired_time("2025-03-30 01:30", LONDON)
    assert parsed.moment == utc(2025, 3, 30, 1, 30)
    assert parsed.moment.astimezone(LONDON).strftime("%H:%M") == "02:30"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tomorrow", f"'tomorrow' is not a date and time; {EXPECTED_DESIRED}"),
        ("2026-12-02", f"'2026-12-02' is not a date and time; {EXPECTED_DESIRED}"),
        ("02/12/2026 17:00", f"'02/12/2026 17:00' is not a date and time; {EXPECTED_DESIRED}"),
        ("2026-12-02 7:00", f"'2026-12-02 7:00' is not a date and time; {EXPECTED_DESIRED}"),
        ("2026-12-02 17:00z", f"'2026-12-02 17:00z' is not a date and time; {EXPECTED_DESIRED}"),
        (
            "2026-02-30 10:00",
            "'2026-02-30 10:00' is not a real date and time (day is out of range for month); "
            + EXPECTED_DESIRED,
        ),
        (
            "2026-01-01 24:00",
            "'2026-01-01 24:00' is not a real date and time (hour must be in 0..23); "
            + EXPECTED_DESIRED,
        ),
        (
            "2026-01-01 10:60",
            "'2026-01-01 10:60' is not a real date and time (minute must be in 0..59); "
            + EXPECTED_DESIRED,
        ),
        (
            "2026-08-10 14:00+24:00",
            f"'2026-08-10 14:00+24:00' has an invalid UTC offset '+24:00'; {EXPECTED_DESIRED}",
        ),
        (None, f"None is not a string; {EXPECTED_DESIRED}"),
        (1767225600, f"1767225600 is not a string; {EXPECTED_DESIRED}"),
        (["2026-12-02 17:00"], f"['2026-12-02 17:00'] is not a string; {EXPECTED_DESIRED}"),
    ],
)
def test_desired_time_errors_say_what_was_expected(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_desired_time(value, LONDON)
    assert str(info.value) == message


# --------------------------------------------------------------------------- formatting, keys, ids


def test_format_utc() -> None:
    assert utils.format_utc(datetime(2026, 8, 10, 14, 0, tzinfo=BERLIN)) == "2026-08-10T12:00:00Z"
    assert utils.format_utc(utc(2026, 12, 2, 17, 0, 5)) == "2026-12-02T17:00:05Z"
    # Sub-second parts never show.
    assert utils.format_utc(utc(2026, 12, 2, 17, 0, 5) + timedelta(microseconds=9)) == (
        "2026-12-02T17:00:05Z"
    )


@pytest.mark.parametrize(
    ("moment", "zone", "text"),
    [
        (utc(2026, 8, 10, 12, 0), BERLIN, "2026-08-10T14:00:00+02:00"),
        (utc(2026, 12, 10, 12, 0), BERLIN, "2026-12-10T13:00:00+01:00"),
        (utc(2026, 12, 10, 12, 0), NEW_YORK, "2026-12-10T07:00:00-05:00"),
        (utc(2026, 12, 10, 12, 0), KOLKATA, "2026-12-10T17:30:00+05:30"),
        (utc(2026, 12, 10, 12, 0), UTC_ZONE, "2026-12-10T12:00:00+00:00"),
        # The actual offset at the instant: across an autumn change, before and after.
        (utc(2025, 10, 26, 0, 30), LONDON, "2025-10-26T01:30:00+01:00"),
        (utc(2025, 10, 26, 1, 30), LONDON, "2025-10-26T01:30:00+00:00"),
    ],
)
def test_format_offset(moment: datetime, zone: ZoneInfo, text: str) -> None:
    assert utils.format_offset(moment, zone) == text


def test_format_local_and_as_utc() -> None:
    assert utils.format_local(utc(2026, 12, 2, 17, 0), LONDON) == "Wed 2026-12-02 17:00 GMT"
    assert utils.format_local(utc(2026, 7, 1, 16, 0), LONDON) == "Wed 2026-07-01 17:00 BST"
    assert utils.as_utc(datetime(2026, 7, 1, 17, 0)) == utc(2026, 7, 1, 17, 0)
    converted = utils.as_utc(datetime(2026, 7, 1, 17, 0, tzinfo=LONDON))
    assert converted == utc(2026, 7, 1, 16, 0)
    assert converted.tzinfo is UTC


def test_format_local_short_adds_the_year_only_when_it_is_not_this_one() -> None:
    now = utc(2026, 11, 23, 12, 0)
    assert utils.format_local_short(utc(2026, 12, 3, 17, 0), LONDON, now) == "Thu 3 Dec 17:00 GMT"
    assert utils.format_local_short(utc(2026, 7, 1, 16, 0), LONDON, now) == "Wed 1 Jul 17:00 BST"
    assert utils.format_local_short(utc(2027, 1, 7, 9, 0), LONDON, now) == (
        "Thu 7 Jan 2027 09:00 GMT"
    )
    # The year is the zone's: 23:30 UTC on 31 December is already next year in Berlin.
    new_year = utc(2026, 12, 31, 23, 30)
    assert utils.format_local_short(new_year, BERLIN, now) == "Fri 1 Jan 2027 00:30 CET"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (0.9, "0 s"),
        (45, "45 s"),
        (60, "1 min"),
        (260, "4 min 20 s"),
        (3600, "1 h"),
        (3 * 3600 + 5 * 60 + 59, "3 h 5 min"),
        (86400 * 2, "2 d"),
        (86400 * 5 + 4 * 3600 + 3599, "5 d 4 h"),
        (-5, "0 s"),
    ],
)
def test_format_span(seconds: float, text: str) -> None:
    assert utils.format_span(seconds) == text


def test_format_ahead() -> None:
    now = utc(2026, 11, 23, 12, 0)
    assert utils.format_ahead(utc(2026, 11, 28, 16, 30), now) == "in 5 d 4 h"
    assert utils.format_ahead(utc(2026, 11, 23, 9, 50), now) == "2 h 10 min ago"
    assert utils.format_ahead(now, now) == "in 0 s"


@pytest.mark.parametrize(
    ("after", "cause", "text"),
    [
        (timedelta(microseconds=800), None, "sent 0.8 ms after the window opened"),
        (timedelta(0), "ignored", "sent 0.0 ms after the window opened"),
        (timedelta(milliseconds=999), None, "sent 999.0 ms after the window opened"),
        (
            timedelta(seconds=10.94),
            "courtbot was not running at the trigger",
            "sent 10.9 s late: courtbot was not running at the trigger",
        ),
        (
            timedelta(days=2, hours=3, minutes=4),
            "the window was already open when the entry was loaded",
            "sent 2 d 3 h late: the window was already open when the entry was loaded",
        ),
        (
            timedelta(seconds=1.5),
            None,
            "sent 1.5 s late: courtbot's trigger fired late (a busy machine or a clock jump)",
        ),
        (-timedelta(microseconds=300), None, "sent 0.3 ms before the window opened"),
    ],
)
def test_send_timing(after: timedelta, cause: str | None, text: str) -> None:
    trigger = utc(2026, 11, 25, 17, 0)
    assert utils.send_timing(trigger, trigger + after, cause) == text


def test_jwt_expiry_reads_exp_without_verifying() -> None:
    assert utils.jwt_expiry(make_jwt({"sub": "me", "exp": 1796220000})) == utc(2026, 12, 2, 14, 0)
    assert utils.jwt_expiry(make_jwt({"exp": 1796220000.5})) == utc(2026, 12, 2, 14, 0) + timedelta(
        milliseconds=500
    )
    assert utils.jwt_expiry(" " + make_jwt({"exp": 1796220000}) + "\n") is not None


def test_secrets_expiry_is_the_earliest_jwt_among_them() -> None:
    soon, later = 1796220000, 1796306400
    secrets = {
        "email": "me@example.org",
        "token": make_jwt({"exp": later}),
        "refresh": make_jwt({"exp": soon}),
    }
    assert utils.secrets_expiry(secrets) == utc(2026, 12, 2, 14, 0)
    assert utils.secrets_expiry({"email": "me@example.org", "password": "pw"}) is None


@pytest.mark.parametrize(
    "token",
    [
        "opaque-club-token",
        "a.b",
        "a..c",
        "a.!!!.c",
        "a.bm90IGpzb24.c",  # "not json"
        make_jwt({"sub": "me"}),
        make_jwt({"exp": "1796220000"}),
        make_jwt({"exp": True}),
        make_jwt({"exp": 10**20}),
        "eyJhbGciOiJIUzI1NiJ9.WzFd.c2ln",  # a list, not an object
    ],
)
def test_jwt_expiry_is_none_for_anything_else(token: str) -> None:
    assert utils.jwt_expiry(token) is None


def test_instance_key_is_the_id_and_the_utc_start() -> None:
    start = datetime(2026, 12, 2, 17, 0, tzinfo=LONDON)
    assert utils.instance_key("wed-evening", start) == "wed-evening@2026-12-02T17:00:00Z"
    summer = datetime(2026, 7, 1, 17, 0, tzinfo=LONDON)
    assert utils.instance_key("wed-evening", summer) == "wed-evening@2026-07-01T16:00:00Z"
    # The same instant seen from two zones is the same key.
    assert utils.instance_key("x", summer) == utils.instance_key("x", summer.astimezone(SYDNEY))


def test_derived_id_is_stable_and_shaped_like_an_id() -> None:
    args = ("recurring", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=WE", "Europe/London")
    first = utils.derive_schedule_id(*args)
    assert first == utils.derive_schedule_id(*args)
    assert first.startswith("auto-")
    assert len(first) == len("auto-") + 12
    assert utils.SCHEDULE_ID_RE.fullmatch(first)


@pytest.mark.parametrize(
    "changed",
    [
        ("one-off", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=WE", "Europe/London"),
        ("recurring", "2026-12-02 18:00", "FREQ=WEEKLY;BYDAY=WE", "Europe/London"),
        ("recurring", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=TH", "Europe/London"),
        ("recurring", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=WE", "Europe/Paris"),
        ("recurring", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=WE", None),
        ("recurring", None, "FREQ=WEEKLY;BYDAY=WE", "Europe/London"),
    ],
)
def test_derived_id_changes_with_when(changed: tuple[object, ...]) -> None:
    base = utils.derive_schedule_id(
        "recurring", "2026-12-02 17:00", "FREQ=WEEKLY;BYDAY=WE", "Europe/London"
    )
    assert utils.derive_schedule_id(*changed) != base


# --------------------------------------------------------------------------- window and trigger


@pytest.mark.parametrize(
    ("text", "amount", "unit", "shown"),
    [
        ("168h", 168.0, "h", "168h"),
        ("47.5h", 47.5, "h", "47.5h"),
        ("0h", 0.0, "h", "0h"),
        ("0.25h", 0.25, "h", "0.25h"),
        ("7d", 7, "d", "7d"),
        ("0d", 0, "d", "0d"),
        (" 168H ", 168.0, "h", "168h"),
    ],
)
def test_parse_window(text: str, amount: float, unit: str, shown: str) -> None:
    window = utils.parse_window(text)
    assert window == utils.Window(amount, unit)
    assert window.amount == amount
    assert str(window) == shown


@pytest.mark.parametrize("text", ["-1h", "1.5d", "7", "abc", "", "h", "168 h", ".5h", "7w", "1e3h"])
def test_parse_window_rejects_with_the_expected_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_window(text)
    assert str(info.value) == f"{text!r} {EXPECTED_WINDOW}"


def test_settings_report_a_bad_window() -> None:
    with pytest.raises(config_loader.SettingsError) as info:
        config_loader.Settings.from_env({"BOOKING_WINDOW": "1.5d"})
    assert str(info.value) == f"BOOKING_WINDOW: '1.5d' {EXPECTED_WINDOW}"
    default = config_loader.Settings.from_env({})
    assert default.window == utils.Window(168.0, "h")


HOURS = utils.parse_window("168h")
DAYS = utils.parse_window("7d")


@pytest.mark.parametrize(
    "desired",
    [
        datetime(2026, 12, 2, 17, 0, tzinfo=LONDON),
        # Across the autumn change (2025-10-26) and the spring change (2026-03-29) in London.
        datetime(2025, 10, 29, 17, 0, tzinfo=LONDON),
        datetime(2026, 4, 1, 17, 0, tzinfo=LONDON),
        datetime(2025, 10, 8, 10, 0, tzinfo=SYDNEY),
    ],
)
def test_trigger_in_hours_is_an_exact_subtraction(desired: datetime) -> None:
    trigger = utils.trigger_time(desired, desired.tzinfo, HOURS)  # type: ignore[arg-type]
    assert trigger.tzinfo is UTC
    assert desired - trigger == timedelta(hours=168)
    half = utils.trigger_time(desired, LONDON, utils.parse_window("47.5h"))
    assert desired - half == timedelta(hours=47, minutes=30)
    assert utils.trigger_time(desired, LONDON, utils.parse_window("0h")) == desired


def test_trigger_in_days_keeps_the_wall_clock_across_autumn() -> None:
    # Wed 2025-10-29 17:00 GMT, after the change of Sun 2025-10-26.
    desired = datetime(2025, 10, 29, 17, 0, tzinfo=LONDON)
    trigger = utils.trigger_time(desired, LONDON, DAYS)
    assert trigger == utc(2025, 10, 22, 16, 0)  # Wed 2025-10-22 17:00 BST
    assert trigger.astimezone(LONDON).strftime("%a %Y-%m-%d %H:%M %Z") == "Wed 2025-10-22 17:00 BST"
    hours = utils.trigger_time(desired, LONDON, HOURS)
    assert hours == utc(2025, 10, 22, 17, 0)  # 18:00 BST
    assert hours - trigger == timedelta(hours=1)
    assert desired - trigger == timedelta(hours=169)


def test_trigger_in_days_keeps_the_wall_clock_across_spring() -> None:
    desired = datetime(2026, 4, 1, 17, 0, tzinfo=LONDON)  # BST, after 2026-03-29
    trigger = utils.trigger_time(desired, LONDON, DAYS)
    assert trigger.astimezone(LONDON).strftime("%a %Y-%m-%d %H:%M %Z") == "Wed 2026-03-25 17:00 GMT"
    assert desired - trigger == timedelta(hours=167)
    assert utils.trigger_time(desired, LONDON, HOURS) - trigger == timedelta(hours=-1)


def test_trigger_in_days_uses_the_entry_zone_not_the_desired_one() -> None:
    desired = utc(2025, 10, 29, 17, 0)  # the same instant as 17:00 GMT in London
    assert utils.trigger_time(desired, LONDON, DAYS) == utc(2025, 10, 22, 16, 0)
    assert utils.trigger_time(desired, UTC_ZONE, DAYS) == utc(2025, 10, 22, 17, 0)


def test_trigger_in_days_in_a_gap_resolves_fold_zero() -> None:
    # Sun 2025-04-06 01:30 BST exists; seven days earlier, 2025-03-30 01:30, is in the gap.
    desired = datetime(2025, 4, 6, 1, 30, tzinfo=LONDON)
    assert utils.wall_clock_issue(datetime(2025, 3, 30, 1, 30), LONDON) == "gap"
    trigger = utils.trigger_time(desired, LONDON, DAYS)
    assert trigger == utils.localize(datetime(2025, 3, 30, 1, 30), LONDON)
    assert trigger == utc(2025, 3, 30, 1, 30)  # 01:30 GMT, shown as 02:30 BST
    assert trigger.astimezone(LONDON).strftime("%H:%M %Z") == "02:30 BST"


def test_trigger_in_days_in_an_overlap_is_the_first_occurrence() -> None:
    desired = datetime(2025, 11, 2, 1, 30, tzinfo=LONDON)  # GMT
    trigger = utils.trigger_time(desired, LONDON, DAYS)
    assert trigger == utc(2025, 10, 26, 0, 30)  # the first 01:30 (BST)


def test_trigger_in_days_from_an_explicit_second_occurrence() -> None:
    # desired_time "2025-11-02 01:30+00:00" and the window 7d: the trigger is 2025-10-26 01:30,
    # which is ambiguous; like any wall clock it means the first one.
    desired = utils.parse_desired_time("2025-11-02 01:30+00:00", LONDON).moment
    assert utils.trigger_time(desired, LONDON, DAYS) == utc(2025, 10, 26, 0, 30)


def test_trigger_in_days_zero_is_the_start() -> None:
    desired = datetime(2026, 12, 2, 17, 0, tzinfo=LONDON)
    assert utils.trigger_time(desired, LONDON, utils.parse_window("0d")) == desired


# ---------------------------------------------------------------- windows at a clock time


@pytest.mark.parametrize(
    ("text", "amount", "at", "shown"),
    [
        ("6d@08:00", 6, time(8, 0), "6d@08:00"),
        ("0d@20:30", 0, time(20, 30), "0d@20:30"),
        (" 1D@00:00 ", 1, time(0, 0), "1d@00:00"),
        ("366d@23:59", 366, time(23, 59), "366d@23:59"),
    ],
)
def test_parse_window_at_a_clock_time(text: str, amount: int, at: time, shown: str) -> None:
    window = utils.parse_window(text)
    assert window == utils.Window(amount, "d", at)
    assert str(window) == shown
    assert utils.parse_window("7d").at is None


@pytest.mark.parametrize(
    "text", ["6d@8:00", "6d@08", "6h@08:00", "@08:00", "6d@08:00:00", "6d 08:00", "1.5d@08:00"]
)
def test_parse_window_at_rejects_other_shapes(text: str) -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_window(text)
    assert str(info.value) == f"{text!r} {EXPECTED_WINDOW}"


@pytest.mark.parametrize("text", ["6d@24:00", "6d@07:60", "0d@99:99"])
def test_parse_window_at_rejects_a_time_that_is_no_time_of_day(text: str) -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_window(text)
    clock = text.split("@")[1]
    assert str(info.value) == (
        f"{text!r}: {clock} is not a time of day; expected HH:MM from 00:00 to 23:59 "
        "(e.g. '6d@08:00')"
    )


def test_parse_window_at_longer_than_a_year_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_window("367d@08:00")
    assert str(info.value) == (
        "'367d@08:00' is longer than a year; no club opens bookings that far ahead "
        "(e.g. '168h', '7d' or '6d@08:00')"
    )


def test_parse_window_rejects_what_is_not_text() -> None:
    with pytest.raises(ValueError) as info:
        utils.parse_window(7)  # type: ignore[arg-type]
    assert str(info.value) == f"7 {EXPECTED_WINDOW}"


def test_trigger_at_a_clock_time_n_days_before_the_local_date() -> None:
    # "6 days ahead at 08:00": a Wednesday 17:00 start opens on the Thursday before at 08:00.
    desired = datetime(2026, 12, 2, 17, 0, tzinfo=LONDON)
    trigger = utils.trigger_time(desired, LONDON, utils.parse_window("6d@08:00"))
    assert trigger == utc(2026, 11, 26, 8, 0)
    assert utils.window_opens_after(desired, LONDON, utils.parse_window("6d@08:00")) is None
    # The local date counts, not the UTC one: 00:30 in Sydney is the day before in UTC.
    sydney = datetime(2026, 12, 2, 0, 30, tzinfo=SYDNEY)
    opens = utils.trigger_time(sydney, SYDNEY, utils.parse_window("1d@07:00"))
    assert opens.astimezone(SYDNEY).strftime("%a %Y-%m-%d %H:%M %Z") == "Tue 2026-12-01 07:00 AEDT"


def test_trigger_at_a_clock_time_keeps_the_clock_across_dst() -> None:
    # Start Wed 2026-04-01 17:00 BST; seven days earlier (Wed 2026-03-25) is GMT: 08:00 GMT.
    desired = datetime(2026, 4, 1, 17, 0, tzinfo=LONDON)
    trigger = utils.trigger_time(desired, LONDON, utils.parse_window("7d@08:00"))
    assert trigger.astimezone(LONDON).strftime("%a %Y-%m-%d %H:%M %Z") == "Wed 2026-03-25 08:00 GMT"
    assert trigger == utc(2026, 3, 25, 8, 0)


def test_trigger_at_a_clock_time_in_a_gap_moves_forward_by_the_gap() -> None:
    # 01:30 on Sun 2026-03-29 does not exist in London: it is the instant 01:30 GMT (02:30 BST).
    desired = datetime(2026, 3, 30, 9, 0, tzinfo=LONDON)
    trigger = utils.trigger_time(desired, LONDON, utils.parse_window("1d@01:30"))
    assert utils.wall_clock_issue(datetime(2026, 3, 29, 1, 30), LONDON) == "gap"
    assert trigger == utc(2026, 3, 29, 1, 30)
    assert trigger.astimezone(LONDON).strftime("%H:%M %Z") == "02:30 BST"


def test_trigger_at_a_clock_time_in_an_overlap_is_the_first_occurrence() -> None:
    desired = datetime(2025, 10, 27, 9, 0, tzinfo=LONDON)
    trigger = utils.trigger_time(desired, LONDON, utils.parse_window("1d@01:30"))
    assert trigger == utc(2025, 10, 26, 0, 30)  # 01:30 BST, the first of the two


def test_zero_days_at_a_clock_time_is_the_same_day() -> None:
    desired = datetime(2026, 12, 2, 21, 0, tzinfo=LONDON)
    window = utils.parse_window("0d@20:00")
    assert utils.trigger_time(desired, LONDON, window) == utc(2026, 12, 2, 20, 0)
    assert utils.window_opens_after(desired, LONDON, window) is None
    at_the_start = utils.parse_window("0d@21:00")
    assert utils.trigger_time(desired, LONDON, at_the_start) == utils.as_utc(desired)
    assert utils.window_opens_after(desired, LONDON, at_the_start) is None


def test_a_window_opening_after_the_start_is_told() -> None:
    # 0d@20:00 for a 17:00 start would open three hours after the start.
    desired = datetime(2026, 12, 2, 17, 0, tzinfo=LONDON)
    window = utils.parse_window("0d@20:00")
    assert utils.window_opens_after(desired, LONDON, window) == utc(2026, 12, 2, 20, 0)
    # A day that does not exist: Samoa skipped Fri 2011-12-30. "1d@10:00" for Sat 09:00 would
    # be 10:00 on the missing day, which resolves (forward by the 24 h gap) after the start.
    apia = ZoneInfo("Pacific/Apia")
    saturday = datetime(2011, 12, 31, 9, 0, tzinfo=apia)
    late = utils.window_opens_after(saturday, apia, utils.parse_window("1d@10:00"))
    assert late is not None and late.astimezone(apia).strftime("%a %d %H:%M") == "Sat 31 10:00"
    # Windows without a clock time never open after the start.
    for text in ("0h", "0d", "168h", "7d"):
        assert utils.window_opens_after(saturday, apia, utils.parse_window(text)) is None


#: Zones with DST at night, at midnight (Santiago, Havana), by 30 minutes (Lord Howe), or none.
CLOCK_WINDOW_ZONES = (
    LONDON,
    NEW_YORK,
    SYDNEY,
    KOLKATA,
    UTC_ZONE,
    ZoneInfo("America/Santiago"),
    ZoneInfo("America/Havana"),
    ZoneInfo("Australia/Lord_Howe"),
)


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(CLOCK_WINDOW_ZONES),
    instant=st.datetimes(datetime(2024, 1, 1), datetime(2030, 12, 31)).map(
        lambda d: d.replace(second=0, microsecond=0, tzinfo=UTC)
    ),
    days=st.integers(0, 14),
    at=st.times().map(lambda t: t.replace(second=0, microsecond=0)),
)
def test_trigger_at_a_clock_time_properties(
    zone: ZoneInfo, instant: datetime, days: int, at: time
) -> None:
    window = utils.Window(days, "d", at)
    trigger = utils.trigger_time(instant, zone, window)
    assert trigger.tzinfo is UTC
    # Only the instant matters, not how it is written.
    assert trigger == utils.trigger_time(instant.astimezone(zone), zone, window)
    assert trigger == utils.trigger_time(instant.astimezone(KOLKATA), zone, window)
    local = instant.astimezone(zone)
    wall = datetime.combine(local.date() - timedelta(days=days), at)
    assert trigger == utils.localize(wall, zone).astimezone(UTC)
    seen = trigger.astimezone(zone)
    if utils.wall_clock_issue(wall, zone) != "gap":
        assert (seen.date(), seen.time()) == (wall.date(), at)
    else:
        assert seen.replace(tzinfo=None) > wall
    # Whether it opens after the start is told exactly; a day or more ahead never does here.
    late = utils.window_opens_after(instant, zone, window)
    assert (late is None) == (trigger <= instant)
    assert late is None or late == trigger
    if days >= 1:
        assert trigger < instant
    elif utils.wall_clock_issue(wall, zone) is None:
        assert (late is not None) == (at > local.time())


# --------------------------------------------------------------------------- backoff


def test_backoff_delays() -> None:
    assert utils.backoff_delays(1) == [1, 2]
    assert utils.backoff_delays(0.5) == [0.5, 1.0]
    assert utils.backoff_delays(0) == [0, 0]
    assert utils.backoff_delays(2, attempts=4) == [2, 4, 8]
    assert utils.backoff_delays(1, attempts=1) == []
    assert utils.backoff_delays(1, attempts=0) == []


# --------------------------------------------------------------------------- Retry-After


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("30", 30.0),
        ("31", 30.0),
        ("120", 30.0),
        ("86400", 30.0),
    ],
)
def test_retry_after_seconds_capped_at_30(value: str, seconds: float) -> None:
    assert utils.parse_retry_after(value, NOW) == seconds


def test_retry_after_http_date() -> None:
    assert utils.parse_retry_after(http_date(NOW + timedelta(seconds=10)), NOW) == 10.0
    assert utils.parse_retry_after(http_date(NOW + timedelta(minutes=10)), NOW) == 30.0
    # A date already past means: now.
    assert utils.parse_retry_after(http_date(NOW - timedelta(minutes=1)), NOW) == 0.0
    # Other zones and the obsolete "-0000" are understood too.
    assert utils.parse_retry_after("Mon, 23 Nov 2026 13:00:12 +0100", NOW) == 12.0
    assert utils.parse_retry_after("Mon, 23 Nov 2026 12:00:04 -0000", NOW) == 4.0
    # A naive ``now`` is taken as UTC.
    assert (
        utils.parse_retry_after(http_date(NOW + timedelta(seconds=3)), NOW.replace(tzinfo=None))
        == 3.0
    )


@pytest.mark.parametrize("value", [None, "", "   ", "garbage", "-5", "1e3", "soon", "Mon, 99 Foo"])
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert utils.parse_retry_after(value, NOW) is None


# --------------------------------------------------------------------------- Fernet


def test_load_fernet_one_key(fernet_key: str) -> None:
    ring = utils.load_fernet(fernet_key)
    token = ring.encrypt(b"secret-token").decode()
    assert Fernet(fernet_key.encode()).decrypt(token.encode()) == b"secret-token"
    assert utils.decrypt_token(ring, token) == "secret-token"
    assert utils.encrypted_under_first_key(ring, token) is True


def test_load_fernet_several_keys_first_encrypts_all_decrypt() -> None:
    first, second, third = (Fernet.generate_key().decode() for _ in range(3))
    ring = utils.load_fernet(f"{first}, {second} ,{third}")
    new = ring.encrypt(b"abc").decode()
    assert Fernet(first.encode()).decrypt(new.encode()) == b"abc"
    for other in (second, third):
        assert utils.decrypt_token(MultiFernet([Fernet(other.encode())]), new) is None
    # Every key decrypts what it encrypted; only the first counts as current.
    for key, current in ((first, True), (second, False), (third, False)):
        old = Fernet(key.encode()).encrypt(b"old").decode()
        assert utils.decrypt_token(ring, old) == "old"
        assert utils.encrypted_under_first_key(ring, old) is current


@pytest.mark.parametrize("value", [None, "", "   "])
def test_load_fernet_missing(value: str | None) -> None:
    with pytest.raises(utils.KeyError_) as info:
        utils.load_fernet(value)
    assert str(info.value) == f"FERNET_KEY is not set; {KEY_FIX}"


def test_load_fernet_bad_key_never_shows_the_key(fernet_key: str) -> None:
    short = Fernet.generate_key().decode()[:-4]  # base64, but not 32 bytes
    cases = {
        "hunter2-not-a-key": 1,
        f"{fernet_key},{short}": 2,
        f"{fernet_key},": 2,
        f"{fernet_key},{fernet_key},!!notbase64!!": 3,
        "é" * 44: 1,
    }
    for value, index in cases.items():
        with pytest.raises(utils.KeyError_) as info:
            utils.load_fernet(value)
        message = str(info.value)
        assert message == (
            f"FERNET_KEY: key #{index} is not a Fernet key (32 url-safe base64-encoded bytes); "
            f"{KEY_FIX}"
        )
        for part in value.split(","):
            if part:
                assert part not in message
                assert part not in repr(info.value)
        # Not chained to the library's error either (its text could echo the input).
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__ is True


def test_looks_like_fernet(fernet: MultiFernet) -> None:
    token = fernet.encrypt(b"x").decode()
    assert utils.looks_like_fernet(token) is True
    assert utils.looks_like_fernet(token.rstrip("=")) is True
    # Cut short (a paste that lost its end) is still the shape: an error, not a plaintext.
    for value in ("gAAAAA", "gAAAAAshort", token[:40]):
        assert utils.looks_like_fernet(value) is True, value
    for value in (
        "",
        "plain-token",
        token.replace("gAAAAA", "hAAAAA", 1),
        token[:-8] + "+/+/+/+/",
        " " + token,
        "abc" + token,
    ):
        assert utils.looks_like_fernet(value) is False, value


def test_decrypt_token(fernet: MultiFernet) -> None:
    token = fernet.encrypt("tök€n".encode()).decode()
    assert utils.decrypt_token(fernet, token) == "tök€n"
    other = MultiFernet([Fernet(Fernet.generate_key())])
    assert utils.decrypt_token(other, token) is None
    assert utils.decrypt_token(fernet, "plain") is None
    assert utils.decrypt_token(fernet, "gAAAAAé") is None
    assert utils.decrypt_token(fernet, token[:-4]) is None
    not_utf8 = fernet.encrypt(b"\xff\xfe").decode()
    assert utils.decrypt_token(fernet, not_utf8) is None


def test_decrypt_secrets_of_a_string_and_of_an_object(fernet: MultiFernet) -> None:
    def enc(text: str) -> str:
        return fernet.encrypt(text.encode()).decode()

    assert utils.decrypt_secrets(fernet, enc("tok")) == {"token": "tok"}
    fields = {"email": enc("me@club.example"), "password": enc("pw")}
    assert utils.decrypt_secrets(fernet, fields) == {"email": "me@club.example", "password": "pw"}
    foreign = Fernet(Fernet.generate_key()).encrypt(b"pw").decode()
    assert utils.decrypt_secrets(fernet, fields | {"password": foreign}) is None
    assert utils.decrypt_secrets(fernet, {"email": 5}) is None
    assert utils.decrypt_secrets(fernet, {}) is None
    assert utils.decrypt_secrets(fernet, foreign) is None
    assert utils.decrypt_secrets(fernet, None) is None


def test_encrypted_under_first_key(fernet: MultiFernet) -> None:
    assert utils.encrypted_under_first_key(fernet, "plain") is False
    assert utils.encrypted_under_first_key(fernet, "gAAAAAé") is False
    foreign = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    assert utils.encrypted_under_first_key(fernet, foreign) is False


# --------------------------------------------------------------------------- small helpers


def test_small_helpers() -> None:
    assert utils.courts_text([None]) == "any"
    assert utils.courts_text([]) == "any"
    assert utils.courts_text(["3", "4"]) == "3, 4"
    assert utils.is_english_rule("  Every Wednesday at 17:00") is True
    assert utils.is_english_rule("FREQ=WEEKLY;BYDAY=WE") is False
    assert utils.is_english_rule("RRULE:FREQ=WEEKLY") is False


@pytest.mark.parametrize("text", ["8785h", "367d", "100000000h"])
def test_window_longer_than_a_year_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^'{text}' is longer than a year"):
        utils.parse_window(text)
    assert utils.parse_window("8784h").amount == 8784


# --------------------------------------------------------------------------- rules


ZONES = (LONDON, NEW_YORK, SYDNEY, KOLKATA, UTC_ZONE)

ENGLISH_EXAMPLE = (
    "e.g. 'every Wednesday at 17:00', 'every other Friday at 10:00 starting 2025-08-03', "
    "'every Tuesday and Thursday at 07:30 until 2026-06-30'"
)
RULE_EXAMPLE = '"FREQ=WEEKLY;BYDAY=WE" or "every Wednesday at 17:00"'
FREQS = "FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY"
DAY_CODES = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
GapCase = tuple[datetime, str, str]  # the wall clock asked for, its instant, shown


def english(
    text: str, *, start: date | None = None, today: date = date(2025, 7, 1)
) -> utils.ParsedRule:
    return utils.parse_english_rule(text, start=start, today=today)


def rfc(text: str, *, start: datetime | None = None, zone: ZoneInfo = LONDON) -> utils.ParsedRule:
    return utils.parse_rfc_rule(text, start=start, zone=zone)


def instants(rule: utils.ParsedRule, zone: ZoneInfo, after: datetime, limit: int = 52) -> list[str]:
    """The rule's next starts as UTC text (comparing aware datetimes in one zone compares
    their wall clocks, so tests compare the UTC text instead)."""
    return [utils.format_utc(m) for m in utils.expand_rule(rule, zone, after, limit)]


def local_days(
    rule: utils.ParsedRule, zone: ZoneInfo, after: datetime, limit: int = 52
) -> list[str]:
    return [
        utils.as_utc(m).astimezone(zone).strftime("%a %Y-%m-%d %H:%M")
        for m in utils.expand_rule(rule, zone, after, limit)
    ]


def rule_error(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(utils.RuleError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- English: named cases


def test_every_other_friday_counts_from_the_first_friday() -> None:
    rule = english("Every other Friday at 10:00 starting 2025-08-03")
    assert local_days(rule, LONDON, utc(2025, 7, 1), 4) == [
        "Fri 2025-08-08 10:00",
        "Fri 2025-08-22 10:00",
        "Fri 2025-09-05 10:00",
        "Fri 2025-09-19 10:00",
    ]
    assert rule.english is True
    assert rule.start == datetime(2025, 8, 8, 10, 0)
    assert rule.rfc == "DTSTART:20250808T100000\nRRULE:FREQ=WEEKLY;INTERVAL=2;BYDAY=FR;WKST=FR"


def test_plain_rfc_every_other_friday_from_a_sunday_differs() -> None:
    # What dateutil does with the same start: weeks counted from the Sunday's Monday-based week.
    plain = rfc("FREQ=WEEKLY;INTERVAL=2;BYDAY=FR", start=datetime(2025, 8, 3, 10, 0))
    assert local_days(plain, LONDON, utc(2025, 7, 1), 2) == [
        "Fri 2025-08-15 10:00",
        "Fri 2025-08-29 10:00",
    ]
    sentence = english("Every other Friday at 10:00 starting 2025-08-03")
    assert "Fri 2025-08-15 10:00" not in local_days(sentence, LONDON, utc(2025, 7, 1), 10)


def test_every_other_with_two_days_counts_blocks_from_the_first_instance() -> None:
    # Starting on a Wednesday: the first instance is Thursday, blocks run Thursday-Wednesday.
    rule = english("every other Tuesday and Thursday at 07:30 starting 2026-06-03")
    assert local_days(rule, LONDON, utc(2026, 6, 1), 6) == [
        "Thu 2026-06-04 07:30",
        "Tue 2026-06-09 07:30",
        "Thu 2026-06-18 07:30",
        "Tue 2026-06-23 07:30",
        "Thu 2026-07-02 07:30",
        "Tue 2026-07-07 07:30",
    ]


def test_every_tuesday_and_thursday_until_is_inclusive() -> None:
    rule = english("every Tuesday and Thursday at 07:30 until 2026-06-30", today=date(2026, 6, 10))
    assert local_days(rule, LONDON, utc(2026, 6, 10)) == [
        "Thu 2026-06-11 07:30",
        "Tue 2026-06-16 07:30",
        "Thu 2026-06-18 07:30",
        "Tue 2026-06-23 07:30",
        "Thu 2026-06-25 07:30",
        "Tue 2026-06-30 07:30",
    ]
    assert (
        rule.rfc == "DTSTART:20260611T073000\nRRULE:FREQ=WEEKLY;BYDAY=TU,TH;UNTIL=20260630T235959"
    )


def test_until_covers_the_whole_day_in_the_entry_zone() -> None:
    rule = english("every day at 23:59 until 2026-06-30", today=date(2026, 6, 28))
    # In Sydney 2026-06-30 23:59 is 13:59 UTC the same day; in New York it is 03:59 UTC the next
    # day: both are in, since the day is the entry's own.
    assert instants(rule, SYDNEY, utc(2026, 6, 27)) == [
        "2026-06-28T13:59:00Z",
        "2026-06-29T13:59:00Z",
        "2026-06-30T13:59:00Z",
    ]
    assert instants(rule, NEW_YORK, utc(2026, 6, 28, 12)) == [
        "2026-06-29T03:59:00Z",
        "2026-06-30T03:59:00Z",
        "2026-07-01T03:59:00Z",
    ]


def test_until_the_first_day_gives_that_day_only() -> None:
    rule = english("every Tuesday at 07:30 starting 2026-06-30 until 2026-06-30")
    assert local_days(rule, LONDON, utc(2026, 1, 1)) == ["Tue 2026-06-30 07:30"]


def test_until_already_past_gives_no_instance_but_stays_valid() -> None:
    # The rule was fine when written; once its last day has passed it has simply run out. Today
    # (the start of a rule without "starting") being after "until" is no error in the file.
    rule = english("every Tuesday and Thursday at 07:30 until 2026-06-30", today=date(2026, 7, 1))
    assert instants(rule, LONDON, utc(2026, 7, 1)) == []


def test_until_before_an_explicit_start_is_an_error() -> None:
    message = rule_error(english, "every Tuesday at 07:30 starting 2026-07-01 until 2026-06-30")
    assert message == (
        "'every Tuesday at 07:30 starting 2026-07-01 until 2026-06-30': until 2026-06-30 is "
        "before the first day 2026-07-07"
    )
    message = rule_error(english, "every Tuesday at 07:30 until 2026-06-30", start=date(2026, 7, 1))
    assert message.endswith("until 2026-06-30 is before the first day 2026-07-07")


@pytest.mark.parametrize(
    "text",
    [
        "every Monday and Wednesday at 18:00",
        "every mon and wed at 18:00",
        "Every MON and WED at 18:00",
        "every Mondays and Wednesdays at 18:00",
        "EVERY MONDAYS AND WEDNESDAYS AT 18:00",
        "every Wednesday and Monday at 18:00",
        "every monday, wednesday at 18:00",
        "every Monday, Wednesday and Monday at 18:00",
        "every Monday , and Wednesday at 18:00",
        "  every   Monday   and   Wed   at   18:00  ",
        "every Mon and Wednesdays at 18:00",
    ],
)
def test_weekday_spellings(text: str) -> None:
    rule = english(text, today=date(2026, 6, 1))
    assert rule.rfc == "DTSTART:20260601T180000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE"


@pytest.mark.parametrize(
    ("word", "code"),
    [
        *((name, name[:2].upper()) for name in DAY_NAMES),
        *((name[:3].lower(), name[:2].upper()) for name in DAY_NAMES),
        *((name + "s", name[:2].upper()) for name in DAY_NAMES),
    ],
)
def test_every_weekday_spelled_three_ways(word: str, code: str) -> None:
    rule = english(f"every {word} at 9:05", today=date(2026, 6, 1))
    assert rule.rfc.endswith(f"\nRRULE:FREQ=WEEKLY;BYDAY={code}")
    assert rule.start.time() == time(9, 5)
    assert DAY_CODES[rule.start.weekday()] == code


def test_three_weekdays_with_commas() -> None:
    rule = english("every Monday, Wednesday and Friday at 18:00", today=date(2026, 6, 2))
    assert rule.rfc == "DTSTART:20260603T180000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE,FR"


def test_every_day() -> None:
    rule = english("every day at 06:00", today=date(2026, 6, 1))
    assert rule.rfc == "DTSTART:20260601T060000\nRRULE:FREQ=DAILY"
    assert local_days(rule, LONDON, utc(2026, 6, 1, 12), 3) == [
        "Tue 2026-06-02 06:00",
        "Wed 2026-06-03 06:00",
        "Thu 2026-06-04 06:00",
    ]
    assert english("Every Day at 06:00", today=date(2026, 6, 1)).rfc == rule.rfc


def test_every_other_day() -> None:
    rule = english("every other day at 06:00 starting 2026-06-01")
    assert rule.rfc == "DTSTART:20260601T060000\nRRULE:FREQ=DAILY;INTERVAL=2"
    assert local_days(rule, LONDON, utc(2026, 6, 1), 3) == [
        "Mon 2026-06-01 06:00",
        "Wed 2026-06-03 06:00",
        "Fri 2026-06-05 06:00",
    ]


def test_the_start_date_comes_from_starting_then_desired_time_then_today() -> None:
    text = "every Wednesday at 17:00"
    assert english(text, today=date(2026, 6, 1)).start == datetime(2026, 6, 3, 17, 0)
    assert english(text, start=date(2026, 9, 1), today=date(2026, 6, 1)).start == datetime(
        2026, 9, 2, 17, 0
    )
    assert english(
        text + " starting 2026-12-01", start=date(2026, 9, 1), today=date(2026, 6, 1)
    ).start == datetime(2026, 12, 2, 17, 0)
    # The start date itself counts when it matches.
    assert english(text, today=date(2026, 6, 3)).start == datetime(2026, 6, 3, 17, 0)
    # "every other" may take its start from desired_time.
    other = english("every other Wednesday at 17:00", start=date(2026, 6, 1))
    assert other.start == datetime(2026, 6, 3, 17, 0)


def test_every_other_without_a_start_is_an_error() -> None:
    for text in ("every other Friday at 10:00", "every other day at 06:00"):
        assert rule_error(english, text) == (
            f"{text!r}: 'every other' needs a start date to count weeks from; add "
            "'starting YYYY-MM-DD' (e.g. 'every other Friday at 10:00 starting 2025-08-03')"
        )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "every monkey at 10:00",
            f"'monkey' is not a weekday; {ENGLISH_EXAMPLE}",
        ),
        (
            "every Tuesday and Thursdy at 10:00",
            f"'Thursdy' is not a weekday (did you mean 'Thursday'?); {ENGLISH_EXAMPLE}",
        ),
        (
            "every Friday at 24:00",
            "24:00 in 'every Friday at 24:00' is not a time of day (00:00-23:59)",
        ),
        (
            "every Friday at 10:75",
            "10:75 in 'every Friday at 10:75' is not a time of day (00:00-23:59)",
        ),
        (
            "every Friday at 10:00 starting 2025-02-30",
            "starting '2025-02-30' is not a real date (YYYY-MM-DD)",
        ),
        (
            "every Friday at 10:00 until 2025-13-01",
            "until '2025-13-01' is not a real date (YYYY-MM-DD)",
        ),
        (
            "every Friday",
            f"'every Friday' is not an English rule I understand; {ENGLISH_EXAMPLE}",
        ),
        (
            "every Friday at 10",
            "'every Friday at 10': 'at 10' is not a time of day: write it as HH:MM on the "
            "24-hour clock (e.g. 'at 19:00', 'at 07:30')",
        ),
        (
            "every Friday at 7pm",
            "'every Friday at 7pm': 'at 7pm' is not a time of day: write it as HH:MM on the "
            "24-hour clock (e.g. 'at 19:00', 'at 07:30')",
        ),
        (
            "every Wendesday at 17:00",
            f"'Wendesday' is not a weekday (did you mean 'Wednesday'?); {ENGLISH_EXAMPLE}",
        ),
        (
            "every other Mondya and Friday at 17:00 starting 2026-01-01",
            f"'Mondya' is not a weekday (did you mean 'Monday'?); {ENGLISH_EXAMPLE}",
        ),
        (
            "every Wednesday at 17:00.",
            f"'every Wednesday at 17:00.' is not an English rule I understand; {ENGLISH_EXAMPLE}",
        ),
        (
            "every second Tuesday at 10:00",
            f"'every second Tuesday at 10:00' is not an English rule I understand; "
            f"{ENGLISH_EXAMPLE}",
        ),
        (
            "every Friday at 10:00 until 2025-09-01 starting 2025-08-01",
            "'every Friday at 10:00 until 2025-09-01 starting 2025-08-01' is not an English rule "
            f"I understand; {ENGLISH_EXAMPLE}",
        ),
    ],
)
def test_english_errors(text: str, message: str) -> None:
    assert rule_error(english, text) == message


@pytest.mark.parametrize(
    ("sentence", "rule_line", "start"),
    [
        ("every Wednesday at 17:00", "FREQ=WEEKLY;BYDAY=WE", datetime(2026, 6, 3, 17, 0)),
        (
            "every Monday and Friday at 07:15",
            "FREQ=WEEKLY;BYDAY=MO,FR",
            datetime(2026, 6, 1, 7, 15),
        ),
        ("every day at 06:00", "FREQ=DAILY", datetime(2026, 6, 1, 6, 0)),
        (
            "every Sunday at 01:30 until 2027-06-30",
            "RRULE:FREQ=WEEKLY;BYDAY=SU;UNTIL=20270630T235959",
            datetime(2026, 6, 7, 1, 30),
        ),
    ],
)
def test_english_equals_its_rfc_form(sentence: str, rule_line: str, start: datetime) -> None:
    parsed = english(sentence, today=date(2026, 6, 1))
    plain = rfc(rule_line, start=start)
    for zone in ZONES:
        assert instants(parsed, zone, utc(2026, 5, 1)) == instants(plain, zone, utc(2026, 5, 1))
    # And the RFC text it reports (shown by `check`) reads back to the same instances.
    again = rfc(parsed.rfc)
    assert again.english is False
    assert instants(again, LONDON, utc(2026, 5, 1)) == instants(parsed, LONDON, utc(2026, 5, 1))


# --------------------------------------------------------------------------- RFC 5545: named cases


@pytest.mark.parametrize(
    "text",
    [
        "FREQ=WEEKLY;BYDAY=WE",
        "RRULE:FREQ=WEEKLY;BYDAY=WE",
        "rrule:freq=weekly;byday=we",
        "  FREQ=WEEKLY ; BYDAY=WE ;",
        "DTSTART:20260603T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE",
        "DTSTART:20260603T170000\r\nFREQ=WEEKLY;BYDAY=WE\r\n",
        "RRULE:FREQ=WEEKLY;BYDAY=WE\nDTSTART:20260603T170000",
        "DTSTART;VALUE=DATE-TIME:20260603T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE",
    ],
)
def test_rfc_forms(text: str) -> None:
    start = None if "DTSTART" in text else datetime(2026, 6, 3, 17, 0)
    rule = rfc(text, start=start)
    assert rule.english is False
    assert rule.zone_name is None
    assert rule.start == datetime(2026, 6, 3, 17, 0)
    assert local_days(rule, LONDON, utc(2026, 6, 1), 3) == [
        "Wed 2026-06-03 17:00",
        "Wed 2026-06-10 17:00",
        "Wed 2026-06-17 17:00",
    ]


def test_rfc_dtstart_with_tzid_names_the_zone() -> None:
    rule = rfc("DTSTART;TZID=Australia/Sydney:20260603T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE")
    assert rule.zone_name == "Australia/Sydney"
    assert rule.start == datetime(2026, 6, 3, 17, 0)
    assert rule.rfc == ("DTSTART;TZID=Australia/Sydney:20260603T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE")


def test_rfc_dtstart_in_utc_is_that_instant_in_the_zone() -> None:
    rule = rfc("DTSTART:20260603T160000Z\nRRULE:FREQ=WEEKLY;BYDAY=WE", zone=LONDON)
    assert rule.start == datetime(2026, 6, 3, 17, 0)  # 16:00 UTC = 17:00 BST


def test_rfc_dtstart_off_the_rule_is_not_an_instance() -> None:
    # DTSTART is a Sunday; the rule wants Wednesdays.
    rule = rfc("DTSTART:20260607T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE")
    assert local_days(rule, LONDON, utc(2026, 6, 1), 2) == [
        "Wed 2026-06-10 17:00",
        "Wed 2026-06-17 17:00",
    ]
    counted = rfc("DTSTART:20260607T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE;COUNT=2")
    assert local_days(counted, LONDON, utc(2026, 6, 1)) == [
        "Wed 2026-06-10 17:00",
        "Wed 2026-06-17 17:00",
    ]


def test_rfc_count() -> None:
    rule = rfc("FREQ=DAILY;COUNT=3", start=datetime(2026, 6, 1, 7, 0))
    assert local_days(rule, LONDON, utc(2026, 1, 1)) == [
        "Mon 2026-06-01 07:00",
        "Tue 2026-06-02 07:00",
        "Wed 2026-06-03 07:00",
    ]
    # COUNT counts from the start, not from now.
    assert local_days(rule, LONDON, utc(2026, 6, 1, 12)) == [
        "Tue 2026-06-02 07:00",
        "Wed 2026-06-03 07:00",
    ]


def test_rfc_until_in_utc_with_a_naive_start() -> None:
    line = "FREQ=DAILY;UNTIL=20260609T220000Z"
    start = datetime(2026, 6, 7, 7, 30)
    # dateutil alone refuses an absolute UNTIL with a wall-clock start.
    with pytest.raises(ValueError, match="UNTIL values must be specified in UTC"):
        du_rrule.rrulestr(line, dtstart=start)
    # Ours takes it as the instant: 22:00 UTC on the 9th is 08:00 on the 10th in Sydney.
    rule = rfc(line, start=start, zone=SYDNEY)
    assert local_days(rule, SYDNEY, utc(2026, 6, 1)) == [
        "Sun 2026-06-07 07:30",
        "Mon 2026-06-08 07:30",
        "Tue 2026-06-09 07:30",
        "Wed 2026-06-10 07:30",
    ]
    # Shown as the instant it is, after a DTSTART that names the zone (RFC 5545: a UTC UNTIL
    # goes with a zoned start, never with a floating one).
    assert rule.rfc == (
        "DTSTART;TZID=Australia/Sydney:20260607T073000\nRRULE:FREQ=DAILY;UNTIL=20260609T220000Z"
    )
    assert rule.zone_name is None  # shown, not named by the entry
    # A DTSTART;TZID names the zone the UNTIL instant is read in, whatever the entry's default.
    tzid = rfc("DTSTART;TZID=Australia/Sydney:20260607T073000\nRRULE:" + line, zone=UTC_ZONE)
    assert instants(tzid, SYDNEY, utc(2026, 6, 1)) == instants(rule, SYDNEY, utc(2026, 6, 1))


def test_rfc_until_without_z_is_a_wall_clock() -> None:
    rule = rfc("FREQ=DAILY;UNTIL=20260609T073000", start=datetime(2026, 6, 7, 7, 30), zone=SYDNEY)
    assert len(instants(rule, SYDNEY, utc(2026, 6, 1))) == 3


def test_rfc_monthly_and_yearly_are_allowed() -> None:
    monthly = rfc("FREQ=MONTHLY;BYDAY=1SA", start=datetime(2026, 6, 1, 9, 0))
    assert local_days(monthly, LONDON, utc(2026, 6, 1), 2) == [
        "Sat 2026-06-06 09:00",
        "Sat 2026-07-04 09:00",
    ]
    yearly = rfc("FREQ=YEARLY", start=datetime(2026, 6, 1, 9, 0))
    assert len(utils.expand_rule(yearly, LONDON, utc(2026, 1, 1))) == 52


@pytest.mark.parametrize("freq", ["HOURLY", "MINUTELY", "SECONDLY", "WEEKY", "weeky"])
def test_rfc_freq_must_be_daily_or_longer(freq: str) -> None:
    line = f"FREQ={freq};BYDAY=WE"
    assert rule_error(rfc, line, start=datetime(2026, 6, 3, 17, 0)) == (
        f"{line!r} is not a valid rule ('FREQ={freq}': {FREQS}); e.g. {RULE_EXAMPLE}"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("BYDAY=WE", f"'BYDAY=WE' is not a valid rule (no FREQ: {FREQS}); e.g. {RULE_EXAMPLE}"),
        (
            "RRULE:INTERVAL=2",
            f"'INTERVAL=2' is not a valid rule (no FREQ: {FREQS}); e.g. {RULE_EXAMPLE}",
        ),
        (
            "hello",
            f"'hello' is not a valid rule: 'hello' is not NAME=VALUE; e.g. {RULE_EXAMPLE}",
        ),
        (
            "Wednesdays at 17:00",
            "'Wednesdays at 17:00' is not a valid rule: 'Wednesdays at 17:00' is not NAME=VALUE; "
            f"e.g. {RULE_EXAMPLE}",
        ),
        (
            "FREQ=WEEKLY;BYDAY=",
            f"'FREQ=WEEKLY;BYDAY=' is not a valid rule: 'BYDAY=' is not NAME=VALUE; "
            f"e.g. {RULE_EXAMPLE}",
        ),
        (
            "FREQ=WEEKLY;BYDAY=XX",
            "'FREQ=WEEKLY;BYDAY=XX' is not a valid rule (invalid 'BYDAY': XX); "
            f"e.g. {RULE_EXAMPLE}",
        ),
        (
            "FREQ=WEEKLY;FOO=1",
            "'FREQ=WEEKLY;FOO=1' is not a valid rule (unknown parameter 'FOO'); "
            f"e.g. {RULE_EXAMPLE}",
        ),
        (
            "FREQ=DAILY;BYHOUR=25",
            "'FREQ=DAILY;BYHOUR=25' is not a valid rule (hour must be in 0..23); "
            f"e.g. {RULE_EXAMPLE}",
        ),
        (
            "RRULE:FREQ=WEEKLY;BYDAY=WE\nRRULE:FREQ=WEEKLY;BYDAY=FR",
            "'RRULE:FREQ=WEEKLY;BYDAY=WE\\nRRULE:FREQ=WEEKLY;BYDAY=FR' must hold exactly one rule "
            f"line (and optionally a DTSTART line); e.g. {RULE_EXAMPLE}",
        ),
        (
            "DTSTART:20260603T170000",
            "'DTSTART:20260603T170000' must hold exactly one rule line (and optionally a DTSTART "
            f"line); e.g. {RULE_EXAMPLE}",
        ),
        (
            "FREQ=WEEKLY;COUNT=3;UNTIL=20261231T000000",
            "'FREQ=WEEKLY;COUNT=3;UNTIL=20261231T000000': COUNT and UNTIL cannot both be given "
            "(RFC 5545)",
        ),
        (
            "FREQ=WEEKLY;UNTIL=20260230T000000Z",
            "'FREQ=WEEKLY;UNTIL=20260230T000000Z': UNTIL '20260230T000000Z' is not a date-time",
        ),
    ],
)
def test_rfc_errors(text: str, message: str) -> None:
    assert rule_error(rfc, text, start=datetime(2026, 6, 3, 17, 0)) == message


@pytest.mark.parametrize("interval", ["0", "-1", "-2", "00", "abc", "1.5"])
@pytest.mark.parametrize("freq", ["DAILY", "WEEKLY", "MONTHLY", "YEARLY"])
def test_rfc_interval_must_be_at_least_one(freq: str, interval: str) -> None:
    # dateutil takes these and then loops forever (DAILY) or raises while expanding (WEEKLY),
    # which would take the loader down: they are refused up front instead.
    line = f"FREQ={freq};INTERVAL={interval}"
    assert rule_error(rfc, line, start=datetime(2026, 6, 3, 17, 0)) == (
        f"{line!r}: INTERVAL {interval!r} must be a whole number of at least 1; e.g. {RULE_EXAMPLE}"
    )


def test_rfc_interval_of_one_or_more_is_taken() -> None:
    for interval in ("1", "+2", "02", "10"):
        rule = rfc(f"FREQ=DAILY;INTERVAL={interval}", start=datetime(2026, 6, 1, 7, 0))
        assert len(utils.expand_rule(rule, LONDON, utc(2026, 1, 1), 3)) == 3


def test_rfc_without_a_start_is_an_error() -> None:
    assert rule_error(rfc, "FREQ=WEEKLY;BYDAY=WE") == (
        "'FREQ=WEEKLY;BYDAY=WE' has no start: add a 'desired_time' (the first possible date and "
        "time of day) or a DTSTART line"
    )


def test_rfc_dtstart_errors() -> None:
    assert rule_error(rfc, "DTSTART:2026-06-03 17:00\nRRULE:FREQ=WEEKLY") == (
        "'DTSTART:2026-06-03 17:00' is not a DTSTART line; expected e.g. "
        "'DTSTART:20260107T170000' or 'DTSTART;TZID=Europe/London:20260107T170000'"
    )
    assert rule_error(rfc, "DTSTART:20260230T170000\nRRULE:FREQ=WEEKLY") == (
        "'DTSTART:20260230T170000': '20260230T170000' is not a real date and time"
    )
    assert rule_error(rfc, "DTSTART;TZID=Mars/Base:20260603T170000\nRRULE:FREQ=WEEKLY") == (
        "'DTSTART;TZID=Mars/Base:20260603T170000': TZID 'Mars/Base' is not an IANA time zone "
        "(e.g. 'Europe/London')"
    )
    assert rule_error(
        rfc, "DTSTART:20260603T170000\nRRULE:FREQ=WEEKLY", start=datetime(2026, 6, 3, 18, 0)
    ) == (
        "DTSTART 2026-06-03 17:00 and desired_time 2026-06-03 18:00 disagree; give the start once"
    )
    # Given twice but the same: fine.
    same = rfc("DTSTART:20260603T170000\nRRULE:FREQ=WEEKLY", start=datetime(2026, 6, 3, 17, 0))
    assert same.start == datetime(2026, 6, 3, 17, 0)


# --------------------------------------------------------------------------- DST, named cases


@pytest.mark.parametrize(
    ("zone", "rule_line", "start", "after", "expected"),
    [
        # London spring 2025-03-30: 01:00 GMT -> 02:00 BST.
        (
            LONDON,
            "FREQ=WEEKLY;BYDAY=SU",
            datetime(2025, 3, 23, 1, 30),
            utc(2025, 3, 24),
            (
                datetime(2025, 3, 30, 1, 30),
                "2025-03-30T01:30:00Z",
                "2025-03-30T02:30:00+01:00",
            ),
        ),
        # Sydney spring 2025-10-05: 02:00 AEST -> 03:00 AEDT.
        (
            SYDNEY,
            "FREQ=WEEKLY;BYDAY=SU",
            datetime(2025, 9, 28, 2, 30),
            utc(2025, 9, 29),
            (
                datetime(2025, 10, 5, 2, 30),
                "2025-10-04T16:30:00Z",
                "2025-10-05T03:30:00+11:00",
            ),
        ),
        # New York spring 2025-03-09: 02:00 EST -> 03:00 EDT.
        (
            NEW_YORK,
            "FREQ=DAILY",
            datetime(2025, 3, 1, 2, 30),
            utc(2025, 3, 8, 12),
            (
                datetime(2025, 3, 9, 2, 30),
                "2025-03-09T07:30:00Z",
                "2025-03-09T03:30:00-04:00",
            ),
        ),
    ],
)
def test_a_time_in_the_gap_is_the_pre_gap_offset_instant(
    zone: ZoneInfo, rule_line: str, start: datetime, after: datetime, *, expected: GapCase
) -> None:
    wall, instant, shown = expected
    rule = rfc(rule_line, start=start, zone=zone)
    (first_wall, first), *_ = utils.expand_rule_walls(rule, zone, after, 3)
    assert first_wall == wall
    assert utils.wall_clock_issue(wall, zone) == "gap"
    assert utils.format_utc(first) == instant
    # Written with the zone's actual offset at that instant (CONTRACT section 6).
    assert utils.format_offset(first, zone) == shown
    assert utils.format_local(first, zone)[15:20] == shown[11:16]
    assert utils.instance_key("x", first) == f"x@{instant}"


def test_days_window_of_a_start_in_the_gap_uses_the_time_on_the_clock() -> None:
    # 01:30 on 2025-03-30 is the instant 01:30 GMT, on the clock 02:30 BST. Seven days earlier
    # is then 02:30 GMT: the trigger depends on the instant only (the database keeps that).
    rule = rfc("FREQ=WEEKLY;BYDAY=SU", start=datetime(2025, 3, 23, 1, 30))
    (start,) = utils.expand_rule(rule, LONDON, utc(2025, 3, 24), 1)
    trigger = utils.trigger_time(start, LONDON, DAYS)
    assert trigger == utc(2025, 3, 23, 2, 30)
    assert trigger == utils.trigger_time(utils.as_utc(start), LONDON, DAYS)
    assert utils.as_utc(start) - trigger == timedelta(hours=167)


def test_gap_warning_shows_the_time_on_the_clock() -> None:
    note = utils.describe_wall_clock_issue(datetime(2025, 10, 5, 2, 30), SYDNEY)
    assert note == (
        "2025-10-05 02:30 does not exist in Australia/Sydney (DST gap): "
        "it is taken as 03:30 AEDT (2025-10-04T16:30:00Z)"
    )


@pytest.mark.parametrize(
    ("zone", "start", "after", "wall", "instant"),
    [
        # London autumn 2025-10-26: 01:00-02:00 twice; the first is BST.
        (LONDON, datetime(2025, 10, 19, 1, 30), utc(2025, 10, 20), datetime(2025, 10, 26, 1, 30),
         "2025-10-26T00:30:00Z"),
        # Sydney autumn 2025-04-06: 02:00-03:00 twice; the first is AEDT.
        (SYDNEY, datetime(2025, 3, 30, 2, 30), utc(2025, 3, 31), datetime(2025, 4, 6, 2, 30),
         "2025-04-05T15:30:00Z"),
    ],
)  # fmt: skip
def test_a_repeated_time_is_its_first_occurrence(
    zone: ZoneInfo, start: datetime, after: datetime, wall: datetime, instant: str
) -> None:
    rule = rfc("FREQ=WEEKLY;BYDAY=SU", start=start, zone=zone)
    (first_wall, first), (_, second) = utils.expand_rule_walls(rule, zone, after, 2)
    assert first_wall == wall
    assert utils.wall_clock_issue(wall, zone) == "overlap"
    assert utils.format_utc(first) == instant
    # One week later the offset is the new one and the wall clock is the same.
    assert utils.as_utc(second) - utils.as_utc(first) == timedelta(days=7, hours=1)
    assert utils.as_utc(second).astimezone(zone).strftime("%H:%M") == wall.strftime("%H:%M")


@pytest.mark.parametrize(
    ("zone", "start", "after", "expected"),
    [
        (
            LONDON,
            datetime(2025, 10, 15, 17, 0),
            utc(2025, 10, 16),
            ["2025-10-22T16:00:00Z", "2025-10-29T17:00:00Z"],
        ),
        (
            LONDON,
            datetime(2026, 3, 18, 17, 0),
            utc(2026, 3, 19),
            ["2026-03-25T17:00:00Z", "2026-04-01T16:00:00Z"],
        ),
        (
            SYDNEY,
            datetime(2025, 3, 26, 17, 0),
            utc(2025, 3, 27),
            ["2025-04-02T06:00:00Z", "2025-04-09T07:00:00Z"],
        ),
        (
            NEW_YORK,
            datetime(2025, 10, 22, 17, 0),
            utc(2025, 10, 23),
            ["2025-10-29T21:00:00Z", "2025-11-05T22:00:00Z"],
        ),
    ],
)
def test_17_00_stays_17_00_local_across_the_change(
    zone: ZoneInfo, start: datetime, after: datetime, expected: list[str]
) -> None:
    rule = rfc("FREQ=WEEKLY;BYDAY=WE", start=start, zone=zone)
    moments = utils.expand_rule(rule, zone, after, 2)
    assert [utils.format_utc(m) for m in moments] == expected
    assert [utils.as_utc(m).astimezone(zone).strftime("%a %H:%M") for m in moments] == [
        "Wed 17:00",
        "Wed 17:00",
    ]


def test_two_wall_clocks_on_one_instant_give_one_instance() -> None:
    # 01:30 (in the gap) and 02:30 are the same instant on 2025-03-30 in London.
    rule = rfc("FREQ=DAILY;BYHOUR=1,2;BYMINUTE=30", start=datetime(2025, 3, 29, 1, 30))
    got = instants(rule, LONDON, utc(2025, 3, 29, 2), 4)
    assert got == [
        "2025-03-29T02:30:00Z",  # 02:30 GMT on the 29th
        "2025-03-30T01:30:00Z",  # 01:30 (gap) = 02:30 BST
        "2025-03-31T00:30:00Z",
        "2025-03-31T01:30:00Z",
    ]
    assert len(set(got)) == len(got)


def test_expand_rule_limit_and_strictly_after() -> None:
    rule = rfc("FREQ=DAILY", start=datetime(2026, 1, 1, 12, 0))
    got = utils.expand_rule(rule, UTC_ZONE, utc(2026, 3, 1, 12, 0))
    assert len(got) == utils.INSTANCES_PER_RULE == 52
    assert utils.format_utc(got[0]) == "2026-03-02T12:00:00Z"  # 12:00 on the 1st is not after
    assert len(utils.expand_rule(rule, UTC_ZONE, utc(2026, 3, 1), limit=5)) == 5
    ended = rfc("FREQ=DAILY;COUNT=2", start=datetime(2026, 1, 1, 12, 0))
    assert utils.expand_rule(ended, UTC_ZONE, utc(2026, 3, 1)) == []


def test_expand_sees_instances_within_a_day_of_now_in_far_zones() -> None:
    # now is already the next day in Kolkata/Sydney; the rule's instance later today still counts.
    rule = rfc("FREQ=DAILY", start=datetime(2026, 1, 1, 23, 0))
    after = utc(2026, 6, 1, 17, 0)  # 22:30 in Kolkata
    assert instants(rule, KOLKATA, after, 1) == ["2026-06-01T17:30:00Z"]
    rule = rfc("FREQ=DAILY", start=datetime(2026, 1, 1, 0, 30))
    assert instants(rule, SYDNEY, utc(2026, 6, 1, 14, 0), 1) == ["2026-06-01T14:30:00Z"]


# --------------------------------------------------------------------------- through read_schedules


def read(
    tmp_path: Path, entries: list[Any], now: datetime = NOW, zone: str = "UTC"
) -> config_loader.SchedulesResult:
    path = write_json(tmp_path / "schedules.json", entries)
    return config_loader.read_schedules(path, default_zone=zone, token_names={"default"}, now=now)


def test_recurring_entry_plan(tmp_path: Path) -> None:
    result = read(
        tmp_path,
        [
            {
                "id": "wed-evening",
                "type": "recurring",
                "rrule": "Every Wednesday at 17:00",
                "timezone": "Europe/London",
            }
        ],
    )
    assert result.errors == []
    (entry,) = result.entries
    assert entry.rule is not None and entry.rule.english
    plan = entry.plan(NOW, HOURS)
    assert len(plan) == 52
    assert plan[0].key == "wed-evening@2026-11-25T17:00:00Z"
    assert plan[0].trigger == utc(2026, 11, 18, 17, 0)
    summer = next(p for p in plan if p.key.startswith("wed-evening@2027-07"))
    assert summer.key == "wed-evening@2027-07-07T16:00:00Z"  # 17:00 BST
    for item in plan:
        assert item.key == f"wed-evening@{utils.format_utc(item.desired)}"
        assert item.desired > NOW
        assert item.desired - item.trigger == timedelta(hours=168)


def test_recurring_entry_plan_with_days_window(tmp_path: Path) -> None:
    result = read(
        tmp_path,
        [{"id": "w", "type": "recurring", "rrule": "FREQ=WEEKLY;BYDAY=WE", "desired_time":
          "2027-03-03 17:00", "timezone": "Europe/London"}],
    )  # fmt: skip
    (entry,) = result.entries
    plan = entry.plan(NOW, DAYS)
    after_change = next(p for p in plan if p.key == "w@2027-04-07T16:00:00Z")
    # Wed 2027-03-31 17:00 BST (after the change of 2027-03-28).
    assert after_change.trigger == utc(2027, 3, 31, 16, 0)
    across = next(p for p in plan if p.key == "w@2027-03-31T16:00:00Z")
    assert across.trigger == utc(2027, 3, 24, 17, 0)  # 17:00 GMT, one hour more than 168h
    assert across.desired - across.trigger == timedelta(hours=167)


def test_tzid_sets_the_entry_zone(tmp_path: Path) -> None:
    rule = "DTSTART;TZID=Australia/Sydney:20261202T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE"
    result = read(tmp_path, [{"id": "syd", "type": "recurring", "rrule": rule}])
    assert result.errors == []
    (entry,) = result.entries
    assert entry.timezone == "Australia/Sydney"
    assert entry.plan(NOW, HOURS)[0].key == "syd@2026-12-02T06:00:00Z"
    agreeing = read(
        tmp_path,
        [{"id": "syd", "type": "recurring", "rrule": rule, "timezone": "Australia/Sydney"}],
    )
    assert agreeing.errors == []


def test_tzid_disagreeing_with_timezone_is_an_error(tmp_path: Path) -> None:
    rule = "DTSTART;TZID=Australia/Sydney:20261202T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE"
    result = read(
        tmp_path, [{"id": "syd", "type": "recurring", "rrule": rule, "timezone": "Europe/London"}]
    )
    assert result.entries == []
    assert result.errors == [
        "schedules.json entry 'syd' (#1): timezone: 'Europe/London' disagrees with the rule's "
        "DTSTART;TZID=Australia/Sydney; give the zone once"
    ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "FREQ=WEEKY",
            f"'FREQ=WEEKY' is not a valid rule ('FREQ=WEEKY': {FREQS}); e.g. {RULE_EXAMPLE}",
        ),
        (
            "BYDAY=WE",
            f"'BYDAY=WE' is not a valid rule (no FREQ: {FREQS}); e.g. {RULE_EXAMPLE}",
        ),
        (
            "every other Friday at 10:00",
            "'every other Friday at 10:00': 'every other' needs a start date to count weeks "
            "from; add 'starting YYYY-MM-DD' (e.g. 'every other Friday at 10:00 starting "
            "2025-08-03')",
        ),
        (
            "FREQ=WEEKLY;BYDAY=WE",
            "'FREQ=WEEKLY;BYDAY=WE' has no start: add a 'desired_time' (the first possible date "
            "and time of day) or a DTSTART line",
        ),
        ("", f"'' is not a rule; e.g. {RULE_EXAMPLE}"),
        (17, f"17 is not a rule; e.g. {RULE_EXAMPLE}"),
    ],
)
def test_bad_rules_name_the_file_entry_and_key(tmp_path: Path, rule: Any, message: str) -> None:
    result = read(tmp_path, [{"id": "wed-evening", "type": "recurring", "rrule": rule}])
    assert result.entries == []
    assert result.errors == [f"schedules.json entry 'wed-evening' (#1): rrule: {message}"]
    assert result.rejected_ids == {"wed-evening"}


def test_an_english_rule_that_has_run_out_is_not_an_error(tmp_path: Path) -> None:
    entry = {
        "id": "summer",
        "type": "recurring",
        "rrule": "every Tuesday and Thursday at 07:30 until 2026-06-30",
    }
    during = read(tmp_path, [entry], now=utc(2026, 6, 1))
    assert during.errors == []
    assert len(during.entries[0].plan(utc(2026, 6, 1), HOURS)) == 9
    after = read(tmp_path, [entry], now=utc(2026, 7, 1))
    assert after.errors == []
    (ended,) = after.entries
    assert ended.plan(utc(2026, 7, 1), HOURS) == []


def test_desired_time_gives_an_english_rule_its_start(tmp_path: Path) -> None:
    result = read(
        tmp_path,
        [
            {
                "id": "fri",
                "type": "recurring",
                "rrule": "every other Friday at 10:00",
                "desired_time": "2027-01-03 10:00",
                "timezone": "Europe/London",
            }
        ],
    )
    assert result.errors == []
    keys = [p.key for p in result.entries[0].plan(NOW, HOURS)[:3]]
    assert keys == [
        "fri@2027-01-08T10:00:00Z",
        "fri@2027-01-22T10:00:00Z",
        "fri@2027-02-05T10:00:00Z",
    ]


# --------------------------------------------------------------------------- property tests


@functools.cache
def transitions(zone: ZoneInfo) -> tuple[datetime, ...]:
    """The instants (UTC) at which ``zone``'s offset changes, 2024-2030, to the hour."""
    found: list[datetime] = []
    day = utc(2024, 1, 1)
    while day.year < 2031:
        following = day + timedelta(days=1)
        if day.astimezone(zone).utcoffset() != following.astimezone(zone).utcoffset():
            hour = day
            while hour.astimezone(zone).utcoffset() == day.astimezone(zone).utcoffset():
                hour += timedelta(hours=1)
            found.append(hour)
        day = following
    return tuple(found)


def test_the_zones_change_where_expected() -> None:
    assert len(transitions(LONDON)) == 14
    assert len(transitions(NEW_YORK)) == 14
    assert len(transitions(SYDNEY)) == 14
    assert transitions(KOLKATA) == ()
    assert transitions(UTC_ZONE) == ()
    assert utc(2025, 3, 30, 1) in transitions(LONDON)


@st.composite
def nows(draw: st.DrawFn, zone: ZoneInfo) -> datetime:
    """A ``now`` near one of the zone's DST changes (or anywhere, for zones without any)."""
    changes = transitions(zone)
    if changes and draw(st.booleans()):
        base = draw(st.sampled_from(changes))
        return base + timedelta(minutes=draw(st.integers(-10 * 24 * 60, 10 * 24 * 60)))
    day = draw(st.dates(date(2024, 1, 1), date(2030, 12, 31)))
    minute = draw(st.integers(0, 24 * 60 - 1))
    return datetime.combine(day, time(0), tzinfo=UTC) + timedelta(minutes=minute)


@st.composite
def rule_cases(draw: st.DrawFn) -> dict[str, Any]:
    zone = draw(st.sampled_from(ZONES))
    daily = draw(st.booleans())
    weekdays = (
        frozenset(range(7))
        if daily
        else draw(st.frozensets(st.integers(0, 6), min_size=1, max_size=7))
    )
    other = draw(st.booleans())
    hour = draw(st.one_of(st.integers(0, 23), st.integers(1, 3)))
    minute = draw(st.sampled_from([0, 1, 15, 30, 45, 59]))
    now = draw(nows(zone))
    start = draw(
        st.one_of(
            st.dates(date(2024, 1, 1), date(2030, 12, 31)),
            # Starting close to now, so that the first instance is often the one ahead.
            st.integers(-14, 14).map(lambda d: now.astimezone(zone).date() + timedelta(days=d)),
        )
    )
    until = draw(st.none() | st.integers(0, 800).map(lambda d: start + timedelta(days=d)))
    return {
        "zone": zone,
        "daily": daily,
        "weekdays": weekdays,
        "other": other,
        "time": time(hour, minute),
        "now": now,
        "start": start,
        "until": until,
        "shape": draw(st.sampled_from(["full", "short", "plural"])),
    }


def sentence(case: dict[str, Any]) -> str:
    if case["daily"]:
        days = "day"
    else:
        names = [DAY_NAMES[i] for i in sorted(case["weekdays"])]
        if case["shape"] == "short":
            names = [n[:3].lower() for n in names]
        elif case["shape"] == "plural":
            names = [n.upper() + "S" for n in names]
        days = " and ".join(names)
    other = "other " if case["other"] else ""
    text = f"Every {other}{days} at {case['time']:%H:%M} starting {case['start']}"
    if case["until"] is not None:
        text += f" until {case['until']}"
    return text


def first_day(case: dict[str, Any]) -> date:
    """The first matching day on or after the start date."""
    first = case["start"]
    while first.weekday() not in case["weekdays"]:
        first += timedelta(days=1)
    return first


def oracle(case: dict[str, Any], limit: int = 52) -> list[datetime]:
    """The expected starts, by walking the calendar day by day (UTC, aware)."""
    zone, now = case["zone"], case["now"]
    first = first_day(case)
    day = max(first, now.astimezone(zone).date() - timedelta(days=2))
    found: list[datetime] = []
    while len(found) < limit and (case["until"] is None or day <= case["until"]):
        offset = (day - first).days
        if case["daily"]:
            wanted = not case["other"] or offset % 2 == 0
        else:
            wanted = day.weekday() in case["weekdays"] and (
                not case["other"] or (offset // 7) % 2 == 0
            )
        if wanted:
            # PEP 495 default: fold=0, by construction of a plain datetime.
            moment = datetime.combine(day, case["time"], tzinfo=zone).astimezone(UTC)
            if moment > now:
                found.append(moment)
        day += timedelta(days=1)
    return found


def check_instances(case: dict[str, Any], moments: list[datetime]) -> None:
    zone, now = case["zone"], case["now"]
    as_utc = [utils.as_utc(m) for m in moments]
    assert as_utc == oracle(case)
    assert len(moments) <= 52
    assert all(m > now for m in as_utc)
    assert all(a < b for a, b in itertools.pairwise(as_utc))
    for moment in as_utc:
        local = moment.astimezone(zone)
        wall = datetime.combine(local.date(), case["time"])
        if utils.wall_clock_issue(wall, zone) == "gap":
            # Not on the clock: the instant of that wall clock at the pre-gap offset.
            assert moment == wall.replace(tzinfo=zone).astimezone(UTC)
            assert local.time() > case["time"]
        else:
            assert local.time() == case["time"]
        assert local.weekday() in case["weekdays"]
        assert local.date() >= case["start"]
        if case["until"] is not None:
            assert local.date() <= case["until"]


def check_triggers(case: dict[str, Any], moments: list[datetime]) -> None:
    zone = case["zone"]
    for moment in moments:
        instant = utils.as_utc(moment)
        for hours in (0.0, 47.5, 168.0):
            window = utils.Window(hours, "h")
            trigger = utils.trigger_time(moment, zone, window)
            assert trigger == instant - timedelta(hours=hours)
            assert trigger.tzinfo is UTC
        for days in (0, 1, 7, 14):
            window = utils.Window(days, "d")
            trigger = utils.trigger_time(moment, zone, window)
            # Only the instant matters, not how it is written.
            assert trigger == utils.trigger_time(instant, zone, window)
            assert trigger == utils.trigger_time(instant.astimezone(KOLKATA), zone, window)
            local = instant.astimezone(zone).replace(tzinfo=None)
            earlier = local - timedelta(days=days)
            expected = datetime.combine(earlier.date(), earlier.time(), tzinfo=zone)
            assert trigger == expected.astimezone(UTC)
            seen = trigger.astimezone(zone)
            assert seen.date() == local.date() - timedelta(days=days)
            if utils.wall_clock_issue(earlier, zone) != "gap":
                assert seen.time() == local.time()


@settings(max_examples=150, deadline=None)
@given(rule_cases())
def test_english_rules_expand_in_wall_clock_time(case: dict[str, Any]) -> None:
    text = sentence(case)
    first = first_day(case)
    if case["until"] is not None and case["until"] < first:
        message = rule_error(utils.parse_english_rule, text, start=None, today=date(2020, 1, 1))
        assert message == f"{text!r}: until {case['until']} is before the first day {first}"
        return
    rule = utils.parse_english_rule(text, start=None, today=date(2020, 1, 1))
    moments = utils.expand_rule(rule, case["zone"], case["now"])
    check_instances(case, moments)
    check_triggers(case, moments)
    # The RFC text the sentence became reads back to the same instances.
    again = utils.parse_rfc_rule(rule.rfc, start=None, zone=case["zone"])
    assert [utils.as_utc(m) for m in utils.expand_rule(again, case["zone"], case["now"])] == [
        utils.as_utc(m) for m in moments
    ]


@settings(max_examples=150, deadline=None)
@given(rule_cases())
def test_rfc_rules_expand_in_wall_clock_time(case: dict[str, Any]) -> None:
    case = {**case, "other": False}
    parts = ["FREQ=DAILY"] if case["daily"] else ["FREQ=WEEKLY"]
    if not case["daily"]:
        parts.append("BYDAY=" + ",".join(DAY_CODES[i] for i in sorted(case["weekdays"])))
    if case["until"] is not None:
        parts.append(f"UNTIL={case['until']:%Y%m%d}T235959")
    start = datetime.combine(case["start"], case["time"])
    rule = utils.parse_rfc_rule("RRULE:" + ";".join(parts), start=start, zone=case["zone"])
    moments = utils.expand_rule(rule, case["zone"], case["now"])
    check_instances(case, moments)
    check_triggers(case, moments)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=rule_cases(), english_form=st.booleans(), explicit_id=st.booleans())
def test_read_schedules_plans_keys_and_triggers(
    tmp_path: Path, case: dict[str, Any], english_form: bool, explicit_id: bool
) -> None:
    if not english_form:
        case = {**case, "other": False, "until": None}
    zone = case["zone"]
    entry: dict[str, Any] = {"type": "recurring", "timezone": zone.key}
    if explicit_id:
        entry["id"] = "prop"
    if english_form:
        entry["rrule"] = sentence(case)
    else:
        days = ",".join(DAY_CODES[i] for i in sorted(case["weekdays"]))
        entry["rrule"] = "FREQ=DAILY" if case["daily"] else f"FREQ=WEEKLY;BYDAY={days}"
        entry["desired_time"] = f"{case['start']} {case['time']:%H:%M}"
    result = read(tmp_path, [entry], now=case["now"])
    first = first_day(case)
    if case["until"] is not None and case["until"] < first:
        where = "'prop' (#1)" if explicit_id else "#1"
        assert result.errors == [
            f"schedules.json entry {where}: rrule: {entry['rrule']!r}: until {case['until']} is "
            f"before the first day {first}"
        ]
        return
    assert result.errors == []
    (loaded,) = result.entries
    schedule_id = "prop" if explicit_id else loaded.id
    assert re.fullmatch(r"prop|auto-[0-9a-f]{12}", schedule_id)
    plan = loaded.plan(case["now"], HOURS)
    assert [p.desired for p in plan] == oracle(case)
    assert len(plan) <= 52
    for item in plan:
        assert item.key == f"{schedule_id}@{utils.format_utc(item.desired)}"
        assert re.fullmatch(r"[A-Za-z0-9_.-]+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", item.key)
        assert item.desired > case["now"]
        assert item.desired.tzinfo is UTC
        assert item.trigger == item.desired - timedelta(hours=168)
    days_plan = loaded.plan(case["now"], DAYS)
    assert [p.key for p in days_plan] == [p.key for p in plan]
    for item in days_plan:
        assert item.trigger == utils.trigger_time(item.desired, zone, DAYS)


@pytest.mark.parametrize(
    ("rule", "days"),
    [
        ("FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30", "1 to 29"),
        ("FREQ=MONTHLY;BYMONTH=4,6;BYMONTHDAY=31", "1 to 30"),
        ("FREQ=MONTHLY;BYMONTHDAY=0", "1 to 31"),
        ("FREQ=MONTHLY;BYMONTHDAY=-32", "1 to 31"),
    ],
)
def test_a_month_day_no_month_has_is_refused_not_scanned_to_9999(rule: str, days: str) -> None:
    with pytest.raises(utils.RuleError) as raised:
        utils.parse_rfc_rule(rule, start=datetime(2026, 1, 1, 10), zone=LONDON)
    assert f"has a day that no month of the rule has (days are {days}" in str(raised.value)


def test_rare_but_real_month_days_are_kept() -> None:
    leap = utils.parse_rfc_rule(
        "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29", start=datetime(2026, 1, 1, 10), zone=LONDON
    )
    starts = utils.expand_rule(leap, LONDON, datetime(2026, 1, 1, tzinfo=UTC), 2)
    assert [s.date() for s in starts] == [date(2028, 2, 29), date(2032, 2, 29)]


# --------------------------------------------------------------------------- UNTIL as an instant

LORD_HOWE = ZoneInfo("Australia/Lord_Howe")


def dateutil_instants(text: str, zone: ZoneInfo, after: datetime, limit: int = 52) -> list[str]:
    """python-dateutil's own answer for a rule with a zoned start (it compares aware values, so
    as instants), sorted and without duplicates: the RFC 5545 reading to cross-check against."""
    rule = du_rrule.rrulestr(text)
    found = sorted({m.astimezone(UTC) for m in itertools.islice(rule, 2000)})
    return [utils.format_utc(m) for m in found if m > after][:limit]


def test_until_in_utc_drops_the_gap_instance_after_it() -> None:
    # London, 2025-03-30 01:00 GMT -> 02:00 BST. 01:30 that day does not exist and is the instant
    # 01:30 GMT, after UNTIL 01:00 UTC: RFC 5545 drops it (comparing wall clocks, 01:30 is
    # before 02:00 BST, the wall clock of UNTIL, and it was kept).
    text = "DTSTART;TZID=Europe/London:20250329T013000\nRRULE:FREQ=DAILY;UNTIL=20250330T010000Z"
    rule = rfc(text)
    assert instants(rule, LONDON, utc(2025, 3, 1)) == ["2025-03-29T01:30:00Z"]
    assert dateutil_instants(text, LONDON, utc(2025, 3, 1)) == ["2025-03-29T01:30:00Z"]
    assert rule.until == utc(2025, 3, 30, 1, 0)


def test_until_in_utc_keeps_the_first_of_two_times_before_it() -> None:
    # New York, 2025-11-02: 01:00-02:00 twice. 01:30 is its first occurrence, 01:30 EDT =
    # 05:30 UTC, before UNTIL 06:00 UTC (01:00 EST, whose wall clock 01:00 is before 01:30).
    text = "DTSTART;TZID=America/New_York:20251101T013000\nRRULE:FREQ=DAILY;UNTIL=20251102T060000Z"
    rule = rfc(text)
    expected = ["2025-11-01T05:30:00Z", "2025-11-02T05:30:00Z"]
    assert instants(rule, NEW_YORK, utc(2025, 10, 1)) == expected
    assert dateutil_instants(text, NEW_YORK, utc(2025, 10, 1)) == expected


def test_until_in_utc_with_a_desired_time_start_is_an_instant_too() -> None:
    rule = rfc("FREQ=DAILY;UNTIL=20250330T010000Z", start=datetime(2025, 3, 29, 1, 30))
    assert instants(rule, LONDON, utc(2025, 3, 1)) == ["2025-03-29T01:30:00Z"]
    assert rule.rfc == (
        "DTSTART;TZID=Europe/London:20250329T013000\nRRULE:FREQ=DAILY;UNTIL=20250330T010000Z"
    )


def test_a_local_until_with_a_tzid_start_is_shown_in_utc() -> None:
    # RFC 5545 forbids a local UNTIL after DTSTART;TZID=; it is read as a wall clock in that
    # zone (17:00 BST) and shown as the instant it is.
    rule = rfc(
        "DTSTART;TZID=Europe/London:20260603T170000\nRRULE:FREQ=WEEKLY;UNTIL=20260617T170000"
    )
    assert rule.rfc == (
        "DTSTART;TZID=Europe/London:20260603T170000\nRRULE:FREQ=WEEKLY;UNTIL=20260617T160000Z"
    )
    assert local_days(rule, LONDON, utc(2026, 6, 1)) == [
        "Wed 2026-06-03 17:00",
        "Wed 2026-06-10 17:00",
        "Wed 2026-06-17 17:00",
    ]
    assert instants(rfc(rule.rfc), LONDON, utc(2026, 6, 1)) == instants(
        rule, LONDON, utc(2026, 6, 1)
    )


def test_a_local_until_with_a_floating_start_stays_a_wall_clock() -> None:
    rule = rfc("FREQ=DAILY;UNTIL=20250330T013000", start=datetime(2025, 3, 28, 1, 30))
    assert rule.until == datetime(2025, 3, 30, 1, 30)
    assert rule.rfc == "DTSTART:20250328T013000\nRRULE:FREQ=DAILY;UNTIL=20250330T013000"
    # 01:30 on the 30th is in the gap (the instant 01:30 GMT) and its wall clock is UNTIL's.
    assert instants(rule, LONDON, utc(2025, 3, 1))[-1] == "2025-03-30T01:30:00Z"


def test_check_prints_the_until_instant_after_a_tzid(tmp_path: Path) -> None:
    rule = "DTSTART;TZID=Europe/London:20270326T013000\nRRULE:FREQ=DAILY;UNTIL=20270328T020000"
    result = read(tmp_path, [{"id": "gap", "type": "recurring", "rrule": rule}], now=NOW)
    (entry,) = result.entries
    assert entry.rule is not None
    assert entry.rule.rfc.endswith("RRULE:FREQ=DAILY;UNTIL=20270328T010000Z")
    # 02:00 on 2027-03-28 does not exist; fold=0 makes it 01:00 UTC, and 01:30 that day is the
    # instant 01:30 GMT, after it.
    assert [p.key for p in entry.plan(NOW, HOURS)] == [
        "gap@2027-03-26T01:30:00Z",
        "gap@2027-03-27T01:30:00Z",
    ]


@st.composite
def until_cases(draw: st.DrawFn) -> dict[str, Any]:
    zone = draw(st.sampled_from((LONDON, NEW_YORK, SYDNEY, LORD_HOWE)))
    change = draw(st.sampled_from(transitions(zone) or transitions(LONDON)))
    hours = sorted(draw(st.sets(st.integers(0, 23), min_size=1, max_size=3)))
    minutes = sorted(draw(st.sets(st.sampled_from([0, 15, 30, 45]), min_size=1, max_size=2)))
    start_day = change.astimezone(zone).date() - timedelta(days=draw(st.integers(0, 20)))
    until = change + timedelta(minutes=draw(st.integers(-36 * 60, 36 * 60)))
    return {
        "zone": zone,
        "freq": draw(st.sampled_from(["DAILY", "WEEKLY"])),
        "hours": hours,
        "minutes": minutes,
        "start": datetime.combine(start_day, time(hours[0], minutes[0])),
        "until": until,
        "local_until": draw(st.booleans()),
    }


@settings(max_examples=150, deadline=None)
@given(until_cases())
def test_until_is_compared_as_an_instant_like_dateutil_with_a_zone(case: dict[str, Any]) -> None:
    zone: ZoneInfo = case["zone"]
    line = (
        f"FREQ={case['freq']};BYHOUR={','.join(map(str, case['hours']))};"
        f"BYMINUTE={','.join(map(str, case['minutes']))};UNTIL={case['until']:%Y%m%dT%H%M%SZ}"
    )
    text = f"DTSTART;TZID={zone.key}:{case['start']:%Y%m%dT%H%M%S}\nRRULE:{line}"
    rule = rfc(text, zone=UTC_ZONE)
    after = utc(2020, 1, 1)
    ours = instants(rule, zone, after)
    assert ours == dateutil_instants(text, zone, after)
    assert all(m <= utils.format_utc(case["until"]) for m in ours)
    # What check prints: UNTIL in UTC after the TZID, and it reads back to the same instances.
    assert re.search(r"\nRRULE:.*;UNTIL=\d{8}T\d{6}Z$", rule.rfc)
    assert instants(rfc(rule.rfc, zone=UTC_ZONE), zone, after) == ours
    if case["local_until"]:
        # A local UNTIL after a TZID is that wall clock's instant (fold=0), shown in UTC.
        wall = case["until"].astimezone(zone).replace(tzinfo=None)
        local = rfc(text.replace(f"{case['until']:%Y%m%dT%H%M%SZ}", f"{wall:%Y%m%dT%H%M%S}"))
        assert local.until == utils.as_utc(utils.localize(wall, zone))
        assert "Z" in local.rfc.rsplit("UNTIL=", 1)[1]


# --------------------------------------------------------------------------- gaps keep instances


def test_lord_howe_half_hour_gap_keeps_all_six_instances() -> None:
    # 2026-10-04 02:00 -> 02:30 (+10:30 -> +11:00). 02:15 that day is in the gap: the instant
    # 02:15 +10:30 (02:45 on the clock), after 02:30's instant. Both are instances.
    text = (
        "DTSTART;TZID=Australia/Lord_Howe:20261002T021500\n"
        "RRULE:FREQ=DAILY;BYHOUR=2;BYMINUTE=15,30;COUNT=6"
    )
    rule = rfc(text)
    pairs = utils.expand_rule_walls(rule, LORD_HOWE, utc(2026, 9, 1))
    assert [(f"{w:%m-%d %H:%M}", utils.format_offset(m, LORD_HOWE)) for w, m in pairs] == [
        ("10-02 02:15", "2026-10-02T02:15:00+10:30"),
        ("10-02 02:30", "2026-10-02T02:30:00+10:30"),
        ("10-03 02:15", "2026-10-03T02:15:00+10:30"),
        ("10-03 02:30", "2026-10-03T02:30:00+10:30"),
        ("10-04 02:30", "2026-10-04T02:30:00+11:00"),
        ("10-04 02:15", "2026-10-04T02:45:00+11:00"),
    ]
    assert instants(rule, LORD_HOWE, utc(2026, 9, 1)) == dateutil_instants(
        text, LORD_HOWE, utc(2026, 9, 1)
    )
    # The limit counts instances soonest first, across the reordering.
    assert [
        utils.format_utc(m) for m in utils.expand_rule(rule, LORD_HOWE, utc(2026, 10, 3), 1)
    ] == ["2026-10-03T15:30:00Z"]


@settings(max_examples=150, deadline=None)
@given(
    zone=st.sampled_from((LONDON, NEW_YORK, SYDNEY, LORD_HOWE)),
    hours=st.sets(st.integers(0, 4), min_size=1, max_size=3),
    minutes=st.sets(st.sampled_from([0, 10, 15, 30, 45, 50]), min_size=1, max_size=3),
    days_before=st.integers(0, 3),
    count=st.integers(1, 30),
    data=st.data(),
)
def test_only_exact_duplicate_instants_are_dropped(
    zone: ZoneInfo,
    hours: set[int],
    minutes: set[int],
    days_before: int,
    count: int,
    data: st.DataObject,
) -> None:
    change = data.draw(st.sampled_from(transitions(zone)))
    day = change.astimezone(zone).date() - timedelta(days=days_before)
    start = datetime.combine(day, time(min(hours), min(minutes)))
    line = (
        f"FREQ=DAILY;BYHOUR={','.join(map(str, sorted(hours)))};"
        f"BYMINUTE={','.join(map(str, sorted(minutes)))};COUNT={count}"
    )
    rule = rfc(line, start=start, zone=zone)
    after = utc(2020, 1, 1)
    ours = [utils.as_utc(m) for m in utils.expand_rule(rule, zone, after, 100)]
    # Oracle: dateutil's own wall clocks, each localized (fold=0), duplicates once, sorted.
    walls = list(du_rrule.rrulestr(line, dtstart=start))
    assert len(walls) == count
    assert ours == sorted({utils.as_utc(utils.localize(w, zone)) for w in walls})
    assert all(a < b for a, b in itertools.pairwise(ours))


# --------------------------------------------------------------------------- bounded search


def years_walked(call: Any) -> int:
    """How many distinct calendar years python-dateutil walked while ``call`` ran: a measure
    of the work done (dateutil rebuilds its year tables once per year it walks), not a time."""
    years: set[int] = set()

    def profile(frame: Any, event: str, _arg: Any) -> None:
        code = frame.f_code
        if event == "call" and code.co_name == "rebuild" and "dateutil" in code.co_filename:
            years.add(frame.f_locals["year"])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(previous)
    return len(years)


NEVER = (
    ("FREQ=DAILY;BYSETPOS=2", "it has no instance from 2026-06-01 to 2034-07-28"),
    ("FREQ=DAILY;BYYEARDAY=366;BYMONTH=1", "it has no instance from 2026-06-01 to 2034-07-28"),
    ("FREQ=YEARLY;BYWEEKNO=53;BYMONTH=6", "it has no instance from 2026-06-01 to 2086-07-15"),
    # Days 1 and 2 are never both Mondays: never a third candidate in a month.
    ("FREQ=MONTHLY;BYMONTHDAY=1,2;BYDAY=MO;BYSETPOS=3", None),
    (
        "FREQ=DAILY;BYSETPOS=2;UNTIL=20251231T000000",
        "its UNTIL 2025-12-31 00:00 is before its start 2026-01-01 10:00",
    ),
    (
        "FREQ=WEEKLY;BYSETPOS=3;UNTIL=20251231T000000Z",
        "its UNTIL 2025-12-31T00:00:00Z is before its start 2026-01-01 10:00",
    ),
)


@pytest.mark.parametrize(("line", "why"), [(line, why) for line, why in NEVER if why])
def test_a_rule_that_never_matches_has_no_instance_and_says_why(line: str, why: str) -> None:
    rule = rfc(line, start=datetime(2026, 1, 1, 10, 0))
    after = utc(2026, 6, 1)
    assert utils.expand_rule_walls(rule, LONDON, after) == []
    expected = why if why.startswith("its UNTIL") else why + " (courtbot looks no further ahead)"
    assert utils.describe_no_instance(rule, LONDON, after) == expected


@pytest.mark.parametrize("line", [line for line, _ in NEVER])
def test_a_rule_that_never_matches_is_not_searched_to_the_year_9999(line: str) -> None:
    rule = rfc(line, start=datetime(2026, 1, 1, 10, 0))
    walked = years_walked(lambda: utils.expand_rule(rule, LONDON, utc(2026, 6, 1)))
    # The horizon (8 years after 52 periods; 60 for a yearly rule) and at most 28 more years
    # beyond it, where the shifted calendar runs out at 9999. dateutil alone walks to 9999.
    assert walked <= 60 + 28 + 2


def test_a_rule_whose_instances_have_all_passed() -> None:
    rule = rfc("FREQ=DAILY;COUNT=3", start=datetime(2026, 1, 1, 10, 0))
    assert utils.expand_rule(rule, LONDON, utc(2026, 6, 1)) == []
    assert utils.describe_no_instance(rule, LONDON, utc(2026, 6, 1)) == (
        "its COUNT=3 instances have all passed"
    )
    ended = english("every Tuesday at 07:30 until 2026-06-30", today=date(2026, 6, 1))
    assert utils.expand_rule(ended, LONDON, utc(2026, 7, 1)) == []
    assert utils.describe_no_instance(ended, LONDON, utc(2026, 7, 1)) == (
        "its UNTIL 2026-06-30 23:59 has passed"
    )
    instant = rfc("FREQ=DAILY;UNTIL=20260105T000000Z", start=datetime(2026, 1, 1, 10, 0))
    assert utils.describe_no_instance(instant, LONDON, utc(2026, 6, 1)) == (
        "its UNTIL 2026-01-05T00:00:00Z has passed"
    )
    # A passed "until" of a sentence started today, later than it: no error, no instance.
    late = english("every Tuesday at 07:30 until 2026-06-30", today=date(2026, 7, 1))
    assert utils.describe_no_instance(late, LONDON, utc(2026, 7, 1)) == (
        "its UNTIL 2026-06-30 23:59 is before its start 2026-07-07 07:30"
    )


def test_rare_instances_are_found_within_the_horizon_only() -> None:
    # 29 February on a Monday: 2016, 2044, 2072. Searched 8 years past the periods asked for.
    rule = rfc("FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=MO", start=datetime(2016, 1, 1, 10))
    assert utils.expand_rule(rule, UTC_ZONE, utc(2030, 1, 1), 1) == []
    assert utils.describe_no_instance(rule, UTC_ZONE, utc(2030, 1, 1), 1) == (
        "it has no instance from 2030-01-01 to 2039-01-07 (courtbot looks no further ahead)"
    )
    assert instants(rule, UTC_ZONE, utc(2036, 1, 1), 1) == ["2044-02-29T10:00:00Z"]
    # Every four years, eight across 2100 (no leap year): always found.
    leap = rfc("FREQ=DAILY;BYMONTH=2;BYMONTHDAY=29", start=datetime(2026, 1, 1, 10))
    assert instants(leap, UTC_ZONE, utc(2096, 3, 1), 1) == ["2104-02-29T10:00:00Z"]


def test_a_start_far_ahead_is_searched_from_the_start() -> None:
    rule = rfc("FREQ=YEARLY;BYWEEKNO=53;BYDAY=TH", start=datetime(2040, 1, 1, 10))
    # ISO week 53 of 2043 and 2048, their Thursday.
    assert instants(rule, UTC_ZONE, utc(2026, 6, 1), 2) == [
        "2043-12-31T10:00:00Z",
        "2048-12-31T10:00:00Z",
    ]


BY_PARTS = {
    "DAILY": ["BYMONTH=2", "BYMONTHDAY=29", "BYDAY=MO,FR", "BYMONTH=1,7;BYMONTHDAY=-1"],
    "WEEKLY": ["BYMONTH=2", "BYDAY=SU", "BYDAY=MO,TH;BYSETPOS=-1", "WKST=SU;INTERVAL=2"],
    "MONTHLY": ["BYDAY=5FR", "BYMONTHDAY=-1;BYDAY=SA,SU", "BYDAY=MO,TU;BYSETPOS=3", "BYMONTH=2"],
    "YEARLY": [
        "BYWEEKNO=53",
        "BYWEEKNO=1;BYDAY=MO",
        "BYYEARDAY=60,366",
        "BYMONTH=2;BYMONTHDAY=29",
        "BYMONTH=3;BYDAY=-1SU",
        "BYDAY=20MO",
    ],
}


@settings(max_examples=200, deadline=None)
@given(
    freq=st.sampled_from(sorted(BY_PARTS)),
    data=st.data(),
    start=st.datetimes(datetime(1990, 1, 1), datetime(2060, 12, 31)).map(
        lambda d: d.replace(second=0, microsecond=0)
    ),
    years_later=st.integers(0, 40),
    count=st.none() | st.integers(1, 20),
)
def test_the_bounded_search_finds_what_dateutil_finds(
    freq: str, data: st.DataObject, start: datetime, years_later: int, count: int | None
) -> None:
    # The bounded search runs dateutil on the rule moved to years near 9999 with the same
    # calendars; what it finds must be dateutil's own expansion of the rule where it is.
    parts = data.draw(st.sets(st.sampled_from(BY_PARTS[freq]), max_size=2))
    line = ";".join([f"FREQ={freq}", *sorted(parts)] + ([f"COUNT={count}"] if count else []))
    try:
        rule = rfc(line, start=start, zone=UTC_ZONE)
    except utils.RuleError:
        return  # e.g. a BYMONTHDAY no month of the rule has
    after = datetime(start.year + years_later, 1, 1, tzinfo=UTC)
    ours = [m.replace(tzinfo=None) for m in utils.expand_rule(rule, UTC_ZONE, after, 8)]
    plain = (w for w in rule.rule if w > after.replace(tzinfo=None))
    assert ours == list(itertools.islice(plain, len(ours)))


def test_reload_stays_quick_for_rules_that_never_match(tmp_path: Path) -> None:
    # Through read_schedules, as a reload does: the entry loads, with no instance ahead.
    entries = [
        {"id": f"never-{i}", "type": "recurring", "rrule": line, "desired_time": "2026-01-01 10:00"}
        for i, (line, _) in enumerate(NEVER)
    ]
    result = read(tmp_path, entries, now=NOW)
    assert result.errors == []
    assert [e.plan(NOW, HOURS) for e in result.entries] == [[]] * len(NEVER)


# --------------------------------------------------------------------------- numbered BYDAY


@pytest.mark.parametrize(
    ("line", "day"),
    [
        ("FREQ=WEEKLY;BYDAY=1MO", "1MO"),
        ("FREQ=WEEKLY;BYDAY=MO,-1FR", "-1FR"),
        ("FREQ=DAILY;BYDAY=+2TU", "+2TU"),
        ("freq=daily;byday=1mo", "1mo"),
    ],
)
def test_a_numbered_day_needs_monthly_or_yearly(line: str, day: str) -> None:
    freq = "WEEKLY" if "weekly" in line.lower() else "DAILY"
    days = line.rsplit("=", maxsplit=1)[-1]
    assert rule_error(rfc, line, start=datetime(2026, 6, 1, 9, 0)) == (
        f"{line!r}: BYDAY={days} has a numbered day ({day}), which RFC 5545 allows only with "
        f"FREQ=MONTHLY or YEARLY; e.g. 'FREQ={freq};BYDAY=MO' or 'FREQ=MONTHLY;BYDAY=1MO'"
    )


def test_a_numbered_day_with_byweekno_is_refused() -> None:
    line = "FREQ=YEARLY;BYWEEKNO=20;BYDAY=1MO"
    assert rule_error(rfc, line, start=datetime(2026, 6, 1, 9, 0)) == (
        f"{line!r}: BYDAY=1MO has a numbered day (1MO), which RFC 5545 forbids with BYWEEKNO; "
        "e.g. 'FREQ=YEARLY;BYWEEKNO=20;BYDAY=MO'"
    )


def test_numbered_days_with_monthly_and_yearly_are_kept() -> None:
    monthly = rfc("FREQ=MONTHLY;BYDAY=-1FR", start=datetime(2026, 6, 1, 9, 0))
    assert local_days(monthly, LONDON, utc(2026, 6, 1), 2) == [
        "Fri 2026-06-26 09:00",
        "Fri 2026-07-31 09:00",
    ]
    yearly = rfc("FREQ=YEARLY;BYMONTH=11;BYDAY=4TH", start=datetime(2026, 1, 1, 9, 0))
    assert local_days(yearly, LONDON, utc(2026, 1, 1), 1) == ["Thu 2026-11-26 09:00"]


def test_byeaster_is_not_rfc_5545() -> None:
    line = "FREQ=YEARLY;BYEASTER=0"
    assert rule_error(rfc, line, start=datetime(2026, 1, 1, 9, 0)) == (
        f"{line!r} is not a valid rule (unknown parameter 'BYEASTER'); e.g. {RULE_EXAMPLE}"
    )


# --------------------------------------------------------------------------- weekday, weekend


@pytest.mark.parametrize(
    ("text", "days", "first"),
    [
        ("every weekday at 07:00", "MO,TU,WE,TH,FR", datetime(2026, 6, 1, 7, 0)),
        ("Every Weekdays at 07:00", "MO,TU,WE,TH,FR", datetime(2026, 6, 1, 7, 0)),
        ("every weekend at 09:30", "SA,SU", datetime(2026, 6, 6, 9, 30)),
        ("EVERY WEEKENDS AT 09:30", "SA,SU", datetime(2026, 6, 6, 9, 30)),
    ],
)
def test_every_weekday_and_every_weekend(text: str, days: str, first: datetime) -> None:
    rule = english(text, today=date(2026, 6, 1))  # a Monday
    assert rule.rfc == f"DTSTART:{first:%Y%m%dT%H%M%S}\nRRULE:FREQ=WEEKLY;BYDAY={days}"
    assert rule.start == first


def test_every_weekday_is_monday_to_friday_and_every_weekend_saturday_and_sunday() -> None:
    weekday = english("every weekday at 07:00 until 2026-06-14", today=date(2026, 6, 3))
    assert [d[:3] for d in local_days(weekday, LONDON, utc(2026, 6, 1))] == [
        "Wed", "Thu", "Fri", "Mon", "Tue", "Wed", "Thu", "Fri",
    ]  # fmt: skip
    weekend = english("every weekend at 09:30 starting 2026-06-07", today=date(2026, 6, 1))
    assert local_days(weekend, LONDON, utc(2026, 6, 1), 3) == [
        "Sun 2026-06-07 09:30",
        "Sat 2026-06-13 09:30",
        "Sun 2026-06-14 09:30",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "every other weekday at 07:00 starting 2026-06-01",
        "every other weekend at 07:00 starting 2026-06-01",
        "every weekday and Saturday at 07:00",
        "every weekends and weekdays at 07:00",
    ],
)
def test_weekday_and_weekend_take_no_other_and_no_list(text: str) -> None:
    assert rule_error(english, text) == (
        f"{text!r} is not an English rule I understand; {ENGLISH_EXAMPLE}"
    )


@pytest.mark.parametrize(
    ("word", "code"),
    [
        ("Tues", "TU"),
        ("tues", "TU"),
        ("Weds", "WE"),
        ("WEDS", "WE"),
        ("Thur", "TH"),
        ("Thurs", "TH"),
        ("thurs", "TH"),
    ],
)
def test_the_common_longer_weekday_forms(word: str, code: str) -> None:
    rule = english(f"every {word} at 18:00", today=date(2026, 6, 1))
    assert rule.rfc.endswith(f"\nRRULE:FREQ=WEEKLY;BYDAY={code}")
    assert DAY_CODES[rule.start.weekday()] == code


def test_longer_forms_mix_with_the_others() -> None:
    rule = english("every Tues, Thurs and Sat at 18:00", today=date(2026, 6, 1))
    assert rule.rfc == "DTSTART:20260602T180000\nRRULE:FREQ=WEEKLY;BYDAY=TU,TH,SA"
    assert rule_error(english, "every Thursd at 18:00") == (
        f"'Thursd' is not a weekday (did you mean 'Thursday'?); {ENGLISH_EXAMPLE}"
    )


def test_except_skips_those_dates_and_shows_them_as_exdate() -> None:
    text = "every Wednesday at 17:00 until 2027-01-20 except 2026-12-23, 2026-12-30"
    rule = english(text, today=date(2026, 12, 1))
    assert rule.skip_dates == {date(2026, 12, 23), date(2026, 12, 30)}
    assert rule.rfc == (
        "DTSTART:20261202T170000\n"
        "RRULE:FREQ=WEEKLY;BYDAY=WE;UNTIL=20270120T235959\n"
        "EXDATE:20261223T170000,20261230T170000"
    )
    assert local_days(rule, LONDON, utc(2026, 12, 1)) == [
        "Wed 2026-12-02 17:00",
        "Wed 2026-12-09 17:00",
        "Wed 2026-12-16 17:00",
        "Wed 2027-01-06 17:00",
        "Wed 2027-01-13 17:00",
        "Wed 2027-01-20 17:00",
    ]
    # What check prints reads back (and reads in python-dateutil) to the same instances.
    assert instants(rfc(rule.rfc), LONDON, utc(2026, 12, 1)) == instants(
        rule, LONDON, utc(2026, 12, 1)
    )
    theirs = du_rrule.rrulestr(rule.rfc, forceset=True)
    assert [f"{w:%a %Y-%m-%d %H:%M}" for w in theirs] == local_days(rule, LONDON, utc(2026, 12, 1))


@pytest.mark.parametrize(
    "tail",
    [
        "except 2026-12-23 and 2026-12-30",
        "except 2026-12-30, and 2026-12-23",
        "EXCEPT 2026-12-23,2026-12-30",
        "except 2026-12-23 , 2026-12-30 , 2026-12-23",
    ],
)
def test_except_lists(tail: str) -> None:
    rule = english(f"every Wednesday at 17:00 {tail}", today=date(2026, 12, 1))
    assert rule.skip_dates == {date(2026, 12, 23), date(2026, 12, 30)}
    assert rule.rfc.endswith("\nEXDATE:20261223T170000,20261230T170000")


def test_except_comes_after_the_rest_and_needs_real_dates() -> None:
    assert rule_error(english, "every Friday at 10:00 except 2026-02-30") == (
        "except '2026-02-30' is not a real date (YYYY-MM-DD)"
    )
    for text in (
        "every Friday at 10:00 except 2026-12-25 until 2027-06-30",
        "every Friday at 10:00 except",
        "every Friday at 10:00 except 25 December",
    ):
        assert rule_error(english, text) == (
            f"{text!r} is not an English rule I understand; {ENGLISH_EXAMPLE}"
        )


def test_skipped_instances_do_not_count_towards_the_limit() -> None:
    rule = english("every day at 08:00 except 2026-06-02, 2026-06-04", today=date(2026, 6, 1))
    assert local_days(rule, LONDON, utc(2026, 5, 31), 4) == [
        "Mon 2026-06-01 08:00",
        "Wed 2026-06-03 08:00",
        "Fri 2026-06-05 08:00",
        "Sat 2026-06-06 08:00",
    ]
    assert len(utils.expand_rule(rule, LONDON, utc(2026, 5, 31))) == 52


def test_skip_dates_from_the_caller() -> None:
    rule = english("every Wednesday at 17:00", today=date(2026, 12, 1))
    skip = frozenset({date(2026, 12, 23), date(2026, 12, 24), date(2026, 12, 30)})
    pairs = utils.expand_rule_walls(rule, LONDON, utc(2026, 12, 1), skip=skip)
    assert len(pairs) == 52
    assert [f"{w:%m-%d}" for w, _ in pairs[:4]] == ["12-02", "12-09", "12-16", "01-06"]
    moments = utils.expand_rule(rule, LONDON, utc(2026, 12, 1), 4, skip=skip)
    assert [f"{m:%m-%d}" for m in moments] == ["12-02", "12-09", "12-16", "01-06"]
    # The rule's own dates and the caller's add up.
    both = english("every Wednesday at 17:00 except 2026-12-02", today=date(2026, 12, 1))
    pairs = utils.expand_rule_walls(both, LONDON, utc(2026, 12, 1), 2, skip=skip)
    assert [f"{w:%m-%d}" for w, _ in pairs] == ["12-09", "12-16"]


def test_read_schedules_takes_the_new_sentences(tmp_path: Path) -> None:
    entries = [
        {"id": "early", "type": "recurring", "rrule": "every weekday at 07:00",
         "timezone": "Europe/London"},
        {"id": "xmas", "type": "recurring", "timezone": "Europe/London",
         "rrule": "every Weds and Thurs at 18:00 except 2026-12-24, 2026-12-30"},
    ]  # fmt: skip
    result = read(tmp_path, entries, now=NOW)
    assert result.errors == []
    early, xmas = result.entries
    assert [p.key for p in early.plan(NOW, HOURS)[:6]] == [
        "early@2026-11-24T07:00:00Z",
        "early@2026-11-25T07:00:00Z",
        "early@2026-11-26T07:00:00Z",
        "early@2026-11-27T07:00:00Z",
        "early@2026-11-30T07:00:00Z",
        "early@2026-12-01T07:00:00Z",
    ]
    december = [p.key[5:15] for p in xmas.plan(NOW, HOURS) if p.key[5:12] == "2026-12"]
    assert december == [
        "2026-12-02", "2026-12-03", "2026-12-09", "2026-12-10", "2026-12-16", "2026-12-17",
        "2026-12-23", "2026-12-31",
    ]  # fmt: skip
    assert len(xmas.plan(NOW, HOURS)) == 52


# --------------------------------------------------------------------------- EXDATE


@pytest.mark.parametrize(
    ("lines", "shown", "skipped"),
    [
        (
            "EXDATE:20261224T170000",
            "EXDATE:20261224T170000",
            ["Thu 2026-12-24"],
        ),
        (
            "EXDATE:20261224T170000,20261226T170000",
            "EXDATE:20261224T170000,20261226T170000",
            ["Thu 2026-12-24", "Sat 2026-12-26"],
        ),
        (
            "exdate;tzid=America/New_York:20261224T120000",
            "EXDATE;TZID=America/New_York:20261224T120000",
            ["Thu 2026-12-24"],
        ),
        (
            "EXDATE:20261224T170000Z\nEXDATE:20261226T170000",
            "EXDATE:20261224T170000Z\nEXDATE:20261226T170000",
            ["Thu 2026-12-24", "Sat 2026-12-26"],
        ),
        (
            "EXDATE;VALUE=DATE:20261224,20261225",
            "EXDATE;VALUE=DATE:20261224,20261225",
            ["Thu 2026-12-24", "Fri 2026-12-25"],
        ),
        (
            "EXDATE;VALUE=DATE-TIME:20261224T170000",
            "EXDATE:20261224T170000",
            ["Thu 2026-12-24"],
        ),
        # Matches no instance (16:00 is not the rule's time): nothing skipped.
        ("EXDATE:20261224T160000", "EXDATE:20261224T160000", []),
    ],
)
def test_exdate_forms(lines: str, shown: str, skipped: list[str]) -> None:
    text = f"DTSTART:20261222T170000\nRRULE:FREQ=DAILY;COUNT=6\n{lines}"
    rule = rfc(text)
    assert rule.rfc == f"DTSTART:20261222T170000\nRRULE:FREQ=DAILY;COUNT=6\n{shown}"
    every = ["Tue 2026-12-22", "Wed 2026-12-23", "Thu 2026-12-24", "Fri 2026-12-25",
             "Sat 2026-12-26", "Sun 2026-12-27"]  # fmt: skip
    # RFC 5545: excluded instances still count towards COUNT.
    assert [d[:14] for d in local_days(rule, LONDON, utc(2026, 12, 1))] == [
        d for d in every if d not in skipped
    ]
    assert instants(rfc(rule.rfc), LONDON, utc(2026, 12, 1)) == instants(
        rule, LONDON, utc(2026, 12, 1)
    )


def test_exdate_date_times_agree_with_dateutil() -> None:
    text = (
        "DTSTART:20261214T170000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE,FR;COUNT=8\n"
        "EXDATE:20261223T170000,20261225T170000"
    )
    theirs = [f"{w:%a %Y-%m-%d %H:%M}" for w in du_rrule.rrulestr(text, forceset=True)]
    assert local_days(rfc(text), UTC_ZONE, utc(2026, 12, 1)) == theirs
    assert len(theirs) == 6


def test_exdate_as_a_date_skips_the_whole_day_unlike_dateutil() -> None:
    # python-dateutil reads EXDATE;VALUE=DATE as midnight, which excludes nothing here; the
    # date is meant (CONTRACT: EXDATE lines skip dates as 'skip' does).
    text = "DTSTART:20261222T170000\nRRULE:FREQ=DAILY;COUNT=3\nEXDATE;VALUE=DATE:20261223"
    assert len(list(du_rrule.rrulestr(text, forceset=True))) == 3
    assert local_days(rfc(text), LONDON, utc(2026, 12, 1)) == [
        "Tue 2026-12-22 17:00",
        "Thu 2026-12-24 17:00",
    ]


def test_exdate_with_a_tzid_start_names_the_zone() -> None:
    text = (
        "EXDATE:20270328T013000\n"
        "DTSTART;TZID=Europe/London:20270327T013000\nRRULE:FREQ=DAILY;COUNT=3"
    )
    rule = rfc(text, zone=UTC_ZONE)
    assert rule.rfc == (
        "DTSTART;TZID=Europe/London:20270327T013000\nRRULE:FREQ=DAILY;COUNT=3\n"
        "EXDATE;TZID=Europe/London:20270328T013000"
    )
    # 01:30 on 2027-03-28 is in the gap; the EXDATE is that same instant, 01:30 GMT.
    assert instants(rule, LONDON, utc(2027, 3, 1)) == [
        "2027-03-27T01:30:00Z",
        "2027-03-29T00:30:00Z",
    ]
    assert rule.skip_instants == {utc(2027, 3, 28, 1, 30)}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "EXDATE:20261224",
            "'EXDATE:20261224': '20261224' is not a date-time (YYYYMMDDTHHMMSS, Z after it for "
            "UTC; a date alone needs EXDATE;VALUE=DATE:)",
        ),
        (
            "EXDATE:2026-12-24 17:00",
            "'EXDATE:2026-12-24 17:00': '2026-12-24 17:00' is not a date-time (YYYYMMDDTHHMMSS, "
            "Z after it for UTC; a date alone needs EXDATE;VALUE=DATE:)",
        ),
        (
            "EXDATE:20261232T170000",
            "'EXDATE:20261232T170000': '20261232T170000' is not a date-time (YYYYMMDDTHHMMSS, "
            "Z after it for UTC; a date alone needs EXDATE;VALUE=DATE:)",
        ),
        (
            "EXDATE;VALUE=DATE:20261224T170000",
            "'EXDATE;VALUE=DATE:20261224T170000': '20261224T170000' is not a date (YYYYMMDD)",
        ),
        (
            "EXDATE;TZID=Mars/Base:20261224T170000",
            "'EXDATE;TZID=Mars/Base:20261224T170000': TZID 'Mars/Base' is not an IANA time zone "
            "(e.g. 'Europe/London')",
        ),
        (
            "EXDATE;VALUE=DATE;TZID=Europe/London:20261224",
            "'EXDATE;VALUE=DATE;TZID=Europe/London:20261224': a TZID does not apply to dates "
            "(VALUE=DATE); e.g. 'EXDATE:20261224T170000', "
            "'EXDATE;TZID=Europe/London:20261224T170000,20261231T170000' or "
            "'EXDATE;VALUE=DATE:20261224'",
        ),
        (
            "EXDATE;RANGE=THISANDFUTURE:20261224T170000",
            "'EXDATE;RANGE=THISANDFUTURE:20261224T170000' is not an EXDATE line; e.g. "
            "'EXDATE:20261224T170000', 'EXDATE;TZID=Europe/London:20261224T170000,20261231T170000'"
            " or 'EXDATE;VALUE=DATE:20261224'",
        ),
        (
            "EXDATE 20261224T170000",
            "'EXDATE 20261224T170000' is not an EXDATE line; e.g. 'EXDATE:20261224T170000', "
            "'EXDATE;TZID=Europe/London:20261224T170000,20261231T170000' or "
            "'EXDATE;VALUE=DATE:20261224'",
        ),
    ],
)
def test_exdate_errors(line: str, message: str) -> None:
    text = f"FREQ=DAILY\n{line}"
    assert rule_error(rfc, text, start=datetime(2026, 12, 1, 17, 0)) == message


def test_exdate_errors_name_the_entry(tmp_path: Path) -> None:
    rule = "FREQ=DAILY\nEXDATE:20261224"
    result = read(tmp_path, [{"id": "x", "type": "recurring", "rrule": rule,
                              "desired_time": "2026-12-01 17:00"}])  # fmt: skip
    assert result.errors == [
        "schedules.json entry 'x' (#1): rrule: 'EXDATE:20261224': '20261224' is not a date-time "
        "(YYYYMMDDTHHMMSS, Z after it for UTC; a date alone needs EXDATE;VALUE=DATE:)"
    ]


# --------------------------------------------------------------------------- except: property


@st.composite
def except_cases(draw: st.DrawFn) -> dict[str, Any]:
    case = draw(rule_cases())
    group = draw(st.sampled_from([None, "weekday", "weekend"]))
    if group is not None:
        days = frozenset(range(5)) if group == "weekday" else frozenset({5, 6})
        case = {**case, "daily": False, "other": False, "weekdays": days}
    base = case["now"].astimezone(case["zone"]).date()
    skipped = draw(
        st.frozensets(st.integers(-3, 60).map(lambda d: base + timedelta(days=d)), max_size=12)
    )
    return {**case, "group": group, "skipped": skipped, "longer": draw(st.booleans())}


LONGER = {1: "Tues", 2: "Weds", 3: "Thurs"}


def except_sentence(case: dict[str, Any]) -> str:
    text = sentence(case)
    if case["group"] is not None:
        text = re.sub(r"^Every \S+(?: and \S+)* at", f"Every {case['group']} at", text, flags=re.I)
    elif case["longer"] and not case["daily"]:
        names = [LONGER.get(i, DAY_NAMES[i]) for i in sorted(case["weekdays"])]
        text = re.sub(
            r"^Every (other )?\S+(?: and \S+)* at", rf"Every \g<1>{' and '.join(names)} at", text
        )
    if case["skipped"]:
        text += " except " + ", ".join(str(d) for d in sorted(case["skipped"]))
    return text


@settings(max_examples=150, deadline=None)
@given(except_cases())
def test_sentences_with_except_skip_those_days(case: dict[str, Any]) -> None:
    text = except_sentence(case)
    first = first_day(case)
    if case["until"] is not None and case["until"] < first:
        return  # an error, tested above
    rule = utils.parse_english_rule(text, start=None, today=date(2020, 1, 1))
    zone, now = case["zone"], case["now"]
    expected = [
        m for m in oracle(case, 52 + len(case["skipped"]))
        if m.astimezone(zone).date() not in case["skipped"]
    ][:52]  # fmt: skip
    # The day of a time in a gap is still the day the rule asked for.
    got = [utils.as_utc(m) for m in utils.expand_rule(rule, zone, now)]
    assert got == expected
    # The same through the caller's skip, and through the RFC text check prints.
    plain = utils.parse_english_rule(text.split(" except ")[0], start=None, today=date(2020, 1, 1))
    assert [
        utils.as_utc(m) for m in utils.expand_rule(plain, zone, now, skip=case["skipped"])
    ] == got
    again = utils.parse_rfc_rule(rule.rfc, start=None, zone=zone)
    assert [utils.as_utc(m) for m in utils.expand_rule(again, zone, now)] == got
    assert ("\nEXDATE:" in rule.rfc) == bool(case["skipped"])


# --------------------------------------------------------------------------- HTML pages


@pytest.mark.parametrize(
    ("body", "content_type", "title"),
    [
        (
            b'<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">\n<HTML><HEAD>'
            b"<TITLE>ERROR: The request could not be satisfied</TITLE></HEAD></HTML>",
            "text/html",
            "ERROR: The request could not be satisfied",
        ),
        (b'\xef\xbb\xbf  <!-- waf -->\n<html><title>A &amp; "B"\n\t c</title>', None, "A & 'B' c"),
        (b"<html><body>blocked</body></html>", "application/octet-stream", ""),
        (b"Blocked. <b>Support ID</b>: <title>x</title>", "text/html; charset=utf-8", "x"),
        (b'{"error": "<b>no</b>"}', "application/json", None),
        (b'{"error": "<title>no</title>"}', "text/html", "no"),
        (b"plain text", "text/html", None),
        (b"", "text/html", None),
    ],
)
def test_html_page_tells_an_html_page_and_reads_its_title(
    body: bytes, content_type: str | None, title: str | None
) -> None:
    assert utils.html_page(body, content_type) == title


def test_html_page_cuts_a_long_title_and_folds_control_characters() -> None:
    body = b"<html><title>" + b"\x1b[31m" + b"w" * 200 + b"</title></html>"
    title = utils.html_page(body, None)
    assert title is not None
    assert len(title) == utils.PAGE_TITLE_CHARS and title.endswith("...")
    assert "\x1b" not in title


@st.composite
def stepping_rules(draw: st.DrawFn) -> tuple[str, datetime, datetime]:
    """A rule ``_stepping_days`` takes (daily or weekly, interval 1, plain days), its start and
    a horizon."""
    parts = [draw(st.sampled_from(["FREQ=DAILY", "FREQ=WEEKLY"]))]
    if draw(st.booleans()):
        parts.append("INTERVAL=1")
    days = draw(st.sets(st.sampled_from(DAY_CODES), max_size=7))
    if days:
        parts.append("BYDAY=" + ",".join(sorted(days, key=DAY_CODES.index)))
    if draw(st.booleans()):
        parts.append(f"COUNT={draw(st.integers(1, 60))}")
    if draw(st.booleans()):
        parts.append(f"WKST={draw(st.sampled_from(DAY_CODES))}")
    start = draw(st.datetimes(datetime(2020, 1, 1), datetime(2030, 12, 31)))
    horizon = start + timedelta(days=draw(st.integers(0, 800)), seconds=draw(st.integers(0, 86399)))
    return ";".join(parts), start, horizon


@settings(max_examples=300, deadline=None)
@given(stepping_rules())
def test_stepping_rules_expand_as_dateutil_does(case: tuple[str, datetime, datetime]) -> None:
    text, start, horizon = case
    rule = utils.parse_rfc_rule("RRULE:" + text, start=start, zone=LONDON)
    assert rule.weekdays is not None, text  # taken by the stepping path

    stepped = list(utils._rule_walls(rule, horizon))

    by_dateutil = list(utils._rule_walls(dataclasses.replace(rule, weekdays=None), horizon))
    assert stepped == by_dateutil


@pytest.mark.parametrize(
    "text",
    [
        "FREQ=WEEKLY;INTERVAL=2;BYDAY=MO",
        "FREQ=MONTHLY;BYDAY=1MO",
        "FREQ=WEEKLY;BYDAY=MO;BYHOUR=9,17",
        "FREQ=DAILY;BYMONTH=6",
        "FREQ=WEEKLY;BYDAY=MO;BYSETPOS=1",
    ],
)
def test_other_rules_expand_through_dateutil(text: str) -> None:
    rule = utils.parse_rfc_rule("RRULE:" + text, start=datetime(2026, 1, 5, 17), zone=LONDON)
    assert rule.weekdays is None
    assert utils.expand_rule(rule, LONDON, datetime(2026, 1, 1, tzinfo=UTC), 3)
