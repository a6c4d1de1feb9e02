"""logs.py: one event, one line; a log file that cannot be written is said once."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import cli
from config_loader import Settings
from logs import setup_logging
from mounts import fill, small_disk

pytestmark = pytest.mark.usefixtures("keep_root_logging")


def test_every_log_event_is_one_line_whatever_its_values_hold(
    env: dict[str, str], data_dir: Path
) -> None:
    log_file = data_dir / "bot.log"
    setup_logging(Settings.from_env(env | {"LOG_FILE": str(log_file)}))
    log = logging.getLogger("bot")
    forged = "bk-1\r\n2026-11-23T12:00:00.000Z ERROR bot: forged\x1b[2J\x85\u2028"
    log.warning("booked %s ref=%s", "k@2026-12-02T17:00:00Z", forged)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("unexpected")
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = log_file.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        " WARNING bot: booked k@2026-12-02T17:00:00Z ref=bk-1\\r\\n2026-11-23T12:00:00.000Z "
        "ERROR bot: forged\\x1b[2J\\x85\\u2028"
    )
    assert re.fullmatch(
        r"\S+Z ERROR bot: unexpected\\nTraceback \(most recent call last\):\\n.*"
        r"\\nValueError: boom\\nsecond line",
        lines[1],
    )


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_console_keeps_every_line(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        log_file = disk / "bot.log"
        setup_logging(cli.load_settings(env | {"LOG_FILE": str(log_file)}))
        log = logging.getLogger("courtbot")
        log.warning("before")
        filler = fill(disk)
        for n in range(3):
            log.warning("line %d %s", n, "x" * 5000)  # more than the page the file has left
        filler.unlink()
        log.warning("after")

        err = capsys.readouterr().err
        text = log_file.read_text()

    assert "Logging error" not in err and "Traceback" not in err
    said = [line for line in err.splitlines() if "the log file" in line]
    assert [line.split(" ", 1)[1] for line in said] == [
        f"ERROR courtbot: cannot write the log file {log_file} (No space left on device); the "
        "console still gets every line",
        f"WARNING courtbot: the log file {log_file} is written again",
    ]
    assert all(f"line {n} " in err for n in range(3))
    assert "before" in text and "after" in text
