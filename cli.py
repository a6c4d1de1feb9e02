"""courtbot: book tennis courts the instant the club's booking window opens.

The commands of CONTRACT section 1: argument parsing, printing, exit codes. ``run`` starts the
daemon (daemon.py: its whole life). ``python main.py`` runs it; main.py is only the entry point,
kept small (see there why).
"""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, MultiFernet

import config_loader
import instances
import leader
import models
import report
import utils
import watchdog
from clubclock import ClockError
from config_loader import Config, Entry, Settings, SettingsError
from datadir import StartError, cannot_write, check_data_dir, daemon_running, start_failure
from logs import setup_logging
from notify import (
    Notifier,
    NotifyConfigError,
    NotifySettings,
    send_test,
    validate_notify_urls,
)
from template import (
    Flow,
    TemplateError,
    default_flow,
    describe_booking,
    describe_flow,
)

# daemon, bot and club_client are imported in the commands that use them (run, dry-run, cancel,
# clock): with the scheduler and HTTP stack they were a third of every other command's start.
if TYPE_CHECKING:
    import bot

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_CANNOT_START = 2
CHECK_INSTANCES = 5
#: How long ``reload`` waits for the load its signal asked for (CONTRACT section 1).
RELOAD_WAIT_SECONDS = 30

# --------------------------------------------------------------------------- settings


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


# --------------------------------------------------------------------------- commands


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
    gc.disable()  # as main.py imports the rest: its passes over these took 40 ms
    from daemon import Daemon  # noqa: PLC0415 (only the commands that use it pay for it)

    gc.enable()
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


def _print_check(
    config: Config, settings: Settings, now: datetime, statuses: dict[str, str]
) -> None:
    """Each entry, its next instances and its request. ``statuses``: the database's status of
    instances whose window is open (one already booked is not booked again)."""
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
            if trigger <= now and entry.enabled:
                status = statuses.get(entry.slot(start).key, models.PENDING)
                at_once = status in (models.PENDING, models.CANCELLED)
                line += f" (window open: {'books at once when loaded' if at_once else status})"
            print(line)
            note = utils.describe_wall_clock_issue(wall, zone)
            if note:
                print(f"    warning: {note}")
        if pairs:
            for line in entry.describe_wishes(pairs[0][1]):
                print(f"  {line}")
        flow = _flow_of(entry, config, settings)
        if flow is not None and pairs:
            described = describe_flow(flow, entry.slot(pairs[0][1]))
            if flow.single:
                print("  request (next instance, token masked):")
            else:
                print("  flow (next instance, secrets masked, extracted values as <step.value>):")
            print("    " + described.replace("\n", "\n    "))


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
    now = datetime.now(UTC)
    config = config_loader.read_config(settings, fernet, now)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    errors = [*config.errors, *config_loader.unreadable_by_daemon(settings)]
    try:
        notify_settings = NotifySettings.from_env(settings.env)
        errors += [f"NOTIFY_URLS: {p}" for p in validate_notify_urls(notify_settings.urls)]
        for line in notify_settings.describe():
            print(line)
    except NotifyConfigError as exc:
        errors.append(str(exc))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    for line in config.tokens.describe():
        print(line)
    _print_check(config, settings, now, _open_window_statuses(settings, now))
    lines, warnings = config.provenance(now)
    for line in lines:
        print(line)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if errors:
        many = len(errors) > 1
        print(
            f"\ninvalid: {len(errors)} problem{'s' if many else ''}; see the error"
            f"{'s' if many else ''} above",
            file=sys.stderr,
        )
        return EXIT_INVALID
    print("\nOK")
    return EXIT_OK


def _open_window_statuses(settings: Settings, now: datetime) -> dict[str, str]:
    """The database's status of instances whose window is open; {} without a database (check
    needs none, and never creates or changes it)."""
    try:
        engine = _open_existing_engine(settings)
    except models.DatabaseConnectError:
        return {}
    if engine is None:
        return {}
    try:
        return instances.open_window_statuses(models.session_factory(engine), now)
    except models.DBAPIError:
        return {}
    finally:
        engine.dispose()


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
        import bot  # noqa: PLC0415 (only the commands that use it pay for it)
        import club_client  # noqa: PLC0415

        client = club_client.ClubClient(timeout=settings.http_timeout)
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
        daemon_running(settings), age, daemons, stale_after=watchdog.HEARTBEAT_STALE_SECONDS
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
            load=_load_facts(load) if (load := instances.last_load(factory)) else None,
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
                engine, now=now, stale_after=timedelta(seconds=watchdog.HEARTBEAT_STALE_SECONDS)
            )
        json.dump([daemon_json(state) for state in states], out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write("\n".join(report.daemon_lines(daemon_facts(settings, engine, now))) + "\n")
    return EXIT_OK


def cmd_cancel(env: dict[str, str], key: str) -> int:
    """Cancel a booked instance at the club (CONTRACT 13): exit 0 when the club confirmed."""
    loaded = _settings_and_key(env, "cancel")
    if isinstance(loaded, int):
        return loaded
    settings, fernet = loaded
    import bot  # noqa: PLC0415 (only the commands that use it pay for it)

    try:
        factory = _open_existing_db(settings, upgrade=True)
        done, line = bot.cancel_instance(factory, fernet, key, settings, config_loader.cancel_flow)
    except models.DatabaseConnectError as exc:
        done, line = False, str(exc)
    print(line if done else f"courtbot cancel: {line}", file=sys.stdout if done else sys.stderr)
    return EXIT_OK if done else EXIT_INVALID


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
        print(f"the active daemon picks them up within {leader.LOOK_SECONDS:g} s")
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


def _load_facts(record: instances.LoadRecord) -> report.LoadFacts:
    return report.LoadFacts(
        record.at, record.reason, tuple(record.errors), record.summary, tuple(record.at_once)
    )


def cmd_reload(env: dict[str, str]) -> int:
    """SIGHUP to the daemon, then its load's result: the counts, what books at once and every
    error; exit 1 with errors, or when no load is seen within RELOAD_WAIT_SECONDS."""
    try:
        settings = load_settings(env)
        factory = _open_existing_db(settings)
    except (StartError, models.DatabaseConnectError) as exc:
        print(f"courtbot reload: {exc}", file=sys.stderr)
        return EXIT_INVALID
    pid = daemon_running(settings)
    if pid is None or factory is None:
        print(f"courtbot reload: no daemon runs on {settings.data_dir}", file=sys.stderr)
        return EXIT_INVALID
    before = instances.last_load(factory)
    try:
        os.kill(pid, signal.SIGHUP)
    except (ProcessLookupError, PermissionError) as exc:
        print(f"courtbot reload: cannot signal pid {pid}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    deadline = time.monotonic() + RELOAD_WAIT_SECONDS
    while (load := instances.last_load(factory, after=before.id if before else 0)) is None:
        if time.monotonic() > deadline or daemon_running(settings) != pid:
            print(
                f"courtbot reload: sent SIGHUP to pid {pid}, but no load finished within "
                f"{RELOAD_WAIT_SECONDS} s (a standby loads nothing until it is active): see the "
                "log",
                file=sys.stderr,
            )
            return EXIT_INVALID
        time.sleep(0.05)
    out, err = report.reload_lines(_load_facts(load), pid)
    print("\n".join(out))
    for line in err:
        print(line, file=sys.stderr)
    return EXIT_INVALID if load.errors else EXIT_OK


def cmd_notify_test(env: dict[str, str]) -> int:
    """One test message through every configured channel; each one's result."""
    try:
        results = send_test(Notifier(NotifySettings.from_env(env)))
    except NotifyConfigError as exc:
        print(f"courtbot notify-test: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if not results:
        print(
            "courtbot notify-test: no channel is configured: set SMTP_HOST and NOTIFY_EMAIL, "
            "or NOTIFY_URLS",
            file=sys.stderr,
        )
        return EXIT_INVALID
    for name, error in results:
        print(f"{name}: " + ("sent" if error is None else f"NOT sent: {error}"))
    return EXIT_OK if all(error is None for _, error in results) else EXIT_INVALID


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
    if age > watchdog.HEARTBEAT_STALE_SECONDS:
        print(f"courtbot health: heartbeat is {age:.0f} s old", file=sys.stderr)
        return EXIT_INVALID
    print(f"ok: heartbeat {age:.0f} s ago")
    return EXIT_OK


def cmd_clock(env: dict[str, str], club: str, out: IO[str]) -> int:
    """Measure the club's clock against ours now and print ``offset +412 ms ± 6 ms``."""
    try:
        settings = load_settings(env)
    except StartError as exc:
        print(f"courtbot clock: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    try:
        found = config_loader.club_file(settings, club)
    except TemplateError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INVALID
    flow, path = found.flow, found.label
    if flow.clock_url is None:
        print(
            f'club {club!r}: its file ({path}) has no "clock": add "clock": '
            '{"url": "<a harmless GET on its hosts>"}',
            file=sys.stderr,
        )
        return EXIT_INVALID
    import club_client  # noqa: PLC0415 (only the commands that use it pay for it)

    client = club_client.ClubClient(timeout=settings.http_timeout)
    try:
        measured = club_client.measure_club_clock(client, flow.clock_url)
    except ClockError as exc:
        print(f"club {club!r}: the club's clock could not be measured: {exc}", file=sys.stderr)
        return EXIT_INVALID
    finally:
        client.close()
    out.write(measured.text + "\n")
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


def program_name(argv0: str) -> str:
    """How the user called courtbot, for its usage lines: the installed ``courtbot`` command
    (pip or pipx, pyproject.toml's console script), else ``python main.py``."""
    return "courtbot" if os.path.basename(argv0) == "courtbot" else "python main.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name(sys.argv[0]),
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
    sub.add_parser("cancel", help="cancel a booked instance at the club").add_argument("key")
    sub.add_parser("reload", help="make the running daemon load the files; print the result")
    sub.add_parser("notify-test", help="send a test message through every channel")
    sub.add_parser("health", help="exit 0 while the running daemon's heartbeat is fresh")
    sub.add_parser("generate-key", help="print a new Fernet key")
    sub.add_parser("encrypt-token", help="encrypt a token read on stdin for tokens.json")
    dry = sub.add_parser(
        "dry-run", help="run the next instance's preparation steps (a login) against the club now"
    )
    dry.add_argument("schedule_id", metavar="SCHEDULE_ID")
    clock = sub.add_parser("clock", help="measure the club's clock against ours now")
    clock.add_argument("club", metavar="CLUB")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    gc.enable()  # main.py keeps it off while the modules are imported
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
    if command == "notify-test":
        return cmd_notify_test(env)
    if command == "health":
        return cmd_health(env)
    if command == "generate-key":
        return cmd_generate_key()
    if command == "dry-run":
        return cmd_dry_run(env, args.schedule_id, sys.stdout)
    if command == "clock":
        return cmd_clock(env, args.club, sys.stdout)
    return cmd_encrypt_token(env)


if __name__ == "__main__":
    sys.exit(main())
