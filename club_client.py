"""The club's HTTP client (CONTRACT sections 6 and 12): one ``requests.Session`` with watched
connections, a deadline on the whole of each request (``HTTP_TIMEOUT_SECONDS``), at most 1 MiB
of an answer read, connection errors worded for a person, cookies kept per booking and sent only
to the flow's hosts, redirects followed within those hosts, and every secret of the booking
under way scrubbed from what is logged or stored. ``bot`` runs the booking on top of it; the
first request of an instant is written by ``wire`` from pre-built bytes.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import http.cookiejar
import itertools
import json
import logging
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, quote_plus, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import MockRequest, MockResponse, RequestsCookieJar, get_cookie_header
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

import utils
import wire
from template import Flow, RenderedRequest, Reply, Step, as_text

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
USER_AGENT = "courtbot/1.0"
#: A step that follows redirects follows at most this many (a redirect loop fails the step).
MAX_REDIRECTS = 10
#: A club's booking id is kept to this many characters (after secrets and controls are gone).
MAX_REF_CHARS = 200
#: Secrets shorter than this are not masked (see ``remember_secret``).
MIN_SECRET_CHARS = 3


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
    #: The URL the request went to.
    url: str = ""
    #: Each ``Set-Cookie`` header of the answer, as sent (one cookie each).
    set_cookies: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None


#: One request to send: already rendered, token included (never logged).
RequestSpec = RenderedRequest


class StepFailure(Exception):
    """A step that cannot go on whatever its answer said: a redirect off the flow's hosts, a
    redirect loop. The message is for a person and holds no secret."""


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


class _FinalAnswer(http.client.HTTPResponse):
    """An answer read past every interim 1xx (``102 Processing``, ``103 Early Hints``), as wire
    reads it: http.client skips ``100 Continue`` only, and would take a 103 for the club's
    answer (RFC 9110 section 15.2: a client reads on to the final one)."""

    def _read_status(self) -> tuple[str, int, str]:
        version, status, reason = super()._read_status()
        if 100 < status < 200 and status != 101:
            # Read as a 100: begin() skips its headers and reads the next status line.
            return version, http.client.CONTINUE, reason
        return version, status, reason


class _WatchedConnection(HTTPConnection):
    """A connection whose socket the request's deadline watches: from its creation (the TCP
    and TLS handshakes) when it is new, from the wait for the answer on when it is reused (a
    request's few bytes leave at once; what can be held is the answer). Its answers are read
    past interim 1xx ones."""

    response_class = _FinalAnswer

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


def start_secrets() -> None:
    """Begin the secrets of a booking in this thread (``book_slot``): from now on
    ``remember_secret`` keeps values for ``scrub``."""
    _booking.secrets = set()


def end_secrets() -> None:
    """Forget the secrets of this thread's booking: it is over."""
    _booking.secrets = None


def remember_secret(value: str) -> None:
    """Count ``value`` among the secrets of the booking under way in this thread: it is scrubbed
    from every exception text, reason and booking reference of that booking. A value shorter
    than ``MIN_SECRET_CHARS`` is left out: it carries no secret, and masking it would garble
    every status and number in a message."""
    secrets: set[str] | None = getattr(_booking, "secrets", None)
    if secrets is not None and len(value) >= MIN_SECRET_CHARS:
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


def scrubbed_traceback(exc: BaseException) -> str:
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
        # The shared session keeps no cookies: each booking has its own jar (FlowRun.jar), so a
        # club's cookie never reaches another booking's requests.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        adapter = _WatchedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def warm(self, url: str) -> wire.Connection | None:
        """Open a connection to ``url``'s origin for the first request of a trigger, sending
        nothing on it (TCP, and for https a TLS handshake verified as this client's requests
        are), bounded by the timeout. A club sees no request from this, only the handshake it
        would see at the trigger anyway. None when no connection could be opened: the request
        then goes through ``send``, which opens one and reports any error."""
        try:
            return wire.connect(url, timeout=self.timeout, verify=self.session.verify)
        except (wire.WireError, ValueError) as exc:
            # The class only: an error's text may quote the URL, which may hold a secret.
            logger.debug("could not open a connection ahead to %s: %s", _host(url), _kind(exc))
            return None

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
        return Answer(
            response.status_code,
            dict(response.headers),
            body,
            latency,
            url=prepared.url or "",
            set_cookies=tuple(response.raw.headers.getlist("Set-Cookie")),
        )

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
    url = exc.request.url if exc.request is not None else None
    host = (urlsplit(url).hostname or "") if url else ""
    return BookingError(_connection_reason(exc, host), lost=_maybe_sent(exc))


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


def _connection_reason(exc: Exception, host: str = "") -> str:
    text = str(exc)
    if "Connection refused" in text or "ECONNREFUSED" in text:
        return "connection refused by the club's server"
    if "reset" in text.lower() or "RemoteDisconnected" in text or "aborted" in text.lower():
        return "the club's server closed the connection without a full answer"
    if "Name or service not known" in text or "nodename nor servname" in text:
        # The URL may be BOOKING_API_URL's, a template's or a club file's: name the host.
        named = f" {host!r}" if host else ""
        return (
            f"the club's host name{named} could not be resolved: check the host in the booking "
            "URL (BOOKING_API_URL, or the url in the request template or club file)"
        )
    return f"connection error ({exc.__class__.__name__})"


def _maybe_sent(exc: Exception) -> bool:
    text = str(exc)
    return not ("Connection refused" in text or "Name or service not known" in text)


# --------------------------------------------------------------------------- one booking's secrets


class Scrubber:
    """The secrets of one booking: its token and secret fields, every extracted value, every
    cookie. Any text built from a club's answer or an exception goes through it before it is
    logged or stored; each secret also joins the booking's thread secrets
    (``remember_secret``), so an unexpected error's traceback and the stored ``booking_ref``
    are scrubbed of it too."""

    def __init__(self, values: Iterable[Any] = ()) -> None:
        self._values: set[str] = set()
        for value in values:
            self.add(value)

    def add(self, value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                self.add(item)
        elif isinstance(value, list):
            for item in value:
                self.add(item)
        if value is None or isinstance(value, bool):
            return
        text = as_text(value)
        if len(text) >= MIN_SECRET_CHARS:
            self._values.add(text)
            remember_secret(text)

    def __call__(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``***``, longest first."""
        return scrub(text, self._values)


# --------------------------------------------------------------------------- cookies and redirects


class BookingRun(Protocol):
    """What the client needs of one booking's run (``bot.FlowRun``): its flow's hosts, its own
    cookie jar, and its secrets."""

    flow: Flow
    jar: RequestsCookieJar
    scrub: Scrubber


def add_cookies(jar: RequestsCookieJar, prepared: requests.PreparedRequest) -> None:
    """The jar's cookies for the request's URL (the flow's hosts are the only URLs sent to)."""
    cookies = get_cookie_header(jar, prepared)
    if cookies:
        own = prepared.headers.get("Cookie")
        prepared.headers["Cookie"] = f"{own}; {cookies}" if own else cookies


def _store_cookies(
    run: BookingRun, prepared: requests.PreparedRequest, answer: Answer
) -> dict[str, str]:
    """Put the cookies an answer set in the booking's jar; returns them by name (what a
    ``cookie`` extraction reads). A cookie's value is a secret from now on."""
    if not answer.set_cookies:
        return {}
    message = http.client.HTTPMessage()
    for line in answer.set_cookies:
        message["Set-Cookie"] = line
    fresh = RequestsCookieJar()
    fresh.extract_cookies(MockResponse(message), MockRequest(prepared))  # type: ignore[arg-type]
    run.jar.extract_cookies(MockResponse(message), MockRequest(prepared))  # type: ignore[arg-type]
    found = {cookie.name: cookie.value or "" for cookie in fresh}
    for value in found.values():
        run.scrub.add(value)
    return found


def exchange(
    client: ClubClient,
    run: BookingRun,
    step: Step,
    prepared: requests.PreparedRequest,
    *,
    sent: wire.Sent | None = None,
) -> tuple[Answer, Reply]:
    """Send ``prepared`` and read its answer; a ``follow_redirects`` step follows redirects
    within the flow's hosts (cookies stored at each hop). With ``sent``, ``prepared`` was
    already written at the trigger (``wire``): only its answer is read. Raises
    ``BookingError`` when no answer came, ``StepFailure`` for a redirect off the hosts or a
    redirect loop."""
    cookies: dict[str, str] = {}
    for _hop in range(MAX_REDIRECTS + 1):
        answer = client.send(prepared) if sent is None else _wire_answer(client, prepared, sent)
        sent = None
        cookies.update(_store_cookies(run, prepared, answer))
        location = answer.header("Location")
        if not (step.follow_redirects and answer.status in (301, 302, 303, 307, 308) and location):
            reply = Reply(answer.status, answer.headers, answer.body, prepared.url or "", cookies)
            return answer, reply
        target = urljoin(prepared.url or "", location)
        if not run.flow.allows(target):
            raise StepFailure(
                f"{step.name!r} was redirected to {urlsplit(target).netloc or target!r}, which "
                f"is not on the flow's hosts ({', '.join(run.flow.hosts)}): not followed, so the "
                "token and cookies stay on hosts; add that host to hosts if it is the club's"
            )
        prepared = _redirected(client, run, prepared, answer.status, target)
    raise StepFailure(
        f"{step.name!r} was redirected more than {MAX_REDIRECTS} times (a redirect loop?): "
        "check the step's URL"
    )


def _wire_answer(client: ClubClient, prepared: requests.PreparedRequest, sent: wire.Sent) -> Answer:
    """The answer to ``prepared``, written at the trigger as ``sent``, read as ``send`` reads
    one: within the same whole-request deadline, at most 1 MiB of its body; once its status
    line and headers came, a body cut short (the deadline, a close) is kept as far as it came.
    A request that was never written (its connection broke ahead) is sent now through
    ``send``, as the same attempt. Raises BookingError as ``send`` does when no answer came."""
    try:
        got = sent.answer(max_body=MAX_BODY_BYTES)
    except wire.WireError as exc:
        if exc.partial is not None:
            got = exc.partial
        elif not exc.lost:
            logger.debug("the request written at the trigger did not leave: %s", exc)
            return client.send(prepared)
        elif isinstance(exc, wire.WireTimeout):
            raise client._timed_out() from None
        else:
            raise BookingError(
                "the club's server closed the connection without a full answer", lost=True
            ) from None
    finally:
        sent.connection.close()
    return Answer(
        got.status,
        {name: got.headers[name] for name in got.headers},
        got.body,
        got.elapsed_ms,
        url=prepared.url or "",
        set_cookies=tuple(got.headers.get_all("Set-Cookie")),
    )


def _redirected(
    client: ClubClient,
    run: BookingRun,
    prepared: requests.PreparedRequest,
    status: int,
    target: str,
) -> requests.PreparedRequest:
    """The request a redirect asks for: GET without a body after a 303 (and after a 301 or 302
    to a POST, as browsers do), the same method and body after a 307 or 308."""
    method = prepared.method or "GET"
    body = prepared.body
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, body = "GET", None
    dropped = {"cookie", "content-length", "host"} | ({"content-type"} if body is None else set())
    headers = {k: v for k, v in prepared.headers.items() if k.lower() not in dropped}
    raw = body.encode() if isinstance(body, str) else body
    following = client.prepare(RequestSpec(method, target, headers, raw))
    add_cookies(run.jar, following)
    return following
