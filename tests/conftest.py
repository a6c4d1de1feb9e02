"""Shared fixtures: a data dir, a key, settings, a real SQLite database in tmp_path, and a real
PostgreSQL server (``pg_server``, ``pg_url``; ``db_url`` runs a test on each database)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
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

#: A fixed "now" for tests that do not need the real clock (a Monday).
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` and return the path."""
    path.write_text(json.dumps(value, indent=2))
    return path


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
def env(data_dir: Path, fernet_key: str) -> dict[str, str]:
    """A minimal environment for the daemon, its files in ``data_dir``."""
    return {
        "FERNET_KEY": fernet_key,
        "BOOKING_API_URL": "http://club.test/bookings",
        "DATA_DIR": str(data_dir),
        "LOG_FILE": "-",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    engine = models.make_engine(f"sqlite:///{data_dir / 'db.sqlite'}")
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    return models.session_factory(engine)


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
