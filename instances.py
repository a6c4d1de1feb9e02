"""The lifecycle of an instance, and every question asked about instances and tokens.

One function per transition (CONTRACT section 7), one wording per reason:

    pending -> booking (claim) -> booked | failed (finish); booking -> pending (release)
    pending -> expired (expire_missed at start, expire_if_passed at the trigger)
    pending -> cancelled -> pending (reconcile); failed -> pending (retry)
    booking left by a crash -> pending (interrupted) or failed (recover_in_flight)
    booking -> pending at a fallback time (fall_back); booking -> watching (watch) ->
    booking (claim_watch) -> watching (watch_again); watching -> failed (end_watch) or
    cancelled (reconcile); booked -> cancelled (cancelled_at_club)

``reconcile`` applies a validated config (``config_loader``) as a diff. A state is a column,
never a prefix of a message: a booking cut off by a crash is ``Instance.interrupted``.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Collection, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy import case, delete, exists, func, insert, inspect, select, update
from sqlalchemy.orm import Session, defer, sessionmaker

import utils
from config_loader import SCHEDULES_FILE, Config, Entry, Planned, TokensResult
from models import (
    BOOKED,
    BOOKING,
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    KIND_OBJECT,
    KIND_STRING,
    LEASE_ACTIVE,
    LOADS_KEPT,
    PENDING,
    STATUS_TRIGGER_INDEX,
    WATCHING,
    Instance,
    Lease,
    Load,
    Notice,
    Token,
    Wakeup,
    index_built_after,
    insert_tuples,
    refresh_statistics,
    transaction,
)
from notify import Outcome

logger = logging.getLogger(__name__)

#: Rows read (and ORM objects held) at a time by reconcile and the lookups by key: a load of
#: 52,000 instances never holds them all at once (what a load leaves behind stays in the heap).
PAGE = 200
#: Schedule entries reconciled together: their rows are read in one query, then let go.
ENTRIES_PER_PASS = 4
#: New instances written in one INSERT by reconcile (a cold load writes thousands).
INSERT_ROWS = 500
#: A batched ``reconcile`` commits this many entries' instances at a time.
ENTRIES_PER_COMMIT = 40
#: A batched ``reconcile`` of at least ``ENTRIES_PER_COMMIT`` entries into a table of at most
#: this many rows (a cold start: empty, or only what was due soon) builds the (status, trigger)
#: index after writing its rows (SQLite; ``models.index_built_after``).
INDEX_AFTER_ROWS_AT_MOST = 1000


#: Why an instance's first request may leave after its trigger (``Instance.late_cause``), noted
#: when it became due late; the wording a person reads.
LATE_DOWN = "down"
LATE_LOADED = "loaded"
LATE_RETRY = "retry"
LATE_INTERRUPTED = "interrupted"
LATE_FALLBACK = "fallback"
LATE_CAUSES = {
    LATE_FALLBACK: "a fallback time, whose window was open when the first choice was taken",
    LATE_DOWN: "courtbot was not running at the trigger",
    LATE_LOADED: "the window was already open when the entry was loaded",
    LATE_RETRY: "put back to pending with `retry` after the window opened",
    LATE_INTERRUPTED: "courtbot stopped while booking it and sent it again at its next start",
}


# --------------------------------------------------------------------------- reconciliation


@dataclass
class Changes:
    """What a reconciliation did to the instances. ``keys`` are the instances it added or
    touched: their jobs follow (``scheduler.sync_keys``), and no other job needs a look."""

    added: int = 0
    updated: int = 0
    cancelled: int = 0
    revived: int = 0
    entries_changed: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def merge(self, other: Changes) -> None:
        self.added += other.added
        self.updated += other.updated
        self.cancelled += other.cancelled
        self.revived += other.revived
        self.entries_changed.extend(other.entries_changed)
        self.keys |= other.keys

    @property
    def empty(self) -> bool:
        return not (self.added or self.updated or self.cancelled or self.revived)

    def summary(self) -> str:
        return (
            f"{self.added} added, {self.updated} changed, {self.cancelled} cancelled, "
            f"{self.revived} revived"
        )


def store_tokens(session: Session, tokens: TokensResult) -> None:
    """Make the tokens table match a valid tokens.json: upsert, mark unusable, drop removed."""
    if tokens.file_error is not None:
        return
    existing = {t.id: t for t in session.scalars(select(Token))}
    for name, value in tokens.tokens.items():
        row = existing.get(name)
        if row is None:
            row = Token(id=name)
            session.add(row)
        if isinstance(value.encrypted, dict):
            # Each field as its own Fernet token, as tokens.json holds them (models.Token).
            row.encrypted_token = json.dumps(value.encrypted, sort_keys=True)
            row.kind = KIND_OBJECT
            row.error = None
        elif value.encrypted is not None:
            row.encrypted_token = value.encrypted
            row.kind = KIND_STRING
            row.error = None
        else:
            row.error = value.error
    gone = set(existing) - set(tokens.tokens)
    if gone:
        session.execute(delete(Token).where(Token.id.in_(gone)))


def reconcile(
    factory: sessionmaker[Session],
    config: Config,
    *,
    now: datetime,
    only: Sequence[str] | None = None,
    unchanged: frozenset[str] = frozenset(),
    batched: bool = False,
) -> Changes:
    """Apply a validated config to the database as a diff (CONTRACT section 5). Each entry's
    triggers follow the window that applies to it (``Entry.window``).

    ``only`` limits the work to these schedule ids (the recurring top-up). ``unchanged`` names
    entries identical to the last load's, whose rows need no look (the daily top-up keeps their
    horizon). Booked instances are never touched; instances of rejected entries are kept as
    they were. ``batched`` (a load at start, while bookings due soon already run): committed
    ``ENTRIES_PER_COMMIT`` entries at a time, so that no booking waits for the whole load to
    write its own claim.
    """
    changes = Changes()
    entries = {e.id: e for e in config.schedules.entries}
    with transaction(factory) as session:
        if only is None:
            store_tokens(session, config.tokens)
        if config.schedules.file_error is not None:
            return changes
        ids = set(entries) if only is None else set(only) & set(entries)
        ids -= unchanged
        stored_ids = set(session.scalars(select(Instance.schedule_id).distinct()))
        removable: set[str] = set()
        if only is None:
            removable = stored_ids - set(entries) - config.schedules.rejected_ids
            if removable and config.schedules.unknown_rejects:
                logger.warning(
                    "%d schedule(s) are no longer in %s, but an entry was rejected whose id "
                    "cannot be told: their pending instances are kept until it is fixed",
                    len(removable),
                    SCHEDULES_FILE,
                )
                removable = set()
        work = sorted(ids | removable)
        pass_ = _Pass(entries, stored_ids, removable, now, changes)
        if not batched:
            for start in range(0, len(work), ENTRIES_PER_PASS):
                pass_.run(session, work[start : start + ENTRIES_PER_PASS])
            pass_.write(session)
            refresh_statistics(session.connection(), Instance.__table__, changes.added)
            return changes
        index_after = (
            len(work) >= ENTRIES_PER_COMMIT
            and session.get_bind().dialect.name == "sqlite"
            and session.scalar(select(func.count()).select_from(Instance))
            <= INDEX_AFTER_ROWS_AT_MOST
        )
    with index_built_after(factory, STATUS_TRIGGER_INDEX) if index_after else nullcontext():
        for first in range(0, len(work), ENTRIES_PER_COMMIT):
            batch = work[first : first + ENTRIES_PER_COMMIT]
            with transaction(factory) as session:
                for start in range(0, len(batch), ENTRIES_PER_PASS):
                    pass_.run(session, batch[start : start + ENTRIES_PER_PASS])
                pass_.write(session)
    with transaction(factory) as session:
        refresh_statistics(session.connection(), Instance.__table__, changes.added)
    return changes


@dataclass
class _Pass:
    """What ``reconcile`` does for a few entries at a time: their rows are read in one query,
    reconciled, flushed and let go, so that a load of thousands of instances never holds them
    all as objects."""

    entries: dict[str, Entry]
    stored_ids: set[str]
    removable: set[str]
    now: datetime
    changes: Changes

    #: New instances' rows not yet written (``_new_row``'s): one INSERT for many entries.
    new_rows: list[tuple[Any, ...]] = field(default_factory=list)

    def run(self, session: Session, chunk: list[str]) -> None:
        rows_by_schedule: dict[str, dict[str, Instance]] = {}
        stored_chunk = [i for i in chunk if i in self.stored_ids]
        if stored_chunk:
            query = select(Instance).where(Instance.schedule_id.in_(stored_chunk))
            for row in session.scalars(query):
                rows_by_schedule.setdefault(row.schedule_id, {})[row.key] = row
        for schedule_id in chunk:
            rows = rows_by_schedule.get(schedule_id, {})
            if schedule_id in self.removable:
                for row in rows.values():
                    if row.status == PENDING or _watching(row) or preparing(row, self.now):
                        _cancel(row, self.changes, "entry removed from schedules.json")
            else:
                entry = self.entries[schedule_id]
                changes = _reconcile_entry(entry, rows, self.now, self.new_rows)
                self.changes.merge(changes)
        if rows_by_schedule:
            session.flush()
            session.expunge_all()
        if len(self.new_rows) >= INSERT_ROWS:
            self.write(session)

    def write(self, session: Session) -> None:
        """The new instances so far, in one statement (end of a pass's transaction)."""
        insert_rows(session, self.new_rows)
        self.new_rows = []


def insert_rows(session: Session, rows: list[tuple[Any, ...]]) -> None:
    """New pending instances (``_new_row``'s) in one multi-row INSERT: a cold load of
    thousands, without ORM objects or the ORM's bulk bookkeeping, nor a dict each."""
    insert_tuples(session.connection(), Instance.__table__, NEW_COLUMNS, rows)


def due_by(
    factory: sessionmaker[Session], config: Config, *, now: datetime, until: datetime
) -> dict[str, datetime]:
    """The first part of a load, soonest first: the instances of the valid, enabled entries
    whose trigger comes by ``until`` are added when missing (with their token), so that their
    jobs can be scheduled before the rest of the load. Returns every pending instance due by
    then (key -> trigger), new or stored. Nothing else is touched: the full ``reconcile`` that
    follows finds these as it left them."""
    planned: list[tuple[Entry, Planned]] = []
    if config.schedules.file_error is None:
        for entry in config.schedules.entries:
            if entry.enabled:
                planned += _planned_by(entry, now, until)
    with transaction(factory) as session:
        store_tokens(session, config.tokens)
        keys = [item.key for _, item in planned]
        stored: set[str] = set()
        for start in range(0, len(keys), PAGE):
            page = keys[start : start + PAGE]
            stored.update(session.scalars(select(Instance.key).where(Instance.key.in_(page))))
        rows = [
            _new_row(entry.id, item, now, _own_fields(entry, item.desired))
            for entry, item in planned
            if item.key not in stored
        ]
        insert_rows(session, rows)
        query = select(Instance.key, Instance.trigger_time).where(
            Instance.status == PENDING, Instance.trigger_time <= until
        )
        return {key: trigger for key, trigger in session.execute(query)}


#: A new instance's columns as ``_new_row`` gives them: its own, then ``_own_fields``'.
NEW_COLUMNS = (
    "key",
    "schedule_id",
    "desired_time",
    "trigger_time",
    "status",
    "attempts",
    "late_cause",
    "created_at",
    "updated_at",
    "court_id",
    "courts",
    "token_name",
    "duration_minutes",
    "rrule",
    "timezone",
    "type",
    "club",
    "players",
    "fallbacks",
    "watch_until",
)


def _new_row(
    schedule_id: str, item: Planned, now: datetime, fields: dict[str, Any]
) -> tuple[Any, ...]:
    """A new pending instance's values in ``NEW_COLUMNS``' order, stamped ``now`` (aware,
    UTC); ``fields`` is ``_own_fields``'."""
    late = LATE_LOADED if item.trigger <= now else None
    head = (item.key, schedule_id, item.desired, item.trigger, PENDING, 0, late, now, now)
    return (*head, *fields.values())


def _planned_by(entry: Entry, now: datetime, until: datetime) -> list[tuple[Entry, Planned]]:
    """``entry.plan(now)`` up to the first trigger after ``until`` (starts come in order, and
    so do their triggers): the few instances due soon, without planning the rest."""
    found = []
    zone, window = entry.zone, entry.window
    for start in entry.starts(now):
        if start <= now:
            continue
        trigger = utils.trigger_time(start, zone, window)
        if trigger > until:
            break
        item = Planned(utils.instance_key(entry.id, start), utils.as_utc(start), trigger)
        found.append((entry, item))
    return found


def preparing(row: Instance, now: datetime) -> bool:
    """A claimed instance whose booking has sent nothing but its flow's preparation steps (its
    trigger is ahead: no booking request leaves before it). A reload cancels it as it cancels a
    pending one, and the booking under way stops before its trigger (``bot._withdrawn``)."""
    return (
        row.status == BOOKING
        and row.attempts == 0
        and row.first_sent_at is None
        and utils.as_utc(row.trigger_time) > utils.as_utc(now)
    )


def _watching(row: Instance) -> bool:
    """Watching, or in a try of its watch (claimed from watching: its next try is set)."""
    return row.status == WATCHING or (row.status == BOOKING and row.next_try_at is not None)


def _cancel(row: Instance, changes: Changes, why: str) -> None:
    if _watching(row):
        why = f"watch ended: {why}"
    row.status = CANCELLED
    row.owner = None
    row.next_try_at = None
    row.last_error = why
    changes.cancelled += 1
    changes.keys.add(row.key)


def _entry_fields(entry: Entry) -> dict[str, Any]:
    """What an entry's pending instances copy from it (and take again when it is edited).
    The zone and type count too: another zone or type can give the same instants (London ->
    Lisbon). The club too: the booking finds its request by it."""
    return {
        "court_id": entry.court_text,
        "courts": json.dumps(list(entry.courts)),
        "token_name": entry.token,
        "duration_minutes": entry.duration_minutes,
        "rrule": entry.rule.rfc if entry.rule else None,
        "timezone": entry.timezone,
        "type": entry.type,
        "club": entry.club,
        "players": json.dumps(list(entry.players)) if entry.players else None,
    }


def _own_fields(entry: Entry, desired: datetime) -> dict[str, Any]:
    """What an instance at ``desired`` copies from its entry, in ``NEW_COLUMNS``' order."""
    return _entry_fields(entry) | _instance_fields(entry, desired)


def _instance_fields(entry: Entry, desired: datetime) -> dict[str, Any]:
    """What one instance copies from its entry for its own date (CONTRACT section 13): its
    times as JSON ``[[HH:MM, start UTC, trigger UTC], ...]``, the desired time first and then
    each fallback time (NULL without fallbacks), and when its watch ends."""
    fallbacks = entry.fallbacks(desired) if entry.fallback_times else []
    times = None
    if fallbacks:
        first = (
            utils.as_utc(desired).astimezone(entry.zone).strftime("%H:%M"),
            desired,
            utils.trigger_time(desired, entry.zone, entry.window),
        )
        times = json.dumps(
            [
                [text, utils.format_utc(start), utils.format_utc(trigger)]
                for text, start, trigger in [first, *fallbacks]
            ]
        )
    return {"fallbacks": times, "watch_until": entry.watch_end(desired)}


def times_of(row: Instance) -> list[tuple[str, datetime, datetime]]:
    """The instance's times: (HH:MM, start, trigger), the desired one first, then each fallback
    time (just the desired one without fallbacks)."""
    if not row.fallbacks:
        zone = utils.get_zone(row.timezone)
        hhmm = row.desired_time.astimezone(zone).strftime("%H:%M")
        return [(hhmm, row.desired_time, row.trigger_time)]
    return [
        (text, _utc(start), _utc(trigger)) for text, start, trigger in json.loads(row.fallbacks)
    ]


def _utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _fresh(row: Instance) -> None:
    """A revived or retried instance starts again at its desired time, with no watch."""
    if row.fallback_step and row.fallbacks:
        row.trigger_time = times_of(row)[0][2]
    row.fallback_step = 0
    row.slot_time = None
    row.tried = None
    row.next_try_at = None
    row.watch_tries = 0
    row.booked_time = None


def _reconcile_entry(
    entry: Entry, rows: dict[str, Instance], now: datetime, new_rows: list[tuple[Any, ...]]
) -> Changes:
    """One entry's stored ``rows`` brought up to what it plans now; the instances it plans that
    are not stored yet go to ``new_rows`` (written by the pass, many entries in one INSERT)."""
    changes = Changes()
    planned = entry.plan(now)
    wanted = {p.key for p in planned}
    # Without fallback times or a watch, every instance copies what the first does (the
    # common case).
    same = None
    if planned and not entry.fallback_times and entry.watch_minutes is None:
        same = _own_fields(entry, planned[0].desired)
    stamp = utils.as_utc(now)
    for item in planned:
        row = rows.get(item.key)
        own = same if same is not None else _own_fields(entry, item.desired)
        if row is None:
            if entry.enabled:
                new_rows.append(_new_row(entry.id, item, stamp, own))
                changes.added += 1
                changes.keys.add(item.key)
            continue
        _reconcile_planned(row, item.trigger, entry, own, changes=changes, now=now)
    _cancel_unplanned(entry, rows, wanted, changes, now)
    if not changes.empty:
        changes.entries_changed.append(entry.id)
    return changes


def _reconcile_planned(
    row: Instance,
    trigger: datetime,
    entry: Entry,
    fields: dict[str, Any],
    *,
    changes: Changes,
    now: datetime,
) -> None:
    """An instance the entry still plans (its trigger now ``trigger``): revived when it was
    cancelled and the entry is enabled, cancelled when the entry is disabled, else brought up
    to the entry's fields unless its booking is under way."""
    # An instance cancelled at the club by `cancel` stays cancelled (CONTRACT 13).
    if row.status == CANCELLED and entry.enabled and not row.cancelled_booking:
        row.status = PENDING
        row.last_error = None
        row.attempts = 0
        row.late_cause = LATE_LOADED if trigger <= now else None
        _fresh(row)
        changes.revived += 1
        changes.keys.add(row.key)
    if _watching(row) and not entry.enabled:
        _cancel(row, changes, "entry disabled in schedules.json")
        return
    under_way = preparing(row, now)
    if row.status != PENDING and not under_way:
        return
    if not entry.enabled:
        _cancel(row, changes, "entry disabled in schedules.json")
        return
    if under_way or row.fallback_step:
        # Its booking goes on with the court, token and trigger it was claimed with; one at a
        # fallback time keeps that time's trigger.
        return
    moved = row.trigger_time != trigger
    if moved or any(getattr(row, name) != value for name, value in fields.items()):
        for name, value in fields.items():
            setattr(row, name, value)
        if moved:
            # A window that changed under a pending instance may have opened it already.
            row.late_cause = LATE_LOADED if trigger <= now else None
        row.trigger_time = trigger
        changes.updated += 1
        changes.keys.add(row.key)


def _cancel_unplanned(
    entry: Entry, rows: dict[str, Instance], wanted: set[str], changes: Changes, now: datetime
) -> None:
    """Cancel the entry's future instances that it no longer plans, saying why."""
    for key, row in rows.items():
        if key in wanted or (
            row.status != PENDING and not _watching(row) and not preparing(row, now)
        ):
            continue
        if row.desired_time > now:
            local_date = row.desired_time.astimezone(entry.zone).date()
            if local_date in entry.skip:
                _cancel(row, changes, "its date is in the entry's skip list")
            elif entry.rule is not None and local_date in entry.rule.skip_dates:
                _cancel(row, changes, "its date is excluded by the entry's rule (except, EXDATE)")
            else:
                _cancel(row, changes, "no longer produced by the entry's rule or time")


def expire_missed(factory: sessionmaker[Session], now: datetime) -> list[Instance]:
    """Instances still ``pending`` whose desired start has passed (the daemon was down at their
    trigger) become ``expired``; returned for the one "Booking missed" report."""
    with transaction(factory) as session:
        rows = list(
            session.scalars(
                select(Instance).where(
                    Instance.status == PENDING,
                    func.coalesce(Instance.slot_time, Instance.desired_time) <= now,
                )
            )
        )
        for row in rows:
            _expire(row, now)
    return rows


def _expire(row: Instance, now: datetime) -> None:
    """pending -> expired: the daemon was not running at the trigger and the start has passed."""
    row.status = EXPIRED
    row.last_error = (
        "courtbot was not running when the booking window opened "
        f"({utils.format_utc(row.trigger_time)}) and the start has passed"
    )
    row.finished_at = now
    row.interrupted = False


def expire_if_passed(
    factory: sessionmaker[Session], key: str, now: datetime
) -> tuple[Instance | None, Outcome | None]:
    """At its trigger: a ``pending`` instance whose start has already passed becomes
    ``expired``. Returns the instance as read (None when gone) and, when it expired now, the
    outcome to report."""
    with transaction(factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        if row is None or row.status != PENDING or (row.slot_time or row.desired_time) > now:
            return row, None
        _expire(row, now)
        return row, outcome_of(row)


def booking_owners(factory: sessionmaker[Session]) -> set[str | None]:
    """The owners of the instances now ``booking`` (None for a claim without one)."""
    with factory() as session:
        return set(
            session.scalars(select(Instance.owner).where(Instance.status == BOOKING).distinct())
        )


def recover_in_flight(
    factory: sessionmaker[Session],
    now: datetime,
    *,
    live_owners: frozenset[str] = frozenset(),
    owner: str | None = None,
    keep: frozenset[str] = frozenset(),
    only: Collection[str] | None = None,
) -> tuple[list[str], list[Instance]]:
    """Instances left in ``booking`` by a crash: those whose owner is not among
    ``live_owners`` (a live daemon's claim is its own, whatever its role now); with ``owner``,
    only that daemon's but the ``keep`` keys (its bookings still under way): those whose end
    could not be written.

    An instance is claimed shortly before its trigger, no request leaves before the trigger, and
    attempts are counted when answered: with ``attempts`` at 0 and the trigger still ahead,
    nothing was sent and it simply goes back to ``pending``. Otherwise a request may have
    reached the club: while the start is ahead it is retried with the same Idempotency-Key, else
    it fails, its outcome unknown. Returns the keys retried and the instances that failed.
    """
    retried: list[str] = []
    failed: list[Instance] = []
    query = select(Instance).where(Instance.status == BOOKING)
    if live_owners:
        query = query.where(Instance.owner.is_(None) | Instance.owner.not_in(live_owners))
    if owner is not None:
        query = query.where(Instance.owner == owner)
    if keep:
        query = query.where(Instance.key.not_in(keep))
    if only is not None:
        query = query.where(Instance.key.in_(only))
    with transaction(factory) as session:
        for row in session.scalars(query):
            row.owner = None
            row.claim_epoch = None
            if row.club_took:
                # Its finishing steps were under way: the club has the booking, and the values
                # those steps need (a session, the booking's id) died with the daemon.
                row.status = FAILED
                row.last_error = (
                    f"the club took the booking ({_took(row)}) but courtbot stopped before the "
                    "steps after it completed; check it with the club (it is not booked again)"
                )
                row.finished_at = now
                row.interrupted = False
                failed.append(row)
            elif row.next_try_at is not None and row.watch_until and row.watch_until > now:
                # A try of a watch (CONTRACT 13): the watch goes on, its next try at once.
                row.status = WATCHING
            elif row.attempts == 0 and _first_send(row) > now:
                row.status = PENDING
            elif (row.slot_time or row.desired_time) > now:
                row.status = PENDING
                row.interrupted = True
                row.late_cause = LATE_INTERRUPTED
                row.last_error = (
                    "interrupted while booking (courtbot stopped); retried with the same "
                    "Idempotency-Key"
                )
                retried.append(row.key)
            else:
                row.status = FAILED
                row.last_error = (
                    "courtbot stopped while this booking was being sent and the start has "
                    "passed: its outcome is unknown, check with the club"
                )
                row.finished_at = now
                row.interrupted = False
                failed.append(row)
    return retried, failed


@dataclass
class Takeover:
    """What the new active daemon did with the claims of former ones (``take_over_claims``)."""

    #: Never sent (their trigger came after the former lease ended): pending, booked on time.
    released: list[str] = field(default_factory=list)
    #: Maybe sent, and the hold is over: retried with the same Idempotency-Key.
    retried: list[str] = field(default_factory=list)
    #: Maybe sent, the start passed, or the club took it before its finishing steps: failed.
    failed: list[Instance] = field(default_factory=list)
    #: Maybe sent and still held: (key, until when by the database's clock).
    held: list[tuple[str, datetime]] = field(default_factory=list)


def _first_send(row: Instance) -> datetime:
    """The earliest instant a booking request of ``row`` may have left: its trigger, or by the
    club's clock as measured before it, up to the offset less its uncertainty sooner (CONTRACT
    section 6). Before this nothing was sent; after it a request may have been."""
    ahead = (row.clock_offset_ms or 0.0) - (row.clock_uncertainty_ms or 0.0)
    return row.trigger_time - timedelta(milliseconds=max(0.0, ahead))


def take_over_claims(
    factory: sessionmaker[Session],
    fence: Fence,
    now: datetime,
    *,
    hold_seconds: float,
    margin_seconds: float,
) -> Takeover:
    """The claims of former active daemons (``booking`` under an older lease), taken over by the
    one holding ``fence`` (CONTRACT section 10). The former daemon sent nothing after its lease
    ended (``leases.previous_expires_at``): a claim whose trigger is later than that (plus
    ``margin_seconds`` for the hosts' clocks) was never sent and is pending again at once. One
    it may have sent is held until ``hold_seconds`` (HTTP_TIMEOUT_SECONDS and the margin) after
    that end, by the database's clock, so that its request has ended; then it is recovered as
    after a crash (retried with the same Idempotency-Key, its 409 "maybe ours")."""
    done = Takeover()
    stale = (Instance.status == BOOKING) & (
        Instance.owner.is_(None)
        | (Instance.owner != fence.owner)
        | Instance.claim_epoch.is_(None)
        | (Instance.claim_epoch != fence.epoch)
    )
    due: list[str] = []
    with transaction(factory) as session:
        lease = session.execute(
            select(Lease.previous_expires_at, func.timezone("UTC", func.now())).where(
                Lease.name == LEASE_ACTIVE, Lease.holder == fence.owner, Lease.epoch == fence.epoch
            )
        ).one_or_none()
        if lease is None:
            return done  # no longer the active daemon: nothing is written
        ended = lease[0] or now
        db_now = lease[1].replace(tzinfo=UTC)
        hold = timedelta(seconds=hold_seconds)
        for row in session.scalars(select(Instance).where(stale).with_for_update()):
            if not row.club_took and _first_send(row) >= ended + timedelta(seconds=margin_seconds):
                row.status, row.owner, row.claim_epoch = PENDING, None, None
                done.released.append(row.key)
            elif db_now >= ended + hold:
                due.append(row.key)
            else:
                done.held.append((row.key, ended + hold))
    if due:
        done.retried, done.failed = recover_in_flight(factory, now, only=due)
    return done


def note_late_triggers(factory: sessionmaker[Session], now: datetime) -> int:
    """At start: ``pending`` instances whose trigger has passed (the daemon was not running
    then) are booked at once; note why their request leaves late. Returns how many."""
    with transaction(factory) as session:
        return session.execute(
            update(Instance)
            .where(
                Instance.status == PENDING,
                Instance.trigger_time <= now,
                Instance.late_cause.is_(None),
            )
            .values(late_cause=LATE_DOWN)
        ).rowcount


#: The statuses that have a job: pending (at its trigger) and watching (at its next try).
SCHEDULED = (PENDING, WATCHING)
#: When an instance's job is due: its trigger, or while watching its next try (CONTRACT 13).
_DUE = case(
    (Instance.status == WATCHING, func.coalesce(Instance.next_try_at, Instance.trigger_time)),
    else_=Instance.trigger_time,
)


def pending_triggers(
    factory: sessionmaker[Session],
    keys: Collection[str] | None = None,
    *,
    until: datetime | None = None,
) -> dict[str, datetime]:
    """Every pending instance's key and trigger (aware UTC), and every watching one's next try;
    with ``keys``, those among them; with ``until``, those due by then (the jobs' horizon)."""
    if keys is None:
        return _scheduled_by(factory, until)
    # Looked up by key alone, the status read along: a planner without statistics (SQLite)
    # would rather scan every pending row through the status index for each page of keys.
    query = select(Instance.key, _DUE, Instance.status)
    wanted = sorted(keys)
    found: dict[str, datetime] = {}
    with factory() as session:
        for start in range(0, len(wanted), PAGE):
            rows = session.execute(query.where(Instance.key.in_(wanted[start : start + PAGE])))
            found.update(
                (key, utils.as_utc(due)) for key, due, status in rows if status in SCHEDULED
            )
    if until is not None:
        found = {key: due for key, due in found.items() if due <= until}
    return found


def _scheduled_by(factory: sessionmaker[Session], until: datetime | None) -> dict[str, datetime]:
    """``pending_triggers`` of every instance (by ``until`` when given): the pending ones
    through the status and trigger index, the few watching ones apart."""
    pending = select(Instance.key, Instance.trigger_time).where(Instance.status == PENDING)
    watching = select(Instance.key, _DUE).where(Instance.status == WATCHING)
    if until is not None:
        pending = pending.where(Instance.trigger_time <= until)
    with factory() as session:
        conn = session.connection()
        found = {key: utils.as_utc(due) for key, due in conn.execute(pending)}
        tries = [(key, utils.as_utc(due)) for key, due in conn.execute(watching)]
    found.update((key, due) for key, due in tries if until is None or due <= until)
    return found


def pending_mark(factory: sessionmaker[Session]) -> tuple[int, datetime | None]:
    """How many instances are pending and the latest change among them: cheap (the status
    index), for noticing a change made elsewhere (another daemon put a booking back, or a
    ``retry`` ran on another host)."""
    with factory() as session:
        count, latest = session.execute(
            select(func.count(), func.max(Instance.updated_at)).where(
                Instance.status.in_(SCHEDULED)
            )
        ).one()
    return int(count or 0), latest


def pending_clubs(factory: sessionmaker[Session], keys: Collection[str]) -> dict[str, str]:
    """The club of each scheduled (pending or watching) instance among ``keys`` that names one
    (the others book with the template or section 6's request), looked up by key as above."""
    by_key = select(Instance.key, Instance.club, Instance.status)
    wanted = sorted(keys)
    found: dict[str, str] = {}
    with factory() as session:
        for start in range(0, len(wanted), PAGE):
            rows = session.execute(by_key.where(Instance.key.in_(wanted[start : start + PAGE])))
            found.update(
                (key, club)
                for key, club, status in rows
                if status in SCHEDULED and club is not None
            )
    return found


def overdue(factory: sessionmaker[Session], before: datetime, *, limit: int = 20) -> list[str]:
    """Keys of the pending instances whose trigger is earlier than ``before`` (and the watching
    ones whose next try is), soonest first (at most ``limit``). With the scheduler working,
    each has its job running or about to run."""
    query = (
        select(Instance.key, Instance.trigger_time)
        .where(Instance.status == PENDING, Instance.trigger_time < before)
        .order_by(Instance.trigger_time, Instance.key)
        .limit(limit)
    )
    # The few watching instances apart, so that the pending ones keep their index.
    watching = (
        select(Instance.key, Instance.next_try_at)
        .where(Instance.status == WATCHING, Instance.next_try_at < before)
        .order_by(Instance.next_try_at, Instance.key)
        .limit(limit)
    )
    # Asked every second: on the session's connection, without the ORM's work (a quarter of it).
    with factory() as session:
        conn = session.connection()
        found = [(utils.as_utc(at), key) for key, at in conn.execute(query)]
        found += [(utils.as_utc(at), key) for key, at in conn.execute(watching)]
    return [key for _, key in sorted(found)[:limit]]


def next_trigger(factory: sessionmaker[Session]) -> datetime | None:
    """The earliest trigger of a pending instance, or next try of a watching one (None when
    there is neither)."""
    query = select(func.min(Instance.trigger_time)).where(Instance.status == PENDING)
    watching = select(func.min(Instance.next_try_at)).where(Instance.status == WATCHING)
    with factory() as session:
        conn = session.connection()
        found = [conn.execute(query).scalar(), conn.execute(watching).scalar()]
    known = [utils.as_utc(at) for at in found if at is not None]
    return min(known) if known else None


def pending_summary(factory: sessionmaker[Session]) -> tuple[int, Instance | None]:
    """How many instances are pending, and the one whose trigger comes first (None if none)."""
    with factory() as session:
        first = session.scalar(
            select(Instance)
            .where(Instance.status == PENDING)
            .order_by(Instance.trigger_time)
            .limit(1)
        )
        count = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.status == PENDING)
        )
    return int(count or 0), first


def token_names(factory: sessionmaker[Session]) -> set[str]:
    """The names of the tokens the database holds."""
    with factory() as session:
        return set(session.scalars(select(Token.id)))


def token_expiries(factory: sessionmaker[Session], fernet: MultiFernet) -> dict[str, datetime]:
    """When each stored token that is (or holds) a JWT expires, by name (``utils.jwt_expiry``:
    read, never verified). The secrets themselves are not returned."""
    with factory() as session:
        rows = list(session.scalars(select(Token)))
    expiries = {}
    for row in rows:
        secrets, problem = token_secrets(row, fernet, name=row.id)
        expires = utils.secrets_expiry(secrets) if problem is None else None
        if expires is not None:
            expiries[row.id] = expires
    return expiries


def pending_from(
    factory: sessionmaker[Session], token_name: str, moment: datetime
) -> tuple[int, Instance | None]:
    """How many pending instances of token ``token_name`` have their trigger at or after
    ``moment``, and the first of them (None when none)."""
    mine = (
        Instance.status == PENDING,
        Instance.token_name == token_name,
        Instance.trigger_time >= moment,
    )
    with factory() as session:
        first = session.scalar(
            select(Instance).where(*mine).order_by(Instance.trigger_time).limit(1)
        )
        count = session.scalar(select(func.count()).select_from(Instance).where(*mine))
    return int(count or 0), first


def remember_notice(factory: sessionmaker[Session], notice_id: str, now: datetime) -> bool:
    """Record that the warning ``notice_id`` has been sent: True the first time, False when it
    was already (so it goes out once, whatever the reloads and restarts)."""
    with transaction(factory) as session:
        if session.get(Notice, notice_id) is not None:
            return False
        session.add(Notice(id=notice_id, sent_at=now))
    return True


# --------------------------------------------------------------------------- loads


@dataclass(frozen=True)
class LoadRecord:
    """One load's result, as ``reload`` prints it and ``status`` sums it up."""

    id: int
    at: datetime
    reason: str
    host: str
    pid: int
    summary: str
    errors: list[str]
    at_once: list[str]


def record_load(
    factory: sessionmaker[Session],
    *,
    at: datetime,
    reason: str,
    pid: int,
    summary: str,
    errors: Sequence[str],
    at_once: Sequence[str] = (),
) -> int:
    """Keep a load's result (the latest ``LOADS_KEPT``); returns its id."""
    with transaction(factory) as session:
        row = Load(
            at=at,
            reason=reason,
            host=socket.gethostname(),
            pid=pid,
            summary=summary,
            errors=json.dumps(list(errors)),
            at_once=json.dumps(list(at_once)),
        )
        session.add(row)
        session.flush()
        session.execute(delete(Load).where(Load.id <= row.id - LOADS_KEPT))
        return int(row.id)


def last_load(factory: sessionmaker[Session] | None, *, after: int = 0) -> LoadRecord | None:
    """The latest load with an id above ``after`` (None when there is none, or the database
    predates the ``loads`` table: a reader never changes the schema)."""
    if factory is None:
        return None
    with factory() as session:
        if not inspect(session.get_bind()).has_table(Load.__tablename__):
            return None
        row = session.scalar(select(Load).where(Load.id > after).order_by(Load.id.desc()).limit(1))
        if row is None:
            return None
        return LoadRecord(
            id=row.id,
            at=row.at,
            reason=row.reason,
            host=row.host,
            pid=row.pid,
            summary=row.summary,
            errors=list(json.loads(row.errors or "[]")),
            at_once=list(json.loads(row.at_once or "[]")),
        )


def at_once(factory: sessionmaker[Session], keys: Iterable[str], now: datetime) -> list[str]:
    """Of ``keys`` (what a load added or revived), the pending instances whose window is open
    already, so that they book at once: one line each, soonest start first."""
    lines = []
    wanted = set(keys)
    if not wanted:
        return []
    # The instances whose window is open are few (the status index finds them); the keys of a
    # cold load are 52,000.
    query = select(Instance).where(Instance.status == PENDING, Instance.trigger_time <= now)
    with factory() as session:
        for row in session.scalars(query):
            if row.key in wanted:
                zone = utils.get_zone(row.timezone)
                local = utils.format_local(row.desired_time, zone)
                lines.append((row.desired_time, f"{row.key} ({local}): books at once when loaded"))
    return [line for _, line in sorted(lines)]


def open_window_statuses(factory: sessionmaker[Session], now: datetime) -> dict[str, str]:
    """The status of each instance whose window is open and whose start is ahead, by key:
    what ``check`` needs to tell a booking that a load would send at once from one already
    made."""
    with factory() as session:
        rows = session.execute(
            select(Instance.key, Instance.status).where(
                Instance.trigger_time <= now, Instance.desired_time > now
            )
        )
        return {key: status for key, status in rows}


# --------------------------------------------------------------------------- a booking


@dataclass(frozen=True)
class Fence:
    """The active daemon ``owner`` under the lease ``epoch`` (its fencing token) on a shared
    PostgreSQL database: a booking's writes (claim, attempts, release, outcome) happen only
    while that lease is still the current one, so a former active daemon writes nothing over
    the new one's (CONTRACT section 10)."""

    owner: str
    epoch: int

    def current(self) -> Any:
        """The condition: the lease is still this daemon's, under this epoch."""
        return exists(
            select(Lease.name).where(
                Lease.name == LEASE_ACTIVE, Lease.holder == self.owner, Lease.epoch == self.epoch
            )
        )

    def mine(self) -> Any:
        """The condition on an instance: still claimed by this daemon under this lease."""
        return (
            (Instance.status == BOOKING)
            & (Instance.owner == self.owner)
            & (Instance.claim_epoch == self.epoch)
            & self.current()
        )


def claim(
    factory: sessionmaker[Session],
    key: str,
    now: datetime,
    *,
    owner: str | None = None,
    fence: Fence | None = None,
) -> bool:
    """pending -> booking by the daemon ``owner``, committed before any request leaves. One
    conditional update sets both, so two claimants can never both send, and a claim always
    names its owner (whose live claims no other daemon takes over): True for the one that got
    it. With ``fence``, only while its lease is current, and the claim carries its epoch."""
    return _claim_where(
        factory, (Instance.key == key, Instance.status == PENDING), now, owner=owner, fence=fence
    )


def _claim_where(
    factory: sessionmaker[Session],
    conditions: tuple[Any, ...],
    now: datetime,
    *,
    owner: str | None,
    fence: Fence | None,
) -> bool:
    """-> booking by ``owner`` for the one instance meeting ``conditions``, in one conditional
    update (``claim``, ``claim_watch``); with ``fence`` only under its current lease."""
    query = update(Instance).where(*conditions)
    values: dict[str, Any] = {"status": BOOKING, "owner": owner, "updated_at": now}
    if fence is not None:
        query = query.where(fence.current())
        values["claim_epoch"] = fence.epoch
    with transaction(factory) as session:
        claimed = session.execute(query.values(**values)).rowcount
    return claimed == 1


def status_of(factory: sessionmaker[Session], key: str) -> str | None:
    """The instance's status as committed (None when it is gone)."""
    with factory() as session:
        return session.scalar(select(Instance.status).where(Instance.key == key))


def claimed(factory: sessionmaker[Session], key: str) -> tuple[Instance, Token | None]:
    """A claimed instance and the row of its token (None when tokens.json lacks it)."""
    with factory() as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None
        return row, session.get(Token, row.token_name)


def token_secrets(
    token_row: Token | None, fernet: MultiFernet, *, name: str
) -> tuple[dict[str, str], str | None]:
    """The decrypted secrets of the token ``name`` (its row, None when the database has none):
    ``{"token": value}`` for a string token, the fields of an object token. Returns them and
    None, or an empty dict and the problem for a person (what to fix)."""
    if token_row is None or token_row.encrypted_token is None:
        if token_row is not None and token_row.error:
            return {}, token_row.error
        return {}, f"token {name!r} is not in tokens.json: add it there and reload"
    if token_row.error:
        return {}, token_row.error
    undecryptable = (
        f"token {name!r} in the database does not decrypt with FERNET_KEY (was the key "
        "changed?): put the token in tokens.json again and reload"
    )
    encrypted: Any = token_row.encrypted_token
    if token_row.kind == KIND_OBJECT:
        try:
            encrypted = json.loads(encrypted)
        except ValueError:
            return {}, undecryptable
        if not isinstance(encrypted, dict):
            return {}, undecryptable
    secrets = utils.decrypt_secrets(fernet, encrypted)
    return ({}, undecryptable) if secrets is None else (secrets, None)


def release(
    factory: sessionmaker[Session], key: str, *, sent: bool = False, fence: Fence | None = None
) -> None:
    """booking -> pending (a try of a watch: watching): a shutdown before the trigger or
    between retries, or a daemon that is no longer the active one. ``sent``: a request may
    have reached the club, so the active daemon's retry is marked ``interrupted`` (its 409 may
    be our own). With ``fence``: only this daemon's claim while its lease is current."""
    values: dict[str, Any] = {"status": PENDING, "owner": None}
    if sent:
        values["interrupted"] = True
    claimed = [Instance.key == key, Instance.status == BOOKING]
    if fence is not None:
        claimed.append(fence.mine())
    with transaction(factory) as session:
        # A try of a watch goes back to watching, its next try as it was (CONTRACT 13).
        session.execute(
            update(Instance)
            .where(*claimed, Instance.next_try_at.is_not(None))
            .values(status=WATCHING, owner=None)
        )
        session.execute(update(Instance).where(*claimed).values(**values))


def club_took(
    factory: sessionmaker[Session],
    key: str,
    *,
    booking_ref: str | None,
    court: str | None,
    attempts: int,
    first_sent_at: datetime | None,
    fence: Fence | None = None,
) -> None:
    """The club took the booking and finishing steps are still to run (CONTRACT section 12):
    from now on the instance is never booked again, whatever happens to those steps. The
    requests answered so far and when the first left are written too, so that an outcome
    written after a crash in those steps says when the booking request went. With ``fence``:
    only this daemon's claim while its lease is current."""
    mine = Instance.key == key if fence is None else (Instance.key == key) & fence.mine()
    with transaction(factory) as session:
        session.execute(
            update(Instance)
            .where(mine)
            .values(club_took=True, booking_ref=booking_ref, booked_court=court, attempts=attempts)
        )
        session.execute(
            update(Instance)
            .where(mine, Instance.first_sent_at.is_(None))
            .values(first_sent_at=first_sent_at)
        )


def _took(row: Instance) -> str:
    """What the club took, for a reason: ``court 3, ref BK-1``."""
    court = row.booked_court if row.booked_court is not None else "any"
    return f"court {court}" + (f", ref {row.booking_ref}" if row.booking_ref else "")


def record_attempt(
    factory: sessionmaker[Session],
    key: str,
    attempts: int,
    first_sent_at: datetime | None = None,
    *,
    fence: Fence | None = None,
) -> None:
    """The number of requests answered (or lost) so far, before a wait between retries, and
    when the first of them left (kept if one is already recorded)."""
    mine = Instance.key == key if fence is None else (Instance.key == key) & fence.mine()
    with transaction(factory) as session:
        session.execute(update(Instance).where(mine).values(attempts=attempts))
        if first_sent_at is not None:
            session.execute(
                update(Instance)
                .where(mine, Instance.first_sent_at.is_(None))
                .values(first_sent_at=first_sent_at)
            )


def finish(
    factory: sessionmaker[Session],
    key: str,
    status: str,
    reason: str | None,
    *,
    now: datetime,
    booking_ref: str | None = None,
    court: str | None = None,
    attempts: int | None = None,
    first_sent_at: datetime | None = None,
    retry_helps: bool = True,
    fence: Fence | None = None,
    booked_time: str | None = None,
    from_watch: bool = False,
) -> Outcome | None:
    """booking -> booked or failed, with the reason a person reads; returns the outcome to
    report. ``first_sent_at``: when the first request left (an earlier one recorded stays);
    ``retry_helps`` False when a ``retry`` would meet the same answer (every court taken).
    With ``fence``: only while the instance is this daemon's claim under its current lease;
    None (nothing written, nothing to report) when it is not (CONTRACT section 10: only the
    active daemon writes an outcome)."""
    query = select(Instance).where(Instance.key == key)
    if fence is not None:
        query = query.where(fence.mine()).with_for_update()
    with transaction(factory) as session:
        row = session.scalar(query)
        if row is None and fence is not None:
            return None
        assert row is not None
        if row.status != BOOKING:
            # Already settled (a second outcome for one booking: an error after it was booked)
            # or no longer claimed: what was written stands, and nothing is reported twice.
            logger.warning(
                "booking %s: a second outcome (%s) for an instance already %s was not written",
                key,
                status,
                row.status,
            )
            return None
        if attempts is not None:
            row.attempts = attempts
        if row.first_sent_at is None:
            row.first_sent_at = first_sent_at
        row.status = status
        # No URL's userinfo in a stored reason: it may be a secret (a club's redirect).
        row.last_error = utils.mask_userinfo(reason) if reason else reason
        row.booking_ref = booking_ref
        if status == BOOKED or row.club_took:
            row.booked_court = court
            row.booked_time = booked_time
            _point_at(row, booked_time)
        row.next_try_at = None
        row.finished_at = now
        row.interrupted = False
        row.owner = None
        return outcome_of(row, retry_helps=retry_helps, from_watch=from_watch)


# --------------------------------------------------------------------------- section 13


@dataclass(frozen=True)
class Attempt:
    """What a booking of an instance is for (CONTRACT section 13): the time tried (``HH:MM``
    local), its start, whether it is a fallback time, and the players."""

    time: str
    start: datetime
    fallback: bool
    players: tuple[str, ...]


def attempt_of(row: Instance) -> Attempt:
    """The slot a claimed instance books now: its desired time, or the fallback time reached."""
    times = times_of(row)
    step = min(row.fallback_step or 0, len(times) - 1)
    text, start, _trigger = times[step]
    players = tuple(json.loads(row.players)) if row.players else ()
    return Attempt(text, start if step else row.desired_time, step > 0, players)


def _point_at(row: Instance, booked_time: str | None) -> None:
    """The instance's slot is the time that was booked (a watch takes the times in turn, so
    the last one tried need not be it): the outcome's start and a ``cancel`` follow it."""
    if booked_time is None or not row.fallbacks:
        return
    for step, (text, start, _trigger) in enumerate(times_of(row)):
        if text == booked_time:
            row.fallback_step, row.slot_time = step, (start if step else None)
            return


def _claimed_row(key: str, fence: Fence | None) -> Any:
    """The query of the instance ``key``; with ``fence`` only while it is this daemon's claim
    under its current lease (CONTRACT section 10: only the active daemon writes)."""
    query = select(Instance).where(Instance.key == key)
    return query if fence is None else query.where(fence.mine()).with_for_update()


def fall_back(
    factory: sessionmaker[Session],
    key: str,
    *,
    tried: str,
    now: datetime,
    fence: Fence | None = None,
) -> tuple[str, datetime, datetime] | None:
    """booking -> pending at the next fallback time whose start is still ahead (one equal to
    the desired time is not among them), at that time's own trigger; ``tried`` is what each
    time tried so far met. Returns (HH:MM, start, trigger) of that time, None when no time is
    left (the caller ends the instance: failed, or watching). With ``fence``: only this
    daemon's claim under its current lease (else nothing is written, and None)."""
    with transaction(factory) as session:
        row = session.scalar(_claimed_row(key, fence))
        if row is None:
            return None
        row.tried = tried
        # The next time's request is its own: "sent ... after the window opened" counts from
        # its trigger, not from the first time's (CONTRACT 8).
        row.first_sent_at = None
        times = times_of(row)
        for step in range((row.fallback_step or 0) + 1, len(times)):
            text, start, trigger = times[step]
            if start <= now:
                continue
            row.status = PENDING
            row.owner = None
            row.interrupted = False
            row.fallback_step = step
            row.slot_time = start
            row.trigger_time = trigger
            row.late_cause = LATE_FALLBACK if trigger <= now else None
            return text, start, trigger
        return None


def watch(
    factory: sessionmaker[Session],
    key: str,
    *,
    tried: str,
    next_try: datetime,
    fence: Fence | None = None,
) -> Instance | None:
    """booking -> watching (every court and time taken, the entry watches): tried again at
    ``next_try``. Returns the instance (for the ``Watching:`` message), None when it has no
    watch or its watch would end before ``next_try`` (the caller ends it as failed), or with
    ``fence`` when it is no longer this daemon's claim under its current lease."""
    with transaction(factory) as session:
        row = session.scalar(_claimed_row(key, fence))
        if row is None or row.watch_until is None or next_try >= row.watch_until:
            return None
        row.status = WATCHING
        row.owner = None
        row.tried = tried
        row.next_try_at = next_try
        row.watch_tries = 0
        row.last_error = f"{tried}; watching until {_watch_end_text(row)}"
        session.flush()
        session.expunge(row)
        return row


def _watch_end_text(row: Instance) -> str:
    assert row.watch_until is not None
    return utils.format_local(row.watch_until, utils.get_zone(row.timezone))


#: How long before its time a try of a watch may be claimed (its job's lead is 2 s).
WATCH_CLAIM_AHEAD = timedelta(seconds=30)


def claim_watch(
    factory: sessionmaker[Session],
    key: str,
    now: datetime,
    *,
    owner: str | None = None,
    fence: Fence | None = None,
) -> bool:
    """watching -> booking for one try of the watch, from ``WATCH_CLAIM_AHEAD`` before its time
    (its job starts a little early, as a booking's does; the try waits for its time): True for
    the one that got it (as ``claim``; with ``fence`` too)."""
    due = (
        Instance.key == key,
        Instance.status == WATCHING,
        Instance.next_try_at <= now + WATCH_CLAIM_AHEAD,
    )
    return _claim_where(factory, due, now, owner=owner, fence=fence)


def watch_again(
    factory: sessionmaker[Session],
    key: str,
    *,
    next_try: datetime,
    said: str,
    fence: Fence | None = None,
) -> bool:
    """booking -> watching after a try that found every court still taken (``said``: what the
    club answered): one more try counted, the next at ``next_try``. False when the watch ends
    before then (the caller ends it with ``end_watch``)."""
    with transaction(factory) as session:
        row = session.scalar(_claimed_row(key, fence))
        if row is None or row.status != BOOKING:
            # A reload ended the watch meanwhile (cancelled), or this daemon is no longer the
            # active one (the active one settles it): nothing more.
            return True
        row.watch_tries = (row.watch_tries or 0) + 1
        if row.watch_until is None or next_try >= row.watch_until:
            return False
        row.status = WATCHING
        row.owner = None
        row.next_try_at = next_try
        row.last_error = (
            f"{row.tried}; watching until {_watch_end_text(row)}, {_tries(row.watch_tries)} "
            f"so far (last: {said})"
        )
        return True


def _tries(count: int) -> str:
    return f"{count} {'try' if count == 1 else 'tries'}"


def watch_end_reason(row: Instance) -> str:
    """The reason of a watch that ended with every court still taken (CONTRACT section 13)."""
    return f"taken; watched until {_watch_end_text(row)}, {_tries(row.watch_tries or 0)}"


def end_watch(
    factory: sessionmaker[Session], key: str, now: datetime, *, fence: Fence | None = None
) -> Outcome | None:
    """booking or watching -> failed: the watch ended with every court still taken."""
    with transaction(factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None
        reason = watch_end_reason(row)
        if row.tried:
            reason += f" ({row.tried})"
    return finish(factory, key, FAILED, reason, now=now, retry_helps=False, fence=fence)


def due_watches(factory: sessionmaker[Session]) -> dict[str, datetime]:
    """The ``watching`` instances and when each tries next."""
    query = select(Instance.key, Instance.next_try_at).where(Instance.status == WATCHING)
    with factory() as session:
        return {key: utils.as_utc(at) for key, at in session.execute(query) if at is not None}


def cancel_problem(factory: sessionmaker[Session], key: str) -> str | None:
    """Why ``cancel KEY`` can send nothing (None when it can): no such instance, not booked, or
    booked without a reference to cancel it by."""
    with factory() as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
    if row is None:
        return f"no instance {key!r} (see `status` for the keys)"
    if row.status != BOOKED:
        return f"{key} is {row.status}, not booked: only a booked instance can be cancelled"
    if not row.booking_ref:
        return (
            f"{key} is booked without a booking reference (the club's answer gave none): "
            "cancel it with the club"
        )
    return None


def cancelled_at_club(factory: sessionmaker[Session], key: str, now: datetime) -> Instance:
    """booked -> cancelled: the club confirmed ``cancel``. Never revived by a reload."""
    with transaction(factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None and row.status == BOOKED
        row.status = CANCELLED
        row.cancelled_booking = True
        row.last_error = f"cancelled at the club with `cancel` (was {_took(row)})"
        row.finished_at = now
        session.flush()
        session.expunge(row)
        return row


def record_clock(
    factory: sessionmaker[Session],
    key: str,
    *,
    offset_ms: float | None = None,
    uncertainty_ms: float | None = None,
    error: str | None = None,
) -> None:
    """Note how the booking of ``key`` is timed: by the club's clock as measured (offset and
    uncertainty in ms), or by ours because the measurement failed (``error``)."""
    with transaction(factory) as session:
        session.execute(
            update(Instance)
            .where(Instance.key == key)
            .values(
                clock_offset_ms=offset_ms,
                clock_uncertainty_ms=uncertainty_ms,
                clock_error=error[:300] if error else None,
            )
        )


@dataclass(frozen=True)
class _Clock:
    """Which clock a booking was sent by (``record_clock``)."""

    offset_ms: float | None = None
    uncertainty_ms: float | None = None
    error: str | None = None

    @classmethod
    def of(cls, row: Instance) -> _Clock:
        return cls(
            _optional(row, "clock_offset_ms"),
            _optional(row, "clock_uncertainty_ms"),
            _optional(row, "clock_error"),
        )

    @property
    def label(self) -> str:
        """`` by the club's clock (+412 ms ± 6 ms)``, `` by our clock (...)`` or nothing."""
        if self.offset_ms is not None:
            return (
                f" by the club's clock ({self.offset_ms:+.0f} ms ± "
                f"{max(self.uncertainty_ms or 0.0, 1.0):.0f} ms)"
            )
        if self.error is not None:
            return " by our clock (the club's clock could not be measured)"
        return ""


def timing_of(row: Instance) -> str | None:
    """When the instance's first request left, for a person (None while nothing is final)."""
    return _timing(row.status, row.trigger_time, row.first_sent_at, row.late_cause, _Clock.of(row))


def _timing(
    status: str,
    trigger: datetime,
    first_sent: datetime | None,
    cause: str | None,
    clock: _Clock | None = None,
) -> str | None:
    if first_sent is not None:
        clock = clock or _Clock()
        if clock.offset_ms is not None:
            # The window opened at the trigger by the club's clock: our trigger - offset.
            trigger -= timedelta(milliseconds=clock.offset_ms)
        timing = utils.send_timing(trigger, first_sent, LATE_CAUSES.get(cause or "")) + clock.label
        # On time is no comfort when it did not book (the club down, the court taken): say so
        # in the same breath, so that the line does not read as a success.
        return f"{timing}, but not booked: see the reason" if status == FAILED else timing
    if status == EXPIRED:
        return "not sent: courtbot was not running at the trigger"
    if status == FAILED:
        return "no booking request was sent"
    return None


def outcome_of(row: Instance, *, retry_helps: bool = True, from_watch: bool = False) -> Outcome:
    """The report of an instance's final status (or of a watch that starts, a booking
    cancelled), for notify. Booked at a fallback time, its start is that time's."""
    zone = utils.get_zone(row.timezone)
    court = row.booked_court if row.status in (BOOKED, CANCELLED) else row.court_id
    start = row.desired_time
    first_choice = None
    if row.status == BOOKED and row.fallback_step and row.slot_time is not None:
        start = row.slot_time
        first_choice = row.desired_time.astimezone(zone).strftime("%H:%M")
    return Outcome(
        status=row.status,
        key=row.key,
        schedule_id=row.schedule_id,
        court=court,
        desired_start=start.astimezone(zone),
        trigger_time=row.trigger_time,
        duration_minutes=row.duration_minutes,
        attempts=row.attempts,
        reason=row.last_error,
        booking_ref=row.booking_ref,
        timezone=row.timezone,
        timing=timing_of(row),
        retry_helps=retry_helps,
        location=row.club,
        club_took=bool(row.club_took) and row.status != BOOKED,
        first_choice=first_choice,
        from_watch=from_watch,
        watch_until=row.watch_until if row.status == WATCHING else None,
    )


# --------------------------------------------------------------------------- the CLI


def retry(factory: sessionmaker[Session], target: str, now: datetime) -> list[str]:
    """failed -> pending for the instances of ``target`` (a key or a schedule id) whose start is
    still ahead, attempts and last error cleared; never one the club took (``club_took``: a
    finishing step failed after the booking was made). Returns their keys."""
    with transaction(factory) as session:
        keys = list(
            session.scalars(
                select(Instance.key).where(
                    (Instance.key == target) | (Instance.schedule_id == target),
                    Instance.status == FAILED,
                    Instance.desired_time > now,
                    Instance.club_took.is_not(True),
                )
            )
        )
        if keys:
            # One that went on to a fallback time or a watch starts again at its desired time.
            for row in session.scalars(
                select(Instance).where(
                    Instance.key.in_(keys),
                    (Instance.fallback_step > 0)
                    | Instance.tried.is_not(None)
                    | (Instance.watch_tries > 0),
                )
            ):
                _fresh(row)
            session.flush()
            cleared = dict(
                status=PENDING,
                attempts=0,
                last_error=None,
                finished_at=None,
                interrupted=False,
                first_sent_at=None,
            )
            # Each is booked again at once if its window is open: its request then leaves late.
            for window_open, cause in (
                (Instance.trigger_time <= now, LATE_RETRY),
                (Instance.trigger_time > now, None),
            ):
                session.execute(
                    update(Instance)
                    .where(Instance.key.in_(keys), window_open)
                    .values(late_cause=cause, **cleared)
                )
            # In the same transaction: the daemon (here or on another host) sees the keys
            # exactly when it can see them pending, and schedules just these.
            session.execute(insert(Wakeup), [{"key": key, "created_at": now} for key in keys])
    return keys


def taken_by_club(factory: sessionmaker[Session], target: str, now: datetime) -> list[Instance]:
    """The ``failed`` instances of ``target`` still ahead that ``retry`` leaves alone: the club
    took their booking, a step after it did not complete."""
    with factory() as session:
        return list(
            session.scalars(
                select(Instance)
                .where(
                    (Instance.key == target) | (Instance.schedule_id == target),
                    Instance.status == FAILED,
                    Instance.desired_time > now,
                    Instance.club_took.is_(True),
                )
                .order_by(Instance.desired_time)
            )
        )


def wakeups(factory: sessionmaker[Session]) -> list[tuple[int, str]]:
    """The (id, instance key) rows ``retry`` left for the daemon, oldest first (usually none:
    one read of an empty table)."""
    query = select(Wakeup.id, Wakeup.key).order_by(Wakeup.id)
    with factory() as session:
        return [(wakeup_id, key) for wakeup_id, key in session.execute(query)]


def clear_wakeups(factory: sessionmaker[Session], up_to: int) -> None:
    """Forget the wakeups handled: those with an id up to ``up_to``."""
    with transaction(factory) as session:
        session.execute(delete(Wakeup).where(Wakeup.id <= up_to))


#: Columns added since the first release: a reader (``status``) never changes the schema, so on
#: an older database they are left out of its queries and read as NULL.
_ADDED_COLUMNS = (
    "interrupted",
    "owner",
    "club",
    "first_sent_at",
    "late_cause",
    "club_took",
    "clock_offset_ms",
    "clock_uncertainty_ms",
    "clock_error",
    "claim_epoch",
    "fallbacks",
    "players",
    "watch_until",
    "fallback_step",
    "slot_time",
    "tried",
    "booked_time",
    "next_try_at",
    "watch_tries",
    "cancelled_booking",
    "rehearsal",
    "rehearsed_at",
)


def _reader_query(session: Session) -> Any:
    """``select(Instance)`` with the columns this database lacks deferred (never loaded)."""
    bind = session.get_bind()
    present = {column["name"] for column in inspect(bind).get_columns(Instance.__tablename__)}
    missing = [getattr(Instance, name) for name in _ADDED_COLUMNS if name not in present]
    return select(Instance).options(*(defer(column) for column in missing))


def _optional(row: Instance, name: str) -> Any:
    """An added column's value, None when the database lacks it (deferred, unloaded)."""
    return None if name in inspect(row).unloaded else getattr(row, name)


def status_rows(
    factory: sessionmaker[Session] | None,
    *,
    schedule: str | None = None,
    statuses: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The instances as ``status --json`` prints them, soonest trigger first: all of them, or
    those of ``schedule``, in one of ``statuses``, the first ``limit``."""
    if factory is None:
        return []
    with factory() as session:
        query = _reader_query(session)
        if schedule is not None:
            query = query.where(Instance.schedule_id == schedule)
        if statuses is not None:
            query = query.where(Instance.status.in_(list(statuses)))
        query = query.order_by(Instance.trigger_time, Instance.key).limit(limit)
        return [_status_row(row) for row in session.scalars(query)]


def upcoming(
    factory: sessionmaker[Session] | None,
    now: datetime,
    *,
    schedule: str | None = None,
    limit: int = 5,
) -> list[dict[str, Any]]:
    """The next ``limit`` bookings ahead of ``now`` (pending, under way, watching or booked),
    soonest start first, as ``status_rows`` gives them."""
    if factory is None:
        return []
    with factory() as session:
        query = _reader_query(session).where(
            Instance.desired_time > now,
            Instance.status.in_([PENDING, BOOKING, WATCHING, BOOKED]),
        )
        if schedule is not None:
            query = query.where(Instance.schedule_id == schedule)
        query = query.order_by(Instance.desired_time, Instance.key).limit(limit)
        return [_status_row(row) for row in session.scalars(query)]


def recent_outcomes(
    factory: sessionmaker[Session] | None, since: datetime, *, schedule: str | None = None
) -> list[dict[str, Any]]:
    """The final outcomes (booked, failed, expired) reached since ``since``, latest first."""
    if factory is None:
        return []
    with factory() as session:
        query = _reader_query(session).where(
            Instance.status.in_(list(FINAL)), Instance.finished_at >= since
        )
        if schedule is not None:
            query = query.where(Instance.schedule_id == schedule)
        query = query.order_by(Instance.finished_at.desc(), Instance.key)
        return [_status_row(row) for row in session.scalars(query)]


def _status_row(row: Instance) -> dict[str, Any]:
    zone = utils.get_zone(row.timezone)
    courts = json.loads(row.courts)
    court_value: Any = courts if len(courts) > 1 else courts[0]
    return {
        "schedule": row.schedule_id,
        "key": row.key,
        "type": row.type,
        "desired_time": utils.format_utc(row.desired_time),
        "desired_local": row.desired_time.astimezone(zone).isoformat(),
        "trigger_time": utils.format_utc(row.trigger_time),
        "timezone": row.timezone,
        "court_id": court_value,
        "booked_court": row.booked_court,
        "token": row.token_name,
        "duration_minutes": row.duration_minutes,
        "status": row.status,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "booking_ref": row.booking_ref,
        "finished_at": utils.format_utc(row.finished_at) if row.finished_at else None,
        "first_sent_at": _utc_us(_optional(row, "first_sent_at")),
        "sent": _timing_text(row),
        "booked_time": _optional(row, "booked_time"),
        "watch_until": _utc_or_none(_optional(row, "watch_until")),
        "next_try": _utc_or_none(_optional(row, "next_try_at")) if row.status == WATCHING else None,
        "watch_tries": _optional(row, "watch_tries") or 0,
        "rehearsal": _optional(row, "rehearsal"),
    }


def _utc_or_none(moment: datetime | None) -> str | None:
    return utils.format_utc(moment) if moment is not None else None


def _utc_us(moment: datetime | None) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (None stays None): a send time, to the microsecond."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _timing_text(row: Instance) -> str | None:
    """``timing_of`` for a row read by ``status``; None on a database too old to know."""
    if row.status not in FINAL or "first_sent_at" in inspect(row).unloaded:
        return None
    return _timing(
        row.status,
        row.trigger_time,
        row.first_sent_at,
        _optional(row, "late_cause"),
        _Clock.of(row),
    )


# --------------------------------------------------------------------------- rehearsals


def rehearsal_candidates(factory: sessionmaker[Session], until: datetime) -> list[Instance]:
    """The pending instances whose trigger is no later than ``until`` (those already due too:
    booked at once), and the instances whose booking is under way, soonest trigger first
    (detached: read, never written through). A rehearsal waits for those near their trigger."""
    with factory() as session:
        query = (
            select(Instance)
            .where(
                ((Instance.status == PENDING) & (Instance.trigger_time <= until))
                | (Instance.status == BOOKING)
            )
            .order_by(Instance.trigger_time, Instance.key)
        )
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def record_rehearsal(
    factory: sessionmaker[Session], keys: Sequence[str], now: datetime, problem: str | None
) -> None:
    """Write a rehearsal's result to the instances ``keys`` that are still pending; their status
    never changes (CONTRACT section 12)."""
    stamp = utils.format_utc(now)
    text = f"ok {stamp}" if problem is None else f"failed {stamp}: {problem}"
    with transaction(factory) as session:
        session.execute(
            update(Instance)
            .where(Instance.key.in_(list(keys)), Instance.status == PENDING)
            .values(rehearsal=text, rehearsed_at=now)
            .execution_options(synchronize_session=False)
        )
