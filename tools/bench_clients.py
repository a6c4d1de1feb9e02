"""The ways to send a booking at its instant that ``make bench`` compares, each run by itself
as ``python tools/bench_clients.py METHOD PLAN_FILE`` (a process of its own, as a user's
program would be; the club is another process).

PLAN_FILE is JSON: ``url``, ``verify`` (true or a CA file), ``timeout``, ``token``, ``lead``
(seconds before its trigger that a booking thread starts, as the daemon's jobs start ahead),
and ``shots``: ``[{"key", "trigger", "court", "start"}]``. Shots that share a trigger are one
burst. Stdout gets one JSON line per shot (``key`` and ``status`` or ``error``), then ``done``.

Methods:
- ``poll``: a loop that looks every second for bookings that are due and sends each with a
  fresh ``requests.post`` (in a thread of its own, so a burst is not sent one by one).
- ``aps-fresh``: an APScheduler date job per booking at its trigger, a fresh ``requests.post``
  (what most booking bots do), with as many workers as bookings.
- ``aps-warm``: the same with a ``requests.Session`` per booking whose connection was opened
  ahead by a HEAD request (a probe that courtbot may not send, CONTRACT section 6): the
  strongest naive rival.
- ``bot``: courtbot's sending path today, as the daemon runs it at the instant: one thread per
  booking started ``lead`` ahead, ``ClubClient.prepare`` and ``warm`` ahead, bot's
  ``TriggerGate``, ``release``, ``ClubClient.send`` (requests), switch interval 0.5 ms.
- ``wire``: the same threads with ``wire``: bytes built and connections opened ahead, one
  writer per instant (``wire.BurstGate``), each thread reading its own answer.

``CRON_CODE`` is what the bench starts as a fresh ``python -c`` process at a trigger (a cron
job): it imports requests and sends (several bookings at once each in a thread).

For ``https`` with ``verify`` a CA file, ``bot`` is made to trust that CA where it would
trust certifi's bundle (the daemon has no setting for a private CA).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CRON_CODE = """
import json, sys, threading
import requests
plan = json.loads(sys.argv[1])
def post(shot):
    try:
        requests.post(plan["url"], json=shot["body"], headers=shot["headers"],
                      timeout=plan["timeout"], verify=plan["verify"])
    except requests.RequestException as exc:
        print("error", exc, file=sys.stderr)
threads = [threading.Thread(target=post, args=(shot,)) for shot in plan["shots"]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


def body_of(shot: dict[str, Any]) -> dict[str, Any]:
    """Section 6's booking body for a shot."""
    start = datetime.fromtimestamp(shot["start"], UTC)
    return {
        "court_id": shot["court"],
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=60)).isoformat(),
        "duration_minutes": 60,
    }


def headers_of(plan: dict[str, Any], shot: dict[str, Any]) -> dict[str, str]:
    return {
        "User-Agent": "courtbot/1.0",
        "Authorization": f"Bearer {plan['token']}",
        "Content-Type": "application/json",
        "Idempotency-Key": shot["key"],
    }


def cron_argument(plan: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The JSON argument of one CRON_CODE process sending ``shots``."""
    return json.dumps(
        {
            "url": plan["url"],
            "timeout": plan["timeout"],
            "verify": plan["verify"],
            "shots": [{"body": body_of(s), "headers": headers_of(plan, s)} for s in shots],
        }
    )


class Results:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lines: list[dict[str, Any]] = []

    def add(
        self,
        key: str,
        status: int | None = None,
        error: str | None = None,
        wrote: float | None = None,
        loop: tuple[float, float] | None = None,
    ) -> None:
        """One shot's outcome; ``wrote``: the clock when its request was written, ``loop``: the
        wall and CPU seconds of the write loop it was in (when the method knows them)."""
        with self.lock:
            self.lines.append(
                {"key": key, "status": status, "error": error, "wrote": wrote, "loop": loop}
            )

    def emit(self) -> None:
        for line in self.lines:
            print(json.dumps(line))
        print("done", flush=True)


def start_threads_ahead(
    plan: dict[str, Any], booking: Callable[[dict[str, Any]], None]
) -> list[threading.Thread]:
    """One thread per shot, each started ``lead`` before its trigger."""
    threads = []
    for shot in sorted(plan["shots"], key=lambda s: s["trigger"]):
        pause = shot["trigger"] - plan["lead"] - time.time()
        if pause > 0:
            time.sleep(pause)
        thread = threading.Thread(target=booking, args=(shot,))
        thread.start()
        threads.append(thread)
    return threads


# --------------------------------------------------------------------------- naive ways


def run_poll(plan: dict[str, Any], results: Results) -> None:
    import requests

    def post(shot: dict[str, Any]) -> None:
        try:
            answer = requests.post(
                plan["url"],
                json=body_of(shot),
                headers=headers_of(plan, shot),
                timeout=plan["timeout"],
                verify=plan["verify"],
            )
            results.add(shot["key"], answer.status_code)
        except requests.RequestException as exc:
            results.add(shot["key"], error=exc.__class__.__name__)

    pending = sorted(plan["shots"], key=lambda s: s["trigger"])
    threads: list[threading.Thread] = []
    while pending:
        now = time.time()
        while pending and pending[0]["trigger"] <= now:
            thread = threading.Thread(target=post, args=(pending.pop(0),))
            thread.start()
            threads.append(thread)
        time.sleep(1.0)
    for thread in threads:
        thread.join()


def run_apscheduler(plan: dict[str, Any], results: Results, *, warm: bool) -> None:
    import requests
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    shots = plan["shots"]
    sessions: dict[str, requests.Session] = {}

    def probe(shot: dict[str, Any]) -> None:
        session = requests.Session()
        session.verify = plan["verify"]
        try:
            session.head(plan["url"], timeout=plan["timeout"], verify=plan["verify"])
        except requests.RequestException as exc:
            print(f"probe {shot['key']}: {exc}", file=sys.stderr)
        sessions[shot["key"]] = session

    def post(shot: dict[str, Any]) -> None:
        sender: Any = sessions.get(shot["key"], requests) if warm else requests
        try:
            answer = sender.post(
                plan["url"],
                json=body_of(shot),
                headers=headers_of(plan, shot),
                timeout=plan["timeout"],
                verify=plan["verify"],
            )
            results.add(shot["key"], answer.status_code)
        except requests.RequestException as exc:
            results.add(shot["key"], error=exc.__class__.__name__)

    workers = max(10, *_burst_sizes(shots))
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(max_workers=workers)}, timezone=UTC
    )
    for shot in shots:
        scheduler.add_job(
            post,
            "date",
            run_date=datetime.fromtimestamp(shot["trigger"], UTC),
            args=[shot],
            id=shot["key"],
            misfire_grace_time=None,
        )
    scheduler.start()
    if warm:
        for thread in start_threads_ahead(plan, probe):
            thread.join()
    last = max(s["trigger"] for s in shots)
    deadline = last + plan["timeout"] + 2
    while time.time() < deadline and len(results.lines) < len(shots):
        time.sleep(0.05)
    scheduler.shutdown(wait=False)


def _burst_sizes(shots: list[dict[str, Any]]) -> list[int]:
    sizes: dict[float, int] = {}
    for shot in shots:
        sizes[shot["trigger"]] = sizes.get(shot["trigger"], 0) + 1
    return list(sizes.values())


# --------------------------------------------------------------------------- courtbot's ways


def _trust_ca_in_bot(ca: str) -> None:
    """Make bot's ``warm`` (which asks for certifi's bundle) take ``ca`` instead; the session
    itself is given ``ca`` as its ``verify``."""
    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.get_connection_with_tls_context

    def with_ca(self: HTTPAdapter, request: Any, verify: Any, *args: Any, **kw: Any) -> Any:
        return original(self, request, ca if verify is True else verify, *args, **kw)

    HTTPAdapter.get_connection_with_tls_context = with_ca  # type: ignore[method-assign]


def _warm_requests(client: Any, url: str) -> Any:
    """A connection opened ahead in the client's urllib3 pool and kept aside until
    ``_release``: how courtbot's requests path held one before the first request of a trigger
    went through ``wire`` (the daemon now falls back to requests only without such a
    connection). None when none could be opened."""
    import requests

    try:
        request = requests.Request("POST", url).prepare()
        adapter = client.session.get_adapter(url)
        pool = adapter.get_connection_with_tls_context(request, verify=client.session.verify)
        conn = pool._get_conn(timeout=0.1)
        if conn.sock is None:
            conn.timeout = client.timeout
            conn.connect()
    except Exception:  # noqa: BLE001 (the send then opens its own and reports)
        return None
    return pool, conn


def _release(held: Any) -> None:
    if held is not None:
        pool, conn = held
        pool._put_conn(conn)


def run_bot(plan: dict[str, Any], results: Results) -> None:
    import bot
    import club_client

    sys.setswitchinterval(0.0005)  # as main.py sets it for the daemon
    client = club_client.ClubClient(timeout=plan["timeout"])
    if plan["url"].startswith("https") and plan["verify"] is not True:
        _trust_ca_in_bot(plan["verify"])
        client.session.verify = plan["verify"]
    gate = bot.TriggerGate()
    ctx: Any = SimpleNamespace(clock=time.time, stop=threading.Event())

    def booking(shot: dict[str, Any]) -> None:
        spec = club_client.RequestSpec(
            "POST", plan["url"], headers_of(plan, shot), json.dumps(body_of(shot)).encode()
        )
        prepared = client.prepare(spec)
        trigger = shot["trigger"]
        held = _warm_requests(client, plan["url"]) if time.time() < trigger - 0.05 else None
        try:
            gate.wait(ctx, trigger)
        finally:
            _release(held)
        try:
            results.add(shot["key"], client.send(prepared).status)
        except club_client.BookingError as exc:
            results.add(shot["key"], error=str(exc))

    for thread in start_threads_ahead(plan, booking):
        thread.join()
    client.close()


def run_wire(plan: dict[str, Any], results: Results) -> None:
    import club_client
    import wire

    sys.setswitchinterval(0.0005)
    client = club_client.ClubClient(timeout=plan["timeout"])
    gate = wire.BurstGate(timeout=plan["timeout"])
    verify = plan["verify"]

    def booking(shot: dict[str, Any]) -> None:
        spec = club_client.RequestSpec(
            "POST", plan["url"], headers_of(plan, shot), json.dumps(body_of(shot)).encode()
        )
        data = wire.request_bytes(client.prepare(spec))
        try:
            conn = wire.connect(plan["url"], timeout=plan["timeout"], verify=verify)
        except wire.WireError as exc:
            results.add(shot["key"], error=str(exc))
            return
        sent = gate.send(shot["trigger"], conn, data)
        if sent is None:
            results.add(shot["key"], error="stopped")
            return
        loop = (sent.burst_wall, sent.burst_cpu)
        try:
            results.add(shot["key"], sent.answer().status, wrote=sent.sent_clock, loop=loop)
        except wire.WireError as exc:
            results.add(shot["key"], error=str(exc), wrote=sent.sent_clock, loop=loop)
        finally:
            sent.connection.close()

    for thread in start_threads_ahead(plan, booking):
        thread.join()


METHODS: dict[str, Callable[[dict[str, Any], Results], None]] = {
    "poll": run_poll,
    "aps-fresh": lambda plan, results: run_apscheduler(plan, results, warm=False),
    "aps-warm": lambda plan, results: run_apscheduler(plan, results, warm=True),
    "bot": run_bot,
    "wire": run_wire,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in METHODS:
        print(f"usage: bench_clients.py {{{','.join(METHODS)}}} PLAN_FILE", file=sys.stderr)
        return 2
    plan = json.loads(Path(argv[1]).read_text())
    results = Results()
    print("ready", flush=True)
    METHODS[argv[0]](plan, results)
    results.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
