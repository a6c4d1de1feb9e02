"""A stand-in daemon for the leadership tests: it contends for leadership and says so.

``python tests/leader_child.py URL IDENT``. It prints one line per change, each with
``time.monotonic()`` (one clock for every process on Linux, so the test can subtract):
``standby T``, ``active T BACKEND_PID``, ``lost T``, ``error T MESSAGE``. It polls and checks
at the intervals the daemon will use (leader.POLL_SECONDS, leader.CHECK_SECONDS) and waits
leader.REJOIN_SECONDS after losing leadership before it contends again. SIGTERM
releases leadership and exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import leader
import models


def say(*words: object) -> None:
    print(" ".join(str(word) for word in (words[0], f"{time.monotonic():.6f}", *words[1:])))
    sys.stdout.flush()


def main(url: str, ident: str) -> int:
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    lead = leader.Leadership(url, ident)
    waiting = False
    while not stop.is_set():
        if lead.active:
            if lead.still_held():
                stop.wait(leader.CHECK_SECONDS)
            else:
                say("lost")
                waiting = False
                stop.wait(leader.REJOIN_SECONDS)
            continue
        try:
            acquired = lead.try_acquire()
        except models.DatabaseConnectError as exc:
            say("error", exc)
            stop.wait(leader.POLL_SECONDS)
            continue
        if acquired:
            say("active", lead.backend_pid)
            continue
        if not waiting:
            say("standby")
            waiting = True
        stop.wait(leader.POLL_SECONDS)
    lead.release()
    lead.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
