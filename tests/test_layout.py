"""Who may import whom (docs/development.md, "How the code is laid out"), read with ``ast``.

Data flows one way: files -> config_loader -> instances -> models, and at a trigger bot; utils and
template are pure. An import that is not an arrow of ALLOWED fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import fnmatch
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: module -> the project modules it may import. cli, the commands, may import all but main (and
#: is the only one to import daemon); daemon, the daemon's life, what it runs; main, the script,
#: only cli.
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "template": {"utils"},
    "models": set(),
    "notify": set(),
    "scheduler": {"models"},
    "watchdog": set(),
    "config_loader": {"utils", "template"},
    "instances": {"models", "utils", "config_loader", "template", "notify"},
    "bot": {
        "instances",
        "template",
        "utils",
        "notify",
        "models",
        "wire",
        "club_client",
        "clubclock",
    },
    "club_client": {"template", "utils", "wire", "clubclock"},
    "clubclock": set(),
    # Roles: instances for the claims; the rest only as types of the daemon it serves (Host).
    "leader": {"models", "instances", "watchdog", "bot", "config_loader", "notify", "scheduler"},
    "rehearsal": {"bot", "instances", "utils", "models", "notify"},
    "report": {"utils"},
    "heartbeat": {"utils"},
    "wire": set(),
    "logs": {"config_loader", "notify"},
    "datadir": {"models", "config_loader"},
    "daemon": {
        "bot",
        "club_client",
        "config_loader",
        "datadir",
        "heartbeat",
        "instances",
        "leader",
        "models",
        "notify",
        "rehearsal",
        "scheduler",
        "template",
        "utils",
        "watchdog",
    },
    "cli": {
        "bot",
        "club_client",
        "clubclock",
        "config_loader",
        "daemon",
        "datadir",
        "instances",
        "leader",
        "logs",
        "models",
        "notify",
        "report",
        "template",
        "utils",
        "watchdog",
    },
    "main": {"cli"},
}
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
#: Longest production function, in lines (ruff's PLR0915 and C901 hold statements and branches).
MAX_FUNCTION_LINES = 80
#: Highest mccabe complexity of a production function (ruff's C901 holds it).
MAX_COMPLEXITY = 25
#: Longest production class, in lines; cli.py, the commands, holds only small ones.
MAX_CLASS_LINES = 400
MAX_CLI_CLASS_LINES = 60
#: cli.py is the commands only: argument parsing, printing, exit codes.
MAX_CLI_LINES = 900


def project_imports(path: Path) -> list[tuple[str, int]]:
    """(project module, line) for every import of a project module in ``path``, anywhere in it
    (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(name, node.lineno) for name in names if name in MODULES]
    return found


def test_every_module_has_a_row_in_the_table() -> None:
    assert set(MODULES) == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_follow_the_arrows(module: str) -> None:
    wrong = [
        f"{module}.py:{line}: imports {name}, not an arrow of the table"
        for name, line in project_imports(ROOT / f"{module}.py")
        if name not in ALLOWED[module]
    ]
    assert wrong == []


def test_the_table_reads_imports_inside_functions_too(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("import os\nimport utils\n\ndef f():\n    from bot import book_slot\n")
    assert project_imports(source) == [("utils", 2), ("bot", 5)]


@pytest.mark.parametrize("module", ["cli", "daemon", "logs", "config_loader"])
def test_the_commands_the_daemon_and_config_loader_do_not_import_sqlalchemy(module: str) -> None:
    """They reach the database through models, instances and leader only."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "sqlalchemy" not in imported


def test_the_commands_load_the_daemon_and_the_http_stack_only_when_they_use_them() -> None:
    """`status`, `check`, `health`, `reload`, `retry` start without the daemon's scheduler, the
    booking code and requests: they were a third of those commands' start."""
    probe = (
        "import sys, cli; print(' '.join(sorted(m for m in ('daemon', 'bot', 'club_client', "
        "'scheduler', 'rehearsal', 'heartbeat', 'wire', 'apscheduler', 'requests', 'urllib3') "
        "if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""


def test_the_script_main_py_defines_nothing_and_only_calls_the_cli() -> None:
    """Python keeps the syntax tree of the script it runs until the script ends: everything in
    main.py would be held twice for the daemon's life (4.5 MB when the CLI lived there)."""
    tree = ast.parse((ROOT / "main.py").read_text())
    kinds = {type(node).__name__ for node in ast.walk(tree)}
    assert not kinds & {"FunctionDef", "AsyncFunctionDef", "ClassDef", "Lambda"}
    assert len(tree.body) <= 5


def test_no_production_function_is_longer_than_80_lines() -> None:
    long = []
    for module in MODULES:
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.py:{node.lineno} {node.name}: {length} lines")
    assert long == []


def test_ruff_holds_every_production_function_to_complexity_25_without_exemptions() -> None:
    """ruff's C901 (pyproject: max-complexity 25) holds the complexity; nothing may exempt a
    production module from it, by a per-file ignore or a ``noqa``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    assert config["mccabe"]["max-complexity"] == MAX_COMPLEXITY
    assert "C90" in config["select"]
    exempt = [
        f"{pattern} exempts {module}.py"
        for pattern, codes in config.get("per-file-ignores", {}).items()
        for module in MODULES
        if fnmatch.fnmatch(f"{module}.py", pattern) and {"C90", "C901"} & set(codes)
    ]
    exempt += [
        f"{module}.py:{number}: noqa for C901"
        for module in MODULES
        for number, line in enumerate((ROOT / f"{module}.py").read_text().splitlines(), 1)
        if "noqa" in line and "C901" in line
    ]
    assert "C901" not in config.get("ignore", [])
    assert exempt == []


def class_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(class, first line, length in lines) of every class in ``path``, nested ones too."""
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.lineno, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]


def test_no_production_class_is_longer_than_400_lines() -> None:
    long = [
        f"{module}.py:{line} {name}: {length} lines"
        for module in MODULES
        for name, line, length in class_lengths(ROOT / f"{module}.py")
        if length > MAX_CLASS_LINES
    ]
    assert long == []


def test_cli_py_is_the_commands_only_short_with_small_classes() -> None:
    lines = len((ROOT / "cli.py").read_text().splitlines())
    assert lines <= MAX_CLI_LINES, f"cli.py: {lines} lines"
    long = [
        f"cli.py:{line} {name}: {length} lines"
        for name, line, length in class_lengths(ROOT / "cli.py")
        if length > MAX_CLI_CLASS_LINES
    ]
    assert long == []


def test_the_class_sizes_count_every_line_of_nested_classes_too(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("class Big:\n    class Small:\n        x = 1\n" + "    y = 2\n" * 399)
    assert class_lengths(source) == [("Big", 1, 402), ("Small", 2, 2)]


def _ignored(paths: list[str]) -> set[str]:
    """Which of ``paths`` (relative to the repository) .gitignore ignores, tracked or not."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT,
        input="\n".join(paths),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return set(done.stdout.split())


def test_a_users_files_in_data_never_show_as_untracked_and_the_repositorys_stay_tracked() -> None:
    """DATA_DIR defaults to data/, which also holds the examples and the ready flows: what the
    user and the daemon write there is ignored, what the repository ships is not."""
    yours = [
        "data/schedules.json",
        "data/tokens.json",
        "data/db.sqlite",
        "data/db.sqlite-wal",
        "data/bot.log",
        "data/bot.log.1",
        "data/bot.pid",
        "data/bot.lock",
        "data/heartbeat",
        "data/clubs/my-perfectgym.json",
        "data/clubs/riverside.json",
    ]
    shipped = [
        "data/schedules.example.json",
        "data/tokens.example.json",
        *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "data" / "templates").glob("*"))),
        *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "data" / "clubs").glob("*.json"))),
    ]
    ignored = _ignored(yours + shipped)
    assert sorted(set(yours) - ignored) == []
    # A ready flow added to data/clubs/ needs its own "!/data/clubs/<name>.json" line.
    assert sorted(set(shipped) & ignored) == []


@pytest.mark.parametrize("target", ["postgres-server", "faketime"])
def test_make_says_before_it_installs_a_system_package(target: str) -> None:
    """`make test` may install Debian packages as root: each target says so first."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, check=True
    )
    recipe = done.stdout
    installs = [i for i in range(len(recipe)) if recipe.startswith("apt-get install", i)]
    assert installs, recipe
    said = recipe.find('echo "installing ')
    assert 0 <= said < installs[0], recipe
