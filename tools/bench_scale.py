"""``python tools/bench.py scale`` (``make bench-scale``): the daemon with many recurring schedules,
on SQLite and on PostgreSQL.

For 100 and 1,000 weekly schedules (5,200 and 52,000 instances) on each database, the real daemon
(``python main.py run``, its own scratch DATA_DIR) starts from an empty database: seconds from
launch to its pid file (ready: every instance in the database, and a job in the store for each
due within the jobs' horizon), the cold load as the daemon logs it, a no-op SIGHUP reload, a
SIGHUP after one entry's time is edited (both as the daemon logs them), and its RSS after those.
PostgreSQL is the suite's throwaway server (tests/pg_server.py: Debian's server binaries), a
fresh database for each run, on 127.0.0.1.

Progress goes to stderr; the figures go to stdout as a table (Markdown, for the Performance
page, docs/performance.md). Exit status 0 unless PostgreSQL cannot start (then its rows say why).
"""

from __future__ import annotations

import math
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import (
    LOAD_DAYS_AHEAD,
    REPO,
    BenchError,
    Daemon,
    daemons,
    kill_children,
    progress,
    timed_reload,
)

SCHEDULE_COUNTS = (100, 1000)
INSTANCES_PER_SCHEDULE = 52
#: A cold load of 52,000 instances takes tens of seconds on a loaded 2-core machine.
SCALE_TIMEOUT = 300.0
#: No trigger comes within a run (the first is days ahead): nothing is ever sent to this URL.
CLUB_URL = "http://127.0.0.1:9/bookings"
_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


@dataclass
class Run:
    """The figures of one database and schedule count (None: not measured)."""

    database: str
    schedules: int
    instances: int | None = None
    ready_s: float | None = None
    cold_ms: float | None = None
    noop_ms: float | None = None
    edit_ms: float | None = None
    rss_mb: float | None = None
    error: str | None = None


def scale_entries(count: int, start_day: datetime, *, edit: bool = False) -> list[dict[str, Any]]:
    """``count`` weekly entries (ids distinct, times every 5 minutes from 05:00, weekdays in
    turn); with ``edit``, the first one 2 minutes later."""
    entries = []
    for i in range(count):
        minutes = 5 * 60 + (i % 200) * 5 + (2 if edit and i == 0 else 0)
        entries.append(
            {
                "id": f"s{i:04d}",
                "type": "recurring",
                "desired_time": f"{start_day:%Y-%m-%d} {minutes // 60:02d}:{minutes % 60:02d}",
                "rrule": f"FREQ=WEEKLY;BYDAY={_DAYS[i % 7]}",
                "timezone": "Europe/London",
                "court_id": str(i % 8 + 1),
            }
        )
    return entries


def pending_count(url: str) -> int:
    from sqlalchemy import func, select

    import models
    from models import PENDING, Instance

    engine = models.make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                select(func.count()).select_from(Instance).where(Instance.status == PENDING)
            ).scalar()
        return int(found or 0)
    finally:
        engine.dispose()


def measure(root: Path, run: Run, url: str | None) -> None:
    """Start a daemon with ``run.schedules`` schedules on ``url`` (None: SQLite in its
    DATA_DIR), reload it twice, fill in ``run``."""
    name = f"{run.database}-{run.schedules}"
    extra = {"LOG_LEVEL": "INFO"} | ({"DATABASE_URL": url} if url else {})
    daemon = Daemon(root, name, CLUB_URL, **extra)
    db_url = url or f"sqlite:///{daemon.data_dir / 'db.sqlite'}"
    start_day = datetime.now(UTC) + timedelta(days=LOAD_DAYS_AHEAD)
    daemon.write_schedules(scale_entries(run.schedules, start_day))
    with daemons([daemon]):
        daemon.start()
        run.ready_s = daemon.wait_ready(timeout=SCALE_TIMEOUT)
        run.cold_ms = daemon.wait_loaded("start", 0, timeout=SCALE_TIMEOUT)
        run.instances = pending_count(db_url)
        expected = run.schedules * INSTANCES_PER_SCHEDULE
        if run.instances != expected:
            raise BenchError(f"{run.instances} pending instances, expected {expected}")
        time.sleep(1.0)
        run.noop_ms, _ = timed_reload(daemon)
        daemon.write_schedules(scale_entries(run.schedules, start_day, edit=True))
        run.edit_ms, _ = timed_reload(daemon)
        _, run.rss_mb = daemon.proc_stat()
        daemon.signal(signal.SIGTERM)
    progress(
        f"{name}: ready {run.ready_s:.1f} s, cold load {run.cold_ms:.0f} ms, no-op reload "
        f"{run.noop_ms:.0f} ms, edited reload {run.edit_ms:.0f} ms, RSS {run.rss_mb:.1f} MB"
    )


#: Start to ready for 1,000 schedules on SQLite (issue 24's target, judged on the median).
TARGET_READY_S = 3.0
READY_REPEATS = 5


def cold_starts(root: Path, count: int, repeats: int) -> list[float]:
    """Start to ready (seconds) of ``repeats`` cold starts with ``count`` schedules on SQLite,
    each on an empty database of its own: only that is measured (no reload)."""
    found = []
    for repeat in range(repeats):
        daemon = Daemon(root, f"ready-{count}-{repeat}", CLUB_URL, LOG_LEVEL="INFO")
        start_day = datetime.now(UTC) + timedelta(days=LOAD_DAYS_AHEAD)
        daemon.write_schedules(scale_entries(count, start_day))
        with daemons([daemon]):
            daemon.start()
            found.append(daemon.wait_ready(timeout=SCALE_TIMEOUT))
            daemon.signal(signal.SIGTERM)
        progress(f"cold start {repeat + 1}/{repeats}, {count} schedules: {found[-1]:.2f} s")
    return found


def ready_verdict(seconds: list[float]) -> str:
    """The target's line: start to ready min / median / max and whether the median meets it."""
    from bench import Spread

    spread = Spread.of(seconds)
    verdict = "MET" if seconds and spread.median <= TARGET_READY_S else "MISSED"
    return (
        f"start to ready, 1,000 schedules (52,000 instances) on SQLite, {len(seconds)} cold "
        f"starts: {_seconds(spread)} (target <= {TARGET_READY_S:g} s on the median: {verdict})"
    )


def _seconds(spread: Any) -> str:
    return " / ".join(f"{value:.2f} s" for value in (spread.min, spread.median, spread.max))


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render(runs: list[Run]) -> str:
    header = (
        "| schedules (instances) | database | start to ready | cold load | no-op SIGHUP | "
        "SIGHUP after one edit | RSS |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for run in runs:
        if run.error is not None:
            lines.append(
                f"| {run.schedules:,} | {run.database} | could not be measured: {run.error} "
                "| | | | |"
            )
            continue
        instances = (
            f"{run.schedules:,} ({run.instances:,})" if run.instances else f"{run.schedules:,}"
        )
        lines.append(
            f"| {instances} | {run.database} | {_cell(run.ready_s, '{:.1f} s')} | "
            f"{_cell(run.cold_ms, '{:,.0f} ms')} | {_cell(run.noop_ms, '{:,.0f} ms')} | "
            f"{_cell(run.edit_ms, '{:,.0f} ms')} | {_cell(run.rss_mb, '{:.0f} MB')} |"
        )
    return "\n".join(lines)


def main() -> int:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import pg_server

    runs: list[Run] = []
    ready: list[float] = []
    server = None
    try:
        with tempfile.TemporaryDirectory(prefix="courtbot-scale-") as scratch:
            root = Path(scratch)
            try:
                server = pg_server.start()
                progress(f"PostgreSQL on 127.0.0.1:{server.port} ({server.bin_dir})")
            except pg_server.PgUnavailable as exc:
                progress(f"PostgreSQL: {exc}")
                unavailable = str(exc)
            for count in SCHEDULE_COUNTS:
                for database in ("SQLite", "PostgreSQL"):
                    run = Run(database, count)
                    runs.append(run)
                    if database == "PostgreSQL" and server is None:
                        run.error = f"PostgreSQL could not start ({unavailable})"
                        continue
                    url = None if server is None else server.url(server.create_database())
                    try:
                        measure(root, run, url if database == "PostgreSQL" else None)
                    except Exception as exc:  # noqa: BLE001 (one run's failure is its row)
                        run.error = f"{exc.__class__.__name__}: {exc}"[:120]
                        progress(f"{database} {count}: {run.error}")
                    finally:
                        kill_children()
            ready = cold_starts(root, SCHEDULE_COUNTS[-1], READY_REPEATS)
    finally:
        kill_children()
        if server is not None:
            server.stop()
    print(render(runs), flush=True)
    print(f"\n{ready_verdict(ready)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- a trigger during a load

#: Where the one-off's trigger falls, seconds after the launch: the issue's 3 s, and a point
#: inside this release's load on a quiet machine (its soonest-first part is done at about 1.2 s,
#: the load at about 2.2 s; at 3 s the load is over).
TRIGGERS_INTO_LOAD = (3.0, 1.7)
LOAD_TRIGGER_REPEATS = 3
TARGET_LOAD_TRIGGER_MS = 50.0


def soonest_first_at(output: str) -> float:
    """When (epoch seconds) the daemon logged its soonest-first part done; nan without."""
    for line in output.splitlines():
        if "soonest first:" in line:
            stamp = line.split(" ", 1)[0].replace("Z", "+00:00")
            return datetime.fromisoformat(stamp).timestamp()
    return math.nan


def trigger_during_load(
    root: Path, into: float, count: int = 1000
) -> list[tuple[float, float, float, float]]:
    """A cold load of ``count`` weekly schedules on SQLite with one one-off whose trigger comes
    ``into`` s after the launch (the launch waits for the instant that puts it there: a desired
    time is whole seconds): (its lateness at the club in ms, start to ready in s, the
    soonest-first part done in s, the trigger in s; all after the launch), per repeat."""
    from bench import WINDOW_SECONDS, ClubProcess, iso_z, wait_for_keys

    figures = []
    for repeat in range(LOAD_TRIGGER_REPEATS):
        club = ClubProcess(tls=None)
        try:
            daemon = Daemon(root, f"load-trigger{into:g}-{repeat}", club.url(), LOG_LEVEL="INFO")
            start_day = datetime.now(UTC) + timedelta(days=LOAD_DAYS_AHEAD)
            # A second ahead for writing the files.
            desired = math.ceil(time.time() + 1.0 + into + WINDOW_SECONDS)
            trigger = desired - WINDOW_SECONDS
            entry = {"id": "soon", "type": "one-off", "desired_time": iso_z(desired)}
            daemon.write_schedules([*scale_entries(count, start_day), entry])
            key = f"soon@{iso_z(desired)}"
            time.sleep(max(0.0, trigger - into - time.time()))
            with daemons([daemon]):
                daemon.start()
                launched = time.time()
                # Ready first: the club keeps every arrival for the dump, and a pid file looked
                # for only once the booking had come would read as ready at the trigger.
                ready = daemon.wait_ready(timeout=SCALE_TIMEOUT)
                seen = wait_for_keys(club, {key}, time.monotonic() + SCALE_TIMEOUT)
                daemon.signal(signal.SIGTERM)
            if key not in seen:
                raise BenchError("the booking due during the load never reached the club")
            late = (seen[key]["arrived"] - trigger) * 1000
            soonest = soonest_first_at(daemon.output()) - launched
            progress(
                f"trigger {trigger - launched:.1f} s after launch: sent {late:.1f} ms after it; "
                f"soonest first done {soonest:.1f} s after launch; ready {ready:.1f} s after launch"
            )
            figures.append((late, ready, soonest, trigger - launched))
        finally:
            club.stop()
            kill_children()
    return figures


def seconds(values: list[float]) -> str:
    """min / median / max, in seconds."""
    ordered = sorted(values)
    return f"{ordered[0]:.1f} / {ordered[len(ordered) // 2]:.1f} / {ordered[-1]:.1f} s"


def main_load_trigger() -> int:
    """``python tools/bench.py load-trigger``: print the lateness of a trigger during a cold
    load of 52,000 instances, min / median / max over the repeats, for each of
    ``TRIGGERS_INTO_LOAD``, and whether the trigger fell before the load was done."""
    from bench import Spread

    for into in TRIGGERS_INTO_LOAD:
        with tempfile.TemporaryDirectory(prefix="courtbot-load-trigger-") as scratch:
            figures = trigger_during_load(Path(scratch), into)
        late = Spread.of([f[0] for f in figures])
        verdict = "MET" if late.values and late.max <= TARGET_LOAD_TRIGGER_MS else "MISSED"
        during = sum(1 for f in figures if f[3] < f[1])
        print(
            f"trigger {into:g} s into a cold load of 1,000 schedules (52,000 instances), "
            f"SQLite: sent {late.text()} after it (target <= {TARGET_LOAD_TRIGGER_MS:g} ms: "
            f"{verdict}); soonest first done {seconds([f[2] for f in figures])} after launch; "
            f"start to ready {seconds([f[1] for f in figures])}; the trigger fell before ready "
            f"in {during} of {len(figures)}"
        )
    return 0
