"""Perfect Gym client portal (``<club>.perfectgym.com/clientportal2``), as gym_sniper,
ha-perfectgym and perfectgym-scheduler drive it.

Sources (read, not copied):
- ``amcindoe/gym_sniper`` ``src/api.rs`` (2026-02-17): ``POST /Auth/Login`` with
  ``{"RememberMe", "Login", "Password"}``, the JWT in the ``jwt-token`` answer header, the member in
  ``User.Member``; ``POST /Classes/ClassCalendar/WeeklyClasses`` with ``clubId``, ``categoryId``,
  ``daysInWeek`` answering ``CalendarData[].ClassesPerHour[].ClassesPerDay[][]``;
  ``GET /Classes/ClassCalendar/Details?classId=`` answering ``Id`` (a number), ``Name``,
  ``Status``, ``StartTime``; ``POST /Classes/ClassCalendar/BookClass`` with
  ``{"classId": <number>, "clubId": "<string>"}`` and ``Authorization: Bearer`` answering
  ``{"Tickets": [...], "ClassId": ...}``; ``src/snipe.rs`` (the error texts it tells apart:
  ``TooSoonToBook`` = window not open yet, retried; ``Full``/``Awaitable`` = class full;
  ``DailyBookingLimitReached``), ``tests/api_integration.rs`` (a refused booking is a 400 whose
  body is the code) and ``README.md`` (the window is typically 7 days and 2 hours before the
  class; statuses ``Bookable``, ``Awaitable``, ``Awaiting``, ``Booked``, ``Unavailable``);
- ``codyc1515/ha-perfectgym`` ``custom_components/perfectgym/api.py`` (2026-08-19): a login is
  refused with 401, 403, 498 or 499 and a JSON body ``{"Errors": [{"Message": ...}]}``; an expired
  token is 401, 403 or 498; the headers ``CP-LANG``, ``CP-MODE``, ``X-Requested-With``;
- ``dekelpilli/perfectgym-scheduler`` ``src/perfectgym_scheduler/core.bb`` (2026-03-16):
  ``BookClass`` with ``clubId`` a string and ``classId`` a number; ``Details`` ``Status``.

The portal's page, ``GET /clientportal2/`` (gym_sniper's ``base_url``, the ``Referer`` of every
client's request), is what a browser opens; the ready flow's ``clock`` reads its ``Date``. Its
body is the mock's own (a page shell).
The mock refuses a wrong password with 499 (the portal's answer the issue reported; gym_sniper's
tests mock 401). Not shown by public code (the mock's own): the message of the 499, the exact code
for a full class (``ClassIsFull``, which gym_sniper's "Full" test matches), the status of a class
whose window is not open yet (``NotBookableYet``), the 401 of an expired token (empty body), and
that a ``classId`` sent as a string is refused (400 ``ClassNotFound``): every client sends a number.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, json_answer, text_answer

CLUB_ID = "2"
MEMBER_ID = 4242
PREFIX = "/clientportal2"
#: The portal's page (a single-page app's shell; the API calls are made from it).
PORTAL_PAGE = (
    "<!DOCTYPE html><html><head><title>Client Portal</title></head>"
    "<body><div ng-view></div></body></html>"
)


def _code(code: str) -> Answer:
    return text_answer(400, code, "text/plain; charset=utf-8")


class PerfectGymMock(ClubMock):
    """Perfect Gym. A class is what a user books; ``add_class`` creates one (its id is what the
    user puts in ``court_id``); ``take(class_id, start)`` makes it full."""

    system = "perfectgym"
    hosts = ("yourclub.perfectgym.com",)
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("GET", PREFIX + r"/", "portal"),
        ("POST", PREFIX + r"/Auth/Login", "login"),
        ("POST", PREFIX + r"/Classes/ClassCalendar/WeeklyClasses", "weekly"),
        ("GET", PREFIX + r"/Classes/ClassCalendar/Details", "details"),
        ("POST", PREFIX + r"/Classes/ClassCalendar/BookClass", "book"),
    )

    def __init__(self, *, token_ttl: float = 3600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.club_id = CLUB_ID
        self.member_id = MEMBER_ID
        self.token_ttl = token_ttl
        self.classes: dict[int, dict[str, Any]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {"email": self.email, "password": self.password, "club_id": self.club_id}

    def add_class(
        self, class_id: int, start: datetime, name: str = "Padel Clinic", minutes: int = 60
    ) -> None:
        """A class at ``start`` (aware) that the user may book."""
        with self._lock:
            self.classes[class_id] = {"name": name, "start": start, "minutes": minutes}

    def portal(self, request: Recorded) -> Answer:
        """The client portal's page, public: what a browser opens (the ready flow's ``clock``
        reads its ``Date``)."""
        return text_answer(200, PORTAL_PAGE)

    def login(self, request: Recorded) -> Answer:
        try:
            body = request.json()
        except ValueError:
            return text_answer(400, "", None)
        if not isinstance(body, dict) or not self.credentials_ok(
            body.get("Login"), body.get("Password")
        ):
            return json_answer(
                499,
                {"Errors": [{"Code": "InvalidCredentials",
                             "Message": "Invalid login or password."}]},
            )  # fmt: skip
        token = self.new_session(str(self.member_id), ttl=self.token_ttl)
        return json_answer(
            200,
            {"User": {"Member": {"Id": self.member_id, "FirstName": "Pat", "LastName": "Player"}}},
            [("jwt-token", token)],
        )

    def _authorized(self, request: Recorded) -> bool:
        state, _ = self.session_state(request.bearer())
        return state == "ok"

    def _status(self, class_id: int) -> str:
        klass = self.classes[class_id]
        mine = any(b.court == str(class_id) for b in self.bookings)
        if mine:
            return "Booked"
        if not self.is_free(str(class_id), klass["start"], klass["minutes"]):
            return "Awaitable"
        return "Bookable" if self.window_open() else "NotBookableYet"

    def _item(self, class_id: int) -> dict[str, Any]:
        klass = self.classes[class_id]
        return {
            "Id": class_id,
            "Name": klass["name"],
            "StartTime": f"{self.local(klass['start']):%Y-%m-%dT%H:%M:%S}",
            "Duration": str(klass["minutes"]),
            "Status": self._status(class_id),
            "Trainer": None,
        }

    def weekly(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return text_answer(401, "", None)
        hours: dict[int, list[list[dict[str, Any]]]] = {}
        for class_id, klass in sorted(self.classes.items()):
            local = self.local(klass["start"])
            days = hours.setdefault(local.hour, [[] for _ in range(7)])
            days[local.weekday()].append(self._item(class_id))
        per_hour = [{"ClassesPerDay": days} for _, days in sorted(hours.items())]
        return json_answer(
            200, {"CalendarData": [{"ZoneName": "Courts", "ClassesPerHour": per_hour}]}
        )

    def details(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return text_answer(401, "", None)
        try:
            class_id = int(request.arg("classId") or "")
        except ValueError:
            return _code("ClassNotFound")
        if class_id not in self.classes:
            return _code("ClassNotFound")
        item = self._item(class_id)
        return json_answer(
            200,
            {
                "Id": class_id,
                "Name": item["Name"],
                "Status": item["Status"],
                "StartTime": item["StartTime"],
                "TrainerDetails": None,
                "Users": [],
            },
        )

    def book(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return text_answer(401, "", None)
        try:
            body = request.json()
        except ValueError:
            return text_answer(400, "", None)
        raw_class = body.get("classId") if isinstance(body, dict) else None
        if isinstance(raw_class, bool) or not isinstance(raw_class, int):
            return _code("ClassNotFound")
        class_id = raw_class
        if str(body.get("clubId")) != self.club_id or class_id not in self.classes:
            return _code("ClassNotFound")
        klass = self.classes[class_id]
        if any(b.court == str(class_id) for b in self.bookings):
            return _code("AlreadyBooked")
        if not self.window_open():
            return _code("TooSoonToBook")
        if not self.is_free(str(class_id), klass["start"], klass["minutes"]):
            return _code("ClassIsFull")
        self.add_booking(
            id=str(class_id),
            court=str(class_id),
            start=klass["start"],
            minutes=klass["minutes"],
            user=str(self.member_id),
            status="Booked",
        )
        start = self.local(klass["start"])
        return json_answer(
            200,
            {
                "Tickets": [
                    {
                        "Name": klass["name"],
                        "StartTime": f"{start:%Y-%m-%dT%H:%M:%S}",
                        "Trainer": None,
                    }
                ],
                "ClassId": class_id,
            },
        )
