"""instances.py: reconciliation (CONTRACT section 5) and every status transition (section 7),
against a real database: each test runs on SQLite and on PostgreSQL (but those that read an older
release's SQLite file).

Loading is a diff, not a rebuild: the tests look at row ids, keys, triggers and ``updated_at`` to
tell "left alone" from "rewritten with the same values".
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet, MultiFernet
from sqlalchemy import Engine, func, select
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session, sessionmaker

import instances
import models
import utils
from config_loader import Config, Settings, read_config
from conftest import NOW, previous_release_database, write_json
from instances import Changes, expire_missed, pending_triggers, reconcile, recover_in_flight
from models import BOOKED, BOOKING, CANCELLED, EXPIRED, FAILED, PENDING, Instance, Token

TOKENS = {"default": "tok-default-secret", "alice": "tok-alice-secret"}
WED = {
    "id": "wed-evening",
    "type": "recurring",
    "rrule": "FREQ=WEEKLY;BYDAY=WE",
    "desired_time": "2026-12-02 17:00",
    "timezone": "Europe/London",
    "court_id": "3",
}
MATCH = {
    "id": "match",
    "type": "one-off",
    "desired_time": "2026-12-10 18:00",
    "timezone": "Europe/London",
    "court_id": 5,
    "token": "alice",
}
MATCH_KEY = "match@2026-12-10T18:00:00Z"
FIRST_WED = "wed-evening@2026-12-02T17:00:00Z"
COLUMNS = [c.key for c in Instance.__table__.columns]

pytestmark = pytest.mark.both_databases


def write(data_dir: Path, entries: Any, tokens: Any = TOKENS) -> None:
    write_json(data_dir / "schedules.json", entries)
    if tokens is not None:
        write_json(data_dir / "tokens.json", tokens)


def load(
    factory: sessionmaker[Session],
    settings: Settings,
    fernet: MultiFernet,
    now: datetime = NOW,
) -> Config:
    with factory() as session:
        known = set(session.scalars(select(Token.id)))
    return read_config(settings, fernet, now, known_tokens=known)


def rows(factory: sessionmaker[Session], schedule_id: str | None = None) -> dict[str, Instance]:
    with factory() as session:
        query = select(Instance).order_by(Instance.desired_time)
        if schedule_id is not None:
            query = query.where(Instance.schedule_id == schedule_id)
        return {row.key: row for row in session.scalars(query)}


def snapshot(factory: sessionmaker[Session], schedule_id: str | None = None) -> dict[str, tuple]:
    """Every column of every row, ``updated_at`` included: equal means untouched."""
    return {
        key: tuple(getattr(row, c) for c in COLUMNS)
        for key, row in rows(factory, schedule_id).items()
    }


def statuses(factory: sessionmaker[Session], schedule_id: str) -> dict[str, str]:
    return {key: row.status for key, row in rows(factory, schedule_id).items()}


def update(factory: sessionmaker[Session], key: str, **values: Any) -> None:
    with models.transaction(factory) as session:
        row = session.scalars(select(Instance).where(Instance.key == key)).one()
        for name, value in values.items():
            setattr(row, name, value)


def add_row(factory: sessionmaker[Session], key: str, desired: datetime, status: str) -> None:
    with models.transaction(factory) as session:
        session.add(
            Instance(
                key=key,
                schedule_id=key.split("@", maxsplit=1)[0],
                type="one-off",
                desired_time=desired,
                trigger_time=desired - timedelta(hours=168),
                timezone="UTC",
                status=status,
            )
        )


def tokens_table(factory: sessionmaker[Session]) -> dict[str, Token]:
    with factory() as session:
        return {t.id: t for t in session.scalars(select(Token))}


class Reload:
    """A load as the daemon's: ``entries`` (if given) written, then reconciled at ``now``."""

    def __init__(
        self,
        data_dir: Path,
        settings: Settings,
        fernet: MultiFernet,
        factory: sessionmaker[Session],
    ) -> None:
        self.data_dir, self.settings, self.fernet, self.factory = (
            data_dir,
            settings,
            fernet,
            factory,
        )

    def write(self, entries: Any, tokens: Any = TOKENS) -> None:
        """schedules.json (and tokens.json unless ``tokens`` is None), not loaded yet."""
        write(self.data_dir, entries, tokens)

    def read(self, entries: Any = None, tokens: Any = TOKENS, now: datetime = NOW) -> Config:
        """The files (``entries`` written first if given) read as a load reads them, not applied."""
        if entries is not None:
            self.write(entries, tokens)
        return load(self.factory, self.settings, self.fernet, now)

    def __call__(self, entries: Any = None, now: datetime = NOW, tokens: Any = TOKENS) -> Changes:
        return reconcile(self.factory, self.read(entries, tokens, now), now=now)


@pytest.fixture
def reload(
    data_dir: Path, settings: Settings, fernet: MultiFernet, factory: sessionmaker[Session]
) -> Reload:
    return Reload(data_dir, settings, fernet, factory)


@pytest.fixture
def loaded(reload: Reload, factory: sessionmaker[Session]) -> dict[str, tuple]:
    """WED and MATCH loaded at NOW; returns the snapshot."""
    assert reload([WED, MATCH]).added == 53
    return snapshot(factory)


# --------------------------------------------------------------------------- new entries


def test_new_entries_become_pending_each_with_its_own_trigger(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    changes = reload([WED, MATCH])

    assert (changes.added, changes.updated, changes.cancelled, changes.revived) == (53, 0, 0, 0)
    assert sorted(changes.entries_changed) == ["match", "wed-evening"]
    found = rows(factory)
    assert len(found) == 53
    assert all(row.status == PENDING and row.attempts == 0 for row in found.values())
    match = found[MATCH_KEY]
    assert (match.schedule_id, match.type, match.timezone) == ("match", "one-off", "Europe/London")
    assert (match.court_id, json.loads(match.courts), match.token_name) == ("5", ["5"], "alice")
    assert match.duration_minutes == 60 and match.rrule is None
    assert match.trigger_time == match.desired_time - timedelta(hours=168)

    weds = rows(factory, "wed-evening")
    assert len(weds) == 52
    assert next(iter(weds)) == FIRST_WED
    # 17:00 London is 17:00Z in winter and 16:00Z in summer: the wall clock is kept.
    assert "wed-evening@2027-06-02T16:00:00Z" in weds
    triggers = [row.trigger_time for row in weds.values()]
    assert len(set(triggers)) == 52
    for row in weds.values():
        assert row.trigger_time == row.desired_time - timedelta(hours=168)
        assert row.rrule is not None and "RRULE:FREQ=WEEKLY;BYDAY=WE" in row.rrule
    assert pending_triggers(factory) == {k: r.trigger_time for k, r in found.items()}


def test_one_off_in_the_past_gets_no_instance(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    config = reload.read([MATCH | {"desired_time": "2026-11-01 10:00"}])
    assert config.errors == [] and len(config.warnings) == 1
    assert reconcile(factory, config, now=NOW).empty
    assert rows(factory) == {}


def test_reload_with_the_same_config_changes_nothing(
    reload: Reload, factory: sessionmaker[Session], loaded: dict[str, tuple]
) -> None:
    triggers = pending_triggers(factory)
    changes = reload()
    assert changes.empty and changes.entries_changed == []
    assert snapshot(factory) == loaded
    assert pending_triggers(factory) == triggers
    # An hour later nothing churns either: no instance has passed.
    assert reload(now=NOW + timedelta(hours=1)).empty
    assert snapshot(factory) == loaded


def test_changes_name_the_instances_touched_and_no_other(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    # Only these instances' jobs get a look after a load (daemon.Loads.sync with keys).
    assert reload().keys == set()

    assert reload([WED, MATCH | {"court_id": 6}]).keys == {MATCH_KEY}

    cancelled = reload([WED | {"enabled": False}, MATCH | {"court_id": 6}])
    assert cancelled.keys == set(statuses(factory, "wed-evening"))
    assert len(cancelled.keys) == cancelled.cancelled == 52

    moved = reload([MATCH | {"court_id": 6, "desired_time": "2026-12-10 19:00"}])
    assert moved.keys == {MATCH_KEY, "match@2026-12-10T19:00:00Z"}


def test_reconcile_works_a_few_entries_at_a_time_with_the_same_result(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One entry per pass: the removed entry and the edited one are reconciled in different
    # passes of one transaction, each pass's rows let go before the next.
    monkeypatch.setattr(instances, "ENTRIES_PER_PASS", 1)
    other = WED | {"id": "thu", "rrule": "FREQ=WEEKLY;BYDAY=TH"}
    reload.write([other, MATCH | {"court_id": 6}])

    changes = reload()

    assert (changes.added, changes.updated, changes.cancelled) == (52, 1, 52)
    assert set(statuses(factory, "wed-evening").values()) == {CANCELLED}
    assert set(statuses(factory, "thu").values()) == {PENDING}
    assert rows(factory, "match")[MATCH_KEY].court_id == "6"


def test_pending_triggers_by_the_horizon_or_for_some_keys(
    factory: sessionmaker[Session], loaded: dict[str, tuple]
) -> None:
    every = pending_triggers(factory)
    assert len(every) == 53
    cut = sorted(every.values())[10]

    within = pending_triggers(factory, until=cut)

    assert within == {key: due for key, due in every.items() if due <= cut}
    assert len(within) == 11
    some = pending_triggers(factory, [MATCH_KEY, FIRST_WED, "gone@2026-12-01T00:00:00Z"])
    assert some == {MATCH_KEY: every[MATCH_KEY], FIRST_WED: every[FIRST_WED]}
    early = min(every[MATCH_KEY], every[FIRST_WED])
    assert pending_triggers(factory, [MATCH_KEY, FIRST_WED], until=early) == {
        key: due for key, due in some.items() if due == early
    }


# --------------------------------------------------------------------------- removed, back


def test_removed_entry_cancels_pending_and_keeps_history(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    keys = list(rows(factory, "wed-evening"))
    update(factory, keys[0], status=BOOKED, booking_ref="R-1", booked_court="3")
    update(factory, keys[1], status=FAILED, last_error="court taken")
    update(factory, keys[2], status=BOOKING, attempts=1)  # a request under way
    before = snapshot(factory)

    changes = reload([MATCH])

    assert (changes.cancelled, changes.added, changes.updated) == (49, 0, 0)
    after = rows(factory, "wed-evening")
    assert len(after) == 52  # history stays: nothing is deleted
    for key in keys[:3]:
        assert snapshot(factory, "wed-evening")[key] == before[key]
    for key in keys[3:]:
        assert after[key].status == CANCELLED
        assert after[key].last_error == "entry removed from schedules.json"
        assert after[key].trigger_time == before[key][COLUMNS.index("trigger_time")]
    assert snapshot(factory, "match") == {MATCH_KEY: before[MATCH_KEY]}
    assert set(pending_triggers(factory)) == {MATCH_KEY}


def test_entry_back_revives_its_cancelled_instances_still_ahead(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    ids = {key: row.id for key, row in rows(factory).items()}
    reload([MATCH])

    later = NOW + timedelta(days=10)  # two Wednesdays (Dec 2 at 17:00 is the first) have passed
    changes = reload([WED, MATCH], later)

    weds = rows(factory, "wed-evening")
    passed = [k for k, r in weds.items() if r.desired_time <= later]
    assert passed == [FIRST_WED]
    assert weds[FIRST_WED].status == CANCELLED  # not revived: its start has passed
    revived = [k for k in weds if k not in passed and k in ids]
    assert changes.revived == len(revived) == 51
    for key in revived:
        row = weds[key]
        assert row.status == PENDING and row.last_error is None and row.attempts == 0
        assert row.id == ids[key]
    # The 52 future instances are there again: one new at the far end.
    assert changes.added == 1
    assert sum(1 for r in weds.values() if r.status == PENDING and r.desired_time > later) == 52


def test_disabled_entry_cancels_pending_and_enabling_revives(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    first = next(iter(rows(factory, "wed-evening")))
    update(factory, first, status=BOOKED, booking_ref="R-1")

    changes = reload([WED | {"enabled": False}, MATCH])
    assert (changes.cancelled, changes.added, changes.updated) == (51, 0, 0)
    weds = rows(factory, "wed-evening")
    assert weds[first].status == BOOKED
    others = [r for k, r in weds.items() if k != first]
    assert all(r.status == CANCELLED for r in others)
    assert {r.last_error for r in others} == {"entry disabled in schedules.json"}
    # Reloading the disabled entry changes nothing more.
    assert reload().empty

    changes = reload([WED, MATCH])
    assert (changes.revived, changes.added, changes.cancelled) == (51, 0, 0)
    assert snapshot(factory, "match") == {MATCH_KEY: loaded[MATCH_KEY]}
    assert all(r.status == PENDING for k, r in rows(factory, "wed-evening").items() if k != first)


def test_disabled_new_entry_adds_nothing(reload: Reload, factory: sessionmaker[Session]) -> None:
    assert reload([WED | {"enabled": False}]).empty
    assert rows(factory) == {}


# --------------------------------------------------------------------------- changed entries


def test_court_token_and_duration_edits_update_pending_rows_in_place(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    before = rows(factory)
    edited = WED | {"court_id": ["7", 8], "token": "alice", "duration_minutes": 90}
    changes = reload([edited, MATCH | {"court_id": None}])

    assert (changes.updated, changes.added, changes.cancelled, changes.revived) == (53, 0, 0, 0)
    after = rows(factory)
    assert list(after) == list(before)  # same keys
    for key, row in after.items():
        assert row.id == before[key].id
        assert row.trigger_time == before[key].trigger_time
        assert row.desired_time == before[key].desired_time
        assert row.status == PENDING
    for row in rows(factory, "wed-evening").values():
        assert (row.court_id, json.loads(row.courts)) == ("7, 8", ["7", "8"])
        assert (row.token_name, row.duration_minutes) == ("alice", 90)
    match = after[MATCH_KEY]
    assert (match.court_id, json.loads(match.courts)) == (None, [None])
    assert reload().empty


def test_zone_change_that_keeps_the_instants_updates_the_rows(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    # Lisbon keeps London's offsets all year: same instants, same keys, but the rows must not
    # go on claiming London (status and notifications show the row's zone).
    before = rows(factory, "wed-evening")
    changes = reload([WED | {"timezone": "Europe/Lisbon"}, MATCH])
    assert (changes.updated, changes.added, changes.cancelled) == (52, 0, 0)
    after = rows(factory, "wed-evening")
    assert list(after) == list(before)
    assert {row.timezone for row in after.values()} == {"Europe/Lisbon"}
    assert all(after[k].id == before[k].id for k in before)


def test_type_change_that_keeps_the_instant_updates_the_row(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    # The one-off becomes weekly from the same start: its instance is kept, as a recurring one.
    weekly = MATCH | {"type": "recurring", "rrule": "FREQ=WEEKLY"}
    changes = reload([WED, weekly])
    assert (changes.updated, changes.added, changes.cancelled) == (1, 51, 0)
    row = rows(factory, "match")[MATCH_KEY]
    assert row.id == loaded[MATCH_KEY][COLUMNS.index("id")]
    assert (row.type, row.status) == ("recurring", PENDING)
    assert row.rrule is not None and "FREQ=WEEKLY" in row.rrule


def test_rule_change_cancels_vanished_adds_new_and_keeps_the_rest(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    before = rows(factory, "wed-evening")
    changes = reload([WED | {"rrule": "FREQ=WEEKLY;BYDAY=WE,FR"}, MATCH])

    # The next 52 are now 26 Wednesdays and 26 Fridays.
    assert (changes.added, changes.cancelled, changes.revived) == (26, 26, 0)
    after = rows(factory, "wed-evening")
    kept = [k for k, r in after.items() if k in before and r.status == PENDING]
    cancelled = [k for k, r in after.items() if r.status == CANCELLED]
    new = [k for k in after if k not in before]
    assert kept == list(before)[:26]
    assert cancelled == list(before)[26:]
    assert len(new) == 26
    london = utils.get_zone("Europe/London")
    assert all(after[k].desired_time.astimezone(london).weekday() == 4 for k in new)
    for key in kept:
        assert after[key].id == before[key].id
        assert after[key].trigger_time == before[key].trigger_time
        assert "BYDAY=WE,FR" in (after[key].rrule or "")
    for key in cancelled:
        assert after[key].last_error == "no longer produced by the entry's rule or time"
    assert snapshot(factory, "match") == {MATCH_KEY: loaded[MATCH_KEY]}


def test_one_off_moved_cancels_the_old_instance_and_adds_the_new(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    changes = reload([WED, MATCH | {"desired_time": "2026-12-11 18:00"}])
    assert (changes.added, changes.cancelled) == (1, 1)
    assert statuses(factory, "match") == {
        MATCH_KEY: CANCELLED,
        "match@2026-12-11T18:00:00Z": PENDING,
    }


def test_booked_instance_is_never_changed(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    update(factory, MATCH_KEY, status=BOOKED, booking_ref="R-9", booked_court="5", attempts=1)
    update(factory, FIRST_WED, status=BOOKED, booking_ref="R-1", booked_court="3", attempts=1)
    booked = {k: v for k, v in snapshot(factory).items() if k in (MATCH_KEY, FIRST_WED)}

    edits = [
        # another court, token, duration
        [WED | {"court_id": "9", "token": "alice"}, MATCH | {"court_id": 1, "duration_minutes": 3}],
        # the booked instances no longer produced at all
        [WED | {"rrule": "FREQ=WEEKLY;BYDAY=TH"}, MATCH | {"desired_time": "2026-12-12 10:00"}],
        # disabled
        [WED | {"enabled": False}, MATCH | {"enabled": False}],
        # removed
        [],
        # back as it was
        [WED, MATCH],
    ]  # fmt: skip
    for entries in edits:
        reload(entries)
        now = snapshot(factory)
        assert {k: now[k] for k in booked} == booked, entries


def test_failed_and_expired_instances_are_left_alone(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    update(factory, MATCH_KEY, status=FAILED, last_error="token rejected (401)")
    update(factory, FIRST_WED, status=EXPIRED, last_error="missed")
    kept = {k: v for k, v in snapshot(factory).items() if k in (MATCH_KEY, FIRST_WED)}
    reload([WED | {"court_id": "9"}, MATCH | {"court_id": "1"}])
    now = snapshot(factory)
    assert {k: now[k] for k in kept} == kept


# --------------------------------------------------------------------------- clubs and windows


def club(data_dir: Path, name: str, value: dict[str, Any]) -> None:
    (data_dir / "clubs").mkdir(exist_ok=True)
    write_json(data_dir / "clubs" / f"{name}.json", value)


def test_the_club_is_stored_on_each_instance_and_follows_edits(
    data_dir: Path,
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    assert {row.club for row in rows(factory).values()} == {None}
    club(data_dir, "padel", {"url": "https://padel.example/book"})
    changes = reload([WED | {"club": "padel"}, MATCH])
    assert (changes.updated, changes.added, changes.cancelled) == (52, 0, 0)
    assert {row.club for row in rows(factory, "wed-evening").values()} == {"padel"}
    assert rows(factory)[MATCH_KEY].club is None
    assert reload().empty


def test_a_new_club_window_moves_pending_triggers_and_keeps_keys(
    data_dir: Path,
    reload: Reload,
    factory: sessionmaker[Session],
) -> None:
    club(data_dir, "padel", {"url": "https://padel.example/book"})
    reload([WED | {"club": "padel"}, MATCH | {"club": "padel"}])
    before = rows(factory)
    assert before[FIRST_WED].trigger_time == before[FIRST_WED].desired_time - timedelta(hours=168)
    update(factory, MATCH_KEY, status=BOOKED)

    club(data_dir, "padel", {"url": "https://padel.example/book", "window": "6d@08:00"})
    changes = reload()

    after = rows(factory)
    assert list(after) == list(before)  # same keys, same rows
    assert all(after[k].id == before[k].id for k in before)
    assert changes.updated == 52 and changes.added == changes.cancelled == 0
    # Wed 2026-12-02 17:00 GMT: six days before at 08:00 is Thu 2026-11-26 08:00 GMT.
    assert after[FIRST_WED].trigger_time == datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
    for row in rows(factory, "wed-evening").values():
        local = row.trigger_time.astimezone(ZoneInfo("Europe/London"))
        assert local.strftime("%H:%M %a") == "08:00 Thu"
    assert after[MATCH_KEY].trigger_time == before[MATCH_KEY].trigger_time  # booked: untouched

    # The entry's own window wins over the club's.
    reload([WED | {"club": "padel", "window": "7d"}, MATCH | {"club": "padel"}])
    first = rows(factory)[FIRST_WED]
    assert first.trigger_time == datetime(2026, 11, 25, 17, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- bad input


def test_rejected_entry_keeps_its_instances_exactly(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    # The invalid entry also asks for a court change: none of it applies.
    config = reload.read(
        [WED | {"court_id": "9", "duration_minutes": 0}, MATCH | {"court_id": "2"}]
    )
    assert config.errors == [
        "schedules.json entry 'wed-evening' (#1): duration_minutes: 0 is not a positive whole "
        "number of minutes"
    ]
    changes = reconcile(factory, config, now=NOW)
    assert (changes.updated, changes.cancelled, changes.added) == (1, 0, 0)
    assert snapshot(factory, "wed-evening") == {
        k: v for k, v in loaded.items() if k.startswith("wed-evening@")
    }
    assert rows(factory, "match")[MATCH_KEY].court_id == "2"  # the valid entry still loads


def test_rejected_entry_without_id_keeps_its_instances(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    no_id = {k: v for k, v in MATCH.items() if k != "id"}
    reload([no_id])
    before = snapshot(factory)
    assert len(before) == 1 and next(iter(before)).startswith("auto-")
    # A bad court does not change what the derived id is made of: the entry is still told.
    config = reload.read([no_id | {"court_id": []}])
    assert config.errors == [
        "schedules.json entry #1: court_id: an empty list; give one or more courts, or null for "
        "any court"
    ]
    assert reconcile(factory, config, now=NOW).empty
    assert snapshot(factory) == before


@pytest.mark.parametrize(
    "unknown",
    [
        "wed-evening",
        WED | {"id": "wed evening"},
        {"type": "recurrent", "rrule": "FREQ=WEEKLY;BYDAY=WE", "desired_time": "2026-12-02 17:00"},
        {"type": "one-off", "desired_time": "2026-12-32 17:00"},
        {"type": "recurring", "rrule": "FREQ=WEEKY", "desired_time": "2026-12-02 17:00"},
        {"type": "one-off", "desired_time": "2026-12-02 17:00", "timezone": "Europe/Lundon"},
    ],
    ids=[
        "not-object",
        "bad-id",
        "no-id-bad-type",
        "no-id-bad-time",
        "no-id-bad-rule",
        "no-id-zone",
    ],
)
def test_entry_whose_id_cannot_be_told_puts_off_all_removals(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
    unknown: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # wed-evening is gone from the file, but the rejected entry may be it (edited): keep it.
    config = reload.read([MATCH, unknown])
    assert len(config.errors) == 1 and config.errors[0].startswith("schedules.json entry #2: ")
    assert config.schedules.unknown_rejects == 1
    changes = reconcile(factory, config, now=NOW)
    assert changes.empty
    assert snapshot(factory) == loaded
    assert "their pending instances are kept until it is fixed" in caplog.text


def test_whole_file_error_changes_nothing(
    data_dir: Path,
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    for text in ['[{"id": "wed-evening",', "{}", "null", ""]:
        (data_dir / "schedules.json").write_text(text)
        config = reload.read()
        assert config.schedules.file_error is not None
        assert reconcile(factory, config, now=NOW).empty
        assert snapshot(factory) == loaded
    # The same for tokens.json: its table keeps the last good tokens.
    reload.write([WED, MATCH], tokens=None)
    tokens_before = {t.id: (t.encrypted_token, t.error) for t in tokens_table(factory).values()}
    (data_dir / "tokens.json").write_text('{"default": ')
    config = reload.read()
    assert config.tokens.file_error is not None and config.schedules.errors == []
    assert reconcile(factory, config, now=NOW).empty
    assert snapshot(factory) == loaded
    now = {t.id: (t.encrypted_token, t.error) for t in tokens_table(factory).values()}
    assert now == tokens_before


def test_missing_schedules_file_means_no_schedules(
    data_dir: Path,
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    # A missing file means no schedules (CONTRACT 3): pending instances are cancelled, booked
    # ones stay.
    update(factory, MATCH_KEY, status=BOOKED, booking_ref="R-1")
    (data_dir / "schedules.json").unlink()
    config = reload.read()
    assert config.schedules.missing and config.errors == []
    changes = reconcile(factory, config, now=NOW)
    assert changes.cancelled == 52
    assert rows(factory)[MATCH_KEY].status == BOOKED


# --------------------------------------------------------------------------- top-up


def test_recurring_top_up_keeps_52_future_instances(
    reload: Reload,
    factory: sessionmaker[Session],
) -> None:
    config = reload.read([WED, MATCH])
    reconcile(factory, config, now=NOW)
    ids = {key: row.id for key, row in rows(factory).items()}

    later = NOW + timedelta(weeks=4)  # Dec 2, 9, 16 have passed
    future = [r for r in rows(factory, "wed-evening").values() if r.desired_time > later]
    assert len(future) == 49

    changes = reconcile(factory, config, now=later, only=["wed-evening"])

    assert (changes.added, changes.cancelled, changes.updated) == (3, 0, 0)
    weds = rows(factory, "wed-evening")
    future = [r for r in weds.values() if r.desired_time > later]
    assert len(future) == 52 and all(r.status == PENDING for r in future)
    assert all(weds[k].id == i for k, i in ids.items() if k in weds)
    # The passed ones are left for expire_missed / the booking that happened.
    assert len(weds) == 55
    # Again at the same time: nothing to do.
    again = reconcile(factory, config, now=later, only=["wed-evening"])
    assert again.empty


def test_top_up_touches_only_the_named_entries(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    config = reload.read([WED, MATCH | {"court_id": "1"}], tokens={"default": "t"})
    reconcile(factory, config, now=NOW, only=["wed-evening"])
    assert snapshot(factory) == loaded
    assert set(tokens_table(factory)) == {"default", "alice"}  # tokens left alone too


# --------------------------------------------------------------------------- tokens table


def _database_bytes(data_dir: Path, engine: Engine) -> bytes:
    """What the database holds: SQLite's files as they are, or PostgreSQL's rows as text."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            found = conn.execute(
                sql_text("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM tokens) t")
            ).scalar()
        return str(found or "").encode()
    return b"".join(p.read_bytes() for p in data_dir.glob("db.sqlite*") if p.is_file())


def test_tokens_are_stored_encrypted_only(
    data_dir: Path,
    fernet: MultiFernet,
    reload: Reload,
    factory: sessionmaker[Session],
    engine: Engine,
) -> None:
    reload([WED, MATCH])
    table = tokens_table(factory)
    assert set(table) == {"default", "alice"}
    for name, plaintext in TOKENS.items():
        row = table[name]
        assert row.error is None and row.encrypted_token is not None
        assert plaintext not in row.encrypted_token
        assert fernet.decrypt(row.encrypted_token.encode()).decode() == plaintext
    engine.dispose()  # checkpoint nothing away: look at the files as they are
    data = _database_bytes(data_dir, engine)
    assert b"gAAAAA" in data
    for plaintext in TOKENS.values():
        assert plaintext.encode() not in data


def test_token_removed_from_tokens_json_is_deleted(
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    reload([WED], tokens={"default": "tok-default-secret"})
    assert set(tokens_table(factory)) == {"default"}


def test_bad_token_gets_its_error_set(
    fernet: MultiFernet,
    reload: Reload,
    factory: sessionmaker[Session],
    loaded: dict[str, tuple],
) -> None:
    foreign = Fernet(Fernet.generate_key()).encrypt(b"tok-x").decode()
    config = reload.read([WED, MATCH], tokens={"default": "tok-default-secret", "alice": foreign})
    assert config.errors == [
        "tokens.json token 'alice': the value is encrypted but no key in FERNET_KEY decrypts it "
        "(was it encrypted with another key?); re-encrypt it with `python main.py encrypt-token` "
        "or put the plaintext token in the file"
    ]
    # Its schedules stay valid (they fail at booking with that reason); the rest goes on.
    assert [e.id for e in config.schedules.entries] == ["wed-evening", "match"]
    assert reconcile(factory, config, now=NOW).empty
    table = tokens_table(factory)
    assert table["alice"].error == config.errors[0]
    assert table["default"].error is None
    assert snapshot(factory) == loaded

    # Fixed: the error goes.
    reload([WED, MATCH], tokens={"default": "t1", "alice": fernet.encrypt(b"t2").decode()})
    assert tokens_table(factory)["alice"].error is None
    assert fernet.decrypt(tokens_table(factory)["alice"].encrypted_token.encode()) == b"t2"


def test_new_token_that_is_not_a_string_is_stored_with_its_error(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([MATCH], tokens={"default": "t", "alice": 42})
    row = tokens_table(factory)["alice"]
    assert row.encrypted_token is None and row.error
    assert "42" not in row.error


def test_object_tokens_are_stored_field_by_field_encrypted_only(
    data_dir: Path,
    fernet: MultiFernet,
    reload: Reload,
    factory: sessionmaker[Session],
    engine: Any,
) -> None:
    secrets = {"email": "me@padel.example", "password": "pw-object-secret"}
    reload([MATCH], tokens={"default": "t", "alice": secrets})
    row = tokens_table(factory)["alice"]
    assert (row.kind, row.error) == (models.KIND_OBJECT, None)
    stored = json.loads(row.encrypted_token)
    assert sorted(stored) == ["email", "password"]
    assert {k: fernet.decrypt(v.encode()).decode() for k, v in stored.items()} == secrets
    assert tokens_table(factory)["default"].kind == models.KIND_STRING
    assert instances.token_secrets(row, fernet, name="alice") == (secrets, None)
    engine.dispose()
    data = _database_bytes(data_dir, engine)
    for plaintext in secrets.values():
        assert plaintext.encode() not in data

    # Back to a string token: the row follows.
    reload([MATCH], tokens={"default": "t", "alice": "tok-again"})
    row = tokens_table(factory)["alice"]
    assert row.kind == models.KIND_STRING
    assert instances.token_secrets(row, fernet, name="alice") == ({"token": "tok-again"}, None)


def test_token_secrets_say_what_is_wrong(fernet: MultiFernet) -> None:
    other = MultiFernet([Fernet(Fernet.generate_key())])
    undecryptable = (
        "token 'alice' in the database does not decrypt with FERNET_KEY (was the key changed?): "
        "put the token in tokens.json again and reload"
    )
    string = Token(id="alice", encrypted_token=fernet.encrypt(b"tok").decode(), kind="string")
    assert instances.token_secrets(string, fernet, name="alice") == ({"token": "tok"}, None)
    assert instances.token_secrets(string, other, name="alice") == ({}, undecryptable)
    fields = json.dumps({"email": fernet.encrypt(b"me").decode(), "pw": "not-fernet"})
    broken = Token(id="alice", encrypted_token=fields, kind="object")
    assert instances.token_secrets(broken, fernet, name="alice") == ({}, undecryptable)
    not_json = Token(id="alice", encrypted_token="{nope", kind="object")
    assert instances.token_secrets(not_json, fernet, name="alice") == ({}, undecryptable)
    assert instances.token_secrets(None, fernet, name="alice") == (
        {},
        "token 'alice' is not in tokens.json: add it there and reload",
    )
    failing = Token(id="alice", encrypted_token=None, error="tokens.json token 'alice': bad")
    assert instances.token_secrets(failing, fernet, name="alice") == (
        {},
        "tokens.json token 'alice': bad",
    )


# --------------------------------------------------------------------------- start-up (7)


def test_expire_missed(factory: sessionmaker[Session]) -> None:
    add_row(factory, "gone@1", NOW - timedelta(hours=1), PENDING)
    add_row(factory, "just@1", NOW, PENDING)
    add_row(factory, "ahead@1", NOW + timedelta(minutes=1), PENDING)
    for status in (BOOKED, FAILED, CANCELLED, BOOKING, EXPIRED):
        add_row(factory, f"{status}@1", NOW - timedelta(days=1), status)
    before = snapshot(factory)

    expired = expire_missed(factory, NOW)

    assert sorted(r.key for r in expired) == ["gone@1", "just@1"]
    after = rows(factory)
    for key in ("gone@1", "just@1"):
        row = after[key]
        trigger = utils.format_utc(row.trigger_time)
        assert row.status == EXPIRED and row.finished_at == NOW
        assert row.last_error == (
            f"courtbot was not running when the booking window opened ({trigger}) and the "
            "start has passed"
        )
    now = snapshot(factory)
    assert {k: v for k, v in now.items() if k not in ("gone@1", "just@1")} == {
        k: v for k, v in before.items() if k not in ("gone@1", "just@1")
    }
    assert expire_missed(factory, NOW) == []


def test_recover_in_flight(factory: sessionmaker[Session]) -> None:
    add_row(factory, "ahead@1", NOW + timedelta(hours=2), BOOKING)
    add_row(factory, "passed@1", NOW - timedelta(minutes=5), BOOKING)
    add_row(factory, "other@1", NOW + timedelta(hours=2), PENDING)
    add_row(factory, "done@1", NOW - timedelta(hours=2), BOOKED)
    # Claimed ahead of its trigger (in an hour), nothing sent yet.
    add_row(factory, "claimed@1", NOW + timedelta(hours=169), BOOKING)
    # Past its trigger with no answer counted: a request may have left.
    add_row(factory, "unanswered@1", NOW + timedelta(hours=3), BOOKING)
    update(factory, "ahead@1", attempts=1)
    before = snapshot(factory)

    retry, failed = recover_in_flight(factory, NOW)

    assert sorted(retry) == ["ahead@1", "unanswered@1"]
    assert [r.key for r in failed] == ["passed@1"]
    after = rows(factory)
    ahead = after["ahead@1"]
    assert ahead.status == PENDING
    assert ahead.last_error == (
        "interrupted while booking (courtbot stopped); retried with the same Idempotency-Key"
    )
    assert ahead.key == "ahead@1"  # the Idempotency-Key is the key: unchanged
    passed = after["passed@1"]
    assert passed.status == FAILED and passed.finished_at == NOW
    assert passed.last_error == (
        "courtbot stopped while this booking was being sent and the start has passed: its "
        "outcome is unknown, check with the club"
    )
    claimed = after["claimed@1"]
    assert (claimed.status, claimed.last_error) == (PENDING, None)
    assert after["unanswered@1"].last_error == ahead.last_error
    now = snapshot(factory)
    for key in ("other@1", "done@1"):
        assert now[key] == before[key]
    assert recover_in_flight(factory, NOW) == ([], [])


def test_recover_in_flight_counts_a_send_by_the_clubs_clock_as_maybe_sent(
    factory: sessionmaker[Session],
) -> None:
    """A club whose clock runs 3 s ahead: its booking left 3 s (less the uncertainty) before our
    trigger. A crash in between is no "nothing sent yet": retried with the same key and marked
    interrupted (its 409 may be our own), never put back as if untouched."""
    trigger_in = timedelta(seconds=2)
    add_row(factory, "early@1", NOW + timedelta(hours=168) + trigger_in, BOOKING)
    update(factory, "early@1", clock_offset_ms=3000.0, clock_uncertainty_ms=5.0)
    add_row(factory, "ours@1", NOW + timedelta(hours=168) + trigger_in, BOOKING)

    retried, failed = recover_in_flight(factory, NOW)

    assert (retried, failed) == (["early@1"], [])
    after = rows(factory)
    assert (after["early@1"].status, after["early@1"].interrupted) == (PENDING, True)
    assert (after["ours@1"].status, after["ours@1"].interrupted) == (PENDING, False)


def test_recover_in_flight_marks_the_retried_booking_interrupted(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "ahead@1", NOW + timedelta(hours=2), BOOKING)
    add_row(factory, "passed@1", NOW - timedelta(minutes=5), BOOKING)
    add_row(factory, "claimed@1", NOW + timedelta(hours=169), BOOKING)
    update(factory, "ahead@1", attempts=1)
    update(factory, "passed@1", interrupted=True)  # retried at an earlier start, then a crash

    recover_in_flight(factory, NOW)

    after = rows(factory)
    assert {key: row.interrupted for key, row in after.items()} == {
        "ahead@1": True,  # a request may have reached the club
        "passed@1": False,  # final: failed, its outcome unknown
        "claimed@1": False,  # nothing was sent
    }


# --------------------------------------------------------------------------- a booking (7)


def test_claim_is_conditional_and_release_puts_it_back(factory: sessionmaker[Session]) -> None:
    add_row(factory, "a@1", NOW + timedelta(hours=1), PENDING)

    assert instances.claim(factory, "a@1", NOW) is True
    assert instances.claim(factory, "a@1", NOW) is False  # a second claimant never sends
    assert statuses(factory, "a") == {"a@1": BOOKING}
    instances.release(factory, "a@1")
    assert statuses(factory, "a") == {"a@1": PENDING}
    instances.release(factory, "a@1")  # only a booking goes back
    assert statuses(factory, "a") == {"a@1": PENDING}


def test_a_claim_names_its_owner_until_the_booking_ends(factory: sessionmaker[Session]) -> None:
    for key in ("a@1", "b@1", "c@1"):
        add_row(factory, key, NOW + timedelta(hours=1), PENDING)

    assert instances.claim(factory, "a@1", NOW, owner="d1") is True
    assert instances.claim(factory, "a@1", NOW, owner="d2") is False  # never taken over
    assert instances.claim(factory, "b@1", NOW, owner="d2") is True
    assert instances.claim(factory, "c@1", NOW, owner="d1") is True
    assert instances.booking_owners(factory) == {"d1", "d2"}
    owners = {key: row.owner for key, row in rows(factory).items()}
    assert owners == {"a@1": "d1", "b@1": "d2", "c@1": "d1"}

    instances.release(factory, "a@1")
    instances.release(factory, "b@1", sent=True)
    instances.finish(factory, "c@1", BOOKED, None, now=NOW, booking_ref="r", court="3")

    after = rows(factory)
    assert {k: (r.status, r.owner, r.interrupted) for k, r in after.items()} == {
        "a@1": (PENDING, None, False),  # nothing had left
        "b@1": (PENDING, None, True),  # a request may have reached the club: its 409 may be ours
        "c@1": (BOOKED, None, False),
    }
    assert instances.booking_owners(factory) == set()


def test_recover_in_flight_leaves_the_claims_of_live_daemons(
    factory: sessionmaker[Session],
) -> None:
    for key in ("live@1", "dead@1", "nobody@1", "mine@1", "busy@1"):
        add_row(factory, key, NOW + timedelta(hours=2), PENDING)
    instances.claim(factory, "live@1", NOW, owner="live")
    instances.claim(factory, "dead@1", NOW, owner="dead")
    instances.claim(factory, "nobody@1", NOW)  # a claim from before owners (NULL)
    instances.claim(factory, "mine@1", NOW, owner="me")
    instances.claim(factory, "busy@1", NOW, owner="me")
    for key in ("live@1", "dead@1", "nobody@1", "mine@1", "busy@1"):
        update(factory, key, attempts=1)
    assert instances.booking_owners(factory) == {"live", "dead", None, "me"}

    retried, failed = recover_in_flight(factory, NOW, live_owners=frozenset({"live", "me"}))

    assert (sorted(retried), failed) == (["dead@1", "nobody@1"], [])
    assert statuses(factory, "live") == {"live@1": BOOKING}
    assert rows(factory)["dead@1"].owner is None
    # A daemon puts back its own claims whose booking is no longer under way, and only those.
    retried, _ = recover_in_flight(factory, NOW, owner="me", keep=frozenset({"busy@1"}))
    assert retried == ["mine@1"]
    assert {k: r.status for k, r in rows(factory).items() if r.status == BOOKING} == {
        "live@1": BOOKING,
        "busy@1": BOOKING,
    }


def test_the_pending_mark_moves_when_a_booking_comes_back_or_a_retry_runs(
    factory: sessionmaker[Session],
) -> None:
    assert instances.pending_mark(factory) == (0, None)
    add_row(factory, "a@1", NOW + timedelta(days=9), PENDING)
    add_row(factory, "b@1", NOW + timedelta(days=9), FAILED)
    first = instances.pending_mark(factory)
    assert first[0] == 1
    assert instances.pending_mark(factory) == first  # nothing changed: the same mark

    instances.claim(factory, "a@1", NOW, owner="other")
    claimed = instances.pending_mark(factory)
    instances.release(factory, "a@1", sent=True)  # another daemon handed it back
    released = instances.pending_mark(factory)
    instances.retry(factory, "b", NOW)
    retried = instances.pending_mark(factory)

    assert [claimed[0], released[0], retried[0]] == [0, 1, 2]
    assert len({first, claimed, released, retried}) == 4


def test_expire_if_passed_uses_the_one_wording_of_expire_missed(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "late@1", NOW - timedelta(minutes=1), PENDING)
    add_row(factory, "ahead@1", NOW + timedelta(minutes=1), PENDING)
    add_row(factory, "other@1", NOW - timedelta(minutes=1), PENDING)

    row, missed = instances.expire_if_passed(factory, "late@1", NOW)
    (at_start,) = expire_missed(factory, NOW)

    assert row is not None and missed is not None
    assert (row.status, missed.status, missed.key) == (EXPIRED, EXPIRED, "late@1")
    assert at_start.key == "other@1"
    assert missed.reason == (
        "courtbot was not running when the booking window opened "
        f"({utils.format_utc(row.trigger_time)}) and the start has passed"
    )
    assert at_start.last_error == (
        "courtbot was not running when the booking window opened "
        f"({utils.format_utc(at_start.trigger_time)}) and the start has passed"
    )
    assert instances.expire_if_passed(factory, "ahead@1", NOW)[1] is None
    assert instances.expire_if_passed(factory, "late@1", NOW)[1] is None  # already expired
    assert instances.expire_if_passed(factory, "gone@1", NOW) == (None, None)


def test_retry_leaves_the_daemon_a_wakeup_per_key_in_the_same_transaction(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "a@1", NOW + timedelta(days=3), FAILED)
    add_row(factory, "a@2", NOW + timedelta(days=4), FAILED)
    add_row(factory, "b@1", NOW + timedelta(days=3), FAILED)
    assert instances.wakeups(factory) == []

    assert instances.retry(factory, "a", NOW) == ["a@1", "a@2"]
    assert instances.retry(factory, "b@1", NOW) == ["b@1"]

    found = instances.wakeups(factory)
    assert [key for _, key in found] == ["a@1", "a@2", "b@1"]
    instances.clear_wakeups(factory, found[1][0])
    assert instances.wakeups(factory) == found[2:]
    assert instances.retry(factory, "a", NOW) == []
    assert instances.wakeups(factory) == found[2:]


def test_finish_and_retry_clear_interrupted(factory: sessionmaker[Session]) -> None:
    add_row(factory, "a@1", NOW + timedelta(hours=1), BOOKING)
    add_row(factory, "b@1", NOW + timedelta(hours=1), BOOKING)
    update(factory, "a@1", interrupted=True)
    update(factory, "b@1", interrupted=True)

    outcome = instances.finish(factory, "a@1", BOOKED, None, now=NOW, booking_ref="r", court="3")
    instances.finish(factory, "b@1", FAILED, "court 3: taken", now=NOW, attempts=2)

    assert (outcome.status, outcome.court, outcome.booking_ref) == (BOOKED, "3", "r")
    after = rows(factory)
    assert (after["a@1"].interrupted, after["a@1"].booked_court) == (False, "3")
    assert (after["b@1"].status, after["b@1"].attempts) == (FAILED, 2)
    assert after["b@1"].interrupted is False
    update(factory, "b@1", interrupted=True)
    assert instances.retry(factory, "b", NOW) == ["b@1"]
    b = rows(factory)["b@1"]
    assert (b.status, b.attempts, b.last_error, b.interrupted) == (PENDING, 0, None, False)


def test_overdue_lists_pending_instances_triggered_before_the_moment_soonest_first(
    factory: sessionmaker[Session],
) -> None:
    week = timedelta(hours=168)
    add_row(factory, "late@2", NOW + week - timedelta(seconds=5), PENDING)
    add_row(factory, "later@1", NOW + week + timedelta(seconds=5), PENDING)
    add_row(factory, "late@1", NOW + week - timedelta(seconds=30), PENDING)
    add_row(factory, "going@1", NOW + week - timedelta(seconds=40), BOOKING)
    add_row(factory, "done@1", NOW + week - timedelta(seconds=50), BOOKED)

    assert instances.overdue(factory, NOW) == ["late@1", "late@2"]
    assert instances.overdue(factory, NOW, limit=1) == ["late@1"]
    assert instances.overdue(factory, NOW - timedelta(minutes=1)) == []


# --------------------------------------------------------------------------- an older database


def columns(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [name for _, name, *_ in conn.execute("PRAGMA table_info(schedules)")]


def test_a_token_row_of_the_previous_release_reads_as_a_string_token(
    tmp_path: Path, fernet: MultiFernet
) -> None:
    url = previous_release_database(tmp_path / "db.sqlite")
    with contextlib.closing(sqlite3.connect(tmp_path / "db.sqlite")) as conn, conn:
        conn.execute(
            "INSERT INTO tokens VALUES ('default', ?, NULL, '2029-01-01 00:00:00.000000')",
            (fernet.encrypt(b"tok-old-release").decode(),),
        )
    engine = models.make_engine(url)
    try:
        with models.session_factory(engine)() as session:
            row = session.get(Token, "default")
        assert row is not None and row.kind == models.KIND_STRING
        assert instances.token_secrets(row, fernet, name="default") == (
            {"token": "tok-old-release"},
            None,
        )
    finally:
        engine.dispose()


def test_status_reads_a_database_of_the_previous_release_without_changing_it(
    tmp_path: Path,
) -> None:
    url = previous_release_database(tmp_path / "db.sqlite")
    reader = models.make_engine(url, create=False)
    try:
        (shown,) = instances.status_rows(models.session_factory(reader))
    finally:
        reader.dispose()
    assert (shown["key"], shown["status"], shown["attempts"]) == (
        "old@2030-01-01T10:00:00Z",
        FAILED,
        3,
    )
    # What that release did not record reads as unknown, not as "nothing was sent".
    assert (shown["first_sent_at"], shown["sent"]) == (None, None)
    assert shown["finished_at"] == "2029-12-25T10:00:01Z"
    assert not {"interrupted", "club"} & set(columns(tmp_path / "db.sqlite"))


def test_a_database_of_the_previous_release_gets_the_new_column_at_start(
    tmp_path: Path,
) -> None:
    url = previous_release_database(tmp_path / "db.sqlite")

    engine = models.make_engine(url)  # as the daemon opens it at start

    try:
        assert columns(tmp_path / "db.sqlite")[-22:] == [
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
            # CONTRACT section 13
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
        ]
        factory = models.session_factory(engine)
        (row,) = rows(factory).values()
        assert (row.key, row.status, row.interrupted) == ("old@2030-01-01T10:00:00Z", FAILED, False)
        assert row.club is None
        assert row.club_took is False
        assert (row.fallback_step, row.watch_tries, row.cancelled_booking) == (0, 0, False)
        assert (row.booked_time, row.fallbacks, row.watch_until) == (None, None, None)
        assert row.last_error == "court 3: taken (HTTP 409)"
        assert models.add_missing_columns(engine) == []  # once only
        assert instances.retry(factory, "old", NOW) == ["old@2030-01-01T10:00:00Z"]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- lateness (8)

TRIGGER_OF_AHEAD = NOW + timedelta(hours=2) - timedelta(hours=168)


def test_instances_loaded_with_their_window_open_note_why_they_will_be_late(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    soon = {"id": "soon", "type": "one-off", "desired_time": "2026-11-25 18:00"}
    reload([WED, soon])
    found = rows(factory)
    assert found["soon@2026-11-25T18:00:00Z"].late_cause == instances.LATE_LOADED
    assert found[FIRST_WED].late_cause is None  # its trigger, 2026-11-25 17:00, is ahead


def test_at_start_passed_triggers_are_noted_as_missed_while_down(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "missed@1", NOW + timedelta(hours=2), PENDING)
    add_row(factory, "ahead@1", NOW + timedelta(hours=200), PENDING)
    add_row(factory, "retried@1", NOW + timedelta(hours=3), PENDING)
    add_row(factory, "done@1", NOW + timedelta(hours=4), BOOKED)
    update(factory, "retried@1", late_cause=instances.LATE_RETRY)

    assert instances.note_late_triggers(factory, NOW) == 1

    causes = {key: row.late_cause for key, row in rows(factory).items()}
    assert causes == {
        "missed@1": instances.LATE_DOWN,
        "ahead@1": None,
        "retried@1": instances.LATE_RETRY,
        "done@1": None,
    }


def test_an_interrupted_booking_notes_why_it_is_sent_again_late(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "ahead@1", NOW + timedelta(hours=2), BOOKING)
    update(factory, "ahead@1", attempts=1)
    recover_in_flight(factory, NOW)
    assert rows(factory)["ahead@1"].late_cause == instances.LATE_INTERRUPTED


def test_finish_records_the_first_send_and_reports_its_timing(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "a@1", NOW + timedelta(hours=2), BOOKING)
    add_row(factory, "b@1", NOW + timedelta(hours=2), BOOKING)
    sent = TRIGGER_OF_AHEAD + timedelta(microseconds=812)

    instances.record_attempt(factory, "b@1", 1, sent)
    instances.record_attempt(factory, "b@1", 2, sent + timedelta(seconds=1))  # the first stays
    booked = instances.finish(
        factory, "a@1", BOOKED, None, now=NOW, booking_ref="r", first_sent_at=sent
    )
    update(factory, "b@1", late_cause=instances.LATE_DOWN)
    failed = instances.finish(
        factory, "b@1", FAILED, "taken", now=NOW, first_sent_at=sent + timedelta(seconds=9)
    )

    assert booked.timing == "sent 0.8 ms after the window opened"
    assert rows(factory)["a@1"].first_sent_at == sent
    # b's first request left at ``sent``, on time, whatever its cause column says.
    assert failed.timing == "sent 0.8 ms after the window opened, but not booked: see the reason"
    assert rows(factory)["b@1"].first_sent_at == sent


def test_the_timing_says_which_clock_the_booking_was_sent_by(
    factory: sessionmaker[Session],
) -> None:
    for key in ("ahead@1", "behind@1", "failed@1"):
        add_row(factory, key, NOW + timedelta(hours=2), BOOKING)
    # The club runs 412 ms ahead: its window opened at our trigger - 412 ms; the request left
    # 406 ms before our trigger, 6 ms after the club's opening.
    instances.record_clock(factory, "ahead@1", offset_ms=412.0, uncertainty_ms=6.0)
    ahead = instances.finish(
        factory,
        "ahead@1",
        BOOKED,
        None,
        now=NOW,
        first_sent_at=TRIGGER_OF_AHEAD - timedelta(milliseconds=406),
    )
    assert (
        ahead.timing == "sent 6.0 ms after the window opened by the club's clock (+412 ms ± 6 ms)"
    )
    instances.record_clock(factory, "behind@1", offset_ms=-450.0, uncertainty_ms=0.4)
    behind = instances.finish(
        factory,
        "behind@1",
        BOOKED,
        None,
        now=NOW,
        first_sent_at=TRIGGER_OF_AHEAD + timedelta(milliseconds=451),
    )
    assert (
        behind.timing == "sent 1.0 ms after the window opened by the club's clock (-450 ms ± 1 ms)"
    )
    instances.record_clock(factory, "failed@1", error="the club's answer has no Date header")
    failed = instances.finish(
        factory, "failed@1", BOOKED, None, now=NOW, first_sent_at=TRIGGER_OF_AHEAD
    )
    assert failed.timing == (
        "sent 0.0 ms after the window opened by our clock (the club's clock could not be measured)"
    )
    shown = {row["key"]: row["sent"] for row in instances.status_rows(factory)}
    assert shown["ahead@1"] == ahead.timing


def test_a_late_first_request_says_how_late_and_why(factory: sessionmaker[Session]) -> None:
    for key, cause in (("a@1", instances.LATE_DOWN), ("b@1", None), ("c@1", "loaded")):
        add_row(factory, key, NOW + timedelta(hours=2), BOOKING)
        update(factory, key, late_cause=cause)
    late = TRIGGER_OF_AHEAD + timedelta(seconds=10.9)
    days = TRIGGER_OF_AHEAD + timedelta(days=3, hours=1)

    a = instances.finish(factory, "a@1", BOOKED, None, now=NOW, first_sent_at=late)
    b = instances.finish(factory, "b@1", BOOKED, None, now=NOW, first_sent_at=late)
    c = instances.finish(factory, "c@1", BOOKED, None, now=NOW, first_sent_at=days)

    assert a.timing == "sent 10.9 s late: courtbot was not running at the trigger"
    assert b.timing == (
        "sent 10.9 s late: courtbot's trigger fired late (a busy machine or a clock jump)"
    )
    assert c.timing == ("sent 3 d 1 h late: the window was already open when the entry was loaded")


def test_outcomes_without_a_request_say_so(factory: sessionmaker[Session]) -> None:
    add_row(factory, "token@1", NOW + timedelta(hours=2), BOOKING)
    add_row(factory, "down@1", NOW - timedelta(hours=2), PENDING)
    failed = instances.finish(
        factory, "token@1", FAILED, "token 'x' is not in tokens.json", now=NOW
    )
    (expired,) = expire_missed(factory, NOW)
    assert failed.timing == "no booking request was sent"
    assert instances.outcome_of(expired).timing == (
        "not sent: courtbot was not running at the trigger"
    )
    assert failed.retry_helps is True
    add_row(factory, "taken@1", NOW + timedelta(hours=2), BOOKING)
    taken = instances.finish(factory, "taken@1", FAILED, "taken", now=NOW, retry_helps=False)
    assert taken is not None and taken.retry_helps is False
    # A second outcome for a booking already settled is not written, nor reported again: an
    # error after the booking was made once rewrote it `failed`, and a retry booked it twice.
    assert instances.finish(factory, "taken@1", BOOKED, None, now=NOW, booking_ref="X") is None
    assert rows(factory)["taken@1"].status == FAILED


def test_retry_clears_the_first_send_and_notes_a_window_already_open(
    factory: sessionmaker[Session],
) -> None:
    add_row(factory, "open@1", NOW + timedelta(hours=2), FAILED)
    add_row(factory, "ahead@1", NOW + timedelta(hours=200), FAILED)
    for key in ("open@1", "ahead@1"):
        update(factory, key, first_sent_at=NOW - timedelta(days=1), late_cause=instances.LATE_DOWN)

    assert sorted(
        instances.retry(factory, "open@1", NOW) + instances.retry(factory, "ahead", NOW)
    ) == [
        "ahead@1",
        "open@1",
    ]

    after = rows(factory)
    assert (after["open@1"].first_sent_at, after["open@1"].late_cause) == (
        None,
        instances.LATE_RETRY,
    )
    assert (after["ahead@1"].first_sent_at, after["ahead@1"].late_cause) == (None, None)


def test_a_pending_instance_on_a_date_added_to_skip_is_cancelled(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([WED])
    changes = reload([WED | {"skip": ["2026-12-09"]}])

    assert (changes.added, changes.cancelled) == (1, 1)  # the rule keeps its 52 ahead
    skipped = rows(factory)["wed-evening@2026-12-09T17:00:00Z"]
    assert (skipped.status, skipped.last_error) == (
        CANCELLED,
        "its date is in the entry's skip list",
    )
    assert reload([WED]).revived == 1
    english = {k: v for k, v in WED.items() if k != "desired_time"}
    english["rrule"] = "every Wednesday at 17:00 except 2026-12-16"
    reload([english])
    assert rows(factory)["wed-evening@2026-12-16T17:00:00Z"].last_error == (
        "its date is excluded by the entry's rule (except, EXDATE)"
    )


# --------------------------------------------------------------------------- status queries


def test_status_rows_filter_by_schedule_status_and_limit(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([WED, MATCH])
    update(factory, FIRST_WED, status=BOOKED, finished_at=NOW)

    everything = instances.status_rows(factory)
    assert len(everything) == 53
    assert [r["key"] for r in instances.status_rows(factory, schedule="match")] == [MATCH_KEY]
    booked = instances.status_rows(factory, statuses=[BOOKED])
    assert [r["key"] for r in booked] == [FIRST_WED]
    first_three = instances.status_rows(factory, schedule="wed-evening", limit=3)
    assert [r["key"] for r in first_three] == [
        r["key"] for r in everything if r["schedule"] == "wed-evening"
    ][:3]
    assert instances.status_rows(factory, schedule="nope") == []


def test_upcoming_and_recent_outcomes(factory: sessionmaker[Session]) -> None:
    add_row(factory, "booked@1", NOW + timedelta(days=2), BOOKED)
    add_row(factory, "pending@1", NOW + timedelta(days=1), PENDING)
    add_row(factory, "later@1", NOW + timedelta(days=9), PENDING)
    add_row(factory, "cancelled@1", NOW + timedelta(days=1), CANCELLED)
    add_row(factory, "failed@1", NOW - timedelta(days=1), FAILED)
    add_row(factory, "old@1", NOW - timedelta(days=20), BOOKED)
    add_row(factory, "expired@1", NOW - timedelta(hours=1), EXPIRED)
    update(factory, "booked@1", finished_at=NOW - timedelta(days=5))
    update(factory, "failed@1", finished_at=NOW - timedelta(days=8))
    update(factory, "old@1", finished_at=NOW - timedelta(days=27))
    update(factory, "expired@1", finished_at=NOW - timedelta(hours=1))

    ahead = instances.upcoming(factory, NOW, limit=2)
    assert [r["key"] for r in ahead] == ["pending@1", "booked@1"]
    assert [r["key"] for r in instances.upcoming(factory, NOW, schedule="later")] == ["later@1"]
    recent = instances.recent_outcomes(factory, NOW - timedelta(days=7))
    assert [r["key"] for r in recent] == ["expired@1", "booked@1"]
    assert recent[0]["sent"] == "not sent: courtbot was not running at the trigger"
    assert instances.recent_outcomes(factory, NOW - timedelta(days=7), schedule="booked") == [
        recent[1]
    ]


def test_an_outcome_is_located_at_its_club(factory: sessionmaker[Session]) -> None:
    add_row(factory, "a@1", NOW + timedelta(hours=2), BOOKING)
    add_row(factory, "b@1", NOW + timedelta(hours=2), BOOKING)
    update(factory, "a@1", club="riverside")
    assert instances.finish(factory, "a@1", BOOKED, None, now=NOW).location == "riverside"
    assert instances.finish(factory, "b@1", BOOKED, None, now=NOW).location is None


# --------------------------------------------------------------------------- section 13

WISHES = MATCH | {"fallback_times": ["19:00", "16:30"], "watch": "2h", "players": ["ana", "Ben"]}
T0 = datetime(2026, 12, 3, 18, 0, tzinfo=UTC)  # MATCH's trigger: 168 h before 18:00 GMT


def _claim(factory: sessionmaker[Session], key: str = MATCH_KEY, now: datetime = T0) -> None:
    assert instances.claim(factory, key, now)


def _claimed(reload: Reload, factory: sessionmaker[Session], *entries: Any) -> None:
    """``entries`` (WISHES alone by default) loaded, and the match claimed at T0."""
    reload(list(entries or [WISHES]))
    _claim(factory)


def test_an_instance_copies_its_fallback_times_players_and_watch_end(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([WISHES])
    row = rows(factory)[MATCH_KEY]
    assert json.loads(row.fallbacks or "") == [
        ["18:00", "2026-12-10T18:00:00Z", "2026-12-03T18:00:00Z"],
        ["19:00", "2026-12-10T19:00:00Z", "2026-12-03T19:00:00Z"],
        ["16:30", "2026-12-10T16:30:00Z", "2026-12-03T16:30:00Z"],
    ]
    assert json.loads(row.players or "") == ["ana", "Ben"]
    assert row.watch_until == datetime(2026, 12, 10, 16, 0, tzinfo=UTC)
    attempt = instances.attempt_of(row)
    assert (attempt.time, attempt.start, attempt.fallback, attempt.players) == (
        "18:00",
        datetime(2026, 12, 10, 18, 0, tzinfo=UTC),
        False,
        ("ana", "Ben"),
    )
    # Taken out of the entry, they leave its pending instance too.
    assert reload([MATCH]).updated == 1
    row = rows(factory)[MATCH_KEY]
    assert (row.fallbacks, row.players, row.watch_until) == (None, None, None)


def test_fall_back_goes_on_at_each_time_in_order_at_its_own_trigger(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    got = instances.fall_back(factory, MATCH_KEY, tried="18:00: taken", now=T0)
    nineteen = datetime(2026, 12, 10, 19, 0, tzinfo=UTC)
    assert got == ("19:00", nineteen, datetime(2026, 12, 3, 19, 0, tzinfo=UTC))
    row = rows(factory)[MATCH_KEY]
    assert (row.status, row.fallback_step, row.slot_time, row.tried) == (
        PENDING,
        1,
        nineteen,
        "18:00: taken",
    )
    assert row.trigger_time == datetime(2026, 12, 3, 19, 0, tzinfo=UTC)
    assert row.late_cause is None  # its trigger is ahead
    assert instances.attempt_of(row).time == "19:00" and instances.attempt_of(row).fallback
    # A reload keeps it at the fallback's trigger, with its key.
    assert reload(now=T0).empty
    assert pending_triggers(factory) == {MATCH_KEY: datetime(2026, 12, 3, 19, 0, tzinfo=UTC)}
    # 16:30's trigger has passed when 19:00 is taken: at once, noted as late.
    later = datetime(2026, 12, 3, 19, 0, tzinfo=UTC)
    _claim(factory, now=later)
    got = instances.fall_back(factory, MATCH_KEY, tried="18:00: taken; 19:00: taken", now=later)
    assert got is not None and got[0] == "16:30"
    assert rows(factory)[MATCH_KEY].late_cause == instances.LATE_FALLBACK
    _claim(factory, now=later)
    assert instances.fall_back(factory, MATCH_KEY, tried="all taken", now=later) is None
    row = rows(factory)[MATCH_KEY]
    assert (row.status, row.tried) == (BOOKING, "all taken")  # the caller ends it


def test_a_fallback_time_whose_start_has_passed_is_skipped(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory, WISHES | {"fallback_times": ["16:30", "19:00"]})
    at = datetime(2026, 12, 10, 17, 0, tzinfo=UTC)  # 16:30 has started
    got = instances.fall_back(factory, MATCH_KEY, tried="18:00: taken", now=at)
    assert got is not None and got[0] == "19:00"


def test_a_pending_fallback_is_not_expired_while_its_own_start_is_ahead(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    instances.fall_back(factory, MATCH_KEY, tried="18:00: taken", now=T0)
    between = datetime(2026, 12, 10, 18, 30, tzinfo=UTC)
    assert expire_missed(factory, between) == []
    assert [r.key for r in expire_missed(factory, datetime(2026, 12, 10, 19, 0, tzinfo=UTC))] == [
        MATCH_KEY
    ]


def test_retry_after_a_fallback_starts_again_at_the_desired_time(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    instances.fall_back(factory, MATCH_KEY, tried="18:00: taken", now=T0)
    _claim(factory, now=T0 + timedelta(hours=1))
    instances.finish(factory, MATCH_KEY, FAILED, "blocked", now=T0 + timedelta(hours=1))
    assert instances.retry(factory, MATCH_KEY, T0 + timedelta(hours=2)) == [MATCH_KEY]
    row = rows(factory)[MATCH_KEY]
    assert (row.fallback_step, row.slot_time, row.tried, row.trigger_time) == (0, None, None, T0)


def test_a_watch_tries_again_until_it_ends(reload: Reload, factory: sessionmaker[Session]) -> None:
    _claimed(reload, factory)
    first = T0 + timedelta(minutes=5)
    watched = instances.watch(factory, MATCH_KEY, tried="18:00: taken", next_try=first)
    assert watched is not None and watched.status == models.WATCHING
    (shown,) = instances.status_rows(factory)
    assert (shown["status"], shown["next_try"], shown["watch_until"], shown["watch_tries"]) == (
        "watching",
        "2026-12-03T18:05:00Z",
        "2026-12-10T16:00:00Z",
        0,
    )
    assert shown["last_error"] == "18:00: taken; watching until Thu 2026-12-10 16:00 GMT"
    assert instances.due_watches(factory) == {MATCH_KEY: first}
    # Not before its time (but for the job's little lead); then one claim only.
    assert not instances.claim_watch(factory, MATCH_KEY, first - timedelta(seconds=31))
    assert instances.claim_watch(factory, MATCH_KEY, first)
    assert not instances.claim_watch(factory, MATCH_KEY, first)
    assert instances.status_of(factory, MATCH_KEY) == BOOKING
    assert instances.watch_again(
        factory, MATCH_KEY, next_try=first + timedelta(minutes=5), said="court 5: taken"
    )
    row = rows(factory)[MATCH_KEY]
    assert (row.status, row.watch_tries) == (models.WATCHING, 1)
    assert row.last_error == (
        "18:00: taken; watching until Thu 2026-12-10 16:00 GMT, 1 try so far (last: court 5: taken)"
    )
    assert instances.claim_watch(factory, MATCH_KEY, first + timedelta(minutes=5))
    end = datetime(2026, 12, 10, 16, 0, tzinfo=UTC)
    assert not instances.watch_again(factory, MATCH_KEY, next_try=end, said="court 5: taken")
    outcome = instances.end_watch(factory, MATCH_KEY, end)
    assert outcome.status == FAILED
    assert outcome.reason == (
        "taken; watched until Thu 2026-12-10 16:00 GMT, 2 tries (18:00: taken)"
    )
    assert rows(factory)[MATCH_KEY].next_try_at is None


def test_no_watch_without_the_key_or_past_its_end(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([MATCH])
    _claim(factory)
    assert instances.watch(factory, MATCH_KEY, tried="t", next_try=T0) is None
    reload([WISHES])
    end = datetime(2026, 12, 10, 16, 0, tzinfo=UTC)
    assert instances.watch(factory, MATCH_KEY, tried="t", next_try=end) is None
    assert instances.status_of(factory, MATCH_KEY) == BOOKING


@pytest.mark.parametrize("how", ["disabled", "removed"])
def test_disabling_or_removing_the_entry_ends_its_watch(
    how: str,
    reload: Reload,
    factory: sessionmaker[Session],
) -> None:
    _claimed(reload, factory, WISHES, WED)
    instances.watch(factory, MATCH_KEY, tried="18:00: taken", next_try=T0 + timedelta(minutes=5))
    # A reload with the entry as it was leaves the watch alone.
    assert reload(now=T0).cancelled == 0
    assert instances.status_of(factory, MATCH_KEY) == models.WATCHING
    changes = reload([WISHES | {"enabled": False}, WED] if how == "disabled" else [WED], T0)
    assert changes.cancelled == 1 and MATCH_KEY in changes.keys
    row = rows(factory)[MATCH_KEY]
    assert (row.status, row.next_try_at) == (CANCELLED, None)
    assert row.last_error is not None and row.last_error.startswith("watch ended: entry ")


def test_a_crash_during_a_watch_try_goes_back_to_watching(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    instances.watch(factory, MATCH_KEY, tried="18:00: taken", next_try=T0 + timedelta(minutes=5))
    assert instances.claim_watch(factory, MATCH_KEY, T0 + timedelta(minutes=5))
    instances.record_attempt(factory, MATCH_KEY, 2)
    retried, failed = recover_in_flight(factory, T0 + timedelta(minutes=6))
    assert (retried, failed) == ([], [])
    assert instances.status_of(factory, MATCH_KEY) == models.WATCHING


def test_a_cancelled_booking_is_not_booked_again_by_a_reload(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    reload([WED])
    _claim(factory, FIRST_WED)
    assert instances.cancel_problem(factory, FIRST_WED) == (
        f"{FIRST_WED} is booking, not booked: only a booked instance can be cancelled"
    )
    instances.finish(factory, FIRST_WED, BOOKED, None, now=NOW, court="3", booked_time="17:00")
    assert instances.cancel_problem(factory, FIRST_WED) == (
        f"{FIRST_WED} is booked without a booking reference (the club's answer gave none): "
        "cancel it with the club"
    )
    update(factory, FIRST_WED, booking_ref="BK-1")
    assert instances.cancel_problem(factory, FIRST_WED) is None
    assert instances.cancel_problem(factory, "nope@x") == (
        "no instance 'nope@x' (see `status` for the keys)"
    )
    (shown,) = [r for r in instances.status_rows(factory) if r["key"] == FIRST_WED]
    assert shown["booked_time"] == "17:00"
    row = instances.cancelled_at_club(factory, FIRST_WED, NOW)
    assert (row.status, row.last_error) == (
        CANCELLED,
        "cancelled at the club with `cancel` (was court 3, ref BK-1)",
    )
    # The entry is still there: a reload revives cancelled instances, but not this one.
    changes = reload(now=NOW + timedelta(minutes=1))
    assert changes.revived == 0
    assert instances.status_of(factory, FIRST_WED) == CANCELLED
    # Others of the entry cancelled by disabling it come back as before.
    reload([WED | {"enabled": False}], NOW + timedelta(minutes=2))
    assert reload([WED], NOW + timedelta(minutes=3)).revived == 51
    assert instances.status_of(factory, FIRST_WED) == CANCELLED


def test_the_outcome_of_a_fallback_booking_is_at_the_time_booked(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    instances.fall_back(factory, MATCH_KEY, tried="18:00: taken", now=T0)
    _claim(factory, now=T0 + timedelta(hours=1))
    outcome = instances.finish(
        factory, MATCH_KEY, BOOKED, None, now=T0, court="5", booked_time="19:00", from_watch=True
    )
    assert outcome.desired_start == datetime(2026, 12, 10, 19, 0, tzinfo=UTC)
    assert (outcome.first_choice, outcome.from_watch, outcome.key) == ("18:00", True, MATCH_KEY)
    (shown,) = instances.status_rows(factory)
    assert (shown["booked_time"], shown["desired_time"]) == ("19:00", "2026-12-10T18:00:00Z")


def test_a_watching_instance_is_due_at_its_next_try(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory, WISHES, WED)
    next_try = T0 + timedelta(minutes=5)
    instances.watch(factory, MATCH_KEY, tried="18:00: taken", next_try=next_try)
    assert pending_triggers(factory)[MATCH_KEY] == next_try
    assert pending_triggers(factory, [MATCH_KEY, FIRST_WED]) == {
        MATCH_KEY: next_try,
        FIRST_WED: datetime(2026, 11, 25, 17, 0, tzinfo=UTC),
    }
    every = pending_triggers(factory)
    assert every[MATCH_KEY] == next_try and len(every) == 53
    assert MATCH_KEY in pending_triggers(factory, until=next_try)
    assert MATCH_KEY not in pending_triggers(factory, until=next_try - timedelta(seconds=1))
    second_wed = FIRST_WED.replace("12-02", "12-09")  # its trigger: Wed 2 Dec 17:00
    assert instances.overdue(factory, next_try) == [FIRST_WED, second_wed]
    assert instances.overdue(factory, next_try + timedelta(seconds=1)) == [
        FIRST_WED,
        second_wed,
        MATCH_KEY,
    ]
    assert instances.next_trigger(factory) == datetime(2026, 11, 25, 17, 0, tzinfo=UTC)
    update(factory, FIRST_WED, status=CANCELLED)
    assert instances.next_trigger(factory) == min(
        next_try, rows(factory, "wed-evening")[second_wed].trigger_time
    )


def test_disabling_the_entry_during_a_try_of_its_watch_ends_it(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    _claimed(reload, factory)
    first = T0 + timedelta(minutes=5)
    instances.watch(factory, MATCH_KEY, tried="18:00: taken", next_try=first)
    assert instances.claim_watch(factory, MATCH_KEY, first)
    assert reload([WISHES | {"enabled": False}], first).cancelled == 1
    # The try in flight comes back taken: the watch stays ended.
    assert instances.watch_again(
        factory, MATCH_KEY, next_try=first + timedelta(minutes=5), said="taken"
    )
    assert instances.status_of(factory, MATCH_KEY) == CANCELLED
    assert instances.due_watches(factory) == {}


# --------------------------------------------------------------------------- loads (reload, status)


def test_a_load_is_recorded_and_read_back_the_latest_first(factory: sessionmaker[Session]) -> None:
    assert instances.last_load(factory) is None
    first = instances.record_load(
        factory, at=NOW, reason="start", pid=41, summary="2 schedule(s), 0 error(s)", errors=[]
    )
    second = instances.record_load(
        factory,
        at=NOW + timedelta(seconds=5),
        reason="SIGHUP",
        pid=41,
        summary="1 schedule(s), 2 error(s)",
        errors=["schedules.json entry #2: type: missing", "schedules.json entry #3: id: bad"],
        at_once=["a@x (Wed 2026-12-02 17:00 GMT): books at once when loaded"],
    )
    record = instances.last_load(factory)
    assert record is not None and record.id == second > first
    assert (record.reason, record.pid, record.at) == ("SIGHUP", 41, NOW + timedelta(seconds=5))
    assert record.errors[1] == "schedules.json entry #3: id: bad"
    assert record.at_once == ["a@x (Wed 2026-12-02 17:00 GMT): books at once when loaded"]
    # `reload` waits for a load after the one it saw before its signal.
    assert instances.last_load(factory, after=second) is None
    assert instances.last_load(factory, after=first) == record


def test_only_the_latest_loads_are_kept(factory: sessionmaker[Session]) -> None:
    ids = [
        instances.record_load(factory, at=NOW, reason="file change", pid=1, summary="", errors=[])
        for _ in range(models.LOADS_KEPT + 3)
    ]
    with factory() as session:
        kept = sorted(session.scalars(select(models.Load.id)))
    assert kept == ids[-models.LOADS_KEPT :]


def test_what_a_load_books_at_once(factory: sessionmaker[Session]) -> None:
    add_row(factory, "open@1", NOW + timedelta(hours=2), PENDING)  # trigger 166 h ago
    add_row(factory, "ahead@1", NOW + timedelta(days=9), PENDING)  # trigger in 2 days
    add_row(factory, "done@1", NOW + timedelta(hours=3), BOOKED)  # already booked: not again
    lines = instances.at_once(factory, ["open@1", "ahead@1", "done@1", "gone@1"], NOW)
    start = utils.format_local(NOW + timedelta(hours=2), utils.get_zone("UTC"))
    assert lines == [f"open@1 ({start}): books at once when loaded"]


def test_no_load_is_read_from_a_database_of_the_previous_release(tmp_path: Path) -> None:
    url = previous_release_database(tmp_path / "db.sqlite")
    reader = models.make_engine(url, create=False)
    try:
        assert instances.last_load(models.session_factory(reader)) is None
    finally:
        reader.dispose()


def test_the_statuses_of_instances_whose_window_is_open(factory: sessionmaker[Session]) -> None:
    add_row(factory, "open@1", NOW + timedelta(hours=2), PENDING)
    add_row(factory, "done@1", NOW + timedelta(hours=3), BOOKED)
    add_row(factory, "ahead@1", NOW + timedelta(days=9), PENDING)  # window not open yet
    add_row(factory, "past@1", NOW - timedelta(hours=1), BOOKED)  # start passed
    assert instances.open_window_statuses(factory, NOW) == {"open@1": PENDING, "done@1": BOOKED}


# --------------------------------------------------------------------------- soonest first


def test_due_by_adds_only_what_comes_soon_and_the_full_load_finds_it_as_left(
    reload: Reload, factory: sessionmaker[Session]
) -> None:
    def one_off(entry_id: str, trigger_in: timedelta) -> dict[str, str]:
        desired = NOW + timedelta(hours=168) + trigger_in
        return {"id": entry_id, "type": "one-off", "desired_time": desired.isoformat()}

    soon = one_off("soon", timedelta(seconds=30))
    later = one_off("later", timedelta(hours=1))
    off = {**one_off("off", timedelta(seconds=10)), "enabled": False}
    reload.write([WED, soon, later, off])
    add_row(factory, "stored@1", NOW + timedelta(hours=168, seconds=40), PENDING)
    config = reload.read()

    due = instances.due_by(factory, config, now=NOW, until=NOW + timedelta(seconds=60))

    soon_key = utils.instance_key("soon", NOW + timedelta(hours=168, seconds=30))
    assert due == {
        soon_key: NOW + timedelta(seconds=30),
        "stored@1": NOW + timedelta(seconds=40),
    }
    assert set(rows(factory)) == {soon_key, "stored@1"}
    assert db_token_names(factory) == {"default", "alice"}  # the booking finds its token
    changes = reconcile(factory, config, now=NOW)
    assert soon_key not in changes.keys
    assert changes.added == 1 + 52  # later, and the weekly entry's instances
    assert rows(factory)[soon_key].status == PENDING


def db_token_names(factory: sessionmaker[Session]) -> set[str]:
    with factory() as session:
        return set(session.scalars(select(Token.id)))


def test_a_batched_reconcile_commits_as_it_goes_with_the_same_result(
    reload: Reload,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sqlalchemy import event

    entries = [{**WED, "id": f"w{i}"} for i in range(3)] + [MATCH]
    config = reload.read(entries)
    engine = factory.kw["bind"]
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    monkeypatch.setattr(instances, "ENTRIES_PER_COMMIT", 1)

    batched = reconcile(factory, config, now=NOW, batched=True)

    assert len(commits) >= 1 + len(entries)  # the tokens, then one entry at a time
    assert (batched.added, len(batched.keys)) == (3 * 52 + 1, 3 * 52 + 1)
    again = reconcile(factory, config, now=NOW, batched=True)
    assert again.empty
    assert len(rows(factory)) == 3 * 52 + 1


STATUS_TRIGGER = "ix_schedules_status_trigger"


def index_names(session: Session) -> set[str]:
    """The schedules table's indexes as the database has them now (in the session's transaction)."""
    from sqlalchemy import inspect

    return {index["name"] for index in inspect(session.connection()).get_indexes("schedules")}


class IndexSpy:
    """Notes the schedules table's indexes each time a reconcile writes new rows; raises at the
    ``fail_at``-th write (1-based) when given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> None:
        self.seen: list[set[str]] = []
        self.fail_at = fail_at
        self._real = instances.insert_rows
        monkeypatch.setattr(instances, "insert_rows", self)
        monkeypatch.setattr(instances, "ENTRIES_PER_COMMIT", 2)

    def __call__(self, session: Session, rows: list[Any]) -> None:
        if not rows:
            return
        self.seen.append(index_names(session))
        if len(self.seen) == self.fail_at:
            raise RuntimeError("the disk is full")
        self._real(session, rows)


def test_a_start_into_an_empty_sqlite_table_builds_the_trigger_index_after_the_rows(
    reload: Reload,
    factory: sessionmaker[Session],
    database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = reload.read([{**WED, "id": f"w{i}"} for i in range(3)] + [MATCH])
    spy = IndexSpy(monkeypatch)

    assert reconcile(factory, config, now=NOW, batched=True).added == 3 * 52 + 1

    assert len(spy.seen) >= 2  # a write per two entries
    # Inserting the rows into it one by one, in no order of its keys, was a third of the
    # write. PostgreSQL keeps it: its DROP INDEX would lock the table against every reader.
    assert all((STATUS_TRIGGER in seen) == (database == "postgresql") for seen in spy.seen)
    with factory() as session:
        assert STATUS_TRIGGER in index_names(session)
        # ... and finds the pending instances by it, as before.
        plan = session.execute(
            sql_text(
                "EXPLAIN QUERY PLAN SELECT key FROM schedules "
                "WHERE status = 'pending' AND trigger_time <= '2027-01-01'"
            )
            if database == "sqlite"
            else sql_text("SELECT 1")
        ).all()
    assert database != "sqlite" or STATUS_TRIGGER in str(plan)
    assert len(pending_triggers(factory, None, until=NOW + timedelta(days=400))) == 3 * 52 + 1


def test_a_load_into_a_filled_table_or_a_reload_keeps_the_trigger_index(
    reload: Reload,
    factory: sessionmaker[Session],
    database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = IndexSpy(monkeypatch)
    monkeypatch.setattr(instances, "INDEX_AFTER_ROWS_AT_MOST", 52)
    assert reload([{**WED, "id": "w0"}]).added == 52  # a reload: one transaction
    entries = [{**WED, "id": f"w{i}"} for i in range(4)]
    assert reconcile(factory, reload.read(entries), now=NOW, batched=True).added == 3 * 52

    monkeypatch.setattr(instances, "INDEX_AFTER_ROWS_AT_MOST", 51)
    entries.append({**WED, "id": "w4"})
    entries.append({**WED, "id": "w5"})
    assert reconcile(factory, reload.read(entries), now=NOW, batched=True).added == 2 * 52

    # The reload kept it, and so did the start into a table of 208 rows; the start into 52
    # rows built it after them (on SQLite).
    sqlite = database == "sqlite"
    assert [STATUS_TRIGGER in seen for seen in spy.seen] == [True, not sqlite, not sqlite, True]


def test_a_start_that_fails_midway_builds_the_trigger_index_again(
    reload: Reload, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = reload.read([{**WED, "id": f"w{i}"} for i in range(4)])
    IndexSpy(monkeypatch, fail_at=2)

    with pytest.raises(RuntimeError, match="the disk is full"):
        reconcile(factory, config, now=NOW, batched=True)

    with factory() as session:
        assert STATUS_TRIGGER in index_names(session)
        assert session.scalar(select(func.count()).select_from(Instance)) == 2 * 52


@pytest.mark.parametrize("batched", [False, True], ids=["reload", "start"])
def test_a_load_of_many_instances_refreshes_postgresqls_statistics(
    reload: Reload,
    factory: sessionmaker[Session],
    database: str,
    batched: bool,
) -> None:
    def analyzed() -> object:
        query = (
            "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'schedules'"
            if database == "postgresql"
            # SQLite plans by its indexes: no statistics are made (they would change its plans).
            else "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
        )
        with factory() as session:
            return session.execute(sql_text(query)).scalar() or None

    entries = [WED | {"id": f"wed-{i}", "court_id": str(i)} for i in range(30)]
    assert reload(entries[:10]).added == 520
    assert analyzed() is None  # a few hundred: the planner's guess does no harm

    # A reload reconciles in one transaction; a start a batch of entries at a time.
    assert reconcile(factory, reload.read(entries), now=NOW, batched=batched).added == 1040

    assert (analyzed() is not None) == (database == "postgresql")
