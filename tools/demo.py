"""``make demo``: the real daemon books a court at the sandbox club the instant its window opens.

Runs from the repository root as ``.venv/bin/python tools/demo.py``. It starts a SandboxClub
in-process, writes a scratch ``demo-data/`` (a plaintext token, one one-off schedule whose
window opens in a few seconds), runs ``main.py run`` against the club, waits for the instance to
be ``booked``, then shows the status table, the now-encrypted tokens.json and how late after the
window opened the club saw the request. Exit 0 on success, 1 with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = "demo-data"
TOKEN = "sandbox-token"  # noqa: S105 (the sandbox club's public demo token, not a secret)
SCHEDULE_ID = "demo-court-3"
WINDOW = timedelta(hours=168)
LEAD = timedelta(seconds=6)
BOOK_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 10.0
FINAL_FAILURES = ("failed", "expired", "cancelled")


class DemoError(Exception):
    """Why the demo failed, in words for the person who ran it."""


def say(text: str = "") -> None:
    """Print one line of the demo's own output."""
    print(text, flush=True)


def stream(pipe: IO[str], prefix: str) -> None:
    """Copy the daemon's output to the terminal, line by line, with a prefix."""
    for line in pipe:
        print(f"{prefix}{line.rstrip()}", flush=True)


def daemon_env(club_url: str, fernet_key: str) -> dict[str, str]:
    """The daemon's environment: the user's, minus anything that would point it elsewhere."""
    env = dict(os.environ)
    for name in ("BOOKING_REQUEST_TEMPLATE", "DATABASE_URL", "NOTIFY_URLS", "NOTIFY_EMAIL"):
        env.pop(name, None)
    env.update(
        FERNET_KEY=fernet_key,
        BOOKING_API_URL=club_url,
        DATA_DIR=DATA_DIR,
        LOG_FILE="-",
        BOOKING_WINDOW="168h",
        PYTHONUNBUFFERED="1",
    )
    return env


def status_rows(env: dict[str, str]) -> list[dict[str, Any]] | None:
    """``main.py status --json`` parsed, or None while it cannot answer yet."""
    try:
        done = subprocess.run(
            [sys.executable, "main.py", "status", "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return None
    return rows if isinstance(rows, list) else None


def wait_until_booked(env: dict[str, str], daemon: subprocess.Popen[str]) -> dict[str, Any]:
    """Poll the status until the demo's instance is booked; returns its row."""
    deadline = time.monotonic() + BOOK_TIMEOUT_SECONDS
    seen: str | None = None
    while time.monotonic() < deadline:
        code = daemon.poll()
        if code is not None:
            raise DemoError(f"the daemon exited with code {code} before booking (see its log)")
        rows = status_rows(env) or []
        row = next((r for r in rows if r.get("schedule") == SCHEDULE_ID), None)
        if row is not None:
            status = row.get("status")
            if status != seen:
                say(f"demo: instance {row.get('key')} is {status}")
                seen = status
            if status == "booked":
                return row
            if status in FINAL_FAILURES:
                raise DemoError(f"the instance ended {status}: {row.get('last_error')}")
        time.sleep(POLL_SECONDS)
    raise DemoError(
        f"no booking within {BOOK_TIMEOUT_SECONDS:.0f} s (last status: {seen or 'not in the DB'})"
    )


def show_status_table(env: dict[str, str]) -> None:
    """Print the plain ``main.py status`` table."""
    done = subprocess.run(
        [sys.executable, "main.py", "status"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    say("$ python main.py status")
    say(done.stdout.rstrip())


def show_tokens_file() -> None:
    """Show that tokens.json now holds the token only encrypted."""
    tokens = json.loads((REPO / DATA_DIR / "tokens.json").read_text())
    value = tokens.get("default") if isinstance(tokens, dict) else None
    if not isinstance(value, str) or value == TOKEN or TOKEN in json.dumps(tokens):
        raise DemoError(f"{DATA_DIR}/tokens.json still holds the plaintext token")
    say(f'{DATA_DIR}/tokens.json now holds: {{"default": "{value[:12]}..."}} (Fernet-encrypted)')


def show_received(club: Any) -> None:
    """What the club received: arrival vs window opening, by the club's clock."""
    say("what the sandbox club received:")
    for record in club.received:
        arrived = datetime.fromtimestamp(record.club_time, UTC).strftime("%H:%M:%S.%f")[:-3]
        if record.opens_at is not None:
            opened = datetime.fromtimestamp(record.opens_at, UTC).strftime("%H:%M:%S.%f")[:-3]
            timing = f"window opened {opened} UTC, arrived {arrived} UTC: "
            timing += f"{record.late_ms:.1f} ms late"
        else:
            timing = f"arrived {arrived} UTC"
        ahead = record.arrived - record.connection_opened
        connection = f"on a connection opened {ahead:.1f} s before it arrived"
        say(
            f"  {record.method} {record.path} -> {record.status}  court={record.court_id} "
            f"key={record.idempotency_key}  {timing} ({connection})"
        )


def stop_daemon(daemon: subprocess.Popen[str]) -> int:
    """SIGTERM, then kill after STOP_TIMEOUT_SECONDS; returns the exit code."""
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"demo: the daemon did not stop within {STOP_TIMEOUT_SECONDS:.0f} s: killing it")
            daemon.kill()
            daemon.wait()
    return daemon.returncode


def run() -> None:
    """The demo; raises DemoError with the reason when it does not book."""
    from cryptography.fernet import Fernet

    from tools.sandbox_club import SandboxClub

    if not (REPO / "main.py").exists():
        raise DemoError("main.py is missing: run the demo from a complete checkout")
    data = REPO / DATA_DIR
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    with SandboxClub(tokens=(TOKEN,), host="127.0.0.1", port=0) as club:
        say(f"demo: sandbox club listening on {club.url} (window 168 h, token {TOKEN!r})")
        fernet_key = Fernet.generate_key().decode()
        desired = datetime.now(UTC).replace(microsecond=0) + WINDOW + LEAD + timedelta(seconds=1)
        schedule = {
            "id": SCHEDULE_ID,
            "type": "one-off",
            "desired_time": desired.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "court_id": 3,
        }
        (data / "tokens.json").write_text(json.dumps({"default": TOKEN}, indent=2) + "\n")
        (data / "schedules.json").write_text(json.dumps([schedule], indent=2) + "\n")
        opens = desired - WINDOW
        say(f"demo: wrote {DATA_DIR}/tokens.json (plaintext) and {DATA_DIR}/schedules.json:")
        say(f"      court 3 at {schedule['desired_time']}, window opens {opens:%H:%M:%S} UTC")
        env = daemon_env(club.url, fernet_key)
        say("demo: starting the daemon: python main.py run")
        daemon = subprocess.Popen(
            [sys.executable, "main.py", "run"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert daemon.stdout is not None
        printer = threading.Thread(target=stream, args=(daemon.stdout, "  daemon | "), daemon=True)
        printer.start()
        code: int | None = None
        try:
            row = wait_until_booked(env, daemon)
            say()
            show_status_table(env)
            say()
            show_tokens_file()
            say()
            show_received(club)
            say()
            say("demo: stopping the daemon (SIGTERM)")
            code = stop_daemon(daemon)
            say(f"demo: the daemon exited with code {code}")
        finally:
            if code is None:
                stop_daemon(daemon)
            printer.join(2)
        if club.bookings_per_key().get(row.get("key")) != 1:
            raise DemoError("the club does not hold exactly one booking for the instance")
        if code != 0:
            raise DemoError(f"the daemon exited {code} on SIGTERM instead of 0")
        say(f"demo: booked court 3, booking reference {row.get('booking_ref')}")


def main() -> int:
    """Run the demo; returns the exit code."""
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    try:
        run()
    except DemoError as exc:
        say(f"demo FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("demo: interrupted")
        return 1
    say("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
