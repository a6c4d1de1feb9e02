#!/bin/sh
# Render (and some hosts) mount a fresh persistent disk owned by root. Started as root, make the
# data dir ours, then drop to the unprivileged courtbot user; `exec` keeps python as PID 1 so it
# receives SIGTERM itself. Started as another user (docker run --user, compose `user:`), just run.
#
# CONFIG_DIR (optional): where the config files live when DATA_DIR is no disk of their own, e.g.
# Render's secret files (/etc/secrets) or a read-only mount; its schedules.json and tokens.json
# are copied into DATA_DIR at each start (owner-only), so a new deploy takes the new files.
set -eu
data_dir="${DATA_DIR:-/app/data}"
config_dir="${CONFIG_DIR:-}"
copied=""
if [ -n "$config_dir" ]; then
    mkdir -p "$data_dir"
    for name in schedules.json tokens.json; do
        if [ -f "$config_dir/$name" ]; then
            cp "$config_dir/$name" "$data_dir/.$name.tmp"
            chmod 0600 "$data_dir/.$name.tmp"
            mv -f "$data_dir/.$name.tmp" "$data_dir/$name"
            copied="$copied $data_dir/$name"
        fi
    done
fi
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$data_dir"
    if [ "$(stat -c %u "$data_dir")" != "10001" ]; then
        chown -R 10001:10001 "$data_dir"
    fi
    for path in $copied; do
        chown 10001:10001 "$path"
    done
    chmod 0700 "$data_dir"
    exec setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"
fi
exec "$@"
