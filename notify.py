"""Final booking outcomes, reported: a log line, an email and Apprise channels.

The booking path calls `Notifier.notify` (or `Notifier.notify_missed` at start-up). That writes the
outcome's log line at once and hands the email and the channel messages to one background worker
thread, so a slow or dead mail server or channel never delays or changes a booking's outcome.

`apprise` is optional and slow to import: it is imported only when `NOTIFY_URLS` is set.
"""

from __future__ import annotations

import email.policy
import ipaddress
import logging
import queue
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

logger = logging.getLogger(__name__)

BOOKED = "booked"
FAILED = "failed"
EXPIRED = "expired"

SECURITY_MODES = ("starttls", "ssl", "none")
_DEFAULT_PORTS = {"starttls": 587, "ssl": 465, "none": 25}

# Three tries for a transient SMTP error (refused, timeout, dropped, 4xx): waits base, then 2x base.
EMAIL_TRIES = 3
_DEFAULT_RETRY_WAIT = 5.0

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# A comma separates two URLs only when the next one's scheme follows at once (CONTRACT section 8).
_URL_SPLIT_RE = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# Defence in depth: a reason is written by our own code, but never let a bearer token through.
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)\S+")
_MAX_REASON = 300
_MISSED_SUBJECT_IDS = 4
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators (str.splitlines breaks
# on several of them): escaped in log lines, dropped from calendar text.
_CONTROLS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Headers are not folded at 78 characters: Python's folder moves a subject that fits a line of
#: its own onto the next one ("Subject:" CRLF " Booked: ..."), which readers then show with a
#: leading space. SMTP allows 998; bodies here stay far below it.
_EMAIL_POLICY = email.policy.default.clone(max_line_length=998)


class NotifyConfigError(ValueError):
    """A notification setting in the environment is invalid; the message names the variable."""


@dataclass(frozen=True)
class Outcome:
    """One instance's final outcome, as the booking path hands it to the notifier."""

    status: str  # "booked" | "failed" | "expired"
    key: str  # instance key, e.g. "wed-evening@2026-12-02T17:00:00Z"
    schedule_id: str
    court: str | None  # booked court, or the wanted court(s) as text ("3", "3, 4"); None = any
    desired_start: datetime  # aware, in the entry's zone
    trigger_time: datetime  # aware, UTC
    duration_minutes: int
    attempts: int
    reason: str | None  # why it failed / was missed, or the club's answer
    booking_ref: str | None
    timezone: str  # IANA name of the entry's zone
    #: When the first booking request left, e.g. "sent 0.8 ms after the window opened".
    timing: str | None = None
    #: False when a ``retry`` would meet the same answer (every court tried was taken).
    retry_helps: bool = True
    #: Where the court is (the club's name or host), for the calendar entry; None: the
    #: notifier's own ``location``.
    location: str | None = None
    #: Failed after the club took the booking (a finishing step did not complete): it is never
    #: booked again, so the advice is to check it with the club, not to retry.
    club_took: bool = False


@dataclass(frozen=True)
class NotifySettings:
    """Where outcomes go: SMTP server and recipients, Apprise URLs, and the per-call time bound."""

    smtp_host: str | None
    smtp_port: int
    smtp_user: str | None
    smtp_password: str | None = field(repr=False)
    smtp_from: str
    smtp_security: str  # "starttls" | "ssl" | "none"
    recipients: tuple[str, ...]
    urls: tuple[str, ...] = field(repr=False)  # Apprise URLs carry bot tokens
    timeout: float = 10.0

    @property
    def email_enabled(self) -> bool:
        """True when email is on: both `SMTP_HOST` and `NOTIFY_EMAIL` are set."""
        return bool(self.smtp_host) and bool(self.recipients)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NotifySettings:
        """Read the SMTP_* variables, NOTIFY_EMAIL and NOTIFY_URLS from `env`.

        Returns the settings (email off when SMTP_HOST or NOTIFY_EMAIL is missing). Raises
        NotifyConfigError naming the variable and its bad value; never quotes SMTP_PASSWORD.
        Apprise URLs are only split here: check them with `validate_notify_urls`.
        """

        def get(name: str) -> str | None:
            return (env.get(name) or "").strip() or None

        host = get("SMTP_HOST")
        if host is not None and ("://" in host or "/" in host or any(ch.isspace() for ch in host)):
            raise NotifyConfigError(
                f"SMTP_HOST: {host!r} is not a host name (give the name only, "
                "e.g. smtp.example.com; the port goes in SMTP_PORT)"
            )

        raw_security = get("SMTP_SECURITY")
        security = (raw_security or "starttls").lower()
        if security not in _DEFAULT_PORTS:
            raise NotifyConfigError(
                f"SMTP_SECURITY: {raw_security!r} is not one of {', '.join(SECURITY_MODES)}"
            )

        port = _smtp_port(get("SMTP_PORT"), security)

        user = get("SMTP_USER")
        # A password is taken as given: leading or trailing spaces may be part of it.
        password = env.get("SMTP_PASSWORD") or None
        if user is not None and password is None:
            raise NotifyConfigError(
                f"SMTP_PASSWORD: not set, but SMTP_USER is ({user!r}); login needs both"
            )
        if password is not None and user is None:
            raise NotifyConfigError("SMTP_USER: not set, but SMTP_PASSWORD is; login needs both")

        sender = get("SMTP_FROM")
        if sender is None:
            # SMTP_USER is often an address; when it is not (an API key name), use our own.
            sender = user if user is not None and _is_address(user) else f"courtbot@{_hostname()}"
        if not _is_address(sender):
            raise NotifyConfigError(f"SMTP_FROM: {sender!r} is not an email address")

        recipients = _recipients(env.get("NOTIFY_EMAIL") or "")
        return cls(
            smtp_host=host,
            smtp_port=port,
            smtp_user=user,
            smtp_password=password,
            smtp_from=sender,
            smtp_security=security,
            recipients=recipients,
            urls=tuple(split_notify_urls(env.get("NOTIFY_URLS") or "")),
        )


def _smtp_port(raw_port: str | None, security: str) -> int:
    """SMTP_PORT as a number (the security mode's own port when unset); raises
    NotifyConfigError for anything that is not a port."""
    if raw_port is None:
        return _DEFAULT_PORTS[security]
    try:
        port = int(raw_port)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise NotifyConfigError(f"SMTP_PORT: {raw_port!r} is not a port number (1-65535)")
    return port


def _recipients(raw: str) -> tuple[str, ...]:
    """NOTIFY_EMAIL's addresses, in order, each once; raises NotifyConfigError for one that is
    not an address."""
    recipients: list[str] = []
    for part in raw.split(","):
        address = part.strip()
        if not address:
            continue
        if not _is_address(address):
            raise NotifyConfigError(f"NOTIFY_EMAIL: {address!r} is not an email address")
        if address not in recipients:
            recipients.append(address)
    return tuple(recipients)


def _hostname() -> str:
    return socket.gethostname().strip() or "localhost"


def _is_address(value: str) -> bool:
    """True when `value` is one address, bare or with a display name ("Bot <bot@x.org>")."""
    _name, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and not any(ch.isspace() for ch in address)


def escape_controls(text: str) -> str:
    """``text`` on one line: each control character written as an escape (``\\n``, ``\\r``,
    ``\\t``, ``\\x1b``, ``\\u2028``), so that no value a file or a club supplies can start a
    line of its own in a log (CONTRACT section 8: one event, one line)."""
    return _CONTROLS_RE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# --- Apprise URLs -------------------------------------------------------------------------------


def split_notify_urls(value: str) -> list[str]:
    """Split a `NOTIFY_URLS` value into URLs.

    URLs are separated by whitespace, or by a comma directly followed by the next `scheme://`
    (a URL's own query may hold commas). Returns the URLs in order, without empty items.
    """
    urls: list[str] = []
    for chunk in value.split():
        for part in _URL_SPLIT_RE.split(chunk):
            # "a://x, b://y": the comma before the space belongs to the list, not to the URL.
            url = part.strip(",")
            if url:
                urls.append(url)
    return urls


def _apprise() -> Any:
    """The apprise module, its own logging kept out of ours: it logs an invalid URL in full
    ("Unparseable Telegram URL tgram://<bot token>/") and a failed delivery in its words, while
    every channel event here is one line of ours with the URL masked (CONTRACT section 8).
    Raises ImportError when it is not installed."""
    import apprise  # noqa: PLC0415 -- optional and slow: loaded only when URLs are in use

    logging.getLogger("apprise").propagate = False
    return apprise


def url_secrets(url: str) -> set[str]:
    """The pieces of an Apprise URL that its masked form hides (a user, a password, a bot token,
    a path or query value), as written and percent-decoded: what no log line may show."""
    match = _SCHEME_RE.match(url)
    rest = url[match.end() :] if match is not None else url
    shown = mask_url(url)
    found: set[str] = set()
    for piece in re.split(r"[/:@?&=#,;]", rest):
        for form in (piece, unquote(piece)):
            if len(form) >= 4 and form not in shown:
                found.add(form)
    return found


def mask_url(url: str) -> str:
    """Return `url` fit for a log line or an error message: its secrets masked.

    Uses Apprise's privacy rendering when Apprise can parse the URL (its query is dropped, as
    Apprise does not mask custom headers or payload fields there); otherwise keeps only
    `scheme://host` and masks the rest.
    """
    try:
        apprise = _apprise()
    except ImportError:
        return _fallback_mask(url)
    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        return _fallback_mask(url)
    return _private_url(plugin)


def _private_url(plugin: Any) -> str:
    rendered = str(plugin.url(privacy=True))
    return rendered.split("?", 1)[0].split("#", 1)[0]


def _fallback_mask(url: str) -> str:
    match = _SCHEME_RE.match(url)
    if match is None:
        return _mask_pieces(url)
    netloc = re.split(r"[/?#]", url[match.end() :], maxsplit=1)[0]
    host = netloc.rpartition("@")[2]  # drop user:password@
    if host.startswith("[") and "]" in host:
        host = host[: host.index("]") + 1]
    else:
        host = host.split(":", 1)[0]  # drop :port, or the secret half of a token like 123:ABC
    shown = host if not host or _looks_like_host(host) else "****"
    masked_rest = netloc != host or url[match.end() + len(netloc) :].strip("/") != ""
    return f"{match.group(1)}://{shown}" + ("/****" if masked_rest else "")


def _mask_pieces(text: str) -> str:
    """Text that is no URL, its secret parts masked: a leading host name or plain word stays
    (``ntfy.sh/****``, ``tgram/****:****``, ``oops``), every later piece is ``****``."""
    pieces = re.split(r"([/:@?&=#,;\s]+)", text)
    first = pieces[0]
    shown = first if _looks_like_host(first) or re.fullmatch(r"[A-Za-z]{1,12}", first) else "****"
    # After the first piece, separators (odd places) alternate with pieces (even places).
    masked = [p if i % 2 else ("****" if p else "") for i, p in enumerate(pieces[1:], start=1)]
    return shown + "".join(masked)


def _looks_like_host(text: str) -> bool:
    """True for localhost, an IP address or a dotted DNS name: not a bare token."""
    if text == "localhost":
        return True
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        return True
    labels = text.split(".")
    return (
        len(labels) > 1
        and all(_HOST_LABEL_RE.match(label) for label in labels)
        and not labels[-1].isdigit()
    )


def validate_notify_urls(urls: Sequence[str]) -> list[str]:
    """Check Apprise URLs without sending anything.

    Returns one error message per invalid URL (the URL masked; the caller adds the
    `NOTIFY_URLS: ` prefix), or [] when all are valid. Imports apprise only when there is a URL
    to check.
    """
    if not urls:
        return []
    try:
        apprise = _apprise()
    except ImportError:
        return [f"{_fallback_mask(url)!r} cannot be used: apprise is not installed" for url in urls]
    errors: list[str] = []
    services = apprise.NotificationManager()
    for url in urls:
        match = _SCHEME_RE.match(url)
        if match is None:
            errors.append(f"{_fallback_mask(url)!r} is not a URL (expected scheme://...)")
            continue
        scheme = match.group(1).lower()
        if scheme not in services:
            errors.append(f"{_fallback_mask(url)!r}: {scheme}:// is not an Apprise service")
            continue
        if apprise.Apprise.instantiate(url) is None:
            errors.append(
                f"{_fallback_mask(url)!r} is not a valid {scheme}:// URL "
                "(see Apprise's documentation for this service)"
            )
    return errors


# --- What the reports say -----------------------------------------------------------------------


def _aware(moment: datetime) -> datetime:
    """`moment` as an aware datetime; a naive one is taken as UTC (how the database keeps times)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _local_start(outcome: Outcome) -> datetime:
    start = _aware(outcome.desired_start)
    try:
        return start.astimezone(ZoneInfo(outcome.timezone))
    except (ZoneInfoNotFoundError, ValueError):
        return start


def _when(outcome: Outcome) -> str:
    """`Wed 2026-12-02 17:00`: the desired start, wall clock in the entry's zone."""
    local = _local_start(outcome)
    return f"{_WEEKDAYS[local.weekday()]} {local:%Y-%m-%d %H:%M}"


def _utc(moment: datetime) -> str:
    return f"{_aware(moment).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


def _court_phrase(court: str | None) -> str:
    if court is None or not court.strip():
        return "any court"
    return f"courts {court}" if "," in court else f"court {court}"


def _clean(text: str | None) -> str | None:
    """A reason made fit for one line: bearer tokens masked, whitespace folded, length capped."""
    if text is None:
        return None
    text = " ".join(_BEARER_RE.sub(r"\1****", text).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def subject_for(outcome: Outcome) -> str:
    """The email subject (and channel title) for one outcome.

    Returns e.g. `Booked: wed-evening court 3 Wed 2026-12-02 17:00 (Europe/London)`; a failed
    outcome starts with `Booking failed:`, an expired one with `Booking missed:`.
    """
    prefix = {BOOKED: "Booked", FAILED: "Booking failed", EXPIRED: "Booking missed"}.get(
        outcome.status, f"Booking {outcome.status}"
    )
    # A header line: a line break in a value would make the email library refuse the message.
    return escape_controls(
        f"{prefix}: {outcome.schedule_id} {_court_phrase(outcome.court)} "
        f"{_when(outcome)} ({outcome.timezone})"
    )


def _missed_subject(outcomes: Sequence[Outcome]) -> str:
    if len(outcomes) == 1:
        return subject_for(outcomes[0])
    ids = list(dict.fromkeys(o.schedule_id for o in outcomes))
    shown = ", ".join(ids[:_MISSED_SUBJECT_IDS]) + (
        ", ..." if len(ids) > _MISSED_SUBJECT_IDS else ""
    )
    return f"Booking missed: {len(outcomes)} bookings ({shown})"


def _facts(outcome: Outcome) -> list[str]:
    reason = _clean(outcome.reason)
    answer_label = "Club's answer" if outcome.status == BOOKED else "Reason"
    rows = [
        ("Schedule", outcome.schedule_id),
        ("Instance", outcome.key),
        ("Court", outcome.court or "any"),
        ("Start", f"{_when(outcome)} ({outcome.timezone}), {outcome.duration_minutes} minutes"),
        ("Window opened", _utc(outcome.trigger_time)),
        ("Timing", _sentence(outcome.timing) if outcome.timing else "-"),
        ("Attempts", str(outcome.attempts)),
        (answer_label, reason or "-"),
        ("Booking ref", outcome.booking_ref or "-"),
    ]
    return [f"{label + ':':<15}{value}" for label, value in rows]


def _sentence(text: str) -> str:
    """``text`` as a sentence of its own: capitalised, with a full stop."""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


#: How bot.py's reasons say the club refused a token or a flow's credentials (401, 403).
_REFUSED_RE = re.compile(r"rejected (?:token|the credentials)|credentials were rejected")


def refused_credentials(reason: str | None) -> bool:
    """Whether a failure's reason is the club refusing the token or credentials: a retry
    helps only once they are fixed."""
    return reason is not None and _REFUSED_RE.search(reason) is not None


def _advice(outcome: Outcome, now: datetime, count: int = 1) -> list[str]:
    if outcome.status == BOOKED:
        return ["A calendar entry is attached (booking.ics)."]
    if outcome.status == FAILED and outcome.club_took:
        return [
            "What to do: the club took this booking, but a step after it did not complete.",
            "Check the booking with the club (confirm or pay there if it asks). courtbot does",
            "not book it again, and `retry` leaves it alone: it would book a second time.",
        ]
    if outcome.status == FAILED and not outcome.retry_helps:
        return [
            "What to do: every court tried was taken, so a retry would be taken too. Book",
            "another court with the club, and give the entry a list of courts to try in order",
            '("court_id": ["3", "4"]) so that courtbot goes on to the next one.',
        ]
    if outcome.status == FAILED and refused_credentials(outcome.reason):
        ahead = _aware(outcome.desired_start) > _aware(now)
        return [
            "What to do: the club refused the credentials, so a retry as things are would be",
            "refused too. Fix the token first: put a valid one in tokens.json (python main.py",
            "check shows whether it loads)"
            + (", then let courtbot try again:" if ahead else "; this start has passed."),
            *(["", f"    python main.py retry {outcome.key}"] if ahead else []),
        ]
    if outcome.status == FAILED and _aware(outcome.desired_start) > _aware(now):
        return [
            "What to do: the start is still ahead. Book by hand with the club, or let courtbot",
            "try again (at once if the booking window is open):",
            "",
            f"    python main.py retry {outcome.key}",
        ]
    if outcome.status == FAILED:
        return ["What to do: the start has passed; this booking can no longer be made."]
    them = "it" if count == 1 else "they"
    return [
        f"What to do: the start has passed, so {them} can no longer be booked. Keep courtbot",
        "running so it is there when the next window opens (python main.py status shows",
        "what is pending).",
    ]


def _headline(outcome: Outcome) -> str:
    where = f"{_court_phrase(outcome.court)} on {_when(outcome)} ({outcome.timezone})"
    if outcome.status == BOOKED:
        return f"Booked for {outcome.schedule_id}: {where}."
    if outcome.status == FAILED:
        return f"Booking failed for {outcome.schedule_id}: {where}."
    if outcome.status == EXPIRED:
        return (
            f"Booking missed for {outcome.schedule_id}: {where}.\n"
            "courtbot was not running when its booking window opened."
        )
    return f"Booking {outcome.status} for {outcome.schedule_id}: {where}."


def _email_body(outcomes: Sequence[Outcome], now: datetime) -> str:
    if len(outcomes) == 1:
        outcome = outcomes[0]
        lines = [_headline(outcome), "", *_facts(outcome), "", *_advice(outcome, now)]
    else:
        lines = [
            f"{len(outcomes)} bookings were missed: courtbot was not running when their "
            "booking windows opened.",
        ]
        for outcome in outcomes:
            lines += ["", *_facts(outcome)]
        lines += ["", *_advice(outcomes[0], now, len(outcomes))]
    return "\n".join(lines) + "\n"


def _channel_line(outcome: Outcome) -> str:
    """One outcome in one line (a batch of missed bookings has a line each)."""
    line = (
        f"{outcome.schedule_id}: {_court_phrase(outcome.court)}, {_when(outcome)} "
        f"({outcome.timezone}). Instance {outcome.key}."
    )
    reason = _clean(outcome.reason)
    if outcome.status == BOOKED:
        return line + (f" Ref {outcome.booking_ref}." if outcome.booking_ref else "")
    return line + (f" Reason: {reason}" if reason else "")


def _channel_body(outcome: Outcome, now: datetime) -> str:
    """A channel's message for one outcome: the email's headline, its timing, the instance and
    its attempts, the reason, and what to do, each on a line of its own as in the email (CONTRACT
    section 8: the channel messages say what the log line says)."""
    lines = [_headline(outcome)]
    if outcome.timing:
        lines.append(_sentence(outcome.timing))
    lines.append(f"Instance {outcome.key}, attempts {outcome.attempts}.")
    reason = _clean(outcome.reason)
    if outcome.status == BOOKED:
        if outcome.booking_ref:
            lines.append(f"Ref {outcome.booking_ref}.")
        return "\n".join(lines)
    if reason:
        lines.append(f"Reason: {reason}")
    if outcome.status == FAILED and outcome.club_took:
        lines.append("The club took the booking: check it with the club (not booked again).")
    elif outcome.status == FAILED and not outcome.retry_helps:
        lines.append("Every court tried was taken: book another, or list more courts.")
    elif outcome.status == FAILED and refused_credentials(outcome.reason):
        lines.append("Fix the token in tokens.json first, then retry.")
        if _aware(outcome.desired_start) > _aware(now):
            lines.append(f"Retry: python main.py retry {outcome.key}")
    elif outcome.status == FAILED and _aware(outcome.desired_start) > _aware(now):
        lines.append(f"Retry: python main.py retry {outcome.key}")
    return "\n".join(lines)


def _log_outcome(outcome: Outcome) -> None:
    level = logging.INFO if outcome.status == BOOKED else logging.WARNING
    tail = f" ({outcome.timing})" if outcome.timing else ""
    if outcome.booking_ref:
        tail += f" ref={outcome.booking_ref}"
    reason = _clean(outcome.reason)
    if reason:
        tail += f" reason={reason}"
    logger.log(
        level,
        "%s %s court=%s at=%s %s attempts=%d%s",
        outcome.status,
        outcome.key,
        outcome.court or "any",
        _when(outcome),
        outcome.timezone,
        outcome.attempts,
        tail,
    )


# --- Calendar entry -----------------------------------------------------------------------------


def _ics_text(value: str) -> str:
    """RFC 5545 TEXT escaping: a line break (CRLF, LF or a bare CR) becomes ``\\n``; other
    control characters, which TEXT may not hold, are dropped."""
    escaped = (
        value.replace("\\", "\\\\")
        .replace(";", "\\;")
        .replace(",", "\\,")
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
        .replace("\r", "\\n")
    )
    return _CONTROLS_RE.sub("", escaped)


def _ics_stamp(moment: datetime) -> str:
    return f"{_aware(moment).astimezone(UTC):%Y%m%dT%H%M%SZ}"


def _ics_fold(line: str) -> str:
    """Fold a content line at 75 octets (RFC 5545 3.1), never inside a UTF-8 character."""
    pieces: list[str] = []
    current, size = "", 0
    for char in line:
        width = len(char.encode())
        if size + width > 75:
            pieces.append(current)
            current, size = " ", 1
        current += char
        size += width
    pieces.append(current)
    return "\r\n".join(pieces)


#: The calendar entry's reminder, this long before the start.
REMINDER = timedelta(hours=1)


def calendar_entry(outcome: Outcome, now: datetime, location: str | None = None) -> bytes:
    """An iCalendar file (METHOD:PUBLISH, one VEVENT, UTC times, CRLF lines) for a booking, with
    a reminder (a display VALARM ``REMINDER`` before the start) and the club as its LOCATION
    (``outcome.location``, else ``location``; none when neither is known).

    Returns the file's bytes, UTF-8; its UID is the instance key, so a re-sent entry updates.
    """
    start = _aware(outcome.desired_start).astimezone(UTC)
    end = start + timedelta(minutes=outcome.duration_minutes)
    description = (
        f"Booking reference: {outcome.booking_ref or '-'}\n"
        f"Schedule: {outcome.schedule_id}\nInstance: {outcome.key}\n"
        f"Booked by courtbot after {outcome.attempts} attempt(s)."
    )
    # The entry's own name says what is played (the user chose it); the club file's name, when
    # there is one, says where.
    summary = f"{outcome.schedule_id}: {_court_phrase(outcome.court)}" + (
        f" ({outcome.location})" if outcome.location else ""
    )
    where = outcome.location or location
    court = _court_phrase(outcome.court)
    place = court[:1].upper() + court[1:] + (f", {where}" if where else "")
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//courtbot//notify//EN",
        "CALSCALE:GREGORIAN",
        "METHOD:PUBLISH",
        "BEGIN:VEVENT",
        f"UID:{_ics_text(outcome.key)}",
        f"DTSTAMP:{_ics_stamp(now)}",
        f"DTSTART:{_ics_stamp(start)}",
        f"DTEND:{_ics_stamp(end)}",
        f"SUMMARY:{_ics_text(summary)}",
        f"LOCATION:{_ics_text(place)}",
        f"DESCRIPTION:{_ics_text(description)}",
        "STATUS:CONFIRMED",
        "BEGIN:VALARM",
        "ACTION:DISPLAY",
        f"DESCRIPTION:{_ics_text(summary)}",
        f"TRIGGER:-PT{int(REMINDER.total_seconds() // 60)}M",
        "END:VALARM",
        "END:VEVENT",
        "END:VCALENDAR",
    ]
    return "".join(_ics_fold(line) + "\r\n" for line in lines).encode()


# --- Delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Report:
    """One email and one message per channel, ready for the worker."""

    label: str  # instance key(s), for log lines
    subject: str
    body: str
    ics: bytes | None
    channel_body: str
    notify_type: str  # Apprise's NotifyType value


@dataclass(frozen=True)
class _Channel:
    name: str  # the service's name, e.g. "Telegram"
    masked: str
    sender: Any  # an apprise.Apprise holding this one service


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _is_transient(exc: BaseException) -> bool:
    """True for an SMTP failure that may succeed later: refused, timeout, dropped, 4xx."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _message in exc.recipients.values()]
        return bool(codes) and all(400 <= code < 500 for code in codes)
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, smtplib.SMTPException | ssl.SSLError | ssl.CertificateError):
        # Not supported (STARTTLS, AUTH), no usable auth method, certificate rejected.
        return False
    return isinstance(exc, OSError)


def _decode(reply: bytes | str) -> str:
    return reply.decode(errors="replace") if isinstance(reply, bytes) else reply


class Notifier:
    """Reports final outcomes: a log line at once, then email and channels from one worker thread.

    Create it, `start()` it, call `notify` / `notify_missed` from anywhere (they never raise and
    never wait on the network), and `close()` it on shutdown.
    """

    def __init__(
        self,
        settings: NotifySettings,
        *,
        retry_wait: float = _DEFAULT_RETRY_WAIT,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], datetime] = _utcnow,
        location: str | None = None,
    ) -> None:
        """`retry_wait`: seconds before the 2nd email try (the 3rd waits twice as long);
        `sleep` and `clock` are for tests; `location`: the club's name or host, for calendar
        entries of outcomes that name none."""
        self._settings = settings
        self._location = location
        self._retry_wait = retry_wait
        self._sleep = sleep
        self._clock = clock
        self._queue: queue.Queue[_Report | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline: float | None = None
        self._channels: list[_Channel] = []
        #: NOTIFY_URLS channels that could not be set up: masked URL, why.
        self._skipped: list[tuple[str, str | None]] = []
        #: What the channels' URLs hide when masked: scrubbed from Apprise's words in our lines.
        self._url_secrets: set[str] = set()

    @property
    def _has_targets(self) -> bool:
        return self._settings.email_enabled or bool(self._settings.urls)

    def start(self) -> None:
        """Start the worker thread (once; later calls do nothing)."""
        settings = self._settings
        with self._lock:
            if self._thread is not None or self._closed:
                return
            if settings.recipients and not settings.smtp_host:
                logger.warning("NOTIFY_EMAIL is set but SMTP_HOST is not: no email will be sent")
            elif settings.smtp_host and not settings.recipients:
                logger.info("SMTP_HOST is set but NOTIFY_EMAIL is not: no email will be sent")
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    def notify(self, outcome: Outcome) -> None:
        """Log `outcome` now and queue its email and channel messages; returns at once.

        Never raises: a failure to report is logged, the booking's outcome stands.
        """
        try:
            _log_outcome(outcome)
            if self._has_targets:
                now = self._clock()
                self._enqueue(
                    _Report(
                        label=outcome.key,
                        subject=subject_for(outcome),
                        body=_email_body([outcome], now),
                        ics=(
                            calendar_entry(outcome, now, self._location)
                            if outcome.status == BOOKED
                            else None
                        ),
                        channel_body=_channel_body(outcome, now),
                        notify_type=_notify_type(outcome.status),
                    )
                )
        except Exception:
            logger.exception("could not report the outcome of %s", getattr(outcome, "key", "?"))

    def notify_missed(self, outcomes: Sequence[Outcome]) -> None:
        """Report instances found expired at start-up: each logged, one email and one channel
        message covering all of them. Returns at once; never raises."""
        try:
            batch = list(outcomes)
            for outcome in batch:
                _log_outcome(outcome)
            if batch and self._has_targets:
                now = self._clock()
                self._enqueue(
                    _Report(
                        label=", ".join(o.key for o in batch),
                        subject=_missed_subject(batch),
                        body=_email_body(batch, now),
                        ics=None,
                        channel_body="\n".join(_channel_line(o) for o in batch),
                        notify_type=_notify_type(EXPIRED),
                    )
                )
        except Exception:
            logger.exception("could not report %d missed booking(s)", len(outcomes))

    def notify_warning(self, label: str, subject: str, body: str) -> None:
        """A warning worth an email and a channel message (not an outcome): logged now, sent
        from the worker. ``label`` names it in log lines. Returns at once; never raises."""
        try:
            logger.warning("%s: %s", label, subject)
            if self._has_targets:
                self._enqueue(
                    _Report(
                        label=label,
                        subject=subject,
                        body=body.rstrip("\n") + "\n",
                        ics=None,
                        channel_body=body.strip(),
                        notify_type="warning",
                    )
                )
        except Exception:
            logger.exception("could not report the warning %s", label)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued within `timeout` seconds, then stop the worker.

        What is still undelivered then is logged and dropped (the thread is a daemon).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._deadline = time.monotonic() + timeout
            thread = self._thread
        if thread is None:
            if not self._queue.empty():
                logger.warning(
                    "notifier closed before it was started: %d report(s) not sent",
                    self._queue.qsize(),
                )
            return
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "notifications still undelivered after %.1fs at shutdown: given up (%d queued)",
                timeout,
                max(self._queue.qsize() - 1, 0),
            )

    # -- worker side --

    def _enqueue(self, report: _Report) -> None:
        with self._lock:
            if self._closed:
                logger.warning("notifier closed: no email or channel message for %s", report.label)
                return
            self._queue.put(report)

    def _run(self) -> None:
        try:
            self._load_channels()
        except Exception:
            logger.exception("could not set up the NOTIFY_URLS channels; they are off")
        while True:
            report = self._queue.get()
            if report is None:
                return
            try:
                self._send_channels(report)
                if self._settings.email_enabled:
                    self._send_email(report)
            except Exception:
                logger.exception("could not deliver the report for %s", report.label)

    def _load_channels(self) -> None:
        urls = self._settings.urls
        if not urls:
            return
        try:
            apprise = _apprise()
        except ImportError:
            logger.warning("NOTIFY_URLS is set but apprise is not installed: channels are off")
            self._skipped = [(_fallback_mask(u), "apprise is not installed") for u in urls]
            return
        # One log line per delivery is ours (masked); Apprise's words come in it, scrubbed.
        logging.getLogger("apprise").setLevel(logging.WARNING)
        for url in urls:
            self._url_secrets |= url_secrets(url)
            plugin = apprise.Apprise.instantiate(url)
            if plugin is None:
                logger.warning(
                    "NOTIFY_URLS: %s is not a valid Apprise URL; skipped", _fallback_mask(url)
                )
                self._skipped.append((_fallback_mask(url), "not a valid Apprise URL: see check"))
                continue
            # Bound each request; apprise's call timeout below bounds the whole send.
            plugin.socket_connect_timeout = min(plugin.socket_connect_timeout, self._timeout)
            plugin.socket_read_timeout = min(plugin.socket_read_timeout, self._timeout)
            sender = apprise.Apprise()
            sender.add(plugin)
            self._channels.append(_Channel(str(plugin.service_name), _private_url(plugin), sender))

    def _scrub_url_secrets(self, text: str) -> str:
        for secret in sorted(self._url_secrets, key=len, reverse=True):
            text = text.replace(secret, "****")
        return text

    @property
    def _timeout(self) -> float:
        return self._settings.timeout

    def _send_channels(self, report: _Report) -> None:
        for channel in self._channels:
            self._send_channel(channel, report)

    def _send_channel(self, channel: _Channel, report: _Report) -> str | None:
        """Send one channel its message and log how it went. None when it was sent, else why
        not (the URL's secrets masked)."""
        try:
            result = channel.sender.notify(
                body=report.channel_body,
                title=report.subject,
                notify_type=report.notify_type,
                body_format="text",
                timeout=self._timeout,
            )
        except Exception as exc:  # noqa: BLE001 -- third-party plugin code; its message may hold a URL
            logger.warning(
                "channel %s %s: not sent for %s: %s",
                channel.name,
                channel.masked,
                report.label,
                type(exc).__name__,
            )
            return type(exc).__name__
        if result:
            logger.info("channel %s %s: sent for %s", channel.name, channel.masked, report.label)
            return None
        detail = [
            self._scrub_url_secrets(entry.message)
            for entry in result.logs()
            if entry.level != "DEBUG"
        ]
        why = result.status.name.lower() + (f": {detail[-1]}" if detail else "")
        logger.warning(
            "channel %s %s: not sent for %s (%s)%s",
            channel.name,
            channel.masked,
            report.label,
            result.status.name.lower(),
            f": {detail[-1]}" if detail else "",
        )
        return why

    def _send_email(self, report: _Report) -> bool:
        """Send the report's email, retrying transient errors. True when the server took it."""
        message = self._build_email(report)
        for attempt in range(1, EMAIL_TRIES + 1):
            try:
                refused = self._smtp_send(message)
            except (smtplib.SMTPException, OSError) as exc:
                reason = self._describe(exc)
                if not _is_transient(exc):
                    logger.warning("email for %s not sent (not retried): %s", report.label, reason)
                    return False
                if attempt == EMAIL_TRIES:
                    logger.warning(
                        "email for %s not sent after %d tries: %s",
                        report.label,
                        EMAIL_TRIES,
                        reason,
                    )
                    return False
                wait = self._retry_wait * 2 ** (attempt - 1)
                if self._deadline is not None and time.monotonic() + wait > self._deadline:
                    logger.warning(
                        "email for %s not sent (shutting down, not retried): %s",
                        report.label,
                        reason,
                    )
                    return False
                logger.info(
                    "email for %s: try %d of %d failed (%s); retrying in %.1fs",
                    report.label,
                    attempt,
                    EMAIL_TRIES,
                    reason,
                    wait,
                )
                self._sleep(wait)
                continue
            if refused:
                logger.warning(
                    "email for %s refused for %s",
                    report.label,
                    "; ".join(
                        f"{address} ({code} {_decode(reply)})"
                        for address, (code, reply) in refused.items()
                    ),
                )
            logger.info(
                "email for %s sent to %d recipient(s)",
                report.label,
                len(self._settings.recipients) - len(refused),
            )
            return True
        return False

    def _build_email(self, report: _Report) -> EmailMessage:
        settings = self._settings
        message = EmailMessage(policy=_EMAIL_POLICY)
        message["Subject"] = report.subject
        message["From"] = settings.smtp_from
        message["To"] = ", ".join(settings.recipients)
        message["Date"] = format_datetime(self._clock())
        # An explicit domain: make_msgid's default asks DNS for our FQDN, which can hang.
        domain = parseaddr(settings.smtp_from)[1].rpartition("@")[2] or "courtbot.invalid"
        message["Message-ID"] = make_msgid(domain=domain)
        message.set_content(report.body)
        if report.ics is not None:
            # Bytes, so the attachment keeps its CRLF line endings exactly.
            message.add_attachment(
                report.ics,
                maintype="text",
                subtype="calendar",
                filename="booking.ics",
                params={"method": "PUBLISH", "charset": "utf-8"},
            )
        return message

    def _smtp_send(self, message: EmailMessage) -> dict[str, tuple[int, bytes]]:
        """One delivery try. Returns the recipients the server refused (all others took it)."""
        settings = self._settings
        host = settings.smtp_host or ""
        # The default context verifies the certificate and the host name (and honours
        # SSL_CERT_FILE / SSL_CERT_DIR for a private CA).
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if settings.smtp_security == "ssl":
            client = smtplib.SMTP_SSL(
                host, settings.smtp_port, timeout=self._timeout, context=context
            )
        else:
            client = smtplib.SMTP(host, settings.smtp_port, timeout=self._timeout)
        with client:
            if settings.smtp_security == "starttls":
                client.starttls(context=context)
            if settings.smtp_user:
                client.login(settings.smtp_user, settings.smtp_password or "")
            return client.send_message(message)

    def _describe(self, exc: BaseException) -> str:
        """Why a try failed, for a log line: the server's reply or the network error."""
        settings = self._settings
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            text = "all recipients refused: " + "; ".join(
                f"{address} ({code} {_decode(reply)})"
                for address, (code, reply) in exc.recipients.items()
            )
        elif isinstance(exc, smtplib.SMTPAuthenticationError):
            reply = _decode(exc.smtp_error)
            text = f"login as {settings.smtp_user!r} refused: {exc.smtp_code} {reply}"
        elif isinstance(exc, smtplib.SMTPResponseException):
            text = f"{exc.smtp_code} {_decode(exc.smtp_error)}"
        elif isinstance(exc, ssl.SSLCertVerificationError):
            text = f"certificate not trusted: {exc.verify_message}"
        elif isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            # smtplib turns a read timeout into SMTPServerDisconnected; say what happened.
            text = f"no answer within {self._timeout:g}s"
        elif isinstance(exc, ConnectionRefusedError):
            text = "connection refused"
        else:
            text = f"{type(exc).__name__}: {exc}"
        text = f"{settings.smtp_security} {settings.smtp_host}:{settings.smtp_port}: {text}"
        if settings.smtp_password:
            text = text.replace(settings.smtp_password, "****")
        return text


def _notify_type(status: str) -> str:
    return {BOOKED: "success", FAILED: "failure"}.get(status, "warning")


# --- notify-test --------------------------------------------------------------------------------


def send_test(notifier: Notifier) -> list[tuple[str, str | None]]:
    """Send one test message (subject ``Test:``) through every configured channel now, in
    this thread, each tried once: email (when on), then each NOTIFY_URLS channel. Returns,
    per channel, its name (secrets masked) and None when it was sent, else why not; an
    empty list when none is configured (``notify-test``)."""
    settings = notifier._settings
    now = notifier._clock()
    body = (
        f"This is a test message from courtbot on {_hostname()} (python main.py "
        f"notify-test), sent {_utc(now)}.\nIt arrived: booking outcomes will arrive here "
        "too.\n"
    )
    report = _Report(
        label="notify-test",
        subject=f"Test: courtbot notifications from {_hostname()}",
        body=body,
        ics=None,
        channel_body=body.strip(),
        notify_type="info",
    )
    results: list[tuple[str, str | None]] = []
    if settings.email_enabled:
        name = (
            f"email to {', '.join(settings.recipients)} via "
            f"{settings.smtp_host}:{settings.smtp_port}"
        )
        results.append((name, _try_email(notifier, report)))
    notifier._load_channels()
    results.extend(notifier._skipped)
    for channel in notifier._channels:
        results.append(
            (f"{channel.name} {channel.masked}", notifier._send_channel(channel, report))
        )
    return results


def _try_email(notifier: Notifier, report: _Report) -> str | None:
    """One try at sending the report's email: None when the server took it for every
    recipient, else why not."""
    try:
        refused = notifier._smtp_send(notifier._build_email(report))
    except (smtplib.SMTPException, OSError) as exc:
        return notifier._describe(exc)
    if refused:
        return "refused for " + "; ".join(
            f"{address} ({code} {_decode(reply)})" for address, (code, reply) in refused.items()
        )
    return None
