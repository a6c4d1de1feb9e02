"""The ready flows of data/clubs/ and the faithful mocks of their systems (tests/clubmocks/).

Three layers: each flow file is valid section-12 data; each mock answers, request by request,
as the public clients of its system expect (driven by hand with ``requests``); and each ready
flow, read literally by ``clubmocks.runner``, books against its mock and ends taken, early or
refused exactly where the system says so.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from clubmocks import (
    CLUBS_DIR,
    MOCKS,
    ClubAutomationMock,
    ClubMock,
    CourtReserveMock,
    DoinsportMock,
    PerfectGymMock,
    PlaytomicMock,
    flow_for_mock,
    load_flow,
    write_flow_for_mock,
)
from clubmocks.flows import flow_problems, placeholders
from clubmocks.runner import FlowRun, Instance, _Context, json_path, run_flow
from template import parse_flow

ZONE = ZoneInfo("Europe/Paris")
TIMEOUT = 5


def slot(days: int = 3, hour: int = 18, minute: int = 0) -> datetime:
    """A local start ``days`` ahead at ``hour:minute``, Paris time."""
    today = datetime.now(ZONE).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return today + timedelta(days=days)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicated = {key for key in keys if keys.count(key) > 1}
    if duplicated:
        raise ValueError(f"duplicate keys {sorted(duplicated)}")
    return dict(pairs)


FLOW_FILES = sorted(CLUBS_DIR.glob("*.json"))


# -- the flow files ---------------------------------------------------------------------------


def test_a_mock_for_every_ready_flow_and_at_least_five() -> None:
    assert {path.stem for path in FLOW_FILES} == set(MOCKS)
    assert len(MOCKS) >= 5


@pytest.mark.parametrize("path", FLOW_FILES, ids=lambda p: p.stem)
def test_ready_flow_is_section_12_data(path: Path) -> None:
    flow = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    assert flow_problems(flow, path.name) == []
    assert set(flow) >= {"about", "hosts", "steps", "sources", "checked"}
    # CONTRACT section 12, Provenance: public sources named precisely, and a checked date.
    parsed = parse_flow(flow, api_url=None, name=path.name)
    # Two independent sources where they exist (issue 20); a flow read from one says so.
    assert parsed.checked is not None
    assert len(parsed.sources) >= 2 or "the only public client" in flow["about"], path.name
    assert [s.get("booking") for s in flow["steps"]].count(True) == 1


@pytest.mark.parametrize("system", sorted(MOCKS))
def test_ready_flow_hosts_are_the_systems_real_hosts(system: str) -> None:
    flow = load_flow(system)
    assert tuple(flow["hosts"]) == MOCKS[system].hosts
    assert all(s["url"].startswith("https://") for s in [*flow["steps"], *flow.get("cancel", [])])


@pytest.mark.parametrize("system", sorted(MOCKS))
def test_ready_flow_documents_each_tokens_field_it_uses(system: str) -> None:
    flow = load_flow(system)
    fields = {f for name, f, _ in placeholders(flow["steps"]) if name == "secret"}
    # What the flow reads from tokens.json is what the about text tells the user to put there,
    # and exactly what the mock's tokens_entry() gives.
    assert fields == set(MOCKS[system]().tokens_entry())
    for field_name in fields:
        assert f'\\"{field_name}\\"' in json.dumps(flow["about"]), field_name


def _minimal_flow() -> dict[str, Any]:
    return {
        "hosts": ["club.example"],
        "steps": [
            {
                "name": "login",
                "method": "POST",
                "url": "https://club.example/login",
                "json": {"user": "{secret.user}"},
                "extract": {"jwt": {"header": "X-Token"}},
            },
            {
                "name": "book",
                "booking": True,
                "method": "POST",
                "url": "https://club.example/book",
                "headers": {"Authorization": "Bearer {login.jwt}"},
                "json": {"at": "{start:%H:%M}", "court": "{court_id}"},
            },
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(flow: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = flow
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return change


BROKEN_FLOWS = [
    ("steps/1/booking", None, "flow: steps: expected exactly one booking step, found 0"),
    ("steps/0/booking", True, "flow: steps: expected exactly one booking step, found 2"),
    (
        "steps/1/url",
        "https://elsewhere.example/book",
        "flow: step 'book' (#2): url: 'https://elsewhere.example/book' is not https on one of "
        "hosts ['club.example']",
    ),
    (
        "steps/1/url",
        "http://club.example/book",
        "flow: step 'book' (#2): url: 'http://club.example/book' is not https on one of hosts "
        "['club.example']",
    ),
    (
        "steps/1/json",
        {"who": "{login.user}"},
        "flow: step 'book' (#2): {login.user}: no earlier step extracts it",
    ),
    (
        "steps/0/json",
        {"ref": "{book.id}"},
        "flow: step 'login' (#1): {book.id}: no earlier step extracts it",
    ),
    ("hostz", ["x"], "flow: unknown key 'hostz'"),
    ("steps/0/taken", {"status": [409]}, "flow: step 'login' (#1): unknown key 'taken'"),
    (
        "steps/1/json",
        {"at": "{court_id:%H}"},
        "flow: step 'book' (#2): {court_id:%H}: a format on a non-time value",
    ),
    (
        "steps/1/json",
        {"at": "{tomorrow}"},
        "flow: step 'book' (#2): {tomorrow}: unknown placeholder",
    ),
    (
        "steps/0/extract",
        {"id": {"json": "slots[court={nope}].id"}},
        "flow: step 'login' (#1): {nope}: unknown placeholder",
    ),
    (
        "steps/0/extract",
        {"id": {"regex": "no group"}},
        "flow: step 'login' (#1): extract.id: regex has no group",
    ),
    (
        "steps/1/taken",
        {"status": "409"},
        "flow: step 'book' (#2): taken.status: expected a non-empty list of integers, got '409'",
    ),
    ("steps/1/name", "login", "flow: step 'login' (#2): name: used twice"),
    (
        "steps/1/json",
        {"query": "mutation { book }"},
        "flow: step 'book' (#2): 'mutation { book }'...: a lone brace (write {{ or }})",
    ),
]


def test_the_minimal_flow_passes() -> None:
    assert flow_problems(_minimal_flow()) == []


@pytest.mark.parametrize(("path", "value", "message"), BROKEN_FLOWS)
def test_a_broken_flow_is_named_with_its_step_and_key(path: str, value: Any, message: str) -> None:
    flow = _minimal_flow()
    _set(path, value)(flow)
    assert message in flow_problems(flow)


def test_at_trigger_after_the_booking_step_is_a_problem() -> None:
    flow = _minimal_flow()
    flow["steps"].append(
        {"name": "late", "method": "GET", "url": "https://club.example/x", "at_trigger": True}
    )
    assert flow_problems(flow) == [
        "flow: step 'late' (#3): at_trigger: only for steps before the booking step"
    ]


def test_flow_for_mock_points_every_url_and_the_hosts_at_the_mock(tmp_path: Path) -> None:
    flow = flow_for_mock("courtreserve", "http://127.0.0.1:8123")
    assert flow["hosts"] == ["127.0.0.1:8123"]
    assert flow["steps"][0]["url"] == ("http://127.0.0.1:8123/Online/Account/LogIn/{secret.org_id}")
    # Both of its hosts, app. and reservations., go to the one mock.
    assert all(s["url"].startswith("http://127.0.0.1:8123/") for s in flow["steps"])
    assert load_flow("courtreserve")["hosts"] == [  # the file is unchanged
        "app.courtreserve.com",
        "reservations.courtreserve.com",
    ]
    written = write_flow_for_mock("courtreserve", "http://127.0.0.1:8123", tmp_path / "clubs", "cr")
    assert written == tmp_path / "clubs" / "cr.json"
    assert json.loads(written.read_text()) == flow
    short = write_flow_for_mock(
        "perfectgym", "http://127.0.0.1:8123", tmp_path / "clubs", prepare_seconds=5, window=None
    )
    written_flow = json.loads(short.read_text())
    assert (written_flow["prepare_seconds"], "window" in written_flow) == (5, False)
    assert written_flow["steps"] == flow_for_mock("perfectgym", "http://127.0.0.1:8123")["steps"]


def test_flow_for_mock_refuses_a_url_on_none_of_the_hosts() -> None:
    flow = _minimal_flow()
    flow["steps"][1]["url"] = "https://elsewhere.example/book"
    with pytest.raises(
        ValueError, match=re.escape("step 'book': 'https://elsewhere.example/book' is on none")
    ):
        flow_for_mock(flow, "http://127.0.0.1:1")


def test_json_paths_with_indexes_and_combined_filters() -> None:
    context = _Context({"act": "a.b"}, Instance(start=slot(), court_id=3))
    slots = [
        {"startAt": "17:00", "n": 2},
        {"startAt": "18:00", "n": 3},
        {"startAt": "18:00", "n": 4},
    ]
    document = {
        "hydra:member": [
            {"id": 2, "activities": [{"id": "a.b", "slots": [{"startAt": "18:00", "n": 1}]}]},
            {"id": "3", "activities": [{"id": "x", "slots": []}, {"id": "a.b", "slots": slots}]},
        ]
    }
    path = "hydra:member[id={court_id}].activities[id={secret.act}].slots[startAt={time}][n=4].n"
    assert json_path(document, path, context) == 4
    assert json_path(document, "hydra:member[1].activities[0].id", context) == "x"


# -- the mocks, common behaviour --------------------------------------------------------------


@pytest.fixture
def playtomic() -> Iterator[PlaytomicMock]:
    with PlaytomicMock(zone="Europe/Paris") as club:
        yield club


def test_the_mock_records_each_request_whole(playtomic: PlaytomicMock) -> None:
    before = time.time()
    requests.get(
        f"{playtomic.url}/v1/availability?tenant_id=t&start_min=x",
        headers={"X-Probe": "1", "Cookie": "a=1; b=two"},
        timeout=TIMEOUT,
    )
    requests.post(f"{playtomic.url}/v3/auth/login", data=b'{"email": 1}', timeout=TIMEOUT)
    first, second = playtomic.requests
    assert (first.method, first.path, first.query) == (
        "GET",
        "/v1/availability",
        {"tenant_id": ["t"], "start_min": ["x"]},
    )
    assert first.header("X-Probe") == "1"
    assert first.cookies == {"a": "1", "b": "two"}
    assert first.status == 400
    assert (second.method, second.body, second.status) == ("POST", b'{"email": 1}', 400)
    assert before <= first.arrived <= second.arrived <= time.time()
    assert playtomic.requests_to("POST", r"/v3/auth/.*") == [second]


def test_the_mock_answers_unknown_paths_404_and_wrong_methods_405(
    playtomic: PlaytomicMock,
) -> None:
    assert requests.get(f"{playtomic.url}/nope", timeout=TIMEOUT).status_code == 404
    answer = requests.get(f"{playtomic.url}/v3/auth/login", timeout=TIMEOUT)
    assert (answer.status_code, answer.headers["Allow"]) == (405, "POST")


def test_a_stopped_mock_refuses_connections() -> None:
    club = PlaytomicMock().start()
    url = club.url
    club.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=TIMEOUT)


# -- Playtomic by hand ------------------------------------------------------------------------


ROLES = {"requested_user_roles": ["ROLE_CUSTOMER"]}


def _playtomic_login(club: PlaytomicMock) -> dict[str, Any]:
    answer = requests.post(
        f"{club.url}/v3/auth/login",
        json={"email": club.email, "password": club.password, **ROLES},
        timeout=TIMEOUT,
    )
    assert answer.status_code == 200
    return answer.json()


def _playtomic_cart(club: PlaytomicMock, start: datetime, court: str | None = None) -> dict:
    return {
        "allowed_payment_method_types": ["CASH", "CREDIT_CARD"],
        "user_id": club.user_id,
        "cart": {
            "requested_item": {
                "cart_item_type": "CUSTOMER_MATCH",
                "cart_item_voucher_id": None,
                "cart_item_data": {
                    "tenant_id": club.tenant_id,
                    "resource_id": court or club.courts[0],
                    "start": start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                    "duration": 90,
                    "match_registrations": [{"user_id": club.user_id, "pay_now": True}],
                },
            }
        },
    }


def test_playtomic_login_answers_as_the_go_client_reads_it(playtomic: PlaytomicMock) -> None:
    body = _playtomic_login(playtomic)
    assert body["user_id"] == playtomic.user_id
    expires = datetime.strptime(body["access_token_expiration"], "%Y-%m-%dT%H:%M:%S")
    assert abs(expires.replace(tzinfo=UTC).timestamp() - (time.time() + 3600)) < 5
    assert body["refresh_token"] != body["access_token"]
    no_roles = requests.post(
        f"{playtomic.url}/v3/auth/login",
        json={"email": playtomic.email, "password": playtomic.password},
        timeout=TIMEOUT,
    )
    assert no_roles.status_code == 400
    playtomic.password = "changed"
    refused = requests.post(
        f"{playtomic.url}/v3/auth/login",
        json={"email": playtomic.email, "password": "correct-horse-42", **ROLES},
        timeout=TIMEOUT,
    )
    assert (refused.status_code, set(refused.json())) == (401, {"status", "localized_message"})


def test_playtomic_old_host_and_data_centres_get_cloudfronts_block_page(
    playtomic: PlaytomicMock,
) -> None:
    old = requests.post(
        f"{playtomic.old_url}/v3/auth/login",
        json={"email": playtomic.email, "password": playtomic.password, **ROLES},
        timeout=TIMEOUT,
    )
    assert old.status_code == 403
    assert old.headers["Content-Type"] == "text/html"
    assert (old.headers["Server"], old.headers["X-Cache"]) == (
        "CloudFront",
        "Error from cloudfront",
    )
    assert "<TITLE>ERROR: The request could not be satisfied</TITLE>" in old.text
    assert requests.get(f"{playtomic.old_url}/v1/tenants", timeout=TIMEOUT).status_code == 403
    assert _playtomic_login(playtomic)["user_id"] == playtomic.user_id
    playtomic.data_centre = True
    blocked = requests.post(
        f"{playtomic.url}/v3/auth/login",
        json={"email": playtomic.email, "password": playtomic.password, **ROLES},
        timeout=TIMEOUT,
    )
    assert (blocked.status_code, blocked.text.count("Request blocked.")) == (403, 1)


def test_playtomic_availability_lists_free_slots_in_utc(playtomic: PlaytomicMock) -> None:
    day = slot().astimezone(UTC).strftime("%Y-%m-%d")
    start = datetime.fromisoformat(f"{day}T17:00:00+00:00")
    playtomic.take(playtomic.courts[0], start, 90)
    answer = requests.get(
        f"{playtomic.url}/v1/availability",
        params={
            "tenant_id": playtomic.tenant_id,
            "sport_id": "PADEL",
            "start_min": f"{day}T00:00:00",
            "start_max": f"{day}T23:59:59",
        },
        timeout=TIMEOUT,
    ).json()
    first, second = answer
    assert first["resource_id"] == playtomic.courts[0]
    assert first["start_date"] == day
    starts = {(s["start_time"], s["duration"]) for s in first["slots"]}
    assert ("17:00:00", 90) not in starts
    assert ("16:00:00", 60) in starts and ("16:00:00", 90) not in starts  # 16:00-17:30 overlaps
    assert ("17:00:00", 90) in {(s["start_time"], s["duration"]) for s in second["slots"]}


def test_playtomic_payment_intent_patch_and_confirmation(playtomic: PlaytomicMock) -> None:
    token = _playtomic_login(playtomic)["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{playtomic.url}/v1/payment_intents"
    start = slot()
    assert (
        requests.post(url, json=_playtomic_cart(playtomic, start), timeout=TIMEOUT).status_code
        == 401
    )
    wrong = _playtomic_cart(playtomic, start)
    wrong["cart"]["requested_item"]["cart_item_data"]["tenant_id"] = "other"
    assert requests.post(url, json=wrong, headers=auth, timeout=TIMEOUT).status_code == 404
    intent = requests.post(
        url, json=_playtomic_cart(playtomic, start), headers=auth, timeout=TIMEOUT
    )
    assert intent.status_code == 200
    body = intent.json()
    assert body["status"] == "REQUIRES_PAYMENT_METHOD"
    match_id = body["cart"]["item"]["cart_item_id"]
    assert [(b.id, b.status) for b in playtomic.bookings] == [(match_id, "PENDING")]
    # The slot is held: a second intent for it is refused as the bots see it.
    again = requests.post(
        url, json=_playtomic_cart(playtomic, start), headers=auth, timeout=TIMEOUT
    )
    assert again.status_code == 409
    intent_url = f"{url}/{body['payment_intent_id']}"
    early = requests.post(f"{intent_url}/confirmation", json={}, headers=auth, timeout=TIMEOUT)
    assert early.status_code == 400
    bad = requests.patch(
        intent_url, json={"selected_payment_method_id": "NOPE"}, headers=auth, timeout=TIMEOUT
    )
    assert bad.status_code == 400
    chosen = requests.patch(
        intent_url, json={"selected_payment_method_id": "CASH"}, headers=auth, timeout=TIMEOUT
    )
    assert chosen.json()["selected_payment_method_id"] == "CASH"
    done = requests.post(f"{intent_url}/confirmation", json={}, headers=auth, timeout=TIMEOUT)
    assert (done.status_code, done.json()["status"]) == (200, "SUCCEEDED")
    assert [(b.status, b.start, b.minutes) for b in playtomic.bookings] == [
        ("CONFIRMED", start.astimezone(UTC), 90)
    ]


def test_playtomic_not_on_sale_yet_is_the_same_409_as_taken(playtomic: PlaytomicMock) -> None:
    auth = {"Authorization": f"Bearer {_playtomic_login(playtomic)['access_token']}"}
    url = f"{playtomic.url}/v1/payment_intents"
    playtomic.opens_at = time.time() + 60
    early = requests.post(
        url, json=_playtomic_cart(playtomic, slot()), headers=auth, timeout=TIMEOUT
    )
    playtomic.opens_at = None
    playtomic.take(playtomic.courts[0], slot(), 90)
    taken = requests.post(
        url, json=_playtomic_cart(playtomic, slot()), headers=auth, timeout=TIMEOUT
    )
    assert (early.status_code, early.content) == (taken.status_code, taken.content)
    assert early.status_code == 409
    playtomic.expire_sessions()
    expired = requests.post(
        url, json=_playtomic_cart(playtomic, slot(days=4)), headers=auth, timeout=TIMEOUT
    )
    assert expired.status_code == 401
    assert playtomic.bookings == []


# -- ClubAutomation by hand -------------------------------------------------------------------


@pytest.fixture
def clubautomation() -> Iterator[ClubAutomationMock]:
    with ClubAutomationMock(zone="Europe/Paris") as club:
        yield club


def _ca_login(club: ClubAutomationMock) -> requests.Session:
    session = requests.Session()
    home = session.get(f"{club.url}/", timeout=TIMEOUT)
    token = re.search(r'id="login_token" value="([^"]+)"', home.text)
    assert token is not None and "PHPSESSID" in session.cookies
    answer = session.post(
        f"{club.url}/login/login",
        data={"email": club.email, "password": club.password, "login_token": token.group(1)},
        headers={"X-Requested-With": "XMLHttpRequest"},
        timeout=TIMEOUT,
    )
    assert answer.json()["isValid"] is True
    return session


def _ca_form(club: ClubAutomationMock, session: requests.Session, start: datetime, **over: str):
    page = session.get(f"{club.url}/event/reserve-court-new", timeout=TIMEOUT).text
    found = re.search(r'id="event_member_token_reserve_court" value="([^"]+)"', page)
    assert found is not None
    member = str(
        session.get(f"{club.url}/user/get-member-info", timeout=TIMEOUT).json()["info"]["id"]
    )
    form = {
        "reservation-list-page": "1",
        "user_id": member,
        "event_member_token_reserve_court": found.group(1),
        "current_guest_count": "0",
        "component": club.component,
        "club": "-1",
        "court": "-1",
        "host": member,
        "date": f"{start:%m/%d/%Y}",
        "interval": "60",
        "time-reserve": str(int(start.timestamp())),
        "location-reserve": club.location,
        "surface-reserve": "0",
        "courtsnotavailable": "",
        "join-waitlist-case": "1",
        "is_confirmed": "1",
    }
    form.update(over)
    return form


def _ca_reserve(club: ClubAutomationMock, session: requests.Session, form: dict) -> str:
    answer = session.post(
        f"{club.url}/event/reserve-court-new-do?ajax=true", data=form, timeout=TIMEOUT
    )
    assert answer.status_code == 200
    return answer.text


def test_clubautomation_login_needs_the_session_and_its_login_token(
    clubautomation: ClubAutomationMock,
) -> None:
    url = f"{clubautomation.url}/login/login"
    creds = {"email": clubautomation.email, "password": clubautomation.password}
    assert requests.post(url, data={**creds, "login_token": "x"}, timeout=TIMEOUT).json() == {
        "isValid": False,
        "message": "Your session has expired.",
    }
    session = requests.Session()
    session.get(f"{clubautomation.url}/", timeout=TIMEOUT)
    wrong = session.post(url, data={**creds, "login_token": "forged"}, timeout=TIMEOUT).json()
    assert wrong["isValid"] is False
    session = _ca_login(clubautomation)
    assert session.cookies["isLoggedIn"] == "1"
    assert int(session.cookies["SessionExpirationTime"]) > time.time()
    anonymous = requests.get(
        f"{clubautomation.url}/user/get-member-info", allow_redirects=False, timeout=TIMEOUT
    )
    assert (anonymous.status_code, anonymous.headers["Location"]) == (302, "/")


def test_clubautomation_reserve_answers_200_with_the_outcome_in_the_text(
    clubautomation: ClubAutomationMock,
) -> None:
    session = _ca_login(clubautomation)
    start = slot()
    clubautomation.take("1", start, 60)
    booked = _ca_reserve(clubautomation, session, _ca_form(clubautomation, session, start))
    assert "Reservation Completed" in booked
    # court -1: the first free court; court 1 was taken.
    assert [(b.court, b.start) for b in clubautomation.bookings] == [("2", start.astimezone(UTC))]
    clubautomation.take("3", start, 60)
    taken = _ca_reserve(clubautomation, session, _ca_form(clubautomation, session, start))
    assert "Unable to find any available Court" in taken
    clubautomation.opens_at = time.time() + 60
    early = _ca_reserve(clubautomation, session, _ca_form(clubautomation, session, slot(days=4)))
    assert "not allowed to reserve Court so far ahead" in early
    clubautomation.opens_at = None
    form = _ca_form(clubautomation, session, slot(days=5))
    clubautomation.expire_sessions()
    gone = _ca_reserve(clubautomation, session, form)
    assert "you don't have permission to reserve" in gone
    assert len(clubautomation.bookings) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event_member_token_reserve_court": "forged"}, "Invalid form token"),
        ({"host": "1"}, "Invalid member."),
        ({"location-reserve": "99"}, "Invalid location."),
        ({"is_confirmed": "0"}, "Please confirm the reservation."),
        ({"date": "01/01/2030"}, "Invalid date or time."),
        ({"interval": "75"}, "Invalid duration."),
    ],
)
def test_clubautomation_reserve_checks_the_form(
    clubautomation: ClubAutomationMock, change: dict[str, str], message: str
) -> None:
    session = _ca_login(clubautomation)
    text = _ca_reserve(clubautomation, session, _ca_form(clubautomation, session, slot(), **change))
    assert message in text
    assert clubautomation.bookings == []


# -- Doinsport by hand ------------------------------------------------------------------------


@pytest.fixture
def doinsport() -> Iterator[DoinsportMock]:
    with DoinsportMock(zone="Europe/Paris") as club:
        yield club


def _ds_login(club: DoinsportMock) -> dict[str, str]:
    answer = requests.post(
        f"{club.url}/client_login_check",
        json={
            "username": club.email,
            "password": club.password,
            "club": f"/clubs/{club.club_id}",
            "clubWhiteLabel": f"/clubs/white-labels/{club.white_label_id}",
            "origin": "white_label_app",
        },
        timeout=TIMEOUT,
    )
    assert answer.status_code == 200
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def _ds_price(club: DoinsportMock, auth: dict[str, str], start: datetime, court: str) -> dict:
    planning = requests.get(
        f"{club.url}/clubs/playgrounds/plannings/{start:%Y-%m-%d}",
        params={
            "club.id": club.club_id,
            "from": f"{start:%H:%M}:00",
            "to": "23:59:00",
            "activities.id": club.activity_id,
            "bookingType": "unique",
        },
        headers=auth,
        timeout=TIMEOUT,
    ).json()
    playground = next(p for p in planning["hydra:member"] if p["id"] == court)
    slots = playground["activities"][0]["slots"]
    found = next(s for s in slots if s["startAt"] == f"{start:%H:%M}")
    return next(p for p in found["prices"] if p["duration"] == 5400)


def _ds_booking(club: DoinsportMock, price: dict, start: datetime, court: str) -> dict:
    utc = start.astimezone(UTC)
    return {
        "timetableBlockPrice": f"/clubs/playgrounds/timetables/blocks/prices/{price['id']}",
        "activity": f"/activities/{club.activity_id}",
        "club": f"/clubs/{club.club_id}",
        "startAt": f"{utc:%Y-%m-%d %H:%M:%S}",
        "endAt": f"{utc + timedelta(minutes=90):%Y-%m-%d %H:%M:%S}",
        "playgrounds": [f"/clubs/playgrounds/{court}"],
        "userClient": f"/user-clients/{club.user_id}",
        "participants": [{"user": f"/user-clients/{club.user_id}", "bookingOwner": True}],
        "paymentMethod": "on_the_spot",
    }


def test_doinsport_jwt_answers_are_the_bundles(doinsport: DoinsportMock) -> None:
    me = f"{doinsport.url}/me"
    assert requests.get(me, timeout=TIMEOUT).json() == {
        "code": 401,
        "message": "JWT Token not found",
    }
    auth = _ds_login(doinsport)
    assert requests.get(me, headers=auth, timeout=TIMEOUT).json()["id"] == doinsport.user_id
    doinsport.expire_sessions()
    assert requests.get(me, headers=auth, timeout=TIMEOUT).json() == {
        "code": 401,
        "message": "Expired JWT Token",
    }
    doinsport.password = "changed"
    refused = requests.post(
        f"{doinsport.url}/client_login_check",
        json={"username": doinsport.email, "password": "correct-horse-42"},
        timeout=TIMEOUT,
    )
    assert (refused.status_code, refused.json()["message"]) == (401, "Invalid credentials.")


def test_doinsport_planning_book_and_confirm(doinsport: DoinsportMock) -> None:
    auth = _ds_login(doinsport)
    start, court = slot(), doinsport.courts[0]
    price = _ds_price(doinsport, auth, start, court)
    assert price["bookable"] is True
    url = f"{doinsport.url}/clubs/bookings"
    local_times = _ds_booking(doinsport, price, start, court)
    local_times["startAt"] = f"{start:%Y-%m-%d %H:%M:%S}"  # local time, not UTC: refused
    refused = requests.post(url, json=local_times, headers=auth, timeout=TIMEOUT)
    assert (refused.status_code, refused.json()["violations"][0]["propertyPath"]) == (
        422,
        "startAt",
    )
    created = requests.post(
        url, json=_ds_booking(doinsport, price, start, court), headers=auth, timeout=TIMEOUT
    )
    assert created.status_code == 201
    booking = created.json()
    assert (booking["@id"], booking["confirmed"]) == (f"/clubs/bookings/{booking['id']}", False)
    assert _ds_price(doinsport, auth, start, court)["bookable"] is False
    put = f"{url}/{booking['id']}"
    assert requests.put(put, json={}, headers=auth, timeout=TIMEOUT).status_code == 422
    confirmed = requests.put(put, json={"confirmed": True}, headers=auth, timeout=TIMEOUT)
    assert confirmed.json()["confirmed"] is True
    assert [(b.court, b.start, b.minutes, b.status) for b in doinsport.bookings] == [
        (court, start.astimezone(UTC), 90, "CONFIRMED")
    ]
    again = requests.post(
        url, json=_ds_booking(doinsport, price, start, court), headers=auth, timeout=TIMEOUT
    )
    assert again.json()["violations"][0]["message"] == "This slot is no longer available."


def test_doinsport_before_the_window_is_a_violation_too(doinsport: DoinsportMock) -> None:
    auth = _ds_login(doinsport)
    start, court = slot(), doinsport.courts[1]
    price = _ds_price(doinsport, auth, start, court)
    doinsport.opens_at = time.time() + 60
    early = requests.post(
        f"{doinsport.url}/clubs/bookings",
        json=_ds_booking(doinsport, price, start, court),
        headers=auth,
        timeout=TIMEOUT,
    )
    assert early.status_code == 422
    assert early.json()["violations"] == [
        {"propertyPath": "startAt", "message": "Bookings for this date are not open yet."}
    ]
    assert doinsport.bookings == []


# -- Perfect Gym by hand ----------------------------------------------------------------------


@pytest.fixture
def perfectgym() -> Iterator[PerfectGymMock]:
    with PerfectGymMock(zone="Europe/Paris") as club:
        club.add_class(76014, slot())
        yield club


def _pg_login(club: PerfectGymMock) -> dict[str, str]:
    answer = requests.post(
        f"{club.url}/clientportal2/Auth/Login",
        json={"RememberMe": False, "Login": club.email, "Password": club.password},
        timeout=TIMEOUT,
    )
    assert answer.json()["User"]["Member"]["Id"] == club.member_id
    return {"Authorization": f"Bearer {answer.headers['jwt-token']}"}


def _pg_book(
    club: PerfectGymMock, auth: dict[str, str], class_id: Any = 76014
) -> requests.Response:
    return requests.post(
        f"{club.url}/clientportal2/Classes/ClassCalendar/BookClass",
        json={"classId": class_id, "clubId": club.club_id},
        headers=auth,
        timeout=TIMEOUT,
    )


def test_perfectgym_login_gives_the_jwt_in_a_header(perfectgym: PerfectGymMock) -> None:
    assert _pg_book(perfectgym, {}).status_code == 401
    auth = _pg_login(perfectgym)
    weekly = requests.post(
        f"{perfectgym.url}/clientportal2/Classes/ClassCalendar/WeeklyClasses",
        json={"clubId": 2, "categoryId": None, "daysInWeek": 7},
        headers=auth,
        timeout=TIMEOUT,
    ).json()
    days = weekly["CalendarData"][0]["ClassesPerHour"][0]["ClassesPerDay"]
    (item,) = [c for day in days for c in day]
    assert (item["Id"], item["Status"]) == (76014, "Bookable")
    assert item["StartTime"] == f"{slot():%Y-%m-%dT%H:%M:%S}"
    details = requests.get(
        f"{perfectgym.url}/clientportal2/Classes/ClassCalendar/Details",
        params={"classId": "76014"},
        headers=auth,
        timeout=TIMEOUT,
    ).json()
    assert (details["Id"], details["Status"]) == (76014, "Bookable")
    perfectgym.password = "changed"
    refused = requests.post(
        f"{perfectgym.url}/clientportal2/Auth/Login",
        json={"RememberMe": False, "Login": perfectgym.email, "Password": "correct-horse-42"},
        timeout=TIMEOUT,
    )
    # As ha-perfectgym reads a refused login: 499 and Errors[0].Message.
    assert refused.status_code == 499
    assert refused.json()["Errors"][0]["Message"] == "Invalid login or password."


def test_perfectgym_book_class_answers_as_gym_sniper_reads_them(
    perfectgym: PerfectGymMock,
) -> None:
    auth = _pg_login(perfectgym)
    perfectgym.opens_at = time.time() + 60
    early = _pg_book(perfectgym, auth)
    assert (early.status_code, early.text) == (400, "TooSoonToBook")
    perfectgym.opens_at = None
    # Every client sends classId as a number; the mock refuses a string.
    assert _pg_book(perfectgym, auth, "76014").text == "ClassNotFound"
    booked = _pg_book(perfectgym, auth)
    assert booked.json() == {
        "Tickets": [
            {"Name": "Padel Clinic", "StartTime": f"{slot():%Y-%m-%dT%H:%M:%S}", "Trainer": None}
        ],
        "ClassId": 76014,
    }
    assert _pg_book(perfectgym, auth).text == "AlreadyBooked"
    perfectgym.add_class(76015, slot(days=4))
    perfectgym.take("76015", slot(days=4))
    full = _pg_book(perfectgym, auth, 76015)
    assert (full.status_code, full.text) == (400, "ClassIsFull")
    assert _pg_book(perfectgym, auth, 1).text == "ClassNotFound"
    perfectgym.expire_sessions()
    assert _pg_book(perfectgym, auth, 76015).status_code == 401
    assert [(b.court, b.status) for b in perfectgym.bookings] == [("76014", "Booked")]


# -- CourtReserve by hand ---------------------------------------------------------------------


@pytest.fixture
def courtreserve() -> Iterator[CourtReserveMock]:
    with CourtReserveMock(zone="Europe/Paris") as club:
        yield club


XHR = {"X-Requested-With": "XMLHttpRequest"}
_CR_SLOT = "%m/%d/%Y %I:%M:%S %p"


def _cr_login(club: CourtReserveMock) -> requests.Session:
    session = requests.Session()
    session.get(f"{club.url}/Online/Account/LogIn/{club.org_id}", timeout=TIMEOUT)
    answer = session.post(
        f"{club.url}/Online/Account/Login",
        params={"id": club.org_id},
        json={"IsApiCall": True, "UserNameOrEmail": club.email, "Password": club.password},
        headers={"reactsubmit": "true"},
        timeout=TIMEOUT,
    )
    assert answer.json()["IsValid"] is True
    assert ".AspNet.ApplicationCookie" in session.cookies
    return session


def _cr_when(club: CourtReserveMock, start: datetime) -> dict[str, str]:
    return {
        "start": start.strftime(_CR_SLOT),
        "end": (start + timedelta(hours=1)).strftime(_CR_SLOT),
        "customSchedulerId": club.scheduler_id,
    }


def _cr_form(club: CourtReserveMock, session: requests.Session, start: datetime) -> dict:
    """What a member's browser does: the courts view's link, then the form behind it."""
    view = session.get(
        f"{club.url}/Online/Reservations/CreateReservationCourtsView/{club.org_id}",
        params=_cr_when(club, start),
        headers=XHR,
        timeout=TIMEOUT,
    ).text
    link = re.search(r"fixUrl\('([^']+)'\)", view)
    assert link is not None and "__RequestVerificationToken" not in view
    url = html.unescape(link.group(1)).replace("https://reservations.courtreserve.com", club.url)
    page = session.get(url, timeout=TIMEOUT).text
    hidden = dict(re.findall(r'name="([^"]+)" type="hidden" value="([^"]*)"', page))
    return {
        **hidden,
        "RequestData": html.unescape(hidden["RequestData"]),
        "IsConsolidatedScheduler": "True",
        "StartTime": f"{start:%H:%M:%S}",
        "Duration": "60",
        "CourtId": "40002",
        "ReservationTypeId": club.reservation_type_id,
        "DisclosureAgree": "true",
    }


def _cr_book(
    club: CourtReserveMock,
    session: requests.Session,
    form: dict,
    headers: dict[str, str] = XHR,
    culture: str = "en-US",
) -> requests.Response:
    return session.post(
        f"{club.url}/Online/ReservationsApi/CreateReservation/{club.org_id}",
        params={"uiCulture": culture},
        data=form,
        headers=headers,
        allow_redirects=False,
        timeout=TIMEOUT,
    )


def test_courtreserve_login_is_json_with_isvalid(courtreserve: CourtReserveMock) -> None:
    url = f"{courtreserve.url}/Online/Account/Login"
    creds = {"IsApiCall": True, "UserNameOrEmail": courtreserve.email,
             "Password": courtreserve.password}  # fmt: skip
    # Without the login page's session cookie first, the login is refused.
    cold = requests.post(url, params={"id": courtreserve.org_id}, json=creds, timeout=TIMEOUT)
    assert cold.json()["IsValid"] is False
    session = requests.Session()
    page = session.get(f"{courtreserve.url}/Online/Account/LogIn/{courtreserve.org_id}")
    assert page.status_code == 200 and "ASP.NET_SessionId" in session.cookies
    wrong = session.post(
        url, params={"id": courtreserve.org_id}, json={**creds, "Password": "nope"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert wrong.status_code == 200
    assert wrong.text == ('{"IsValid":false,"Message":"Invalid email/username or password."}')
    good = session.post(url, params={"id": courtreserve.org_id}, json=creds, timeout=TIMEOUT)
    assert good.text.startswith('{"IsValid":true,')
    assert good.json()["Data"]["RequestData"]


def test_courtreserve_courts_view_links_the_form_which_carries_the_tokens(
    courtreserve: CourtReserveMock,
) -> None:
    start = slot()
    view_url = (
        f"{courtreserve.url}/Online/Reservations/CreateReservationCourtsView/{courtreserve.org_id}"
    )
    when = _cr_when(courtreserve, start)
    assert requests.get(view_url, params=when, headers=XHR, timeout=TIMEOUT).status_code == 401
    session = _cr_login(courtreserve)
    assert session.get(view_url, params=when, timeout=TIMEOUT).status_code == 400  # not XHR
    view = session.get(view_url, params=when, headers=XHR, timeout=TIMEOUT).text
    # The token in the link is percent-encoded (base64's + / =).
    token = re.search(r"requestData=([^'&]+)'", view)
    assert token is not None and token.group(1).endswith("%3D")
    form = _cr_form(courtreserve, session, start)
    assert form["__RequestVerificationToken"] and form["MemberId"] == courtreserve.member_id
    assert form["Date"] == f"{start.month}/{start.day}/{start.year} 12:00:00 AM"
    # The form asked for with a request-data token it did not issue has no form in it.
    forged = session.get(
        f"{courtreserve.url}/Online/ReservationsApi/CreateReservation",
        params={"id": courtreserve.org_id, **when, "requestData": "forged"},
        timeout=TIMEOUT,
    )
    assert forged.status_code == 200 and "__RequestVerificationToken" not in forged.text


def test_courtreserve_reservation_checks_what_the_portal_checks(
    courtreserve: CourtReserveMock,
) -> None:
    start = slot()
    session = _cr_login(courtreserve)
    form = _cr_form(courtreserve, session, start)
    missing = {k: v for k, v in form.items() if k != "__RequestVerificationToken"}
    no_token = _cr_book(courtreserve, session, missing)
    assert no_token.status_code == 500
    assert 'anti-forgery form field "__RequestVerificationToken" is not present' in no_token.text
    assert _cr_book(courtreserve, session, form, headers={}).status_code == 400
    assert _cr_book(courtreserve, session, {**form, "RequestData": "x"}).json()["isValid"] is False
    iso = _cr_book(courtreserve, session, {**form, "Date": f"{start:%Y-%m-%d} 12:00:00 AM"})
    assert iso.json() == {"isValid": False, "message": "The Date field is invalid."}
    assert _cr_book(courtreserve, session, {**form, "Duration": "75"}).json() == {
        "isValid": False,
        "message": "The Duration field is invalid.",
    }
    courtreserve.opens_at = time.time() + 60
    assert (
        "only allowed to reserve up to" in _cr_book(courtreserve, session, form).json()["message"]
    )
    courtreserve.opens_at = None
    assert _cr_book(courtreserve, session, form).json()["isValid"] is True
    assert _cr_book(courtreserve, session, form).json()["message"] == (
        "Sorry, no available courts for the time requested."
    )
    courtreserve.expire_sessions()
    assert _cr_book(courtreserve, session, form).status_code == 401
    assert [(b.court, b.start, b.minutes) for b in courtreserve.bookings] == [
        ("40002", start.astimezone(UTC), 60)
    ]


# -- each ready flow against its mock ---------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """How an entry for this system looks, and what its booking leaves at the mock."""

    court: Callable[[Any], str | int]
    booked_court: Callable[[Any], str]
    minutes: int
    status: str
    ref: Callable[[Any], Any]
    early: str = "early"
    expired: str = "credentials"
    refused_login: str = "credentials"
    setup: Callable[[Any, datetime], None] = lambda club, start: None
    #: What a taken court ends in ("unmatched": the system's answer is not told apart).
    taken: str = "taken"


CASES = {
    "playtomic": Case(
        court=lambda c: c.courts[0],
        booked_court=lambda c: c.courts[0],
        minutes=90,
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id,
        early="taken",  # Playtomic's 409 before the slot is on sale
    ),
    "clubautomation": Case(
        court=lambda c: "-1",
        booked_court=lambda c: "1",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        expired="rejected",  # a 200 saying "you don't have permission to reserve"
        refused_login="failed:login",  # a 200 with isValid false
    ),
    "doinsport": Case(
        court=lambda c: c.courts[1],
        booked_court=lambda c: c.courts[1],
        minutes=90,
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id,
    ),
    "perfectgym": Case(
        court=lambda c: 76014,
        booked_court=lambda c: "76014",
        minutes=60,
        status="Booked",
        ref=lambda c: None,
        setup=lambda club, start: club.add_class(76014, start),
    ),
    "courtreserve": Case(
        court=lambda c: "40002",
        booked_court=lambda c: "40002",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        refused_login="credentials",  # a 200 with IsValid false: the login step's rejected
    ),
    "skedda": Case(
        court=lambda c: c.spaces[0],
        booked_court=lambda c: c.spaces[0],
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: c.bookings[0].id,
        # a wrong password is a 422 that the login's rejected matcher reads
    ),
    "eversports": Case(
        court=lambda c: "ebi-5501",
        booked_court=lambda c: "ebi-5501",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: next(iter(c.carts)),
        setup=lambda club, start: club.add_item("ebi-5501", start),
        early="unmatched",  # its "not possible yet" is not told apart by public clients
        expired="rejected",  # a 200 whose GraphQL error says UNAUTHENTICATED
    ),
    "nubapp": Case(
        court=lambda c: 101,
        booked_court=lambda c: "101",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        setup=lambda club, start: club.add_activity(101, start),
        early="unmatched",  # the code of a session not open yet is not shown publicly
    ),
    "glofox": Case(
        court=lambda c: "Padel Social",
        booked_court=lambda c: "Padel Social",
        minutes=60,
        status="BOOKED",
        ref=lambda c: None,
        setup=lambda club, start: club.add_event("Padel Social", start),
        early="unmatched",  # success false, whatever the reason
        taken="unmatched",
    ),
    "clubspark": Case(
        court=lambda c: c.courts[0],
        booked_court=lambda c: c.courts[0],
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
        # A taken court, or a date not open yet, is not in the availability: its value is
        # missing (the engine looks again until it shows up).
        early="failed:availability",
        taken="failed:availability",
    ),
    "better": Case(
        court=lambda c: "tennis-court-outdoor",
        booked_court=lambda c: "tennis-court-outdoor",
        minutes=60,
        status="CONFIRMED",
        ref=lambda c: None,
    ),
}


@pytest.fixture(params=sorted(CASES))
def system(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def club(system: str) -> Iterator[ClubMock]:
    with MOCKS[system](zone="Europe/Paris") as mock:
        yield mock


def _run(system: str, club: ClubMock, start: datetime, **kwargs: Any) -> FlowRun:
    case = CASES[system]
    case.setup(club, start)
    instance = Instance(start=start, minutes=case.minutes, court_id=case.court(club))
    return run_flow(
        flow_for_mock(system, club.url), secrets=club.tokens_entry(), instance=instance, **kwargs
    )


def test_ready_flow_books_at_its_mock(system: str, club: ClubMock) -> None:
    case, start = CASES[system], slot()
    run = _run(system, club, start)
    assert run.outcome == "booked", run.steps
    assert [(b.court, b.start, b.minutes, b.status) for b in club.bookings] == [
        (case.booked_court(club), start.astimezone(UTC), case.minutes, case.status)
    ]
    assert run.booking_ref == case.ref(club)
    # Only the booking step carries the Idempotency-Key.
    keyed = [r for r in club.requests if r.header("Idempotency-Key")]
    booking_step = next(s for s in load_flow(system)["steps"] if s.get("booking"))
    assert len(keyed) == 1 and keyed[0].method == booking_step["method"]


def test_ready_flow_meets_a_taken_court(system: str, club: ClubMock) -> None:
    case, start = CASES[system], slot()
    courts = club.courts if system == "clubautomation" else [case.booked_court(club)]
    for court in courts:
        club.take(court, start, case.minutes)
    run = _run(system, club, start)
    assert run.outcome == CASES[system].taken
    assert club.bookings == []


def test_ready_flow_meets_a_window_not_open_yet(system: str, club: ClubMock) -> None:
    club.opens_at = time.time() + 3600
    run = _run(system, club, slot())
    assert run.outcome == CASES[system].early
    assert club.bookings == []


def test_ready_flow_meets_a_login_that_expired_before_the_booking(
    system: str, club: ClubMock
) -> None:
    booking_step = next(s["name"] for s in load_flow(system)["steps"] if s.get("booking"))

    def expire_at_the_booking(step: str) -> None:
        if step == booking_step:
            club.expire_sessions()

    run = _run(system, club, slot(), before_step=expire_at_the_booking)
    assert run.outcome == CASES[system].expired
    assert run.steps[-1].name == booking_step
    assert club.bookings == []


def test_ready_flow_meets_a_refused_login(system: str, club: ClubMock) -> None:
    secrets = club.tokens_entry()
    club.password = "changed-by-the-user"
    case = CASES[system]
    case.setup(club, slot())
    run = run_flow(
        flow_for_mock(system, club.url),
        secrets=secrets,
        instance=Instance(start=slot(), minutes=case.minutes, court_id=case.court(club)),
    )
    assert run.outcome == case.refused_login
    assert club.bookings == []


# -- the user documentation -------------------------------------------------------------------

# The page of the docs site that lists the ready flows and shows how to use one.
DOC = Path(__file__).resolve().parent.parent / "docs" / "clubs" / "index.md"


def test_the_docs_table_names_each_ready_flow_and_its_tokens_fields() -> None:
    rows = re.findall(r"^\| [^|]+ \| `(\w+)\.json` \| ([^|]+) \|", DOC.read_text(), re.MULTILINE)
    assert {file for file, _ in rows} == set(MOCKS)
    for file, fields in rows:
        used = {f for name, f, _ in placeholders(load_flow(file)["steps"]) if name == "secret"}
        assert set(re.findall(r"`(\w+)`", fields)) == used, file


def test_the_docs_examples_are_valid() -> None:
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), re.DOTALL)
    use, tokens, entry, flow = (json.loads(block) for block in blocks)
    assert use == {"use": "perfectgym", "yourclub": "riverside"}
    assert set(tokens["padel"]) == set(PlaytomicMock().tokens_entry())
    assert entry["club"] == "playtomic" and entry["token"] == "padel"
    assert flow_problems(flow, "example") == []


@pytest.mark.parametrize("system", sorted(MOCKS))
def test_each_ready_flow_has_a_page_whose_tokens_example_fits_its_flow(system: str) -> None:
    page = DOC.parent / f"{system}.md"
    text = page.read_text()
    assert f"`data/clubs/{system}.json`" in text, page
    start = text.index("\n## What to put in `tokens.json`\n")
    section = text[start : text.index("\n## ", start + 1)]
    (token,) = json.loads(re.findall(r"```json\n(.*?)```", section, re.DOTALL)[0]).values()
    used = {f for name, f, _ in placeholders(load_flow(system)["steps"]) if name == "secret"}
    assert set(token) == used, page
    explained = set(re.findall(r"`(\w+)`", section.split("```")[-1]))
    assert used <= explained, (page, used - explained)
    flow = load_flow(system)
    repositories = re.findall(r"github\.com/[\w.-]+/[\w.-]+", " ".join(flow["sources"]))
    assert repositories, system
    assert [repo for repo in repositories if repo not in text] == [], page
    assert f"checked {flow['checked']}" in " ".join(text.split()), page


def test_skedda_cancel_is_a_delete_with_the_venue_token_and_refuses_the_rest() -> None:
    """``DELETE /bookings/{id}`` with the venue's antiforgery token cancels (204, no body), as
    ha-skedda-integration's ``cancel_booking`` sends it; no sign-in is 401, no token 400, an id
    the venue does not hold (or holds cancelled) 404."""
    with MOCKS["skedda"](zone="Europe/Paris") as club:
        session = requests.Session()
        run = _run("skedda", club, slot(), session=session)
        assert run.outcome == "booked", run.steps
        url = f"{club.url}/bookings/{run.booking_ref}"
        token = {"X-Skedda-RequestVerificationToken": run.step("venue_page").values["token"]}

        assert requests.delete(url, headers=token, timeout=TIMEOUT).status_code == 401
        assert session.delete(url, timeout=TIMEOUT).status_code == 400
        wrong = session.delete(f"{club.url}/bookings/1", headers=token, timeout=TIMEOUT)
        assert wrong.status_code == 404
        assert club.bookings[0].status == "CONFIRMED"

        done = session.delete(url, headers=token, timeout=TIMEOUT)
        assert (done.status_code, done.content) == (204, b"")
        assert club.bookings[0].status == "CANCELED"
        again = session.delete(url, headers=token, timeout=TIMEOUT)
        assert again.status_code == 404


def test_doinsport_cancel_is_a_put_of_canceled_true_and_refuses_the_rest(
    doinsport: DoinsportMock,
) -> None:
    """``PUT /clubs/bookings/{id}`` with ``{"canceled": true}`` and the bearer token cancels and
    answers the booking (sdlv-booker's ``cancelBooking``); no token is 401, an id the user does
    not hold 404."""
    run = _run("doinsport", doinsport, slot())
    assert run.outcome == "booked", run.steps
    url = f"{doinsport.url}/clubs/bookings/{run.booking_ref}"
    auth = _ds_login(doinsport)
    body = {"canceled": True}

    assert requests.put(url, json=body, timeout=TIMEOUT).status_code == 401
    wrong = requests.put(
        f"{doinsport.url}/clubs/bookings/no-such-booking", json=body, headers=auth, timeout=TIMEOUT
    )
    assert wrong.status_code == 404
    assert doinsport.bookings[0].status == "CONFIRMED"

    done = requests.put(url, json=body, headers=auth, timeout=TIMEOUT)
    assert done.status_code == 200 and done.json()["canceled"] is True
    assert doinsport.bookings[0].status == "CANCELED"
    assert doinsport.is_free(doinsport.bookings[0].court, slot(), 60)


@pytest.mark.parametrize("system", sorted(MOCKS))
def test_each_flow_page_says_whether_cancel_works_as_its_flow_does(system: str) -> None:
    """A flow with ``cancel`` steps: its page says cancel works, and the overview links it in
    its "Cancelling" paragraph; a flow without: its page says it does not, and why."""
    has_cancel = "cancel" in load_flow(system)
    text = (DOC.parent / f"{system}.md").read_text()
    start = text.index("\n## Cancelling\n")
    section = " ".join(text[start : text.index("\n## ", start + 1)].split())
    verdict = "does not work for" if not has_cancel else "works for"
    assert f"`python main.py cancel KEY` {verdict}" in section, system
    overview = DOC.read_text().split("**Cancelling.**", 1)[1].split("\n\n", 1)[0]
    assert (f"({system}.md#cancelling)" in overview) == has_cancel, system


@pytest.mark.parametrize("system", sorted(MOCKS))
def test_each_flow_page_says_whether_the_clubs_clock_is_measured_as_its_flow_does(
    system: str,
) -> None:
    """A flow with ``clock``: its page names the URL, and the overview links it in its "The
    club's clock" paragraph; a flow without: its page says it is not set, and why."""
    clock = load_flow(system).get("clock")
    text = (DOC.parent / f"{system}.md").read_text()
    start = text.index("\n## The club's clock\n")
    section = " ".join(text[start : text.index("\n## ", start + 1)].split())
    if clock is None:
        assert "`clock` is not set for " in section and ": " in section, system
    else:
        assert "`clock` is set for " in section, system
        assert f"`GET {clock['url']}`" in section, system
        assert "at most 20 requests" in section
    overview = DOC.read_text().split("**The club's clock.**", 1)[1].split("\n\n", 1)[0]
    assert (f"({system}.md#the-clubs-clock)" in overview) == (clock is not None), system
