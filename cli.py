"""courtbot: book tennis courts the instant the club's booking window opens.

The CLI (CONTRACT section 1) and the daemon's main loop: load, schedule, reload on SIGHUP or on a
changed file, stop cleanly on SIGTERM/SIGINT. ``python main.py`` runs it; main.py is only the
entry point, kept small (see there why).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import getpass
import json
import logging
import logging.handlers
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, MultiFernet

import bot
import config_loader
import heartbeat
import instances
import leader
import models
import report
import scheduler
import utils
import watchdog
from config_loader import Config, Entry, Settings, SettingsError
from notify import (
    Notifier,
    NotifyConfigError,
    NotifySettings,
    escape_controls,
    mask_url,
    validate_notify_urls,
)
from template import Flow, TemplateError, default_flow, describe_booking, describe_flow

logger = logging.getLogger("courtbot")

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_CANNOT_START = 2
#: The daemon stopped itself because its SQLite file was deleted or replaced under it: non-zero,
#: so that a supervisor restarts it (on the database written back at exit).
EXIT_DATABASE_LOST = 1
#: The daemon could not book for a minute and did not recover: its supervisor restarts it.
EXIT_NOT_WORKING = 3
HEARTBEAT_SECONDS = 15.0
HEARTBEAT_STALE_SECONDS = 4 * HEARTBEAT_SECONDS
LOG_FILE_BYTES = 5 * 1024 * 1024
LOG_FILE_BACKUPS = 3
CHECK_INSTANCES = 5
#: A load that adds or changes at least this many instances closes the idle database
#: connections afterwards (see Daemon._give_back_memory).
CLOSE_CONNECTIONS_AFTER = 1000
#: How often the daemon looks for instances a `retry` put back to pending (the CLI may run on
#: another host, with PostgreSQL, where no signal reaches this daemon).
RETRY_CHECK_SECONDS = 1.0
#: On SQLite the wakeups are read only when the file changed, and at least this often anyway.
RETRY_LOOK_AT_LEAST_SECONDS = 60.0
#: A token that expires before a pending booking's trigger is reported (once, by email and
#: channels) when that trigger is this close.
TOKEN_NOTICE_AHEAD = timedelta(days=3)
#: What the daemon's loop handles: reload, stop, stop.
DAEMON_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)


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
    return f"cannot {doing} the database {models.display_url(settings.database_url)}: {text}; {fix}"


# --------------------------------------------------------------------------- logging


class _UTCFormatter(logging.Formatter):
    """UTC ISO timestamps; one event, one line: control characters in the final text (values
    from files or the club, a traceback) are escaped, so no value can forge a line."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """The log file. A write that fails (a full or read-only disk) is said once, on the console,
    which keeps every line meanwhile; not a traceback on stderr for each line."""

    failing = False
    _failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if self.failing and not self._failed:
            self.failing = False
            logger.warning("the log file %s is written again", self.baseFilename)

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        if self.failing:
            return
        self.failing = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
        # Logged from inside the handler: the console takes it; this handler, failing, skips it.
        logger.error(
            "cannot write the log file %s (%s); the console still gets every line",
            self.baseFilename,
            reason,
        )


def setup_logging(settings: Settings | None, *, level: str = "INFO") -> None:
    """Console always; the file too when LOG_FILE is not ``-``; UTC ISO timestamps."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = _UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    root.addHandler(console)
    if settings is not None and settings.log_file is not None:
        path = settings.log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        file_handler = LogFileHandler(
            path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.setLevel(settings.log_level if settings is not None else level)
    for noisy in ("urllib3", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


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


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """The running worker: owns the database, the scheduler, the club client and the loop."""

    def __init__(
        self, settings: Settings, fernet: MultiFernet, template: config_loader.FlowFile | None
    ) -> None:
        self.settings = settings
        self.fernet = fernet
        #: BOOKING_REQUEST_TEMPLATE in use (the last good one); its flow is also in self.ctx.
        self.template = template
        self.engine: models.Engine | None = None
        self.factory: models.SessionFactory | None = None
        self.scheduler: scheduler.Scheduler | None = None
        self.notifier: Notifier | None = None
        self.ctx: bot.BookingContext | None = None
        self.client = bot.ClubClient(timeout=settings.http_timeout)
        self.roles = Roles(settings.database_url)
        self.config: Config | None = None
        self.stop = threading.Event()
        self._load_lock = threading.Lock()
        self._locks: list[DirLock] = []
        self._signals_r: socket.socket | None = None
        self._signals_w: socket.socket | None = None
        self._running = False
        self._pid_written = False
        #: Watches a SQLite file for its deletion under us; saves what it held at exit.
        self.guard: models.SqliteGuard | None = None
        self.database_lost: str | None = None
        self.exit_code = EXIT_OK
        self.pinger: heartbeat.Pinger | None = None
        self._last_beat: float | None = None  # time.monotonic() of the last heartbeat written
        # CONTRACT section 9, never silently: looked at every second by the loop (``watch``).
        self.clock = watchdog.ClockWatch()
        self.watchdog = watchdog.Watchdog()
        self.overdue = watchdog.Overdue()
        # The earliest pending trigger as last read (see _late), and when (monotonic; None: to
        # be read again, as after every change to the jobs): the instances are asked about only
        # when a trigger is near or passed, not every second of a quiet week.
        self._next_due: datetime | None = None
        self._next_due_read: float | None = None
        self._jobs_changed = 0
        #: What the last look did to recover, until the next look finds all working again.
        self._restarted: str | None = None
        self._entry_cache = config_loader.EntryCache()
        self._retries_failing = False
        self._frozen = False  # see _give_back_memory
        #: The database as pick_up_retries last read the wakeups (see _database_stamp).
        self._retry_stamp: tuple[tuple[int, int] | None, ...] | None = None
        self._retry_looked = -math.inf

    # -- start-up -----------------------------------------------------------------------

    def acquire_locks(self) -> None:
        for path in lock_paths(self.settings):
            lock = DirLock(path)
            try:
                acquired = lock.acquire()
            except OSError as exc:
                self.release_locks()
                setting = "DATA_DIR" if path == self.settings.lock_path else "DATABASE_URL"
                raise cannot_write(
                    setting, path, exc, instead="a writable place (the lock file goes beside it)"
                ) from None
            if not acquired:
                self.release_locks()
                raise StartError(
                    f"another courtbot daemon already holds {path.parent} ({path.name}); stop it "
                    "first (or give this one its own DATA_DIR and DATABASE_URL)"
                )
            self._locks.append(lock)

    def release_locks(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    def install_signals(self) -> None:
        """Handlers only record the signal: Python writes its number to a socket that the main
        loop waits on (no locks or logging inside a handler; works as PID 1 in a container)."""
        self._signals_r, self._signals_w = socket.socketpair()
        self._signals_r.setblocking(False)
        self._signals_w.setblocking(False)
        signal.set_wakeup_fd(self._signals_w.fileno(), warn_on_full_buffer=False)
        for signum in DAEMON_SIGNALS:
            signal.signal(signum, _record_signal)

    def wake(self) -> None:
        """Wake the loop from another thread (a byte that is no signal number)."""
        if self._signals_w is not None:
            with contextlib.suppress(OSError):
                self._signals_w.send(b"\0")

    def start(self) -> None:
        """Open everything, then take the active role, or wait as a standby (section 10)."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.acquire_locks()
        self.install_signals()
        self.open_database()
        db_path = models.sqlite_path(settings.database_url)
        if db_path is not None:
            self.guard = models.SqliteGuard(db_path)
        try:
            notify_settings = NotifySettings.from_env(settings.env)
        except NotifyConfigError as exc:
            logger.error("notifications: %s; email and channels are off until it is fixed", exc)
            notify_settings = NotifySettings.from_env({})
        # The notifier logs (masked) and skips each invalid NOTIFY_URLS channel itself.
        self.notifier = Notifier(
            notify_settings,
            location=club_location(settings, self.template.flow if self.template else None),
        )
        self.notifier.start()
        self.roles.join(self)

    def open_database(self) -> None:
        """The engine and sessions; a database that cannot be opened is a StartError whose
        one line names it with the password masked."""
        try:
            self.engine = models.make_engine(self.settings.database_url)
        except models.DatabaseConnectError as exc:  # a server's: host, port, database, the fix
            raise StartError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 (any driver error: one line, exit 2)
            raise StartError(database_problem(self.settings, exc, doing="open")) from None
        self.factory = models.session_factory(self.engine)

    def booking_context(self) -> bot.BookingContext:
        """A fresh context for one period as the active daemon (its own stop and may-send)."""
        assert self.factory is not None and self.notifier is not None
        return bot.BookingContext(
            factory=self.factory,
            fernet=self.fernet,
            client=self.client,
            api_url=self.settings.api_url,
            retry_base=self.settings.retry_base,
            stop=threading.Event(),
            early_retry_ms=self.settings.early_retry_ms,
            early_retry_seconds=self.settings.early_retry_seconds,
            notify=self.notifier.notify,
            template=self.template.flow if self.template is not None else None,
            # The last good club files, kept from one period as the active daemon to the next.
            clubs=dict(self.ctx.clubs) if self.ctx is not None else {},
            on_booked=self._booked,
            owner=self.roles.ident,
            watch_interval=self.settings.watch_interval,
        )

    def become_active(self, reason: str) -> None:
        """Today's start-up, as the active daemon: recover what a stopped daemon left in
        ``booking`` (not a live daemon's claims), expire what was missed, load the files,
        start the scheduler."""
        assert self.engine is not None and self.factory is not None
        assert self.notifier is not None
        settings = self.settings
        self.ctx = self.booking_context()
        self.scheduler = scheduler.Scheduler(self.engine, allowed=self.ctx.may_send.is_set)
        scheduler.set_runtime(self)
        self.reset_watch()

        now = datetime.now(UTC)
        retried, unknown = instances.recover_in_flight(
            self.factory, now, live_owners=self.roles.live_owners(self.factory)
        )
        for row in unknown:
            self.notifier.notify(instances.outcome_of(row))
        if retried:
            logger.warning(
                "%d booking(s) were interrupted by a stop; retried now with the same "
                "Idempotency-Key: %s",
                len(retried),
                ", ".join(retried),
            )
        missed = instances.expire_missed(self.factory, now)
        if missed:
            self.notifier.notify_missed([instances.outcome_of(row) for row in missed])
        # What is still pending with its trigger passed is booked at once, late: say why.
        instances.note_late_triggers(self.factory, now)
        self.config = None  # a full load: the files may have changed while it waited
        self.load(reason=reason)
        if not self.ctx.may_send.is_set():
            return  # lost the role meanwhile: the loop steps down
        self.scheduler.start()
        self.roles.beat(self)
        self.write_pid()
        self.heartbeat()
        self.log_summary()
        self.safe_warn_expiring_tokens()
        if settings.heartbeat_url is not None and self.pinger is None:
            self.pinger = heartbeat.Pinger(settings.heartbeat_url, healthy=self.is_healthy)
            self.pinger.start()

    def write_pid(self) -> None:
        """``bot.pid``: this daemon is loaded (active) or waits (standby); it removes it."""
        write_private(self.settings.pid_path, f"{os.getpid()}\n")
        self._pid_written = True
        self._running = True

    def log_summary(self) -> None:
        assert self.factory is not None and self.scheduler is not None
        entries = self.config.schedules.entries if self.config else []
        count, row = instances.pending_summary(self.factory)
        if row is not None:
            zone = utils.get_zone(row.timezone)
            logger.info(
                "courtbot running (pid %d): %d schedule(s), %d pending instance(s); next "
                "trigger %s (%s) for %s at %s",
                os.getpid(),
                len(entries),
                count,
                utils.format_utc(row.trigger_time),
                utils.format_local(row.trigger_time, zone),
                row.key,
                utils.format_local(row.desired_time, zone),
            )
        else:
            logger.info(
                "courtbot running (pid %d): %d schedule(s), no pending instance",
                os.getpid(),
                len(entries),
            )

    # -- loading ------------------------------------------------------------------------

    def load(self, *, reason: str) -> bool:
        """Read, validate and reconcile the config files; jobs follow. Returns False when a
        file was rejected whole (the last good state stays)."""
        assert self.factory is not None and self.scheduler is not None and self.ctx is not None
        with self._load_lock:
            started = time.perf_counter()
            now = datetime.now(UTC)
            if reason != "start" and not self.config_changed():
                # Same files: nothing to validate, reconcile or schedule, and no table is read
                # (what a `retry` changes reaches the jobs through pick_up_retries).
                logger.info(
                    "config unchanged (%s), checked in %.1f ms",
                    reason,
                    (time.perf_counter() - started) * 1000,
                )
                return True
            first = reason == "start" or self.config is None
            known = instances.token_names(self.factory)
            config = config_loader.read_config(
                self.settings,
                self.fernet,
                now,
                known_tokens=known,
                last_template=self.template,
                cache=self._entry_cache,
            )
            # At start every job gets a look, and when a flow's preparation time changed (its
            # club's jobs move); otherwise only those of the instances the load changed.
            full_sync = self._use_flows_and_leads(config) or first
            for error in config.errors:
                logger.error("%s", error)
            for warning in config.warnings:
                logger.warning("%s", warning)
            if config.tokens.file_error is None and config.tokens.raw is not None:
                config_loader.rewrite_tokens_file(self.settings.tokens_path, config.tokens)
                config_loader.secure_file_mode(self.settings.tokens_path)
                if config.tokens.written is not None:
                    # Our own rewrite is no change for the file check to reload on.
                    written = config_loader.content_digest(config.tokens.written)
                    config.digest[str(self.settings.tokens_path)] = written
            unchanged = self._unchanged_entries(config) if not first else frozenset()
            changes = instances.reconcile(self.factory, config, now=now, unchanged=unchanged)
            self.ctx.withdraw(changes.keys)  # a booking preparing for one it cancelled stops
            whole_ok = config.schedules.file_error is None
            if whole_ok or self.config is None:
                self.config = config
            elif config.tokens.file_error is None:
                self.config = Config(self.config.schedules, config.tokens, config.digest)
            else:
                self.config = Config(self.config.schedules, self.config.tokens, config.digest)
            report = self._sync(None if full_sync else changes.keys)
            elapsed = (time.perf_counter() - started) * 1000
            summary = self._load_summary(config, changes, report)
            ok = whole_ok and config.tokens.file_error is None
            touched = len(changes.keys)
            del config, changes  # what the load made is garbage now: give it back
            given_back = self._give_back_memory(start=first, touched=touched, full=full_sync)
            logger.info(
                "config loaded (%s) in %.1f ms (then %.1f ms giving memory back): %s",
                reason,
                elapsed,
                given_back,
                summary,
            )
            return ok

    def _unchanged_entries(self, config: Config) -> frozenset[str]:
        """Entries exactly as last time: they need no reconciling (their horizon is the
        top-up's job). At start there are none, as the window setting may have changed."""
        assert self.config is not None
        before = {e.id: e.fingerprint for e in self.config.schedules.entries}
        return frozenset(
            e.id for e in config.schedules.entries if before.get(e.id) == e.fingerprint
        )

    def _load_summary(
        self, config: Config, changes: instances.Changes, report: scheduler.SyncReport
    ) -> str:
        """What a load did, for its log line."""
        assert self.config is not None
        kept = ""
        if config.schedules.file_error is not None or config.tokens.file_error:
            kept = "; kept last good config"
        if changes.entries_changed:
            kept = f"; entries changed: {', '.join(sorted(changes.entries_changed))}" + kept
        return (
            f"{len(self.config.schedules.entries)} schedule(s) "
            f"({self._entry_cache.validated} validated), {len(config.errors)} error(s); "
            f"instances: {changes.summary()}; jobs: {report.added} added, {report.moved} "
            f"moved, {report.removed} removed{kept}"
        )

    def _use_flows_and_leads(self, config: Config) -> bool:
        """``_use_flows``; True when a flow's preparation time changed with it (the jobs of
        its club start that much earlier or later now)."""
        assert self.ctx is not None
        clubs: set[str | None] = {None, *self.ctx.clubs}
        leads = self._club_prepare_seconds(clubs)
        self._use_flows(config)
        clubs |= set(self.ctx.clubs)
        return self._club_prepare_seconds(clubs) != {c: leads.get(c, 0.0) for c in clubs}

    def _use_flows(self, config: Config) -> None:
        """Put the loaded template and club files in the booking context. An invalid template
        or club file keeps its last good version (its errors are logged with the rest)."""
        assert self.ctx is not None
        if config.template_error is not None:
            config.template_error += "; the last good template stays"
        elif self.template is not None and config.template != self.template:
            logger.info("request template reloaded")
        self.template = config.template
        self.ctx.template = config.template.flow if config.template is not None else None
        loaded = {name: club.flow for name, club in config.clubs.items()}
        for name in sorted(config.schedules.club_errors):
            if name in self.ctx.clubs:
                logger.warning("club %r: its last good file stays in use", name)
        changed = sorted(n for n, flow in loaded.items() if self.ctx.clubs.get(n) != flow)
        if changed:
            logger.info("club file(s) loaded: %s", ", ".join(changed))
        # Never dropped: instances kept as they were (a rejected entry's) still book with them.
        self.ctx.clubs = {**self.ctx.clubs, **loaded}

    def _sync(self, keys: Collection[str] | None = None) -> scheduler.SyncReport:
        """Make the jobs follow the pending instances: those of ``keys`` (what a load or a
        `retry` changed), or with None every one, a page at a time (at start)."""
        assert self.factory is not None and self.scheduler is not None and self.ctx is not None
        self.roles.before_sync(self.factory)
        # The watchdog reads the earliest trigger again.
        self._jobs_changed += 1
        self._next_due_read = None
        with self.ctx.in_flight_lock:
            busy = frozenset(self.ctx.in_flight)
        if keys is not None:
            pending = instances.pending_triggers(self.factory, keys)
            prepare = self._prepare_seconds(pending)
            return self.scheduler.sync_keys(pending, keys, busy=busy, prepare=prepare)
        # Everything: every wakeup recorded so far is covered (read before, cleared after).
        handled = instances.wakeups(self.factory)
        report = scheduler.SyncReport(0, 0, 0)
        for page in instances.pending_trigger_pages(self.factory):
            prepare = self._prepare_seconds(page)
            report += self.scheduler.sync_keys(page, page.keys(), busy=busy, prepare=prepare)
        after = ""
        while ids := self.scheduler.job_ids(after=after):
            still = instances.pending_triggers(self.factory, ids)
            report += self.scheduler.sync_keys({}, [i for i in ids if i not in still], busy=busy)
            after = ids[-1]
        if handled:
            instances.clear_wakeups(self.factory, handled[-1][0])
        return report

    def pick_up_retries(self) -> int:
        """Schedule the instances that a `retry` (from this host or another) put back to
        pending, and only those. Called about every second: when there are none it is one read
        of an empty table. Returns how many were picked up."""
        assert self.factory is not None
        with self._load_lock:
            stamp, now = self._database_stamp(), time.monotonic()
            if (
                stamp is not None
                and stamp == self._retry_stamp
                and now - self._retry_looked < RETRY_LOOK_AT_LEAST_SECONDS
            ):
                return 0  # the SQLite file is as it was at the last look: no new wakeup
            found = instances.wakeups(self.factory)
            self._retry_stamp, self._retry_looked = stamp, now
            if not found:
                return 0
            keys = {key for _, key in found}
            report = self._sync(keys)
            instances.clear_wakeups(self.factory, found[-1][0])
        logger.info(
            "retry: %d instance(s) back to pending picked up (%s); jobs: %d added, %d moved",
            len(keys),
            ", ".join(sorted(keys)),
            report.added,
            report.moved,
        )
        return len(keys)

    def _database_stamp(self) -> tuple[tuple[int, int] | None, ...] | None:
        """The SQLite file's and its WAL's modification time and size (None for a database
        server): every commit, another process's too, changes one of them."""
        path = models.sqlite_path(self.settings.database_url)
        if path is None:
            return None
        stamps: list[tuple[int, int] | None] = []
        for name in (str(path), f"{path}-wal"):
            try:
                info = os.stat(name)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((info.st_mtime_ns, info.st_size))
        return tuple(stamps)

    def safe_pick_up_retries(self) -> None:
        try:
            self.pick_up_retries()
        except Exception:
            if not self._retries_failing:
                logger.exception("looking for retried instances failed; trying again each second")
            self._retries_failing = True
        else:
            if self._retries_failing:
                logger.info("looking for retried instances works again")
            self._retries_failing = False

    def _give_back_memory(
        self, *, start: bool = False, touched: int = 0, full: bool = False
    ) -> float:
        """After a load: collect its garbage and hand the heap's free memory back to the
        system, so that the daemon rests small whatever its loads have been; after the start, a
        full job sync or a load that touched many instances, close the idle database
        connections too (with what they cached). Returns the milliseconds it took.

        After the process's first load (before any booking) everything then alive is moved out
        of the collector's sight (``gc.freeze``): the libraries' tens of thousands of objects
        live as long as the process, and the full collection after a reload then looks only at
        what came after (well under a millisecond instead of about 15). Not again later: what a
        booking under way holds would be frozen with it. A small reload keeps the connections:
        closing SQLite's last one checkpoints its WAL (an fsync, about 10 ms) for a few KB."""
        assert self.engine is not None
        started = time.perf_counter()
        collected = gc.collect()
        if start and not self._frozen:
            gc.freeze()
            self._frozen = True
        closed = start or full or touched >= CLOSE_CONNECTIONS_AFTER
        if closed:
            models.close_idle_connections(self.engine)
        trimmed = trim_heap()
        took = (time.perf_counter() - started) * 1000
        logger.debug(
            "memory given back in %.1f ms: %d object(s) collected, idle database connections %s, "
            "heap %s",
            took,
            collected,
            "closed" if closed else "kept (a small change)",
            "trimmed" if trimmed else "not trimmable here (no glibc)",
        )
        return took

    def _prepare_seconds(self, pending: dict[str, datetime]) -> dict[str, float]:
        """How long before its trigger each of these pending instances' flow prepares (a
        login): its job starts that much earlier. Instances without preparation are left out."""
        assert self.factory is not None
        clubs = instances.pending_clubs(self.factory, pending.keys())
        by_club = self._club_prepare_seconds({None, *clubs.values()})
        prepare = {key: by_club[clubs.get(key)] for key in pending}
        return {key: value for key, value in prepare.items() if value}

    def _club_prepare_seconds(self, clubs: Collection[str | None]) -> dict[str | None, float]:
        """Each club's preparation time (None: the template's or section 6's request)."""
        assert self.ctx is not None
        ctx = self.ctx

        def seconds(club: str | None) -> float:
            try:
                return ctx.flow_for(club).prepare_seconds
            except KeyError:
                return 0.0  # nothing to book with: the booking says so at its trigger

        return {club: seconds(club) for club in clubs}

    def config_changed(self) -> bool:
        return self.config is None or config_loader.config_digest(self.settings) != (
            self.config.digest
        )

    # -- jobs (scheduler.Runtime) -------------------------------------------------------

    def book(self, key: str) -> None:
        ctx = self.ctx
        assert ctx is not None
        if self.stop.is_set() or not ctx.may_send.is_set():
            return
        status = bot.book_slot(key, ctx)
        if status in (models.PENDING, models.WATCHING) and not self.stop.is_set():
            # At a fallback time's trigger, or a watch's next try (CONTRACT 13): its new job.
            with self._load_lock:
                self._sync({key})

    def topup(self, schedule_ids: Sequence[str] | None = None) -> None:
        """Keep recurring entries at their full count of future instances."""
        assert self.factory is not None
        with self._load_lock:
            if self.config is None or self.stop.is_set() or not self.roles.is_active:
                return
            recurring = [e.id for e in self.config.schedules.entries if e.rule is not None]
            ids = [i for i in (schedule_ids or recurring) if i in recurring]
            if not ids:
                return
            changes = instances.reconcile(
                self.factory, self.config, now=datetime.now(UTC), only=ids
            )
            if self.ctx is not None:
                self.ctx.withdraw(changes.keys)
            if not changes.empty:
                self._sync(changes.keys)
                logger.info("top-up of %s: %s", ", ".join(ids), changes.summary())

    def _booked(self, schedule_id: str) -> None:
        self.topup([schedule_id])

    # -- the loop -----------------------------------------------------------------------

    def reset_watch(self) -> None:
        """Forget what the watchdog saw of a scheduler that is gone (a period as the active
        daemon ended or begins): a standby has none, a new one gets its own looks."""
        self.watchdog = watchdog.Watchdog(give_up_after=self.watchdog.give_up_after)
        self.overdue = watchdog.Overdue()
        self._restarted = None
        self._next_due_read = None

    def heartbeat(self) -> None:
        """The beat `health` reads, with the watchdog's state. On a full disk the file is
        rewritten in place (always the same length: no new block needed)."""
        text = watchdog.heartbeat_text(time.time(), self.watchdog.health())
        try:
            write_private(self.settings.heartbeat_path, text)
        except OSError:
            with contextlib.suppress(OSError):
                overwrite_in_place(self.settings.heartbeat_path, text)
        self._last_beat = time.monotonic()

    def is_healthy(self) -> bool:
        """True while this daemon runs, is not stopping, and its loop wrote a heartbeat lately:
        what the dead-man's switch (HEARTBEAT_URL) vouches for with each ping."""
        beat = self._last_beat
        return (
            self._running
            and not self.stop.is_set()
            and self.roles.is_active  # a standby vouches for nothing
            and beat is not None
            and time.monotonic() - beat < HEARTBEAT_STALE_SECONDS
            and self.watchdog.health() is None
        )

    # -- tokens that expire before a booking ----------------------------------------------

    def warn_expiring_tokens(self, now: datetime) -> list[str]:
        """Report, once per token and expiry, a JWT that expires before the trigger of a pending
        booking, when that trigger is within TOKEN_NOTICE_AHEAD (an email and a channel
        message, days before it would fail with a 401). Returns the tokens reported now."""
        assert self.factory is not None and self.notifier is not None
        reported = []
        for name, expires in sorted(instances.token_expiries(self.factory, self.fernet).items()):
            count, first = instances.pending_from(self.factory, name, expires)
            if first is None or first.trigger_time - now > TOKEN_NOTICE_AHEAD:
                continue
            if not instances.remember_notice(
                self.factory, f"token-expiry:{name}:{expires.timestamp():.0f}", now
            ):
                continue
            self.notifier.notify_warning(
                f"token {name!r}", *_token_expiry_message(name, expires, count, first, now)
            )
            reported.append(name)
        return reported

    def safe_warn_expiring_tokens(self) -> None:
        try:
            self.warn_expiring_tokens(datetime.now(UTC))
        except Exception:
            logger.exception("could not check the tokens' expiry")

    def database_present(self) -> bool:
        """False (after one error line) once the SQLite file was deleted or replaced under the
        daemon: it then stops rather than book into a database nobody will read again."""
        if self.guard is None or self.database_lost is not None:
            return self.database_lost is None
        self.database_lost = self.guard.check()
        if self.database_lost is None:
            return True
        self.exit_code = EXIT_DATABASE_LOST
        logger.error(
            "the database file %s was %s while courtbot ran: stopping (exit %d) so that nothing "
            "is booked into a database that is gone; what it held is saved at exit",
            self.guard.path,
            self.database_lost,
            EXIT_DATABASE_LOST,
        )
        return False

    def run_forever(self) -> None:
        """Wait for signals and timers; reload or stop here, never in a handler."""
        assert self._signals_r is not None
        next_check = time.monotonic() + self.settings.reload_interval
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        next_watch = time.monotonic() + watchdog.INTERVAL
        next_retries = time.monotonic() + RETRY_CHECK_SECONDS
        while not self.stop.is_set():
            due = min(next_check, next_beat, next_watch, next_retries, self.roles.next_due())
            timeout = max(0.0, due - time.monotonic())
            ready, _, _ = select.select([self._signals_r], [], [], timeout)
            if not self.database_present():
                break
            signals: set[int] = set()
            if ready:
                with contextlib.suppress(BlockingIOError):
                    signals.update(self._signals_r.recv(512))
            if signal.SIGTERM in signals or signal.SIGINT in signals:
                name = "SIGTERM" if signal.SIGTERM in signals else "SIGINT"
                logger.info("%s received: stopping (a booking under way may finish)", name)
                break
            if self.roles.tick(self, signals):
                continue  # a standby: no reload, no heartbeat of an active daemon
            if signal.SIGHUP in signals:
                logger.info("SIGHUP received: reloading")
                self.safe_load("SIGHUP")
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + watchdog.INTERVAL
                self.watch()
            if now >= next_check:
                next_check = now + self.settings.reload_interval
                if self.config_changed():
                    logger.info("config files changed: reloading")
                    self.safe_load("file change")
                self.safe_warn_expiring_tokens()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_SECONDS
                self.heartbeat()
            if now >= next_retries:
                next_retries = now + RETRY_CHECK_SECONDS
                self.safe_pick_up_retries()

    # -- the watchdog (CONTRACT section 9: never silently) -------------------------------

    def watch(self) -> None:
        """Once a second: notice a wall-clock jump (the scheduler is woken), and whether the
        scheduler can fire and its triggers are not overdue. When not, it is logged at once,
        `health` says so, and it is recovered (restarted and re-synced from the instances, so
        overdue bookings go at once) as soon as the database takes writes again, which the next
        look confirms; after a minute of failing, the daemon stops with EXIT_NOT_WORKING for its
        supervisor to restart it."""
        jump = self.clock.check()
        if jump is not None:
            self._clock_jumped(jump)
        if self.watchdog.problem is None or self._restarted is not None:
            problem = self._find_problem()
            if problem is None:
                if self._restarted is not None:
                    # Restarted at the last look, and working since: recovered.
                    self.watchdog.recovered(self._restarted)
                    self._restarted = None
                    self.heartbeat()
                return
            if not self._report(problem):
                return
        self._restarted = self._recover()

    def _find_problem(self) -> str | None:
        """What keeps the daemon from booking now (None: nothing)."""
        assert self.scheduler is not None and self.factory is not None and self.ctx is not None
        problem = self.scheduler.problem()
        if problem is not None:
            return problem
        try:
            late = self._late()
        except models.DatabaseError as exc:
            return f"the database cannot be read ({models.error_text(exc)})"
        with self.ctx.in_flight_lock:
            busy = set(self.ctx.in_flight)
        overdue = self.overdue.check(key for key in late if key not in busy)
        return watchdog.describe_overdue(overdue) if overdue else None

    def _late(self) -> list[str]:
        """The pending instances whose job should have started LATE_AFTER ago (a job starts LEAD
        before its trigger). The instances are asked only once the earliest pending trigger, as
        last read, is that close; it is read again after each change to the jobs, and at least
        every NEXT_DUE_REFRESH seconds whatever happens."""
        assert self.factory is not None
        before = datetime.now(UTC) + scheduler.LEAD - timedelta(seconds=watchdog.LATE_AFTER)
        read = self._next_due_read
        if (
            read is not None
            and time.monotonic() - read < watchdog.NEXT_DUE_REFRESH
            and (self._next_due is None or self._next_due >= before)
        ):
            return []
        changes = self._jobs_changed
        late = instances.overdue(self.factory, before)
        self._next_due_read = None
        if not late:
            next_due = instances.next_trigger(self.factory)
            if changes == self._jobs_changed:  # no sync meanwhile (a top-up's, in its thread)
                self._next_due, self._next_due_read = next_due, time.monotonic()
        return late

    def _recover(self) -> str | None:
        """Restart the scheduler and re-sync its jobs from the instances, once the database takes
        writes. Returns what was done, or None (the watchdog told why) while it cannot be.
        Recovered is what the next look says: an overdue booking still not started is still a
        problem (and the time toward giving up runs on)."""
        assert self.scheduler is not None
        with self._load_lock:
            try:
                self.scheduler.probe_write()
            except Exception as exc:  # noqa: BLE001 (whatever the driver says, try again)
                self._report(f"the database cannot be written ({models.error_text(exc)})")
                return None
            try:
                self.scheduler.restart()
                report = self._sync()
                self.scheduler.start()
            except Exception as exc:  # noqa: BLE001 (as above)
                self._report(f"the scheduler cannot restart ({models.error_text(exc)})")
                return None
        return (
            f"restarted and re-synced from the instances (jobs: {report.added} added, "
            f"{report.moved} moved, {report.removed} removed); overdue bookings go now"
        )

    def _report(self, problem: str) -> bool:
        """Tell the watchdog what is wrong (it logs) and `health` (the heartbeat, at once).
        False when it is time to give up: the loop then stops, with EXIT_NOT_WORKING."""
        going_on = self.watchdog.report(problem)
        if not going_on:
            self.exit_code = EXIT_NOT_WORKING
            self.stop.set()
        self.heartbeat()
        return going_on

    def _clock_jumped(self, jump: float) -> None:
        """APScheduler sleeps on a wait computed from the wall clock: wake it to look again."""
        if jump > 0:
            logger.warning(
                "the wall clock jumped forward by %.1f s (an NTP step, a resumed VM?): scheduler "
                "woken; triggers it passed are booked now",
                jump,
            )
        else:
            logger.warning(
                "the wall clock jumped backward by %.1f s: scheduler woken; no request leaves "
                "before its trigger by the clock",
                -jump,
            )
        assert self.scheduler is not None
        self.scheduler.wakeup()
        self.overdue.forget()

    def safe_load(self, reason: str) -> None:
        try:
            self.load(reason=reason)
        except Exception:
            logger.exception("reload (%s) failed; the last good state stays", reason)

    def shutdown(self) -> None:
        """Stop taking triggers, hand the active role over, let a booking in flight finish,
        release everything."""
        self.stop.set()
        self.roles.hand_over(self)
        if self.ctx is not None:
            self.ctx.stop.set()
        if self._running:
            # From now on `health` says 1, whatever the last heartbeat said.
            with contextlib.suppress(FileNotFoundError):
                self.settings.heartbeat_path.unlink()
        if self.pinger is not None:
            self.pinger.close()
        if self.scheduler is not None:
            # Giving up: a scheduler thread stuck in the database must not keep the process up.
            bound = None if self.exit_code == EXIT_OK else self.settings.http_timeout + 5.0
            if not self.scheduler.shutdown(wait=True, timeout=bound):
                logger.error("the scheduler did not stop in %.0f s; exiting anyway", bound)
        scheduler.set_runtime(None)
        self.roles.leave(self)
        self.client.close()
        if self.notifier is not None:
            self.notifier.close(timeout=10.0)
        if self.engine is not None:
            self.engine.dispose()
        gc.unfreeze()  # what the start froze is the collector's again (see _give_back_memory)
        self._close_guard()
        self._remove_pid_file()
        self.release_locks()
        if self._running:
            logger.info("courtbot stopped")

    def _close_guard(self) -> None:
        """Close the database guard; when the file was lost, save what the daemon held first."""
        if self.guard is None:
            return
        if self.database_lost is None:
            self.guard.close()
            return
        try:
            saved = self.guard.save()
        except OSError as exc:
            logger.error("the database could not be saved (%s): its last state is lost", exc)
            return
        if saved == self.guard.path:
            logger.error("the database as courtbot last saw it is written back to %s", saved)
        else:
            logger.error(
                "the database as courtbot last saw it is saved to %s; %s (the file put there "
                "while courtbot ran) is used at the next start",
                saved,
                self.guard.path,
            )

    def _remove_pid_file(self) -> None:
        """Remove bot.pid if this daemon wrote it and it still holds its pid: a daemon refused
        at start never removes the running one's."""
        if not self._pid_written:
            return
        with contextlib.suppress(OSError, ValueError):
            if int(self.settings.pid_path.read_text().strip()) == os.getpid():
                self.settings.pid_path.unlink()


def club_location(settings: Settings, template: Flow | None) -> str | None:
    """Where the courts are, for calendar entries: the booking URL's host (the template's
    booking step's, else BOOKING_API_URL's), without user, password or port."""
    url = (
        template.booking_step.url.source()
        if template is not None and template.has_url
        else settings.api_url
    )
    try:
        return urlsplit(url).hostname if url else None
    except ValueError:
        return None


def _token_expiry_message(
    name: str, expires: datetime, count: int, first: models.Instance, now: datetime
) -> tuple[str, str]:
    """The subject and body of the one report about a token that expires before a booking."""
    zone = utils.get_zone(first.timezone)
    state = "expired" if expires <= now else "expires"
    subject = f"Token {name!r} {state} {utils.format_utc(expires)}, before {count} booking(s)"
    body = "\n".join(
        [
            f"Token {name!r} in tokens.json is a JWT that {state} {utils.format_utc(expires)} "
            f"({utils.format_ahead(expires, now)}).",
            f"{count} pending booking(s) have their window open after that: at its trigger the "
            "club would reject the token (401). The first:",
            "",
            f"    {first.key}: window opens {utils.format_local(first.trigger_time, zone)} "
            f"({utils.format_ahead(first.trigger_time, now)})",
            "",
            "What to do: put a fresh token in tokens.json (python main.py encrypt-token encrypts "
            "it), then python main.py reload.",
        ]
    )
    return subject, body


def trim_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's ``malloc_trim(0)``): without it,
    what a load freed stays in the process. False (and nothing done) where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def _record_signal(signum: int, frame: Any) -> None:
    """Nothing to do: ``set_wakeup_fd`` already queued the signal number for the loop."""


# --------------------------------------------------------------------------- active and standbys

#: How often a daemon on a shared database writes its row in ``daemons`` (a standby: its
#: heartbeat file too), and the active one looks for claims of daemons that died.
BEAT_SECONDS = 5.0
#: How often the active daemon on a shared database looks for pending instances changed
#: elsewhere (a booking handed back, a `retry` on another host): as often as the watchdog
#: looks, so that their jobs exist before it would call them overdue.
LOOK_SECONDS = watchdog.INTERVAL
#: A stopped daemon's row in ``daemons`` is removed this long after its last heartbeat.
FORGET_AFTER = timedelta(minutes=1)
#: How long a claim's owner that seems gone is given to show it lives (a standby takes its
#: presence lock again at its next try, every leader.POLL_SECONDS).
PRESENCE_GRACE_SECONDS = 1.5 * leader.POLL_SECONDS


class LeaderWatch:
    """A thread that checks every ``leader.CHECK_SECONDS`` that the daemon still holds the
    active role, and calls ``on_lost`` once, at once, when it does not."""

    def __init__(
        self, lead: leader.Leadership | leader.LocalLeadership, on_lost: Callable[[], None]
    ) -> None:
        self.lead = lead
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="courtbot-leader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(leader.CHECK_SECONDS):
            try:
                held = self.lead.still_held()
            except Exception:
                logger.exception("leadership check failed")
                held = False
            if not held:
                if not self._stop.is_set():
                    self.on_lost()
                return

    def stop(self) -> None:
        """Stop checking (and wait for a check under way, so nobody else uses the lock's
        connection at the same time)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10)


class Roles:
    """This daemon's role on its database (CONTRACT section 10) and the loop's hooks for it.

    On SQLite the file lock let only this daemon start: it is active at once and stays so. On
    PostgreSQL it is active while it holds ``leader.Leadership``; otherwise a standby, which
    tries for it every ``leader.POLL_SECONDS``, writes its heartbeat, ignores SIGHUP, and
    sends and loads nothing. The active daemon checks the lock every ``leader.CHECK_SECONDS``
    from a thread of its own and, once it is lost, stops booking at once (``may_send``
    cleared: no request leaves, the job store is fenced) and goes back to standby with a
    fresh scheduler when it wins the role again.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.ident = leader.new_daemon_id()
        self.lead = leader.leadership_for(url, self.ident)
        self.shared = isinstance(self.lead, leader.Leadership)
        self.beat_seconds = BEAT_SECONDS
        self.role = leader.STANDBY
        self.started_at = datetime.now(UTC)
        self.since = self.started_at
        self._watch: LeaderWatch | None = None
        self._lost = threading.Event()
        self._next_try = 0.0
        self._next_beat = 0.0
        self._next_look = 0.0
        self._outage: str | None = None
        #: The context of the last period as the active daemon, while its bookings end.
        self._leftover: bot.BookingContext | None = None
        self._pending_mark: tuple[int, datetime | None] | None = None

    @property
    def is_active(self) -> bool:
        return self.role == leader.ACTIVE

    # -- hooks of the daemon and its loop ------------------------------------------------

    def join(self, daemon: Daemon) -> None:
        """At start: the active role if it is free (always on SQLite), else standby."""
        try:
            acquired = self.lead.try_acquire()
        except models.DatabaseConnectError as exc:
            self._report_outage(exc)
            acquired = False
        if acquired:
            self._activate(daemon, "start")
        else:
            self._wait(daemon, rejoin=False)

    def next_due(self) -> float:
        """When (``time.monotonic``) the loop must call ``tick`` at the latest."""
        if not self.shared:
            return math.inf  # alone on its database: nothing to beat or try
        if self.is_active:
            return min(self._next_beat, self._next_look)
        return min(self._next_try, self._next_beat)

    def tick(self, daemon: Daemon, signals: set[int]) -> bool:
        """One turn of the loop. True when the rest of the turn (reloads, the active
        daemon's heartbeat) is not for this daemon now: it is a standby, or just became one."""
        if self.is_active:
            if self._lost.is_set():
                self._step_down(daemon)
                return True
            now = time.monotonic()
            if self.shared and now >= self._next_look:
                self._next_look = now + LOOK_SECONDS
                self._pick_up(daemon)
            if self.shared and now >= self._next_beat:
                self.beat(daemon)
            return False
        if signal.SIGHUP in signals:
            logger.info(
                "SIGHUP received: this daemon is a standby; it loads the files when it becomes "
                "the active one"
            )
        now = time.monotonic()
        if now >= self._next_try:
            self._next_try = now + leader.POLL_SECONDS
            if self._try_acquire():
                self._activate(daemon, "became active")
                return True
        if now >= self._next_beat:
            self._beat_standby(daemon)
        return True

    def before_sync(self, factory: models.SessionFactory) -> None:
        """Note the pending instances as they are before the jobs follow them, so that a
        change made elsewhere afterwards is seen (shared databases only)."""
        if self.shared:
            self._pending_mark = instances.pending_mark(factory)

    def live_owners(self, factory: models.SessionFactory) -> frozenset[str]:
        """The owners of ``booking`` claims whose daemon lives (this one included): their
        claims are theirs, never taken over."""
        owners = {owner for owner in instances.booking_owners(factory) if owner}
        return frozenset(self._alive(owners - {self.ident}) | {self.ident})

    def _alive(self, owners: set[str]) -> set[str]:
        """Those of ``owners`` whose daemon lives. One that seems gone is looked at again
        after PRESENCE_GRACE_SECONDS: a daemon whose connections were cut (not killed) takes
        its presence again within a second, and its claims stay its own."""
        if not owners:
            return set()
        alive = self.lead.alive_ids(owners)
        if self.shared and owners - alive:
            time.sleep(PRESENCE_GRACE_SECONDS)
            alive |= self.lead.alive_ids(owners)
        return alive

    def hand_over(self, daemon: Daemon) -> None:
        """At a clean stop, before waiting for bookings in flight: no request leaves any more
        (a booking waiting for its trigger or a retry goes back to pending) and a standby may
        take the role at once."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self.shared and daemon.ctx is not None:
            daemon.ctx.may_send.clear()
            daemon.ctx.stop.set()
        self.lead.release()

    def leave(self, daemon: Daemon) -> None:
        """At exit, after the bookings in flight (those of an earlier period as the active
        daemon too): this daemon's row goes, then its locks."""
        leftover = self._leftover
        if leftover is not None:
            deadline = time.monotonic() + daemon.settings.http_timeout + 1.0
            while leftover.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
        if daemon.engine is not None:
            try:
                leader.remove_daemon(daemon.engine, self.ident)
            except Exception as exc:  # noqa: BLE001 (the row is forgotten later anyway)
                logger.warning("could not remove this daemon's row: %s", self._one_line(exc))
        self.lead.close()

    # -- the active role -----------------------------------------------------------------

    def _activate(self, daemon: Daemon, reason: str) -> None:
        self.role = leader.ACTIVE
        self.since = datetime.now(UTC)
        self._lost.clear()
        self._next_beat = time.monotonic() + self.beat_seconds
        self._next_look = time.monotonic() + LOOK_SECONDS
        if not self.shared:
            daemon.become_active(reason)
            return
        logger.info(
            "active: this daemon (%s pid %d) is the active one on %s",
            socket.gethostname(),
            os.getpid(),
            models.mask_url(self.url),
        )
        # An active daemon whose connection was cut notices within CHECK_SECONDS and stops
        # sending: give it that time before anything is sent from here.
        time.sleep(leader.SETTLE_SECONDS)
        self._watch = LeaderWatch(self.lead, lambda: self._on_lost(daemon))
        self._watch.start()
        try:
            self._release_leftovers(daemon, self.since)
            daemon.become_active(reason)
        except Exception:
            logger.exception("could not take up the active role; back to standby")
            self._on_lost(daemon, quiet=True)
            self._step_down(daemon)

    def _on_lost(self, daemon: Daemon, *, quiet: bool = False) -> None:
        """The role is gone (the lock's connection failed, or it was taken): stop booking now,
        from whatever thread noticed; the loop steps down next."""
        ctx = daemon.ctx
        if ctx is not None:
            ctx.may_send.clear()
            ctx.stop.set()
        self._lost.set()
        if not quiet:
            logger.error(
                "lost the active role on %s (its database connection failed): stopped booking "
                "at once; a booking in flight may finish; a standby takes over",
                models.mask_url(self.url),
            )
        daemon.wake()

    def beat(self, daemon: Daemon) -> None:
        """The active daemon's beat on a shared database: its row in ``daemons``, the claims
        of daemons that died, and pending instances changed elsewhere. (Alone on SQLite it
        has nothing to say: ``status`` reads its pid file and heartbeat.)"""
        if not self.shared:
            return
        assert daemon.engine is not None and daemon.factory is not None
        self._next_beat = time.monotonic() + self.beat_seconds
        now = datetime.now(UTC)
        try:
            self._write_row(daemon, now)
            self._recover_dead_claims(daemon, now)
            leader.forget_dead(daemon.engine, now=now, older_than=FORGET_AFTER)
        except Exception as exc:  # noqa: BLE001 (the database is away: the watch acts on it)
            self._report_outage(exc)
            return
        self._recovered()

    def _pick_up(self, daemon: Daemon) -> None:
        """Pending instances changed elsewhere (a booking handed back by a daemon that lost the
        role, a `retry` run on another host): their jobs follow. A cheap look (a count and a
        time on the status index) unless something changed."""
        assert daemon.factory is not None
        try:
            if instances.pending_mark(daemon.factory) == self._pending_mark:
                return
            changed = daemon._sync()
        except Exception as exc:  # noqa: BLE001 (the database is away: the watch acts on it)
            self._report_outage(exc)
            return
        if changed.added or changed.moved or changed.removed:
            logger.info(
                "instances changed elsewhere: jobs %d added, %d moved, %d removed",
                changed.added,
                changed.moved,
                changed.removed,
            )

    def _recover_dead_claims(self, daemon: Daemon, now: datetime) -> None:
        """Claims of daemons that died since this one became active: as after a crash."""
        assert daemon.factory is not None and daemon.notifier is not None
        owners = instances.booking_owners(daemon.factory) - {self.ident}
        if not owners:
            return
        live = self._alive({owner for owner in owners if owner}) | {self.ident}
        if owners <= live:
            return
        retried, unknown = instances.recover_in_flight(
            daemon.factory, now, live_owners=frozenset(live)
        )
        for row in unknown:
            daemon.notifier.notify(instances.outcome_of(row))
        if retried:
            logger.warning(
                "%d booking(s) of a daemon that stopped are retried now with the same "
                "Idempotency-Key: %s",
                len(retried),
                ", ".join(retried),
            )
        daemon._sync()

    def _step_down(self, daemon: Daemon) -> None:
        """Back to standby after losing the role: the scheduler stops (its store is fenced
        already), presence is taken again (this daemon's claims in flight stay its own)."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._lost.clear()
        if daemon.scheduler is not None:
            daemon.scheduler.shutdown(wait=False)
        daemon.reset_watch()
        self.lead.release()
        try:
            self.lead.ensure_present()
        except Exception as exc:  # noqa: BLE001 (the database is away: logged, retried)
            self._report_outage(exc)
        self._leftover = daemon.ctx
        self._wait(daemon, rejoin=True)

    # -- the standby role ----------------------------------------------------------------

    def _wait(self, daemon: Daemon, *, rejoin: bool) -> None:
        """Become (or start as) a standby: ``bot.pid`` written, heartbeat, one log line."""
        self.role = leader.STANDBY
        self.since = datetime.now(UTC)
        pause = leader.REJOIN_SECONDS if rejoin else leader.POLL_SECONDS
        self._next_try = time.monotonic() + pause
        self._beat_standby(daemon)
        logger.info(
            "standby: this daemon (%s pid %d) waits on %s%s; it sends nothing and takes over "
            "within seconds when the active one ends",
            socket.gethostname(),
            os.getpid(),
            models.mask_url(self.url),
            self._active_one(daemon),
        )
        daemon.write_pid()

    def _active_one(self, daemon: Daemon) -> str:
        """`` while <host> pid <pid> is active`` when the database says so, else ``""``."""
        if daemon.engine is None:
            return ""
        try:
            states = leader.list_daemons(daemon.engine, now=datetime.now(UTC))
        except Exception:  # noqa: BLE001 (a detail of a log line)
            return ""
        for state in states:
            if state.alive and state.role == leader.ACTIVE and state.id != self.ident:
                return f" while {state.host} pid {state.pid} is active"
        return ""

    def _try_acquire(self) -> bool:
        try:
            acquired = self.lead.try_acquire()
        except Exception as exc:  # noqa: BLE001 (unreachable: logged once, tried again)
            self._report_outage(exc)
            return False
        self._recovered()
        return acquired

    def _beat_standby(self, daemon: Daemon) -> None:
        """A standby's row and heartbeat file (only while it reaches the database: one that
        cannot would not take over, so ``health`` says 1), and the end of its own claims."""
        self._next_beat = time.monotonic() + self.beat_seconds
        now = datetime.now(UTC)
        try:
            self._write_row(daemon, now)
            self._release_leftovers(daemon, now)
        except Exception as exc:  # noqa: BLE001 (logged once, tried again)
            self._report_outage(exc)
            return
        self._recovered()
        daemon.heartbeat()

    def _release_leftovers(self, daemon: Daemon, now: datetime) -> None:
        """Claims of this daemon's last active period still in ``booking`` whose booking is
        no longer under way (its end could not be written: the database was away) are put
        back as after a crash, for whichever daemon is active. A booking still under way is
        left to finish, and looked at again at the next beat."""
        ctx = self._leftover
        if ctx is None or daemon.factory is None:
            return
        with ctx.in_flight_lock:
            busy = frozenset(ctx.in_flight)
        retried, unknown = instances.recover_in_flight(
            daemon.factory, now, owner=self.ident, keep=busy
        )
        if retried or unknown:
            logger.warning(
                "claims of this daemon whose end could not be written are put back: %s",
                ", ".join(retried + [row.key for row in unknown]),
            )
        if daemon.notifier is not None:
            for row in unknown:
                daemon.notifier.notify(instances.outcome_of(row))
        if not busy:
            self._leftover = None

    # -- both ------------------------------------------------------------------------------

    def _write_row(self, daemon: Daemon, now: datetime) -> None:
        assert daemon.engine is not None
        leader.write_heartbeat(
            daemon.engine,
            ident=self.ident,
            role=self.role,
            started_at=self.started_at,
            since=self.since,
            now=now,
        )

    def _one_line(self, exc: BaseException) -> str:
        if isinstance(exc, models.DatabaseConnectError):
            return str(exc)
        return str(models.connect_error(self.url, exc))

    def _report_outage(self, exc: BaseException) -> None:
        """Log a database error once per outage (the password masked)."""
        if self._outage is None:
            logger.error(
                "%s: %s; trying again every %g s",
                self.role,
                self._one_line(exc),
                leader.POLL_SECONDS if not self.is_active else self.beat_seconds,
            )
        self._outage = self._one_line(exc)

    def _recovered(self) -> None:
        if self._outage is not None:
            logger.info("%s: the database answers again", self.role)
            self._outage = None


# --------------------------------------------------------------------------- commands


def load_settings(env: dict[str, str]) -> Settings:
    try:
        settings = Settings.from_env(env)
    except SettingsError as exc:
        raise StartError(str(exc)) from None
    problem = models.url_problem(settings.database_url)
    if problem is not None:
        raise StartError(f"DATABASE_URL: {problem}")
    return settings


def load_fernet(settings: Settings) -> MultiFernet:
    try:
        return settings.fernet()
    except utils.KeyError_ as exc:
        raise StartError(str(exc)) from None


def load_template(settings: Settings) -> config_loader.FlowFile | None:
    """The request template named by BOOKING_REQUEST_TEMPLATE, validated (None when unset)."""
    try:
        return config_loader.load_template(settings)
    except TemplateError as exc:
        raise StartError(str(exc)) from None


def shown_api_url(url: str) -> str:
    """BOOKING_API_URL fit for output: a user and password in it masked, the rest as given."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return utils.mask_url_secrets(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def check_api_url(settings: Settings) -> None:
    """BOOKING_API_URL, when set, is a URL section 6's request can be sent to; StartError
    otherwise, one line with its user and password masked."""
    if settings.api_url is None:
        return
    try:
        config_loader.check_api_url(settings.api_url)
    except SettingsError as exc:
        raise StartError(str(exc)) from None


def require_api_url(settings: Settings, fernet: MultiFernet) -> None:
    """Without BOOKING_API_URL (and no template with a url), ``run`` starts only when club
    files give every entry its request: DATA_DIR/clubs/ holds some, and every entry of
    schedules.json names one. StartError otherwise."""
    message = (
        "BOOKING_API_URL is not set: set it to the club's booking endpoint "
        "(e.g. https://club.example/api/bookings)"
    )
    if not config_loader.has_club_files(settings):
        raise StartError(message)
    config = config_loader.read_config(settings, fernet, datetime.now(UTC))
    needing = config.schedules.without_request
    if needing:
        raise StartError(f"{message}, or name a club file in {', '.join(needing)}")


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


def cmd_run(env: dict[str, str]) -> int:
    try:
        settings = load_settings(env)
        fernet = load_fernet(settings)
        check_api_url(settings)
        template = load_template(settings)
        if settings.api_url is None and (template is None or not template.flow.has_url):
            require_api_url(settings, fernet)
        check_data_dir(settings)
        try:
            setup_logging(settings)
        except OSError as exc:
            assert settings.log_file is not None
            raise cannot_write(
                "LOG_FILE",
                settings.log_file,
                exc,
                instead="a writable file, or to - (console only)",
            ) from None
    except StartError as exc:
        print(f"courtbot: cannot start: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    # Everything the daemon creates in DATA_DIR holds secrets or state: owner-only, including
    # what others create for it later (a rotated log, SQLite's -wal and -shm files).
    os.umask(0o077)
    # A booking thread that wakes at its trigger must get the GIL at once, not after another
    # thread's 5 ms default slice (the daemon is idle otherwise, so switching costs nothing).
    sys.setswitchinterval(0.0005)
    daemon = Daemon(settings, fernet, template)
    try:
        daemon.start()
    except (StartError, OSError, models.DatabaseError) as exc:
        print(f"courtbot: cannot start: {start_failure(settings, exc)}", file=sys.stderr)
        daemon.shutdown()
        return EXIT_CANNOT_START
    try:
        daemon.run_forever()
    finally:
        daemon.shutdown()
    return daemon.exit_code


def _request_of(entry: config_loader.Entry, config: Config, settings: Settings) -> str:
    """Where an entry's request comes from, for a person."""
    if entry.club is not None:
        return f"club: {entry.club} ({config.clubs[entry.club].label})"
    if config.template is not None:
        return f"request: {config.template.label}"
    if settings.api_url is None:
        return "request: none: BOOKING_API_URL is not set (`run` will not start without it)"
    return f"request: BOOKING_API_URL ({shown_api_url(settings.api_url)})"


def _flow_of(entry: config_loader.Entry, config: Config, settings: Settings) -> Flow | None:
    """What the entry's bookings are rendered from (None when nothing gives it a request)."""
    if entry.club is not None:
        return config.clubs[entry.club].flow
    if config.template is not None:
        return config.template.flow
    return default_flow(settings.api_url) if settings.api_url else None


def _print_check(config: Config, settings: Settings, now: datetime) -> None:
    entries = config.schedules.entries
    print(
        f"{settings.schedules_path}: {len(entries)} valid entr{'y' if len(entries) == 1 else 'ies'}"
        f", window {settings.window}, default zone {settings.timezone}"
    )
    for entry in entries:
        zone = entry.zone
        courts = utils.courts_text(list(entry.courts))
        state = "" if entry.enabled else ", DISABLED"
        print(
            f"\n{entry.id} (#{entry.position}): {entry.type}, {entry.timezone}, court {courts}, "
            f"token {entry.token!r}, {entry.duration_minutes} min{state}"
        )
        print(f"  {_request_of(entry, config, settings)}")
        source = "entry" if entry.window_from == "entry" else f"from {entry.window_from}"
        print(f"  window: {entry.window} ({source})")
        if entry.rule is not None:
            rfc = entry.rule.rfc.replace("\n", " ")
            print(f"  rule: {rfc}")
        if entry.skip:
            print(f"  skip: {', '.join(f'{day:%Y-%m-%d}' for day in sorted(entry.skip))}")
        pairs = [p for p in entry.occurrences(now, CHECK_INSTANCES) if p[1] > now]
        if not pairs:
            print("  no instance ahead")
        for wall, start in pairs[:CHECK_INSTANCES]:
            trigger = utils.trigger_time(start, zone, entry.window)
            line = (
                f"  {utils.format_local(start, zone)}  = {utils.format_utc(start)}  "
                f"trigger {utils.format_utc(trigger)}"
            )
            if trigger <= now:
                line += " (window already open: books at once)"
            print(line)
            note = utils.describe_wall_clock_issue(wall, zone)
            if note:
                print(f"    warning: {note}")
        if pairs:
            for line in _wishes_lines(entry, pairs[0][1]):
                print(f"  {line}")
        flow = _flow_of(entry, config, settings)
        if flow is not None and pairs:
            described = describe_flow(flow, entry.slot(pairs[0][1]))
            if flow.single:
                print("  request (next instance, token masked):")
            else:
                print("  flow (next instance, secrets masked, extracted values as <step.value>):")
            print("    " + described.replace("\n", "\n    "))


def _wishes_lines(entry: Entry, start: datetime) -> list[str]:
    """What ``check`` says of the entry's fallback times, watch and players (CONTRACT 13), for
    its next instance at ``start``."""
    zone, lines = entry.zone, []
    if entry.fallback_times:
        kept = {text: trigger for text, _, trigger in entry.fallbacks(start)}
        shown = [
            f"{text} (trigger {utils.format_utc(kept[text])})"
            if text in kept
            else f"{text} (skipped: the desired time)"
            for text in entry.fallback_times
        ]
        lines.append("fallback times (next instance): " + ", ".join(shown))
    end = entry.watch_end(start)
    if end is not None:
        lines.append(
            f"watch: until {utils.format_local(end, zone)} (next instance), tried again every "
            "WATCH_INTERVAL_SECONDS"
        )
    if entry.players:
        lines.append("players: " + ", ".join(entry.players))
    return lines


def _print_tokens(tokens: config_loader.TokensResult) -> None:
    """Each token of tokens.json by name, and how the file holds it (never a value)."""
    if tokens.file_error is not None or tokens.missing:
        return
    print(f"{config_loader.TOKENS_FILE}: {len(tokens.tokens)} token(s)")
    for name, token in tokens.tokens.items():
        kind = f"object of {', '.join(token.fields)}, " if token.fields is not None else ""
        if token.error is not None:
            held = "unusable (see the error above)"
        elif token.plaintext:
            held = "plaintext (the daemon encrypts it in the file when it loads it)"
        elif token.rewrite:
            held = "encrypted under an older key (the daemon re-encrypts it under the first)"
        else:
            held = "encrypted"
        print(f"  {name!r}: {kind}{held}")


def _print_notifications(settings: NotifySettings) -> None:
    """Where outcomes will be reported: email and each channel, secrets masked."""
    if settings.email_enabled:
        print(
            f"notifications: email to {', '.join(settings.recipients)} via {settings.smtp_host}:"
            f"{settings.smtp_port} ({settings.smtp_security})"
        )
    else:
        print("notifications: email off (set SMTP_HOST and NOTIFY_EMAIL)")
    for url in settings.urls:
        print(f"notifications: channel {mask_url(url)}")


def _settings_and_key(env: dict[str, str], command: str) -> tuple[Settings, MultiFernet] | int:
    """The settings and FERNET_KEY a command needs, or its exit code after one line on stderr
    (1 for bad settings, 2 without a usable key)."""
    try:
        settings = load_settings(env)
        check_api_url(settings)
    except StartError as exc:
        print(f"courtbot {command}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        return settings, load_fernet(settings)
    except StartError as exc:
        print(f"courtbot {command}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START


def cmd_check(env: dict[str, str]) -> int:
    loaded = _settings_and_key(env, "check")
    if isinstance(loaded, int):
        return loaded
    settings, fernet = loaded
    invalid = False
    now = datetime.now(UTC)
    config = config_loader.read_config(settings, fernet, now)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in config.errors:
        print(f"error: {error}", file=sys.stderr)
    try:
        notify_settings = NotifySettings.from_env(settings.env)
        problems = validate_notify_urls(notify_settings.urls)
        for problem in problems:
            print(f"error: NOTIFY_URLS: {problem}", file=sys.stderr)
        invalid = invalid or bool(problems)
        _print_notifications(notify_settings)
    except NotifyConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        invalid = True
    _print_tokens(config.tokens)
    _print_check(config, settings, now)
    if config.errors or invalid:
        count = len(config.errors) + int(invalid)
        print(f"\ninvalid: {count} problem(s); see the errors above", file=sys.stderr)
        return EXIT_INVALID
    print("\nOK")
    return EXIT_OK


def _dry_run_setup(
    settings: Settings, fernet: MultiFernet, schedule_id: str
) -> tuple[Flow, Entry, datetime, dict[str, str]]:
    """What ``dry-run`` needs: the flow, the entry, its next start and the token's secrets.
    Raises StartError naming what is missing."""
    now = datetime.now(UTC)
    config = config_loader.read_config(settings, fernet, now)
    if config.template_error is not None:
        raise StartError(config.template_error)
    entry = next((e for e in config.schedules.entries if e.id == schedule_id), None)
    if entry is None:
        errors = [e for e in config.errors if repr(schedule_id) in e]
        raise StartError(
            f"no valid entry {schedule_id!r} in {settings.schedules_path}"
            + (f": {errors[0]}" if errors else "; `python main.py check` lists the entries")
        )
    starts = [start for start in entry.starts(now, 5) if start > now]
    if not starts:
        raise StartError(f"entry {schedule_id!r} has no instance ahead")
    flow = _flow_of(entry, config, settings)
    if flow is None:
        raise StartError("BOOKING_API_URL is not set, and no BOOKING_REQUEST_TEMPLATE names a url")
    token = config.tokens.tokens.get(entry.token)
    secrets = None
    if token is not None and token.encrypted is not None:
        secrets = utils.decrypt_secrets(fernet, token.encrypted)
    if secrets is None:
        why = token.error if token is not None and token.error else "is not in tokens.json"
        raise StartError(f"token {entry.token!r}: {why}")
    return flow, entry, starts[0], secrets


def cmd_dry_run(env: dict[str, str], schedule_id: str, out: IO[str]) -> int:
    """Run the preparation steps of the schedule's next instance against the club now."""
    loaded = _settings_and_key(env, "dry-run")
    if isinstance(loaded, int):
        return loaded
    settings, fernet = loaded
    try:
        flow, entry, start, secrets = _dry_run_setup(settings, fernet, schedule_id)
    except StartError as exc:
        print(f"courtbot dry-run: {exc}", file=sys.stderr)
        return EXIT_INVALID
    zone = entry.zone
    slot = entry.slot(start)
    out.write(f"{entry.id}: next instance {utils.format_local(start, zone)} ({slot.key})\n")
    prepare = flow.phase("prepare")
    problem = None
    if not prepare:
        out.write("no preparation step: nothing is sent before the trigger\n")
    else:
        client = bot.ClubClient(timeout=settings.http_timeout)
        try:
            reports, problem = bot.dry_run(client, flow, slot, secrets, entry.token)
        finally:
            client.close()
        for report in reports:
            out.write(_report_line(report) + "\n")
    court = slot.courts[0]
    out.write("booking request it would send at the trigger (secrets masked):\n")
    out.write("  " + describe_booking(flow, slot, court).replace("\n", "\n  ") + "\n")
    if problem is not None:
        print(f"courtbot dry-run: {problem}", file=sys.stderr)
        return EXIT_INVALID
    out.write("OK: every preparation step succeeded\n" if prepare else "OK\n")
    return EXIT_OK


def _report_line(report: bot.StepReport) -> str:
    """One preparation step's send as ``dry-run`` prints it: status and value names, masked."""
    court = (
        f" (court {report.court if report.court is not None else 'any'})"
        if report.per_court
        else ""
    )
    status = f"HTTP {report.status}" if report.status is not None else "no answer"
    if report.problem is not None:
        return f"  step {report.step}{court}: {status}: FAILED: {report.problem}"
    values = ", ".join(f"{name}={utils.MASK}" for name in report.values)
    return f"  step {report.step}{court}: {status} ok" + (f"; extracted {values}" if values else "")


def _open_existing_engine(settings: Settings, *, upgrade: bool = False) -> models.Engine | None:
    """The database when it exists with its tables (None otherwise); never creates it. With
    ``upgrade`` (a writer), the columns an earlier release lacked are added. Raises
    DatabaseConnectError (one line, password masked) when it cannot be read."""
    url = settings.database_url
    db = models.sqlite_path(url)
    if db is not None and not db.exists():
        return None
    engine = models.make_engine(url, create=False)
    try:
        if not models.has_tables(engine):
            engine.dispose()
            return None
        if upgrade:
            models.add_missing_columns(engine)
            models.add_missing_tables(engine)
    except Exception as exc:  # noqa: BLE001 (a driver error: one line)
        engine.dispose()
        raise models.connect_error(url, exc) from None
    return engine


def _open_existing_db(settings: Settings, *, upgrade: bool = False) -> models.SessionFactory | None:
    """Sessions on the database when it exists with its tables (None otherwise)."""
    engine = _open_existing_engine(settings, upgrade=upgrade)
    return None if engine is None else models.session_factory(engine)


def daemon_facts(
    settings: Settings, engine: models.Engine | None, now: datetime
) -> report.DaemonFacts:
    """What ``status`` says about the daemons: the one holding DATA_DIR (pid and heartbeat file)
    and the rows of the ``daemons`` table (active and standbys, where daemons write it)."""
    try:
        age: float | None = time.time() - float(settings.heartbeat_path.read_text().strip())
    except (OSError, ValueError):
        age = None
    daemons: tuple[report.DaemonInfo, ...] = ()
    if engine is not None and models.has_table(engine, models.Daemon.__tablename__):
        daemons = tuple(
            report.DaemonInfo(
                host=state.host,
                pid=state.pid,
                role=state.role,
                heartbeat_age=(now - state.heartbeat_at).total_seconds(),
                alive=state.alive,
                since=state.since,
            )
            for state in leader.list_daemons(engine, now=now)
        )
    return report.DaemonFacts(
        daemon_running(settings), age, daemons, stale_after=HEARTBEAT_STALE_SECONDS
    )


#: ``status --upcoming``: what is still to be booked.
UPCOMING = (models.PENDING, models.BOOKING)


def daemon_json(state: leader.DaemonState) -> dict[str, Any]:
    """A daemon as ``status --daemons --json`` prints it."""
    return {
        "id": state.id,
        "host": state.host,
        "pid": state.pid,
        "role": state.role,
        "alive": state.alive,
        "since": utils.format_utc(state.since),
        "started_at": utils.format_utc(state.started_at),
        "heartbeat_at": utils.format_utc(state.heartbeat_at),
    }


def cmd_status(env: dict[str, str], args: argparse.Namespace, out: IO[str]) -> int:
    try:
        settings = load_settings(env)
    except StartError as exc:
        print(f"courtbot status: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        engine = _open_existing_engine(settings)
    except models.DatabaseConnectError as exc:
        print(f"courtbot status: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        if args.daemons:
            return _status_daemons(settings, engine, args.json, out)
        return _status(settings, engine, args, out, env)
    except models.DBAPIError as exc:  # the database went away mid-read: one line, masked
        print(
            f"courtbot status: {models.connect_error(settings.database_url, exc)}", file=sys.stderr
        )
        return EXIT_INVALID
    finally:
        if engine is not None:
            engine.dispose()


def _status(
    settings: Settings,
    engine: models.Engine | None,
    args: argparse.Namespace,
    out: IO[str],
    env: dict[str, str],
) -> int:
    factory = None if engine is None else models.session_factory(engine)
    statuses = UPCOMING if args.upcoming else ([args.status] if args.status else None)
    rows = instances.status_rows(
        factory, schedule=args.schedule, statuses=statuses, limit=args.limit
    )
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    now = datetime.now(UTC)
    filtered = args.schedule or statuses or args.limit
    out.write(
        report.render(
            daemon_facts(settings, engine, now),
            instances.upcoming(factory, now, schedule=args.schedule, limit=report.NEXT_SHOWN),
            instances.recent_outcomes(factory, report.outcomes_since(now), schedule=args.schedule),
            rows,
            now=now,
            palette=report.Palette(report.colour_wanted(out.isatty(), env)),
            empty="no instance matches" if filtered else "no instances yet",
        )
    )
    return EXIT_OK


def _status_daemons(
    settings: Settings, engine: models.Engine | None, as_json: bool, out: IO[str]
) -> int:
    """``status --daemons``: the daemons on the database (the active one and the standbys)."""
    now = datetime.now(UTC)
    if as_json:
        states = []
        if engine is not None and models.has_table(engine, models.Daemon.__tablename__):
            states = leader.list_daemons(
                engine, now=now, stale_after=timedelta(seconds=HEARTBEAT_STALE_SECONDS)
            )
        json.dump([daemon_json(state) for state in states], out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write("\n".join(report.daemon_lines(daemon_facts(settings, engine, now))) + "\n")
    return EXIT_OK


def _cancel_flow(settings: Settings, club: str | None) -> tuple[Flow | None, str]:
    """The flow an instance of ``club`` cancels with (None when there is none), and how to name
    it: its club file, else the request template, else section 6's request."""
    try:
        if club is not None:
            path = settings.clubs_dir / f"{club}.json"
            loaded = config_loader.load_flow_file(path, api_url=settings.api_url, label=str(path))
            return loaded.flow, f"club file {path}"
        template = config_loader.load_template(settings)
    except TemplateError as exc:
        return None, str(exc)
    if template is not None:
        return template.flow, template.label
    if settings.api_url is None:
        return None, "no BOOKING_API_URL"
    return default_flow(settings.api_url), "BOOKING_API_URL"


def cmd_cancel(env: dict[str, str], key: str) -> int:
    """Cancel a booked instance at the club (CONTRACT 13): exit 0 when the club confirmed,
    1 with one line otherwise (nothing changed; nothing sent when it cannot be cancelled)."""
    loaded = _settings_and_key(env, "cancel")
    if isinstance(loaded, int):
        return loaded
    settings, fernet = loaded
    try:
        factory = _open_existing_db(settings, upgrade=True)
        if factory is None:
            problem: str | None = f"no database at {models.mask_url(settings.database_url)}"
        else:
            problem = instances.cancel_problem(factory, key)
    except models.DatabaseConnectError as exc:
        problem = str(exc)
    if problem is not None or factory is None:
        print(f"courtbot cancel: {problem}", file=sys.stderr)
        return EXIT_INVALID
    row, token_row = instances.claimed(factory, key)
    flow, name = _cancel_flow(settings, row.club)
    if flow is None or not flow.cancel:
        why = f'{name} has no "cancel" steps' if flow is not None else name
        print(
            f"courtbot cancel: {key}: {why}; nothing was sent: cancel it with the club",
            file=sys.stderr,
        )
        return EXIT_INVALID
    secrets, problem = instances.token_secrets(token_row, fernet, name=row.token_name)
    if problem is None:
        client = bot.ClubClient(timeout=settings.http_timeout)
        try:
            problem = bot.cancel_booking(client, flow, row, secrets)
        finally:
            client.close()
    if problem is not None:
        print(f"courtbot cancel: {key}: {problem}; it stays booked", file=sys.stderr)
        return EXIT_INVALID
    cancelled = instances.cancelled_at_club(factory, key, datetime.now(UTC))
    notifier = Notifier(_notify_settings(settings))
    notifier.start()
    notifier.notify(instances.outcome_of(cancelled))
    notifier.close()
    print(f"cancelled at the club: {key} (ref {row.booking_ref})")
    return EXIT_OK


def _notify_settings(settings: Settings) -> NotifySettings:
    try:
        return NotifySettings.from_env(settings.env)
    except NotifyConfigError as exc:
        print(f"courtbot: notifications: {exc}; none sent", file=sys.stderr)
        return NotifySettings.from_env({})


def cmd_retry(env: dict[str, str], target: str) -> int:
    try:
        settings = load_settings(env)
    except StartError as exc:
        print(f"courtbot retry: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        factory = _open_existing_db(settings, upgrade=True)
        if factory is None:
            print(
                f"courtbot retry: no database at {models.mask_url(settings.database_url)}",
                file=sys.stderr,
            )
            return EXIT_INVALID
        now = datetime.now(UTC)
        keys = instances.retry(factory, target, now)
        left = instances.taken_by_club(factory, target, now)
    except models.DatabaseConnectError as exc:
        print(f"courtbot retry: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except Exception as exc:  # noqa: BLE001 (a driver error mid-write: one line, masked)
        print(
            f"courtbot retry: {models.connect_error(settings.database_url, exc)}", file=sys.stderr
        )
        return EXIT_INVALID
    for row in left:
        ref = f" (ref {row.booking_ref})" if row.booking_ref else ""
        print(
            f"courtbot retry: {row.key}: left failed: the club took this booking{ref} but a "
            "step after it did not complete; check it with the club (booking it again would "
            "book twice)",
            file=sys.stderr,
        )
    if not keys:
        if not left:
            print(
                f"courtbot retry: no failed instance with a start still ahead matches {target!r}",
                file=sys.stderr,
            )
        return EXIT_INVALID
    for key in keys:
        print(f"pending again: {key}")
    if models.is_postgresql(settings.database_url):
        # The active daemon may run elsewhere: it notices the change itself.
        print(f"the active daemon picks them up within {LOOK_SECONDS:g} s")
        return EXIT_OK
    pid = daemon_running(settings)
    if pid is not None:
        print(f"the daemon (pid {pid}) picks them up within a second")
    else:
        print(
            "no daemon runs on this DATA_DIR: they are booked when one starts (an active daemon "
            "on another host sharing the database picks them up within a second)"
        )
    return EXIT_OK


def cmd_reload(env: dict[str, str]) -> int:
    try:
        settings = load_settings(env)
    except StartError as exc:
        print(f"courtbot reload: {exc}", file=sys.stderr)
        return EXIT_INVALID
    pid = daemon_running(settings)
    if pid is None:
        print(f"courtbot reload: no daemon runs on {settings.data_dir}", file=sys.stderr)
        return EXIT_INVALID
    try:
        os.kill(pid, signal.SIGHUP)
    except (ProcessLookupError, PermissionError) as exc:
        print(f"courtbot reload: cannot signal pid {pid}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"sent SIGHUP to courtbot (pid {pid})")
    return EXIT_OK


def cmd_health(env: dict[str, str]) -> int:
    """Exit 0 while a daemon holds DATA_DIR, its process lives and its heartbeat is fresh and
    says its scheduler works (the container's HEALTHCHECK); 1 once it has stopped, whatever its
    last heartbeat."""
    try:
        settings = load_settings(env)
    except StartError as exc:
        print(f"courtbot health: {exc}", file=sys.stderr)
        return EXIT_INVALID
    pid = daemon_running(settings)
    if pid is None:
        print(f"courtbot health: no daemon runs on {settings.data_dir}", file=sys.stderr)
        return EXIT_INVALID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print(f"courtbot health: the daemon of bot.pid (pid {pid}) is gone", file=sys.stderr)
        return EXIT_INVALID
    except PermissionError:
        pass  # alive, as another user
    try:
        stamp, state = watchdog.read_heartbeat(settings.heartbeat_path.read_text())
        age = time.time() - stamp
    except (OSError, ValueError) as exc:
        print(f"courtbot health: no heartbeat ({exc})", file=sys.stderr)
        return EXIT_INVALID
    if state is not None:
        print(f"courtbot health: {state}", file=sys.stderr)
        return EXIT_INVALID
    if age > HEARTBEAT_STALE_SECONDS:
        print(f"courtbot health: heartbeat is {age:.0f} s old", file=sys.stderr)
        return EXIT_INVALID
    print(f"ok: heartbeat {age:.0f} s ago")
    return EXIT_OK


def cmd_generate_key() -> int:
    print(Fernet.generate_key().decode())
    return EXIT_OK


def cmd_encrypt_token(env: dict[str, str]) -> int:
    try:
        fernet = utils.load_fernet(env.get("FERNET_KEY"))
    except utils.KeyError_ as exc:
        print(f"courtbot encrypt-token: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    raw = getpass.getpass("Token (not echoed): ") if sys.stdin.isatty() else sys.stdin.read()
    token = raw.strip()
    if not token:
        print("courtbot encrypt-token: no token given on stdin", file=sys.stderr)
        return EXIT_INVALID
    if utils.CONTROL_RE.search(token):
        # tokens.json refuses what this would print (no header can carry it): say so now.
        print(
            "courtbot encrypt-token: the token holds a control character (a line break, tab, "
            "...), which cannot be sent in a header; give it as one line",
            file=sys.stderr,
        )
        return EXIT_INVALID
    print(fernet.encrypt(token.encode()).decode())
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python main.py",
        description="courtbot: books tennis courts the instant the booking window opens.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="the daemon (default)")
    sub.add_parser("check", help="validate schedules.json and tokens.json, show next instances")
    status = sub.add_parser(
        "status", help="a summary (daemon, next bookings, last 7 days) and the instances"
    )
    status.add_argument("--json", action="store_true", help="one JSON array (no summary)")
    status.add_argument("--schedule", metavar="ID", help="only this schedule's instances")
    which = status.add_mutually_exclusive_group()
    which.add_argument("--status", choices=models.STATUSES, help="only instances in this status")
    which.add_argument(
        "--upcoming", action="store_true", help="only instances still to book (pending, booking)"
    )
    status.add_argument(
        "--limit", metavar="N", type=_positive_int, help="the first N instances (soonest trigger)"
    )
    status.add_argument(
        "--daemons",
        action="store_true",
        help="the daemons on the database instead (active and standbys; with --json, an array)",
    )
    retry = sub.add_parser("retry", help="put failed instances still ahead back to pending")
    retry.add_argument("target", metavar="KEY_OR_SCHEDULE_ID")
    cancel = sub.add_parser("cancel", help="cancel a booked instance at the club")
    cancel.add_argument("key", metavar="KEY")
    sub.add_parser("reload", help="send SIGHUP to the running daemon")
    sub.add_parser("health", help="exit 0 while the running daemon's heartbeat is fresh")
    sub.add_parser("generate-key", help="print a new Fernet key")
    sub.add_parser("encrypt-token", help="encrypt a token read on stdin for tokens.json")
    dry = sub.add_parser(
        "dry-run", help="run the next instance's preparation steps (a login) against the club now"
    )
    dry.add_argument("schedule_id", metavar="SCHEDULE_ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        # `status | head`: the reader has gone. End quietly, as Python's own CLIs do (json.tool
        # exits with the errno), and keep the interpreter's final flush from complaining.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return exc.errno or 1
    return code


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    command = args.command or "run"
    if command == "run":
        return cmd_run(env)
    setup_logging(None, level="WARNING")
    if command == "check":
        return cmd_check(env)
    if command == "status":
        return cmd_status(env, args, sys.stdout)
    if command == "retry":
        return cmd_retry(env, args.target)
    if command == "cancel":
        return cmd_cancel(env, args.key)
    if command == "reload":
        return cmd_reload(env)
    if command == "health":
        return cmd_health(env)
    if command == "generate-key":
        return cmd_generate_key()
    if command == "dry-run":
        return cmd_dry_run(env, args.schedule_id, sys.stdout)
    return cmd_encrypt_token(env)


if __name__ == "__main__":
    sys.exit(main())
