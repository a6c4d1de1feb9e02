"""The ready flows of ``data/clubs/``: load one, point it at a local mock, check its shape.

``flow_for_mock("playtomic", club.url)`` returns the flow with every ``https://<host>`` of its
``hosts`` replaced by the mock's ``http://127.0.0.1:PORT`` and ``hosts`` naming that address and
port; ``write_flow_for_mock`` writes it where a daemon's ``DATA_DIR/clubs/`` expects it.

``flow_problems`` is the tests' reading of CONTRACT section 12 (keys, one booking step, hosts,
placeholders defined before use); the daemon's own ``check`` is the authority once it exists.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CLUBS_DIR = Path(__file__).resolve().parents[2] / "data" / "clubs"

#: ``{name}``, ``{name:format}``, ``{step.value}``, ``{secret.field}``; ``{{`` and ``}}`` are
#: literal braces.
PLACEHOLDER = re.compile(
    r"\{\{|\}\}|\{(?P<name>[a-z_][a-z0-9_]*)(?:\.(?P<field>[A-Za-z0-9_]+))?(?::(?P<fmt>[^{}]*))?\}"
)
BUILTINS = frozenset(
    {
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
        "start_minutes",
        "end_minutes",
        "start_seconds_of_day",
    }
)
TIME_PLACEHOLDERS = frozenset({"start", "end", "start_utc", "end_utc"})
TOP_KEYS = frozenset(
    {
        "about",
        "hosts",
        "window",
        "prepare_seconds",
        "steps",
        "cancel",
        "sources",
        "checked",
        "clock",
    }
)
STEP_KEYS = frozenset(
    {
        "name",
        "method",
        "url",
        "headers",
        "json",
        "form",
        "ok",
        "extract",
        "booking",
        "at_trigger",
        "follow_redirects",
    }
)
BOOKING_KEYS = frozenset(
    {"booked", "taken", "rejected", "early", "booking_ref", "idempotency_header"}
)
EXTRACT_FORMS = frozenset({"json", "header", "cookie", "regex", "url"})
STEP_NAME = re.compile(r"[a-z][a-z0-9_]*")
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})


def load_flow(system: str) -> dict[str, Any]:
    """``data/clubs/<system>.json`` as parsed JSON."""
    return json.loads((CLUBS_DIR / f"{system}.json").read_text(encoding="utf-8"))


def flow_for_mock(system_or_flow: str | dict[str, Any], base_url: str) -> dict[str, Any]:
    """The flow with its hosts' ``https://`` URLs (its steps', its cancel's and its ``clock``'s)
    pointed at ``base_url`` (``http://host:port``)."""
    flow = copy.deepcopy(
        load_flow(system_or_flow) if isinstance(system_or_flow, str) else system_or_flow
    )
    base = base_url.rstrip("/")
    named = [(f"step {s['name']!r}", s) for s in [*flow["steps"], *flow.get("cancel", [])]]
    if isinstance(flow.get("clock"), dict):
        named.append(("clock", flow["clock"]))
    for name, holder in named:
        for host in flow["hosts"]:
            prefix = f"https://{host}"
            url = holder["url"]
            if url == prefix or url.startswith((prefix + "/", prefix + "?")):
                holder["url"] = base + url[len(prefix) :]
                break
        else:
            raise ValueError(f"{name}: {holder['url']!r} is on none of the hosts")
    flow["hosts"] = [urlsplit(base).netloc]
    return flow


def write_flow_for_mock(
    system: str, base_url: str, clubs_dir: Path, name: str | None = None, **overrides: Any
) -> Path:
    """Write the mock-pointed flow as ``clubs_dir/<name or system>.json``; return its path.

    ``overrides`` replace top-level keys (``prepare_seconds=5``, ``window="0.01h"``); a value
    of None removes the key."""
    flow = flow_for_mock(system, base_url)
    for key, value in overrides.items():
        if value is None:
            flow.pop(key, None)
        else:
            flow[key] = value
    clubs_dir.mkdir(parents=True, exist_ok=True)
    path = clubs_dir / f"{name or system}.json"
    path.write_text(json.dumps(flow, indent=2), encoding="utf-8")
    return path


def placeholders(value: Any) -> list[tuple[str, str | None, str | None]]:
    """Every ``(name, field, format)`` placeholder in the strings of ``value`` (any JSON)."""
    found: list[tuple[str, str | None, str | None]] = []
    if isinstance(value, str):
        for match in PLACEHOLDER.finditer(value):
            if match.group("name"):
                found.append((match.group("name"), match.group("field"), match.group("fmt")))
    elif isinstance(value, dict):
        for item in value.values():
            found.extend(placeholders(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(placeholders(item))
    return found


def _strings(value: Any) -> list[str]:
    """Every string in ``value`` (any JSON)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []


def lone_braces(value: Any) -> list[str]:
    """The strings of ``value`` with a ``{`` or ``}`` that is neither a placeholder nor doubled
    (a literal brace is written ``{{`` or ``}}``, as CONTRACT section 11 says)."""
    return [text for text in _strings(value) if re.search(r"[{}]", PLACEHOLDER.sub("", text))]


def _matcher_problems(where: str, matcher: Any) -> list[str]:
    if not isinstance(matcher, dict) or set(matcher) - {"status", "body_contains"}:
        return [f"{where}: expected {{'status': [...], 'body_contains': ...}}, got {matcher!r}"]
    problems = []
    status = matcher.get("status")
    if not isinstance(status, list) or not status or not all(isinstance(s, int) for s in status):
        problems.append(f"{where}.status: expected a non-empty list of integers, got {status!r}")
    body = matcher.get("body_contains")
    if body is not None and not (
        isinstance(body, str)
        or (isinstance(body, list) and body and all(isinstance(s, str) for s in body))
    ):
        problems.append(f"{where}.body_contains: expected a string or a list of strings")
    return problems


def _clock_problems(clock: Any, hosts: list[str], source: str) -> list[str]:
    """CONTRACT section 6, "The club's clock": ``{"url": ...}``, a plain https GET on ``hosts``
    that carries no placeholder (no token, no value)."""
    if clock is None:
        return []
    if not isinstance(clock, dict) or set(clock) != {"url"} or not isinstance(clock["url"], str):
        return [f"{source}: clock: expected {{'url': '<a harmless GET on hosts>'}}, got {clock!r}"]
    split = urlsplit(clock["url"])
    if split.scheme != "https" or split.netloc not in hosts:
        return [f"{source}: clock.url: {clock['url']!r} is not https on one of hosts {hosts}"]
    if re.search(r"[{}]", clock["url"]):
        return [f"{source}: clock.url: {clock['url']!r} holds a placeholder"]
    return []


def flow_problems(flow: Any, source: str = "flow") -> list[str]:
    """What breaks section 12 in ``flow``, one message per problem (empty: none found)."""
    if not isinstance(flow, dict):
        return [f"{source}: expected an object"]
    problems = [f"{source}: unknown key {key!r}" for key in sorted(set(flow) - TOP_KEYS)]
    hosts = flow.get("hosts")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        return [*problems, f"{source}: hosts: expected a non-empty list of host names"]
    if "about" in flow and not isinstance(flow["about"], str):
        problems.append(f"{source}: about: expected a string")
    prepare = flow.get("prepare_seconds", 60)
    if isinstance(prepare, bool) or not isinstance(prepare, int) or not 0 < prepare <= 3600:
        problems.append(f"{source}: prepare_seconds: expected 1..3600, got {prepare!r}")
    problems += _clock_problems(flow.get("clock"), hosts, source)
    steps = flow.get("steps")
    if not isinstance(steps, list) or not steps:
        return [*problems, f"{source}: steps: expected a non-empty list"]
    defined: dict[str, set[str]] = {}
    booking_seen = False
    bookings = 0
    for position, step in enumerate(steps, 1):
        where = f"{source}: step #{position}"
        if not isinstance(step, dict):
            problems.append(f"{where}: expected an object")
            continue
        name = step.get("name")
        where = f"{source}: step {name!r} (#{position})"
        if not isinstance(name, str) or not STEP_NAME.fullmatch(name) or name == "secret":
            problems.append(f"{where}: name: expected [a-z][a-z0-9_]*")
        elif name in defined or name in BUILTINS:
            problems.append(f"{where}: name: used twice")
        is_booking = step.get("booking") is True
        allowed = STEP_KEYS | (BOOKING_KEYS if is_booking else frozenset({"rejected"}))
        if step.get("at_trigger") and not is_booking:
            allowed |= {"taken", "early"}
        problems += [f"{where}: unknown key {key!r}" for key in sorted(set(step) - allowed)]
        if is_booking:
            bookings += 1
        if step.get("at_trigger") and booking_seen:
            problems.append(f"{where}: at_trigger: only for steps before the booking step")
        if step.get("method", "POST") not in METHODS:
            problems.append(f"{where}: method: {step.get('method')!r}")
        if "json" in step and "form" in step:
            problems.append(f"{where}: json and form: one body only")
        url = step.get("url")
        split = urlsplit(url) if isinstance(url, str) else None
        if split is None or split.scheme != "https" or split.netloc not in hosts:
            problems.append(f"{where}: url: {url!r} is not https on one of hosts {hosts}")
        for key in ("ok", "booked", "taken", "rejected", "early"):
            if key in step:
                problems += _matcher_problems(f"{where}: {key}", step[key])
        # Placeholders in what is sent, and in json paths' filters, must be known by now.
        sent = [step.get("url"), step.get("headers"), step.get("json"), step.get("form")]
        extract = step.get("extract", {})
        if not isinstance(extract, dict):
            problems.append(f"{where}: extract: expected an object")
            extract = {}
        for value_name, spec in extract.items():
            forms = set(spec) & EXTRACT_FORMS if isinstance(spec, dict) else set()
            if len(forms) != 1 or set(spec) - forms - {"decode"}:
                problems.append(f"{where}: extract.{value_name}: expected one of {EXTRACT_FORMS}")
            elif "json" in spec:
                sent.append(spec["json"])
            elif "regex" in spec:
                try:
                    if re.compile(spec["regex"]).groups < 1:
                        problems.append(f"{where}: extract.{value_name}: regex has no group")
                except re.error as exc:
                    problems.append(f"{where}: extract.{value_name}: bad regex ({exc})")
        for text in lone_braces(sent[:4]):
            problems.append(f"{where}: {text[:40]!r}...: a lone brace (write {{{{ or }}}})")
        for ph_name, ph_field, ph_fmt in placeholders(sent):
            text = ph_name + (f".{ph_field}" if ph_field else "")
            if ph_fmt is not None and (ph_field or ph_name not in TIME_PLACEHOLDERS):
                problems.append(f"{where}: {{{text}:{ph_fmt}}}: a format on a non-time value")
            if ph_field is None:
                if ph_name not in BUILTINS:
                    problems.append(f"{where}: {{{text}}}: unknown placeholder")
            elif ph_name != "secret" and ph_field not in defined.get(ph_name, set()):
                problems.append(f"{where}: {{{text}}}: no earlier step extracts it")
        if isinstance(name, str):
            defined[name] = set(extract)
        booking_seen = booking_seen or is_booking
    if bookings != 1:
        problems.append(f"{source}: steps: expected exactly one booking step, found {bookings}")
    return problems
