"""``make bench``: how precisely, how fast and how cheaply courtbot does its job, measured at the
club's socket, beside the ways a user could do it instead.

Runs from the repository root as ``.venv/bin/python tools/bench.py`` (``tools/bench.py scale``:
many schedules on SQLite and PostgreSQL, see tools/bench_scale.py; ``tools/bench.py wire-read``:
wire's HTTP reader beside h11, see tools/bench_wire_read.py). Everything stays on
127.0.0.1. The club is a process of its own (``tools/stamp_club.py``): each request's arrival is
the kernel's receive stamp at the club's socket (``SO_TIMESTAMPNS``), so neither the club's own
Python nor this process can make a request look late or early. Each figure is given as
min / median / max over repeats. The machine (CPU count, model, Python) heads the output.

a. the instant: one booking at a time and bursts of 100 at one instant (the club answering after
   300 ms), over TLS to a club that adds 100 ms to every new connection (the round trips to a
   club 50 ms away), for each way of sending, each in a process of its own
   (``tools/bench_clients.py``): a 1 s polling loop, a cron-style fresh ``python -c`` started at
   the trigger, APScheduler with a fresh ``requests.post``, APScheduler with a connection opened
   ahead by a probe (the strongest naive rival), courtbot's sending path today (requests, as
   the daemon runs it) and ``wire`` (one writer per instant). courtbot's two also over plain
   TCP, where no handshake can be paid at the trigger. Targets for the sender: last of 100 <=
   5 ms after the trigger (aim: 2 ms), one booking p99 <= 1 ms, none early.
b. the daemon, one booking at a time: ``python main.py run`` (five daemons, windows a fraction
   of a second apart, so triggers fall every 0.6 s), plain HTTP (the daemon can only trust
   certifi's CA bundle).
c. the daemon, bursts: 100 instances sharing a trigger, three such triggers, plain HTTP.
d. load: 100 weekly schedules (5,200 instances) from an empty DATA_DIR to the pid file, then a
   no-op SIGHUP and a SIGHUP after editing one entry's time (the daemon's own log figures).
e. rest: the loaded daemon's RSS and CPU over an idle window.

Progress goes to stderr; the tables go to stdout. A target is judged on the median repeat and
marked MET or MISSED, a miss with its cause; the worst repeat is shown beside it, with what made
it worse when it is over the target (the machine may be shared: section a measures its noise).
The exit status is 0 even when a target is missed: this is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import scheduler  # noqa: E402
from models import sqlite_datetime  # noqa: E402
from tools.bench_clients import CRON_CODE, cron_argument  # noqa: E402
from tools.local_ca import CaFiles, make_ca  # noqa: E402
from utils import format_span  # noqa: E402

MAIN = REPO / "main.py"
CLUB = REPO / "tools" / "stamp_club.py"
CLIENTS = REPO / "tools" / "bench_clients.py"
TOKEN = "bench-token-7c2e41"  # noqa: S105 (a throwaway token the bench's club never checks)
WINDOW_SECONDS = 168 * 3600.0
HTTP_TIMEOUT = 10.0

# a. the instant
REPEATS = 3
SINGLE_SHOTS = 12  # per repeat; p99 of 12 is close to their max
SINGLE_SPACING = 0.15
NAIVE_SHOTS = 3  # per repeat, for polling and cron (each costs up to a second)
POLL_SPACING = 1.37  # not a whole second: the poll's phase differs from one trigger to the next
CRON_SPACING = 1.0
BURST_SIZE = 100
BURST_SPACING = 2.0
BURST_ANSWER_DELAY = 0.3
CONNECTION_COST = 0.1
#: Booking threads start this long before their trigger (the daemon's jobs: 2 s).
LEAD = 1.0
#: A client process is started this long before its first trigger (imports, then LEAD).
CLIENT_START_AHEAD = 2.5
#: A request on a connection the club accepted later than this before its trigger went on a
#: connection opened at the trigger, not ahead.
FRESH_CONNECTION_AGE = 0.05
# b./c. the daemon
PRECISION_PHASES = (0.0, 0.19, 0.41, 0.6, 0.83)
PRECISION_PER_DAEMON = 5
#: Seconds between two triggers of one daemon: with 1 or 2 s every trigger would fall when a
#: later instance's job starts (jobs start 2 s ahead), a coincidence real schedules do not have.
PRECISION_SPACING = 3
#: Five daemons starting at once on two cores need ~7 s to be ready.
PRECISION_FIRST_TRIGGER_AFTER = 12.0
DAEMON_BURSTS = 3
DAEMON_BURST_SPACING = 3
BURST_TRIGGER_AFTER = 8.0
# d./e. load and rest
LOAD_SCHEDULES = 100
LOAD_DAYS_AHEAD = 9  # first instance after the 168 h window: no trigger for a day at least
REST_SECONDS = 30.0
REST_SAMPLE_SECONDS = 5.0

# Targets.
TARGET_SINGLE_P99_MS = 1.0
TARGET_BURST_LAST_MS = 5.0
AIM_BURST_LAST_MS = 2.0
TARGET_COLD_LOAD_MS = 3000.0
TARGET_NOOP_RELOAD_MS = 200.0
TARGET_EDIT_RELOAD_MS = 1000.0
TARGET_RSS_MB = 60.0
TARGET_CPU_PER_MIN = 0.1

# Bounds on every wait.
READY_TIMEOUT = 60.0
ARRIVALS_GRACE = 20.0
LOG_LINE_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0

_STARTED = time.monotonic()
_CHILDREN: list[subprocess.Popen[Any]] = []
# "config loaded (REASON) in N ms", or for a reload that found no file changed
# "config unchanged (REASON), checked in N ms".
_LOADED_RE = re.compile(
    r"config (?:loaded|unchanged) \((?P<reason>[^)]*)\),? (?:checked )?in (?P<ms>\d+(?:\.\d+)?) ms"
)


class BenchError(Exception):
    """A case could not be measured (the reason is shown in the table)."""


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def machine() -> str:
    """The machine the figures come from."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = os.cpu_count() or 0
    return (
        f"{cpus} CPU(s){', ' + model if model else ''}; {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}"
    )


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks (as numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def fine(value: float) -> str:
    """Milliseconds with the precision that sub-millisecond figures need."""
    if math.isnan(value):
        return "n/a"
    return (
        f"{value:.2f}"
        if abs(value) < 10
        else f"{value:.1f}"
        if abs(value) < 1000
        else f"{value:.0f}"
    )


@dataclass(frozen=True)
class Spread:
    """One figure over repeats: min / median / max."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(tuple(v for v in values if not math.isnan(v)))

    @property
    def min(self) -> float:
        return min(self.values, default=math.nan)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values, default=math.nan)

    def text(self) -> str:
        if not self.values:
            return "n/a"
        return f"{fine(self.min)} / {fine(self.median)} / {fine(self.max)} ms"


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One figure: ``ok`` None means informational (no target)."""

    case: str
    metric: str
    value: str
    target: str = ""
    ok: bool | None = None
    note: str = ""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(
        self,
        case: str,
        metric: str,
        value: str,
        target: str = "",
        ok: bool | None = None,
        *,
        note: str = "",
    ) -> None:
        self.rows.append(Row(case, metric, value, target, ok, note))
        verdict = "" if ok is None else (" MET" if ok else " MISSED")
        progress(
            f"{case}: {metric} = {value}{' (target ' + target + ')' if target else ''}{verdict}"
            f"{': ' + note if note else ''}"
        )

    def error(self, case: str, exc: BaseException) -> None:
        self.add(case, "could not be measured", f"{exc.__class__.__name__}: {exc}"[:90], "", False)

    def render(self) -> str:
        header = ("case", "metric", "value", "target", "result")
        body = [
            (
                r.case,
                r.metric,
                r.value,
                r.target,
                "-" if r.ok is None else "MET" if r.ok else "MISSED",
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        for row, cells in zip(self.rows, body, strict=True):
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
            if row.note:
                label = "cause" if row.ok is False else "note"
                lines.append(" " * (widths[0] + 2) + f"{label}: {row.note}")
        missed = sum(1 for r in self.rows if r.ok is False)
        met = sum(1 for r in self.rows if r.ok is True)
        lines.append(f"\n{met} MET, {missed} MISSED")
        return "\n".join(lines)


def grid(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the club


class ClubProcess:
    """``tools/stamp_club.py`` in a process of its own; its records come back on ``dump``."""

    def __init__(self, *, tls: CaFiles | None, delay: float = 0.0, cost: float = 0.0) -> None:
        command = [sys.executable, str(CLUB), "--delay", str(delay), "--cost", str(cost)]
        if tls is not None:
            command += ["--cert", str(tls.cert), "--key", str(tls.key)]
        self.tls = tls
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        _CHILDREN.append(self.proc)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self._out, self._in = self.proc.stdout, self.proc.stdin
        line = self._out.readline()
        if not line.startswith("ready "):
            raise BenchError(f"the club did not start: {line!r}")
        ready = json.loads(line.split(" ", 1)[1])
        self.port: int = ready["port"]
        self.stamps: str = ready["stamps"]

    def url(self, path: str = "/bookings") -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}{path}"
        return f"http://127.0.0.1:{self.port}{path}"

    def command(self, text: str) -> None:
        self._in.write(text + "\n")
        self._in.flush()

    def dump(self) -> list[dict[str, Any]]:
        """Every request recorded since the last dump."""
        self.command("dump")
        records = []
        while True:
            line = self._out.readline()
            if not line:
                raise BenchError("the club process ended")
            if line.strip() == "end":
                return records
            records.append(json.loads(line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def arrivals_by_key(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The first record of each Idempotency-Key (probes without one are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["key"] and record["key"] not in out:
            out[record["key"]] = record
    return out


# --------------------------------------------------------------------------- the daemon


def iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_text(seconds: float) -> str:
    """BOOKING_WINDOW for a window of ``seconds`` (hours with enough decimals)."""
    return f"{seconds / 3600.0:.12f}h"


def window_seconds(text: str) -> float:
    """The window the daemon reads from ``text``, computed the way it does (timedelta)."""
    return timedelta(hours=float(text.removesuffix("h"))).total_seconds()


class Daemon:
    """One ``python main.py run`` child with its own DATA_DIR; output kept in a file."""

    def __init__(self, root: Path, name: str, club_url: str, **env: str) -> None:
        self.name = name
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True)
        self.out_path = root / f"{name}.out"
        (self.data_dir / "tokens.json").write_text(json.dumps({"default": TOKEN}))
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BOOKING_", "SMTP_", "NOTIFY_", "LOG_", "DATABASE_URL"))
        }
        self.env = {
            **base,
            "FERNET_KEY": Fernet.generate_key().decode(),
            "BOOKING_API_URL": club_url,
            "BOOKING_TIMEZONE": "UTC",
            "BOOKING_WINDOW": "168h",
            "DATA_DIR": str(self.data_dir),
            "LOG_FILE": "-",
            "LOG_LEVEL": "WARNING",
            "RETRY_BASE_SECONDS": "1",
            "HTTP_TIMEOUT_SECONDS": "10",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.launched = 0.0

    def write_schedules(self, entries: list[dict[str, Any]]) -> None:
        path = self.data_dir / "schedules.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)

    def start(self) -> None:
        with self.out_path.open("ab") as out:
            self.launched = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, str(MAIN), "run"],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _CHILDREN.append(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.output().strip().splitlines()[-3:]
            raise BenchError(
                f"daemon {self.name} exited {self.proc.returncode}: {' | '.join(tail)}"
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait for the pid file naming this process; returns seconds since the launch."""
        pid_file = self.data_dir / "bot.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if pid_file.read_text().strip() == str(self.pid):
                    return time.monotonic() - self.launched
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        raise BenchError(f"daemon {self.name}: no pid file after {timeout:.0f} s")

    def loaded_lines(self) -> list[tuple[str, float]]:
        """Every ``config loaded (REASON) in N ms`` line so far, as (reason, ms)."""
        return [(m["reason"], float(m["ms"])) for m in _LOADED_RE.finditer(self.output())]

    def wait_loaded(self, reason: str, after: int, timeout: float = LOG_LINE_TIMEOUT) -> float:
        """The ms figure of the first ``config loaded (reason)`` line past the first ``after``
        ones of that reason."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            found = [value for r, value in self.loaded_lines() if r == reason]
            if len(found) > after:
                return found[after]
            time.sleep(0.01)
        raise BenchError(f"daemon {self.name}: no 'config loaded ({reason})' line in {timeout} s")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def proc_stat(self) -> tuple[float, float]:
        """(CPU seconds used so far, RSS in MB) from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
        rss_kb = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
        return cpu, rss_kb / 1024.0

    def status_rows(self) -> list[dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, str(MAIN), "status", "--json"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"status --json exited {done.returncode}: {done.stderr.strip()}")
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            progress(f"daemon {self.name} ignored SIGTERM for {STOP_TIMEOUT:.0f} s: killed")
            proc.kill()
            proc.wait(10)


def kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                progress(f"pid {proc.pid} did not die")


@contextmanager
def daemons(items: list[Daemon]) -> Iterator[list[Daemon]]:
    try:
        yield items
    finally:
        for daemon in items:
            try:
                daemon.stop()
            except (OSError, subprocess.SubprocessError) as exc:
                progress(f"stopping daemon {daemon.name}: {exc}")


# --------------------------------------------------------------------------- shots


@dataclass(frozen=True)
class Shot:
    """One booking to send: its Idempotency-Key, trigger (epoch s) and the repeat it is in."""

    key: str
    trigger: float
    group: int
    court: str = "3"

    @property
    def start(self) -> float:
        """The desired start it books (the window after the trigger)."""
        return self.trigger + WINDOW_SECONDS

    def plan(self) -> dict[str, Any]:
        return {"key": self.key, "trigger": self.trigger, "court": self.court, "start": self.start}


def single_shots(prefix: str, first: float, per: int, spacing: float) -> list[Shot]:
    """``per`` one-at-a-time bookings in each of REPEATS groups, ``spacing`` apart, each trigger
    a random few ms off the grid."""
    shots = []
    for group in range(REPEATS):
        for i in range(per):
            at = first + (group * per + i) * spacing + random.uniform(0.0, 0.01)
            shots.append(Shot(f"{prefix}-r{group}-{i:02d}", at, group))
        # groups follow each other directly
    return shots


def burst_shots(prefix: str, first: float) -> list[Shot]:
    """REPEATS bursts of BURST_SIZE bookings, each burst sharing one trigger."""
    shots = []
    for group in range(REPEATS):
        at = first + group * BURST_SPACING + random.uniform(0.0, 0.01)
        shots += [
            Shot(f"{prefix}-r{group}-{i:03d}", at, group, str(i + 1)) for i in range(BURST_SIZE)
        ]
    return shots


@dataclass
class Group:
    """The arrivals of one repeat."""

    late_ms: list[float]
    early: int
    missing: int
    #: Requests that went on a connection opened at (not ahead of) the trigger.
    fresh: int
    #: Distinct connections the requests came on.
    connections: int


@dataclass
class Run:
    """What one way of sending did with its shots."""

    shots: list[Shot]
    arrivals: dict[str, dict[str, Any]]
    answers: dict[str, dict[str, Any]]

    def groups(self) -> list[Group]:
        out = []
        for group in sorted({s.group for s in self.shots}):
            late, early, fresh, conns = [], 0, 0, set()
            mine = [s for s in self.shots if s.group == group]
            for shot in mine:
                record = self.arrivals.get(shot.key)
                if record is None:
                    continue
                delta = (record["arrived"] - shot.trigger) * 1000.0
                late.append(delta)
                early += delta < 0
                fresh += record["accepted"] > shot.trigger - FRESH_CONNECTION_AGE
                conns.add(record["connection"])
            out.append(Group(late, early, len(mine) - len(late), fresh, len(conns)))
        return out

    @property
    def early(self) -> int:
        return sum(g.early for g in self.groups())

    @property
    def missing(self) -> int:
        return sum(g.missing for g in self.groups())

    @property
    def fresh(self) -> int:
        return sum(g.fresh for g in self.groups())

    def wrote_ms(self, group: int) -> list[float]:
        """When the client says it wrote each request of ``group``, after its trigger (only
        ``wire`` reports it)."""
        out = []
        for shot in self.shots:
            answer = self.answers.get(shot.key) or {}
            if shot.group == group and answer.get("wrote") is not None:
                out.append((answer["wrote"] - shot.trigger) * 1000.0)
        return out

    def loop_ms(self, group: int) -> tuple[float, float] | None:
        """The write loop of ``group`` (a burst): its wall and CPU milliseconds (``wire``)."""
        for shot in self.shots:
            answer = self.answers.get(shot.key) or {}
            if shot.group == group and answer.get("loop"):
                wall, cpu = answer["loop"]
                return wall * 1000.0, cpu * 1000.0
        return None

    def errors(self) -> list[str]:
        """Answers that were not 201, as the client saw them."""
        bad = []
        for shot in self.shots:
            answer = self.answers.get(shot.key)
            if answer is None:
                bad.append("no result")
            elif answer.get("status") != 201:
                bad.append(str(answer.get("error") or answer.get("status")))
        return bad

    def p50(self) -> Spread:
        return Spread.of([percentile(g.late_ms, 50) for g in self.groups()])

    def p99(self) -> Spread:
        return Spread.of([percentile(g.late_ms, 99) for g in self.groups()])

    def first(self) -> Spread:
        return Spread.of([min(g.late_ms, default=math.nan) for g in self.groups()])

    def last(self) -> Spread:
        return Spread.of([max(g.late_ms, default=math.nan) for g in self.groups()])


def run_client(
    method: str, club: ClubProcess, verify: bool | str, shots: list[Shot], scratch: Path
) -> Run:
    """Run one way of sending (``tools/bench_clients.py``) in a process of its own."""
    plan = {
        "url": club.url(),
        "verify": verify,
        "timeout": HTTP_TIMEOUT,
        "token": TOKEN,
        "lead": LEAD,
        "shots": [s.plan() for s in shots],
    }
    plan_path = scratch / f"{shots[0].key}.json"
    plan_path.write_text(json.dumps(plan))
    with (scratch / f"{shots[0].key}.err").open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(CLIENTS), method, str(plan_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    _CHILDREN.append(proc)
    last = max(s.trigger for s in shots)
    try:
        out, _ = proc.communicate(timeout=last - time.time() + HTTP_TIMEOUT + ARRIVALS_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        progress(f"{method}: the client did not finish in time")
    if proc.returncode:
        tail = (scratch / f"{shots[0].key}.err").read_text().strip().splitlines()[-3:]
        progress(f"{method}: the client exited {proc.returncode}: {' | '.join(tail)}")
    answers = {}
    for line in out.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            answers[item["key"]] = item
    return Run(shots, arrivals_by_key(club.dump()), answers)


def run_cron(club: ClubProcess, verify: bool | str, shots: list[Shot]) -> Run:
    """A fresh ``python -c`` process started at each trigger (an ideal cron: to the ms)."""
    import wire

    plan = {"url": club.url(), "timeout": HTTP_TIMEOUT, "verify": verify, "token": TOKEN}
    by_trigger: dict[float, list[Shot]] = {}
    for shot in shots:
        by_trigger.setdefault(shot.trigger, []).append(shot)
    procs = []
    for trigger in sorted(by_trigger):
        argument = cron_argument(plan, [s.plan() for s in by_trigger[trigger]])
        wire.wait_until(trigger)
        proc = subprocess.Popen(
            [sys.executable, "-c", CRON_CODE, argument],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _CHILDREN.append(proc)
        procs.append(proc)
    for proc in procs:
        proc.wait(HTTP_TIMEOUT + ARRIVALS_GRACE)
    arrivals = arrivals_by_key(club.dump())
    answers = {k: {"key": k, "status": 201} for k in arrivals}  # the club answers all 201
    return Run(shots, arrivals, answers)


@dataclass(frozen=True)
class Way:
    label: str
    method: str
    tls: bool

    @property
    def transport(self) -> str:
        return "TLS" if self.tls else "TCP"


WAYS = (
    Way("1 s polling loop", "poll", True),
    Way("cron: fresh python -c at T", "cron", True),
    Way("APScheduler + fresh requests.post", "aps-fresh", True),
    Way("APScheduler + conn. opened ahead", "aps-warm", True),
    Way("courtbot today (requests)", "bot", True),
    Way("courtbot wire.send_burst", "wire", True),
    Way("courtbot today (requests)", "bot", False),
    Way("courtbot wire.send_burst", "wire", False),
)


def measure_way(
    way: Way, club: ClubProcess, verify: bool | str, scratch: Path, *, burst: bool
) -> Run:
    prefix = f"{way.method}-{way.transport.lower()}-{'burst' if burst else 'one'}"
    club.command(f"delay {BURST_ANSWER_DELAY if burst else 0.0}")
    first = time.time() + CLIENT_START_AHEAD
    if burst:
        shots = burst_shots(prefix, first)
    elif way.method == "poll":
        shots = single_shots(prefix, first, NAIVE_SHOTS, POLL_SPACING)
    elif way.method == "cron":
        shots = single_shots(prefix, time.time() + 0.5, NAIVE_SHOTS, CRON_SPACING)
    else:
        shots = single_shots(prefix, first, SINGLE_SHOTS, SINGLE_SPACING)
    if way.method == "cron":
        return run_cron(club, verify, shots)
    return run_client(way.method, club, verify, shots, scratch)


def _figure(group: Group, burst: bool) -> float:
    """The figure a target judges: the last arrival of a burst, or a repeat's p99."""
    if burst:
        return max(group.late_ms, default=math.nan)
    return percentile(group.late_ms, 99)


def cause_of(run: Run, *, burst: bool, limit_ms: float, median: bool = False) -> str:
    """Why a run's worst repeat (or its median one) missed its target, from what the club saw
    and, for ``wire``, from when the client says it wrote each request."""
    total = len(run.shots)
    if run.missing:
        errors = run.errors()
        return f"{run.missing} of {total} never arrived ({errors[0] if errors else 'no error'})"
    if run.early:
        return f"{run.early} of {total} arrived before their trigger"
    if run.fresh:
        return (
            f"{run.fresh} of {total} went on a connection opened at the trigger, paying the "
            f"club's {CONNECTION_COST * 1000:.0f} ms connection cost: the connection opened "
            "ahead was not used"
        )
    groups = run.groups()
    order = sorted(range(len(groups)), key=lambda i: _figure(groups[i], burst))
    index = order[len(order) // 2] if median else order[-1]
    group = groups[index]
    first = min(group.late_ms, default=math.nan)
    last = max(group.late_ms, default=math.nan)
    wrote = run.wrote_ms(index)
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    if burst:
        parts = []
        if last - first > limit_ms / 2:
            loop = run.loop_ms(index)
            if loop is not None and loop[0] - loop[1] > limit_ms / 2:
                parts.append(
                    f"the write loop took {fine(loop[0])} ms of which the writer was on a CPU "
                    f"for {fine(loop[1])} ms: another process had the CPU mid-loop ({load})"
                )
            elif loop is not None:
                parts.append(
                    f"the write loop itself used {fine(loop[1])} ms of CPU in its "
                    f"{fine(loop[0])} ms"
                )
            else:
                parts.append(
                    f"{fine(last - first)} ms from the first to the last arrival: the writes "
                    "themselves (Python per request, hand-offs between threads)"
                )
        if first > limit_ms / 2:
            if wrote:
                parts.append(
                    f"the writer began {fine(min(wrote))} ms after the trigger (first arrival "
                    f"{fine(first)} ms): it was not on a CPU at the trigger ({load})"
                )
            else:
                parts.append(f"the first request already came {fine(first)} ms late ({load})")
        return "; ".join(parts) or f"last {fine(last)} ms"
    p50 = percentile(group.late_ms, 50)
    if p50 >= limit_ms:
        return f"even the median is {fine(p50)} ms: the send itself is slower than the target"
    if wrote:
        return (
            f"median {fine(p50)} ms, slowest {fine(last)} ms, written {fine(max(wrote))} ms "
            f"after its trigger at worst: the writer was not on a CPU in time ({load})"
        )
    return (
        f"median {fine(p50)} ms, slowest {fine(last)} ms: the tail is wake-up jitter or "
        f"another process holding a core ({load})"
    )


def judge(table: Table, case: str, name: str, run: Run, *, burst: bool) -> None:
    """Two rows for a target: the verdict on the median repeat (the machine is shared; its
    noise is measured in section a), then the worst repeat with what made it worse."""
    spread = run.last() if burst else run.p99()
    limit = TARGET_BURST_LAST_MS if burst else TARGET_SINGLE_P99_MS
    what = f"last of {BURST_SIZE}" if burst else "one booking, p99"
    target = f"<= {limit:g} ms" + (f" (aim {AIM_BURST_LAST_MS:g})" if burst else "")
    ok = spread.median <= limit and run.early == 0 and run.missing == 0
    if not ok:
        note = cause_of(run, burst=burst, limit_ms=limit, median=True)
    elif burst:
        reached = "reached" if spread.median <= AIM_BURST_LAST_MS else "not reached"
        note = f"the aim of {AIM_BURST_LAST_MS:g} ms is {reached}"
    else:
        note = ""
    table.add(case, f"{name}: {what}, median repeat", ms(spread.median), target, ok, note=note)
    worse = (
        ""
        if spread.max <= limit
        else f"over the target: {cause_of(run, burst=burst, limit_ms=limit)}"
    )
    table.add(case, f"{name}: {what}, worst repeat", ms(spread.max), note=worse)


def stalls(seconds: float, threshold: float = 0.0005) -> tuple[int, float]:
    """How often, and for how long at most (ms), a thread spinning on the clock for
    ``seconds`` was off the CPU for more than ``threshold``: the machine's own noise."""
    count, worst = 0, 0.0
    last = time.perf_counter()
    end = last + seconds
    while last < end:
        now = time.perf_counter()
        if now - last > threshold:
            count += 1
            worst = max(worst, now - last)
        last = now
    return count, worst * 1000.0


def case_instant(root: Path, table: Table) -> str:
    """Section a; returns its own table (rendered)."""
    case = "a. the instant"
    scratch = root / "a"
    scratch.mkdir(parents=True)
    files = make_ca(scratch / "ca")
    clubs: dict[bool, ClubProcess] = {}
    results: dict[tuple[Way, bool], Run] = {}
    noise = [stalls(2.0)]
    loads = [os.getloadavg()[0]]
    try:
        clubs[True] = ClubProcess(tls=files, cost=CONNECTION_COST)
        clubs[False] = ClubProcess(tls=None)
        progress(f"{case}: clubs ready (arrival stamps by the {clubs[True].stamps})")
        for way in WAYS:
            club = clubs[way.tls]
            verify: bool | str = str(files.ca) if way.tls else True
            for burst in (False, True):
                kind = "bursts of 100" if burst else "one at a time"
                progress(f"{case}: {way.label} ({way.transport}), {kind}")
                results[(way, burst)] = measure_way(way, club, verify, scratch, burst=burst)
    finally:
        for club in clubs.values():
            club.stop()
    noise.append(stalls(2.0))
    loads.append(os.getloadavg()[0])
    stamps = clubs[True].stamps if clubs else "?"
    table.add(
        case,
        "machine noise: a spinning thread off the CPU > 0.5 ms, in 2 s (before, after)",
        ", ".join(f"{n} times, longest {fine(w)} ms" for n, w in noise),
    )
    table.add(
        case,
        "load average (1 min) before, after",
        f"{loads[0]:.1f}, {loads[1]:.1f} on {os.cpu_count()} CPUs (other work on the machine)",
    )

    rows = []
    for way in WAYS:
        one, many = results[(way, False)], results[(way, True)]
        rows.append(
            (
                way.label,
                way.transport,
                one.p50().text(),
                one.p99().text(),
                many.first().text(),
                many.last().text(),
                f"{one.early + many.early}",
                f"{one.fresh}/{len(one.shots)}, {many.fresh}/{len(many.shots)}",
                f"{one.missing + many.missing}",
            )
        )
    header = (
        "way of sending",
        "link",
        "one booking p50",
        "one booking p99",
        "burst: first of 100",
        "burst: last of 100",
        "early",
        "on a new conn.",
        "lost",
    )
    text = (
        f"a. the instant: arrival after the trigger at the club's socket (stamped by the "
        f"{stamps}), min / median / max over {REPEATS} repeats. One booking: "
        f"{SINGLE_SHOTS} per repeat ({NAIVE_SHOTS} for polling and cron); bursts: "
        f"{BURST_SIZE} at one instant, the club answering after {BURST_ANSWER_DELAY * 1000:.0f} "
        f"ms. TLS: the club adds {CONNECTION_COST * 1000:.0f} ms to each new connection.\n"
        + grid(header, rows)
    )

    for way in WAYS:
        if way.method not in ("bot", "wire"):
            continue
        one, many = results[(way, False)], results[(way, True)]
        name = f"{way.label} ({way.transport})"
        judge(table, case, name, one, burst=False)
        judge(table, case, name, many, burst=True)
        table.add(
            case,
            f"{name}: arrivals before their trigger",
            str(one.early + many.early),
            "0",
            one.early + many.early == 0,
        )

    rival = next(w for w in WAYS if w.method == "aps-warm")
    ours = next(w for w in WAYS if w.method == "wire" and w.tls)
    for label, ours_fig, rival_fig in (
        ("one booking p50", results[(ours, False)].p50(), results[(rival, False)].p50()),
        ("one booking p99", results[(ours, False)].p99(), results[(rival, False)].p99()),
        ("burst: last of 100", results[(ours, True)].last(), results[(rival, True)].last()),
    ):
        ahead = "wire ahead" if ours_fig.median < rival_fig.median else "the rival ahead"
        table.add(
            case,
            f"vs APScheduler + conn. opened ahead (TLS), {label}",
            f"wire {fine(ours_fig.median)} ms, rival {fine(rival_fig.median)} ms: {ahead}",
        )
    return text


def window_shots(
    items: list[Daemon], windows: list[str]
) -> tuple[list[Shot], list[list[dict[str, Any]]]]:
    """The one-offs of section b: each daemon (a group) gets PRECISION_PER_DAEMON instances."""
    first_desired = math.ceil(time.time() + PRECISION_FIRST_TRIGGER_AFTER + WINDOW_SECONDS)
    shots: list[Shot] = []
    entries: list[list[dict[str, Any]]] = [[] for _ in items]
    for j in range(len(items)):
        for k in range(PRECISION_PER_DAEMON):
            desired = first_desired + k * PRECISION_SPACING
            trigger = desired - window_seconds(windows[j])
            entry_id = f"p{j}-{k:02d}"
            shots.append(Shot(f"{entry_id}@{iso_z(desired)}", trigger, j))
            entries[j].append(
                {"id": entry_id, "type": "one-off", "desired_time": iso_z(desired), "court_id": "3"}
            )
    return shots, entries


def wait_for_keys(club: ClubProcess, keys: set[str], deadline: float) -> dict[str, dict[str, Any]]:
    """Dump the club until every key has arrived or ``deadline`` (monotonic) passes."""
    seen: dict[str, dict[str, Any]] = {}
    while True:
        for key, record in arrivals_by_key(club.dump()).items():
            seen.setdefault(key, record)
        if keys <= set(seen) or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


def booked_count(items: list[Daemon], keys: set[str]) -> int:
    """Instances among ``keys`` that the daemons' status shows booked (waiting for answers)."""
    deadline = time.monotonic() + ARRIVALS_GRACE
    while True:
        rows = [r for d in items for r in d.status_rows() if r["key"] in keys]
        booked = sum(1 for r in rows if r["status"] == "booked")
        if (
            booked == len(keys)
            or time.monotonic() >= deadline
            or not any(r["status"] in ("pending", "booking") for r in rows)
        ):
            return booked
        time.sleep(0.5)


def case_daemon_precision(root: Path, table: Table) -> None:
    case = "b. daemon, one at a time"
    windows = [window_text(WINDOW_SECONDS - phase) for phase in PRECISION_PHASES]
    club = ClubProcess(tls=None)
    try:
        items = [
            Daemon(root, f"precision{j}", club.url(), BOOKING_WINDOW=windows[j])
            for j in range(len(windows))
        ]
        shots, entries = window_shots(items, windows)
        for daemon, mine in zip(items, entries, strict=True):
            daemon.write_schedules(mine)
        keys = {s.key for s in shots}
        with daemons(items):
            for daemon in items:
                daemon.start()
            for daemon in items:
                progress(f"{case}: daemon {daemon.name} ready in {daemon.wait_ready():.2f} s")
            first = min(s.trigger for s in shots)
            last = max(s.trigger for s in shots)
            progress(
                f"{case}: first trigger in {first - time.time():.1f} s, "
                f"last {last - first:.1f} s after it"
            )
            deadline = time.monotonic() + (last - time.time()) + ARRIVALS_GRACE
            run = Run(shots, wait_for_keys(club, keys, deadline), {})
            booked = booked_count(items, keys)
    finally:
        club.stop()
    n = len(shots)
    table.add(case, f"lateness p50 (TCP; {len(items)} daemons = repeats)", run.p50().text())
    table.add(case, "lateness p99, min / median / max", run.p99().text())
    judge(table, case, "daemon (TCP)", run, burst=False)
    table.add(case, "arrivals before their trigger", str(run.early), "0", run.early == 0)
    table.add(
        case,
        "arrived / booked",
        f"{n - run.missing} / {booked} of {n}",
        "all",
        run.missing == 0 and booked == n,
    )
    table.add(case, "on a connection opened at the trigger", str(run.fresh), "0", run.fresh == 0)


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenOverflows", 0))
    return 0


def case_daemon_burst(root: Path, table: Table) -> None:
    case = "c. daemon, bursts"
    club = ClubProcess(tls=None, delay=BURST_ANSWER_DELAY)
    try:
        daemon = Daemon(root, "burst", club.url())
        first_desired = math.ceil(time.time() + BURST_TRIGGER_AFTER + WINDOW_SECONDS)
        entries, shots = [], []
        for group in range(DAEMON_BURSTS):
            desired = first_desired + group * DAEMON_BURST_SPACING
            for i in range(BURST_SIZE):
                entry_id = f"b{group}-{i:03d}"
                entries.append(
                    {
                        "id": entry_id,
                        "type": "one-off",
                        "desired_time": iso_z(desired),
                        "court_id": str(i + 1),
                    }
                )
                shots.append(Shot(f"{entry_id}@{iso_z(desired)}", desired - WINDOW_SECONDS, group))
        daemon.write_schedules(entries)
        keys = {s.key for s in shots}
        overflows = listen_overflows()
        with daemons([daemon]):
            daemon.start()
            first = min(s.trigger for s in shots)
            progress(
                f"{case}: daemon ready in {daemon.wait_ready():.2f} s; "
                f"first trigger in {first - time.time():.1f} s"
            )
            last = max(s.trigger for s in shots)
            deadline = time.monotonic() + (last - time.time()) + ARRIVALS_GRACE
            run = Run(shots, wait_for_keys(club, keys, deadline), {})
            overflows = listen_overflows() - overflows
            booked = booked_count([daemon], keys)
    finally:
        club.stop()
    n = len(shots)
    table.add(
        case, f"first arrival (TCP; {DAEMON_BURSTS} bursts of {BURST_SIZE})", run.first().text()
    )
    table.add(case, "last of 100, min / median / max", run.last().text())
    judge(table, case, "daemon (TCP)", run, burst=True)
    table.add(case, "arrivals before their trigger", str(run.early), "0", run.early == 0)
    table.add(
        case,
        "arrived / booked",
        f"{n - run.missing} / {booked} of {n}",
        "all",
        run.missing == 0 and booked == n,
    )
    table.add(case, "on a connection opened at the trigger", str(run.fresh), "0", run.fresh == 0)
    table.add(case, "listen-queue overflows meanwhile (TcpExt)", str(overflows))


_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def load_entries(start_day: datetime, edit: bool = False) -> list[dict[str, Any]]:
    """100 weekly entries with distinct weekday/time pairs starting on ``start_day``."""
    entries = []
    for i in range(LOAD_SCHEDULES):
        minutes = 6 * 60 + i * 5 + (2 if edit and i == 0 else 0)
        entries.append(
            {
                "id": f"r{i:03d}",
                "type": "recurring",
                "desired_time": f"{start_day:%Y-%m-%d} {minutes // 60:02d}:{minutes % 60:02d}",
                "rrule": f"FREQ=WEEKLY;BYDAY={_DAYS[i % 7]}",
                "court_id": str(i % 8 + 1),
            }
        )
    return entries


@dataclass
class JobCount:
    """The job store beside the instances, read from the database file."""

    jobs: int
    pending: int
    #: Pending instances due within the jobs' horizon as it was at ``since`` and as it is now:
    #: the daemon's last sync fell between the two.
    due_then: int
    due_now: int

    @property
    def matches(self) -> bool:
        return self.due_then <= self.jobs <= self.due_now

    def text(self) -> str:
        due = str(self.due_then)
        if self.due_now != self.due_then:
            due += f"..{self.due_now}"
        return f"{self.pending} / {self.jobs} (due within the horizon: {due})"


def job_count(daemon: Daemon, since: datetime) -> JobCount:
    """Booking jobs in the job store, and the pending instances (all, and those due within
    ``scheduler.HORIZON`` of ``since`` and of now): every one of the latter has its job."""
    query = "SELECT count(*) FROM schedules WHERE status = 'pending' AND trigger_time <= ?"
    with sqlite3.connect(f"file:{daemon.data_dir / 'db.sqlite'}?mode=ro", uri=True) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM apscheduler_jobs WHERE id != 'courtbot:topup'"
        ).fetchone()
        (pending,) = conn.execute(
            "SELECT count(*) FROM schedules WHERE status = 'pending'"
        ).fetchone()
        due = [
            conn.execute(
                query, (sqlite_datetime((at + scheduler.HORIZON).replace(tzinfo=None)),)
            ).fetchone()[0]
            for at in (since, datetime.now(UTC))
        ]
    return JobCount(int(count), int(pending), int(due[0]), int(due[1]))


def timed_reload(daemon: Daemon) -> tuple[float, float]:
    """SIGHUP; returns (the daemon's own ms, wall ms until its line appeared)."""
    before = len([r for r, _ in daemon.loaded_lines() if r == "SIGHUP"])
    sent = time.monotonic()
    daemon.signal(signal.SIGHUP)
    figure = daemon.wait_loaded("SIGHUP", before)
    return figure, (time.monotonic() - sent) * 1000.0


def case_load_and_rest(root: Path, table: Table) -> None:
    case_c, case_d = "d. load", "e. rest"
    club = ClubProcess(tls=None)
    try:
        daemon = Daemon(root, "load", club.url(), LOG_LEVEL="INFO")
        start_day = datetime.now(UTC) + timedelta(days=LOAD_DAYS_AHEAD)
        daemon.write_schedules(load_entries(start_day))
        with daemons([daemon]):
            since = datetime.now(UTC)
            daemon.start()
            ready_s = daemon.wait_ready()
            cold_ms = daemon.wait_loaded("start", 0)
            counted = job_count(daemon, since)
            expected = LOAD_SCHEDULES * 52
            table.add(
                case_c,
                "cold load, in-process (log)",
                ms(cold_ms),
                f"<= {TARGET_COLD_LOAD_MS / 1000:g} s",
                cold_ms <= TARGET_COLD_LOAD_MS,
            )
            table.add(case_c, "cold start to pid file (wall)", f"{ready_s * 1000:.0f} ms")
            table.add(
                case_c,
                "pending instances / jobs at ready",
                counted.text(),
                f"{expected} / those due within {format_span(scheduler.HORIZON.total_seconds())}",
                counted.pending == expected and counted.matches,
            )
            time.sleep(1.0)
            noop_ms, noop_wall = timed_reload(daemon)
            table.add(
                case_c,
                "no-op SIGHUP reload (log)",
                ms(noop_ms),
                f"<= {TARGET_NOOP_RELOAD_MS:g} ms",
                noop_ms <= TARGET_NOOP_RELOAD_MS,
            )
            table.add(case_c, "no-op SIGHUP, signal to log line", f"{noop_wall:.0f} ms")
            daemon.write_schedules(load_entries(start_day, edit=True))
            edit_ms, edit_wall = timed_reload(daemon)
            table.add(
                case_c,
                "SIGHUP after one entry's time edited",
                ms(edit_ms),
                f"<= {TARGET_EDIT_RELOAD_MS / 1000:g} s (contract 9)",
                edit_ms <= TARGET_EDIT_RELOAD_MS,
            )
            table.add(case_c, "edited SIGHUP, signal to log line", f"{edit_wall:.0f} ms")
            counted = job_count(daemon, since)
            table.add(
                case_c,
                "pending instances / jobs after edit",
                counted.text(),
                f"{expected} / those due within {format_span(scheduler.HORIZON.total_seconds())}",
                counted.pending == expected and counted.matches,
            )

            progress(f"{case_d}: idle for {REST_SECONDS:.0f} s with {counted.pending} pending")
            time.sleep(2.0)
            cpu0, rss0 = daemon.proc_stat()
            began = time.monotonic()
            rss_max = rss0
            while time.monotonic() - began < REST_SECONDS:
                time.sleep(min(REST_SAMPLE_SECONDS, REST_SECONDS - (time.monotonic() - began)))
                daemon._check_alive()
                _, rss = daemon.proc_stat()
                rss_max = max(rss_max, rss)
            cpu1, rss1 = daemon.proc_stat()
            rss_max = max(rss_max, rss1)
            per_minute = (cpu1 - cpu0) / (time.monotonic() - began) * 60.0
            threads = len(os.listdir(f"/proc/{daemon.pid}/task"))
            sent = len(club.dump())
    finally:
        club.stop()
    table.add(
        case_d,
        "RSS (VmRSS, max over the window)",
        f"{rss_max:.1f} MB",
        f"<= {TARGET_RSS_MB:g} MB",
        rss_max <= TARGET_RSS_MB,
    )
    table.add(
        case_d,
        "CPU per minute idle",
        f"{per_minute:.3f} s",
        f"<= {TARGET_CPU_PER_MIN:g} s",
        per_minute <= TARGET_CPU_PER_MIN,
    )
    table.add(case_d, "threads in the daemon", str(threads))
    table.add(case_d, "requests sent to the club meanwhile", str(sent), "0", sent == 0)


# --------------------------------------------------------------------------- main


def run_case(name: str, table: Table, body: Callable[[], None]) -> None:
    began = time.monotonic()
    try:
        body()
    except Exception as exc:  # noqa: BLE001 (a case that breaks is a MISSED row, not a crash)
        progress(f"{name}: {exc.__class__.__name__}: {exc}")
        table.error(name, exc)
    finally:
        kill_children()
    progress(f"{name}: done in {time.monotonic() - began:.1f} s")


CASES = ("a", "b", "c", "d")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scale"]:
        # Many schedules on SQLite and PostgreSQL: tools/bench_scale.py (make bench-scale).
        from bench_scale import main as scale

        return scale()
    if argv[:1] == ["load-trigger"]:
        # A trigger 3 s into a cold load of 52,000 instances: tools/bench_scale.py.
        from bench_scale import main_load_trigger

        return main_load_trigger()
    if argv[:1] == ["clock"]:
        # Booking by the club's clock, beside JCbook's method: tools/bench_clock.py.
        from bench_clock import main as clock

        return clock()
    if argv[:1] == ["wire-read"]:
        # wire.read_answer beside h11, over loopback: tools/bench_wire_read.py.
        from bench_wire_read import main as wire_read

        return wire_read()
    parser = argparse.ArgumentParser(description="courtbot's benchmark (make bench)")
    parser.add_argument(
        "--only", action="append", choices=CASES, help="run only these cases (repeatable)"
    )
    chosen = set(parser.parse_args(argv).only or CASES)
    table = Table()
    instant = ""
    try:
        with tempfile.TemporaryDirectory(prefix="courtbot-bench-") as scratch:
            root = Path(scratch)
            progress(f"scratch directory {root}; python {sys.executable}")

            def instant_case() -> None:
                nonlocal instant
                instant = case_instant(root, table)

            cases: list[tuple[str, str, Callable[[], None]]] = [
                ("a", "a. the instant", instant_case),
                ("b", "b. daemon, one at a time", lambda: case_daemon_precision(root / "b", table)),
                ("c", "c. daemon, bursts", lambda: case_daemon_burst(root / "c", table)),
                ("d", "d./e. load, rest", lambda: case_load_and_rest(root / "d", table)),
            ]
            for letter, name, body in cases:
                if letter in chosen:
                    run_case(name, table, body)
    finally:
        kill_children()
    progress(f"finished in {time.monotonic() - _STARTED:.0f} s")
    print(f"machine: {machine()}\n")
    if instant:
        print(instant + "\n")
    print(table.render(), flush=True)
    return 0


# --------------------------------------------------------------------------- memory and reload
#
# ``python tools/bench.py memory`` and ``python tools/bench.py reload`` (issue 16, items 3 and 4):
# the daemon's RSS at rest with 5,200 and 52,000 pending instances, and what a reload costs at
# that size when nothing changed and when one entry did. Each figure is min / median / max over
# repeats, each run a fresh daemon on a fresh DATA_DIR (no club is contacted: every trigger is
# more than a day ahead).

#: Weekly entries per size: each makes 52 pending instances (5,200 and 52,000).
SCALE_ENTRIES = (100, 1000)
SCALE_TARGET_RSS_MB = {100: 68.0, 1000: 90.0}
MEMORY_REPEATS = 3
#: After the pid file, the daemon is left alone this long, then sampled for MEMORY_REST_SECONDS.
MEMORY_SETTLE_SECONDS = 3.0
MEMORY_REST_SECONDS = 10.0
RELOAD_REPEATS = 15
TARGET_SCALE_NOOP_MS = 5.0
TARGET_SCALE_EDIT_MS = 50.0
#: The reload targets hold at this size.
RELOAD_TARGET_ENTRIES = 1000
SCALE_READY_TIMEOUT = 300.0
#: "config loaded (SIGHUP) in 12.3 ms (then 4.5 ms giving memory back)" / "config unchanged
#: (SIGHUP), checked in 0.4 ms".
_RELOAD_LINE_RE = re.compile(
    r"config (?P<kind>loaded|unchanged) \(SIGHUP\),? (?:checked )?in (?P<ms>\d+(?:\.\d+)?) ms"
    r"(?: \(then (?P<back>\d+(?:\.\d+)?) ms giving memory back\))?"
)
_UNREACHABLE_CLUB = "http://127.0.0.1:9/bookings"  # never called: no trigger comes near


def weekly_entries(count: int, start_day: datetime, edited: int = 0) -> list[dict[str, Any]]:
    """``count`` weekly entries from ``start_day``, each in its own ten minutes of the week (no
    two overlap: an overlapping pair is a warning at every load); entry 0 moved ``edited``
    minutes (at most 5)."""
    entries = []
    for i in range(count):
        minutes = (i // 7) * 10 + (edited if i == 0 else 0)
        entries.append(
            {
                "id": f"w{i:04d}",
                "type": "recurring",
                "desired_time": f"{start_day:%Y-%m-%d} {minutes // 60:02d}:{minutes % 60:02d}",
                "rrule": f"FREQ=WEEKLY;BYDAY={_DAYS[i % 7]}",
                "duration_minutes": 5,
                "court_id": str(i % 8 + 1),
            }
        )
    return entries


def spread(values: list[float], unit: str, digits: int = 1) -> str:
    """``min / median / max unit`` of ``values``."""
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:.{digits}f} / {mid:.{digits}f} / {high:.{digits}f} {unit}"


def judge_spread(
    table: Table, case: str, metric: str, values: list[float], *, unit: str, limit: float
) -> None:
    """A row judged on the median repeat (as the other cases are); a worst repeat past the
    limit is named beside it."""
    worst, median = max(values), statistics.median(values)
    note = ""
    if median <= limit < worst:
        note = f"the worst repeat, {worst:.1f} {unit}, is past the target"
    table.add(
        case,
        metric,
        spread(values, unit),
        f"<= {limit:g} {unit}",
        median <= limit,
        note=note,
    )


def vm_field(pid: int, name: str) -> float:
    """A ``/proc/PID/status`` field in kB (VmRSS, VmHWM), as MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) / 1024.0
    raise BenchError(f"no {name} in /proc/{pid}/status")


def scale_daemon(root: Path, name: str, entries: int) -> tuple[Daemon, datetime]:
    """A daemon whose DATA_DIR holds ``entries`` weekly entries (started, not yet ready), and
    the day the entries start on."""
    daemon = Daemon(root, name, _UNREACHABLE_CLUB, LOG_LEVEL="INFO")
    start_day = datetime.now(UTC) + timedelta(days=LOAD_DAYS_AHEAD)
    daemon.write_schedules(weekly_entries(entries, start_day))
    daemon.start()
    return daemon, start_day


def rest_rss(daemon: Daemon) -> float:
    """The daemon's largest VmRSS over MEMORY_REST_SECONDS, after MEMORY_SETTLE_SECONDS idle."""
    time.sleep(MEMORY_SETTLE_SECONDS)
    highest = 0.0
    began = time.monotonic()
    while True:
        daemon._check_alive()
        highest = max(highest, vm_field(daemon.pid, "VmRSS"))
        if time.monotonic() - began >= MEMORY_REST_SECONDS:
            return highest
        time.sleep(1.0)


def edited_reload(daemon: Daemon, count: int, start_day: datetime, minutes: int) -> None:
    """Move entry 0 by ``minutes``, SIGHUP, and wait for the daemon's ``config loaded`` line."""
    daemon.write_schedules(weekly_entries(count, start_day, edited=minutes))
    before = daemon.output().count("config loaded (SIGHUP)")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + LOG_LINE_TIMEOUT
    while daemon.output().count("config loaded (SIGHUP)") == before:
        daemon._check_alive()
        if time.monotonic() > deadline:
            raise BenchError("no 'config loaded (SIGHUP)' line")
        time.sleep(0.01)


def case_memory(root: Path, table: Table) -> None:
    """RSS at rest: after a cold start, after an edited reload, after a restart on the same
    database (the usual deploy), each on a fresh daemon per repeat."""
    case = "memory"
    for count in (0, *SCALE_ENTRIES):
        rest: dict[str, list[float]] = {"start": [], "edit": [], "restart": []}
        peak: list[float] = []
        for run in range(MEMORY_REPEATS):
            daemon, start_day = scale_daemon(root, f"mem{count}-{run}", count)
            with daemons([daemon]):
                daemon.wait_ready(SCALE_READY_TIMEOUT)
                rest["start"].append(rest_rss(daemon))
                peak.append(vm_field(daemon.pid, "VmHWM"))
                if count:
                    edited_reload(daemon, count, start_day, 2)
                    rest["edit"].append(rest_rss(daemon))
                    daemon.stop()
                    daemon.start()
                    daemon.wait_ready(SCALE_READY_TIMEOUT)
                    rest["restart"].append(rest_rss(daemon))
            last = rest["start"][-1]
            progress(f"{case}: {count * 52} pending, run {run + 1}: rest {last:.1f} MB")
        label = f"{count * 52:,} pending ({count} weekly entries)" if count else "no schedules"
        if not count:
            table.add(case, f"RSS at rest, {label} (the floor)", spread(rest["start"], "MB"))
            continue
        target = SCALE_TARGET_RSS_MB[count]
        for when, values in (
            ("after a cold start", rest["start"]),
            ("after an edited reload", rest["edit"]),
            ("after a restart on its database", rest["restart"]),
        ):
            metric = f"RSS at rest {when}, {label}"
            judge_spread(table, case, metric, values, unit="MB", limit=target)
        table.add(case, f"peak RSS during the cold start (VmHWM), {label}", spread(peak, "MB"))


def sighup_figure(daemon: Daemon, kind: str) -> tuple[float, float]:
    """SIGHUP; the daemon's own figures from its next reload line, which must be of ``kind``:
    the reload's milliseconds, and those it then spent giving memory back (0 when none)."""
    before = len(_RELOAD_LINE_RE.findall(daemon.output()))
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + LOG_LINE_TIMEOUT
    while True:
        daemon._check_alive()
        found = list(_RELOAD_LINE_RE.finditer(daemon.output()))
        if len(found) > before:
            line = found[before]
            if line["kind"] != kind:
                raise BenchError(f"expected a reload line 'config {kind}', got {line[0]!r}")
            return float(line["ms"]), float(line["back"] or 0.0)
        if time.monotonic() > deadline:
            raise BenchError(f"no 'config {kind} (SIGHUP)' line in {LOG_LINE_TIMEOUT:g} s")
        time.sleep(0.005)


def case_reload(root: Path, table: Table) -> None:
    case = "reload"
    for count in SCALE_ENTRIES:
        daemon, start_day = scale_daemon(root, f"reload{count}", count)
        pending = count * 52
        with daemons([daemon]):
            daemon.wait_ready(SCALE_READY_TIMEOUT)
            time.sleep(MEMORY_SETTLE_SECONDS)
            noop = [sum(sighup_figure(daemon, "unchanged")) for _ in range(RELOAD_REPEATS)]
            edit: list[float] = []
            back: list[float] = []
            for run in range(RELOAD_REPEATS):
                daemon.write_schedules(weekly_entries(count, start_day, edited=2 * (run % 2 + 1)))
                reload_ms, back_ms = sighup_figure(daemon, "loaded")
                edit.append(reload_ms + back_ms)
                back.append(back_ms)
        noop_metric = f"no-op SIGHUP reload, {pending:,} pending (daemon's own figure)"
        edit_metric = f"SIGHUP after one entry edited, {pending:,} pending (memory given back too)"
        if count == RELOAD_TARGET_ENTRIES:
            judge_spread(table, case, noop_metric, noop, unit="ms", limit=TARGET_SCALE_NOOP_MS)
            judge_spread(table, case, edit_metric, edit, unit="ms", limit=TARGET_SCALE_EDIT_MS)
        else:
            table.add(case, noop_metric, spread(noop, "ms"))
            table.add(case, edit_metric, spread(edit, "ms"))
        table.add(
            case, "  of which giving memory back (gc, idle connections, trim)", spread(back, "ms")
        )


SUBCOMMANDS: dict[str, Callable[[Path, Table], None]] = {
    "memory": case_memory,
    "reload": case_reload,
}


def cli(argv: list[str]) -> int:
    """``bench.py memory`` and ``bench.py reload`` run those; anything else goes to ``main``."""
    if not argv or argv[0] not in SUBCOMMANDS:
        return main(argv)
    if len(argv) > 1:
        print(f"usage: bench.py {'|'.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    table = Table()
    name = argv[0]
    try:
        with tempfile.TemporaryDirectory(prefix=f"courtbot-bench-{name}-") as scratch:
            progress(f"scratch directory {Path(scratch)}; python {sys.executable}")
            run_case(name, table, lambda: SUBCOMMANDS[name](Path(scratch), table))
    finally:
        kill_children()
    progress(f"finished in {time.monotonic() - _STARTED:.0f} s")
    print(f"machine: {machine()}\n")
    print(table.render(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
