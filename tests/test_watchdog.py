"""watchdog.py: noticing clock jumps, telling an overdue trigger from one about to be picked up,
and what is logged and reported while the daemon cannot book (CONTRACT section 9). Pure: the
clocks are injected; the daemon that uses it is tested in test_daemon.py and test_e2e_watchdog.py.
"""

from __future__ import annotations

import logging

import pytest

import watchdog
from watchdog import ClockWatch, Overdue, Watchdog


class Clocks:
    """A wall clock and a monotonic clock that move only when told."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 500.0

    def tick(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def watch(clocks: Clocks) -> ClockWatch:
    return ClockWatch(wall=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def test_clocks_that_keep_pace_are_no_jump(clocks: Clocks) -> None:
    watcher = watch(clocks)
    for _ in range(5):
        clocks.tick(1.0)
        assert watcher.check() is None
    # A loop delayed by a busy machine moves both clocks alike; NTP slewing moves the wall
    # clock by at most 0.5 ms a second.
    clocks.tick(7.0)
    clocks.wall += 0.0005
    assert watcher.check() is None


@pytest.mark.parametrize("jump", [3600.0, -3600.0, 0.6, -0.6, 86400.0 * 365])
def test_a_wall_clock_jump_is_told_with_its_size_once(clocks: Clocks, jump: float) -> None:
    watcher = watch(clocks)
    clocks.tick(1.0)
    clocks.wall += jump
    assert watcher.check() == pytest.approx(jump)
    clocks.tick(1.0)
    assert watcher.check() is None


def test_a_jump_within_the_tolerance_is_none(clocks: Clocks) -> None:
    watcher = watch(clocks)
    clocks.tick(1.0)
    clocks.wall += watchdog.JUMP_TOLERANCE * 0.9
    assert watcher.check() is None


def test_late_once_is_not_overdue_late_twice_is() -> None:
    overdue = Overdue()
    # Just loaded (or retried, or carried past by a jump): the scheduler gets a look's time.
    assert overdue.check(["a@1", "b@1"]) == []
    # b was picked up meanwhile; a was not; c is new.
    assert overdue.check(["a@1", "c@1"]) == ["a@1"]
    assert overdue.check(["c@1"]) == ["c@1"]
    overdue.forget()
    assert overdue.check(["c@1"]) == []


def test_describe_overdue_names_the_first_three() -> None:
    assert watchdog.describe_overdue(["a@1"]) == (
        "1 booking(s) overdue: their trigger came and no booking started (a@1)"
    )
    assert watchdog.describe_overdue(["a", "b", "c", "d"]) == (
        "4 booking(s) overdue: their trigger came and no booking started (a, b, c, ...)"
    )


def make_watchdog(clocks: Clocks) -> Watchdog:
    return Watchdog(wall=lambda: clocks.wall, monotonic=lambda: clocks.mono)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_problem_is_an_error_at_once_then_every_ten_seconds_then_time_to_give_up(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="watchdog")
    dog = make_watchdog(clocks)
    why = "the database cannot be written (OperationalError: database or disk is full)"

    assert dog.report(why) is True
    assert errors(caplog) == [
        f"scheduler not working: {why}; recovering (`health` reports it until then)"
    ]
    for _ in range(9):  # once a second, as the loop does
        clocks.tick(1.0)
        assert dog.report(why) is True
    assert len(errors(caplog)) == 1
    clocks.tick(1.0)
    assert dog.report(why) is True
    assert errors(caplog)[-1] == f"scheduler still not working after 10 s: {why}; recovering"
    while clocks.mono < 500.0 + watchdog.GIVE_UP_AFTER - 1.0:
        clocks.tick(1.0)
        assert dog.report(why) is True
    clocks.tick(1.0)
    assert dog.report(why) is False
    assert errors(caplog)[-1] == (
        f"scheduler not working for 60 s: {why}; exiting with status 3 for the supervisor to "
        "restart courtbot"
    )
    assert len(errors(caplog)) == 1 + 5 + 1


def test_recovery_is_logged_with_how_long_it_took_and_health_follows(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="watchdog")
    dog = make_watchdog(clocks)
    assert dog.health() is None
    assert dog.recovered("nothing to do") == 0.0
    assert caplog.messages == []

    dog.report("the scheduler's thread stopped: OperationalError: database or disk is full")
    assert dog.health() == (
        "not working since 2027-01-15T08:00:00Z: the scheduler's thread stopped: "
        "OperationalError: database or disk is full"
    )
    clocks.tick(4.25)
    assert dog.recovered("restarted") == pytest.approx(4.25)

    assert caplog.messages[-1] == (
        "scheduler working again after 4.2 s (was: the scheduler's thread stopped: "
        "OperationalError: database or disk is full): restarted"
    )
    assert dog.health() is None and dog.problem is None
    # A new problem starts a new count toward giving up.
    clocks.tick(100.0)
    assert dog.report("again") is True


def test_the_heartbeat_has_a_fixed_length_and_reads_back() -> None:
    working = watchdog.heartbeat_text(1_800_000_000.4, None)
    failing = watchdog.heartbeat_text(1_800_000_000.0, "not working since X: why\nsecond line")
    endless = watchdog.heartbeat_text(1_800_000_000.0, "x" * 5000)

    assert len(working) == len(failing) == len(endless) == watchdog.HEARTBEAT_BYTES
    assert watchdog.read_heartbeat(working) == (1_800_000_000.0, None)
    assert watchdog.read_heartbeat(failing) == (
        1_800_000_000.0,
        "not working since X: why second line",
    )
    _stamp, state = watchdog.read_heartbeat(endless)
    assert state is not None and set(state) == {"x"}
    # The beat of an earlier release (a bare number) still reads.
    assert watchdog.read_heartbeat("1800000000\n") == (1_800_000_000.0, None)
    for bad in ("", "soon\n"):
        with pytest.raises(ValueError):
            watchdog.read_heartbeat(bad)
