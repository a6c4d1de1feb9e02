"""Settings and files: the environment, and ``schedules.json``/``tokens.json`` as validated entries.

``read_config`` turns ``schedules.json`` and ``tokens.json`` into frozen, typed entries and a list
of errors (file, entry, key, value, what was expected). It touches nothing and knows no tables:
``instances.reconcile`` applies the result to the database. A file that is unreadable as a whole
is rejected whole; an invalid entry is rejected alone. Each key of an entry has its own checker
(``_ENTRY_CHECKERS``); the request template is parsed by ``template``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from cryptography.fernet import MultiFernet

import utils
from template import Flow, Slot, TemplateError, default_flow, parse_flow, stale_warning

logger = logging.getLogger(__name__)

SCHEDULES_FILE = "schedules.json"
TOKENS_FILE = "tokens.json"
CLUBS_DIR = "clubs"
#: The ready flows of the repository (data/clubs/); READY_CLUBS_DIR says where they are when
#: the code runs from elsewhere (the image: /app/clubs).
READY_CLUBS_DIR = Path(__file__).resolve().parent / "data" / "clubs"
#: The label a ready flow holds where each club has its own host (``yourclub.perfectgym.com``).
PLACEHOLDER = "yourclub"
_PLACEHOLDER_RE = re.compile(rf"\b{PLACEHOLDER}\b", re.IGNORECASE)
_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
#: The keys of a club file that uses a ready flow as it is (``{"use": "perfectgym", ...}``).
USE_KEYS = ("use", PLACEHOLDER, "about")
TOKEN_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
DEFAULT_WINDOW = "168h"
MAX_CONFIG_BYTES = 10 * 1024 * 1024
ENTRY_KEYS = (
    "id",
    "type",
    "desired_time",
    "rrule",
    "court_id",
    "token",
    "timezone",
    "duration_minutes",
    "enabled",
    "skip",
    "club",
    "window",
    "fallback_times",
    "watch",
    "players",
    "about",
)
ONE_OFF = "one-off"
RECURRING = "recurring"
OUT_OF_RANGE = "holds a date out of range (years 1 to 9999 in UTC and in the entry's zone)"


#: The largest value of a setting in seconds (EARLY_RETRY_MS: a thousand times that): a day.
SETTING_MAX_SECONDS = 86400.0
#: WATCH_INTERVAL_SECONDS: its default, and the least a watch waits between tries (CONTRACT 13).
DEFAULT_WATCH_INTERVAL = 300.0
MIN_WATCH_INTERVAL = 60.0
_LOCAL_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_WATCH_RE = re.compile(r"([0-9]{1,5})([hm])")
_FALLBACK_EXAMPLE = '["18:00", "16:30"]'
_PLAYERS_EXAMPLE = '["ana@example.com", "Ben"]'


class SettingsError(ValueError):
    """An environment variable that makes the daemon unable to start; names the variable."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The daemon's environment, validated (CONTRACT section 2)."""

    fernet_keys: str | None
    api_url: str | None
    data_dir: Path
    database_url: str
    timezone: str
    window: utils.Window
    retry_base: float
    early_retry_ms: float
    early_retry_seconds: float
    http_timeout: float
    reload_interval: float
    log_level: str
    log_file: Path | None
    template_path: Path | None
    env: Mapping[str, str] = field(repr=False, default_factory=dict)
    #: HEARTBEAT_URL: the dead-man's switch the active daemon pings (None: off).
    heartbeat_url: str | None = field(repr=False, default=None)
    #: WATCH_INTERVAL_SECONDS: how often a watched instance is tried again (CONTRACT 13).
    watch_interval: float = DEFAULT_WATCH_INTERVAL
    #: REHEARSE_HOURS: how long before each trigger a flow's preparation steps are rehearsed
    #: (CONTRACT section 12); 0: never.
    rehearse_hours: float = 24.0
    #: READY_CLUBS_DIR: the ready flows, used by name when DATA_DIR/clubs/ has no such file.
    ready_clubs_dir: Path = READY_CLUBS_DIR

    @property
    def schedules_path(self) -> Path:
        return self.data_dir / SCHEDULES_FILE

    @property
    def tokens_path(self) -> Path:
        return self.data_dir / TOKENS_FILE

    @property
    def clubs_dir(self) -> Path:
        return self.data_dir / CLUBS_DIR

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "bot.pid"

    @property
    def lock_path(self) -> Path:
        return self.data_dir / "bot.lock"

    @property
    def heartbeat_path(self) -> Path:
        return self.data_dir / "heartbeat"

    def fernet(self) -> MultiFernet:
        """The key ring; ``utils.KeyError_`` when FERNET_KEY is missing or malformed."""
        return utils.load_fernet(self.fernet_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and check the environment; SettingsError names the first bad variable."""
        data_dir = Path(env.get("DATA_DIR") or "data")
        database_url = env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'db.sqlite'}"
        zone = env.get("BOOKING_TIMEZONE") or "UTC"
        try:
            utils.get_zone(zone)
        except ValueError as exc:
            raise SettingsError(f"BOOKING_TIMEZONE: {exc}") from None
        try:
            window = utils.parse_window(env.get("BOOKING_WINDOW") or DEFAULT_WINDOW)
        except ValueError as exc:
            raise SettingsError(f"BOOKING_WINDOW: {exc}") from None
        log_file_value = env.get("LOG_FILE") or str(data_dir / "bot.log")
        template = env.get("BOOKING_REQUEST_TEMPLATE") or None
        template_path = None
        if template:
            template_path = Path(template)
            if not template_path.is_absolute():
                template_path = data_dir / template_path
        level_value = env.get("LOG_LEVEL") or "INFO"
        level = level_value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                f"LOG_LEVEL: {level_value!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
            )
        heartbeat_url = (env.get("HEARTBEAT_URL") or "").strip() or None
        if heartbeat_url is not None and not utils.is_http_url(heartbeat_url):
            raise SettingsError(
                f"HEARTBEAT_URL: {utils.mask_url_secrets(heartbeat_url)!r} is not an http(s) "
                "URL (e.g. https://hc-ping.com/<uuid>)"
            )
        api_url = env.get("BOOKING_API_URL") or None
        return cls(
            fernet_keys=env.get("FERNET_KEY") or None,
            api_url=api_url,
            data_dir=data_dir,
            database_url=database_url,
            timezone=zone,
            window=window,
            retry_base=_number(env, "RETRY_BASE_SECONDS", 1.0, minimum=0.0),
            early_retry_ms=_number(env, "EARLY_RETRY_MS", 100.0, minimum=1.0, unit="milliseconds"),
            early_retry_seconds=_number(env, "EARLY_RETRY_SECONDS", 20.0, minimum=0.0),
            http_timeout=_number(env, "HTTP_TIMEOUT_SECONDS", 10.0, minimum=0.001),
            reload_interval=_number(env, "RELOAD_INTERVAL_SECONDS", 60.0, minimum=0.01),
            log_level=level,
            log_file=None if log_file_value == "-" else Path(log_file_value),
            template_path=template_path,
            env=dict(env),
            heartbeat_url=heartbeat_url,
            watch_interval=_number(
                env, "WATCH_INTERVAL_SECONDS", DEFAULT_WATCH_INTERVAL, minimum=MIN_WATCH_INTERVAL
            ),
            rehearse_hours=_hours(env, "REHEARSE_HOURS", 24.0),
            ready_clubs_dir=Path(env.get("READY_CLUBS_DIR") or READY_CLUBS_DIR),
        )


def check_api_url(url: str) -> None:
    """SettingsError unless BOOKING_API_URL is a URL the request of CONTRACT section 6 can be
    sent to: the same test a booking makes, made at start rather than at the trigger (by the
    commands that book or show the request; ``status`` and ``retry`` need no URL)."""
    try:
        default_flow(url)
    except TemplateError as exc:
        # default_flow names the setting and its key ("BOOKING_API_URL: url: ..."): one name.
        reason = str(exc).removeprefix("BOOKING_API_URL: url: ")
        raise SettingsError(
            f"BOOKING_API_URL: {reason}; set it to the club's booking endpoint "
            "(e.g. https://club.example/api/bookings)"
        ) from None


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, unit: str = "seconds"
) -> float:
    raw, value = _read_number(env, name, f"is not a number of {unit}")
    if value is None:
        return default
    if not (minimum <= value < float("inf")):
        raise SettingsError(f"{name}: {raw!r} must be a finite number >= {minimum:g}")
    # Beyond a day no wait or timeout makes sense, and past about 10^9 s the clocks, sockets
    # and timedeltas they feed overflow: at the trigger, where it is too late to say so.
    maximum = SETTING_MAX_SECONDS * (1000 if unit == "milliseconds" else 1)
    if value > maximum:
        raise SettingsError(
            f"{name}: {raw!r} is more than a day ({maximum:g} {unit}); expected at most that"
        )
    return value


def _read_number(env: Mapping[str, str], name: str, wrong: str) -> tuple[str, float | None]:
    """The variable's text and its number (None when unset or empty); SettingsError saying
    ``wrong`` when it is not a number."""
    raw = env.get(name) or ""
    if raw.strip() == "":
        return raw, None
    try:
        return raw, float(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} {wrong}") from None


def _hours(env: Mapping[str, str], name: str, default: float) -> float:
    """A number of hours from 0 to the longest window (utils.MAX_WINDOW_HOURS)."""
    raw, value = _read_number(env, name, "is not a number of hours (e.g. 24; 0: off)")
    if value is None:
        return default
    if not (0 <= value <= utils.MAX_WINDOW_HOURS):
        raise SettingsError(
            f"{name}: {raw!r} must be a number of hours from 0 (off) to "
            f"{utils.MAX_WINDOW_HOURS} (the longest window)"
        )
    return value


# --------------------------------------------------------------------------- entries


class Planned(NamedTuple):
    """One instance an entry asks for: its key, desired start and trigger (aware, UTC). A
    tuple: a load of 52,000 instances makes one for each, and a frozen dataclass costs three
    times as much to make."""

    key: str
    desired: datetime
    trigger: datetime


@dataclass(frozen=True)
class Entry:
    """A valid ``schedules.json`` entry."""

    id: str
    position: int
    type: str
    timezone: str
    courts: tuple[str | None, ...]
    token: str
    duration_minutes: int
    enabled: bool
    desired_wall: datetime | None  # one-off: naive wall clock in the zone
    desired_moment: datetime | None  # one-off: aware
    raw_rrule: str | None
    rule: utils.ParsedRule | None
    fingerprint: str  # changes whenever anything about the entry changes
    #: The club file its bookings use (``DATA_DIR/clubs/<club>.json``); None: the request of
    #: BOOKING_REQUEST_TEMPLATE, else of CONTRACT section 6.
    club: str | None
    #: The window that applies (CONTRACT section 3's precedence), and where it came from.
    window: utils.Window
    window_from: str
    #: Local dates on which a recurring entry makes no instance (the ``skip`` key).
    skip: frozenset[date] = frozenset()
    #: The recurring expansion made while validating, and the ``now`` it was made for: a load
    #: validates and plans with the same ``now``, so the rule is expanded once per load.
    expansion: tuple[datetime, tuple[tuple[datetime, datetime], ...]] | None = field(
        default=None, repr=False, compare=False
    )
    #: The starts of that expansion as the cache keeps them (Unix seconds, one small array an
    #: entry, the same one ``EntryCache`` holds), with their ``now``: what the load plans from.
    start_stamps: tuple[datetime, array[float]] | None = field(
        default=None, repr=False, compare=False
    )
    #: CONTRACT section 13: local times ``HH:MM`` tried in order on the instance's own date when
    #: every court of the desired time was taken; how long before the start a watch goes on
    #: (None: no watch); the players a flow names as ``{players}``.
    fallback_times: tuple[str, ...] = ()
    watch_minutes: int | None = None
    players: tuple[str, ...] = ()

    @property
    def zone(self) -> ZoneInfo:
        return utils.get_zone(self.timezone)

    @property
    def court_text(self) -> str | None:
        """The wanted court(s) as stored in ``schedules.court_id`` (None for any court)."""
        if self.courts == (None,):
            return None
        return utils.courts_text(list(self.courts))

    @property
    def label(self) -> str:
        return f"{self.id!r} (#{self.position})"

    def occurrences(
        self, now: datetime, limit: int = utils.INSTANCES_PER_RULE
    ) -> list[tuple[datetime, datetime]]:
        """(wall clock asked for, aware start) pairs: a one-off's one start (also when past),
        a recurring entry's next ``limit`` starts after ``now``."""
        if self.rule is None:
            assert self.desired_moment is not None and self.desired_wall is not None
            return [(self.desired_wall, self.desired_moment)]
        if self.expansion is not None and self.expansion[0] == now:
            return list(self.expansion[1][:limit])
        return utils.expand_rule_walls(self.rule, self.zone, now, limit, skip=self.skip)

    def starts(self, now: datetime, limit: int = utils.INSTANCES_PER_RULE) -> list[datetime]:
        """The aware starts of ``occurrences``."""
        if self.rule is not None and self.start_stamps is not None and self.start_stamps[0] == now:
            zone = self.zone
            return [datetime.fromtimestamp(t, zone) for t in self.start_stamps[1][:limit]]
        return [moment for _, moment in self.occurrences(now, limit)]

    def slot(self, start: datetime) -> Slot:
        """What a request for this entry's instance at ``start`` is rendered from."""
        return Slot(
            key=utils.instance_key(self.id, start),
            start=start,
            duration_minutes=self.duration_minutes,
            zone=self.zone,
            courts=self.courts,
            players=self.players,
        )

    def fallbacks(self, start: datetime) -> list[tuple[str, datetime, datetime]]:
        """The fallback times of the instance at ``start``: (``HH:MM``, start, trigger), both
        UTC, in list order, on the start's local date; a time equal to the desired one is left
        out. A time in a DST gap or overlap resolves as a desired time does (section 3)."""
        zone = self.zone
        day = utils.as_utc(start).astimezone(zone).date()
        found = []
        for text in self.fallback_times:
            hour, minute = (int(part) for part in text.split(":"))
            moment = utils.as_utc(utils.localize(datetime.combine(day, time(hour, minute)), zone))
            if moment != utils.as_utc(start):
                found.append((text, moment, utils.trigger_time(moment, zone, self.window)))
        return found

    def describe_wishes(self, start: datetime) -> list[str]:
        """What ``check`` says of the fallback times, watch and players (CONTRACT 13) of the
        instance at ``start``."""
        lines = []
        if self.fallback_times:
            kept = {text: trigger for text, _, trigger in self.fallbacks(start)}
            shown = [
                f"{text} (trigger {utils.format_utc(kept[text])})"
                if text in kept
                else f"{text} (skipped: the desired time)"
                for text in self.fallback_times
            ]
            lines.append("fallback times (next instance): " + ", ".join(shown))
        end = self.watch_end(start)
        if end is not None:
            lines.append(
                f"watch: until {utils.format_local(end, self.zone)} (next instance), tried again "
                "every WATCH_INTERVAL_SECONDS"
            )
        if self.players:
            lines.append("players: " + ", ".join(self.players))
        return lines

    def watch_end(self, start: datetime) -> datetime | None:
        """When the watch of the instance at ``start`` ends (UTC); None without a watch."""
        if self.watch_minutes is None:
            return None
        return utils.as_utc(start) - timedelta(minutes=self.watch_minutes)

    def plan(self, now: datetime, window: utils.Window | None = None) -> list[Planned]:
        """The instances this entry wants now: future starts only, with their triggers under
        ``window`` (default: the entry's own, after precedence)."""
        zone = self.zone
        window = window if window is not None else self.window
        stamps = self.start_stamps
        if self.rule is not None and stamps is not None and stamps[0] == now:
            # The cached starts (all after now), read as UTC instants: a load of 52,000
            # instances needs no trip through the entry's zone for any of them.
            limit = utils.INSTANCES_PER_RULE
            desired = [datetime.fromtimestamp(t, UTC) for t in stamps[1][:limit]]
        else:
            desired = [utils.as_utc(start) for start in self.starts(now) if start > now]
        if window.unit == "h":
            back = timedelta(hours=window.amount)
            triggers = [start - back for start in desired]
        else:
            triggers = [utils.trigger_time(start, zone, window) for start in desired]
        key = utils.instance_key
        return [
            Planned(key=key(self.id, start), desired=start, trigger=trigger)
            for start, trigger in zip(desired, triggers, strict=True)
        ]


@dataclass
class SchedulesResult:
    """What ``schedules.json`` said: valid entries, errors and warnings, rejected ids.

    ``file_error`` means the whole file was rejected: nothing may change. ``unknown_rejects``
    counts rejected entries whose id could not be told: removals are then put off, because
    their instances might be among them.
    """

    entries: list[Entry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rejected_ids: set[str] = field(default_factory=set)
    unknown_rejects: int = 0
    file_error: str | None = None
    missing: bool = False
    #: The club files the entries name, by club name: those valid, and why the others are not.
    clubs: dict[str, FlowFile] = field(default_factory=dict)
    club_errors: dict[str, str] = field(default_factory=dict)
    #: Entries rejected (among other reasons) because nothing gives them a request: they name
    #: no club, and there is no BOOKING_API_URL nor a template with a url. ``run`` does not
    #: start with them.
    without_request: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TokenValue:
    """A token of tokens.json: its value encrypted under the first key, or why it is unusable.

    ``encrypted`` is a string for a string token, and for an object token (CONTRACT section
    12) an object of its fields, each encrypted on its own.
    """

    name: str
    encrypted: str | dict[str, str] | None
    error: str | None
    rewrite: bool  # the file must be rewritten for it (plaintext, or an old key)
    plaintext: bool = False  # the file holds (part of) it in clear

    @property
    def fields(self) -> tuple[str, ...] | None:
        """The field names of an object token (None for a string token)."""
        return tuple(self.encrypted) if isinstance(self.encrypted, dict) else None


@dataclass
class TokensResult:
    """What ``tokens.json`` said. ``file_error``: rejected whole, the database keeps its tokens."""

    tokens: dict[str, TokenValue] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    file_error: str | None = None
    missing: bool = False
    raw: bytes | None = None
    written: bytes | None = None  # what the daemon wrote back (tokens encrypted in place)
    #: A name given twice: the file is not rewritten (that would keep one value silently).
    repeated: bool = False

    def describe(self) -> list[str]:
        """For ``check``: each token of tokens.json by name, and how the file holds it (never a
        value); nothing when the file is missing or was rejected."""
        if self.file_error is not None or self.missing:
            return []
        lines = [f"{TOKENS_FILE}: {len(self.tokens)} token(s)"]
        for name, token in self.tokens.items():
            kind = f"object of {', '.join(token.fields)}, " if token.fields is not None else ""
            if token.error is not None:
                held = "unusable (see the error above)"
            elif token.plaintext:
                held = "plaintext (the daemon encrypts it in the file when it loads it)"
            elif token.rewrite:
                held = "encrypted under an older key (the daemon re-encrypts it under the first)"
            else:
                held = "encrypted"
            lines.append(f"  {name!r}: {kind}{held}")
        return lines


@dataclass
class Config:
    """The files, read and validated together: schedules, tokens, the request template and
    the club files the entries name."""

    schedules: SchedulesResult
    tokens: TokensResult
    digest: dict[str, str]  # by path, as read: see config_digest
    #: BOOKING_REQUEST_TEMPLATE in effect: as read, or the last good one when it is invalid.
    template: FlowFile | None = None
    template_error: str | None = None

    @property
    def clubs(self) -> dict[str, FlowFile]:
        """The valid club files the entries name, by club name."""
        return self.schedules.clubs

    @property
    def errors(self) -> list[str]:
        found = list(self.tokens.errors)
        if self.tokens.file_error:
            found.insert(0, self.tokens.file_error)
        if self.template_error:
            found.append(self.template_error)
        if self.schedules.file_error:
            found.append(self.schedules.file_error)
        return found + self.schedules.errors

    @property
    def warnings(self) -> list[str]:
        return self.tokens.warnings + self.schedules.warnings

    def provenance(self, now: datetime) -> tuple[list[str], list[str]]:
        """For ``check``: each club file the entries use (a club's file, the request template),
        where its calls were read and when it was last checked (CONTRACT section 12,
        Provenance); and a warning for each ``checked`` older than 180 days."""
        used: dict[str, Flow] = {}
        for entry in self.schedules.entries:
            source = self.clubs.get(entry.club) if entry.club is not None else self.template
            if source is not None:
                used.setdefault(source.label, source.flow)
        lines: list[str] = []
        warnings: list[str] = []
        for label, flow in used.items():
            checked = f"checked {flow.checked.isoformat()}" if flow.checked else "no checked date"
            lines += [f"\n{label}: {checked}, {len(flow.sources)} source(s)"]
            lines += [f"  source: {source}" for source in flow.sources]
            warning = stale_warning(flow, now)
            if warning is not None:
                warnings.append(warning)
        return lines, warnings


def _read_bytes(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    return data


def _read_config_file(path: Path, name: str) -> tuple[bytes | None, str | None]:
    """(content, None), (None, None) for no file, or (None, the error for the whole file) when
    it exists but cannot be read (a directory, no permission, an I/O error)."""
    try:
        return _read_bytes(path), None
    except OSError as exc:
        return None, (
            f"{name}: cannot be read ({exc.strerror or exc.__class__.__name__}); nothing loaded "
            "from it, the last good state stays"
        )


class _JSONObject(dict[str, Any]):
    """A JSON object as parsed, remembering the keys it gave more than once: JSON itself keeps
    the last value silently, and a key written twice is usually an edit gone wrong."""

    repeated: dict[str, int]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    obj.repeated = {}
    if len(obj) != len(pairs):
        counts: dict[str, int] = {}
        for key, _value in pairs:
            counts[key] = counts.get(key, 0) + 1
        obj.repeated = {key: n for key, n in counts.items() if n > 1}
    return obj


def repeated_keys(value: Any) -> dict[str, int]:
    """The keys a parsed JSON object gave more than once, with how many times ({} if none)."""
    return dict(getattr(value, "repeated", {}))


def _decode_json(data: bytes, name: str) -> tuple[Any, str | None]:
    if len(data) > MAX_CONFIG_BYTES:
        return None, (
            f"{name}: the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; "
            "nothing loaded from it, the last good state stays"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, (
            f"{name}: not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "nothing loaded from it, the last good state stays"
        )
    try:
        return json.loads(text, object_pairs_hook=_object_pairs), None
    except json.JSONDecodeError as exc:
        return None, (
            f"{name}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
            "nothing loaded from it, the last good state stays"
        )
    except ValueError:
        # Not a JSONDecodeError: Python refuses integers of more than 4300 digits.
        return None, (
            f"{name}: not valid JSON (a number in it has too many digits); "
            "nothing loaded from it, the last good state stays"
        )
    except RecursionError:
        return None, f"{name}: nested too deeply; nothing loaded from it, the last good state stays"


def content_digest(data: bytes | None) -> str:
    """What a config file's content is known by ("missing" for no file)."""
    return "missing" if data is None else hashlib.sha256(data).hexdigest()


def config_digest(settings: Settings) -> dict[str, str]:
    """Each config file's content digest, by path (to notice changes without reloading): the
    schedules, the tokens, the template and every club file (a club file that appears or
    goes away counts as a change too)."""
    paths = [settings.schedules_path, settings.tokens_path]
    if settings.template_path is not None:
        paths.append(settings.template_path)
    with contextlib.suppress(OSError):
        paths.extend(sorted(settings.clubs_dir.glob("*.json")))
    digest = {}
    for path in paths:
        try:
            digest[str(path)] = content_digest(_read_bytes(path))
        except OSError as exc:
            digest[str(path)] = f"unreadable: {exc.__class__.__name__}"
    return digest


def read_config(
    settings: Settings,
    fernet: MultiFernet,
    now: datetime,
    *,
    known_tokens: Iterable[str] = (),
    last_template: FlowFile | None = None,
    cache: EntryCache | None = None,
) -> Config:
    """Read and validate the files. ``known_tokens`` are the token names the database holds,
    used when tokens.json is rejected whole; ``last_template`` the request template in effect
    so far, which stays when the file has become invalid; ``cache`` (the daemon's, kept between
    loads) spares validating entries again that did not change. Reads files only; writes
    nothing."""
    digest = config_digest(settings)
    tokens = read_tokens(settings.tokens_path, fernet)
    names = set(known_tokens) if tokens.file_error is not None else set(tokens.tokens)
    template, template_error = last_template, None
    try:
        template = load_template(settings)
    except TemplateError as exc:
        template_error = str(exc)
    schedules = read_schedules(
        settings.schedules_path,
        default_zone=settings.timezone,
        token_names=names,
        now=now,
        sources=RequestSources.from_settings(settings, template),
        cache=cache,
    )
    tokens.warnings.extend(token_expiry_warnings(schedules.entries, tokens, fernet, now=now))
    if tokens.file_error is None:
        schedules.errors.extend(
            token_field_problems(schedules.entries, tokens, schedules.clubs, template)
        )
    return Config(
        schedules=schedules,
        tokens=tokens,
        digest=digest,
        template=template,
        template_error=template_error,
    )


def token_field_problems(
    entries: Iterable[Entry],
    tokens: TokensResult,
    clubs: Mapping[str, FlowFile],
    template: FlowFile | None,
) -> list[str]:
    """One error per entry whose token lacks a field its flow sends (``{secret.<field>}``, or
    ``{token}`` from an object token without a ``token`` field): its bookings would fail at
    their trigger, so ``check`` says it now. The entry still loads (it books once the token
    is completed, without a restart)."""
    problems: list[str] = []
    for entry in entries:
        token = tokens.tokens.get(entry.token)
        if token is None or token.error is not None:
            continue
        source = clubs.get(entry.club) if entry.club is not None else template
        if source is None:
            continue  # section 6's request: {token} alone, which every token gives
        flow = source.flow
        fields = set(token.fields) if token.fields is not None else {"token"}
        where = f"{_where(SCHEDULES_FILE, entry.id, entry.position)}: token"
        missing = sorted(flow.secret_fields - fields)
        if missing:
            wanted = ", ".join(sorted(flow.secret_fields))
            fix = (
                f"add it to the token's object in tokens.json (the flow uses {wanted})"
                if token.fields is not None
                else f"write the token in tokens.json as an object with the fields {wanted}"
            )
            problems.append(
                f"{where}: {entry.token!r} has no field {missing[0]!r}, which {source.label} "
                f"sends as {{secret.{missing[0]}}}: {fix}"
            )
        elif flow.uses_token and "token" not in fields:
            problems.append(
                f"{where}: {entry.token!r} has no 'token' field, which {source.label} sends as "
                "{token}: add it to the token's object in tokens.json"
            )
    return problems


def token_expiry_warnings(
    entries: Iterable[Entry],
    tokens: TokensResult,
    fernet: MultiFernet,
    *,
    now: datetime,
) -> list[str]:
    """One warning per token that is (or, for an object token, holds) a JWT expiring before the
    trigger of an instance of an entry that uses it (at its trigger the club would reject it).
    The token is decrypted only to read its expiry, and never appears in a warning."""
    expiries: dict[str, datetime] = {}
    for name, value in tokens.tokens.items():
        secrets = utils.decrypt_secrets(fernet, value.encrypted) if value.encrypted else None
        expires = utils.secrets_expiry(secrets) if secrets is not None else None
        if expires is not None:
            expiries[name] = expires
    if not expiries:
        return []  # no JWT: nothing to plan
    by_token: dict[str, list[tuple[datetime, str]]] = {}
    for entry in entries:
        if entry.enabled and entry.token in expiries:
            for planned in entry.plan(now):
                by_token.setdefault(entry.token, []).append((planned.trigger, planned.key))
    warnings = []
    for name in sorted(by_token):
        expires = expiries[name]
        affected = sorted(pair for pair in by_token[name] if pair[0] >= expires)
        if not affected:
            continue
        trigger, key = affected[0]
        state = "expired" if expires <= now else "expires"
        warnings.append(
            f"{TOKENS_FILE} token {name!r}: a JWT that {state} {utils.format_utc(expires)}, "
            f"before the trigger of {len(affected)} booking(s), the first {key} (window opens "
            f"{utils.format_utc(trigger)}): the club would reject it then; put a fresh token "
            "in tokens.json before that"
        )
    return warnings


def read_tokens(path: Path, fernet: MultiFernet) -> TokensResult:
    """Validate ``tokens.json`` (CONTRACT section 5) without writing anything."""
    name = path.name
    result = TokensResult()
    data, unreadable = _read_config_file(path, name)
    if unreadable is not None:
        result.file_error = unreadable
        return result
    if data is None:
        result.missing = True
        result.warnings.append(f"{name}: no such file ({path}); no tokens loaded")
        return result
    result.raw = data
    parsed, error = _decode_json(data, name)
    if error is not None:
        result.file_error = error
        return result
    if not isinstance(parsed, dict):
        result.file_error = (
            # The type only: the value may be a token.
            f'{name}: expected a JSON object {{"name": "token"}}, '
            f"got {_json_type(parsed).split(' (')[0]}; "
            "nothing loaded from it, the last good state stays"
        )
        return result
    repeated = repeated_keys(parsed)
    for token_name, value in parsed.items():
        where = f"{name} token {token_name!r}"
        if token_name in repeated:
            # Which of the values is meant cannot be told: none is used (the value stays out of
            # the message: it may be the token itself).
            reason = (
                f"{where}: {_times(repeated[token_name])} in the file; keep one (JSON would "
                "silently use the last); the file is not rewritten until then"
            )
            result.errors.append(reason)
            result.tokens[token_name] = TokenValue(token_name, None, reason, False)
            result.repeated = True
            continue
        if not token_name or len(token_name) > 128:
            result.errors.append(f"{where}: a token name must be 1 to 128 characters")
            continue
        if not _is_text(token_name):
            result.errors.append(f"{where}: a token name must be 1 to 128 characters of text")
            continue
        if utils.CONTROL_RE.search(token_name):
            result.errors.append(
                f"{where}: a token name must not hold control characters (line breaks, tabs, ...)"
            )
            continue
        token = (
            _object_token(token_name, value, where, fernet)
            if isinstance(value, dict)
            else _string_token(token_name, value, where, fernet)
        )
        if token.error is not None:
            result.errors.append(token.error)
        result.tokens[token_name] = token
    return result


def _got(value: Any) -> str:
    """The type of a value in a token's place, never the value (it may be the token)."""
    if isinstance(value, str):
        return "an empty string"
    return _json_type(value).split(" (")[0]


def _string_token(name: str, value: Any, where: str, fernet: MultiFernet) -> TokenValue:
    if not isinstance(value, str) or not value.strip():
        return TokenValue(
            name,
            None,
            f"{where}: expected the token as a non-empty string or an object of strings, got "
            f"{_got(value)}",
            False,
        )
    encrypted, error, state = _encrypt_value(value, where, fernet, header=True)
    rewrite = state in ("plaintext", "old key")
    return TokenValue(name, encrypted, error, rewrite, plaintext=state == "plaintext")


def _object_token(name: str, value: dict[str, Any], where: str, fernet: MultiFernet) -> TokenValue:
    """A token of several secrets (CONTRACT section 12): each string encrypted on its own."""
    if not value:
        return TokenValue(
            name,
            None,
            f'{where}: an object token needs at least one field, e.g. {{"email": "...", '
            '"password": "..."}',
            False,
        )
    fields: dict[str, str] = {}
    states: set[str] = set()
    for field_name, field_value in value.items():
        at = f"{where}: field {field_name!r}"
        if not TOKEN_FIELD_RE.fullmatch(field_name):
            return TokenValue(
                name,
                None,
                f"{at}: a field name must be 1 to 64 of A-Z a-z 0-9 _ and not start with a digit "
                "(it is used as {secret.<field>})",
                False,
            )
        if not isinstance(field_value, str) or not field_value.strip():
            return TokenValue(
                name, None, f"{at}: expected a non-empty string, got {_got(field_value)}", False
            )
        encrypted, error, state = _encrypt_value(field_value, at, fernet)
        if encrypted is None:
            return TokenValue(name, None, error, False)
        fields[field_name] = encrypted
        states.add(state)
    return TokenValue(name, fields, None, states != {"encrypted"}, plaintext="plaintext" in states)


def _encrypt_value(
    value: str, where: str, fernet: MultiFernet, *, header: bool = False
) -> tuple[str | None, str | None, str]:
    """One secret string of tokens.json: (its value encrypted under the first key, or None;
    the error; "encrypted" when the file already holds it so, "old key" when it needs
    re-encrypting under the first key, "plaintext" when the file holds it in clear)."""
    if not _is_text(value):
        return (
            None,
            f"{where}: the value is not valid text (it holds an unpaired surrogate such as "
            "\\ud800); put the token in as it is",
            "error",
        )
    value = value.strip()  # surrounding blanks are no part of a token
    plaintext = utils.decrypt_token(fernet, value)
    control = _control_problem(where, plaintext if plaintext is not None else value)
    if control is None and header:
        control = _header_problem(where, plaintext if plaintext is not None else value)
    if control is not None:
        # The token is named, never shown: the value is the secret.
        return None, control, "error"
    if plaintext is not None:
        if utils.encrypted_under_first_key(fernet, value):
            return value, None, "encrypted"
        # Key rotation: decrypts under an older key; re-encrypt under the first.
        return fernet.encrypt(plaintext.encode()).decode(), None, "old key"
    if utils.looks_like_fernet(value):
        return (
            None,
            f"{where}: the value is encrypted but no key in FERNET_KEY decrypts it "
            "(was it encrypted with another key?); re-encrypt it with "
            "`python main.py encrypt-token` or put the plaintext token in the file",
            "error",
        )
    return fernet.encrypt(value.encode()).decode(), None, "plaintext"


def _control_problem(where: str, token: str) -> str | None:
    """The error for a token holding a control character (no header can carry one), or None."""
    if not utils.CONTROL_RE.search(token):
        return None
    return (
        f"{where}: the token holds a control character (a line break, tab, ...), which cannot "
        "be sent in a header; put the token in as one line"
    )


def _header_problem(where: str, token: str) -> str | None:
    """The error for a token that no header can carry (a character beyond Latin-1, such as a
    zero-width space or a typographic quote a paste brought along), or None. Its place is
    ``Authorization: Bearer <token>`` (CONTRACT section 6): found here, not at the trigger."""
    try:
        token.encode("latin-1")
    except UnicodeEncodeError:
        return (
            f"{where}: the token holds a character no HTTP header can carry (beyond Latin-1, "
            "e.g. a zero-width space or a typographic quote a paste brought along); put the "
            "token in as the club gave it"
        )
    return None


def _is_text(value: str) -> bool:
    """False for strings JSON can spell but UTF-8 cannot hold (unpaired surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_schedules(
    path: Path,
    *,
    default_zone: str,
    token_names: set[str],
    now: datetime,
    sources: RequestSources | None = None,
    cache: EntryCache | None = None,
) -> SchedulesResult:
    """Validate ``schedules.json`` (CONTRACT sections 3 and 4) without writing anything.
    ``sources`` say where requests and windows come from (default: BOOKING_WINDOW's default,
    no template, club files in clubs/ beside ``path``); ``cache``: see EntryCache."""
    name = path.name
    result = SchedulesResult()
    sources = sources if sources is not None else RequestSources(clubs_dir=path.parent / CLUBS_DIR)
    if cache is not None:
        cache.begin()
    data, unreadable = _read_config_file(path, name)
    if unreadable is not None:
        result.file_error = unreadable
        return result
    if data is None:
        result.missing = True
        result.warnings.append(f"{name}: no such file ({path}); no schedules")
        return result
    parsed, error = _decode_json(data, name)
    if error is not None:
        result.file_error = error
        return result
    if not isinstance(parsed, list):
        result.file_error = (
            f"{name}: expected a JSON array of entries, got {_json_type(parsed)}; "
            "nothing loaded from it, the last good state stays"
        )
        return result

    seen: dict[str, int] = {}
    validate = _validate_entry if cache is None else cache.validate
    for index, raw in enumerate(parsed, start=1):
        entry, errors, warnings, entry_id = validate(
            raw,
            index,
            name,
            default_zone=default_zone,
            token_names=token_names,
            now=now,
            sources=sources,
        )
        if entry_id is not None and entry_id in seen and not errors:
            errors.append(_duplicate_id(name, raw, entry_id, index, seen[entry_id]))
            entry = None
        if entry_id is not None:
            seen.setdefault(entry_id, index)
        result.warnings.extend(warnings)
        if errors:
            result.errors.extend(errors)
            if entry_id is None:
                result.unknown_rejects += 1
            else:
                result.rejected_ids.add(entry_id)
        elif entry is not None:
            result.entries.append(entry)
        if errors and sources.clubs_only and isinstance(raw, dict) and "club" not in raw:
            result.without_request.append(_where(name, entry_id if "id" in raw else None, index))
    result.clubs, result.club_errors = dict(sources.clubs), dict(sources.club_errors)
    # An id both rejected (a duplicate) and valid stays valid for the earlier entry.
    result.rejected_ids -= {e.id for e in result.entries}
    if cache is None:
        result.warnings.extend(overlap_warnings(result.entries, now, name))
    else:
        result.warnings.extend(cache.overlap_warnings(result.entries, now, name))
        cache.keep_seen()
    return result


def _club_of(entry: Entry) -> str | None:
    """Which club an entry books at, for overlaps: its club file (None: BOOKING_REQUEST_TEMPLATE
    or BOOKING_API_URL, the same for every entry that names no club)."""
    return entry.club


#: Beyond this many pairs of entries that overlap, one warning sums them up instead of a line a
#: pair: 5,000 entries at one time are 12.5 million pairs, which no one reads (and finding every
#: pair is quadratic work at each load).
MAX_OVERLAP_PAIRS = 20
#: How many pairs that summary names.
OVERLAP_EXAMPLES = 3


class _TooMany(Exception):
    """More than ``MAX_OVERLAP_PAIRS`` pairs of entries overlap: the sweep stops."""


#: A slot as a sweep reads it: start, end (Unix seconds) and its owner (a position or a key).
_Slot = tuple[float, float, Any]


def _sweep(slots: list[_Slot], record: Callable[[_Slot, _Slot], None]) -> None:
    """Call ``record(earlier, later)`` for every two slots of different owners that overlap,
    ``slots`` being one club's, sorted by (start, owner). ``record`` may raise ``_TooMany``,
    which ends the sweep: the work is then linear in the slots, not in the pairs."""
    active: list[_Slot] = []
    for slot in slots:
        active = [other for other in active if other[1] > slot[0]]
        for other in active:
            if other[2] != slot[2]:
                record(other, slot)
        active.append(slot)


def _unix_starts(entry: Entry, now: datetime) -> list[float]:
    """The starts of ``entry`` still ahead, as Unix seconds (real minutes, not wall-clock ones)."""
    return [utils.as_utc(s).timestamp() for s in entry.starts(now) if s > now]


def overlap_warnings(entries: Iterable[Entry], now: datetime, file_name: str) -> list[str]:
    """One warning per pair of enabled entries that would book overlapping times (``[start,
    end)``) at the same club among their next instances: two courts paid for one game, unless
    that is meant. Names the first overlap and how many more there are. More than
    ``MAX_OVERLAP_PAIRS`` pairs are summed up in one warning (``overlap_summary``)."""
    enabled = [entry for entry in entries if entry.enabled]
    starts = {entry.position: _unix_starts(entry, now) for entry in enabled}
    by_club: dict[str | None, list[_Slot]] = {}
    for entry in enabled:
        length = 60.0 * entry.duration_minutes
        by_club.setdefault(_club_of(entry), []).extend(
            (start, start + length, entry.position) for start in starts[entry.position]
        )
    found: dict[tuple[int, int], list[_Overlap]] = {}

    def record(earlier: _Slot, later: _Slot) -> None:
        first, second = sorted((earlier, later), key=lambda slot: slot[2])
        pair = (first[2], second[2])
        if pair not in found and len(found) == MAX_OVERLAP_PAIRS:
            raise _TooMany
        found.setdefault(pair, []).append((first[0], first[1], second[0], second[1]))

    by_position = {entry.position: entry for entry in enabled}
    try:
        for slots in by_club.values():
            _sweep(sorted(slots, key=lambda slot: (slot[0], slot[2])), record)
    except _TooMany:
        return [overlap_summary([(e, starts[e.position]) for e in enabled], file_name)]
    return [
        _overlap_text(
            file_name,
            by_position[a],
            by_position[b],
            tuple(datetime.fromtimestamp(t, UTC) for t in overlaps[0]),  # type: ignore[arg-type]
            len(overlaps),
        )
        for (a, b), overlaps in sorted(found.items())
    ]


def overlap_summary(entries: list[tuple[Entry, Iterable[float]]], file_name: str) -> str:
    """The one warning for many overlapping entries (``entries``: the enabled ones with their
    starts ahead, Unix seconds): how many entries overlap another at the same club, and the
    first few of them by position with one partner each. Linear in the slots (each counted
    with two binary searches), however many pairs there are."""
    by_club: dict[str | None, list[tuple[float, float, Entry]]] = {}
    for entry, starts in entries:
        length = 60.0 * entry.duration_minutes
        by_club.setdefault(_club_of(entry), []).extend((s, s + length, entry) for s in starts)
    #: Per entry (by position) that overlaps another, its first such slot and its club's slots.
    overlapping: dict[int, tuple[_Slot, list[tuple[float, float, Entry]], list[float]]] = {}
    for slots in by_club.values():
        slots.sort(key=lambda slot: (slot[0], slot[2].position))
        club_starts = [slot[0] for slot in slots]
        club_ends = sorted(slot[1] for slot in slots)
        for slot in slots:
            start, end, entry = slot
            # Slots overlapping [start, end): those starting before its end, less those that
            # ended by its start; one of them is this slot itself.
            count = bisect.bisect_left(club_starts, end) - bisect.bisect_right(club_ends, start)
            if count > 1 and entry.position not in overlapping:
                overlapping[entry.position] = (slot, slots, club_starts)
    examples = []
    for position in sorted(overlapping)[:OVERLAP_EXAMPLES]:
        (start, end, one), slots, club_starts = overlapping[position]
        two_start, two_end, two = _partner(slots, club_starts, start, end, one)
        a0, a1, b0, b1 = (datetime.fromtimestamp(t, UTC) for t in (start, end, two_start, two_end))
        examples.append(
            f"{one.label} and {two.label} ({_span(a0, a1, one.zone)} and {_span(b0, b1, two.zone)})"
        )
    shown = "; ".join(examples)
    return (
        f"{file_name}: {len(overlapping)} entries would book overlapping times with another "
        f"entry at the same club (more than {MAX_OVERLAP_PAIRS} pairs), e.g. {shown}; "
        "that is two courts booked and paid for each time: if one is enough, keep one entry (a "
        "list in court_id tries several courts in order)"
    )


def _partner(
    slots: list[tuple[float, float, Entry]],
    club_starts: list[float],
    start: float,
    end: float,
    entry: Entry,
) -> tuple[float, float, Entry]:
    """A slot of another entry that overlaps [start, end) (one is known to): the latest
    starting before ``end``."""
    for i in range(bisect.bisect_left(club_starts, end) - 1, -1, -1):
        other = slots[i]
        if other[2] is not entry and other[1] > start:
            return other
    raise AssertionError("counted an overlap that is not there")  # pragma: no cover


def _overlap_text(
    file_name: str,
    one: Entry,
    two: Entry,
    first: tuple[datetime, datetime, datetime, datetime],
    count: int,
) -> str:
    """The warning for entries ``one`` and ``two`` (by position) that overlap ``count`` times,
    ``first`` the first: ``one``'s start and end, then ``two``'s."""
    a_start, a_end, b_start, b_end = first
    more = f" (and {count - 1} more time(s))" if count > 1 else ""
    return (
        f"{file_name}: entries {one.label} and {two.label} would book overlapping times: "
        f"{_span(a_start, a_end, one.zone)} and {_span(b_start, b_end, two.zone)}{more}; "
        "that is two courts booked and paid for: if one is enough, keep one entry (a list "
        "in court_id tries several courts in order)"
    )


def _span(start: datetime, end: datetime, zone: ZoneInfo) -> str:
    """``Fri 2026-12-04 12:00-13:00 GMT``: a booking's time, local (the start's zone name too
    when a DST change falls inside: ``02:00 CEST-02:00 CET``)."""
    local_start, local_end = start.astimezone(zone), end.astimezone(zone)
    shown = "%H:%M" if local_start.tzname() == local_end.tzname() else "%H:%M %Z"
    return f"{local_start:%a %Y-%m-%d} {local_start.strftime(shown)}-{local_end:%H:%M %Z}"


def _duplicate_id(name: str, raw: Any, entry_id: str, index: int, first: int) -> str:
    """The error of entry #``index`` whose id entry #``first`` has already."""
    explicit = isinstance(raw, dict) and "id" in raw
    where = _where(name, entry_id if explicit else None, index)
    if explicit:
        return f"{where}: id: {entry_id!r} is already used by entry #{first}; ids must be unique"
    return (
        f"{where}: id: this entry derives the same id ({entry_id!r}) as entry #{first} (same "
        'type, desired_time, rrule and timezone); give both an explicit "id"'
    )


def _sweep_order(overlap: _Overlap, one: int, two: int) -> tuple[Any, ...]:
    """Where ``overlap_warnings``' sweep finds an overlap of entries at positions ``one`` and
    ``two``: when the later of its two slots (by start, then position) comes, among the slots
    still running the earlier one."""
    mine, theirs = (overlap[0], one), (overlap[2], two)
    return (max(mine, theirs), min(mine, theirs))


#: An overlap as the index keeps it: the two slots as Unix seconds, (start, end) of the entry
#: whose key sorts first, then of the other.
_Overlap = tuple[float, float, float, float]


class _Pair:
    """The overlaps of two entries as their warning needs them: how many, and the earliest by
    (later start, earlier start). The sweep's first is among these whatever the entries'
    positions, which only break ties (a slot that overlaps a later one overlaps any slot of
    the other entry starting between them, an overlap that starts earlier)."""

    __slots__ = ("count", "firsts", "rank")

    def __init__(self) -> None:
        self.count = 0
        self.rank = (math.inf, math.inf)
        self.firsts: list[_Overlap] = []

    def add(self, overlap: _Overlap) -> None:
        self.count += 1
        rank = (max(overlap[0], overlap[2]), min(overlap[0], overlap[2]))
        if rank < self.rank:
            self.rank, self.firsts = rank, [overlap]
        elif rank == self.rank:
            self.firsts.append(overlap)


class _OverlapIndex:
    """What ``overlap_warnings`` finds, kept from read to read: every enabled cached entry's
    slots per club, sorted by start in flat arrays (a few large blocks, however many instances),
    and the overlaps found between each pair of entries, by their cache keys. An entry that
    comes or goes (an edited one does both) adds or drops its own slots and pairs only: its 52
    slots are looked up among those starting at most the longest duration before them."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        #: Per club: starts, ends (Unix seconds) and owners' keys, sorted by start.
        self._clubs: dict[str | None, tuple[array[float], array[float], list[bytes]]] = {}
        #: What each indexed entry put in: its club, its slots' starts and its duration.
        self._slots: dict[bytes, tuple[str | None, array[float], float]] = {}
        self._pairs: dict[tuple[bytes, bytes], _Pair] = {}
        self._partners: dict[bytes, set[bytes]] = {}

    def warnings(
        self, current: dict[bytes, tuple[Entry, array[float]]], file_name: str
    ) -> list[str]:
        """The overlap warnings of the enabled entries ``current`` (key -> entry, its starts),
        after bringing the index up to date with them."""
        for key in [k for k in self._slots if k not in current]:
            self._remove(key)
        for key, (_entry, starts) in current.items():
            if key in self._slots and self._slots[key][1] is not starts:
                self._remove(key)  # validated again: its starts moved on
        added = [key for key in current if key not in self._slots]
        try:
            if len(added) > max(16, len(current) // 8):
                self._rebuild(current)
            else:
                longest = max((60.0 * e.duration_minutes for e, _s in current.values()), default=0)
                for key in added:
                    entry, starts = current[key]
                    self._add(key, entry.club, starts, 60.0 * entry.duration_minutes, longest)
        except _TooMany:
            self._clear()  # built afresh at the next read (stopped again at once while too many)
            return [overlap_summary(list(current.values()), file_name)]
        return self._render(current, file_name)

    def _record(
        self, one: bytes, two: bytes, one_slot: tuple[float, float], two_slot: tuple[float, float]
    ) -> None:
        if two < one:
            one, two, one_slot, two_slot = two, one, two_slot, one_slot
        pair = self._pairs.get((one, two))
        if pair is None:
            if len(self._pairs) == MAX_OVERLAP_PAIRS:
                raise _TooMany
            pair = self._pairs[one, two] = _Pair()
        pair.add((*one_slot, *two_slot))
        self._partners.setdefault(one, set()).add(two)
        self._partners.setdefault(two, set()).add(one)

    def _add(
        self, key: bytes, club: str | None, starts: array[float], length: float, longest: float
    ) -> None:
        club_starts, club_ends, owners = self._clubs.setdefault(club, (array("d"), array("d"), []))
        for start in starts:
            end = start + length
            low = bisect.bisect_left(club_starts, start - longest)
            high = bisect.bisect_left(club_starts, end)
            for i in range(low, high):
                if club_ends[i] > start and owners[i] != key:
                    self._record(owners[i], key, (club_starts[i], club_ends[i]), (start, end))
        for start in starts:
            i = bisect.bisect_right(club_starts, start)
            club_starts.insert(i, start)
            club_ends.insert(i, start + length)
            owners.insert(i, key)
        self._slots[key] = (club, starts, length)

    def _remove(self, key: bytes) -> None:
        club, starts, _length = self._slots.pop(key)
        club_starts, club_ends, owners = self._clubs[club]
        for start in starts:
            i = bisect.bisect_left(club_starts, start)
            while owners[i] != key:
                i += 1
            del club_starts[i], club_ends[i], owners[i]
        for partner in self._partners.pop(key, set()):
            self._partners[partner].discard(key)
            self._pairs.pop((key, partner) if key < partner else (partner, key), None)

    def _rebuild(self, current: dict[bytes, tuple[Entry, array[float]]]) -> None:
        """Everything afresh, with one sweep per club (as ``overlap_warnings`` does)."""
        self._clear()
        by_club: dict[str | None, list[tuple[float, float, bytes]]] = {}
        for key, (entry, starts) in current.items():
            length = 60.0 * entry.duration_minutes
            self._slots[key] = (entry.club, starts, length)
            by_club.setdefault(entry.club, []).extend((s, s + length, key) for s in starts)
        for club, slots in by_club.items():
            slots.sort()
            _sweep(slots, lambda a, b: self._record(a[2], b[2], a[:2], b[:2]))
            self._clubs[club] = (
                array("d", (slot[0] for slot in slots)),
                array("d", (slot[1] for slot in slots)),
                [slot[2] for slot in slots],
            )

    def _render(
        self, current: dict[bytes, tuple[Entry, array[float]]], file_name: str
    ) -> list[str]:
        """The warnings, worded and ordered as ``overlap_warnings`` does: by the entries'
        positions, each naming the pair's first overlap in the order of a sweep by start, then
        position."""
        found = []
        for (one_key, two_key), pair in self._pairs.items():
            one, two = current[one_key][0], current[two_key][0]
            first = min((_sweep_order(o, one.position, two.position), o) for o in pair.firsts)[1]
            if two.position < one.position:
                one, two, first = two, one, (first[2], first[3], first[0], first[1])
            spans = tuple(datetime.fromtimestamp(t, UTC) for t in first)
            found.append((one.position, two.position, one, two, spans, pair.count))
        found.sort(key=lambda item: (item[0], item[1]))
        return [
            _overlap_text(file_name, one, two, spans, count)  # type: ignore[arg-type]
            for _a, _b, one, two, spans, count in found
        ]


@dataclass(frozen=True)
class _Validated:
    """A valid entry as the cache keeps it: without its expansion, its warnings without the
    leading ``where`` (which names the position), and until when it may be reused."""

    entry: Entry
    notes: tuple[str, ...]
    explicit_id: bool
    #: What validation said can change only when time passes the first start that was ahead
    #: (a one-off in the past, a rule that books nothing any more): validate again from then.
    fresh_until: datetime | None
    #: The starts that were ahead (Unix seconds): until ``fresh_until`` they are the entry's
    #: ``starts`` whatever the time, which the overlap check reads without expanding again.
    starts: array[float]


@dataclass
class EntryCache:
    """Valid entries by their raw JSON and the default zone, kept by the daemon between loads,
    so that a reload validates only the entries that changed (a reload after editing one entry
    of a thousand validates one). A cached entry is reused while its token is still in
    tokens.json and no start it had ahead has passed; at another position it takes the new
    one. ``validated`` and ``reused`` count the entries of the last read.

    Entries come out of it without their expansion: 52 instants an entry would lie scattered
    among what the daemon keeps, and the heap could not give that memory back (7 MB more at rest
    with 52,000 instances). An entry validated afresh keeps its starts instead, as the small
    array the cache holds for the overlap check (``Entry.start_stamps``): the load plans from
    them, so a rule is expanded once a load. A reused entry is expanded again when planned."""

    _entries: dict[bytes, _Validated] = field(default_factory=dict)
    _seen: dict[bytes, _Validated] = field(default_factory=dict)
    #: This read's cached entries by position, and the overlap check kept up to date with them.
    _keys: dict[int, bytes] = field(default_factory=dict)
    _overlaps: _OverlapIndex = field(default_factory=_OverlapIndex)
    validated: int = 0
    reused: int = 0

    def begin(self) -> None:
        """Start of a read; unless it ends in ``keep_seen``, the cache stays as it was."""
        self._seen = {}
        self._keys = {}
        self.validated = self.reused = 0

    def overlap_warnings(self, entries: list[Entry], now: datetime, file_name: str) -> list[str]:
        """``overlap_warnings`` of this read's entries, the same words in the same order, from
        an index that a reload updates with the entries that changed only (0.1 s at 52,000
        instances done afresh)."""
        current: dict[bytes, tuple[Entry, array[float]]] = {}
        for entry in entries:
            key = self._keys.get(entry.position)
            known = self._seen.get(key) if key is not None else None
            if known is None or known.entry.id != entry.id:
                return overlap_warnings(entries, now, file_name)  # not all cached: afresh
            if entry.enabled:
                current[key] = (entry, known.starts)
        return self._overlaps.warnings(current, file_name)

    def keep_seen(self) -> None:
        """End of a read: keep the entries of this file only (removed ones are forgotten)."""
        self._entries, self._seen = self._seen, {}

    def validate(
        self,
        raw: Any,
        position: int,
        file_name: str,
        *,
        default_zone: str,
        token_names: set[str],
        now: datetime,
        sources: RequestSources,
    ) -> tuple[Entry | None, list[str], list[str], str | None]:
        """``_validate_entry``, from the cache when this entry was validated before with the
        same sources of its window (its club file's, the template's, BOOKING_WINDOW)."""
        key = None
        if isinstance(raw, dict):
            # repr tells JSON's values apart (1, 1.0, True, "1") at half json.dumps' cost; keys
            # given in another order only cost a validation.
            context = (raw, default_zone, _sources_context(raw, sources))
            key = hashlib.sha256(repr(context).encode()).digest()
        known = self._entries.get(key) if key is not None else None
        if (
            key is not None
            and known is not None
            and known.entry.token in token_names
            and (known.fresh_until is None or now < known.fresh_until)
        ):
            self.reused += 1
            self._seen[key] = known
            self._keys[position] = key
            entry = known.entry
            if entry.position != position:
                entry = dataclasses.replace(entry, position=position)
            where = _where(file_name, entry.id if known.explicit_id else None, position)
            return entry, [], [where + note for note in known.notes], entry.id
        self.validated += 1
        entry, errors, warnings, entry_id = _validate_entry(
            raw,
            position,
            file_name,
            default_zone=default_zone,
            token_names=token_names,
            now=now,
            sources=sources,
        )
        if entry is None:
            return entry, errors, warnings, entry_id
        fresh_until = _fresh_until(entry, now)
        starts = array("d", (start.timestamp() for start in entry.starts(now) if start > now))
        explicit = "id" in raw
        where = _where(file_name, entry.id if explicit else None, position)
        entry = dataclasses.replace(entry, expansion=None, start_stamps=(now, starts))
        if key is not None and not errors and all(w.startswith(where) for w in warnings):
            self._seen[key] = _Validated(
                entry=entry,
                notes=tuple(w[len(where) :] for w in warnings),
                explicit_id=explicit,
                fresh_until=fresh_until,
                starts=starts,
            )
            self._keys[position] = key
        return entry, errors, warnings, entry_id


def _sources_context(raw: dict[str, Any], sources: RequestSources) -> tuple[Any, ...]:
    """What an entry's validation reads besides its JSON: its club file (read here as
    validation would, so that this load knows the club's flow) and that file's window, or the
    template's window, BOOKING_WINDOW and whether a request needs a club."""
    if "club" in raw:
        name = raw["club"]
        club = sources.club(name) if _id_ok(name) else None
        club_window = None if club is None else str(club.window)
        # How many players the club's flow names: a new {players[N]} may make the entry wrong.
        needed = None if club is None else club.flow.players_needed
        return ("club", repr(name), club_window, str(sources.window), needed)
    template = sources.template
    template_window = None if template is None else str(template.window)
    needed = None if template is None else template.flow.players_needed
    return ("no club", sources.clubs_only, template_window, str(sources.window), needed)


def _fresh_until(entry: Entry, now: datetime) -> datetime | None:
    """The first start of ``entry`` ahead of ``now`` (None when there is none: nothing that
    validation says about the entry can change with time any more)."""
    return next((start for start in entry.starts(now) if start > now), None)


def _where(file_name: str, entry_id: str | None, position: int) -> str:
    if entry_id is None:
        return f"{file_name} entry #{position}"
    return f"{file_name} entry {entry_id!r} (#{position})"


@dataclass
class _EntryCheck:
    """One entry under validation: the raw object, what its keys parsed to so far, and every
    error found. The checkers fill it in ``_ENTRY_CHECKERS``' order, each reading what earlier
    ones parsed (the zone before desired_time, desired_time before rrule)."""

    raw: dict[str, Any]
    where: str
    default_zone: str
    token_names: set[str]
    now: datetime
    sources: RequestSources
    errors: list[str] = field(default_factory=list)
    bad_keys: set[str] = field(default_factory=set)
    entry_type: Any = None
    zone_name: Any = None
    zone: ZoneInfo | None = None
    desired: utils.DesiredTime | None = None
    desired_ok: bool = True
    rule_text: Any = None
    rule: utils.ParsedRule | None = None
    courts: tuple[str | None, ...] = (None,)
    token: Any = None
    duration: Any = None
    enabled: Any = None
    skip: frozenset[date] = frozenset()
    club: str | None = None
    window: utils.Window | None = None
    window_from: str = "BOOKING_WINDOW"
    fallback_times: tuple[str, ...] = ()
    watch_minutes: int | None = None
    players: tuple[str, ...] = ()

    def bad(self, key: str, message: str) -> None:
        self.errors.append(f"{self.where}: {key}: {message}")
        self.bad_keys.add(key)


def _id_ok(value: Any) -> bool:
    return isinstance(value, str) and utils.SCHEDULE_ID_RE.fullmatch(value) is not None


def _times(count: int) -> str:
    return "given twice" if count == 2 else f"given {count} times"


def _check_repeated_keys(c: _EntryCheck) -> None:
    for key, count in repeated_keys(c.raw).items():
        shown = key if key.isidentifier() else repr(key)
        c.bad(
            shown,
            f"{_times(count)} in this entry; keep one (JSON would silently use the last, "
            f"{c.raw[key]!r})",
        )
        c.bad_keys.add(key)


def _check_unknown_keys(c: _EntryCheck) -> None:
    for key in c.raw:
        if key not in ENTRY_KEYS:
            # Quoted unless a plain name, so that "", " id" or a newline read as what they are.
            shown = key if key.isidentifier() else repr(key)
            close = difflib.get_close_matches(key.strip().lower(), ENTRY_KEYS, n=1, cutoff=0.7)
            if close:
                c.bad(shown, f"unknown key; did you mean {close[0]!r}?")
            else:
                c.bad(shown, f"unknown key; expected one of {', '.join(ENTRY_KEYS)}")


def _check_id(c: _EntryCheck) -> None:
    if "id" in c.raw and not _id_ok(c.raw["id"]):
        c.bad(
            "id",
            f"{c.raw['id']!r} is not a valid id; expected 1 to 64 of A-Z a-z 0-9 _ . - "
            "(e.g. 'wed-evening')",
        )


def _check_type(c: _EntryCheck) -> None:
    c.entry_type = c.raw.get("type")
    if "type" not in c.raw:
        c.bad("type", 'missing; expected "one-off" or "recurring"')
    elif c.entry_type not in (ONE_OFF, RECURRING):
        c.bad("type", f'{c.entry_type!r} is not a type; expected "one-off" or "recurring"')


def _check_timezone(c: _EntryCheck) -> None:
    c.zone_name = c.raw.get("timezone", c.default_zone)
    try:
        c.zone = utils.get_zone(c.zone_name)
    except ValueError as exc:
        c.bad("timezone", str(exc))


def _check_desired_time(c: _EntryCheck) -> None:
    raw = c.raw
    if "desired_time" in raw and c.zone is not None:
        try:
            c.desired = utils.parse_desired_time(raw["desired_time"], c.zone)
        except ValueError as exc:
            c.bad("desired_time", str(exc))
            c.desired_ok = False
        except OverflowError:
            c.bad(
                "desired_time",
                f"{raw['desired_time']!r} is out of range (years 1 to 9999 in UTC and in the "
                "entry's zone)",
            )
            c.desired_ok = False
    elif c.entry_type == ONE_OFF and "desired_time" not in raw:
        c.bad("desired_time", "missing; a one-off entry needs 'YYYY-MM-DD HH:MM'")


def _check_rrule(c: _EntryCheck) -> None:
    raw = c.raw
    c.rule_text = raw.get("rrule")
    if c.entry_type == ONE_OFF and "rrule" in raw:
        c.bad("rrule", 'a one-off entry has no rule; use "type": "recurring" or remove "rrule"')
    elif c.entry_type == RECURRING:
        if "rrule" not in raw:
            c.bad("rrule", f"missing; a recurring entry needs a rule, e.g. {utils.RULE_EXAMPLE}")
        elif not isinstance(c.rule_text, str) or not c.rule_text.strip():
            c.bad("rrule", f"{c.rule_text!r} is not a rule; e.g. {utils.RULE_EXAMPLE}")
        elif c.zone is not None and c.desired_ok:
            c.rule = _parse_rule(
                c.rule_text,
                desired=c.desired,
                zone=c.zone,
                zone_name=c.zone_name,
                raw=raw,
                now=c.now,
                bad=c.bad,
            )
    if c.rule is not None and c.rule.zone_name is not None:
        c.zone_name = c.rule.zone_name
        c.zone = utils.get_zone(c.zone_name)


def _check_court_id(c: _EntryCheck) -> None:
    if "court_id" not in c.raw:
        return
    court_value = c.raw["court_id"]
    if court_value is None:
        c.courts = (None,)
    elif _has_control(court_value):
        c.bad(
            "court_id",
            f"{court_value!r} holds a control character (a line break, tab, ...); a court is "
            "one line of text",
        )
    elif isinstance(court_value, list):
        if not court_value:
            c.bad("court_id", "an empty list; give one or more courts, or null for any court")
        elif not all(_is_court(court) for court in court_value):
            c.bad(
                "court_id",
                f"{court_value!r}: every court in a list must be a string or integer",
            )
        elif len({str(court) for court in court_value}) != len(court_value):
            c.bad("court_id", f"{court_value!r} lists a court twice")
        else:
            c.courts = tuple(str(court) for court in court_value)
    elif _is_court(court_value):
        c.courts = (str(court_value),)
    else:
        c.bad(
            "court_id",
            f"{court_value!r} is not a court; expected a string, an integer, null (any "
            'court) or a list tried in order, e.g. ["3", "4"]',
        )


def _check_token(c: _EntryCheck) -> None:
    c.token = token = c.raw.get("token", "default")
    if not isinstance(token, str) or not token:
        c.bad("token", f"{token!r} is not a token name; expected a name from tokens.json")
    elif utils.CONTROL_RE.search(token):
        c.bad(
            "token",
            f"{token!r} holds a control character (a line break, tab, ...); expected a name "
            "from tokens.json",
        )
    elif token not in c.token_names:
        have = ", ".join(repr(n) for n in sorted(c.token_names)) or "none"
        c.bad("token", f"{token!r} is not in tokens.json (it has: {have})")


def _check_duration(c: _EntryCheck) -> None:
    c.duration = duration = c.raw.get("duration_minutes", 60)
    if isinstance(duration, bool) or not isinstance(duration, int) or duration <= 0:
        c.bad("duration_minutes", f"{duration!r} is not a positive whole number of minutes")
    elif duration > 24 * 60:
        c.bad("duration_minutes", f"{duration!r} is longer than a day")


def _check_enabled(c: _EntryCheck) -> None:
    c.enabled = c.raw.get("enabled", True)
    if not isinstance(c.enabled, bool):
        c.bad("enabled", f"{c.enabled!r} is not true or false")


def _check_about(c: _EntryCheck) -> None:
    # Free text for people (JSON has no comments), as a club file's ``about``: never read.
    if "about" in c.raw and not isinstance(c.raw["about"], str):
        c.bad("about", f"{c.raw['about']!r} is not a string (a note for people, ignored)")


_SKIP_EXAMPLE = '["2026-12-24", "2026-12-31"]'


def _check_skip(c: _EntryCheck) -> None:
    if "skip" not in c.raw:
        return
    value = c.raw["skip"]
    if c.entry_type == ONE_OFF:
        c.bad("skip", 'a one-off has no dates to skip; remove "skip" (or set "enabled": false)')
    elif not isinstance(value, list):
        c.bad("skip", f"{value!r} is not a list of dates; expected e.g. {_SKIP_EXAMPLE}")
    else:
        dates: set[date] = set()
        for item in value:
            try:
                if not isinstance(item, str) or len(item) != 10:
                    raise ValueError
                dates.add(date.fromisoformat(item))
            except ValueError:
                c.bad("skip", f"{item!r} is not a date 'YYYY-MM-DD'; expected e.g. {_SKIP_EXAMPLE}")
                return
        c.skip = frozenset(dates)


def _check_club(c: _EntryCheck) -> None:
    if "club" not in c.raw:
        if c.sources.clubs_only:
            c.bad(
                "club",
                "none given, and neither BOOKING_API_URL nor BOOKING_REQUEST_TEMPLATE gives a "
                "URL to book at: set BOOKING_API_URL or name a club file (DATA_DIR/clubs/"
                "<club>.json)",
            )
        return
    name = c.raw["club"]
    if not _id_ok(name):
        c.bad(
            "club",
            f"{name!r} is not a club name; expected 1 to 64 of A-Z a-z 0-9 _ . - naming "
            "DATA_DIR/clubs/<club>.json (e.g. 'playtomic')",
        )
        return
    if c.sources.club(name) is None:
        c.bad("club", f"{name!r}: {c.sources.club_errors[name]}")
        return
    c.club = name


def _check_window(c: _EntryCheck) -> None:
    """The window that applies: the entry's, else its club file's, else (no club) the
    template's, else BOOKING_WINDOW."""
    sources = c.sources
    if "window" in c.raw:
        try:
            c.window, c.window_from = utils.parse_window(c.raw["window"]), "entry"
        except ValueError as exc:
            c.bad("window", str(exc))
        return
    if "club" in c.raw:
        club = sources.clubs.get(c.club) if c.club is not None else None
        if club is not None and club.window is not None:
            c.window, c.window_from = club.window, club.label
            return
    elif sources.template is not None and sources.template.window is not None:
        c.window, c.window_from = sources.template.window, sources.template.label
        return
    c.window, c.window_from = sources.window, "BOOKING_WINDOW"


def _check_fallback_times(c: _EntryCheck) -> None:
    if "fallback_times" not in c.raw:
        return
    value = c.raw["fallback_times"]
    if not isinstance(value, list):
        c.bad(
            "fallback_times",
            f"{value!r} is not a list of local times; expected e.g. {_FALLBACK_EXAMPLE}",
        )
        return
    for item in value:
        if not isinstance(item, str) or not _LOCAL_TIME_RE.fullmatch(item):
            c.bad(
                "fallback_times",
                f"{item!r} is not a local time 'HH:MM'; expected e.g. {_FALLBACK_EXAMPLE}",
            )
            return
    if len(set(value)) != len(value):
        twice = next(item for item in value if value.count(item) > 1)
        c.bad("fallback_times", f"{value!r} lists {twice!r} twice")
        return
    c.fallback_times = tuple(value)


def _check_watch(c: _EntryCheck) -> None:
    value = c.raw.get("watch", False)
    if value is False:
        return
    match = _WATCH_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1]) == 0:
        c.bad(
            "watch",
            f'{value!r} is not a watch; expected "<N>h" or "<N>m" (how long before the start '
            'the watch ends, N at least 1, e.g. "2h" or "90m") or false',
        )
        return
    c.watch_minutes = int(match[1]) * (60 if match[2] == "h" else 1)


def _check_players(c: _EntryCheck) -> None:
    """A list of strings; as many as the highest ``{players[N]}`` the entry's flow names."""
    value = c.raw.get("players", [])
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item.strip() and not utils.CONTROL_RE.search(item)
        for item in value
    ):
        c.bad(
            "players",
            f"{value!r} is not a list of names (non-empty strings on one line); expected e.g. "
            f"{_PLAYERS_EXAMPLE}",
        )
        return
    c.players = tuple(value)
    source = _flow_file_of(c)
    if source is not None and source.flow.players_needed > len(value):
        needed = source.flow.players_needed
        c.bad(
            "players",
            f"{source.label} names {{players[{needed - 1}]}}, and this entry has "
            f"{len(value)} player{'' if len(value) == 1 else 's'}; give at least {needed} "
            f"(e.g. {_PLAYERS_EXAMPLE})",
        )


def _flow_file_of(c: _EntryCheck) -> FlowFile | None:
    """The club file or template the entry's bookings use (None: section 6's request, or a
    club that is not valid, which is its own error)."""
    if "club" in c.raw:
        return c.sources.clubs.get(c.club) if c.club is not None else None
    return c.sources.template


#: One checker per key, in the order their errors are reported (unknown keys come first).
#: Not ENTRY_KEYS' order: a checker may read what an earlier one parsed.
_ENTRY_CHECKERS: tuple[tuple[str, Callable[[_EntryCheck], None]], ...] = (
    ("id", _check_id),
    ("type", _check_type),
    ("timezone", _check_timezone),
    ("desired_time", _check_desired_time),
    ("rrule", _check_rrule),
    ("court_id", _check_court_id),
    ("token", _check_token),
    ("duration_minutes", _check_duration),
    ("enabled", _check_enabled),
    ("skip", _check_skip),
    ("club", _check_club),
    ("window", _check_window),
    ("fallback_times", _check_fallback_times),
    ("watch", _check_watch),
    ("players", _check_players),
    ("about", _check_about),
)


def _validate_entry(
    raw: Any,
    position: int,
    file_name: str,
    *,
    default_zone: str,
    token_names: set[str],
    now: datetime,
    sources: RequestSources,
) -> tuple[Entry | None, list[str], list[str], str | None]:
    """Check one entry. Returns (entry or None, errors, warnings, its id if it can be told)."""
    if not isinstance(raw, dict):
        where = _where(file_name, None, position)
        return None, [f"{where}: expected an object, got {_json_type(raw)}"], [], None
    # An id given twice is no id: which entry this is cannot be told.
    id_ok = _id_ok(raw.get("id")) and "id" not in repeated_keys(raw)
    shown_id = raw.get("id") if id_ok else None
    check = _EntryCheck(
        raw, _where(file_name, shown_id, position), default_zone, token_names, now, sources
    )
    _check_repeated_keys(check)
    _check_unknown_keys(check)
    for _key, checker in _ENTRY_CHECKERS:
        checker(check)
    # The derived id uses the raw values that say *when*, so court or token edits keep it.
    # When one of those values is itself wrong, the entry may be an edit of any entry without
    # an id: its id cannot be told (None), and removals are put off.
    entry_id: str | None = shown_id
    if "id" not in raw and not check.bad_keys & {"type", "desired_time", "rrule", "timezone"}:
        entry_id = utils.derive_schedule_id(
            check.entry_type, raw.get("desired_time"), check.rule_text, raw.get("timezone")
        )
    if check.errors:
        return None, check.errors, [], entry_id
    assert entry_id is not None
    where = _where(file_name, entry_id if "id" in raw else None, position)
    entry, error, warnings = _build_entry(check, entry_id, position, where)
    return entry, [error] if error else [], warnings, entry_id


def _build_entry(
    c: _EntryCheck, entry_id: str, position: int, where: str
) -> tuple[Entry | None, str | None, list[str]]:
    """The entry of a check that found no error: (entry or None, the error of a rule that runs
    out of range while expanding, warnings)."""
    assert c.zone is not None and isinstance(c.zone_name, str)
    warnings: list[str] = []
    desired_moment: datetime | None = None
    if c.entry_type == ONE_OFF:
        assert c.desired is not None
        desired_moment = c.desired.moment
        if not c.desired.explicit_offset:
            note = utils.describe_wall_clock_issue(c.desired.wall, c.zone)
            if note:
                warnings.append(f"{where}: desired_time: {note}")
        if c.desired.moment <= c.now:
            warnings.append(
                f"{where}: desired_time: {c.raw['desired_time']!r} is in the past; "
                "skipped, never booked"
            )
    assert c.window is not None
    # The window that applies is part of the entry: a club file's or template's new window
    # moves its pending instances' triggers.
    fingerprint = hashlib.sha256(
        json.dumps([c.raw, c.zone_name, str(c.window)], sort_keys=True, default=str).encode()
    ).hexdigest()
    entry = Entry(
        id=entry_id,
        position=position,
        type=c.entry_type,
        timezone=c.zone_name,
        courts=c.courts,
        token=c.token,
        duration_minutes=c.duration,
        enabled=c.enabled,
        desired_wall=c.desired.wall if c.desired else None,
        desired_moment=desired_moment,
        raw_rrule=c.rule_text if c.entry_type == RECURRING else None,
        rule=c.rule,
        fingerprint=fingerprint,
        skip=c.skip,
        club=c.club,
        window=c.window,
        window_from=c.window_from,
        fallback_times=c.fallback_times,
        watch_minutes=c.watch_minutes,
        players=c.players,
    )
    if c.rule is None:
        assert desired_moment is not None
        if not _ends_in_range([desired_moment], c.duration, c.zone):
            return (
                None,
                f"{where}: desired_time: {c.raw['desired_time']!r} with duration_minutes "
                f"{c.duration} ends {OUT_OF_RANGE.removeprefix('holds a date ')}",
                warnings,
            )
    else:
        # A rule that runs into year 9999 fails only while expanding (or at an instance's
        # end): find out here, not in reconcile or in the request.
        try:
            entry = dataclasses.replace(entry, expansion=(c.now, tuple(entry.occurrences(c.now))))
            assert entry.expansion is not None
            ends_ok = _ends_in_range([s for _, s in entry.expansion[1]], c.duration, c.zone)
        except (ValueError, OverflowError):
            ends_ok = False
        if not ends_ok:
            return None, f"{where}: rrule: {c.rule_text!r} {OUT_OF_RANGE}", warnings
        if not any(start > c.now for start in entry.starts(c.now)):
            # Valid, but it books nothing: say so rather than leave the entry silently empty.
            why = utils.describe_no_instance(c.rule, c.zone, c.now)
            warnings.append(f"{where}: rrule: {c.rule_text!r} books nothing: {why}")
    late = _window_opens_late(entry, c.now)
    if late is not None:
        return None, f"{where}: window: {late}", warnings
    too_long = _watch_too_long(entry, c.now, c.raw.get("watch"))
    if too_long is not None:
        return None, f"{where}: watch: {too_long}", warnings
    warnings += _fallback_warnings(entry, c.now, where)
    return entry, None, warnings


def _next_start(entry: Entry, now: datetime) -> datetime | None:
    """The entry's first start ahead of ``now`` (a one-off's start also when it has passed)."""
    starts = entry.starts(now)
    if entry.rule is None:
        return starts[0] if starts else None
    return next((start for start in starts if start > now), None)


def _watch_too_long(entry: Entry, now: datetime, raw: Any) -> str | None:
    """Why the entry's watch cannot be: it would end before its window opens."""
    start = _next_start(entry, now)
    end = entry.watch_end(start) if start is not None else None
    if start is None or end is None:
        return None
    trigger = utils.trigger_time(start, entry.zone, entry.window)
    if end > trigger:
        return None
    opens = (utils.as_utc(start) - trigger).total_seconds() / 3600
    return (
        f"{raw!r} is longer than the entry's window ({str(entry.window)!r}, {opens:g}h before "
        "the start): the watch would end before the window opens; give a shorter watch"
    )


def _fallback_warnings(entry: Entry, now: datetime, where: str) -> list[str]:
    """A fallback time equal to the desired time (of the next instance): it is skipped."""
    start = _next_start(entry, now)
    if start is None or not entry.fallback_times:
        return []
    local = utils.as_utc(start).astimezone(entry.zone).strftime("%H:%M")
    if local not in entry.fallback_times:
        return []
    return [
        f"{where}: fallback_times: {local!r} is the desired time itself; it is skipped "
        "(list only other times)"
    ]


def _ends_in_range(starts: Sequence[datetime], minutes: int, zone: ZoneInfo) -> bool:
    """True when every instance starting at ``starts`` (soonest first) ends within years 1 to
    9999, in UTC and in ``zone`` (the request writes its end with the zone's offset): the first
    and the last bound them all."""
    if not starts:
        return True
    length = timedelta(minutes=minutes)
    try:
        for start in (starts[0], starts[-1]):
            end = utils.as_utc(start) + length
            end.astimezone(UTC)
            end.astimezone(zone)
    except (OverflowError, ValueError):
        return False
    return True


def _window_opens_late(entry: Entry, now: datetime) -> str | None:
    """Why the entry's window cannot be used: it would open only after a start ahead
    (``0d@20:00`` for a 17:00 start); None when every trigger is at or before its start."""
    window, zone = entry.window, entry.zone
    if window.at is None:
        return None
    for _wall, start in entry.occurrences(now):
        if start <= now:
            continue
        try:
            trigger = utils.window_opens_after(start, zone, window)
        except (ValueError, OverflowError):
            return f"{str(window)!r} {OUT_OF_RANGE}"
        if trigger is None:
            continue
        shown = repr(str(window)) + (
            "" if entry.window_from == "entry" else f" (from {entry.window_from})"
        )
        return (
            f"{shown} would open at {utils.format_local(trigger, zone)}, after the start "
            f"{utils.format_local(start, zone)}: nothing could be booked; use a window that opens "
            f"before the start (e.g. '{int(window.amount) + 1}d@{window.at:%H:%M}')"
        )
    return None


def _has_control(value: Any) -> bool:
    """True when a court (or a court of a list) is text holding a control character."""
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, str) and utils.CONTROL_RE.search(v) for v in values)


def _is_court(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= 64 and value == value.strip()


def _parse_rule(
    text: str,
    *,
    desired: utils.DesiredTime | None,
    zone: ZoneInfo,
    zone_name: Any,
    raw: Mapping[str, Any],
    now: datetime,
    bad: Any,
) -> utils.ParsedRule | None:
    try:
        if utils.is_english_rule(text):
            today: date = now.astimezone(zone).date()
            return utils.parse_english_rule(
                text, start=desired.wall.date() if desired else None, today=today
            )
        rule = utils.parse_rfc_rule(text, start=desired.wall if desired else None, zone=zone)
    except utils.RuleError as exc:
        bad("rrule", str(exc))
        return None
    except OverflowError:
        bad("rrule", f"{text!r} {OUT_OF_RANGE}")
        return None
    if rule.zone_name is not None and "timezone" in raw and rule.zone_name != zone_name:
        bad(
            "timezone",
            f"{zone_name!r} disagrees with the rule's DTSTART;TZID={rule.zone_name}; "
            "give the zone once",
        )
        return None
    return rule


# --------------------------------------------------------------------------- request template


@dataclass(frozen=True)
class FlowFile:
    """A request template or flow file, parsed: BOOKING_REQUEST_TEMPLATE or a club file
    ``DATA_DIR/clubs/<club>.json`` (CONTRACT sections 11 and 12).

    ``flow`` is what bookings are rendered from; ``window`` the club's own opening rule, when
    the file gives one; ``label`` how errors and ``check`` name the file.
    """

    label: str
    flow: Flow
    window: utils.Window | None
    digest: str


def _read_json_file(path: Path, label: str) -> tuple[Any, bytes]:
    """A JSON file's value and bytes; ``TemplateError`` naming ``label`` when it cannot be."""
    try:
        data = _read_bytes(path)
    except OSError as exc:
        raise TemplateError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    if data is None:
        raise TemplateError(f"{label}: no such file")
    parsed, error = _decode_json(data, label)
    if error is not None:
        raise TemplateError(error.split(";")[0])
    return parsed, data


def load_flow_file(
    path: Path, *, api_url: str | None, label: str, ready_dir: Path | None = None
) -> FlowFile:
    """Read and validate a request template or flow file. Raises ``TemplateError`` naming the
    file (``label``), the step and the key. With ``ready_dir`` (a club file), a file
    ``{"use": "<ready flow>", "yourclub": "<label>"}`` is that ready flow with its placeholder
    host label replaced (CONTRACT section 12)."""
    parsed, data = _read_json_file(path, label)
    if ready_dir is not None and isinstance(parsed, dict) and "use" in parsed:
        parsed, ready_data = _use_ready_flow(parsed, ready_dir, label)
        data += ready_data
    left = _placeholder_left(parsed)
    if left is not None:
        key, value = left
        raise TemplateError(
            f"{label}: {key}: {value!r} still holds the placeholder {PLACEHOLDER!r}: put your "
            f"club's own host there (in hosts and every url), or {_use_advice(path)}"
        )
    flow = parse_flow(parsed, api_url=api_url, name=label)
    # parse_flow validated the window; here it becomes the one the club's entries follow.
    window = utils.parse_window(flow.window) if flow.window is not None else None
    return FlowFile(label=label, flow=flow, window=window, digest=content_digest(data))


def cancel_flow(settings: Settings, club: str | None) -> tuple[Flow | None, str]:
    """The flow an instance of ``club`` cancels with (CONTRACT 13; None when there is none)
    and how to name it: its club file, else the request template, else section 6's request."""
    try:
        if club is not None:
            found = club_file(settings, club)  # a use file or a ready flow by name too
            return found.flow, f"club file {found.label}"
        template = load_template(settings)
    except TemplateError as exc:
        return None, str(exc)
    if template is not None:
        return template.flow, template.label
    if settings.api_url is None:
        return None, "no BOOKING_API_URL"
    return default_flow(settings.api_url), "BOOKING_API_URL"


def _use_advice(path: Path) -> str:
    """How to use a ready flow with a host per club without editing it."""
    ready = path.stem
    return (
        f"leave the ready flow as it is and write a club file of your own, e.g. "
        f'clubs/my-{ready}.json holding {{"use": "{ready}", "{PLACEHOLDER}": "<your club\'s '
        f'subdomain>"}}, and name it in the entry ("club": "my-{ready}")'
    )


def _placeholder_left(parsed: Any, where: str = "") -> tuple[str, str] | None:
    """The first ``hosts`` item or ``url`` (at any depth: steps, clock, cancel) that still holds
    the ``yourclub`` placeholder, as (key path, value); None when none does."""
    if isinstance(parsed, dict):
        for key, value in parsed.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "url" and isinstance(value, str) and _PLACEHOLDER_RE.search(value):
                return path, value
            if key == "hosts" and isinstance(value, list):
                for index, host in enumerate(value):
                    if isinstance(host, str) and _PLACEHOLDER_RE.search(host):
                        return f"{path}[{index}]", host
            if key != "about":
                found = _placeholder_left(value, path)
                if found is not None:
                    return found
    elif isinstance(parsed, list):
        for index, value in enumerate(parsed):
            name = value.get("name") if isinstance(value, dict) else None
            label = f"{where}[{index}]" + (f" {name!r}" if isinstance(name, str) else "")
            found = _placeholder_left(value, label)
            if found is not None:
                return found
    return None


def _use_ready_flow(use: dict[str, Any], ready_dir: Path, label: str) -> tuple[Any, bytes]:
    """A ready flow named by a club file's ``use``, with its placeholder host label replaced by
    the file's ``yourclub``: the flow's JSON and the ready file's bytes."""
    unknown = [key for key in use if key not in USE_KEYS]
    if unknown:
        raise TemplateError(
            f'{label}: {unknown[0]}: unknown key; a club file with "use" takes only '
            f"{', '.join(USE_KEYS)}"
        )
    name = use["use"]
    ready_path = ready_dir / f"{name}.json"
    if not _id_ok(name) or not ready_path.is_file():
        known = sorted(p.stem for p in ready_dir.glob("*.json")) if ready_dir.is_dir() else []
        raise TemplateError(
            f"{label}: use: {name!r} is not a ready flow (expected one of "
            f"{', '.join(known) or 'none: ' + str(ready_dir) + ' holds none'})"
        )
    flow, data = _read_json_file(ready_path, str(ready_path))
    left = _placeholder_left(flow)
    value = use.get(PLACEHOLDER)
    if left is None:
        if value is not None:
            raise TemplateError(
                f"{label}: {PLACEHOLDER}: the ready flow {name!r} has no {PLACEHOLDER!r} host "
                "to replace; remove the key"
            )
        return flow, data
    host = (urlsplit(left[1]).hostname or left[1]) if "://" in left[1] else left[1]
    example = f'e.g. "riverside" for {_PLACEHOLDER_RE.sub("riverside", host)}'
    if value is None:
        raise TemplateError(
            f"{label}: {PLACEHOLDER}: missing; the ready flow {name!r} has a host per club "
            f"({host}): give your club's subdomain, {example}"
        )
    if not isinstance(value, str) or not _DNS_LABEL_RE.fullmatch(value.lower()):
        raise TemplateError(
            f"{label}: {PLACEHOLDER}: {value!r} is not a host name label (letters, digits and "
            f"hyphens, at most 63; {example})"
        )
    return _replace_placeholder(flow, value.lower()), data


def _replace_placeholder(value: Any, label: str) -> Any:
    """``value`` with the placeholder label replaced by ``label`` in every string."""
    if isinstance(value, str):
        return _PLACEHOLDER_RE.sub(label, value)
    if isinstance(value, list):
        return [_replace_placeholder(item, label) for item in value]
    if isinstance(value, dict):
        return {key: _replace_placeholder(item, label) for key, item in value.items()}
    return value


def load_template(settings: Settings) -> FlowFile | None:
    """Read and validate BOOKING_REQUEST_TEMPLATE (None when unset).

    Raises ``TemplateError`` naming the file, the step and the key.
    """
    path = settings.template_path
    if path is None:
        return None
    return load_flow_file(path, api_url=settings.api_url, label=f"BOOKING_REQUEST_TEMPLATE {path}")


def unreadable_by_daemon(settings: Settings) -> list[str]:
    """The config files that the daemon could not read, one line each saying why and the fix.

    Only as root (``check`` in a container, as ``docker compose exec`` runs it): the daemon
    runs as the owner of DATA_DIR (the image's uid 10001), and root reads everything, so a file
    copied in as root with mode 0600 passes a root ``check`` while the daemon cannot read it.
    Elsewhere reading the file is the test, and the load itself reports it."""
    if os.geteuid() != 0:
        return []
    try:
        owner = settings.data_dir.stat()
    except OSError:
        return []
    if owner.st_uid == 0:
        return []
    paths = [settings.schedules_path, settings.tokens_path]
    if settings.template_path is not None:
        paths.append(settings.template_path)
    with contextlib.suppress(OSError):
        paths.extend(sorted(settings.clubs_dir.glob("*.json")))
    problems = []
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        readable = (
            (info.st_uid == owner.st_uid and mode & stat.S_IRUSR)
            or (info.st_gid == owner.st_gid and mode & stat.S_IRGRP)
            or mode & stat.S_IROTH
        )
        if not readable:
            problems.append(
                f"{path}: the daemon (uid {owner.st_uid}, the owner of {settings.data_dir}) "
                f"cannot read it (owner uid {info.st_uid}, mode {mode:04o}): run "
                f"`chown {owner.st_uid}:{owner.st_gid} {path}`, or restart the container (its "
                "entrypoint hands every file in DATA_DIR to the daemon)"
            )
    return problems


def club_path(clubs_dir: Path, ready_dir: Path, name: str) -> Path:
    """Where the club file ``name`` is read from: DATA_DIR/clubs/<name>.json, else the ready
    flow of that name (used by name, without a copy), else DATA_DIR's path (missing)."""
    path = clubs_dir / f"{name}.json"
    ready = ready_dir / f"{name}.json"
    with contextlib.suppress(OSError):
        if not path.exists() and ready.is_file():
            return ready
    return path


def club_file(settings: Settings, name: str) -> FlowFile:
    """The club file ``name`` as an entry naming it gets it: DATA_DIR/clubs/<name>.json (a
    ``use`` file included), else the ready flow of that name. Raises TemplateError naming the
    file and what is wrong (a missing one too)."""
    if utils.SCHEDULE_ID_RE.fullmatch(name) is None:
        raise TemplateError(
            f"club {name!r}: not a club name (its file is DATA_DIR/clubs/<club>.json)"
        )
    sources = RequestSources(
        api_url=settings.api_url, clubs_dir=settings.clubs_dir, ready_dir=settings.ready_clubs_dir
    )
    found = sources.club(name)
    if found is None:
        raise TemplateError(f"club {name!r}: {sources.club_errors[name]}")
    return found


def has_club_files(settings: Settings) -> bool:
    """Whether DATA_DIR/clubs/ holds any club file, or schedules.json names a club (a ready
    flow is used by name)."""
    try:
        if any(settings.clubs_dir.glob("*.json")):
            return True
        data = _read_bytes(settings.schedules_path)
    except OSError:
        return False
    parsed = _decode_json(data, SCHEDULES_FILE)[0] if data is not None else None
    return isinstance(parsed, list) and any(
        isinstance(raw, dict) and "club" in raw for raw in parsed
    )


@dataclass
class RequestSources:
    """Where entries' requests and windows come from (CONTRACT section 3): BOOKING_WINDOW,
    BOOKING_REQUEST_TEMPLATE, BOOKING_API_URL and the club files, each club file read and
    validated once per load, only when an entry names it."""

    window: utils.Window = field(default_factory=lambda: utils.parse_window(DEFAULT_WINDOW))
    template: FlowFile | None = None
    #: No BOOKING_API_URL and no template with a url, but club files: an entry that names no
    #: club has nothing to book at. (Without club files either, ``run`` refuses to start.)
    clubs_only: bool = False
    api_url: str | None = None
    clubs_dir: Path | None = None
    #: The ready flows, used by name when ``clubs_dir`` has no file of that name.
    ready_dir: Path = READY_CLUBS_DIR
    clubs: dict[str, FlowFile] = field(default_factory=dict)
    club_errors: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, template: FlowFile | None) -> RequestSources:
        return cls(
            window=settings.window,
            template=template,
            clubs_only=settings.api_url is None
            and (template is None or not template.flow.has_url)
            and has_club_files(settings),
            api_url=settings.api_url,
            clubs_dir=settings.clubs_dir,
            ready_dir=settings.ready_clubs_dir,
        )

    def club(self, name: str) -> FlowFile | None:
        """The club file ``name``, parsed (None when it is missing or invalid: the reason is
        in ``club_errors``)."""
        if name in self.clubs:
            return self.clubs[name]
        if name in self.club_errors:
            return None
        clubs_dir = self.clubs_dir if self.clubs_dir is not None else Path(CLUBS_DIR)
        path = club_path(clubs_dir, self.ready_dir, name)
        try:
            self.clubs[name] = load_flow_file(
                path, api_url=self.api_url, label=str(path), ready_dir=self.ready_dir
            )
        except TemplateError as exc:
            self.club_errors[name] = str(exc)
            return None
        return self.clubs[name]


# --------------------------------------------------------------------------- tokens file


def rewrite_tokens_file(path: Path, result: TokensResult) -> bool:
    """Replace plaintext (and old-key) values in tokens.json with their encrypted form,
    atomically and with mode 0600. Returns False (after a warning, or an error when plaintext
    stays on disk) when the file cannot be written, changed under us, or is a symbolic or hard
    link; the tokens are then kept encrypted in the database only. A file that gives a name
    twice is left as it is (rewriting it would keep one value silently)."""
    if result.raw is None or not any(t.rewrite for t in result.tokens.values()):
        return True
    if result.repeated:
        return False
    try:
        current = json.loads(result.raw.decode("utf-8-sig"))
        plain = [
            name
            for name, token in result.tokens.items()
            if token.rewrite and not utils.looks_like_fernet(str(current.get(name, "")).strip())
        ]
        refusal = _linked(path, plain)
        if refusal is not None:
            (logger.error if plain else logger.warning)("%s", refusal)
            return False
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o222:
            # Made read-only on purpose (chmod 444): a rename could replace it all the same,
            # since that needs only the directory writable (and root passes every check).
            raise PermissionError(
                errno.EACCES, f"the file is read-only, mode {mode:04o}", str(path)
            )
        for name, token in result.tokens.items():
            if token.rewrite and token.encrypted is not None:
                current[name] = token.encrypted
        payload = (json.dumps(current, indent=2) + "\n").encode()
        if not _replace_private(path, payload, result.raw):
            # Edited since we read it: leave it; the next load encrypts what it holds.
            logger.info("%s changed while being encrypted; left for the next load", path.name)
            return False
        result.written = payload
    except OSError as exc:
        logger.warning(
            "%s: cannot rewrite it with encrypted tokens (%s); the tokens are kept encrypted "
            "in the database only: make the file writable, or put encrypted values in it "
            "(`python main.py encrypt-token`)",
            path.name,
            exc.strerror or exc.__class__.__name__,
        )
        return False
    rotated = [n for n, t in result.tokens.items() if t.rewrite and n not in plain]
    done = [f"plaintext token(s) {_names(plain)} encrypted"] if plain else []
    done += [f"token(s) {_names(rotated)} re-encrypted under the first key"] if rotated else []
    logger.info("%s: %s in place", path.name, "; ".join(done))
    return True


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _linked(path: Path, plain: list[str]) -> str | None:
    """Why tokens.json is not rewritten when it is a symbolic link or has hard links (None when
    it is a plain file). A rename would replace the link and leave the old content, plaintext
    included, in the file it pointed to (or under its other names); writing through a link
    would write outside DATA_DIR, into a file some other tool owns. So neither is done."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        target = path.resolve()
        what = (
            f"is a symbolic link to {target}: not rewritten (courtbot never writes through a link)"
        )
    elif info.st_nlink > 1:
        target = path
        what = (
            f"has {info.st_nlink} hard links: not rewritten (the other names would keep the old "
            "content)"
        )
    else:
        return None
    if not plain:
        return f"{path.name} {what}; its tokens under an older FERNET_KEY stay as they are there"
    mode = stat.S_IMODE(target.stat().st_mode)
    exposed = f", readable by others (mode {mode:04o})" if mode & 0o077 else ""
    return (
        f"{path.name} {what}, so plaintext token(s) {_names(plain)} stay in {target}{exposed}; "
        "they are kept encrypted in the database only: put encrypted values in that file "
        f"(`python main.py encrypt-token`), or make {path.name} a regular file"
    )


def _replace_private(path: Path, payload: bytes, expected: bytes) -> bool:
    """Write ``payload`` over ``path`` atomically with mode 0600, unless ``path`` no longer
    holds ``expected`` (then False, nothing written)."""
    fd, tmp = tempfile.mkstemp(prefix=".tokens.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        if _read_bytes(path) != expected:
            return False
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True


def secure_file_mode(path: Path) -> None:
    """Make a file holding secrets or state readable by its owner only (best effort), keeping
    the owner's bits: a file made read-only stays read-only. A symbolic link is left alone:
    its target is not ours to change."""
    with contextlib.suppress(OSError):
        if path.exists() and not path.is_symlink() and path.stat().st_mode & 0o077:
            path.chmod(stat.S_IMODE(path.stat().st_mode) & 0o700)
