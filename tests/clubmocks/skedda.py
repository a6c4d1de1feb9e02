"""Skedda (``app.skedda.com`` for the sign-in, ``<venue>.skedda.com`` for the venue), as its
public clients drive it.

Sources (read, not copied):
- ``DKorytkin/ha-skedda-integration`` ``custom_components/skedda_scheduler/api/endpoints.py``
  and ``api/client.py`` (confirmed from live traffic 2026-09-15): ``GET /account/login`` on
  ``app.skedda.com`` issues the antiforgery token in a hidden ``__RequestVerificationToken``
  input; ``POST /logins`` (JSON ``{"login": {"username", "password", "rememberMe",
  "redirectUrl", "arbitraryerrors"}}``) with the token in ``X-Skedda-RequestVerificationToken``
  signs in, and a wrong password comes back as a 422 with an ``errors`` envelope; the venue
  host is reached through a redirect chain the client follows, and issues its own token in its
  pages (the sign-in host's is not accepted there); ``GET
  /webs`` gives ``venue[0].id``, ``venueusers[0].id`` and ``assets`` (the spaces) and answers 422
  while the venue session has not taken effect; ``POST /bookings`` with ``{"booking": {"spaces":
  [string ids], "start", "end" (naive venue-local ``YYYY-MM-DDTHH:MM:SS``), "venue",
  "venueuser", ...}}`` books (200); every rule violation is a 422 whose ``errors[].detail`` is
  HTML: a conflict says "conflicts with one already scheduled" / "conflicting bookings are not
  allowed", a booking beyond the window carries ``data-var="duration-days"``, the weekly quota
  ``period-start``/``period-end``/``time-value``; 401 is an expired sign-in;
  ``DELETE /bookings/{id}`` cancels (204, no body), sent as every venue request with the
  venue's antiforgery token (``client.py`` ``cancel_booking``).
- ``ayushsinghvi/skedda-booker`` ``booker.py`` (2026-07): the same ``/logins`` body and header,
  then ``POST /account/applogin`` (a form, 302) to set the auth cookies, the token scraped from
  the venue's ``/booking`` page, ``/webs``, and the same booking body with ``"price": 0``,
  ``"type": 1``, ``"lockInMargin": 12``, string ``spaces``, ``venue`` and ``venueuser``; it reads
  the conflict texts the same way.

The sign-in page, ``GET /account/login``, is also the ready flow's ``clock`` (its ``Date``).
Not shown by public code (the mock's own): the answer to a request without the antiforgery token
(400, as ASP.NET Core's antiforgery filter answers), the auth cookie's name, the steps of the
venue's redirect chain (one hop through ``/account/venuelogin``), the exact wording
around the quoted phrases, and the booking answer's envelope (``{"booking": {...}}``; the
integration accepts it with or without one), and the answer to a cancel of an id the venue does
not hold (404, as ASP.NET Core answers an unknown resource).
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import (
    Answer,
    ClubMock,
    Recorded,
    Session,
    cookie,
    json_answer,
    redirect,
    text_answer,
)

VENUE_ID = "51234"
VENUEUSER_ID = "998877"
SPACES = ("1399963", "1399964")
AUTH_COOKIE = "X-Skedda-Auth"
ANTIFORGERY_COOKIE = ".AspNetCore.Antiforgery.skedda"
TOKEN_HEADER = "X-Skedda-RequestVerificationToken"
WINDOW_DAYS = 7
_LOCAL = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")

PAGE = """<!DOCTYPE html><html><head><title>{title}</title></head><body>
<form method="post"><input name="__RequestVerificationToken" type="hidden" value="{token}">
</form></body></html>"""


def _errors(*details: str) -> Answer:
    return json_answer(422, {"errors": [{"detail": detail} for detail in details]})


class SkeddaMock(ClubMock):
    """Skedda. Spaces are ``SPACES`` (what the user puts in ``court_id``); the venue's window
    (``opens_at``) is answered as Skedda's "up to N days in advance" rule."""

    system = "skedda"
    hosts = ("app.skedda.com", "yourclub.skedda.com")
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/account/login", "login_page"),
        ("POST", r"/logins", "login"),
        ("GET", r"/", "venue_page"),
        ("GET", r"/booking", "venue_page"),
        ("GET", r"/account/venuelogin", "venue_login"),
        ("GET", r"/webs", "webs"),
        ("POST", r"/bookings", "book"),
        ("DELETE", r"/bookings/(?P<booking>[^/]+)", "cancel"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spaces = SPACES
        #: antiforgery cookie value -> the token issued with it
        self._forms: dict[str, set[str]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {"email": self.email, "password": self.password}

    # -- antiforgery ----------------------------------------------------------------------------

    def _page(self, request: Recorded, title: str, session: Session | None = None) -> Answer:
        headers = []
        key = request.cookies.get(ANTIFORGERY_COOKIE)
        if key not in self._forms:
            key = secrets.token_hex(12)
            self._forms[key] = set()
            headers.append(cookie(ANTIFORGERY_COOKIE, key))
        token = secrets.token_urlsafe(24)
        self._forms[key].add(token)
        if session is not None:
            session.data.setdefault("venue_tokens", set()).add(token)
        return text_answer(200, PAGE.format(title=title, token=token), headers=headers)

    def _token_ok(self, request: Recorded) -> bool:
        key = request.cookies.get(ANTIFORGERY_COOKIE)
        return request.header(TOKEN_HEADER) in self._forms.get(key or "", set())

    def _session(self, request: Recorded) -> tuple[str, Session | None]:
        return self.session_state(request.cookies.get(AUTH_COOKIE))

    # -- sign-in --------------------------------------------------------------------------------

    def login_page(self, request: Recorded) -> Answer:
        return self._page(request, "Log in - Skedda")

    def login(self, request: Recorded) -> Answer:
        if not self._token_ok(request):
            return text_answer(400, "", None)
        try:
            body = request.json()["login"]
        except (ValueError, KeyError, TypeError):
            return _errors("The request is invalid.")
        if not self.credentials_ok(body.get("username"), body.get("password")):
            return _errors("The username or password you entered is incorrect.")
        sid = self.new_session(self.email)
        return json_answer(200, {"login": {"username": self.email}}, [cookie(AUTH_COOKIE, sid)])

    # -- the venue ------------------------------------------------------------------------------

    def venue_page(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        if state != "ok" or session is None:
            return redirect("/account/login?returnUrl=%2F")
        if not session.data.get("venue"):
            # The venue is reached through a redirect chain that starts its own session.
            return redirect(f"/account/venuelogin?returnUrl={request.path.replace('/', '%2F')}")
        return self._page(request, "Booking - Skedda", session)

    def venue_login(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        if state != "ok" or session is None:
            return redirect("/account/login")
        session.data["venue"] = True
        return redirect(request.arg("returnUrl") or "/")

    def _venue_token_ok(self, request: Recorded, session: Session) -> bool:
        tokens = session.data.get("venue_tokens", set())
        return bool(session.data.get("venue")) and request.header(TOKEN_HEADER) in tokens

    def webs(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        if state != "ok" or session is None:
            return _errors("Your session has not started.")
        if not self._venue_token_ok(request, session):
            return text_answer(400, "", None)
        assets = [{"id": space, "name": f"Tennis Court {n}"} for n, space in enumerate(SPACES, 1)]
        return json_answer(
            200,
            {
                "venue": [{"id": VENUE_ID, "timeZoneId": str(self.zone)}],
                "venueusers": [{"id": VENUEUSER_ID}],
                "assets": assets,
            },
        )

    def book(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        if state != "ok" or session is None:
            return json_answer(401, {"errors": [{"detail": "Please sign in again."}]})
        if not self._venue_token_ok(request, session):
            return text_answer(400, "", None)
        try:
            booking = request.json()["booking"]
            start, end, spaces = booking["start"], booking["end"], booking["spaces"]
        except (ValueError, KeyError, TypeError):
            return _errors("The booking is invalid.")
        problem = self._invalid(booking, start, end, spaces)
        if problem:
            return _errors(problem)
        begin = datetime.fromisoformat(start).replace(tzinfo=self.zone)
        minutes = int((datetime.fromisoformat(end) - datetime.fromisoformat(start)).seconds / 60)
        if not self.window_open():
            return _errors(
                'Bookings can be made up to <var data-var="duration-days">'
                f"{WINDOW_DAYS}</var> days in advance."
            )
        space = spaces[0]
        if not self.is_free(space, begin, minutes):
            return _errors(
                f"This booking conflicts with one already scheduled on {begin:%A, %B %d, %Y}, "
                f"{begin:%I:%M %p} (Tennis Court). Conflicting bookings are not allowed."
            )
        made = self.add_booking(
            id=str(700000 + len(self.bookings) + 1),
            court=space,
            start=begin,
            minutes=minutes,
            user=VENUEUSER_ID,
            status="CONFIRMED",
        )
        return json_answer(
            200, {"booking": {"id": made.id, "start": start, "end": end, "spaces": [space]}}
        )

    def _invalid(self, booking: dict[str, Any], start: Any, end: Any, spaces: Any) -> str | None:
        if not isinstance(start, str) or not isinstance(end, str):
            return "The start and end are required."
        if not _LOCAL.fullmatch(start) or not _LOCAL.fullmatch(end):
            return "The start or end is not a valid date."
        if datetime.fromisoformat(end) - datetime.fromisoformat(start) < timedelta(minutes=15):
            return "The end must be after the start."
        if not isinstance(spaces, list) or len(spaces) != 1 or spaces[0] not in SPACES:
            return "Select a space."
        if booking.get("venue") != VENUE_ID or booking.get("venueuser") != VENUEUSER_ID:
            return "You do not have permission to book at this venue."
        return None

    def cancel(self, request: Recorded, booking: str) -> Answer:
        state, session = self._session(request)
        if state != "ok" or session is None:
            return json_answer(401, {"errors": [{"detail": "Please sign in again."}]})
        if not self._venue_token_ok(request, session):
            return text_answer(400, "", None)
        found = self.find_booking(booking)
        if found is None or found.status == "CANCELED":
            return json_answer(404, {"errors": [{"detail": "Not found."}]})
        found.status = "CANCELED"
        return Answer(204, b"", None)
