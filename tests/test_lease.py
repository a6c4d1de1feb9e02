"""The lease that decides which daemon is active (CONTRACT section 10), on the suite's real
PostgreSQL, some of it through a TCP proxy that resets or blackholes the holder's link: expiry by
the database's clock, takeover ending the former holder's session, the holder's local proof,
claims and outcomes fenced by the lease's epoch, a former holder's claims held back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pg_server import PgServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tcp_proxy import TcpProxy
from test_instances import add_row

import instances
import leader
import models
from models import BOOKED, BOOKING, PENDING, Instance

pytestmark = pytest.mark.slow

TAKEOVER_LIMIT_SECONDS = 5.0  # CONTRACT section 10


def through(proxy: TcpProxy, url: str, pg_server: PgServer) -> str:
    return url.replace(f":{pg_server.port}/", f":{proxy.port}/")


@pytest.fixture
def proxy(pg_server: PgServer) -> Iterator[TcpProxy]:
    with TcpProxy(pg_server.port) as running:
        yield running


def backend_alive(pg_server: PgServer, pid: int) -> bool:
    with pg_server.admin() as conn:
        return bool(
            conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        )


def take_when_free(lead: leader.Leadership, seconds: float) -> float:
    """Try as a standby does (every POLL_SECONDS) until ``lead`` holds the lease; when."""
    deadline = time.monotonic() + seconds
    while not lead.try_acquire():
        assert time.monotonic() < deadline, "no takeover"
        time.sleep(leader.POLL_SECONDS)
    return time.monotonic()


def test_a_frozen_holders_lease_expires_by_the_database_clock_and_its_session_is_ended(
    pg_server: PgServer, pg_url: str
) -> None:
    a = leader.Leadership(pg_url, "a")
    b = leader.Leadership(pg_url, "b")
    try:
        assert a.try_acquire() is True
        first = a.epoch
        assert a.proves() is True
        pid = a.backend_pid
        assert pid is not None
        frozen = time.monotonic()  # a renews no more, as a paused process
        assert b.try_acquire() is False  # the lease is valid, its session alive
        took = take_when_free(b, 10)
        assert leader.LEASE_SECONDS - 0.2 <= took - frozen < TAKEOVER_LIMIT_SECONDS
        assert b.epoch == (first or 0) + 1
        # the former holder's session (and its advisory lock) was ended
        assert poll(lambda: not backend_alive(pg_server, pid), 3)
        # a, resumed, proves nothing, renews nothing: it sends nothing more
        assert a.proves() is False
        assert a.still_held() is False
        assert b.still_held() is True
    finally:
        a.close()
        b.close()


def poll(check: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_holder_proves_its_lease_locally_only_until_its_renewal_plus_the_lease(
    pg_url: str,
) -> None:
    a = leader.Leadership(pg_url, "a")
    try:
        assert a.try_acquire() is True
        valid = leader.LEASE_SECONDS - leader.PROOF_MARGIN_SECONDS
        assert a.proves(valid - 0.3) is True
        assert a.proves(valid + 0.1) is False
        started = time.perf_counter()
        for _ in range(10_000):
            a.proves(0.2)
        cost = (time.perf_counter() - started) / 10_000
        print(f"\nthe lease's proof before a send: {cost * 1e6:.2f} us (no round trip)")
        assert cost < 50e-6
        time.sleep(valid + 0.05)  # no renewal meanwhile
        assert a.proves() is False
        assert a.still_held() is False  # ran out: lost, and said so
    finally:
        a.close()


def test_a_blackholed_holder_notices_within_its_deadline_and_a_standby_takes_over(
    pg_server: PgServer, pg_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    a = leader.Leadership(through(proxy, pg_url, pg_server), "a")
    b = leader.Leadership(pg_url, "b")
    try:
        assert a.try_acquire() is True
        assert a.still_held() is True
        time.sleep(leader.RENEW_SECONDS)
        cut = time.monotonic()
        proxy.blackhole()
        while a.still_held():
            time.sleep(leader.CHECK_SECONDS)
        noticed = time.monotonic() - cut
        assert noticed < leader.RENEW_SECONDS + leader.RENEW_DEADLINE_SECONDS + 0.5
        assert "did not answer within" in caplog.text
        assert a.proves() is False
        took = take_when_free(b, 10) - cut
        assert took < TAKEOVER_LIMIT_SECONDS
        print(f"\nblackholed link: noticed after {noticed:.2f} s, takeover after {took:.2f} s")
    finally:
        proxy.heal()
        a.close()
        b.close()


def test_a_reset_holders_lease_is_taken_at_once_its_session_being_gone(
    pg_server: PgServer, pg_url: str, proxy: TcpProxy
) -> None:
    a = leader.Leadership(through(proxy, pg_url, pg_server), "a")
    b = leader.Leadership(pg_url, "b")
    try:
        assert a.try_acquire() is True
        cut = time.monotonic()
        proxy.reset()
        took = take_when_free(b, 5) - cut
        assert took < leader.LEASE_SECONDS  # the fast path: no wait for the expiry
        assert a.still_held() is False
    finally:
        a.close()
        b.close()


def row_of(factory: models.SessionFactory, key: str) -> Instance:
    with factory() as session:
        row = session.scalar(select(Instance).where(Instance.key == key))
        assert row is not None
        return row


@dataclass
class Pair:
    """Two daemons' leaderships, "a" and "b", on the suite's PostgreSQL database, its sessions,
    and when the test began."""

    factory: sessionmaker[Session]
    a: leader.Leadership
    b: leader.Leadership
    now: datetime


@pytest.fixture
def pair(pg_url: str) -> Iterator[Pair]:
    engine = models.make_engine(pg_url)
    made = Pair(
        models.session_factory(engine),
        leader.Leadership(pg_url, "a"),
        leader.Leadership(pg_url, "b"),
        datetime.now(UTC),
    )
    try:
        yield made
    finally:
        made.a.close()
        made.b.close()
        engine.dispose()


def test_claims_and_outcomes_are_fenced_by_the_lease_epoch_and_taken_over_by_its_rules(
    pair: Pair,
) -> None:
    factory, a, b, now = pair.factory, pair.a, pair.b, pair.now
    window = timedelta(hours=168)  # add_row's trigger: a week before the start
    add_row(factory, "sent@1", now - timedelta(seconds=1) + window, PENDING)  # maybe sent
    add_row(factory, "later@1", now + timedelta(hours=1) + window, PENDING)  # never sent
    add_row(factory, "free@1", now - timedelta(seconds=1) + window, PENDING)
    assert a.try_acquire() is True
    fence_a = instances.Fence("a", a.epoch or 0)
    assert instances.claim(factory, "sent@1", now, owner="a", fence=fence_a)
    assert instances.claim(factory, "later@1", now, owner="a", fence=fence_a)
    a.close()  # its session gone: b takes the lease at once
    assert b.try_acquire() is True
    fence_b = instances.Fence("b", b.epoch or 0)
    assert fence_b.epoch == fence_a.epoch + 1
    # a, no longer active, claims nothing and writes no outcome
    assert not instances.claim(factory, "free@1", now, owner="a", fence=fence_a)
    assert instances.finish(factory, "sent@1", BOOKED, None, now=now, fence=fence_a) is None
    assert row_of(factory, "sent@1").status == BOOKING
    # b: the unsent claim is pending at once, the maybe-sent one held
    done = instances.take_over_claims(
        factory, fence_b, now, hold_seconds=10 + leader.HOLD_MARGIN_SECONDS, margin_seconds=1
    )
    assert done.released == ["later@1"]
    assert [key for key, _ in done.held] == ["sent@1"]
    assert (done.retried, done.failed) == ([], [])
    assert row_of(factory, "later@1").status == PENDING
    assert row_of(factory, "sent@1").status == BOOKING
    # once the hold is over (as if HTTP_TIMEOUT_SECONDS had passed since the lease ended):
    # pending again, marked interrupted (its 409 may be our own)
    done = instances.take_over_claims(factory, fence_b, now, hold_seconds=-60, margin_seconds=1)
    assert done.retried == ["sent@1"]
    row = row_of(factory, "sent@1")
    assert (row.status, row.interrupted, row.owner) == (PENDING, True, None)
    # b's own claim under its lease is its own: claimed, finished
    assert instances.claim(factory, "sent@1", now, owner="b", fence=fence_b)
    assert row_of(factory, "sent@1").claim_epoch == fence_b.epoch
    outcome = instances.finish(factory, "sent@1", BOOKED, None, now=now, fence=fence_b)
    assert outcome is not None
    assert row_of(factory, "sent@1").status == BOOKED


def test_a_claim_sent_early_by_the_clubs_clock_is_held_not_released_at_a_takeover(
    pair: Pair,
) -> None:
    """A's booking runs by a club clock 9 s ahead: it may have left 9 s before its trigger. Its
    trigger comes well after A's lease ended, so by the trigger alone it "was never sent"; by
    the club's clock it may have been: held, then sent again with the same key."""
    factory, a, b, now = pair.factory, pair.a, pair.b, pair.now
    window = timedelta(hours=168)
    add_row(factory, "early@1", now + timedelta(seconds=10) + window, PENDING)
    add_row(factory, "plain@1", now + timedelta(seconds=10) + window, PENDING)
    assert a.try_acquire() is True
    fence_a = instances.Fence("a", a.epoch or 0)
    for key in ("early@1", "plain@1"):
        assert instances.claim(factory, key, now, owner="a", fence=fence_a)
    instances.record_clock(factory, "early@1", offset_ms=9000.0, uncertainty_ms=5.0)
    a.close()
    assert b.try_acquire() is True
    fence_b = instances.Fence("b", b.epoch or 0)
    done = instances.take_over_claims(
        factory, fence_b, now, hold_seconds=10 + leader.HOLD_MARGIN_SECONDS, margin_seconds=1
    )
    assert done.released == ["plain@1"]
    assert [key for key, _ in done.held] == ["early@1"]


def test_a_former_active_daemon_writes_no_step_of_a_watch_or_a_fallback(pair: Pair) -> None:
    """Section 13's transitions are a booking's writes too: a daemon whose lease has passed to
    another claims no try of a watch, and moves no claim of its own to a fallback time, to
    watching or to its end (CONTRACT section 10: only the active daemon writes)."""
    factory, a, b, now = pair.factory, pair.a, pair.b, pair.now
    window = timedelta(hours=168)
    add_row(factory, "mine@1", now + timedelta(hours=3) + window, PENDING)
    add_row(factory, "watched@1", now + timedelta(hours=3) + window, PENDING)
    with models.transaction(factory) as session:
        row = session.scalar(select(Instance).where(Instance.key == "watched@1"))
        assert row is not None
        row.status, row.next_try_at = models.WATCHING, now
        row.watch_until = now + timedelta(hours=2)
        mine = session.scalar(select(Instance).where(Instance.key == "mine@1"))
        assert mine is not None
        mine.watch_until = now + timedelta(hours=2)
    assert a.try_acquire() is True
    fence_a = instances.Fence("a", a.epoch or 0)
    assert instances.claim(factory, "mine@1", now, owner="a", fence=fence_a)
    a.close()
    assert b.try_acquire() is True
    later = now + timedelta(minutes=5)
    assert not instances.claim_watch(factory, "watched@1", now, owner="a", fence=fence_a)
    assert (
        instances.fall_back(factory, "mine@1", tried="18:00: taken", now=now, fence=fence_a) is None
    )
    assert instances.watch(factory, "mine@1", tried="taken", next_try=later, fence=fence_a) is None
    assert instances.watch_again(
        factory, "mine@1", next_try=later, said="taken", fence=fence_a
    )  # nothing more for it to do
    assert instances.end_watch(factory, "mine@1", now, fence=fence_a) is None
    row = row_of(factory, "mine@1")
    assert (row.status, row.owner, row.tried, row.watch_tries) == (BOOKING, "a", None, 0)
    assert row_of(factory, "watched@1").status == models.WATCHING


def test_the_pools_connections_notice_a_dead_link_in_seconds_and_bound_statements(
    pg_url: str,
) -> None:
    engine = models.make_engine(pg_url)
    try:
        with engine.connect() as conn:
            info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
            params = info.get_parameters()
            assert params["tcp_user_timeout"] == str(models.TCP_USER_TIMEOUT_MS)
            assert params["keepalives_idle"] == "1"
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "15s"
    finally:
        engine.dispose()
