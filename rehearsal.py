"""Rehearsals (CONTRACT section 12): a flow that no longer fits its club is found out before the
window, not at it.

``REHEARSE_HOURS`` before each trigger of a pending instance whose flow has preparation steps,
those steps run once, as ``dry-run`` runs them (``bot.rehearse``): nothing of the booking is
sent, the instance's status never changes, only its ``rehearsal`` column. Instances of one club
file and one token whose rehearsals fall within the same hour share one. A failed rehearsal is
logged as an error, notified once, and tried again every hour until the trigger; the first pass
after a failure is notified too.

A rehearsal never runs while another booking of the same club file, or with the same token, is
near its trigger or under way (``_busy``): its login would compete with that booking at its
most important instant, or end that booking's session at a club that allows one per account. It
waits for that booking to end: minutes, so it stays about ``REHEARSE_HOURS`` ahead of its own
trigger (one kept waiting until its own preparation is near does not run, as ``_reachable``).

What is due is recomputed from the database at every look (``scheduler.run_rehearsals``, about
every minute), so nothing is lost at a restart. ``plan`` is pure: clocks are passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import bot
import instances
import utils
from models import BOOKING, Instance
from notify import Notifier

logger = logging.getLogger(__name__)

#: A failed rehearsal is tried again this long after it ran; rehearsals within it are shared.
HOUR = timedelta(hours=1)
#: No rehearsal when the trigger is nearer than the flow's ``prepare_seconds`` plus this: the
#: preparation itself is about to run.
MARGIN = timedelta(minutes=5)


@dataclass(frozen=True)
class Candidate:
    """A pending instance as a rehearsal sees it."""

    key: str
    schedule_id: str
    club: str | None
    token: str
    trigger: datetime
    desired: datetime
    timezone: str
    #: Its flow's ``prepare_seconds``; None: its flow has no preparation step (never rehearsed).
    prepare_seconds: float | None
    rehearsal: str | None = None
    rehearsed_at: datetime | None = None
    #: Claimed: its booking is under way (preparation, the trigger, early answers and retries,
    #: fallback times, finishing, or a watch's try); never rehearsed, it keeps others waiting.
    booking: bool = False

    @property
    def failed(self) -> bool:
        return self.rehearsal is not None and self.rehearsal.startswith("failed")


def _busy(candidate: Candidate, now: datetime) -> bool:
    """Whether its booking is under way, or about to start: its trigger (passed: booked at once)
    nearer than its flow's ``prepare_seconds`` plus MARGIN, the guard a rehearsal keeps from its
    own trigger."""
    if candidate.booking:
        return True
    return candidate.trigger - now < timedelta(seconds=candidate.prepare_seconds or 0.0) + MARGIN


def _clear(candidate: Candidate, busy: Sequence[Candidate]) -> bool:
    """Whether no busy booking shares its club file or its token. The token alone: one account
    may book at several club files of one system (two venues on one API). The club file alone:
    two token names may hold one account, and a club counts and limits requests by address, so
    a login at its window's opening instant competes with any booking there."""
    return not any(
        other.key != candidate.key
        and (other.club == candidate.club or other.token == candidate.token)
        for other in busy
    )


def _reachable(candidate: Candidate, now: datetime, hours: float) -> bool:
    """Whether a rehearsal may run for it now: a flow with preparation steps, its rehearsal
    time (the trigger less ``hours``) reached or within the hour, the trigger far enough."""
    if candidate.prepare_seconds is None or candidate.booking or hours <= 0:
        return False
    if candidate.trigger - now < timedelta(seconds=candidate.prepare_seconds) + MARGIN:
        return False
    return now + HOUR > candidate.trigger - timedelta(hours=hours)


def _due(candidate: Candidate, now: datetime, hours: float, *, again: bool) -> bool:
    """Whether its rehearsal is due now: its time reached and none ran since an hour before it,
    or the last one failed an hour ago (``again``: failed at all, after a reload)."""
    if not _reachable(candidate, now, hours):
        return False
    begin = candidate.trigger - timedelta(hours=hours)
    if now < begin:
        return False
    last = candidate.rehearsed_at
    if last is None or last < begin - HOUR:
        return True
    return candidate.failed and (again or now - last >= HOUR)


def _fresh(candidate: Candidate, now: datetime, hours: float) -> bool:
    """Whether it may join a rehearsal due now: its own falls within the hour and none ran."""
    if not _reachable(candidate, now, hours):
        return False
    last = candidate.rehearsed_at
    return last is None or last < candidate.trigger - timedelta(hours=hours) - HOUR


def plan(
    candidates: Sequence[Candidate], now: datetime, hours: float, *, again: bool = False
) -> list[list[Candidate]]:
    """The rehearsals to run now, each a group of instances (soonest trigger first) of one club
    file and one token: those due, and those of the same club and token whose rehearsal falls
    within the hour; none whose club file or token has a booking near its trigger or under way
    (``candidates`` holds those too: they wait until it ends). ``hours`` 0: none."""
    if hours <= 0:
        return []
    busy = [candidate for candidate in candidates if _busy(candidate, now)]
    groups: dict[tuple[str | None, str], list[Candidate]] = {}
    for candidate in sorted(candidates, key=lambda c: (c.trigger, c.key)):
        if _due(candidate, now, hours, again=again) and _clear(candidate, busy):
            groups.setdefault((candidate.club, candidate.token), []).append(candidate)
    for candidate in sorted(candidates, key=lambda c: (c.trigger, c.key)):
        group = groups.get((candidate.club, candidate.token))
        if group is not None and candidate not in group and _fresh(candidate, now, hours):
            group.append(candidate)
    return list(groups.values())


def candidates_of(
    rows: Sequence[Instance], prepare_seconds: Callable[[str | None], float | None]
) -> list[Candidate]:
    """The rows as candidates, with their flow's ``prepare_seconds`` (None: no preparation)."""
    return [
        Candidate(
            key=row.key,
            schedule_id=row.schedule_id,
            club=row.club,
            token=row.token_name,
            trigger=row.trigger_time,
            desired=row.desired_time,
            timezone=row.timezone,
            prepare_seconds=prepare_seconds(row.club),
            rehearsal=row.rehearsal,
            rehearsed_at=row.rehearsed_at,
            booking=row.status == BOOKING,
        )
        for row in rows
    ]


def _prepare_seconds(ctx: bot.BookingContext) -> Callable[[str | None], float | None]:
    def of(club: str | None) -> float | None:
        try:
            flow = ctx.flow_for(club)
        except KeyError:
            return None
        return float(flow.prepare_seconds) if flow.phase("prepare") else None

    return of


def run(
    ctx: bot.BookingContext,
    notifier: Notifier | None,
    hours: float,
    *,
    now: datetime | None = None,
    again: bool = False,
) -> int:
    """Run the rehearsals due now (``again``: failed ones at once too, after a reload); returns
    how many ran. Each result is written to its instances and notified as the contract says."""
    if hours <= 0:
        return 0
    now = now or datetime.now(UTC)
    until = now + timedelta(hours=hours) + HOUR
    rows = instances.rehearsal_candidates(ctx.factory, until)
    ran = 0
    for group in plan(candidates_of(rows, _prepare_seconds(ctx)), now, hours, again=again):
        if ctx.stop.is_set() or not ctx.may_send.is_set():
            break
        _rehearse(ctx, notifier, group, now)
        ran += 1
    return ran


def _rehearse(
    ctx: bot.BookingContext, notifier: Notifier | None, group: list[Candidate], now: datetime
) -> None:
    first = group[0]
    keys = [c.key for c in group]
    try:
        problem = bot.rehearse(ctx, first.key)
    except Exception as exc:  # a rehearsal must never stop the daemon
        logger.exception("rehearsal %s: unexpected error", first.key)
        problem = f"internal error while rehearsing ({type(exc).__name__}): see the log"
    instances.record_rehearsal(ctx.factory, keys, now, problem)
    were_failing = any(c.failed for c in group)
    if problem is not None:
        logger.error("rehearsal %s failed: %s", ", ".join(keys), problem)
        if not all(c.failed for c in group) and notifier is not None:
            notifier.notify_warning(
                "rehearsal", f"Rehearsal failed: {_label(first)}", _body(group, problem)
            )
        return
    logger.info("rehearsal %s: every preparation step succeeded", ", ".join(keys))
    if were_failing and notifier is not None:
        notifier.notify_warning(
            "rehearsal", f"Rehearsal passed: {_label(first)}", _body(group, None)
        )


def _label(candidate: Candidate) -> str:
    zone = utils.get_zone(candidate.timezone)
    return f"{candidate.schedule_id} {utils.format_local(candidate.desired, zone)}"


def _body(group: Sequence[Candidate], problem: str | None) -> str:
    lines = []
    for candidate in group:
        zone = utils.get_zone(candidate.timezone)
        lines.append(
            f"{candidate.schedule_id}: next booking {utils.format_local(candidate.desired, zone)}"
            f", its window opens {utils.format_local(candidate.trigger, zone)}"
        )
    if problem is None:
        lines.append("The rehearsal of its preparation steps passed again: the flow fits the club.")
        return "\n".join(lines)
    lines += [
        "",
        "A rehearsal of its preparation steps (as `python main.py dry-run` runs them; nothing "
        "was booked) failed:",
        problem,
        "",
        "courtbot tries again every hour until the window opens, and at once after "
        "`python main.py reload`; `python main.py dry-run "
        f"{group[0].schedule_id}` runs it now.",
    ]
    return "\n".join(lines)
