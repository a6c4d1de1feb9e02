"""The sandbox club: a small, realistic fake of a club's booking server.

It speaks the booking API of CONTRACT section 6 (``shape="default"``) or one of three other
clubs' APIs that the request templates of section 11 target (``"path-form"``, ``"json-local"``,
``"taken-200"``; see ``data/templates/``). It checks the bearer token, the booking window by its
own clock, taken slots and ``Idempotency-Key`` replays, records every request it sees, and can be
told to misbehave (``fault``) so that end-to-end tests, ``make demo`` and the benchmark can watch
the daemon cope.

Use it in-process::

    with SandboxClub(tokens=("t0k",), window_seconds=3600) as club:
        ...  # point BOOKING_API_URL at club.url
        club.wait_for_requests(1)
        assert club.bookings_per_key()[key] == 1

or as a CLI: ``python tools/sandbox_club.py --port 8080 --token sandbox-token``.

Standard library only, so the tests and the demo need nothing beyond requirements.txt.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import email.utils
import json
import logging
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_COURTS: tuple[str, ...] = ("1", "2", "3", "4")
SHAPES: tuple[str, ...] = ("default", "path-form", "json-local", "taken-200")
FAULT_KINDS: tuple[str, ...] = ("status", "hang", "reset", "close", "huge", "nonjson", "redirect")
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "data" / "templates"
TEMPLATE_HOST = "https://club.example"

_MAX_BODY = 1 << 20
_CHUNK = 64 * 1024
_STOP_JOIN_SECONDS = 2.0
_RESET_PAUSE_SECONDS = 0.05
_UTC_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HHMM = re.compile(r"\d{2}:\d{2}")

# Which keyword arguments each fault takes, with their defaults. `book=True` means the club
# first processes the request as usual (so a booking may be created) and only then misbehaves:
# the "answer lost after the booking was made" case that Idempotency-Key exists for.
_FAULT_DEFAULTS: dict[str, dict[str, Any]] = {
    "status": {
        "status": 503,
        "retry_after": None,
        "body": None,
        "content_type": None,
        "book": False,
    },
    "hang": {"seconds": 30.0, "book": False},
    "reset": {"status": 201, "book": True},
    "close": {"book": False},
    "huge": {"size": 50 * 1024 * 1024, "book": True},
    "nonjson": {"body": None, "book": True},
    "redirect": {"url": None, "status": 302, "book": False},
}


@dataclass(kw_only=True)
class ReceivedRequest:
    """One request as the club saw it, and what it answered.

    ``arrived`` is ``time.time()`` when the club started processing the request (after any
    connection cost); ``club_time`` is the same instant on the club's own clock
    (``arrived + clock_offset``), the one the window is judged by. ``status`` is the status line
    the club sent (None when it sent none: a ``close`` fault, or a hang cut short by ``stop()``);
    ``done`` turns true just before the answer's first byte leaves, so a client that has an
    answer always sees its record complete.
    """

    arrived: float
    club_time: float
    method: str
    path: str
    headers: dict[str, str] = field(repr=False)
    body: bytes = field(repr=False)
    token: str | None = field(repr=False)
    idempotency_key: str | None
    court_id: str | None = None
    start: str | None = None
    start_at: datetime | None = None
    opens_at: float | None = None
    status: int | None = None
    new_connection: bool = False
    connection_id: int = 0
    #: When the club accepted the connection this request came on (``time.time()``).
    connection_opened: float = 0.0
    fault: str | None = None
    booking_id: str | None = None
    done: bool = False
    finished: bool = False
    sent: int = 0

    @property
    def late_ms(self) -> float | None:
        """Milliseconds between the window opening and this request's arrival, by the club's
        clock (negative: early), or None when the request named no parsable start."""
        if self.opens_at is None:
            return None
        return (self.club_time - self.opens_at) * 1000.0


@dataclass(frozen=True, kw_only=True)
class Booking:
    """A booking the club created in answer to a request."""

    id: str
    court_id: str
    start: str
    start_at: datetime
    duration_minutes: int
    idempotency_key: str | None
    token: str | None = field(repr=False)
    created: float


@dataclass(frozen=True)
class _Slot:
    """What a booking request asks for, whatever the shape it came in."""

    court_id: str | None
    start_at: datetime
    start_text: str
    duration_minutes: int
    local: datetime


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    booking_id: str | None = None


@dataclass
class _Fault:
    kind: str
    remaining: int
    options: dict[str, Any]


@dataclass
class _Connection:
    id: int
    sock: socket.socket
    accepted: float
    requests: int = 0
    aborted: bool = False
    thread: threading.Thread | None = None


@dataclass
class _Stored:
    """An answer kept for replay under its (token, Idempotency-Key)."""

    requested_court: str | None
    start_at: datetime
    answer: _Answer


class _ClientError(ValueError):
    """A request the club refuses before looking at slots: bad body, wrong content type."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(status: int, payload: object, **extra: Any) -> _Answer:
    return _Answer(status=status, body=json.dumps(payload).encode(), **extra)


def _iso_utc(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    spec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def _json_object(body: bytes, headers: Message) -> dict[str, Any]:
    ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise _ClientError(415, "Content-Type must be application/json")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _ClientError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _ClientError(400, "body must be a JSON object")
    return data


def _require(data: Mapping[str, Any], key: str) -> Any:
    if key not in data:
        raise _ClientError(400, f"{key}: missing")
    return data[key]


def _court(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _ClientError(400, f"{key}: expected a non-empty string or null, got {value!r}")
    return value


def _minutes(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _ClientError(400, f"{key}: expected a positive integer, got {value!r}")
    return value


def _aware(value: Any, key: str) -> datetime:
    if not isinstance(value, str):
        raise _ClientError(400, f"{key}: expected an ISO 8601 string, got {value!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _ClientError(400, f"{key}: {value!r} is not an ISO 8601 date-time") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _ClientError(400, f"{key}: {value!r} has no UTC offset")
    return moment


def _local(date_text: Any, time_text: Any, zone: ZoneInfo, keys: tuple[str, str]) -> datetime:
    if not isinstance(date_text, str) or not _DATE.fullmatch(date_text):
        raise _ClientError(400, f"{keys[0]}: expected YYYY-MM-DD, got {date_text!r}")
    if not isinstance(time_text, str) or not _HHMM.fullmatch(time_text):
        raise _ClientError(400, f"{keys[1]}: expected HH:MM, got {time_text!r}")
    try:
        naive = datetime.fromisoformat(f"{date_text}T{time_text}")
    except ValueError:
        raise _ClientError(400, f"{keys[0]}/{keys[1]}: no such date or time") from None
    return naive.replace(tzinfo=zone)


def _slot_from_local(court: str | None, local: datetime, minutes: int) -> _Slot:
    start_at = local.astimezone(UTC)
    # Written back with the zone's actual offset at that instant, as section 6 writes it.
    text = start_at.astimezone(local.tzinfo).isoformat()
    return _Slot(court, start_at, text, minutes, start_at.astimezone(local.tzinfo))


class _Shape:
    """One club API: where it listens, how it authenticates, parses and answers."""

    name = "default"
    endpoint = "/bookings"
    path_pattern = re.compile(r"/bookings")
    auth_header = "Authorization"
    idempotency_header = "Idempotency-Key"
    bad_request_status: int | None = None

    def token(self, headers: Message) -> str | None:
        """The token the request presents, or None."""
        value = headers.get(self.auth_header)
        if value is None:
            return None
        if self.auth_header.lower() == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                return None
            return credentials.strip()
        return value.strip() or None

    def parse(self, params: dict[str, str], headers: Message, body: bytes, zone: ZoneInfo) -> _Slot:
        """The slot a booking request asks for; raises _ClientError when malformed."""
        data = _json_object(body, headers)
        court = _court(_require(data, "court_id"), "court_id")
        start = _aware(_require(data, "start"), "start")
        end = _aware(_require(data, "end"), "end")
        minutes = _minutes(_require(data, "duration_minutes"), "duration_minutes")
        if end - start != timedelta(minutes=minutes):
            raise _ClientError(400, "end: must be start + duration_minutes")
        return _Slot(court, start.astimezone(UTC), data["start"], minutes, start)

    def created(self, booking: Booking, slot: _Slot) -> _Answer:
        """The answer to a request that created a booking."""
        body = {"id": booking.id, "court_id": booking.court_id, "start": booking.start}
        return _json(201, body, booking_id=booking.id)

    def taken(self) -> _Answer:
        """The answer when the requested court (or every court) is taken."""
        return _json(409, {"error": "court already booked"})

    def bad_request(self, error: _ClientError) -> _Answer:
        """The answer to a malformed request."""
        return _json(self.bad_request_status or error.status, {"error": error.message})


class _PathFormShape(_Shape):
    name = "path-form"
    endpoint = "/v2/courts/{court_id}/reservations"
    path_pattern = re.compile(r"/v2/courts/(?P<court_id>[^/]+)/reservations")

    def parse(self, params: dict[str, str], headers: Message, body: bytes, zone: ZoneInfo) -> _Slot:
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise _ClientError(415, "Content-Type must be application/x-www-form-urlencoded")
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise _ClientError(400, "body is not a urlencoded form") from None
        fields = {}
        for key in ("date", "from", "to"):
            values = form.get(key)
            if not values or len(values) != 1:
                raise _ClientError(400, f"{key}: expected exactly one value")
            fields[key] = values[0]
        local = _local(fields["date"], fields["from"], zone, ("date", "from"))
        end = _local(fields["date"], fields["to"], zone, ("date", "to"))
        if end <= local:  # "23:00" to "00:00" ends the next day
            end += timedelta(days=1)
        minutes = int((end - local).total_seconds() // 60)
        return _slot_from_local(unquote(params["court_id"]), local, minutes)

    def created(self, booking: Booking, slot: _Slot) -> _Answer:
        local = slot.local
        end = local + timedelta(minutes=slot.duration_minutes)
        body = {
            "reservation": {
                "id": booking.id,
                "court": booking.court_id,
                "date": local.strftime("%Y-%m-%d"),
                "from": local.strftime("%H:%M"),
                "to": end.strftime("%H:%M"),
            }
        }
        return _json(201, body, booking_id=booking.id)

    def taken(self) -> _Answer:
        return _json(409, {"error": "court not available"})


class _JsonLocalShape(_Shape):
    name = "json-local"
    endpoint = "/api/bookings"
    path_pattern = re.compile(r"/api/bookings")
    auth_header = "X-Api-Key"
    idempotency_header = "X-Request-Id"
    # Like many frameworks, this club answers every invalid body with 422, so a template must
    # tell "slot not available" from the rest by the body.
    bad_request_status = 422

    def parse(self, params: dict[str, str], headers: Message, body: bytes, zone: ZoneInfo) -> _Slot:
        data = _json_object(body, headers)
        local = _local(_require(data, "date"), _require(data, "time"), zone, ("date", "time"))
        minutes = _minutes(_require(data, "duration"), "duration")
        return _slot_from_local(_court(_require(data, "court"), "court"), local, minutes)

    def created(self, booking: Booking, slot: _Slot) -> _Answer:
        body = {
            "booking": {
                "ref": booking.id,
                "court": booking.court_id,
                "date": slot.local.strftime("%Y-%m-%d"),
                "time": slot.local.strftime("%H:%M"),
                "duration": slot.duration_minutes,
            }
        }
        return _json(200, body, booking_id=booking.id)

    def taken(self) -> _Answer:
        return _json(422, {"error": "slot not available"})


class _Taken200Shape(_Shape):
    name = "taken-200"
    endpoint = "/book"
    path_pattern = re.compile(r"/book")
    # An "always 200" API: only the body tells success from failure.
    bad_request_status = 200

    def parse(self, params: dict[str, str], headers: Message, body: bytes, zone: ZoneInfo) -> _Slot:
        data = _json_object(body, headers)
        court = _court(_require(data, "court"), "court")
        start_text = _require(data, "start_utc")
        if not isinstance(start_text, str) or not _UTC_Z.fullmatch(start_text):
            raise _ClientError(400, f"start_utc: expected YYYY-MM-DDTHH:MM:SSZ, got {start_text!r}")
        start = _aware(start_text, "start_utc")
        minutes = _minutes(_require(data, "minutes"), "minutes")
        return _Slot(court, start, start_text, minutes, start)

    def created(self, booking: Booking, slot: _Slot) -> _Answer:
        body = {"ok": True, "data": {"id": booking.id, "court": booking.court_id}}
        return _json(200, body, booking_id=booking.id)

    def taken(self) -> _Answer:
        return _json(200, {"ok": False, "error": "court not available"})

    def bad_request(self, error: _ClientError) -> _Answer:
        if error.status == 415:
            return _json(415, {"ok": False, "error": error.message})
        return _json(200, {"ok": False, "error": error.message})


_SHAPES: dict[str, _Shape] = {
    shape.name: shape for shape in (_Shape(), _PathFormShape(), _JsonLocalShape(), _Taken200Shape())
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "SandboxClub/1.0"
    # Headers and body leave in separate writes: with Nagle on, the body would wait for the
    # client's delayed ACK (~40 ms on Linux) and skew every timing the benchmark measures.
    disable_nagle_algorithm = True
    server: _Server
    conn: _Connection

    def setup(self) -> None:
        super().setup()
        self.conn = self.server.club._connection(self.request)
        self.conn.thread = threading.current_thread()

    def do_POST(self) -> None:
        self.server.club._serve(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def date_time_string(self, timestamp: float | None = None) -> str:
        """Every answer's ``Date``, by the club's clock (``clock_offset`` from ours)."""
        if timestamp is None:
            timestamp = self.server.club.now()
        return email.utils.formatdate(timestamp, usegmt=True)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """The club logs each request itself, once it knows court, start and key."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox club: %s", self.server.club._redact(format % args))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], club: SandboxClub) -> None:
        self.club = club
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a bad resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        self.club._accepted(sock)
        return sock, address

    def shutdown_request(self, request: Any) -> None:
        conn = self.club._forget(request)
        if conn is not None and conn.aborted:
            # SO_LINGER (on, 0) is set: closing without a shutdown() sends a RST, not a FIN.
            request.close()
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            logger.debug("sandbox club: connection error: %s", error)
        else:
            logger.exception("sandbox club: error while handling a request")


class SandboxClub:
    """A fake club booking server on a real socket, for tests, the demo and the benchmark.

    ``tokens`` are the accepted tokens; ``window_seconds`` how long before a slot's start its
    booking window opens; ``clock_offset`` is added to ``time.time()`` to make the club's clock
    (negative: the club is behind); ``connection_cost`` is how long a new connection takes to
    become usable (a far server's TLS handshake); ``response_delay`` is added before every
    answer; ``shape`` picks the API (``SHAPES``); ``timezone`` is the club's zone for local dates
    and times; ``courts`` is the pool a request for any court (null court) is served from, lowest
    first. An explicit court id is accepted whatever it is. ``window_seconds`` and
    ``clock_offset`` may be changed while the club runs.
    """

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] | list[str] = ("sandbox-token",),
        window_seconds: float = 168 * 3600.0,
        clock_offset: float = 0.0,
        connection_cost: float = 0.0,
        response_delay: float = 0.0,
        shape: str = "default",
        timezone: str = "UTC",
        host: str = "127.0.0.1",
        port: int = 0,
        courts: tuple[str, ...] | list[str] = DEFAULT_COURTS,
    ) -> None:
        if shape not in _SHAPES:
            raise ValueError(f"shape: {shape!r} is not one of {', '.join(SHAPES)}")
        if (
            isinstance(tokens, str)
            or not tokens
            or not all(isinstance(t, str) and t for t in tokens)
        ):
            raise ValueError("tokens: expected a non-empty list of non-empty strings")
        try:
            self._zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: {timezone!r} is not an IANA time zone") from None
        if not courts:
            raise ValueError("courts: expected at least one court")
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.window_seconds = float(window_seconds)
        self.clock_offset = float(clock_offset)
        self.connection_cost = float(connection_cost)
        self.response_delay = float(response_delay)
        self.shape = shape
        self.timezone = timezone
        self.courts: tuple[str, ...] = tuple(str(c) for c in courts)
        self._shape = _SHAPES[shape]
        self._host = host
        self._port = port
        self._cond = threading.Condition()
        self._received: list[ReceivedRequest] = []
        self._bookings: list[Booking] = []
        self._faults: collections.deque[_Fault] = collections.deque()
        self._taken: dict[tuple[str, datetime], str | None] = {}
        self._stored: dict[tuple[str, str], _Stored] = {}
        self._next_booking = 1
        #: The ids of the bookings cancelled through ``DELETE /bookings/<id>``.
        self.cancelled: list[str] = []
        self._connections: dict[int, _Connection] = {}
        self._next_connection = 1
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> SandboxClub:
        """Bind and serve in a daemon thread; returns self. Port 0 picks a free port."""
        if self._server is not None:
            raise RuntimeError("the sandbox club is already running")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-club-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("sandbox club: listening on %s (shape %s)", self.base_url, self.shape)
        return self

    def stop(self) -> None:
        """Stop serving and close every connection, open keep-alive ones included.

        Hangs, delays and streams in progress are cut short; returns within about two seconds
        whatever the clients do. Calling it twice is harmless.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._cond:
            connections = list(self._connections.values())
            for conn in connections:
                # Wakes a handler blocked reading the next request on an idle connection.
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_SECONDS
        for conn in connections:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(max(0.0, deadline - time.monotonic()))
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._server = None
        self._thread = None
        logger.debug("sandbox club: stopped")

    def __enter__(self) -> SandboxClub:
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
        """The TCP port the club listens on (only while it runs)."""
        if self._server is None:
            raise RuntimeError("the sandbox club is not running: call start() first")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT``, no trailing slash."""
        return f"http://{self._host}:{self.port}"

    @property
    def url(self) -> str:
        """The booking endpoint of this club's shape: ``.../bookings`` for the default shape
        (what BOOKING_API_URL names); for ``path-form`` it holds a literal ``{court_id}``."""
        return self.base_url + self._shape.endpoint

    def template(self) -> dict[str, Any]:
        """This shape's request template from ``data/templates/``, its host made this club's.

        Raises ValueError for the default shape, which needs no template.
        """
        if self.shape == "default":
            raise ValueError("the default shape is section 6's request: it has no template")
        data: dict[str, Any] = json.loads((TEMPLATES_DIR / f"{self.shape}.json").read_text())
        data["url"] = data["url"].replace(TEMPLATE_HOST, self.base_url, 1)
        return data

    def now(self) -> float:
        """The club's clock: ``time.time() + clock_offset``."""
        return time.time() + self.clock_offset

    # Inspection --------------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._cond:
            return list(self._received)

    @property
    def bookings(self) -> list[Booking]:
        """A snapshot of the bookings created through the API (not ``set_taken`` ones)."""
        with self._cond:
            return list(self._bookings)

    def bookings_per_key(self) -> collections.Counter[str | None]:
        """How many bookings each Idempotency-Key created (None: requests without one)."""
        with self._cond:
            return collections.Counter(b.idempotency_key for b in self._bookings)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` is true (re-checked whenever a request arrives or is
        answered, and every 50 ms); returns whether it became true within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
            return True

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """Wait until at least ``n`` requests have been answered (``done``); returns the
        snapshot of ``received``. Raises TimeoutError naming how many came."""

        def enough() -> bool:
            return sum(1 for r in self._received if r.done) >= n

        if not self.wait_for(enough, timeout):
            with self._cond:
                seen = len(self._received)
                answered = sum(1 for r in self._received if r.done)
            raise TimeoutError(
                f"sandbox club: expected {n} answered requests within {timeout} s, "
                f"got {answered} answered of {seen} received"
            )
        return self.received

    # Control -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget received requests, bookings, taken slots, stored replays and queued faults.

        Booking ids keep counting up, so an id never means two bookings."""
        with self._cond:
            self._received.clear()
            self._bookings.clear()
            self._faults.clear()
            self._taken.clear()
            self._stored.clear()
            self._cond.notify_all()

    def set_taken(self, court_id: str | int, start: str | datetime) -> None:
        """Mark ``court_id`` at ``start`` (an aware datetime or ISO 8601 text with an offset)
        as booked by someone else."""
        moment = _aware(start, "start") if isinstance(start, str) else start
        if moment.tzinfo is None:
            raise ValueError("start: expected an aware datetime")
        with self._cond:
            self._taken[(str(court_id), moment.astimezone(UTC))] = None

    def free(self, court_id: str | int, start: str | datetime) -> None:
        """The slot ``court_id`` at ``start`` becomes free again (someone else cancelled it)."""
        moment = _aware(start, "start") if isinstance(start, str) else start
        with self._cond:
            self._taken.pop((str(court_id), moment.astimezone(UTC)), None)

    def fault(self, kind: str, count: int = 1, **kw: Any) -> None:
        """Queue a fault for the next ``count`` booking requests (FIFO after earlier faults).

        Only requests to the shape's booking endpoint consume faults. Kinds and options:
        ``status`` (status=503, retry_after=None, body=None, content_type=None),
        ``hang`` (seconds=30.0), ``reset`` (status=201), ``close``, ``huge``
        (size=50 MiB), ``nonjson`` (body=None), ``redirect`` (url=..., status=302). Each also
        takes ``book``: process the request normally first (False for status, hang, close and
        redirect; True for reset, huge and nonjson, which answer 201).
        """
        if kind not in _FAULT_DEFAULTS:
            raise ValueError(f"fault kind {kind!r} is not one of {', '.join(FAULT_KINDS)}")
        unknown = set(kw) - set(_FAULT_DEFAULTS[kind])
        if unknown:
            raise ValueError(f"fault {kind!r}: unknown options {sorted(unknown)}")
        if count < 1:
            raise ValueError("count: expected at least 1")
        options = {**_FAULT_DEFAULTS[kind], **kw}
        with self._cond:
            self._faults.append(_Fault(kind, count, options))

    # Connections (called by _Server and _Handler) ----------------------------------------

    def _accepted(self, sock: socket.socket) -> None:
        now = time.time()
        with self._cond:
            conn = _Connection(self._next_connection, sock, now)
            self._next_connection += 1
            self._connections[id(sock)] = conn

    def _connection(self, sock: socket.socket) -> _Connection:
        with self._cond:
            return self._connections[id(sock)]

    def _forget(self, sock: socket.socket) -> _Connection | None:
        with self._cond:
            return self._connections.pop(id(sock), None)

    def _redact(self, text: str, extra: str | None = None) -> str:
        for secret in (*self.tokens, extra):
            if secret:
                text = text.replace(secret, "***")
        return text

    # Serving -----------------------------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        conn = h.conn
        new_connection = conn.requests == 0
        conn.requests += 1
        wait = conn.accepted + self.connection_cost - time.time()
        if wait > 0 and self._stopping.wait(wait):
            h.close_connection = True
            return
        arrived = time.time()
        club_time = arrived + self.clock_offset
        shape = self._shape
        body_error: _ClientError | None = None
        try:
            body = self._read_body(h)
        except _ClientError as exc:
            body, body_error = b"", exc
            h.close_connection = True
        path = h.path.split("?", 1)[0]
        match = shape.path_pattern.fullmatch(path)
        is_booking = match is not None and h.command == "POST"
        record = ReceivedRequest(
            arrived=arrived,
            club_time=club_time,
            method=h.command,
            path=h.path,
            headers=dict(h.headers.items()),
            body=body,
            token=shape.token(h.headers),
            idempotency_key=h.headers.get(shape.idempotency_header),
            new_connection=new_connection,
            connection_id=conn.id,
            connection_opened=conn.accepted,
        )
        slot: _Slot | None = None
        parse_error: _ClientError | None = body_error
        if is_booking and match is not None and body_error is None:
            try:
                slot = shape.parse(match.groupdict(), h.headers, body, self._zone)
            except _ClientError as exc:
                parse_error = exc
        if slot is not None:
            record.court_id = slot.court_id
            record.start = slot.start_text
            record.start_at = slot.start_at
            record.opens_at = slot.start_at.timestamp() - self.window_seconds
        with self._cond:
            fault = self._take_fault() if is_booking else None
            record.fault = fault.kind if fault else None
            self._received.append(record)
            self._cond.notify_all()
        try:
            if self.response_delay > 0 and self._stopping.wait(self.response_delay):
                self._finish(record, None, h)
                return
            if fault is None:
                answer = self._answer(record, match, slot, parse_error)
                self._send(h, record, answer)
            else:
                self._misbehave(h, record, fault, match=match, slot=slot, error=parse_error)
        except OSError as exc:  # the client went away mid-answer
            logger.debug("sandbox club: connection %d: %s", conn.id, exc)
            h.close_connection = True
            with self._cond:
                record.done = True
                record.finished = True
                self._cond.notify_all()
        self._log(record)

    def _take_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.popleft()
        return fault

    def _read_body(self, h: _Handler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                line = h.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _ClientError(400, "malformed chunked body") from None
                if size == 0:
                    while h.rfile.readline(1024).strip():  # trailers
                        pass
                    return b"".join(chunks)
                total += size
                if total > _MAX_BODY:
                    raise _ClientError(413, "body too large")
                chunks.append(h.rfile.read(size))
                h.rfile.readline(8)
        length_text = h.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _ClientError(400, "Content-Length is not a number") from None
        if length < 0:
            raise _ClientError(400, "Content-Length is negative")
        if length > _MAX_BODY:
            raise _ClientError(413, "body too large")
        body = h.rfile.read(length)
        if len(body) < length:
            raise _ClientError(400, "body shorter than Content-Length")
        return body

    def _answer(
        self,
        record: ReceivedRequest,
        match: re.Match[str] | None,
        slot: _Slot | None,
        error: _ClientError | None,
    ) -> _Answer:
        """The club's normal answer to a request, creating a booking when it should."""
        shape = self._shape
        if error is not None and error.status == 413:
            return _json(413, {"error": error.message})
        if match is None:
            if record.method == "DELETE" and shape.name == "default":
                return self._cancel(record)
            return _json(404, {"error": "not found"})
        if record.method != "POST":
            return _json(405, {"error": "method not allowed"}, headers=[("Allow", "POST")])
        if record.token is None or record.token not in self.tokens:
            headers = (
                [("WWW-Authenticate", "Bearer")] if shape.auth_header == "Authorization" else []
            )
            return _json(401, {"error": "missing or unknown token"}, headers=headers)
        if error is not None or slot is None:
            return shape.bad_request(error or _ClientError(400, "malformed request"))
        key = record.idempotency_key
        with self._cond:
            stored = self._stored.get((record.token, key)) if key else None
            if stored is not None:
                if (stored.requested_court, stored.start_at) != (slot.court_id, slot.start_at):
                    message = f"{shape.idempotency_header} was used for a different request"
                    return _json(422, {"error": message})
                return stored.answer
            opens_at = slot.start_at.timestamp() - self.window_seconds
            if record.club_time < opens_at:
                body = {"error": "booking window not open yet", "opens_at": _iso_utc(opens_at)}
                return _json(425, body)
            if slot.court_id is None:
                free = [c for c in self.courts if (c, slot.start_at) not in self._taken]
                if not free:
                    return shape.taken()
                court = free[0]
            elif (slot.court_id, slot.start_at) in self._taken:
                return shape.taken()
            else:
                court = slot.court_id
            booking = Booking(
                id=f"bk-{self._next_booking}",
                court_id=court,
                start=slot.start_text,
                start_at=slot.start_at,
                duration_minutes=slot.duration_minutes,
                idempotency_key=key,
                token=record.token,
                created=time.time(),
            )
            self._next_booking += 1
            self._bookings.append(booking)
            self._taken[(court, slot.start_at)] = booking.id
            answer = shape.created(booking, slot)
            if key:
                self._stored[(record.token, key)] = _Stored(slot.court_id, slot.start_at, answer)
            self._cond.notify_all()
            return answer

    def _cancel(self, record: ReceivedRequest) -> _Answer:
        """``DELETE /bookings/<id>`` (section 13's cancel of section 6's request): the booking
        is gone and its slot free (204); an unknown id is 404."""
        if record.token is None or record.token not in self.tokens:
            return _json(401, {"error": "missing or unknown token"})
        booking_id = record.path.split("?", 1)[0].removeprefix(self._shape.endpoint + "/")
        with self._cond:
            booking = next((b for b in self._bookings if b.id == booking_id), None)
            if booking is None:
                return _json(404, {"error": "no such booking"})
            self._bookings.remove(booking)
            self._taken.pop((booking.court_id, booking.start_at), None)
            self.cancelled.append(booking.id)
            self._cond.notify_all()
        return _Answer(204, content_type=None)

    def _misbehave(
        self,
        h: _Handler,
        record: ReceivedRequest,
        fault: _Fault,
        *,
        match: re.Match[str] | None,
        slot: _Slot | None,
        error: _ClientError | None,
    ) -> None:
        options = fault.options
        normal = self._answer(record, match, slot, error) if options["book"] else None
        booking_id = normal.booking_id if normal is not None else None
        record.booking_id = booking_id
        if fault.kind == "status":
            status = int(options["status"])
            body = options["body"]
            content_type = options["content_type"]
            if body is None:
                payload = json.dumps({"error": _phrase(status)}).encode()
                content_type = content_type or "application/json"
            elif isinstance(body, dict | list):
                payload = json.dumps(body).encode()
                content_type = content_type or "application/json"
            else:
                payload = body.encode() if isinstance(body, str) else bytes(body)
                content_type = content_type or "text/plain; charset=utf-8"
            headers = []
            if options["retry_after"] is not None:
                headers.append(("Retry-After", str(options["retry_after"])))
            self._send(h, record, _Answer(status, payload, content_type, headers))
        elif fault.kind == "hang":
            if self._stopping.wait(float(options["seconds"])):
                self._finish(record, None, h)
                return
            answer = normal or _json(504, {"error": "gateway timeout"})
            self._send(h, record, answer)
        elif fault.kind == "reset":
            self._reset(h, record, int(options["status"]), booking_id)
        elif fault.kind == "close":
            self._finish(record, None, h)
        elif fault.kind == "huge":
            self._huge(h, record, int(options["size"]), booking_id)
        elif fault.kind == "nonjson":
            text = options["body"] or "<html><body><h1>Booking confirmed</h1></body></html>"
            self._send(h, record, _Answer(201, text.encode(), "text/html; charset=utf-8"))
        elif fault.kind == "redirect":
            location = options["url"] or f"{self.base_url}/login"
            answer = _Answer(int(options["status"]), b"", None, [("Location", location)])
            self._send(h, record, answer)

    def _finish(self, record: ReceivedRequest, status: int | None, h: _Handler) -> None:
        """Mark the record answered with ``status`` and drop the connection when none."""
        with self._cond:
            record.status = status
            record.done = True
            record.finished = True
            self._cond.notify_all()
        if status is None:
            h.close_connection = True

    def _mark(self, record: ReceivedRequest, status: int, booking_id: str | None) -> None:
        with self._cond:
            record.status = status
            if booking_id is not None:
                record.booking_id = booking_id
            record.done = True
            self._cond.notify_all()

    def _send(self, h: _Handler, record: ReceivedRequest, answer: _Answer) -> None:
        self._mark(record, answer.status, answer.booking_id)
        h.send_response(answer.status)
        for name, value in answer.headers:
            h.send_header(name, value)
        if answer.content_type is not None:
            h.send_header("Content-Type", answer.content_type)
        h.send_header("Content-Length", str(len(answer.body)))
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(answer.body)
        with self._cond:
            record.sent = len(answer.body)
            record.finished = True
            self._cond.notify_all()

    def _reset(self, h: _Handler, record: ReceivedRequest, status: int, bid: str | None) -> None:
        partial = b'{"id": "' + (bid or "bk-0").encode()[:3]
        head = (
            f"HTTP/1.1 {status} {_phrase(status)}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(partial) + 4096}\r\n\r\n"
        )
        self._mark(record, status, None)
        h.close_connection = True
        h.wfile.write(head.encode() + partial)
        # Give the client time to read the headers, so the reset lands mid-body.
        self._stopping.wait(_RESET_PAUSE_SECONDS)
        h.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.conn.aborted = True
        with self._cond:
            record.sent = len(partial)
            record.finished = True
            self._cond.notify_all()

    def _huge(self, h: _Handler, record: ReceivedRequest, size: int, bid: str | None) -> None:
        self._mark(record, 201, None)
        h.send_response(201)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(size))
        h.end_headers()
        sent = 0
        try:
            for chunk in _huge_body(size, bid or "bk-0"):
                if self._stopping.is_set():
                    h.close_connection = True
                    break
                h.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            h.close_connection = True
        with self._cond:
            record.sent = sent
            record.finished = True
            self._cond.notify_all()

    def _log(self, record: ReceivedRequest) -> None:
        logger.info(
            "%s %s -> %s court=%s start=%s key=%s%s",
            record.method,
            self._redact(record.path, record.token),
            record.status if record.status is not None else "no answer",
            record.court_id,
            record.start,
            record.idempotency_key,
            f" fault={record.fault}" if record.fault else "",
        )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _huge_body(size: int, booking_id: str) -> Iterator[bytes]:
    """``size`` bytes of a JSON object padded with spaces, in chunks."""
    head = json.dumps({"id": booking_id}).encode()[:-1] + b', "padding": "'
    tail = b'"}'
    if size < len(head) + len(tail):
        yield b" " * size
        return
    yield head
    left = size - len(head) - len(tail)
    filler = b"x" * _CHUNK
    while left > 0:
        piece = filler[: min(left, _CHUNK)]
        left -= len(piece)
        yield piece
    yield tail


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit ``s``, ``m``, ``h`` (the default)
    or ``d`` (24 h), e.g. ``168h``, ``7d``, ``90s``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 168h, 7d or 90s")
    factor = {"s": 1, "m": 60, "h": 3600, "": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * factor


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox club until SIGINT or SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(description="A fake club booking server for courtbot.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--token", action="append", dest="tokens", help="an accepted token (repeatable)"
    )
    parser.add_argument("--window", default="168h", help="e.g. 168h, 7d, 90s (default 168h)")
    parser.add_argument("--shape", default="default", choices=SHAPES)
    parser.add_argument("--timezone", default="UTC", help="IANA zone for local dates and times")
    parser.add_argument("--connection-cost-ms", type=float, default=0.0)
    parser.add_argument("--courts", default=",".join(DEFAULT_COURTS), help="the any-court pool")
    args = parser.parse_args(argv)
    try:
        window = parse_duration(args.window)
    except ValueError as exc:
        parser.error(f"--window: {exc}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        club = SandboxClub(
            tokens=tuple(args.tokens or ("sandbox-token",)),
            window_seconds=window,
            connection_cost=args.connection_cost_ms / 1000.0,
            shape=args.shape,
            timezone=args.timezone,
            host=args.host,
            port=args.port,
            courts=tuple(c.strip() for c in args.courts.split(",") if c.strip()),
        )
        club.start()
    except (ValueError, OSError) as exc:
        print(f"sandbox club: cannot start: {exc}", file=sys.stderr)
        return 2
    print(f"sandbox club listening on {club.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        club.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
