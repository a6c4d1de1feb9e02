"""notify.py: log lines, email through a real SMTP server on loopback, Apprise channels aimed at a
real HTTP server on loopback. Every server is started and stopped by the test that needs it."""

from __future__ import annotations

import email
import email.policy
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import notify
from notify import (
    Notifier,
    NotifyConfigError,
    NotifySettings,
    Outcome,
    mask_url,
    split_notify_urls,
    subject_for,
    validate_notify_urls,
)

LONDON = ZoneInfo("Europe/London")
KEY = "wed-evening@2026-12-02T17:00:00Z"
START = datetime(2026, 12, 2, 17, 0, tzinfo=LONDON)
TRIGGER = datetime(2026, 11, 25, 17, 0, tzinfo=UTC)
BEFORE_START = datetime(2026, 11, 25, 17, 0, 1, tzinfo=UTC)
AFTER_START = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
TOKEN = "tok-SECRET-0123456789abcdef"
PASSWORD = "pw-Sup3r-Secret-42"
USER = "bot@club.example"


def make_outcome(status: str = "booked", **changes: Any) -> Outcome:
    values: dict[str, Any] = {
        "status": status,
        "key": KEY,
        "schedule_id": "wed-evening",
        "court": "3",
        "desired_start": START,
        "trigger_time": TRIGGER,
        "duration_minutes": 60,
        "attempts": 1 if status == "booked" else 3,
        "reason": None if status == "booked" else "court 3 taken (409)",
        "booking_ref": "bk-7" if status == "booked" else None,
        "timezone": "Europe/London",
        "timing": {
            "booked": "sent 0.8 ms after the window opened",
            "failed": "sent 1.2 ms after the window opened",
            "expired": "not sent: courtbot was not running at the trigger",
        }.get(status),
    }
    values.update(changes)
    return Outcome(**values)


def make_settings(**changes: Any) -> NotifySettings:
    values: dict[str, Any] = {
        "smtp_host": None,
        "smtp_port": 25,
        "smtp_user": None,
        "smtp_password": None,
        "smtp_from": "courtbot@club.example",
        "smtp_security": "none",
        "recipients": (),
        "urls": (),
        "timeout": 5.0,
    }
    values.update(changes)
    return NotifySettings(**values)


@dataclass
class Waits:
    """Stands in for time.sleep: records the retry waits instead of sleeping them."""

    seen: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.seen.append(seconds)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def notifier_for(
    settings: NotifySettings, now: datetime = BEFORE_START, waits: Waits | None = None
) -> Iterator[Notifier]:
    notifier = Notifier(settings, retry_wait=0.01, sleep=waits or Waits(), clock=lambda: now)
    notifier.start()
    try:
        yield notifier
    finally:
        notifier.close(timeout=10)


# --- SMTP server on loopback --------------------------------------------------------------------


@dataclass
class Mailbox:
    """aiosmtpd handler: keeps what arrives; `replies` scripts DATA answers (None = accept)."""

    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    replies: list[str | None] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    data_calls: int = 0
    raw: list[bytes] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_calls += 1
        scripted = self.replies.pop(0) if self.replies else None
        if scripted is not None:
            return scripted
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.raw.append(envelope.content)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        ok = auth_data.login == USER.encode() and auth_data.password == PASSWORD.encode()
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert file, key file)."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "courtbot test SMTP")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def server_context(certificate: tuple[Path, Path]) -> Any:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def trusted(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """``certificate``, trusted through SSL_CERT_FILE (the default context trusts it only so)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return certificate


@contextmanager
def smtp_server(mailbox: Mailbox, **smtp_options: Any) -> Iterator[int]:
    """Runs aiosmtpd on 127.0.0.1 (a free port); yields the port."""
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **smtp_options)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def email_settings(port: int, **changes: Any) -> NotifySettings:
    values: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "recipients": ("alice@example.org",),
    }
    values.update(changes)
    return make_settings(**values)


def mailed(
    *outcomes: Outcome, mailbox: Mailbox | None = None, now: datetime = BEFORE_START, **changes: Any
) -> Mailbox:
    """``outcomes`` notified by email (``email_settings(port, **changes)``) to a loopback SMTP
    server, the notifier closed; the mailbox they went to."""
    mailbox = mailbox or Mailbox()
    with (
        smtp_server(mailbox) as port,
        notifier_for(email_settings(port, **changes), now) as notifier,
    ):
        for outcome in outcomes:
            notifier.notify(outcome)
    return mailbox


def subject(message: EmailMessage) -> str:
    return str(message["Subject"])


def only_message(mailbox: Mailbox) -> EmailMessage:
    assert len(mailbox.messages) == 1, mailbox.messages
    return mailbox.messages[0]


def body_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


# --- Email: what arrives ------------------------------------------------------------------------


def test_booked_email_has_subject_facts_and_calendar_entry() -> None:
    mailbox = mailed(make_outcome("booked"))

    message = only_message(mailbox)
    assert subject(message) == "Booked: wed-evening court 3 Wed 2026-12-02 17:00 (Europe/London)"
    assert message["From"] == "courtbot@club.example"
    assert message["To"] == "alice@example.org"
    body = body_text(message)
    for fact in (
        "wed-evening",
        KEY,
        "Court:",
        "Wed 2026-12-02 17:00 (Europe/London), 60 minutes",
        "Attempts:      1",
        "bk-7",
        "booking.ics",
    ):
        assert fact in body, fact
    lines = body.splitlines()
    assert "Window opened: 2026-11-25 17:00:00 UTC" in lines
    assert "Timing:        Sent 0.8 ms after the window opened." in lines

    attachments = list(message.iter_attachments())
    assert len(attachments) == 1
    ics_part = attachments[0]
    assert ics_part.get_content_type() == "text/calendar"
    assert ics_part.get_filename() == "booking.ics"
    ics = ics_part.get_payload(decode=True)
    assert isinstance(ics, bytes)
    assert ics.endswith(b"\r\n")
    assert b"\n" not in ics.replace(b"\r\n", b"")
    lines = ics.decode().split("\r\n")[:-1]
    assert all(len(line.encode()) <= 75 for line in lines)
    unfolded = ics.decode().replace("\r\n ", "").split("\r\n")
    assert unfolded[0] == "BEGIN:VCALENDAR"
    assert "METHOD:PUBLISH" in unfolded
    assert unfolded.count("BEGIN:VEVENT") == 1
    assert f"UID:{KEY}" in unfolded
    # 17:00 in London in December is 17:00 UTC; one hour long.
    assert "DTSTART:20261202T170000Z" in unfolded
    assert "DTEND:20261202T180000Z" in unfolded
    assert "SUMMARY:wed-evening: court 3" in unfolded
    description = next(line for line in unfolded if line.startswith("DESCRIPTION:"))
    assert "Booking reference: bk-7" in description


def test_calendar_times_are_utc_in_summer() -> None:
    outcome = make_outcome(
        desired_start=datetime(2026, 7, 1, 9, 30, tzinfo=LONDON), duration_minutes=90
    )
    ics = notify.calendar_entry(outcome, BEFORE_START).decode()
    assert "DTSTART:20260701T083000Z\r\n" in ics
    assert "DTEND:20260701T100000Z\r\n" in ics


def test_escape_controls_keeps_one_event_on_one_line() -> None:
    text = "ref=bk-1\r\n2026-11-23T12:00:00.000Z INFO bot: forged\x1b[2J\t\x00\x85\u2028end"
    assert notify.escape_controls(text) == (
        "ref=bk-1\\r\\n2026-11-23T12:00:00.000Z INFO bot: forged\\x1b[2J\\t\\x00\\x85\\u2028end"
    )


def test_calendar_text_never_holds_a_bare_cr_or_another_control() -> None:
    outcome = make_outcome(booking_ref="bk-1\rX-INJECTED:evil\x00\x1b", court="3\r4")
    ics = notify.calendar_entry(outcome, BEFORE_START)
    assert b"\r" not in ics.replace(b"\r\n", b"")
    assert b"\n" not in ics.replace(b"\r\n", b"")
    unfolded = ics.decode().replace("\r\n ", "").split("\r\n")
    assert not any(line.startswith("X-INJECTED") for line in unfolded)
    assert "SUMMARY:wed-evening: court 3\\n4" in unfolded
    description = next(line for line in unfolded if line.startswith("DESCRIPTION:"))
    assert description.startswith("DESCRIPTION:Booking reference: bk-1\\nX-INJECTED:evil\\n")


def test_a_court_with_a_line_break_still_gets_its_email() -> None:
    # Validation rejects such a court; one stored before it must not lose the email (the email
    # library refuses a header holding a line break).
    mailbox = mailed(make_outcome(court="3\r\nBcc: someone@else.example"))
    message = only_message(mailbox)
    assert subject(message) == (
        "Booked: wed-evening court 3\\r\\nBcc: someone@else.example Wed 2026-12-02 17:00 "
        "(Europe/London)"
    )
    assert message["Bcc"] is None


def test_failed_email_says_why_and_how_to_retry() -> None:
    mailbox = mailed(make_outcome("failed", court="3, 4", reason="courts 3, 4 taken (409)"))

    message = only_message(mailbox)
    assert subject(message) == (
        "Booking failed: wed-evening courts 3, 4 Wed 2026-12-02 17:00 (Europe/London)"
    )
    body = body_text(message)
    assert "Booking failed for wed-evening: courts 3, 4 on Wed 2026-12-02 17:00" in body
    assert "courts 3, 4 taken (409)" in body
    assert "Attempts:      3" in body
    assert f"python main.py retry {KEY}" in body
    assert list(message.iter_attachments()) == []


def test_failed_email_after_the_start_offers_no_retry() -> None:
    outcome = make_outcome("failed", reason="outcome unknown: check with the club")
    mailbox = mailed(outcome, now=AFTER_START)

    body = body_text(only_message(mailbox))
    assert "outcome unknown: check with the club" in body
    assert "python main.py retry" not in body
    assert "start has passed" in body


def test_expired_email_is_a_missed_booking() -> None:
    outcome = make_outcome("expired", court=None, attempts=0, reason="daemon down at trigger")
    mailbox = mailed(outcome, now=AFTER_START)

    message = only_message(mailbox)
    assert subject(message) == (
        "Booking missed: wed-evening any court Wed 2026-12-02 17:00 (Europe/London)"
    )
    body = body_text(message)
    assert "courtbot was not running when its booking window opened" in body
    assert "daemon down at trigger" in body
    assert "Court:         any" in body
    assert list(message.iter_attachments()) == []


def test_missed_at_start_up_is_one_email(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="notify")
    missed = [
        make_outcome("expired", attempts=0, reason="down"),
        make_outcome(
            "expired",
            key="wed-evening@2026-12-09T17:00:00Z",
            desired_start=START + timedelta(days=7),
            attempts=0,
            reason="down",
        ),
        make_outcome(
            "expired",
            key="sat-morning@2026-12-05T09:00:00Z",
            schedule_id="sat-morning",
            desired_start=datetime(2026, 12, 5, 9, 0, tzinfo=LONDON),
            attempts=0,
            reason="down",
        ),
    ]
    mailbox = Mailbox()
    with (
        smtp_server(mailbox) as port,
        notifier_for(email_settings(port), now=AFTER_START) as notifier,
    ):
        notifier.notify_missed(missed)

    message = only_message(mailbox)
    assert subject(message) == "Booking missed: 3 bookings (wed-evening, sat-morning)"
    body = body_text(message)
    for outcome in missed:
        assert outcome.key in body
    assert "Sat 2026-12-05 09:00 (Europe/London)" in body
    logged = [r.getMessage() for r in caplog.records if r.name == "notify"]
    assert sum(line.startswith("expired ") for line in logged) == 3


def test_missed_with_one_outcome_uses_its_own_subject() -> None:
    mailbox = Mailbox()
    with smtp_server(mailbox) as port, notifier_for(email_settings(port)) as notifier:
        notifier.notify_missed([make_outcome("expired", reason="down")])
        notifier.notify_missed([])
    assert subject(only_message(mailbox)).startswith("Booking missed: wed-evening court 3 ")


def test_a_subject_that_fits_a_line_of_its_own_is_not_moved_onto_the_next() -> None:
    # 72 characters: Python's default folding would send "Subject:" CRLF " Booked: ...", which
    # readers show with a leading space.
    outcome = make_outcome(schedule_id="a", timezone="America/Argentina/Buenos_Aires")
    expected = "Booked: a court 3 Wed 2026-12-02 14:00 (America/Argentina/Buenos_Aires)"
    mailbox = mailed(outcome)
    assert str(only_message(mailbox)["Subject"]) == expected
    assert f"Subject: {expected}\r\n".encode() in mailbox.raw[0].splitlines(keepends=True)


def test_an_email_for_a_booking_made_late_says_how_late_and_why() -> None:
    late = "sent 2 d 3 h late: courtbot was not running at the trigger"
    mailbox = mailed(make_outcome("booked", timing=late))
    body = body_text(only_message(mailbox))
    lines = body.splitlines()
    assert "Window opened: 2026-11-25 17:00:00 UTC" in lines
    assert "Timing:        Sent 2 d 3 h late: courtbot was not running at the trigger." in lines
    assert "when the booking window opened" not in body


def test_a_taken_failure_advises_a_court_list_not_a_retry(
    http_recorder: tuple[int, list[dict[str, Any]]],
) -> None:
    outcome = make_outcome("failed", reason="court 3: taken (HTTP 409)", retry_helps=False)
    port, requests = http_recorder
    mailbox = mailed(outcome, urls=(f"json://127.0.0.1:{port}/hook",))
    body = body_text(only_message(mailbox))
    assert "python main.py retry" not in body
    assert (
        "What to do: every court tried was taken, so a retry would be taken too. Book\n"
        "another court with the club, and give the entry a list of courts to try in order\n"
        '("court_id": ["3", "4"]) so that courtbot goes on to the next one.'
    ) in body.replace("\r\n", "\n")
    posted = json.loads(requests[0]["body"])
    assert posted["message"].split("\n")[-1] == (
        "Every court tried was taken: book another, or list more courts."
    )
    assert "retry" not in posted["message"]


def test_calendar_entry_has_a_reminder_and_the_club_as_location() -> None:
    def unfolded(ics: bytes) -> list[str]:
        return ics.decode().replace("\r\n ", "").split("\r\n")

    lines = unfolded(notify.calendar_entry(make_outcome(), BEFORE_START, "club.example"))
    # The court and where it is, not a bare host name.
    assert "LOCATION:Court 3\\, club.example" in lines
    assert "SUMMARY:wed-evening: court 3" in lines
    alarm = lines[lines.index("BEGIN:VALARM") : lines.index("END:VALARM") + 1]
    assert alarm == [
        "BEGIN:VALARM",
        "ACTION:DISPLAY",
        "DESCRIPTION:wed-evening: court 3",
        "TRIGGER:-PT60M",
        "END:VALARM",
    ]
    assert lines.index("END:VALARM") < lines.index("END:VEVENT")
    # An entry booked through a club file names it, in the summary and the location.
    named = unfolded(
        notify.calendar_entry(make_outcome(location="playtomic"), BEFORE_START, "club.example")
    )
    assert "SUMMARY:wed-evening: court 3 (playtomic)" in named
    assert "LOCATION:Court 3\\, playtomic" in named
    assert "LOCATION:Court 3" in unfolded(notify.calendar_entry(make_outcome(), BEFORE_START))


def test_the_notifier_puts_its_location_in_the_attached_entry() -> None:
    mailbox = Mailbox()
    settings = email_settings(0)
    with smtp_server(mailbox) as port:
        notifier = Notifier(
            replace(settings, smtp_port=port), clock=lambda: BEFORE_START, location="club.example"
        )
        notifier.start()
        notifier.notify(make_outcome())
        notifier.close(timeout=10)
    (attachment,) = only_message(mailbox).iter_attachments()
    ics = attachment.get_payload(decode=True)
    assert isinstance(ics, bytes)
    assert b"\r\nLOCATION:Court 3\\, club.example\r\n" in ics


def test_a_warning_goes_by_email_and_channel_with_its_lines(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="notify")
    port, requests = http_recorder
    mailbox = Mailbox()
    urls = (f"json://127.0.0.1:{port}/hook",)
    body = "Token 'default' expires soon.\n\nPut a fresh one in tokens.json.\n"
    with (
        smtp_server(mailbox) as smtp_port,
        notifier_for(email_settings(smtp_port, urls=urls)) as notifier,
    ):
        notifier.notify_warning("token 'default'", "Token expiring: default", body)
    message = only_message(mailbox)
    assert subject(message) == "Token expiring: default"
    assert body_text(message).replace("\r\n", "\n") == body
    posted = json.loads(requests[0]["body"])
    assert (posted["title"], posted["message"], posted["type"]) == (
        "Token expiring: default",
        body.strip(),
        "warning",
    )
    assert "token 'default': Token expiring: default" in caplog.messages


def test_several_recipients_get_one_message() -> None:
    mailbox = mailed(make_outcome(), recipients=("alice@example.org", "Bob <bob@example.org>"))

    message = only_message(mailbox)
    assert mailbox.envelopes == [
        ("courtbot@club.example", ["alice@example.org", "bob@example.org"])
    ]
    assert message["To"] == "alice@example.org, Bob <bob@example.org>"


def test_a_refused_recipient_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    mailbox = mailed(
        make_outcome(),
        mailbox=Mailbox(refuse={"bob@example.org"}),
        recipients=("alice@example.org", "bob@example.org"),
    )
    assert mailbox.envelopes == [("courtbot@club.example", ["alice@example.org"])]
    assert "refused for bob@example.org (550 5.1.1 no such user)" in caplog.text


def test_close_delivers_everything_queued() -> None:
    mailbox = mailed(
        *(make_outcome(key=f"wed-evening@2026-12-0{day}T17:00:00Z") for day in range(1, 6))
    )
    assert len(mailbox.messages) == 5


# --- Email: TLS and login -----------------------------------------------------------------------


def test_starttls_with_login(
    trusted: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mailbox = Mailbox()
    options = {
        "tls_context": server_context(trusted),
        "require_starttls": True,
        "auth_require_tls": True,
        "authenticator": mailbox.authenticate,
        "auth_required": True,
    }
    with smtp_server(mailbox, **options) as port:
        settings = email_settings(
            port,
            smtp_security="starttls",
            smtp_user=USER,
            smtp_password=PASSWORD,
            smtp_from=USER,
        )
        with notifier_for(settings) as notifier:
            notifier.notify(make_outcome())

    assert mailbox.logins == [USER]
    assert only_message(mailbox)["From"] == USER
    assert PASSWORD not in caplog.text


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_implicit_ssl_with_login(
    trusted: tuple[Path, Path],
) -> None:
    mailbox = Mailbox()
    options = {
        "ssl_context": server_context(trusted),
        # aiosmtpd only counts STARTTLS as TLS; this connection is TLS from the first byte.
        "auth_require_tls": False,
        "authenticator": mailbox.authenticate,
        "auth_required": True,
    }
    with smtp_server(mailbox, **options) as port:
        settings = email_settings(port, smtp_security="ssl", smtp_user=USER, smtp_password=PASSWORD)
        with notifier_for(settings) as notifier:
            notifier.notify(make_outcome())

    assert mailbox.logins == [USER]
    assert subject(only_message(mailbox)).startswith("Booked: ")


def test_untrusted_certificate_is_refused_and_not_retried(
    certificate: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A CA file that does not hold our certificate: verification must fail.
    other = tmp_path / "empty-ca.pem"
    other.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    mailbox = Mailbox()
    waits = Waits()
    with smtp_server(mailbox, tls_context=server_context(certificate)) as port:
        settings = email_settings(port, smtp_security="starttls")
        with notifier_for(settings, waits=waits) as notifier:
            notifier.notify(make_outcome())

    assert mailbox.messages == []
    assert waits.seen == []
    assert "certificate not trusted" in caplog.text
    assert "not retried" in caplog.text


def test_starttls_refused_by_server_is_not_sent_in_clear(caplog: pytest.LogCaptureFixture) -> None:
    mailbox = mailed(make_outcome(), smtp_security="starttls")
    assert mailbox.messages == []
    assert "STARTTLS" in caplog.text


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_wrong_password_is_not_retried_and_never_logged(
    trusted: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    mailbox = Mailbox()
    wrong = "wrong-" + PASSWORD
    waits = Waits()
    options = {"ssl_context": server_context(trusted), "auth_require_tls": False}
    with smtp_server(mailbox, authenticator=mailbox.authenticate, **options) as port:
        settings = email_settings(port, smtp_security="ssl", smtp_user=USER, smtp_password=wrong)
        with notifier_for(settings, waits=waits) as notifier:
            notifier.notify(make_outcome())

    assert mailbox.messages == []
    assert waits.seen == []
    assert f"login as '{USER}' refused: 535" in caplog.text
    assert wrong not in caplog.text
    assert PASSWORD not in caplog.text


# --- Email: failures never reach the caller -----------------------------------------------------


def test_server_down_is_logged_retried_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    waits = Waits()
    settings = email_settings(free_port(), smtp_password=PASSWORD, smtp_user=USER)
    notifier = Notifier(settings, retry_wait=0.25, sleep=waits, clock=lambda: BEFORE_START)
    notifier.start()
    began = time.monotonic()
    notifier.notify(make_outcome())
    assert time.monotonic() - began < 0.1
    notifier.close(timeout=5)

    assert waits.seen == [0.25, 0.5]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not sent after 3 tries" in r.getMessage() for r in warnings)
    assert "connection refused" in caplog.text
    assert PASSWORD not in caplog.text


def test_hanging_server_does_not_delay_notify(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:
        # Accepts connections (backlog) and never says a word.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        settings = email_settings(port, timeout=0.2)
        notifier = Notifier(settings, retry_wait=0.01, sleep=Waits(), clock=lambda: BEFORE_START)
        notifier.start()
        began = time.monotonic()
        notifier.notify(make_outcome())
        assert time.monotonic() - began < 0.1
        notifier.close(timeout=5)
        # Three tries, each given up after the 0.2 s timeout.
        assert 0.6 <= time.monotonic() - began < 2.0
    assert "not sent after 3 tries: none 127.0.0.1:" in caplog.text
    assert "no answer within 0.2s" in caplog.text


def test_close_gives_up_at_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = email_settings(silent.getsockname()[1], timeout=2.0)
        notifier = Notifier(settings, retry_wait=0.01, clock=lambda: BEFORE_START)
        notifier.start()
        notifier.notify(make_outcome())
        began = time.monotonic()
        notifier.close(timeout=0.3)
        assert time.monotonic() - began < 1.0
    assert "undelivered" in caplog.text
    # The abandoned worker ends on its own (the server is gone); let it, so that its last log
    # line cannot land in another test.
    wait_for(lambda: not any(t.name == "notify" for t in threading.enumerate()))
    assert "shutting down, not retried" in caplog.text


def test_temporary_refusal_is_retried_then_delivered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="notify")
    mailbox = Mailbox(replies=["451 4.3.0 try again later"])
    waits = Waits()
    with smtp_server(mailbox) as port, notifier_for(email_settings(port), waits=waits) as notifier:
        notifier.notify(make_outcome())
    assert mailbox.data_calls == 2
    assert waits.seen == [0.01]
    assert subject(only_message(mailbox)).startswith("Booked: ")
    assert "451 4.3.0 try again later" in caplog.text


def test_permanent_refusal_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    mailbox = Mailbox(replies=["554 5.7.1 message refused"])
    waits = Waits()
    with smtp_server(mailbox) as port, notifier_for(email_settings(port), waits=waits) as notifier:
        notifier.notify(make_outcome())
    assert mailbox.data_calls == 1
    assert waits.seen == []
    assert "554 5.7.1 message refused" in caplog.text
    assert "not retried" in caplog.text


def test_notify_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    broken = make_outcome(desired_start=None)
    notifier = Notifier(email_settings(free_port()))
    notifier.notify(broken)
    assert "could not report the outcome of " + KEY in caplog.text
    notifier.close(timeout=1)
    notifier.notify(make_outcome())  # after close: logged, not raised
    assert "notifier closed" in caplog.text


# --- Log lines ----------------------------------------------------------------------------------


def test_log_line_for_each_outcome(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="notify")
    notifier = Notifier(make_settings())
    notifier.notify(make_outcome("booked"))
    notifier.notify(make_outcome("failed"))
    notifier.notify(make_outcome("expired", court=None, attempts=0, reason="daemon was down"))
    notifier.close()

    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "notify"]
    at = "at=Wed 2026-12-02 17:00 Europe/London"
    assert records == [
        (
            logging.INFO,
            f"booked {KEY} court=3 {at} attempts=1 (sent 0.8 ms after the window opened) ref=bk-7",
        ),
        (
            logging.WARNING,
            f"failed {KEY} court=3 {at} attempts=3 (sent 1.2 ms after the window opened) "
            "reason=court 3 taken (409)",
        ),
        (
            logging.WARNING,
            f"expired {KEY} court=any {at} attempts=0 (not sent: courtbot was not running at "
            "the trigger) reason=daemon was down",
        ),
    ]
    assert all(r.args for r in caplog.records if r.name == "notify")


def test_tokens_never_leave(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    mailbox = Mailbox()
    outcomes = [
        make_outcome("booked", reason=None),
        make_outcome("failed", reason=f"401 from the club for Authorization: Bearer {TOKEN}"),
    ]
    with smtp_server(mailbox) as port, notifier_for(email_settings(port)) as notifier:
        for outcome in outcomes:
            notifier.notify(outcome)
    assert len(mailbox.messages) == 2
    for message in mailbox.messages:
        assert TOKEN not in message.as_string()
    assert TOKEN not in caplog.text
    assert "Bearer ****" in caplog.text


# --- Subjects -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "court", "expected"),
    [
        ("booked", "3", "Booked: wed-evening court 3"),
        ("failed", None, "Booking failed: wed-evening any court"),
        ("expired", "3, 4", "Booking missed: wed-evening courts 3, 4"),
    ],
)
def test_subject_for(status: str, court: str | None, expected: str) -> None:
    when = " Wed 2026-12-02 17:00 (Europe/London)"
    assert subject_for(make_outcome(status, court=court)) == expected + when


def test_naive_times_are_taken_as_utc() -> None:
    outcome = make_outcome(
        "failed",
        desired_start=datetime(2026, 12, 2, 17, 0),
        trigger_time=datetime(2026, 11, 25, 17, 0),
    )
    assert subject_for(outcome).endswith("Wed 2026-12-02 17:00 (Europe/London)")
    body = notify._email_body([outcome], BEFORE_START)
    assert "2026-11-25 17:00:00 UTC" in body
    assert f"python main.py retry {KEY}" in body


def test_subject_uses_the_entry_zone_even_for_a_utc_start() -> None:
    outcome = make_outcome(desired_start=datetime(2026, 7, 1, 16, 0, tzinfo=UTC))
    assert subject_for(outcome).endswith("Wed 2026-07-01 17:00 (Europe/London)")


# --- Settings from the environment --------------------------------------------------------------


def test_from_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "courts-pi")
    settings = NotifySettings.from_env({})
    assert settings == NotifySettings(
        smtp_host=None,
        smtp_port=587,
        smtp_user=None,
        smtp_password=None,
        smtp_from="courtbot@courts-pi",
        smtp_security="starttls",
        recipients=(),
        urls=(),
    )
    assert settings.timeout == 10.0
    assert not settings.email_enabled


@pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("ssl", 465), ("none", 25)])
def test_from_env_port_follows_security(security: str, port: int) -> None:
    settings = NotifySettings.from_env({"SMTP_SECURITY": security})
    assert (settings.smtp_security, settings.smtp_port) == (security, port)


def test_from_env_security_is_case_insensitive() -> None:
    assert NotifySettings.from_env({"SMTP_SECURITY": " SSL "}).smtp_security == "ssl"


def test_from_env_explicit_port_wins() -> None:
    assert NotifySettings.from_env({"SMTP_SECURITY": "ssl", "SMTP_PORT": "2465"}).smtp_port == 2465


def test_from_env_rejects_unknown_security() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_SECURITY": "tls"})
    assert str(caught.value) == "SMTP_SECURITY: 'tls' is not one of starttls, ssl, none"


@pytest.mark.parametrize("port", ["abc", "0", "70000", "25.5"])
def test_from_env_rejects_bad_port(port: str) -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_PORT": port})
    assert str(caught.value) == f"SMTP_PORT: {port!r} is not a port number (1-65535)"


def test_from_env_rejects_host_with_scheme() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_HOST": "smtp://mail.example.org"})
    assert str(caught.value).startswith(
        "SMTP_HOST: 'smtp://mail.example.org' is not a host name (give the name only"
    )


def test_from_env_user_needs_password() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_USER": USER})
    assert str(caught.value) == (
        f"SMTP_PASSWORD: not set, but SMTP_USER is ('{USER}'); login needs both"
    )


def test_from_env_password_needs_user_and_is_never_quoted() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_PASSWORD": PASSWORD})
    assert str(caught.value) == "SMTP_USER: not set, but SMTP_PASSWORD is; login needs both"
    assert PASSWORD not in str(caught.value)


def test_from_env_sender_defaults_to_user_address() -> None:
    env = {"SMTP_USER": USER, "SMTP_PASSWORD": PASSWORD}
    assert NotifySettings.from_env(env).smtp_from == USER


def test_from_env_sender_defaults_to_hostname_when_user_is_no_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "courts-pi")
    env = {"SMTP_USER": "apikey", "SMTP_PASSWORD": PASSWORD}
    assert NotifySettings.from_env(env).smtp_from == "courtbot@courts-pi"


def test_from_env_rejects_bad_sender() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"SMTP_FROM": "courtbot"})
    assert str(caught.value) == "SMTP_FROM: 'courtbot' is not an email address"


def test_from_env_recipients_are_comma_separated() -> None:
    settings = NotifySettings.from_env(
        {
            "SMTP_HOST": "mail.example.org",
            "NOTIFY_EMAIL": " alice@example.org, Bob <bob@example.org>,,alice@example.org ",
        }
    )
    assert settings.recipients == ("alice@example.org", "Bob <bob@example.org>")
    assert settings.email_enabled


def test_from_env_rejects_bad_recipient() -> None:
    with pytest.raises(NotifyConfigError) as caught:
        NotifySettings.from_env({"NOTIFY_EMAIL": "alice@example.org, bob"})
    assert str(caught.value) == "NOTIFY_EMAIL: 'bob' is not an email address"


@pytest.mark.parametrize(
    "env",
    [{"SMTP_HOST": "mail.example.org"}, {"NOTIFY_EMAIL": "alice@example.org"}],
)
def test_email_needs_host_and_recipients(env: dict[str, str]) -> None:
    assert not NotifySettings.from_env(env).email_enabled


def test_from_env_splits_notify_urls() -> None:
    env = {"NOTIFY_URLS": "json://127.0.0.1/a,ntfy://127.0.0.1/b  tgram://1:A/2"}
    urls = NotifySettings.from_env(env).urls
    assert urls == ("json://127.0.0.1/a", "ntfy://127.0.0.1/b", "tgram://1:A/2")


def test_settings_repr_hides_secrets() -> None:
    settings = make_settings(smtp_password=PASSWORD, urls=(f"tgram://{TOKEN}/1",))
    assert PASSWORD not in repr(settings)
    assert TOKEN not in repr(settings)


# --- Apprise URLs: splitting, masking, validation -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        ("   ", []),
        ("json://h/a", ["json://h/a"]),
        ("json://h/a ntfy://h/b", ["json://h/a", "ntfy://h/b"]),
        ("json://h/a\n\tntfy://h/b\n", ["json://h/a", "ntfy://h/b"]),
        ("json://h/a,ntfy://h/b", ["json://h/a", "ntfy://h/b"]),
        ("json://h/a, ntfy://h/b", ["json://h/a", "ntfy://h/b"]),
        ("mailto://u:p@h/?to=a@x.org,b@x.org", ["mailto://u:p@h/?to=a@x.org,b@x.org"]),
        (
            "mailto://u:p@h/?to=a@x.org,b@x.org,tgram://1:A/2",
            ["mailto://u:p@h/?to=a@x.org,b@x.org", "tgram://1:A/2"],
        ),
        ("ntfys://topic,", ["ntfys://topic"]),
    ],
)
def test_split_notify_urls(value: str, expected: list[str]) -> None:
    assert split_notify_urls(value) == expected


def test_mask_url_hides_password() -> None:
    masked = mask_url("json://user:s3cretpw@127.0.0.1:8080/hook")
    assert "s3cretpw" not in masked
    assert masked.startswith("json://user:")
    assert "127.0.0.1:8080/hook" in masked


def test_mask_url_hides_bot_token() -> None:
    masked = mask_url(f"tgram://123456789:{TOKEN}/4242")
    assert TOKEN not in masked
    assert masked.startswith("tgram://")


def test_mask_url_drops_custom_headers() -> None:
    masked = mask_url(f"json://127.0.0.1/hook?+Authorization=Bearer%20{TOKEN}")
    assert TOKEN not in masked


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nosuch://user:s3cretpw@mail.example.org/x", "nosuch://mail.example.org/****"),
        ("nosuch://123456:s3cretpw/x", "nosuch://****/****"),
        ("nosuch://s3cretpw", "nosuch://****"),
        ("nosuch://localhost", "nosuch://localhost"),
        ("not a url s3cretpw", "not **** **** ****"),
        ("ntfy.sh/my-secret-topic", "ntfy.sh/****"),
        ("123456789:ABCdefSecret/4242", "****:****/****"),
    ],
)
def test_mask_url_without_a_parse_keeps_only_the_host(url: str, expected: str) -> None:
    assert mask_url(url) == expected


def test_validate_notify_urls_accepts_good_urls() -> None:
    assert validate_notify_urls([]) == []
    good = ["json://127.0.0.1:8080/hook", "ntfys://courts", "tgram://123456789:ABCdef/4242"]
    assert validate_notify_urls(good) == []


def test_validate_notify_urls_reports_each_bad_url() -> None:
    errors = validate_notify_urls(
        ["json://127.0.0.1/ok", "json://", "nosuch://user:s3cretpw@host.example.org/", "oops"]
    )
    assert errors == [
        "'json://' is not a valid json:// URL (see Apprise's documentation for this service)",
        "'nosuch://host.example.org/****': nosuch:// is not an Apprise service",
        "'oops' is not a URL (expected scheme://...)",
    ]


# --- Apprise channels against a real HTTP server on loopback ------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        record = {"path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
        self.server.requests.append(record)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_recorder() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_channels_get_title_and_body(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port, requests = http_recorder
    urls = (
        f"json://user:s3cretpw@127.0.0.1:{port}/hook",
        f"ntfy://127.0.0.1:{port}/courts",
    )
    with notifier_for(make_settings(urls=urls)) as notifier:
        notifier.notify(make_outcome("booked"))

    assert len(requests) == 2
    by_path = {r["path"]: r for r in requests}
    title = "Booked: wed-evening court 3 Wed 2026-12-02 17:00 (Europe/London)"
    posted = json.loads(by_path["/hook"]["body"])
    assert posted["title"] == title
    assert posted["message"] == (
        "Booked for wed-evening: court 3 on Wed 2026-12-02 17:00 (Europe/London).\n"
        "Sent 0.8 ms after the window opened.\n"
        f"Instance {KEY}, attempts 1.\n"
        "Ref bk-7."
    )
    assert posted["type"] == "success"
    # ntfy in private mode posts to the server's root with the topic in the JSON body.
    ntfy = json.loads(by_path["/"]["body"])
    assert ntfy["topic"] == "courts"
    assert ntfy["title"] == title
    assert ntfy["message"] == posted["message"]
    assert "s3cretpw" not in caplog.text
    assert "channel JSON json://user:****@127.0.0.1" in caplog.text


def test_one_log_line_per_channel_delivery(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port, requests = http_recorder
    urls = (f"json://127.0.0.1:{port}/hook", f"ntfy://127.0.0.1:{port}/courts")
    with notifier_for(make_settings(urls=urls)) as notifier:
        notifier.notify(make_outcome("booked"))
    assert len(requests) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [
        f"booked {KEY} court=3 at=Wed 2026-12-02 17:00 Europe/London attempts=1 "
        "(sent 0.8 ms after the window opened) ref=bk-7",
        f"channel JSON json://127.0.0.1:{port}/hook: sent for {KEY}",
        f"channel ntfy ntfy://127.0.0.1:{port}/courts: sent for {KEY}",
    ]


def test_channel_message_for_a_failure_names_the_reason(
    http_recorder: tuple[int, list[dict[str, Any]]],
) -> None:
    port, requests = http_recorder
    with notifier_for(make_settings(urls=(f"json://127.0.0.1:{port}/hook",))) as notifier:
        notifier.notify(make_outcome("failed"))
    posted = json.loads(requests[0]["body"])
    assert posted["title"].startswith("Booking failed: wed-evening court 3 ")
    assert posted["message"].split("\n") == [
        "Booking failed for wed-evening: court 3 on Wed 2026-12-02 17:00 (Europe/London).",
        "Sent 1.2 ms after the window opened.",
        f"Instance {KEY}, attempts 3.",
        "Reason: court 3 taken (409)",
        f"Retry: python main.py retry {KEY}",
    ]
    assert posted["type"] == "failure"


def test_missed_bookings_are_one_channel_message(
    http_recorder: tuple[int, list[dict[str, Any]]],
) -> None:
    port, requests = http_recorder
    missed = [
        make_outcome("expired", reason="down"),
        make_outcome("expired", schedule_id="sat-morning", key="sat-morning@x", reason="down"),
    ]
    with notifier_for(make_settings(urls=(f"json://127.0.0.1:{port}/hook",))) as notifier:
        notifier.notify_missed(missed)
    assert len(requests) == 1
    posted = json.loads(requests[0]["body"])
    assert posted["title"] == "Booking missed: 2 bookings (wed-evening, sat-morning)"
    assert posted["message"].split("\n") == [
        f"wed-evening: court 3, Wed 2026-12-02 17:00 (Europe/London). Instance {KEY}. Reason: down",
        "sat-morning: court 3, Wed 2026-12-02 17:00 (Europe/London). Instance sat-morning@x. "
        "Reason: down",
    ]


def test_dead_channel_is_logged_masked_and_others_still_get_it(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port, requests = http_recorder
    dead = free_port()
    urls = (f"json://user:s3cretpw@127.0.0.1:{dead}/hook", f"json://127.0.0.1:{port}/alive")
    with notifier_for(make_settings(urls=urls)) as notifier:
        notifier.notify(make_outcome())
    assert [r["path"] for r in requests] == ["/alive"]
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name == "notify" and r.levelno == logging.WARNING and "not sent" in r.getMessage()
    ]
    assert len(failures) == 1
    assert failures[0].startswith(f"channel JSON json://user:****@127.0.0.1:{dead}/hook: not sent")
    assert "s3cretpw" not in caplog.text


def test_hanging_channel_is_bounded(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    port, requests = http_recorder
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        urls = (
            f"json://127.0.0.1:{silent.getsockname()[1]}/stuck",
            f"json://127.0.0.1:{port}/alive",
        )
        with notifier_for(make_settings(urls=urls, timeout=0.5)) as notifier:
            began = time.monotonic()
            notifier.notify(make_outcome())
            assert time.monotonic() - began < 0.1
            # One bound (0.5 s) for the stuck channel, then the live one at once.
            wait_for(lambda: len(requests) == 1, timeout=3.0)
            elapsed = time.monotonic() - began
    assert elapsed < 2.5
    assert "/stuck: not sent" in caplog.text


def test_invalid_channel_is_skipped(
    http_recorder: tuple[int, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    port, requests = http_recorder
    urls = ("nosuch://user:s3cretpw@host.example.org/", f"json://127.0.0.1:{port}/alive")
    with notifier_for(make_settings(urls=urls)) as notifier:
        notifier.notify(make_outcome())
    assert [r["path"] for r in requests] == ["/alive"]
    assert "NOTIFY_URLS: nosuch://host.example.org/**** is not a valid Apprise URL" in caplog.text
    assert "s3cretpw" not in caplog.text


def test_apprise_is_not_imported_without_urls() -> None:
    script = (
        "import sys, notify\n"
        "s = notify.NotifySettings.from_env({'NOTIFY_EMAIL': 'a@example.org'})\n"
        "n = notify.Notifier(s)\n"
        "n.start()\n"
        "from datetime import datetime, timezone\n"
        "t = datetime(2026, 12, 2, 17, tzinfo=timezone.utc)\n"
        "n.notify(notify.Outcome('booked', 'k@x', 'k', '3', t, t, 60, 1, None, 'r', 'UTC'))\n"
        "notify.split_notify_urls('')\n"
        "notify.validate_notify_urls([])\n"
        "n.close()\n"
        "print('apprise' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(notify.__file__).parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------- section 13


def test_booked_at_a_fallback_time_names_the_time_and_that_the_first_choice_was_taken() -> None:
    outcome = make_outcome(
        desired_start=datetime(2026, 12, 2, 19, 0, tzinfo=LONDON), first_choice="17:00"
    )
    assert notify.subject_for(outcome) == (
        "Booked: wed-evening court 3 Wed 2026-12-02 19:00 (Europe/London), first choice 17:00 taken"
    )
    body = notify._email_body([outcome], BEFORE_START)
    assert "Booked at 19:00, a fallback time: the first choice, 17:00, was taken." in body
    assert "the first choice, 17:00, was taken" in notify._channel_body(outcome, BEFORE_START)
    plain = make_outcome()
    assert "first choice" not in notify.subject_for(plain) + notify._email_body(
        [plain], BEFORE_START
    )


def test_booked_from_the_watch_says_so() -> None:
    outcome = make_outcome(from_watch=True)
    assert notify.subject_for(outcome).endswith(", from the watch")
    assert "Booked from the watch" in notify._channel_body(outcome, BEFORE_START)


def test_watching_and_cancelled_have_their_own_subjects() -> None:
    watching = make_outcome(
        "watching",
        reason="17:00: court 3: taken (HTTP 409); watching until Wed 2026-12-02 15:00 GMT",
        watch_until=datetime(2026, 12, 2, 15, 0, tzinfo=UTC),
        timing=None,
    )
    assert notify.subject_for(watching) == (
        "Watching: wed-evening court 3 Wed 2026-12-02 17:00 (Europe/London) until "
        "Wed 2026-12-02 15:00"
    )
    assert "tries again until Wed 2026-12-02 15:00 (Europe/London)" in notify._email_body(
        [watching], BEFORE_START
    )
    cancelled = make_outcome("cancelled", reason="cancelled at the club", timing=None)
    assert notify.subject_for(cancelled).startswith("Cancelled: wed-evening court 3 ")
    assert notify._notify_type("watching") == notify._notify_type("cancelled") == "info"


# --- What the first hour needs (issue 25) -------------------------------------------------------


def test_a_refused_token_says_fix_the_token_first_then_retry(
    http_recorder: tuple[int, list[dict[str, Any]]],
) -> None:
    port, requests = http_recorder
    reason = (
        "the club rejected token 'default' (HTTP 401): put a valid token in tokens.json, "
        "reload, then `python main.py retry` this booking"
    )
    mailbox = Mailbox()
    settings = replace(email_settings(0), urls=(f"json://127.0.0.1:{port}/hook",))
    with smtp_server(mailbox) as smtp_port:
        notifier = Notifier(replace(settings, smtp_port=smtp_port), clock=lambda: BEFORE_START)
        notifier.start()
        notifier.notify(make_outcome("failed", reason=reason))
        notifier.close(timeout=10)

    body = body_text(only_message(mailbox))
    advice = body[body.index("What to do:") :]
    assert advice.index("Fix the token first") < advice.index(f"python main.py retry {KEY}")
    assert "Book by hand" not in advice
    message = json.loads(requests[0]["body"])["message"]
    assert message.index("Fix the token in tokens.json first") < message.index("Retry:")


def test_a_failure_of_another_kind_is_no_token_problem() -> None:
    assert not notify.refused_credentials("courts 3, 4 taken (409)")
    assert not notify.refused_credentials(None)
    assert notify.refused_credentials(
        "the club rejected the credentials at step 'login' (HTTP 403): check token 'padel'"
    )


def test_send_test_sends_one_test_message_through_every_channel(
    http_recorder: tuple[int, list[dict[str, Any]]],
) -> None:
    port, requests = http_recorder
    mailbox = Mailbox()
    with smtp_server(mailbox) as smtp_port:
        settings = replace(
            email_settings(smtp_port), urls=(f"json://user:s3cretpw@127.0.0.1:{port}/hook",)
        )
        results = notify.send_test(Notifier(settings, clock=lambda: BEFORE_START))

    assert results == [
        (f"email to alice@example.org via 127.0.0.1:{smtp_port}", None),
        (f"JSON json://user:****@127.0.0.1:{port}/hook", None),
    ]
    assert subject(only_message(mailbox)).startswith("Test: ")
    posted = json.loads(requests[0]["body"])
    assert posted["title"].startswith("Test: ")
    assert "notify-test" in posted["message"]


def test_send_test_says_why_a_channel_failed() -> None:
    closed = free_port()
    settings = make_settings(
        smtp_host="127.0.0.1",
        smtp_port=closed,
        recipients=("alice@example.org",),
        urls=(f"json://127.0.0.1:{closed}/hook", "nosuch://s3cretpw@host.example.org/x"),
        timeout=2.0,
    )
    results = dict(notify.send_test(Notifier(settings, clock=lambda: BEFORE_START)))

    assert results[f"email to alice@example.org via 127.0.0.1:{closed}"] == (
        f"none 127.0.0.1:{closed}: connection refused"
    )
    assert results[f"JSON json://127.0.0.1:{closed}/hook"] is not None
    assert results["nosuch://host.example.org/****"] == "not a valid Apprise URL: see check"
    assert "s3cretpw" not in repr(results)


def test_send_test_with_nothing_configured_sends_nothing() -> None:
    assert notify.send_test(Notifier(make_settings(), clock=lambda: BEFORE_START)) == []
