"""CONTRACT sections 1 to 6 tried from outside, as a user runs courtbot: real subprocesses of
``main.py`` on a scratch DATA_DIR, their exit codes and their exact stderr. Each test here pins a
promise an outside-in audit found broken or untested."""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography.fernet import Fernet

from daemon_harness import DaemonProcess, by_key, cli, db_status, iso_z, status, wait_until
from tools.sandbox_club import SandboxClub


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """What a user exports: a key, the club's URL and a DATA_DIR holding one token."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokens.json").write_text(json.dumps({"default": "tok-contract-16"}))
    return {
        "PATH": "/usr/bin:/bin",
        "FERNET_KEY": Fernet.generate_key().decode(),
        "BOOKING_API_URL": "http://127.0.0.1:9/bookings",
        "DATA_DIR": str(data),
        "LOG_FILE": "-",
    }


def write_schedules(env: dict[str, str], entries: object) -> None:
    (Path(env["DATA_DIR"]) / "schedules.json").write_text(json.dumps(entries))


# ---------------------------------------------------------------- section 2: settings


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "is not an http(s) URL"),
        ("ftp://club.example/book", "is not an http(s) URL"),
        ("club.example/book", "is not an http(s) URL"),
        # Before: started, then every booking failed at its trigger on this URL.
        (
            "https://me:pw@club.example/book",
            "holds a user or password (user:password@host): credentials go in tokens.json, and "
            "a step sends them as {token} or {secret.<field>}",
        ),
    ],
)
def test_run_refuses_a_booking_api_url_that_is_no_http_url_with_exit_2(
    user_env: dict[str, str], url: str, reason: str
) -> None:
    write_schedules(user_env, [])
    done = cli({**user_env, "BOOKING_API_URL": url}, "run")
    assert done.returncode == 2, done.stderr
    shown = url.replace("me:pw@", "***@")
    assert "pw@" not in done.stderr
    assert done.stderr == (
        f"courtbot: cannot start: BOOKING_API_URL: {shown!r} {reason}; set it to the club's "
        "booking endpoint (e.g. https://club.example/api/bookings)\n"
    )


@pytest.mark.parametrize("command", [("check",), ("dry-run", "a")])
def test_check_and_dry_run_name_a_bad_booking_api_url_in_one_line(
    user_env: dict[str, str], command: tuple[str, ...]
) -> None:
    write_schedules(user_env, [{"id": "a", "type": "one-off", "desired_time": "2099-01-01 10:00"}])
    done = cli({**user_env, "BOOKING_API_URL": "not a url"}, *command)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"courtbot {command[0]}: BOOKING_API_URL: 'not a url' is not an http(s) URL; set it to "
        "the club's booking endpoint (e.g. https://club.example/api/bookings)\n"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("garbage", "'garbage'"),
        (" sqlite:///db.sqlite", "' sqlite:///db.sqlite'"),
        (
            "postgresql://me:s3cret@db.example:port/courts",
            "'postgresql://me:***@db.example:port/courts'",
        ),
    ],
)
@pytest.mark.parametrize(
    ("command", "code"), [(("run",), 2), (("status",), 1), (("retry", "x"), 1)]
)
def test_a_database_url_that_is_no_url_is_one_line_not_a_traceback(
    user_env: dict[str, str], url: str, shown: str, command: tuple[str, ...], code: int
) -> None:
    write_schedules(user_env, [])
    done = cli({**user_env, "DATABASE_URL": url}, *command)
    assert done.returncode == code, done.stderr
    prefix = "courtbot: cannot start" if command == ("run",) else f"courtbot {command[0]}"
    assert done.stderr == (
        f"{prefix}: DATABASE_URL: {shown} is not a database URL; expected "
        "sqlite:////path/to/db.sqlite or postgresql://user:password@host:5432/db\n"
    )


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
@pytest.mark.parametrize(("command", "code"), [(("run",), 2), (("status",), 1)])
def test_a_sqlite_database_in_memory_is_refused_it_would_lose_every_booking(
    user_env: dict[str, str], url: str, command: tuple[str, ...], code: int
) -> None:
    write_schedules(user_env, [])
    done = cli({**user_env, "DATABASE_URL": url}, *command)
    assert done.returncode == code, done.stderr
    prefix = "courtbot: cannot start" if command == ("run",) else f"courtbot {command[0]}"
    assert done.stderr == (
        f"{prefix}: DATABASE_URL: {url!r} is a SQLite database in memory: every booking and its "
        "state would be lost at a restart; give a file, e.g. sqlite:////app/data/db.sqlite\n"
    )


@pytest.mark.parametrize(
    ("name", "value", "unit"),
    [
        ("HTTP_TIMEOUT_SECONDS", "1e300", "86400 seconds"),
        ("RETRY_BASE_SECONDS", "1e12", "86400 seconds"),
        ("EARLY_RETRY_MS", "1e300", "8.64e+07 milliseconds"),
        ("EARLY_RETRY_SECONDS", "86401", "86400 seconds"),
        ("RELOAD_INTERVAL_SECONDS", "1e300", "86400 seconds"),
    ],
)
def test_a_setting_too_large_to_wait_on_stops_run_at_start_not_a_booking(
    user_env: dict[str, str], name: str, value: str, unit: str
) -> None:
    # Before: HTTP_TIMEOUT_SECONDS=1e300, RETRY_BASE_SECONDS=1e300 and EARLY_RETRY_MS=1e300
    # started, then failed the booking at its trigger ("internal error while booking").
    write_schedules(user_env, [])
    done = cli({**user_env, name: value}, "run")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"courtbot: cannot start: {name}: {value!r} is more than a day ({unit}); expected at "
        "most that\n"
    )


def test_a_day_is_still_a_valid_setting(user_env: dict[str, str]) -> None:
    write_schedules(user_env, [])
    done = cli({**user_env, "HTTP_TIMEOUT_SECONDS": "86400", "EARLY_RETRY_MS": "86400000"}, "check")
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- section 3: schedules.json


FAR_ENTRIES = [
    {"id": "last", "type": "one-off", "desired_time": "9999-12-31 23:30"},
    {"id": "daily", "type": "recurring", "rrule": "FREQ=DAILY", "desired_time": "9999-12-20 23:30"},
    {"id": "fine", "type": "one-off", "desired_time": "9999-12-31 22:30"},
]
FAR_ERRORS = [
    "schedules.json entry 'last' (#1): desired_time: '9999-12-31 23:30' with duration_minutes 60 "
    "ends out of range (years 1 to 9999 in UTC and in the entry's zone)",
    "schedules.json entry 'daily' (#2): rrule: 'FREQ=DAILY' holds a date out of range (years 1 "
    "to 9999 in UTC and in the entry's zone)",
]


def test_check_an_instance_ending_after_year_9999_is_an_error_for_its_entry_alone(
    user_env: dict[str, str],
) -> None:
    # Before: `check` ended in an OverflowError traceback.
    write_schedules(user_env, FAR_ENTRIES)
    done = cli(user_env, "check")
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        "".join(f"error: {line}\n" for line in FAR_ERRORS)
        + "\ninvalid: 2 problems; see the errors above\n"
    )
    assert "  Fri 9999-12-31 22:30 UTC  = 9999-12-31T22:30:00Z  trigger 9999-12-24T22:30:00Z\n" in (
        done.stdout
    )


def test_run_an_instance_ending_after_year_9999_does_not_take_the_daemon_down(
    user_env: dict[str, str], tmp_path: Path
) -> None:
    # Before: the first load raised (year 10000 is out of range) and `run` exited 1.
    write_schedules(user_env, FAR_ENTRIES)
    daemon = DaemonProcess(user_env, Path(user_env["DATA_DIR"]), tmp_path / "daemon.out").start()
    try:
        daemon.wait_ready()
        assert [row["key"] for row in status(user_env)] == ["fine@9999-12-31T22:30:00Z"]
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    for line in FAR_ERRORS:
        assert f" ERROR courtbot: {line}\n" in daemon.output()


# ---------------------------------------------------------------- section 5: tokens.json


@pytest.mark.parametrize("cut", [10, 40, 80])
def test_a_fernet_shaped_value_cut_short_is_an_error_for_its_token_not_a_plaintext(
    user_env: dict[str, str], cut: int
) -> None:
    # Before: a value starting gAAAAA but too short to be a whole Fernet token (a paste cut
    # short) was taken for a plaintext token: encrypted as such and sent to the club.
    whole = Fernet(user_env["FERNET_KEY"].encode()).encrypt(b"tok-contract-16").decode()
    tokens = Path(user_env["DATA_DIR"]) / "tokens.json"
    written = json.dumps({"default": "tok-contract-16", "partner": whole[:cut]})
    tokens.write_text(written)
    write_schedules(
        user_env,
        [
            {"id": "mine", "type": "one-off", "desired_time": "2099-01-01 10:00"},
            {
                "id": "ours",
                "type": "one-off",
                "desired_time": "2099-01-02 10:00",
                "token": "partner",
            },
        ],
    )
    done = cli(user_env, "check")
    assert done.returncode == 1, done.stdout
    assert done.stderr == (
        "error: tokens.json token 'partner': the value is encrypted but no key in FERNET_KEY "
        "decrypts it (was it encrypted with another key?); re-encrypt it with `python main.py "
        "encrypt-token` or put the plaintext token in the file\n"
        "\ninvalid: 1 problem; see the error above\n"
    )
    assert "  'partner': unusable (see the error above)\n" in done.stdout
    assert tokens.read_text() == written  # check never rewrites


def test_a_read_only_tokens_file_is_left_as_it_is_with_a_warning_and_the_token_still_books(
    user_env: dict[str, str], tmp_path: Path
) -> None:
    # Before: a tokens.json made read-only (chmod 444) in a writable DATA_DIR was replaced by a
    # rename all the same, its mode turned to 0600.
    tokens = Path(user_env["DATA_DIR"]) / "tokens.json"
    written = tokens.read_text()
    tokens.chmod(0o444)
    desired = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    write_schedules(
        user_env, [{"id": "soon", "type": "one-off", "desired_time": iso_z(desired), "court_id": 1}]
    )
    with SandboxClub(tokens=("tok-contract-16",)) as club:
        env = {**user_env, "BOOKING_API_URL": club.url}
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "daemon.out").start()
        try:
            daemon.wait_ready()
            key = f"soon@{iso_z(desired)}"
            assert wait_until(lambda: db_status(env, key) == "booked", 15), daemon.output()
            assert daemon.stop() == 0
        finally:
            daemon.cleanup()
    assert tokens.read_text() == written
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o400  # others' bits dropped, still read-only
    assert (
        " WARNING config_loader: tokens.json: cannot rewrite it with encrypted tokens (the file "
        "is read-only, mode 0444); the tokens are kept encrypted in the database only: make the "
        "file writable, or put encrypted values in it (`python main.py encrypt-token`)\n"
    ) in daemon.output()


# ---------------------------------------------------------------- section 1: the commands


@pytest.mark.parametrize("given", ["first\nsecond\n", "tab\there\n"])
def test_encrypt_token_refuses_a_token_tokens_json_would_refuse(
    user_env: dict[str, str], given: str
) -> None:
    # Before: printed its encrypted form (exit 0), which tokens.json then rejected on load.
    done = cli(user_env, "encrypt-token", stdin=given)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "courtbot encrypt-token: the token holds a control character (a line break, tab, ...), "
        "which cannot be sent in a header; give it as one line\n"
    )


def test_encrypt_token_output_is_what_tokens_json_keeps_as_is(user_env: dict[str, str]) -> None:
    done = cli(user_env, "encrypt-token", stdin="tok-contract-16\n")
    assert done.returncode == 0, done.stderr
    assert Fernet(user_env["FERNET_KEY"].encode()).decrypt(done.stdout.strip().encode()) == (
        b"tok-contract-16"
    )


@pytest.mark.parametrize("name", ["schedules.json", "tokens.json"])
def test_a_config_file_that_cannot_be_read_is_an_error_for_that_file_not_a_traceback(
    user_env: dict[str, str], tmp_path: Path, name: str
) -> None:
    # Before: `check` ended in an IsADirectoryError traceback, and `run` exited 2 ("cannot be
    # written") where an invalid schedules.json is no reason to exit (section 1).
    data = Path(user_env["DATA_DIR"])
    write_schedules(user_env, [])
    (data / name).unlink()
    (data / name).mkdir()
    done = cli(user_env, "check")
    assert done.returncode == 1, done.stderr
    assert (
        f"error: {name}: cannot be read (Is a directory); nothing loaded from it, the last good "
        "state stays\n"
    ) in done.stderr
    assert "Traceback" not in done.stderr
    daemon = DaemonProcess(user_env, data, tmp_path / "daemon.out").start()
    try:
        daemon.wait_ready()
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    assert (
        f" ERROR courtbot: {name}: cannot be read (Is a directory); nothing loaded from it, the "
        "last good state stays\n"
    ) in daemon.output()


def test_check_without_booking_api_url_says_run_needs_it_rather_than_none(
    user_env: dict[str, str],
) -> None:
    # Before: "request: BOOKING_API_URL (None)".
    write_schedules(user_env, [{"id": "a", "type": "one-off", "desired_time": "2099-01-01 10:00"}])
    env = {k: v for k, v in user_env.items() if k != "BOOKING_API_URL"}
    done = cli(env, "check")
    assert done.returncode == 0, done.stderr
    assert (
        "  request: none: BOOKING_API_URL is not set (`run` will not start without it)\n"
    ) in done.stdout


# ---------------------------------------------------------------- section 6: the request


PARIS = ZoneInfo("Europe/Paris")


def next_dst_change(after: datetime, *, forward: bool) -> datetime:
    """The next instant after ``after`` at which Paris moves its clocks forward (or back)."""
    moment = after.replace(minute=0, second=0, microsecond=0)
    for _ in range(2 * 366 * 24):
        later = moment + timedelta(hours=1)
        step = later.astimezone(PARIS).utcoffset() - moment.astimezone(PARIS).utcoffset()  # type: ignore[operator]
        if step and (step > timedelta(0)) == forward:
            return later
        moment = later
    raise AssertionError("no DST change in two years")


@pytest.mark.parametrize("forward", [True, False], ids=["spring", "autumn"])
def test_the_end_is_the_start_plus_real_minutes_written_with_the_offset_then(
    user_env: dict[str, str], tmp_path: Path, forward: bool
) -> None:
    # Before: the end was the start's wall clock plus the minutes, written with the start's
    # offset: "end": "...T02:30:00+01:00" in spring (a time that does not exist), and a booking
    # an hour too long in autumn.
    change = next_dst_change(datetime.now(UTC) + timedelta(hours=1), forward=forward)
    start = change - timedelta(minutes=30)
    end = change + timedelta(minutes=30)
    entry = {
        "id": "dst",
        "type": "one-off",
        "desired_time": iso_z(start),
        "timezone": "Europe/Paris",
        "court_id": 1,
        "window": "8784h",  # open already: booked at once
    }
    write_schedules(user_env, [entry])
    expected = {
        "court_id": "1",
        "start": start.astimezone(PARIS).isoformat(),
        "end": end.astimezone(PARIS).isoformat(),
        "duration_minutes": 60,
    }
    assert expected["start"][-6:] != expected["end"][-6:]
    done = cli(user_env, "check")
    assert done.returncode == 0, done.stderr
    assert f"    {json.dumps(expected)}\n" in done.stdout
    with SandboxClub(tokens=("tok-contract-16",), window_seconds=8784 * 3600) as club:
        env = {**user_env, "BOOKING_API_URL": club.url}
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "daemon.out").start()
        try:
            daemon.wait_ready()
            key = f"dst@{iso_z(start)}"
            assert wait_until(lambda: db_status(env, key) == "booked", 15), daemon.output()
            assert daemon.stop() == 0
        finally:
            daemon.cleanup()
        assert [json.loads(r.body) for r in club.received] == [expected]


def test_several_courts_named_in_any_script_book_with_an_ascii_idempotency_key(
    user_env: dict[str, str], tmp_path: Path
) -> None:
    # Before: "#球场1" could not go into the Idempotency-Key header (HTTP headers are Latin-1
    # at most): the booking failed at its trigger with "internal error while booking".
    desired = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    entry = {
        "id": "cn",
        "type": "one-off",
        "desired_time": iso_z(desired),
        "court_id": ["球场1", "2"],
    }
    write_schedules(user_env, [entry])
    key = f"cn@{iso_z(desired)}"
    with SandboxClub(tokens=("tok-contract-16",)) as club:
        club.set_taken("球场1", desired)
        env = {**user_env, "BOOKING_API_URL": club.url}
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "daemon.out").start()
        try:
            daemon.wait_ready()
            assert wait_until(lambda: db_status(env, key) == "booked", 15), daemon.output()
            assert daemon.stop() == 0
        finally:
            daemon.cleanup()
        sent = [
            (r.idempotency_key, json.loads(r.body)["court_id"], r.status) for r in club.received
        ]
    assert sent == [(f"{key}#%E7%90%83%E5%9C%BA1", "球场1", 409), (f"{key}#2", "2", 201)]


def test_a_token_no_header_can_carry_is_an_error_at_check_not_at_the_trigger(
    user_env: dict[str, str],
) -> None:
    # Before: `check` said OK, and the booking failed at its trigger with "internal error while
    # booking" (a zero-width space pasted along cannot go into "Authorization: Bearer ...").
    (Path(user_env["DATA_DIR"]) / "tokens.json").write_text(
        json.dumps({"default": "tok\u200b-1", "login": {"password": "p\u20acss"}})
    )
    write_schedules(user_env, [{"id": "a", "type": "one-off", "desired_time": "2099-01-01 10:00"}])
    done = cli(user_env, "check")
    assert done.returncode == 1, done.stdout
    assert done.stderr == (
        "error: tokens.json token 'default': the token holds a character no HTTP header can "
        "carry (beyond Latin-1, e.g. a zero-width space or a typographic quote a paste brought "
        "along); put the token in as the club gave it\n"
        "\ninvalid: 1 problem; see the error above\n"
    )
    # A login's fields go in a body: a password may hold any character.
    assert "  'login': object of password, plaintext" in done.stdout


def test_early_answers_to_a_late_booking_count_from_its_first_request_and_say_so(
    user_env: dict[str, str], tmp_path: Path
) -> None:
    # Loaded with its window open since a week, a booking still gets EARLY_RETRY_SECONDS of
    # early answers (the club's clock may be behind), and the reason says from when. Before:
    # "... 0.5 s after the window opened", for a window open for days.
    desired = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    write_schedules(
        user_env, [{"id": "late", "type": "one-off", "desired_time": iso_z(desired), "court_id": 1}]
    )
    key = f"late@{iso_z(desired)}"
    env = {**user_env, "EARLY_RETRY_SECONDS": "0.5", "EARLY_RETRY_MS": "100"}
    with SandboxClub(tokens=("tok-contract-16",)) as club:
        club.fault("status", count=1000, status=425)
        env["BOOKING_API_URL"] = club.url
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "daemon.out").start()
        try:
            daemon.wait_ready()
            assert wait_until(lambda: db_status(env, key) == "failed", 15), daemon.output()
            assert daemon.stop() == 0
        finally:
            daemon.cleanup()
        sent = len(club.received)
    assert sent >= 3  # at once, then every 100 ms for half a second
    assert by_key(env)[key]["last_error"] == (
        "court 1: the club never opened: still HTTP 425: Too Early 0.5 s after its first request "
        f"(sent late) (EARLY_RETRY_SECONDS), after {sent} request(s); check the window and the "
        "court with the club"
    )


class InterimClub:
    """A club on 127.0.0.1 that answers every request with an interim ``103 Early Hints`` (or
    ``102 Processing``) and then its final ``201`` with a booking id, on one connection."""

    def __init__(self, interim: bytes) -> None:
        self.interim = interim
        self.requests = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/bookings"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while reader.readline():
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    length = int(value) if name.lower() == "content-length" else length
                reader.read(length)
                self.requests += 1
                body = json.dumps({"id": f"hint-{self.requests}"}).encode()
                conn.sendall(
                    self.interim + b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["103", "102"],
)
def test_an_interim_1xx_answer_is_skipped_and_the_final_2xx_books(
    user_env: dict[str, str], tmp_path: Path, interim: bytes
) -> None:
    # Before: a booking sent at once (its window open at load) read the 103 as the club's
    # answer: failed, "the club refused the request (HTTP 103)", though the club had booked.
    desired = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    write_schedules(
        user_env, [{"id": "hint", "type": "one-off", "desired_time": iso_z(desired), "court_id": 1}]
    )
    key = f"hint@{iso_z(desired)}"
    club = InterimClub(interim)
    env = {**user_env, "BOOKING_API_URL": club.url}
    daemon = DaemonProcess(env, Path(env["DATA_DIR"]), tmp_path / "daemon.out").start()
    try:
        daemon.wait_ready()
        assert wait_until(lambda: db_status(env, key) not in (None, "pending"), 15), daemon.output()
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
        club.close()
    row = by_key(env)[key]
    assert (row["status"], row["booking_ref"], row["attempts"]) == ("booked", "hint-1", 1)
