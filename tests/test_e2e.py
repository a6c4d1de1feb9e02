"""End to end: the real daemon in a subprocess, the sandbox club on 127.0.0.1, real signals. The
tests marked ``both_databases`` run on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet

from daemon_harness import (
    DEFAULT_READY_SECONDS,
    READY_SECONDS,
    DaemonProcess,
    cli,
    desired_for_trigger_in,
    iso_z,
    ready_seconds,
    status,
    wait_until,
)
from scheduler import LEAD
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

TOKEN = "tok-e2e-5f1c9a"


@pytest.fixture
def club() -> Iterator[SandboxClub]:
    with SandboxClub(tokens=(TOKEN,)) as running:
        yield running


@pytest.fixture
def e2e_env(
    tmp_path: Path, club: SandboxClub, database: str, request: pytest.FixtureRequest
) -> dict[str, str]:
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps({"default": TOKEN}))
    env = {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "BOOKING_API_URL": club.url,
        "DATA_DIR": str(data),
        "LOG_FILE": str(data / "bot.log"),
        "RETRY_BASE_SECONDS": "0.05",
        "HTTP_TIMEOUT_SECONDS": "2",
        "RELOAD_INTERVAL_SECONDS": "60",
    }
    if database == "postgresql":
        env["DATABASE_URL"] = str(request.getfixturevalue("pg_url"))
    return env


def schedules(env: dict[str, str], entries: list[dict[str, object]]) -> None:
    (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps(entries))


def db_rows(env: dict[str, str]) -> dict[str, tuple[str, int]]:
    """key -> (status, attempts), read straight from the database (its file, for SQLite)."""
    if "DATABASE_URL" in env:
        with psycopg.connect(env["DATABASE_URL"], connect_timeout=10) as conn:
            try:
                found = conn.execute("SELECT key, status, attempts FROM schedules").fetchall()
            except psycopg.errors.UndefinedTable:
                return {}
        return {key: (state, attempts) for key, state, attempts in found}
    path = Path(env["DATA_DIR"]) / "db.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path, timeout=10) as conn:
        try:
            rows = conn.execute("SELECT key, status, attempts FROM schedules").fetchall()
        except sqlite3.OperationalError:
            return {}
    return {key: (state, attempts) for key, state, attempts in rows}


def status_of(env: dict[str, str], key: str) -> str | None:
    row = db_rows(env).get(key)
    return row[0] if row else None


def one_off(entry_id: str, desired: datetime, court: object = 3) -> dict[str, object]:
    return {"id": entry_id, "type": "one-off", "desired_time": iso_z(desired), "court_id": court}


def test_books_at_the_trigger_exactly_once(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    # Ready, then read pending before its job claims it (LEAD before the trigger).
    desired = desired_for_trigger_in(READY_SECONDS + LEAD.total_seconds())
    trigger = desired - timedelta(hours=168)
    schedules(e2e_env, [one_off("wed", desired)])
    daemon = spawn(e2e_env)
    daemon.wait_ready(before=(trigger - LEAD).timestamp())
    key = f"wed@{iso_z(desired)}"
    assert status_of(e2e_env, key) == "pending"
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 15), daemon.output()

    assert len(club.received) == 1
    request = club.received[0]
    late_ms = (request.arrived - trigger.timestamp()) * 1000
    assert 0 <= late_ms <= 250, f"arrived {late_ms:.1f} ms after the trigger"
    assert request.idempotency_key == key
    assert request.court_id == "3"
    assert club.bookings_per_key() == {key: 1}
    row = next(r for r in status(e2e_env) if r["key"] == key)
    assert row["status"] == "booked"
    assert row["booking_ref"] == club.bookings[0].id
    assert row["attempts"] == 1
    assert daemon.stop() == 0
    assert not (Path(e2e_env["DATA_DIR"]) / "bot.pid").exists()
    log = (Path(e2e_env["DATA_DIR"]) / "bot.log").read_text()
    assert key in log
    assert TOKEN not in log + daemon.output()


def sent_figure(log: str, key: str) -> tuple[float, str]:
    """From the outcome's log line of ``key``: how long after the trigger its first request left
    (seconds) and the phrase that says so."""
    line = next(ln for ln in log.splitlines() if f"booked {key} " in ln)
    match = re.search(r"\((sent ([\d.]+) (ms|s) (?:after the window opened|late: [^)]*))\)", line)
    assert match is not None, line
    figure = float(match[2]) / (1000 if match[3] == "ms" else 1)
    return figure, match[1]


def test_the_outcome_says_when_the_request_left_as_the_club_saw_it_arrive(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    desired = desired_for_trigger_in(READY_SECONDS)
    trigger = desired - timedelta(hours=168)
    schedules(e2e_env, [one_off("timed", desired)])
    daemon = spawn(e2e_env)
    daemon.wait_ready(before=trigger.timestamp())
    key = f"timed@{iso_z(desired)}"
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 15), daemon.output()
    assert daemon.stop() == 0

    sent, phrase = sent_figure(daemon.output(), key)
    arrived = club.received[0].arrived - trigger.timestamp()
    assert phrase.endswith(" ms after the window opened")
    # Left before the club saw it arrive (the figure is rounded to 0.1 ms), and on loopback
    # arrived soon after leaving (the bound of the test above, for a loaded machine).
    assert sent <= arrived + 0.00005, (sent, arrived)
    assert arrived - sent < 0.25, (sent, arrived)
    row = next(r for r in status(e2e_env) if r["key"] == key)
    assert row["sent"] == phrase
    first_sent = datetime.fromisoformat(row["first_sent_at"].replace("Z", "+00:00"))
    assert trigger <= first_sent
    assert first_sent.timestamp() <= club.received[0].arrived


def test_window_already_open_books_at_once_and_token_file_is_encrypted(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    desired = (datetime.now(UTC) + timedelta(hours=30)).replace(microsecond=0)
    schedules(e2e_env, [one_off("soon", desired, court=None)])
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    key = f"soon@{iso_z(desired)}"
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 10), daemon.output()
    assert club.received[0].court_id is None
    tokens_path = Path(e2e_env["DATA_DIR"]) / "tokens.json"
    stored = json.loads(tokens_path.read_text())
    assert stored["default"].startswith("gAAAAA")
    assert TOKEN not in tokens_path.read_text()
    assert tokens_path.stat().st_mode & 0o777 == 0o600
    assert (Path(e2e_env["DATA_DIR"]) / "db.sqlite").stat().st_mode & 0o777 == 0o600
    assert daemon.stop() == 0


@pytest.mark.both_databases
def test_sighup_reloads_and_a_bad_file_keeps_the_last_good_state(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    far = desired_for_trigger_in(3600)
    schedules(e2e_env, [one_off("a", far)])
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    key_a = f"a@{iso_z(far)}"
    assert status_of(e2e_env, key_a) == "pending"

    later = desired_for_trigger_in(7200)
    schedules(e2e_env, [one_off("a", far), one_off("b", later)])
    daemon.signal(signal.SIGHUP)
    key_b = f"b@{iso_z(later)}"
    assert wait_until(lambda: status_of(e2e_env, key_b) == "pending", 5), daemon.output()
    # only the new entry was reconciled (logged once the jobs follow, after the commit)
    assert wait_until(lambda: "entries changed: b" in daemon.output(), 5), daemon.output()

    (Path(e2e_env["DATA_DIR"]) / "schedules.json").write_text("[{not json")
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "not valid JSON" in daemon.output(), 5), daemon.output()
    assert status_of(e2e_env, key_a) == "pending"
    assert status_of(e2e_env, key_b) == "pending"
    assert daemon.proc is not None and daemon.proc.poll() is None

    # Removing an entry cancels its pending instance.
    schedules(e2e_env, [one_off("a", far)])
    assert cli(e2e_env, "reload").returncode == 0
    assert wait_until(lambda: status_of(e2e_env, key_b) == "cancelled", 5), daemon.output()
    assert daemon.stop() == 0
    assert club.received == []


def test_changed_file_is_reloaded_without_a_signal(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    env = dict(e2e_env, RELOAD_INTERVAL_SECONDS="0.2")
    schedules(env, [])
    daemon = spawn(env)
    daemon.wait_ready()
    desired = desired_for_trigger_in(2)
    schedules(env, [one_off("late-add", desired)])
    key = f"late-add@{iso_z(desired)}"
    assert wait_until(lambda: status_of(env, key) is not None, 5), daemon.output()
    assert wait_until(lambda: status_of(env, key) == "booked", 10), daemon.output()
    trigger = desired - timedelta(hours=168)
    assert club.received[0].arrived >= trigger.timestamp()
    assert daemon.stop() == 0


def test_second_daemon_on_the_same_data_dir_exits_2(
    e2e_env: dict[str, str], spawn: Callable[..., DaemonProcess]
) -> None:
    schedules(e2e_env, [])
    first = spawn(e2e_env)
    first.wait_ready()
    second = spawn(e2e_env)
    assert second.wait(20) == 2
    out = second.output().strip().splitlines()
    assert len(out) == 1, out
    assert "another courtbot daemon already holds" in out[0]
    assert first.proc is not None and first.proc.poll() is None
    assert first.stop() == 0


@pytest.mark.parametrize(
    ("drop", "extra", "needle"),
    [
        ("FERNET_KEY", {}, "FERNET_KEY is not set"),
        ("", {"FERNET_KEY": "not-a-key"}, "FERNET_KEY: key #1 is not a Fernet key"),
        ("BOOKING_API_URL", {}, "BOOKING_API_URL is not set"),
        ("", {"BOOKING_WINDOW": "7 days"}, "BOOKING_WINDOW: '7 days' is not a window"),
    ],
)
def test_cannot_start_exits_2_with_one_line(
    e2e_env: dict[str, str],
    spawn: Callable[..., DaemonProcess],
    drop: str,
    extra: dict[str, str],
    needle: str,
) -> None:
    env = {k: v for k, v in e2e_env.items() if k != drop} | extra
    daemon = spawn(env)
    assert daemon.wait(20) == 2
    lines = daemon.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert needle in lines[0]
    assert not (Path(env["DATA_DIR"]) / "bot.pid").exists()


def test_invalid_schedules_at_start_do_not_stop_the_daemon(
    e2e_env: dict[str, str], spawn: Callable[..., DaemonProcess]
) -> None:
    good = desired_for_trigger_in(3600)
    schedules(e2e_env, [one_off("good", good), {"id": "bad", "type": "one-off", "cour_id": 3}])
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    assert status_of(e2e_env, f"good@{iso_z(good)}") == "pending"
    assert "schedules.json entry 'bad' (#2): cour_id: unknown key" in daemon.output()
    assert daemon.stop() == 0


def test_kill9_before_the_trigger_then_restart_books_once(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    # Two starts before the trigger.
    desired = desired_for_trigger_in(2 * READY_SECONDS)
    schedules(e2e_env, [one_off("crash", desired)])
    first = spawn(e2e_env)
    first.wait_ready()
    first.kill9()
    restarted = spawn(e2e_env)
    restarted.wait_ready(before=(desired - timedelta(hours=168)).timestamp())
    key = f"crash@{iso_z(desired)}"
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 15), restarted.output()
    assert club.bookings_per_key() == {key: 1}
    assert len(club.received) == 1
    assert restarted.stop() == 0


def test_down_across_the_trigger_books_at_restart(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    desired = desired_for_trigger_in(READY_SECONDS)
    trigger = desired - timedelta(hours=168)
    schedules(e2e_env, [one_off("downtime", desired)])
    first = spawn(e2e_env)
    first.wait_ready(before=trigger.timestamp() - 0.5)  # and stopped before the trigger
    assert first.stop() == 0
    # Down for longer than a send may trail its trigger and still count as on time (1 s).
    assert wait_until(lambda: datetime.now(UTC) > trigger + timedelta(seconds=1.5), 10)
    restarted = spawn(e2e_env)
    restarted.wait_ready()
    key = f"downtime@{iso_z(desired)}"
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 10), restarted.output()
    assert club.bookings_per_key() == {key: 1}
    assert restarted.stop() == 0
    # How late, and why, against when the club saw it arrive.
    sent, phrase = sent_figure(restarted.output(), key)
    arrived = club.received[0].arrived - trigger.timestamp()
    assert phrase == f"sent {sent:.1f} s late: courtbot was not running at the trigger"
    assert sent <= arrived + 0.05 and arrived - sent < 0.2, (sent, arrived)


def test_down_past_the_start_is_expired(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    # A window of 0.0005 h (1.8 s): the trigger a few seconds ahead, the start just after.
    env = dict(e2e_env, BOOKING_WINDOW="0.0005h")
    desired = desired_for_trigger_in(READY_SECONDS, window_hours=0.0005)
    schedules(env, [one_off("gone", desired)])
    first = spawn(env)
    # ready and stopped before the trigger
    first.wait_ready(before=(desired - timedelta(hours=0.0005)).timestamp() - 0.5)
    key = f"gone@{iso_z(desired)}"
    assert first.stop() == 0
    assert status_of(env, key) == "pending"
    assert wait_until(lambda: datetime.now(UTC) > desired + timedelta(seconds=0.2), 15)
    restarted = spawn(env)
    restarted.wait_ready()
    assert status_of(env, key) == "expired"
    row = next(r for r in status(env) if r["key"] == key)
    assert "not running" in row["last_error"]
    assert row["sent"] == "not sent: courtbot was not running at the trigger"
    assert f"expired {key}" in restarted.output()
    assert "(not sent: courtbot was not running at the trigger)" in restarted.output()
    assert club.received == []
    assert restarted.stop() == 0


def test_sigterm_between_retries_puts_it_back_to_pending(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    env = dict(e2e_env, RETRY_BASE_SECONDS="30")
    club.fault("status", count=10, status=503)
    desired = (datetime.now(UTC) + timedelta(hours=100)).replace(microsecond=0)
    schedules(env, [one_off("busy", desired)])
    daemon = spawn(env)
    daemon.wait_ready()
    assert wait_until(lambda: len(club.received) == 1, 10), daemon.output()
    assert daemon.stop(timeout=10) == 0
    key = f"busy@{iso_z(desired)}"
    assert status_of(env, key) == "pending"


def test_kill9_with_a_request_in_flight_is_retried_with_the_same_key(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    env = dict(e2e_env, HTTP_TIMEOUT_SECONDS="30")
    club.fault("hang", seconds=30)
    desired = (datetime.now(UTC) + timedelta(hours=100)).replace(microsecond=0)
    schedules(env, [one_off("inflight", desired)])
    first = spawn(env)
    first.wait_ready()
    key = f"inflight@{iso_z(desired)}"
    assert wait_until(lambda: len(club.received) == 1, 10), first.output()
    assert status_of(env, key) == "booking"
    first.kill9()
    restarted = spawn(env)
    restarted.wait_ready()
    assert wait_until(lambda: status_of(env, key) == "booked", 10), restarted.output()
    keys = [r.idempotency_key for r in club.received]
    assert keys == [key, key]
    assert club.bookings_per_key()[key] == 1
    assert restarted.stop() == 0


@pytest.mark.both_databases
def test_retry_command_and_a_running_daemon_book_it_again(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    club.fault("status", count=1, status=400)
    desired = (datetime.now(UTC) + timedelta(hours=100)).replace(microsecond=0)
    schedules(e2e_env, [one_off("again", desired)])
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    key = f"again@{iso_z(desired)}"
    assert wait_until(lambda: status_of(e2e_env, key) == "failed", 10), daemon.output()
    done = cli(e2e_env, "retry", "again")
    assert done.returncode == 0, done.stderr
    assert key in done.stdout
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 10), daemon.output()
    row = next(r for r in status(e2e_env) if r["key"] == key)
    assert row["attempts"] == 1
    assert row["last_error"] is None
    # Its window opened 68 hours before the retry put it back.
    assert row["sent"] == (
        "sent 2 d 20 h late: put back to pending with `retry` after the window opened"
    )
    assert cli(e2e_env, "retry", "again").returncode == 1
    assert daemon.stop() == 0


def test_reload_without_a_daemon_exits_1(e2e_env: dict[str, str]) -> None:
    done = cli(e2e_env, "reload")
    assert done.returncode == 1
    assert "no daemon runs" in done.stderr


def test_sighup_with_nothing_changed_only_checks(
    e2e_env: dict[str, str], spawn: Callable[..., DaemonProcess]
) -> None:
    # tokens.json holds a plaintext token: the daemon's own rewrite of it is no change.
    schedules(e2e_env, [one_off("x", desired_for_trigger_in(3600))])
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "config unchanged (SIGHUP)" in daemon.output(), 5), daemon.output()
    assert "config loaded (SIGHUP)" not in daemon.output()
    assert daemon.stop() == 0


# --- The first hour (issue 25) -------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_a_daemon_started_on_the_examples_as_copied_sends_nothing(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    """README's "Running it yourself", literally: both examples copied as they are. `check`
    passes, and the daemon books nothing (every example is disabled until it is yours)."""
    data = Path(e2e_env["DATA_DIR"])
    for name in ("schedules", "tokens"):
        (data / f"{name}.json").write_text((REPO / "data" / f"{name}.example.json").read_text())
    checked = cli(e2e_env, "check")
    assert checked.returncode == 0, checked.stderr
    assert "books at once" not in checked.stdout
    daemon = spawn(e2e_env)
    daemon.wait_ready()
    # A reload too sends nothing (the loop gets a turn to book what is due).
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "(SIGHUP)" in daemon.output(), 10), daemon.output()
    assert daemon.stop() == 0
    assert club.received == []
    assert {row["status"] for row in status(e2e_env)} <= {"cancelled"}


def test_ready_seconds_can_be_raised_from_the_environment() -> None:
    assert ready_seconds({}) == DEFAULT_READY_SECONDS
    assert ready_seconds({"READY_SECONDS": "7.5"}) == 7.5
    assert ready_seconds({"READY_SECONDS": "0.1"}) == DEFAULT_READY_SECONDS  # never lower
    with pytest.raises(ValueError, match=r"READY_SECONDS: 'soon' is not a number of seconds"):
        ready_seconds({"READY_SECONDS": "soon"})


@pytest.mark.both_databases
def test_reload_prints_the_loads_result_and_exits_1_on_its_errors(
    e2e_env: dict[str, str], club: SandboxClub, spawn: Callable[..., DaemonProcess]
) -> None:
    far = desired_for_trigger_in(3600)
    schedules(e2e_env, [one_off("a", far)])
    daemon = spawn(e2e_env)
    daemon.wait_ready()

    # A new entry whose window is open already: reload says it books at once.
    soon = (datetime.now(UTC) + timedelta(hours=100)).replace(microsecond=0)
    schedules(e2e_env, [one_off("a", far), one_off("now", soon)])
    done = cli(e2e_env, "reload")
    assert done.returncode == 0, done.stderr
    first, *rest = done.stdout.splitlines()
    assert first.startswith(
        f"courtbot (pid {daemon.pid}) loaded the config files (SIGHUP): 2 schedule(s) "
    ), done.stdout
    assert "0 error(s)" in first
    key = f"now@{iso_z(soon)}"
    assert next(line for line in rest if key in line).endswith("): books at once when loaded")
    assert wait_until(lambda: status_of(e2e_env, key) == "booked", 10), daemon.output()

    # Two bad entries: each error on a line of its own, as the log has it; exit 1, the daemon
    # goes on.
    bad = [one_off("a", far), {"id": "b1", "type": "one-off"}, {"id": "b2", "type": "weekly"}]
    schedules(e2e_env, bad)
    done = cli(e2e_env, "reload")
    assert done.returncode == 1, done.stdout
    errors = [line.removeprefix("error: ") for line in done.stderr.splitlines()[:-1]]
    assert [e.split(":")[0] for e in errors] == [
        "schedules.json entry 'b1' (#2)",
        "schedules.json entry 'b2' (#3)",
    ]
    assert all(
        f"ERROR config_loader: {e}" in daemon.output() or e in daemon.output() for e in errors
    )
    assert done.stderr.splitlines()[-1].startswith("2 errors: ")
    assert daemon.proc is not None and daemon.proc.poll() is None

    # Nothing changed since: the same errors, still exit 1.
    again = cli(e2e_env, "reload")
    assert again.returncode == 1
    assert "config unchanged since the last load" in again.stdout
    assert again.stderr == done.stderr

    # status sums the last load up.
    summary = cli(e2e_env, "status").stdout
    assert "last load: " in summary and "(SIGHUP, " in summary
    assert f"2 errors; the first: {errors[0]}" in summary
    assert daemon.stop() == 0
    assert cli(e2e_env, "reload").returncode == 1  # none runs
