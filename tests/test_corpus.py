"""Bad input never takes the daemon down and never loses state (CONTRACT section 5).

``tests/corpus/schedules/*.json`` and ``tests/corpus/tokens/*.json`` are malformed files, each
with the fragments its errors must hold in ``tests/corpus/expected.json``. Each file is loaded
over a database holding the good config (``good_schedules.json``, ``good_tokens.json``): the
loader returns errors (it never raises) that name the file, the entry and the key, and
reconciling leaves the good entries' instances as they were. Files too big to commit (50 MB,
100000 levels of nesting, raw bytes) are made at test time. Hypothesis then throws random JSON
and random bytes at the loader: nothing but its own results may come out.
"""

from __future__ import annotations

import json
import re
import shutil
import string
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet, MultiFernet
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

import models
from config_loader import (
    ENTRY_KEYS,
    Config,
    Settings,
    read_config,
    read_schedules,
    read_tokens,
)
from conftest import NOW
from instances import Changes, reconcile
from models import Instance, Token

CORPUS = Path(__file__).parent / "corpus"
EXPECTED: dict[str, dict[str, list[str]]] = json.loads((CORPUS / "expected.json").read_text())
GOOD_SCHEDULES = (CORPUS / "good_schedules.json").read_bytes()
GOOD_TOKENS = (CORPUS / "good_tokens.json").read_bytes()
PLAINTEXTS = list(json.loads(GOOD_TOKENS).values())
SCHEDULE_FILES = sorted(p.name for p in (CORPUS / "schedules").glob("*.json"))
TOKEN_FILES = sorted(p.name for p in (CORPUS / "tokens").glob("*.json"))
COLUMNS = [c.key for c in Instance.__table__.columns]

# An error line names the file; an entry's line names the entry (its id when it has one and
# always its position) and then the key; a token's line names the token. A key is shown bare
# when it is a Python identifier (``str.isidentifier``, as config_loader decides: ``A·`` is one,
# though ``\w`` does not match ``·``), else quoted.
SCHEDULES_LINE = re.compile(
    r"schedules\.json(: | entry (#\d+|'[A-Za-z0-9_.-]{1,64}' \(#\d+\)): "
    r"((?P<bare>[^\s:'\"]+): |'.*': |\".*\": |expected an object, got ))",
)
TOKENS_LINE = re.compile(r"tokens\.json(: | token ('.*'|\".*\"): )")


def check_line(line: str) -> None:
    assert "\n" not in line.replace("\\n", ""), line
    pattern = TOKENS_LINE if line.startswith("tokens.json") else SCHEDULES_LINE
    match = pattern.match(line)
    assert match, f"names no file, entry and key: {line!r}"
    bare = match.groupdict().get("bare")
    assert bare is None or bare.isidentifier(), f"a key neither an identifier nor quoted: {line!r}"


def check_messages(config: Config, expected: dict[str, list[str]]) -> None:
    """The fragments appear; every line names its file, entry and key; no token leaks."""
    errors, warnings = config.errors, config.warnings
    if expected["errors"]:
        joined = "\n".join(errors)
        for fragment in expected["errors"]:
            assert fragment in joined, f"{fragment!r} not in:\n{joined}"
    else:
        assert errors == []
    for fragment in expected["warnings"]:
        assert fragment in "\n".join(warnings)
    for line in errors + warnings:
        check_line(line)
        for plaintext in PLAINTEXTS:
            assert plaintext not in line


def snapshot(factory: sessionmaker[Session]) -> dict[str, tuple[Any, ...]]:
    with factory() as session:
        return {
            row.key: tuple(getattr(row, c) for c in COLUMNS)
            for row in session.scalars(select(Instance))
        }


def token_rows(factory: sessionmaker[Session]) -> dict[str, tuple[str | None, str | None]]:
    with factory() as session:
        return {t.id: (t.encrypted_token, t.error) for t in session.scalars(select(Token))}


def token_plaintexts(
    factory: sessionmaker[Session], fernet: MultiFernet
) -> dict[str, tuple[str | None, str | None]]:
    """What the tokens table holds, decrypted (a plaintext file is encrypted afresh each load)."""
    return {
        name: (None if value is None else fernet.decrypt(value.encode()).decode(), error)
        for name, (value, error) in token_rows(factory).items()
    }


def load(
    factory: sessionmaker[Session], settings: Settings, fernet: MultiFernet
) -> tuple[Config, Changes]:
    with factory() as session:
        known = set(session.scalars(select(Token.id)))
    config = read_config(settings, fernet, NOW, known_tokens=known)
    return config, reconcile(factory, config, now=NOW)


# The good state is built once and copied into each test's data dir (a fresh load per test
# would cost most of this module's time). Hence one key for the module: the fixtures below
# override conftest's ``fernet_key`` and ``data_dir``; ``env``, ``settings``, ``fernet``,
# ``engine`` and ``factory`` are conftest's, built on them.
MODULE_KEY = Fernet.generate_key().decode()
DB_FILES = ("db.sqlite", "db.sqlite-wal")


@pytest.fixture
def fernet_key() -> str:
    return MODULE_KEY


@pytest.fixture(scope="module")
def good_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the good files and a database with the good config loaded at NOW."""
    folder = tmp_path_factory.mktemp("good")
    (folder / "schedules.json").write_bytes(GOOD_SCHEDULES)
    (folder / "tokens.json").write_bytes(GOOD_TOKENS)
    env = {"FERNET_KEY": MODULE_KEY, "DATA_DIR": str(folder), "LOG_FILE": "-"}
    settings = Settings.from_env(env)
    engine = models.make_engine(settings.database_url)
    try:
        config, changes = load(models.session_factory(engine), settings, settings.fernet())
    finally:
        engine.dispose()
    assert config.errors == [] and config.warnings == []
    assert changes.added == 1 + 52 + 52 + 1
    return folder


@pytest.fixture
def data_dir(tmp_path: Path, good_template: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    for name in ("schedules.json", "tokens.json", *DB_FILES):
        if (good_template / name).exists():
            shutil.copy2(good_template / name, path / name)
    return path


@pytest.fixture
def good_state(factory: sessionmaker[Session]) -> dict[str, tuple[Any, ...]]:
    """The instances of the good config, as loaded at NOW."""
    state = snapshot(factory)
    assert len(state) == 1 + 52 + 52 + 1
    return state


def assert_good_state_kept(
    factory: sessionmaker[Session], before: dict[str, tuple[Any, ...]], *, exact: bool
) -> None:
    after = snapshot(factory)
    assert {k: after.get(k) for k in before} == before
    if exact:
        assert after == before


def test_corpus_is_complete() -> None:
    names = {f"schedules/{n}" for n in SCHEDULE_FILES} | {f"tokens/{n}" for n in TOKEN_FILES}
    assert names == set(EXPECTED)
    assert len(names) >= 40


@pytest.mark.parametrize("name", SCHEDULE_FILES)
def test_bad_schedules_file(
    name: str,
    data_dir: Path,
    settings: Settings,
    fernet: MultiFernet,
    factory: sessionmaker[Session],
    good_state: dict[str, tuple[Any, ...]],
) -> None:
    expected = EXPECTED[f"schedules/{name}"]
    (data_dir / "schedules.json").write_bytes((CORPUS / "schedules" / name).read_bytes())

    direct = read_schedules(
        settings.schedules_path, default_zone="UTC", token_names={"default", "alice"}, now=NOW
    )
    config, _ = load(factory, settings, fernet)

    assert direct.errors == config.schedules.errors
    assert direct.file_error == config.schedules.file_error
    check_messages(config, expected)
    if direct.file_error is not None:
        assert direct.entries == [] and direct.errors == []
    # The last good state stays; only a valid new entry (a warning case) may add instances.
    assert_good_state_kept(factory, good_state, exact=not expected["warnings"])


@pytest.mark.parametrize("name", TOKEN_FILES)
def test_bad_tokens_file(
    name: str,
    data_dir: Path,
    settings: Settings,
    fernet: MultiFernet,
    factory: sessionmaker[Session],
    good_state: dict[str, tuple[Any, ...]],
) -> None:
    expected = EXPECTED[f"tokens/{name}"]
    tokens_before = token_rows(factory)
    (data_dir / "tokens.json").write_bytes((CORPUS / "tokens" / name).read_bytes())

    direct = read_tokens(settings.tokens_path, fernet)
    config, _ = load(factory, settings, fernet)

    assert direct.errors == config.tokens.errors
    check_messages(config, expected)
    assert_good_state_kept(factory, good_state, exact=True)
    if direct.file_error is not None:
        assert token_rows(factory) == tokens_before
    else:
        # A token with an error is marked, never dropped silently; good tokens stay usable.
        stored = token_rows(factory)
        for token in direct.tokens.values():
            if token.error is not None:
                assert stored[token.name][1] == token.error
            else:
                assert stored[token.name][1] is None
                assert fernet.decrypt(stored[token.name][0].encode())


MIB = 1024 * 1024


def _generated(kind: str, case: str) -> bytes:
    opener, closer = (b"[", b"]") if kind == "schedules" else (b"{", b"}")
    if case == "50mb":
        return opener + b" " * (50 * MIB) + closer
    if case == "random_bytes":
        return opener + b'"' + bytes(range(256)) * 64 + b'"' + closer
    if case == "deep_arrays":
        return b"[" * 100_000 + b"]" * 100_000
    if case == "deep_objects":
        return b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    assert case == "deep_inside"
    value = b"[" * 100_000 + b"]" * 100_000
    if kind == "schedules":
        return b'[{"id": "x", "type": "one-off", "court_id": ' + value + b"}]"
    return b'{"default": ' + value + b"}"


GENERATED = {
    "50mb": "the file is larger than 10 MiB",
    # The opener and a quote, then bytes 0 to 255: 0x80 is the first that is no UTF-8.
    "random_bytes": "not UTF-8 text (byte 130: b'\\x80')",
    "deep_arrays": "nested too deeply",
    "deep_objects": "nested too deeply",
    "deep_inside": "nested too deeply",
}


@pytest.mark.parametrize("kind", ["schedules", "tokens"])
@pytest.mark.parametrize("case", list(GENERATED))
def test_generated_bad_file(
    kind: str,
    case: str,
    data_dir: Path,
    settings: Settings,
    fernet: MultiFernet,
    factory: sessionmaker[Session],
    good_state: dict[str, tuple[Any, ...]],
) -> None:
    tokens_before = token_plaintexts(factory, fernet)
    path = data_dir / f"{kind}.json"
    path.write_bytes(_generated(kind, case))

    config, changes = load(factory, settings, fernet)

    result = config.schedules if kind == "schedules" else config.tokens
    assert result.file_error == (
        f"{kind}.json: {GENERATED[case]}; nothing loaded from it, the last good state stays"
    )
    check_line(result.file_error)
    assert changes.empty
    assert_good_state_kept(factory, good_state, exact=True)
    assert token_plaintexts(factory, fernet) == tokens_before
    path.unlink()  # 50 MB: do not keep it around until the session ends


# --------------------------------------------------------------------------- fuzzing

FUZZ = hsettings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

surrogates = st.characters(categories=["Cs"])
texts = st.text(max_size=12) | st.text(st.characters() | surrogates, max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)
# Values that look almost right, so that the fuzzer gets past the first checks.
plausible = {
    "id": st.sampled_from(["wed-evening", "match", "", "a b", "x" * 65]) | json_values,
    "type": st.sampled_from(["one-off", "recurring", "weekly"]) | json_values,
    "desired_time": st.sampled_from(
        [
            "2026-12-02 17:00",
            "2027-03-28 01:30",
            "2027-10-31 01:30",
            "2026-11-01 10:00",
            "2026-02-30 10:00",
            "0001-01-01 00:00",
            "9999-12-31 23:59",
            "2026-12-02T17:00:00+14:00",
            "2026-12-02 17:00Z",
        ]
    )
    | json_values,
    "rrule": st.sampled_from(
        [
            "FREQ=WEEKLY;BYDAY=WE",
            "FREQ=DAILY;COUNT=3",
            "FREQ=MONTHLY;BYMONTHDAY=31",
            "FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29",
            "FREQ=WEEKLY;INTERVAL=-1",
            "FREQ=WEEKLY;UNTIL=20261201T000000Z",
            "DTSTART;TZID=Europe/London:20270328T013000\nRRULE:FREQ=DAILY",
            "DTSTART:99991230T120000\nRRULE:FREQ=DAILY",
            "every Wednesday at 17:00",
            "every other Friday at 10:00 starting 2026-12-04",
            "every tue and thu at 07:30 until 2027-06-30",
            "every day at 24:00",
        ]
    )
    | json_values,
    "court_id": st.sampled_from(["3", 3, None, ["3", "4"], []]) | json_values,
    "token": st.sampled_from(["default", "alice", "bob"]) | json_values,
    "timezone": st.sampled_from(
        ["Europe/London", "America/New_York", "Pacific/Kiritimati", "UTC", "Mars/Base"]
    )
    | json_values,
    "duration_minutes": st.sampled_from([60, 0, 1440, 1441]) | json_values,
    "enabled": st.booleans() | json_values,
    "skip": st.sampled_from([["2026-12-09"], ["2026-12-32"], [], "2026-12-09"]) | json_values,
    "club": st.sampled_from(["padel", "../etc/passwd", "", "a" * 65]) | json_values,
    "window": st.sampled_from(["6d@08:00", "0d@20:00", "0d@00:00", "7 days", "6d@24:00", "0h"])
    | json_values,
    "fallback_times": st.sampled_from([["18:00", "16:30"], ["7pm"], [], "18:00", ["25:00"]])
    | json_values,
    "watch": st.sampled_from(["2h", "90m", False, True, "2 hours", "0h", "999h"]) | json_values,
    "players": st.sampled_from([["ana@example.com", "Ben"], [], "Ben", [1, 2]]) | json_values,
    "about": st.sampled_from(["disabled until the club opens", ""]) | json_values,
    "cour_id": json_values,
}
entries = st.lists(
    st.fixed_dictionaries(
        {},
        optional={key: plausible[key] for key in [*ENTRY_KEYS, "cour_id"]},
    )
    | json_values,
    max_size=4,
)


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(value=json_values)
def test_fuzz_schedules_json_values(value: Any, data_dir: Path) -> None:
    path = data_dir / "schedules.json"
    path.write_text(_dump(value))
    result = read_schedules(path, default_zone="UTC", token_names={"default"}, now=NOW)
    for line in [*result.errors, *result.warnings, *filter(None, [result.file_error])]:
        check_line(line)


@hsettings(FUZZ, max_examples=60)  # each example also reconciles: slower
@given(value=entries)
def test_fuzz_schedules_entries_then_reconcile(
    value: Any,
    data_dir: Path,
    settings: Settings,
    fernet: MultiFernet,
    factory: sessionmaker[Session],
) -> None:
    (data_dir / "schedules.json").write_text(_dump(value))
    (data_dir / "tokens.json").write_bytes(GOOD_TOKENS)
    config, _ = load(factory, settings, fernet)
    assert len(config.schedules.entries) <= len(value)
    for line in config.errors + config.warnings:
        check_line(line)


secret_values = st.builds(lambda s: "SECRET-" + s, texts) | json_values
token_values = st.dictionaries(
    texts,
    secret_values | st.dictionaries(texts, secret_values, max_size=3),
    max_size=4,
)


@FUZZ
@given(value=token_values)
def test_fuzz_tokens_json(value: dict[str, Any], data_dir: Path, fernet: MultiFernet) -> None:
    path = data_dir / "tokens.json"
    path.write_text(_dump(value))
    result = read_tokens(path, fernet)
    for line in [*result.errors, *filter(None, [result.file_error])]:
        check_line(line)
        assert "SECRET-" not in line  # a token never appears in an error
    for token in result.tokens.values():
        assert (token.encrypted is None) != (token.error is None)


@FUZZ
@given(schedules=st.binary(max_size=200), tokens=st.binary(max_size=200))
def test_fuzz_random_bytes(
    schedules: bytes, tokens: bytes, data_dir: Path, settings: Settings, fernet: MultiFernet
) -> None:
    (data_dir / "schedules.json").write_bytes(schedules)
    (data_dir / "tokens.json").write_bytes(tokens)
    config = read_config(settings, fernet, NOW)
    for line in config.errors + config.warnings:
        check_line(line)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from([*string.printable, "\ufeff", "\u00e9"]), max_size=80))
def test_fuzz_json_like_text(text: str, data_dir: Path, fernet: MultiFernet) -> None:
    # Near-JSON text: brackets, quotes, digits, blanks.
    (data_dir / "schedules.json").write_text(f"[{text}]")
    (data_dir / "tokens.json").write_text("{" + text + "}")
    schedules = read_schedules(
        data_dir / "schedules.json", default_zone="UTC", token_names=set(), now=NOW
    )
    tokens = read_tokens(data_dir / "tokens.json", fernet)
    for line in [*schedules.errors, *filter(None, [schedules.file_error, tokens.file_error])]:
        check_line(line)
