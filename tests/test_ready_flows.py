"""The ready flows of data/clubs/ run by the real flow engine against faithful mocks of their
systems (tests/clubmocks/) on 127.0.0.1: booked, taken, not open yet, a login that expired
before the booking, a refused login.

Each test parses the real flow file (its hosts pointed at the mock by ``flow_for_mock``) with
``template.parse_flow`` and books one instance with ``bot.book_slot``: a real SQLite database,
the real club client, the real clock (the window opens about a second after the test starts).
The token is an object of fields in the database, as the daemon stores what ``tokens.json``
holds; ``test_the_daemon_runs_a_ready_flow_from_tokens_json_and_its_club_file`` runs the
daemon itself: one daemon, every ready flow at one trigger, each against its own mock.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
import requests
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import bot
import club_client
import clubclock
import instances
import models
import utils
from clubmocks import (
    MOCKS,
    ClubMock,
    PlaytomicMock,
    flow_for_mock,
    load_flow,
    write_flow_for_mock,
)
from daemon_harness import DaemonProcess, by_key, cli, db_status, iso_z, wait_until
from models import (
    BOOKED,
    CANCELLED,
    FAILED,
    KIND_OBJECT,
    PENDING,
    Instance,
    Token,
    transaction,
)
from notify import Outcome
from template import Flow, parse_flow

ZONE = ZoneInfo("Europe/Paris")
#: How far ahead of the test's start the window opens (preparation runs at once: the flows'
#: prepare_seconds are longer, as for an instance loaded late).
LEAD_SECONDS = 1.0


@dataclass(frozen=True)
class Case:
    """How an entry for this system looks, and what each path ends in."""

    courts: Callable[[Any], list[Any]]
    booked_court: Callable[[Any], str]
    minutes: int
    status: str  # the booking's status at the club once booked (and finished)
    ref: Callable[[Any], str | None]
    setup: Callable[[Any, datetime], None] = lambda club, start: None
    #: The reason's start when the club is not open yet for the whole early-retry time; None:
    #: the system answers it as taken (Playtomic).
    never_open: str | None = "court "
    #: When the system's not-open answer is not told apart (never_open None): what the
    #: booking's reason says instead.
    early_answer: str = "taken (HTTP 409"
    #: When a taken court is not told apart either: what the reason says (None: "taken").
    taken_answer: str | None = None
    #: The reason when the session expired between the preparation and the booking.
    expired: str = "the club rejected the credentials at step "
    refused: str = "the club rejected the credentials at step 'login' (HTTP 401"


CASES: dict[str, Case] = {
    "playtomic": Case(
        courts=lambda c: [c.courts[0]],
        booked_court=lambda c: c.courts[0],
        minutes=90,
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id if c.bookings else None,
        never_open=None,
    ),
    "clubautomation": Case(
        courts=lambda c: [-1],
        booked_court=lambda c: "1",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        expired="the club refused the request (HTTP 200 saying \"you don't have permission to "
        'reserve")',
        refused="preparation did not succeed before the window opened",
    ),
    "doinsport": Case(
        courts=lambda c: [c.courts[1]],
        booked_court=lambda c: c.courts[1],
        minutes=60,  # the price of the entry's length: prices[duration={duration_seconds}]
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id if c.bookings else None,
    ),
    "perfectgym": Case(
        courts=lambda c: [76014],
        booked_court=lambda c: "76014",
        minutes=60,
        status="Booked",
        ref=lambda c: None,  # the class id is an extracted value: never stored
        setup=lambda club, start: club.add_class(76014, start),
        # A wrong password is a 499 (the flow's rejected matcher at its login step).
        refused="the club rejected the credentials at step 'login' (HTTP 499",
    ),
    "courtreserve": Case(
        courts=lambda c: ["40002"],
        booked_court=lambda c: "40002",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        # A 200 with IsValid false (the flow's rejected matcher at its login step).
        refused="the club rejected the credentials at step 'login' (HTTP 200",
    ),
    "skedda": Case(
        courts=lambda c: [c.spaces[0]],
        booked_court=lambda c: c.spaces[0],
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id if c.bookings else None,
        refused="the club rejected the credentials at step 'login' (HTTP 422",
    ),
    "eversports": Case(
        courts=lambda c: ["ebi-5501"],
        booked_court=lambda c: "ebi-5501",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: next(iter(c.carts), None),
        setup=lambda club, start: club.add_item("ebi-5501", start),
        never_open=None,
        early_answer="the club answered HTTP 200, which none of the step's answers",
        expired="the club refused the request (HTTP 200 saying 'UNAUTHENTICATED')",
        refused="the club rejected the credentials at step 'login' (HTTP 200",
    ),
    "nubapp": Case(
        courts=lambda c: [101],
        booked_court=lambda c: "101",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        setup=lambda club, start: club.add_activity(101, start),
        never_open=None,
        early_answer="HTTP 200: Bookings for this activity are not open yet., which none of",
        refused="the club rejected the credentials at step 'login' (HTTP 401",
    ),
    "glofox": Case(
        courts=lambda c: ["Padel Social"],
        booked_court=lambda c: "Padel Social",
        minutes=60,
        status="BOOKED",
        ref=lambda c: None,
        setup=lambda club, start: club.add_event("Padel Social", start),
        never_open=None,
        early_answer="HTTP 200: BOOKING_WINDOW_NOT_OPEN, which none of the step's answers",
        taken_answer="HTTP 200: EVENT_IS_FULL, which none of the step's answers",
        refused="the club rejected the credentials at step 'login' (HTTP 200",
    ),
    "clubspark": Case(
        courts=lambda c: [c.courts[0]],
        booked_court=lambda c: c.courts[0],
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        # OAuth2's invalid_grant (the flow's rejected matcher at its login step).
        refused="the club rejected the credentials at step 'login' (HTTP 400",
    ),
    "better": Case(
        courts=lambda c: ["tennis-court-outdoor"],
        booked_court=lambda c: "tennis-court-outdoor",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
    ),
}


def slot_start(days: int = 3) -> datetime:
    """A local start ``days`` ahead at 18:00, Paris time (every mock has such a slot)."""
    today = datetime.now(ZONE).replace(hour=18, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days)


@dataclass
class Booking:
    """One instance of a ready flow, booked by the real engine against its mock."""

    system: str
    club: ClubMock
    factory: sessionmaker[Session]
    flow: Flow
    fernet: MultiFernet
    start: datetime = field(default_factory=slot_start)
    outcomes: list[Outcome] = field(default_factory=list)
    key: str = ""
    #: How far ahead of ``add`` the window opens.
    lead: float = LEAD_SECONDS
    #: EARLY_RETRY_SECONDS: long enough for a window that opens 0.3 s after the trigger.
    early_retry_seconds: float = 1.5

    @property
    def case(self) -> Case:
        return CASES[self.system]

    def add(self, courts: list[Any] | None = None) -> None:
        courts = courts if courts is not None else self.case.courts(self.club)
        self.case.setup(self.club, self.start)
        fields = {
            name: self.fernet.encrypt(value.encode()).decode()
            for name, value in self.club.tokens_entry().items()
        }
        with transaction(self.factory) as session:
            session.add(Token(id="default", encrypted_token=json.dumps(fields), kind=KIND_OBJECT))
        text = [None if c is None else str(c) for c in courts]
        self.key = utils.instance_key(self.system, self.start)
        with transaction(self.factory) as session:
            session.add(
                Instance(
                    key=self.key,
                    schedule_id=self.system,
                    type="one-off",
                    desired_time=self.start.astimezone(UTC),
                    trigger_time=datetime.now(UTC) + timedelta(seconds=self.lead),
                    timezone="Europe/Paris",
                    rrule=None,
                    court_id=utils.courts_text(text),
                    courts=json.dumps(text),
                    token_name="default",
                    duration_minutes=self.case.minutes,
                    status=PENDING,
                    attempts=0,
                )
            )

    def context(self) -> bot.BookingContext:
        return bot.BookingContext(
            factory=self.factory,
            fernet=self.fernet,
            client=club_client.ClubClient(timeout=5),
            api_url=None,
            retry_base=0.05,
            stop=threading.Event(),
            notify=self.outcomes.append,
            template=self.flow,
            early_retry_ms=50,
            early_retry_seconds=self.early_retry_seconds,
        )

    def book(self, ctx: bot.BookingContext | None = None) -> str | None:
        ctx = ctx or self.context()
        try:
            return bot.book_slot(self.key, ctx)
        finally:
            ctx.client.close()

    def row(self) -> Instance:
        with self.factory() as session:
            row = session.scalar(select(Instance).where(Instance.key == self.key))
            assert row is not None
            return row


@pytest.fixture(params=sorted(CASES))
def booking(
    request: pytest.FixtureRequest,
    factory: sessionmaker[Session],
    fernet: MultiFernet,
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Booking]:
    system = request.param
    with MOCKS[system](zone="Europe/Paris") as club:
        flow = parse_flow(flow_for_mock(system, club.url), api_url=None, name=f"{system}.json")
        made = Booking(system, club, factory, flow, fernet)
        yield made
        # The password never leaves the booking's requests.
        for outcome in made.outcomes:
            assert club.password not in repr(outcome)
        assert club.password not in caplog.text


def test_a_ready_flow_books_at_its_mock(booking: Booking) -> None:
    booking.add()

    assert booking.book() == BOOKED, booking.row().last_error

    club, case = booking.club, booking.case
    assert [(b.court, b.start, b.minutes, b.status) for b in club.bookings] == [
        (case.booked_court(club), booking.start.astimezone(UTC), case.minutes, case.status)
    ]
    row = booking.row()
    assert (row.status, row.booked_court, row.booking_ref) == (
        BOOKED,
        str(case.courts(club)[0]),
        case.ref(club),
    )
    # The preparation left before the window opened, the booking step at it or after.
    opened = row.trigger_time.timestamp()
    booking_step = booking.flow.booking_step
    keyed = [r for r in club.requests if r.header("Idempotency-Key")]
    assert len(keyed) == 1 and keyed[0].method == booking_step.method
    assert keyed[0].arrived >= opened
    # (a redirect a step follows is part of that step)
    before = [r for r in club.requests if r.arrived < opened and not 300 <= (r.status or 0) < 400]
    assert len(before) == sum(
        1 if not s.per_court else len(case.courts(club)) for s in booking.flow.phase("prepare")
    )


def test_a_ready_flow_meets_a_taken_court(booking: Booking) -> None:
    club, case = booking.club, booking.case
    booking.add()
    courts = club.courts if booking.system == "clubautomation" else [case.booked_court(club)]
    for court in courts:
        club.take(court, booking.start, case.minutes)

    assert booking.book() == FAILED

    assert club.bookings == []
    reason = booking.row().last_error or ""
    if case.taken_answer is not None:
        assert case.taken_answer in reason, reason
        return
    assert "taken" in reason or "never showed up" in reason, reason


def test_a_ready_flow_retries_a_window_not_open_yet_and_books_when_it_opens(
    booking: Booking,
) -> None:
    booking.add()
    # The club's clock runs 300 ms behind ours.
    booking.club.opens_at = booking.row().trigger_time.timestamp() + 0.3

    status = booking.book()

    if booking.case.never_open is None:
        # Playtomic says 409 for a court not on sale yet, as for a taken one; others answer in
        # words their public clients do not show.
        assert status == FAILED
        assert booking.case.early_answer in (booking.row().last_error or "")
        return
    assert status == BOOKED, booking.row().last_error
    assert len(booking.club.bookings) == 1


def test_a_ready_flow_fails_when_the_club_never_opens(booking: Booking) -> None:
    booking.add()
    booking.club.opens_at = time.time() + 3600
    booking.early_retry_seconds = 0.5  # ten early answers or so: the club still never opens

    assert booking.book() == FAILED

    assert booking.club.bookings == []
    reason = booking.row().last_error or ""
    if booking.case.never_open is None:
        assert booking.case.early_answer in reason, reason
    else:
        assert "the club never opened" in reason or "never showed up" in reason, reason


def test_a_ready_flow_meets_a_login_that_expired_before_the_booking(booking: Booking) -> None:
    booking.add()
    prepared = len(booking.flow.phase("prepare"))
    ctx = booking.context()
    thread = threading.Thread(target=booking.book, args=(ctx,))
    thread.start()
    # Once the preparation is done, before the window opens, the club forgets every session.
    # (a redirect a step follows is part of that step: count the answers that end a step)
    assert booking.club.wait_for(
        lambda: (
            sum(1 for r in booking.club.requests if r.status and not 300 <= r.status < 400)
            >= prepared
        ),
        5,
    )
    assert time.time() < booking.row().trigger_time.timestamp()
    booking.club.expire_sessions()
    thread.join(15)

    row = booking.row()
    assert row.status == FAILED
    assert booking.club.bookings == []
    assert (row.last_error or "").startswith(booking.case.expired), row.last_error


def test_a_ready_flow_meets_a_refused_login(booking: Booking) -> None:
    booking.add()
    booking.club.password = "changed-by-the-user"

    assert booking.book() == FAILED

    assert booking.club.bookings == []
    assert (booking.row().last_error or "").startswith(booking.case.refused), booking.row()
    # Nothing but the preparation went to the club (only the booking step carries the key; some
    # systems book at the same URL as they log in).
    assert [r for r in booking.club.requests if r.header("Idempotency-Key")] == []


#: The ready flows whose public sources show a cancel call: their files have "cancel" steps.
CANCELS = sorted(system for system in CASES if "cancel" in load_flow(system))


def test_some_ready_flows_cancel() -> None:
    assert {"skedda", "doinsport"} <= set(CANCELS)


@pytest.mark.slow
@pytest.mark.parametrize("booking", CANCELS, indirect=True)
def test_cancel_runs_a_ready_flows_cancel_steps_at_its_mock(
    booking: Booking, env: dict[str, str], data_dir: Path
) -> None:
    """Booked by the real engine, then ``python main.py cancel KEY`` (the real command, the flow
    file in DATA_DIR/clubs/): a reference the club does not hold is refused (exit 1, one line,
    it stays booked and the club keeps the booking); the right one cancels: the club no longer
    holds the booking, the instance is cancelled."""
    club = booking.club
    write_flow_for_mock(booking.system, club.url, data_dir / "clubs")
    env = env | {"PATH": "/usr/bin:/bin"}
    booking.add()
    assert booking.book() == BOOKED, booking.row().last_error
    (made,) = club.bookings
    held = made.status
    ref = booking.row().booking_ref
    assert ref is not None

    def set_row(**values: Any) -> None:
        with transaction(booking.factory) as session:
            row = session.get(Instance, booking.row().id)
            assert row is not None
            for name, value in values.items():
                setattr(row, name, value)

    set_row(club=booking.system, booking_ref="404404")
    refused = cli(env, "cancel", booking.key)

    assert refused.returncode == 1, refused.stdout + refused.stderr
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"courtbot cancel: {booking.key}: step "), line
    assert line.endswith("; it stays booked"), line
    assert booking.row().status == BOOKED
    assert made.status == held != "CANCELED"
    assert not club.is_free(made.court, booking.start, booking.case.minutes)

    set_row(booking_ref=ref)
    done = cli(env, "cancel", booking.key)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == f"cancelled at the club: {booking.key} (ref {ref})\n"
    assert made.status == "CANCELED"
    assert club.is_free(made.court, booking.start, booking.case.minutes)
    assert booking.row().status == CANCELLED
    for text in (refused.stdout, refused.stderr, done.stdout, done.stderr):
        assert club.password not in text


def _playtomic_as_it_was() -> dict[str, Any]:
    """The Playtomic flow as it stood before July 2026: the old host, no requested roles."""
    flow = load_flow("playtomic")
    flow["hosts"] = ["api.playtomic.io"]
    for step in flow["steps"]:
        step["url"] = step["url"].replace("api.app.playtomic.io", "api.playtomic.io")
    del flow["steps"][0]["json"]["requested_user_roles"]
    return flow


@pytest.mark.parametrize("where", ["old host", "data centre"])
def test_playtomics_cloudfront_block_page_fails_the_login_before_the_window(
    where: str, factory: sessionmaker[Session], fernet: MultiFernet
) -> None:
    """The old host answers CloudFront's 403 page to everything (what the flow of before July
    2026 met), and the new host answers it to data-centre addresses: the login fails, before the
    window, with the club's status; nothing is booked."""
    with MOCKS["playtomic"](zone="Europe/Paris") as club:
        assert isinstance(club, PlaytomicMock)
        if where == "old host":
            flow = flow_for_mock(_playtomic_as_it_was(), club.old_url)
        else:
            club.data_centre = True
            flow = flow_for_mock("playtomic", club.url)
        made = Booking("playtomic", club, factory, parse_flow(flow, api_url=None, name="p"), fernet)
        made.add()

        assert made.book() == FAILED

        reason = made.row().last_error or ""
        assert "step 'login'" in reason and "HTTP 403" in reason, reason
        blocked = club.old_host.requests if where == "old host" else club.requests
        assert blocked and {(r.path, r.status) for r in blocked} == {("/v3/auth/login", 403)}
        assert all(r.arrived < made.row().trigger_time.timestamp() for r in blocked)
        if where == "old host":
            assert club.requests == []
        assert club.bookings == []


@pytest.mark.parametrize("system", ["clubspark", "better"])
def test_a_paid_court_is_not_booked_and_the_reason_says_what_the_club_answered(
    system: str, factory: sessionmaker[Session], fernet: MultiFernet
) -> None:
    """ClubSpark and Better book free and members' courts only: a paid court needs a card
    payment (Stripe, Opayo 3-D Secure) that the flows do not make. ClubSpark refuses the request
    (a negative Result); Better holds the session in the basket and its checkout fails."""
    with MOCKS[system](zone="Europe/Paris") as club:
        flow = parse_flow(flow_for_mock(system, club.url), api_url=None, name=f"{system}.json")
        made = Booking(system, club, factory, flow, fernet)
        made.add()
        club.paid.add(str(made.case.courts(club)[0]))  # type: ignore[attr-defined]

        assert made.book() == FAILED

        reason = made.row().last_error or ""
        if system == "clubspark":
            assert club.bookings == []
            assert "HTTP 200" in reason and "none of the step's answers" in reason, reason
        else:
            assert [b.status for b in club.bookings] == ["PENDING"]
            assert reason.startswith("the club took the booking (court tennis-court-outdoor)")
            assert "step 'checkout' did not complete" in reason and "HTTP 422" in reason, reason


# -- the club's clock (CONTRACT section 6) ------------------------------------------------------

#: The ready flows whose systems have a harmless GET (a public page or list that the flow or
#: the system's public clients already fetch, needing no secret): their files have ``clock``.
#: The others' pages say why not.
CLOCKS = sorted(system for system in CASES if "clock" in load_flow(system))
#: How far each club's clock runs from ours (ahead, behind: every other flow).
CLOCK_OFFSETS = {system: (0.7, -0.45)[index % 2] for index, system in enumerate(CLOCKS)}
#: The measurement sends up to five requests a second (each timed to the club's second turning
#: at one guess of its offset) for about five seconds, within the 30 s before the trigger and
#: done 1 s before it.
CLOCK_LEAD_SECONDS = 13.0


def test_the_ready_flows_with_a_harmless_endpoint_measure_the_clubs_clock() -> None:
    assert CLOCKS == ["better", "clubautomation", "eversports", "perfectgym", "skedda"]
    for system in CLOCKS:
        flow = load_flow(system)
        clock = parse_flow(flow, api_url=None, name=system).clock_url
        assert clock == flow["clock"]["url"] and urlsplit(clock).hostname in flow["hosts"]
        # The same GET that the mock answers with its Date, at the same path as the real host.
        with MOCKS[system](zone="Europe/Paris", clock=lambda: time.time() + 3600) as club:
            mocked = parse_flow(flow_for_mock(system, club.url), api_url=None, name=system)
            assert mocked.clock_url is not None
            answer = requests.get(mocked.clock_url, timeout=5, allow_redirects=False)
            assert answer.status_code == 200, (system, answer.status_code)
            # by the club's clock (an hour ahead of ours here)
            moment = clubclock.parse_date(answer.headers.get("Date"))
            assert abs(moment - (time.time() + 3600)) < 2
            assert [(r.method, r.path) for r in club.requests] == [("GET", urlsplit(clock).path)]


@dataclass
class ClockRun:
    """A ready flow booked by the real engine at its mock, whose clock runs ``offset`` s from
    ours: the club opens its window at the trigger by its own clock."""

    booking: Booking
    offset: float
    status: str | None


@pytest.fixture(scope="module")
def clock_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ClockRun]]:
    """Every ready flow with ``clock``, booked at once (one thread each, its own database),
    each at a mock whose clock runs ahead of ours or behind it."""
    root = tmp_path_factory.mktemp("ready-clock")
    fernet = MultiFernet([Fernet(Fernet.generate_key())])
    statuses: dict[str, str | None] = {}
    with contextlib.ExitStack() as stack:
        bookings: dict[str, Booking] = {}
        for system in CLOCKS:
            offset = CLOCK_OFFSETS[system]
            club = stack.enter_context(
                MOCKS[system](zone="Europe/Paris", clock=lambda o=offset: time.time() + o)
            )
            engine = models.make_engine(f"sqlite:///{root / system}.sqlite")
            stack.callback(engine.dispose)
            flow = parse_flow(flow_for_mock(system, club.url), api_url=None, name=system)
            made = Booking(system, club, models.session_factory(engine), flow, fernet)
            made.lead = CLOCK_LEAD_SECONDS
            made.add()
            club.opens_at = made.row().trigger_time.timestamp()  # by the club's own clock
            bookings[system] = made

        def book(system: str) -> None:
            statuses[system] = bookings[system].book()

        threads = [threading.Thread(target=book, args=(system,)) for system in CLOCKS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLOCK_LEAD_SECONDS + 30)
        yield {
            system: ClockRun(made, CLOCK_OFFSETS[system], statuses.get(system))
            for system, made in bookings.items()
        }


@pytest.mark.slow
@pytest.mark.parametrize("system", CLOCKS)
def test_a_ready_flow_books_by_the_clubs_clock(
    system: str, clock_runs: dict[str, ClockRun]
) -> None:
    """The flow's ``clock`` is measured at its mock before the trigger (at most 20 plain GETs,
    no cookie, no token), the offset is noted on the instance and said in the outcome, and the
    booking step reaches the club once it has opened by its own clock: ahead of our trigger
    when the club's clock is ahead, after it when behind, never early."""
    run = clock_runs[system]
    club, row = run.booking.club, run.booking.row()
    assert run.status == BOOKED, row.last_error
    assert len(club.bookings) == 1
    assert row.clock_error is None
    assert row.clock_offset_ms is not None
    assert abs(row.clock_offset_ms - run.offset * 1000) <= 50, row.clock_offset_ms
    assert (row.clock_uncertainty_ms or 0) <= 100
    timing = instances.timing_of(row) or ""
    assert " by the club's clock (" in timing, timing

    keyed = [r for r in club.requests if r.header("Idempotency-Key")]
    assert len(keyed) == 1  # no early answer: the club had opened by its own clock
    trigger = row.trigger_time.timestamp()
    assert keyed[0].arrived + run.offset >= trigger  # the club's opening instant, or after
    if run.offset > 0:
        assert keyed[0].arrived < trigger - run.offset / 2  # ahead of our own trigger
    else:
        assert keyed[0].arrived > trigger - run.offset / 2  # held back for the club's clock

    path = urlsplit(load_flow(system)["clock"]["url"]).path
    probes = [r for r in club.requests if r.header("Cache-Control") == "no-cache"]
    assert 3 <= len(probes) <= 20
    assert {(r.method, r.path) for r in probes} == {("GET", path)}
    assert all(r.arrived < keyed[0].arrived for r in probes)
    assert all(not r.cookies and r.header("Authorization") is None for r in probes)
    assert all(r.status == 200 for r in probes)


@dataclass
class DaemonRun:
    """What one daemon did with every ready flow at once: per system, its mock (stopped, its
    records kept) and the two rows; for all, the shared trigger, output and database."""

    trigger: datetime
    clubs: dict[str, ClubMock]
    stale: dict[str, dict[str, str]]
    rows: dict[str, tuple[dict[str, Any], dict[str, Any]]]
    exit_code: int
    output: str
    database: bytes


#: How far ahead the shared trigger is: the daemon is ready in about half a second, a loaded
#: machine several times that, and the logins (DAEMON_PREPARE_SECONDS) leave 3 s before it:
#: eleven systems, two entries each, log in on a loaded machine within them.
DAEMON_LEAD_SECONDS = 5.0
DAEMON_PREPARE_SECONDS = 3


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonRun]:
    """One real daemon runs every ready flow: for each system, its real flow file in
    DATA_DIR/clubs/ (pointed at its own mock on 127.0.0.1), tokens.json objects, and two
    entries at one shared trigger: one that books (through early answers where the system has
    them: each club opens 300 ms late) and one whose password the club refuses."""
    root = tmp_path_factory.mktemp("ready-daemon")
    data = root / "data"
    start = slot_start()
    with contextlib.ExitStack() as stack:
        clubs = {
            system: stack.enter_context(MOCKS[system](zone="Europe/Paris")) for system in CASES
        }
        trigger = datetime.now(UTC) + timedelta(seconds=DAEMON_LEAD_SECONDS)
        window_hours = (start.astimezone(UTC) - trigger).total_seconds() / 3600
        tokens: dict[str, dict[str, str]] = {}
        stale: dict[str, dict[str, str]] = {}
        entries: list[dict[str, Any]] = []
        for system, club in clubs.items():
            case = CASES[system]
            case.setup(club, start)
            write_flow_for_mock(
                system, club.url, data / "clubs", prepare_seconds=DAEMON_PREPARE_SECONDS
            )
            stale[system] = club.tokens_entry() | {"password": f"an-old-password-{system}"}
            tokens |= {system: club.tokens_entry(), f"{system}-stale": stale[system]}
            if case.never_open is not None:
                club.opens_at = trigger.timestamp() + 0.3
            entry = {
                "type": "one-off",
                "desired_time": iso_z(start),
                "timezone": "Europe/Paris",
                "court_id": case.courts(club)[0],
                "duration_minutes": case.minutes,
                "club": system,
                "window": f"{window_hours:.9f}h",
            }
            entries += [
                entry | {"id": f"mine-{system}", "token": system},
                entry | {"id": f"stale-{system}", "token": f"{system}-stale"},
            ]
        (data / "tokens.json").write_text(json.dumps(tokens))
        (data / "schedules.json").write_text(json.dumps(entries))
        env = {
            "PATH": "/usr/bin:/bin",
            "FERNET_KEY": Fernet.generate_key().decode(),
            "DATA_DIR": str(data),
            "LOG_FILE": "-",
            "RETRY_BASE_SECONDS": "0.05",
        }
        process = DaemonProcess(env, data, root / "out.txt").start()
        try:
            process.wait_ready()
            keys = {
                system: tuple(f"{name}-{system}@{iso_z(start)}" for name in ("mine", "stale"))
                for system in CASES
            }

            def settled() -> bool:
                return all(
                    db_status(env, key) in ("booked", "failed")
                    for pair in keys.values()
                    for key in pair
                )

            assert wait_until(settled, 25), process.output()
            rows = by_key(env)
            exit_code = process.stop()
        finally:
            process.cleanup()
    yield DaemonRun(
        trigger=trigger,
        clubs=clubs,
        stale=stale,
        rows={system: (rows[mine], rows[refused]) for system, (mine, refused) in keys.items()},
        exit_code=exit_code,
        output=process.output(),
        database=(data / "db.sqlite").read_bytes(),
    )


@pytest.mark.slow
@pytest.mark.parametrize("system", sorted(CASES))
def test_the_daemon_runs_a_ready_flow_from_tokens_json_and_its_club_file(
    system: str, daemon_run: DaemonRun
) -> None:
    """The real daemon, the real flow file in DATA_DIR/clubs/, tokens.json objects (one daemon
    for every system, see ``daemon_run``): one entry books (through early answers where the
    system has them: the club opens 300 ms late), one whose password the club refuses fails at
    its login, before the window opens."""
    club, case = daemon_run.clubs[system], CASES[system]
    mine, refused = daemon_run.rows[system]
    trigger = daemon_run.trigger
    assert mine["status"] == "booked", mine["last_error"]
    assert mine["booking_ref"] == case.ref(club)
    assert len(club.bookings) == 1
    assert refused["status"] == "failed"
    assert refused["last_error"].startswith(case.refused)
    # The logins went ahead of the window; the booking step at it or after.
    assert min(r.arrived for r in club.requests) < trigger.timestamp()
    keyed = [r for r in club.requests if r.header("Idempotency-Key")]
    # (1 ms: the window is written in hours, to 9 decimals)
    assert keyed and min(r.arrived for r in keyed) >= trigger.timestamp() - 0.001
    assert daemon_run.exit_code == 0
    for secret in (club.password, daemon_run.stale[system]["password"]):
        assert secret not in daemon_run.output
        assert secret.encode() not in daemon_run.database


@pytest.mark.slow
@pytest.mark.parametrize("system", sorted(CASES))
def test_dry_run_logs_in_to_a_ready_flow_now_and_books_nothing(system: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    with MOCKS[system](zone="Europe/Paris") as club:
        case = CASES[system]
        start = slot_start()
        case.setup(club, start)
        write_flow_for_mock(system, club.url, data / "clubs")
        (data / "tokens.json").write_text(json.dumps({"default": club.tokens_entry()}))
        entry = {
            "id": "mine",
            "type": "one-off",
            "desired_time": iso_z(start),
            "timezone": "Europe/Paris",
            "court_id": case.courts(club)[0],
            "duration_minutes": case.minutes,
            "club": system,
        }
        (data / "schedules.json").write_text(json.dumps([entry]))
        env = {"PATH": "/usr/bin:/bin", "FERNET_KEY": Fernet.generate_key().decode()}
        env |= {"DATA_DIR": str(data), "LOG_FILE": "-"}

        done = cli(env, "dry-run", "mine")

        assert done.returncode == 0, done.stdout + done.stderr
        flow = parse_flow(flow_for_mock(system, club.url), api_url=None, name="x")
        for step in flow.phase("prepare"):
            assert f"  step {step.name}" in done.stdout
        assert done.stdout.splitlines()[-1] == "OK: every preparation step succeeded"
        assert [r for r in club.requests if r.header("Idempotency-Key")] == []
        assert club.bookings == []
        assert club.password not in done.stdout + done.stderr
        assert not (data / "db.sqlite").exists()
