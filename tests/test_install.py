"""`pip install .` gives a `courtbot` command: the wheel pyproject.toml builds, and that wheel
installed into a fresh virtualenv, run as a real process.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps --no-build-isolation
--no-index``, with the setuptools that requirements-dev.txt pins), so the build leaves nothing in
the repository. The fresh virtualenv sees the runtime dependencies through a ``.pth`` file naming
this environment's site-packages (``--system-site-packages`` would show the base interpreter's,
not this virtualenv's), and the wheel is installed with ``--no-deps --no-index``: no network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from test_docs import parser_commands
from test_layout import MODULES

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: This environment's pip, offline and quiet.
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]


def pins(lines: list[str]) -> set[str]:
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for path in [ROOT / "pyproject.toml", ROOT / "README.md", *ROOT.glob("*.py")]:
        shutil.copy(path, src)
    dist = src / "dist"
    subprocess.run(
        [
            *PIP,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = dist.glob("courtbot-*.whl")
    return built


def test_every_production_module_is_a_py_module() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["py-modules"])
    missing, stale = set(MODULES) - listed, listed - set(MODULES)
    assert not missing, f"pyproject.toml [tool.setuptools] py-modules lacks {sorted(missing)}"
    assert not stale, (
        f"pyproject.toml [tool.setuptools] py-modules names no module: {sorted(stale)}"
    )


def test_the_project_pins_exactly_the_runtime_requirements() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == "courtbot"
    assert project["requires-python"] == ">=3.11"
    assert set(project["dependencies"]) == pins((ROOT / "requirements.txt").read_text().split("\n"))
    assert project["scripts"] == {"courtbot": "cli:main"}
    (setuptools,) = PYPROJECT["build-system"]["requires"]
    assert setuptools in pins((ROOT / "requirements-dev.txt").read_text().split("\n"))


def test_the_wheel_holds_every_module_and_the_courtbot_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    assert {f"{module}.py" for module in MODULES} <= names
    assert not [n for n in names if n.startswith(("tests/", "tools/", "data/"))]
    assert re.search(r"^\[console_scripts\]\ncourtbot = cli:main$", entry_points, re.M)
    assert "Requires-Python: >=3.11" in metadata
    required = set(re.findall(r"^Requires-Dist: (\S+)$", metadata, re.M))
    assert required == pins((ROOT / "requirements.txt").read_text().split("\n"))


@pytest.mark.slow
def test_the_installed_courtbot_command_runs(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    courtbot = venv / "bin" / "courtbot"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FERNET", "DATA"))}
    env["DATA_DIR"] = str(tmp_path / "data")

    def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    where = run(python, "-c", "import cli, watchdog; print(cli.__file__, watchdog.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(Path(path).is_relative_to(Path(site)) for path in where.stdout.split()), where

    helped = run(courtbot, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: courtbot "), helped.stdout
    for command in parser_commands():
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.M), (command, helped.stdout)

    key = run(courtbot, "generate-key")
    assert key.returncode == 0, key.stderr
    Fernet(key.stdout.strip())  # a valid key: this raises otherwise

    missing = run(courtbot, "check")
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "FERNET_KEY" in missing.stderr
