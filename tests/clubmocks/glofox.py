"""Glofox (``auth-plat.aws.glofox.com`` for the login, ``api.glofox.com`` for the timetable and
bookings), as its member web portal books a class.

Sources (read, not copied):
- ``NiallBunting/MardykeBooker`` ``mardyke.py``: ``POST auth-plat.aws.glofox.com/login`` with
  JSON ``branch_id``, ``namespace``, ``login``, ``password`` (and the portal's
  ``x-glofox-branch-id``, ``x-glofox-source: webportal`` headers), answering ``success`` and
  ``token``; ``GET api.glofox.com/2.0/events?start=&end=&include=...&page=&private=false
  &sort_by=time_start`` (epoch seconds) with ``Authorization: Bearer``, answering ``data[]``
  (``_id``, ``name``, ``has_booked``) and ``has_more``; ``POST api.glofox.com/2.0/bookings`` with
  ``{"pay_gym": false, "guest_bookings": 0, "model": "event", "model_id": <the event's _id>}``
  answering ``success`` (it tries again every few seconds while ``success`` is false);
- public timetable scrapers in the code index that read ``time_start`` as Unix seconds beside
  ``duration``, ``size`` and ``booked``; a 2026 note there shows the app logging in at
  ``auth.glofox.com/login?as=member`` (with ``device``) and the same booking body plus
  ``join_waiting_list`` and ``payment_method``.

Not shown by public code (the mock's own): the answers to a wrong password (``success`` false,
200), to an expired token (401), and the messages of a full class and of a class not open yet
(both ``success`` false).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from clubmocks.base import Answer, ClubMock, Recorded, json_answer, new_id

BRANCH_ID = "5b6dd1a5e90c2d1f403fccb6"
NAMESPACE = "yourclubnamespace"
USER_ID = "62b1c0ffee0ddba11f00d5a1"


class GlofoxMock(ClubMock):
    """Glofox. ``add_event(name, start)`` puts a class on the timetable (its name is what the user
    puts in ``court_id``); ``take(name, start)`` makes it full."""

    system = "glofox"
    hosts = ("auth-plat.aws.glofox.com", "api.glofox.com")
    routes: ClassVar[tuple[tuple[str, str, str], ...]] = (
        ("POST", r"/login", "login"),
        ("GET", r"/2\.0/events", "events"),
        ("POST", r"/2\.0/bookings", "book"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.events_by_id: dict[str, dict[str, Any]] = {}

    def tokens_entry(self) -> dict[str, str]:
        return {
            "email": self.email,
            "password": self.password,
            "branch_id": BRANCH_ID,
            "namespace": NAMESPACE,
        }

    def add_event(self, name: str, start: datetime, minutes: int = 60) -> str:
        event_id = new_id().replace("-", "")[:24]
        with self._lock:
            self.events_by_id[event_id] = {"name": name, "start": start, "minutes": minutes}
        return event_id

    def login(self, request: Recorded) -> Answer:
        try:
            body = request.json()
        except ValueError:
            return json_answer(400, {"success": False, "message": "Invalid request"})
        if not isinstance(body, dict):
            return json_answer(400, {"success": False, "message": "Invalid request"})
        if body.get("branch_id") != BRANCH_ID or body.get("namespace") != NAMESPACE:
            return json_answer(200, {"success": False, "message": "BRANCH_NOT_FOUND"})
        if not self.credentials_ok(body.get("login"), body.get("password")):
            return json_answer(200, {"success": False, "message": "INVALID_CREDENTIALS"})
        token = self.new_session(USER_ID)
        return json_answer(200, {"success": True, "token": token, "user": {"_id": USER_ID}})

    def _authorized(self, request: Recorded) -> bool:
        state, _ = self.session_state(request.bearer())
        return state == "ok"

    def _item(self, event_id: str) -> dict[str, Any]:
        event = self.events_by_id[event_id]
        booked = 0 if self.is_free(event["name"], event["start"], event["minutes"]) else 12
        return {
            "_id": event_id,
            "branch_id": BRANCH_ID,
            "name": event["name"],
            "time_start": int(event["start"].timestamp()),
            "duration": event["minutes"],
            "size": 12,
            "booked": booked,
            "has_booked": any(b.id == event_id for b in self.bookings),
        }

    def events(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return json_answer(401, {"success": False, "message": "UNAUTHORIZED"})
        try:
            first, last = int(request.arg("start") or ""), int(request.arg("end") or "")
        except ValueError:
            return json_answer(400, {"success": False, "message": "INVALID_DATE_RANGE"})
        found = [
            self._item(event_id)
            for event_id, event in self.events_by_id.items()
            if first <= int(event["start"].timestamp()) <= last
        ]
        found.sort(key=lambda item: item["time_start"])
        return json_answer(200, {"success": True, "data": found, "has_more": False, "page": 1})

    def book(self, request: Recorded) -> Answer:
        if not self._authorized(request):
            return json_answer(401, {"success": False, "message": "UNAUTHORIZED"})
        try:
            body = request.json()
        except ValueError:
            return json_answer(400, {"success": False, "message": "Invalid request"})
        if not isinstance(body, dict) or body.get("model") != "event":
            return json_answer(400, {"success": False, "message": "INVALID_MODEL"})
        event_id = str(body.get("model_id"))
        event = self.events_by_id.get(event_id)
        if event is None:
            return json_answer(404, {"success": False, "message": "EVENT_NOT_FOUND"})
        if any(b.id == event_id for b in self.bookings):
            return json_answer(200, {"success": False, "message": "ALREADY_BOOKED"})
        if not self.window_open():
            return json_answer(200, {"success": False, "message": "BOOKING_WINDOW_NOT_OPEN"})
        if not self.is_free(event["name"], event["start"], event["minutes"]):
            return json_answer(200, {"success": False, "message": "EVENT_IS_FULL"})
        self.add_booking(
            id=event_id,
            court=event["name"],
            start=event["start"],
            minutes=event["minutes"],
            user=USER_ID,
            status="BOOKED",
        )
        return json_answer(
            200, {"success": True, "Booking": {"_id": new_id(), "event_id": event_id}}
        )
