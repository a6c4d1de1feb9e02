"""Doinsport (api-v3.doinsport.club), as its public clients drive it.

Sources (read, not copied):
- ``ataaki/sdlv-booker`` ``src/api/auth.js`` and ``src/api/doinsport.js`` (2026-02-13, the most
  recent): ``POST /client_login_check`` answering ``{"token": <JWT>}``; the planning
  ``GET /clubs/playgrounds/plannings/{YYYY-MM-DD}?club.id=&from=&to=&activities.id=&bookingType=
  unique`` (a hydra collection of playgrounds, each with ``activities[].slots[]`` whose ``startAt``
  is local ``HH:MM`` and whose ``prices[]`` carry ``id``, ``duration`` in seconds, ``bookable``,
  ``pricePerParticipant`` in cents); ``POST /clubs/bookings`` whose ``startAt``/``endAt`` are the
  club's local time converted to UTC, written ``YYYY-MM-DD HH:MM:SS`` (summer time included);
  ``cancelBooking``: ``PUT /clubs/bookings/{id}`` with ``{"canceled": true}`` and the bearer
  token cancels (the updated booking comes back);
- ``vuongDang/viva-padel`` ``crates/testcases/data/legarden_server/*.json`` (recorded planning
  answers; ``bookable`` false once taken);
- padel scripts found by searching GitHub code for ``api-v3.doinsport.club/clubs/bookings``
  (``book_slot``/``book_slot_2``): ``/me`` (``id``, ``lastName``), the booking body, then
  ``PUT /clubs/bookings/{id}`` with ``"confirmed": true``. They disagree on ``startAt``: one sends
  the local time minus a fixed hour in the POST and the local time in the PUT; another sends local
  ISO times. The mock follows the most recent: UTC in both, and refuses anything else.

The login answer ``{"token": ...}`` and the 401 bodies ``{"code": 401, "message": "Invalid
credentials."}`` / ``"Expired JWT Token"`` / ``"JWT Token not found"`` are those of the Symfony
JWT bundle that ``client_login_check`` and ``token`` point to. Not shown by public code (the
mock's own): the answers to a taken slot and to a booking before the club opens it; the mock
answers both as API Platform does a refused write, 422 with a ``ConstraintViolationList``, and
the messages below.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, iter_half_hours, json_answer, new_id

CLUB_ID = "9a3f194d-15c8-4fe5-b83c-51ebf3a388ce"
WHITE_LABEL_ID = "88f2cac0-0b00-4fad-9ef0-95fdc13ee63b"
ACTIVITY_ID = "ce8c306e-224a-4f24-aa9d-6500580924dc"
USER_ID = "2d1f6a3c-7b8e-4c9d-a0e1-f2a3b4c5d6e7"
PLAYGROUNDS = {
    "9f66b169-c7cc-4fa0-848b-cc68b1f02bb5": "Padel 1",
    "b5a0b1d1-8272-4fd0-9618-ab878c08ec7e": "Padel 2",
}
DURATIONS_S = (3600, 5400, 7200)
TAKEN_MESSAGE = "This slot is no longer available."
EARLY_MESSAGE = "Bookings for this date are not open yet."
_UTC_SPACE = "%Y-%m-%d %H:%M:%S"
_PRICE_NS = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


def _unauthorized(message: str) -> Answer:
    return json_answer(401, {"code": 401, "message": message})


def _hydra_error(status: int, description: str) -> Answer:
    return json_answer(
        status,
        {
            "@context": "/contexts/Error",
            "@type": "hydra:Error",
            "hydra:title": "An error occurred",
            "hydra:description": description,
        },
    )


def _violation(path: str, message: str) -> Answer:
    return json_answer(
        422,
        {
            "@context": "/contexts/ConstraintViolationList",
            "@type": "ConstraintViolationList",
            "hydra:title": "An error occurred",
            "hydra:description": f"{path}: {message}",
            "violations": [{"propertyPath": path, "message": message}],
        },
    )


class DoinsportMock(ClubMock):
    """Doinsport. Courts are playground ids (``PLAYGROUNDS``); slots every 30 min, 08:00-22:00
    local, for 60, 90 or 120 minutes."""

    system = "doinsport"
    hosts = ("api-v3.doinsport.club",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("POST", r"/client_login_check", "login"),
        ("GET", r"/me", "me"),
        ("GET", r"/clubs/playgrounds/plannings/(?P<day>\d{4}-\d{2}-\d{2})", "planning"),
        ("POST", r"/clubs/bookings", "book"),
        ("PUT", r"/clubs/bookings/(?P<booking_id>[^/]+)", "update"),
    )

    def __init__(self, *, token_ttl: float = 3600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.club_id = CLUB_ID
        self.white_label_id = WHITE_LABEL_ID
        self.activity_id = ACTIVITY_ID
        self.user_id = USER_ID
        self.courts = tuple(PLAYGROUNDS)
        self.token_ttl = token_ttl
        self._prices: dict[str, tuple[str, datetime, int]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {
            "username": self.email,
            "password": self.password,
            "club_id": self.club_id,
            "white_label_id": self.white_label_id,
            "activity_id": self.activity_id,
        }

    def login(self, request: Recorded) -> Answer:
        try:
            body = request.json()
        except ValueError:
            return _hydra_error(400, "Syntax error")
        if (
            not isinstance(body, dict)
            or body.get("club") != f"/clubs/{self.club_id}"
            or body.get("clubWhiteLabel") != f"/clubs/white-labels/{self.white_label_id}"
            or not self.credentials_ok(body.get("username"), body.get("password"))
        ):
            return _unauthorized("Invalid credentials.")
        token = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9." + self.new_session(
            self.user_id, ttl=self.token_ttl
        )
        self._alias(token)
        return json_answer(200, {"token": token, "refresh_token": new_id().replace("-", "")})

    def _alias(self, token: str) -> None:
        # The session store is keyed by the whole bearer string.
        raw = token.rsplit(".", 1)[1]
        with self._lock:
            self._sessions[token] = self._sessions.pop(raw)

    def _user(self, request: Recorded) -> Answer | str:
        state, session = self.session_state(request.bearer())
        if state == "missing":
            return _unauthorized("JWT Token not found")
        if state == "expired":
            return _unauthorized("Expired JWT Token")
        if state != "ok" or session is None:
            return _unauthorized("Invalid JWT Token")
        return session.user

    def me(self, request: Recorded) -> Answer:
        user = self._user(request)
        if isinstance(user, Answer):
            return user
        return json_answer(
            200,
            {
                "@context": "/contexts/User",
                "@id": f"/users/{user}",
                "@type": "User",
                "id": user,
                "firstName": "Pat",
                "lastName": "Player",
                "email": self.email,
            },
        )

    def _price_id(self, court: str, start: datetime, seconds: int) -> str:
        price = str(uuid.uuid5(_PRICE_NS, f"{court}|{start.isoformat()}|{seconds}"))
        with self._lock:
            self._prices[price] = (court, start.astimezone(UTC), seconds)
        return price

    def planning(self, request: Recorded, day: str) -> Answer:
        user = self._user(request)
        if isinstance(user, Answer):
            return user
        if request.arg("club.id") != self.club_id:
            return _hydra_error(400, "club.id: this value is not valid.")
        if request.arg("activities.id") not in (None, self.activity_id):
            return _hydra_error(400, "activities.id: this value is not valid.")
        try:
            local_day = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=self.zone)
        except ValueError:
            return _hydra_error(404, "Not Found")
        low = (request.arg("from") or "00:00")[:5]
        high = (request.arg("to") or "23:59")[:5]
        members = []
        for court, name in PLAYGROUNDS.items():
            slots = []
            for start in iter_half_hours(local_day, 8, 22):
                if not low <= f"{start:%H:%M}" <= high:
                    continue
                prices = [
                    {
                        "id": self._price_id(court, start, seconds),
                        "duration": seconds,
                        "pricePerParticipant": 600 * seconds // 3600,
                        "participantCount": 4,
                        "instalmentAmount": None,
                        "bookable": self.is_free(court, start, seconds // 60),
                    }
                    for seconds in DURATIONS_S
                ]
                slots.append(
                    {
                        "startAt": f"{start:%H:%M}",
                        "paymentMethods": ["complete", "per_participant", "on_the_spot"],
                        "instalmentPercentage": None,
                        "prices": prices,
                        "userClientStepBookingDuration": 3600,
                    }
                )
            members.append(
                {
                    "@type": "ClubPlayground",
                    "@id": f"/clubs/playgrounds/{court}",
                    "id": court,
                    "name": name,
                    "indoor": True,
                    "activities": [{"id": self.activity_id, "name": "Padel", "slots": slots}],
                }
            )
        return json_answer(
            200,
            {
                "@context": "/contexts/ClubPlayground",
                "@id": "/clubs/playgrounds",
                "@type": "hydra:Collection",
                "hydra:member": members,
                "hydra:totalItems": len(members),
            },
        )

    def book(self, request: Recorded) -> Answer:
        user = self._user(request)
        if isinstance(user, Answer):
            return user
        if request.content_type() not in ("application/json", "application/ld+json"):
            return _hydra_error(415, "The content-type is not supported.")
        try:
            body = request.json()
        except ValueError:
            return _hydra_error(400, "Syntax error")
        if not isinstance(body, dict):
            return _hydra_error(400, "Syntax error")
        price_iri = str(body.get("timetableBlockPrice", ""))
        price = self._prices.get(price_iri.rsplit("/", 1)[-1])
        if not price_iri.startswith("/clubs/playgrounds/timetables/blocks/prices/") or not price:
            return _hydra_error(400, f'Item not found for "{price_iri}".')
        court, start, seconds = price
        problem = self._invalid(body, user, court, start, seconds)
        if problem:
            return _violation(*problem)
        if not self.window_open():
            return _violation("startAt", EARLY_MESSAGE)
        if not self.is_free(court, start, seconds // 60):
            return _violation("timetableBlockPrice", TAKEN_MESSAGE)
        booking = self.add_booking(
            id=new_id(),
            court=court,
            start=start,
            minutes=seconds // 60,
            user=user,
            status="PENDING",
        )
        return json_answer(201, self._booking_json(booking))

    def _invalid(
        self, body: dict[str, Any], user: str, court: str, start: datetime, seconds: int
    ) -> tuple[str, str] | None:
        expected = {
            "club": f"/clubs/{self.club_id}",
            "activity": f"/activities/{self.activity_id}",
            "userClient": f"/user-clients/{user}",
            "startAt": start.strftime(_UTC_SPACE),
            "endAt": (start + timedelta(seconds=seconds)).strftime(_UTC_SPACE),
        }
        for key, value in expected.items():
            if body.get(key) != value:
                return key, "This value is not valid."
        if body.get("playgrounds") != [f"/clubs/playgrounds/{court}"]:
            return "playgrounds", "This value is not valid."
        participants = body.get("participants")
        if (
            not isinstance(participants, list)
            or not participants
            or not isinstance(participants[0], dict)
            or participants[0].get("user") != f"/user-clients/{user}"
        ):
            return "participants", "This value is not valid."
        if body.get("paymentMethod") not in ("complete", "per_participant", "on_the_spot"):
            return "paymentMethod", "The value you selected is not a valid choice."
        return None

    def _booking_json(self, booking: Any) -> dict[str, Any]:
        return {
            "@context": "/contexts/Booking",
            "@id": f"/clubs/bookings/{booking.id}",
            "@type": "Booking",
            "id": booking.id,
            "confirmed": booking.status == "CONFIRMED",
            "canceled": booking.status == "CANCELED",
            "startAt": booking.start.isoformat(),
            "endAt": booking.end.isoformat(),
            "playgrounds": [f"/clubs/playgrounds/{booking.court}"],
            "club": f"/clubs/{self.club_id}",
        }

    def update(self, request: Recorded, booking_id: str) -> Answer:
        """``PUT /clubs/bookings/{id}``: ``{"confirmed": true, ...}`` confirms the booking,
        ``{"canceled": true}`` cancels it (sdlv-booker's ``cancelBooking``)."""
        user = self._user(request)
        if isinstance(user, Answer):
            return user
        booking = self.find_booking(booking_id)
        if booking is None or booking.user != user:
            return _hydra_error(404, "Not Found")
        try:
            body = request.json()
        except ValueError:
            return _hydra_error(400, "Syntax error")
        if isinstance(body, dict) and body.get("canceled") is True:
            booking.status = "CANCELED"
            return json_answer(200, self._booking_json(booking))
        if not isinstance(body, dict) or body.get("confirmed") is not True:
            return _violation("confirmed", "This value should be true.")
        for key, moment in (("startAt", booking.start), ("endAt", booking.end)):
            if key in body and body[key] != moment.strftime(_UTC_SPACE):
                return _violation(key, "This value is not valid.")
        booking.status = "CONFIRMED"
        return json_answer(200, self._booking_json(booking))
