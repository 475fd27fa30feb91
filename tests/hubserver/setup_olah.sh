#!/usr/bin/env bash
# Create (or confirm) the private virtualenv that runs olah, the read side of the test Hub.
#
# olah pins its own huggingface_hub / fastapi ranges, so it never shares the project venv.
# Idempotent: a stamp file records the olah version + constraints hash; when it matches and
# olah-cli is there, nothing is done. Safe to run concurrently (flock, when available).
#
#   HUBSERVER_OLAH_VENV  where to put the venv (default: <repo>/.venv-olah)
#   PYTHON               interpreter used to create it (default: python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${HUBSERVER_OLAH_VENV:-$REPO_ROOT/.venv-olah}"
PY="${PYTHON:-python3}"
OLAH_VERSION="0.5.4"
CONSTRAINTS="$HERE/olah-constraints.txt"
STAMP="$VENV/.hubserver-olah-stamp"

want_stamp() {
    local h
    h="$(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"
    echo "olah==$OLAH_VERSION constraints=$h python=$("$PY" -c 'import sys; print(sys.version.split()[0])')"
}

is_ready() {
    [ -x "$VENV/bin/olah-cli" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] &&
        "$VENV/bin/python" -c "" >/dev/null 2>&1  # the venv's interpreter still runs
}

if is_ready; then
    echo "setup_olah: $VENV is up to date (olah $OLAH_VERSION)"
    exit 0
fi

mkdir -p "$(dirname "$VENV")"
if command -v flock >/dev/null 2>&1; then
    LOCK="${TMPDIR:-/tmp}/hubserver-olah-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
    exec 9>"$LOCK"
    flock 9
    if is_ready; then  # another process finished the job while we waited
        echo "setup_olah: $VENV is up to date (olah $OLAH_VERSION)"
        exit 0
    fi
fi

if [ -e "$VENV" ]; then
    if [ -f "$VENV/pyvenv.cfg" ]; then
        echo "setup_olah: rebuilding stale venv $VENV"
        rm -rf "$VENV"
    else
        echo "setup_olah: $VENV exists and is not a virtualenv; refusing to touch it" >&2
        exit 1
    fi
fi

echo "setup_olah: creating $VENV with $("$PY" --version 2>&1)"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
    -c "$CONSTRAINTS" "olah==$OLAH_VERSION"
# smoke test: the CLI entry point and its server module import
"$VENV/bin/python" -c "import olah.server" >/dev/null
[ -x "$VENV/bin/olah-cli" ]
want_stamp >"$STAMP"
echo "setup_olah: ready ($VENV/bin/olah-cli)"
