"""A throwaway PostgreSQL server for the suite: its own cluster in a temp dir, on 127.0.0.1.

Uses the server binaries of Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``, which
``make test`` installs when missing) or ``PG_BIN``. As root the cluster belongs to the
``postgres`` OS user (the server refuses to run as root); otherwise to the current user. It
runs with fsync off (a crash loses nothing we need) and is stopped by its pid; if the test
process dies first, the kernel tells the server to quit (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class PgUnavailable(Exception):
    """PostgreSQL cannot be started here; the message says why."""


def find_bin_dir() -> Path:
    """The newest server binaries: ``PG_BIN``, else Debian's ``/usr/lib/postgresql/<N>/bin``."""
    if os.environ.get("PG_BIN"):
        candidates = [Path(os.environ["PG_BIN"])]
    else:
        found = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(
            found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1
        )[::-1]
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise PgUnavailable(
        "no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin or "
        "PG_BIN; `make test` installs Debian's postgresql package when run as root, or run "
        "`apt-get install postgresql`"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the server's process, before exec: quit (immediate shutdown) when the test dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGQUIT)


@dataclass
class PgServer:
    """A running throwaway server. ``url()`` connects as its superuser, with a password."""

    bin_dir: Path
    root: Path
    port: int
    password: str
    process: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        """A ``postgresql://`` URL for ``database`` (with another ``password`` if given)."""
        secret = self.password if password is None else password
        return f"postgresql://{SUPERUSER}:{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection to the ``postgres`` database, for CREATE DATABASE and such."""
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            password=self.password,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def create_database(self) -> str:
        """A new empty database; its name."""
        name = f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.databases.append(name)
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending whatever sessions a test left on it."""
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        with contextlib.suppress(ValueError):
            self.databases.remove(name)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Fast shutdown by the server's pid, then remove its files."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _as_owner(owner: pwd.struct_passwd | None) -> dict[str, object]:
    """Popen arguments that run a command as ``owner`` (None: as ourselves)."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def _owner() -> pwd.struct_passwd | None:
    """The OS user the cluster belongs to: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PgUnavailable(
            "running as root, and there is no `postgres` OS user to run the server as (Debian's "
            "postgresql package creates it)"
        ) from None


def start(*, attempts: int = 3) -> PgServer:
    """Initialise a cluster in a temp dir and start it on a free port of 127.0.0.1.

    Raises PgUnavailable with the reason (binaries missing, initdb or the server failing, with
    the server's last log lines) when it cannot.
    """
    bin_dir = find_bin_dir()
    owner = _owner()
    root = Path(tempfile.mkdtemp(prefix="courtbot-pg-"))
    try:
        password = secrets.token_urlsafe(16)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "--pgdata",
                str(root / "data"),
                "--username",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-host",
                "scram-sha-256",
                "--auth-local",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **_as_owner(owner),  # type: ignore[arg-type]
        )
        pwfile.unlink()
        if initdb.returncode != 0:
            output = " | ".join((initdb.stdout + initdb.stderr).strip().splitlines()[-10:])
            raise PgUnavailable(f"initdb failed (exit {initdb.returncode}): {output}")
        last_error = ""
        for _ in range(attempts):
            server = PgServer(bin_dir=bin_dir, root=root, port=free_port(), password=password)
            try:
                _launch(server, owner)
                return server
            except PgUnavailable as exc:
                last_error = str(exc)
                if server.process is not None and server.process.poll() is None:
                    server.process.kill()
                    server.process.wait()
                if "could not bind" not in last_error and "in use" not in last_error:
                    break  # only a port taken meanwhile is worth another try
        raise PgUnavailable(last_error)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _launch(server: PgServer, owner: pwd.struct_passwd | None) -> None:
    log = os.open(server.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if owner is not None:
        os.fchown(log, owner.pw_uid, owner.pw_gid)
    try:
        server.process = subprocess.Popen(
            [
                str(server.bin_dir / "postgres"),
                "-D",
                str(server.data_dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={server.port}",
                "-c",
                f"unix_socket_directories={server.root}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            cwd=server.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (single-threaded at session start)
            **_as_owner(owner),  # type: ignore[arg-type]
        )
    finally:
        os.close(log)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if server.process.poll() is not None:
            raise PgUnavailable(
                f"the server exited at start (code {server.process.returncode}): "
                f"{server.log_tail()}"
            )
        try:
            server.admin().close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise PgUnavailable(
                    f"the server did not accept connections within {START_TIMEOUT_SECONDS:.0f} "
                    f"s ({' '.join(str(exc).split())}): {server.log_tail()}"
                ) from None
        time.sleep(0.05)
