#!/usr/bin/env bash
# Validates deploy/nats-auth/server.conf, and with it the permission sets it
# includes, with the real server's config check (`nats-server -c FILE -t`).
# The passwords the config reads from the environment get dummy values.
# Exit status 0 when all is well, 1 otherwise.
#
# The server binary is $NATS_SERVER_BIN, else `nats-server` on PATH.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../nats-server.sh
. "$here/../nats-server.sh" || exit 1
bin="$nats_server"

if out="$(IDEMQ_WORKER_PASSWORD=check IDEMQ_AGENT_PASSWORD=check IDEMQ_ACME_PASSWORD=check IDEMQ_GLOBEX_PASSWORD=check "$bin" -c "$here/server.conf" -t 2>&1)"; then
  echo "ok   nats-auth/server.conf: $out"
else
  echo "FAIL nats-auth/server.conf: $out" >&2
  exit 1
fi
