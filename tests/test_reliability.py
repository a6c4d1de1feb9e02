"""Reliability, end to end: the real daemon (``python main.py run``) in subprocesses receiving
real signals, against the sandbox club, a real SMTP server and a recording HTTP server, all on
loopback. Each test asserts the figures it measures and prints them; ``pytest -rA`` shows them,
and the module's summary (every figure of the run) is printed after its last test.

1. crashes: a kill -9 storm while bookings fire;
2. club faults, each ending in the status of CONTRACT section 6 with a reason a person can act on;
3. secrets: a full cycle, then every byte the daemon wrote or sent is scanned for the token;
   FERNET_KEY rotation; file modes;
4. concurrency: 100 bookings on one trigger with a reload at that moment; one daemon per
   database.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken

from daemon_harness import (
    READY_SECONDS,
    DaemonProcess,
    cli,
    desired_for_trigger_in,
    iso_z,
    status,
    wait_until,
)
from reliability_helpers import (
    db_rows,
    files_under,
    free_port,
    http_recorder,
    proc_status_kb,
    scan,
    smtp_server,
    trickle_server,
)
from tools.sandbox_club import ReceivedRequest, SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-Rel1ab+S3cret/ab=cd-7f3e9a1c5d"
FINAL = ("booked", "failed", "expired")
#: Every figure measured in this module, by test; printed after the last test.
FIGURES: dict[str, dict[str, Any]] = {}


def record(test: str, **figures: Any) -> None:
    """Keep a test's figures for the module summary and print them (shown by ``-rA``; the
    module summary comes with the last test, which is therefore not an xfail one)."""
    FIGURES[test] = figures
    print(f"FIGURES {test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    print("\n==== reliability figures ====")
    for test, figures in FIGURES.items():
        print(f"{test}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --------------------------------------------------------------------------- plumbing


def make_env(tmp_path: Path, api_url: str, tokens: dict[str, str] | None = None) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "tokens.json").write_text(json.dumps(tokens or {"default": TOKEN}))
    (data / "schedules.json").write_text("[]")
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "BOOKING_API_URL": api_url,
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "RETRY_BASE_SECONDS": "0.2",
        "HTTP_TIMEOUT_SECONDS": "2",
        "RELOAD_INTERVAL_SECONDS": "60",
    }


def write_schedules(env: dict[str, str], entries: list[dict[str, Any]]) -> None:
    path = Path(env["DATA_DIR"]) / "schedules.json"
    tmp = path.with_name(".schedules.json.tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)


def one_off(entry_id: str, desired: datetime, court: object = 3, **extra: Any) -> dict[str, Any]:
    return {
        "id": entry_id,
        "type": "one-off",
        "desired_time": iso_z(desired),
        "court_id": court,
        **extra,
    }


def open_window_start(hours: float = 100) -> datetime:
    """A whole-second start whose 168 h window is already open: booked as soon as loaded."""
    return (datetime.now(UTC) + timedelta(hours=hours)).replace(microsecond=0)


def rows(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    return db_rows(Path(env["DATA_DIR"]) / "db.sqlite")


def final(env: dict[str, str], keys: list[str], timeout: float) -> bool:
    def done() -> bool:
        now = rows(env)
        return all(now.get(k, ("", 0))[0] in FINAL for k in keys)

    return wait_until(done, timeout)


def all_output(daemons: list[DaemonProcess], env: dict[str, str]) -> str:
    log = Path(env["LOG_FILE"])
    return "".join(d.output() for d in daemons) + (log.read_text() if log.exists() else "")


@contextlib.contextmanager
def db_connection(env: dict[str, str]) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(Path(env["DATA_DIR"]) / "db.sqlite", timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def gaps(requests: list[ReceivedRequest]) -> list[float]:
    return [round(b.arrived - a.arrived, 3) for a, b in itertools.pairwise(requests)]


# --------------------------------------------------------------------------- 1. crashes


def test_kill9_storm_while_bookings_fire_books_each_instance_exactly_once(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """20 one-offs on 6 consecutive trigger seconds; the daemon is SIGKILLed 5 times, 1-2.5 s
    apart (blind, or aimed at a booking in flight: the club takes 150 ms to answer), and
    restarted at once each time."""
    instances, seconds, kills = 20, 6, 5
    with SandboxClub(tokens=(TOKEN,), response_delay=0.15) as club:
        env = make_env(tmp_path, club.url)
        first = desired_for_trigger_in(3.0)
        desired: dict[str, datetime] = {}
        entries = []
        for i in range(instances):
            start = first + timedelta(seconds=i % seconds)
            # One court each: no two instances ask for the same (court, start).
            entries.append(one_off(f"storm-{i:02d}", start, court=f"c{i:02d}"))
            desired[f"storm-{i:02d}@{iso_z(start)}"] = start
        write_schedules(env, entries)
        triggers = {k: (d - timedelta(hours=168)).timestamp() for k, d in desired.items()}
        pid_file = Path(env["DATA_DIR"]) / "bot.pid"

        daemons = [spawn(env)]
        kill_log: list[dict[str, Any]] = []
        blind = random.Random(20261123)
        for n in range(kills):
            daemon = daemons[-1]
            born = time.time()
            seen = len(club.received)
            sent_before = {r.idempotency_key for r in club.received}
            up_at = None  # its pid file, or its first request, whichever came first
            # Kills 1, 3, 5 are blind: a random moment 1-2 s after the start (start-up,
            # recovery, waiting for a trigger, in flight: whatever it is doing). Kills 2 and 4
            # wait for a booking fired at its trigger and still unanswered (else 2.5 s).
            aimed = n % 2 == 1
            deadline = born + (2.5 if aimed else blind.uniform(1.0, 2.0))
            while time.time() < deadline:
                mine = club.received[seen:]
                if up_at is None and (
                    mine or (pid_file.exists() and pid_file.read_text().strip() == str(daemon.pid))
                ):
                    up_at = min([time.time(), *(r.arrived for r in mine)])
                fresh = [r for r in mine if not r.done and r.idempotency_key not in sent_before]
                if aimed and time.time() >= born + 1.0 and fresh:
                    break
                time.sleep(0.01)
            in_flight = [r.idempotency_key for r in club.received if not r.done]
            daemon.kill9()
            kill_log.append(
                {
                    "born": born,
                    "up": up_at,
                    "killed": time.time(),
                    "in_flight": in_flight,
                    "aimed": aimed,
                }
            )
            daemons.append(spawn(env))
        last = daemons[-1]
        seen = len(club.received)
        last.wait_ready()
        last_up = min([time.time(), *(r.arrived for r in club.received[seen:])])
        assert final(env, list(desired), 30), last.output()
        # Let any request still under way land before counting.
        assert club.wait_for(lambda: all(r.finished for r in club.received), 5)
        assert last.stop() == 0

        db = rows(env)
        per_key = club.bookings_per_key()
        received = club.received
        by_status = Counter(state for state, _ in db.values())
        lost = [k for k in desired if db.get(k, ("",))[0] != "booked"]
        doubles = {k: n for k, n in per_key.items() if n > 1}
        stray = [r.idempotency_key for r in received if r.idempotency_key not in desired]
        early = [
            r.idempotency_key
            for r in received
            if r.idempotency_key in triggers and r.arrived < triggers[r.idempotency_key]
        ]
        sent_per_key = Counter(r.idempotency_key for r in received)
        replays = sum(n - 1 for n in sent_per_key.values())
        in_flight_kills = sum(1 for k in kill_log if k["in_flight"])
        aimed_hits = sum(1 for k in kill_log if k["aimed"] and k["in_flight"])
        cut = sum(len(k["in_flight"]) for k in kill_log)
        # A trigger that passed while no daemon was up (started and not yet killed).
        up = [(k["up"], k["killed"]) for k in kill_log if k["up"] is not None]
        up.append((last_up, float("inf")))
        during_downtime = sum(1 for t in triggers.values() if not any(a <= t < b for a, b in up))
        statuses = {row["key"]: row for row in status(env)}
        refs = {b.idempotency_key: b.id for b in club.bookings}

        record(
            "kill9_storm",
            kills=len(kill_log),
            kills_with_request_in_flight=in_flight_kills,
            aimed_kills_that_hit=aimed_hits,
            requests_cut_by_a_kill=cut,
            instances=len(desired),
            triggers_while_down=during_downtime,
            requests=len(received),
            resent_same_key=replays,
            booked=by_status["booked"],
            lost=len(lost),
            double_bookings=len(doubles),
            left_in_booking=by_status["booking"],
        )
        assert len(kill_log) == kills
        assert lost == []
        assert doubles == {}
        assert dict(per_key) == dict.fromkeys(desired, 1)
        assert by_status == {"booked": instances}
        assert stray == [] and early == []
        # An aimed kill did cut a booking off in flight (the club answers in 150 ms).
        assert aimed_hits >= 1
        for key in desired:
            assert statuses[key]["status"] == "booked"
            assert statuses[key]["booking_ref"] == refs[key]
        out = all_output(daemons, env)
        assert "database is locked" not in out
        assert TOKEN not in out


def test_kill9_in_flight_then_down_across_triggers(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """Section 7 and 6 across one outage. ``gone`` is in flight when the daemon is SIGKILLed
    and its start has passed when it comes back: ``failed``, its outcome unknown, not sent
    again. Three more instances trigger while it is down, their start still ahead at the
    restart: all booked at once, once each."""
    with SandboxClub(tokens=(TOKEN,)) as club:
        club.fault("hang", seconds=30)
        env = make_env(tmp_path, club.url) | {
            "BOOKING_WINDOW": "0.001h",  # 3.6 s: triggers come fast, starts soon after
            "HTTP_TIMEOUT_SECONDS": "30",
        }
        base = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
        later = base + timedelta(seconds=4)  # trigger: base + 0.4 s, during the outage
        gone = f"gone@{iso_z(base)}"
        late = [f"late-{c}@{iso_z(later)}" for c in (1, 2, 3)]
        write_schedules(
            env, [one_off("gone", base), *(one_off(f"late-{c}", later, court=c) for c in (1, 2, 3))]
        )
        first = spawn(env)
        assert club.wait_for(lambda: len(club.received) == 1, 10), first.output()
        assert rows(env)[gone][0] == "booking"
        first.kill9()
        killed = time.time()
        assert wait_until(lambda: datetime.now(UTC) > base + timedelta(seconds=0.6), 10)
        restarted = spawn(env)
        back = time.time()
        restarted.wait_ready()
        assert final(env, [gone, *late], 15), restarted.output()
        assert restarted.stop() == 0
        by_key = {r["key"]: r for r in status(env)}
        row = by_key[gone]
        received = club.received
        late_trigger = later.timestamp() - 3.6
        record(
            "kill9_in_flight_then_down_across_triggers",
            gone=row["status"],
            triggered_while_down=len(late),
            booked_at_restart=sum(1 for k in late if by_key[k]["status"] == "booked"),
            requests=len(received),
        )
    assert killed < late_trigger < back  # the setup did what it says
    assert row["status"] == "failed"
    assert "outcome is unknown" in row["last_error"]
    assert "check with the club" in row["last_error"]
    assert f"failed {gone}" in restarted.output()
    assert [r.idempotency_key for r in received].count(gone) == 1
    assert all(by_key[k]["status"] == "booked" for k in late)
    assert club.bookings_per_key() == dict.fromkeys(late, 1)
    assert all(r.arrived >= back for r in received if r.idempotency_key in late)


# --------------------------------------------------------------------------- 2. club faults


def test_connection_refused_fails_after_3_attempts(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    env = make_env(tmp_path, f"http://127.0.0.1:{free_port()}/bookings")
    desired = open_window_start()
    write_schedules(env, [one_off("refused", desired)])
    started = time.monotonic()
    daemon = spawn(env)
    daemon.wait_ready()
    key = f"refused@{iso_z(desired)}"
    assert final(env, [key], 20), daemon.output()
    elapsed = time.monotonic() - started
    assert daemon.stop() == 0
    row = next(r for r in status(env) if r["key"] == key)
    record("connection_refused", attempts=row["attempts"], last_error=row["last_error"])
    assert row["status"] == "failed"
    assert row["attempts"] == 3
    assert "refused" in row["last_error"]
    assert "no booking after 3 attempts" in row["last_error"]
    assert elapsed >= 0.6  # waits of 0.2 s and 0.4 s


REJECTED = "tok-Rejected-81c2e0d4aa"


class FaultBench:
    """One club and one daemon shared by the fault tests (a daemon start costs about a
    second): each test resets the club, queues its faults and adds one instance whose window is
    already open (SIGHUP), which the daemon books at once."""

    def __init__(
        self,
        club: SandboxClub,
        env: dict[str, str],
        daemon: DaemonProcess,
        *,
        keys: tuple[bytes, bytes],
        under_old: str,
    ) -> None:
        self.club = club
        self.env = env
        self.daemon = daemon
        self.old_key, self.new_key = keys
        self.under_old = under_old
        self.entries: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> str:
        """Add ``entry`` to schedules.json and reload; returns its instance key."""
        self.entries.append(entry)
        write_schedules(self.env, self.entries)
        self.daemon.signal(signal.SIGHUP)
        return f"{entry['id']}@{entry['desired_time']}"

    def book(self, entry_id: str, **options: Any) -> tuple[str, dict[str, Any]]:
        """Add a one-off whose window is open; wait for its final status; (key, status row)."""
        desired = options.pop("desired", None) or open_window_start(100 + len(self.entries))
        key = self.add(one_off(entry_id, desired, **options))
        return key, self.row(key)

    def row(self, key: str, timeout: float = 20) -> dict[str, Any]:
        """The instance's ``status --json`` row once its status is final."""
        assert final(self.env, [key], timeout), self.daemon.output()
        return next(r for r in status(self.env) if r["key"] == key)


@pytest.fixture(scope="class")
def fault_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultBench]:
    folder = tmp_path_factory.mktemp("faults")
    # FERNET_KEY rotation rides along: tokens.json holds the token encrypted under the old key,
    # FERNET_KEY is "new,old" (every booking below needs it decrypted).
    old, new = Fernet.generate_key(), Fernet.generate_key()
    under_old = Fernet(old).encrypt(TOKEN.encode()).decode()
    with SandboxClub(tokens=(TOKEN,)) as club:
        env = make_env(folder, club.url, {"default": under_old, "club-a": REJECTED})
        env["HTTP_TIMEOUT_SECONDS"] = "1"
        env["FERNET_KEY"] = f"{new.decode()},{old.decode()}"
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), folder / "daemon.out").start()
        try:
            daemon.wait_ready()
            yield FaultBench(club, env, daemon, keys=(old, new), under_old=under_old)
            assert daemon.stop() == 0
            out = all_output([daemon], env)
            assert TOKEN not in out and REJECTED not in out
            assert "Traceback" not in out
        finally:
            daemon.cleanup()


@pytest.fixture
def bench(fault_bench: FaultBench) -> Iterator[FaultBench]:
    fault_bench.club.reset()
    fault_bench.club.clock_offset = 0.0
    yield fault_bench
    fault_bench.club.reset()
    fault_bench.club.clock_offset = 0.0


class TestClubFaults:
    """Section 6's answer table, one fault at a time, against one daemon (``bench``)."""

    def test_5xx_then_success_is_booked_after_backoff(self, bench: FaultBench) -> None:
        club = bench.club
        club.fault("status", status=500)
        club.fault("status", status=503)
        _, row = bench.book("five-hundred")
        received = club.received
        record("5xx_then_success", statuses=[r.status for r in received], gaps_s=gaps(received))
        assert row["status"] == "booked"
        assert row["attempts"] == 3
        assert row["last_error"] is None
        assert row["booking_ref"] == club.bookings[0].id
        assert [r.status for r in received] == [500, 503, 201]
        first, second = gaps(received)
        assert first >= 0.2 and second >= 0.4  # RETRY_BASE_SECONDS, then twice it

    def test_425_while_the_club_clock_lags_then_booked_when_it_opens(
        self, bench: FaultBench
    ) -> None:
        club = bench.club
        # The club's clock is 300 ms behind ours: at our trigger its window is not open yet.
        club.clock_offset = -0.3
        desired = desired_for_trigger_in(1.5)
        trigger = (desired - timedelta(hours=168)).timestamp()
        key = bench.add(one_off("lagging-club", desired))
        row = bench.row(key)
        received = club.received
        late_ms = [round((r.arrived - trigger) * 1000) for r in received]
        record(
            "425_club_clock_behind",
            statuses=[r.status for r in received],
            arrival_after_our_trigger_ms=late_ms,
            club_late_ms=[round(r.late_ms or 0) for r in received],
        )
        assert row["status"] == "booked"
        assert received[0].status == 425
        # Sent at our trigger (never before), which is before the club's own opening.
        assert 0 <= late_ms[0] < 300
        assert received[0].late_ms is not None and received[0].late_ms < 0
        assert received[-1].status == 201
        assert all(r.status == 425 for r in received[:-1])
        assert row["attempts"] == len(received)
        # Early answers (CONTRACT section 6): sent again at once, then every EARLY_RETRY_MS
        # (100 ms), not after a backoff: booked within one EARLY_RETRY_MS of the club opening.
        assert gaps(received)[0] < 0.05
        assert all(gap >= 0.09 for gap in gaps(received)[1:])
        assert 0 <= (received[-1].late_ms or 0) < 150

    def test_429_with_retry_after_is_honoured(self, bench: FaultBench) -> None:
        club = bench.club
        club.fault("status", status=429, retry_after=1)
        _, row = bench.book("too-many")
        received = club.received
        record("429_retry_after_1", statuses=[r.status for r in received], gap_s=gaps(received))
        assert row["status"] == "booked"
        assert row["attempts"] == 2
        assert [r.status for r in received] == [429, 201]
        # Retry-After (1 s), not RETRY_BASE_SECONDS (0.2 s).
        assert 1.0 <= gaps(received)[0] < 3.0

    def test_timeout_then_success(self, bench: FaultBench) -> None:
        club = bench.club
        club.fault("hang", seconds=3)  # HTTP_TIMEOUT_SECONDS is 1
        key, row = bench.book("slow-club")
        received = club.received
        record("timeout_1s_then_success", requests=len(received), gap_s=gaps(received))
        assert row["status"] == "booked"
        assert row["attempts"] == 2
        assert len(received) == 2 and received[1].status == 201
        # Waited out the 1 s timeout, then the backoff base (the club stamps arrivals a hair after
        # the client starts its timeout, hence 1.15 rather than 1.2).
        assert gaps(received)[0] >= 1.15
        assert f"attempt {key} court=3 #1: no answer within 1 s" in bench.daemon.output()

    def test_reset_mid_answer_books_once(self, bench: FaultBench) -> None:
        club = bench.club
        # The club books, sends "201" and part of the body, then resets the connection (RST).
        club.fault("reset")
        key, row = bench.book("reset")
        received = club.received
        record(
            "reset_mid_answer",
            requests=len(received),
            attempts=row["attempts"],
            booking_ref=row["booking_ref"],
            club_bookings=len(club.bookings),
        )
        # The status line (201) arrived before the reset: that is the club's answer (section 6:
        # 2xx = booked), so it is booked at once, its reference lost with the body. A retry with
        # the same Idempotency-Key would be as safe; either way the club holds one booking.
        assert row["status"] == "booked"
        assert row["attempts"] == len(received)
        assert club.bookings_per_key() == {key: 1}
        assert {r.idempotency_key for r in received} == {key}

    def test_answer_lost_after_the_club_booked_is_retried_with_the_same_key(
        self, bench: FaultBench
    ) -> None:
        club = bench.club
        # The club books, then drops the connection without a status line.
        club.fault("close", book=True)
        key, row = bench.book("answer-lost")
        received = club.received
        record("answer_lost_then_retried", requests=len(received), attempts=row["attempts"])
        assert row["status"] == "booked"
        assert row["attempts"] == 2
        assert [r.idempotency_key for r in received] == [key, key]
        assert club.bookings_per_key() == {key: 1}
        assert row["booking_ref"] == club.bookings[0].id

    def test_2xx_with_a_non_json_body_is_booked_without_a_ref(self, bench: FaultBench) -> None:
        club = bench.club
        club.fault("nonjson")
        _, row = bench.book("html-answer")
        record("nonjson_2xx", attempts=row["attempts"], booking_ref=row["booking_ref"])
        assert row["status"] == "booked"
        assert row["attempts"] == 1
        assert row["booking_ref"] is None
        assert len(club.received) == 1

    def test_2xx_with_a_50mb_body_is_booked_with_a_small_rss(self, bench: FaultBench) -> None:
        club = bench.club
        size = 50 * 1024 * 1024
        club.fault("huge", size=size)
        _, row = bench.book("huge-answer")
        rss_mb = proc_status_kb(bench.daemon.pid, "VmRSS") / 1024
        peak_mb = proc_status_kb(bench.daemon.pid, "VmHWM") / 1024
        assert club.wait_for(lambda: all(r.finished for r in club.received), 10)
        sent = club.received[0].sent
        record(
            "huge_2xx_50MB",
            rss_mb=round(rss_mb, 1),
            peak_rss_mb=round(peak_mb, 1),
            club_sent_mb=round(sent / 2**20, 1),
            attempts=row["attempts"],
        )
        assert row["status"] == "booked"
        assert row["attempts"] == 1
        assert rss_mb < 150 and peak_mb < 150
        # The daemon stopped reading: the club could not push the whole 50 MB.
        assert sent < size // 2

    def test_redirect_to_another_host_fails_and_the_token_never_follows(
        self, bench: FaultBench
    ) -> None:
        club = bench.club
        # "Another host" on loopback: another address and port.
        with http_recorder("127.0.0.2") as (port, elsewhere):
            club.fault("redirect", url=f"http://127.0.0.2:{port}/bookings", status=307)
            _, row = bench.book("redirected")
            time.sleep(0.2)  # anything that would have followed has had time to land
            record(
                "redirect_307_elsewhere",
                attempts=row["attempts"],
                club_requests=len(club.received),
                other_host_requests=len(elsewhere),
            )
            assert elsewhere == []
        assert row["status"] == "failed"
        assert row["attempts"] == 1
        assert len(club.received) == 1
        reason = row["last_error"]
        assert "redirect" in reason and f"127.0.0.2:{port}" in reason
        assert "never followed" in reason

    def test_401_fails_at_once_naming_the_token(self, bench: FaultBench) -> None:
        _, row = bench.book("wrong-token", token="club-a")
        record("401_token_rejected", attempts=row["attempts"], last_error=row["last_error"])
        assert row["status"] == "failed"
        assert row["attempts"] == 1
        assert len(bench.club.received) == 1
        reason = row["last_error"]
        assert "'club-a'" in reason and "401" in reason and "tokens.json" in reason
        assert REJECTED not in reason

    def test_409_on_the_first_court_books_the_second(self, bench: FaultBench) -> None:
        club = bench.club
        desired = open_window_start(150)
        club.set_taken("1", desired)  # someone else has court 1
        key, row = bench.book("second-court", court=[1, 2], desired=desired)
        received = club.received
        record(
            "409_first_court",
            statuses=[r.status for r in received],
            keys=[r.idempotency_key for r in received],
            booked_court=row["booked_court"],
        )
        assert [r.status for r in received] == [409, 201]
        assert [r.court_id for r in received] == ["1", "2"]
        assert [r.idempotency_key for r in received] == [f"{key}#1", f"{key}#2"]
        assert row["status"] == "booked"
        assert row["booked_court"] == "2"
        assert row["attempts"] == 2

    def test_fernet_key_rotation_rewrites_tokens_under_the_new_key(self, bench: FaultBench) -> None:
        _, row = bench.book("rotated")
        tokens_path = Path(bench.env["DATA_DIR"]) / "tokens.json"
        value = json.loads(tokens_path.read_text())["default"]
        with db_connection(bench.env) as conn:
            query = "SELECT encrypted_token FROM tokens WHERE id = 'default'"
            (in_db,) = conn.execute(query).fetchone()
        new, old = Fernet(bench.new_key), Fernet(bench.old_key)
        record(
            "fernet_rotation",
            status=row["status"],
            tokens_json_rewritten=value != bench.under_old,
            tokens_mode=oct(tokens_path.stat().st_mode & 0o777),
        )
        assert row["status"] == "booked"
        assert bench.club.received[0].token == TOKEN
        assert value != bench.under_old
        assert new.decrypt(value.encode()).decode() == TOKEN
        assert new.decrypt(in_db.encode()).decode() == TOKEN
        for stale in (value, in_db):
            with pytest.raises(InvalidToken):
                old.decrypt(stale.encode())
        assert tokens_path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def club() -> Iterator[SandboxClub]:
    with SandboxClub(tokens=(TOKEN,)) as running:
        yield running


def test_an_answer_dribbled_byte_by_byte_is_cut_at_http_timeout(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    # 201 at once, then a 400-byte body at one byte every 0.25 s: 100 s to read it all.
    with trickle_server(length=400, interval=0.25) as (port, arrivals):
        env = make_env(tmp_path, f"http://127.0.0.1:{port}/bookings")
        env["HTTP_TIMEOUT_SECONDS"] = "1"
        desired = open_window_start()
        key = f"dribble@{iso_z(desired)}"
        write_schedules(env, [one_off("dribble", desired)])
        daemon = spawn(env)
        daemon.wait_ready()
        if not wait_until(lambda: len(arrivals) >= 1, 10):
            pytest.fail(f"no request reached the server:\n{daemon.output()}")
        done = final(env, [key], 3.0)  # one request may take 1 s; three times that
        held = time.time() - arrivals[0]
        record("dribbled_answer", final_status_within_3s=done, held_s=round(held, 1))
        assert done, f"still {rows(env)[key][0]!r} {held:.1f} s after the request was sent"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(5) == 0


# --------------------------------------------------------------------------- 3. secrets

REVOKED = "tok-Rev0ked+S3cret/ef=gh-0b8d2e4477"
#: Files that hold secrets or state: owner only.
PRIVATE = ("tokens.json", "db.sqlite", "db.sqlite-wal", "db.sqlite-shm", "bot.log", "bot.pid")


def modes(data: Path) -> dict[str, str]:
    """Mode of every file in DATA_DIR but the user's own schedules.json."""
    return {
        p.name: oct(p.stat().st_mode & 0o777)
        for p in sorted(data.iterdir())
        if p.is_file() and p.name != "schedules.json"
    }


def test_full_cycle_leaks_no_token_anywhere(
    tmp_path: Path, spawn: Callable[..., DaemonProcess]
) -> None:
    """Plaintext tokens in tokens.json; one instance booked, one failed on 401, one missed;
    email through a real SMTP server and an Apprise json:// channel. Then every file in
    DATA_DIR, all daemon output, every email's raw bytes, every channel POST and the CLI's
    output are scanned for both tokens (plain, URL-encoded, base64)."""
    with (
        SandboxClub(tokens=(TOKEN,)) as club,
        smtp_server() as (smtp_port, mailbox),
        http_recorder() as (hook_port, posts),
    ):
        env = make_env(tmp_path, club.url, {"default": TOKEN, "revoked": REVOKED}) | {
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": str(smtp_port),
            "SMTP_SECURITY": "none",
            "SMTP_FROM": "courtbot@example.org",
            "NOTIFY_EMAIL": "alice@example.org",
            "NOTIFY_URLS": f"json://127.0.0.1:{hook_port}/hook",
        }
        data = Path(env["DATA_DIR"])
        # Phase 1: window 0 h (trigger = start, a few seconds ahead); the daemon stops before it.
        missed = desired_for_trigger_in(READY_SECONDS, window_hours=0)
        missed_key = f"missed@{iso_z(missed)}"
        write_schedules(env, [one_off("missed", missed)])
        first = spawn(env | {"BOOKING_WINDOW": "0h"})
        first.wait_ready(before=missed.timestamp() - 0.5)
        assert first.stop() == 0
        assert rows(env)[missed_key][0] == "pending"
        stored = json.loads((data / "tokens.json").read_text())
        assert all(v.startswith("gAAAAA") for v in stored.values())
        assert wait_until(lambda: datetime.now(UTC) > missed + timedelta(seconds=0.3), 10)

        # Phase 2: window 168 h; one books at once, one is refused (401), one was missed.
        booked, refused = open_window_start(100), open_window_start(101)
        booked_key, refused_key = f"booked@{iso_z(booked)}", f"refused@{iso_z(refused)}"
        write_schedules(
            env,
            [
                one_off("missed", missed),
                one_off("booked", booked),
                one_off("refused", refused, token="revoked"),
            ],
        )
        second = spawn(env)
        second.wait_ready()
        keys = [missed_key, booked_key, refused_key]
        assert final(env, keys, 20), second.output()
        assert wait_until(lambda: len(mailbox.raw) >= 3 and len(posts) >= 3, 20), second.output()
        running_modes = modes(data)
        assert second.stop() == 0
        states = {k: rows(env)[k][0] for k in keys}
        by_key = {row["key"]: row for row in status(env)}

        blobs = {f"DATA_DIR/{name}": blob for name, blob in files_under(data).items()}
        for path in sorted(tmp_path.glob("daemon*.out")):
            blobs[path.name] = path.read_bytes()
        for i, raw in enumerate(mailbox.raw):
            blobs[f"email #{i + 1}"] = raw
        for i, post in enumerate(posts):
            blobs[f"channel POST #{i + 1}"] = post.path.encode() + post.body
        table = cli(env, "status")
        blobs["status"] = (table.stdout + table.stderr).encode()
        blobs["status --json"] = json.dumps(list(by_key.values())).encode()
        hits = scan(blobs, [TOKEN, REVOKED])
        subjects = sorted(
            str(email.message_from_bytes(raw, policy=email.policy.default)["Subject"])
            for raw in mailbox.raw
        )
        titles = sorted(json.loads(post.body)["title"] for post in posts)
        record(
            "secrets_full_cycle",
            places_scanned=len(blobs),
            bytes_scanned=sum(len(b) for b in blobs.values()),
            token_hits=len(hits),
            emails=len(mailbox.raw),
            channel_posts=len(posts),
            statuses=sorted(states.values()),
        )
    assert hits == []
    assert states == {missed_key: "expired", booked_key: "booked", refused_key: "failed"}
    assert "'revoked'" in by_key[refused_key]["last_error"]
    assert "not running" in by_key[missed_key]["last_error"]
    prefixes = ("Booked:", "Booking failed:", "Booking missed:")
    for found in (subjects, titles):
        # One each: every subject (and channel title) starts with exactly one of the three.
        assert sorted(p for s in found for p in prefixes if s.startswith(p)) == sorted(prefixes)
        assert len(found) == 3
    assert "missed" in next(s for s in subjects if s.startswith("Booking missed:"))
    # Files that hold secrets or state are the owner's only (checked while the daemon ran).
    for name in (*PRIVATE, "heartbeat"):
        assert running_modes.get(name) == "0o600", (name, running_modes)
    assert set(running_modes.values()) == {"0o600"}, running_modes
    assert set(modes(data).values()) == {"0o600"}, modes(data)


def test_bot_log_stays_private_after_it_rotates(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], club: SandboxClub
) -> None:
    env = make_env(tmp_path, club.url)
    log = Path(env["LOG_FILE"])
    # An old log just under the 5 MiB rotation size, private as the daemon made it.
    line = b"2026-11-01T00:00:00.000Z INFO courtbot: an older line\n"
    with os.fdopen(os.open(log, os.O_CREAT | os.O_WRONLY, 0o600), "wb") as handle:
        handle.write(line * (5 * 2**20 // len(line)))
    previous = os.umask(0o022)  # the usual umask, whatever the test runner's
    try:
        daemon = spawn(env)
    finally:
        os.umask(previous)
    daemon.wait_ready()
    rotated = log.with_name("bot.log.1")
    if not rotated.exists():
        pytest.fail("the daemon's first lines did not roll the log over: the test proves nothing")
    modes_seen = {"bot.log": oct(log.stat().st_mode & 0o777)}
    modes_seen["bot.log.1"] = oct(rotated.stat().st_mode & 0o777)
    if daemon.stop() != 0:
        pytest.fail(f"the daemon did not stop cleanly:\n{daemon.output()}")
    record("rotated_log_modes", **modes_seen)
    assert modes_seen == {"bot.log": "0o600", "bot.log.1": "0o600"}


# --------------------------------------------------------------------------- 4. concurrency


def test_100_bookings_on_one_trigger_with_a_reload_at_that_moment(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], club: SandboxClub
) -> None:
    count = 100
    env = make_env(tmp_path, club.url) | {"RELOAD_INTERVAL_SECONDS": "0.2"}
    daemon = spawn(env)
    daemon.wait_ready()
    desired = desired_for_trigger_in(3.0)
    trigger = (desired - timedelta(hours=168)).timestamp()
    entries = [one_off(f"burst-{i:03d}", desired, court=str(i)) for i in range(1, count + 1)]
    keys = [f"burst-{i:03d}@{iso_z(desired)}" for i in range(1, count + 1)]
    write_schedules(env, entries)
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: len(rows(env)) == count, 5), daemon.output()
    assert trigger - time.time() > 0.5, "the load took too long for the test to mean anything"
    # At the trigger: the file changes (same entries, reordered, plus a far one) and SIGHUP.
    far = open_window_start(24 * 30)
    time.sleep(max(0.0, trigger - time.time()))
    write_schedules(env, [*reversed(entries), one_off("far", far)])
    daemon.signal(signal.SIGHUP)
    hup_at = time.time()
    assert final(env, keys, 30), daemon.output()
    far_key = f"far@{iso_z(far)}"
    assert wait_until(lambda: far_key in rows(env), 5), daemon.output()
    assert daemon.stop() == 0

    db = rows(env)
    per_key = club.bookings_per_key()
    received = club.received
    late_ms = sorted((r.arrived - trigger) * 1000 for r in received)
    out = all_output([daemon], env)
    # Reload times from bot.log only (the console gets the same lines). Each SIGHUP logs either
    # "config loaded (SIGHUP) in N ms" or, when the 0.2 s file check got to the change first,
    # "config unchanged (SIGHUP), checked in N ms" after a "config loaded (file change)".
    reload_re = re.compile(
        r"config (?:loaded|unchanged) \((SIGHUP|file change)\),? (?:checked )?in (\d+(?:\.\d+)?) ms"
    )
    events = [
        (m[1], float(m[2]))
        for line in Path(env["LOG_FILE"]).read_text().splitlines()
        if (m := reload_re.search(line))
    ]
    reloads = [ms for _, ms in events]
    record(
        "burst_100_with_reload",
        instances=count,
        booked=sum(1 for k in keys if db[k][0] == "booked"),
        lost=sum(1 for k in keys if db[k][0] != "booked"),
        double_bookings=sum(1 for n in per_key.values() if n > 1),
        requests=len(received),
        late_ms_median=round(late_ms[len(late_ms) // 2]),
        late_ms_max=round(late_ms[-1]),
        sighup_offset_ms=round((hup_at - trigger) * 1000),
        sighup_reload_ms=reloads,
        database_locked=out.count("database is locked"),
    )
    assert all(db[k] == ("booked", 1) for k in keys)
    assert dict(per_key) == dict.fromkeys(keys, 1)
    assert len(received) == count
    assert late_ms[0] >= 0  # never before the trigger
    assert db[far_key][0] == "pending"
    assert "database is locked" not in out
    assert "Traceback" not in out
    # Section 9: a reload of 100 schedules within a second. The one at the trigger competes with
    # 100 bookings for the database and the CPU: reported, with a margin for a busy machine.
    assert [reason for reason, _ in events].count("SIGHUP") == 2
    assert reloads[0] < 1000
    assert max(reloads[1:]) < 2000


def test_second_daemon_on_the_same_database_named_by_a_sqlite_uri_exits_2(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], club: SandboxClub
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    url = f"sqlite:///file:{shared / 'db.sqlite'}?uri=true"
    env = make_env(tmp_path, club.url) | {"DATABASE_URL": url}
    first = spawn(env)
    first.wait_ready()
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    second = spawn(env | {"DATA_DIR": str(other), "LOG_FILE": str(other / "bot.log")})
    assert second.proc is not None
    settled = wait_until(
        lambda: (
            second.proc is not None
            and (second.proc.poll() is not None or (other / "bot.pid").exists())
        ),
        15,
    )
    if not settled:
        pytest.fail(f"the second daemon neither exited nor started:\n{second.output()}")
    code = second.proc.poll()
    record("second_daemon_same_db_sqlite_uri", exit_code=code, running=code is None)
    assert first.stop() == 0
    assert code == 2, "a second daemon runs on the same database"


def test_second_daemon_on_the_same_database_from_another_data_dir_exits_2(
    tmp_path: Path, spawn: Callable[..., DaemonProcess], club: SandboxClub
) -> None:
    """Section 10: one daemon per database, whatever DATA_DIR says: the same DATABASE_URL, and
    the same file reached through a symlink and a ``.``."""
    shared = tmp_path / "shared"
    shared.mkdir()
    env = make_env(tmp_path, club.url) | {"DATABASE_URL": f"sqlite:///{shared / 'db.sqlite'}"}
    (tmp_path / "link").symlink_to(shared)
    first = spawn(env)
    first.wait_ready()
    codes = {}
    for spelling, url in (
        ("same-url", env["DATABASE_URL"]),
        ("other-spelling", f"sqlite:///{tmp_path / 'link' / '.' / 'db.sqlite'}"),
    ):
        other = tmp_path / spelling
        other.mkdir()
        (other / "tokens.json").write_text(json.dumps({"default": TOKEN}))
        second = spawn(
            env | {"DATA_DIR": str(other), "LOG_FILE": str(other / "bot.log"), "DATABASE_URL": url}
        )
        codes[spelling] = second.wait(20)
        lines = second.output().strip().splitlines()
        assert len(lines) == 1, lines
        assert "another courtbot daemon already holds" in lines[0]
        assert not (other / "bot.pid").exists()
    record("second_daemon_same_db", exit_codes=codes)
    assert codes == {"same-url": 2, "other-spelling": 2}
    assert first.proc is not None and first.proc.poll() is None
    assert first.stop() == 0
