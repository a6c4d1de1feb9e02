"""Pure arithmetic for courtbot: times in zones, booking windows, rules, backoff, Fernet.

Nothing here reads the clock, the disk, the database or the network: callers pass ``now``.
That is why most unit tests live against this module.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import difflib
import email.utils
import hashlib
import html
import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from dateutil import rrule as du_rrule

SCHEDULE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
FERNET_SHAPE_RE = re.compile(r"gAAAAA[A-Za-z0-9_-]*={0,2}")
RETRY_AFTER_CAP_SECONDS = 30.0
INSTANCES_PER_RULE = 52
MAX_WINDOW_HOURS = 366 * 24
ALLOWED_FREQS = ("DAILY", "WEEKLY", "MONTHLY", "YEARLY")
RULE_EXAMPLE = '"FREQ=WEEKLY;BYDAY=WE" or "every Wednesday at 17:00"'
#: Control characters: C0, DEL, C1, and the Unicode line and paragraph separators. None belongs
#: in a token, a court or a name (a header cannot carry them; a log line would break on them).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# --------------------------------------------------------------------------- times and zones


def get_zone(name: str) -> ZoneInfo:
    """Return the IANA zone ``name``; ValueError with a readable message if there is none."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. 'Europe/London')")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. 'Europe/London')") from None


def localize(wall: datetime, zone: ZoneInfo) -> datetime:
    """Attach ``zone`` to a naive wall-clock time as zoneinfo does by default (PEP 495, fold=0).

    A time in a DST gap keeps the offset from before the gap, so it lands the gap's length later
    on the wall clock; a repeated time means its first occurrence.
    """
    # The round trip through UTC turns a gap's nonexistent wall clock into the one shown on the
    # clock at that instant (01:30 -> 02:30 BST): astimezone(zone) on a value already in ``zone``
    # returns it unchanged, and same-zone comparisons look at the wall clock only.
    return localized_instant(wall, zone).astimezone(zone)


def localized_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant (aware, UTC) that ``localize`` gives ``wall`` in ``zone``."""
    return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)


def wall_clock_issue(wall: datetime, zone: ZoneInfo) -> str | None:
    """Return "gap" when the naive ``wall`` time does not exist in ``zone``, "overlap" when it
    exists twice, else None."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return None
    # In a gap the round trip through UTC does not come back to the same wall clock.
    back = first.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
    return "gap" if back != wall else "overlap"


def describe_wall_clock_issue(wall: datetime, zone: ZoneInfo) -> str | None:
    """A one-line explanation of a gap or overlap at ``wall`` in ``zone`` (None when neither)."""
    issue = wall_clock_issue(wall, zone)
    if issue is None:
        return None
    moment = localize(wall, zone)
    shown = moment.astimezone(zone)
    if issue == "gap":
        return (
            f"{wall:%Y-%m-%d %H:%M} does not exist in {zone.key} (DST gap): "
            f"it is taken as {shown:%H:%M %Z} ({format_utc(moment)})"
        )
    return (
        f"{wall:%Y-%m-%d %H:%M} happens twice in {zone.key} (DST overlap): "
        f"the first one is taken ({shown:%H:%M %Z}, {format_utc(moment)})"
    )


_DESIRED_RE = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<h>\d{2}):(?P<m>\d{2})(?::(?P<s>\d{2}))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)


@dataclass(frozen=True)
class DesiredTime:
    """A parsed ``desired_time``: the wall clock in the entry's zone, and whether an explicit
    offset pinned it to an absolute instant."""

    wall: datetime  # naive wall-clock time in the entry's zone
    moment: datetime  # aware, in the entry's zone
    explicit_offset: bool


def parse_desired_time(text: Any, zone: ZoneInfo) -> DesiredTime:
    """Parse ``"YYYY-MM-DD HH:MM"`` (seconds and an explicit offset or ``Z`` optional).

    Without an offset the value is a wall-clock time in ``zone``; with one it is that instant,
    whose wall clock in ``zone`` is then used. ValueError names what was expected.
    """
    expected = "expected 'YYYY-MM-DD HH:MM' (e.g. '2026-12-02 17:00')"
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string; {expected}")
    match = _DESIRED_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a date and time; {expected}")
    try:
        wall = datetime.fromisoformat(
            f"{match['date']}T{match['h']}:{match['m']}:{match['s'] or '00'}"
        )
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a real date and time ({exc}); {expected}") from None
    tz = match["tz"]
    if tz is None:
        return DesiredTime(wall=wall, moment=localize(wall, zone), explicit_offset=False)
    try:
        aware = datetime.fromisoformat(wall.isoformat() + ("+00:00" if tz == "Z" else tz))
    except ValueError:
        raise ValueError(f"{text!r} has an invalid UTC offset {tz!r}; {expected}") from None
    moment = aware.astimezone(zone)
    return DesiredTime(wall=moment.replace(tzinfo=None), moment=moment, explicit_offset=True)


def format_utc(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` for an aware datetime."""
    return f"{moment.astimezone(UTC).isoformat(timespec='seconds')[:19]}Z"


def format_offset(moment: datetime, zone: ZoneInfo) -> str:
    """``YYYY-MM-DDTHH:MM:SS+HH:MM``: ``moment`` written with ``zone``'s actual offset then."""
    return moment.astimezone(zone).isoformat(timespec="seconds")


def format_local(moment: datetime, zone: ZoneInfo) -> str:
    """A person's reading of ``moment`` in ``zone``: ``Wed 2026-12-02 17:00 GMT``."""
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def format_local_short(moment: datetime, zone: ZoneInfo, now: datetime) -> str:
    """A person's short reading of ``moment`` in ``zone``: ``Wed 3 Dec 17:00 GMT``, with the
    year after the month when it is not ``now``'s year there (``Fri 7 Jan 2028 09:00 GMT``)."""
    local = moment.astimezone(zone)
    year = "" if local.year == now.astimezone(zone).year else f" {local.year}"
    return f"{local:%a} {local.day} {local:%b}{year} {local:%H:%M %Z}"


def format_span(seconds: float) -> str:
    """A duration as a person reads it, its two largest units, rounded down: ``45 s``,
    ``4 min 20 s``, ``3 h 5 min``, ``5 d 4 h`` (a zero second unit is left out: ``2 d``)."""
    total = int(max(seconds, 0.0))
    for size, unit, smaller, small_unit in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "min"),
        (60, "min", 1, "s"),
    ):
        if total >= size:
            rest = (total % size) // smaller
            return f"{total // size} {unit}" + (f" {rest} {small_unit}" if rest else "")
    return f"{total} s"


def format_ahead(moment: datetime, now: datetime) -> str:
    """``in 5 d 4 h`` for a moment ahead of ``now``, ``2 h 10 min ago`` for one behind."""
    seconds = (as_utc(moment) - as_utc(now)).total_seconds()
    return f"in {format_span(seconds)}" if seconds >= 0 else f"{format_span(-seconds)} ago"


#: A first request that left this long after its trigger is reported as late, with why.
LATE_AFTER_SECONDS = 1.0


def send_timing(trigger: datetime, first_sent: datetime, late_because: str | None) -> str:
    """When a booking's first request left, relative to its trigger, for a person: ``sent 0.8
    ms after the window opened``; past ``LATE_AFTER_SECONDS``, how late and why: ``sent 10.9 s
    late: courtbot was not running at the trigger`` (``late_because`` is that why; without one
    the trigger itself fired late)."""
    seconds = (as_utc(first_sent) - as_utc(trigger)).total_seconds()
    if seconds < 0:
        return f"sent {-seconds * 1000:.1f} ms before the window opened"
    if seconds < LATE_AFTER_SECONDS:
        return f"sent {seconds * 1000:.1f} ms after the window opened"
    late = f"{seconds:.1f} s" if seconds < 60 else format_span(seconds)
    why = late_because or "courtbot's trigger fired late (a busy machine or a clock jump)"
    return f"sent {late} late: {why}"


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def instance_key(schedule_id: str, desired: datetime) -> str:
    """The stable key of one booking: ``<schedule id>@<desired start UTC>``."""
    return f"{schedule_id}@{format_utc(desired)}"


def derive_schedule_id(entry_type: Any, desired_time: Any, rule: Any, timezone: Any) -> str:
    """An id for an entry without one, from the fields that define *when* it books only, so
    that editing its court or token keeps its identity."""
    material = json.dumps([entry_type, desired_time, rule, timezone], sort_keys=True, default=str)
    return "auto-" + hashlib.sha256(material.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- booking window


WINDOW_FORMS = (
    "expected '<N>h' (hours, e.g. '168h' or '47.5h'), '<N>d' (whole calendar days, e.g. '7d') "
    "or '<N>d@HH:MM' (at that local time N calendar days before, e.g. '6d@08:00')"
)


@dataclass(frozen=True)
class Window:
    """When the club opens bookings, relative to the desired start.

    ``unit`` "h": ``amount`` hours before (absolute time); "d": ``amount`` calendar days before,
    at the start's own wall-clock time, or at ``at`` (local time of day) when it is set.
    """

    amount: float
    unit: str
    at: time | None = None

    def __str__(self) -> str:
        amount = int(self.amount) if float(self.amount).is_integer() else self.amount
        if self.at is not None:
            return f"{amount}{self.unit}@{self.at:%H:%M}"
        return f"{amount}{self.unit}"


def parse_window(text: str) -> Window:
    """Parse a booking window: ``<N>h`` (N >= 0, decimals allowed), ``<N>d`` (integer N) or
    ``<N>d@HH:MM``. ValueError says what was expected; the caller names where the text came
    from (``BOOKING_WINDOW``, an entry's or a club file's ``window``)."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a window; {WINDOW_FORMS}")
    value = text.strip().lower()
    hours = re.fullmatch(r"(\d+(?:\.\d+)?)h", value)
    days = re.fullmatch(r"(\d+)d(?:@(\d\d):(\d\d))?", value)
    if hours:
        window = Window(float(hours[1]), "h")
    elif days:
        at = None
        if days[2] is not None:
            if int(days[2]) > 23 or int(days[3]) > 59:
                raise ValueError(
                    f"{text!r}: {days[2]}:{days[3]} is not a time of day; expected HH:MM from "
                    "00:00 to 23:59 (e.g. '6d@08:00')"
                )
            at = time(int(days[2]), int(days[3]))
        window = Window(int(days[1]), "d", at)
    else:
        raise ValueError(f"{text!r} is not a window; {WINDOW_FORMS}")
    if window.amount * (24 if window.unit == "d" else 1) > MAX_WINDOW_HOURS:
        raise ValueError(
            f"{text!r} is longer than a year; no club opens bookings that far ahead "
            "(e.g. '168h', '7d' or '6d@08:00')"
        )
    return window


def trigger_time(desired: datetime, zone: ZoneInfo, window: Window) -> datetime:
    """The instant the booking window opens for a start at ``desired``, in UTC.

    Hours: exactly that many hours earlier. Days: the same wall-clock time in ``zone`` that many
    calendar days earlier; with ``at``, that time of day on the day that many calendar days
    before the start's local date. A wall-clock time that falls in a DST gap resolves as
    ``localize`` does (forward by the gap's length), a repeated one means its first occurrence.
    With ``at``, the result may lie after ``desired`` (``0d@20:00`` for a 17:00 start): callers
    that plan bookings refuse such a window (see ``window_opens_after``).
    """
    if window.unit == "h":
        return as_utc(desired) - timedelta(hours=window.amount)
    # Through UTC, so that only the instant counts, not how ``desired`` happens to be written.
    local = as_utc(desired).astimezone(zone).replace(tzinfo=None)
    if window.at is not None:
        wall = datetime.combine(local.date() - timedelta(days=int(window.amount)), window.at)
    else:
        wall = local - timedelta(days=int(window.amount))
    return as_utc(localize(wall, zone))


def window_opens_after(desired: datetime, zone: ZoneInfo, window: Window) -> datetime | None:
    """The trigger of a start at ``desired`` when ``window`` would open only after the start
    (nothing could then be booked), else None. Only a window at a clock time can do that."""
    if window.at is None:
        return None
    trigger = trigger_time(desired, zone, window)
    return trigger if trigger > as_utc(desired) else None


# --------------------------------------------------------------------------- rules


class RuleError(ValueError):
    """A rule that cannot be used; the message says what was wrong and shows a valid example."""


#: How far past its last needed period a rule is searched for instances. Long enough for the
#: rarest rules people write: 29 February comes every 4 years (8 across 2100, which is no leap
#: year), ISO week 53 every 5 to 7. A rule whose next instance is further away than this (29
#: February on a Monday: every 28 years) has none ahead until it comes within reach.
RULE_SEARCH_YEARS = 8
_PERIOD_DAYS = {"DAILY": 1, "WEEKLY": 7, "MONTHLY": 31, "YEARLY": 366}
_MAX_SEARCH_DAYS = (MAXYEAR - 1) * 366


@dataclass(frozen=True)
class ParsedRule:
    """A recurring rule ready to expand in wall-clock time.

    ``rfc`` is the RFC 5545 text it amounts to (``DTSTART``, ``RRULE`` and ``EXDATE`` lines),
    ``zone_name`` the zone a ``DTSTART;TZID=`` named (None when it named none), ``english``
    whether it came from an English sentence.
    """

    rfc: str
    start: datetime  # naive wall clock in the entry's zone
    rule: du_rrule.rrule  # the pattern and COUNT, in naive wall-clock time; UNTIL is below
    zone_name: str | None
    english: bool
    #: UNTIL: naive, a wall clock compared with each instance's wall clock (RFC 5545's local
    #: time); aware (UTC), an instant compared with each instance's instant (RFC 5545: the UNTIL
    #: of a start with a zone is in UTC); None without UNTIL.
    until: datetime | None = None
    skip_dates: frozenset[date] = frozenset()  # local dates with no instance
    skip_instants: frozenset[datetime] = frozenset()  # aware UTC instants that are no instance
    period: timedelta = timedelta(days=1)  # the longest one period of the rule can last
    count: int | None = None  # COUNT
    #: A rule that steps a day at a time (see ``_stepping_days``): its weekdays (Monday 0),
    #: expanded without dateutil; None for any other rule.
    weekdays: tuple[int, ...] | None = None


_DAYS = {
    "mon": "MO",
    "tue": "TU",
    "wed": "WE",
    "thu": "TH",
    "fri": "FR",
    "sat": "SA",
    "sun": "SU",
}
_FULL_DAYS = {
    "monday": "mon",
    "tuesday": "tue",
    "wednesday": "wed",
    "thursday": "thu",
    "friday": "fri",
    "saturday": "sat",
    "sunday": "sun",
}
_LONGER_DAYS = {"tues": "tue", "weds": "wed", "thur": "thu", "thurs": "thu"}
_DAY_CODES = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
_DAY_INDEX = {code: i for i, code in enumerate(_DAY_CODES)}
_DAY_GROUPS = {"weekday": ("MO", "TU", "WE", "TH", "FR"), "weekend": ("SA", "SU")}
_WEEKDAY_WORD = r"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_LIST_SEP = r"\s*(?:,\s*and|,|and)\s*"
_ISO_DATE = r"\d{4}-\d{2}-\d{2}"
_ENGLISH_RE = re.compile(
    r"every\s+(?:(?P<group>weekday|weekend)s?|(?P<other>other\s+)?"
    rf"(?P<days>day|{_WEEKDAY_WORD}(?:{_LIST_SEP}{_WEEKDAY_WORD})*))"
    r"\s+at\s+(?P<h>\d{1,2}):(?P<m>\d{2})"
    rf"(?:\s+starting\s+(?P<start>{_ISO_DATE}))?"
    rf"(?:\s+until\s+(?P<until>{_ISO_DATE}))?"
    rf"(?:\s+except\s+(?P<except>{_ISO_DATE}(?:{_LIST_SEP}{_ISO_DATE})*))?",
    re.IGNORECASE,
)
_ENGLISH_EXAMPLE = (
    "e.g. 'every Wednesday at 17:00', 'every other Friday at 10:00 starting 2025-08-03', "
    "'every Tuesday and Thursday at 07:30 until 2026-06-30'"
)


def _weekday_code(word: str) -> str:
    lowered = word.lower()
    singular = lowered[:-1] if lowered.endswith("s") and lowered[:-1] in _FULL_DAYS else lowered
    if singular in _FULL_DAYS:
        return _DAYS[_FULL_DAYS[singular]]
    if singular in _LONGER_DAYS:
        return _DAYS[_LONGER_DAYS[singular]]
    if singular in _DAYS:
        return _DAYS[singular]
    raise RuleError(f"{word!r} is not a weekday{_did_you_mean_day(word)}; {_ENGLISH_EXAMPLE}")


def _did_you_mean_day(word: str) -> str:
    """`` (did you mean 'Wednesday'?)`` for a misspelt weekday, else the empty string."""
    close = difflib.get_close_matches(word.lower(), list(_FULL_DAYS), n=1, cutoff=0.7)
    return f" (did you mean {close[0].capitalize()!r}?)" if close else ""


_KNOWN_DAY_WORDS = frozenset(
    {"day", "weekday", "weekdays", "weekend", "weekends", *_DAYS, *_LONGER_DAYS}
    | {*_FULL_DAYS, *(f"{day}s" for day in _FULL_DAYS)}
)


def _why_not_english(text: str) -> str:
    """Why a sentence is no English rule, as precisely as it can be told: a time that is not
    ``HH:MM``, a misspelt weekday, else the general form with examples."""
    at = re.search(r"\bat\s+(\S+)", text, re.IGNORECASE)
    if at is not None and not re.match(r"\d{1,2}:\d{2}", at[1]):
        return (
            f"{text!r}: 'at {at[1]}' is not a time of day: write it as HH:MM on the 24-hour "
            "clock (e.g. 'at 19:00', 'at 07:30')"
        )
    days = re.match(r"every\s+(?:other\s+)?(.+?)\s+at\b", text, re.IGNORECASE)
    if days is not None:
        for word in re.split(_LIST_SEP, days[1], flags=re.IGNORECASE):
            if word and " " not in word and word.lower() not in _KNOWN_DAY_WORDS:
                hint = _did_you_mean_day(word)
                if hint:
                    return f"{word!r} is not a weekday{hint}; {_ENGLISH_EXAMPLE}"
    return f"{text!r} is not an English rule I understand; {_ENGLISH_EXAMPLE}"


def _iso_date(text: str, what: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise RuleError(f"{what} {text!r} is not a real date (YYYY-MM-DD)") from None


def parse_english_rule(text: str, *, start: date | None, today: date) -> ParsedRule:
    """Turn an English sentence (CONTRACT section 4) into a rule.

    ``start`` is the date of the entry's ``desired_time`` if it has one; ``today`` is today's date
    in the entry's zone (the start of rules with neither ``starting`` nor ``desired_time``).
    The dates after ``except`` are the rule's ``skip_dates``, and EXDATE lines in its ``rfc``.
    """
    match = _ENGLISH_RE.fullmatch(" ".join(text.split()))
    if not match:
        raise RuleError(_why_not_english(" ".join(text.split())))
    hour, minute = int(match["h"]), int(match["m"])
    if hour > 23 or minute > 59:
        raise RuleError(f"{match['h']}:{match['m']} in {text!r} is not a time of day (00:00-23:59)")
    other = bool(match["other"])
    if match["start"]:
        first_date = _iso_date(match["start"], "starting")
    elif start is not None:
        first_date = start
    elif other:
        raise RuleError(
            f"{text!r}: 'every other' needs a start date to count weeks from; add "
            "'starting YYYY-MM-DD' (e.g. 'every other Friday at 10:00 starting 2025-08-03')"
        )
    else:
        first_date = today
    until_date = _iso_date(match["until"], "until") if match["until"] else None
    skipped = frozenset(
        _iso_date(word, "except") for word in re.split(_LIST_SEP, match["except"] or "") if word
    )

    if match["group"]:
        codes: Sequence[str] | None = _DAY_GROUPS[match["group"].lower()]
    elif match["days"].lower() == "day":
        codes = None
    else:
        words = re.split(_LIST_SEP, match["days"], flags=re.IGNORECASE)
        codes = sorted({_weekday_code(w) for w in words if w}, key=_DAY_INDEX.__getitem__)
    parts = {"FREQ": "DAILY" if codes is None else "WEEKLY"}
    if other:
        parts["INTERVAL"] = "2"
    if codes is not None:
        # The first instance is the first matching day on or after the start date; weeks are
        # counted in blocks of seven days beginning that day (WKST = its weekday).
        offset = min((_DAY_INDEX[c] - first_date.weekday()) % 7 for c in codes)
        first_date += timedelta(days=offset)
        parts["BYDAY"] = ",".join(codes)
        if other:
            parts["WKST"] = _DAY_CODES[first_date.weekday()]
    until: datetime | None = None
    if until_date is not None:
        # Starting from today, a passed "until" means the rule has run out (no instance), which
        # is no error in a file that was valid when written.
        if until_date < first_date and (match["start"] or start is not None):
            raise RuleError(f"{text!r}: until {until_date} is before the first day {first_date}")
        until = datetime.combine(until_date, time(23, 59, 59))
        parts["UNTIL"] = f"{until:%Y%m%dT%H%M%S}"
    at = time(hour, minute)
    dtstart = datetime.combine(first_date, at)
    # One time of day: skipping a date is excluding that date's one instance.
    exdates = ",".join(f"{datetime.combine(d, at):%Y%m%dT%H%M%S}" for d in sorted(skipped))
    return _build_rule(
        parts,
        dtstart,
        None,
        english=True,
        until=until,
        skip_dates=skipped,
        exdate_lines=[f"EXDATE:{exdates}"] if exdates else [],
    )


_DTSTART_RE = re.compile(
    r"DTSTART(?:;TZID=(?P<tzid>[^:;]+))?(?:;VALUE=DATE-TIME)?:(?P<value>\d{8}T\d{6})(?P<z>Z?)",
    re.IGNORECASE,
)
_EXDATE_RE = re.compile(r"EXDATE(?P<params>(?:;[^:;]*)*):(?P<values>.*)", re.IGNORECASE)
_EXDATE_EXAMPLE = (
    "e.g. 'EXDATE:20261224T170000', 'EXDATE;TZID=Europe/London:20261224T170000,20261231T170000' "
    "or 'EXDATE;VALUE=DATE:20261224'"
)
_UNTIL_RE = re.compile(r"(?P<date>\d{8})(?:T(?P<time>\d{6})(?P<z>Z?))?")


@dataclass(frozen=True)
class _Exdate:
    """One parsed EXDATE line: local dates (VALUE=DATE), or date-times that are naive (wall
    clocks in ``tzid``, or in the rule's zone without one) or aware (UTC, written with Z)."""

    tzid: str | None
    dates: tuple[date, ...]
    times: tuple[datetime, ...]

    def instants(self, zone: ZoneInfo) -> list[datetime]:
        """The date-times as aware UTC instants (local ones read in ``tzid``, else ``zone``)."""
        here = get_zone(self.tzid) if self.tzid else zone
        return [t if t.tzinfo else as_utc(localize(t, here)) for t in self.times]

    def lines(self, rule_tzid: str | None) -> list[str]:
        """The line again, in RFC 5545's form: times with Z apart from local ones (a TZID must
        not be given with UTC times), and local ones naming the rule's shown zone if any."""
        if self.dates:
            return ["EXDATE;VALUE=DATE:" + ",".join(f"{d:%Y%m%d}" for d in self.dates)]
        tzid = self.tzid or rule_tzid
        local = [f"{t:%Y%m%dT%H%M%S}" for t in self.times if t.tzinfo is None]
        utc = [f"{t:%Y%m%dT%H%M%SZ}" for t in self.times if t.tzinfo is not None]
        return [
            *([f"EXDATE{f';TZID={tzid}' if tzid else ''}:" + ",".join(local)] if local else []),
            *(["EXDATE:" + ",".join(utc)] if utc else []),
        ]


def _parse_exdate(line: str) -> _Exdate:
    bad = f"{line!r} is not an EXDATE line; {_EXDATE_EXAMPLE}"
    match = _EXDATE_RE.fullmatch(line)
    if not match:
        raise RuleError(bad)
    tzid: str | None = None
    value_type = "DATE-TIME"
    for param in match["params"].split(";")[1:]:
        name, _, value = param.partition("=")
        if name.upper() == "TZID" and value and tzid is None:
            tzid = value
            try:
                get_zone(value)
            except ValueError as exc:
                raise RuleError(f"{line!r}: TZID {exc}") from None
        elif name.upper() == "VALUE" and value.upper() in ("DATE", "DATE-TIME"):
            value_type = value.upper()
        else:
            raise RuleError(bad)
    if value_type == "DATE" and tzid is not None:
        raise RuleError(f"{line!r}: a TZID does not apply to dates (VALUE=DATE); {_EXDATE_EXAMPLE}")
    dates: list[date] = []
    times: list[datetime] = []
    for written in match["values"].upper().split(","):
        value = written.strip()
        try:
            if value_type == "DATE":
                if not re.fullmatch(r"\d{8}", value):
                    raise ValueError
                dates.append(datetime.strptime(value, "%Y%m%d").date())
            else:
                if not re.fullmatch(r"\d{8}T\d{6}Z?", value):
                    raise ValueError
                moment = datetime.strptime(value[:15], "%Y%m%dT%H%M%S")
                times.append(moment.replace(tzinfo=UTC) if value.endswith("Z") else moment)
        except ValueError:
            expected = (
                "a date (YYYYMMDD)"
                if value_type == "DATE"
                else "a date-time (YYYYMMDDTHHMMSS, Z after it for UTC; a date alone needs "
                "EXDATE;VALUE=DATE:)"
            )
            raise RuleError(f"{line!r}: {value!r} is not {expected}") from None
    return _Exdate(tzid=tzid, dates=tuple(dates), times=tuple(times))


def _rfc_parts(line: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for chunk in line.split(";"):
        if not chunk:
            continue
        name, sep, value = chunk.partition("=")
        if not sep or not value:
            raise RuleError(
                f"{line!r} is not a valid rule: {chunk!r} is not NAME=VALUE; e.g. {RULE_EXAMPLE}"
            )
        parts[name.strip().upper()] = value.strip()
    return parts


def _parse_dtstart(line: str, zone: ZoneInfo) -> tuple[datetime, str | None, ZoneInfo]:
    """A ``DTSTART`` line: (its naive wall clock, the TZID it names or None, the zone to read
    the rule in: the TZID's, else ``zone``)."""
    match = _DTSTART_RE.fullmatch(line)
    if not match:
        raise RuleError(
            f"{line!r} is not a DTSTART line; expected e.g. 'DTSTART:20260107T170000' or "
            "'DTSTART;TZID=Europe/London:20260107T170000'"
        )
    try:
        value = datetime.strptime(match["value"], "%Y%m%dT%H%M%S")
    except ValueError:
        raise RuleError(f"{line!r}: {match['value']!r} is not a real date and time") from None
    if match["tzid"]:
        try:
            zone = get_zone(match["tzid"])
        except ValueError as exc:
            raise RuleError(f"{line!r}: TZID {exc}") from None
    if match["z"]:
        value = value.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)
    return value, match["tzid"] or None, zone


def parse_rfc_rule(text: str, *, start: datetime | None, zone: ZoneInfo) -> ParsedRule:
    """Parse an RFC 5545 rule (``RRULE:`` optional, optional ``DTSTART`` line and ``EXDATE``
    lines around it).

    ``start`` is the entry's ``desired_time`` as a naive wall clock in ``zone`` (None when the
    entry has none). A ``DTSTART;TZID=`` line's zone is returned in ``zone_name``: the caller checks
    it against the entry's ``timezone``. Times are expanded in wall-clock time, never with offsets.
    A ``UNTIL`` in UTC (or any ``UNTIL`` with a ``TZID`` start) is an instant; EXDATE date-times
    are instants (``skip_instants``) and EXDATE dates local dates (``skip_dates``).
    """
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text.strip()) if ln.strip()]
    dtstart_wall: datetime | None = None
    zone_name: str | None = None
    rule_lines: list[str] = []
    exdates: list[_Exdate] = []
    for line in lines:
        if line.upper().startswith("DTSTART"):
            dtstart_wall, tzid, zone = _parse_dtstart(line, zone)
            zone_name = tzid or zone_name
        elif line.upper().startswith("EXDATE"):
            exdates.append(_parse_exdate(line))
        else:
            rule_lines.append(line[6:] if line.upper().startswith("RRULE:") else line)
    if len(rule_lines) != 1:
        raise RuleError(
            f"{text!r} must hold exactly one rule line (and optionally a DTSTART line); "
            f"e.g. {RULE_EXAMPLE}"
        )
    rule_line = rule_lines[0]
    parts = _rfc_parts(rule_line)
    freq = _check_freq(rule_line, parts)
    until = _parse_until(rule_line, parts, zone, zoned=zone_name is not None)
    _check_parts(rule_line, parts, freq)
    if dtstart_wall is None:
        if start is None:
            raise RuleError(
                f"{rule_line!r} has no start: add a 'desired_time' (the first possible date and "
                "time of day) or a DTSTART line"
            )
        dtstart_wall = start
    elif start is not None and start != dtstart_wall:
        raise RuleError(
            f"DTSTART {dtstart_wall:%Y-%m-%d %H:%M} and desired_time {start:%Y-%m-%d %H:%M} "
            "disagree; give the start once"
        )
    # An UNTIL that is an instant is shown in UTC, after a DTSTART that names its zone (RFC 5545
    # forbids a local UNTIL with a zoned start, and a UTC one with a floating start).
    shown_zone = zone_name or (zone.key if until is not None and until.tzinfo else None)
    if until is not None:
        parts["UNTIL"] = f"{until:%Y%m%dT%H%M%S}" + ("Z" if until.tzinfo else "")
    return _build_rule(
        parts,
        dtstart_wall,
        zone_name,
        english=False,
        until=until,
        shown_zone=shown_zone,
        skip_dates=frozenset(d for ex in exdates for d in ex.dates),
        skip_instants=frozenset(t for ex in exdates for t in ex.instants(zone)),
        exdate_lines=[line for ex in exdates for line in ex.lines(shown_zone)],
    )


def _check_freq(rule_line: str, parts: dict[str, str]) -> str:
    """The rule's FREQ, one of ALLOWED_FREQS; RuleError otherwise."""
    freq = parts.get("FREQ", "").upper()
    if freq not in ALLOWED_FREQS:
        shown = f"'FREQ={parts['FREQ']}'" if "FREQ" in parts else "no FREQ"
        raise RuleError(
            f"{rule_line!r} is not a valid rule ({shown}: FREQ must be one of "
            f"{', '.join(ALLOWED_FREQS)}); e.g. {RULE_EXAMPLE}"
        )
    if "BYEASTER" in parts:
        # A python-dateutil extension, not RFC 5545 (and the one part that does not repeat
        # with the calendar, which the bounded search relies on).
        raise RuleError(
            f"{rule_line!r} is not a valid rule (unknown parameter 'BYEASTER'); e.g. {RULE_EXAMPLE}"
        )
    return freq


def _parse_until(
    rule_line: str, parts: dict[str, str], zone: ZoneInfo, *, zoned: bool
) -> datetime | None:
    """The rule's UNTIL (see ``ParsedRule.until``): aware UTC when written with Z or after a
    DTSTART with a TZID (``zoned``), else a naive wall clock; None without one."""
    if "UNTIL" not in parts:
        return None
    written = _UNTIL_RE.fullmatch(parts["UNTIL"].upper())
    try:
        if not written:
            raise ValueError
        until = datetime.strptime(written["date"] + (written["time"] or "000000"), "%Y%m%d%H%M%S")
    except ValueError:
        raise RuleError(f"{rule_line!r}: UNTIL {parts['UNTIL']!r} is not a date-time") from None
    if written["z"]:
        return until.replace(tzinfo=UTC)
    if zoned:
        # RFC 5545 wants UTC here; a local time is read as the wall clock in the TZID zone.
        return as_utc(localize(until, zone))
    return until


def _check_parts(rule_line: str, parts: dict[str, str], freq: str) -> None:
    """Refuse what RFC 5545 forbids or dateutil would misread (after FREQ and UNTIL)."""
    if "COUNT" in parts and "UNTIL" in parts:
        raise RuleError(f"{rule_line!r}: COUNT and UNTIL cannot both be given (RFC 5545)")
    # dateutil accepts INTERVAL=0 or below, then loops forever or fails while expanding.
    if "INTERVAL" in parts and not re.fullmatch(r"\+?0*[1-9]\d*", parts["INTERVAL"]):
        raise RuleError(
            f"{rule_line!r}: INTERVAL {parts['INTERVAL']!r} must be a whole number of at least 1; "
            f"e.g. {RULE_EXAMPLE}"
        )
    _check_numbered_days(rule_line, parts, freq)
    _check_month_days(rule_line, parts)


_MONTH_DAYS = {
    1: 31,
    2: 29,
    3: 31,
    4: 30,
    5: 31,
    6: 30,
    7: 31,
    8: 31,
    9: 30,
    10: 31,
    11: 30,
    12: 31,
}


def _check_numbered_days(rule_line: str, parts: dict[str, str], freq: str) -> None:
    """Refuse a numbered BYDAY (``1MO``, ``-1FR``) where RFC 5545 forbids one: dateutil would
    read ``FREQ=WEEKLY;BYDAY=1MO`` as every Monday, not what was written."""
    numbered = [d for d in parts.get("BYDAY", "").split(",") if re.match(r"\s*[+-]?\d", d)]
    if not numbered:
        return
    if freq in ("DAILY", "WEEKLY"):
        raise RuleError(
            f"{rule_line!r}: BYDAY={parts['BYDAY']} has a numbered day ({numbered[0]}), which "
            f"RFC 5545 allows only with FREQ=MONTHLY or YEARLY; e.g. 'FREQ={freq};BYDAY=MO' or "
            "'FREQ=MONTHLY;BYDAY=1MO'"
        )
    if freq == "YEARLY" and "BYWEEKNO" in parts:
        raise RuleError(
            f"{rule_line!r}: BYDAY={parts['BYDAY']} has a numbered day ({numbered[0]}), which "
            "RFC 5545 forbids with BYWEEKNO; e.g. 'FREQ=YEARLY;BYWEEKNO=20;BYDAY=MO'"
        )


def _check_month_days(rule_line: str, parts: dict[str, str]) -> None:
    """Refuse BYMONTHDAY values no listed month has: such a rule can never have an instance (a
    mistake worth an error, not a warning), and 0 is no day at all."""
    if "BYMONTHDAY" not in parts:
        return
    try:
        days = [int(d) for d in parts["BYMONTHDAY"].split(",")]
        months = [int(m) for m in parts.get("BYMONTH", "1,2,3,4,5,6,7,8,9,10,11,12").split(",")]
    except ValueError:
        return  # dateutil names the bad value
    longest = max(_MONTH_DAYS.get(m, 31) for m in months)
    if any(d == 0 or abs(d) > longest for d in days):
        raise RuleError(
            f"{rule_line!r}: BYMONTHDAY={parts['BYMONTHDAY']} has a day that no month of the rule "
            f"has (days are 1 to {longest}, or -1 for the last); e.g. 'FREQ=MONTHLY;BYMONTHDAY=15'"
        )


def _build_rule(
    parts: dict[str, str],
    dtstart: datetime,
    zone_name: str | None,
    *,
    english: bool,
    until: datetime | None = None,
    shown_zone: str | None = None,
    skip_dates: frozenset[date] = frozenset(),
    skip_instants: frozenset[datetime] = frozenset(),
    exdate_lines: Sequence[str] = (),
) -> ParsedRule:
    rule_line = ";".join(f"{k}={v}" for k, v in parts.items())
    # UNTIL stays out of dateutil's rule: the expansion applies it, as an instant when it is one
    # (dateutil compares wall clocks) and as the end of a search that dateutil cannot bound.
    pattern = ";".join(f"{k}={v}" for k, v in parts.items() if k != "UNTIL")
    try:
        rule = du_rrule.rrulestr(pattern, dtstart=dtstart)
    except (ValueError, TypeError) as exc:
        raise RuleError(f"{rule_line!r} is not a valid rule ({exc}); e.g. {RULE_EXAMPLE}") from None
    if not isinstance(rule, du_rrule.rrule):
        raise RuleError(f"{rule_line!r} must be a single rule; e.g. {RULE_EXAMPLE}")
    tzid = f";TZID={shown_zone}" if shown_zone else ""
    rfc = "\n".join([f"DTSTART{tzid}:{dtstart:%Y%m%dT%H%M%S}", f"RRULE:{rule_line}", *exdate_lines])
    days = _PERIOD_DAYS[parts["FREQ"].upper()] * int(parts.get("INTERVAL", "1"))
    return ParsedRule(
        rfc=rfc,
        start=dtstart,
        rule=rule,
        zone_name=zone_name,
        english=english,
        until=until,
        skip_dates=skip_dates,
        skip_instants=skip_instants,
        period=timedelta(days=min(days, _MAX_SEARCH_DAYS)),
        count=int(parts["COUNT"]) if "COUNT" in parts else None,  # dateutil has read it
        weekdays=_stepping_days(parts, dtstart),
    )


def _stepping_days(parts: dict[str, str], dtstart: datetime) -> tuple[int, ...] | None:
    """The weekdays of a rule whose instances are whole days apart at the start's time of day:
    FREQ=DAILY or WEEKLY, INTERVAL 1, at most a BYDAY of plain days, COUNT, UNTIL and WKST
    (which changes nothing at INTERVAL 1). Such a rule, the common weekly booking, is expanded
    by stepping from day to day instead of through dateutil (several times faster, the same
    instances: tests/test_rules.py compares them). None for any other rule."""
    freq = parts["FREQ"].upper()
    if freq not in ("DAILY", "WEEKLY") or not set(parts) <= _STEPPING_PARTS:
        return None
    if parts.get("INTERVAL", "1").strip() not in ("1", "01"):
        return None
    if "BYDAY" not in parts:
        return tuple(range(7)) if freq == "DAILY" else (dtstart.weekday(),)
    days = {_DAY_INDEX.get(day.strip().upper()) for day in parts["BYDAY"].split(",")}
    if None in days:
        return None
    return tuple(sorted(d for d in days if d is not None))


_STEPPING_PARTS = frozenset({"FREQ", "INTERVAL", "BYDAY", "COUNT", "UNTIL", "WKST"})


def is_english_rule(text: str) -> bool:
    """True when ``text`` reads as an English rule rather than RFC 5545."""
    return text.strip().lower().startswith("every")


# dateutil looks for a rule's next instance until the end of year 9999, and nothing stops it
# sooner when no day matches (FREQ=DAILY;BYSETPOS=2 walks eight thousand years: seconds). The
# Gregorian calendar repeats, so the search runs on a copy of the rule moved forward by whole
# years that keep every year's calendar (leap or not, weekday of 1 January), placed so that
# the search horizon falls in the last years before 9999, where dateutil stops by itself.


def _calendar(year: int) -> tuple[bool, int]:
    return calendar.isleap(year), date(year, 1, 1).weekday()


def _calendar_shift(first: int, last: int) -> int:
    """The most years (0 if none) that can be added to every year from ``first`` to ``last``
    without changing its calendar and with ``last`` still before year 9999."""
    first = max(first, 1)
    if last >= MAXYEAR - 1:
        return 0
    calendars = [_calendar(year) for year in range(first, last + 1)]
    # Every 400 years the calendar repeats exactly, so at most 400 tries; within a century
    # with no skipped leap year it repeats every 28, which is what is found first.
    for shift in range(MAXYEAR - 1 - last, 0, -1):
        if all(_calendar(first + i + shift) == c for i, c in enumerate(calendars)):
            return shift
    return 0


def _horizon(rule: ParsedRule, zone: ZoneInfo, since: datetime, limit: int) -> datetime:
    """The last wall clock to look at from ``since``: ``limit`` periods of the rule and
    ``RULE_SEARCH_YEARS`` years after the later of ``since`` and the start, no later than UNTIL
    (its wall clock two days on, for an instant: offsets change by less than that)."""
    days = min(rule.period.days * max(limit, 1) + 366 * RULE_SEARCH_YEARS, _MAX_SEARCH_DAYS)
    try:
        horizon = max(since, rule.start) + timedelta(days=days)
    except OverflowError:
        horizon = datetime.max
    if rule.until is not None:
        if rule.until.tzinfo is None:
            end = rule.until
        else:
            try:
                end = rule.until.astimezone(zone).replace(tzinfo=None) + timedelta(days=2)
            except OverflowError:
                end = datetime.max
        horizon = min(horizon, end)
    return horizon


def _rule_walls(rule: ParsedRule, horizon: datetime) -> Iterator[datetime]:
    """The rule's wall clocks from its start to ``horizon``, in order, in bounded time."""
    if horizon < rule.start:
        return
    if rule.weekdays is not None:
        yield from _stepping_walls(rule.start, rule.weekdays, rule.count, horizon)
        return
    # The years dateutil reads while expanding: the one before (ISO weeks) and the one after.
    shift = _calendar_shift(rule.start.year - 1, horizon.year + 1)
    probe = rule.rule
    if shift:
        probe = probe.replace(dtstart=rule.start.replace(year=rule.start.year + shift))
        horizon = horizon.replace(year=horizon.year + shift)
    try:
        for wall in probe:
            if wall > horizon:
                return
            yield wall.replace(year=wall.year - shift) if shift else wall
    except (ValueError, OverflowError):
        return  # dateutil reached the end of year 9999, past the horizon


def _stepping_walls(
    start: datetime, weekdays: tuple[int, ...], count: int | None, horizon: datetime
) -> Iterator[datetime]:
    """A stepping rule's wall clocks (``_stepping_days``): from ``start`` (to the second, as
    dateutil reads it), each of ``weekdays`` at its time of day, at most ``count``, up to
    ``horizon``."""
    wall = start.replace(microsecond=0)
    # Days from each weekday to the rule's next one.
    gaps = {day: min((other - day - 1) % 7 + 1 for other in weekdays) for day in range(7)}
    if wall.weekday() not in weekdays:
        wall += timedelta(days=gaps[wall.weekday()])
    left = count
    try:
        while wall <= horizon and left != 0:
            yield wall
            if left is not None:
                left -= 1
            wall += timedelta(days=gaps[wall.weekday()])
    except OverflowError:
        return  # past year 9999, past the horizon


def expand_rule_walls(
    rule: ParsedRule,
    zone: ZoneInfo,
    after: datetime,
    limit: int = INSTANCES_PER_RULE,
    *,
    skip: Collection[date] = frozenset(),
) -> list[tuple[datetime, datetime]]:
    """The next ``limit`` starts strictly after ``after``, soonest first: pairs of (the rule's
    naive wall clock, the aware instant in ``zone``). Empty when the rule has no instance ahead
    within its search horizon (``describe_no_instance`` says why).

    The rule runs in naive wall-clock time; each occurrence is then localized (fold=0), so 17:00
    stays 17:00 across DST. Two wall clocks on one instant (a gap) give one instance; an
    instant before the previous one (a wall clock in a gap) is kept and sorted. Instances on a
    date in ``skip`` or the rule's ``skip_dates``, or at one of its ``skip_instants``, are left
    out and do not count towards ``limit``.
    """
    if limit <= 0:
        return []
    skipped = rule.skip_dates | frozenset(skip)
    until_instant = rule.until if rule.until is not None and rule.until.tzinfo else None
    after_utc = as_utc(after)
    # Start a day early in wall-clock terms: offsets never differ by a day, so nothing is missed.
    since = after.astimezone(zone).replace(tzinfo=None) - timedelta(days=1)
    found: dict[datetime, tuple[datetime, datetime]] = {}
    enough: datetime | None = None
    for wall in _rule_walls(rule, _horizon(rule, zone, since, limit)):
        if enough is not None and wall > enough:
            break
        if wall < since or wall.date() in skipped:
            continue
        # ``localize`` in two steps: the instant first, the wall clock shown only if kept.
        instant = localized_instant(wall, zone)
        if instant <= after_utc or instant in found or instant in rule.skip_instants:
            continue
        if until_instant is not None and instant > until_instant:
            continue
        found[instant] = (wall, instant.astimezone(zone))
        if len(found) == limit:
            # A wall clock more than two days later is a later instant than any found so far.
            enough = wall + timedelta(days=2)
    return [found[instant] for instant in sorted(found)][:limit]


def expand_rule(
    rule: ParsedRule,
    zone: ZoneInfo,
    after: datetime,
    limit: int = INSTANCES_PER_RULE,
    *,
    skip: Collection[date] = frozenset(),
) -> list[datetime]:
    """The next ``limit`` starts strictly after ``after``, aware in ``zone`` (see above)."""
    return [moment for _, moment in expand_rule_walls(rule, zone, after, limit, skip=skip)]


def describe_no_instance(
    rule: ParsedRule, zone: ZoneInfo, after: datetime, limit: int = INSTANCES_PER_RULE
) -> str:
    """Why ``expand_rule_walls(rule, zone, after, limit)`` found nothing: the end of the warning
    that the entry books nothing (e.g. "its UNTIL 2026-06-30 23:59 has passed")."""
    start = localize(rule.start, zone)
    if rule.until is not None:
        aware = rule.until.tzinfo is not None
        end = rule.until if aware else localize(rule.until, zone)
        shown = format_utc(end) if aware else f"{rule.until:%Y-%m-%d %H:%M}"
        if as_utc(end) < as_utc(start):
            return f"its UNTIL {shown} is before its start {rule.start:%Y-%m-%d %H:%M}"
        if as_utc(end) <= as_utc(after):
            return f"its UNTIL {shown} has passed"
    since = after.astimezone(zone).replace(tzinfo=None)
    horizon = _horizon(rule, zone, since - timedelta(days=1), limit)
    if rule.count is not None:
        walls = list(_rule_walls(rule, horizon))
        if len(walls) == rule.count and all(localize(w, zone) <= after for w in walls):
            return f"its COUNT={rule.count} instances have all passed"
    return (
        f"it has no instance from {max(since, rule.start):%Y-%m-%d} to {horizon:%Y-%m-%d} "
        "(courtbot looks no further ahead)"
    )


# --------------------------------------------------------------------------- backoff


def backoff_delays(base: float, attempts: int = 3) -> list[float]:
    """Waits between ``attempts`` requests: base, 2 x base, 4 x base, ..."""
    return [base * (2**i) for i in range(max(attempts - 1, 0))]


def parse_retry_after(
    value: str | None, now: datetime, cap: float = RETRY_AFTER_CAP_SECONDS
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), capped at
    ``cap`` (30 s: RETRY_AFTER_CAP_SECONDS; a watch's next try takes it up to a day); None when
    absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = (as_utc(when) - as_utc(now)).total_seconds()
    return min(max(seconds, 0.0), cap)


# --------------------------------------------------------------------------- HTML pages

#: The start of a body that is an HTML page (after a byte order mark and white space).
_HTML_START_RE = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html\b)", re.I | re.S
)
_HTML_TAG_RE = re.compile(rb"<(?:html|head|body|title)\b", re.I)
_TITLE_RE = re.compile(rb"<title\b[^>]*>(.*?)</title\s*>", re.I | re.S)
#: A page title quoted in a reason is cut to this many characters.
PAGE_TITLE_CHARS = 80


def html_page(body: bytes, content_type: str | None) -> str | None:
    """The title of an HTML page (``""`` when it has none), or None when ``body`` is not one:
    a body that starts as HTML does, or any body with HTML tags served as ``text/html``. The
    title is unescaped, its white space and control characters folded, its double quotes made
    single, and cut to PAGE_TITLE_CHARS (``...`` marks the cut)."""
    head = body[:65536]
    served_html = (content_type or "").split(";", 1)[0].strip().lower() in (
        "text/html",
        "application/xhtml+xml",
    )
    if not _HTML_START_RE.match(head) and not (served_html and _HTML_TAG_RE.search(head)):
        return None
    found = _TITLE_RE.search(head)
    if found is None:
        return ""
    text = html.unescape(found.group(1).decode("utf-8", "replace"))
    text = " ".join(CONTROL_RE.sub(" ", text).split()).replace('"', "'")
    if len(text) > PAGE_TITLE_CHARS:
        text = text[: PAGE_TITLE_CHARS - 3].rstrip() + "..."
    return text


# --------------------------------------------------------------------------- Fernet


class KeyError_(ValueError):
    """``FERNET_KEY`` is missing or malformed; the message never holds the key."""


def load_fernet(keys: str | None) -> MultiFernet:
    """A MultiFernet from ``FERNET_KEY`` (comma-separated: the first encrypts, all decrypt)."""
    fix = "generate one with `python main.py generate-key`"
    if not keys or not keys.strip():
        raise KeyError_(f"FERNET_KEY is not set; {fix}")
    fernets: list[Fernet] = []
    for index, key in enumerate(k.strip() for k in keys.split(",")):
        try:
            fernets.append(Fernet(key.encode()))
        except (ValueError, binascii.Error):
            raise KeyError_(
                f"FERNET_KEY: key #{index + 1} is not a Fernet key (32 url-safe base64-encoded "
                f"bytes); {fix}"
            ) from None
    return MultiFernet(fernets)


def looks_like_fernet(value: str) -> bool:
    """True when ``value`` has the shape of a Fernet token: ``gAAAAA`` (the version byte and a
    timestamp's leading zeros) then URL-safe base64. A whole token or one cut short alike: a
    value that only a copy cut short or an old key explains is an error, never a plaintext
    token sent to the club."""
    return FERNET_SHAPE_RE.fullmatch(value) is not None


def decrypt_token(fernet: MultiFernet, value: str) -> str | None:
    """The plaintext of an encrypted token, or None when no key decrypts it."""
    try:
        return fernet.decrypt(value.encode()).decode()
    except (InvalidToken, UnicodeDecodeError, ValueError):
        return None


def decrypt_secrets(fernet: MultiFernet, encrypted: Any) -> dict[str, str] | None:
    """The secrets of a token as a booking uses them: ``{"token": plaintext}`` for an encrypted
    string, the decrypted fields for an object of encrypted fields (CONTRACT section 12). None
    when anything does not decrypt (or is of another shape)."""
    if isinstance(encrypted, str):
        plaintext = decrypt_token(fernet, encrypted)
        return None if plaintext is None else {"token": plaintext}
    if not isinstance(encrypted, dict) or not encrypted:
        return None
    secrets: dict[str, str] = {}
    for name, value in encrypted.items():
        plaintext = decrypt_token(fernet, value) if isinstance(value, str) else None
        if plaintext is None:
            return None
        secrets[name] = plaintext
    return secrets


def encrypted_under_first_key(fernet: MultiFernet, value: str) -> bool:
    """True when ``value`` decrypts under the first (encrypting) key."""
    first: Fernet = fernet._fernets[0]  # MultiFernet keeps its keys in order
    try:
        first.decrypt(value.encode())
    except (InvalidToken, ValueError):
        return False
    return True


def jwt_expiry(token: str) -> datetime | None:
    """When a JWT expires: its payload's ``exp`` (read, never verified), aware UTC. None for a
    token that is not a JWT or has no usable ``exp``. The token itself is never kept or shown."""
    parts = token.strip().split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def secrets_expiry(secrets: Mapping[str, str]) -> datetime | None:
    """When a token's secrets stop working: the earliest ``exp`` of those that are JWTs (a
    string token is ``{"token": value}``); None when none is."""
    expiries = [moment for value in secrets.values() if (moment := jwt_expiry(value)) is not None]
    return min(expiries, default=None)


#: How deep a club's JSON answer may nest (arrays and objects): deeper is no JSON to courtbot.
MAX_JSON_DEPTH = 64


class JsonTooDeep(ValueError):
    """JSON nested deeper than ``MAX_JSON_DEPTH``."""


def load_json(text: str | bytes) -> Any:
    """``text`` as JSON, nested at most ``MAX_JSON_DEPTH`` deep. Raises ValueError for text that
    is not JSON, JsonTooDeep (a ValueError) for JSON nested deeper: a few thousand ``[`` would
    otherwise exhaust Python's recursion limit in the parser, or in whatever walks the value."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonTooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    level: list[tuple[Any, int]] = [(value, 1)]
    while level:
        node, depth = level.pop()
        if isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise JsonTooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            level.extend((child, depth + 1) for child in children)
    return value


#: A URL's userinfo (``scheme://user:password@``), wherever a URL stands in a text.
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@]*@")


def mask_userinfo(text: str) -> str:
    """``text`` with the userinfo of every URL in it (``http://<token>@host/``) as ``***``: a
    club can put a secret there, and a reason that quotes an address must not carry it."""
    return _USERINFO_RE.sub(r"\1***@", text)


def mask_url_secrets(url: str) -> str:
    """``url`` fit for a log line: its scheme, host and port only, the rest ``/****`` (a ping
    URL's path or query is its secret), e.g. ``https://hc-ping.com/****``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "****"
    if not parts.scheme or not host:
        return "****"
    shown_host = f"[{host}]" if ":" in host else host
    rest = parts.path.strip("/") or parts.query or parts.fragment or parts.username
    return f"{parts.scheme}://{shown_host}{port}" + ("/****" if rest else "")


def is_http_url(url: str) -> bool:
    """True for an ``http://`` or ``https://`` URL with a host."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return False


#: What stands in for a secret in printed output.
MASK = "***"


def courts_text(courts: Sequence[str | None]) -> str:
    """How a list of courts reads in status output and notifications."""
    if courts == [None] or not courts:
        return "any"
    return ", ".join(c if c is not None else "any" for c in courts)
