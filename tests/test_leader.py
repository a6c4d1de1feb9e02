"""Leadership on a real PostgreSQL: one active daemon among real processes, takeover after
kill -9 and after the holder's connection is cut, presence of claim owners, the daemons table."""

from __future__ import annotations

import functools
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from pg_server import PgServer

import leader
import models
from conftest import NOW

CHILD = Path(__file__).with_name("leader_child.py")
WAIT_SECONDS = 15.0
TAKEOVER_LIMIT_SECONDS = 5.0  # CONTRACT section 10


class Child:
    """A leader_child.py process; its stdout lines arrive on a queue."""

    def __init__(self, url: str, ident: str) -> None:
        self.ident = ident
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), url, ident],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, word: str, timeout: float = WAIT_SECONDS) -> list[str]:
        """The fields of the next line starting with ``word`` (other lines are kept in seen)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.ident}: no {word!r} within {timeout} s: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.split()[0] == word:
                return line.split()

    def kill(self) -> float:
        """kill -9; the monotonic time it was sent."""
        sent = time.monotonic()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        return sent

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def child(pg_url: str) -> Iterator[Callable[[str], Child]]:
    """Starts a child process ``name`` contending on the test's database; all stopped after."""
    started: list[Child] = []

    def start(name: str) -> Child:
        started.append(Child(pg_url, name))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def holders(url: str, key: int) -> list[int]:
    """The backend pids holding advisory lock ``key`` on the database of ``url``."""
    with psycopg.connect(leader._conninfo(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted "
            "AND ((classid::int8 << 32) | objid::int8) = %s ORDER BY pid",
            (key,),
        ).fetchall()
    return [int(row[0]) for row in rows]


def poll_until(check: Callable[[], bool], seconds: float) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass; its last answer."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def terminate(pg_server: PgServer, backend_pid: int) -> None:
    with pg_server.admin() as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (backend_pid,)).fetchone()
    assert row == (True,)


# --------------------------------------------------------------------------- in one process


def test_one_holder_at_a_time_and_release_hands_over(pg_url: str) -> None:
    a = leader.Leadership(pg_url, "a")
    b = leader.Leadership(pg_url, "b")
    try:
        assert a.try_acquire() is True
        assert b.try_acquire() is False
        assert (a.active, b.active) == (True, False)
        assert a.still_held() is True
        assert b.still_held() is False
        assert a.try_acquire() is True  # already the holder: still true, nothing doubled
        a.release()
        assert a.active is False
        assert a.still_held() is False
        assert b.try_acquire() is True
        assert a.try_acquire() is False
    finally:
        a.close()
        b.close()


def test_the_lock_key_is_derived_from_a_name() -> None:
    assert leader.advisory_key("courtbot:active") == leader.advisory_key("courtbot:active")
    assert leader.advisory_key("courtbot:active") != leader.advisory_key("courtbot:other")
    assert -(2**63) <= leader.advisory_key("x") < 2**63
    assert leader.presence_key("a") == leader.advisory_key("courtbot:daemon:a")


def test_two_live_daemons_with_one_id_are_refused(pg_url: str) -> None:
    a = leader.Leadership(pg_url, "same")
    b = leader.Leadership(pg_url, "same")
    try:
        a.ensure_present()
        with pytest.raises(RuntimeError, match=r"^another live daemon has the id 'same'$"):
            b.try_acquire()
    finally:
        a.close()
        b.close()


def test_the_lock_lives_on_a_dedicated_autocommit_connection(pg_url: str) -> None:
    a = leader.Leadership(pg_url, "a")
    try:
        assert a.try_acquire()
        assert holders(pg_url, a.key) == [a.backend_pid]
        with psycopg.connect(leader._conninfo(pg_url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT application_name, state FROM pg_stat_activity WHERE pid = %s",
                (a.backend_pid,),
            ).fetchone()
            settings = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name LIKE 'tcp_keepalives%' "
                "ORDER BY name"
            ).fetchall()
        # idle, not "idle in transaction": no transaction keeps anything else locked
        assert row == ("courtbot leader a", "idle")
        assert settings  # the server's own values, unchanged for other sessions
    finally:
        a.close()


def test_an_unreachable_server_is_a_one_line_error(pg_server: PgServer) -> None:
    from pg_server import free_port

    port = free_port()
    url = pg_server.url().replace(f":{pg_server.port}/", f":{port}/")
    a = leader.Leadership(url, "a")
    with pytest.raises(models.DatabaseConnectError) as caught:
        a.try_acquire()
    assert str(caught.value) == (
        f"cannot open the database postgresql://postgres:***@127.0.0.1:{port}/postgres "
        f"(host 127.0.0.1, port {port}, database postgres): connection refused; check that "
        f"PostgreSQL runs at 127.0.0.1 port {port} and accepts TCP connections, or fix the "
        "host and port in DATABASE_URL"
    )


def test_presence_survives_the_loss_of_the_lock_connection_only(
    pg_server: PgServer, pg_url: str
) -> None:
    a = leader.Leadership(pg_url, "a")
    b = leader.Leadership(pg_url, "b")
    try:
        assert a.try_acquire()
        assert b.alive_ids(["a", "b", "gone"]) == {"a", "b"}
        assert a.backend_pid is not None
        terminate(pg_server, a.backend_pid)
        assert a.still_held() is False
        assert a.active is False
        # a is still alive (its claims are its own) and b may take over (once the server has
        # ended the terminated backend, which frees its lock)
        assert b.alive_ids(["a", "b"]) == {"a", "b"}
        assert poll_until(b.try_acquire, 5.0)
        a.close()
        # The server drops a's presence lock when its backend has gone, a moment after close.
        assert poll_until(lambda: b.alive_ids(["a", "b"]) == {"b"}, 5.0)
    finally:
        a.close()
        b.close()


def test_local_leadership_is_always_active() -> None:
    local = leader.leadership_for("sqlite:///data/db.sqlite", "me")
    assert isinstance(local, leader.LocalLeadership)
    assert local.try_acquire() is True
    assert local.still_held() is True
    assert local.alive_ids(["me", "other"]) == {"me"}
    local.release()
    assert local.active is False
    assert isinstance(leader.leadership_for("postgresql://u@h/db", "me"), leader.Leadership)


# --------------------------------------------------------------------------- real processes


def test_two_processes_one_active(pg_url: str, child: Callable[[str], Child]) -> None:
    a = child("a")
    active_pid = int(a.wait_for("active")[2])
    b = child("b")
    b.wait_for("standby")
    # b has tried (and failed); the server shows a's connection as the only holder
    assert holders(pg_url, leader.advisory_key(leader.LEADER_LOCK_NAME)) == [active_pid]
    assert "active" not in " ".join(b.seen)


def test_kill_9_of_the_active_one_and_the_standby_takes_over(child: Callable[[str], Child]) -> None:
    rounds = 3
    phases = random.Random(13)
    current = child("d0")
    current.wait_for("active")
    figures = []
    for n in range(1, rounds + 1):
        standby = child(f"d{n}")
        standby.wait_for("standby")
        # the death falls anywhere in the standby's polling period, as it would in real life
        time.sleep(phases.uniform(0, leader.POLL_SECONDS))
        killed_at = current.kill()
        took_at = float(standby.wait_for("active")[1])
        figures.append(took_at - killed_at)
        current = standby
    print(
        f"\ntakeover after kill -9 over {rounds} runs: min {min(figures):.3f} s, "
        f"median {statistics.median(figures):.3f} s, max {max(figures):.3f} s"
    )
    assert max(figures) < TAKEOVER_LIMIT_SECONDS, figures


def test_a_cut_lock_connection_stops_the_holder_and_the_standby_takes_over(
    pg_server: PgServer, child: Callable[[str], Child]
) -> None:
    a = child("a")
    backend_pid = int(a.wait_for("active")[2])
    b = child("b")
    b.wait_for("standby")
    cut_at = time.monotonic()
    terminate(pg_server, backend_pid)
    lost_at = float(a.wait_for("lost")[1])
    took_at = float(b.wait_for("active")[1])
    # a goes back to waiting; b keeps it
    a.wait_for("standby")
    print(
        f"\ncut lock connection: holder noticed after {lost_at - cut_at:.3f} s, "
        f"standby active after {took_at - cut_at:.3f} s"
    )
    assert took_at - cut_at < TAKEOVER_LIMIT_SECONDS
    # the old holder stopped before the new one may book (it waits SETTLE_SECONDS first)
    assert lost_at < took_at + leader.SETTLE_SECONDS


def test_sigterm_releases_for_the_standby(child: Callable[[str], Child]) -> None:
    a = child("a")
    a.wait_for("active")
    b = child("b")
    b.wait_for("standby")
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(10) == 0
    b.wait_for("active")


def test_a_killed_daemon_is_no_longer_present(pg_url: str, child: Callable[[str], Child]) -> None:
    a = child("a")
    a.wait_for("active")
    me = leader.Leadership(pg_url, "me")
    try:
        assert me.alive_ids(["a", "me"]) == {"a", "me"}
        a.kill()
        deadline = time.monotonic() + WAIT_SECONDS
        while me.alive_ids(["a"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert me.alive_ids(["a", "me"]) == {"me"}
    finally:
        me.close()


# --------------------------------------------------------------------------- the daemons table


def test_heartbeats_and_the_list_for_status(db_url: str) -> None:
    engine = models.make_engine(db_url)
    live = leader.leadership_for(db_url, "active-one")
    try:
        live.try_acquire()
        started = NOW - timedelta(minutes=10)
        beat = functools.partial(leader.write_heartbeat, engine, started_at=started)
        active = {"ident": "active-one", "role": leader.ACTIVE, "host": "h1", "pid": 11}
        beat(**active, since=NOW - timedelta(minutes=5), now=NOW)
        gone = {"ident": "gone", "role": leader.STANDBY, "host": "h2", "pid": 22}
        beat(**gone, since=started, now=NOW - timedelta(hours=2))
        # a second beat updates the row
        beat(**active, since=NOW - timedelta(minutes=5), now=NOW + timedelta(seconds=5))
        states = leader.list_daemons(engine, now=NOW + timedelta(seconds=6))
        assert [(s.id, s.host, s.pid, s.role, s.alive) for s in states] == [
            ("active-one", "h1", 11, "active", True),
            ("gone", "h2", 22, "standby", False),
        ]
        assert states[0].heartbeat_at == NOW + timedelta(seconds=5)
        assert states[0].since == NOW - timedelta(minutes=5)
        assert states[0].started_at == started
        forgotten = leader.forget_dead(
            engine, now=NOW + timedelta(seconds=6), older_than=timedelta(hours=1)
        )
        assert forgotten == ["gone"]
        leader.remove_daemon(engine, "active-one")
        assert leader.list_daemons(engine, now=NOW) == []
    finally:
        live.close()
        engine.dispose()


def test_a_role_must_be_active_or_standby(db_url: str) -> None:
    engine = models.make_engine(db_url)
    try:
        with pytest.raises(ValueError, match=r"^role must be one of \('active', 'standby'\), "):
            leader.write_heartbeat(
                engine, ident="x", role="leader", started_at=NOW, since=NOW, now=NOW
            )
    finally:
        engine.dispose()


def test_a_heartbeat_names_this_host_and_process_by_default(db_url: str) -> None:
    engine = models.make_engine(db_url)
    try:
        leader.write_heartbeat(
            engine, ident="me", role=leader.STANDBY, started_at=NOW, since=NOW, now=NOW
        )
        (state,) = leader.list_daemons(engine, now=NOW)
        assert (state.host, state.pid) == (os.uname().nodename, os.getpid())
    finally:
        engine.dispose()
