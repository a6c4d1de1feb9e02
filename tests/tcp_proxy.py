"""A TCP proxy on 127.0.0.1 for the tests that cut a daemon from its database.

``TcpProxy(target_port)`` forwards every connection to ``127.0.0.1:target_port``. ``reset()``
ends every connection with a reset (RST) on both sides, as a restarted router does;
``blackhole()`` stops forwarding and reading without closing anything, as a dead switch or a
cloud network fault does (new connections are accepted and held too); ``heal()`` forwards
again (connections held meanwhile go on where they were).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST rather than a FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._flowing.wait()  # a blackhole holds new connections too (accepted, unanswered)
            if self._closed.is_set():
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        sockets = [client, upstream]
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.05):
                    continue  # blackholed: nothing is read, nothing forwarded, nothing closed
                readable, _, _ = select.select(sockets, [], [], 0.05)
                for sock in readable:
                    if not self._flowing.is_set():
                        break
                    data = sock.recv(65536)
                    other = upstream if sock is client else client
                    if not data:
                        other.shutdown(socket.SHUT_WR)
                        sockets.remove(sock)
                        continue
                    other.sendall(data)
                if not sockets:
                    return
        except (OSError, ValueError):  # reset meanwhile: its sockets are closed
            return
        finally:
            if not sockets:
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def reset(self) -> None:
        """End every connection now with a reset on both sides; new ones are forwarded."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def blackhole(self) -> None:
        """Stop forwarding and reading; close nothing."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
