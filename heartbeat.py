"""The dead-man's switch (CONTRACT section 2, ``HEARTBEAT_URL``).

While the daemon is healthy, ``Pinger`` sends a GET to a monitoring service's ping URL (a
healthchecks.io check, an Uptime Kuma push monitor...) about every ``PING_SECONDS``, the first at
start. Those services alert on silence, so a worker that died or hangs is noticed before a booking
window is missed. The pings run on a thread of their own with a timeout: they never delay a
booking, and a failed one is logged (the URL's secrets masked) and changes nothing else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import requests

import utils

logger = logging.getLogger(__name__)

#: About how often the active, healthy daemon pings.
PING_SECONDS = 300.0
#: Each ping is bounded by this (connect, and each read).
PING_TIMEOUT_SECONDS = 10.0


class Pinger:
    """Pings ``url`` every ``interval`` seconds from its own thread while ``healthy()`` holds,
    the first time as it starts. ``close()`` stops it without waiting for a ping in flight."""

    def __init__(
        self,
        url: str,
        *,
        healthy: Callable[[], bool],
        interval: float = PING_SECONDS,
        timeout: float = PING_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.masked = utils.mask_url_secrets(url)
        self._healthy = healthy
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session = requests.Session()
        # As the club client: no proxies or .netrc from the environment.
        self._session.trust_env = False
        self._session.max_redirects = 3
        self._failing: bool | None = None  # None until the first ping

    def start(self) -> None:
        """Start the pinging thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heartbeat-ping", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 0.5) -> None:
        """Stop pinging; waits at most ``timeout`` for the thread (a ping in flight is left to
        end by itself: the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._session.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._healthy():
                    self.ping()
                else:
                    logger.debug("heartbeat ping to %s skipped: not healthy", self.masked)
            except Exception:
                logger.exception("heartbeat ping to %s: unexpected error", self.masked)
            if self._stop.wait(self._interval):
                return

    def ping(self) -> bool:
        """One GET; True when it was answered with a 2xx. Never raises for the network."""
        try:
            response = self._session.get(self.url, timeout=self._timeout)
            response.close()
        except requests.Timeout:
            return self._failed(f"no answer within {self._timeout:g} s")
        except requests.RequestException as exc:
            return self._failed(f"{exc.__class__.__name__}")
        if not 200 <= response.status_code < 300:
            return self._failed(f"HTTP {response.status_code}")
        if self._failing is None:
            logger.info(
                "heartbeat ping to %s: ok (HTTP %d); every %s s while healthy",
                self.masked,
                response.status_code,
                f"{self._interval:g}",
            )
        elif self._failing:
            logger.info(
                "heartbeat ping to %s: ok again (HTTP %d)", self.masked, response.status_code
            )
        else:
            logger.debug("heartbeat ping to %s: ok (HTTP %d)", self.masked, response.status_code)
        self._failing = False
        return True

    def _failed(self, reason: str) -> bool:
        logger.warning(
            "heartbeat ping to %s: failed: %s; bookings go on, the monitor may alert",
            self.masked,
            reason,
        )
        self._failing = True
        return False
