"""DATA_DIR's own files, for the daemon and for the commands that look at it: the start-up
checks (can the daemon write there), the lock files a daemon holds for its life, the pid file's
daemon, and private writes.

Its own room so that ``status``, ``health``, ``reload`` and ``check`` can find the running
daemon without importing the daemon (its scheduler and HTTP stack were a third of their start).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

import models
from config_loader import Settings


class StartError(Exception):
    """The daemon cannot start; the message names the cause and the fix (exit 2)."""


# --------------------------------------------------------------------------- start-up checks


def cannot_write(setting: str, path: Path, exc: OSError, *, instead: str) -> StartError:
    """The one line for a place the daemon must write and cannot: which, why, and the fix."""
    reason = exc.strerror or exc.__class__.__name__
    if exc.errno == errno.EROFS:
        fix = "mount it read-write"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on its disk"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = f"let user {os.getuid()} write to it (chown or chmod)"
    else:
        fix = "check it"
    return StartError(
        f"{setting} {path} cannot be written ({reason}): {fix}, or set {setting} to {instead}"
    )


def check_data_dir(settings: Settings) -> None:
    """DATA_DIR must take a write: a read-only, full or foreign directory is found here, first,
    and named in one line (a block is written and synced, so a full disk says so now)."""
    directory = settings.data_dir
    probe = directory / f".courtbot-write-test.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"courtbot start-up check\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise cannot_write("DATA_DIR", directory, exc, instead="a writable directory") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def database_problem(settings: Settings, exc: BaseException, *, doing: str) -> str:
    """The one line for a database that cannot be opened or written at start: the driver's
    words, the database (password masked) and the fix."""
    if isinstance(exc, OSError):
        text = exc.strerror or exc.__class__.__name__
    else:
        text = models.error_text(exc)
    db = models.sqlite_path(settings.database_url)
    low = text.lower()
    if db is None:
        fix = "check DATABASE_URL and that the database server accepts connections"
    elif "full" in low or "no space" in low:
        fix = f"free space on the disk that holds {db.parent}"
    elif "not a database" in low:
        fix = f"{db} is not a SQLite database: check DATABASE_URL"
    elif "read-only" in low or "readonly" in low or "permission" in low:
        fix = f"make {db.parent} writable (or set DATABASE_URL elsewhere)"
    else:
        fix = f"check DATABASE_URL and that {db.parent} exists and is writable"
    return f"cannot {doing} the database {models.mask_url(settings.database_url)}: {text}; {fix}"


def start_failure(settings: Settings, exc: Exception) -> str:
    """Why the daemon could not start, in one line: a StartError says it already; a file or the
    database that could not be written at start (a disk that filled up, went read-only) too."""
    if isinstance(exc, StartError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return str(
            cannot_write("DATA_DIR", Path(exc.filename), exc, instead="a writable directory")
        )
    return database_problem(settings, exc, doing="write")


# --------------------------------------------------------------------------- locks and pid


class DirLock:
    """An exclusive, non-blocking ``flock`` held for the daemon's life: taken atomically, so
    two daemons can never both believe they own DATA_DIR or the database; the kernel releases
    it when the process dies, so a crash leaves no stale lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_paths(settings: Settings) -> list[Path]:
    """The lock files of a daemon: DATA_DIR's, and the SQLite database's when it lies elsewhere."""
    paths = [settings.lock_path]
    db = models.sqlite_path(settings.database_url)
    if db is not None:
        db_lock = db.with_name(db.name + ".lock")
        if db_lock.resolve() != settings.lock_path.resolve():
            paths.append(db_lock)
    return paths


def daemon_running(settings: Settings) -> int | None:
    """The pid of the daemon that holds DATA_DIR, or None when none does."""
    probe = DirLock(settings.lock_path)
    if not settings.lock_path.exists():
        return None
    if probe.acquire():
        probe.release()
        return None
    try:
        return int(settings.pid_path.read_text().strip())
    except (OSError, ValueError):
        return None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (no temporary file is left behind
    when that fails, e.g. on a full disk)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def overwrite_in_place(path: Path, text: str) -> None:
    """Overwrite an existing file from its start, in place: needs no new block on a full disk
    while ``text`` is no longer than the file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


class DaemonLocks:
    """The lock files a daemon holds for its life (``lock_paths``): all of them, or none."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._locks: list[DirLock] = []

    def acquire(self) -> None:
        for path in lock_paths(self.settings):
            lock = DirLock(path)
            try:
                acquired = lock.acquire()
            except OSError as exc:
                self.release()
                setting = "DATA_DIR" if path == self.settings.lock_path else "DATABASE_URL"
                raise cannot_write(
                    setting, path, exc, instead="a writable place (the lock file goes beside it)"
                ) from None
            if not acquired:
                self.release()
                raise StartError(
                    f"another courtbot daemon already holds {path.parent} ({path.name}); stop it "
                    "first (or give this one its own DATA_DIR and DATABASE_URL)"
                )
            self._locks.append(lock)

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()
