"""The container without a Docker engine: the Dockerfile's own commands, run for real.

A fresh venv is built with the Dockerfile's exact pip command from requirements.txt alone, the
files its COPY line names are copied into an app dir, and the image's CMD and HEALTHCHECK
commands run there against the sandbox club.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from daemon_harness import iso_z, wait_until
from tools.sandbox_club import SandboxClub

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """Every instruction ``name`` of the Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", joined, re.MULTILINE)]


def exec_form(name: str) -> list[str]:
    (value,) = instruction(name)
    if name == "HEALTHCHECK":
        value = value.split("CMD", 1)[1].strip()
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{name} must be in exec form"
    return [str(part) for part in parsed]


def test_image_python_is_the_one_the_suite_runs_on() -> None:
    (base,) = instruction("FROM")
    image_minor = re.fullmatch(r"python:(3\.\d+)-\S+", base)
    assert image_minor, base
    assert tuple(map(int, image_minor[1].split("."))) >= (3, 11)
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    if image_minor[1] != minor:
        pytest.skip(f"the image runs Python {image_minor[1]}; this run is {minor} (CI checks it)")


def test_dockerfile_shape() -> None:
    assert exec_form("CMD") == ["python", "main.py"]
    assert exec_form("ENTRYPOINT") == ["/app/docker-entrypoint.sh"]
    assert exec_form("HEALTHCHECK") == ["python", "main.py", "health"]
    assert instruction("VOLUME") == ["/app/data"]
    assert any("--no-cache-dir" in run and "requirements.txt" in run for run in instruction("RUN"))
    copied = instruction("COPY")[-1].split()[:-1]
    modules = {p.name for p in REPO.glob("*.py")}
    assert modules <= set(copied), f"runtime modules missing from COPY: {modules - set(copied)}"
    ignore = (REPO / ".dockerignore").read_text().split()
    assert all(f"!{name}" in ignore for name in copied)


@pytest.fixture(scope="module")
def image_dir() -> Iterator[Path]:
    """An "image": a fresh venv from requirements.txt and the files COPY names."""
    root = Path(tempfile.mkdtemp(prefix="courtbot-image-"))
    try:
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip_run = next(r for r in instruction("RUN") if r.startswith("pip install"))
        args = shlex.split(pip_run)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", *args],
            cwd=REPO,
            check=True,
            timeout=600,
            capture_output=True,
        )
        app = root / "app"
        app.mkdir()
        (copy_line,) = [c for c in instruction("COPY") if "main.py" in c]
        for name in copy_line.split()[:-1]:
            shutil.copy2(REPO / name, app / name)
        # The RUN after the COPY, as written, with /app meaning this app directory.
        (compile_run,) = [r for r in instruction("RUN") if "compileall" in r]
        args = [str(app) if a == "/app" else a for a in shlex.split(compile_run)]
        subprocess.run([str(venv / "bin" / "python"), *args[1:]], check=True, timeout=120)
        assert (app / "__pycache__").is_dir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_container_command_runs_books_and_stops(image_dir: Path, tmp_path: Path) -> None:
    token = "tok-container-9"
    data = tmp_path / "data"
    data.mkdir()
    with SandboxClub(tokens=(token,)) as club:
        desired = (datetime.now(UTC) + timedelta(hours=20)).replace(microsecond=0)
        (data / "schedules.json").write_text(
            json.dumps([{"id": "c", "type": "one-off", "desired_time": iso_z(desired)}])
        )
        (data / "tokens.json").write_text(json.dumps({"default": token}))
        env = {
            "PATH": f"{image_dir / 'venv' / 'bin'}:/usr/bin:/bin",
            "FERNET_KEY": Fernet.generate_key().decode(),
            "BOOKING_API_URL": club.url,
            "DATA_DIR": str(data),
            "PYTHONUNBUFFERED": "1",
        }
        app = image_dir / "app"
        proc = subprocess.Popen(
            exec_form("CMD"), cwd=app, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            assert wait_until((data / "bot.pid").exists, 30)
            assert wait_until(lambda: len(club.bookings) == 1, 10)
            health = subprocess.run(
                exec_form("HEALTHCHECK"),
                cwd=app,
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert health.returncode == 0, health.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert "booked c@" in output
        assert token not in output
        assert (data / "bot.log").exists()
        (data / "heartbeat").write_text("0\n")
        stale = subprocess.run(
            exec_form("HEALTHCHECK"), cwd=app, env=env, capture_output=True, timeout=60, check=False
        )
        assert stale.returncode == 1


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root"
)


@pytest.fixture
def root() -> Iterator[Path]:
    """A scratch directory that uid 10001 can reach, as /app is in the image (pytest's tmp_path
    sits in a directory only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="courtbot-entrypoint-"))
    os.chmod(path, 0o755)  # noqa: S103
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _entrypoint(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "docker-entrypoint.sh"), "sh", "-c", command],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_root
def test_entrypoint_hands_a_root_owned_disk_to_the_app_user(root: Path) -> None:
    disk = root  # root-owned, 0755, as a freshly mounted disk
    (disk / "schedules.json").write_text("[]")
    done = _entrypoint({"DATA_DIR": str(disk)}, "id -u; touch $DATA_DIR/x")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "10001"
    assert disk.stat().st_uid == 10001
    assert (disk / "schedules.json").stat().st_uid == 10001
    assert (disk / "x").stat().st_uid == 10001
    assert stat.S_IMODE(disk.stat().st_mode) == 0o700


@needs_root
def test_entrypoint_copies_the_config_files_from_config_dir_at_each_start(root: Path) -> None:
    secrets_dir = root / "secrets"  # read-only files, as Render's secret files are
    secrets_dir.mkdir()
    (secrets_dir / "schedules.json").write_text('[{"id": "a"}]')
    (secrets_dir / "tokens.json").write_text('{"default": "gAAAAA-encrypted"}')
    (secrets_dir / "other.json").write_text("{}")
    for path in secrets_dir.iterdir():
        path.chmod(0o444)
    data = root / "data"  # a fresh, root-owned container directory
    env = {"DATA_DIR": str(data), "CONFIG_DIR": str(secrets_dir)}
    for expected in ('[{"id": "a"}]', '[{"id": "b"}]'):
        (secrets_dir / "schedules.json").chmod(0o644)
        (secrets_dir / "schedules.json").write_text(expected)
        done = _entrypoint(env, "cat $DATA_DIR/schedules.json")
        assert (done.returncode, done.stdout) == (0, expected), done.stderr
    assert sorted(p.name for p in data.iterdir()) == ["schedules.json", "tokens.json"]
    for name in ("schedules.json", "tokens.json"):
        copied = (data / name).stat()
        assert (copied.st_uid, stat.S_IMODE(copied.st_mode)) == (10001, 0o600)
    assert (data / "tokens.json").read_text() == '{"default": "gAAAAA-encrypted"}'


def test_the_image_carries_the_ready_flows_outside_the_data_volume() -> None:
    (ready,) = [c for c in instruction("COPY") if "clubs" in c]
    assert ready.split() == ["data/clubs/", "/app/clubs/"]
    (env,) = instruction("ENV")
    assert "READY_CLUBS_DIR=/app/clubs" in env.split()
    (volume,) = instruction("VOLUME")
    assert not "/app/clubs/".startswith(volume.rstrip("/") + "/")
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "!data/clubs/*.json" in ignore
    assert sorted(p.name for p in (REPO / "data" / "clubs").iterdir()) == sorted(
        p.name for p in (REPO / "data" / "clubs").glob("*.json")
    )


@needs_root
def test_entrypoint_copies_no_ready_flow_and_removes_an_earlier_unedited_copy(
    root: Path,
) -> None:
    """The ready flows are read from READY_CLUBS_DIR by name (config_loader.club_path): the
    entrypoint copies none. A copy an earlier image made and nobody edited is removed, so the
    image's version is used again; an edited one stays, no longer marked."""
    data = root / "data"
    clubs = data / "clubs"
    clubs.mkdir(parents=True)
    unedited = '{"about": "as an earlier image copied it"}'
    (clubs / "playtomic.json").write_text(unedited)
    (clubs / ".playtomic.json.ready").write_text(
        subprocess.run(
            ["sha256sum"], input=unedited, capture_output=True, text=True, check=True
        ).stdout
    )
    (clubs / "doinsport.json").write_text('{"about": "edited by you"}')
    (clubs / ".doinsport.json.ready").write_text("0" * 64 + "  -\n")
    (clubs / "mine.json").write_text('{"about": "yours"}')
    env = {"DATA_DIR": str(data), "READY_CLUBS_DIR": str(REPO / "data" / "clubs")}
    done = _entrypoint(env, "ls -A $DATA_DIR/clubs")
    assert (done.returncode, done.stdout.split()) == (0, ["doinsport.json", "mine.json"]), (
        done.stderr
    )
    assert (clubs / "doinsport.json").read_text() == '{"about": "edited by you"}'
    assert all(p.stat().st_uid == 10001 for p in clubs.iterdir())


@needs_root
def test_entrypoint_makes_files_put_there_as_root_readable_by_the_daemon(root: Path) -> None:
    """``docker compose cp`` leaves a root-owned file with the host's mode (0600 after a local
    run): the daemon, uid 10001, could not read it. At start the entrypoint makes it its own."""
    data = root / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)  # the volume was the daemon's already
    for name in ("schedules.json", "tokens.json"):
        (data / name).write_text("{}")
        (data / name).chmod(0o600)
    (data / "clubs").mkdir()
    (data / "clubs" / "mine.json").write_text("{}")
    (data / "clubs" / "mine.json").chmod(0o600)
    done = _entrypoint({"DATA_DIR": str(data)}, "cat $DATA_DIR/tokens.json $DATA_DIR/clubs/*")
    assert (done.returncode, done.stdout) == (0, "{}{}"), done.stderr


@needs_root
def test_entrypoint_copies_club_files_from_config_dir_over_the_ready_flows(root: Path) -> None:
    ready = root / "ready"
    ready.mkdir()
    (ready / "clubautomation.json").write_text('{"about": "ready: yourclub"}')
    secrets_dir = root / "secrets"
    (secrets_dir / "clubs").mkdir(parents=True)
    # Flat, as Render's secret files are; and a directory, as a mount may be.
    (secrets_dir / "clubs.clubautomation.json").write_text('{"about": "myclub"}')
    (secrets_dir / "clubs" / "padel.json").write_text('{"about": "padel"}')
    (secrets_dir / "clubs.json").write_text("{}")  # no club name: not a club file
    data = root / "data"
    env = {"DATA_DIR": str(data), "CONFIG_DIR": str(secrets_dir), "READY_CLUBS_DIR": str(ready)}
    for _ in range(2):  # the file from CONFIG_DIR is used, never the ready flow of its name
        done = _entrypoint(env, "ls $DATA_DIR/clubs")
        assert (done.returncode, done.stdout.split()) == (
            0,
            ["clubautomation.json", "padel.json"],
        ), done.stderr
        clubs = data / "clubs"
        assert (clubs / "clubautomation.json").read_text() == '{"about": "myclub"}'
        assert (clubs / "padel.json").read_text() == '{"about": "padel"}'
        for name in ("clubautomation.json", "padel.json"):
            copied = (clubs / name).stat()
            assert (copied.st_uid, stat.S_IMODE(copied.st_mode)) == (10001, 0o600)


def _env_keys(service: dict[str, object]) -> dict[str, dict[str, object]]:
    entries = service["envVars"]
    assert isinstance(entries, list)
    return {entry["key"]: entry for entry in entries}


def test_the_render_blueprint_for_postgresql_runs_two_workers_on_a_managed_database() -> None:
    import yaml

    single = yaml.safe_load((REPO / "render.yaml").read_text())
    ha = yaml.safe_load((REPO / "render.postgres.yaml").read_text())
    (database,) = ha["databases"]
    (worker,) = ha["services"]
    assert (worker["type"], worker["numInstances"]) == ("worker", 2)
    assert "disk" not in worker  # a service with a disk runs one instance only
    env = _env_keys(worker)
    assert env["DATABASE_URL"]["fromDatabase"] == {
        "name": database["name"],
        "property": "connectionString",
    }
    assert env["CONFIG_DIR"]["value"] == "/etc/secrets"  # Render's secret files
    assert env["LOG_FILE"]["value"] == "-"
    # Every setting of the single-worker Blueprint is offered here too, secrets still secret.
    (plain,) = single["services"]
    for key, entry in _env_keys(plain).items():
        assert key in env, key
        if entry.get("sync") is False:
            assert env[key].get("sync") is False, key


def test_the_compose_file_for_postgresql_runs_two_replicas_each_with_its_own_data_dir() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.postgres.yml").read_text())
    postgres, courtbot = compose["services"]["postgres"], compose["services"]["courtbot"]
    assert courtbot["deploy"]["replicas"] == 2
    assert courtbot["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert courtbot["environment"]["DATABASE_URL"].startswith("postgresql://courtbot:")
    assert courtbot["environment"]["CONFIG_DIR"] == "/config"
    # DATA_DIR is no shared volume: two replicas on one would hold each other's lock.
    assert all(not mount.endswith(":/app/data") for mount in courtbot["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_one_default_zone_in_the_code_the_blueprints_the_env_example_and_the_readme() -> None:
    """An entry without a zone must not move by an hour depending on where courtbot runs: the
    examples carry the code's default (the contract's UTC), each saying to set the club's zone."""
    import yaml

    from config_loader import Settings

    default = Settings.from_env({}).timezone
    assert default == "UTC"
    for blueprint in ("render.yaml", "render.postgres.yaml"):
        (service,) = [
            s for s in yaml.safe_load((REPO / blueprint).read_text())["services"] if "envVars" in s
        ]
        assert _env_keys(service)["BOOKING_TIMEZONE"]["value"] == default, blueprint
        assert "Your club's zone" in (REPO / blueprint).read_text(), blueprint
    example = (REPO / "courtbot.env.example").read_text()
    assert f"\nBOOKING_TIMEZONE={default}\n" in example
    assert "your club's zone" in example
    table = (REPO / "docs" / "reference" / "environment.md").read_text()
    assert f"| `BOOKING_TIMEZONE` | `{default}` |" in table
