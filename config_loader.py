"""Settings and files: the environment, and ``schedules.json``/``tokens.json`` as validated entries.

``read_config`` turns ``schedules.json`` and ``tokens.json`` into frozen, typed entries and a list
of errors (file, entry, key, value, what was expected). It touches nothing and knows no tables:
``instances.reconcile`` applies the result to the database. A file that is unreadable as a whole
is rejected whole; an invalid entry is rejected alone. Each key of an entry has its own checker
(``_ENTRY_CHECKERS``); the request template is parsed by ``template``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from cryptography.fernet import MultiFernet

import utils
from template import RequestTemplate, Slot, TemplateError, parse_template

logger = logging.getLogger(__name__)

SCHEDULES_FILE = "schedules.json"
TOKENS_FILE = "tokens.json"
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
)
ONE_OFF = "one-off"
RECURRING = "recurring"
OUT_OF_RANGE = "holds a date out of range (years 1 to 9999 in UTC and in the entry's zone)"


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
    http_timeout: float
    reload_interval: float
    log_level: str
    log_file: Path | None
    template_path: Path | None
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @property
    def schedules_path(self) -> Path:
        return self.data_dir / SCHEDULES_FILE

    @property
    def tokens_path(self) -> Path:
        return self.data_dir / TOKENS_FILE

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
            window = utils.parse_window(env.get("BOOKING_WINDOW") or "168h")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
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
        return cls(
            fernet_keys=env.get("FERNET_KEY") or None,
            api_url=env.get("BOOKING_API_URL") or None,
            data_dir=data_dir,
            database_url=database_url,
            timezone=zone,
            window=window,
            retry_base=_number(env, "RETRY_BASE_SECONDS", 1.0, minimum=0.0),
            http_timeout=_number(env, "HTTP_TIMEOUT_SECONDS", 10.0, minimum=0.001),
            reload_interval=_number(env, "RELOAD_INTERVAL_SECONDS", 60.0, minimum=0.01),
            log_level=level,
            log_file=None if log_file_value == "-" else Path(log_file_value),
            template_path=template_path,
            env=dict(env),
        )


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a number of seconds") from None
    if not (minimum <= value < float("inf")):
        raise SettingsError(f"{name}: {raw!r} must be a finite number >= {minimum:g}")
    return value


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Planned:
    """One instance an entry asks for: its key, desired start and trigger (aware, UTC)."""

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
    #: The recurring expansion made while validating, and the ``now`` it was made for: a load
    #: validates and plans with the same ``now``, so the rule is expanded once per load.
    expansion: tuple[datetime, tuple[tuple[datetime, datetime], ...]] | None = field(
        default=None, repr=False, compare=False
    )

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
        return utils.expand_rule_walls(self.rule.rule, self.zone, now, limit)

    def starts(self, now: datetime, limit: int = utils.INSTANCES_PER_RULE) -> list[datetime]:
        """The aware starts of ``occurrences``."""
        return [moment for _, moment in self.occurrences(now, limit)]

    def slot(self, start: datetime) -> Slot:
        """What a request for this entry's instance at ``start`` is rendered from."""
        return Slot(
            key=utils.instance_key(self.id, start),
            start=start,
            duration_minutes=self.duration_minutes,
            zone=self.zone,
            courts=self.courts,
        )

    def plan(self, now: datetime, window: utils.Window) -> list[Planned]:
        """The instances this entry wants now: future starts only."""
        zone = self.zone
        return [
            Planned(
                key=utils.instance_key(self.id, start),
                desired=utils.as_utc(start),
                trigger=utils.trigger_time(start, zone, window),
            )
            for start in self.starts(now)
            if start > now
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


@dataclass(frozen=True)
class TokenValue:
    """A token of tokens.json: its value encrypted under the first key, or why it is unusable."""

    name: str
    encrypted: str | None
    error: str | None
    rewrite: bool  # the file must be rewritten for it (plaintext, or an old key)


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


@dataclass
class Config:
    """Both files, read and validated together."""

    schedules: SchedulesResult
    tokens: TokensResult
    digest: dict[str, str]  # by path, as read: see config_digest

    @property
    def errors(self) -> list[str]:
        found = list(self.tokens.errors)
        if self.tokens.file_error:
            found.insert(0, self.tokens.file_error)
        if self.schedules.file_error:
            found.append(self.schedules.file_error)
        return found + self.schedules.errors

    @property
    def warnings(self) -> list[str]:
        return self.tokens.warnings + self.schedules.warnings


def _read_bytes(path: Path) -> bytes | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    return data


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
    """Each config file's content digest, by path (to notice changes without reloading)."""
    paths = [settings.schedules_path, settings.tokens_path]
    if settings.template_path is not None:
        paths.append(settings.template_path)
    return {str(path): content_digest(_read_bytes(path)) for path in paths}


def read_config(
    settings: Settings,
    fernet: MultiFernet,
    now: datetime,
    *,
    known_tokens: Iterable[str] = (),
) -> Config:
    """Read and validate both files. ``known_tokens`` are the token names the database holds,
    used when tokens.json is rejected whole. Reads files only; writes nothing."""
    digest = config_digest(settings)
    tokens = read_tokens(settings.tokens_path, fernet)
    names = set(known_tokens) if tokens.file_error is not None else set(tokens.tokens)
    schedules = read_schedules(
        settings.schedules_path,
        default_zone=settings.timezone,
        token_names=names,
        now=now,
    )
    return Config(schedules=schedules, tokens=tokens, digest=digest)


def read_tokens(path: Path, fernet: MultiFernet) -> TokensResult:
    """Validate ``tokens.json`` (CONTRACT section 5) without writing anything."""
    name = path.name
    result = TokensResult()
    data = _read_bytes(path)
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
        if not isinstance(value, str) or not value.strip():
            # The type only: a value in the token's place may be the token itself.
            got = "an empty string" if isinstance(value, str) else _json_type(value).split(" (")[0]
            result.errors.append(f"{where}: expected the token as a non-empty string, got {got}")
            result.tokens[token_name] = TokenValue(
                token_name, None, f"{where} is not a string", False
            )
            continue
        if not _is_text(value):
            reason = (
                f"{where}: the value is not valid text (it holds an unpaired surrogate such as "
                "\\ud800); put the token in as it is"
            )
            result.errors.append(reason)
            result.tokens[token_name] = TokenValue(token_name, None, reason, False)
            continue
        value = value.strip()  # noqa: PLW2901 (surrounding blanks are no part of a token)
        plaintext = utils.decrypt_token(fernet, value)
        if plaintext is not None:
            if utils.encrypted_under_first_key(fernet, value):
                result.tokens[token_name] = TokenValue(token_name, value, None, False)
            else:
                # Key rotation: decrypts under an older key; re-encrypt under the first.
                reencrypted = fernet.encrypt(plaintext.encode()).decode()
                result.tokens[token_name] = TokenValue(token_name, reencrypted, None, True)
        elif utils.looks_like_fernet(value):
            reason = (
                f"{where}: the value is encrypted but no key in FERNET_KEY decrypts it "
                "(was it encrypted with another key?); re-encrypt it with "
                "`python main.py encrypt-token` or put the plaintext token in the file"
            )
            result.errors.append(reason)
            result.tokens[token_name] = TokenValue(token_name, None, reason, False)
        else:
            encrypted = fernet.encrypt(value.encode()).decode()
            result.tokens[token_name] = TokenValue(token_name, encrypted, None, True)
    return result


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
    path: Path, *, default_zone: str, token_names: set[str], now: datetime
) -> SchedulesResult:
    """Validate ``schedules.json`` (CONTRACT sections 3 and 4) without writing anything."""
    name = path.name
    result = SchedulesResult()
    data = _read_bytes(path)
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
    for index, raw in enumerate(parsed, start=1):
        entry, errors, warnings, entry_id = _validate_entry(
            raw, index, name, default_zone=default_zone, token_names=token_names, now=now
        )
        if entry_id is not None and entry_id in seen and not errors:
            explicit = isinstance(raw, dict) and "id" in raw
            where = _where(name, entry_id if explicit else None, index)
            if explicit:
                errors.append(
                    f"{where}: id: {entry_id!r} is already used by entry #{seen[entry_id]}; "
                    "ids must be unique"
                )
            else:
                errors.append(
                    f"{where}: id: this entry derives the same id ({entry_id!r}) as entry "
                    f"#{seen[entry_id]} (same type, desired_time, rrule and timezone); give both "
                    'an explicit "id"'
                )
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
    # An id both rejected (a duplicate) and valid stays valid for the earlier entry.
    result.rejected_ids -= {e.id for e in result.entries}
    return result


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
)


def _validate_entry(
    raw: Any,
    position: int,
    file_name: str,
    *,
    default_zone: str,
    token_names: set[str],
    now: datetime,
) -> tuple[Entry | None, list[str], list[str], str | None]:
    """Check one entry. Returns (entry or None, errors, warnings, its id if it can be told)."""
    if not isinstance(raw, dict):
        where = _where(file_name, None, position)
        return None, [f"{where}: expected an object, got {_json_type(raw)}"], [], None
    # An id given twice is no id: which entry this is cannot be told.
    id_ok = _id_ok(raw.get("id")) and "id" not in repeated_keys(raw)
    shown_id = raw.get("id") if id_ok else None
    check = _EntryCheck(raw, _where(file_name, shown_id, position), default_zone, token_names, now)
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
    fingerprint = hashlib.sha256(
        json.dumps([c.raw, c.zone_name], sort_keys=True, default=str).encode()
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
    )
    if c.rule is not None:
        # A rule that runs into year 9999 fails only while expanding: find out here, not in
        # reconcile.
        try:
            entry = dataclasses.replace(entry, expansion=(c.now, tuple(entry.occurrences(c.now))))
        except (ValueError, OverflowError):
            return None, f"{where}: rrule: {c.rule_text!r} {OUT_OF_RANGE}", warnings
    return entry, None, warnings


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


def load_template(settings: Settings) -> RequestTemplate | None:
    """Read and validate BOOKING_REQUEST_TEMPLATE (None when unset).

    Raises ``TemplateError`` naming the file and the key.
    """
    path = settings.template_path
    if path is None:
        return None
    name = f"BOOKING_REQUEST_TEMPLATE {path}"
    data = _read_bytes(path)
    if data is None:
        raise TemplateError(f"{name}: no such file")
    parsed, error = _decode_json(data, name)
    if error is not None:
        raise TemplateError(error.split(";")[0])
    return parse_template(parsed, api_url=settings.api_url, name=name)


# --------------------------------------------------------------------------- tokens file


def rewrite_tokens_file(path: Path, result: TokensResult) -> bool:
    """Replace plaintext (and old-key) values in tokens.json with their encrypted form,
    atomically and with mode 0600. Returns False (after a warning) when the file cannot be
    written or changed under us; the tokens are then kept encrypted in the database only. A file
    that gives a name twice is left as it is (rewriting it would keep one value silently)."""
    if result.raw is None or not any(t.rewrite for t in result.tokens.values()):
        return True
    if result.repeated:
        return False
    try:
        current = json.loads(result.raw.decode("utf-8-sig"))
        for name, token in result.tokens.items():
            if token.rewrite and token.encrypted is not None:
                current[name] = token.encrypted
        payload = (json.dumps(current, indent=2) + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=".tokens.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            if _read_bytes(path) != result.raw:
                # Edited since we read it: leave it; the next load encrypts what it holds.
                logger.info("%s changed while being encrypted; left for the next load", path.name)
                return False
            os.replace(tmp, path)
            result.written = payload
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        logger.warning(
            "%s: cannot rewrite it with encrypted tokens (%s); the tokens are kept encrypted "
            "in the database only: make the file writable, or put encrypted values in it "
            "(`python main.py encrypt-token`)",
            path.name,
            exc.strerror or exc.__class__.__name__,
        )
        return False
    logger.info("%s: plaintext tokens encrypted in place", path.name)
    return True


def secure_file_mode(path: Path) -> None:
    """Make a file holding secrets or state readable by its owner only (best effort)."""
    with contextlib.suppress(OSError):
        if path.exists() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
