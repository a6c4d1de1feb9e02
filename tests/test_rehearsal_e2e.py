"""Rehearsals end to end (CONTRACT section 12): the real daemon, the real CLI, a real SMTP server
and a club on 127.0.0.1 whose login is first blocked by its CDN's page, then heals."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from daemon_harness import DaemonProcess, by_key, cli, db_status, iso_z, wait_until
from reliability_helpers import smtp_server

pytestmark = pytest.mark.slow

TOKEN = "key-rehearse-5d1e9a"
WINDOW = timedelta(days=7)
BLOCK_PAGE = (
    '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01 Transitional//EN">\n<HTML><HEAD>'
    "<TITLE>ERROR: The request could not be satisfied</TITLE></HEAD><BODY>"
    "<H1>403 ERROR</H1></BODY></HTML>"
)


@dataclass
class Club:
    """A login (blocked by a CDN's page until ``healed``) that ends the session of the login
    before it (one per account), and a booking that only the latest session may send."""

    healed: bool = False
    seen: list[str] = field(default_factory=list)
    #: Logins so far: each issues a new session and ends the one before (one per account).
    logins: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def __enter__(self) -> Club:
        club = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with club.lock:
                    club.seen.append(f"{self.command} {self.path}")
                    healed = club.healed
                    if self.path == "/login" and healed:
                        club.logins += 1
                    session = f"Bearer j-{club.logins}"
                if self.path == "/login" and healed:
                    status, kind = 200, "application/json"
                    raw = json.dumps({"jwt": session.removeprefix("Bearer ")}).encode()
                elif self.path == "/login":
                    status, kind, raw = 403, "text/html", BLOCK_PAGE.encode()
                elif self.headers.get("Authorization") != session:
                    status, kind, raw = 401, "application/json", b'{"error": "session ended"}'
                else:
                    status, kind, raw = 201, "application/json", b'{"id": "b-1"}'
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = _serve

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

    def requests(self) -> list[str]:
        with self.lock:
            return list(self.seen)

    def flow(self) -> dict[str, Any]:
        return {
            "prepare_seconds": 60,
            "steps": [
                {
                    "name": "login",
                    "url": f"{self.base}/login",
                    "json": {"key": "{token}"},
                    "extract": {"jwt": {"json": "jwt"}},
                },
                {
                    "name": "slot",
                    "at_trigger": True,
                    "method": "GET",
                    "url": f"{self.base}/slots",
                    "headers": {"Authorization": "Bearer {login.jwt}"},
                },
                {
                    "name": "book",
                    "booking": True,
                    "url": f"{self.base}/bookings",
                    "headers": {"Authorization": "Bearer {login.jwt}"},
                    "json": {"court": "{court_id}"},
                },
            ],
        }

    def plain(self) -> dict[str, Any]:
        """A club file without preparation steps: never rehearsed."""
        return {"url": f"{self.base}/plain-bookings"}


@pytest.fixture
def club() -> Iterator[Club]:
    with Club() as running:
        yield running


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.cleanup()


#: Three entries on the flow (triggers in 2 h and 2 h 30: one shared rehearsal; in 30 h: not
#: yet) and one on a club file without preparation steps.
ENTRIES = (
    ("mon", timedelta(hours=2), "cdn"),
    ("tue", timedelta(hours=2, minutes=30), "cdn"),
    ("later", timedelta(hours=30), "cdn"),
    ("plain", timedelta(hours=2), "plain"),
)


def setup(
    club: Club,
    tmp_path: Path,
    entries: tuple[tuple[str, timedelta, str], ...] = ENTRIES,
    **extra: str,
) -> tuple[Path, dict[str, str], list[str]]:
    """``entries`` (id, its trigger from now, its club file) in schedules.json."""
    data = tmp_path / "data"
    (data / "clubs").mkdir(parents=True)
    (data / "clubs" / "cdn.json").write_text(json.dumps(club.flow()))
    (data / "clubs" / "plain.json").write_text(json.dumps(club.plain()))
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    now = datetime.now(UTC).replace(microsecond=0)
    schedule = []
    for name, ahead, club_name in entries:
        desired = now + WINDOW + ahead
        schedule.append(
            {
                "id": name,
                "type": "one-off",
                "desired_time": iso_z(desired),
                "court_id": 3,
                "club": club_name,
            }
        )
    (data / "schedules.json").write_text(json.dumps(schedule))
    env = {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "BOOKING_WINDOW": "7d",
        "RETRY_BASE_SECONDS": "0.05",
        "HTTP_TIMEOUT_SECONDS": "2",
        **extra,
    }
    return data, env, [f"{e['id']}@{e['desired_time']}" for e in schedule]


def mail(raw: bytes) -> tuple[str, str]:
    message = message_from_bytes(raw)
    part = next(p for p in message.walk() if p.get_content_type() == "text/plain")
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return str(message["Subject"]), payload.decode()


def test_a_rehearsal_that_fails_is_notified_once_shown_and_passes_after_the_club_heals(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    with smtp_server() as (port, mailbox):
        data, env, keys = setup(
            club,
            tmp_path,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(port),
            SMTP_SECURITY="none",
            NOTIFY_EMAIL="me@example.org",
        )
        mon, tue, later, plain = keys
        process = DaemonProcess(env, data, tmp_path / "out.txt").start()
        daemons.append(process)
        process.wait_ready()

        assert wait_until(
            lambda: (db_status(env, tue, "rehearsal") or "").startswith("failed"), 20
        ), process.output()
        rows = by_key(env)
        reason = rows[mon]["rehearsal"]
        assert reason == rows[tue]["rehearsal"]  # one rehearsal, shared
        assert reason.startswith(f"failed {datetime.now(UTC):%Y-%m-%dT}")
        assert reason.endswith(
            ": step 'login': blocked by the club's web firewall (HTTP 403, page \"ERROR: The "
            "request could not be satisfied\"): not a credentials problem: the club's CDN or web "
            "firewall refuses this request (many refuse data-centre addresses, some ask for a "
            "captcha): run courtbot from another network (e.g. a home connection) or ask the "
            "club to let it through"
        )
        assert rows[later]["rehearsal"] is None and rows[plain]["rehearsal"] is None
        assert {row["status"] for row in rows.values()} == {"pending"}
        assert wait_until(lambda: len(mailbox.raw) == 1, 10), process.output()
        subject, body = mail(mailbox.raw[0])
        assert subject.startswith("Rehearsal failed: mon ")
        assert "step 'login'" in body and "HTTP 403" in body and "another network" in body
        assert "tue: next booking" in body
        time.sleep(1.5)  # the next looks (every minute, none before an hour) send nothing
        assert club.requests() == ["POST /login"]
        assert len(mailbox.raw) == 1

        club.healed = True
        assert cli(env, "reload").returncode == 0  # a reload tries failed rehearsals at once
        assert wait_until(lambda: (db_status(env, mon, "rehearsal") or "").startswith("ok "), 20), (
            process.output()
        )
        assert wait_until(lambda: len(mailbox.raw) == 2, 10), process.output()
        subject, body = mail(mailbox.raw[1])
        assert subject.startswith("Rehearsal passed: mon ")
        rows = by_key(env)
        assert rows[tue]["rehearsal"] == rows[mon]["rehearsal"]
        assert {row["status"] for row in rows.values()} == {"pending"}
        assert {row["attempts"] for row in rows.values()} == {0}
        # Nothing but the preparation step ever reached the club.
        assert club.requests() == ["POST /login", "POST /login"]
        shown = cli(env, "status")
        assert "rehearsal ok " in shown.stdout, shown.stdout
        assert process.stop() == 0
    log = (data / "bot.log").read_text()
    assert "ERROR" in log and "rehearsal mon@" in log
    assert TOKEN not in log + process.output()


def test_rehearse_hours_zero_sends_nothing(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data, env, _ = setup(club, tmp_path, REHEARSE_HOURS="0")
    process = DaemonProcess(env, data, tmp_path / "out.txt").start()
    daemons.append(process)
    process.wait_ready()
    time.sleep(3)
    assert club.requests() == []
    assert {row["rehearsal"] for row in by_key(env).values()} == {None}
    assert process.stop() == 0


def test_a_rehearsal_waits_for_a_booking_of_the_same_club_and_token_to_end(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Loaded late, ``later`` would rehearse at once: at the instant ``now`` (same club file,
    same token) prepares and books. Its login would end ``now``'s session (one per account):
    it waits until ``now`` is booked, then runs, far ahead of its own trigger."""
    club.healed = True
    entries = (("now", timedelta(seconds=8), "cdn"), ("later", timedelta(hours=3), "cdn"))
    data, env, (now, later) = setup(club, tmp_path, entries)
    process = DaemonProcess(env, data, tmp_path / "out.txt").start()
    daemons.append(process)
    process.wait_ready()

    assert wait_until(lambda: db_status(env, now) == "booked", 30), process.output()
    time.sleep(1)  # the looks so far (at the start, after the load) rehearsed nothing
    assert club.requests() == ["POST /login", "GET /slots", "POST /bookings"], process.output()
    rows = by_key(env)
    assert rows[now]["booking_ref"] == "b-1"
    assert rows[later]["rehearsal"] is None

    assert cli(env, "reload").returncode == 0  # a look at once rather than at the next minute
    assert wait_until(lambda: (db_status(env, later, "rehearsal") or "").startswith("ok "), 20), (
        process.output()
    )
    assert club.requests() == ["POST /login", "GET /slots", "POST /bookings", "POST /login"]
    assert by_key(env)[later]["status"] == "pending"
    assert process.stop() == 0
