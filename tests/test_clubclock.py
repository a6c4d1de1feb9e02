"""The club's clock measurement (clubclock.py), against a simulated club: our clock, the
club's clock at a known offset, round trips with jitter, and where in the round trip the club
writes its ``Date``."""

from __future__ import annotations

import random
from collections.abc import Callable
from email.utils import formatdate

import pytest

import clubclock
from clubclock import ClockError, Measurement, measure

START = 1_790_000_000.123


class SimClub:
    """Our clock (``now``) and a club whose clock reads ``now + offset``; each request takes
    ``trip()`` seconds, and the club writes its ``Date`` ``stamp`` of the way through it."""

    def __init__(
        self,
        offset: float,
        *,
        trip: Callable[[], float] = lambda: 0.001,
        stamp: Callable[[], float] = lambda: 0.5,
        date: Callable[[float], str | None] | None = None,
    ) -> None:
        self.now = START
        self.offset = offset
        self.trip = trip
        self.stamp = stamp
        self.date = date or (lambda club: formatdate(club, usegmt=True))
        self.sent: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds

    def fetch(self) -> str | None:
        self.sent.append(self.now)
        trip = self.trip()
        club = self.now + trip * self.stamp() + self.offset
        self.now += trip
        return self.date(club)

    def measure(self, **kwargs: object) -> Measurement:
        return measure(self.fetch, clock=self.clock, sleep=self.sleep, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("offset", [0.7, -0.45, 0.0, 1.9995, -2.0, 0.0004, 123.456, -299.0])
def test_finds_a_known_offset_within_its_uncertainty(offset: float) -> None:
    club = SimClub(offset)
    found = club.measure()
    assert found.offset - found.uncertainty <= offset <= found.offset + found.uncertainty
    assert found.uncertainty <= 0.002
    assert found.requests == len(club.sent) <= clubclock.MAX_REQUESTS


def test_jitter_and_unknown_stamp_position_never_break_the_bracket() -> None:
    rng = random.Random(24)
    for _ in range(200):
        offset = rng.uniform(-3, 3)
        club = SimClub(
            offset, trip=lambda: rng.uniform(0.0005, 0.03), stamp=lambda: rng.uniform(0, 1)
        )
        found = club.measure()
        assert found.offset - found.uncertainty <= offset <= found.offset + found.uncertainty
        assert found.uncertainty <= 0.03
        assert len(club.sent) <= clubclock.MAX_REQUESTS
        # Sent at the trigger by the club's clock, the booking never reaches the club early.
        trigger = START + 60
        assert found.send_at(trigger) + offset >= trigger


@pytest.mark.parametrize("offset", [0.7, -0.45, 0.0, 1.9995, -2.0, 0.3337])
def test_several_requests_a_second_take_about_five_seconds_on_a_fast_link(offset: float) -> None:
    """While the window is wide, a round sends up to five requests in one second of the
    club's clock, each at another guess of its offset: a binary search takes a second per
    halving (about seven seconds on loopback)."""
    club = SimClub(offset, trip=lambda: 0.0003)
    found = club.measure()
    assert found.offset - found.uncertainty <= offset <= found.offset + found.uncertainty
    assert found.uncertainty <= clubclock.TARGET_UNCERTAINTY_SECONDS
    assert club.now - START < 6.0
    # A binary search sends at most two in a second (its closing two, half a second apart).
    assert max(sum(1 for t in club.sent if s <= t < s + 1.0) for s in club.sent) >= 3


def test_at_most_twenty_requests_even_when_every_one_narrows() -> None:
    club = SimClub(0.3, trip=lambda: 0.0)
    club.measure()
    assert len(club.sent) <= 20


def test_a_slow_club_is_refused_naming_the_round_trip() -> None:
    club = SimClub(0.7, trip=lambda: 0.6)
    with pytest.raises(ClockError, match=r"answers too slowly \(round trips of 600 ms\)"):
        club.measure()


def test_an_answer_without_date_is_refused() -> None:
    club = SimClub(0.7, date=lambda club: None)
    with pytest.raises(ClockError, match=r"^the club's answer has no Date header$"):
        club.measure()
    assert len(club.sent) == 1


def test_an_unreadable_date_is_refused() -> None:
    club = SimClub(0.7, date=lambda club: "yesterday")
    with pytest.raises(ClockError, match="Date header 'yesterday' is not an HTTP date"):
        club.measure()


@pytest.mark.parametrize("jump", [0.5, 3.0, -0.5, -3.0])
def test_a_date_that_jumps_is_refused(jump: float) -> None:
    club = SimClub(0.7)
    real = club.fetch

    def jumping() -> str | None:
        if len(club.sent) == 3:
            club.offset += jump
        return real()

    with pytest.raises(ClockError, match="the club's Date jumped between requests"):
        measure(jumping, clock=club.clock, sleep=club.sleep)


@pytest.mark.parametrize("offset", [301.0, -400.0, 86_400.0])
def test_an_offset_over_five_minutes_is_refused_after_one_request(offset: float) -> None:
    club = SimClub(offset)
    with pytest.raises(ClockError, match=r"more than 5 minutes: implausible .* not used"):
        club.measure()
    assert len(club.sent) == 1


def test_no_request_is_planned_past_the_deadline() -> None:
    club = SimClub(0.25)
    deadline = START + 2.5
    found = club.measure(deadline=deadline)
    assert club.sent and max(club.sent) + 0.001 <= deadline
    assert found.offset - found.uncertainty <= 0.25 <= found.offset + found.uncertainty


def test_too_little_time_before_the_deadline_is_refused() -> None:
    club = SimClub(0.25)
    with pytest.raises(ClockError, match=r"^too little time before the trigger .* \(1 requests"):
        club.measure(deadline=START + 0.01)
    assert len(club.sent) == 1


def test_a_failed_request_ends_the_measurement_with_its_reason() -> None:
    club = SimClub(0.7)

    def refused() -> str | None:
        if club.sent:
            raise ClockError("no answer: connection refused")
        return club.fetch()

    with pytest.raises(ClockError, match=r"^no answer: connection refused$"):
        measure(refused, clock=club.clock, sleep=club.sleep)


@pytest.mark.parametrize(
    ("offset", "uncertainty", "text", "label", "send_delta"),
    [
        (0.412, 0.006, "offset +412 ms ± 6 ms", "by the club's clock (+412 ms ± 6 ms)", -0.406),
        (-0.45, 0.005, "offset -450 ms ± 5 ms", "by the club's clock (-450 ms ± 5 ms)", 0.455),
        (0.003, 0.005, "offset +3 ms ± 5 ms", "by the club's clock (+3 ms ± 5 ms)", 0.002),
        (0.0, 0.0002, "offset +0 ms ± 1 ms", "by the club's clock (+0 ms ± 1 ms)", 0.0002),
    ],
)
def test_the_send_moves_by_the_offset_less_its_uncertainty(
    offset: float, uncertainty: float, text: str, label: str, send_delta: float
) -> None:
    found = Measurement(offset, uncertainty, 9)
    assert found.text == text
    assert found.label == label
    assert found.send_at(1000.0) - 1000.0 == pytest.approx(send_delta)
    assert found.opened_at(1000.0) == pytest.approx(1000.0 - offset)


def test_parse_date_reads_an_http_date() -> None:
    assert clubclock.parse_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
