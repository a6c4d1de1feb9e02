"""main.py: the CLI of CONTRACT section 1, and the daemon's loop in process (reload on SIGHUP or a
changed file); the daemon as a subprocess is in test_e2e.py."""

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
import main
import models
import utils
from conftest import previous_release_database, write_json
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


def test_check_prints_each_entrys_request_source_window_and_request(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    fernet_value = Fernet(env["FERNET_KEY"].encode()).encrypt(b"tok-enc-5521").decode()
    write_json(
        data_dir / "tokens.json",
        {
            "default": fernet_value,
            "partner": "tok-plain-8812",
            "padel": {"token": "tok-obj-4410", "password": "pw-obj-3301"},
        },
    )
    (data_dir / "clubs").mkdir()
    write_json(
        data_dir / "clubs" / "padel.json",
        {
            "url": "https://padel.example/book/{court_id}",
            "headers": {"X-Key": "{token}"},
            "window": "6d@08:00",
        },
    )
    start = future(20).replace(hour=17, minute=0)
    entries = [
        {"id": "p", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}", "club": "padel",
         "token": "padel", "court_id": 3},
        {"id": "plain", "type": "one-off", "desired_time": f"{start:%Y-%m-%d %H:%M}",
         "token": "partner", "window": "2d@07:30"},
    ]  # fmt: skip
    write_json(data_dir / "schedules.json", entries)
    before = (data_dir / "tokens.json").read_bytes()

    assert run(monkeypatch, env, "check") == 0

    out = capsys.readouterr().out
    assert "tokens.json: 3 token(s)\n" in out
    assert "  'default': encrypted\n" in out
    assert "  'partner': plaintext (the daemon encrypts it in the file when it loads it)\n" in out
    assert "  'padel': object of token, password, plaintext (the daemon encrypts it" in out
    block = out.split("\np (#1)")[1].split("\nplain (#2)")[0]
    assert f"  club: padel ({data_dir}/clubs/padel.json)\n" in block
    assert f"  window: 6d@08:00 (from {data_dir}/clubs/padel.json)\n" in block
    opens = utils.format_utc(start - timedelta(days=6) + timedelta(hours=-9))
    assert f"= {utils.format_utc(start)}  trigger {opens}" in block
    assert (
        "  request (next instance, token masked):\n    POST https://padel.example/book/3\n" in block
    )
    assert "    X-Key: ***\n" in block
    plain = out.split("\nplain (#2)")[1]
    assert "  request: BOOKING_API_URL (http://club.test/bookings)\n" in plain
    assert "  window: 2d@07:30 (entry)\n" in plain
    assert f"trigger {utils.format_utc(start - timedelta(days=2) + timedelta(hours=-9.5))}" in plain
    assert "    POST http://club.test/bookings\n    Authorization: Bearer ***\n" in plain
    for secret in ("tok-enc-5521", "tok-plain-8812", "tok-obj-4410", "pw-obj-3301"):
        assert secret not in out
    assert (data_dir / "tokens.json").read_bytes() == before


def test_check_exit_1_on_an_invalid_club_file_naming_the_file_and_key(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    write_json(data_dir / "tokens.json", {"default": "t"})
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "padel.json", {"url": "https://padel.example/b", "json": 1,
                                                   "form": {}})  # fmt: skip
    desired = f"{future():%Y-%m-%d %H:%M}"
    write_json(
        data_dir / "schedules.json",
        [
            {"id": "p", "type": "one-off", "desired_time": desired, "club": "padel"},
            {"id": "ok", "type": "one-off", "desired_time": desired},
        ],
    )
    assert run(monkeypatch, env, "check") == 1
    captured = capsys.readouterr()
    assert (
        f"error: schedules.json entry 'p' (#1): club: 'padel': {data_dir}/clubs/padel.json: "
        "json, form: give one body, not both\n"
    ) in captured.err
    assert "\nok (#1)" not in captured.out and "\nok (#2)" in captured.out


def test_run_without_booking_api_url_needs_every_entry_to_name_a_club(
    env: dict[str, str], data_dir: Path
) -> None:
    without = {k: v for k, v in env.items() if k != "BOOKING_API_URL"}
    settings = main.load_settings(without)
    fernet = main.load_fernet(settings)
    write_json(data_dir / "tokens.json", {"default": "t"})
    desired = f"{future():%Y-%m-%d %H:%M}"
    write_json(
        data_dir / "schedules.json", [{"id": "a", "type": "one-off", "desired_time": desired}]
    )
    message = (
        "BOOKING_API_URL is not set: set it to the club's booking endpoint "
        "(e.g. https://club.example/api/bookings)"
    )
    with pytest.raises(main.StartError) as raised:
        main.require_api_url(settings, fernet)
    assert str(raised.value) == message  # no club files: the URL is what is missing
    (data_dir / "clubs").mkdir()
    write_json(data_dir / "clubs" / "padel.json", {"url": "https://padel.example/b"})
    with pytest.raises(main.StartError) as raised:
        main.require_api_url(settings, fernet)
    assert str(raised.value) == f"{message}, or name a club file in schedules.json entry 'a' (#1)"
    write_json(
        data_dir / "schedules.json",
        [{"id": "a", "type": "one-off", "desired_time": desired, "club": "padel"}],
    )
    main.require_api_url(settings, fernet)  # every entry names a club: it may start
    write_json(data_dir / "schedules.json", [])
    main.require_api_url(settings, fernet)  # club files, no entries yet: a first deploy


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
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["SCHEDULE", "KEY", "DESIRED"]
    assert "booked" in table[1] and "bk-9" in table[1]


def test_status_without_a_database(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    assert run(monkeypatch, env, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (data_dir / "db.sqlite").exists()


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


def test_health_needs_a_daemon_holding_data_dir_and_a_fresh_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    data_dir: Path,
) -> None:
    assert run(monkeypatch, env, "health") == 1
    capsys.readouterr()
    (data_dir / "heartbeat").write_text(f"{datetime.now(UTC).timestamp():.0f}\n")
    # A fresh heartbeat alone is a daemon that stopped (or was killed) a moment ago.
    assert run(monkeypatch, env, "health") == 1
    assert capsys.readouterr().err == f"courtbot health: no daemon runs on {data_dir}\n"
    lock = main.DirLock(data_dir / "bot.lock")
    assert lock.acquire()
    try:
        (data_dir / "bot.pid").write_text(f"{os.getpid()}\n")
        assert run(monkeypatch, env, "health") == 0
        gone = 2**22 + 1  # above Linux's pid_max: no such process
        (data_dir / "bot.pid").write_text(f"{gone}\n")
        capsys.readouterr()
        assert run(monkeypatch, env, "health") == 1
        assert capsys.readouterr().err == (
            f"courtbot health: the daemon of bot.pid (pid {gone}) is gone\n"
        )
    finally:
        lock.release()
    assert run(monkeypatch, env, "health") == 1


def test_every_log_event_is_one_line_whatever_its_values_hold(
    env: dict[str, str], data_dir: Path
) -> None:
    log_file = data_dir / "bot.log"
    main.setup_logging(main.Settings.from_env(env | {"LOG_FILE": str(log_file)}))
    log = logging.getLogger("bot")
    forged = "bk-1\r\n2026-11-23T12:00:00.000Z ERROR bot: forged\x1b[2J\x85\u2028"
    log.warning("booked %s ref=%s", "k@2026-12-02T17:00:00Z", forged)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("unexpected")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        " WARNING bot: booked k@2026-12-02T17:00:00Z ref=bk-1\\r\\n2026-11-23T12:00:00.000Z "
        "ERROR bot: forged\\x1b[2J\\x85\\u2028"
    )
    assert re.fullmatch(
        r"\S+Z ERROR bot: unexpected\\nTraceback \(most recent call last\):\\n.*"
        r"\\nValueError: boom\\nsecond line",
        lines[1],
    )


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


def test_club_files_are_loaded_reloaded_on_change_and_kept_when_broken(
    daemon: main.Daemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert daemon.ctx is not None
    clubs = data_dir / "clubs"
    clubs.mkdir()
    write_json(clubs / "padel.json", {"url": "https://padel.example/book"})
    entry = one_off("p") | {"club": "padel"}
    write_json(data_dir / "schedules.json", [one_off("a"), entry])
    assert daemon.config_changed() is True
    daemon.safe_load("file change")
    good = daemon.ctx.clubs["padel"]
    assert good.booking_step.url.source() == "https://padel.example/book"
    assert daemon.ctx.flow_for("padel") is good
    assert "club file(s) loaded: padel" in caplog.messages
    (row,) = [r for r in instances.status_rows(daemon.factory) if r["schedule"] == "p"]
    first_trigger = row["trigger_time"]

    # A club file's change alone is a change: the new window moves the trigger.
    write_json(clubs / "padel.json", {"url": "https://padel.example/book", "window": "1d@06:00"})
    assert daemon.config_changed() is True
    daemon.safe_load("file change")
    (row,) = [r for r in instances.status_rows(daemon.factory) if r["schedule"] == "p"]
    assert row["trigger_time"] != first_trigger
    assert row["trigger_time"].endswith("T06:00:00Z")
    good = daemon.ctx.clubs["padel"]
    assert good.window == "1d@06:00"

    # Broken: the entry is rejected (its instance kept), the last good flow stays in use.
    write_json(clubs / "padel.json", {"url": "https://padel.example/book", "method": "BREW"})
    daemon.safe_load("file change")
    assert any(
        m.startswith("schedules.json entry 'p' (#2): club: 'padel': ") and "method: 'BREW'" in m
        for m in caplog.messages
    )
    assert "club 'padel': its last good file stays in use" in caplog.messages
    assert daemon.ctx.flow_for("padel") == good
    assert pending(daemon) == ["a", "p"]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_jobs_of_a_club_whose_flow_prepares_start_that_much_before_the_trigger(
    daemon: main.Daemon, data_dir: Path
) -> None:
    clubs = data_dir / "clubs"
    clubs.mkdir()
    login = {"name": "login", "url": "https://padel.example/login", "ok": {"status": [200]}}
    book = {"name": "book", "booking": True, "url": "https://padel.example/book"}
    write_json(clubs / "padel.json", {"prepare_seconds": 90, "steps": [login, book]})
    write_json(data_dir / "schedules.json", [one_off("a"), one_off("p") | {"club": "padel"}])
    daemon.safe_load("file change")
    assert daemon.engine is not None

    rows = [r for r in instances.status_rows(daemon.factory) if r["status"] == "pending"]
    with daemon.engine.connect() as conn:
        jobs = dict(list(conn.exec_driver_sql("SELECT id, next_run_time FROM apscheduler_jobs")))
    leads = {
        row["schedule"]: datetime.fromisoformat(
            row["trigger_time"].replace("Z", "+00:00")
        ).timestamp()
        - jobs[row["key"]]
        for row in rows
    }
    assert leads == {"a": pytest.approx(2), "p": pytest.approx(92)}
