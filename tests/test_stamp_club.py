"""The bench's club (tools/stamp_club.py), run as the bench runs it: a process of its own,
driven over stdin, arrivals stamped by the kernel."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

import wire
from tools.local_ca import CaFiles, make_ca

REPO = Path(__file__).resolve().parent.parent
CLUB = REPO / "tools" / "stamp_club.py"


class Club:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CLUB), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out, self.inp = self.proc.stdout, self.proc.stdin
        word, _, rest = self.out.readline().partition(" ")
        assert word == "ready"
        self.ready = json.loads(rest)

    def dump(self) -> list[dict[str, Any]]:
        self.inp.write("dump\n")
        self.inp.flush()
        records = []
        while (line := self.out.readline().strip()) != "end":
            records.append(json.loads(line))
        return records


@contextmanager
def club(*args: str) -> Iterator[Club]:
    running = Club(*args)
    try:
        yield running
    finally:
        running.inp.write("quit\n")
        running.inp.flush()
        try:
            running.proc.wait(5)
        except subprocess.TimeoutExpired:
            running.proc.kill()
            running.proc.wait(5)


def test_arrival_is_the_kernel_stamp_of_the_segment_that_completed_the_request() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("kernel receive stamps (SO_TIMESTAMPNS) are a Linux feature")
    with club("--delay", "0.2") as running:
        assert running.ready["stamps"] == "kernel"
        sock = socket.create_connection(("127.0.0.1", running.ready["port"]))
        head = b"POST /b HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k-1\r\nContent-Length: 2\r\n\r\n"
        before_head = time.time()
        sock.sendall(head)
        time.sleep(0.1)
        before_body = time.time()
        sock.sendall(b"{}")
        answer = b""
        while b'{"id": "k-1"}' not in answer:
            answer += sock.recv(4096)
        answered = time.time()
        sock.close()
        (record,) = running.dump()
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
    assert record["key"] == "k-1"
    assert record["line"] == "POST /b HTTP/1.1"
    assert before_head <= record["first"] < before_body <= record["arrived"] < answered
    assert answered - record["arrived"] >= 0.2  # the answer waited for the delay


def test_a_new_tls_connection_pays_the_cost_and_a_request_goes_through(tmp_path: Path) -> None:
    files: CaFiles = make_ca(tmp_path)
    with club("--cert", str(files.cert), "--key", str(files.key), "--cost", "0.2") as running:
        url = f"https://localhost:{running.ready['port']}/b"
        began = time.monotonic()
        conn = wire.connect(url, timeout=5, verify=str(files.ca))
        opened = time.monotonic() - began
        request = requests.Request("POST", url, headers={"Idempotency-Key": "t-1"}, data=b"{}")
        answer = wire.exchange(conn, wire.request_bytes(request.prepare()), timeout=5)
        (record,) = running.dump()
    assert opened >= 0.2
    assert (answer.status, answer.body) == (201, b'{"id": "t-1"}')
    assert record["key"] == "t-1"
    assert record["arrived"] - record["accepted"] >= 0.2


def test_the_date_header_is_the_clubs_clock_and_offset_can_change() -> None:
    from email.utils import parsedate_to_datetime

    with club("--offset", "-3600") as running:
        url = f"http://127.0.0.1:{running.ready['port']}/ping"
        before = time.time()
        date = parsedate_to_datetime(requests.get(url, timeout=5).headers["Date"]).timestamp()
        assert int(before - 3600) <= date <= time.time() - 3600
        running.inp.write("offset 7200\n")
        running.inp.flush()
        time.sleep(0.05)
        before = time.time()
        date = parsedate_to_datetime(requests.get(url, timeout=5).headers["Date"]).timestamp()
        assert int(before + 7200) <= date <= time.time() + 7200
