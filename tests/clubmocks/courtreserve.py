"""CourtReserve (app.courtreserve.com), as its public clients drive it.

Sources (read, not copied): a Python ``CourtReserveAdapter`` ("Interfaces with
app.courtreserve.com", in the code corpus): ``GET /Online/Account/Login/{org}`` carries the
ASP.NET ``__RequestVerificationToken`` in ``#loginForm``; ``POST`` there with
``UserNameOrEmail``, ``Password`` and the token redirects away from ``Account/Login`` on
success; the portal menu links ``Reservations/Bookings/{org}?sId={scheduler}``;
``GET /Online/Reservations/CreateReservationCourtsview/{org}?start=&end=&courtLabel=&
customSchedulerId=`` (``start``/``end`` as JavaScript ``Date.toString()``) returns the form
``#createReservation-Form`` with a fresh token and hidden ``CourtId``, ``MemberId``,
``MembershipId``; ``POST /Online/Reservations/CreateReservation/{org}`` (form: the token,
``OrgId``, ``MemberId``, ``Date`` ``MM/DD/YYYY 12:00:00 AM``, ``StartTime`` ``HH:MM:SS``,
``Duration``, ``CourtId``, ``MembershipId``, ``ReservationTypeId``, ``CustomSchedulerId``...)
answers JSON ``{"isValid": ...}``. ``pratikdevnani/courtreserve-booking`` (``webapp/lib/
courtreserve/api.ts``, ``types.ts``, ``book_court_sunnyvale.py``) confirms the ``isValid`` /
``message`` answer; a racing client (``bay_area_courtbot``) reads 401/403 as an expired login,
and in a 200 body "only allowed to reserve up to" (or "not yet open") as too early and "no
longer available" / "already reserved" as taken.

The anti-forgery messages and the 500 they come with are ASP.NET MVC's own. Not shown by public
code (the mock's own): the full wording around the quoted phrases, the auth cookie's name
(``.ASPXAUTH``), the wrong-password text and the answers to malformed forms.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

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

ORG_ID = "13234"
SCHEDULER_ID = "16994"
RESERVATION_TYPE_ID = "69707"
MEMBER_ID = "5550012"
MEMBERSHIP_ID = "77881"
COURTS = {"Court #1": "40001", "Court #2": "40002", "Court #3": "40003"}
DURATIONS = ("30", "60", "90", "120")
AF_COOKIE = "__RequestVerificationToken"
AUTH_COOKIE = ".ASPXAUTH"
EARLY_MESSAGE = "You are only allowed to reserve up to 7 days in advance."
TAKEN_MESSAGE = "Sorry, the court is no longer available at the selected time."

LOGIN_PAGE = """<!DOCTYPE html><html><head><title>Log In</title></head><body>
<div class="validation-summary-errors">{error}</div>
<form action="/Online/Account/Login/{org}" id="loginForm" method="post">\
<input name="__RequestVerificationToken" type="hidden" value="{token}" />
<input id="UserNameOrEmail" name="UserNameOrEmail" type="text" value="" />
<input id="Password" name="Password" type="password" />
<button type="submit">Log In</button></form></body></html>"""

PORTAL_PAGE = """<!DOCTYPE html><html><head><title>Portal</title></head><body>
<ul id="respMenu"><li><a href="/Online/Portal/Index/{org}">Home</a></li>
<li><a href="#">Reservations</a><ul>
<li><a href="/Online/Reservations/Bookings/{org}?sId={scheduler}">Book a Court</a></li>
</ul></li></ul></body></html>"""

FORM_PAGE = """<div class="modal-body">
<form action="/Online/Reservations/CreateReservation/{org}" id="createReservation-Form" \
method="post"><input name="__RequestVerificationToken" type="hidden" value="{token}" />
<input id="OrgId" name="OrgId" type="hidden" value="{org}" />
<input id="CourtId" name="CourtId" type="hidden" value="{court}" />
<input id="MemberId" name="MemberId" type="hidden" value="{member}" />
<input id="MembershipId" name="MembershipId" type="hidden" value="{membership}" />
<input id="StartTime" name="StartTime" type="hidden" value="{start_time}" />
<p class="confirm-message"></p></form></div>"""


def _antiforgery_error(message: str) -> Answer:
    return text_answer(500, f"<html><body><h2>Server Error</h2><p>{message}</p></body></html>")


class CourtReserveMock(ClubMock):
    """CourtReserve. Courts are named by label (``COURTS``: what the user puts in ``court_id``);
    the org, scheduler and reservation type ids are what the user looks up once."""

    system = "courtreserve"
    hosts = ("app.courtreserve.com",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/Online/Account/Login/(?P<org>\d+)", "login_page"),
        ("POST", r"/Online/Account/Login/(?P<org>\d+)", "login"),
        ("GET", r"/Online/Portal/Index/(?P<org>\d+)", "portal"),
        ("GET", r"/Online/Reservations/CreateReservationCourtsview/(?P<org>\d+)", "form"),
        ("POST", r"/Online/Reservations/CreateReservation/(?P<org>\d+)", "book"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.org_id = ORG_ID
        self.scheduler_id = SCHEDULER_ID
        self.reservation_type_id = RESERVATION_TYPE_ID
        self.member_id = MEMBER_ID
        self.membership_id = MEMBERSHIP_ID
        self.courts = dict(COURTS)
        # form token -> (cookie token, user the form was rendered for)
        self._form_tokens: dict[str, tuple[str, str]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "org_id": self.org_id,
            "scheduler_id": self.scheduler_id,
            "reservation_type_id": self.reservation_type_id,
        }

    # -- anti-forgery (ASP.NET MVC): a cookie token paired with a form token per user ------------

    def _issue_token(self, request: Recorded, user: str) -> tuple[str, list[tuple[str, str]]]:
        headers = []
        cookie_token = request.cookies.get(AF_COOKIE)
        if not cookie_token:
            cookie_token = secrets.token_urlsafe(24)
            headers.append(cookie(AF_COOKIE, cookie_token))
        form_token = secrets.token_urlsafe(48)
        with self._lock:
            self._form_tokens[form_token] = (cookie_token, user)
        return form_token, headers

    def _check_token(self, request: Recorded, form: dict[str, str], user: str) -> Answer | None:
        cookie_token = request.cookies.get(AF_COOKIE)
        if not cookie_token:
            return _antiforgery_error(
                f'The required anti-forgery cookie "{AF_COOKIE}" is not present.'
            )
        form_token = form.get(AF_COOKIE)
        if not form_token:
            return _antiforgery_error(
                f'The required anti-forgery form field "{AF_COOKIE}" is not present.'
            )
        paired = self._form_tokens.get(form_token)
        if paired is None or paired[0] != cookie_token:
            return _antiforgery_error(
                "The anti-forgery cookie token and form field token do not match."
            )
        if paired[1] != user:
            return _antiforgery_error(
                "The provided anti-forgery token was meant for a different claims-based user "
                "than the current user."
            )
        return None

    # -- pages ------------------------------------------------------------------------------

    def _member(self, request: Recorded) -> Session | None:
        state, session = self.session_state(request.cookies.get(AUTH_COOKIE))
        return session if state == "ok" else None

    def _login_required(self, request: Recorded, org: str) -> Answer:
        if request.header("x-requested-with") == "XMLHttpRequest":
            return text_answer(401, "", None)
        back = quote(request.path, safe="")
        return redirect(f"/Online/Account/Login/{org}?ReturnUrl={back}")

    def login_page(self, request: Recorded, org: str, error: str = "") -> Answer:
        if org != self.org_id:
            return text_answer(404, "Organization not found")
        token, headers = self._issue_token(request, "")
        page = LOGIN_PAGE.format(org=org, token=token, error=error)
        return text_answer(200, page, headers=headers)

    def login(self, request: Recorded, org: str) -> Answer:
        if org != self.org_id:
            return text_answer(404, "Organization not found")
        form = request.form()
        refused = self._check_token(request, form, "")
        if refused is not None:
            return refused
        if not self.credentials_ok(form.get("UserNameOrEmail"), form.get("Password")):
            return self.login_page(
                request, org, error="The user name or password provided is incorrect."
            )
        ticket = self.new_session(self.member_id, ttl=12 * 3600)
        return redirect(f"/Online/Portal/Index/{org}", [cookie(AUTH_COOKIE, ticket)])

    def portal(self, request: Recorded, org: str) -> Answer:
        if self._member(request) is None:
            return self._login_required(request, org)
        return text_answer(200, PORTAL_PAGE.format(org=org, scheduler=self.scheduler_id))

    def form(self, request: Recorded, org: str) -> Answer:
        session = self._member(request)
        if session is None:
            return self._login_required(request, org)
        if org != self.org_id or request.arg("customSchedulerId") != self.scheduler_id:
            return text_answer(400, "Invalid scheduler.")
        court = self.courts.get(request.arg("courtLabel") or "")
        start = _js_date(request.arg("start"))
        if court is None or start is None or _js_date(request.arg("end")) is None:
            return text_answer(400, "Invalid court or time.")
        token, headers = self._issue_token(request, session.user)
        page = FORM_PAGE.format(
            org=org,
            token=token,
            court=court,
            member=self.member_id,
            membership=self.membership_id,
            start_time=f"{self.local(start):%H:%M:%S}",
        )
        return text_answer(200, page, headers=headers)

    def book(self, request: Recorded, org: str) -> Answer:
        session = self._member(request)
        if session is None:
            return self._login_required(request, org)
        form = request.form()
        refused = self._check_token(request, form, session.user)
        if refused is not None:
            return refused
        problem = self._invalid(org, form)
        if problem:
            return json_answer(200, {"isValid": False, "message": problem})
        day = datetime.strptime(form["Date"], "%m/%d/%Y %I:%M:%S %p")
        clock = datetime.strptime(form["StartTime"], "%H:%M:%S")
        start = day.replace(hour=clock.hour, minute=clock.minute, tzinfo=self.zone)
        minutes = int(form["Duration"])
        if not self.window_open():
            return json_answer(200, {"isValid": False, "message": EARLY_MESSAGE})
        court = form["CourtId"]
        if not self.is_free(court, start, minutes):
            return json_answer(200, {"isValid": False, "message": TAKEN_MESSAGE})
        self.add_booking(
            id=str(880000 + len(self.bookings) + 1),
            court=court,
            start=start,
            minutes=minutes,
            user=session.user,
            status="CONFIRMED",
        )
        return json_answer(200, {"isValid": True, "message": "Reservation has been created."})

    def _invalid(self, org: str, form: dict[str, str]) -> str | None:
        expected = {
            "OrgId": self.org_id,
            "MemberId": self.member_id,
            "MembershipId": self.membership_id,
            "ReservationTypeId": self.reservation_type_id,
            "CustomSchedulerId": self.scheduler_id,
        }
        if org != self.org_id:
            return "Organization not found."
        for key, value in expected.items():
            if form.get(key) != value:
                return f"The {key} field is invalid."
        if form.get("CourtId") not in self.courts.values():
            return "The CourtId field is invalid."
        if form.get("Duration") not in DURATIONS:
            return "The Duration field is invalid."
        try:
            day = datetime.strptime(form.get("Date", ""), "%m/%d/%Y %I:%M:%S %p")
            datetime.strptime(form.get("StartTime", ""), "%H:%M:%S")
        except ValueError:
            return "The Date field is invalid."
        if (day.hour, day.minute) != (0, 0):
            return "The Date field is invalid."
        return None


def _js_date(text: str | None) -> datetime | None:
    """``Sat Aug 09 2025 18:00:00 GMT+0200`` (a JavaScript ``Date.toString()``, with or without
    the zone's name in parentheses) as an aware datetime, or None."""
    if not text:
        return None
    head = text.split(" (", 1)[0].strip()
    try:
        return datetime.strptime(head, "%a %b %d %Y %H:%M:%S GMT%z")
    except ValueError:
        return None
