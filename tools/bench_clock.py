"""``python tools/bench.py clock`` (part of ``make bench``): booking by the club's clock.

The club (``tools/stamp_club.py``, kernel receive stamps) runs its clock ``offset`` seconds from
ours and stamps its answers' ``Date`` with it; its window opens at the trigger *by its own
clock*, which is our ``trigger - offset``. For each offset:

- courtbot: a real daemon whose request template has ``"clock": {"url": ".../ping"}``; it
  measures the club's clock within the preparation time and sends by it.
- JCbook's method, in this process, in the same run and on the same club: one ``GET`` read ahead
  of the trigger, the club's clock taken as that ``Date`` plus half the round trip, and the
  booking written on a connection opened ahead at the trigger by that estimate.

The figure is each booking's arrival at the club minus the club's own opening instant (negative:
before it, which a real club answers 425 or, worse, counts against us), min / median / max over
the repeats. Target (issue 24): courtbot's median 0 to 20 ms, none before.
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from bench import (
    WINDOW_SECONDS,
    ClubProcess,
    Daemon,
    Spread,
    Table,
    daemons,
    iso_z,
    kill_children,
    machine,
    progress,
    run_case,
    wait_for_keys,
)

#: The issue's two clubs, then the sweep (fewer repeats each).
OFFSETS = (0.7, -0.45)
SWEEP = (-2.0, -1.0, -0.2, 0.3, 1.0, 2.0)
REPEATS = 5
SWEEP_REPEATS = 2
#: Seconds between two bookings of one daemon, and before its first trigger (start, load,
#: then the measurement: about five seconds of requests).
SPACING = 3.0
FIRST_AFTER = 30.0
#: JCbook's read of the Date comes this long before its trigger.
RIVAL_READ_AHEAD = 5.0
TARGET_MEDIAN_MS = (0.0, 20.0)


def _template(club: ClubProcess) -> dict[str, Any]:
    return {
        "method": "POST",
        "url": club.url(),
        "headers": {"Authorization": "Bearer {token}", "Content-Type": "application/json"},
        "json": {"court_id": "{court_id}", "start": "{start}", "end": "{end}"},
        "clock": {"url": club.url("/ping")},
    }


def _entries(
    first: float, count: int, prefix: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    entries, triggers = [], {}
    for k in range(count):
        desired = math.ceil(first + WINDOW_SECONDS) + k * SPACING
        entry_id = f"{prefix}{k:02d}"
        entries.append(
            {"id": entry_id, "type": "one-off", "desired_time": iso_z(desired), "court_id": "3"}
        )
        triggers[f"{entry_id}@{iso_z(desired)}"] = desired - WINDOW_SECONDS
    return entries, triggers


def _http_date(port: int) -> tuple[float, float, float]:
    """JCbook's read: (sent, received, Date) of one GET on a fresh connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sent = time.time()
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: club\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        received = time.time()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    value = next(
        line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("date:")
    )
    return sent, received, parsedate_to_datetime(value.strip()).timestamp()


def _rival(port: int, key: str, trigger: float) -> None:
    """JCbook's method for one booking: its club-clock estimate, then the send by it."""
    time.sleep(max(0.0, trigger - RIVAL_READ_AHEAD - time.time()))
    sent, received, date = _http_date(port)
    estimate = date + (received - sent) / 2 - received  # the club's clock minus ours
    body = json.dumps({"court_id": "3"}).encode()
    request = (
        f"POST /bookings HTTP/1.1\r\nHost: club\r\nIdempotency-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        at = trigger - estimate
        while (left := at - time.time()) > 0.002:
            time.sleep(left - 0.002)
        while time.time() < at:
            pass
        sock.sendall(request)
        sock.recv(4096)


def _one_offset(root: Path, offset: float, repeats: int) -> tuple[list[float], list[float], int]:
    """Lateness after the club's opening (ms) of courtbot's bookings and of JCbook's, and how
    many of courtbot's never arrived."""
    club = ClubProcess(tls=None)
    club.command(f"offset {offset}")
    name = f"clock{offset:+.2f}".replace(".", "_")
    template = root / f"{name}.json"
    try:
        template.write_text(json.dumps(_template(club)))
        daemon = Daemon(root, name, club.url(), BOOKING_REQUEST_TEMPLATE=str(template))
        entries, triggers = _entries(time.time() + FIRST_AFTER, repeats, "c")
        daemon.write_schedules(entries)
        rivals = {f"jc-{offset}-{k}": t + SPACING / 2 for k, t in enumerate(triggers.values())}
        threads = [
            threading.Thread(target=_rival, args=(club.port, key, t), daemon=True)
            for key, t in rivals.items()
        ]
        with daemons([daemon]):
            daemon.start()
            daemon.wait_ready()
            for thread in threads:
                thread.start()
            last = max([*triggers.values(), *rivals.values()])
            deadline = time.monotonic() + (last - time.time()) + 20.0
            seen = wait_for_keys(club, set(triggers) | set(rivals), deadline)
            for thread in threads:
                thread.join(10)
    finally:
        club.stop()

    def late(plan: dict[str, float]) -> list[float]:
        # The club opens at the trigger by its clock: our trigger - offset.
        return [
            (seen[key]["arrived"] - (trigger - offset)) * 1000
            for key, trigger in plan.items()
            if key in seen
        ]

    ours, theirs = late(triggers), late(rivals)
    progress(
        f"clock {offset:+.2f} s: courtbot {', '.join(f'{v:.1f}' for v in ours)} ms; "
        f"JCbook {', '.join(f'{v:.1f}' for v in theirs)} ms"
    )
    return ours, theirs, len(triggers) - len(ours)


def case_clock(root: Path, table: Table) -> None:
    case = "f. the club's clock"
    root.mkdir(parents=True, exist_ok=True)
    swept: list[tuple[float, list[float], list[float]]] = []
    for offset in OFFSETS:
        ours, theirs, missing = _one_offset(root, offset, REPEATS)
        spread = Spread.of(ours)
        never_early = bool(ours) and min(ours) >= 0
        table.add(
            case,
            f"club {offset * 1000:+.0f} ms: courtbot after the club opened",
            spread.text(),
            "median 0-20 ms, none before",
            never_early and TARGET_MEDIAN_MS[0] <= spread.median <= TARGET_MEDIAN_MS[1],
            note="" if not missing else f"{missing} booking(s) never arrived",
        )
        table.add(
            case,
            f"club {offset * 1000:+.0f} ms: JCbook (one Date + half the round trip)",
            Spread.of(theirs).text(),
        )
        table.add(
            case,
            f"club {offset * 1000:+.0f} ms: our clock alone (no clock key)",
            f"{offset * 1000:+.0f} ms (the club's offset itself; before: 425, then retries)",
        )
    for offset in SWEEP:
        ours, theirs, _ = _one_offset(root, offset, SWEEP_REPEATS)
        swept.append((offset, ours, theirs))
    every = [v for _, ours, _ in swept for v in ours]
    table.add(
        case,
        f"sweep {', '.join(f'{o:+g}' for o in SWEEP)} s: courtbot",
        Spread.of(every).text(),
        "none before",
        bool(every) and min(every) >= 0,
    )
    table.add(
        case,
        "sweep: JCbook",
        Spread.of([v for _, _, theirs in swept for v in theirs]).text(),
    )


def main() -> int:
    """Run the case and print its table (figures for docs/performance.md)."""
    table = Table()
    try:
        with tempfile.TemporaryDirectory(prefix="courtbot-bench-clock-") as scratch:
            run_case("f. the club's clock", table, lambda: case_clock(Path(scratch), table))
    finally:
        kill_children()
    print(f"machine: {machine()}\n")
    print(table.render(), flush=True)
    return 0
