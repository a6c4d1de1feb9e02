"""The documentation: README.md is a short front door into docs/, the MkDocs site builds strictly.

``make test`` builds the site with ``mkdocs build --strict`` before pytest; the tests here hold
what that build cannot see (README is not part of the site) and that the strict build does fail
on what it should (a broken link, a page left out of nav), so the guard in CI is a real one.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 400
#: The mkdocs script of this interpreter's environment. Not ``python -m mkdocs``: with the
#: repository as the working directory, that would import our watchdog.py in place of the
#: watchdog package mkdocs needs.
MKDOCS = Path(sys.executable).parent / "mkdocs"
#: Words of documents that are not in the repository: the pages speak to the user in plain facts.
INTERNAL = re.compile(
    r"\bCONTRACT\b|\b(issue|round|section) \d+\b|\bround (one|two|three|four|five)\b", re.IGNORECASE
)


def markdown_links(text: str) -> list[str]:
    """Every inline link target in ``text``, code blocks and code spans left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def anchors(page: Path) -> set[str]:
    """The anchors MkDocs gives the headings of ``page`` (the toc extension's slugify)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slugify(title.strip(), "-") for title in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_readme_is_short() -> None:
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move text into docs/"


def test_every_relative_link_in_the_readme_points_into_docs() -> None:
    links = [link for link in markdown_links(README.read_text()) if "://" not in link]
    assert links, "README.md links into docs/"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve()
        assert target.is_relative_to(DOCS), f"README.md: {link} is not a page under docs/"
        assert target.is_file(), f"README.md: {link}: no such file"
        if anchor:
            assert anchor in anchors(target), f"README.md: {link}: no heading with that anchor"


def test_the_readme_links_every_page_of_the_reference() -> None:
    linked = {
        (ROOT / link.partition("#")[0]).resolve() for link in markdown_links(README.read_text())
    }
    reference = set((DOCS / "reference").glob("*.md"))
    assert reference <= linked, sorted(str(p) for p in reference - linked)


@pytest.mark.parametrize(
    "page", [README, *sorted(DOCS.rglob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_word_of_documents_outside_the_repository(page: Path) -> None:
    found = [m.group(0) for m in INTERNAL.finditer(page.read_text())]
    assert found == [], f"{page.relative_to(ROOT)}: {found}"


def build(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(root / "site")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )


def test_the_site_builds_strictly_and_fails_on_a_broken_link_anchor_or_page(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", root)
    shutil.copytree(DOCS, root / "docs")
    clean = build(root)
    assert clean.returncode == 0, clean.stderr
    assert (root / "site" / "clubs" / "playtomic" / "index.html").is_file()

    page = root / "docs" / "schedules.md"
    page.write_text(page.read_text() + "\nSee [the missing page](missing.md).\n")
    page = root / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[the watchdog](operating.md#no-such-heading)\n")
    (root / "docs" / "stray.md").write_text("# A page left out of nav\n")
    broken = build(root)
    assert broken.returncode != 0
    for warned in ("missing.md", "no-such-heading", "stray.md"):
        assert warned in broken.stderr, warned


# -- the reference pages say what the code does ------------------------------------------------

ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$|^[A-Z]{3,}$")


def _env_reader(node: ast.Call) -> bool:
    """``env.get(...)``, ``os.environ.get(...)``, a local ``get(...)`` over the environment, or a
    helper handed ``env`` (``_number(env, "NAME", ...)``)."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "get" or any(
            isinstance(arg, ast.Name) and arg.id in {"env", "environ"} for arg in node.args
        )
    if isinstance(func, ast.Attribute) and func.attr in {"get", "getenv"}:
        receiver = func.value
        return (isinstance(receiver, ast.Name) and receiver.id in {"env", "environ", "os"}) or (
            isinstance(receiver, ast.Attribute) and receiver.attr == "environ"
        )
    return False


def variables_read_by_the_code() -> set[str]:
    found = set()
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and _env_reader(node):
                found |= {
                    arg.value
                    for arg in node.args
                    if isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)
                    and ENV_NAME.match(arg.value)
                }
    entrypoint = (ROOT / "docker-entrypoint.sh").read_text()
    return found | set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", entrypoint))


def documented_variables() -> set[str]:
    rows = re.findall(
        r"^\| (`[A-Z].*?) \|", (DOCS / "reference" / "environment.md").read_text(), re.M
    )
    return {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}


def test_the_environment_page_names_every_variable_the_code_reads() -> None:
    read = variables_read_by_the_code()
    assert {"FERNET_KEY", "SMTP_HOST", "RETRY_BASE_SECONDS", "READY_CLUBS_DIR"} <= read
    commands = (DOCS / "reference" / "commands.md").read_text()
    conventions = {name for name in ("NO_COLOR", "TERM") if f"`{name}" in commands}
    assert read - documented_variables() - conventions == set()


def test_every_variable_on_the_environment_page_is_read_by_the_code() -> None:
    assert documented_variables() - variables_read_by_the_code() == set()


def parser_commands() -> set[str]:
    """The subcommands of courtbot's command line, as its parser knows them."""
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_the_commands_pages_name_every_command_of_the_parser() -> None:
    commands = parser_commands()
    reference = (DOCS / "reference" / "commands.md").read_text()
    rows = re.findall(r"^\| `python main\.py(?: ([a-z][\w-]*))?[^`]*`", reference, re.M)
    assert {row or "run" for row in rows} == commands
    glance = re.findall(r"^\| `([a-z][\w-]*)", README.read_text(), re.M)
    assert set(glance) == commands
