"""The club's clock (CONTRACT section 6): how far the club's clock runs from ours.

A ``Date`` header has one-second resolution. Each answer still pins the club's clock down: the
club wrote ``Date: D`` at some instant between our send ``s`` and our receipt ``r`` of that
request, and its clock then read a time in ``[D, D + 1)``, so its offset (club minus ours) lies
in ``[D - r, D + 1 - s)``. The first answer gives a window a second wide; each later request is
timed so that the club writes its answer at the instant its ``Date`` would turn to the next
second if the offset were one guess inside the window, and whichever side of it the answer
falls cuts the window there (each request bracketed by its own send and receipt). A second of
the club's clock takes up to five such requests, at guesses dividing the window evenly and as
far apart as the round trip allows, which cut it to a sixth (one request a second, a binary
search, halves it). The search stops when the window is as narrow as the round trip allows, or
after ``MAX_REQUESTS``.

Pure but for the two functions it is given: ``fetch_date`` (one request; returns the answer's
``Date`` value or None, raises ``ClockError`` when no answer came) and ``sleep``; ``clock``
reads our wall clock. Tests drive it with a simulated club.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

#: At most this many requests per measurement (CONTRACT section 6).
MAX_REQUESTS = 20
#: A measured offset larger than this is refused as implausible (a stale cache, a wrong URL).
MAX_OFFSET_SECONDS = 300.0
#: A measurement known only this loosely (a club that answers slowly) is not used.
MAX_UNCERTAINTY_SECONDS = 0.1
#: The search stops once the offset is known this well.
TARGET_UNCERTAINTY_SECONDS = 0.001
#: A request is never planned closer than this to now (the time to wake and send it).
PLAN_MARGIN_SECONDS = 0.005
#: At most this many requests in one second of the club's clock (a round of the search), as
#: the round trip leaves room for: a binary search takes a second per halving, about seven
#: seconds for the whole measurement on loopback; five a second cut the window to a sixth, and
#: the measurement takes about five.
_PER_SECOND = 5
#: The search stops after this many rounds in a row that narrowed the window by less than
#: ``_STALL_RATIO`` (the round trip is the floor: more requests would not help).
_STALLS = 3
_STALL_RATIO = 0.9
#: Where in the club's second the two closing requests are taken (see ``measure``).
_CHECK_PHASES = (0.25, 0.75)


class ClockError(Exception):
    """A measurement that cannot be used; the message says why, for a person."""


@dataclass(frozen=True)
class Measurement:
    """The club's clock minus ours, in seconds, known to within ``uncertainty`` either way."""

    offset: float
    uncertainty: float
    requests: int

    @property
    def text(self) -> str:
        """``offset +412 ms ± 6 ms``."""
        return f"offset {self.offset * 1000:+.0f} ms ± {max(self.uncertainty * 1000, 1):.0f} ms"

    @property
    def label(self) -> str:
        """``by the club's clock (+412 ms ± 6 ms)``, for status and outcomes."""
        return f"by the club's clock ({self.text.removeprefix('offset ')})"

    @property
    def lead(self) -> float:
        """How much earlier than our trigger the booking is sent: the offset less its
        uncertainty (negative: later), so that even at the edge of what was measured nothing
        reaches the club before its own opening instant."""
        return self.offset - self.uncertainty

    def send_at(self, trigger: float) -> float:
        """Our clock's instant at which a booking of ``trigger`` (the club's opening instant by
        the club's clock) may leave."""
        return trigger - self.lead

    def opened_at(self, trigger: float) -> float:
        """Our clock's best estimate of the instant the club's clock reached ``trigger``."""
        return trigger - self.offset


def parse_date(value: str | None) -> float:
    """A ``Date`` header's value as epoch seconds; ClockError when missing or unreadable."""
    if value is None:
        raise ClockError("the club's answer has no Date header")
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ClockError(f"the club's Date header {value[:40]!r} is not an HTTP date")
    return moment.timestamp()


@dataclass
class _Window:
    """What the readings so far allow: the offset lies in ``[low, high)``."""

    low: float
    high: float
    requests: int = 0
    #: Round trips of the answered requests (the time a request takes to reach the club is
    #: taken as half of it).
    trips: list[float] = field(default_factory=list)
    #: A request was left out: it would have ended past the deadline.
    out_of_time: bool = False

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def middle(self) -> float:
        return (self.low + self.high) / 2

    def cut(self, sent: float, received: float, date: float) -> None:
        low = max(self.low, date - received)
        high = min(self.high, date + 1.0 - sent)
        if low > high:
            raise ClockError(
                f"the club's Date jumped between requests (its readings disagree by "
                f"{(low - high) * 1000:.0f} ms): measure against a URL that is not cached and "
                "served by one clock"
            )
        self.low, self.high = low, high


def _read(
    fetch_date: Callable[[], str | None], clock: Callable[[], float]
) -> tuple[float, float, float]:
    sent = clock()
    value = fetch_date()
    received = clock()
    return sent, received, parse_date(value)


def measure(
    fetch_date: Callable[[], str | None],
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], object],
    deadline: float | None = None,
    max_requests: int = MAX_REQUESTS,
) -> Measurement:
    """Measure the club's offset with at most ``max_requests`` calls of ``fetch_date``, none
    planned to end after ``deadline`` (our clock). Raises ClockError with the reason when the
    club gave no usable answer, its ``Date`` jumped, it answers too slowly for the offset to be
    known within ``MAX_UNCERTAINTY_SECONDS``, or the offset is over ``MAX_OFFSET_SECONDS``."""
    sent, received, date = _read(fetch_date, clock)
    window = _Window(date - received, date + 1.0 - sent, requests=1, trips=[received - sent])
    _plausible(window.middle)
    how = _Requests(fetch_date, clock, sleep, deadline)
    stalls = 0
    while (
        window.requests < max_requests - len(_CHECK_PHASES)
        and window.width / 2 > TARGET_UNCERTAINTY_SECONDS
        and window.width > statistics.median(window.trips)
        and stalls < _STALLS
    ):
        before = window.width
        if not _round(window, how, max_requests - len(_CHECK_PHASES) - window.requests):
            break
        stalls = stalls + 1 if window.width > before * _STALL_RATIO else 0
    # A Date that jumped during the search can leave readings that still agree (each one
    # taken at the boundary); two more taken mid-second disagree with them then.
    for phase in _CHECK_PHASES:
        _probe_at(window, phase, how)
    result = Measurement(window.middle, window.width / 2, window.requests)
    _plausible(result.offset)
    if result.uncertainty > MAX_UNCERTAINTY_SECONDS and window.out_of_time:
        raise ClockError(
            f"too little time before the trigger to measure the club's clock ({window.requests} "
            f"requests: ± {result.uncertainty * 1000:.0f} ms)"
        )
    if result.uncertainty > MAX_UNCERTAINTY_SECONDS:
        raise ClockError(
            f"the club answers too slowly (round trips of "
            f"{statistics.median(window.trips) * 1000:.0f} ms): its clock is known only "
            f"to ± {result.uncertainty * 1000:.0f} ms, more than "
            f"± {MAX_UNCERTAINTY_SECONDS * 1000:.0f} ms"
        )
    return result


@dataclass
class _Requests:
    """How the search sends: one request, our clock, a sleep, and when it must end by."""

    fetch_date: Callable[[], str | None]
    clock: Callable[[], float]
    sleep: Callable[[float], object]
    deadline: float | None


def _round(window: _Window, how: _Requests, budget: int) -> bool:
    """Up to ``_PER_SECOND`` requests (and ``budget``) in one second of the club's clock: each
    at the instant its second would turn if its offset were one of the points that divide the
    window evenly, the largest offset first (its instant comes first), as many as leave a round
    trip between them. Each reading cuts the window; a point that an earlier cut left outside
    it is not asked. One request is the binary search's. False as ``_probe_at``."""
    # (A wall clock stepped back during a request can make a round trip negative.)
    gap = max(statistics.median(window.trips), 0.0) + PLAN_MARGIN_SECONDS
    count = max(1, min(_PER_SECOND, budget, int(window.width / gap) - 1))
    low, width = window.low, window.width
    for point in range(count, 0, -1):
        offset = low + width * point / (count + 1)
        if window.low < offset < window.high and not _probe_at(window, 0.0, how, offset):
            return False
    return True


def _probe_at(window: _Window, phase: float, how: _Requests, offset: float | None = None) -> bool:
    """One request timed so that the club writes its answer when its clock is ``phase`` past a
    whole second if it is ``offset`` from ours (default: the best guess so far), then the
    window cut by its reading. False, and nothing sent, when it would end after ``deadline``."""
    half_trip = statistics.median(window.trips) / 2
    now = how.clock()
    guess = window.middle if offset is None else offset
    leave = _next_instant(now + PLAN_MARGIN_SECONDS + half_trip, guess, phase) - half_trip
    if how.deadline is not None and leave + 2 * half_trip > how.deadline:
        window.out_of_time = True
        return False
    if leave > now:
        how.sleep(leave - now)
    sent, received, date = _read(how.fetch_date, how.clock)
    window.requests += 1
    window.trips.append(received - sent)
    window.cut(sent, received, date)
    return True


def _next_instant(earliest: float, offset: float, phase: float) -> float:
    """Our clock's first instant at or after ``earliest`` at which the club's clock (``offset``
    from ours) is ``phase`` seconds past a whole second."""
    club = earliest + offset - phase
    whole = float(math.ceil(club))
    return whole + phase - offset


def _plausible(offset: float) -> None:
    if abs(offset) > MAX_OFFSET_SECONDS:
        raise ClockError(
            f"the club's clock reads {offset:+.1f} s from ours, more than "
            f"{MAX_OFFSET_SECONDS / 60:.0f} minutes: implausible (a cached answer or a wrong "
            "URL?), not used"
        )
