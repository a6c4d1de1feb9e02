"""bot.py: the request of CONTRACT section 6, the answer table, the instance states of section 7.

HTTP rules run against `responses` (call counts, headers, timeouts); the database is real SQLite
in tmp_path (the tests of states, claims and the active role also run on PostgreSQL); time never
really passes: the context's clock is fake and its stop event records the
waits it is asked for and returns at once. `ClubClient` itself is tested against real HTTP servers
on 127.0.0.1. Every test that builds a harness also checks, at teardown, that the token's plaintext
is nowhere: not in a last error, an outcome, a log line (DEBUG) or the database file.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
import requests
import responses
from cryptography.fernet import MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import bot
import club_client
import instances
import template
import utils
from bot import TAKEN_ADVICE, BookingContext, ClubClient, book_slot
from instances import recover_in_flight
from models import (
    BOOKED,
    BOOKING,
    CANCELLED,
    EXPIRED,
    FAILED,
    PENDING,
    WATCHING,
    Instance,
    Token,
    transaction,
)
from notify import Outcome
from template import Flow, Reply, Step, parse_flow

URL = "http://club.test/bookings"
TOKEN = "tok-S3cret-7c41d0b8e2f9a6"
TIMEOUT = 4.0
BASE = 0.5
BERLIN = ZoneInfo("Europe/Berlin")
#: A winter instance (CET, +01:00): Monday 2026-11-30 18:00 in Berlin.
DESIRED = datetime(2026, 11, 30, 17, 0, tzinfo=UTC)
TRIGGER = DESIRED - timedelta(hours=168)
KEY = utils.instance_key("mon", DESIRED)
MIB = 1024 * 1024


RETRY_KINDS = ["429", "500", "503", "timeout", "connection"]


# --------------------------------------------------------------------------- fakes


class FakeClock:
    """Epoch seconds that move only when told (``advance``), plus ``tick`` on every read."""

    def __init__(self, start: float, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick

    def __call__(self) -> float:
        value = self.now
        self.now += self.tick
        return value

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeStop(threading.Event):
    """A stop event whose ``wait`` records its timeout and returns at once.

    It answers True (stop) from the ``stop_on``-th wait on; with ``clock`` it advances that clock
    by the timeout plus ``oversleep``, as a real sleep would.
    """

    def __init__(
        self, clock: FakeClock | None = None, *, stop_on: int | None = None, oversleep: float = 0
    ) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.clock = clock
        self.stop_on = stop_on
        self.oversleep = oversleep

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self.clock is not None and timeout is not None:
            self.clock.advance(timeout + self.oversleep)
        return self.stop_on is not None and len(self.waits) >= self.stop_on


@dataclass
class Harness:
    """A booking context over a real database, a fake clock and a recording stop and notify."""

    factory: sessionmaker[Session]
    fernet: MultiFernet
    club: responses.RequestsMock
    clock: FakeClock
    stop: FakeStop
    outcomes: list[Outcome] = field(default_factory=list)
    warmed: list[str] = field(default_factory=list)
    ctx: BookingContext = field(init=False)

    def __post_init__(self) -> None:
        self.ctx = self.context()

    def context(self) -> BookingContext:
        """A context of its own (its own in-flight set), like a second claimant."""
        return BookingContext(
            factory=self.factory,
            fernet=self.fernet,
            client=ClubClient(timeout=TIMEOUT),
            api_url=URL,
            retry_base=BASE,
            stop=self.stop,
            notify=self.outcomes.append,
            clock=self.clock,
        )

    def add_token(self, name: str = "default", value: str | None = TOKEN, **extra: Any) -> None:
        encrypted = None if value is None else self.fernet.encrypt(value.encode()).decode()
        with transaction(self.factory) as session:
            session.add(Token(id=name, encrypted_token=encrypted, **extra))

    def add(
        self,
        *,
        key: str | None = None,
        desired: datetime = DESIRED,
        courts: tuple[str | None, ...] = ("3",),
        status: str = PENDING,
        token_name: str | None = None,
        timezone: str = "Europe/Berlin",
        duration: int = 60,
        attempts: int = 0,
        last_error: str | None = None,
        at_trigger: bool = True,
    ) -> str:
        """Insert one instance (trigger 168 h before ``desired``) and, by default, put the clock
        at its trigger. Returns its key."""
        key = key or utils.instance_key("mon", desired)
        trigger = desired - timedelta(hours=168)
        court_id = None if courts == (None,) else utils.courts_text(list(courts))
        with transaction(self.factory) as session:
            session.add(
                Instance(
                    key=key,
                    schedule_id=key.split("@")[0],
                    type="one-off",
                    desired_time=desired,
                    trigger_time=trigger,
                    timezone=timezone,
                    rrule=None,
                    court_id=court_id,
                    courts=json.dumps(list(courts)),
                    token_name=token_name or "default",
                    duration_minutes=duration,
                    status=status,
                    attempts=attempts,
                    last_error=last_error,
                )
            )
        if at_trigger:
            self.clock.set(trigger)
        return key

    def row(self, key: str = KEY) -> Instance:
        with self.factory() as session:
            row = session.scalar(select(Instance).where(Instance.key == key))
            assert row is not None
            return row

    def book(self, key: str = KEY) -> str | None:
        return book_slot(key, self.ctx)

    @property
    def calls(self) -> list[Any]:
        return list(self.club.calls)

    def sent_keys(self) -> list[str]:
        return [call.request.headers["Idempotency-Key"] for call in self.club.calls]

    def sent_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(call.request.body) for call in self.club.calls]


@pytest.fixture
def club() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def h(
    factory: sessionmaker[Session],
    fernet: MultiFernet,
    club: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Harness]:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock(TRIGGER.timestamp())
    harness = Harness(factory, fernet, club, clock, FakeStop())
    # warm() opens a real TCP connection: record it instead.
    monkeypatch.setattr(ClubClient, "warm", lambda _self, url: harness.warmed.append(url) or True)
    harness.add_token()
    yield harness
    # The token never leaks, whatever the scenario.
    assert TOKEN not in caplog.text
    for outcome in harness.outcomes:
        assert TOKEN not in repr(outcome)
    with factory() as session:
        for row in session.scalars(select(Instance)):
            assert TOKEN not in (row.last_error or "")
    database = factory.kw["bind"].url.database
    for suffix in ("", "-wal"):
        path = Path(f"{database}{suffix}")
        if path.exists():
            assert TOKEN.encode() not in path.read_bytes()


def answer(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> responses.Response:
    """A canned club answer (a dict body is sent as JSON)."""
    if isinstance(body, dict):
        return responses.Response(
            responses.POST, URL, json=body, status=status, headers=headers or {}
        )
    return responses.Response(
        responses.POST, URL, body=body or "", status=status, headers=headers or {}
    )


def failure(kind: str) -> responses.Response:
    """A request that gets no answer: a timeout or a dropped connection."""
    error: Exception
    if kind == "timeout":
        error = requests.ReadTimeout("read timed out")
    elif kind == "refused":
        error = requests.ConnectionError("[Errno 111] Connection refused")
    else:
        error = requests.ConnectionError("Connection aborted: RemoteDisconnected")
    return responses.Response(responses.POST, URL, body=error)


def retryable(kind: str) -> responses.Response:
    return failure(kind) if kind in ("timeout", "connection") else answer(int(kind))


def queue(club: responses.RequestsMock, *items: responses.Response) -> None:
    """Answers served once each, in order."""
    for item in items:
        club.add(item)


def failed_at_once(h: Harness) -> Instance:
    """Books ``h``'s instance, asserting it failed after one request and no wait; its row."""
    assert h.book() == FAILED
    assert len(h.calls) == 1
    assert h.stop.waits == []
    row = h.row()
    assert (row.status, row.attempts) == (FAILED, 1)
    return row


# --------------------------------------------------------------------------- the request


def test_request_method_url_headers_body_timeout_and_booked_state(h: Harness) -> None:
    h.add()
    queue(h.club, answer(201, {"id": "bk-17", "court": "3"}))

    assert h.book() == BOOKED

    assert len(h.calls) == 1
    request = h.calls[0].request
    assert request.method == "POST"
    assert request.url == URL
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == KEY
    assert json.loads(request.body) == {
        "court_id": "3",
        "start": "2026-11-30T18:00:00+01:00",
        "end": "2026-11-30T19:00:00+01:00",
        "duration_minutes": 60,
    }
    assert request.req_kwargs["timeout"] == TIMEOUT
    row = h.row()
    assert (row.status, row.attempts, row.last_error) == (BOOKED, 1, None)
    assert (row.booking_ref, row.booked_court) == ("bk-17", "3")
    assert row.finished_at == TRIGGER
    assert h.stop.waits == []
    (outcome,) = h.outcomes
    assert outcome.status == BOOKED
    assert outcome.key == KEY
    assert outcome.schedule_id == "mon"
    assert outcome.court == "3"
    assert outcome.booking_ref == "bk-17"
    assert outcome.attempts == 1
    assert outcome.reason is None
    assert outcome.desired_start == DESIRED
    assert outcome.desired_start.tzinfo is not None
    assert outcome.desired_start.utcoffset() == timedelta(hours=1)
    assert outcome.trigger_time == TRIGGER
    assert outcome.timezone == "Europe/Berlin"


@pytest.mark.parametrize(
    ("desired", "duration", "start", "end"),
    [
        # Summer: CEST, +02:00.
        (
            datetime(2027, 7, 14, 15, 0, tzinfo=UTC),
            60,
            "2027-07-14T17:00:00+02:00",
            "2027-07-14T18:00:00+02:00",
        ),
        # Winter: CET, +01:00.
        (
            datetime(2027, 1, 13, 16, 0, tzinfo=UTC),
            90,
            "2027-01-13T17:00:00+01:00",
            "2027-01-13T18:30:00+01:00",
        ),
        # Across the autumn change (2026-10-25 01:00 UTC): each end has its own offset.
        (
            datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
            60,
            "2026-10-25T02:30:00+02:00",
            "2026-10-25T02:30:00+01:00",
        ),
    ],
    ids=["summer", "winter", "across-dst-end"],
)
def test_start_and_end_carry_the_zones_offset_at_that_instant(
    h: Harness, desired: datetime, duration: int, start: str, end: str
) -> None:
    key = h.add(desired=desired, duration=duration)
    queue(h.club, answer(200, {"booking_id": 5}))

    assert h.book(key) == BOOKED

    (body,) = h.sent_bodies()
    assert body == {"court_id": "3", "start": start, "end": end, "duration_minutes": duration}
    assert h.row(key).booking_ref == "5"


def test_any_court_sends_null_court_and_the_plain_key(h: Harness) -> None:
    h.add(courts=(None,))
    queue(h.club, answer(201, {"id": "x1"}))

    assert h.book() == BOOKED

    (body,) = h.sent_bodies()
    assert body["court_id"] is None
    assert h.sent_keys() == [KEY]
    row = h.row()
    assert (row.status, row.booked_court, row.booking_ref) == (BOOKED, None, "x1")
    assert h.outcomes[0].court is None


def test_several_courts_suffix_the_idempotency_key_with_the_court(h: Harness) -> None:
    h.add(courts=("3", "4"))
    queue(h.club, answer(409, {"error": "court taken"}), answer(201, {"id": 99}))

    assert h.book() == BOOKED

    assert h.sent_keys() == [f"{KEY}#3", f"{KEY}#4"]
    assert [b["court_id"] for b in h.sent_bodies()] == ["3", "4"]
    row = h.row()
    assert (row.status, row.attempts, row.booked_court, row.booking_ref) == (BOOKED, 2, "4", "99")
    assert row.last_error is None
    assert h.outcomes[0].court == "4"
    # The 409 moves on at once.
    assert h.stop.waits == []


def test_every_request_has_the_explicit_timeout_and_no_redirects(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = h.ctx.client.session.send

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(h.ctx.client.session, "send", spy)
    h.add(courts=("3", "4"))
    queue(h.club, answer(503), failure("timeout"), answer(500), answer(201, {"id": 1}))

    assert h.book() == BOOKED

    assert len(h.calls) == 4
    assert [c.request.req_kwargs["timeout"] for c in h.calls] == [TIMEOUT] * 4
    assert [kwargs["timeout"] for kwargs in seen] == [TIMEOUT] * 4
    assert [kwargs["allow_redirects"] for kwargs in seen] == [False] * 4


# --------------------------------------------------------------------------- 2xx


@pytest.mark.parametrize(
    ("status", "body", "ref"),
    [
        (200, {"id": 17}, "17"),
        (201, {"id": "bk-1", "booking_id": "other"}, "bk-1"),
        (201, {"booking_id": "bk-2"}, "bk-2"),
        (202, {"ok": True}, None),
        (200, "Booked! See you on court.", None),
        (204, "", None),
        (200, "[1, 2]", None),
    ],
    ids=["id-int", "id-first", "booking_id", "json-no-ref", "text", "empty", "json-list"],
)
def test_2xx_is_booked_with_the_ref_when_the_body_has_one(
    h: Harness, status: int, body: Any, ref: str | None
) -> None:
    h.add()
    queue(h.club, answer(status, body))

    assert h.book() == BOOKED

    row = h.row()
    assert (row.status, row.booking_ref, row.booked_court, row.attempts) == (BOOKED, ref, "3", 1)
    assert h.outcomes[0].status == BOOKED
    assert h.outcomes[0].booking_ref == ref


# --------------------------------------------------------------------------- 409


def test_409_on_the_only_court_fails_without_retry(h: Harness) -> None:
    h.add()
    queue(h.club, answer(409, {"error": "Court 3 is already booked"}), answer(201, {"id": 1}))

    row = failed_at_once(h)
    assert (row.booking_ref, row.booked_court) == (None, None)
    assert row.last_error == (
        f"court 3: taken (HTTP 409: Court 3 is already booked); {TAKEN_ADVICE}"
    )
    assert TAKEN_ADVICE == (
        "every court tried was taken, so a retry would be too: book another court with the "
        'club, and give the entry a list of courts to try in order (e.g. "court_id": ["3", "4"])'
    )
    assert "own earlier attempt" not in row.last_error
    (outcome,) = h.outcomes
    assert (outcome.status, outcome.reason, outcome.court) == (FAILED, row.last_error, "3")
    assert outcome.retry_helps is False


def test_409_on_every_court_of_the_list_names_each_court(h: Harness) -> None:
    h.add(courts=("3", "4", "5"))
    queue(h.club, answer(409), answer(409), answer(409))

    assert h.book() == FAILED

    assert h.sent_keys() == [f"{KEY}#3", f"{KEY}#4", f"{KEY}#5"]
    assert h.stop.waits == []
    row = h.row()
    assert row.attempts == 3
    assert row.last_error == (
        "court 3: taken (HTTP 409); court 4: taken (HTTP 409); court 5: taken (HTTP 409); "
        + TAKEN_ADVICE
    )
    assert h.outcomes[0].court == "3, 4, 5"


@pytest.mark.parametrize("lost", ["timeout", "connection"])
def test_409_after_a_lost_answer_says_the_court_may_be_ours(h: Harness, lost: str) -> None:
    h.add()
    queue(h.club, failure(lost), answer(409))

    assert h.book() == FAILED

    assert len(h.calls) == 2
    assert h.sent_keys() == [KEY, KEY]
    assert h.stop.waits == [BASE]
    reason = h.row().last_error
    assert reason is not None
    assert reason.startswith("court 3: taken (HTTP 409)")
    assert "may be taken by our own earlier attempt" in reason
    assert "check your bookings at the club" in reason
    assert TAKEN_ADVICE not in reason  # another court could be a second booking
    assert h.outcomes[0].reason == reason
    assert h.outcomes[0].retry_helps is False


def test_409_after_a_refused_connection_does_not_blame_our_own_attempt(h: Harness) -> None:
    # A refused connection never carried the request: the 409 cannot be ours.
    h.add()
    queue(h.club, failure("refused"), answer(409))

    assert h.book() == FAILED

    reason = h.row().last_error
    assert reason == f"court 3: taken (HTTP 409); {TAKEN_ADVICE}"


def test_lost_answer_on_one_court_does_not_colour_the_next_courts_409(h: Harness) -> None:
    h.add(courts=("3", "4"))
    queue(h.club, *(failure("timeout") for _ in range(3)), answer(409))

    assert h.book() == FAILED

    assert h.sent_keys() == [f"{KEY}#3"] * 3 + [f"{KEY}#4"]
    assert h.stop.waits == [BASE, 2 * BASE]
    reason = h.row().last_error
    assert reason == (
        "court 3: no booking after 3 attempts (last: no answer within 4 s); "
        "court 4: taken (HTTP 409)"
    )
    assert h.row().attempts == 4
    assert h.outcomes[0].retry_helps is True  # court 3 may answer later


# --------------------------------------------------------------------------- lateness


def test_the_first_requests_send_time_is_recorded_and_reported(h: Harness) -> None:
    h.add()
    h.clock.set(TRIGGER + timedelta(microseconds=800))
    queue(h.club, retryable("503"), answer(201, {"id": 5}))

    assert h.book() == BOOKED

    row = h.row()
    # The first of the two requests counts; the second left after a wait of BASE.
    assert row.first_sent_at == TRIGGER + timedelta(microseconds=800)
    assert h.outcomes[0].timing == "sent 0.8 ms after the window opened"
    assert h.ctx.first_sent == {}


def test_a_clock_noted_by_an_earlier_try_is_cleared_when_the_flow_has_none(h: Harness) -> None:
    h.add()
    instances.record_clock(h.factory, KEY, offset_ms=412.0, uncertainty_ms=6.0)
    h.clock.set(TRIGGER + timedelta(microseconds=800))
    queue(h.club, answer(201, {"id": 5}))

    assert h.book() == BOOKED

    assert (h.row().clock_offset_ms, h.row().clock_error) == (None, None)
    assert h.outcomes[0].timing == "sent 0.8 ms after the window opened"


def test_the_first_send_is_kept_when_a_stop_comes_between_retries(h: Harness) -> None:
    h.add()
    h.stop.stop_on = 1
    queue(h.club, retryable("503"))

    assert h.book() is None

    row = h.row()
    assert (row.status, row.attempts, row.first_sent_at) == (PENDING, 1, TRIGGER)


def test_a_failure_before_any_request_says_none_was_sent(h: Harness) -> None:
    h.add(token_name="missing")

    assert h.book() == FAILED

    assert h.row().first_sent_at is None
    assert h.outcomes[0].timing == "no booking request was sent"


# --------------------------------------------------------------------------- 401 / 403


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_token_fails_at_once_naming_the_token_not_its_value(
    h: Harness, status: int
) -> None:
    h.add_token("club-main")
    h.add(courts=("3", "4"), token_name="club-main")
    queue(h.club, answer(status, {"error": f"invalid token {TOKEN}"}), answer(201, {"id": 1}))

    reason = failed_at_once(h).last_error
    assert reason is not None
    assert "'club-main'" in reason
    assert f"HTTP {status}" in reason
    assert "tokens.json" in reason
    assert "retry" in reason
    assert TOKEN not in reason
    assert "invalid token ***" in reason
    assert h.outcomes[0].reason == reason


# ---------------------------------------------------------------- clubs and token objects

PADEL = "http://padel.test/courts"


def padel_template() -> Any:
    return parse_flow(
        {
            "url": PADEL + "/{court_id}",
            "headers": {"X-Key": "{token}"},
            "taken": {"status": [200], "body_contains": "full"},
        },
        api_url=URL,
        name="clubs/padel.json",
    )


def set_club(h: Harness, club: str, key: str = KEY) -> None:
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None
        row.club = club


def add_object_token(h: Harness, name: str, fields: dict[str, str]) -> None:
    encrypted = {k: h.fernet.encrypt(v.encode()).decode() for k, v in fields.items()}
    with transaction(h.factory) as session:
        session.add(Token(id=name, encrypted_token=json.dumps(encrypted), kind="object"))


def test_an_instance_of_a_club_books_with_its_club_file(h: Harness) -> None:
    h.add(courts=("3", "4"))
    set_club(h, "padel")
    h.ctx.clubs = {"padel": padel_template()}
    # The club's own matchers read its answers: 200 "full" is taken there (booked by section 6).
    h.club.add(responses.Response(responses.POST, PADEL + "/3", body="court full", status=200))
    h.club.add(responses.Response(responses.POST, PADEL + "/4", json={"id": "p-4"}, status=201))

    assert h.book() == BOOKED

    assert [call.request.url for call in h.calls] == [PADEL + "/3", PADEL + "/4"]
    assert h.calls[0].request.headers["X-Key"] == TOKEN
    row = h.row()
    assert (row.booked_court, row.booking_ref) == ("4", "p-4")
    assert h.ctx.flow_for(None).hosts == ("club.test",)  # no club: section 6's request


def test_an_instance_of_a_club_with_no_good_file_fails_without_a_request(h: Harness) -> None:
    h.add()
    set_club(h, "padel")
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() == FAILED

    assert h.calls == []
    assert h.row().last_error == (
        "club 'padel': its file (DATA_DIR/clubs/padel.json) is missing or invalid and no good "
        "version of it was loaded: fix it (`python main.py check` names the error), reload, "
        "then `python main.py retry` this booking"
    )


def test_an_object_token_gives_its_token_field_and_every_field_is_scrubbed(h: Harness) -> None:
    fields = {"token": "tok-obj-91f2", "email": "me@padel.example", "password": "pw-5d1e"}
    add_object_token(h, "padel", fields)
    h.add(token_name="padel")
    echo = "bad login me@padel.example / pw-5d1e for tok-obj-91f2"
    queue(h.club, answer(401, {"error": echo}))

    assert h.book() == FAILED

    assert h.calls[0].request.headers["Authorization"] == "Bearer tok-obj-91f2"
    reason = h.row().last_error
    assert reason is not None
    assert "HTTP 401: bad login *** / *** for ***" in reason
    for secret in fields.values():
        assert secret not in reason


def test_an_object_token_without_a_token_field_fails_without_a_request(h: Harness) -> None:
    add_object_token(h, "padel", {"email": "me@padel.example", "password": "pw-5d1e"})
    h.add(token_name="padel")
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() == FAILED

    assert h.calls == []
    assert h.row().last_error == (
        "token 'padel' has no 'token' field, which the club's flow uses as {token}: add it in "
        "tokens.json, reload, then `python main.py retry` this booking"
    )


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize("kind", RETRY_KINDS)
def test_retryable_answers_get_three_requests_with_base_then_double_waits(
    h: Harness, kind: str
) -> None:
    h.add()
    queue(h.club, *(retryable(kind) for _ in range(3)), answer(201, {"id": "late"}))

    assert h.book() == FAILED

    assert len(h.calls) == 3
    assert h.sent_keys() == [KEY] * 3
    assert h.stop.waits == [BASE, 2 * BASE]
    assert [c.request.req_kwargs["timeout"] for c in h.calls] == [TIMEOUT] * 3
    row = h.row()
    assert (row.status, row.attempts, row.booking_ref) == (FAILED, 3, None)
    what = {
        "425": "HTTP 425",
        "429": "HTTP 429; rate limited by the club",
        "500": "HTTP 500; the club is down or failing",
        "503": "HTTP 503; the club is down or failing",
        "timeout": "no answer within 4 s",
        "connection": "the club's server closed the connection without a full answer",
    }[kind]
    assert row.last_error == f"court 3: no booking after 3 attempts (last: {what})"
    (outcome,) = h.outcomes
    assert (outcome.status, outcome.attempts, outcome.reason) == (FAILED, 3, row.last_error)


@pytest.mark.parametrize("kind", RETRY_KINDS)
def test_a_retry_that_succeeds_is_booked(h: Harness, kind: str) -> None:
    h.add()
    queue(h.club, retryable(kind), retryable(kind), answer(201, {"id": "third"}))

    assert h.book() == BOOKED

    assert len(h.calls) == 3
    assert h.stop.waits == [BASE, 2 * BASE]
    row = h.row()
    assert (row.status, row.attempts, row.booking_ref, row.last_error) == (
        BOOKED,
        3,
        "third",
        None,
    )


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [("7", 7.0), ("2.5", 2.5), ("120", 30.0), ("0", 0.0), ("soon", None)],
    ids=["seconds", "decimal", "capped", "zero", "unreadable"],
)
def test_retry_after_replaces_the_backoff_and_is_capped_at_30_s(
    h: Harness, retry_after: str, wait: float | None
) -> None:
    h.add()
    queue(
        h.club,
        answer(429, headers={"Retry-After": retry_after}),
        answer(503, headers={"Retry-After": retry_after}),
        answer(201, {"id": 1}),
    )

    assert h.book() == BOOKED

    expected = [BASE, 2 * BASE] if wait is None else [wait, wait]
    assert h.stop.waits == expected


def test_retry_after_as_an_http_date_counts_from_the_clock(h: Harness) -> None:
    h.add()
    when = format_datetime(TRIGGER + timedelta(seconds=12), usegmt=True)
    queue(h.club, answer(503, headers={"Retry-After": when}), answer(201, {"id": 1}))

    assert h.book() == BOOKED

    assert h.stop.waits == [12.0]


def test_a_courts_three_spent_moves_to_the_next_court(h: Harness) -> None:
    h.add(courts=("3", "4"))
    queue(h.club, answer(503), answer(500), answer(429), answer(201, {"booking_id": "b4"}))

    assert h.book() == BOOKED

    assert h.sent_keys() == [f"{KEY}#3"] * 3 + [f"{KEY}#4"]
    # base, 2 x base on court 3; court 4 at once.
    assert h.stop.waits == [BASE, 2 * BASE]
    row = h.row()
    assert (row.status, row.attempts, row.booked_court, row.booking_ref) == (BOOKED, 4, "4", "b4")
    assert h.outcomes[0].court == "4"


def test_every_court_spent_fails_with_each_courts_story(h: Harness) -> None:
    h.add(courts=("3", "4"))
    queue(h.club, *(answer(503) for _ in range(3)), *(failure("timeout") for _ in range(3)))

    assert h.book() == FAILED

    assert len(h.calls) == 6
    assert h.stop.waits == [BASE, 2 * BASE, BASE, 2 * BASE]
    row = h.row()
    assert row.attempts == 6
    assert row.last_error == (
        "court 3: no booking after 3 attempts (last: HTTP 503; the club is down or failing); "
        "court 4: no booking after 3 attempts (last: no answer within 4 s)"
    )


def test_no_retry_wait_runs_past_the_desired_start(h: Harness) -> None:
    # The window opened late (clock 10 s before the start): a 30 s Retry-After cannot be waited.
    h.add()
    h.clock.set(DESIRED - timedelta(seconds=10))
    queue(h.club, answer(429, headers={"Retry-After": "30"}), answer(201, {"id": 1}))

    assert failed_at_once(h).last_error == "court 3: HTTP 429; the start came first"


# --------------------------------------------------------------------------- 3xx, other 4xx


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_fails_and_is_never_followed(h: Harness, status: int) -> None:
    h.add()
    elsewhere = "http://evil.test/steal"
    queue(h.club, answer(status, headers={"Location": f"{elsewhere}?token={TOKEN}"}))
    trap = h.club.add(responses.Response(responses.GET, elsewhere, status=200))
    trap_post = h.club.add(responses.Response(responses.POST, elsewhere, status=201))

    reason = failed_at_once(h).last_error
    assert trap.call_count == 0
    assert trap_post.call_count == 0
    assert reason is not None
    assert "redirect" in reason
    assert f"HTTP {status}" in reason
    assert "never followed" in reason
    assert "evil.test" in reason


@pytest.mark.parametrize("status", [400, 404, 405, 410, 422])
def test_other_4xx_fail_at_once(h: Harness, status: int) -> None:
    h.add(courts=("3", "4"))
    queue(h.club, answer(status, {"message": "bad court"}), answer(201, {"id": 1}))

    assert h.book() == FAILED

    assert len(h.calls) == 1
    assert h.stop.waits == []
    row = h.row()
    assert (row.status, row.attempts, row.booking_ref) == (FAILED, 1, None)
    assert row.last_error == (
        f"the club refused the request (HTTP {status}: bad court): check the entry and the URL"
    )
    assert h.outcomes[0].reason == row.last_error


@pytest.mark.parametrize("status", [400, 409, 422, 503])
def test_an_error_body_echoing_the_token_is_scrubbed(h: Harness, status: int) -> None:
    h.add()
    body = {"error": f"Bearer {TOKEN} is not allowed to book court 3"}
    queue(h.club, *(answer(status, body) for _ in range(3)))

    assert h.book() == FAILED

    reason = h.row().last_error
    assert reason is not None
    assert TOKEN not in reason
    assert "Bearer *** is not allowed to book court 3" in reason


def test_a_long_error_body_never_lets_part_of_the_token_through(h: Harness) -> None:
    # The token straddles the 200-character cut of the club's message.
    h.add()
    message = "x" * 190 + " " + TOKEN + " rest of the message"
    queue(h.club, answer(400, {"error": message}))

    assert h.book() == FAILED

    reason = h.row().last_error
    assert reason is not None
    assert TOKEN[:6] not in reason


# --------------------------------------------------------------------------- states


@pytest.mark.both_databases
def test_the_instance_is_committed_booking_before_the_request_leaves(h: Harness) -> None:
    h.add()
    seen: list[tuple[str, int]] = []

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        # A separate session: only committed state is visible.
        row = h.row()
        seen.append((row.status, row.attempts))
        return 201, {}, json.dumps({"id": "c1"})

    h.club.add_callback(responses.POST, URL, callback=club_side)

    assert h.book() == BOOKED
    # Committed "booking" before the request left; its attempt is counted with the answer (a
    # commit between the trigger and the send would delay the request).
    assert seen == [(BOOKING, 0)]
    assert h.row().attempts == 1


@pytest.mark.both_databases
def test_a_stop_between_retries_puts_the_instance_back_to_pending(h: Harness) -> None:
    h.ctx.stop = h.stop = FakeStop(stop_on=1)
    h.add()
    queue(h.club, answer(503), answer(201, {"id": 1}))

    assert h.book() is None

    assert len(h.calls) == 1
    assert h.stop.waits == [BASE]
    row = h.row()
    assert (row.status, row.booking_ref, row.finished_at) == (PENDING, None, None)
    assert h.outcomes == []


@pytest.mark.both_databases
def test_a_stop_before_the_trigger_sends_nothing_and_leaves_it_pending(h: Harness) -> None:
    h.ctx.stop = h.stop = FakeStop(stop_on=1)
    h.add()
    h.clock.set(TRIGGER - timedelta(seconds=30))
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() is None

    assert h.calls == []
    assert h.warmed == [URL]
    assert h.row().status == PENDING
    assert h.outcomes == []


# --------------------------------------------------------------------------- the active role (10)

NOT_ACTIVE_LINE = (
    f"booking {KEY}: this daemon is no longer the active one; back to pending for the active "
    "daemon, with the same Idempotency-Key"
)


def lose_the_role(ctx: BookingContext) -> None:
    """What leader.Roles does, from its watch thread, when the daemon's lock is lost."""
    ctx.may_send.clear()
    ctx.stop.set()


@pytest.mark.both_databases
def test_a_claim_names_the_daemon(h: Harness) -> None:
    h.ctx.owner = "daemon-1"
    h.add()
    owners: list[str | None] = []

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        owners.append(h.row().owner)
        return 201, {}, json.dumps({"id": "c1"})

    h.club.add_callback(responses.POST, URL, callback=club_side)

    assert h.book() == BOOKED
    assert owners == ["daemon-1"]
    assert h.row().owner is None  # a claim lives as long as its booking


@pytest.mark.both_databases
def test_a_daemon_no_longer_active_claims_nothing(h: Harness) -> None:
    h.add()
    queue(h.club, answer(201, {"id": 1}))
    h.ctx.may_send.clear()

    assert h.book() is None

    assert h.calls == []
    assert (h.row().status, h.row().owner) == (PENDING, None)


@pytest.mark.both_databases
def test_a_lease_that_cannot_be_proven_claims_and_sends_nothing(h: Harness) -> None:
    h.add()
    queue(h.club, answer(201, {"id": 1}))
    h.ctx.proves = lambda _ahead: False  # the last renewal is too old (CONTRACT section 10)

    assert h.book() is None

    assert h.calls == []
    assert (h.row().status, h.row().owner) == (PENDING, None)
    assert not h.ctx.may_send.is_set()  # stopped as after a loss of the role


@pytest.mark.both_databases
def test_a_lease_proven_at_the_claim_but_not_at_the_send_sends_nothing(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.add()
    queue(h.club, answer(201, {"id": 1}))
    proofs: list[float] = []

    def proves(ahead: float) -> bool:
        proofs.append(ahead)
        return len(proofs) == 1  # the claim's check only

    h.ctx.proves = proves

    assert h.book() is None

    assert h.calls == []
    assert len(proofs) == 2
    assert h.row().status == PENDING
    assert "its lease could not be proven; no request leaves" in caplog.text


@pytest.mark.both_databases
def test_losing_the_role_before_the_trigger_sends_nothing(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.ctx.owner = "daemon-1"
    h.ctx.stop = h.stop = FakeStop(stop_on=1)
    h.add()
    h.clock.set(TRIGGER - timedelta(seconds=30))
    queue(h.club, answer(201, {"id": 1}))
    # The role goes while the connection to the club is being opened ahead of the trigger.
    h.ctx.client.warm = lambda url: lose_the_role(h.ctx)  # type: ignore[method-assign]

    assert h.book() is None

    assert h.calls == []
    row = h.row()
    assert (row.status, row.owner, row.attempts, row.interrupted) == (PENDING, None, 0, False)
    assert f"{NOT_ACTIVE_LINE}; nothing was sent" in caplog.messages
    assert h.outcomes == []


@pytest.mark.both_databases
@pytest.mark.parametrize(("first", "interrupted"), [("503", False), ("timeout", True)])
def test_losing_the_role_during_a_request_stops_the_retries(
    h: Harness, caplog: pytest.LogCaptureFixture, first: str, interrupted: bool
) -> None:
    h.ctx.owner = "daemon-1"
    h.add()
    real_send = h.ctx.client.send

    def send_and_lose(spec: Any) -> Any:
        lose_the_role(h.ctx)  # while the request is under way
        return real_send(spec)

    h.ctx.client.send = send_and_lose  # type: ignore[method-assign]
    queue(h.club, retryable(first), answer(201, {"id": 1}))

    assert h.book() is None

    assert len(h.calls) == 1  # the retry is the active daemon's, with the same key
    row = h.row()
    # A timeout may have reached the club: the active daemon's 409 then says so.
    assert (row.status, row.owner, row.attempts, row.interrupted) == (
        PENDING,
        None,
        1,
        interrupted,
    )
    assert NOT_ACTIVE_LINE in caplog.messages
    assert h.outcomes == []


@pytest.mark.both_databases
def test_a_request_in_flight_when_the_role_goes_finishes(h: Harness) -> None:
    h.add()

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        lose_the_role(h.ctx)
        return 201, {}, json.dumps({"id": "c1"})

    h.club.add_callback(responses.POST, URL, callback=club_side)

    assert h.book() == BOOKED
    assert (h.row().status, h.row().booking_ref) == (BOOKED, "c1")
    assert len(h.outcomes) == 1


@pytest.mark.both_databases
@pytest.mark.parametrize("status", [CANCELLED, BOOKED, FAILED, EXPIRED, BOOKING])
def test_an_instance_that_is_not_pending_is_not_sent(h: Harness, status: str) -> None:
    h.add(status=status, last_error="as it was")
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() is None

    assert h.calls == []
    row = h.row()
    assert (row.status, row.last_error, row.attempts) == (status, "as it was", 0)
    assert h.outcomes == []


@pytest.mark.both_databases
def test_an_unknown_key_is_nothing_to_do(h: Harness) -> None:
    assert h.book("nope@2026-11-30T17:00:00Z") is None
    assert h.calls == []
    assert h.outcomes == []


@pytest.mark.both_databases
@pytest.mark.parametrize("late", [timedelta(0), timedelta(minutes=1), timedelta(days=2)])
def test_a_start_already_passed_is_expired_without_a_request(h: Harness, late: timedelta) -> None:
    h.add()
    h.clock.set(DESIRED + late)
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() == EXPIRED

    assert h.calls == []
    row = h.row()
    assert (row.status, row.attempts, row.booking_ref) == (EXPIRED, 0, None)
    assert row.last_error is not None
    assert "not running" in row.last_error
    assert "start has passed" in row.last_error
    assert row.finished_at == DESIRED + late
    (outcome,) = h.outcomes
    assert (outcome.status, outcome.key, outcome.reason) == (EXPIRED, KEY, row.last_error)


@pytest.mark.both_databases
@pytest.mark.parametrize(
    ("token_row", "reason"),
    [
        (
            {"value": None, "error": "tokens.json: 'broken' does not decrypt with FERNET_KEY"},
            "tokens.json: 'broken' does not decrypt with FERNET_KEY",
        ),
        (
            {"value": TOKEN, "error": "tokens.json: 'broken' does not decrypt with FERNET_KEY"},
            "tokens.json: 'broken' does not decrypt with FERNET_KEY",
        ),
        (None, "token 'broken' is not in tokens.json: add it there and reload"),
        ({"value": None}, "token 'broken' is not in tokens.json: add it there and reload"),
    ],
    ids=["error-no-value", "error-with-old-value", "missing", "no-value"],
)
@pytest.mark.both_databases
def test_an_unusable_token_fails_without_a_request(
    h: Harness, token_row: dict[str, Any] | None, reason: str
) -> None:
    if token_row is not None:
        h.add_token("broken", token_row["value"], error=token_row.get("error"))
    h.add(token_name="broken")
    queue(h.club, answer(201, {"id": 1}))

    assert h.book() == FAILED

    assert h.calls == []
    row = h.row()
    assert (row.status, row.attempts, row.last_error) == (FAILED, 0, reason)
    (outcome,) = h.outcomes
    assert (outcome.status, outcome.reason) == (FAILED, reason)


@pytest.mark.both_databases
def test_a_token_under_a_lost_key_fails_with_what_to_do(h: Harness) -> None:
    from cryptography.fernet import Fernet

    other = Fernet(Fernet.generate_key()).encrypt(TOKEN.encode()).decode()
    with transaction(h.factory) as session:
        session.add(Token(id="old", encrypted_token=other))
    h.add(token_name="old")

    assert h.book() == FAILED

    assert h.calls == []
    reason = h.row().last_error
    assert reason is not None
    assert "'old'" in reason
    assert "FERNET_KEY" in reason
    assert "tokens.json" in reason


@pytest.mark.both_databases
def test_a_second_book_slot_while_one_is_in_flight_sends_nothing(h: Harness) -> None:
    h.add()
    inside = threading.Event()
    release = threading.Event()

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        inside.set()
        assert release.wait(5)
        return 201, {}, json.dumps({"id": "only"})

    h.club.add_callback(responses.POST, URL, callback=club_side)
    results: list[str | None] = []
    first = threading.Thread(target=lambda: results.append(h.book()))
    first.start()
    try:
        assert inside.wait(5)
        # The same daemon: its in-flight guard answers without even reading the database.
        real_factory = h.ctx.factory
        opened: list[int] = []

        def counting_factory() -> Session:
            opened.append(1)
            return real_factory()

        h.ctx.factory = counting_factory  # type: ignore[assignment]
        try:
            assert h.book() is None
        finally:
            h.ctx.factory = real_factory
        assert opened == []
        # Another claimant (its own in-flight set): the database says it is under way.
        assert book_slot(KEY, h.context()) is None
    finally:
        release.set()
        first.join(5)

    assert results == [BOOKED]
    assert len(h.calls) == 1
    assert h.row().status == BOOKED
    assert len(h.outcomes) == 1


@pytest.mark.both_databases
def test_concurrent_claimants_send_one_request(h: Harness) -> None:
    h.add()
    queue(h.club, *(answer(201, {"id": n}) for n in range(8)))
    contexts = [h.context() for _ in range(8)]
    gate = threading.Barrier(len(contexts))
    results: list[str | None] = []
    lock = threading.Lock()

    def claim(ctx: BookingContext) -> None:
        gate.wait(5)
        result = book_slot(KEY, ctx)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=claim, args=(ctx,)) for ctx in contexts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert results.count(BOOKED) == 1
    assert results.count(None) == 7
    assert len(h.calls) == 1
    assert h.row().attempts == 1


@pytest.mark.both_databases
@pytest.mark.parametrize("courts", [("3",), ("3", "4")])
def test_recovery_after_a_crash_resends_with_the_same_idempotency_key(
    h: Harness, courts: tuple[str, ...]
) -> None:
    h.add(courts=courts)
    # A first run that died with the request in flight.
    h.ctx.stop = FakeStop(stop_on=1)
    queue(h.club, failure("timeout"))
    assert h.book() is None
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == KEY))
        assert row is not None
        row.status = BOOKING  # as a kill -9 during the request would leave it
    first_key = h.sent_keys()[0]

    retry, failed = recover_in_flight(h.factory, TRIGGER + timedelta(minutes=1))
    assert (retry, failed) == ([KEY], [])
    assert h.row().status == PENDING
    h.ctx = h.context()
    h.clock.set(TRIGGER + timedelta(minutes=1))
    queue(h.club, answer(201, {"id": "again"}))

    assert h.book() == BOOKED

    assert h.sent_keys() == [first_key, first_key]
    assert first_key == (KEY if len(courts) == 1 else f"{KEY}#3")
    row = h.row()
    assert (row.status, row.booking_ref, row.last_error, row.attempts) == (BOOKED, "again", None, 2)


@pytest.mark.both_databases
def test_a_409_after_recovery_may_be_our_own_booking(h: Harness) -> None:
    h.add(status=BOOKING, attempts=1)  # a request had left before the crash
    recover_in_flight(h.factory, TRIGGER)
    queue(h.club, answer(409))

    assert h.book() == FAILED

    assert h.sent_keys() == [KEY]
    reason = h.row().last_error
    assert reason is not None
    assert "may be taken by our own earlier attempt" in reason


@pytest.mark.both_databases
def test_an_interrupted_booking_is_read_from_its_column_not_its_last_error(h: Harness) -> None:
    h.add(status=BOOKING, attempts=1)
    recover_in_flight(h.factory, TRIGGER)
    # Reworded, or replaced by another note: the state stays what the column says.
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == KEY))
        assert row is not None and row.interrupted
        row.last_error = "something else entirely"
    h.add(key="b@1", last_error="interrupted, says a person's note")  # but never was
    queue(h.club, answer(409), answer(409))

    assert h.book() == FAILED
    assert h.book("b@1") == FAILED

    mine, other = h.row(), h.row("b@1")
    assert mine.last_error is not None and other.last_error is not None
    assert "may be taken by our own earlier attempt" in mine.last_error
    assert "own earlier attempt" not in other.last_error
    assert (mine.interrupted, other.interrupted) == (False, False)


def sent_at_the_trigger(
    h: Harness, clock: FakeClock, stop: FakeStop, seconds: float
) -> list[float]:
    """``h`` on ``clock`` and ``stop``, ``seconds`` before the trigger; returns the list the club
    (answering 201) fills with the clock's reading at each booking request."""
    h.clock = h.ctx.clock = clock
    h.ctx.stop = h.stop = stop
    h.add(at_trigger=False)
    clock.set(TRIGGER - timedelta(seconds=seconds))
    sent_at: list[float] = []

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        sent_at.append(clock.now)
        return 201, {}, json.dumps({"id": "on-time"})

    h.club.add_callback(responses.POST, URL, callback=club_side)
    return sent_at


@pytest.mark.both_databases
@pytest.mark.parametrize(
    ("tick", "oversleep"),
    [(0.0001, 0.0), (0.0, 0.01)],
    ids=["spins-to-the-trigger", "oversleeps-past-it"],
)
def test_the_request_never_leaves_before_the_trigger(
    h: Harness, tick: float, oversleep: float
) -> None:
    # The clock moves only when the stop event is waited on (and, in the first case, by 0.1 ms
    # per read, which the last few milliseconds' busy wait needs to end).
    clock = FakeClock(0, tick=tick)
    sent_at = sent_at_the_trigger(h, clock, FakeStop(clock, oversleep=oversleep), 45)

    assert h.book() == BOOKED

    (moment,) = sent_at
    assert moment >= TRIGGER.timestamp()
    assert moment < TRIGGER.timestamp() + 0.05
    # The connection is opened ahead, then the wait; nothing else goes to the club.
    assert h.warmed == [URL]
    # The wait looks at the wall clock at least every MAX_NAP_SECONDS, and adds up to the 45 s.
    waits = [w for w in h.stop.waits if w is not None]
    assert len(waits) == len(h.stop.waits) > 1
    assert max(waits) <= bot.MAX_NAP_SECONDS
    slept = sum(waits) + oversleep * len(waits)
    assert slept == pytest.approx(45 - bot.SPIN_SECONDS + oversleep, abs=0.02)
    assert h.row().status == BOOKED


class JumpingStop(FakeStop):
    """A stop event whose ``jump_at``-th wait also moves the clock by ``jump`` (an NTP step)."""

    def __init__(self, clock: FakeClock, *, jump_at: int, jump: float) -> None:
        super().__init__(clock)
        self.jump_at = jump_at
        self.jump = jump
        self.jumped_at: int | None = None

    def wait(self, timeout: float | None = None) -> bool:
        stopped = super().wait(timeout)
        if len(self.waits) == self.jump_at:
            assert self.clock is not None
            self.clock.advance(self.jump)
            self.jumped_at = len(self.waits)
        return stopped


@pytest.mark.parametrize("jump", [-3600.0, -30.0, 30.0, 3600.0])
def test_a_clock_jump_during_the_wait_sends_at_the_trigger_by_the_clock_at_send_time(
    h: Harness, jump: float
) -> None:
    """CONTRACT section 9: backward, the request still leaves only at its trigger by the clock
    as it reads when sending; forward past the trigger, it leaves at the next look at the clock
    (at most MAX_NAP_SECONDS later), not at the end of the wait computed before the jump."""
    clock = FakeClock(0, tick=0.0001)
    stop = JumpingStop(clock, jump_at=4, jump=jump)
    sent_at = sent_at_the_trigger(h, clock, stop, 10)

    assert h.book() == BOOKED

    (moment,) = sent_at
    assert moment >= TRIGGER.timestamp()
    assert stop.jumped_at == 4
    if jump > 10:
        # Carried past the trigger by the 4th nap: sent at once, no more napping.
        assert len(stop.waits) == 4
        assert moment < TRIGGER.timestamp() + jump
    else:
        assert moment < TRIGGER.timestamp() + 0.05
        assert sum(w for w in stop.waits if w is not None) > 10 - jump - 1


# --------------------------------------------------------------------------- secrets in errors


def test_a_club_echoing_the_token_as_its_id_gets_a_scrubbed_bounded_one_line_ref(
    h: Harness,
) -> None:
    h.add()
    echoed = f"Bearer {TOKEN}\r\n2026-11-23T12:00:00.000Z INFO bot: forged\x1b[2J\x85" + "x" * 400
    queue(h.club, answer(201, {"id": echoed}))
    assert h.book() == BOOKED
    kept = "Bearer ***2026-11-23T12:00:00.000Z INFO bot: forged[2J"
    expected = kept + "x" * (club_client.MAX_REF_CHARS - len(kept))
    assert h.row().booking_ref == expected
    assert h.outcomes[0].booking_ref == expected


def test_a_token_split_by_control_characters_is_still_scrubbed_from_the_ref(h: Harness) -> None:
    h.add()
    queue(h.club, answer(201, {"id": f"ref-{TOKEN[:6]}\x00{TOKEN[6:]}"}))
    assert h.book() == BOOKED
    assert h.row().booking_ref == "ref-***"


def test_a_token_with_a_line_break_is_never_sent_and_never_logged(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    broken = "tok-Line\nBreak-5e0c7a"
    h.add(token_name="broken")
    h.add_token("broken", broken)
    assert h.book() == FAILED
    assert h.calls == []
    assert h.row().last_error == (
        "token 'broken' holds a control character (a line break, tab, ...): put the token in "
        "tokens.json as one line and reload"
    )
    for form in (broken, repr(broken)[1:-1], "tok-Line", "Break-5e0c7a"):
        assert form not in caplog.text


def test_an_unexpected_error_quoting_the_token_is_logged_scrubbed_without_a_raw_traceback(
    h: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The issue's leak: a token holding a line break reaches requests, whose InvalidHeader
    # quotes the whole header. With the token check and the header check off, only the
    # scrubbing stands in the way.
    monkeypatch.setattr(utils, "CONTROL_RE", re.compile(r"(?!)"))
    monkeypatch.setattr(template, "header_value_problem", lambda value: None)
    broken = "tok-Line\nBreak-5e0c7a"
    h.add(token_name="broken")
    h.add_token("broken", broken)
    assert h.book() == FAILED
    assert h.row().last_error == "internal error while booking (see the log); not retried"
    (record,) = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert record.exc_info is None
    message = record.getMessage()
    assert message.startswith(f"booking {KEY}: unexpected error: Traceback (most recent call last)")
    assert "InvalidHeader: Invalid leading whitespace, reserved character(s), or return " in message
    assert "header value: 'Bearer ***'" in message
    for form in (broken, repr(broken)[1:-1], "tok-Line", "Break-5e0c7a"):
        assert form not in caplog.text


def test_matchers_are_tried_taken_rejected_booked_then_the_table() -> None:
    flow = parse_flow(
        {
            "booked": {"status": [200], "body_contains": '"ok": true'},
            "taken": {"status": [200, 422], "body_contains": "not available"},
            "rejected": {"status": [200], "body_contains": '"ok": false'},
            "booking_ref": "data.items.0.id",
        },
        api_url="https://club.example/api",
        name="t.json",
    )

    step = flow.booking_step

    def verdict(status: int, body: Any) -> str:
        raw = json.dumps(body).encode()
        return bot.classify(club_client.Answer(status, {}, raw, 1.0), step).kind

    assert verdict(200, {"ok": False, "error": "court not available"}) == "taken"
    assert verdict(200, {"ok": False, "error": "bad date"}) == "rejected"
    assert verdict(200, {"ok": True, "data": {"items": [{"id": 77}]}}) == "booked"
    found = json.dumps({"ok": True, "data": {"items": [{"id": 77}]}}).encode()
    assert step.ref_of(Reply(200, {}, found, URL), {}) == "77"
    # Unmatched answers follow the table of section 6.
    assert verdict(422, {"error": "invalid"}) == "rejected"
    assert verdict(503, {}) == "retry"
    assert verdict(409, {}) == "taken"
    assert verdict(401, {}) == "auth"
    assert verdict(425, {}) == "early"
    # With booked given, a 2xx none of the matchers knows is no booking.
    assert verdict(201, {"id": "x"}) == "unmatched"


def test_a_rejected_matcher_on_a_preparation_or_finishing_step_is_refused_credentials() -> None:
    flow = parse_flow(
        {
            "steps": [
                {"name": "login", "url": "https://club.example/l", "rejected": {"status": [499]}},
                {"name": "b", "url": "https://club.example/b", "booking": True},
                {"name": "after", "url": "https://club.example/a",
                 "rejected": {"status": [200], "body_contains": "log in again"}},
            ]
        },
        api_url=None,
        name="club.json",
    )  # fmt: skip
    login, _, after = flow.steps

    def verdict(step: Step, status: int, raw: bytes = b"{}") -> str:
        return bot.classify(club_client.Answer(status, {}, raw, 1.0), step).kind

    assert verdict(login, 499) == "auth"
    assert verdict(login, 498) == "failed"
    assert verdict(login, 200) == "ok"
    assert verdict(after, 200, b"please log in again") == "auth"
    assert verdict(after, 200) == "ok"


# --------------------------------------------------------------------------- early answers


def early_clock(h: Harness) -> FakeClock:
    """The clock moves by each wait asked of the stop event (the early retries' cadence)."""
    h.ctx.stop = h.stop = FakeStop(h.clock)
    return h.clock


def test_an_early_answer_is_sent_again_at_once_then_every_early_retry_ms(h: Harness) -> None:
    early_clock(h)
    h.ctx.early_retry_ms = 250
    h.add()
    queue(h.club, answer(425), answer(425), answer(425), answer(201, {"id": "opened"}))

    assert h.book() == BOOKED

    assert len(h.calls) == 4
    # At once after the first, then every EARLY_RETRY_MS; no backoff.
    assert h.stop.waits == [0.25, 0.25]
    assert h.sent_keys() == [KEY] * 4
    row = h.row()
    assert (row.status, row.booking_ref, row.attempts) == (BOOKED, "opened", 4)


def test_early_answers_do_not_count_against_the_three_attempts(h: Harness) -> None:
    early_clock(h)
    h.add()
    queue(
        h.club,
        answer(503),
        answer(425),
        answer(425),
        answer(503),
        answer(425),
        answer(201, {"id": "fifth"}),
    )

    assert h.book() == BOOKED

    assert len(h.calls) == 6
    assert h.stop.waits == [BASE, 0.1, 2 * BASE, 0.1]


def test_early_answers_until_early_retry_seconds_fail_saying_the_club_never_opened(
    h: Harness,
) -> None:
    early_clock(h)
    h.ctx.early_retry_ms = 250
    h.ctx.early_retry_seconds = 1.0
    h.add()
    h.club.add(answer(425, {"error": "not open yet"}))

    assert h.book() == FAILED

    # Sent at the trigger, again at once, then every 250 ms until 1 s after the trigger.
    assert len(h.calls) == 6
    assert h.stop.waits == [0.25] * 4
    assert h.row().last_error == (
        "court 3: the club never opened: still HTTP 425: not open yet 1 s after the window "
        "opened (EARLY_RETRY_SECONDS), after 6 request(s); check the window and the court with "
        "the club"
    )


def test_the_early_matcher_reads_a_club_own_not_open_answer_as_early(h: Harness) -> None:
    early_clock(h)
    h.ctx.template = parse_flow(
        {"early": {"status": [422], "body_contains": ["not open", "too soon"]}},
        api_url=URL,
        name="t.json",
    )
    h.add()
    queue(h.club, answer(422, {"error": "too soon"}), answer(201, {"id": "x"}))

    assert h.book() == BOOKED
    assert h.stop.waits == []
    assert len(h.calls) == 2


def test_a_text_answer_gives_its_booking_ref_through_a_regex(h: Harness) -> None:
    h.ctx.template = parse_flow(
        {
            "booked": {"status": [200], "body_contains": "confirmed"},
            "booking_ref": {"regex": r"Reservation #(\d+)"},
        },
        api_url=URL,
        name="t.json",
    )
    h.add()
    queue(h.club, answer(200, "<p>Reservation #4521 confirmed for court 3</p>"))

    assert h.book() == BOOKED

    assert (h.row().booking_ref, h.outcomes[0].booking_ref) == ("4521", "4521")


def test_an_early_retry_that_would_reach_the_start_is_not_made(h: Harness) -> None:
    early_clock(h)
    h.add()
    h.clock.set(DESIRED - timedelta(seconds=0.15))
    queue(h.club, answer(425), answer(425), answer(425))

    assert h.book() == FAILED

    assert len(h.calls) == 3
    assert h.row().last_error == "court 3: HTTP 425; the start came first"


def test_with_booked_given_an_unmatched_2xx_fails_without_retry_quoting_the_status(
    h: Harness,
) -> None:
    h.ctx.template = parse_flow(
        {"booked": {"status": [200], "body_contains": "Reservation Completed"}},
        api_url=URL,
        name="t.json",
    )
    h.add(courts=("3", "4"))
    queue(h.club, answer(200, "<p>Something else</p>"), answer(200, "Reservation Completed"))

    assert h.book() == FAILED

    assert len(h.calls) == 1
    assert h.row().last_error == (
        "court 3: the club answered HTTP 200, which none of the step's answers (booked) "
        "matches: the booking may or may not have been made; check with the club"
    )


def test_a_reason_quotes_the_flows_words_that_an_answer_matched(h: Harness) -> None:
    h.ctx.template = parse_flow(
        {"taken": {"status": [200], "body_contains": ["no longer available", "full"]}},
        api_url=URL,
        name="t.json",
    )
    h.add()
    queue(h.club, answer(200, "<p>Sorry, that court is no longer available.</p>"))

    assert h.book() == FAILED
    assert h.row().last_error == (
        f"court 3: taken (HTTP 200 saying 'no longer available'); {bot.TAKEN_ADVICE}"
    )


# --------------------------------------------------------------------------- flows

CLUB = "http://club.test"
JWT = "eyJhbGciOi.jwt-5ecret-2b9d"


def use_flow(h: Harness, data: dict[str, Any]) -> Flow:
    """Make ``data`` (a flow, hosts club.test) the flow every booking runs."""
    flow = parse_flow(data, api_url=None, name="club.json")
    h.ctx.template = flow
    return flow


def login_step(**extra: Any) -> dict[str, Any]:
    return {
        "name": "login",
        "url": f"{CLUB}/login",
        "json": {"token": "{token}"},
        "extract": {"jwt": {"json": "jwt"}, "user": {"json": "user.id"}},
        **extra,
    }


def book_step(**extra: Any) -> dict[str, Any]:
    return {
        "name": "book",
        "booking": True,
        "url": f"{CLUB}/book",
        "headers": {"Authorization": "Bearer {login.jwt}"},
        "json": {"user": "{login.user}", "court": "{court_id}"},
        "booking_ref": "booking.id",
        **extra,
    }


def ok_login() -> responses.Response:
    return responses.Response(
        responses.POST, f"{CLUB}/login", json={"jwt": JWT, "user": {"id": 42}}, status=200
    )


def at(url: str, status: int = 200, body: Any = None, method: str = "POST", **kw: Any) -> Any:
    if isinstance(body, dict | list):
        return responses.Response(method, f"{CLUB}{url}", json=body, status=status, **kw)
    return responses.Response(method, f"{CLUB}{url}", body=body or "", status=status, **kw)


def paths(h: Harness) -> list[str]:
    return [urlsplit(call.request.url).path for call in h.calls]


@pytest.fixture
def fh(h: Harness) -> Harness:
    """A harness whose clock moves with every wait (preparation runs ahead of the trigger)."""
    h.ctx.stop = h.stop = FakeStop(h.clock, oversleep=0.01)
    return h


def test_a_rehearsals_unexpected_error_is_logged_scrubbed_and_reported_not_raised(
    fh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """An error nobody planned for (here the HTTP layer raising with the token in its text)
    ends the rehearsal with a reason, and its log line is scrubbed as a booking's is."""
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 60})
    fh.add(at_trigger=False)
    fh.club.add(responses.POST, f"{CLUB}/login", body=RuntimeError(f"boom near {TOKEN}"))
    caplog.set_level(logging.ERROR)

    problem = bot.rehearse(fh.ctx, KEY)

    assert problem == "internal error while rehearsing (RuntimeError): see the log"
    assert "rehearsal" in caplog.text and "boom near" in caplog.text
    assert TOKEN not in caplog.text
    assert fh.row().status == PENDING


def test_a_flow_logs_in_ahead_then_books_with_the_extracted_values(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 60})
    fh.add(at_trigger=False)
    job_fired = TRIGGER.timestamp() - 62
    fh.clock.now = job_fired
    sent_at: list[float] = []

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        sent_at.append(fh.clock.now)
        return 201, {}, json.dumps({"booking": {"id": "bk-1"}})

    queue(fh.club, ok_login())
    fh.club.add_callback(responses.POST, f"{CLUB}/book", callback=club_side)

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login", "/book"]
    login, book = (call.request for call in fh.calls)
    assert json.loads(login.body) == {"token": TOKEN}
    # Only the booking step carries the Idempotency-Key.
    assert "Idempotency-Key" not in login.headers
    assert book.headers["Idempotency-Key"] == KEY
    assert book.headers["Authorization"] == f"Bearer {JWT}"
    assert json.loads(book.body) == {"user": 42, "court": "3"}
    # Preparation waited for prepare_seconds before the trigger; the booking left at it.
    assert fh.stop.waits[0] == pytest.approx(2)
    assert sent_at[0] >= TRIGGER.timestamp()
    row = fh.row()
    assert (row.status, row.booking_ref, row.attempts) == (BOOKED, "bk-1", 1)


def test_a_preparation_step_is_retried_with_backoff_while_the_trigger_is_ahead(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 60})
    fh.add(at_trigger=False)
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    queue(fh.club, at("/login", 503), at("/login", 500), ok_login())
    fh.club.add(at("/book", 201, {"booking": {"id": "b"}}))

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login"] * 3 + ["/book"]
    assert fh.stop.waits[:2] == [BASE, 2 * BASE]


@pytest.mark.both_databases
def test_losing_the_role_while_preparing_sends_no_more_steps(
    fh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 60})
    fh.ctx.owner = "daemon-1"
    fh.add(at_trigger=False)
    fh.clock.set(TRIGGER - timedelta(seconds=60))

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        lose_the_role(fh.ctx)  # during the first login, which the club answers 503
        return 503, {}, ""

    fh.club.add_callback(responses.POST, f"{CLUB}/login", callback=club_side)
    fh.club.add(at("/book", 201, {"booking": {"id": "b"}}))

    assert fh.book() is None

    assert paths(fh) == ["/login"]  # no second try, no booking request: the active one books
    row = fh.row()
    assert (row.status, row.owner, row.attempts) == (PENDING, None, 0)
    assert f"{NOT_ACTIVE_LINE}; its booking request was not sent" in caplog.messages


def test_preparation_that_never_succeeds_fails_naming_the_step_status_and_what_was_missing(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 5})
    fh.add(at_trigger=False)
    fh.clock.set(TRIGGER - timedelta(seconds=5))
    fh.club.add(at("/login", 200, {"user": {"id": 1}}))

    assert fh.book() == FAILED

    # Tries at 0, 0.5, 1.5 and 3.5 s; the next (at 7.5 s) would pass the trigger.
    assert paths(fh) == ["/login"] * 4
    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (4 tries): step 'login': "
        "HTTP 200, but value 'jwt' (json 'jwt'): no 'jwt' in the answer"
    )
    assert fh.row().attempts == 0


@pytest.mark.parametrize("status", [401])
def test_rejected_credentials_at_a_preparation_step_fail_at_once(fh: Harness, status: int) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    fh.club.add(at("/login", status, {"error": f"bad password for {TOKEN}"}))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login"]
    assert fh.row().last_error == (
        f"the club rejected the credentials at step 'login' (HTTP {status}: bad password for "
        "***): check token 'default' in tokens.json, reload, then `python main.py retry` this "
        "booking"
    )


def test_a_stop_while_preparing_leaves_the_instance_pending(fh: Harness) -> None:
    fh.ctx.stop = fh.stop = FakeStop(fh.clock, stop_on=1)
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    fh.club.add(at("/login", 503))

    assert fh.book() is None

    assert paths(fh) == ["/login"]
    assert fh.row().status == PENDING
    assert fh.outcomes == []


def test_an_instance_loaded_late_prepares_at_once(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 60})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=10))
    waits_at_login: list[int] = []

    def login(request: Any) -> tuple[int, dict[str, str], str]:
        waits_at_login.append(len(fh.stop.waits))
        return 200, {}, json.dumps({"jwt": JWT, "user": {"id": 42}})

    fh.club.add_callback(responses.POST, f"{CLUB}/login", callback=login)
    fh.club.add(at("/book", 201, {"booking": {"id": "late"}}))

    assert fh.book() == BOOKED
    # No wait before the login; then only the wait for the trigger (in naps of at most 0.5 s).
    assert waits_at_login == [0]
    assert fh.stop.waits and all((w or 0) <= bot.MAX_NAP_SECONDS for w in fh.stop.waits)
    assert fh.clock.now >= TRIGGER.timestamp()


def slot_step(**extra: Any) -> dict[str, Any]:
    return {
        "name": "slot",
        "at_trigger": True,
        "method": "GET",
        "url": f"{CLUB}/plan/{{start:%d-%m-%Y}}",
        "headers": {"Authorization": "Bearer {login.jwt}"},
        "extract": {"id": {"json": "slots[court={court_id}][start={time}].id"}},
        **extra,
    }


def plan(*courts: str) -> dict[str, Any]:
    return {"slots": [{"court": int(c), "start": "18:00", "id": f"s{c}"} for c in courts]}


def test_an_at_trigger_step_runs_at_the_trigger_never_before(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step(json={"slot": "{slot.id}"})]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=61))
    sent: list[tuple[str, float]] = []

    def club_side(request: Any) -> tuple[int, dict[str, str], str]:
        sent.append((urlsplit(request.url).path, fh.clock.now))
        if request.url.endswith("/login"):
            return 200, {}, json.dumps({"jwt": JWT, "user": {"id": 1}})
        if "/plan/" in request.url:
            return 200, {}, json.dumps(plan("3"))
        return 201, {}, json.dumps({"booking": {"id": "b"}})

    for method in (responses.GET, responses.POST):
        fh.club.add_callback(method, re.compile(f"{CLUB}/.*"), callback=club_side)

    assert fh.book() == BOOKED

    assert [p for p, _ in sent] == ["/login", "/plan/30-11-2026", "/book"]
    assert sent[0][1] < TRIGGER.timestamp() - 59
    assert all(moment >= TRIGGER.timestamp() for _, moment in sent[1:])
    assert json.loads(fh.calls[2].request.body) == {"slot": "s3"}
    # The first request of the trigger (the slot lookup) had its connection opened ahead.
    assert fh.warmed == [f"{CLUB}/plan/30-11-2026"]


def test_a_slot_not_shown_yet_on_any_court_is_looked_up_again_like_an_early_answer(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step(json={"slot": "{slot.id}"})]})
    fh.add()
    queue(
        fh.club,
        ok_login(),
        at("/plan/30-11-2026", 200, {"slots": []}, method="GET"),
        at("/plan/30-11-2026", 425, method="GET"),
        at("/plan/30-11-2026", 200, {"slots": []}, method="GET"),
        at("/plan/30-11-2026", 200, plan("3"), method="GET"),
        at("/book", 201, {"booking": {"id": "b"}}),
    )

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login"] + ["/plan/30-11-2026"] * 4 + ["/book"]
    # Again at once after the first empty planning (and the 425), then after EARLY_RETRY_MS.
    assert fh.stop.waits == [0.1]


def test_a_court_whose_slot_is_not_shown_gives_way_to_the_next_court_at_once(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step(json={"slot": "{slot.id}"})]})
    fh.add(courts=("3", "4"))
    queue(
        fh.club,
        ok_login(),
        at("/plan/30-11-2026", 200, plan("4"), method="GET"),
        at("/plan/30-11-2026", 200, plan("4"), method="GET"),
        at("/book", 201, {"booking": {"id": "b4"}}),
    )

    assert fh.book() == BOOKED

    assert fh.row().booked_court == "4"
    assert fh.stop.waits == []


def test_a_slot_that_never_shows_up_fails_after_early_retry_seconds(fh: Harness) -> None:
    fh.ctx.early_retry_ms = 500
    fh.ctx.early_retry_seconds = 1
    fh.ctx.stop = fh.stop = FakeStop(fh.clock)
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step(json={"slot": "{slot.id}"})]})
    fh.add(courts=("3", "4"))
    queue(fh.club, ok_login(), at("/plan/30-11-2026", 409, method="GET"))
    fh.club.add(at("/plan/30-11-2026", 200, plan("5"), method="GET"))

    assert fh.book() == FAILED

    # Court 3 is taken; court 4 is looked up at once, again at once, then every 500 ms.
    assert paths(fh) == ["/login"] + ["/plan/30-11-2026"] * 5
    assert fh.row().last_error == (
        "court 3: step 'slot': taken (HTTP 409); court 4: step 'slot': HTTP 200, but value 'id' "
        "(json 'slots[court={court_id}][start={time}].id'): no element of slots matches "
        "[court={court_id}][start={time}] still 1 s after the window opened "
        "(EARLY_RETRY_SECONDS): it never showed up; check the court and the time with the club"
    )


def test_a_taken_court_goes_on_with_the_next_court_and_its_own_at_trigger_steps(
    fh: Harness,
) -> None:
    flow = use_flow(
        fh,
        {
            "steps": [
                login_step(),
                {"name": "me", "at_trigger": True, "method": "GET", "url": f"{CLUB}/me"},
                slot_step(),
                book_step(json={"slot": "{slot.id}"}),
            ]
        },
    )
    assert [s.per_court for s in flow.steps] == [False, False, True, True]
    fh.add(courts=("3", "4", "5"))
    queue(
        fh.club,
        ok_login(),
        at("/me", 200, {}, method="GET"),
        at("/plan/30-11-2026", 200, plan("3", "4", "5"), method="GET"),
        at("/book", 409, {"error": "slot gone"}),
        at("/plan/30-11-2026", 409, method="GET"),
        at("/plan/30-11-2026", 200, plan("5"), method="GET"),
        at("/book", 201, {"booking": {"id": "b5"}}),
    )

    assert fh.book() == BOOKED

    assert paths(fh) == [
        "/login",
        "/me",
        "/plan/30-11-2026",
        "/book",
        "/plan/30-11-2026",
        "/plan/30-11-2026",
        "/book",
    ]
    booked = [
        json.loads(c.request.body)["slot"] for c in fh.calls if c.request.url.endswith("/book")
    ]
    assert booked == ["s3", "s5"]
    assert fh.calls[-1].request.headers["Idempotency-Key"] == f"{KEY}#5"
    row = fh.row()
    assert (row.status, row.booked_court, row.attempts) == (BOOKED, "5", 2)


def test_every_court_taken_at_an_at_trigger_step_names_each(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step(json={"slot": "{slot.id}"})]})
    fh.add(courts=("3", "4"))
    queue(fh.club, ok_login())
    fh.club.add(at("/plan/30-11-2026", 409, {"message": "booked out"}, method="GET"))

    assert fh.book() == FAILED
    assert fh.row().last_error == (
        "court 3: step 'slot': taken (HTTP 409: booked out); court 4: step 'slot': taken "
        f"(HTTP 409: booked out); {bot.TAKEN_ADVICE}"
    )


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_at_an_at_trigger_step_fail_at_once(fh: Harness, status: int) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step()]})
    fh.add(courts=("3", "4"))
    queue(fh.club, ok_login(), at("/plan/30-11-2026", status, method="GET"))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login", "/plan/30-11-2026"]
    assert fh.row().last_error == (
        f"the club rejected the credentials at step 'slot' (court 3) (HTTP {status}): check token "
        "'default' in tokens.json, reload, then `python main.py retry` this booking"
    )


def test_preparation_steps_using_the_court_run_once_per_court(fh: Harness) -> None:
    lookup = {
        "name": "form",
        "method": "GET",
        "url": f"{CLUB}/form/{{court_id}}",
        "extract": {"csrf": {"regex": 'csrf="([^"]+)"'}},
    }
    use_flow(fh, {"steps": [login_step(), lookup, book_step(json={"csrf": "{form.csrf}"})]})
    fh.add(courts=("3", "4"))
    queue(
        fh.club,
        ok_login(),
        at("/form/3", 200, 'csrf="c3"', method="GET"),
        at("/form/4", 200, 'csrf="c4"', method="GET"),
        at("/book", 409),
        at("/book", 201, {"booking": {"id": "b4"}}),
    )

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login", "/form/3", "/form/4", "/book", "/book"]
    assert [json.loads(c.request.body) for c in fh.calls[3:]] == [{"csrf": "c3"}, {"csrf": "c4"}]


def test_a_court_whose_preparation_failed_is_left_out_and_the_others_go_on(
    fh: Harness,
) -> None:
    lookup = {
        "name": "form",
        "method": "GET",
        "url": f"{CLUB}/form/{{court_id}}",
        "extract": {"csrf": {"regex": 'csrf="([^"]+)"'}},
    }
    use_flow(
        fh,
        {
            "steps": [login_step(), lookup, book_step(json={"csrf": "{form.csrf}"})],
            "prepare_seconds": 1,
        },
    )
    fh.add(courts=("3", "4"))
    fh.clock.set(TRIGGER - timedelta(seconds=1))
    queue(fh.club, ok_login())
    fh.club.add(at("/form/3", 200, "no form here", method="GET"))
    fh.club.add(at("/form/4", 200, 'csrf="c4"', method="GET"))
    fh.club.add(at("/book", 409, {"error": "gone"}))

    assert fh.book() == FAILED

    assert paths(fh).count("/book") == 1
    assert fh.row().last_error == (
        "court 3: preparation did not succeed before the window opened (2 tries): step 'form': "
        "HTTP 200, but value 'csrf' (regex 'csrf=\"([^\"]+)\"'): no match in the answer's body; "
        "court 4: taken (HTTP 409: gone)"
    )


def confirm_step(**extra: Any) -> dict[str, Any]:
    return {
        "name": "confirm",
        "method": "PUT",
        "url": f"{CLUB}/book/{{book.bid}}",
        "headers": {"Authorization": "Bearer {login.jwt}"},
        "json": {"confirmed": True},
        **extra,
    }


def use_confirm_flow(h: Harness) -> None:
    """The flow: log in, book (its answer's ``booking.id`` kept as ``bid``), confirm with a PUT."""
    use_flow(
        h,
        {
            "steps": [
                login_step(),
                book_step(extract={"bid": {"json": "booking.id"}}),
                confirm_step(),
            ]
        },
    )


def test_finishing_steps_run_after_the_booking_with_its_values(fh: Harness) -> None:
    use_confirm_flow(fh)
    fh.add()
    queue(
        fh.club,
        ok_login(),
        at("/book", 200, {"booking": {"id": "B-9"}}),
        at("/book/B-9", 500, method="PUT"),
        at("/book/B-9", 200, {"ok": True}, method="PUT"),
    )

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login", "/book", "/book/B-9", "/book/B-9"]
    assert fh.stop.waits[-1] == BASE
    row = fh.row()
    assert (row.status, row.booking_ref, row.last_error) == (BOOKED, "B-9", None)


def test_a_finishing_step_that_fails_keeps_the_ref_and_never_resends_the_booking(
    fh: Harness,
) -> None:
    use_confirm_flow(fh)
    fh.add(courts=("3", "4"))
    queue(fh.club, ok_login(), at("/book", 200, {"booking": {"id": "B-9"}}))
    fh.club.add(at("/book/B-9", 503, method="PUT"))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login", "/book"] + ["/book/B-9"] * 3
    assert fh.stop.waits[-2:] == [BASE, 2 * BASE]
    row = fh.row()
    assert (row.status, row.booking_ref) == (FAILED, "B-9")
    assert row.last_error == (
        "the club took the booking (court 3, ref B-9) but step 'confirm' did not complete: "
        "HTTP 503 (not a 2xx answer: the club is down or failing), after 3 tries; check it with "
        "the club"
    )
    assert fh.outcomes[-1].booking_ref == "B-9"


@pytest.mark.parametrize("status", [401, 403])
def test_a_finishing_step_with_rejected_credentials_fails_at_once(fh: Harness, status: int) -> None:
    use_confirm_flow(fh)
    fh.add()
    queue(fh.club, ok_login(), at("/book", 200, {"booking": {"id": "B-9"}}))
    fh.club.add(at("/book/B-9", status, method="PUT"))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login", "/book", "/book/B-9"]
    refused = {
        401: "HTTP 401: the credentials were rejected",
        403: "HTTP 403 (not a 2xx answer: refused, by the credentials, a login limit or a "
        "firewall's challenge)",
    }[status]
    assert fh.row().last_error == (
        "the club took the booking (court 3, ref B-9) but step 'confirm' did not complete: "
        f"{refused}; check it with the club"
    )


def test_a_finishing_step_needing_a_value_the_booking_answer_lacked_fails_with_why(
    fh: Harness,
) -> None:
    use_confirm_flow(fh)
    fh.add()
    queue(fh.club, ok_login(), at("/book", 201, "<html>booked!</html>"))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login", "/book"]
    assert fh.row().last_error == (
        "the club took the booking (court 3) but step 'confirm' did not complete: {book.bid} "
        "has no value (step 'book' could not extract it: value 'bid' (json 'booking.id'): the "
        "answer is not JSON); check it with the club"
    )


# --------------------------------------------------------------------------- cookies and hosts


def test_each_booking_has_its_own_cookie_jar_sent_only_with_its_own_steps(fh: Harness) -> None:
    use_flow(
        fh,
        {
            "steps": [
                {"name": "home", "method": "GET", "url": f"{CLUB}/"},
                {"name": "book", "booking": True, "url": f"{CLUB}/book"},
            ]
        },
    )
    second = utils.instance_key("tue", DESIRED + timedelta(days=1))
    fh.add()
    fh.add(key=second, desired=DESIRED + timedelta(days=1))
    queue(
        fh.club,
        at(
            "/",
            200,
            method="GET",
            headers=[("Set-Cookie", "SID=one; Path=/"), ("Set-Cookie", "lang=en; Path=/")],
        ),
        at("/book", 201, {"id": 1}),
        at("/", 200, method="GET", headers=[("Set-Cookie", "SID=two; Path=/")]),
        at("/book", 201, {"id": 2}),
    )

    fh.clock.set(TRIGGER)
    assert fh.book() == BOOKED
    fh.clock.set(TRIGGER + timedelta(days=1))
    assert fh.book(second) == BOOKED

    cookies = [call.request.headers.get("Cookie") for call in fh.calls]
    assert cookies == [None, "SID=one; lang=en", None, "SID=two"]
    # The shared connection pool's session keeps none of them.
    assert len(fh.ctx.client.session.cookies) == 0


def test_a_cookie_extraction_reads_the_answers_cookie(fh: Harness) -> None:
    use_flow(
        fh,
        {
            "steps": [
                {
                    "name": "login",
                    "url": f"{CLUB}/login",
                    "extract": {"session": {"cookie": "SID"}},
                },
                {
                    "name": "book",
                    "booking": True,
                    "url": f"{CLUB}/book",
                    "headers": {"X-Session": "{login.session}"},
                },
            ]
        },
    )
    fh.add()
    queue(
        fh.club,
        at("/login", 200, headers=[("Set-Cookie", f"SID={JWT}; Path=/; HttpOnly")]),
        at("/book", 418, {"error": f"who is {JWT}?"}),
    )

    assert fh.book() == FAILED

    assert fh.calls[1].request.headers["X-Session"] == JWT
    assert fh.calls[1].request.headers["Cookie"] == f"SID={JWT}"
    # A cookie's value is a secret like the token.
    assert fh.row().last_error == (
        "the club refused the request (HTTP 418: who is ***?): check the entry and the URL"
    )


def redirecting_flow(h: Harness, target: str, **login: Any) -> None:
    use_flow(
        h,
        {
            "hosts": ["club.test", "auth.club.test:8443"],
            "steps": [
                {
                    "name": "login",
                    "url": f"{CLUB}/login",
                    "follow_redirects": True,
                    "extract": {"code": {"url": "code=(\\w+)"}},
                    **login,
                },
                {
                    "name": "book",
                    "booking": True,
                    "url": f"{CLUB}/book",
                    "json": {"code": "{login.code}"},
                },
            ],
            "prepare_seconds": 1,
        },
    )
    h.add()
    h.clock.set(TRIGGER - timedelta(seconds=1))


def test_a_follow_redirects_step_follows_within_hosts_keeping_cookies(fh: Harness) -> None:
    redirecting_flow(fh, "")
    auth = "http://auth.club.test:8443/sso"
    queue(
        fh.club,
        at("/login", 302, headers=[("Location", auth), ("Set-Cookie", "a=1; Path=/")]),
        responses.Response(
            responses.GET,
            auth,
            status=303,
            headers=[("Location", f"{CLUB}/done?code=XYZ"), ("Set-Cookie", "sso=2; Path=/")],
        ),
        at("/done?code=XYZ", 200, method="GET"),
        at("/book", 201, {"id": "r"}),
    )

    assert fh.book() == BOOKED

    methods = [(c.request.method, c.request.url) for c in fh.calls]
    assert methods == [
        ("POST", f"{CLUB}/login"),
        ("GET", auth),
        ("GET", f"{CLUB}/done?code=XYZ"),
        ("POST", f"{CLUB}/book"),
    ]
    assert fh.calls[2].request.headers["Cookie"] == "a=1"
    assert json.loads(fh.calls[3].request.body) == {"code": "XYZ"}


def test_a_redirect_off_the_hosts_is_not_followed(fh: Harness) -> None:
    redirecting_flow(fh, "")
    fh.club.add(at("/login", 302, headers=[("Location", "https://evil.test/steal")]))
    fh.club.add(responses.Response(responses.GET, "https://evil.test/steal", status=200))

    assert fh.book() == FAILED

    assert all(urlsplit(c.request.url).hostname == "club.test" for c in fh.calls)
    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (2 tries): step 'login': 'login' "
        "was redirected to 'evil.test', which is not on the flow's hosts (club.test, "
        "auth.club.test:8443): not followed, so the token and cookies stay on hosts; add that "
        "host to hosts if it is the club's"
    )


def test_a_redirect_loop_fails_the_step(fh: Harness) -> None:
    redirecting_flow(fh, "")
    fh.club.add(at("/login", 302, headers=[("Location", f"{CLUB}/login")]))
    fh.club.add(at("/login", 302, method="GET", headers=[("Location", f"{CLUB}/login")]))

    assert fh.book() == FAILED

    # Each try: the request and 10 redirects.
    assert len(fh.calls) == 2 * 11
    assert "'login' was redirected more than 10 times (a redirect loop?)" in (
        fh.row().last_error or ""
    )


def test_a_step_without_follow_redirects_reads_the_redirect_as_its_answer(fh: Harness) -> None:
    use_flow(
        fh,
        {
            "steps": [
                {"name": "login", "url": f"{CLUB}/login", "ok": {"status": [302]}},
                {"name": "book", "booking": True, "url": f"{CLUB}/book"},
            ]
        },
    )
    fh.add()
    queue(
        fh.club,
        at("/login", 302, headers=[("Location", f"{CLUB}/home"), ("Set-Cookie", "s=1; Path=/")]),
        at("/book", 201, {"id": 3}),
    )

    assert fh.book() == BOOKED
    assert paths(fh) == ["/login", "/book"]
    assert fh.calls[1].request.headers["Cookie"] == "s=1"


# --------------------------------------------------------------------------- secrets


def test_extracted_values_are_scrubbed_from_reasons_and_the_ref(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), book_step(booking_ref="ref")]})
    fh.add()
    queue(fh.club, ok_login(), at("/book", 201, {"ref": f"R-1 for {JWT}"}))

    assert fh.book() == BOOKED
    assert fh.row().booking_ref == "R-1 for ***"


def test_a_ref_that_is_a_value_the_booking_step_extracts_is_stored(fh: Harness) -> None:
    use_flow(
        fh, {"steps": [login_step(), book_step(booking_ref="id", extract={"id": {"json": "id"}})]}
    )
    fh.add()
    queue(fh.club, ok_login(), at("/book", 201, {"id": "BK-123"}))

    assert fh.book() == BOOKED
    assert fh.row().booking_ref == "BK-123"


def test_secret_fields_the_token_lacks_fail_before_any_request(fh: Harness) -> None:
    use_flow(
        fh,
        {
            "steps": [
                {"name": "login", "url": f"{CLUB}/login", "json": {"pw": "{secret.password}"}},
                {"name": "book", "booking": True, "url": f"{CLUB}/book"},
            ]
        },
    )
    fh.add()

    assert fh.book() == FAILED

    assert fh.calls == []
    assert fh.row().last_error == (
        "token 'default' has no field 'password', which the club's flow uses as "
        "{secret.password}: write token 'default' in tokens.json as an object with the fields "
        "password, reload, then `python main.py retry` this booking"
    )


def test_secret_fields_are_sent_and_scrubbed_from_every_reason(
    fh: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-Tr0ub4dor-77"
    add_object_token(fh, "member", {"email": "me@x.test", "password": password})
    use_flow(
        fh,
        {
            "steps": [
                {
                    "name": "login",
                    "url": f"{CLUB}/login",
                    "json": {"email": "{secret.email}", "pw": "{secret.password}"},
                },
                {"name": "book", "booking": True, "url": f"{CLUB}/book"},
            ]
        },
    )
    fh.add(token_name="member")
    fh.clock.set(TRIGGER - timedelta(seconds=1))
    fh.club.add(at("/login", 500, {"error": f"cannot log in with {password}"}))

    assert fh.book() == FAILED

    assert json.loads(fh.calls[0].request.body) == {"email": "me@x.test", "pw": password}
    reason = fh.row().last_error or ""
    assert "cannot log in with ***" in reason
    assert password not in reason + caplog.text


def test_a_huge_or_non_json_answer_fails_the_step_with_a_reason(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 1})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=1))
    fh.club.add(at("/login", 200, "{" + "x" * (2 * MIB)))

    assert fh.book() == FAILED
    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (2 tries): step 'login': HTTP "
        "200 (its body was cut at 1 MiB, the most courtbot reads), but value 'jwt' (json "
        "'jwt'): the answer is not JSON; value 'user' (json 'user.id'): the answer is not JSON"
    )


# --------------------------------------------------------------------------- dry-run


def test_dry_run_sends_only_the_preparation_steps_and_reports_value_names(
    club: responses.RequestsMock,
) -> None:
    flow = parse_flow(
        {
            "steps": [
                login_step(),
                slot_step(),
                book_step(extract={"bid": {"json": "booking.id"}}),
                confirm_step(),
            ]
        },
        api_url=None,
        name="club.json",
    )
    slot = bot.Slot(KEY, DESIRED, 60, BERLIN, ("3",))
    club.add(ok_login())
    client = ClubClient(timeout=TIMEOUT)
    try:
        reports, problem = bot.dry_run(client, flow, slot, {"token": TOKEN}, "default")
    finally:
        client.close()
    assert problem is None
    assert [(r.step, r.status, r.values) for r in reports] == [("login", 200, ("jwt", "user"))]
    assert [urlsplit(c.request.url).path for c in club.calls] == ["/login"]


def test_dry_run_names_the_failing_step_and_the_fix(club: responses.RequestsMock) -> None:
    flow = parse_flow({"steps": [login_step(), book_step()]}, api_url=None, name="club.json")
    slot = bot.Slot(KEY, DESIRED, 60, BERLIN, ("3",))
    club.add(at("/login", 200, {"jwt": "x"}))
    client = ClubClient(timeout=TIMEOUT)
    try:
        reports, problem = bot.dry_run(client, flow, slot, {"token": TOKEN}, "default")
    finally:
        client.close()
    assert [(r.step, r.status) for r in reports] == [("login", 200)]
    assert problem == (
        "step 'login' failed: HTTP 200, but value 'user' (json 'user.id'): no 'user' in the "
        "answer: check the step's URL, the token's fields and the ids in tokens.json and "
        "schedules.json; for a missing value, compare the extract path with the club's answer"
    )


def test_a_permanent_error_at_a_preparation_step_fails_at_once_naming_the_step(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "self-signed certificate"
    fh.club.add(at("/login", body=requests.exceptions.SSLError(untrusted)))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login"]
    assert fh.row().last_error == (
        "step 'login': the club's certificate is not trusted (self-signed certificate); not "
        "retried: check the host in the booking URL, or ask the club to fix its certificate"
    )
    assert fh.stop.waits == []


# ---------------------------------------------------------------- the club's clock


def test_the_clock_is_read_only_within_the_preparation_time_and_moves_the_send(
    h: Harness,
) -> None:
    """The club runs 2.5 s ahead: its Date is read only from prepare_seconds before the trigger
    (never before) and ends before it; the booking leaves at the club's opening by its clock."""
    from email.utils import formatdate

    h.add()
    set_club(h, "ahead")
    h.ctx.clubs = {
        "ahead": parse_flow(
            {
                "prepare_seconds": 20,
                "clock": {"url": "http://padel.test/ping"},
                "steps": [{"name": "book", "booking": True, "url": PADEL}],
            },
            api_url=URL,
            name="clubs/ahead.json",
        )
    }
    trigger = TRIGGER.timestamp()
    h.clock.now = trigger - 100.0  # the job started long before its preparation time
    h.clock.tick = 0.0001  # each read moves it on: the spin before the send ends
    h.ctx.stop = FakeStop(h.clock)
    reads: list[float] = []

    def date(_request: Any) -> tuple[int, dict[str, str], str]:
        reads.append(h.clock.now)
        h.clock.advance(0.002)  # the round trip
        return 200, {"Date": formatdate(h.clock.now - 0.001 + 2.5, usegmt=True)}, ""

    h.club.add_callback(responses.GET, "http://padel.test/ping", callback=date)
    sent: list[float] = []

    def book(_request: Any) -> tuple[int, dict[str, str], str]:
        sent.append(h.clock.now)
        return 201, {}, json.dumps({"id": "a-1"})

    h.club.add_callback(responses.POST, PADEL, callback=book)

    assert h.book() == BOOKED

    assert 3 <= len(reads) <= 20
    assert trigger - 20.0 <= min(reads) and max(reads) < trigger
    row = h.row()
    assert row.clock_offset_ms is not None and row.clock_uncertainty_ms is not None
    assert abs(row.clock_offset_ms - 2500.0) <= row.clock_uncertainty_ms
    # Sent by the club's clock: never before its opening (our trigger - 2.5 s), and well
    # before our own trigger.
    assert trigger - 2.5 <= sent[0] < trigger - 2.4
    assert "by the club's clock (+2500 ms" in (h.outcomes[0].timing or "")


# --------------------------------------------------------------------------- CONTRACT 13

#: Fallback times of the Berlin instance at 18:00: 19:00 (trigger an hour after TRIGGER) and
#: 17:00 (trigger an hour before it: open at once).
AT_19 = datetime(2026, 11, 30, 18, 0, tzinfo=UTC)
AT_17 = datetime(2026, 11, 30, 16, 0, tzinfo=UTC)


def wishes(h: Harness, *, times: tuple[datetime, ...] = (), watch: timedelta | None = None) -> None:
    """Give the instance KEY fallback times (as reconcile writes them) and a watch."""
    listed = [(DESIRED, "18:00"), *((t, f"{t.astimezone(BERLIN):%H:%M}") for t in times)]
    fallbacks = [
        [text, utils.format_utc(t), utils.format_utc(t - timedelta(hours=168))]
        for t, text in listed
    ]
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == KEY))
        assert row is not None
        row.fallbacks = json.dumps(fallbacks) if times else None
        row.watch_until = DESIRED - watch if watch is not None else None


def test_every_court_taken_goes_on_with_the_fallback_time_at_its_own_trigger(h: Harness) -> None:
    h.add(courts=("3", "4"))
    wishes(h, times=(AT_19,))
    queue(h.club, answer(409, "Court 3 is already booked"), answer(409, "taken"))
    assert h.book() == PENDING
    row = h.row()
    assert (row.status, row.fallback_step, row.trigger_time) == (
        PENDING,
        1,
        AT_19 - timedelta(hours=168),
    )
    assert len(h.calls) == 2 and h.outcomes == []
    h.clock.set(AT_19 - timedelta(hours=168))
    queue(h.club, answer(201, {"id": "bk-19"}))
    assert h.book() == BOOKED
    assert h.sent_keys() == [f"{KEY}#3", f"{KEY}#4", f"{KEY}@19:00#3"]
    assert h.sent_bodies()[-1]["start"] == "2026-11-30T19:00:00+01:00"
    row = h.row()
    assert (row.key, row.booked_time, row.booking_ref) == (KEY, "19:00", "bk-19")
    (outcome,) = h.outcomes
    assert (outcome.status, outcome.first_choice) == (BOOKED, "18:00")
    assert outcome.desired_start == AT_19


def test_a_booked_fallback_time_says_when_its_own_request_left(h: Harness) -> None:
    """The fallback's request is counted from the fallback's own trigger: 3 ms after it, not an
    hour "before the window opened" (the first time's send, an hour before that trigger)."""
    h.add(courts=("3", "4"))
    wishes(h, times=(AT_19,))
    queue(h.club, answer(409, "Court 3 is already booked"), answer(409, "taken"))
    assert h.book() == PENDING
    assert h.row().first_sent_at is None
    h.clock.set(AT_19 - timedelta(hours=168) + timedelta(milliseconds=3))
    queue(h.club, answer(201, {"id": "bk-19"}))
    assert h.book() == BOOKED
    timing = h.outcomes[-1].timing or ""
    assert timing.startswith("sent ") and "after the window opened" in timing, timing
    assert "before" not in timing, timing


def test_a_watch_that_books_the_first_choice_names_it_not_the_last_fallback_tried(
    h: Harness,
) -> None:
    """18:00 and its fallback 17:00 taken, then the watch takes the times in turn and books
    18:00: the outcome's start (the message, the calendar entry, a later cancel) is 18:00."""
    h.ctx.jitter = lambda: 0.5
    h.add()
    wishes(h, times=(AT_17,), watch=timedelta(hours=2))
    queue(h.club, answer(409), answer(409))
    assert h.book() == WATCHING
    h.clock.set(h.row().next_try_at)
    queue(h.club, answer(201, {"id": "bk-w"}))
    assert h.book() == BOOKED
    row = h.row()
    assert (row.booked_time, row.fallback_step) == ("18:00", 0)
    final = h.outcomes[-1]
    assert final.desired_start == DESIRED and final.first_choice is None


def test_a_fallback_time_whose_window_is_open_is_tried_at_once_and_at_most_one_books(
    h: Harness,
) -> None:
    h.add()
    wishes(h, times=(AT_17, AT_19))
    queue(h.club, answer(409), answer(201, {"id": "bk-17"}))
    assert h.book() == BOOKED
    assert [b["start"] for b in h.sent_bodies()] == [
        "2026-11-30T18:00:00+01:00",
        "2026-11-30T17:00:00+01:00",
    ]
    assert h.row().booked_time == "17:00" and h.row().fallback_step == 1
    assert len(h.outcomes) == 1


def test_the_reason_lists_each_time_tried_with_what_the_club_said(h: Harness) -> None:
    h.add()
    wishes(h, times=(AT_17,))
    queue(h.club, answer(409, "full"), answer(409, "gone"))
    assert h.book() == FAILED
    assert h.row().last_error == (
        f"18:00: court 3: taken (HTTP 409); 17:00: court 3: taken (HTTP 409); {TAKEN_ADVICE}"
    )
    assert h.outcomes[0].retry_helps is False


@pytest.mark.parametrize("status", [401, 400])
def test_a_failure_other_than_taken_tries_no_fallback(h: Harness, status: int) -> None:
    h.add()
    wishes(h, times=(AT_17,), watch=timedelta(hours=1))
    queue(h.club, answer(status))
    assert h.book() == FAILED
    assert len(h.calls) == 1 and h.row().fallback_step == 0


def test_a_watch_tries_again_each_interval_until_booked(h: Harness) -> None:
    h.ctx.jitter = lambda: 1.0  # +10 %
    h.add(courts=("3", "4"))
    wishes(h, watch=timedelta(hours=2))
    queue(h.club, answer(409), answer(409))
    assert h.book() == WATCHING
    row = h.row()
    assert (row.status, row.next_try_at) == (WATCHING, TRIGGER + timedelta(seconds=330))
    (watching,) = h.outcomes
    assert watching.status == WATCHING
    assert watching.watch_until == DESIRED - timedelta(hours=2)
    # The first try: one request, court 3 (the courts take turns), still taken.
    h.clock.set(row.next_try_at)
    queue(h.club, answer(409, "still taken"))
    assert h.book() == WATCHING
    assert len(h.calls) == 3 and h.sent_keys()[-1] == f"{KEY}~watch1"
    row = h.row()
    assert (row.watch_tries, row.next_try_at) == (1, TRIGGER + timedelta(seconds=660))
    # A 429 asks for 20 minutes: no sooner than that, and the watch goes on.
    h.clock.set(row.next_try_at)
    queue(h.club, answer(429, "", {"Retry-After": "1200"}))
    assert h.book() == WATCHING
    assert h.sent_keys()[-1] == f"{KEY}~watch2"
    assert h.sent_bodies()[-1]["court_id"] == "4"
    assert h.row().next_try_at == TRIGGER + timedelta(seconds=660 + 1200)
    h.clock.set(h.row().next_try_at)
    queue(h.club, answer(201, {"id": "bk-w"}))
    assert h.book() == BOOKED
    assert len(h.calls) == 5
    row = h.row()
    assert (row.status, row.booking_ref, row.booked_court) == (BOOKED, "bk-w", "3")
    final = h.outcomes[-1]
    assert (final.status, final.from_watch) == (BOOKED, True)
    assert len(h.outcomes) == 2  # one Watching:, one final outcome


def test_a_watch_ends_failed_when_it_runs_out(h: Harness) -> None:
    h.ctx.jitter = lambda: 0.0  # -10 %
    h.ctx.watch_interval = 60.0
    h.add()
    wishes(h, watch=timedelta(hours=168) - timedelta(seconds=100))
    queue(h.club, answer(409), answer(409))
    assert h.book() == WATCHING
    # 60 s at least, whatever the jitter.
    assert h.row().next_try_at == TRIGGER + timedelta(seconds=60)
    h.clock.set(h.row().next_try_at)
    assert h.book() == FAILED
    row = h.row()
    assert row.last_error == (
        "taken; watched until Mon 2026-11-23 18:01 CET, 1 try (18:00: court 3: taken (HTTP 409))"
    )
    assert (row.next_try_at, h.outcomes[-1].status) == (None, FAILED)
    assert len(h.calls) == 2


def test_a_watch_try_answered_neither_taken_nor_booked_fails_it(h: Harness) -> None:
    h.add()
    wishes(h, watch=timedelta(hours=1))
    queue(h.club, answer(409))
    assert h.book() == WATCHING
    h.clock.set(h.row().next_try_at)
    queue(h.club, answer(400, "bad request"))
    assert h.book() == FAILED
    assert h.row().last_error == (
        "watch, try 1: the club refused the request (HTTP 400): check the entry and the URL"
    )


def test_a_watch_try_waits_for_its_time_and_a_reload_may_have_ended_it(h: Harness) -> None:
    h.add()
    wishes(h, watch=timedelta(hours=1))
    queue(h.club, answer(409))
    assert h.book() == WATCHING
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == KEY))
        assert row is not None
        row.status = CANCELLED
    h.clock.set(DESIRED - timedelta(hours=3))
    assert h.book() is None and len(h.calls) == 1


def test_a_watch_try_claimed_early_waits_for_its_time_then_sends_once(h: Harness) -> None:
    h.ctx.jitter = lambda: 0.5
    h.add()
    wishes(h, watch=timedelta(hours=1))
    queue(h.club, answer(409))
    assert h.book() == WATCHING
    next_try = h.row().next_try_at
    assert next_try is not None
    h.stop.clock = h.clock  # a wait moves the clock, as a real sleep would
    h.clock.tick = 0.001  # and so does the last spin
    h.clock.set(next_try - timedelta(seconds=2))  # the job's lead
    queue(h.club, answer(409))
    assert h.book() == WATCHING
    assert len(h.calls) == 2
    assert 1.9 <= sum(w or 0 for w in h.stop.waits) <= 2.0  # it waited for its time


def test_one_try_of_a_watch_in_flight_per_club_and_token(h: Harness) -> None:
    h.add()
    wishes(h, watch=timedelta(hours=1))
    queue(h.club, answer(409))
    assert h.book() == WATCHING
    h.clock.set(h.row().next_try_at)
    lock = h.ctx.watch_locks.setdefault((None, "default"), threading.Lock())
    lock.acquire()
    queue(h.club, answer(201, {"id": "bk-1"}))
    outcome: list[str | None] = []
    worker = threading.Thread(target=lambda: outcome.append(h.book()))
    worker.start()
    worker.join(0.5)
    # Another try of this club and token is under way: this one waits, nothing sent yet.
    assert worker.is_alive() and len(h.calls) == 1
    lock.release()
    worker.join(5)
    assert outcome == [BOOKED] and len(h.calls) == 2


def test_the_players_go_into_the_request(h: Harness) -> None:
    h.ctx.template = parse_flow(
        {"url": URL, "json": {"players": "{players}", "partner": "{players[1]}"}},
        api_url=URL,
        name="t.json",
    )
    h.add()
    with transaction(h.factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == KEY))
        assert row is not None
        row.players = json.dumps(["ana@example.com", "Ben"])
    queue(h.club, answer(201, {"id": "bk-p"}))
    assert h.book() == BOOKED
    assert h.sent_bodies() == [{"players": ["ana@example.com", "Ben"], "partner": "Ben"}]
    assert h.sent_keys() == [KEY]  # players change no key


def test_a_try_of_a_watch_runs_the_flows_preparation_then_its_booking_step(fh: Harness) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.clock.tick = 0.001
    fh.add()
    wishes(fh, watch=timedelta(hours=1))
    queue(fh.club, ok_login(), at("/book", 409, {"message": "taken"}))
    fh.clock.set(TRIGGER - timedelta(seconds=62))
    assert fh.book() == WATCHING
    fh.clock.set(fh.row().next_try_at)
    queue(fh.club, ok_login(), at("/book", 201, {"id": "bk-f"}))
    assert fh.book() == BOOKED
    assert paths(fh) == ["/login", "/book", "/login", "/book"]
    assert fh.calls[-1].request.headers["Authorization"] == f"Bearer {JWT}"


def test_a_try_of_a_watch_whose_login_the_club_is_too_busy_for_waits_as_it_asks(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.clock.tick = 0.001
    fh.add()
    wishes(fh, watch=timedelta(hours=1))
    queue(fh.club, ok_login(), at("/book", 409))
    fh.clock.set(TRIGGER - timedelta(seconds=62))
    assert fh.book() == WATCHING
    first = fh.row().next_try_at
    assert first is not None
    fh.clock.set(first)
    queue(fh.club, at("/login", 503, "", headers={"Retry-After": "900"}))
    assert fh.book() == WATCHING
    assert paths(fh)[-1] == "/login" and len(fh.calls) == 3
    then = fh.row().next_try_at
    assert then is not None and then >= first + timedelta(seconds=900)


# --------------------------------------------------------------------------- refusals told apart

#: The shape of CloudFront's refusal (an HTML 4 page titled "ERROR: The request could not be
#: satisfied"), written here for the test.
CLOUDFRONT_PAGE = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">\n'
    '<HTML><HEAD><META HTTP-EQUIV="Content-Type" CONTENT="text/html; charset=iso-8859-1">\n'
    "<TITLE>ERROR: The request could not be satisfied</TITLE>\n</HEAD><BODY>\n"
    "<H1>403 ERROR</H1>\n<H2>The request could not be satisfied.</H2>\n</BODY></HTML>\n"
)
CAPTCHA_PAGE = (
    "<!doctype html><html lang=en><head><title>Just a moment...</title></head>"
    "<body><div class=challenge>Verify you are human</div></body></html>"
)
WAF_PAGE = "<html><head><title>Request Rejected</title></head><body>Support ID: 77</body></html>"
LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>Sign in | Club Portal</title>"
    '</head><body><form action="/login"></form></body></html>'
)
HTML = {"Content-Type": "text/html; charset=utf-8"}
BLOCKED_FIX = bot.BLOCKED_FIX


def html_at(url: str, status: int, page: str, **headers: str) -> responses.Response:
    return responses.Response(
        responses.POST, f"{CLUB}{url}", body=page, status=status, headers={**HTML, **headers}
    )


@pytest.mark.parametrize(
    ("status", "page", "headers", "kind"),
    [
        (403, CLOUDFRONT_PAGE, {}, "blocked"),
        (403, CAPTCHA_PAGE, {}, "blocked"),
        (406, WAF_PAGE, {}, "blocked"),
        (429, WAF_PAGE, {}, "blocked"),
        (429, WAF_PAGE, {"Retry-After": "2"}, "retry"),
        (429, '{"error": "slow down"}', {"Content-Type": "application/json"}, "retry"),
        (403, '{"error": "forbidden"}', {"Content-Type": "application/json"}, "auth"),
        (401, LOGIN_PAGE, {}, "auth"),
        (406, '{"error": "no"}', {"Content-Type": "application/json"}, "rejected"),
        (503, WAF_PAGE, {}, "retry"),
    ],
)
def test_the_booking_step_tells_a_firewall_page_from_refused_credentials(
    status: int, page: str, headers: dict[str, str], kind: str
) -> None:
    step = parse_flow({}, api_url=URL, name="t.json").booking_step
    answer = club_client.Answer(status, {**HTML, **headers}, page.encode(), 1.0)
    assert bot.classify(answer, step).kind == kind


@pytest.mark.parametrize(
    ("status", "page", "kind"),
    [
        (403, CLOUDFRONT_PAGE, "blocked"),
        (403, '{"error": "too many login attempts, try again in 2 s"}', "forbidden"),
        (401, '{"error": "bad password"}', "auth"),
        (499, "{}", "auth"),
        (503, WAF_PAGE, "failed"),
    ],
)
def test_a_preparation_step_tells_blocked_forbidden_and_refused_credentials_apart(
    status: int, page: str, kind: str
) -> None:
    flow = parse_flow(
        {"steps": [login_step(rejected={"status": [499]}), book_step()]},
        api_url=None,
        name="club.json",
    )
    answer = club_client.Answer(status, HTML, page.encode(), 1.0)
    assert bot.classify(answer, flow.steps[0]).kind == kind


@pytest.mark.parametrize(
    ("status", "page", "title"),
    [
        (403, CLOUDFRONT_PAGE, "ERROR: The request could not be satisfied"),
        (403, CAPTCHA_PAGE, "Just a moment..."),
        (406, WAF_PAGE, "Request Rejected"),
        (429, WAF_PAGE, "Request Rejected"),
    ],
)
def test_a_block_page_at_a_preparation_step_fails_at_once_as_blocked_never_credentials(
    fh: Harness, status: int, page: str, title: str
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    fh.club.add(html_at("/login", status, page))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login"]
    reason = fh.row().last_error
    assert reason == (
        f"step 'login': blocked by the club's web firewall (HTTP {status}, page \"{title}\"): "
        f"not a credentials problem: {BLOCKED_FIX}, then `python main.py retry` this booking"
    )
    assert "credentials were" not in reason and "check token" not in reason
    assert fh.outcomes[0].reason == reason


def test_a_block_page_at_the_booking_step_is_blocked_not_a_rejected_token(h: Harness) -> None:
    h.add_token("club-main")
    h.add(courts=("3", "4"), token_name="club-main")
    queue(h.club, answer(403, CLOUDFRONT_PAGE, HTML), answer(201, {"id": 1}))

    assert h.book() == FAILED

    assert len(h.calls) == 1
    assert h.row().last_error == (
        "blocked by the club's web firewall (HTTP 403, page \"ERROR: The request could not be "
        f'satisfied"): not a credentials problem: {BLOCKED_FIX}, then `python main.py retry` '
        "this booking"
    )


def test_a_json_403_at_a_preparation_step_is_tried_again_until_it_passes(fh: Harness) -> None:
    """Issue 23: "too many login attempts, try again in 2 s" is not refused credentials."""
    use_flow(fh, {"steps": [login_step(), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    busy = {"error": "too many login attempts, try again in 2 s"}
    queue(fh.club, at("/login", 403, busy), at("/login", 403, busy), ok_login())
    fh.club.add(at("/book", 201, {"booking": {"id": "B-1"}}))

    assert fh.book() == BOOKED

    assert paths(fh) == ["/login", "/login", "/login", "/book"]


def test_a_json_403_at_a_preparation_step_that_never_passes_says_what_it_may_mean(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 2})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=2))
    fh.club.add(at("/login", 403, {"error": "forbidden"}))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login"] * 3
    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (3 tries): step 'login': HTTP "
        "403: forbidden (not a 2xx answer: refused, by the credentials, a login limit or a "
        "firewall's challenge)"
    )


def test_a_rejected_matcher_499_at_a_preparation_step_is_refused_credentials(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(rejected={"status": [499]}), book_step()]})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=60))
    fh.club.add(at("/login", 499, {"message": "Invalid credentials"}))

    assert fh.book() == FAILED

    assert paths(fh) == ["/login"]
    assert fh.row().last_error == (
        "the club rejected the credentials at step 'login' (HTTP 499: Invalid credentials): "
        "check token 'default' in tokens.json, reload, then `python main.py retry` this booking"
    )


def test_a_login_page_served_where_json_was_expected_names_the_page_and_the_fix(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 2})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=2))
    fh.club.add(html_at("/login", 200, LOGIN_PAGE))

    assert fh.book() == FAILED

    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (3 tries): step 'login': "
        f'HTTP 200, page "Sign in | Club Portal": {bot.HTML_FOR_JSON_FIX}'
    )


def test_an_html_error_page_at_a_preparation_step_names_its_title_and_the_club_down(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), book_step()], "prepare_seconds": 2})
    fh.add()
    fh.clock.set(TRIGGER - timedelta(seconds=2))
    page = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    fh.club.add(html_at("/login", 502, page))

    assert fh.book() == FAILED

    assert fh.row().last_error == (
        "preparation did not succeed before the window opened (3 tries): step 'login': "
        'HTTP 502, page "502 Bad Gateway" (not a 2xx answer: the club is down or failing)'
    )


def test_an_html_page_at_an_at_trigger_step_that_wanted_json_fails_naming_it(
    fh: Harness,
) -> None:
    use_flow(fh, {"steps": [login_step(), slot_step(), book_step()]})
    fh.add(courts=("3",))
    queue(
        fh.club,
        ok_login(),
        responses.Response(
            responses.GET, f"{CLUB}/plan/30-11-2026", body=LOGIN_PAGE, status=200, headers=HTML
        ),
    )

    assert fh.book() == FAILED

    assert paths(fh) == ["/login", "/plan/30-11-2026"]
    assert fh.row().last_error == (
        f"court 3: step 'slot': HTTP 200, page \"Sign in | Club Portal\": {bot.HTML_FOR_JSON_FIX}"
    )


def test_dry_run_says_blocked_with_the_fix_never_credentials(club: responses.RequestsMock) -> None:
    flow = parse_flow({"steps": [login_step(), book_step()]}, api_url=None, name="club.json")
    slot = bot.Slot(KEY, DESIRED, 60, BERLIN, ("3",))
    club.add(html_at("/login", 403, CLOUDFRONT_PAGE))
    client = ClubClient(timeout=TIMEOUT)
    try:
        reports, problem = bot.dry_run(client, flow, slot, {"token": TOKEN}, "default")
    finally:
        client.close()
    assert [(r.step, r.status, r.blocked) for r in reports] == [("login", 403, True)]
    assert problem == (
        "step 'login': blocked by the club's web firewall (HTTP 403, page \"ERROR: The request "
        f'could not be satisfied"): not a credentials problem: {BLOCKED_FIX}'
    )
