"""What every club mock shares: the HTTP server, the request record, slots, sessions and knobs.

A mock subclass names its ``system`` (the flow file ``data/clubs/<system>.json``), the real
``hosts`` that flow uses, and its ``routes``: ``(method, path regex, handler name)``. A handler
takes the ``Recorded`` request (and the regex's named groups) and returns an ``Answer``.
"""

from __future__ import annotations

import json
import re
import secrets
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

DEFAULT_EMAIL = "player@example.com"
DEFAULT_PASSWORD = "correct-horse-42"  # a test credential of the local mock
_MAX_BODY = 1 << 20


@dataclass(kw_only=True)
class Recorded:
    """One request as the mock received it, and the status it answered (None until answered).

    ``arrived`` is ``time.time()`` when the request's body had been read; header names are
    lower-case; ``query`` and ``cookies`` are as the client sent them.
    """

    arrived: float
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str] = field(repr=False)
    cookies: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    status: int | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str) -> str | None:
        """The query parameter's last value, or None."""
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.body.decode("utf-8"))

    def form(self) -> dict[str, str]:
        """The urlencoded body, one (the last) value per field."""
        parsed = parse_qs(self.body.decode("utf-8"), keep_blank_values=True)
        return {key: values[-1] for key, values in parsed.items()}

    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def bearer(self) -> str | None:
        """The token of an ``Authorization: Bearer`` header, or None."""
        scheme, _, token = (self.header("authorization") or "").partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass
class Answer:
    """What a handler answers."""

    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_answer(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Answer:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Answer(status, body, "application/json; charset=utf-8", headers or [])


def text_answer(
    status: int,
    text: str,
    content_type: str = "text/html; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
) -> Answer:
    return Answer(status, text.encode(), content_type, headers or [])


def redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Answer:
    return Answer(302, b"", None, [("Location", location), *(headers or [])])


def cookie(name: str, value: str, *, http_only: bool = True) -> tuple[str, str]:
    """A ``Set-Cookie`` header. Host-only and without ``Secure``: the mock speaks plain http on
    127.0.0.1, where a client would not send a Secure cookie back (the real ones are Secure)."""
    return ("Set-Cookie", f"{name}={value}; path=/" + ("; HttpOnly" if http_only else ""))


@dataclass(kw_only=True)
class Booking:
    """A booking the mock holds. ``start`` is UTC; ``status`` is in the system's own words
    (e.g. ``PENDING`` while a payment or confirmation is outstanding, then ``CONFIRMED``)."""

    id: str
    court: str
    start: datetime
    minutes: int
    user: str
    status: str
    created: float
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)


@dataclass
class Session:
    """A login the mock issued: a session cookie or a bearer token."""

    user: str
    expires_at: float | None
    expired: bool = False
    data: dict[str, Any] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ClubMock/1.0"
    disable_nagle_algorithm = True
    server: _Server

    def _serve(self) -> None:
        self.server.mock._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the mock records every request itself."""

    def version_string(self) -> str:
        return f"{self.server_version} {self.sys_version}".strip()

    def date_time_string(self, timestamp: float | None = None) -> str:
        """Every answer's ``Date`` (``send_response`` adds it), by the club's own clock: a mock
        made with ``clock`` running ahead of ours or behind it says so in its ``Date``, as a real
        club's server does (CONTRACT section 6, "The club's clock")."""
        moment = self.server.mock.now() if timestamp is None else timestamp
        return formatdate(moment, usegmt=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, mock: ClubMock) -> None:
        self.mock = mock
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def _parse_cookies(header: str | None) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            jar[name] = value
    return jar


class ClubMock:
    """A real system's booking server, on 127.0.0.1 and a free port.

    Knobs, the same for every system (each module says how its system answers them):

    - ``take(court, start, minutes)``: the slot is already taken by someone else;
    - ``opens_at``: an epoch (``time.time()`` scale); booking requests that arrive before it get
      the system's "not open yet" answer (None: always open);
    - ``password``: change it and the system refuses the login that ``tokens_entry()`` gives;
    - ``expire_sessions()``: every session or token issued so far has expired, so a later
      request with one gets the system's expired-login answer;
    - ``bookings``: what was booked (and its status), ``requests``: every request received.

    ``zone`` is the club's zone, for the local dates and times its API speaks. ``clock`` is the
    club's own clock (default ours): ``opens_at`` is read by it and every answer's ``Date``
    header says it, so ``clock=lambda: time.time() + 0.7`` is a club whose clock runs 0.7 s
    ahead of ours.
    """

    system: ClassVar[str]
    hosts: ClassVar[tuple[str, ...]]
    routes: ClassVar[tuple[tuple[str, str, str], ...]]

    def __init__(
        self,
        *,
        zone: str = "Europe/Paris",
        email: str = DEFAULT_EMAIL,
        password: str = DEFAULT_PASSWORD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.zone = ZoneInfo(zone)
        self.email = email
        self.password = password
        self.clock = clock
        self.opens_at: float | None = None
        self._lock = threading.RLock()
        self._requests: list[Recorded] = []
        self._bookings: list[Booking] = []
        self._taken: list[tuple[str, datetime, datetime]] = []
        self._sessions: dict[str, Session] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes = [
            (method, re.compile(pattern), getattr(self, name))
            for method, pattern, name in self.routes
        ]

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> ClubMock:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name=f"{self.system}-mock", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ClubMock:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"the {self.system} mock is not running")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: what replaces ``https://<host>`` in the flow's URLs."""
        return f"http://127.0.0.1:{self.port}"

    # -- what the tests read ----------------------------------------------------------------

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def requests_to(self, method: str, path_pattern: str) -> list[Recorded]:
        """The recorded requests with this method whose path fully matches the regex."""
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path)]

    @property
    def bookings(self) -> list[Booking]:
        with self._lock:
            return list(self._bookings)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def tokens_entry(self) -> dict[str, str]:
        """The object a user puts in ``tokens.json`` for this system (login and ids)."""
        raise NotImplementedError

    # -- knobs ------------------------------------------------------------------------------

    def take(self, court: str, start: datetime, minutes: int = 60) -> None:
        """Someone else holds ``court`` from ``start`` (aware) for ``minutes``."""
        begin = start.astimezone(UTC)
        with self._lock:
            self._taken.append((str(court), begin, begin + timedelta(minutes=minutes)))

    def expire_sessions(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.expired = True

    # -- for the subclasses -----------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    def window_open(self) -> bool:
        return self.opens_at is None or self.now() >= self.opens_at

    def credentials_ok(self, login: object, password: object) -> bool:
        return login == self.email and password == self.password

    def is_free(self, court: str, start: datetime, minutes: int) -> bool:
        begin = start.astimezone(UTC)
        end = begin + timedelta(minutes=minutes)
        with self._lock:
            for taken_court, taken_begin, taken_end in self._taken:
                if taken_court == str(court) and taken_begin < end and begin < taken_end:
                    return False
            for booking in self._bookings:
                if (
                    booking.court == str(court)
                    and booking.status != "CANCELED"
                    and booking.start < end
                    and begin < booking.end
                ):
                    return False
        return True

    def add_booking(self, *, start: datetime, **fields: Any) -> Booking:
        booking = Booking(created=self.now(), start=start.astimezone(UTC), **fields)
        with self._lock:
            self._bookings.append(booking)
        return booking

    def find_booking(self, booking_id: str) -> Booking | None:
        with self._lock:
            return next((b for b in self._bookings if b.id == booking_id), None)

    def new_session(self, user: str, ttl: float | None = None, **data: Any) -> str:
        token = secrets.token_hex(16)
        expires = None if ttl is None else self.now() + ttl
        with self._lock:
            self._sessions[token] = Session(user, expires, data=dict(data))
        return token

    def session_state(self, token: str | None) -> tuple[str, Session | None]:
        """``("missing"|"unknown"|"expired"|"ok", session)`` for a presented token or cookie."""
        if not token:
            return "missing", None
        with self._lock:
            session = self._sessions.get(token)
        if session is None:
            return "unknown", None
        if session.expired or (session.expires_at is not None and self.now() >= session.expires_at):
            return "expired", session
        return "ok", session

    def local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone)

    # -- serving ----------------------------------------------------------------------------

    def _serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(min(length, _MAX_BODY)) if length > 0 else b""
        split = urlsplit(handler.path)
        recorded = Recorded(
            arrived=time.time(),
            method=handler.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in handler.headers.items()},
            cookies=_parse_cookies(handler.headers.get("Cookie")),
            body=body,
        )
        with self._lock:
            self._requests.append(recorded)
            answer = self._dispatch(recorded)
            recorded.status = answer.status
        # An answer may name its own server (a CDN's block page says "CloudFront").
        server = next((v for n, v in answer.headers if n.lower() == "server"), None)
        if server is not None:
            handler.server_version, handler.sys_version = server, ""
        handler.send_response(answer.status)
        for name, value in answer.headers:
            if name.lower() != "server":
                handler.send_header(name, value)
        if answer.content_type:
            handler.send_header("Content-Type", answer.content_type)
        handler.send_header("Content-Length", str(len(answer.body)))
        handler.end_headers()
        handler.wfile.write(answer.body)

    def _dispatch(self, request: Recorded) -> Answer:
        allowed = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            return handler(request, **match.groupdict())
        if allowed:
            return self.method_not_allowed(request, allowed)
        return self.not_found(request)

    def not_found(self, request: Recorded) -> Answer:
        return text_answer(404, "Not Found", "text/plain; charset=utf-8")

    def method_not_allowed(self, request: Recorded, allowed: list[str]) -> Answer:
        return text_answer(
            405, "Method Not Allowed", "text/plain; charset=utf-8", [("Allow", ", ".join(allowed))]
        )


def iter_half_hours(day_start: datetime, first_hour: int, last_hour: int) -> Iterator[datetime]:
    """Every :00 and :30 from ``first_hour`` to before ``last_hour`` on ``day_start``'s day."""
    moment = day_start.replace(hour=first_hour, minute=0, second=0, microsecond=0)
    while moment.hour < last_hour:
        yield moment
        moment += timedelta(minutes=30)


def new_id() -> str:
    """A fresh UUID-shaped id, as most of these systems use."""
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-4{raw[13:16]}-a{raw[17:20]}-{raw[20:32]}"
