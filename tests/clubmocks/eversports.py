"""Eversports (``www.eversports.de``), as its public client books a class or training session.

Source (read, not copied): ``gerrited/Automate-Eversports-Bookings``
``backend/eversports/client.py`` (2026) and ``backend/eversports/classify.py``: a ``GET /``
first (the session's cookies), then every call is a GraphQL ``POST /api/checkout`` with
``{"operationName", "query", "variables"}`` and the session's cookies (the answer's ``apiToken``
is not used): ``LoginCredentialLogin`` (``credentialLogin(params: {origin:
"ORIGIN_MARKETPLACE", region, ...}, credentials: {email, password})``, answering an
``AuthResult`` with ``user.id`` or ``ExpectedErrors``);
``UseCartCreationHandlerCreateCartFromEventBookableItem``
(``createCartFromEventBookableItem(bookableItemId, origin, clientMetadata)``: a ``Cart`` with its
``id``, or ``ExpectedErrors`` whose messages say "already"/"bereits" (booked before) or "fully
booked"/"ausgebucht"/"sold out"/"no spots" (full)); ``SummaryButtonCreateOrderFromCart``
(``createOrderFromCart(cartId, skipSetupFutureUsage: true)``: an ``Order``, or for a free session
an ``ExpectedErrors`` about the missing product, the booking being complete at the cart). Errors
of GraphQL itself come as a top-level ``errors`` list, which the client answers by logging in
again. A second public client (``mbreckner/eversports_booking``) drives a browser and shows no
HTTP call.

The home page, ``GET /``, is also the ready flow's ``clock`` (its ``Date``).
Not shown by public code (the mock's own): the cookie names, the texts of a wrong password and
of a session not open for booking yet ("Booking is not possible yet"), and the ``UNAUTHENTICATED``
code of an expired session.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, cookie, json_answer, text_answer

SESSION_COOKIE = "et"
VISITOR_COOKIE = "ev_visitor"
USER_ID = "8f2c9a41-3b6e-4c1d-9a7e-0d5b6c7e8f90"
ORIGIN = "ORIGIN_MARKETPLACE"
OPERATIONS = {
    "LoginCredentialLogin": "credentialLogin",
    "UseCartCreationHandlerCreateCartFromEventBookableItem": "createCartFromEventBookableItem",
    "SummaryButtonCreateOrderFromCart": "createOrderFromCart",
}


def _data(field: str, payload: dict[str, Any], headers: list[tuple[str, str]] | None = None):
    return json_answer(200, {"data": {field: payload}}, headers)


def _expected(field: str, *messages: str) -> Answer:
    errors = [
        {"id": f"error-{n}", "message": message, "__typename": "ExpectedError"}
        for n, message in enumerate(messages, 1)
    ]
    return _data(field, {"errors": errors, "__typename": "ExpectedErrors"})


class EversportsMock(ClubMock):
    """Eversports. ``add_item(item_id, start)`` publishes a class session whose bookable item id
    is what the user puts in ``court_id``; ``take(item_id, start)`` makes it fully booked."""

    system = "eversports"
    hosts = ("www.eversports.de",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/", "home"),
        ("POST", r"/api/checkout", "graphql"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.items: dict[str, dict[str, Any]] = {}
        self.carts: dict[str, str] = {}  # cart id -> booking id

    def tokens_entry(self) -> dict[str, str]:
        return {"email": self.email, "password": self.password}

    def add_item(self, item_id: str, start: datetime, name: str = "Padel Drill", minutes: int = 60):
        with self._lock:
            self.items[item_id] = {"start": start, "name": name, "minutes": minutes}

    def home(self, request: Recorded) -> Answer:
        page = "<!DOCTYPE html><html><head><title>Eversports</title></head><body></body></html>"
        return text_answer(200, page, headers=[cookie(VISITOR_COOKIE, secrets.token_hex(8))])

    def graphql(self, request: Recorded) -> Answer:
        if request.content_type() != "application/json":
            return json_answer(400, {"errors": [{"message": "POST body missing."}]})
        try:
            body = request.json()
            operation, query = body["operationName"], body["query"]
            variables = body.get("variables") or {}
        except (ValueError, KeyError, TypeError):
            return json_answer(400, {"errors": [{"message": "Must provide query string."}]})
        if "{{" in query or "}}" in query:
            return json_answer(400, {"errors": [{"message": 'Syntax Error: Unexpected "{".'}]})
        field = OPERATIONS.get(operation)
        if field is None or field not in query:
            return json_answer(400, {"errors": [{"message": f"Unknown operation {operation!r}."}]})
        if field == "credentialLogin":
            return self._login(variables)
        state, session = self.session_state(request.cookies.get(SESSION_COOKIE))
        if state != "ok" or session is None:
            return json_answer(
                200,
                {
                    "errors": [
                        {"message": "Not authenticated", "extensions": {"code": "UNAUTHENTICATED"}}
                    ],
                    "data": None,
                },
            )
        if field == "createCartFromEventBookableItem":
            return self._cart(variables)
        return self._order(variables)

    def _login(self, variables: dict[str, Any]) -> Answer:
        credentials = variables.get("credentials") or {}
        params = variables.get("params") or {}
        if params.get("origin") != ORIGIN:
            return _expected("credentialLogin", "Invalid origin.")
        if not self.credentials_ok(credentials.get("email"), credentials.get("password")):
            return _expected("credentialLogin", "The email or password is incorrect.")
        sid = self.new_session(USER_ID)
        result = {
            "apiToken": secrets.token_hex(16),
            "user": {"id": USER_ID, "profilePicture": None, "__typename": "User"},
            "__typename": "AuthResult",
        }
        return _data("credentialLogin", result, [cookie(SESSION_COOKIE, sid)])

    def _cart(self, variables: dict[str, Any]) -> Answer:
        field = "createCartFromEventBookableItem"
        item_id = variables.get("bookableItemId")
        if variables.get("origin") != ORIGIN:
            return _expected(field, "Invalid origin.")
        item = self.items.get(str(item_id)) if isinstance(item_id, str) else None
        if item is None:
            return _expected(field, "This offer could not be found.")
        if any(b.court == item_id and b.status != "CANCELED" for b in self.bookings):
            return _expected(field, "You are already booked for this session.")
        if not self.window_open():
            return _expected(field, "Booking is not possible yet.")
        if not self.is_free(item_id, item["start"], item["minutes"]):
            return _expected(field, "This session is fully booked.")
        booking = self.add_booking(
            id=f"booking-{len(self.bookings) + 1}",
            court=item_id,
            start=item["start"],
            minutes=item["minutes"],
            user=USER_ID,
            status="PENDING",
        )
        cart_id = f"cart-{secrets.token_hex(6)}"
        self.carts[cart_id] = booking.id
        return _data(field, {"id": cart_id, "__typename": "Cart"})

    def _order(self, variables: dict[str, Any]) -> Answer:
        field = "createOrderFromCart"
        booking_id = self.carts.get(str(variables.get("cartId")))
        booking = self.find_booking(booking_id) if booking_id else None
        if booking is None:
            return _expected(field, "The cart could not be found.")
        booking.status = "CONFIRMED"
        return _data(field, {"id": f"order-{booking.id}", "__typename": "Order"})
