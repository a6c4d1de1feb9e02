"""End to end with a flow of several steps (CONTRACT section 12): the real daemon, the real CLI,
and a small flow club on 127.0.0.1 that wants a login (a cookie and a JWT in a header) before
the window, a slot lookup that shows the slot only once the window is open, the booking, and a
confirmation."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet

from daemon_harness import (
    READY_SECONDS,
    DaemonProcess,
    by_key,
    cli,
    db_status,
    desired_for_trigger_in,
    iso_z,
    wait_until,
)

pytestmark = pytest.mark.slow

GOOD = "key-e2e-flow-6a1f0c"
EXPIRED = "key-e2e-expired-93bd"
#: A key this club refuses with its own status (as Perfect Gym answers a wrong password: 499).
REFUSED = "key-e2e-refused-4c27"
ZONE = ZoneInfo("Europe/Paris")
WINDOW = timedelta(hours=168)


@dataclass
class Seen:
    """One request as the club received it."""

    at: float
    method: str
    path: str
    headers: dict[str, str]
    cookies: dict[str, str]
    body: bytes


@dataclass
class FlowClub:
    """Login (cookie + X-Auth-Token), planning (slots shown once their window opened), booking
    (409 when taken, 425 before the window), confirmation."""

    #: When the window opens (epoch seconds), and the local start ("HH:MM") of the slots.
    opens: float = 0.0
    start: str = "00:00"
    taken: set[tuple[str, str]] = field(default_factory=set)  # (court, start)
    seen: list[Seen] = field(default_factory=list)
    bookings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, str] = field(default_factory=dict)  # SID -> JWT
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def __enter__(self) -> FlowClub:
        club = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                cookies = {
                    k: m.value for k, m in SimpleCookie(self.headers.get("Cookie", "")).items()
                }
                seen = Seen(time.time(), self.command, self.path, dict(self.headers), cookies, body)
                with club.lock:
                    club.seen.append(seen)
                status, headers, payload = club.answer(seen)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def flow(self) -> dict[str, Any]:
        return {
            "about": "the e2e flow club",
            "prepare_seconds": 3,
            "steps": [
                {
                    "name": "login",
                    "url": f"{self.base}/login",
                    "json": {"key": "{token}"},
                    "ok": {"status": [200]},
                    "extract": {"jwt": {"header": "X-Auth-Token"}, "user": {"json": "user.id"}},
                },
                {
                    "name": "slot",
                    "at_trigger": True,
                    "method": "GET",
                    "url": f"{self.base}/planning/{{start:%d-%m-%Y}}",
                    "headers": {"Authorization": "Bearer {login.jwt}"},
                    "extract": {"id": {"json": "slots[court={court_id}][start={time}].id"}},
                },
                {
                    "name": "book",
                    "booking": True,
                    "url": f"{self.base}/bookings",
                    "headers": {"Authorization": "Bearer {login.jwt}"},
                    "json": {"slot": "{slot.id}", "user": "{login.user}"},
                    "booked": {"status": [200], "body_contains": '"confirmed": false'},
                    "taken": {"status": [409]},
                    "booking_ref": "booking.id",
                    "extract": {"bid": {"json": "booking.id"}},
                },
                {
                    "name": "confirm",
                    "method": "PUT",
                    "url": f"{self.base}/bookings/{{book.bid}}",
                    "headers": {"Authorization": "Bearer {login.jwt}"},
                    "json": {"confirmed": True},
                    "ok": {"status": [200]},
                },
            ],
        }

    def slots_of(self, now: float) -> list[dict[str, Any]]:
        """The free slots at ``start`` (local HH:MM), shown only once the window opened."""
        if now < self.opens:
            return []
        return [
            {"court": int(court), "start": self.start, "id": f"s-{court}-{self.start}"}
            for court in ("3", "4", "5", "6")
            if (court, self.start) not in self.taken
        ]

    def answer(self, seen: Seen) -> tuple[int, list[tuple[str, str]], Any]:
        path = urlsplit(seen.path).path
        if path == "/login":
            key = json.loads(seen.body or b"{}").get("key")
            if key == REFUSED:
                return 499, [], {"error": "invalid credentials"}
            if key != GOOD:
                return 401, [], {"error": "session expired, log in again"}
            sid, jwt = secrets.token_hex(8), f"jwt-{secrets.token_hex(8)}"
            with self.lock:
                self.sessions[sid] = jwt
            headers = [("Set-Cookie", f"SID={sid}; Path=/; HttpOnly"), ("X-Auth-Token", jwt)]
            return 200, headers, {"user": {"id": 7}}
        with self.lock:
            jwt = self.sessions.get(seen.cookies.get("SID", ""))
        if jwt is None or seen.headers.get("Authorization") != f"Bearer {jwt}":
            return 401, [], {"error": "not logged in"}
        if path.startswith("/planning/"):
            return 200, [], {"slots": self.slots_of(seen.at)}
        if path == "/bookings" and seen.method == "POST":
            return self.book(json.loads(seen.body))
        if path.startswith("/bookings/") and seen.method == "PUT":
            booking = self.bookings.get(path.rsplit("/", 1)[1])
            if booking is None:
                return 404, [], {"error": "no such booking"}
            booking["confirmed"] = True
            return 200, [], {"booking": booking}
        return 404, [], {"error": "no such page"}

    def book(self, body: dict[str, Any]) -> tuple[int, list[tuple[str, str]], Any]:
        _, court, when = str(body.get("slot")).split("-", 2)
        with self.lock:
            if (court, when) in self.taken:
                return 409, [], {"error": "already booked"}
            self.taken.add((court, when))
            booking_id = f"bk-{len(self.bookings) + 1}"
            self.bookings[booking_id] = {
                "id": booking_id,
                "court": court,
                "user": body.get("user"),
                "confirmed": False,
            }
        return 200, [], {"booking": {"id": booking_id, "confirmed": False}}


@pytest.fixture
def club() -> Iterator[FlowClub]:
    with FlowClub() as running:
        yield running


@pytest.fixture
def env(tmp_path: Path, club: FlowClub) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps({"default": GOOD, "old": EXPIRED}))
    (data / "club.json").write_text(json.dumps(club.flow()))
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "BOOKING_REQUEST_TEMPLATE": "club.json",
        "BOOKING_TIMEZONE": "Europe/Paris",
        "RETRY_BASE_SECONDS": "0.05",
        "HTTP_TIMEOUT_SECONDS": "2",
    }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.cleanup()


def entry(name: str, start: datetime, courts: Any, token: str = "default") -> dict[str, Any]:
    local = start.astimezone(ZONE).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "id": name,
        "type": "one-off",
        "desired_time": local,
        "court_id": courts,
        "token": token,
    }


def test_a_flow_logs_in_ahead_looks_the_slot_up_at_the_trigger_books_and_confirms(
    env: dict[str, str], club: FlowClub, daemon: list[DaemonProcess], tmp_path: Path
) -> None:
    # `check` (about as long as a start), the start, then the logins prepare_seconds (3 s) ahead.
    start = desired_for_trigger_in(2 * READY_SECONDS + 3)
    trigger = (start - WINDOW).timestamp()
    club.opens, club.start = trigger, start.astimezone(ZONE).strftime("%H:%M")
    club.taken.add(("5", club.start))
    entries = [
        entry("mine", start, 3),
        entry("next-court", start, [5, 6]),
        entry("expired-login", start, 4, token="old"),
    ]
    data = Path(env["DATA_DIR"])
    (data / "schedules.json").write_text(json.dumps(entries))

    checked = cli(env, "check")
    assert checked.returncode == 0, checked.stderr
    assert "flow (next instance, secrets masked, extracted values as <step.value>):" in (
        checked.stdout
    )
    assert "Authorization: Bearer <login.jwt>" in checked.stdout
    assert '{"key": "***"}' in checked.stdout
    assert GOOD not in checked.stdout

    process = DaemonProcess(env, data, tmp_path / "out.txt").start()
    daemon.append(process)
    process.wait_ready(before=trigger - 2.5)  # the logins' lower bound below, with room
    keys = {e["id"]: f"{e['id']}@{iso_z(start)}" for e in entries}

    def settled() -> bool:
        return all(db_status(env, key) in ("booked", "failed") for key in keys.values())

    assert wait_until(settled, 30), process.output()
    rows = by_key(env)
    mine, other, expired = (rows[keys[name]] for name in ("mine", "next-court", "expired-login"))
    assert (mine["status"], mine["booked_court"]) == ("booked", "3"), mine["last_error"]
    assert (other["status"], other["booked_court"]) == ("booked", "6"), other["last_error"]
    # Both book at the same trigger, so either may reach the club first.
    assert {mine["booking_ref"], other["booking_ref"]} == {"bk-1", "bk-2"}
    assert expired["status"] == "failed"
    assert expired["last_error"] == (
        "the club rejected the credentials at step 'login' (HTTP 401: session expired, log in "
        "again): check token 'old' in tokens.json, reload, then `python main.py retry` this "
        "booking"
    )
    assert all(b["confirmed"] for b in club.bookings.values())
    assert {b["court"] for b in club.bookings.values()} == {"3", "6"}

    logins = [s for s in club.seen if s.path == "/login"]
    assert len(logins) == 3
    # Logins about prepare_seconds before the trigger; nothing else before it.
    assert all(trigger - 4.5 < s.at < trigger - 2 for s in logins)
    assert all(s.at >= trigger for s in club.seen if s.path != "/login")
    # The cookie of a booking's login went with its own later steps only.
    books = [s for s in club.seen if s.path == "/bookings"]
    assert len(books) == 2  # courts 3 and 6: taken court 5 shows no slot, so is never booked
    assert all(s.cookies.get("SID") for s in books)
    assert all("Idempotency-Key" in s.headers for s in books)
    assert not any("Idempotency-Key" in s.headers for s in club.seen if s.path != "/bookings")
    assert process.stop() == 0
    output = process.output() + (data / "bot.log").read_text()
    for secret in [GOOD, EXPIRED, *club.sessions, *club.sessions.values()]:
        assert secret not in output
        assert secret.encode() not in (data / "db.sqlite").read_bytes()


def test_dry_run_runs_the_preparation_steps_now_and_sends_nothing_else(
    env: dict[str, str], club: FlowClub
) -> None:
    start = datetime.now(UTC) + timedelta(days=3)
    data = Path(env["DATA_DIR"])
    (data / "schedules.json").write_text(
        json.dumps([entry("mine", start, 3), entry("stale", start, 3, token="old")])
    )

    done = cli(env, "dry-run", "mine")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("mine: next instance ")
    assert lines[1] == "  step login: HTTP 200 ok; extracted jwt=***, user=***"
    assert lines[2] == "booking request it would send at the trigger (secrets masked):"
    assert f"  POST {club.base}/bookings" in lines
    assert "  Authorization: Bearer <login.jwt>" in lines
    assert '  {"slot": "<slot.id>", "user": "<login.user>"}' in lines
    assert lines[-1] == "OK: every preparation step succeeded"
    assert [s.path for s in club.seen] == ["/login"]
    assert GOOD not in done.stdout + done.stderr
    # No daemon, no database: dry-run touches no state.
    assert not (data / "db.sqlite").exists()
    assert json.loads((data / "tokens.json").read_text())["default"] == GOOD

    stale = cli(env, "dry-run", "stale")

    assert stale.returncode == 1
    assert "  step login: HTTP 401: FAILED: HTTP 401: session expired, log in again" in (
        stale.stdout
    )
    assert stale.stderr.strip() == (
        "courtbot dry-run: the club rejected the credentials at step 'login' (HTTP 401: session "
        "expired, log in again): check token 'old' in tokens.json, reload, then `python main.py "
        "retry` this booking"
    )
    missing = cli(env, "dry-run", "nope")
    assert missing.returncode == 1
    assert "courtbot dry-run: no valid entry 'nope'" in missing.stderr


def test_a_preparation_steps_rejected_matcher_is_refused_credentials_at_once(
    env: dict[str, str], club: FlowClub
) -> None:
    data = Path(env["DATA_DIR"])
    (data / "tokens.json").write_text(json.dumps({"default": REFUSED}))
    start = datetime.now(UTC) + timedelta(days=3)
    (data / "schedules.json").write_text(json.dumps([entry("mine", start, 3)]))

    # Without the matcher a 499 is a failed step (retried until the trigger), not credentials.
    plain = cli(env, "dry-run", "mine")
    assert plain.returncode == 1
    assert "courtbot dry-run: step 'login' failed: HTTP 499" in plain.stderr

    flow = club.flow()
    flow["steps"][0]["rejected"] = {"status": [499]}
    (data / "club.json").write_text(json.dumps(flow))
    refused = cli(env, "dry-run", "mine")

    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "courtbot dry-run: the club rejected the credentials at step 'login' (HTTP 499: "
        "invalid credentials): check token 'default' in tokens.json, reload, then `python main.py "
        "retry` this booking"
    )
    assert [s.path for s in club.seen] == ["/login", "/login"]
    assert REFUSED not in refused.stdout + refused.stderr


def test_an_invalid_flow_names_the_step_and_the_key_in_check_and_stops_run(
    env: dict[str, str], club: FlowClub, daemon: list[DaemonProcess], tmp_path: Path
) -> None:
    flow = club.flow()
    flow["steps"][2]["json"]["slot"] = "{slott.id}"
    data = Path(env["DATA_DIR"])
    (data / "club.json").write_text(json.dumps(flow))
    (data / "schedules.json").write_text("[]")
    expected = (
        f"BOOKING_REQUEST_TEMPLATE {data / 'club.json'}: step 'book': json.slot: unknown "
        "placeholder {slott.id} in '{slott.id}'; {<step>.<value>} must name an earlier step and "
        "a value it extracts"
    )

    checked = cli(env, "check")

    assert checked.returncode == 1
    assert f"error: {expected}" in checked.stderr.splitlines()
    process = DaemonProcess(env, data, tmp_path / "out.txt").start()
    daemon.append(process)
    assert process.wait(20) == 2
    assert process.output().strip() == f"courtbot: cannot start: {expected}"
