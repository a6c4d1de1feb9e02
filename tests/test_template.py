"""The request template (CONTRACT section 11): validation, rendering, answer matching."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

import config_loader
import utils
from template import (
    TemplateError,
    default_template,
    describe_request,
    idempotency_key,
    parse_template,
    placeholder_values,
)

START = datetime(2025, 8, 10, 12, 0, tzinfo=UTC)  # 14:00 in Berlin (CEST, +02:00)
BERLIN = utils.get_zone("Europe/Berlin")
TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"


def values(court: str | None = "3", token: str = "tok-1") -> dict[str, Any]:
    return placeholder_values(
        token=token,
        court_id=court,
        start=START,
        duration_minutes=90,
        zone=BERLIN,
        key="wed@2025-08-10T12:00:00Z",
    )


def parse(data: dict[str, Any], api_url: str | None = "https://club.example/api") -> Any:
    return parse_template(data, api_url=api_url, name="t.json")


def test_every_placeholder_has_its_value() -> None:
    got = values()
    assert got == {
        "token": "tok-1",
        "court_id": "3",
        "start": "2025-08-10T14:00:00+02:00",
        "end": "2025-08-10T15:30:00+02:00",
        "start_utc": "2025-08-10T12:00:00Z",
        "end_utc": "2025-08-10T13:30:00Z",
        "date": "2025-08-10",
        "time": "14:00",
        "end_time": "15:30",
        "duration_minutes": 90,
        "key": "wed@2025-08-10T12:00:00Z",
        "epoch_ms": 1754827200000,
    }


def test_defaults_method_post_url_from_booking_api_url_and_idempotency_header() -> None:
    template = parse({})
    assert template.method == "POST"
    assert template.url == "https://club.example/api"
    assert template.idempotency_header == "Idempotency-Key"
    assert not template.has_url
    assert template.render(values()).body is None


def test_a_whole_string_placeholder_takes_the_value_json_type() -> None:
    template = parse(
        {
            "json": {
                "minutes": "{duration_minutes}",
                "court": "{court_id}",
                "label": "court {court_id} for {duration_minutes} min",
                "nested": [{"at": "{epoch_ms}"}],
                "players": 2,
            }
        }
    )
    body = json.loads(template.render(values()).body or b"")
    assert body == {
        "minutes": 90,
        "court": "3",
        "label": "court 3 for 90 min",
        "nested": [{"at": 1754827200000}],
        "players": 2,
    }
    any_court = json.loads(template.render(values(court=None)).body or b"")
    assert any_court["court"] is None
    assert any_court["label"] == "court  for 90 min"


def test_literal_braces() -> None:
    template = parse({"json": {"note": "{{literal}} and {{{date}}}"}})
    body = json.loads(template.render(values()).body or b"")
    assert body == {"note": "{literal} and {2025-08-10}"}


def test_url_placeholders_are_percent_encoded() -> None:
    template = parse({"url": "https://club.example/courts/{court_id}/book?at={start}"})
    rendered = template.render(values(court="A/1 b"))
    assert rendered.url == (
        "https://club.example/courts/A%2F1%20b/book?at=2025-08-10T14%3A00%3A00%2B02%3A00"
    )
    assert template.has_url


def test_form_body_and_headers() -> None:
    template = parse(
        {
            "headers": {"Authorization": "Bearer {token}", "X-When": "{date} {time}"},
            "form": {"date": "{date}", "from": "{time}", "to": "{end_time}", "players": 2},
        }
    )
    rendered = template.render(values())
    assert rendered.headers["Authorization"] == "Bearer tok-1"
    assert rendered.headers["X-When"] == "2025-08-10 14:00"
    assert rendered.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs((rendered.body or b"").decode()) == {
        "date": ["2025-08-10"],
        "from": ["14:00"],
        "to": ["15:30"],
        "players": ["2"],
    }


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
        ({"booking_ref": "a..b"}, "t.json: booking_ref: 'a..b' is not a dotted path"),
        ({"idempotency_header": "Bad Header"}, "t.json: idempotency_header: 'Bad Header' is not"),
        ([], "t.json: expected a JSON object"),
    ],
)
def test_invalid_templates_name_the_key(data: Any, message: str) -> None:
    with pytest.raises(TemplateError) as raised:
        parse(data)
    assert message in str(raised.value)


def test_url_required_when_booking_api_url_is_unset() -> None:
    with pytest.raises(TemplateError, match="url: missing, and BOOKING_API_URL is not set"):
        parse({}, api_url=None)
    assert parse({"url": "https://club.example/x"}, api_url=None).has_url


def test_idempotency_header_renamed_or_off() -> None:
    assert parse({"idempotency_header": "X-Request-Id"}).idempotency_header == "X-Request-Id"
    assert parse({"idempotency_header": None}).idempotency_header is None


@pytest.mark.parametrize("name", ["path-form", "json-local", "taken-200"])
def test_bundled_examples_are_valid(name: str) -> None:
    data = json.loads((TEMPLATES / f"{name}.json").read_text())
    template = parse(data, api_url=None)
    assert template.host == "club.example"
    rendered = template.render(values())
    assert "tok-1" in json.dumps(rendered.headers)


def test_default_request_is_section_6() -> None:
    template = default_template("http://club.test/bookings")
    rendered = template.render(values())
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
    template = parse({"url": "https://club.example/c/{court_id}", "headers": {"X": "{token}"}})
    text = describe_request(template, entry.slot(START.replace(year=2030)))
    assert text.splitlines() == [
        "POST https://club.example/c/3",
        "X: ***",
        "Idempotency-Key: wed@2030-08-10T12:00:00Z#3",
    ]
    assert idempotency_key("k", "3", several=False) == "k"
    assert idempotency_key("k", None, several=True) == "k#"
