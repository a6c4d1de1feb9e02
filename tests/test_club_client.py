"""club_client.py: the club's HTTP client (CONTRACT sections 6 and 12), against real HTTP servers
on 127.0.0.1 (and `responses` where a body's size is all that matters): at most 1 MiB of an answer,
connections opened ahead, the timeout bounding the whole request, an untrusted certificate.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import responses

import club_client
import wire
from club_client import Answer, ClubClient, RequestSpec
from reliability_helpers import evil_server, self_signed_context

URL = "http://club.test/bookings"
TIMEOUT = 4.0
MIB = 1024 * 1024


@pytest.fixture
def club() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


# --------------------------------------------------------------------------- ClubClient


class _ClubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5
    server: _LocalClub

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.requests.append((self.path, self.client_address[1]))
        if self.path == "/huge":
            size = 20 * MIB
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(size // len(chunk)):
                    self.wfile.write(chunk)
            except OSError:
                self.close_connection = True
            return
        payload = json.dumps({"id": "local-1"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _LocalClub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ClubHandler)
        self.accepted = 0
        self.requests: list[tuple[str, int]] = []

    def get_request(self) -> Any:
        pair = super().get_request()
        self.accepted += 1
        return pair

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def local_club() -> Iterator[_LocalClub]:
    server = _LocalClub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _until(condition: Callable[[], bool], seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _spec(url: str) -> RequestSpec:
    return RequestSpec("POST", url, {"Content-Type": "application/json"}, b"{}")


def _send_once(url: str, timeout: float) -> Answer:
    """One POST of ``_spec(url)`` by a client of its own, closed after."""
    client = ClubClient(timeout=timeout)
    try:
        return client.send(_spec(url))
    finally:
        client.close()


def test_send_reads_at_most_1_mib_of_a_huge_streamed_body(local_club: _LocalClub) -> None:
    client = ClubClient(timeout=5)
    try:
        started = time.perf_counter()
        got = client.send(_spec(local_club.url("/huge")))
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    assert got.status == 200
    assert len(got.body) <= club_client.MAX_BODY_BYTES == MIB
    assert len(got.body) == MIB
    assert elapsed < 2


def test_send_caps_a_large_mocked_body(club: responses.RequestsMock) -> None:
    club.add(responses.POST, URL, body=b"{" + b" " * (3 * MIB) + b"}", status=200)
    client = ClubClient(timeout=TIMEOUT)
    got = client.send(_spec(URL))
    assert len(got.body) == MIB
    assert got.json() is None  # a cut JSON body is no JSON
    assert club.calls[0].request.req_kwargs["timeout"] == TIMEOUT


def test_warm_opens_a_connection_that_the_first_request_goes_on(local_club: _LocalClub) -> None:
    client = ClubClient(timeout=2)
    url = local_club.url("/bookings")
    try:
        held = client.warm(url)
        assert isinstance(held, wire.Connection)
        assert _until(lambda: local_club.accepted == 1)
        time.sleep(0.02)
        # Warming sends the club nothing.
        assert local_club.requests == []

        data = wire.request_bytes(client.prepare(_spec(url)))
        got = wire.exchange(held, data, timeout=2)
    finally:
        client.close()
    assert got.status == 201
    assert json.loads(got.body) == {"id": "local-1"}
    assert local_club.accepted == 1
    assert [path for path, _port in local_club.requests] == ["/bookings"]


def test_each_warm_holds_its_own_connection_for_a_burst(local_club: _LocalClub) -> None:
    client = ClubClient(timeout=2)
    url = local_club.url("/bookings")
    try:
        held = [client.warm(url) for _ in range(3)]
        assert _until(lambda: local_club.accepted == 3)
        data = wire.request_bytes(client.prepare(_spec(url)))
        answers = [wire.exchange(one, data, timeout=2) for one in held if one is not None]
    finally:
        client.close()
    assert [a.status for a in answers] == [201, 201, 201]
    assert local_club.accepted == 3  # no request opened a connection of its own


def test_warm_against_a_closed_port_reports_false(local_club: _LocalClub) -> None:
    url = local_club.url("/bookings")
    local_club.shutdown()
    local_club.server_close()
    client = ClubClient(timeout=1)
    try:
        assert client.warm(url) is None
        with pytest.raises(club_client.BookingError) as raised:
            client.send(_spec(url))
    finally:
        client.close()
    assert str(raised.value) == "connection refused by the club's server"
    assert raised.value.lost is False


# --------------------------------------------------------------------- the whole-request bound

#: How long an evil club below keeps misbehaving before it gives a proper answer: far past the
#: client's 0.5 s timeout, so a client bounded only per read ends with that answer instead.
EVIL_FOR = 4.0


def _slow_headers(client: socket.socket, _head: bytes, stop: threading.Event) -> None:
    """A status line, then one header line every 0.1 s; the rest after EVIL_FOR."""
    client.sendall(b"HTTP/1.1 201 Created\r\n")
    ends = time.monotonic() + EVIL_FOR
    line = 0
    while time.monotonic() < ends:
        if stop.wait(0.1):
            return
        line += 1
        client.sendall(f"X-Slow-{line}: {line}\r\n".encode())
    client.sendall(b'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"id": "bk1"}')


def _endless_continue(client: socket.socket, _head: bytes, stop: threading.Event) -> None:
    """``100 Continue`` every 0.05 s; a 201 after EVIL_FOR."""
    ends = time.monotonic() + EVIL_FOR
    while time.monotonic() < ends:
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if stop.wait(0.05):
            return
    client.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("misbehave", [_slow_headers, _endless_continue])
def test_send_bounds_the_whole_request_not_each_read(
    misbehave: Callable[[socket.socket, bytes, threading.Event], None],
) -> None:
    with (
        evil_server(misbehave) as (port, arrivals),
        pytest.raises(club_client.BookingError) as raised,
    ):
        _send_once(f"http://127.0.0.1:{port}/bookings", timeout=0.5)
    assert len(arrivals) == 1
    assert str(raised.value) == "no answer within 0.5 s"
    assert raised.value.lost is True
    assert raised.value.permanent is False


def test_send_cuts_a_body_still_coming_at_the_deadline() -> None:
    # Timeout 1 s. The status and headers at once, byte "a" at 0.5 s, "b" at 1.3 s: a client
    # bounded per read (1 s) is still waiting when "b" comes; bounded whole, it stopped at 1 s.
    def dribble(client: socket.socket, _head: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n")
        if not stop.wait(0.5):
            client.sendall(b"a")
        if not stop.wait(0.8):
            client.sendall(b"b")
        stop.wait(2)

    with evil_server(dribble) as (port, _arrivals):
        got = _send_once(f"http://127.0.0.1:{port}/bookings", timeout=1.0)
    assert got.status == 201
    assert got.body == b"a"


def test_an_untrusted_certificate_is_permanent_and_named(tmp_path: Path) -> None:
    def booked(client: socket.socket, _head: bytes, stop: threading.Event) -> None:
        client.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    with (
        evil_server(booked, tls=self_signed_context(tmp_path)) as (port, arrivals),
        pytest.raises(club_client.BookingError) as raised,
    ):
        _send_once(f"https://127.0.0.1:{port}/bookings", timeout=2)
    assert arrivals == []  # the request never left
    assert str(raised.value) == (
        "the club's certificate is not trusted (self-signed certificate); not retried: check "
        "the host in the booking URL, or ask the club to fix its certificate"
    )
    assert raised.value.permanent is True
    assert raised.value.lost is False


def test_a_host_that_does_not_resolve_is_named_without_blaming_booking_api_url() -> None:
    """A flow's url (a club file's) is no BOOKING_API_URL: the reason names the host and where
    a URL may come from. (``.invalid`` never resolves, RFC 6761; no network is needed.)"""
    with pytest.raises(club_client.BookingError) as raised:
        _send_once("https://yourclub.courtbot.invalid/book", timeout=5)
    assert str(raised.value) == (
        "the club's host name 'yourclub.courtbot.invalid' could not be resolved: check the host in "
        "the booking URL (BOOKING_API_URL, or the url in the request template or club file)"
    )
