#!/usr/bin/env bash
# Start a Docker engine when none answers (Debian's docker.io), and wait until it does.
set -euo pipefail
DOCKER=/usr/bin/docker  # Debian's 20.10 client: uses the engine's built-in BuildKit (no buildx plugin needed)
if "$DOCKER" info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
nohup dockerd >/var/log/dockerd.log 2>&1 &
for _ in $(seq 60); do
  "$DOCKER" info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not come up; see /var/log/dockerd.log" >&2
tail -20 /var/log/dockerd.log >&2
exit 1
