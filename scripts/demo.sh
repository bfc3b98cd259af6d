#!/usr/bin/env bash
# Install gkcp into a venv (.venv, or $GKCP_VENV) and run `gkcp demo`:
# a gkcp server, a gkcp local and a lossy emulated link in one process on
# loopback. Extra arguments go to `gkcp demo` (see `gkcp demo --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${GKCP_VENV:-.venv}
PYTHON=${GKCP_PYTHON:-python3}
SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)

if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "[demo] $PYTHON cannot create venvs: installing python3-venv"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv </dev/null
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[demo] pip install -e . into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
exec "$VENV/bin/gkcp" demo "$@"
