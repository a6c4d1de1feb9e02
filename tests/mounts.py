"""Disks that misbehave, for the tests of CONTRACT section 9: a small tmpfs that fills up, and a
read-only bind mount. Mounting needs root (the suite runs as root on Debian, where ``chmod``
does not stop root's writes); elsewhere the test is skipped and says why. Every mount is undone
when its block ends, whatever happened in it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small or read-only file system (the suite runs as root)")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {done.stderr.strip()})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (created): a disk that ``fill`` fills up."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(source: Path, target: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``target`` (a bind mount, as a read-only volume is)."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(target))
    try:
        done = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(target)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot make a bind mount read-only here: {done.stderr.strip()}")
        yield target
    finally:
        _umount(target)


def fill(disk: Path) -> Path:
    """Fill the file system holding ``disk`` to the last page with one file; returns it
    (removing it frees the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * chunk)
    return filler


def writes_fail(path: Path) -> bool:
    """True when a new file of one page cannot be written next to ``path``."""
    probe = path / ".probe"
    try:
        with probe.open("wb", buffering=0) as handle:
            handle.write(b"x" * 4096)
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return False
