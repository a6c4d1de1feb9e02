"""utils.py: zones, desired times, windows and triggers, ids and keys, backoff, Retry-After,
Fernet. Pure functions, so every test passes its own ``now``; nothing sleeps."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet, MultiFernet

import config_loader
import utils
from conftest import NOW, write_json

LONDON = ZoneInfo("Europe/London")
BERLIN = ZoneInfo("Europe/Berlin")
SYDNEY = ZoneInfo("Australia/Sydney")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
UTC_ZONE = ZoneInfo("UTC")

EXPECTED_DESIRED = "expected 'YYYY-MM-DD HH:MM' (e.g. '2026-12-02 17:00')"
EXPECTED_WINDOW = (
    "is not a window; expected '<N>h' (hours, e.g. '168h' or '47.5h') or '<N>d' "
    "(whole calendar days, e.g. '7d')"
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


def _read_one(tmp_path: Path, entry: dict[str, object]) -> config_loader.Entry:
    path = write_json(tmp_path / "schedules.json", [entry])
    result = config_loader.read_schedules(
        path, default_zone="UTC", token_names={"default", "other"}, now=NOW
    )
    assert result.errors == []
    assert result.file_error is None
    assert len(result.entries) == 1
    return result.entries[0]


def test_derived_id_ignores_court_token_duration_and_enabled(tmp_path: Path) -> None:
    base = {
        "type": "recurring",
        "rrule": "every Wednesday at 17:00",
        "timezone": "Europe/London",
    }
    ids = {
        _read_one(tmp_path, {**base, **extra}).id
        for extra in (
            {},
            {"court_id": "3"},
            {"court_id": ["4", 5]},
            {"court_id": None},
            {"token": "other"},
            {"duration_minutes": 90},
            {"enabled": False},
        )
    }
    assert len(ids) == 1
    (only,) = ids
    assert only == utils.derive_schedule_id(
        "recurring", None, "every Wednesday at 17:00", "Europe/London"
    )


def test_derived_id_follows_time_rule_and_zone(tmp_path: Path) -> None:
    base = {"type": "recurring", "rrule": "every Wednesday at 17:00", "timezone": "Europe/London"}
    ids = [
        _read_one(tmp_path, entry).id
        for entry in (
            base,
            {**base, "rrule": "every Wednesday at 18:00"},
            {**base, "timezone": "Europe/Paris"},
            {**base, "desired_time": "2026-12-02 17:00"},
        )
    ]
    assert len(set(ids)) == len(ids)


def test_explicit_id_is_kept(tmp_path: Path) -> None:
    entry = _read_one(
        tmp_path, {"id": "wed-evening", "type": "one-off", "desired_time": "2027-01-06 17:00"}
    )
    assert entry.id == "wed-evening"


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
    assert str(info.value) == f"BOOKING_WINDOW: {text!r} {EXPECTED_WINDOW}"


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
    for value in (
        "",
        "plain-token",
        "gAAAAA",
        "gAAAAAshort",
        token[:40],
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
    with pytest.raises(ValueError, match=rf"BOOKING_WINDOW: '{text}' is longer than a year"):
        utils.parse_window(text)
    assert utils.parse_window("8784h").amount == 8784
