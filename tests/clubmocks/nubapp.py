"""Nubapp by Resasports (``sport.nubapp.com``: the Resawod and Resasports apps' back end), as its
public clients book an activity.

Sources (read, not copied):
- ``anydef/resawod-scheduler`` ``src/client.rs`` (2026, app version 5.13.06, the most recent):
  ``POST /api/v4/login`` (form ``username``, ``password``; the answer's ``token`` (or
  ``data.token``) is a JWT whose payload holds ``id_user``); every later call is a form with
  ``Authorization: Bearer``, ``Nubapp-Origin: user_apps`` and ``app_version``:
  ``/api/v4/activities/getActivitiesCalendar.php`` (``id_application``, ``start_timestamp`` and
  ``end_timestamp`` as ``DD-MM-YYYY``, ``id_user``, answering ``data.activities_calendar[]``)
  and ``/api/v4/activities/bookActivityCalendar.php`` (``id_application``,
  ``id_activity_calendar``, ``id_user``, ``action_by``, ``n_guests=0``, ``booked_on=3``);
- ``jbeirer/resasports-bot`` ``pysportbot/__init__.py``, ``pysportbot/activities.py`` and
  ``pysportbot/bookings.py``: a slot's ``start_timestamp`` is ``YYYY-MM-DD HH:MM:SS`` (local)
  beside ``id_activity`` and ``id_activity_calendar``; the booking answer's ``error`` is 0 when
  booked, 5 when the slot is already booked, 6 when it is not available (it signs in through
  Resasocial's web login instead);
- ``kbogtob/resawod-auto-booker`` ``lib/auto-booker/nub_app.rb`` and ``Tohyo/resawod-auto-booking``
  ``src/Client/ResaWodClient.php``: the older ``/web/ajax`` API with a PHP session cookie
  (``checkUser.php``, ``bookBookings.php``), which the newer clients no longer use.

Not shown by public code (the mock's own): the answers to a wrong password (401), to a request
without the Bearer token or with an expired one (401), to a date not in ``DD-MM-YYYY`` and to a
request without ``Nubapp-Origin`` or ``app_version`` (``success`` false), and the ``error`` code
of a slot not bookable yet (12).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, json_answer

ID_USER = "731942"
ID_APPLICATION = "4187"
ACTIVITIES = (101, 102)
NOT_OPEN = 12


def _failure(error: int, message: str) -> Answer:
    return json_answer(200, {"success": False, "error": error, "message": message})


class NubappMock(ClubMock):
    """Nubapp. ``add_activity(id_activity, start)`` schedules a session of an activity (the
    activity's id is what the user puts in ``court_id``); ``take(str(id_activity), start)``
    fills it."""

    system = "nubapp"
    hosts = ("sport.nubapp.com",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("POST", r"/api/v4/login", "login"),
        ("POST", r"/api/v4/activities/getActivitiesCalendar\.php", "calendar"),
        ("POST", r"/api/v4/activities/bookActivityCalendar\.php", "book"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: id_activity_calendar -> the session
        self.sessions: dict[int, dict[str, Any]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {
            "username": self.email,
            "password": self.password,
            "id_user": ID_USER,
            "id_application": ID_APPLICATION,
        }

    def add_activity(self, id_activity: int, start: datetime, minutes: int = 60) -> int:
        with self._lock:
            calendar_id = 5_000_000 + len(self.sessions) + 1
            self.sessions[calendar_id] = {"activity": id_activity, "start": start, "min": minutes}
        return calendar_id

    def login(self, request: Recorded) -> Answer:
        if request.header("Nubapp-Origin") != "user_apps":
            return _failure(1, "Unknown origin.")
        form = request.form()
        if not self.credentials_ok(form.get("username"), form.get("password")):
            return json_answer(401, {"success": False, "message": "Invalid credentials."})
        return json_answer(200, {"success": True, "token": self.new_session(ID_USER)})

    def _sport(self, request: Recorded) -> tuple[Answer | None, dict[str, str]]:
        """The form, or the answer that refuses the request."""
        state, session = self.session_state(request.bearer())
        if state != "ok" or session is None:
            return json_answer(401, {"success": False, "message": "Unauthorized"}), {}
        if request.header("Nubapp-Origin") != "user_apps":
            return _failure(1, "Unknown origin."), {}
        form = request.form()
        if not form.get("app_version"):
            return _failure(7, "Please update the app."), {}
        if form.get("id_application") != ID_APPLICATION or form.get("id_user") != ID_USER:
            return _failure(2, "The user does not belong to this application."), {}
        return None, form

    def _item(self, calendar_id: int) -> dict[str, Any]:
        found = self.sessions[calendar_id]
        start = self.local(found["start"])
        end = start + timedelta(minutes=found["min"])
        return {
            "id_activity_calendar": calendar_id,
            "id_activity": found["activity"],
            "name_activity": f"Padel {found['activity']}",
            "start_timestamp": f"{start:%Y-%m-%d %H:%M:%S}",
            "end_timestamp": f"{end:%Y-%m-%d %H:%M:%S}",
            "n_capacity": 4,
            "n_inscribed": 0 if self.is_free(str(found["activity"]), start, found["min"]) else 4,
            "cancelled": 0,
        }

    def calendar(self, request: Recorded) -> Answer:
        refused, form = self._sport(request)
        if refused is not None:
            return refused
        try:
            first = datetime.strptime(form.get("start_timestamp", ""), "%d-%m-%Y").date()
            last = datetime.strptime(form.get("end_timestamp", ""), "%d-%m-%Y").date()
        except ValueError:
            return _failure(3, "Invalid date.")
        items = [
            self._item(calendar_id)
            for calendar_id, found in sorted(self.sessions.items())
            if first <= self.local(found["start"]).date() <= last
        ]
        return json_answer(200, {"success": True, "data": {"activities_calendar": items}})

    def book(self, request: Recorded) -> Answer:
        refused, form = self._sport(request)
        if refused is not None:
            return refused
        if form.get("action_by") != ID_USER or form.get("n_guests") != "0":
            return _failure(2, "Invalid booking.")
        try:
            calendar_id = int(form.get("id_activity_calendar", ""))
        except ValueError:
            calendar_id = -1
        found = self.sessions.get(calendar_id)
        if found is None:
            return _failure(4, "The activity does not exist.")
        court = str(found["activity"])
        if any(b.id == str(calendar_id) for b in self.bookings):
            return _failure(5, "You are already booked on this activity.")
        if not self.window_open():
            return _failure(NOT_OPEN, "Bookings for this activity are not open yet.")
        if not self.is_free(court, found["start"], found["min"]):
            return _failure(6, "The activity is not available.")
        self.add_booking(
            id=str(calendar_id),
            court=court,
            start=found["start"],
            minutes=found["min"],
            user=ID_USER,
            status="CONFIRMED",
        )
        return json_answer(
            200,
            {
                "success": True,
                "error": 0,
                "message": "Booking done.",
                "id_activity_calendar_user": secrets.randbelow(10**8),
            },
        )
