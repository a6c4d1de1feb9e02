"""HTTP/1.1 at the byte level, for the instant a booking window opens (CONTRACT sections 6, 12).

``requests`` costs about 0.1 ms of Python per request and one thread per request; a burst of
100 bookings at one instant then arrives over 30 ms. Here the requests are turned into their
bytes ahead of the trigger (exactly the bytes ``requests``/``urllib3`` would put on the wire),
their connections are opened ahead (TCP, TLS verified as ``requests`` verifies), and at the
trigger one thread writes them all in a ``sendall`` loop, never before the trigger by the clock
read just before each write. Each booking then reads its own answer with a deadline that bounds
the whole request, from the write to the last byte, whatever the club does (slow headers,
endless ``100 Continue``, an endless body).

Use::

    conn = wire.connect(url, timeout=10)                   # ahead of the trigger
    data = wire.request_bytes(prepared)                    # a requests.PreparedRequest
    (sent,) = wire.send_burst([(conn, data)], trigger, timeout=10)
    answer = sent.answer()                                 # WireAnswer, or raises WireError

or, with one thread per booking, ``BurstGate.send`` collects every booking that shares an
instant and lets one of them write for all.

This module imports no other courtbot module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import certifi
import urllib3
from urllib3.util.ssl_ import create_urllib3_context

#: The default cap on an answer's (decoded) body, as bot reads it.
MAX_BODY_BYTES = 1024 * 1024
#: Wake this long before the trigger and spin on the clock for the rest.
SPIN_SECONDS = 0.003
#: This long before the trigger, held connections the club closed meanwhile are opened again.
REFRESH_SECONDS = 0.25
#: http.client's limits: one line of an answer's head, and header lines in one head.
MAX_LINE = 65536
MAX_HEADERS = 100

_RECV_SIZE = 65536
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PERCENT_RE = re.compile(r"%[a-fA-F0-9]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-~")
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=") | frozenset(":@/")
_QUERY_CHARS = _PATH_CHARS | frozenset("?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --------------------------------------------------------------------------- errors


class WireError(Exception):
    """A request that got no complete answer.

    ``lost``: the request may have reached the club (its answer was lost), so a retry may find
    the court taken by this very request. ``partial``: what had arrived when it broke off (the
    status and headers, the body so far), or None when no status line came.
    """

    def __init__(self, message: str, *, lost: bool, partial: WireAnswer | None = None) -> None:
        super().__init__(message)
        self.lost = lost
        self.partial = partial


class WireTimeout(WireError):
    """No complete answer within the request's deadline."""


# --------------------------------------------------------------------------- request bytes


class PreparedLike(Protocol):
    """What ``request_bytes`` reads: a ``requests.PreparedRequest`` has these."""

    method: str | None
    url: str | None
    headers: Mapping[str, str | bytes]
    body: bytes | str | None


@dataclass(frozen=True)
class Origin:
    """Where a URL's requests go: scheme, host (lowercase, no brackets) and port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"only http and https URLs can be sent, not {scheme or url!r}")
        if not parts.hostname:
            raise ValueError(f"the URL {url!r} names no host")
        return cls(scheme, _ascii_host(parts.hostname), parts.port or _DEFAULT_PORTS[scheme])

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        """The Host header http.client writes for this origin (no port when it is the
        scheme's default; brackets around an IPv6 address; no trailing dot)."""
        host = self.host.rstrip(".")
        if ":" in host:
            host = f"[{host}]"
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _ascii_host(host: str) -> str:
    """The host as urllib3 normalizes it: ASCII labels lowercased, others IDNA-encoded."""
    if host.isascii():
        return host.lower()
    return ".".join(
        label.lower() if label.isascii() else label.encode("idna").decode("ascii")
        for label in host.split(".")
    )


def request_target(url: str) -> str:
    """The request line's target for ``url``: requests' ``path_url`` with urllib3's
    percent-encoding of characters a target may not hold (existing escapes uppercased)."""
    parts = urlsplit(url)
    target = _encode_component(parts.path or "/", _PATH_CHARS)
    if parts.query:
        target += "?" + _encode_component(parts.query, _QUERY_CHARS)
    return target


def _encode_component(text: str, allowed: frozenset[str]) -> str:
    if "%" not in text and text.isascii() and all(c in allowed for c in text):
        return text
    text, escapes = _PERCENT_RE.subn(lambda m: m.group(0).upper(), text)
    raw = text.encode("utf-8", "surrogatepass")
    # Only when every '%' starts an escape is the text already encoded: keep those as they are.
    encoded = escapes == raw.count(b"%")
    out = bytearray()
    for byte in raw:
        if (encoded and byte == 0x25) or (byte < 128 and chr(byte) in allowed):
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return out.decode("ascii")


def _header_bytes(name: str | bytes, value: str | bytes | int) -> bytes:
    raw_name = name.encode("ascii") if isinstance(name, str) else name
    if not _TOKEN_RE.match(raw_name):
        raise ValueError(f"invalid header name {raw_name!r}")
    if isinstance(value, bytes):
        raw_value = value
    elif isinstance(value, int):
        raw_value = str(value).encode("ascii")
    else:
        raw_value = value.encode("latin-1")
    if b"\r" in raw_value or b"\n" in raw_value or b"\0" in raw_value:
        raise ValueError(f"header {raw_name.decode('ascii')!r}: the value holds a line break")
    return raw_name + b": " + raw_value + b"\r\n"


def request_bytes(prepared: PreparedLike) -> bytes:
    """The exact bytes urllib3 (under requests) writes for ``prepared``: the request line, the
    Host header unless given, ``Accept-Encoding: identity`` unless given, framing headers that
    are missing, the default User-Agent unless given, then the prepared headers in their order
    and casing, a blank line and the body.

    Raises ValueError for a request that cannot be written (a bad method, URL or header) and
    TypeError for a body that is not held in memory (a file or an iterator)."""
    method = (prepared.method or "GET").upper()
    if not _TOKEN_RE.match(method.encode("ascii", "replace")):
        raise ValueError(f"invalid method {method!r}")
    url = prepared.url or ""
    origin = Origin.of(url)
    body = prepared.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    if body is not None and not isinstance(body, bytes | bytearray):
        raise TypeError("wire sends bodies held in memory (bytes or str), not streams")
    headers = list(prepared.headers.items())
    keys = {(k.decode("ascii") if isinstance(k, bytes) else k).lower() for k, _ in headers}
    target = request_target(url)
    if re.search(r"[\x00-\x20\x7f]", target):
        raise ValueError(f"the URL's path holds control characters or spaces: {target!r}")
    out = [f"{method} {target} HTTP/1.1\r\n".encode("ascii")]
    if "host" not in keys:
        out.append(_header_bytes("Host", origin.host_header))
    if "accept-encoding" not in keys:
        out.append(b"Accept-Encoding: identity\r\n")
    chunked = "transfer-encoding" in keys and "content-length" not in keys
    if "content-length" not in keys and "transfer-encoding" not in keys:
        if body is not None:
            out.append(_header_bytes("Content-Length", len(body)))
        elif method in _METHODS_WITH_BODY:
            out.append(b"Content-Length: 0\r\n")
    if "user-agent" not in keys:
        out.append(_header_bytes("User-Agent", f"python-urllib3/{urllib3.__version__}"))
    out.extend(_header_bytes(name, value) for name, value in headers)
    out.append(b"\r\n")
    if chunked:
        if body:
            out.append(b"%x\r\n%b\r\n" % (len(body), body))
        out.append(b"0\r\n\r\n")
    elif body:
        out.append(bytes(body))
    return b"".join(out)


# --------------------------------------------------------------------------- connections

_contexts: dict[bool | str, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def tls_context(verify: bool | str = True) -> ssl.SSLContext:
    """The TLS context requests would use for ``verify`` (built once per value): urllib3's
    context (TLS 1.2 or newer, certificate and host name checked) trusting certifi's bundle
    (True), the CA file or directory at ``verify`` (a path), or nothing (False: no checks).

    Raises ValueError when the path does not exist."""
    with _contexts_lock:
        context = _contexts.get(verify)
        if context is not None:
            return context
        if verify is False:
            context = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
        else:
            context = create_urllib3_context()
            location = certifi.where() if verify is True else os.fspath(verify)
            if not os.path.exists(location):
                raise ValueError(
                    f"cannot find the TLS CA certificate bundle {location!r}: "
                    "give an existing CA file or directory"
                )
            if os.path.isdir(location):
                context.load_verify_locations(capath=location)
            else:
                context.load_verify_locations(cafile=location)
        context.set_alpn_protocols(["http/1.1"])
        _contexts[verify] = context
        return context


class Connection:
    """One connection to an origin, opened ahead of the request it will carry."""

    def __init__(
        self, origin: Origin, sock: socket.socket, *, timeout: float, verify: bool | str = True
    ) -> None:
        self.origin = origin
        self.sock = sock
        #: The connect timeout, used again when the connection has to be opened anew.
        self.timeout = timeout
        self.verify = verify
        self.closed = False
        self._buffer = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def dropped(self) -> bool:
        """True when the connection can no longer carry a request: closed by either side, or
        the club sent something unasked (a timeout notice before closing). TLS records that
        hold no data (TLS 1.3 session tickets) are read and do not count."""
        if self.closed:
            return True
        poller = select.poll()
        try:
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(0):
                return False
        except (OSError, ValueError):
            return True
        previous = self.sock.gettimeout()
        try:
            self.sock.setblocking(False)
            self.sock.recv(1)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False  # only TLS housekeeping was waiting
        except OSError:
            return True
        finally:
            if not self.closed:
                self.sock.settimeout(previous)
        # End of stream, or bytes nobody asked for: either way not a clean connection.
        return True

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(url: str, *, timeout: float, verify: bool | str = True) -> Connection:
    """Open a connection to ``url``'s origin, sending nothing on it: TCP with TCP_NODELAY (as
    urllib3 sets it), then for https a TLS handshake verified as requests verifies with
    ``verify``. ``timeout`` bounds the whole of it.

    Raises WireError (``lost`` False: nothing was sent) when no connection could be opened,
    with the reason for a person, and ValueError for a URL or ``verify`` that cannot work."""
    origin = Origin.of(url)
    context = tls_context(verify) if origin.tls else None
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((origin.host, origin.port), timeout=timeout)
    except TimeoutError:
        raise WireError(f"no connection to the club within {timeout:g} s", lost=False) from None
    except socket.gaierror:
        raise WireError(
            f"the club's host name {origin.host!r} could not be resolved", lost=False
        ) from None
    except ConnectionRefusedError:
        raise WireError("connection refused by the club's server", lost=False) from None
    except OSError as exc:
        raise WireError(f"could not connect to the club ({_os_reason(exc)})", lost=False) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock = context.wrap_socket(sock, server_hostname=origin.host.rstrip("."))
        sock.settimeout(timeout)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise WireError(_certificate_reason(exc, origin, verify), lost=False) from None
    except TimeoutError:
        sock.close()
        raise WireError(
            f"no TLS handshake with the club within {timeout:g} s", lost=False
        ) from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise WireError(
            f"TLS handshake with the club failed ({_os_reason(exc)})", lost=False
        ) from None
    return Connection(origin, sock, timeout=timeout, verify=verify)


def _certificate_reason(exc: ssl.SSLCertVerificationError, origin: Origin, verify: object) -> str:
    detail = exc.verify_message or str(exc)
    if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return (
            f"the club's TLS certificate is not valid for {origin.host!r} ({detail}): "
            "check the host name in the URL"
        )
    trusted = "certifi's CA bundle" if verify is True else f"the CA bundle {verify!r}"
    return (
        f"the club's TLS certificate is not trusted ({detail}); it was checked against "
        f"{trusted}: if the club uses its own CA, give that CA's certificate file"
    )


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    return exc.__class__.__name__


# --------------------------------------------------------------------------- answers


class Headers(Mapping[str, str]):
    """An answer's headers, looked up without regard to case. Repeated fields read as one,
    their values joined with ", " (as requests shows them); ``fields`` keeps each line."""

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self.fields = tuple(fields)
        merged: dict[str, tuple[str, str]] = {}
        for name, value in self.fields:
            key = name.lower()
            if key in merged:
                first, joined = merged[key]
                merged[key] = (first, f"{joined}, {value}")
            else:
                merged[key] = (name, value)
        self._merged = merged

    def __getitem__(self, name: str) -> str:
        return self._merged[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._merged.values())

    def __len__(self) -> int:
        return len(self._merged)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._merged

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, one per header line."""
        key = name.lower()
        return [value for field_name, value in self.fields if field_name.lower() == key]

    def __repr__(self) -> str:
        return f"Headers({list(self.fields)!r})"


@dataclass(frozen=True)
class WireAnswer:
    """The club's final answer to one request (club_client.Answer takes status, headers, body and
    ``elapsed_ms`` as its latency).

    ``truncated``: the body went past the cap and was cut there (the rest was not read).
    ``interim``: how many 1xx answers came before this one."""

    status: int
    reason: str
    headers: Headers
    body: bytes
    elapsed_ms: float
    truncated: bool = False
    interim: int = 0


class _Expired(Exception):
    pass


class _Closed(Exception):
    """The club closed (or reset) the connection; ``reset`` tells which."""

    def __init__(self, reset: bool) -> None:
        super().__init__()
        self.reset = reset


class _Malformed(Exception):
    pass


class _Reader:
    """Bytes from a connection, every read bounded by what is left of the deadline."""

    def __init__(self, conn: Connection, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.buffer = conn._buffer

    def fill(self) -> bool:
        """Read once more into the buffer; False at the end of the stream."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired
        sock = self.conn.sock
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(_RECV_SIZE)
        except TimeoutError:
            raise _Expired from None
        except ConnectionResetError:
            raise _Closed(reset=True) from None
        except (ssl.SSLError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise _Closed(reset=True) from None
            raise _Closed(reset=False) from None
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def line(self) -> bytes | None:
        """One line without its line break; None when the stream ended before any byte of it."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                if end > MAX_LINE:
                    raise _Malformed(f"a line of the club's answer is longer than {MAX_LINE} bytes")
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) > MAX_LINE:
                raise _Malformed(f"a line of the club's answer is longer than {MAX_LINE} bytes")
            start = len(self.buffer)
            if not self.fill():
                if self.buffer:
                    line = bytes(self.buffer)
                    self.buffer.clear()
                    return line
                return None

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one); empty at the end of the stream."""
        if not self.buffer and not self.fill():
            return b""
        piece = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        return piece


class _Decoder:
    """Content-Encoding undone as urllib3 does for requests (gzip, x-gzip, deflate, several
    in a row); an encoding it does not know leaves the body as it came."""

    def __init__(self, encoding: str) -> None:
        names = [n.strip().lower() for n in encoding.split(",") if n.strip()]
        names = [n for n in names if n != "identity"]
        known = all(n in ("gzip", "x-gzip", "deflate") for n in names)
        self.stages: list[_Stage] = [_Stage(n) for n in reversed(names)] if known else []

    def feed(self, data: bytes, limit: int) -> bytes:
        for stage in self.stages:
            if not data:
                break
            data = stage.feed(data, limit)
        return data


class _Stage:
    """One encoding undone, its output bounded (a small gzip body can unpack to gigabytes)."""

    def __init__(self, name: str) -> None:
        self.gzip = name != "deflate"
        self.first = True
        #: Decoding a gzip member after the first one.
        self.later = False
        self.swallow = False
        self.inner = zlib.decompressobj(16 + zlib.MAX_WBITS if self.gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes, limit: int) -> bytes:
        """Decoded bytes of ``data``: at most ``limit + 1`` (one more says "past the limit")."""
        out = bytearray()
        while data and not self.swallow and len(out) <= limit:
            try:
                out += self.inner.decompress(data, limit + 1 - len(out))
            except zlib.error:
                if not self.gzip and self.first:
                    # "deflate" often comes raw, without its zlib wrapper: try that once.
                    self.inner = zlib.decompressobj(-zlib.MAX_WBITS)
                    self.first = False
                    continue
                if self.later:
                    # Bytes after a complete gzip member that are no member: ignored.
                    self.swallow = True
                    break
                raise
            self.first = False
            if self.inner.unconsumed_tail:
                break  # past the limit: the caller stops reading
            data = self.inner.unused_data
            if not (data and self.gzip and self.inner.eof):
                break
            self.inner = zlib.decompressobj(16 + zlib.MAX_WBITS)  # another gzip member
            self.later = True
        return bytes(out)


def _read_head(reader: _Reader) -> tuple[int, str, str, list[tuple[str, str]]]:
    """(status, reason, version, header fields) of one answer head."""
    line = reader.line()
    while line == b"":  # stray blank lines before a status line are ignored (RFC 9112 2.2)
        line = reader.line()
    if line is None:
        raise _Closed(reset=False)
    parts = line.decode("iso-8859-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not re.fullmatch(r"\d{3}", parts[1]):
        raise _Malformed(f"the club's answer does not start with a status line: {line[:40]!r}")
    version, status = parts[0], int(parts[1])
    if status < 100:
        raise _Malformed(f"the club's answer has an invalid status {status}")
    reason = parts[2].strip() if len(parts) > 2 else ""
    fields: list[tuple[str, str]] = []
    while True:
        raw = reader.line()
        if raw is None:
            raise _Closed(reset=False)
        if not raw:
            return status, reason, version, fields
        if raw[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {raw.decode('iso-8859-1').strip()}")
            continue
        if len(fields) >= MAX_HEADERS:
            raise _Malformed(f"the club's answer has more than {MAX_HEADERS} header lines")
        name, colon, value = raw.decode("iso-8859-1").partition(":")
        if colon and name.strip():
            fields.append((name.strip(), value.strip()))


def _read_body(
    reader: _Reader, headers: Headers, decoder: _Decoder, limit: int, body: bytearray
) -> bool:
    """Read the body into ``body`` (decoded, at most ``limit`` bytes); returns True when it was
    cut at the limit, False when it ended."""
    transfer = headers.get("Transfer-Encoding", "").lower()
    if transfer and transfer.split(",")[-1].strip() == "chunked":
        while True:
            size_line = reader.line()
            if size_line is None:
                raise _Closed(reset=False)
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Malformed(
                    f"the club's chunked answer has a bad chunk size {size_text[:20]!r}"
                ) from None
            if size == 0:
                while True:  # trailers, up to the blank line
                    trailer = reader.line()
                    if not trailer:
                        return False
            left = size
            while left > 0:
                piece = reader.take(left)
                if not piece:
                    raise _Closed(reset=False)
                left -= len(piece)
                if _add(body, decoder, piece, limit):
                    return True
            if reader.line() is None:
                raise _Closed(reset=False)
    length_text = headers.get("Content-Length")
    if length_text is not None:
        values = {v.strip() for v in length_text.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _Malformed(
                f"the club's answer has an invalid Content-Length {length_text[:40]!r}"
            )
        left = int(next(iter(values)))
        while left > 0:
            piece = reader.take(min(left, _RECV_SIZE))
            if not piece:
                raise _Closed(reset=False)
            left -= len(piece)
            if _add(body, decoder, piece, limit):
                return True
        return False
    while True:  # no framing: the body ends when the club closes the connection
        piece = reader.take(_RECV_SIZE)
        if not piece:
            return False
        if _add(body, decoder, piece, limit):
            return True


def _add(body: bytearray, decoder: _Decoder, piece: bytes, limit: int) -> bool:
    decoded = decoder.feed(piece, limit - len(body))
    body += decoded
    if len(body) > limit:
        del body[limit:]
        return True
    return False


def _expired_message(timeout: float, status: int | None, interim: int) -> str:
    """Why an answer timed out: ``status`` when its head had come, else how many 1xx did."""
    if status is not None:
        return (
            f"no complete answer within {timeout:g} s (HTTP {status} came, "
            "its body did not end in time)"
        )
    if interim:
        return (
            f"no answer within {timeout:g} s (only {interim} interim 1xx answer(s), no final one)"
        )
    return f"no answer within {timeout:g} s"


def _closed_message(status: int | None, *, reset: bool) -> str:
    """Why an answer broke off: ``status`` when its head had come."""
    if status is not None:
        return (
            f"the club's server closed the connection in the middle of its answer (HTTP {status})"
        )
    if reset:
        return "the club's server reset the connection without a full answer"
    return "the club's server closed the connection without a full answer"


def read_answer(
    conn: Connection,
    *,
    deadline: float,
    timeout: float,
    sent_at: float,
    method: str = "POST",
    max_body: int = MAX_BODY_BYTES,
) -> WireAnswer:
    """Read the club's final answer to the request just written on ``conn``: any number of 1xx
    interim answers skipped, then the status line, headers and body (Content-Length, chunked or
    up to the close), decoded as requests decodes it and cut after ``max_body`` bytes.

    ``deadline`` (time.monotonic) bounds every read; ``timeout`` is only named in the error.
    The connection is closed unless the answer left it ready for another request.
    Raises WireTimeout past the deadline and WireError when the club closed the connection or
    broke the protocol; both carry what had arrived (``partial``)."""
    reader = _Reader(conn, deadline)
    interim = 0
    status, reason, fields = 0, "", []
    headers = Headers(())
    body = bytearray()
    head_done = False

    def partial() -> WireAnswer | None:
        if not head_done:
            return None
        elapsed = (time.monotonic() - sent_at) * 1000.0
        return WireAnswer(status, reason, headers, bytes(body), elapsed, False, interim)

    try:
        while True:
            status, reason, version, fields = _read_head(reader)
            if status == 101:
                raise _Malformed("the club switched protocols (101), which was not asked for")
            if status >= 200:
                break
            interim += 1
        headers = Headers(fields)
        head_done = True
        truncated = False
        if method.upper() != "HEAD" and status not in (204, 304):
            decoder = _Decoder(headers.get("Content-Encoding", ""))
            truncated = _read_body(reader, headers, decoder, max_body, body)
    except _Expired:
        conn.close()
        message = _expired_message(timeout, status if head_done else None, interim)
        raise WireTimeout(message, lost=True, partial=partial()) from None
    except _Closed as exc:
        conn.close()
        message = _closed_message(status if head_done else None, reset=exc.reset)
        raise WireError(message, lost=True, partial=partial()) from None
    except _Malformed as exc:
        conn.close()
        raise WireError(str(exc), lost=True, partial=partial()) from None
    except zlib.error:
        conn.close()
        raise WireError(
            f"the club's answer body could not be decoded "
            f"({headers.get('Content-Encoding', '')!r})",
            lost=True,
            partial=partial(),
        ) from None
    elapsed = (time.monotonic() - sent_at) * 1000.0
    framed = "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "")
    keep = (
        not truncated
        and not reader.buffer
        and framed
        and version == "HTTP/1.1"
        and "close" not in headers.get("Connection", "").lower()
    )
    if not keep:
        conn.close()
    return WireAnswer(status, reason, headers, bytes(body), elapsed, truncated, interim)


# --------------------------------------------------------------------------- the send


#: One request of a burst: the connection it goes on and its bytes.
BurstItem = tuple[Connection, bytes]


@dataclass
class Sent:
    """A request written at the trigger (or the reason it could not be)."""

    connection: Connection
    #: time.monotonic() when its write began: the start of its deadline.
    sent_at: float
    #: The clock's reading (epoch seconds) just before its write: never before the trigger.
    sent_clock: float
    timeout: float
    method: str
    #: The thread that wrote it (one for the whole burst).
    writer: int
    error: WireError | None = None
    #: The whole write loop of its burst: wall seconds, and CPU seconds the writer used in it
    #: (the difference is time the writer spent off the CPU).
    burst_wall: float = 0.0
    burst_cpu: float = 0.0

    @property
    def deadline(self) -> float:
        return self.sent_at + self.timeout

    def answer(self, *, max_body: int = MAX_BODY_BYTES) -> WireAnswer:
        """The club's answer (see ``read_answer``); raises WireError for a failed write too."""
        if self.error is not None:
            raise self.error
        return read_answer(
            self.connection,
            deadline=self.deadline,
            timeout=self.timeout,
            sent_at=self.sent_at,
            method=self.method,
            max_body=max_body,
        )


def _method_of(data: bytes) -> str:
    return data[: data.find(b" ")].decode("ascii", "replace")


def wait_until(
    target: float,
    *,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
) -> bool:
    """Return once ``clock()`` reads ``target`` or later, never earlier: sleep until
    SPIN_SECONDS before it, then spin on the clock. False when ``stop`` was set first."""
    while True:
        remaining = target - clock()
        if remaining <= 0:
            return True
        if remaining > SPIN_SECONDS:
            pause = remaining - SPIN_SECONDS
            if stop is not None:
                if stop.wait(pause):
                    return False
            else:
                time.sleep(pause)
            continue
        while clock() < target:
            pass
        return True


def refresh(
    items: Sequence[BurstItem], *, until: float, clock: Callable[[], float] = time.time
) -> list[BurstItem]:
    """The items, with each connection the club has closed meanwhile opened again (same origin,
    same verification) if that can be done before ``until`` (by ``clock``). One poll looks at
    every connection; only those with something to read are looked at closer. A connection
    that could not be opened again is left closed: its write then fails at once, unsent."""
    poller = select.poll()
    for conn, _ in items:
        if not conn.closed:
            poller.register(conn.sock, select.POLLIN)
    suspects = {fd for fd, _ in poller.poll(0)}
    out: list[BurstItem] = []
    for conn, data in items:
        fresh = conn
        if conn.closed or (conn.sock.fileno() in suspects and conn.dropped()):
            conn.close()
            left = until - clock()
            if left > 0:
                with contextlib.suppress(WireError):
                    fresh = connect(
                        f"{conn.origin.scheme}://{conn.origin.host_header}/",
                        timeout=min(conn.timeout, left),
                        verify=conn.verify,
                    )
        out.append((fresh, data))
    return out


def _ahead(
    items: Sequence[BurstItem],
    trigger: float,
    clock: Callable[[], float],
    stop: threading.Event | None,
) -> list[BurstItem] | None:
    """Wait until REFRESH_SECONDS before the trigger, then re-open dropped connections while
    time is left; None when ``stop`` was set."""
    if clock() < trigger - REFRESH_SECONDS and not wait_until(
        trigger - REFRESH_SECONDS, clock=clock, stop=stop
    ):
        return None
    if clock() < trigger - 2 * SPIN_SECONDS:
        return refresh(items, until=trigger - SPIN_SECONDS, clock=clock)
    return list(items)


def _write_all(
    items: Sequence[BurstItem], trigger: float, timeout: float, clock: Callable[[], float]
) -> list[Sent]:
    """The sendall loop: nothing here but the clock check and the write."""
    writer = threading.get_ident()
    monotonic = time.monotonic
    sent: list[Sent] = []
    cpu = time.thread_time()
    for conn, data in items:
        now = clock()
        while now < trigger:
            now = clock()
        started = monotonic()
        error: WireError | None = None
        if conn.closed:
            error = WireError(
                "the connection opened ahead was closed by the club and could not be opened "
                "again before the trigger",
                lost=False,
            )
        else:
            try:
                conn.sock.sendall(data)
            except TimeoutError:
                error = WireTimeout(
                    f"the request could not be written within {timeout:g} s", lost=True
                )
            except (OSError, ValueError) as exc:
                error = WireError(
                    "the connection to the club broke before the request was written "
                    f"({_os_reason(exc)})",
                    lost=False,
                )
            if error is not None:
                conn.close()
        sent.append(Sent(conn, started, now, timeout, _method_of(data), writer, error))
    if sent:
        wall, cpu = monotonic() - sent[0].sent_at, time.thread_time() - cpu
        for one in sent:
            one.burst_wall, one.burst_cpu = wall, cpu
    return sent


def send_burst(
    items: Sequence[BurstItem],
    trigger: float,
    *,
    timeout: float,
    clock: Callable[[], float] = time.time,
    stop: threading.Event | None = None,
) -> list[Sent] | None:
    """Write every item's bytes on its connection from this one thread, in order, the first at
    ``trigger`` (epoch seconds by ``clock``) and none before it: the clock is read again just
    before each write (a clock stepped back mid-burst makes the rest wait again).

    Connections the club closed meanwhile are opened again REFRESH_SECONDS before the trigger.
    Returns one Sent per item (a failed write is a Sent whose ``error`` is set; the others are
    not held up by it), or None when ``stop`` was set before the trigger (nothing was sent).
    ``timeout`` bounds each request from its write to the last byte of its answer."""
    ready = _ahead(items, trigger, clock, stop)
    if ready is None or not wait_until(trigger, clock=clock, stop=stop):
        return None
    return _write_all(ready, trigger, timeout, clock)


def exchange(
    conn: Connection, data: bytes, *, timeout: float, max_body: int = MAX_BODY_BYTES
) -> WireAnswer:
    """Write ``data`` on ``conn`` now and read its answer: one request, no trigger to wait."""
    (sent,) = _write_all([(conn, data)], 0.0, timeout, time.time)
    return sent.answer(max_body=max_body)


@dataclass
class _Batch:
    trigger: float
    items: list[BurstItem] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    results: list[Sent] | None = None


class BurstGate:
    """Bookings that share a trigger instant hand their bytes to one sender: the first to
    arrive for an instant waits it out and writes everyone's requests in one ``sendall`` loop;
    the others sleep on an event and get their Sent back. A booking that arrives once the
    burst has left is sent at once, on its own."""

    def __init__(self, *, timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._batches: dict[float, _Batch] = {}

    def send(
        self,
        trigger: float,
        conn: Connection,
        data: bytes,
        *,
        stop: threading.Event | None = None,
    ) -> Sent | None:
        """Send ``data`` on ``conn`` at ``trigger`` with every other booking of that instant;
        returns its Sent, or None when the instant's sender saw ``stop`` set before the trigger
        (the first booking's ``stop`` governs the instant: the daemon's is one event)."""
        with self._lock:
            batch = self._batches.get(trigger)
            leader = batch is None
            if batch is None:
                batch = self._batches[trigger] = _Batch(trigger)
            index = len(batch.items)
            batch.items.append((conn, data))
        if leader:
            self._lead(batch, stop)
        else:
            batch.done.wait()
        if batch.results is None:
            return None
        return batch.results[index]

    def _lead(self, batch: _Batch, stop: threading.Event | None) -> None:
        clock = self.clock
        trigger = batch.trigger
        try:
            if clock() < trigger - REFRESH_SECONDS and not wait_until(
                trigger - REFRESH_SECONDS, clock=clock, stop=stop
            ):
                return
            with self._lock:
                early = list(batch.items)
            refreshed = _ahead(early, trigger, clock, stop)
            if refreshed is None or not wait_until(trigger, clock=clock, stop=stop):
                return
            with self._lock:
                # From here on, a booking of this instant starts a batch of its own.
                self._batches.pop(trigger, None)
                items = refreshed + batch.items[len(early) :]
            batch.results = _write_all(items, trigger, self.timeout, clock)
        finally:
            with self._lock:
                if self._batches.get(trigger) is batch:
                    del self._batches[trigger]
            batch.done.set()
