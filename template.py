"""The request template (CONTRACT section 11): placeholders, parsing and validation, rendering,
answer matching, and the masked description ``check`` prints.

Pure like ``utils``: no clock, no disk, no database, no network; the file is read by
``config_loader`` and the request sent by ``bot``. One ``RequestTemplate`` is one request (one
step): the booking and ``check`` both render it through ``render_request``, so what ``check``
shows is what is sent, Idempotency-Key included. Multi-step club flows (CONTRACT section 12)
are meant to grow here as a sequence of such steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit
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
    "key",
    "epoch_ms",
)
TEMPLATE_KEYS = (
    "method",
    "url",
    "headers",
    "json",
    "form",
    "booked",
    "taken",
    "rejected",
    "booking_ref",
    "idempotency_header",
)
TEMPLATE_METHODS = ("POST", "PUT", "PATCH", "GET", "DELETE")
MATCHER_ORDER = ("taken", "rejected", "booked")
_PIECE_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class TemplateError(ValueError):
    """An invalid request template; the message names the file and the key."""


@dataclass(frozen=True)
class Matcher:
    """Answers with one of ``statuses`` (and ``body_contains`` in the raw body, if given)."""

    statuses: tuple[int, ...]
    body_contains: str | None

    def matches(self, status: int, body: bytes) -> bool:
        if status not in self.statuses:
            return False
        if self.body_contains is None:
            return True
        return self.body_contains in body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class RenderedRequest:
    """A rendered request: method, URL, headers and the body bytes (None for no body)."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


def _pieces(text: str, where: str) -> list[tuple[str, bool]]:
    """Split a template string into (literal, False) and (placeholder name, True) pieces."""
    pieces: list[tuple[str, bool]] = []
    position = 0
    for match in _PIECE_RE.finditer(text):
        if match.start() > position:
            pieces.append((text[position : match.start()], False))
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append((token[0], False))
        elif match.group(1) is None:
            raise TemplateError(
                f"{where}: unbalanced {token!r} in {text!r}; write {{{{ or }}}} for a literal brace"
            )
        else:
            name = match.group(1)
            if name not in PLACEHOLDERS:
                raise TemplateError(
                    f"{where}: unknown placeholder {{{name}}} in {text!r}; known: "
                    + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                )
            pieces.append((name, True))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def _check_strings(value: Any, where: str) -> None:
    if isinstance(value, str):
        _pieces(value, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(item, f"{where}.{key}")


def _render_text(text: str, values: dict[str, Any], encode: bool = False) -> str:

    out: list[str] = []
    for piece, is_name in _pieces(text, "template"):
        if not is_name:
            out.append(piece)
            continue
        value = values[piece]
        text_value = "" if value is None else str(value)
        out.append(quote(text_value, safe="") if encode else text_value)
    return "".join(out)


def _render_value(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        pieces = _pieces(value, "template")
        if len(pieces) == 1 and pieces[0][1]:
            # A string that is exactly one placeholder takes the value's own JSON type.
            return values[pieces[0][0]]
        return _render_text(value, values)
    if isinstance(value, list):
        return [_render_value(item, values) for item in value]
    if isinstance(value, dict):
        return {key: _render_value(item, values) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class RequestTemplate:
    """A validated request template (CONTRACT section 11)."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body_kind: str | None  # "json", "form" or None
    body: Any
    matchers: tuple[tuple[str, Matcher], ...]
    booking_ref_path: tuple[str, ...] | None
    idempotency_header: str | None
    has_url: bool

    @property
    def host(self) -> str:

        return urlsplit(self.url).netloc

    def render(self, values: dict[str, Any]) -> RenderedRequest:
        """The request for one instance; ``values`` from ``placeholder_values``."""
        url = _render_text(self.url, values, encode=True)
        headers = {name: _render_text(value, values) for name, value in self.headers}
        body: bytes | None = None
        if self.body_kind == "json":
            body = json.dumps(_render_value(self.body, values)).encode()
            headers.setdefault("Content-Type", "application/json")
        elif self.body_kind == "form":
            fields = {
                key: _render_text(value, values) if isinstance(value, str) else value
                for key, value in self.body.items()
            }
            body = urlencode(fields).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return RenderedRequest(self.method, url, headers, body)

    def match(self, status: int, body: bytes) -> str | None:
        """The first of taken, rejected, booked whose matcher fits the answer, else None."""
        for name, matcher in self.matchers:
            if matcher.matches(status, body):
                return name
        return None

    def booking_ref(self, answer: Any) -> str | None:
        """The value at ``booking_ref``'s dotted path in a JSON answer, as text (None if absent)."""
        if self.booking_ref_path is None:
            return None
        node = answer
        for part in self.booking_ref_path:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        if node is None or isinstance(node, dict | list | bool):
            return None
        return str(node)


def placeholder_values(
    *,
    token: str,
    court_id: str | None,
    start: datetime,
    duration_minutes: int,
    zone: ZoneInfo,
    key: str,
) -> dict[str, Any]:
    """The values of every placeholder for one instance and court."""
    end = start + timedelta(minutes=duration_minutes)
    local_start = start.astimezone(zone)
    local_end = end.astimezone(zone)
    return {
        "token": token,
        "court_id": court_id,
        "start": utils.format_offset(start, zone),
        "end": utils.format_offset(end, zone),
        "start_utc": utils.format_utc(start),
        "end_utc": utils.format_utc(end),
        "date": local_start.strftime("%Y-%m-%d"),
        "time": local_start.strftime("%H:%M"),
        "end_time": local_end.strftime("%H:%M"),
        "duration_minutes": duration_minutes,
        "key": key,
        "epoch_ms": int(utils.as_utc(start).timestamp() * 1000),
    }


def idempotency_key(key: str, court: str | None, several: bool) -> str:
    """The Idempotency-Key of an instance ``key``: with ``#<court>`` when several courts are
    listed (each court is its own booking attempt)."""
    return f"{key}#{court if court is not None else ''}" if several else key


@dataclass(frozen=True)
class Slot:
    """What a request is rendered for: one instance (its key, start, length, zone) and the
    courts its entry lists, tried in order."""

    key: str
    start: datetime
    duration_minutes: int
    zone: ZoneInfo
    courts: tuple[str | None, ...]


def render_request(
    template: RequestTemplate, slot: Slot, *, token: str, court: str | None
) -> RenderedRequest:
    """The request ``slot`` sends for ``court``: the template rendered with the instance's
    placeholder values, plus its Idempotency-Key header (the one render the booking and
    ``check`` share)."""
    rendered = template.render(
        placeholder_values(
            token=token,
            court_id=court,
            start=slot.start,
            duration_minutes=slot.duration_minutes,
            zone=slot.zone,
            key=slot.key,
        )
    )
    if template.idempotency_header:
        rendered.headers[template.idempotency_header] = idempotency_key(
            slot.key, court, len(slot.courts) > 1
        )
    return rendered


def describe_request(template: RequestTemplate, slot: Slot) -> str:
    """The request ``slot`` would send (first court), token masked, as lines for a person."""
    rendered = render_request(template, slot, token=utils.MASK, court=slot.courts[0])
    lines = [f"{rendered.method} {rendered.url.replace('%2A%2A%2A', utils.MASK)}"]
    lines += [f"{name}: {value}" for name, value in rendered.headers.items()]
    if rendered.body is not None:
        lines.append(rendered.body.decode())
    return "\n".join(lines)


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
    if contains is not None and (not isinstance(contains, str) or not contains):
        raise TemplateError(f"{where}.body_contains: expected a non-empty string")
    return Matcher(tuple(statuses), contains)


def parse_template(data: Any, *, api_url: str | None, name: str) -> RequestTemplate:
    """Validate a template's JSON (``name`` labels messages). ``api_url`` is the default URL."""

    if not isinstance(data, dict):
        raise TemplateError(f"{name}: expected a JSON object")
    for key in data:
        if key not in TEMPLATE_KEYS:
            raise TemplateError(
                f"{name}: {key}: unknown key; expected one of {', '.join(TEMPLATE_KEYS)}"
            )
    method = data.get("method", "POST")
    if not isinstance(method, str) or method.upper() not in TEMPLATE_METHODS:
        raise TemplateError(
            f"{name}: method: {method!r} is not one of {', '.join(TEMPLATE_METHODS)}"
        )
    has_url = "url" in data
    url = data.get("url", api_url)
    if not has_url and not url:
        raise TemplateError(f"{name}: url: missing, and BOOKING_API_URL is not set either")
    if not isinstance(url, str):
        raise TemplateError(f"{name}: url: expected a string, got {url!r}")
    _pieces(url, f"{name}: url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TemplateError(f"{name}: url: {url!r} is not an http(s) URL")
    if "{" in parts.scheme + parts.netloc or "}" in parts.netloc:
        raise TemplateError(
            f"{name}: url: a placeholder may not stand in the scheme or host ({url!r}): the "
            "token must only ever go to one fixed host"
        )
    headers = data.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in headers.items()
    ):
        raise TemplateError(
            f'{name}: headers: expected an object of strings, e.g. {{"Accept": "application/json"}}'
        )
    for header, value in headers.items():
        _pieces(value, f"{name}: headers.{header}")
    if "json" in data and "form" in data:
        raise TemplateError(f"{name}: json, form: give one body, not both")
    body_kind: str | None = None
    body: Any = None
    if "json" in data:
        body_kind, body = "json", data["json"]
        _check_strings(body, f"{name}: json")
    elif "form" in data:
        body_kind, body = "form", data["form"]
        if not isinstance(body, dict) or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in body.values()
        ):
            raise TemplateError(f"{name}: form: expected an object of strings or numbers")
        _check_strings(body, f"{name}: form")
    matchers = tuple(
        (kind, _matcher(data[kind], f"{name}: {kind}")) for kind in MATCHER_ORDER if kind in data
    )
    ref = data.get("booking_ref")
    ref_path: tuple[str, ...] | None = None
    if ref is not None:
        if not isinstance(ref, str) or not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*", ref):
            raise TemplateError(f"{name}: booking_ref: {ref!r} is not a dotted path like 'data.id'")
        ref_path = tuple(ref.split("."))
    idem = data.get("idempotency_header", "Idempotency-Key")
    if idem is not None and (
        not isinstance(idem, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", idem)
    ):
        raise TemplateError(f"{name}: idempotency_header: {idem!r} is not a header name (or null)")
    return RequestTemplate(
        method=method.upper(),
        url=url,
        headers=tuple(headers.items()),
        body_kind=body_kind,
        body=body,
        matchers=matchers,
        booking_ref_path=ref_path,
        idempotency_header=idem,
        has_url=has_url,
    )


def default_template(api_url: str) -> RequestTemplate:
    """The request of CONTRACT section 6, as a template (one rendering path for both)."""
    return parse_template(
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
        },
        api_url=api_url,
        name="BOOKING_API_URL",
    )
