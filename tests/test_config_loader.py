"""config_loader.py: one test per validation rule of schedules.json, tokens.json, the environment
and the request template file.

CONTRACT sections 2, 3 and 5; STYLE "Config errors a person can act on": every error line names
the file, the entry (its id when it has one, always its 1-based position), the key, the value
with ``!r`` and what was expected. The tests assert that text, not just that something failed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import stat
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet

import config_loader
import utils
from config_loader import (
    ENTRY_KEYS,
    SchedulesResult,
    Settings,
    SettingsError,
    read_config,
    read_schedules,
    read_tokens,
    rewrite_tokens_file,
)
from conftest import NOW, make_jwt, write_json
from template import TemplateError

KEYS_TEXT = ", ".join(ENTRY_KEYS)
COURT_EXPECTED = (
    'expected a string, an integer, null (any court) or a list tried in order, e.g. ["3", "4"]'
)
NOTHING_LOADED = "nothing loaded from it, the last good state stays"
TOKENS = {"default", "alice"}

WED = {
    "id": "wed-evening",
    "type": "recurring",
    "rrule": "FREQ=WEEKLY;BYDAY=WE",
    "desired_time": "2026-12-02 17:00",
    "timezone": "Europe/London",
}
MATCH = {"id": "match", "type": "one-off", "desired_time": "2026-12-10 18:00"}
NO_ID = {"type": "one-off", "desired_time": "2026-12-20 10:00", "court_id": "1"}


def schedules(
    data_dir: Path,
    *entries: Any,
    tokens: set[str] = TOKENS,
    zone: str = "UTC",
    now: datetime = NOW,
) -> SchedulesResult:
    """Write ``entries`` as schedules.json and validate it."""
    path = write_json(data_dir / "schedules.json", list(entries))
    return read_schedules(path, default_zone=zone, token_names=set(tokens), now=now)


def only_error(result: SchedulesResult) -> str:
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


def rejected_alone(result: SchedulesResult, *loaded: str) -> None:
    """The other entries still load."""
    assert [e.id for e in result.entries] == list(loaded)
    assert result.file_error is None


# --------------------------------------------------------------------------- the whole file


def test_schedules_not_an_array_rejects_the_whole_file(data_dir: Path) -> None:
    path = write_json(data_dir / "schedules.json", {"id": "wed-evening", "type": "recurring"})
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.file_error == (
        f"schedules.json: expected a JSON array of entries, got an object; {NOTHING_LOADED}"
    )
    assert result.entries == [] and result.errors == []


def test_schedules_not_json_rejects_the_whole_file(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    text = '[\n  {"id": "wed-evening",}\n]\n'
    path.write_text(text)
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    # The position and wording are the json module's (Python 3.13 words this one differently).
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(text)
    where = f"line {parsed.value.lineno} column {parsed.value.colno}: {parsed.value.msg}"
    assert where.startswith("line 2 column ")
    assert result.file_error == f"schedules.json: not valid JSON ({where}); {NOTHING_LOADED}"
    assert result.entries == []


def test_schedules_not_utf8_rejects_the_whole_file(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    path.write_bytes(b'[{"id": "caf\xe9"}]')
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.file_error == (
        f"schedules.json: not UTF-8 text (byte 12: b'\\xe9'); {NOTHING_LOADED}"
    )


def test_schedules_too_large_rejects_the_whole_file(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    # Valid JSON, only too big: the size alone is the reason.
    path.write_bytes(b"[" + b" " * config_loader.MAX_CONFIG_BYTES + b"]")
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.file_error == (
        f"schedules.json: the file is larger than 10 MiB; {NOTHING_LOADED}"
    )


def test_schedules_huge_number_rejects_the_whole_file(data_dir: Path) -> None:
    # Python refuses to turn more than 4300 digits into an int (a ValueError, not a
    # JSONDecodeError): it must be a file error, not an exception.
    path = data_dir / "schedules.json"
    path.write_text('[{"id": "x", "duration_minutes": ' + "9" * 5000 + "}]")
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.file_error == (
        f"schedules.json: not valid JSON (a number in it has too many digits); {NOTHING_LOADED}"
    )


def test_schedules_missing_is_a_warning_and_no_schedules(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.missing and result.file_error is None and result.errors == []
    assert result.warnings == [f"schedules.json: no such file ({path}); no schedules"]


def test_schedules_utf8_bom_is_accepted(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([WED]).encode())
    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)
    assert result.errors == [] and result.file_error is None
    assert [e.id for e in result.entries] == ["wed-evening"]


# --------------------------------------------------------------------------- entries


def test_entry_not_an_object(data_dir: Path) -> None:
    result = schedules(data_dir, WED, "wed-evening", MATCH)
    assert only_error(result) == "schedules.json entry #2: expected an object, got a string " + (
        "('wed-evening')"
    )
    rejected_alone(result, "wed-evening", "match")
    assert result.unknown_rejects == 1


def test_unknown_key_suggests_the_closest_valid_one(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH, {**WED, "cour_id": "3"})
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#2): cour_id: unknown key; did you mean 'court_id'?"
    )
    rejected_alone(result, "match")
    assert result.rejected_ids == {"wed-evening"}


@pytest.mark.parametrize(
    ("key", "suggested"),
    [("durations_minutes", "duration_minutes"), ("timzone", "timezone"), ("skips", "skip")],
)
def test_unknown_key_suggestions(data_dir: Path, key: str, suggested: str) -> None:
    result = schedules(data_dir, MATCH | {key: 1})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): {key}: unknown key; did you mean {suggested!r}?"
    )


def test_unknown_key_like_no_valid_one_lists_them_all(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"colour": "red"})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): colour: unknown key; expected one of {KEYS_TEXT}"
    )


@pytest.mark.parametrize(
    ("key", "shown", "hint"),
    [
        ("", "''", f"expected one of {KEYS_TEXT}"),
        ("court id", "'court id'", "did you mean 'court_id'?"),
        ("id\n", "'id\\n'", "did you mean 'id'?"),
        ("Court_ID", "Court_ID", "did you mean 'court_id'?"),
    ],
)
def test_unknown_key_is_quoted_unless_a_plain_name(
    data_dir: Path, key: str, shown: str, hint: str
) -> None:
    result = schedules(data_dir, MATCH | {key: 1})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): {shown}: unknown key; {hint}"
    )


def test_a_key_given_twice_in_an_entry_rejects_that_entry_alone(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    match = json.dumps(MATCH)
    path.write_text(f'[{match}, {json.dumps(WED)[:-1]}, "court_id": 1, "court_id": 2}}]')

    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)

    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#2): court_id: given twice in this entry; keep one "
        "(JSON would silently use the last, 2)"
    )
    rejected_alone(result, "match")
    assert result.rejected_ids == {"wed-evening"}


def test_an_id_given_twice_is_no_id(data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    rest = json.dumps({k: v for k, v in MATCH.items() if k != "id"})[1:]
    path.write_text(f'[{json.dumps(WED)}, {{"id": "match", "id": "b", "id": "c", {rest}]')

    result = read_schedules(path, default_zone="UTC", token_names=TOKENS, now=NOW)

    assert only_error(result) == (
        "schedules.json entry #2: id: given 3 times in this entry; keep one (JSON would silently "
        "use the last, 'c')"
    )
    rejected_alone(result, "wed-evening")
    # Which entry it is cannot be told: removals are put off, as for an invalid id.
    assert result.unknown_rejects == 1


@pytest.mark.parametrize(
    "bad_id",
    ["wed evening!", "x" * 65, "", "café", "wed/evening", 7, None],
    ids=["chars", "too-long", "empty", "non-ascii", "slash", "number", "null"],
)
def test_bad_id(data_dir: Path, bad_id: Any) -> None:
    result = schedules(data_dir, MATCH, MATCH | {"id": bad_id})
    assert only_error(result) == (
        f"schedules.json entry #2: id: {bad_id!r} is not a valid id; expected 1 to 64 of "
        "A-Z a-z 0-9 _ . - (e.g. 'wed-evening')"
    )
    rejected_alone(result, "match")
    # Its instances cannot be told apart: removals are put off (see test_instances).
    assert result.unknown_rejects == 1


def test_id_of_64_characters_is_fine(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"id": "A-z_0.9" + "x" * 57})
    assert result.errors == []
    assert result.entries[0].id == "A-z_0.9" + "x" * 57


def test_duplicate_explicit_ids(data_dir: Path) -> None:
    result = schedules(data_dir, WED, MATCH, MATCH | {"id": "wed-evening"})
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#3): id: 'wed-evening' is already used by entry #1; "
        "ids must be unique"
    )
    rejected_alone(result, "wed-evening", "match")
    # The first entry of that id is valid: its id is not among the rejected ones.
    assert result.rejected_ids == set()


def test_two_entries_deriving_the_same_id(data_dir: Path) -> None:
    result = schedules(data_dir, WED, NO_ID, NO_ID | {"court_id": "2"})
    derived = utils.derive_schedule_id("one-off", "2026-12-20 10:00", None, None)
    assert only_error(result) == (
        f"schedules.json entry #3: id: this entry derives the same id ({derived!r}) as entry #2 "
        '(same type, desired_time, rrule and timezone); give both an explicit "id"'
    )
    rejected_alone(result, "wed-evening", derived)


def test_derived_id_ignores_court_token_and_duration(data_dir: Path) -> None:
    first = schedules(data_dir, NO_ID).entries[0].id
    edited = NO_ID | {"court_id": [7, 8], "token": "alice", "duration_minutes": 90}
    assert schedules(data_dir, edited).entries[0].id == first
    assert first.startswith("auto-")
    moved = NO_ID | {"desired_time": "2026-12-21 10:00"}
    assert schedules(data_dir, moved).entries[0].id != first


def test_missing_type(data_dir: Path) -> None:
    entry = {k: v for k, v in WED.items() if k != "type"}
    result = schedules(data_dir, entry)
    # Without a type the rule cannot be told to belong: only the type is reported.
    assert result.errors[0] == (
        "schedules.json entry 'wed-evening' (#1): type: missing; expected \"one-off\" or "
        '"recurring"'
    )
    assert len(result.errors) == 1


@pytest.mark.parametrize("bad_type", ["weekly", "One-Off", 1, None, ["one-off"]])
def test_bad_type(data_dir: Path, bad_type: Any) -> None:
    result = schedules(data_dir, MATCH | {"type": bad_type})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): type: {bad_type!r} is not a type; expected "
        '"one-off" or "recurring"'
    )


def test_one_off_missing_desired_time(data_dir: Path) -> None:
    result = schedules(data_dir, {"id": "match", "type": "one-off"})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): desired_time: missing; a one-off entry needs "
        "'YYYY-MM-DD HH:MM'"
    )


EXPECTED_TIME = "expected 'YYYY-MM-DD HH:MM' (e.g. '2026-12-02 17:00')"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2026-02-30 10:00", "is not a real date and time (day is out of range for month); "),
        ("2026-12-10 25:00", "is not a real date and time (hour must be in 0..23); "),
        ("2026-12-10 18:60", "is not a real date and time (minute must be in 0..59); "),
        ("next tuesday", "is not a date and time; "),
        ("10/12/2026 18:00", "is not a date and time; "),
        ("2026-12-10", "is not a date and time; "),
        ("2026-12-10 18:00+25:00", "has an invalid UTC offset '+25:00'; "),
        (1765389600, "is not a string; "),
        (None, "is not a string; "),
    ],
    ids=["feb-30", "25h", "60min", "words", "us-format", "no-time", "offset", "epoch", "null"],
)
def test_bad_desired_time(data_dir: Path, value: Any, problem: str) -> None:
    result = schedules(data_dir, MATCH | {"desired_time": value})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): desired_time: {value!r} {problem}{EXPECTED_TIME}"
    )


@pytest.mark.parametrize(
    ("value", "utc"),
    [
        ("2026-12-10 18:00", "2026-12-10T18:00:00Z"),
        ("2026-12-10T18:00:30", "2026-12-10T18:00:30Z"),
        ("2026-12-10 18:00+02:00", "2026-12-10T16:00:00Z"),
        ("2026-12-10T18:00:00Z", "2026-12-10T18:00:00Z"),
    ],
)
def test_desired_time_formats_accepted(data_dir: Path, value: str, utc: str) -> None:
    result = schedules(data_dir, MATCH | {"desired_time": value, "timezone": "Europe/London"})
    assert result.errors == []
    assert utils.format_utc(result.entries[0].desired_moment) == utc


@pytest.mark.parametrize("value", ["0001-01-01 00:00+01:00", "9999-12-31 23:00-05:00"])
def test_desired_time_out_of_range(data_dir: Path, value: str) -> None:
    # An instant that exists in no UTC year 1-9999 must be an error, not an OverflowError.
    result = schedules(data_dir, MATCH | {"desired_time": value})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): desired_time: {value!r} is out of range "
        "(years 1 to 9999 in UTC and in the entry's zone)"
    )


def test_rrule_on_a_one_off(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"rrule": "FREQ=WEEKLY"})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): rrule: a one-off entry has no rule; use "
        '"type": "recurring" or remove "rrule"'
    )


def test_recurring_without_rrule(data_dir: Path) -> None:
    entry = {k: v for k, v in WED.items() if k != "rrule"}
    result = schedules(data_dir, entry)
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#1): rrule: missing; a recurring entry needs a rule, "
        'e.g. "FREQ=WEEKLY;BYDAY=WE" or "every Wednesday at 17:00"'
    )


@pytest.mark.parametrize("value", ["", "   ", 5, ["FREQ=WEEKLY"], None])
def test_rrule_not_a_rule(data_dir: Path, value: Any) -> None:
    result = schedules(data_dir, WED | {"rrule": value})
    assert only_error(result) == (
        f"schedules.json entry 'wed-evening' (#1): rrule: {value!r} is not a rule; "
        'e.g. "FREQ=WEEKLY;BYDAY=WE" or "every Wednesday at 17:00"'
    )


def test_rrule_invalid_freq(data_dir: Path) -> None:
    # STYLE.md's own example.
    result = schedules(data_dir, MATCH, WED | {"rrule": "FREQ=WEEKY"})
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#2): rrule: 'FREQ=WEEKY' is not a valid rule "
        "('FREQ=WEEKY': FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY); "
        'e.g. "FREQ=WEEKLY;BYDAY=WE" or "every Wednesday at 17:00"'
    )
    rejected_alone(result, "match")


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ("FREQ=HOURLY", "FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY"),
        ("FREQ=WEEKLY;BYDAY=XX", "is not a valid rule (invalid 'BYDAY': XX)"),
        ("FREQ=WEEKLY;BYDAY", "'BYDAY' is not NAME=VALUE"),
        ("FREQ=WEEKLY;INTERVAL=0", "INTERVAL '0' must be a whole number of at least 1"),
        ("FREQ=WEEKLY;COUNT=3;UNTIL=20270101T000000", "COUNT and UNTIL cannot both be given"),
        ("RRULE:FREQ=DAILY\nRRULE:FREQ=WEEKLY", "must hold exactly one rule line"),
        ("DTSTART:20260230T170000\nRRULE:FREQ=WEEKLY", "is not a real date and time"),
        ("DTSTART:20261203T170000\nRRULE:FREQ=WEEKLY", "disagree; give the start once"),
        ("every funday at 17:00", "'funday' is not a weekday (did you mean 'Sunday'?)"),
        ("every day at noon", "'at noon' is not a time of day: write it as HH:MM"),
        ("every sometimes at 17:00", "is not an English rule I understand"),
        ("every wednesday at 25:00", "25:00 in 'every wednesday at 25:00' is not a time of day"),
    ],
)
def test_rrule_invalid(data_dir: Path, rule: str, fragment: str) -> None:
    result = schedules(data_dir, WED | {"rrule": rule})
    error = only_error(result)
    assert error.startswith("schedules.json entry 'wed-evening' (#1): rrule: ")
    assert fragment in error


@pytest.mark.parametrize(
    ("rule", "zone"),
    [
        ("DTSTART:00010101T000000Z\nRRULE:FREQ=YEARLY", "America/New_York"),
        ("DTSTART:99991225T200000\nRRULE:FREQ=DAILY", "America/New_York"),
    ],
    ids=["starts-before-year-1", "runs-past-9999"],
)
def test_rrule_out_of_range(data_dir: Path, rule: str, zone: str) -> None:
    # Such a rule must be an error here, not an OverflowError here or while reconciling.
    entry = {"id": "w", "type": "recurring", "rrule": rule, "timezone": zone}
    result = schedules(data_dir, entry, MATCH)
    assert only_error(result) == (
        f"schedules.json entry 'w' (#1): rrule: {rule!r} holds a date out of range (years 1 to "
        "9999 in UTC and in the entry's zone)"
    )
    rejected_alone(result, "match")
    assert result.rejected_ids == {"w"}


def test_rrule_needs_a_start(data_dir: Path) -> None:
    entry = {k: v for k, v in WED.items() if k != "desired_time"}
    result = schedules(data_dir, entry)
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#1): rrule: 'FREQ=WEEKLY;BYDAY=WE' has no start: "
        "add a 'desired_time' (the first possible date and time of day) or a DTSTART line"
    )


def test_rrule_every_other_needs_a_start(data_dir: Path) -> None:
    entry = {"id": "fri", "type": "recurring", "rrule": "every other Friday at 10:00"}
    result = schedules(data_dir, entry)
    assert only_error(result) == (
        "schedules.json entry 'fri' (#1): rrule: 'every other Friday at 10:00': 'every other' "
        "needs a start date to count weeks from; add 'starting YYYY-MM-DD' "
        "(e.g. 'every other Friday at 10:00 starting 2025-08-03')"
    )


@pytest.mark.parametrize("zone", ["Mars/Olympus", "europe/london", "", " UTC", 1, None])
def test_timezone_unknown(data_dir: Path, zone: Any) -> None:
    result = schedules(data_dir, MATCH | {"timezone": zone})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): timezone: {zone!r} is not an IANA time zone "
        "(e.g. 'Europe/London')"
    )


def test_booking_timezone_applies_to_entries_without_one(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH, zone="America/New_York")
    assert result.entries[0].timezone == "America/New_York"
    assert utils.format_utc(result.entries[0].desired_moment) == "2026-12-10T23:00:00Z"


def test_timezone_key_disagreeing_with_dtstart_tzid(data_dir: Path) -> None:
    rule = "DTSTART;TZID=Europe/London:20261202T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE"
    entry = {"id": "wed-evening", "type": "recurring", "rrule": rule, "timezone": "Europe/Paris"}
    result = schedules(data_dir, entry)
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#1): timezone: 'Europe/Paris' disagrees with the "
        "rule's DTSTART;TZID=Europe/London; give the zone once"
    )


def test_dtstart_tzid_sets_the_zone(data_dir: Path) -> None:
    rule = "DTSTART;TZID=Europe/London:20270602T170000\nRRULE:FREQ=WEEKLY;BYDAY=WE"
    agreeing = {"id": "a", "type": "recurring", "rrule": rule, "timezone": "Europe/London"}
    silent = {"id": "b", "type": "recurring", "rrule": rule}
    result = schedules(data_dir, agreeing, silent)
    assert result.errors == []
    for entry in result.entries:
        assert entry.timezone == "Europe/London"
        # 17:00 BST in June.
        assert utils.format_utc(entry.starts(NOW, 1)[0]) == "2027-06-02T16:00:00Z"


def test_dtstart_tzid_unknown(data_dir: Path) -> None:
    rule = "DTSTART;TZID=Mars/Base:20261202T170000\nRRULE:FREQ=WEEKLY"
    result = schedules(data_dir, {"id": "w", "type": "recurring", "rrule": rule})
    assert only_error(result) == (
        "schedules.json entry 'w' (#1): rrule: 'DTSTART;TZID=Mars/Base:20261202T170000': TZID "
        "'Mars/Base' is not an IANA time zone (e.g. 'Europe/London')"
    )


@pytest.mark.parametrize(
    ("court", "courts", "text"),
    [
        ("3", ("3",), "3"),
        (3, ("3",), "3"),
        (None, (None,), None),
        (["3", 4], ("3", "4"), "3, 4"),
        ("Centre Court", ("Centre Court",), "Centre Court"),
    ],
    ids=["string", "int", "null", "list", "name"],
)
def test_court_id_accepted(
    data_dir: Path, court: Any, courts: tuple[str | None, ...], text: str | None
) -> None:
    result = schedules(data_dir, MATCH | {"court_id": court})
    assert result.errors == []
    assert result.entries[0].courts == courts
    assert result.entries[0].court_text == text


def test_court_id_absent_means_any_court(data_dir: Path) -> None:
    entry = schedules(data_dir, MATCH).entries[0]
    assert entry.courts == (None,) and entry.court_text is None


@pytest.mark.parametrize(
    ("court", "problem"),
    [
        ([], "an empty list; give one or more courts, or null for any court"),
        ([["3"]], "[['3']]: every court in a list must be a string or integer"),
        (["3", None], "['3', None]: every court in a list must be a string or integer"),
        (["3", True], "['3', True]: every court in a list must be a string or integer"),
        (["3", 3], "['3', 3] lists a court twice"),
        (True, f"True is not a court; {COURT_EXPECTED}"),
        (False, f"False is not a court; {COURT_EXPECTED}"),
        ({"id": 3}, f"{{'id': 3}} is not a court; {COURT_EXPECTED}"),
        (3.5, f"3.5 is not a court; {COURT_EXPECTED}"),
        ("", f"'' is not a court; {COURT_EXPECTED}"),
        (" 3", f"' 3' is not a court; {COURT_EXPECTED}"),
        ("x" * 65, f"{'x' * 65!r} is not a court; {COURT_EXPECTED}"),
    ],
    ids=[
        "empty-list",
        "nested",
        "null-in-list",
        "bool-in-list",
        "twice",
        "true",
        "false",
        "object",
        "float",
        "empty",
        "blank",
        "too-long",
    ],
)
def test_court_id_rejected(data_dir: Path, court: Any, problem: str) -> None:
    result = schedules(data_dir, WED, MATCH | {"court_id": court})
    assert only_error(result) == f"schedules.json entry 'match' (#2): court_id: {problem}"
    rejected_alone(result, "wed-evening")


@pytest.mark.parametrize(
    "court",
    ["3\r\n2026-11-23T12:00:00.000Z ERROR forged", "3\x1b[2J", "3\x85", ["1", "2\n3"]],
    ids=["crlf", "escape", "c1", "in-list"],
)
def test_court_id_with_a_control_character_is_rejected(data_dir: Path, court: Any) -> None:
    result = schedules(data_dir, WED, MATCH | {"court_id": court})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#2): court_id: {court!r} holds a control character (a "
        "line break, tab, ...); a court is one line of text"
    )
    rejected_alone(result, "wed-evening")


@pytest.mark.parametrize("zone", ["Europe/London\r\nforged", "UTC\x00"])
def test_timezone_with_a_control_character_is_rejected(data_dir: Path, zone: str) -> None:
    result = schedules(data_dir, MATCH | {"timezone": zone})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): timezone: {zone!r} is not an IANA time zone "
        "(e.g. 'Europe/London')"
    )


# --------------------------------------------------------------------------- skip


def test_skip_dates_make_no_instance_and_the_rule_keeps_its_count(data_dir: Path) -> None:
    result = schedules(data_dir, WED | {"skip": ["2026-12-09", "2026-12-23", "2020-01-01"]})
    (entry,) = result.entries
    assert entry.skip == {date(2026, 12, 9), date(2026, 12, 23), date(2020, 1, 1)}
    starts = entry.starts(NOW)
    assert [f"{s:%m-%d}" for s in starts[:4]] == ["12-02", "12-16", "12-30", "01-06"]
    assert len(starts) == utils.INSTANCES_PER_RULE
    # A new "now" expands afresh, skipping too.
    later = entry.starts(NOW + timedelta(days=1), limit=2)
    assert [f"{s:%m-%d}" for s in later] == ["12-02", "12-16"]


def test_skip_changes_the_entry_fingerprint(data_dir: Path) -> None:
    plain = schedules(data_dir, WED).entries[0]
    skipping = schedules(data_dir, WED | {"skip": ["2026-12-09"]}).entries[0]
    assert plain.fingerprint != skipping.fingerprint


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-12-09", "'2026-12-09' is not a list of dates"),
        (["2026-12-32"], "'2026-12-32' is not a date 'YYYY-MM-DD'"),
        (["9 Dec 2026"], "'9 Dec 2026' is not a date 'YYYY-MM-DD'"),
        ([20261209], "20261209 is not a date 'YYYY-MM-DD'"),
        (["2026-12-09T17:00"], "'2026-12-09T17:00' is not a date 'YYYY-MM-DD'"),
    ],
)
def test_skip_must_be_a_list_of_dates(data_dir: Path, value: Any, message: str) -> None:
    result = schedules(data_dir, MATCH, WED | {"skip": value})
    assert only_error(result) == (
        f"schedules.json entry 'wed-evening' (#2): skip: {message}; expected e.g. "
        '["2026-12-24", "2026-12-31"]'
    )
    rejected_alone(result, "match")


def test_skip_on_a_one_off_is_an_error(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"skip": ["2026-12-10"]})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): skip: a one-off has no dates to skip; remove "
        '"skip" (or set "enabled": false)'
    )


# --------------------------------------------------------------------------- overlaps


def test_entries_booking_overlapping_times_are_warned_about(data_dir: Path) -> None:
    overlapping = {
        "id": "wed-doubles",
        "type": "one-off",
        "desired_time": "2026-12-09 17:30",
        "timezone": "Europe/London",
        "duration_minutes": 90,
    }
    after = {"id": "after", "type": "one-off", "desired_time": "2026-12-16 18:00"}
    result = schedules(data_dir, WED, after, overlapping)
    assert result.errors == []
    assert result.warnings == [
        "schedules.json: entries 'wed-evening' (#1) and 'wed-doubles' (#3) would book "
        "overlapping times: Wed 2026-12-09 17:00-18:00 GMT and Wed 2026-12-09 17:30-19:00 GMT; "
        "that is two courts booked and paid for: if one is enough, keep one entry (a list in "
        "court_id tries several courts in order)"
    ]


def test_two_rules_booking_the_same_slot_count_every_overlap(data_dir: Path) -> None:
    twin = WED | {"id": "wed-twin", "court_id": "4"}
    result = schedules(data_dir, WED, twin)
    (warning,) = result.warnings
    assert warning.startswith(
        "schedules.json: entries 'wed-evening' (#1) and 'wed-twin' (#2) would book overlapping "
        "times: Wed 2026-12-02 17:00-18:00 GMT and Wed 2026-12-02 17:00-18:00 GMT "
        "(and 51 more time(s));"
    )


def test_disabled_or_past_entries_do_not_overlap(data_dir: Path) -> None:
    twin = WED | {"id": "wed-twin", "enabled": False}
    past = {"id": "past", "type": "one-off", "desired_time": "2026-11-18 17:00"}
    past_twin = past | {"id": "past-twin"}
    result = schedules(data_dir, WED, twin, past, past_twin)
    assert [w for w in result.warnings if "overlapping" in w] == []


def test_more_overlapping_pairs_than_a_person_reads_are_one_summary(data_dir: Path) -> None:
    """Seven entries at one time are 21 pairs, one more than are listed: one warning names how
    many entries overlap and the first three with a partner each."""
    many = [MATCH | {"id": f"m{i}"} for i in range(7)]
    result = schedules(data_dir, *many)
    assert result.warnings == [
        "schedules.json: 7 entries would book overlapping times with another entry at the same "
        "club (more than 20 pairs), e.g. 'm0' (#1) and 'm6' (#7) (Thu 2026-12-10 18:00-19:00 "
        "UTC and Thu 2026-12-10 18:00-19:00 UTC); 'm1' (#2) and 'm6' (#7) (Thu 2026-12-10 "
        "18:00-19:00 UTC and Thu 2026-12-10 18:00-19:00 UTC); 'm2' (#3) and 'm6' (#7) (Thu "
        "2026-12-10 18:00-19:00 UTC and Thu 2026-12-10 18:00-19:00 UTC); that is two courts "
        "booked and paid for each time: if one is enough, keep one entry (a list in court_id "
        "tries several courts in order)"
    ]
    assert len(schedules(data_dir, *many[:6]).warnings) == 15  # 15 pairs: a line each


def test_thousands_of_overlapping_entries_cost_work_linear_in_their_slots(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2,000 weekly entries at one time (104,000 slots, 2 million pairs): the sweep stops at the
    21st pair, the summary counts with binary searches, and the cache's index does the same."""
    recorded: list[int] = []
    sweep = config_loader._sweep

    def counting(slots: list[Any], record: Any) -> None:
        def counted(a: Any, b: Any) -> None:
            recorded.append(1)
            record(a, b)

        sweep(slots, counted)

    monkeypatch.setattr(config_loader, "_sweep", counting)
    many = [WED | {"id": f"w{i}"} for i in range(2000)]
    fresh = schedules(data_dir, *many)
    assert len(fresh.warnings) == 1
    assert fresh.warnings[0].startswith(
        "schedules.json: 2000 entries would book overlapping times with another entry"
    )
    most = config_loader.MAX_OVERLAP_PAIRS + 1  # a sweep's records before it stops
    assert len(recorded) <= most  # not 2 million
    cache = config_loader.EntryCache()
    for _ in range(2):  # the first read fills the cache, the second uses its index
        assert cached(data_dir, cache, *many).warnings == fresh.warnings
    assert len(recorded) <= 3 * most  # the first cached read sweeps afresh, the next the index


# --------------------------------------------------------------------------- token expiry


def test_a_jwt_that_expires_before_a_trigger_is_warned_about(
    data_dir: Path, fernet: MultiFernet, fernet_key: str
) -> None:
    expires = NOW + timedelta(days=10)  # 2026-12-03 12:00 UTC
    write_json(data_dir / "tokens.json", {"default": make_jwt({"exp": expires.timestamp()})})
    write_json(data_dir / "schedules.json", [WED])
    settings = Settings.from_env({"DATA_DIR": str(data_dir), "FERNET_KEY": fernet_key})
    config = read_config(settings, fernet, NOW)
    assert config.errors == []
    assert config.warnings == [
        "tokens.json token 'default': a JWT that expires 2026-12-03T12:00:00Z, before the "
        "trigger of 50 booking(s), the first wed-evening@2026-12-16T17:00:00Z (window opens "
        "2026-12-09T17:00:00Z): the club would reject it then; put a fresh token in "
        "tokens.json before that"
    ]
    token = (data_dir / "tokens.json").read_text().split('"')[3]
    assert all(token not in warning for warning in config.warnings)


def test_an_object_token_holding_a_jwt_is_checked_too(
    data_dir: Path, fernet: MultiFernet, fernet_key: str
) -> None:
    expires = NOW + timedelta(days=10)
    value = {"email": "me@example.org", "token": make_jwt({"exp": expires.timestamp()})}
    write_json(data_dir / "tokens.json", {"default": value})
    write_json(data_dir / "schedules.json", [WED])
    settings = Settings.from_env({"DATA_DIR": str(data_dir), "FERNET_KEY": fernet_key})
    (warning,) = read_config(settings, fernet, NOW).warnings
    assert warning.startswith(
        "tokens.json token 'default': a JWT that expires 2026-12-03T12:00:00Z, before the "
        "trigger of 50 booking(s)"
    )


def test_a_jwt_that_outlives_every_trigger_or_no_jwt_is_not_warned_about(
    data_dir: Path, fernet: MultiFernet, fernet_key: str
) -> None:
    far = NOW + timedelta(days=3 * 366)
    write_json(
        data_dir / "tokens.json",
        {"default": make_jwt({"exp": int(far.timestamp())}), "alice": "opaque-token"},
    )
    write_json(data_dir / "schedules.json", [WED, WED | {"id": "a", "token": "alice"}])
    settings = Settings.from_env({"DATA_DIR": str(data_dir), "FERNET_KEY": fernet_key})
    assert [w for w in read_config(settings, fernet, NOW).warnings if "JWT" in w] == []


def test_token_not_in_tokens_json_lists_the_names(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"token": "bob"})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): token: 'bob' is not in tokens.json "
        "(it has: 'alice', 'default')"
    )


def test_default_token_missing_when_tokens_json_is_empty(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH, tokens=set())
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): token: 'default' is not in tokens.json (it has: none)"
    )


@pytest.mark.parametrize("token", [5, "", None, ["alice"]])
def test_token_not_a_name(data_dir: Path, token: Any) -> None:
    result = schedules(data_dir, MATCH | {"token": token})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): token: {token!r} is not a token name; expected a "
        "name from tokens.json"
    )


def test_token_name_with_a_control_character_is_rejected(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"token": "alice\nforged"}, tokens={"alice\nforged"})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): token: 'alice\\nforged' holds a control character "
        "(a line break, tab, ...); expected a name from tokens.json"
    )


@pytest.mark.parametrize("duration", [0, -5, 1.5, "60", True, 60.0, None])
def test_duration_minutes_not_a_positive_integer(data_dir: Path, duration: Any) -> None:
    result = schedules(data_dir, MATCH | {"duration_minutes": duration})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): duration_minutes: {duration!r} is not a positive "
        "whole number of minutes"
    )


def test_duration_minutes_longer_than_a_day(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"duration_minutes": 24 * 60 + 1})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): duration_minutes: 1441 is longer than a day"
    )


def test_duration_minutes_default_and_value(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH, MATCH | {"id": "long", "duration_minutes": 90})
    assert [e.duration_minutes for e in result.entries] == [60, 90]


@pytest.mark.parametrize("enabled", ["yes", "false", 0, 1, None])
def test_enabled_not_a_boolean(data_dir: Path, enabled: Any) -> None:
    result = schedules(data_dir, MATCH | {"enabled": enabled})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): enabled: {enabled!r} is not true or false"
    )


def test_one_off_in_the_past_is_a_warning_and_never_planned(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"desired_time": "2026-11-01 10:00"})
    assert result.errors == []
    assert result.warnings == [
        "schedules.json entry 'match' (#1): desired_time: '2026-11-01 10:00' is in the past; "
        "skipped, never booked"
    ]
    assert result.entries[0].plan(NOW, utils.Window(168, "h")) == []


def test_one_off_in_a_dst_gap_is_a_warning(data_dir: Path) -> None:
    entry = MATCH | {"desired_time": "2027-03-28 01:30", "timezone": "Europe/London"}
    result = schedules(data_dir, entry)
    assert result.errors == []
    assert result.warnings == [
        "schedules.json entry 'match' (#1): desired_time: 2027-03-28 01:30 does not exist in "
        "Europe/London (DST gap): it is taken as 02:30 BST (2027-03-28T01:30:00Z)"
    ]
    planned = result.entries[0].plan(NOW, utils.Window(168, "h"))
    assert [p.key for p in planned] == ["match@2027-03-28T01:30:00Z"]


def test_one_off_in_a_dst_overlap_is_a_warning_first_occurrence(data_dir: Path) -> None:
    entry = MATCH | {"desired_time": "2027-10-31 01:30", "timezone": "Europe/London"}
    result = schedules(data_dir, entry)
    assert result.errors == []
    assert result.warnings == [
        "schedules.json entry 'match' (#1): desired_time: 2027-10-31 01:30 happens twice in "
        "Europe/London (DST overlap): the first one is taken (01:30 BST, 2027-10-31T00:30:00Z)"
    ]


def test_several_errors_in_one_entry_are_all_reported(data_dir: Path) -> None:
    entry = WED | {"cour_id": "3", "duration_minutes": 0, "enabled": "yes", "token": "bob"}
    result = schedules(data_dir, MATCH, entry, NO_ID)
    where = "schedules.json entry 'wed-evening' (#2)"
    assert result.errors == [
        f"{where}: cour_id: unknown key; did you mean 'court_id'?",
        f"{where}: token: 'bob' is not in tokens.json (it has: 'alice', 'default')",
        f"{where}: duration_minutes: 0 is not a positive whole number of minutes",
        f"{where}: enabled: 'yes' is not true or false",
    ]
    assert all("\n" not in error for error in result.errors)
    rejected_alone(
        result, "match", utils.derive_schedule_id("one-off", "2026-12-20 10:00", None, None)
    )


def test_errors_of_several_entries_name_each_position(data_dir: Path) -> None:
    result = schedules(
        data_dir,
        MATCH,
        MATCH | {"id": "a", "court_id": []},
        {"type": "one-off", "desired_time": "2026-12-21 10:00", "court_id": []},
        MATCH | {"id": "b", "enabled": 1},
    )
    assert result.errors == [
        "schedules.json entry 'a' (#2): court_id: an empty list; give one or more courts, or "
        "null for any court",
        "schedules.json entry #3: court_id: an empty list; give one or more courts, or null for "
        "any court",
        "schedules.json entry 'b' (#4): enabled: 1 is not true or false",
    ]
    rejected_alone(result, "match")


def test_valid_entries_are_typed(data_dir: Path) -> None:
    result = schedules(data_dir, WED | {"court_id": ["3", "4"], "token": "alice"}, MATCH)
    assert result.errors == [] and result.warnings == []
    wed, match = result.entries
    assert (wed.id, wed.position, wed.type, wed.timezone) == (
        "wed-evening",
        1,
        "recurring",
        "Europe/London",
    )
    assert (wed.courts, wed.token, wed.duration_minutes, wed.enabled) == (
        ("3", "4"),
        "alice",
        60,
        True,
    )
    assert wed.rule is not None and "RRULE:FREQ=WEEKLY;BYDAY=WE" in wed.rule.rfc
    assert (match.position, match.type, match.timezone, match.token) == (
        2,
        "one-off",
        "UTC",
        "default",
    )
    assert match.rule is None


# --------------------------------------------------------------------------- tokens.json


def tokens_file(data_dir: Path, value: Any) -> Path:
    return write_json(data_dir / "tokens.json", value)


def test_tokens_not_an_object_rejects_the_whole_file(data_dir: Path, fernet: MultiFernet) -> None:
    result = read_tokens(tokens_file(data_dir, ["tok"]), fernet)
    assert result.file_error == (
        f'tokens.json: expected a JSON object {{"name": "token"}}, got an array; {NOTHING_LOADED}'
    )
    assert result.tokens == {}


def test_tokens_not_an_object_never_echoes_the_value(data_dir: Path, fernet: MultiFernet) -> None:
    result = read_tokens(tokens_file(data_dir, "tok-plain-secret"), fernet)
    assert result.file_error == (
        f'tokens.json: expected a JSON object {{"name": "token"}}, got a string; {NOTHING_LOADED}'
    )


def test_tokens_not_json_rejects_the_whole_file(data_dir: Path, fernet: MultiFernet) -> None:
    path = data_dir / "tokens.json"
    path.write_text("{'default': 'tok'}")
    result = read_tokens(path, fernet)
    assert result.file_error == (
        "tokens.json: not valid JSON (line 1 column 2: Expecting property name enclosed in double "
        f"quotes); {NOTHING_LOADED}"
    )


def test_tokens_missing_is_a_warning(data_dir: Path, fernet: MultiFernet) -> None:
    path = data_dir / "tokens.json"
    result = read_tokens(path, fernet)
    assert result.missing and result.file_error is None and result.errors == []
    assert result.warnings == [f"tokens.json: no such file ({path}); no tokens loaded"]


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (123456789, "a number"),
        (True, "a boolean"),
        (None, "null"),
        (["tok"], "an array"),
        ("", "an empty string"),
        ("   ", "an empty string"),
    ],
)
def test_token_not_a_string_is_an_error_for_that_token(
    data_dir: Path, fernet: MultiFernet, value: Any, got: str
) -> None:
    result = read_tokens(tokens_file(data_dir, {"default": value, "alice": "tok-a"}), fernet)
    assert result.errors == [
        "tokens.json token 'default': expected the token as a non-empty string or an object "
        f"of strings, got {got}"
    ]
    assert result.tokens["default"].encrypted is None
    assert result.tokens["default"].error
    assert result.tokens["alice"].error is None and result.tokens["alice"].encrypted
    # A value in the token's place is never echoed (it may be the token itself).
    if value not in (None, True):
        assert repr(value) not in result.errors[0]


@pytest.mark.parametrize("name", ["", "n" * 129])
def test_token_name_length(data_dir: Path, fernet: MultiFernet, name: str) -> None:
    result = read_tokens(tokens_file(data_dir, {name: "tok", "alice": "tok-a"}), fernet)
    assert result.errors == [
        f"tokens.json token {name!r}: a token name must be 1 to 128 characters"
    ]
    assert set(result.tokens) == {"alice"}


def test_token_that_is_not_text_is_an_error_for_that_token(
    data_dir: Path, fernet: MultiFernet
) -> None:
    # JSON can spell an unpaired UTF-16 surrogate; such a string cannot be encrypted or stored.
    path = data_dir / "tokens.json"
    path.write_text('{"default": "tok\\ud800", "alice": "tok-a"}')
    result = read_tokens(path, fernet)
    assert result.errors == [
        "tokens.json token 'default': the value is not valid text (it holds an unpaired "
        "surrogate such as \\ud800); put the token in as it is"
    ]
    assert result.tokens["default"].encrypted is None
    assert result.tokens["alice"].encrypted is not None


def test_token_name_that_is_not_text_is_an_error(data_dir: Path, fernet: MultiFernet) -> None:
    path = data_dir / "tokens.json"
    path.write_text('{"de\\udc80fault": "tok", "alice": "tok-a"}')
    result = read_tokens(path, fernet)
    assert result.errors == [
        "tokens.json token 'de\\udc80fault': a token name must be 1 to 128 characters of text"
    ]
    assert set(result.tokens) == {"alice"}


def test_a_token_with_a_control_character_is_an_error_that_never_shows_it(
    data_dir: Path, fernet: MultiFernet
) -> None:
    encrypted = fernet.encrypt(b"tok-Enc\tSecret-d4").decode()
    path = tokens_file(
        data_dir,
        {"default": "tok-Line\nBreak-9f", "enc": encrypted, "c1": "tok\x85x", "alice": "tok-a"},
    )
    result = read_tokens(path, fernet)
    assert result.errors == [
        f"tokens.json token {name!r}: the token holds a control character (a line break, tab, "
        "...), which cannot be sent in a header; put the token in as one line"
        for name in ("default", "enc", "c1")
    ]
    for name in ("default", "enc", "c1"):
        assert result.tokens[name].encrypted is None
        assert result.tokens[name].rewrite is False
    assert result.tokens["default"].error == result.errors[0]
    assert result.tokens["alice"].encrypted is not None
    text = "\n".join(result.errors)
    for part in ("tok-Line", "Break-9f", "tok-Enc", "Secret-d4", "tok\x85x"):
        assert part not in text


def test_a_token_name_with_a_control_character_is_an_error(
    data_dir: Path, fernet: MultiFernet
) -> None:
    result = read_tokens(tokens_file(data_dir, {"de\nfault": "tok", "alice": "tok-a"}), fernet)
    assert result.errors == [
        "tokens.json token 'de\\nfault': a token name must not hold control characters (line "
        "breaks, tabs, ...)"
    ]
    assert set(result.tokens) == {"alice"}


def test_a_token_name_given_twice_is_an_error_for_that_token_and_the_file_is_kept(
    data_dir: Path, fernet: MultiFernet
) -> None:
    path = data_dir / "tokens.json"
    path.write_text('{"default": "tok-one", "alice": "tok-a", "default": "tok-two"}')

    result = read_tokens(path, fernet)

    assert result.errors == [
        "tokens.json token 'default': given twice in the file; keep one (JSON would silently "
        "use the last); the file is not rewritten until then"
    ]
    assert result.tokens["default"].encrypted is None
    assert result.tokens["default"].error == result.errors[0]
    assert fernet.decrypt(result.tokens["alice"].encrypted.encode()) == b"tok-a"
    # Rewriting would keep one of the two values silently: the file stays as the user wrote it.
    before = path.read_bytes()
    assert rewrite_tokens_file(path, result) is False
    assert path.read_bytes() == before


def test_fernet_value_no_key_decrypts_is_an_error_for_that_token_only(
    data_dir: Path, fernet: MultiFernet
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"tok-d").decode()
    encrypted = fernet.encrypt(b"tok-a").decode()
    path = tokens_file(data_dir, {"default": foreign, "alice": encrypted, "bob": "tok-b"})
    result = read_tokens(path, fernet)
    assert result.errors == [
        "tokens.json token 'default': the value is encrypted but no key in FERNET_KEY decrypts it "
        "(was it encrypted with another key?); re-encrypt it with `python main.py encrypt-token` "
        "or put the plaintext token in the file"
    ]
    assert result.tokens["default"].encrypted is None
    assert result.tokens["default"].error == result.errors[0]
    assert result.tokens["default"].rewrite is False
    assert result.tokens["alice"] == config_loader.TokenValue("alice", encrypted, None, False)
    assert fernet.decrypt(result.tokens["bob"].encrypted.encode()) == b"tok-b"
    assert foreign not in result.errors[0]


def test_plaintext_token_is_encrypted_under_the_first_key(data_dir: Path) -> None:
    first, second = Fernet.generate_key(), Fernet.generate_key()
    ring = utils.load_fernet(f"{first.decode()},{second.decode()}")
    result = read_tokens(tokens_file(data_dir, {"default": "  tok-plain  "}), ring)
    token = result.tokens["default"]
    assert token.rewrite is True and token.error is None and result.errors == []
    assert token.encrypted is not None and "tok-plain" not in token.encrypted
    # Under the first key alone (surrounding blanks are no part of the token).
    assert Fernet(first).decrypt(token.encrypted.encode()) == b"tok-plain"


def test_token_under_the_second_key_is_reencrypted_under_the_first(data_dir: Path) -> None:
    first, second = Fernet.generate_key(), Fernet.generate_key()
    ring = utils.load_fernet(f"{first.decode()}, {second.decode()}")
    old = Fernet(second).encrypt(b"tok-old").decode()
    new = Fernet(first).encrypt(b"tok-new").decode()
    result = read_tokens(tokens_file(data_dir, {"old": old, "new": new}), ring)
    assert result.errors == []
    assert result.tokens["old"].rewrite is True
    assert result.tokens["old"].encrypted != old
    assert Fernet(first).decrypt(result.tokens["old"].encrypted.encode()) == b"tok-old"
    assert result.tokens["new"] == config_loader.TokenValue("new", new, None, False)


def test_rewrite_tokens_file_encrypts_in_place(data_dir: Path) -> None:
    first, second = Fernet.generate_key(), Fernet.generate_key()
    ring = utils.load_fernet(f"{first.decode()},{second.decode()}")
    kept = Fernet(first).encrypt(b"tok-kept").decode()
    old = Fernet(second).encrypt(b"tok-old").decode()
    foreign = Fernet(Fernet.generate_key()).encrypt(b"tok-x").decode()
    path = tokens_file(
        data_dir,
        {"plain": "tok-plain-secret", "kept": kept, "old": old, "bad": foreign, "num": 5},
    )
    path.chmod(0o644)
    inode = path.stat().st_ino
    result = read_tokens(path, ring)

    assert rewrite_tokens_file(path, result) is True

    data = path.read_bytes()
    assert b"tok-plain-secret" not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Atomic: a temporary file was written and renamed over it; none is left behind.
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in data_dir.iterdir()) == ["tokens.json"]
    written = json.loads(data)
    assert list(written) == ["plain", "kept", "old", "bad", "num"]
    assert written["kept"] == kept and written["bad"] == foreign and written["num"] == 5
    assert Fernet(first).decrypt(written["plain"].encode()) == b"tok-plain-secret"
    assert Fernet(first).decrypt(written["old"].encode()) == b"tok-old"
    # Read again: nothing left to rewrite.
    again = read_tokens(path, ring)
    assert not any(t.rewrite for t in again.tokens.values())


# Object tokens (CONTRACT section 12 "Secrets"): each string encrypted on its own.


def test_object_token_encrypts_each_field_on_its_own(data_dir: Path) -> None:
    first, second = Fernet.generate_key(), Fernet.generate_key()
    ring = utils.load_fernet(f"{first.decode()},{second.decode()}")
    kept = Fernet(first).encrypt(b"tok-kept").decode()
    old = Fernet(second).encrypt(b"me@club.example").decode()
    value = {"email": old, "password": " pw-secret-1 ", "token": kept}
    result = read_tokens(tokens_file(data_dir, {"club": value}), ring)
    assert result.errors == []
    token = result.tokens["club"]
    assert token.fields == ("email", "password", "token")
    assert (token.rewrite, token.plaintext, token.error) == (True, True, None)
    assert isinstance(token.encrypted, dict)
    assert token.encrypted["token"] == kept  # already under the first key: kept as it is
    assert token.encrypted["email"] != old  # re-encrypted under the first key
    decrypted = {k: Fernet(first).decrypt(v.encode()) for k, v in token.encrypted.items()}
    assert decrypted == {
        "email": b"me@club.example",
        "password": b"pw-secret-1",
        "token": b"tok-kept",
    }
    assert "pw-secret-1" not in json.dumps(token.encrypted)
    # An object whose fields are all encrypted under the first key needs no rewrite.
    settled = {"email": Fernet(first).encrypt(b"me").decode(), "password": kept}
    again = read_tokens(tokens_file(data_dir, {"club": settled}), ring).tokens["club"]
    assert (again.rewrite, again.plaintext, again.encrypted) == (False, False, settled)
    assert read_tokens(tokens_file(data_dir, {"s": kept}), ring).tokens["s"].fields is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"email": "me@club.example", "password": 1234},
            "field 'password': expected a non-empty string, got a number",
        ),
        ({"email": ""}, "field 'email': expected a non-empty string, got an empty string"),
        ({"email": None}, "field 'email': expected a non-empty string, got null"),
        ({"login": {"email": "x"}}, "field 'login': expected a non-empty string, got an object"),
        (
            {},
            'an object token needs at least one field, e.g. {"email": "...", "password": "..."}',
        ),
        (
            {"e-mail": "x"},
            "field 'e-mail': a field name must be 1 to 64 of A-Z a-z 0-9 _ and not start with "
            "a digit (it is used as {secret.<field>})",
        ),
        (
            {"email": "\ud800"},
            "field 'email': the value is not valid text (it holds an unpaired surrogate such "
            "as \\ud800); put the token in as it is",
        ),
    ],
)
def test_object_token_with_a_bad_field_is_an_error_for_that_token(
    data_dir: Path, fernet: MultiFernet, value: dict[str, Any], message: str
) -> None:
    result = read_tokens(tokens_file(data_dir, {"club": value, "alice": "tok-a"}), fernet)
    assert result.errors == [f"tokens.json token 'club': {message}"]
    assert result.tokens["club"] == config_loader.TokenValue("club", None, result.errors[0], False)
    assert result.tokens["alice"].error is None
    assert "me@club.example" not in result.errors[0]


def test_object_token_field_no_key_decrypts_is_an_error(
    data_dir: Path, fernet: MultiFernet
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"pw").decode()
    result = read_tokens(
        tokens_file(data_dir, {"club": {"email": "me", "password": foreign}}), fernet
    )
    assert result.errors == [
        "tokens.json token 'club': field 'password': the value is encrypted but no key in "
        "FERNET_KEY decrypts it (was it encrypted with another key?); re-encrypt it with "
        "`python main.py encrypt-token` or put the plaintext token in the file"
    ]


def test_rewrite_tokens_file_encrypts_each_field_of_an_object(
    data_dir: Path, fernet: MultiFernet
) -> None:
    path = tokens_file(
        data_dir,
        {"club": {"email": "me@club.example", "password": "pw-secret-2"}, "plain": "tok-p"},
    )
    path.chmod(0o644)
    result = read_tokens(path, fernet)

    assert rewrite_tokens_file(path, result) is True

    data = path.read_bytes()
    for secret in (b"me@club.example", b"pw-secret-2", b"tok-p"):
        assert secret not in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(data)
    assert list(written["club"]) == ["email", "password"]
    assert {k: fernet.decrypt(v.encode()) for k, v in written["club"].items()} == {
        "email": b"me@club.example",
        "password": b"pw-secret-2",
    }
    again = read_tokens(path, fernet)
    assert again.errors == [] and not any(t.rewrite for t in again.tokens.values())
    assert again.tokens["club"].encrypted == written["club"]


def test_rewrite_tokens_file_leaves_a_file_with_nothing_to_do(
    data_dir: Path, fernet: MultiFernet
) -> None:
    path = tokens_file(data_dir, {"default": fernet.encrypt(b"tok").decode()})
    before = path.read_bytes(), path.stat().st_mtime_ns
    assert rewrite_tokens_file(path, read_tokens(path, fernet)) is True
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_rewrite_tokens_file_leaves_a_file_changed_since_it_was_read(
    data_dir: Path, fernet: MultiFernet
) -> None:
    path = tokens_file(data_dir, {"default": "tok-1"})
    result = read_tokens(path, fernet)
    tokens_file(data_dir, {"default": "tok-2"})
    assert rewrite_tokens_file(path, result) is False
    assert json.loads(path.read_text()) == {"default": "tok-2"}
    assert sorted(p.name for p in data_dir.iterdir()) == ["tokens.json"]


def test_rewrite_tokens_file_says_which_tokens_it_encrypted(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = Fernet.generate_key(), Fernet.generate_key()
    ring = utils.load_fernet(f"{first.decode()},{second.decode()}")
    old = Fernet(second).encrypt(b"tok-old").decode()
    path = tokens_file(data_dir, {"plain": "tok-plain", "old": old})
    with caplog.at_level(logging.INFO, logger="config_loader"):
        assert rewrite_tokens_file(path, read_tokens(path, ring)) is True
    assert [r.getMessage() for r in caplog.records] == [
        "tokens.json: plaintext token(s) 'plain' encrypted; token(s) 'old' re-encrypted under "
        "the first key in place"
    ]


def _file_state(path: Path) -> tuple[bytes, int, int, int]:
    info = path.stat()
    return path.read_bytes(), info.st_ino, stat.S_IMODE(info.st_mode), info.st_mtime_ns


def test_tokens_json_as_a_symlink_is_left_alone_and_the_log_says_the_plaintext_stays(
    tmp_path: Path, data_dir: Path, fernet: MultiFernet, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = tmp_path / "secrets"
    elsewhere.mkdir()
    target = tokens_file(elsewhere, {"default": "tok-plain", "alice": "tok-a"})
    target.chmod(0o644)
    link = data_dir / "tokens.json"
    link.symlink_to(target)
    before = _file_state(target)
    result = read_tokens(link, fernet)

    with caplog.at_level(logging.INFO, logger="config_loader"):
        assert rewrite_tokens_file(link, result) is False
    config_loader.secure_file_mode(link)

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            f"tokens.json is a symbolic link to {target}: not rewritten (courtbot never writes "
            f"through a link), so plaintext token(s) 'default', 'alice' stay in {target}, "
            "readable by others (mode 0644); they are kept encrypted in the database only: put "
            "encrypted values in that file (`python main.py encrypt-token`), or make tokens.json "
            "a regular file",
        )
    ]
    assert "tok-plain" not in caplog.text
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _file_state(target) == before  # not rewritten, not chmod-ed
    assert sorted(p.name for p in data_dir.iterdir()) == ["tokens.json"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["tokens.json"]
    assert result.written is None


def test_tokens_json_with_a_hard_link_is_left_alone(
    tmp_path: Path, data_dir: Path, fernet: MultiFernet, caplog: pytest.LogCaptureFixture
) -> None:
    path = tokens_file(data_dir, {"default": "tok-plain"})
    path.chmod(0o600)
    (tmp_path / "copy.json").hardlink_to(path)
    before = _file_state(path)
    with caplog.at_level(logging.INFO, logger="config_loader"):
        assert rewrite_tokens_file(path, read_tokens(path, fernet)) is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "ERROR",
            "tokens.json has 2 hard links: not rewritten (the other names would keep the old "
            f"content), so plaintext token(s) 'default' stay in {path}; they are kept encrypted "
            "in the database only: put encrypted values in that file (`python main.py "
            "encrypt-token`), or make tokens.json a regular file",
        )
    ]
    assert _file_state(path) == before


def _assert_unwritable_warning(caplog: pytest.LogCaptureFixture, path: Path) -> None:
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert message.startswith(
        "tokens.json: cannot rewrite it with encrypted tokens (Permission denied); the tokens "
        "are kept encrypted in the database only"
    )
    assert "tok-plain" not in message
    assert json.loads(path.read_text()) == {"default": "tok-plain"}


def test_rewrite_tokens_file_in_a_read_only_directory_warns(
    data_dir: Path, fernet: MultiFernet, caplog: pytest.LogCaptureFixture
) -> None:
    path = tokens_file(data_dir, {"default": "tok-plain"})
    result = read_tokens(path, fernet)
    data_dir.chmod(0o500)
    try:
        if os.access(data_dir, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes")
        with caplog.at_level(logging.WARNING, logger="config_loader"):
            assert rewrite_tokens_file(path, result) is False
        _assert_unwritable_warning(caplog, path)
    finally:
        data_dir.chmod(0o700)


def test_rewrite_tokens_file_that_cannot_be_written_warns(
    data_dir: Path,
    fernet: MultiFernet,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same refusal as a read-only directory, also when the tests run as root.
    path = tokens_file(data_dir, {"default": "tok-plain"})
    result = read_tokens(path, fernet)

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(config_loader.tempfile, "mkstemp", refuse)
    with caplog.at_level(logging.WARNING, logger="config_loader"):
        assert rewrite_tokens_file(path, result) is False
    _assert_unwritable_warning(caplog, path)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
        for p in sorted(folder.iterdir())
    }


def test_read_config_and_read_tokens_never_write(
    data_dir: Path, settings: Settings, fernet: MultiFernet
) -> None:
    tokens_file(data_dir, {"default": "tok-plain", "alice": "tok-a"})
    write_json(data_dir / "schedules.json", [WED, MATCH])
    (data_dir / "tokens.json").chmod(0o644)
    before = _snapshot(data_dir)

    config = read_config(settings, fernet, NOW)
    tokens = read_tokens(settings.tokens_path, fernet)

    assert config.errors == []
    assert tokens.tokens["default"].rewrite is True
    assert _snapshot(data_dir) == before  # no rewrite, no chmod, no database


def test_read_config_uses_known_tokens_when_tokens_json_is_rejected(
    data_dir: Path, settings: Settings, fernet: MultiFernet
) -> None:
    (data_dir / "tokens.json").write_text("{not json")
    write_json(data_dir / "schedules.json", [MATCH, MATCH | {"id": "b", "token": "bob"}])
    config = read_config(settings, fernet, NOW, known_tokens=["default"])
    assert config.tokens.file_error is not None
    assert config.errors == [
        config.tokens.file_error,
        "schedules.json entry 'b' (#2): token: 'bob' is not in tokens.json (it has: 'default')",
    ]
    assert [e.id for e in config.schedules.entries] == ["match"]


# --------------------------------------------------------------------------- environment


def test_settings_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.data_dir == Path("data")
    assert settings.database_url == "sqlite:///data/db.sqlite"
    assert settings.timezone == "UTC"
    assert settings.window == utils.Window(168, "h")
    assert str(settings.window) == "168h"
    assert settings.retry_base == 1.0
    assert settings.http_timeout == 10.0
    assert settings.reload_interval == 60.0
    assert settings.log_level == "INFO"
    assert settings.log_file == Path("data/bot.log")
    assert settings.fernet_keys is None and settings.api_url is None
    assert settings.template_path is None
    assert settings.schedules_path == Path("data/schedules.json")
    assert settings.tokens_path == Path("data/tokens.json")


def test_settings_follow_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path}/db.sqlite"
    assert settings.log_file == tmp_path / "bot.log"
    assert settings.pid_path == tmp_path / "bot.pid"


def test_settings_values() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "sqlite:////tmp/other.sqlite",
            "BOOKING_TIMEZONE": "Europe/London",
            "BOOKING_WINDOW": "7d",
            "RETRY_BASE_SECONDS": "0",
            "EARLY_RETRY_MS": "50",
            "EARLY_RETRY_SECONDS": "0",
            "HTTP_TIMEOUT_SECONDS": "2.5",
            "RELOAD_INTERVAL_SECONDS": "5",
            "LOG_LEVEL": "debug",
            "LOG_FILE": "-",
        }
    )
    assert settings.database_url == "sqlite:////tmp/other.sqlite"
    assert settings.timezone == "Europe/London"
    assert settings.window == utils.Window(7, "d")
    assert (settings.retry_base, settings.http_timeout, settings.reload_interval) == (0, 2.5, 5)
    assert (settings.early_retry_ms, settings.early_retry_seconds) == (50, 0)
    assert settings.log_level == "DEBUG"
    assert settings.log_file is None


def test_settings_empty_values_mean_defaults() -> None:
    blank = {
        name: ""
        for name in (
            "DATA_DIR",
            "BOOKING_TIMEZONE",
            "BOOKING_WINDOW",
            "RETRY_BASE_SECONDS",
            "EARLY_RETRY_MS",
            "EARLY_RETRY_SECONDS",
            "LOG_LEVEL",
            "LOG_FILE",
        )
    }
    settings = Settings.from_env(blank)
    assert (settings.early_retry_ms, settings.early_retry_seconds) == (100, 20)
    assert (settings.timezone, settings.window, settings.retry_base, settings.log_level) == (
        "UTC",
        utils.Window(168, "h"),
        1.0,
        "INFO",
    )
    assert settings.log_file == Path("data/bot.log")


WINDOW_EXPECTED = (
    "is not a window; expected '<N>h' (hours, e.g. '168h' or '47.5h'), '<N>d' (whole "
    "calendar days, e.g. '7d') or '<N>d@HH:MM' (at that local time N calendar days before, "
    "e.g. '6d@08:00')"
)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BOOKING_WINDOW": "a week"}, f"BOOKING_WINDOW: 'a week' {WINDOW_EXPECTED}"),
        ({"BOOKING_WINDOW": "-5h"}, f"BOOKING_WINDOW: '-5h' {WINDOW_EXPECTED}"),
        ({"BOOKING_WINDOW": "1.5d"}, f"BOOKING_WINDOW: '1.5d' {WINDOW_EXPECTED}"),
        ({"BOOKING_WINDOW": "168"}, f"BOOKING_WINDOW: '168' {WINDOW_EXPECTED}"),
        (
            {"BOOKING_WINDOW": "99999999h"},
            "BOOKING_WINDOW: '99999999h' is longer than a year; no club opens bookings that far "
            "ahead (e.g. '168h', '7d' or '6d@08:00')",
        ),
        (
            {"BOOKING_TIMEZONE": "Mars/Olympus"},
            "BOOKING_TIMEZONE: 'Mars/Olympus' is not an IANA time zone (e.g. 'Europe/London')",
        ),
        (
            {"RETRY_BASE_SECONDS": "-1"},
            "RETRY_BASE_SECONDS: '-1' must be a finite number >= 0",
        ),
        (
            {"RETRY_BASE_SECONDS": "nan"},
            "RETRY_BASE_SECONDS: 'nan' must be a finite number >= 0",
        ),
        (
            {"RETRY_BASE_SECONDS": "inf"},
            "RETRY_BASE_SECONDS: 'inf' must be a finite number >= 0",
        ),
        (
            {"RETRY_BASE_SECONDS": "soon"},
            "RETRY_BASE_SECONDS: 'soon' is not a number of seconds",
        ),
        (
            {"EARLY_RETRY_MS": "0"},
            "EARLY_RETRY_MS: '0' must be a finite number >= 1",
        ),
        (
            {"EARLY_RETRY_MS": "fast"},
            "EARLY_RETRY_MS: 'fast' is not a number of milliseconds",
        ),
        (
            {"EARLY_RETRY_SECONDS": "-1"},
            "EARLY_RETRY_SECONDS: '-1' must be a finite number >= 0",
        ),
        (
            {"HTTP_TIMEOUT_SECONDS": "0"},
            "HTTP_TIMEOUT_SECONDS: '0' must be a finite number >= 0.001",
        ),
        (
            {"RELOAD_INTERVAL_SECONDS": "-inf"},
            "RELOAD_INTERVAL_SECONDS: '-inf' must be a finite number >= 0.01",
        ),
        (
            {"LOG_LEVEL": "verbose"},
            "LOG_LEVEL: 'verbose' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else "",
)
def test_settings_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(env)
    assert str(raised.value) == message


def test_settings_window_resolves_triggers() -> None:
    settings = Settings.from_env({"BOOKING_WINDOW": "47.5h"})
    assert settings.window == utils.Window(47.5, "h")
    start = NOW + timedelta(days=3)
    zone = utils.get_zone("UTC")
    assert utils.trigger_time(start, zone, settings.window) == start - timedelta(hours=47.5)


def test_load_template_relative_to_data_dir_and_errors_name_the_file(
    env: dict[str, str], data_dir: Path
) -> None:
    (data_dir / "club.json").write_text(json.dumps({"method": "PUT"}))
    settings = Settings.from_env(env | {"BOOKING_REQUEST_TEMPLATE": "club.json"})
    template = config_loader.load_template(settings)
    assert template is not None and template.flow.booking_step.method == "PUT"
    (data_dir / "club.json").write_text("{broken")
    with pytest.raises(TemplateError, match=r"BOOKING_REQUEST_TEMPLATE .*club\.json"):
        config_loader.load_template(settings)
    (data_dir / "club.json").unlink()
    with pytest.raises(TemplateError, match="no such file"):
        config_loader.load_template(settings)


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


@pytest.mark.parametrize(
    ("rrule", "why"),
    [
        (
            "FREQ=DAILY;BYSETPOS=2",
            "it has no instance from 2026-11-23 to 2035-01-19 (courtbot looks no further ahead)",
        ),
        (
            "FREQ=WEEKLY;BYDAY=WE;UNTIL=20261101T000000Z",
            "its UNTIL 2026-11-01T00:00:00Z has passed",
        ),
    ],
)
def test_a_rule_with_no_instance_ahead_is_a_warning_naming_why(
    data_dir: Path, rrule: str, why: str
) -> None:
    entry = {"id": "never", "type": "recurring", "desired_time": "2026-01-07 17:00", "rrule": rrule}
    result = schedules(data_dir, entry)
    assert result.errors == []
    assert result.warnings == [
        f"schedules.json entry 'never' (#1): rrule: {rrule!r} books nothing: {why}"
    ]
    assert result.entries[0].plan(NOW, utils.Window(168, "h")) == []


# --------------------------------------------------------------------------- the daemon's cache

PAST = {"id": "old", "type": "one-off", "desired_time": "2026-01-01 10:00"}
PAST_NO_ID = {"type": "one-off", "desired_time": "2026-01-02 10:00"}


def cached(
    data_dir: Path,
    cache: config_loader.EntryCache,
    *entries: Any,
    tokens: set[str] = TOKENS,
    now: datetime = NOW,
) -> SchedulesResult:
    """Write ``entries`` as schedules.json and read it through the daemon's ``cache``."""
    path = write_json(data_dir / "schedules.json", list(entries))
    return read_schedules(path, default_zone="UTC", token_names=set(tokens), now=now, cache=cache)


def shape(entry: config_loader.Entry) -> tuple[Any, ...]:
    """Every field of an entry but its expansion (the dates, or their stamps), the rule as its
    RFC text."""
    derived = ("expansion", "start_stamps")
    names = [f.name for f in dataclasses.fields(entry) if f.name not in derived]
    rule = entry.rule.rfc if entry.rule else None
    return tuple(rule if name == "rule" else getattr(entry, name) for name in names)


def past_warning(where: str, value: str) -> str:
    return f"schedules.json {where}: desired_time: {value!r} is in the past; skipped, never booked"


def test_the_cache_validates_only_the_entries_that_changed_with_the_same_result(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validated: list[Any] = []
    real = config_loader._validate_entry

    def counting(raw: Any, *args: Any, **kwargs: Any) -> Any:
        validated.append(raw.get("id", raw.get("desired_time")))
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(config_loader, "_validate_entry", counting)
    cache = config_loader.EntryCache()
    cached(data_dir, cache, WED, MATCH, PAST, NO_ID)
    assert validated == ["wed-evening", "match", "old", "2026-12-20 10:00"]
    assert (cache.validated, cache.reused) == (4, 0)

    validated.clear()
    edited = MATCH | {"court_id": 4}
    again = cached(data_dir, cache, WED, edited, PAST, NO_ID)

    assert validated == ["match"]
    assert (cache.validated, cache.reused) == (1, 3)
    plain = schedules(data_dir, WED, edited, PAST, NO_ID)  # the same file, validated afresh
    assert [shape(e) for e in again.entries] == [shape(e) for e in plain.entries]
    # Planned from the stamps the cache keeps, the starts are the ones a fresh read finds.
    assert all(e.rule is None or e.start_stamps is not None for e in again.entries)
    assert [e.starts(NOW) for e in again.entries] == [e.starts(NOW) for e in plain.entries]
    assert again.warnings == plain.warnings
    assert again.warnings == [past_warning("entry 'old' (#3)", "2026-01-01 10:00")]
    assert all(entry.expansion is None for entry in again.entries)


def test_a_cached_entry_at_another_position_takes_it_in_the_entry_and_its_warnings(
    data_dir: Path,
) -> None:
    cache = config_loader.EntryCache()
    cached(data_dir, cache, WED, PAST, PAST_NO_ID)

    moved = cached(data_dir, cache, MATCH, WED, PAST, PAST_NO_ID)

    assert (cache.validated, cache.reused) == (1, 3)
    assert [(e.id, e.position) for e in moved.entries] == [
        ("match", 1),
        ("wed-evening", 2),
        ("old", 3),
        (moved.entries[3].id, 4),
    ]
    assert moved.warnings == [
        past_warning("entry 'old' (#3)", "2026-01-01 10:00"),
        past_warning("entry #4", "2026-01-02 10:00"),
    ]


def test_a_cached_entry_is_validated_again_when_its_token_goes_or_a_start_passes(
    data_dir: Path,
) -> None:
    cache = config_loader.EntryCache()
    soon = {"id": "soon", "type": "one-off", "desired_time": "2026-11-24 10:00", "token": "alice"}
    cached(data_dir, cache, soon, WED)

    gone = cached(data_dir, cache, soon, WED, tokens={"default"})
    assert (cache.validated, cache.reused) == (1, 1)
    assert gone.errors == [
        "schedules.json entry 'soon' (#1): token: 'alice' is not in tokens.json (it has: 'default')"
    ]

    cached(data_dir, cache, soon, WED)
    # A day later soon's start has passed (validated again: now a warning); WED's first start
    # (2026-12-02) is still ahead.
    passed = cached(data_dir, cache, soon, WED, now=NOW + timedelta(days=1))
    assert (cache.validated, cache.reused) == (1, 1)
    assert passed.warnings == [past_warning("entry 'soon' (#1)", "2026-11-24 10:00")]
    # Past WED's first start, it is validated again too.
    cached(data_dir, cache, soon, WED, now=NOW + timedelta(days=10))
    assert (cache.validated, cache.reused) == (1, 1)
    assert cached(data_dir, cache, soon, WED, now=NOW + timedelta(days=10)).entries[1].id == (
        "wed-evening"
    )
    assert (cache.validated, cache.reused) == (0, 2)


# --------------------------------------------------------------------------- clubs and windows

PADEL_URL = "https://padel.example/api/book"


def club_file(data_dir: Path, name: str, value: Any) -> Path:
    (data_dir / "clubs").mkdir(exist_ok=True)
    return write_json(data_dir / "clubs" / f"{name}.json", value)


def load_all(
    data_dir: Path, env: dict[str, str], *entries: Any, **extra: str
) -> config_loader.Config:
    """Write ``entries`` and a token, then read everything as the daemon does."""
    write_json(data_dir / "schedules.json", list(entries))
    write_json(data_dir / "tokens.json", {"default": "tok-d"})
    settings = Settings.from_env(env | extra)
    return read_config(settings, settings.fernet(), NOW)


def by_id(config: config_loader.Config) -> dict[str, config_loader.Entry]:
    return {entry.id: entry for entry in config.schedules.entries}


def test_club_names_a_file_in_data_dir_clubs(data_dir: Path, env: dict[str, str]) -> None:
    path = club_file(data_dir, "padel", {"url": PADEL_URL, "about": "for people only"})
    config = load_all(data_dir, env, MATCH | {"club": "padel"}, WED)
    assert config.errors == []
    entries = by_id(config)
    assert (entries["match"].club, entries["wed-evening"].club) == ("padel", None)
    assert list(config.clubs) == ["padel"]
    assert config.clubs["padel"].label == str(path)
    assert config.clubs["padel"].flow.booking_step.url.source() == PADEL_URL
    assert config.clubs["padel"].window is None


def test_unknown_club_is_an_error_for_that_entry_only(data_dir: Path, env: dict[str, str]) -> None:
    config = load_all(data_dir, env, WED, MATCH | {"club": "padel"})
    assert config.errors == [
        f"schedules.json entry 'match' (#2): club: 'padel': {data_dir}/clubs/padel.json: "
        "no such file"
    ]
    assert [e.id for e in config.schedules.entries] == ["wed-evening"]
    assert config.schedules.rejected_ids == {"match"}


@pytest.mark.parametrize("name", ["../padel", "", "a" * 65, 7, None, "pa/del"])
def test_club_must_be_a_name(data_dir: Path, env: dict[str, str], name: Any) -> None:
    config = load_all(data_dir, env, MATCH | {"club": name})
    assert config.errors == [
        f"schedules.json entry 'match' (#1): club: {name!r} is not a club name; expected 1 to 64 "
        "of A-Z a-z 0-9 _ . - naming DATA_DIR/clubs/<club>.json (e.g. 'playtomic')"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"url": PADEL_URL, "method": "BREW"},
            "method: 'BREW' is not one of POST, PUT, PATCH, GET, DELETE",
        ),
        ({"url": PADEL_URL, "window": "6 days"}, f"window: '6 days' {WINDOW_EXPECTED}"),
        (
            {"url": PADEL_URL, "window": "6d@24:00"},
            "window: '6d@24:00': 24:00 is not a time of day; expected HH:MM from 00:00 to "
            "23:59 (e.g. '6d@08:00')",
        ),
        ({"url": PADEL_URL, "headers": {"X": "{tokn}"}}, "headers.X: unknown placeholder {tokn}"),
        ([], "expected a JSON object"),
    ],
)
def test_invalid_club_file_names_the_file_and_the_key(
    data_dir: Path, env: dict[str, str], value: Any, message: str
) -> None:
    path = club_file(data_dir, "bad", value)
    club_file(data_dir, "good", {"url": PADEL_URL})
    config = load_all(
        data_dir, env, WED | {"club": "bad"}, MATCH | {"club": "good"}, NO_ID | {"club": "bad"}
    )
    first, third = config.errors
    assert first.startswith(
        f"schedules.json entry 'wed-evening' (#1): club: 'bad': {path}: {message}"
    )
    assert third.startswith(f"schedules.json entry #3: club: 'bad': {path}: {message}")
    assert [e.id for e in config.schedules.entries] == ["match"]
    assert list(config.clubs) == ["good"]
    assert list(config.schedules.club_errors) == ["bad"]


def test_a_club_file_that_is_not_json_names_the_file(data_dir: Path, env: dict[str, str]) -> None:
    (data_dir / "clubs").mkdir()
    (data_dir / "clubs" / "bad.json").write_text("{nope")
    config = load_all(data_dir, env, MATCH | {"club": "bad"})
    assert config.errors == [
        f"schedules.json entry 'match' (#1): club: 'bad': {data_dir}/clubs/bad.json: not valid "
        "JSON (line 1 column 2: Expecting property name enclosed in double quotes)"
    ]


# --------------------------------------------------------------------------- ready flows by name

HOSTED = {
    "about": "a ready flow with a host per club: replace yourclub",
    "hosts": ["yourclub.gym.example"],
    "window": "170h",
    "steps": [
        {"name": "login", "url": "https://yourclub.gym.example/login", "ok": {"status": [200]}},
        {"name": "book", "booking": True, "url": "https://yourclub.gym.example/book"},
    ],
}


@pytest.fixture
def ready(tmp_path: Path, env: dict[str, str]) -> Path:
    """A READY_CLUBS_DIR of its own: ``hosted`` (a host per club) and ``shared`` (one host)."""
    folder = tmp_path / "ready"
    folder.mkdir()
    write_json(folder / "hosted.json", HOSTED)
    write_json(folder / "shared.json", {"url": PADEL_URL, "window": "6d@08:00"})
    env["READY_CLUBS_DIR"] = str(folder)
    return folder


def test_a_ready_flow_is_used_by_name_without_a_copy(
    data_dir: Path, env: dict[str, str], ready: Path
) -> None:
    config = load_all(data_dir, env, MATCH | {"club": "shared"})
    assert config.errors == []
    assert config.clubs["shared"].label == str(ready / "shared.json")
    assert by_id(config)["match"].club == "shared"
    # A file of that name in DATA_DIR/clubs/ is the user's and wins.
    club_file(data_dir, "shared", {"url": "https://own.example/book"})
    config = load_all(data_dir, env, MATCH | {"club": "shared"})
    assert config.clubs["shared"].flow.booking_step.url.source() == "https://own.example/book"


def test_the_repositorys_ready_flows_are_found_by_name(data_dir: Path, env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    assert settings.ready_clubs_dir == Path(config_loader.__file__).parent / "data" / "clubs"
    config = load_all(data_dir, env, MATCH | {"club": "playtomic"})
    assert config.clubs["playtomic"].label == str(settings.ready_clubs_dir / "playtomic.json")


def test_a_ready_flow_with_its_placeholder_left_in_is_an_error_naming_file_key_and_fix(
    data_dir: Path, env: dict[str, str], ready: Path
) -> None:
    config = load_all(data_dir, env, MATCH | {"club": "hosted"}, WED)
    assert config.errors == [
        f"schedules.json entry 'match' (#1): club: 'hosted': {ready}/hosted.json: hosts[0]: "
        "'yourclub.gym.example' still holds the placeholder 'yourclub': put your club's own "
        "host there (in hosts and every url), or leave the ready flow as it is and write a club "
        'file of your own, e.g. clubs/my-hosted.json holding {"use": "hosted", "yourclub": '
        '"<your club\'s subdomain>"}, and name it in the entry ("club": "my-hosted")'
    ]
    assert [e.id for e in config.schedules.entries] == ["wed-evening"]
    # Copied unedited, or with the hosts edited but one url forgotten: the same, naming it.
    copied = dict(HOSTED, hosts=["riverside.gym.example"])
    path = club_file(data_dir, "gym", copied)
    config = load_all(data_dir, env, MATCH | {"club": "gym"})
    assert config.errors[0].startswith(
        f"schedules.json entry 'match' (#1): club: 'gym': {path}: steps[0] 'login'.url: "
        "'https://yourclub.gym.example/login' still holds the placeholder 'yourclub'"
    )


def test_use_gives_the_ready_flow_with_the_clubs_own_host(
    data_dir: Path, env: dict[str, str], ready: Path
) -> None:
    club_file(data_dir, "riverside", {"use": "hosted", "yourclub": "Riverside-2"})
    config = load_all(data_dir, env, MATCH | {"club": "riverside"})
    assert config.errors == []
    flow = config.clubs["riverside"].flow
    assert flow.booking_step.url.source() == "https://riverside-2.gym.example/book"
    assert "riverside-2.gym.example" in str(flow.hosts)
    assert str(config.clubs["riverside"].window) == "170h"
    # The ready flow was not edited.
    assert json.loads((ready / "hosted.json").read_text()) == HOSTED


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            {"use": "hosted"},
            "yourclub: missing; the ready flow 'hosted' has a host per club "
            '(yourclub.gym.example): give your club\'s subdomain, e.g. "riverside" for '
            "riverside.gym.example",
        ),
        (
            {"use": "hosted", "yourclub": "my.club"},
            "yourclub: 'my.club' is not a host name label (letters, digits and hyphens, at most "
            '63; e.g. "riverside" for riverside.gym.example)',
        ),
        ({"use": "hosted", "yourclub": 7}, "yourclub: 7 is not a host name label"),
        ({"use": "hosted", "yourclub": "-x"}, "yourclub: '-x' is not a host name label"),
        (
            {"use": "shared", "yourclub": "riverside"},
            "yourclub: the ready flow 'shared' has no 'yourclub' host to replace; remove the key",
        ),
        (
            {"use": "nosuch", "yourclub": "riverside"},
            "use: 'nosuch' is not a ready flow (expected one of hosted, shared)",
        ),
        ({"use": "../hosted"}, "use: '../hosted' is not a ready flow"),
        (
            {"use": "hosted", "yourclub": "riverside", "window": "7d"},
            'window: unknown key; a club file with "use" takes only use, yourclub, about',
        ),
    ],
)
def test_use_errors_name_the_file_and_the_key(
    data_dir: Path, env: dict[str, str], ready: Path, value: Any, message: str
) -> None:
    path = club_file(data_dir, "mine", value)
    config = load_all(data_dir, env, MATCH | {"club": "mine"})
    (error,) = config.errors
    assert error.startswith(f"schedules.json entry 'match' (#1): club: 'mine': {path}: {message}")


def test_every_ready_flow_with_a_host_per_club_works_through_use(
    data_dir: Path, env: dict[str, str]
) -> None:
    hosted = [
        path.stem
        for path in Settings.from_env(env).ready_clubs_dir.glob("*.json")
        if "yourclub" in json.dumps(json.loads(path.read_text()).get("hosts", []))
    ]
    assert hosted  # ClubAutomation and Perfect Gym, at least
    for name in hosted:
        club_file(data_dir, f"my-{name}", {"use": name, "yourclub": "riverside"})
    config = load_all(data_dir, env, *[MATCH | {"id": n, "club": f"my-{n}"} for n in hosted])
    # (Their tokens are the default string here: those errors are the token's, not the club's.)
    assert [e for e in config.errors if ": club: " in e] == []
    for name in hosted:
        assert "yourclub" not in config.clubs[f"my-{name}"].flow.booking_step.url.source()


def test_a_club_named_only_in_schedules_counts_as_club_files(
    data_dir: Path, env: dict[str, str]
) -> None:
    settings = Settings.from_env(env)
    write_json(data_dir / "schedules.json", [MATCH])
    assert not config_loader.has_club_files(settings)
    write_json(data_dir / "schedules.json", [MATCH | {"club": "playtomic"}])
    assert config_loader.has_club_files(settings)


def test_a_club_file_no_entry_names_is_not_read(data_dir: Path, env: dict[str, str]) -> None:
    club_file(data_dir, "unused", {"method": "BREW"})
    config = load_all(data_dir, env, MATCH)
    assert config.errors == [] and config.clubs == {}


def test_a_club_file_without_url_uses_booking_api_url(data_dir: Path, env: dict[str, str]) -> None:
    club_file(data_dir, "plain", {"headers": {"X-Key": "{token}"}})
    config = load_all(data_dir, env, MATCH | {"club": "plain"})
    assert config.clubs["plain"].flow.booking_step.url.source() == env["BOOKING_API_URL"]
    without = {k: v for k, v in env.items() if k != "BOOKING_API_URL"}
    config = load_all(data_dir, without, MATCH | {"club": "plain"})
    assert config.errors == [
        f"schedules.json entry 'match' (#1): club: 'plain': {data_dir}/clubs/plain.json: url: "
        "missing, and BOOKING_API_URL is not set either"
    ]


def test_the_window_that_applies_follows_the_precedence(
    data_dir: Path, env: dict[str, str]
) -> None:
    padel = club_file(data_dir, "padel", {"url": PADEL_URL, "window": "6d@08:00"})
    club_file(data_dir, "plain", {"url": PADEL_URL})
    write_json(data_dir / "template.json", {"window": "1d@07:00"})
    entries = [
        MATCH | {"id": "own", "club": "padel", "window": "7d"},
        MATCH | {"id": "club", "club": "padel"},
        MATCH | {"id": "plain", "club": "plain"},
        MATCH | {"id": "none"},
        MATCH | {"id": "none-own", "window": "47.5h"},
    ]
    config = load_all(
        data_dir,
        env,
        *entries,
        BOOKING_WINDOW="48h",
        BOOKING_REQUEST_TEMPLATE="template.json",
    )
    assert config.errors == []
    template = f"BOOKING_REQUEST_TEMPLATE {data_dir}/template.json"
    assert {e.id: (str(e.window), e.window_from) for e in config.schedules.entries} == {
        "own": ("7d", "entry"),
        "club": ("6d@08:00", str(padel)),
        "plain": ("48h", "BOOKING_WINDOW"),  # a club file without a window: not the template's
        "none": ("1d@07:00", template),
        "none-own": ("47.5h", "entry"),
    }
    # Thu 2026-12-10 18:00 UTC: six days before at 08:00 is Fri 2026-12-04 08:00.
    (planned,) = by_id(config)["club"].plan(NOW)
    assert planned.trigger == datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    (planned,) = by_id(config)["none"].plan(NOW)
    assert planned.trigger == datetime(2026, 12, 9, 7, 0, tzinfo=UTC)


def test_an_invalid_window_is_an_error_for_that_entry(data_dir: Path, env: dict[str, str]) -> None:
    config = load_all(data_dir, env, MATCH | {"window": "7 days"}, WED | {"window": 168})
    assert config.errors == [
        f"schedules.json entry 'match' (#1): window: '7 days' {WINDOW_EXPECTED}",
        f"schedules.json entry 'wed-evening' (#2): window: 168 {WINDOW_EXPECTED}",
    ]


def test_a_window_that_would_open_after_the_start_is_an_error(
    data_dir: Path, env: dict[str, str]
) -> None:
    club_file(data_dir, "late", {"url": PADEL_URL, "window": "0d@20:00"})
    wed = WED | {"club": "late"}  # Wednesdays 17:00 London
    early = MATCH | {"id": "early", "window": "0d@17:00"}  # 18:00 UTC
    config = load_all(data_dir, env, wed, MATCH | {"window": "0d@20:00"}, early)
    assert config.errors == [
        f"schedules.json entry 'wed-evening' (#1): window: '0d@20:00' (from {data_dir}/clubs/"
        "late.json) would open at Wed 2026-12-02 20:00 GMT, after the start Wed 2026-12-02 17:00 "
        "GMT: nothing could be booked; use a window that opens before the start (e.g. "
        "'1d@20:00')",
        "schedules.json entry 'match' (#2): window: '0d@20:00' would open at Thu 2026-12-10 "
        "20:00 UTC, after the start Thu 2026-12-10 18:00 UTC: nothing could be booked; use a "
        "window that opens before the start (e.g. '1d@20:00')",
    ]
    assert [e.id for e in config.schedules.entries] == ["early"]
    from_env = load_all(data_dir, env, MATCH, BOOKING_WINDOW="0d@23:00")
    assert from_env.errors[0].startswith(
        "schedules.json entry 'match' (#1): window: '0d@23:00' (from BOOKING_WINDOW) would open"
    )


def test_without_booking_api_url_entries_must_name_a_club_once_there_are_club_files(
    data_dir: Path, env: dict[str, str]
) -> None:
    without = {k: v for k, v in env.items() if k != "BOOKING_API_URL"}
    # No club files: the classic setup, where `run` itself asks for BOOKING_API_URL.
    assert load_all(data_dir, without, MATCH).errors == []
    club_file(data_dir, "padel", {"url": PADEL_URL})
    config = load_all(data_dir, without, MATCH, WED | {"club": "padel"}, NO_ID)
    assert config.errors[0] == (
        "schedules.json entry 'match' (#1): club: none given, and neither BOOKING_API_URL nor "
        "BOOKING_REQUEST_TEMPLATE gives a URL to book at: set BOOKING_API_URL or name a club "
        "file (DATA_DIR/clubs/<club>.json)"
    )
    assert config.errors[1].startswith("schedules.json entry #3: club: none given")
    assert [e.id for e in config.schedules.entries] == ["wed-evening"]
    assert config.schedules.without_request == [
        "schedules.json entry 'match' (#1)",
        "schedules.json entry #3",
    ]
    # A template with a url gives them their request.
    write_json(data_dir / "template.json", {"url": PADEL_URL})
    with_template = load_all(
        data_dir, without, MATCH, WED | {"club": "padel"}, BOOKING_REQUEST_TEMPLATE="template.json"
    )
    assert with_template.errors == [] and with_template.schedules.without_request == []


def test_the_config_digest_covers_the_club_files(data_dir: Path, settings: Settings) -> None:
    before = config_loader.config_digest(settings)
    club_file(data_dir, "padel", {"url": PADEL_URL})
    added = config_loader.config_digest(settings)
    assert set(added) - set(before) == {str(data_dir / "clubs" / "padel.json")}
    club_file(data_dir, "padel", {"url": PADEL_URL, "window": "6d@08:00"})
    assert config_loader.config_digest(settings) != added
    (data_dir / "clubs" / "padel.json").unlink()
    assert config_loader.config_digest(settings) == before


def test_a_new_club_window_changes_the_entry_fingerprint(
    data_dir: Path, env: dict[str, str]
) -> None:
    club_file(data_dir, "padel", {"url": PADEL_URL})
    first = by_id(load_all(data_dir, env, MATCH | {"club": "padel"}))["match"]
    same = by_id(load_all(data_dir, env, MATCH | {"club": "padel"}))["match"]
    club_file(data_dir, "padel", {"url": PADEL_URL, "window": "6d@08:00"})
    moved = by_id(load_all(data_dir, env, MATCH | {"club": "padel"}))["match"]
    assert first.fingerprint == same.fingerprint != moved.fingerprint


def test_a_template_file_may_carry_a_window_and_about(data_dir: Path, env: dict[str, str]) -> None:
    write_json(data_dir / "club.json", {"window": "6d@08:00", "about": "Padel Club"})
    settings = Settings.from_env(env | {"BOOKING_REQUEST_TEMPLATE": "club.json"})
    template = config_loader.load_template(settings)
    assert template is not None and template.window == utils.parse_window("6d@08:00")
    write_json(data_dir / "club.json", {"window": "6d@8"})
    with pytest.raises(TemplateError) as info:
        config_loader.load_template(settings)
    assert str(info.value) == (
        f"BOOKING_REQUEST_TEMPLATE {data_dir}/club.json: window: '6d@8' {WINDOW_EXPECTED}"
    )


def test_read_config_keeps_the_last_good_template_when_the_file_breaks(
    data_dir: Path, env: dict[str, str]
) -> None:
    write_json(data_dir / "club.json", {"window": "6d@08:00"})
    settings = Settings.from_env(env | {"BOOKING_REQUEST_TEMPLATE": "club.json"})
    good = config_loader.load_template(settings)
    write_json(data_dir / "club.json", {"method": "BREW"})
    write_json(data_dir / "schedules.json", [MATCH])
    write_json(data_dir / "tokens.json", {"default": "tok-d"})
    config = read_config(settings, settings.fernet(), NOW, last_template=good)
    assert config.template is good
    assert config.template_error == (
        f"BOOKING_REQUEST_TEMPLATE {data_dir}/club.json: method: 'BREW' is not one of POST, PUT, "
        "PATCH, GET, DELETE"
    )
    assert config.errors == [config.template_error]
    assert str(config.schedules.entries[0].window) == "6d@08:00"  # the last good one's


def random_entry(rng: random.Random, i: int) -> dict[str, Any]:
    """An entry on a coarse grid of times and lengths, so that many overlap, some several
    times a day (a rule with two hours)."""
    day = 2 + rng.randrange(14)
    time = f"{7 + rng.randrange(5):02d}:{rng.choice(['00', '15', '30', '45'])}"
    entry: dict[str, Any] = {
        "id": f"e{i}",
        "type": rng.choice(["one-off", "recurring"]),
        "desired_time": f"2026-12-{day:02d} {time}",
        "duration_minutes": rng.choice([15, 30, 60, 90, 180, 300]),
    }
    if entry["type"] == "recurring":
        rules = [
            "FREQ=WEEKLY",
            "FREQ=DAILY;INTERVAL=3",
            "FREQ=DAILY;INTERVAL=2;BYHOUR=8,10;BYMINUTE=15",
            "every Tuesday at 09:00",
        ]
        entry["rrule"] = rng.choice(rules)
    if rng.random() < 0.15:
        entry["enabled"] = False
    return entry


@pytest.mark.parametrize("seed", range(8))
def test_the_caches_overlap_warnings_are_those_of_a_fresh_read_through_edits(
    data_dir: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    entries = [random_entry(rng, i) for i in range(24)]
    cache = config_loader.EntryCache()
    now = NOW
    afresh: list[int] = []
    sweep = config_loader.overlap_warnings

    def counted(*args: Any) -> list[str]:
        afresh.append(1)
        return sweep(*args)

    for step in range(30):
        monkeypatch.setattr(config_loader, "overlap_warnings", counted)
        result = cached(data_dir, cache, *entries, now=now)
        monkeypatch.setattr(config_loader, "overlap_warnings", sweep)
        assert afresh == []  # the cache's index, not a fresh sweep
        assert result.warnings == schedules(data_dir, *entries, now=now).warnings, step
        assert any("overlapping" in w for w in result.warnings)
        move = rng.random()
        if move < 0.5:  # edit one entry
            entries[rng.randrange(len(entries))] = random_entry(rng, rng.randrange(100, 10**6))
        elif move < 0.7:  # swap two (positions change, contents do not)
            a, b = rng.randrange(len(entries)), rng.randrange(len(entries))
            entries[a], entries[b] = entries[b], entries[a]
        elif move < 0.8:  # remove one
            entries.pop(rng.randrange(len(entries)))
        elif move < 0.9:  # add many at once (rebuilt)
            entries += [random_entry(rng, rng.randrange(10**6, 10**7)) for _ in range(20)]
        else:  # time passes: some starts go by
            now += timedelta(days=rng.randrange(1, 4))


# --------------------------------------------------------------------------- section 13


def test_watch_interval_defaults_to_300_and_is_at_least_60() -> None:
    assert Settings.from_env({}).watch_interval == 300.0
    assert Settings.from_env({"WATCH_INTERVAL_SECONDS": "60"}).watch_interval == 60.0
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"WATCH_INTERVAL_SECONDS": "59"})
    assert str(raised.value) == "WATCH_INTERVAL_SECONDS: '59' must be a finite number >= 60"


def test_fallback_times_watch_and_players_make_the_entry(data_dir: Path) -> None:
    result = schedules(
        data_dir,
        MATCH | {"fallback_times": ["19:00", "16:30"], "watch": "2h", "players": ["ana", "Ben"]},
        WED | {"watch": "90m"},
        NO_ID | {"watch": False},
    )
    assert result.errors == [] and result.warnings == []
    match, wed, no_id = result.entries
    assert (match.fallback_times, match.watch_minutes, match.players) == (
        ("19:00", "16:30"),
        120,
        ("ana", "Ben"),
    )
    assert (wed.fallback_times, wed.watch_minutes, wed.players) == ((), 90, ())
    assert no_id.watch_minutes is None
    start = datetime(2026, 12, 10, 18, 0, tzinfo=UTC)
    assert match.watch_end(start) == datetime(2026, 12, 10, 16, 0, tzinfo=UTC)
    assert match.slot(start).players == ("ana", "Ben")
    # Each fallback time on the same local date, with its own trigger (168 h before it).
    assert match.fallbacks(start) == [
        (
            "19:00",
            datetime(2026, 12, 10, 19, 0, tzinfo=UTC),
            datetime(2026, 12, 3, 19, 0, tzinfo=UTC),
        ),
        (
            "16:30",
            datetime(2026, 12, 10, 16, 30, tzinfo=UTC),
            datetime(2026, 12, 3, 16, 30, tzinfo=UTC),
        ),
    ]


def test_fallback_times_are_on_the_local_date_of_the_entrys_zone(data_dir: Path) -> None:
    (wed,) = schedules(data_dir, WED | {"fallback_times": ["23:30", "17:00"]}).entries
    # Wed 2026-12-02 17:00 in London (GMT); 17:00 itself is left out of the fallbacks.
    start = datetime(2026, 12, 2, 17, 0, tzinfo=UTC)
    assert [(t, s) for t, s, _ in wed.fallbacks(start)] == [
        ("23:30", datetime(2026, 12, 2, 23, 30, tzinfo=UTC))
    ]
    berlin_zone = utils.get_zone("Europe/Berlin")
    (berlin,) = schedules(
        data_dir,
        MATCH
        | {
            "timezone": "Europe/Berlin",
            "desired_time": "2026-12-10 00:30",
            "fallback_times": ["23:00"],
        },
    ).entries
    assert berlin.fallbacks(berlin.desired_moment)[0][1] == datetime(
        2026, 12, 10, 23, 0, tzinfo=berlin_zone
    )


def test_a_fallback_time_equal_to_the_desired_time_is_a_warning(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"fallback_times": ["18:00", "19:00"]})
    assert result.errors == []
    assert result.warnings == [
        "schedules.json entry 'match' (#1): fallback_times: '18:00' is the desired time itself; "
        "it is skipped (list only other times)"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("18:00", '\'18:00\' is not a list of local times; expected e.g. ["18:00", "16:30"]'),
        (
            ["18:00", "7:30"],
            "'7:30' is not a local time 'HH:MM'; expected e.g. [\"18:00\", \"16:30\"]",
        ),
        (["24:00"], "'24:00' is not a local time 'HH:MM'; expected e.g. [\"18:00\", \"16:30\"]"),
        ([1800], '1800 is not a local time \'HH:MM\'; expected e.g. ["18:00", "16:30"]'),
        (["19:00", "19:00"], "['19:00', '19:00'] lists '19:00' twice"),
    ],
)
def test_fallback_times_must_be_a_list_of_local_times(
    data_dir: Path, value: Any, message: str
) -> None:
    result = schedules(data_dir, MATCH | {"fallback_times": value}, WED)
    assert only_error(result) == f"schedules.json entry 'match' (#1): fallback_times: {message}"
    rejected_alone(result, "wed-evening")


@pytest.mark.parametrize("value", ["2", "2 h", "0h", "2d", True, 2, None, "h"])
def test_watch_must_be_hours_or_minutes_or_false(data_dir: Path, value: Any) -> None:
    result = schedules(data_dir, NO_ID | {"watch": value})
    assert only_error(result) == (
        f'schedules.json entry #1: watch: {value!r} is not a watch; expected "<N>h" or '
        '"<N>m" (how long before the start the watch ends, N at least 1, e.g. "2h" or "90m") '
        "or false"
    )


def test_a_watch_longer_than_the_window_is_an_error(data_dir: Path) -> None:
    result = schedules(data_dir, MATCH | {"watch": "168h"}, WED | {"watch": "167h", "window": "7d"})
    assert only_error(result) == (
        "schedules.json entry 'match' (#1): watch: '168h' is longer than the entry's window "
        "('168h', 168h before the start): the watch would end before the window opens; give a "
        "shorter watch"
    )
    rejected_alone(result, "wed-evening")


@pytest.mark.parametrize("value", ["ana", [1, "Ben"], [""], ["a\nb"], {"a": "b"}])
def test_players_must_be_a_list_of_strings(data_dir: Path, value: Any) -> None:
    result = schedules(data_dir, MATCH | {"players": value})
    assert only_error(result) == (
        f"schedules.json entry 'match' (#1): players: {value!r} is not a list of names "
        '(non-empty strings on one line); expected e.g. ["ana@example.com", "Ben"]'
    )


def test_a_player_the_entry_lacks_is_an_error_of_the_entry(
    data_dir: Path, env: dict[str, str]
) -> None:
    path = club_file(
        data_dir, "duo", {"url": PADEL_URL, "json": {"with": "{players[1]}", "all": "{players}"}}
    )
    config = load_all(
        data_dir,
        env,
        MATCH | {"club": "duo", "players": ["ana"]},
        WED | {"club": "duo", "players": ["ana", "Ben"]},
        NO_ID | {"club": "duo"},
    )
    assert config.errors == [
        f"schedules.json entry 'match' (#1): players: {path} names {{players[1]}}, and this "
        'entry has 1 player; give at least 2 (e.g. ["ana@example.com", "Ben"])',
        f"schedules.json entry #3: players: {path} names {{players[1]}}, and this entry has 0 "
        'players; give at least 2 (e.g. ["ana@example.com", "Ben"])',
    ]
    assert [e.id for e in config.schedules.entries] == ["wed-evening"]


def test_a_template_naming_a_player_checks_the_entries_without_a_club(
    data_dir: Path, env: dict[str, str]
) -> None:
    write_json(data_dir / "template.json", {"json": {"p": "{players[0]}"}})
    config = load_all(data_dir, env, MATCH, BOOKING_REQUEST_TEMPLATE="template.json")
    assert config.errors == [
        f"schedules.json entry 'match' (#1): players: BOOKING_REQUEST_TEMPLATE "
        f"{data_dir}/template.json names {{players[0]}}, and this entry has 0 players; give at "
        'least 1 (e.g. ["ana@example.com", "Ben"])'
    ]


def test_a_club_file_that_comes_to_name_a_player_revalidates_cached_entries(
    data_dir: Path, env: dict[str, str]
) -> None:
    club_file(data_dir, "duo", {"url": PADEL_URL, "json": {"p": "{players}"}})
    write_json(data_dir / "schedules.json", [MATCH | {"club": "duo", "players": ["ana"]}])
    write_json(data_dir / "tokens.json", {"default": "tok-d"})
    settings = Settings.from_env(env)
    cache = config_loader.EntryCache()
    assert read_config(settings, settings.fernet(), NOW, cache=cache).errors == []
    club_file(data_dir, "duo", {"url": PADEL_URL, "json": {"p": "{players[1]}"}})
    errors = read_config(settings, settings.fernet(), NOW, cache=cache).errors
    assert len(errors) == 1 and "names {players[1]}, and this entry has 1 player" in errors[0]


def test_the_new_keys_are_known_keys() -> None:
    assert {"fallback_times", "watch", "players"} <= set(ENTRY_KEYS)


def test_about_is_a_note_for_people_and_changes_nothing(data_dir: Path) -> None:
    plain = schedules(data_dir, WED)
    noted = schedules(data_dir, WED | {"about": "an example: disabled until it is yours"})
    assert noted.errors == []
    ignored = {"rule": None, "fingerprint": ""}
    assert dataclasses.replace(noted.entries[0], **ignored) == dataclasses.replace(
        plain.entries[0], **ignored
    )
    result = schedules(data_dir, WED | {"about": ["not", "text"]})
    assert only_error(result) == (
        "schedules.json entry 'wed-evening' (#1): about: ['not', 'text'] is not a string "
        "(a note for people, ignored)"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `check` in a container runs")
def test_a_file_the_daemon_cannot_read_is_named_when_check_runs_as_root(
    data_dir: Path, env: dict[str, str]
) -> None:
    os.chown(data_dir, 10001, 10001)  # the daemon's DATA_DIR, as in the image
    write_json(data_dir / "schedules.json", [])
    write_json(data_dir / "tokens.json", {"default": "t"})
    (data_dir / "schedules.json").chmod(0o644)  # root-owned but readable by all: fine
    (data_dir / "tokens.json").chmod(0o600)  # root-owned, owner-only: not for uid 10001
    club_file(data_dir, "mine", {"url": PADEL_URL})
    os.chown(data_dir / "clubs" / "mine.json", 10001, 10001)
    (data_dir / "clubs" / "mine.json").chmod(0o600)
    settings = Settings.from_env(env)
    assert config_loader.unreadable_by_daemon(settings) == [
        f"{data_dir}/tokens.json: the daemon (uid 10001, the owner of {data_dir}) cannot read "
        f"it (owner uid 0, mode 0600): run `chown 10001:10001 {data_dir}/tokens.json`, or "
        "restart the container (its entrypoint hands every file in DATA_DIR to the daemon)"
    ]
    os.chown(data_dir, 0, 0)  # a DATA_DIR of root's: root runs the daemon, reads everything
    assert config_loader.unreadable_by_daemon(settings) == []
