"""wire: request bytes equal to requests', connections opened ahead (TCP and TLS), one writer
per burst and never before the trigger, and an answer reader whose deadline bounds the whole
request. Every club here is a real socket server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from urllib3.connectionpool import HTTPConnectionPool

import bot
import club_client
import models
import utils
import wire
from models import BOOKED, FAILED, PENDING, Instance, Token, transaction
from template import parse_flow
from tools.local_ca import CaFiles, make_ca

TIMEOUT = 1.0
MIB = 1024 * 1024
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
CREATED = (
    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n"
    b'{"id": "b1"}'
)


# --------------------------------------------------------------------------- the test club


@dataclass
class Received:
    """One request as the club read it: when its first byte arrived (the kernel's stamp on
    plain TCP, epoch seconds) and its bytes."""

    arrived: float
    raw: bytes
    connection: int

    @property
    def key(self) -> str:
        match = re.search(rb"\r\nIdempotency-Key: ([^\r]*)\r\n", self.raw)
        return match.group(1).decode() if match else ""


Behaviour = Callable[[socket.socket, Received, threading.Event], bool]


def _read_request(sock: socket.socket, stamped: bool) -> tuple[float, bytes] | None:
    data = b""
    arrived = 0.0
    while True:
        if stamped:
            chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and not arrived:
                    seconds, nanos = struct.unpack("qq", payload[:16])
                    arrived = seconds + nanos / 1e9
        else:
            chunk = sock.recv(65536)
        if not chunk:
            return None
        arrived = arrived or time.time()
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if len(rest) >= (int(match.group(1)) if match else 0):
                return arrived, data


class Club:
    """A raw server on 127.0.0.1, port 0: reads each request whole, records it, and lets
    ``behave`` write the answer (return False to close the connection)."""

    def __init__(self, behave: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        self.behave = behave
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.listener.settimeout(0.02)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.accepted = 0
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, path: str = "/bookings", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            with self.lock:
                self.accepted += 1
                number = self.accepted
                self.sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
                with self.lock:
                    self.sockets.append(sock)
            else:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            while not self.stop.is_set():
                got = _read_request(sock, stamped=self.tls is None)
                if got is None:
                    return
                record = Received(got[0], got[1], number)
                with self.lock:
                    self.received.append(record)
                if not self.behave(sock, record, self.stop):
                    return
        except OSError:  # ssl.SSLError included: a client that gave up
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in self.threads:
            thread.join(5)


@contextlib.contextmanager
def club(behave: Behaviour, tls: ssl.SSLContext | None = None) -> Iterator[Club]:
    running = Club(behave, tls)
    try:
        yield running
    finally:
        running.close()


def answers(raw: bytes) -> Behaviour:
    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        sock.sendall(raw)
        return True

    return behave


def dribble(head: bytes, piece: bytes, interval: float) -> Behaviour:
    """Write ``head``, then ``piece`` every ``interval`` seconds until the club stops."""

    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        sock.sendall(head)
        while not stop.wait(interval):
            sock.sendall(piece)
        return False

    return behave


def prepared(url: str, key: str = "k1", body: bytes | None = b'{"court_id": "3"}') -> bytes:
    """The request bot prepares for ``url``, as wire bytes."""
    client = club_client.ClubClient(timeout=TIMEOUT)
    headers = {
        "User-Agent": club_client.USER_AGENT,
        "Authorization": "Bearer t0k",
        "Content-Type": "application/json",
        "Idempotency-Key": key,
    }
    return wire.request_bytes(client.prepare(club_client.RequestSpec("POST", url, headers, body)))


def one(url: str, *, timeout: float = TIMEOUT, verify: bool | str = True) -> wire.WireAnswer:
    conn = wire.connect(url, timeout=timeout, verify=verify)
    return wire.exchange(conn, prepared(url), timeout=timeout)


def failure(url: str, *, timeout: float = TIMEOUT) -> tuple[wire.WireError, float]:
    """The error of one request to ``url`` and the seconds from its write to the error."""
    conn = wire.connect(url, timeout=timeout)
    (sent,) = wire.send_burst([(conn, prepared(url))], 0.0, timeout=timeout)
    with pytest.raises(wire.WireError) as caught:
        sent.answer()
    return caught.value, time.monotonic() - sent.sent_at


# --------------------------------------------------------------------------- the bytes

SPECS = [
    pytest.param(
        "POST",
        "/bookings",
        {
            "User-Agent": "courtbot/1.0",
            "Authorization": "Bearer t0k-3",
            "Content-Type": "application/json",
            "Idempotency-Key": "wed@2026-01-07T17:00:00Z#3",
        },
        b'{"court_id": "3", "start": "2026-01-07T18:00:00+01:00"}',
        id="section-6-booking",
    ),
    pytest.param(
        "GET",
        "/planning/07-01-2026 x/%2fcourt?from=17:00&who={me}|é",
        {"user-agent": "courtbot/1.0", "X-Player": "Müller"},
        None,
        id="get-odd-target-latin1-header",
    ),
    pytest.param(
        "POST",
        "/login",
        {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        "email=a%40b.example&password=p%C3%A4ss",
        id="form-body-as-text",
    ),
    pytest.param("POST", "/confirm", {}, None, id="post-without-body"),
    pytest.param("PUT", "/bookings/7", {"Content-Type": "application/json"}, b"", id="empty-put"),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), SPECS)
def test_request_bytes_are_the_bytes_requests_puts_on_the_wire(
    method: str, path: str, headers: dict[str, str], body: bytes | str | None
) -> None:
    with club(answers(CREATED)) as server:
        client = club_client.ClubClient(timeout=TIMEOUT)
        url = server.url(path, host="LocalHost")  # urllib3 writes the host lowercased
        request = client.session.prepare_request(
            requests.Request(method, url, headers=headers, data=body)
        )
        client.send(request)
        client.close()
        built = wire.request_bytes(request)
        conn = wire.connect(url, timeout=TIMEOUT)
        wire.exchange(conn, built, timeout=TIMEOUT)
        by_requests, by_wire = (r.raw for r in server.received)
    assert built == by_requests
    assert by_wire == by_requests


def test_request_bytes_leave_out_the_default_port_as_urllib3_does() -> None:
    # A connection to the test club slipped into urllib3's pool for http://club.example
    # (port 80): requests writes its request there, Host and all, with no name lookup.
    with club(answers(CREATED)) as server:
        client = club_client.ClubClient(timeout=TIMEOUT)
        url = "http://Club.Example/api/bookings?x=1"
        request = client.prepare(club_client.RequestSpec("POST", url, {"X-A": "1"}, b"{}"))
        pool = client.session.get_adapter(url).get_connection_with_tls_context(request, True)
        conn = pool._get_conn()
        conn.sock = socket.create_connection(("127.0.0.1", server.port))
        # Past the pool's own _put_conn, which closes what it is handed (one request each).
        HTTPConnectionPool._put_conn(pool, conn)
        client.send(request)
        client.close()
        (captured,) = server.received
    assert captured.raw.startswith(b"POST /api/bookings?x=1 HTTP/1.1\r\nHost: club.example\r\n")
    assert wire.request_bytes(request) == captured.raw


def test_request_bytes_refuse_a_streamed_body() -> None:
    request = requests.Request("POST", "http://club.example/", data=iter([b"a"])).prepare()
    with pytest.raises(TypeError, match="bodies held in memory"):
        wire.request_bytes(request)


# --------------------------------------------------------------------------- the burst


def test_send_burst_writes_100_requests_from_one_thread_never_before_the_trigger() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        items = [(wire.connect(url, timeout=5), prepared(url, f"b{i:03d}")) for i in range(100)]
        trigger = time.time() + 0.4
        sent = wire.send_burst(items, trigger, timeout=5)
        assert sent is not None
        got = [s.answer() for s in sent]
        arrivals = list(server.received)
    assert {s.writer for s in sent} == {threading.get_ident()}
    assert len({(s.burst_wall, s.burst_cpu) for s in sent}) == 1  # one loop for all
    assert sent[0].burst_wall >= sent[-1].sent_at - sent[0].sent_at > 0
    assert sent[0].burst_cpu > 0
    assert all(s.sent_clock >= trigger for s in sent)
    assert sorted(r.key for r in arrivals) == [f"b{i:03d}" for i in range(100)]
    early = [r.arrived - trigger for r in arrivals if r.arrived < trigger]
    assert early == []
    assert [a.status for a in got] == [201] * 100
    assert server.accepted == 100  # each went on the connection opened for it


def test_burst_gate_lets_one_of_100_booking_threads_write_for_all() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        gate = wire.BurstGate(timeout=5)
        ready = [(wire.connect(url, timeout=5), prepared(url, f"g{i}")) for i in range(100)]
        results: dict[int, tuple[int, wire.Sent | None]] = {}

        def booking(i: int) -> None:
            conn, data = ready[i]
            results[i] = (threading.get_ident(), gate.send(trigger, conn, data))

        threads = [threading.Thread(target=booking, args=(i,)) for i in range(100)]
        trigger = time.time() + 1.0  # every thread has joined by then
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        sent = [s for _, s in results.values() if s is not None]
        statuses = [s.answer().status for s in sent]
        arrivals = list(server.received)
    assert len(sent) == 100
    writers = {s.writer for s in sent}
    assert len(writers) == 1
    assert writers <= {ident for ident, _ in results.values()}
    assert statuses == [201] * 100
    assert min(r.arrived for r in arrivals) >= trigger
    assert len(arrivals) == 100


def test_a_booking_that_joins_after_its_burst_left_is_sent_at_once_by_itself() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        gate = wire.BurstGate(timeout=5)
        trigger = time.time() + 0.3
        first = gate.send(trigger, wire.connect(url, timeout=5), prepared(url, "on-time"))
        late: list[wire.Sent | None] = []
        joiner = threading.Thread(
            target=lambda: late.append(
                gate.send(trigger, wire.connect(url, timeout=5), prepared(url, "late"))
            )
        )
        joiner.start()
        joiner.join(5)
        assert first is not None and late[0] is not None
        assert late[0].answer().status == first.answer().status == 201
    assert late[0].writer == joiner.ident != first.writer
    assert late[0].sent_clock >= trigger


class SteppedClock:
    """time.time(), stepped back by ``step`` seconds (an NTP correction) once it has read
    the trigger or later ``after`` times."""

    def __init__(self, trigger: float, after: int, step: float) -> None:
        self.trigger, self.after, self.step = trigger, after, step
        self.past = 0

    def __call__(self) -> float:
        now = time.time()
        if self.past >= self.after:
            return now - self.step
        if now >= self.trigger:
            self.past += 1
        return now


def test_a_clock_stepped_back_mid_burst_holds_the_rest_until_it_reads_the_trigger_again() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        items = [(wire.connect(url, timeout=5), prepared(url, f"s{i}")) for i in range(6)]
        trigger = time.time() + 0.3
        # Steps back after the wait and the first writes have read the trigger.
        clock = SteppedClock(trigger, after=4, step=0.3)
        sent = wire.send_burst(items, trigger, timeout=5, clock=clock)
        assert sent is not None
        for s in sent:
            s.answer()
    assert all(s.sent_clock >= trigger for s in sent)
    gaps = [b.sent_at - a.sent_at for a, b in itertools.pairwise(sent)]
    held = [i + 1 for i, gap in enumerate(gaps) if gap >= 0.25]
    assert len(held) == 1  # one write waited for the clock to read the trigger again
    assert held[0] >= 1  # and it came after the burst had begun


def test_send_burst_sends_nothing_when_stopped_before_the_trigger() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        stop = threading.Event()
        items = [(wire.connect(url, timeout=5), prepared(url))]
        threading.Timer(0.1, stop.set).start()
        assert wire.send_burst(items, time.time() + 1.0, timeout=5, stop=stop) is None
        time.sleep(0.05)
        assert server.received == []


def test_a_held_connection_the_club_closed_is_opened_again_before_the_trigger() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        conn = wire.connect(url, timeout=5)
        time.sleep(0.05)
        with server.lock:
            server.sockets[0].shutdown(socket.SHUT_RDWR)  # the club drops the idle connection
        (sent,) = wire.send_burst([(conn, prepared(url))], time.time() + 0.4, timeout=5) or []
        answer = sent.answer()
    assert answer.status == 201
    assert server.accepted == 2
    assert sent.connection is not conn
    assert conn.closed


def test_a_tls13_session_ticket_does_not_make_a_held_connection_look_dropped(
    tmp_path: Path,
) -> None:
    files = make_ca(tmp_path)
    with club(answers(CREATED), tls=files.server_context()) as server:
        url = server.url(host="localhost")
        conn = wire.connect(url, timeout=5, verify=str(files.ca))
        time.sleep(0.2)  # the server's tickets are waiting on the socket by now
        assert conn.dropped() is False
        (sent,) = wire.send_burst([(conn, prepared(url))], time.time() + 0.3, timeout=5) or []
        assert sent.answer().status == 201
    assert server.accepted == 1
    assert sent.connection is conn


def test_a_dropped_connection_that_cannot_be_opened_again_fails_unsent() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
        conn = wire.connect(url, timeout=5)
    # The club is gone: its listener closed and the held connection with it.
    (sent,) = wire.send_burst([(conn, prepared(url))], time.time() + 0.3, timeout=5) or []
    assert sent.error is not None
    assert str(sent.error) == (
        "the connection opened ahead was closed by the club and could not be opened again "
        "before the trigger"
    )
    assert sent.error.lost is False
    with pytest.raises(wire.WireError, match="could not be opened again"):
        sent.answer()


# --------------------------------------------------------------------------- the answer


def test_headers_dribbled_one_by_one_time_out_at_the_deadline() -> None:
    behave = dribble(b"HTTP/1.1 201 Created\r\n", b"X-Slow: 1\r\n", 0.3)
    with club(behave) as server:
        error, held = failure(server.url())
    assert isinstance(error, wire.WireTimeout)
    assert str(error) == "no answer within 1 s"
    assert error.lost is True
    assert error.partial is None
    assert TIMEOUT <= held < TIMEOUT + 1.0


def test_endless_100_continue_times_out_at_the_deadline() -> None:
    behave = dribble(b"", b"HTTP/1.1 100 Continue\r\n\r\n", 0.02)
    with club(behave) as server:
        error, held = failure(server.url())
    assert isinstance(error, wire.WireTimeout)
    assert re.fullmatch(
        r"no answer within 1 s \(only \d+ interim 1xx answer\(s\), no final one\)", str(error)
    )
    assert TIMEOUT <= held < TIMEOUT + 1.0


def test_an_endless_body_times_out_at_the_deadline_with_what_came() -> None:
    head = b"HTTP/1.1 201 Created\r\nContent-Length: 100000\r\n\r\n"
    with club(dribble(head, b"x", 0.1)) as server:
        error, held = failure(server.url())
    assert isinstance(error, wire.WireTimeout)
    assert (
        str(error) == "no complete answer within 1 s (HTTP 201 came, its body did not end in time)"
    )
    assert error.partial is not None
    assert error.partial.status == 201
    assert 0 < len(error.partial.body) < 100
    assert TIMEOUT <= held < TIMEOUT + 1.0


def test_interim_answers_are_skipped_up_to_the_final_one() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n" + CREATED
    )
    with club(answers(raw)) as server:
        answer = one(server.url())
    assert (answer.status, answer.reason, answer.interim) == (201, "Created", 3)
    assert answer.body == b'{"id": "b1"}'
    assert "Link" not in answer.headers


def test_a_huge_body_is_cut_at_the_cap() -> None:
    def huge(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        size = 20 * MIB
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        with contextlib.suppress(OSError):
            for _ in range(size // 65536):
                sock.sendall(b"x" * 65536)
        return False

    with club(huge) as server:
        url = server.url()
        conn = wire.connect(url, timeout=5)
        answer = wire.exchange(conn, prepared(url), timeout=5)
    assert answer.status == 200
    assert answer.truncated is True
    assert len(answer.body) == wire.MAX_BODY_BYTES == club_client.MAX_BODY_BYTES
    assert conn.closed  # the rest is not read


def test_a_chunked_body_with_extensions_and_trailers() -> None:
    raw = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5;note=x\r\n{"id"\r\n'
        b'7\r\n: "b1"}\r\n'
        b"0\r\nX-Trailer: 1\r\n\r\n"
    )
    with club(answers(raw)) as server:
        url = server.url()
        conn = wire.connect(url, timeout=TIMEOUT)
        answer = wire.exchange(conn, prepared(url), timeout=TIMEOUT)
        again = wire.exchange(conn, prepared(url), timeout=TIMEOUT)  # kept alive
    assert answer.body == again.body == b'{"id": "b1"}'
    assert server.accepted == 1


def _encoded(name: str, payload: bytes) -> bytes:
    if name == "gzip":
        return gzip.compress(payload)
    if name == "gzip-members":
        return gzip.compress(payload[:10]) + gzip.compress(payload[10:])
    if name == "deflate":
        return zlib.compress(payload)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return raw.compress(payload) + raw.flush()


@pytest.mark.parametrize(
    ("encoding", "form"),
    [("gzip", "gzip"), ("gzip", "gzip-members"), ("deflate", "deflate"), ("deflate", "raw")],
)
def test_an_encoded_body_is_decoded_as_requests_decodes_it(encoding: str, form: str) -> None:
    payload = b'{"id": "b1", "note": "' + b"booked " * 200 + b'"}'
    body = _encoded(form, payload)
    raw = b"HTTP/1.1 201 Created\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        encoding.encode(),
        len(body),
        body,
    )
    with club(answers(raw)) as server:
        url = server.url()
        by_requests = requests.post(url, data=b"{}", timeout=TIMEOUT).content
        answer = one(url)
    assert answer.body == by_requests == payload


def test_a_gzip_bomb_unpacks_no_further_than_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (64 * MIB))
    raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(bomb),
        bomb,
    )
    with club(answers(raw)) as server:
        answer = one(server.url(), timeout=5)
    assert answer.truncated is True
    assert len(answer.body) == wire.MAX_BODY_BYTES


def test_a_body_without_framing_is_read_to_the_close() -> None:
    def legacy(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        sock.sendall(b"HTTP/1.0 200 OK\r\nX-A: 1\r\nX-a: 2\r\n folded\r\n\r\n")
        sock.sendall(b'{"id": 7}')
        return False

    with club(legacy) as server:
        answer = one(server.url())
    assert answer.body == b'{"id": 7}'
    assert answer.headers["x-a"] == "1, 2 folded"
    assert answer.headers.get_all("X-A") == ["1", "2 folded"]


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_reset_before_the_answer_is_an_error_that_may_have_reached_the_club() -> None:
    def reset(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        _reset(sock)
        return False

    with club(reset) as server:
        error, _ = failure(server.url())
    assert str(error) == "the club's server reset the connection without a full answer"
    assert error.lost is True
    assert error.partial is None


def test_a_close_in_the_middle_of_the_body_keeps_what_came() -> None:
    def cut(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        sock.sendall(b'HTTP/1.1 201 Created\r\nContent-Length: 50\r\n\r\n{"id"')
        return False

    with club(cut) as server:
        error, _ = failure(server.url())
    assert str(error) == (
        "the club's server closed the connection in the middle of its answer (HTTP 201)"
    )
    assert error.partial is not None
    assert error.partial.body == b'{"id"'


def test_a_close_without_an_answer() -> None:
    with club(lambda sock, request, stop: False) as server:
        error, _ = failure(server.url())
    assert str(error) == "the club's server closed the connection without a full answer"


def test_an_answer_that_is_no_http() -> None:
    with club(answers(b"SSH-2.0-OpenSSH_9.6\r\n")) as server:
        error, _ = failure(server.url())
    assert str(error) == (
        "the club's answer does not start with a status line: b'SSH-2.0-OpenSSH_9.6'"
    )


def test_no_body_is_read_after_a_204() -> None:
    with club(answers(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")) as server:
        answer = one(server.url())
    assert (answer.status, answer.body) == (204, b"")


def test_a_refused_connection_says_so() -> None:
    with club(answers(CREATED)) as server:
        url = server.url()
    with pytest.raises(wire.WireError) as caught:
        wire.connect(url, timeout=TIMEOUT)
    assert str(caught.value) == "connection refused by the club's server"
    assert caught.value.lost is False


# --------------------------------------------------------------------------- TLS


@pytest.fixture
def tls_files(tmp_path: Path) -> CaFiles:
    return make_ca(tmp_path / "club")


def test_tls_with_a_ca_file_trusted_the_way_requests_takes_it(tls_files: CaFiles) -> None:
    with club(answers(CREATED), tls=tls_files.server_context()) as server:
        for host in ("localhost", "127.0.0.1"):
            url = server.url(host=host)
            by_requests = requests.post(url, data=b"{}", timeout=TIMEOUT, verify=str(tls_files.ca))
            answer = one(url, verify=str(tls_files.ca))
            assert (answer.status, answer.body) == (by_requests.status_code, by_requests.content)
        # The CA's directory form (OpenSSL's hashed names) is taken as requests takes it.
        hashed = tls_files.ca.parent / "dir"
        hashed.mkdir()
        (hashed / f"{_subject_hash(tls_files.ca)}.0").write_bytes(tls_files.ca.read_bytes())
        assert one(server.url(host="localhost"), verify=str(hashed)).status == 201


def _subject_hash(ca: Path) -> str:
    """The name OpenSSL looks a CA up by in a CA directory (``openssl x509 -hash``)."""
    done = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(ca)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("no openssl binary to name a hashed CA directory")
    return done.stdout.strip()


def test_tls_with_a_certificate_nobody_vouches_for_is_refused_clearly(tls_files: CaFiles) -> None:
    other = make_ca(tls_files.ca.parent.parent / "other")
    with club(answers(CREATED), tls=tls_files.server_context()) as server:
        url = server.url(host="localhost")
        with pytest.raises(wire.WireError) as by_certifi:
            wire.connect(url, timeout=TIMEOUT)
        with pytest.raises(wire.WireError) as by_other:
            wire.connect(url, timeout=TIMEOUT, verify=str(other.ca))
    assert str(by_certifi.value) == (
        "the club's TLS certificate is not trusted (unable to get local issuer certificate); "
        "it was checked against certifi's CA bundle: if the club uses its own CA, give that "
        "CA's certificate file"
    )
    assert str(by_other.value) == (
        "the club's TLS certificate is not trusted (unable to get local issuer certificate); "
        f"it was checked against the CA bundle {str(other.ca)!r}: if the club uses its own CA, "
        "give that CA's certificate file"
    )
    assert by_certifi.value.lost is False


def test_tls_for_another_host_name_is_refused_clearly(tmp_path: Path) -> None:
    files = make_ca(tmp_path, names=("club.example",), ips=())
    with (
        club(answers(CREATED), tls=files.server_context()) as server,
        pytest.raises(wire.WireError) as caught,
    ):
        wire.connect(server.url(host="localhost"), timeout=TIMEOUT, verify=str(files.ca))
    assert str(caught.value) == (
        "the club's TLS certificate is not valid for 'localhost' (Hostname mismatch, "
        "certificate is not valid for 'localhost'.): check the host name in the URL"
    )


def test_tls_request_bytes_equal_requests_bytes(tls_files: CaFiles) -> None:
    with club(answers(CREATED), tls=tls_files.server_context()) as server:
        url = server.url(host="localhost")
        session = requests.Session()
        session.verify = str(tls_files.ca)
        request = session.prepare_request(
            requests.Request("POST", url, headers={"Idempotency-Key": "t1"}, data=b"{}")
        )
        session.send(request, timeout=TIMEOUT)
        session.close()
        one_answer = wire.exchange(
            wire.connect(url, timeout=TIMEOUT, verify=str(tls_files.ca)),
            wire.request_bytes(request),
            timeout=TIMEOUT,
        )
        by_requests, by_wire = (r.raw for r in server.received)
    assert one_answer.status == 201
    assert by_wire == by_requests


def test_a_missing_ca_path_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"cannot find the TLS CA certificate bundle '/nowhere/ca.pem'"
    ):
        wire.connect("https://localhost:1/", timeout=TIMEOUT, verify="/nowhere/ca.pem")


# --------------------------------------------------------------------------- bot's trigger path

DESIRED = datetime(2030, 6, 3, 17, 0, tzinfo=UTC)
BOOK_TOKEN = "tok-W1re-5e3f9a7c"


class RecordingGate(wire.BurstGate):
    """The booking context's burst gate, keeping every Sent it hands back."""

    def __init__(self, *, timeout: float, clock: Callable[[], float] = time.time) -> None:
        super().__init__(timeout=timeout, clock=clock)
        self.record: list[wire.Sent] = []

    def send(self, *args: Any, **kwargs: Any) -> wire.Sent | None:
        sent = super().send(*args, **kwargs)
        if sent is not None:
            self.record.append(sent)
        return sent


@dataclass
class Bookings:
    """Instances in a real SQLite database, booked with a real context (shared by every
    booking thread, as in the daemon) against a club on loopback."""

    factory: sessionmaker[Session]
    ctx: bot.BookingContext
    gate: RecordingGate

    def add(
        self, schedule: str, trigger: float, *, court: str = "3", courts: list[str] | None = None
    ) -> str:
        """A pending instance for ``court`` (or ``courts``, tried in order)."""
        courts = courts or [court]
        key = utils.instance_key(schedule, DESIRED)
        with transaction(self.factory) as session:
            session.add(
                Instance(
                    key=key,
                    schedule_id=schedule,
                    type="one-off",
                    desired_time=DESIRED,
                    trigger_time=datetime.fromtimestamp(trigger, UTC),
                    timezone="Europe/Berlin",
                    rrule=None,
                    court_id=",".join(courts),
                    courts=json.dumps(courts),
                    token_name="default",
                    duration_minutes=60,
                    status=PENDING,
                    attempts=0,
                )
            )
        return key

    def row(self, key: str) -> Instance:
        with self.factory() as session:
            row = session.scalar(select(Instance).where(Instance.key == key))
            assert row is not None
            return row


def bookings(
    path: Path,
    url: str,
    *,
    timeout: float = TIMEOUT,
    clock: Callable[[], float] = time.time,
    flow: dict[str, Any] | None = None,
) -> Bookings:
    engine = models.make_engine(f"sqlite:///{path}")
    factory = models.session_factory(engine)
    fernet = MultiFernet([Fernet(Fernet.generate_key())])
    with transaction(factory) as session:
        session.add(
            Token(id="default", encrypted_token=fernet.encrypt(BOOK_TOKEN.encode()).decode())
        )
    ctx = bot.BookingContext(
        factory=factory,
        fernet=fernet,
        client=club_client.ClubClient(timeout=timeout),
        api_url=url,
        retry_base=0.01,
        stop=threading.Event(),
        notify=lambda outcome: None,
        template=None if flow is None else parse_flow(flow, api_url=None, name="club.json"),
        clock=clock,
    )
    gate = RecordingGate(timeout=timeout, clock=clock)
    ctx.burst = gate
    return Bookings(factory, ctx, gate)


def routes(answers_by_path: dict[str, bytes]) -> Behaviour:
    def behave(sock: socket.socket, request: Received, stop: threading.Event) -> bool:
        path = request.raw.split(b" ", 2)[1].split(b"?")[0].decode()
        sock.sendall(answers_by_path[path])
        return True

    return behave


SLOT_FLOW_ANSWERS = {
    "/plan": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n"
        b"Set-Cookie: SID=c00kie-42; Path=/\r\nSet-Cookie: lang=de; Path=/\r\n\r\n"
        b'{"slot": "s3"}'
    ),
    "/bookings": CREATED,
}


def slot_flow(url: str) -> dict[str, Any]:
    """A flow whose first request at the trigger is an at_trigger step that sets cookies."""
    return {
        "hosts": ["127.0.0.1"],
        "steps": [
            {
                "name": "plan",
                "at_trigger": True,
                "method": "GET",
                "url": url.replace("/bookings", "/plan") + "?day={start:%d-%m-%Y}",
                "headers": {"Authorization": "Bearer {token}"},
                "extract": {"id": {"json": "slot"}},
            },
            {
                "name": "book",
                "booking": True,
                "url": url,
                "headers": {"Authorization": "Bearer {token}"},
                "json": {"slot": "{plan.id}", "court": "{court_id}"},
                "booking_ref": "id",
            },
        ],
    }


@pytest.mark.parametrize("with_flow", [False, True], ids=["section-6", "at-trigger-step"])
def test_the_burst_path_puts_on_the_wire_the_bytes_of_the_requests_path(
    tmp_path: Path, with_flow: bool
) -> None:
    received: dict[str, list[bytes]] = {}
    for way in ("requests", "burst"):
        with club(routes(SLOT_FLOW_ANSWERS)) as server:
            url = server.url()
            made = bookings(
                tmp_path / f"{way}.sqlite", url, flow=slot_flow(url) if with_flow else None
            )
            # The requests path: a trigger just passed; the burst path: one ahead.
            trigger = time.time() + (0.6 if way == "burst" else -1.0)
            key = made.add("mon", trigger)
            assert bot.book_slot(key, made.ctx) == BOOKED
            received[way] = [r.raw for r in server.received]
            port = server.port
            # Written through the gate on the burst path only, and at most once.
            assert len(made.gate.record) == (1 if way == "burst" else 0)
            assert made.row(key).booking_ref == "b1"
        # Requests carry the club's port: the same for both runs' comparison.
        received[way] = [raw.replace(str(port).encode(), b"PORT") for raw in received[way]]
    assert received["burst"] == received["requests"]
    assert len(received["burst"]) == (2 if with_flow else 1)
    if with_flow:
        # The cookies the at_trigger step's answer set (read by wire) reached the booking's jar.
        assert b"\r\nCookie: SID=c00kie-42; lang=de\r\n" in received["burst"][1]


def test_100_bookings_sharing_a_trigger_are_written_by_one_thread(tmp_path: Path) -> None:
    shift = [0.0]  # the bookings' clock, moved forward once every booking waits

    def clock() -> float:
        return time.time() + shift[0]

    with club(answers(CREATED)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url(), timeout=5, clock=clock)
        trigger = time.time() + 600
        keys = [made.add(f"b{i:03d}", trigger) for i in range(100)]
        results: dict[str, tuple[int, str | None]] = {}

        def booking(key: str) -> None:
            results[key] = (threading.get_ident(), bot.book_slot(key, made.ctx))

        threads = [threading.Thread(target=booking, args=(key,)) for key in keys]
        for thread in threads:
            thread.start()
        # Every booking claimed and holding its connection: then the trigger comes near.
        deadline = time.monotonic() + 60
        while server.accepted < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.accepted == 100
        shift[0] = (trigger - 2.0) - time.time()
        for thread in threads:
            thread.join(30)
        arrivals = list(server.received)
        real_trigger = trigger - shift[0]
    assert sorted(status for _, status in results.values()) == [BOOKED] * 100
    record = made.gate.record
    assert len(record) == 100
    writers = {sent.writer for sent in record}
    assert len(writers) == 1
    assert writers <= {ident for ident, _ in results.values()}  # one of the bookings wrote
    assert all(sent.error is None and sent.sent_clock >= trigger for sent in record)
    # One request per booking, each on the connection opened ahead for it, none early.
    assert sorted(r.key for r in arrivals) == sorted(keys)
    assert server.accepted == 100
    assert [r.arrived for r in arrivals if r.arrived < real_trigger] == []


def test_a_booking_whose_connection_cannot_be_opened_ahead_goes_through_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(url: str, *, timeout: float, verify: bool | str = True) -> wire.Connection:
        raise wire.WireError("connection refused by the club's server", lost=False)

    monkeypatch.setattr(wire, "connect", refused)
    with club(answers(CREATED)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        key = made.add("mon", time.time() + wire.HAND_OVER_SECONDS + 0.75)
        assert bot.book_slot(key, made.ctx) == BOOKED
        arrivals = list(server.received)
    assert made.gate.record == []
    assert [r.key for r in arrivals] == [f"{key}"]
    assert made.row(key).booking_ref == "b1"
    assert made.row(key).first_sent_at is not None


def test_a_slow_header_club_times_out_at_the_http_timeout_on_the_burst_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot")
    with club(dribble(b"HTTP/1.1 200 OK\r\n", b"X-Wait: 1\r\n", 0.2)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url(), timeout=1.0)
        key = made.add("mon", time.time() + wire.HAND_OVER_SECONDS + 0.75)
        assert bot.book_slot(key, made.ctx) == FAILED
        arrivals = list(server.received)
    (sent,) = made.gate.record
    assert sent.timeout == 1.0
    attempts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attempt")]
    assert attempts == [f"attempt {key} court=3 #{n}: no answer within 1 s" for n in (1, 2, 3)]
    row = made.row(key)
    assert row.last_error == "court 3: no booking after 3 attempts (last: no answer within 1 s)"
    assert row.attempts == 3
    assert [r.key for r in arrivals] == [key] * 3  # the first through wire, then requests


def test_a_request_written_at_the_trigger_is_read_when_the_active_role_goes_right_after(
    tmp_path: Path,
) -> None:
    """CONTRACT section 10: a daemon that loses the active role sends nothing more, but a
    request already on the wire is in flight: its answer is read and the booking finishes."""
    with club(answers(CREATED)) as server:
        made = bookings(tmp_path / "db.sqlite", server.url())
        real_send = made.gate.send

        def send_then_lose(*args: Any, **kwargs: Any) -> wire.Sent | None:
            sent = real_send(*args, **kwargs)
            made.ctx.may_send.clear()  # what leader.Roles does when the lock is lost
            made.ctx.stop.set()
            return sent

        made.gate.send = send_then_lose  # type: ignore[method-assign]
        key = made.add("mon", time.time() + wire.HAND_OVER_SECONDS + 0.75)
        assert bot.book_slot(key, made.ctx) == BOOKED
        arrivals = list(server.received)
    assert len(made.gate.record) == 1
    assert [r.key for r in arrivals] == [key]
    assert (made.row(key).status, made.row(key).booking_ref) == (BOOKED, "b1")
