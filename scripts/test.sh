#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/install-test-deps.sh,
# idempotent), then runs the whole pytest suite in the venv.
#
#   bash scripts/test.sh                 everything
#   bash scripts/test.sh -m e2e -x       extra arguments go to pytest
#
# GKCP_VENV / GKCP_PYTHON / GKCP_SKIP_APT are honoured as in
# install-test-deps.sh. A run that collects no test fails (pytest's exit 5).
#
# The compiled KCP engine must build and be the one in use: this sets
# GKCP_REQUIRE_COMPILED=1 (install-test-deps.sh and
# tests/test_engine_selection.py check it) unless it is set already or
# GKCP_PURE_PYTHON=1 asks for the pure-Python engine. The KCP conformance
# tests run against both engines either way (tests/conftest.py).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)

if [ -z "${GKCP_REQUIRE_COMPILED:-}" ]; then
    case ${GKCP_PURE_PYTHON:-} in
        ""|0) GKCP_REQUIRE_COMPILED=1 ;;
        *) GKCP_REQUIRE_COMPILED=0 ;;
    esac
fi
export GKCP_REQUIRE_COMPILED

bash scripts/install-test-deps.sh

VENV=${GKCP_VENV:-.venv}
case $VENV in
    /*) ;;
    *) VENV=$REPO/$VENV ;;
esac

echo "[test] $VENV/bin/python -m pytest $*"
rc=0
"$VENV/bin/python" -m pytest "$@" </dev/null || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] ERROR: pytest collected no tests (exit 5); treating as a failure" >&2
    exit 1
fi
exit "$rc"
