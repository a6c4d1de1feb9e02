#!/bin/sh
# Render (and some hosts) mount a fresh persistent disk owned by root. Started as root, make the
# data dir ours, then drop to the unprivileged courtbot user; `exec` keeps python as PID 1 so it
# receives SIGTERM itself. Started as another user (docker run --user, compose `user:`), just run.
#
# CONFIG_DIR (optional): where the config files live when DATA_DIR is no disk of their own, e.g.
# Render's secret files (/etc/secrets) or a read-only mount; its schedules.json and tokens.json
# are copied into DATA_DIR at each start (owner-only), so a new deploy takes the new files. Club
# files come from its clubs/ directory, or, where a directory cannot be made (Render's secret
# files are flat), from files named clubs.<club>.json.
#
# READY_CLUBS_DIR (the image sets /app/clubs): the ready flows of data/clubs/ in the repository.
# Each start copies one into DATA_DIR/clubs/ unless a file of that name is there that is not an
# unchanged earlier copy (its checksum is kept in clubs/.<name>.ready): your own or edited file
# stays, and an unedited copy follows the image's version.
set -eu
data_dir="${DATA_DIR:-/app/data}"
config_dir="${CONFIG_DIR:-}"
ready_dir="${READY_CLUBS_DIR:-}"
copied=""

# put SOURCE TARGET: an owner-only copy of SOURCE at TARGET, replaced in one step.
put() {
    cp "$1" "$2.tmp"
    chmod 0600 "$2.tmp"
    mv -f "$2.tmp" "$2"
    copied="$copied $2"
}

if [ -n "$ready_dir" ] && [ -d "$ready_dir" ]; then
    mkdir -p "$data_dir/clubs"
    copied="$copied $data_dir/clubs"
    for ready in "$ready_dir"/*.json; do
        [ -f "$ready" ] || continue
        name=$(basename "$ready")
        target="$data_dir/clubs/$name"
        mark="$data_dir/clubs/.$name.ready"
        if [ ! -e "$target" ] || { [ -f "$mark" ] && [ "$(sha256sum < "$target")" = "$(cat "$mark")" ]; }; then
            put "$ready" "$target"
            sha256sum < "$target" > "$mark"
            copied="$copied $mark"
        fi
    done
fi
if [ -n "$config_dir" ]; then
    mkdir -p "$data_dir"
    for name in schedules.json tokens.json; do
        if [ -f "$config_dir/$name" ]; then
            put "$config_dir/$name" "$data_dir/$name"
        fi
    done
    for club in "$config_dir"/clubs/*.json "$config_dir"/clubs.*.json; do
        [ -f "$club" ] || continue
        name=$(basename "$club")
        name=${name#clubs.}
        mkdir -p "$data_dir/clubs"
        copied="$copied $data_dir/clubs"
        put "$club" "$data_dir/clubs/$name"
        rm -f "$data_dir/clubs/.$name.ready"  # yours now: never replaced by a ready flow
    done
fi
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$data_dir"
    if [ "$(stat -c %u "$data_dir")" != "10001" ]; then
        chown -R 10001:10001 "$data_dir"
    fi
    for path in $copied; do
        if [ -e "$path" ]; then chown 10001:10001 "$path"; fi
    done
    chmod 0700 "$data_dir"
    exec setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"
fi
exec "$@"
