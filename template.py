"""Club flows (CONTRACT sections 11 and 12): parsing and validation, placeholders, rendering,
answer matching, value extraction, and the masked description ``check`` and ``dry-run`` print.

Pure like ``utils``: no clock, no disk, no database, no network; the files are read by
``config_loader`` and the requests sent by ``bot``. A ``Flow`` is a sequence of ``Step``s with
exactly one booking step; the single-request template of section 11 (and section 6's own
request) is a flow of that one step, so one engine runs them all. Every string of a step is
compiled once, at parse time, into literal text and placeholder references (``Ref``), so a
placeholder that no earlier step extracts is an error of the file, never of a booking.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from zoneinfo import ZoneInfo

import utils

PLACEHOLDERS = (
    "token",
    "court_id",
    "start",
    "end",
    "start_utc",
    "end_utc",
    "date",
    "time",
    "end_time",
    "duration_minutes",
    "duration_seconds",
    "key",
    "epoch_ms",
    "epoch_s",
    "players",
    "start_minutes",
    "end_minutes",
    "start_seconds_of_day",
)
#: A placeholder only the ``cancel`` steps have (CONTRACT section 13): the instance's booking
#: reference.
CANCEL_PLACEHOLDERS = ("booking_ref",)
#: Time placeholders that take a ``strftime`` format (``{start:%m/%d/%Y}``): local time for
#: start and end, UTC for the ``_utc`` ones.
TIME_PLACEHOLDERS = ("start", "end", "start_utc", "end_utc")
TEMPLATE_KEYS = (
    "method",
    "url",
    "headers",
    "json",
    "form",
    "booked",
    "taken",
    "rejected",
    "early",
    "booking_ref",
    "idempotency_header",
    "window",
    "clock",
    "about",
    "sources",
    "checked",
    "cancel",
)
FLOW_KEYS = (
    "hosts",
    "window",
    "prepare_seconds",
    "clock",
    "steps",
    "about",
    "sources",
    "checked",
    "cancel",
)
#: The keys of ``clock`` (CONTRACT section 6, "The club's clock").
CLOCK_KEYS = ("url",)
STEP_KEYS = (
    "name",
    "method",
    "url",
    "headers",
    "json",
    "form",
    "ok",
    "extract",
    "at_trigger",
    "follow_redirects",
    "booking",
)
BOOKING_KEYS = ("booked", "taken", "rejected", "early", "booking_ref", "idempotency_header")
#: An ``at_trigger`` step's answers are read as the booking step's: it may say which are taken,
#: rejected or early, as the booking step does.
AT_TRIGGER_MATCHERS = ("taken", "rejected", "early")
#: Any other step may say which answers mean refused credentials (a club that answers a wrong
#: password with its own status, e.g. Perfect Gym's 499): matched, the booking fails at once.
PLAIN_MATCHERS = ("rejected",)
#: A club file ``checked`` longer ago than this is a warning at ``check`` (CONTRACT section 12).
STALE_AFTER_DAYS = 180
EXTRACT_FORMS = ("json", "header", "cookie", "regex", "url")
#: How a text value may be decoded once taken (``{"regex": "token=([^&']+)", "decode": "url"}``:
#: a value the club percent-encoded in a link, sent on as itself).
EXTRACT_DECODINGS = ("url",)
TEMPLATE_METHODS = ("POST", "PUT", "PATCH", "GET", "DELETE")
#: Matchers in the order they are tried (CONTRACT section 11: taken, rejected, booked; then early).
MATCHER_ORDER = ("taken", "rejected", "booked", "early")
DEFAULT_PREPARE_SECONDS = 60.0
MAX_PREPARE_SECONDS = 3600.0
#: The booking step of a single-request template (how it is named in messages about steps).
SINGLE_STEP_NAME = "book"

_PIECE_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_REF_RE = re.compile(
    r"(?P<name>[a-z_][a-z0-9_]*)(?:\[(?P<index>[0-9]{1,4})\])?(?:\.(?P<field>[A-Za-z_][A-Za-z0-9_]*))?(?::(?P<fmt>.+))?",
    re.DOTALL,
)
_STEP_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_VALUE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOST_ENTRY_RE = re.compile(r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?")
_FORMAT_PROBE = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)


class TemplateError(ValueError):
    """An invalid request template or flow; the message names the file, the step and the key."""


class MissingValue(LookupError):
    """A placeholder with no value when a step is rendered (a secret field the token lacks, a
    value its step did not extract). ``ref`` is the placeholder as written, e.g. ``secret.pin``."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref


class UnsendableHeader(ValueError):
    """A header whose rendered value no HTTP request can carry: a value put in it holds a line
    break or another control character, starts with a space, or goes beyond Latin-1. The
    message names the header and the placeholders in it, never a value."""

    def __init__(self, header: str, refs: Iterable[Ref]) -> None:
        names = ", ".join(dict.fromkeys(str(ref) for ref in refs)) or "its text"
        super().__init__(
            f"header {header!r} cannot carry the value of {names}: it holds a line break or "
            "another control character, starts with a space or goes beyond Latin-1"
        )
        self.header = header


def header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as a header value (None when it can): what requests and
    http.client refuse, or what would let a value start a header line of its own."""
    if re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
        return "holds a line break or another control character"
    if value[:1].isspace():
        return "starts with a space"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return "holds a character beyond Latin-1 (write it percent-encoded, or in the body)"
    return None


class ExtractError(ValueError):
    """A value that could not be taken from an answer; the message names the value and says
    what was missing, never a value."""


# --------------------------------------------------------------------------- placeholders


@dataclass(frozen=True)
class Ref:
    """One placeholder: ``{name}``, ``{name:format}``, ``{secret.field}``, ``{step.value}`` or
    ``{players[N]}`` (``index``: one player of the entry's list)."""

    name: str
    field: str | None = None
    fmt: str | None = None
    index: int | None = None

    @property
    def key(self) -> str:
        """Its key among the values of a rendering (``start``, ``secret.pin``, ``login.jwt``;
        ``players[1]`` reads the list ``players``)."""
        if self.index is not None:
            return f"{self.name}[{self.index}]"
        return self.name if self.field is None else f"{self.name}.{self.field}"

    def __str__(self) -> str:
        return "{" + self.key + (f":{self.fmt}" if self.fmt is not None else "") + "}"


@dataclass(frozen=True)
class Text:
    """A compiled string: literal pieces and placeholder references, in order."""

    pieces: tuple[str | Ref, ...]

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(p for p in self.pieces if isinstance(p, Ref))

    @property
    def single(self) -> Ref | None:
        """The reference when the string is exactly one placeholder (it keeps its JSON type)."""
        if len(self.pieces) == 1 and isinstance(self.pieces[0], Ref):
            return self.pieces[0]
        return None

    def source(self) -> str:
        """The string as written (braces doubled again)."""
        return "".join(
            str(p) if isinstance(p, Ref) else p.replace("{", "{{").replace("}", "}}")
            for p in self.pieces
        )


@dataclass(frozen=True)
class Scope:
    """What the strings of one step may name: the built-ins, secrets, and the values the steps
    before it extract (``earlier``); ``later`` holds the names of this step and the ones after
    it, for the message when one of them is named too soon."""

    earlier: Mapping[str, frozenset[str]] = field(default_factory=dict)
    later: frozenset[str] = frozenset()
    #: Built-ins of this kind of step only (``booking_ref`` in a ``cancel`` step).
    extra: frozenset[str] = frozenset()

    def check(self, ref: Ref, text: str, where: str) -> None:
        if ref.index is not None and (ref.name != "players" or ref.field or ref.fmt):
            raise TemplateError(
                f"{where}: {ref} in {text!r}: only {{players[N]}} takes an index (a player of "
                "the entry's players list, from 0)"
            )
        if ref.field is None:
            self._check_builtin(ref, text, where)
            return
        if ref.fmt is not None:
            raise TemplateError(
                f"{where}: {ref} in {text!r}: only {', '.join(TIME_PLACEHOLDERS)} take a format"
            )
        if ref.name == "secret":
            return
        if ref.name in self.earlier:
            values = self.earlier[ref.name]
            if ref.field not in values:
                have = ", ".join(sorted(values)) or "none"
                raise TemplateError(
                    f"{where}: {ref} in {text!r}: step {ref.name!r} extracts no value "
                    f"{ref.field!r} (it extracts: {have})"
                )
            return
        if ref.name in self.later:
            raise TemplateError(
                f"{where}: {ref} in {text!r}: step {ref.name!r} is used before it runs; a step "
                "can only use values that the steps before it extract"
            )
        raise TemplateError(
            f"{where}: unknown placeholder {ref} in {text!r}; {{<step>.<value>}} must name an "
            "earlier step and a value it extracts"
        )

    def _check_builtin(self, ref: Ref, text: str, where: str) -> None:
        if ref.name == "secret":
            raise TemplateError(
                f"{where}: {ref} in {text!r}: name a field of the token, e.g. {{secret.password}}"
            )
        if ref.name in self.earlier or ref.name in self.later:
            raise TemplateError(
                f"{where}: {ref} in {text!r}: name a value of step {ref.name!r}, e.g. "
                f"{{{ref.name}.id}}"
            )
        if ref.name in CANCEL_PLACEHOLDERS and ref.name not in self.extra:
            raise TemplateError(
                f'{where}: {ref} in {text!r}: only the steps of "cancel" know the booking '
                "reference; a booking step names it with booking_ref"
            )
        if ref.name not in PLACEHOLDERS and ref.name not in self.extra:
            raise TemplateError(
                f"{where}: unknown placeholder {ref} in {text!r}; known: "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + ", {secret.<field>}, {<step>.<value>}"
            )
        if ref.fmt is not None:
            if ref.name not in TIME_PLACEHOLDERS:
                raise TemplateError(
                    f"{where}: {ref} in {text!r}: only {', '.join(TIME_PLACEHOLDERS)} take a format"
                )
            try:
                _FORMAT_PROBE.strftime(ref.fmt)
            except ValueError as exc:
                raise TemplateError(
                    f"{where}: {ref} in {text!r}: not a strftime format ({exc})"
                ) from None


def compile_text(text: str, where: str, scope: Scope) -> Text:
    """Split a template string into literal text and checked placeholder references."""
    pieces: list[str | Ref] = []
    position = 0
    for match in _PIECE_RE.finditer(text):
        if match.start() > position:
            pieces.append(text[position : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(token[0])
        elif match.group(1) is None:
            raise TemplateError(
                f"{where}: unbalanced {token!r} in {text!r}; write {{{{ or }}}} for a literal brace"
            )
        else:
            parsed = _REF_RE.fullmatch(match.group(1))
            if parsed is None:
                raise TemplateError(
                    f"{where}: unknown placeholder {token} in {text!r}; known: "
                    + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                    + ", {secret.<field>}, {<step>.<value>}"
                )
            index = int(parsed["index"]) if parsed["index"] is not None else None
            ref = Ref(parsed["name"], parsed["field"], parsed["fmt"], index)
            scope.check(ref, text, where)
            pieces.append(ref)
        position = match.end()
    if position < len(text):
        pieces.append(text[position:])
    # Adjacent literals (a brace pair next to text) read as one piece.
    merged: list[str | Ref] = []
    for piece in pieces:
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    return Text(tuple(merged))


def _compile_value(value: Any, where: str, scope: Scope) -> Any:
    """A JSON body with every string compiled (lists stay lists, objects stay dicts)."""
    if isinstance(value, str):
        return compile_text(value, where, scope)
    if isinstance(value, list):
        return [
            _compile_value(item, f"{where}[{index}]", scope) for index, item in enumerate(value)
        ]
    if isinstance(value, dict):
        return {key: _compile_value(item, f"{where}.{key}", scope) for key, item in value.items()}
    return value


def _walk_refs(value: Any) -> Iterator[Ref]:
    if isinstance(value, Text):
        yield from value.refs
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk_refs(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_refs(item)
    elif isinstance(value, JsonPath):
        for part in value.parts:
            for _, condition in part.conditions:
                yield from condition.refs


class Masked(str):
    """A stand-in for a secret in printed output (``***``, ``<login.jwt>``): inserted as is,
    never percent-encoded, so a URL shows the mask and not ``%2A%2A%2A``."""

    __slots__ = ()


def as_text(value: Any) -> str:
    """How a value reads inside a string: text as is, null as nothing, true/false and numbers
    (and objects) as JSON writes them."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(value, separators=(",", ":"))


def _ref_value(ref: Ref, values: Mapping[str, Any]) -> Any:
    if ref.index is not None:
        players = values.get(ref.name)
        if isinstance(players, Masked):
            return players
        if not isinstance(players, list | tuple) or ref.index >= len(players):
            raise MissingValue(ref.key)
        return players[ref.index]
    if ref.fmt is not None:
        moment = values.get(f"{ref.name}:")
        if isinstance(moment, Masked) or moment is None:
            return values.get(ref.key)
        return moment.strftime(ref.fmt)
    if ref.key not in values:
        raise MissingValue(ref.key)
    return values[ref.key]


def render_text(text: Text, values: Mapping[str, Any], *, encode: bool = False) -> str:
    """The string with its placeholders' values (percent-encoded with ``encode``, for a URL).
    Raises ``MissingValue`` for a placeholder with no value."""
    out: list[str] = []
    for piece in text.pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        value = _ref_value(piece, values)
        # The players inside a longer string: their names, not a JSON list (CONTRACT 13).
        if piece.name == "players" and piece.index is None and isinstance(value, list | tuple):
            shown = ", ".join(as_text(item) for item in value)
        else:
            shown = as_text(value)
        out.append(quote(shown, safe="") if encode and not isinstance(value, Masked) else shown)
    return "".join(out)


def render_value(value: Any, values: Mapping[str, Any]) -> Any:
    """A compiled JSON body rendered; a string that is exactly one placeholder takes the value's
    own JSON type (an extracted JSON value included)."""
    if isinstance(value, Text):
        single = value.single
        if single is not None and single.fmt is None:
            value = _ref_value(single, values)
            return list(value) if isinstance(value, tuple) else value
        return render_text(value, values)
    if isinstance(value, list):
        return [render_value(item, values) for item in value]
    if isinstance(value, dict):
        return {key: render_value(item, values) for key, item in value.items()}
    return value


# --------------------------------------------------------------------------- json paths


@dataclass(frozen=True)
class PathPart:
    """One step of a JSON path: a key, a list index, or filters that keep a list's first
    element whose fields equal the values (``[court=3][start={time}]``, compared as text)."""

    kind: str  # "key", "index" or "filter"
    name: str = ""
    index: int = 0
    conditions: tuple[tuple[str, Text], ...] = ()

    def source(self) -> str:
        if self.kind == "key":
            return self.name
        if self.kind == "index":
            return f"[{self.index}]"
        return "".join(f"[{name}={value.source()}]" for name, value in self.conditions)


@dataclass(frozen=True)
class JsonPath:
    """A dotted path into a JSON document: ``a.b[0].c``, ``slots[court={court_id}].id``."""

    text: str
    parts: tuple[PathPart, ...]

    def find(self, document: Any, values: Mapping[str, Any]) -> Any:
        """The value at the path. Raises ``ExtractError`` saying where the path broke off (the
        path as written, never the document's or a filter's value)."""
        node = document
        walked = ""
        for part in self.parts:
            node = _step_into(node, part, values, walked or "the answer")
            walked += part.source() if part.kind != "key" or not walked else "." + part.source()
        return node


def _step_into(node: Any, part: PathPart, values: Mapping[str, Any], walked: str) -> Any:
    if part.kind == "key":
        if isinstance(node, dict) and part.name in node:
            return node[part.name]
        if isinstance(node, list) and part.name.isdigit() and int(part.name) < len(node):
            return node[int(part.name)]
        raise ExtractError(f"no {part.name!r} in {walked}")
    if not isinstance(node, list):
        raise ExtractError(f"{walked} is not a list")
    if part.kind == "index":
        if part.index < len(node):
            return node[part.index]
        raise ExtractError(f"{walked} has no element [{part.index}] (it has {len(node)})")
    wanted = [(name, render_text(value, values)) for name, value in part.conditions]
    for item in node:
        if all(_field_text(item, name) == text for name, text in wanted):
            return item
    raise ExtractError(f"no element of {walked} matches {part.source()}")


def _field_text(item: Any, name: str) -> str | None:
    """The text of a list element's field for a filter; ``name`` may be a dotted path into the
    element (``starts_at.format_24_hour``). None when the element has no such field."""
    node = item
    for key in name.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return as_text(node)


def _split_path(text: str, where: str) -> list[str]:
    """The path's segments, split at dots outside brackets and placeholders."""
    segments: list[str] = []
    current: list[str] = []
    depth = braces = 0
    for char in text:
        if char == "{":
            braces += 1
        elif char == "}":
            braces = max(braces - 1, 0)
        elif char == "[" and not braces:
            depth += 1
        elif char == "]" and not braces:
            depth -= 1
            if depth < 0:
                raise TemplateError(f"{where}: unbalanced ']' in {text!r}")
        if char == "." and not depth and not braces:
            segments.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise TemplateError(f"{where}: unbalanced '[' in {text!r}")
    segments.append("".join(current))
    return segments


_SEGMENT_RE = re.compile(r"(?P<name>[^\[\]]*)(?P<rest>(?:\[.*\])?)", re.DOTALL)


def _brackets(rest: str, text: str, where: str) -> list[str]:
    """The contents of ``[...][...]`` (a ``]`` inside a placeholder does not close one)."""
    found: list[str] = []
    position = 0
    while position < len(rest):
        if rest[position] != "[":
            raise TemplateError(f"{where}: {text!r}: expected '[' at {rest[position:]!r}")
        braces = 0
        end = position + 1
        while end < len(rest) and (rest[end] != "]" or braces):
            braces += {"{": 1, "}": -1}.get(rest[end], 0)
            end += 1
        found.append(rest[position + 1 : end])
        position = end + 1
    return found


def parse_path(text: Any, where: str, scope: Scope) -> JsonPath:
    """Parse a JSON path (``a.b[0].c``, ``list[field=value]``, ``data.items.0.id``)."""
    example = "e.g. 'data.id', 'items[0].id' or 'slots[court={court_id}].id'"
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"{where}: expected a JSON path, {example}")
    parts: list[PathPart] = []
    for number, segment in enumerate(_split_path(text, where)):
        match = _SEGMENT_RE.fullmatch(segment)
        if match is None or (not match["name"] and (number or not match["rest"])):
            raise TemplateError(f"{where}: {text!r} is not a JSON path ({example})")
        if match["name"]:
            if match["name"].strip() != match["name"] or "{" in match["name"]:
                raise TemplateError(f"{where}: {text!r}: bad key {match['name']!r} ({example})")
            parts.append(PathPart("key", name=match["name"]))
        for inner in _brackets(match["rest"], text, where):
            part = _bracket_part(inner, text, where, scope)
            if part.kind == "filter" and parts and parts[-1].kind == "filter":
                # Filters that follow each other keep the first element matching them all.
                part = PathPart("filter", conditions=parts.pop().conditions + part.conditions)
            parts.append(part)
    return JsonPath(text, tuple(parts))


def _bracket_part(inner: str, text: str, where: str, scope: Scope) -> PathPart:
    if re.fullmatch(r"\d+", inner):
        return PathPart("index", index=int(inner))
    name, equals, value = inner.partition("=")
    if not equals or not name or not re.fullmatch(r"[^\s{}=]+", name):
        raise TemplateError(
            f"{where}: {text!r}: [{inner}] is neither an index [N] nor a filter [field=value]"
        )
    if "" in name.split("."):
        raise TemplateError(
            f"{where}: {text!r}: [{inner}]: the field {name!r} has an empty part; a filter's "
            "field is a key or a dotted path into the element (starts_at.format_24_hour)"
        )
    return PathPart("filter", conditions=((name, compile_text(value, where, scope)),))


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Matcher:
    """Answers with one of ``statuses`` and, if given, one of ``body_contains`` in the raw body."""

    statuses: tuple[int, ...]
    body_contains: tuple[str, ...] = ()

    def matches(self, status: int, body: bytes) -> bool:
        if status not in self.statuses:
            return False
        return not self.body_contains or self.found(body) is not None

    def found(self, body: bytes) -> str | None:
        """The first of ``body_contains`` (the flow's own words) that the body holds."""
        text = body.decode("utf-8", errors="replace")
        return next((part for part in self.body_contains if part in text), None)


@dataclass(frozen=True)
class Reply:
    """What extraction reads from one step's answer: status, headers (any case), the body as
    read, the final URL (after redirects) and the cookies the answer set."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    cookies: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None

    def json(self) -> Any:
        try:
            return utils.load_json(self.body.decode("utf-8"))
        except utils.JsonTooDeep as exc:
            raise ExtractError(f"the answer is not JSON that can be read ({exc})") from None
        except (UnicodeDecodeError, ValueError):
            raise ExtractError("the answer is not JSON") from None


@dataclass(frozen=True)
class Extraction:
    """One named value a step takes from its answer."""

    name: str
    kind: str  # one of EXTRACT_FORMS
    source: str
    path: JsonPath | None = None
    pattern: re.Pattern[str] | None = None
    #: One of EXTRACT_DECODINGS, applied to a text value once taken (None: as found).
    decode: str | None = None

    def describe(self) -> str:
        decoded = f", {self.decode}-decoded" if self.decode else ""
        return f"{self.name} ({self.kind} {self.source}{decoded})"

    def take(self, reply: Reply, values: Mapping[str, Any]) -> Any:
        """The value, or ``ExtractError`` saying what was missing."""
        try:
            found = self._take(reply, values)
            return unquote(found) if self.decode == "url" else found
        except ExtractError as exc:
            raise ExtractError(
                f"value {self.name!r} ({self.kind} {self.source!r}): {exc}"
            ) from None

    def _take(self, reply: Reply, values: Mapping[str, Any]) -> Any:
        if self.kind == "json":
            assert self.path is not None
            found = self.path.find(reply.json(), values)
            if found is None:
                raise ExtractError("it is null")
            return found
        if self.kind == "header":
            header = reply.header(self.source)
            if header is None:
                raise ExtractError("the answer has no such header")
            return header
        if self.kind == "cookie":
            if self.source not in reply.cookies:
                raise ExtractError("the answer set no such cookie")
            return reply.cookies[self.source]
        assert self.pattern is not None
        haystack = (
            reply.body.decode("utf-8", errors="replace") if self.kind == "regex" else reply.url
        )
        match = self.pattern.search(haystack)
        if match is None or match.group(1) is None:
            where = "the answer's body" if self.kind == "regex" else "the final URL"
            raise ExtractError(f"no match in {where}")
        return match.group(1)


def extract_values(
    step: Step, reply: Reply, values: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Every value ``step`` extracts from ``reply``, keyed ``<step>.<value>``, and the problems
    (one line per value that could not be taken)."""
    found: dict[str, Any] = {}
    problems: list[str] = []
    for extraction in step.extract:
        try:
            found[f"{step.name}.{extraction.name}"] = extraction.take(reply, values)
        except (ExtractError, MissingValue) as exc:
            problems.append(
                f"a filter's placeholder {{{exc.ref}}} has no value"
                if isinstance(exc, MissingValue)
                else str(exc)
            )
    return found, problems


# --------------------------------------------------------------------------- steps and flows


@dataclass(frozen=True)
class RenderedRequest:
    """A rendered request: method, URL, headers and the body bytes (None for no body)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


@dataclass(frozen=True)
class Step:
    """One request of a flow, compiled."""

    name: str
    method: str
    url: Text
    headers: tuple[tuple[str, Text], ...]
    body_kind: str | None  # "json", "form" or None
    body: Any
    #: The ``ok`` matcher of a step that is not the booking step (None: any 2xx).
    ok: Matcher | None = None
    #: Named matchers in MATCHER_ORDER: the booking step's, and an at_trigger step's.
    matchers: tuple[tuple[str, Matcher], ...] = ()
    extract: tuple[Extraction, ...] = ()
    booking: bool = False
    at_trigger: bool = False
    follow_redirects: bool = False
    #: Where the booking reference is: a JSON path (section 11), or any extraction form.
    booking_ref: Extraction | None = None
    idempotency_header: str | None = None
    #: It uses {court_id}, or a value of a step that does: it runs once per court.
    per_court: bool = False
    #: The names of the steps whose values it uses.
    uses: frozenset[str] = frozenset()

    #: When it runs: ``prepare``, ``at_trigger``, ``booking`` or ``finish``.
    phase: str = "prepare"

    def sent_refs(self) -> Iterator[Ref]:
        """Every placeholder in what it sends: URL, headers, body."""
        yield from self.url.refs
        for _, value in self.headers:
            yield from value.refs
        yield from _walk_refs(self.body)

    def all_refs(self) -> Iterator[Ref]:
        """Every placeholder it names: what it sends, its extraction filters, its booking_ref."""
        yield from self.sent_refs()
        for extraction in self.extract:
            if extraction.path is not None:
                yield from _walk_refs(extraction.path)
        if self.booking_ref is not None and self.booking_ref.path is not None:
            yield from _walk_refs(self.booking_ref.path)

    def match(self, status: int, body: bytes) -> str | None:
        """The first named matcher that fits the answer (taken, rejected, booked, early)."""
        for name, matcher in self.matchers:
            if matcher.matches(status, body):
                return name
        return None

    def is_ok(self, status: int, body: bytes) -> bool:
        """Whether a step other than the booking step succeeded: ``ok``, else any 2xx."""
        if self.ok is not None:
            return self.ok.matches(status, body)
        return 200 <= status < 300

    def has_matcher(self, name: str) -> bool:
        return any(kind == name for kind, _ in self.matchers)

    @property
    def wants_json(self) -> bool:
        """Whether it reads its answer as JSON (a ``json`` extraction)."""
        return any(extraction.kind == "json" for extraction in self.extract)

    def matched_words(self, name: str, body: bytes) -> str | None:
        """The ``body_contains`` words by which matcher ``name`` (or ``ok``) read the body."""
        matcher = self.ok if name == "ok" else dict(self.matchers).get(name)
        return matcher.found(body) if matcher is not None and matcher.body_contains else None

    def render(self, values: Mapping[str, Any], idempotency: str | None = None) -> RenderedRequest:
        """The request with ``values`` (from ``placeholder_values`` plus extracted values, keyed
        ``<step>.<value>``); the booking step also carries ``idempotency`` in its idempotency
        header. Raises ``MissingValue`` for a placeholder with no value, ``UnsendableHeader``
        for a header that a value made unsendable (a line break in an extracted value)."""
        url = render_text(self.url, values, encode=True)
        headers = {name: render_text(value, values) for name, value in self.headers}
        for name, value in self.headers:
            if header_value_problem(headers[name]) is not None:
                raise UnsendableHeader(name, value.refs)
        body: bytes | None = None
        if self.body_kind == "json":
            body = json.dumps(render_value(self.body, values)).encode()
            headers.setdefault("Content-Type", "application/json")
        elif self.body_kind == "form":
            fields = {
                key: render_text(value, values) if isinstance(value, Text) else value
                for key, value in self.body.items()
            }
            body = urlencode(fields).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if self.booking and self.idempotency_header and idempotency is not None:
            headers[self.idempotency_header] = idempotency
        return RenderedRequest(self.method, url, headers, body)

    def ref_of(self, reply: Reply, values: Mapping[str, Any]) -> str | None:
        """The booking reference in the booking's answer: what ``booking_ref`` extracts (a JSON
        path, or a header, cookie, regex or url extraction for answers that are not JSON), else
        ``id`` or ``booking_id`` of a JSON answer; as text, None when absent."""
        try:
            if self.booking_ref is None:
                document = reply.json()
                for name in ("id", "booking_id"):
                    found = document.get(name) if isinstance(document, dict) else None
                    if isinstance(found, str | int) and not isinstance(found, bool):
                        return str(found)
                return None
            node = self.booking_ref.take(reply, values)
        except (ExtractError, MissingValue):
            return None
        if node is None or isinstance(node, dict | list | bool):
            return None
        return str(node)


@dataclass(frozen=True)
class Flow:
    """A validated club flow (CONTRACT section 12), or a single-request template (section 11)
    as a flow of its one booking step."""

    name: str
    hosts: tuple[str, ...]
    steps: tuple[Step, ...]
    #: The club's own opening rule as written (``BOOKING_WINDOW``'s forms), None when not given.
    window: str | None = None
    #: How long before the trigger the preparation steps run (0 when there are none).
    prepare_seconds: float = 0.0
    about: str | None = None
    #: Every step names its URL (BOOKING_API_URL is not needed for it).
    has_url: bool = True
    #: ``clock.url``: a harmless GET on ``hosts`` whose answer's ``Date`` is the club's clock,
    #: measured within ``prepare_seconds`` before each trigger; None: our clock is used.
    clock_url: str | None = None
    #: Where the flow's calls were read (public client code, API documentation).
    sources: tuple[str, ...] = ()
    #: When the flow was last checked against the live system or its sources.
    checked: date | None = None
    #: The steps that cancel a booking (CONTRACT section 13), in order; () when the file has
    #: no ``cancel``.
    cancel: tuple[Step, ...] = ()

    @property
    def booking_step(self) -> Step:
        return next(step for step in self.steps if step.booking)

    def phase(self, name: str) -> tuple[Step, ...]:
        """The steps of one phase, in order: prepare, at_trigger, booking or finish."""
        return tuple(step for step in self.steps if step.phase == name)

    @property
    def single(self) -> bool:
        """A flow of the booking step alone (section 6's request or a section-11 template)."""
        return len(self.steps) == 1

    @property
    def secret_fields(self) -> frozenset[str]:
        """The fields of the token that the flow names as ``{secret.<field>}``."""
        return frozenset(
            ref.field
            for step in self.steps
            for ref in step.all_refs()
            if ref.name == "secret" and ref.field
        )

    @property
    def uses_token(self) -> bool:
        return any(ref.key == "token" for step in self.steps for ref in step.all_refs())

    @property
    def players_needed(self) -> int:
        """How many players an entry needs for the highest ``{players[N]}`` any step (booking
        or cancel) names: N + 1, 0 when none is named."""
        return max(
            (
                ref.index + 1
                for step in self.steps + self.cancel
                for ref in step.all_refs()
                if ref.index is not None
            ),
            default=0,
        )

    def allows(self, url: str) -> bool:
        """Whether ``url``'s host is on ``hosts`` (a host without a port matches any port)."""
        return host_allowed(self.hosts, url)


class _MaskAll(dict[str, Any]):
    """Values for a rendering that only needs the literal parts (a URL's host)."""

    def __missing__(self, key: str) -> Masked:
        return Masked("x")

    def get(self, key: str, default: Any = None) -> Any:
        return self[key]

    def __contains__(self, key: object) -> bool:
        return True


def split_host(entry: str) -> tuple[str, int | None] | None:
    """A ``hosts`` entry as (host, port or None); None when it is not one."""
    match = _HOST_ENTRY_RE.fullmatch(entry.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    return match["host"].strip("[]").lower(), port


def host_allowed(hosts: Iterable[str], url: str) -> bool:
    """Whether ``url`` is http(s) on one of ``hosts``: ``host`` matches any port, ``host:port``
    only that one (an absent port is the scheme's default)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host = parts.hostname.lower()
    for entry in hosts:
        split = split_host(entry)
        if split is not None and split[0] == host and split[1] in (None, port):
            return True
    return False


# --------------------------------------------------------------------------- values


def placeholder_values(
    *,
    secrets: Mapping[str, str],
    court_id: str | None,
    start: datetime,
    duration_minutes: int,
    zone: ZoneInfo,
    key: str,
    players: Iterable[str] = (),
) -> dict[str, Any]:
    """The values of every built-in placeholder for one instance and court, and of its secrets:
    ``{token}`` and ``{secret.<field>}`` from ``secrets`` (a string token is ``{"token": value}``;
    an object token is its fields, ``{token}`` its ``token`` field). The keys ending in ``:``
    hold the instants that formatted time placeholders are written from."""
    # In UTC: a booking lasts its minutes of real time (arithmetic on a zone's aware datetime
    # is wall-clock arithmetic, an hour off when a DST change falls inside the booking).
    start = utils.as_utc(start)
    end = start + timedelta(minutes=duration_minutes)
    local_start = start.astimezone(zone)
    local_end = end.astimezone(zone)
    values: dict[str, Any] = {
        "court_id": court_id,
        "start": utils.format_offset(start, zone),
        "end": utils.format_offset(end, zone),
        "start_utc": utils.format_utc(start),
        "end_utc": utils.format_utc(end),
        "date": local_start.strftime("%Y-%m-%d"),
        "time": local_start.strftime("%H:%M"),
        "end_time": local_end.strftime("%H:%M"),
        "duration_minutes": duration_minutes,
        "duration_seconds": duration_minutes * 60,
        "key": key,
        "epoch_ms": int(utils.as_utc(start).timestamp() * 1000),
        "epoch_s": int(utils.as_utc(start).timestamp()),
        "players": list(players),
        **_day_offsets(local_start, local_end),
        "start:": local_start,
        "end:": local_end,
        "start_utc:": utils.as_utc(start),
        "end_utc:": utils.as_utc(end),
    }
    if "token" in secrets:
        values["token"] = secrets["token"]
    for name, value in secrets.items():
        values[f"secret.{name}"] = value
    return values


def _day_offsets(local_start: datetime, local_end: datetime) -> dict[str, int]:
    """``{start_minutes}``, ``{end_minutes}`` and ``{start_seconds_of_day}``: the wall-clock
    time after local midnight of the start's local date (an end on the next day counts on past
    1440, as clubs that count a booking's end in minutes do)."""
    days = (local_end.date() - local_start.date()).days
    return {
        "start_minutes": local_start.hour * 60 + local_start.minute,
        "end_minutes": days * 1440 + local_end.hour * 60 + local_end.minute,
        "start_seconds_of_day": local_start.hour * 3600
        + local_start.minute * 60
        + local_start.second,
    }


def idempotency_key(key: str, court: str | None, several: bool) -> str:
    """The Idempotency-Key of an instance ``key``: with ``#<court>`` when several courts are
    listed (each court is its own booking attempt). A court's characters beyond ASCII are
    percent-encoded (UTF-8): a header carries ASCII only (Latin-1 at most)."""
    if not several:
        return key
    return f"{key}#{quote(court, safe=_PRINTABLE_ASCII) if court is not None else ''}"


#: What a court keeps as it is in an Idempotency-Key: printable ASCII, ``%`` included.
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))


@dataclass(frozen=True)
class Slot:
    """What a request is rendered for: one instance (its key, start, length, zone) and the
    courts its entry lists, tried in order."""

    key: str
    start: datetime
    duration_minutes: int
    zone: ZoneInfo
    courts: tuple[str | None, ...]
    #: The entry's ``players`` (CONTRACT section 13).
    players: tuple[str, ...] = ()
    #: The Idempotency-Key's base when it is not the instance key: a fallback time's
    #: (``<key>@HH:MM``) or a watch's try (``<key>~watch<N>``), so that a club that remembers
    #: keys answers anew.
    idempotency_base: str | None = None

    def values(self, secrets: Mapping[str, str], court: str | None) -> dict[str, Any]:
        """``placeholder_values`` for this instance and ``court``."""
        return placeholder_values(
            secrets=secrets,
            court_id=court,
            start=self.start,
            duration_minutes=self.duration_minutes,
            zone=self.zone,
            key=self.key,
            players=self.players,
        )

    def idempotency(self, court: str | None) -> str:
        base = self.idempotency_base if self.idempotency_base is not None else self.key
        return idempotency_key(base, court, len(self.courts) > 1)


# --------------------------------------------------------------------------- describing


def masked_values(flow: Flow, slot: Slot, court: str | None) -> dict[str, Any]:
    """Values for a rendering a person may read: the instance's own values, ``***`` for the
    token and every secret field, ``<step.value>`` for every extracted value."""
    secrets = {name: Masked(utils.MASK) for name in flow.secret_fields}
    values = slot.values(secrets, court)
    values["token"] = Masked(utils.MASK)
    for step in flow.steps:
        for extraction in step.extract:
            ref = f"{step.name}.{extraction.name}"
            values[ref] = Masked(f"<{ref}>")
    return values


def describe_request(request: RenderedRequest) -> list[str]:
    """A rendered request as lines for a person (render it with masked values)."""
    lines = [f"{request.method} {request.url}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    if request.body is not None:
        text = request.body.decode()
        if request.headers.get("Content-Type") == "application/x-www-form-urlencoded":
            # Decoded, so that a mask reads as *** and not %2A%2A%2A.
            text = "&".join(f"{k}={v}" for k, v in parse_qsl(text, keep_blank_values=True))
        lines.append(text)
    return lines


def describe_booking(flow: Flow, slot: Slot, court: str | None) -> str:
    """The booking step's request for ``court``, secrets masked (what ``dry-run`` prints)."""
    values = masked_values(flow, slot, court)
    step = flow.booking_step
    return "\n".join(describe_request(step.render(values, slot.idempotency(court))))


_PHASE_WORDS = {
    "prepare": "preparation, {seconds:g} s before the trigger",
    "at_trigger": "at the trigger",
    "booking": "the booking, at the trigger",
    "finish": "after the booking",
    "cancel": "on `cancel KEY`",
}


def describe_flow(flow: Flow, slot: Slot) -> str:
    """What ``check`` prints for an entry's next instance (first court of a list), secrets
    masked: the token and secret fields as ``***``, extracted values as ``<step.value>``. A
    one-step flow is its one request; a flow lists every step with its phase and values."""
    court = slot.courts[0]
    values = masked_values(flow, slot, court)
    clock = (
        [
            f"clock: GET {flow.clock_url} within {flow.prepare_seconds:g} s before the trigger "
            "(the booking is sent by the club's clock)"
        ]
        if flow.clock_url is not None
        else []
    )
    if flow.single:
        step = flow.booking_step
        return "\n".join(describe_request(step.render(values, slot.idempotency(court))) + clock)
    lines = [
        f"hosts: {', '.join(flow.hosts)}"
        + (f"; window {flow.window}" if flow.window else "")
        + (
            f"; prepares {flow.prepare_seconds:g} s before the trigger"
            if flow.phase("prepare")
            else ""
        ),
        *clock,
    ]
    for step in flow.steps:
        phase = _PHASE_WORDS[step.phase].format(seconds=flow.prepare_seconds)
        per_court = (
            ", once per court" if step.per_court and step.phase in ("prepare", "at_trigger") else ""
        )
        lines.append(f"step {step.name} ({phase}{per_court}):")
        request = step.render(values, slot.idempotency(court))
        lines += ["  " + line for line in describe_request(request)]
        if step.extract:
            lines.append("  extracts: " + ", ".join(e.describe() for e in step.extract))
    return "\n".join(lines)


# --------------------------------------------------------------------------- parsing


def _matcher(value: Any, where: str) -> Matcher:
    if not isinstance(value, dict):
        raise TemplateError(f'{where}: expected an object like {{"status": [409]}}')
    unknown = set(value) - {"status", "body_contains"}
    if unknown:
        raise TemplateError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; expected status, body_contains"
        )
    statuses = value.get("status")
    if (
        not isinstance(statuses, list)
        or not statuses
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in statuses
        )
    ):
        raise TemplateError(
            f"{where}.status: expected a non-empty list of HTTP statuses, e.g. [200, 201]"
        )
    contains = value.get("body_contains")
    if contains is None:
        return Matcher(tuple(statuses))
    parts = [contains] if isinstance(contains, str) else contains
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise TemplateError(
            f"{where}.body_contains: expected a non-empty string or a list of them (any may "
            'appear), e.g. "not available" or ["taken", "not available"]'
        )
    return Matcher(tuple(statuses), tuple(parts))


def _url(data: dict[str, Any], where: str, api_url: str | None, scope: Scope) -> Text:
    url = data.get("url", api_url)
    if url is None:
        raise TemplateError(f"{where}url: missing, and BOOKING_API_URL is not set either")
    if not isinstance(url, str):
        raise TemplateError(f"{where}url: expected a string, got {url!r}")
    text = compile_text(url, f"{where}url", scope)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TemplateError(f"{where}url: {url!r} is not an http(s) URL")
    if "{" in parts.scheme + parts.netloc or "}" in parts.netloc:
        raise TemplateError(
            f"{where}url: a placeholder may not stand in the scheme or host ({url!r}): the "
            "token must only ever go to fixed hosts"
        )
    if "@" in parts.netloc:
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise TemplateError(
            f"{where}url: {shown!r} holds a user or password (user:password@host): credentials "
            "go in tokens.json, and a step sends them as {token} or {secret.<field>}"
        )
    if not re.fullmatch(r"[A-Za-z0-9._:-]+", parts.hostname or "-"):
        raise TemplateError(f"{where}url: {url!r} does not name a plain host")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise TemplateError(f"{where}url: {url!r} has an invalid port") from None
    return text


def _request_parts(data: dict[str, Any], where: str, scope: Scope) -> dict[str, Any]:
    """Method, headers and body of a step or template."""
    method = data.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in TEMPLATE_METHODS:
        raise TemplateError(
            f"{where}method: {method!r} is not one of {', '.join(TEMPLATE_METHODS)}"
        )
    headers = data.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in headers.items()
    ):
        raise TemplateError(
            f'{where}headers: expected an object of strings, e.g. {{"Accept": "application/json"}}'
        )
    for header, value in headers.items():
        if not _HEADER_RE.fullmatch(header):
            raise TemplateError(
                f"{where}headers: {header!r} is not a header name (letters, digits and "
                "!#$%&'*+-.^_`|~; no spaces, no placeholders)"
            )
        problem = header_value_problem(value)
        if problem is not None:
            raise TemplateError(f"{where}headers.{header}: {value!r} {problem}")
    compiled_headers = tuple(
        (header, compile_text(value, f"{where}headers.{header}", scope))
        for header, value in headers.items()
    )
    if "json" in data and "form" in data:
        raise TemplateError(f"{where}json, form: give one body, not both")
    body_kind: str | None = None
    body: Any = None
    if "json" in data:
        body_kind, body = "json", _compile_value(data["json"], f"{where}json", scope)
    elif "form" in data:
        form = data["form"]
        if not isinstance(form, dict) or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in form.values()
        ):
            raise TemplateError(f"{where}form: expected an object of strings or numbers")
        body_kind, body = "form", _compile_value(form, f"{where}form", scope)
    return {
        "method": method.upper(),
        "headers": compiled_headers,
        "body_kind": body_kind,
        "body": body,
    }


def _booking_parts(data: dict[str, Any], where: str, scope: Scope) -> dict[str, Any]:
    """The booking step's own keys: matchers, booking_ref, idempotency_header."""
    ref = data.get("booking_ref")
    idem = data.get("idempotency_header", "Idempotency-Key")
    if idem is not None and (not isinstance(idem, str) or not _HEADER_RE.fullmatch(idem)):
        raise TemplateError(f"{where}idempotency_header: {idem!r} is not a header name (or null)")
    return {
        "matchers": _named_matchers(data, where, MATCHER_ORDER),
        "booking_ref": None if ref is None else _booking_ref(ref, f"{where}booking_ref", scope),
        "idempotency_header": idem,
    }


def _named_matchers(
    data: dict[str, Any], where: str, kinds: tuple[str, ...]
) -> tuple[tuple[str, Matcher], ...]:
    return tuple(
        (kind, _matcher(data[kind], f"{where}{kind}"))
        for kind in MATCHER_ORDER
        if kind in kinds and kind in data
    )


def _extractions(value: Any, where: str, scope: Scope) -> tuple[Extraction, ...]:
    if not isinstance(value, dict):
        raise TemplateError(
            f'{where}extract: expected an object like {{"id": {{"json": "data.id"}}}}'
        )
    found: list[Extraction] = []
    for name, spec in value.items():
        at = f"{where}extract.{name}"
        if not _VALUE_NAME_RE.fullmatch(name):
            raise TemplateError(f"{at}: {name!r} is not a value name ([A-Za-z_][A-Za-z0-9_]*)")
        found.append(_extraction_spec(name, spec, at, scope, expected="one of "))
    return tuple(found)


def _booking_ref(value: Any, where: str, scope: Scope) -> Extraction:
    """``booking_ref``: a JSON path as section 11 has it, or one extraction of section 12
    (``{"regex": "Reservation #(\\d+)"}``, ``{"header": "Location"}``, ...)."""
    if isinstance(value, dict):
        return _extraction_spec(
            "booking_ref", value, where, scope, expected="a JSON path, or one of "
        )
    return _extraction("booking_ref", "json", value, where, scope)


def _extraction_spec(
    name: str, spec: Any, where: str, scope: Scope, *, expected: str
) -> Extraction:
    """One extraction written ``{"<form>": source}``; TemplateError naming ``where`` and what
    was ``expected`` otherwise."""
    forms = [key for key in spec if key in EXTRACT_FORMS] if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or len(forms) != 1 or set(spec) - {forms[0], "decode"}:
        raise TemplateError(
            f"{where}: expected {expected}"
            + ", ".join(f'{{"{form}": ...}}' for form in EXTRACT_FORMS)
            + ' (a text form may add "decode": "url")'
        )
    kind = forms[0]
    extraction = _extraction(name, kind, spec[kind], f"{where}.{kind}", scope)
    if "decode" not in spec:
        return extraction
    if spec["decode"] not in EXTRACT_DECODINGS or kind == "json":
        raise TemplateError(
            f'{where}.decode: expected "url" (percent-decoding) on a header, cookie, regex or '
            f"url value, got {spec['decode']!r}"
        )
    return dataclasses.replace(extraction, decode=spec["decode"])


def _extraction(name: str, kind: str, source: Any, where: str, scope: Scope) -> Extraction:
    if kind == "json":
        return Extraction(name, kind, str(source), path=parse_path(source, where, scope))
    if not isinstance(source, str) or not source:
        raise TemplateError(f"{where}: expected a non-empty string")
    if kind == "header" and not _HEADER_RE.fullmatch(source):
        raise TemplateError(f"{where}: {source!r} is not a header name")
    if kind in ("regex", "url"):
        try:
            pattern = re.compile(source)
        except re.error as exc:
            raise TemplateError(
                f"{where}: {source!r} is not a regular expression ({exc})"
            ) from None
        if pattern.groups < 1:
            raise TemplateError(
                f"{where}: {source!r} has no group; the value is its first group, e.g. "
                '\'id="([^"]+)"\''
            )
        return Extraction(name, kind, source, pattern=pattern)
    return Extraction(name, kind, source)


def _bool(data: dict[str, Any], key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise TemplateError(f"{where}{key}: expected true or false, got {value!r}")
    return value


def _window(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TemplateError(f"{where}window: expected a string like '168h', '7d' or '6d@08:00'")
    try:
        utils.parse_window(value)
    except ValueError as exc:
        message = str(exc).removeprefix("BOOKING_WINDOW: ")
        raise TemplateError(f"{where}window: {message}") from None
    return value


def _clock(value: Any, where: str, hosts: tuple[str, ...]) -> str | None:
    """``clock`` (CONTRACT section 6): its URL, a GET on ``hosts``; None when not given."""
    if value is None:
        return None
    example = '{"url": "https://club.example/api/ping"}'
    if not isinstance(value, dict):
        raise TemplateError(f"{where}clock: expected an object like {example}")
    for key in value:
        if key not in CLOCK_KEYS:
            raise TemplateError(
                f"{where}clock.{key}: unknown key; expected one of {', '.join(CLOCK_KEYS)}"
            )
    url = value.get("url")
    if not isinstance(url, str) or not url.strip():
        raise TemplateError(
            f"{where}clock.url: expected the URL of a harmless GET whose answer carries a Date "
            f"header, e.g. {example}, got {url!r}"
        )
    if "{" in url or "}" in url:
        raise TemplateError(
            f"{where}clock.url: {url!r} holds a placeholder; the clock request is a plain GET "
            "that carries no token or value"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TemplateError(f"{where}clock.url: {url!r} is not an http(s) URL")
    if not host_allowed(hosts, url):
        raise TemplateError(
            f"{where}clock.url: host {parts.netloc!r} is not on hosts ({', '.join(hosts)}); "
            "the clock request only goes to the club's hosts"
        )
    return url


def _about(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TemplateError(f"{where}about: expected a string (free text for people)")
    return value


def _sources(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and item.strip() for item in value)
    ):
        raise TemplateError(
            f"{where}sources: expected a non-empty list of non-empty strings (where the flow's "
            "calls were read: a repository and path, or a documentation URL)"
        )
    return tuple(item.strip() for item in value)


def _checked(value: Any, where: str) -> date | None:
    if value is None:
        return None
    problem = f"{where}checked: expected a date YYYY-MM-DD (when the flow was last checked)"
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise TemplateError(f"{problem}, got {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise TemplateError(f"{problem}, got {value!r} (no such day)") from None


def stale_warning(flow: Flow, now: datetime) -> str | None:
    """The warning ``check`` gives when the file's ``checked`` is more than STALE_AFTER_DAYS
    before ``now`` (UTC); None when it is recent or not given."""
    if flow.checked is None:
        return None
    days = (now.astimezone(UTC).date() - flow.checked).days
    if days <= STALE_AFTER_DAYS:
        return None
    return (
        f"{flow.name}: checked {flow.checked.isoformat()}, {days} days ago (more than "
        f"{STALE_AFTER_DAYS}): systems change: run dry-run"
    )


def _no_repeats(value: Any, where: str, path: str = "", *, skip: str | None = None) -> None:
    """Refuse a key given more than once in an object of the file (the JSON reader keeps the
    last silently, and a key written twice is an edit gone wrong), naming it with its path."""
    if isinstance(value, dict):
        for key, count in getattr(value, "repeated", {}).items():
            times = "twice" if count == 2 else f"{count} times"
            raise TemplateError(
                f"{where}{path}{key}: given {times}; JSON would keep only the last, write it once"
            )
        for key, item in value.items():
            if key != skip:
                _no_repeats(item, where, f"{path}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_repeats(item, where, f"{path.removesuffix('.')}[{index}].")


def _single(data: dict[str, Any], api_url: str | None, name: str) -> Flow:
    """A single-request template (section 11): a flow of its one booking step."""
    where = f"{name}: "
    _no_repeats(data, where)
    for key in data:
        if key not in TEMPLATE_KEYS:
            raise TemplateError(
                f"{where}{key}: unknown key; expected one of {', '.join(TEMPLATE_KEYS)}"
            )
    scope = Scope()
    step = Step(
        name=SINGLE_STEP_NAME,
        url=_url(data, where, api_url, scope),
        booking=True,
        phase="booking",
        **_request_parts(data, where, scope),
        **_booking_parts(data, where, scope),
    )
    step = _with_court(step, set())
    url = render_text(step.url, _MaskAll())
    hosts = (urlsplit(url).netloc.lower(),)
    clock = _clock(data.get("clock"), where, hosts)
    cancel = _cancel_steps(data.get("cancel"), api_url, name)
    for cancel_step in cancel:
        cancel_url = render_text(cancel_step.url, _MaskAll())
        if not host_allowed(hosts, cancel_url):
            raise TemplateError(
                f"{name}: cancel step {cancel_step.name!r}: url: host "
                f"{urlsplit(cancel_url).netloc!r} is not the booking's host ({hosts[0]}); the "
                "token only ever goes to that host"
            )
    return Flow(
        name=name,
        hosts=hosts,
        steps=(step,),
        cancel=cancel,
        window=_window(data.get("window"), where),
        about=_about(data.get("about"), where),
        has_url="url" in data,
        clock_url=clock,
        prepare_seconds=DEFAULT_PREPARE_SECONDS if clock else 0.0,
        sources=_sources(data.get("sources"), where),
        checked=_checked(data.get("checked"), where),
    )


def _with_court(step: Step, court_steps: set[str]) -> Step:
    """The step with the steps it uses, and whether it runs once per court: it names
    {court_id}, or a value of a step that runs once per court (``court_steps``)."""
    refs = list(step.all_refs())
    uses = frozenset(r.name for r in refs if r.field is not None and r.name != "secret")
    per_court = any(r.key == "court_id" for r in refs) or bool(uses & court_steps)
    return dataclasses.replace(step, per_court=per_court, uses=uses)


def _step(
    data: Any, position: int, names: list[str], earlier: dict[str, frozenset[str]], ctx: _FlowParse
) -> Step:
    """One step of a flow, compiled against what the steps before it extract."""
    label = (
        f"step {data.get('name')!r}"
        if isinstance(data, dict) and isinstance(data.get("name"), str)
        else f"step #{position + 1}"
    )
    where = f"{ctx.name}: {label}: "
    if not isinstance(data, dict):
        raise TemplateError(f"{where}expected an object with name, method, url, ...")
    _no_repeats(data, where)
    booking = _bool(data, "booking", where)
    at_trigger = _bool(data, "at_trigger", where)
    allowed = STEP_KEYS + _step_matchers(booking, at_trigger)
    for key in data:
        if key not in allowed:
            raise TemplateError(f"{where}{key}: {_unknown_step_key(key, booking, at_trigger)}")
    extra = frozenset(CANCEL_PLACEHOLDERS) if ctx.cancel else frozenset()
    scope = Scope(dict(earlier), frozenset(names[position:]), extra)
    phase = "cancel" if ctx.cancel else "finish" if ctx.booked else "prepare"
    if booking or at_trigger:
        phase = "booking" if booking else "at_trigger"
    if at_trigger and ctx.booked:
        raise TemplateError(
            f"{where}at_trigger: only steps before the booking step run at the trigger"
        )
    if booking and at_trigger:
        raise TemplateError(
            f"{where}at_trigger: the booking step always runs at the trigger; drop it"
        )
    if booking and "ok" in data:
        raise TemplateError(
            f"{where}ok: the booking step reads its answers with booked, taken, rejected and "
            "early instead"
        )
    parts = (
        _booking_parts(data, where, scope)
        if booking
        else {"matchers": _named_matchers(data, where, _step_matchers(False, at_trigger))}
    )
    return Step(
        name=names[position],
        url=_url(data, where, ctx.api_url, scope),
        ok=_matcher(data["ok"], f"{where}ok") if "ok" in data else None,
        extract=_extractions(data.get("extract", {}), where, scope),
        booking=booking,
        at_trigger=at_trigger,
        follow_redirects=_bool(data, "follow_redirects", where),
        phase=phase,
        **_request_parts(data, where, scope),
        **parts,
    )


def _step_matchers(booking: bool, at_trigger: bool) -> tuple[str, ...]:
    """The answer keys a step takes besides STEP_KEYS."""
    if booking:
        return BOOKING_KEYS
    return AT_TRIGGER_MATCHERS if at_trigger else PLAIN_MATCHERS


def _unknown_step_key(key: str, booking: bool, at_trigger: bool) -> str:
    if key in BOOKING_KEYS:
        return 'only the booking step (the one with "booking": true) takes it' + (
            ", and an at_trigger step taken, rejected and early"
            if key in AT_TRIGGER_MATCHERS
            else ""
        )
    return "unknown key; expected one of " + ", ".join(
        STEP_KEYS + _step_matchers(booking, at_trigger)
    )


@dataclass
class _FlowParse:
    name: str
    api_url: str | None
    booked: bool = False
    #: Parsing the ``cancel`` steps: no booking step, ``{booking_ref}`` known.
    cancel: bool = False


def _step_names(steps: list[Any], name: str, *, cancel: bool = False) -> list[str]:
    names: list[str] = []
    for position, data in enumerate(steps):
        step_name = data.get("name") if isinstance(data, dict) else None
        where = f"{name}: {'cancel ' if cancel else ''}step #{position + 1}: name"
        if not isinstance(step_name, str):
            raise TemplateError(f"{where}: missing; every step needs a name like 'login'")
        if (
            not _STEP_NAME_RE.fullmatch(step_name)
            or step_name == "secret"
            or step_name in PLACEHOLDERS
            or step_name in CANCEL_PLACEHOLDERS
        ):
            raise TemplateError(
                f"{where}: {step_name!r} is not a step name: [a-z][a-z0-9_]*, not 'secret' or a "
                "built-in placeholder"
            )
        if step_name in names:
            raise TemplateError(
                f"{where}: {step_name!r} is used by an earlier step; names are unique"
            )
        assert isinstance(data, dict)
        if not isinstance(data.get("booking", False), bool):
            raise TemplateError(f"{name}: step {step_name!r}: booking: expected true or false")
        names.append(step_name)
    if cancel:
        for step_name, data in zip(names, steps, strict=True):
            for key in ("booking", "at_trigger"):
                if key in data:
                    raise TemplateError(
                        f"{name}: cancel step {step_name!r}: {key}: a cancel step books nothing "
                        "and runs when `cancel` is called; drop it"
                    )
        return names
    bookings = [n for n, d in zip(names, steps, strict=True) if d.get("booking") is True]
    if len(bookings) != 1:
        found = f"found {len(bookings)}" + (f" ({', '.join(bookings)})" if bookings else "")
        raise TemplateError(
            f'{name}: steps: expected exactly one step with "booking": true, {found}'
        )
    return names


def _hosts(value: Any, steps: tuple[Step, ...], name: str) -> tuple[str, ...]:
    urls = {step.name: render_text(step.url, _MaskAll()) for step in steps}
    if value is None:
        hosts = tuple(dict.fromkeys(urlsplit(url).netloc.lower() for url in urls.values()))
    else:
        if not isinstance(value, list) or not value:
            raise TemplateError(
                f"{name}: hosts: expected a non-empty list of host names, e.g. "
                '["api.club.example", "auth.club.example:8443"]'
            )
        for index, entry in enumerate(value):
            if not isinstance(entry, str) or split_host(entry) is None:
                raise TemplateError(
                    f"{name}: hosts[{index}]: {entry!r} is not a host name or host:port"
                )
        hosts = tuple(h.strip().lower() for h in value)
    for step_name, url in urls.items():
        if not host_allowed(hosts, url):
            raise TemplateError(
                f"{name}: step {step_name!r}: url: host {urlsplit(url).netloc!r} is not on hosts "
                f"({', '.join(hosts)}); the token and cookies only ever go to hosts"
            )
    return hosts


def _prepare_seconds(value: Any, name: str) -> float:
    if value is None:
        return DEFAULT_PREPARE_SECONDS
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_PREPARE_SECONDS
    ):
        raise TemplateError(
            f"{name}: prepare_seconds: expected a number of seconds above 0 and at most "
            f"{MAX_PREPARE_SECONDS:g}, got {value!r}"
        )
    return float(value)


def _cancel_steps(value: Any, api_url: str | None, name: str) -> tuple[Step, ...]:
    """A file's ``cancel`` (CONTRACT section 13): steps as in section 12, none of them a booking
    step, run in order by ``cancel KEY``; ``{booking_ref}`` is the instance's reference."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise TemplateError(
            f"{name}: cancel: expected a non-empty list of steps, e.g. "
            '[{"name": "cancel", "method": "DELETE", "url": "https://club.example/bookings/'
            '{booking_ref}"}]'
        )
    names = _step_names(value, name, cancel=True)
    ctx = _FlowParse(name, api_url, cancel=True)
    earlier: dict[str, frozenset[str]] = {}
    steps: list[Step] = []
    for position, raw in enumerate(value):
        step = _with_court(_step(raw, position, names, earlier, ctx), set())
        earlier[step.name] = frozenset(e.name for e in step.extract)
        steps.append(step)
    return tuple(steps)


def _multi(data: dict[str, Any], api_url: str | None, name: str) -> Flow:
    """A flow of several steps (section 12)."""
    _no_repeats(data, f"{name}: ", skip="steps")
    for key in data:
        if key not in FLOW_KEYS:
            raise TemplateError(
                f"{name}: {key}: unknown key; expected one of {', '.join(FLOW_KEYS)}"
            )
    raw_steps = data["steps"]
    if not isinstance(raw_steps, list) or not raw_steps:
        raise TemplateError(f"{name}: steps: expected a non-empty list of steps")
    names = _step_names(raw_steps, name)
    ctx = _FlowParse(name, api_url)
    earlier: dict[str, frozenset[str]] = {}
    court_steps: set[str] = set()
    steps: list[Step] = []
    for position, raw in enumerate(raw_steps):
        step = _with_court(_step(raw, position, names, earlier, ctx), court_steps)
        if step.per_court:
            court_steps.add(step.name)
        earlier[step.name] = frozenset(e.name for e in step.extract)
        ctx.booked = ctx.booked or step.booking
        steps.append(step)
    compiled = tuple(steps)
    prepare = _prepare_seconds(data.get("prepare_seconds"), name)
    cancel = _cancel_steps(data.get("cancel"), api_url, name)
    hosts = _hosts(data.get("hosts"), compiled + cancel, name)
    clock = _clock(data.get("clock"), f"{name}: ", hosts)
    prepares = clock is not None or any(s.phase == "prepare" for s in compiled)
    return Flow(
        name=name,
        hosts=hosts,
        steps=compiled,
        cancel=cancel,
        window=_window(data.get("window"), f"{name}: "),
        prepare_seconds=prepare if prepares else 0.0,
        about=_about(data.get("about"), f"{name}: "),
        has_url=all("url" in raw for raw in raw_steps),
        clock_url=clock,
        sources=_sources(data.get("sources"), f"{name}: "),
        checked=_checked(data.get("checked"), f"{name}: "),
    )


def parse_flow(data: Any, *, api_url: str | None, name: str) -> Flow:
    """Validate a club file or request template (``name`` labels messages: the file). A single
    request (section 11) becomes a flow of one booking step; ``steps`` make a flow (section 12).
    ``api_url`` (BOOKING_API_URL) is the URL of a step that names none. Raises ``TemplateError``
    naming the file, the step and the key."""
    if not isinstance(data, dict):
        raise TemplateError(f"{name}: expected a JSON object")
    if "steps" in data:
        return _multi(data, api_url, name)
    return _single(data, api_url, name)


def default_flow(api_url: str) -> Flow:
    """The request of CONTRACT section 6, as a one-step flow (one engine for every club)."""
    return parse_flow(
        {
            "method": "POST",
            "url": api_url.replace("{", "{{").replace("}", "}}"),
            "headers": {"Authorization": "Bearer {token}", "Content-Type": "application/json"},
            "json": {
                "court_id": "{court_id}",
                "start": "{start}",
                "end": "{end}",
                "duration_minutes": "{duration_minutes}",
            },
            # CONTRACT section 13: DELETE $BOOKING_API_URL/<booking_ref>; 2xx or 404 (already
            # gone) is cancelled.
            "cancel": [
                {
                    "name": "cancel",
                    "method": "DELETE",
                    "url": api_url.rstrip("/").replace("{", "{{").replace("}", "}}")
                    + "/{booking_ref}",
                    "headers": {"Authorization": "Bearer {token}"},
                    "ok": {"status": [*range(200, 300), 404]},
                }
            ],
        },
        api_url=api_url,
        name="BOOKING_API_URL",
    )
