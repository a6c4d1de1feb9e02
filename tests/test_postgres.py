"""PostgreSQL as a first-class database: URLs as given, psycopg 3, one-line errors with the
password masked, tables created once among daemons starting together, the claim owner column."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from pg_server import PgServer, free_port
from psycopg import sql
from sqlalchemy import Engine, event, select, text, update

import models
from conftest import NOW
from models import Instance


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+psycopg://u:***@h/db"),
        ("postgres://u:p@h:6543/db", "postgresql+psycopg://u:***@h:6543/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
        ("sqlite:///data/db.sqlite", "sqlite:///data/db.sqlite"),
    ],
)
def test_postgresql_urls_mean_psycopg_3(url: str, expected: str) -> None:
    assert models.engine_url(url).render_as_string(hide_password=True) == expected


def test_is_postgresql() -> None:
    assert models.is_postgresql("postgresql://u@h/db")
    assert models.is_postgresql("postgres://u@h/db")
    assert models.is_postgresql("postgresql+psycopg2://u@h/db")
    assert not models.is_postgresql("sqlite:///db.sqlite")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:s3cret@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:p%40ss@host:5433/db", "postgresql://user:***@host:5433/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        (
            "postgresql://user@host/db?password=s3cret&sslmode=require",
            "postgresql://user@host/db?password=***&sslmode=require",
        ),
        ("sqlite:///data/db.sqlite", "sqlite:///data/db.sqlite"),
        ("not a url user:s3cret@host", "not a url user:s3cret@host"),
        ("weird+://user:s3cret@host/db", "weird+://user:***@host/db"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert models.mask_url(url) == masked


# --------------------------------------------------------------------------- a real server


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = models.make_engine(pg_url)
    yield engine
    engine.dispose()


def test_a_postgresql_url_works_as_given(pg_url: str, pg_engine: Engine) -> None:
    assert pg_url.startswith("postgresql://")
    assert (pg_engine.dialect.name, pg_engine.dialect.driver) == ("postgresql", "psycopg")
    assert models.has_tables(pg_engine)
    # SQLite's pragmas are for SQLite only (PostgreSQL would reject them)
    assert not event.contains(pg_engine, "connect", models._sqlite_pragmas)
    with pg_engine.connect() as conn:
        assert conn.execute(text("SHOW application_name")).scalar() == "courtbot"
        assert conn.execute(text("SHOW tcp_keepalives_idle")).scalar() is not None


def test_sqlite_keeps_its_pragmas(engine: Engine) -> None:
    assert event.contains(engine, "connect", models._sqlite_pragmas)


def test_a_connection_the_server_dropped_is_replaced(
    pg_server: PgServer, pg_engine: Engine
) -> None:
    with pg_engine.connect() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with pg_server.admin() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != backend


def test_instances_round_trip_with_their_owner(pg_engine: Engine) -> None:
    factory = models.session_factory(pg_engine)
    with models.transaction(factory) as session:
        session.add(
            Instance(
                key="wed@2026-12-02T17:00:00Z",
                schedule_id="wed",
                type="recurring",
                desired_time=NOW + timedelta(days=9),
                trigger_time=NOW + timedelta(days=2),
                timezone="Europe/London",
            )
        )
    with models.transaction(factory) as session:
        claimed = session.execute(
            update(Instance)
            .where(Instance.key == "wed@2026-12-02T17:00:00Z", Instance.status == models.PENDING)
            .values(status=models.BOOKING, owner="daemon-1")
        )
        assert claimed.rowcount == 1
    with factory() as session:
        row = session.scalars(select(Instance)).one()
        assert (row.status, row.owner, row.desired_time) == (
            models.BOOKING,
            "daemon-1",
            NOW + timedelta(days=9),
        )


def test_daemons_starting_together_create_the_tables_once(pg_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            models.make_engine(pg_url).dispose()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


# --------------------------------------------------------------------------- one-line errors


def one_line(exc: pytest.ExceptionInfo[models.DatabaseConnectError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("create", [True, False])
def test_an_unreachable_server(pg_server: PgServer, create: bool) -> None:
    port = free_port()
    url = pg_server.url().replace(f":{pg_server.port}/", f":{port}/")
    with pytest.raises(models.DatabaseConnectError) as caught:
        models.make_engine(url, create=create)
    assert one_line(caught) == (
        f"cannot open the database postgresql://postgres:***@127.0.0.1:{port}/postgres "
        f"(host 127.0.0.1, port {port}, database postgres): connection refused; check that "
        f"PostgreSQL runs at 127.0.0.1 port {port} and accepts TCP connections, or fix the "
        "host and port in DATABASE_URL"
    )
    assert pg_server.password not in str(caught.value)


def test_a_wrong_password(pg_server: PgServer) -> None:
    url = pg_server.url(password="not-the-Password-7")
    with pytest.raises(models.DatabaseConnectError) as caught:
        models.make_engine(url)
    assert one_line(caught) == (
        f"cannot open the database postgresql://postgres:***@127.0.0.1:{pg_server.port}/"
        f"postgres (host 127.0.0.1, port {pg_server.port}, database postgres): password "
        "authentication failed for user 'postgres'; check the user name and password in "
        "DATABASE_URL"
    )
    assert "not-the-Password-7" not in str(caught.value)


def test_a_database_that_does_not_exist(pg_server: PgServer) -> None:
    with pytest.raises(models.DatabaseConnectError) as caught:
        models.make_engine(pg_server.url("nosuchdb"))
    port = pg_server.port
    assert one_line(caught) == (
        f"cannot open the database postgresql://postgres:***@127.0.0.1:{port}/nosuchdb "
        f"(host 127.0.0.1, port {port}, database nosuchdb): database 'nosuchdb' does not "
        f"exist; create it (createdb -h 127.0.0.1 -p {port} -U postgres nosuchdb) or fix the "
        "database name in DATABASE_URL"
    )


def test_a_user_who_may_not_create_the_tables(pg_server: PgServer, pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    role = f"r_{database}"
    with pg_server.admin() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw-of-the-role'").format(sql.Identifier(role))
        )
    try:
        url = f"postgresql://{role}:pw-of-the-role@127.0.0.1:{pg_server.port}/{database}"
        with pytest.raises(models.DatabaseConnectError) as caught:
            models.make_engine(url)
        port = pg_server.port
        assert one_line(caught) == (
            f"cannot open the database postgresql://{role}:***@127.0.0.1:{port}/{database} "
            f"(host 127.0.0.1, port {port}, database {database}): user '{role}' may not "
            "create courtbot's tables (permission denied for schema public); make "
            f"'{role}' the database's owner (ALTER DATABASE "
            f"{database} OWNER TO {role}) or grant it CREATE on the schema (GRANT CREATE ON "
            f"SCHEMA public TO {role})"
        )
    finally:
        pg_server.drop_database(database)
        with pg_server.admin() as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_server_that_does_not_answer() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel accepts the connection; nobody ever answers
        port = silent.getsockname()[1]
        url = f"postgresql://u:pw@127.0.0.1:{port}/db?connect_timeout=2"
        with pytest.raises(models.DatabaseConnectError) as caught:
            models.make_engine(url, create=False)
    assert one_line(caught) == (
        f"cannot open the database postgresql://u:***@127.0.0.1:{port}/db?connect_timeout=2 "
        f"(host 127.0.0.1, port {port}, database db): no answer within 2 s; check the host "
        "and port in DATABASE_URL and that the network lets this machine reach the server"
    )


def test_a_driver_that_is_not_installed() -> None:
    with pytest.raises(models.DatabaseConnectError) as caught:
        models.make_engine("postgresql+psycopg2://u:pw@127.0.0.1/db")
    assert one_line(caught) == (
        "cannot open the database postgresql+psycopg2://u:***@127.0.0.1/db (host 127.0.0.1, "
        "port 5432, database db): no driver for 'postgresql+psycopg2' (No module named "
        "'psycopg2'); write the URL as postgresql://user:password@host/db (psycopg 3, which "
        "requirements.txt installs)"
    )


# --------------------------------------------------------------------------- older databases


def _old_database(url: str) -> None:
    """A database as made before the ``owner`` column, with one instance."""
    engine = models.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE schedules DROP COLUMN owner"))
        conn.execute(
            Instance.__table__.insert().values(
                key="k@2026-12-02T17:00:00Z",
                schedule_id="k",
                type="one-off",
                desired_time=NOW,
                trigger_time=NOW,
                timezone="UTC",
                courts="[null]",
                token_name="default",
                duration_minutes=60,
                status=models.PENDING,
                attempts=0,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    engine.dispose()


def columns(url: str) -> set[str]:
    engine = models.make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                rows = conn.execute(text("PRAGMA table_info(schedules)")).fetchall()
                return {row[1] for row in rows}
            rows = conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'schedules'"
                )
            ).fetchall()
            return {row[0] for row in rows}
    finally:
        engine.dispose()


def test_an_older_database_gets_the_owner_column(db_url: str) -> None:
    _old_database(db_url)
    assert "owner" not in columns(db_url)
    assert "owner" in models.Instance.__table__.columns
    daemon = models.make_engine(db_url)
    try:
        assert "owner" in columns(db_url)
        with daemon.connect() as conn:
            assert conn.execute(select(Instance.owner)).scalar_one() is None
        assert models.add_missing_columns(daemon) == []
    finally:
        daemon.dispose()


def test_psycopg_is_what_requirements_install() -> None:
    assert psycopg.__version__ == "3.3.9"
    assert psycopg.pq.__impl__ == "binary"  # the wheel's libpq: no system library needed


# --------------------------------------------------------------------------- no server


def run_without_server(ci: str | None) -> subprocess.CompletedProcess[str]:
    """Run one PostgreSQL test in a pytest of its own whose server cannot start."""
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["PG_BIN"] = "/nonexistent/bin"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__)}::test_a_postgresql_url_works_as_given",
        ],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


REASON = (
    "PostgreSQL could not be started: no PostgreSQL server binaries (initdb, postgres) under "
    "/usr/lib/postgresql/*/bin or PG_BIN; `make test` installs Debian's postgresql package "
    "when run as root, or run `apt-get install postgresql`"
)


def test_without_a_server_ci_fails_with_the_reason() -> None:
    result = run_without_server("true")
    assert result.returncode == 1, result.stdout
    assert REASON in result.stdout
    assert "1 error" in result.stdout


def test_without_a_server_a_developer_is_told_why_it_skipped() -> None:
    result = run_without_server(None)
    assert result.returncode == 0, result.stdout
    assert re.search(
        rf"SKIPPED \[1\] tests/test_postgres.py:\d+: {re.escape(REASON)}\n", result.stdout
    )
    assert "1 skipped" in result.stdout
