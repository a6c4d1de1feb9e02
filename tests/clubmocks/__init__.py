"""Faithful local mocks of real booking systems, one module per system.

Each mock serves, on 127.0.0.1 and a free port, exactly the endpoints that the ready flow
``data/clubs/<system>.json`` uses, with the real system's paths, bodies, cookies, status codes and
answer texts as its public clients show them; see each module's docstring for its sources and for
what the public code does not show (those answers are the mock's own and say so).

Use one in a test::

    from clubmocks import MOCKS, flow_for_mock

    with MOCKS["playtomic"](zone="Europe/Madrid") as club:
        flow = flow_for_mock("playtomic", club.url)   # the flow, pointed at the mock
        tokens = {"default": club.tokens_entry()}    # what tokens.json would hold
        ...
        assert club.bookings[0].status == "CONFIRMED"

The knobs every mock has are documented on ``clubmocks.base.ClubMock``.
"""

from __future__ import annotations

from clubmocks.base import Booking, ClubMock, Recorded
from clubmocks.better import BetterMock
from clubmocks.clubautomation import ClubAutomationMock
from clubmocks.clubspark import ClubSparkMock
from clubmocks.courtreserve import CourtReserveMock
from clubmocks.doinsport import DoinsportMock
from clubmocks.eversports import EversportsMock
from clubmocks.flows import CLUBS_DIR, flow_for_mock, load_flow, write_flow_for_mock
from clubmocks.glofox import GlofoxMock
from clubmocks.nubapp import NubappMock
from clubmocks.perfectgym import PerfectGymMock
from clubmocks.playtomic import PlaytomicMock
from clubmocks.skedda import SkeddaMock

#: Every mock by the name of its flow file in ``data/clubs/``.
MOCKS: dict[str, type[ClubMock]] = {
    mock.system: mock
    for mock in (
        PlaytomicMock,
        ClubAutomationMock,
        DoinsportMock,
        PerfectGymMock,
        CourtReserveMock,
        SkeddaMock,
        EversportsMock,
        NubappMock,
        GlofoxMock,
        ClubSparkMock,
        BetterMock,
    )
}

__all__ = [
    "CLUBS_DIR",
    "MOCKS",
    "BetterMock",
    "Booking",
    "ClubAutomationMock",
    "ClubMock",
    "ClubSparkMock",
    "CourtReserveMock",
    "DoinsportMock",
    "EversportsMock",
    "GlofoxMock",
    "NubappMock",
    "PerfectGymMock",
    "PlaytomicMock",
    "Recorded",
    "SkeddaMock",
    "flow_for_mock",
    "load_flow",
    "write_flow_for_mock",
]
