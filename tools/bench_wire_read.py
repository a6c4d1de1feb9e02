"""``python tools/bench.py wire-read``: the read path of ``wire.read_answer`` beside h11's parser.

Issue 22 asks whether the hand-written HTTP/1.1 reader in ``wire.py`` should give way to h11 (the
sans-IO parser under httpcore/httpx). This measures only the read: the request is written, the
answer is read and parsed to its last byte, over a real TCP connection on 127.0.0.1, by each
parser in turn, on three answers a club sends:

- ``201 JSON``: a typical booking answer (Content-Length, a small JSON body, a Set-Cookie);
- ``chunked``: the same body in three chunks (Transfer-Encoding: chunked);
- ``100+201``: ``100 Continue`` then the 201.

Two ways: ``in buffer`` (the whole answer already in the socket when the read starts: the
parser's own cost plus its recv calls) and ``round trip`` (a club in a process of its own answers
each request as it arrives: what the booking sees). Each figure is min / median / max in
microseconds over ``REPEATS`` reads, after a warm-up. Needs h11 (``pip install h11==0.16.0``).
"""

from __future__ import annotations

import multiprocessing
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import h11  # noqa: E402

import wire  # noqa: E402

REPEATS = 2000
WARM_UP = 200
BODY = b'{"id": "bk-20261130-3", "court": "3", "status": "confirmed", "price": "24.00"}'
REQUEST = (
    b"POST /bookings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)
_HEAD = (
    b"Date: Mon, 30 Nov 2026 17:00:00 GMT\r\nServer: club\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Set-Cookie: session=abc123; Path=/; HttpOnly\r\n"
)
ANSWERS: dict[str, bytes] = {
    "201 JSON": b"HTTP/1.1 201 Created\r\n"
    + _HEAD
    + b"Content-Length: %d\r\n\r\n" % len(BODY)
    + BODY,
    "chunked": b"HTTP/1.1 201 Created\r\n"
    + _HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (BODY[:20], BODY[20:50], BODY[50:]))
    + b"0\r\n\r\n",
    "100+201": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n"
    + _HEAD
    + b"Content-Length: %d\r\n\r\n" % len(BODY)
    + BODY,
}

#: Set up ahead on a connection (as ``wire`` opens its connection ahead, and a client on h11
#: would have sent its request events); the read it returns is what is timed.
Reader = Callable[[socket.socket], Callable[[], tuple[int, bytes]]]


def wire_reader(sock: socket.socket) -> Callable[[], tuple[int, bytes]]:
    conn = wire.Connection(wire.Origin("http", "127.0.0.1", 80), sock, timeout=5.0)

    def read() -> tuple[int, bytes]:
        now = time.monotonic()
        got = wire.read_answer(conn, deadline=now + 5.0, timeout=5.0, sent_at=now)
        return got.status, got.body

    return read


def h11_reader(sock: socket.socket) -> Callable[[], tuple[int, bytes]]:
    """As a client built on h11 reads: feed what recv gives, take events up to the end of the
    message, interim answers skipped."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="POST",
            target="/bookings",
            headers=[("Host", "127.0.0.1"), ("Content-Length", "2")],
        )
    )
    conn.send(h11.Data(data=b"{}"))
    conn.send(h11.EndOfMessage())

    def read() -> tuple[int, bytes]:
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("closed before the end of the answer")

    return read


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """A client and a server socket joined by TCP on 127.0.0.1 (TCP_NODELAY, as wire sets)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def in_buffer(reader: Reader, answer: bytes) -> list[float]:
    """Microseconds per read, the whole answer waiting in the socket when the read starts."""
    times: list[float] = []
    for run in range(WARM_UP + REPEATS):
        client, server = loopback_pair()
        try:
            read = reader(client)
            server.sendall(answer)
            time.sleep(0.0002)  # let the kernel hand it over to the client's side
            started = time.perf_counter()
            status, body = read()
            spent = time.perf_counter() - started
        finally:
            client.close()
            server.close()
        assert status == 201 and body == BODY, (status, body)
        if run >= WARM_UP:
            times.append(spent * 1e6)
    return times


def _club(port_out: multiprocessing.connection.Connection, answer: bytes) -> None:
    """A club in a process of its own: answers each request on its connection as it comes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port_out.send(listener.getsockname()[1])
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while True:
                    data = b""
                    while not data.endswith(b"{}"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    conn.sendall(answer)


def round_trip(reader: Reader, answer: bytes) -> list[float]:
    """Microseconds from the request's write to the answer read, a club answering at once."""
    ours, theirs = multiprocessing.Pipe()
    club = multiprocessing.Process(target=_club, args=(theirs, answer), daemon=True)
    club.start()
    try:
        port = ours.recv()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times: list[float] = []
        try:
            for run in range(WARM_UP + REPEATS):
                read = reader(sock)
                started = time.perf_counter()
                sock.sendall(REQUEST)
                status, body = read()
                spent = time.perf_counter() - started
                assert status == 201 and body == BODY, (status, body)
                if run >= WARM_UP:
                    times.append(spent * 1e6)
        finally:
            sock.close()
        return times
    finally:
        club.kill()
        club.join()


def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main() -> int:
    readers: dict[str, Reader] = {"wire (hand)": wire_reader, f"h11 {h11.__version__}": h11_reader}
    print(f"python {sys.version.split()[0]}, {REPEATS} reads each, microseconds min / median / max")
    print("| answer | way | " + " | ".join(readers) + " |")
    print("|---|---|" + "---|" * len(readers))
    for name, answer in ANSWERS.items():
        for way, measure in (("in buffer", in_buffer), ("round trip", round_trip)):
            cells = [spread(measure(reader, answer)) for reader in readers.values()]
            print(f"| {name} | {way} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
