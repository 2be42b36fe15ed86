#!/usr/bin/env bash
# Prints the Python that the lab, the demo and the tests install shoal into and run with:
# python3 from PATH when pip may install into it (a virtual environment, or a Python that is not
# the distribution's), else a virtual environment at <checkout>/.venv, made on first use. Debian 12's
# own python3 is "externally managed" (PEP 668): pip refuses to install into it.
set -euo pipefail
top="$(cd "$(dirname "$0")/../.." && pwd)"
if python3 - <<'PY'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if sys.prefix == sys.base_prefix and managed else 1)
PY
then
  if [ ! -x "$top/.venv/bin/python3" ]; then
    # Debian ships venv's pip bootstrap in its own package.
    python3 -m venv "$top/.venv" >&2 2>/dev/null \
      || { apt-get install -y -q python3-venv >&2 && python3 -m venv "$top/.venv" >&2; }
  fi
  echo "$top/.venv/bin/python3"
else
  command -v python3
fi
