"""Booking one instance against the club's API (CONTRACT sections 6 and 7).

``book_slot(key, ctx)`` claims the instance (``pending`` -> ``booking``, committed before any
request leaves), opens the connection to the club ahead of the trigger, waits out the last
moment precisely, sends, and applies the answer table: next court on 409, retries with backoff
on 425/429/5xx/timeouts, a final status with a reason a person can act on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import requests
from cryptography.fernet import MultiFernet
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

import instances
import utils
from models import (
    BOOKED,
    EXPIRED,
    FAILED,
    PENDING,
    DatabaseError,
    Instance,
    SessionFactory,
    error_text,
)
from notify import Outcome
from template import RenderedRequest, RequestTemplate, Slot, default_template, render_request

logger = logging.getLogger(__name__)

MAX_ATTEMPTS_PER_COURT = 3
MAX_BODY_BYTES = 1024 * 1024
#: Wake this long before the trigger and spin for the rest (sleep granularity is ~1 ms).
SPIN_SECONDS = 0.003
#: A wait for the trigger looks at the wall clock at least this often: a clock that jumps
#: forward during the wait is noticed within this time, not at the end of the old wait.
MAX_NAP_SECONDS = 0.5
USER_AGENT = "courtbot/1.0"
#: A club's booking id is kept to this many characters (after secrets and controls are gone).
MAX_REF_CHARS = 200
#: Ends the reason of a booking that failed because every court tried was taken.
TAKEN_ADVICE = (
    "every court tried was taken, so a retry would be too: book another court with the club, "
    'and give the entry a list of courts to try in order (e.g. "court_id": ["3", "4"])'
)


class BookingError(Exception):
    """A request that got no usable answer. ``permanent`` errors are not retried."""

    def __init__(self, message: str, *, permanent: bool = False, lost: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        #: The request may have reached the club (its answer was lost).
        self.lost = lost


@dataclass(frozen=True)
class Answer:
    """What the club said to one request."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    latency_ms: float

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


#: One request to send: already rendered, token included (never logged).
RequestSpec = RenderedRequest


@dataclass(frozen=True)
class Verdict:
    """How an answer reads: booked, taken, auth (token rejected), rejected, or retry."""

    kind: str
    booking_ref: str | None = None


@dataclass(frozen=True)
class HeldConnection:
    """An open connection kept aside for one booking until its trigger."""

    pool: Any
    conn: Any


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


# --------------------------------------------------------------------------- deadlines

#: The deadline of the request under way in this thread (set by ``ClubClient``).
_request = threading.local()


class _Deadline:
    """The end of one request (CONTRACT section 6: ``HTTP_TIMEOUT_SECONDS`` bounds it whole).

    requests and urllib3 bound each socket read, not the request: a club that sends one header
    line a second, or ``100 Continue`` for ever, never trips a read timeout. When the deadline
    passes, the watchdog shuts the request's TCP connection down, which ends the blocked read
    (an EOF or an error) in the booking's thread; ``expired`` tells that thread why. Each socket
    is watched through a duplicate of its descriptor, closed when the request ends, so the
    watchdog never touches a socket that urllib3 may close or hand to another request. The
    watchdog hears of a deadline only once a socket is watched: for a reused connection, just
    after the request's bytes left, so that none of this work sits before them.
    """

    def __init__(self, at: float) -> None:
        self.at = at  # time.monotonic()
        self.expired = False
        self._done = False
        self._lock = threading.Lock()
        self._twins: list[socket.socket] = []

    def watch(self, sock: socket.socket) -> None:
        try:
            twin = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return
        with self._lock:
            done, first = self._done, not self._twins
            if not done:
                self._twins.append(twin)
                if self.expired:
                    _shut(twin)
        if done:
            twin.close()
        elif first:
            _WATCHDOG.add(self)

    def expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for twin in self._twins:
                _shut(twin)

    def close(self) -> None:
        with self._lock:
            self._done = True
            twins, self._twins = self._twins, []
        for twin in twins:
            twin.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for the process that expires deadlines as they pass; it sleeps while none is
    pending, and is told only when a new deadline comes before every other."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            first = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if first:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                due: list[_Deadline] = []
                while not due:
                    now = time.monotonic()
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[2])
                    if not due:
                        self._cond.wait(self._heap[0][0] - now if self._heap else None)
            for deadline in due:
                deadline.expire()


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[_Deadline]:
    """Bound what runs inside to ``seconds``: sockets opened or used for it are shut down then."""
    deadline = _Deadline(time.monotonic() + seconds)
    _request.deadline = deadline
    try:
        yield deadline
    finally:
        _request.deadline = None
        deadline.close()


def _watch(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_request, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedConnection(HTTPConnection):
    """A connection whose socket the request's deadline watches: from its creation (the TCP
    and TLS handshakes) when it is new, from the wait for the answer on when it is reused (a
    request's few bytes leave at once; what can be held is the answer)."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def getresponse(self) -> Any:
        _watch(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class _WatchedPool(HTTPConnectionPool):
    ConnectionCls = _WatchedConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _WatchedPool, "https": _WatchedHTTPSPool}


# --------------------------------------------------------------------------- secrets

#: The secrets of the booking under way in this thread (``book_slot`` sets it).
_booking = threading.local()


def remember_secret(value: str) -> None:
    """Count ``value`` among the secrets of the booking under way in this thread: it is scrubbed
    from every exception text, reason and booking reference of that booking."""
    secrets: set[str] | None = getattr(_booking, "secrets", None)
    if secrets is not None and value:
        secrets.add(value)


def _secret_forms(secret: str) -> set[str]:
    """How a secret shows in text: as is, escaped as Python and JSON write it (an exception
    quoting a header value uses repr), percent-encoded."""
    return {
        secret,
        repr(secret)[1:-1],
        json.dumps(secret)[1:-1],
        quote(secret, safe=""),
        quote_plus(secret),
    } - {""}


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every form of ``secrets`` and of the current booking's secrets as ``***``."""
    known: set[str] = set(getattr(_booking, "secrets", None) or ())
    forms = {form for secret in (*known, *secrets) if secret for form in _secret_forms(secret)}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def safe_ref(ref: str | None) -> str | None:
    """A club's booking id fit for the database, a log line and an email: every secret of the
    booking scrubbed (also one split by control characters), control characters removed, at
    most ``MAX_REF_CHARS`` characters. None when nothing is left."""
    if ref is None:
        return None
    cleaned = scrub(utils.CONTROL_RE.sub("", scrub(ref))).strip()
    return cleaned[:MAX_REF_CHARS] or None


def _scrubbed_traceback(exc: BaseException) -> str:
    """An unexpected error's traceback with the booking's secrets scrubbed: exception texts can
    quote header values (requests' InvalidHeader quotes the whole Authorization header)."""
    return scrub("".join(traceback.format_exception(exc)).rstrip())


# --------------------------------------------------------------------------- the club


class ClubClient:
    """One ``requests.Session`` for the club, with connections opened ahead of triggers."""

    def __init__(self, *, timeout: float, pool_size: int = 128) -> None:
        self.timeout = timeout
        self.session = requests.Session()
        # No proxies or .netrc from the environment: a .netrc could replace our Authorization
        # header, and looking them up costs time at the moment that matters.
        self.session.trust_env = False
        adapter = _WatchedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def warm(self, url: str) -> HeldConnection | None:
        """Open a connection to ``url``'s host, sending nothing on it, and keep it aside for one
        request (``release`` it just before sending): a burst of bookings then has one ready
        connection each. A club sees no request from this, only the TCP (and TLS) handshake it
        would see at the trigger anyway. None when no connection could be opened (the send will
        open one and report any error)."""
        try:
            request = requests.Request("POST", url).prepare()
            adapter = self.session.get_adapter(url)
            assert isinstance(adapter, HTTPAdapter)
            pool = adapter.get_connection_with_tls_context(request, verify=True)
            conn = pool._get_conn(timeout=0.1)  # urllib3 has no public "pre-connect"
            try:
                if conn.sock is None:
                    # Bounded whole: the TCP connect by the timeout, and CPython bounds a TLS
                    # handshake whole by the socket's timeout too.
                    conn.timeout = self.timeout
                    conn.connect()
            except Exception:
                conn.close()
                pool._put_conn(conn)
                raise
        except Exception as exc:  # noqa: BLE001 (warming is an optimisation; the send reports)
            # The class only: an error's text may quote the URL, which may hold a secret.
            logger.debug("could not open a connection ahead to %s: %s", _host(url), _kind(exc))
            return None
        return HeldConnection(pool, conn)

    @staticmethod
    def release(held: object) -> None:
        """Give a connection from ``warm`` back to the pool, where the next send takes it."""
        if isinstance(held, HeldConnection):
            held.pool._put_conn(held.conn)

    def prepare(self, spec: RequestSpec) -> requests.PreparedRequest:
        """The request, fully built (headers merged, body encoded) ahead of its trigger."""
        return self.session.prepare_request(
            requests.Request(spec.method, spec.url, headers=dict(spec.headers), data=spec.body)
        )

    def send(self, spec: RequestSpec | requests.PreparedRequest) -> Answer:
        """Send one request, never following a redirect, reading at most 1 MiB of the answer.

        ``timeout`` bounds the whole request, from the send to the answer's last byte: an
        answer whose status line and headers are not in by then is a timeout; a body still
        coming then is cut there (the status says what the club did). Raises BookingError when
        no answer came (timeout, refused, reset, an untrusted certificate: ``permanent``).
        """
        prepared = self.prepare(spec) if isinstance(spec, RequestSpec) else spec
        started = time.perf_counter()
        with _deadline(self.timeout) as deadline:
            try:
                response = self.session.send(
                    prepared, timeout=self.timeout, allow_redirects=False, stream=True
                )
            except requests.Timeout:
                raise self._timed_out() from None
            except requests.ConnectionError as exc:
                if deadline.expired:
                    raise self._timed_out() from None
                raise _connection_error(exc) from None
            except requests.RequestException as exc:
                raise BookingError(f"request failed ({exc.__class__.__name__})") from None
            try:
                if deadline.expired:
                    # Cut while its headers came: http.client reads the EOF as their end.
                    raise self._timed_out()
                body = self._read_body(response, deadline=started + self.timeout)
            finally:
                response.close()
        latency = (time.perf_counter() - started) * 1000
        return Answer(response.status_code, dict(response.headers), body, latency)

    def _timed_out(self) -> BookingError:
        return BookingError(f"no answer within {self.timeout:g} s", lost=True)

    @staticmethod
    def _read_body(response: requests.Response, *, deadline: float) -> bytes:
        """At most 1 MiB of the answer's body, read until ``deadline`` (perf_counter; the
        request's deadline also shuts a read blocked past it down): the timeout bounds the
        whole answer, not each read, so a club dribbling bytes cannot hold a booking (or a
        shutdown) for longer. A body cut short is kept as far as it came: the status line
        arrived, so the club did answer."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size < MAX_BODY_BYTES and time.perf_counter() < deadline:
                chunk = response.raw.read1(min(65536, MAX_BODY_BYTES - size), decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except Exception as exc:  # noqa: BLE001 (urllib3 raises several kinds mid-body)
            logger.debug("answer body broke off: %s", exc.__class__.__name__)
        return b"".join(chunks)

    def close(self) -> None:
        self.session.close()


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _kind(exc: BaseException) -> str:
    return exc.__class__.__name__


def _connection_error(exc: requests.ConnectionError) -> BookingError:
    """What a connection error means for the booking; an untrusted certificate cannot get
    better by retrying, so it is permanent."""
    problem = _certificate_problem(exc)
    if problem is not None:
        return BookingError(
            f"the club's certificate is not trusted ({problem}); not retried: check the host in "
            "the booking URL, or ask the club to fix its certificate",
            permanent=True,
        )
    return BookingError(_connection_reason(exc), lost=_maybe_sent(exc))


def _certificate_problem(exc: BaseException) -> str | None:
    """OpenSSL's reason when ``exc`` comes from a certificate that failed verification."""
    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return str(current.verify_message or current.reason or "verification failed")
        linked = [*current.args, getattr(current, "reason", None), current.__cause__]
        stack.extend(item for item in linked if isinstance(item, BaseException))
    return None


def _connection_reason(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text or "ECONNREFUSED" in text:
        return "connection refused by the club's server"
    if "reset" in text.lower() or "RemoteDisconnected" in text or "aborted" in text.lower():
        return "the club's server closed the connection without a full answer"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "the club's host name could not be resolved (check BOOKING_API_URL)"
    return f"connection error ({exc.__class__.__name__})"


def _maybe_sent(exc: Exception) -> bool:
    text = str(exc)
    return not ("Connection refused" in text or "Name or service not known" in text)


# --------------------------------------------------------------------------- answers


def classify(answer: Answer, template: RequestTemplate | None = None) -> Verdict:
    """Read an answer: the template's matchers first (taken, rejected, booked), then the table
    of CONTRACT section 6."""
    matched = template.match(answer.status, answer.body) if template is not None else None
    if matched == "booked" or (matched is None and 200 <= answer.status < 300):
        body = answer.json()
        ref = template.booking_ref(body) if template is not None else None
        return Verdict("booked", ref if ref is not None else _default_ref(body))
    if matched is not None:
        return Verdict(matched)
    status = answer.status
    if status == 409:
        return Verdict("taken")
    if status in (401, 403):
        return Verdict("auth")
    if status in (425, 429) or 500 <= status < 600:
        return Verdict("retry")
    return Verdict("rejected")


def _default_ref(body: Any) -> str | None:
    if isinstance(body, dict):
        for name in ("id", "booking_id"):
            value = body.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool):
                return str(value)
    return None


def _club_says(answer: Answer, secrets: Iterable[str]) -> str:
    """A short, secret-free reading of an error answer for a person."""
    text = f"HTTP {answer.status}"
    body = answer.json()
    if isinstance(body, dict):
        for name in ("error", "message", "detail", "reason"):
            value = body.get(name)
            if isinstance(value, str) and value.strip():
                # Scrub before cutting: a cut through a secret would let its start through.
                snippet = scrub(value.strip(), secrets)
                return f"{text}: {snippet[:200]}"
    return text


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
    #: BOOKING_REQUEST_TEMPLATE (CONTRACT section 11); None: the request of section 6.
    template: RequestTemplate | None = None
    #: The club files by club name (CONTRACT section 3), as the last load left them: a club
    #: file that became invalid keeps its last good flow here.
    clubs: dict[str, RequestTemplate] = field(default_factory=dict)
    on_booked: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.time
    gate: TriggerGate = field(default_factory=TriggerGate)
    in_flight: set[str] = field(default_factory=set)
    in_flight_lock: threading.Lock = field(default_factory=threading.Lock)
    #: When each booking under way sent its first booking request (``clock()``), for its outcome.
    first_sent: dict[str, float] = field(default_factory=dict)
    owner: str | None = None
    may_send: threading.Event = field(default_factory=_set_event)

    @property
    def request_template(self) -> RequestTemplate:
        """The template requests are rendered from (section 6's own when none is set)."""
        if self.template is not None:
            return self.template
        assert self.api_url is not None, "BOOKING_API_URL or a template with a url is needed"
        if self._default is None or self._default[0] != self.api_url:
            self._default = (self.api_url, default_template(self.api_url))
        return self._default[1]

    _default: tuple[str, RequestTemplate] | None = field(default=None, init=False, repr=False)

    def flow_for(self, club: str | None) -> RequestTemplate:
        """What an instance of ``club`` books with: its club file, or for None the template
        (section 6's request when none is set). KeyError for a club no valid file was ever
        loaded for."""
        if club is None:
            return self.request_template
        return self.clubs[club]


def book_slot(key: str, ctx: BookingContext) -> str | None:
    """Book the instance ``key``; returns its final status, or None when there was nothing to
    do (not pending, already under way here) or a shutdown put it back to ``pending``."""
    with ctx.in_flight_lock:
        if key in ctx.in_flight:
            return None
        ctx.in_flight.add(key)
    _booking.secrets = set()
    try:
        return _book(key, ctx)
    except Exception as exc:  # noqa: BLE001 (logged, scrubbed, and the instance marked)
        # Not logger.exception: the traceback's exception texts may quote a secret.
        if not ctx.may_send.is_set():
            # Most likely the database connection that cost the active role: the claim stays
            # this daemon's, which puts it back once it reaches the database again.
            logger.error(
                "booking %s: error after this daemon lost the active role: %s",
                key,
                _scrubbed_traceback(exc),
            )
            return None
        logger.error("booking %s: unexpected error: %s", key, _scrubbed_traceback(exc))
        _finish(ctx, key, FAILED, "internal error while booking (see the log); not retried")
        return FAILED
    finally:
        _booking.secrets = None
        with ctx.in_flight_lock:
            ctx.in_flight.discard(key)
            ctx.first_sent.pop(key, None)


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
    if not ctx.may_send.is_set() or not _claim(ctx, key, now):
        return None
    row, token_row = instances.claimed(ctx.factory, key)
    try:
        template = ctx.flow_for(row.club)
    except KeyError:
        return _finish(ctx, key, FAILED, _club_missing(row.club))
    secrets, token_problem = instances.token_secrets(token_row, ctx.fernet, name=row.token_name)
    if token_problem is None and "token" not in secrets:
        token_problem = (
            f"token {row.token_name!r} in tokens.json has no 'token' field, which the request "
            "sends as {token}: add it there and reload"
        )
    for value in secrets.values():
        remember_secret(value)
    if token_problem is None and any(utils.CONTROL_RE.search(v) for v in secrets.values()):
        # A header cannot carry it (and requests' error would quote it): never sent.
        token_problem = (
            f"token {row.token_name!r} holds a control character (a line break, tab, ...): put "
            "the token in tokens.json as one line and reload"
        )
    if token_problem is not None:
        return _finish(ctx, key, FAILED, token_problem)
    slot = _slot(row)
    # Everything is rendered before the trigger: only the send is left for the moment itself.
    prepared = [
        (court, ctx.client.prepare(_request(template, slot, secrets["token"], court)))
        for court in slot.courts
    ]
    trigger = row.trigger_time.timestamp()
    held = None
    if ctx.clock() < trigger - 0.05 and prepared[0][1].url:
        held = ctx.client.warm(prepared[0][1].url)
    try:
        if not ctx.gate.wait(ctx, trigger):
            instances.release(ctx.factory, key)
            if ctx.may_send.is_set():
                logger.info("booking %s: shutting down before its trigger; left pending", key)
            else:
                logger.warning("booking %s: %s; nothing was sent", key, NOT_ACTIVE)
            return None
    finally:
        ctx.client.release(held)
    return _attempt_courts(ctx, row, template, secrets, prepared)


def _club_missing(club: str | None) -> str:
    return (
        f"club {club!r}: its file (DATA_DIR/clubs/{club}.json) is missing or invalid and no "
        "good version of it was loaded: fix it (`python main.py check` names the error), "
        "reload, then `python main.py retry` this booking"
    )


def _claim(ctx: BookingContext, key: str, now: datetime) -> bool:
    """pending -> booking; False when another claimant has it, or when the database cannot be
    written (a full disk): nothing was sent, it stays pending, and the daemon's watchdog has it
    booked once writes work again."""
    try:
        return instances.claim(ctx.factory, key, now, owner=ctx.owner)
    except DatabaseError as exc:
        logger.error(
            "booking %s: not started, the database cannot be written (%s); it stays pending",
            key,
            error_text(exc),
        )
        return False


def _slot(row: Instance) -> Slot:
    """What the instance's requests are rendered from."""
    return Slot(
        key=row.key,
        start=row.desired_time,
        duration_minutes=row.duration_minutes,
        zone=utils.get_zone(row.timezone),
        courts=tuple(json.loads(row.courts)),
    )


def _request(template: RequestTemplate, slot: Slot, token: str, court: str | None) -> RequestSpec:
    """The request for one instance and court, with its Idempotency-Key."""
    rendered = render_request(template, slot, token=token, court=court)
    headers = {"User-Agent": USER_AGENT, **rendered.headers}
    return RequestSpec(rendered.method, rendered.url, headers, rendered.body)


def _wait_until(ctx: BookingContext, target: float) -> bool:
    """Sleep until ``target`` (epoch seconds), never returning early; False if asked to stop.

    Sleeps until just before, then spins: the request must leave as close after the trigger as
    the machine allows, and never before it.
    """
    while True:
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


@dataclass
class _CourtTry:
    court: str | None
    attempts: int = 0
    lost: bool = False
    last: str = ""


def _attempt_courts(
    ctx: BookingContext,
    row: Instance,
    template: RequestTemplate,
    secrets: Mapping[str, str],
    requests_by_court: list[tuple[str | None, requests.PreparedRequest]],
) -> str | None:
    reasons: list[str] = []
    total = row.attempts
    all_taken, maybe_ours = True, False
    # A booking cut off by a crash may have reached the club before: its 409 may be our own.
    resumed = row.interrupted
    # Whether a request of this booking may have reached the club unanswered (any court).
    maybe_sent = resumed
    for court, spec in requests_by_court:
        attempt = _CourtTry(court, lost=resumed)
        delays = utils.backoff_delays(ctx.retry_base, MAX_ATTEMPTS_PER_COURT)
        while attempt.attempts < MAX_ATTEMPTS_PER_COURT:
            if not ctx.may_send.is_set():
                return _hand_over(ctx, row.key, total, sent=maybe_sent or attempt.lost)
            attempt.attempts += 1
            # Counted in the database with the answer, not before the send: a commit here
            # would sit between the trigger and the request.
            total += 1
            verdict, wait, note = _one_request(
                ctx, row, spec, attempt, template=template, secrets=secrets
            )
            maybe_sent = maybe_sent or attempt.lost
            court_name = court if court is not None else "any"
            if verdict == "booked":
                return _finish(
                    ctx,
                    row.key,
                    BOOKED,
                    None,
                    booking_ref=note or None,
                    court=court,
                    attempts=total,
                )
            if verdict in ("auth", "rejected"):
                return _finish(ctx, row.key, FAILED, attempt.last, attempts=total)
            if verdict == "taken":
                reason = f"court {court_name}: taken ({attempt.last})"
                if attempt.lost:
                    maybe_ours = True
                    reason += (
                        "; an earlier attempt on this court got no answer, so it may be taken "
                        "by our own earlier attempt: check your bookings at the club"
                    )
                reasons.append(reason)
                break
            # retry
            if attempt.attempts >= MAX_ATTEMPTS_PER_COURT:
                all_taken = False
                reasons.append(
                    f"court {court_name}: no booking after {attempt.attempts} attempts "
                    f"(last: {attempt.last})"
                )
                break
            delay = wait if wait is not None else delays[attempt.attempts - 1]
            if _now(ctx) + timedelta(seconds=delay) >= row.desired_time:
                reasons.append(f"court {court_name}: {attempt.last}; the start came first")
                return _finish(ctx, row.key, FAILED, "; ".join(reasons), attempts=total)
            instances.record_attempt(ctx.factory, row.key, total, _first_sent(ctx, row.key))
            if ctx.stop.wait(delay):
                if not ctx.may_send.is_set():
                    return _hand_over(ctx, row.key, total, sent=maybe_sent or attempt.lost)
                instances.release(ctx.factory, row.key)
                logger.info("booking %s: shutting down between retries; back to pending", row.key)
                return None
    if reasons and all_taken and not maybe_ours:
        # A retry would be taken too: the advice is another court, not another try.
        reasons.append(TAKEN_ADVICE)
    reason = "; ".join(reasons) or "no court could be booked"
    taken = bool(reasons) and all_taken
    return _finish(ctx, row.key, FAILED, reason, attempts=total, retry_helps=not taken)


#: Why a booking stops short when its daemon lost the active role (CONTRACT section 10).
NOT_ACTIVE = (
    "this daemon is no longer the active one; back to pending for the active daemon, with the "
    "same Idempotency-Key"
)


def _hand_over(ctx: BookingContext, key: str, attempts: int, *, sent: bool) -> None:
    """A booking whose daemon lost the active role before its next request: back to pending,
    its requests so far counted, marked ``interrupted`` when one may have reached the club."""
    instances.record_attempt(ctx.factory, key, attempts)
    instances.release(ctx.factory, key, sent=sent)
    logger.warning("booking %s: %s", key, NOT_ACTIVE)


def _one_request(
    ctx: BookingContext,
    row: Instance,
    spec: requests.PreparedRequest,
    attempt: _CourtTry,
    *,
    template: RequestTemplate,
    secrets: Mapping[str, str],
) -> tuple[str, float | None, str | None]:
    """Send once. Returns (verdict kind, wait before the next try or None, booking ref)."""
    court = attempt.court if attempt.court is not None else "any"
    ctx.first_sent.setdefault(row.key, ctx.clock())
    try:
        answer = ctx.client.send(spec)
    except BookingError as exc:
        attempt.lost = attempt.lost or exc.lost
        attempt.last = str(exc)
        logger.info("attempt %s court=%s #%d: %s", row.key, court, attempt.attempts, attempt.last)
        return ("rejected" if exc.permanent else "retry"), None, None
    verdict = classify(answer, template)
    logger.info(
        "attempt %s court=%s #%d: HTTP %d in %.0f ms -> %s",
        row.key,
        court,
        attempt.attempts,
        answer.status,
        answer.latency_ms,
        verdict.kind,
    )
    says = _club_says(answer, secrets.values())
    if verdict.kind == "auth":
        attempt.last = (
            f"the club rejected token {row.token_name!r} ({says}): put a valid token in "
            "tokens.json, reload, then `python main.py retry` this booking"
        )
    elif verdict.kind == "rejected":
        if 300 <= answer.status < 400:
            location = answer.headers.get("Location", "")
            attempt.last = (
                f"the club answered with a redirect ({says}"
                f"{' to ' + _host(location) if location else ''}); redirects are never "
                "followed so the token stays with the configured host: check the booking URL"
            )
        else:
            attempt.last = f"the club refused the request ({says}): check the entry and the URL"
    else:
        attempt.last = says
    wait = None
    if verdict.kind == "retry":
        wait = utils.parse_retry_after(answer.headers.get("Retry-After"), _now(ctx))
    return verdict.kind, wait, verdict.booking_ref


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
) -> str:
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
    )
    ctx.notify(outcome)
    if status == BOOKED and ctx.on_booked is not None:
        ctx.on_booked(outcome.schedule_id)
    return status
