"""ClubAutomation (``<club>.clubautomation.com``), as its public clients drive it.

Sources (read, not copied): three court-booking scripts for ``mit.``, ``lt.`` and ``ctm.``
``clubautomation.com`` found by searching GitHub code for
``clubautomation.com/event/reserve-court-new-do`` (the MIT one explains ``user_id`` and
``event_member_token_reserve_court``, and notes Cloudflare's ``__cf_bm`` cookie), a Node client
that scrapes ``#event_member_token_reserve_court`` from ``/event/reserve-court-new``, and two
2026 browser scripts, ``arthurzengg/mit-tennis-notifier`` ``src/config.py``/``src/browser.py``
(the ``/event/reserve-court-new`` page, its ``MM/DD/YYYY`` date field) and
``darrmurr-dev/vtc-rez`` ``reserve_court.py`` (the login page's hidden ``login_token``).
Together they show:

- ``GET /`` sets ``PHPSESSID`` and carries a hidden ``login_token`` input;
- ``POST /login/login`` (form ``email``, ``password``, ``login_token``; ``X-Requested-With``)
  answers JSON with ``isValid``;
- ``GET /user/get-member-info`` answers ``{"info": {"id": ...}}``;
- ``POST /event/reserve-court-new-do?ajax=true`` (form: ``user_id``,
  ``event_member_token_reserve_court``, ``component``, ``club``, ``court`` (-1: any court),
  ``host``, ``date`` ``MM/DD/YYYY``, ``interval`` minutes, ``time-reserve`` epoch seconds,
  ``location-reserve``, ``is_confirmed=1``...) answers 200 text in every case: "Reservation
  Completed"; "not allowed to reserve Court so far ahead" (too early); "Unable to find any
  available Court" or "reservation at this time is no longer available" (taken); "you don't
  have permission to reserve" (session gone).

The home page, ``GET /``, is also the ready flow's ``clock`` (its ``Date``).
Not shown by public code (the mock's own): the wording around those phrases, the answer to a
wrong password (``isValid: false`` with a message), and the redirect of a page asked for without
a login.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, cookie, json_answer, redirect, text_answer

COURTS = ("1", "2", "3")
MEMBER_ID = "25397"
COMPONENT = "2"
LOCATION = "32"
INTERVALS = ("30", "45", "60", "90", "120")

LOGIN_PAGE = """<!DOCTYPE html><html><head><title>Club Automation</title></head><body>
<form id="loginForm" action="/login/login" method="post">
<input type="text" name="email" id="email">
<input type="password" name="password" id="password">
<input type="hidden" name="login_token" id="login_token" value="{token}">
<button type="submit">Log in</button>
</form></body></html>"""

RESERVE_PAGE = """<!DOCTYPE html><html><head><title>Reserve a Court</title></head><body>
<form id="reserve-court-form" action="/event/reserve-court-new-do" method="post">
<input type="hidden" name="user_id" id="user_id" value="{member}">
<input type="hidden" name="event_member_token_reserve_court" \
id="event_member_token_reserve_court" value="{token}">
<input type="hidden" name="component" id="component" value="{component}">
</form></body></html>"""


class ClubAutomationMock(ClubMock):
    """ClubAutomation. ``component`` and ``location`` are the club's ids for court bookings (the
    user reads them once in the browser); courts are ``1``..``3``."""

    system = "clubautomation"
    hosts = ("yourclub.clubautomation.com",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", r"/", "home"),
        ("POST", r"/login/login", "login"),
        ("GET", r"/user/get-member-info", "member_info"),
        ("GET", r"/event/reserve-court-new", "reserve_page"),
        ("POST", r"/event/reserve-court-new-do", "reserve"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.courts = COURTS
        self.member_id = MEMBER_ID
        self.component = COMPONENT
        self.location = LOCATION

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "component": self.component,
            "location": self.location,
        }

    def _session(self, request: Recorded) -> tuple[str, Any]:
        return self.session_state(request.cookies.get("PHPSESSID"))

    def home(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        headers = []
        if state != "ok":
            sid = self.new_session("", logged_in=False)
            headers.append(cookie("PHPSESSID", sid))
            _, session = self.session_state(sid)
        assert session is not None
        session.data["login_token"] = secrets.token_hex(16)
        return text_answer(
            200, LOGIN_PAGE.format(token=session.data["login_token"]), headers=headers
        )

    def login(self, request: Recorded) -> Answer:
        state, session = self._session(request)
        form = request.form()
        if state != "ok" or session is None:
            return json_answer(200, {"isValid": False, "message": "Your session has expired."})
        token = session.data.get("login_token")
        if not token or form.get("login_token") != token:
            return json_answer(200, {"isValid": False, "message": "Invalid login token."})
        if not self.credentials_ok(form.get("email"), form.get("password")):
            return json_answer(200, {"isValid": False, "message": "Invalid email or password."})
        session.user = self.member_id
        session.data["logged_in"] = True
        session.data["reserve_token"] = secrets.token_hex(16)
        expiry = int(self.now()) + 8 * 3600
        headers = [
            cookie("isLoggedIn", "1", http_only=False),
            cookie("SessionExpirationTime", str(expiry), http_only=False),
        ]
        return json_answer(200, {"isValid": True, "redirect": "/member"}, headers)

    def _logged_in(self, request: Recorded) -> Any:
        state, session = self._session(request)
        if state == "ok" and session is not None and session.data.get("logged_in"):
            return session
        return None

    def member_info(self, request: Recorded) -> Answer:
        session = self._logged_in(request)
        if session is None:
            return redirect("/")
        return json_answer(
            200, {"info": {"id": int(self.member_id), "first_name": "Pat", "last_name": "Player"}}
        )

    def reserve_page(self, request: Recorded) -> Answer:
        session = self._logged_in(request)
        if session is None:
            return redirect("/")
        page = RESERVE_PAGE.format(
            member=self.member_id, token=session.data["reserve_token"], component=self.component
        )
        return text_answer(200, page)

    def reserve(self, request: Recorded) -> Answer:
        if request.arg("ajax") != "true":
            return redirect("/event/reserve-court-new")
        session = self._logged_in(request)
        if session is None:
            return text_answer(
                200, "<p class='error'>Sorry, you don't have permission to reserve courts.</p>"
            )
        form = request.form()
        problem = self._invalid(form, session)
        if problem:
            return text_answer(200, f"<p class='error'>{problem}</p>")
        start = datetime.fromtimestamp(int(form["time-reserve"]), UTC)
        minutes = int(form["interval"])
        if not self.window_open():
            return text_answer(
                200,
                "<p class='error'>Sorry, you are not allowed to reserve Court so far ahead.</p>",
            )
        wanted = form["court"]
        candidates = self.courts if wanted == "-1" else (wanted,)
        court = next((c for c in candidates if self.is_free(c, start, minutes)), None)
        if court is None:
            return text_answer(
                200,
                "<p class='error'>Unable to find any available Court for the selected time.</p>",
            )
        booking = self.add_booking(
            id=str(100000 + len(self.bookings) + 1),
            court=court,
            start=start,
            minutes=minutes,
            user=self.member_id,
            status="CONFIRMED",
        )
        local = self.local(start)
        return text_answer(
            200,
            "<h2>Reservation Completed</h2>"
            f"<p>Court {court}, {local:%m/%d/%Y %I:%M %p}. Confirmation #{booking.id}</p>",
        )

    def _invalid(self, form: dict[str, str], session: Any) -> str | None:
        """What is wrong with a reservation form, in the mock's words, or None."""
        if form.get("event_member_token_reserve_court") != session.data.get("reserve_token"):
            return "Invalid form token. Please reload the page."
        if form.get("user_id") != self.member_id or form.get("host") != self.member_id:
            return "Invalid member."
        if form.get("component") != self.component:
            return "Invalid component."
        if form.get("location-reserve") != self.location:
            return "Invalid location."
        if form.get("is_confirmed") != "1":
            return "Please confirm the reservation."
        if form.get("interval") not in INTERVALS:
            return "Invalid duration."
        court = form.get("court")
        if court != "-1" and court not in self.courts:
            return "Invalid court."
        try:
            start = datetime.fromtimestamp(int(form.get("time-reserve", "")), UTC)
            day = datetime.strptime(form.get("date", ""), "%m/%d/%Y").date()
        except ValueError:
            return "Invalid date or time."
        if self.local(start).date() != day:
            return "Invalid date or time."
        return None
