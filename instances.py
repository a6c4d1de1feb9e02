"""The lifecycle of an instance, and every question asked about instances and tokens.

One function per transition (CONTRACT section 7), one wording per reason:

    pending -> booking (claim) -> booked | failed (finish); booking -> pending (release)
    pending -> expired (expire_missed at start, expire_if_passed at the trigger)
    pending -> cancelled -> pending (reconcile); failed -> pending (retry)
    booking left by a crash -> pending (interrupted) or failed (recover_in_flight)

``reconcile`` applies a validated config (``config_loader``) as a diff. A state is a column,
never a prefix of a message: a booking cut off by a crash is ``Instance.interrupted``.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.fernet import MultiFernet
from sqlalchemy import delete, func, insert, inspect, select, update
from sqlalchemy.orm import Session, defer, sessionmaker

import utils
from config_loader import SCHEDULES_FILE, Config, Entry, TokensResult
from models import (
    BOOKED,
    BOOKING,
    CANCELLED,
    EXPIRED,
    FAILED,
    FINAL,
    KIND_OBJECT,
    KIND_STRING,
    LOADS_KEPT,
    PENDING,
    Instance,
    Load,
    Notice,
    Token,
    Wakeup,
    transaction,
)
from notify import Outcome

logger = logging.getLogger(__name__)

#: Rows read (and ORM objects held) at a time by reconcile and the pending-trigger pages: a load
#: of 52,000 instances never holds them all at once (what a load leaves behind stays in the heap).
PAGE = 200
#: Schedule entries reconciled together: their rows are read in one query, then let go.
ENTRIES_PER_PASS = 4


#: Why an instance's first request may leave after its trigger (``Instance.late_cause``), noted
#: when it became due late; the wording a person reads.
LATE_DOWN = "down"
LATE_LOADED = "loaded"
LATE_RETRY = "retry"
LATE_INTERRUPTED = "interrupted"
LATE_CAUSES = {
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
) -> Changes:
    """Apply a validated config to the database as a diff (CONTRACT section 5). Each entry's
    triggers follow the window that applies to it (``Entry.window``).

    ``only`` limits the work to these schedule ids (the recurring top-up). ``unchanged`` names
    entries identical to the last load's, whose rows need no look (the daily top-up keeps their
    horizon). Booked instances are never touched; instances of rejected entries are kept as
    they were.
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
        # A few entries at a time: their rows are read in one query, reconciled, flushed and
        # let go, so that a load of thousands of instances never holds them all as objects.
        work = sorted(ids | removable)
        for start in range(0, len(work), ENTRIES_PER_PASS):
            chunk = work[start : start + ENTRIES_PER_PASS]
            rows_by_schedule: dict[str, dict[str, Instance]] = {}
            stored_chunk = [i for i in chunk if i in stored_ids]
            if stored_chunk:
                query = select(Instance).where(Instance.schedule_id.in_(stored_chunk))
                for row in session.scalars(query):
                    rows_by_schedule.setdefault(row.schedule_id, {})[row.key] = row
            for schedule_id in chunk:
                rows = rows_by_schedule.get(schedule_id, {})
                if schedule_id in removable:
                    for row in rows.values():
                        if row.status == PENDING or preparing(row, now):
                            _cancel(row, changes, "entry removed from schedules.json")
                else:
                    changes.merge(_reconcile_entry(session, entries[schedule_id], rows, now))
            session.flush()
            session.expunge_all()
    return changes


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


def _cancel(row: Instance, changes: Changes, why: str) -> None:
    row.status = CANCELLED
    row.owner = None
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
    }


def _reconcile_entry(
    session: Session, entry: Entry, rows: dict[str, Instance], now: datetime
) -> Changes:
    changes = Changes()
    planned = entry.plan(now)
    fields = _entry_fields(entry)
    wanted = {p.key for p in planned}
    new_rows: list[dict[str, Any]] = []
    for item in planned:
        row = rows.get(item.key)
        if row is None:
            if entry.enabled:
                new_rows.append(
                    dict(
                        key=item.key,
                        schedule_id=entry.id,
                        desired_time=item.desired,
                        trigger_time=item.trigger,
                        status=PENDING,
                        attempts=0,
                        late_cause=LATE_LOADED if item.trigger <= now else None,
                        **fields,
                    )
                )
            continue
        _reconcile_planned(row, item.trigger, entry, fields, changes=changes, now=now)
    _cancel_unplanned(entry, rows, wanted, changes, now)
    if new_rows:
        # One multi-row INSERT: thousands of instances on a cold load, without ORM objects.
        stamp = utils.as_utc(now)
        for row_values in new_rows:
            row_values.update(created_at=stamp, updated_at=stamp)
        session.execute(insert(Instance), new_rows)
        changes.added += len(new_rows)
        changes.keys.update(row_values["key"] for row_values in new_rows)
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
    if row.status == CANCELLED and entry.enabled:
        row.status = PENDING
        row.last_error = None
        row.attempts = 0
        row.late_cause = LATE_LOADED if trigger <= now else None
        changes.revived += 1
        changes.keys.add(row.key)
    under_way = preparing(row, now)
    if row.status != PENDING and not under_way:
        return
    if not entry.enabled:
        _cancel(row, changes, "entry disabled in schedules.json")
        return
    if under_way:
        return  # its booking goes on with the court, token and trigger it was claimed with
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
        if key in wanted or (row.status != PENDING and not preparing(row, now)):
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
                select(Instance).where(Instance.status == PENDING, Instance.desired_time <= now)
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
        if row is None or row.status != PENDING or row.desired_time > now:
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
    with transaction(factory) as session:
        for row in session.scalars(query):
            row.owner = None
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
            elif row.attempts == 0 and row.trigger_time > now:
                row.status = PENDING
            elif row.desired_time > now:
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


def pending_triggers(
    factory: sessionmaker[Session], keys: Collection[str] | None = None
) -> dict[str, datetime]:
    """Every pending instance's key and trigger (aware UTC); with ``keys``, those among them."""
    if keys is None:
        query = select(Instance.key, Instance.trigger_time).where(Instance.status == PENDING)
        with factory() as session:
            return {key: trigger for key, trigger in session.execute(query)}
    # Looked up by key alone, the status read along: a planner without statistics (SQLite)
    # would rather scan every pending row through the status index for each page of keys.
    query = select(Instance.key, Instance.trigger_time, Instance.status)
    wanted = sorted(keys)
    found: dict[str, datetime] = {}
    with factory() as session:
        for start in range(0, len(wanted), PAGE):
            rows = session.execute(query.where(Instance.key.in_(wanted[start : start + PAGE])))
            found.update((key, trigger) for key, trigger, status in rows if status == PENDING)
    return found


def pending_trigger_pages(
    factory: sessionmaker[Session], size: int = PAGE
) -> Iterator[dict[str, datetime]]:
    """``pending_triggers`` a page at a time, in key order (a full job sync in little memory).
    Pages walk the key index over every instance and keep the pending ones (see above)."""
    after = ""
    while True:
        query = (
            select(Instance.key, Instance.trigger_time, Instance.status)
            .where(Instance.key > after)
            .order_by(Instance.key)
            .limit(size)
        )
        with factory() as session:
            rows = list(session.execute(query))
        if not rows:
            return
        page = {key: trigger for key, trigger, status in rows if status == PENDING}
        if page:
            yield page
        after = rows[-1][0]


def pending_mark(factory: sessionmaker[Session]) -> tuple[int, datetime | None]:
    """How many instances are pending and the latest change among them: cheap (the status
    index), for noticing a change made elsewhere (another daemon put a booking back, or a
    ``retry`` ran on another host)."""
    with factory() as session:
        count, latest = session.execute(
            select(func.count(), func.max(Instance.updated_at)).where(Instance.status == PENDING)
        ).one()
    return int(count or 0), latest


def pending_clubs(
    factory: sessionmaker[Session], keys: Collection[str] | None = None
) -> dict[str, str]:
    """The club of every pending instance that names one (the others book with the template or
    section 6's request); with ``keys``, of those among them (looked up by key, as above)."""
    if keys is None:
        query = select(Instance.key, Instance.club).where(
            Instance.status == PENDING, Instance.club.is_not(None)
        )
        with factory() as session:
            return {key: club for key, club in session.execute(query) if club is not None}
    by_key = select(Instance.key, Instance.club, Instance.status)
    wanted = sorted(keys)
    found: dict[str, str] = {}
    with factory() as session:
        for start in range(0, len(wanted), PAGE):
            rows = session.execute(by_key.where(Instance.key.in_(wanted[start : start + PAGE])))
            found.update(
                (key, club) for key, club, status in rows if status == PENDING and club is not None
            )
    return found


def overdue(factory: sessionmaker[Session], before: datetime, *, limit: int = 20) -> list[str]:
    """Keys of the pending instances whose trigger is earlier than ``before``, soonest first (at
    most ``limit``). With the scheduler working, each has its job running or about to run."""
    query = (
        select(Instance.key)
        .where(Instance.status == PENDING, Instance.trigger_time < before)
        .order_by(Instance.trigger_time, Instance.key)
        .limit(limit)
    )
    # Asked every second: on the session's connection, without the ORM's work (a quarter of it).
    with factory() as session:
        return list(session.connection().execute(query).scalars())


def next_trigger(factory: sessionmaker[Session]) -> datetime | None:
    """The earliest trigger of a pending instance (None when none is pending)."""
    query = select(func.min(Instance.trigger_time)).where(Instance.status == PENDING)
    with factory() as session:
        found: datetime | None = session.connection().execute(query).scalar()
    return found


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
    wanted = sorted(set(keys))
    with factory() as session:
        for start in range(0, len(wanted), PAGE):
            query = select(Instance).where(
                Instance.key.in_(wanted[start : start + PAGE]),
                Instance.status == PENDING,
                Instance.trigger_time <= now,
            )
            for row in session.scalars(query):
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


def claim(
    factory: sessionmaker[Session], key: str, now: datetime, *, owner: str | None = None
) -> bool:
    """pending -> booking by the daemon ``owner``, committed before any request leaves. One
    conditional update sets both, so two claimants can never both send, and a claim always
    names its owner (whose live claims no other daemon takes over): True for the one that got
    it."""
    with transaction(factory) as session:
        claimed = session.execute(
            update(Instance)
            .where(Instance.key == key, Instance.status == PENDING)
            .values(status=BOOKING, owner=owner, updated_at=now)
        ).rowcount
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


def release(factory: sessionmaker[Session], key: str, *, sent: bool = False) -> None:
    """booking -> pending: a shutdown before the trigger or between retries, or a daemon that
    is no longer the active one. ``sent``: a request may have reached the club, so the active
    daemon's retry is marked ``interrupted`` (its 409 may be our own)."""
    values: dict[str, Any] = {"status": PENDING, "owner": None}
    if sent:
        values["interrupted"] = True
    with transaction(factory) as session:
        session.execute(
            update(Instance).where(Instance.key == key, Instance.status == BOOKING).values(**values)
        )


def club_took(
    factory: sessionmaker[Session],
    key: str,
    *,
    booking_ref: str | None,
    court: str | None,
    attempts: int,
    first_sent_at: datetime | None,
) -> None:
    """The club took the booking and finishing steps are still to run (CONTRACT section 12):
    from now on the instance is never booked again, whatever happens to those steps. The
    requests answered so far and when the first left are written too, so that an outcome
    written after a crash in those steps says when the booking request went."""
    with transaction(factory) as session:
        session.execute(
            update(Instance)
            .where(Instance.key == key)
            .values(club_took=True, booking_ref=booking_ref, booked_court=court, attempts=attempts)
        )
        session.execute(
            update(Instance)
            .where(Instance.key == key, Instance.first_sent_at.is_(None))
            .values(first_sent_at=first_sent_at)
        )


def _took(row: Instance) -> str:
    """What the club took, for a reason: ``court 3, ref BK-1``."""
    court = row.booked_court if row.booked_court is not None else "any"
    return f"court {court}" + (f", ref {row.booking_ref}" if row.booking_ref else "")


def record_attempt(
    factory: sessionmaker[Session], key: str, attempts: int, first_sent_at: datetime | None = None
) -> None:
    """The number of requests answered (or lost) so far, before a wait between retries, and
    when the first of them left (kept if one is already recorded)."""
    with transaction(factory) as session:
        session.execute(update(Instance).where(Instance.key == key).values(attempts=attempts))
        if first_sent_at is not None:
            session.execute(
                update(Instance)
                .where(Instance.key == key, Instance.first_sent_at.is_(None))
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
) -> Outcome:
    """booking -> booked or failed, with the reason a person reads; returns the outcome to
    report. ``first_sent_at``: when the first request left (an earlier one recorded stays);
    ``retry_helps`` False when a ``retry`` would meet the same answer (every court taken)."""
    with transaction(factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None
        if attempts is not None:
            row.attempts = attempts
        if row.first_sent_at is None:
            row.first_sent_at = first_sent_at
        row.status = status
        row.last_error = reason
        row.booking_ref = booking_ref
        if status == BOOKED or row.club_took:
            row.booked_court = court
        row.finished_at = now
        row.interrupted = False
        row.owner = None
        return outcome_of(row, retry_helps=retry_helps)


def timing_of(row: Instance) -> str | None:
    """When the instance's first request left, for a person (None while nothing is final)."""
    return _timing(row.status, row.trigger_time, row.first_sent_at, row.late_cause)


def _timing(
    status: str, trigger: datetime, first_sent: datetime | None, cause: str | None
) -> str | None:
    if first_sent is not None:
        timing = utils.send_timing(trigger, first_sent, LATE_CAUSES.get(cause or ""))
        # On time is no comfort when it did not book (the club down, the court taken): say so
        # in the same breath, so that the line does not read as a success.
        return f"{timing}, but not booked: see the reason" if status == FAILED else timing
    if status == EXPIRED:
        return "not sent: courtbot was not running at the trigger"
    if status == FAILED:
        return "no booking request was sent"
    return None


def outcome_of(row: Instance, *, retry_helps: bool = True) -> Outcome:
    """The report of an instance's final status, for notify."""
    zone = utils.get_zone(row.timezone)
    court = row.booked_court if row.status == BOOKED else row.court_id
    return Outcome(
        status=row.status,
        key=row.key,
        schedule_id=row.schedule_id,
        court=court,
        desired_start=row.desired_time.astimezone(zone),
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
    """The next ``limit`` bookings ahead of ``now`` (pending, under way or booked), soonest
    start first, as ``status_rows`` gives them."""
    if factory is None:
        return []
    with factory() as session:
        query = _reader_query(session).where(
            Instance.desired_time > now, Instance.status.in_([PENDING, BOOKING, BOOKED])
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
        "rehearsal": _optional(row, "rehearsal"),
    }


def _utc_us(moment: datetime | None) -> str | None:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (None stays None): a send time, to the microsecond."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _timing_text(row: Instance) -> str | None:
    """``timing_of`` for a row read by ``status``; None on a database too old to know."""
    if row.status not in FINAL or "first_sent_at" in inspect(row).unloaded:
        return None
    return _timing(row.status, row.trigger_time, row.first_sent_at, _optional(row, "late_cause"))


# --------------------------------------------------------------------------- rehearsals


def rehearsal_candidates(
    factory: sessionmaker[Session], now: datetime, until: datetime
) -> list[Instance]:
    """The pending instances whose trigger is after ``now`` and no later than ``until``, soonest
    first (detached: read, never written through)."""
    with factory() as session:
        query = (
            select(Instance)
            .where(
                Instance.status == PENDING,
                Instance.trigger_time > now,
                Instance.trigger_time <= until,
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
