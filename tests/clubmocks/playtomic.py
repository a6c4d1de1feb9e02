"""Playtomic (api.playtomic.io), as its public clients drive it.

Sources (read, not copied):
- ``tsologub/go-playtomic-api`` ``client/auth.go`` (login/token answer: ``access_token``,
  ``access_token_expiration`` as ``YYYY-MM-DDTHH:MM:SS`` UTC, ``refresh_token``, ``user_id``),
  ``client/errors.go`` (error bodies ``{"status": ..., "localized_message": ...}``),
  ``models/availability.go`` (``/v1/availability``: ``resource_id``, ``start_date``, ``slots`` with
  ``start_time`` ``HH:MM:SS`` UTC, ``duration`` minutes, ``price``);
- ``cryptX-trading/Playtomic_booker`` ``api/playtomic_client.py`` (availability query);
- public bots posting ``/v1/payment_intents`` (a ``CUSTOMER_MATCH`` cart: ``tenant_id``,
  ``resource_id``, ``start`` UTC ``YYYY-MM-DDTHH:MM:SS``, ``duration`` minutes,
  ``match_registrations``), then ``PATCH /v1/payment_intents/{id}`` with
  ``selected_payment_method_id`` from ``available_payment_methods``, then
  ``POST /v1/payment_intents/{id}/confirmation`` whose answer's ``status`` is ``SUCCEEDED``; one
  of them keeps a sample intent answer (``cart.item.cart_item_id`` = the match id). Those bots
  read a 409 on the payment intent as "not available" and retry it around the drop time: before
  the club opens the slot, Playtomic answers 409 exactly as for a taken slot.

Not shown by public code (the mock's own): the texts of the 401 and 409 bodies.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import (
    Answer,
    ClubMock,
    Recorded,
    iter_half_hours,
    json_answer,
    new_id,
)

TENANT_ID = "4f3a1c2e-8b7d-4e21-9a55-0c1d2e3f4a5b"
COURTS = ("0b9e3c1a-5d2f-4a6b-8c7d-1e2f3a4b5c6d", "7c8d9e0f-1a2b-4c3d-9e4f-5a6b7c8d9e0f")
USER_ID = "1234567"
DURATIONS = (60, 90, 120)
_UTC_SECONDS = "%Y-%m-%dT%H:%M:%S"


def _error(status: int, code: str, message: str) -> Answer:
    return json_answer(status, {"status": code, "localized_message": message})


class PlaytomicMock(ClubMock):
    """Playtomic. Courts are the tenant's ``resource_id``s (``COURTS``); the user's payment
    methods are ``CASH`` (pay at the club) and a card; ``token_ttl`` is the access token's life."""

    system = "playtomic"
    hosts = ("api.playtomic.io",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("POST", r"/v3/auth/login", "login"),
        ("GET", r"/v1/availability", "availability"),
        ("POST", r"/v1/payment_intents", "create_intent"),
        ("PATCH", r"/v1/payment_intents/(?P<intent>[^/]+)", "select_method"),
        ("POST", r"/v1/payment_intents/(?P<intent>[^/]+)/confirmation", "confirm"),
    )

    def __init__(self, *, token_ttl: float = 3600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tenant_id = TENANT_ID
        self.courts = COURTS
        self.user_id = USER_ID
        self.token_ttl = token_ttl
        self._intents: dict[str, dict[str, Any]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "tenant_id": self.tenant_id,
            "payment_method_type": "CASH",
        }

    # -- auth -------------------------------------------------------------------------------

    def login(self, request: Recorded) -> Answer:
        try:
            body = request.json()
        except ValueError:
            return _error(400, "BAD_REQUEST", "Malformed request body")
        if not isinstance(body, dict) or not self.credentials_ok(
            body.get("email"), body.get("password")
        ):
            return _error(401, "UNAUTHORIZED", "Invalid email or password")
        token = self.new_session(self.user_id, ttl=self.token_ttl)
        expires = datetime.fromtimestamp(self.now() + self.token_ttl, UTC)
        refresh_expires = expires + timedelta(days=60)
        return json_answer(
            200,
            {
                "access_token": token,
                "access_token_expiration": expires.strftime(_UTC_SECONDS),
                "refresh_token": self.new_session(self.user_id),
                "refresh_token_expiration": refresh_expires.strftime(_UTC_SECONDS),
                "user_id": self.user_id,
            },
        )

    def _authorized(self, request: Recorded) -> Answer | None:
        state, _ = self.session_state(request.bearer())
        if state == "ok":
            return None
        if state == "expired":
            return _error(401, "UNAUTHORIZED", "Access token expired")
        return _error(401, "UNAUTHORIZED", "Full authentication is required")

    # -- lookup -----------------------------------------------------------------------------

    def availability(self, request: Recorded) -> Answer:
        if request.arg("tenant_id") != self.tenant_id:
            return _error(400, "BAD_REQUEST", "tenant_id is required")
        low = request.arg("start_min") or request.arg("local_start_min")
        try:
            day = datetime.strptime(low or "", _UTC_SECONDS).replace(tzinfo=UTC)
        except ValueError:
            return _error(400, "BAD_REQUEST", "start_min must be YYYY-MM-DDTHH:MM:SS")
        answer = []
        for court in self.courts:
            slots = [
                {"start_time": start.strftime("%H:%M:%S"), "duration": minutes, "price": "24 EUR"}
                for start in iter_half_hours(day, 7, 22)
                for minutes in DURATIONS
                if self.is_free(court, start, minutes)
            ]
            answer.append(
                {"resource_id": court, "start_date": day.strftime("%Y-%m-%d"), "slots": slots}
            )
        return json_answer(200, answer)

    # -- booking ----------------------------------------------------------------------------

    def create_intent(self, request: Recorded) -> Answer:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        _, session = self.session_state(request.bearer())
        assert session is not None
        try:
            body = request.json()
            item = body["cart"]["requested_item"]
            data = item["cart_item_data"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "BAD_REQUEST", "Malformed cart")
        if body.get("user_id") not in (session.user, "me"):
            return _error(403, "FORBIDDEN", "user_id does not match the authenticated user")
        if item.get("cart_item_type") != "CUSTOMER_MATCH":
            return _error(400, "BAD_REQUEST", "Unsupported cart_item_type")
        if data.get("tenant_id") != self.tenant_id:
            return _error(404, "NOT_FOUND", "Tenant not found")
        court = data.get("resource_id")
        if court not in self.courts:
            return _error(404, "NOT_FOUND", "Resource not found")
        minutes = data.get("duration")
        if isinstance(minutes, bool) or minutes not in DURATIONS:
            return _error(400, "BAD_REQUEST", "Invalid duration")
        try:
            start = datetime.strptime(str(data.get("start")), _UTC_SECONDS).replace(tzinfo=UTC)
        except ValueError:
            return _error(400, "BAD_REQUEST", "start must be YYYY-MM-DDTHH:MM:SS")
        # Before the club opens the slot it is not on sale: the same 409 as a taken slot.
        if not self.window_open() or not self.is_free(court, start, minutes):
            return _error(409, "CONFLICT", "The selected slot is not available")
        intent_id = new_id()
        match_id = new_id()
        methods = [
            {"payment_method_id": "CASH", "name": "Pay at the club", "method_type": "CASH"},
            {
                "payment_method_id": f"CREDIT_CARD-STRIPE_{new_id()}",
                "name": "Pay with card **** 4242",
                "method_type": "CREDIT_CARD",
            },
        ]
        intent = {
            "payment_intent_id": intent_id,
            "user_id": session.user,
            "price": "24 EUR",
            "status": "REQUIRES_PAYMENT_METHOD",
            "available_payment_methods": methods,
            "selected_payment_method_id": None,
            "cart": {
                "item": {
                    "cart_item_id": match_id,
                    "cart_item_type": "CUSTOMER_MATCH",
                    "cart_item_tenant_id": self.tenant_id,
                    "cart_item_data": {
                        "match_id": match_id,
                        "reservation_id": new_id(),
                        "sport_id": "PADEL",
                        "start": start.strftime(_UTC_SECONDS),
                        "duration": minutes,
                        "resource_id": court,
                        "number_of_players": data.get("number_of_players", 4),
                    },
                },
                "price": "24 EUR",
            },
        }
        self._intents[intent_id] = intent
        # The slot is held (a temporal lock) from here: a second intent for it gets the 409.
        self.add_booking(
            id=match_id,
            court=court,
            start=start,
            minutes=minutes,
            user=session.user,
            status="PENDING",
            data={"payment_intent_id": intent_id},
        )
        return json_answer(200, intent)

    def _own_intent(self, request: Recorded, intent_id: str) -> Answer | dict[str, Any]:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        _, session = self.session_state(request.bearer())
        intent = self._intents.get(intent_id)
        if intent is None or session is None or intent["user_id"] != session.user:
            return _error(404, "NOT_FOUND", "Payment intent not found")
        return intent

    def select_method(self, request: Recorded, intent: str) -> Answer:
        found = self._own_intent(request, intent)
        if isinstance(found, Answer):
            return found
        try:
            chosen = request.json().get("selected_payment_method_id")
        except (ValueError, AttributeError):
            return _error(400, "BAD_REQUEST", "Malformed request body")
        offered = {m["payment_method_id"] for m in found["available_payment_methods"]}
        if chosen not in offered:
            return _error(400, "BAD_REQUEST", "Payment method not available")
        found["selected_payment_method_id"] = chosen
        return json_answer(200, found)

    def confirm(self, request: Recorded, intent: str) -> Answer:
        found = self._own_intent(request, intent)
        if isinstance(found, Answer):
            return found
        if found["selected_payment_method_id"] is None:
            return _error(400, "BAD_REQUEST", "No payment method selected")
        found["status"] = "SUCCEEDED"
        booking = self.find_booking(found["cart"]["item"]["cart_item_id"])
        if booking is not None:
            booking.status = "CONFIRMED"
        return json_answer(200, found)
