"""main.py: the CLI of CONTRACT section 1, and the daemon's loop in process (reload on SIGHUP or a
changed file; a standby that takes over and steps down, section 10); the daemon as a subprocess
is in test_e2e.py and test_failover.py. The tests that touch the database run on SQLite and on
PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy.orm import Session, sessionmaker

import instances
import leader
import main
import models
from conftest import NOW, previous_release_database, write_json
from daemon_harness import cli
from models import Instance


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """main.main() sets up logging for its process; in this one, give pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def run(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> int:
    for name in list(main.os.environ):
        if name.startswith(("BOOKING_", "FERNET_", "DATA_", "DATABASE_", "LOG_", "SMTP_")):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return main.main(list(argv))


def future(days: float = 20) -> datetime:
    return (datetime.now(UTC) + timedelta(days=days)).replace(second=0, microsecond=0)


# ---------------------------------------------------------------- check


def test_check_prints_each_schedule_with_its_next_five_instances(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "plain-token-xyz"})
    write_json(
        data_dir / "schedules.json",
        [
            {
                "id": "wed-evening",
                "type": "recurring",
                "rrule": "every Wednesday at 17:00",
                "timezone": "Europe/London",
                "court_id": 3,
            },
            {"id": "once", "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"},
        ],
    )
    before = (data_dir / "tokens.json").read_bytes()
    assert run(monkeypatch, env, "check") == 0
    out = capsys.readouterr().out
    assert "wed-evening (#1): recurring, Europe/London, court 3" in out
    assert "rule: DTSTART:" in out and "RRULE:FREQ=WEEKLY;BYDAY=WE" in out
    block = out.split("wed-evening (#1)")[1].split("once (#2)")[0]
    lines = [ln for ln in block.splitlines() if re.match(r"\s+Wed \d{4}-\d\d-\d\d 17:00 ", ln)]
    assert len(lines) == 5
    for line in lines:
        assert re.search(r"= \d{4}-\d\d-\d\dT1[67]:00:00Z\s+trigger \d{4}-\d\d-\d\dT", line)
    assert "once (#2): one-off, UTC" in out
    assert out.rstrip().endswith("OK")
    # check never writes: the plaintext token stays, no database appears.
    assert (data_dir / "tokens.json").read_bytes() == before
    assert not (data_dir / "db.sqlite").exists()


def test_check_exit_1_on_an_invalid_entry_with_the_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "ok", "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"},
            {"id": "wed-evening", "type": "recurring", "rrule": "FREQ=WEEKY"},
        ],
    )
    assert run(monkeypatch, env, "check") == 1
    err = capsys.readouterr().err
    assert (
        "schedules.json entry 'wed-evening' (#2): rrule: 'FREQ=WEEKY' is not a valid rule "
        "('FREQ=WEEKY': FREQ must be one of DAILY, WEEKLY, MONTHLY, YEARLY)"
    ) in err


def test_check_exit_2_without_a_usable_fernet_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
) -> None:
    assert run(monkeypatch, {k: v for k, v in env.items() if k != "FERNET_KEY"}, "check") == 2
    assert "FERNET_KEY is not set" in capsys.readouterr().err
    assert run(monkeypatch, env | {"FERNET_KEY": "short"}, "check") == 2


def test_check_warnings_do_not_change_the_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "past", "type": "one-off", "desired_time": "2020-01-01 10:00"},
            {
                "id": "gap",
                "type": "recurring",
                "rrule": "FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU",
                "desired_time": "2026-01-01 01:30",
                "timezone": "Europe/London",
            },
        ],
    )
    assert run(monkeypatch, env, "check") == 0
    captured = capsys.readouterr()
    assert "'2020-01-01 10:00' is in the past; skipped, never booked" in captured.err
    assert "does not exist in Europe/London (DST gap)" in captured.out


def test_check_missing_schedules_is_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    assert run(monkeypatch, env, "check") == 0
    assert "schedules.json: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- status and retry


def add(factory: sessionmaker[Session], key: str, **fields: Any) -> None:
    desired = fields.pop("desired", future())
    with models.transaction(factory) as session:
        session.add(
            Instance(
                key=f"{key}@{desired:%Y-%m-%dT%H:%M:%SZ}",
                schedule_id=key,
                type="one-off",
                desired_time=desired,
                trigger_time=desired - timedelta(hours=168),
                timezone="Europe/London",
                court_id="3",
                courts='["3"]',
                **fields,
            )
        )


@pytest.mark.both_databases
def test_status_json_and_table(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
) -> None:
    add(factory, "late", desired=future(30), status="pending")
    add(
        factory,
        "early",
        desired=future(10),
        status="booked",
        attempts=1,
        booking_ref="bk-9",
        booked_court="3",
    )
    assert run(monkeypatch, env, "status", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["schedule"] for r in rows] == ["early", "late"]  # soonest trigger first
    first = rows[0]
    for name in (
        "schedule",
        "key",
        "type",
        "desired_time",
        "trigger_time",
        "timezone",
        "court_id",
        "status",
        "attempts",
        "last_error",
        "booking_ref",
    ):
        assert name in first
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["desired_time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["trigger_time"])
    assert (first["status"], first["booking_ref"], first["court_id"]) == ("booked", "bk-9", "3")
    assert run(monkeypatch, env, "status") == 0
    daemons, rest = capsys.readouterr().out.split("\n\n", 1)
    assert daemons == "daemons: none running"
    table = rest.splitlines()
    assert table[0].split()[:3] == ["SCHEDULE", "KEY", "DESIRED"]
    assert "booked" in table[1] and "bk-9" in table[1]


@pytest.mark.both_databases
def test_status_without_a_database(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    assert run(monkeypatch, env, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (data_dir / "db.sqlite").exists()


@pytest.mark.both_databases
def test_retry_puts_failed_instances_still_ahead_back_to_pending(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    factory: sessionmaker[Session],
) -> None:
    add(factory, "a", status="failed", attempts=3, last_error="club down")
    add(factory, "a", desired=future(40), status="booked")
    add(
        factory,
        "a",
        desired=datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1),
        status="failed",
    )
    assert run(monkeypatch, env, "retry", "a") == 0
    out = capsys.readouterr().out
    assert "pending again: a@" in out
    with factory() as session:
        states = sorted((r.status, r.attempts, r.last_error) for r in session.query(Instance))
    assert states == [("booked", 0, None), ("failed", 0, None), ("pending", 0, None)]
    assert run(monkeypatch, env, "retry", "a") == 1
    assert "no failed instance" in capsys.readouterr().err


def test_status_and_retry_work_on_a_database_of_the_previous_release(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    previous_release_database(data_dir / "db.sqlite")
    assert run(monkeypatch, env, "status", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["key"], row["status"]) == ("old@2030-01-01T10:00:00Z", "failed")

    assert run(monkeypatch, env, "retry", "old") == 0

    assert "pending again: old@2030-01-01T10:00:00Z" in capsys.readouterr().out
    assert run(monkeypatch, env, "status", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


# ---------------------------------------------------------------- keys and tokens


def test_generate_key_prints_a_fernet_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str]
) -> None:
    assert run(monkeypatch, env, "generate-key") == 0
    key = capsys.readouterr().out.strip()
    Fernet(key.encode())  # raises if it is not one


def test_encrypt_token_reads_stdin(env: dict[str, str]) -> None:
    done = cli(env, "encrypt-token", stdin="my-secret-token\n")
    assert done.returncode == 0, done.stderr
    encrypted = done.stdout.strip()
    assert "my-secret-token" not in done.stdout
    assert Fernet(env["FERNET_KEY"].encode()).decrypt(encrypted.encode()) == b"my-secret-token"
    no_key = cli({k: v for k, v in env.items() if k != "FERNET_KEY"}, "encrypt-token", stdin="x")
    assert no_key.returncode == 2
    assert cli(env, "encrypt-token", stdin="").returncode == 1


def test_health_reads_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], data_dir: Path
) -> None:
    assert run(monkeypatch, env, "health") == 1
    (data_dir / "heartbeat").write_text(f"{datetime.now(UTC).timestamp():.0f}\n")
    assert run(monkeypatch, env, "health") == 0


def test_the_bundled_examples_pass_check(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    examples = Path(__file__).resolve().parent.parent / "data"
    (data_dir / "schedules.json").write_text((examples / "schedules.example.json").read_text())
    (data_dir / "tokens.json").write_text((examples / "tokens.example.json").read_text())
    assert run(monkeypatch, env, "check") == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for entry_id in ("wed-evening", "weekend-mornings", "fortnightly-friday", "club-night"):
        assert f"{entry_id} (#" in out


def test_check_lists_notification_channels_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    write_json(data_dir / "schedules.json", [])
    secret = "123456789:AAsecretBotTokenValue"
    channels = env | {
        "SMTP_HOST": "smtp.example.com",
        "NOTIFY_EMAIL": "me@example.com",
        "NOTIFY_URLS": f"tgram://{secret}/987654 ntfys://courtbot-topic",
    }
    assert run(monkeypatch, channels, "check") == 0
    out = capsys.readouterr().out
    assert "notifications: email to me@example.com via smtp.example.com:587 (starttls)" in out
    assert out.count("notifications: channel ") == 2
    assert "tgram://" in out and "ntfys://" in out
    assert secret not in out
    bad = env | {"NOTIFY_URLS": "notascheme://whatever"}
    assert run(monkeypatch, bad, "check") == 1
    assert "NOTIFY_URLS:" in capsys.readouterr().err


# ---------------------------------------------------------------- the daemon's loop, in process


@pytest.fixture
def daemon(env: dict[str, str], data_dir: Path) -> Iterator[main.Daemon]:
    """A started daemon in this process (its handlers and wakeup fd restored afterwards)."""
    handlers = {signum: signal.getsignal(signum) for signum in main.DAEMON_SIGNALS}
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [one_off("a")])
    settings = main.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600"})
    made = main.Daemon(settings, main.load_fernet(settings), None)
    try:
        made.start()
        yield made
    finally:
        made.shutdown()
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def one_off(schedule_id: str) -> dict[str, Any]:
    return {"id": schedule_id, "type": "one-off", "desired_time": f"{future():%Y-%m-%d %H:%M}"}


def pending(daemon: main.Daemon) -> list[str]:
    rows = instances.status_rows(daemon.factory)
    return sorted(row["schedule"] for row in rows if row["status"] == "pending")


@pytest.mark.both_databases
def test_sighup_reloads_in_the_loop_and_a_broken_file_keeps_the_last_good_state(
    daemon: main.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seen: list[list[str]] = []

    def operator() -> None:
        try:
            write_json(data_dir / "schedules.json", [one_off("a"), one_off("b")])
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: pending(daemon) == ["a", "b"])
            seen.append(pending(daemon))
            (data_dir / "schedules.json").write_text("[{broken")
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: any("not valid JSON" in m for m in caplog.messages))
            seen.append(pending(daemon))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    daemon.run_forever()  # returns on the SIGTERM
    thread.join(10)

    assert seen == [["a", "b"], ["a", "b"]]
    assert caplog.messages.count("SIGHUP received: reloading") == 2
    assert "SIGTERM received: stopping (a booking under way may finish)" in caplog.messages
    (broken,) = [m for m in caplog.messages if "not valid JSON" in m]
    assert broken == (
        "schedules.json: not valid JSON (line 1 column 3: Expecting property name enclosed in "
        "double quotes); nothing loaded from it, the last good state stays"
    )
    assert any(m.startswith("config loaded (SIGHUP) in ") for m in caplog.messages)


@pytest.mark.both_databases
def test_a_changed_file_is_reloaded_and_an_unchanged_one_is_not(
    daemon: main.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.config_changed() is False
    daemon.safe_load("file change")
    assert any(m.startswith("config unchanged (file change)") for m in caplog.messages)

    write_json(data_dir / "schedules.json", [one_off("c")])
    assert daemon.config_changed() is True
    daemon.safe_load("file change")

    assert pending(daemon) == ["c"]
    (loaded,) = [m for m in caplog.messages if m.startswith("config loaded (file change)")]
    assert "1 added, 0 changed, 1 cancelled, 0 revived" in loaded
    assert loaded.endswith("; entries changed: c")  # the new entry; a removal is counted above
    assert daemon.config_changed() is False


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ---------------------------------------------------------------- daemons (section 10)


def state(ident: str, role: str, *, alive: bool = True, **times: datetime) -> leader.DaemonState:
    return leader.DaemonState(
        id=ident,
        host=f"host-{ident}",
        pid=100 + len(ident),
        role=role,
        started_at=times.get("started_at", NOW - timedelta(hours=3)),
        since=times.get("since", NOW - timedelta(hours=2)),
        heartbeat_at=times.get("heartbeat_at", NOW - timedelta(seconds=3)),
        alive=alive,
    )


def test_the_daemons_as_a_person_reads_them() -> None:
    states = [
        state("a", "active", since=NOW - timedelta(minutes=12)),
        state("bb", "standby", heartbeat_at=NOW - timedelta(seconds=4)),
        state("ccc", "active", alive=False, heartbeat_at=NOW - timedelta(minutes=7)),
    ]
    assert main.daemon_lines(states, NOW) == [
        "daemons:",
        "  active   host-a pid 101, active since 2026-11-23T11:48:00Z, last heartbeat 3 s ago",
        "  standby  host-bb pid 102, standby since 2026-11-23T10:00:00Z, last heartbeat 4 s ago",
        "  stopped  host-ccc pid 103, last heartbeat 7 min ago",
    ]
    assert main.daemon_lines([states[2]], NOW) == ["daemons: none running"]
    assert main.daemon_lines([], NOW) == ["daemons: none running"]
    assert [main._ago(s) for s in (0, 119, 120, 7199, 7200, 3 * 86400)] == [
        "0 s",
        "119 s",
        "2 min",
        "119 min",
        "2 h",
        "3 d",
    ]


@pytest.mark.both_databases
def test_status_names_the_running_daemon(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    daemon: main.Daemon,
    env: dict[str, str],
) -> None:
    assert run(monkeypatch, env, "status") == 0
    out = capsys.readouterr().out
    host = os.uname().nodename
    since = utils_format(daemon.roles.since)
    assert re.match(
        rf"daemons:\n  active   {re.escape(host)} pid {os.getpid()}, active since {since}, "
        r"last heartbeat \d+ s ago\n\nSCHEDULE ",
        out,
    ), out
    assert run(monkeypatch, env, "status", "--daemons", "--json") == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown == {
        "id": daemon.roles.ident,
        "host": host,
        "pid": os.getpid(),
        "role": "active",
        "alive": True,
        "since": since,
        "started_at": utils_format(daemon.roles.started_at),
        "heartbeat_at": shown["heartbeat_at"],
    }
    assert run(monkeypatch, env, "status", "--json") == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)  # one array of instances, still


def utils_format(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("retry", "x")])
def test_status_and_retry_on_an_unreachable_database_say_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    command: tuple[str, ...],
) -> None:
    from pg_server import free_port

    port = free_port()
    url = f"postgresql://courtbot:pw-S3cret@127.0.0.1:{port}/courtbot"
    assert run(monkeypatch, env | {"DATABASE_URL": url}, *command) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"courtbot {command[0]}: cannot open the database "
        f"postgresql://courtbot:***@127.0.0.1:{port}/courtbot (host 127.0.0.1, port {port}, "
        "database courtbot): connection refused; check that PostgreSQL runs at 127.0.0.1 port "
        f"{port} and accepts TCP connections, or fix the host and port in DATABASE_URL\n"
    )


def test_run_on_an_unreachable_database_exits_2_with_one_line(
    env: dict[str, str], data_dir: Path
) -> None:
    from pg_server import free_port

    port = free_port()
    url = f"postgresql://courtbot:pw-S3cret@127.0.0.1:{port}/courtbot"
    done = cli(env | {"DATABASE_URL": url}, "run")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "courtbot: cannot start: cannot open the database "
        f"postgresql://courtbot:***@127.0.0.1:{port}/courtbot (host 127.0.0.1, port {port}, "
        "database courtbot): connection refused; check that PostgreSQL runs at 127.0.0.1 port "
        f"{port} and accepts TCP connections, or fix the host and port in DATABASE_URL\n"
    )
    assert not (data_dir / "bot.pid").exists()


@pytest.fixture
def unstarted(env: dict[str, str], data_dir: Path) -> Iterator[Callable[..., main.Daemon]]:
    """Make a daemon in this process (not started); its handlers are restored afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in main.DAEMON_SIGNALS}
    made: list[main.Daemon] = []

    def make(**extra: str) -> main.Daemon:
        settings = main.load_settings(env | {"RELOAD_INTERVAL_SECONDS": "3600", **extra})
        made.append(main.Daemon(settings, main.load_fernet(settings), None))
        return made[-1]

    try:
        yield make
    finally:
        for daemon in made:
            daemon.shutdown()
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_a_standby_waits_then_takes_over_and_steps_down_when_its_lock_goes(
    pg_server: Any,
    pg_url: str,  # first: the database outlives the daemon
    unstarted: Callable[..., main.Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    other = leader.Leadership(pg_url, "other-daemon")
    assert other.try_acquire()
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [one_off("a")])
    tokens_before = (data_dir / "tokens.json").read_text()
    daemon = unstarted(DATABASE_URL=pg_url)
    seen: dict[str, Any] = {}

    daemon.start()  # the role is taken: it returns as a standby

    assert daemon.roles.role == "standby"
    assert (data_dir / "bot.pid").read_text() == f"{os.getpid()}\n"
    assert (data_dir / "heartbeat").exists()
    assert instances.status_rows(daemon.factory) == []  # it loaded nothing
    assert (data_dir / "tokens.json").read_text() == tokens_before  # nor rewrote the tokens
    assert daemon.engine is not None
    (row,) = leader.list_daemons(daemon.engine, now=datetime.now(UTC))
    assert (row.role, row.pid, row.alive) == ("standby", os.getpid(), True)

    def operator() -> None:
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            wait_for(lambda: any("this daemon is a standby" in m for m in caplog.messages))
            seen["after SIGHUP"] = pending(daemon)
            other.release()  # the active one ends: the standby takes over
            wait_for(lambda: pending(daemon) == ["a"])
            seen["role"] = daemon.roles.role
            backend = daemon.roles.lead.backend_pid
            with pg_server.admin() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            wait_for(other.try_acquire)  # another daemon may take it now
            wait_for(lambda: daemon.roles.role == "standby")
            assert daemon.scheduler is not None
            seen["scheduler running"] = daemon.scheduler._scheduler.running
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    daemon.run_forever()
    thread.join(10)
    other.close()

    assert seen == {"after SIGHUP": [], "role": "active", "scheduler running": False}
    messages = caplog.messages
    assert (
        "SIGHUP received: this daemon is a standby; it loads the files when it becomes the "
        "active one"
    ) in messages
    lost = next(i for i, m in enumerate(messages) if m.startswith("lost the active role on "))
    assert messages[lost] == (
        f"lost the active role on {models.mask_url(pg_url)} (its database connection failed): "
        "stopped booking at once; a booking in flight may finish; a standby takes over"
    )
    assert any(m.startswith("standby: this daemon (") for m in messages[lost:])
    assert any(m.startswith("config loaded (became active) in ") for m in messages)
    assert pg_server.password not in caplog.text


def test_on_sqlite_a_restarted_daemon_lists_only_itself(
    unstarted: Callable[..., main.Daemon], data_dir: Path
) -> None:
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [])
    engine = models.make_engine(f"sqlite:///{data_dir / 'db.sqlite'}")
    try:
        # the row of a daemon killed seconds ago: its heartbeat still looks fresh
        leader.write_heartbeat(
            engine,
            ident="killed",
            role="active",
            started_at=datetime.now(UTC),
            since=datetime.now(UTC),
            now=datetime.now(UTC),
            pid=1,
        )
        daemon = unstarted()
        daemon.start()
        states = leader.list_daemons(engine, now=datetime.now(UTC))
    finally:
        engine.dispose()
    assert [(s.pid, s.role, s.alive) for s in states] == [(os.getpid(), "active", True)]


def test_the_active_daemon_takes_over_dead_daemons_claims_and_changes_made_elsewhere(
    pg_url: str,  # first: the database outlives the daemon
    unstarted: Callable[..., main.Daemon],
    data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    write_json(data_dir / "tokens.json", {"default": "tok-secret"})
    write_json(data_dir / "schedules.json", [])
    daemon = unstarted(DATABASE_URL=pg_url)
    daemon.start()
    assert daemon.roles.is_active and daemon.factory is not None and daemon.engine is not None
    live = leader.Leadership(pg_url, "live-daemon")
    try:
        live.ensure_present()
        # Claims made after this daemon took over: one of a daemon that lives (an old active
        # one finishing its request), one of a daemon that died since; and a failed instance
        # that a `retry` on another host puts back.
        add(daemon.factory, "live", status="pending")
        add(daemon.factory, "dead", status="pending")
        add(daemon.factory, "again", status="failed")
        for schedule, owner in (("live", "live-daemon"), ("dead", "dead-daemon")):
            (key,) = [
                r["key"] for r in instances.status_rows(daemon.factory) if r["schedule"] == schedule
            ]
            assert instances.claim(daemon.factory, key, datetime.now(UTC), owner=owner)
            instances.record_attempt(daemon.factory, key, 1)
        assert instances.retry(daemon.factory, "again", datetime.now(UTC))

        daemon.roles.beat(daemon)

        rows = {r["schedule"]: r for r in instances.status_rows(daemon.factory)}
        assert (rows["live"]["status"], rows["dead"]["status"], rows["again"]["status"]) == (
            "booking",
            "pending",
            "pending",
        )
        assert daemon.scheduler is not None
        jobs = set(daemon.scheduler._stored())
        assert {rows["dead"]["key"], rows["again"]["key"]} <= jobs
        assert rows["live"]["key"] not in jobs
        assert (
            "1 booking(s) of a daemon that stopped are retried now with the same "
            f"Idempotency-Key: {rows['dead']['key']}"
        ) in caplog.messages
    finally:
        live.close()
