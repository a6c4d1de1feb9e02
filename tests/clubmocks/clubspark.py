"""ClubSpark (LTA): the LTA account server (``account.lta.org.uk``) for the token, the players'
app API (``api.clubspark.uk``) for the availability and the booking.

Sources (read, not copied):
- ``lmor152/omnibooker-v2`` (January 2026) ``integrations/clubspark/client.py`` and ``models.py``,
  ``services/providers/clubspark.py``: ``POST account.lta.org.uk/issue/oauth2/token`` with
  ``Authorization: Basic base64(<app client id>:<app client secret>)`` and a JSON body
  ``username``, ``password``, ``scope: https://api.clubspark.uk/token/``,
  ``grant_type: password``, answering ``access_token``; every API call with
  ``Authorization: Lta-Auth <token>``, ``appname: cspl``, ``appversion: 2.0``;
  ``GET /v1/VenueBooking/<venue>/GetAvailabilityTimes?Duration=&Date=YYYY-MM-DD
  &resourceCategory=1`` answering ``Result``, ``SessionID`` and ``Times[]`` of ``Time`` (minutes
  after midnight) with ``Resources[]`` (``ID``, ``SessionID``, ``Cost``, ``Name``, ...);
  ``POST /v0/VenueBooking/<venue>/RequestSession`` with ``ResourceID``, ``SessionID``, ``Date``,
  ``StartTime`` (minutes, a number), ``Duration`` and, for a paid court, ``PaymentToken`` and
  amounts, answering ``Result`` (negative: failed), ``TransactionID``, ``ResourceID``, ...;
- ``marcelpallares/clubspark-auto-bookings`` (2021) ``mobile-interactor/*.js``,
  ``constants.js``: the same token request (at ``api.clubspark.uk/issue/oauth2/token``) and a
  free booking sending only ``ResourceID``, ``SessionID``, ``Date``, ``StartTime``,
  ``Duration`` and ``Source``; ``Result`` 0 is booked.

Not shown by public code (the mock's own): the availability lists only free sessions (both
clients pick from it without a status) and lists nothing for a date not open yet; a wrong
password is OAuth2's 400 ``invalid_grant``, a wrong app secret 401 ``invalid_client``; a
missing or expired token is 401; a ``StartTime`` or ``Duration`` that is not a number, or a
date not ``YYYY-MM-DD``, is 400; the negative ``Result`` codes (-1 not open, -2 taken, -3 a
paid court without payment) and the mock's app client secret (a test value, not the app's).
"""

from __future__ import annotations

import base64
import re
from datetime import date, datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, json_answer, new_id

APP_CLIENT = "clubspark-app"
APP_SECRET = "mock-app-secret"  # the mock's own test value, not the real app's
VENUE = "yourclubtennis"
USER_ID = "6f1c2a9e-0000-4000-8000-00000000c5a1"
COURTS = (
    "0b4d6c1e-1111-4aaa-8aaa-000000000001",
    "0b4d6c1e-2222-4aaa-8aaa-000000000002",
)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def app_auth() -> str:
    return base64.b64encode(f"{APP_CLIENT}:{APP_SECRET}".encode()).decode()


class ClubSparkMock(ClubMock):
    """ClubSpark. ``courts`` are the resource IDs; ``paid`` holds the courts that cost money
    (booked only with a payment, which the ready flow does not make)."""

    system = "clubspark"
    hosts = ("account.lta.org.uk", "api.clubspark.uk")
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("POST", r"/issue/oauth2/token", "token"),
        ("GET", r"/v1/VenueBooking/(?P<venue>[^/]+)/GetAvailabilityTimes", "availability"),
        ("POST", r"/v0/VenueBooking/(?P<venue>[^/]+)/RequestSession", "request_session"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.courts = list(COURTS)
        self.paid: set[str] = set()
        self.session_id = new_id()

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "app_auth": app_auth(),
            "venue": VENUE,
        }

    def token(self, request: Recorded) -> Answer:
        if (request.header("authorization") or "") != f"Basic {app_auth()}":
            return json_answer(401, {"error": "invalid_client"})
        try:
            body = request.json()
        except ValueError:
            return json_answer(400, {"error": "invalid_request"})
        if not isinstance(body, dict) or body.get("grant_type") != "password":
            return json_answer(400, {"error": "unsupported_grant_type"})
        if body.get("scope") != "https://api.clubspark.uk/token/":
            return json_answer(400, {"error": "invalid_scope"})
        if not self.credentials_ok(body.get("username"), body.get("password")):
            return json_answer(400, {"error": "invalid_grant"})
        token = self.new_session(USER_ID)
        return json_answer(
            200, {"access_token": token, "token_type": "urn:oasis:names:tc:SAML:2.0:assertion"}
        )

    def _refusal(self, request: Recorded, venue: str) -> Answer | None:
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        state, _ = self.session_state(token.strip() or None)
        if scheme != "Lta-Auth" or state != "ok":
            return json_answer(401, {"Message": "Authorization has been denied for this request."})
        if venue != VENUE:
            return json_answer(404, {"Message": "Venue not found"})
        return None

    def _start(self, day: date, minutes: int) -> datetime:
        midnight = datetime(day.year, day.month, day.day, tzinfo=self.zone)
        return (midnight + timedelta(minutes=minutes)).astimezone(self.zone)

    def _resources(self, day: date, minutes: int, duration: int) -> list[dict[str, Any]]:
        start = self._start(day, minutes)
        return [
            {
                "ID": court,
                "Category": 1,
                "SessionID": self.session_id,
                "Cost": 8.0 if court in self.paid else 0.0,
                "Name": f"Court {number}",
            }
            for number, court in enumerate(self.courts, start=1)
            if self.is_free(court, start, duration)
        ]

    def availability(self, request: Recorded, venue: str) -> Answer:
        refused = self._refusal(request, venue)
        if refused is not None:
            return refused
        day_text, duration_text = request.arg("Date") or "", request.arg("Duration") or ""
        if not _DATE.fullmatch(day_text) or not duration_text.isdigit():
            return json_answer(400, {"Message": "The request is invalid."})
        if not self.window_open():
            return json_answer(200, {"Result": 0, "SessionID": self.session_id, "Times": []})
        day, duration = date.fromisoformat(day_text), int(duration_text)
        times = [
            {"Time": minutes, "Resources": self._resources(day, minutes, duration)}
            for minutes in range(7 * 60, 22 * 60, 30)
        ]
        times = [t for t in times if t["Resources"]]
        return json_answer(200, {"Result": 0, "SessionID": self.session_id, "Times": times})

    def request_session(self, request: Recorded, venue: str) -> Answer:
        refused = self._refusal(request, venue)
        if refused is not None:
            return refused
        try:
            body = request.json()
        except ValueError:
            return json_answer(400, {"Message": "The request is invalid."})
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("StartTime"), int)
            or not isinstance(body.get("Duration"), int)
            or not _DATE.fullmatch(str(body.get("Date")))
        ):
            return json_answer(400, {"Message": "The request is invalid."})
        court = str(body.get("ResourceID"))
        if court not in self.courts or body.get("SessionID") != self.session_id:
            return json_answer(404, {"Message": "Session not found"})
        start = self._start(date.fromisoformat(body["Date"]), body["StartTime"])
        minutes = body["Duration"]
        if not self.window_open():
            return json_answer(200, self._result(-1, court))
        if not self.is_free(court, start, minutes):
            return json_answer(200, self._result(-2, court))
        if court in self.paid and not body.get("PaymentToken"):
            return json_answer(200, self._result(-3, court))
        transaction = new_id()
        self.add_booking(
            id=transaction,
            court=court,
            start=start,
            minutes=minutes,
            user=USER_ID,
            status="CONFIRMED",
        )
        return json_answer(200, self._result(0, court, transaction))

    def _result(self, result: int, court: str, transaction: str = "") -> dict[str, Any]:
        return {
            "Result": result,
            "ResourceID": court,
            "SessionID": self.session_id,
            "TimeZone": str(self.zone),
            "Attended": False,
            "TransactionID": transaction,
            "HardwareIntegrationPIN": "",
        }
