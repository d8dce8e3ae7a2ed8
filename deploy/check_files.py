#!/usr/bin/env python3
"""The checks of deploy/check.sh that no off-the-shelf validator does.

  check_files.py dashboard FILE.json   a Grafana dashboard
  check_files.py config FILE...        idemq.toml files, or Kubernetes YAML
                                       whose ConfigMaps hold an idemq.toml
  check_files.py compose-binds         `docker compose config --format json`
                                       on stdin: every bind mount's host path
                                       exists (`config` does not look)

Dashboard: valid JSON with the fields Grafana needs; every panel queries the
`datasource` variable; every PromQL expression parses (promql-parser, after
Grafana's variables are substituted); every metric it reads is one of idemq's
metrics, with counters only under rate()/increase(), histograms only through
their _bucket series under rate(), and the in-flight gauge never under
rate(); and every idemq metric is on some panel.

Config: every key is a long flag name of `idemq serve` (the file keys).

The names are those of the operations contract (flags, metrics); keep them in
step with src/ when a metric or a flag is added. Exit status 0 when all is
well, 1 otherwise; each problem is printed on stderr.
"""

import json
import os
import re
import sys
import tomllib

# Counters (the prometheus-client crate appends _total), the gauge and the
# histograms idemq exports on --metrics-addr /metrics.
COUNTERS = {
    "idemq_intents_received_total",
    "idemq_intents_executed_total",
    "idemq_intents_replayed_total",
    "idemq_intents_replayed_by_digest_total",
    "idemq_intents_waited_total",
    "idemq_intents_in_progress_total",
    "idemq_intents_key_reused_total",
    "idemq_intents_overloaded_total",
    "idemq_outcomes_unstored_total",
    "idemq_intents_invalid_total",
    "idemq_transient_failures_total",
    "idemq_store_errors_total",
    "idemq_takeovers_total",
    "idemq_dead_lettered_total",
}
GAUGES = {"idemq_intents_in_flight", "idemq_cache_entries", "idemq_cache_bytes"}
HISTOGRAMS = {"idemq_handler_duration_seconds", "idemq_intent_duration_seconds"}

# Keys of idemq.toml: the long names of serve's flags, NATS authentication
# included (--config and --print-config are not file keys).
CONFIG_KEYS = {
    "nats-url", "subject", "queue-group", "bucket", "ttl", "replicas",
    "forward", "handler-timeout", "wait", "lease", "concurrency",
    "max-payload", "intake-bytes", "stream", "durable", "dead-letter-subject", "ack-wait",
    "max-deliver", "backoff", "max-ack-pending", "cache", "grace",
    "metrics-addr", "log-format",
    "token", "user", "password", "nkey", "creds",
    "tls-ca", "tls-cert", "tls-key", "tls-required",
}

# What Grafana's variables stand for when an expression is parsed.
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "x",
    "$job": ".*",
    "$instance": ".*",
}

problems = []


def problem(where, msg):
    problems.append(f"{where}: {msg}")


def walk(node, path, found):
    """Collects (metric name, names of enclosing functions) of each selector."""
    import promql_parser as pp

    if isinstance(node, pp.VectorSelector):
        found.append((node.name, tuple(path)))
    elif isinstance(node, pp.MatrixSelector):
        walk(node.vector_selector, path, found)
    elif isinstance(node, pp.Call):
        name = node.func.name
        for arg in node.args:
            walk(arg, path + [name], found)
    elif isinstance(node, pp.AggregateExpr):
        walk(node.expr, path, found)
        if node.param is not None:
            walk(node.param, path, found)
    elif isinstance(node, pp.BinaryExpr):
        walk(node.lhs, path, found)
        walk(node.rhs, path, found)
    elif isinstance(node, (pp.ParenExpr, pp.UnaryExpr)):
        walk(node.expr, path, found)
    elif isinstance(node, pp.SubqueryExpr):
        walk(node.expr, path + ["subquery"], found)


def check_expr(where, expr, used, selector_only=False):
    """Parses EXPR and checks its metrics; with SELECTOR_ONLY (a variable's
    label_values selector) only the names, not the functions around them."""
    import promql_parser as pp

    text = expr
    for var, value in GRAFANA_VARS.items():
        text = text.replace(var, value)
    if "$" in text:
        problem(where, f"unknown Grafana variable in {expr!r}")
        return
    try:
        ast = pp.parse(text)
    except ValueError as e:
        problem(where, f"PromQL does not parse ({e}): {expr!r}")
        return
    found = []
    walk(ast, [], found)
    if not found:
        problem(where, f"no metric in {expr!r}")
    for name, funcs in found:
        if selector_only:
            if not (name in COUNTERS or name in GAUGES or name.endswith(("_bucket", "_sum", "_count"))
                    and re.sub(r"_(bucket|sum|count)$", "", name) in HISTOGRAMS):
                problem(where, f"{name!r} is not an idemq metric")
            continue
        counted = any(f in ("rate", "irate", "increase") for f in funcs)
        if name in COUNTERS:
            used.add(name)
            if not counted:
                problem(where, f"counter {name} outside rate()/increase()")
        elif name in GAUGES:
            used.add(name)
            if counted:
                problem(where, f"gauge {name} under rate()/increase()")
        elif name.endswith("_bucket") and name[: -len("_bucket")] in HISTOGRAMS:
            used.add(name[: -len("_bucket")])
            if "rate" not in funcs or "histogram_quantile" not in funcs:
                problem(where, f"{name} outside histogram_quantile(..., rate(...))")
        elif re.sub(r"_(sum|count)$", "", name) in HISTOGRAMS:
            used.add(re.sub(r"_(sum|count)$", "", name))
            if not counted:
                problem(where, f"histogram series {name} outside rate()/increase()")
        else:
            problem(where, f"{name!r} is not an idemq metric")


def check_dashboard(path):
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        problem(path, f"not valid JSON: {e}")
        return
    for field in ("title", "uid", "panels", "templating", "schemaVersion"):
        if field not in dash:
            problem(path, f"missing top-level field {field!r}")
    if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
        problem(path, "schemaVersion must be an integer >= 36")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problem(path, "needs a templating variable 'datasource' of type datasource")
    used, ids = set(), set()
    for panel in dash.get("panels", []):
        where = f"{path}: panel {panel.get('id')} {panel.get('title')!r}"
        if panel.get("id") in ids:
            problem(where, "duplicate panel id")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
            problem(where, "gridPos needs integer x, y, w, h")
        elif grid["x"] + grid["w"] > 24:
            problem(where, "gridPos is wider than the 24 columns")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problem(where, "datasource must be the ${datasource} variable")
        targets = panel.get("targets", [])
        if not targets:
            problem(where, "no queries")
        for t in targets:
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problem(where, f"query {t.get('refId')}: datasource must be ${{datasource}}")
            check_expr(where, t.get("expr", ""), used)
    for name, var in variables.items():
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else query or ""
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            if not m:
                problem(path, f"variable {name}: expected label_values(SELECTOR, LABEL)")
            else:
                check_expr(f"{path}: variable {name}", m.group(1), set(), selector_only=True)
    missing = (COUNTERS | GAUGES | HISTOGRAMS) - used
    for name in sorted(missing):
        problem(path, f"idemq metric {name} is on no panel")


def toml_texts(path):
    """The idemq.toml documents in PATH: the file itself, or ConfigMap data."""
    if path.endswith(".toml"):
        with open(path, encoding="utf-8") as f:
            yield path, f.read()
        return
    import yaml

    with open(path, encoding="utf-8") as f:
        for doc in yaml.safe_load_all(f):
            if doc and doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith(".toml"):
                        yield f"{path}: {doc['metadata']['name']}/{key}", text


def check_config(paths):
    seen = False
    for path in paths:
        for where, text in toml_texts(path):
            seen = True
            try:
                config = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                problem(where, f"not valid TOML: {e}")
                continue
            for key in config:
                if key not in CONFIG_KEYS:
                    problem(where, f"{key!r} is not an idemq serve flag")
            if "subject" in config and not isinstance(config["subject"], list):
                problem(where, "subject must be a list of subjects")
    if not seen:
        problem(" ".join(paths), "no idemq.toml found")


def check_compose_binds(stream):
    try:
        config = json.load(stream)
    except ValueError:
        problem("docker compose config", "no JSON on stdin (the file does not load)")
        return
    for name, service in config.get("services", {}).items():
        for volume in service.get("volumes", []):
            source = volume.get("source", "")
            if volume.get("type") == "bind" and not os.path.exists(source):
                problem(f"service {name}", f"bind mount source {source} does not exist")


def main(argv):
    mode = argv[1] if len(argv) > 1 else None
    if mode == "dashboard" and len(argv) > 2:
        for path in argv[2:]:
            check_dashboard(path)
    elif mode == "config" and len(argv) > 2:
        check_config(argv[2:])
    elif mode == "compose-binds" and len(argv) == 2:
        check_compose_binds(sys.stdin)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
