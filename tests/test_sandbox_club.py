"""Tests of the sandbox club itself (tools/sandbox_club.py), over real sockets with requests."""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import pytest
import requests

from tools.sandbox_club import TEMPLATES_DIR, SandboxClub, parse_duration

TOKEN = "sandbox-test-token-5c1f"
WINDOW = 3600.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def club() -> Iterator[SandboxClub]:
    """A default-shape club with a one-hour window."""
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW) as running:
        yield running


def open_start(seconds_open: float = 60.0) -> datetime:
    """A start whose one-hour window opened ``seconds_open`` ago (by our clock)."""
    moment = datetime.now(UTC) + timedelta(seconds=WINDOW - seconds_open)
    return moment.replace(microsecond=0)


def payload(start: datetime, court: str | None = "3", minutes: int = 60) -> dict[str, Any]:
    """A section 6 booking body."""
    end = start + timedelta(minutes=minutes)
    return {
        "court_id": court,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "duration_minutes": minutes,
    }


def post(
    club: SandboxClub,
    body: dict[str, Any],
    key: str | None = "inst@1",
    token: str | None = TOKEN,
    session: requests.Session | None = None,
    **kw: Any,
) -> requests.Response:
    """POST a section 6 request to the club."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    sender = session or requests
    kw.setdefault("timeout", 5)
    return sender.post(club.url, json=body, headers=headers, **kw)


# Section 6: the default shape ------------------------------------------------------------


def test_books_a_court_and_records_the_request(club: SandboxClub) -> None:
    start = open_start()
    before = time.time()
    answer = post(club, payload(start), key="wed@2025-08-10T12:00:00Z")
    after = time.time()

    assert answer.status_code == 201
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {"id": "bk-1", "court_id": "3", "start": start.isoformat()}
    (record,) = club.received
    assert before <= record.arrived <= after
    assert record.method == "POST"
    assert record.path == "/bookings"
    assert record.headers["Authorization"] == f"Bearer {TOKEN}"
    assert json.loads(record.body) == payload(start)
    assert record.token == TOKEN
    assert record.idempotency_key == "wed@2025-08-10T12:00:00Z"
    assert (record.court_id, record.start, record.status) == ("3", start.isoformat(), 201)
    assert record.start_at == start
    assert record.new_connection is True
    assert record.booking_id == "bk-1"
    assert record.late_ms is not None
    assert 59_000 < record.late_ms < 61_000
    (booking,) = club.bookings
    assert (booking.id, booking.court_id, booking.start_at) == ("bk-1", "3", start)
    assert booking.token == TOKEN
    assert TOKEN not in repr(record) + repr(booking)
    assert club.bookings_per_key() == {"wed@2025-08-10T12:00:00Z": 1}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
    ],
    ids=["missing", "unknown", "not-bearer", "empty"],
)
def test_missing_or_unknown_token_is_401(club: SandboxClub, headers: dict[str, str]) -> None:
    answer = requests.post(club.url, json=payload(open_start()), headers=headers, timeout=5)

    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert "error" in answer.json()
    assert club.bookings == []


def test_any_accepted_token_books(club: SandboxClub) -> None:
    with SandboxClub(tokens=("alice", "bob")) as two:
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        assert post(two, payload(start, "1"), token="alice").status_code == 201
        assert post(two, payload(start, "2"), key="other", token="bob").status_code == 201


def _bad(**changes: Any) -> dict[str, Any]:
    body = payload(datetime(2025, 8, 10, 14, tzinfo=ZoneInfo("Europe/Berlin")))
    body.update(changes)
    return {k: v for k, v in body.items() if v != "<drop>"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps(_bad(court_id="<drop>")).encode(), "court_id: missing"),
        (json.dumps(_bad(court_id=3)).encode(), "court_id: expected"),
        (json.dumps(_bad(start="2025-08-10T14:00:00")).encode(), "no UTC offset"),
        (json.dumps(_bad(start="tomorrow")).encode(), "not an ISO 8601"),
        (json.dumps(_bad(duration_minutes=90)).encode(), "end: must be"),
        (json.dumps(_bad(duration_minutes=True)).encode(), "duration_minutes: expected"),
    ],
    ids=["syntax", "array", "no-court", "int-court", "naive", "garbage", "end", "bool"],
)
def test_malformed_body_is_400_with_a_json_error(
    club: SandboxClub, body: bytes, message: str
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    answer = requests.post(club.url, data=body, headers=headers, timeout=5)

    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert club.received[0].status == 400


def test_wrong_content_type_is_415(club: SandboxClub) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/plain"}
    body = json.dumps(payload(open_start()))

    assert requests.post(club.url, data=body, headers=headers, timeout=5).status_code == 415


def test_unknown_path_is_404_and_other_methods_405(club: SandboxClub) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}

    assert requests.post(club.base_url + "/nope", headers=auth, timeout=5).status_code == 404
    answer = requests.get(club.url, headers=auth, timeout=5)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"


def test_window_not_open_is_425_with_the_opening_time(club: SandboxClub) -> None:
    start = open_start(seconds_open=-30)  # opens in 30 s

    answer = post(club, payload(start))

    assert answer.status_code == 425
    opens_at = start - timedelta(seconds=WINDOW)
    expected = opens_at.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
    assert answer.json() == {"error": "booking window not open yet", "opens_at": expected}
    assert club.bookings == []
    assert club.received[0].late_ms is not None
    assert club.received[0].late_ms < -29_000


def test_window_is_judged_by_the_clubs_own_clock(club: SandboxClub) -> None:
    club.clock_offset = -10.0  # the club is 10 s behind us: a window open by our clock is not
    start = open_start(seconds_open=5)
    assert post(club, payload(start)).status_code == 425
    assert club.now() == pytest.approx(time.time() - 10, abs=0.5)

    club.clock_offset = 10.0  # 10 s ahead: a window that opens in 5 s by our clock is open
    later = open_start(seconds_open=-5)
    assert post(club, payload(later), key="inst@2").status_code == 201
    assert club.received[-1].club_time == pytest.approx(club.received[-1].arrived + 10)


@pytest.mark.parametrize("offset", [-7200.0, 3600.0])
def test_date_header_is_the_clubs_own_clock(club: SandboxClub, offset: float) -> None:
    club.clock_offset = offset
    before = time.time()
    answer = requests.get(club.base_url + "/ping", timeout=5)
    after = time.time()
    date = email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()
    assert int(before + offset) <= date <= after + offset


def test_taken_slot_is_409(club: SandboxClub) -> None:
    start = open_start()
    club.set_taken("3", start.astimezone(ZoneInfo("Europe/Berlin")).isoformat())

    answer = post(club, payload(start))

    assert answer.status_code == 409
    assert "error" in answer.json()
    assert post(club, payload(start, "4"), key="inst@2").status_code == 201
    assert post(club, payload(start, "4"), key="inst@3").status_code == 409
    assert club.bookings_per_key() == {"inst@2": 1}


def test_same_idempotency_key_replays_the_original_answer(club: SandboxClub) -> None:
    start = open_start()
    first = post(club, payload(start), key="k")
    again = post(club, payload(start), key="k")  # a new connection: requests has no pool here

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert [r.booking_id for r in club.received] == ["bk-1", "bk-1"]
    assert club.bookings_per_key() == {"k": 1}


def test_same_key_for_another_slot_is_422(club: SandboxClub) -> None:
    start = open_start()
    assert post(club, payload(start), key="k").status_code == 201

    answer = post(club, payload(start + timedelta(hours=1)), key="k")

    assert answer.status_code == 422
    assert "Idempotency-Key" in answer.json()["error"]


def test_replay_is_per_token(club: SandboxClub) -> None:
    with SandboxClub(tokens=("alice", "bob")) as two:
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
        assert post(two, payload(start), key="k", token="alice").status_code == 201
        assert post(two, payload(start), key="k", token="bob").status_code == 409


def test_any_court_takes_the_lowest_free_one(club: SandboxClub) -> None:
    start = open_start()
    club.set_taken(1, start)

    first = post(club, payload(start, None), key="a")
    second = post(club, payload(start, None), key="b")

    assert (first.status_code, first.json()["court_id"]) == (201, "2")
    assert second.json()["court_id"] == "3"
    assert club.received[0].court_id is None


def test_any_court_is_409_when_every_court_is_taken() -> None:
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, courts=("7", "8")) as club:
        start = open_start()
        club.set_taken("8", start)
        assert post(club, payload(start, None), key="a").json()["court_id"] == "7"
        assert post(club, payload(start, None), key="b").status_code == 409


def test_concurrent_requests_book_a_slot_once(club: SandboxClub) -> None:
    start = open_start()
    statuses: list[int] = []
    lock = threading.Lock()

    def book(n: int) -> None:
        status = post(club, payload(start), key=f"k{n}").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=book, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(statuses) == [201] + [409] * 11
    assert len(club.bookings) == 1


def test_keep_alive_reuses_one_connection(club: SandboxClub) -> None:
    start = open_start()
    with requests.Session() as session:
        for n in range(3):
            answer = post(club, payload(start, str(n + 1)), key=f"k{n}", session=session)
            assert answer.status_code == 201
    records = club.received

    assert [r.new_connection for r in records] == [True, False, False]
    assert len({r.connection_id for r in records}) == 1


def test_stop_closes_idle_keep_alive_connections_quickly(club: SandboxClub) -> None:
    session = requests.Session()
    post(club, payload(open_start()), session=session)
    url = club.url

    began = time.monotonic()
    club.stop()

    assert time.monotonic() - began < 1.0
    with pytest.raises(requests.ConnectionError):
        session.post(url, json={}, timeout=1)
    session.close()


def test_reset_forgets_everything_but_the_booking_counter(club: SandboxClub) -> None:
    start = open_start()
    post(club, payload(start), key="k")
    club.set_taken("4", start)
    club.fault("close")

    club.reset()

    assert club.received == []
    assert club.bookings == []
    answer = post(club, payload(start, "4"), key="k")
    assert answer.status_code == 201  # no fault, no taken slot, no stored replay
    assert answer.json()["id"] == "bk-2"


def test_wait_helpers(club: SandboxClub) -> None:
    assert club.wait_for(lambda: False, timeout=0.05) is False
    threading.Timer(0.05, post, args=(club, payload(open_start()))).start()

    records = club.wait_for_requests(1, timeout=5)

    assert records[0].status == 201
    with pytest.raises(TimeoutError, match="expected 2 answered requests"):
        club.wait_for_requests(2, timeout=0.05)


# Timing: connection cost and response delay -----------------------------------------------


def test_connection_cost_is_paid_by_a_fresh_connection_only() -> None:
    cost = 0.25
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, connection_cost=cost) as club:
        body = json.dumps(payload(open_start()))
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

        began = time.time()
        assert post(club, json.loads(body), key="fresh").status_code == 201
        fresh = club.received[-1]
        assert fresh.arrived - began >= cost - 0.01

        early = http.client.HTTPConnection("127.0.0.1", club.port, timeout=5)
        early.connect()  # the daemon's pre-opened connection
        time.sleep(cost + 0.05)
        sent = time.time()
        early.request("POST", "/bookings", body=body, headers={**headers, "Idempotency-Key": "x"})
        answer = early.getresponse()
        answer.read()
        early.close()

    assert answer.status == 409  # same slot, another key
    warm = club.received[-1]
    assert warm.new_connection is True
    assert warm.arrived - sent < 0.1


def test_response_delay_comes_after_the_arrival_stamp() -> None:
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, response_delay=0.2) as club:
        began = time.time()
        assert post(club, payload(open_start())).status_code == 201
        answered = time.time()

    assert answered - began >= 0.2
    assert club.received[0].arrived - began < 0.1


# Faults -------------------------------------------------------------------------------------


def test_status_fault_with_retry_after_and_body(club: SandboxClub) -> None:
    club.fault("status", status=503, retry_after=7, body={"error": "busy"})
    club.fault("status", status=429, body="slow down")

    first = post(club, payload(open_start()))
    second = post(club, payload(open_start()))
    third = post(club, payload(open_start()))

    assert (first.status_code, first.headers["Retry-After"], first.json()) == (
        503,
        "7",
        {"error": "busy"},
    )
    assert (second.status_code, second.text) == (429, "slow down")
    assert "Retry-After" not in second.headers
    assert third.status_code == 201
    assert [r.fault for r in club.received] == ["status", "status", None]
    assert [r.status for r in club.received] == [503, 429, 201]
    assert len(club.bookings) == 1


def test_faults_are_consumed_in_order_by_booking_requests_only(club: SandboxClub) -> None:
    club.fault("status", count=2, status=500)
    club.fault("status", status=502)

    assert requests.get(club.url, timeout=5).status_code == 405  # not a booking request
    statuses = [post(club, payload(open_start())).status_code for _ in range(4)]

    assert statuses == [500, 500, 502, 201]


def test_unknown_fault_or_option_is_refused(club: SandboxClub) -> None:
    with pytest.raises(ValueError, match="not one of"):
        club.fault("explode")
    with pytest.raises(ValueError, match="unknown options"):
        club.fault("hang", secs=3)


def test_hang_provokes_a_client_timeout_and_does_not_block_stop(club: SandboxClub) -> None:
    club.fault("hang", seconds=30)

    with pytest.raises(requests.exceptions.ReadTimeout):
        post(club, payload(open_start()), timeout=0.2)
    assert club.received[0].fault == "hang"
    assert club.received[0].done is False
    began = time.monotonic()
    club.stop()

    assert time.monotonic() - began < 1.0
    assert club.bookings == []


def test_hang_answers_504_late_or_the_booking_when_book_is_set(club: SandboxClub) -> None:
    club.fault("hang", seconds=0.1)
    club.fault("hang", seconds=0.1, book=True)
    start = open_start()

    assert post(club, payload(start)).status_code == 504
    assert club.bookings == []
    late = post(club, payload(start))
    assert late.status_code == 201
    assert post(club, payload(start)).json() == late.json()  # the retry is a replay
    assert club.bookings_per_key() == {"inst@1": 1}


def test_reset_sends_part_of_an_answer_then_a_tcp_reset(club: SandboxClub) -> None:
    club.fault("reset")
    body = json.dumps(payload(open_start())).encode()
    request = (
        b"POST /bookings HTTP/1.1\r\nHost: club\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nIdempotency-Key: k\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    with socket.create_connection(("127.0.0.1", club.port), timeout=5) as raw:
        raw.sendall(request)
        with pytest.raises(ConnectionResetError):
            while chunk := raw.recv(65536):
                received += chunk

    assert received.startswith(b"HTTP/1.1 201 Created\r\n")
    declared = int(re.search(rb"Content-Length: (\d+)", received).group(1))  # type: ignore[union-attr]
    assert len(received.split(b"\r\n\r\n", 1)[1]) < declared
    # The booking was made: the lost answer is what Idempotency-Key replays exist for.
    assert club.bookings_per_key() == {"k": 1}


def test_reset_breaks_a_requests_client_and_the_retry_is_replayed(club: SandboxClub) -> None:
    club.fault("reset")
    start = open_start()

    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        post(club, payload(start))
    retry = post(club, payload(start))

    assert retry.status_code == 201
    assert retry.json()["id"] == club.received[0].booking_id == "bk-1"
    assert club.received[0].status == 201
    assert len(club.bookings) == 1


def test_close_drops_the_connection_without_an_answer(club: SandboxClub) -> None:
    club.fault("close")

    with pytest.raises(requests.ConnectionError):
        post(club, payload(open_start()))

    club.wait_for(lambda: club.received[0].done, timeout=2)
    assert club.received[0].status is None
    assert club.received[0].fault == "close"
    assert club.bookings == []


def test_huge_streams_until_the_client_hangs_up(club: SandboxClub) -> None:
    club.fault("huge")

    answer = post(club, payload(open_start()), stream=True)
    assert answer.status_code == 201
    assert int(answer.headers["Content-Length"]) == 50 * 1024 * 1024
    assert answer.raw.read(1000).startswith(b'{"id": "bk-1", "padding": "')
    answer.close()

    record = club.received[0]
    assert club.wait_for(lambda: record.finished, timeout=5)
    assert 0 < record.sent < 50 * 1024 * 1024
    assert len(club.bookings) == 1


def test_huge_body_of_a_given_size_is_valid_json(club: SandboxClub) -> None:
    club.fault("huge", size=200_000)

    answer = post(club, payload(open_start()))

    assert len(answer.content) == 200_000
    assert answer.json()["id"] == "bk-1"


def test_nonjson_is_a_201_with_html(club: SandboxClub) -> None:
    club.fault("nonjson")

    answer = post(club, payload(open_start()))

    assert answer.status_code == 201
    assert answer.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.exceptions.JSONDecodeError):
        answer.json()
    assert len(club.bookings) == 1


def test_redirect_points_elsewhere_and_books_nothing(club: SandboxClub) -> None:
    club.fault("redirect", url="https://evil.example/steal")

    answer = post(club, payload(open_start()), allow_redirects=False)

    assert answer.status_code == 302
    assert answer.headers["Location"] == "https://evil.example/steal"
    assert club.received[0].status == 302
    assert club.bookings == []


# Logging and the CLI -------------------------------------------------------------------------


def test_logs_never_show_a_token(club: SandboxClub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tools.sandbox_club")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    requests.post(
        f"{club.url}?token={TOKEN}", json=payload(open_start()), headers=headers, timeout=5
    )
    wrong = {"Authorization": "Bearer wrong-secret"}
    requests.post(f"{club.url}?t=wrong-secret", headers=wrong, timeout=5)
    club.wait_for_requests(2)

    assert "POST /bookings" in caplog.text
    assert TOKEN not in caplog.text
    assert "wrong-secret" not in caplog.text


def test_cli_serves_logs_and_exits_0_on_sigterm() -> None:
    command = [sys.executable, "tools/sandbox_club.py", "--port", "0", "--token", TOKEN]
    command += ["--window", "1h", "--connection-cost-ms", "1"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(10, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        match = re.fullmatch(
            r"sandbox club listening on (http://127\.0\.0\.1:\d+/bookings)\n", line
        )
        assert match, line
        start = open_start()
        headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "cli@1"}
        answer = requests.post(match.group(1), json=payload(start), headers=headers, timeout=5)
        assert answer.status_code == 201
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        watchdog.cancel()
        proc.kill()

    assert proc.returncode == 0
    log = err.decode()
    assert f"POST /bookings -> 201 court=3 start={start.isoformat()} key=cli@1" in log
    assert TOKEN not in log + out.decode()


def test_parse_duration() -> None:
    assert parse_duration("168h") == 168 * 3600
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("90s") == 90
    assert parse_duration("1.5") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


# Section 11: the template shapes --------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z_]+)\}")


def _values(start: datetime, court: str | None, key: str, minutes: int = 60) -> dict[str, Any]:
    end = start + timedelta(minutes=minutes)
    return {
        "token": TOKEN,
        "court_id": court,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "start_utc": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end_utc": end.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "date": start.strftime("%Y-%m-%d"),
        "time": start.strftime("%H:%M"),
        "end_time": end.strftime("%H:%M"),
        "duration_minutes": minutes,
        "key": key,
        "epoch_ms": int(start.timestamp() * 1000),
    }


def _fill(text: str, values: dict[str, Any], *, in_url: bool = False) -> Any:
    """Section 11's placeholder rules, just enough to drive the sandbox's template shapes."""
    whole = re.fullmatch(r"\{([a-z_]+)\}", text)
    if whole and not in_url:
        return values[whole.group(1)]

    def one(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        value = values[match.group(1)]
        value = "" if value is None else str(value)
        return quote(value, safe="") if in_url else value

    return _PLACEHOLDER.sub(one, text)


def _send(template: dict[str, Any], values: dict[str, Any]) -> requests.Response:
    headers = {name: _fill(v, values) for name, v in template.get("headers", {}).items()}
    idempotency = template.get("idempotency_header", "Idempotency-Key")
    if idempotency is not None:
        headers[idempotency] = values["key"]
    kw: dict[str, Any] = {}
    if "json" in template:
        kw["json"] = {k: _fill(v, values) for k, v in template["json"].items()}
    if "form" in template:
        kw["data"] = {k: _fill(v, values) for k, v in template["form"].items()}
    url = _fill(template["url"], values, in_url=True)
    return requests.request(template.get("method", "POST"), url, headers=headers, timeout=5, **kw)


def _outcome(template: dict[str, Any], answer: requests.Response) -> str:
    for outcome in ("taken", "rejected", "booked"):
        rule = template.get(outcome)
        if (
            rule
            and answer.status_code in rule["status"]
            and rule.get("body_contains", "") in answer.text
        ):
            return outcome
    if 200 <= answer.status_code < 300:
        return "booked"
    return {409: "taken", 401: "token", 403: "token", 425: "retry"}.get(answer.status_code, "?")


def _ref(template: dict[str, Any], answer: requests.Response) -> Any:
    value: Any = answer.json()
    for part in template["booking_ref"].split("."):
        value = value[part]
    return value


def _local_start(zone: str, minutes_ahead: float) -> datetime:
    """A whole-minute start in ``zone``, its one-hour window open ``60 - minutes_ahead`` min."""
    moment = datetime.now(ZoneInfo(zone)) + timedelta(minutes=minutes_ahead)
    return moment.replace(second=0, microsecond=0)


@pytest.mark.parametrize("shape", ["path-form", "json-local", "taken-200"])
def test_template_books_and_detects_taken(shape: str) -> None:
    zone = "Europe/Paris"
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, shape=shape, timezone=zone) as club:
        template = club.template()
        start = _local_start(zone, 30)

        first = _send(template, _values(start, "3", "k1"))
        assert _outcome(template, first) == "booked", first.text
        assert _ref(template, first) == "bk-1"
        replay = _send(template, _values(start, "3", "k1"))
        assert _ref(template, replay) == "bk-1"
        second = _send(template, _values(start, "3", "k2"))
        assert _outcome(template, second) == "taken", second.text

    record = club.received[0]
    assert (record.court_id, record.start_at) == ("3", start.astimezone(UTC))
    if shape == "taken-200":
        assert record.start == start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    else:
        assert record.start == start.isoformat()  # local fields, written with the zone's offset
    assert record.idempotency_key == "k1"
    assert record.token == TOKEN
    assert club.bookings_per_key() == {"k1": 1}


@pytest.mark.parametrize("shape", ["path-form", "json-local", "taken-200"])
def test_template_shapes_check_the_token_and_the_window(shape: str) -> None:
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, shape=shape) as club:
        template = club.template()
        values = _values(_local_start("UTC", 30), "2", "k")

        wrong = _send(template, {**values, "token": "wrong"})
        early = _send(template, _values(_local_start("UTC", 90), "2", "k2"))

    assert (wrong.status_code, _outcome(template, wrong)) == (401, "token")
    assert (early.status_code, _outcome(template, early)) == (425, "retry")
    assert "opens_at" in early.json()
    assert club.bookings == []


@pytest.mark.parametrize("shape", ["json-local", "taken-200"])
def test_template_any_court(shape: str) -> None:
    with SandboxClub(tokens=(TOKEN,), window_seconds=WINDOW, shape=shape) as club:
        template = club.template()
        start = _local_start("UTC", 30)
        club.set_taken("1", start)

        answer = _send(template, _values(start, None, "k"))

    assert _outcome(template, answer) == "booked"
    assert club.bookings[0].court_id == "2"


def test_path_form_reads_local_times_in_the_clubs_zone() -> None:
    decade = 10 * 365 * 86400.0
    zone = "America/New_York"
    with SandboxClub(
        tokens=(TOKEN,), shape="path-form", timezone=zone, window_seconds=decade
    ) as club:
        url = club.url.format(court_id="5")
        headers = {"Authorization": f"Bearer {TOKEN}"}
        form = {"date": "2030-01-15", "from": "23:00", "to": "00:00"}
        answer = requests.post(url, data=form, headers=headers, timeout=5)
        bad = requests.post(url, data={"date": "x"}, headers=headers, timeout=5)

    assert answer.status_code == 201
    assert answer.json()["reservation"] == {
        "id": "bk-1",
        "court": "5",
        "date": "2030-01-15",
        "from": "23:00",
        "to": "00:00",
    }
    assert club.bookings[0].start_at == datetime(2030, 1, 16, 4, tzinfo=UTC)
    assert club.bookings[0].duration_minutes == 60
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("shape", "bad", "status"),
    [
        ("json-local", {"duration_minutes": "sixty"}, 422),  # an error status, not 409
        ("taken-200", {"start_utc": "tomorrow"}, 200),  # a 200 that its template rejects
    ],
    ids=["json-local-422", "taken-200-200"],
)
def test_an_invalid_body_is_rejected_not_taken(
    shape: str, bad: dict[str, str], status: int
) -> None:
    with SandboxClub(tokens=(TOKEN,), shape=shape) as club:
        template = club.template()
        values = {**_values(_local_start("UTC", 30), "3", "k"), **bad}

        answer = _send(template, values)

    assert answer.status_code == status
    assert _outcome(template, answer) == "rejected"


def test_template_files_use_only_contract_keys_and_placeholders() -> None:
    keys = {"method", "url", "headers", "json", "form", "booked", "taken", "rejected"}
    keys |= {"booking_ref", "idempotency_header"}
    known = set(_values(datetime.now(UTC), "1", "k"))
    for name in ("path-form", "json-local", "taken-200"):
        template = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
        assert set(template) <= keys, name
        assert template["url"].startswith("https://club.example/")
        strings = [template["url"], *template["headers"].values()]
        strings += [v for v in template.get("json", template.get("form", {})).values()]
        used = {m for s in strings for m in re.findall(r"\{([a-z_]+)\}", s)}
        assert used <= known, (name, used - known)
        assert "{token}" in json.dumps(template["headers"])


def test_default_shape_has_no_template(club: SandboxClub) -> None:
    with pytest.raises(ValueError, match="no template"):
        club.template()


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        SandboxClub(shape="soap")
    with pytest.raises(ValueError, match="timezone"):
        SandboxClub(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="tokens"):
        SandboxClub(tokens="abc")  # type: ignore[arg-type]
