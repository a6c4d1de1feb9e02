"""The mocks of Skedda, Eversports, Nubapp, Glofox, ClubSpark and Better, driven by hand with
``requests`` as their public clients drive them: each answers as its sources show, and refuses
what the real system refuses (a missing antiforgery token or Bearer header, a date or start in
the wrong format, a wrong password, an expired session). The ready flows against these mocks are
in test_clubmocks.py (in-process) and test_ready_flows.py (the engine and the daemon)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from clubmocks import BetterMock, ClubSparkMock, EversportsMock, GlofoxMock, NubappMock, SkeddaMock
from clubmocks.clubspark import app_auth
from clubmocks.skedda import TOKEN_HEADER

ZONE = ZoneInfo("Europe/Paris")
TIMEOUT = 5


def slot(days: int = 3, hour: int = 18) -> datetime:
    today = datetime.now(ZONE).replace(hour=hour, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days)


# -- Skedda -----------------------------------------------------------------------------------


@pytest.fixture
def skedda() -> Iterator[SkeddaMock]:
    with SkeddaMock(zone="Europe/Paris") as club:
        yield club


def _token(html: str) -> str:
    found = re.search(r'name="__RequestVerificationToken"[^>]*value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def _skedda_login(club: SkeddaMock, password: str | None = None) -> tuple[requests.Session, Any]:
    session = requests.Session()
    token = _token(session.get(f"{club.url}/account/login", timeout=TIMEOUT).text)
    answer = session.post(
        f"{club.url}/logins",
        json={"login": {"username": club.email, "password": password or club.password}},
        headers={TOKEN_HEADER: token},
        timeout=TIMEOUT,
    )
    return session, answer


def _skedda_venue(club: SkeddaMock, session: requests.Session) -> dict[str, str]:
    page = session.get(f"{club.url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and [r.status_code for r in page.history] == [302, 302]
    return {TOKEN_HEADER: _token(page.text)}


def _skedda_booking(club: SkeddaMock, start: datetime, **over: Any) -> dict[str, Any]:
    booking = {
        "spaces": [club.spaces[0]],
        "start": f"{start:%Y-%m-%dT%H:%M:%S}",
        "end": f"{start + timedelta(hours=1):%Y-%m-%dT%H:%M:%S}",
        "venue": "51234",
        "venueuser": "998877",
        "price": 0,
        "type": 1,
    }
    return {"booking": booking | over}


def test_skedda_sign_in_needs_the_antiforgery_token_and_a_right_password(
    skedda: SkeddaMock,
) -> None:
    creds = {"login": {"username": skedda.email, "password": skedda.password}}
    bare = requests.post(f"{skedda.url}/logins", json=creds, timeout=TIMEOUT)
    assert bare.status_code == 400
    session = requests.Session()
    session.get(f"{skedda.url}/account/login", timeout=TIMEOUT)
    forged = session.post(
        f"{skedda.url}/logins", json=creds, headers={TOKEN_HEADER: "forged"}, timeout=TIMEOUT
    )
    assert forged.status_code == 400
    _, wrong = _skedda_login(skedda, password="nope")
    assert wrong.status_code == 422
    assert "incorrect" in wrong.json()["errors"][0]["detail"]
    session, right = _skedda_login(skedda)
    assert right.status_code == 200 and "X-Skedda-Auth" in session.cookies


def test_skedda_venue_wants_its_own_token_and_a_session(skedda: SkeddaMock) -> None:
    anonymous = requests.get(f"{skedda.url}/", allow_redirects=False, timeout=TIMEOUT)
    assert anonymous.status_code == 302
    session, _ = _skedda_login(skedda)
    # Signed in, but the venue's own session comes only from its redirect chain.
    assert session.get(f"{skedda.url}/webs", timeout=TIMEOUT).status_code == 400
    sign_in_token = _token(session.get(f"{skedda.url}/account/login", timeout=TIMEOUT).text)
    # The sign-in host's token is not accepted by the venue.
    refused = session.get(
        f"{skedda.url}/webs", headers={TOKEN_HEADER: sign_in_token}, timeout=TIMEOUT
    )
    assert refused.status_code == 400
    webs = session.get(
        f"{skedda.url}/webs", headers=_skedda_venue(skedda, session), timeout=TIMEOUT
    ).json()
    assert (webs["venue"][0]["id"], webs["venueusers"][0]["id"]) == ("51234", "998877")
    assert [a["id"] for a in webs["assets"]] == list(skedda.spaces)
    skedda.expire_sessions()
    assert session.get(f"{skedda.url}/webs", timeout=TIMEOUT).status_code == 422


def test_skedda_bookings_answer_422_with_their_reason(skedda: SkeddaMock) -> None:
    session, _ = _skedda_login(skedda)
    headers = _skedda_venue(skedda, session)
    url = f"{skedda.url}/bookings"
    start = slot()
    aware = _skedda_booking(skedda, start)
    aware["booking"]["start"] = start.isoformat()  # an offset: Skedda wants venue-local time
    offset = session.post(url, json=aware, headers=headers, timeout=TIMEOUT)
    assert offset.status_code == 422 and "not a valid date" in offset.text
    assert session.post(url, json=_skedda_booking(skedda, start), timeout=TIMEOUT).status_code == (
        400
    )
    skedda.opens_at = time.time() + 60
    early = session.post(url, json=_skedda_booking(skedda, start), headers=headers, timeout=5)
    assert early.status_code == 422 and 'data-var=\\"duration-days\\"' in early.text
    skedda.opens_at = None
    booked = session.post(url, json=_skedda_booking(skedda, start), headers=headers, timeout=5)
    assert booked.status_code == 200
    assert booked.json()["booking"]["id"] == skedda.bookings[0].id
    again = session.post(url, json=_skedda_booking(skedda, start), headers=headers, timeout=5)
    assert again.status_code == 422 and "conflicts with one already scheduled" in again.text
    skedda.expire_sessions()
    later = _skedda_booking(skedda, slot(days=4))
    assert session.post(url, json=later, headers=headers, timeout=5).status_code == 401
    assert [(b.court, b.start) for b in skedda.bookings] == [
        (skedda.spaces[0], start.astimezone(UTC))
    ]


# -- Eversports -------------------------------------------------------------------------------


@pytest.fixture
def eversports() -> Iterator[EversportsMock]:
    with EversportsMock(zone="Europe/Paris") as club:
        yield club


def _gql(
    club: EversportsMock, session: requests.Session, operation: str, query: str, **variables: Any
) -> requests.Response:
    return session.post(
        f"{club.url}/api/checkout",
        json={"operationName": operation, "query": query, "variables": variables},
        timeout=TIMEOUT,
    )


LOGIN = "mutation LoginCredentialLogin { credentialLogin(params: $p, credentials: $c) { id } }"
CART = "mutation Cart { createCartFromEventBookableItem(bookableItemId: $b) { id } }"
ORDER = "mutation Order { createOrderFromCart(cartId: $c) { id } }"


def _ev_login(club: EversportsMock, password: str | None = None) -> tuple[requests.Session, Any]:
    session = requests.Session()
    session.get(f"{club.url}/", timeout=TIMEOUT)
    answer = _gql(
        club,
        session,
        "LoginCredentialLogin",
        LOGIN,
        credentials={"email": club.email, "password": password or club.password},
        params={"origin": "ORIGIN_MARKETPLACE", "region": "DE"},
    )
    return session, answer.json()["data"]["credentialLogin"]


def _ev_cart(club: EversportsMock, session: requests.Session, item: str) -> dict[str, Any]:
    answer = _gql(
        club,
        session,
        "UseCartCreationHandlerCreateCartFromEventBookableItem",
        CART,
        bookableItemId=item,
        origin="ORIGIN_MARKETPLACE",
        clientMetadata=None,
    )
    assert answer.status_code == 200
    return answer.json()


def test_eversports_graphql_refuses_what_graphql_refuses(eversports: EversportsMock) -> None:
    url = f"{eversports.url}/api/checkout"
    assert requests.post(url, data=b"query", timeout=TIMEOUT).status_code == 400
    doubled = _gql(eversports, requests.Session(), "LoginCredentialLogin", "{{ credentialLogin }}")
    assert doubled.status_code == 400
    unknown = _gql(eversports, requests.Session(), "Whatever", "mutation { whatever }")
    assert unknown.status_code == 400
    _, wrong = _ev_login(eversports, password="nope")
    assert wrong["__typename"] == "ExpectedErrors"
    session, right = _ev_login(eversports)
    assert right["__typename"] == "AuthResult" and right["user"]["id"]
    assert "et" in session.cookies


def test_eversports_cart_and_order(eversports: EversportsMock) -> None:
    start = slot()
    eversports.add_item("ebi-1", start)
    eversports.add_item("ebi-2", slot(days=4))
    anonymous = _ev_cart(eversports, requests.Session(), "ebi-1")
    assert anonymous["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
    session, _ = _ev_login(eversports)
    eversports.opens_at = time.time() + 60
    early = _ev_cart(eversports, session, "ebi-1")["data"]["createCartFromEventBookableItem"]
    assert "not possible yet" in early["errors"][0]["message"]
    eversports.opens_at = None
    cart = _ev_cart(eversports, session, "ebi-1")["data"]["createCartFromEventBookableItem"]
    assert cart["__typename"] == "Cart"
    assert [b.status for b in eversports.bookings] == ["PENDING"]
    again = _ev_cart(eversports, session, "ebi-1")["data"]["createCartFromEventBookableItem"]
    assert "already" in again["errors"][0]["message"]
    eversports.take("ebi-2", slot(days=4))
    full = _ev_cart(eversports, session, "ebi-2")["data"]["createCartFromEventBookableItem"]
    assert "fully booked" in full["errors"][0]["message"]
    order = _gql(eversports, session, "SummaryButtonCreateOrderFromCart", ORDER, cartId=cart["id"])
    assert order.json()["data"]["createOrderFromCart"]["__typename"] == "Order"
    assert [(b.court, b.status) for b in eversports.bookings] == [("ebi-1", "CONFIRMED")]


# -- Nubapp -----------------------------------------------------------------------------------


@pytest.fixture
def nubapp() -> Iterator[NubappMock]:
    with NubappMock(zone="Europe/Paris") as club:
        yield club


ORIGIN = {"Nubapp-Origin": "user_apps"}


def _nb_login(club: NubappMock, **over: str) -> requests.Response:
    form = {"username": club.email, "password": club.password} | over
    return requests.post(f"{club.url}/api/v4/login", data=form, headers=ORIGIN, timeout=TIMEOUT)


def _nb_post(club: NubappMock, path: str, token: str, headers: dict[str, str], **form: str):
    body = {"app_version": "5.13.06", "id_application": "4187", "id_user": "731942"} | form
    return requests.post(
        f"{club.url}/api/v4/activities/{path}",
        data={k: v for k, v in body.items() if v is not None},
        headers={"Authorization": f"Bearer {token}"} | headers,
        timeout=TIMEOUT,
    )


def test_nubapp_login_and_calendar(nubapp: NubappMock) -> None:
    start = slot()
    calendar_id = nubapp.add_activity(101, start)
    no_origin = requests.post(f"{nubapp.url}/api/v4/login", data={}, timeout=TIMEOUT)
    assert no_origin.json()["success"] is False
    assert _nb_login(nubapp, password="nope").status_code == 401
    token = _nb_login(nubapp).json()["token"]
    day = f"{start:%d-%m-%Y}"
    path = "getActivitiesCalendar.php"
    unauthorized = _nb_post(nubapp, path, "x", ORIGIN, start_timestamp=day, end_timestamp=day)
    assert unauthorized.status_code == 401
    iso = f"{start:%Y-%m-%d}"
    wrong_date = _nb_post(nubapp, path, token, ORIGIN, start_timestamp=iso, end_timestamp=iso)
    assert wrong_date.json() == {"success": False, "error": 3, "message": "Invalid date."}
    headerless = _nb_post(nubapp, path, token, {}, start_timestamp=day, end_timestamp=day)
    assert headerless.json()["success"] is False
    old_app = _nb_post(
        nubapp, path, token, ORIGIN, start_timestamp=day, end_timestamp=day, app_version=None
    )
    assert old_app.json()["error"] == 7
    listed = _nb_post(nubapp, path, token, ORIGIN, start_timestamp=day, end_timestamp=day)
    (item,) = listed.json()["data"]["activities_calendar"]
    assert (item["id_activity_calendar"], item["id_activity"]) == (calendar_id, 101)
    assert item["start_timestamp"] == f"{start:%Y-%m-%d %H:%M:%S}"


def test_nubapp_booking_codes(nubapp: NubappMock) -> None:
    first = nubapp.add_activity(101, slot())
    second = nubapp.add_activity(102, slot(days=4))
    token = _nb_login(nubapp).json()["token"]

    def book(calendar_id: int, **over: str) -> dict[str, Any]:
        form = {"id_activity_calendar": str(calendar_id), "action_by": "731942", "n_guests": "0"}
        answer = _nb_post(nubapp, "bookActivityCalendar.php", token, ORIGIN, **(form | over))
        return answer.json()

    nubapp.opens_at = time.time() + 60
    assert book(first)["error"] == 12
    nubapp.opens_at = None
    assert book(first, action_by="1")["success"] is False
    done = book(first)
    assert (done["success"], done["error"]) == (True, 0)
    assert book(first)["error"] == 5
    nubapp.take("102", slot(days=4))
    assert book(second)["error"] == 6
    nubapp.expire_sessions()
    expired = _nb_post(nubapp, "bookActivityCalendar.php", token, ORIGIN)
    assert expired.status_code == 401
    assert [(b.court, b.status) for b in nubapp.bookings] == [("101", "CONFIRMED")]


# -- Glofox -----------------------------------------------------------------------------------


@pytest.fixture
def glofox() -> Iterator[GlofoxMock]:
    with GlofoxMock(zone="Europe/Paris") as club:
        yield club


def _gf_login(club: GlofoxMock, **over: str) -> dict[str, Any]:
    body = {
        "branch_id": "5b6dd1a5e90c2d1f403fccb6",
        "namespace": "yourclubnamespace",
        "login": club.email,
        "password": club.password,
    } | over
    return requests.post(f"{club.url}/login", json=body, timeout=TIMEOUT).json()


def test_glofox_login_timetable_and_booking(glofox: GlofoxMock) -> None:
    start = slot()
    event_id = glofox.add_event("Padel Social", start)
    full_id = glofox.add_event("Padel Social", slot(days=4))
    assert _gf_login(glofox, password="nope") == {
        "success": False,
        "message": "INVALID_CREDENTIALS",
    }
    assert _gf_login(glofox, branch_id="other")["success"] is False
    token = _gf_login(glofox)["token"]
    auth = {"Authorization": f"Bearer {token}"}
    epoch = int(start.timestamp())
    url = f"{glofox.url}/2.0/events"
    params = {"start": epoch, "end": epoch, "private": "false", "sort_by": "time_start"}
    assert requests.get(url, params=params, timeout=TIMEOUT).status_code == 401
    bad = requests.get(url, params={"start": "tomorrow"}, headers=auth, timeout=TIMEOUT)
    assert bad.status_code == 400
    (item,) = requests.get(url, params=params, headers=auth, timeout=TIMEOUT).json()["data"]
    assert (item["_id"], item["name"], item["time_start"]) == (event_id, "Padel Social", epoch)

    def book(model_id: str) -> requests.Response:
        body = {"pay_gym": False, "guest_bookings": 0, "model": "event", "model_id": model_id}
        return requests.post(f"{glofox.url}/2.0/bookings", json=body, headers=auth, timeout=5)

    glofox.opens_at = time.time() + 60
    assert book(event_id).json()["success"] is False
    glofox.opens_at = None
    assert book(event_id).json()["success"] is True
    assert book(event_id).json()["message"] == "ALREADY_BOOKED"
    glofox.take("Padel Social", slot(days=4))
    assert book(full_id).json()["message"] == "EVENT_IS_FULL"
    glofox.expire_sessions()
    assert book(full_id).status_code == 401
    assert [(b.id, b.status) for b in glofox.bookings] == [(event_id, "BOOKED")]


# -- ClubSpark --------------------------------------------------------------------------------


@pytest.fixture
def clubspark() -> Iterator[ClubSparkMock]:
    with ClubSparkMock(zone="Europe/Paris") as club:
        yield club


def _cs_token(club: ClubSparkMock, basic: str | None = None, **over: str) -> requests.Response:
    body = {
        "username": club.email,
        "password": club.password,
        "scope": "https://api.clubspark.uk/token/",
        "grant_type": "password",
    } | over
    headers = {"Authorization": f"Basic {basic or app_auth()}"}
    return requests.post(f"{club.url}/issue/oauth2/token", json=body, headers=headers, timeout=5)


def test_clubspark_token_availability_and_request_session(clubspark: ClubSparkMock) -> None:
    club, start = clubspark, slot()
    assert _cs_token(club, basic="bm9wZTpub3Bl").json() == {"error": "invalid_client"}
    refused = _cs_token(club, password="nope")
    assert (refused.status_code, refused.json()) == (400, {"error": "invalid_grant"})
    assert _cs_token(club, grant_type="client_credentials").status_code == 400
    token = _cs_token(club).json()["access_token"]
    auth = {"Authorization": f"Lta-Auth {token}"}
    venue = club.tokens_entry()["venue"]
    url = f"{club.url}/v1/VenueBooking/{venue}/GetAvailabilityTimes"
    params = {"Duration": 60, "Date": f"{start:%Y-%m-%d}", "resourceCategory": 1}
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.get(url, params=params, headers=bearer, timeout=TIMEOUT).status_code == 401
    bad = params | {"Date": f"{start:%d/%m/%Y}"}
    assert requests.get(url, params=bad, headers=auth, timeout=TIMEOUT).status_code == 400
    club.take(club.courts[1], start)
    times = requests.get(url, params=params, headers=auth, timeout=TIMEOUT).json()["Times"]
    (at_six,) = [t for t in times if t["Time"] == 18 * 60]
    assert [r["ID"] for r in at_six["Resources"]] == [club.courts[0]]
    session = at_six["Resources"][0]["SessionID"]
    book_url = f"{club.url}/v0/VenueBooking/{venue}/RequestSession"

    def book(**over: Any) -> requests.Response:
        body = {
            "ResourceID": club.courts[0],
            "SessionID": session,
            "Date": f"{start:%Y-%m-%d}",
            "StartTime": 1080,
            "Duration": 60,
            "Source": "Android",
        } | over
        return requests.post(book_url, json=body, headers=auth, timeout=TIMEOUT)

    assert book(StartTime="18:00").status_code == 400
    assert book(Date=f"{start:%d/%m/%Y}").status_code == 400
    club.opens_at = time.time() + 60
    assert requests.get(url, params=params, headers=auth, timeout=TIMEOUT).json()["Times"] == []
    assert book().json()["Result"] < 0
    club.opens_at = None
    club.paid.add(club.courts[0])
    assert book().json()["Result"] < 0
    club.paid.clear()
    done = book().json()
    assert done["Result"] == 0 and done["TransactionID"]
    assert book().json()["Result"] < 0  # taken now
    club.expire_sessions()
    assert book().status_code == 401
    assert [(b.court, b.start, b.status) for b in club.bookings] == [
        (club.courts[0], start.astimezone(UTC), "CONFIRMED")
    ]


# -- Better -----------------------------------------------------------------------------------


@pytest.fixture
def better() -> Iterator[BetterMock]:
    with BetterMock(zone="Europe/Paris") as club:
        yield club


def test_better_login_times_basket_and_checkout(better: BetterMock) -> None:
    club, start = better, slot()
    login = f"{club.url}/api/auth/customer/login"
    wrong = requests.post(login, json={"username": club.email, "password": "x"}, timeout=5)
    assert wrong.status_code == 401
    body = {"username": club.email, "password": club.password}
    token = requests.post(login, json=body, timeout=TIMEOUT).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{club.url}/api/auth/user", timeout=TIMEOUT).status_code == 401
    user = requests.get(f"{club.url}/api/auth/user", headers=auth, timeout=TIMEOUT).json()
    member = user["data"]["membership_user"]["id"]
    venue = club.tokens_entry()["venue"]
    url = f"{club.url}/api/activities/venue/{venue}/activity/tennis-court-outdoor/v2/times"
    assert (
        requests.get(url, params={"date": f"{start:%d/%m/%Y}"}, headers=auth, timeout=5).status_code
        == 400
    )
    club.unreleased.add(start.date())
    assert (
        requests.get(url, params={"date": f"{start:%Y-%m-%d}"}, headers=auth, timeout=5).status_code
        == 422
    )
    club.unreleased.clear()
    club.opens_at = time.time() + 60

    def times() -> dict[str, Any]:
        data = requests.get(url, params={"date": f"{start:%Y-%m-%d}"}, headers=auth, timeout=5)
        return next(t for t in data.json()["data"] if t["starts_at"]["format_24_hour"] == "18:00")

    listed = times()
    assert listed["action_to_show"]["status"] is None  # listed before its release, same id
    occurrence = requests.get(
        f"{club.url}/api/v1/activities/occurrences/{listed['id']}", headers=auth, timeout=5
    ).json()["data"]["tickets"][0]

    def add(**over: Any) -> requests.Response:
        item = {
            "id": listed["id"],
            "type": "purchasableOccurrence",
            "purchased_for_user_id": None,
            "pricing_option_id": occurrence["pricing_option"]["id"],
            "ticket_id": occurrence["id"],
            "activity_restriction_ids": [],
        } | over
        payload = {"items": [item], "membership_user_id": member, "selected_user_id": None}
        return requests.post(
            f"{club.url}/api/activities/cart/add", json=payload, headers=auth, timeout=5
        )

    early = add()
    assert early.status_code == 409 and "try again" in early.json()["message"]
    club.opens_at = None
    assert times()["action_to_show"]["status"] == "BOOK"
    assert add(type="activity").status_code == 422
    item_hash = add().json()["itemHash"]

    def complete(**over: Any) -> requests.Response:
        payload = {
            "completed_waivers": [],
            "payments": [],
            "terms": [1],
            "transaction_uuid": None,
            "source": "activity-booking",
            "item_hash": item_hash,
        } | over
        return requests.post(
            f"{club.url}/api/checkout/complete", json=payload, headers=auth, timeout=5
        )

    assert complete(item_hash="stale").status_code == 422
    assert complete().status_code == 200
    assert times()["action_to_show"]["status"] == "FULL"
    full = add()
    assert full.status_code == 409 and "full" in full.json()["message"]
    club.expire_sessions()
    assert add().status_code == 401
    assert [(b.court, b.start, b.status) for b in club.bookings] == [
        ("tennis-court-outdoor", start.astimezone(UTC), "CONFIRMED")
    ]


def test_better_paid_session_stays_in_the_basket_without_a_payment(better: BetterMock) -> None:
    club, start = better, slot()
    club.paid.add("tennis-court-outdoor")
    body = {"username": club.email, "password": club.password}
    token = requests.post(f"{club.url}/api/auth/customer/login", json=body, timeout=5).json()[
        "token"
    ]
    auth = {"Authorization": f"Bearer {token}"}
    venue = club.tokens_entry()["venue"]
    url = f"{club.url}/api/activities/venue/{venue}/activity/tennis-court-outdoor/v2/times"
    data = requests.get(url, params={"date": f"{start:%Y-%m-%d}"}, headers=auth, timeout=5).json()
    slot_id = next(t["id"] for t in data["data"] if t["starts_at"]["format_24_hour"] == "18:00")
    ticket = {"id": slot_id * 3, "pricing_option": {"id": slot_id * 7}}
    item = {
        "id": slot_id,
        "type": "purchasableOccurrence",
        "pricing_option_id": ticket["pricing_option"]["id"],
        "ticket_id": ticket["id"],
    }
    cart = requests.post(
        f"{club.url}/api/activities/cart/add",
        json={"items": [item], "membership_user_id": 4410027, "selected_user_id": None},
        headers=auth,
        timeout=5,
    ).json()
    assert cart["total"] > 0
    payload = {"payments": [], "terms": [1], "item_hash": cart["itemHash"]}
    answer = requests.post(
        f"{club.url}/api/checkout/complete", json=payload, headers=auth, timeout=5
    )
    assert answer.status_code == 422 and "payment" in answer.json()["message"]
    assert [b.status for b in club.bookings] == ["PENDING"]
