"""Never silently (CONTRACT section 9): what the daemon's loop checks every second.

``ClockWatch`` notices a jump of the wall clock (an NTP step, a VM resumed after a pause) by
comparing how far it moved with how far the monotonic clock moved. ``Overdue`` tells a trigger
the scheduler missed from one it has not had the time to pick up. ``Watchdog`` turns what the
daemon finds wrong (its scheduler stopped, the job store cannot be written, a trigger overdue)
into log lines, the health state of the heartbeat file, and the moment to give up. The daemon
(``daemon.py``) does the looking and the recovering. Pure: clocks are injected; no database,
no files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

#: How often the daemon's loop looks (seconds).
INTERVAL = 1.0
#: Between two looks, a wall clock that moved this much more (or less) than the monotonic clock
#: jumped. NTP slewing moves it at most 0.5 ms per second; a loop delayed by a busy machine moves
#: both clocks alike.
JUMP_TOLERANCE = 0.5
#: A pending instance whose job should have started this long ago is late.
LATE_AFTER = 1.0
#: The earliest pending trigger is read again at least this often (seconds), even when nothing
#: says it changed.
NEXT_DUE_REFRESH = 60.0
#: Not able to book for this long: the daemon exits non-zero, for its supervisor to restart it.
GIVE_UP_AFTER = 60.0
#: While it lasts, the error is logged again this often.
REMIND_EVERY = 10.0
#: The heartbeat file's length, always: on a full disk it is rewritten in place, which needs no
#: new block as long as it does not grow.
HEARTBEAT_BYTES = 512
#: How often the daemon writes its heartbeat file (seconds), and the age at which ``health``
#: and ``status`` take it for a daemon that no longer works.
HEARTBEAT_SECONDS = 15.0
HEARTBEAT_STALE_SECONDS = 4 * HEARTBEAT_SECONDS


class ClockWatch:
    """Notices a jump of the wall clock between two ``check`` calls."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tolerance: float = JUMP_TOLERANCE,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._tolerance = tolerance
        self._last = (wall(), monotonic())

    def check(self) -> float | None:
        """How far the wall clock jumped since the last check, in seconds (negative: backward),
        or None when it kept pace with the monotonic clock."""
        wall, mono = self._wall(), self._monotonic()
        jump = (wall - self._last[0]) - (mono - self._last[1])
        self._last = (wall, mono)
        return jump if abs(jump) > self._tolerance else None


class Overdue:
    """A late instance (its job should have started, no booking did) is overdue when it was late
    at the look before too: the scheduler gets one look's time to pick up what was just loaded,
    retried, recovered or carried past by a clock jump."""

    def __init__(self) -> None:
        self._late: frozenset[str] = frozenset()

    def check(self, late: Iterable[str]) -> list[str]:
        """The overdue keys among ``late`` (the keys late now), in the order given."""
        now = list(late)
        overdue = [key for key in now if key in self._late]
        self._late = frozenset(now)
        return overdue

    def forget(self) -> None:
        """Start afresh (after a clock jump or a recovery: the scheduler gets its look)."""
        self._late = frozenset()


def describe_overdue(keys: list[str], *, shown: int = 3) -> str:
    """What is wrong when triggers are overdue, naming the first few."""
    names = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} booking(s) overdue: their trigger came and no booking started ({names})"


class Watchdog:
    """Whether the daemon is able to book, what it logs about it, and when it gives up."""

    def __init__(
        self,
        *,
        give_up_after: float = GIVE_UP_AFTER,
        remind_every: float = REMIND_EVERY,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.give_up_after = give_up_after
        self._remind_every = remind_every
        self._wall = wall
        self._monotonic = monotonic
        #: What keeps the daemon from booking now; None while it can.
        self.problem: str | None = None
        self._since = 0.0
        self._since_wall = 0.0
        self._reminded = 0.0

    def report(self, problem: str) -> bool:
        """Something keeps the daemon from booking: logged as an error at once, then every
        ``remind_every`` seconds while it lasts. Returns False once it has lasted
        ``give_up_after`` seconds: time to exit for the supervisor to restart the daemon."""
        now = self._monotonic()
        if self.problem is None:
            self._since, self._since_wall, self._reminded = now, self._wall(), now
            logger.error(
                "scheduler not working: %s; recovering (`health` reports it until then)", problem
            )
        self.problem = problem
        if now - self._since >= self.give_up_after:
            logger.error(
                "scheduler not working for %.0f s: %s; exiting with status 3 for the supervisor "
                "to restart courtbot",
                now - self._since,
                problem,
            )
            return False
        if now - self._reminded >= self._remind_every:
            self._reminded = now
            logger.error(
                "scheduler still not working after %.0f s: %s; recovering",
                now - self._since,
                problem,
            )
        return True

    def recovered(self, how: str) -> float:
        """The daemon is able to book again; logs how long it was not and what was done.
        Returns that time in seconds (0 when nothing was wrong)."""
        if self.problem is None:
            return 0.0
        elapsed = self._monotonic() - self._since
        logger.warning(
            "scheduler working again after %.1f s (was: %s): %s", elapsed, self.problem, how
        )
        self.problem = None
        return elapsed

    def health(self) -> str | None:
        """The heartbeat's state line while not working ("not working since ...: why"), else
        None."""
        if self.problem is None:
            return None
        since = datetime.fromtimestamp(self._since_wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"not working since {since}: {self.problem}"


def heartbeat_text(now: float, state: str | None) -> str:
    """The heartbeat file: the time of the beat, then the state line while not working, padded
    to ``HEARTBEAT_BYTES`` (see there)."""
    text = f"{now:.0f}\n"
    if state is not None:
        line = " ".join(state.split())  # one line, whatever the error said
        text += line[: HEARTBEAT_BYTES - len(text) - 2] + "\n"
    return text.ljust(HEARTBEAT_BYTES - 1) + "\n"


def read_heartbeat(text: str) -> tuple[float, str | None]:
    """(the time of the beat, the state line or None while working). ValueError when the text is
    no heartbeat."""
    lines = [line.strip() for line in text.splitlines()]
    if not lines:
        raise ValueError("empty heartbeat")
    stamp = float(lines[0])
    state = next((line for line in lines[1:] if line), None)
    return stamp, state
