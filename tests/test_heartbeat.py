"""heartbeat.py: the dead-man's switch (CONTRACT section 2, HEARTBEAT_URL) against a real HTTP
server on 127.0.0.1: the first ping at start, then every interval while healthy; failures logged
with the URL masked and nothing else changed; a hanging service never holds anyone up."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import utils
from conftest import PingServer
from heartbeat import PING_SECONDS, Pinger


def test_pings_at_start_then_every_interval_while_healthy(ping_server: PingServer) -> None:
    pinger = Pinger(ping_server.url("/ping/abc?rid=1"), healthy=lambda: True, interval=0.05)
    pinger.start()
    try:
        assert ping_server.wait_for(3)
    finally:
        pinger.close()
    assert set(ping_server.paths) == {"/ping/abc?rid=1"}
    assert PING_SECONDS == 300.0  # about every 5 minutes in the daemon


def test_no_ping_while_not_healthy(ping_server: PingServer) -> None:
    healthy = threading.Event()
    pinger = Pinger(ping_server.url("/p"), healthy=healthy.is_set, interval=0.05)
    pinger.start()
    try:
        assert not ping_server.wait_for(1, timeout=0.3)
        healthy.set()
        assert ping_server.wait_for(1)
    finally:
        pinger.close()


def test_the_first_success_is_logged_once_with_the_url_masked(
    ping_server: PingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="heartbeat")
    url = ping_server.url("/5e3c7a-secret-uuid")
    pinger = Pinger(url, healthy=lambda: True, interval=3600)
    assert pinger.ping() and pinger.ping()
    host = url.split("/")[2]
    assert caplog.messages == [
        f"heartbeat ping to http://{host}/****: ok (HTTP 200); every 3600 s while healthy"
    ]


@pytest.mark.parametrize("status", [404, 500])
def test_an_error_answer_is_logged_masked_and_changes_nothing_else(
    ping_server: PingServer, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.INFO, logger="heartbeat")
    ping_server.status = status
    url = ping_server.url("/5e3c7a-secret-uuid")
    pinger = Pinger(url, healthy=lambda: True)
    assert pinger.ping() is False
    ping_server.status = 200
    assert pinger.ping() is True
    host = url.split("/")[2]
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "heartbeat"] == [
        (
            logging.WARNING,
            f"heartbeat ping to http://{host}/****: failed: HTTP {status}; bookings go on, the "
            "monitor may alert",
        ),
        (logging.INFO, f"heartbeat ping to http://{host}/****: ok again (HTTP 200)"),
    ]
    assert "secret" not in caplog.text


def test_a_service_that_is_down_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pinger = Pinger(f"http://user:pw@127.0.0.1:{port}/secret", healthy=lambda: True)
    assert pinger.ping() is False
    assert caplog.messages == [
        f"heartbeat ping to http://127.0.0.1:{port}/****: failed: ConnectionError; bookings go "
        "on, the monitor may alert"
    ]


def test_a_hanging_service_is_bounded_and_holds_no_one_up(
    ping_server: PingServer, caplog: pytest.LogCaptureFixture
) -> None:
    ping_server.hold.set()
    pinger = Pinger(ping_server.url("/p"), healthy=lambda: True, timeout=0.2)
    assert pinger.ping() is False  # the timeout ends it, the service still holding
    assert "failed: no answer within 0.2 s" in caplog.text
    assert not ping_server.released.is_set()

    background = Pinger(ping_server.url("/q"), healthy=lambda: True, timeout=30)
    background.start()  # returns at once: the ping runs on its own thread
    assert ping_server.wait_for(2)
    background.close(timeout=0.1)  # nor does closing wait for the ping in flight
    assert not ping_server.released.is_set()


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://hc-ping.com/5e3c7a5b-uuid", "https://hc-ping.com/****"),
        ("https://kuma.example:3001/api/push/Ab12?status=up", "https://kuma.example:3001/****"),
        ("https://user:pw@monitor.example/", "https://monitor.example/****"),
        ("https://monitor.example", "https://monitor.example"),
        ("http://[::1]:8080/x", "http://[::1]:8080/****"),
        ("not a url", "****"),
    ],
)
def test_mask_url_secrets(url: str, masked: str) -> None:
    assert utils.mask_url_secrets(url) == masked


@pytest.mark.parametrize(
    ("url", "valid"),
    [
        ("https://hc-ping.com/x", True),
        ("http://127.0.0.1:8000/x", True),
        ("ftp://hc-ping.com/x", False),
        ("hc-ping.com/x", False),
        ("https:///x", False),
        ("https://host:0/x", False),
        ("https://host:99999/x", False),
    ],
)
def test_is_http_url(url: str, valid: bool) -> None:
    assert utils.is_http_url(url) is valid
