//! `deploy/`, the compose file and the Dockerfile against the code they
//! configure: config files load in the real binary, every `IDEMQ_*`
//! variable names a real flag, and the Grafana dashboard reads exactly the
//! metrics the worker exports. (Schema validation of the same files is
//! `deploy/check.sh`'s job; this catches drift between them and `src/`.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The `idemq.toml` block of a ConfigMap: the lines indented under `idemq.toml: |`.
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml
        .lines()
        .skip_while(|line| !line.trim_end().ends_with("idemq.toml: |"));
    lines.next().expect("the ConfigMap has an idemq.toml key");
    let body: Vec<&str> = lines
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .collect();
    body.iter()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `idemq serve --config FILE --print-config`: the effective configuration.
fn print_config(toml: &str) -> String {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let path = dir.path().join("idemq.toml");
    std::fs::write(&path, toml).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_idemq"))
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--print-config")
        .env_remove("IDEMQ_NATS_URL")
        .env_remove("IDEMQ_LOG_FORMAT")
        .output()
        .expect("run idemq");
    assert!(
        out.status.success(),
        "the file does not load:\n{toml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_shipped_config_files_load_in_the_real_binary() {
    let k8s = print_config(&configmap_toml(&read("deploy/k8s/configmap.yaml")));
    assert!(
        k8s.contains("forward = \"exec.{capability}\"  # file"),
        "{k8s}"
    );
    assert!(
        k8s.contains("metrics-addr = \"0.0.0.0:9464\"  # file"),
        "{k8s}"
    );
    assert!(k8s.contains("log-format = \"json\"  # file"), "{k8s}");
    let compose = print_config(&read("deploy/compose/idemq.toml"));
    assert!(compose.contains("# file"), "{compose}");
}

#[test]
fn every_idemq_variable_in_deploy_names_a_real_flag() {
    let mut command = idemq::cli::Cli::command();
    command.build();
    let mut variables = BTreeSet::new();
    for sub in command.get_subcommands() {
        for arg in sub.get_arguments() {
            if let Some(env) = arg.get_env() {
                variables.insert(env.to_string_lossy().into_owned());
            }
        }
    }
    let files = [
        "Dockerfile",
        "docker-compose.yml",
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/secret.example.yaml",
    ];
    let mut checked = 0;
    for file in files {
        let text = read(file);
        for (at, _) in text.match_indices("IDEMQ_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `IDEMQ_*` in prose, not a variable.
            if name.ends_with('_') {
                continue;
            }
            assert!(
                variables.contains(&name),
                "{file}: {name} is not a flag's variable"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "only {checked} variables found: the scan is broken"
    );
}

#[test]
fn the_dashboard_reads_exactly_the_metrics_the_worker_exports() {
    let exposition = idemq::stats::Stats::default().encode();
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() >= 14, "{exported:?}");

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/idemq-dashboard.json")).expect("JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "no PromQL expressions found");
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for (at, _) in expr.match_indices("idemq_") {
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = ["_bucket", "_count", "_sum", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name)
                .to_owned();
            assert!(
                exported.contains(&family),
                "the dashboard reads {name}, which idemq does not export"
            );
            used.insert(family);
        }
    }
    let unused: Vec<&String> = exported.difference(&used).collect();
    assert!(unused.is_empty(), "exported but on no panel: {unused:?}");
}

fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => collect_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}
