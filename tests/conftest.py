"""Shared fixtures: a data dir, a key, settings, a real SQLite database in tmp_path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet
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
