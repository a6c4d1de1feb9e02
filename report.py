"""What ``python main.py status`` shows a person (CONTRACT section 1): a summary, then the rows.

The summary says whether a daemon runs (its pid, heartbeat age, active or standby), the next
bookings in local time with how far ahead they are, and the outcomes of the last 7 days. The rows
follow, the trigger in local time too. Everything here is pure: the CLI gathers the facts (the
daemon's, the rows of ``instances.status_rows``) and passes ``now``; colour is the caller's call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import utils

#: How many bookings ahead the summary lists, and how many recent outcomes it details.
NEXT_SHOWN = 5
OUTCOMES_SHOWN = 10
OUTCOME_DAYS = 7
#: A reason in the summary is cut to this many characters (the rows below have it whole).
REASON_SHOWN = 80

_COLOURS = {
    "booked": "32",
    "failed": "31",
    "expired": "33",
    "booking": "35",
    "watching": "36",
    "cancelled": "2",
    "running": "32",
    "not running": "31",
    "stale": "33",
}


@dataclass(frozen=True)
class Palette:
    """ANSI colour for status words, or none at all."""

    enabled: bool = False

    def paint(self, text: str, kind: str) -> str:
        """``text`` in the colour of ``kind`` (a status, ``running``...), unchanged when off."""
        code = _COLOURS.get(kind)
        return f"\033[{code}m{text}\033[0m" if self.enabled and code else text


def colour_wanted(is_terminal: bool, env: Mapping[str, str]) -> bool:
    """Colour only on a terminal, never with a non-empty ``NO_COLOR`` (no-color.org) or a
    ``dumb`` terminal."""
    return is_terminal and not env.get("NO_COLOR") and env.get("TERM") != "dumb"


@dataclass(frozen=True)
class DaemonInfo:
    """One daemon of the ``daemons`` table (PostgreSQL: the active one and the standbys)."""

    host: str
    pid: int
    role: str  # "active" or "standby"
    heartbeat_age: float  # seconds
    alive: bool = True
    since: datetime | None = None  # when it took its role


@dataclass(frozen=True)
class DaemonFacts:
    """What is known about the daemons, as data: ``pid`` of the one holding this DATA_DIR (None
    when none does), the age in seconds of its heartbeat file (None when there is none), the
    rows of the ``daemons`` table, and after how many seconds a heartbeat is stale."""

    pid: int | None
    heartbeat_age: float | None
    daemons: tuple[DaemonInfo, ...] = field(default=())
    stale_after: float = 60.0


def daemon_lines(facts: DaemonFacts, palette: Palette = Palette()) -> list[str]:
    """The summary's first lines: is a daemon running, its pid, heartbeat age and role."""
    alive = [d for d in facts.daemons if d.alive]
    if alive:
        lines = []
        for daemon in sorted(alive, key=lambda d: d.role != "active"):
            where = f"{daemon.role} on {daemon.host} (pid {daemon.pid})"
            if daemon.since is not None:
                where += f" since {utils.format_utc(daemon.since)}"
            beat = _heartbeat(daemon.heartbeat_age, facts.stale_after, palette)
            lines.append(f"  {where}, {beat}")
        running = "running" if any(d.role == "active" for d in alive) else "running, no active"
        return [f"courtbot: {palette.paint(running, 'running')}", *lines]
    if facts.pid is not None:
        beat = _heartbeat(facts.heartbeat_age, facts.stale_after, palette)
        running = palette.paint("running", "running")
        return [f"courtbot: {running} (pid {facts.pid}), active, {beat}"]
    line = f"courtbot: {palette.paint('not running', 'not running')}"
    if facts.heartbeat_age is not None:
        line += f" (last heartbeat {utils.format_span(facts.heartbeat_age)} ago)"
    return [line]


@dataclass(frozen=True)
class LoadFacts:
    """The daemon's last load of the config files: when it finished, why it ran (``start``,
    ``SIGHUP``, ``file change``) and its errors, as the log has them."""

    at: datetime
    reason: str
    errors: tuple[str, ...] = ()
    #: The counts, as the log line has them.
    summary: str = ""
    #: The instances it made whose window was open already: they book at once.
    at_once: tuple[str, ...] = ()


def reload_lines(load: LoadFacts, pid: int) -> tuple[list[str], list[str]]:
    """What ``reload`` prints of the load its signal made: (lines for stdout: the counts, then
    each instance that books at once; lines for stderr: each error, one a line as the log has
    it, then how many)."""
    out = [f"courtbot (pid {pid}) loaded the config files ({load.reason}): {load.summary}"]
    out += [f"  {_one_line(line)}" for line in load.at_once]
    err = [f"error: {_one_line(line)}" for line in load.errors]
    if load.errors:
        count = len(load.errors)
        err.append(
            f"{count} error{'' if count == 1 else 's'}: what each names was not loaded (what it "
            "had stays as it was); the daemon goes on with the rest"
        )
    return out, err


def load_lines(load: LoadFacts | None, now: datetime, palette: Palette = Palette()) -> list[str]:
    """The summary's line on the last load: its time and, with errors, how many and the first
    (the rest are in the log and in ``reload``'s output)."""
    if load is None:
        return []
    ago = max((now - load.at).total_seconds(), 0.0)
    line = f"last load: {utils.format_utc(load.at)} ({load.reason}, {utils.format_span(ago)} ago)"
    if not load.errors:
        return [line + ", no error"]
    count = len(load.errors)
    errors = palette.paint(f"{count} error{'' if count == 1 else 's'}", "failed")
    first = _one_line(load.errors[0])
    if len(first) > REASON_SHOWN * 2:
        first = first[: REASON_SHOWN * 2 - 3] + "..."
    return [f"{line}, {errors}; the first: {first}"]


def _heartbeat(age: float | None, stale_after: float, palette: Palette) -> str:
    if age is None:
        return "no heartbeat yet"
    text = f"heartbeat {utils.format_span(age)} ago"
    if age > stale_after:
        text += ", " + palette.paint("stale: `health` fails", "stale")
    return text


def _local(row: Mapping[str, Any], field_name: str) -> datetime:
    return datetime.fromisoformat(row[field_name].replace("Z", "+00:00"))


def _courts(row: Mapping[str, Any]) -> str:
    """``3``, ``3, 4`` or ``any``: the court booked, else those wanted."""
    if row["status"] == "booked" and row["booked_court"]:
        return str(row["booked_court"])
    wanted = row["court_id"]
    if isinstance(wanted, list):
        return ", ".join("any" if c is None else str(c) for c in wanted)
    return "any" if wanted is None else str(wanted)


def _court(row: Mapping[str, Any]) -> str:
    """``court 3``, ``courts 3, 4`` or ``any court``: the booked one, else those wanted."""
    courts = _courts(row)
    if courts == "any":
        return "any court"
    return f"courts {courts}" if "," in courts else f"court {courts}"


def _when(row: Mapping[str, Any], now: datetime) -> str:
    return utils.format_local_short(
        _local(row, "desired_time"), utils.get_zone(row["timezone"]), now
    )


def _width(rows: Sequence[Mapping[str, Any]]) -> int:
    return max((len(row["schedule"]) for row in rows), default=0)


def next_lines(
    rows: Sequence[Mapping[str, Any]], now: datetime, palette: Palette = Palette()
) -> list[str]:
    """The next bookings (as ``instances.upcoming`` gives them), each with its local start, court,
    how far ahead it is and where it stands: ``wed-evening  Wed 3 Dec 17:00 GMT, court 3, in 5 d
    4 h: booked, ref bk-7``."""
    if not rows:
        return ["Next bookings: none ahead"]
    width = _width(rows)
    lines = ["Next bookings:"]
    for row in rows:
        start = _local(row, "desired_time")
        state = palette.paint(row["status"], row["status"])
        if row["status"] == "booked" and row["booking_ref"]:
            state += f", ref {row['booking_ref']}"
            state += _fallback_note(row)
        elif row["status"] == "watching":
            state += _watch_note(row, now)
        elif row["status"] == "pending":
            trigger = _local(row, "trigger_time")
            if trigger > now:
                state += f", window opens {utils.format_ahead(trigger, now)}"
            else:
                state += f", window opened {utils.format_span((now - trigger).total_seconds())} ago"
            if row.get("rehearsal"):
                state += f"; rehearsal {_one_line(row['rehearsal'])}"
        lines.append(
            f"  {row['schedule']:<{width}}  {_when(row, now)}, {_court(row)}, "
            f"{utils.format_ahead(start, now)}: {state}"
        )
    return lines


def _watch_note(row: Mapping[str, Any], now: datetime) -> str:
    """A watching instance's next try and the watch's end (CONTRACT 13)."""
    note = ""
    if row.get("next_try"):
        note += f", next try {utils.format_ahead(_local(row, 'next_try'), now)}"
    if row.get("watch_until"):
        until = _local(row, "watch_until").astimezone(utils.get_zone(row["timezone"]))
        note += f", watched until {until:%H:%M %Z}"
    return note


def _fallback_note(row: Mapping[str, Any]) -> str:
    """``, at 19:00 (first choice taken)`` for a booking made at a fallback time."""
    booked = row.get("booked_time")
    desired = _local(row, "desired_time").astimezone(utils.get_zone(row["timezone"]))
    if booked and booked != f"{desired:%H:%M}":
        return f", at {booked} (first choice taken)"
    return ""


def outcome_lines(
    rows: Sequence[Mapping[str, Any]], now: datetime, palette: Palette = Palette()
) -> list[str]:
    """The outcomes of the last ``OUTCOME_DAYS`` days (``instances.recent_outcomes``, latest
    first): their counts, then the latest ``OUTCOMES_SHOWN`` with when the request left and, for a
    failure, why."""
    if not rows:
        return [f"Last {OUTCOME_DAYS} days: no outcome"]
    counts = {status: sum(r["status"] == status for r in rows) for status in _FINAL}
    shown = ", ".join(
        palette.paint(f"{counts[status]} {status}", status) if counts[status] else f"0 {status}"
        for status in _FINAL
    )
    lines = [f"Last {OUTCOME_DAYS} days: {shown}"]
    width = _width(rows[:OUTCOMES_SHOWN])
    for row in rows[:OUTCOMES_SHOWN]:
        detail = palette.paint(row["status"], row["status"])
        if row["booking_ref"]:
            detail += f", ref {row['booking_ref']}"
        if row.get("sent"):
            detail += f"; {row['sent']}"
        lines.append(f"  {row['schedule']:<{width}}  {_when(row, now)}, {_court(row)}: {detail}")
        if row["status"] == "failed" and row["last_error"]:
            # Why, on a line of its own under the date (the rows below have it whole).
            reason = _one_line(row["last_error"])
            if len(reason) > REASON_SHOWN:
                reason = reason[: REASON_SHOWN - 3] + "..."
            lines.append(f"  {'':<{width}}  {reason}")
    if len(rows) > OUTCOMES_SHOWN:
        lines.append(f"  ... and {len(rows) - OUTCOMES_SHOWN} more")
    return lines


_FINAL = ("booked", "failed", "expired")


def _one_line(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a reason may quote
    a club, and what a club writes must neither break a row nor reach the terminal as a code."""
    return utils.CONTROL_RE.sub(lambda match: repr(match.group())[1:-1], text)


_COLUMNS = (
    ("SCHEDULE", "schedule"),
    ("KEY", "key"),
    ("DESIRED (LOCAL)", "desired"),
    ("TRIGGER (LOCAL)", "trigger_local"),
    ("TRIGGER (UTC)", "trigger_time"),
    ("COURT", "court"),
    ("STATUS", "status"),
    ("TRIES", "attempts"),
    ("REF", "booking_ref"),
    ("LAST ERROR", "last_error"),
)


def table_lines(rows: Sequence[Mapping[str, Any]], palette: Palette = Palette()) -> list[str]:
    """The rows under a header, columns aligned, times local (and the trigger in UTC too)."""
    cells = []
    for row in rows:
        zone = utils.get_zone(row["timezone"])
        shown = dict(row)
        shown["desired"] = utils.format_local(_local(row, "desired_time"), zone)
        shown["trigger_local"] = utils.format_local(_local(row, "trigger_time"), zone)
        shown["court"] = _courts(row)
        if row["status"] == "watching" and row.get("next_try"):
            next_try = _local(row, "next_try").astimezone(zone)
            shown["status"] = f"watching (next try {next_try:%H:%M:%S %Z})"
        values = [shown[name] for _, name in _COLUMNS]
        cells.append([_one_line(str(value)) if value is not None else "-" for value in values])
    widths = [max(len(head), *(len(r[i]) for r in cells)) for i, (head, _) in enumerate(_COLUMNS)]
    widths[-1] = 0  # the last column is not padded
    status_at = [name for _, name in _COLUMNS].index("status")
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(_COLUMNS, widths, strict=True)).rstrip()]
    for row, row_cells in zip(rows, cells, strict=True):
        padded = [cell.ljust(width) for cell, width in zip(row_cells, widths, strict=True)]
        padded[status_at] = palette.paint(padded[status_at], row["status"])
        lines.append("  ".join(padded).rstrip())
    return lines


def render(
    facts: DaemonFacts,
    upcoming: Sequence[Mapping[str, Any]],
    recent: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    *,
    now: datetime,
    palette: Palette = Palette(),
    empty: str = "no instance matches",
    load: LoadFacts | None = None,
) -> str:
    """The whole of ``status`` for a person: the summary, a blank line, the rows (``empty``
    when there are none)."""
    lines = [
        *daemon_lines(facts, palette),
        *load_lines(load, now, palette),
        *next_lines(upcoming, now, palette),
        *outcome_lines(recent, now, palette),
        "",
    ]
    lines += table_lines(rows, palette) if rows else [empty]
    return "\n".join(lines) + "\n"


def outcomes_since(now: datetime) -> datetime:
    """Where the summary's outcomes begin: ``OUTCOME_DAYS`` days before ``now``."""
    return now - timedelta(days=OUTCOME_DAYS)
