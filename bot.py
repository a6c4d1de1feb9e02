"""Booking one instance: running its club's flow against the club (CONTRACT sections 6, 7, 12).

``book_slot(key, ctx)`` claims the instance (``pending`` -> ``booking``, committed before any
request leaves) and runs its flow, the one engine for every club: section 6's request and a
section-11 template are flows of their one booking step. Preparation steps run
``prepare_seconds`` before the trigger, retried with backoff while the trigger is ahead; then the
first request of the trigger is built (to its bytes) and its connection opened ahead, the last
moment waited out precisely (one thread writes every first request of an instant, ``wire``), and
the ``at_trigger`` steps and the booking step are sent and read with the
answer table (next court when taken, early answers every ``EARLY_RETRY_MS``, retries with
backoff); finishing steps run after the booking. Each booking has its own cookie jar, sent only
to the flow's hosts, and its own secrets, scrubbed from every reason and log line. HTTP itself
(timeouts, cookies, redirects, scrubbing) is ``club_client``'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography.fernet import MultiFernet
from requests.cookies import RequestsCookieJar

import instances
import utils
import wire
from club_client import (
    MAX_BODY_BYTES,
    USER_AGENT,
    Answer,
    BookingError,
    ClubClient,
    RequestSpec,
    Scrubber,
    StepFailure,
    add_cookies,
    end_secrets,
    exchange,
    measure_club_clock,
    remember_secret,
    safe_ref,
    scrubbed_traceback,
    start_secrets,
)
from clubclock import ClockError, Measurement
from models import (
    BOOKED,
    BOOKING,
    EXPIRED,
    FAILED,
    PENDING,
    WATCHING,
    DatabaseError,
    Instance,
    SessionFactory,
    Token,
    error_text,
    mask_url,
)
from notify import Notifier, NotifyConfigError, NotifySettings, Outcome
from template import (
    Flow,
    MissingValue,
    Reply,
    Slot,
    Step,
    UnsendableHeader,
    as_text,
    default_flow,
    extract_values,
)

logger = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_COURT = 3
#: Wake this long before the trigger and spin for the rest (sleep granularity is ~1 ms).
SPIN_SECONDS = 0.003
#: A wait for the trigger looks at the wall clock at least this often: a clock that jumps
#: forward during the wait is noticed within this time, not at the end of the old wait.
MAX_NAP_SECONDS = 0.5
#: Preparation retries wait base, 2 x base, 4 x base, ... but never longer than this.
MAX_PREPARE_WAIT_SECONDS = 30.0
#: The club's clock (CONTRACT section 6) is measured from at most this long before the trigger
#: (within the flow's preparation time), done this long before it (the first request is built
#: and its connection opened meanwhile), and not at all with less than the last figure left.
CLOCK_START_SECONDS = 30.0
CLOCK_DONE_BEFORE_SECONDS = 1.0
CLOCK_MIN_SECONDS = 2.0
#: A booking whose first request left this long after its trigger began late (loaded with its
#: window open, back after downtime): its early answers are counted from that request.
LATE_START_SECONDS = 1.0
#: A trigger instant's burst leaves only while the lease is proven for this long after the
#: check (leader.BURST_PROOF_SECONDS): one check covers every request of the burst.
BURST_PROOF_SECONDS = 0.2
#: Ends the reason of a booking that failed because every court tried was taken.
TAKEN_ADVICE = (
    "every court tried was taken, so a retry would be too: book another court with the club, "
    'and give the entry a list of courts to try in order (e.g. "court_id": ["3", "4"])'
)
#: What to do when a club's web firewall or CDN answered with its block page: no token helps.
BLOCKED_FIX = (
    "the club's CDN or web firewall refuses this request (many refuse data-centre addresses, "
    "some ask for a captcha): run courtbot from another network (e.g. a home connection) or "
    "ask the club to let it through"
)
#: What to do when a club served an HTML page where a step expected JSON.
HTML_FOR_JSON_FIX = (
    "the club served a web page where the step expected JSON (often its login page: the "
    "session or the credentials were not accepted, or the URL is not the API's): check the "
    "step's URL and the token's fields, then run `python main.py dry-run`"
)


@dataclass(frozen=True)
class Verdict:
    """How an answer reads: ``booked``, ``ok`` (a step other than the booking step succeeded),
    ``taken``, ``early``, ``retry``, ``auth`` (credentials rejected), ``blocked`` (a web
    firewall's page, never credentials), ``forbidden`` (a 403 to a preparation or finishing
    step: refused credentials, or a login limit's or firewall's passing refusal),
    ``rejected``, ``unmatched`` (a 2xx that none of the booking step's matchers knows), or
    ``failed`` (a preparation or finishing step's answer that is not ``ok``)."""

    kind: str


class TriggerGate:
    """Bookings that share a trigger instant wait behind one gate: a single thread waits out
    the last moment precisely and opens it for all, instead of each spinning for the GIL."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[float, threading.Event] = {}

    def wait(self, ctx: BookingContext, target: float) -> bool:
        """Return at ``target`` (epoch seconds) or later, never earlier; False on a stop."""
        with self._lock:
            event = self._events.get(target)
            leader = event is None
            if leader:
                event = self._events[target] = threading.Event()
        assert event is not None
        if leader:
            try:
                return _wait_until(ctx, target)
            finally:
                event.set()
                with self._lock:
                    self._events.pop(target, None)
        while not event.wait(0.5):
            if ctx.stop.is_set():
                return False
        # Opened by the leader: at the target, unless it stopped, or the clock disagrees.
        return _wait_until(ctx, target)


# --------------------------------------------------------------------------- answers


def classify(answer: Answer, step: Step) -> Verdict:
    """How an answer to ``step`` reads.

    The booking step: its matchers (taken, rejected, booked, early), then CONTRACT section 6's
    table; with ``booked`` given, a 2xx that none of them matches is ``unmatched``. An
    ``at_trigger`` step: its matchers, then ``ok`` (default any 2xx), then the table. Any other
    step: its ``rejected`` (refused credentials: ``auth``), ``ok``, else ``auth`` for a 401 and
    ``forbidden`` for a 403, else ``failed``. On every step, a 403, 406 or 429 without
    ``Retry-After`` whose body is an HTML page that no matcher knows is ``blocked``.
    """
    status = answer.status
    matched = step.match(status, answer.body)
    if matched is not None:
        plain = not step.booking and not step.at_trigger
        return Verdict("auth" if plain and matched == "rejected" else matched)
    if step.booking:
        if 200 <= status < 300:
            return Verdict("unmatched" if step.has_matcher("booked") else "booked")
    elif step.is_ok(status, answer.body):
        return Verdict("ok")
    if blocked_page(answer) is not None:
        return Verdict("blocked")
    if not step.booking and not step.at_trigger:
        return Verdict({401: "auth", 403: "forbidden"}.get(status, "failed"))
    if not step.booking and 200 <= status < 300:
        return Verdict("unmatched")
    if status == 409:
        return Verdict("taken")
    if status in (401, 403):
        return Verdict("auth")
    if status == 425:
        return Verdict("early")
    if status == 429 or 500 <= status < 600:
        return Verdict("retry")
    return Verdict("rejected")


def blocked_page(answer: Answer) -> str | None:
    """The page's title (``""`` without one) when ``answer`` is a web firewall's or CDN's
    refusal: a 403, 406, or 429 without ``Retry-After``, whose body is an HTML page (a block
    page, a captcha, CloudFront's "The request could not be satisfied"); else None."""
    status = answer.status
    if status in (403, 406) or (status == 429 and answer.header("Retry-After") is None):
        return utils.html_page(answer.body, answer.header("Content-Type"))
    return None


def _page(answer: Answer, scrubber: Scrubber) -> str | None:
    """How an HTML answer is named in a reason (``page "<title>"``), None for any other body."""
    title = utils.html_page(answer.body, answer.header("Content-Type"))
    if title is None:
        return None
    return f'page "{scrubber(title)}"' if title else "an HTML page without a title"


def _blocked(answer: Answer, scrubber: Scrubber) -> str:
    return (
        f"blocked by the club's web firewall (HTTP {answer.status}, "
        f"{_page(answer, scrubber)}): not a credentials problem"
    )


def _status_meaning(status: int) -> str | None:
    """What a status tells a person beyond its number (CONTRACT section 12: refusals told
    apart), for the answers that are neither a success nor refused credentials."""
    if status == 429:
        return "rate limited by the club"
    if 500 <= status < 600:
        return "the club is down or failing"
    return None


def _club_says(answer: Answer, scrubber: Scrubber, words: str | None = None) -> str:
    """A short, secret-free reading of an answer for a person: its status, and the club's own
    message when a JSON body has one (scrubbed before it is cut: a cut through a secret would let
    its start through), else the flow's words that the body matched, else an HTML page's title."""
    text = f"HTTP {answer.status}"
    if words is not None:
        text += f" saying {words!r}"
    body = answer.json()
    if isinstance(body, dict):
        for name in ("error", "message", "detail", "reason"):
            value = body.get(name)
            if isinstance(value, str) and value.strip():
                text = f"HTTP {answer.status}: {scrubber.cut(value.strip(), 200)}"
                break
    else:
        page = _page(answer, scrubber) if words is None else None
        text = text if page is None else f"{text}, {page}"
    if answer.cut:
        text += f" (its body was cut at {MAX_BODY_BYTES // 2**20} MiB, the most courtbot reads)"
    return text


# --------------------------------------------------------------------------- one booking's run


@dataclass
class FlowRun:
    """One booking's run of its flow: its secrets, cookie jar and the values extracted so far
    (by the steps that run once, and per court by those that run once per court)."""

    flow: Flow
    slot: Slot
    secrets: Mapping[str, str]
    token_name: str
    label: str
    scrub: Scrubber = field(default_factory=Scrubber)
    jar: RequestsCookieJar = field(default_factory=RequestsCookieJar)
    shared: dict[str, Any] = field(default_factory=dict)
    by_court: dict[str | None, dict[str, Any]] = field(default_factory=dict)
    done: set[tuple[str, str | None]] = field(default_factory=set)
    #: Courts left out because their preparation failed, with why.
    dropped: dict[str | None, str] = field(default_factory=dict)
    #: Why a value is missing (a booking step's value it could not extract), by ``step.value``.
    missing: dict[str, str] = field(default_factory=dict)
    #: Requests of the booking step sent so far (the instance's ``attempts``).
    total: int = 0
    #: When the trigger phase began (the trigger, or later for a late booking): early answers
    #: are retried until EARLY_RETRY_SECONDS after it.
    opened: float = 0.0
    reports: list[StepReport] | None = None
    #: A try of a watch (CONTRACT 13): one request per try, never a burst; an answer to wait
    #: on (429, 5xx, early, no answer) ends the try instead of being sent again.
    watching: bool = False
    #: Values of this run beyond the slot's (``booking_ref`` for the cancel steps).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for value in self.secrets.values():
            self.scrub.add(value)

    @property
    def courts(self) -> list[str | None]:
        """The entry's courts in order, without those whose preparation failed."""
        return [court for court in self.slot.courts if court not in self.dropped]

    def values(self, court: str | None) -> dict[str, Any]:
        """Every placeholder's value for a step sent for ``court``."""
        values = self.slot.values(self.secrets, court)
        values.update(self.extra)
        values.update(self.shared)
        values.update(self.by_court.get(court, {}))
        return values

    def is_done(self, step: Step, court: str | None) -> bool:
        return (step.name, court if step.per_court else None) in self.done

    def keep(
        self, step: Step, court: str | None, found: Mapping[str, Any], *, ref: str | None = None
    ) -> None:
        """Values ``step`` extracted (secrets from now on, but the booking reference ``ref``,
        which the booking step may extract too: it is stored) and that it is done for
        ``court``."""
        target = self.by_court.setdefault(court, {}) if step.per_court else self.shared
        target.update(found)
        for value in found.values():
            if ref is None or as_text(value) != ref:
                self.scrub.add(value)
        self.done.add((step.name, court if step.per_court else None))


def _court_name(court: str | None) -> str:
    return court if court is not None else "any"


def _where(step: Step, court: str | None) -> str:
    """How a step (and its court, when it runs per court) is named in a reason."""
    return f"step {step.name!r}" + (f" (court {_court_name(court)})" if step.per_court else "")


def _prepared(
    client: ClubClient, run: FlowRun, step: Step, court: str | None
) -> requests.PreparedRequest:
    """``step``'s request for ``court``, built to the last byte, with the booking's cookies for
    its host. Raises ``MissingValue`` for a placeholder with no value."""
    rendered = step.render(run.values(court), run.slot.idempotency(court))
    headers = {"User-Agent": USER_AGENT, **rendered.headers}
    prepared = client.prepare(RequestSpec(rendered.method, rendered.url, headers, rendered.body))
    add_cookies(run.jar, prepared)
    return prepared


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class StepReport:
    """One send of a preparation step, as ``dry-run`` prints it: the HTTP status (None when no
    answer came), the names of the values it extracted, or the problem (secret-free)."""

    step: str
    court: str | None
    per_court: bool
    status: int | None
    values: tuple[str, ...]
    problem: str | None = None
    auth: bool = False
    wait: float | None = None
    #: Sending it again cannot help (a value it needs is missing, an untrusted certificate).
    final: bool = False
    #: The club's web firewall answered (its block page): ``problem`` says so; never credentials.
    blocked: bool = False
    #: A 403 that is not a block page: refused credentials, or a login limit's or a firewall's
    #: passing refusal. A preparation step is tried again; a finishing step is not.
    forbidden: bool = False


def _plain_try(client: ClubClient, run: FlowRun, step: Step, court: str | None) -> StepReport:
    """Send a preparation or finishing step once and read it: ``ok`` and every value taken, or
    a problem naming what the club said and what was missing."""

    def report(status: int | None, problem: str | None = None, **extra: Any) -> StepReport:
        found = tuple(sorted(run.by_court.get(court, {}) if step.per_court else run.shared))
        names = tuple(n.split(".", 1)[1] for n in found if n.startswith(f"{step.name}."))
        result = StepReport(step.name, court, step.per_court, status, names, problem, **extra)
        if run.reports is not None:
            run.reports.append(result)
        return result

    try:
        prepared = _prepared(client, run, step, court)
    except MissingValue as exc:
        why = run.missing.get(exc.ref, "no step gave it a value")
        return report(None, f"{{{exc.ref}}} has no value ({why})", final=True)
    except UnsendableHeader as exc:
        return report(None, str(exc), final=True)
    try:
        answer, reply = exchange(client, run, step, prepared)
    except (BookingError, StepFailure) as exc:
        text = run.scrub(str(exc))
        logger.info("step %s %s court=%s: %s", run.label, step.name, _court_name(court), text)
        return report(None, text, final=isinstance(exc, BookingError) and exc.permanent)
    verdict = classify(answer, step).kind
    logger.info(
        "step %s %s court=%s: HTTP %d in %.0f ms -> %s",
        run.label,
        step.name,
        _court_name(court),
        answer.status,
        answer.latency_ms,
        verdict,
    )
    says = _club_says(answer, run.scrub)
    if verdict == "auth":
        return report(answer.status, says, auth=True)
    if verdict == "blocked":
        return report(answer.status, _blocked(answer, run.scrub), final=True, blocked=True)
    if verdict != "ok":
        cap = WATCH_RETRY_AFTER_CAP if run.watching else utils.RETRY_AFTER_CAP_SECONDS
        wait = utils.parse_retry_after(answer.header("Retry-After"), datetime.now(UTC), cap)
        expected = "its ok answer" if step.ok is not None else "a 2xx answer"
        if verdict == "forbidden":
            expected += ": refused, by the credentials, a login limit or a firewall's challenge"
        elif (meaning := _status_meaning(answer.status)) is not None:
            expected += f": {meaning}"
        forbidden = verdict == "forbidden"
        return report(answer.status, f"{says} (not {expected})", wait=wait, forbidden=forbidden)
    found, problems = extract_values(step, reply, run.values(court))
    if problems:
        if _page(answer, run.scrub) is not None and step.wants_json:
            return report(answer.status, f"{says}: {HTML_FOR_JSON_FIX}")
        return report(answer.status, f"{says}, but " + "; ".join(problems))
    run.keep(step, court, found)
    return report(answer.status)


def prepare_round(client: ClubClient, run: FlowRun) -> dict[tuple[str, str | None], StepReport]:
    """Send, once each, the preparation steps not yet done (per court for those that run once
    per court), in order. Returns the problems by (step, court); a step that runs once and
    fails stops the round (the steps after it need it), and so does rejected credentials; a
    court whose step failed skips that court's later steps."""
    problems: dict[tuple[str, str | None], StepReport] = {}
    failed_courts: set[str | None] = set()
    for step in run.flow.phase("prepare"):
        courts = run.courts if step.per_court else run.slot.courts[:1]
        for court in courts:
            if run.is_done(step, court) or (step.per_court and court in failed_courts):
                continue
            result = _plain_try(client, run, step, court)
            if result.problem is None:
                continue
            problems[(step.name, court if step.per_court else None)] = result
            if result.auth or result.final or not step.per_court:
                return problems
            failed_courts.add(court)
    return problems


#: How a reason ends whose fix is the user's: the booking is tried again by ``retry``.
RETRY_HINT = "`python main.py retry` this booking"


def _blocked_reason(step: Step, court: str | None, problem: str, *, retry: bool) -> str:
    """A preparation step answered by the club's web firewall: what, and what to do."""
    return f"{_where(step, court)}: {problem}: {BLOCKED_FIX}" + (
        f", then {RETRY_HINT}" if retry else ""
    )


def _credentials_reason(run: FlowRun, step: Step, court: str | None, problem: str) -> str:
    return (
        f"the club rejected the credentials at {_where(step, court)} ({problem}): "
        f"check token {run.token_name!r} in tokens.json, reload, then `python main.py retry` "
        "this booking"
    )


def _prepare(ctx: BookingContext, run: FlowRun, row: Instance) -> str | bool | None:
    """Run the preparation steps from ``prepare_seconds`` before the trigger, retried with
    backoff while the trigger is ahead. True when the booking can go on (courts whose
    preparation failed are dropped); else the final status, or None after a stop."""
    trigger = row.trigger_time.timestamp()
    begin = trigger - run.flow.prepare_seconds
    if ctx.clock() < begin and ctx.stop.wait(begin - ctx.clock()):
        instances.release(ctx.factory, row.key, fence=ctx.fence)
        logger.info("booking %s: shutting down before its preparation; left pending", row.key)
        return None
    tries = 0
    last: dict[tuple[str, str | None], StepReport] = {}
    while True:
        if _withdrawn(ctx, row.key):
            return None
        if not ctx.sendable():
            instances.release(ctx.factory, row.key, fence=ctx.fence)
            logger.warning("booking %s: %s; its booking request was not sent", row.key, NOT_ACTIVE)
            return None
        tries += 1
        problems = prepare_round(ctx.client, run)
        last = {k: v for k, v in last.items() if k in problems} | problems
        fatal = next((p for p in problems.values() if p.auth or p.final), None)
        if fatal is not None:
            step = next(s for s in run.flow.steps if s.name == fatal.step)
            if fatal.auth:
                reason = _credentials_reason(run, step, fatal.court, fatal.problem or "")
            elif fatal.blocked:
                reason = _blocked_reason(step, fatal.court, fatal.problem or "", retry=True)
            else:
                reason = f"{_where(step, fatal.court)}: {fatal.problem}"
            return _finish(ctx, row.key, FAILED, reason)
        if not problems:
            return True
        waits = [p.wait for p in problems.values() if p.wait is not None]
        delay = max(waits) if waits else ctx.retry_base * 2 ** (tries - 1)
        delay = min(delay, MAX_PREPARE_WAIT_SECONDS)
        if ctx.clock() + delay >= trigger:
            break
        if ctx.stop.wait(delay):
            instances.release(ctx.factory, row.key, fence=ctx.fence)
            logger.info("booking %s: shutting down while preparing; left pending", row.key)
            return None
    return _unprepared(ctx, run, row, last, tries)


def _unprepared(
    ctx: BookingContext,
    run: FlowRun,
    row: Instance,
    problems: dict[tuple[str, str | None], StepReport],
    tries: int,
) -> str | bool:
    """The window opens with some preparation still failing: a step that runs once fails the
    instance; courts whose own steps failed are dropped, and the instance fails when none is
    left."""
    lines = [
        f"{_where(next(s for s in run.flow.steps if s.name == p.step), p.court)}: {p.problem}"
        for p in problems.values()
    ]
    why = (
        f"preparation did not succeed before the window opened ({tries} "
        f"tr{'y' if tries == 1 else 'ies'}): "
    )
    if any(not p.per_court for p in problems.values()):
        return _finish(ctx, row.key, FAILED, why + "; ".join(lines))
    for (_, court), report in problems.items():
        run.dropped[court] = (
            f"court {_court_name(court)}: {why}step {report.step!r}: {report.problem}"
        )
    if not run.courts:
        return _finish(ctx, row.key, FAILED, why + "; ".join(lines))
    for line in lines:
        logger.warning("booking %s: %s; that court is left out", row.key, line)
    return True


def dry_run(
    client: ClubClient, flow: Flow, slot: Slot, secrets: Mapping[str, str], token_name: str
) -> tuple[list[StepReport], str | None]:
    """Run ``flow``'s preparation steps once each, now (``python main.py dry-run``): the reports
    of every send, and the first problem as a sentence with its fix (None when all succeeded).
    Nothing else is sent: no at_trigger step, no booking step, no finishing step."""
    problem = _secrets_problem(flow, secrets, token_name)
    if problem is not None:
        return [], problem
    run = FlowRun(flow, slot, secrets, token_name, label="dry-run", reports=[])
    problems = prepare_round(client, run)
    assert run.reports is not None
    if not problems:
        return run.reports, None
    first = next(iter(problems.values()))
    step = next(s for s in flow.steps if s.name == first.step)
    if first.auth:
        return run.reports, _credentials_reason(run, step, first.court, first.problem or "")
    if first.blocked:
        return run.reports, _blocked_reason(step, first.court, first.problem or "", retry=False)
    fix = (
        "check the step's URL, the token's fields and the ids in tokens.json and schedules.json; "
        "for a missing value, compare the extract path with the club's answer"
    )
    return run.reports, f"{_where(step, first.court)} failed: {first.problem}: {fix}"


def rehearse(ctx: BookingContext, key: str) -> str | None:
    """Rehearse the instance ``key`` (CONTRACT section 12): its flow's preparation steps, once,
    now, exactly as ``dry_run`` sends them; nothing else, and its status is never touched.
    None when every step succeeded, else the problem with its fix. An unexpected error is
    logged as a booking's is, its traceback scrubbed of the rehearsal's secrets."""
    start_secrets()
    try:
        row, token_row = instances.claimed(ctx.factory, key)
        flow = ctx.flow_for(row.club)
        secrets, problem = _token(ctx, flow, row, token_row)
        if problem is not None:
            return problem
        _, problem = dry_run(ctx.client, flow, _slot(row), secrets, row.token_name)
        return problem
    except Exception as exc:  # noqa: BLE001 (logged scrubbed; the rehearsal reports it)
        # Not logger.exception: the traceback's exception texts may quote a secret.
        logger.error("rehearsal %s: unexpected error: %s", key, scrubbed_traceback(exc))
        return f"internal error while rehearsing ({type(exc).__name__}): see the log"
    finally:
        end_secrets()


# --------------------------------------------------------------------------- the booking


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class BookingContext:
    """Everything a booking needs, built by the daemon each time it becomes the active one.

    ``owner`` names the daemon in the claims it makes. ``may_send`` is cleared the moment the
    daemon is no longer the active one (another may book now): no request leaves after that;
    a booking in flight finishes, one before its trigger or between retries goes back to
    ``pending`` for the active daemon. ``stop`` is set then too, to end the waits at once.
    """

    factory: SessionFactory
    fernet: MultiFernet
    client: ClubClient
    api_url: str | None
    retry_base: float
    stop: threading.Event
    notify: Callable[[Outcome], None]
    #: BOOKING_REQUEST_TEMPLATE (CONTRACT section 11 or 12); None: the request of section 6.
    template: Flow | None = None
    #: The club files by club name (CONTRACT section 3), as the last load left them: a club
    #: file that became invalid keeps its last good flow here.
    clubs: dict[str, Flow] = field(default_factory=dict)
    on_booked: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.time
    gate: TriggerGate = field(default_factory=TriggerGate)
    #: The first requests of each trigger instant, written by one thread (built in
    #: ``__post_init__`` with the client's timeout and this clock).
    burst: wire.BurstGate = field(init=False, repr=False)
    in_flight: set[str] = field(default_factory=set)
    in_flight_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Bookings under way that a reload touched (``withdraw``): each looks at its instance
    #: before its trigger, and stops when the reload cancelled it.
    withdrawn: set[str] = field(default_factory=set)
    #: Those of them that the reload did cancel: they stop where they are.
    cancelled: set[str] = field(default_factory=set)
    #: How often an early answer is retried, and for how long after the trigger (section 6).
    early_retry_ms: float = 100.0
    early_retry_seconds: float = 20.0
    #: When each booking under way sent its first booking request (``clock()``), for its outcome.
    first_sent: dict[str, float] = field(default_factory=dict)
    owner: str | None = None
    may_send: threading.Event = field(default_factory=_set_event)
    #: This daemon's lease on a shared PostgreSQL database (None alone on SQLite): every write
    #: of a booking is conditional on it (CONTRACT section 10).
    fence: instances.Fence | None = None
    #: Whether the lease is proven valid for the given seconds more (a local check, no round
    #: trip); always True alone on SQLite.
    proves: Callable[[float], bool] = lambda _ahead: True
    #: WATCH_INTERVAL_SECONDS, and the jitter's source (a number in [0, 1)): CONTRACT 13.
    watch_interval: float = 300.0
    jitter: Callable[[], float] = random.random
    #: One try of a watch in flight per club and token (its lock, by (club, token name)).
    watch_locks: dict[tuple[str | None, str], threading.Lock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.burst = wire.BurstGate(timeout=self.client.timeout, clock=self.clock)

    def sendable(self, ahead: float = 0.0) -> bool:
        """Whether a request may leave now (and for ``ahead`` seconds more): this daemon is
        still the active one and proves its lease. Once it cannot, nothing more leaves: the
        booking stops as after a loss of the role."""
        if not self.may_send.is_set():
            return False
        if self.proves(ahead):
            return True
        logger.error("%s: its lease could not be proven; no request leaves", NOT_ACTIVE_SHORT)
        self.may_send.clear()
        self.stop.set()
        return False

    def flow_for(self, club: str | None) -> Flow:
        """The flow an instance of ``club`` books with: its club file, or for None the template
        (section 6's request when none is set). KeyError for a club no valid file was ever
        loaded for (or, for None, when nothing gives a request)."""
        if club is not None:
            return self.clubs[club]
        if self.template is not None:
            return self.template
        if self.api_url is None:
            raise KeyError(club)
        if self._default is None or self._default[0] != self.api_url:
            self._default = (self.api_url, default_flow(self.api_url))
        return self._default[1]

    _default: tuple[str, Flow] | None = field(default=None, init=False, repr=False)

    def under_way(self) -> frozenset[str]:
        """The keys whose booking is under way in this process now (a snapshot)."""
        with self.in_flight_lock:
            return frozenset(self.in_flight)

    def withdraw(self, keys: Iterable[str]) -> None:
        """A reload changed these instances: those whose booking is under way here look at
        their instance before their trigger (a cancelled one stops, sending nothing more)."""
        with self.in_flight_lock:
            self.withdrawn.update(key for key in keys if key in self.in_flight)


def book_slot(key: str, ctx: BookingContext) -> str | None:
    """Book the instance ``key``; returns its final status, or None when there was nothing to
    do (not pending, already under way here) or a shutdown put it back to ``pending``."""
    with ctx.in_flight_lock:
        if key in ctx.in_flight:
            return None
        ctx.in_flight.add(key)
    start_secrets()
    try:
        if instances.status_of(ctx.factory, key) == WATCHING:
            return _watch_try(ctx, key)
        return _book(key, ctx)
    except Exception as exc:  # noqa: BLE001 (logged, scrubbed, and the instance marked)
        # Not logger.exception: the traceback's exception texts may quote a secret.
        if not ctx.may_send.is_set():
            # Most likely the database connection that cost the active role: the claim stays
            # this daemon's, which puts it back once it reaches the database again.
            logger.error(
                "booking %s: error after this daemon lost the active role: %s",
                key,
                scrubbed_traceback(exc),
            )
            return None
        logger.error("booking %s: unexpected error: %s", key, scrubbed_traceback(exc))
        _finish(ctx, key, FAILED, "internal error while booking (see the log); not retried")
        return FAILED
    finally:
        end_secrets()
        with ctx.in_flight_lock:
            ctx.in_flight.discard(key)
            ctx.withdrawn.discard(key)
            ctx.cancelled.discard(key)
            ctx.first_sent.pop(key, None)


def _withdrawn(ctx: BookingContext, key: str) -> bool:
    """Whether a reload cancelled the instance ``key`` while its booking prepared or waited for
    its trigger (its entry removed or disabled): then nothing more is sent for it. An instance
    the reload only touched goes on (one revived meanwhile is claimed again)."""
    with ctx.in_flight_lock:
        if key in ctx.cancelled:
            return True
        if key not in ctx.withdrawn:
            return False
        ctx.withdrawn.discard(key)
    status = instances.status_of(ctx.factory, key)
    if status == BOOKING or (status == PENDING and _claim(ctx, key, _now(ctx))):
        return False
    logger.info(
        "booking %s: cancelled by a reload before its trigger (%s); nothing more is sent for it",
        key,
        status,
    )
    with ctx.in_flight_lock:
        ctx.cancelled.add(key)
    return True


def _now(ctx: BookingContext) -> datetime:
    return datetime.fromtimestamp(ctx.clock(), UTC)


def _book(key: str, ctx: BookingContext) -> str | None:
    now = _now(ctx)
    row, missed = instances.expire_if_passed(ctx.factory, key, now)
    if missed is not None:
        ctx.notify(missed)
        return EXPIRED
    if row is None or row.status != PENDING:
        logger.debug("booking %s: nothing to do (%s)", key, row.status if row else "gone")
        return None
    if not ctx.sendable() or not _claim(ctx, key, now):
        return None
    row, token_row = instances.claimed(ctx.factory, key)
    try:
        flow = ctx.flow_for(row.club)
    except KeyError:
        return _finish(ctx, key, FAILED, _club_missing(row.club))
    secrets, problem = _token(ctx, flow, row, token_row)
    if problem is not None:
        return _finish(ctx, key, FAILED, problem)
    run = FlowRun(flow, _slot(row), secrets, row.token_name, label=key, total=row.attempts)
    if flow.phase("prepare"):
        ready = _prepare(ctx, run, row)
        if ready is not True:
            return ready or None
    trigger = _send_instant(ctx, flow, row)
    # Everything is built before the trigger: only the send is left for the moment itself.
    ahead = _first_requests(ctx.client, run)
    first_key, first = next(iter(ahead.items()), (None, None))
    ready = _on_wire(ctx, first, trigger) if first is not None else None
    wired: dict[tuple[str, str | None], wire.Sent] = {}
    try:
        started = _reach_trigger(ctx, key, trigger, ready, first_key=first_key, wired=wired)
        if not started:
            if _withdrawn(ctx, key):
                return None
            instances.release(ctx.factory, key, fence=ctx.fence)
            if ctx.may_send.is_set():
                logger.info("booking %s: shutting down before its trigger; left pending", key)
            else:
                logger.warning("booking %s: %s; nothing was sent", key, NOT_ACTIVE)
            return None
        run.opened = max(trigger, ctx.clock())
        return _run_courts(ctx, run, row, ahead, wired)
    finally:
        for unread in wired.values():
            unread.connection.close()


def _send_instant(ctx: BookingContext, flow: Flow, row: Instance) -> float:
    """When the booking's first request leaves (our clock, epoch seconds): its trigger, or with
    ``clock`` the trigger by the club's clock, as measured just before."""
    trigger = row.trigger_time.timestamp()
    if flow.clock_url is None:
        if row.clock_offset_ms is not None or row.clock_error is not None:
            instances.record_clock(ctx.factory, row.key)  # an earlier try's, with an old file
        return trigger
    measured = _club_clock(ctx, flow, row)
    return trigger if measured is None else measured.send_at(trigger)


def _club_clock(ctx: BookingContext, flow: Flow, row: Instance) -> Measurement | None:
    """The club's clock, measured within the preparation time before the trigger (CONTRACT
    section 6, "The club's clock"), and noted on the instance; None when the booking goes by
    our clock (the measurement failed, was refused, or there was no time left: logged)."""
    assert flow.clock_url is not None
    key, trigger = row.key, row.trigger_time.timestamp()
    done_by = trigger - CLOCK_DONE_BEFORE_SECONDS
    if ctx.clock() >= done_by - CLOCK_MIN_SECONDS:
        # A booking that starts late (loaded with its window open, back after downtime).
        logger.info("booking %s: no time to measure the club's clock; by our clock", key)
        instances.record_clock(ctx.factory, key, error="no time left before the trigger")
        return None
    begin = max(trigger - flow.prepare_seconds, trigger - CLOCK_START_SECONDS)
    if ctx.clock() < begin and ctx.stop.wait(begin - ctx.clock()):
        return None  # stopping: the wait for the trigger says so

    def nap(seconds: float) -> None:
        if ctx.stop.wait(seconds):
            raise ClockError("the daemon is stopping")

    try:
        measured = measure_club_clock(
            ctx.client, flow.clock_url, clock=ctx.clock, sleep=nap, deadline=done_by
        )
    except ClockError as exc:
        logger.warning(
            "booking %s: the club's clock could not be measured (GET %s): %s; the trigger "
            "stays ours",
            key,
            flow.clock_url,
            exc,
        )
        instances.record_clock(ctx.factory, key, error=str(exc))
        return None
    logger.info(
        "booking %s: the club's clock: %s (%d requests); sending %.1f ms %s our trigger",
        key,
        measured.text,
        measured.requests,
        abs(measured.lead) * 1000,
        "before" if measured.lead >= 0 else "after",
    )
    instances.record_clock(
        ctx.factory,
        key,
        offset_ms=measured.offset * 1000,
        uncertainty_ms=measured.uncertainty * 1000,
    )
    return measured


def _token(
    ctx: BookingContext, flow: Flow, row: Instance, token_row: Token | None
) -> tuple[dict[str, str], str | None]:
    """The booking's token fields (each remembered as a secret), and the problem that keeps
    them from being sent (None when there is none)."""
    secrets, problem = instances.token_secrets(token_row, ctx.fernet, name=row.token_name)
    for value in secrets.values():
        remember_secret(value)
    if problem is None:
        problem = _secrets_problem(flow, secrets, row.token_name)
    if problem is None and any(utils.CONTROL_RE.search(v) for v in secrets.values()):
        # A header cannot carry it (and requests' error would quote it): never sent.
        problem = (
            f"token {row.token_name!r} holds a control character (a line break, tab, ...): put "
            "the token in tokens.json as one line and reload"
        )
    return secrets, problem


def _reach_trigger(
    ctx: BookingContext,
    key: str,
    trigger: float,
    ready: tuple[wire.Connection, bytes] | None,
    *,
    first_key: tuple[str, str | None] | None,
    wired: dict[tuple[str, str | None], wire.Sent],
) -> bool:
    """Wait for the trigger: with ``ready``, write the first request at the instant (kept in
    ``wired`` under ``first_key``), else wait behind the gate. False on a stop."""
    if ready is None:
        return _wait_until(ctx, trigger - wire.HAND_OVER_SECONDS, key=key) and ctx.gate.wait(
            ctx, trigger
        )
    sent = _at_instant(ctx, trigger, *ready, key=key)
    if sent is not None and first_key is not None:
        wired[first_key] = sent
        if sent.error is None:
            ctx.first_sent[key] = sent.sent_clock
    return sent is not None


def _on_wire(
    ctx: BookingContext, prepared: requests.PreparedRequest, trigger: float
) -> tuple[wire.Connection, bytes] | None:
    """The first request of the trigger as its bytes, and a connection opened ahead for it;
    None (it goes through requests at the trigger) when the trigger is too close, wire cannot
    write the request, or no connection could be opened."""
    if ctx.clock() >= trigger - 0.05 or not prepared.url:
        return None
    try:
        data = wire.request_bytes(prepared)
    except (ValueError, TypeError) as exc:
        # The class only: the text may quote a header's name.
        logger.debug("the first request goes through requests: %s", exc.__class__.__name__)
        return None
    conn = ctx.client.warm(prepared.url)
    if not isinstance(conn, wire.Connection):
        return None
    return conn, data


def _at_instant(
    ctx: BookingContext, trigger: float, conn: wire.Connection, data: bytes, *, key: str
) -> wire.Sent | None:
    """Write ``data`` on ``conn`` at ``trigger``, with every first request of that instant, from
    one thread (``ctx.burst``); None on a stop before the trigger, or when a reload cancelled
    the instance ``key`` meanwhile (nothing sent)."""
    # Short naps up to the gate's last stretch (it naps in one go): a wall clock stepped
    # meanwhile is noticed as ``_wait_until`` notices it.
    sent = None
    if _wait_until(ctx, trigger - wire.HAND_OVER_SECONDS, key=key):
        sent = ctx.burst.send(
            trigger, conn, data, stop=ctx.stop, allowed=lambda: ctx.sendable(BURST_PROOF_SECONDS)
        )
    if sent is None:
        conn.close()
    return sent


def _club_missing(club: str | None) -> str:
    if club is None:
        return (
            "no request for this entry: set BOOKING_API_URL or BOOKING_REQUEST_TEMPLATE, or name "
            "a club in the entry, reload, then `python main.py retry` this booking"
        )
    return (
        f"club {club!r}: its file (DATA_DIR/clubs/{club}.json) is missing or invalid and no "
        "good version of it was loaded: fix it (`python main.py check` names the error), "
        "reload, then `python main.py retry` this booking"
    )


def _secrets_problem(flow: Flow, secrets: Mapping[str, str], name: str) -> str | None:
    """Why ``secrets`` cannot run ``flow`` (a field it names that the token lacks), or None."""
    missing = sorted(flow.secret_fields - set(secrets))
    if missing:
        wanted = ", ".join(sorted(flow.secret_fields))
        return (
            f"token {name!r} has no field {missing[0]!r}, which the club's flow uses as "
            f"{{secret.{missing[0]}}}: write token {name!r} in tokens.json as an object with "
            f"the fields {wanted}, reload, then {RETRY_HINT}"
        )
    if flow.uses_token and "token" not in secrets:
        return (
            f"token {name!r} has no 'token' field, which the club's flow uses as {{token}}: add "
            "it in tokens.json, reload, then `python main.py retry` this booking"
        )
    return None


def _claim(ctx: BookingContext, key: str, now: datetime) -> bool:
    """pending -> booking; False when another claimant has it, or when the database cannot be
    written (a full disk): nothing was sent, it stays pending, and the daemon's watchdog has it
    booked once writes work again."""
    try:
        return instances.claim(ctx.factory, key, now, owner=ctx.owner, fence=ctx.fence)
    except DatabaseError as exc:
        logger.error(
            "booking %s: not started, the database cannot be written (%s); it stays pending",
            key,
            error_text(exc),
        )
        return False


def _slot(row: Instance) -> Slot:
    """What the instance's requests are rendered from: its desired time, or the fallback time
    it has reached (CONTRACT 13), whose requests carry their own Idempotency-Key."""
    attempt = instances.attempt_of(row)
    return Slot(
        key=row.key,
        start=attempt.start,
        duration_minutes=row.duration_minutes,
        zone=utils.get_zone(row.timezone),
        courts=tuple(json.loads(row.courts)),
        players=attempt.players,
        idempotency_base=f"{row.key}@{attempt.time}" if attempt.fallback else None,
    )


def _first_requests(
    client: ClubClient, run: FlowRun
) -> dict[tuple[str, str | None], requests.PreparedRequest]:
    """The requests that leave at the trigger, built ahead: the first ``at_trigger`` step's
    (first court), else the booking step's for every court."""
    at_trigger = run.flow.phase("at_trigger")
    wanted = (
        [(at_trigger[0], run.courts[0])]
        if at_trigger
        else [(run.flow.booking_step, court) for court in run.courts]
    )
    ahead: dict[tuple[str, str | None], requests.PreparedRequest] = {}
    for step, court in wanted:
        try:
            ahead[(step.name, court)] = _prepared(client, run, step, court)
        except UnsendableHeader:
            continue  # built again at the trigger, where it fails the step with the reason
    return ahead


def _wait_until(ctx: BookingContext, target: float, *, key: str | None = None) -> bool:
    """Sleep until ``target`` (epoch seconds), never returning early; False if asked to stop,
    or (with ``key``) when a reload cancelled that instance meanwhile.

    Sleeps until just before, then spins: the request must leave as close after the trigger as
    the machine allows, and never before it.
    """
    while True:
        if key is not None and _withdrawn(ctx, key):
            return False
        remaining = target - ctx.clock()
        if remaining <= 0:
            return True
        if remaining > SPIN_SECONDS:
            if ctx.stop.wait(min(remaining - SPIN_SECONDS, MAX_NAP_SECONDS)):
                return False
            continue
        while ctx.clock() < target:
            pass
        return True


# --------------------------------------------------------------------------- at the trigger


@dataclass
class _Result:
    """How a step's sends for one court ended: ``ok`` (an at_trigger step), ``booked``,
    ``taken`` or ``spent`` (go on with the next court), ``missing`` (an at_trigger step's value
    not shown: the court waits for the next round), ``failed`` or ``stopped``."""

    kind: str
    reason: str = ""
    ref: str | None = None
    #: A taken court that may be taken by our own earlier attempt (its answer was lost).
    ours: bool = False
    #: ``busy`` (a try of a watch the club asked to wait): the wait it asked for (Retry-After).
    wait: float | None = None


@dataclass
class _Send:
    """The sends of one step for one court at the trigger."""

    step: Step
    court: str | None
    sent: int = 0
    tries: int = 0  # the answers that count against MAX_ATTEMPTS_PER_COURT (not early ones)
    early: int = 0
    lost: bool = False
    last: str = ""
    #: The status of the last answer (None: none came, or the last try got no answer).
    status: int | None = None

    @property
    def prefix(self) -> str:
        """How reasons about it start: its court, and its step unless it is the booking step."""
        court = f"court {_court_name(self.court)}"
        return court if self.step.booking else f"{court}: step {self.step.name!r}"


def _run_courts(
    ctx: BookingContext,
    run: FlowRun,
    row: Instance,
    ahead: dict[tuple[str, str | None], requests.PreparedRequest],
    wired: dict[tuple[str, str | None], wire.Sent],
) -> str | None:
    """The at_trigger steps and the booking step, court after court until one is booked
    (``wired``: the request of ``ahead`` already written at the trigger, by its key).

    A court whose at_trigger step answers without the value it extracts (a slot the club does
    not show) waits for the next round: when no court of a round got further, the window may
    not be open yet at the club, so the round is tried again as early answers are (at once,
    then every EARLY_RETRY_MS until EARLY_RETRY_SECONDS after the trigger)."""
    reasons = list(run.dropped.values())
    # Every court taken (and none maybe by our own lost attempt): a retry would be taken too.
    all_taken, maybe_ours = not reasons, False
    courts = run.courts
    rounds = 0
    while True:
        missing: dict[str | None, str] = {}
        for court in courts:
            result = _one_court(ctx, run, row, court, ahead, wired=wired)
            if result.kind == "booked":
                return _after_booking(ctx, run, row, court, result.ref)
            if result.kind == "missing":
                missing[court] = result.reason
            elif result.kind in ("taken", "spent"):
                reasons.append(result.reason)
                all_taken = all_taken and result.kind == "taken"
                maybe_ours = maybe_ours or result.ours
            elif result.kind == "stopped":
                return _stopped(ctx, run, row, lost=maybe_ours or result.ours)
            else:
                return _finish(ctx, row.key, FAILED, result.reason, attempts=run.total)
        if not missing:
            break
        all_taken = False
        wait = _round_wait(ctx, run, rounds)
        rounds += 1
        if wait is None:
            reasons += [
                f"{why} still {_early_span(ctx, run, row)} (EARLY_RETRY_SECONDS): it never "
                "showed up; check the court and the time with the club"
                for why in missing.values()
            ]
            break
        if _now(ctx) + timedelta(seconds=wait) >= run.slot.start:
            reasons += [f"{why}; the start came first" for why in missing.values()]
            break
        if wait > 0 and ctx.stop.wait(wait):
            return _stopped(ctx, run, row, lost=maybe_ours)
        courts = list(missing)
    taken = bool(reasons) and all_taken
    if taken and not maybe_ours:
        # Fallback times, then a watch (CONTRACT 13); else a retry would be taken too: the
        # advice is another court, not another try.
        return _all_taken(ctx, run, row, reasons)
    reason = "; ".join(reasons) or "no court could be booked"
    return _finish(ctx, row.key, FAILED, reason, attempts=run.total, retry_helps=not taken)


#: The same, short, for a log line.
NOT_ACTIVE_SHORT = "this daemon is no longer the active one"
#: Why a booking stops short when its daemon lost the active role (CONTRACT section 10).
NOT_ACTIVE = (
    "this daemon is no longer the active one; back to pending for the active daemon, with the "
    "same Idempotency-Key"
)


def _hand_over(ctx: BookingContext, key: str, attempts: int, *, sent: bool) -> None:
    """A booking whose daemon lost the active role before its next request: back to pending,
    its requests so far counted, marked ``interrupted`` when one may have reached the club."""
    instances.record_attempt(ctx.factory, key, attempts, fence=ctx.fence)
    instances.release(ctx.factory, key, sent=sent, fence=ctx.fence)
    logger.warning("booking %s: %s", key, NOT_ACTIVE)


def _round_wait(ctx: BookingContext, run: FlowRun, rounds: int) -> float | None:
    """The wait before another round of courts whose slot was not shown (None: time spent)."""
    if ctx.clock() >= run.opened + ctx.early_retry_seconds:
        return None
    return 0.0 if rounds == 0 else ctx.early_retry_ms / 1000


def _stopped(ctx: BookingContext, run: FlowRun, row: Instance, *, lost: bool) -> None:
    """A booking that stops before its next request: a shutdown, or this daemon no longer the
    active one (then ``lost``: a request may have reached the club unanswered)."""
    if not ctx.may_send.is_set():
        return _hand_over(ctx, row.key, run.total, sent=lost or row.interrupted)
    instances.release(ctx.factory, row.key, fence=ctx.fence)
    logger.info("booking %s: shutting down between retries; back to pending", row.key)
    return None


def _one_court(
    ctx: BookingContext,
    run: FlowRun,
    row: Instance,
    court: str | None,
    ahead: dict[tuple[str, str | None], requests.PreparedRequest],
    *,
    wired: dict[tuple[str, str | None], wire.Sent],
) -> _Result:
    for step in (*run.flow.phase("at_trigger"), run.flow.booking_step):
        if not step.booking and run.is_done(step, court):
            continue
        request = ahead.pop((step.name, court), None)
        sent = wired.pop((step.name, court), None)
        result = _send_step(ctx, run, row, step, court, request=request, sent=sent)
        if result.kind != "ok":
            return result
    raise AssertionError("the booking step always ends the court")  # pragma: no cover


def _send_step(
    ctx: BookingContext,
    run: FlowRun,
    row: Instance,
    step: Step,
    court: str | None,
    *,
    request: requests.PreparedRequest | None,
    sent: wire.Sent | None = None,
) -> _Result:
    """Send ``step`` for ``court`` until its answer settles it: early answers again at once,
    then every EARLY_RETRY_MS until EARLY_RETRY_SECONDS after the trigger; busy answers and
    no answer at most MAX_ATTEMPTS_PER_COURT times, with backoff or Retry-After. ``sent``:
    ``request`` was already written at the trigger, its answer is read first."""
    send = _Send(step, court)
    delays = utils.backoff_delays(ctx.retry_base, MAX_ATTEMPTS_PER_COURT)
    while True:
        if sent is None and not ctx.sendable():
            # No longer the active daemon: nothing more leaves (a request already written at
            # the trigger is in flight: its answer is read); the active one goes on.
            return _Result("stopped", ours=send.lost)
        if request is None:
            try:
                request = _prepared(ctx.client, run, step, court)
            except MissingValue as exc:
                why = run.missing.get(exc.ref, "no step gave it a value")
                return _Result("failed", f"{send.prefix}: {{{exc.ref}}} has no value ({why})")
            except UnsendableHeader as exc:
                where = send.prefix if not step.booking else f"{send.prefix}: step {step.name!r}"
                return _Result("failed", f"{where}: {exc}; nothing was sent for it")
        kind, wait, result = _send_once(ctx, run, row, send, request, sent=sent)
        sent = None
        if result is not None:
            return result
        if run.watching:
            # One request per try of a watch: the next try comes after the interval.
            return _Result("busy", f"{send.prefix}: {send.last}", wait=wait)
        if kind == "early":
            wait = _early_wait(ctx, run, send)
            if wait is None:
                return _Result("failed", _never_opened(ctx, send, _early_span(ctx, run, row)))
        else:
            if send.tries >= MAX_ATTEMPTS_PER_COURT:
                return _Result("spent", _spent(send))
            wait = wait if wait is not None else delays[send.tries - 1]
        if _now(ctx) + timedelta(seconds=wait) >= run.slot.start:
            return _Result("failed", f"{send.prefix}: {send.last}; the start came first")
        if kind == "retry" and step.booking:
            instances.record_attempt(
                ctx.factory, row.key, run.total, _first_sent(ctx, row.key), fence=ctx.fence
            )
        # An early answer is sent again at once, without even a look at the stop event.
        if (kind == "retry" or wait > 0) and ctx.stop.wait(wait):
            return _Result("stopped", ours=send.lost)


def _early_wait(ctx: BookingContext, run: FlowRun, send: _Send) -> float | None:
    """How long to wait before sending again after an early answer (None: the time is spent)."""
    if ctx.clock() >= run.opened + ctx.early_retry_seconds:
        return None
    send.early += 1
    return 0.0 if send.early == 1 else ctx.early_retry_ms / 1000


def _never_opened(ctx: BookingContext, send: _Send, span: str) -> str:
    return (
        f"{send.prefix}: the club never opened: still {send.last} {span} "
        f"(EARLY_RETRY_SECONDS), after {send.sent} request(s); check the window and the court "
        "with the club"
    )


def _early_span(ctx: BookingContext, run: FlowRun, row: Instance) -> str:
    """How long early answers were sent again, counted from when: the trigger, or for a
    booking that began after it (loaded late, back after downtime) its first request."""
    if run.opened - row.trigger_time.timestamp() > LATE_START_SECONDS:
        return f"{ctx.early_retry_seconds:g} s after its first request (sent late)"
    return f"{ctx.early_retry_seconds:g} s after the window opened"


def _spent(send: _Send) -> str:
    what = "no booking" if send.step.booking else "no answer to use"
    meaning = _status_meaning(send.status) if send.status is not None else None
    last = send.last + (f"; {meaning}" if meaning else "")
    return f"{send.prefix}: {what} after {send.tries} attempts (last: {last})"


def _send_once(
    ctx: BookingContext,
    run: FlowRun,
    row: Instance,
    send: _Send,
    request: requests.PreparedRequest,
    *,
    sent: wire.Sent | None = None,
) -> tuple[str, float | None, _Result | None]:
    """Send once (with ``sent``: read the answer to the request written at the trigger).
    Returns the verdict, the wait a busy club asked for (Retry-After), and the result when
    this answer settles the step."""
    step = send.step
    send.sent += 1
    # When the booking's first request of the trigger left, for its outcome (lateness).
    ctx.first_sent.setdefault(row.key, ctx.clock())
    if step.booking:
        # Counted in the database with the answer, not before the send: a commit here would
        # sit between the trigger and the request.
        run.total += 1
    try:
        answer, reply = exchange(ctx.client, run, step, request, sent=sent)
    except BookingError as exc:
        _resent(ctx, row, sent)
        send.lost = send.lost or exc.lost
        send.status = None
        send.last = run.scrub(str(exc))
        _log_send(run, send, send.last)
        if exc.permanent:
            reason = send.last if step.booking else f"{send.prefix}: {send.last}"
            return "failed", None, _Result("failed", reason)
        send.tries += 1
        return "retry", None, None
    except StepFailure as exc:
        _resent(ctx, row, sent)
        text = run.scrub(str(exc))
        _log_send(run, send, text)
        return "failed", None, _Result("failed", f"{send.prefix}: {text}")
    _resent(ctx, row, sent)
    verdict = classify(answer, step).kind
    _log_send(run, send, f"HTTP {answer.status} in {answer.latency_ms:.0f} ms -> {verdict}")
    says = _club_says(answer, run.scrub, step.matched_words(verdict, answer.body))
    send.last, send.status = says, answer.status
    if verdict in ("booked", "ok"):
        return _settled(run, send, answer, reply)
    if verdict == "early":
        return "early", None, None
    if verdict == "retry":
        send.tries += 1
        # A watch waits as long as the club asks (CONTRACT 13), within a day.
        cap = WATCH_RETRY_AFTER_CAP if run.watching else utils.RETRY_AFTER_CAP_SECONDS
        wait = utils.parse_retry_after(answer.header("Retry-After"), _now(ctx), cap)
        return "retry", wait, None
    return verdict, None, _refusal(run, row, send, verdict, answer)


def _resent(ctx: BookingContext, row: Instance, sent: wire.Sent | None) -> None:
    """The request written at the trigger went again on a new connection (the one opened ahead
    was spent): the lateness of the booking is that of the request the club could answer."""
    if sent is not None and sent.resent:
        ctx.first_sent[row.key] = sent.sent_clock


def _log_send(run: FlowRun, send: _Send, what: str) -> None:
    court = _court_name(send.court)
    if send.step.booking:
        logger.info("attempt %s court=%s #%d: %s", run.label, court, send.sent, what)
    else:
        logger.info(
            "step %s %s court=%s #%d: %s", run.label, send.step.name, court, send.sent, what
        )


def _settled(
    run: FlowRun, send: _Send, answer: Answer, reply: Reply
) -> tuple[str, float | None, _Result | None]:
    """A booked answer (its values and ref kept), or an at_trigger step's ok answer: with every
    value, the step is done; with one missing, the club does not show it (yet): ``missing``."""
    step, court = send.step, send.court
    values = run.values(court)
    found, problems = extract_values(step, reply, values)
    if step.booking:
        ref = step.ref_of(reply, values)
        run.keep(step, court, found, ref=ref)
        for extraction in step.extract:
            name = f"{step.name}.{extraction.name}"
            if name not in found:
                run.missing[name] = f"step {step.name!r} could not extract it: " + "; ".join(
                    p for p in problems if f"value {extraction.name!r}" in p
                )
        # Stored scrubbed of the booking's secrets (safe_ref, in _finish).
        return "booked", None, _Result("booked", ref=ref)
    if problems:
        if step.wants_json and _page(answer, run.scrub) is not None:
            return (
                "failed",
                None,
                _Result("failed", f"{send.prefix}: {send.last}: {HTML_FOR_JSON_FIX}"),
            )
        reason = f"{send.prefix}: {send.last}, but " + "; ".join(problems)
        return "missing", None, _Result("missing", reason)
    run.keep(step, court, found)
    return "ok", None, _Result("ok")


def _refusal(run: FlowRun, row: Instance, send: _Send, verdict: str, answer: Answer) -> _Result:
    """The result of an answer that ends the step's sends without success."""
    says, prefix = send.last, send.prefix
    if verdict == "taken":
        reason = f"{prefix}: taken ({says})"
        ours = send.step.booking and (send.lost or row.interrupted)
        if ours:
            reason += (
                "; an earlier attempt on this court got no answer, so it may be taken by our "
                "own earlier attempt: check your bookings at the club"
            )
        return _Result("taken", reason, ours=ours)
    if verdict == "auth" and run.flow.single:
        reason = (
            f"the club rejected token {run.token_name!r} ({says}): put a valid token in "
            "tokens.json, reload, then `python main.py retry` this booking"
        )
    elif verdict == "auth":
        reason = _credentials_reason(run, send.step, send.court, says)
    elif verdict == "blocked":
        where = "" if run.flow.single else f"{_where(send.step, send.court)}: "
        reason = f"{where}{_blocked(answer, run.scrub)}: {BLOCKED_FIX}, then {RETRY_HINT}"
    elif verdict == "unmatched":
        matchers = ", ".join(kind for kind, _ in send.step.matchers) or "ok"
        reason = (
            f"{prefix}: the club answered {says}, which none of the step's answers ({matchers}) "
            "matches: the booking may or may not have been made; check with the club"
        )
    elif 300 <= answer.status < 400:
        host = urlsplit(answer.header("Location") or "").netloc
        reason = (
            f"the club answered with a redirect ({says}{' to ' + host if host else ''}); "
            "redirects are never followed so the token stays with the configured host: check "
            "the booking URL"
        )
    else:
        reason = f"the club refused the request ({says}): check the entry and the URL"
    return _Result("failed", reason)


# --------------------------------------------------------------------------- after the booking


def _after_booking(
    ctx: BookingContext, run: FlowRun, row: Instance, court: str | None, ref: str | None
) -> str | None:
    """Run the finishing steps for the booked court; the booking step is never sent again."""
    finishing = run.flow.phase("finish")
    if finishing:
        # Written before they run: whatever becomes of them (a failure, a crash), the instance
        # is never booked again.
        instances.club_took(
            ctx.factory,
            row.key,
            booking_ref=safe_ref(ref),
            court=court,
            attempts=run.total,
            first_sent_at=_first_sent(ctx, row.key),
            fence=ctx.fence,
        )
    for step in finishing:
        problem = _finish_step(ctx, run, step, court)
        if problem is not None:
            shown = safe_ref(ref)
            took = f"court {_court_name(court)}" + (f", ref {shown}" if shown else "")
            reason = (
                f"the club took the booking ({took}) but step {step.name!r} did not complete: "
                f"{problem}; check it with the club"
            )
            return _finish(
                ctx, row.key, FAILED, reason, booking_ref=ref, court=court, attempts=run.total
            )
    return _finish(
        ctx,
        row.key,
        BOOKED,
        None,
        booking_ref=ref,
        court=court,
        attempts=run.total,
        booked_time=_local_time(run.slot),
        from_watch=run.watching,
    )


def _local_time(slot: Slot) -> str:
    """The local ``HH:MM`` of the slot's start (what ``booked_time`` records)."""
    return utils.as_utc(slot.start).astimezone(slot.zone).strftime("%H:%M")


def _finish_step(ctx: BookingContext, run: FlowRun, step: Step, court: str | None) -> str | None:
    """Send a finishing step up to MAX_ATTEMPTS_PER_COURT times with backoff (credentials
    rejected: at once). None when it succeeded, else what went wrong."""
    delays = utils.backoff_delays(ctx.retry_base, MAX_ATTEMPTS_PER_COURT)
    for attempt in range(1, MAX_ATTEMPTS_PER_COURT + 1):
        if not ctx.sendable():
            return f"{NOT_ACTIVE_SHORT}, so it was not sent"
        report = _plain_try(ctx.client, run, step, court)
        if report.problem is None:
            return None
        if report.auth:
            return f"{report.problem}: the credentials were rejected"
        if report.forbidden:
            # After the booking, a refusal is not waited out: the club holds the booking.
            return report.problem
        if report.final:
            return report.problem
        if attempt == MAX_ATTEMPTS_PER_COURT:
            return f"{report.problem}, after {attempt} tries"
        wait = report.wait if report.wait is not None else delays[attempt - 1]
        if ctx.stop.wait(wait):
            return f"{report.problem}; courtbot was stopping"
    return None  # pragma: no cover (the loop always returns)


def _first_sent(ctx: BookingContext, key: str) -> datetime | None:
    """When the booking ``key``'s first request left (None: none has)."""
    sent = ctx.first_sent.get(key)
    return None if sent is None else datetime.fromtimestamp(sent, UTC)


def _finish(
    ctx: BookingContext,
    key: str,
    status: str,
    reason: str | None,
    *,
    booking_ref: str | None = None,
    court: str | None = None,
    attempts: int | None = None,
    retry_helps: bool = True,
    booked_time: str | None = None,
    from_watch: bool = False,
) -> str | None:
    """Write the booking's outcome and report it; None when this daemon may no longer write it
    (no longer the active one: the active daemon settles the booking)."""
    outcome = instances.finish(
        ctx.factory,
        key,
        status,
        reason,
        now=_now(ctx),
        booking_ref=safe_ref(booking_ref),
        court=court,
        attempts=attempts,
        first_sent_at=_first_sent(ctx, key),
        retry_helps=retry_helps,
        fence=ctx.fence,
        booked_time=booked_time,
        from_watch=from_watch,
    )
    if outcome is None:
        logger.warning(
            "booking %s: its outcome (%s) is not recorded: %s; the active daemon settles it "
            "(sent again with the same Idempotency-Key once this request could have ended)",
            key,
            status,
            NOT_ACTIVE_SHORT,
        )
        return None
    ctx.notify(outcome)
    if status == BOOKED and ctx.on_booked is not None:
        try:
            ctx.on_booked(outcome.schedule_id)  # the top-up: the booking stands whatever it does
        except Exception:
            logger.exception("booking %s: booked; the top-up after it failed", key)
    return status


# --------------------------------------------------------------------------- CONTRACT 13


def _end_watch(ctx: BookingContext, key: str) -> None:
    """End a watch whose time ran out (failed, every court still taken), reported unless this
    daemon may no longer write it."""
    outcome = instances.end_watch(ctx.factory, key, _now(ctx), fence=ctx.fence)
    if outcome is not None:
        ctx.notify(outcome)


def _tried(row: Instance, run: FlowRun, reasons: list[str]) -> str:
    """What each time tried so far met: the earlier times' and this one's
    (``18:00: court 3: taken (HTTP 409); 19:00: ...``)."""
    this = f"{_local_time(run.slot)}: " + "; ".join(reasons)
    return f"{row.tried}; {this}" if row.tried else this


def _all_taken(ctx: BookingContext, run: FlowRun, row: Instance, reasons: list[str]) -> str:
    """Every court of this time was taken: the next fallback time (at its own trigger, at once
    when that has passed), else a watch, else ``failed`` (a retry would be taken too)."""
    if not row.fallbacks and not row.watch_until:
        reason = "; ".join([*reasons, TAKEN_ADVICE])
        return _finish(ctx, row.key, FAILED, reason, attempts=run.total, retry_helps=False)
    tried = _tried(row, run, reasons)
    instances.record_attempt(
        ctx.factory, row.key, run.total, _first_sent(ctx, row.key), fence=ctx.fence
    )
    # The next time is a booking of its own: when its request leaves is counted from its own
    # trigger, not from this one's (CONTRACT 8).
    ctx.first_sent.pop(row.key, None)
    following = instances.fall_back(
        ctx.factory, row.key, tried=tried, now=_now(ctx), fence=ctx.fence
    )
    if following is not None:
        text, _start, trigger = following
        logger.info(
            "booking %s: every court at %s taken; going on with the fallback time %s (window "
            "opens %s)",
            row.key,
            _local_time(run.slot),
            text,
            utils.format_utc(trigger),
        )
        if trigger <= _now(ctx):
            return _book(row.key, ctx) or PENDING
        return PENDING
    watched = instances.watch(
        ctx.factory, row.key, tried=tried, next_try=_next_try(ctx, None), fence=ctx.fence
    )
    if watched is not None:
        ctx.notify(instances.outcome_of(watched))
        return WATCHING
    reason = f"{tried}; {TAKEN_ADVICE}"
    return _finish(ctx, row.key, FAILED, reason, attempts=run.total, retry_helps=False)


def _next_try(ctx: BookingContext, wait: float | None) -> datetime:
    """When a watch tries next: WATCH_INTERVAL_SECONDS with ±10 % jitter, never sooner than
    60 s, nor than the club's Retry-After (``wait``)."""
    interval = ctx.watch_interval * (0.9 + 0.2 * ctx.jitter())
    seconds = max(interval, MIN_WATCH_SECONDS, wait or 0.0)
    return _now(ctx) + timedelta(seconds=seconds)


#: The least a watch waits between tries (CONTRACT 13: never faster than 60 s), and the most a
#: club's Retry-After can put its next try off.
MIN_WATCH_SECONDS = 60.0
WATCH_RETRY_AFTER_CAP = 86400.0


def _watch_try(ctx: BookingContext, key: str) -> str | None:
    """One try of a watch (CONTRACT 13): at its time, one (time, court) of the instance in
    turn, its flow's preparation then the booking step, one request each. Booked ends it; every
    court still taken (or a club asking to wait) tries again after the interval; the end of the
    watch, or any other answer, ends it as ``failed``."""
    now = _now(ctx)
    if not ctx.may_send.is_set() or not instances.claim_watch(
        ctx.factory, key, now, owner=ctx.owner, fence=ctx.fence
    ):
        return None
    row, token_row = instances.claimed(ctx.factory, key)
    assert row.next_try_at is not None and row.watch_until is not None
    if not _wait_until(ctx, row.next_try_at.timestamp(), key=key):
        instances.release(ctx.factory, key, fence=ctx.fence)
        return None
    if _now(ctx) >= row.watch_until:
        _end_watch(ctx, key)
        return FAILED
    try:
        flow = ctx.flow_for(row.club)
    except KeyError:
        return _finish(ctx, key, FAILED, _club_missing(row.club))
    secrets, problem = _token(ctx, flow, row, token_row)
    if problem is not None:
        return _finish(ctx, key, FAILED, problem)
    with ctx.in_flight_lock:
        lock = ctx.watch_locks.setdefault((row.club, row.token_name), threading.Lock())
    with lock:
        return _watch_send(ctx, row, flow, secrets)


def _watch_slot(row: Instance, now: datetime) -> Slot | None:
    """The (time, court) this try of the watch books: the times still ahead and the courts in
    turn, one per try (None when no time is ahead any more)."""
    zone = utils.get_zone(row.timezone)
    courts = tuple(json.loads(row.courts))
    times = [(text, start) for text, start, _ in instances.times_of(row) if start > now]
    if not times:
        return None
    pairs = [(text, start, court) for text, start in times for court in courts]
    _text, start, court = pairs[(row.watch_tries or 0) % len(pairs)]
    attempt = instances.attempt_of(row)
    return Slot(
        key=row.key,
        start=start,
        duration_minutes=row.duration_minutes,
        zone=zone,
        courts=(court,),
        players=attempt.players,
        idempotency_base=f"{row.key}~watch{(row.watch_tries or 0) + 1}",
    )


def _watch_send(
    ctx: BookingContext, row: Instance, flow: Flow, secrets: Mapping[str, str]
) -> str | None:
    key = row.key
    slot = _watch_slot(row, _now(ctx))
    if slot is None:
        _end_watch(ctx, key)
        return FAILED
    run = FlowRun(flow, slot, secrets, row.token_name, label=key, total=row.attempts)
    run.watching = True
    court = slot.courts[0]
    number = (row.watch_tries or 0) + 1
    if not ctx.sendable():
        instances.release(ctx.factory, key, fence=ctx.fence)
        return None
    for report in prepare_round(ctx.client, run).values():
        step = next(s for s in flow.steps if s.name == report.step)
        where = f"{_where(step, report.court)}: {report.problem}"
        busy = report.status is None or report.status == 429 or report.status >= 500
        if report.auth:
            reason = _credentials_reason(run, step, report.court, report.problem or "")
        elif report.final or not busy:
            reason = where
        else:
            return _watch_on(ctx, row, where, report.wait)
        return _finish(ctx, key, FAILED, f"watch, try {number}: {reason}", attempts=run.total)
    run.opened = ctx.clock()
    result = _one_court(ctx, run, row, court, {}, wired={})
    instances.record_attempt(ctx.factory, key, run.total, fence=ctx.fence)
    if result.kind == "booked":
        return _after_booking(ctx, run, row, court, result.ref)
    if result.kind == "stopped":
        instances.release(ctx.factory, key, fence=ctx.fence)
        return None
    if result.kind in ("taken", "missing", "busy", "spent"):
        return _watch_on(ctx, row, f"{_local_time(slot)}: {result.reason}", result.wait)
    reason = f"watch, try {number}: {result.reason}"
    return _finish(ctx, key, FAILED, reason, attempts=run.total)


def _watch_on(ctx: BookingContext, row: Instance, said: str, wait: float | None) -> str:
    """Another try after the interval (not sooner than ``wait``), or the end of the watch."""
    if instances.watch_again(
        ctx.factory, row.key, next_try=_next_try(ctx, wait), said=said, fence=ctx.fence
    ):
        logger.info("watch %s: %s; tried again later", row.key, said)
        return WATCHING
    _end_watch(ctx, row.key)
    return FAILED


def cancel_instance(
    factory: SessionFactory | None,
    fernet: MultiFernet,
    key: str,
    settings: Any,
    flow_of: Callable[[Any, str | None], tuple[Flow | None, str]],
) -> tuple[bool, str]:
    """``cancel KEY`` (CONTRACT 13): the instance's club cancels its booking, then it is
    ``cancelled`` and a ``Cancelled:`` message is sent. ``settings`` (the command's) give the
    database's URL, HTTP_TIMEOUT_SECONDS and the notifications; ``flow_of(settings, club)`` the
    flow a club cancels with and its name. Returns whether it was cancelled, and the line to
    print: what was done, or why not (then nothing changed, and nothing was sent when the
    instance cannot be cancelled)."""
    problem = (
        instances.cancel_problem(factory, key)
        if factory is not None
        else f"no database at {mask_url(settings.database_url)}"
    )
    if problem is not None or factory is None:
        return False, str(problem)
    row, token_row = instances.claimed(factory, key)
    flow, name = flow_of(settings, row.club)
    if flow is None or not flow.cancel:
        why = f'{name} has no "cancel" steps' if flow is not None else name
        return False, f"{key}: {why}; nothing was sent: cancel it with the club"
    secrets, problem = instances.token_secrets(token_row, fernet, name=row.token_name)
    if problem is None:
        client = ClubClient(timeout=settings.http_timeout)
        try:
            problem = cancel_booking(client, flow, row, secrets)
        finally:
            client.close()
    if problem is not None:
        return False, f"{key}: {problem}; it stays booked"
    cancelled = instances.cancelled_at_club(factory, key, datetime.now(UTC))
    try:
        notifier = Notifier(NotifySettings.from_env(settings.env))
    except NotifyConfigError as exc:
        logger.error("notifications: %s; the Cancelled: message is not sent", exc)
        notifier = Notifier(NotifySettings.from_env({}))
    notifier.start()
    notifier.notify(instances.outcome_of(cancelled))
    notifier.close()
    return True, f"cancelled at the club: {key} (ref {row.booking_ref})"


def cancel_booking(
    client: ClubClient,
    flow: Flow,
    row: Instance,
    secrets: Mapping[str, str],
) -> str | None:
    """Run the flow's ``cancel`` steps for the booked instance ``row`` (CONTRACT 13), in order,
    each once: ``{booking_ref}`` is its reference, its secrets, court, times and players are
    there as for booking. None when the last step succeeded, else what went wrong (secret-free,
    naming the step)."""
    for value in secrets.values():
        remember_secret(value)
    slot = _slot(row)
    court = row.booked_court if row.booked_court is not None else slot.courts[0]
    cancel = dataclasses.replace(flow, steps=flow.cancel)
    run = FlowRun(
        cancel, dataclasses.replace(slot, courts=(court,)), secrets, row.token_name, label=row.key
    )
    run.extra["booking_ref"] = row.booking_ref
    for step in flow.cancel:
        report = _plain_try(client, run, step, court)
        if report.problem is not None:
            if report.auth:
                return (
                    f"the club rejected the credentials at step {step.name!r} ({report.problem}): "
                    f"check token {row.token_name!r} in tokens.json"
                )
            return f"step {step.name!r}: {report.problem}"
    return None
