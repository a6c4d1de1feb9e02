"""Issue 23's attacks on the club's HTTP client and the booking's reading of answers, each
against a real club on 127.0.0.1 that misbehaves on purpose (``test_wire.Club``): the
connection opened ahead spent before the trigger (a 408 and a close, an unsolicited 201, a
FIN), an extra answer on a pooled connection, redirects that would carry a secret off the
flow's hosts, a token in a redirect's userinfo, deeply nested JSON, secrets echoed in encoded
forms, and a body cut at 1 MiB. ``record`` prints the figures docs/reliability.md quotes."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import test_wire
from test_wire import DESIRED, Behaviour, Club, Received, bookings, club

import bot
import club_client
import utils
import wire
from models import BOOKED, FAILED
from template import parse_flow
from tools.local_ca import make_ca

MIB = 1024 * 1024


def record(test: str, **figures: Any) -> None:
    print(f"FIGURES {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def http(status: int, body: bytes = b"", *extra: str) -> bytes:
    reason = {200: "OK", 201: "Created", 302: "Found", 408: "Request Timeout"}.get(status, "X")
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def court_of(request: Received) -> str:
    match = re.search(rb'"court_id": "([^"]*)"', request.raw)
    return match.group(1).decode() if match else ""


def scripted(answer: Callable[[Received, int], bytes]) -> Behaviour:
    """Answer each request with ``answer(request, n)`` (n counts the club's requests from 1)."""
    count = [0]
    lock = threading.Lock()

    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        with lock:
            count[0] += 1
            n = count[0]
        sock.sendall(answer(request, n))
        return True

    return behave


# --------------------------------------------------------------------------- nested JSON

DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("script", "court", "requests_sent"),
    [
        pytest.param(lambda r, n: http(201, DEEP), "3", 1, id="201-booked"),
        pytest.param(
            lambda r, n: http(503, DEEP) if n == 1 else http(201, b'{"id": "b2"}'),
            "3",
            2,
            id="503-retried",
        ),
        pytest.param(
            lambda r, n: http(409, DEEP) if court_of(r) == "3" else http(201, DEEP),
            "4",
            2,
            id="409-next-court",
        ),
    ],
)
def test_deeply_nested_json_is_an_unreadable_body_and_the_status_still_decides(
    tmp_path: Path, script: Callable[[Received, int], bytes], court: str, requests_sent: int
) -> None:
    with club(scripted(script)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        key = made.add("deep", time.time() - 1, courts=["3", "4"])
        assert bot.book_slot(key, made.ctx) == BOOKED
        sent = len(server.received)
    row = made.row(key)
    assert (row.status, row.booked_court) == (BOOKED, court)
    assert "internal error" not in (row.last_error or "")
    assert sent == requests_sent


# --------------------------------------------------------------------------- a cut body


def test_a_body_cut_at_1_mib_says_so_in_the_reason(tmp_path: Path) -> None:
    big = b'{"error": "' + b"x" * (2 * MIB) + b'"}'
    with club(scripted(lambda r, n: http(422, big))) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        key = made.add("cut", time.time() - 1, courts=["3"])
        assert bot.book_slot(key, made.ctx) == FAILED
    reason = made.row(key).last_error or ""
    assert "HTTP 422 (its body was cut at 1 MiB, the most courtbot reads)" in reason


def test_a_body_of_exactly_1_mib_is_not_said_to_be_cut() -> None:
    body = b"x" * MIB
    with club(scripted(lambda r, n: http(200, body))) as server:
        client = club_client.ClubClient(timeout=5)
        got = client.send(club_client.RequestSpec("GET", server.url("/a"), {}, None))
        client.close()
    assert (len(got.body), got.cut) == (MIB, False)


# --------------------------------------------------------------------------- redirects

TOKEN = test_wire.BOOK_TOKEN
SESSION = "s3ss10n-9f8e7d6c5b"


def login_flow(url: str, hosts: list[str]) -> Any:
    """A flow whose login follows redirects and sends the token in its header and body."""
    return parse_flow(
        {
            "hosts": hosts,
            "steps": [
                {
                    "name": "login",
                    "url": url,
                    "follow_redirects": True,
                    "headers": {"Authorization": "Bearer {token}"},
                    "json": {"token": "{token}"},
                    "extract": {"jwt": {"json": "jwt"}},
                },
                {"name": "book", "booking": True, "url": url, "json": {"c": "{court_id}"}},
            ],
        },
        api_url=None,
        name="club.json",
    )


def dry_run(flow: Any, *, verify: bool | str = True) -> tuple[list[Any], str | None]:
    client = club_client.ClubClient(timeout=5)
    client.session.verify = verify
    try:
        return bot.dry_run(client, flow, SLOT, {"token": TOKEN}, "default")
    finally:
        client.close()


SLOT = bot.Slot("k@2030", DESIRED, 60, utils.get_zone("Europe/Berlin"), ("3",))


@pytest.mark.parametrize(
    ("location", "why"),
    [
        pytest.param("http://localhost:{evil}\\@127.0.0.1:{own}/x", "backslash", id="backslash"),
        pytest.param("http://127.0.0.1:{own}@localhost:{evil}/x", "user name", id="userinfo"),
        pytest.param("http://{token}@localhost:{evil}/x", "user name", id="token-userinfo"),
        pytest.param("http://localhost:{evil}/x", "not on the flow's hosts", id="off-hosts"),
    ],
)
def test_a_redirect_that_would_carry_the_secret_off_hosts_is_not_followed_in_dry_run(
    location: str, why: str
) -> None:
    with club(scripted(lambda r, n: http(200, b'{"jwt": "j"}'))) as evil:
        where = location.format(evil=evil.port, own="{own}", token=TOKEN)
        with club(
            scripted(lambda r, n: http(302, b"", f"Location: {where.format(own=own[0])}"))
        ) as allowed:
            own = [allowed.port]
            reports, problem = dry_run(login_flow(allowed.url("/login"), ["127.0.0.1"]))
            assert len(allowed.received) == 1
        assert evil.received == []  # nothing, not even a connection's request, reached it
    assert problem is not None and why in problem
    assert TOKEN not in problem and TOKEN not in repr(reports)


def test_an_https_step_never_follows_a_redirect_to_plain_http(tmp_path: Path) -> None:
    files = make_ca(tmp_path)
    with club(scripted(lambda r, n: http(200, b'{"jwt": "j"}'))) as plain:
        target = f"http://localhost:{plain.port}/x"
        with club(
            scripted(lambda r, n: http(302, b"", f"Location: {target}")),
            tls=files.server_context(),
        ) as secure:
            flow = login_flow(secure.url("/login", host="localhost"), ["localhost"])
            _, problem = dry_run(flow, verify=str(files.ca))
            assert len(secure.received) == 1
        assert plain.received == []
    assert problem is not None and "(https) was redirected to plain http" in problem


@pytest.mark.parametrize("secret", [TOKEN, SESSION], ids=["known-token", "unknown-session"])
def test_a_redirects_userinfo_is_never_quoted_in_any_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, secret: str
) -> None:
    caplog.set_level(logging.DEBUG)
    outcomes: list[Any] = []
    with club(scripted(lambda r, n: http(200, b"{}"))) as evil:
        where = f"Location: http://{secret}@localhost:{evil.port}/done"
        with club(scripted(lambda r, n: http(302, b"", where))) as server:
            url = server.url()
            flow = {
                "hosts": ["127.0.0.1"],
                "steps": [
                    {
                        "name": "book",
                        "booking": True,
                        "url": url,
                        "follow_redirects": True,
                        "headers": {"Authorization": "Bearer {token}"},
                        "json": {"c": "{court_id}"},
                    }
                ],
            }
            made = bookings(tmp_path / "db.sqlite", url, flow=flow)
            made.ctx.notify = outcomes.append
            key = made.add("redir", time.time() - 1, courts=["3"])
            assert bot.book_slot(key, made.ctx) == FAILED
        assert evil.received == []
    row = made.row(key)
    assert "user name or password" in (row.last_error or "")
    told = [row.last_error or "", caplog.text, repr(outcomes)]
    assert [secret in text for text in told] == [False, False, False]
    assert utils.mask_userinfo(f"see http://{secret}@h/x") == "see http://***@h/x"


# --------------------------------------------------------------------------- encoded secrets

ODD_TOKEN = "tok-Sc/ub+Me=x&51d0c2e9b7?"


def encoded_forms(secret: str) -> dict[str, str]:
    """Every form in which a club may echo ``secret`` that courtbot scrubs."""
    data = secret.encode()
    upper = quote(secret, safe="")
    return {
        "plain": secret,
        "percent-upper": upper,
        "percent-lower": re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), upper),
        "form-encoded": quote_plus(secret),
        "base64": base64.b64encode(data).decode(),
        "base64-unpadded": base64.b64encode(data).decode().rstrip("="),
        "base64url": base64.urlsafe_b64encode(data).decode(),
        "base64url-unpadded": base64.urlsafe_b64encode(data).decode().rstrip("="),
        "json-escaped": json.dumps(secret).replace("/", "\\/")[1:-1],
        "json-unicode": "".join(f"\\u{ord(c):04x}" for c in secret),
    }


def embedded_cores(secret: str) -> dict[str, str]:
    """What the scrubbing promises of a secret inside a longer base64 string (``user:secret``
    as HTTP Basic sends it), at each of the three alignments: the characters that only the
    secret's bytes decide."""
    data = secret.encode()
    out = {}
    for prefix in (b"", b"u", b"us"):
        encoded = base64.b64encode(prefix + data + b"!!").decode()
        start = -(-8 * len(prefix) // 6)
        out[f"inside-base64-{len(prefix)}"] = encoded[start : 8 * (len(prefix) + len(data)) // 6]
    return out


def test_every_encoded_form_of_the_token_is_scrubbed_from_reasons_logs_and_outcomes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(test_wire, "BOOK_TOKEN", ODD_TOKEN)
    forms = {**encoded_forms(ODD_TOKEN), **embedded_cores(ODD_TOKEN)}
    # Each form alone, and the token inside HTTP Basic credentials at each alignment.
    basic = {
        f"basic-{n}": base64.b64encode(b"u" * n + b":" + ODD_TOKEN.encode()).decode()
        for n in (0, 1, 2)
    }
    hidden = {**encoded_forms(ODD_TOKEN), **basic}
    courts = [str(n) for n in range(1, len(hidden) + 1)]
    echoes = dict(zip(courts, hidden.values(), strict=True))
    outcomes: list[Any] = []

    def taken(request: Received, n: int) -> bytes:
        body = json.dumps({"error": f"slot held by {echoes[court_of(request)]} already"})
        return http(409, body.encode())

    with club(scripted(taken)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        made.ctx.notify = outcomes.append
        key = made.add("echo", time.time() - 1, courts=courts)
        assert bot.book_slot(key, made.ctx) == FAILED
    reason = made.row(key).last_error or ""
    assert reason.count("slot held by ") == len(courts)
    told = {"db": reason, "log": caplog.text, "outcome": repr(outcomes)}
    leaks = [
        (where, name)
        for where, text in told.items()
        for name, form in forms.items()
        if form in text
    ]
    assert leaks == []


def test_dry_run_scrubs_the_encoded_token_a_login_echoes() -> None:
    forms = encoded_forms(TOKEN)
    said = json.dumps({"error": "bad token " + " ".join(forms.values())}).encode()
    with club(scripted(lambda r, n: http(401, said))) as server:
        reports, problem = dry_run(login_flow(server.url("/login"), ["127.0.0.1"]))
    printed = f"{problem} {reports!r}"
    assert [name for name, form in forms.items() if form in printed] == []
    assert "HTTP 401: bad token ***" in printed


# --------------------------------------------------------------------------- pooled connections


def test_an_extra_answer_on_a_pooled_connection_is_never_read_as_the_next_answer() -> None:
    """The club answers the first request twice, the second copy a moment later; the next
    request (a confirm) must get its own answer, sent once."""

    def extra(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # our side may have closed it already
            sock.sendall(http(503, b'{"extra": true}'))

    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        if b" /first " in request.raw:
            sock.sendall(http(200, b'{"step": "first"}'))
            threading.Timer(0.05, extra, [sock]).start()
        else:
            time.sleep(0.2)  # the extra answer is on the wire before this one
            sock.sendall(http(201, b'{"step": "confirm"}'))
        return True

    with club(behave) as server:
        client = club_client.ClubClient(timeout=5)
        try:
            first = client.send(club_client.RequestSpec("POST", server.url("/first"), {}, b"{}"))
            time.sleep(0.02)  # the extra answer is not there yet when the confirm leaves
            confirm = client.send(
                club_client.RequestSpec("POST", server.url("/confirm"), {}, b"{}")
            )
        finally:
            client.close()
        paths = [r.raw.split(b" ")[1] for r in server.received]
    assert (first.status, first.json()) == (200, {"step": "first"})
    assert (confirm.status, confirm.json()) == (201, {"step": "confirm"})
    assert paths == [b"/first", b"/confirm"]  # the confirm was sent once


# --------------------------------------------------------------------------- the connection ahead

REQUEST_TIMEOUT = http(408, b"", "Connection: close")


def on_connection(first: Callable[[socket.socket], bytes | None], then: bytes) -> Behaviour:
    """The first connection's request gets ``first(sock)`` (None: it was dealt with, close),
    every other request ``then``."""

    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        if request.connection == 1:
            answer = first(sock)
            if answer is None:
                return False
            sock.sendall(answer)
            return False
        sock.sendall(then)
        return True

    return behave


def at(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def burst_one(server: Club, trigger: float) -> tuple[wire.Connection, wire.Sent]:
    url = server.url()
    conn = wire.connect(url, timeout=5)
    (sent,) = wire.send_burst([(conn, test_wire.prepared(url))], trigger, timeout=5) or []
    return conn, sent


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def time_out(sock: socket.socket) -> None:
    """The club's 408 on an idle connection, then its close (which our side, having read the
    408 and let the connection go, may have done first)."""
    sock.sendall(REQUEST_TIMEOUT)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    "spend",
    [
        pytest.param(time_out, id="408"),
        pytest.param(lambda s: s.sendall(test_wire.CREATED), id="unsolicited-201"),
        pytest.param(lambda s: s.shutdown(socket.SHUT_WR), id="fin"),
    ],
)
def test_a_connection_spent_before_the_trigger_is_replaced_before_it(
    spend: Callable[[socket.socket], Any],
) -> None:
    """0.1 s before the trigger the club spends the idle connection opened ahead: the request
    goes on a new one, on time, and what came on the old one is never read as its answer."""
    taken = http(409, b'{"error": "taken"}')
    with club(on_connection(lambda s: None, taken)) as server:
        trigger = time.time() + 0.8
        at(0.7, lambda: spend(server.sockets[0]))
        conn, sent = burst_one(server, trigger)
        answer = sent.answer()
        connections = [r.connection for r in server.received]
    assert answer.status == 409  # the club's answer to our request, not what came unasked
    assert connections == [2]  # nothing was written on the spent connection
    assert sent.resent is False  # replaced before the trigger, not after the write
    assert sent.connection is not conn and conn.closed
    late_ms = (sent.sent_clock - trigger) * 1000
    assert 0 <= late_ms < 20
    record("spent-ahead", late_ms=f"{late_ms:.2f}", requests=len(connections))


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(lambda s: REQUEST_TIMEOUT, id="408-on-our-request"),
        pytest.param(reset, id="reset-before-any-answer"),
        pytest.param(lambda s: s.shutdown(socket.SHUT_RDWR), id="closed-before-any-answer"),
    ],
)
def test_a_408_or_a_reset_with_nothing_answered_is_sent_again_at_once_on_a_new_connection(
    first: Callable[[socket.socket], bytes | None],
) -> None:
    with club(on_connection(first, test_wire.CREATED)) as server:
        trigger = time.time() + 0.3
        _, sent = burst_one(server, trigger)
        started = time.monotonic()
        answer = sent.answer()
        took = time.monotonic() - started
        connections = [r.connection for r in server.received]
    assert (answer.status, sent.resent) == (201, True)
    assert connections == [1, 2]
    assert took < 0.2  # at once, no backoff
    record("resent", ms=f"{took * 1000:.1f}", requests=len(connections))


def test_the_lateness_told_is_that_of_the_request_the_club_answered(tmp_path: Path) -> None:
    """The club holds the first request 0.3 s, then says 408 and closes: the booking is
    booked on the new connection, one attempt, and its lateness is about 300 ms, not 0."""

    def slow_timeout(sock: socket.socket) -> bytes:
        time.sleep(0.3)
        return REQUEST_TIMEOUT

    with club(on_connection(slow_timeout, test_wire.CREATED)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        trigger = time.time() + 1.6
        key = made.add("late", trigger, courts=["3"])
        assert bot.book_slot(key, made.ctx) == BOOKED
        connections = [r.connection for r in server.received]
    row = made.row(key)
    assert connections == [1, 2]
    assert row.attempts == 1
    assert row.first_sent_at is not None
    late = utils.as_utc(row.first_sent_at).timestamp() - trigger
    assert 0.28 < late < 0.6
    assert len(made.gate.record) == 1 and made.gate.record[0].resent


def test_a_reason_cut_through_an_encoded_secret_keeps_none_of_it() -> None:
    """The club's words are cut at 200 characters after scrubbing, and only as much as a
    secret starting before the cut can reach is scrubbed (a 1 MiB message costs no more)."""
    secret = ODD_TOKEN
    for form in encoded_forms(secret).values():
        text = "x" * 190 + form + "y" * MIB
        started = time.perf_counter()
        cut = club_client.scrub_cut(text, 200, [secret])
        took = time.perf_counter() - started
        assert cut == "x" * 190 + "***" + "y" * 7
        assert took < 0.05
