"""The daemon's life: start (checks, locks, the database, the role), loads, the loop (signals,
reloads, heartbeat, the watchdog's looks and recovery), shutdown, the pid file. The start-up
checks and the lock files are ``datadir``'s, which the commands share.

``cli.cmd_run`` reads the settings and starts it; everything after that happens here.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import MultiFernet

import bot
import club_client
import config_loader
import heartbeat
import instances
import leader
import models
import rehearsal
import scheduler
import utils
import watchdog
from config_loader import Config, Settings
from datadir import (
    DaemonLocks,
    StartError,
    database_problem,
    overwrite_in_place,
    write_private,
)
from notify import Notifier, NotifyConfigError, NotifySettings
from template import Flow

logger = logging.getLogger("courtbot")

EXIT_OK = 0
#: The daemon stopped itself because its SQLite file was deleted or replaced under it: non-zero,
#: so that a supervisor restarts it (on the database written back at exit).
EXIT_DATABASE_LOST = 1
#: The daemon could not book for a minute and did not recover: its supervisor restarts it.
EXIT_NOT_WORKING = 3
#: A load's collection waits at most this long for a moment with no booking under way (s).
OWED_AT_MOST = 300.0
#: A load that adds or changes at least this many instances closes the idle database
#: connections afterwards (see Memory.give_back).
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
#: A load at start schedules first, and starts firing, what is due within this time (plus its
#: flow's preparation time), before it reconciles and schedules the rest.
SOONEST_FIRST = timedelta(minutes=3)


def log_summary(factory: models.SessionFactory, config: Config | None) -> None:
    """The line a start (or a takeover) ends with: the schedules, the pending instances and the
    next trigger."""
    entries = config.schedules.entries if config else []
    count, row = instances.pending_summary(factory)
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


# --------------------------------------------------------------------------- the daemon


class Daemon:
    """The running worker: owns the database, the scheduler, the club client and the loop.

    Its loads and the jobs that follow them are ``Loads``; the watchdog's looks and recovery are
    ``Recovery``; its role on the database is ``leader.Roles``; its lock files ``DaemonLocks``.
    """

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
        self.client = club_client.ClubClient(timeout=settings.http_timeout)
        self.roles = leader.Roles(settings.database_url)
        self.config: Config | None = None
        self.stop = threading.Event()
        self.load_lock = threading.Lock()
        self.locks = DaemonLocks(settings)
        self._signals_r: socket.socket | None = None
        self._signals_w: socket.socket | None = None
        self._running = False
        self._pid_written = False
        #: A reload asked for failed rehearsals to run again at the next look.
        self._rehearse_again = False
        #: Watches a SQLite file for its deletion under us; saves what it held at exit.
        self.guard: models.SqliteGuard | None = None
        self.database_lost: str | None = None
        self.exit_code = EXIT_OK
        self.pinger: heartbeat.Pinger | None = None
        self._last_beat: float | None = None  # time.monotonic() of the last heartbeat written
        #: The loads and the jobs that follow them (files, instances, retries, memory).
        self.loads = Loads(self)
        self.memory = Memory(self)
        self.horizon = Horizon(self)
        #: CONTRACT section 9, never silently: looked at every second by the loop.
        self.recovery = Recovery(self)

    # -- start-up -----------------------------------------------------------------------

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
        self.locks.acquire()
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
            fence=self.roles.fence(),
            proves=self.roles.lead.proves,
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
        self.recovery.reset()

        now = datetime.now(UTC)
        # On a shared database the claims of a former active daemon were taken over by the
        # lease's rules already (Roles); alone, what a crash left in ``booking`` is recovered.
        retried, unknown = (
            ([], [])
            if self.roles.shared
            else instances.recover_in_flight(
                self.factory, now, live_owners=self.roles.live_owners(self.factory)
            )
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
        self.loads.load(reason=reason)
        if not self.ctx.may_send.is_set():
            return  # lost the role meanwhile: the loop steps down
        if not self.scheduler.running:  # a load that stopped short of its soonest-first part
            self.scheduler.start()
        self.roles.beat(self)
        self.write_pid()
        self.heartbeat()
        self.memory.collect_owed()  # the load's collection, now that the daemon is ready
        assert self.factory is not None
        log_summary(self.factory, self.config)
        self.safe_warn_expiring_tokens()
        if settings.heartbeat_url is not None and self.pinger is None:
            self.pinger = heartbeat.Pinger(settings.heartbeat_url, healthy=self.is_healthy)
            self.pinger.start()

    def write_pid(self) -> None:
        """``bot.pid``: this daemon is loaded (active) or waits (standby); it removes it."""
        write_private(self.settings.pid_path, f"{os.getpid()}\n")
        self._pid_written = True
        self._running = True

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
            with self.load_lock:
                self.sync({key})

    def topup(self, schedule_ids: Sequence[str] | None = None) -> None:
        """Keep recurring entries at their full count of future instances (``Loads.topup``)."""
        self.loads.topup(schedule_ids)

    def rehearse(self, *, again: bool = False) -> None:
        """Run the rehearsals due now (``rehearsal.run``; ``again``: after a reload)."""
        ctx = self.ctx
        if ctx is None or self.stop.is_set() or not ctx.may_send.is_set():
            return
        again, self._rehearse_again = again or self._rehearse_again, False
        rehearsal.run(ctx, self.notifier, self.settings.rehearse_hours, again=again)

    def extend(self) -> None:
        """The jobs' horizon moves on (``Horizon.extend``)."""
        if not self.stop.is_set() and self.roles.is_active:
            self.horizon.extend()

    def _booked(self, schedule_id: str) -> None:
        self.topup([schedule_id])

    def sync(self, keys: Collection[str] | None = None) -> scheduler.SyncReport:
        """The jobs follow the pending instances (``Loads.sync``; Roles calls it)."""
        return self.loads.sync(keys)

    def reset_watch(self) -> None:
        """The watchdog forgets the scheduler that is gone (``Recovery.reset``; Roles too)."""
        self.recovery.reset()

    # -- the loop -----------------------------------------------------------------------

    def heartbeat(self, state: str | None = None) -> None:
        """The beat `health` reads, with the watchdog's state (or ``state``: what keeps this
        daemon from booking, e.g. a lost lease). On a full disk the file is rewritten in place
        (always the same length: no new block needed)."""
        text = watchdog.heartbeat_text(time.time(), state or self.recovery.watchdog.health())
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
            and time.monotonic() - beat < watchdog.HEARTBEAT_STALE_SECONDS
            and self.recovery.watchdog.health() is None
        )

    # -- tokens that expire before a booking ----------------------------------------------

    def safe_warn_expiring_tokens(self) -> None:
        try:
            warn_expiring_tokens(self, datetime.now(UTC))
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
        next_beat = time.monotonic() + watchdog.HEARTBEAT_SECONDS
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
            self.memory.collect_owed()  # a load's collection left for later (standby too)
            if self.roles.tick(self, signals):
                continue  # a standby: no reload, no heartbeat of an active daemon
            if signal.SIGHUP in signals:
                logger.info("SIGHUP received: reloading")
                self.safe_load("SIGHUP")
                # A user who fixed something sees failed rehearsals run again at once.
                self._rehearse_again = True
                if self.scheduler is not None:
                    self.scheduler.rehearse_soon()
            now = time.monotonic()
            if now >= next_watch:
                next_watch = now + watchdog.INTERVAL
                self.recovery.watch()
            if now >= next_check:
                next_check = now + self.settings.reload_interval
                if self.config_changed():
                    logger.info("config files changed: reloading")
                    self.safe_load("file change")
                self.safe_warn_expiring_tokens()
            if now >= next_beat:
                next_beat = now + watchdog.HEARTBEAT_SECONDS
                self.heartbeat()
            if now >= next_retries:
                next_retries = now + RETRY_CHECK_SECONDS
                self.loads.safe_pick_up_retries()

    def safe_load(self, reason: str) -> None:
        try:
            self.loads.load(reason=reason)
        except Exception as exc:
            logger.exception("reload (%s) failed; the last good state stays", reason)
            failed = f"reload ({reason}) failed ({type(exc).__name__}): the last good state stays"
            self.loads.record(reason, "not loaded", [f"{failed}; the log has the traceback"])

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
        gc.unfreeze()  # what the start froze is the collector's again (see Memory.give_back)
        self._close_guard()
        self._remove_pid_file()
        self.locks.release()
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


# --------------------------------------------------------------------------- loads and jobs


class Loads:
    """A daemon's loads and the jobs that follow them: the files read, validated and reconciled
    (at start, SIGHUP, a changed file), the top-ups, the retries picked up, and the memory given
    back after each."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._entry_cache = config_loader.EntryCache()
        self._retries_failing = False
        #: The database as pick_up_retries last read the wakeups (see _database_stamp).
        self._retry_stamp: tuple[tuple[int, int] | None, ...] | None = None
        self._retry_looked = -math.inf
        self._last_errors: list[str] = []  # the last load's, for a reload that changes nothing
        self._sync_lock = threading.RLock()

    def load(self, *, reason: str) -> bool:
        """Read, validate and reconcile the config files; jobs follow. Returns False when a
        file was rejected whole (the last good state stays)."""
        daemon = self.daemon
        assert (
            daemon.factory is not None and daemon.scheduler is not None and daemon.ctx is not None
        )
        with daemon.load_lock, daemon.memory.paused():
            started = time.perf_counter()
            now = datetime.now(UTC)
            if reason != "start" and not daemon.config_changed():
                # Same files: nothing to validate, reconcile or schedule, and no table is read
                # (what a `retry` changes reaches the jobs through pick_up_retries).
                logger.info(
                    "config unchanged (%s), checked in %.1f ms",
                    reason,
                    (time.perf_counter() - started) * 1000,
                )
                self.record(reason, "config unchanged since the last load", self._last_errors)
                return True
            first = reason == "start" or daemon.config is None
            known = instances.token_names(daemon.factory)
            config = config_loader.read_config(
                daemon.settings,
                daemon.fernet,
                now,
                known_tokens=known,
                last_template=daemon.template,
                cache=self._entry_cache,
            )
            # At start every job gets a look, and when a flow's preparation time changed (its
            # club's jobs move); otherwise only those of the instances the load changed.
            full_sync = self._use_flows_and_leads(config) or first
            for error in config.errors:
                logger.error("%s", error)
            for warning in config.warnings:
                logger.warning("%s", warning)
            self._write_back_tokens(config)
            unchanged = self._unchanged_entries(config) if not first else frozenset()
            early = first and not daemon.scheduler.running
            if early:
                self._soonest_first(config, now)
            changes = instances.reconcile(
                daemon.factory, config, now=now, unchanged=unchanged, batched=early
            )
            daemon.ctx.withdraw(changes.keys)  # a booking preparing for one it cancelled stops
            # Read before the jobs follow: once they do, these are claimed and under way.
            at_once = instances.at_once(daemon.factory, changes.keys, now)
            whole_ok = config.schedules.file_error is None
            if whole_ok or daemon.config is None:
                daemon.config = config
            elif config.tokens.file_error is None:
                daemon.config = Config(daemon.config.schedules, config.tokens, config.digest)
            else:
                daemon.config = Config(daemon.config.schedules, daemon.config.tokens, config.digest)
            report = self.sync(None if full_sync else changes.keys)
            if early:
                # The scheduler started before the rest of the load, and its first look for
                # due rehearsals with it: look again now that every instance is there.
                daemon.scheduler.rehearse_soon()
            elapsed = (time.perf_counter() - started) * 1000
            summary = self._load_summary(config, changes, report)
            ok = whole_ok and config.tokens.file_error is None
            touched, errors = len(changes.keys), config.errors
            del config, changes  # what the load made is garbage now: give it back
            given_back = daemon.memory.give_back(start=first, touched=touched, full=full_sync)
            logger.info(
                "config loaded (%s) in %.1f ms (then %.1f ms giving memory back): %s",
                reason,
                elapsed,
                given_back,
                summary,
            )
            for line in at_once:
                logger.info("%s", line)
            self.record(reason, summary, errors, at_once)
            return ok

    def record(
        self, reason: str, summary: str, errors: Sequence[str], at_once: Sequence[str] = ()
    ) -> None:
        """Keep a load's result for `reload` and `status` (CONTRACT section 1). A failure to
        is logged; the load stands."""
        self._last_errors = list(errors)
        try:
            assert self.daemon.factory is not None
            instances.record_load(
                self.daemon.factory,
                at=datetime.now(UTC),
                reason=reason,
                pid=os.getpid(),
                summary=summary,
                errors=errors,
                at_once=at_once,
            )
        except Exception:
            logger.exception("the load's result could not be kept for `reload` and `status`")

    def _write_back_tokens(self, config: Config) -> None:
        """Plaintext tokens encrypted in tokens.json, in place (CONTRACT section 5)."""
        settings = self.daemon.settings
        if config.tokens.file_error is None and config.tokens.raw is not None:
            config_loader.rewrite_tokens_file(settings.tokens_path, config.tokens)
            config_loader.secure_file_mode(settings.tokens_path)
            if config.tokens.written is not None:
                # Our own rewrite is no change for the file check to reload on.
                written = config_loader.content_digest(config.tokens.written)
                config.digest[str(settings.tokens_path)] = written

    def _soonest_first(self, config: Config, now: datetime) -> None:
        """The first part of a load at start: what is due soon (or overdue) gets its job and
        the scheduler starts, so that a trigger during the rest of the load (52,000 instances
        take seconds) is met on time, and one that passed is booked at once."""
        daemon = self.daemon
        assert daemon.factory is not None and daemon.scheduler is not None
        assert daemon.ctx is not None
        leads = self._club_prepare_seconds({None, *daemon.ctx.clubs})
        until = now + SOONEST_FIRST + timedelta(seconds=max(leads.values(), default=0.0))
        due = instances.due_by(daemon.factory, config, now=now, until=until)
        if due:
            self.sync(set(due))
        daemon.scheduler.start()
        logger.info(
            "soonest first: %d instance(s) due by %s scheduled before the rest of the load",
            len(due),
            utils.format_utc(until),
        )

    def _unchanged_entries(self, config: Config) -> frozenset[str]:
        """Entries exactly as last time: they need no reconciling (their horizon is the
        top-up's job). At start there are none, as the window setting may have changed."""
        daemon = self.daemon
        assert daemon.config is not None
        before = {e.id: e.fingerprint for e in daemon.config.schedules.entries}
        return frozenset(
            e.id for e in config.schedules.entries if before.get(e.id) == e.fingerprint
        )

    def _load_summary(
        self, config: Config, changes: instances.Changes, report: scheduler.SyncReport
    ) -> str:
        """What a load did, for its log line."""
        daemon = self.daemon
        assert daemon.config is not None
        kept = ""
        if config.schedules.file_error is not None or config.tokens.file_error:
            kept = "; kept last good config"
        if changes.entries_changed:
            kept = f"; entries changed: {', '.join(sorted(changes.entries_changed))}" + kept
        return (
            f"{len(daemon.config.schedules.entries)} schedule(s) "
            f"({self._entry_cache.validated} validated), {len(config.errors)} error(s); "
            f"instances: {changes.summary()}; jobs: {report.added} added, {report.moved} "
            f"moved, {report.removed} removed{kept}"
        )

    def _use_flows_and_leads(self, config: Config) -> bool:
        """``_use_flows``; True when a flow's preparation time changed with it (the jobs of
        its club start that much earlier or later now)."""
        daemon = self.daemon
        assert daemon.ctx is not None
        clubs: set[str | None] = {None, *daemon.ctx.clubs}
        leads = self._club_prepare_seconds(clubs)
        self._use_flows(config)
        clubs |= set(daemon.ctx.clubs)
        return self._club_prepare_seconds(clubs) != {c: leads.get(c, 0.0) for c in clubs}

    def _use_flows(self, config: Config) -> None:
        """Put the loaded template and club files in the booking context. An invalid template
        or club file keeps its last good version (its errors are logged with the rest)."""
        daemon = self.daemon
        assert daemon.ctx is not None
        if config.template_error is not None:
            config.template_error += "; the last good template stays"
        elif daemon.template is not None and config.template != daemon.template:
            logger.info("request template reloaded")
        daemon.template = config.template
        daemon.ctx.template = config.template.flow if config.template is not None else None
        loaded = {name: club.flow for name, club in config.clubs.items()}
        for name in sorted(config.schedules.club_errors):
            if name in daemon.ctx.clubs:
                logger.warning("club %r: its last good file stays in use", name)
        changed = sorted(n for n, flow in loaded.items() if daemon.ctx.clubs.get(n) != flow)
        if changed:
            logger.info("club file(s) loaded: %s", ", ".join(changed))
        # Never dropped: instances kept as they were (a rejected entry's) still book with them.
        daemon.ctx.clubs = {**daemon.ctx.clubs, **loaded}

    def sync(self, keys: Collection[str] | None = None) -> scheduler.SyncReport:
        """Make the jobs follow the pending instances due within the horizon
        (``scheduler.HORIZON``): those of ``keys`` (what a load or a `retry` changed), or with
        None every one (at start, and at each look of the horizon as it moves on). One sync at
        a time, what it read and what it writes together: the horizon's look runs in the
        scheduler's thread, the active role's look for changes made elsewhere in the loop's."""
        daemon = self.daemon
        assert (
            daemon.factory is not None and daemon.scheduler is not None and daemon.ctx is not None
        )
        with self._sync_lock:
            daemon.roles.before_sync(daemon.factory)
            daemon.recovery.jobs_changed()  # the watchdog reads the earliest trigger again
            busy = daemon.ctx.under_way()
            horizon = scheduler.horizon_end()
            if keys is not None:
                pending = instances.pending_triggers(daemon.factory, keys, until=horizon)
                prepare = self._prepare_seconds(pending)
                return daemon.scheduler.sync_keys(pending, keys, busy=busy, prepare=prepare)
            # Everything: every wakeup recorded so far is covered (read before, cleared after).
            handled = instances.wakeups(daemon.factory)
            pending = instances.pending_triggers(daemon.factory, until=horizon)
            prepare = self._prepare_seconds(pending)
            report = daemon.scheduler.sync(pending, busy=busy, prepare=prepare)
            if handled:
                instances.clear_wakeups(daemon.factory, handled[-1][0])
            daemon.horizon.covered_until = horizon
            return report

    def pick_up_retries(self) -> int:
        """Schedule the instances that a `retry` (from this host or another) put back to
        pending, and only those. Called about every second: when there are none it is one read
        of an empty table. Returns how many were picked up."""
        daemon = self.daemon
        assert daemon.factory is not None
        with daemon.load_lock:
            stamp, now = self._database_stamp(), time.monotonic()
            if (
                stamp is not None
                and stamp == self._retry_stamp
                and now - self._retry_looked < RETRY_LOOK_AT_LEAST_SECONDS
            ):
                return 0  # the SQLite file is as it was at the last look: no new wakeup
            found = instances.wakeups(daemon.factory)
            self._retry_stamp, self._retry_looked = stamp, now
            if not found:
                return 0
            keys = {key for _, key in found}
            report = self.sync(keys)
            instances.clear_wakeups(daemon.factory, found[-1][0])
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
        path = models.sqlite_path(self.daemon.settings.database_url)
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

    def _prepare_seconds(
        self, pending: Mapping[str, datetime], clubs: Mapping[str, str] | None = None
    ) -> dict[str, float]:
        """How long before its trigger each of these scheduled instances' flow prepares (a
        login): its job starts that much earlier. ``clubs``: their clubs when already read.
        Instances without preparation are left out."""
        daemon = self.daemon
        assert daemon.factory is not None
        if clubs is None:
            clubs = instances.pending_clubs(daemon.factory, pending.keys())
        by_club = self._club_prepare_seconds({None, *clubs.values()})
        prepare = {key: by_club[clubs.get(key)] for key in pending}
        return {key: value for key, value in prepare.items() if value}

    def _club_prepare_seconds(self, clubs: Collection[str | None]) -> dict[str | None, float]:
        """Each club's preparation time (None: the template's or section 6's request)."""
        daemon = self.daemon
        assert daemon.ctx is not None
        ctx = daemon.ctx

        def seconds(club: str | None) -> float:
            try:
                return ctx.flow_for(club).prepare_seconds
            except KeyError:
                return 0.0  # nothing to book with: the booking says so at its trigger

        return {club: seconds(club) for club in clubs}

    def topup(self, schedule_ids: Sequence[str] | None = None) -> None:
        """Keep recurring entries at their full count of future instances."""
        daemon = self.daemon
        assert daemon.factory is not None
        with daemon.load_lock:
            if daemon.config is None or daemon.stop.is_set() or not daemon.roles.is_active:
                return
            recurring = [e.id for e in daemon.config.schedules.entries if e.rule is not None]
            ids = [i for i in (schedule_ids or recurring) if i in recurring]
            if not ids:
                return
            changes = instances.reconcile(
                daemon.factory, daemon.config, now=datetime.now(UTC), only=ids
            )
            if daemon.ctx is not None:
                daemon.ctx.withdraw(changes.keys)
            if not changes.empty:
                self.sync(changes.keys)
                logger.info("top-up of %s: %s", ", ".join(ids), changes.summary())


# --------------------------------------------------------------------------- the jobs' horizon


class Horizon:
    """The jobs' horizon (``scheduler.HORIZON``): its look every ``HORIZON_INTERVAL``, and how
    far ahead the jobs were last made whole, for the watchdog: a look that keeps failing is a
    problem long before the triggers it should have covered come."""

    #: Looks failing this long make the watchdog report it (and recover, or give up).
    FAILING_AT_MOST = timedelta(hours=1)

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        #: The horizon's end at the last full sync (None: none yet in this active period).
        self.covered_until: datetime | None = None
        self._error: str | None = None

    def extend(self) -> None:
        """The horizon moves on: the pending instances that came within it get their jobs (a
        full sync, which also puts right any job that strayed from its instance)."""
        try:
            with self.daemon.load_lock:
                report = self.daemon.loads.sync()
        except Exception as exc:  # noqa: BLE001 (the next look, or the watchdog, tries again)
            self._error = models.error_text(exc)
            logger.warning(
                "jobs for the triggers coming within %s could not be added (%s): tried again in %s",
                utils.format_span(scheduler.HORIZON.total_seconds()),
                self._error,
                utils.format_span(scheduler.HORIZON_INTERVAL.total_seconds()),
            )
            return
        self._error = None
        logger.debug(
            "horizon moved on: jobs %d added, %d moved, %d removed",
            report.added,
            report.moved,
            report.removed,
        )

    def problem(self, now: datetime) -> str | None:
        """Why the jobs no longer reach as far ahead as they should, or None."""
        covered = self.covered_until
        if covered is None or covered - now >= scheduler.HORIZON - self.FAILING_AT_MOST:
            return None
        why = f": {self._error}" if self._error else ""
        last = utils.format_ahead(covered - scheduler.HORIZON, now)
        return (
            f"the jobs of the triggers ahead were last added {last} (up to "
            f"{utils.format_utc(covered)}){why}"
        )


# --------------------------------------------------------------------------- memory


class Memory:
    """What a daemon's loads leave behind, given back to the system (see ``give_back``)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._frozen = False
        #: A load's collection left for the loop (a booking was under way), and whether it is
        #: the start's (which freezes what lives on); since when (monotonic).
        self._owed: bool | None = None
        self._owed_since = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No automatic garbage collection meanwhile (a load): a load of 52,000 instances makes
        millions of objects, and the collector's passes over those still alive took a
        twentieth of its time. It comes back on after, or when a collection left for later
        (``give_back``) is done: until then one of its passes could fall at a trigger too."""
        gc.disable()
        try:
            yield
        finally:
            if self._owed is None:
                gc.enable()

    def give_back(self, *, start: bool = False, touched: int = 0, full: bool = False) -> float:
        """After a load: collect its garbage and hand the heap's free memory back to the
        system, so that the daemon rests small whatever its loads have been; after the start, a
        full job sync or a load that touched many instances, close the idle database
        connections too (with what they cached). Returns the milliseconds it took.

        After the process's first load everything then alive is moved out of the collector's
        sight (``gc.freeze``): the libraries' tens of thousands of objects live as long as the
        process, and the full collection after a reload then looks only at what came after
        (well under a millisecond instead of about 15). Not again later: what a booking under
        way holds would be frozen with it. A small reload keeps the connections: closing
        SQLite's last one checkpoints its WAL (an fsync, about 10 ms) for a few KB.

        The collection holds the interpreter for up to a tenth of a second after a large load:
        while a booking is under way (waiting for its trigger, sending) it is left to the loop,
        which does it once none is (``collect_owed``). The start's waits too, for the pid file:
        the daemon is ready without it."""
        daemon = self.daemon
        assert daemon.engine is not None
        started = time.perf_counter()
        closed = start or full or touched >= CLOSE_CONNECTIONS_AFTER
        if closed:
            models.close_idle_connections(daemon.engine)
        connections = "closed" if closed else "kept (a small change)"
        if start or self._bookings_under_way():
            if self._owed is None:
                self._owed_since = time.monotonic()
            self._owed = bool(self._owed) or start
            took = (time.perf_counter() - started) * 1000
            logger.debug(
                "memory given back in %.1f ms: idle database connections %s; the collection "
                "waits until the daemon is ready and no booking is under way",
                took,
                connections,
            )
            return took
        collected, heap = self._collect(freeze=bool(self._owed))  # a start's waits (above)
        took = (time.perf_counter() - started) * 1000
        logger.debug(
            "memory given back in %.1f ms: %d object(s) collected, idle database connections %s, "
            "heap %s",
            took,
            collected,
            connections,
            heap,
        )
        return took

    def collect_owed(self) -> None:
        """The loop, every second: the collection a load left, once no booking is under way,
        or after ``OWED_AT_MOST`` whatever happens (a daemon with many bookings, or flows
        that prepare for long, may seldom have none)."""
        if self._owed is None:
            return
        quiet = not self._bookings_under_way()
        if quiet or time.monotonic() - self._owed_since > OWED_AT_MOST:
            # Never freezing what a booking under way holds (it would never be collected).
            collected, heap = self._collect(freeze=self._owed and quiet)
            logger.debug(
                "memory given back after the load: %d object(s) collected, heap %s", collected, heap
            )

    def _collect(self, *, freeze: bool) -> tuple[int, str]:
        """The full collection (and the freeze after the start), then the heap's trim."""
        collected = gc.collect()
        if freeze and not self._frozen:
            gc.freeze()
            self._frozen = True
        self._owed = None
        gc.enable()
        trimmed = trim_heap()
        return collected, "trimmed" if trimmed else "not trimmable here (no glibc)"

    def _bookings_under_way(self) -> bool:
        ctx = self.daemon.ctx
        return ctx is not None and bool(ctx.under_way())


# --------------------------------------------------------------------------- the watchdog


class Recovery:
    """The watchdog's side of a daemon (CONTRACT section 9, never silently): once a second it
    notices a wall-clock jump, a scheduler that cannot fire or a trigger overdue, says so, and
    restarts and re-syncs the scheduler; after a minute of failing the daemon stops."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
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

    def jobs_changed(self) -> None:
        """The jobs changed (a sync): the earliest pending trigger is read again."""
        self._jobs_changed += 1
        self._next_due_read = None

    def reset(self) -> None:
        """Forget what the watchdog saw of a scheduler that is gone (a period as the active
        daemon ended or begins): a standby has none, a new one gets its own looks."""
        self.watchdog = watchdog.Watchdog(give_up_after=self.watchdog.give_up_after)
        self.overdue = watchdog.Overdue()
        self._restarted = None
        self._next_due_read = None
        self.daemon.horizon.covered_until = None  # the new period's first load covers it

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
                    self.daemon.heartbeat()
                return
            if not self._report(problem):
                return
        self._restarted = self._recover()

    def _find_problem(self) -> str | None:
        """What keeps the daemon from booking now (None: nothing)."""
        daemon = self.daemon
        assert (
            daemon.scheduler is not None and daemon.factory is not None and daemon.ctx is not None
        )
        problem = daemon.scheduler.problem() or daemon.horizon.problem(datetime.now(UTC))
        if problem is not None:
            return problem
        try:
            late = self._late()
        except models.DatabaseError as exc:
            return f"the database cannot be read ({models.error_text(exc)})"
        busy = daemon.ctx.under_way()
        overdue = self.overdue.check(key for key in late if key not in busy)
        return watchdog.describe_overdue(overdue) if overdue else None

    def _late(self) -> list[str]:
        """The pending instances whose job should have started LATE_AFTER ago (a job starts LEAD
        before its trigger). The instances are asked only once the earliest pending trigger, as
        last read, is that close; it is read again after each change to the jobs, and at least
        every NEXT_DUE_REFRESH seconds whatever happens."""
        daemon = self.daemon
        assert daemon.factory is not None
        before = datetime.now(UTC) + scheduler.LEAD - timedelta(seconds=watchdog.LATE_AFTER)
        read = self._next_due_read
        if (
            read is not None
            and time.monotonic() - read < watchdog.NEXT_DUE_REFRESH
            and (self._next_due is None or self._next_due >= before)
        ):
            return []
        changes = self._jobs_changed
        late = instances.overdue(daemon.factory, before)
        self._next_due_read = None
        if not late:
            next_due = instances.next_trigger(daemon.factory)
            if changes == self._jobs_changed:  # no sync meanwhile (a top-up's, in its thread)
                self._next_due, self._next_due_read = next_due, time.monotonic()
        return late

    def _recover(self) -> str | None:
        """Restart the scheduler and re-sync its jobs from the instances, once the database takes
        writes. Returns what was done, or None (the watchdog told why) while it cannot be.
        Recovered is what the next look says: an overdue booking still not started is still a
        problem (and the time toward giving up runs on)."""
        daemon = self.daemon
        assert daemon.scheduler is not None and daemon.engine is not None
        with daemon.load_lock:
            # Fresh connections for the probe and all after it: a SQLite connection opened while
            # the file could not be written stays read-only for its life (and one to PostgreSQL
            # may be dead), however healthy the database is again.
            models.close_idle_connections(daemon.engine)
            try:
                daemon.scheduler.probe_write()
            except Exception as exc:  # noqa: BLE001 (whatever the driver says, try again)
                self._report(f"the database cannot be written ({models.error_text(exc)})")
                return None
            try:
                daemon.scheduler.restart()
                report = daemon.loads.sync()
                daemon.scheduler.start()
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
        daemon = self.daemon
        going_on = self.watchdog.report(problem)
        if not going_on:
            daemon.exit_code = EXIT_NOT_WORKING
            daemon.stop.set()
        daemon.heartbeat()
        return going_on

    def _clock_jumped(self, jump: float) -> None:
        """APScheduler sleeps on a wait computed from the wall clock: wake it to look again."""
        daemon = self.daemon
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
        assert daemon.scheduler is not None
        daemon.scheduler.wakeup()
        if jump > 0:
            daemon.scheduler.extend_soon()  # triggers it brought within the horizon, or passed
        self.overdue.forget()


# --------------------------------------------------------------------------- helpers


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


def warn_expiring_tokens(daemon: Daemon, now: datetime) -> list[str]:
    """Report, once per token and expiry, a JWT that expires before the trigger of a pending
    booking, when that trigger is within TOKEN_NOTICE_AHEAD (an email and a channel
    message, days before it would fail with a 401). Returns the tokens reported now."""
    assert daemon.factory is not None and daemon.notifier is not None
    reported = []
    for name, expires in sorted(instances.token_expiries(daemon.factory, daemon.fernet).items()):
        count, first = instances.pending_from(daemon.factory, name, expires)
        if first is None or first.trigger_time - now > TOKEN_NOTICE_AHEAD:
            continue
        if not instances.remember_notice(
            daemon.factory, f"token-expiry:{name}:{expires.timestamp():.0f}", now
        ):
            continue
        daemon.notifier.notify_warning(
            f"token {name!r}", *_token_expiry_message(name, expires, count, first, now)
        )
        reported.append(name)
    return reported


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
