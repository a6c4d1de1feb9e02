"""CourtReserve (app.courtreserve.com and reservations.courtreserve.com), as its member portal
books a court since 2024, built from these public clients (read, not copied):

- ``pratikdevnani/courtreserve-booking`` ``webapp/lib/courtreserve/api.ts``, ``types.ts``,
  ``time-utils.ts`` (2026-02-05): ``GET /Online/Account/LogIn/{org}`` to start the session;
  ``POST /Online/Account/Login?id={org}`` with JSON ``{"IsApiCall": true, "UserNameOrEmail",
  "Password"}`` (header ``reactsubmit: true``) answering ``{"IsValid": ..., "Message": ...}``;
  the reservation wrapper page that holds only ``url: fixUrl('...CreateReservation...')``; the
  form behind that link, whose hidden inputs (``__RequestVerificationToken`` and the rest) it
  posts back with ``ReservationTypeId``, ``Duration``, ``CourtId``, ``StartTime`` to
  ``reservations.courtreserve.com/Online/ReservationsApi/CreateReservation/{org}?uiCulture=en-US``
  with ``X-Requested-With: XMLHttpRequest``, answering ``{"isValid": ..., "message": ...}``;
  "only allowed to reserve up to" when the window is not open; dates ``MM/DD/YYYY``.
- ``GomeniucIvan/CourtReservePortal`` ``src/pages/portal/account/login/Login.Authorize.jsx``,
  ``src/services/portal/reservation/reservationServices.js`` (2025-04-11): the same login
  (``IsValid``, ``Message``, ``Data.RequestData``) and ``ReservationsApi/CreateReservation``.
- public scripts found by searching GitHub code for ``ReservationsApi/CreateReservation``
  (2024-2026): ``CreateReservationCourtsView/{org}?start&end&customSchedulerId`` (XHR) whose
  answer carries the form's ``requestData`` token; the form GET with ``requestData``; the
  booking form's ``Date`` (``M/D/YYYY 12:00:00 AM`` for en-US, ``YYYY-MM-DD`` for en-CA),
  ``StartTime`` ``HH:MM:SS``, ``RequestData``, ``DisclosureAgree``; the
  ``.AspNet.ApplicationCookie`` set by the login; "Sorry, no available courts for the time
  requested." for a taken court (seen live, 2026-06).

The anti-forgery messages and the 500 they come with are ASP.NET MVC's own. Not shown by public
code (the mock's own): the wrong-password message, the answer to a booking without
``X-Requested-With`` (400), to a stale or foreign ``RequestData`` (isValid false), to a form
opened without a valid ``requestData`` (a page without the form), that the login needs the
session cookie of the login page, and the wording around the quoted phrases.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from html import escape
from typing import Any, ClassVar
from urllib.parse import quote

from clubmocks.base import (
    Answer,
    ClubMock,
    Recorded,
    Session,
    cookie,
    json_answer,
    text_answer,
)

ORG_ID = "13234"
SCHEDULER_ID = "16994"
RESERVATION_TYPE_ID = "69707"
MEMBER_ID = "5550012"
MEMBERSHIP_ID = "77881"
COURTS = ("40001", "40002", "40003")
DURATIONS = ("30", "60", "90", "120")
SESSION_COOKIE = "ASP.NET_SessionId"
AF_COOKIE = "__RequestVerificationToken"
AUTH_COOKIE = ".AspNet.ApplicationCookie"
EARLY_MESSAGE = "You are only allowed to reserve up to 7 days in advance."
TAKEN_MESSAGE = "Sorry, no available courts for the time requested."
WRONG_LOGIN = "Invalid email/username or password."
#: How each uiCulture writes the booking's Date.
DATE_FORMATS = {"en-US": "%m/%d/%Y %I:%M:%S %p", "en-CA": "%Y-%m-%d %I:%M:%S %p"}
_SLOT_FORMAT = "%m/%d/%Y %I:%M:%S %p"

LOGIN_PAGE = """<!DOCTYPE html><html><head><title>Log In</title></head><body>
<div id="root" data-org="{org}"></div><script src="/bundles/login.js"></script></body></html>"""

COURTS_VIEW = """<div class="modal-content"><div id="createReservationModal"></div>
<script>
$.ajax({{
    url: fixUrl('https://reservations.courtreserve.com/Online/ReservationsApi/CreateReservation\
?id={org}&amp;uiCulture=en-US&amp;start={start}&amp;end={end}&amp;customSchedulerId={scheduler}\
&amp;requestData={request_data}'),
    type: 'GET',
    success: function (html) {{ $('#createReservationModal').html(html); }}
}});
</script></div>"""

FORM_PAGE = """<form action="https://reservations.courtreserve.com//Online/ReservationsApi/\
CreateReservation/{org}?uiCulture=en-US" id="createReservation-Form" method="post">\
<input name="__RequestVerificationToken" type="hidden" value="{token}" />
<input id="Id" name="Id" type="hidden" value="{org}" />
<input id="OrgId" name="OrgId" type="hidden" value="{org}" />
<input id="MemberId" name="MemberId" type="hidden" value="{member}" />
<input id="MembershipId" name="MembershipId" type="hidden" value="{membership}" />
<input id="CustomSchedulerId" name="CustomSchedulerId" type="hidden" value="{scheduler}" />
<input id="Date" name="Date" type="hidden" value="{date}" />
<input id="RequestData" name="RequestData" type="hidden" value="{request_data}" />
<input id="ReservationLotteryGuid" name="ReservationLotteryGuid" type="hidden" value="{guid}" />
<input id="DisclosureAgree" name="DisclosureAgree" type="checkbox" value="true" />
</form>"""

ERROR_FRAGMENT = """<div class="error-inner"><h4>Something went wrong</h4>
<p>Your session has expired or the page is out of date. Please refresh the page.</p></div>"""


def _antiforgery_error(message: str) -> Answer:
    return text_answer(
        500,
        f"<html><head><title>{message}</title></head><body><h2>Server Error in '/' "
        f"Application.</h2><p>{message}</p></body></html>",
    )


def _slot_time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text or "", _SLOT_FORMAT)
    except ValueError:
        return None


class CourtReserveMock(ClubMock):
    """CourtReserve. Courts are named by their ``CourtId`` (``COURTS``: what the user puts in
    ``court_id``); the org, scheduler and reservation type ids are what the user looks up once.
    Both hosts are served by this one server (the flow's URLs are pointed at it)."""

    system = "courtreserve"
    hosts = ("app.courtreserve.com", "reservations.courtreserve.com")
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/Online/Account/LogIn/(?P<org>\d+)", "login_page"),
        ("POST", r"/Online/Account/Login", "login"),
        ("GET", r"/Online/Reservations/CreateReservationCourtsView/(?P<org>\d+)", "courts_view"),
        ("GET", r"/Online/ReservationsApi/CreateReservation", "form"),
        ("POST", r"/Online/ReservationsApi/CreateReservation/(?P<org>\d+)", "book"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.org_id = ORG_ID
        self.scheduler_id = SCHEDULER_ID
        self.reservation_type_id = RESERVATION_TYPE_ID
        self.member_id = MEMBER_ID
        self.membership_id = MEMBERSHIP_ID
        self.courts = COURTS
        # request-data token -> the user it was issued to
        self._request_data: dict[str, str] = {}
        # form token -> (anti-forgery cookie token, user)
        self._form_tokens: dict[str, tuple[str, str]] = {}
        self._page_sessions: set[str] = set()

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "org_id": self.org_id,
            "scheduler_id": self.scheduler_id,
            "reservation_type_id": self.reservation_type_id,
        }

    # -- sessions ---------------------------------------------------------------------------

    def _member(self, request: Recorded) -> Session | None:
        state, session = self.session_state(request.cookies.get(AUTH_COOKIE))
        return session if state == "ok" else None

    def _unauthorized(self) -> Answer:
        # An XHR without a login: 401 (a page would redirect to the login page).
        return text_answer(401, "", None)

    def login_page(self, request: Recorded, org: str) -> Answer:
        if org != self.org_id:
            return text_answer(404, "Organization not found")
        sid = request.cookies.get(SESSION_COOKIE) or secrets.token_hex(12)
        with self._lock:
            self._page_sessions.add(sid)
        return text_answer(200, LOGIN_PAGE.format(org=org), headers=[cookie(SESSION_COOKIE, sid)])

    def login(self, request: Recorded) -> Answer:
        if request.arg("id") != self.org_id:
            return json_answer(200, {"IsValid": False, "Message": "Organization not found."})
        if request.cookies.get(SESSION_COOKIE) not in self._page_sessions:
            return json_answer(
                200, {"IsValid": False, "Message": "Your session has expired. Please try again."}
            )
        try:
            body = request.json()
        except ValueError:
            return text_answer(400, "<html><head><title>Bad Request</title></head></html>")
        if not isinstance(body, dict) or not self.credentials_ok(
            body.get("UserNameOrEmail"), body.get("Password")
        ):
            return json_answer(200, {"IsValid": False, "Message": WRONG_LOGIN})
        ticket = self.new_session(self.member_id, ttl=12 * 3600)
        request_data = self._issue_request_data(self.member_id)
        return json_answer(
            200,
            {"IsValid": True, "Message": "", "Data": {"OrgId": int(self.org_id),
                                                      "RequestData": request_data}},
            [cookie(AUTH_COOKIE, ticket)],
        )  # fmt: skip

    def _issue_request_data(self, user: str) -> str:
        # 140 characters of base64 (+ / and a closing =): percent-encoded in a link.
        token = base64.b64encode(secrets.token_bytes(104)).decode()
        with self._lock:
            self._request_data[token] = user
        return token

    # -- the courts view, the form ------------------------------------------------------------

    def courts_view(self, request: Recorded, org: str) -> Answer:
        session = self._member(request)
        if session is None:
            return self._unauthorized()
        if request.header("x-requested-with") != "XMLHttpRequest":
            return text_answer(400, "<html><head><title>Bad Request</title></head></html>")
        start, end = _slot_time(request.arg("start")), _slot_time(request.arg("end"))
        if org != self.org_id or request.arg("customSchedulerId") != self.scheduler_id:
            return text_answer(400, "<html><head><title>Invalid scheduler</title></head></html>")
        if start is None or end is None or end <= start:
            return text_answer(400, "<html><head><title>Invalid time</title></head></html>")
        page = COURTS_VIEW.format(
            org=org,
            start=quote(request.arg("start") or "", safe=""),
            end=quote(request.arg("end") or "", safe=""),
            scheduler=self.scheduler_id,
            request_data=quote(self._issue_request_data(session.user), safe=""),
        )
        return text_answer(200, page)

    def form(self, request: Recorded) -> Answer:
        session = self._member(request)
        if session is None:
            return self._unauthorized()
        start = _slot_time(request.arg("start"))
        if request.arg("id") != self.org_id or start is None:
            return text_answer(400, "<html><head><title>Bad Request</title></head></html>")
        request_data = request.arg("requestData") or ""
        if self._request_data.get(request_data) != session.user:
            return text_answer(200, ERROR_FRAGMENT)
        cookie_token = request.cookies.get(AF_COOKIE) or secrets.token_urlsafe(24)
        headers = [] if AF_COOKIE in request.cookies else [cookie(AF_COOKIE, cookie_token)]
        form_token = secrets.token_urlsafe(48)
        with self._lock:
            self._form_tokens[form_token] = (cookie_token, session.user)
        page = FORM_PAGE.format(
            org=self.org_id,
            token=form_token,
            member=self.member_id,
            membership=self.membership_id,
            scheduler=self.scheduler_id,
            date=f"{start.month}/{start.day}/{start.year} 12:00:00 AM",
            request_data=escape(request_data),
            guid=secrets.token_hex(16),
        )
        return text_answer(200, page, headers=headers)

    # -- the booking ----------------------------------------------------------------------------

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

    def book(self, request: Recorded, org: str) -> Answer:
        session = self._member(request)
        if session is None:
            return self._unauthorized()
        if request.header("x-requested-with") != "XMLHttpRequest":
            return text_answer(400, "<html><head><title>Bad Request</title></head></html>")
        form = request.form()
        refused = self._check_token(request, form, session.user)
        if refused is not None:
            return refused
        if self._request_data.get(form.get("RequestData", "")) != session.user:
            return json_answer(
                200, {"isValid": False, "message": "Your session has expired. Please refresh."}
            )
        culture = request.arg("uiCulture") or "en-US"
        problem = self._invalid(org, form, DATE_FORMATS.get(culture, DATE_FORMATS["en-US"]))
        if problem:
            return json_answer(200, {"isValid": False, "message": problem})
        day = datetime.strptime(form["Date"], DATE_FORMATS.get(culture, DATE_FORMATS["en-US"]))
        clock = datetime.strptime(form["StartTime"], "%H:%M:%S")
        start = day.replace(hour=clock.hour, minute=clock.minute, tzinfo=self.zone)
        minutes = int(form["Duration"])
        if not self.window_open():
            return json_answer(200, {"isValid": False, "message": EARLY_MESSAGE})
        court = form["CourtId"]
        if not self.is_free(court, start, minutes):
            return json_answer(200, {"isValid": False, "message": TAKEN_MESSAGE})
        reservation = str(880000 + len(self.bookings) + 1)
        self.add_booking(
            id=reservation,
            court=court,
            start=start,
            minutes=minutes,
            user=session.user,
            status="CONFIRMED",
        )
        return json_answer(
            200, {"isValid": True, "message": "Reservation has been created.",
                  "reservationId": reservation}
        )  # fmt: skip

    def _invalid(self, org: str, form: dict[str, str], date_format: str) -> str | None:
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
        if form.get("CourtId") not in self.courts:
            return "The CourtId field is invalid."
        if form.get("Duration") not in DURATIONS:
            return "The Duration field is invalid."
        try:
            day = datetime.strptime(form.get("Date", ""), date_format)
            datetime.strptime(form.get("StartTime", ""), "%H:%M:%S")
        except ValueError:
            return "The Date field is invalid."
        if (day.hour, day.minute) != (0, 0):
            return "The Date field is invalid."
        if form.get("DisclosureAgree") != "true":
            return "Please agree to the disclosure."
        return None
