"""Logging set-up for the daemon and the commands: the console always, the log file when
LOG_FILE is set (rotated), UTC ISO timestamps, one event per line (control characters escaped).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

from config_loader import Settings
from notify import escape_controls

logger = logging.getLogger("courtbot")

LOG_FILE_BYTES = 5 * 1024 * 1024
LOG_FILE_BACKUPS = 3


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
