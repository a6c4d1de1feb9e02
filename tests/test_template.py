"""template.py: request templates (CONTRACT section 11) and flows (section 12), purely: parsing
and its errors (file, step, key), placeholders, rendering, answer matching, extraction, and what
``check`` prints."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

import config_loader
import utils
from template import (
    ExtractError,
    Flow,
    MissingValue,
    Reply,
    Slot,
    TemplateError,
    default_flow,
    describe_booking,
    describe_flow,
    extract_values,
    host_allowed,
    idempotency_key,
    parse_flow,
    placeholder_values,
    stale_warning,
)

START = datetime(2025, 8, 10, 12, 0, tzinfo=UTC)  # 14:00 in Berlin (CEST, +02:00)
BERLIN = utils.get_zone("Europe/Berlin")
TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
KEY = "wed@2025-08-10T12:00:00Z"


def values(court: str | None = "3", token: str = "tok-1", **secrets: str) -> dict[str, Any]:
    return placeholder_values(
        secrets={"token": token, **secrets},
        court_id=court,
        start=START,
        duration_minutes=90,
        zone=BERLIN,
        key=KEY,
    )


def parse(data: Any, api_url: str | None = "https://club.example/api") -> Flow:
    return parse_flow(data, api_url=api_url, name="t.json")


def flow(*steps: dict[str, Any], **top: Any) -> Flow:
    """A flow of ``steps`` (the last one is the booking step unless one says so)."""
    listed = [dict(step) for step in steps]
    if not any(step.get("booking") for step in listed):
        listed[-1]["booking"] = True
    return parse_flow({"steps": listed, **top}, api_url=None, name="club.json")


def step(name: str, url: str = "https://api.club.example/x", **keys: Any) -> dict[str, Any]:
    return {"name": name, "url": url, **keys}


def error_of(data: Any, api_url: str | None = None, name: str = "club.json") -> str:
    with pytest.raises(TemplateError) as raised:
        parse_flow(data, api_url=api_url, name=name)
    return str(raised.value)


def reply(
    body: Any = b"",
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    url: str = "https://api.club.example/x",
    cookies: dict[str, str] | None = None,
) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Reply(status, headers or {}, raw, url, cookies or {})


# --------------------------------------------------------------------------- placeholders


def test_every_placeholder_has_its_value() -> None:
    got = values(email="me@example.com")
    assert {k: v for k, v in got.items() if not k.endswith(":")} == {
        "token": "tok-1",
        "secret.token": "tok-1",
        "secret.email": "me@example.com",
        "court_id": "3",
        "start": "2025-08-10T14:00:00+02:00",
        "end": "2025-08-10T15:30:00+02:00",
        "start_utc": "2025-08-10T12:00:00Z",
        "end_utc": "2025-08-10T13:30:00Z",
        "date": "2025-08-10",
        "time": "14:00",
        "end_time": "15:30",
        "duration_minutes": 90,
        "duration_seconds": 5400,
        "key": KEY,
        "epoch_ms": 1754827200000,
        "epoch_s": 1754827200,
        "start_minutes": 840,
        "end_minutes": 930,
        "start_seconds_of_day": 50400,
    }


def test_minutes_after_midnight_count_from_the_starts_local_date() -> None:
    # 23:30 in Berlin for 90 minutes ends at 01:00 the next day: 1440 + 60 after the start's
    # midnight; a summer-time change inside the booking moves the end's wall clock, not the start.
    late = placeholder_values(
        secrets={},
        court_id=None,
        start=datetime(2025, 8, 10, 21, 30, 15, tzinfo=UTC),
        duration_minutes=90,
        zone=BERLIN,
        key=KEY,
    )
    assert (late["start_minutes"], late["end_minutes"]) == (1410, 1500)
    assert late["start_seconds_of_day"] == 1410 * 60 + 15
    over_the_change = placeholder_values(
        secrets={},
        court_id=None,
        start=datetime(2025, 10, 26, 0, 0, tzinfo=UTC),  # 02:00 CEST, the hour before the change
        duration_minutes=120,
        zone=BERLIN,
        key=KEY,
    )
    assert (over_the_change["start_minutes"], over_the_change["end_minutes"]) == (120, 180)
    book = parse(
        {
            "json": {
                "StartTime": "{start_minutes}",
                "End": "{end_minutes}",
                "s": "{start_seconds_of_day}",
                "t": "at {start_minutes}",
            }
        }
    ).booking_step
    body = json.loads(book.render(values()).body or b"")
    assert body == {"StartTime": 840, "End": 930, "s": 50400, "t": "at 840"}


def test_an_object_token_without_a_token_field_has_no_token_value() -> None:
    got = placeholder_values(
        secrets={"email": "a@b.c"},
        court_id=None,
        start=START,
        duration_minutes=60,
        zone=BERLIN,
        key=KEY,
    )
    assert "token" not in got
    assert got["secret.email"] == "a@b.c"
    single = parse({"headers": {"Authorization": "Bearer {token}"}}).booking_step
    with pytest.raises(MissingValue) as raised:
        single.render(got)
    assert raised.value.ref == "token"


def test_defaults_method_post_url_from_booking_api_url_and_idempotency_header() -> None:
    book = parse({}).booking_step
    assert book.method == "POST"
    assert book.idempotency_header == "Idempotency-Key"
    assert not parse({}).has_url
    rendered = book.render(values(), "k")
    assert rendered.url == "https://club.example/api"
    assert rendered.body is None
    assert rendered.headers == {"Idempotency-Key": "k"}


def test_a_whole_string_placeholder_takes_the_value_json_type() -> None:
    book = parse(
        {
            "json": {
                "minutes": "{duration_minutes}",
                "seconds": "{duration_seconds}",
                "court": "{court_id}",
                "label": "court {court_id} for {duration_minutes} min",
                "nested": [{"at": "{epoch_ms}", "s": "{epoch_s}"}],
                "players": 2,
            }
        }
    ).booking_step
    body = json.loads(book.render(values()).body or b"")
    assert body == {
        "minutes": 90,
        "seconds": 5400,
        "court": "3",
        "label": "court 3 for 90 min",
        "nested": [{"at": 1754827200000, "s": 1754827200}],
        "players": 2,
    }
    any_court = json.loads(book.render(values(court=None)).body or b"")
    assert any_court["court"] is None
    assert any_court["label"] == "court  for 90 min"


def test_literal_braces() -> None:
    book = parse({"json": {"note": "{{literal}} and {{{date}}}"}}).booking_step
    body = json.loads(book.render(values()).body or b"")
    assert body == {"note": "{literal} and {2025-08-10}"}


def test_url_placeholders_are_percent_encoded() -> None:
    template = parse({"url": "https://club.example/courts/{court_id}/book?at={start}"})
    rendered = template.booking_step.render(values(court="A/1 b"))
    assert rendered.url == (
        "https://club.example/courts/A%2F1%20b/book?at=2025-08-10T14%3A00%3A00%2B02%3A00"
    )
    assert template.has_url


def test_form_body_and_headers() -> None:
    book = parse(
        {
            "headers": {"Authorization": "Bearer {token}", "X-When": "{date} {time}"},
            "form": {"date": "{date}", "from": "{time}", "to": "{end_time}", "players": 2},
        }
    ).booking_step
    rendered = book.render(values())
    assert rendered.headers["Authorization"] == "Bearer tok-1"
    assert rendered.headers["X-When"] == "2025-08-10 14:00"
    assert rendered.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs((rendered.body or b"").decode()) == {
        "date": ["2025-08-10"],
        "from": ["14:00"],
        "to": ["15:30"],
        "players": ["2"],
    }


def test_strftime_formats_local_for_start_and_end_utc_for_the_utc_ones() -> None:
    book = parse(
        {
            "url": "https://club.example/day/{start:%d-%m-%Y}",
            "json": {
                "us": "{start:%m/%d/%Y}",
                "until": "{end:%H:%M}",
                "stamp": "{start_utc:%Y%m%dT%H%M%SZ}",
                "end_utc": "{end_utc:%H:%M}",
                "zone": "{start:%z}",
            },
        }
    ).booking_step
    rendered = book.render(values())
    assert rendered.url == "https://club.example/day/10-08-2025"
    assert json.loads(rendered.body or b"") == {
        "us": "08/10/2025",
        "until": "15:30",
        "stamp": "20250810T120000Z",
        "end_utc": "13:30",
        "zone": "+0200",
    }


def test_secret_fields_are_placeholders_and_listed_by_the_flow() -> None:
    login = step(
        "login",
        json={"email": "{secret.email}", "password": "{secret.password}"},
        extract={"jwt": {"json": "token"}},
    )
    book = step("book", headers={"Authorization": "Bearer {login.jwt}"})
    parsed = flow(login, book)
    assert parsed.secret_fields == {"email", "password"}
    assert not parsed.uses_token
    assert parse({"headers": {"A": "{token}"}}).uses_token
    body = parsed.steps[0].render(values(email="me@x", password="pw"))
    assert json.loads(body.body or b"") == {"email": "me@x", "password": "pw"}
    with pytest.raises(MissingValue) as raised:
        parsed.steps[0].render(values(email="me@x"))
    assert raised.value.ref == "secret.password"


def test_an_extracted_value_keeps_its_json_type_in_a_whole_string_and_is_text_elsewhere() -> None:
    login = step("login", extract={"user": {"json": "user"}, "ids": {"json": "ids"}})
    book = step(
        "book",
        url="https://api.club.example/u/{login.user}",
        json={"user": "{login.user}", "ids": "{login.ids}", "label": "u{login.user}"},
    )
    parsed = flow(login, book)
    got = values() | {"login.user": 42, "login.ids": [1, "a b"]}
    rendered = parsed.booking_step.render(got)
    assert json.loads(rendered.body or b"") == {"user": 42, "ids": [1, "a b"], "label": "u42"}
    assert rendered.url == "https://api.club.example/u/42"
    text = parsed.booking_step.render(got | {"login.user": "a/b c"})
    assert text.url == "https://api.club.example/u/a%2Fb%20c"


# --------------------------------------------------------------------------- section 11 errors


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": "red"}, "t.json: colour: unknown key; expected one of method, url"),
        ({"method": "FETCH"}, "t.json: method: 'FETCH' is not one of POST, PUT, PATCH, GET"),
        (
            {"url": "https://{court_id}.club.example/book"},
            "t.json: url: a placeholder may not stand in the scheme or host",
        ),
        ({"url": "{start}://club.example/"}, "is not an http(s) URL"),
        (
            {"url": "ftp://club.example/"},
            "t.json: url: 'ftp://club.example/' is not an http(s) URL",
        ),
        (
            {"url": "https://user:pw@club.example/"},
            "t.json: url: 'https://***@club.example/' holds a user",
        ),
        ({"headers": {"X-A": 5}}, "t.json: headers: expected an object of strings"),
        (
            {"headers": {"Authorization": "Bearer {tokn}"}},
            "t.json: headers.Authorization: unknown placeholder {tokn} in 'Bearer {tokn}'",
        ),
        (
            {"json": {"a": ["{oops}"]}},
            "t.json: json.a[0]: unknown placeholder {oops}",
        ),
        ({"json": {"a": "x } y"}}, "t.json: json.a: unbalanced '}' in 'x } y'"),
        ({"json": {}, "form": {}}, "t.json: json, form: give one body, not both"),
        ({"form": {"a": {"b": 1}}}, "t.json: form: expected an object of strings or numbers"),
        ({"taken": {"status": 409}}, "t.json: taken.status: expected a non-empty list of HTTP"),
        ({"booked": {"body_contains": "ok"}}, "t.json: booked.status: expected a non-empty list"),
        ({"rejected": {"status": [400], "body": "x"}}, "t.json: rejected: unknown key 'body'"),
        ({"taken": {"status": [409], "body_contains": ""}}, "taken.body_contains: expected a"),
        ({"early": {"status": [409], "body_contains": []}}, "early.body_contains: expected a"),
        ({"taken": {"status": [409], "body_contains": ["a", 1]}}, "taken.body_contains: expect"),
        ({"booking_ref": "a..b"}, "t.json: booking_ref: 'a..b' is not a JSON path"),
        ({"idempotency_header": "Bad Header"}, "t.json: idempotency_header: 'Bad Header' is not"),
        ({"window": "7 days"}, "t.json: window: '7 days' is not a window"),
        ({"window": 7}, "t.json: window: expected a string"),
        ({"about": ["x"]}, "t.json: about: expected a string"),
        ({"json": {"a": "{date:%Y}"}}, "t.json: json.a: {date:%Y} in '{date:%Y}': only start, end"),
        ({"json": {"a": "{secret}"}}, "t.json: json.a: {secret} in '{secret}': name a field"),
        ({"json": {"a": "{login.jwt}"}}, "t.json: json.a: unknown placeholder {login.jwt}"),
        ([], "t.json: expected a JSON object"),
    ],
)
def test_invalid_templates_name_the_key(data: Any, message: str) -> None:
    assert message in error_of(data, api_url="https://club.example/api", name="t.json")


def test_url_required_when_booking_api_url_is_unset() -> None:
    with pytest.raises(TemplateError, match="url: missing, and BOOKING_API_URL is not set"):
        parse({}, api_url=None)
    assert parse({"url": "https://club.example/x"}, api_url=None).has_url


def test_idempotency_header_renamed_or_off() -> None:
    renamed = parse({"idempotency_header": "X-Request-Id"}).booking_step
    assert renamed.render(values(), "k").headers["X-Request-Id"] == "k"
    off = parse({"idempotency_header": None}).booking_step
    assert off.render(values(), "k").headers == {}


def test_a_single_template_is_a_flow_of_one_booking_step_with_window_about_and_early() -> None:
    single = parse(
        {
            "url": "https://club.example:8443/book",
            "window": "6d@08:00" if _clock_windows() else "7d",
            "about": "my club",
            "early": {"status": [422], "body_contains": ["not open", "too early"]},
            "booked": {"status": [200]},
        }
    )
    assert single.single and len(single.steps) == 1
    assert single.booking_step.booking and single.booking_step.phase == "booking"
    assert single.hosts == ("club.example:8443",)
    assert single.about == "my club"
    assert single.window in ("6d@08:00", "7d")
    assert single.prepare_seconds == 0
    assert [kind for kind, _ in single.booking_step.matchers] == ["booked", "early"]
    assert single.booking_step.match(422, b"sorry, too early") == "early"
    assert single.booking_step.match(422, b"invalid") is None


def _clock_windows() -> bool:
    """Whether utils already reads ``<N>d@HH:MM`` windows (the config helper adds them)."""
    try:
        utils.parse_window("6d@08:00")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", ["path-form", "json-local", "taken-200"])
def test_bundled_examples_are_valid(name: str) -> None:
    data = json.loads((TEMPLATES / f"{name}.json").read_text())
    template = parse(data, api_url=None)
    assert template.hosts == ("club.example",)
    rendered = template.booking_step.render(values())
    assert "tok-1" in json.dumps(rendered.headers)


def test_default_request_is_section_6() -> None:
    rendered = default_flow("http://club.test/bookings").booking_step.render(values())
    assert rendered.method == "POST"
    assert rendered.url == "http://club.test/bookings"
    assert rendered.headers == {"Authorization": "Bearer tok-1", "Content-Type": "application/json"}
    assert json.loads(rendered.body or b"") == {
        "court_id": "3",
        "start": "2025-08-10T14:00:00+02:00",
        "end": "2025-08-10T15:30:00+02:00",
        "duration_minutes": 90,
    }


def test_check_describes_the_request_with_the_token_masked_and_the_court_key(
    data_dir: Path,
) -> None:
    (data_dir / "schedules.json").write_text(
        json.dumps(
            [
                {
                    "id": "wed",
                    "type": "one-off",
                    "desired_time": "2030-08-10 14:00",
                    "timezone": "Europe/Berlin",
                    "court_id": ["3", "4"],
                }
            ]
        )
    )
    now = datetime(2030, 1, 1, tzinfo=UTC)
    result = config_loader.read_schedules(
        data_dir / "schedules.json", default_zone="UTC", token_names={"default"}, now=now
    )
    (entry,) = result.entries
    template = parse(
        {"url": "https://club.example/c/{court_id}/{token}", "headers": {"X": "{token}"}}
    )
    text = describe_flow(template, entry.slot(START.replace(year=2030)))
    assert text.splitlines() == [
        "POST https://club.example/c/3/***",
        "X: ***",
        "Idempotency-Key: wed@2030-08-10T12:00:00Z#3",
    ]
    assert idempotency_key("k", "3", several=False) == "k"
    assert idempotency_key("k", None, several=True) == "k#"


# --------------------------------------------------------------------------- section 12: shape


def test_steps_get_their_phase_from_their_place_and_at_trigger() -> None:
    parsed = flow(
        step("login", extract={"jwt": {"header": "X-Token"}}),
        step("slot", at_trigger=True, extract={"id": {"json": "id"}}),
        step("book", booking=True, json={"slot": "{slot.id}"}),
        step("confirm", json={"jwt": "{login.jwt}"}),
    )
    assert [s.phase for s in parsed.steps] == ["prepare", "at_trigger", "booking", "finish"]
    assert [s.name for s in parsed.phase("prepare")] == ["login"]
    assert parsed.booking_step.name == "book"
    assert parsed.prepare_seconds == 60
    assert not parsed.single


def test_prepare_seconds_is_zero_without_a_preparation_step_and_bounded() -> None:
    assert flow(step("slot", at_trigger=True), step("book")).prepare_seconds == 0
    assert flow(step("a"), step("book"), prepare_seconds=3600).prepare_seconds == 3600
    assert flow(step("a"), step("book"), prepare_seconds=2.5).prepare_seconds == 2.5
    for bad in (0, 3601, -1, "60", True):
        message = error_of({"prepare_seconds": bad, "steps": [step("b", booking=True)]})
        assert message.startswith("club.json: prepare_seconds: expected a number of seconds above")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [step("a"), step("b")],
            'club.json: steps: expected exactly one step with "booking": true, found 0',
        ),
        (
            [step("a", booking=True), step("b", booking=True)],
            'club.json: steps: expected exactly one step with "booking": true, found 2 (a, b)',
        ),
        (
            [step("Login"), step("b", booking=True)],
            "club.json: step #1: name: 'Login' is not a step name",
        ),
        (
            [step("secret"), step("b", booking=True)],
            "club.json: step #1: name: 'secret' is not a step",
        ),
        (
            [step("start"), step("b", booking=True)],
            "club.json: step #1: name: 'start' is not a step",
        ),
        (
            [step("a"), step("a", booking=True)],
            "club.json: step #2: name: 'a' is used by an earlier step",
        ),
        ([{"url": "https://x.example/"}], "club.json: step #1: name: missing"),
        (
            [step("a", colour=1), step("b", booking=True)],
            "club.json: step 'a': colour: unknown key",
        ),
        (
            [step("a", taken={"status": [409]}), step("b", booking=True)],
            "club.json: step 'a': taken: only the booking step",
        ),
        (
            [step("a", booking_ref="id"), step("b", booking=True)],
            "club.json: step 'a': booking_ref: only the booking step",
        ),
        (
            [step("b", booking=True, ok={"status": [200]})],
            "club.json: step 'b': ok: the booking step reads",
        ),
        (
            [step("b", booking=True), step("c", at_trigger=True)],
            "club.json: step 'c': at_trigger: only steps before the booking step",
        ),
        (
            [step("b", booking=True, at_trigger=True)],
            "club.json: step 'b': at_trigger: the booking step",
        ),
        ([step("b", booking="yes")], "club.json: step 'b': booking: expected true or false"),
        (
            [step("b", booking=True, follow_redirects=1)],
            "club.json: step 'b': follow_redirects: expect",
        ),
        (
            [step("a", ok={"status": [200], "body_contains": 3}), step("b", booking=True)],
            "club.json: step 'a': ok.body_contains",
        ),
        (
            [step("a", method="BREW"), step("b", booking=True)],
            "club.json: step 'a': method: 'BREW'",
        ),
        (
            [step("b", booking=True, url="http://{key}.x/")],
            "club.json: step 'b': url: a placeholder",
        ),
        ([], "club.json: steps: expected a non-empty list"),
        (["x"], "club.json: step #1: name: missing"),
    ],
)
def test_invalid_steps_name_the_file_the_step_and_the_key(steps: list[Any], message: str) -> None:
    assert message in error_of({"steps": steps})


def test_unknown_flow_keys_and_values_name_the_key() -> None:
    assert error_of({"steps": [step("b", booking=True)], "host": []}).startswith(
        "club.json: host: unknown key; expected one of hosts, window, prepare_seconds, steps, "
        "about, sources, checked"
    )
    assert "club.json: window: '6 days' is not a window" in error_of(
        {"steps": [step("b", booking=True)], "window": "6 days"}
    )
    assert error_of({"steps": [step("b", booking=True)], "about": 1}) == (
        "club.json: about: expected a string (free text for people)"
    )


def test_about_is_kept_and_ignored_by_everything_else() -> None:
    parsed = flow(step("b"), about="Log in with {secret.email}: not a placeholder here")
    assert parsed.about is not None and parsed.secret_fields == frozenset()


# --------------------------------------------------------------------------- provenance

SOURCES = ["github.com/someone/client: api/login.go", "https://docs.club.example/api"]


def test_sources_and_checked_are_kept_by_flows_and_single_templates() -> None:
    parsed = flow(step("b"), sources=SOURCES, checked="2026-12-06")
    assert parsed.sources == tuple(SOURCES) and parsed.checked == date(2026, 12, 6)
    single = parse({"url": "https://club.example/b", "sources": SOURCES, "checked": "2026-01-31"})
    assert single.sources == tuple(SOURCES) and single.checked == date(2026, 1, 31)
    bare = flow(step("b"))
    assert bare.sources == () and bare.checked is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("github.com/x", "club.json: sources: expected a non-empty list of non-empty strings"),
        ([], "club.json: sources: expected a non-empty list of non-empty strings"),
        (["ok", " "], "club.json: sources: expected a non-empty list of non-empty strings"),
        (["ok", 3], "club.json: sources: expected a non-empty list of non-empty strings"),
    ],
)
def test_invalid_sources_name_the_file_and_key(value: Any, message: str) -> None:
    assert error_of({"steps": [step("b", booking=True)], "sources": value}).startswith(message)
    assert error_of({"url": "https://club.example/b", "sources": value}, name="t.json").startswith(
        message.replace("club.json", "t.json")
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "06/12/2026",
            "club.json: checked: expected a date YYYY-MM-DD (when the flow was last "
            "checked), got '06/12/2026'",
        ),
        (
            "2026-13-01",
            "club.json: checked: expected a date YYYY-MM-DD (when the flow was last "
            "checked), got '2026-13-01' (no such day)",
        ),
        (
            20261206,
            "club.json: checked: expected a date YYYY-MM-DD (when the flow was last "
            "checked), got 20261206",
        ),
        ("2026-12-06T10:00", "club.json: checked: expected a date YYYY-MM-DD"),
    ],
)
def test_invalid_checked_names_the_file_and_key(value: Any, message: str) -> None:
    assert error_of({"steps": [step("b", booking=True)], "checked": value}).startswith(message)
    assert error_of({"url": "https://club.example/b", "checked": value}, name="t.json").startswith(
        message.replace("club.json", "t.json")
    )


def test_a_checked_older_than_180_days_is_a_warning_with_the_fix() -> None:
    parsed = flow(step("b"), checked="2026-06-01")
    assert stale_warning(parsed, datetime(2026, 11, 28, 23, 0, tzinfo=UTC)) is None  # 180 days
    assert stale_warning(parsed, datetime(2026, 11, 29, 0, 0, tzinfo=UTC)) == (
        "club.json: checked 2026-06-01, 181 days ago (more than 180): systems change: run dry-run"
    )
    assert stale_warning(flow(step("b")), datetime(2030, 1, 1, tzinfo=UTC)) is None


# --------------------------------------------------------------------------- hosts


def test_hosts_default_to_the_steps_url_hosts() -> None:
    parsed = flow(
        step("login", url="https://auth.club.example/login"),
        step("book", url="https://API.club.example:8443/b"),
    )
    assert parsed.hosts == ("auth.club.example", "api.club.example:8443")


def test_every_step_url_must_be_on_hosts() -> None:
    message = error_of(
        {
            "hosts": ["api.club.example"],
            "steps": [step("login", url="https://auth.club.example/l"), step("b", booking=True)],
        }
    )
    assert message == (
        "club.json: step 'login': url: host 'auth.club.example' is not on hosts "
        "(api.club.example); the token and cookies only ever go to hosts"
    )


def test_a_host_entry_matches_any_port_unless_it_names_one() -> None:
    hosts = ["api.club.example", "auth.club.example:8443", "127.0.0.1:9000"]
    assert host_allowed(hosts, "https://api.club.example/x")
    assert host_allowed(hosts, "http://API.club.example:8080/x")
    assert host_allowed(hosts, "https://auth.club.example:8443/")
    assert not host_allowed(hosts, "https://auth.club.example/")
    assert not host_allowed(hosts, "https://auth.club.example:9443/")
    assert host_allowed(hosts, "http://127.0.0.1:9000/")
    assert not host_allowed(hosts, "http://127.0.0.1:9001/")
    assert not host_allowed(hosts, "https://evil.example/api.club.example")
    assert not host_allowed(hosts, "ftp://api.club.example/")
    assert not host_allowed(["club.example:443"], "http://club.example/")
    assert host_allowed(["club.example:443"], "https://club.example/")
    parsed = flow(step("b", url="https://api.club.example/x"), hosts=["api.club.example:443"])
    assert parsed.allows("https://api.club.example:443/y")
    assert not parsed.allows("https://api.club.example:444/y")


@pytest.mark.parametrize("hosts", [[], "api.club.example", ["api club"], [5], ["a.example:99999"]])
def test_invalid_hosts(hosts: Any) -> None:
    message = error_of({"hosts": hosts, "steps": [step("b", booking=True)]})
    assert message.startswith("club.json: hosts")


# --------------------------------------------------------------------------- values between steps


def test_a_value_of_an_earlier_step_is_a_placeholder() -> None:
    parsed = flow(
        step("login", extract={"jwt": {"header": "X-Token"}}),
        step("book", headers={"Authorization": "Bearer {login.jwt}"}),
    )
    rendered = parsed.booking_step.render(values() | {"login.jwt": "j.w.t"})
    assert rendered.headers["Authorization"] == "Bearer j.w.t"
    assert parsed.booking_step.uses == {"login"}


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [
                step("book", booking=True, json={"id": "{slot.id}"}),
                step("slot", extract={"id": {"json": "id"}}),
            ],
            "club.json: step 'book': json.id: {slot.id} in '{slot.id}': step 'slot' is used "
            "before it runs",
        ),
        (
            [
                step(
                    "book",
                    booking=True,
                    url="https://a.example/{book.id}",
                    extract={"id": {"json": "id"}},
                )
            ],
            "club.json: step 'book': url: {book.id} in 'https://a.example/{book.id}': step "
            "'book' is used before it runs",
        ),
        (
            [
                step("login", extract={"jwt": {"json": "t"}}),
                step("b", booking=True, headers={"A": "{login.jw}"}),
            ],
            "club.json: step 'b': headers.A: {login.jw} in '{login.jw}': step 'login' extracts "
            "no value 'jw' (it extracts: jwt)",
        ),
        (
            [step("login"), step("b", booking=True, json={"a": "{login}"})],
            "club.json: step 'b': json.a: {login} in '{login}': name a value of step 'login'",
        ),
        (
            [step("b", booking=True, json={"a": "{nope.x}"})],
            "club.json: step 'b': json.a: unknown placeholder {nope.x} in '{nope.x}'",
        ),
        (
            [
                step("login", extract={"jwt": {"json": "t"}}),
                step("b", booking=True, json={"a": "{login.jwt:%Y}"}),
            ],
            "club.json: step 'b': json.a: {login.jwt:%Y} in '{login.jwt:%Y}': only start, end",
        ),
        (
            [
                step("a", extract={"id": {"json": "x[id={later.v}]"}}),
                step("later", booking=True, extract={"v": {"json": "v"}}),
            ],
            "club.json: step 'a': extract.id.json: {later.v} in '{later.v}': step 'later' is "
            "used before it runs",
        ),
    ],
)
def test_a_placeholder_no_earlier_step_extracts_is_an_error(steps: list[Any], message: str) -> None:
    assert error_of({"steps": steps}).startswith(message)


def test_steps_using_court_id_directly_or_through_a_value_run_per_court() -> None:
    parsed = flow(
        step("login", extract={"jwt": {"json": "t"}}),
        step("plan", extract={"slot": {"json": "slots[court={court_id}].id"}}),
        step(
            "form",
            url="https://api.club.example/f/{plan.slot}",
            extract={"t": {"regex": "t=(\\w+)"}},
        ),
        step("me", headers={"A": "{login.jwt}"}),
        step("book", booking=True, json={"t": "{form.t}"}),
    )
    assert {s.name: s.per_court for s in parsed.steps} == {
        "login": False,
        "plan": True,
        "form": True,
        "me": False,
        "book": True,
    }


# --------------------------------------------------------------------------- extraction


def ex(spec: dict[str, Any], *before: dict[str, Any]) -> Flow:
    """A flow whose booking step extracts ``value`` with ``spec``."""
    return flow(*before, step("book", booking=True, extract={"value": spec}))


def take(parsed: Flow, answer: Reply, **extra: Any) -> Any:
    found, problems = extract_values(parsed.booking_step, answer, values() | extra)
    if problems:
        raise ExtractError("; ".join(problems))
    return found["book.value"]


def test_json_paths_keys_indexes_and_filters() -> None:
    doc = {
        "data": {"items": [{"id": 7}, {"id": 8}]},
        "slots": [
            {"court": 3, "start": "13:00", "id": "a"},
            {"court": "3", "start": "14:00", "id": "b"},
            {"court": 4, "start": "14:00", "id": "c", "ok": True},
        ],
        "hydra:member": [{"id": 3, "prices": [{"duration": 5400, "id": "p90"}]}],
    }
    assert take(ex({"json": "data.items[1].id"}), reply(doc)) == 8
    assert take(ex({"json": "data.items.0.id"}), reply(doc)) == 7
    # A filter compares as text (3 equals "3"), may hold placeholders, and chains.
    assert take(ex({"json": "slots[court={court_id}][start={time}].id"}), reply(doc)) == "b"
    assert take(ex({"json": "slots[court=4][ok=true].id"}), reply(doc)) == "c"
    path = "hydra:member[id={court_id}].prices[duration=5400].id"
    assert take(ex({"json": path}), reply(doc)) == "p90"
    assert take(ex({"json": "data.items"}), reply(doc)) == [{"id": 7}, {"id": 8}]
    assert take(ex({"json": "[0].id"}), reply([{"id": 1}])) == 1
    secret_filter = ex({"json": "slots[id={secret.slot}].court"})
    assert take(secret_filter, reply(doc), **{"secret.slot": "c"}) == 4


def test_a_filters_field_may_be_a_dotted_path_into_the_element() -> None:
    doc = {
        "data": [
            {"id": 1, "starts_at": {"format_24_hour": "13:00"}, "action": {"status": "BOOK"}},
            {"id": 2, "starts_at": {"format_24_hour": "14:00"}, "action": {"status": "FULL"}},
            {"id": 3, "starts_at": {"format_24_hour": "14:00"}, "action": {"status": "BOOK"}},
            {"id": 4, "starts_at": "14:00"},
        ]
    }
    path = "data[starts_at.format_24_hour={time}][action.status=BOOK].id"
    assert take(ex({"json": path}), reply(doc)) == 3
    assert take(ex({"json": "data[starts_at.format_24_hour={time}].id"}), reply(doc)) == 2
    with pytest.raises(ExtractError, match=r"no element of data matches \[starts_at.f"):
        take(ex({"json": "data[starts_at.format_12_hour=2pm].id"}), reply(doc))


def test_a_filter_can_use_an_earlier_steps_value() -> None:
    parsed = ex(
        {"json": "methods[type={login.kind}].id"},
        step("login", extract={"kind": {"json": "kind"}}),
    )
    doc = {"methods": [{"type": "CARD", "id": 1}, {"type": "CASH", "id": 2}]}
    assert take(parsed, reply(doc), **{"login.kind": "CASH"}) == 2


@pytest.mark.parametrize(
    ("path", "document", "message"),
    [
        ("data.id", {"data": {}}, "value 'value' (json 'data.id'): no 'id' in data"),
        ("data.id", {"x": 1}, "value 'value' (json 'data.id'): no 'data' in the answer"),
        ("a[2]", {"a": [1]}, "value 'value' (json 'a[2]'): a has no element [2] (it has 1)"),
        ("a[0]", {"a": {}}, "value 'value' (json 'a[0]'): a is not a list"),
        (
            "s[court={court_id}].id",
            {"s": [{"court": 4}]},
            "value 'value' (json 's[court={court_id}].id'): no element of s matches "
            "[court={court_id}]",
        ),
        ("a", {"a": None}, "value 'value' (json 'a'): it is null"),
        ("a", b"<html>oops</html>", "value 'value' (json 'a'): the answer is not JSON"),
    ],
)
def test_a_json_value_that_cannot_be_extracted_says_where_the_path_broke_off(
    path: str, document: Any, message: str
) -> None:
    with pytest.raises(ExtractError) as raised:
        take(ex({"json": path}), reply(document))
    assert str(raised.value) == message


def test_header_cookie_regex_and_url_extractions() -> None:
    answer = reply(
        b'<form><input name="csrf" value="tok-9"></form>',
        headers={"jwt-Token": "eyJ.x"},
        url="https://api.club.example/done?booking=B-17&x=1",
        cookies={"SESSION": "s3"},
    )
    assert take(ex({"header": "JWT-token"}), answer) == "eyJ.x"
    assert take(ex({"cookie": "SESSION"}), answer) == "s3"
    assert take(ex({"regex": 'name="csrf" value="([^"]+)"'}), answer) == "tok-9"
    assert take(ex({"url": "booking=([A-Z0-9-]+)"}), answer) == "B-17"


def test_a_text_value_may_be_url_decoded_once_taken() -> None:
    answer = reply(b"fixUrl('https://x.example/form?a=1&amp;requestData=ab%2Bc%2Fd%3D%3D')")
    spec = {"regex": "requestData=([^&']+)"}
    assert take(ex(spec), answer) == "ab%2Bc%2Fd%3D%3D"
    assert take(ex({**spec, "decode": "url"}), answer) == "ab+c/d=="
    error = error_of(
        {"steps": [step("b", booking=True, extract={"v": {"json": "id", "decode": "url"}})]}
    )
    assert error.startswith("club.json: step 'b': extract.v.decode: expected \"url\"")
    error = error_of(
        {"steps": [step("b", booking=True, extract={"v": {**spec, "decode": "base64"}})]}
    )
    assert "got 'base64'" in error
    error = error_of({"steps": [step("b", booking=True, extract={"v": {**spec, "x": 1}})]})
    assert error.startswith("club.json: step 'b': extract.v: expected one of")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"header": "X-None"}, "value 'value' (header 'X-None'): the answer has no such header"),
        ({"cookie": "nope"}, "value 'value' (cookie 'nope'): the answer set no such cookie"),
        (
            {"regex": "id=(\\d+)"},
            "value 'value' (regex 'id=(\\\\d+)'): no match in the answer's body",
        ),
        ({"url": "b=(\\d+)"}, "value 'value' (url 'b=(\\\\d+)'): no match in the final URL"),
    ],
)
def test_missing_header_cookie_regex_url_values(spec: dict[str, str], message: str) -> None:
    with pytest.raises(ExtractError) as raised:
        take(ex(spec), reply(b"nothing here"))
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("extract", "message"),
    [
        ([], "club.json: step 'book': extract: expected an object"),
        ({"v": {"json": "a", "header": "b"}}, "club.json: step 'book': extract.v: expected one of"),
        ({"v": {"xpath": "a"}}, "club.json: step 'book': extract.v: expected one of"),
        ({"1v": {"json": "a"}}, "club.json: step 'book': extract.1v: '1v' is not a value name"),
        (
            {"v": {"regex": "a(b"}},
            "club.json: step 'book': extract.v.regex: 'a(b' is not a regular",
        ),
        ({"v": {"regex": "ab"}}, "club.json: step 'book': extract.v.regex: 'ab' has no group"),
        ({"v": {"url": "ab"}}, "club.json: step 'book': extract.v.url: 'ab' has no group"),
        (
            {"v": {"header": "a b"}},
            "club.json: step 'book': extract.v.header: 'a b' is not a header",
        ),
        ({"v": {"cookie": ""}}, "club.json: step 'book': extract.v.cookie: expected a non-empty"),
        ({"v": {"json": ""}}, "club.json: step 'book': extract.v.json: expected a JSON path"),
        (
            {"v": {"json": "a..b"}},
            "club.json: step 'book': extract.v.json: 'a..b' is not a JSON path",
        ),
        ({"v": {"json": "a[x]"}}, "club.json: step 'book': extract.v.json: 'a[x]': [x] is neither"),
        ({"v": {"json": "a[0"}}, "club.json: step 'book': extract.v.json: unbalanced '['"),
        (
            {"v": {"json": "a[starts_at..h=1].id"}},
            "club.json: step 'book': extract.v.json: 'a[starts_at..h=1].id': [starts_at..h=1]: "
            "the field 'starts_at..h' has an empty part",
        ),
        (
            {"v": {"json": "a[.h=1].id"}},
            "club.json: step 'book': extract.v.json: 'a[.h=1].id': [.h=1]: the field '.h' has",
        ),
        (
            {"v": {"json": "a[id={nope}]"}},
            "club.json: step 'book': extract.v.json: unknown placeholder {nope}",
        ),
    ],
)
def test_invalid_extractions_name_the_step_and_the_value(extract: Any, message: str) -> None:
    assert error_of({"steps": [step("book", booking=True, extract=extract)]}).startswith(message)


def test_booking_ref_is_a_json_path_with_filters_too() -> None:
    book = parse({"booking_ref": "items[court={court_id}].ref"}).booking_step
    found = reply({"items": [{"court": 4, "ref": "x"}, {"court": 3, "ref": "y"}]})
    assert book.ref_of(found, values()) == "y"
    assert book.ref_of(reply({"items": []}), values()) is None
    assert book.ref_of(reply(b"<html>Booked!</html>"), values()) is None
    default = parse({}).booking_step
    assert default.ref_of(reply({"booking_id": 12}), values()) == "12"
    assert default.ref_of(reply({"id": True}), values()) is None
    assert default.ref_of(reply(b"Reservation #881 confirmed"), values()) is None


def test_booking_ref_may_be_any_extraction_for_answers_that_are_not_json() -> None:
    text = parse({"booking_ref": {"regex": r"Reservation #(\d+)"}}).booking_step
    assert text.ref_of(reply(b"<p>Reservation #881 confirmed</p>"), values()) == "881"
    assert text.ref_of(reply(b"<p>Thank you</p>"), values()) is None
    header = parse({"booking_ref": {"header": "Location"}}).booking_step
    made = reply(b"", headers={"location": "/reservations/77"})
    assert header.ref_of(made, values()) == "/reservations/77"
    url = parse({"booking_ref": {"url": r"/done/(\w+)$"}}).booking_step
    assert url.ref_of(reply(b"", url="https://club.example/done/ab12"), values()) == "ab12"
    as_json = parse({"booking_ref": {"json": "items[court={court_id}].ref"}}).booking_step
    assert as_json.ref_of(reply({"items": [{"court": "3", "ref": 5}]}), values()) == "5"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            {"regex": "no group"},
            "t.json: booking_ref.regex: 'no group' has no group; the value is its first group",
        ),
        (
            {"xpath": "//id"},
            't.json: booking_ref: expected a JSON path, or one of {"json": ...}, {"header": ...}',
        ),
        ({"json": "a[x={nope}]"}, "t.json: booking_ref.json: unknown placeholder {nope}"),
        ({"header": "a b"}, "t.json: booking_ref.header: 'a b' is not a header name"),
    ],
)
def test_an_invalid_booking_ref_names_the_key(ref: Any, message: str) -> None:
    assert error_of({"booking_ref": ref}, "https://club.example/api", "t.json").startswith(message)


# --------------------------------------------------------------------------- answers


def test_body_contains_takes_a_string_or_a_list_of_which_any_may_appear() -> None:
    book = parse(
        {
            "taken": {"status": [200, 409], "body_contains": ["already booked", "not available"]},
            "rejected": {"status": [200], "body_contains": "error"},
            "booked": {"status": [200]},
        }
    ).booking_step
    assert book.match(200, b"court not available") == "taken"
    assert book.match(409, b"already booked, sorry") == "taken"
    assert book.match(200, b"an error") == "rejected"
    assert book.match(200, b"fine") == "booked"
    assert book.match(201, b"fine") is None


def test_ok_defaults_to_any_2xx_and_an_ok_matcher_replaces_it() -> None:
    parsed = flow(step("a"), step("b", ok={"status": [302]}), step("c"))
    assert parsed.steps[0].is_ok(204, b"") and not parsed.steps[0].is_ok(302, b"")
    assert parsed.steps[1].is_ok(302, b"") and not parsed.steps[1].is_ok(200, b"")


def test_an_at_trigger_step_may_name_its_taken_rejected_and_early_answers() -> None:
    parsed = flow(
        step(
            "slot",
            at_trigger=True,
            taken={"status": [200], "body_contains": "full"},
            early={"status": [423]},
        ),
        step("b"),
    )
    slot = parsed.steps[0]
    assert slot.match(200, b"full") == "taken"
    assert slot.match(423, b"") == "early"
    assert "club.json: step 'slot': booked: only the booking step" in error_of(
        {
            "steps": [
                step("slot", at_trigger=True, booked={"status": [200]}),
                step("b", booking=True),
            ]
        }
    )


def test_any_step_may_say_which_answers_mean_refused_credentials() -> None:
    parsed = flow(
        step("login", rejected={"status": [499]}),
        step("b"),
        step("after", rejected={"status": [200], "body_contains": "session expired"}),
    )
    login, _, after = parsed.steps
    assert login.match(499, b"") == "rejected" and login.match(200, b"") is None
    assert after.match(200, b"your session expired") == "rejected"
    assert "club.json: step 'login': rejected.status" in error_of(
        {"steps": [step("login", rejected={"status": "499"}), step("b", booking=True)]}
    )
    assert "club.json: step 'login': early: only the booking step" in error_of(
        {"steps": [step("login", early={"status": [425]}), step("b", booking=True)]}
    )


# --------------------------------------------------------------------------- describing


def test_describe_flow_masks_secrets_and_shows_extracted_values_by_name() -> None:
    parsed = flow(
        step(
            "login",
            url="https://auth.club.example/login",
            json={"email": "{secret.email}", "password": "{secret.password}"},
            extract={"jwt": {"header": "X-Auth"}},
        ),
        step(
            "slot",
            at_trigger=True,
            url="https://api.club.example/plan/{start:%d-%m-%Y}",
            headers={"Authorization": "Bearer {login.jwt}"},
            extract={"id": {"json": "slots[court={court_id}].id"}},
        ),
        step(
            "book",
            booking=True,
            url="https://api.club.example/book/{slot.id}",
            form={"user": "{login.jwt}", "when": "{time}"},
        ),
        step("confirm", url="https://api.club.example/c", method="PUT"),
        prepare_seconds=90,
    )
    slot = Slot(KEY, START, 90, BERLIN, ("3", "4"))
    assert describe_flow(parsed, slot).splitlines() == [
        "hosts: auth.club.example, api.club.example; prepares 90 s before the trigger",
        "step login (preparation, 90 s before the trigger):",
        "  POST https://auth.club.example/login",
        "  Content-Type: application/json",
        '  {"email": "***", "password": "***"}',
        "  extracts: jwt (header X-Auth)",
        "step slot (at the trigger, once per court):",
        "  POST https://api.club.example/plan/10-08-2025",
        "  Authorization: Bearer <login.jwt>",
        "  extracts: id (json slots[court={court_id}].id)",
        "step book (the booking, at the trigger):",
        "  POST https://api.club.example/book/<slot.id>",
        "  Content-Type: application/x-www-form-urlencoded",
        f"  Idempotency-Key: {KEY}#3",
        "  user=<login.jwt>&when=14:00",
        "step confirm (after the booking):",
        "  PUT https://api.club.example/c",
    ]
    assert describe_booking(parsed, slot, "4").splitlines()[0] == (
        "POST https://api.club.example/book/<slot.id>"
    )
