# courtbot: an always-on worker. Python 3.11, the minor version the test suite runs on in CI.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/app/data \
    READY_CLUBS_DIR=/app/clubs

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. Wheels only: no build tools
# enter the image, and no pip cache stays in it.
COPY requirements.txt .
RUN pip install --no-cache-dir --only-binary=:all: -r requirements.txt

RUN groupadd --system --gid 10001 courtbot \
    && useradd --system --uid 10001 --gid courtbot --home-dir /app --shell /usr/sbin/nologin courtbot \
    && mkdir -p /app/data \
    && chown 10001:10001 /app/data \
    && chmod 0700 /app/data

# The ready flows (data/clubs/ in the repository), outside the DATA_DIR volume: an entry's club
# that DATA_DIR/clubs/ has no file for is read from READY_CLUBS_DIR by name, with no copy.
COPY data/clubs/ /app/clubs/
COPY docker-entrypoint.sh main.py cli.py daemon.py datadir.py logs.py models.py scheduler.py bot.py club_client.py clubclock.py config_loader.py instances.py template.py utils.py notify.py leader.py wire.py report.py rehearsal.py heartbeat.py watchdog.py ./
# Bytecode made once here (PYTHONDONTWRITEBYTECODE stops only writing it): the daemon's start and
# every `health` check would otherwise compile the modules afresh.
RUN python -m compileall -q /app

VOLUME /app/data

# The daemon refreshes DATA_DIR/heartbeat from its main loop; a stale one means it is stuck.
HEALTHCHECK --interval=60s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "main.py", "health"]

# No USER line on purpose: the entrypoint starts as root only to hand a root-owned mounted disk
# (Render's) to uid 10001, then runs the command as that user, so courtbot never runs as root.
ENTRYPOINT ["/app/docker-entrypoint.sh"]
# Exec form: python is PID 1 (via exec) and gets SIGTERM itself (it installs its own handler).
CMD ["python", "main.py"]
