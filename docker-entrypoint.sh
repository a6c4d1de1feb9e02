#!/bin/sh
# Render (and some hosts) mount a fresh persistent disk owned by root. Started as root, make the
# data dir ours, then drop to the unprivileged courtbot user; `exec` keeps python as PID 1 so it
# receives SIGTERM itself. Started as another user (docker run --user, compose `user:`), just run.
set -eu
data_dir="${DATA_DIR:-/app/data}"
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$data_dir"
    if [ "$(stat -c %u "$data_dir")" != "10001" ]; then
        chown -R 10001:10001 "$data_dir"
    fi
    chmod 0700 "$data_dir"
    exec setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"
fi
exec "$@"
