"""Shared fixtures: a data dir, a key, settings, a real SQLite database in tmp_path, and a real
PostgreSQL server (``pg_server``, ``pg_url``; ``db_url`` runs a test on each database)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet
from pg_server import PgServer, PgUnavailable
from pg_server import start as pg_start
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import models
from config_loader import Settings
from daemon_harness import DaemonProcess
from models import Instance

#: A fixed "now" for tests that do not need the real clock (a Monday).
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def make_jwt(payload: dict[str, Any]) -> str:
    """An unsigned-looking JWT (header.payload.signature, base64url) carrying ``payload``."""

    def part(value: Any) -> str:
        raw = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` and return the path."""
    path.write_text(json.dumps(value, indent=2))
    return path


#: The tests that hold real processes to account on the real clock: a daemon subprocess
#: against a trigger, a takeover within seconds, a deadline met to the millisecond; a module
#: name, or ``module::test`` for the tests whose name starts so. `make test` runs the suite on
#: two workers (pytest-xdist, ``-n 2``): these run one after another on one of them, beside at
#: most one other test, so that no two of them race for the machine's two cores
#: (``pytest_xdist_make_scheduler`` below). A test named in UNTIMED_SLOW as well runs beside
#: them (a start-up error, a check: in a SERIAL module but holding no clock to account).
SERIAL = (
    "test_attacks.py",
    "test_contract_7_12.py",
    "test_e2e.py",
    "test_e2e_clock.py::test_booking_",
    "test_e2e_clock.py::test_clock_command_",
    "test_e2e_soonest.py",
    "test_e2e_flows.py",
    "test_e2e_templates.py",
    "test_e2e_watchdog.py",
    "test_failover.py",
    "test_leader.py",
    "test_lease.py",
    "test_partition.py",
    "test_reliability.py",
    "test_ready_flows.py::test_the_daemon_runs_",
    "test_ready_flows.py::test_a_ready_flow_books_by_the_clubs_clock",
)
#: End-to-end tests (marked ``slow``) that assert no timing: they may run beside the serial ones.
UNTIMED_SLOW = (
    "test_container.py",
    "test_demo.py",
    "test_ready_flows.py::test_dry_run_",
    "test_ready_flows.py::test_cancel_runs_",
    "test_install.py::test_the_installed_",
    # Bounds from below only (a try not before its time, a send not before the trigger) and
    # waits of tens of seconds: they run beside the serial ones.
    "test_e2e_wishes.py",
    "test_rehearsal_e2e.py",
    "test_e2e_clock.py::test_a_failed_measurement_",
    # Exits at start-up and checks, whose modules are SERIAL: no trigger, no clock.
    "test_contract_7_12.py::test_the_secrets_of_",
    "test_contract_7_12.py::test_a_header_no_request_",
    "test_contract_7_12.py::test_a_key_given_twice_",
    "test_contract_7_12.py::test_a_booking_api_url_",
    "test_contract_7_12.py::test_a_template_url_",
    "test_e2e.py::test_second_daemon_on_the_same_data_dir_",
    "test_e2e.py::test_cannot_start_",
    "test_e2e.py::test_invalid_schedules_at_start_",
    "test_e2e.py::test_reload_without_a_daemon_",
    "test_e2e.py::test_a_daemon_started_on_the_examples_",
    "test_e2e.py::test_ready_seconds_",
)


def listed(nodeid: str, entries: tuple[str, ...]) -> bool:
    """Whether the test ``nodeid`` is one of ``entries`` (see SERIAL)."""
    path, _, name = nodeid.partition("::")
    test = f"{path.rsplit('/', 1)[-1]}::{name}"
    return any(test.startswith(entry if "::" in entry else f"{entry}::") for entry in entries)


def serial(nodeid: str) -> bool:
    """Whether the test ``nodeid`` runs in the serial scope (see SERIAL)."""
    return listed(nodeid, SERIAL) and not listed(nodeid, UNTIMED_SLOW)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``slow`` (a real daemon, real signals) in neither list would run beside the
    serial ones: it fails, saying where to add it, before it can flake. (Failing it here rather
    than at collection: an error raised while a pytest-xdist worker collects kills the worker,
    and the run ends in an INTERNALERROR that names neither the test nor the fix.)"""
    if item.get_closest_marker("slow") and not listed(item.nodeid, SERIAL + UNTIMED_SLOW):
        pytest.fail(
            f"{item.nodeid} is marked slow but is in no list: add its module to SERIAL (or, if "
            "it asserts no timing, to UNTIMED_SLOW) in tests/conftest.py",
            pytrace=False,
        )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler by scope, each test its own scope but the SERIAL ones, which
    make one (the largest, so it starts first). Not ``--dist loadgroup``: with pytest 9.2 its
    group marks are silently lost (pytest-xdist issue 1386)."""
    from xdist.scheduler import LoadScopeScheduling

    class SerialScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "serial" if serial(nodeid) else nodeid

    return SerialScheduling(config, log)


@pytest.fixture
def fernet_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def fernet(fernet_key: str) -> MultiFernet:
    return MultiFernet([Fernet(fernet_key.encode())])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def database(request: pytest.FixtureRequest) -> str:
    """The database a test runs on: ``sqlite``, or each of ``sqlite`` and ``postgresql`` for
    a test marked ``both_databases`` (see pytest_generate_tests)."""
    return str(getattr(request, "param", "sqlite"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked ``both_databases`` (or in a module so marked) that touches the database
    (through ``engine``, ``factory``, ``env`` or ``database_url``) runs on each of them."""
    if "database" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_databases"
    ):
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def database_url(database: str, data_dir: Path, request: pytest.FixtureRequest) -> str:
    """The test's ``DATABASE_URL``: the default SQLite file in ``data_dir``, or a fresh
    database on the suite's PostgreSQL server."""
    if database == "sqlite":
        return f"sqlite:///{data_dir / 'db.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def env(data_dir: Path, fernet_key: str, database: str, database_url: str) -> dict[str, str]:
    """A minimal environment for the daemon, its files in ``data_dir`` (and its database on
    PostgreSQL when the test runs there)."""
    values = {
        "FERNET_KEY": fernet_key,
        "BOOKING_API_URL": "http://club.test/bookings",
        "DATA_DIR": str(data_dir),
        "LOG_FILE": "-",
    }
    if database != "sqlite":
        values["DATABASE_URL"] = database_url
    return values


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = models.make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return models.session_factory(engine)


#: The tables as the release before Instance.interrupted created them (SQLite).
PREVIOUS_SCHEMA = """
CREATE TABLE schedules (
    id INTEGER NOT NULL, "key" VARCHAR(128) NOT NULL, schedule_id VARCHAR(64) NOT NULL,
    type VARCHAR(16) NOT NULL, desired_time DATETIME NOT NULL, trigger_time DATETIME NOT NULL,
    timezone VARCHAR(64) NOT NULL, rrule TEXT, court_id TEXT, courts TEXT NOT NULL,
    booked_court TEXT, token_name VARCHAR(128) NOT NULL, duration_minutes INTEGER NOT NULL,
    status VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, last_error TEXT,
    booking_ref VARCHAR(256), created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    finished_at DATETIME, PRIMARY KEY (id), UNIQUE ("key")
);
CREATE INDEX ix_schedules_status_trigger ON schedules (status, trigger_time);
CREATE INDEX ix_schedules_schedule_id ON schedules (schedule_id);
CREATE TABLE tokens (
    id VARCHAR(128) NOT NULL, encrypted_token TEXT, error TEXT, updated_at DATETIME NOT NULL,
    PRIMARY KEY (id)
);
INSERT INTO schedules VALUES (1, 'old@2030-01-01T10:00:00Z', 'old', 'one-off',
    '2030-01-01 10:00:00.000000', '2029-12-25 10:00:00.000000', 'UTC', NULL, '3', '["3"]', NULL,
    'default', 60, 'failed', 3, 'court 3: taken (HTTP 409)', NULL,
    '2029-01-01 00:00:00.000000', '2029-01-01 00:00:00.000000', '2029-12-25 10:00:01.000000');
"""


def previous_release_database(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(PREVIOUS_SCHEMA)
    return f"sqlite:///{path}"


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server on 127.0.0.1 for the whole run (tests/pg_server.py).

    When it cannot start, the tests that need it fail with the reason under CI (CI=true), so
    that a green CI always means they ran, and are skipped with the reason elsewhere.
    """
    try:
        server = pg_start()
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL could not be started: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the test server, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A ``DATABASE_URL`` for each database courtbot supports: the default SQLite file in
    ``data_dir``, and a fresh PostgreSQL database. A test that takes it runs once on each."""
    if request.param == "sqlite":
        return f"sqlite:///{request.getfixturevalue('data_dir') / 'db.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


# --------------------------------------------------------------------------- a monitoring service


class PingServer:
    """A dead-man's-switch service on 127.0.0.1 (as healthchecks.io): records each GET's path,
    answers ``status``; with ``hold`` set, holds every answer until it is cleared."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.status = 200
        self.hold = threading.Event()
        self.released = threading.Event()
        self._cond = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._cond:
                    server.paths.append(self.path)
                    server._cond.notify_all()
                if server.hold.is_set():
                    server.released.wait(10)
                with contextlib.suppress(OSError):  # the client may have given up meanwhile
                    self.send_response(server.status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until ``count`` pings have arrived; whether they did within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.paths) >= count, timeout)

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def ping_server() -> Iterator[PingServer]:
    server = PingServer()
    yield server
    server.close()


# ---------------------------------------------------------------- the CLI and the daemon in process


@pytest.fixture
def keep_root_logging() -> Iterator[None]:
    """cli.main() sets up logging for its process; in this one, give pytest's handlers back."""
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


def main_in_process(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *argv: str) -> int:
    """``python main.py *argv`` in this process, on ``env`` only (the variables it reads)."""
    for name in list(os.environ):
        if name.startswith(("BOOKING_", "FERNET_", "DATA_", "DATABASE_", "LOG_", "SMTP_")):
            monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    import cli

    return cli.main(list(argv))


def future(days: float = 20) -> datetime:
    """A whole minute ``days`` ahead."""
    return (datetime.now(UTC) + timedelta(days=days)).replace(second=0, microsecond=0)


def add_instance(factory: sessionmaker[Session], key: str, **fields: Any) -> None:
    """A one-off instance ``key@<desired>`` (20 days ahead unless ``desired`` is given)."""
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


# --------------------------------------------------------------------------- daemons in processes


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start real daemons (``python main.py run`` on ``env``, with any more arguments), their
    output in ``tmp_path``; every one still running when the test ends is killed."""
    started: list[DaemonProcess] = []

    def make(env: dict[str, str], *args: str) -> DaemonProcess:
        out = tmp_path / f"daemon{len(started)}.out"
        daemon = DaemonProcess(env, Path(env["DATA_DIR"]), out)
        started.append(daemon.start(*args))
        return daemon

    yield make
    for daemon in started:
        daemon.cleanup()
