"""Small servers and probes for tests/test_reliability.py: a recording HTTP server (any loopback
address), an SMTP server that keeps every message's raw bytes, a secret scanner, /proc readings.

Everything listens on the loopback interface and is stopped by the context manager that started it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- HTTP recorder


@dataclass(frozen=True)
class Recorded:
    """One request the recorder saw."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _RecorderServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[Recorded]
    lock: threading.Lock


class _RecorderHandler(BaseHTTPRequestHandler):
    server: _RecorderServer

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append(
                Recorded(self.command, self.path, dict(self.headers.items()), body)
            )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _record

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads ``requests``."""


@contextmanager
def http_recorder(host: str = "127.0.0.1") -> Iterator[tuple[int, list[Recorded]]]:
    """An HTTP server on ``host`` (port 0) answering 200 ``{}`` to everything; yields
    (port, the live list of what it received)."""
    server = _RecorderServer((host, 0), _RecorderHandler)
    server.requests = []
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), server.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def trickle_server(length: int = 400, interval: float = 0.25) -> Iterator[tuple[int, list[float]]]:
    """An HTTP server on 127.0.0.1 that answers every request ``201`` with a body of ``length``
    bytes sent one byte every ``interval`` seconds (a club, or a proxy, dribbling its answer).
    Yields (port, the ``time.time()`` of every request's arrival)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    arrivals: list[float] = []
    clients: list[socket.socket] = []

    def serve(client: socket.socket) -> None:
        with client:
            data = b""
            while b"\r\n\r\n" not in data and not stop.is_set():
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            arrivals.append(time.time())
            head = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            head += f"Content-Length: {length}\r\n\r\n"
            try:
                client.sendall(head.encode())
                for _ in range(length):
                    if stop.wait(interval):
                        return
                    client.sendall(b" ")
            except OSError:
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            clients.append(client)
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], arrivals
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


#: What an evil club does once a request's head (given, as far as it was read) has arrived: write
#: to the client socket as it likes until the stop event is set (the server is closing).
Misbehaviour = Callable[[socket.socket, bytes, threading.Event], None]


@contextmanager
def evil_server(
    misbehave: Misbehaviour, *, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[int, list[float]]]:
    """A club on 127.0.0.1 (port 0, TLS with ``tls``) that reads each request's head and then
    lets ``misbehave`` answer. Yields (port, the ``time.time()`` of every request's arrival)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    arrivals: list[float] = []
    clients: list[socket.socket] = []

    def serve(client: socket.socket) -> None:
        try:
            conn = client if tls is None else tls.wrap_socket(client, server_side=True)
        except OSError:  # the client refused our certificate
            client.close()
            return
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data and not stop.is_set():
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                arrivals.append(time.time())
                misbehave(conn, data, stop)
            except OSError:  # the client gave up
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            clients.append(client)
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], arrivals
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)


def self_signed_context(tmp_path: Path, host: str = "127.0.0.1") -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate for ``host`` (an IP
    address), made with ``cryptography``: valid in every field, trusted by nobody."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "club-cert.pem", tmp_path / "club-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


# --------------------------------------------------------------------------- SMTP


@dataclass
class RawMailbox:
    """aiosmtpd handler keeping each message's bytes exactly as they came over the wire."""

    raw: list[bytes] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        self.raw.append(bytes(content))
        return "250 OK"


@contextmanager
def smtp_server() -> Iterator[tuple[int, RawMailbox]]:
    """aiosmtpd on 127.0.0.1 (a free port), plain SMTP; yields (port, mailbox)."""
    mailbox = RawMailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller.port, mailbox
    finally:
        controller.stop()


# --------------------------------------------------------------------------- secrets


def secret_forms(secret: str) -> dict[str, bytes]:
    """The ways a secret could leak into bytes: as is, URL-encoded, and base64 (standard and
    URL-safe) at each of the three alignments a surrounding stream can give it. For base64
    only the characters fully determined by the secret are kept."""
    raw = secret.encode()
    forms = {"plain": raw, "url": quote(secret, safe="").encode()}
    forms["url+"] = quote_plus(secret).encode()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        # Drop the characters that mix in the prefix, and the last group (mixes what follows).
        head = (shift * 8 + 5) // 6 if shift else 0
        core = encoded[head : (len(encoded) // 4 - 1) * 4]
        if len(core) >= 8:
            forms[f"b64@{shift}"] = core
            forms[f"b64url@{shift}"] = core.replace(b"+", b"-").replace(b"/", b"_")
    return forms


def scan(blobs: dict[str, bytes], secrets: Iterable[str]) -> list[str]:
    """Every (where, which secret form) hit; [] when nothing leaked."""
    hits = []
    for secret in secrets:
        for form, needle in secret_forms(secret).items():
            for where, blob in blobs.items():
                if needle in blob:
                    hits.append(f"{where}: {form} form of a token")
    return hits


def files_under(folder: Path) -> dict[str, bytes]:
    """Every regular file below ``folder`` (hidden ones too), by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- probes


def proc_status_kb(pid: int, field_name: str) -> int:
    """A ``kB`` figure (VmRSS, VmHWM, ...) from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field_name}")


def db_rows(database: Path) -> dict[str, tuple[str, int]]:
    """key -> (status, attempts), read straight from the SQLite file ({} before it exists)."""
    if not database.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
            rows = conn.execute("SELECT key, status, attempts FROM schedules").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {key: (state, attempts) for key, state, attempts in rows}
