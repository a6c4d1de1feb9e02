"""A club for ``make bench`` that runs in its own process and lets the kernel say when each
request arrived.

Every socket has ``SO_TIMESTAMPNS`` on: ``recvmsg`` hands back, with the bytes, the time (epoch,
CLOCK_REALTIME, ns) at which the kernel received the last segment it read. A request's arrival
is the stamp of the read that completed it (the moment the club held the whole request),
whatever this process was doing then: it never competes with the clients for the GIL, and a
late wake-up here does not make an arrival look late. Where the kernel gives no stamp, arrival
falls back to ``time.time()`` after the read and the ``stamps`` field of ``ready`` says so.

With kernel stamps the club looks at its sockets every ``tick`` (5 ms) instead of sleeping on
them: arriving data then never wakes it, so on loopback it never preempts a client that is
writing a burst on the same core (a club on another machine would not either).

It speaks HTTP/1.1 over plain TCP, or TLS (``--cert``/``--key``; done through memory BIOs so
that the raw socket, and its stamps, stay in hand). Each request is answered ``201`` with
``{"id": "<Idempotency-Key>"}`` after ``delay`` seconds, its ``Date`` header read off the
club's own clock: ours plus ``offset`` seconds (a club whose clock runs ahead or behind).
``cost`` seconds are added to every new TLS connection before its handshake goes on (the
round trips to a distant club that a connection opened at the trigger pays and one opened
ahead does not).

Control on stdin, one command a line: ``delay S``, ``cost S``, ``offset S``, ``dump`` (every
request recorded since the last dump as JSON lines, then ``end``), ``quit``. Stdout's first line is
``ready {"port": N, "stamps": "kernel"|"user"}``.

Standard library only; Linux for the kernel stamps.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import re
import selectors
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform.startswith("linux") else 0)
_ANCILLARY = socket.CMSG_SPACE(16)
_KEY_RE = re.compile(rb"\r\nidempotency-key:[ \t]*([^\r\n]*)", re.IGNORECASE)
_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


@dataclass
class Conn:
    """One client connection."""

    sock: socket.socket
    number: int
    accepted: float
    tls: ssl.SSLObject | None = None
    incoming: ssl.MemoryBIO | None = None
    outgoing: ssl.MemoryBIO | None = None
    hold_until: float = 0.0
    held: bytearray = field(default_factory=bytearray)
    handshaken: bool = False
    plain: bytearray = field(default_factory=bytearray)
    first: float = 0.0
    unsent: bytearray = field(default_factory=bytearray)
    closed: bool = False


class Club:
    def __init__(
        self,
        *,
        delay: float,
        cost: float,
        tls: ssl.SSLContext | None,
        tick: float = 0.005,
        offset: float = 0.0,
    ) -> None:
        self.tick = tick
        self.offset = offset
        self.delay = delay
        self.cost = cost
        self.context = tls
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
        self.timers: list[tuple[float, int, Any]] = []
        self.serial = 0
        self.records: list[dict[str, Any]] = []
        self.connections = 0
        self.kernel_stamps = SO_TIMESTAMPNS != 0
        self.running = True

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        port = self.listener.getsockname()[1]
        stamps = "kernel" if self.kernel_stamps else "user"
        self.say(f"ready {json.dumps({'port': port, 'stamps': stamps})}")
        while self.running:
            # Without kernel stamps, arrival is read off the clock: then wait on the sockets.
            ticking = self.kernel_stamps and self.tick > 0
            pause = self.tick if ticking else None
            if self.timers:
                due = max(0.0, self.timers[0][0] - time.time())
                pause = due if pause is None else min(pause, due)
            if ticking and pause:
                time.sleep(pause)
            for key, mask in self.selector.select(0 if ticking else pause):
                if key.data == "listener":
                    self.accept()
                elif key.data == "stdin":
                    self.command(sys.stdin.readline())
                else:
                    conn: Conn = key.data
                    if mask & selectors.EVENT_READ:
                        self.readable(conn)
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        self.flush(conn)
            now = time.time()
            while self.timers and self.timers[0][0] <= now:
                _, _, action = heapq.heappop(self.timers)
                action()

    def later(self, when: float, action: Any) -> None:
        self.serial += 1
        heapq.heappush(self.timers, (when, self.serial, action))

    def say(self, line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def command(self, line: str) -> None:
        words = line.split()
        if not words or words[0] == "quit":
            self.running = False
        elif words[0] == "delay":
            self.delay = float(words[1])
        elif words[0] == "cost":
            self.cost = float(words[1])
        elif words[0] == "offset":
            self.offset = float(words[1])
        elif words[0] == "dump":
            records, self.records = self.records, []
            for record in records:
                self.say(json.dumps(record))
            self.say("end")

    # ------------------------------------------------------------------ connections

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            if self.kernel_stamps:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                except OSError:
                    self.kernel_stamps = False
            self.connections += 1
            conn = Conn(sock, self.connections, time.time())
            if self.context is not None:
                conn.incoming, conn.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                conn.tls = self.context.wrap_bio(conn.incoming, conn.outgoing, server_side=True)
                conn.hold_until = conn.accepted + self.cost
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def readable(self, conn: Conn) -> None:
        try:
            data, ancillary, _, _ = conn.sock.recvmsg(65536, _ANCILLARY)
        except BlockingIOError:
            return
        except OSError:
            self.close(conn)
            return
        stamp = 0.0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                seconds, nanos = struct.unpack("qq", payload[:16])
                stamp = seconds + nanos / 1e9
        if not stamp:
            stamp = time.time()
        if not data:
            self.close(conn)
            return
        if conn.tls is None:
            self.received(conn, data, stamp)
            return
        assert conn.incoming is not None
        if not conn.handshaken and (conn.held or time.time() < conn.hold_until):
            if not conn.held:
                self.later(conn.hold_until, lambda: self.release(conn))
            conn.held += data
            return
        conn.incoming.write(data)
        self.pump(conn, stamp)

    def release(self, conn: Conn) -> None:
        if conn.closed or not conn.held:
            return
        assert conn.incoming is not None
        conn.incoming.write(bytes(conn.held))
        conn.held.clear()
        self.pump(conn, time.time())

    def pump(self, conn: Conn, stamp: float) -> None:
        """Move a TLS connection on: the handshake, then every decrypted byte."""
        assert conn.tls is not None
        try:
            if not conn.handshaken:
                conn.tls.do_handshake()
                conn.handshaken = True
            while True:
                chunk = conn.tls.read(65536)
                if not chunk:
                    self.close(conn)
                    return
                self.received(conn, chunk, stamp)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError):
            self.close(conn)
            return
        self.send_tls(conn)

    def send_tls(self, conn: Conn) -> None:
        assert conn.outgoing is not None
        pending = conn.outgoing.read()
        if pending:
            self.write(conn, pending)

    def write(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        conn.unsent += data
        self.flush(conn)

    def flush(self, conn: Conn) -> None:
        while conn.unsent:
            try:
                sent = conn.sock.send(conn.unsent)
            except BlockingIOError:
                break
            except OSError:
                self.close(conn)
                return
            del conn.unsent[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.unsent else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(conn.sock, events, conn)

    # ------------------------------------------------------------------ HTTP

    def received(self, conn: Conn, data: bytes, stamp: float) -> None:
        if not conn.plain:
            conn.first = stamp
        conn.plain += data
        while True:
            end = conn.plain.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(conn.plain[: end + 2])
            match = _LENGTH_RE.search(head)
            length = int(match.group(1)) if match else 0
            if len(conn.plain) < end + 4 + length:
                return
            del conn.plain[: end + 4 + length]
            self.request(conn, head, stamp)
            if conn.plain:
                conn.first = stamp

    def request(self, conn: Conn, head: bytes, stamp: float) -> None:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        match = _KEY_RE.search(head)
        key = match.group(1).decode("latin-1") if match else ""
        self.records.append(
            {
                "key": key,
                "line": line,
                "arrived": stamp,
                "first": conn.first,
                "connection": conn.number,
                "accepted": conn.accepted,
                "connection_age": stamp - conn.accepted,
            }
        )
        body = json.dumps({"id": key or "none"}).encode()
        answer = (
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if line.startswith("HEAD "):
            answer = answer[: answer.index(b"\r\n\r\n") + 4]
        self.later(time.time() + self.delay, lambda: self.answer(conn, answer))

    def answer(self, conn: Conn, answer: bytes) -> None:
        if conn.closed:
            return
        # The club's clock when it writes the answer, as a server stamps its Date.
        date = formatdate(time.time() + self.offset, usegmt=True).encode()
        answer = answer.replace(b"\r\n", b"\r\nDate: " + date + b"\r\n", 1)
        if conn.tls is None:
            self.write(conn, answer)
            return
        try:
            conn.tls.write(answer)
        except (ssl.SSLError, OSError):
            self.close(conn)
            return
        self.send_tls(conn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--cost", type=float, default=0.0, help="seconds added per TLS handshake")
    parser.add_argument("--cert", help="TLS certificate (PEM); plain TCP without it")
    parser.add_argument("--key", help="TLS private key (PEM)")
    parser.add_argument("--offset", type=float, default=0.0, help="the club's clock minus ours")
    parser.add_argument("--tick", type=float, default=0.005, help="seconds between looks")
    args = parser.parse_args(argv)
    context = None
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        Club(
            delay=args.delay, cost=args.cost, tls=context, tick=args.tick, offset=args.offset
        ).run()
    with contextlib.suppress(OSError):
        os.close(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
