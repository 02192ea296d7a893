#!/bin/sh
# The images' entrypoint: run the given command as the unprivileged `sluice` user (uid 10001).
#
# Kubernetes and docker compose start the container as uid 10001 already, and then this only
# execs the command. Fly volumes and Render disks are mounted owned by root, so there the
# container starts as root: this hands the cache volume (and anything a root shell such as
# `fly ssh console` left in it) to `sluice`, then drops to it for good before the command runs.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    exec "$@"
fi

cache=${SLUICE_CACHE_DIR:-/var/cache/sluice}
mkdir -p "$cache"
find "$cache" -xdev ! -user sluice -exec chown -h sluice:sluice {} +
exec setpriv --reuid=sluice --regid=sluice --init-groups --no-new-privs -- "$@"
