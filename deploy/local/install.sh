#!/usr/bin/env bash
# Install what the lab, the demo and the tests need on a Debian machine, as root:
#   bash deploy/local/install.sh [PIP_EXTRAS]     e.g. "test" (CI) or "bench"; default none
# Debian packages: the registry, dockerd, skopeo, redis, namespaces and tc, busybox-static (the demo
# runs a command from it in a container). Then shoal itself, editable, with the extras, into the
# Python that deploy/local/python.sh names (a virtual environment where Debian's own would refuse).
set -euo pipefail
cd "$(dirname "$0")/../.."

export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (apt-get, and the lab makes network namespaces)" >&2
  exit 1
fi
apt-get update -q
apt-get install -y -q --no-install-recommends \
  docker-registry docker.io skopeo redis-server iproute2 util-linux ca-certificates busybox-static
extras="${1:-}"
python="$(bash deploy/local/python.sh)"
"$python" -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
