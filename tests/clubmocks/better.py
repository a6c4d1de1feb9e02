"""Better (GLL): the API of bookings.better.org.uk at ``better-admin.org.uk/api``.

Sources (read, not copied):
- ``shubhamwagh/better-booking-bot`` (August 2026) ``src/better_bot/api.py``, ``bot.py``,
  ``checkout.py``: ``GET /api/activities/venues`` without a token ("no auth required") answering
  ``data[]`` of ``slug`` and ``name`` (the ready flow's ``clock``);
  ``POST /api/auth/customer/login`` with JSON ``username``, ``password`` answering ``token``
  (then ``Authorization: Bearer``, ``Origin: https://bookings.better.org.uk``);
  ``GET /api/auth/user`` answering ``data.membership_user.id``;
  ``GET /api/activities/venue/<venue>/activity/<activity>/v2/times?date=YYYY-MM-DD`` answering
  ``data[]`` of ``id``, ``starts_at.format_24_hour``, ``action_to_show.status`` (``BOOK``,
  ``FULL``; ``null`` while the session is listed a few minutes before its release, with the id
  it keeps), ``spaces_remaining``, ``composite_key``, and 422 when the date's slots are not yet
  released; ``GET /api/v1/activities/occurrences/<id>`` answering ``data.tickets[0].id`` and
  ``.pricing_option.id``; ``POST /api/activities/cart/add`` with ``items[{id, type:
  purchasableOccurrence, purchased_for_user_id, pricing_option_id, ticket_id,
  activity_restriction_ids}]``, ``membership_user_id``, ``selected_user_id``, answering
  ``data.items[]`` (``id``, ``name``, ``price.raw``), and at release 409 "a lot of people are
  trying to book at the moment ... Please try again" (a queue, retried), while a 409 or 422
  saying the session is full is final; a paid checkout is completed in a browser (Opayo);
- ``lmor152/omnibooker-v2`` (January 2026) ``integrations/better/client.py``, ``models.py``,
  ``services/providers/better.py``: the same login; the basket's answer read as ``itemHash``,
  ``total`` and ``items``; ``POST /api/checkout/complete`` with ``completed_waivers``,
  ``payments`` (empty when nothing is to pay), ``terms: [1]``, ``transaction_uuid``,
  ``source: activity-booking``, ``item_hash``.

Not shown by public code (the mock's own): a wrong password is 401 (``message``), a missing or
expired token 401; a date not ``YYYY-MM-DD`` is 400; the full session's message ("This
session is full"); checkout/complete's answers (200 with the booking's reference; 422 when the
basket's hash is stale or the basket still costs money without a payment). The basket's answer
holds both sources' readings: ``data.items`` and ``itemHash``/``total``.
"""

from __future__ import annotations

import re
import secrets as _secrets
from datetime import date, datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, json_answer

VENUE = "yourclub-leisure-centre"
ACTIVITY = "tennis-court-outdoor"
MEMBER_ID = 4410027
USER_ID = 991203
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
TRY_AGAIN = "There are a lot of people are trying to book at the moment. Please try again."


class BetterMock(ClubMock):
    """Better. A session is one hour of an activity (``court_id`` is the activity's slug);
    ``take(activity, start)`` makes it full; ``paid`` holds the activities that cost money."""

    system = "better"
    hosts = ("better-admin.org.uk",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/api/activities/venues", "venues"),
        ("POST", r"/api/auth/customer/login", "login"),
        ("GET", r"/api/auth/user", "user"),
        (
            "GET",
            r"/api/activities/venue/(?P<venue>[^/]+)/activity/(?P<activity>[^/]+)/v2/times",
            "times",
        ),
        ("GET", r"/api/v1/activities/occurrences/(?P<occurrence>\d+)", "occurrence"),
        ("POST", r"/api/activities/cart/add", "cart_add"),
        ("POST", r"/api/checkout/complete", "complete"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activities = [ACTIVITY]
        self.paid: set[str] = set()
        #: occurrence id -> (activity, local start)
        self.occurrences: dict[int, tuple[str, datetime]] = {}
        self.cart: dict[str, Any] | None = None
        self.unreleased: set[date] = set()

    def tokens_entry(self) -> dict[str, str]:
        return {"email": self.email, "password": self.password, "venue": VENUE}

    def venues(self, request: Recorded) -> Answer:
        """The venues' list, public (no token): the ready flow's ``clock`` reads its ``Date``."""
        return json_answer(200, {"data": [{"slug": VENUE, "name": "Yourclub Leisure Centre"}]})

    def login(self, request: Recorded) -> Answer:
        try:
            body = request.json()
        except ValueError:
            return json_answer(400, {"message": "The given data was invalid."})
        if not isinstance(body, dict) or not self.credentials_ok(
            body.get("username"), body.get("password")
        ):
            return json_answer(401, {"message": "Invalid credentials"})
        token = self.new_session(str(USER_ID))
        return json_answer(200, {"status": "success", "token": token, "user": {"id": USER_ID}})

    def _authorized(self, request: Recorded) -> bool:
        state, _ = self.session_state(request.bearer())
        return state == "ok"

    @staticmethod
    def _unauthorized() -> Answer:
        return json_answer(401, {"message": "Unauthenticated."})

    def user(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return self._unauthorized()
        return json_answer(200, {"data": {"id": USER_ID, "membership_user": {"id": MEMBER_ID}}})

    def _occurrence_id(self, activity: str, start: datetime) -> int:
        number = int(start.strftime("%Y%m%d%H")) * 10 + self.activities.index(activity)
        self.occurrences[number] = (activity, start)
        return number

    def _status(self, activity: str, start: datetime) -> str | None:
        if not self.window_open():
            return None
        return "BOOK" if self.is_free(activity, start, 60) else "FULL"

    def _item(self, activity: str, start: datetime) -> dict[str, Any]:
        end = start + timedelta(hours=1)
        status = self._status(activity, start)
        return {
            "id": self._occurrence_id(activity, start),
            "starts_at": {
                "format_12_hour": start.strftime("%I:%M%p").lower(),
                "format_24_hour": f"{start:%H:%M}",
            },
            "ends_at": {
                "format_12_hour": end.strftime("%I:%M%p").lower(),
                "format_24_hour": f"{end:%H:%M}",
            },
            "action_to_show": {"status": status, "reason": None},
            "spaces_remaining": 1 if status == "BOOK" else 0,
            "composite_key": _secrets.token_hex(4),
            "venue_slug": VENUE,
            "date": f"{start:%Y-%m-%d}",
        }

    def times(self, request: Recorded, venue: str, activity: str) -> Answer:
        if not self._authorized(request):
            return self._unauthorized()
        if venue != VENUE or activity not in self.activities:
            return json_answer(404, {"message": "Not found"})
        day_text = request.arg("date") or ""
        if not _DATE.fullmatch(day_text):
            return json_answer(400, {"message": "The date must be a date in the format Y-m-d."})
        day = date.fromisoformat(day_text)
        if day in self.unreleased:
            return json_answer(422, {"message": "Slots are not yet available for this date"})
        with self._lock:
            data = [
                self._item(activity, datetime(day.year, day.month, day.day, hour, tzinfo=self.zone))
                for hour in range(7, 22)
            ]
        return json_answer(200, {"data": data})

    def occurrence(self, request: Recorded, occurrence: str) -> Answer:
        if not self._authorized(request):
            return self._unauthorized()
        if int(occurrence) not in self.occurrences:
            return json_answer(404, {"message": "Not found"})
        number = int(occurrence)
        ticket = {"id": number * 3, "pricing_option": {"id": number * 7}}
        return json_answer(200, {"data": {"id": number, "tickets": [ticket]}})

    def cart_add(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = request.json()
            (item,) = body["items"]
            number = int(item["id"])
            fits = (
                item["type"] == "purchasableOccurrence"
                and item["ticket_id"] == number * 3
                and item["pricing_option_id"] == number * 7
                and body["membership_user_id"] == MEMBER_ID
            )
        except (ValueError, KeyError, TypeError):
            return json_answer(422, {"message": "The given data was invalid."})
        if not fits or number not in self.occurrences:
            return json_answer(422, {"message": "The given data was invalid."})
        activity, start = self.occurrences[number]
        if not self.window_open():
            return json_answer(409, {"message": TRY_AGAIN})
        if not self.is_free(activity, start, 60):
            return json_answer(409, {"message": "This session is full"})
        price = 850 if activity in self.paid else 0
        item_hash = _secrets.token_hex(16)
        booking = self.add_booking(
            id=str(number),
            court=activity,
            start=start,
            minutes=60,
            user=str(USER_ID),
            status="PENDING",
        )
        with self._lock:
            self.cart = {"hash": item_hash, "total": price, "booking": booking}
        item = {"id": number + 1, "name": activity, "price": {"raw": price}}
        return json_answer(
            200,
            {
                "data": {"items": [item]},
                "items": [item],
                "itemHash": item_hash,
                "total": price / 100,
            },
        )

    def complete(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = request.json()
            item_hash, payments = body["item_hash"], body["payments"]
        except (ValueError, KeyError, TypeError):
            return json_answer(422, {"message": "The given data was invalid."})
        cart = self.cart
        if cart is None or item_hash != cart["hash"] or body.get("terms") != [1]:
            return json_answer(422, {"message": "Your basket has changed."})
        if cart["total"] and not payments:
            return json_answer(422, {"message": "A payment is required."})
        cart["booking"].status = "CONFIRMED"
        with self._lock:
            self.cart = None
        return json_answer(
            200, {"data": {"booking_reference": f"BET-{_secrets.token_hex(4).upper()}"}}
        )
