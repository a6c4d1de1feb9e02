"""CONTRACT sections 7 to 12, tried from outside as a user runs courtbot: the real daemon and
CLI as subprocesses on a scratch DATA_DIR, a scriptable club on 127.0.0.1, a real SMTP server.
Each test holds a promise that an audit found broken (or untested) and that was then fixed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.fernet import Fernet

from daemon_harness import (
    DaemonProcess,
    by_key,
    cli,
    db_status,
    desired_for_trigger_in,
    iso_z,
    wait_until,
)
from notify import url_secrets
from reliability_helpers import smtp_server

pytestmark = pytest.mark.slow

TOKEN = "tok-contract-7-12-5d0e9a"
PASSWORD = "pw-contract-7-12-b81c44"
JWT = "jwt-contract-7-12-0f3a6e1d"


@dataclass
class Seen:
    """One request as the club received it."""

    method: str
    path: str
    host: str
    headers: dict[str, str]
    cookies: dict[str, str]
    body: bytes


Answer = tuple[int, list[tuple[str, str]], Any]


class Club:
    """A club on 127.0.0.1 whose answers a test scripts by path (``routes``); records every
    request. A route may block (a club holding its answer)."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[Seen], Answer]] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        club = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                jar = SimpleCookie(self.headers.get("Cookie", ""))
                seen = Seen(
                    self.command,
                    urlsplit(self.path).path,
                    self.headers.get("Host", ""),
                    dict(self.headers),
                    {name: morsel.value for name, morsel in jar.items()},
                    body,
                )
                with club.lock:
                    club.seen.append(seen)
                route = club.routes.get(seen.path)
                status, headers, payload = route(seen) if route else (404, [], {"error": "?"})
                raw = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in headers:
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # the daemon went away meanwhile

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server.server_address[1]}{path}"

    def paths(self) -> list[str]:
        with self.lock:
            return [seen.path for seen in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def club() -> Iterator[Club]:
    running = Club()
    yield running
    running.close()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        process.cleanup()


def scratch(tmp_path: Path, **extra: str) -> tuple[Path, dict[str, str]]:
    data = tmp_path / "data"
    data.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "RETRY_BASE_SECONDS": "0.05",
        "HTTP_TIMEOUT_SECONDS": "2",
        **extra,
    }
    return data, env


def write(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def start(data: Path, env: dict[str, str], tmp_path: Path, started: list[DaemonProcess]) -> Any:
    process = DaemonProcess(env, data, tmp_path / f"out-{len(started)}.txt").start()
    started.append(process)
    process.wait_ready()
    return process


def settled(env: dict[str, str], key: str, timeout: float = 20) -> dict[str, Any]:
    final = ("booked", "failed", "expired")
    assert wait_until(lambda: db_status(env, key) in final, timeout)
    return by_key(env)[key]


def text_of(raw: bytes) -> tuple[Message, str]:
    message = message_from_bytes(raw)
    part = next(p for p in message.walk() if p.get_content_type() == "text/plain")
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return message, payload.decode()


# --------------------------------------------------------------------------- section 12: finishing


def finishing_flow(club: Club) -> dict[str, Any]:
    """Log in ahead, book at the trigger, confirm after: the confirmation is what fails."""
    return {
        "prepare_seconds": 2,
        "steps": [
            {
                "name": "login",
                "url": club.url("/login"),
                "json": {"password": "{secret.password}"},
                "extract": {"jwt": {"json": "jwt"}},
            },
            {
                "name": "book",
                "booking": True,
                "url": club.url("/book"),
                "headers": {"Authorization": "Bearer {login.jwt}"},
                "json": {"court": "{court_id}"},
                "booking_ref": "booking.id",
            },
            {
                "name": "confirm",
                "method": "PUT",
                "url": club.url("/confirm"),
                "headers": {"Authorization": "Bearer {login.jwt}"},
            },
        ],
    }


def finishing_setup(club: Club, tmp_path: Path, **extra: str) -> tuple[Path, dict[str, str], str]:
    club.routes["/login"] = lambda seen: (200, [], {"jwt": JWT})
    club.routes["/book"] = lambda seen: (201, [], {"booking": {"id": "BK-7"}})
    data, env = scratch(tmp_path, **extra)
    write(data / "clubs" / "fc.json", finishing_flow(club))
    write(data / "tokens.json", {"default": {"password": PASSWORD}})
    when = desired_for_trigger_in(4)
    entry = {"id": "fin", "type": "one-off", "desired_time": iso_z(when), "court_id": 3}
    write(data / "schedules.json", [{**entry, "club": "fc"}])
    return data, env, f"fin@{iso_z(when)}"


def test_a_failed_finishing_step_keeps_the_booking_and_retry_never_books_it_again(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    club.routes["/confirm"] = lambda seen: (500, [], {"error": "down"})
    with smtp_server() as (port, mailbox):
        data, env, key = finishing_setup(
            club,
            tmp_path,
            SMTP_HOST="127.0.0.1",
            SMTP_PORT=str(port),
            SMTP_SECURITY="none",
            NOTIFY_EMAIL="me@example.org",
        )
        process = start(data, env, tmp_path, daemons)

        row = settled(env, key)

        assert (row["status"], row["booking_ref"], row["booked_court"]) == ("failed", "BK-7", "3")
        assert row["last_error"] == (
            "the club took the booking (court 3, ref BK-7) but step 'confirm' did not complete: "
            "HTTP 500: down (not a 2xx answer: the club is down or failing), after 3 tries; "
            "check it with the club"
        )
        assert wait_until(lambda: len(mailbox.raw) == 1, 10)
        message, body = text_of(mailbox.raw[0])
        assert str(message["Subject"]).startswith("Booking failed: fin court 3 ")
        # The advice is to check with the club, never to retry: that would book twice.
        assert "python main.py retry" not in body
        assert "What to do: the club took this booking, but a step after it did not complete." in (
            body
        )

        again = cli(env, "retry", key)

        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"courtbot retry: {key}: left failed: the club took this booking (ref BK-7) but a "
            "step after it did not complete; check it with the club (booking it again would "
            "book twice)"
        )
        assert cli(env, "retry", "fin").returncode == 1
        time.sleep(1.5)  # a daemon that took the retry would book within a second
        assert club.paths().count("/book") == 1
        assert by_key(env)[key]["status"] == "failed"
        assert process.stop() == 0


def test_a_crash_during_a_finishing_step_fails_it_at_restart_without_booking_again(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    held, release = threading.Event(), threading.Event()

    def confirm(seen: Seen) -> Answer:
        held.set()
        release.wait(20)
        return 200, [], {}

    club.routes["/confirm"] = confirm
    data, env, key = finishing_setup(club, tmp_path)
    first = start(data, env, tmp_path, daemons)
    assert held.wait(20), first.output()
    first.kill9()
    release.set()

    second = start(data, env, tmp_path, daemons)
    row = settled(env, key)

    assert (row["status"], row["booking_ref"], row["booked_court"]) == ("failed", "BK-7", "3")
    assert row["last_error"] == (
        "the club took the booking (court 3, ref BK-7) but courtbot stopped before the steps "
        "after it completed; check it with the club (it is not booked again)"
    )
    # The outcome (and so its email) says when the booking request went, never "no booking
    # request was sent" for a booking the club holds.
    assert row["attempts"] == 1
    assert row["sent"].startswith("sent ") and "after the window opened" in row["sent"], row
    time.sleep(1)
    assert club.paths().count("/book") == 1
    assert second.stop() == 0


# --------------------------------------------------------------------------- section 8: channels

#: Not shaped like a bot token (digits:letters), so Apprise refuses the URL and logs it.
BOT_TOKEN = "SECRETB0T7"  # Apprise quotes this one whole in its own log line


def test_channels_get_the_emails_subject_and_the_log_lines_facts_and_no_url_secret_is_logged(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    posted: list[dict[str, Any]] = []

    def hook(seen: Seen) -> Answer:
        posted.append(json.loads(seen.body))
        return 200, [], {}

    sink = Club()
    sink.routes["/hook"] = hook
    club.routes["/book"] = lambda seen: (201, [], {"id": "BK-9"})
    urls = " ".join(
        (
            sink.url("/hook").replace("http://", "json://"),
            f"tgram://{BOT_TOKEN}/",  # no chat: invalid, skipped
            f"json://user:{PASSWORD}@127.0.0.1:9/dead",  # nobody listens: fails
        )
    )
    try:
        with smtp_server() as (port, mailbox):
            data, env = scratch(
                tmp_path,
                BOOKING_API_URL=club.url("/book"),
                NOTIFY_URLS=urls,
                SMTP_HOST="127.0.0.1",
                SMTP_PORT=str(port),
                SMTP_SECURITY="none",
                NOTIFY_EMAIL="me@example.org",
            )
            write(data / "tokens.json", {"default": TOKEN})
            when = desired_for_trigger_in(3)
            entry = {"id": "chan", "type": "one-off", "desired_time": iso_z(when), "court_id": 4}
            write(data / "schedules.json", [entry])
            key = f"chan@{iso_z(when)}"

            checked = cli(env, "check")

            assert checked.returncode == 1
            assert "error: NOTIFY_URLS: 'tgram://****' is not a valid tgram:// URL" in (
                checked.stderr
            )
            process = start(data, env, tmp_path, daemons)
            assert settled(env, key)["status"] == "booked"
            assert wait_until(lambda: len(posted) == 1 and len(mailbox.raw) == 1, 10)
            assert wait_until(lambda: "json://user:****@127.0.0.1:9/dead" in process.output(), 10)
            assert process.stop() == 0
    finally:
        sink.close()

    output = process.output() + (data / "bot.log").read_text()
    assert "NOTIFY_URLS: tgram://**** is not a valid Apprise URL; skipped" in output
    for secret in (BOT_TOKEN, PASSWORD, TOKEN):
        assert secret not in output
        assert secret not in checked.stdout + checked.stderr
    message, _ = text_of(mailbox.raw[0])
    assert posted[0]["title"] == message["Subject"]
    assert posted[0]["message"].split("\n")[0] == (
        f"Booked for chan: court 4 on {when:%a %Y-%m-%d %H:%M} (UTC)."
    )
    assert f"Instance {key}, attempts 1." in posted[0]["message"].split("\n")


def test_the_secrets_of_a_channel_url_are_what_its_masked_form_hides() -> None:
    # Apprise's words about a delivery are scrubbed of these before they reach a log line.
    assert url_secrets("json://user:pw-s3cret@127.0.0.1:8/hook") == {"pw-s3cret"}
    assert url_secrets("tgram://123456789:AAHs3cret/-100123") == {"123456789", "AAHs3cret"}
    assert url_secrets("json://u:p%40ss-w0rd@127.0.0.1/x") == {"p%40ss-w0rd", "p@ss-w0rd"}
    assert url_secrets("ntfys://courts") == set()


# --------------------------------------------------------------------------- section 11/12: headers


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (
            {"X Club": "1"},
            "headers: 'X Club' is not a header name (letters, digits and !#$%&'*+-.^_`|~; no "
            "spaces, no placeholders)",
        ),
        (
            {"{token}": "1"},
            "headers: '{token}' is not a header name (letters, digits and !#$%&'*+-.^_`|~; no "
            "spaces, no placeholders)",
        ),
        (
            {"X-Club": "a\r\nX-Evil: 1"},
            "headers.X-Club: 'a\\r\\nX-Evil: 1' holds a line break or another control character",
        ),
        ({"X-Club": " {token}"}, "headers.X-Club: ' {token}' starts with a space"),
        (
            {"X-Club": "€ {token}"},
            "headers.X-Club: '€ {token}' holds a character beyond Latin-1 (write it "
            "percent-encoded, or in the body)",
        ),
    ],
)
def test_a_header_no_request_can_carry_is_an_error_of_the_template_naming_the_key(
    tmp_path: Path, headers: dict[str, str], error: str
) -> None:
    data, env = scratch(tmp_path, BOOKING_REQUEST_TEMPLATE="club.json")
    write(data / "club.json", {"url": "https://api.club.example/book", "headers": headers})
    write(data / "schedules.json", [])
    expected = f"BOOKING_REQUEST_TEMPLATE {data / 'club.json'}: {error}"

    checked = cli(env, "check")
    ran = cli(env, "run")

    assert checked.returncode == 1
    assert f"error: {expected}" in checked.stderr.splitlines()
    assert ran.returncode == 2
    assert ran.stderr.strip() == f"courtbot: cannot start: {expected}"


def test_an_extracted_value_with_a_line_break_fails_its_header_step_naming_it(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    club.routes["/login"] = lambda seen: (200, [], {"jwt": f"{JWT}\r\nX-Evil: 1"})
    club.routes["/book"] = lambda seen: (201, [], {"id": "BK-1"})
    data, env = scratch(tmp_path)
    flow = {
        "prepare_seconds": 2,
        "steps": [
            {
                "name": "login",
                "url": club.url("/login"),
                "json": {"key": "{token}"},
                "extract": {"jwt": {"json": "jwt"}},
            },
            {
                "name": "book",
                "booking": True,
                "url": club.url("/book"),
                "headers": {"Authorization": "Bearer {login.jwt}"},
            },
        ],
    }
    write(data / "clubs" / "fc.json", flow)
    write(data / "tokens.json", {"default": TOKEN})
    when = desired_for_trigger_in(4)
    entry = {"id": "crlf", "type": "one-off", "desired_time": iso_z(when), "club": "fc"}
    write(data / "schedules.json", [entry])
    process = start(data, env, tmp_path, daemons)

    row = settled(env, f"crlf@{iso_z(when)}")

    assert (row["status"], row["attempts"]) == ("failed", 0)
    assert row["last_error"] == (
        "court any: step 'book': header 'Authorization' cannot carry the value of {login.jwt}: "
        "it holds a line break or another control character, starts with a space or goes "
        "beyond Latin-1; nothing was sent for it"
    )
    assert club.paths() == ["/login"]
    assert process.stop() == 0
    assert JWT not in process.output() + (data / "bot.log").read_text()


# --------------------------------------------------------------------------- keys given twice


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '{"url": "https://api.club.example/book", "method": "PUT", "method": "POST"}',
            "method: given twice; JSON would keep only the last, write it once",
        ),
        (
            '{"url": "https://api.club.example/book", "json": {"court": "{court_id}", "court": 3}}',
            "json.court: given twice; JSON would keep only the last, write it once",
        ),
        (
            '{"steps": [{"name": "login", "url": "https://a.example/l", "extract": {"jwt": '
            '{"json": "a"}, "jwt": {"json": "b"}}}, {"name": "book", "booking": true, '
            '"url": "https://a.example/b", "json": {"jwt": "{login.jwt}"}}]}',
            "step 'login': extract.jwt: given twice; JSON would keep only the last, write it once",
        ),
    ],
)
def test_a_key_given_twice_in_a_template_or_flow_is_an_error_naming_it(
    tmp_path: Path, text: str, error: str
) -> None:
    data, env = scratch(tmp_path, BOOKING_REQUEST_TEMPLATE="club.json")
    (data / "club.json").write_text(text)
    write(data / "schedules.json", [])

    checked = cli(env, "check")

    assert checked.returncode == 1
    assert f"error: BOOKING_REQUEST_TEMPLATE {data / 'club.json'}: {error}" in (
        checked.stderr.splitlines()
    )


# --------------------------------------------------------------------------- section 12: secrets


def test_check_names_an_entry_whose_token_lacks_a_field_its_flow_sends(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data, env = scratch(tmp_path)
    write(data / "clubs" / "fc.json", finishing_flow(club))  # sends {secret.password}
    write(data / "tokens.json", {"default": TOKEN, "obj": {"email": "me@example.org"}})
    when = desired_for_trigger_in(3600)
    entries = [
        {"id": "plain", "type": "one-off", "desired_time": iso_z(when), "club": "fc"},
        {"id": "obj", "type": "one-off", "desired_time": iso_z(when), "club": "fc", "token": "obj"},
    ]
    write(data / "schedules.json", entries)
    label = data / "clubs" / "fc.json"
    errors = [
        f"schedules.json entry 'plain' (#1): token: 'default' has no field 'password', which "
        f"{label} sends as {{secret.password}}: write the token in tokens.json as an object with "
        "the fields password",
        f"schedules.json entry 'obj' (#2): token: 'obj' has no field 'password', which {label} "
        "sends as {secret.password}: add it to the token's object in tokens.json (the flow uses "
        "password)",
    ]

    checked = cli(env, "check")

    assert checked.returncode == 1
    assert [line for line in checked.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {error}" for error in errors
    ]
    # The daemon says so at load, and keeps the entries: completing the token is enough.
    process = start(data, env, tmp_path, daemons)
    assert {row["status"] for row in by_key(env).values()} == {"pending"}
    assert process.stop() == 0
    for error in errors:
        assert error in process.output()


# --------------------------------------------------------------------------- section 5/7: reloads


def preparing_setup(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> tuple[Path, dict[str, str], dict[str, Any], str, DaemonProcess]:
    """An entry whose flow logs in 6 s before a trigger 9 s away: once the login came, its
    instance is claimed (``booking``) and waits for the trigger."""
    club.routes["/login"] = lambda seen: (200, [], {"jwt": JWT})
    club.routes["/book"] = lambda seen: (201, [], {"booking": {"id": "BK-1"}})
    data, env = scratch(tmp_path)
    flow = finishing_flow(club)
    flow["prepare_seconds"] = 6
    flow["steps"] = flow["steps"][:2]
    write(data / "clubs" / "fc.json", flow)
    write(data / "tokens.json", {"default": {"password": PASSWORD}})
    when = desired_for_trigger_in(9)
    entry = {"id": "prep", "type": "one-off", "desired_time": iso_z(when), "club": "fc"}
    write(data / "schedules.json", [entry])
    process = start(data, env, tmp_path, daemons)
    key = f"prep@{iso_z(when)}"
    assert wait_until(lambda: "/login" in club.paths(), 15), process.output()
    assert db_status(env, key) == "booking"
    return data, env, entry, key, process


@pytest.mark.parametrize("edit", ["disabled", "removed"])
def test_an_entry_disabled_or_removed_while_its_flow_prepares_is_never_booked(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess], edit: str
) -> None:
    data, env, entry, key, process = preparing_setup(club, tmp_path, daemons)

    write(data / "schedules.json", [{**entry, "enabled": False}] if edit == "disabled" else [])
    assert cli(env, "reload").returncode == 0

    assert wait_until(lambda: db_status(env, key) == "cancelled", 5)
    time.sleep(5)  # past the trigger
    row = by_key(env)[key]
    assert (row["status"], row["last_error"]) == (
        "cancelled",
        f"entry {edit} {'in' if edit == 'disabled' else 'from'} schedules.json",
    )
    assert club.paths() == ["/login"]
    assert process.stop() == 0
    said = f"booking {key}: cancelled by a reload before its trigger (cancelled); nothing more is"
    assert process.output().count(said) == 1


def test_an_entry_disabled_and_enabled_again_while_its_flow_prepares_is_booked_once(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    data, env, entry, key, process = preparing_setup(club, tmp_path, daemons)

    write(data / "schedules.json", [{**entry, "enabled": False}])
    assert cli(env, "reload").returncode == 0
    assert wait_until(lambda: db_status(env, key) == "cancelled", 5)
    write(data / "schedules.json", [entry])
    assert cli(env, "reload").returncode == 0

    row = settled(env, key)
    assert (row["status"], row["booking_ref"]) == ("booked", "BK-1")
    assert club.paths().count("/book") == 1
    assert process.stop() == 0


# --------------------------------------------------------------------------- section 11: the URL


@pytest.mark.parametrize(
    ("url", "shown", "reason"),
    [
        (
            "https://user:pw-S3cret@api.club.example/book",
            "https://***@api.club.example/book",
            "holds a user or password (user:password@host): credentials go in tokens.json, and "
            "a step sends them as {token} or {secret.<field>}",
        ),
        ("ftp://api.club.example/book", "ftp://api.club.example/book", "is not an http(s) URL"),
        (
            "https://api.club.example:99999/book",
            "https://api.club.example:99999/book",
            "has an invalid port",
        ),
    ],
)
def test_a_booking_api_url_no_request_can_use_is_one_line_not_a_traceback(
    tmp_path: Path, url: str, shown: str, reason: str
) -> None:
    # It becomes the request of section 6 (or the url of a template that names none).
    data, env = scratch(tmp_path, BOOKING_API_URL=url, LOG_FILE="-")
    write(data / "schedules.json", [])
    expected = (
        f"BOOKING_API_URL: {shown!r} {reason}; set it to the club's booking endpoint "
        "(e.g. https://club.example/api/bookings)"
    )

    ran = cli(env, "run")
    checked = cli(env, "check")

    assert (ran.returncode, ran.stderr.strip()) == (2, f"courtbot: cannot start: {expected}")
    assert (checked.returncode, checked.stderr.strip()) == (1, f"courtbot check: {expected}")
    assert "pw-S3cret" not in ran.stdout + ran.stderr + checked.stdout + checked.stderr
    assert cli(env, "status").returncode == 0  # status needs no booking URL


def test_a_booking_api_url_on_a_host_with_an_underscore_is_valid(tmp_path: Path) -> None:
    # A container's service name (``club_api``) is a host like any other.
    data, env = scratch(tmp_path, BOOKING_API_URL="http://club_api:8080/book")
    write(data / "tokens.json", {"default": TOKEN})
    when = desired_for_trigger_in(3600)
    write(data / "schedules.json", [{"id": "u", "type": "one-off", "desired_time": iso_z(when)}])

    checked = cli(env, "check")

    assert checked.returncode == 0, checked.stderr
    assert "  request: BOOKING_API_URL (http://club_api:8080/book)" in checked.stdout
    assert "    POST http://club_api:8080/book" in checked.stdout


def test_a_template_url_with_a_password_is_an_error_that_does_not_quote_it(tmp_path: Path) -> None:
    data, env = scratch(tmp_path, BOOKING_REQUEST_TEMPLATE="club.json")
    write(data / "club.json", {"url": "https://bob:pw-S3cret@api.club.example/book"})
    write(data / "schedules.json", [])

    checked = cli(env, "check")

    assert checked.returncode == 1
    assert (
        f"error: BOOKING_REQUEST_TEMPLATE {data / 'club.json'}: url: "
        "'https://***@api.club.example/book' holds a user or password (user:password@host): "
        "credentials go in tokens.json, and a step sends them as {token} or {secret.<field>}"
    ) in checked.stderr.splitlines()
    assert "pw-S3cret" not in checked.stdout + checked.stderr


# --------------------------------------------------------------------------- status


def test_a_reason_quoting_a_club_keeps_each_status_row_on_one_line_and_codes_escaped(
    club: Club, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    club.routes["/book"] = lambda seen: (400, [], {"error": "bad\ncourt \x1b[2J"})
    data, env = scratch(tmp_path, BOOKING_API_URL=club.url("/book"))
    write(data / "tokens.json", {"default": TOKEN})
    when = desired_for_trigger_in(-60)  # the window is open: books at once
    write(data / "schedules.json", [{"id": "esc", "type": "one-off", "desired_time": iso_z(when)}])
    process = start(data, env, tmp_path, daemons)
    assert settled(env, f"esc@{iso_z(when)}")["status"] == "failed"
    assert process.stop() == 0

    shown = cli(env, "status")

    assert shown.returncode == 0
    assert "\x1b" not in shown.stdout
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("esc ")]
    assert row.endswith(
        "the club refused the request (HTTP 400: bad\\ncourt \\x1b[2J): check the entry and the URL"
    )
