"""A literal, one-pass reading of a section-12 flow, to prove each ready flow against its mock.

This is not the daemon's flow engine (which times, retries and records); it sends each step once,
in order, with one ``requests.Session`` as the booking's cookie jar, renders placeholders,
extracts values, and reads the booking step's answer with the flow's matchers and section 6's
defaults. The tests use it so that a ready flow and its mock are known to agree before the
engine exists; the end-to-end tests then run the real daemon on the same files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import requests

from clubmocks.flows import PLACEHOLDER, TIME_PLACEHOLDERS

TIMEOUT = 10.0
_BRACKETS = re.compile(r"\[([^\]]*)\]")


class FlowError(Exception):
    """A step could not be sent or read: a missing value, a host not on ``hosts``."""


@dataclass(frozen=True)
class Instance:
    """One booking: its local start (aware), duration, court and instance key."""

    start: datetime
    minutes: int = 60
    court_id: str | int | None = None
    key: str = "entry@2030-01-01T00:00:00Z"

    def values(self) -> dict[str, Any]:
        end = self.start + timedelta(minutes=self.minutes)
        epoch = self.start.timestamp()
        return {
            "court_id": self.court_id,
            "start": self.start,
            "end": end,
            "start_utc": self.start.astimezone(UTC),
            "end_utc": end.astimezone(UTC),
            "date": f"{self.start:%Y-%m-%d}",
            "time": f"{self.start:%H:%M}",
            "end_time": f"{end:%H:%M}",
            "duration_minutes": self.minutes,
            "duration_seconds": self.minutes * 60,
            "key": self.key,
            "epoch_ms": int(epoch * 1000),
            "epoch_s": int(epoch),
            "start_minutes": self.start.hour * 60 + self.start.minute,
            "end_minutes": (end.date() - self.start.date()).days * 1440
            + end.hour * 60
            + end.minute,
            "start_seconds_of_day": self.start.hour * 3600 + self.start.minute * 60,
        }


@dataclass
class StepResult:
    name: str
    status: int | None
    values: dict[str, Any] = field(default_factory=dict, repr=False)
    outcome: str = "ok"


@dataclass
class FlowRun:
    """``outcome``: ``booked``, ``taken``, ``early``, ``rejected``, ``credentials``
    (401/403, or another step's own ``rejected``), ``retry`` (429/5xx), ``unmatched`` (a 2xx
    no matcher knows), ``failed:<step>`` (a step before the booking) or ``finishing:<step>``
    (booked, a later step failed)."""

    outcome: str
    steps: list[StepResult]
    booking_ref: Any = None

    def step(self, name: str) -> StepResult:
        return next(s for s in self.steps if s.name == name)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _format(name: str, value: Any, fmt: str | None) -> Any:
    if isinstance(value, datetime):
        if fmt:
            return value.strftime(fmt)
        if name.endswith("_utc"):
            return value.strftime("%Y-%m-%dT%H:%M:%SZ")
        return value.isoformat(timespec="seconds")
    if fmt:
        raise FlowError(f"{{{name}:{fmt}}}: a format on a value that is not a time")
    return value


class _Context:
    def __init__(self, secrets: dict[str, str], instance: Instance) -> None:
        self.secrets = secrets
        self.builtins = instance.values()
        self.builtins["token"] = secrets.get("token")
        self.steps: dict[str, dict[str, Any]] = {}

    def lookup(self, match: re.Match[str]) -> Any:
        name, item, fmt = match.group("name"), match.group("field"), match.group("fmt")
        if item is None:
            if name not in self.builtins:
                raise FlowError(f"{{{name}}}: unknown placeholder")
            return _format(name, self.builtins[name], fmt if name in TIME_PLACEHOLDERS else None)
        source = self.secrets if name == "secret" else self.steps.get(name)
        if source is None or item not in source:
            raise FlowError(f"{{{name}.{item}}}: no value")
        return source[item]

    def render(self, text: str, *, url: bool = False) -> Any:
        """A string with its placeholders filled; a string that is exactly one placeholder keeps
        the value's JSON type (outside URLs)."""
        whole = PLACEHOLDER.fullmatch(text)
        if whole and whole.group("name") and not url:
            return self.lookup(whole)

        def one(match: re.Match[str]) -> str:
            if match.group(0) in ("{{", "}}"):
                return match.group(0)[0]
            value = _text(self.lookup(match))
            return quote(value, safe="") if url else value

        return PLACEHOLDER.sub(one, text)

    def render_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.render(value)
        if isinstance(value, dict):
            return {key: self.render_json(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.render_json(item) for item in value]
        return value


def _segments(path: str) -> list[str]:
    """``a.b[x={s.f}].c`` split on the dots outside brackets."""
    parts, depth, current = [], 0, []
    for char in path:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "." and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _dig(item: Any, dotted: str) -> Any:
    """A filter's field, a key or a dotted path into the element (``starts_at.format_24_hour``)."""
    for key in dotted.split("."):
        if not isinstance(item, dict):
            return None
        item = item.get(key)
    return item


def json_path(document: Any, path: str, context: _Context) -> Any:
    """Section 12's dotted path with ``[N]`` and ``[field=value]`` filters (consecutive filters
    all apply to the same list)."""
    node = document
    for segment in _segments(path):
        key = segment.split("[", 1)[0]
        if key:
            if not isinstance(node, dict) or key not in node:
                raise FlowError(f"json {path!r}: no {key!r}")
            node = node[key]
        filters: list[tuple[str, str]] = []
        for inner in [*_BRACKETS.findall(segment), None]:
            if inner is not None and "=" in inner:
                field_name, _, wanted = inner.partition("=")
                filters.append((field_name, _text(context.render(wanted))))
                continue
            if filters:
                if not isinstance(node, list):
                    raise FlowError(f"json {path!r}: a filter on something not a list")
                node = next(
                    (item for item in node if all(_text(_dig(item, k)) == v for k, v in filters)),
                    None,
                )
                if node is None:
                    raise FlowError(f"json {path!r}: no element matches {filters}")
                filters = []
            if inner is not None:
                if not isinstance(node, list) or not inner.isdigit() or int(inner) >= len(node):
                    raise FlowError(f"json {path!r}: no [{inner}]")
                node = node[int(inner)]
    return node


def _matches(matcher: dict[str, Any] | None, response: requests.Response) -> bool:
    if not matcher or response.status_code not in matcher["status"]:
        return False
    wanted = matcher.get("body_contains")
    if wanted is None:
        return True
    return any(s in response.text for s in ([wanted] if isinstance(wanted, str) else wanted))


def _booking_outcome(step: dict[str, Any], response: requests.Response) -> str:
    for outcome in ("taken", "rejected", "booked", "early"):
        if _matches(step.get(outcome), response):
            return outcome
    status = response.status_code
    if 200 <= status < 300:
        return "unmatched" if "booked" in step else "booked"
    if status == 409:
        return "taken"
    if status in (401, 403):
        return "credentials"
    if status == 425:
        return "early"
    if status == 429 or status >= 500:
        return "retry"
    return "rejected"


def _extract(spec: dict[str, str], response: requests.Response, context: _Context) -> Any:
    kind = next(key for key in spec if key != "decode")
    expression = spec[kind]
    if kind == "json":
        try:
            document = response.json()
        except ValueError:
            raise FlowError("the answer is not JSON") from None
        return json_path(document, expression, context)
    if kind == "header":
        value = response.headers.get(expression)
    elif kind == "cookie":
        value = response.cookies.get(expression)
    else:
        haystack = response.text if kind == "regex" else response.url
        match = re.search(expression, haystack)
        value = match.group(1) if match else None
    if value is None:
        raise FlowError(f"{kind} {expression!r}: not found")
    return unquote(value) if spec.get("decode") == "url" else value


def _send(
    session: requests.Session,
    flow: dict[str, Any],
    step: dict[str, Any],
    context: _Context,
    instance: Instance,
) -> requests.Response:
    url = context.render(step["url"], url=True)
    if urlsplit(url).netloc not in flow["hosts"]:
        raise FlowError(f"step {step['name']!r}: {url!r} is not on hosts")
    headers = {key: _text(context.render(value)) for key, value in step.get("headers", {}).items()}
    if step.get("booking"):
        idem = step.get("idempotency_header", "Idempotency-Key")
        if idem:
            headers[idem] = instance.key
    kwargs: dict[str, Any] = {}
    if "json" in step:
        kwargs["data"] = json.dumps(context.render_json(step["json"]))
        headers.setdefault("Content-Type", "application/json")
    elif "form" in step:
        kwargs["data"] = {key: _text(context.render(value)) for key, value in step["form"].items()}
    return session.request(
        step.get("method", "POST"),
        url,
        headers=headers,
        allow_redirects=bool(step.get("follow_redirects")),
        timeout=TIMEOUT,
        **kwargs,
    )


def run_flow(
    flow: dict[str, Any],
    *,
    secrets: dict[str, str],
    instance: Instance,
    session: requests.Session | None = None,
    before_step: Callable[[str], None] | None = None,
) -> FlowRun:
    """Send the flow's steps once, in order, and say how the booking went. ``before_step`` is
    called with each step's name just before it is sent (to change a mock's knobs mid-flow)."""
    session = session or requests.Session()
    context = _Context(secrets, instance)
    results: list[StepResult] = []
    booked_ref: Any = None
    phase = "before"
    for step in flow["steps"]:
        if before_step is not None:
            before_step(step["name"])
        response = _send(session, flow, step, context, instance)
        result = StepResult(step["name"], response.status_code)
        results.append(result)
        if step.get("booking"):
            result.outcome = _booking_outcome(step, response)
            if result.outcome != "booked":
                return FlowRun(result.outcome, results)
            if "booking_ref" in step:
                booked_ref = json_path(response.json(), step["booking_ref"], context)
            phase = "after"
        else:
            for outcome in ("taken", "early"):  # an at_trigger step's own answers
                if _matches(step.get(outcome), response):
                    result.outcome = outcome
                    return FlowRun(outcome, results)
            if _matches(step.get("rejected"), response):
                result.outcome = "rejected"
                return FlowRun("credentials", results, booked_ref)
            ok = step.get("ok") or {"status": list(range(200, 300))}
            if not _matches(ok, response):
                result.outcome = "failed"
                if phase == "before" and response.status_code in (401, 403):
                    return FlowRun("credentials", results)
                label = "failed" if phase == "before" else "finishing"
                return FlowRun(f"{label}:{step['name']}", results, booked_ref)
        try:
            result.values = {
                name: _extract(spec, response, context)
                for name, spec in step.get("extract", {}).items()
            }
        except FlowError:
            result.outcome = "missing"
            label = "failed" if phase == "before" else "finishing"
            return FlowRun(f"{label}:{step['name']}", results, booked_ref)
        context.steps[step["name"]] = result.values
    return FlowRun("booked", results, booked_ref)
