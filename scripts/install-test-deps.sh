#!/usr/bin/env bash
# Install what gkcp's tests and benches need, and nothing is done twice:
#
#   1. Debian packages (apt-get): the real shadowsocks binaries, secondary
#      plugins, kcptun for comparison, iperf3/curl for traffic, iproute2/procps,
#      and a C compiler (plus python3-dev if the interpreter has no headers)
#      for the compiled KCP engine.
#      Only missing packages are installed; `apt-get update` runs only when
#      the package lists are missing, older than a day, or do not know a
#      package. Package maintainer scripts are not allowed to start services
#      (shadowsocks-libev's would start an ss-server on port 8388).
#   2. A virtualenv with `pip install -e .[test]`, redone only when the
#      packaging files, the KCP engine's sources (gkcp/kcp.py, gkcp/kcp.pxd:
#      the install compiles them), the interpreter or the checkout path
#      changed, or when GKCP_REQUIRE_COMPILED=1 and the compiled engine is
#      not in use. Reports which KCP engine the venv runs.
#
# Environment:
#   GKCP_VENV      where the venv goes (default: .venv in the repo; a relative
#                  path is taken from the repo root)
#   GKCP_PYTHON    interpreter that creates the venv (default: python3)
#   GKCP_SKIP_APT  1: do not touch Debian packages (tests needing the
#                  binaries will then skip or fail)
#   GKCP_FORCE     1: run apt-get update and pip install even if up to date
#   GKCP_REQUIRE_COMPILED
#                  1: fail unless the compiled KCP engine builds and is in use
#                  (scripts/test.sh sets it)
#
# Usage: bash scripts/install-test-deps.sh

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)

say() { printf '[install-test-deps] %s\n' "$*"; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }

START_S=$SECONDS

APT_PACKAGES=(
    shadowsocks-libev        # ss-local ss-server ss-tunnel ss-redir ss-manager
    simple-obfs              # obfs-local obfs-server
    shadowsocks-v2ray-plugin # ss-v2ray-plugin
    kcptun                   # kcptun-client kcptun-server
    iperf3
    curl
    iproute2                 # ip, ss, tc
    procps                   # ps, pgrep
    gcc                      # builds the compiled KCP engine (setup.py)
    libc6-dev                # the C headers it includes
)
# Binaries the tests and benches look for, checked at the end.
EXPECTED_BINARIES=(
    ss-local ss-server ss-tunnel obfs-local obfs-server ss-v2ray-plugin
    kcptun-client kcptun-server iperf3 curl ip ps
)

PYTHON=${GKCP_PYTHON:-python3}
VENV=${GKCP_VENV:-.venv}
case $VENV in
    /*) ;;
    *) VENV=$REPO/$VENV ;;
esac
FORCE=${GKCP_FORCE:-0}
REQUIRE_COMPILED=${GKCP_REQUIRE_COMPILED:-0}

# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------

SUDO=()
APT_UPDATED=0
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=
POLICY_INSTALLED=0

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# True when apt's package lists are missing or were last refreshed more than
# a day ago. apt keeps the server's timestamps on the list files, so their
# mtimes say little; the directory's own mtime (apt renames fresh lists into
# it) and Debian's update-success-stamp (touched after a successful update,
# here too) tell when this machine last updated.
apt_lists_stale() {
    local lists=/var/lib/apt/lists newest=0 t f
    if ! compgen -G "$lists/*_Packages*" >/dev/null; then
        return 0
    fi
    for f in "$lists" /var/lib/apt/periodic/update-success-stamp; do
        [ -e "$f" ] || continue
        t=$(stat -c %Y "$f")
        [ "$t" -gt "$newest" ] && newest=$t
    done
    [ $(( $(date +%s) - newest )) -gt 86400 ]
}

# True when apt knows no installation candidate for one of the arguments.
apt_lacks_candidate() {
    local pkg policy
    for pkg in "$@"; do
        # (no `| grep -q` here: with pipefail, grep's early exit would
        # SIGPIPE apt-cache and fail the pipeline)
        policy=$(apt-cache policy "$pkg" 2>/dev/null || true)
        case $policy in
            *"Candidate: ("*|"") return 0 ;;
            *"Candidate: "*) ;;
            *) return 0 ;;
        esac
    done
    return 1
}

apt_update() {
    say "apt-get update"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    APT_UPDATED=1
    "${SUDO[@]}" mkdir -p /var/lib/apt/periodic
    "${SUDO[@]}" touch /var/lib/apt/periodic/update-success-stamp
}

# Stop maintainer scripts from starting services while we install: invoke-rc.d
# and deb-systemd-invoke both obey policy-rc.d, and exit status 101 means
# "action forbidden". An existing policy-rc.d (Docker images ship one) is put
# back afterwards.
block_service_starts() {
    if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
        POLICY_BACKUP=$("${SUDO[@]}" mktemp "$POLICY.gkcp-backup.XXXXXX")
        "${SUDO[@]}" cp -a "$POLICY" "$POLICY_BACKUP"
        say "saved existing $POLICY to $POLICY_BACKUP"
    fi
    say "writing $POLICY (exit 101) so package scripts start no services"
    printf '#!/bin/sh\n# written by gkcp scripts/install-test-deps.sh during apt-get install\nexit 101\n' \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    POLICY_INSTALLED=1
}

restore_service_starts() {
    [ "$POLICY_INSTALLED" = 1 ] || return 0
    if [ -n "$POLICY_BACKUP" ]; then
        "${SUDO[@]}" mv -f "$POLICY_BACKUP" "$POLICY"
        say "restored the previous $POLICY"
    else
        "${SUDO[@]}" rm -f "$POLICY"
        say "removed $POLICY"
    fi
    POLICY_INSTALLED=0
}
trap restore_service_starts EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a \
        apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$@" </dev/null
}

# A daemon that a package's init script started anyway (an earlier install
# without policy-rc.d, say) would hold port 8388 on loopback: stop it, by the
# PID in its service's pidfile, and keep it from starting at boot.
stop_package_daemons() {
    local pidfile pid comm cmdline owner seen=" "
    for pidfile in /run/shadowsocks-libev/shadowsocks-libev.pid \
                   /var/run/shadowsocks-libev/shadowsocks-libev.pid \
                   /run/iperf3.pid /var/run/iperf3.pid; do
        [ -r "$pidfile" ] || continue
        pid=$(tr -dc 0-9 <"$pidfile")
        [ -n "$pid" ] || continue
        case $seen in *" $pid "*) continue ;; esac  # /var/run -> /run
        seen="$seen$pid "
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
        cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
        owner=$(ps -o user= -p "$pid" 2>/dev/null || true)
        # Only the services' own daemons: the init script and the systemd
        # unit run ss-server with the package's config, and iperf3 as the
        # iperf3 user. A stale pidfile must not get a test's process killed.
        if { [ "$comm" = ss-server ] && [[ $cmdline == *" -c /etc/shadowsocks-libev/"* ]]; } ||
           { [ "$comm" = iperf3 ] && [ "$owner" = iperf3 ]; }; then
            say "stopping $comm (pid $pid from $pidfile), started by its Debian service"
            "${SUDO[@]}" kill "$pid" || true
            "${SUDO[@]}" rm -f "$pidfile"
        fi
    done
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        local unit
        for unit in shadowsocks-libev.service iperf3.service; do
            if systemctl is-active --quiet "$unit" 2>/dev/null; then
                say "stopping $unit"
                "${SUDO[@]}" systemctl stop "$unit" || true
            fi
        done
    fi
}

# Keep the freshly installed shadowsocks-libev service from starting at the
# next boot (it would bind 127.0.0.1:8388 and [::1]:8388, TCP and UDP).
disable_package_services() {
    say "disabling the shadowsocks-libev system service (not used by gkcp)"
    if command -v deb-systemd-helper >/dev/null; then
        "${SUDO[@]}" deb-systemd-helper disable shadowsocks-libev.service >/dev/null 2>&1 || true
    fi
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        "${SUDO[@]}" systemctl disable --quiet shadowsocks-libev.service 2>/dev/null || true
    fi
    if command -v update-rc.d >/dev/null; then
        "${SUDO[@]}" update-rc.d shadowsocks-libev disable >/dev/null 2>&1 || true
    fi
}

install_debian_packages() {
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    # Debian's own python3 needs python3-venv for `python3 -m venv`.
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        say "$PYTHON cannot create venvs (no ensurepip): adding python3-venv"
        is_installed python3-venv || missing+=(python3-venv)
    fi
    # Debian's own python3 needs python3-dev for Python.h (the compiled engine).
    if ! "$PYTHON" -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1; then
        say "$PYTHON has no Python.h: adding python3-dev"
        is_installed python3-dev || missing+=(python3-dev)
    fi

    if [ "${#missing[@]}" -eq 0 ]; then
        say "Debian packages: all installed (${APT_PACKAGES[*]})"
        stop_package_daemons
        return 0
    fi
    if [ "${GKCP_SKIP_APT:-0}" = 1 ]; then
        say "GKCP_SKIP_APT=1: NOT installing missing Debian packages: ${missing[*]}"
        return 0
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get here; install them by hand or set GKCP_SKIP_APT=1"
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            die "missing Debian packages ${missing[*]}: run as root (or with passwordless sudo), or set GKCP_SKIP_APT=1"
        fi
    fi

    say "Debian packages to install: ${missing[*]}"
    if [ "$FORCE" = 1 ] || apt_lists_stale; then
        apt_update
    elif apt_lacks_candidate "${missing[@]}"; then
        say "apt does not know some of them yet"
        apt_update
    fi

    block_service_starts
    local fresh_ss=0
    is_installed shadowsocks-libev || fresh_ss=1
    say "apt-get install --no-install-recommends ${missing[*]}"
    if ! apt_install "${missing[@]}"; then
        [ "$APT_UPDATED" = 0 ] || die "apt-get install failed"
        say "apt-get install failed; retrying after apt-get update"
        apt_update
        apt_install "${missing[@]}"
    fi
    restore_service_starts
    if [ "$fresh_ss" = 1 ] && is_installed shadowsocks-libev; then
        disable_package_services
    fi
    stop_package_daemons
}

# --------------------------------------------------------------------------
# Python virtualenv
# --------------------------------------------------------------------------

packaging_stamp() {
    {
        printf 'repo=%s\n' "$REPO"
        "$VENV/bin/python" -c 'import sys; print("python=" + sys.version.replace("\n", " "))'
        local f
        for f in setup.py setup.cfg pyproject.toml gkcp/kcp.py gkcp/kcp.pxd; do
            if [ -e "$f" ]; then sha256sum "$f"; fi
        done
    } | sha256sum | cut -d' ' -f1
}

install_venv() {
    local stamp_file=$VENV/.gkcp-install-stamp
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "venv: reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
    else
        command -v "$PYTHON" >/dev/null || die "no $PYTHON on PATH (set GKCP_PYTHON)"
        say "venv: creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
        "$PYTHON" -m venv --clear "$VENV"
        rm -f "$stamp_file"
    fi

    local want have=
    want=$(packaging_stamp)
    [ -r "$stamp_file" ] && have=$(cat "$stamp_file")
    # The editable install must point at this checkout.
    local where
    where=$("$VENV/bin/python" -c 'import os, gkcp; print(os.path.dirname(os.path.realpath(gkcp.__file__)))' 2>/dev/null || true)
    if [ "$FORCE" != 1 ] && [ "$want" = "$have" ] && [ "$where" = "$REPO/gkcp" ]; then
        local engine
        engine=$(kcp_engine || true)
        if [ "$REQUIRE_COMPILED" != 1 ] || [ "$engine" = compiled ]; then
            say "venv: gkcp[test] already installed (editable, from $REPO); KCP engine: $engine"
            return 0
        fi
        say "venv: KCP engine: $engine; GKCP_REQUIRE_COMPILED=1, so reinstalling"
    fi
    # pip runs setup.py, which compiles the KCP engine; GKCP_REQUIRE_COMPILED=1
    # in the environment makes a failed compile fail the install.
    say "venv: pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e ".[test]"
    where=$("$VENV/bin/python" -c 'import os, gkcp; print(os.path.dirname(os.path.realpath(gkcp.__file__)))')
    [ "$where" = "$REPO/gkcp" ] || die "gkcp in $VENV imports from $where, not $REPO/gkcp"
    local engine
    engine=$(kcp_engine)
    say "venv: KCP engine: $engine"
    if [ "$REQUIRE_COMPILED" = 1 ] && [ "$engine" != compiled ]; then
        die "GKCP_REQUIRE_COMPILED=1, but the venv's KCP engine is $engine"
    fi
    printf '%s\n' "$want" >"$stamp_file"
}

# The KCP engine the venv selects when GKCP_PURE_PYTHON is not set:
# "compiled", or "pure (why)".
kcp_engine() {
    env -u GKCP_PURE_PYTHON "$VENV/bin/python" -c 'import gkcp.kcp as k; print(k.engine_description())'
}

# --------------------------------------------------------------------------

report_binaries() {
    local b path missing=()
    for b in "${EXPECTED_BINARIES[@]}"; do
        if path=$(command -v "$b"); then
            say "  $b -> $path"
        else
            missing+=("$b")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "${GKCP_SKIP_APT:-0}" = 1 ]; then
            say "WARNING: not found: ${missing[*]}"
        else
            die "not found after install: ${missing[*]}"
        fi
    fi
}

say "repo: $REPO"
install_debian_packages
say "binaries:"
report_binaries
install_venv
say "done in $(( SECONDS - START_S )) s; venv python: $VENV/bin/python"
