#!/usr/bin/env bash
# The README demo on a fresh Debian machine, as root: install what it needs, then a 3-node lab
# pulls a ~300 MB image through shoal on every node at once and prints where the bytes came from.
#   bash deploy/local/demo.sh [--nodes 3] [--rate 200mbit] [--layer-mb 100]
set -euo pipefail
here="$(dirname "$0")"
bash "$here/install.sh"
python="$(bash "$here/python.sh")"
cd "$here"
exec "$python" -m lab demo "$@"
