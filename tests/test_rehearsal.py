"""Rehearsals (CONTRACT section 12): when they are due and which share one (``rehearsal.plan``,
pure), and REHEARSE_HOURS's validation. The daemon's rehearsals against a real club on
127.0.0.1 are in tests/test_rehearsal_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import config_loader
from rehearsal import Candidate, plan

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def candidate(
    key: str,
    trigger_in: timedelta,
    *,
    club: str | None = "padel",
    token: str = "default",
    prepare_seconds: float | None = 60.0,
    rehearsal: str | None = None,
    rehearsed_ago: timedelta | None = None,
    booking: bool = False,
) -> Candidate:
    trigger = NOW + trigger_in
    return Candidate(
        key=key,
        schedule_id=key.split("@", maxsplit=1)[0],
        club=club,
        token=token,
        trigger=trigger,
        desired=trigger + timedelta(days=7),
        timezone="Europe/Paris",
        prepare_seconds=prepare_seconds,
        rehearsal=rehearsal,
        rehearsed_at=None if rehearsed_ago is None else NOW - rehearsed_ago,
        booking=booking,
    )


def keys(groups: list[list[Candidate]]) -> list[list[str]]:
    return [[c.key for c in group] for group in groups]


def test_a_rehearsal_is_due_rehearse_hours_before_the_trigger_not_earlier() -> None:
    at = candidate("a@1", timedelta(hours=24))
    early = candidate("b@1", timedelta(hours=24, minutes=1), club="other")
    assert keys(plan([at, early], NOW, 24)) == [["a@1"]]


def test_an_instance_loaded_later_rehearses_at_once_unless_its_preparation_is_near() -> None:
    later = candidate("a@1", timedelta(hours=3))
    near = candidate("b@1", timedelta(seconds=60 + 299), club="near", token="bob")
    just_far = candidate("c@1", timedelta(seconds=60 + 300), club="far", token="cy")
    assert keys(plan([later, near, just_far], NOW, 24)) == [["c@1"], ["a@1"]]


def test_a_flow_without_preparation_steps_is_never_rehearsed() -> None:
    assert plan([candidate("a@1", timedelta(hours=2), prepare_seconds=None)], NOW, 24) == []


def test_rehearse_hours_zero_turns_rehearsals_off() -> None:
    assert plan([candidate("a@1", timedelta(hours=2))], NOW, 0) == []


def test_a_passed_rehearsal_is_not_run_again_and_a_failed_one_is_after_an_hour() -> None:
    passed = candidate("a@1", timedelta(hours=2), rehearsal="ok", rehearsed_ago=timedelta(hours=5))
    failed_recently = candidate(
        "b@1",
        timedelta(hours=2),
        club="b",
        rehearsal="failed x",
        rehearsed_ago=timedelta(minutes=59),
    )
    failed_hour_ago = candidate(
        "c@1", timedelta(hours=2), club="c", rehearsal="failed x", rehearsed_ago=timedelta(hours=1)
    )
    assert keys(plan([passed, failed_recently, failed_hour_ago], NOW, 24)) == [["c@1"]]
    # After a reload, failed rehearsals run again at once.
    assert keys(plan([passed, failed_recently], NOW, 24, again=True)) == [["b@1"]]


def test_instances_of_one_club_and_token_within_the_hour_share_one_rehearsal() -> None:
    due = candidate("mon@1", timedelta(hours=24))
    within = candidate("tue@1", timedelta(hours=24, minutes=59))
    past_hour = candidate("wed@1", timedelta(hours=25))
    other_token = candidate("thu@1", timedelta(hours=24, minutes=30), token="bob")
    other_club = candidate("fri@1", timedelta(hours=24), club="tennis")
    groups = plan([within, past_hour, other_token, due, other_club], NOW, 24)
    assert keys(groups) == [["fri@1"], ["mon@1", "tue@1"]]
    # The one that shared it is not rehearsed again at its own time.
    shared = candidate("tue@1", timedelta(hours=24), rehearsal="ok", rehearsed_ago=timedelta(0))
    assert plan([shared], NOW + timedelta(minutes=59), 24) == []


def test_an_old_rehearsal_from_before_the_window_counts_for_nothing() -> None:
    old = candidate("a@1", timedelta(hours=24), rehearsal="ok", rehearsed_ago=timedelta(days=3))
    assert keys(plan([old], NOW, 24)) == [["a@1"]]


def test_a_rehearsal_due_at_another_bookings_trigger_waits_until_that_booking_ended() -> None:
    # A daily schedule: tomorrow's rehearsal (24 h ahead) falls at today's trigger.
    tomorrow = candidate("daily@2", timedelta(hours=24))
    today = candidate("daily@1", timedelta(0))
    assert plan([tomorrow, today], NOW, 24) == []
    # Today's booking claimed (its early answers retried 10 s past its trigger): still waiting.
    claimed = candidate("daily@1", -timedelta(seconds=10), booking=True)
    assert plan([tomorrow, claimed], NOW, 24) == []
    # Today's booking ended (booked or failed: no longer a candidate): tomorrow's runs, far ahead.
    later = NOW + timedelta(minutes=1)
    assert keys(plan([candidate("daily@2", timedelta(hours=24))], later, 24)) == [["daily@2"]]


def test_another_booking_keeps_rehearsals_away_for_its_preparation_plus_five_minutes() -> None:
    due = candidate("a@1", timedelta(hours=3))  # loaded late: rehearses at once
    inside = candidate("b@1", timedelta(seconds=60 + 299))
    outside = candidate("b@1", timedelta(seconds=60 + 300))
    assert plan([due, inside], NOW, 24) == []
    # Just outside, it is not busy (and rehearses itself, with the other: loaded late too).
    assert keys(plan([due, outside], NOW, 24)) == [["b@1", "a@1"]]
    # Its own flow's preparation time counts: an hour's preparation keeps it away an hour more.
    long_prepare = candidate("b@1", timedelta(minutes=64), prepare_seconds=3600)
    assert plan([due, long_prepare], NOW, 24) == []
    # A booking already due (its trigger passed, booked at once) keeps it away too.
    overdue = candidate("b@1", -timedelta(minutes=3))
    assert plan([due, overdue], NOW, 24) == []


def test_a_booking_of_the_same_club_or_the_same_token_keeps_a_rehearsal_waiting() -> None:
    due = candidate("a@1", timedelta(hours=3), club="padel", token="ana")
    for other, waits in (
        (candidate("b@1", timedelta(minutes=1), club="padel", token="ana"), True),
        (candidate("b@1", timedelta(minutes=1), club="padel", token="ben"), True),
        (candidate("b@1", timedelta(minutes=1), club="padel-north", token="ana"), True),
        (candidate("b@1", timedelta(minutes=1), club="tennis", token="ben"), False),
        (candidate("b@1", timedelta(minutes=1), club="tennis", token="ben", booking=True), False),
    ):
        assert plan([due, other], NOW, 24) == ([] if waits else [[due]]), other


def test_a_failed_rehearsals_hourly_try_and_a_reloads_wait_for_another_booking_too() -> None:
    failed = candidate(
        "a@1", timedelta(hours=5), rehearsal="failed x", rehearsed_ago=timedelta(hours=1)
    )
    claimed = candidate("b@1", -timedelta(seconds=3), booking=True)
    assert plan([failed, claimed], NOW, 24) == []
    assert plan([failed, claimed], NOW, 24, again=True) == []
    assert keys(plan([failed], NOW, 24, again=True)) == [["a@1"]]


def test_a_booking_under_way_is_never_rehearsed_itself() -> None:
    # A watch's try, claimed, whose next trigger is far: no rehearsal of it, none of its club.
    trying = candidate("a@1", timedelta(hours=3), booking=True)
    assert plan([trying], NOW, 24) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", 24.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("8784", 8784.0),
    ],
)
def test_rehearse_hours_reads_hours_with_24_by_default(value: str, expected: float) -> None:
    assert config_loader.Settings.from_env({"REHEARSE_HOURS": value}).rehearse_hours == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "REHEARSE_HOURS: 'soon' is not a number of hours (e.g. 24; 0: off)"),
        ("-1", "REHEARSE_HOURS: '-1' must be a number of hours from 0 (off) to 8784 (the "
               "longest window)"),
        ("nan", "REHEARSE_HOURS: 'nan' must be a number of hours from 0 (off) to 8784 (the "
                "longest window)"),
        ("9000", "REHEARSE_HOURS: '9000' must be a number of hours from 0 (off) to 8784 (the "
                 "longest window)"),
    ],
)  # fmt: skip
def test_rehearse_hours_is_validated_naming_the_variable(value: str, message: str) -> None:
    with pytest.raises(config_loader.SettingsError) as raised:
        config_loader.Settings.from_env({"REHEARSE_HOURS": value})
    assert str(raised.value) == message
