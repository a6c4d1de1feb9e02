"""`make demo` runs as a user runs it: the real daemon books at the sandbox club in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_demo_books_a_court_and_ends_cleanly() -> None:
    done = subprocess.run(
        [sys.executable, "tools/demo.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "demo OK" in out
    assert "-> 201" in out and "ms late" in out
    assert "the daemon exited with code 0" in out
    assert "sandbox-token" not in (REPO / "demo-data" / "tokens.json").read_text()
