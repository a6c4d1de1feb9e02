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
# courtbot reads one from there by name when DATA_DIR/clubs/ has no file of that name, so nothing
# is copied. Earlier images copied them into DATA_DIR/clubs/ with a checksum in
# clubs/.<name>.ready: a copy still as it was copied is removed here, so that the image's own
# version is used again; a copy you edited stays yours (its checksum file goes).
set -eu
data_dir="${DATA_DIR:-/app/data}"
config_dir="${CONFIG_DIR:-}"

# put SOURCE TARGET: an owner-only copy of SOURCE at TARGET, replaced in one step.
put() {
    cp "$1" "$2.tmp"
    chmod 0600 "$2.tmp"
    mv -f "$2.tmp" "$2"
}

for mark in "$data_dir"/clubs/.*.ready; do
    [ -f "$mark" ] || continue
    name=$(basename "$mark" .ready)
    target="$data_dir/clubs/${name#.}"
    if [ -f "$target" ] && [ "$(sha256sum < "$target")" = "$(cat "$mark")" ]; then
        rm -f "$target"
    fi
    rm -f "$mark"
done
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
        put "$club" "$data_dir/clubs/$name"
    done
fi
if [ "$(id -u)" = "0" ]; then
    mkdir -p "$data_dir"
    # Every file the daemon reads or writes is its own: a file put there as root (docker compose
    # cp, a shell on the host) would otherwise be unreadable to it, while `check`, run as root
    # in the container, reads it fine.
    find "$data_dir" -maxdepth 2 ! -user 10001 -exec chown 10001:10001 {} +
    chmod 0700 "$data_dir"
    exec setpriv --reuid=10001 --regid=10001 --clear-groups -- "$@"
fi
exec "$@"
